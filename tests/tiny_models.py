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
