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
pub fn relocate_span<T: Float>(
    layers: &mut [LayerKv<'_, T>],
    start: usize,
    end: usize,
    length: Option<usize>,
    deltas: Deltas<'_>,
    rope: &Rope,
) -> Result<usize> {
    let (length, moved) = check_relocate(
        layers,
        start,
        end,
        length,
        &KernelDeltas::Host(deltas),
        rope,
    )?;
    let config = rope.config();
    if moved == 0 || layers.is_empty() {
        return Ok(length - (end - start));
    }
    let table = rope.table(deltas, moved);
    let interleaved = config.interleaved;
    let lanes = lanes(layers);
    lanes
        .par_iter()
        .with_min_len(1)
        .for_each_init(Vec::new, |scratch, lane| {
            // SAFETY: lanes are disjoint (views non-overlapping and pairwise disjoint); within a
            // lane, going up, row start+t is written only after row end+t' <= ... was read:
            // every row read later (end+t', t' > t) lies above every row written so far.
            unsafe { shift_lane(lane, start, end, moved, &table, interleaved, scratch) }
        });
    Ok(length - (end - start))
}

/// The checks of [`relocate_span`] (shapes, span, deltas; nothing is touched): returns the
/// valid length and the number of entries that move. Shared with the CUDA backend.
pub(crate) fn check_relocate<T: Float>(
    layers: &[LayerKv<'_, T>],
    start: usize,
    end: usize,
    length: Option<usize>,
    deltas: &KernelDeltas<'_>,
    rope: &Rope,
) -> Result<(usize, usize)> {
    let config = rope.config();
    let seq = check_layers(layers, config.head_dim)?;
    let length = length.unwrap_or(seq);
    if length > seq {
        return Err(index_err!(
            "length = {length}: the cache holds only {seq} positions"
        ));
    }
    if start > end {
        return Err(value_err!(
            "start = {start}, end = {end}: the span [start, end) needs start <= end"
        ));
    }
    if end > length {
        return Err(index_err!(
            "end = {end}: must be <= length = {length} (the valid entries of the cache)"
        ));
    }
    let moved = length - end;
    deltas.check(moved, config, "the span's followers (length - end)")?;
    Ok((length, moved))
}

unsafe fn shift_lane<T: Float>(
    lane: &Lane<T>,
    start: usize,
    end: usize,
    moved: usize,
    table: &AngleTable,
    interleaved: bool,
    scratch: &mut Vec<f32>,
) {
    if !lane.is_key {
        if start == end {
            return;
        }
        if lane.dim_stride == 1 && lane.seq_stride == lane.dim as isize {
            // Rows back to back: one overlapping move.
            std::ptr::copy(lane.row(end).ptr, lane.row(start).ptr, moved * lane.dim);
        } else {
            for t in 0..moved {
                copy_row(lane.row(end + t), lane.row(start + t));
            }
        }
        return;
    }
    for t in 0..moved {
        let (cos, sin, identity) = table.row(t);
        let (src, dst) = (lane.row(end + t), lane.row(start + t));
        match (start == end, identity) {
            (true, true) => {}
            (true, false) => rotate_row(dst, cos, sin, interleaved, scratch),
            (false, true) => copy_row(src, dst),
            (false, false) => rotate_row_into(src, dst, cos, sin, interleaved, scratch),
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
