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

from typing import Any, Sequence

from tvc_rs import _native

__all__ = ["rerotate_keys", "relocate_span", "append_entries", "paged_reinject", "rope_settings"]

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


def rerotate_keys(
    keys: Any,
    delta: Any,
    *,
    rope_theta: float,
    head_dim: int,
    rotary_dim: int | None = None,
    interleaved: bool = False,
    mrope_section: Sequence[int] | None = None,
    mrope_interleaved: bool = False,
) -> None:
    """Rotate cached (already RoPE-rotated) keys in place by a position delta per token.

    ``keys``: ``[tokens, heads, head_dim]`` float32/float16/bfloat16/float64, or a list/tuple of such
    tensors (one per layer, same ``tokens``, all rotated in one call). Any strides: for a
    transformers cache layer ``[batch, kv_heads, seq, head_dim]`` pass
    ``layer.keys[b].transpose(0, 1)`` (a view; no copy). Written in place.

    ``delta``: int, ``[tokens]`` or (M-RoPE) ``[tokens, 3]`` int32/int64. A key stored at
    position ``p`` becomes the key at ``p + delta``: ``R(p + d) = R(d) R(p)``.
    Only the first ``rotary_dim`` dims of each key change.
    """
    _native.rerotate_keys(
        keys,
        delta,
        rope_theta=rope_theta,
        head_dim=head_dim,
        rotary_dim=rotary_dim,
        interleaved=interleaved,
        mrope_section=mrope_section,
        mrope_interleaved=mrope_interleaved,
    )


def relocate_span(
    keys: Any,
    values: Any,
    start: int,
    end: int,
    *,
    rope_theta: float,
    head_dim: int,
    delta: Any = None,
    old_positions: Any = None,
    new_positions: Any = None,
    length: int | None = None,
    rotary_dim: int | None = None,
    interleaved: bool = False,
    mrope_section: Sequence[int] | None = None,
    mrope_interleaved: bool = False,
) -> int:
    """Evict cache positions ``[start, end)`` (e.g. the first image) from every layer.

    ``keys``, ``values``: lists/tuples of per-layer tensors ``[batch, kv_heads, seq, head_dim]``
    (transformers' ``[layer.keys for layer in cache.layers]`` and ``[layer.values ...]``; values
    may have another head size), one dtype for all. Modified in place: entries
    ``[end, length)`` move down to ``[start, length - (end - start))`` in keys and values, and
    each moved key is re-rotated to its new position. Entries before ``start`` are untouched;
    entries from the returned length on are stale: drop them (transformers 5.24.0:
    ``cache.crop(new_length - old_length)``, a negative count removing that many).

    The moved entries' deltas (``n = length - end`` of them), one of:

    - ``delta``: int, ``[n]`` or ``[n, 3]`` (t, h, w);
    - ``old_positions`` and ``new_positions``: their position ids before and after, ``[n]`` or,
      for M-RoPE, ``[3, n]`` as transformers lays position ids out (``position_ids[:, b, end:length]``
      and what ``get_rope_index`` assigns them in the rebuilt sequence: the ``relocate`` mode);
    - neither (plain RoPE only): ``-(end - start)``. With M-RoPE an image advances positions by
      ``max(t, h, w)`` of its grid, not by its token count, so the deltas must be given.

    ``length``: valid entries (default ``seq``; e.g. a StaticCache's filled length).
    Returns the new valid length ``length - (end - start)``.
    """
    return _native.relocate_span(
        keys,
        values,
        start,
        end,
        rope_theta=rope_theta,
        head_dim=head_dim,
        delta=delta,
        old_positions=old_positions,
        new_positions=new_positions,
        length=length,
        rotary_dim=rotary_dim,
        interleaved=interleaved,
        mrope_section=mrope_section,
        mrope_interleaved=mrope_interleaved,
    )


def append_entries(
    keys: Any,
    values: Any,
    new_keys: Any,
    new_values: Any,
    positions: Any,
    *,
    delta: Any = None,
    rope_theta: float | None = None,
    head_dim: int | None = None,
    rotary_dim: int | None = None,
    interleaved: bool = False,
    mrope_section: Sequence[int] | None = None,
    mrope_interleaved: bool = False,
) -> None:
    """Write new entries (e.g. a compressed image's K/V) into every layer of a contiguous cache.

    ``keys``, ``values``: per-layer ``[batch, kv_heads, seq, head_dim]`` (written in place).
    ``new_keys``, ``new_values``: per-layer ``[batch, kv_heads, n, head_dim]`` (read only; must
    not share memory with the cache). ``positions``: an int ``start`` (entries go to
    ``start .. start + n``) or ``[n]`` int32/int64 distinct cache indices ``< seq``.
    ``delta`` (optional; needs ``rope_theta`` and ``head_dim``): rotate each new key by it while
    writing (int, ``[n]`` or ``[n, 3]``). The cache must already be long enough (grow it first).
    """
    _native.append_entries(
        keys,
        values,
        new_keys,
        new_values,
        positions,
        delta=delta,
        rope_theta=rope_theta,
        head_dim=head_dim,
        rotary_dim=rotary_dim,
        interleaved=interleaved,
        mrope_section=mrope_section,
        mrope_interleaved=mrope_interleaved,
    )


def paged_reinject(
    kv_caches: Any,
    src_slots: Any,
    dst_slots: Any,
    delta: Any,
    *,
    rope_theta: float,
    head_dim: int,
    layout: str = "vllm",
    rotary_dim: int | None = None,
    interleaved: bool = False,
    mrope_section: Sequence[int] | None = None,
    mrope_interleaved: bool = False,
) -> int:
    """Move entries of a paged (vLLM) cache: gather, re-rotate keys, scatter, for every layer.

    ``kv_caches``: one tensor or a list (one per layer), written in place, in ``layout``:

    - ``"vllm"`` (vLLM 0.33): ``[num_blocks, kv_heads, block_size, 2 * head_dim]``, keys then
      values in the last dimension, with whatever strides vLLM's ``KVCacheLayout`` gave the view
      (NHD by default, HND for FlashInfer's TRT-LLM kernels);
    - ``"kv_blocks"`` (earlier vLLM FlashAttention): ``[2, num_blocks, block_size, kv_heads, head_dim]``;
    - ``"blocks_kv"`` (earlier vLLM FlashInfer): ``[num_blocks, 2, block_size, kv_heads, head_dim]``.

    ``src_slots``, ``dst_slots``: ``[n]`` int32/int64 slots numbered as vLLM's slot mapping,
    ``block_number * block_size + offset``; a pair with a negative slot (``PAD_SLOT_ID = -1``)
    is skipped. Destinations must be distinct. All sources are read before any destination is
    written, so moves within one cache may overlap. ``delta``: int, ``[n]`` or ``[n, 3]``.
    Returns the number of entries moved per layer.
    """
    return _native.paged_reinject(
        kv_caches,
        src_slots,
        dst_slots,
        delta,
        rope_theta=rope_theta,
        head_dim=head_dim,
        layout=layout,
        rotary_dim=rotary_dim,
        interleaved=interleaved,
        mrope_section=mrope_section,
        mrope_interleaved=mrope_interleaved,
    )


def relocate_spans(
    keys: Any,
    values: Any,
    spans: Any,
    *,
    rope_theta: float,
    head_dim: int,
    delta: Any = None,
    old_positions: Any = None,
    new_positions: Any = None,
    length: int | None = None,
    rotary_dim: int | None = None,
    interleaved: bool = False,
    mrope_section: Sequence[int] | None = None,
    mrope_interleaved: bool = False,
) -> int:
    """Evict several spans (e.g. every image block) from every layer in one pass.

    ``spans``: ``(start, end)`` pairs (a sequence of 2-tuples or an int array ``[k, 2]``),
    sorted and disjoint (``end`` of one <= ``start`` of the next; adjacent and empty spans
    allowed), each inside ``length``. ``keys`` and ``values`` as for ``relocate_span``, modified
    in place: every entry from ``spans[0][0]`` to ``length`` that lies in no span moves down to
    close the gaps, order kept, and each moved key is re-rotated to its new position. The same
    result as ``relocate_span`` once per span from the last to the first, with each entry rotated
    once by its total delta. No spans: nothing is touched.

    The moved entries' deltas (``n`` of them: the entries from ``spans[0][0]`` on outside the
    spans), one of:

    - ``delta``: int, ``[n]`` or ``[n, 3]`` (t, h, w);
    - ``old_positions`` and ``new_positions``: their position ids before and after, ``[n]`` or,
      for M-RoPE, ``[3, n]`` as transformers lays position ids out;
    - neither (plain RoPE only): each entry moves back by the number of evicted entries before it.

    ``length``: valid entries (default ``seq``). Returns the new valid length ``length`` minus the
    evicted entries.

    Raises:
        ValueError: ``spans`` unsorted, overlapping, a span with ``start > end`` or rows that are
            not pairs; shapes, deltas as for ``relocate_span``.
        IndexError: a span outside ``[0, length]``; ``length`` above ``seq``.
        TypeError: ``spans`` not integer pairs.
    """
    return _native.relocate_spans(
        keys,
        values,
        spans,
        rope_theta=rope_theta,
        head_dim=head_dim,
        delta=delta,
        old_positions=old_positions,
        new_positions=new_positions,
        length=length,
        rotary_dim=rotary_dim,
        interleaved=interleaved,
        mrope_section=mrope_section,
        mrope_interleaved=mrope_interleaved,
    )


__all__ += ["relocate_spans"]
