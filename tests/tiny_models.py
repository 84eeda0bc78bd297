"""Tiny Qwen2-VL models with random weights, built from a config (no model hub here), with the
real Qwen2-VL tokenizer and processor files of the assets: for the vLLM engine tests
(tests/test_vllm_engine.py) and benchmark (benches/bench_vllm_engine.py).

The weights are drawn with ``initializer_range=0.1`` rather than transformers' 0.02: at 0.02 a
2-layer model's greedy output repeats one token forever, at 0.1 it varies from token to token,
so that calibrations land in varied text and a wrong continuation shows.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

# The engine settings that run vLLM's CPU build on a 2-core machine (see .ci/vllm-cpu.sh).
ENGINE_ENV = {
    "VLLM_CPU_KVCACHE_SPACE": "2",
    "VLLM_CPU_OMP_THREADS_BIND": "nobind",
}
MAX_PIXELS = 256 * 28 * 28

PROMPT = (
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
    "<|vision_start|><|image_pad|><|vision_end|>How many objects are left?<|im_end|>\n<|im_start|>assistant\n"
)
TEXT_PROMPT = "<|im_start|>user\nHow many objects are left?<|im_end|>\n<|im_start|>assistant\n"


def make_tiny_qwen2_vl(folder: Path, assets: Path, *, hidden: int = 256, layers: int = 2, seed: int = 0) -> Path:
    """Saves a random Qwen2-VL (``layers`` text layers of ``hidden``, 4 heads of 64 with 2 KV
    heads, mrope_section [8, 12, 12] = head_dim / 2, a 2-layer vision tower) into ``folder`` with
    the tokenizer and processor files of ``assets/qwen2-vl``; returns ``folder``."""
    import torch
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    heads = hidden // 64
    config = Qwen2VLConfig(
        text_config=dict(
            vocab_size=151936,
            hidden_size=hidden,
            intermediate_size=2 * hidden,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            num_key_value_heads=max(1, heads // 2),
            max_position_embeddings=32768,
            initializer_range=0.1,
            rope_parameters=dict(rope_type="default", rope_theta=1_000_000.0, mrope_section=[8, 12, 12]),
        ),
        vision_config=dict(depth=2, embed_dim=64, hidden_size=hidden, num_heads=2, mlp_ratio=2, initializer_range=0.1),
        tie_word_embeddings=True,
        initializer_range=0.1,
    )
    torch.manual_seed(seed)
    Qwen2VLForConditionalGeneration(config).save_pretrained(folder)
    for f in (assets / "qwen2-vl").iterdir():
        if not f.name.startswith("config"):
            shutil.copy(f, folder / f.name)
    return folder


def words_in(text: str, count: int) -> list[str]:
    """The first ``count`` distinct ASCII words (3+ letters, whole words as the detector sees them: no
    word character of Python's ``\\w`` on either side, lower-cased) of ``text``: reflection
    phrases that a random model's greedy output is known to contain."""
    found: list[str] = []
    for match in re.finditer(r"(?<!\w)[A-Za-z]{3,}(?!\w)", text):
        word = match.group(0).lower()
        if word not in found:
            found.append(word)
        if len(found) == count:
            break
    return found


# ------------------------------------------------------------------ the newer families (issue 15)

#: Image placeholder tokens (start, pad, end) of the tiny family models below, as strings.
FAMILY_IMAGE_TOKENS = {
    "qwen3_vl": ("<|vision_start|>", "<|image_pad|>", "<|vision_end|>"),
    "qwen3_vl_moe": ("<|vision_start|>", "<|image_pad|>", "<|vision_end|>"),
    "qwen3_5": ("<|vision_start|>", "<|image_pad|>", "<|vision_end|>"),
    "glm4v": ("<|begin_of_image|>", "<|image|>", "<|end_of_image|>"),
    "glm4v_moe": ("<|begin_of_image|>", "<|image|>", "<|end_of_image|>"),
}
FAMILIES = tuple(FAMILY_IMAGE_TOKENS)
_GLM_SPECIALS = ["<|begin_of_image|>", "<|end_of_image|>", "<|image|>", "<|begin_of_video|>", "<|end_of_video|>", "<|video|>"]


def family_tokenizer(family: str, assets: Path):
    """The real Qwen2-VL tokenizer (Qwen3-VL's vocabulary; Qwen3.5's own tokenizer is not in the
    assets, so its tiny model uses this one with its config's token ids set to it). GLM-4.1V's
    tokenizer is not in the assets either: its image tokens are added to this one as special
    tokens (new ids past the Qwen2 vocabulary, written into the tiny GLM config)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(assets / "qwen2-vl")
    if family.startswith("glm4v"):
        tokenizer.add_special_tokens({"additional_special_tokens": _GLM_SPECIALS}, replace_extra_special_tokens=False)
    return tokenizer


def _chat_template(family: str) -> str:
    start, pad, end = FAMILY_IMAGE_TOKENS[family]
    return (
        "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
        "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
        "{% for content in message['content'] %}{% if content['type'] == 'image' %}"
        f"{start}{pad}{end}"
        "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n"
        "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )


def family_processor(family: str, assets: Path):
    """The family's own transformers processor class (image and video processors with their
    defaults: Qwen3-VL / Qwen3.5 patch 16, GLM-4.1V patch 14, merge 2), at most ~100 merged image
    tokens per image, the tokenizer of `family_tokenizer` and a chat template that writes the
    family's image block."""
    tokenizer = family_tokenizer(family, assets)
    if family.startswith("glm4v"):
        from transformers import Glm4vImageProcessor, Glm4vProcessor, Glm4vVideoProcessor

        image = Glm4vImageProcessor(size={"shortest_edge": 56 * 56, "longest_edge": 100 * 28 * 28})
        return Glm4vProcessor(image_processor=image, tokenizer=tokenizer, video_processor=Glm4vVideoProcessor(),
                              chat_template=_chat_template(family))
    from transformers import Qwen2VLImageProcessor, Qwen3VLProcessor, Qwen3VLVideoProcessor

    image = Qwen2VLImageProcessor(patch_size=16, merge_size=2, size={"shortest_edge": 64 * 64, "longest_edge": 100 * 32 * 32})
    return Qwen3VLProcessor(image_processor=image, tokenizer=tokenizer, video_processor=Qwen3VLVideoProcessor(),
                            chat_template=_chat_template(family))


def family_config(family: str, assets: Path):
    """A tiny config of ``family`` from transformers' own config class: 2 text layers (Qwen3.5: 4,
    three linear-attention and one full-attention, its pattern) of hidden 64, 2 heads of 32 with
    1 KV head (the MoE variants: 4 experts of 32, 2 per token; GLM's first layer dense); the family's rope layout at that size (Qwen3-VL interleaved M-RoPE [6, 5, 5] over
    all 32 dims; GLM-4.1V partial_rotary_factor 0.5, adjacent pairs, [2, 3, 3]; Qwen3.5
    partial_rotary_factor 0.5, interleaved [3, 3, 2]); Qwen3-VL DeepStack from vision layers 0
    and 1 of 3. Token ids are those of `family_tokenizer`."""
    tokenizer = family_tokenizer(family, assets)
    ids = {name: tokenizer.convert_tokens_to_ids(tok) for name, tok in zip(("start", "pad", "end"), FAMILY_IMAGE_TOKENS[family])}
    text = dict(vocab_size=151936, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                num_key_value_heads=1, head_dim=32, max_position_embeddings=32768, initializer_range=0.1,
                tie_word_embeddings=True)
    if family in ("qwen3_vl", "qwen3_vl_moe"):
        from transformers import Qwen3VLConfig, Qwen3VLMoeConfig

        text["rope_parameters"] = dict(rope_type="default", rope_theta=1_000_000.0, mrope_section=[6, 5, 5], mrope_interleaved=True)
        if family == "qwen3_vl_moe":
            text.update(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, decoder_sparse_step=1)
        cls = Qwen3VLConfig if family == "qwen3_vl" else Qwen3VLMoeConfig
        return cls(
            text_config=text,
            vision_config=dict(depth=3, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
                               patch_size=16, spatial_merge_size=2, deepstack_visual_indexes=[0, 1],
                               num_position_embeddings=576, initializer_range=0.1),
            image_token_id=ids["pad"], vision_start_token_id=ids["start"], vision_end_token_id=ids["end"],
            tie_word_embeddings=True, initializer_range=0.1,
        )
    if family in ("glm4v", "glm4v_moe"):
        from transformers import Glm4vConfig, Glm4vMoeConfig

        text["rope_parameters"] = dict(rope_type="default", rope_theta=10000.0, mrope_section=[2, 3, 3], partial_rotary_factor=0.5)
        if family == "glm4v_moe":
            text.update(n_routed_experts=4, n_shared_experts=1, num_experts_per_tok=2, moe_intermediate_size=32,
                        first_k_dense_replace=1)
        return (Glm4vConfig if family == "glm4v" else Glm4vMoeConfig)(
            text_config=text,
            vision_config=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
                               patch_size=14, spatial_merge_size=2, initializer_range=0.1),
            image_token_id=ids["pad"], image_start_token_id=ids["start"], image_end_token_id=ids["end"],
            video_token_id=tokenizer.convert_tokens_to_ids("<|video|>"),
            video_start_token_id=tokenizer.convert_tokens_to_ids("<|begin_of_video|>"),
            video_end_token_id=tokenizer.convert_tokens_to_ids("<|end_of_video|>"),
            tie_word_embeddings=True, initializer_range=0.1,
        )
    if family == "qwen3_5":
        from transformers import Qwen3_5Config

        text.update(num_hidden_layers=4, linear_num_key_heads=2, linear_num_value_heads=2, linear_key_head_dim=16,
                    linear_value_head_dim=16, linear_conv_kernel_dim=4,
                    rope_parameters=dict(rope_type="default", rope_theta=10000.0, mrope_section=[3, 3, 2],
                                         partial_rotary_factor=0.5, mrope_interleaved=True))
        return Qwen3_5Config(
            text_config=text,
            vision_config=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
                               patch_size=16, spatial_merge_size=2, num_position_embeddings=576, initializer_range=0.1),
            image_token_id=ids["pad"], vision_start_token_id=ids["start"], vision_end_token_id=ids["end"],
            video_token_id=tokenizer.convert_tokens_to_ids("<|video_pad|>"),
            tie_word_embeddings=True, initializer_range=0.1,
        )
    raise ValueError(f"no tiny config for {family!r}")


def family_model_class(family: str):
    import transformers

    return {
        "qwen3_vl": transformers.Qwen3VLForConditionalGeneration,
        "qwen3_vl_moe": transformers.Qwen3VLMoeForConditionalGeneration,
        "glm4v": transformers.Glm4vForConditionalGeneration,
        "glm4v_moe": transformers.Glm4vMoeForConditionalGeneration,
        "qwen3_5": transformers.Qwen3_5ForConditionalGeneration,
    }[family]
