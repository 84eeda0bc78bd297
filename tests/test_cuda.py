"""The CUDA backend.

- The compress and kv reference tests, parametrised over the device: each case runs on the CPU
  and, where CUDA is present, on the GPU, against the float64 references of test_compress.py and
  test_kv.py (imported, not copied) and against the CPU path's own result on the same inputs.
  Where there is no GPU the "cuda" cases skip with the reason; the "cpu" cases keep the test
  logic itself checked on every machine.
- The runtime, which needs no GPU: NVRTC compiles every kernel for sm_80 and sm_90 without
  spills, ``python -m tvc_rs.cuda --check``, the on-disk cache (keys, several processes at once),
  and clear errors without a driver or without NVRTC.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import tvc_rs
from tvc_rs import _native
from tvc_rs import cuda as tvc_cuda
from tvc_rs import (
    append_entries,
    paged_reinject,
    pool_visual_tokens,
    prune_visual_tokens,
    relocate_span,
    rerotate_keys,
    select_tokens,
    visual_token_scores,
)

# The references of the CPU tests (tests/ is on sys.path under pytest's default import mode).
from test_compress import TOLERANCE, cells_reference, merge_reference, pool_reference, scores_reference, select_reference
from test_kv import (ATOL, paged_cache, read_slots, ref_relocate, ref_relocate_spans, ref_rotate, rope_cases, shift_deltas,
                     span_lists, write_slots)

RUNTIME = tvc_cuda.info()
HAS_GPU = torch.cuda.is_available() and RUNTIME["device_count"] > 0
NO_GPU_REASON = (
    "no CUDA device here (torch.cuda.is_available() is False)"
    if not torch.cuda.is_available()
    else f"torch sees a GPU but tvc_rs cannot use it: {RUNTIME['driver_error'] or RUNTIME['nvrtc_error']}"
)
needs_gpu = pytest.mark.skipif(not HAS_GPU, reason=NO_GPU_REASON)
needs_nvrtc = pytest.mark.skipif(RUNTIME["nvrtc_path"] is None, reason=f"NVRTC not installed: {RUNTIME['nvrtc_error']}")

DEVICES = ["cpu", pytest.param("cuda", marks=needs_gpu)]
# Fewer hypothesis examples under compute-sanitizer (benches/gpu_run.sh), which slows kernels 10-100x.
EXAMPLES = 4 if os.environ.get("TVC_FEW_EXAMPLES") else 40
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
DTYPE_IDS = ["f32", "f16", "bf16"]


def tensor(values, dtype=torch.float32, device="cpu") -> torch.Tensor:
    """float64 values rounded to dtype, on device."""
    return torch.from_numpy(np.asarray(values, dtype=np.float64)).to(dtype).to(device)


def f64(t) -> np.ndarray:
    return t.detach().cpu().to(torch.float64).numpy() if isinstance(t, torch.Tensor) else np.asarray(t, np.float64)


def tol(dtype) -> float:
    return TOLERANCE[str(dtype).removeprefix("torch.")]


def assert_close(got, want: np.ndarray, dtype, scale=1.0):
    t = tol(dtype) * scale
    np.testing.assert_allclose(f64(got), want, rtol=t, atol=t * max(1.0, float(np.abs(want).max(initial=0))))


def assert_on(t, device):
    assert isinstance(t, torch.Tensor) and t.device.type == device, (type(t), getattr(t, "device", None))


def rng(seed):
    return np.random.default_rng(seed)


# ================================================================ compression


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("factor", [1, 2, 3, 4, (2, 3)])
@pytest.mark.parametrize("layout", ["contiguous", "column-slice"])
def test_pool(device, dtype, factor, layout):
    grids = [(1, 9, 7), (2, 5, 6), (1, 1, 1), (1, 36, 36)]
    tokens = sum(t * h * w for t, h, w in grids)
    base = tensor(rng(1).standard_normal((tokens, 32)), dtype, device)
    x = base if layout == "contiguous" else base[:, 3:23]  # strided rows: the scalar kernel
    pooled, new_grids = pool_visual_tokens(x, grids, factor)
    kh, kw = (factor, factor) if isinstance(factor, int) else factor
    want, want_grids = pool_reference(f64(x), grids, kh, kw)
    assert_on(pooled, device) and assert_on(new_grids, device)
    assert pooled.dtype == dtype and new_grids.dtype == torch.int64
    assert_close(pooled, want, dtype)
    np.testing.assert_array_equal(f64(new_grids), want_grids)
    cpu_pooled, _ = pool_visual_tokens(x.cpu(), grids, factor)
    assert_close(pooled, f64(cpu_pooled), dtype)


@pytest.mark.parametrize("device", DEVICES)
def test_pool_many_grids_and_empty(device):
    grids = [(1 + i % 2, 2 + i % 3, 3 + i % 4) for i in range(70)]  # more grids than one launch takes
    tokens = sum(t * h * w for t, h, w in grids)
    x = tensor(rng(2).standard_normal((tokens, 16)), torch.float32, device)
    pooled, _ = pool_visual_tokens(x, torch.tensor(grids, device=device), 2)
    np.testing.assert_allclose(f64(pooled), pool_reference(f64(x), grids, 2, 2)[0], rtol=1e-5, atol=1e-6)
    empty, g = pool_visual_tokens(torch.zeros(0, 8, device=device), [], 4)
    assert tuple(empty.shape) == (0, 8) and tuple(g.shape) == (0, 3)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("group", [1, 2, 7])
@pytest.mark.parametrize("with_lse", [False, True])
def test_scores(device, dtype, group, with_lse):
    kv_heads, q_tokens, k_tokens, head_dim = 2, 3, 300, 64
    g = rng(group)
    q = tensor(g.standard_normal((q_tokens, kv_heads * group, head_dim)) * 2, dtype, device)
    cache = tensor(g.standard_normal((kv_heads, k_tokens + 20, head_dim)) * 2, dtype, device)
    k = cache[:, 10 : 10 + k_tokens].transpose(0, 1)  # a cache slice read in place
    scale = 1 / math.sqrt(head_dim)
    lse = None
    if with_lse:
        extra = g.standard_normal((11, kv_heads, head_dim)) * 2
        full = np.concatenate([f64(k), extra])
        logits = torch.einsum("qhd,khd->qhk", torch.from_numpy(f64(q)), torch.from_numpy(full).repeat_interleave(group, 1)) * scale
        lse = torch.logsumexp(logits, dim=-1).float().to(device)
    got = visual_token_scores(q, k, lse=lse)
    assert_on(got, device) and got.dtype == torch.float32
    want = scores_reference(f64(q), f64(k), None if lse is None else f64(lse), scale)
    np.testing.assert_allclose(f64(got), want, rtol=5e-5, atol=1e-8)
    cpu = visual_token_scores(q.cpu(), k.cpu(), lse=None if lse is None else lse.cpu())
    np.testing.assert_allclose(f64(got), f64(cpu), rtol=5e-5, atol=1e-8)


@settings(max_examples=4 * EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    scores=st.lists(st.one_of(st.sampled_from([0.0, 0.25, 0.5, 1.0]), st.floats(0, 10, width=32)), max_size=300),
    rule=st.sampled_from(["keep", "ratio", "mass"]),
    amount=st.floats(0, 1),
    keep=st.integers(0, 310),
    min_keep=st.integers(0, 4),
    extra=st.one_of(st.none(), st.integers(0, 30)),
    device=st.sampled_from(["cpu", "cuda"] if HAS_GPU else ["cpu"]),
    dtype=st.sampled_from(DTYPES),
)
def test_select(scores, rule, amount, keep, min_keep, extra, device, dtype):
    """Top-k (radix select) and mass (sorted f64 sums in the CPU path's order) give exactly the
    CPU path's indices, ties to the lower index."""
    s = torch.tensor(scores, dtype=torch.float32).to(dtype)
    max_keep = None if extra is None else min_keep + extra
    args = {"keep": keep} if rule == "keep" else {rule: amount}
    got = select_tokens(s.to(device), min_keep=min_keep, max_keep=max_keep, **args)
    assert_on(got, device) and got.dtype == torch.int64
    want = select_reference(s.float().numpy(), min_keep=min_keep, max_keep=max_keep, **args)
    np.testing.assert_array_equal(got.cpu().numpy(), want)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("n", [1296, 16384, 20000])  # 20000: past one block's shared memory (host path)
def test_select_large(device, n):
    g = rng(n)
    probs = torch.from_numpy(g.dirichlet(np.ones(n) * 0.3)).float()
    probs[::7] = probs[3]  # ties
    s = probs.to(device)
    for args in ({"keep": n // 4}, {"ratio": 0.1}, {"mass": 0.9}, {"mass": 1.0}):
        got = select_tokens(s, **args)
        np.testing.assert_array_equal(got.cpu().numpy(), select_reference(probs.numpy(), **args))
    strided = s[::3]
    np.testing.assert_array_equal(select_tokens(strided, keep=50).cpu().numpy(), select_reference(strided.cpu().numpy(), keep=50))


@pytest.mark.parametrize("device", DEVICES)
def test_select_bad_scores(device):
    s = torch.tensor([0.5, 0.1, 0.3, float("nan")], device=device)
    with pytest.raises(ValueError, match="^" + re.escape("scores[3] is NaN")):
        select_tokens(s, mass=0.5)
    with pytest.raises(ValueError, match="^" + re.escape("scores[1] = -0.5: mass selection needs finite, non-negative scores")):
        select_tokens(torch.tensor([0.5, -0.5, 1.0], device=device), mass=0.5)
    with pytest.raises(ValueError, match="^" + re.escape("min_keep (5) must not exceed max_keep (4)")):
        select_tokens(s, keep=3, min_keep=5, max_keep=4)
    with pytest.raises(ValueError, match="^" + re.escape("ratio: expected a share in [0, 1]")):
        select_tokens(torch.tensor([0.5, 0.1], device=device), ratio=1.5)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("merge", [False, True])
@pytest.mark.parametrize("source", ["scores", "indices", "device-indices"])
def test_prune(device, dtype, merge, source):
    grids = [(1, 7, 9), (2, 4, 5), (1, 12, 12)]
    tokens = sum(t * h * w for t, h, w in grids)  # 247: several similarity tiles
    scores = torch.from_numpy(rng(8).random(tokens).astype(np.float32))
    want_idx = select_reference(scores.numpy(), ratio=0.4)
    # The first seed whose rounded inputs have no near-tie a float32 rounding could flip.
    for seed in range(100):
        x = tensor(rng(seed).standard_normal((tokens, 48)), dtype, device)
        if not merge or merge_reference(f64(x), want_idx)[1].min() > 1e-4:
            break
    if source == "scores":
        result = prune_visual_tokens(x, scores=scores.to(device), ratio=0.4, grid_thw=grids, merge=merge)
    elif source == "indices":
        result = prune_visual_tokens(x, want_idx.tolist(), grid_thw=grids, merge=merge)
    else:
        result = prune_visual_tokens(x, torch.from_numpy(want_idx).to(device), grid_thw=torch.tensor(grids), merge=merge)
    for out in result:
        assert_on(out, device)
    np.testing.assert_array_equal(result.indices.cpu().numpy(), want_idx)
    x64 = f64(x)
    if merge:
        want, gaps = merge_reference(x64, want_idx)
        assert gaps.min() > 1e-4
    else:
        want = x64[want_idx]
    assert_close(result.tokens, want, dtype, scale=2 if merge else 1)
    np.testing.assert_array_equal(result.positions.cpu().numpy(), cells_reference(grids, want_idx))
    cpu = prune_visual_tokens(x.cpu(), want_idx.tolist(), merge=merge)
    assert_close(result.tokens, f64(cpu.tokens), dtype, scale=2 if merge else 1)


@pytest.mark.parametrize("device", DEVICES)
def test_prune_edges(device):
    x = tensor(rng(0).standard_normal((6, 4)), torch.float32, device)
    empty = prune_visual_tokens(x, [], merge=True)
    assert tuple(empty.tokens.shape) == (0, 4) and tuple(empty.indices.shape) == (0,)
    everything = prune_visual_tokens(x, list(range(6)), merge=True)
    assert torch.equal(everything.tokens, x)
    x[5] = 0  # a zero vector merges into the first kept token (all similarities 0)
    merged = prune_visual_tokens(x, [0, 2], merge=True).tokens
    np.testing.assert_allclose(f64(merged), merge_reference(f64(x), np.array([0, 2]))[0], rtol=1e-5, atol=1e-6)


# ================================================================ KV cache


def rope_kwargs(case):
    kwargs = {k: case[k] for k in ("rope_theta", "head_dim", "rotary_dim", "interleaved", "mrope_section")}
    # Drawn by rope_cases for some M-RoPE cases: the interleaved (Qwen3-VL) frequency map.
    return dict(kwargs, mrope_interleaved=case.get("mrope_interleaved", False))


def delta_for(kind, g, n, mrope, span, device):
    """(delta argument, [n, 3] int deltas) of the given kind; "device" puts per-token deltas on the GPU."""
    if kind == "int":
        d = int(g.integers(-span, span))
        return d, np.full((n, 3), d)
    if kind == "thw" and mrope:
        d = g.integers(-span, span, size=(n, 3))
        return torch.from_numpy(d).to(device), d
    d = g.integers(-span, span, size=n)
    arg = torch.from_numpy(d.astype(np.int32)).to(device) if kind == "device" else d
    return arg, np.repeat(d[:, None], 3, 1)


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(
    case=rope_cases(),
    tokens=st.integers(0, 40),
    heads=st.integers(1, 4),
    layers=st.integers(1, 3),
    dtype=st.sampled_from(DTYPES),
    layout=st.sampled_from(["contiguous", "transposed", "padded"]),
    delta_kind=st.sampled_from(["int", "per_token", "thw", "device"]),
    seed=st.integers(0, 2**32 - 1),
    device=st.sampled_from(["cpu", "cuda"] if HAS_GPU else ["cpu"]),
)
def test_rerotate(case, tokens, heads, layers, dtype, layout, delta_kind, seed, device):
    g = rng(seed)
    mrope = case["mrope_section"] is not None
    d = case["head_dim"]
    delta, d3 = delta_for(delta_kind, g, tokens, mrope, 70_000, device)
    stores, views, before = [], [], []
    for _ in range(layers):
        base = tensor(g.uniform(-1, 1, size=(tokens, heads, d)), dtype, device)
        if layout == "transposed":  # a transformers layer [heads, seq, dim] seen as [seq, heads, dim]
            store = base.transpose(0, 1).contiguous()
            view = store.transpose(0, 1)
        elif layout == "padded":  # every other head of a wider buffer
            store = torch.zeros(tokens, 2 * heads, d + 3, dtype=dtype, device=device)
            view = store[:, ::2, 1 : d + 1]
            view.copy_(base)
        else:
            store = view = base
        stores.append(store)
        views.append(view)
        before.append(f64(view))
    rerotate_keys(views if layers > 1 else views[0], delta, **rope_kwargs(case))
    for view, store, b in zip(views, stores, before):
        np.testing.assert_allclose(f64(view), ref_rotate(b, d3, **case), atol=ATOL[dtype], rtol=0)
        if layout == "padded":
            full = f64(store)
            assert not full[:, 1::2].any() and not full[..., 0].any() and not full[..., d + 1 :].any()


@pytest.mark.parametrize("device", DEVICES)
def test_rerotate_large_positions(device):
    case = dict(rope_theta=1e6, head_dim=128, rotary_dim=128)
    x = rng(1).uniform(-1, 1, size=(4, 2, 128))
    p = np.array([1_000_000, 32_768, 5, 2_000_000_000])
    d = np.array([-999_999, 7, 1 << 20, -3])
    keys = tensor(ref_rotate(x, p, **case), torch.float32, device)
    rerotate_keys(keys, torch.from_numpy(d).to(device), **case)
    np.testing.assert_allclose(f64(keys), ref_rotate(x, p + d, **case), atol=2e-6, rtol=0)


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    case=rope_cases(),
    batch=st.integers(1, 2),
    heads=st.integers(1, 3),
    layers=st.integers(1, 3),
    seq=st.integers(0, 90),
    cut=st.tuples(st.integers(0, 90), st.integers(0, 90), st.integers(0, 90)),
    dtype=st.sampled_from(DTYPES),
    delta_kind=st.sampled_from(["default", "int", "per_token", "many", "thw", "device"]),
    seed=st.integers(0, 2**32 - 1),
    device=st.sampled_from(["cpu", "cuda"] if HAS_GPU else ["cpu"]),
)
def test_relocate(case, batch, heads, layers, seq, cut, dtype, delta_kind, seed, device):
    """Overlapping moves (the span shorter than what follows it) included; "many": more distinct
    deltas than the kernel's shared table holds."""
    g = rng(seed)
    start, end, length = sorted(min(c, seq) for c in cut)
    n = length - end
    mrope = case["mrope_section"] is not None
    d = case["head_dim"]
    keys = [tensor(g.uniform(-1, 1, size=(batch, heads, seq, d)), dtype, device) for _ in range(layers)]
    values = [tensor(g.uniform(-1, 1, size=(batch, heads, seq, d + 2)), dtype, device) for _ in range(layers)]
    kb, vb = [f64(k) for k in keys], [f64(v) for v in values]
    kwargs = {}
    if delta_kind == "default" and not mrope:
        delta = -(end - start)
    elif delta_kind == "many":
        delta = kwargs["delta"] = g.integers(-1000, 1000, size=n)
    else:
        arg, d3 = delta_for({"default": "per_token"}.get(delta_kind, delta_kind), g, n, mrope, 1000, device)
        kwargs["delta"] = arg
        delta = d3
    new_len = relocate_span(keys, values, start, end, length=length, **kwargs, **rope_kwargs(case))
    assert new_len == length - (end - start)
    want_k, want_v = ref_relocate(kb, vb, start, end, length, delta, case)
    for l in range(layers):
        np.testing.assert_allclose(f64(keys[l])[:, :, :new_len], want_k[l], atol=ATOL[dtype], rtol=0)
        np.testing.assert_array_equal(f64(values[l])[:, :, :new_len], want_v[l])
        np.testing.assert_array_equal(f64(keys[l])[:, :, length:], kb[l][:, :, length:])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("span", [(40, 100), (5, 6), (100, 1200)])
@pytest.mark.parametrize("family", ["qwen2_vl", "qwen3_vl"])
def test_relocate_long_cache(device, dtype, span, family):
    """A cache long enough for many tiles per lane, with the span shorter than what follows it
    (moves overlap, order matters) and longer (moves split over blocks); Qwen2-VL's contiguous
    and Qwen3-VL's interleaved M-RoPE."""
    g = rng(span[0])
    if family == "qwen2_vl":
        case = dict(rope_theta=1e6, head_dim=128, mrope_section=[16, 24, 24])
    else:
        case = dict(rope_theta=5e6, head_dim=128, mrope_section=[24, 20, 20], mrope_interleaved=True)
    seq, (start, end) = 1500, span
    keys = [tensor(g.uniform(-1, 1, size=(1, 4, seq, 128)), dtype, device) for _ in range(2)]
    values = [tensor(g.uniform(-1, 1, size=(1, 4, seq, 128)), dtype, device) for _ in range(2)]
    kb, vb = [f64(k) for k in keys], [f64(v) for v in values]
    delta = np.array([-3, -17, -8])
    new_len = relocate_span(keys, values, start, end, delta=np.tile(delta, (seq - end, 1)), **case)
    want_k, want_v = ref_relocate(kb, vb, start, end, seq, np.tile(delta, (seq - end, 1)), dict(case, rotary_dim=128))
    for l in range(2):
        np.testing.assert_allclose(f64(keys[l])[:, :, :new_len], want_k[l], atol=ATOL[dtype], rtol=0)
        np.testing.assert_array_equal(f64(values[l])[:, :, :new_len], want_v[l])


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    data=st.data(),
    case=rope_cases(),
    batch=st.integers(1, 2),
    heads=st.integers(1, 3),
    layers=st.integers(1, 3),
    seq=st.integers(0, 90),
    dtype=st.sampled_from(DTYPES),
    delta_kind=st.sampled_from(["default", "int", "per_token", "thw", "device"]),
    seed=st.integers(0, 2**32 - 1),
    device=st.sampled_from(["cpu", "cuda"] if HAS_GPU else ["cpu"]),
)
def test_relocate_spans(data, case, batch, heads, layers, seq, dtype, delta_kind, seed, device):
    """Several spans in one call (adjacent and empty ones included), spans given as host data."""
    g = rng(seed)
    spans, length = data.draw(span_lists(seq))
    start = spans[0][0] if spans else length
    kept = [p for p in range(start, length) if not any(s <= p < e for s, e in spans)]
    mrope = case["mrope_section"] is not None
    d = case["head_dim"]
    keys = [tensor(g.uniform(-1, 1, size=(batch, heads, seq, d)), dtype, device) for _ in range(layers)]
    values = [tensor(g.uniform(-1, 1, size=(batch, heads, seq, d + 2)), dtype, device) for _ in range(layers)]
    kb, vb = [f64(k) for k in keys], [f64(v) for v in values]
    kwargs = {}
    if delta_kind == "default" and not mrope:
        delta = shift_deltas(spans, kept)
    else:
        kwargs["delta"], delta = delta_for({"default": "per_token"}.get(delta_kind, delta_kind), g, len(kept), mrope, 1000, device)
    new_len = tvc_rs.relocate_spans(keys, values, spans, length=length, **kwargs, **rope_kwargs(case))
    assert new_len == start + len(kept)
    want_k, want_v, _ = ref_relocate_spans(kb, vb, spans, length, delta if kept else 0, case)
    for l in range(layers):
        np.testing.assert_allclose(f64(keys[l])[:, :, :new_len], want_k[l], atol=ATOL[dtype], rtol=0)
        np.testing.assert_array_equal(f64(values[l])[:, :, :new_len], want_v[l])
        np.testing.assert_array_equal(f64(keys[l])[:, :, length:], kb[l][:, :, length:])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("spans", [[(40, 100), (300, 900), (1000, 1010)], [(10, 1200), (1300, 1310), (1310, 1320)]],
                         ids=["overlapping", "segments"])
def test_relocate_spans_long_cache(device, dtype, spans):
    """Qwen2-VL shapes, 3 spans: sources overlapping destinations (one block per lane) and not
    (rows split over blocks, each looking its run up)."""
    g = rng(spans[0][1])
    case = dict(rope_theta=1e6, head_dim=128, mrope_section=[16, 24, 24])
    seq = 1500
    keys = [tensor(g.uniform(-1, 1, size=(1, 4, seq, 128)), dtype, device) for _ in range(2)]
    values = [tensor(g.uniform(-1, 1, size=(1, 4, seq, 128)), dtype, device) for _ in range(2)]
    kb, vb = [f64(k) for k in keys], [f64(v) for v in values]
    n = seq - spans[0][0] - sum(e - s for s, e in spans)
    delta = g.integers(-3000, 0, size=(n, 3))
    new_len = tvc_rs.relocate_spans(keys, values, spans, delta=delta, **case)
    want_k, want_v, _ = ref_relocate_spans(kb, vb, spans, seq, delta, dict(case, rotary_dim=128))
    assert new_len == spans[0][0] + n
    for l in range(2):
        np.testing.assert_allclose(f64(keys[l])[:, :, :new_len], want_k[l], atol=ATOL[dtype], rtol=0)
        np.testing.assert_array_equal(f64(values[l])[:, :, :new_len], want_v[l])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("positions", ["list", "start"])
@pytest.mark.parametrize(
    "rope",
    [
        dict(rotary_dim=24, mrope_section=[4, 4, 4]),
        # Qwen3.5-like: partial rotary, NeoX pairs, interleaved map.
        dict(rotary_dim=16, mrope_section=[3, 3, 2], mrope_interleaved=True),
        # GLM-4.1V-like: partial rotary, adjacent (GPT-J) pairs, contiguous sections.
        dict(rotary_dim=12, interleaved=True, mrope_section=[2, 2, 2]),
    ],
    ids=["qwen2_vl", "qwen3_5", "glm4v"],
)
def test_append(device, dtype, positions, rope):
    g = rng(8)
    batch, heads, seq, n, d = 2, 2, 13, 5, 24
    case = dict(rope_theta=1e4, head_dim=d, **rope)
    keys = [tensor(g.uniform(-1, 1, size=(batch, heads, seq, d)), dtype, device) for _ in range(2)]
    values = [tensor(g.uniform(-1, 1, size=(batch, heads, seq, d)), dtype, device) for _ in range(2)]
    new_k = [tensor(g.uniform(-1, 1, size=(batch, heads, n, d)), dtype, device) for _ in range(2)]
    new_v = [tensor(g.uniform(-1, 1, size=(batch, heads, n, d)), dtype, device) for _ in range(2)]
    kb, vb, nkb, nvb = ([f64(t) for t in ts] for ts in (keys, values, new_k, new_v))
    pos = g.permutation(seq)[:n] if positions == "list" else np.arange(4, 4 + n)
    delta = g.integers(-400, 400, size=(n, 3))
    append_entries(keys, values, new_k, new_v, pos if positions == "list" else 4, delta=torch.from_numpy(delta).to(device), **case)
    for l in range(2):
        want_k, want_v = kb[l].copy(), vb[l].copy()
        want_k[:, :, pos] = np.moveaxis(ref_rotate(np.moveaxis(nkb[l], 2, 0), delta, **case), 0, 2)
        want_v[:, :, pos] = nvb[l]
        np.testing.assert_allclose(f64(keys[l]), want_k, atol=ATOL[dtype], rtol=0)
        np.testing.assert_array_equal(f64(values[l]), want_v)
    append_entries(keys, values, new_k, new_v, seq - n)  # no delta: a plain write
    for l in range(2):
        np.testing.assert_array_equal(f64(keys[l])[:, :, seq - n :], nkb[l])


LAYOUTS = ["vllm-nhd", "vllm-hnd", "kv_blocks", "blocks_kv"]


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
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
    device=st.sampled_from(["cpu", "cuda"] if HAS_GPU else ["cpu"]),
)
def test_paged_round_trip(case, layout, dtype, heads, block_size, tokens, span, same_table, seed, device):
    """As test_kv's round trip: entries written through a block table, a span evicted, the
    followers reinjected at their new positions (in place within the same blocks, or into a
    fresh table reusing blocks), read back equal to the reference."""
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
    before = [c.clone() for c in caches]
    on_device = [c.to(device) for c in caches]  # .to keeps the (permuted) strides
    assert all(a.stride() == b.stride() for a, b in zip(on_device, caches))
    moved = paged_reinject(on_device, torch.from_numpy(slots[end:].copy()), new_slots.astype(np.int32), delta, layout=name, **case)
    assert moved == n
    for c, b in zip(on_device, before):
        c = c.cpu()
        got_k, got_v = read_slots(c, name, d, new_slots)
        stored_k, stored_v = read_slots(b, name, d, slots[end:])
        np.testing.assert_allclose(got_k, ref_rotate(stored_k, d3, **case), atol=ATOL[dtype], rtol=0)
        np.testing.assert_array_equal(got_v, stored_v)
        untouched = np.setdiff1d(np.arange(num_blocks * block_size), new_slots)
        np.testing.assert_array_equal(read_slots(c, name, d, untouched)[0], read_slots(b, name, d, untouched)[0])
        np.testing.assert_array_equal(read_slots(c, name, d, untouched)[1], read_slots(b, name, d, untouched)[1])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_paged_cycles_chains_and_block_views(device, dtype):
    """vLLM 0.33 views of one buffer for all layers (as_strided, blocks outermost), with moves on
    a cycle (slots swapped), a long chain (shift by one slot) and skipped pairs."""
    g = rng(9)
    L, B, H, N, D = 3, 6, 2, 4, 64
    raw = tensor(g.standard_normal(L * B * H * N * 2 * D), dtype, device)
    page = H * N * 2 * D
    views = [raw.as_strided((B, H, N, 2 * D), (L * page, N * 2 * D, 2 * D, 1), l * page) for l in range(L)]
    before = [f64(v) for v in views]
    src = np.array([0, 1, 5, 6, 7, 8, 9, 10, 11, -1])
    dst = np.array([1, 0, 4, 5, 6, 7, 8, 9, 10, 3])
    delta = np.array([-3, 3, 100, -1, -1, -1, -1, -1, -1, 0])
    case = dict(rope_theta=1e4, head_dim=D)
    assert paged_reinject(views, src, dst, delta, **case) == 9
    keep = src >= 0
    for v, b in zip(views, before):
        kb = b.transpose(0, 2, 1, 3).reshape(B * N, H, 2 * D)
        ka = f64(v).transpose(0, 2, 1, 3).reshape(B * N, H, 2 * D)
        s, t, dl = src[keep], dst[keep], delta[keep]
        np.testing.assert_allclose(ka[t, :, :D], ref_rotate(kb[s, :, :D], dl, rotary_dim=D, rope_theta=1e4), atol=ATOL[dtype], rtol=0)
        np.testing.assert_array_equal(ka[t, :, D:], kb[s, :, D:])
        rest = np.setdiff1d(np.arange(B * N), t)
        np.testing.assert_array_equal(ka[rest], kb[rest])


# ================================================================ GPU only: streams, errors


@needs_gpu
def test_runs_on_the_current_stream():
    """Work is queued on torch.cuda.current_stream(): on a side stream the result is there once
    that stream is synchronised, and inputs produced on that stream are read after they are."""
    case = dict(rope_theta=1e4, head_dim=64)
    x = rng(3).uniform(-1, 1, size=(2000, 4, 64))
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        keys = torch.from_numpy(x).float().to("cuda", non_blocking=True) * 1.0
        rerotate_keys(keys, 17, **case)
        pooled, _ = pool_visual_tokens(keys.reshape(2000, 256), [(1, 40, 50)], 2)
    side.synchronize()
    np.testing.assert_allclose(f64(keys), ref_rotate(x, np.full(2000, 17), **case, rotary_dim=64), atol=2e-6, rtol=0)
    assert pooled.shape == (500, 256)


@needs_gpu
def test_gpu_bad_input():
    x = torch.randn(42, 8, device="cuda")
    with pytest.raises(TypeError, match="^" + re.escape("x: expected dtype float32, float16 or bfloat16, got float64")):
        pool_visual_tokens(x.double(), [(1, 6, 7)], 2)
    # float64 caches are taken on the CPU only.
    with pytest.raises(TypeError, match="^" + re.escape("keys: float64 tensors are supported on the CPU only, got one on cuda:0")):
        rerotate_keys(torch.randn(5, 2, 8, device="cuda", dtype=torch.float64), 1, rope_theta=1e4, head_dim=8)
    with pytest.raises(ValueError, match="^" + re.escape("grid_thw: the grids hold 36 tokens")):
        pool_visual_tokens(x, [(1, 6, 6)], 2)
    with pytest.raises(ValueError, match="^" + re.escape("keys: expected a tensor on cuda:0 (the device of query), got one on cpu")):
        visual_token_scores(torch.randn(1, 2, 4, device="cuda"), torch.randn(3, 2, 4))
    with pytest.raises(ValueError, match="^" + re.escape("keys: expected a CPU tensor like the other arguments, got one on cuda:0")):
        visual_token_scores(torch.randn(1, 2, 4), torch.randn(3, 2, 4, device="cuda"))
    with pytest.raises(IndexError, match="^" + re.escape("indices[1] = 42 is out of range")):
        prune_visual_tokens(x, [0, 42])
    keys = torch.randn(5, 2, 8, device="cuda")
    before = keys.clone()
    with pytest.raises(ValueError, match="^" + re.escape("keys[1]: expected a tensor on cuda:0 (the device of keys), got one on cpu")):
        rerotate_keys([keys, torch.randn(5, 2, 8)], 1, rope_theta=1e4, head_dim=8)
    with pytest.raises(ValueError, match=re.escape("delta has 4 entries")):
        rerotate_keys(keys, torch.arange(4, device="cuda"), rope_theta=1e4, head_dim=8)
    with pytest.raises(ValueError, match=re.escape("keys[0] and keys[1] share memory")):
        rerotate_keys([keys, keys], 1, rope_theta=1e4, head_dim=8)
    assert torch.equal(keys, before)
    with pytest.raises(ValueError, match="^" + re.escape("x: cannot be read through DLPack: ") + ".*" + re.escape("detach")):
        pool_visual_tokens(torch.randn(4, 3, device="cuda", requires_grad=True), [(1, 2, 2)], 2)


@pytest.mark.skipif(torch.cuda.device_count() < 2 or not HAS_GPU, reason="needs two CUDA devices")
def test_tensors_on_two_devices_are_refused():
    with pytest.raises(ValueError, match="^" + re.escape("keys: expected a tensor on cuda:0 (the device of query), got one on cuda:1")):
        visual_token_scores(torch.randn(1, 2, 4, device="cuda:0"), torch.randn(3, 2, 4, device="cuda:1"))
    x = torch.randn(12, 4, device="cuda:1")  # a device other than the current one works
    pooled, _ = pool_visual_tokens(x, [(1, 3, 4)], 2)
    assert pooled.device == x.device


# ================================================================ runtime (no GPU needed)


@needs_nvrtc
@pytest.mark.parametrize("arch", [80, 90])
@pytest.mark.parametrize("file", ["compress.cu", "kv.cu"])
def test_nvrtc_compiles_every_kernel(file, arch):
    cubin, log, ptx = _native._cuda_compile(file, arch)
    assert cubin[:4] == b"\x7fELF" and ptx is None
    report = _native._cuda_parse_ptxas(log)
    names = {k["kernel"] for k in report}
    wanted = {"pool_bf16_v", "select_topk", "select_mass", "similarity_f16"} if file == "compress.cu" else {
        f"{op}_{t}_{v}_{p}" for op in ("rerotate", "relocate", "append", "paged") for t in ("f32", "f16", "bf16") for v in "vs" for p in ("neox", "gptj")
    }
    assert wanted <= names, wanted - names
    for k in report:
        assert 0 < k["registers"] <= 255 and k["spill_store_bytes"] == 0 and k["spill_load_bytes"] == 0, k


@needs_nvrtc
def test_check_command(tmp_path):
    out = tmp_path / "report.json"
    run = subprocess.run(
        [sys.executable, "-m", "tvc_rs.cuda", "--check", "--arch", "90", "--json", str(out)],
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    report = json.loads(out.read_text())
    assert report["errors"] == [] and len(report["kernels"]) > 60
    assert {k["arch"] for k in report["kernels"]} == {"sm_90"}
    assert "0 errors" in run.stdout


CACHE_SCRIPT = """
import json, sys, tvc_rs
from tvc_rs import _native
cubin, cached = _native._cuda_cached_cubin("compress.cu", 80)
print(json.dumps({"cached": cached, "size": len(cubin), "head": cubin[:4].hex(), "path": _native._cuda_cache_path("compress.cu", 80)}))
"""


@needs_nvrtc
def test_disk_cache_from_several_processes(tmp_path):
    env = dict(os.environ, TVC_CACHE_DIR=str(tmp_path))
    procs = [subprocess.Popen([sys.executable, "-c", CACHE_SCRIPT], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(3)]
    results = []
    for p in procs:
        out, err = p.communicate(timeout=900)
        assert p.returncode == 0, err
        results.append(json.loads(out))
    assert {r["head"] for r in results} == {"7f454c46"} and len({r["size"] for r in results}) == 1
    path = Path(results[0]["path"])
    assert path.parent == tmp_path / "kernels" and path.name.startswith("compress-sm80-nvrtc")
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]  # no temporary files left
    again = json.loads(subprocess.run([sys.executable, "-c", CACHE_SCRIPT], env=env, capture_output=True, text=True, check=True).stdout)
    assert again["cached"] and again["size"] == results[0]["size"]
    # The key follows architecture and source file.
    assert _native._cuda_cache_path("compress.cu", 90) != _native._cuda_cache_path("compress.cu", 80)
    assert _native._cuda_cache_path("kv.cu", 80) != _native._cuda_cache_path("compress.cu", 80)


class CudaProducer:
    """A DLPack producer that says it lives on cuda:0 (what a CUDA tensor says before export)."""

    def __dlpack_device__(self):
        return (2, 0)

    def __dlpack__(self, **kwargs):
        raise BufferError("no memory behind this producer")


@pytest.mark.skipif(RUNTIME["driver_version"] is not None, reason="a CUDA driver is present")
def test_without_a_driver_cuda_calls_raise_clearly():
    assert "no CUDA driver" in RUNTIME["driver_error"] and RUNTIME["device_count"] == 0
    assert not tvc_cuda.is_available()
    for call in (
        lambda: pool_visual_tokens(CudaProducer(), [(1, 2, 2)], 2),
        lambda: rerotate_keys(CudaProducer(), 1, rope_theta=1e4, head_dim=8),
        lambda: paged_reinject([CudaProducer()], [0], [1], 1, rope_theta=1e4, head_dim=8),
        lambda: tvc_cuda.warmup(0),
    ):
        with pytest.raises(RuntimeError, match=re.escape("no CUDA driver: libcuda.so.1 could not be loaded")):
            call()
    # The CPU path is unaffected.
    pooled, _ = pool_visual_tokens(np.ones((4, 2), np.float32), [(1, 2, 2)], 2)
    assert pooled.tolist() == [[1.0, 1.0]]


def test_without_nvrtc_compiling_raises_clearly():
    script = (
        "import tvc_rs\nfrom tvc_rs import _native\n_native._cuda_set_search_dirs([])\n"
        "try:\n    _native._cuda_compile('kv.cu', 90)\nexcept RuntimeError as e:\n    print('RuntimeError:', e)\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("TVC_NVRTC", "CUDA_HOME", "CUDA_PATH", "LD_LIBRARY_PATH")}
    env["TVC_NVRTC"] = "/nonexistent/libnvrtc.so.13"
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    if "RuntimeError:" not in out.stdout and out.returncode == 0:
        pytest.skip("an NVRTC is installed system-wide (found on the loader's path)")
    assert out.returncode == 0, out.stderr
    assert "NVRTC (the CUDA runtime compiler) was not found" in out.stdout
    assert "/nonexistent/libnvrtc.so.13 (from $TVC_NVRTC)" in out.stdout
    assert "pip install nvidia-cuda-nvrtc" in out.stdout


def test_info_and_exports():
    assert set(RUNTIME) >= {"driver_version", "device_count", "nvrtc_path", "nvrtc_version", "nvrtc_archs", "cache_dir", "kernel_files"}
    assert RUNTIME["kernel_files"] == ["compress.cu", "kv.cu"]
    assert tvc_rs.cuda is tvc_cuda and callable(tvc_cuda.check)
    from tvc_rs._cuda_paths import nvrtc_dirs

    assert all(Path(d).name == "lib" and Path(d).parent.parent.name == "nvidia" for d in nvrtc_dirs())
