"""Generated calls over the public API of tvc_rs, for tests/test_fuzz.py.

Each target is a public function, class or method with a valid call (small tensors, a real
tokenizer); a generated call replaces one or two of its arguments with an adversarial value
(wrong dtypes, ranks, strides, zero strides, huge views, huge and negative ints, NaN, None,
bools, wrong types, lone surrogates), or drops a required one, or adds an unknown one.

``python tests/fuzzgen.py SEED START STOP`` runs calls START..STOP of seed SEED in this process
and writes one JSON line per call to stdout (``{"i": ..., "start": ...}`` before the call, the
outcome after it), flushing each, so that the parent sees which call a crash or a hang hit.
"""

from __future__ import annotations

import json
import math
import os
import random
import re
import sys
from pathlib import Path
from typing import Any, Callable

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
ASSETS = Path(os.environ.get("TVC_ASSETS", ROOT.parent / "shared" / "assets"))
TOKENIZER = ASSETS / "qwen2-vl" / "tokenizer.json"

# Exception types the stubs document (subclasses count: FileNotFoundError is an OSError).
DOCUMENTED = (ValueError, TypeError, IndexError, MemoryError, OSError, RuntimeError, KeyError)


# ----------------------------------------------------------------------------- adversarial values

def _torch():
    import torch

    return torch


def _tensor_values(rng: random.Random) -> list[Callable[[], Any]]:
    torch = _torch()
    dtypes = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int32, torch.int64,
              torch.bool, torch.uint8, torch.complex64]

    def shaped():
        rank = rng.randint(0, 5)
        shape = [rng.choice([0, 1, 2, 3, 4, 8, 16]) for _ in range(rank)]
        dtype = rng.choice(dtypes)
        if dtype.is_floating_point or dtype.is_complex:
            return torch.randn(shape, dtype=dtype if dtype != torch.complex64 else torch.complex64)
        if dtype == torch.bool:
            return torch.rand(shape) > 0.5
        return torch.randint(0 if dtype == torch.uint8 else -5, 20, shape, dtype=dtype)

    def strided():
        t = torch.randn(rng.choice([2, 4, 8]), rng.choice([2, 4, 8]), rng.choice([4, 8, 16]))
        return rng.choice([t.transpose(0, 2), t[:, :, ::2], t[::2], t.permute(1, 0, 2)])

    def zero_stride():
        rank = rng.randint(1, 4)
        big = rng.choice([2**40, 2**31, 2**20, 8])
        shape = [rng.choice([1, 2, 4, big]) for _ in range(rank)]
        while math.prod(shape) >= 2**62:  # torch refuses sizes that overflow int64
            shape[shape.index(max(shape))] = 8
        return torch.zeros([1] * rank).expand(*shape)

    def nan():
        t = torch.randn(rng.choice([4, 16]), rng.choice([2, 8]))
        t[rng.randrange(t.shape[0])] = rng.choice([math.nan, math.inf, -math.inf])
        return t

    def numpy_odd():
        a = np.random.default_rng(rng.randrange(2**32)).standard_normal((4, 8)).astype(np.float32)
        choice = rng.randrange(4)
        if choice == 0:
            return a[::-1]  # negative strides
        if choice == 1:
            a.flags.writeable = False
            return a
        if choice == 2:
            return np.lib.stride_tricks.as_strided(a, shape=(2**20, 8), strides=(0, 4))
        return a.astype(np.float64)

    def grad():
        return torch.randn(4, 8, requires_grad=True)

    return [shaped, shaped, shaped, strided, zero_stride, zero_stride, nan, numpy_odd, grad]


INTS = [0, 1, -1, 2, 3, 7, 2**31, 2**31 - 1, 2**32, 2**40, 2**62, 2**63 - 1, 2**63, 2**64, 2**80, -2**31,
        -2**63, -2**63 - 1, -2**80, True, False]
FLOATS = [0.0, 1.5, -1.0, 0.5, math.nan, math.inf, -math.inf, 1e308, -1e-308]
STRINGS = ["", "x", "vllm", "chw", "raise", "qwen2_vl", "Wait, let me check. " * 3, "\udcff", "a" * 5000,
           "<image>", "\x00"]
MISC = [None, [], [1, 2, 3], [[1, 4, 4]], [[1, 2**40, 2**40]], [[1, 2], [3]], (1, 2), (2**63, 1), {"a": 1},
        object(), b"bytes", [None], [1.5], ["x"], [[]], [-1, -2], [2**40], [[1, 2, 3]] * 3, range(3)]


def adversarial(rng: random.Random) -> Any:
    kind = rng.random()
    if kind < 0.35:
        return rng.choice(_tensor_values(rng))()
    if kind < 0.6:
        value = rng.choice(INTS)
        return value if rng.random() < 0.8 else np.int64(max(min(value, 2**63 - 1), -2**63))
    if kind < 0.7:
        value = rng.choice(FLOATS)
        return value if rng.random() < 0.8 else np.float32(value)
    if kind < 0.8:
        return rng.choice(STRINGS)
    return rng.choice(MISC)


# ----------------------------------------------------------------------------- targets

class Ctx:
    """Objects the targets share within one process (loaded once)."""

    def __init__(self):
        import tvc_rs

        self.tvc = tvc_rs
        self.detector = tvc_rs.ReflectionDetector(str(TOKENIZER))
        self.builder = tvc_rs.DVRBuilder(self.detector)


def _t(*shape, dtype=None):
    torch = _torch()
    return torch.randn(*shape, dtype=dtype or torch.float32)


def _z(*shape):
    return _torch().zeros(*shape)


def targets(ctx: Ctx) -> list[tuple[str, Callable[..., Any], dict[str, Callable[[], Any]]]]:
    """``(name, callable, {parameter: valid value factory})``; called with keywords."""
    tvc = ctx.tvc
    answer = "Three objects are left. Wait, let me double-check the image. Yes, three.\nDone here."
    ins = lambda: ctx.builder.plan(answer)  # noqa: E731
    batch = lambda: ctx.detector.batch(4)  # noqa: E731

    def batch_with_slot():
        b = ctx.detector.batch(4)
        b.add(0)
        return b

    return [
        ("smart_resize", tvc.smart_resize, dict(height=lambda: 100, width=lambda: 200, factor=lambda: 28,
                                                min_pixels=lambda: 3136, max_pixels=lambda: 1003520)),
        ("image_grid_thw", tvc.image_grid_thw, dict(height=lambda: 100, width=lambda: 200, patch_size=lambda: 14,
                                                    merge_size=lambda: 2, min_pixels=lambda: 3136,
                                                    max_pixels=lambda: 1003520)),
        ("image_token_count", tvc.image_token_count, dict(height=lambda: 100, width=lambda: 200,
                                                          patch_size=lambda: 14, merge_size=lambda: 2)),
        ("image_processor_settings", tvc.image_processor_settings, dict(source=lambda: {"patch_size": 14})),
        ("mrope_position_ids", tvc.mrope_position_ids, dict(
            input_ids=lambda: np.array([[1, 2, 151652, 151655, 151655, 151655, 151655, 151653, 5]]),
            image_grid_thw=lambda: np.array([[1, 4, 4]]), video_grid_thw=lambda: None,
            attention_mask=lambda: np.ones((1, 9), np.int64), spatial_merge_size=lambda: 2,
            image_token_id=lambda: 151655, video_token_id=lambda: 151656)),
        ("pool_visual_tokens", tvc.pool_visual_tokens, dict(x=lambda: _t(16, 8), grid_thw=lambda: [[1, 4, 4]],
                                                            factor=lambda: 2)),
        ("visual_token_scores", tvc.visual_token_scores, dict(query=lambda: _t(2, 4, 8), keys=lambda: _t(16, 2, 8),
                                                              lse=lambda: None, scale=lambda: None)),
        ("select_tokens", tvc.select_tokens, dict(scores=lambda: _t(16), keep=lambda: 4, min_keep=lambda: 1,
                                                  max_keep=lambda: None)),
        ("select_tokens(ratio)", tvc.select_tokens, dict(scores=lambda: _t(16), ratio=lambda: 0.5)),
        ("select_tokens(mass)", tvc.select_tokens, dict(scores=lambda: _t(16).softmax(0), mass=lambda: 0.9)),
        ("prune_visual_tokens", tvc.prune_visual_tokens, dict(x=lambda: _t(16, 8), scores=lambda: _t(16),
                                                              keep=lambda: 4, grid_thw=lambda: [[1, 4, 4]],
                                                              merge=lambda: False)),
        ("prune_visual_tokens(indices)", tvc.prune_visual_tokens, dict(x=lambda: _t(16, 8),
                                                                       indices=lambda: [0, 3, 5])),
        ("rerotate_keys", tvc.rerotate_keys, dict(keys=lambda: _t(5, 2, 8), delta=lambda: 3, rope_theta=lambda: 1e6,
                                                  head_dim=lambda: 8, rotary_dim=lambda: None,
                                                  interleaved=lambda: False, mrope_section=lambda: None)),
        ("rerotate_keys(layers)", tvc.rerotate_keys, dict(keys=lambda: [_t(5, 2, 8), _t(5, 2, 8)],
                                                          delta=lambda: [1, 2, 3, 4, 5], rope_theta=lambda: 1e6,
                                                          head_dim=lambda: 8, mrope_section=lambda: [2, 1, 1])),
        ("relocate_span", tvc.relocate_span, dict(keys=lambda: [_t(1, 2, 10, 8)], values=lambda: [_t(1, 2, 10, 8)],
                                                  start=lambda: 2, end=lambda: 4, rope_theta=lambda: 1e6,
                                                  head_dim=lambda: 8, length=lambda: None,
                                                  rotary_dim=lambda: None, interleaved=lambda: False)),
        ("append_entries", tvc.append_entries, dict(keys=lambda: [_z(1, 2, 10, 8)], values=lambda: [_z(1, 2, 10, 8)],
                                                    new_keys=lambda: [_t(1, 2, 3, 8)],
                                                    new_values=lambda: [_t(1, 2, 3, 8)], positions=lambda: 7,
                                                    delta=lambda: 2, rope_theta=lambda: 1e6, head_dim=lambda: 8)),
        ("paged_reinject", tvc.paged_reinject, dict(kv_caches=lambda: [_z(4, 2, 16, 16), _z(4, 2, 16, 16)],
                                                    src_slots=lambda: [0, 1], dst_slots=lambda: [5, 6],
                                                    delta=lambda: -1, rope_theta=lambda: 1e6, head_dim=lambda: 8,
                                                    layout=lambda: "vllm", rotary_dim=lambda: None,
                                                    interleaved=lambda: False, mrope_section=lambda: None)),
        ("PVCSchedule", tvc.PVCSchedule, dict(warmup=lambda: 0, min_gap=lambda: 4, max_calibrations=lambda: None,
                                              period=lambda: None)),
        ("PVCConfig", tvc.PVCConfig, dict()),
        ("ReflectionDetector", tvc.ReflectionDetector, dict(tokenizer=lambda: str(TOKENIZER),
                                                            phrases=lambda: ["wait", "hmm"])),
        ("ReflectionDetector.find_text", lambda **k: ctx.detector.find_text(**k), dict(text=lambda: answer)),
        ("ReflectionDetector.find_tokens", lambda **k: ctx.detector.find_tokens(**k),
         dict(tokens=lambda: ctx.detector.encode(answer))),
        ("ReflectionDetector.encode", lambda **k: ctx.detector.encode(**k), dict(text=lambda: answer)),
        ("ReflectionDetector.stream", lambda **k: ctx.detector.stream(**k),
         dict(schedule=lambda: None, calibrations_made=lambda: 0, tokens_since_last=lambda: None)),
        ("ReflectionDetector.batch", lambda **k: ctx.detector.batch(**k),
         dict(capacity=lambda: 4, out_of_vocab=lambda: "raise")),
        ("ReflectionDetector.scan", lambda **k: ctx.detector.scan(**k),
         dict(texts=lambda: [answer, "Hmm."], schedule=lambda: None)),
        ("ReflectionStream.push", lambda **k: ctx.detector.stream().push(**k), dict(token_id=lambda: 13)),
        ("ReflectionStream.push_many", lambda **k: ctx.detector.stream().push_many(**k),
         dict(tokens=lambda: ctx.detector.encode(answer))),
        ("StreamBatch.add", lambda **k: batch().add(**k), dict(slot=lambda: 1, schedule=lambda: None,
                                                                calibrations_made=lambda: 0)),
        ("StreamBatch.remove", lambda **k: batch_with_slot().remove(**k), dict(slot=lambda: 0)),
        ("StreamBatch.move", lambda **k: batch_with_slot().move(**k), dict(from_slot=lambda: 0, to_slot=lambda: 2)),
        ("StreamBatch.swap", lambda **k: batch_with_slot().swap(**k), dict(slot_a=lambda: 0, slot_b=lambda: 3)),
        ("StreamBatch.feed", lambda **k: batch_with_slot().feed(**k),
         dict(slot=lambda: 0, tokens=lambda: ctx.detector.encode(answer))),
        ("StreamBatch.is_active", lambda **k: batch_with_slot().is_active(**k), dict(slot=lambda: 0)),
        ("StreamBatch.step", lambda **k: batch_with_slot().step(**k), dict(tokens=lambda: [13, 0, 0, 0])),
        ("StreamBatch.advance", lambda **k: batch_with_slot().advance(**k),
         dict(slots=lambda: [0], token_index=lambda: [0], tokens=lambda: [13], sampling=lambda: [True])),
        ("StreamBatch.advance_seq", lambda **k: batch_with_slot().advance_seq(**k),
         dict(slots=lambda: [0], seq_lens=lambda: [5], tokens=lambda: [13], prompt_len=lambda: [4],
              prefill_len=lambda: [4])),
        ("StreamBatch.advance_lists", lambda **k: batch_with_slot().advance_lists(**k),
         dict(outputs=lambda: [[13]], rows=lambda: 1)),
        ("StreamBatch.hits", lambda **k: batch_with_slot().hits(**k), dict(slot=lambda: 0)),
        ("StreamBatch.calibrations", lambda **k: batch_with_slot().calibrations(**k), dict(slot=lambda: 0)),
        ("StreamBatch.state", lambda **k: batch_with_slot().state(**k), dict(slot=lambda: 0)),
        ("DVRPolicy", tvc.DVRPolicy, dict(max_insertions=lambda: 4, min_gap=lambda: 200, skip_first=lambda: 50,
                                          bridge=lambda: None, downscale=lambda: 4, placeholder=lambda: "<image>")),
        ("DVRPolicy.insertion_text", lambda **k: tvc.DVRPolicy().insertion_text(**k), dict(images=lambda: 1)),
        ("DVRBuilder", tvc.DVRBuilder, dict(tokenizer=lambda: ctx.detector, policy=lambda: None,
                                            system=lambda: "You are a helpful assistant.",
                                            model_type=lambda: "qwen2_vl", patch_size=lambda: 14,
                                            merge_size=lambda: 2, min_pixels=lambda: 3136,
                                            max_pixels=lambda: 1003520)),
        ("DVRBuilder.plan", lambda **k: ctx.builder.plan(**k), dict(answer=lambda: answer)),
        ("DVRBuilder.plan_many", lambda **k: ctx.builder.plan_many(**k),
         dict(answers=lambda: [answer, "Hmm."], images=lambda: [1, 2])),
        ("DVRBuilder.insert", lambda **k: ctx.builder.insert(**k),
         dict(answer=lambda: answer, insertions=ins, images=lambda: 1)),
        ("DVRBuilder.build", lambda **k: ctx.builder.build(**k),
         dict(question=lambda: "<image>How many?", image_sizes=lambda: [(100, 120)], answer=lambda: answer,
              cutoff=lambda: None)),
        ("DVRBuilder.downscaled_size", lambda **k: ctx.builder.downscaled_size(**k),
         dict(height=lambda: 100, width=lambda: 120)),
        ("dvr_downscaled_size", tvc.dvr_downscaled_size, dict(height=lambda: 100, width=lambda: 120,
                                                              factor=lambda: 4)),
        ("infer_seqlen", tvc.infer_seqlen, dict(source_len=lambda: 100, target_len=lambda: 200, cutoff=lambda: 64)),
        ("vision_blocks", tvc.vision_blocks, dict(input_ids=lambda: [1, 151652, 151655, 151653, 2],
                                                  vision_start=lambda: 151652, vision_end=lambda: 151653,
                                                  image_pad=lambda: 151655, video_pad=lambda: 151656)),
        ("qwen2_vl_patches", tvc.qwen2_vl_patches, dict(images=lambda: [np.zeros((3, 28, 28), np.uint8)],
                                                        mean=lambda: [0.5] * 3, std=lambda: [0.5] * 3,
                                                        layout=lambda: "chw", patch_size=lambda: 14,
                                                        merge_size=lambda: 2, temporal_patch_size=lambda: 2)),
        ("Buffer.__dlpack__", lambda **k: tvc._native._tensor_copy(np.zeros(3, np.float32)).__dlpack__(**k),
         dict(stream=lambda: None, max_version=lambda: (1, 0), dl_device=lambda: None, copy=lambda: None)),
    ]


def generate(ctx: Ctx, seed: int, i: int) -> tuple[str, Callable[..., Any], dict[str, Any], list[str]]:
    """Call ``i`` of seed ``seed``: (target name, callable, keyword arguments, changed names)."""
    rng = random.Random(f"{seed}:{i}")
    table = targets(ctx)
    name, fn, params = table[rng.randrange(len(table))]
    kwargs = {k: make() for k, make in params.items()}
    changed: list[str] = []
    mode = rng.random()
    if not params or mode < 0.04:
        bogus = rng.choice(["bogus", "headdim", "x_"])
        kwargs[bogus] = adversarial(rng)
        changed.append(bogus)
    elif mode < 0.08:
        gone = rng.choice(list(params))
        del kwargs[gone]
        changed.append(gone)
    else:
        for key in rng.sample(list(params), k=min(len(params), 1 if rng.random() < 0.75 else 2)):
            kwargs[key] = adversarial(rng)
            changed.append(key)
    return name, fn, kwargs, changed


def names_argument(message: str, names: list[str]) -> bool:
    """The message names one of the changed arguments (as a whole word)."""
    return any(re.search(rf"(?<![\w]){re.escape(n)}(?![\w])", message) for n in names)


def run(seed: int, start: int, stop: int, out=sys.stdout) -> None:
    ctx = Ctx()
    for i in range(start, stop):
        name, fn, kwargs, changed = generate(ctx, seed, i)
        out.write(json.dumps({"i": i, "start": name}) + "\n")
        out.flush()
        result: dict[str, Any] = {"i": i, "fn": name, "changed": changed}
        try:
            fn(**kwargs)
            result["outcome"] = "ok"
        except BaseException as err:  # noqa: BLE001 - PanicException derives from BaseException
            if isinstance(err, (KeyboardInterrupt, SystemExit)):
                raise
            kind = type(err).__name__
            message = str(err)
            result.update(outcome="error", type=kind, message=message[:300],
                          documented=isinstance(err, DOCUMENTED) and kind != "PanicException",
                          named=names_argument(message, changed))
        out.write(json.dumps(result) + "\n")
        out.flush()


if __name__ == "__main__":
    run(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]))
