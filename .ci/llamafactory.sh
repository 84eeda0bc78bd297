#!/usr/bin/env bash
# The LLaMA-Factory plugin's tests in their own environment, .venv-lf (LLaMA-Factory 0.9.5 pins
# transformers <= 5.6; the main .venv has 5.24). Run after .ci/run has built dist/tvc_rs-*.whl:
# creates or reuses .venv-lf with uv (requirements/llamafactory.txt), installs that wheel, and runs
# tests/test_llamafactory.py with the real assets ($TVC_ASSETS, default ../shared/assets).
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
export TVC_ASSETS="${TVC_ASSETS:-$(cd "$root/.." && pwd)/shared/assets}"

command -v uv >/dev/null 2>&1 || python3 -m pip install -q --disable-pip-version-check uv
[ -x .venv-lf/bin/python ] || uv venv -q -p python3.11 .venv-lf
export VIRTUAL_ENV="$root/.venv-lf" PATH="$root/.venv-lf/bin:$PATH"
uv pip install -q -r requirements/llamafactory.txt

shopt -s nullglob
wheels=(dist/tvc_rs-*.whl)
if [ ${#wheels[@]} -ne 1 ]; then
    echo ".ci/llamafactory.sh: expected one built wheel dist/tvc_rs-*.whl, found ${#wheels[@]} (run .ci/run first)" >&2
    exit 2
fi
uv pip install -q --reinstall --no-deps "${wheels[0]}"

# The test launches `tvc-rs train` and torchrun from .venv-lf/bin (on PATH above).
python -m pytest -q tests/test_llamafactory.py
