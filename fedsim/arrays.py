"""Fast conversions between Flower's ``Array`` records and NumPy / torch, for the hot paths.

Flower stores each array as ``.npy`` bytes; ``Array.numpy()`` parses the header with
``np.load`` (about 0.1 ms an array: for small models the largest per-client cost after the
arithmetic itself) and ``Array(ndarray)`` writes it with ``np.save``. These helpers read and
write exactly the same bytes: the header is checked at its fixed offset (or copied from a
cached ``np.save`` of the same dtype and shape) and the data is one memory copy. Anything
unusual (Fortran order, another byte order, structured dtypes, another serialization type)
goes through Flower's own conversion.

:func:`install` (run when this module is imported, i.e. by any fedsim engine, unless the
environment sets ``FEDSIM_FAST_ARRAYS=0``) makes them
``Array.numpy`` and ``Array.from_numpy_ndarray``, so Flower's own code (FedAvg's aggregation,
``ArrayRecord(state_dict)``) takes the fast path too. Results are identical: the same arrays,
the same bytes, the same object ids (``tests/test_arrays.py``).
"""

from __future__ import annotations

import math
import os
from io import BytesIO

import numpy as np
import torch
from flwr.app import Array, ArrayRecord

_MAGIC = b"\x93NUMPY"
if "_fedsim_flower" not in Array.__dict__:  # Flower's own conversions, kept once (reload-safe)
    Array._fedsim_flower = (Array.__dict__["numpy"], Array.__dict__["from_numpy_ndarray"])
_NUMPY_FN, _FROM_NUMPY_DESC = Array._fedsim_flower


def _FLOWER_NUMPY(arr: Array) -> np.ndarray:  # noqa: N802
    return _NUMPY_FN(arr)


def _FLOWER_FROM_NUMPY(nd: np.ndarray) -> Array:  # noqa: N802
    return _FROM_NUMPY_DESC.__func__(Array, nd)



_HEADERS: dict[tuple[str, tuple[int, ...]], tuple[bytes, str]] = {}  # (dtype, shape) -> (.npy header, dtype name)
_DTYPES: dict[str, tuple[np.dtype, bytes] | None] = {}  # Array.dtype -> (dtype, its header 'descr' entry)


def _dtype(name: str) -> tuple[np.dtype, bytes] | None:
    """The NumPy dtype an ``Array.dtype`` string names; ``None`` for anything but a plain one."""
    if name not in _DTYPES:
        try:
            dt = np.dtype(name)
            plain = dt.fields is None and not dt.hasobject
            _DTYPES[name] = (dt, f"'descr': '{dt.str}'".encode()) if plain else None
        except TypeError:
            _DTYPES[name] = None
    return _DTYPES[name]


def to_numpy(arr: Array, copy: bool = True) -> np.ndarray:
    """``arr.numpy()``, without re-parsing the header; a read-only view when ``copy=False``.

    The fast path is taken only when the ``.npy`` header says exactly what ``arr`` says (C
    order, the same dtype and byte order, as many bytes as the shape needs); otherwise this is
    Flower's own ``np.load``.
    """
    data, known = arr.data, _dtype(arr.dtype)
    if known is not None and arr.stype == "numpy.ndarray" and data[:6] == _MAGIC:
        dtype, descr = known
        start = 12 if data[6] >= 2 else 10  # .npy format 2.0+ has a 4-byte header length
        end = start + int.from_bytes(data[8:start], "little")
        header = data[start:end]
        count = math.prod(arr.shape)
        if b"'fortran_order': False" in header and descr in header and len(data) - end == count * dtype.itemsize:
            out = np.frombuffer(data, dtype=dtype, count=count, offset=end).reshape(arr.shape)
            return out.copy() if copy else out
    return _FLOWER_NUMPY(arr)


def from_numpy(nd: np.ndarray) -> Array:
    """``Array(nd)`` with the ``.npy`` header of this dtype and shape cached."""
    if not isinstance(nd, np.ndarray) or not nd.flags.c_contiguous or nd.dtype.hasobject or nd.dtype.fields is not None:
        return _FLOWER_FROM_NUMPY(nd)
    key = (nd.dtype.str, nd.shape)
    cached = _HEADERS.get(key)
    if cached is None:
        buf = BytesIO()
        np.save(buf, nd, allow_pickle=False)
        full = buf.getvalue()
        cached = _HEADERS[key] = (full[: len(full) - nd.nbytes], str(nd.dtype))
    arr = Array.__new__(Array)  # what Array(dtype=, shape=, stype=, data=) sets, without re-validating
    arr.__dict__.update(dtype=cached[1], shape=nd.shape, stype="numpy.ndarray", data=cached[0] + nd.tobytes())
    return arr


def record_from_torch(state: dict[str, torch.Tensor]) -> ArrayRecord:
    """``ArrayRecord(torch_state_dict=state)`` through :func:`from_numpy`."""
    rec = ArrayRecord()  # item by item: ArrayRecord(dict) would copy every Array again
    for k, v in state.items():
        rec[k] = from_numpy(v.detach().cpu().numpy())
    return rec


def record_to_torch(rec: ArrayRecord) -> dict[str, torch.Tensor]:
    """``rec.to_torch_state_dict()`` through :func:`to_numpy`."""
    return {k: torch.from_numpy(to_numpy(a)) for k, a in rec.items()}


def install() -> None:
    """Make :func:`to_numpy` / :func:`from_numpy` Flower's ``Array.numpy`` / ``Array.from_numpy_ndarray``."""
    Array.numpy = to_numpy  # type: ignore[method-assign]
    Array.from_numpy_ndarray = classmethod(lambda cls, ndarray: from_numpy(ndarray))  # type: ignore[method-assign]


def uninstall() -> None:
    """Give Flower its own conversions back."""
    Array.numpy = _NUMPY_FN  # type: ignore[method-assign]
    Array.from_numpy_ndarray = _FROM_NUMPY_DESC  # type: ignore[method-assign]


if os.environ.get("FEDSIM_FAST_ARRAYS", "1") != "0":  # FEDSIM_FAST_ARRAYS=0 leaves Flower's class alone
    install()

__all__ = ["to_numpy", "from_numpy", "record_from_torch", "record_to_torch", "install", "uninstall"]
