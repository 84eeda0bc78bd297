//! Contiguous caches (transformers' `DynamicCache` / `StaticCache` layers): per layer, keys and
//! values `[batch, kv_heads, seq, head_dim]` (any strides). Evict a span and shift what follows
//! down with its keys re-rotated; write new entries at given positions.

use rayon::prelude::*;

use crate::dtype::Float;
use crate::error::Result;
use crate::{index_err, value_err};

use super::rope::{AngleTable, Deltas, KernelDeltas, Rope};
use super::strided::{
    check_disjoint, copy_row, rotate_row, rotate_row_into, Row, SendPtr, Strided, StridedMut,
};

/// One layer of a contiguous cache, written in place: keys and values `[batch, kv_heads, seq, dim]`.
pub struct LayerKv<'a, T> {
    pub keys: StridedMut<'a, T, 4>,
    pub values: StridedMut<'a, T, 4>,
}

/// One layer of new entries, read only: keys and values `[batch, kv_heads, n, dim]`.
pub struct LayerKvRef<'a, T> {
    pub keys: Strided<'a, T, 4>,
    pub values: Strided<'a, T, 4>,
}

fn dims(shape: [usize; 4]) -> String {
    format!("({}, {}, {}, {})", shape[0], shape[1], shape[2], shape[3])
}

/// Checks every layer's shapes against `head_dim` and each other; returns the common `seq`.
pub(crate) fn check_layers<T: Float>(layers: &[LayerKv<'_, T>], head_dim: usize) -> Result<usize> {
    let mut seq = None;
    for (i, layer) in layers.iter().enumerate() {
        let k = layer.keys.shape();
        let v = layer.values.shape();
        if k[3] != head_dim {
            return Err(value_err!(
                "keys[{i}] has shape {}: expected [batch, kv_heads, seq, head_dim] with head_dim = {head_dim}",
                dims(k)
            ));
        }
        if v[..3] != k[..3] {
            return Err(value_err!(
                "values[{i}] has shape {} but keys[{i}] has {}: batch, kv_heads and seq must match",
                dims(v),
                dims(k)
            ));
        }
        match seq {
            None => seq = Some(k[2]),
            Some(s) if s != k[2] => {
                return Err(value_err!(
                    "keys[{i}] holds {} positions but keys[0] holds {s}: every layer must hold the same number",
                    k[2]
                ));
            }
            _ => {}
        }
    }
    let ranges: Vec<_> = layers
        .iter()
        .enumerate()
        .flat_map(|(i, l)| {
            [
                (l.keys.address_range(), format!("keys[{i}]")),
                (l.values.address_range(), format!("values[{i}]")),
            ]
        })
        .collect();
    check_disjoint(&ranges)?;
    Ok(seq.unwrap_or(0))
}

/// A (layer, batch, head) lane of keys or values: the rows along `seq`.
struct Lane<T> {
    base: SendPtr<T>,
    seq_stride: isize,
    dim: usize,
    dim_stride: isize,
    is_key: bool,
}

impl<T> Clone for Lane<T> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<T> Copy for Lane<T> {}

impl<T> Lane<T> {
    #[inline]
    fn row(&self, pos: usize) -> Row<T> {
        // SAFETY (of the offset): pos < seq, inside the view.
        Row {
            ptr: unsafe { self.base.get().offset(pos as isize * self.seq_stride) },
            len: self.dim,
            stride: self.dim_stride,
        }
    }
}

fn lanes<T: Float>(layers: &mut [LayerKv<'_, T>]) -> Vec<Lane<T>> {
    let mut out = Vec::new();
    for layer in layers.iter_mut() {
        for (view, is_key) in [(&layer.keys, true), (&layer.values, false)] {
            let [b, h, _, d] = view.shape();
            let [bs, hs, ss, ds] = view.strides();
            for bi in 0..b {
                for hi in 0..h {
                    // SAFETY: (bi, hi) is inside the view.
                    let base = unsafe { view.ptr().offset(bi as isize * bs + hi as isize * hs) };
                    out.push(Lane {
                        base: SendPtr(base),
                        seq_stride: ss,
                        dim: d,
                        dim_stride: ds,
                        is_key,
                    });
                }
            }
        }
    }
    out
}

/// Evicts positions `[start, end)` from every layer: entries `[end, length)` move down to
/// `[start, length - (end - start))`, each moved key rotated by its delta (`deltas[t]` for the
/// t-th moved entry; plain RoPE after evicting a span: `Same(-(end - start))`). Returns the new
/// valid length; entries from there to `length` are left stale for the caller to drop.
/// Positions before `start` are not touched. `length` defaults to the layers' `seq`.
/// The one-span case of [`relocate_spans`].
pub fn relocate_span<T: Float>(
    layers: &mut [LayerKv<'_, T>],
    start: usize,
    end: usize,
    length: Option<usize>,
    deltas: Deltas<'_>,
    rope: &Rope,
) -> Result<usize> {
    relocate_with(
        layers,
        &[(start, end)],
        SpanNames::StartEnd,
        length,
        deltas,
        rope,
    )
}

/// Evicts every span `[start, end)` of `spans` (sorted, disjoint, each `start <= end`, inside
/// `length`; adjacent and empty spans allowed) from every layer in one pass: every entry from
/// the first span's start to `length` that lies in no span moves down to close the gaps (order
/// kept), each moved key rotated by its delta (`deltas[t]` for the t-th moved entry). Returns
/// the new valid length; no spans: nothing moves and `length` is returned.
pub fn relocate_spans<T: Float>(
    layers: &mut [LayerKv<'_, T>],
    spans: &[(usize, usize)],
    length: Option<usize>,
    deltas: Deltas<'_>,
    rope: &Rope,
) -> Result<usize> {
    relocate_with(layers, spans, SpanNames::List, length, deltas, rope)
}

pub(crate) fn relocate_with<T: Float>(
    layers: &mut [LayerKv<'_, T>],
    spans: &[(usize, usize)],
    names: SpanNames,
    length: Option<usize>,
    deltas: Deltas<'_>,
    rope: &Rope,
) -> Result<usize> {
    let plan = check_relocate(
        layers,
        spans,
        names,
        length,
        &KernelDeltas::Host(deltas),
        rope,
    )?;
    let config = rope.config();
    if plan.moved == 0 || layers.is_empty() {
        return Ok(plan.new_length());
    }
    let table = rope.table(deltas, plan.moved);
    let interleaved = config.interleaved;
    let lanes = lanes(layers);
    lanes
        .par_iter()
        .with_min_len(1)
        .for_each_init(Vec::new, |scratch, lane| {
            // SAFETY: lanes are disjoint (views non-overlapping and pairwise disjoint); within a
            // lane, going up, row start+t is written only after every row that reads it (a
            // source s(t') = start + t with t' <= t: sources never lie below destinations) was
            // read, and every row read later lies above every row written so far.
            unsafe { shift_lane(lane, &plan, &table, interleaved, scratch) }
        });
    Ok(plan.new_length())
}

/// How the span arguments are named in messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum SpanNames {
    /// `start` and `end` (one span, [`relocate_span`]).
    StartEnd,
    /// `spans[i]` ([`relocate_spans`]).
    List,
}

/// Where the entries of an eviction come from, as checked by [`check_relocate`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct SpanPlan {
    /// Where the first moved entry goes: the first span's start (`length` without spans).
    pub start: usize,
    /// The valid entries before the eviction.
    pub length: usize,
    /// The entries that move: every one from `start` to `length` outside the spans.
    pub moved: usize,
    /// Per span, `(first, end)`: the moved entries `t` from `first` (up to the next span's
    /// `first`) come from row `end + (t - first)`. Sorted by `first` (equal for empty runs).
    pub runs: Vec<(usize, usize)>,
}

impl SpanPlan {
    /// Checks `spans` against `length` (sorted, disjoint, `start <= end <= length`).
    pub fn new(spans: &[(usize, usize)], names: SpanNames, length: usize) -> Result<Self> {
        let name = |i: usize| match names {
            SpanNames::StartEnd => format!("start = {}, end = {}", spans[i].0, spans[i].1),
            SpanNames::List => format!("spans[{i}] = ({}, {})", spans[i].0, spans[i].1),
        };
        let mut runs = Vec::with_capacity(spans.len());
        let mut removed = 0;
        for (i, &(start, end)) in spans.iter().enumerate() {
            if start > end {
                return Err(value_err!(
                    "{}: the span [start, end) needs start <= end",
                    name(i)
                ));
            }
            if end > length {
                return Err(match names {
                    SpanNames::StartEnd => index_err!(
                        "end = {end}: must be <= length = {length} (the valid entries of the cache)"
                    ),
                    SpanNames::List => index_err!(
                        "{}: end must be <= length = {length} (the valid entries of the cache)",
                        name(i)
                    ),
                });
            }
            if i > 0 && start < spans[i - 1].1 {
                return Err(value_err!(
                    "{} starts before {} ends: spans must be sorted and disjoint",
                    name(i),
                    name(i - 1)
                ));
            }
            removed += end - start;
            runs.push((end - spans[0].0 - removed, end));
        }
        let start = spans.first().map_or(length, |s| s.0);
        Ok(SpanPlan {
            start,
            length,
            moved: length - start - removed,
            runs,
        })
    }

    /// The entries removed.
    pub fn removed(&self) -> usize {
        self.length - self.start - self.moved
    }

    pub fn new_length(&self) -> usize {
        self.start + self.moved
    }

    /// `(first, source, count)` per span: moved entries `first..first + count` come from rows
    /// `source..`.
    pub fn moves(&self) -> impl Iterator<Item = (usize, usize, usize)> + '_ {
        self.runs.iter().enumerate().map(|(k, &(first, end))| {
            let next = self.runs.get(k + 1).map_or(self.moved, |r| r.0);
            (first, end, next - first)
        })
    }

    /// The row moved entry 0 comes from (`start + moved` without moved entries).
    pub fn first_source(&self) -> usize {
        self.moves()
            .find(|m| m.2 > 0)
            .map_or(self.start + self.moved, |m| m.1)
    }
}

/// The checks of [`relocate_spans`] (shapes, spans, deltas; nothing is touched): returns where
/// the moved entries come from. Shared with the CUDA backend.
pub(crate) fn check_relocate<T: Float>(
    layers: &[LayerKv<'_, T>],
    spans: &[(usize, usize)],
    names: SpanNames,
    length: Option<usize>,
    deltas: &KernelDeltas<'_>,
    rope: &Rope,
) -> Result<SpanPlan> {
    let config = rope.config();
    let seq = check_layers(layers, config.head_dim)?;
    let length = length.unwrap_or(seq);
    if length > seq {
        return Err(index_err!(
            "length = {length}: the cache holds only {seq} positions"
        ));
    }
    let plan = SpanPlan::new(spans, names, length)?;
    let what = match names {
        SpanNames::StartEnd => "the span's followers (length - end)",
        SpanNames::List => "the entries kept after spans[0]'s start",
    };
    deltas.check(plan.moved, config, what)?;
    Ok(plan)
}

unsafe fn shift_lane<T: Float>(
    lane: &Lane<T>,
    plan: &SpanPlan,
    table: &AngleTable,
    interleaved: bool,
    scratch: &mut Vec<f32>,
) {
    let start = plan.start;
    if !lane.is_key {
        if plan.removed() == 0 {
            return;
        }
        let packed = lane.dim_stride == 1 && lane.seq_stride == lane.dim as isize;
        for (first, source, count) in plan.moves() {
            if source == start + first {
                continue;
            }
            if packed {
                // Rows back to back: one overlapping move per run.
                std::ptr::copy(
                    lane.row(source).ptr,
                    lane.row(start + first).ptr,
                    count * lane.dim,
                );
            } else {
                for i in 0..count {
                    copy_row(lane.row(source + i), lane.row(start + first + i));
                }
            }
        }
        return;
    }
    for (first, source, count) in plan.moves() {
        let in_place = source == start + first;
        for i in 0..count {
            let t = first + i;
            let (cos, sin, identity) = table.row(t);
            let (src, dst) = (lane.row(source + i), lane.row(start + t));
            match (in_place, identity) {
                (true, true) => {}
                (true, false) => rotate_row(dst, cos, sin, interleaved, scratch),
                (false, true) => copy_row(src, dst),
                (false, false) => rotate_row_into(src, dst, cos, sin, interleaved, scratch),
            }
        }
    }
}

/// Writes `new[l]` entry `j` at cache position `positions[j]` of layer `l` (keys and values),
/// rotating each new key by `rotate.0[j]` first when `rotate` is given. Positions must be
/// distinct and inside the cache; the new tensors must not share memory with the cache.
pub fn append_entries<T: Float>(
    layers: &mut [LayerKv<'_, T>],
    new: &[LayerKvRef<'_, T>],
    positions: &[i64],
    rotate: Option<(Deltas<'_>, &Rope)>,
) -> Result<()> {
    check_append(
        layers,
        new,
        positions,
        rotate.as_ref().map(|(d, r)| (KernelDeltas::Host(*d), *r)),
    )?;
    let n = positions.len();
    let table = match rotate {
        Some((deltas, rope)) => Some((rope.table(deltas, n), rope.config().interleaved)),
        None => None,
    };
    if n == 0 {
        return Ok(());
    }
    let mut work = Vec::new();
    for (dst_lane, src_lane) in lanes(layers).into_iter().zip(source_lanes(new)) {
        work.push((dst_lane, src_lane));
    }
    work.par_iter()
        .with_min_len(1)
        .for_each_init(Vec::new, |scratch, (dst, src)| {
            for (j, &p) in positions.iter().enumerate() {
                // SAFETY: sources and destinations are disjoint memory; positions are distinct
                // and in range, and each lane belongs to one task.
                unsafe {
                    let (s, d) = (src.row(j), dst.row(p as usize));
                    match (&table, dst.is_key) {
                        (Some((table, interleaved)), true) => {
                            let (cos, sin, identity) = table.row(j);
                            if identity {
                                copy_row(s, d);
                            } else {
                                rotate_row_into(s, d, cos, sin, *interleaved, scratch);
                            }
                        }
                        _ => copy_row(s, d),
                    }
                }
            }
        });
    Ok(())
}

/// The checks of [`append_entries`] (nothing is touched). Shared with the CUDA backend.
pub(crate) fn check_append<T: Float>(
    layers: &[LayerKv<'_, T>],
    new: &[LayerKvRef<'_, T>],
    positions: &[i64],
    rotate: Option<(KernelDeltas<'_>, &Rope)>,
) -> Result<()> {
    if new.len() != layers.len() {
        return Err(value_err!(
            "new_keys has {} layers but keys has {}: one per layer",
            new.len(),
            layers.len()
        ));
    }
    let head_dim = layers.first().map_or(0, |l| l.keys.shape()[3]);
    if let Some((_, rope)) = rotate {
        check_layers(layers, rope.config().head_dim)?;
    } else {
        check_layers(layers, head_dim)?;
    }
    let n = positions.len();
    for (i, (layer, fresh)) in layers.iter().zip(new).enumerate() {
        let (k, v) = (layer.keys.shape(), layer.values.shape());
        let (nk, nv) = (fresh.keys.shape(), fresh.values.shape());
        let expect_k = [k[0], k[1], n, k[3]];
        let expect_v = [v[0], v[1], n, v[3]];
        if nk != expect_k {
            return Err(value_err!(
                "new_keys[{i}] has shape {}: expected {} (keys[{i}]'s batch, kv_heads, head_dim with one entry per position)",
                dims(nk),
                dims(expect_k)
            ));
        }
        if nv != expect_v {
            return Err(value_err!(
                "new_values[{i}] has shape {}: expected {} (values[{i}]'s batch, kv_heads, head_dim with one entry per position)",
                dims(nv),
                dims(expect_v)
            ));
        }
    }
    let seq = layers.first().map_or(0, |l| l.keys.shape()[2]);
    let mut seen = vec![usize::MAX; seq];
    for (j, &p) in positions.iter().enumerate() {
        if p < 0 || p as u64 >= seq as u64 {
            return Err(index_err!(
                "positions[{j}] = {p}: out of range for a cache of {seq} positions"
            ));
        }
        let first = &mut seen[p as usize];
        if *first != usize::MAX {
            return Err(value_err!(
                "positions[{j}] = {p} repeats positions[{}]: each position may be written once",
                *first
            ));
        }
        *first = j;
    }
    for (i, fresh) in new.iter().enumerate() {
        for (src, src_name) in [
            (fresh.keys.address_range(), "new_keys"),
            (fresh.values.address_range(), "new_values"),
        ] {
            for (l, layer) in layers.iter().enumerate() {
                for (dst, dst_name) in [
                    (layer.keys.address_range(), "keys"),
                    (layer.values.address_range(), "values"),
                ] {
                    if let (Some(a), Some(b)) = (src, dst) {
                        if a.0 < b.1 && b.0 < a.1 {
                            return Err(value_err!(
                                "{src_name}[{i}] shares memory with {dst_name}[{l}]: pass the new entries as separate tensors (a copy)"
                            ));
                        }
                    }
                }
            }
        }
    }
    if let Some((deltas, rope)) = rotate {
        deltas.check(n, rope.config(), "positions")?;
    }
    Ok(())
}

/// The lanes of the new entries, in the same order as [`lanes`] gives the cache's.
fn source_lanes<T: Float>(new: &[LayerKvRef<'_, T>]) -> Vec<Lane<T>> {
    let mut out = Vec::new();
    for layer in new {
        for (view, is_key) in [(&layer.keys, true), (&layer.values, false)] {
            let [b, h, _, d] = view.shape();
            let [bs, hs, ss, ds] = view.strides();
            for bi in 0..b {
                for hi in 0..h {
                    let base = view
                        .ptr()
                        .wrapping_offset(bi as isize * bs + hi as isize * hs)
                        as *mut T;
                    out.push(Lane {
                        base: SendPtr(base),
                        seq_stride: ss,
                        dim: d,
                        dim_stride: ds,
                        is_key,
                    });
                }
            }
        }
    }
    out
}
