"""Type stubs of the native module ``tvc_rs._native`` (Rust, PyO3). One section per capability."""

from __future__ import annotations

__version__: str

# --- triggers (src/python/triggers.rs) ---

from os import PathLike
from typing import Any, Literal, Optional, Sequence, Union

import numpy as np
import numpy.typing as npt

TokenIds = Union[Sequence[int], npt.NDArray[np.integer], Any]  # list, NumPy array or CPU tensor, 1-D

DEFAULT_PHRASES: list[str]

class Hit:
    """A phrase matched the decoded text at characters ``char_start:char_end`` (``str`` offsets);
    ``token_index`` is the token whose bytes confirmed the match's end (None for plain text)."""

    token_index: Optional[int]
    phrase: str
    phrase_index: int
    char_start: int
    char_end: int

class TextScan:
    """What a schedule makes of one text (``ReflectionDetector.scan``)."""

    tokens: int
    hits: list[Hit]
    calibrations: list[Calibration]
    error: Optional[str]

class ReflectionDetector:
    """Finds reflection phrases where ``(?<!\\w)phrase(?!\\w)`` (case-insensitive) matches the
    text that tokens decode to.

    tokenizer: path to tokenizer.json or a model folder holding one, a ``tokenizers.Tokenizer``,
    or a transformers fast tokenizer. phrases: default ``DEFAULT_PHRASES``.
    Raises OSError (no such file), ValueError (bad tokenizer.json, empty or repeated phrase),
    TypeError (anything else as tokenizer)."""

    def __init__(self, tokenizer: Union[str, PathLike[str], Any], phrases: Optional[Sequence[str]] = None) -> None: ...
    @property
    def phrases(self) -> list[str]: ...
    @property
    def vocab_size(self) -> int: ...
    def find_text(self, text: str) -> list[Hit]: ...
    def find_tokens(self, tokens: TokenIds) -> list[Hit]:
        """Hits of a whole token list, as streaming it and calling ``finish()`` gives.
        IndexError for an id outside the vocabulary."""
    def encode(self, text: str) -> list[int]: ...
    def stream(
        self,
        schedule: Optional[PVCSchedule] = None,
        *,
        calibrations_made: int = 0,
        tokens_since_last: Optional[int] = None,
    ) -> ReflectionStream: ...
    def batch(self, capacity: int) -> StreamBatch: ...
    def scan(self, texts: Sequence[str], schedule: Optional[PVCSchedule] = None) -> list[TextScan]:
        """Tokenize each text and watch it as if generated (in parallel)."""

class ReflectionStream:
    """One generation watched token by token, with its own schedule state."""

    def push(self, token_id: int) -> Optional[Calibration]:
        """Feed the next token; the calibration decided at it, or None. IndexError for a bad id
        (nothing changes)."""
    def push_many(self, tokens: TokenIds) -> list[Calibration]: ...
    def finish(self) -> Optional[Calibration]:
        """End of text: a phrase right at the end becomes a hit at the last token."""
    @property
    def hits(self) -> list[Hit]: ...
    @property
    def calibrations(self) -> list[Calibration]: ...
    @property
    def tokens_seen(self) -> int: ...
    @property
    def calibrations_made(self) -> int: ...
    @property
    def tokens_since_last(self) -> int: ...
    @property
    def text_length(self) -> int: ...
    @property
    def schedule(self) -> PVCSchedule: ...

class StreamBatch:
    """Streams in numbered slots following a serving engine's batch; one ``step`` per decoding
    step. IndexError for a slot outside ``0..capacity``."""

    @property
    def capacity(self) -> int: ...
    def add(
        self,
        slot: int,
        schedule: Optional[PVCSchedule] = None,
        *,
        calibrations_made: int = 0,
        tokens_since_last: Optional[int] = None,
    ) -> None: ...
    def remove(self, slot: int) -> bool: ...
    def move(self, from_slot: int, to_slot: int) -> None: ...
    def swap(self, slot_a: int, slot_b: int) -> None: ...
    def is_active(self, slot: int) -> bool: ...
    def step(self, tokens: TokenIds) -> npt.NDArray[np.int32]:
        """``tokens[i]``: newest token of slot i (negative or empty slot: skipped). Returns the
        slots that calibrate at this step. All ids are checked before anything changes."""
    @property
    def last_calibrations(self) -> list[tuple[int, Calibration]]: ...
    def hits(self, slot: int) -> list[Hit]: ...
    def calibrations(self, slot: int) -> list[Calibration]: ...
    def state(self, slot: int) -> Optional[tuple[int, int, int]]:
        """(tokens_seen, calibrations_made, tokens_since_last), or None for an empty slot."""

# --- end triggers ---

# --- pvc (src/python/pvc.rs) ---

class PVCSchedule:
    """When hits become calibrations: ``warmup`` tokens before the first, ``min_gap`` tokens
    between two, at most ``max_calibrations``, and every ``period`` tokens without a trigger.
    The default calibrates at every hit. ValueError for negative values or period 0."""

    def __init__(
        self,
        warmup: int = 0,
        min_gap: int = 0,
        max_calibrations: Optional[int] = None,
        period: Optional[int] = None,
    ) -> None: ...
    @property
    def warmup(self) -> int: ...
    @property
    def min_gap(self) -> int: ...
    @property
    def max_calibrations(self) -> Optional[int]: ...
    @property
    def period(self) -> Optional[int]: ...

class Calibration:
    """A calibration at generated token ``token_index``: ``reason`` "trigger" (with ``hit``) or
    "period"."""

    token_index: int
    reason: Literal["trigger", "period"]
    hit: Optional[Hit]
    @property
    def phrase(self) -> Optional[str]: ...

# --- end pvc ---

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

def pool_visual_tokens(x: object, grid_thw: object, factor: int | tuple[int, int]) -> tuple[Buffer, Buffer]: ...
def visual_token_scores(query: object, keys: object, lse: object | None = None, scale: float | None = None) -> Buffer: ...
def select_tokens(
    scores: object,
    keep: int | None = None,
    ratio: float | None = None,
    mass: float | None = None,
    min_keep: int = 1,
    max_keep: int | None = None,
) -> Buffer: ...
def prune_visual_tokens(
    x: object,
    indices: object | None = None,
    *,
    scores: object | None = None,
    keep: int | None = None,
    ratio: float | None = None,
    mass: float | None = None,
    min_keep: int = 1,
    max_keep: int | None = None,
    grid_thw: object | None = None,
    merge: bool = False,
) -> tuple[Buffer, Buffer, Buffer | None]: ...

# --- end compress ---

# --- tensor (src/python/tensor.rs) ---

class Buffer:
    """A Rust-owned result exported through DLPack: ``np.from_dlpack(b)`` / ``torch.from_dlpack(b)``
    share its memory (no copy). bfloat16 buffers can only become torch tensors."""

    @property
    def shape(self) -> tuple[int, ...]: ...
    @property
    def dtype(self) -> str: ...
    def __dlpack__(
        self,
        *,
        stream: object | None = None,
        max_version: tuple[int, int] | None = None,
        dl_device: tuple[int, int] | None = None,
        copy: bool | None = None,
    ) -> object: ...
    def __dlpack_device__(self) -> tuple[int, int]: ...

def _tensor_info(x: object, name: str = "x") -> dict[str, object]: ...
def _tensor_copy(x: object) -> Buffer: ...

# --- end tensor ---

# --- kv (src/python/kv.rs) ---

from collections.abc import Sequence

def rerotate_keys(
    keys: object,
    delta: object,
    *,
    rope_theta: float,
    head_dim: int,
    rotary_dim: int | None = None,
    interleaved: bool = False,
    mrope_section: Sequence[int] | None = None,
) -> None: ...
def relocate_span(
    keys: object,
    values: object,
    start: int,
    end: int,
    *,
    rope_theta: float,
    head_dim: int,
    delta: object | None = None,
    old_positions: object | None = None,
    new_positions: object | None = None,
    length: int | None = None,
    rotary_dim: int | None = None,
    interleaved: bool = False,
    mrope_section: Sequence[int] | None = None,
) -> int: ...
def append_entries(
    keys: object,
    values: object,
    new_keys: object,
    new_values: object,
    positions: object,
    *,
    delta: object | None = None,
    rope_theta: float | None = None,
    head_dim: int | None = None,
    rotary_dim: int | None = None,
    interleaved: bool = False,
    mrope_section: Sequence[int] | None = None,
) -> None: ...
def paged_reinject(
    kv_caches: object,
    src_slots: object,
    dst_slots: object,
    delta: object,
    *,
    rope_theta: float,
    head_dim: int,
    layout: str = "vllm",
    rotary_dim: int | None = None,
    interleaved: bool = False,
    mrope_section: Sequence[int] | None = None,
) -> int: ...

# --- end kv ---

# --- cuda (src/python/cuda.rs, src/python/cuda_compress.rs; src/cuda) ---
#
# The compress and kv functions above dispatch on their main tensor's device: for a torch CUDA
# tensor they run the kernels of kernels/*.cu on torch.cuda.current_stream() of that device and
# return torch CUDA tensors (allocated with torch.empty) where the CPU path returns Buffers.

def _cuda_set_search_dirs(dirs: list[str | PathLike[str]]) -> None:
    """Directories to look for libnvrtc.so* in after $TVC_NVRTC (tvc_rs.cuda passes sys.path's nvidia/*/lib)."""

def _cuda_info() -> dict[str, object]:
    """driver_version, driver_error, device_count, devices, nvrtc_path, nvrtc_version, nvrtc_archs,
    nvrtc_error, cache_dir, kernel_files. Loads the driver and NVRTC if present."""

def _cuda_compile(file: str, arch: int, ptx: bool = False) -> tuple[bytes, str, bytes | None]:
    """NVRTC compile of "compress.cu" / "kv.cu" for sm_<arch>: (CUBIN, log with ptxas -v, PTX for
    compute_<arch> if asked). RuntimeError on a compile error or without NVRTC; no GPU needed."""

def _cuda_parse_ptxas(log: str) -> list[dict[str, object]]:
    """Per kernel: kernel, registers, shared_bytes, stack_bytes, spill_store_bytes, spill_load_bytes."""

def _cuda_cache_path(file: str, arch: int) -> str | None:
    """Where the CUBIN of file for sm_<arch> is cached (key: source, options, NVRTC version)."""

def _cuda_cached_cubin(file: str, arch: int) -> tuple[bytes, bool]:
    """The CUBIN from the disk cache, compiled and stored first if absent; True if it was cached."""

def _cuda_warmup(device: int) -> None:
    """Compile (or load from the cache) and load every kernel file on cuda:<device>."""

# --- end cuda ---
