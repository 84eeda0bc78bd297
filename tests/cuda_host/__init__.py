"""The CUDA kernels of kernels/*.cu compiled for the host and run on the CPU (test infrastructure).

``build(file)`` compiles one kernel file with g++ against ``shim.h`` (what CUDA provides: thread
and block indices, shared memory, ``__syncthreads``, warp shuffles, atomics, fp16 / bf16
conversions) and ``harness.cpp`` (every CUDA thread a fiber; blocks on a few OS threads), once per
source / flags hash into a cache directory, and loads it with ctypes. ``Kernels.launch`` runs a
kernel's grid with the same (grid, block, dynamic shared bytes, argument struct) as the Rust
launcher would; ``launches.py`` builds those from tensors as src/cuda/*.rs does.

``TVC_HOST_SANITIZE=1``: compiled with AddressSanitizer and UBSan (out-of-bounds reads and writes of
any buffer, misaligned packed accesses, out-of-range shared-array indices); the Python process must
then start with libasan preloaded (``LD_PRELOAD=$(g++ -print-file-name=libasan.so)``), as
``.ci/cuda-host.sh`` does. ``TVC_HOST_THREADS``: OS threads running blocks (default: the CPUs, at
most 4). ``TVC_HOST_CACHE``: where built libraries are kept (default: the temp directory).
"""

from __future__ import annotations

import collections
import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
KERNEL_DIR = ROOT / "kernels"
SANITIZE = os.environ.get("TVC_HOST_SANITIZE", "") not in ("", "0")
THREADS = int(os.environ.get("TVC_HOST_THREADS", "0")) or min(4, os.cpu_count() or 1)
FILES = {"compress.cu": "TVC_HOST_FILE_COMPRESS", "kv.cu": "TVC_HOST_FILE_KV"}


class KernelError(RuntimeError):
    """A launch the harness refused or a synchronisation error inside a block."""


def compiler() -> str | None:
    return shutil.which(os.environ.get("CXX", "g++"))


def flags(file: str, sizes: dict[str, int]) -> list[str]:
    out = [
        "-std=c++17",
        "-O2",
        "-g",
        "-fPIC",
        "-shared",
        "-pthread",
        "-fvisibility=hidden",
        "-Wall",
        "-Wno-unknown-pragmas",
        "-Wno-maybe-uninitialized",
        "-fno-extern-tls-init",
        f"-D{FILES[file]}",
        f"-I{KERNEL_DIR}",
        f"-I{HERE}",
    ]
    # The kernels' own layout check: the ctypes structs must have the .cu structs' sizes.
    out += [f"-DTVC_SIZEOF_{name}={size}" for name, size in sorted(sizes.items())]
    if SANITIZE:
        out += ["-fsanitize=address,undefined", "-fno-sanitize-recover=all", "-fno-omit-frame-pointer"]
    return out


def build(file: str, sizes: dict[str, int]) -> Path:
    """The host library of kernels/<file>, compiled unless an identical build is cached."""
    cxx = compiler()
    if cxx is None:
        raise KernelError("no C++ compiler (g++) found: the host build of the CUDA kernels needs one")
    fl = flags(file, sizes)
    sources = [KERNEL_DIR / file, KERNEL_DIR / "tvc_common.cuh", HERE / "shim.h", HERE / "harness.cpp"]
    version = subprocess.run([cxx, "--version"], capture_output=True, text=True).stdout
    key = hashlib.sha256("\0".join([version, *fl] + [p.read_text() for p in sources]).encode()).hexdigest()[:20]
    cache = Path(os.environ.get("TVC_HOST_CACHE") or Path(tempfile.gettempdir()) / "tvc-cuda-host")
    cache.mkdir(parents=True, exist_ok=True)
    lib = cache / f"{Path(file).stem}-{key}.so"
    if not lib.exists():
        tmp = cache / f".{lib.name}.{os.getpid()}.tmp"
        run = subprocess.run([cxx, *fl, str(HERE / "harness.cpp"), "-o", str(tmp)], capture_output=True, text=True)
        if run.returncode != 0:
            raise KernelError(f"g++ failed on {file}:\n{run.stderr[-6000:]}")
        os.replace(tmp, lib)  # atomic: concurrent sessions see a whole library or none
    return lib


def kernel_names(file: str) -> set[str]:
    """Every `extern "C"` kernel the .cu file defines (its macros expanded by the preprocessor)."""
    run = subprocess.run(
        [compiler(), "-E", "-P", "-x", "c++", *flags(file, {})[:1], f"-D{FILES[file]}", f"-I{KERNEL_DIR}", f"-I{HERE}",
         "-include", str(HERE / "shim.h"), str(KERNEL_DIR / file)],
        capture_output=True, text=True, check=True,
    )
    import re

    return set(re.findall(r'extern "C" __attribute__\(\(visibility\("default"\)\)\) void\s+(\w+)\s*\(', run.stdout))


class Kernels:
    """One loaded kernel file: ``launch(name, grid, block, shared, args)``; counts launches."""

    def __init__(self, file: str, sizes: dict[str, int]):
        self.file = file
        self.path = build(file, sizes)
        try:
            self.lib = ctypes.CDLL(str(self.path))
        except OSError as e:
            hint = " (a sanitized build: start Python with LD_PRELOAD=$(g++ -print-file-name=libasan.so))" if SANITIZE else ""
            raise KernelError(f"cannot load {self.path}: {e}{hint}") from e
        lib = self.lib
        lib.tvc_host_kernel_count.restype = ctypes.c_int
        lib.tvc_host_kernel_name.restype = ctypes.c_char_p
        lib.tvc_host_kernel_name.argtypes = [ctypes.c_int]
        lib.tvc_host_launch.restype = ctypes.c_int
        lib.tvc_host_launch.argtypes = [ctypes.c_char_p] + [ctypes.c_uint] * 6 + [
            ctypes.c_size_t, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_char_p, ctypes.c_size_t]
        self.names = {lib.tvc_host_kernel_name(i).decode() for i in range(lib.tvc_host_kernel_count())}
        self.launched: collections.Counter[str] = collections.Counter()

    def launch(self, name: str, grid, block: int, shared: int, args: ctypes.Structure) -> None:
        grid = tuple(grid) + (1,) * (3 - len(grid))
        err = ctypes.create_string_buffer(2048)
        rc = self.lib.tvc_host_launch(name.encode(), *(int(g) for g in grid), int(block), 1, 1, int(shared),
                                      ctypes.addressof(args), ctypes.sizeof(args), THREADS, err, len(err))
        if rc != 0:
            raise KernelError(err.value.decode())
        self.launched[name] += 1
