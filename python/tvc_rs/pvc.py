"""PVC scheduling: which reflection hits become calibrations (Rust: src/pvc), and the settings of a
Periodic Visual Calibration run (`PVCConfig`).

A `PVCSchedule` is attached to each stream (`ReflectionDetector.stream(schedule)`, or
`StreamBatch.add(slot, schedule)`), which keeps its own schedule state.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Optional, Sequence, Union

from tvc_rs._native import Calibration, PVCSchedule

__all__ = [
    "Calibration", "PVCSchedule", "PVCConfig", "PVCMode", "PVC_MODES", "DEFAULT_BRIDGE", "DEFAULT_CALIBRATION_TOKEN",
]


class PVCMode(str, Enum):
    """How a calibration gives the image again (``PVCConfig.mode``; both drivers).

    A ``str`` enum: a member equals its value (``PVCMode.KV == "kv"``) and prints as it, so
    records, JSON and labels read as before."""

    RELOCATE = "relocate"
    """The method as published: rebuild the sequence without the first image, put the
    compressed image after the bridge, encode it all again."""
    APPEND = "append"
    """Keep everything and prefill bridge + compressed image on top of the cache."""
    KV = "kv"
    """Evict the first image's cache entries, re-rotate every later key to the position
    ``relocate`` gives it, then prefill bridge + image."""

    def __str__(self) -> str:  # f-strings too (Python 3.11 formats a mixed-in Enum by its name)
        return self.value


PVC_MODES = tuple(m.value for m in PVCMode)
"""The values of ``PVCMode``, as strings: ``("relocate", "append", "kv")``."""

DEFAULT_BRIDGE = "Let me see the image again:"
"""The phrase put before a re-injected image (the TVC authors' wording)."""


def bridge_text(bridge: str, text_before: str) -> str:
    """The bridge as it goes into the answer after ``text_before``, the answer's text so far
    (special tokens skipped, earlier bridges included): one space before ``bridge`` unless the
    bridge starts with whitespace, or the text so far ends with it or is empty (the answer then
    starts on the chat template's own line); ``""`` for an empty bridge. The one rule of both
    drivers (``tvc_rs.hf``, ``tvc_rs.vllm``)."""
    if not bridge:
        return ""
    if bridge[0].isspace() or not text_before or text_before[-1].isspace():
        return bridge
    return " " + bridge


def bridge_ids(tokenizer: Any, bridge: str, text_before: str) -> list:
    """The token ids of ``bridge_text(bridge, text_before)`` (no special tokens added)."""
    text = bridge_text(bridge, text_before)
    return list(tokenizer.encode(text, add_special_tokens=False)) if text else []


DEFAULT_CALIBRATION_TOKEN = "<|vision_pad|>"
"""The token a serving engine is made to emit when a calibration is due, so that the request
stops there: Qwen2-VL's ``<|vision_pad|>`` (id 151654 in the Qwen2-VL, Qwen2.5-VL and QVQ
tokenizers), a special token those models never generate (images use ``<|image_pad|>``)."""

_PRUNE_COUNTS = ("ratio", "mass", "keep")
_PRUNE_OPTIONS = ("min_keep", "max_keep", "layer", "merge")


def _mode(mode: Any) -> PVCMode:
    if isinstance(mode, PVCMode):
        return mode
    if not isinstance(mode, str):
        raise TypeError(f"mode must be a tvc_rs.PVCMode or one of {list(PVC_MODES)}, got {type(mode).__name__}")
    try:
        return PVCMode(mode)
    except ValueError:
        raise ValueError(f"mode = {mode!r}: expected one of {', '.join(repr(m) for m in PVC_MODES)}") from None


def _check_share(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"prune[{name!r}] must be a number in (0, 1], got {type(value).__name__}")
    value = float(value)
    if not (0.0 < value <= 1.0) or math.isnan(value):
        raise ValueError(f"prune[{name!r}] = {value}: must be in (0, 1]")
    return value


def _prune_spec(prune: Any) -> Optional[dict]:
    """The prune setting as a dict with exactly one of ratio / mass / keep, plus options."""
    if prune is None:
        return None
    if isinstance(prune, (int, float)) and not isinstance(prune, bool):
        return {"ratio": _check_share("ratio", prune)}
    if not isinstance(prune, Mapping):
        raise TypeError(
            "prune must be None, a keep ratio in (0, 1] or a dict such as {'ratio': 0.25} / {'mass': 0.9} / "
            f"{{'keep': 64}}, got {type(prune).__name__}"
        )
    unknown = sorted(set(prune) - set(_PRUNE_COUNTS) - set(_PRUNE_OPTIONS))
    if unknown:
        raise ValueError(f"prune: unknown key(s) {unknown}; expected one of {list(_PRUNE_COUNTS)} plus {list(_PRUNE_OPTIONS)}")
    counts = [k for k in _PRUNE_COUNTS if prune.get(k) is not None]
    if len(counts) != 1:
        raise ValueError(f"prune: give exactly one of 'ratio', 'mass' or 'keep', got {counts or 'none'}")
    spec = dict(prune)
    kind = counts[0]
    if kind == "keep":
        keep = prune["keep"]
        if isinstance(keep, bool) or not isinstance(keep, int) or keep < 1:
            raise ValueError(f"prune['keep'] = {keep!r}: must be an int >= 1")
    else:
        spec[kind] = _check_share(kind, prune[kind])
    for key in ("min_keep", "max_keep"):
        value = prune.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"prune[{key!r}] = {value!r}: must be an int >= 1")
    layer = prune.get("layer")
    if layer is not None and (isinstance(layer, bool) or not isinstance(layer, int)):
        raise ValueError(f"prune['layer'] = {layer!r}: must be a layer index (int) or None for all layers")
    return spec


@dataclass
class PVCConfig:
    """Settings of Periodic Visual Calibration (shared by the transformers and vLLM drivers).

    Attributes:
        mode: a ``PVCMode``, or its value as a string: ``"relocate"`` (the method as
            published), ``"append"`` or ``"kv"``; stored as the ``PVCMode``.
        pool: ``k`` for ``k x k`` average pooling of the re-injected image on its merged grid
            (4, the paper's released setting; 2; 1 = no pooling). Ignored when ``prune`` is set.
        prune: ``None``, a keep ratio in (0, 1], or a dict with exactly one of ``ratio`` (share
            of the image's tokens to keep), ``mass`` (keep the fewest tokens holding this share
            of the attention) or ``keep`` (a count), plus optional ``min_keep`` / ``max_keep``,
            ``layer`` (whose attention scores the tokens; ``None``: the mean over all layers)
            and ``merge`` (average dropped tokens into their most similar kept token). The
            image is then pruned by attention instead of pooled.
        bridge: text put before the re-injected image ("Let me see the image again:").
        schedule: which reflection hits become calibrations (a ``PVCSchedule``, or a dict of
            its arguments); default: every hit.
        phrases: reflection phrases to watch for; ``None``: ``tvc_rs.DEFAULT_PHRASES``.
        calibration_token: the token a serving engine (vLLM) forces when a calibration is due,
            ending the request there; see ``DEFAULT_CALIBRATION_TOKEN``. Unused by transformers.

    Raises ValueError (an unknown mode, ``pool < 1``, a bad prune spec, a negative schedule
    value) or TypeError (a value of the wrong type) on construction.
    """

    mode: Union[PVCMode, str] = PVCMode.RELOCATE
    pool: int = 4
    prune: Union[None, float, Mapping[str, Any]] = None
    bridge: str = DEFAULT_BRIDGE
    schedule: PVCSchedule = field(default_factory=PVCSchedule)
    phrases: Optional[Sequence[str]] = None
    calibration_token: str = DEFAULT_CALIBRATION_TOKEN

    def __post_init__(self) -> None:
        self.mode = _mode(self.mode)
        if isinstance(self.pool, bool) or not isinstance(self.pool, int):
            raise TypeError(f"pool must be an int pooling factor (4, 2 or 1 for none), got {type(self.pool).__name__}")
        if self.pool < 1:
            raise ValueError(f"pool = {self.pool}: must be >= 1 (1 = no pooling)")
        _prune_spec(self.prune)
        if not isinstance(self.bridge, str):
            raise TypeError(f"bridge must be a str, got {type(self.bridge).__name__}")
        if self.schedule is None:
            self.schedule = PVCSchedule()
        elif isinstance(self.schedule, Mapping):
            self.schedule = PVCSchedule(**self.schedule)
        elif not isinstance(self.schedule, PVCSchedule):
            raise TypeError(f"schedule must be a tvc_rs.PVCSchedule or a dict of its arguments, got {type(self.schedule).__name__}")
        if self.phrases is not None:
            if isinstance(self.phrases, str) or not all(isinstance(p, str) and p.strip() for p in self.phrases):
                raise ValueError("phrases must be None or a list of non-empty strings")
            self.phrases = list(self.phrases)
        if not isinstance(self.calibration_token, str) or not self.calibration_token:
            raise ValueError(f"calibration_token = {self.calibration_token!r}: expected a token string such as '<|vision_pad|>'")

    @property
    def prune_spec(self) -> Optional[dict]:
        """``prune`` normalised to a dict (``{'ratio': r}`` for a bare number), or None."""
        return _prune_spec(self.prune)
