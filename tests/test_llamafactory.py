"""The LLaMA-Factory plugin (tvc_rs.llamafactory) with the real llamafactory 0.9.5, its
transformers and a tiny random Qwen2-VL: ``tvc-rs train`` runs SFT steps (also in torchrun ranks)
on a dataset made by ``tvc-rs dvr build`` from the real traces; batches are checked against
transformers' ``get_rope_index`` and LLaMA-Factory's own collator; the two faults of
LLaMA-Factory without the plugin are shown. Runs in ``.venv-lf`` (``.ci/llamafactory.sh``)."""

from __future__ import annotations

import copy
import inspect
import json
import math
import os
import re
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

llamafactory = pytest.importorskip(
    "llamafactory", reason="LLaMA-Factory is not installed here; .ci/llamafactory.sh runs this file in .venv-lf")

import torch  # noqa: E402
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import tvc_rs  # noqa: E402
from conftest import ASSETS, asset  # noqa: E402
from tvc_rs import llamafactory as tvc_lf  # noqa: E402

tvc_lf.install()

from llamafactory.data import mm_plugin  # noqa: E402
from llamafactory.data.collator import SFTDataCollatorWith4DAttentionMask  # noqa: E402
from llamafactory.data.processor.processor_utils import infer_seqlen as lf_infer_seqlen  # noqa: E402
from llamafactory.data.processor.supervised import SupervisedDatasetProcessor  # noqa: E402
from llamafactory.data.template import TEMPLATES, get_template_and_fix_tokenizer, register_template  # noqa: E402
from llamafactory.extras.constants import IGNORE_INDEX  # noqa: E402
from llamafactory.hparams import DataArguments, ModelArguments  # noqa: E402
from llamafactory.model import load_tokenizer  # noqa: E402

BIN = Path(sys.executable).parent
SCRIPT = BIN / "tvc-rs"
EMMA = "traces/emma_gemini2_flash_thinking_exp_1219.jsonl"
VISION = (151652, 151653, 151655, 151656)  # vision start, vision end, image pad, video pad
IMAGE_PAD = 151655
CUTOFF = 1280
IMAGE_MAX_PIXELS = 224 * 224
POLICY = ["--max-insertions", "3", "--min-gap", "40", "--skip-first", "0"]


# ----------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """A random Qwen2-VL saved from a small config, with the real tokenizer and processor files."""
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    folder = tmp_path_factory.mktemp("model")
    config = Qwen2VLConfig(
        text_config=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2,
                         num_key_value_heads=1, vocab_size=151936,
                         rope_scaling={"type": "mrope", "mrope_section": [4, 6, 6]}),
        vision_config=dict(depth=1, embed_dim=32, hidden_size=64, num_heads=2, mlp_ratio=2),
        image_token_id=151655, video_token_id=151656, vision_start_token_id=151652, vision_end_token_id=151653)
    torch.manual_seed(0)
    Qwen2VLForConditionalGeneration(config).save_pretrained(folder)
    for f in asset("qwen2-vl").iterdir():
        if not f.name.startswith("config"):
            shutil.copy(f, folder / f.name)
    return folder


@pytest.fixture(scope="module")
def model(model_dir):
    from transformers import Qwen2VLForConditionalGeneration

    return Qwen2VLForConditionalGeneration.from_pretrained(model_dir).eval()


def emma_records() -> list[dict]:
    return [json.loads(line) for line in asset(EMMA).read_text().splitlines() if line.strip()]


def run(*args, env=None, expect=0, timeout=900) -> subprocess.CompletedProcess:
    done = subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=timeout, env=env)
    assert done.returncode == expect, (done.stdout[-2000:], done.stderr[-6000:])
    return done


def lf_env(tmp: Path) -> dict:
    env = dict(os.environ)
    env.update(PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               HF_DATASETS_CACHE=str(tmp / "hf-datasets"), WANDB_DISABLED="true", TOKENIZERS_PARALLELISM="false")
    return env


@pytest.fixture(scope="module")
def dataset_dir(tmp_path_factory, model_dir, lf_parts) -> Path:
    """``tvc-rs dvr build`` on EMMA traces with local images: three whose samples fit in CUTOFF
    with their re-affirmed copies and one longer, so that truncation has to act. (All traces are
    built once to measure them with LLaMA-Factory's tokenizer and processor, then the four.)"""
    tokenizer, processor = lf_parts
    folder = tmp_path_factory.mktemp("data")
    records = [r for r in emma_records() if r.get("local_image")]
    (folder / "all.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    run(SCRIPT, "dvr", "build", folder / "all.jsonl", "-o", folder / "stage" / "all_dvr.jsonl", "--tokenizer",
        model_dir, "--image-field", "local_image", "--image-root", ASSETS, *POLICY)
    fit, long = [], []
    for line in dvr_records(folder / "stage", "all_dvr.jsonl"):
        if not line["tvc"]["insertions"]:
            continue
        n = len(encode(tvc_lf.TvcSupervisedDatasetProcessor, "tvc_qwen2_vl", line, folder / "stage", tokenizer,
                       processor, 10**6)[0])
        (fit if n <= CUTOFF else long if n > CUTOFF + 200 else []).append(line["tvc"]["id"])
    assert len(fit) >= 3 and long, (fit, long)
    chosen = fit[:3] + long[:1]
    by_id = {r["id"]: r for r in records}
    (folder / "traces.jsonl").write_text("".join(json.dumps(by_id[i]) + "\n" for i in chosen))
    run(SCRIPT, "dvr", "build", folder / "traces.jsonl", "-o", folder / "emma_dvr.jsonl", "--tokenizer", model_dir,
        "--image-field", "local_image", "--image-root", ASSETS, *POLICY)
    return folder


def train_config(model_dir: Path, dataset_dir: Path, out: Path, **extra) -> Path:
    config = {
        "model_name_or_path": str(model_dir), "stage": "sft", "do_train": True, "finetuning_type": "full",
        "freeze_vision_tower": True, "dataset": "emma_dvr", "dataset_dir": str(dataset_dir),
        "template": "tvc_qwen2_vl", "cutoff_len": CUTOFF, "image_max_pixels": IMAGE_MAX_PIXELS,
        "overwrite_cache": True, "preprocessing_num_workers": 1, "output_dir": str(out / "run"),
        "overwrite_output_dir": True, "logging_steps": 1, "max_steps": 2, "per_device_train_batch_size": 2,
        "gradient_accumulation_steps": 1, "learning_rate": 1.0e-4, "bf16": False, "report_to": "none",
        "save_strategy": "no", "dataloader_num_workers": 0, "seed": 0,
        "tvc_dump_batches": str(out / "batches"), **extra,
    }
    path = out / "train.yaml"
    out.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{k}: {json.dumps(v)}\n" for k, v in config.items()))
    return path


@pytest.fixture(scope="module")
def lf_parts(model_dir):
    """LLaMA-Factory's tokenizer and processor (loaded as in training) for the TVC template."""
    model_args = ModelArguments(model_name_or_path=str(model_dir), image_max_pixels=IMAGE_MAX_PIXELS)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        module = load_tokenizer(model_args)
    tokenizer, processor = module["tokenizer"], module["processor"]
    get_template_and_fix_tokenizer(tokenizer, DataArguments(template="tvc_qwen2_vl"))
    return tokenizer, processor


def dvr_records(dataset_dir: Path, name: str = "emma_dvr.jsonl") -> list[dict]:
    return [json.loads(line) for line in (dataset_dir / name).read_text().splitlines()]


def encode(processor_cls, template_name, record, dataset_dir, tokenizer, processor, cutoff):
    data = DataArguments(template=template_name, cutoff_len=cutoff)
    p = processor_cls(template=TEMPLATES[template_name], tokenizer=tokenizer, processor=processor, data_args=data)
    images = [i if os.path.isabs(i) else str(dataset_dir / i) for i in record["images"]]
    messages = record["messages"]
    if isinstance(p, tvc_lf.TvcSupervisedDatasetProcessor) and template_name in tvc_lf.TVC_TEMPLATES:
        ids, labels, kept = p.encode_tvc_example(messages[:1], messages[1:], "", "", images, [], [])
        return ids, labels, kept
    ids, labels = p._encode_data_example(messages[:1], messages[1:], "", "", images, [], [])
    return ids, labels, images


def feature(ids, labels, images) -> dict:
    return {"input_ids": list(ids), "attention_mask": [1] * len(ids), "labels": list(labels), "images": images,
            "videos": None, "audios": None}


def blocks(ids) -> list[list[int]]:
    return tvc_rs.vision_blocks(np.asarray(ids, dtype=np.int64)).tolist()


def get_rope_index(model, batch):
    ids = batch["input_ids"]
    mm = torch.zeros_like(ids)
    mm[ids == IMAGE_PAD] = 1
    with torch.no_grad():
        return model.model.get_rope_index(ids, mm, image_grid_thw=batch.get("image_grid_thw"),
                                          attention_mask=batch["attention_mask"])


# ----------------------------------------------------------------------------- LLaMA-Factory's facts

def test_llamafactory_facts_the_plugin_relies_on():
    """What was read in LLaMA-Factory 0.9.5's source, checked on the installed package."""
    import llamafactory.data.loader as loader
    import llamafactory.launcher as launcher
    import llamafactory.train.sft.workflow as workflow
    from llamafactory.hparams import get_train_args

    assert llamafactory.__version__ == "0.9.5"
    # Multimodal plugins register by name; templates live in the TEMPLATES registry.
    assert mm_plugin.PLUGINS["tvc"] is tvc_lf.TvcPlugin
    with pytest.raises(ValueError, match=re.escape("already exists")):
        mm_plugin.register_mm_plugin("qwen2_vl", tvc_lf.TvcPlugin)
    # LLaMA-Factory 0.9.5 has a template and a multimodal plugin for every family TVC has DVR for:
    # qwen2_vl (Qwen2-VL, Qwen2.5-VL), qwen3_vl (Qwen3-VL and, with its own template, Qwen3.5),
    # glm4v (GLM-4.1V; glm4_5v for GLM-4.5V). Each TVC template has its base's text and a
    # TvcPlugin for its family.
    assert {"qwen2_vl", "qwen3_vl", "glm4v"} <= set(mm_plugin.PLUGINS)
    assert tvc_lf.unsupported_families() == {}
    assert set(tvc_lf.TVC_TEMPLATES) == {f"tvc_{m}" for m in tvc_lf.FAMILIES}
    for name, model_type in tvc_lf.TVC_TEMPLATES.items():
        ours, base = TEMPLATES[name], TEMPLATES[tvc_rs.dvr_family(model_type)["llamafactory_template"]]
        assert type(ours) is type(base) and ours.format_user == base.format_user
        assert ours.format_assistant == base.format_assistant and ours.format_prefix == base.format_prefix
        assert ours.efficient_eos == base.efficient_eos and ours.thought_words == base.thought_words
        assert isinstance(ours.mm_plugin, tvc_lf.TvcPlugin) and ours.mm_plugin.model_type == model_type
        plugin = base.mm_plugin
        assert plugin.image_token == ours.mm_plugin.image_token
        if type(plugin) is not mm_plugin.GLM4VPlugin:  # GLM's writes its block tokens literally
            assert (plugin.vision_bos_token, plugin.vision_eos_token) == \
                (ours.mm_plugin.vision_bos_token, ours.mm_plugin.vision_eos_token)
        else:
            assert "<|begin_of_image|>{self.image_token" in inspect.getsource(type(plugin).process_messages)
    with pytest.raises(ValueError, match=re.escape("already exists")):
        register_template(name="qwen2_vl")
    assert set(tvc_lf.TVC_TEMPLATES) <= set(TEMPLATES)
    # The SFT workflow builds its collator by name, the loader its dataset processor: no hook.
    assert "SFTDataCollatorWith4DAttentionMask(" in inspect.getsource(workflow.run_sft)
    assert "dataset_processor_class = SupervisedDatasetProcessor" in inspect.getsource(loader._get_dataset_processor)
    assert workflow.SFTDataCollatorWith4DAttentionMask is tvc_lf.TvcSFTDataCollator
    assert loader.SupervisedDatasetProcessor is tvc_lf.TvcSupervisedDatasetProcessor
    # Multi-GPU runs re-launch this very file through torchrun: nothing of the parent survives.
    source = inspect.getsource(launcher.launch)
    assert "torchrun" in source and "file_name=__file__" in source
    # Unknown YAML keys are refused (unless ALLOW_EXTRA_ARGS).
    with pytest.raises(ValueError, match=re.escape("not used by the HfArgumentParser")):
        get_train_args({"model_name_or_path": "x", "tvc_bridge": "again:"})


def lf_split_cutoff(ids_len_source, target_blocks, target_len):
    """A cutoff at which LLaMA-Factory's own split cuts through the pads of an answer image."""
    for cutoff in range(ids_len_source + 10, ids_len_source + target_len):
        _, keep = lf_infer_seqlen(ids_len_source, target_len, cutoff)
        if any(b[0] + 1 < keep < b[1] - 1 for b in target_blocks):
            return cutoff
    return None


def test_llamafactory_alone_trains_on_image_tokens_and_cuts_image_blocks(dataset_dir, lf_parts, model):
    """The two faults: with its own qwen2_vl template, the pads of an image inside the answer are
    training targets, and truncation cuts through an image block (then collation fails, or the
    model refuses the batch: "Image features and image tokens do not match"). The TVC template
    does neither."""
    tokenizer, processor = lf_parts
    record = next(r for r in dvr_records(dataset_dir) if r["tvc"]["insertions"] and len(r["images"]) > 1)
    ids, labels, _ = encode(SupervisedDatasetProcessor, "qwen2_vl", record, dataset_dir, tokenizer, processor, 10**6)
    source = labels.index(next(l for l in labels if l != IGNORE_INDEX))
    answer_pads = [i for i in range(source, len(ids)) if ids[i] == IMAGE_PAD]
    assert answer_pads and all(labels[i] == IMAGE_PAD for i in answer_pads)  # fault 1

    ours = encode(tvc_lf.TvcSupervisedDatasetProcessor, "tvc_qwen2_vl", record, dataset_dir, tokenizer, processor,
                  10**6)
    assert ours[0] == ids
    assert all(ours[1][i] == IGNORE_INDEX for i in range(len(ids)) if ids[i] in VISION)
    assert all(ours[1][i] == labels[i] for i in range(len(ids)) if ids[i] not in VISION)

    target_blocks = [[b[0] - source, b[1] - source] for b in blocks(ids) if b[0] >= source]
    cutoff = lf_split_cutoff(source, target_blocks, len(ids) - source)
    assert cutoff is not None
    ids, labels, images = encode(SupervisedDatasetProcessor, "qwen2_vl", record, dataset_dir, tokenizer, processor,
                                 cutoff)
    assert not all(b[5] for b in blocks(ids))  # fault 2: a block cut in two
    # With transformers 5.6 the training collator (which computes positions with the model's
    # get_rope_index) already fails on it; without precomputed positions the model refuses it.
    lf_collator = SFTDataCollatorWith4DAttentionMask(template=TEMPLATES["qwen2_vl"], model=model, tokenizer=tokenizer,
                                                     processor=processor, label_pad_token_id=IGNORE_INDEX)
    with pytest.raises(RuntimeError, match=re.escape("shape mismatch")):
        lf_collator([feature(ids, labels, images)])
    no_positions = SFTDataCollatorWith4DAttentionMask(template=TEMPLATES["qwen2_vl"], model=None, tokenizer=tokenizer,
                                                      processor=processor, label_pad_token_id=IGNORE_INDEX)
    batch = no_positions([feature(ids, labels, images)])
    with pytest.raises(ValueError, match=re.escape("Image features and image tokens do not match")), torch.no_grad():
        model(**batch)

    ids, labels, kept = encode(tvc_lf.TvcSupervisedDatasetProcessor, "tvc_qwen2_vl", record, dataset_dir, tokenizer,
                               processor, cutoff)
    assert len(ids) <= cutoff and all(b[5] for b in blocks(ids)) and len(kept) == len(blocks(ids))
    collator = tvc_lf.TvcSFTDataCollator(template=TEMPLATES["tvc_qwen2_vl"], model=model, tokenizer=tokenizer,
                                         processor=processor, label_pad_token_id=IGNORE_INDEX)
    with torch.no_grad():
        assert torch.isfinite(model(**collator([feature(ids, labels, kept)])).loss)

    # A sample cut through a block by other means (tokenized without the TVC processor) is
    # repaired by the TVC collator: the partial block goes with its image.
    lf_ids, lf_labels, lf_images = encode(SupervisedDatasetProcessor, "qwen2_vl", record, dataset_dir, tokenizer,
                                          processor, cutoff)
    batch = collator([feature(lf_ids, lf_labels, lf_images)])
    assert all(b[5] for b in blocks(batch["input_ids"][0].tolist()))
    with torch.no_grad():
        assert torch.isfinite(model(**batch).loss)


# ----------------------------------------------------------------------------- the plugin's pieces

@settings(max_examples=300, deadline=None)
@given(st.integers(0, 20000), st.integers(0, 20000), st.integers(1, 30000))
def test_infer_seqlen_is_llamafactorys(source, target, cutoff):
    assert tvc_rs.infer_seqlen(source, target, cutoff) == lf_infer_seqlen(source, target, cutoff)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(width=st.integers(1, 3000), height=st.integers(1, 3000), max_pixels=st.sampled_from([768 * 768, 50176, 4096]),
       min_pixels=st.sampled_from([32 * 32, 1, 20000]))
def test_image_token_counts_equal_llamafactory_and_the_processor(lf_parts, width, height, max_pixels, min_pixels):
    """The plugin's count from the size (LLaMA-Factory's regularization, then smart_resize) equals
    what LLaMA-Factory's own Qwen2-VL plugin gets by running the image processor."""
    from PIL import Image

    if max(width, height) / min(width, height) > 150:
        return
    _, processor = lf_parts
    processor = copy.copy(processor)
    processor.image_max_pixels, processor.image_min_pixels = max(max_pixels, min_pixels), min_pixels
    image = Image.new("RGB", (width, height), (width % 256, height % 256, 7))
    expected = TEMPLATES["qwen2_vl"].mm_plugin._get_mm_inputs([image], [], [], processor)["image_grid_thw"].tolist()
    assert [list(TEMPLATES["tvc_qwen2_vl"].mm_plugin.image_grid(image, processor))] == expected


def test_image_token_counts_on_real_images(lf_parts):
    _, processor = lf_parts
    paths = sorted(p for p in asset("images").rglob("*") if p.suffix.lower() in {".jpg", ".png"})
    for settings_ in [(IMAGE_MAX_PIXELS, 32 * 32), (768 * 768, 32 * 32), (10**8, 0)]:
        proc = copy.copy(processor)
        proc.image_max_pixels, proc.image_min_pixels = settings_
        expected = TEMPLATES["qwen2_vl"].mm_plugin._get_mm_inputs([str(p) for p in paths], [], [], proc)
        got = [list(TEMPLATES["tvc_qwen2_vl"].mm_plugin.image_grid(str(p), proc)) for p in paths]
        assert got == expected["image_grid_thw"].tolist()


BRIDGE = " Let me look at the image again:"


@pytest.mark.parametrize("bridge", [None, BRIDGE])
def test_the_dataset_processor_equals_the_rust_builder(dataset_dir, lf_parts, monkeypatch, bridge):
    """LLaMA-Factory's template and our processor give the same tokens, labels and images as
    ``DVRBuilder.build`` (Rust), at round cutoffs and at cutoffs through, at and around every
    re-affirmed copy (LLaMA-Factory's size regularization off, so that both see the same image
    sizes); with a bridge (``tvc_bridge``, ``dvr build --bridge``) too. Every copy that ends
    before the cut is kept."""
    from PIL import Image

    tokenizer, processor = lf_parts
    processor = copy.copy(processor)
    processor.image_max_pixels, processor.image_min_pixels = 10**9, 0
    monkeypatch.setitem(tvc_lf._settings, "tvc_bridge", bridge)
    builder = tvc_rs.DVRBuilder(asset("qwen2-vl"), policy=tvc_rs.DVRPolicy(max_insertions=3, min_gap=40, skip_first=0,
                                                                           bridge=bridge))
    source = {r["id"]: r for r in emma_records()}
    compared = cut_through = kept_while_cut = 0
    for record in dvr_records(dataset_dir):
        if bridge:  # what `dvr build --bridge` writes: the bridge right before each placeholder
            record = copy.deepcopy(record)
            record["messages"][1]["content"] = record["messages"][1]["content"].replace("<image>", bridge + "<image>")
        original = source[record["tvc"]["id"]]
        with Image.open(ASSETS / original["local_image"]) as im:
            size = (im.height, im.width)
        full = builder.build(record["messages"][0]["content"], [size], original["response"])
        copies = [b for b in blocks(full.input_ids.tolist()) if b[0] >= full.prompt_tokens]
        cutoffs = [10**6, 3000, 2000, 1500, 1200, 900, 600, 300]
        for b in copies:
            cutoffs += [(b[0] + b[1]) // 2, b[0], b[1], b[0] - 3]
        for cutoff in cutoffs:
            try:
                sample = builder.build(record["messages"][0]["content"], [size], original["response"], cutoff=cutoff)
            except ValueError as err:
                with pytest.raises(ValueError, match=re.escape("cutoff_len")):
                    encode(tvc_lf.TvcSupervisedDatasetProcessor, "tvc_qwen2_vl", record, dataset_dir, tokenizer,
                           processor, cutoff)
                assert "cutoff" in str(err)
                continue
            ids, labels, kept = encode(tvc_lf.TvcSupervisedDatasetProcessor, "tvc_qwen2_vl", record, dataset_dir,
                                       tokenizer, processor, cutoff)
            assert ids == sample.input_ids.tolist()
            assert labels == sample.labels.tolist()
            assert len(kept) == len(sample.images)
            assert [os.path.basename(k) != os.path.basename(record["images"][0]) for k in kept] == \
                [im.inserted for im in sample.images]
            # Every copy that ends before the cut is kept; one through it or after it is not.
            if sample.prompt_tokens == full.prompt_tokens:  # then ids is a prefix of the full sample
                assert ids == full.input_ids.tolist()[:len(ids)]
                assert sample.kept_images == sum(b[1] <= len(ids) for b in copies)
            cut_through += any(b[0] < cutoff < b[1] for b in copies)
            kept_while_cut += sample.kept_images > 0 and len(ids) < len(full)
            compared += 1
    assert compared >= 40 and cut_through >= 5 and kept_while_cut >= 8, (compared, cut_through, kept_while_cut)


def test_cutoff_smaller_than_an_image_block_is_a_clear_error(dataset_dir, lf_parts):
    tokenizer, processor = lf_parts
    record = dvr_records(dataset_dir)[0]
    with pytest.raises(ValueError, match=re.escape("cutoff_len = 20 is smaller than the prompt up to the end of its image")):
        encode(tvc_lf.TvcSupervisedDatasetProcessor, "tvc_qwen2_vl", record, dataset_dir, tokenizer, processor, 20)


def collated(dataset_dir, lf_parts, model, cutoff, side, **kwargs):
    tokenizer, processor = lf_parts
    tokenizer.padding_side = side
    features = []
    for record in dvr_records(dataset_dir):
        ids, labels, kept = encode(tvc_lf.TvcSupervisedDatasetProcessor, "tvc_qwen2_vl", record, dataset_dir,
                                   tokenizer, processor, cutoff)
        features.append(feature(ids, labels, kept))
    common = dict(model=model, tokenizer=tokenizer, processor=processor, label_pad_token_id=IGNORE_INDEX,
                  pad_to_multiple_of=8, **kwargs)
    lf = SFTDataCollatorWith4DAttentionMask(template=TEMPLATES["qwen2_vl"], **common)
    ours = tvc_lf.TvcSFTDataCollator(template=TEMPLATES["tvc_qwen2_vl"], **common)
    return features, lf, ours


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("block_diag_attn", [False, True])
def test_the_collator_equals_llamafactorys_and_get_rope_index(dataset_dir, lf_parts, model, side, block_diag_attn):
    features, lf, ours = collated(dataset_dir, lf_parts, model, CUTOFF, side, block_diag_attn=block_diag_attn)
    try:
        for batch_features in (features[:2], features[2:], features, [features[1]]):
            expected = lf(copy.deepcopy(batch_features))
            got = ours(copy.deepcopy(batch_features))
            assert set(got) == set(expected)
            for key in expected:
                assert torch.equal(got[key], expected[key]), key
            if not block_diag_attn:  # (with it, attention_mask is 4-D; the equality above covers it)
                positions, deltas = get_rope_index(model, got)
                assert torch.equal(got["position_ids"][1:], positions)
                assert torch.equal(got["rope_deltas"], deltas)
    finally:
        lf_parts[0].padding_side = "right"


def test_the_collator_on_a_batch_without_images(dataset_dir, lf_parts, model):
    """LLaMA-Factory adds a masked white image to keep ranks in step; the TVC collator does the same."""
    tokenizer, _ = lf_parts
    features, lf, ours = collated(dataset_dir, lf_parts, model, CUTOFF, "right")
    ids = tokenizer.encode("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello!<|im_end|>\n",
                           add_special_tokens=False)
    text_only = [feature(ids, ids, None), feature(ids[:-2], ids[:-2], None)]
    expected, got = lf(copy.deepcopy(text_only)), ours(copy.deepcopy(text_only))
    for key in expected:
        assert torch.equal(got[key], expected[key]), key


# ----------------------------------------------------------------------------- tvc-rs train

def check_batches(folder: Path, model, dataset_dir: Path, lf_parts) -> int:
    """Every dumped batch: vision labels masked, other answer labels kept, blocks whole with their
    grid's token count, positions equal to get_rope_index."""
    files = sorted(folder.glob("batch_*.npz"))
    assert files
    tokens_seen = 0
    for f in files:
        batch = {k: torch.from_numpy(v) for k, v in np.load(f).items()}
        ids, labels, mask = batch["input_ids"], batch["labels"], batch["attention_mask"]
        assert ids.shape[1] <= CUTOFF + 8  # padded to a multiple of 8
        visual = torch.isin(ids, torch.tensor(VISION))
        assert (labels[visual] == IGNORE_INDEX).all()
        trained = labels != IGNORE_INDEX
        assert (labels[trained] == ids[trained]).all() and trained.any()
        grids = batch["image_grid_thw"].tolist()
        k = 0
        for row in range(ids.shape[0]):
            n = int(mask[row].sum())
            assert n <= CUTOFF
            for b in blocks(ids[row, mask[row].bool()].tolist()):
                assert b[5], "an image block was cut"
                t, h, w = grids[k]
                assert b[3] - b[2] == t * h * w // 4
                k += 1
        assert k == len(grids)
        positions, deltas = get_rope_index(model, batch)
        assert torch.equal(batch["position_ids"][1:], positions)
        assert torch.equal(batch["position_ids"][0], positions[0])
        assert torch.equal(batch["rope_deltas"], deltas)
        tokens_seen += int(mask.sum())
    return tokens_seen


def test_train_two_sft_steps(tmp_path, model_dir, dataset_dir, model, lf_parts):
    config = train_config(model_dir, dataset_dir, tmp_path)
    done = run(SCRIPT, "train", config, env=lf_env(tmp_path))
    log = [json.loads(line) for line in (tmp_path / "run" / "trainer_log.jsonl").read_text().splitlines()]
    losses = [entry["loss"] for entry in log if "loss" in entry]
    assert len(losses) == 2 and all(math.isfinite(x) for x in losses), done.stdout[-2000:]
    check_batches(tmp_path / "batches", model, dataset_dir, lf_parts)
    # Truncation acted on the long sample: the first epoch's rows are the three samples that fit,
    # whole, and the long one cut to at most CUTOFF (its blocks whole, checked above).
    tokenizer, processor = lf_parts
    lengths = sorted(len(encode(tvc_lf.TvcSupervisedDatasetProcessor, "tvc_qwen2_vl", r, dataset_dir, tokenizer,
                                processor, 10**6)[0]) for r in dvr_records(dataset_dir))
    assert lengths[-1] > CUTOFF >= lengths[-2]
    files = sorted((tmp_path / "batches").glob("*.npz"))[:2]
    rows = sorted(int(m) for f in files for m in np.load(f)["attention_mask"].sum(1))
    assert len(rows) == 4 and rows[-1] <= CUTOFF and sorted(set(lengths[:3]) - set(rows)) == []
    assert max(set(rows) - set(lengths[:3])) > CUTOFF - 100


def test_train_in_torchrun_ranks(tmp_path, model_dir, dataset_dir, model, lf_parts):
    """FORCE_TORCHRUN re-launches through torchrun: the rank process installs the plugin itself."""
    config = train_config(model_dir, dataset_dir, tmp_path, max_steps=1)
    env = lf_env(tmp_path) | {"FORCE_TORCHRUN": "1", "NPROC_PER_NODE": "1"}
    proc = subprocess.Popen([str(SCRIPT), "train", str(config)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env=env)
    out, _ = proc.communicate(timeout=900)
    assert proc.returncode == 0, out[-6000:]
    assert "Initializing 1 distributed tasks" in out
    pids = {f.name.split("_pid")[1].split("_")[0] for f in (tmp_path / "batches").glob("*.npz")}
    assert pids and str(proc.pid) not in pids  # written by the rank, not the launcher
    check_batches(tmp_path / "batches", model, dataset_dir, lf_parts)


def test_train_refuses_bad_configs(tmp_path, model_dir, dataset_dir):
    config = train_config(model_dir, dataset_dir, tmp_path, template="tvc_llava")
    done = run(SCRIPT, "train", config, env=lf_env(tmp_path), expect=2)
    assert "unknown TVC template 'tvc_llava'" in done.stderr and "tvc_qwen3_vl" in done.stderr
    cases = [
        ({"template": "no_such_template"}, re.escape("LLaMA-Factory has no template 'no_such_template'")),
        ({"tvc_bridges": "x"}, re.escape("unknown TVC setting")),
        ({"tvc_mask_visual_labels": "yes"}, re.escape("tvc_mask_visual_labels must be true or false")),
        ({"packing": True}, re.escape("packing is not supported")),
        ({"stage": "dpo"}, re.escape("support stage: sft")),
    ]
    for extra, message in cases:
        config = train_config(model_dir, dataset_dir, tmp_path, **extra)
        with pytest.raises(ValueError, match=message):
            tvc_lf.cli_train(str(config))
    tvc_lf.install(tvc_lf.TVC_SETTINGS)  # the defaults again (the runs above set some)


def test_tvc_settings_stay_out_of_llamafactorys_config():
    rest, tvc = tvc_lf.split_config({"template": "tvc_qwen2_vl", "tvc_bridge": " Again:", "cutoff_len": 8})
    assert rest == {"template": "tvc_qwen2_vl", "cutoff_len": 8} and tvc == {"tvc_bridge": " Again:"}


# ----------------------------------------------------------------------------- the newer families (issue 15)

NEW_FAMILIES = ["qwen3_vl", "qwen3_5", "glm4v"]
TRAINED_FAMILIES = ["qwen3_vl", "glm4v"]  # one training step each (Qwen3.5: encoding only, to keep CI short)
QVQ = "traces/qwen_blog_qvq72b_qwq32b_official.jsonl"
FAMILY_CUTOFF = 4096


def qvq_with_local_images() -> list[dict]:
    """The real QVQ-72B-Preview traces of the Qwen blog, each given a real local image in place of
    its URL (the assets hold the answers, not the blog's pictures)."""
    paths = sorted(p for p in asset("images").rglob("*") if p.suffix.lower() in {".jpg", ".png"})
    qvq = [json.loads(line) for line in asset(QVQ).read_text().splitlines() if line.strip()]
    qvq = [r for r in qvq if r["model"] == "QVQ-72B-Preview"]
    return [{**r, "local_image": str(paths[i * 7 % len(paths)])} for i, r in enumerate(qvq)]


@pytest.fixture(scope="module", params=NEW_FAMILIES)
def family(request, tmp_path_factory):
    """A tiny random model of the family saved with its tokenizer and processor
    (tests/tiny_models.py), LLaMA-Factory's tokenizer and processor for it, and a dataset made by
    ``tvc-rs dvr build --model-type`` from real QVQ traces."""
    import tiny_models

    name = request.param
    folder = tmp_path_factory.mktemp(f"model-{name}")
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = tiny_models.family_model_class(name)(tiny_models.family_config(name, ASSETS))
        model.save_pretrained(folder)
        tiny_models.family_processor(name, ASSETS).save_pretrained(folder)
    model.eval()
    model_args = ModelArguments(model_name_or_path=str(folder), image_max_pixels=IMAGE_MAX_PIXELS)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        module = load_tokenizer(model_args)
    tokenizer, processor = module["tokenizer"], module["processor"]
    get_template_and_fix_tokenizer(tokenizer, DataArguments(template=f"tvc_{name}"))
    data = tmp_path_factory.mktemp(f"data-{name}")
    (data / "qvq.jsonl").write_text("".join(json.dumps(r) + "\n" for r in qvq_with_local_images()))
    done = run(SCRIPT, "dvr", "build", data / "qvq.jsonl", "-o", data / "qvq_dvr.jsonl", "--tokenizer", folder,
               "--model-type", name, "--image-field", "local_image", *POLICY)
    assert f"template: tvc_{name}" in done.stdout
    return name, folder, model, tokenizer, processor, data


def family_ids(model, ids):
    """The model's own get_rope_index on a batch."""
    image_pad = model.config.image_token_id
    with torch.no_grad():
        return model.model.get_rope_index(ids["input_ids"], (ids["input_ids"] == image_pad).long(),
                                          image_grid_thw=ids.get("image_grid_thw"),
                                          attention_mask=ids["attention_mask"])


def test_family_samples_equal_llamafactorys_template_and_plugin(family):
    """LLaMA-Factory's own template and multimodal plugin of the family (qwen3_vl, qwen3_5,
    glm4v) on a DVR record (the re-affirmed images inside the answer) give the ids that the TVC
    template and ``DVRBuilder.build`` (Rust) give; the TVC labels are LLaMA-Factory's with every
    vision token masked, LLaMA-Factory's alone train on the copies' pads."""
    from PIL import Image

    name, folder, model, tokenizer, processor, data = family
    processor = copy.copy(processor)
    processor.image_max_pixels, processor.image_min_pixels = 10**9, 0  # both sides see the same sizes
    base = tvc_rs.dvr_family(name)["llamafactory_template"]
    ip = processor.image_processor
    builder = tvc_rs.DVRBuilder(tokenizer, model_type=name, policy=tvc_rs.DVRPolicy(max_insertions=3, min_gap=40,
                                                                                    skip_first=0),
                                patch_size=ip.patch_size, merge_size=ip.merge_size,
                                min_pixels=ip.size["shortest_edge"], max_pixels=ip.size["longest_edge"],
                                eos_token=tokenizer.eos_token)
    block = tvc_rs.dvr_family(name)["vision_tokens"]
    vision = [tokenizer.convert_tokens_to_ids(t) for t in block]
    assert list(builder.vision_token_ids) == vision
    source = {r["id"]: r for r in qvq_with_local_images()}
    compared = with_copies = 0
    for record in dvr_records(data, "qvq_dvr.jsonl"):
        ids_lf, labels_lf, _ = encode(SupervisedDatasetProcessor, base, record, data, tokenizer, processor, 10**6)
        ids, labels, kept = encode(tvc_lf.TvcSupervisedDatasetProcessor, f"tvc_{name}", record, data, tokenizer,
                                   processor, 10**6)
        assert ids == ids_lf
        masked = [IGNORE_INDEX if i in vision else label for i, label in zip(ids_lf, labels_lf)]
        assert labels == masked
        original = source[record["tvc"]["id"]]
        with Image.open(original["local_image"]) as im:
            size = (im.height, im.width)
        sample = builder.build(record["messages"][0]["content"], [size], original["response"])
        assert sample.input_ids.tolist() == ids and sample.labels.tolist() == labels
        copies = len(kept) - 1
        assert copies == record["tvc"]["insertions"]
        if copies:
            pads = [i for i, t in enumerate(ids_lf) if t == vision[2] and i >= sample.prompt_tokens]
            assert pads and all(labels_lf[i] == vision[2] for i in pads)  # LLaMA-Factory alone trains on them
            with_copies += 1
        # With a cutoff through the answer both the Rust builder and the TVC processor cut alike.
        cutoff = sample.prompt_tokens + (len(ids) - sample.prompt_tokens) // 2
        ids_cut, labels_cut, _ = encode(tvc_lf.TvcSupervisedDatasetProcessor, f"tvc_{name}", record, data,
                                        tokenizer, processor, cutoff)
        cut = builder.build(record["messages"][0]["content"], [size], original["response"], cutoff=cutoff)
        assert ids_cut == cut.input_ids.tolist() and labels_cut == cut.labels.tolist() and len(ids_cut) <= cutoff
        compared += 1
    assert compared >= 5 and with_copies >= 3, (compared, with_copies)


def test_family_collator_equals_llamafactorys_and_get_rope_index(family):
    name, folder, model, tokenizer, processor, data = family
    base = tvc_rs.dvr_family(name)["llamafactory_template"]
    features = []
    for record in dvr_records(data, "qvq_dvr.jsonl")[:3]:
        ids, labels, kept = encode(tvc_lf.TvcSupervisedDatasetProcessor, f"tvc_{name}", record, data, tokenizer,
                                   processor, FAMILY_CUTOFF)
        features.append(feature(ids, labels, kept))
    common = dict(model=model, tokenizer=tokenizer, processor=processor, label_pad_token_id=IGNORE_INDEX,
                  pad_to_multiple_of=8)
    lf = SFTDataCollatorWith4DAttentionMask(template=TEMPLATES[base], **common)
    ours = tvc_lf.TvcSFTDataCollator(template=TEMPLATES[f"tvc_{name}"], **common)
    expected, got = lf(copy.deepcopy(features)), ours(copy.deepcopy(features))
    assert set(got) == set(expected)
    vision = [tokenizer.convert_tokens_to_ids(t) for t in tvc_rs.dvr_family(name)["vision_tokens"]]
    for key in expected:
        if key == "labels":  # ours masks the vision tokens LLaMA-Factory trains on
            lf_labels = expected[key].clone()
            lf_labels[torch.isin(expected["input_ids"], torch.tensor(vision))] = IGNORE_INDEX
            assert torch.equal(got[key], lf_labels)
        else:
            assert torch.equal(got[key], expected[key]), key
    positions, deltas = family_ids(model, got)
    assert torch.equal(got["position_ids"][1:], positions)
    assert torch.equal(got["rope_deltas"], deltas)
    # A TVC template for another family is refused with the right one named.
    with pytest.raises(ValueError, match=re.escape(f"use template: tvc_{name}")):
        tvc_lf.TvcSFTDataCollator(template=TEMPLATES["tvc_qwen2_vl"], **common)


def test_family_train_one_step(tmp_path, family):
    """A real LLaMA-Factory training step (``tvc-rs train``) with the family's TVC template on the
    DVR data: the loss is finite, the batch's vision labels are masked and its positions are the
    model's get_rope_index."""
    name, folder, model, tokenizer, processor, data = family
    if name not in TRAINED_FAMILIES:
        pytest.skip(f"{name}: encoding is checked above; training runs for {', '.join(TRAINED_FAMILIES)}")
    config = train_config(folder, data, tmp_path, template=f"tvc_{name}", dataset="qvq_dvr", max_steps=1,
                          cutoff_len=FAMILY_CUTOFF)
    done = run(SCRIPT, "train", config, env=lf_env(tmp_path))
    log = [json.loads(line) for line in (tmp_path / "run" / "trainer_log.jsonl").read_text().splitlines()]
    losses = [entry["loss"] for entry in log if "loss" in entry]
    assert len(losses) == 1 and math.isfinite(losses[0]) and losses[0] > 0, done.stdout[-2000:]
    vision = torch.tensor([tokenizer.convert_tokens_to_ids(t) for t in tvc_rs.dvr_family(name)["vision_tokens"]])
    files = sorted((tmp_path / "batches").glob("batch_*.npz"))
    assert files
    for f in files:
        batch = {k: torch.from_numpy(v) for k, v in np.load(f).items()}
        ids, labels = batch["input_ids"], batch["labels"]
        assert (labels[torch.isin(ids, vision)] == IGNORE_INDEX).all()
        assert (labels != IGNORE_INDEX).any()
        positions, deltas = family_ids(model, batch)
        assert torch.equal(batch["position_ids"][1:], positions)
        assert torch.equal(batch["rope_deltas"], deltas)
