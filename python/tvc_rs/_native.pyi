"""Type stubs of the native module ``tvc_rs._native`` (Rust, PyO3). One section per capability."""

from __future__ import annotations

__version__: str

# --- triggers (src/python/triggers.rs) ---

# --- end triggers ---

# --- rope (src/python/rope.rs) ---

from typing import Any as _Any

import numpy as _np
from numpy.typing import NDArray as _NDArray

def mrope_position_ids(
    input_ids: _Any,
    image_grid_thw: _Any | None = None,
    video_grid_thw: _Any | None = None,
    attention_mask: _Any | None = None,
    *,
    mm_token_type_ids: _Any | None = None,
    second_per_grid_ts: _Any | None = None,
    model_type: str = "qwen2_vl",
    spatial_merge_size: int = 2,
    image_token_id: int = 151655,
    video_token_id: int = 151656,
    tokens_per_second: int | float | None = None,
) -> tuple[_NDArray[_np.int32] | _NDArray[_np.int64], _NDArray[_np.int64]]:
    """NumPy arrays in (``input_ids`` int32/int64 ``(batch, seq)``, C-contiguous), NumPy out:
    ``position_ids`` ``(3, batch, seq)`` in ``input_ids``' dtype and ``rope_deltas`` ``(batch, 1)`` int64.
    ``second_per_grid_ts`` is passed as given (tensor, array or list): its dtype decides the arithmetic."""

def smart_resize(
    height: int, width: int, *, factor: int = 28, min_pixels: int = 3136, max_pixels: int = 1003520
) -> tuple[int, int]: ...
def image_grid_thw(
    height: int,
    width: int,
    *,
    patch_size: int = 14,
    merge_size: int = 2,
    min_pixels: int = 3136,
    max_pixels: int = 1003520,
) -> tuple[int, int, int]: ...
def image_token_count(
    height: int,
    width: int,
    *,
    patch_size: int = 14,
    merge_size: int = 2,
    min_pixels: int = 3136,
    max_pixels: int = 1003520,
) -> int: ...

# --- end rope ---

# --- compress (src/python/compress.rs) ---

# --- end compress ---

# --- kv (src/python/kv.rs) ---

# --- end kv ---
