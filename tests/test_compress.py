"""Visual-token compression against independent float64 references (NumPy / PyTorch) on fresh
random inputs: pooling by explicit window loops and torch ``avg_pool2d``, scores by a float64
torch softmax, selection by a full sort, pruning / merging by direct loops. Every dtype (f16 /
bf16 compared with the reference computed from the same rounded inputs), NumPy and torch in and
out, strided views, several images per call, empty inputs, and bad input."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import tvc_rs
from tvc_rs import pool_visual_tokens, prune_visual_tokens, select_tokens, visual_token_scores

# (kind, dtype): every dtype each library can hold (NumPy has no bfloat16).
CASES = [
    ("numpy", np.float32),
    ("numpy", np.float16),
    ("torch", torch.float32),
    ("torch", torch.float16),
    ("torch", torch.bfloat16),
]
CASE_IDS = ["np-f32", "np-f16", "torch-f32", "torch-f16", "torch-bf16"]
# Relative tolerance of a result stored in the dtype (its rounding), computed in f32.
TOLERANCE = {"float32": 1e-5, "float16": 2e-3, "bfloat16": 1.6e-2}


def dtype_name(dtype) -> str:
    return str(dtype).removeprefix("torch.") if isinstance(dtype, torch.dtype) else np.dtype(dtype).name


def make(values: np.ndarray, kind: str, dtype):
    """``values`` rounded to ``dtype`` as the given kind of array."""
    if kind == "numpy":
        return values.astype(dtype)
    return torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32)).to(dtype)


def to64(a) -> np.ndarray:
    """Exact float64 copy of a NumPy array or torch tensor (of any dtype)."""
    if isinstance(a, torch.Tensor):
        return a.detach().to(torch.float64).numpy()
    return np.asarray(a, dtype=np.float64)


def assert_kind(out, kind: str, dtype=None):
    if kind == "torch":
        assert isinstance(out, torch.Tensor)
    else:
        assert isinstance(out, np.ndarray)
    if dtype is not None:
        assert dtype_name(out.dtype) == dtype_name(dtype)


def assert_close(got, want: np.ndarray, dtype):
    tol = TOLERANCE[dtype_name(dtype)]
    np.testing.assert_allclose(to64(got), want, rtol=tol, atol=tol * max(1.0, float(np.abs(want).max(initial=0))))


def rng(seed: int) -> np.random.Generator:
    return np.random.default_rng(seed)


# ---------------------------------------------------------------- references


def pool_reference(x: np.ndarray, grids, kh: int, kw: int) -> tuple[np.ndarray, np.ndarray]:
    """Average pooling by explicit loops over every window of every frame (float64)."""
    out, new_grids, start = [], [], 0
    for t, h, w in grids:
        frames = x[start : start + t * h * w].reshape(t, h, w, x.shape[1])
        for f in range(t):
            for r0 in range(0, h, kh):
                for c0 in range(0, w, kw):
                    out.append(frames[f, r0 : r0 + kh, c0 : c0 + kw].mean(axis=(0, 1)))
        new_grids.append((t, math.ceil(h / kh), math.ceil(w / kw)))
        start += t * h * w
    pooled = np.stack(out) if out else np.zeros((0, x.shape[1]))
    return pooled, np.array(new_grids, dtype=np.int64).reshape(-1, 3)


def scores_reference(q: np.ndarray, k: np.ndarray, lse: np.ndarray | None, scale: float) -> np.ndarray:
    """torch float64: logits of every (query row, head) over the keys, GQA by repeating kv heads."""
    qt, kt = torch.from_numpy(q), torch.from_numpy(k)
    group = q.shape[1] // k.shape[1]
    logits = torch.einsum("qhd,khd->qhk", qt, kt.repeat_interleave(group, dim=1)) * scale
    if lse is None:
        probs = torch.softmax(logits, dim=-1)
    else:
        probs = torch.exp(logits - torch.from_numpy(lse)[..., None])
    return probs.mean(dim=(0, 1)).numpy()


def select_reference(scores: np.ndarray, keep=None, ratio=None, mass=None, min_keep=1, max_keep=None) -> np.ndarray:
    order = sorted(range(len(scores)), key=lambda i: (-float(scores[i]), i))
    if keep is not None:
        n = keep
    elif ratio is not None:
        n = int(math.floor(ratio * len(scores) + 0.5))
    else:
        total = 0.0
        for i in order:
            total += float(scores[i])
        n, running = 0, 0.0
        while n < len(order) and running < mass * total:
            running += float(scores[order[n]])
            n += 1
    n = min(max(n, min_keep), max_keep if max_keep is not None else len(scores), len(scores))
    return np.array(sorted(order[:n]), dtype=np.int64)


def merge_reference(x: np.ndarray, kept: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """ToMe-style merge by direct loops; also returns each dropped token's top-2 similarity gap."""
    norms = np.maximum(np.linalg.norm(x, axis=1), 1e-12)
    unit = x / norms[:, None]
    sums = x[kept].copy()
    sizes = np.ones(len(kept))
    gaps = []
    for j in sorted(set(range(len(x))) - set(kept.tolist())):
        sims = unit[kept] @ unit[j]
        best = int(np.argmax(sims))  # first maximum: the lower kept index
        if len(sims) > 1:
            gaps.append(np.sort(sims)[-1] - np.sort(sims)[-2])
        sums[best] += x[j]
        sizes[best] += 1
    return sums / sizes[:, None], np.array(gaps)


def cells_reference(grids, indices) -> np.ndarray:
    cells = []
    for t, h, w in grids:
        cells += [(f, r, c) for f in range(t) for r in range(h) for c in range(w)]
    return np.array([cells[i] for i in indices], dtype=np.int64).reshape(-1, 3)


# ---------------------------------------------------------------- pooling


@pytest.mark.parametrize(("kind", "dtype"), CASES, ids=CASE_IDS)
@pytest.mark.parametrize("factor", [1, 2, 3, 4, (2, 3), (5, 1)])
def test_pool_matches_window_loops(kind, dtype, factor):
    grids = [(1, 9, 7), (2, 5, 6), (1, 1, 1), (1, 36, 36)]
    tokens = sum(t * h * w for t, h, w in grids)
    x = make(rng(1).standard_normal((tokens, 24)), kind, dtype)
    pooled, new_grids = pool_visual_tokens(x, grids, factor)
    kh, kw = (factor, factor) if isinstance(factor, int) else factor
    want, want_grids = pool_reference(to64(x), grids, kh, kw)
    assert_kind(pooled, kind, dtype)
    assert_kind(new_grids, kind)
    assert dtype_name(new_grids.dtype) == "int64"
    assert tuple(pooled.shape) == want.shape
    assert_close(pooled, want, dtype)
    np.testing.assert_array_equal(to64(new_grids), want_grids)


@pytest.mark.parametrize("k", [2, 4])
def test_pool_matches_torch_avg_pool2d(k):
    """Edge windows average only the cells they cover, as avg_pool2d(ceil_mode, no pad count)."""
    h, w, dim = 13, 10, 8
    x = torch.from_numpy(rng(2).standard_normal((h * w, dim)))
    want = F.avg_pool2d(
        x.view(1, h, w, dim).permute(0, 3, 1, 2), k, ceil_mode=True, count_include_pad=False
    ).permute(0, 2, 3, 1).reshape(-1, dim)
    pooled, grid = pool_visual_tokens(x.float(), torch.tensor([[1, h, w]]), k)
    torch.testing.assert_close(pooled.double(), want, rtol=1e-6, atol=1e-6)
    assert grid.tolist() == [[1, math.ceil(h / k), math.ceil(w / k)]]


@settings(max_examples=60, deadline=None)
@given(
    grids=st.lists(st.tuples(st.integers(1, 3), st.integers(1, 11), st.integers(1, 11)), min_size=0, max_size=4),
    dim=st.integers(0, 17),
    kh=st.integers(1, 6),
    kw=st.integers(1, 6),
    seed=st.integers(0, 2**32 - 1),
    case=st.sampled_from(CASES),
)
def test_pool_property(grids, dim, kh, kw, seed, case):
    kind, dtype = case
    tokens = sum(t * h * w for t, h, w in grids)
    x = make(rng(seed).standard_normal((tokens, dim)), kind, dtype)
    pooled, new_grids = pool_visual_tokens(x, grids, (kh, kw))
    want, want_grids = pool_reference(to64(x), grids, kh, kw)
    assert tuple(pooled.shape) == want.shape
    assert_close(pooled, want, dtype)
    np.testing.assert_array_equal(to64(new_grids), want_grids)


@pytest.mark.parametrize("layout", ["transposed", "row-step", "column-slice", "reversed"])
@pytest.mark.parametrize("kind", ["numpy", "torch"])
def test_pool_strided_inputs(layout, kind):
    """Strided views are handled: rows read in place where the last axis is contiguous, copied otherwise."""
    grids = [(1, 6, 5), (1, 3, 3)]
    tokens = 39
    base = rng(3).standard_normal((tokens * 2, 20)).astype(np.float32)
    base = torch.from_numpy(base) if kind == "torch" else base
    views = {
        "transposed": (base[:tokens].T.copy() if kind == "numpy" else base[:tokens].T.contiguous()).T,
        "row-step": base[::2],
        "column-slice": base[:tokens, 3:15],
        "reversed": base[:tokens].flip(0) if kind == "torch" else base[:tokens][::-1],
    }
    x = views[layout]
    pooled, _ = pool_visual_tokens(x, grids, 2)
    want, _ = pool_reference(to64(x), grids, 2, 2)
    assert_close(pooled, want, np.float32)


def test_pool_grid_thw_kinds():
    """grid_thw as list of tuples, NumPy int32/int64 or torch int64: the same result."""
    x = torch.randn(20, 4)
    results = [
        pool_visual_tokens(x, grid, 2)
        for grid in ([(1, 4, 5)], [[1, 4, 5]], np.array([[1, 4, 5]], np.int32), torch.tensor([[1, 4, 5]]))
    ]
    for pooled, grid in results:
        assert torch.equal(pooled, results[0][0]) and grid.tolist() == [[1, 2, 3]]


def test_readonly_numpy_inputs_are_read():
    x = rng(4).standard_normal((12, 6)).astype(np.float32)
    x.flags.writeable = False
    pooled, _ = pool_visual_tokens(x, [(1, 3, 4)], 2)
    assert_close(pooled, pool_reference(x.astype(np.float64), [(1, 3, 4)], 2, 2)[0], np.float32)
    np.testing.assert_array_equal(prune_visual_tokens(x, [1, 5]).tokens, x[[1, 5]])


def test_pool_empty():
    pooled, grids = pool_visual_tokens(np.zeros((0, 8), np.float32), [], 4)
    assert pooled.shape == (0, 8) and grids.shape == (0, 3)
    pooled, grids = pool_visual_tokens(torch.zeros(0, 8), np.zeros((0, 3), np.int64), 2)
    assert tuple(pooled.shape) == (0, 8) and isinstance(pooled, torch.Tensor)


# ---------------------------------------------------------------- scores


def make_qk(seed, q_tokens, q_heads, kv_heads, k_tokens, head_dim):
    r = rng(seed)
    return (
        r.standard_normal((q_tokens, q_heads, head_dim)) * 2,
        r.standard_normal((k_tokens, kv_heads, head_dim)) * 2,
    )


@pytest.mark.parametrize(("kind", "dtype"), CASES, ids=CASE_IDS)
@pytest.mark.parametrize("group", [1, 2, 3, 4, 5, 6, 7, 8])
@pytest.mark.parametrize("with_lse", [False, True])
def test_scores_match_torch_softmax(kind, dtype, group, with_lse):
    kv_heads, q_tokens, k_tokens, head_dim = 2, 3, 37, 16
    q, k = make_qk(group, q_tokens, kv_heads * group, kv_heads, k_tokens, head_dim)
    q, k = make(q, kind, dtype), make(k, kind, dtype)
    scale = 1 / math.sqrt(head_dim)
    lse = None
    if with_lse:
        # The full rows attend to 11 more (text) keys besides the visual ones.
        extra = rng(99).standard_normal((11, kv_heads, head_dim)) * 2
        full = np.concatenate([to64(k), extra])
        logits = torch.einsum(
            "qhd,khd->qhk", torch.from_numpy(to64(q)), torch.from_numpy(full).repeat_interleave(group, dim=1)
        ) * scale
        lse = torch.logsumexp(logits, dim=-1).numpy().astype(np.float32)
        lse_arg = torch.from_numpy(lse) if kind == "torch" else lse
    got = visual_token_scores(q, k, lse=lse_arg if with_lse else None)
    assert_kind(got, kind, np.float32 if kind == "numpy" else torch.float32)
    want = scores_reference(to64(q), to64(k), None if lse is None else lse.astype(np.float64), scale)
    np.testing.assert_allclose(to64(got), want, rtol=2e-5, atol=1e-7)
    if not with_lse:
        assert abs(float(to64(got).sum()) - 1) < 1e-5
    else:
        assert float(to64(got).sum()) < 1  # the text keys take a share of each row


@settings(max_examples=50, deadline=None)
@given(
    q_tokens=st.integers(1, 4),
    kv_heads=st.integers(1, 3),
    group=st.integers(1, 8),
    k_tokens=st.integers(0, 50),
    head_dim=st.integers(1, 40),
    scale=st.one_of(st.none(), st.floats(0.01, 2.0)),
    seed=st.integers(0, 2**32 - 1),
    case=st.sampled_from(CASES),
)
def test_scores_property(q_tokens, kv_heads, group, k_tokens, head_dim, scale, seed, case):
    kind, dtype = case
    q, k = make_qk(seed, q_tokens, kv_heads * group, kv_heads, k_tokens, head_dim)
    q, k = make(q, kind, dtype), make(k, kind, dtype)
    got = visual_token_scores(q, k, scale=scale)
    want = scores_reference(to64(q), to64(k), None, scale if scale is not None else 1 / math.sqrt(head_dim))
    assert got.shape[0] == k_tokens
    np.testing.assert_allclose(to64(got), want, rtol=2e-5, atol=1e-7)


def test_scores_read_cache_layout_views():
    """Keys sliced out of a [kv_heads, seq, head_dim] cache and transposed are read in place; a
    fully transposed query is copied; both give the reference result."""
    cache = torch.randn(4, 300, 64)
    keys = cache[:, 40:240].transpose(0, 1)  # [200, 4, 64], strides (64, 19200, 1)
    q_base = torch.randn(64, 28, 5)
    query = q_base.permute(2, 1, 0)  # [5, 28, 64] with a non-contiguous last axis
    got = visual_token_scores(query, keys)
    want = scores_reference(to64(query), to64(keys), None, 1 / 8)
    np.testing.assert_allclose(got.numpy(), want, rtol=2e-5, atol=1e-7)
    lse = torch.randn(28, 5).abs() + 5  # a [heads, tokens] lse passed transposed
    got = visual_token_scores(query, keys, lse=lse.T)
    want = scores_reference(to64(query), to64(keys), lse.T.double().numpy(), 1 / 8)
    np.testing.assert_allclose(got.numpy(), want, rtol=2e-5, atol=1e-9)


# ---------------------------------------------------------------- selection


@settings(max_examples=300, deadline=None)
@given(
    scores=st.lists(st.one_of(st.sampled_from([0.0, 0.25, 0.5, 1.0]), st.floats(0, 10, width=32)), max_size=80),
    rule=st.sampled_from(["keep", "ratio", "mass"]),
    amount=st.floats(0, 1),
    keep=st.integers(0, 90),
    min_keep=st.integers(0, 4),
    extra=st.one_of(st.none(), st.integers(0, 30)),
    kind=st.sampled_from(["numpy", "torch"]),
)
def test_select_matches_a_sorted_reference(scores, rule, amount, keep, min_keep, extra, kind):
    s = np.array(scores, dtype=np.float32)
    max_keep = None if extra is None else min_keep + extra
    args = {"keep": keep} if rule == "keep" else {rule: amount}
    arg = torch.from_numpy(s) if kind == "torch" else s
    got = select_tokens(arg, min_keep=min_keep, max_keep=max_keep, **args)
    assert_kind(got, kind)
    assert dtype_name(got.dtype) == "int64"
    want = select_reference(s, min_keep=min_keep, max_keep=max_keep, **args)
    np.testing.assert_array_equal(to64(got).astype(np.int64), want)


def test_select_ties_go_to_the_lower_index_and_repeat():
    s = np.array([1, 3, 3, 2, 3, 3, 0], np.float32)
    assert select_tokens(s, keep=3).tolist() == [1, 2, 4]
    for _ in range(5):
        assert select_tokens(s, keep=3).tolist() == [1, 2, 4]


def test_select_ratio_rounding_and_dynamic_mass():
    s = np.ones(30, np.float32)
    assert len(select_tokens(s, ratio=0.1)) == 3  # 0.1 * 30 = 3.0000000000000004
    assert len(select_tokens(np.ones(5, np.float32), ratio=0.5)) == 3  # 2.5 rounds up
    s = np.array([0.5, 0.1, 0.3, 0.1], np.float32)
    assert select_tokens(s, mass=0.8).tolist() == [0, 2]
    assert select_tokens(s, mass=0.81).tolist() == [0, 1, 2]
    assert select_tokens(s, mass=0.0).tolist() == [0]  # min_keep
    assert select_tokens(s, mass=0.0, min_keep=0).tolist() == []
    assert select_tokens(s, mass=1.0, max_keep=2).tolist() == [0, 2]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_select_from_half_scores(dtype):
    s = torch.rand(100).to(dtype)
    got = select_tokens(s, keep=10)
    want = select_reference(s.float().numpy(), keep=10)
    assert got.tolist() == want.tolist()


def test_select_strided_and_empty():
    s = np.random.default_rng(5).random(40).astype(np.float32)
    np.testing.assert_array_equal(select_tokens(s[::-3], keep=5), select_reference(s[::-3], keep=5))
    assert select_tokens(np.zeros(0, np.float32), keep=3).shape == (0,)


# ---------------------------------------------------------------- pruning and merging


@pytest.mark.parametrize(("kind", "dtype"), CASES, ids=CASE_IDS)
@pytest.mark.parametrize("merge", [False, True])
def test_prune_matches_direct_loops(kind, dtype, merge):
    grids = [(1, 7, 9), (2, 4, 5)]
    tokens = 103
    x = make(rng(7).standard_normal((tokens, 48)), kind, dtype)
    scores = rng(8).random(tokens).astype(np.float32)
    scores_arg = torch.from_numpy(scores) if kind == "torch" else scores
    result = prune_visual_tokens(x, scores=scores_arg, ratio=0.25, grid_thw=grids, merge=merge)
    want_idx = select_reference(scores, ratio=0.25)
    for out in result:
        assert_kind(out, kind)
    assert_kind(result.tokens, kind, dtype)
    np.testing.assert_array_equal(to64(result.indices), want_idx)
    x64 = to64(x)
    if merge:
        want, gaps = merge_reference(x64, want_idx)
        assert gaps.min() > 1e-4  # no near-ties that f32 rounding could flip (fixed seed)
    else:
        want = x64[want_idx]
    assert_close(result.tokens, want, dtype)
    np.testing.assert_array_equal(to64(result.positions), cells_reference(grids, want_idx))


@settings(max_examples=60, deadline=None)
@given(
    tokens=st.integers(0, 60),
    dim=st.integers(1, 40),
    density=st.floats(0, 1),
    merge=st.booleans(),
    seed=st.integers(0, 2**32 - 1),
    case=st.sampled_from(CASES),
)
def test_prune_property(tokens, dim, density, merge, seed, case):
    kind, dtype = case
    r = rng(seed)
    x = make(r.standard_normal((tokens, dim)), kind, dtype)
    indices = np.flatnonzero(r.random(tokens) < density).astype(np.int64)
    x64 = to64(x)
    if merge and len(indices):
        want, gaps = merge_reference(x64, indices)
        assume(len(gaps) == 0 or gaps.min() > 1e-3)
    else:
        want = x64[indices]
    result = prune_visual_tokens(x, indices if kind == "numpy" else torch.from_numpy(indices), merge=merge)
    assert tuple(result.tokens.shape) == (len(indices), dim)
    assert_close(result.tokens, want, dtype)
    np.testing.assert_array_equal(to64(result.indices), indices)
    assert result.positions is None


def test_prune_strided_inputs_and_index_kinds():
    base = torch.randn(50, 33)
    for x in (base[::2], base[:, 1:30], base.T.contiguous().T, base.flip(0)):
        for indices in ([0, 3, 4, 20], np.array([0, 3, 4, 20], np.int32), torch.tensor([0, 3, 4, 20])):
            result = prune_visual_tokens(x, indices)
            assert torch.equal(result.tokens, x[[0, 3, 4, 20]])
        merged = prune_visual_tokens(x, [0, 3, 4, 20], merge=True).tokens
        want, _ = merge_reference(x.double().numpy(), np.array([0, 3, 4, 20]))
        np.testing.assert_allclose(merged.double().numpy(), want, rtol=1e-5, atol=1e-5)


def test_prune_positions_for_videos_and_several_images():
    grids = torch.tensor([[2, 3, 4], [1, 5, 2]])
    x = torch.randn(34, 6)
    indices = [0, 5, 11, 12, 23, 24, 33]
    result = prune_visual_tokens(x, indices, grid_thw=grids)
    assert result.positions.tolist() == cells_reference(grids.tolist(), indices).tolist()


def test_prune_edge_cases():
    x = np.random.default_rng(0).standard_normal((6, 4)).astype(np.float32)
    empty = prune_visual_tokens(x, [], merge=True)
    assert empty.tokens.shape == (0, 4) and empty.indices.shape == (0,)
    everything = prune_visual_tokens(x, list(range(6)), merge=True)
    np.testing.assert_array_equal(everything.tokens, x)
    nothing = prune_visual_tokens(np.zeros((0, 4), np.float32), scores=np.zeros(0, np.float32), keep=3)
    assert nothing.tokens.shape == (0, 4)
    # A zero vector is merged into the first kept token (all similarities 0).
    x[5] = 0
    merged = prune_visual_tokens(x, [0, 2], merge=True).tokens
    want, _ = merge_reference(x.astype(np.float64), np.array([0, 2]))
    np.testing.assert_allclose(merged, want, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- bad input


def unchanged(*arrays):
    """Copies to compare against after a call: inputs must never be modified."""
    return [a.clone() if isinstance(a, torch.Tensor) else a.copy() for a in arrays]


def assert_same(before, after):
    for b, a in zip(before, after):
        assert (torch.equal(b, a) if isinstance(a, torch.Tensor) else np.array_equal(b, a))


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (lambda x, s: pool_visual_tokens(x, [(1, 6, 7)], 0), ValueError, "^" + re.escape("factor: ") + ".*" + re.escape(" got 0")),
        (lambda x, s: pool_visual_tokens(x, [(1, 6, 7)], (2, -1)), ValueError, "^" + re.escape("factor:")),
        (lambda x, s: pool_visual_tokens(x, [(1, 6, 7)], "2"), ValueError, "^" + re.escape("factor:")),
        (lambda x, s: pool_visual_tokens(x, [(1, 6, 6)], 2), ValueError, "^" + re.escape("grid_thw: the grids hold 36 tokens ") + ".*" + re.escape(" x has 42 rows")),
        (lambda x, s: pool_visual_tokens(x, [(1, 6, 7), (1, 0, 3)], 2), ValueError, "^" + re.escape("grid_thw[1] = (1, 0, 3): every grid dimension must be >= 1")),
        (lambda x, s: pool_visual_tokens(x, [(1, 6)], 2), ValueError, "^" + re.escape("grid_thw[0] has 2 entries")),
        (lambda x, s: pool_visual_tokens(x, np.array([1, 6, 7]), 2), ValueError, "^" + re.escape("grid_thw: expected a 2-D tensor")),
        (lambda x, s: pool_visual_tokens(x, np.array([[1.0, 6, 7]]), 2), TypeError, "^" + re.escape("grid_thw: expected an integer dtype (int32, int64 or another int/uint), got float64")),
        (lambda x, s: pool_visual_tokens(x, "grid", 2), TypeError, "^" + re.escape("grid_thw: expected")),
        (lambda x, s: pool_visual_tokens(x[None], [(1, 6, 7)], 2), ValueError, "^" + re.escape("x: expected a 2-D tensor [tokens, dim], got shape (1, 42, 5)")),
        (lambda x, s: pool_visual_tokens(x.astype(np.float64), [(1, 6, 7)], 2), TypeError, "^" + re.escape("x: expected dtype float32, float16 or bfloat16, got float64")),
        (lambda x, s: pool_visual_tokens(x.tolist(), [(1, 6, 7)], 2), TypeError, "^" + re.escape("x: expected a NumPy array or a torch tensor")),
        (lambda x, s: prune_visual_tokens(x, [0, 42]), IndexError, "^" + re.escape("indices[1] = 42 is out of range for 42 tokens")),
        (lambda x, s: prune_visual_tokens(x, [-1]), IndexError, "^" + re.escape("indices[0] = -1 is out of range")),
        (lambda x, s: prune_visual_tokens(x, [3, 3]), ValueError, "^" + re.escape("indices[1] = 3 repeats indices[0]")),
        (lambda x, s: prune_visual_tokens(x, [4, 3]), ValueError, "^" + re.escape("indices must be sorted")),
        (lambda x, s: prune_visual_tokens(x, np.array([[1, 2]])), ValueError, "^" + re.escape("indices: expected a 1-D tensor")),
        (lambda x, s: prune_visual_tokens(x, np.array([1.0])), TypeError, "^" + re.escape("indices: expected an integer dtype")),
        (lambda x, s: prune_visual_tokens(x, [1], scores=s, keep=3), ValueError, "^" + re.escape("indices, scores: ") + ".*" + re.escape(" not both")),
        (lambda x, s: prune_visual_tokens(x), ValueError, "^" + re.escape("indices, scores:")),
        (lambda x, s: prune_visual_tokens(x, [1], keep=3), ValueError, "^" + re.escape("keep, ratio, mass: these select from scores")),
        (lambda x, s: prune_visual_tokens(x, scores=s), ValueError, "^" + re.escape("keep, ratio, mass: give exactly one of them, got none")),
        (lambda x, s: prune_visual_tokens(x, scores=s[:40], keep=3), ValueError, "^" + re.escape("scores: expected 42 scores")),
        (lambda x, s: prune_visual_tokens(x, [1], grid_thw=[(1, 6, 6)]), ValueError, "^" + re.escape("grid_thw: the grids hold 36 tokens")),
        (lambda x, s: select_tokens(s, keep=3, ratio=0.5), ValueError, "^" + re.escape("keep, ratio, mass: give exactly one of them, got keep and ratio")),
        (lambda x, s: select_tokens(s, keep=-1), ValueError, "^" + re.escape("keep: expected an int >= 0")),
        (lambda x, s: select_tokens(s, ratio=1.5), ValueError, "^" + re.escape("ratio: expected a share in [0, 1]")),
        (lambda x, s: select_tokens(s, mass=-0.1), ValueError, "^" + re.escape("mass: expected a share in [0, 1]")),
        (lambda x, s: select_tokens(s, keep=3, min_keep=5, max_keep=4), ValueError, "^" + re.escape("min_keep (5) must not exceed max_keep (4)")),
        (lambda x, s: select_tokens(s, keep=3, min_keep=-1), ValueError, "^" + re.escape("min_keep: expected an int >= 0")),
        (lambda x, s: select_tokens(np.where(np.arange(42) == 7, np.nan, s).astype(np.float32), keep=3), ValueError, "^" + re.escape("scores[7] is NaN")),
        (lambda x, s: select_tokens(s - 0.5, mass=0.5), ValueError, r"^scores\[\d+\] = -[\d.]+: mass selection needs finite, non-negative scores"),
        (lambda x, s: select_tokens(np.array([1.0, np.inf], np.float32), mass=0.5), ValueError, "^" + re.escape("scores[1] = inf")),
        (lambda x, s: select_tokens(s[None], keep=3), ValueError, "^" + re.escape("scores: expected a 1-D tensor [tokens]")),
        (lambda x, s: select_tokens(s.astype(np.int64), keep=3), TypeError, "^" + re.escape("scores: expected dtype float32")),
    ],
)
def test_bad_input_names_the_argument(call, error, match):
    x = np.random.default_rng(0).standard_normal((42, 5)).astype(np.float32)
    s = np.random.default_rng(1).random(42).astype(np.float32)
    before = unchanged(x, s)
    with pytest.raises(error, match=match):
        call(x, s)
    assert_same(before, [x, s])


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"q": (2, 6, 8), "k": (5, 4, 8)}, ValueError, "^" + re.escape("keys: q_heads (6) must be a positive multiple of kv_heads (4)")),
        ({"q": (2, 6, 8), "k": (5, 2, 4)}, ValueError, "^" + re.escape("keys: head_dim 4 differs from query's 8")),
        ({"q": (2, 6), "k": (5, 2, 8)}, ValueError, "^" + re.escape("query: expected a 3-D tensor [q_tokens, q_heads, head_dim], got shape (2, 6)")),
        ({"q": (2, 6, 8), "k": (5, 16)}, ValueError, "^" + re.escape("keys: expected a 3-D tensor [k_tokens, kv_heads, head_dim]")),
        ({"q": (0, 6, 8), "k": (5, 2, 8)}, ValueError, "^" + re.escape("query: expected at least one query token")),
        ({"q": (2, 6, 8), "k": (5, 2, 8), "lse": (6, 2)}, ValueError, "^" + re.escape("lse: expected shape [q_tokens, q_heads] = (2, 6), got (6, 2)")),
        ({"q": (2, 6, 8), "k": (5, 2, 8), "lse": (2,)}, ValueError, "^" + re.escape("lse: expected a 2-D tensor")),
        ({"q": (2, 6, 8), "k": (5, 2, 8), "kdtype": torch.float16}, TypeError, "^" + re.escape("keys: expected dtype float32 (the dtype of query), got float16")),
        ({"q": (2, 6, 8), "k": (5, 2, 8), "kdtype": torch.int32}, TypeError, "^" + re.escape("keys: expected dtype float32, float16 or bfloat16, got int32")),
        ({"q": (2, 6, 8), "k": (5, 2, 8), "scale": float("inf")}, ValueError, "^" + re.escape("scale: expected a finite number")),
    ],
)
def test_bad_scores_input(kwargs, error, match):
    q = torch.randn(*kwargs["q"])
    k = torch.randn(*kwargs["k"]).to(kwargs.get("kdtype", torch.float32))
    lse = torch.randn(*kwargs["lse"]) if "lse" in kwargs else None
    before = unchanged(q, k)
    with pytest.raises(error, match=match):
        visual_token_scores(q, k, lse=lse, scale=kwargs.get("scale"))
    assert_same(before, [q, k])


def test_device_errors():
    """Tensors not on the CPU are refused naming the argument (meta stands in where there is no CUDA)."""
    with pytest.raises(ValueError, match="^" + re.escape("x: cannot be read through DLPack")):
        pool_visual_tokens(torch.empty(4, 8, device="meta"), [(1, 2, 2)], 2)
    with pytest.raises(ValueError, match="^" + re.escape("keys: cannot be read through DLPack")):
        visual_token_scores(torch.randn(1, 2, 4), torch.empty(3, 2, 4, device="meta"))
    with pytest.raises(ValueError, match="^" + re.escape("x: cannot be read through DLPack: ") + ".*" + re.escape("detach")):
        prune_visual_tokens(torch.randn(4, 3, requires_grad=True), [1])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device here (tests/test_cuda.py covers the CUDA path)")
def test_cpu_and_cuda_tensors_are_not_mixed():
    with pytest.raises(ValueError, match="^" + re.escape("keys: expected a CPU tensor like the other arguments, got one on cuda:0")):
        visual_token_scores(torch.randn(1, 2, 4), torch.randn(3, 2, 4, device="cuda"))
    with pytest.raises(ValueError, match="^" + re.escape("keys: expected a tensor on cuda:0 (the device of query), got one on cpu")):
        visual_token_scores(torch.randn(1, 2, 4, device="cuda"), torch.randn(3, 2, 4))


def _expected_grids(grids, kh, kw):
    return np.array([(t, -(-h // kh), -(-w // kw)) for t, h, w in grids], np.int64)


def test_pooled_grids_are_host_data():
    """The returned grids are host int64 data of the caller's kind: NumPy for NumPy input, a CPU
    torch tensor for torch input."""
    rng = np.random.default_rng()
    grids = [tuple(int(v) for v in rng.integers(1, 9, 3)) for _ in range(3)]
    kh, kw = (int(v) for v in rng.integers(1, 5, 2))
    x = rng.standard_normal((sum(t * h * w for t, h, w in grids), 8)).astype(np.float32)
    pooled = pool_visual_tokens(x, grids, (kh, kw))
    assert isinstance(pooled.grid_thw, np.ndarray) and pooled.grid_thw.dtype == np.int64
    assert np.array_equal(pooled.grid_thw, _expected_grids(grids, kh, kw))
    pooled = pool_visual_tokens(torch.from_numpy(x), grids, (kh, kw))
    assert isinstance(pooled.grid_thw, torch.Tensor) and pooled.grid_thw.device.type == "cpu"
    assert pooled.grid_thw.dtype == torch.int64
    assert np.array_equal(pooled.grid_thw.numpy(), _expected_grids(grids, kh, kw))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device here")
def test_pooled_grids_of_cuda_input_are_host_data():
    """CUDA input: the tokens stay on the GPU, the grids come back as a CPU int64 tensor (no
    upload, so reading them does not wait for the GPU); pruned positions stay on the GPU."""
    rng = np.random.default_rng()
    grids = [(1, 6, 7), (2, 3, 5)]
    x = torch.from_numpy(rng.standard_normal((42 + 30, 16)).astype(np.float32))
    pooled = pool_visual_tokens(x.cuda(), grids, 2)
    assert pooled.tokens.device.type == "cuda" and pooled.grid_thw.device.type == "cpu"
    assert np.array_equal(pooled.grid_thw.numpy(), _expected_grids(grids, 2, 2))
    assert torch.allclose(pooled.tokens.cpu(), pool_visual_tokens(x, grids, 2).tokens, atol=1e-6)
    pruned = prune_visual_tokens(x.cuda(), [0, 5, 50], grid_thw=grids)
    assert pruned.positions.device.type == "cuda"


def test_public_api():
    for name in ("pool_visual_tokens", "visual_token_scores", "select_tokens", "prune_visual_tokens", "Pooled", "Pruned"):
        assert name in tvc_rs.__all__ and getattr(tvc_rs, name) is getattr(tvc_rs.compress, name)


def test_the_native_functions_and_result_types_are_the_public_ones():
    """No pass-through wrappers: tvc_rs.compress re-exports the native functions (documented
    and with their signatures there) and the native named tuples Pooled / Pruned."""
    import inspect
    import pickle

    for name in ("pool_visual_tokens", "visual_token_scores", "select_tokens", "prune_visual_tokens", "Pooled", "Pruned"):
        assert getattr(tvc_rs.compress, name) is getattr(tvc_rs._native, name)
    assert str(inspect.signature(pool_visual_tokens)) == "(x, grid_thw, factor=4)"
    assert str(inspect.signature(visual_token_scores)) == "(query, keys, *, lse=None, scale=None)"
    assert pool_visual_tokens.__doc__.startswith("Average-pool visual tokens with ``kh x kw`` windows")
    assert "Pruned(tokens, indices, positions)" in prune_visual_tokens.__doc__
    assert tvc_rs.Pooled._fields == ("tokens", "grid_thw") and tvc_rs.Pruned._fields == ("tokens", "indices", "positions")
    assert "host data" in tvc_rs.Pooled.grid_thw.__doc__
    rng = np.random.default_rng()
    x = rng.standard_normal((2 * 6 * 7, 4)).astype(np.float32)
    pooled = pool_visual_tokens(x, [(2, 6, 7)])  # the default factor is 4
    assert isinstance(pooled, tvc_rs.Pooled) and isinstance(pooled, tuple)
    tokens, grids = pooled
    assert tokens is pooled.tokens and grids is pooled.grid_thw
    assert grids.tolist() == [[2, 2, 2]] and tokens.shape == (8, 4)
    again = pickle.loads(pickle.dumps(pooled))
    assert type(again) is tvc_rs.Pooled and np.array_equal(again.tokens, tokens)
    pruned = prune_visual_tokens(torch.from_numpy(x), [1, 3])
    assert isinstance(pruned, tvc_rs.Pruned) and pruned.positions is None
    assert isinstance(pruned.tokens, torch.Tensor) and pruned.indices.tolist() == [1, 3]
    assert isinstance(select_tokens(torch.from_numpy(x[:, 0]), keep=2), torch.Tensor)
    assert isinstance(visual_token_scores(x[:1].reshape(1, 1, 4), x.reshape(-1, 1, 4)), np.ndarray)
