"""Visual-token compression: pooling, attention scores, selection, pruning (Rust: src/compress).

Every function takes NumPy arrays or torch CPU tensors (read in place through DLPack, no copy)
and returns the same kind: torch tensors for torch inputs, NumPy arrays otherwise (also without
a copy). Data may be float32, float16 or bfloat16 (bfloat16 needs torch: NumPy has no bfloat16);
arithmetic is done in float32. Indices and grids are int64. Nothing is modified in place.

Visual tokens are the rows of ``x`` ``[tokens, dim]``: one or several images (or videos) one
after the other, each laid out row-major on its ``(t, h, w)`` grid. These are the grids of the
tokens in ``x``, i.e. in Qwen2-VL terms ``image_grid_thw`` with ``h`` and ``w`` divided by the
2x2 spatial merge (``spatial_merge_size``): a 36 x 36 merged grid for a 1008 x 1008 image.

torch CUDA tensors run on the GPU (kernels/compress.cu, see ``tvc_rs.cuda``) with the same
arguments and results, as torch tensors on the input's device, queued on the current stream.
Grids and given indices are host data (copied to the host first when passed as CUDA tensors);
the grids :func:`pool_visual_tokens` returns are host data too (a CPU int64 tensor for CUDA
input), so reading them costs no synchronisation. Pruned ``positions`` stay on the input's device.
Mass selection waits for the GPU once (its output size depends on the scores); top-k does not,
and so does not check the scores for NaN on the GPU (NaN ranks lowest there). Tensors that
require grad must be detached first (DLPack cannot export them).
"""

from __future__ import annotations

# The functions and result types are the native ones (documented there: help(pool_visual_tokens)).
from tvc_rs._native import Pooled as Pooled
from tvc_rs._native import Pruned as Pruned
from tvc_rs._native import pool_visual_tokens as pool_visual_tokens
from tvc_rs._native import prune_visual_tokens as prune_visual_tokens
from tvc_rs._native import select_tokens as select_tokens
from tvc_rs._native import visual_token_scores as visual_token_scores

__all__ = ["Pooled", "Pruned", "pool_visual_tokens", "visual_token_scores", "select_tokens", "prune_visual_tokens"]
