"""Tells the native module where PyPI's NVRTC lives: the ``nvidia/*/lib`` directories of every
``sys.path`` entry (the ``nvidia-cuda-nvrtc`` wheel, which PyTorch's CUDA wheels install), CUDA 13
layouts first. Imported with the package; NVRTC itself is loaded on the first CUDA compile."""

from __future__ import annotations

import sys
from pathlib import Path

from tvc_rs import _native


def nvrtc_dirs() -> list[str]:
    found: list[str] = []
    for entry in sys.path:
        nvidia = Path(entry or ".") / "nvidia"
        if not nvidia.is_dir():
            continue
        subdirs = sorted((p for p in nvidia.iterdir() if (p / "lib").is_dir()), key=lambda p: (p.name != "cu13", p.name))
        found.extend(str(p / "lib") for p in subdirs)
    return found


_native._cuda_set_search_dirs(nvrtc_dirs())
