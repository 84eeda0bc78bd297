"""PVC scheduling: which reflection hits become calibrations (Rust: src/pvc), and the PVC
settings the serving integrations share (`PVCConfig`).

A `PVCSchedule` is attached to each stream (`ReflectionDetector.stream(schedule)`, or
`StreamBatch.add(slot, schedule)`), which keeps its own schedule state.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional, Tuple

from tvc_rs._native import Calibration, PVCSchedule

__all__ = ["Calibration", "PVCSchedule", "PVCConfig", "PVC_MODES", "DEFAULT_BRIDGE", "DEFAULT_CALIBRATION_TOKEN"]

PVC_MODES = ("relocate", "append", "kv")
"""``relocate``: rebuild the sequence (question without the image, text so far, bridge phrase,
compressed image) and encode it again, as published. ``append``: keep everything and append the
bridge phrase and the compressed image (a prefill of those only, with prefix caching). ``kv``:
evict the first image from the KV cache, re-rotate later keys, then append (approximates
``relocate``; needs direct access to the cache, so not offered by the vLLM driver)."""

DEFAULT_BRIDGE = "Let me see the image again:"
"""The phrase put before a re-injected image (the TVC authors' wording, issues #1 and #3)."""

DEFAULT_CALIBRATION_TOKEN = "<|vision_pad|>"
"""The token a serving engine is made to emit when a calibration is due, so that the request
stops there: Qwen2-VL's ``<|vision_pad|>`` (id 151654 in the Qwen2-VL, Qwen2.5-VL and QVQ
tokenizers), a special token those models never generate (images use ``<|image_pad|>``)."""


@dataclass(frozen=True)
class PVCConfig:
    """How Periodic Visual Calibration runs, shared by the vLLM and transformers integrations.

    Attributes:
        mode: ``"relocate"``, ``"append"`` or ``"kv"`` (see :data:`PVC_MODES`).
        pool: ``k`` of the ``k x k`` average pooling of the re-injected image's merged token
            grid (1: no compression). TVC's released setting is 4 (16x fewer tokens, no loss on
            its benchmarks).
        bridge: text put between the reasoning so far and the re-injected image.
        schedule: when hits become calibrations (warm-up, minimum gap, maximum count, period).
        phrases: reflection phrases (None: ``tvc_rs.DEFAULT_PHRASES``).
        calibration_token: the token a serving engine forces when a calibration is due (it ends
            the request there; see :data:`DEFAULT_CALIBRATION_TOKEN`).
    """

    mode: Literal["relocate", "append", "kv"] = "relocate"
    pool: int = 4
    bridge: str = DEFAULT_BRIDGE
    schedule: PVCSchedule = field(default_factory=PVCSchedule)
    phrases: Optional[Tuple[str, ...]] = None
    calibration_token: str = DEFAULT_CALIBRATION_TOKEN

    def __post_init__(self) -> None:
        if self.mode not in PVC_MODES:
            raise ValueError(f"mode = {self.mode!r}: expected one of {', '.join(map(repr, PVC_MODES))}")
        if isinstance(self.pool, bool) or not isinstance(self.pool, int) or self.pool < 1:
            raise ValueError(f"pool = {self.pool!r}: expected an integer >= 1 (1: no compression)")
        if not isinstance(self.bridge, str):
            raise TypeError(f"bridge: expected a str, got {type(self.bridge).__name__}")
        if not isinstance(self.schedule, PVCSchedule):
            raise TypeError(f"schedule: expected a tvc_rs.PVCSchedule, got {type(self.schedule).__name__}")
        if self.phrases is not None:
            if isinstance(self.phrases, str) or not all(isinstance(p, str) for p in self.phrases):
                raise TypeError("phrases: expected a sequence of strings (or None for the defaults)")
            object.__setattr__(self, "phrases", tuple(self.phrases))
        if not isinstance(self.calibration_token, str) or not self.calibration_token:
            raise ValueError(f"calibration_token = {self.calibration_token!r}: expected a token string")
