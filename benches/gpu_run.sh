#!/usr/bin/env bash
# The GPU run of issue 4, for a machine with an NVIDIA GPU (e.g. an H100 with Python 3.12,
# PyTorch 2.11+cu130, a CUDA 13.0 driver, no Rust and no network).
#
#   bash benches/gpu_run.sh prepare   # here, with network and Rust: wheels into .gpu/wheels
#   bash benches/gpu_run.sh           # there: install, GPU tests, compute-sanitizer, benchmark
#
# "prepare" builds the tvc-rs wheel (manylinux2014, zig) and downloads what the run installs
# offline: pytest, hypothesis, numpy (the tests), and compute-sanitizer 13.0 (the
# nvidia-cuda-sanitizer-api wheel ships the binary). The run writes everything to $OUT
# (default ./gpu-out): pytest logs and JUnit XML, the sanitizer reports, the benchmark table
# and benches/results/cuda-<device>.json. It goes on after a failing step and exits non-zero
# if any step failed.
set -uo pipefail
cd "$(dirname "$0")/.."
root=$PWD
wheels="$root/.gpu/wheels"

if [ "${1:-}" = "prepare" ]; then
  set -e
  mkdir -p "$wheels"
  rm -f "$wheels"/tvc_rs-*.whl
  python3 -m pip install -q ziglang maturin
  maturin build --release --zig --compatibility manylinux2014 --out "$wheels"
  python3 -m pip download -q --only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64 \
    --platform manylinux_2_25_x86_64 --platform manylinux_2_28_x86_64 -d "$wheels" pytest hypothesis numpy "nvidia-cuda-sanitizer-api==13.0.*"
  ls -l "$wheels"
  exit 0
fi

OUT="${OUT:-$root/gpu-out}"
mkdir -p "$OUT"
failed=0
step() { printf '\n=== %s\n' "$*" | tee -a "$OUT/steps.log"; }
record() { local rc=$1; echo "exit $rc: $2" | tee -a "$OUT/steps.log"; [ "$rc" -eq 0 ] || failed=1; }

step "environment"
{ nvidia-smi; python -V; python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0))"; } \
  >"$OUT/environment.txt" 2>&1
cat "$OUT/environment.txt"

step "install (offline, from .gpu/wheels)"
python -m pip install -q --no-index --find-links "$wheels" --force-reinstall --no-deps tvc_rs &&
  python -m pip install -q --no-index --find-links "$wheels" pytest hypothesis numpy "nvidia-cuda-sanitizer-api==13.0.*"
record $? "install"
python -m tvc_rs.cuda --info | tee "$OUT/cuda-info.json"

# The kernels are compiled once here (NVRTC, then the disk cache) so later steps start fast.
export TVC_CACHE_DIR="$OUT/kernel-cache"
python -c "import tvc_rs.cuda as c; c.warmup(0)"
record $? "warm-up (NVRTC compile for this GPU)"

step "GPU tests"
# test_cuda.py imports the float64 references of test_compress.py / test_kv.py (numpy, torch,
# hypothesis only); each case runs on the CPU and on the GPU.
python -m pytest -q -p no:cacheprovider tests/test_cuda.py \
  --junitxml="$OUT/pytest-gpu.xml" -ra 2>&1 | tee "$OUT/pytest-gpu.log"
record "${PIPESTATUS[0]}" "pytest (GPU)"

sanitizer=$(python -c "import pathlib, sys
for p in sys.path:
    for f in pathlib.Path(p or '.').glob('nvidia/*/bin/compute-sanitizer'):
        print(f); raise SystemExit
" 2>/dev/null)
sanitizer=${sanitizer:-$(command -v compute-sanitizer || true)}
if [ -z "$sanitizer" ]; then
  echo "compute-sanitizer not found (install nvidia-cuda-sanitizer-api==13.0.*)" | tee -a "$OUT/steps.log"
  failed=1
else
  # Every CUDA test case under memcheck and racecheck (fewer hypothesis examples: the
  # sanitizers slow kernels down 10-100x). PyTorch's own kernels are checked too; only
  # errors count. --target-processes all: pytest forks nothing, but subprocess tests do.
  for tool in memcheck racecheck; do
    step "compute-sanitizer --tool $tool"
    TVC_FEW_EXAMPLES=1 "$sanitizer" --tool "$tool" --error-exitcode 3 --target-processes all \
      --print-limit 100 --log-file "$OUT/sanitizer-$tool.log" \
      python -m pytest -q -p no:cacheprovider tests/test_cuda.py -x \
      -k "not cpu and not nvrtc and not check_command and not disk_cache and not without" 2>&1 | tee "$OUT/pytest-$tool.log"
    record "${PIPESTATUS[0]}" "compute-sanitizer $tool"
    grep -E "ERROR SUMMARY|RACECHECK SUMMARY" "$OUT/sanitizer-$tool.log" | tail -3
  done
fi

step "benchmark"
python benches/bench_cuda.py 2>&1 | tee "$OUT/bench-cuda.log"
record "${PIPESTATUS[0]}" "benchmark"
cp benches/results/cuda-*.json "$OUT/" 2>/dev/null

step "done (failed=$failed)"
exit $failed
