"""tvc_rs.hf: PVC generation with real transformers Qwen2-VL / Qwen2.5-VL models (tiny configs,
random weights, saved with save_pretrained and loaded back), the real Qwen2-VL tokenizer and
processor files from the assets, and real images.

References are independent of tvc-rs: transformers' own forward passes, ``get_rope_index`` and
vision tower, a ``ReflectionDetector`` stream run over the generated tokens, and PyTorch pooling.
"""

from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import tvc_rs
from conftest import asset
from tvc_rs import PVCConfig, PVCSchedule, hf

transformers = pytest.importorskip("transformers")
from PIL import Image  # noqa: E402
from transformers import (  # noqa: E402
    AutoProcessor,
    LogitsProcessor,
    LogitsProcessorList,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    StoppingCriteria,
    StoppingCriteriaList,
)

WAIT, COMMA, EOS = 13824, 11, 151645  # " Wait", ",", <|im_end|> (assets README)
VS, VE, PAD = 151652, 151653, 151655
QUESTION = "How many objects are left?"

TEXT = dict(
    vocab_size=151936,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=2,
    num_key_value_heads=1,
    rope_parameters=dict(rope_type="default", rope_theta=1_000_000.0, mrope_section=[4, 6, 6]),
    tie_word_embeddings=True,
)


def tiny_config(family: str):
    if family == "qwen2_vl":
        return Qwen2VLConfig(
            text_config=dict(TEXT), vision_config=dict(depth=1, embed_dim=32, hidden_size=64, num_heads=2, mlp_ratio=2),
            tie_word_embeddings=True,
        )
    return Qwen2_5_VLConfig(
        text_config=dict(TEXT),
        vision_config=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
                           fullatt_block_indexes=[1], window_size=56),
        tie_word_embeddings=True,
    )


MODEL_CLASSES = {"qwen2_vl": Qwen2VLForConditionalGeneration, "qwen2_5_vl": Qwen2_5_VLForConditionalGeneration}


def make_model_dir(root: Path, family: str) -> Path:
    """A model folder: random weights (save_pretrained) + the real tokenizer / processor files."""
    folder = root / family
    torch.manual_seed(0)
    MODEL_CLASSES[family](tiny_config(family)).save_pretrained(folder)
    for f in asset("qwen2-vl").iterdir():
        if not f.name.startswith("config"):
            shutil.copy(f, folder / f.name)
    if family == "qwen2_5_vl":  # Qwen2.5-VL's own processor files over Qwen2-VL's tokenizer.json
        for f in asset("qwen2.5-vl").iterdir():
            shutil.copy(f, folder / f.name)
    return folder


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Tiny models decode fastest on one thread (and do not fight the other tests for cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def model_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return {family: make_model_dir(root, family) for family in MODEL_CLASSES}


_processors: dict = {}


def processor_for(model_dirs, family):
    if family not in _processors:
        _processors[family] = AutoProcessor.from_pretrained(model_dirs[family])
    return _processors[family]


_models: dict = {}


def model_for(model_dirs, family, dtype=torch.float32, attn="sdpa"):
    key = (family, dtype, attn)
    if key not in _models:
        _models[key] = MODEL_CLASSES[family].from_pretrained(model_dirs[family], dtype=dtype, attn_implementation=attn).eval()
    return _models[key]


@pytest.fixture(scope="session")
def clevr():
    return Image.open(asset("images/tvc_case1_clevr.jpg")).convert("RGB")


@pytest.fixture(scope="session")
def mathv():
    return Image.open(sorted(asset("images/mathv").glob("*.jpg"))[0]).convert("RGB")


class Force(LogitsProcessor):
    """Forces ``script[step]`` at generation step ``step`` (steps counted over every call, i.e.
    over the model's own tokens across all segments); other steps are left to the model."""

    def __init__(self, script):
        self.script = dict(enumerate(script)) if isinstance(script, list) else dict(script)
        self.step = 0

    def __call__(self, input_ids, scores):
        token = self.script.get(self.step)
        self.step += 1
        if token is None:
            return scores
        forced = torch.full_like(scores, -math.inf)
        forced[:, token] = 0.0
        return forced


def forced(script):
    return LogitsProcessorList([Force(script)])


def prompt_inputs(processor, images):
    images = images if isinstance(images, list) else [images]
    content = [{"type": "image"} for _ in images] + [{"type": "text", "text": QUESTION}]
    text = processor.apply_chat_template([{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True)
    return processor(images=images, text=[text], return_tensors="pt")


def bridge_ids(processor, bridge="Let me see the image again:"):
    return processor.tokenizer.encode(" " + bridge, add_special_tokens=False)


def torch_pool(x, grid, k):
    """Reference k x k pooling on a (t, h, w) grid, edge windows averaging what they cover."""
    t, h, w = grid
    x = x.reshape(t, h, w, -1)
    out = []
    for f in range(t):
        for i in range(0, h, k):
            for j in range(0, w, k):
                out.append(x[f, i:i + k, j:j + k].reshape(-1, x.shape[-1]).mean(0))
    return torch.stack(out), (t, -(-h // k), -(-w // k))


def image_features(model, inputs):
    with torch.no_grad():
        out = model.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"])
    return [f.to(model.dtype) for f in out.pooler_output]


def reference_forward(model, ids, blocks, *, grids_patch, attn_out=False):
    """One fresh forward of ``ids`` [L] with image tokens' embeddings from ``blocks`` (features in
    order of the image blocks) and positions from transformers' get_rope_index over the sequence
    with each image block at ``grids_patch`` (full grids; ``keep`` masks drop pruned cells)."""
    virtual, keep = [], []
    i, b = 0, 0
    ids_list = ids.tolist()
    while i < len(ids_list):
        if ids_list[i] != PAD:
            virtual.append(ids_list[i]); keep.append(True); i += 1
            continue
        j = i
        while j < len(ids_list) and ids_list[j] == PAD:
            j += 1
        feats, mask = blocks[b]
        full = int(np.prod(grids_patch[b])) // 4
        m = np.ones(full, bool) if mask is None else mask
        assert m.sum() == j - i == feats.shape[0]
        virtual += [PAD] * full
        keep += list(m)
        i, b = j, b + 1
    virtual = torch.tensor([virtual])
    keep = torch.tensor(keep)
    mm = (virtual == PAD).long()
    pos, _ = model.model.get_rope_index(virtual, mm_token_type_ids=mm, image_grid_thw=torch.tensor(grids_patch))
    pos = pos[:, :, keep]
    emb = model.get_input_embeddings()(ids[None]).clone()
    emb[0, ids == PAD] = torch.cat([f for f, _ in blocks]).to(emb.dtype)
    with torch.no_grad():
        out = model(inputs_embeds=emb, position_ids=pos, use_cache=True, output_attentions=attn_out)
    return out, pos[:, 0]


# ------------------------------------------------------------------ plain generation


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl"])
def test_without_calibrations_equals_plain_generate(model_dirs, family, clevr):
    """The segment machinery (own prefill with tvc-rs positions, generate continuing from the
    cache) gives exactly what model.generate gives on the processor's inputs."""
    model, processor = model_for(model_dirs, family), processor_for(model_dirs, family)
    inputs = prompt_inputs(processor, clevr)
    with torch.no_grad():
        plain = model.generate(**inputs, max_new_tokens=12, do_sample=False)
    config = PVCConfig(schedule=PVCSchedule(max_calibrations=0))
    result = hf.generate(model, processor, clevr, QUESTION, config=config, max_new_tokens=12, do_sample=False)
    assert result.token_ids == plain[0, inputs["input_ids"].shape[1]:].tolist()
    assert result.calibrations == []
    assert result.prompt_length == inputs["input_ids"].shape[1]
    # Positions of the whole sequence equal the model's own get_rope_index.
    ids = result.sequence[None]
    ref, _ = model.model.get_rope_index(ids, mm_token_type_ids=(ids == PAD).long(), image_grid_thw=inputs["image_grid_thw"])
    assert torch.equal(result.position_ids, ref[:, 0])
    assert result.text == processor.tokenizer.decode(result.token_ids, skip_special_tokens=True)


def test_sampling_settings_pass_through(model_dirs, clevr):
    model, processor = model_for(model_dirs, "qwen2_vl"), processor_for(model_dirs, "qwen2_vl")
    config = PVCConfig(mode="append", schedule=PVCSchedule(period=4))
    greedy = hf.generate(model, processor, clevr, QUESTION, config=config, max_new_tokens=10, do_sample=False)
    top1 = hf.generate(model, processor, clevr, QUESTION, config=config, max_new_tokens=10, do_sample=True, top_k=1)
    assert top1.token_ids == greedy.token_ids
    # (The Qwen2-VL generation_config.json of the assets says top_k=1, top_p=0.001: override them.)
    hot = dict(do_sample=True, temperature=5.0, top_k=0, top_p=1.0)
    torch.manual_seed(1)
    a = hf.generate(model, processor, clevr, QUESTION, config=config, max_new_tokens=10, **hot)
    torch.manual_seed(1)
    b = hf.generate(model, processor, clevr, QUESTION, config=config, max_new_tokens=10, **hot)
    assert a.token_ids == b.token_ids and a.token_ids != greedy.token_ids


# ------------------------------------------------------------------ where calibrations happen


_trace_cache: dict = {}


def trace_tokens(processor, limit=100, min_hits=3):
    """``limit`` tokens of a real long-CoT trace (the QVQ-72B-Preview / QwQ demo outputs), a
    window holding at least ``min_hits`` reflection points."""
    if (limit, min_hits) in _trace_cache:
        return _trace_cache[limit, min_hits]
    detector = tvc_rs.ReflectionDetector(processor.tokenizer)
    path = asset("traces/qwen_blog_qvq72b_qwq32b_official.jsonl")
    for line in path.read_text(encoding="utf-8").splitlines():
        ids = processor.tokenizer.encode(json.loads(line)["response"], add_special_tokens=False)
        for hit in detector.find_tokens(ids):
            start = max(0, hit.token_index - 25)
            window = ids[start:start + limit]
            if len(window) == limit and len(detector.find_tokens(window)) >= min_hits:
                _trace_cache[limit, min_hits] = window
                return window
    pytest.skip("no trace window with three reflection points")


@pytest.mark.parametrize("mode", ["relocate", "append", "kv"])
@pytest.mark.parametrize(
    "schedule",
    [dict(), dict(warmup=20, min_gap=15, max_calibrations=2), dict(period=37)],
    ids=["every-hit", "warmup-gap-max", "period"],
)
def test_calibrations_happen_where_the_schedule_says(model_dirs, clevr, mode, schedule):
    model, processor = model_for(model_dirs, "qwen2_vl"), processor_for(model_dirs, "qwen2_vl")
    script = trace_tokens(processor)
    seen = []
    result = hf.generate(
        model, processor, clevr, QUESTION, config=PVCConfig(mode=mode, schedule=PVCSchedule(**schedule)),
        max_new_tokens=len(script), logits_processor=forced(script), on_calibration=seen.append,
    )
    assert result.token_ids == script
    # Independent expectation: a fresh stream with the same schedule over the same tokens.
    stream = tvc_rs.ReflectionDetector(asset("qwen2-vl/tokenizer.json")).stream(PVCSchedule(**schedule))
    expected = [c for c in (stream.push(t) for t in script) if c is not None]
    expected = [c for c in expected if c.token_index < len(script) - 1]  # none after the last token
    assert expected, "the trace must trigger"
    assert [(c.token_index, c.reason, c.phrase) for c in result.calibrations] == [
        (c.token_index, c.reason, c.phrase) for c in expected
    ]
    assert seen == result.calibrations
    for i, c in enumerate(result.calibrations):
        assert c.index == i and c.mode == mode and c.visual_tokens == 9 and c.grids == [(1, 3, 3)]
    # Text: the generated text with the bridge after each calibration token.
    pieces, last = [], 0
    for c in result.calibrations:
        pieces += script[last:c.token_index + 1] + bridge_ids(processor)
        last = c.token_index + 1
    pieces += script[last:]
    assert result.text == processor.tokenizer.decode(pieces, skip_special_tokens=True)
    for c in result.calibrations:
        assert result.text[c.text_offset:].startswith(" Let me see the image again:")


# ------------------------------------------------------------------ exactness


def expected_append_sequence(prompt_ids, script, calibrations, bridge, image_tokens):
    out, last = list(prompt_ids), 0
    for c in calibrations:
        out += script[last:c.token_index + 1] + bridge + [VS] + [PAD] * image_tokens + [VE]
        last = c.token_index + 1
    return out + script[last:]


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl"])
@pytest.mark.parametrize("pool", [4, 2, 1])
def test_append_logits_equal_one_fresh_forward(model_dirs, clevr, family, pool):
    """After append calibrations, every next-token distribution equals one fresh float64 forward
    over the same full sequence (the model's vision tower, PyTorch pooling, get_rope_index)."""
    model = model_for(model_dirs, family, torch.float64)
    processor = processor_for(model_dirs, family)
    script = {3: WAIT, 4: COMMA, 11: WAIT, 12: COMMA}  # other tokens: the model's own
    result = hf.generate(
        model, processor, clevr, QUESTION, config=PVCConfig(mode="append", pool=pool),
        max_new_tokens=18, do_sample=False, logits_processor=forced(script), output_logits=True,
    )
    assert [c.token_index for c in result.calibrations] == [4, 12]
    inputs = prompt_inputs(processor, clevr)
    (feats,) = image_features(model, inputs)
    grid = tuple(int(v) for v in inputs["image_grid_thw"][0])
    merged = (grid[0], grid[1] // 2, grid[2] // 2)
    pooled, pgrid = torch_pool(feats, merged, pool)
    ids = expected_append_sequence(inputs["input_ids"][0].tolist(), result.token_ids, result.calibrations,
                                   bridge_ids(processor), pooled.shape[0])
    assert result.sequence.tolist() == ids
    patch = [list(grid)] + [[pgrid[0], pgrid[1] * 2, pgrid[2] * 2]] * 2
    out, pos = reference_forward(model, torch.tensor(ids), [(feats, None), (pooled, None), (pooled, None)], grids_patch=patch)
    assert torch.equal(result.position_ids, pos)
    # Where each generated token sits in the sequence; its logits came from the token before.
    at, index = [], len(inputs["input_ids"][0])
    extra = len(bridge_ids(processor)) + pooled.shape[0] + 2
    for j in range(len(result.token_ids)):
        at.append(index)
        index += 1 + (extra if j in {c.token_index for c in result.calibrations} else 0)
    for j, s in enumerate(at):
        torch.testing.assert_close(result.logits[j][0].double(), out.logits[0, s - 1], atol=1e-5, rtol=1e-5)


def test_append_with_pruning_equals_fresh_forward_and_selects_by_attention(model_dirs, clevr):
    """Pruned re-injection: the kept tokens are the top share of the trigger token's attention on
    the image (eager attention row of a fresh forward, renormalised over the image, mean over
    heads), they keep their full-grid M-RoPE cells, and the logits after it equal a fresh forward."""
    family = "qwen2_vl"
    model = model_for(model_dirs, family, torch.float64)
    eager = model_for(model_dirs, family, torch.float64, attn="eager")
    processor = processor_for(model_dirs, family)
    layer = 1
    config = PVCConfig(mode="append", prune={"ratio": 0.25, "layer": layer})
    session = hf.PVCSession(model, processor, clevr, QUESTION, config=config)
    result = session.run(max_new_tokens=10, do_sample=False, logits_processor=forced({3: WAIT, 4: COMMA}), output_logits=True)
    (c,) = result.calibrations
    injected = [b for b in session.blocks if isinstance(b, hf._Image) and b.injected][0]
    inputs = prompt_inputs(processor, clevr)
    (feats,) = image_features(model, inputs)
    grid = tuple(int(v) for v in inputs["image_grid_thw"][0])
    n = feats.shape[0]
    # Reference scores: eager attention of the trigger token (last of the prefix) at `layer`.
    prompt = inputs["input_ids"][0].tolist()
    prefix = torch.tensor(prompt + result.token_ids[:c.token_index + 1])
    out, _ = reference_forward(eager, prefix, [(feats, None)], grids_patch=[list(grid)], attn_out=True)
    image_cols = (prefix == PAD).nonzero()[:, 0]
    row = out.attentions[layer][0, :, -1, image_cols]  # [heads, n]
    scores = (row / row.sum(-1, keepdim=True)).mean(0)
    keep = int(math.floor(0.25 * n + 0.5))
    want = torch.sort(torch.topk(scores, keep).indices).values
    assert injected.kept.tolist() == want.tolist()
    assert c.visual_tokens == keep and c.grids == [(1, grid[1] // 2, grid[2] // 2)]
    # Exactness after the pruned injection.
    mask = np.zeros(n, bool)
    mask[want.numpy()] = True
    ids = result.sequence
    out, pos = reference_forward(model, ids, [(feats, None), (feats[want], mask)], grids_patch=[list(grid)] * 2)
    assert torch.equal(result.position_ids, pos)
    s = len(prompt) + c.token_index + 1 + len(bridge_ids(processor)) + keep + 2  # first token after the image
    torch.testing.assert_close(result.logits[c.token_index + 1][0].double(), out.logits[0, s - 1], atol=1e-5, rtol=1e-5)


def relocated_sequence(prompt_ids, script, calibrations, bridge, image_tokens):
    """The documented relocate layout: prompt without its image block, text so far with every
    earlier bridge (earlier re-injected images dropped), bridge, compressed image."""
    start = prompt_ids.index(VS)
    end = prompt_ids.index(VE) + 1
    out, last = prompt_ids[:start] + prompt_ids[end:], 0
    for c in calibrations:
        out += script[last:c.token_index + 1] + bridge
        last = c.token_index + 1
    return out + [VS] + [PAD] * image_tokens + [VE]


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl"])
def test_relocate_rebuilds_the_documented_sequence(model_dirs, clevr, family):
    model = model_for(model_dirs, family, torch.float64)
    processor = processor_for(model_dirs, family)
    inputs = prompt_inputs(processor, clevr)
    prompt = inputs["input_ids"][0].tolist()
    script = trace_tokens(processor, 40, min_hits=0)
    session = hf.PVCSession(model, processor, clevr, QUESTION, config=PVCConfig(mode="relocate", pool=4))
    session.extend(script[:10])
    first = session.calibrate()
    assert session.sequence.tolist() == relocated_sequence(prompt, script, [first], bridge_ids(processor), 9)
    session.extend(script[10:25])
    second = session.calibrate()
    assert second.token_index == 24
    want = relocated_sequence(prompt, script, [first, second], bridge_ids(processor), 9)
    assert session.sequence.tolist() == want
    assert second.evicted_tokens == 11 and second.prefilled_tokens == len(want) - 1
    # Positions: transformers' get_rope_index of the rebuilt sequence; the cache is its fresh
    # encode, so the next-token logits equal a fresh forward over it.
    (feats,) = image_features(model, inputs)
    grid = tuple(int(v) for v in inputs["image_grid_thw"][0])
    pooled, pgrid = torch_pool(feats, (grid[0], grid[1] // 2, grid[2] // 2), 4)
    out, pos = reference_forward(model, torch.tensor(want), [(pooled, None)], grids_patch=[[1, pgrid[1] * 2, pgrid[2] * 2]])
    assert torch.equal(session.positions, pos)
    result = session.run(max_new_tokens=1, do_sample=False, output_logits=True)
    torch.testing.assert_close(result.logits[0][0].double(), out.logits[0, -1], atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=["f32", "bf16", "f64"])
def test_kv_cache_equals_relocate_positions_and_layer0_keys(model_dirs, clevr, mathv, family, dtype):
    """kv: after each calibration the sequence and positions are relocate's, and layer-0 keys and
    values (which see no context) equal those of relocate's fresh encode of the same sequence.
    Every dtype goes through the Rust kernel (float64 computed in float32)."""
    model = model_for(model_dirs, family, dtype)
    processor = processor_for(model_dirs, family)
    script = trace_tokens(processor, 60, min_hits=0)
    images = [clevr, mathv]  # two image blocks to evict
    sessions = {m: hf.PVCSession(model, processor, images, QUESTION, config=PVCConfig(mode=m, pool=2)) for m in ("kv", "relocate")}
    for a, b in [(0, 12), (12, 30), (30, 41)]:
        for s in sessions.values():
            s.extend(script[a:b])
            s.calibrate()
        kv, rel = sessions["kv"], sessions["relocate"]
        assert torch.equal(kv.sequence, rel.sequence)
        assert torch.equal(kv.positions, rel.positions)
        assert kv.cache.get_seq_length() == rel.cache.get_seq_length() == len(kv.sequence) - 1
        # The model itself computes RoPE angles in float32 (position * inv_freq), also for float64
        # weights; tvc-rs rotates by the exact angle of the delta: agreement to float32 precision.
        tol = {torch.float32: dict(atol=2e-5, rtol=2e-5), torch.bfloat16: dict(atol=2e-2, rtol=2e-2),
               torch.float64: dict(atol=2e-6, rtol=1e-5)}[dtype]
        torch.testing.assert_close(kv.cache.layers[0].keys, rel.cache.layers[0].keys, **tol)
        torch.testing.assert_close(kv.cache.layers[0].values, rel.cache.layers[0].values, **tol)
    # relocate's positions are transformers' get_rope_index of the rebuilt sequence.
    ids = rel.sequence[None]
    grids = torch.tensor([[1, 2 * g[1], 2 * g[2]] for g in kv.records[-1].grids])
    ref, _ = model.model.get_rope_index(ids, mm_token_type_ids=(ids == PAD).long(), image_grid_thw=grids)
    assert torch.equal(kv.positions, ref[:, 0])
    assert kv.records[0].evicted_tokens == sum(img[1].shape[0] + 2 for img in kv.images)
    # Generation continues from the kv cache.
    result = kv.run(max_new_tokens=3, do_sample=False)
    assert len(result.token_ids) == 41 + 3


def test_kv_pruned_image_positions(model_dirs, clevr):
    """kv with pruning: the kept tokens keep their full-grid cells, as relocate assigns them."""
    model = model_for(model_dirs, "qwen2_vl")
    processor = processor_for(model_dirs, "qwen2_vl")
    script = trace_tokens(processor, 30, min_hits=0)
    config = dict(prune={"mass": 0.6})
    kv = hf.PVCSession(model, processor, clevr, QUESTION, config=PVCConfig(mode="kv", **config))
    kv.extend(script[:10])
    record = kv.calibrate()
    injected = kv.layout.spans[-1][2]
    assert 1 <= record.visual_tokens == len(injected.kept) < 99
    ids = kv.sequence
    # Reference: get_rope_index over the full grid, pruned cells dropped.
    full = ids.tolist()
    start = full.index(VS)
    virtual = full[:start + 1] + [PAD] * 99 + full[start + 1 + record.visual_tokens:]
    virtual = torch.tensor([virtual])
    pos, _ = model.model.get_rope_index(virtual, mm_token_type_ids=(virtual == PAD).long(), image_grid_thw=torch.tensor([[1, 18, 22]]))
    keep = torch.ones(virtual.shape[1], dtype=torch.bool)
    cells = torch.zeros(99, dtype=torch.bool)
    cells[injected.kept] = True
    keep[start + 1:start + 100] = cells
    assert torch.equal(kv.positions, pos[:, 0, keep])


@pytest.mark.parametrize("mode", ["relocate", "append", "kv"])
@pytest.mark.parametrize("compression", [dict(pool=2), dict(prune={"mass": 0.5})], ids=["pool", "prune"])
def test_incremental_layout_equals_the_whole_sequence_laid_out(model_dirs, clevr, mathv, mode, compression):
    """A calibration lays out only what it adds; after three of them (two prompt images, pruned
    copies at their full-grid cells) ids, positions, spans and masks equal the whole block list
    laid out again from scratch."""
    model = model_for(model_dirs, "qwen2_vl")
    processor = processor_for(model_dirs, "qwen2_vl")
    script = trace_tokens(processor, 40, min_hits=0)
    session = hf.PVCSession(model, processor, [clevr, mathv], QUESTION, config=PVCConfig(mode=mode, **compression))
    for a, b in [(0, 9), (9, 20), (20, 31)]:
        session.extend(script[a:b])
        session.calibrate()
        whole = session._layout(session.blocks)
        assert torch.equal(session.layout.ids, whole.ids)
        assert torch.equal(session.layout.positions, whole.positions)
        assert [(s, e, id(block)) for s, e, block in session.layout.spans] == [(s, e, id(block)) for s, e, block in whole.spans]
        assert torch.equal(session.layout.image_mask, whole.image_mask)
        assert torch.equal(session.layout.injected_mask, whole.injected_mask)


_DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device"))]


@pytest.mark.parametrize("device", _DEVICES)
@pytest.mark.parametrize("compression", ["pool", "prune"])
def test_compression_and_kv_run_in_tvc_rs_on_the_model_device(model_dirs, clevr, mathv, monkeypatch, device, compression):
    """Every compression and KV step of a calibration is a tvc-rs call on the model's own tensors:
    features, queries and cache layers on its device (the CUDA kernels on a GPU), the cache
    layers passed as they are (no copies); kv's cache then equals relocate's fresh encode."""
    from tvc_rs.hf import session as session_module

    model = MODEL_CLASSES["qwen2_vl"].from_pretrained(model_dirs["qwen2_vl"], dtype=torch.float32).to(device).eval()
    processor = processor_for(model_dirs, "qwen2_vl")
    script = trace_tokens(processor, 40, min_hits=0)
    calls: list = []
    names = ["pool_visual_tokens", "visual_token_scores", "select_tokens", "prune_visual_tokens", "relocate_spans", "rerotate_keys"]
    for name in names:
        real = getattr(session_module, name)

        def spy(*args, _real=real, _name=name, **kwargs):
            if _name == "relocate_spans":  # the kv session's cache layers as they are now?
                layers = sessions["kv"].cache.layers
                in_place = all(k is layer.keys for k, layer in zip(args[0], layers))
                in_place &= all(v is layer.values for v, layer in zip(args[1], layers))
                assert in_place and len(args[0]) == len(layers), "relocate_spans was not given the cache's own layers"
            calls.append((_name, args))
            return _real(*args, **kwargs)

        monkeypatch.setattr(session_module, name, spy)
    config = dict(pool=2) if compression == "pool" else dict(prune={"ratio": 0.3, "layer": 1})
    sessions = {m: hf.PVCSession(model, processor, [clevr, mathv], QUESTION, config=PVCConfig(mode=m, **config))
                for m in ("kv", "relocate")}
    for a, b in [(0, 12), (12, 30)]:
        for mode, s in sessions.items():
            s.extend(script[a:b])
            if mode == "kv":
                calls.clear()
            s.calibrate()
        kv, rel = sessions["kv"], sessions["relocate"]
        called = {name for name, _ in calls}
        want = {"relocate_spans"} | ({"pool_visual_tokens"} if compression == "pool" and a == 0 else set())
        if compression == "prune":
            want |= {"rerotate_keys", "visual_token_scores", "select_tokens", "prune_visual_tokens"}
        assert want <= called, f"not called: {want - called}"
        # Every image block (two images: two or more) leaves the cache in one call.
        evictions = [args[2] for name, args in calls if name == "relocate_spans"]
        assert len(evictions) == 1 and len(evictions[0]) >= 2, evictions
        for name, args in calls:
            first = args[0]
            tensors = list(first) if isinstance(first, (list, tuple)) else [first]
            if name == "visual_token_scores":
                tensors.append(args[1])
            assert all(t.device.type == device for t in tensors), name
        assert torch.equal(kv.sequence, rel.sequence) and torch.equal(kv.positions, rel.positions)
        torch.testing.assert_close(kv.cache.layers[0].keys, rel.cache.layers[0].keys, atol=2e-5, rtol=2e-5)
        torch.testing.assert_close(kv.cache.layers[0].values, rel.cache.layers[0].values, atol=2e-5, rtol=2e-5)


# ------------------------------------------------------------------ generate's arguments


class Recorder:
    """A streamer recording what it is given."""

    def __init__(self):
        self.puts, self.ends = [], 0

    def put(self, value):
        self.puts.append(value.reshape(-1).tolist())

    def end(self):
        self.ends += 1


class StopAt(StoppingCriteria):
    def __init__(self, n):
        self.n, self.calls = n, 0

    def __call__(self, input_ids, scores, **kwargs):
        self.calls += 1
        return torch.full((input_ids.shape[0],), self.calls >= self.n, dtype=torch.bool)


@pytest.mark.parametrize("mode", ["relocate", "kv"])
def test_streamer_stopping_criteria_and_budget_across_segments(model_dirs, clevr, mode):
    model, processor = model_for(model_dirs, "qwen2_vl"), processor_for(model_dirs, "qwen2_vl")
    config = PVCConfig(mode=mode)
    streamer = Recorder()
    script = {2: WAIT, 3: COMMA, 7: WAIT, 8: COMMA}
    result = hf.generate(model, processor, clevr, QUESTION, config=config, max_new_tokens=15,
                         logits_processor=forced(script), streamer=streamer)
    assert len(result.token_ids) == 15 and result.stop_reason == "max_new_tokens"
    assert [c.token_index for c in result.calibrations] == [3, 8]
    # The prompt once, then every token and each bridge in order, end() once.
    assert streamer.puts[0] == prompt_inputs(processor, clevr)["input_ids"][0].tolist()
    streamed = sum(streamer.puts[1:], [])
    t = result.token_ids
    assert streamed == t[:4] + bridge_ids(processor) + t[4:9] + bridge_ids(processor) + t[9:]
    assert streamer.ends == 1
    # A user criterion stops the whole generation, not just a segment.
    stop = StopAt(6)
    result = hf.generate(model, processor, clevr, QUESTION, config=config, max_new_tokens=15,
                         logits_processor=forced(script), stopping_criteria=StoppingCriteriaList([stop]))
    assert len(result.token_ids) == 6 and result.stop_reason == "stopping_criteria"
    assert [c.token_index for c in result.calibrations] == [3]
    # EOS ends it; a calibration decided on the last token is not made.
    result = hf.generate(model, processor, clevr, QUESTION, config=config, max_new_tokens=15,
                         logits_processor=forced({**script, 9: EOS}))
    assert result.stop_reason == "eos" and len(result.token_ids) == 10
    result = hf.generate(model, processor, clevr, QUESTION, config=config, max_new_tokens=4,
                         logits_processor=forced(script))
    assert len(result.token_ids) == 4 and result.calibrations == []


def test_messages_and_several_images(model_dirs, clevr, mathv):
    model, processor = model_for(model_dirs, "qwen2_vl"), processor_for(model_dirs, "qwen2_vl")
    messages = [{"role": "user", "content": [{"type": "image", "image": str(asset("images/tvc_case1_clevr.jpg"))},
                                            {"type": "text", "text": "Compare"}, {"type": "image"}]}]
    result = hf.generate(model, processor, [mathv], messages=messages, config=PVCConfig(mode="append"),
                         max_new_tokens=6, logits_processor=forced({1: WAIT, 2: COMMA}))
    (c,) = result.calibrations
    assert len(c.grids) == 2  # both images are given again, in order
    assert result.sequence.tolist().count(VS) == 4


# ------------------------------------------------------------------ bad input


def test_bad_input(model_dirs, clevr):
    model, processor = model_for(model_dirs, "qwen2_vl"), processor_for(model_dirs, "qwen2_vl")
    from transformers import Qwen2Config, Qwen2ForCausalLM

    text_only = Qwen2ForCausalLM(Qwen2Config(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                             num_attention_heads=2, num_key_value_heads=1))
    with pytest.raises(TypeError, match=re.escape("model must be a vision-language model") + ".*" + re.escape("Qwen2ForCausalLM")):
        hf.generate(text_only, processor, clevr, QUESTION)
    with pytest.raises(ValueError, match=re.escape("images: PVC needs at least one image")):
        hf.generate(model, processor, None, QUESTION)
    with pytest.raises(ValueError, match=re.escape("images: PVC needs at least one image")):
        hf.generate(model, processor, [], QUESTION)
    with pytest.raises(ValueError, match=re.escape("images: the processor rejected")):
        hf.generate(model, processor, Image.new("RGB", (2, 900)), QUESTION)  # aspect ratio 450
    with pytest.raises(FileNotFoundError, match=re.escape("images[0]: no such file")):
        hf.generate(model, processor, "/nonexistent/image.png", QUESTION)
    with pytest.raises(TypeError, match=re.escape("images[0] must be")):
        hf.generate(model, processor, 42, QUESTION)
    with pytest.raises(ValueError, match=re.escape("pool = 16 is larger than the merged grid of images[0] (9 x 11")):
        hf.generate(model, processor, clevr, QUESTION, config=PVCConfig(pool=16))
    with pytest.raises(ValueError, match=re.escape("max_calibrations = -1")):
        PVCConfig(schedule=PVCSchedule(max_calibrations=-1))
    with pytest.raises(ValueError, match=re.escape("max_calibrations = -1")):
        PVCConfig(schedule={"max_calibrations": -1})
    with pytest.raises(ValueError, match=re.escape("mode = 'fast'")):
        PVCConfig(mode="fast")
    with pytest.raises(ValueError, match=re.escape("pool = 0")):
        PVCConfig(pool=0)
    with pytest.raises(ValueError, match=re.escape("prune['ratio'] = 1.5")):
        PVCConfig(prune=1.5)
    with pytest.raises(ValueError, match=re.escape("exactly one of 'ratio', 'mass' or 'keep'")):
        PVCConfig(prune={"ratio": 0.5, "mass": 0.5})
    with pytest.raises(TypeError, match=re.escape("config must be a tvc_rs.PVCConfig")):
        hf.generate(model, processor, clevr, QUESTION, config={"mode": "kv"})
    with pytest.raises(ValueError, match=re.escape("num_beams = 2")):
        hf.generate(model, processor, clevr, QUESTION, num_beams=2)
    with pytest.raises(ValueError, match=re.escape("input_ids")):
        hf.generate(model, processor, clevr, QUESTION, input_ids=torch.zeros(1, 3, dtype=torch.long))
    with pytest.raises(ValueError, match=re.escape("question must be a non-empty str")):
        hf.generate(model, processor, clevr, "  ")


# ------------------------------------------------------------------ visual forgetting


def test_visual_attention_curve_equals_eager_attention_of_a_fresh_forward(model_dirs, clevr):
    model = model_for(model_dirs, "qwen2_vl", torch.float64)
    eager = model_for(model_dirs, "qwen2_vl", torch.float64, attn="eager")
    processor = processor_for(model_dirs, "qwen2_vl")
    script = {4: WAIT, 5: COMMA}
    plain = hf.visual_attention_curve(model, processor, clevr, QUESTION, max_new_tokens=10, logits_processor=forced(script))
    assert model.config._attn_implementation == "sdpa"  # switched back
    with_pvc = hf.visual_attention_curve(model, processor, clevr, QUESTION, config=PVCConfig(mode="append"),
                                         max_new_tokens=10, logits_processor=forced(script))
    assert plain.image_share.shape == (10, 2) and plain.calibrations == []
    assert with_pvc.calibrations == [5]
    inputs = prompt_inputs(processor, clevr)
    (feats,) = image_features(model, inputs)
    grid = tuple(int(v) for v in inputs["image_grid_thw"][0])
    prompt_len = inputs["input_ids"].shape[1]
    # Plain: reference attention rows of the final sequence.
    out, _ = reference_forward(eager, plain.result.sequence, [(feats, None)], grids_patch=[list(grid)], attn_out=True)
    cols = plain.result.sequence == PAD
    for j in range(10):
        for layer in range(2):
            want = out.attentions[layer][0, :, prompt_len + j - 1][:, cols].sum(-1).mean(0)
            assert plain.image_share[j, layer] == pytest.approx(float(want), abs=1e-9)
    assert np.all(plain.injected_share == 0)
    # With PVC: injected images count too, from the token after the calibration on.
    pooled, pgrid = torch_pool(feats, (1, grid[1] // 2, grid[2] // 2), 4)
    seq = with_pvc.result.sequence
    out, _ = reference_forward(eager, seq, [(feats, None), (pooled, None)],
                               grids_patch=[list(grid), [1, pgrid[1] * 2, pgrid[2] * 2]], attn_out=True)
    image = (seq == PAD).nonzero()[:, 0]
    injected_cols = image[image > prompt_len]
    j_after = 6
    s = prompt_len + j_after + len(bridge_ids(processor)) + 9 + 2  # sequence index of token 6
    for layer in range(2):
        row = out.attentions[layer][0, :, s - 1]
        assert with_pvc.image_share[j_after, layer] == pytest.approx(float(row[:, image].sum(-1).mean()), abs=1e-9)
        assert with_pvc.injected_share[j_after, layer] == pytest.approx(float(row[:, injected_cols].sum(-1).mean()), abs=1e-9)
    assert np.all(with_pvc.injected_share[:6] == 0) and np.all(with_pvc.injected_share[6:] > 0)


def test_attention_csv_and_plot(model_dirs, clevr, tmp_path):
    model, processor = model_for(model_dirs, "qwen2_vl"), processor_for(model_dirs, "qwen2_vl")
    curve = hf.visual_attention_curve(model, processor, clevr, QUESTION, config=PVCConfig(schedule=PVCSchedule(period=3)),
                                      max_new_tokens=7)
    hf.write_attention_csv([curve], tmp_path / "c.csv")
    import csv

    with open(tmp_path / "c.csv", encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 7 * 2
    assert [int(r["token_index"]) for r in rows if r["calibrated"] == "1" and r["layer"] == "0"] == curve.calibrations == [2, 5]
    assert float(rows[2]["image_share"]) == pytest.approx(curve.image_share[1, 0], rel=1e-5)
    assert list(rows[0]) == hf.ATTENTION_CSV_COLUMNS
    for r in rows:
        t, layer = int(r["token_index"]), int(r["layer"])
        assert float(r["original_share"]) + float(r["injected_share"]) == pytest.approx(float(r["image_share"]), rel=1e-4)
        n_img = int(r["original_tokens"]) + int(r["injected_tokens"])
        text_share = 1 - float(r["image_share"])
        want = (float(r["image_share"]) / n_img) / (text_share / int(r["text_tokens"]))
        assert float(r["image_per_token"]) == pytest.approx(want, rel=1e-4)
        assert (r["injected_per_token"] == "") == (int(r["injected_tokens"]) == 0) == (t <= 2)
    pytest.importorskip("matplotlib")
    hf.plot_attention_curves([curve], tmp_path / "c.png")
    assert (tmp_path / "c.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def controlled_attention_model(ratio: float):
    """A Qwen2-VL whose attention is set by hand: in every layer and head each image token gets
    ``ratio`` times the attention weight of each text token, wherever it sits.

    Text embeddings have 0 in hidden dim 0, every image feature (vision tower output: the
    merger's last layer gives its bias) has ``c`` there; queries are a constant (q bias only) and
    keys read dim 0 only, on the last rotary pair, whose frequency is set to 0 (no rotation). Then
    a text key is 0 (score 0, weight 1) and an image key gives score ``log(ratio)`` (weight
    ``ratio``). Attention and MLP outputs are zeroed, so every layer sees the embeddings."""
    torch.manual_seed(1)
    model = Qwen2VLForConditionalGeneration(tiny_config("qwen2_vl")).to(torch.float64).eval()
    lm = model.model.language_model
    cfg = lm.config
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    last = head_dim // 2 - 1  # the last rotary pair (dims last, last + head_dim / 2)
    c, eps = 1.0, cfg.rms_norm_eps
    normed = c / math.sqrt(c * c / cfg.hidden_size + eps)  # RMSNorm of (c, 0, ..., 0) in dim 0
    u = math.log(ratio) / (normed * head_dim ** -0.5)
    with torch.no_grad():
        lm.embed_tokens.weight[:, 0] = 0.0
        lm.rotary_emb.inv_freq[last] = 0.0
        for layer in lm.layers:
            attn = layer.self_attn
            layer.input_layernorm.weight.fill_(1.0)
            for proj in (attn.q_proj, attn.k_proj):
                proj.weight.zero_()
                proj.bias.zero_()
            for h in range(cfg.num_attention_heads):
                attn.q_proj.bias[h * head_dim + last] = u
            for h in range(cfg.num_key_value_heads):
                attn.k_proj.weight[h * head_dim + last, 0] = 1.0
            attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        merger_out = model.model.visual.merger.mlp[-1]
        merger_out.weight.zero_()
        merger_out.bias.zero_()
        merger_out.bias[0] = c
    return model


@pytest.mark.parametrize("mode, pool", [("append", 1), ("relocate", 4)])
def test_attention_views_on_a_model_with_controlled_attention(model_dirs, clevr, mode, pool):
    """With each image token weighted 3x a text token (by construction), the per-token views are
    3 for the question's image and for the re-injected one in every layer, and the masses are
    what the token counts give: n_img * 3 / (n_img * 3 + n_text). An ``append`` calibration with
    the full image raises the image share (a second image joins the first); a ``relocate`` one
    swaps the 99-token image for its 4x4-pooled copy, so the mass falls while attention per image
    token does not: the reading the per-token view exists for. (Eager attention takes its softmax in float32: 2e-6.)"""
    ratio = 3.0
    model = controlled_attention_model(ratio)
    processor = processor_for(model_dirs, "qwen2_vl")
    config = PVCConfig(mode=mode, pool=pool, schedule=PVCSchedule(period=4, max_calibrations=1))
    curve = hf.visual_attention_curve(model, processor, clevr, QUESTION, config=config, max_new_tokens=9)
    assert curve.calibrations == [3]
    prompt_image = int((prompt_inputs(processor, clevr)["input_ids"] == PAD).sum())
    injected = curve.result.calibrations[0].visual_tokens
    assert injected == (prompt_image if pool == 1 else 9)  # clevr: a 9 x 11 merged grid, 3 x 3 pooled
    # Counts: the question's image until the calibration (and after it with append), the copy after it.
    before, after = slice(0, 4), slice(4, 9)
    assert np.all(curve.original_tokens[before] == prompt_image)
    assert np.all(curve.original_tokens[after] == (prompt_image if mode == "append" else 0))
    assert np.all(curve.injected_tokens[before] == 0) and np.all(curve.injected_tokens[after] == injected)
    # The context grows by one token per step; at the calibration by bridge + copy (append), or
    # by bridge + copy less the evicted question image block (relocate).
    steps = np.diff(curve.context_tokens)
    assert np.all(np.delete(steps, 3) == 1)
    assert steps[3] > injected + 2 if mode == "append" else 0 < steps[3] + prompt_image + 2 - injected - 2 < 20
    for layer in range(curve.layers):
        n_img = curve.original_tokens + curve.injected_tokens
        n_text = curve.context_tokens - n_img
        want = n_img * ratio / (n_img * ratio + n_text)
        np.testing.assert_allclose(curve.image_share[:, layer], want, rtol=2e-6)
        np.testing.assert_allclose(curve.image_per_token[:, layer], ratio, rtol=2e-6)
        np.testing.assert_allclose(curve.original_per_token[:4, layer], ratio, rtol=2e-6)
        np.testing.assert_allclose(curve.injected_per_token[4:, layer], ratio, rtol=2e-6)
        assert np.all(np.isnan(curve.injected_per_token[:4, layer]))
        np.testing.assert_allclose(curve.original_share[:, layer] + curve.injected_share[:, layer],
                                   curve.image_share[:, layer], rtol=1e-12)
        np.testing.assert_allclose(curve.injected_share[4:, layer],
                                   injected * ratio / (n_img[4:] * ratio + n_text[4:]), rtol=2e-6)
        if mode == "append":
            assert curve.image_share[4, layer] > curve.image_share[3, layer] + 0.02
            np.testing.assert_allclose(curve.original_per_token[4:, layer], ratio, rtol=2e-6)
        else:
            assert curve.image_share[4, layer] < curve.image_share[3, layer] - 0.05
            assert np.all(curve.original_share[4:, layer] == 0)
            assert np.all(np.isnan(curve.original_per_token[4:, layer]))


# ------------------------------------------------------------------ the command


def test_cli_generate_and_diagnose(model_dirs, tmp_path, capsys):
    from tvc_rs import cli

    image = str(asset("images/tvc_case1_clevr.jpg"))
    common = ["--model", str(model_dirs["qwen2_vl"]), "--image", image, "--question", QUESTION, "--period", "4",
              "--max-new-tokens", "9", "--dtype", "float32"]
    assert cli.main(["generate", *common, "--mode", "kv", "--pool", "2", "--json"]) == 0
    captured = capsys.readouterr()
    out = json.loads(captured.out)
    assert [c["token_index"] for c in out["calibrations"]] == [3, 7]
    assert out["calibrations"][0]["mode"] == "kv" and out["calibrations"][0]["visual_tokens"] == 30
    assert out["generated_tokens"] == 9 and "tokens" in captured.err  # progress on stderr
    assert cli.main(["generate", *common, "--mode", "append"]) == 0
    text = capsys.readouterr().out
    assert text.count("[[PVC #") == 2 and "Let me see the image again:" in text
    prefix = tmp_path / "forgetting"
    assert cli.main(["diagnose", *common, "--out", str(prefix)]) == 0
    captured = capsys.readouterr()
    err = captured.err
    assert "each eighth of the answer" in captured.out and "2 calibrations" in captured.out
    import csv

    with open(tmp_path / "forgetting.csv", encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 * 9 * 2  # two runs, 9 tokens, 2 layers
    assert {r["run"] for r in rows} == {"without PVC", "PVC (relocate)"}
    assert list(rows[0]) == hf.ATTENTION_CSV_COLUMNS  # mass and per-token columns, original and re-injected
    assert "per token, re-injected" in captured.out
    if "matplotlib" not in err:
        assert (tmp_path / "forgetting.png").read_bytes()[:4] == b"\x89PNG"
    # Bad input: exit status 2 and a message.
    assert cli.main(["generate", "--model", str(tmp_path), "--image", image, "--question", "q"]) == 2
    assert "config.json" in capsys.readouterr().err
    assert cli.main(["generate", *common[:2], "--image", "/nonexistent.png", "--question", "q"]) == 2
    assert "no such file" in capsys.readouterr().err
