"""Visual-token compression against PyTorch CPU doing the same work the usual way, in one run.

    python benches/bench_compress.py [--quick] [--threads N]

Cases (Qwen2-VL-7B sizes: a 1008 x 1008 image is a 36 x 36 grid of 3584-wide tokens after the
2x2 merge; 28 query heads, 4 kv heads, head_dim 128):

- pool: 4x4 average pooling (TVC's setting), torch ``avg_pool2d(ceil_mode=True,
  count_include_pad=False)`` on the channels-last view of ``x`` (its fastest form here) and in
  the channels-first form VLM code usually writes (``permute(0, 3, 1, 2).contiguous()`` first,
  as LLaVA-NeXT's ``get_2dPool``);
- prune: keep 324 of 1296 tokens by score, torch ``topk`` + ``sort`` + ``index_select``;
- scores: FastV-style importance, torch matmul + softmax + mean (GQA by ``repeat_interleave``);
- merge: ToMe-style merge of the 972 dropped tokens into the 324 kept ones, torch normalise +
  matmul + argmax + ``index_add_``.

The implementations of a case are timed in interleaved rounds (torch, ours, torch, ours, ...)
so that both see the same machine load; "ms" is the median wall time per call, "best ms" the
fastest call; "speedup vs torch" compares medians, "speedup (best)" fastest calls (the better
guide on a machine shared with other work). "GB/s" counts the bytes the operation must read and write at least once, "of
memcpy" divides that by this machine's copy bandwidth measured in the same run
(``memcpy_bandwidth()``). The load average before and after the run is recorded with the results
in ``benches/results/compress-cpu.json``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import markdown_table, memcpy_bandwidth, write_results  # noqa: E402

import tvc_rs  # noqa: E402

H = W = 36
DIM = 3584
TOKENS = H * W
KEEP = 324


def torch_pool_channels_last(x: torch.Tensor, k: int) -> torch.Tensor:
    y = F.avg_pool2d(x.view(1, H, W, -1).permute(0, 3, 1, 2), k, ceil_mode=True, count_include_pad=False)
    return y.permute(0, 2, 3, 1).reshape(-1, x.shape[1])


def torch_pool_channels_first(x: torch.Tensor, k: int) -> torch.Tensor:
    # As LLaVA-NeXT's get_2dPool writes it: a contiguous NCHW copy, pool, back to tokens.
    y = F.avg_pool2d(
        x.view(1, H, W, -1).permute(0, 3, 1, 2).contiguous(), k, ceil_mode=True, count_include_pad=False
    )
    return y.permute(0, 2, 3, 1).reshape(-1, x.shape[1])


def torch_prune(x: torch.Tensor, scores: torch.Tensor, keep: int) -> torch.Tensor:
    indices = torch.topk(scores, keep).indices.sort().values
    return x.index_select(0, indices)


def torch_scores(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    group = q.shape[1] // k.shape[1]
    keys = k.repeat_interleave(group, dim=1).permute(1, 2, 0)  # [heads, head_dim, k_tokens]
    logits = torch.matmul(q.permute(1, 0, 2), keys) * q.shape[-1] ** -0.5  # [heads, q, k]
    return logits.softmax(dim=-1).mean(dim=(0, 1))


def torch_merge(x: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    mask = torch.ones(x.shape[0], dtype=torch.bool)
    mask[kept] = False
    dropped = x[mask]
    kept_rows = x[kept]
    unit_kept = F.normalize(kept_rows, dim=-1, eps=1e-12)
    unit_dropped = F.normalize(dropped, dim=-1, eps=1e-12)
    target = (unit_dropped @ unit_kept.T).argmax(dim=-1)
    sums = kept_rows.clone().index_add_(0, target, dropped)
    sizes = torch.ones(kept.shape[0]).index_add_(0, target, torch.ones(dropped.shape[0]))
    return sums / sizes[:, None]


def compare(fns: dict, *, rounds: int, calls: int) -> dict:
    """Per implementation: (median, best) seconds per call, measured in interleaved rounds."""
    samples: dict = {name: [] for name in fns}
    for fn in fns.values():
        for _ in range(2):
            fn()
    for _ in range(rounds):
        for name, fn in fns.items():
            for _ in range(calls):
                t0 = time.perf_counter()
                fn()
                samples[name].append(time.perf_counter() - t0)
    return {name: (statistics.median(s), min(s)) for name, s in samples.items()}


def case_rows(op, shape, timings: dict, nbytes: int, bandwidth: float) -> list[dict]:
    """Table rows of one case; the first implementation is the torch baseline."""
    baseline, baseline_best = next(iter(timings.values()))
    rows = []
    for i, (impl, (median, best)) in enumerate(timings.items()):
        out = {
            "op": op,
            "shape": shape,
            "impl": impl,
            "ms": median * 1e3,
            "best ms": best * 1e3,
            "GB/s": nbytes / median / 1e9,
            "of memcpy": nbytes / median / bandwidth,
        }
        if i > 0:
            out["speedup vs torch"] = baseline / median
            out["speedup (best)"] = baseline_best / best
        rows.append(out)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats (a smoke run)")
    parser.add_argument("--threads", type=int, help="threads for both torch and tvc_rs (default: all cores)")
    args = parser.parse_args()
    if args.threads:
        # tvc_rs's rayon pool starts at its first parallel call and reads this then.
        os.environ["RAYON_NUM_THREADS"] = str(args.threads)
        torch.set_num_threads(args.threads)
    fast = dict(rounds=5 if args.quick else 20, calls=5 if args.quick else 20)
    slow = dict(rounds=2 if args.quick else 5, calls=1 if args.quick else 2)

    torch.manual_seed(0)
    load_before = os.getloadavg()
    bandwidth = memcpy_bandwidth()
    rows: list[dict] = []
    grid = [(1, H, W)]

    # --- pooling
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(TOKENS, DIM).to(dtype)
        ours, _ = tvc_rs.pool_visual_tokens(x, grid, 4)
        torch.testing.assert_close(ours.float(), torch_pool_channels_last(x, 4).float(), rtol=1e-2, atol=1e-2)
        nbytes = (TOKENS + ours.shape[0]) * DIM * x.element_size()
        fns = {"torch avg_pool2d (channels-last view)": lambda: torch_pool_channels_last(x, 4)}
        if dtype == torch.float32:
            fns["torch avg_pool2d (NCHW .contiguous() copy)"] = lambda: torch_pool_channels_first(x, 4)
        fns["tvc_rs.pool_visual_tokens"] = lambda: tvc_rs.pool_visual_tokens(x, grid, 4)
        shape = f"{H}x{W}x{DIM} {str(dtype)[6:]}, 4x4"
        rows += case_rows("pool", shape, compare(fns, **fast), nbytes, bandwidth)

    # --- pruning
    x = torch.randn(TOKENS, DIM)
    scores = torch.rand(TOKENS)
    assert torch.equal(tvc_rs.prune_visual_tokens(x, scores=scores, keep=KEEP).tokens, torch_prune(x, scores, KEEP))
    indices = torch_prune(torch.arange(TOKENS)[:, None], scores, KEEP)[:, 0]
    nbytes = 2 * KEEP * DIM * 4 + TOKENS * 4
    fns = {
        "torch topk + sort + index_select": lambda: torch_prune(x, scores, KEEP),
        "tvc_rs.prune_visual_tokens(scores=, keep=)": lambda: tvc_rs.prune_visual_tokens(x, scores=scores, keep=KEEP),
        "tvc_rs.prune_visual_tokens(indices)": lambda: tvc_rs.prune_visual_tokens(x, indices),
    }
    rows += case_rows("prune", f"keep {KEEP} of {TOKENS}x{DIM} f32", compare(fns, **fast), nbytes, bandwidth)

    # --- scores
    for q_tokens in (1, 64):
        q = torch.randn(q_tokens, 28, 128)
        k = torch.randn(TOKENS, 4, 128)
        torch.testing.assert_close(tvc_rs.visual_token_scores(q, k), torch_scores(q, k), rtol=1e-4, atol=1e-7)
        nbytes = (q.numel() + k.numel() + TOKENS) * 4
        fns = {
            "torch matmul + softmax + mean": lambda: torch_scores(q, k),
            "tvc_rs.visual_token_scores": lambda: tvc_rs.visual_token_scores(q, k),
        }
        shape = f"q {q_tokens}x28x128, k {TOKENS}x4x128 f32"
        rows += case_rows("scores", shape, compare(fns, **(fast if q_tokens == 1 else slow)), nbytes, bandwidth)

    # --- merging
    torch.testing.assert_close(
        tvc_rs.prune_visual_tokens(x, indices, merge=True).tokens, torch_merge(x, indices), rtol=1e-4, atol=1e-5
    )
    nbytes = (TOKENS + KEEP) * DIM * 4
    fns = {
        "torch normalize + matmul + argmax + index_add_": lambda: torch_merge(x, indices),
        "tvc_rs.prune_visual_tokens(merge=True)": lambda: tvc_rs.prune_visual_tokens(x, indices, merge=True),
    }
    rows += case_rows("merge", f"{TOKENS - KEEP} into {KEEP}, dim {DIM} f32", compare(fns, **slow), nbytes, bandwidth)
    load_after = os.getloadavg()

    columns = ["op", "shape", "impl", "ms", "best ms", "GB/s", "of memcpy", "speedup vs torch", "speedup (best)"]
    print(
        f"memcpy bandwidth: {bandwidth / 1e9:.1f} GB/s; torch threads: {torch.get_num_threads()}; "
        f"load average before / after: {load_before[0]:.2f} / {load_after[0]:.2f}\n"
    )
    print(markdown_table(rows, columns))
    path = write_results(
        "compress-cpu" if not args.threads else f"compress-cpu-{args.threads}-threads",
        rows,
        command="python benches/bench_compress.py" + (f" --threads {args.threads}" if args.threads else ""),
        memcpy_bandwidth_GBps=bandwidth / 1e9,
        load_average_before=load_before,
        load_average_after=load_after,
    )
    print(f"\nwritten to {path}")


if __name__ == "__main__":
    main()
