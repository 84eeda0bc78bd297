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
    and every later key is re-rotated in place (``tvc_rs.relocate_spans``, one pass) to the position
    ``relocate`` gives it; then ``bridge + compressed image`` are prefilled on top. Keys and
    positions equal ``relocate``'s; values (and keys past layer 0) still carry what the tokens
    saw of the first image, so this approximates ``relocate`` at a fraction of its cost.

Layout of a calibration (all modes): ``... <token that confirmed the hit>`` + ``tokenizer(sep +
bridge)`` + per image ``<|vision_start|> <|image_pad|> * n <|vision_end|>``, where ``sep`` is one
space unless the bridge starts with whitespace or the answer's text so far (special tokens
skipped) ends with it or is empty: ``tvc_rs.pvc.bridge_text``, the vLLM driver's rule too.
Generation continues right after ``<|vision_end|>``.

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

Tensors stay on the model's device: pooling, scores, pruning and the cache moves are tvc-rs calls
on the model's own tensors, run by the CPU kernels (float32 / float16 / bfloat16; float64 models'
caches computed in float32, their features cast to float32 for compression) or by the CUDA kernels
of kernels/*.cu (float32 / float16 / bfloat16; ``kv`` mode with a float64 model on a GPU is
refused up front). Only the kept cells' indices go to the host, for the layout.
"""

# The driver is split by concern (tvc_rs.hf.model, .inputs, .session, .generation, .diagnostics);
# this module is its public face. Importing it loads no torch or transformers.
from tvc_rs.hf.diagnostics import (
    ATTENTION_CSV_COLUMNS,
    AttentionCurve,
    plot_attention_curves,
    visual_attention_curve,
    write_attention_csv,
)
from tvc_rs.hf.generation import PVCResult, PVCSession, generate
from tvc_rs.hf.model import SUPPORTED_MODEL_TYPES
from tvc_rs.hf.session import CalibrationRecord, _Image  # noqa: F401 (_Image: tests look at session.blocks)

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
