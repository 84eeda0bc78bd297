"""The CUDA kernels run on the CPU: every kernel of kernels/*.cu, compiled for the host with g++
and tests/cuda_host/shim.h, launched as src/cuda/*.rs launches it (tests/cuda_host/launches.py),
against the float64 references and shape grids of tests/test_cuda.py (the references imported
from test_compress.py and test_kv.py). Needs g++ only: no GPU, driver or NVRTC.

What a GPU run adds that this cannot: the real memory model between blocks, the PTX conversions
(here the shim's), timing. What this adds on every CI run: each kernel's arithmetic, indexing,
barriers and warp operations checked (a barrier or shuffle some threads miss is an error here),
and under ``TVC_HOST_SANITIZE=1`` (.ci/cuda-host.sh) every out-of-bounds access and misaligned
packed access.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import cuda_host
from cuda_host import launches as L
from test_compress import TOLERANCE, cells_reference, merge_reference, pool_reference, scores_reference, select_reference
from test_kv import (ATOL, paged_cache, read_slots, ref_relocate, ref_relocate_spans, ref_rotate, rope_cases, shift_deltas,
                     span_lists, write_slots)

pytestmark = pytest.mark.skipif(cuda_host.compiler() is None, reason="no g++: the host build of the CUDA kernels needs one")

EXAMPLES = int(os.environ.get("TVC_HOST_EXAMPLES", "25"))
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
DTYPE_IDS = ["f32", "f16", "bf16"]
SETTINGS = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module", autouse=True)
def built():
    L.build_all()


def tensor(values, dtype=torch.float32) -> torch.Tensor:
    return torch.from_numpy(np.asarray(values, dtype=np.float64)).to(dtype)


def f64(t) -> np.ndarray:
    return t.detach().to(torch.float64).numpy() if isinstance(t, torch.Tensor) else np.asarray(t, np.float64)


def assert_close(got, want, dtype, scale=1.0):
    t = TOLERANCE[str(dtype).removeprefix("torch.")] * scale
    np.testing.assert_allclose(f64(got), want, rtol=t, atol=t * max(1.0, float(np.abs(want).max(initial=0))))


def rng(seed):
    return np.random.default_rng(seed)


# ================================================================ the harness itself


def test_harness_refuses_what_a_gpu_would_not_run():
    """A kernel whose threads diverge around __syncthreads is reported, not run: the select
    kernel with a block of 1000 threads has a warp of 8 lanes whose ballot names 32 lanes."""
    s = torch.rand(50)
    out = np.zeros(5, np.int64)
    a = L.SelectArgs(scores=L.ptr(s), out=L.ptr(out), n=50, stride=1, count=5, dtype=0)
    with pytest.raises(cuda_host.KernelError, match="lane 8, which does not exist"):
        L.kernels("compress.cu").launch("select_topk", (1,), 1000, 0, a)
    with pytest.raises(cuda_host.KernelError, match="arguments of 32 bytes, the kernel takes 48"):
        L.kernels("compress.cu").launch("select_topk", (1,), 1024, 0, L.ComplementArgs())


OUT_OF_BOUNDS = {
    # A gather index one past the last row: a read past the end of x.
    "global": ("heap-buffer-overflow", """
x = torch.randn(10, 16)
L.gather(x, np.array([3, 10], np.int64))
"""),
    # The packed kernel on a pointer off the 16-byte grid (the GPU faults; the launcher never does this).
    "misaligned": ("misaligned address", """
x, out, idx = torch.randn(161), torch.empty(2, 16), np.array([0, 1], np.int64)
a = L.GatherArgs(x=L.ptr(x) + 4, out=L.ptr(out), indices=L.ptr(idx), count=2, dim=16, row_stride=16, col_stride=1)
L.kernels("compress.cu").launch("gather_f32_v", (2, 1), 128, 0, a)
"""),
    # Dynamic shared memory one entry short of what the kernel indexes.
    "shared": ("use-after-poison", """
s, ws = torch.rand(64), np.zeros(68, np.int64)
a = L.MassArgs(scores=L.ptr(s), out=L.ptr(ws), header=L.ptr(ws) + 8 * 64, n=64, stride=1, mass=0.5, min_keep=1,
               max_keep=-1, dtype=0, pow2=64)
L.kernels("compress.cu").launch("select_mass", (1,), 1024, 64 * 8 - 8, a)
"""),
}


@pytest.mark.skipif(not cuda_host.SANITIZE, reason="the sanitized build only (TVC_HOST_SANITIZE=1, .ci/cuda-host.sh)")
@pytest.mark.parametrize("case", list(OUT_OF_BOUNDS))
def test_sanitizer_catches_bad_accesses(case):
    """A kernel that reads or writes out of bounds stops the process with the sanitizer's report
    (run in a child process: the report aborts it)."""
    want, body = OUT_OF_BOUNDS[case]
    script = "import numpy as np, torch\nfrom cuda_host import launches as L\n" + body + "print('not caught')\n"
    run = subprocess.run([sys.executable, "-c", script], cwd=Path(__file__).parent, capture_output=True, text=True,
                         timeout=600)
    assert run.returncode != 0 and "not caught" not in run.stdout, run.stdout + run.stderr[-3000:]
    assert want in run.stderr, run.stderr[-3000:]


# ================================================================ compression


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("factor", [1, 2, 3, 4, (2, 3)])
@pytest.mark.parametrize("layout", ["contiguous", "column-slice"])
def test_pool(dtype, factor, layout):
    grids = [(1, 9, 7), (2, 5, 6), (1, 1, 1), (1, 36, 36)]
    tokens = sum(t * h * w for t, h, w in grids)
    base = tensor(rng(1).standard_normal((tokens, 32)), dtype)
    x = base if layout == "contiguous" else base[:, 3:23]  # strided rows: the scalar kernel
    kh, kw = (factor, factor) if isinstance(factor, int) else factor
    pooled = L.pool(x, grids, kh, kw)
    assert_close(pooled, pool_reference(f64(x), grids, kh, kw)[0], dtype)


def test_pool_and_cells_over_many_grids():
    """More grids than one launch takes (64): two launches, each for its own grids."""
    grids = [(1 + i % 2, 2 + i % 3, 3 + i % 4) for i in range(70)]
    tokens = sum(t * h * w for t, h, w in grids)
    x = tensor(rng(2).standard_normal((tokens, 16)))
    np.testing.assert_allclose(f64(L.pool(x, grids, 2, 2)), pool_reference(f64(x), grids, 2, 2)[0], rtol=1e-5, atol=1e-6)
    indices = np.sort(rng(3).choice(tokens, 300, replace=False)).astype(np.int64)
    np.testing.assert_array_equal(L.token_cells(indices, grids), cells_reference(grids, indices))
    assert L.pool(torch.zeros(0, 8), [], 4, 4).shape == (0, 8)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("group", [1, 2, 7])
@pytest.mark.parametrize("with_lse", [False, True])
def test_scores(dtype, group, with_lse):
    kv_heads, q_tokens, k_tokens, head_dim = 2, 3, 300, 64
    g = rng(group)
    q = tensor(g.standard_normal((q_tokens, kv_heads * group, head_dim)) * 2, dtype)
    cache = tensor(g.standard_normal((kv_heads, k_tokens + 20, head_dim)) * 2, dtype)
    k = cache[:, 10 : 10 + k_tokens].transpose(0, 1)  # a cache slice read in place
    scale = 1 / math.sqrt(head_dim)
    lse = None
    if with_lse:
        extra = g.standard_normal((11, kv_heads, head_dim)) * 2
        full = np.concatenate([f64(k), extra])
        logits = torch.einsum("qhd,khd->qhk", torch.from_numpy(f64(q)), torch.from_numpy(full).repeat_interleave(group, 1)) * scale
        lse = torch.logsumexp(logits, dim=-1).to(dtype).t().contiguous().t()  # column-major: strides read
    got = L.scores(q, k, lse, scale)
    want = scores_reference(f64(q), f64(k), None if lse is None else f64(lse), scale)
    np.testing.assert_allclose(f64(got), want, rtol=5e-5, atol=1e-8)


def budget(scores, rule, amount, keep, min_keep, max_keep):
    args = {"keep": keep} if rule == "keep" else {rule: amount}
    return select_reference(scores, min_keep=min_keep, max_keep=max_keep, **args)


@settings(max_examples=4 * EXAMPLES, **SETTINGS)
@given(
    scores=st.lists(st.one_of(st.sampled_from([0.0, 0.25, 0.5, 1.0]), st.floats(0, 10, width=32)), max_size=300),
    rule=st.sampled_from(["keep", "ratio", "mass"]),
    amount=st.floats(0, 1),
    keep=st.integers(0, 310),
    min_keep=st.integers(0, 4),
    extra=st.one_of(st.none(), st.integers(0, 30)),
    dtype=st.sampled_from(DTYPES),
    stride=st.sampled_from([1, 3]),
)
def test_select(scores, rule, amount, keep, min_keep, extra, dtype, stride):
    """Top-k (radix select) and mass (bitonic sort, f64 sums in order) give exactly the reference's
    indices, ties to the lower index. Top-k is given the budget's count (Budget::count is host code)."""
    s = torch.tensor(scores, dtype=torch.float32).to(dtype).repeat_interleave(stride)[::stride]
    max_keep = None if extra is None else min_keep + extra
    want = budget(s.float().numpy(), rule, amount, keep, min_keep, max_keep)
    got = L.select_mass(s, amount, min_keep, max_keep) if rule == "mass" else L.select_topk(s, len(want))
    if rule == "mass" and len(scores) == 0:
        assert got is None  # no launch for no scores
        return
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("n", [1296, 16384, 20000])  # 20000: past one block's shared memory (host path)
def test_select_large(n):
    g = rng(n)
    probs = torch.from_numpy(g.dirichlet(np.ones(n) * 0.3)).float()
    probs[::7] = probs[3]  # ties
    for args in ({"keep": n // 4}, {"ratio": 0.1}):
        want = select_reference(probs.numpy(), **args)
        np.testing.assert_array_equal(L.select_topk(probs, len(want)), want)
    for mass in (0.9, 1.0):
        got = L.select_mass(probs, mass, 1, None)
        if n == 20000:
            assert got is None  # the Rust code selects on the host
        else:
            np.testing.assert_array_equal(got, select_reference(probs.numpy(), mass=mass))
    strided = probs[::3]
    np.testing.assert_array_equal(L.select_topk(strided, 50), select_reference(strided.numpy(), keep=50))


def test_select_bad_scores():
    assert L.select_mass(torch.tensor([0.5, 0.1, 0.3, float("nan")]), 0.5, 1, None) == ("nan", 3, 0)
    bits = int(np.float32(-0.5).view(np.uint32))
    assert L.select_mass(torch.tensor([0.5, -0.5, 1.0, float("inf")]), 0.5, 1, None) == ("bad", 1, bits)
    assert L.select_mass(torch.tensor([0.5, float("inf")], dtype=torch.bfloat16), 0.5, 1, None)[:2] == ("bad", 1)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("merge", [False, True])
@pytest.mark.parametrize("layout", ["contiguous", "strided"])
def test_prune(dtype, merge, layout):
    """Selection, then gather or ToMe merge (complement, norms, similarity tiles, merge), then
    the kept tokens' grid cells, as prune_visual_tokens runs them on a GPU."""
    grids = [(1, 7, 9), (2, 4, 5), (1, 12, 12)]
    tokens = sum(t * h * w for t, h, w in grids)  # 247: several similarity tiles
    scores = torch.from_numpy(rng(8).random(tokens).astype(np.float32))
    want_idx = select_reference(scores.numpy(), ratio=0.4)
    idx = L.select_topk(scores, len(want_idx))
    np.testing.assert_array_equal(idx, want_idx)
    for seed in range(100):  # the first inputs with no near-tie a float32 rounding could flip
        x = tensor(rng(seed).standard_normal((tokens, 48)), dtype)
        if not merge or merge_reference(f64(x), want_idx)[1].min() > 1e-4:
            break
    if layout == "strided":
        x = torch.cat([x, x], 1)[:, 1:49].t().contiguous().t()  # column-major: scalar kernels
    out = L.merge(x, idx) if merge else L.gather(x, idx)
    want = merge_reference(f64(x), want_idx)[0] if merge else f64(x)[want_idx]
    assert_close(out, want, dtype, scale=2 if merge else 1)
    np.testing.assert_array_equal(L.token_cells(idx, grids), cells_reference(grids, want_idx))


def test_prune_edges():
    x = tensor(rng(0).standard_normal((6, 4)))
    assert L.merge(x, np.zeros(0, np.int64)).shape == (0, 4)
    assert torch.equal(L.merge(x, np.arange(6, dtype=np.int64)), x)  # nothing dropped: a gather
    x[5] = 0  # a zero vector merges into the first kept token (all similarities 0)
    merged = L.merge(x, np.array([0, 2], np.int64))
    np.testing.assert_allclose(f64(merged), merge_reference(f64(x), np.array([0, 2]))[0], rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(L.merge.last["dropped"], [1, 3, 4, 5])


# ================================================================ KV cache

# How keys were rotated, one entry per option (a new rope option is one more entry here and in
# launches.rope_args): NeoX and GPT-J pairs, full and partial rotary, M-RoPE sections.
ROPES = {
    "neox": dict(rope_theta=1e4, head_dim=64, rotary_dim=64),
    "gptj": dict(rope_theta=1e4, head_dim=64, rotary_dim=64, interleaved=True),
    "partial-neox": dict(rope_theta=1e6, head_dim=80, rotary_dim=32),
    "partial-gptj": dict(rope_theta=1e6, head_dim=80, rotary_dim=48, interleaved=True),
    "mrope-neox": dict(rope_theta=1e6, head_dim=64, rotary_dim=64, mrope_section=[8, 12, 12]),
    "mrope-gptj": dict(rope_theta=1e6, head_dim=64, rotary_dim=64, interleaved=True, mrope_section=[16, 8, 8]),
    "odd": dict(rope_theta=500.0, head_dim=13, rotary_dim=10, mrope_section=[1, 3, 1]),
    # Qwen3-VL's interleaved frequency map; Qwen3.5's with partial rotary (its [11, 11, 10] scaled down).
    "mrope-interleaved": dict(rope_theta=5e6, head_dim=64, rotary_dim=64, mrope_section=[12, 10, 10], mrope_interleaved=True),
    "partial-mrope-interleaved": dict(rope_theta=1e7, head_dim=80, rotary_dim=32, mrope_section=[6, 5, 5], mrope_interleaved=True),
}


def case_of(rope):
    return dict(rotary_dim=rope["head_dim"], interleaved=False, mrope_section=None, mrope_interleaved=False) | rope


def rope_args(case):
    """The kernels' RopeArgs for a rope case (every key of the case: a new option must be known there)."""
    return L.rope_args(**case)


def deltas_of(kind, g, n, mrope, span):
    """(Deltas argument, [n, 3] deltas): one int, host per-token ([n] or (t, h, w)), a device int32 [n]
    array or a device int64 [n, 3] array with its components strided."""
    if kind == "int":
        d = int(g.integers(-span, span))
        return L.Deltas("same", d), np.full((n, 3), d)
    if kind in ("thw", "device-thw") and mrope:
        d = g.integers(-span, span, size=(n, 3))
        if kind == "thw":
            return L.Deltas("host", d), d
        arr = np.asfortranarray(d.astype(np.int64))  # comp stride n, token stride 1
        return L.Deltas("device", arr), d
    d = g.integers(-span, span, size=n)
    if kind.startswith("device"):
        return L.Deltas("device", d.astype(np.int32)), np.repeat(d[:, None], 3, 1)
    return L.Deltas("host", d), np.repeat(d[:, None], 3, 1)


def key_layers(g, layers, tokens, heads, d, dtype, layout):
    """[tokens, heads, d] views over fresh memory: contiguous, transposed (a transformers layer
    [heads, seq, dim]) or padded (every other head of a wider, offset buffer)."""
    stores, views = [], []
    for _ in range(layers):
        base = tensor(g.uniform(-1, 1, size=(tokens, heads, d)), dtype)
        if layout == "transposed":
            store = base.transpose(0, 1).contiguous()
            view = store.transpose(0, 1)
        elif layout == "padded":
            store = torch.zeros(tokens, 2 * heads, d + 3, dtype=dtype)
            view = store[:, ::2, 1 : d + 1]
            view.copy_(base)
        else:
            store = view = base
        stores.append(store)
        views.append(view)
    return stores, views


@settings(max_examples=EXAMPLES, **SETTINGS)
@given(
    case=rope_cases(),
    tokens=st.integers(0, 40),
    heads=st.integers(1, 4),
    layers=st.integers(1, 3),
    dtype=st.sampled_from(DTYPES),
    layout=st.sampled_from(["contiguous", "transposed", "padded"]),
    delta_kind=st.sampled_from(["int", "per_token", "thw", "device", "device-thw"]),
    seed=st.integers(0, 2**32 - 1),
)
def test_rerotate(case, tokens, heads, layers, dtype, layout, delta_kind, seed):
    g = rng(seed)
    d = case["head_dim"]
    deltas, d3 = deltas_of(delta_kind, g, tokens, case["mrope_section"] is not None, 70_000)
    stores, views = key_layers(g, layers, tokens, heads, d, dtype, layout)
    before = [f64(v) for v in views]
    L.rerotate(views, deltas, rope_args(case))
    for view, store, b in zip(views, stores, before):
        np.testing.assert_allclose(f64(view), ref_rotate(b, d3, **case), atol=ATOL[dtype], rtol=0)
        if layout == "padded":
            full = f64(store)
            assert not full[:, 1::2].any() and not full[..., 0].any() and not full[..., d + 1 :].any()


def test_rerotate_large_positions():
    case = dict(rope_theta=1e6, head_dim=128, rotary_dim=128)
    x = rng(1).uniform(-1, 1, size=(4, 2, 128))
    p = np.array([1_000_000, 32_768, 5, 2_000_000_000])
    d = np.array([-999_999, 7, 1 << 20, -3])
    keys = tensor(ref_rotate(x, p, **case))
    L.rerotate([keys], L.Deltas("device", d), rope_args(case))
    np.testing.assert_allclose(f64(keys), ref_rotate(x, p + d, **case), atol=2e-6, rtol=0)


@settings(max_examples=EXAMPLES, **SETTINGS)
@given(
    case=rope_cases(),
    batch=st.integers(1, 2),
    heads=st.integers(1, 3),
    layers=st.integers(1, 3),
    seq=st.integers(0, 90),
    cut=st.tuples(st.integers(0, 90), st.integers(0, 90), st.integers(0, 90)),
    dtype=st.sampled_from(DTYPES),
    delta_kind=st.sampled_from(["default", "int", "per_token", "many", "thw", "device", "device-thw"]),
    seed=st.integers(0, 2**32 - 1),
)
def test_relocate(case, batch, heads, layers, seq, cut, dtype, delta_kind, seed):
    """Overlapping moves (the span shorter than what follows it) included; "many": more distinct
    deltas than the kernel's shared table holds."""
    g = rng(seed)
    start, end, length = sorted(min(c, seq) for c in cut)
    n = length - end
    mrope = case["mrope_section"] is not None
    d = case["head_dim"]
    keys = [tensor(g.uniform(-1, 1, size=(batch, heads, seq, d)), dtype) for _ in range(layers)]
    values = [tensor(g.uniform(-1, 1, size=(batch, heads, seq, d + 2)), dtype) for _ in range(layers)]
    kb, vb = [f64(k) for k in keys], [f64(v) for v in values]
    if delta_kind == "default" and not mrope:
        deltas, delta = L.Deltas("same", -(end - start)), -(end - start)
    elif delta_kind == "many":
        delta = g.integers(-1000, 1000, size=n)
        deltas = L.Deltas("host", delta)
    else:
        deltas, delta = deltas_of({"default": "per_token"}.get(delta_kind, delta_kind), g, n, mrope, 1000)
    new_len = L.relocate(keys, values, start, end, length, deltas, rope_args(case))
    assert new_len == length - (end - start)
    want_k, want_v = ref_relocate(kb, vb, start, end, length, delta, case)
    for l in range(layers):
        np.testing.assert_allclose(f64(keys[l])[:, :, :new_len], want_k[l], atol=ATOL[dtype], rtol=0)
        np.testing.assert_array_equal(f64(values[l])[:, :, :new_len], want_v[l])
        np.testing.assert_array_equal(f64(keys[l])[:, :, length:], kb[l][:, :, length:])


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("span", [(40, 100), (5, 6), (100, 1200)])
def test_relocate_long_cache(dtype, span):
    """Many tiles per lane, the span shorter than what follows it (moves overlap: one block per
    lane, order matters) and longer (moves split over row segments)."""
    g = rng(span[0])
    case = dict(rope_theta=1e6, head_dim=128, rotary_dim=128, mrope_section=[16, 24, 24])
    seq, (start, end) = 1500, span
    keys = [tensor(g.uniform(-1, 1, size=(1, 4, seq, 128)), dtype) for _ in range(2)]
    values = [tensor(g.uniform(-1, 1, size=(1, 4, seq, 128)), dtype) for _ in range(2)]
    kb, vb = [f64(k) for k in keys], [f64(v) for v in values]
    delta = np.tile(np.array([-3, -17, -8]), (seq - end, 1))
    new_len = L.relocate(keys, values, start, end, seq, L.Deltas("host", delta), rope_args(case))
    want_k, want_v = ref_relocate(kb, vb, start, end, seq, delta, case)
    for l in range(2):
        np.testing.assert_allclose(f64(keys[l])[:, :, :new_len], want_k[l], atol=ATOL[dtype], rtol=0)
        np.testing.assert_array_equal(f64(values[l])[:, :, :new_len], want_v[l])


@settings(max_examples=EXAMPLES, **SETTINGS)
@given(
    data=st.data(),
    case=rope_cases(),
    batch=st.integers(1, 2),
    heads=st.integers(1, 3),
    layers=st.integers(1, 3),
    seq=st.integers(0, 90),
    dtype=st.sampled_from(DTYPES),
    delta_kind=st.sampled_from(["default", "int", "per_token", "many", "thw", "device", "device-thw"]),
    multiprocessors=st.sampled_from([1, 132]),
    seed=st.integers(0, 2**32 - 1),
)
def test_relocate_spans(data, case, batch, heads, layers, seq, dtype, delta_kind, multiprocessors, seed):
    """Several spans in one launch (kv.rs `relocate_spans`): adjacent and empty spans, one span
    (no run table), overlapping moves (one block per lane) and moves split over row segments."""
    g = rng(seed)
    spans, length = data.draw(span_lists(seq))
    start = spans[0][0] if spans else length
    kept = [p for p in range(start, length) if not any(s <= p < e for s, e in spans)]
    n = len(kept)
    mrope = case["mrope_section"] is not None
    d = case["head_dim"]
    keys = [tensor(g.uniform(-1, 1, size=(batch, heads, seq, d)), dtype) for _ in range(layers)]
    values = [tensor(g.uniform(-1, 1, size=(batch, heads, seq, d + 2)), dtype) for _ in range(layers)]
    kb, vb = [f64(k) for k in keys], [f64(v) for v in values]
    if delta_kind == "default" and not mrope:
        delta = shift_deltas(spans, kept)
        deltas = L.Deltas("host", delta)
    elif delta_kind == "many":
        delta = g.integers(-1000, 1000, size=n)
        deltas = L.Deltas("host", delta)
    else:
        deltas, delta = deltas_of({"default": "per_token"}.get(delta_kind, delta_kind), g, n, mrope, 1000)
    new_len = L.relocate_spans(keys, values, spans, length, deltas, rope_args(case), multiprocessors)
    assert new_len == start + n
    want_k, want_v, _ = ref_relocate_spans(kb, vb, spans, length, delta if n else 0, case)
    for l in range(layers):
        np.testing.assert_allclose(f64(keys[l])[:, :, :new_len], want_k[l], atol=ATOL[dtype], rtol=0)
        np.testing.assert_array_equal(f64(values[l])[:, :, :new_len], want_v[l])
        np.testing.assert_array_equal(f64(keys[l])[:, :, length:], kb[l][:, :, length:])


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("spans", [[(40, 100), (300, 900), (1000, 1010)], [(10, 1200), (1300, 1310), (1310, 1320)]],
                         ids=["overlapping", "segments"])
@pytest.mark.parametrize("rope", ["qwen2-vl", "glm4v-gptj-partial"])
def test_relocate_spans_long_cache(dtype, spans, rope):
    """Many tiles per lane and a run table: sources overlapping destinations (one block per lane,
    order matters) and not (rows split over blocks, each looking its runs up); GQA-sized heads."""
    g = rng(len(spans[0]) + spans[0][1])
    case = (dict(rope_theta=1e6, head_dim=128, rotary_dim=128, mrope_section=[16, 24, 24]) if rope == "qwen2-vl" else
            dict(rope_theta=1e4, head_dim=128, rotary_dim=64, interleaved=True, mrope_section=[8, 12, 12]))
    seq = 1500
    keys = [tensor(g.uniform(-1, 1, size=(1, 2, seq, 128)), dtype) for _ in range(2)]
    values = [tensor(g.uniform(-1, 1, size=(1, 2, seq, 128)), dtype) for _ in range(2)]
    kb, vb = [f64(k) for k in keys], [f64(v) for v in values]
    n = seq - spans[0][0] - sum(e - s for s, e in spans)
    delta = g.integers(-3000, 0, size=(n, 3))
    new_len = L.relocate_spans(keys, values, spans, seq, L.Deltas("host", delta), rope_args(case))
    want_k, want_v, _ = ref_relocate_spans(kb, vb, spans, seq, delta, case)
    assert new_len == spans[0][0] + n
    for l in range(2):
        np.testing.assert_allclose(f64(keys[l])[:, :, :new_len], want_k[l], atol=ATOL[dtype], rtol=0)
        np.testing.assert_array_equal(f64(values[l])[:, :, :new_len], want_v[l])


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("positions", ["list", "start"])
@pytest.mark.parametrize("rope", list(ROPES), ids=list(ROPES))
def test_append(dtype, positions, rope):
    """"list" positions take new entries as views of [n, batch, heads, dim + 1] (strided, off the
    16-byte grid: the scalar kernels), "start" contiguous ones (packed where the rope allows)."""
    g = rng(8)
    case = case_of(ROPES[rope])
    d = case["head_dim"]
    batch, heads, seq, n = 2, 2, 13, 5

    def new():
        if positions == "list":
            return tensor(g.uniform(-1, 1, size=(n, batch, heads, d + 1)), dtype)[..., 1:].permute(1, 2, 0, 3)
        return tensor(g.uniform(-1, 1, size=(batch, heads, n, d)), dtype)

    keys = [tensor(g.uniform(-1, 1, size=(batch, heads, seq, d)), dtype) for _ in range(2)]
    values = [tensor(g.uniform(-1, 1, size=(batch, heads, seq, d)), dtype) for _ in range(2)]
    new_k = [new() for _ in range(2)]
    new_v = [new() for _ in range(2)]
    kb, vb, nkb, nvb = ([f64(t) for t in ts] for ts in (keys, values, new_k, new_v))
    pos = g.permutation(seq)[:n] if positions == "list" else np.arange(4, 4 + n)
    delta = g.integers(-400, 400, size=(n, 3)) if case["mrope_section"] else np.repeat(g.integers(-400, 400, size=(n, 1)), 3, 1)
    L.append(keys, values, new_k, new_v, pos, (L.Deltas("device", delta.astype(np.int64)), rope_args(case)))
    for l in range(2):
        want_k, want_v = kb[l].copy(), vb[l].copy()
        want_k[:, :, pos] = np.moveaxis(ref_rotate(np.moveaxis(nkb[l], 2, 0), delta, **case), 0, 2)
        want_v[:, :, pos] = nvb[l]
        np.testing.assert_allclose(f64(keys[l]), want_k, atol=ATOL[dtype], rtol=0)
        np.testing.assert_array_equal(f64(values[l]), want_v)
    L.append(keys, values, new_k, new_v, np.arange(seq - n, seq), None)  # no delta: a plain write
    for l in range(2):
        np.testing.assert_array_equal(f64(keys[l])[:, :, seq - n :], nkb[l])
        np.testing.assert_array_equal(f64(values[l])[:, :, seq - n :], nvb[l])


LAYOUTS = ["vllm-nhd", "vllm-hnd", "kv_blocks", "blocks_kv"]


@settings(max_examples=EXAMPLES, **SETTINGS)
@given(
    case=rope_cases(),
    layout=st.sampled_from(LAYOUTS),
    dtype=st.sampled_from(DTYPES),
    heads=st.integers(1, 3),
    block_size=st.sampled_from([1, 3, 16]),
    tokens=st.integers(0, 120),
    span=st.tuples(st.integers(0, 120), st.integers(0, 120)),
    same_table=st.booleans(),
    seed=st.integers(0, 2**32 - 1),
)
def test_paged_round_trip(case, layout, dtype, heads, block_size, tokens, span, same_table, seed):
    """As test_cuda's: entries written through a block table, a span evicted, the followers
    reinjected at their new positions (in place within the same blocks, or into a fresh table
    reusing blocks), read back equal to the reference; every other slot untouched."""
    g = rng(seed)
    d = case["head_dim"]
    blocks_needed = -(-tokens // block_size)
    num_blocks = 2 * blocks_needed + 2
    caches, name = zip(*(paged_cache(layout, num_blocks, block_size, heads, d, ("torch", dtype), g) for _ in range(2)))
    name = name[0]
    table = g.permutation(num_blocks)[:blocks_needed]
    pos = np.arange(tokens)
    slots = table[pos // block_size] * block_size + pos % block_size if tokens else np.zeros(0, np.int64)
    mrope = case["mrope_section"] is not None
    x = g.uniform(-1, 1, size=(tokens, heads, d))
    p3 = g.integers(0, 3000, size=(tokens, 3)) if mrope else np.repeat(pos[:, None], 3, 1)
    for c in caches:
        write_slots(c, name, d, slots, ref_rotate(x, p3, **case), g.uniform(-1, 1, size=(tokens, heads, d)))
    start, end = sorted(min(s, tokens) for s in span)
    n = tokens - end
    new_pos = start + np.arange(n)
    if same_table:
        new_slots = slots[start : start + n]
    else:
        table2 = g.permutation(num_blocks)[:blocks_needed]
        new_slots = table2[new_pos // block_size] * block_size + new_pos % block_size
    delta = g.integers(-2000, 2000, size=(n, 3)) if mrope else np.full(n, -(end - start))
    d3 = delta if mrope else np.repeat(delta[:, None], 3, 1)
    deltas = L.Deltas("host", delta) if mrope else L.Deltas("same", -(end - start))
    before = [c.clone() for c in caches]
    moved = L.paged(list(caches), name, slots[end:], new_slots, deltas, rope_args(case))
    assert moved == n
    for c, b in zip(caches, before):
        got_k, got_v = read_slots(c, name, d, new_slots)
        stored_k, stored_v = read_slots(b, name, d, slots[end:])
        np.testing.assert_allclose(got_k, ref_rotate(stored_k, d3, **case), atol=ATOL[dtype], rtol=0)
        np.testing.assert_array_equal(got_v, stored_v)
        untouched = np.setdiff1d(np.arange(num_blocks * block_size), new_slots)
        np.testing.assert_array_equal(read_slots(c, name, d, untouched)[0], read_slots(b, name, d, untouched)[0])
        np.testing.assert_array_equal(read_slots(c, name, d, untouched)[1], read_slots(b, name, d, untouched)[1])


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("rope", list(ROPES), ids=list(ROPES))
def test_paged_cycles_chains_and_block_views(dtype, rope):
    """vLLM 0.33 views of one buffer for all layers (blocks outermost), with moves on a cycle
    (slots swapped: staged), a long chain (shift by one slot: one ordered block) and skipped pairs."""
    g = rng(9)
    case = case_of(ROPES[rope])
    D = case["head_dim"]
    Lr, B, H, N = 3, 6, 2, 4
    raw = tensor(g.standard_normal(Lr * B * H * N * 2 * D), dtype)
    page = H * N * 2 * D
    views = [raw.as_strided((B, H, N, 2 * D), (Lr * page, N * 2 * D, 2 * D, 1), l * page) for l in range(Lr)]
    before = [f64(v) for v in views]
    src = np.array([0, 1, 5, 6, 7, 8, 9, 10, 11, -1])
    dst = np.array([1, 0, 4, 5, 6, 7, 8, 9, 10, 3])
    delta = np.array([-3, 3, 100, -1, -1, -1, -1, -1, -1, 0])
    assert L.paged(views, "vllm", src, dst, L.Deltas("device", delta), rope_args(case)) == 9
    keep = src >= 0
    for v, b in zip(views, before):
        kb = b.transpose(0, 2, 1, 3).reshape(B * N, H, 2 * D)
        ka = f64(v).transpose(0, 2, 1, 3).reshape(B * N, H, 2 * D)
        s, t, dl = src[keep], dst[keep], delta[keep]
        np.testing.assert_allclose(ka[t, :, :D], ref_rotate(kb[s, :, :D], dl, **case), atol=ATOL[dtype], rtol=0)
        np.testing.assert_array_equal(ka[t, :, D:], kb[s, :, D:])
        rest = np.setdiff1d(np.arange(B * N), t)
        np.testing.assert_array_equal(ka[rest], kb[rest])


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("access", ["packed", "scalar"])
@pytest.mark.parametrize("rope", list(ROPES), ids=list(ROPES))
def test_every_kv_variant(dtype, access, rope):
    """Each rope option with packed (16-byte) and scalar access, so that every kernel variant
    (<op>_<dtype>_<v|s>_<neox|gptj>) runs whatever hypothesis draws: rerotate, relocate (per-token
    deltas on the fly), paged (independent moves split over segments)."""
    g = rng(11)
    case = case_of(ROPES[rope])
    d, r = case["head_dim"], rope_args(case)
    tokens, heads = 70, 2
    _, views = key_layers(g, 2, tokens, heads, d, dtype, "contiguous" if access == "packed" else "padded")
    deltas, d3 = deltas_of("device-thw", g, tokens, case["mrope_section"] is not None, 5000)
    before = [f64(v) for v in views]
    L.rerotate(views, deltas, r)
    for v, b in zip(views, before):
        np.testing.assert_allclose(f64(v), ref_rotate(b, d3, **case), atol=ATOL[dtype], rtol=0)
    keys = [tensor(g.uniform(-1, 1, size=(1, heads, 200, d + 2)), dtype)[..., 1 : d + 1] if access == "scalar" else
            tensor(g.uniform(-1, 1, size=(1, heads, 200, d)), dtype) for _ in range(2)]
    values = [tensor(g.uniform(-1, 1, size=(1, heads, 200, d)), dtype) for _ in range(2)]
    kb, vb = [f64(k) for k in keys], [f64(v) for v in values]
    deltas, d3 = deltas_of("device", g, 200 - 120, False, 5000)
    L.relocate(keys, values, 10, 120, 200, deltas, r)
    want_k, want_v = ref_relocate(kb, vb, 10, 120, 200, d3, case)
    for l in range(2):
        np.testing.assert_allclose(f64(keys[l])[:, :, :90], want_k[l], atol=ATOL[dtype], rtol=0)
        np.testing.assert_array_equal(f64(values[l])[:, :, :90], want_v[l])
    packed = access == "packed"
    cache = paged_cache("vllm-nhd" if packed else "blocks_kv", 20, 16, heads, d, ("torch", dtype), g)[0]
    if not packed:  # a cache whose head_dim axis is strided: scalar access
        cache = torch.cat([cache, cache], -1)[..., ::2]
    name = "vllm" if packed else "blocks_kv"
    src, dst = np.arange(0, 150), np.arange(160, 310)
    b = cache.clone()
    deltas, d3 = deltas_of("int", g, 150, False, 5000)
    L.paged([cache], name, src, dst, deltas, r)
    np.testing.assert_allclose(read_slots(cache, name, d, dst)[0], ref_rotate(read_slots(b, name, d, src)[0], d3, **case),
                               atol=ATOL[dtype], rtol=0)
    np.testing.assert_array_equal(read_slots(cache, name, d, dst)[1], read_slots(b, name, d, src)[1])


# ================================================================ coverage (keep last)


@pytest.mark.parametrize("file", ["compress.cu", "kv.cu"])
def test_every_kernel_ran(file, request):
    """Every `extern "C"` kernel of the file is in the harness and was launched by the tests above."""
    lib = L.kernels(file)
    defined = cuda_host.kernel_names(file)
    assert defined and defined == lib.names, (defined ^ lib.names)
    if sum(item.module is request.module for item in request.session.items) < 100:
        pytest.skip("only part of this file ran")
    assert set(lib.launched) == defined, sorted(defined - set(lib.launched))
