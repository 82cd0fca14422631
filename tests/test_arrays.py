"""fedsim.arrays: the fast Array conversions give exactly what Flower's own give."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord

from fedsim import arrays

CASES = [
    np.random.default_rng(0).normal(size=(64, 64)).astype(np.float32),
    np.arange(7, dtype=np.int64),
    np.ones((), np.float32),  # 0-d
    np.zeros((0, 3), np.float64),  # empty
    np.random.default_rng(1).normal(size=(3, 4)).T,  # Fortran order
    np.random.default_rng(2).normal(size=(2, 3)).astype(np.float16),
    np.array([True, False]),
    np.array([1, 2, 3], dtype=">i4"),  # non-native byte order
    np.zeros((2,), dtype=[("a", "<f4"), ("b", "<i2")]),  # structured
    np.random.default_rng(3).normal(size=(4, 6))[:, ::2],  # not contiguous
]


@pytest.mark.parametrize("nd", CASES, ids=range(len(CASES)))
def test_same_bytes_and_arrays_as_flower(nd):
    ref = arrays._FLOWER_FROM_NUMPY(nd)
    fast = arrays.from_numpy(nd)
    assert (fast.dtype, fast.shape, fast.stype, fast.data) == (ref.dtype, ref.shape, ref.stype, ref.data)
    assert fast.object_id == ref.object_id
    for copy in (True, False):
        out, want = arrays.to_numpy(ref, copy=copy), arrays._FLOWER_NUMPY(ref)
        assert out.dtype == want.dtype and out.shape == want.shape and np.array_equal(out, want)
    assert arrays.to_numpy(ref).flags.writeable  # like np.load's result, safe to modify


def test_installed_into_flower_and_removable():
    sd = torch.nn.Linear(5, 3).state_dict()
    fast = ArrayRecord(sd)
    assert Array.numpy is arrays.to_numpy
    arrays.uninstall()
    try:
        assert Array.numpy is not arrays.to_numpy
        ref = ArrayRecord(sd)
        assert fast.object_id == ref.object_id
        back = ref.to_torch_state_dict()
    finally:
        arrays.install()
    assert all(torch.equal(back[k], v) for k, v in arrays.record_to_torch(fast).items())
    assert all(torch.equal(sd[k], v) for k, v in arrays.record_to_torch(arrays.record_from_torch(sd)).items())


def test_inconsistent_header_falls_back():
    a = arrays._FLOWER_FROM_NUMPY(np.arange(6, dtype=np.float32))
    wrong = Array(dtype="float64", shape=(6,), stype="numpy.ndarray", data=a.data)  # dtype disagrees
    assert np.array_equal(arrays.to_numpy(wrong), np.arange(6, dtype=np.float32))
