"""KV-cache re-injection: tvc_rs against PyTorch CPU doing the same work the usual way.

Cache shaped like Qwen2-VL-7B's at 8k tokens: 28 layers, 4 KV heads, head_dim 128, float32,
transformers' layout [batch, kv_heads, seq, head_dim] per layer (vLLM: NHD pages of 16 slots).

- re-rotate every key: PyTorch with transformers' rotate-half formula (`k * cos + rotate_half(k) * sin`,
  cos/sin built from the deltas as transformers builds them) against `tvc_rs.rerotate_keys`;
  plain RoPE and M-RoPE (mrope_section [16, 24, 24]).
- relocate_span: evict a 1296-token image and shift the rest down, re-rotated: `torch.cat` +
  rotate-half against `tvc_rs.relocate_span` (in place).
- relocate_spans: evict 3 image blocks in one pass (float32 and bfloat16, M-RoPE (t,h,w) deltas):
  `tvc_rs.relocate_spans` against `tvc_rs.relocate_span` once per block (the first call rotating
  every later entry to its final position, the others only shifting) and against PyTorch the way
  a user writes it: `index_select` of the kept entries + a float32 rotate-half + `torch.cat`.
- paged reinject: the same move in a vLLM 0.33 paged cache: advanced-index gather, rotate-half,
  scatter against `tvc_rs.paged_reinject`.

Each operation is checked for equal results first, then timed; throughput is reported as a share
of this machine's copy bandwidth (`memcpy_bandwidth()`, measured in the same run).

Run: python benches/bench_kv.py  (writes benches/results/kv-cpu.json);
python benches/bench_kv.py --only spans  (the relocate_spans rows alone: kv-spans-cpu.json)
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from transformers.models.qwen2_vl.modeling_qwen2_vl import rotate_half

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import markdown_table, memcpy_bandwidth, write_results  # noqa: E402

import tvc_rs  # noqa: E402

LAYERS, KV_HEADS, SEQ, HEAD_DIM = 28, 4, 8192, 128
THETA = 1_000_000.0
SECTIONS = [16, 24, 24]
IMAGE_START, IMAGE_TOKENS = 64, 1296
SPAN_GAP = 2400  # relocate_spans: blocks at 64, 2464, 4864
BLOCK = 16


def inv_freq() -> torch.Tensor:
    # As transformers computes it (float32).
    return 1.0 / (THETA ** (torch.arange(0, HEAD_DIM, 2, dtype=torch.float) / HEAD_DIM))


def cos_sin(delta: torch.Tensor, mrope: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin [n, head_dim] for deltas [n] or [n, 3], the way transformers builds them."""
    if not mrope:
        freqs = delta[:, None].float() * inv_freq()
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos(), emb.sin()
    freqs = delta.T[..., None].float() * inv_freq()  # [3, n, half]
    freqs = torch.cat([m[i % 3] for i, m in enumerate(freqs.split(SECTIONS, dim=-1))], dim=-1)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


def torch_rerotate(keys: list[torch.Tensor], delta: torch.Tensor, mrope: bool) -> list[torch.Tensor]:
    cos, sin = cos_sin(delta, mrope)
    return [k * cos + rotate_half(k) * sin for k in keys]


def torch_relocate(keys, values, start, end, delta, mrope):
    cos, sin = cos_sin(delta, mrope)
    out_k, out_v = [], []
    for k, v in zip(keys, values):
        moved = k[:, :, end:]
        out_k.append(torch.cat([k[:, :, :start], moved * cos + rotate_half(moved) * sin], dim=2))
        out_v.append(torch.cat([v[:, :, :start], v[:, :, end:]], dim=2))
    return out_k, out_v


def torch_paged(flat_caches, src, dst, delta, mrope):
    """flat_caches: per layer [num_slots, kv_heads, 2 * head_dim] (vLLM NHD pages, flattened)."""
    cos, sin = cos_sin(delta, mrope)
    cos, sin = cos[:, None, :], sin[:, None, :]
    for flat in flat_caches:
        entries = flat[src]  # gather (a copy: every source read before any write)
        k = entries[..., :HEAD_DIM]
        entries[..., :HEAD_DIM] = k * cos + rotate_half(k) * sin
        flat[dst] = entries


def time_pair(reference, ours, rounds: int = 5) -> tuple[float, float]:
    """Median seconds per call of each, measured alternately so that load from other processes
    on this shared machine hits both alike."""
    reference()
    ours()
    ref_times, our_times = [], []
    for _ in range(rounds):
        t0 = time.perf_counter()
        reference()
        ref_times.append(time.perf_counter() - t0)
        for _ in range(3):
            t0 = time.perf_counter()
            ours()
            our_times.append(time.perf_counter() - t0)
    return statistics.median(ref_times), statistics.median(our_times)


def torch_relocate_spans(keys, values, kept, start, delta):
    """PyTorch: gather the kept entries from `start` on, rotate them in float32, concatenate."""
    cos, sin = cos_sin(delta, True)
    out_k, out_v = [], []
    for k, v in zip(keys, values):
        moved = k.index_select(2, kept).float()
        out_k.append(torch.cat([k[:, :, :start], (moved * cos + rotate_half(moved) * sin).to(k.dtype)], dim=2))
        out_v.append(torch.cat([v[:, :, :start], v.index_select(2, kept)], dim=2))
    return out_k, out_v


def repeated_relocate_span(keys, values, spans, delta):
    """One relocate_span per block, first to last, as hf/session.py did before relocate_spans:
    the first call rotates every later entry to its final delta (the later blocks' entries by 0:
    they go next), the later calls only shift."""
    moved = torch.ones(SEQ, dtype=torch.bool)
    moved[: spans[0][0]] = False
    for s, e in spans:
        moved[s:e] = False
    full = torch.zeros(SEQ, 3, dtype=torch.int64)
    full[moved] = delta
    length, dropped = SEQ, 0
    for s, e in spans:
        d = full[e:] if dropped == 0 else 0
        length = tvc_rs.relocate_span(keys, values, s - dropped, e - dropped, delta=d, length=length, **rope_kwargs(True))
        dropped += e - s
    return length


def time_three(reference, *ours, rounds: int = 5) -> list[float]:
    """Median seconds per call of each, measured alternately (as time_pair)."""
    fns = [reference, *ours]
    for fn in fns:
        fn()
    times = [[] for _ in fns]
    for _ in range(rounds):
        for i, fn in enumerate(fns):
            for _ in range(1 if i == 0 else 3):
                t0 = time.perf_counter()
                fn()
                times[i].append(time.perf_counter() - t0)
    return [statistics.median(t) for t in times]


def bench_spans(keys, values, g, bandwidth) -> list[dict]:
    """3 image blocks evicted at once, float32 and bfloat16."""
    spans = [(IMAGE_START + i * SPAN_GAP, IMAGE_START + i * SPAN_GAP + IMAGE_TOKENS) for i in range(3)]
    kept_mask = torch.ones(SEQ, dtype=torch.bool)
    kept_mask[: spans[0][0]] = False
    for s, e in spans:
        kept_mask[s:e] = False
    kept = kept_mask.nonzero()[:, 0]
    moved = len(kept)
    start = spans[0][0]
    delta = torch.from_numpy(g.integers(-6000, 0, (moved, 3)))
    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        k0 = [k.to(dtype) for k in keys]
        v0 = [v.to(dtype) for v in values]
        size = k0[0].element_size()
        moved_bytes = 2 * 2 * LAYERS * KV_HEADS * moved * HEAD_DIM * size  # K and V, read and write
        wk, wv = [k.clone() for k in k0], [v.clone() for v in v0]
        rk, rv = [k.clone() for k in k0], [v.clone() for v in v0]
        new_len = tvc_rs.relocate_spans(wk, wv, spans, delta=delta, **rope_kwargs(True))
        assert repeated_relocate_span(rk, rv, spans, delta) == new_len == start + moved
        ref_k, ref_v = torch_relocate_spans(k0, v0, kept, start, delta)
        diff = max(
            max((a[:, :, :new_len].float() - b.float()).abs().max().item() for a, b in zip(wk, ref_k)),
            max((a[:, :, :new_len].float() - b.float()).abs().max().item() for a, b in zip(wv, ref_v)),
        )
        diff_repeated = max((a[:, :, :new_len].float() - b[:, :, :new_len].float()).abs().max().item() for a, b in zip(wk, rk))
        del ref_k, ref_v
        t_torch, t_rs, t_rep = time_three(
            lambda: torch_relocate_spans(k0, v0, kept, start, delta),
            lambda: tvc_rs.relocate_spans(wk, wv, spans, delta=delta, **rope_kwargs(True)),
            lambda: repeated_relocate_span(rk, rv, spans, delta),
        )
        name = f"M-RoPE (t,h,w), {str(dtype).split('.')[-1]}"
        r = row("relocate_spans (3 x 1296-token images)", name, moved_bytes, t_torch, t_rs, bandwidth, diff)
        r.update({"relocate_span x3 s": t_rep, "speedup vs relocate_span x3": t_rep / t_rs,
                  "max |diff| vs relocate_span x3": diff_repeated})
        rows.append(r)
        del k0, v0, wk, wv, rk, rv
    return rows


def rope_kwargs(mrope: bool) -> dict:
    return dict(rope_theta=THETA, head_dim=HEAD_DIM, mrope_section=SECTIONS if mrope else None)


def row(operation, variant, nbytes, t_torch, t_rs, bandwidth, max_diff):
    return {
        "operation": operation,
        "variant": variant,
        "MB moved": nbytes / 1e6,
        "torch s": t_torch,
        "tvc_rs s": t_rs,
        "speedup": t_torch / t_rs,
        "torch GB/s": nbytes / t_torch / 1e9,
        "tvc_rs GB/s": nbytes / t_rs / 1e9,
        "tvc_rs share of memcpy": nbytes / t_rs / bandwidth,
        "max |diff|": max_diff,
    }


def main() -> None:
    only_spans = sys.argv[1:] == ["--only", "spans"]
    torch.manual_seed(0)
    g = np.random.default_rng(0)
    bandwidth = memcpy_bandwidth()
    print(f"memcpy bandwidth: {bandwidth / 1e9:.2f} GB/s (read + write), torch threads: {torch.get_num_threads()}")
    rows = []
    keys = [torch.randn(1, KV_HEADS, SEQ, HEAD_DIM) for _ in range(LAYERS)]
    values = [torch.randn(1, KV_HEADS, SEQ, HEAD_DIM) for _ in range(LAYERS)]
    if only_spans:
        rows = bench_spans(keys, values, g, bandwidth)
        columns = ["operation", "variant", "MB moved", "torch s", "tvc_rs s", "relocate_span x3 s", "speedup",
                   "speedup vs relocate_span x3", "tvc_rs GB/s", "tvc_rs share of memcpy", "max |diff|",
                   "max |diff| vs relocate_span x3"]
        print(markdown_table(rows, columns))
        path = write_results("kv-spans-cpu", rows, memcpy_bandwidth_bytes_per_s=bandwidth,
                             shape=dict(layers=LAYERS, kv_heads=KV_HEADS, seq=SEQ, head_dim=HEAD_DIM, spans=3,
                                        image_tokens=IMAGE_TOKENS), command="python benches/bench_kv.py --only spans")
        print(f"written {path}")
        return
    key_bytes = sum(k.numel() * k.element_size() for k in keys)

    # ---- re-rotate every key
    variants = [
        ("RoPE, one delta", False, torch.full((SEQ,), -IMAGE_TOKENS, dtype=torch.int64)),
        ("RoPE, distinct deltas", False, torch.from_numpy(g.integers(-8192, 8192, SEQ))),
        ("M-RoPE, distinct (t,h,w)", True, torch.from_numpy(g.integers(-8192, 8192, (SEQ, 3)))),
    ]
    for name, mrope, delta in variants:
        work = [k.clone() for k in keys]
        views = [k[0].transpose(0, 1) for k in work]  # [seq, heads, dim] views of the cache
        tvc_rs.rerotate_keys(views, delta, **rope_kwargs(mrope))
        want = torch_rerotate(keys, delta, mrope)
        diff = max((a - b).abs().max().item() for a, b in zip(work, want))
        t_torch, t_rs = time_pair(
            lambda: torch_rerotate(keys, delta, mrope), lambda: tvc_rs.rerotate_keys(views, delta, **rope_kwargs(mrope))
        )
        rows.append(row("re-rotate all keys", name, 2 * key_bytes, t_torch, t_rs, bandwidth, diff))
        del work, views, want

    # ---- the same in bfloat16 (the dtype Qwen2-VL runs in)
    keys_bf16 = [k.to(torch.bfloat16) for k in keys]
    delta = torch.full((SEQ,), -IMAGE_TOKENS, dtype=torch.int64)
    work = [k.clone() for k in keys_bf16]
    views = [k[0].transpose(0, 1) for k in work]
    tvc_rs.rerotate_keys(views, delta, **rope_kwargs(False))
    want = torch_rerotate(keys_bf16, delta, False)
    diff = max((a.float() - b.float()).abs().max().item() for a, b in zip(work, want))
    t_torch, t_rs = time_pair(
        lambda: torch_rerotate(keys_bf16, delta, False), lambda: tvc_rs.rerotate_keys(views, delta, **rope_kwargs(False))
    )
    rows.append(row("re-rotate all keys", "RoPE, one delta, bfloat16", key_bytes, t_torch, t_rs, bandwidth, diff))
    del keys_bf16, work, views, want

    # ---- relocate_span: evict the image, shift the rest down re-rotated
    start, end = IMAGE_START, IMAGE_START + IMAGE_TOKENS
    moved = SEQ - end
    moved_bytes = 2 * 2 * LAYERS * KV_HEADS * moved * HEAD_DIM * 4  # K and V, read and write
    for name, mrope, delta in [
        ("RoPE, -(end - start)", False, torch.full((moved,), -(end - start), dtype=torch.int64)),
        ("M-RoPE, per-token (t,h,w)", True, torch.from_numpy(g.integers(-2000, 0, (moved, 3)))),
    ]:
        wk, wv = [k.clone() for k in keys], [v.clone() for v in values]
        new_len = tvc_rs.relocate_span(wk, wv, start, end, delta=delta, **rope_kwargs(mrope))
        ref_k, ref_v = torch_relocate(keys, values, start, end, delta, mrope)
        diff = max(
            max((a[:, :, :new_len] - b).abs().max().item() for a, b in zip(wk, ref_k)),
            max((a[:, :, :new_len] - b).abs().max().item() for a, b in zip(wv, ref_v)),
        )
        # In place: each call moves the same amount of data (the tail stays stale).
        t_torch, t_rs = time_pair(
            lambda: torch_relocate(keys, values, start, end, delta, mrope),
            lambda: tvc_rs.relocate_span(wk, wv, start, end, delta=delta, **rope_kwargs(mrope)),
        )
        rows.append(row("relocate_span (1296-token image)", name, moved_bytes, t_torch, t_rs, bandwidth, diff))
        del wk, wv, ref_k, ref_v

    # ---- relocate_spans: 3 image blocks in one pass
    rows += bench_spans(keys, values, g, bandwidth)

    # ---- paged reinject: vLLM 0.33 NHD pages, the same move
    del values
    num_blocks = 2 * SEQ // BLOCK + 8  # room for a fresh copy of the request
    table = torch.from_numpy(g.permutation(num_blocks)[: SEQ // BLOCK])
    pos = torch.arange(SEQ)
    slots = table[pos // BLOCK] * BLOCK + pos % BLOCK
    src = slots[end:]
    unused_blocks = torch.from_numpy(np.setdiff1d(np.arange(num_blocks), table.numpy()))
    fresh_table = unused_blocks[torch.from_numpy(g.permutation(len(unused_blocks))[: -(-moved // BLOCK)])]
    new_pos = torch.arange(moved) + start
    fresh_pos = new_pos - start  # a fresh request holding only the moved entries
    delta = torch.full((moved,), -(end - start), dtype=torch.int64)
    for name, dst in [
        # Evict within the request's own blocks: sources and destinations overlap.
        ("same block table (overlapping)", slots[start : start + moved]),
        # Into blocks the request does not use, through a fresh block table.
        ("fresh block table", fresh_table[fresh_pos // BLOCK] * BLOCK + fresh_pos % BLOCK),
    ]:
        ours = [torch.randn(num_blocks, BLOCK, KV_HEADS, 2 * HEAD_DIM) for _ in range(LAYERS)]
        ref = [p.clone() for p in ours]
        logical = [p.permute(0, 2, 1, 3) for p in ours]  # [num_blocks, kv_heads, block, 2 * head_dim]
        tvc_rs.paged_reinject(logical, src, dst, delta, layout="vllm", **rope_kwargs(False))
        flat_ref = [p.view(-1, KV_HEADS, 2 * HEAD_DIM) for p in ref]
        torch_paged(flat_ref, src, dst, delta, False)
        diff = max((a - b).abs().max().item() for a, b in zip(ours, ref))
        t_torch, t_rs = time_pair(
            lambda: torch_paged(flat_ref, src, dst, delta, False),
            lambda: tvc_rs.paged_reinject(logical, src, dst, delta, layout="vllm", **rope_kwargs(False)),
        )
        rows.append(row("paged_reinject (vLLM NHD, block 16)", name, moved_bytes, t_torch, t_rs, bandwidth, diff))
        del ours, ref, logical, flat_ref

    columns = ["operation", "variant", "MB moved", "torch s", "tvc_rs s", "speedup", "torch GB/s", "tvc_rs GB/s",
               "tvc_rs share of memcpy", "max |diff|"]
    print(markdown_table(rows, columns))
    path = write_results(
        "kv-cpu",
        rows,
        memcpy_bandwidth_bytes_per_s=bandwidth,
        shape=dict(layers=LAYERS, kv_heads=KV_HEADS, seq=SEQ, head_dim=HEAD_DIM, dtype="float32",
                   image_tokens=IMAGE_TOKENS, block_size=BLOCK),
        command="python benches/bench_kv.py",
    )
    print(f"written {path}")


if __name__ == "__main__":
    main()
