"""Type stubs of the native module ``tvc_rs._native`` (Rust, PyO3). One section per capability."""

from __future__ import annotations

__version__: str

# --- triggers (src/python/triggers.rs) ---

# --- end triggers ---

# --- rope (src/python/rope.rs) ---

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

# --- end kv ---
