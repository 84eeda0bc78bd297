"""Reflection-trigger detection and PVC scheduling (Rust: src/triggers, src/pvc)."""

from __future__ import annotations

__all__: list[str] = []
