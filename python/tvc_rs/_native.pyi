"""Type stubs of the native module ``tvc_rs._native`` (Rust, PyO3). One section per capability.

Errors (every function): ``TypeError`` for the wrong kind of object (a float or a bool where an
int is expected, a list where a tensor is), ``ValueError`` for a wrong value (out of range, an int
too large for its type, a shape, layers that share memory), ``IndexError`` for an index or id out
of range, ``MemoryError`` when a result or copy sized by an argument cannot be allocated (e.g. a
zero-stride view of 2**40 elements); CUDA failures are ``RuntimeError``. Every message names
the argument it is about (``head_dim: expected an int, got float``)."""

from __future__ import annotations

__version__: str

# --- triggers (src/python/triggers.rs) ---

from os import PathLike
from typing import Any, Literal, NamedTuple, Optional, Self, Sequence, Union, final

import numpy as np
import numpy.typing as npt

_TokenIds = Union[Sequence[int], npt.NDArray[np.integer], Any]  # list, NumPy array or CPU tensor, 1-D

DEFAULT_PHRASES: list[str]

@final
class Hit:
    """A phrase matched the decoded text at characters ``char_start:char_end`` (``str`` offsets);
    ``token_index`` is the token whose bytes confirmed the match's end (None for plain text)."""

    token_index: Optional[int]
    phrase: str
    phrase_index: int
    char_start: int
    char_end: int

@final
class TextScan:
    """What a schedule makes of one text (``ReflectionDetector.scan``)."""

    tokens: int
    hits: list[Hit]
    calibrations: list[Calibration]
    error: Optional[str]

@final
class ReflectionDetector:
    """Finds reflection phrases where ``(?<!\\w)phrase(?!\\w)`` (case-insensitive) matches the
    text that tokens decode to.

    tokenizer: path to tokenizer.json or a model folder holding one, a ``tokenizers.Tokenizer``,
    or a transformers fast tokenizer. phrases: default ``DEFAULT_PHRASES``.
    Raises OSError (no such file), ValueError (bad tokenizer.json, empty or repeated phrase),
    TypeError (anything else as tokenizer)."""

    def __new__(cls, tokenizer: Union[str, PathLike[str], Any], phrases: Optional[Sequence[str]] = None) -> Self: ...
    @property
    def phrases(self) -> list[str]: ...
    @property
    def vocab_size(self) -> int: ...
    def find_text(self, text: str) -> list[Hit]: ...
    def find_tokens(self, tokens: _TokenIds) -> list[Hit]:
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
    def batch(self, capacity: int, *, out_of_vocab: Literal["raise", "no_text"] = "raise") -> StreamBatch:
        """``capacity`` slots. ``out_of_vocab``: a token id outside the vocabulary raises
        IndexError ("raise") or counts as a generated token that decodes to no text
        ("no_text": for models whose logits are wider than their tokenizer)."""
    def scan(self, texts: Sequence[str], schedule: Optional[PVCSchedule] = None) -> list[TextScan]:
        """Tokenize each text and watch it as if generated (in parallel)."""

@final
class ReflectionStream:
    """One generation watched token by token, with its own schedule state."""

    def push(self, token_id: int) -> Optional[Calibration]:
        """Feed the next token; the calibration decided at it, or None. IndexError for a bad id
        (nothing changes)."""
    def push_many(self, tokens: _TokenIds) -> list[Calibration]: ...
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

@final
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
    @property
    def out_of_vocab(self) -> Literal["raise", "no_text"]: ...
    def feed(self, slot: int, tokens: _TokenIds) -> list[Calibration]:
        """Several tokens, in order, for the stream in ``slot``; the calibrations they make. Ids
        are checked first; ValueError for an empty slot, IndexError for a bad id."""
    def is_active(self, slot: int) -> bool: ...
    def step(self, tokens: _TokenIds) -> npt.NDArray[np.int32]:
        """``tokens[i]``: newest token of slot i (negative or empty slot: skipped). Returns the
        slots that calibrate at this step. All ids are checked before anything changes."""
    def advance(self, slots: _TokenIds, token_index: _TokenIds, tokens: _TokenIds, sampling: Any) -> npt.NDArray[np.int32]:
        """An engine step whose rows name their stream: row i is slot ``slots[i]`` and
        ``tokens[i]`` is token number ``token_index[i]`` of that stream (fed if it is the next
        one); returns the rows with ``sampling[i]`` whose stream has a calibration due (returned
        again until a token follows). Everything is checked before anything changes."""
    def advance_seq(self, slots: _TokenIds, seq_lens: _TokenIds, tokens: _TokenIds, prompt_len: _TokenIds, prefill_len: _TokenIds) -> npt.NDArray[np.int32]:
        """``advance`` for rows described by sequence length (vLLM's V2 runner): row i's input
        token is token number ``seq_lens[i] - 1 - prompt_len[slots[i]]`` of its stream, and the
        row samples when ``seq_lens[i] >= prefill_len[slots[i]]``."""
    def advance_lists(self, outputs: list[Optional[list[int]]], rows: int) -> tuple[npt.NDArray[np.int32], list[int]]:
        """An engine step that keeps each stream's tokens in a list (``outputs[slot]``): feeds
        what the lists gained; returns (slots below ``rows`` with a calibration due, slots whose
        new tokens could not be read: negative placeholders or a list that shrank)."""
    @property
    def last_calibrations(self) -> list[tuple[int, Calibration]]: ...
    def hits(self, slot: int) -> list[Hit]: ...
    def calibrations(self, slot: int) -> list[Calibration]: ...
    def state(self, slot: int) -> Optional[tuple[int, int, int]]:
        """(tokens_seen, calibrations_made, tokens_since_last), or None for an empty slot."""

# --- end triggers ---

# --- pvc (src/python/pvc.rs) ---

@final
class PVCSchedule:
    """When hits become calibrations: ``warmup`` tokens before the first, ``min_gap`` tokens
    between two, at most ``max_calibrations``, and every ``period`` tokens without a trigger.
    The default calibrates at every hit. ValueError for negative values or period 0."""

    def __new__(cls,
        warmup: int = 0,
        min_gap: int = 0,
        max_calibrations: Optional[int] = None,
        period: Optional[int] = None,
    ) -> Self: ...
    @property
    def warmup(self) -> int: ...
    @property
    def min_gap(self) -> int: ...
    @property
    def max_calibrations(self) -> Optional[int]: ...
    @property
    def period(self) -> Optional[int]: ...

@final
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
    spatial_merge_size: int | None = None,
    image_token_id: int | None = None,
    video_token_id: int | None = None,
    tokens_per_second: int | float | None = None,
    video_start_token_id: int | None = None,
    video_end_token_id: int | None = None,
) -> tuple[_NDArray[_np.int32] | _NDArray[_np.int64], _NDArray[_np.int64]]:
    """NumPy arrays in (``input_ids`` int32/int64 ``(batch, seq)``, C-contiguous), NumPy out:
    ``position_ids`` ``(3, batch, seq)`` in ``input_ids``' dtype and ``rope_deltas`` ``(batch, 1)`` int64.
    ``second_per_grid_ts`` is passed as given (tensor, array or list): its dtype decides the arithmetic.
    Settings left None take the defaults of ``model_type``'s transformers config class."""

def smart_resize(
    height: int,
    width: int,
    *,
    factor: int = 28,
    min_pixels: int = 3136,
    max_pixels: int = 1003520,
    rule: str = "qwen2_vl",
    temporal_patch_size: int = 2,
) -> tuple[int, int]: ...
def image_grid_thw(
    height: int,
    width: int,
    *,
    patch_size: int = 14,
    merge_size: int = 2,
    min_pixels: int = 3136,
    max_pixels: int = 1003520,
    rule: str = "qwen2_vl",
    temporal_patch_size: int = 2,
) -> tuple[int, int, int]: ...
def image_token_count(
    height: int,
    width: int,
    *,
    patch_size: int = 14,
    merge_size: int = 2,
    min_pixels: int = 3136,
    max_pixels: int = 1003520,
    rule: str = "qwen2_vl",
    temporal_patch_size: int = 2,
) -> int: ...

# --- end rope ---

# --- compress (src/python/compress.rs) ---

class Pooled(NamedTuple):
    """Result of :func:`pool_visual_tokens`."""

    tokens: Any
    grid_thw: Any  # host data (a CPU tensor for CUDA input)

class Pruned(NamedTuple):
    """Result of :func:`prune_visual_tokens`."""

    tokens: Any
    indices: Any
    positions: Any | None  # on the input's device

# Results are of the kind of the main argument (torch tensors for torch input, NumPy otherwise).
def pool_visual_tokens(x: object, grid_thw: object, factor: int | tuple[int, int] = 4) -> Pooled: ...
def visual_token_scores(query: object, keys: object, *, lse: object | None = None, scale: float | None = None) -> Any: ...
def select_tokens(
    scores: object,
    keep: int | None = None,
    ratio: float | None = None,
    mass: float | None = None,
    min_keep: int = 1,
    max_keep: int | None = None,
) -> Any: ...
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
) -> Pruned: ...

# --- end compress ---

# --- tensor (src/python/tensor.rs) ---

@final
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
    mrope_interleaved: bool = False,
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
    mrope_interleaved: bool = False,
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
    mrope_interleaved: bool = False,
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
    mrope_interleaved: bool = False,
) -> int: ...

def relocate_spans(
    keys: object,
    values: object,
    spans: object,
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
    mrope_interleaved: bool = False,
) -> int: ...

# --- end kv ---

# --- dvr (src/python/dvr.rs) ---

IGNORE_INDEX: int  # -100
QWEN2_VL_SYSTEM: str  # "You are a helpful assistant."

@final
class DVRPolicy:
    """Where re-affirmed images go: after the sentence of a reflection phrase, at most
    ``max_insertions`` per answer (None: no limit), ``min_gap`` answer tokens apart, none in the
    first ``skip_first`` answer tokens; ``bridge`` goes right before each image; the copy is the
    image with each side divided by ``downscale`` (rounded up). ValueError for negative values,
    ``downscale`` < 1, an empty placeholder, a bridge holding the placeholder."""

    def __new__(cls,
        max_insertions: Optional[int] = 4,
        min_gap: int = 200,
        skip_first: int = 50,
        bridge: Optional[str] = None,
        downscale: int = 4,
        placeholder: str = "<image>",
    ) -> Self: ...
    @property
    def max_insertions(self) -> Optional[int]: ...
    @property
    def min_gap(self) -> int: ...
    @property
    def skip_first(self) -> int: ...
    @property
    def bridge(self) -> Optional[str]: ...
    @property
    def downscale(self) -> int: ...
    @property
    def placeholder(self) -> str: ...
    def insertion_text(self, images: int = 1) -> str:
        """The bridge, then ``images`` placeholders."""

@final
class Insertion:
    """The re-affirmed image goes before character ``char_index`` (a ``str`` index) of the
    answer, after ``token_index`` answer tokens; ``hit`` is the reflection phrase whose sentence
    ends there."""

    char_index: int
    token_index: int
    hit: Hit
    @property
    def phrase(self) -> str: ...

@final
class DVRPlan:
    """``DVRBuilder.plan_many``'s result for one answer: ``insertions`` and ``answer_text`` (with
    bridge and placeholders), or ``error``."""

    insertions: list[Insertion]
    answer_text: Optional[str]
    error: Optional[str]

@final
class DVRImage:
    """One image of a sample: which question image it shows, whether it is a re-affirmed copy,
    the size handed to the processor, its ``grid_thw``."""

    source: int
    inserted: bool
    height: int
    width: int
    grid_thw: tuple[int, int, int]

@final
class DVRSample:
    """A DVR training sample. ``input_ids``, ``labels``: int64 ``(n,)`` (labels ``IGNORE_INDEX``
    on the prompt and every vision token of the answer); ``position_ids``: int64 ``(3, n)`` as
    ``get_rope_index``; ``image_grid_thw``: int64 ``(images, 3)``, images in sequence order."""

    answer_text: str
    insertions: list[Insertion]
    kept_images: int
    planned_images: int
    input_ids: npt.NDArray[np.int64]
    labels: npt.NDArray[np.int64]
    position_ids: npt.NDArray[np.int64]
    rope_delta: int
    images: list[DVRImage]
    image_grid_thw: npt.NDArray[np.int64]
    prompt_tokens: int
    cut_tokens: int
    def __len__(self) -> int: ...

_ModelType = Literal["qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe", "glm4v", "glm4v_moe", "qwen3_5", "qwen3_5_moe"]

@final
class DVRBuilder:
    """Insertion points and whole DVR samples for a model family (``model_type``).

    tokenizer: a ``ReflectionDetector`` (its phrases are used), or a path to tokenizer.json / a
    model folder, a ``tokenizers.Tokenizer`` or a transformers fast tokenizer (with ``phrases``).
    Everything not given is the family's (``dvr_family``): the chat format of its LLaMA-Factory
    template (``system`` None: the template's default, "" for none), its vision tokens read by
    name from the tokenizer, the released processor's image settings, its position rule;
    ``eos_token``: the token an ``efficient_eos`` template (GLM) ends the turn with."""

    def __new__(cls,
        tokenizer: Union[str, PathLike[str], Any],
        *,
        phrases: Optional[Sequence[str]] = None,
        policy: Optional[DVRPolicy] = None,
        system: Optional[str] = None,
        model_type: _ModelType = "qwen2_vl",
        patch_size: Optional[int] = None,
        merge_size: Optional[int] = None,
        min_pixels: Optional[int] = None,
        max_pixels: Optional[int] = None,
        eos_token: Optional[str] = None,
    ) -> Self: ...
    @property
    def model_type(self) -> str: ...
    @property
    def llamafactory_template(self) -> str:
        """The LLaMA-Factory template whose text the samples follow."""
    @property
    def image_settings(self) -> tuple[int, int, int, int]:
        """(patch_size, merge_size, min_pixels, max_pixels)."""
    @property
    def policy(self) -> DVRPolicy: ...
    @property
    def phrases(self) -> list[str]: ...
    @property
    def vision_token_ids(self) -> tuple[int, int, int, int]:
        """(vision_start, vision_end, image_pad, video_pad)."""
    def plan(self, answer: str) -> list[Insertion]: ...
    def plan_many(self, answers: Sequence[str], images: Optional[Sequence[int]] = None) -> list[DVRPlan]:
        """``plan`` of many answers in parallel (GIL released); errors per answer."""
    def insert(self, answer: str, insertions: list[Insertion], images: int = 1) -> str: ...
    def build(
        self,
        question: str,
        image_sizes: Sequence[tuple[int, int]],
        answer: str,
        *,
        cutoff: Optional[int] = None,
    ) -> DVRSample:
        """``image_sizes``: ``(height, width)`` of the question's images. With ``cutoff``: cut as
        LLaMA-Factory's ``infer_seqlen`` cuts, never through an image block (a cut inside a
        re-affirmed image, or inside the policy's bridge right before it, moves to its start):
        every re-affirmed image wholly before the cut is kept. ValueError for bad sizes,
        placeholder mismatches, a cutoff smaller than the prompt up to the end of an image."""
    def downscaled_size(self, height: int, width: int) -> tuple[int, int]: ...

def dvr_family(model_type: str) -> dict[str, Any]:
    """What DVR reads from a family: ``model_type``, ``llamafactory_template``, ``vision_tokens``
    (start, end, image pad, video pad names), ``patch_size``, ``merge_size``, ``min_pixels``,
    ``max_pixels``, ``eos_token`` (None unless the template is ``efficient_eos``). ValueError
    listing the supported model types for another."""

def dvr_downscaled_size(height: int, width: int, factor: int = 4) -> tuple[int, int]:
    """``(ceil(height / factor), ceil(width / factor))`` (Pillow's ``Image.reduce``)."""

def infer_seqlen(source_len: int, target_len: int, cutoff: int) -> tuple[int, int]:
    """LLaMA-Factory's ``infer_seqlen``."""

def vision_blocks(
    input_ids: _TokenIds,
    *,
    vision_start: int = 151652,
    vision_end: int = 151653,
    image_pad: int = 151655,
    video_pad: int = 151656,
) -> npt.NDArray[np.int64]:
    """int64 ``(blocks, 6)``: start, end (exclusive), pads_start, pads_end, video, complete."""

def answer_cut(
    input_ids: _TokenIds,
    keep: int,
    *,
    bridge: Optional[_TokenIds] = None,
    vision_start: int = 151652,
    vision_end: int = 151653,
    image_pad: int = 151655,
    video_pad: int = 151656,
) -> int:
    """Tokens of an answer kept under a cut after ``keep`` tokens: a cut inside an image block
    (or inside the ``bridge`` ids right before it) moves to its start."""

def qwen2_vl_patches(
    images: list[Any],  # uint8 NumPy arrays or torch CPU tensors (read through DLPack)
    mean: Sequence[float],
    std: Sequence[float],
    *,
    layout: Literal["chw", "hwc"] = "chw",
    patch_size: int = 14,
    merge_size: int = 2,
    temporal_patch_size: int = 2,
) -> npt.NDArray[np.float32]:
    """Qwen2-VL ``pixel_values`` of resized uint8 images (GIL released), bit for bit the
    processor's: float32 ``(sum of patch rows, C * temporal_patch_size * patch_size**2)``."""

# --- end dvr ---

# --- cuda (src/python/cuda.rs; src/cuda) ---
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
