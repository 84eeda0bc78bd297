"""Reflection-trigger detection (Rust: src/triggers).

`ReflectionDetector` finds self-reflection phrases ("wait", "hmm", "let me double-check", ...)
in the text that generated tokens decode to: a phrase matches where the case-insensitive regex
``(?<!\\w)phrase(?!\\w)`` matches, and a hit is reported at the token whose bytes confirm the
word boundary after it. Feeding one token at a time (`ReflectionStream`), a batch of streams
(`StreamBatch`) or a whole token list (`find_tokens`) gives identical hits.
"""

from __future__ import annotations

from tvc_rs._native import (
    DEFAULT_PHRASES,
    Hit,
    ReflectionDetector,
    ReflectionStream,
    StreamBatch,
    TextScan,
)

__all__ = ["DEFAULT_PHRASES", "Hit", "ReflectionDetector", "ReflectionStream", "StreamBatch", "TextScan"]
