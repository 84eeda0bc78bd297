#!/usr/bin/env bash
# The vLLM plugin's tests against the real vLLM 0.33, in its own environment (.venv-vllm: vLLM
# pins its own torch and transformers). .ci/run calls it after the main tests, once the wheel is
# in dist/. The environment and uv's cache are reused: after the first run (a ~9 GB install and a
# one-off bytecode compilation) a run reinstalls the wheel and runs the tests, about 2 minutes.
# Real assets are read from $TVC_ASSETS (default ../shared/assets).
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
source .ci/common.sh
export TVC_ASSETS="${TVC_ASSETS:-$(cd "$root/.." && pwd)/shared/assets}"

vllm_version=0.33.0
venv="$root/.venv-vllm"
stamp="$venv/.installed-vllm-$vllm_version"

command -v uv >/dev/null 2>&1 || python3 -m pip install -q --disable-pip-version-check uv
if [ ! -f "$stamp" ]; then
    [ -x "$venv/bin/python" ] || uv venv -q -p python3.11 "$venv"
    VIRTUAL_ENV="$venv" uv pip install -q "vllm==$vllm_version" "pytest>=8" "hypothesis>=6.100" numpy pillow
    compile_bytecode "$venv"
    touch "$stamp"
fi

install_built_wheel "$venv"

# python/ is not on sys.path: `import tvc_rs` is the installed wheel, with its entry point.
"$venv/bin/python" -m pytest -q tests/test_vllm.py tests/test_families_vllm.py
