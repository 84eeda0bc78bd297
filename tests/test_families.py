"""tvc_rs.hf with the newer reasoning VLM families (issue 15): Qwen3-VL (DeepStack, interleaved
M-RoPE, patch 16), GLM-4.1V-Thinking (partial rotary with adjacent pairs, its own image tokens)
and Qwen3.5 (hybrid linear / full attention): tiny random models built from transformers' own
config classes (tests/tiny_models.py), each family's own processor class, real images.

References are independent of tvc-rs: plain ``model.generate``; the model's own forward fed the
vision tower's outputs through ``mm_encoder_outputs`` (so the model itself scatters the image
features and adds the DeepStack levels at the image tokens), with positions from the model's own
``get_rope_index``; PyTorch pooling of every DeepStack level.
"""

from __future__ import annotations

import math

import pytest
import torch

from conftest import asset
from tvc_rs import PVCConfig, PVCSchedule, hf

transformers = pytest.importorskip("transformers")
from PIL import Image  # noqa: E402
from tiny_models import FAMILY_IMAGE_TOKENS, family_config, family_model_class, family_processor  # noqa: E402
from transformers import LogitsProcessor, LogitsProcessorList  # noqa: E402
from transformers.modeling_outputs import BaseModelOutputWithPooling  # noqa: E402

WAIT, COMMA = 13824, 11  # " Wait", "," of the Qwen2 tokenizer (all the tiny models here use it)
QUESTION = "How many objects are left?"
FAMILIES = ["qwen3_vl", "glm4v", "qwen3_5"]
MOE = ["qwen3_vl_moe", "glm4v_moe"]  # same code paths as their dense families: fewer tests
KV_FAMILIES = ["qwen3_vl", "glm4v"]


def logits_tol(family):
    """Qwen3.5's linear-attention layers run their gated delta rule in float32 even for float64
    weights (transformers' torch implementation casts to it), and a chunked prefill and
    token-by-token decoding round differently: float32-level agreement there, float64 elsewhere."""
    if family in MOE:  # float32 models
        return dict(atol=2e-5, rtol=2e-5)
    return dict(atol=3e-5, rtol=1e-4) if family == "qwen3_5" else dict(atol=1e-6, rtol=1e-6)


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


_models: dict = {}
_processors: dict = {}


def model_for(family, dtype=torch.float64, attn="sdpa"):
    if family in MOE and dtype == torch.float64:
        dtype = torch.float32  # transformers' MoE experts (grouped_mm) take no float64
    key = (family, dtype, attn)
    if key not in _models:
        config = family_config(family, asset(""))
        config._attn_implementation = attn
        torch.manual_seed(0)
        model = family_model_class(family)(config).eval()
        _models[key] = model.to(dtype)
    return _models[key]


def processor_for(family):
    if family not in _processors:
        _processors[family] = family_processor(family, asset(""))
    return _processors[family]


@pytest.fixture(scope="session")
def clevr():
    return Image.open(asset("images/tvc_case1_clevr.jpg")).convert("RGB")


@pytest.fixture(scope="session")
def mathv():
    return Image.open(sorted(asset("images/mathv").glob("*.jpg"))[0]).convert("RGB")


class Force(LogitsProcessor):
    """Forces ``script[step]`` at generation step ``step`` (over all segments)."""

    def __init__(self, script):
        self.script, self.step = dict(script), 0

    def __call__(self, input_ids, scores):
        token = self.script.get(self.step)
        self.step += 1
        if token is None:
            return scores
        out = torch.full_like(scores, -math.inf)
        out[:, token] = 0.0
        return out


def prompt_inputs(processor, images):
    content = [{"type": "image"} for _ in images] + [{"type": "text", "text": QUESTION}]
    text = processor.apply_chat_template([{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True)
    return processor(images=images, text=[text], return_tensors="pt")


def token_ids(processor, family):
    return [processor.tokenizer.convert_tokens_to_ids(t) for t in FAMILY_IMAGE_TOKENS[family]]


def bridge_ids(processor, bridge="Let me see the image again:"):
    return processor.tokenizer.encode(" " + bridge, add_special_tokens=False)


def vision(model, inputs):
    """Per image: (features [n, hidden], [DeepStack level [n, hidden], ...]) from the model's tower."""
    with torch.no_grad():
        out = model.model.get_image_features(inputs["pixel_values"].to(model.dtype), inputs["image_grid_thw"])
    levels = getattr(out, "deepstack_features", None) or []
    return [(f, [level[i] for level in levels]) for i, f in enumerate(out.pooler_output)]


def torch_pool(x, grid, k):
    t, h, w = grid
    x = x.reshape(t, h, w, -1)
    out = [x[f, i:i + k, j:j + k].reshape(-1, x.shape[-1]).mean(0) for f in range(t) for i in range(0, h, k) for j in range(0, w, k)]
    return torch.stack(out), (t, -(-h // k), -(-w // k))


def pooled_image(image, grid, k):
    feats, levels = image
    pooled, pgrid = torch_pool(feats, grid, k)
    return (pooled, [torch_pool(level, grid, k)[0] for level in levels]), pgrid


def reference_forward(model, family, ids, images, merged_grids, **kwargs):
    """The model's own forward over ``ids`` [L], the image blocks filled (in order) with
    ``images`` [(features, deepstack levels)] through mm_encoder_outputs, positions from its
    own get_rope_index with each block on its merged grid."""
    _, pad, _ = token_ids(processor_for(family), family)
    ids = ids[None]
    merge = model.config.vision_config.spatial_merge_size
    grids = torch.tensor([[t, h * merge, w * merge] for t, h, w in merged_grids])
    pos, _ = model.model.get_rope_index(ids, mm_token_type_ids=(ids == pad).long(), image_grid_thw=grids)
    encoder = BaseModelOutputWithPooling(pooler_output=tuple(f for f, _ in images))
    if images[0][1]:
        encoder.deepstack_features = [tuple(levels[i] for _, levels in images) for i in range(len(images[0][1]))]
    with torch.no_grad():
        out = model(input_ids=ids, position_ids=pos, mm_encoder_outputs={"image": encoder}, image_grid_thw=grids,
                    mm_token_type_ids=(ids == pad).long(), **kwargs)
    return out, pos[:, 0]


def merged(inputs, model, i=0):
    t, h, w = (int(v) for v in inputs["image_grid_thw"][i])
    m = model.config.vision_config.spatial_merge_size
    return (t, h // m, w // m)


# ------------------------------------------------------------------ before any calibration


@pytest.mark.parametrize("family", FAMILIES + MOE)
def test_without_calibrations_equals_plain_generate(family, clevr, mathv):
    """Own prefill (DeepStack levels at the image tokens, the family's positions) then the
    model's generate from the cache: the tokens of plain model.generate, two images."""
    model, processor = model_for(family, torch.float32), processor_for(family)
    inputs = prompt_inputs(processor, [clevr, mathv])
    with torch.no_grad():
        plain = model.generate(**inputs, max_new_tokens=12, do_sample=False)
    config = PVCConfig(schedule=PVCSchedule(max_calibrations=0))
    result = hf.generate(model, processor, [clevr, mathv], QUESTION, config=config, max_new_tokens=12, do_sample=False)
    assert result.token_ids == plain[0, inputs["input_ids"].shape[1]:].tolist()
    assert result.calibrations == [] and result.prompt_length == inputs["input_ids"].shape[1]
    ids = result.sequence[None]
    pad = token_ids(processor, family)[1]
    ref, _ = model.model.get_rope_index(ids, mm_token_type_ids=(ids == pad).long(), image_grid_thw=inputs["image_grid_thw"])
    assert torch.equal(result.position_ids, ref[:, 0])


# ------------------------------------------------------------------ exactness after calibrations


def relocated_sequence(family, prompt, script, calibrations, bridge, image_tokens):
    start_id, pad, end_id = token_ids(processor_for(family), family)
    start, end = prompt.index(start_id), prompt.index(end_id) + 1
    out, last = prompt[:start] + prompt[end:], 0
    for c in calibrations:
        out += script[last:c.token_index + 1] + bridge
        last = c.token_index + 1
    return out + [start_id] + [pad] * image_tokens + [end_id]


@pytest.mark.parametrize("family", FAMILIES + MOE)
def test_relocate_logits_equal_a_fresh_forward(family, clevr):
    """After two relocate calibrations the sequence is the documented one and the next-token
    logits equal the model's own forward over it (pooled features and pooled DeepStack levels)."""
    model, processor = model_for(family), processor_for(family)
    inputs = prompt_inputs(processor, [clevr])
    prompt = inputs["input_ids"][0].tolist()
    script = processor.tokenizer.encode(" Let us count the cubes first, then the spheres; wait, and the cylinders.",
                                        add_special_tokens=False)
    session = hf.PVCSession(model, processor, clevr, QUESTION, config=PVCConfig(mode="relocate", pool=2))
    session.extend(script[:6])
    first = session.calibrate()
    session.extend(script[6:14])
    second = session.calibrate()
    grid = merged(inputs, model)
    image, pgrid = pooled_image(vision(model, inputs)[0], grid, 2)
    want = relocated_sequence(family, prompt, script, [first, second], bridge_ids(processor), image[0].shape[0])
    assert session.sequence.tolist() == want
    assert first.grids == [pgrid]
    out, pos = reference_forward(model, family, torch.tensor(want), [image], [pgrid])
    assert torch.equal(session.positions, pos)
    result = session.run(max_new_tokens=1, do_sample=False, output_logits=True)
    torch.testing.assert_close(result.logits[0][0].double(), out.logits[0, -1].double(), **logits_tol(family))


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("pool", [2, 1])
def test_append_logits_equal_a_fresh_forward(family, clevr, pool):
    """Append calibrations found by the detector in generated text: every next-token distribution
    equals the model's own forward over the whole appended sequence."""
    model, processor = model_for(family), processor_for(family)
    result = hf.generate(model, processor, clevr, QUESTION, config=PVCConfig(mode="append", pool=pool),
                         max_new_tokens=14, do_sample=False, output_logits=True,
                         logits_processor=LogitsProcessorList([Force({3: WAIT, 4: COMMA, 9: WAIT, 10: COMMA})]))
    assert [c.token_index for c in result.calibrations] == [4, 10]
    inputs = prompt_inputs(processor, [clevr])
    grid = merged(inputs, model)
    original = vision(model, inputs)[0]
    image, pgrid = pooled_image(original, grid, pool)
    start_id, pad, end_id = token_ids(processor, family)
    ids, last = inputs["input_ids"][0].tolist(), 0
    for c in result.calibrations:
        ids += result.token_ids[last:c.token_index + 1] + bridge_ids(processor) + [start_id] + [pad] * image[0].shape[0] + [end_id]
        last = c.token_index + 1
    ids += result.token_ids[last:]
    assert result.sequence.tolist() == ids
    out, pos = reference_forward(model, family, torch.tensor(ids), [original, image, image], [grid, pgrid, pgrid])
    assert torch.equal(result.position_ids, pos)
    at, index = [], len(inputs["input_ids"][0])
    extra = len(bridge_ids(processor)) + image[0].shape[0] + 2
    calibrated = {c.token_index for c in result.calibrations}
    for j in range(len(result.token_ids)):
        at.append(index)
        index += 1 + (extra if j in calibrated else 0)
    for j, s in enumerate(at):
        torch.testing.assert_close(result.logits[j][0].double(), out.logits[0, s - 1].double(), **logits_tol(family))


@pytest.mark.parametrize("family", KV_FAMILIES)
def test_pruned_image_equals_a_fresh_forward(family, clevr):
    """Append with attention pruning (the query probe RMS-normed per head for Qwen3-VL, rotated
    with the family's rope): the re-injected image is the kept rows of the features and of every
    DeepStack level, at their full-grid cells; the logits after it equal the model's own forward
    with those rows."""
    model, processor = model_for(family), processor_for(family)
    layer = 1
    session = hf.PVCSession(model, processor, clevr, QUESTION,
                            config=PVCConfig(mode="append", prune={"ratio": 0.25, "layer": layer}))
    result = session.run(max_new_tokens=8, do_sample=False, output_logits=True,
                         logits_processor=LogitsProcessorList([Force({3: WAIT, 4: COMMA})]))
    (c,) = result.calibrations
    kept = [b for b in session.blocks if isinstance(b, hf._Image) and b.injected][0].kept
    inputs = prompt_inputs(processor, [clevr])
    feats, levels = vision(model, inputs)[0]
    grid = merged(inputs, model)
    n = feats.shape[0]
    assert c.visual_tokens == len(kept) == int(math.floor(0.25 * n + 0.5))
    # The kept tokens: the top quarter of the trigger token's eager attention on the image at
    # `layer` (renormalised over the image, mean over heads) in the model's own forward.
    _, pad, _ = token_ids(processor, family)
    prefix = torch.tensor(inputs["input_ids"][0].tolist() + result.token_ids[:c.token_index + 1])
    out, _ = reference_forward(model_for(family, attn="eager"), family, prefix, [(feats, levels)], [grid],
                               output_attentions=True)
    row = out.attentions[layer][0, :, -1, (prefix == pad).nonzero()[:, 0]]
    scores = (row / row.sum(-1, keepdim=True)).mean(0)
    assert kept.tolist() == torch.sort(torch.topk(scores, len(kept)).indices).values.tolist()
    # Reference: the full grid's positions with the dropped cells removed, the kept rows of every level.
    start_id, pad, end_id = token_ids(processor, family)
    ids = result.sequence
    cut = len(inputs["input_ids"][0]) + c.token_index + 1 + len(bridge_ids(processor)) + 1  # first kept token
    virtual = torch.cat([ids[:cut], torch.full((n,), pad), ids[cut + len(kept):]])
    keep = torch.ones(len(virtual), dtype=torch.bool)
    cells = torch.zeros(n, dtype=torch.bool)
    cells[kept] = True
    keep[cut:cut + n] = cells
    m = model.config.vision_config.spatial_merge_size
    grids = torch.tensor([[grid[0], grid[1] * m, grid[2] * m]] * 2)
    pos, _ = model.model.get_rope_index(virtual[None], mm_token_type_ids=(virtual[None] == pad).long(), image_grid_thw=grids)
    pos = pos[:, :, keep]
    assert torch.equal(result.position_ids, pos[:, 0])
    encoder = BaseModelOutputWithPooling(pooler_output=(feats, feats[kept]))
    if levels:
        encoder.deepstack_features = [(level, level[kept]) for level in levels]
    with torch.no_grad():
        out = model(input_ids=ids[None], position_ids=pos, mm_encoder_outputs={"image": encoder},
                    image_grid_thw=grids, mm_token_type_ids=(ids[None] == pad).long())
    s = cut + len(kept) + 1  # the first generated token after the pruned image
    torch.testing.assert_close(result.logits[c.token_index + 1][0].double(), out.logits[0, s - 1], atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize(
    "family, dtype",
    [(f, d) for f in KV_FAMILIES for d in (torch.float32, torch.bfloat16, torch.float64)] + [(f, torch.float32) for f in MOE],
    ids=lambda v: str(v).replace("torch.", ""),
)
def test_kv_layer0_keys_equal_a_fresh_encode(family, dtype, clevr, mathv):
    """kv: after each calibration, sequence and positions are relocate's and layer-0 keys and
    values (which see no context) equal those of relocate's fresh encode: the re-rotation uses
    the family's rope (Qwen3-VL interleaved M-RoPE; GLM partial rotary, adjacent pairs)."""
    model, processor = model_for(family, dtype), processor_for(family)
    script = processor.tokenizer.encode(" Count the cubes, then the spheres; wait, the cylinders too, and the small "
                                        "ones behind them, so the answer is seven.", add_special_tokens=False)
    sessions = {m: hf.PVCSession(model, processor, [clevr, mathv], QUESTION, config=PVCConfig(mode=m, pool=2))
                for m in ("kv", "relocate")}
    # The driver's rope settings agree with tvc_rs.kv.rope_settings (the kernels' own reading of a config).
    from tvc_rs.kv import rope_settings

    rope = sessions["kv"].rope
    mine = {"rotary_dim": rope.head_dim, "interleaved": False, "mrope_interleaved": False, **rope.kwargs()}
    shared = rope_settings(model.config)
    assert {k: list(v) if isinstance(v, tuple) else v for k, v in shared.items()} == mine
    for a, b in [(0, 8), (8, 20)]:
        for s in sessions.values():
            s.extend(script[a:b])
            s.calibrate()
        kv, rel = sessions["kv"], sessions["relocate"]
        assert torch.equal(kv.sequence, rel.sequence) and torch.equal(kv.positions, rel.positions)
        assert kv.cache.get_seq_length() == rel.cache.get_seq_length() == len(kv.sequence) - 1
        tol = {torch.float32: dict(atol=2e-5, rtol=2e-5), torch.bfloat16: dict(atol=2e-2, rtol=2e-2),
               torch.float64: dict(atol=2e-6, rtol=1e-5)}[dtype]
        torch.testing.assert_close(kv.cache.layers[0].keys, rel.cache.layers[0].keys, **tol)
        torch.testing.assert_close(kv.cache.layers[0].values, rel.cache.layers[0].values, **tol)
    assert kv.records[0].evicted_tokens == sum(img[1].shape[0] + 2 for img in kv.images)
    result = kv.run(max_new_tokens=2, do_sample=False)
    assert len(result.token_ids) == 20 + 2


# ------------------------------------------------------------------ refusals


def test_qwen3_5_refuses_kv_and_pruning(clevr):
    model, processor = model_for("qwen3_5", torch.float32), processor_for("qwen3_5")
    with pytest.raises(ValueError, match=r"config.mode = 'kv' is not possible for Qwen3.5.*linear_attention.*recurrent"):
        hf.generate(model, processor, clevr, QUESTION, config=PVCConfig(mode="kv"), max_new_tokens=2)
    with pytest.raises(ValueError, match=r"config.prune: not supported for Qwen3.5"):
        hf.generate(model, processor, clevr, QUESTION, config=PVCConfig(prune={"ratio": 0.5}), max_new_tokens=2)
    with pytest.raises(ValueError, match=r"visual_attention_curve: Qwen3.5's layers \[0, 1, 2\] are linear attention"):
        hf.visual_attention_curve(model, processor, clevr, QUESTION, max_new_tokens=2)


def test_unsupported_model_type_lists_the_supported_ones(clevr):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    model = Qwen2ForCausalLM(Qwen2Config(vocab_size=128, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1))
    with pytest.raises(TypeError) as err:
        hf.generate(model, processor_for("qwen3_vl"), clevr, QUESTION)
    message = str(err.value)
    assert "'qwen2'" in message
    for model_type in ("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe", "glm4v", "glm4v_moe", "qwen3_5"):
        assert model_type in message


def test_a_config_contradicting_the_family_rope_is_refused(clevr):
    """mrope_interleaved is never silently ignored: Qwen3-VL's code always interleaves."""
    model, processor = model_for("qwen3_vl", torch.float32), processor_for("qwen3_vl")
    text = model.config.get_text_config()
    saved = dict(text.rope_parameters)
    text.rope_parameters["mrope_interleaved"] = False
    try:
        with pytest.raises(ValueError, match="mrope_interleaved"):
            hf.PVCSession(model, processor, clevr, QUESTION)
    finally:
        text.rope_parameters.clear()
        text.rope_parameters.update(saved)


@pytest.mark.parametrize("family", ["qwen3_vl", "glm4v"])
def test_cli_generate_loads_a_family_folder(family, clevr, tmp_path, capsys):
    """`tvc-rs generate --model FOLDER` on a saved tiny model of the family (weights with
    save_pretrained, the processor with its own save_pretrained): the same tokens and
    calibrations as tvc_rs.hf.generate on the model in memory."""
    import json

    from tvc_rs import cli

    model, processor = model_for(family, torch.float32), processor_for(family)
    folder = tmp_path / family
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    image = str(asset("images/tvc_case1_clevr.jpg"))
    assert cli.main(["generate", "--model", str(folder), "--image", image, "--question", QUESTION, "--period", "4",
                     "--max-new-tokens", "9", "--dtype", "float32", "--mode", "kv", "--pool", "2", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    want = hf.generate(model, processor, clevr, QUESTION, max_new_tokens=9, do_sample=False,
                       config=PVCConfig(mode="kv", pool=2, schedule=PVCSchedule(period=4)))
    assert out["token_ids"] == want.token_ids
    assert [c["token_index"] for c in out["calibrations"]] == [c.token_index for c in want.calibrations] == [3, 7]
