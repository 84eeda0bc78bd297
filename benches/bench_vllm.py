"""The vLLM logits processor's cost per decoding step, tvc_rs against a plain-Python processor
doing the same job (incremental detokenisation with `tokenizers`' DecodeStream, a regex over
the recent text, the PVC schedule, forcing the calibration token), in one run, at batch 1, 64
and 256, with every request under TVC and with none, through both of vLLM 0.33's interfaces.

Needs the vLLM environment (.venv-vllm) and the real assets (Qwen2-VL tokenizer, long-CoT traces):

    TVC_ASSETS=../shared/assets .venv-vllm/bin/python benches/bench_vllm.py [--steps 400]

What is timed is the processor's own work per step: ``apply`` (V2: ``apply(logits, ctx)`` on a
``LogitsContext``; legacy: ``apply(logits)`` after the runner appended the step's tokens to the
output lists). Building the context, sampling and the logits themselves are the runner's and are
not timed. On a GPU the V2 path adds one device-to-host copy of the step's input ids (a wait for
the forward pass), which a CPU run cannot show.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import markdown_table, write_results  # noqa: E402
from bench_triggers import PythonBaseline  # noqa: E402  (DecodeStream + regex per stream)

from tokenizers import Tokenizer  # noqa: E402

import tvc_rs  # noqa: E402
from tvc_rs.vllm import TVCLogitsProcessor, TVCSettings, tvc_sampling_params  # noqa: E402
from vllm import SamplingParams  # noqa: E402
from vllm.v1.sample.logits_processor import BatchUpdateBuilder, build_logitsprocs  # noqa: E402
from vllm.v1.sample.logits_processor.interface import LogitsProcessor as LegacyLogitsProcessor  # noqa: E402
from vllm.v1.worker.gpu.sample.logits_processor import LogitsContext, build_custom_logits_processors  # noqa: E402
from vllm.v1.worker.gpu.sample.logits_processor.interface import LogitsProcessor as V2LogitsProcessor  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
ASSETS = Path(os.environ.get("TVC_ASSETS", ROOT.parent / "shared" / "assets"))
VOCAB = 151936
PROMPT_LEN = 16
SCHEDULE = tvc_rs.PVCSchedule(min_gap=64)


# ------------------------------------------------------------------- the plain-Python processor


class PythonRequest:
    """One watched request the plain-Python way: DecodeStream + regex, the schedule in Python."""

    def __init__(self, tokenizer: Tokenizer, phrases: list[str], settings: TVCSettings):
        self.detector = PythonBaseline(tokenizer, phrases)
        self.s = settings
        self.tokens = 0
        self.made = settings.calibrations_made
        self.since = settings.tokens_since_last or 0
        self.fed = 0
        self.output: list[int] | None = None

    def push(self, token: int) -> bool:
        hit = self.detector.push(token)
        index, s = self.tokens, self.s
        self.tokens += 1
        self.since += 1
        allowed = ((s.max_calibrations is None or self.made < s.max_calibrations)
                   and (self.made > 0 or index >= s.warmup) and (self.made == 0 or self.since >= s.min_gap))
        if allowed and (hit or (s.period is not None and self.since >= s.period)):
            self.made += 1
            self.since = 0
            return True
        return False


class PythonProcessor(V2LogitsProcessor, LegacyLogitsProcessor):
    """What a logits processor written in Python would do, for both interfaces."""

    def __init__(self, vllm_config, *args):
        self.tokenizer = Tokenizer.from_file(str(ASSETS / "qwen2-vl" / "tokenizer.json"))
        self.phrases = list(tvc_rs.DEFAULT_PHRASES)
        self.reqs: dict[int, PythonRequest] = {}
        self.req_states = args[0] if args and not isinstance(args[0], torch.device) else None

    @classmethod
    def validate_params(cls, sampling_params):
        TVCSettings.from_sampling_params(sampling_params)

    def is_argmax_invariant(self) -> bool:
        return False

    def _new(self, params) -> PythonRequest | None:
        settings = TVCSettings.from_sampling_params(params)
        return None if settings is None else PythonRequest(self.tokenizer, self.phrases, settings)

    @staticmethod
    def _force(logits, row, token):
        logits[row].fill_(float("-inf"))
        logits[row, token] = 0.0

    # V2
    def add_request(self, req_idx, sampling_params) -> bool:
        req = self._new(sampling_params)
        if req is None:
            self.reqs.pop(req_idx, None)
            return False
        self.reqs[req_idx] = req
        return True

    def _apply_v2(self, logits, ctx):
        if not self.reqs:
            return logits
        ids = ctx.input_ids.tolist()
        pos = ctx.pos.tolist()
        prompt_len = self.req_states.prompt_len.np
        for row, slot in enumerate(ctx.idx_mapping_np.tolist()):
            req = self.reqs.get(slot)
            if req is not None and pos[row] - prompt_len[slot] == req.fed:
                req.fed += 1
                if req.push(ids[row]):
                    self._force(logits, row, 151654)
        return logits

    # legacy
    def update_state(self, batch_update):
        if batch_update is None:
            return
        for slot in batch_update.removed:
            self.reqs.pop(slot, None)
        for slot, params, _, output in batch_update.added:
            req = self._new(params)
            if req is None:
                self.reqs.pop(slot, None)
            else:
                req.output = output
                self.reqs[slot] = req

    def apply(self, logits, ctx=None):
        if ctx is not None:
            return self._apply_v2(logits, ctx)
        for slot, req in self.reqs.items():
            output = req.output
            while req.fed < len(output):
                token = output[req.fed]
                req.fed += 1
                if req.push(token):
                    self._force(logits, slot, 151654)
        return logits


# ------------------------------------------------------------------------------- measurement


def trace_streams(tokenizer: Tokenizer, steps: int) -> list[list[int]]:
    streams = []
    for name in ["qwen_blog_qvq72b_qwq32b_official.jsonl", "marco_o1_cot_demo.jsonl", "emma_gemini2_flash_thinking_exp_1219.jsonl"]:
        for line in (ASSETS / "traces" / name).open():
            ids = tokenizer.encode(json.loads(line)["response"], add_special_tokens=False).ids
            if len(ids) >= steps:
                streams.append(ids[:steps])
    return streams


def engine_config():
    """A weightless Qwen2-VL-2B folder (real config and tokenizer) and vLLM's configuration of it."""
    from vllm.engine.arg_utils import EngineArgs

    folder = ROOT / "benches" / "out" / "qwen2-vl-2b"
    folder.mkdir(parents=True, exist_ok=True)
    links = {name: ASSETS / "qwen2-vl" / name for name in
             ["tokenizer.json", "tokenizer_config.json", "chat_template.json", "preprocessor_config.json", "generation_config.json"]}
    links["config.json"] = ASSETS / "model_configs" / "Qwen2-VL-2B-Instruct.config.TangLinJie-Qwen2-VL-bm.json"
    for name, target in links.items():
        if not (folder / name).exists():
            (folder / name).symlink_to(target)
    return EngineArgs(model=str(folder), max_model_len=8192, max_num_seqs=256).create_engine_config()


def params_for(tvc: bool) -> SamplingParams:
    return tvc_sampling_params(SamplingParams(max_tokens=10_000), SCHEDULE) if tvc else SamplingParams(max_tokens=10_000)


def time_v2(proc, states, streams, batch: int, tvc: bool, steps: int) -> tuple[float, float]:
    """(median, minimum) microseconds of ``apply`` per step."""
    slots = []
    for i in range(batch):
        rid = f"r{id(proc)}-{i}"
        states.add_request(rid, prompt_len=PROMPT_LEN, all_token_ids=[0] * PROMPT_LEN, num_computed_tokens=0, max_tokens=10_000)
        slots.append(states.req_id_to_index[rid])
        proc.add_request(slots[-1], params_for(tvc))
    for t in (states.all_token_ids, states.total_len, states.num_computed_tokens):
        t.clear_staged_writes()
    proc.apply_staged_writes()
    slots_np = np.array(slots, dtype=np.int64)
    tokens = np.array([streams[i % len(streams)] for i in range(batch)], dtype=np.int32)  # [batch, steps]
    logits = torch.zeros(batch, VOCAB)
    contexts = []
    for step in range(steps):
        seq = np.full(batch, PROMPT_LEN + step, dtype=np.int32)  # step 0 samples the first token
        ids = tokens[:, step - 1] if step else np.zeros(batch, dtype=np.int32)
        contexts.append(LogitsContext(
            expanded_idx_mapping=torch.from_numpy(slots_np), idx_mapping=torch.from_numpy(slots_np), idx_mapping_np=slots_np,
            expanded_local_pos=torch.zeros(batch, dtype=torch.int32), input_ids=torch.from_numpy(ids.copy()),
            pos=torch.from_numpy(seq.astype(np.int64) - 1), seq_lens_upper_bound_np=seq))
    samples = []
    for ctx in contexts:
        t0 = time.perf_counter()
        proc.apply(logits, ctx)
        samples.append(time.perf_counter() - t0)
    for rid in list(states.req_id_to_index):
        states.remove_request(rid)
    return statistics.median(samples[10:]) * 1e6, min(samples[10:]) * 1e6


def time_legacy(proc, streams, batch: int, tvc: bool, steps: int) -> tuple[float, float]:
    builder = BatchUpdateBuilder()
    outputs = [[] for _ in range(batch)]
    for i in range(batch):
        builder.added.append((i, params_for(tvc), [0] * PROMPT_LEN, outputs[i]))
    proc.update_state(builder.get_and_reset(batch))
    tokens = [streams[i % len(streams)] for i in range(batch)]
    logits = torch.zeros(batch, VOCAB)
    samples = []
    for step in range(steps):
        if step:
            for i in range(batch):  # the runner appends the sampled tokens
                outputs[i].append(tokens[i][step - 1])
        proc.update_state(None)
        t0 = time.perf_counter()
        proc.apply(logits)
        samples.append(time.perf_counter() - t0)
    for i in range(batch):
        builder.removed_append(i)
    proc.update_state(builder.get_and_reset(0))
    return statistics.median(samples[10:]) * 1e6, min(samples[10:]) * 1e6


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=400, help="decoding steps per measurement")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 64, 256])
    parser.add_argument("--repeat", type=int, default=3, help="repetitions; the lowest median is kept (a shared machine is noisy)")
    args = parser.parse_args()

    torch.set_num_threads(1)
    config = engine_config()
    tokenizer = Tokenizer.from_file(str(ASSETS / "qwen2-vl" / "tokenizer.json"))
    streams = trace_streams(tokenizer, args.steps)

    if not torch.cuda.is_available():
        import vllm.v1.worker.cpu.shm  # noqa: F401  (as vLLM's CPU worker: host buffers)
    from vllm.v1.worker.gpu.states import RequestState

    capacity = max(args.batches)
    states = RequestState(max_num_reqs=capacity, max_model_len=8192, max_num_batched_tokens=8192,
                          num_speculative_steps=0, vocab_size=VOCAB, device=torch.device("cpu"))
    # The processors as vLLM builds them: the entry point's instance (ours) for each runner.
    (ours_v2,) = [p for p in build_custom_logits_processors(config, states, False, ()) if isinstance(p, TVCLogitsProcessor)]
    (ours_legacy,) = [p for p in build_logitsprocs(config, torch.device("cpu"), False, False, ()).all
                      if isinstance(p, TVCLogitsProcessor)]
    python_v2 = PythonProcessor(config, states)
    python_legacy = PythonProcessor(config, torch.device("cpu"), False)

    rows = []
    for runner in ["v2", "legacy"]:
        for batch in args.batches:
            for tvc in [True, False]:
                def measure(proc):
                    if runner == "v2":
                        runs = [time_v2(proc, states, streams, batch, tvc, args.steps) for _ in range(args.repeat)]
                    else:
                        runs = [time_legacy(proc, streams, batch, tvc, args.steps) for _ in range(args.repeat)]
                    return min(m for m, _ in runs), min(f for _, f in runs)

                ours, ours_fastest = measure(ours_v2 if runner == "v2" else ours_legacy)
                base, base_fastest = measure(python_v2 if runner == "v2" else python_legacy)
                rows.append({"runner": runner, "batch": batch, "requests": "all TVC" if tvc else "none",
                             "tvc_rs_us_per_step": ours, "python_us_per_step": base, "speedup": base / ours,
                             "tvc_rs_fastest_step_us": ours_fastest, "python_fastest_step_us": base_fastest,
                             "speedup_fastest_steps": base_fastest / ours_fastest})
                print(rows[-1], flush=True)

    print()
    print(markdown_table(rows, ["runner", "batch", "requests", "tvc_rs_us_per_step", "python_us_per_step", "speedup",
                                "tvc_rs_fastest_step_us", "python_fastest_step_us", "speedup_fastest_steps"]))
    path = write_results("vllm-cpu", rows, steps=args.steps, schedule=repr(SCHEDULE), streams=len(streams),
                         vllm=__import__("vllm").__version__, repeat=args.repeat,
                         statistic="per-step apply() time: the lowest median of the repetitions, and the fastest single step")
    print(f"\nwrote {path.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
