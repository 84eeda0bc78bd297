"""Type stubs of the native module ``tvc_rs._native`` (Rust, PyO3). One section per capability."""

from __future__ import annotations

__version__: str

# --- triggers (src/python/triggers.rs) ---

# --- end triggers ---

# --- rope (src/python/rope.rs) ---

# --- end rope ---

# --- compress (src/python/compress.rs) ---

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
