#!/usr/bin/env bash
# The CUDA kernels on the host, sanitized (issue 13): tests/test_cuda_host.py with the kernels
# built with AddressSanitizer and UBSan (tests/cuda_host), so that an out-of-bounds read or write
# of any buffer, shared memory past a launch's size, an out-of-range index into a shared array or a
# misaligned 16-byte access fails the run (a stand-in for compute-sanitizer memcheck). The plain
# build runs in the main pytest step. Needs g++ and .venv (.ci/run installs the wheel first).
set -euo pipefail
cd "$(dirname "$0")/.."
export VIRTUAL_ENV="$PWD/.venv" PATH="$PWD/.venv/bin:$PATH"

asan=$(g++ -print-file-name=libasan.so)
[ -f "$asan" ] || { echo "libasan.so not found (g++ -print-file-name=libasan.so gave $asan)" >&2; exit 1; }
# detect_leaks=0: Python and torch keep memory until exit by design; the kernels allocate none.
# --capture=sys: a sanitizer report (written to fd 2 before the abort) reaches the log.
LD_PRELOAD="$asan" ASAN_OPTIONS=detect_leaks=0:abort_on_error=1 UBSAN_OPTIONS=print_stacktrace=1 \
  TVC_HOST_SANITIZE=1 TVC_HOST_EXAMPLES="${TVC_HOST_EXAMPLES:-10}" \
  python -m pytest -q -p no:cacheprovider --capture=sys tests/test_cuda_host.py
