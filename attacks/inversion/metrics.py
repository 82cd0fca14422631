"""Reconstruction metrics, scored by the harness (never by the attack).

Images are compared in [0, 1] (reconstructions are clamped, NaN counts as 0). Per image:

* ``mse`` and ``psnr = 10 log10(1 / mse)`` (breaching's ``psnr`` with factor 1); an exact
  reconstruction (``mse = 0``) has infinite PSNR, reported as :data:`PSNR_CAP` (= 100 dB, see
  :func:`psnr`) everywhere, so medians and success rates stay well defined;
* ``ssim``: standard SSIM from torchmetrics (Gaussian window 11, sigma 1.5, ``data_range=1``).
  An 11-pixel window does not fit an 8x8 image: images smaller than 16 pixels a side use a
  3-pixel window (``kernel_size=3, sigma=0.5``), and the window used is reported;
* ``lpips`` only when its backbone weights are present locally (:func:`lpips_or_skip`);
* label accuracy; for batches > 1, reconstructions are matched to the ground truth first by
  the best assignment (Hungarian algorithm on MSE, ``scipy.optimize.linear_sum_assignment``).

Successful reconstructions land anywhere between 60 and 100 dB, so summaries report the median
and the success rate (share of images above a threshold), not the mean; :func:`floors` gives
the black-image and dataset-mean-image reference values.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

PSNR_CAP = 100.0  # dB; PSNR of an exact reconstruction (MSE 0) and the ceiling of every PSNR


def clean(x: torch.Tensor) -> torch.Tensor:
    """NaN -> 0, clamp to [0, 1], float32 on the CPU."""
    return torch.nan_to_num(x.detach().float().cpu(), nan=0.0, posinf=1.0, neginf=0.0).clamp(0.0, 1.0)


def mse(rec: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
    """Per-image mean squared error ``[B]``."""
    rec, truth = clean(rec), clean(truth)
    return ((rec - truth) ** 2).flatten(1).mean(dim=1)


def psnr_from_mse(m: torch.Tensor | float, cap: float = PSNR_CAP) -> torch.Tensor:
    """``10 log10(1 / mse)``, capped at ``cap`` (MSE 0 -> ``cap``: 'infinite' is reported as the cap)."""
    m = torch.as_tensor(m, dtype=torch.float64)
    floor = 10.0 ** (-cap / 10.0)
    return (10.0 * torch.log10(1.0 / m.clamp_min(floor))).clamp_max(cap)


def psnr(rec: torch.Tensor, truth: torch.Tensor, cap: float = PSNR_CAP) -> torch.Tensor:
    """Per-image PSNR ``[B]`` in dB for images in [0, 1] (peak 1), capped at ``cap``."""
    return psnr_from_mse(mse(rec, truth), cap)


def ssim_window(height: int, width: int) -> tuple[int, float]:
    """(kernel size, sigma): the standard 11 / 1.5, or 3 / 0.5 for images under 16 pixels."""
    return (11, 1.5) if min(height, width) >= 16 else (3, 0.5)


def ssim(rec: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
    """Per-image standard SSIM ``[B]`` (torchmetrics, ``data_range=1``; window by :func:`ssim_window`)."""
    from torchmetrics.functional.image import structural_similarity_index_measure as tm_ssim

    rec, truth = clean(rec), clean(truth)
    k, s = ssim_window(rec.shape[-2], rec.shape[-1])
    out = tm_ssim(rec, truth, data_range=1.0, kernel_size=k, sigma=s, reduction="none")
    return out.reshape(-1)


def match(rec: torch.Tensor, truth: torch.Tensor) -> np.ndarray:
    """Best assignment of reconstructions to true images (minimum total MSE).

    Returns ``order`` such that ``rec[order[i]]`` is matched to ``truth[i]``. Gradients are
    invariant to the order of a batch, so a reconstruction is scored against its best partner.
    """
    from scipy.optimize import linear_sum_assignment

    r, t = clean(rec).flatten(1), clean(truth).flatten(1)
    cost = torch.cdist(t.double(), r.double()) ** 2 / r.shape[1]
    rows, cols = linear_sum_assignment(cost.numpy())
    order = np.empty(len(rows), dtype=np.int64)
    order[rows] = cols
    return order


def lpips_or_skip(net: str = "alex") -> tuple[Any | None, str]:
    """An LPIPS scorer if the ``lpips`` package and its backbone weights are present locally.

    LPIPS needs ImageNet backbone weights that it downloads on first use; no download is
    attempted here. Returns ``(scorer, "")`` or ``(None, reason)``.
    """
    try:
        import lpips  # noqa: F401
    except ImportError:
        return None, "LPIPS skipped: the 'lpips' package is not installed"
    hub = torch.hub.get_dir()
    import glob
    import os

    names = {"alex": "alexnet-owt-*.pth", "vgg": "vgg16-*.pth"}
    if net not in names:
        return None, f"LPIPS skipped: net '{net}' is not one of alex, vgg"
    if not glob.glob(os.path.join(hub, "checkpoints", names[net])):
        return None, f"LPIPS skipped: no local {net} backbone weights in {hub}/checkpoints (no download offline)"
    import lpips

    return lpips.LPIPS(net=net, verbose=False), ""


def score(
    rec: torch.Tensor,
    truth: torch.Tensor,
    rec_labels: torch.Tensor | None = None,
    true_labels: torch.Tensor | None = None,
    lpips_fn: Any | None = None,
) -> dict[str, Any]:
    """Per-image metrics after best-assignment matching (identity order for one image).

    Returns lists ``mse``, ``psnr``, ``ssim`` (``lpips``), the matching ``order`` and, when labels
    are given, ``label_acc`` (share of true labels recovered, as a multiset for batches).
    """
    order = match(rec, truth) if rec.shape[0] > 1 else np.zeros(1, dtype=np.int64)
    rec_m = clean(rec)[torch.as_tensor(order)]
    truth_c = clean(truth)
    out: dict[str, Any] = {
        "mse": mse(rec_m, truth_c).tolist(),
        "psnr": psnr(rec_m, truth_c).tolist(),
        "ssim": ssim(rec_m, truth_c).tolist(),
        "order": order.tolist(),
    }
    if lpips_fn is not None:
        with torch.no_grad():
            a, b = rec_m * 2 - 1, truth_c * 2 - 1
            if a.shape[1] == 1:
                a, b = a.repeat(1, 3, 1, 1), b.repeat(1, 3, 1, 1)
            out["lpips"] = lpips_fn(a, b).reshape(-1).tolist()
    if rec_labels is not None and true_labels is not None:
        out["label_acc"] = label_accuracy(rec_labels, true_labels)
    return out


def label_accuracy(rec_labels: torch.Tensor, true_labels: torch.Tensor) -> float:
    """Share of the true labels recovered, counted as multisets (order-free for batches)."""
    rec = rec_labels.reshape(-1).tolist()
    hit = 0
    for y in true_labels.reshape(-1).tolist():
        if y in rec:
            rec.remove(y)
            hit += 1
    return hit / max(1, true_labels.numel())


def summarize(psnrs: list[float], threshold: float) -> dict[str, float]:
    """Median, quartiles and success rate (share of PSNRs ``>= threshold``) of per-image PSNRs."""
    a = np.asarray(psnrs, dtype=np.float64)
    if a.size == 0:
        return {"n": 0}
    return {
        "n": int(a.size),
        "psnr_median": float(np.median(a)),
        "psnr_q25": float(np.quantile(a, 0.25)),
        "psnr_q75": float(np.quantile(a, 0.75)),
        "success_rate": float(np.mean(a >= threshold)),
        "threshold_db": float(threshold),
    }


def floors(truth: torch.Tensor, dataset_mean: torch.Tensor) -> dict[str, float]:
    """Median PSNR of two trivial 'reconstructions': a black image and the dataset-mean image."""
    truth = clean(truth)
    black = torch.zeros_like(truth)
    mean_img = clean(dataset_mean).expand_as(truth)
    return {
        "floor_black_db": float(torch.median(psnr(black, truth))),
        "floor_mean_db": float(torch.median(psnr(mean_img, truth))),
    }


def finite_or_cap(v: float) -> float:
    """A JSON-safe PSNR (never inf/NaN)."""
    return PSNR_CAP if math.isinf(v) else (0.0 if math.isnan(v) else v)
