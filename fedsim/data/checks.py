"""Checks on the arrays a data source loads, run once at load time, before any training.

Every problem becomes a :class:`DataError` (a :class:`fedsim.config.ConfigError`, so the
``fedsim`` command prints it as one line and exits with status 2) that names the source (file),
the array and the problem. What is checked and why:

* ``x`` is numeric and at least 2-D (``[N, features]`` or images ``[N, H, W(, C)]``); ``y`` is a
  1-D vector of class indices (a 2-D ``y`` is one-hot or multi-label: refused, with the fix);
* ``x`` and ``y`` are non-empty and of the same length (a longer ``x`` used to drop rows
  silently; a shorter one raised IndexError mid-run);
* labels are integers, or floats whose values are all integral (``y`` in [0, 1) used to be
  truncated to class 0 and give accuracy 1.0); never negative, strings or objects;
* at least two classes in the training labels (one class gave a one-output model, accuracy 1.0);
* the training labels are exactly ``0..C-1`` (labels {0, 1000} used to give a 1001-class model):
  non-contiguous labels are **refused**, not remapped, because a silent remap would change what
  a label means (label-flip attacks, per-class reports, a test set encoded the same way) -- the
  message shows the one-line fix (``np.unique(y, return_inverse=True)``);
* test labels lie in the training label range ``0..C-1``; ``x_test`` has the width of ``x``;
* every value of ``x`` is finite (one NaN pixel with normalisation on turned every feature into
  NaN, dropped every reply and still ended with exit status 0). ``dataset.nonfinite=drop`` drops
  the affected samples instead (the count is logged); the default ``error`` refuses them.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from fedsim.config import ConfigError

log = logging.getLogger("fedsim")

NONFINITE_MODES = ("error", "drop")


class DataError(ConfigError):
    """The data a source loaded cannot be used; the message names the source, array and problem."""


def _fail(where: str, array: str, problem: str) -> None:
    raise DataError(f"{where}: array '{array}' {problem}")


def check_features(x: Any, where: str, name: str = "x") -> np.ndarray:
    """``x`` as an ndarray that is numeric, at least 2-D and non-empty."""
    x = np.asarray(x)
    if x.dtype == object or x.dtype.kind not in "biuf":
        _fail(where, name, f"must be numeric (got dtype {x.dtype})")
    if x.ndim < 2:
        _fail(
            where, name,
            f"must be [N, features] or images [N, H, W(, C)] (got shape {tuple(x.shape)}); "
            "a single feature is x[:, None]",
        )
    if x.shape[0] == 0:
        _fail(where, name, "is empty (0 samples)")
    return x


def check_labels(y: Any, where: str, name: str = "y") -> np.ndarray:
    """``y`` as an int64 vector of non-negative class indices (integral floats are accepted)."""
    y = np.asarray(y)
    if y.ndim == 2 and y.shape[1] > 1:
        _fail(
            where, name,
            f"has shape {tuple(y.shape)}: one-hot or multi-label; store class indices instead "
            "(y.argmax(1) for one-hot)",
        )
    if y.ndim == 2:
        y = y[:, 0]
    if y.ndim != 1:
        _fail(where, name, f"must be a vector of class indices (got shape {tuple(y.shape)})")
    if y.shape[0] == 0:
        _fail(where, name, "is empty (0 samples)")
    if y.dtype == object or y.dtype.kind not in "biuf":
        _fail(where, name, f"must hold integer class indices (got dtype {y.dtype})")
    if y.dtype.kind == "f":
        if not np.isfinite(y).all():
            _fail(where, name, "holds NaN or Inf labels")
        frac = y[y != np.round(y)]
        if frac.size:
            _fail(
                where, name,
                f"holds non-integer labels (e.g. {frac[0]!r}; dtype {y.dtype}); "
                "classification labels must be class indices 0..C-1",
            )
    if y.dtype.kind == "b":
        y = y.astype(np.int64)
    if (y < 0).any():
        _fail(where, name, f"holds negative labels (e.g. {y[y < 0][0]}); labels must be class indices 0..C-1")
    return y.astype(np.int64)


def num_classes_of(y_train: np.ndarray, where: str, name: str = "y") -> int:
    """C for training labels that are exactly ``0..C-1`` (C >= 2); refuses anything else."""
    present = np.unique(y_train)
    if present.size < 2:
        _fail(where, name, f"has a single class ({present.tolist()}); classification needs at least 2")
    c = int(present[-1]) + 1
    if present.size != c:
        missing = sorted(set(range(c)) - set(present.tolist()))
        shown = ", ".join(map(str, missing[:5])) + (", ..." if len(missing) > 5 else "")
        _fail(
            where, name,
            f"has {present.size} distinct labels but the largest is {c - 1}: labels must be 0..C-1 "
            f"with every class present (missing {shown}; a {c}-class model would be built); "
            "remap them, e.g. y = np.unique(y, return_inverse=True)[1]",
        )
    return c


def finite_rows(x: np.ndarray, where: str, name: str, mode: str) -> np.ndarray | None:
    """None when ``x`` is all finite; with ``mode='drop'`` the mask of rows to keep; else DataError."""
    if x.dtype.kind != "f":
        return None
    bad = ~np.isfinite(x.reshape(len(x), -1)).all(axis=1)
    if not bad.any():
        return None
    if mode != "drop":
        _fail(
            where, name,
            f"holds NaN or Inf values in {int(bad.sum())} of {len(x)} samples (first at index "
            f"{int(np.flatnonzero(bad)[0])}); clean the file or set dataset.nonfinite=drop to drop those samples",
        )
    log.warning("%s: dropped %d of %d samples of '%s' with NaN/Inf values (dataset.nonfinite=drop)",
                where, int(bad.sum()), len(x), name)
    return ~bad


def check_pair(
    x: Any, y: Any, where: str, names: tuple[str, str] = ("x", "y"), nonfinite: str = "error"
) -> tuple[np.ndarray, np.ndarray]:
    """One (features, labels) pair: each checked, of the same length, and finite (or, with
    ``nonfinite='drop'``, without the non-finite samples)."""
    x = check_features(x, where, names[0])
    y = check_labels(y, where, names[1])
    if len(x) != len(y):
        _fail(where, names[0], f"has {len(x)} samples but '{names[1]}' has {len(y)}; they must match")
    keep = finite_rows(x, where, names[0], nonfinite)
    if keep is not None:
        x, y = x[keep], y[keep]
        if len(y) == 0:
            _fail(where, names[0], "has no finite sample left")
    return x, y


def check_split(
    xtr: Any,
    ytr: Any,
    xte: Any,
    yte: Any,
    where: str,
    nonfinite: str = "error",
    test_names: tuple[str, str] = ("x_test", "y_test"),
    known_classes: int | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, int]:
    """Check a train/test split; return the (possibly row-filtered) arrays and the class count C.

    ``known_classes`` is C for a source that defines it (then labels need only lie in 0..C-1).
    """
    if nonfinite not in NONFINITE_MODES:
        raise ConfigError(f"dataset.nonfinite: '{nonfinite}' is not one of {NONFINITE_MODES}")
    xtr, ytr = check_pair(xtr, ytr, where, ("x", "y"), nonfinite)
    xte, yte = check_pair(xte, yte, where, test_names, nonfinite)
    if xte.shape[1:] != xtr.shape[1:]:
        _fail(where, test_names[0], f"has sample shape {tuple(xte.shape[1:])} but 'x' has {tuple(xtr.shape[1:])}")
    if known_classes is None:
        c = num_classes_of(ytr, where)
    else:
        c = int(known_classes)
        if int(ytr.max()) >= c:
            _fail(where, "y", f"holds labels >= the source's {c} classes")
    if int(yte.max()) >= c:
        bad = sorted(set(np.unique(yte[yte >= c]).tolist()))
        _fail(where, test_names[1], f"holds labels {bad[:5]} outside the training labels 0..{c - 1}")
    return xtr, ytr, xte, yte, c
