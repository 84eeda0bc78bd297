"""KV-cache re-injection: key re-rotation, span relocation, paged re-injection (Rust: src/kv).

Every function writes the caller's tensors in place (NumPy arrays or PyTorch CPU tensors,
float32 / float16 / bfloat16, or float64 (computed in float32, as the others), read through DLPack
without copies), checks every argument before
writing anything, and runs with the GIL released (rayon over layers, heads and tokens).
PyTorch CUDA tensors are rotated and moved by the kernels of kernels/kv.cu (see ``tvc_rs.cuda``)
on the current stream, with the same checks, without waiting for the GPU; deltas may be CUDA
tensors (read in place), slots and positions are host data. float64 is CPU only (the kernels take
float32, float16 and bfloat16; a float64 CUDA tensor is refused with a TypeError).

RoPE is described by the same keywords everywhere:

- ``rope_theta``: the RoPE base (``config.rope_parameters["rope_theta"]`` in transformers 5).
- ``head_dim``: size of one key vector.
- ``rotary_dim``: leading dims that rotate (default ``head_dim``; partial rotary otherwise).
- ``interleaved``: GPT-J pairs ``(2i, 2i+1)`` if True, else NeoX / Llama / Qwen half-split pairs
  ``(i, i + rotary_dim/2)``.
- ``mrope_section``: M-RoPE sections, summing to ``rotary_dim / 2`` (Qwen2-VL ``[16, 24, 24]``,
  GLM-4.1V ``[8, 12, 12]``, Qwen3-VL ``[24, 20, 20]``, Qwen3.5 ``[11, 11, 10]``).
- ``mrope_interleaved``: the frequency-to-axis map of M-RoPE. False (default; Qwen2-VL,
  Qwen2.5-VL, GLM-4.1V): contiguous sections, frequency pair ``i`` in section ``j`` turns with
  the (t, h, w)[j % 3] component of the delta, as transformers' ``Qwen2VLRotaryEmbedding``
  splits them. True (Qwen3-VL, Qwen3.5; transformers' ``apply_interleaved_mrope``, vLLM's
  ``mrope_interleaved``): ``mrope_section = [s_t, s_h, s_w]`` and frequency ``j`` turns with h
  if ``j % 3 == 1 and j < 3 * s_h``, with w if ``j % 3 == 2 and j < 3 * s_w``, else with t.

Frequency ``j`` is the one turning at ``rope_theta ** (-2 j / rotary_dim)``, whatever the pair
layout: partial rotary works with either layout (GLM-4.1V: ``rotary_dim = head_dim / 2``,
``interleaved=True``, ``mrope_section=[8, 12, 12]``; Qwen3.5: ``head_dim=256``,
``rotary_dim=64``, NeoX pairs, ``mrope_section=[11, 11, 10]``, ``mrope_interleaved=True``).

A delta is an int (the same for every token), an int32/int64 array ``[n]`` (one per token; with
M-RoPE it applies to all three components, as for text tokens) or ``[n, 3]`` (t, h, w; M-RoPE
only). The rotation angle is computed from the integer delta in float64, never as the difference
of two large angles, so keys at position 100 000 move as exactly as keys at position 10.
"""

from __future__ import annotations

from typing import Any

# The KV functions are the native ones (their documentation is on them: help(relocate_span)).
from tvc_rs._native import append_entries as append_entries
from tvc_rs._native import paged_reinject as paged_reinject
from tvc_rs._native import relocate_span as relocate_span
from tvc_rs._native import relocate_spans as relocate_spans
from tvc_rs._native import rerotate_keys as rerotate_keys

__all__ = ["rerotate_keys", "relocate_span", "relocate_spans", "append_entries", "paged_reinject", "rope_settings"]

# How each family's text rotary embedding (transformers 5.24) rotates keys, where its config does
# not say: (adjacent GPT-J pairs, interleaved M-RoPE map, default mrope_section, reads
# partial_rotary_factor). The defaults are those of the family's rotary class when
# rope_parameters has no mrope_section.
_ROPE_FAMILIES = {
    "qwen2_vl": (False, False, (16, 24, 24), False),
    "qwen2_5_vl": (False, False, (16, 24, 24), False),
    "qwen3_vl": (False, True, (24, 20, 20), False),
    "qwen3_vl_moe": (False, True, (24, 20, 20), False),
    "glm4v": (True, False, (8, 12, 12), True),  # rotate_half_llm: pairs (2i, 2i + 1)
    "glm4v_moe": (False, False, (8, 12, 12), True),  # plain rotate_half, unlike glm4v
    "qwen3_5": (False, True, (11, 11, 10), True),
    "qwen3_5_moe": (False, True, (11, 11, 10), True),
}


def _field(obj: Any, key: str) -> Any:
    if obj is None:
        return None
    if isinstance(obj, dict):
        return obj.get(key)
    return getattr(obj, key, None)


def rope_settings(config: Any) -> dict:
    """The RoPE keywords of this module for a model: ``rope_theta``, ``head_dim``,
    ``rotary_dim``, ``interleaved``, ``mrope_section``, ``mrope_interleaved``, read from its
    transformers config (the model's config or its ``text_config``; an object or its
    ``to_dict()``), to pass as ``**rope_settings(config)``.

    Read from the config: ``rope_parameters["rope_theta"]``, ``head_dim`` (or ``hidden_size //
    num_attention_heads``), ``rope_parameters["partial_rotary_factor"]`` (GLM-4.1V, Qwen3.5:
    ``rotary_dim = int(head_dim * factor)``), ``rope_parameters["mrope_section"]``. What the
    config does not hold comes from the family's rotary code: the pair layout (GLM-4.1V
    ``glm4v``: adjacent pairs; every other family, ``glm4v_moe`` included: NeoX halves), the
    frequency map (Qwen3-VL, Qwen3.5: interleaved) and the default ``mrope_section`` (Qwen2-VL
    ``[16, 24, 24]``, Qwen3-VL ``[24, 20, 20]``, GLM-4.1V ``[8, 12, 12]``, Qwen3.5
    ``[11, 11, 10]``).

    Raises:
        ValueError: a model type not in ``tvc_rs.SUPPORTED_MODEL_TYPES`` (the message lists
            them); no ``rope_theta``.
    """
    model_type = _field(config, "model_type") or ""
    text = _field(config, "text_config") or config
    family = model_type[: -len("_text")] if model_type.endswith("_text") else model_type
    if family not in _ROPE_FAMILIES:
        supported = ", ".join(f"'{name}'" for name in _ROPE_FAMILIES)
        raise ValueError(f"config: model_type must be one of {supported}, got {model_type!r}")
    gptj, mrope_interleaved, default_section, partial = _ROPE_FAMILIES[family]
    params = _field(text, "rope_parameters") or _field(text, "rope_scaling") or {}
    rope_theta = params.get("rope_theta", _field(text, "rope_theta"))
    if rope_theta is None:
        raise ValueError("config: no rope_theta in rope_parameters (nor text_config.rope_theta)")
    head_dim = _field(text, "head_dim") or _field(text, "hidden_size") // _field(text, "num_attention_heads")
    factor = params.get("partial_rotary_factor", 1.0) if partial else 1.0
    return {
        "rope_theta": float(rope_theta),
        "head_dim": int(head_dim),
        "rotary_dim": int(head_dim * factor),
        "interleaved": gptj,
        "mrope_section": [int(x) for x in (params.get("mrope_section") or default_section)],
        "mrope_interleaved": mrope_interleaved,
    }
