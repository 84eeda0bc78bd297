"""The launches of src/cuda/compress.rs and src/cuda/kv.rs, from CPU tensors, for the host kernels.

Each function here follows one Rust launcher (named in its docstring): the same kernel choice
(dtype, packed `v` or scalar `s`, NeoX or GPT-J), argument struct, grid, block and dynamic shared
memory, the same splitting into launches (grids per launch, layer groups, row segments) and the
same host-side preparation (delta tables, paged move order, staging). "Device memory" is the
tensors' own memory; the host arrays the Rust code uploads are separate NumPy arrays here (kept
alive until the launch returns), so a sanitized build sees each one's bounds. Argument checks
are the Rust code's (and tested there); these functions expect valid input.
"""

from __future__ import annotations

import ctypes as C
import math

import numpy as np
import torch

from . import Kernels

# ------------------------------------------------------------------ argument structs (the .cu / .rs mirrors)

MAX_GRIDS = 64
MAX_LAYERS = 32
MAX_APPEND_LAYERS = 24
MAX_HALF = 128
MAX_TABLE = 32
# cudaDevAttrMaxSharedMemoryPerBlockOptin of sm_90 (H100 / H200): decides select_mass's path.
MAX_SHARED_OPTIN = 232448
# Multiprocessors of the device the row segments are planned for (`Device::multiprocessors`): an
# H200's 132.
MULTIPROCESSORS = 132

i64, i32, u64, f64, f32 = C.c_int64, C.c_int32, C.c_uint64, C.c_double, C.c_float


def struct(name, fields):
    return type(name, (C.Structure,), {"_fields_": fields})


PoolArgs = struct("PoolArgs", [("x", u64), ("out", u64), ("row_stride", i64), ("col_stride", i64), ("dim", i64),
                               ("in_start", i64 * MAX_GRIDS), ("out_start", i64 * (MAX_GRIDS + 1)), ("t", i32 * MAX_GRIDS),
                               ("h", i32 * MAX_GRIDS), ("w", i32 * MAX_GRIDS), ("num_grids", i32), ("kh", i32), ("kw", i32),
                               ("pad", i32)])
ScoresArgs = struct("ScoresArgs", [("query", u64), ("keys", u64), ("lse", u64), ("row_lse", u64), ("out", u64),
                                   ("query_strides", i64 * 3), ("key_strides", i64 * 3), ("lse_strides", i64 * 2),
                                   ("q_tokens", i64), ("k_tokens", i64), ("q_heads", i32), ("kv_heads", i32), ("head_dim", i32),
                                   ("lse_dtype", i32), ("scale", f32), ("pad", i32)])
SelectArgs = struct("SelectArgs", [("scores", u64), ("out", u64), ("n", i64), ("stride", i64), ("count", i64), ("dtype", i32),
                                   ("pad", i32)])
MassArgs = struct("MassArgs", [("scores", u64), ("out", u64), ("header", u64), ("n", i64), ("stride", i64), ("mass", f64),
                               ("min_keep", i64), ("max_keep", i64), ("dtype", i32), ("pow2", i32)])
GatherArgs = struct("GatherArgs", [("x", u64), ("out", u64), ("indices", u64), ("count", i64), ("dim", i64), ("row_stride", i64),
                                   ("col_stride", i64)])
CellsArgs = struct("CellsArgs", [("indices", u64), ("out", u64), ("count", i64), ("in_start", i64 * (MAX_GRIDS + 1)),
                                 ("t", i32 * MAX_GRIDS), ("h", i32 * MAX_GRIDS), ("w", i32 * MAX_GRIDS), ("num_grids", i32),
                                 ("pad", i32)])
ComplementArgs = struct("ComplementArgs", [("kept", u64), ("dropped", u64), ("n", i64), ("count", i64)])
NormArgs = struct("NormArgs", [("x", u64), ("out", u64), ("rows", u64), ("count", i64), ("dim", i64), ("row_stride", i64),
                               ("col_stride", i64)])
SimilarityArgs = struct("SimilarityArgs", [("x", u64), ("kept", u64), ("dropped", u64), ("inv_norms", u64), ("target", u64),
                                           ("n_kept", i64), ("n_dropped", i64), ("dim", i64), ("row_stride", i64),
                                           ("col_stride", i64)])
MergeArgs = struct("MergeArgs", [("x", u64), ("out", u64), ("kept", u64), ("dropped", u64), ("target", u64), ("n_kept", i64),
                                 ("n_dropped", i64), ("dim", i64), ("row_stride", i64), ("col_stride", i64)])

RopeArgs = struct("RopeArgs", [("inv_freq", f64 * MAX_HALF), ("comp", C.c_uint8 * MAX_HALF), ("half", i32), ("head_dim", i32),
                               ("interleaved", i32), ("pad", i32)])
DeltaArgs = struct("DeltaArgs", [("ptr", u64), ("same", i64 * 3), ("token_stride", i64), ("comp_stride", i64), ("kind", i32),
                                 ("is_i64", i32)])
AngleSource = struct("AngleSource", [("map", u64), ("table_rows", i32), ("pad", i32)])
RerotateArgs = struct("RerotateArgs", [("layers", u64 * MAX_LAYERS), ("tokens", i64), ("token_stride", i64), ("head_stride", i64),
                                       ("dim_stride", i64), ("delta", DeltaArgs), ("rope", RopeArgs), ("n_layers", i32),
                                       ("heads", i32)])
RelocateArgs = struct("RelocateArgs", [("keys", u64 * MAX_LAYERS), ("values", u64 * MAX_LAYERS), ("key_strides", i64 * 4),
                                       ("value_strides", i64 * 4), ("start", i64), ("end", i64), ("moved", i64), ("seg_rows", i64),
                                       ("removed", i64), ("n_runs", i64), ("runs", u64), ("delta", DeltaArgs), ("angles", AngleSource), ("rope", RopeArgs), ("n_layers", i32),
                                       ("batch", i32), ("heads", i32), ("key_dim", i32), ("value_dim", i32), ("pad", i32)])
AppendArgs = struct("AppendArgs", [("keys", u64 * MAX_APPEND_LAYERS), ("values", u64 * MAX_APPEND_LAYERS),
                                   ("new_keys", u64 * MAX_APPEND_LAYERS), ("new_values", u64 * MAX_APPEND_LAYERS),
                                   ("key_strides", i64 * 4), ("value_strides", i64 * 4), ("new_key_strides", i64 * 4),
                                   ("new_value_strides", i64 * 4), ("positions", u64), ("start", i64), ("n", i64),
                                   ("delta", DeltaArgs), ("rope", RopeArgs), ("rotate", i32), ("n_layers", i32), ("batch", i32),
                                   ("heads", i32), ("key_dim", i32), ("value_dim", i32)])
PagedArgs = struct("PagedArgs", [("caches", u64 * MAX_LAYERS), ("block_stride", i64), ("slot_stride", i64), ("head_stride", i64),
                                 ("dim_stride", i64), ("value_offset", i64), ("entries", u64), ("n_entries", i64),
                                 ("seg_entries", i64), ("staging", u64), ("layer0", i64), ("delta", DeltaArgs),
                                 ("angles", AngleSource), ("rope", RopeArgs), ("mode", i32), ("n_layers", i32),
                                 ("total_layers", i32), ("heads", i32), ("head_dim", i32), ("block_size", i32)])

SIZES = {
    "compress.cu": {s.__name__: C.sizeof(s) for s in (PoolArgs, ScoresArgs, SelectArgs, MassArgs, GatherArgs, CellsArgs,
                                                       ComplementArgs, NormArgs, SimilarityArgs, MergeArgs)},
    "kv.cu": {s.__name__: C.sizeof(s) for s in (RerotateArgs, RelocateArgs, AppendArgs, PagedArgs)},
}

_LIBS: dict[str, Kernels] = {}


def build_all() -> None:
    """Compiles both kernel files at once (two compilers in parallel), then loads them."""
    from concurrent.futures import ThreadPoolExecutor

    from . import build

    with ThreadPoolExecutor(len(SIZES)) as pool:
        list(pool.map(lambda f: build(f, SIZES[f]), SIZES))
    for file in SIZES:
        kernels(file)


def kernels(file: str) -> Kernels:
    """The loaded host build of kernels/<file> (built on first use)."""
    if file not in _LIBS:
        _LIBS[file] = Kernels(file, SIZES[file])
    return _LIBS[file]


# ------------------------------------------------------------------ helpers (src/cuda/compress.rs)


def ptr(t) -> int:
    return t.data_ptr() if isinstance(t, torch.Tensor) else t.ctypes.data


def tag(dtype) -> str:
    return {torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16"}[dtype]


def dtype_code(dtype) -> int:
    return {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}[dtype]


def rows_packed(x: torch.Tensor, out_ptr: int) -> bool:
    """compress.rs `rows_packed`."""
    w = 16 // x.element_size()
    dim, (s0, s1) = x.shape[1], x.stride()
    return (s1 == 1 or dim <= 1) and dim % w == 0 and s0 % w == 0 and ptr(x) % 16 == 0 and out_ptr % 16 == 0


def row_access(x, out_ptr):
    return (16 // x.element_size(), "v") if rows_packed(x, out_ptr) else (1, "s")


def cdiv(a, b):
    return -(-a // b)


def pooled_grid(g, kh, kw):
    t, h, w = g
    return (t, cdiv(h, kh), cdiv(w, kw))


# ------------------------------------------------------------------ compression


def pool(x: torch.Tensor, grids, kh: int, kw: int) -> torch.Tensor:
    """compress.rs `pool_visual_tokens`: one launch per 64 grids."""
    lib = kernels("compress.cu")
    new = [pooled_grid(g, kh, kw) for g in grids]
    count, dim = sum(t * h * w for t, h, w in new), x.shape[1]
    out = torch.empty(count, dim, dtype=x.dtype)
    if count == 0 or dim == 0:
        return out
    w, variant = row_access(x, ptr(out))
    in_start = out_start = 0
    for c in range(0, len(grids), MAX_GRIDS):
        chunk, pooled = grids[c : c + MAX_GRIDS], new[c : c + MAX_GRIDS]
        a = PoolArgs(x=ptr(x), out=ptr(out), row_stride=x.stride(0), col_stride=x.stride(1), dim=dim, num_grids=len(chunk),
                     kh=kh, kw=kw)
        first_out = out_start
        for i, (g, p) in enumerate(zip(chunk, pooled)):
            a.in_start[i], a.out_start[i] = in_start, out_start
            a.t[i], a.h[i], a.w[i] = g
            in_start += math.prod(g)
            out_start += math.prod(p)
        a.out_start[len(chunk)] = out_start
        lib.launch(f"pool_{tag(x.dtype)}_{variant}", (out_start - first_out, cdiv(cdiv(dim, w), 128)), 128, 0, a)
    return out


def scores(query: torch.Tensor, keys: torch.Tensor, lse: torch.Tensor | None, scale: float) -> torch.Tensor:
    """compress.rs `visual_token_scores`: the first k_tokens floats of the output."""
    lib = kernels("compress.cu")
    k_tokens = keys.shape[0]
    rows = query.shape[0] * query.shape[1]
    out = torch.full((k_tokens + rows,), float("nan"), dtype=torch.float32)
    if k_tokens == 0:
        return out[:0]
    a = ScoresArgs(query=ptr(query), keys=ptr(keys), lse=0 if lse is None else ptr(lse), row_lse=ptr(out) + 4 * k_tokens,
                   out=ptr(out), q_tokens=query.shape[0], k_tokens=k_tokens, q_heads=query.shape[1], kv_heads=keys.shape[1],
                   head_dim=query.shape[2], lse_dtype=0 if lse is None else dtype_code(lse.dtype), scale=scale)
    a.query_strides[:] = query.stride()
    a.key_strides[:] = keys.stride()
    if lse is not None:
        a.lse_strides[:] = lse.stride()
    t = tag(query.dtype)
    if lse is None:
        lib.launch(f"scores_rows_{t}", (rows,), 256, 0, a)
    lib.launch(f"scores_keys_{t}", (cdiv(k_tokens, 8),), 256, 0, a)
    return out[:k_tokens]


def select_topk(s: torch.Tensor, count: int) -> np.ndarray:
    """compress.rs `select_topk`."""
    out = np.full(count, -1, np.int64)
    if count == 0 or s.shape[0] == 0:
        return out
    a = SelectArgs(scores=ptr(s), out=ptr(out), n=s.shape[0], stride=s.stride(0), count=count, dtype=dtype_code(s.dtype))
    kernels("compress.cu").launch("select_topk", (1,), 1024, 0, a)
    return out


def select_mass(s: torch.Tensor, mass: float, min_keep: int, max_keep: int | None):
    """compress.rs `select_mass` on the GPU path: the kept indices, or ("nan" | "bad", index, value
    bits) from the header; None where the Rust code selects on the host (too many scores)."""
    n = s.shape[0]
    pow2 = 1 << max(0, (n - 1).bit_length())
    if not (n > 0 and pow2 * 8 <= MAX_SHARED_OPTIN and n < (1 << 30)):
        return None
    ws = np.full(n + 4, -7, np.int64)
    a = MassArgs(scores=ptr(s), out=ptr(ws), header=ptr(ws) + 8 * n, n=n, stride=s.stride(0), mass=mass, min_keep=min_keep,
                 max_keep=-1 if max_keep is None else max_keep, dtype=dtype_code(s.dtype), pow2=pow2)
    kernels("compress.cu").launch("select_mass", (1,), 1024, pow2 * 8, a)
    header = ws[n:]
    if header[0] >= 0:
        return ws[: header[0]].copy()
    if header[1] >= 0:
        return ("nan", int(header[1]), 0)
    return ("bad", int(header[2]), int(header[3]))


def gather(x: torch.Tensor, indices: np.ndarray) -> torch.Tensor:
    """compress.rs `gather`."""
    count, dim = len(indices), x.shape[1]
    out = torch.empty(count, dim, dtype=x.dtype)
    if count == 0 or dim == 0:
        return out
    w, variant = row_access(x, ptr(out))
    a = GatherArgs(x=ptr(x), out=ptr(out), indices=ptr(indices), count=count, dim=dim, row_stride=x.stride(0),
                   col_stride=x.stride(1))
    kernels("compress.cu").launch(f"gather_{tag(x.dtype)}_{variant}", (count, cdiv(cdiv(dim, w), 128)), 128, 0, a)
    return out


def token_cells(indices: np.ndarray, grids) -> np.ndarray:
    """compress.rs `token_cells`: one launch per 64 grids."""
    count = len(indices)
    out = np.full((count, 3), -1, np.int64)
    if count == 0:
        return out
    start = 0
    for c in range(0, len(grids), MAX_GRIDS):
        chunk = grids[c : c + MAX_GRIDS]
        a = CellsArgs(indices=ptr(indices), out=ptr(out), count=count, num_grids=len(chunk))
        for i, g in enumerate(chunk):
            a.in_start[i] = start
            a.t[i], a.h[i], a.w[i] = g
            start += math.prod(g)
        a.in_start[len(chunk)] = start
        kernels("compress.cu").launch("token_cells", (cdiv(count, 256),), 256, 0, a)
    return out


def merge(x: torch.Tensor, kept: np.ndarray) -> torch.Tensor:
    """compress.rs `merge`: complement, inverse norms, similarity, merge (a gather when nothing
    is dropped). The workspace's three parts are separate arrays here."""
    lib = kernels("compress.cu")
    tokens, dim = x.shape
    n_kept = len(kept)
    out = torch.empty(n_kept, dim, dtype=x.dtype)
    if n_kept == 0 or dim == 0:
        return out
    if n_kept == tokens:
        return gather(x, kept)
    n_dropped = tokens - n_kept
    dropped = np.full(n_dropped, -1, np.int64)
    inv_norms = np.full(n_kept, np.nan, np.float32)
    target = np.full(n_dropped, -1, np.int32)
    rs, cs = x.stride()
    t = tag(x.dtype)
    lib.launch("complement", (1,), 1024, 0, ComplementArgs(kept=ptr(kept), dropped=ptr(dropped), n=tokens, count=n_kept))
    lib.launch(f"inv_norms_{t}", (cdiv(n_kept, 8),), 256, 0,
               NormArgs(x=ptr(x), out=ptr(inv_norms), rows=ptr(kept), count=n_kept, dim=dim, row_stride=rs, col_stride=cs))
    lib.launch(f"similarity_{t}", (cdiv(n_dropped, 32),), 256, 0,
               SimilarityArgs(x=ptr(x), kept=ptr(kept), dropped=ptr(dropped), inv_norms=ptr(inv_norms), target=ptr(target),
                              n_kept=n_kept, n_dropped=n_dropped, dim=dim, row_stride=rs, col_stride=cs))
    w, variant = row_access(x, ptr(out))
    lib.launch(f"merge_{t}_{variant}", (n_kept, cdiv(cdiv(dim, w), 128)), 128, 0,
               MergeArgs(x=ptr(x), out=ptr(out), kept=ptr(kept), dropped=ptr(dropped), target=ptr(target), n_kept=n_kept,
                         n_dropped=n_dropped, dim=dim, row_stride=rs, col_stride=cs))
    merge.last = dict(dropped=dropped, target=target, inv_norms=inv_norms)
    return out


# ------------------------------------------------------------------ KV cache (src/cuda/kv.rs)


def rope_args(rope_theta, head_dim, rotary_dim=None, interleaved=False, mrope_section=None, mrope_interleaved=False) -> RopeArgs:
    """kv.rs `rope_args` over src/kv/rope.rs `Rope`: inv_freq[i] = theta^(-2i / rotary_dim) in
    f64, and the (t, h, w) component of each pair (src/kv/rope.rs `mrope_components`): section j of
    mrope_section takes j % 3, or with mrope_interleaved pair j takes h if j % 3 == 1 and j < 3 s_h,
    w if j % 3 == 2 and j < 3 s_w, else t."""
    rotary_dim = rotary_dim or head_dim
    half = rotary_dim // 2
    r = RopeArgs(half=half, head_dim=head_dim, interleaved=int(bool(interleaved)))
    for i in range(half):
        r.inv_freq[i] = float(rope_theta) ** (-(2 * i) / rotary_dim)
    if mrope_section is not None:
        if mrope_interleaved:
            s_h, s_w = mrope_section[1], mrope_section[2]
            comp = [1 if j % 3 == 1 and j < 3 * s_h else 2 if j % 3 == 2 and j < 3 * s_w else 0 for j in range(half)]
        else:
            comp = [j % 3 for j, n in enumerate(mrope_section) for _ in range(n)]
        for i, c in enumerate(comp[:half]):
            r.comp[i] = c
    return r


class Deltas:
    """A delta argument as the Rust code takes it: ``same`` (one int), ``host`` ([n] or [n, 3] ints:
    Deltas on the host, uploaded) or ``device`` (an int32 / int64 array read in place)."""

    def __init__(self, kind: str, value):
        self.kind, self.value = kind, value
        self.keep = []  # arrays the kernel reads: alive until the launches return

    def rows(self, n) -> np.ndarray:
        """[n, 3] int64 (Rope::delta_of)."""
        if self.kind == "same":
            return np.full((n, 3), int(self.value), np.int64)
        v = np.asarray(self.value, np.int64)
        return np.repeat(v[:, None], 3, 1) if v.ndim == 1 else v.reshape(n, 3)

    def direct(self, n) -> DeltaArgs:
        """kv.rs `KernelDeltas::direct`."""
        if self.kind == "same":
            return DeltaArgs(same=(int(self.value),) * 3)
        if self.kind == "host":
            up = np.ascontiguousarray(self.rows(n))
            self.keep.append(up)
            return DeltaArgs(ptr=ptr(up), kind=2, is_i64=1, token_stride=3, comp_stride=1)
        d = self.value  # a device array: int32 / int64, [n] or [n, 3], any strides
        s = [st // d.itemsize for st in d.strides]
        return DeltaArgs(ptr=ptr(d), kind=2 if d.ndim == 2 else 1, is_i64=int(d.dtype == np.int64), token_stride=s[0],
                         comp_stride=s[1] if d.ndim == 2 else 0)

    def tabled(self, n):
        """kv.rs `KernelDeltas::tabled`: (DeltaArgs, AngleSource)."""
        if self.kind == "same":
            return DeltaArgs(same=(int(self.value),) * 3), AngleSource(table_rows=1)
        if self.kind == "host":
            rows, mapping = [], []
            for d in map(tuple, self.rows(n)):
                if d in rows:
                    mapping.append(rows.index(d))
                elif len(rows) < MAX_TABLE:
                    rows.append(d)
                    mapping.append(len(rows) - 1)
                else:
                    break
            else:
                table = np.array(rows, np.int64).reshape(-1, 3)
                table_map = np.array(mapping, np.int32)
                self.keep += [table, table_map]
                return (DeltaArgs(ptr=ptr(table), kind=2, is_i64=1, token_stride=3, comp_stride=1),
                        AngleSource(map=ptr(table_map), table_rows=max(len(rows), 1)))
        return self.direct(n), AngleSource()


def packed_ok(w, half, interleaved, dims, strides, dim_strides, ptrs) -> bool:
    """kv.rs `packed_ok`."""
    split = 2 * half if interleaved else half
    return (all(s == 1 for s in dim_strides) and split % w == 0 and all(d % w == 0 for d in dims)
            and all(s % w == 0 for s in strides) and all(p % 16 == 0 for p in ptrs))


def kernel_name(op, dtype, packed, interleaved):
    return f"{op}_{tag(dtype)}_{'v' if packed else 's'}_{'gptj' if interleaved else 'neox'}"


def groups(items, most, key):
    """kv.rs `groups`: runs of at most `most` consecutive items with one key."""
    out = []
    for i in items:
        if out and len(out[-1]) < most and key(out[-1][0]) == key(i):
            out[-1].append(i)
        else:
            out.append([i])
    return out


def grid_rows(moved, lanes, multiprocessors, overlap):
    """kv.rs `grid_rows`: (rows per block, blocks)."""
    if overlap or moved == 0:
        return max(moved, 1), 1
    target = max(cdiv(4 * max(multiprocessors, 1), max(lanes, 1)), 1)
    rows = max(cdiv(moved, target), 64, cdiv(moved, 65535))
    return rows, cdiv(moved, rows)


def rerotate(keys: list[torch.Tensor], deltas: Deltas, rope: RopeArgs) -> None:
    """kv.rs `rerotate_keys`: keys [tokens, heads, head_dim] views, rotated in place."""
    tokens = keys[0].shape[0]
    if tokens == 0 or (deltas.kind == "same" and int(deltas.value) == 0):
        return
    delta = deltas.direct(tokens)
    w = 16 // keys[0].element_size()
    for group in groups(range(len(keys)), MAX_LAYERS, lambda i: (tuple(keys[i].shape), keys[i].stride())):
        _, heads, dim = keys[group[0]].shape
        ts, hs, ds = keys[group[0]].stride()
        ptrs = [ptr(keys[i]) for i in group]
        packed = packed_ok(w, rope.half, rope.interleaved, [dim], [ts, hs], [ds], ptrs)
        a = RerotateArgs(tokens=tokens, token_stride=ts, head_stride=hs, dim_stride=ds, delta=delta, rope=rope,
                         n_layers=len(group), heads=heads)
        a.layers[: len(ptrs)] = ptrs
        if heads == 0:
            continue
        kernels("kv.cu").launch(kernel_name("rerotate", keys[0].dtype, packed, rope.interleaved), (tokens,), 128, 0, a)


def relocate(keys, values, start, end, length, deltas: Deltas, rope: RopeArgs, multiprocessors=MULTIPROCESSORS) -> int:
    """kv.rs `relocate_span`: the one-span case of `relocate_spans`."""
    return relocate_spans(keys, values, [(start, end)], length, deltas, rope, multiprocessors)


def relocate_spans(keys, values, spans, length, deltas: Deltas, rope: RopeArgs, multiprocessors=MULTIPROCESSORS) -> int:
    """kv.rs `relocate_spans` (spans sorted, disjoint, inside length: checked by the caller):
    layers [batch, heads, seq, dim]; returns the new length."""
    start = spans[0][0] if spans else length
    removed = sum(e - s for s, e in spans)
    moved = length - start - removed
    runs, gone = [], 0  # per span (first moved index after it, its end): SpanPlan::runs
    for s, e in spans:
        gone += e - s
        runs.append((e - start - gone, e))
    counts = [(runs[k + 1][0] if k + 1 < len(runs) else moved) - runs[k][0] for k in range(len(runs))]
    nonempty = [runs[k] for k in range(len(runs)) if counts[k] > 0]
    end = nonempty[0][1] if nonempty else start + moved  # SpanPlan::first_source
    table = np.array(runs, np.int64).reshape(-1) if len(nonempty) > 1 else None
    if moved > 0 and keys:
        delta, angles = deltas.tabled(moved)
        shared = angles.table_rows * rope.half * 8
        w = 16 // keys[0].element_size()

        def key(i):
            return tuple(keys[i].shape), keys[i].stride(), tuple(values[i].shape), values[i].stride()

        for group in groups(range(len(keys)), MAX_LAYERS, key):
            ks, kst, vs, vst = key(group[0])
            batch, heads, _, key_dim = ks
            kp, vp = [ptr(keys[i]) for i in group], [ptr(values[i]) for i in group]
            packed = packed_ok(w, rope.half, rope.interleaved, [key_dim, vs[3]], [*kst[:3], *vst[:3]], [kst[3], vst[3]], kp + vp)
            lanes = len(group) * batch * heads * 2
            if lanes == 0:
                continue
            overlap = removed > 0 and moved > end - start
            seg_rows, segments = grid_rows(moved, lanes, multiprocessors, overlap)
            a = RelocateArgs(start=start, end=end, moved=moved, seg_rows=seg_rows, removed=removed,
                             n_runs=len(runs) if table is not None else 1, runs=ptr(table) if table is not None else 0,
                             delta=delta, angles=angles, rope=rope, n_layers=len(group), batch=batch, heads=heads,
                             key_dim=key_dim, value_dim=vs[3])
            a.keys[: len(kp)], a.values[: len(vp)] = kp, vp
            a.key_strides[:], a.value_strides[:] = kst, vst
            kernels("kv.cu").launch(kernel_name("relocate", keys[0].dtype, packed, rope.interleaved), (lanes, segments), 256,
                                    shared, a)
    return length - removed


def append(keys, values, new_keys, new_values, positions, rotate: tuple[Deltas, RopeArgs] | None) -> None:
    """kv.rs `append_entries`: the new entries [batch, heads, n, dim] written at `positions`."""
    positions = np.asarray(positions, np.int64)
    n = len(positions)
    if n == 0 or not keys:
        return
    keep = []
    if rotate is not None:
        deltas, rope = rotate
        delta = deltas.direct(n)
    contiguous = bool(np.all(positions == positions[0] + np.arange(n)))
    pos_ptr = 0
    if not contiguous:
        up = positions.copy()
        keep.append(up)
        pos_ptr = ptr(up)
    w = 16 // keys[0].element_size()
    interleaved = bool(rotate and rotate[1].interleaved)
    half = rotate[1].half if rotate else 0

    def key(i):
        return (tuple(keys[i].shape), keys[i].stride(), tuple(values[i].shape), values[i].stride(), new_keys[i].stride(),
                new_values[i].stride())

    for group in groups(range(len(keys)), MAX_APPEND_LAYERS, key):
        ks, kst, vs, vst, nkst, nvst = key(group[0])
        batch, heads, _, key_dim = ks
        lists = [[ptr(t[i]) for i in group] for t in (keys, values, new_keys, new_values)]
        packed = packed_ok(w, half, interleaved, [key_dim, vs[3]], [*kst[:3], *vst[:3], *nkst[:3], *nvst[:3]],
                           [kst[3], vst[3], nkst[3], nvst[3]], sum(lists, []))
        if batch == 0 or heads == 0:
            continue
        if rotate is None:
            r, d = RopeArgs(half=0, head_dim=key_dim), DeltaArgs()
        else:
            r, d = rotate[1], delta
        a = AppendArgs(positions=pos_ptr, start=int(positions[0]), n=n, delta=d, rope=r, rotate=int(rotate is not None),
                       n_layers=len(group), batch=batch, heads=heads, key_dim=key_dim, value_dim=vs[3])
        a.keys[: len(group)], a.values[: len(group)], a.new_keys[: len(group)], a.new_values[: len(group)] = lists
        a.key_strides[:], a.value_strides[:], a.new_key_strides[:], a.new_value_strides[:] = kst, vst, nkst, nvst
        kernels("kv.cu").launch(kernel_name("append", keys[0].dtype, packed, interleaved), (n, batch), 128, 0, a)


class PagedLayout:
    """src/kv/paged.rs `PagedLayout` (strides in elements; values `value_offset` after keys)."""

    def __init__(self, num_blocks, block_size, kv_heads, head_dim, block_stride, slot_stride, head_stride, dim_stride,
                 value_offset):
        self.num_blocks, self.block_size, self.kv_heads, self.head_dim = num_blocks, block_size, kv_heads, head_dim
        self.block_stride, self.slot_stride, self.head_stride, self.dim_stride = block_stride, slot_stride, head_stride, dim_stride
        self.value_offset = value_offset

    def key(self):
        return tuple(vars(self).values())

    @staticmethod
    def of(cache: torch.Tensor, layout: str, head_dim: int) -> "PagedLayout":
        """PagedLayout::vllm / kv_blocks / blocks_kv from a tensor's shape and strides."""
        s = cache.stride()
        if layout == "vllm":
            nb, h, bs, _ = cache.shape
            return PagedLayout(nb, bs, h, head_dim, s[0], s[2], s[1], s[3], head_dim * s[3])
        if layout == "kv_blocks":
            _, nb, bs, h, _ = cache.shape
            return PagedLayout(nb, bs, h, head_dim, s[1], s[2], s[3], s[4], s[0])
        nb, _, bs, h, _ = cache.shape  # blocks_kv
        return PagedLayout(nb, bs, h, head_dim, s[0], s[2], s[3], s[4], s[1])


def move_order(entries, writer_of):
    """kv.rs `move_order`: (order, staged, whether any entry depends on another)."""
    m = len(entries)
    overwriter = [None] * m
    waiting = [0] * m
    for e, (s, _, _) in enumerate(entries):
        f = writer_of.get(s)
        if f is not None and f != e:
            overwriter[e] = f
            waiting[f] += 1
    if all(f is None for f in overwriter):
        return list(range(m)), [], False
    order = [f for f in range(m) if waiting[f] == 0]
    nxt = 0
    while nxt < len(order):
        f = overwriter[order[nxt]]
        nxt += 1
        if f is not None:
            waiting[f] -= 1
            if waiting[f] == 0:
                order.append(f)
    return order, [f for f in range(m) if waiting[f] > 0], True


def paged(caches: list[torch.Tensor], layout: str, src_slots, dst_slots, deltas: Deltas, rope: RopeArgs,
          multiprocessors=MULTIPROCESSORS) -> int:
    """kv.rs `paged_reinject`: returns the entries moved."""
    layouts = [PagedLayout.of(c, layout, rope.head_dim) for c in caches]
    first = layouts[0]
    entries, writer_of = [], {}
    for i, (s, d) in enumerate(zip(np.asarray(src_slots).tolist(), np.asarray(dst_slots).tolist())):
        if s < 0 or d < 0:
            continue
        writer_of[d] = len(entries)
        entries.append((s, d, i))
    if not entries or first.kv_heads == 0:
        return len(entries)
    order, staged, dependent = move_order(entries, writer_of)
    order_up = np.array([entries[e] for e in order], np.int64).reshape(-1, 3)
    staged_up = np.array([entries[e] for e in staged], np.int64).reshape(-1, 3)
    delta, angles = deltas.tabled(len(src_slots))
    shared = angles.table_rows * rope.half * 8
    staging = torch.full((len(staged) * len(caches) * first.kv_heads * 2 * first.head_dim,), float("nan"),
                         dtype=caches[0].dtype)
    w = 16 // caches[0].element_size()
    layer_groups = groups(range(len(caches)), MAX_LAYERS, lambda i: layouts[i].key())
    for mode, up, count in ((0, order_up, len(order)), (1, staged_up, len(staged)), (2, staged_up, len(staged))):
        if count == 0:
            continue
        for group in layer_groups:
            lay = layouts[group[0]]
            ptrs = [ptr(caches[i]) for i in group]
            packed = packed_ok(w, rope.half, rope.interleaved, [lay.head_dim],
                               [lay.block_stride, lay.slot_stride, lay.head_stride, lay.value_offset], [lay.dim_stride], ptrs)
            lanes = len(group) * first.kv_heads * 2
            if mode == 0 and dependent:
                seg, segments = count, 1
            else:  # independent moves, gathers and scatters: any split works
                seg, segments = grid_rows(count, lanes, multiprocessors, False)
            a = PagedArgs(block_stride=lay.block_stride, slot_stride=lay.slot_stride, head_stride=lay.head_stride,
                          dim_stride=lay.dim_stride, value_offset=lay.value_offset, entries=ptr(up), n_entries=count,
                          seg_entries=seg, staging=ptr(staging) if mode != 0 else 0, layer0=group[0], delta=delta,
                          angles=angles, rope=rope, mode=mode, n_layers=len(group), total_layers=len(caches),
                          heads=lay.kv_heads, head_dim=lay.head_dim, block_size=lay.block_size)
            a.caches[: len(ptrs)] = ptrs
            kernels("kv.cu").launch(kernel_name("paged", caches[0].dtype, packed, rope.interleaved), (lanes, segments), 256,
                                    shared, a)
    return len(entries)
