"""M-RoPE position ids and image token counts of Qwen2-VL / Qwen2.5-VL (Rust: src/rope)."""

from __future__ import annotations

__all__: list[str] = []
