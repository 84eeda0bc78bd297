//! KV-cache re-injection on candle tensors, in place (see [`crate::kv`]): key re-rotation, span
//! relocation and entry writes in contiguous caches, paged gather-rotate-scatter. Every tensor
//! of one call has the same dtype (f32, f16 or bf16); any strides candle produces are accepted
//! (a broadcast view cannot be written and is refused). Everything is checked before anything is
//! written.

use candle_core::Tensor;

use super::access::{with_cpu, Locked, Operand};
use super::{candle_err, IntoCandle, Result};
use crate::dispatch_float;
use crate::dtype::Float;
use crate::kv::cpu::{
    append_entries as core_append, paged_reinject as core_paged, relocate_span as core_relocate,
    rerotate_keys as core_rerotate,
};
use crate::kv::{Deltas, LayerKv, LayerKvRef, PagedCache, PagedLayout, Rope, Strided, StridedMut};
use crate::value_err;

/// How a paged cache tensor is laid out (the layouts of [`PagedLayout`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PagedLayoutKind {
    /// vLLM 0.33: `[num_blocks, kv_heads, block_size, 2 * head_dim]`, keys then values in the
    /// last dimension (any strides, so NHD and HND both fit).
    Vllm,
    /// Earlier vLLM FlashAttention: `[2, num_blocks, block_size, kv_heads, head_dim]`.
    KvBlocks,
    /// Earlier vLLM FlashInfer: `[num_blocks, 2, block_size, kv_heads, head_dim]`.
    BlocksKv,
}

const KEYS_3D: &str = "[tokens, heads, head_dim]";
const CACHE_4D: &str = "[batch, kv_heads, seq, head_dim]";
const NEW_4D: &str = "[batch, kv_heads, n, head_dim]";

fn writable<'l, T: Float, const N: usize>(
    locked: &'l Locked,
    layout: &str,
) -> Result<StridedMut<'l, T, N>> {
    let (dims, strides) = locked.fixed::<N>(layout)?;
    // SAFETY: the write lock of the tensor's storage is held while `locked` lives; candle keeps
    // every layout inside its storage and aligns it for the dtype (checked by the caller);
    // `from_raw` refuses strides that address an element twice.
    unsafe { StridedMut::from_raw(locked.ptr as *mut T, dims, strides, &locked.name) }.candle()
}

fn readable<'l, T: Float, const N: usize>(
    locked: &'l Locked,
    layout: &str,
) -> Result<Strided<'l, T, N>> {
    let (dims, strides) = locked.fixed::<N>(layout)?;
    // SAFETY: as in `writable`, under a read lock (or the write lock of a shared storage,
    // whose overlap with the written tensors the core checks).
    unsafe { Strided::from_raw(locked.ptr as *const T, dims, strides, &locked.name) }.candle()
}

/// The dtype of the first operand (f32 / f16 / bf16) after checking that all share it.
fn common_float_dtype(locked: &[Locked]) -> Result<crate::dtype::DType> {
    let Some(first) = locked.first() else {
        return Ok(crate::dtype::DType::F32);
    };
    let dtype = first.float_dtype()?;
    for other in &locked[1..] {
        other.expect_dtype(dtype, &first.name)?;
    }
    Ok(dtype)
}

fn named<'t>(tensors: &'t [Tensor], name: &str, write: bool) -> Vec<Operand<'t>> {
    tensors
        .iter()
        .enumerate()
        .map(|(i, t)| Operand {
            tensor: t,
            name: format!("{name}[{i}]"),
            write,
        })
        .collect()
}

fn same_layer_count(a: &[Tensor], a_name: &str, b: &[Tensor], b_name: &str) -> Result<()> {
    if a.len() != b.len() {
        return Err(candle_err(value_err!(
            "{b_name} has {} layers but {a_name} has {}: one of each per layer",
            b.len(),
            a.len()
        )));
    }
    Ok(())
}

/// Rotates every key `keys[l][t, h, :]` of every layer in place by `deltas` (per token `t`): a
/// key stored at position `p` becomes the key at `p + delta`, computed as `R(delta) k` from the
/// integer delta. Each layer is `[tokens, heads, head_dim]` (for a `[batch, heads, seq, dim]`
/// cache pass `k.i(b)?.transpose(0, 1)?`, a view); all layers hold the same tokens.
pub fn rerotate_keys(keys: &[Tensor], deltas: Deltas<'_>, rope: &Rope) -> Result<()> {
    with_cpu(&named(keys, "keys", true), |locked| {
        let dtype = common_float_dtype(locked)?;
        dispatch_float!(dtype, T => {
            let mut views: Vec<StridedMut<T, 3>> = locked
                .iter()
                .map(|l| writable::<T, 3>(l, KEYS_3D))
                .collect::<Result<_>>()?;
            core_rerotate(&mut views, deltas, rope).candle()
        })
    })
}

/// Evicts positions `[start, end)` from every layer of a contiguous cache (keys and values
/// `[batch, kv_heads, seq, head_dim]` per layer): entries `[end, length)` move down to `start`,
/// each moved key rotated by its delta (plain RoPE: `Deltas::Same(-(end - start))`; M-RoPE: the
/// (t, h, w) deltas the positions change by). Returns the new valid length; entries from there
/// to `length` (default `seq`) are left stale for the caller to drop (`narrow`).
pub fn relocate_span(
    keys: &[Tensor],
    values: &[Tensor],
    start: usize,
    end: usize,
    length: Option<usize>,
    deltas: Deltas<'_>,
    rope: &Rope,
) -> Result<usize> {
    same_layer_count(keys, "keys", values, "values")?;
    let mut operands = named(keys, "keys", true);
    operands.extend(named(values, "values", true));
    with_cpu(&operands, |locked| {
        let dtype = common_float_dtype(locked)?;
        let (k, v) = locked.split_at(keys.len());
        dispatch_float!(dtype, T => {
            let mut layers: Vec<LayerKv<T>> = k
                .iter()
                .zip(v)
                .map(|(k, v)| {
                    Ok(LayerKv {
                        keys: writable::<T, 4>(k, CACHE_4D)?,
                        values: writable::<T, 4>(v, CACHE_4D)?,
                    })
                })
                .collect::<Result<_>>()?;
            core_relocate(&mut layers, start, end, length, deltas, rope).candle()
        })
    })
}

/// Writes entry `j` of `new_keys[l]` / `new_values[l]` (`[batch, kv_heads, n, head_dim]`) at
/// cache position `positions[j]` of layer `l` (keys and values `[batch, kv_heads, seq,
/// head_dim]`), each new key rotated by `rotate.0[j]` first when `rotate` is given. Positions
/// must be distinct and inside the cache (grow the cache first, e.g. with `Tensor::cat`); the new
/// tensors must not share memory with the cache.
pub fn append_entries(
    keys: &[Tensor],
    values: &[Tensor],
    new_keys: &[Tensor],
    new_values: &[Tensor],
    positions: &[i64],
    rotate: Option<(Deltas<'_>, &Rope)>,
) -> Result<()> {
    same_layer_count(keys, "keys", values, "values")?;
    same_layer_count(new_keys, "new_keys", new_values, "new_values")?;
    let layers = keys.len();
    let mut operands = named(keys, "keys", true);
    operands.extend(named(values, "values", true));
    operands.extend(named(new_keys, "new_keys", false));
    operands.extend(named(new_values, "new_values", false));
    with_cpu(&operands, |locked| {
        let dtype = common_float_dtype(locked)?;
        let (k, rest) = locked.split_at(layers);
        let (v, rest) = rest.split_at(layers);
        let (nk, nv) = rest.split_at(new_keys.len());
        dispatch_float!(dtype, T => {
            let mut cache: Vec<LayerKv<T>> = k
                .iter()
                .zip(v)
                .map(|(k, v)| {
                    Ok(LayerKv {
                        keys: writable::<T, 4>(k, CACHE_4D)?,
                        values: writable::<T, 4>(v, CACHE_4D)?,
                    })
                })
                .collect::<Result<_>>()?;
            let new: Vec<LayerKvRef<T>> = nk
                .iter()
                .zip(nv)
                .map(|(k, v)| {
                    Ok(LayerKvRef {
                        keys: readable::<T, 4>(k, NEW_4D)?,
                        values: readable::<T, 4>(v, NEW_4D)?,
                    })
                })
                .collect::<Result<_>>()?;
            core_append(&mut cache, &new, positions, rotate).candle()
        })
    })
}

fn paged_layout(locked: &Locked, kind: PagedLayoutKind, head_dim: usize) -> Result<PagedLayout> {
    let name = &locked.name;
    match kind {
        PagedLayoutKind::Vllm => {
            let (dims, strides) = locked
                .fixed::<4>("[num_blocks, kv_heads, block_size, 2 * head_dim] (layout Vllm)")?;
            PagedLayout::vllm(dims, strides, head_dim, name).candle()
        }
        PagedLayoutKind::KvBlocks => {
            let (dims, strides) = locked
                .fixed::<5>("[2, num_blocks, block_size, kv_heads, head_dim] (layout KvBlocks)")?;
            PagedLayout::kv_blocks(dims, strides, head_dim, name).candle()
        }
        PagedLayoutKind::BlocksKv => {
            let (dims, strides) = locked
                .fixed::<5>("[num_blocks, 2, block_size, kv_heads, head_dim] (layout BlocksKv)")?;
            PagedLayout::blocks_kv(dims, strides, head_dim, name).candle()
        }
    }
}

/// For every layer of a paged (vLLM) cache: reads the entries at `src_slots[i]` (keys and
/// values, all heads), rotates the keys by `deltas[i]`, writes them to `dst_slots[i]`
/// (`slot = block * block_size + offset`; negative slots are skipped). Sources are read before
/// destinations are written, so they may overlap. Returns the number of entries moved per layer.
pub fn paged_reinject(
    kv_caches: &[Tensor],
    layout: PagedLayoutKind,
    src_slots: &[i64],
    dst_slots: &[i64],
    deltas: Deltas<'_>,
    rope: &Rope,
) -> Result<usize> {
    if kv_caches.is_empty() {
        return Err(candle_err(value_err!(
            "kv_caches is empty: pass one cache tensor per layer"
        )));
    }
    let head_dim = rope.config().head_dim;
    with_cpu(&named(kv_caches, "kv_caches", true), |locked| {
        let dtype = common_float_dtype(locked)?;
        dispatch_float!(dtype, T => {
            let mut caches: Vec<PagedCache<T>> = locked
                .iter()
                .map(|l| {
                    let layout = paged_layout(l, layout, head_dim)?;
                    // SAFETY: the storage's write lock is held while `l` lives; the layout is
                    // candle's own (inside the storage, aligned); `from_raw` refuses layouts in
                    // which keys and values share elements.
                    unsafe { PagedCache::from_raw(l.ptr as *mut T, layout, &l.name) }.candle()
                })
                .collect::<Result<_>>()?;
            core_paged(&mut caches, src_slots, dst_slots, deltas, rope).candle()
        })
    })
}
