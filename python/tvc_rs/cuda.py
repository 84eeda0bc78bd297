"""The CUDA backend: runtime information, warm-up, and the no-GPU compile check.

Every public function of tvc_rs (``pool_visual_tokens``, ``rerotate_keys``, ...) runs on the GPU
when its main tensor is a torch CUDA tensor, with the same arguments, checks and results as on
the CPU; outputs are torch tensors on the same device, work is queued on
``torch.cuda.current_stream()`` of that device. The kernels (``kernels/*.cu`` in the source
tree, embedded in the library) are compiled by NVRTC for the device's architecture on first use
and cached on disk (``$TVC_CACHE_DIR``, else ``~/.cache/tvc-rs``).

Where NVRTC comes from, first found wins: ``$TVC_NVRTC`` (a ``libnvrtc.so*`` file or its
directory), the ``nvidia/*/lib`` directories of ``sys.path`` (the ``nvidia-cuda-nvrtc`` wheel,
which PyTorch's CUDA wheels install), ``$CUDA_HOME`` / ``$CUDA_PATH``, ``/usr/local/cuda``, then
the dynamic loader's path. The driver is ``libcuda.so.1``. Without either, the package imports
and works on the CPU; CUDA calls raise ``RuntimeError`` saying what is missing.

``python -m tvc_rs.cuda --check`` compiles every kernel for sm_80 and sm_90 (no GPU needed) and
prints each kernel's registers, shared memory, stack and spills; it exits with status 1 on a
compile error or a spill.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Optional, Sequence

from tvc_rs import _cuda_paths, _native  # noqa: F401 (_cuda_paths: NVRTC search directories)

__all__ = ["is_available", "info", "warmup", "check"]


def info() -> dict[str, Any]:
    """What the runtime finds: driver version (or the error), devices, NVRTC path and version
    (or the error), supported architectures, cache directory. Loads NVRTC and the driver."""
    return _native._cuda_info()


def is_available() -> bool:
    """True when a CUDA driver, at least one device and NVRTC are present."""
    found = info()
    return bool(found["device_count"]) and found["nvrtc_path"] is not None


def warmup(device: int = 0) -> None:
    """Compile (or load from the disk cache) and load every kernel on ``cuda:<device>`` now,
    rather than on first use."""
    _native._cuda_warmup(device)


# ------------------------------------------------------------------ the compile check


def _ptxas_version(path: str) -> Optional[tuple[int, int]]:
    try:
        out = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    match = re.search(r"release (\d+)\.(\d+)", out)
    return (int(match.group(1)), int(match.group(2))) if match else None


def find_ptxas(nvrtc_version: Optional[Sequence[int]] = None) -> Optional[str]:
    """A standalone ptxas at least as new as NVRTC (older ones reject its PTX): ``$TVC_PTXAS``,
    the ``nvidia-cuda-nvcc`` wheel's (``nvidia/*/bin/ptxas`` on ``sys.path``), then ``PATH``."""
    candidates = [os.environ.get("TVC_PTXAS")]
    for entry in sys.path:
        nvidia = Path(entry or ".") / "nvidia"
        if nvidia.is_dir():
            candidates += [str(p) for p in sorted(nvidia.glob("*/bin/ptxas"))]
    candidates.append(shutil.which("ptxas"))
    for path in candidates:
        if not path or not os.access(path, os.X_OK):
            continue
        version = _ptxas_version(path)
        if version is not None and (nvrtc_version is None or version >= tuple(nvrtc_version[:2])):
            return path
    return None


def check(archs: Sequence[int] = (80, 90), ptxas: Optional[str] = "auto", out=sys.stdout) -> dict[str, Any]:
    """Compile every kernel file for each architecture and collect ptxas' resource report.

    ``ptxas``: "auto" (a standalone ptxas when one at least as new as NVRTC is installed, e.g. by
    ``pip install nvidia-cuda-nvcc==13.0.*``, else the ptxas inside NVRTC via
    ``--ptxas-options=-v``), a path, or None (NVRTC's only). Returns a dict with the NVRTC used,
    the report tool, every kernel's numbers, and ``errors`` (compile errors and spills); prints a
    table to ``out``.
    """
    runtime = info()
    if runtime["nvrtc_path"] is None:
        raise RuntimeError(runtime["nvrtc_error"])
    if ptxas == "auto":
        ptxas = find_ptxas(runtime["nvrtc_version"])
    tool = "ptxas (NVRTC --ptxas-options=-v)"
    if ptxas:
        tool = f"{ptxas} (release {'.'.join(map(str, _ptxas_version(ptxas) or ()))})"
    result: dict[str, Any] = {
        "nvrtc": {"path": runtime["nvrtc_path"], "version": list(runtime["nvrtc_version"])},
        "report_tool": tool,
        "kernels": [],
        "errors": [],
    }
    for file in runtime["kernel_files"]:
        for arch in archs:
            try:
                _cubin, log, ptx = _native._cuda_compile(file, arch, ptx=bool(ptxas))
            except RuntimeError as err:
                result["errors"].append(f"{file} sm_{arch}: compile error: {err}")
                continue
            if ptxas:
                log = _run_ptxas(ptxas, ptx, arch, file, result["errors"])
                if log is None:
                    continue
            for kernel in _native._cuda_parse_ptxas(log):
                kernel.update(file=file, arch=f"sm_{arch}")
                result["kernels"].append(kernel)
                if kernel["spill_store_bytes"] or kernel["spill_load_bytes"]:
                    result["errors"].append(
                        f"{file} sm_{arch} {kernel['kernel']}: spills {kernel['spill_store_bytes']} bytes stored, "
                        f"{kernel['spill_load_bytes']} bytes loaded"
                    )
    _print_report(result, out)
    return result


def _run_ptxas(ptxas: str, ptx: bytes, arch: int, file: str, errors: list[str]) -> Optional[str]:
    with tempfile.TemporaryDirectory(prefix="tvc-ptxas-") as tmp:
        source = Path(tmp) / f"{Path(file).stem}.ptx"
        source.write_bytes(ptx.rstrip(b"\0"))
        run = subprocess.run(
            [ptxas, "-v", f"--gpu-name=sm_{arch}", "-o", str(Path(tmp) / "out.cubin"), str(source)],
            capture_output=True,
            text=True,
        )
    if run.returncode != 0:
        errors.append(f"{file} sm_{arch}: ptxas failed ({run.returncode}): {run.stderr.strip()}")
        return None
    return run.stdout + run.stderr


def _print_report(result: dict[str, Any], out) -> None:
    nvrtc = result["nvrtc"]
    print(f"NVRTC {'.'.join(map(str, nvrtc['version']))} at {nvrtc['path']}; report: {result['report_tool']}", file=out)
    print(f"{'file':<12} {'arch':<6} {'kernel':<24} {'regs':>5} {'smem B':>7} {'stack B':>8} {'spill st/ld B':>14}", file=out)
    for k in result["kernels"]:
        spills = f"{k['spill_store_bytes']}/{k['spill_load_bytes']}"
        print(
            f"{k['file']:<12} {k['arch']:<6} {k['kernel']:<24} {k['registers']:>5} {k['shared_bytes']:>7} {k['stack_bytes']:>8} {spills:>14}",
            file=out,
        )
    for error in result["errors"]:
        print(f"ERROR: {error}", file=out)
    print(f"{len(result['kernels'])} kernels, {len(result['errors'])} errors", file=out)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tvc_rs.cuda", description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="compile every kernel (no GPU needed) and report resources")
    parser.add_argument("--arch", type=int, nargs="+", default=[80, 90], help="architectures to compile for (default: 80 90)")
    parser.add_argument("--ptxas", default="auto", help="ptxas to report with: 'auto', a path, or 'none' (NVRTC's own)")
    parser.add_argument("--json", type=Path, help="also write the report as JSON to this file")
    parser.add_argument("--info", action="store_true", help="print what the runtime finds (driver, devices, NVRTC, cache)")
    args = parser.parse_args(argv)
    if args.info or not args.check:
        print(json.dumps(info(), indent=2))
        if not args.check:
            return 0
    try:
        result = check(args.arch, None if args.ptxas == "none" else args.ptxas)
    except RuntimeError as err:
        print(f"ERROR: {err}", file=sys.stderr)
        return 1
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 1 if result["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
