"""Reflection-trigger detection: nanoseconds per token per stream, tvc_rs against the Python
baseline a plain logits processor would use (incremental decode with `tokenizers`'
DecodeStream plus a regex over the recent text), on real long-CoT traces, in one run.

    python benches/bench_triggers.py [--steps 2000]
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer
from tokenizers.decoders import DecodeStream

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import markdown_table, write_results  # noqa: E402

import tvc_rs  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
ASSETS = Path(__import__("os").environ.get("TVC_ASSETS", ROOT.parent / "shared" / "assets"))


class PythonBaseline:
    """One stream watched the plain-Python way: DecodeStream for the new text of each token, and
    one regex (all phrases) over a tail of recent text to find matches completed by it."""

    def __init__(self, tokenizer: Tokenizer, phrases: list[str]):
        self.tokenizer = tokenizer
        self.decoder = DecodeStream(skip_special_tokens=False)
        alternation = "|".join(re.escape(p) for p in sorted(phrases, key=len, reverse=True))
        self.pattern = re.compile(r"(?<!\w)(?:" + alternation + r")(?!\w)", re.IGNORECASE)
        self.keep = max(len(p) for p in phrases) + 2
        self.tail = ""
        self.hits = 0

    def push(self, token: int) -> bool:
        chunk = self.decoder.step(self.tokenizer, token)
        if not chunk:
            return False
        text = self.tail + chunk
        # A match is new when it ends inside the new chunk (its boundary needs one more char).
        hit = False
        for m in self.pattern.finditer(text, max(0, len(self.tail) - self.keep)):
            if m.end() > len(self.tail) - 1 and m.end() < len(text):
                hit = True
        self.tail = text[-(self.keep + 1):]
        self.hits += hit
        return hit


def trace_tokens(tokenizer: Tokenizer) -> list[list[int]]:
    streams = []
    for name in ["qwen_blog_qvq72b_qwq32b_official.jsonl", "marco_o1_cot_demo.jsonl", "emma_gemini2_flash_thinking_exp_1219.jsonl"]:
        path = ASSETS / "traces" / name
        for line in path.open():
            streams.append(tokenizer.encode(json.loads(line)["response"], add_special_tokens=False).ids)
    return streams


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=2000, help="decoding steps per batch measurement")
    parser.add_argument("--batch", type=int, default=256)
    args = parser.parse_args()

    tokenizer = Tokenizer.from_file(str(ASSETS / "qwen2-vl" / "tokenizer.json"))
    detector = tvc_rs.ReflectionDetector(ASSETS / "qwen2-vl" / "tokenizer.json")
    streams = trace_tokens(tokenizer)
    long_stream = [t for s in streams[:40] for t in s][:50_000]
    rows = []

    # Single stream.
    t0 = time.perf_counter()
    baseline = PythonBaseline(tokenizer, detector.phrases)
    for t in long_stream:
        baseline.push(t)
    base_ns = (time.perf_counter() - t0) / len(long_stream) * 1e9

    stream = detector.stream()
    t0 = time.perf_counter()
    for t in long_stream:
        stream.push(t)
    push_ns = (time.perf_counter() - t0) / len(long_stream) * 1e9

    ids = np.array(long_stream, dtype=np.int64)
    best = float("inf")
    for _ in range(5):
        stream = detector.stream()
        t0 = time.perf_counter()
        stream.push_many(ids)
        best = min(best, time.perf_counter() - t0)
    many_ns = best / len(long_stream) * 1e9
    rows.append({"case": "1 stream, Python baseline (DecodeStream + regex)", "ns_per_token": base_ns, "speedup": 1.0})
    rows.append({"case": "1 stream, tvc_rs push() per token from Python", "ns_per_token": push_ns, "speedup": base_ns / push_ns})
    rows.append({"case": "1 stream, tvc_rs push_many() (Rust loop)", "ns_per_token": many_ns, "speedup": base_ns / many_ns})

    # A batch of streams, one token per stream per step.
    n = args.batch
    steps = min(args.steps, min(len(s) for s in streams if len(s) >= args.steps) if any(len(s) >= args.steps for s in streams) else args.steps)
    long_enough = [s for s in streams if len(s) >= steps] or streams
    batch_ids = np.array([long_enough[i % len(long_enough)][:steps] for i in range(n)], dtype=np.int64).T.copy()

    baselines = [PythonBaseline(tokenizer, detector.phrases) for _ in range(n)]
    t0 = time.perf_counter()
    for step in range(steps):
        row = batch_ids[step].tolist()
        for b, t in zip(baselines, row):
            b.push(t)
    base_batch_ns = (time.perf_counter() - t0) / (steps * n) * 1e9

    best = float("inf")
    for _ in range(3):
        batch = detector.batch(n)
        for s in range(n):
            batch.add(s)
        t0 = time.perf_counter()
        for step in range(steps):
            batch.step(batch_ids[step])
        best = min(best, time.perf_counter() - t0)
    batch_step_us = best / steps * 1e6
    batch_ns = best / (steps * n) * 1e9
    rows.append({"case": f"{n} streams, Python baseline", "ns_per_token": base_batch_ns, "speedup": 1.0})
    rows.append({"case": f"{n} streams, tvc_rs StreamBatch.step() ({batch_step_us:.1f} us per step)", "ns_per_token": batch_ns,
                 "speedup": base_batch_ns / batch_ns})

    print(markdown_table(rows, ["case", "ns_per_token", "speedup"]))
    path = write_results("triggers-cpu", rows, tokens_single=len(long_stream), batch=n, steps=steps,
                         phrases=len(detector.phrases))
    print(f"\nwrote {path.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
