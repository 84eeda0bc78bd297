"""Key re-rotation for Qwen3-VL (interleaved M-RoPE), GLM-4.1V (half the head rotated, adjacent
pairs, sections over the rotated part), GLM-4.5V MoE (the same with NeoX pairs) and Qwen3.5
(head_dim 256, 64 rotated dims, interleaved M-RoPE) against each family's own transformers rotary
embedding and apply_rotary_pos_emb, at positions shifted by per-axis (t, h, w) deltas; the rope
settings read from each family's config by tvc_rs.kv.rope_settings."""

from __future__ import annotations

import importlib

import numpy as np
import pytest
import torch

import tvc_rs
from tvc_rs import append_entries, paged_reinject, relocate_span, rerotate_keys, rope_settings


transformers = pytest.importorskip("transformers")

# Released checkpoints' text settings (rope_parameters as in their config.json), small widths.
FAMILIES = {
    # Qwen3-VL-8B-Thinking: head_dim 128, rope_theta 5e6, [24, 20, 20] interleaved.
    "qwen3_vl": ("Qwen3VLTextConfig", "Qwen3VLTextRotaryEmbedding",
                 dict(head_dim=128, rope_parameters=dict(rope_type="default", rope_theta=5e6,
                                                         mrope_section=[24, 20, 20], mrope_interleaved=True))),
    "qwen3_vl_moe": ("Qwen3VLMoeTextConfig", "Qwen3VLMoeTextRotaryEmbedding",
                     dict(head_dim=128, rope_parameters=dict(rope_type="default", rope_theta=5e6,
                                                             mrope_section=[24, 20, 20], mrope_interleaved=True))),
    # GLM-4.1V-9B-Thinking: head_dim 128 (4096 / 32), partial 0.5, [8, 12, 12], adjacent pairs.
    "glm4v": ("Glm4vTextConfig", "Glm4vTextRotaryEmbedding",
              dict(hidden_size=256, num_attention_heads=2,
                   rope_parameters=dict(rope_type="default", rope_theta=10000.0, partial_rotary_factor=0.5,
                                        mrope_section=[8, 12, 12]))),
    # GLM-4.5V: head_dim 128, partial 0.5, [8, 12, 12], NeoX pairs.
    "glm4v_moe": ("Glm4vMoeTextConfig", "Glm4vMoeTextRotaryEmbedding",
                  dict(hidden_size=256, num_attention_heads=2, head_dim=128,
                       rope_parameters=dict(rope_type="default", rope_theta=10000.0, partial_rotary_factor=0.5,
                                            mrope_section=[8, 12, 12]))),
    # Qwen3.5: head_dim 256, partial 0.25 (64 rotated), [11, 11, 10] interleaved.
    "qwen3_5": ("Qwen3_5TextConfig", "Qwen3_5TextRotaryEmbedding",
                dict(head_dim=256, rope_parameters=dict(rope_type="default", rope_theta=1e7, partial_rotary_factor=0.25,
                                                        mrope_section=[11, 11, 10], mrope_interleaved=True))),
    "qwen3_5_moe": ("Qwen3_5MoeTextConfig", "Qwen3_5MoeTextRotaryEmbedding",
                    dict(head_dim=256, rope_parameters=dict(rope_type="default", rope_theta=1e7,
                                                            partial_rotary_factor=0.25, mrope_section=[11, 11, 10],
                                                            mrope_interleaved=True))),
}
# What the issue and the model cards state, to check rope_settings against independently.
EXPECTED = {
    "qwen3_vl": dict(rotary_dim=128, interleaved=False, mrope_section=[24, 20, 20], mrope_interleaved=True),
    "qwen3_vl_moe": dict(rotary_dim=128, interleaved=False, mrope_section=[24, 20, 20], mrope_interleaved=True),
    "glm4v": dict(rotary_dim=64, interleaved=True, mrope_section=[8, 12, 12], mrope_interleaved=False),
    "glm4v_moe": dict(rotary_dim=64, interleaved=False, mrope_section=[8, 12, 12], mrope_interleaved=False),
    "qwen3_5": dict(rotary_dim=64, interleaved=False, mrope_section=[11, 11, 10], mrope_interleaved=True),
    "qwen3_5_moe": dict(rotary_dim=64, interleaved=False, mrope_section=[11, 11, 10], mrope_interleaved=True),
}


class Family:
    def __init__(self, name: str):
        config_name, rotary_name, text = FAMILIES[name]
        module = importlib.import_module(f"transformers.models.{name}.modeling_{name}")
        self.name = name
        self.config = getattr(transformers, config_name)(
            intermediate_size=64, num_hidden_layers=1, num_key_value_heads=1,
            **{"hidden_size": 64, "num_attention_heads": 2, **text},
        )
        self.rotary = getattr(module, rotary_name)(self.config)
        self.apply = module.apply_rotary_pos_emb
        self.settings = rope_settings(self.config)

    def keys_at(self, x: torch.Tensor, positions: np.ndarray) -> torch.Tensor:
        """The family's keys in float64: its own frequency recomposition (the axis map) and
        apply_rotary_pos_emb (pair layout, partial rotary) on float64 angles. x: [1, heads, seq,
        head_dim]; positions [3, seq]."""
        theta, rotary_dim = self.settings["rope_theta"], self.settings["rotary_dim"]
        inv = 1.0 / theta ** (torch.arange(0, rotary_dim, 2, dtype=torch.float64) / rotary_dim)
        # The model's own inverse frequencies (float32) are these, rounded.
        torch.testing.assert_close(self.rotary.inv_freq.double(), inv, rtol=1e-6, atol=0)
        freqs = torch.from_numpy(positions).double()[:, None, :, None] * inv  # [3, 1, seq, half]
        cos = self.rotary.recomposition_frequencies(freqs.cos())
        sin = self.rotary.recomposition_frequencies(freqs.sin())
        _, k = self.apply(x, x, cos, sin)
        return k

    def keys_at_f32(self, x: torch.Tensor, positions: np.ndarray) -> torch.Tensor:
        """The family's keys exactly as its forward computes them (float32 angles)."""
        pos = torch.from_numpy(positions)[:, None, :]
        cos, sin = self.rotary(x, pos)
        _, k = self.apply(x, x, cos, sin)
        return k


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request):
    return Family(request.param)


def test_rope_settings_read_from_the_config(family):
    s = family.settings
    assert {k: s[k] for k in EXPECTED[family.name]} == EXPECTED[family.name]
    # The rotated width is the one the family's rotary module turns.
    assert s["rotary_dim"] == 2 * family.rotary.inv_freq.numel()
    assert s["head_dim"] in (128, 256)
    # The model's top-level config and its to_dict() give the same.
    assert rope_settings(family.config.to_dict()) == s


def _rows(k: torch.Tensor) -> torch.Tensor:
    """[1, heads, seq, dim] -> a [seq, heads, dim] view (what rerotate_keys takes)."""
    return k[0].transpose(0, 1)


@pytest.mark.parametrize("seed", range(3))
def test_rerotated_keys_equal_the_family_rotary_at_shifted_positions(family, seed):
    g = np.random.default_rng(seed)
    heads, seq, d = 2, 41, family.settings["head_dim"]
    x = torch.from_numpy(g.uniform(-1, 1, size=(1, heads, seq, d)))
    p = g.integers(0, 60_000, size=(3, seq))
    delta = g.integers(-30_000, 30_000, size=(seq, 3))  # per-axis deltas
    want = family.keys_at(x, p + delta.T)
    for dtype, atol in [(torch.float32, 4e-6), (torch.float16, 4e-3), (torch.bfloat16, 3e-2)]:
        keys = family.keys_at(x, p).to(dtype)
        rerotate_keys(_rows(keys), torch.from_numpy(delta), **family.settings)
        torch.testing.assert_close(keys.double(), want, atol=atol, rtol=0)
    # Dims past rotary_dim are untouched.
    r = family.settings["rotary_dim"]
    keys = family.keys_at(x, p).float()
    rerotate_keys(_rows(keys), delta, **family.settings)
    torch.testing.assert_close(keys[..., r:].double(), x[..., r:].float().double(), atol=0, rtol=0)


def test_the_model_forward_agrees(family):
    """The family's own float32 forward at the shifted positions (its float32 angles: ~1e-4 off
    at these positions)."""
    g = np.random.default_rng(7)
    x = torch.from_numpy(g.uniform(-1, 1, size=(1, 2, 23, family.settings["head_dim"]))).float()
    p = g.integers(0, 500, size=(3, 23))
    delta = g.integers(-300, 300, size=(23, 3))
    keys = family.keys_at_f32(x, p)
    rerotate_keys(_rows(keys), delta, **family.settings)
    torch.testing.assert_close(keys, family.keys_at_f32(x, p + delta.T), atol=2e-4, rtol=0)


def test_the_wrong_map_or_layout_is_caught(family):
    """The test can fail: the other frequency map / pair layout gives different keys."""
    g = np.random.default_rng(11)
    x = torch.from_numpy(g.uniform(-1, 1, size=(1, 1, 9, family.settings["head_dim"])))
    p = g.integers(0, 1000, size=(3, 9))
    delta = np.stack([np.zeros(9, int), g.integers(50, 500, 9), -g.integers(50, 500, 9)], axis=1)
    want = family.keys_at(x, p + delta.T)
    for wrong in ({"mrope_interleaved": not family.settings["mrope_interleaved"]},
                  {"interleaved": not family.settings["interleaved"]}):
        keys = family.keys_at(x, p).float()
        rerotate_keys(_rows(keys), delta, **{**family.settings, **wrong})
        assert (keys.double() - want).abs().max() > 1e-2


def test_relocate_append_and_paged_follow_the_family(family):
    """relocate_span, append_entries and paged_reinject take the same description."""
    g = np.random.default_rng(3)
    s, d = family.settings, family.settings["head_dim"]
    seq, start, end = 30, 5, 12
    x = torch.from_numpy(g.uniform(-1, 1, size=(1, 2, seq, d)))
    p = np.cumsum(g.integers(0, 3, size=(3, seq)), axis=1)
    new_p = p.copy()
    new_p[:, end:] = p[:, end:] - g.integers(1, 20, size=(3, 1))  # per-axis shifts after the span
    keys = family.keys_at(x, p).float()
    values = torch.from_numpy(g.uniform(-1, 1, size=(1, 2, seq, d))).float()
    n = relocate_span([keys], [values.clone()], start, end, old_positions=p[:, end:], new_positions=new_p[:, end:], **s)
    assert n == seq - (end - start)
    want = family.keys_at(x[:, :, end:], new_p[:, end:])
    torch.testing.assert_close(keys[:, :, start:n].double(), want, atol=4e-6, rtol=0)
    # append_entries: new keys rotated at position p written with a delta.
    k2 = torch.zeros(1, 2, 8, d)
    v2 = torch.zeros(1, 2, 8, d)
    new_k = family.keys_at(x[:, :, :5], p[:, :5]).float()
    delta = g.integers(-100, 100, size=(5, 3))
    append_entries([k2], [v2], [new_k], [torch.ones(1, 2, 5, d)], 2, delta=delta, **s)
    torch.testing.assert_close(k2[:, :, 2:7].double(), family.keys_at(x[:, :, :5], p[:, :5] + delta.T), atol=4e-6, rtol=0)
    # paged_reinject: a vLLM cache [2, blocks, block_size, heads, dim], slot i -> slot i + 3.
    blocks, bs, t = 4, 4, 9
    cache = torch.zeros(2, blocks, bs, 2, d)
    rows = family.keys_at(x[:, :, :t], p[:, :t])[0].transpose(0, 1).float()  # [t, heads, dim]
    cache[0].view(-1, 2, d)[:t] = rows
    delta = g.integers(-100, 100, size=(t, 3))
    moved = paged_reinject([cache], list(range(t)), [i + 3 for i in range(t)], delta, layout="kv_blocks", **s)
    assert moved == t
    got = cache[0].view(-1, 2, d)[3 : 3 + t].transpose(0, 1)[None].double()
    torch.testing.assert_close(got, family.keys_at(x[:, :, :t], p[:, :t] + delta.T), atol=4e-6, rtol=0)


def test_rope_settings_refuses_other_models():
    with pytest.raises(ValueError, match=r"config: model_type must be one of 'qwen2_vl', .*'qwen3_5_moe', got 'llama'"):
        rope_settings({"model_type": "llama", "rope_parameters": {"rope_theta": 1e4}})


def test_mrope_interleaved_needs_three_sections():
    keys = np.zeros((2, 1, 16), np.float32)
    with pytest.raises(ValueError, match="mrope_interleaved = True needs mrope_section"):
        rerotate_keys(keys, 1, rope_theta=1e4, head_dim=16, mrope_interleaved=True)
    with pytest.raises(ValueError, match=r"interleaved M-RoPE takes exactly three sections"):
        rerotate_keys(keys, 1, rope_theta=1e4, head_dim=16, mrope_section=[2, 2, 2, 2], mrope_interleaved=True)
    with pytest.raises(TypeError, match="mrope_interleaved"):
        rerotate_keys(keys, 1, rope_theta=1e4, head_dim=16, mrope_section=[4, 2, 2], mrope_interleaved="yes")
    assert not keys.any()
    assert "rope_settings" in tvc_rs.__all__
