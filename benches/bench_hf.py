"""PVC with transformers: cost of one calibration per mode against context length, and end-to-end
decoding speed with PVC against plain ``model.generate``.

A random-weight Qwen2-VL model (transformers' own class, created in memory on the device) with the
real tokenizer and processor files from the assets and a real image:

- ``--shape cpu`` (default): 6 decoder layers, hidden 512, 8 heads (head_dim 64), 2 KV heads,
  MLP 1536, M-RoPE [8, 12, 12], Qwen's 151,936-token vocabulary (tied embeddings); a one-block
  vision tower (the tower runs once per question and is not part of a calibration). 18 M
  parameters in the decoder layers: enough for the prefill cost to show on a 2-core CPU while the
  whole run takes minutes.
- ``--shape 2b``: Qwen2-VL-2B's shape (28 layers, hidden 1536, 12 heads, 2 KV heads, MLP 8960,
  M-RoPE [16, 24, 24], the 32-block vision tower), for ``--device cuda`` (bfloat16).

1. Calibration cost. For each context length (1k, 4k, 8k tokens: the prompt with its image plus
   real reasoning text from the assets' traces), the session is prefilled once, then for each mode
   the state is restored and ``PVCSession.calibrate()`` timed (4x4 pooled image; the median of
   ``--repeats`` runs). ``relocate`` re-encodes everything; ``append`` prefills bridge + image;
   ``kv`` evicts the image, re-rotates the rest of the cache (tvc-rs: the CPU kernels, or kernels/kv.cu on
   CUDA) and prefills bridge + image.
2. End to end. ``--new-tokens`` tokens after the prompt: plain ``model.generate`` (no PVC) against
   ``tvc_rs.hf.generate`` with no calibration (the detector and segment machinery only) and with a
   calibration every ``--period`` tokens in each mode. Tokens per second count the model's own
   tokens; every run generates exactly that many (``min_new_tokens``).

3. ``--layout``: only the sequence layout step (ids and M-RoPE positions on the host) at
   ``--lengths``, a calibration adding bridge + pooled image to a two-image prompt: laying out the
   whole sequence again (as before the layout was kept incrementally) against the incremental
   append (append / relocate modes) and kv's (drop the image blocks, append the tail).

Run: python benches/bench_hf.py            (writes benches/results/hf-cpu.json)
     python benches/bench_hf.py --layout --lengths 8192,32768   (writes benches/results/hf-layout-cpu.json)
     python benches/bench_hf.py --device cuda --shape 2b   (writes benches/results/hf-cuda-2b.json)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import markdown_table, write_results  # noqa: E402

from tvc_rs import PVCConfig, PVCSchedule, hf  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
ASSETS = Path(os.environ.get("TVC_ASSETS", ROOT.parent / "shared" / "assets"))

SHAPES = {
    "cpu": dict(
        text=dict(hidden_size=512, intermediate_size=1536, num_hidden_layers=6, num_attention_heads=8,
                  num_key_value_heads=2, mrope_section=[8, 12, 12]),
        vision=dict(depth=1, embed_dim=64, hidden_size=512, num_heads=2, mlp_ratio=2),
    ),
    "2b": dict(
        text=dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                  num_key_value_heads=2, mrope_section=[16, 24, 24]),
        vision=dict(depth=32, embed_dim=1280, hidden_size=1536, num_heads=16, mlp_ratio=4),
    ),
}
MODES = ("relocate", "append", "kv")


def build_model(shape: str, device: str, dtype):
    """A random-weight Qwen2-VL model of ``shape``, created directly on ``device`` in ``dtype``."""
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    spec = SHAPES[shape]
    text = dict(spec["text"])
    section = text.pop("mrope_section")
    config = Qwen2VLConfig(
        text_config=dict(vocab_size=151936, max_position_embeddings=32768, tie_word_embeddings=True,
                         rope_parameters=dict(rope_type="default", rope_theta=1_000_000.0, mrope_section=section), **text),
        vision_config=spec["vision"],
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    with torch.device(device):
        model = Qwen2VLForConditionalGeneration._from_config(config, dtype=dtype)
    return model.eval()


def processor_dir(folder: Path) -> None:
    """The real Qwen2-VL tokenizer / processor files (not the generation config: its top_k=1)."""
    for f in (ASSETS / "qwen2-vl").iterdir():
        if f.name.endswith(".json") and not f.name.startswith("config") and f.name != "generation_config.json":
            shutil.copy(f, folder / f.name)


def filler_tokens(tokenizer, n: int) -> list:
    """``n`` tokens of real long-CoT text (QVQ-72B-Preview demo outputs, repeated as needed)."""
    ids: list = []
    lines = (ASSETS / "traces" / "qwen_blog_qvq72b_qwq32b_official.jsonl").read_text(encoding="utf-8").splitlines()
    while len(ids) < n:
        for line in lines:
            ids += tokenizer.encode(json.loads(line)["response"], add_special_tokens=False)
    return ids[:n]


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


STATE = ("cache", "blocks", "layout", "generated", "transcript", "records")


def snapshot(session) -> dict:
    """The session's mutable state (cache, sequence layout, text), copied."""
    import copy

    return copy.deepcopy({name: getattr(session, name) for name in STATE})


def restore(session, state: dict) -> None:
    import copy

    for name, value in copy.deepcopy(state).items():
        setattr(session, name, value)


def calibration_costs(model, processor, image, question, lengths, repeats, device) -> list:
    rows = []
    for length in lengths:
        session = hf.PVCSession(model, processor, image, question, config=PVCConfig(mode="append", pool=4))
        prompt = len(session.sequence)
        session.extend(filler_tokens(processor.tokenizer, length - prompt))
        sync(device)
        state = snapshot(session)
        context = len(session.sequence)
        row = {"context": context, "image_tokens": session.images[0][1].shape[0]}
        for mode in MODES:
            session.config = PVCConfig(mode=mode, pool=4)
            samples, record = [], None
            for _ in range(repeats):
                restore(session, state)
                record = session.calibrate()
                samples.append(record.seconds)
            row[f"{mode}_ms"] = statistics.median(samples) * 1000
            row[f"{mode}_prefilled"] = record.prefilled_tokens
        row["relocate/append"] = row["relocate_ms"] / row["append_ms"]
        row["relocate/kv"] = row["relocate_ms"] / row["kv_ms"]
        rows.append(row)
        print(f"  context {context}: " + ", ".join(f"{m} {row[f'{m}_ms']:.1f} ms" for m in MODES), flush=True)
        del session, state
    return rows


def end_to_end(model, processor, image, question, new_tokens, period, repeats, device) -> list:
    inputs = processor(images=[image], text=[processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}],
        tokenize=False, add_generation_prompt=True)], return_tensors="pt").to(device)
    fixed = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)

    def plain():
        with torch.no_grad():
            out = model.generate(**inputs, **fixed)
        return out.shape[1] - inputs["input_ids"].shape[1], 0

    def pvc(config):
        def run():
            result = hf.generate(model, processor, image, question, config=config, **fixed)
            return len(result.token_ids), len(result.calibrations)
        return run

    runs = [("plain model.generate", plain),
            ("tvc_rs.hf.generate, no calibration", pvc(PVCConfig(schedule=PVCSchedule(max_calibrations=0))))]
    runs += [(f"tvc_rs.hf.generate, {mode}", pvc(PVCConfig(mode=mode, schedule=PVCSchedule(period=period)))) for mode in MODES]
    samples = {name: [] for name, _ in runs}
    info = {}
    for _ in range(repeats):  # interleaved rounds: load changes hit every run alike
        for name, fn in runs:
            sync(device)
            t0 = time.perf_counter()
            tokens, calibrations = fn()
            sync(device)
            samples[name].append(time.perf_counter() - t0)
            info[name] = (tokens, calibrations)
    rows = []
    base = None
    for name, _ in runs:
        seconds = statistics.median(samples[name])
        tokens, calibrations = info[name]
        row = {"run": name, "tokens": tokens, "calibrations": calibrations, "seconds": seconds,
               "tokens_per_s": tokens / seconds}
        base = base or row["tokens_per_s"]
        row["vs_plain"] = row["tokens_per_s"] / base
        rows.append(row)
        print(f"  {name}: {row['tokens_per_s']:.1f} tok/s ({calibrations} calibrations)", flush=True)
    return rows


def layout_costs(model, processor, image, lengths, repeats) -> list:
    from tvc_rs.hf.session import _concat, _drop_images, _Text

    def median_ms(run) -> float:
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            run()
            times.append((time.perf_counter() - t0) * 1000)
        return statistics.median(times)

    rows = []
    for length in lengths:
        session = hf.PVCSession(model, processor, [image, image], "Describe the image.",
                                config=PVCConfig(mode="kv", pool=4))
        session._append_text(filler_tokens(processor.tokenizer, length - len(session.sequence)))
        tail = [_Text([1, 2, 3])] + session._pooled_images()  # a bridge and the pooled images
        whole = median_ms(lambda: session._layout(session.blocks + tail))
        incremental = median_ms(lambda: _concat(session.layout, session._layout(tail)))
        kv = median_ms(lambda: _concat(_drop_images(session.layout)[0], session._layout(tail)))
        rows.append({"context": len(session.sequence), "whole_ms": round(whole, 3),
                     "incremental_ms": round(incremental, 3), "kv_ms": round(kv, 3),
                     "whole/incremental": round(whole / incremental, 2)})
        print(rows[-1], flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--shape", choices=sorted(SHAPES), default="cpu")
    parser.add_argument("--dtype", default=None, help="default: float32 on CPU, bfloat16 on CUDA")
    parser.add_argument("--lengths", default="1024,4096,8192")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--period", type=int, default=24, help="end to end: a calibration every N tokens")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--layout", action="store_true", help="only the layout step's cost (whole vs incremental)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if args.device.startswith("cuda") else torch.float32)
    from PIL import Image
    from transformers import AutoProcessor

    folder = Path(tempfile.mkdtemp(prefix="bench_hf_"))
    processor_dir(folder)
    processor = AutoProcessor.from_pretrained(folder)
    shutil.rmtree(folder, ignore_errors=True)
    model = build_model(args.shape, args.device, dtype)
    # A real image at 448 x 448: 256 image tokens (16 x 16 merged grid; 4x4 pooling leaves 16).
    image = Image.open(ASSETS / "images" / "tvc_case1_clevr.jpg").convert("RGB").resize((448, 448))
    question = "Subtract all red things. Subtract all tiny matte balls. How many objects are left?"
    params = sum(p.numel() for p in model.parameters())
    print(f"model: {args.shape} shape, {params / 1e6:.0f} M parameters, {dtype}, {args.device}; "
          f"torch threads {torch.get_num_threads()}; load average {os.getloadavg()}", flush=True)

    lengths = [int(x) for x in args.lengths.split(",")]
    device_name = "cpu" if args.device == "cpu" else args.device.split(":")[0]
    command = " ".join(["python", "benches/bench_hf.py", *sys.argv[1:]])
    if args.layout:
        rows = layout_costs(model, processor, image, lengths, max(args.repeats, 5))
        print()
        print(markdown_table(rows, ["context", "whole_ms", "incremental_ms", "kv_ms", "whole/incremental"]))
        path = write_results(f"hf-layout-{device_name}", rows, shape=args.shape, load_average=os.getloadavg(),
                             command=command)
        print(f"\nwrote {path}")
        return
    print("calibration cost:", flush=True)
    costs = calibration_costs(model, processor, image, question, lengths, args.repeats, args.device)
    print("end to end:", flush=True)
    e2e = end_to_end(model, processor, image, question, args.new_tokens, args.period, args.repeats, args.device)

    print()
    print(markdown_table(costs, ["context", "relocate_ms", "append_ms", "kv_ms", "relocate/append", "relocate/kv",
                                 "relocate_prefilled", "append_prefilled", "kv_prefilled"]))
    print()
    print(markdown_table(e2e, ["run", "tokens", "calibrations", "tokens_per_s", "vs_plain"]))
    name = f"hf-{device_name}" if args.shape == "cpu" and device_name == "cpu" else f"hf-{device_name}-{args.shape}"
    extra = {"shape": args.shape, "model": SHAPES[args.shape], "parameters": params, "dtype": str(dtype),
             "device": args.device, "load_average": os.getloadavg(), "repeats": args.repeats,
             "new_tokens": args.new_tokens, "period": args.period, "image_tokens": costs[0]["image_tokens"],
             "command": command}
    if args.device.startswith("cuda"):
        extra["gpu"] = torch.cuda.get_device_name()
    path = write_results(name, [{"table": "calibration", **r} for r in costs] + [{"table": "end_to_end", **r} for r in e2e],
                         **extra)
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
