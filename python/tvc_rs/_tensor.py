"""Tensor interop glue: return native results as the same kind of array the caller passed.

The native functions take NumPy arrays and torch tensors through DLPack (no copy) and return
``tvc_rs._native.Buffer`` objects (Rust-owned memory exported through DLPack). ``like`` turns a
Buffer into a torch tensor when the reference argument is a torch tensor and into a NumPy array
otherwise, again without a copy. NumPy has no bfloat16, so bfloat16 results need torch inputs.
CUDA inputs give torch CUDA tensors, allocated by PyTorch on the input's device.
"""

from __future__ import annotations

from typing import Any

import numpy as np


def is_torch(obj: Any) -> bool:
    """True for torch tensors (and subclasses such as ``torch.nn.Parameter``)."""
    return any(cls.__module__.partition(".")[0] == "torch" for cls in type(obj).__mro__)


def like(buffer: Any, reference: Any) -> Any:
    """``buffer`` as a torch tensor if ``reference`` is one, else as a NumPy array (zero copy).
    Results of the CUDA backend are torch tensors already and come back as they are."""
    if is_torch(buffer):
        return buffer
    if is_torch(reference):
        import torch

        return torch.from_dlpack(buffer)
    if buffer.dtype == "bfloat16":
        raise TypeError("cannot return a bfloat16 result as a NumPy array (NumPy has no bfloat16); pass torch tensors")
    return np.from_dlpack(buffer)
