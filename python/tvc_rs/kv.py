"""KV-cache re-injection: key re-rotation, span relocation, paged re-injection (Rust: src/kv)."""

from __future__ import annotations

__all__: list[str] = []
