#!/usr/bin/env bash
# The CUDA compile check, no GPU needed (issue 4): NVRTC 13.0.x compiles every kernel of
# kernels/*.cu for sm_80 and sm_90, and ptxas 13.0 (the nvidia-cuda-nvcc wheel) reports each
# kernel's registers, shared memory, stack and spills. Fails on a compile error or a spill.
# Needs the wheel installed in .venv (.ci/run builds and installs it first); .ci/run calls it.
set -euo pipefail
cd "$(dirname "$0")/.."
export VIRTUAL_ENV="$PWD/.venv" PATH="$PWD/.venv/bin:$PATH"

# NVRTC comes with torch's CUDA 13 wheels (cuda-toolkit[nvrtc]); keep it at 13.0.x, the CUDA
# version of the GPU machines' driver. --no-deps: torch pins the CUDA runtime packages.
nvrtc=$(python -c "import importlib.metadata as m; print(m.version('nvidia-cuda-nvrtc'))" 2>/dev/null || true)
case "$nvrtc" in
  13.0.*) ;;
  *) uv pip install -q --no-deps "nvidia-cuda-nvrtc==13.0.*" ;;
esac
# ptxas only (nvcc's other parts are not used): the wheel's bin/ptxas.
uv pip install -q --no-deps "nvidia-cuda-nvcc==13.0.*"

python -m tvc_rs.cuda --info --check --arch 80 90
