"""Periodic Visual Calibration (PVC) with Hugging Face transformers.

Model families (``SUPPORTED_MODEL_TYPES``; every rope and token setting is read from the model's
config): Qwen2-VL / QVQ / TVC (``qwen2_vl``), Qwen2.5-VL (``qwen2_5_vl``), Qwen3-VL
(``qwen3_vl``, ``qwen3_vl_moe``: DeepStack levels carried through every forward and compressed
with the image; interleaved M-RoPE), GLM-4.1V-Thinking (``glm4v``, ``glm4v_moe``: image block
``<|begin_of_image|> <|image|>... <|end_of_image|>``, partial rotary: adjacent pairs for GLM-4.1V,
half-split for GLM-4.5V) and
Qwen3.5 (``qwen3_5``: ``relocate`` and ``append`` only; its linear-attention layers keep a
recurrent state, not a cache that ``kv`` could move, and attention pruning is refused for the same
reason). Below, ``<|vision_start|>`` / ``<|image_pad|>`` / ``<|vision_end|>`` stand for the
family's own image block tokens.

Needs transformers 5 (``pip install 'tvc-rs[hf]'``); tested with transformers 5.24.0 and torch
2.11.0 (requirements/test.txt).

``generate(model, processor, images, question, config=PVCConfig(...), **generate_kwargs)`` runs
the model's own ``generate`` while tvc-rs' reflection detector watches the generated tokens. When
the schedule turns a hit into a calibration, generation pauses right after the token that
confirmed the hit, the image is given to the model again (compressed) after the bridge phrase, and
generation goes on. Three modes (``PVCConfig.mode``):

``relocate``
    The method as published: the sequence is rebuilt as ``prompt without its image blocks + text
    so far (earlier bridges kept, earlier re-injected images dropped) + bridge + compressed
    image``; the cache is thrown away and the rebuilt sequence is encoded again with the M-RoPE
    positions ``get_rope_index`` gives it (a full prefill).
``append``
    Everything stays; ``bridge + compressed image`` are prefilled on top of the cache at the
    positions that follow (``get_rope_index`` of the whole, longer sequence).
``kv``
    The cache entries of the image blocks (``<|vision_start|> ... <|vision_end|>``) are evicted
    and every later key is re-rotated in place (``tvc_rs.relocate_span``) to the position
    ``relocate`` gives it; then ``bridge + compressed image`` are prefilled on top. Keys and
    positions equal ``relocate``'s; values (and keys past layer 0) still carry what the tokens
    saw of the first image, so this approximates ``relocate`` at a fraction of its cost.

Layout of a calibration (all modes): ``... <token that confirmed the hit>`` + ``tokenizer(sep +
bridge)`` + per image ``<|vision_start|> <|image_pad|> * n <|vision_end|>``, where ``sep`` is one
space unless the bridge starts with whitespace or the text so far ends with it. Generation
continues right after ``<|vision_end|>``.

Compression: the question's images go through the model's vision tower once; their features
(``[tokens, hidden]``, on the merged ``(t, h/2, w/2)`` grid) are

- average-pooled ``k x k`` on their grid (``PVCConfig.pool``; ``tvc_rs.pool_visual_tokens``): an
  ``h x w`` grid becomes ``ceil(h/k) x ceil(w/k)``, placed with M-RoPE as an image of that grid;
- or pruned by attention (``PVCConfig.prune``): the query of the token that triggered the
  calibration (at the chosen layer, or every layer) scores the image's cached keys
  (``tvc_rs.visual_token_scores``), ``tvc_rs.select_tokens`` keeps a ratio / a count / an
  attention mass, and each kept token keeps the M-RoPE cell it had in the full grid (the block
  advances positions like the full image). After a ``relocate`` / ``kv`` calibration only the
  kept tokens remain in the cache, so the next calibration selects among those.

Positions of every layout come from ``tvc_rs.mrope_position_ids`` (equal to transformers'
``get_rope_index``). Between calibrations the model's own ``generate`` runs (sampling settings,
logits processors, stopping criteria and streamers pass through); ``max_new_tokens`` counts the
model's own tokens over all segments (bridges and images are not counted).

``visual_attention_curve`` measures visual forgetting: the share of attention that goes to image
tokens at each generated token, per layer, with or without PVC.

Tensors may live on any device; the Rust kernels run on CPU float32 / float16 / bfloat16 tensors,
and other dtypes or devices go through an exact PyTorch path (re-rotation) or a CPU float32 copy
(pooling, scoring: small tensors).
"""

from __future__ import annotations

import inspect
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Sequence, Union

import numpy as np

from tvc_rs.compress import pool_visual_tokens, prune_visual_tokens, select_tokens, visual_token_scores
from tvc_rs.kv import relocate_span, rerotate_keys
from tvc_rs.pvc import PVCConfig, PVCSchedule
from tvc_rs.rope import mrope_position_ids
from tvc_rs.triggers import ReflectionDetector

__all__ = [
    "generate",
    "PVCSession",
    "PVCResult",
    "CalibrationRecord",
    "visual_attention_curve",
    "AttentionCurve",
    "write_attention_csv",
    "ATTENTION_CSV_COLUMNS",
    "plot_attention_curves",
    "SUPPORTED_MODEL_TYPES",
]



@dataclass(frozen=True)
class _Family:
    """What a model family's code fixes (everything else is read from the model's config)."""

    name: str
    start_token: str  # config attribute of the token opening an image block
    end_token: str  # ... and closing it
    mrope_interleaved: bool  # frequency j -> axis by j % 3 (Qwen3-VL, Qwen3.5) rather than by sections
    adjacent_pairs: bool  # rotary pairs (2i, 2i+1) (GLM's rotate_half_llm) rather than (i, i + d/2)


_QWEN2 = dict(start_token="vision_start_token_id", end_token="vision_end_token_id", mrope_interleaved=False, adjacent_pairs=False)
_QWEN3 = dict(start_token="vision_start_token_id", end_token="vision_end_token_id", mrope_interleaved=True, adjacent_pairs=False)
_GLM = dict(start_token="image_start_token_id", end_token="image_end_token_id", mrope_interleaved=False, adjacent_pairs=True)
_FAMILIES = {
    "qwen2_vl": _Family("Qwen2-VL, QVQ", **_QWEN2),
    "qwen2_5_vl": _Family("Qwen2.5-VL", **_QWEN2),
    "qwen3_vl": _Family("Qwen3-VL", **_QWEN3),
    "qwen3_vl_moe": _Family("Qwen3-VL MoE", **_QWEN3),
    "glm4v": _Family("GLM-4.1V-Thinking", **_GLM),
    # GLM-4.5V's text model rotates half-split pairs (transformers' rotate_half), unlike GLM-4.1V.
    "glm4v_moe": _Family("GLM-4.5V", **{**_GLM, "adjacent_pairs": False}),
    "qwen3_5": _Family("Qwen3.5", **_QWEN3),
}
SUPPORTED_MODEL_TYPES = tuple(_FAMILIES)

# Arguments of transformers' generate that tvc_rs builds itself for every segment.
_OWN_ARGUMENTS = (
    "input_ids", "inputs", "attention_mask", "pixel_values", "pixel_values_videos", "image_grid_thw",
    "video_grid_thw", "mm_token_type_ids", "inputs_embeds", "cache", "past_key_values", "position_ids",
    "mm_encoder_outputs",
)
_NATIVE_DTYPES = ("float32", "float16", "bfloat16")


def _torch():
    import torch

    return torch


# ---------------------------------------------------------------- records


@dataclass
class CalibrationRecord:
    """One calibration as it happened."""

    index: int
    """0-based number of the calibration in this generation."""
    token_index: int
    """Generated token (0-based, counting only the model's own tokens) after which the image was
    given again: the token that confirmed the trigger (or the ``period``-th token)."""
    reason: str
    """``"trigger"`` or ``"period"``."""
    phrase: Optional[str]
    """The reflection phrase that triggered it (None for a period calibration)."""
    mode: str
    visual_tokens: int
    """Image tokens injected (all images together)."""
    grids: list
    """Per injected image, the merged ``(t, h, w)`` grid its tokens lie on (pooled grid, or the
    full grid of a pruned image)."""
    evicted_tokens: int
    """Sequence entries dropped (``relocate``, ``kv``: earlier image blocks with their
    vision start / end tokens; ``append``: 0)."""
    prefilled_tokens: int
    """Tokens run through the model at the calibration (``relocate``: the whole rebuilt sequence)."""
    seconds: float
    """Wall time of the calibration (compression, cache surgery, prefill)."""
    bridge_ids: list
    """Token ids of the bridge text as injected (``sep + bridge``)."""
    sequence_index: int = 0
    """Index in the sequence (as it was right after the calibration) of the first bridge token."""
    text_offset: int = 0
    """Character offset in ``PVCResult.text`` where the bridge text starts."""

    def as_dict(self) -> dict:
        return {
            "index": self.index, "token_index": self.token_index, "reason": self.reason, "phrase": self.phrase,
            "mode": self.mode, "visual_tokens": self.visual_tokens, "grids": [list(g) for g in self.grids],
            "evicted_tokens": self.evicted_tokens, "prefilled_tokens": self.prefilled_tokens,
            "seconds": self.seconds, "text_offset": self.text_offset,
        }


@dataclass
class PVCResult:
    """What ``generate`` returns."""

    text: str
    """The response as the model saw it: generated text with the bridge phrases of the
    calibrations in place (image tokens left out)."""
    token_ids: list
    """The model's own generated token ids (no bridges, no image tokens)."""
    calibrations: list
    """One ``CalibrationRecord`` per calibration."""
    sequence: Any
    """The final sequence ``[L]`` (LongTensor, the mode's layout; the last token is not in ``cache``)."""
    position_ids: Any
    """Its M-RoPE positions ``[3, L]``."""
    prompt_length: int
    """Tokens of the original prompt."""
    stop_reason: str
    """``"eos"``, ``"max_new_tokens"`` or ``"stopping_criteria"``."""
    seconds: float
    generated_text: str = ""
    """Only the model's own tokens, decoded."""
    scores: Optional[tuple] = None
    """Processed scores per generated token (with ``output_scores=True``)."""
    logits: Optional[tuple] = None
    """Raw logits per generated token (with ``output_logits=True``)."""
    cache: Any = None
    """The model's cache at the end (holds every token of ``sequence`` but the last)."""

    @property
    def tokens_per_second(self) -> float:
        return len(self.token_ids) / self.seconds if self.seconds > 0 else float("nan")

    def marked_text(self, mark: Optional[Callable[[CalibrationRecord], str]] = None) -> str:
        """``text`` with a marker inserted before each calibration's bridge phrase."""
        if mark is None:
            mark = lambda c: (  # noqa: E731
                f"[[PVC #{c.index + 1}: {c.phrase or c.reason!r} at token {c.token_index}, {c.mode}, "
                f"{c.visual_tokens} image tokens, {c.seconds * 1000:.1f} ms]]"
            )
        out, last = [], 0
        for c in self.calibrations:
            out.append(self.text[last:c.text_offset])
            out.append(mark(c))
            last = c.text_offset
        out.append(self.text[last:])
        return "".join(out)

    def as_dict(self) -> dict:
        return {
            "text": self.text, "generated_text": self.generated_text, "token_ids": list(self.token_ids),
            "calibrations": [c.as_dict() for c in self.calibrations], "prompt_length": self.prompt_length,
            "stop_reason": self.stop_reason, "seconds": self.seconds,
            "generated_tokens": len(self.token_ids), "tokens_per_second": self.tokens_per_second,
        }


# ---------------------------------------------------------------- model and inputs


def _check_model(model: Any) -> _Family:
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    inner = getattr(model, "model", None)
    if (
        model_type not in _FAMILIES
        or not hasattr(model, "generate")
        or getattr(inner, "language_model", None) is None
        or getattr(inner, "visual", None) is None
    ):
        kinds = "; ".join(f"{t} ({f.name})" for t, f in _FAMILIES.items())
        raise TypeError(
            "model must be a vision-language model with a language-model head (transformers "
            f"*ForConditionalGeneration) of a supported model_type: {kinds}; "
            f"got {type(model).__name__} (model_type {model_type!r})"
        )
    return _FAMILIES[model_type]


def _load_image(image: Any, index: int):
    from PIL import Image

    if isinstance(image, (str, os.PathLike)):
        path = Path(image)
        if not path.is_file():
            raise FileNotFoundError(f"images[{index}]: no such file {str(path)!r}")
        try:
            with Image.open(path) as opened:
                return opened.convert("RGB")
        except Exception as err:  # PIL raises several types for unreadable files
            raise ValueError(f"images[{index}]: cannot read {str(path)!r} as an image: {err}") from None
    if isinstance(image, Image.Image):
        return image
    if isinstance(image, np.ndarray) or type(image).__name__ == "Tensor":
        return image  # the processor checks arrays and tensors itself
    raise TypeError(f"images[{index}] must be a PIL image, a path, a NumPy array or a tensor, got {type(image).__name__}")


def _messages_and_images(images: Any, question: Optional[str], messages: Optional[list]) -> tuple:
    """(chat messages with image placeholders, list of loaded images)."""
    if images is None:
        given = []
    elif isinstance(images, (list, tuple)):
        given = list(images)
    else:
        given = [images]
    if messages is None:
        if not isinstance(question, str) or not question.strip():
            raise ValueError("question must be a non-empty str (or give messages=)")
        if not given:
            raise ValueError("images: PVC needs at least one image (got none); pass images=<PIL image or path>")
        loaded = [_load_image(img, i) for i, img in enumerate(given)]
        content = [{"type": "image"} for _ in loaded] + [{"type": "text", "text": question}]
        return [{"role": "user", "content": content}], loaded
    if question is not None:
        raise ValueError("give either question or messages, not both")
    if not isinstance(messages, (list, tuple)) or not messages:
        raise ValueError("messages must be a non-empty list of chat messages")
    loaded, pending = [], list(given)
    out = []
    for m, message in enumerate(messages):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise ValueError(f"messages[{m}] must be a dict with 'role' and 'content'")
        content = message["content"]
        if isinstance(content, str):
            out.append(dict(message))
            continue
        items = []
        for item in content:
            if isinstance(item, dict) and (item.get("type") == "image" or "image" in item):
                payload = item.get("image", item.get("path", item.get("url")))
                if payload is None:
                    if not pending:
                        raise ValueError(f"images: messages hold more image placeholders than the {len(given)} image(s) given")
                    payload = pending.pop(0)
                loaded.append(_load_image(payload, len(loaded)))
                items.append({"type": "image"})
            else:
                items.append(item)
        out.append({**message, "content": items})
    if pending:
        raise ValueError(f"images: {len(pending)} image(s) given beyond the image placeholders of messages")
    if not loaded:
        raise ValueError("images: PVC needs at least one image (the messages hold none)")
    return out, loaded


def _prepare_inputs(processor: Any, images: Any, question: Optional[str], messages: Optional[list]) -> dict:
    chat, loaded = _messages_and_images(images, question, messages)
    if not hasattr(processor, "apply_chat_template") or getattr(processor, "image_processor", None) is None:
        raise TypeError(f"processor must be a Qwen2-VL-family processor (AutoProcessor), got {type(processor).__name__}")
    text = processor.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    try:
        inputs = processor(images=loaded, text=[text], return_tensors="pt")
    except Exception as err:  # the processor's own check (size, aspect ratio, channels, ...)
        raise ValueError(f"images: the processor rejected the image(s): {type(err).__name__}: {err}") from None
    if inputs.get("pixel_values") is None or inputs.get("image_grid_thw") is None:
        raise ValueError("images: the processor returned no pixel values for the image(s)")
    return dict(inputs)


# ---------------------------------------------------------------- layout


@dataclass
class _Image:
    """An image block ``<|vision_start|> pads <|vision_end|>`` of the sequence."""

    source: int  # which question image
    grid: tuple  # merged (t, h, w) grid of the (full or pooled) image
    features: Any  # [tokens, hidden] in the model's dtype, on its device
    kept: Any = None  # LongTensor of kept cells (row-major in grid) for a pruned image, else None
    injected: bool = False  # False for the prompt's own images

    @property
    def tokens(self) -> int:
        return int(self.features.shape[0])


@dataclass
class _Text:
    ids: list


@dataclass
class _Layout:
    ids: Any  # LongTensor [L] (CPU)
    positions: Any  # LongTensor [3, L] (CPU)
    spans: list  # (start, end, _Image): sequence indices of the whole block incl. start/end tokens
    image_mask: Any  # BoolTensor [L]: image pad tokens
    injected_mask: Any  # BoolTensor [L]: pads of re-injected images


class _Rope:
    """The text model's M-RoPE settings, for re-rotation: ``tvc_rs.kv.rope_settings`` of the
    model's config (the kernels' own reading: the config's values, the pair layout and frequency
    map the family's code fixes), checked; an option the config contradicts raises."""

    def __init__(self, model_config: Any, family: _Family):
        from tvc_rs.kv import rope_settings

        text_config = model_config.get_text_config() if hasattr(model_config, "get_text_config") else model_config.text_config
        params = getattr(text_config, "rope_parameters", None) or {}
        rope_type = params.get("rope_type", "default")
        self.supported = rope_type == "default"
        self.rope_type = rope_type
        settings = rope_settings(model_config)
        self.theta = float(settings["rope_theta"])
        self.head_dim = int(settings["head_dim"])
        self.rotary_dim = int(settings["rotary_dim"])
        if not 0 < self.rotary_dim <= self.head_dim or self.rotary_dim % 2:
            raise ValueError(
                f"model config: partial_rotary_factor {params.get('partial_rotary_factor')} gives {self.rotary_dim} "
                f"rotated dims of head_dim {self.head_dim} (must be even and in 2 ..= head_dim)"
            )
        self.section = [int(v) for v in settings["mrope_section"]]
        if sum(self.section) != self.rotary_dim // 2:
            raise ValueError(
                f"model config: mrope_section {self.section} sums to {sum(self.section)}, the rotary has "
                f"{self.rotary_dim // 2} frequencies (head_dim {self.head_dim}, rotary_dim {self.rotary_dim})"
            )
        self.mrope_interleaved = bool(settings["mrope_interleaved"])
        self.adjacent_pairs = bool(settings["interleaved"])
        if (self.mrope_interleaved, self.adjacent_pairs) != (family.mrope_interleaved, family.adjacent_pairs):
            raise RuntimeError(f"internal: tvc_rs.kv.rope_settings and tvc_rs.hf disagree on {family.name}'s rope")
        stated = params.get("mrope_interleaved", getattr(text_config, "mrope_interleaved", None))
        if stated is not None and bool(stated) != family.mrope_interleaved:
            raise ValueError(
                f"model config: mrope_interleaved = {stated!r}, but {family.name}'s transformers code "
                f"{'always' if family.mrope_interleaved else 'never'} interleaves M-RoPE frequencies: not supported"
            )

    def kwargs(self) -> dict:
        out = {"rope_theta": self.theta, "head_dim": self.head_dim, "mrope_section": self.section}
        if self.rotary_dim != self.head_dim:
            out["rotary_dim"] = self.rotary_dim
        if self.adjacent_pairs:
            out["interleaved"] = True
        if self.mrope_interleaved:
            out["mrope_interleaved"] = True
        return out

    def components(self) -> Any:
        """``[rotary_dim / 2]``: the axis (0 t, 1 h, 2 w) each frequency turns with."""
        torch = _torch()
        n = self.rotary_dim // 2
        if self.mrope_interleaved:
            # transformers' apply_interleaved_mrope: j % 3 == 1 -> h if j < 3 s_h, == 2 -> w if j < 3 s_w.
            j = torch.arange(n)
            out = torch.zeros(n, dtype=torch.long)
            out[(j % 3 == 1) & (j < 3 * self.section[1])] = 1
            out[(j % 3 == 2) & (j < 3 * self.section[2])] = 2
            return out
        return torch.cat([torch.full((m,), i % 3, dtype=torch.long) for i, m in enumerate(self.section)])


def _rotate_torch(x: Any, delta: Any, rope: _Rope) -> Any:
    """``x`` ``[..., n, head_dim]`` rotated by the integer M-RoPE deltas ``[n, 3]`` (float64 angles)."""
    torch = _torch()
    rot = rope.rotary_dim
    inv_freq = 1.0 / (rope.theta ** (torch.arange(0, rot, 2, dtype=torch.float64, device=x.device) / rot))
    component = rope.components().to(x.device)
    angle = delta.to(x.device, torch.float64)[:, component] * inv_freq  # [n, rot / 2]
    cos, sin = angle.cos(), angle.sin()
    xd = x.to(torch.float64)
    out = xd.clone()
    if rope.adjacent_pairs:
        x1, x2 = xd[..., 0:rot:2], xd[..., 1:rot:2]
        out[..., 0:rot:2] = x1 * cos - x2 * sin
        out[..., 1:rot:2] = x2 * cos + x1 * sin
    else:
        half = rot // 2
        x1, x2 = xd[..., :half], xd[..., half:rot]
        out[..., :half] = x1 * cos - x2 * sin
        out[..., half:rot] = x2 * cos + x1 * sin
    return out.to(x.dtype)


def _native_ok(*tensors: Any) -> bool:
    return all(t.device.type == "cpu" and str(t.dtype).replace("torch.", "") in _NATIVE_DTYPES for t in tensors)


# ---------------------------------------------------------------- the session


class _CalibrationWatch:
    """Stopping criterion: feeds each new token to the reflection stream, stops at a calibration."""

    def __init__(self, stream: Any, vocab_size: int, boundary_id: int):
        self.stream = stream
        self.vocab_size = vocab_size
        self.boundary_id = boundary_id
        self.fired = None

    def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
        torch = _torch()
        token = int(input_ids[0, -1])
        if not 0 <= token < self.vocab_size:
            # Ids past the tokenizer (a model's padded vocabulary) have no text: a word boundary,
            # like the special tokens.
            token = self.boundary_id
        calibration = self.stream.push(token)
        if calibration is not None:
            self.fired = calibration
        return torch.full((input_ids.shape[0],), calibration is not None, dtype=torch.bool, device=input_ids.device)


class _Recorded:
    """A user stopping criterion, remembering whether it stopped the last step."""

    def __init__(self, inner: Any):
        self._inner = inner
        self.stopped = False

    def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
        done = self._inner(input_ids, scores, **kwargs)
        self.stopped = bool(done.any()) if hasattr(done, "any") else bool(done)
        return done

    def __getattr__(self, name: str) -> Any:  # e.g. eos_token_id, which generate looks for
        if name == "_inner":  # not set yet (copy, pickle)
            raise AttributeError(name)
        return getattr(self._inner, name)


class _SegmentStreamer:
    """Passes a user streamer what a single generate call would: the prompt once, then every new
    token (and the bridge text of each calibration), and ``end()`` once at the very end."""

    def __init__(self, user: Any):
        self.user = user
        self.first_segment = True
        self.skip_context = True

    def start_segment(self) -> None:
        self.skip_context = True

    def put(self, value: Any) -> None:
        if self.skip_context:
            self.skip_context = False
            if not self.first_segment:
                return  # the context of a continued segment was already streamed
            self.first_segment = False
        if self.user is not None:
            self.user.put(value)

    def put_bridge(self, ids: list) -> None:
        if self.user is not None and ids:
            self.user.put(_torch().tensor([ids]))

    def end(self) -> None:
        pass

    def finish(self) -> None:
        if self.user is not None:
            self.user.end()


_DETECTORS: dict = {}


def _detector(tokenizer: Any, phrases: Optional[Sequence[str]]) -> ReflectionDetector:
    """Building a detector decodes the whole vocabulary (about 2 s for Qwen's): keep a few."""
    key = (id(tokenizer), None if phrases is None else tuple(phrases))
    found = _DETECTORS.get(key)
    if found is not None and found[0] is tokenizer:
        return found[1]
    detector = ReflectionDetector(tokenizer, phrases=phrases)
    if len(_DETECTORS) >= 4:
        _DETECTORS.pop(next(iter(_DETECTORS)))
    _DETECTORS[key] = (tokenizer, detector)
    return detector


class PVCSession:
    """One PVC generation, step by step (``generate`` runs it; benchmarks and tests drive it).

    ``PVCSession(model, processor, images, question, config=...)`` checks everything, runs the
    vision tower once and prepares the prompt; ``prefill()`` encodes the prompt but its last token;
    ``run(**generate_kwargs)`` generates with calibrations; ``calibrate()`` injects the image now.
    State between steps: ``sequence`` ``[L]`` and ``positions`` ``[3, L]`` (CPU LongTensors), the
    model's ``cache`` holding all of ``sequence`` but its last token.
    """

    def __init__(
        self,
        model: Any,
        processor: Any,
        images: Any = None,
        question: Optional[str] = None,
        *,
        messages: Optional[list] = None,
        config: Optional[PVCConfig] = None,
    ):
        torch = _torch()
        self.family = _check_model(model)
        if config is None:
            config = PVCConfig()
        if not isinstance(config, PVCConfig):
            raise TypeError(f"config must be a tvc_rs.PVCConfig, got {type(config).__name__}")
        self.model = model
        self.processor = processor
        self.config = config
        self.tokenizer = getattr(processor, "tokenizer", None)
        if self.tokenizer is None:
            raise TypeError(f"processor must be a Qwen2-VL-family processor with a tokenizer, got {type(processor).__name__}")
        mc = model.config
        self.text_config = mc.get_text_config() if hasattr(mc, "get_text_config") else mc.text_config
        self.image_token_id = int(mc.image_token_id)
        self.vision_start_id = int(getattr(mc, self.family.start_token))
        self.vision_end_id = int(getattr(mc, self.family.end_token))
        self.merge = int(mc.vision_config.spatial_merge_size)
        self.rope = _Rope(mc, self.family)
        # DeepStack (Qwen3-VL): vision features of these tower layers are added to the hidden
        # states after the first decoder layers, at the image tokens.
        self.deepstack_levels = len(getattr(mc.vision_config, "deepstack_visual_indexes", None) or ())
        # Hybrid models (Qwen3.5): linear-attention layers keep a recurrent state, not a KV cache.
        layer_types = list(getattr(self.text_config, "layer_types", None) or [])
        self.recurrent_layers = [i for i, t in enumerate(layer_types) if t != "full_attention"]
        if self.recurrent_layers:
            if config.mode == "kv":
                raise ValueError(
                    f"config.mode = 'kv' is not possible for {self.family.name} (model_type {mc.model_type!r}): "
                    f"its layers {self.recurrent_layers} are {layer_types[self.recurrent_layers[0]]!r}, a recurrent "
                    "state over the whole sequence with no per-token cache entries to evict or move; use 'relocate' or 'append'"
                )
            if config.prune_spec is not None:
                raise ValueError(
                    f"config.prune: not supported for {self.family.name} (model_type {mc.model_type!r}): the probe of "
                    "the pending token cannot be taken back out of its linear-attention layers' recurrent state; use pool"
                )
        if self.deepstack_levels and config.prune_spec is not None and config.prune_spec.get("merge"):
            raise ValueError(
                f"config.prune['merge'] = True: not supported for {self.family.name}: its DeepStack levels would "
                "have to be merged with the main features' assignment; use merge=False or pool"
            )
        if config.mode == "kv" and not self.rope.supported:
            raise ValueError(f"config.mode = 'kv' needs default RoPE, the model uses rope_type {self.rope.rope_type!r}")
        layers = self.text_config.num_hidden_layers
        if self.prune is not None and self.prune.get("layer") is not None and not -layers <= self.prune["layer"] < layers:
            raise ValueError(f"prune['layer'] = {self.prune['layer']}: the model has {layers} layers")
        self.text_model = model.model.language_model
        self.embed = model.get_input_embeddings()
        self.device = self.embed.weight.device
        self.dtype = self.embed.weight.dtype
        forward_args = inspect.signature(model.forward).parameters
        self.cache_arg = "cache" if "cache" in forward_args else "past_key_values"

        inputs = _prepare_inputs(processor, images, question, messages)
        ids = inputs["input_ids"]
        if ids.shape[0] != 1:
            raise ValueError(f"one question at a time: the processor returned a batch of {ids.shape[0]}")
        grids = inputs["image_grid_thw"].cpu()
        k = config.pool
        if self.prune is None and k > 1:  # checked before the vision tower runs
            for i, (_, h, w) in enumerate(grids.tolist()):
                h, w = h // self.merge, w // self.merge
                if k > h or k > w:
                    raise ValueError(
                        f"pool = {k} is larger than the merged grid of images[{i}] ({h} x {w} tokens); "
                        f"use a factor <= {min(h, w)} or pool=1"
                    )
        with torch.no_grad():
            pixels = inputs["pixel_values"].to(self.device)
            out = model.model.get_image_features(pixels, grids.to(self.device))
            features = out.pooler_output if hasattr(out, "pooler_output") else out
            levels = getattr(out, "deepstack_features", None) if self.deepstack_levels else None
        features = [f.to(self.dtype) for f in features]
        if self.deepstack_levels and (levels is None or len(levels) != self.deepstack_levels):
            raise RuntimeError(
                f"internal: the vision tower returned {0 if levels is None else len(levels)} DeepStack levels, "
                f"its config names {self.deepstack_levels}"
            )
        self.images = []  # merged grid and features of each question image
        for i, (grid, feats) in enumerate(zip(grids.tolist(), features)):
            merged = (grid[0], grid[1] // self.merge, grid[2] // self.merge)
            if merged[0] * merged[1] * merged[2] != feats.shape[0]:
                raise ValueError(f"images[{i}]: {feats.shape[0]} features for a {merged} grid")
            if self.deepstack_levels:
                # DeepStack levels ride along on the hidden dimension: [tokens, (1 + levels) * hidden].
                # Pooling and pruning act per token and channel, so they treat every level alike.
                feats = torch.cat([feats] + [level[i].to(self.dtype) for level in levels], dim=-1)
            self.images.append((merged, feats))
        self.blocks = self._prompt_blocks(ids[0].tolist())
        self.prompt_length = int(ids.shape[1])
        self.layout = self._layout(self.blocks)
        self.detector = _detector(self.tokenizer, config.phrases)
        self.stream = self.detector.stream(config.schedule)
        self.cache = None
        self.generated: list = []
        self.transcript: list = []  # ("text" | "bridge", ids) in the order the model saw them
        self.records: list = []
        self._pooled: dict = {}  # pool factor -> pooled images (computed once)

    @property
    def prune(self) -> Optional[dict]:
        return self.config.prune_spec

    # ------------------------------------------------------------ layout helpers

    def _prompt_blocks(self, ids: list) -> list:
        blocks, text, i, image = [], [], 0, 0
        while i < len(ids):
            if ids[i] != self.image_token_id:
                text.append(ids[i])
                i += 1
                continue
            j = i
            while j < len(ids) and ids[j] == self.image_token_id:
                j += 1
            if not text or text[-1] != self.vision_start_id or j >= len(ids) or ids[j] != self.vision_end_id:
                raise ValueError("the prompt's image tokens are not wrapped in <|vision_start|> ... <|vision_end|>")
            if image >= len(self.images):
                raise ValueError("the prompt holds more image blocks than images")
            grid, feats = self.images[image]
            if j - i != feats.shape[0]:
                raise ValueError(f"image block {image} has {j - i} tokens, its features {feats.shape[0]}")
            text.pop()
            if text:
                blocks.append(_Text(text))
            blocks.append(_Image(image, grid, feats))
            text, i, image = [], j + 1, image + 1
        if text:
            blocks.append(_Text(text))
        return blocks

    def _layout(self, blocks: list) -> _Layout:
        """Token ids and M-RoPE positions of a block list (tvc-rs ``mrope_position_ids`` over the
        sequence with every pruned image at its full grid, then the pruned cells dropped)."""
        torch = _torch()
        virtual, keep, grids, spans_v = [], [], [], []
        for block in blocks:
            if isinstance(block, _Text):
                virtual.extend(block.ids)
                keep.append(np.ones(len(block.ids), dtype=bool))
                continue
            t, h, w = block.grid
            full = t * h * w
            start = len(virtual)
            virtual.append(self.vision_start_id)
            virtual.extend([self.image_token_id] * full)
            virtual.append(self.vision_end_id)
            mask = np.ones(full, dtype=bool)
            if block.kept is not None:
                mask[:] = False
                mask[np.asarray(block.kept.cpu())] = True
            keep.append(np.concatenate([[True], mask, [True]]))
            grids.append((t, h * self.merge, w * self.merge))
            spans_v.append((start, block))
        virtual_ids = np.asarray(virtual, dtype=np.int64)[None]
        grid_arr = np.asarray(grids, dtype=np.int64).reshape(-1, 3) if grids else None
        positions, _ = mrope_position_ids(
            virtual_ids, grid_arr, config=self.model.config, **self._position_settings()
        )
        keep_all = np.concatenate(keep) if keep else np.zeros(0, dtype=bool)
        ids = torch.from_numpy(virtual_ids[0][keep_all].copy())
        pos = torch.from_numpy(np.ascontiguousarray(positions[:, 0, keep_all]))
        # Block spans in the real (pruned) sequence.
        index_map = np.cumsum(keep_all) - 1
        spans, image_mask, injected = [], torch.zeros(len(ids), dtype=torch.bool), torch.zeros(len(ids), dtype=torch.bool)
        for start_v, block in spans_v:
            start = int(index_map[start_v])
            end = start + block.tokens + 2
            spans.append((start, end, block))
            image_mask[start + 1:end - 1] = True
            if block.injected:
                injected[start + 1:end - 1] = True
        return _Layout(ids, pos, spans, image_mask, injected)

    def _position_settings(self) -> dict:
        """Explicit settings for ``mrope_position_ids`` where it does not know the model type
        (``tvc_rs.rope.SUPPORTED_MODEL_TYPES``).
        Our layouts hold images only (no videos), which every supported family places by the
        Qwen2-VL rule: a run of image tokens starting at ``p`` gets ``(p, p + row, p + col)``
        and the next token ``p + max(h, w)``."""
        from tvc_rs import rope

        if self.model.config.model_type in getattr(rope, "SUPPORTED_MODEL_TYPES", ("qwen2_vl", "qwen2_5_vl")):
            return {}  # mrope_position_ids reads everything from the config
        return {"model_type": "qwen2_vl", "image_token_id": self.image_token_id, "spatial_merge_size": self.merge}

    @property
    def sequence(self) -> Any:
        return self.layout.ids

    @property
    def positions(self) -> Any:
        return self.layout.positions

    def _append_text(self, ids: list) -> None:
        """Extend the last text block (and the layout) by generated tokens: positions count on."""
        torch = _torch()
        if not ids:
            return
        if self.blocks and isinstance(self.blocks[-1], _Text):
            self.blocks[-1].ids.extend(ids)
        else:
            self.blocks.append(_Text(list(ids)))
        lay = self.layout
        last = int(lay.positions[:, -1].max()) if lay.positions.shape[1] else -1
        new_pos = torch.arange(last + 1, last + 1 + len(ids), dtype=lay.positions.dtype).expand(3, -1)
        lay.ids = torch.cat([lay.ids, torch.tensor(ids, dtype=lay.ids.dtype)])
        lay.positions = torch.cat([lay.positions, new_pos], dim=1)
        zeros = torch.zeros(len(ids), dtype=torch.bool)
        lay.image_mask = torch.cat([lay.image_mask, zeros])
        lay.injected_mask = torch.cat([lay.injected_mask, zeros])

    def _embeds(self, layout: _Layout, a: int, b: int) -> tuple:
        """(inputs_embeds ``[1, b - a, hidden]`` of layout positions ``a .. b``, DeepStack
        features of its image tokens ``[levels, image tokens, hidden]`` in order, or None)."""
        torch = _torch()
        emb = self.embed(layout.ids[a:b].to(self.device))
        hidden = emb.shape[-1]
        stacked = []
        for start, end, block in layout.spans:
            lo, hi = max(start + 1, a), min(end - 1, b)
            if lo < hi:
                feats = block.features[lo - start - 1:hi - start - 1]
                emb[lo - a:hi - a] = feats[:, :hidden].to(emb.dtype)
                stacked.append(feats[:, hidden:])
        if not self.deepstack_levels or not stacked:
            return emb[None], None
        levels = torch.cat(stacked).to(emb.dtype)
        return emb[None], levels.reshape(levels.shape[0], self.deepstack_levels, hidden).transpose(0, 1)

    def _forward(self, layout: _Layout, a: int, b: int) -> None:
        """Run layout tokens ``a .. b`` through the text model into the cache (no logits)."""
        torch = _torch()
        if b <= a:
            return
        if self.cache.get_seq_length() != a:
            raise RuntimeError(f"internal: cache holds {self.cache.get_seq_length()} tokens, expected {a}")
        embeds, deepstack = self._embeds(layout, a, b)
        extra = {}
        if deepstack is not None:
            # As Qwen3VLModel.forward drives its language model: the mask of the image tokens of
            # this chunk and, per level, their features in order.
            extra = {
                "visual_pos_masks": layout.image_mask[None, a:b].to(self.device),
                "deepstack_visual_embeds": list(deepstack),
            }
        with torch.no_grad():
            self.text_model(
                inputs_embeds=embeds,
                position_ids=layout.positions[:, None, a:b].to(self.device),
                **{self.cache_arg: self.cache},
                use_cache=True,
                **extra,
            )

    def _new_cache(self) -> Any:
        from transformers import DynamicCache

        return DynamicCache(config=self.model.config)

    def prefill(self) -> None:
        """Encode the prompt but its last token (``generate`` feeds that one)."""
        self.cache = self._new_cache()
        self._forward(self.layout, 0, len(self.layout.ids) - 1)

    def extend(self, ids: Sequence[int]) -> None:
        """Append text tokens as if generated (encoded into the cache; the last one stays
        pending). The reflection detector does not see them. For building long contexts in
        benchmarks and tests."""
        ids = [int(i) for i in ids]
        if not ids:
            return
        if self.cache is None:
            self.prefill()
        start = len(self.layout.ids) - 1
        self.generated.extend(ids)
        self.transcript.append(("text", list(ids)))
        self._append_text(ids)
        self._forward(self.layout, start, len(self.layout.ids) - 1)

    # ------------------------------------------------------------ compression

    def _pooled_images(self) -> list:
        k = self.config.pool
        if k not in self._pooled:
            out = []
            for i, (grid, feats) in enumerate(self.images):
                if k == 1:
                    out.append(_Image(i, grid, feats, injected=True))
                    continue
                x = feats if _native_ok(feats) else feats.detach().float().cpu()
                pooled = pool_visual_tokens(x.detach(), [grid], k)
                tokens = pooled.tokens.to(self.dtype).to(self.device)
                new_grid = tuple(int(v) for v in pooled.grid_thw[0])
                out.append(_Image(i, new_grid, tokens, injected=True))
            self._pooled[k] = out
        return self._pooled[k]

    def _probe_queries(self) -> dict:
        """Queries (after RoPE) of the pending token at the scoring layer(s): ``{layer: [heads, d]}``.
        The pending token is run once and its cache entry dropped again."""
        layers = self.text_model.layers
        chosen = self.prune.get("layer")
        wanted = range(len(layers)) if chosen is None else [chosen % len(layers)]
        captured: dict = {}
        handles = []
        for index in wanted:
            attn = layers[index].self_attn
            # Qwen3's queries are RMS-normed per head after the projection, before RoPE.
            proj = getattr(attn, "q_norm", None) or attn.q_proj

            def hook(module, args, output, index=index):
                captured[index] = output[0, -1].detach()

            handles.append(proj.register_forward_hook(hook))
        a = len(self.layout.ids) - 1
        try:
            self._forward(self.layout, a, a + 1)
        finally:
            for handle in handles:
                handle.remove()
        self.cache.crop(-1)
        position = self.layout.positions[:, a]  # [3]
        out = {}
        for index, q in captured.items():
            q = q.float().cpu().reshape(-1, self.rope.head_dim)[None].contiguous()  # [1, heads, d]
            rerotate_keys(q, position[None].clone(), **self.rope.kwargs())
            out[index] = q
        return out

    def _pruned_images(self) -> list:
        """Per question image, its newest copy in the cache pruned by the pending token's attention."""
        queries = self._probe_queries()
        spec = self.prune
        # Score the full image while it is in the cache (append mode), else its newest copy.
        latest: dict = {}
        for start, end, block in self.layout.spans:
            if block.source not in latest or latest[block.source][2].kept is not None:
                latest[block.source] = (start, end, block)
        out = []
        for source, (grid, _) in enumerate(self.images):
            start, end, block = latest[source]
            scores = None
            for index, q in queries.items():
                keys = self.cache.layers[index].keys[0, :, start + 1:end - 1]  # [kv_heads, n, d]
                k = keys.transpose(0, 1).float().cpu()
                s = visual_token_scores(q, k)
                scores = s if scores is None else scores + s
            present = block.tokens
            full = grid[0] * grid[1] * grid[2]
            select = {"min_keep": spec.get("min_keep", 1), "max_keep": spec.get("max_keep")}
            if "keep" in spec:
                select["keep"] = min(spec["keep"], present)
            elif "ratio" in spec:
                select["keep"] = min(max(1, int(math.floor(spec["ratio"] * full + 0.5))), present)
            else:
                select["mass"] = spec["mass"]
            if select["max_keep"] is not None and select["min_keep"] > select["max_keep"]:
                raise ValueError(f"prune: min_keep {select['min_keep']} > max_keep {select['max_keep']}")
            chosen = select_tokens(scores, **select)
            source_feats = block.features.detach()
            x = source_feats if _native_ok(source_feats) else source_feats.float().cpu()
            pruned = prune_visual_tokens(x, chosen, merge=bool(spec.get("merge", False)))
            cells = chosen if block.kept is None else block.kept.cpu()[chosen]
            out.append(
                _Image(source, grid, pruned.tokens.to(self.dtype).to(self.device), kept=cells.clone(), injected=True)
            )
        return out

    # ------------------------------------------------------------ calibration

    def _bridge_ids(self) -> list:
        bridge = self.config.bridge
        if not bridge:
            return []
        last_text = self.tokenizer.decode(self.layout.ids[-1:].tolist())
        sep = "" if bridge[:1].isspace() or last_text[-1:].isspace() else " "
        return self.tokenizer.encode(sep + bridge, add_special_tokens=False)

    def _evict_images(self) -> int:
        """kv mode: drop every image block from the cache, re-rotating what follows to the
        positions of the sequence without them. Returns the entries dropped."""
        cached = len(self.layout.ids) - 1
        dropped = 0
        blocks = list(self.blocks)
        layers = self.cache.layers
        while any(isinstance(b, _Image) for b in blocks):
            before = self._layout(blocks)
            first = next(i for i, b in enumerate(blocks) if isinstance(b, _Image))
            blocks = _merge_text(blocks[:first] + blocks[first + 1:])
            after = self._layout(blocks)
            start, end, _ = before.spans[0]
            length = cached - dropped
            n = end - start
            old = before.positions[:, end:length]
            new = after.positions[:, start:length - n]
            keys = [layer.keys for layer in layers]
            values = [layer.values for layer in layers]
            if _native_ok(*keys, *values):
                relocate_span(keys, values, start, end, old_positions=old.contiguous(), new_positions=new.contiguous(),
                              length=length, **self.rope.kwargs())
            else:
                delta = (new - old).T.contiguous()
                for k, v in zip(keys, values):
                    moved_k = _rotate_torch(k[:, :, end:length], delta, self.rope)
                    moved_v = v[:, :, end:length].clone()
                    k[:, :, start:length - n] = moved_k
                    v[:, :, start:length - n] = moved_v
            self.cache.crop(-n)
            dropped += n
        self.blocks = blocks
        return dropped

    def calibrate(self, calibration: Any = None) -> CalibrationRecord:
        """Give the image again now, after the last token of ``sequence`` (which must be the
        pending token: not yet in the cache). Returns the record."""
        torch = _torch()
        if self.cache is None:
            self.prefill()
        if self.layout.spans and self.layout.spans[-1][1] == len(self.layout.ids):
            raise RuntimeError("calibrate: no token since the last image block (generate or extend() first)")
        sync = torch.cuda.synchronize if self.device.type == "cuda" else (lambda: None)
        sync()
        t0 = time.perf_counter()
        mode = self.config.mode
        images = self._pooled_images() if self.prune is None else self._pruned_images()
        bridge = self._bridge_ids()
        before_len = len(self.layout.ids)
        evicted = 0
        if mode == "append":
            start = len(self.layout.ids) - 1
        elif mode == "relocate":
            evicted = sum(b.tokens + 2 for b in self.blocks if isinstance(b, _Image))
            self.blocks = _merge_text([b for b in self.blocks if isinstance(b, _Text)])
            self.cache = self._new_cache()
            start = 0
        else:  # kv
            evicted = self._evict_images()
            start = before_len - 1 - evicted
        self.blocks = _merge_text(self.blocks + [_Text(list(bridge))] + list(images))
        self.layout = self._layout(self.blocks)
        # The last <|vision_end|> is left out: it is the first input of the next generate segment.
        end = len(self.layout.ids) - 1
        self._forward(self.layout, start, end)
        sync()
        seconds = time.perf_counter() - t0
        bridge_at = len(self.layout.ids) - sum(img.tokens + 2 for img in images) - len(bridge)
        record = CalibrationRecord(
            index=len(self.records),
            token_index=int(calibration.token_index) if calibration is not None else len(self.generated) - 1,
            reason=getattr(calibration, "reason", "manual"),
            phrase=getattr(calibration, "phrase", None),
            mode=mode,
            visual_tokens=sum(img.tokens for img in images),
            grids=[tuple(img.grid) for img in images],
            evicted_tokens=evicted,
            prefilled_tokens=end - start,
            seconds=seconds,
            bridge_ids=list(bridge),
            sequence_index=bridge_at,
        )
        self.records.append(record)
        self.transcript.append(("bridge", list(bridge)))
        return record

    # ------------------------------------------------------------ generation

    def run(
        self,
        *,
        max_new_tokens: Optional[int] = None,
        logits_processor: Any = None,
        stopping_criteria: Any = None,
        streamer: Any = None,
        generation_config: Any = None,
        on_calibration: Optional[Callable[[CalibrationRecord], None]] = None,
        **kwargs: Any,
    ) -> PVCResult:
        """Generate with calibrations; arguments as transformers' ``generate`` (see ``generate``)."""
        torch = _torch()
        from transformers import StoppingCriteriaList

        own = sorted(k for k in kwargs if k in _OWN_ARGUMENTS)
        if own:
            raise ValueError(f"{', '.join(own)}: tvc_rs.hf.generate builds these from images and question itself")
        for name in ("num_beams", "num_return_sequences"):
            if kwargs.get(name, 1) not in (None, 1):
                raise ValueError(f"{name} = {kwargs[name]}: PVC generates one sequence (beam search is not supported)")
        for name in ("assistant_model", "prompt_lookup_num_tokens", "custom_generate"):
            if kwargs.get(name) is not None:
                raise ValueError(f"{name}: not supported with PVC")
        for name in ("output_attentions", "output_hidden_states"):
            if kwargs.pop(name, False):
                raise ValueError(f"{name}: not supported by tvc_rs.hf.generate (see visual_attention_curve)")
        if kwargs.get("use_cache") is False:
            raise ValueError("use_cache = False: PVC works on the model's cache")
        gen_config = generation_config if generation_config is not None else self.model.generation_config
        max_length = kwargs.pop("max_length", None)
        if max_new_tokens is None:
            if max_length is not None:
                max_new_tokens = max_length - self.prompt_length
            elif getattr(gen_config, "max_new_tokens", None) is not None:
                max_new_tokens = gen_config.max_new_tokens
            else:
                max_new_tokens = 20  # transformers' default
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens = {max_new_tokens!r}: must be an int >= 1")
        min_new_tokens = kwargs.pop("min_new_tokens", None)
        min_length = kwargs.pop("min_length", None)
        if min_new_tokens is None and min_length:
            min_new_tokens = max(0, min_length - self.prompt_length)
        want_scores = bool(kwargs.pop("output_scores", False))
        want_logits = bool(kwargs.pop("output_logits", False))
        kwargs.pop("return_dict_in_generate", None)

        user_criteria = [_Recorded(c) for c in (stopping_criteria or [])]
        if kwargs.get("stop_strings") is not None:
            from transformers import StopStringCriteria

            user_criteria.append(_Recorded(StopStringCriteria(self.tokenizer, kwargs.pop("stop_strings"))))
        if kwargs.get("max_time") is not None:
            from transformers import MaxTimeCriteria

            user_criteria.append(_Recorded(MaxTimeCriteria(kwargs.pop("max_time"))))
        eos = kwargs.get("eos_token_id", getattr(gen_config, "eos_token_id", None))
        eos_ids = set([eos] if isinstance(eos, int) else (eos or []))
        if kwargs.get("pad_token_id") is None and getattr(gen_config, "pad_token_id", None) is None:
            pad = self.tokenizer.pad_token_id
            kwargs["pad_token_id"] = pad if pad is not None else (min(eos_ids) if eos_ids else None)

        watch = _CalibrationWatch(self.stream, self.detector.vocab_size, self.image_token_id)
        streams = _SegmentStreamer(streamer)
        scores, logits = [], []
        t_start = time.perf_counter()
        if self.cache is None:
            self.prefill()
        stop_reason = "max_new_tokens"
        base = len(self.generated)  # the budget counts this call's tokens
        try:
            while True:
                remaining = max_new_tokens - (len(self.generated) - base)
                length = len(self.layout.ids)
                pending_position = int(self.layout.positions[0, -1])
                self.model.model.rope_deltas = torch.tensor([[pending_position - (length - 1)]], device=self.device)
                segment_kwargs = dict(kwargs)
                if min_new_tokens:
                    segment_kwargs["min_new_tokens"] = max(0, min_new_tokens - (len(self.generated) - base))
                watch.fired = None
                streams.start_segment()
                out = self.model.generate(
                    input_ids=self.layout.ids[None].to(self.device),
                    attention_mask=torch.ones((1, length), dtype=torch.long, device=self.device),
                    max_new_tokens=remaining,
                    logits_processor=logits_processor,
                    stopping_criteria=StoppingCriteriaList([*user_criteria, watch]),
                    streamer=streams if streamer is not None else None,
                    generation_config=generation_config,
                    return_dict_in_generate=True,
                    output_scores=want_scores,
                    output_logits=want_logits,
                    **{self.cache_arg: self.cache},
                    **segment_kwargs,
                )
                new = out.sequences[0, length:].tolist()
                if want_scores and out.scores is not None:
                    scores.extend(out.scores)
                if want_logits and out.logits is not None:
                    logits.extend(out.logits)
                self.generated.extend(new)
                self.transcript.append(("text", list(new)))
                self._append_text(new)
                if self.cache.get_seq_length() != len(self.layout.ids) - 1:
                    raise RuntimeError(
                        f"internal: cache holds {self.cache.get_seq_length()} tokens after a segment of "
                        f"{len(self.layout.ids)} (generate must leave exactly the last token out)"
                    )
                if new and new[-1] in eos_ids:
                    stop_reason = "eos"
                    break
                if any(c.stopped for c in user_criteria):
                    stop_reason = "stopping_criteria"
                    break
                if len(self.generated) - base >= max_new_tokens or not new:
                    stop_reason = "max_new_tokens"
                    break
                if watch.fired is None:
                    stop_reason = "stopping_criteria"
                    break
                record = self.calibrate(watch.fired)
                streams.put_bridge(record.bridge_ids)
                if on_calibration is not None:
                    on_calibration(record)
        finally:
            streams.finish()
        seconds = time.perf_counter() - t_start
        return self._result(stop_reason, seconds, tuple(scores) if want_scores else None,
                            tuple(logits) if want_logits else None)

    def _result(self, stop_reason: str, seconds: float, scores: Any, logits: Any) -> PVCResult:
        decode = lambda ids: self.tokenizer.decode(ids, skip_special_tokens=True)  # noqa: E731
        prefix: list = []
        records = iter(self.records)
        for kind, ids in self.transcript:
            if kind == "bridge":
                record = next(records)
                record.text_offset = len(decode(prefix))
            prefix.extend(ids)
        return PVCResult(
            text=decode(prefix),
            token_ids=list(self.generated),
            calibrations=list(self.records),
            sequence=self.layout.ids.clone(),
            position_ids=self.layout.positions.clone(),
            prompt_length=self.prompt_length,
            stop_reason=stop_reason,
            seconds=seconds,
            generated_text=decode(self.generated),
            scores=scores,
            logits=logits,
            cache=self.cache,
        )


def _merge_text(blocks: list) -> list:
    out: list = []
    for block in blocks:
        if isinstance(block, _Text):
            if not block.ids:
                continue
            if out and isinstance(out[-1], _Text):
                out[-1] = _Text(out[-1].ids + list(block.ids))
                continue
            out.append(_Text(list(block.ids)))
        else:
            out.append(block)
    return out


def generate(
    model: Any,
    processor: Any,
    images: Any = None,
    question: Optional[str] = None,
    *,
    messages: Optional[list] = None,
    config: Optional[PVCConfig] = None,
    on_calibration: Optional[Callable[[CalibrationRecord], None]] = None,
    **generate_kwargs: Any,
) -> PVCResult:
    """Generate an answer with Periodic Visual Calibration.

    Args:
        model: a transformers Qwen2-VL-family model (``Qwen2VLForConditionalGeneration``,
            ``Qwen2_5_VLForConditionalGeneration``; QVQ and TVC checkpoints load as these).
        processor: its ``AutoProcessor`` (tokenizer + image processor + chat template).
        images: a PIL image, a path, or a list of them (the question's images, in order).
        question: the user's question; the chat template puts the images before it. Or give
            ``messages`` (chat messages whose content holds ``{"type": "image", "image": ...}``
            items, or ``{"type": "image"}`` placeholders filled from ``images`` in order).
        config: ``tvc_rs.PVCConfig`` (mode, pool / prune, bridge, schedule, phrases); default
            ``PVCConfig()`` (relocate, 4x4 pooling, calibrate at every reflection phrase).
        on_calibration: called with each ``CalibrationRecord`` right after it is made.
        **generate_kwargs: passed to transformers' ``generate`` for every segment:
            ``max_new_tokens`` (over all segments; default as transformers), ``min_new_tokens``,
            sampling settings (``do_sample``, ``temperature``, ``top_p``, ...), ``logits_processor``
            (the same objects throughout: a processor's own state carries over), ``stopping_criteria``,
            ``stop_strings``, ``max_time`` (over the whole generation), ``streamer`` (gets the
            prompt once, each generated token, and each calibration's bridge text; ``end()`` once),
            ``generation_config``, ``output_scores`` / ``output_logits`` (collected over all
            segments into the result).

    Returns:
        ``PVCResult`` (text, token ids, one record per calibration, the final sequence, its
        positions and cache).

    Raises:
        TypeError: ``model`` not Qwen2-VL-family; ``config`` not a ``PVCConfig``; an image of an
            unsupported type.
        ValueError: no image; an image the processor rejects; ``config.pool`` larger than an
            image's merged grid; beam search or other settings PVC cannot honour.
        FileNotFoundError: an image path that does not exist.
    """
    session = PVCSession(model, processor, images, question, messages=messages, config=config)
    return session.run(on_calibration=on_calibration, **generate_kwargs)


# ---------------------------------------------------------------- visual forgetting


@dataclass
class AttentionCurve:
    """Attention on the image at each generated token, per layer, split into the original image
    and the re-injected copies, as mass and per token.

    Masses are shares of the query's attention row (mean over heads); they depend on how many
    tokens an image has: a 4 x 4 pooled copy has about 1/16 of the original's tokens, so its mass
    is small even when each of its tokens is looked at more. The per-token views divide that out:
    ``*_per_token`` is the mean attention per image token relative to the mean per text token
    (1 = an image token gets as much as an average text token)."""

    label: str
    image_share: Any
    """``[tokens, layers]`` float64: attention mass of the query that produced each generated
    token on all image tokens in context (``original_share + injected_share``)."""
    injected_share: Any
    """``[tokens, layers]``: the part of it on re-injected (calibration) images."""
    calibrations: list
    """Token indices after which a calibration was made."""
    result: PVCResult
    token_texts: list = field(default_factory=list)
    original_share: Any = None
    """``[tokens, layers]``: the part on the question's own image(s), while in context
    (``relocate`` and ``kv`` evict them at a calibration: 0 from then on)."""
    original_tokens: Any = None
    """``[tokens]`` int: image tokens of the question's image(s) in context at each step."""
    injected_tokens: Any = None
    """``[tokens]`` int: re-injected image tokens in context at each step."""
    context_tokens: Any = None
    """``[tokens]`` int: tokens the query attends to (image and text) at each step."""

    def __post_init__(self) -> None:
        if self.original_share is None:
            self.original_share = self.image_share - self.injected_share

    @property
    def layers(self) -> int:
        return int(self.image_share.shape[1])

    @property
    def text_tokens(self) -> Any:
        """``[tokens]`` int: non-image tokens in context at each step."""
        return self.context_tokens - self.original_tokens - self.injected_tokens

    def _per_token(self, share: Any, count: Any) -> Any:
        text_mass = 1.0 - self.image_share
        count = np.asarray(count, dtype=np.float64)[:, None]
        text = np.asarray(self.text_tokens, dtype=np.float64)[:, None]
        with np.errstate(divide="ignore", invalid="ignore"):
            out = (share / count) / (text_mass / text)
        return np.where(count > 0, out, np.nan)

    @property
    def image_per_token(self) -> Any:
        """``[tokens, layers]``: mean attention per image token (original and re-injected) over
        mean attention per text token."""
        return self._per_token(self.image_share, self.original_tokens + self.injected_tokens)

    @property
    def original_per_token(self) -> Any:
        """``[tokens, layers]``: the same for the question's image tokens (NaN once evicted)."""
        return self._per_token(self.original_share, self.original_tokens)

    @property
    def injected_per_token(self) -> Any:
        """``[tokens, layers]``: the same for re-injected image tokens (NaN before the first)."""
        return self._per_token(self.injected_share, self.injected_tokens)

    def by_fraction(self, parts: int = 8, layer: int = 0, values: Any = None) -> list:
        """Mean over each ``1/parts`` of the response of ``values`` (``[tokens, layers]``;
        default ``image_share``; the paper reports 1/8, 4/8, 7/8)."""
        values = self.image_share if values is None else values
        n = values.shape[0]
        out = []
        for p in range(parts):
            a, b = (p * n) // parts, ((p + 1) * n) // parts
            chunk = values[a:b, layer]
            chunk = chunk[~np.isnan(chunk)]
            out.append(float(chunk.mean()) if len(chunk) else float("nan"))
        return out


def visual_attention_curve(
    model: Any,
    processor: Any,
    images: Any = None,
    question: Optional[str] = None,
    *,
    messages: Optional[list] = None,
    config: Optional[PVCConfig] = None,
    label: Optional[str] = None,
    **generate_kwargs: Any,
) -> AttentionCurve:
    """Measure visual forgetting over one generation (the TVC paper's Figure: attention share
    on image tokens along the response), with PVC (``config``) or without (``config=None``).

    The model runs with eager attention for the measurement (switched back afterwards). At every
    decoding step each layer's attention row of the query that produces the next token is read
    (mean over heads); its mass on the question's image tokens and on re-injected copies is
    recorded apart, with the number of each kind of token in context, so that
    `AttentionCurve` can give masses and per-token ratios. Arguments as ``generate``; greedy
    decoding unless sampling settings are given.
    """
    plain = config is None
    if plain:
        config = PVCConfig(schedule=PVCSchedule(max_calibrations=0))
    session = PVCSession(model, processor, images, question, messages=messages, config=config)
    if session.recurrent_layers:
        raise ValueError(
            f"visual_attention_curve: {session.family.name}'s layers {session.recurrent_layers} are linear "
            "attention (no attention rows to read); it needs a model whose every layer is full attention"
        )
    previous = model.config._attn_implementation
    if previous != "eager":
        model.set_attn_implementation("eager")
    rows: list = []
    injected_rows: list = []
    current: dict = {}
    current_injected: dict = {}
    counts: list = []  # (original image tokens, injected image tokens, context tokens) per step
    layers = session.text_model.layers
    recording = {"on": False}

    def make_hook(index: int):
        def hook(module, args, output):
            if not recording["on"]:
                return
            weights = output[1] if isinstance(output, tuple) and len(output) > 1 else None
            if weights is None or weights.shape[2] != 1:
                return
            row = weights[0, :, -1].double().mean(0).cpu()  # [kv]
            lay = session.layout
            n = row.shape[0]
            mask = lay.image_mask[:n]
            inj = lay.injected_mask[:n]
            current[index] = float(row[:mask.shape[0]][mask].sum())
            current_injected[index] = float(row[:inj.shape[0]][inj].sum())
            if index == len(layers) - 1:
                rows.append([current.get(i, float("nan")) for i in range(len(layers))])
                injected_rows.append([current_injected.get(i, float("nan")) for i in range(len(layers))])
                n_injected = int(inj.sum())
                counts.append((int(mask.sum()) - n_injected, n_injected, n))
        return hook

    handles = [layer.self_attn.register_forward_hook(make_hook(i)) for i, layer in enumerate(layers)]
    original_generate = model.generate

    def recording_generate(*args, **kwargs):
        recording["on"] = True
        try:
            return original_generate(*args, **kwargs)
        finally:
            recording["on"] = False

    model.generate = recording_generate
    try:
        result = session.run(**generate_kwargs)
    finally:
        del model.generate
        for handle in handles:
            handle.remove()
        if previous != "eager":
            model.set_attn_implementation(previous)
    shares = np.asarray(rows, dtype=np.float64).reshape(-1, len(layers))
    injected = np.asarray(injected_rows, dtype=np.float64).reshape(-1, len(layers))
    # generate may run one forward more than it keeps tokens for (never on CPU/CUDA today).
    shares, injected = shares[: len(result.token_ids)], injected[: len(result.token_ids)]
    counts_array = np.asarray(counts, dtype=np.int64).reshape(-1, 3)[: len(result.token_ids)]
    texts = [session.tokenizer.decode([t]) for t in result.token_ids]
    return AttentionCurve(
        label=label or ("without PVC" if plain else f"PVC ({config.mode})"),
        image_share=shares,
        injected_share=injected,
        calibrations=[c.token_index for c in result.calibrations],
        result=result,
        token_texts=texts,
        original_share=shares - injected,
        original_tokens=counts_array[:, 0],
        injected_tokens=counts_array[:, 1],
        context_tokens=counts_array[:, 2],
    )


#: The columns of `write_attention_csv` (and of ``tvc-rs diagnose``'s CSV).
ATTENTION_CSV_COLUMNS = [
    "run", "token_index", "token", "calibrated", "layer",
    "image_share", "original_share", "injected_share",
    "original_tokens", "injected_tokens", "text_tokens",
    "image_per_token", "original_per_token", "injected_per_token",
]


def write_attention_csv(curves: Union[AttentionCurve, Sequence[AttentionCurve]], path: Union[str, os.PathLike]) -> None:
    """One row per (run, generated token, layer), columns `ATTENTION_CSV_COLUMNS`:

    - ``calibrated``: 1 on a token after which the image was given again;
    - ``image_share``: attention mass (mean over heads) on all image tokens in context, the sum of
      ``original_share`` (the question's image) and ``injected_share`` (re-injected copies);
    - ``original_tokens``, ``injected_tokens``, ``text_tokens``: how many of each are in context;
    - ``*_per_token``: mean attention per image token of that kind over mean attention per text
      token (1 = as much as an average text token; empty when there is no such token).
    """
    import csv

    if isinstance(curves, AttentionCurve):
        curves = [curves]

    def number(v: float) -> str:
        return "" if np.isnan(v) else f"{v:.6g}"

    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(ATTENTION_CSV_COLUMNS)
        for curve in curves:
            calibrated = set(curve.calibrations)
            image_pt, original_pt, injected_pt = (curve.image_per_token, curve.original_per_token,
                                                  curve.injected_per_token)
            text = curve.text_tokens
            for t in range(curve.image_share.shape[0]):
                token = curve.token_texts[t] if t < len(curve.token_texts) else ""
                for layer in range(curve.layers):
                    writer.writerow([
                        curve.label, t, token, int(t in calibrated), layer,
                        number(curve.image_share[t, layer]), number(curve.original_share[t, layer]),
                        number(curve.injected_share[t, layer]),
                        int(curve.original_tokens[t]), int(curve.injected_tokens[t]), int(text[t]),
                        number(image_pt[t, layer]), number(original_pt[t, layer]), number(injected_pt[t, layer]),
                    ])


def plot_attention_curves(
    curves: Union[AttentionCurve, Sequence[AttentionCurve]],
    path: Union[str, os.PathLike],
    layers: Iterable[int] = (0, -1),
    title: Optional[str] = None,
) -> None:
    """Draw, for each layer in ``layers`` (one column each), into a PNG:

    - top: attention mass on the question's image (solid), on the re-injected copies (dashed)
      and their sum (dotted; drawn for runs that have copies), per run; an image not in context
      (evicted by ``relocate`` / ``kv``, or a copy not given yet) is not drawn;
    - bottom: the per-token view, mean attention per image token over mean attention per text
      token (log scale; 1 = as much as a text token), for the question's image and the copies.

    Calibrations are vertical lines in the run's colour, numbered at the top. Needs matplotlib
    (``pip install 'tvc-rs[plot]'``)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker
    except ImportError:
        raise ImportError("plotting needs matplotlib: pip install matplotlib (or 'tvc-rs[plot]')") from None
    if isinstance(curves, AttentionCurve):
        curves = [curves]
    layers = list(layers)
    fig, axes = plt.subplots(2, len(layers), figsize=(6.5 * len(layers), 8), squeeze=False, sharex="col")
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for column, layer in enumerate(layers):
        mass_ax, ratio_ax = axes[0][column], axes[1][column]
        for k, curve in enumerate(curves):
            color = colors[k % len(colors)]
            index = layer % curve.layers
            x = np.arange(curve.image_share.shape[0])
            has_copies = bool(np.any(curve.injected_tokens > 0))
            # An image not in context (evicted, or not given yet) is not drawn, rather than drawn at 0.
            original = np.where(curve.original_tokens > 0, curve.original_share[:, index], np.nan)
            injected = np.where(curve.injected_tokens > 0, curve.injected_share[:, index], np.nan)
            mass_ax.plot(x, original, color=color, linewidth=1.2, label=f"{curve.label}: question's image")
            if has_copies:
                mass_ax.plot(x, injected, color=color, linewidth=1.2, linestyle="--", marker=".", markersize=3,
                             label=f"{curve.label}: re-injected image")
                mass_ax.plot(x, curve.image_share[:, index], color=color, linewidth=0.8, linestyle=":",
                             label=f"{curve.label}: both (sum)")
            ratio_ax.plot(x, curve.original_per_token[:, index], color=color, linewidth=1.2,
                          label=f"{curve.label}: question's image, per token")
            if has_copies:
                ratio_ax.plot(x, curve.injected_per_token[:, index], color=color, linewidth=1.2, linestyle="--",
                              marker=".", markersize=3, label=f"{curve.label}: re-injected image, per token")
            for number, c in enumerate(curve.calibrations, 1):
                for ax in (mass_ax, ratio_ax):
                    ax.axvline(c + 0.5, color=color, linestyle="-.", linewidth=0.8, alpha=0.7)
                mass_ax.annotate(f"PVC {number}", xy=(c + 0.5, 1.0), xycoords=("data", "axes fraction"),
                                 xytext=(2, -10), textcoords="offset points", fontsize=7, color=color)
        name = curves[0].layers + layer if layer < 0 else layer
        mass_ax.set_title(f"layer {name}: attention mass on image tokens")
        mass_ax.set_ylabel("share of the attention row")
        mass_ax.set_ylim(bottom=0)
        mass_ax.legend(fontsize=7)
        ratio_ax.set_title(f"layer {name}: attention per image token / per text token")
        ratio_ax.set_yscale("log")
        low, high = ratio_ax.get_ylim()
        plain = matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}")
        ratio_ax.yaxis.set_major_formatter(plain)
        if high / low < 30:  # within about a decade: label the minor ticks too
            ratio_ax.yaxis.set_minor_formatter(plain)
        ratio_ax.axhline(1.0, color="grey", linewidth=0.8)
        ratio_ax.set_xlabel("generated token (dash-dot lines: calibrations)")
        ratio_ax.set_ylabel("per-token ratio (1 = a text token)")
        ratio_ax.legend(fontsize=7)
    fig.suptitle(title or "visual forgetting: attention on the image along the response")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
