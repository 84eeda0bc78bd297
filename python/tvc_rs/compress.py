"""Visual-token compression: pooling, attention scores, selection, pruning (Rust: src/compress)."""

from __future__ import annotations

__all__: list[str] = []
