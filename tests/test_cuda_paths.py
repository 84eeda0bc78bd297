"""Where NVRTC may come from (issue 14): installed packages, $TVC_NVRTC, the system loader; never a
folder relative to the current directory; and the kernel cache's folders private to the user."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys


def test_nvrtc_search_ignores_the_current_directory(tmp_path):
    lib = tmp_path / "nvidia" / "cu13" / "lib"
    lib.mkdir(parents=True)
    (lib / "libnvrtc.so.13").write_bytes(b"not a library")
    code = "import json, tvc_rs._cuda_paths as p; print(json.dumps(p.nvrtc_dirs()))"
    # python -c puts "" (the current directory) first on sys.path.
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                          env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    assert done.returncode == 0, done.stderr
    dirs = json.loads(done.stdout)
    assert all(os.path.isabs(d) for d in dirs)
    assert not any(d.startswith(str(tmp_path)) for d in dirs), dirs


def test_relative_tvc_nvrtc_is_not_loaded(tmp_path):
    lib = tmp_path / "libnvrtc.so.13"
    lib.write_bytes(b"not a library")
    code = "import json, tvc_rs; print(json.dumps(tvc_rs._native._cuda_info()['nvrtc_path']))"
    env = dict(os.environ, TVC_NVRTC="libnvrtc.so.13")
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                          env=env)
    assert done.returncode == 0, done.stderr
    path = json.loads(done.stdout)
    assert path is None or not os.path.realpath(path).startswith(str(tmp_path)), path


def test_cache_folders_are_private(tmp_path):
    root = tmp_path / "cache"
    code = ("import tvc_rs\n"
            "try:\n    tvc_rs._native._cuda_cached_cubin('kv.cu', 80)\n"
            "except RuntimeError as err:\n    print('no nvrtc:', err)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, TVC_CACHE_DIR=str(root)))
    assert done.returncode == 0, done.stderr
    if "no nvrtc" in done.stdout:
        import pytest

        pytest.skip("NVRTC is not installed: nothing compiled, nothing cached")
    for folder in (root, root / "kernels"):
        assert stat.S_IMODE(folder.stat().st_mode) == 0o700, folder
    (cubin,) = list((root / "kernels").iterdir())
    assert cubin.read_bytes().startswith(b"TVC-CUBIN sha256:")
