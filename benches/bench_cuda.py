"""The CUDA kernels against the same work written with PyTorch CUDA operations, and against the
device's copy bandwidth, all measured in one run on one GPU.

Qwen2-VL-7B shapes: 28 layers, 4 KV heads, head_dim 128, bfloat16; images of 1296 visual tokens
(a 36 x 36 merged grid), 3584 wide; caches of 8k and 32k tokens; batch 1 and 32 (the batch-32
32k cache, 59 GB of keys and values, does not fit next to its PyTorch reference on an 80 GB
card, so contiguous caches at 32k run with batch 1 and 8).

What PyTorch does (the way a user writes it):
- pooling: ``F.avg_pool2d(..., 4, ceil_mode=True, count_include_pad=False)`` on the image grid;
- scores: ``softmax(q @ k^T * scale)`` with ``repeat_interleave`` for GQA, mean over rows;
- selection: ``topk`` + ``sort``, then ``index_select`` for pruning;
- re-rotation: transformers' rotate-half ``k * cos + rotate_half(k) * sin`` per layer, written
  back with ``copy_``;
- relocation: per layer, ``k[:, :, start:start + n] = rotate(k[:, :, end:])`` and the same copy
  of the values (``clone`` first: the ranges overlap);
- paged re-injection: per layer, advanced-index gather of the source slots, rotate-half, scatter
  into the destination slots (vLLM 0.33 NHD pages of 16 slots).

Each pair is checked for equal results first, then timed with CUDA events, alternating between
the two, median of the rounds. Memory-bound operations are also reported as a share of the copy
bandwidth (``dst.copy_(src)`` of 2 GiB, read + write counted) measured in the same run.
Targets (issue 4): >= 3x PyTorch for re-rotation, relocation and paged re-injection; >= 70% of
copy bandwidth for the memory-bound kernels at the large sizes.

Run: python benches/bench_cuda.py [--quick]   (writes benches/results/cuda-<device>.json)
"""

from __future__ import annotations

import argparse
import re
import statistics
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, markdown_table, write_results  # noqa: E402

import tvc_rs  # noqa: E402
from tvc_rs import cuda as tvc_cuda  # noqa: E402

LAYERS, KV_HEADS, Q_HEADS, HEAD_DIM, HIDDEN = 28, 4, 28, 128, 3584
THETA = 1_000_000.0
SECTIONS = [16, 24, 24]
GRID = 36  # 1296 visual tokens
IMAGE_START = 64
BLOCK = 16
DTYPE = torch.bfloat16
DEV = "cuda"


def rope(mrope: bool = False) -> dict:
    return dict(rope_theta=THETA, head_dim=HEAD_DIM, mrope_section=SECTIONS if mrope else None)


def gpu_time(fn, rounds: int = 7, inner: int = 3) -> float:
    """Median seconds of one call, from CUDA events around `inner` back-to-back calls."""
    times = []
    for _ in range(rounds):
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(inner):
            fn()
        stop.record()
        stop.synchronize()
        times.append(start.elapsed_time(stop) / 1e3 / inner)
    return statistics.median(times)


def time_pair(reference, ours, rounds: int = 7) -> tuple[float, float]:
    """Both warmed up, then measured alternately round by round."""
    for fn in (reference, ours, reference, ours):
        fn()
    torch.cuda.synchronize()
    ref, mine = [], []
    for _ in range(rounds):
        ref.append(gpu_time(reference, rounds=1))
        mine.append(gpu_time(ours, rounds=1))
    return statistics.median(ref), statistics.median(mine)


def copy_bandwidth(nbytes: int = 2 << 30) -> float:
    src = torch.empty(nbytes, dtype=torch.uint8, device=DEV).fill_(1)
    dst = torch.empty_like(src)
    seconds = gpu_time(lambda: dst.copy_(src), rounds=9)
    del src, dst
    return 2 * nbytes / seconds


def inv_freq() -> torch.Tensor:
    return 1.0 / (THETA ** (torch.arange(0, HEAD_DIM, 2, dtype=torch.float32, device=DEV) / HEAD_DIM))


def cos_sin(delta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[n, head_dim] cos / sin of per-token deltas, as transformers builds them (float32)."""
    freqs = delta[:, None].float() * inv_freq()
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2 :]
    return torch.cat((-x2, x1), dim=-1)


def rotated(k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return (k.float() * cos + rotate_half(k.float()) * sin).to(k.dtype)


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item() if a.numel() else 0.0


def row(op, variant, nbytes, t_torch, t_rs, bandwidth, diff, memory_bound=True):
    out = {
        "operation": op,
        "variant": variant,
        "MB moved": nbytes / 1e6,
        "torch ms": t_torch * 1e3,
        "tvc_rs ms": t_rs * 1e3,
        "speedup": t_torch / t_rs,
        "tvc_rs GB/s": nbytes / t_rs / 1e9,
        "share of copy BW": nbytes / t_rs / bandwidth if memory_bound else None,
        "max |diff|": diff,
    }
    print(f"  {op} / {variant}: torch {t_torch * 1e3:.3f} ms, tvc_rs {t_rs * 1e3:.3f} ms, x{t_torch / t_rs:.2f}", flush=True)
    return out


# ---------------------------------------------------------------- compression


def bench_compress(rows, bandwidth, batches):
    g = torch.Generator(device=DEV).manual_seed(0)
    for batch in batches:
        n = batch * GRID * GRID
        x = torch.randn(n, HIDDEN, device=DEV, dtype=DTYPE, generator=g)
        grids = [(1, GRID, GRID)] * batch

        def torch_pool():
            img = x.view(batch, GRID, GRID, HIDDEN).permute(0, 3, 1, 2)
            out = F.avg_pool2d(img, 4, ceil_mode=True, count_include_pad=False)
            return out.permute(0, 2, 3, 1).reshape(-1, HIDDEN)

        ours = tvc_rs.pool_visual_tokens(x, grids, 4)[0]
        diff = max_diff(ours, torch_pool())
        t_torch, t_rs = time_pair(torch_pool, lambda: tvc_rs.pool_visual_tokens(x, grids, 4))
        nbytes = (x.numel() + ours.numel()) * 2
        rows.append(row("pool 4x4", f"batch {batch} x 1296 tokens x {HIDDEN}", nbytes, t_torch, t_rs, bandwidth, diff))

        # Pruning: keep a quarter, gather (and merge) the kept rows.
        scores = torch.rand(n, device=DEV, generator=g)
        keep = n // 4

        def torch_prune():
            idx = scores.topk(keep).indices.sort().values
            return x.index_select(0, idx)

        ours = tvc_rs.prune_visual_tokens(x, scores=scores, keep=keep).tokens
        diff = max_diff(ours, torch_prune())
        t_torch, t_rs = time_pair(torch_prune, lambda: tvc_rs.prune_visual_tokens(x, scores=scores, keep=keep))
        nbytes = 2 * keep * HIDDEN * 2 + n * 4
        rows.append(row("select + gather (keep 1/4)", f"batch {batch}", nbytes, t_torch, t_rs, bandwidth, diff))
        if batch == 1:
            t_merge = gpu_time(lambda: tvc_rs.prune_visual_tokens(x, scores=scores, keep=keep, merge=True))
            rows.append({"operation": "select + merge (ToMe)", "variant": "batch 1", "tvc_rs ms": t_merge * 1e3})
        del x, scores

    # Scores: the last 8 text tokens' queries over one image's keys, 28 query heads, 4 KV heads.
    q = torch.randn(8, Q_HEADS, HEAD_DIM, device=DEV, dtype=DTYPE, generator=g)
    cache = torch.randn(KV_HEADS, 4096, HEAD_DIM, device=DEV, dtype=DTYPE, generator=g)
    k = cache[:, IMAGE_START : IMAGE_START + GRID * GRID].transpose(0, 1)

    def torch_scores():
        logits = torch.einsum("qhd,khd->qhk", q.float(), k.float().repeat_interleave(Q_HEADS // KV_HEADS, 1))
        return torch.softmax(logits / HEAD_DIM**0.5, dim=-1).mean(dim=(0, 1))

    diff = max_diff(tvc_rs.visual_token_scores(q, k), torch_scores())
    t_torch, t_rs = time_pair(torch_scores, lambda: tvc_rs.visual_token_scores(q, k))
    rows.append(row("visual_token_scores", "8 queries x 28 heads, 1296 keys", 0, t_torch, t_rs, bandwidth, diff, memory_bound=False))
    s = torch_scores()
    for rule, arg in (("keep", 324), ("mass", 0.9)):
        if rule == "keep":
            ref = lambda: s.topk(324).indices.sort().values  # noqa: E731
        else:
            def ref():
                order = s.sort(descending=True)
                count = int((order.values.double().cumsum(0) < 0.9 * s.double().sum()).sum().item()) + 1
                return order.indices[:count].sort().values
        t_torch, t_rs = time_pair(ref, lambda: tvc_rs.select_tokens(s, **{rule: arg}))
        rows.append(row("select_tokens", f"{rule}={arg}, 1296 scores", 0, t_torch, t_rs, bandwidth, 0.0, memory_bound=False))


# ---------------------------------------------------------------- KV cache


def bench_kv(rows, bandwidth, configs):
    g = torch.Generator(device=DEV).manual_seed(1)
    for batch, seq in configs:
        keys = [torch.randn(batch, KV_HEADS, seq, HEAD_DIM, device=DEV, dtype=DTYPE, generator=g) for _ in range(LAYERS)]
        values = [torch.randn(batch, KV_HEADS, seq, HEAD_DIM, device=DEV, dtype=DTYPE, generator=g) for _ in range(LAYERS)]
        label = f"batch {batch}, {seq // 1024}k cache"
        key_bytes = sum(k.numel() for k in keys) * 2

        # Re-rotate every key by one delta (e.g. an image evicted before them).
        delta = -GRID * GRID
        cos, sin = cos_sin(torch.full((seq,), delta, device=DEV))
        views = [k.view(batch * KV_HEADS, seq, HEAD_DIM).transpose(0, 1) for k in keys]  # [seq, batch*heads, dim]

        def torch_rerotate():
            for k in keys:
                k.copy_(rotated(k, cos, sin))

        check = [k.clone() for k in keys[:2]]
        tvc_rs.rerotate_keys(views[:2], delta, **rope())
        diff = max(max_diff(a, rotated(b, cos, sin)) for a, b in zip(keys[:2], check))
        for k, c in zip(keys[:2], check):
            k.copy_(c)
        del check
        t_torch, t_rs = time_pair(torch_rerotate, lambda: tvc_rs.rerotate_keys(views, delta, **rope()))
        rows.append(row("rerotate_keys (28 layers)", label, 2 * key_bytes, t_torch, t_rs, bandwidth, diff))

        # Relocate: evict a 1296-token image, shift everything after it down, keys re-rotated.
        start, end = IMAGE_START, IMAGE_START + GRID * GRID
        n = seq - end
        cos_n, sin_n = cos[:n], sin[:n]

        def torch_relocate():
            for k, v in zip(keys, values):
                k[:, :, start : start + n] = rotated(k[:, :, end:], cos_n, sin_n)
                v[:, :, start : start + n] = v[:, :, end:].clone()

        check_k, check_v = [k.clone() for k in keys[:1]], [v.clone() for v in values[:1]]
        tvc_rs.relocate_span(check_k, check_v, start, end, **rope())
        ref_k = rotated(keys[0][:, :, end:], cos_n, sin_n)
        diff = max(max_diff(check_k[0][:, :, start : start + n], ref_k), max_diff(check_v[0][:, :, start : start + n], values[0][:, :, end:]))
        del check_k, check_v, ref_k
        # Both run in place; every call moves the same amount of data (the tail stays stale).
        t_torch, t_rs = time_pair(torch_relocate, lambda: tvc_rs.relocate_span(keys, values, start, end, **rope()))
        rows.append(row("relocate_span (28 layers, K+V)", label, 2 * 2 * LAYERS * batch * KV_HEADS * n * HEAD_DIM * 2, t_torch, t_rs, bandwidth, diff))
        del keys, values, views
        torch.cuda.empty_cache()


def bench_paged(rows, bandwidth, configs):
    gen = np.random.default_rng(2)
    g = torch.Generator(device=DEV).manual_seed(2)
    for batch, seq in configs:
        label = f"{batch} request(s) x {seq // 1024}k"
        per_request = seq // BLOCK
        num_blocks = batch * per_request + 64
        caches = [torch.randn(num_blocks, BLOCK, KV_HEADS, 2 * HEAD_DIM, device=DEV, dtype=DTYPE, generator=g) for _ in range(LAYERS)]
        logical = [c.permute(0, 2, 1, 3) for c in caches]  # vLLM 0.33 view [blocks, heads, block, 2 * dim] (NHD)
        flat = [c.view(-1, KV_HEADS, 2 * HEAD_DIM) for c in caches]
        tables = gen.permutation(num_blocks)[: batch * per_request].reshape(batch, per_request)
        start, end = IMAGE_START, IMAGE_START + GRID * GRID
        n = seq - end
        pos, new_pos = np.arange(end, seq), np.arange(start, start + n)
        src = np.concatenate([t[pos // BLOCK] * BLOCK + pos % BLOCK for t in tables])
        dst = np.concatenate([t[new_pos // BLOCK] * BLOCK + new_pos % BLOCK for t in tables])  # same blocks: overlapping
        src_t, dst_t = torch.from_numpy(src).to(DEV), torch.from_numpy(dst).to(DEV)
        delta = -(end - start)
        cos, sin = cos_sin(torch.full((len(src),), delta, device=DEV))
        cos, sin = cos[:, None, :], sin[:, None, :]

        def torch_paged():
            for f in flat:
                entries = f[src_t]  # gather (a copy: every source read before any write)
                entries[..., :HEAD_DIM] = rotated(entries[..., :HEAD_DIM], cos, sin)
                f[dst_t] = entries

        # Equal results on the first two layers, then restored.
        saved = [c.clone() for c in caches[:2]]
        tvc_rs.paged_reinject(logical[:2], src, dst, delta, layout="vllm", **rope())
        ours = [c.clone() for c in caches[:2]]
        for c, s in zip(caches[:2], saved):
            c.copy_(s)
        for f in flat[:2]:
            entries = f[src_t]
            entries[..., :HEAD_DIM] = rotated(entries[..., :HEAD_DIM], cos, sin)
            f[dst_t] = entries
        diff = max(max_diff(a, b) for a, b in zip(ours, caches[:2]))
        del saved, ours
        t_torch, t_rs = time_pair(torch_paged, lambda: tvc_rs.paged_reinject(logical, src, dst, delta, layout="vllm", **rope()))
        nbytes = 2 * LAYERS * len(src) * KV_HEADS * 2 * HEAD_DIM * 2
        rows.append(row("paged_reinject (vLLM NHD, 28 layers)", label, nbytes, t_torch, t_rs, bandwidth, diff))
        del caches, logical, flat
        torch.cuda.empty_cache()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="batch 1 and the 8k cache only")
    args = parser.parse_args()
    if not torch.cuda.is_available() or not tvc_cuda.is_available():
        info = tvc_cuda.info()
        print(f"no usable CUDA device: torch.cuda.is_available()={torch.cuda.is_available()}, "
              f"driver: {info['driver_error'] or info['driver_version']}, NVRTC: {info['nvrtc_error'] or info['nvrtc_path']}")
        return
    props = torch.cuda.get_device_properties(0)
    print(f"{props.name}, {props.total_memory / 2**30:.0f} GiB; compiling kernels ...", flush=True)
    tvc_cuda.warmup(0)
    bandwidth = copy_bandwidth()
    print(f"copy bandwidth (torch copy_ of 2 GiB, read + write): {bandwidth / 1e9:.0f} GB/s", flush=True)
    rows: list[dict] = []
    bench_compress(rows, bandwidth, [1] if args.quick else [1, 32])
    bench_kv(rows, bandwidth, [(1, 8192)] if args.quick else [(1, 8192), (32, 8192), (1, 32768), (8, 32768)])
    bench_paged(rows, bandwidth, [(1, 8192)] if args.quick else [(1, 8192), (32, 8192), (1, 32768), (8, 32768)])
    columns = ["operation", "variant", "MB moved", "torch ms", "tvc_rs ms", "speedup", "tvc_rs GB/s", "share of copy BW", "max |diff|"]
    print(markdown_table(rows, columns))
    device = re.sub(r"[^a-z0-9]+", "-", props.name.lower()).strip("-")
    info = tvc_cuda.info()
    path = write_results(
        f"cuda-{device}",
        rows,
        device=dict(name=props.name, capability=f"{props.major}.{props.minor}", memory_gib=round(props.total_memory / 2**30, 1),
                    multiprocessors=props.multi_processor_count),
        versions=dict(torch=torch.__version__, torch_cuda=torch.version.cuda, driver=info["driver_version"],
                      nvrtc=info["nvrtc_version"], tvc_rs=tvc_rs.__version__),
        copy_bandwidth_bytes_per_s=bandwidth,
        targets={"speedup vs torch (rerotate, relocate, paged)": 3.0, "share of copy bandwidth (memory-bound, large)": 0.7},
        shape=dict(layers=LAYERS, kv_heads=KV_HEADS, head_dim=HEAD_DIM, hidden=HIDDEN, image_tokens=GRID * GRID, dtype="bfloat16",
                   block_size=BLOCK),
        command="python benches/bench_cuda.py" + (" --quick" if args.quick else ""),
        host=machine(),
    )
    print(f"written {path}")


if __name__ == "__main__":
    main()
