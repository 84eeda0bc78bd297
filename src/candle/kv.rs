//! KV-cache re-injection on candle tensors, in place (see [`crate::kv`]): key re-rotation, span
//! relocation and entry writes in contiguous caches, paged gather-rotate-scatter. Every tensor
//! of one call has the same dtype (f32, f16, bf16 or f64); any strides candle produces are accepted
//! (a broadcast view cannot be written and is refused). Everything is checked before anything is
//! written.

use candle_core::Tensor;

use super::access::{with_cpu, Locked, Operand};
use super::{candle_err, IntoCandle, Result};
use crate::cuda::Launch;
use crate::kv::{self as core, DeltaSource, Deltas, Positions, Rope, SpanDeltas};
use crate::tensor::TensorView;
use crate::value_err;

pub use crate::kv::PagedLayoutKind;

/// The views of the locked operands, after checking that they share the first one's float
/// dtype (the core checks the rest).
fn views(locked: &[Locked]) -> Result<Vec<TensorView<'_>>> {
    if let Some(first) = locked.first() {
        let dtype = first.float_dtype()?;
        for other in &locked[1..] {
            other.expect_dtype(dtype, &first.name)?;
        }
    }
    locked.iter().map(Locked::view).collect()
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
        let mut keys = views(locked)?;
        core::rerotate_keys(
            &mut keys,
            DeltaSource::Host(deltas),
            rope,
            Launch::default(),
        )
        .candle()
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
    relocate(keys, values, deltas, |k, v, deltas| {
        core::relocate_span(k, v, start, end, length, deltas, rope, Launch::default())
    })
}

/// Evicts every span `[start, end)` of `spans` (sorted, disjoint; adjacent and empty spans
/// allowed) from every layer in one pass: every entry from the first span's start to `length`
/// that lies in no span moves down to close the gaps, order kept, each moved key rotated by its
/// delta (`deltas[t]` for the t-th moved entry). Returns the new valid length. The same checks
/// and kernels as `tvc_rs::kv::relocate_spans`.
pub fn relocate_spans(
    keys: &[Tensor],
    values: &[Tensor],
    spans: &[(usize, usize)],
    length: Option<usize>,
    deltas: Deltas<'_>,
    rope: &Rope,
) -> Result<usize> {
    relocate(keys, values, deltas, |k, v, deltas| {
        core::relocate_spans(k, v, spans, length, deltas, rope, Launch::default())
    })
}

/// The glue of both relocations: keys and values locked and viewed, then `op` on them.
fn relocate(
    keys: &[Tensor],
    values: &[Tensor],
    deltas: Deltas<'_>,
    op: impl FnOnce(
        &mut [TensorView<'_>],
        &mut [TensorView<'_>],
        SpanDeltas<'_>,
    ) -> crate::error::Result<usize>,
) -> Result<usize> {
    same_layer_count(keys, "keys", values, "values")?;
    let mut operands = named(keys, "keys", true);
    operands.extend(named(values, "values", true));
    with_cpu(&operands, |locked| {
        let mut all = views(locked)?;
        let (k, v) = all.split_at_mut(keys.len());
        op(k, v, SpanDeltas::Given(DeltaSource::Host(deltas))).candle()
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
        let mut all = views(locked)?;
        let (k, rest) = all.split_at_mut(layers);
        let (v, rest) = rest.split_at_mut(layers);
        let (nk, nv) = rest.split_at(new_keys.len());
        let rotate = rotate.map(|(d, r)| (DeltaSource::Host(d), r));
        core::append_entries(
            k,
            v,
            nk,
            nv,
            Positions::List(positions),
            rotate,
            Launch::default(),
        )
        .candle()
    })
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
    with_cpu(&named(kv_caches, "kv_caches", true), |locked| {
        let mut caches = views(locked)?;
        let deltas = DeltaSource::Host(deltas);
        core::paged_reinject(
            &mut caches,
            layout,
            src_slots,
            dst_slots,
            deltas,
            rope,
            Launch::default(),
        )
        .candle()
    })
}
