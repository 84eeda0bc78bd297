//! The KV operations on tensor views, one function each for CPU and CUDA memory alike: every
//! argument is checked here once (ranks, dtypes, one device for all tensors, writability,
//! alignment, layer counts, then the shared shape / span / slot / disjointness checks of the
//! kernels), and the call goes to the CPU kernels ([`cpu`](super::cpu)) or to the CUDA
//! launchers (`crate::cuda::kv`) by the device of the first tensor. Nothing is written before
//! everything is checked.
//!
//! ```
//! use tvc_rs::cuda::Launch;
//! use tvc_rs::kv::{rerotate_keys, DeltaSource, Deltas, Rope, RopeConfig};
//! use tvc_rs::tensor::TensorView;
//!
//! // Two tokens, one head, head_dim 4: rotate both keys by +3 positions (plain RoPE).
//! let mut keys = vec![1.0f32, 0.0, 0.0, 1.0, 0.5, 0.5, 0.5, 0.5];
//! let rope = Rope::new(RopeConfig::new(10_000.0, 4, None, false, None)?);
//! let mut views = [TensorView::from_mut_slice("keys", &mut keys, &[2, 1, 4])?];
//! rerotate_keys(&mut views, DeltaSource::Host(Deltas::Same(3)), &rope, Launch::default())?;
//! // The first pair turns by 3 * theta^0 = 3 radians.
//! assert!((keys[0] - 3f32.cos()).abs() < 1e-6 && (keys[2] - 3f32.sin()).abs() < 1e-6);
//! # Ok::<(), tvc_rs::Error>(())
//! ```

use crate::cuda::{kv as gpu, Launch};
use crate::dtype::{DType, Float};
use crate::error::Result;
use crate::tensor::{tuple_str, Device, IntArray, TensorView};
use crate::{dispatch_float, type_err, value_err};

use super::contiguous::{self, LayerKv, LayerKvRef, SpanNames, SpanPlan};
use super::paged::{self, PagedCache, PagedLayout};
use super::rerotate;
use super::rope::Deltas;
use super::rope::{DeviceDeltas, KernelDeltas};
use super::{Rope, Strided, StridedMut};

/// The dtypes of cache tensors: float64 on the CPU only (computed in f32 like the others; the
/// CUDA kernels are built for f32, f16 and bf16).
pub const KV_DTYPES: &[DType] = &[DType::F32, DType::F16, DType::BF16, DType::F64];

/// Position deltas as a caller gives them.
#[derive(Debug)]
pub enum DeltaSource<'a> {
    /// One delta for all tokens, or per-token deltas in host memory.
    Host(Deltas<'a>),
    /// An int32 / int64 tensor `[n]` or, for M-RoPE, `[n, 3]` (t, h, w) on the caches' device:
    /// read in place by the CUDA kernels, read to the host on the CPU.
    Tensor(TensorView<'a>),
}

/// Deltas owned by the caller of a kernel (from an int array or from positions).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OwnedDeltas {
    Same(i64),
    PerToken(Vec<i64>),
    Thw(Vec<[i64; 3]>),
}

impl OwnedDeltas {
    pub fn deltas(&self) -> Deltas<'_> {
        match self {
            OwnedDeltas::Same(d) => Deltas::Same(*d),
            OwnedDeltas::PerToken(d) => Deltas::PerToken(d),
            OwnedDeltas::Thw(d) => Deltas::PerTokenThw(d),
        }
    }

    /// `delta` given as an int (shape `[]`), `[n]`, or `[n, 3]` (t, h, w).
    pub fn from_array(array: IntArray) -> Result<Self> {
        let IntArray { values, shape } = array;
        match shape.as_slice() {
            [] => Ok(OwnedDeltas::Same(values[0])),
            [_] => Ok(OwnedDeltas::PerToken(values)),
            [_, 3] => Ok(OwnedDeltas::Thw(
                values.chunks_exact(3).map(|c| [c[0], c[1], c[2]]).collect(),
            )),
            _ => Err(delta_shape_error(&shape)),
        }
    }
}

fn delta_shape_error(shape: &[usize]) -> crate::Error {
    value_err!(
        "delta: expected an int, an int array [n] or, for M-RoPE, [n, 3] (t, h, w deltas), got shape {}",
        tuple_str(shape)
    )
}

/// How the entries after an evicted span move (see [`relocate_span`]).
#[derive(Debug)]
pub enum SpanDeltas<'a> {
    /// Back by the span's length, `-(end - start)` (plain RoPE only).
    Span,
    /// As given.
    Given(DeltaSource<'a>),
    /// From the followers' position ids before and after the eviction (`[n]`, or `[3, n]`
    /// with M-RoPE as transformers lays them out), see [`relocate_deltas`].
    Positions { old: IntArray, new: IntArray },
}

impl<'a> SpanDeltas<'a> {
    /// From the optional arguments `delta`, `old_positions`, `new_positions` (at most one way).
    pub fn from_args(
        delta: Option<DeltaSource<'a>>,
        old_positions: Option<IntArray>,
        new_positions: Option<IntArray>,
    ) -> Result<Self> {
        match (delta, old_positions, new_positions) {
            (Some(_), Some(_), _) | (Some(_), _, Some(_)) => Err(value_err!(
                "delta and old_positions/new_positions: pass one or the other, not both"
            )),
            (Some(d), None, None) => Ok(SpanDeltas::Given(d)),
            (None, None, None) => Ok(SpanDeltas::Span),
            (None, Some(old), Some(new)) => Ok(SpanDeltas::Positions { old, new }),
            (None, _, _) => Err(value_err!(
                "old_positions and new_positions: pass both (the followers' position ids before and after)"
            )),
        }
    }
}

/// The deltas of the `moved` entries after an evicted span from their position ids before
/// (`old`) and after (`new`): `[moved]`, or with M-RoPE also `[3, moved]` (t, h, w rows).
pub fn relocate_deltas(
    old: &IntArray,
    new: &IntArray,
    moved: usize,
    rope: &Rope,
) -> Result<OwnedDeltas> {
    let mrope = rope.config().is_mrope();
    if old.shape != new.shape {
        return Err(value_err!(
            "new_positions has shape {} but old_positions has {}: they must match",
            tuple_str(&new.shape),
            tuple_str(&old.shape)
        ));
    }
    let (old, new, shape) = (&old.values, &new.values, &old.shape);
    match shape.as_slice() {
        [n] if *n == moved => Ok(OwnedDeltas::PerToken(
            new.iter().zip(old).map(|(a, b)| a - b).collect(),
        )),
        [3, n] if mrope && *n == moved => Ok(OwnedDeltas::Thw(
            (0..moved)
                .map(|j| [0, 1, 2].map(|c| new[c * moved + j] - old[c * moved + j]))
                .collect(),
        )),
        _ => {
            let expected = if mrope {
                format!("(3, {moved})")
            } else {
                format!("({moved},)")
            };
            Err(value_err!(
                "old_positions has shape {}: expected {expected}, the position ids of the {moved} entries that move (after one span: length - end){}",
                tuple_str(shape),
                if mrope {
                    " as transformers lays them out ([3, n]: t, h, w)"
                } else {
                    ""
                }
            ))
        }
    }
}

/// Where the positions of [`append_entries`] go.
#[derive(Debug, Clone, Copy)]
pub enum Positions<'a> {
    /// `start, start + 1, ...`, one per new entry.
    From(i64),
    /// One position per new entry.
    List(&'a [i64]),
}

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

impl PagedLayoutKind {
    /// `"vllm"`, `"kv_blocks"` or `"blocks_kv"` (the `layout` argument).
    pub fn parse(name: &str) -> Result<Self> {
        match name {
            "vllm" => Ok(Self::Vllm),
            "kv_blocks" => Ok(Self::KvBlocks),
            "blocks_kv" => Ok(Self::BlocksKv),
            other => Err(value_err!(
                "layout = '{other}': expected 'vllm', 'kv_blocks' or 'blocks_kv'"
            )),
        }
    }
}

/// The device of a call (its first tensor's) and the argument it comes from, for messages.
struct Call<'n> {
    device: Device,
    primary: &'n str,
}

impl<'n> Call<'n> {
    fn of(first: Option<&TensorView<'_>>, primary: &'n str) -> Self {
        Call {
            device: first.map_or(Device::Cpu, |v| v.device()),
            primary,
        }
    }

    fn expect_here(&self, view: &TensorView<'_>) -> Result<()> {
        match self.device {
            Device::Cuda(id) if view.device() != self.device => Err(value_err!(
                "{}: expected a tensor on cuda:{id} (the device of {}), got one on {}; pass every tensor on the same device",
                view.name(),
                self.primary,
                view.device()
            )),
            Device::Cuda(_) => Ok(()),
            _ => view.expect_cpu().map(|_| ()),
        }
    }

    fn fixed<const N: usize>(
        &self,
        view: &TensorView<'_>,
        layout: &str,
    ) -> Result<([usize; N], [isize; N])> {
        self.expect_here(view)?;
        view.expect_rank(N, layout)?;
        let shape: [usize; N] = view.shape().try_into().expect("rank checked");
        let strides: [isize; N] = view.strides().try_into().expect("rank checked");
        Ok((shape, strides))
    }

    /// A writable strided view of dtype `T` and rank `N`.
    fn writable<'v, T: Float, const N: usize>(
        &self,
        view: &'v mut TensorView<'_>,
        layout: &str,
    ) -> Result<StridedMut<'v, T, N>> {
        let (shape, strides) = self.fixed::<N>(view, layout)?;
        typed::<T>(view)?.expect_writable()?;
        // SAFETY: the view borrows its memory exclusively for 'v (on the CPU readable and
        // writable; device memory is never dereferenced here); device, dtype, rank, alignment
        // and writability are checked, overlap in `from_raw`.
        unsafe { StridedMut::from_raw(view.data_ptr() as *mut T, shape, strides, view.name()) }
    }

    /// A read-only strided view of dtype `T` and rank `N`.
    fn readable<'v, T: Float, const N: usize>(
        &self,
        view: &'v TensorView<'_>,
        layout: &str,
    ) -> Result<Strided<'v, T, N>> {
        let (shape, strides) = self.fixed::<N>(view, layout)?;
        typed::<T>(view)?;
        // SAFETY: as in `writable`, read only.
        unsafe { Strided::from_raw(view.data_ptr() as *const T, shape, strides, view.name()) }
    }

    /// The deltas as the kernels of this device read them.
    fn deltas<'d>(&self, source: DeltaSource<'d>) -> Result<Resolved<'d>> {
        let view = match source {
            DeltaSource::Host(d) => return Ok(Resolved::Host(d)),
            DeltaSource::Tensor(view) => view,
        };
        self.expect_here(&view)?;
        view.expect_dtypes(&[DType::I32, DType::I64])?;
        let (len, thw, token_stride, comp_stride) = match *view.shape() {
            [n] => (n, false, view.strides()[0], 0),
            [n, 3] => (n, true, view.strides()[0], view.strides()[1]),
            _ => return Err(delta_shape_error(view.shape())),
        };
        if let Device::Cuda(_) = self.device {
            return Ok(Resolved::Device(DeviceDeltas {
                ptr: view.data_ptr() as u64,
                is_i64: view.dtype() == DType::I64,
                len,
                thw,
                token_stride: token_stride as i64,
                comp_stride: comp_stride as i64,
            }));
        }
        Ok(Resolved::Owned(OwnedDeltas::from_array(IntArray {
            values: view.int_values()?,
            shape: view.shape().to_vec(),
        })?))
    }
}

/// Dtype `T` and aligned for it.
fn typed<'v, 'a, T: Float>(view: &'v TensorView<'a>) -> Result<&'v TensorView<'a>> {
    view.expect_dtype(T::DTYPE)?;
    if view.numel() > 0 && (view.data_ptr() as usize) % std::mem::align_of::<T>() != 0 {
        return Err(value_err!(
            "{}: the data pointer is not aligned for {}; pass a freshly allocated array",
            view.name(),
            view.dtype()
        ));
    }
    Ok(view)
}

/// The dtype of a call's tensors: the first one's (each is checked against it).
fn float_dtype(first: Option<&TensorView<'_>>) -> Result<DType> {
    let Some(view) = first else {
        return Ok(DType::F32);
    };
    let dtype = view.expect_dtypes(KV_DTYPES)?.dtype();
    if dtype == DType::F64 && view.device() != Device::Cpu {
        return Err(type_err!(
            "{}: float64 tensors are supported on the CPU only, got one on {} (use float32, float16 or bfloat16)",
            view.name(),
            view.device()
        ));
    }
    Ok(dtype)
}

fn same_layer_count(a: usize, a_name: &str, b: usize, b_name: &str) -> Result<()> {
    if a != b {
        return Err(value_err!(
            "{b_name} has {b} layers but {a_name} has {a}: one of each per layer"
        ));
    }
    Ok(())
}

enum Resolved<'a> {
    Host(Deltas<'a>),
    Owned(OwnedDeltas),
    Device(DeviceDeltas),
}

impl Resolved<'_> {
    fn kernel(&self) -> KernelDeltas<'_> {
        match self {
            Resolved::Host(d) => KernelDeltas::Host(*d),
            Resolved::Owned(d) => KernelDeltas::Host(d.deltas()),
            Resolved::Device(d) => KernelDeltas::Device(*d),
        }
    }

    /// On the CPU (device tensors were refused by the device check).
    fn host(&self) -> Deltas<'_> {
        match self.kernel() {
            KernelDeltas::Host(d) => d,
            KernelDeltas::Device(_) => unreachable!("device deltas on a CPU call"),
        }
    }
}

/// Launches a prepared CUDA operation.
fn run<T: Float>(prepared: gpu::Prepared, launch: Launch<'_>) -> Result<usize> {
    // SAFETY: the typed views it was prepared from borrow the caller's tensors for this call,
    // all on the prepared device (checked), and nothing else writes them meanwhile.
    unsafe { prepared.run::<T>(launch)? };
    Ok(prepared.result)
}

/// Rotates every layer's keys `[tokens, heads, head_dim]` in place by their per-token deltas:
/// a key stored at position `p` becomes the key at `p + delta`. All layers hold the same
/// tokens.
pub fn rerotate_keys(
    keys: &mut [TensorView<'_>],
    deltas: DeltaSource<'_>,
    rope: &Rope,
    launch: Launch<'_>,
) -> Result<()> {
    let call = Call::of(keys.first(), "keys");
    let dtype = float_dtype(keys.first())?;
    let deltas = call.deltas(deltas)?;
    dispatch_float!(dtype, T => {
        let mut views: Vec<StridedMut<T, 3>> = keys
            .iter_mut()
            .map(|v| call.writable::<T, 3>(v, "[tokens, heads, head_dim]"))
            .collect::<Result<_>>()?;
        match call.device {
            Device::Cuda(ordinal) => {
                run::<T>(gpu::rerotate_keys(ordinal, &views, deltas.kernel(), rope)?, launch)?;
                Ok(())
            }
            _ => rerotate::rerotate_keys(&mut views, deltas.host(), rope),
        }
    })
}

fn layer_views<'v, T: Float>(
    call: &Call<'_>,
    keys: &'v mut [TensorView<'_>],
    values: &'v mut [TensorView<'_>],
) -> Result<Vec<LayerKv<'v, T>>> {
    same_layer_count(keys.len(), "keys", values.len(), "values")?;
    keys.iter_mut()
        .zip(values.iter_mut())
        .map(|(k, v)| {
            Ok(LayerKv {
                keys: call.writable::<T, 4>(k, "[batch, kv_heads, seq, head_dim]")?,
                values: call.writable::<T, 4>(v, "[batch, kv_heads, seq, head_dim]")?,
            })
        })
        .collect()
}

/// Evicts positions `[start, end)` from every layer of a contiguous cache (keys and values
/// `[batch, kv_heads, seq, head_dim]` per layer): entries `[end, length)` move down to
/// `start`, each moved key rotated by its delta. Returns the new valid length; entries from
/// there to `length` (default `seq`) are left stale for the caller to drop. The one-span case
/// of [`relocate_spans`].
#[allow(clippy::too_many_arguments)]
pub fn relocate_span(
    keys: &mut [TensorView<'_>],
    values: &mut [TensorView<'_>],
    start: usize,
    end: usize,
    length: Option<usize>,
    deltas: SpanDeltas<'_>,
    rope: &Rope,
    launch: Launch<'_>,
) -> Result<usize> {
    relocate(
        keys,
        values,
        &[(start, end)],
        SpanNames::StartEnd,
        length,
        deltas,
        rope,
        launch,
    )
}

/// Evicts every span `[start, end)` of `spans` from every layer of a contiguous cache in one
/// pass (sorted, disjoint, each `start <= end <= length`; adjacent and empty spans allowed):
/// every entry from the first span's start to `length` outside the spans moves down to close
/// the gaps, order kept, each moved key rotated by its delta (one per moved entry; by default,
/// plain RoPE only, minus the entries removed before it; with positions, `[moved]` or `[3,
/// moved]` ids of the moved entries before and after). Returns the new valid length (`length`
/// without spans).
pub fn relocate_spans(
    keys: &mut [TensorView<'_>],
    values: &mut [TensorView<'_>],
    spans: &[(usize, usize)],
    length: Option<usize>,
    deltas: SpanDeltas<'_>,
    rope: &Rope,
    launch: Launch<'_>,
) -> Result<usize> {
    relocate(
        keys,
        values,
        spans,
        SpanNames::List,
        length,
        deltas,
        rope,
        launch,
    )
}

/// Plain RoPE: each moved entry's delta is minus the entries removed before it (one value when
/// all moved entries shift alike, as after one span).
fn shift_deltas(plan: &SpanPlan) -> OwnedDeltas {
    let shifts: Vec<(i64, usize)> = plan
        .moves()
        .filter(|m| m.2 > 0)
        .map(|(first, source, count)| (-((source - plan.start - first) as i64), count))
        .collect();
    match shifts.as_slice() {
        [] => OwnedDeltas::Same(-(plan.removed() as i64)),
        [(d, _)] => OwnedDeltas::Same(*d),
        _ => OwnedDeltas::PerToken(
            shifts
                .iter()
                .flat_map(|&(d, count)| std::iter::repeat(d).take(count))
                .collect(),
        ),
    }
}

#[allow(clippy::too_many_arguments)]
fn relocate(
    keys: &mut [TensorView<'_>],
    values: &mut [TensorView<'_>],
    spans: &[(usize, usize)],
    names: SpanNames,
    length: Option<usize>,
    deltas: SpanDeltas<'_>,
    rope: &Rope,
    launch: Launch<'_>,
) -> Result<usize> {
    let call = Call::of(keys.first(), "keys");
    let dtype = float_dtype(keys.first())?;
    dispatch_float!(dtype, T => {
        let mut layers = layer_views::<T>(&call, keys, values)?;
        let seq = layers.first().map_or(0, |l| l.keys.shape()[2]);
        let valid = length.unwrap_or(seq);
        let deltas = match SpanPlan::new(spans, names, valid) {
            Ok(plan) => match deltas {
                SpanDeltas::Given(d) => call.deltas(d)?,
                SpanDeltas::Positions { old, new } => {
                    Resolved::Owned(relocate_deltas(&old, &new, plan.moved, rope)?)
                }
                SpanDeltas::Span if rope.config().is_mrope() => {
                    return Err(value_err!(
                        "delta: required with mrope_section (or pass old_positions and new_positions): evicting an image shifts \
                         M-RoPE positions by what get_rope_index assigns, not by end - start"
                    ));
                }
                SpanDeltas::Span => Resolved::Owned(shift_deltas(&plan)),
            },
            // The span checks refuse it, naming the spans / start / end / length.
            Err(_) => Resolved::Host(Deltas::Same(0)),
        };
        match call.device {
            Device::Cuda(ordinal) => run::<T>(
                gpu::relocate_spans(ordinal, &layers, spans, names, length, deltas.kernel(), rope)?,
                launch,
            ),
            _ => contiguous::relocate_with(&mut layers, spans, names, length, deltas.host(), rope),
        }
    })
}

/// Writes entry `j` of `new_keys[l]` / `new_values[l]` (`[batch, kv_heads, n, head_dim]`) at
/// cache position `positions[j]` of layer `l`, each new key rotated by its delta first when
/// `rotate` is given. Positions must be distinct and inside the cache; the new tensors must not
/// share memory with the cache.
#[allow(clippy::too_many_arguments)]
pub fn append_entries(
    keys: &mut [TensorView<'_>],
    values: &mut [TensorView<'_>],
    new_keys: &[TensorView<'_>],
    new_values: &[TensorView<'_>],
    positions: Positions<'_>,
    rotate: Option<(DeltaSource<'_>, &Rope)>,
    launch: Launch<'_>,
) -> Result<()> {
    same_layer_count(new_keys.len(), "new_keys", new_values.len(), "new_values")?;
    let call = Call::of(keys.first(), "keys");
    let dtype = float_dtype(keys.first())?;
    let rotate = match rotate {
        Some((d, rope)) => Some((call.deltas(d)?, rope)),
        None => None,
    };
    let positions: std::borrow::Cow<'_, [i64]> = match positions {
        Positions::List(p) => p.into(),
        Positions::From(start) => {
            let n = new_keys
                .first()
                .and_then(|t| t.shape().get(2).copied())
                .unwrap_or(0);
            (start..start + n as i64).collect::<Vec<_>>().into()
        }
    };
    dispatch_float!(dtype, T => {
        let mut layers = layer_views::<T>(&call, keys, values)?;
        let new: Vec<LayerKvRef<T>> = new_keys
            .iter()
            .zip(new_values)
            .map(|(k, v)| {
                Ok(LayerKvRef {
                    keys: call.readable::<T, 4>(k, "[batch, kv_heads, n, head_dim]")?,
                    values: call.readable::<T, 4>(v, "[batch, kv_heads, n, head_dim]")?,
                })
            })
            .collect::<Result<_>>()?;
        match call.device {
            Device::Cuda(ordinal) => {
                let rotate = rotate.as_ref().map(|(d, r)| (d.kernel(), *r));
                run::<T>(gpu::append_entries(ordinal, &layers, &new, &positions, rotate)?, launch)?;
                Ok(())
            }
            _ => {
                let rotate = rotate.as_ref().map(|(d, r)| (d.host(), *r));
                contiguous::append_entries(&mut layers, &new, &positions, rotate)
            }
        }
    })
}

fn paged_layout(
    call: &Call<'_>,
    view: &TensorView<'_>,
    kind: PagedLayoutKind,
    head_dim: usize,
) -> Result<PagedLayout> {
    let name = view.name();
    match kind {
        PagedLayoutKind::Vllm => {
            let (shape, strides) = call.fixed::<4>(
                view,
                "[num_blocks, kv_heads, block_size, 2 * head_dim] (layout \"vllm\")",
            )?;
            PagedLayout::vllm(shape, strides, head_dim, name)
        }
        PagedLayoutKind::KvBlocks => {
            let (shape, strides) = call.fixed::<5>(
                view,
                "[2, num_blocks, block_size, kv_heads, head_dim] (layout \"kv_blocks\")",
            )?;
            PagedLayout::kv_blocks(shape, strides, head_dim, name)
        }
        PagedLayoutKind::BlocksKv => {
            let (shape, strides) = call.fixed::<5>(
                view,
                "[num_blocks, 2, block_size, kv_heads, head_dim] (layout \"blocks_kv\")",
            )?;
            PagedLayout::blocks_kv(shape, strides, head_dim, name)
        }
    }
}

/// For every layer of a paged (vLLM) cache: reads the entries at `src_slots[i]` (keys and
/// values, all heads), rotates the keys by `deltas[i]`, writes them to `dst_slots[i]`
/// (`slot = block * block_size + offset`; negative slots are skipped). Sources are read before
/// destinations are written, so they may overlap. Returns the number of entries moved per layer.
pub fn paged_reinject(
    kv_caches: &mut [TensorView<'_>],
    layout: PagedLayoutKind,
    src_slots: &[i64],
    dst_slots: &[i64],
    deltas: DeltaSource<'_>,
    rope: &Rope,
    launch: Launch<'_>,
) -> Result<usize> {
    let call = Call::of(kv_caches.first(), "kv_caches");
    let dtype = float_dtype(kv_caches.first())?;
    let deltas = call.deltas(deltas)?;
    let head_dim = rope.config().head_dim;
    dispatch_float!(dtype, T => {
        let mut caches: Vec<PagedCache<T>> = kv_caches
            .iter_mut()
            .map(|view| {
                let layout = paged_layout(&call, view, layout, head_dim)?;
                typed::<T>(view)?.expect_writable()?;
                // SAFETY: the view borrows its memory exclusively for the call; device, dtype,
                // shape, alignment and writability are checked (overlap in `from_raw`).
                unsafe { PagedCache::from_raw(view.data_ptr() as *mut T, layout, view.name()) }
            })
            .collect::<Result<_>>()?;
        match call.device {
            Device::Cuda(ordinal) => run::<T>(
                gpu::paged_reinject(ordinal, &caches, src_slots, dst_slots, deltas.kernel(), rope)?,
                launch,
            ),
            _ => paged::paged_reinject(&mut caches, src_slots, dst_slots, deltas.host(), rope),
        }
    })
}
