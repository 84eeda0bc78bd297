"""The model side of ``tvc_rs.hf``: the supported families and the model check, the text
model's M-RoPE settings for re-rotation, and which tensors the Rust kernels take as they are."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


def _torch():
    import torch

    return torch


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

_COMPRESS_DTYPES = ("float32", "float16", "bfloat16")


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


def _compressible(x: Any) -> Any:
    """``x`` (detached, on its device) in a dtype the compression kernels take: float64 features
    (float64 models) are cast to float32, where the kernels compute anyway."""
    x = x.detach()
    return x if str(x.dtype).replace("torch.", "") in _COMPRESS_DTYPES else x.float()

