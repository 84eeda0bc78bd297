"""Shared helpers of the benchmarks: timing, the machine's copy bandwidth, result files."""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Callable

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"


def time_call(fn: Callable[[], object], *, repeat: int = 20, warmup: int = 3, min_seconds: float = 0.2) -> float:
    """Median seconds per call of ``fn`` (after warm-up); repeats until ``min_seconds`` have passed."""
    for _ in range(warmup):
        fn()
    samples: list[float] = []
    started = time.perf_counter()
    while len(samples) < repeat or time.perf_counter() - started < min_seconds:
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
        if len(samples) >= 10 * repeat:
            break
    return statistics.median(samples)


def memcpy_bandwidth(nbytes: int = 512 << 20) -> float:
    """Bytes per second of a large host copy (read + write counted), measured now on this machine."""
    src = np.ones(nbytes, dtype=np.uint8)
    dst = np.empty_like(src)
    seconds = time_call(lambda: np.copyto(dst, src), repeat=5, warmup=1)
    return 2 * nbytes / seconds


def machine() -> dict:
    """What the figures were measured on."""
    info = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "numpy": np.__version__,
    }
    try:
        import torch

        info["torch"] = torch.__version__
        info["torch_threads"] = torch.get_num_threads()
    except ImportError:
        pass
    try:
        import tvc_rs

        info["tvc_rs"] = tvc_rs.__version__
    except ImportError:
        pass
    return info


def write_results(name: str, rows: list[dict], **extra) -> Path:
    """Write ``benches/results/<name>.json`` with the machine description and the rows."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    payload = {"machine": machine(), "measured": time.strftime("%Y-%m-%d %H:%M:%S"), **extra, "rows": rows}
    path.write_text(json.dumps(payload, indent=2) + "\n")
    return path


def markdown_table(rows: list[dict], columns: list[str]) -> str:
    """A markdown table of ``rows`` restricted to ``columns``."""
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        cells = []
        for col in columns:
            value = row.get(col, "")
            cells.append(f"{value:.4g}" if isinstance(value, float) else str(value))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
