"""Tensor interop through DLPack: what the native side reads from NumPy arrays and torch tensors
(dtype, shape, strides, device, read-only flag, no copy) and results handed back as the caller's
kind of array without a copy."""

from __future__ import annotations

import gc
import re

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tvc_rs import _native
from tvc_rs._tensor import is_torch, like

NUMPY_DTYPES = [np.float32, np.float16, np.int32, np.int64]
TORCH_DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.int32, torch.int64]
NAMES = {np.float32: "float32", np.float16: "float16", np.int32: "int32", np.int64: "int64"}


@pytest.mark.parametrize("dtype", NUMPY_DTYPES)
def test_numpy_views_are_read_in_place(dtype):
    x = (np.arange(24) % 7).astype(dtype).reshape(2, 3, 4)
    info = _native._tensor_info(x)
    assert info["dtype"] == NAMES[dtype]
    assert info["shape"] == (2, 3, 4)
    assert info["strides"] == (12, 4, 1)
    assert info["device"] == "cpu"
    assert info["readonly"] is False and info["contiguous"] is True
    assert info["data_ptr"] == x.ctypes.data  # no copy


@pytest.mark.parametrize("dtype", TORCH_DTYPES)
def test_torch_views_are_read_in_place(dtype):
    x = torch.arange(60).to(dtype).reshape(3, 4, 5)
    view = x.transpose(0, 2)[1:, ::2]
    info = _native._tensor_info(view)
    assert info["dtype"] == str(dtype).removeprefix("torch.")
    assert info["shape"] == tuple(view.shape)
    assert info["strides"] == view.stride()
    assert info["contiguous"] is False
    assert info["data_ptr"] == view.data_ptr()


def test_the_producers_deleter_runs():
    import sys

    x = np.ones((64, 3), np.float32)
    t = torch.ones(5, 5)
    before = sys.getrefcount(x), sys.getrefcount(t)
    for _ in range(5):
        _native._tensor_info(x)
        _native._tensor_info(t)
        _native._tensor_copy(x)
    assert (sys.getrefcount(x), sys.getrefcount(t)) == before


def test_readonly_numpy_arrays_are_flagged():
    x = np.ones((3, 2), np.float32)
    x.flags.writeable = False
    assert _native._tensor_info(x)["readonly"] is True


def test_byte_offsets_and_negative_strides():
    x = np.arange(40, dtype=np.float32).reshape(5, 8)
    view = x[::-2, 3:]
    info = _native._tensor_info(view)
    assert info["strides"] == (-16, 1)
    assert info["data_ptr"] == view.ctypes.data
    np.testing.assert_array_equal(np.from_dlpack(_native._tensor_copy(view)), view)


@settings(max_examples=60, deadline=None)
@given(
    shape=st.lists(st.integers(0, 5), min_size=1, max_size=4),
    data=st.data(),
)
def test_strided_copies_match_for_every_layout(shape, data):
    """Any strides NumPy or torch can make (transposes, steps, reversals) read the right elements."""
    base = np.random.default_rng(len(shape)).standard_normal([s * 2 + 1 for s in shape]).astype(np.float32)
    slices = tuple(
        slice(None, None, data.draw(st.sampled_from([1, 2, -1, -2]))) for _ in shape
    )
    view = base[slices]
    view = view[tuple(slice(0, s) for s in shape)]
    if view.ndim > 1:
        view = view.transpose(data.draw(st.permutations(range(view.ndim))))
    out = np.from_dlpack(_native._tensor_copy(view))
    assert out.shape == view.shape and out.flags.c_contiguous
    np.testing.assert_array_equal(out, view)
    tview = torch.from_numpy(np.ascontiguousarray(base))
    tout = torch.from_dlpack(_native._tensor_copy(tview.permute(*reversed(range(tview.ndim)))))
    assert torch.equal(tout, tview.permute(*reversed(range(tview.ndim))))


@pytest.mark.parametrize("dtype", TORCH_DTYPES)
def test_buffers_come_back_as_torch_tensors_without_copy(dtype):
    x = torch.arange(12).to(dtype).reshape(3, 4)
    buffer = _native._tensor_copy(x)
    assert buffer.shape == (3, 4) and buffer.dtype == str(dtype).removeprefix("torch.")
    out = like(buffer, x)
    assert isinstance(out, torch.Tensor) and out.dtype == dtype
    assert torch.equal(out, x)
    # Zero copy: a second import shares the memory of the first.
    again = torch.from_dlpack(buffer)
    assert again.data_ptr() == out.data_ptr()
    out[0, 0] = 5
    assert again[0, 0] == 5


@pytest.mark.parametrize("dtype", NUMPY_DTYPES)
def test_buffers_come_back_as_numpy_arrays_without_copy(dtype):
    x = np.arange(12, dtype=dtype).reshape(4, 3)
    buffer = _native._tensor_copy(x)
    out = like(buffer, x)
    assert isinstance(out, np.ndarray) and out.dtype == dtype
    np.testing.assert_array_equal(out, x)
    assert np.from_dlpack(buffer).ctypes.data == out.ctypes.data


def test_buffers_outlive_their_python_object():
    buffer = _native._tensor_copy(np.arange(1000, dtype=np.float32))
    out = np.from_dlpack(buffer)
    tout = torch.from_dlpack(buffer)
    del buffer
    gc.collect()
    assert out.sum() == sum(range(1000)) and int(tout.sum()) == sum(range(1000))


def test_unconsumed_capsules_are_freed_and_legacy_export_works():
    buffer = _native._tensor_copy(np.ones((2, 2), np.float32))
    for _ in range(3):
        buffer.__dlpack__()  # legacy capsule, dropped unconsumed
        buffer.__dlpack__(max_version=(1, 0))
    assert buffer.__dlpack_device__() == (1, 0)
    copied = np.from_dlpack(buffer, copy=True)
    assert copied.ctypes.data != np.from_dlpack(buffer).ctypes.data


def test_bfloat16_cannot_become_numpy():
    buffer = _native._tensor_copy(torch.ones(3, dtype=torch.bfloat16))
    with pytest.raises(TypeError, match=re.escape("NumPy has no bfloat16")):
        like(buffer, np.ones(3))


def test_bad_arguments_name_themselves():
    with pytest.raises(TypeError, match="^" + re.escape("keys: expected a NumPy array or a torch tensor ") + ".*" + re.escape(" got list")):
        _native._tensor_info([1.0, 2.0], "keys")
    with pytest.raises(TypeError, match="^" + re.escape("x: expected dtype ") + ".*" + re.escape(" got uint8")):
        _native._tensor_info(np.ones(3, np.uint8))
    assert _native._tensor_info(np.ones(3))["dtype"] == "float64"  # read (the KV functions take it)
    with pytest.raises(TypeError, match="^" + re.escape("x: expected dtype ") + ".*" + re.escape(" got bool")):
        _native._tensor_info(torch.ones(3, dtype=torch.bool))
    with pytest.raises(TypeError, match="^" + re.escape("x: expected dtype ") + ".*" + re.escape(" got uint8")):
        _native._tensor_info(np.ones(3, np.uint8))
    with pytest.raises(ValueError, match="^" + re.escape("x: cannot be read through DLPack: ") + ".*" + re.escape("detach")):
        _native._tensor_info(torch.ones(3, requires_grad=True))
    with pytest.raises(ValueError, match="^" + re.escape("x: cannot be read through DLPack")):
        _native._tensor_info(torch.ones(3, device="meta"))


def test_torch_subclasses_count_as_torch():
    assert is_torch(torch.nn.Parameter(torch.ones(2)))
    assert not is_torch(np.ones(2))
