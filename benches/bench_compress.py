"""Visual-token compression against PyTorch CPU doing the same work the usual way, in one run.

    python benches/bench_compress.py [--quick]

Cases (Qwen2-VL-7B sizes: a 1008 x 1008 image is a 36 x 36 grid of 3584-wide tokens after the
2x2 merge; 28 query heads, 4 kv heads, head_dim 128):

- pool: 4x4 average pooling (TVC's setting), torch ``avg_pool2d(ceil_mode=True,
  count_include_pad=False)`` on the channels-last view of ``x`` (its fastest form here; the
  channels-first form, which needs a transposing copy, is reported too);
- prune: keep 324 of 1296 tokens by score, torch ``topk`` + ``sort`` + ``index_select``;
- scores: FastV-style importance, torch matmul + softmax + mean (GQA by ``repeat_interleave``);
- merge: ToMe-style merge of the 972 dropped tokens into the 324 kept ones, torch normalise +
  matmul + argmax + ``index_add_``.

Each figure is the median wall time of many calls; "GB/s" counts the bytes the operation must
read and write at least once, "of memcpy" divides that by this machine's copy bandwidth measured
in the same run (``memcpy_bandwidth()``). Results go to ``benches/results/compress-cpu.json``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import markdown_table, memcpy_bandwidth, time_call, write_results  # noqa: E402

import tvc_rs  # noqa: E402

H = W = 36
DIM = 3584
TOKENS = H * W
KEEP = 324


def torch_pool_channels_last(x: torch.Tensor, k: int) -> torch.Tensor:
    y = F.avg_pool2d(x.view(1, H, W, -1).permute(0, 3, 1, 2), k, ceil_mode=True, count_include_pad=False)
    return y.permute(0, 2, 3, 1).reshape(-1, x.shape[1])


def torch_pool_channels_first(x: torch.Tensor, k: int) -> torch.Tensor:
    y = F.avg_pool2d(x.t().reshape(-1, H, W), k, ceil_mode=True, count_include_pad=False)
    return y.reshape(x.shape[1], -1).t().contiguous()


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


def row(op, shape, impl, seconds, nbytes, bandwidth, baseline=None):
    out = {
        "op": op,
        "shape": shape,
        "impl": impl,
        "ms": seconds * 1e3,
        "GB/s": nbytes / seconds / 1e9,
        "of memcpy": nbytes / seconds / bandwidth,
    }
    if baseline is not None:
        out["speedup vs torch"] = baseline / seconds
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats (a smoke run)")
    args = parser.parse_args()
    repeat = 5 if args.quick else 30
    min_seconds = 0.05 if args.quick else 0.5

    def timed(fn):
        return time_call(fn, repeat=repeat, min_seconds=min_seconds)

    torch.manual_seed(0)
    bandwidth = memcpy_bandwidth()
    rows: list[dict] = []
    grid = [(1, H, W)]

    # --- pooling
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(TOKENS, DIM).to(dtype)
        esize = x.element_size()
        ours, _ = tvc_rs.pool_visual_tokens(x, grid, 4)
        torch.testing.assert_close(ours.float(), torch_pool_channels_last(x, 4).float(), rtol=1e-2, atol=1e-2)
        nbytes = (TOKENS + ours.shape[0]) * DIM * esize
        shape = f"{H}x{W}x{DIM} {str(dtype)[6:]}, 4x4"
        base = timed(lambda: torch_pool_channels_last(x, 4))
        rows.append(row("pool", shape, "torch avg_pool2d (channels-last view)", base, nbytes, bandwidth))
        if dtype == torch.float32:
            rows.append(
                row("pool", shape, "torch avg_pool2d (channels-first copy)",
                    timed(lambda: torch_pool_channels_first(x, 4)), nbytes, bandwidth, base)
            )
        rows.append(row("pool", shape, "tvc_rs.pool_visual_tokens",
                        timed(lambda: tvc_rs.pool_visual_tokens(x, grid, 4)), nbytes, bandwidth, base))

    # --- pruning
    x = torch.randn(TOKENS, DIM)
    scores = torch.rand(TOKENS)
    assert torch.equal(tvc_rs.prune_visual_tokens(x, scores=scores, keep=KEEP).tokens, torch_prune(x, scores, KEEP))
    nbytes = 2 * KEEP * DIM * 4 + TOKENS * 4
    shape = f"keep {KEEP} of {TOKENS}x{DIM} f32"
    base = timed(lambda: torch_prune(x, scores, KEEP))
    rows.append(row("prune", shape, "torch topk + sort + index_select", base, nbytes, bandwidth))
    rows.append(row("prune", shape, "tvc_rs.prune_visual_tokens(scores=, keep=)",
                    timed(lambda: tvc_rs.prune_visual_tokens(x, scores=scores, keep=KEEP)), nbytes, bandwidth, base))
    indices = torch_prune(torch.arange(TOKENS)[:, None], scores, KEEP)[:, 0]
    rows.append(row("prune", shape, "tvc_rs.prune_visual_tokens(indices)",
                    timed(lambda: tvc_rs.prune_visual_tokens(x, indices)), nbytes, bandwidth, base))

    # --- scores
    for q_tokens in (1, 64):
        q = torch.randn(q_tokens, 28, 128)
        k = torch.randn(TOKENS, 4, 128)
        torch.testing.assert_close(tvc_rs.visual_token_scores(q, k), torch_scores(q, k), rtol=1e-4, atol=1e-7)
        nbytes = (q.numel() + k.numel() + TOKENS) * 4
        shape = f"q {q_tokens}x28x128, k {TOKENS}x4x128 f32"
        base = timed(lambda: torch_scores(q, k))
        rows.append(row("scores", shape, "torch matmul + softmax + mean", base, nbytes, bandwidth))
        rows.append(row("scores", shape, "tvc_rs.visual_token_scores",
                        timed(lambda: tvc_rs.visual_token_scores(q, k)), nbytes, bandwidth, base))

    # --- merging
    kept = indices
    torch.testing.assert_close(tvc_rs.prune_visual_tokens(x, kept, merge=True).tokens, torch_merge(x, kept), rtol=1e-4, atol=1e-5)
    nbytes = (TOKENS + KEEP) * DIM * 4
    shape = f"{TOKENS - KEEP} into {KEEP}, dim {DIM} f32"
    slow = dict(repeat=3 if args.quick else 10, min_seconds=0.05 if args.quick else 1.0)
    base = time_call(lambda: torch_merge(x, kept), **slow)
    rows.append(row("merge", shape, "torch normalize + matmul + argmax + index_add_", base, nbytes, bandwidth))
    rows.append(row("merge", shape, "tvc_rs.prune_visual_tokens(merge=True)",
                    time_call(lambda: tvc_rs.prune_visual_tokens(x, kept, merge=True), **slow), nbytes, bandwidth, base))

    columns = ["op", "shape", "impl", "ms", "GB/s", "of memcpy", "speedup vs torch"]
    print(f"memcpy bandwidth: {bandwidth / 1e9:.1f} GB/s; torch threads: {torch.get_num_threads()}\n")
    print(markdown_table(rows, columns))
    path = write_results("compress-cpu", rows, memcpy_bandwidth_GBps=bandwidth / 1e9, command="python benches/bench_compress.py")
    print(f"\nwritten to {path}")


if __name__ == "__main__":
    main()
