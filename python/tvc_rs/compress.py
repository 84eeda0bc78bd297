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

from typing import Any, NamedTuple, Optional, Sequence, Tuple, Union

from tvc_rs import _native
from tvc_rs._tensor import like

__all__ = ["Pooled", "Pruned", "pool_visual_tokens", "visual_token_scores", "select_tokens", "prune_visual_tokens"]

Array = Any  # numpy.ndarray or torch.Tensor
Grids = Union[Array, Sequence[Sequence[int]]]


class Pooled(NamedTuple):
    """Result of :func:`pool_visual_tokens`."""

    tokens: Array
    """``[new_tokens, dim]``, same dtype as ``x``, row-major on the new grids."""
    grid_thw: Array
    """``[n, 3]`` int64: ``(t, ceil(h / kh), ceil(w / kw))`` per input grid; host data (a CPU
    tensor for CUDA input)."""


class Pruned(NamedTuple):
    """Result of :func:`prune_visual_tokens`."""

    tokens: Array
    """``[kept, dim]``, same dtype as ``x``, in their original order."""
    indices: Array
    """``[kept]`` int64, sorted: the rows of ``x`` that were kept."""
    positions: Optional[Array]
    """``[kept, 3]`` int64 ``(t, h, w)`` cell of each kept token within its own grid (for
    M-RoPE positions of a pruned image), or ``None`` without ``grid_thw``."""


def pool_visual_tokens(x: Array, grid_thw: Grids, factor: Union[int, Tuple[int, int]] = 4) -> Pooled:
    """Average-pool visual tokens with ``kh x kw`` windows inside each frame of their grids.

    Args:
        x: ``[tokens, dim]`` float32 / float16 / bfloat16, the tokens of every grid one after
            the other. Any strides: rows are read in place when the last axis is contiguous
            (slices such as ``x[a:b]``, ``x[:, :k]``, ``x[::2]``), other layouts are copied first.
        grid_thw: ``[n, 3]`` int array or a list of ``(t, h, w)``: the grids of the tokens in
            ``x`` (after the 2x2 merge in Qwen2-VL terms); ``sum(t * h * w)`` must equal
            ``tokens``, every dimension ``>= 1``.
        factor: ``k`` (``k x k`` windows) or ``(kh, kw)``, each ``>= 1``. TVC uses 4.

    Returns:
        ``Pooled(tokens, grid_thw)``: an ``h x w`` grid becomes ``ceil(h/kh) x ceil(w/kw)``;
        windows at the bottom / right edge average only the cells they cover. Frames (``t``)
        are pooled separately. Outputs are of the kind of ``x`` (NumPy or torch).

    Raises:
        ValueError: bad ``factor`` (0, negative), grids that are not ``[n, 3]``, with a
            dimension < 1 or whose tokens do not add up to ``tokens``; ``x`` not 2-D.
        TypeError: ``x`` not an array, or of another dtype.
    """
    tokens, grids = _native.pool_visual_tokens(x, grid_thw, factor)
    return Pooled(like(tokens, x), like(grids, x))


def visual_token_scores(
    query: Array,
    keys: Array,
    *,
    lse: Optional[Array] = None,
    scale: Optional[float] = None,
) -> Array:
    """FastV / PyramidDrop-style importance of each visual token (attention it receives).

    ``p[q, h, :] = softmax(scale * query[q, h] . keys[:, h // (q_heads // kv_heads)])`` over
    the visual keys (grouped-query attention), averaged over heads and query rows.

    Args:
        query: ``[q_tokens, q_heads, head_dim]``, e.g. the last text tokens' queries at one
            layer (after RoPE, as the attention saw them). ``q_tokens >= 1``.
        keys: ``[k_tokens, kv_heads, head_dim]``, the visual tokens' keys at the same layer,
            same dtype as ``query``; ``q_heads`` must be a multiple of ``kv_heads``. A
            ``[kv_heads, seq, head_dim]`` cache slice ``k[:, a:b].transpose(0, 1)`` is read in
            place (any strides with a contiguous last axis; other layouts are copied).
        lse: optional ``[q_tokens, q_heads]`` natural log-sum-exp of the *full* scaled attention
            rows (flash-attention's ``softmax_lse`` is ``[heads, tokens]``: pass its transpose).
            Then ``p = exp(scale * q . k - lse)``: the share of the whole attention row that
            goes to each visual token, not a softmax over the visual keys alone.
        scale: softmax scale, default ``1 / sqrt(head_dim)``.

    Returns:
        ``[k_tokens]`` float32 (NumPy or torch, as ``query``). All keys given are scored in one
        softmax; to score several images separately, call once per image.

    Raises:
        ValueError: wrong ranks, mismatched head_dim, q_heads not a multiple of kv_heads,
            no query rows, ``lse`` of the wrong shape.
        TypeError: non-float dtypes, or ``keys`` of another dtype than ``query``.
    """
    return like(_native.visual_token_scores(query, keys, lse, scale), query)


def select_tokens(
    scores: Array,
    keep: Optional[int] = None,
    ratio: Optional[float] = None,
    mass: Optional[float] = None,
    min_keep: int = 1,
    max_keep: Optional[int] = None,
) -> Array:
    """Sorted indices of the tokens to keep, by score (give exactly one of keep / ratio / mass).

    - ``keep=n``: the ``n`` highest scores;
    - ``ratio=r`` (in [0, 1]): ``round(r * tokens)`` of them, halves rounded up;
    - ``mass=m`` (in [0, 1], "dynamic"): the fewest highest-scoring tokens whose scores sum to
      at least ``m`` times the total (scores must be finite and non-negative).

    The count is clamped to ``[min_keep, max_keep]``, then to ``tokens``. Ties break towards the
    lower index, so the result is deterministic.

    Args:
        scores: ``[tokens]`` float (any strides).

    Returns:
        ``[kept]`` int64 indices in increasing order (NumPy or torch, as ``scores``).

    Raises:
        ValueError: NaN scores (negative or infinite ones with ``mass``), none or several of
            keep / ratio / mass, a share outside [0, 1], ``min_keep > max_keep``.
    """
    return like(_native.select_tokens(scores, keep, ratio, mass, min_keep, max_keep), scores)


def prune_visual_tokens(
    x: Array,
    indices: Optional[Union[Array, Sequence[int]]] = None,
    *,
    scores: Optional[Array] = None,
    keep: Optional[int] = None,
    ratio: Optional[float] = None,
    mass: Optional[float] = None,
    min_keep: int = 1,
    max_keep: Optional[int] = None,
    grid_thw: Optional[Grids] = None,
    merge: bool = False,
) -> Pruned:
    """Keep a subset of visual tokens, optionally merging the dropped ones into the kept ones.

    Args:
        x: ``[tokens, dim]`` float32 / float16 / bfloat16 (any strides, as in
            :func:`pool_visual_tokens`).
        indices: the rows to keep, int array or list, unique and sorted increasingly. Or
            leave it out and give ``scores`` (``[tokens]``) with one of ``keep`` / ``ratio`` /
            ``mass`` (and ``min_keep`` / ``max_keep``) to select them as :func:`select_tokens`.
            Several images in ``x`` are selected from together.
        grid_thw: optional grids of the tokens (as in :func:`pool_visual_tokens`): then each
            kept token's ``(t, h, w)`` cell within its own grid is returned as ``positions``.
        merge: average each dropped token into its most similar kept token (cosine similarity,
            ties to the lower index), ToMe-style: a kept token becomes the mean of itself and
            the tokens merged into it.

    Returns:
        ``Pruned(tokens, indices, positions)``; outputs are of the kind of ``x``.

    Raises:
        IndexError: an index out of range. ValueError: duplicated or unsorted indices, both or
        neither of indices / scores, ``scores`` of the wrong length, bad grids. TypeError:
        wrong dtypes.
    """
    tokens, kept, positions = _native.prune_visual_tokens(
        x,
        indices,
        scores=scores,
        keep=keep,
        ratio=ratio,
        mass=mass,
        min_keep=min_keep,
        max_keep=max_keep,
        grid_thw=grid_thw,
        merge=merge,
    )
    return Pruned(like(tokens, x), like(kept, x), None if positions is None else like(positions, x))
