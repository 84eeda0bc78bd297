"""Shared test settings: where the real assets are (``$TVC_ASSETS``, default ``../shared/assets``)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
ASSETS = Path(os.environ.get("TVC_ASSETS", ROOT.parent / "shared" / "assets"))


def asset(relative: str) -> Path:
    """Path of a real asset, or skip the test with the reason when it is absent."""
    path = ASSETS / relative
    if not path.exists():
        pytest.skip(f"asset {relative} not found under {ASSETS} (set TVC_ASSETS)")
    return path


@pytest.fixture(scope="session")
def qwen2_vl_dir() -> Path:
    """The real Qwen2-VL tokenizer and processor files."""
    return asset("qwen2-vl")


@pytest.fixture(scope="session")
def tokenizer_json(qwen2_vl_dir: Path) -> Path:
    return qwen2_vl_dir / "tokenizer.json"
