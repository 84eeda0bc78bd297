"""DVR (src/dvr): insertion points against a Python ``re`` reference of the phrases and of the
sentence rule on the real traces; samples against the real tokenizer, the Qwen2-VL image
processors and transformers' ``get_rope_index``; ``qwen2_vl_patches`` bit for bit against the
image processor; ``tvc-rs dvr build`` on real traces and bad records."""

from __future__ import annotations

import bisect
import json
import re
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import tvc_rs
from conftest import ASSETS, asset

transformers = pytest.importorskip("transformers")
from transformers import Qwen2VLConfig  # noqa: E402
from transformers.models.qwen2_vl import image_processing_pil_qwen2_vl as slow_module  # noqa: E402
from transformers.models.qwen2_vl import image_processing_qwen2_vl as fast_module  # noqa: E402
from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VLModel  # noqa: E402

SCRIPT = Path(sys.executable).parent / "tvc-rs"
TRACE_FILES = [
    "traces/emma_gemini2_flash_thinking_exp_1219.jsonl",
    "traces/qwen_blog_qvq72b_qwq32b_official.jsonl",
    "traces/marco_o1_cot_demo.jsonl",
    "traces/vlaa_thinking_readme_deepseek_r1.jsonl",
]
EMMA = "traces/emma_gemini2_flash_thinking_exp_1219.jsonl"
VISION_START, VISION_END, IMAGE_PAD, VIDEO_PAD = 151652, 151653, 151655, 151656
VISION = {VISION_START, VISION_END, IMAGE_PAD, VIDEO_PAD}
IGNORE = -100
SYSTEM_TEXT = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"


def records(name: str) -> list[dict]:
    return [json.loads(line) for line in asset(name).read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def hf_tokenizer(tokenizer_json):
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(tokenizer_json))


@pytest.fixture(scope="module")
def image_processors():
    config = json.loads(asset("qwen2-vl/preprocessor_config.json").read_text())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return [fast_module.Qwen2VLImageProcessor(**config), slow_module.Qwen2VLImageProcessorPil(**config)]


def processor_grids(processor, images) -> list[list[int]]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return processor(images=images, return_tensors="pt")["image_grid_thw"].tolist()


# ----------------------------------------------------------------------------- references

def reference_hits(text: str) -> list[tuple[int, int]]:
    out = []
    for phrase in tvc_rs.DEFAULT_PHRASES:
        pattern = re.compile(r"(?<!\w)" + re.escape(phrase) + r"(?!\w)", re.IGNORECASE)
        out += [(m.start(), m.end()) for m in pattern.finditer(text)]
    return sorted(out, key=lambda h: (h[1], h[0]))


# A sentence ends at . ! ? followed (after closing quotes / brackets / *) by whitespace or the
# end, at a CJK full stop / exclamation / question mark (after closers), or before a line break.
_SENTENCE_END = re.compile(r"\n|[.!?][\"'\u201d\u2019)\]}\u00bb*]*(?=\s|\Z)|[\u3002\uff01\uff1f][\"'\u201d\u2019)\]}\u00bb*]*")


def reference_sentence_end(text: str, start: int):
    m = _SENTENCE_END.search(text, start)
    if m is None:
        return None
    point = m.start() if m.group() == "\n" else m.end()
    return None if text[point:].strip() == "" else point


def reference_plan(text: str, starts: list[int], policy: tvc_rs.DVRPolicy, hits) -> list[tuple[int, int, tuple]]:
    """The policy, restated: one candidate per sentence holding a hit, taken greedily."""
    candidates = []
    for s, e in hits:
        p = reference_sentence_end(text, e)
        if p is not None and (not candidates or p > candidates[-1][0]):
            candidates.append((p, (s, e)))
    out = []
    for p, hit in candidates:
        token = bisect.bisect_left(starts, p)
        if token < policy.skip_first or (out and token - out[-1][1] < policy.min_gap):
            continue
        if policy.max_insertions is not None and len(out) >= policy.max_insertions:
            break
        out.append((p, token, hit))
    return out


POLICIES = [
    tvc_rs.DVRPolicy(),
    tvc_rs.DVRPolicy(max_insertions=None, min_gap=0, skip_first=0),
    tvc_rs.DVRPolicy(max_insertions=2, min_gap=400, skip_first=300, bridge=" Let me look at the image again:"),
]


@pytest.fixture(scope="module")
def answers(hf_tokenizer):
    """(answer, token start offsets, reference hits) of every real trace, computed once."""
    out = []
    for name in TRACE_FILES:
        for record in records(name):
            answer = record["response"]
            starts = [o[0] for o in hf_tokenizer.encode(answer, add_special_tokens=False).offsets]
            out.append((answer, starts, reference_hits(answer)))
    assert len(out) > 500
    return out


@pytest.mark.parametrize("policy", POLICIES, ids=repr)
def test_insertions_follow_the_policy_on_real_traces(tokenizer_json, answers, policy):
    builder = tvc_rs.DVRBuilder(tokenizer_json, policy=policy)
    plans = builder.plan_many([a for a, _, _ in answers])
    total = 0
    for k, ((answer, starts, hits), plan) in enumerate(zip(answers, plans)):
        assert plan.error is None
        insertions = plan.insertions
        if k % 50 == 0:
            assert builder.plan(answer) == insertions
        got = [(i.char_index, i.token_index, (i.hit.char_start, i.hit.char_end)) for i in insertions]
        assert got == reference_plan(answer, starts, policy, hits)
        for i in insertions:
            assert (i.hit.char_start, i.hit.char_end) in hits  # after a real reflection point
            assert answer[i.hit.char_start:i.hit.char_end].lower() == i.phrase
            assert i.char_index >= i.hit.char_end
        assert all(b.token_index - a.token_index >= policy.min_gap for a, b in zip(insertions, insertions[1:]))
        # Text outside the insertions is unchanged byte for byte.
        text = builder.insert(answer, insertions)
        assert plan.answer_text == text
        piece = policy.insertion_text(1)
        rebuilt, at = [], 0
        for n, i in enumerate(insertions):
            here = i.char_index + n * len(piece)
            assert text[here:here + len(piece)] == piece
            rebuilt.append(text[at:here])
            at = here + len(piece)
        rebuilt.append(text[at:])
        assert "".join(rebuilt).encode() == answer.encode()
        total += len(insertions)
    assert total > 30


def test_answers_without_reflection_points_get_no_insertion(tokenizer_json):
    builder = tvc_rs.DVRBuilder(tokenizer_json)
    answer = "The sum is 4. The answer is B.\nDone."
    assert builder.plan(answer) == []
    sample = builder.build("What is 2+2?", [(100, 120)], answer)
    assert sample.answer_text == answer and sample.planned_images == 0 and len(sample.images) == 1


# ----------------------------------------------------------------------------- samples

def emma_with_images() -> list[tuple[dict, Path]]:
    return [(r, ASSETS / r["local_image"]) for r in records(EMMA) if r.get("local_image")]


def block(n: int) -> str:
    return "<|vision_start|>" + "<|image_pad|>" * n + "<|vision_end|>"


def test_copy_token_counts_equal_the_image_processors(tokenizer_json, image_processors):
    """The copy's size is Pillow's ``reduce(4)`` of the image; its token count is what the real
    processors make of that copy."""
    from PIL import Image

    builder = tvc_rs.DVRBuilder(tokenizer_json, policy=tvc_rs.DVRPolicy(max_insertions=1, min_gap=0, skip_first=0))
    paths = sorted(p for p in asset("images").rglob("*") if p.suffix.lower() in {".jpg", ".png"})
    assert len(paths) > 50
    answer = "First look. Wait, let me check the picture. Then more reasoning follows."
    for path in paths:
        with Image.open(path) as im:
            image = im.convert("RGB")
        copy = image.reduce(4)
        sample = builder.build("q", [(image.height, image.width)], answer)
        original, inserted = sample.images
        assert inserted.inserted and (inserted.height, inserted.width) == (copy.height, copy.width)
        assert (inserted.height, inserted.width) == tvc_rs.dvr_downscaled_size(image.height, image.width)
        for processor in image_processors:
            grids = processor_grids(processor, [image, copy])
            assert [list(original.grid_thw), list(inserted.grid_thw)] == grids
        ids = sample.input_ids
        pads = [len(run) for run in "".join("x" if i == IMAGE_PAD else " " for i in ids).split()]
        assert pads == [g[0] * g[1] * g[2] // 4 for g in (original.grid_thw, inserted.grid_thw)]


@pytest.fixture(scope="module")
def qwen2_vl() -> Qwen2VLModel:
    config = Qwen2VLConfig(
        text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                         num_key_value_heads=1),
        vision_config=dict(depth=1, embed_dim=32, hidden_size=32, num_heads=2, mlp_ratio=2))
    return Qwen2VLModel(config).eval()


def test_samples_equal_the_tokenizer_the_processor_and_get_rope_index(tokenizer_json, hf_tokenizer,
                                                                      image_processors, qwen2_vl):
    from PIL import Image

    builder = tvc_rs.DVRBuilder(tokenizer_json, policy=tvc_rs.DVRPolicy(min_gap=100))
    processor = image_processors[0]
    checked = 0
    for record, path in emma_with_images()[:30]:
        with Image.open(path) as im:
            image = im.convert("RGB")
        sample = builder.build(record["question"], [(image.height, image.width)], record["response"])
        grids = processor_grids(processor, [image] + [image.reduce(4)] * len(sample.insertions))
        counts = [t * h * w // 4 for t, h, w in grids]
        # The reference text: the chat format with every block expanded, tokenized by `tokenizers`.
        prompt = SYSTEM_TEXT + block(counts[0]) + record["question"] + "<|im_end|>\n<|im_start|>assistant\n"
        answer = sample.answer_text
        for n in counts[1:]:
            answer = answer.replace("<image>", block(n), 1)
        ids = hf_tokenizer.encode(prompt + answer + "<|im_end|>\n", add_special_tokens=False).ids
        assert sample.input_ids.tolist() == ids
        prompt_len = len(hf_tokenizer.encode(prompt, add_special_tokens=False).ids)
        assert sample.prompt_tokens == prompt_len
        visual = {VISION_START, VISION_END, IMAGE_PAD, VIDEO_PAD}
        labels = [-100 if i < prompt_len or t in visual else t for i, t in enumerate(ids)]
        assert sample.labels.tolist() == labels
        assert sample.image_grid_thw.tolist() == grids
        input_ids = torch.tensor([ids])
        with torch.no_grad():
            positions, delta = qwen2_vl.get_rope_index(input_ids, (input_ids == IMAGE_PAD).long(),
                                                       image_grid_thw=torch.tensor(grids))
        assert np.array_equal(sample.position_ids, positions[:, 0].numpy())
        assert sample.rope_delta == int(delta)
        checked += bool(sample.insertions)
    assert checked >= 10


def python_blocks(ids: list[int]) -> list[tuple[int, int, bool]]:
    """(start, end, complete) of each run of pads with its adjacent vision start / end."""
    out, i = [], 0
    while i < len(ids):
        if ids[i] in (IMAGE_PAD, VIDEO_PAD):
            j = i
            while j < len(ids) and ids[j] == ids[i]:
                j += 1
            s = i - 1 if i and ids[i - 1] == VISION_START else i
            e = j + 1 if j < len(ids) and ids[j] == VISION_END else j
            out.append((s, e, s < i and e > j))
            i = max(e, j)
        else:
            i += 1
    return out


def lf_infer_seqlen(source_len: int, target_len: int, cutoff_len: int) -> tuple[int, int]:
    """LLaMA-Factory 0.9.5's ``infer_seqlen`` (processor_utils.py), restated."""
    if target_len * 2 < cutoff_len:
        max_target_len = cutoff_len
    elif source_len * 2 < cutoff_len:
        max_target_len = cutoff_len - source_len
    else:
        max_target_len = int(cutoff_len * (target_len / (source_len + target_len)))
    new_target_len = min(max_target_len, target_len)
    new_source_len = min(max(cutoff_len - new_target_len, 0), source_len)
    return new_source_len, new_target_len


@settings(max_examples=300, deadline=None)
@given(st.integers(0, 5000), st.integers(0, 5000), st.integers(1, 9000))
def test_infer_seqlen(source, target, cutoff):
    assert tvc_rs.infer_seqlen(source, target, cutoff) == lf_infer_seqlen(source, target, cutoff)


BRIDGE = " Let me look at the image again:"


@pytest.fixture(scope="module")
def truncation_cases(tokenizer_json):
    from tokenizers import Tokenizer

    policy = dict(max_insertions=6, min_gap=30, skip_first=0)
    builders = {None: tvc_rs.DVRBuilder(tokenizer_json, policy=tvc_rs.DVRPolicy(**policy)),
                BRIDGE: tvc_rs.DVRBuilder(tokenizer_json, policy=tvc_rs.DVRPolicy(bridge=BRIDGE, **policy))}
    bridge_ids = Tokenizer.from_file(str(tokenizer_json)).encode(BRIDGE, add_special_tokens=False).ids
    cases = []
    for record, path in emma_with_images():
        from PIL import Image

        with Image.open(path) as im:
            size = (im.height, im.width)
        for bridge, builder in builders.items():
            full = builder.build(record["question"], [size], record["response"])
            if full.planned_images >= 2:
                cases.append((record, size, bridge, full))
    assert len(cases) >= 16
    return builders, bridge_ids, cases


def reference_truncation(full, cutoff: int, bridge_ids: list[int]):
    """The issue's rule, restated on the untruncated sample: cut as LLaMA-Factory cuts, the
    prompt keeps its image whole, an answer cut inside a copy (or inside the bridge tokens right
    before it) moves to its start. ``None`` if the prompt's image does not fit; else
    ``(ids, prompt tokens, copies kept)``."""
    ids = full.input_ids.tolist()
    prompt = full.prompt_tokens
    source, target = ids[:prompt], ids[prompt:]
    s_keep, t_keep = lf_infer_seqlen(len(source), len(target), cutoff)
    prompt_end = python_blocks(source)[-1][1]
    if s_keep < prompt_end:
        if prompt_end > cutoff:
            return None
        s_keep, t_keep = prompt_end, min(t_keep, cutoff - prompt_end)
    copies = python_blocks(target)
    for start, end, _ in copies:
        n = len(bridge_ids)
        unit = start - n if n and target[start - n:start] == bridge_ids else start
        if unit < t_keep < end:
            t_keep = unit
    kept = sum(end <= t_keep for _, end, _ in copies)
    return source[:s_keep] + target[:t_keep], s_keep, kept


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_truncation_cuts_first_and_keeps_every_copy_before_the_cut(truncation_cases, data):
    builders, bridge_ids, cases = truncation_cases
    record, size, bridge, full = data.draw(st.sampled_from(cases))
    n = len(full)
    ids_full = full.input_ids.tolist()
    copies = [(full.prompt_tokens + s, full.prompt_tokens + e) for s, e, _ in python_blocks(ids_full[full.prompt_tokens:])]
    # Cutoffs anywhere, and right through, at and around the copies.
    s, e = data.draw(st.sampled_from(copies))
    cutoff = data.draw(st.one_of(st.integers(1, n + 50), st.integers(max(1, s - 12), e + 2)))
    expected = reference_truncation(full, cutoff, bridge_ids if bridge else [])
    try:
        sample = builders[bridge].build(record["question"], [size], record["response"], cutoff=cutoff)
    except ValueError as err:
        assert expected is None and "cutoff" in str(err)
        return
    assert expected is not None
    ids_ref, prompt_ref, kept_ref = expected
    ids = sample.input_ids.tolist()
    assert ids == ids_ref
    assert len(ids) <= cutoff and sample.prompt_tokens == prompt_ref
    assert sample.kept_images == kept_ref == sum(i.inserted for i in sample.images)
    assert sample.cut_tokens == n - len(ids)
    blocks = python_blocks(ids)
    assert all(complete for _, _, complete in blocks) and len(blocks) == len(sample.image_grid_thw)
    # Every copy wholly inside the kept part is kept (none dropped to make room).
    answer_kept = len(ids) - prompt_ref
    assert kept_ref == sum(e - full.prompt_tokens <= answer_kept for _, e in copies)
    if bridge and len(ids) < n:
        assert ids[-len(bridge_ids):] != bridge_ids  # no bridge left without its image
    # Labels: the prompt and every vision token masked; positions as get_rope_index's rule.
    labels = sample.labels.tolist()
    assert all(labels[i] == IGNORE for i in range(sample.prompt_tokens))
    assert all(labels[i] == (IGNORE if t in VISION else t) for i, t in enumerate(ids) if i >= sample.prompt_tokens)
    # The answer text holds exactly the kept copies, with their bridges.
    assert sample.answer_text.count("<image>") == sample.kept_images
    if bridge:
        assert sample.answer_text.count(BRIDGE) == sample.kept_images


def test_cutoff_smaller_than_an_image_block_is_an_error(tokenizer_json):
    builder = tvc_rs.DVRBuilder(tokenizer_json)
    sample = builder.build("q", [(1000, 1000)], "Wait. Fine, so it is 3.")
    image_end = python_blocks(sample.input_ids.tolist())[0][1]
    with pytest.raises(ValueError, match=re.escape("cutoff = 100 is smaller than the prompt up to the end of its image")):
        builder.build("q", [(1000, 1000)], "Wait. Fine, so it is 3.", cutoff=100)
    ok = builder.build("q", [(1000, 1000)], "Wait. Fine, so it is 3.", cutoff=image_end)
    assert python_blocks(ok.input_ids.tolist())[0][2] and len(ok) == image_end


# ----------------------------------------------------------------------------- patches

def reference_patches(image_u8: torch.Tensor, mean, std, patch=14, merge=2, temporal=2) -> torch.Tensor:
    """The processor's float32 operations and view / permute, on a (C, H, W) uint8 tensor."""
    x = (image_u8.to(torch.float32) - torch.tensor(mean).view(-1, 1, 1)) / torch.tensor(std).view(-1, 1, 1)
    x = x.unsqueeze(0).repeat(temporal, 1, 1, 1)
    c, h, w = image_u8.shape
    x = x.view(1, temporal, c, h // patch // merge, merge, patch, w // patch // merge, merge, patch)
    x = x.permute(0, 3, 6, 4, 7, 2, 1, 5, 8)
    return x.reshape((h // patch) * (w // patch), c * temporal * patch * patch)


@settings(max_examples=60, deadline=None)
@given(bh=st.integers(1, 4), bw=st.integers(1, 4), channels=st.sampled_from([1, 3]), hwc=st.booleans(),
       seed=st.integers(0, 2**32 - 1))
def test_patches_equal_the_processor_arithmetic(bh, bw, channels, hwc, seed):
    rng = np.random.default_rng(seed)
    h, w = bh * 28, bw * 28
    image = rng.integers(0, 256, (channels, h, w), dtype=np.uint8)
    mean = (rng.uniform(50, 200, channels)).astype(np.float32).tolist()
    std = (rng.uniform(20, 90, channels)).astype(np.float32).tolist()
    arg = np.ascontiguousarray(image.transpose(1, 2, 0)) if hwc else image
    got = tvc_rs.qwen2_vl_patches([arg], mean, std, layout="hwc" if hwc else "chw")
    expected = reference_patches(torch.from_numpy(image), mean, std).numpy()
    assert got.dtype == np.float32 and got.shape == expected.shape
    assert np.array_equal(got.view(np.uint32), expected.view(np.uint32))


def test_native_patches_read_torch_uint8_tensors_through_dlpack():
    """The native call reads uint8 images through DLPack: a torch CPU tensor, strided (a
    permuted HWC view, a crop), gives the reference's bits as a NumPy array does."""
    rng = np.random.default_rng()
    image = rng.integers(0, 256, (3, 84, 140), dtype=np.uint8)
    mean, std = [120.5, 100.25, 90.0], [60.0, 55.5, 70.125]
    expected = reference_patches(torch.from_numpy(image[:, :56, 28:112].copy()), mean, std).numpy()
    crop = torch.from_numpy(image)[:, :56, 28:112]  # strided view
    hwc = torch.from_numpy(np.ascontiguousarray(image.transpose(1, 2, 0)))[:56, 28:112]
    for arg, layout in [(crop, "chw"), (hwc, "hwc"), (crop.permute(1, 2, 0), "hwc")]:
        got = tvc_rs._native.qwen2_vl_patches([arg], mean, std, layout=layout)
        assert isinstance(got, np.ndarray) and got.dtype == np.float32
        assert np.array_equal(got.view(np.uint32), expected.view(np.uint32)), layout
    with pytest.raises(TypeError, match=re.escape("images[1]: expected dtype uint8, got int16")):
        tvc_rs._native.qwen2_vl_patches([crop, crop.to(torch.int16)], mean, std)


def test_patches_equal_the_image_processor_on_real_images(image_processors):
    """Bit for bit transformers' Qwen2VLImageProcessor (torchvision backend) after its resize."""
    from PIL import Image
    from transformers.image_processing_backends import TorchvisionBackend
    from transformers.image_utils import SizeDict

    processor = image_processors[0]
    paths = sorted(asset("images/mathv").glob("*.jpg"))[:12]
    images = [Image.open(p).convert("RGB") for p in paths]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected = processor(images=images, return_tensors="pt")
    mean = (torch.tensor(processor.image_mean) * (1.0 / processor.rescale_factor)).tolist()
    std = (torch.tensor(processor.image_std) * (1.0 / processor.rescale_factor)).tolist()
    limits = tvc_rs.image_processor_settings(processor)
    resized = []
    for image in images:
        tensor = processor.process_image(image, do_convert_rgb=True)
        h, w = tvc_rs.smart_resize(*tensor.shape[-2:], min_pixels=limits["min_pixels"], max_pixels=limits["max_pixels"])
        # The backend's plain resize (Qwen2VLImageProcessor.resize itself smart-resizes in 5.24).
        resized.append(TorchvisionBackend.resize(processor, tensor.unsqueeze(0), SizeDict(height=h, width=w),
                                                 resample=processor.resample)[0].numpy())
    got = tvc_rs.qwen2_vl_patches(resized, mean, std)
    assert torch.equal(torch.from_numpy(got), expected["pixel_values"])


@settings(max_examples=200, deadline=None)
@given(st.lists(st.sampled_from([1, 2, VISION_START, VISION_END, IMAGE_PAD, VIDEO_PAD]), max_size=60))
def test_vision_blocks(ids):
    got = tvc_rs.vision_blocks(np.asarray(ids, dtype=np.int64))
    assert [(s, e, bool(c)) for s, e, _, _, _, c in got.tolist()] == python_blocks(ids)


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 300), st.integers(1, 300), st.integers(1, 9))
def test_downscaled_size_is_pillows_reduce(height, width, factor):
    from PIL import Image

    reduced = Image.new("RGB", (width, height)).reduce(factor)
    assert tvc_rs.dvr_downscaled_size(height, width, factor) == (reduced.height, reduced.width)


# ----------------------------------------------------------------------------- bad input

def test_bad_input(tokenizer_json):
    with pytest.raises(ValueError, match=re.escape("downscale")):
        tvc_rs.DVRPolicy(downscale=0)
    with pytest.raises(ValueError, match=re.escape("min_gap")):
        tvc_rs.DVRPolicy(min_gap=-1)
    with pytest.raises(ValueError, match=re.escape("max_insertions")):
        tvc_rs.DVRPolicy(max_insertions=-2)
    with pytest.raises(ValueError, match=re.escape("bridge")):
        tvc_rs.DVRPolicy(bridge="see <image>")
    with pytest.raises(TypeError, match=re.escape("tokenizer")):
        tvc_rs.DVRBuilder(42)
    with pytest.raises(OSError, match=re.escape("tokenizer")):
        tvc_rs.DVRBuilder("/no/such/tokenizer.json")
    builder = tvc_rs.DVRBuilder(tokenizer_json)
    with pytest.raises(ValueError, match=re.escape("question: holds 2 image placeholder")):
        builder.build("<image><image>", [(100, 100)], "Wait. Yes.")
    with pytest.raises(ValueError, match=re.escape("answer: already contains the image placeholder")):
        builder.build("q", [(100, 100)], "Wait, <image> yes.")
    with pytest.raises(ValueError, match=re.escape("images[0]")):
        builder.build("q", [(0, 100)], "Wait. Yes.")
    with pytest.raises(TypeError, match=re.escape("image_sizes")):
        builder.build("q", "100x100", "Wait. Yes.")
    with pytest.raises(ValueError, match=re.escape("cutoff")):
        builder.build("q", [(100, 100)], "Wait. Yes.", cutoff=0)
    plans = builder.plan_many(["Wait. <image> here.", "Hmm. Fine, go on."])
    assert "placeholder" in plans[0].error and plans[1].error is None
    image = np.zeros((3, 28, 28), np.uint8)
    mean, std = [1.0] * 3, [2.0] * 3
    with pytest.raises(TypeError, match=re.escape("uint8")):
        tvc_rs.qwen2_vl_patches([image.astype(np.float32)], mean, std)
    with pytest.raises(ValueError, match=re.escape("3 dimensions")):
        tvc_rs.qwen2_vl_patches([image[0]], mean, std)
    with pytest.raises(ValueError, match=re.escape("multiples of patch_size")):
        tvc_rs.qwen2_vl_patches([np.zeros((3, 28, 30), np.uint8)], mean, std)
    with pytest.raises(ValueError, match=re.escape("channels")):
        tvc_rs.qwen2_vl_patches([image], [1.0], [2.0])
    with pytest.raises(ValueError, match=re.escape("std")):
        tvc_rs.qwen2_vl_patches([image], mean, [1.0, 0.0, 1.0])
    with pytest.raises(ValueError, match=re.escape("layout")):
        tvc_rs.qwen2_vl_patches([image], mean, std, layout="nchw")
    with pytest.raises(ValueError, match=re.escape("negative strides")):
        tvc_rs.qwen2_vl_patches([image[:, ::-1]], mean, std)


# ----------------------------------------------------------------------------- tvc-rs dvr build

def run(*args: str, expect: int = 0) -> subprocess.CompletedProcess:
    done = subprocess.run([str(SCRIPT), *args], capture_output=True, text=True, timeout=600)
    assert done.returncode == expect, done.stderr[-3000:]
    return done


@pytest.fixture()
def build_input(tmp_path):
    """Real EMMA records with local images (some with, some without reflection points) and bad ones."""
    good = emma_with_images()[:8]
    lines = [json.dumps(r) for r, _ in good]
    unreadable = tmp_path / "broken.png"
    unreadable.write_text("not an image")
    base = good[0][0]
    bad = [
        {**base, "id": "missing", "local_image": "images/mathv/no_such_file.jpg"},
        {**base, "id": "unreadable", "local_image": str(unreadable)},
        {k: v for k, v in base.items() if k != "response"} | {"id": "no-answer"},
        {**base, "id": "empty-answer", "response": "   "},
        {**base, "id": "two-tags", "question": "<image_1> and <image_2>"},
        {**base, "id": "no-image", "local_image": None},
    ]
    lines[3:3] = [json.dumps(b) for b in bad]
    lines.insert(5, "{not json")
    path = tmp_path / "in.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path, [r for r, _ in good]


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_dvr_build_converts_real_traces_and_reports_bad_records(build_input, tmp_path, tokenizer_json):
    from PIL import Image

    path, good = build_input
    out = tmp_path / "data" / "dvr.jsonl"
    done = run("dvr", "build", str(path), "-o", str(out), "--tokenizer", str(tokenizer_json),
               "--image-field", "local_image", "--image-root", str(ASSETS), expect=1)
    bad = {int(m.group(1)): m.group(2) for m in re.finditer(r"bad record (\d+) \([^)]*\): (.*)", done.stderr)}
    # Indices: good 0-2, bad 3-4, invalid JSON 5, bad 6-9, good 10-14.
    assert sorted(bad) == [3, 4, 5, 6, 7, 8, 9]
    assert "missing image" in bad[3] and "does not exist" in bad[3]
    assert "unreadable image" in bad[4]
    assert "invalid JSON" in bad[5]
    assert "no answer" in bad[6] and "missing" in bad[6]
    assert "no answer" in bad[7] and "empty" in bad[7]
    assert "2 image tag" in bad[8]
    assert "missing image" in bad[9]
    assert "7 bad" in done.stdout
    written = read_jsonl(out)
    assert [w["tvc"]["id"] for w in written] == [r["id"] for r in good]
    builder = tvc_rs.DVRBuilder(tokenizer_json)
    no_reflection = 0
    for record, line in zip(good, written):
        user, assistant = line["messages"]
        assert user["role"] == "user" and assistant["role"] == "assistant"
        assert user["content"] == record["question"].replace("<image_1>", "<image>")
        insertions = builder.plan(record["response"])
        assert assistant["content"] == builder.insert(record["response"], insertions)
        assert assistant["content"].replace("<image>", "") == record["response"]
        assert line["tvc"]["insertions"] == len(insertions) == assistant["content"].count("<image>")
        images = [Path(p) if Path(p).is_absolute() else out.parent / p for p in line["images"]]
        assert len(images) == 1 + len(insertions)
        assert images[0] == (ASSETS / record["local_image"]).resolve()
        no_reflection += not insertions
        with Image.open(images[0]) as im:
            reduced = im.convert("RGB").reduce(4)
        for copy in images[1:]:
            assert copy.parent == out.parent / "images"
            with Image.open(copy) as im:
                assert np.array_equal(np.asarray(im), np.asarray(reduced))
    assert 0 < no_reflection < len(good)
    assert f"{no_reflection} without a reflection point" in done.stdout
    info = json.loads((out.parent / "dataset_info.json").read_text())
    assert info["dvr"] == {
        "file_name": "dvr.jsonl", "formatting": "sharegpt", "columns": {"messages": "messages", "images": "images"},
        "tags": {"role_tag": "role", "content_tag": "content", "user_tag": "user", "assistant_tag": "assistant"},
    }
    report = json.loads((out.parent / "dvr.report.json").read_text())
    assert report["bad_records"] == 7 and report["written"] == len(good) and report["no_reflection"] == no_reflection

    # An existing output is not overwritten by accident.
    done = run("dvr", "build", str(path), "-o", str(out), "--tokenizer", str(tokenizer_json), expect=2)
    assert "exists" in done.stderr and "--resume" in done.stderr


def test_dvr_build_resumes(build_input, tmp_path, tokenizer_json):
    path, good = build_input
    common = ["--tokenizer", str(tokenizer_json), "--image-field", "local_image", "--image-root", str(ASSETS)]
    whole = tmp_path / "whole" / "dvr.jsonl"
    run("dvr", "build", str(path), "-o", str(whole), *common, expect=1)
    part = tmp_path / "part" / "dvr.jsonl"
    run("dvr", "build", str(path), "-o", str(part), "--limit", "3", *common)
    with open(part, "a") as f:
        f.write('{"messages": [{"role": "user", "cont')  # an interrupted write
    done = run("dvr", "build", str(path), "-o", str(part), "--resume", *common, expect=1)
    assert "3 already written" in done.stdout
    assert read_jsonl(part) == read_jsonl(whole)


def test_dvr_build_input_errors(tmp_path, tokenizer_json):
    done = run("dvr", "build", str(tmp_path / "missing.jsonl"), "-o", str(tmp_path / "o.jsonl"), "--tokenizer",
               str(tokenizer_json), expect=2)
    assert "no such file" in done.stderr
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    done = run("dvr", "build", str(empty), "-o", str(tmp_path / "o.jsonl"), "--tokenizer", str(tokenizer_json),
               expect=2)
    assert "0 records" in done.stdout


# ----------------------------------------------------------------------------- the newer families (issue 15)

NEW_FAMILIES = ["qwen3_vl", "qwen3_5", "glm4v"]
QVQ = "traces/qwen_blog_qvq72b_qwq32b_official.jsonl"
EMPTY_THOUGHT = "<think>\n\n</think>\n\n"  # LLaMA-Factory's ReasoningTemplate, default thought words


def qvq_with_local_images() -> list[dict]:
    """The real QVQ-72B-Preview traces of the Qwen blog, each given a real local image in place of
    its URL (the assets hold the answers, not the blog's pictures)."""
    paths = sorted(p for p in asset("images").rglob("*") if p.suffix.lower() in {".jpg", ".png"})
    qvq = [r for r in records(QVQ) if r["model"] == "QVQ-72B-Preview"]
    assert len(qvq) >= 5
    return [{**r, "local_image": str(paths[i * 7 % len(paths)])} for i, r in enumerate(qvq)]


@pytest.fixture(scope="module", params=NEW_FAMILIES)
def family(request, tmp_path_factory):
    """(model type, HF tokenizer, its saved folder, processor, base model with get_rope_index)."""
    import tiny_models

    name = request.param
    tokenizer = tiny_models.family_tokenizer(name, ASSETS)
    folder = tmp_path_factory.mktemp(f"tok-{name}")
    tokenizer.save_pretrained(folder)
    processor = tiny_models.family_processor(name, ASSETS)
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = tiny_models.family_model_class(name)(tiny_models.family_config(name, ASSETS)).model.eval()
    return name, tokenizer, folder, processor, model


def family_builder(family, **kwargs) -> tvc_rs.DVRBuilder:
    name, tokenizer, _, processor, _ = family
    ip = processor.image_processor
    return tvc_rs.DVRBuilder(tokenizer, model_type=name, patch_size=ip.patch_size, merge_size=ip.merge_size,
                             min_pixels=ip.size["shortest_edge"], max_pixels=ip.size["longest_edge"],
                             eos_token=tokenizer.eos_token, **kwargs)


def family_reference(name, tokenizer, question, answer_text, counts) -> tuple[list[int], int]:
    """The ids LLaMA-Factory 0.9.5's template of the family writes (qwen3_vl / qwen3_5: ChatML,
    no default system, an empty thought before a thought-less answer; glm4v: [gMASK]<sop>, GLM
    role tokens, the answer after a newline, efficient_eos), every image block expanded to its
    processor token count; returns (ids, prompt length)."""
    start, pad, end = FAMILY_BLOCKS[name]
    blocks = [start + pad * n + end for n in counts]
    answer = answer_text
    for b in blocks[1:]:
        answer = answer.replace("<image>", b, 1)
    encode = lambda text: tokenizer.encode(text, add_special_tokens=False)  # noqa: E731
    if name.startswith("glm4v"):
        prompt = encode("[gMASK]<sop><|user|>\n" + blocks[0] + question + "<|assistant|>")
        return prompt + encode(EMPTY_THOUGHT) + encode("\n" + answer) + [tokenizer.eos_token_id], len(prompt)
    prompt = encode("<|im_start|>user\n" + blocks[0] + question + "<|im_end|>\n<|im_start|>assistant\n")
    return prompt + encode(EMPTY_THOUGHT) + encode(answer + "<|im_end|>\n"), len(prompt)


FAMILY_BLOCKS = {
    "qwen3_vl": ("<|vision_start|>", "<|image_pad|>", "<|vision_end|>"),
    "qwen3_5": ("<|vision_start|>", "<|image_pad|>", "<|vision_end|>"),
    "glm4v": ("<|begin_of_image|>", "<|image|>", "<|end_of_image|>"),
}


def test_family_samples_equal_the_template_the_processor_and_get_rope_index(family):
    """For each family: ids as its LLaMA-Factory template writes them (see family_reference; the
    LLaMA-Factory test compares with LLaMA-Factory itself), every image block the token count of
    the family's own image processor (Qwen3-VL / Qwen3.5 patch 16, GLM's own resize rule),
    every vision token masked, positions equal to the model's own get_rope_index."""
    from PIL import Image

    name, tokenizer, _, processor, model = family
    builder = family_builder(family, policy=tvc_rs.DVRPolicy(min_gap=100))
    assert builder.model_type == name
    vision = set(builder.vision_token_ids)
    image_pad = builder.vision_token_ids[2]
    assert tokenizer.convert_ids_to_tokens([image_pad]) == [FAMILY_BLOCKS[name][1]]
    merge = processor.image_processor.merge_size
    checked = 0
    for record in qvq_with_local_images() + [r for r, _ in emma_with_images()[:6]]:
        with Image.open(ASSETS / record["local_image"]) as im:
            image = im.convert("RGB")
        sample = builder.build(record["question"], [(image.height, image.width)], record["response"])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            grids = processor.image_processor(images=[image] + [image.reduce(4)] * len(sample.insertions),
                                              return_tensors="pt")["image_grid_thw"].tolist()
        assert sample.image_grid_thw.tolist() == grids
        ids, prompt_len = family_reference(name, tokenizer, record["question"], sample.answer_text,
                                           [t * h * w // merge**2 for t, h, w in grids])
        assert sample.input_ids.tolist() == ids
        assert sample.prompt_tokens == prompt_len
        labels = [IGNORE if i < prompt_len or t in vision else t for i, t in enumerate(ids)]
        assert sample.labels.tolist() == labels
        input_ids = torch.tensor([ids])
        with torch.no_grad():
            positions, delta = model.get_rope_index(input_ids, (input_ids == image_pad).long(),
                                                    image_grid_thw=torch.tensor(grids))
        assert np.array_equal(sample.position_ids, positions[:, 0].numpy())
        assert sample.rope_delta == int(delta)
        checked += len(sample.insertions) > 0
    assert checked >= 5


@settings(max_examples=300, deadline=None)
@given(st.integers(1, 5000), st.integers(1, 5000), st.sampled_from([(12544, 9633792), (56 * 56, 100 * 28 * 28),
                                                                    (112 * 112, 28 * 28 * 15000)]))
def test_glm4v_grids_equal_transformers_smart_resize(height, width, bounds):
    """GLM-4.1V's resize rule (its own smart_resize: an image counts as two frames, small sides
    scaled up first) against transformers' function."""
    from transformers.models.glm4v.image_processing_glm4v import smart_resize as glm_smart_resize

    try:
        expected = glm_smart_resize(2, height, width, temporal_factor=2, factor=28, min_pixels=bounds[0],
                                    max_pixels=bounds[1])
    except ValueError:
        expected = None
    got = _glm_grid(height, width, *bounds)
    if expected is None:
        assert got is None
    else:
        assert got == [1, expected[0] // 14, expected[1] // 14]


_GLM_BUILDERS: dict = {}


def _glm_grid(height, width, min_pixels, max_pixels):
    import tiny_models

    key = (min_pixels, max_pixels)
    if key not in _GLM_BUILDERS:
        _GLM_BUILDERS[key] = tvc_rs.DVRBuilder(tiny_models.family_tokenizer("glm4v", ASSETS), model_type="glm4v",
                                               min_pixels=min_pixels, max_pixels=max_pixels, eos_token="<|im_end|>")
    try:
        sample = _GLM_BUILDERS[key].build("q", [(height, width)], "no reflection here")
    except ValueError as err:
        assert "aspect ratio must be at most 200" in str(err)
        return None
    return list(sample.images[0].grid_thw)


def test_family_settings_and_unsupported_model_types(tokenizer_json):
    assert tvc_rs.dvr_family("qwen3_vl")["patch_size"] == 16
    assert tvc_rs.dvr_family("qwen3_5")["llamafactory_template"] == "qwen3_5"
    assert tvc_rs.dvr_family("glm4v_moe")["llamafactory_template"] == "glm4_5v"
    assert tvc_rs.DVRBuilder(tokenizer_json, model_type="qwen3_vl").image_settings == (16, 2, 65536, 16777216)
    for bad in ("llava", "qwen2-vl"):
        with pytest.raises(ValueError, match="model_type must be one of 'qwen2_vl', 'qwen2_5_vl', 'qwen3_vl'"):
            tvc_rs.DVRBuilder(tokenizer_json, model_type=bad)
        with pytest.raises(ValueError, match="model_type must be one of"):
            tvc_rs.dvr_family(bad)
    # GLM's vision tokens are read by name: the plain Qwen2 tokenizer has none.
    with pytest.raises(ValueError, match=re.escape("tokenizer: has no <|begin_of_image|> token; a glm4v tokenizer")):
        tvc_rs.DVRBuilder(tokenizer_json, model_type="glm4v")


def test_dvr_build_for_a_new_family_on_real_qvq_traces(tmp_path, family):
    name, tokenizer, folder, _, _ = family
    records_in = qvq_with_local_images()
    path = tmp_path / "qvq.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records_in))
    out = tmp_path / "data" / "qvq_dvr.jsonl"
    done = run("dvr", "build", str(path), "-o", str(out), "--tokenizer", str(folder / "tokenizer.json"),
               "--model-type", name, "--image-field", "local_image", "--min-gap", "100")
    assert f"template: tvc_{name}" in done.stdout
    written = read_jsonl(out)
    builder = tvc_rs.DVRBuilder(folder / "tokenizer.json", model_type=name, eos_token=tokenizer.eos_token,
                                policy=tvc_rs.DVRPolicy(min_gap=100))
    assert [w["tvc"]["id"] for w in written] == [r["id"] for r in records_in]
    insertions = 0
    for record, line in zip(records_in, written):
        answer = line["messages"][1]["content"]
        assert answer == builder.insert(record["response"], builder.plan(record["response"]))
        assert len(line["images"]) == 1 + answer.count("<image>")
        insertions += answer.count("<image>")
    assert insertions >= 10
    report = json.loads((out.parent / "qvq_dvr.report.json").read_text())
    assert report["model_type"] == name and report["template"] == f"tvc_{name}"
    done = run("dvr", "build", str(path), "-o", str(tmp_path / "x.jsonl"), "--tokenizer", str(folder),
               "--model-type", "llava", expect=2)
    assert "model_type must be one of" in done.stderr and "'glm4v'" in done.stderr
