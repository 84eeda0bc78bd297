//! KV-cache re-injection on a GPU: the launchers of `kernels/kv.cu`.
//!
//! Each operation takes the same typed, checked views as the CPU path (`StridedMut`,
//! `LayerKv`, `PagedCache`, built over device pointers: nothing here dereferences them) and runs
//! the CPU path's own checks first (`check_relocate`, `check_append`, `check_paged`), so errors
//! and messages are the same on both devices and nothing is written before everything is checked.
//! An operation is prepared on the host ([`Prepared`]): the small host arrays the kernels read
//! (per-token deltas, distinct-delta tables, positions, the ordered paged moves) are packed into
//! one upload; the caller allocates a device buffer of [`Prepared::upload_words`] int64 words
//! (PyTorch's caching allocator in the bindings) and [`Prepared::launch`] copies the upload into
//! it and launches, all on the caller's stream, without waiting for the GPU.

use super::args::kv::*;
use super::driver::{device, Device, Stream};
use super::sources::KernelFile;
use super::Launch;
use crate::dtype::{DType, Float};
use crate::error::{Error, Result};
use crate::kv::{
    check_append, check_paged, check_relocate, check_rerotate, Deltas, KernelDeltas, LayerKv,
    LayerKvRef, PagedCache, Rope, SpanNames, StridedMut,
};
use crate::value_err;

fn rope_args(rope: &Rope) -> Result<RopeArgs> {
    let config = rope.config();
    let half = config.rotary_dim / 2;
    if half > MAX_HALF {
        return Err(value_err!(
            "rotary_dim = {}: the CUDA kernels rotate at most {} dimensions",
            config.rotary_dim,
            2 * MAX_HALF
        ));
    }
    let mut args = RopeArgs {
        inv_freq: [0.0; MAX_HALF],
        comp: [0; MAX_HALF],
        half: half as i32,
        head_dim: config.head_dim as i32,
        interleaved: config.interleaved as i32,
        pad: 0,
    };
    args.inv_freq[..half].copy_from_slice(rope.inv_freq());
    args.comp[..half].copy_from_slice(rope.components());
    Ok(args)
}

impl KernelDeltas<'_> {
    /// The deltas as the kernel reads them, per token; host arrays are added to `up`.
    fn direct(&self, tokens: usize, up: &mut Uploads) -> (DeltaArgs, Option<usize>) {
        match *self {
            KernelDeltas::Host(Deltas::Same(d)) => (
                DeltaArgs {
                    same: [d; 3],
                    ..Default::default()
                },
                None,
            ),
            KernelDeltas::Host(deltas) => {
                let rows: Vec<i64> = (0..tokens)
                    .flat_map(|t| Rope::delta_of(&deltas, t))
                    .collect();
                let offset = up.push_i64(&rows);
                (
                    DeltaArgs {
                        kind: 2,
                        is_i64: 1,
                        token_stride: 3,
                        comp_stride: 1,
                        ..Default::default()
                    },
                    Some(offset),
                )
            }
            KernelDeltas::Device(d) => (
                DeltaArgs {
                    ptr: d.ptr,
                    kind: if d.thw { 2 } else { 1 },
                    is_i64: d.is_i64 as i32,
                    token_stride: d.token_stride,
                    comp_stride: d.comp_stride,
                    ..Default::default()
                },
                None,
            ),
        }
    }

    /// For kernels that walk tokens in many blocks (relocate, paged): the distinct deltas as a
    /// table of at most [`MAX_TABLE`] rows plus a per-token row map when the deltas are on the
    /// host and few, else per token.
    fn tabled(
        &self,
        tokens: usize,
        up: &mut Uploads,
    ) -> (DeltaArgs, AngleSource, Option<usize>, Option<usize>) {
        if let KernelDeltas::Host(Deltas::Same(d)) = *self {
            return (
                DeltaArgs {
                    same: [d; 3],
                    ..Default::default()
                },
                AngleSource {
                    map: 0,
                    table_rows: 1,
                    pad: 0,
                },
                None,
                None,
            );
        }
        if let KernelDeltas::Host(deltas) = *self {
            let mut rows: Vec<[i64; 3]> = Vec::new();
            let mut map = Vec::with_capacity(tokens);
            let mut too_many = false;
            for t in 0..tokens {
                let d = Rope::delta_of(&deltas, t);
                let r = match rows.iter().position(|x| *x == d) {
                    Some(r) => r,
                    None if rows.len() < MAX_TABLE => {
                        rows.push(d);
                        rows.len() - 1
                    }
                    None => {
                        too_many = true;
                        break;
                    }
                };
                map.push(r as i32);
            }
            if !too_many {
                let table = up.push_i64(&rows.concat());
                let map_offset = up.push_i32(&map);
                let delta = DeltaArgs {
                    kind: 2,
                    is_i64: 1,
                    token_stride: 3,
                    comp_stride: 1,
                    ..Default::default()
                };
                return (
                    delta,
                    AngleSource {
                        map: 0,
                        table_rows: rows.len().max(1) as i32,
                        pad: 0,
                    },
                    Some(table),
                    Some(map_offset),
                );
            }
        }
        let (delta, offset) = self.direct(tokens, up);
        (delta, AngleSource::default(), offset, None)
    }
}

/// Host arrays packed for one upload, each at an 8-byte aligned offset.
#[derive(Debug, Default)]
pub struct Uploads {
    bytes: Vec<u8>,
}

impl Uploads {
    fn align(&mut self) -> usize {
        while self.bytes.len() % 8 != 0 {
            self.bytes.push(0);
        }
        self.bytes.len()
    }
    fn push_i64(&mut self, values: &[i64]) -> usize {
        let offset = self.align();
        values
            .iter()
            .for_each(|v| self.bytes.extend_from_slice(&v.to_ne_bytes()));
        offset
    }
    fn push_i32(&mut self, values: &[i32]) -> usize {
        let offset = self.align();
        values
            .iter()
            .for_each(|v| self.bytes.extend_from_slice(&v.to_ne_bytes()));
        offset
    }
}

fn dtype_tag(dtype: DType) -> &'static str {
    match dtype {
        DType::F32 => "f32",
        DType::F16 => "f16",
        _ => "bf16",
    }
}

/// Elements per 16-byte pack.
fn pack<T: Float>() -> usize {
    16 / std::mem::size_of::<T>()
}

fn aligned(ptr: u64) -> bool {
    ptr % 16 == 0
}

/// Packed access needs a contiguous last axis and every row start and split on a 16-byte
/// boundary.
fn packed_ok(
    w: usize,
    half: usize,
    interleaved: bool,
    dims: &[usize],
    strides: &[isize],
    dim_strides: &[isize],
    ptrs: &[u64],
) -> bool {
    let split = if interleaved { 2 * half } else { half };
    dim_strides.iter().all(|&s| s == 1)
        && split % w == 0
        && dims.iter().all(|&d| d % w == 0)
        && strides.iter().all(|&s| s.rem_euclid(w as isize) == 0)
        && ptrs.iter().all(|&p| aligned(p))
}

fn kernel_name(op: &str, dtype: DType, packed: bool, interleaved: bool) -> String {
    format!(
        "{op}_{}_{}_{}",
        dtype_tag(dtype),
        if packed { "v" } else { "s" },
        if interleaved { "gptj" } else { "neox" }
    )
}

/// One kernel launch of a prepared operation; device pointers to uploads are resolved at launch.
enum Step {
    Rerotate(RerotateArgs, Option<usize>),
    /// args, delta upload, map upload, runs upload, shared bytes
    Relocate(
        RelocateArgs,
        Option<usize>,
        Option<usize>,
        Option<usize>,
        u32,
    ),
    Append(AppendArgs, Option<usize>, Option<usize>),
    /// args, delta upload, map upload, entries upload, uses the staging buffer, shared bytes
    Paged(PagedArgs, Option<usize>, Option<usize>, usize, bool, u32),
}

/// A checked operation ready to launch.
pub struct Prepared {
    ordinal: i32,
    uploads: Uploads,
    launches: Vec<(String, (u32, u32, u32), u32, Step)>,
    staging_elements: usize,
    /// The operation's result for the caller (new length, entries moved).
    pub result: usize,
}

impl Prepared {
    /// int64 words of device memory the upload needs (0: none).
    pub fn upload_words(&self) -> usize {
        self.uploads.bytes.len().div_ceil(8)
    }

    /// Elements (of the cache dtype) of staging memory paged moves on cycles need (0: none).
    pub fn staging_elements(&self) -> usize {
        self.staging_elements
    }

    /// Launches on `launch.stream` with buffers from `launch.scratch` (or the driver's); `T` is
    /// the cache's element type (for the staging buffer).
    ///
    /// # Safety
    /// As [`Prepared::launch`] for the views this was prepared from.
    pub unsafe fn run<T>(&self, launch: Launch<'_>) -> Result<()> {
        if self.launches.is_empty() {
            return Ok(());
        }
        let sizes = [
            self.upload_words() * 8,
            self.staging_elements * std::mem::size_of::<T>(),
        ];
        let stream = launch.stream;
        match launch.scratch {
            Some(alloc) => {
                let mut ptrs = [0u64; 2];
                for (ptr, &bytes) in ptrs.iter_mut().zip(&sizes) {
                    if bytes > 0 {
                        *ptr = alloc(bytes)?;
                    }
                }
                self.launch(stream, ptrs[0], ptrs[1])
            }
            None => {
                let dev = device(self.ordinal)?;
                let mut ptrs = [0u64; 2];
                let mut result = Ok(());
                for (ptr, &bytes) in ptrs.iter_mut().zip(&sizes) {
                    if bytes > 0 && result.is_ok() {
                        match dev.alloc_async(bytes, stream) {
                            Ok(p) => *ptr = p,
                            Err(e) => result = Err(e),
                        }
                    }
                }
                if result.is_ok() {
                    result = self.launch(stream, ptrs[0], ptrs[1]);
                }
                for ptr in ptrs.into_iter().filter(|&p| p != 0) {
                    dev.free_async(ptr, stream)?;
                }
                result
            }
        }
    }

    /// Copies the upload to `upload` (device memory of `upload_words()` int64 words), then
    /// launches every kernel on `stream`. Asynchronous: returns without waiting for the GPU.
    ///
    /// # Safety
    /// The views this was prepared from must still be valid device memory of device `ordinal`,
    /// `upload` and `staging` as described, and nothing else may write the caches meanwhile.
    pub unsafe fn launch(&self, stream: Stream, upload: u64, staging: u64) -> Result<()> {
        if self.launches.is_empty() {
            return Ok(());
        }
        let dev = device(self.ordinal)?;
        dev.copy_to_device(upload, &self.uploads.bytes, stream)?;
        let at =
            |offset: Option<usize>, fallback: u64| offset.map_or(fallback, |o| upload + o as u64);
        for (name, grid, block, launch) in &self.launches {
            let f = dev.function(KernelFile::Kv, name)?;
            match launch {
                Step::Rerotate(args, delta) => {
                    let mut a = *args;
                    a.delta.ptr = at(*delta, a.delta.ptr);
                    dev.launch(f, *grid, *block, 0, stream, &a)?;
                }
                Step::Relocate(args, delta, map, runs, shared) => {
                    let mut a = *args;
                    a.delta.ptr = at(*delta, a.delta.ptr);
                    a.angles.map = at(*map, 0);
                    a.runs = at(*runs, 0);
                    dev.launch(f, *grid, *block, *shared, stream, &a)?;
                }
                Step::Append(args, delta, positions) => {
                    let mut a = *args;
                    a.delta.ptr = at(*delta, a.delta.ptr);
                    a.positions = at(*positions, 0);
                    dev.launch(f, *grid, *block, 0, stream, &a)?;
                }
                Step::Paged(args, delta, map, entries, uses_staging, shared) => {
                    let mut a = *args;
                    a.delta.ptr = at(*delta, a.delta.ptr);
                    a.angles.map = at(*map, 0);
                    a.entries = upload + *entries as u64;
                    a.staging = if *uses_staging { staging } else { 0 };
                    dev.launch(f, *grid, *block, *shared, stream, &a)?;
                }
            }
        }
        Ok(())
    }
}

/// Groups of at most `max` consecutive items sharing `key` (layers with one layout per launch).
fn groups<K: PartialEq, I: Copy>(items: &[I], max: usize, key: impl Fn(I) -> K) -> Vec<Vec<I>> {
    let mut out: Vec<Vec<I>> = Vec::new();
    for &item in items {
        match out.last_mut() {
            Some(group) if group.len() < max && key(group[0]) == key(item) => group.push(item),
            _ => out.push(vec![item]),
        }
    }
    out
}

fn ptr_array<const N: usize>(ptrs: impl Iterator<Item = u64>) -> [u64; N] {
    let mut out = [0u64; N];
    for (slot, p) in out.iter_mut().zip(ptrs) {
        *slot = p;
    }
    out
}

fn strides4(s: [isize; 4]) -> [i64; 4] {
    s.map(|x| x as i64)
}

fn device_of(ordinal: i32) -> Result<std::sync::Arc<Device>> {
    device(ordinal)
}

/// Rotates every layer's keys `[tokens, heads, head_dim]` in place by their deltas (the CUDA
/// `rerotate_keys`).
pub fn rerotate_keys<T: Float>(
    ordinal: i32,
    keys: &[StridedMut<'_, T, 3>],
    deltas: KernelDeltas<'_>,
    rope: &Rope,
) -> Result<Prepared> {
    let tokens = check_rerotate(keys, &deltas, rope)?;
    let args_rope = rope_args(rope)?;
    let mut uploads = Uploads::default();
    let mut launches = Vec::new();
    if tokens > 0 && !keys.is_empty() && !matches!(deltas, KernelDeltas::Host(Deltas::Same(0))) {
        let (delta, offset) = deltas.direct(tokens, &mut uploads);
        let config = rope.config();
        let w = pack::<T>();
        let indices: Vec<usize> = (0..keys.len()).collect();
        for group in groups(&indices, MAX_LAYERS, |i| {
            (keys[i].shape(), keys[i].strides())
        }) {
            let [_, heads, dim] = keys[group[0]].shape();
            let [ts, hs, ds] = keys[group[0]].strides();
            let ptrs: Vec<u64> = group.iter().map(|&i| keys[i].ptr() as u64).collect();
            let packed = packed_ok(
                w,
                args_rope.half as usize,
                config.interleaved,
                &[dim],
                &[ts, hs],
                &[ds],
                &ptrs,
            );
            let args = RerotateArgs {
                layers: ptr_array(ptrs.into_iter()),
                tokens: tokens as i64,
                token_stride: ts as i64,
                head_stride: hs as i64,
                dim_stride: ds as i64,
                delta,
                rope: args_rope,
                n_layers: group.len() as i32,
                heads: heads as i32,
            };
            if heads == 0 {
                continue;
            }
            launches.push((
                kernel_name("rerotate", T::DTYPE, packed, config.interleaved),
                (tokens as u32, 1, 1),
                128,
                Step::Rerotate(args, offset),
            ));
        }
    }
    Ok(Prepared {
        ordinal,
        uploads,
        launches,
        staging_elements: 0,
        result: tokens,
    })
}

fn grid_rows(moved: usize, lanes: usize, multiprocessors: i32, overlap: bool) -> (i64, u32) {
    if overlap || moved == 0 {
        return (moved.max(1) as i64, 1);
    }
    // Enough blocks to fill the GPU a few times over, at least 64 rows each.
    let target = (4 * multiprocessors.max(1) as usize)
        .div_ceil(lanes.max(1))
        .max(1);
    let rows = moved.div_ceil(target).max(64).max(moved.div_ceil(65_535));
    (rows as i64, moved.div_ceil(rows) as u32)
}

/// Evicts every span of `spans` from every layer of a contiguous cache in one launch per
/// group of layers (the CUDA `relocate_spans`; `relocate_span` is its one-span case).
pub(crate) fn relocate_spans<T: Float>(
    ordinal: i32,
    layers: &[LayerKv<'_, T>],
    spans: &[(usize, usize)],
    names: SpanNames,
    length: Option<usize>,
    deltas: KernelDeltas<'_>,
    rope: &Rope,
) -> Result<Prepared> {
    let plan = check_relocate(layers, spans, names, length, &deltas, rope)?;
    let (start, moved, removed) = (plan.start, plan.moved, plan.removed());
    let args_rope = rope_args(rope)?;
    let dev = device_of(ordinal)?;
    let mut uploads = Uploads::default();
    let mut launches = Vec::new();
    if moved > 0 && !layers.is_empty() {
        let config = rope.config();
        let (delta, angles, delta_offset, map_offset) = deltas.tabled(moved, &mut uploads);
        // One span: its source rows follow from `end`; several: the kernel looks each moved
        // entry's run up in a table of (first, end) pairs.
        let end = plan.first_source();
        let runs_offset = (plan.moves().filter(|m| m.2 > 0).count() > 1).then(|| {
            let flat: Vec<i64> = plan
                .runs
                .iter()
                .flat_map(|&(first, end)| [first as i64, end as i64])
                .collect();
            uploads.push_i64(&flat)
        });
        let shared = (angles.table_rows.max(0) as usize * args_rope.half as usize * 8) as u32;
        let w = pack::<T>();
        let indices: Vec<usize> = (0..layers.len()).collect();
        let key = |i: usize| {
            (
                layers[i].keys.shape(),
                layers[i].keys.strides(),
                layers[i].values.shape(),
                layers[i].values.strides(),
            )
        };
        for group in groups(&indices, MAX_LAYERS, key) {
            let (ks, kst, vs, vst) = key(group[0]);
            let [batch, heads, _, key_dim] = ks;
            let value_dim = vs[3];
            let kp: Vec<u64> = group.iter().map(|&i| layers[i].keys.ptr() as u64).collect();
            let vp: Vec<u64> = group
                .iter()
                .map(|&i| layers[i].values.ptr() as u64)
                .collect();
            let all: Vec<u64> = kp.iter().chain(&vp).copied().collect();
            let packed = packed_ok(
                w,
                args_rope.half as usize,
                config.interleaved,
                &[key_dim, value_dim],
                &[kst[0], kst[1], kst[2], vst[0], vst[1], vst[2]],
                &[kst[3], vst[3]],
                &all,
            );
            let lanes = group.len() * batch * heads * 2;
            if lanes == 0 {
                continue;
            }
            // Sources never lie below their destinations; with every source above every
            // destination, row segments of a lane can run in parallel blocks.
            let overlap = removed > 0 && moved > end - start;
            let (seg_rows, segments) = grid_rows(moved, lanes, dev.multiprocessors, overlap);
            let args = RelocateArgs {
                keys: ptr_array(kp.into_iter()),
                values: ptr_array(vp.into_iter()),
                key_strides: strides4(kst),
                value_strides: strides4(vst),
                start: start as i64,
                end: end as i64,
                moved: moved as i64,
                seg_rows,
                removed: removed as i64,
                n_runs: if runs_offset.is_some() {
                    plan.runs.len() as i64
                } else {
                    1
                },
                runs: 0,
                delta,
                angles,
                rope: args_rope,
                n_layers: group.len() as i32,
                batch: batch as i32,
                heads: heads as i32,
                key_dim: key_dim as i32,
                value_dim: value_dim as i32,
                pad: 0,
            };
            launches.push((
                kernel_name("relocate", T::DTYPE, packed, config.interleaved),
                (lanes as u32, segments, 1),
                256,
                Step::Relocate(args, delta_offset, map_offset, runs_offset, shared),
            ));
        }
    }
    Ok(Prepared {
        ordinal,
        uploads,
        launches,
        staging_elements: 0,
        result: plan.new_length(),
    })
}

/// Writes new entries into every layer of a contiguous cache (the CUDA `append_entries`).
pub fn append_entries<T: Float>(
    ordinal: i32,
    layers: &[LayerKv<'_, T>],
    new: &[LayerKvRef<'_, T>],
    positions: &[i64],
    rotate: Option<(KernelDeltas<'_>, &Rope)>,
) -> Result<Prepared> {
    check_append(layers, new, positions, rotate)?;
    let n = positions.len();
    let mut uploads = Uploads::default();
    let mut launches = Vec::new();
    if n > 0 && !layers.is_empty() {
        let rope_parts = match &rotate {
            Some((d, rope)) => Some((
                rope_args(rope)?,
                d.direct(n, &mut uploads),
                rope.config().interleaved,
            )),
            None => None,
        };
        let contiguous = positions
            .iter()
            .enumerate()
            .all(|(j, &p)| p == positions[0] + j as i64);
        let positions_offset = if contiguous {
            None
        } else {
            Some(uploads.push_i64(positions))
        };
        let w = pack::<T>();
        let interleaved = rope_parts.as_ref().is_some_and(|p| p.2);
        let half = rope_parts.as_ref().map_or(0, |p| p.0.half as usize);
        let indices: Vec<usize> = (0..layers.len()).collect();
        let key = |i: usize| {
            (
                layers[i].keys.shape(),
                layers[i].keys.strides(),
                layers[i].values.shape(),
                layers[i].values.strides(),
                new[i].keys.strides(),
                new[i].values.strides(),
            )
        };
        for group in groups(&indices, MAX_APPEND_LAYERS, key) {
            let (ks, kst, vs, vst, nkst, nvst) = key(group[0]);
            let [batch, heads, _, key_dim] = ks;
            let ptrs =
                |f: &dyn Fn(usize) -> u64| -> Vec<u64> { group.iter().map(|&i| f(i)).collect() };
            let kp = ptrs(&|i| layers[i].keys.ptr() as u64);
            let vp = ptrs(&|i| layers[i].values.ptr() as u64);
            let nkp = ptrs(&|i| new[i].keys.ptr() as u64);
            let nvp = ptrs(&|i| new[i].values.ptr() as u64);
            let all: Vec<u64> = kp
                .iter()
                .chain(&vp)
                .chain(&nkp)
                .chain(&nvp)
                .copied()
                .collect();
            let packed = packed_ok(
                w,
                half,
                interleaved,
                &[key_dim, vs[3]],
                &[
                    kst[0], kst[1], kst[2], vst[0], vst[1], vst[2], nkst[0], nkst[1], nkst[2],
                    nvst[0], nvst[1], nvst[2],
                ],
                &[kst[3], vst[3], nkst[3], nvst[3]],
                &all,
            );
            if batch == 0 || heads == 0 {
                continue;
            }
            let (rope, (delta, delta_offset)) = match &rope_parts {
                Some((r, d, _)) => (*r, *d),
                None => (
                    RopeArgs {
                        inv_freq: [0.0; MAX_HALF],
                        comp: [0; MAX_HALF],
                        half: 0,
                        head_dim: key_dim as i32,
                        interleaved: 0,
                        pad: 0,
                    },
                    (DeltaArgs::default(), None),
                ),
            };
            let args = AppendArgs {
                keys: ptr_array(kp.into_iter()),
                values: ptr_array(vp.into_iter()),
                new_keys: ptr_array(nkp.into_iter()),
                new_values: ptr_array(nvp.into_iter()),
                key_strides: strides4(kst),
                value_strides: strides4(vst),
                new_key_strides: strides4(nkst),
                new_value_strides: strides4(nvst),
                positions: 0,
                start: positions[0],
                n: n as i64,
                delta,
                rope,
                rotate: rope_parts.is_some() as i32,
                n_layers: group.len() as i32,
                batch: batch as i32,
                heads: heads as i32,
                key_dim: key_dim as i32,
                value_dim: vs[3] as i32,
            };
            launches.push((
                kernel_name("append", T::DTYPE, packed, interleaved),
                (n as u32, batch as u32, 1),
                128,
                Step::Append(args, delta_offset, positions_offset),
            ));
        }
    }
    Ok(Prepared {
        ordinal,
        uploads,
        launches,
        staging_elements: 0,
        result: n,
    })
}

/// A safe order for the moves on a GPU: entry `e` reads `src(e)`, which the entry writing that
/// slot must not overwrite before. Kahn's algorithm gives a topological order (readers before
/// the entry that overwrites what they read); entries left over lie on cycles and are staged.
/// Returns (order, staged, whether any entry depends on another).
fn move_order(
    entries: &[(usize, usize, usize)],
    writer_of: impl Fn(usize) -> Option<usize>,
) -> (Vec<usize>, Vec<usize>, bool) {
    let m = entries.len();
    let mut overwriter = vec![usize::MAX; m];
    let mut waiting = vec![0u32; m];
    for (e, &(s, _, _)) in entries.iter().enumerate() {
        if let Some(f) = writer_of(s) {
            if f != e {
                overwriter[e] = f;
                waiting[f] += 1;
            }
        }
    }
    if overwriter.iter().all(|&f| f == usize::MAX) {
        return ((0..m).collect(), Vec::new(), false);
    }
    let mut order: Vec<usize> = (0..m).filter(|&f| waiting[f] == 0).collect();
    let mut next = 0;
    while next < order.len() {
        let f = overwriter[order[next]];
        next += 1;
        if f != usize::MAX {
            waiting[f] -= 1;
            if waiting[f] == 0 {
                order.push(f);
            }
        }
    }
    let staged = (0..m).filter(|&f| waiting[f] > 0).collect();
    (order, staged, true)
}

/// Moves entries of a paged cache: gather, re-rotate keys, scatter, for every layer (the CUDA
/// `paged_reinject`). Returns the number of entries moved per layer in `result`.
pub fn paged_reinject<T: Float>(
    ordinal: i32,
    caches: &[PagedCache<'_, T>],
    src_slots: &[i64],
    dst_slots: &[i64],
    deltas: KernelDeltas<'_>,
    rope: &Rope,
) -> Result<Prepared> {
    let (entries, dst_seen) = check_paged(caches, src_slots, dst_slots, &deltas, rope)?;
    let args_rope = rope_args(rope)?;
    let dev = device_of(ordinal)?;
    let mut uploads = Uploads::default();
    let mut launches = Vec::new();
    let first = caches[0].layout();
    let mut staging_elements = 0;
    if !entries.is_empty() && first.kv_heads > 0 {
        let config = rope.config();
        let (order, staged, dependent) = move_order(&entries, |slot| dst_seen.get(slot));
        let triples = |list: &[usize]| -> Vec<i64> {
            list.iter()
                .flat_map(|&e| {
                    [
                        entries[e].0 as i64,
                        entries[e].1 as i64,
                        entries[e].2 as i64,
                    ]
                })
                .collect()
        };
        let order_offset = uploads.push_i64(&triples(&order));
        let staged_offset = uploads.push_i64(&triples(&staged));
        let (delta, angles, delta_offset, map_offset) =
            deltas.tabled(src_slots.len(), &mut uploads);
        let shared = (angles.table_rows.max(0) as usize * args_rope.half as usize * 8) as u32;
        staging_elements = staged.len() * caches.len() * first.kv_heads * 2 * first.head_dim;
        let w = pack::<T>();
        let indices: Vec<usize> = (0..caches.len()).collect();
        let layer_groups = groups(&indices, MAX_LAYERS, |i| caches[i].layout());
        let lanes_of = |n: usize| n * first.kv_heads * 2;
        for (mode, list_offset, count) in [
            (0, order_offset, order.len()),
            (1, staged_offset, staged.len()),
            (2, staged_offset, staged.len()),
        ] {
            if count == 0 {
                continue;
            }
            for group in &layer_groups {
                let l = caches[group[0]].layout();
                let ptrs: Vec<u64> = group.iter().map(|&i| caches[i].ptr() as u64).collect();
                let packed = packed_ok(
                    w,
                    args_rope.half as usize,
                    config.interleaved,
                    &[l.head_dim],
                    &[l.block_stride, l.slot_stride, l.head_stride, l.value_offset],
                    &[l.dim_stride],
                    &ptrs,
                );
                let lanes = lanes_of(group.len());
                let (seg, segments) = if mode == 0 && !dependent {
                    let (rows, segs) = grid_rows(count, lanes, dev.multiprocessors, false);
                    (rows, segs)
                } else if mode == 0 {
                    (count as i64, 1)
                } else {
                    // Gathers and scatters touch distinct rows: any split works.
                    grid_rows(count, lanes, dev.multiprocessors, false)
                };
                let args = PagedArgs {
                    caches: ptr_array(ptrs.into_iter()),
                    block_stride: l.block_stride as i64,
                    slot_stride: l.slot_stride as i64,
                    head_stride: l.head_stride as i64,
                    dim_stride: l.dim_stride as i64,
                    value_offset: l.value_offset as i64,
                    entries: 0,
                    n_entries: count as i64,
                    seg_entries: seg,
                    staging: 0,
                    layer0: group[0] as i64,
                    delta,
                    angles,
                    rope: args_rope,
                    mode,
                    n_layers: group.len() as i32,
                    total_layers: caches.len() as i32,
                    heads: l.kv_heads as i32,
                    head_dim: l.head_dim as i32,
                    block_size: l.block_size as i32,
                };
                launches.push((
                    kernel_name("paged", T::DTYPE, packed, config.interleaved),
                    (lanes as u32, segments, 1),
                    256,
                    Step::Paged(
                        args,
                        delta_offset,
                        map_offset,
                        list_offset,
                        mode != 0,
                        shared,
                    ),
                ));
            }
        }
    }
    Ok(Prepared {
        ordinal,
        uploads,
        launches,
        staging_elements,
        result: entries.len(),
    })
}

/// The error for an operation that needs a GPU on a build or machine without one.
pub fn unavailable(what: &str) -> Error {
    Error::Runtime(format!("{what}: CUDA is not available"))
}
