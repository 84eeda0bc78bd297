"""tvc_rs.kv against float64 references written here, a real transformers Qwen2-VL model, and
vLLM's paged layouts; bad input raises naming the argument and leaves every cache untouched."""

from __future__ import annotations

import numpy as np
import pytest
import re
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import tvc_rs
from tvc_rs import append_entries, paged_reinject, relocate_span, rerotate_keys

# ------------------------------------------------------------------ float64 reference


def pair_components(rotary_dim: int, mrope_section, mrope_interleaved: bool = False) -> np.ndarray:
    """Which position component (0 = t, 1 = h, 2 = w) turns each frequency pair."""
    if mrope_section is None:
        return np.zeros(rotary_dim // 2, dtype=np.int64)
    if mrope_interleaved:
        # Qwen3-VL: t everywhere, then every third pair from 1 (h) and from 2 (w), as far as
        # 3 * section; slices clip at the end, as transformers' apply_interleaved_mrope does.
        comp = np.zeros(rotary_dim // 2, dtype=np.int64)
        comp[1 : 3 * mrope_section[1] : 3] = 1
        comp[2 : 3 * mrope_section[2] : 3] = 2
        return comp
    return np.concatenate([np.full(n, j % 3) for j, n in enumerate(mrope_section)]).astype(np.int64)


def ref_rotate(
    x, delta, *, rope_theta, rotary_dim=None, interleaved=False, mrope_section=None, head_dim=None,
    mrope_interleaved=False,
):
    """x: [tokens, ..., head_dim] rotated by delta ([tokens] or [tokens, 3]), in float64."""
    x = np.asarray(x, dtype=np.float64)
    rotary_dim = rotary_dim or x.shape[-1]
    d = np.asarray(delta, dtype=np.int64)
    if d.ndim == 0:
        d = np.full(x.shape[0], int(d))
    if d.ndim == 1:
        d = np.repeat(d[:, None], 3, axis=1)
    half = rotary_dim // 2
    inv_freq = 1.0 / rope_theta ** (np.arange(0, rotary_dim, 2, dtype=np.float64) / rotary_dim)
    angles = d[:, pair_components(rotary_dim, mrope_section, mrope_interleaved)].astype(np.float64) * inv_freq
    angles = angles.reshape(x.shape[0], *([1] * (x.ndim - 2)), half)
    cos, sin = np.cos(angles), np.sin(angles)
    i1 = np.arange(0, rotary_dim, 2) if interleaved else np.arange(half)
    i2 = i1 + 1 if interleaved else i1 + half
    out = x.copy()
    out[..., i1] = x[..., i1] * cos - x[..., i2] * sin
    out[..., i2] = x[..., i2] * cos + x[..., i1] * sin
    return out


# ------------------------------------------------------------------ tensors of every kind

KINDS = [
    ("numpy", np.float32),
    ("numpy", np.float16),
    ("torch", torch.float32),
    ("torch", torch.float16),
    ("torch", torch.bfloat16),
    ("numpy", np.float64),  # CPU only, computed in f32
    ("torch", torch.float64),
]
KIND_IDS = [f"{k}-{str(d).split('.')[-1].strip(chr(39) + '>')}" for k, d in KINDS]
# One rounding of the result plus the f32 arithmetic, for values of magnitude <= ~2.
ATOL = {np.float32: 2e-6, torch.float32: 2e-6, np.float64: 2e-6, torch.float64: 2e-6, np.float16: 2e-3, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def make(values, kind):
    lib, dtype = kind
    if lib == "numpy":
        return np.asarray(values).astype(dtype)
    return torch.from_numpy(np.asarray(values, dtype=np.float64)).to(dtype)


def f64(t) -> np.ndarray:
    if isinstance(t, torch.Tensor):
        return t.detach().to(torch.float64).numpy()
    return np.asarray(t, dtype=np.float64)


def snapshot(tensors):
    return [f64(t).copy() for t in tensors]


def assert_untouched(tensors, before):
    for t, b in zip(tensors, before):
        np.testing.assert_array_equal(f64(t), b)


rng = np.random.default_rng


# ------------------------------------------------------------------ rerotate_keys


@st.composite
def rope_cases(draw):
    half = draw(st.integers(1, 24))
    rotary_dim = 2 * half
    head_dim = rotary_dim + draw(st.integers(0, 6))
    sections = None
    if draw(st.booleans()):
        a = draw(st.integers(0, half))
        b = draw(st.integers(a, half))
        sections = [a, b - a, half - b]
    case = dict(
        rope_theta=draw(st.sampled_from([10000.0, 1e6, 500.0])),
        head_dim=head_dim,
        rotary_dim=rotary_dim,
        interleaved=draw(st.booleans()),
        mrope_section=sections,
    )
    # The interleaved frequency map (Qwen3-VL), with either pair layout and partial rotary.
    if sections is not None and draw(st.booleans()):
        case["mrope_interleaved"] = True
    return case


def layout_view(base, layout):
    """A [tokens, heads, head_dim] view of fresh memory holding `base`, laid out as `layout`."""
    t, h, d = base.shape
    if layout == "contiguous":
        return base, base
    if layout == "transposed":  # a transformers layer [heads, seq, dim] seen as [seq, heads, dim]
        store = base.transpose(1, 0, 2).copy() if isinstance(base, np.ndarray) else base.transpose(0, 1).contiguous()
        return store, store.transpose(1, 0, 2) if isinstance(store, np.ndarray) else store.transpose(0, 1)
    if layout == "padded":  # rows inside a wider buffer, every other head
        shape = (t, 2 * h, d + 3)
        store = np.zeros(shape, dtype=base.dtype) if isinstance(base, np.ndarray) else torch.zeros(shape, dtype=base.dtype)
        view = store[:, ::2, 1 : d + 1]
        view[...] = base
        return store, view
    raise AssertionError(layout)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    case=rope_cases(),
    tokens=st.integers(0, 17),
    heads=st.integers(0, 4),
    kind=st.sampled_from(KINDS),
    layout=st.sampled_from(["contiguous", "transposed", "padded"]),
    delta_kind=st.sampled_from(["int", "per_token", "thw"]),
    big=st.booleans(),
    seed=st.integers(0, 2**32 - 1),
)
def test_rerotate_equals_rope_at_shifted_positions(case, tokens, heads, kind, layout, delta_kind, big, seed):
    g = rng(seed)
    span = 70_000 if big else 400
    mrope = case["mrope_section"] is not None
    if delta_kind == "thw" and not mrope:
        delta_kind = "per_token"
    pos = g.integers(0, span, size=(tokens, 3)) if mrope else np.repeat(g.integers(0, span, size=(tokens, 1)), 3, 1)
    if delta_kind == "int":
        delta = int(g.integers(-span, span))
        d3 = np.full((tokens, 3), delta)
    elif delta_kind == "per_token":
        delta = g.integers(-span, span, size=tokens)
        d3 = np.repeat(delta[:, None], 3, 1)
    else:
        delta = g.integers(-span, span, size=(tokens, 3))
        d3 = delta
    x = g.uniform(-1, 1, size=(tokens, heads, case["head_dim"]))
    keys_at_p = ref_rotate(x, pos, **case)
    want = ref_rotate(x, pos + d3, **case)
    store, keys = layout_view(make(keys_at_p, kind), layout)
    stored = f64(keys).copy()
    if isinstance(delta, np.ndarray) and g.integers(2):
        delta = torch.from_numpy(delta.astype(np.int32 if g.integers(2) else np.int64))
    rerotate_keys(keys, delta, **case)
    got = f64(keys)
    # The kernel's own error: one rounding of the result.
    np.testing.assert_allclose(got, ref_rotate(stored, d3, **case), rtol=0, atol=ATOL[kind[1]])
    # R(p + d) = R(d) R(p): equal to the keys built at p + d, up to the rounding of the input too.
    np.testing.assert_allclose(got, want, rtol=0, atol=2 * ATOL[kind[1]])
    if layout == "padded":  # nothing outside the view was written
        full = f64(store)
        assert not full[:, 1::2].any() and not full[..., 0].any() and not full[..., case["head_dim"] + 1 :].any()


def test_rerotate_large_positions_stay_exact_in_float32():
    # The f32 angle p * inv_freq at p ~ 1e6 is off by ~0.06 rad; the rotation by the integer delta is not.
    case = dict(rope_theta=1e6, head_dim=128, rotary_dim=128)
    g = rng(1)
    x = g.uniform(-1, 1, size=(4, 2, 128))
    p = np.array([1_000_000, 32_768, 5, 2_000_000_000])
    d = np.array([-999_999, 7, 1 << 20, -3])
    keys = torch.from_numpy(ref_rotate(x, p, **case)).float()
    rerotate_keys(keys, torch.from_numpy(d), **case)
    np.testing.assert_allclose(f64(keys), ref_rotate(x, p + d, **case), atol=2e-6, rtol=0)


def test_rerotate_all_layers_in_one_call_and_sections_other_than_qwen():
    g = rng(2)
    case = dict(rope_theta=1e6, head_dim=128, mrope_section=[16, 24, 24])
    layers = [torch.from_numpy(g.standard_normal((33, 4, 128))).float() for _ in range(3)]
    before = snapshot(layers)
    delta = g.integers(-5000, 5000, size=(33, 3))
    rerotate_keys(layers, delta, **case)
    for layer, b in zip(layers, before):
        np.testing.assert_allclose(f64(layer), ref_rotate(b, delta, rotary_dim=128, **case), atol=1e-5, rtol=0)
    # Partial rotary with sections summing to rotary_dim / 2, and more than three sections.
    for sections, rotary_dim in [([8, 12, 12], 64), ([4, 4, 4, 4], 32), ([0, 10, 6], 32)]:
        keys = g.standard_normal((9, 2, 80)).astype(np.float32)
        b = keys.astype(np.float64)
        d = g.integers(-300, 300, size=(9, 3))
        rerotate_keys(keys, d, rope_theta=1e4, head_dim=80, rotary_dim=rotary_dim, mrope_section=sections)
        want = ref_rotate(b, d, rope_theta=1e4, rotary_dim=rotary_dim, mrope_section=sections)
        np.testing.assert_allclose(keys, want, atol=1e-5, rtol=0)
        np.testing.assert_array_equal(keys[..., rotary_dim:], b[..., rotary_dim:])


# ------------------------------------------------------------------ transformers Qwen2-VL


@pytest.fixture(scope="module")
def qwen2_vl():
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    config = Qwen2VLConfig(
        text_config=dict(
            vocab_size=128,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=1,  # GQA
            rope_parameters=dict(rope_type="default", rope_theta=10000.0, mrope_section=[4, 6, 6]),
            bos_token_id=None,
            eos_token_id=None,
        ),
        vision_config=dict(depth=1, embed_dim=32, hidden_size=64, num_heads=2, mlp_ratio=2),
        image_token_id=120,
        video_token_id=121,
        vision_start_token_id=122,
        vision_end_token_id=123,
    )
    torch.manual_seed(0)
    model = Qwen2VLForConditionalGeneration(config).eval()
    return model, config


def model_cache(model, input_ids, position_ids):
    """The model's own DynamicCache after a forward pass with explicit [3, 1, seq] position ids."""
    from transformers import DynamicCache

    cache = DynamicCache()
    with torch.no_grad():
        model(input_ids=input_ids, position_ids=position_ids, cache=cache, use_cache=True)
    return cache


ROPE_QWEN = dict(rope_theta=10000.0, head_dim=32, mrope_section=[4, 6, 6])


@pytest.mark.parametrize("three_d", [False, True], ids=["text-positions", "3d-positions"])
def test_rerotated_keys_equal_qwen2vl_keys_at_shifted_positions(qwen2_vl, three_d):
    model, config = qwen2_vl
    g = rng(3 + three_d)
    seq = 37
    ids = torch.from_numpy(g.integers(0, 100, size=(1, seq)))
    if three_d:
        p = torch.from_numpy(g.integers(0, 300, size=(3, 1, seq)))
        d = torch.from_numpy(g.integers(-250, 250, size=(seq, 3)))
    else:
        p = torch.from_numpy(g.integers(0, 300, size=(1, 1, seq))).expand(3, 1, seq)
        d = torch.from_numpy(g.integers(-250, 250, size=(seq,)))
    d3 = d if three_d else d[:, None].expand(seq, 3)
    at_p = model_cache(model, ids, p)
    at_pd = model_cache(model, ids, p + d3.T[:, None, :])
    keys = at_p.layers[0].keys  # [1, kv_heads, seq, head_dim]: the model's real cache tensor
    assert keys.shape == (1, 1, seq, 32)
    # In place on the cache itself, through a [seq, heads, head_dim] view.
    rerotate_keys(keys[0].transpose(0, 1), d, **ROPE_QWEN)
    want = at_pd.layers[0].keys
    # The model computes its own angles in float32 (p * inv_freq): ~1e-5 off at these positions.
    torch.testing.assert_close(keys, want, atol=1e-4, rtol=1e-4)
    if not three_d:
        # Equal t, h, w: M-RoPE is plain RoPE, so the plain rotation must agree as well.
        again = at_p.layers[0].keys.clone()
        rerotate_keys(again[0].transpose(0, 1), -d, rope_theta=10000.0, head_dim=32)
        before = model_cache(model, ids, p).layers[0].keys
        torch.testing.assert_close(again, before, atol=1e-4, rtol=1e-4)


def test_relocate_span_matches_qwen2vl_prefill_without_the_image(qwen2_vl):
    """Evict an image's entries and shift what follows: layer 0 equals a prefill of the sequence
    without the image at the positions `relocate` would give it (layer 0 sees no context)."""
    model, _ = qwen2_vl
    g = rng(5)
    a, (gh, gw), b = 6, (4, 6), 9  # text, image grid (after merge), text
    n_img = gh * gw
    text_a = torch.from_numpy(g.integers(0, 100, size=a))
    text_b = torch.from_numpy(g.integers(0, 100, size=b))
    image = torch.full((n_img,), 120)
    # Qwen2-VL positions: text 0..a-1; image (t, h, w) = (a, a + i, a + j); text after at max + 1.
    hh, ww = np.meshgrid(np.arange(gh), np.arange(gw), indexing="ij")
    img_pos = np.stack([np.full(n_img, a), a + hh.ravel(), a + ww.ravel()])
    after = a + max(gh, gw) + np.arange(b)
    old = np.concatenate([np.repeat(np.arange(a)[None], 3, 0), img_pos, np.repeat(after[None], 3, 0)], axis=1)
    new = np.repeat(np.arange(a + b)[None], 3, 0)
    full_ids = torch.cat([text_a, image, text_b])[None]
    cache = model_cache(model, full_ids, torch.from_numpy(old)[:, None, :])
    keys = [layer.keys for layer in cache.layers]
    values = [layer.values for layer in cache.layers]
    new_len = relocate_span(
        keys, values, a, a + n_img, old_positions=old[:, a + n_img :], new_positions=new[:, a:], **ROPE_QWEN
    )
    assert new_len == a + b
    cache.crop(new_len - (a + n_img + b))  # transformers 5.24: a negative count drops that many
    ref = model_cache(model, torch.cat([text_a, text_b])[None], torch.from_numpy(new)[:, None, :])
    torch.testing.assert_close(cache.layers[0].keys, ref.layers[0].keys, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(cache.layers[0].values, ref.layers[0].values, atol=1e-5, rtol=1e-5)
    # The same with the deltas given directly, [n, 3].
    cache2 = model_cache(model, full_ids, torch.from_numpy(old)[:, None, :])
    delta = (new[:, a:] - old[:, a + n_img :]).T
    relocate_span(
        [l.keys for l in cache2.layers], [l.values for l in cache2.layers], a, a + n_img, delta=delta, **ROPE_QWEN
    )
    cache2.crop(new_len - (a + n_img + b))
    for l1, l2 in zip(cache.layers, cache2.layers):
        torch.testing.assert_close(l1.keys, l2.keys, atol=0, rtol=0)
        torch.testing.assert_close(l1.values, l2.values, atol=0, rtol=0)


# ------------------------------------------------------------------ relocate_span / append_entries


def ref_relocate(keys, values, start, end, length, delta, case):
    """torch.cat-style reference: keys/values [batch, heads, seq, dim] float64 arrays."""
    out_k, out_v = [], []
    for k, v in zip(keys, values):
        moved = np.moveaxis(k[:, :, end:length], 2, 0)  # [n, batch, heads, dim]
        rotated = np.moveaxis(ref_rotate(moved, delta, **case), 0, 2)
        out_k.append(np.concatenate([k[:, :, :start], rotated], axis=2))
        out_v.append(np.concatenate([v[:, :, :start], v[:, :, end:length]], axis=2))
    return out_k, out_v


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    case=rope_cases(),
    batch=st.integers(1, 2),
    heads=st.integers(1, 3),
    layers=st.integers(1, 3),
    seq=st.integers(0, 15),
    cut=st.tuples(st.integers(0, 15), st.integers(0, 15), st.integers(0, 15)),
    kind=st.sampled_from(KINDS),
    delta_kind=st.sampled_from(["default", "int", "per_token", "thw", "positions"]),
    seed=st.integers(0, 2**32 - 1),
)
def test_relocate_span_matches_reference(case, batch, heads, layers, seq, cut, kind, delta_kind, seed):
    g = rng(seed)
    start, end, length = sorted(min(c, seq) for c in cut)
    n = length - end
    mrope = case["mrope_section"] is not None
    if delta_kind == "default" and mrope or delta_kind == "thw" and not mrope:
        delta_kind = "per_token"
    d = case["head_dim"]
    keys = [make(g.uniform(-1, 1, size=(batch, heads, seq, d)), kind) for _ in range(layers)]
    values = [make(g.uniform(-1, 1, size=(batch, heads, seq, d + 2)), kind) for _ in range(layers)]
    kb, vb = snapshot(keys), snapshot(values)
    kwargs = {}
    if delta_kind == "default":
        delta = -(end - start)
    elif delta_kind == "int":
        delta = kwargs["delta"] = int(g.integers(-1000, 1000))
    elif delta_kind == "per_token":
        delta = kwargs["delta"] = g.integers(-1000, 1000, size=n)
    elif delta_kind == "thw":
        delta = kwargs["delta"] = g.integers(-1000, 1000, size=(n, 3))
    else:
        old = g.integers(0, 5000, size=(3, n) if mrope else (n,))
        new = g.integers(0, 5000, size=old.shape)
        kwargs.update(old_positions=old, new_positions=new)
        delta = (new - old).T if mrope else new - old
    new_len = relocate_span(keys, values, start, end, length=length, **kwargs, **case)
    assert new_len == length - (end - start)
    want_k, want_v = ref_relocate(kb, vb, start, end, length, delta, case)
    for l in range(layers):
        np.testing.assert_allclose(f64(keys[l])[:, :, :new_len], want_k[l], atol=ATOL[kind[1]], rtol=0)
        np.testing.assert_array_equal(f64(values[l])[:, :, :new_len], want_v[l])
        # Past the valid length nothing was written.
        np.testing.assert_array_equal(f64(keys[l])[:, :, length:], kb[l][:, :, length:])


def test_relocate_span_strided_layers():
    """Layers that are views ([batch, seq, heads, dim] memory seen as [batch, heads, seq, dim])."""
    g = rng(7)
    case = dict(rope_theta=1e6, head_dim=16, rotary_dim=8, interleaved=True)
    store_k = [torch.from_numpy(g.standard_normal((2, 20, 3, 16))).float() for _ in range(2)]
    store_v = [torch.from_numpy(g.standard_normal((2, 20, 3, 16))).float() for _ in range(2)]
    keys = [s.transpose(1, 2) for s in store_k]
    values = [s.transpose(1, 2) for s in store_v]
    kb, vb = snapshot(keys), snapshot(values)
    relocate_span(keys, values, 4, 9, **case)
    want_k, want_v = ref_relocate(kb, vb, 4, 9, 20, -5, dict(case, rotary_dim=8))
    for l in range(2):
        np.testing.assert_allclose(f64(keys[l])[:, :, :15], want_k[l], atol=2e-6, rtol=0)
        np.testing.assert_array_equal(f64(values[l])[:, :, :15], want_v[l])


@pytest.mark.parametrize("kind", KINDS, ids=KIND_IDS)
def test_append_entries_matches_reference(kind):
    g = rng(8)
    batch, heads, seq, n, d = 2, 2, 13, 5, 24
    case = dict(rope_theta=1e4, head_dim=d, rotary_dim=d, mrope_section=[4, 4, 4])
    keys = [make(g.uniform(-1, 1, size=(batch, heads, seq, d)), kind) for _ in range(2)]
    values = [make(g.uniform(-1, 1, size=(batch, heads, seq, d)), kind) for _ in range(2)]
    new_k = [make(g.uniform(-1, 1, size=(batch, heads, n, d)), kind) for _ in range(2)]
    new_v = [make(g.uniform(-1, 1, size=(batch, heads, n, d)), kind) for _ in range(2)]
    kb, vb, nkb, nvb = snapshot(keys), snapshot(values), snapshot(new_k), snapshot(new_v)
    positions = g.permutation(seq)[:n]
    delta = g.integers(-400, 400, size=(n, 3))
    append_entries(keys, values, new_k, new_v, positions, delta=delta, **case)
    for l in range(2):
        want_k, want_v = kb[l].copy(), vb[l].copy()
        want_k[:, :, positions] = np.moveaxis(ref_rotate(np.moveaxis(nkb[l], 2, 0), delta, **case), 0, 2)
        want_v[:, :, positions] = nvb[l]
        np.testing.assert_allclose(f64(keys[l]), want_k, atol=ATOL[kind[1]], rtol=0)
        np.testing.assert_array_equal(f64(values[l]), want_v)
    assert_untouched(new_k + new_v, nkb + nvb)
    # No delta: a plain write at start, start + 1, ...
    append_entries(keys, values, new_k, new_v, seq - n)
    for l in range(2):
        np.testing.assert_array_equal(f64(keys[l])[:, :, seq - n :], nkb[l])
        np.testing.assert_array_equal(f64(values[l])[:, :, seq - n :], nvb[l])


# ------------------------------------------------------------------ paged (vLLM)

LAYOUTS = ["vllm-nhd", "vllm-hnd", "kv_blocks", "blocks_kv"]


def paged_cache(layout, num_blocks, block_size, heads, d, kind, g):
    """A random cache in `layout`, as vLLM allocates it; returns (tensor, layout name)."""
    lib, dtype = kind
    shapes = {
        # vLLM 0.33: logical [B, H, N, 2D]; NHD (LBNHC, the default) stores [B, N, H, 2D].
        "vllm-nhd": ((num_blocks, block_size, heads, 2 * d), (0, 2, 1, 3)),
        "vllm-hnd": ((num_blocks, heads, block_size, 2 * d), (0, 1, 2, 3)),
        "kv_blocks": ((2, num_blocks, block_size, heads, d), None),
        "blocks_kv": ((num_blocks, 2, block_size, heads, d), None),
    }
    shape, perm = shapes[layout]
    store = make(g.uniform(-1, 1, size=shape), kind)
    if perm is not None:
        store = store.transpose(perm) if lib == "numpy" else store.permute(perm)
    return store, ("vllm" if layout.startswith("vllm") else layout)


def split_kv(cache, layout, d):
    """(keys, values) views indexed [block, offset, head, dim], as vLLM's backends split them."""
    if layout.startswith("vllm"):
        kv = cache.transpose(0, 2, 1, 3) if isinstance(cache, np.ndarray) else cache.transpose(1, 2)
        return kv[..., :d], kv[..., d:]
    if layout == "kv_blocks":
        return cache[0], cache[1]
    return cache[:, 0], cache[:, 1]


def write_slots(cache, layout, d, slots, k, v):
    """reshape_and_cache: entry i goes to slot_mapping[i] = block * block_size + offset."""
    kc, vc = split_kv(cache, layout, d)
    bs = kc.shape[1]
    blocks, offs = slots // bs, slots % bs
    for cache_part, entries in ((kc, k), (vc, v)):
        if isinstance(cache_part, torch.Tensor):
            cache_part[blocks, offs] = torch.from_numpy(entries).to(cache_part.dtype)
        else:
            cache_part[blocks, offs] = entries.astype(cache_part.dtype)


def read_slots(cache, layout, d, slots):
    kc, vc = split_kv(cache, layout, d)
    bs = kc.shape[1]
    return f64(kc[slots // bs, slots % bs]), f64(vc[slots // bs, slots % bs])


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    case=rope_cases(),
    layout=st.sampled_from(LAYOUTS),
    kind=st.sampled_from(KINDS),
    heads=st.integers(1, 3),
    block_size=st.sampled_from([1, 2, 3, 16]),
    tokens=st.integers(0, 40),
    span=st.tuples(st.integers(0, 40), st.integers(0, 40)),
    same_table=st.booleans(),
    seed=st.integers(0, 2**32 - 1),
)
def test_paged_round_trip(case, layout, kind, heads, block_size, tokens, span, same_table, seed):
    """Entries written through a random block table, an image span evicted and the followers
    reinjected (re-rotated) at their new positions, read back equal to the contiguous reference."""
    g = rng(seed)
    d = case["head_dim"]
    blocks_needed = -(-tokens // block_size)
    num_blocks = 2 * blocks_needed + 2
    caches, name = zip(*(paged_cache(layout, num_blocks, block_size, heads, d, kind, g) for _ in range(2)))
    table = g.permutation(num_blocks)[:blocks_needed]
    pos = np.arange(tokens)
    slots = table[pos // block_size] * block_size + pos % block_size if tokens else np.zeros(0, np.int64)
    mrope = case["mrope_section"] is not None
    x = g.uniform(-1, 1, size=(tokens, heads, d))
    p3 = g.integers(0, 3000, size=(tokens, 3)) if mrope else np.repeat(pos[:, None], 3, 1)
    v_ref = [g.uniform(-1, 1, size=(tokens, heads, d)) for _ in caches]
    for c, v in zip(caches, v_ref):
        write_slots(c, name[0], d, slots, ref_rotate(x, p3, **case), v)
    start, end = sorted(min(s, tokens) for s in span)
    n = tokens - end
    new_pos = start + np.arange(n)
    if same_table:  # evict within the request's own blocks: sources and destinations overlap
        new_slots = slots[start : start + n]
    else:  # a fresh block table that may reuse the old blocks
        table2 = g.permutation(num_blocks)[:blocks_needed]
        new_slots = table2[new_pos // block_size] * block_size + new_pos % block_size
    delta = g.integers(-2000, 2000, size=(n, 3)) if mrope else np.full(n, -(end - start))
    d3 = delta if mrope else np.repeat(delta[:, None], 3, 1)
    src, dst = slots[end:].copy(), new_slots.copy()
    if n:  # vLLM pads with -1: such pairs are skipped
        pad = g.integers(n)
        src = np.concatenate([src, [-1]])
        dst = np.concatenate([dst, [int(dst[pad])]])
        delta = np.concatenate([delta, delta[:1]])
    before = snapshot(caches)
    moved = paged_reinject(list(caches), torch.from_numpy(src), dst.astype(np.int32), delta, layout=name[0], **case)
    assert moved == n
    atol = ATOL[kind[1]]
    for c, v, b in zip(caches, v_ref, before):
        got_k, got_v = read_slots(c, name[0], d, new_slots)
        stored_k, _ = read_slots(b, name[0], d, slots[end:])
        np.testing.assert_allclose(got_k, ref_rotate(stored_k, d3, **case), atol=atol, rtol=0)
        np.testing.assert_allclose(got_k, ref_rotate(x[end:], p3[end:] + d3, **case), atol=2 * atol, rtol=0)
        np.testing.assert_array_equal(got_v, f64(make(v[end:], kind)))
        # Every slot that was not a destination is unchanged.
        untouched = np.setdiff1d(np.arange(num_blocks * block_size), new_slots)
        kb, vb = read_slots(b, name[0], d, untouched)
        ka, va = read_slots(c, name[0], d, untouched)
        np.testing.assert_array_equal(ka, kb)
        np.testing.assert_array_equal(va, vb)


def test_paged_reinject_vllm_kernel_block_views():
    """vLLM 0.33 views of one buffer for all layers (BLHNC: blocks outermost), as
    create_kv_cache_views makes them with torch.as_strided."""
    g = rng(9)
    L, B, H, N, D = 3, 5, 2, 4, 16
    raw = torch.from_numpy(g.standard_normal(L * B * H * N * 2 * D)).float()
    page = H * N * 2 * D
    views = [raw.as_strided((B, H, N, 2 * D), (L * page, N * 2 * D, 2 * D, 1), l * page) for l in range(L)]
    before = [f64(v).copy() for v in views]
    src, dst = np.array([0, 1, 2, 7, 9]), np.array([12, 13, 14, 15, 0])
    delta = np.array([-3, -3, -3, 100, 0])
    case = dict(rope_theta=1e4, head_dim=D)
    assert paged_reinject(views, src, dst, delta, **case) == 5
    for v, b in zip(views, before):
        kb = b.transpose(0, 2, 1, 3).reshape(B * N, H, 2 * D)
        ka = f64(v).transpose(0, 2, 1, 3).reshape(B * N, H, 2 * D)
        np.testing.assert_allclose(ka[dst, :, :D], ref_rotate(kb[src, :, :D], delta, rotary_dim=D, rope_theta=1e4), atol=2e-6, rtol=0)
        np.testing.assert_array_equal(ka[dst, :, D:], kb[src, :, D:])
        rest = np.setdiff1d(np.arange(B * N), dst)
        np.testing.assert_array_equal(ka[rest], kb[rest])


# ------------------------------------------------------------------ bad input

CASE = dict(rope_theta=10000.0, head_dim=8)


def _raises(exc, match, fn, tensors):
    before = snapshot(tensors)
    with pytest.raises(exc, match=match):
        fn()
    assert_untouched(tensors, before)


@pytest.mark.parametrize("lib", ["numpy", "torch"])
def test_rerotate_bad_input(lib):
    kind = ("numpy", np.float32) if lib == "numpy" else ("torch", torch.float32)
    g = rng(10)
    keys = make(g.standard_normal((5, 2, 8)), kind)
    other = make(g.standard_normal((4, 2, 8)), kind)
    cases = [
        (ValueError, re.escape("delta has 4 entries"), lambda: rerotate_keys(keys, [1, 2, 3, 4], **CASE)),
        (TypeError, re.escape("delta"), lambda: rerotate_keys(keys, np.zeros(5), **CASE)),
        (ValueError, re.escape("delta: expected an int"), lambda: rerotate_keys(keys, np.zeros((5, 2), np.int64), **CASE)),
        (ValueError, re.escape("mrope_section is None"), lambda: rerotate_keys(keys, np.zeros((5, 3), np.int64), **CASE)),
        (ValueError, re.escape("keys: expected a 3-D tensor"), lambda: rerotate_keys(keys[0], 1, **CASE)),
        (ValueError, re.escape("head_dim = 16"), lambda: rerotate_keys(keys, 1, rope_theta=1e4, head_dim=16)),
        (ValueError, re.escape("rotary_dim = 5"), lambda: rerotate_keys(keys, 1, rotary_dim=5, **CASE)),
        (ValueError, re.escape("rotary_dim = 10"), lambda: rerotate_keys(keys, 1, rotary_dim=10, **CASE)),
        (ValueError, re.escape("mrope_section = [1, 1, 1]"), lambda: rerotate_keys(keys, 1, mrope_section=[1, 1, 1], **CASE)),
        (ValueError, re.escape("rope_theta"), lambda: rerotate_keys(keys, 1, rope_theta=0.0, head_dim=8)),
        (ValueError, re.escape("keys[1] has 4 tokens"), lambda: rerotate_keys([keys, other], 1, **CASE)),
        (ValueError, re.escape("keys[0] and keys[1] share memory"), lambda: rerotate_keys([keys, keys], 1, **CASE)),
        (TypeError, re.escape("keys: expected a NumPy array"), lambda: rerotate_keys("keys", 1, **CASE)),
    ]
    if lib == "numpy":
        cases += [
            (TypeError, re.escape("keys: expected dtype float32, float16, bfloat16 or float64, got int32"),
             lambda: rerotate_keys(keys.astype(np.int32), 1, **CASE)),
            (TypeError, re.escape("keys[1]: expected dtype float32, got float16"),
             lambda: rerotate_keys([keys, keys.astype(np.float16)], 1, **CASE)),
        ]
    else:
        expanded = torch.randn(2, 8).expand(5, 2, 8)
        cases += [
            (ValueError, re.escape("keys: strides"), lambda: rerotate_keys(expanded, 1, **CASE)),
            (ValueError, re.escape("keys: cannot be read"), lambda: rerotate_keys(keys.clone().requires_grad_(), 1, **CASE)),
        ]
    for exc, match, fn in cases:
        _raises(exc, match, fn, [keys, other])
    if lib == "numpy":
        keys.setflags(write=False)
        _raises(ValueError, re.escape("keys: the array is read-only"), lambda: rerotate_keys(keys, 1, **CASE), [keys])


def test_relocate_and_append_bad_input():
    g = rng(11)
    keys = [torch.from_numpy(g.standard_normal((1, 2, 10, 8))).float() for _ in range(2)]
    values = [torch.from_numpy(g.standard_normal((1, 2, 10, 8))).float() for _ in range(2)]
    new_k = [torch.randn(1, 2, 3, 8) for _ in range(2)]
    new_v = [torch.randn(1, 2, 3, 8) for _ in range(2)]
    mrope = dict(CASE, mrope_section=[1, 2, 1])
    all_t = keys + values + new_k + new_v
    cases = [
        (IndexError, re.escape("end = 11"), lambda: relocate_span(keys, values, 2, 11, **CASE)),
        (IndexError, re.escape("start = -1"), lambda: relocate_span(keys, values, -1, 3, **CASE)),
        (ValueError, re.escape("start = 5, end = 3"), lambda: relocate_span(keys, values, 5, 3, **CASE)),
        (IndexError, re.escape("length = 12"), lambda: relocate_span(keys, values, 2, 3, length=12, **CASE)),
        (ValueError, re.escape("values has 1 layers"), lambda: relocate_span(keys, values[:1], 2, 3, **CASE)),
        (ValueError, re.escape("values[1] has shape"), lambda: relocate_span(keys, [values[0], values[1][:, :, :9]], 2, 3, **CASE)),
        (ValueError, re.escape("keys[1] holds 9 positions"), lambda: relocate_span([keys[0], keys[1][:, :, :9]], [values[0], values[1][:, :, :9]], 2, 3, **CASE)),
        (ValueError, re.escape("delta: required with mrope_section"), lambda: relocate_span(keys, values, 2, 3, **mrope)),
        (ValueError, re.escape("delta has 6 entries"), lambda: relocate_span(keys, values, 2, 3, delta=np.zeros(6, np.int64), **CASE)),
        (ValueError, re.escape("old_positions has shape"), lambda: relocate_span(keys, values, 2, 3, old_positions=np.zeros((3, 6), np.int64), new_positions=np.zeros((3, 6), np.int64), **mrope)),
        (TypeError, re.escape("old_positions"), lambda: relocate_span(keys, values, 2, 3, old_positions=np.zeros((3, 7)), new_positions=np.zeros((3, 7)), **mrope)),
        (ValueError, re.escape("new_positions has shape"), lambda: relocate_span(keys, values, 2, 3, old_positions=np.zeros((3, 7), np.int64), new_positions=np.zeros((3, 6), np.int64), **mrope)),
        (ValueError, re.escape("pass both"), lambda: relocate_span(keys, values, 2, 3, old_positions=np.zeros(7, np.int64), **CASE)),
        (ValueError, re.escape("not both"), lambda: relocate_span(keys, values, 2, 3, delta=1, old_positions=np.zeros(7, np.int64), new_positions=np.zeros(7, np.int64), **CASE)),
        (ValueError, re.escape("keys[0] and values[0] share memory"), lambda: relocate_span(keys, [keys[0], values[1]], 2, 3, **CASE)),
        (ValueError, re.escape("keys[0] has shape (1, 2, 10, 8): expected [batch, kv_heads, seq, head_dim] with head_dim = 16"), lambda: relocate_span(keys, values, 2, 3, rope_theta=1e4, head_dim=16)),
        (IndexError, re.escape("positions[2] = 10"), lambda: append_entries(keys, values, new_k, new_v, [0, 1, 10])),
        (IndexError, re.escape("positions[0] = -1"), lambda: append_entries(keys, values, new_k, new_v, [-1, 1, 2])),
        (ValueError, re.escape("positions[2] = 1 repeats positions[1]"), lambda: append_entries(keys, values, new_k, new_v, [0, 1, 1])),
        (IndexError, re.escape("positions[2] = 10"), lambda: append_entries(keys, values, new_k, new_v, 8)),
        (ValueError, re.escape("new_keys[0] has shape"), lambda: append_entries(keys, values, new_k, new_v, [0, 1])),
        (ValueError, re.escape("new_keys has 1 layers"), lambda: append_entries(keys, values, new_k[:1], new_v[:1], [0, 1, 2])),
        (ValueError, re.escape("new_keys[0] shares memory with keys[0]"), lambda: append_entries(keys, values, [keys[0][:, :, :3], new_k[1]], new_v, [5, 6, 7])),
        (ValueError, re.escape("delta: rotating the new keys needs rope_theta"), lambda: append_entries(keys, values, new_k, new_v, [0, 1, 2], delta=3)),
        (ValueError, re.escape("delta has 2 entries"), lambda: append_entries(keys, values, new_k, new_v, [0, 1, 2], delta=[1, 2], **CASE)),
        (TypeError, re.escape("new_values[1]: expected dtype float32"), lambda: append_entries(keys, values, new_k, [new_v[0], new_v[1].half()], [0, 1, 2])),
    ]
    for exc, match, fn in cases:
        _raises(exc, match, fn, all_t)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_paged_bad_input(layout):
    g = rng(12)
    caches = [paged_cache(layout, 3, 4, 2, 8, ("torch", torch.float32), g) for _ in range(2)]
    tensors = [c for c, _ in caches]
    name = caches[0][1]
    smaller = paged_cache(layout, 2, 4, 2, 8, ("torch", torch.float32), g)[0]
    kw = dict(CASE, layout=name)
    cases = [
        (ValueError, re.escape("dst_slots[2] = 5 repeats dst_slots[0]"), lambda: paged_reinject(tensors, [0, 1, 2], [5, 6, 5], 1, **kw)),
        (IndexError, re.escape("src_slots[1] = 12: out of range for 3 blocks x 4 slots"), lambda: paged_reinject(tensors, [0, 12], [5, 6], 1, **kw)),
        (IndexError, re.escape("dst_slots[0] = 99"), lambda: paged_reinject(tensors, [0, 1], [99, 6], 1, **kw)),
        (ValueError, re.escape("src_slots has 2 entries but dst_slots has 1"), lambda: paged_reinject(tensors, [0, 1], [5], 1, **kw)),
        (ValueError, re.escape("delta has 3 entries"), lambda: paged_reinject(tensors, [0, 1], [5, 6], [1, 2, 3], **kw)),
        (TypeError, re.escape("src_slots"), lambda: paged_reinject(tensors, np.array([0.0, 1.0]), [5, 6], 1, **kw)),
        (ValueError, re.escape("src_slots: expected a 1-D"), lambda: paged_reinject(tensors, np.zeros((2, 1), np.int64), [5, 6], 1, **kw)),
        (ValueError, re.escape("layout = 'paged'"), lambda: paged_reinject(tensors, [0], [5], 1, **dict(kw, layout="paged"))),
        (ValueError, re.escape("mrope_section"), lambda: paged_reinject(tensors, [0], [5], 1, mrope_section=[1, 1], **kw)),
        (ValueError, re.escape("kv_caches[0]"), lambda: paged_reinject(tensors, [0], [5], 1, **dict(kw, head_dim=4))),
        (ValueError, re.escape("kv_caches[1] has (num_blocks, block_size, kv_heads)"), lambda: paged_reinject([tensors[0], smaller], [0], [5], 1, **kw)),
        (ValueError, re.escape("kv_caches is empty"), lambda: paged_reinject([], [0], [5], 1, **kw)),
    ]
    wrong_rank = {"vllm": "kv_blocks", "kv_blocks": "vllm", "blocks_kv": "vllm"}[name]
    cases.append((ValueError, r"kv_caches\[0\]: expected a \d-D tensor", lambda: paged_reinject(tensors, [0], [5], 1, **dict(kw, layout=wrong_rank))))
    for exc, match, fn in cases:
        _raises(exc, match, fn, tensors + [smaller])
    # A skipped pair (negative slot) is not an error, and writes nothing.
    before = snapshot(tensors)
    assert paged_reinject(tensors, [-1, 3], [5, -1], [7, 7], **kw) == 0
    assert_untouched(tensors, before)


def test_exports():
    for name in ["rerotate_keys", "relocate_span", "append_entries", "paged_reinject"]:
        assert name in tvc_rs.__all__ and getattr(tvc_rs, name).__doc__


# ------------------------------------------------------------------ relocate_spans


def ref_relocate_spans(keys, values, spans, length, delta, case):
    """Several spans out at once: the kept entries from the first span's start on, gathered
    (index_select-style) and rotated in float64; keys/values [batch, heads, seq, dim] arrays."""
    start = spans[0][0] if spans else length
    kept = [p for p in range(start, length) if not any(s <= p < e for s, e in spans)]
    out_k, out_v = [], []
    for k, v in zip(keys, values):
        moved = np.moveaxis(k[:, :, kept], 2, 0)
        rotated = np.moveaxis(ref_rotate(moved, delta, **case), 0, 2) if kept else k[:, :, :0]
        out_k.append(np.concatenate([k[:, :, :start], rotated], axis=2))
        out_v.append(np.concatenate([v[:, :, :start], v[:, :, kept]], axis=2))
    return out_k, out_v, kept


def shift_deltas(spans, kept):
    """Plain RoPE: each kept entry moves back by the entries evicted before it."""
    return np.array([-sum(min(e, p) - s for s, e in spans if s <= p) for p in kept], np.int64)


@st.composite
def span_lists(draw, seq):
    """Sorted, disjoint spans inside [0, seq] (adjacent and empty ones included), and a length."""
    cuts = sorted(draw(st.lists(st.integers(0, seq), min_size=0, max_size=8)))
    pairs = [(cuts[i], cuts[i + 1]) for i in range(0, len(cuts) - 1, 2)]
    if pairs and draw(st.booleans()):  # make two spans adjacent
        i = draw(st.integers(0, len(pairs) - 1))
        if i + 1 < len(pairs):
            pairs[i] = (pairs[i][0], pairs[i + 1][0])
    ends = [e for _, e in pairs]
    length = draw(st.integers(max(ends, default=0), seq))
    return pairs, length


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    data=st.data(),
    case=rope_cases(),
    batch=st.integers(1, 2),
    heads=st.integers(1, 3),
    layers=st.integers(1, 3),
    seq=st.integers(0, 24),
    kind=st.sampled_from(KINDS),
    delta_kind=st.sampled_from(["default", "int", "per_token", "thw", "positions", "array"]),
    seed=st.integers(0, 2**32 - 1),
)
def test_relocate_spans_matches_reference(data, case, batch, heads, layers, seq, kind, delta_kind, seed):
    g = rng(seed)
    spans, length = data.draw(span_lists(seq))
    mrope = case["mrope_section"] is not None
    if delta_kind == "default" and mrope or delta_kind == "thw" and not mrope:
        delta_kind = "per_token"
    d = case["head_dim"]
    keys = [make(g.uniform(-1, 1, size=(batch, heads, seq, d)), kind) for _ in range(layers)]
    values = [make(g.uniform(-1, 1, size=(batch, heads, seq, d + 2)), kind) for _ in range(layers)]
    kb, vb = snapshot(keys), snapshot(values)
    start = spans[0][0] if spans else length
    n = (length - start) - sum(e - s for s, e in spans)
    kwargs = {}
    if delta_kind == "default":
        delta = None
    elif delta_kind == "int":
        delta = kwargs["delta"] = int(g.integers(-1000, 1000))
    elif delta_kind == "per_token":
        delta = kwargs["delta"] = g.integers(-1000, 1000, size=n)
    elif delta_kind == "thw":
        delta = kwargs["delta"] = g.integers(-1000, 1000, size=(n, 3))
    elif delta_kind == "positions":
        old = g.integers(0, 5000, size=(3, n) if mrope else (n,))
        new = g.integers(0, 5000, size=old.shape)
        kwargs.update(old_positions=old, new_positions=new)
        delta = (new - old).T if mrope else new - old
    else:  # spans as an int array [k, 2], deltas as an int32 tensor
        delta = g.integers(-1000, 1000, size=(n, 3) if mrope else n)
        kwargs["delta"] = torch.from_numpy(delta.astype(np.int32))
    arg = np.array(spans, np.int64).reshape(-1, 2) if delta_kind == "array" else spans
    new_len = tvc_rs.relocate_spans(keys, values, arg, length=length, **kwargs, **case)
    kept = [p for p in range(start, length) if not any(s <= p < e for s, e in spans)]
    if delta is None:
        delta = shift_deltas(spans, kept)
    want_k, want_v, _ = ref_relocate_spans(kb, vb, spans, length, delta if kept else 0, case)
    assert new_len == start + n == length - sum(e - s for s, e in spans)
    for l in range(layers):
        np.testing.assert_allclose(f64(keys[l])[:, :, :new_len], want_k[l], atol=ATOL[kind[1]], rtol=0)
        np.testing.assert_array_equal(f64(values[l])[:, :, :new_len], want_v[l])
        np.testing.assert_array_equal(f64(keys[l])[:, :, length:], kb[l][:, :, length:])


@pytest.mark.parametrize("kind", KINDS, ids=KIND_IDS)
@pytest.mark.parametrize(
    "spans",
    [[], [(3, 7)], [(2, 5), (9, 14), (20, 26)], [(2, 5), (5, 8), (11, 12)], [(4, 6), (22, 30)], [(0, 30)], [(6, 6), (8, 12)]],
    ids=["none", "one", "three", "adjacent", "at-end", "all", "empty-first"],
)
def test_relocate_spans_equals_repeated_relocate_span(kind, spans):
    """Plain RoPE, default deltas: one pass equals relocate_span once per span from the last
    to the first (each of those rotating the entries after its span by minus its length)."""
    g = rng(21)
    case = dict(rope_theta=1e4, head_dim=16, rotary_dim=12)
    keys = [make(g.uniform(-1, 1, size=(2, 3, 30, 16)), kind) for _ in range(2)]
    values = [make(g.uniform(-1, 1, size=(2, 3, 30, 10)), kind) for _ in range(2)]
    copies_k, copies_v = [make(f64(k).copy(), kind) for k in keys], [make(f64(v).copy(), kind) for v in values]
    kb, vb = snapshot(keys), snapshot(values)
    new_len = tvc_rs.relocate_spans(keys, values, spans, **case)
    length = 30
    for s, e in reversed(spans):
        length = relocate_span(copies_k, copies_v, s, e, length=length, **case)
    assert new_len == length
    _, want_v, kept = ref_relocate_spans(kb, vb, spans, 30, 0, case)
    # Repeated calls round once per call; the one pass once: both within the dtype's tolerance
    # of the float64 reference, values bit-exact.
    want_k, _, _ = ref_relocate_spans(kb, vb, spans, 30, shift_deltas(spans, kept) if kept else 0, case)
    for l in range(2):
        np.testing.assert_array_equal(f64(values[l])[:, :, :new_len], f64(copies_v[l])[:, :, :new_len])
        np.testing.assert_array_equal(f64(values[l])[:, :, :new_len], want_v[l])
        np.testing.assert_allclose(f64(keys[l])[:, :, :new_len], want_k[l], atol=ATOL[kind[1]], rtol=0)
        np.testing.assert_allclose(f64(keys[l])[:, :, :new_len], f64(copies_k[l])[:, :, :new_len], atol=2 * len(spans) * ATOL[kind[1]], rtol=0)


def test_relocate_spans_strided_layers_mrope():
    """Views ([batch, seq, heads, dim] memory as [batch, heads, seq, dim]), M-RoPE (t, h, w) deltas."""
    g = rng(8)
    case = dict(rope_theta=1e6, head_dim=16, rotary_dim=12, mrope_section=[2, 2, 2])
    store_k = [torch.from_numpy(g.standard_normal((2, 40, 3, 16))).float() for _ in range(2)]
    store_v = [torch.from_numpy(g.standard_normal((2, 40, 3, 16))).float() for _ in range(2)]
    keys, values = [s.transpose(1, 2) for s in store_k], [s.transpose(1, 2) for s in store_v]
    kb, vb = snapshot(keys), snapshot(values)
    spans = [(4, 9), (15, 22), (30, 33)]
    delta = g.integers(-50, 50, size=(40 - 4 - 15, 3))
    assert tvc_rs.relocate_spans(keys, values, spans, delta=delta, **case) == 25
    want_k, want_v, _ = ref_relocate_spans(kb, vb, spans, 40, delta, case)
    for l in range(2):
        np.testing.assert_allclose(f64(keys[l])[:, :, :25], want_k[l], atol=2e-6, rtol=0)
        np.testing.assert_array_equal(f64(values[l])[:, :, :25], want_v[l])


def test_relocate_spans_bad_input():
    g = rng(13)
    keys = [torch.from_numpy(g.standard_normal((1, 2, 10, 8))).float() for _ in range(2)]
    values = [torch.from_numpy(g.standard_normal((1, 2, 10, 8))).float() for _ in range(2)]
    mrope = dict(CASE, mrope_section=[1, 2, 1])
    f = tvc_rs.relocate_spans
    cases = [
        (ValueError, re.escape("spans[1] = (3, 6) starts before spans[0] = (2, 5) ends"), lambda: f(keys, values, [(2, 5), (3, 6)], **CASE)),
        (ValueError, re.escape("spans[1] = (0, 1) starts before spans[0] = (2, 5) ends"), lambda: f(keys, values, [(2, 5), (0, 1)], **CASE)),
        (ValueError, re.escape("spans[0] = (5, 3): the span [start, end) needs start <= end"), lambda: f(keys, values, [(5, 3)], **CASE)),
        (IndexError, re.escape("spans[1] = (7, 11): end must be <= length = 10"), lambda: f(keys, values, [(1, 2), (7, 11)], **CASE)),
        (IndexError, re.escape("spans[0] = (1, 9): end must be <= length = 8"), lambda: f(keys, values, [(1, 9)], length=8, **CASE)),
        (IndexError, re.escape("spans[0] = (-1, 3)"), lambda: f(keys, values, [(-1, 3)], **CASE)),
        (ValueError, re.escape("spans[0] has 3 entries, expected 2"), lambda: f(keys, values, [(1, 2, 3)], **CASE)),
        (ValueError, re.escape("spans: expected shape [n, 2]"), lambda: f(keys, values, np.zeros((2, 3), np.int64), **CASE)),
        (TypeError, re.escape("spans"), lambda: f(keys, values, [(1.5, 2)], **CASE)),
        (TypeError, re.escape("spans"), lambda: f(keys, values, np.array([[1.0, 2.0]]), **CASE)),
        (TypeError, re.escape("spans"), lambda: f(keys, values, "spans", **CASE)),
        (IndexError, re.escape("length = 12"), lambda: f(keys, values, [(2, 3)], length=12, **CASE)),
        (ValueError, re.escape("delta: required with mrope_section"), lambda: f(keys, values, [(2, 3)], **mrope)),
        (ValueError, re.escape("delta has 6 entries but the entries kept after spans[0]'s start has 5"), lambda: f(keys, values, [(2, 3), (5, 7)], delta=np.zeros(6, np.int64), **CASE)),
        (ValueError, re.escape("values has 1 layers"), lambda: f(keys, values[:1], [(2, 3)], **CASE)),
        (ValueError, re.escape("keys[0] and values[0] share memory"), lambda: f(keys, [keys[0], values[1]], [(2, 3)], **CASE)),
    ]
    for exc, match, fn in cases:
        _raises(exc, match, fn, keys + values)
    assert "relocate_spans" in tvc_rs.__all__ and tvc_rs.relocate_spans.__doc__
