"""Markdown tables of the recorded benchmark results (benches/results/*.json), for the README.

    python benches/report.py            # every table
    python benches/report.py kv hf      # some of them

Reads only what the benchmarks wrote; run them first (python benches/bench_<name>.py).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def load(name: str) -> dict:
    return json.loads((RESULTS / f"{name}.json").read_text())


def fmt(value, digits: int = 3) -> str:
    if isinstance(value, float):
        if value >= 100:
            return f"{value:,.0f}"
        return f"{value:.{digits}g}"
    return str(value)


def table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(fmt(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def when(d: dict) -> str:
    load_avg = d.get("load_average") or d.get("load_average_before")
    extra = f", load average {load_avg[0]:.1f}" if load_avg else ""
    m = d["machine"]
    return f"_{m['cpus']} CPUs, torch {m.get('torch', '-')}, measured {d['measured']}{extra}._"


def triggers() -> str:
    d = load("triggers-cpu")
    rows = [[r["case"], r["ns_per_token"], f"{r['speedup']:.0f}x"] for r in d["rows"]]
    return table(["case", "ns per token per stream", "vs Python"], rows) + "\n\n" + when(d)


def rope() -> str:
    d = load("rope-cpu")
    w = d["workload"]
    rows = [[r["implementation"], r["ms"], f"{r['speedup']:.0f}x" if r["speedup"] >= 2 else f"{r['speedup']:.2f}x"]
            for r in d["rows"]]
    head = f"batch {w['batch']} x {w['seq']} tokens, {w['images_per_row']} images per row ({w['padding']} padding):\n\n"
    return head + table(["implementation", "ms", "vs transformers"], rows) + "\n\n" + when(d)


def compress() -> str:
    out = []
    for name in ("compress-cpu", "compress-cpu-1-threads"):
        if not (RESULTS / f"{name}.json").exists():
            continue
        d = load(name)
        rows = []
        for r in d["rows"]:
            speed = r.get("speedup (best)")
            rows.append([r["op"], r["shape"], r["impl"], r["best ms"], r["ms"],
                         f"{speed:.2f}x" if speed is not None else "", f"{100 * r['of memcpy']:.0f}%"])
        threads = d["machine"].get("torch_threads")
        out.append(f"{threads} thread(s), memcpy {d['memcpy_bandwidth_GBps']:.1f} GB/s in the same run:\n\n"
                   + table(["op", "shape", "implementation", "best ms", "median ms", "vs torch (best)",
                            "of memcpy (median)"], rows) + "\n\n" + when(d))
    return "\n\n".join(out)


def kv() -> str:
    d = load("kv-cpu")
    s = d["shape"]
    rows = [[r["operation"], r["variant"], r["torch s"], r["tvc_rs s"], f"{r['speedup']:.0f}x",
             f"{100 * r['tvc_rs share of memcpy']:.0f}%"] for r in d["rows"]]
    head = (f"cache of {s['seq']} tokens, {s['layers']} layers x {s['kv_heads']} KV heads x {s['head_dim']} dims, "
            f"{s['dtype']}; memcpy {d['memcpy_bandwidth_bytes_per_s'] / 1e9:.1f} GB/s in the same run:\n\n")
    return head + table(["operation", "variant", "torch s", "tvc_rs s", "speedup", "of memcpy"], rows) + "\n\n" + when(d)


def hf() -> str:
    d = load("hf-cpu")
    cal = [r for r in d["rows"] if r["table"] == "calibration"]
    e2e = [r for r in d["rows"] if r["table"] == "end_to_end"]
    rows = [[r["context"], r["relocate_ms"], r["append_ms"], r["kv_ms"], f"{r['relocate/append']:.0f}x",
             f"{r['relocate/kv']:.0f}x"] for r in cal]
    text = (f"one calibration, random {d['parameters'] / 1e6:.0f}M-parameter Qwen2-VL, {d['dtype']} on {d['device']} "
            f"({cal[0]['image_tokens']} image tokens):\n\n"
            + table(["context tokens", "relocate ms", "append ms", "kv ms", "relocate / append", "relocate / kv"], rows))
    rows = [[r["run"], r["tokens"], r["calibrations"], r["tokens_per_s"], f"{r['vs_plain']:.2f}"] for r in e2e]
    return text + "\n\n" + table(["run", "tokens", "calibrations", "tokens/s", "vs plain"], rows) + "\n\n" + when(d)


def vllm() -> str:
    d = load("vllm-cpu")
    rows = [[r["runner"], r["batch"], r["requests"], r["tvc_rs_us_per_step"], r["python_us_per_step"],
             f"{r['speedup']:.1f}x"] for r in d["rows"]]
    return (f"processor cost per decoding step (median of {d['steps']} steps, best of {d['repeat']} repetitions), "
            f"vLLM {d['vllm']}:\n\n"
            + table(["runner", "batch", "TVC requests", "tvc_rs us/step", "Python us/step", "speedup"], rows)
            + "\n\n" + when(d))


def vllm_engine() -> str:
    d = load("vllm-engine-cpu")
    if (RESULTS / "vllm-engine-cpu-kv.json").exists():  # the kv-mode run (calibration and answer cases only)
        kv = load("vllm-engine-cpu-kv")
        d = {**d, "rows": [r for r in d["rows"] if r["case"] == "throughput"] + kv["rows"]}
        return _vllm_engine(d) + "\n\nCalibration and answer figures: " + when(kv)
    return _vllm_engine(d)


def _vllm_engine(d: dict) -> str:
    through = [[r["batch"], r["requests"], r["tokens_per_s"], f"{r['vs_plain']:.2f}"] for r in d["rows"] if r["case"] == "throughput"]
    cal = [[r["context_tokens"], r["mode"], r["image_tokens"], r["continuation_prompt_tokens"], r["prefilled_tokens"],
            r["prefill_step_ms"], r["decode_step_ms"], r["calibration_ms"],
            f"{r['vs_append']:.2f}" if "vs_append" in r else "", f"{r['relocate_over_this']:.1f}x" if "relocate_over_this" in r else ""]
           for r in d["rows"] if r["case"] == "calibration"]
    answers = [[r["mode"], r["requests"], r["calibrations_each"], r["context_tokens"], r["tokens_per_s"], r["continuation_prefilled_tokens"]]
               for r in d["rows"] if r["case"] == "answers"]
    return (f"vLLM {d['vllm']} (CPU build), {d['model']}; median of {d['repeat']} runs:\n\n"
            + table(["batch", "requests", "output tokens/s", "vs no TVC"], through) + "\n\n"
            + table(["context tokens", "mode", "image tokens injected", "continuation prompt", "prefilled (engine counters)",
                     "prefill step ms", "decode step ms", "calibration ms", "vs append", "relocate / this"], cal)
            + ("\n\n" + table(["mode", "requests", "calibrations each", "context tokens", "output tokens/s",
                                 "continuation tokens prefilled (all)"], answers) if answers else "")
            + "\n\n" + when(d))


def dvr() -> str:
    d = load("dvr-cpu")
    rows = [[r["what"], r.get("llamafactory_samples_per_s", ""), r["tvc_rs_samples_per_s"],
             f"{r['speedup']:.1f}x" if "speedup" in r else ""] for r in d["rows"]]
    return (f"LLaMA-Factory {d['llamafactory']}, transformers {d['transformers']}:\n\n"
            + table(["what", "LLaMA-Factory samples/s", "tvc_rs samples/s", "speedup"], rows) + "\n\n" + when(d))


def cuda() -> str:
    out = []
    for path in sorted(RESULTS.glob("cuda-*.json")):
        if path.stem == "cuda-check":
            continue
        out.append(f"{path.name}: see the file (device and versions recorded there).")
    return "\n".join(out) or "No GPU measurement recorded yet."


TABLES = {"triggers": triggers, "rope": rope, "compress": compress, "kv": kv, "hf": hf, "vllm": vllm,
          "vllm_engine": vllm_engine, "dvr": dvr, "cuda": cuda}

if __name__ == "__main__":
    for name in sys.argv[1:] or TABLES:
        print(f"### {name}\n\n{TABLES[name]()}\n")
