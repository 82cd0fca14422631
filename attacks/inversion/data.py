"""Target images for the benchmarks, in [0, 1]: scikit-learn's 8x8 digits or MNIST from an npz.

For MNIST (``mnist10k.npz``) the images ``[0, split)`` are the clients' (targets are drawn from
them) and ``[split, N)`` are public: ``scripts/train_dcgan.py`` trains GIFD's generator there,
so the prior never saw a target.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

MNIST_SPLIT = 5000  # images [0, 5000) are the clients', [5000, 10000) the public GAN split


def load_pool(name: str, path: str | None = None, part: str = "clients") -> tuple[torch.Tensor, torch.Tensor]:
    """``(x [N, 1, H, W] float in [0, 1], y [N] int64)`` of ``digits`` or ``mnist`` (an npz path)."""
    if name == "digits":
        from sklearn.datasets import load_digits

        d = load_digits()
        x = torch.from_numpy((d.images / 16.0).astype(np.float32))[:, None]
        return x, torch.from_numpy(d.target.astype(np.int64))
    if name == "mnist":
        if path is None or not Path(path).is_file():
            raise FileNotFoundError(f"inversion.data_path: MNIST npz not found: {path}")
        with np.load(path, allow_pickle=False) as f:
            if "x" not in f.files or "y" not in f.files:
                raise ValueError(f"inversion.data_path: {path} lacks arrays x and y")
            x, y = f["x"], f["y"]
        x = torch.from_numpy(x.astype(np.float32) / (255.0 if x.dtype == np.uint8 else 1.0))
        if x.dim() == 3:
            x = x[:, None]
        y = torch.from_numpy(y.astype(np.int64))
        sl = slice(0, MNIST_SPLIT) if part == "clients" else slice(MNIST_SPLIT, None)
        return x[sl].contiguous(), y[sl].contiguous()
    raise ValueError(f"inversion.data: '{name}' is not one of digits, mnist")


def pick(n_batches: int, batch_size: int, labels: torch.Tensor, seed: int, distinct_labels: bool = False) -> list[torch.Tensor]:
    """``n_batches`` disjoint index batches, seeded; optionally with distinct labels per batch."""
    gen = torch.Generator().manual_seed(int(seed))
    perm = torch.randperm(len(labels), generator=gen)
    out: list[torch.Tensor] = []
    pos = 0
    while len(out) < n_batches:
        if not distinct_labels:
            if pos + batch_size > len(perm):
                raise ValueError("inversion.num_images: more images than the pool holds")
            out.append(perm[pos : pos + batch_size])
            pos += batch_size
            continue
        batch, seen = [], set()
        while len(batch) < batch_size:
            if pos >= len(perm):
                raise ValueError("inversion: not enough images for distinct-label batches")
            i = int(perm[pos])
            pos += 1
            if int(labels[i]) not in seen:
                seen.add(int(labels[i]))
                batch.append(i)
        out.append(torch.tensor(batch))
    return out
