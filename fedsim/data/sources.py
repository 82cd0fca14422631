"""Data sources. Each returns the same in-memory :class:`DataBundle` of train/test tensors.

Images are float32 ``[N, C, H, W]``; tabular data is ``[N, D]``. Labels are int64.
No source downloads anything unless its config explicitly allows it.
"""

from __future__ import annotations

import gzip
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedsim.data.checks import DataError, check_pair, check_split
from fedsim.seeding import np_rng


@dataclass
class DataBundle:
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int
    # Per-client index arrays when the source is naturally partitioned (Synthetic(alpha, beta)).
    natural_partitions: list[np.ndarray] | None = None

    @property
    def in_shape(self) -> tuple[int, ...]:
        return tuple(self.x_train.shape[1:])


def _split(x: np.ndarray, y: np.ndarray, frac: float, seed: int) -> tuple[np.ndarray, ...]:
    """Seeded train/test split for sources that ship one array."""
    perm = np_rng(seed, "test-split").permutation(len(y))
    n_test = max(1, int(round(frac * len(y))))
    te, tr = perm[:n_test], perm[n_test:]
    return x[tr], y[tr], x[te], y[te]


def _images(x: np.ndarray) -> np.ndarray:
    """uint8/float images [N,H,W] or [N,H,W,C] or [N,C,H,W] -> float32 [N,C,H,W] in [0, 1]."""
    x = np.asarray(x)
    scale = 255.0 if x.dtype == np.uint8 or x.max() > 1.5 else 1.0
    x = x.astype(np.float32) / scale
    if x.ndim == 3:
        x = x[:, None]
    elif x.ndim == 4 and x.shape[-1] in (1, 3) and x.shape[1] not in (1, 3):
        x = x.transpose(0, 3, 1, 2)
    return np.ascontiguousarray(x)


def _bundle(xtr, ytr, xte, yte, cfg: Any, natural=None, where: str | None = None, num_classes: int | None = None) -> DataBundle:
    """Check the arrays (:mod:`fedsim.data.checks`), normalise, and wrap them as tensors.

    ``num_classes`` fixes C for sources that know it (synthetic data, where a class may happen
    to be absent); otherwise C comes from the training labels, which must be exactly 0..C-1.
    """
    where = where or f"dataset={cfg.name}"
    nonfinite = str(cfg.get("nonfinite", "error"))
    xtr, ytr, xte, yte, classes = check_split(xtr, ytr, xte, yte, where, nonfinite, known_classes=num_classes)
    xtr, xte = np.asarray(xtr, np.float32), np.asarray(xte, np.float32)
    if cfg.normalize:
        axes = (0,) if xtr.ndim == 2 else (0, 2, 3)
        mean = xtr.mean(axis=axes, keepdims=True)  # per feature (tabular) / channel (images)
        std = xtr.std(axis=axes, keepdims=True) + 1e-6
        xtr, xte = (xtr - mean) / std, (xte - mean) / std
    return DataBundle(
        torch.from_numpy(np.ascontiguousarray(xtr)),
        torch.from_numpy(ytr),
        torch.from_numpy(np.ascontiguousarray(xte)),
        torch.from_numpy(yte),
        classes,
        natural,
    )


def load_digits(cfg: Any, seed: int) -> DataBundle:
    """scikit-learn's bundled 8x8 handwritten digits (1,797 images, no download)."""
    from sklearn.datasets import load_digits as sk_digits

    d = sk_digits()
    x = (d.images / 16.0).astype(np.float32)[:, None]
    return _bundle(*_split(x, d.target, cfg.test_fraction, seed), cfg)


def load_npz(cfg: Any, seed: int) -> DataBundle:
    """A local ``.npz`` with ``x``, ``y`` (and optionally ``x_test``, ``y_test``).

    Read with ``allow_pickle=False``; every array is checked (:mod:`fedsim.data.checks`) and any
    problem is one :class:`DataError` naming the file and the array.
    """
    path = Path(cfg.path)
    where = f"dataset.path={path}"
    try:
        f = np.load(path, allow_pickle=False)
    except Exception as err:  # not a zip archive, a pickle, an unreadable file
        raise DataError(
            f"{where}: not an .npz archive (np.savez / np.savez_compressed) readable by numpy "
            f"({type(err).__name__})"
        ) from None
    if not isinstance(f, np.lib.npyio.NpzFile):
        raise DataError(f"{where}: is a single .npy array, not an .npz archive with arrays 'x' and 'y' (use np.savez)")
    with f:
        names = set(f.files)
        missing = [k for k in ("x", "y") if k not in names]
        if missing:
            raise DataError(f"{where}: has no array {' or '.join(repr(k) for k in missing)} (it has {sorted(names)})")
        half = {"x_test", "y_test"} & names
        if len(half) == 1:
            (have,) = half
            need = "y_test" if have == "x_test" else "x_test"
            raise DataError(f"{where}: has '{have}' but no '{need}'; give both or neither")

        def read(name: str) -> np.ndarray:
            try:
                return f[name]
            except ValueError as err:  # object arrays need pickle, which is never allowed
                raise DataError(f"{where}: array '{name}' holds Python objects (dtype=object); store numbers ({err.__class__.__name__})") from None

        nonfinite = str(cfg.get("nonfinite", "error"))
        x, y = check_pair(read("x"), read("y"), where, ("x", "y"), nonfinite)
        if half:
            parts = (x, y) + check_pair(read("x_test"), read("y_test"), where, ("x_test", "y_test"), nonfinite)
        else:
            parts = _split(x, y, cfg.test_fraction, seed)
    xtr, ytr, xte, yte = parts
    if xtr.ndim >= 3:
        xtr, xte = _images(xtr), _images(xte)
    return _bundle(xtr, ytr, xte, yte, cfg, where=where)


# --- torchvision's on-disk layout, read without torchvision -------------------------------

def _read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (MNIST's format), plain or gzipped."""
    for p in (path, path.with_name(path.name + ".gz")):
        if p.is_file():
            raw = (gzip.open if p.suffix == ".gz" else open)(p, "rb").read()
            ndim = raw[3]
            dims = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
            return np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim).reshape(dims)
    raise FileNotFoundError(f"dataset.root: missing {path} (or .gz)")


def _load_mnist_like(root: Path, name: str) -> tuple[np.ndarray, ...]:
    raw = root / name / "raw"
    return (
        _read_idx(raw / "train-images-idx3-ubyte"),
        _read_idx(raw / "train-labels-idx1-ubyte"),
        _read_idx(raw / "t10k-images-idx3-ubyte"),
        _read_idx(raw / "t10k-labels-idx1-ubyte"),
    )


def _load_cifar10(root: Path) -> tuple[np.ndarray, ...]:
    base = root / "cifar-10-batches-py"

    def batch(name: str) -> tuple[np.ndarray, np.ndarray]:
        p = base / name
        if not p.is_file():
            raise FileNotFoundError(f"dataset.root: missing {p}")
        with open(p, "rb") as f:
            d = pickle.load(f, encoding="bytes")
        return np.asarray(d[b"data"]).reshape(-1, 3, 32, 32), np.asarray(d[b"labels"])

    tr = [batch(f"data_batch_{i}") for i in range(1, 6)]
    te = batch("test_batch")
    return np.concatenate([a for a, _ in tr]), np.concatenate([b for _, b in tr]), te[0], te[1]


def load_torchvision(cfg: Any, seed: int) -> DataBundle:
    """MNIST / FashionMNIST / CIFAR10 from a root in torchvision's layout.

    Reading needs no torchvision. With ``dataset.download=true`` torchvision (and a network)
    fetches the files first.
    """
    root = Path(cfg.root)
    if cfg.download:
        import torchvision.datasets as tvd  # optional dependency

        for train in (True, False):
            getattr(tvd, cfg.dataset_name)(str(root), train=train, download=True)
    if cfg.dataset_name == "CIFAR10":
        xtr, ytr, xte, yte = _load_cifar10(root)
    else:
        xtr, ytr, xte, yte = _load_mnist_like(root, cfg.dataset_name)
    return _bundle(_images(xtr), ytr, _images(xte), yte, cfg, where=f"dataset.root={root}")


def load_huggingface(cfg: Any, seed: int) -> DataBundle:
    """Any image-classification dataset through flwr-datasets' FederatedDataset.

    ``dataset.dataset_name`` is a hub id (needs a network) or a local directory that
    ``datasets.load_dataset`` reads (e.g. an ``imagefolder`` or parquet files).
    """
    from flwr_datasets import FederatedDataset
    from flwr_datasets.partitioner import IidPartitioner

    fds = FederatedDataset(
        dataset=cfg.dataset_name,
        partitioners={cfg.train_split: IidPartitioner(num_partitions=1)},
        shuffle=False,
    )
    train = fds.load_split(cfg.train_split)
    image_key = cfg.image_key or next(
        (k for k in ("image", "img", "pixel_values") if k in train.column_names), None
    )
    label_key = cfg.label_key or next(
        (k for k in ("label", "labels", "fine_label") if k in train.column_names), None
    )
    if image_key is None or label_key is None:
        raise ValueError(
            f"dataset.image_key/label_key: cannot detect columns in {train.column_names}"
        )

    def arrays(ds) -> tuple[np.ndarray, np.ndarray]:
        ds = ds.with_format("numpy")
        return _images(np.stack(list(ds[image_key]))), np.asarray(ds[label_key])

    xtr, ytr = arrays(train)
    test = None
    if cfg.test_split:
        try:
            test = fds.load_split(cfg.test_split)
        except (KeyError, ValueError):  # the dataset has no such split: split train instead
            test = None
    if test is None:
        xtr, ytr, xte, yte = _split(xtr, ytr, cfg.test_fraction, seed)
    else:
        xte, yte = arrays(test)
    return _bundle(xtr, ytr, xte, yte, cfg, where=f"dataset.dataset_name={cfg.dataset_name}")


def load_synthetic(cfg: Any, num_clients: int, seed: int) -> DataBundle:
    """Synthetic(alpha, beta) of the FedProx paper (Li et al., MLSys 2020, Sec. 5.1).

    Client k: u_k ~ N(0, alpha), W_k ~ N(u_k, 1) [C x D], b_k ~ N(u_k, 1) [C];
    B_k ~ N(0, beta), v_k ~ N(B_k, 1) [D]; x ~ N(v_k, Sigma), Sigma = diag(j^-1.2);
    y = argmax softmax(W_k x + b_k). Samples per client ~ lognormal(4, 2) + 50 as in the
    authors' generator. Each client keeps 80% for training; the test set pools the other 20%.
    ``iid=true`` gives the IID variant (one shared W, b and v = 0).
    """
    rng = np_rng(seed, "synthetic")
    d, c = cfg.dim, cfg.classes
    sigma = np.array([(j + 1) ** -1.2 for j in range(d)])
    sizes = rng.lognormal(4, 2, num_clients).astype(int) + 50
    sizes = np.minimum(sizes, 10_000)
    w_shared, b_shared = rng.normal(0, 1, (c, d)), rng.normal(0, 1, c)
    xs_tr, ys_tr, xs_te, ys_te, parts = [], [], [], [], []
    offset = 0
    for k in range(num_clients):
        if cfg.iid:
            w, b, v = w_shared, b_shared, np.zeros(d)
        else:
            u = rng.normal(0, np.sqrt(cfg.alpha))
            w, b = rng.normal(u, 1, (c, d)), rng.normal(u, 1, c)
            v = rng.normal(rng.normal(0, np.sqrt(cfg.beta), d), 1)
        x = rng.normal(v, np.sqrt(sigma), (sizes[k], d))
        y = np.argmax(x @ w.T + b, axis=1)
        n_tr = int(0.8 * sizes[k])
        xs_tr.append(x[:n_tr]), ys_tr.append(y[:n_tr])
        xs_te.append(x[n_tr:]), ys_te.append(y[n_tr:])
        parts.append(np.arange(offset, offset + n_tr))
        offset += n_tr
    xtr, ytr = np.concatenate(xs_tr), np.concatenate(ys_tr)
    xte, yte = np.concatenate(xs_te), np.concatenate(ys_te)
    return _bundle(xtr, ytr, xte, yte, cfg, natural=parts, num_classes=c)


def load_source(cfg: Any, num_clients: int, seed: int) -> DataBundle:
    """Dispatch on ``dataset.name`` and apply ``dataset.max_samples``."""
    loaders = {
        "digits": load_digits,
        "npz": load_npz,
        "torchvision": load_torchvision,
        "huggingface": load_huggingface,
    }
    if cfg.name == "synthetic":
        bundle = load_synthetic(cfg, num_clients, seed)
    elif cfg.name in loaders:
        bundle = loaders[cfg.name](cfg, seed)
    else:
        raise ValueError(f"dataset.name: unknown source '{cfg.name}'")
    if cfg.max_samples is not None and cfg.max_samples < len(bundle.y_train):
        if bundle.natural_partitions is not None:
            raise ValueError("dataset.max_samples: not supported for naturally partitioned data")
        keep = np.sort(np_rng(seed, "max-samples").permutation(len(bundle.y_train))[: cfg.max_samples])
        bundle.x_train, bundle.y_train = bundle.x_train[keep], bundle.y_train[keep]
    return bundle
