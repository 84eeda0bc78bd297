#!/usr/bin/env bash
# The vLLM plugin's tests against the real vLLM 0.33, in its own environment (.venv-vllm: vLLM
# pins its own torch and transformers). .ci/run calls it after the main tests, once the wheel is
# in dist/. The environment and uv's cache are reused: after the first run (a ~9 GB install and a
# one-off bytecode compilation) a run reinstalls the wheel and runs the tests, about 2 minutes.
# Real assets are read from $TVC_ASSETS (default ../shared/assets).
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
export TVC_ASSETS="${TVC_ASSETS:-$(cd "$root/.." && pwd)/shared/assets}"

vllm_version=0.33.0
venv="$root/.venv-vllm"
stamp="$venv/.installed-vllm-$vllm_version"

command -v uv >/dev/null 2>&1 || python3 -m pip install -q --disable-pip-version-check uv
if [ ! -f "$stamp" ]; then
    [ -x "$venv/bin/python" ] || uv venv -q -p python3.11 "$venv"
    VIRTUAL_ENV="$venv" uv pip install -q "vllm==$vllm_version" "pytest>=8" "hypothesis>=6.100" numpy pillow
    # Importing vLLM compiles thousands of modules; with PYTHONDONTWRITEBYTECODE set that would
    # happen on every run, so write the bytecode once here.
    "$venv/bin/python" -m compileall -q -j 0 \
        "$venv"/lib/python3.11/site-packages/{vllm,torch,transformers,tokenizers} >/dev/null 2>&1 || true
    touch "$stamp"
fi

shopt -s nullglob
wheels=(dist/tvc_rs-*.whl)
if [ ${#wheels[@]} -ne 1 ]; then
    echo "vllm.sh: expected one wheel in dist/ (built by .ci/run), found ${#wheels[@]}" >&2
    exit 1
fi
VIRTUAL_ENV="$venv" uv pip install -q --reinstall --no-deps "${wheels[0]}"

# python/ is not on sys.path: `import tvc_rs` is the installed wheel, with its entry point.
"$venv/bin/python" -m pytest -q tests/test_vllm.py
