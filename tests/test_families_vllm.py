"""tvc_rs.vllm's family tables (issue 15): the image block tokens of Qwen3-VL, GLM-4.1V / 4.5V and
Qwen3.5 read from the model's config, and Qwen3-VL's pooled ``image_embeds`` in the layout vLLM's
own Qwen3-VL code unpacks (DeepStack levels on the last dimension).

Runs where vLLM is installed (the vLLM environments). The engine configuration is the Qwen2-VL
one of tests/test_vllm.py with the tiny family config of tests/tiny_models.py put in as the
model's ``hf_config``; vLLM's ``_compute_deepstack_embeds`` (the function its Qwen3-VL model
uses to split ``image_embeds`` into the main features and the DeepStack levels) is called as it
is. No engine runs a Qwen3-VL / GLM / Qwen3.5 model here.
"""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest

torch = pytest.importorskip("torch")
vllm = pytest.importorskip("vllm", reason="vLLM is not installed here; its tests run in .venv-vllm (.ci/vllm.sh)")

from conftest import asset  # noqa: E402
from tiny_models import family_config, family_model_class, family_tokenizer  # noqa: E402
from tvc_rs import PVCConfig  # noqa: E402
from tvc_rs.vllm import TVCRequest, _Driver, _Session, deepstack_levels  # noqa: E402
from vllm import SamplingParams  # noqa: E402


@pytest.fixture(scope="session")
def qwen2_engine_config(tmp_path_factory):
    from vllm.engine.arg_utils import EngineArgs

    qwen = asset("qwen2-vl")
    folder = tmp_path_factory.mktemp("qwen2-vl-2b")
    for name in ["tokenizer.json", "tokenizer_config.json", "chat_template.json", "preprocessor_config.json",
                 "generation_config.json", "added_tokens.json", "special_tokens_map.json"]:
        (folder / name).symlink_to(qwen / name)
    (folder / "config.json").symlink_to(asset("model_configs/Qwen2-VL-2B-Instruct.config.TangLinJie-Qwen2-VL-bm.json"))
    return EngineArgs(model=str(folder), max_model_len=4096, enable_mm_embeds=True,
                      mm_processor_cache_gb=0).create_engine_config()


def engine_config_for(base, family):
    config = copy.copy(base)
    config.additional_config = {}
    model = copy.copy(base.model_config)
    model.hf_config = family_config(family, asset(""))
    config.model_config = model
    return config


def block_ids(config, family):
    if family.startswith("glm4v"):
        return config.image_start_token_id, config.image_token_id, config.image_end_token_id
    return config.vision_start_token_id, config.image_token_id, config.vision_end_token_id


@pytest.mark.parametrize("family", ["qwen3_vl", "qwen3_vl_moe", "glm4v", "glm4v_moe", "qwen3_5"])
def test_driver_takes_the_image_block_tokens_from_the_config(qwen2_engine_config, family):
    config = engine_config_for(qwen2_engine_config, family)
    tokenizer = family_tokenizer(family, asset(""))
    driver = _Driver(config, tokenizer, PVCConfig(mode="append", pool=2))
    start, pad, end = block_ids(config.model_config.hf_config, family)
    assert (driver.vision_start, driver.image_pad, driver.vision_end) == (start, pad, end)
    if family.startswith("glm4v"):  # GLM's own tokens, not Qwen's
        assert pad == tokenizer.convert_tokens_to_ids("<|image|>") != tokenizer.convert_tokens_to_ids("<|image_pad|>")
    # A prompt with the family's block is accepted; one with another family's block is not.
    text = tokenizer.encode("How many?", add_special_tokens=False)
    from PIL import Image

    image = [Image.new("RGB", (64, 64))]
    _Session(driver, TVCRequest(prompt=text + [start, pad, end], images=image), "ok")
    with pytest.raises(ValueError, match="blocks for 1 images"):
        _Session(driver, TVCRequest(prompt=text + [start, 151643, end], images=image), "bad")
    features = [(torch.zeros(4, 64 * (1 + deepstack_levels(config.model_config.hf_config))), (1, 4, 4))]
    if family.startswith("glm4v"):  # vLLM's GLM has no image_embeds input: refused with the reason
        with pytest.raises(ValueError, match="takes no image_embeds"):
            _Session(driver, TVCRequest(prompt=text + [start, pad, end], vision_features=features), "features")
    else:
        _Session(driver, TVCRequest(prompt=text + [start, pad, end], vision_features=features), "features")


def test_qwen3_vl_pooled_image_embeds_unpack_in_vllm_as_pooled_deepstack_levels(qwen2_engine_config):
    """The driver pools Qwen3-VL's packed features [tokens, (1 + levels) * hidden]; vLLM's own
    split gives back the pooled main features at the image tokens and each pooled level as that
    layer's DeepStack input (references: the tiny model's vision tower, PyTorch pooling)."""
    from PIL import Image
    from vllm.model_executor.models.qwen3_vl import Qwen3VLForConditionalGeneration

    family = "qwen3_vl"
    config = engine_config_for(qwen2_engine_config, family)
    hf_config = config.model_config.hf_config
    tokenizer = family_tokenizer(family, asset(""))
    torch.manual_seed(0)
    model = family_model_class(family)(hf_config).eval()
    image = Image.open(asset("images/tvc_case1_clevr.jpg")).convert("RGB").resize((320, 256))
    from transformers import Qwen2VLImageProcessor

    processed = Qwen2VLImageProcessor(patch_size=16, merge_size=2)(images=[image], return_tensors="pt")
    grid = processed["image_grid_thw"]
    with torch.no_grad():
        out = model.model.get_image_features(processed["pixel_values"], grid)
    main, levels = out.pooler_output[0], [level[0] for level in out.deepstack_features]
    packed = torch.cat([main] + levels, dim=-1)
    t, h, w = (int(v) for v in grid[0])
    start, pad, end = block_ids(hf_config, family)
    driver = _Driver(config, tokenizer, PVCConfig(mode="append", pool=2))
    text = tokenizer.encode("How many?", add_special_tokens=False)
    request = TVCRequest(prompt=text + [start, pad, end], vision_features=[(packed, (t, h, w))],
                         sampling_params=SamplingParams(max_tokens=8))
    with pytest.raises(ValueError, match=r"image_embeds \[tokens, \(1 \+ 2 DeepStack levels\) \* 64\]"):
        _Session(driver, TVCRequest(prompt=text + [start, pad, end], vision_features=[(main, (t, h, w))]), "unpacked")
    session = _Session(driver, request, "s")
    ((item, count),) = session._compress()
    pooled, pooled_grid = item
    ph, pw = h // 2 // 2, w // 2 // 2
    assert tuple(pooled_grid) == (t, ph * 2, pw * 2) and count == t * ph * pw == pooled.shape[0]

    def pool(x):
        x = x.reshape(t, h // 2, w // 2, -1)
        return x.reshape(t, ph, 2, pw, 2, -1).mean(dim=(2, 4)).reshape(-1, x.shape[-1])

    # vLLM's split, with the model's sizes, on a sequence of 3 text tokens + the image + 2 text tokens.
    n = 3 + count + 2
    is_multimodal = torch.zeros(n, dtype=torch.bool)
    is_multimodal[3:3 + count] = True
    owner = SimpleNamespace(visual_dim=64, multiscale_dim=64 * 2, deepstack_num_level=2)
    deepstack, (main_out,) = Qwen3VLForConditionalGeneration._compute_deepstack_embeds(
        owner, torch.zeros(n, 64), [pooled], is_multimodal
    )
    torch.testing.assert_close(main_out, pool(main), atol=1e-6, rtol=1e-6)
    assert deepstack.shape == (2, n, 64)
    for i, level in enumerate(levels):
        torch.testing.assert_close(deepstack[i][is_multimodal], pool(level), atol=1e-6, rtol=1e-6)
        assert not deepstack[i][~is_multimodal].any()
