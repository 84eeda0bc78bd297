"""Tells the native module where PyPI's NVRTC lives: the ``nvidia/*/lib`` directories of the
installed packages (the ``nvidia-cuda-nvrtc`` wheel, which PyTorch's CUDA wheels install), CUDA 13
layouts first. Imported with the package; NVRTC itself is loaded on the first CUDA compile.

Only absolute site directories are searched: never the current directory (``sys.path``'s ``""``
or a relative entry), so that an ``./nvidia/*/lib`` where Python happens to run cannot supply
the library that is loaded into the process."""

from __future__ import annotations

import os
import site
import sys
import sysconfig
from pathlib import Path

from tvc_rs import _native


def _site_dirs() -> list[str]:
    """Installed-package directories: site-packages (and the user's), then other absolute
    ``sys.path`` entries that are not the current directory."""
    dirs: list[str] = []
    try:
        dirs.extend(site.getsitepackages())
    except AttributeError:  # virtualenv's old site.py
        pass
    try:
        dirs.append(site.getusersitepackages())
    except AttributeError:
        pass
    dirs.extend(p for p in (sysconfig.get_paths().get("purelib"), sysconfig.get_paths().get("platlib")) if p)
    cwd = os.path.realpath(os.getcwd())
    dirs.extend(e for e in sys.path if e and os.path.isabs(e) and os.path.realpath(e) != cwd)
    seen: set[str] = set()
    out = []
    for d in dirs:
        if d and os.path.isabs(d) and d not in seen:
            seen.add(d)
            out.append(d)
    return out


def nvrtc_dirs() -> list[str]:
    found: list[str] = []
    for entry in _site_dirs():
        nvidia = Path(entry) / "nvidia"
        if not nvidia.is_dir():
            continue
        subdirs = sorted((p for p in nvidia.iterdir() if (p / "lib").is_dir()), key=lambda p: (p.name != "cu13", p.name))
        found.extend(str((p / "lib").resolve()) for p in subdirs)
    return found


_native._cuda_set_search_dirs(nvrtc_dirs())
