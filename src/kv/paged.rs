//! Paged caches (vLLM): gather entries from source slots, re-rotate their keys, scatter them to
//! destination slots, for every layer in one call.
//!
//! A slot is numbered as vLLM numbers it: `slot = block_number * block_size + offset_in_block`;
//! a negative slot (vLLM's `PAD_SLOT_ID = -1`) means "no entry" and is skipped. The physical
//! layout is described by strides, so any of vLLM's layouts is met without copies:
//!
//! * vLLM 0.33 (`vllm/v1/kv_cache_interface.py`, `create_kv_cache_views`): each layer is a view
//!   of logical shape `[num_blocks, kv_heads, block_size, head_dim + head_dim_v]` (keys in
//!   `[..., :head_dim]`, values after them) whose strides follow the resolved `KVCacheLayout`
//!   (NHD `LBNHC` by default and for FlashAttention, HND `LBHNC` / `BLHNC` for FlashInfer's
//!   TRT-LLM kernels on Blackwell);
//! * earlier vLLM FlashAttention: `[2, num_blocks, block_size, kv_heads, head_dim]`;
//! * earlier vLLM FlashInfer: `[num_blocks, 2, block_size, kv_heads, head_dim]`.

use rayon::prelude::*;

use crate::dtype::Float;
use crate::error::Result;
use crate::{index_err, value_err};

use super::rope::{Deltas, KernelDeltas, Rope};
use super::strided::{copy_row, is_non_overlapping, rotate_row, rotate_row_into, Row, SendPtr};

/// Where entry (block, slot-in-block, head, dim) of the keys lies, in elements from the cache's
/// base pointer; the value element at the same index is `value_offset` further.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PagedLayout {
    pub num_blocks: usize,
    pub block_size: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub block_stride: isize,
    pub slot_stride: isize,
    pub head_stride: isize,
    pub dim_stride: isize,
    pub value_offset: isize,
}

fn tuple<D: std::fmt::Display>(v: &[D]) -> String {
    let parts: Vec<String> = v.iter().map(|d| d.to_string()).collect();
    format!("({})", parts.join(", "))
}

impl PagedLayout {
    /// vLLM 0.33's per-layer view `[num_blocks, kv_heads, block_size, 2 * head_dim]` with its
    /// strides (keys first in the last dimension, then values).
    pub fn vllm(
        shape: [usize; 4],
        strides: [isize; 4],
        head_dim: usize,
        name: &str,
    ) -> Result<Self> {
        let [num_blocks, kv_heads, block_size, content] = shape;
        if content != 2 * head_dim {
            return Err(value_err!(
                "{name} has shape {}: layout \"vllm\" is [num_blocks, kv_heads, block_size, 2 * head_dim] with head_dim = {head_dim}, so the last dimension must be {}",
                tuple(&shape),
                2 * head_dim
            ));
        }
        Ok(Self {
            num_blocks,
            block_size,
            kv_heads,
            head_dim,
            block_stride: strides[0],
            slot_stride: strides[2],
            head_stride: strides[1],
            dim_stride: strides[3],
            value_offset: head_dim as isize * strides[3],
        })
    }

    /// Earlier vLLM FlashAttention: `[2, num_blocks, block_size, kv_heads, head_dim]`.
    pub fn kv_blocks(
        shape: [usize; 5],
        strides: [isize; 5],
        head_dim: usize,
        name: &str,
    ) -> Result<Self> {
        let [two, num_blocks, block_size, kv_heads, dim] = shape;
        if two != 2 || dim != head_dim {
            return Err(value_err!(
                "{name} has shape {}: layout \"kv_blocks\" is [2, num_blocks, block_size, kv_heads, head_dim] with head_dim = {head_dim}",
                tuple(&shape)
            ));
        }
        Ok(Self {
            num_blocks,
            block_size,
            kv_heads,
            head_dim,
            block_stride: strides[1],
            slot_stride: strides[2],
            head_stride: strides[3],
            dim_stride: strides[4],
            value_offset: strides[0],
        })
    }

    /// Earlier vLLM FlashInfer: `[num_blocks, 2, block_size, kv_heads, head_dim]`.
    pub fn blocks_kv(
        shape: [usize; 5],
        strides: [isize; 5],
        head_dim: usize,
        name: &str,
    ) -> Result<Self> {
        let [num_blocks, two, block_size, kv_heads, dim] = shape;
        if two != 2 || dim != head_dim {
            return Err(value_err!(
                "{name} has shape {}: layout \"blocks_kv\" is [num_blocks, 2, block_size, kv_heads, head_dim] with head_dim = {head_dim}",
                tuple(&shape)
            ));
        }
        Ok(Self {
            num_blocks,
            block_size,
            kv_heads,
            head_dim,
            block_stride: strides[0],
            slot_stride: strides[2],
            head_stride: strides[3],
            dim_stride: strides[4],
            value_offset: strides[1],
        })
    }

    pub fn num_slots(&self) -> usize {
        self.num_blocks * self.block_size
    }

    fn shape5(&self) -> ([usize; 5], [isize; 5]) {
        (
            [
                2,
                self.num_blocks,
                self.block_size,
                self.kv_heads,
                self.head_dim,
            ],
            [
                self.value_offset,
                self.block_stride,
                self.slot_stride,
                self.head_stride,
                self.dim_stride,
            ],
        )
    }

    /// Lowest and highest element offset (keys and values), `None` when empty.
    fn offset_range(&self) -> Option<(isize, isize)> {
        let (shape, strides) = self.shape5();
        if shape.contains(&0) {
            return None;
        }
        let (mut lo, mut hi) = (0isize, 0isize);
        for (n, s) in shape.iter().zip(strides) {
            let reach = s * (*n as isize - 1);
            if reach < 0 {
                lo += reach
            } else {
                hi += reach
            }
        }
        Some((lo, hi))
    }
}

/// One layer of a paged cache, written in place.
pub struct PagedCache<'a, T> {
    ptr: *mut T,
    layout: PagedLayout,
    _marker: std::marker::PhantomData<&'a mut T>,
}

unsafe impl<T: Send> Send for PagedCache<'_, T> {}
unsafe impl<T: Sync> Sync for PagedCache<'_, T> {}

impl<T> PagedCache<'_, T> {
    /// Address of key element (block 0, slot 0, head 0, dim 0) (for the CUDA backend).
    pub(crate) fn ptr(&self) -> *mut T {
        self.ptr
    }

    /// Byte range `[lo, hi)` the layer's keys and values occupy, `None` when it is empty.
    pub(crate) fn address_range(&self) -> Option<(usize, usize)> {
        let (lo, hi) = self.layout.offset_range()?;
        let elem = std::mem::size_of::<T>() as isize;
        let base = self.ptr as usize;
        Some((
            base.wrapping_add_signed(lo.wrapping_mul(elem)),
            base.wrapping_add_signed(hi.wrapping_mul(elem).wrapping_add(elem)),
        ))
    }
}

impl<'a, T: Float> PagedCache<'a, T> {
    /// The cache in `data`, its element (block 0, slot 0, head 0, dim 0) of the keys at `offset`.
    pub fn new(data: &'a mut [T], offset: usize, layout: PagedLayout, name: &str) -> Result<Self> {
        if let Some((lo, hi)) = layout.offset_range() {
            let offset = offset as isize;
            if offset + lo < 0 || offset + hi >= data.len() as isize {
                return Err(value_err!(
                    "{name}: its layout reaches outside a buffer of {} elements",
                    data.len()
                ));
            }
        }
        let ptr = unsafe { data.as_mut_ptr().add(offset.min(data.len())) };
        unsafe { Self::from_raw(ptr, layout, name) }
    }

    /// # Safety
    /// Every element the layout addresses from `ptr` must be valid for reads and writes for `'a`
    /// and untouched by anything else meanwhile.
    pub unsafe fn from_raw(ptr: *mut T, layout: PagedLayout, name: &str) -> Result<Self> {
        let (shape, strides) = layout.shape5();
        if !is_non_overlapping(&shape, &strides) {
            return Err(value_err!(
                "{name}: its strides make keys and values (or two entries) share elements; in-place writes need every element stored once"
            ));
        }
        Ok(Self {
            ptr,
            layout,
            _marker: std::marker::PhantomData,
        })
    }

    pub fn layout(&self) -> PagedLayout {
        self.layout
    }
}

/// For every layer: reads the entries at `src_slots[i]` (keys and values, all heads), rotates
/// the keys by `deltas[i]`, writes them to `dst_slots[i]`. Pairs with a negative slot are
/// skipped. Every source is read before any destination of the layer is written, so sources and
/// destinations may overlap. Returns the number of entries moved per layer.
pub fn paged_reinject<T: Float>(
    caches: &mut [PagedCache<'_, T>],
    src_slots: &[i64],
    dst_slots: &[i64],
    deltas: Deltas<'_>,
    rope: &Rope,
) -> Result<usize> {
    let (entries, dst_seen) = check_paged(
        caches,
        src_slots,
        dst_slots,
        &KernelDeltas::Host(deltas),
        rope,
    )?;
    let config = rope.config();
    let first = caches[0].layout;
    if entries.is_empty() || first.kv_heads == 0 {
        return Ok(entries.len());
    }
    paged_moves(
        caches,
        &entries,
        &dst_seen,
        deltas,
        rope,
        config.interleaved,
    )
}

/// The checks of [`paged_reinject`] (nothing is touched): the entries that move, as
/// (source slot, destination slot, index in the request), pairs with a negative slot left out,
/// and which entry writes each destination slot. Shared with the CUDA backend.
pub(crate) fn check_paged<T>(
    caches: &[PagedCache<'_, T>],
    src_slots: &[i64],
    dst_slots: &[i64],
    deltas: &KernelDeltas<'_>,
    rope: &Rope,
) -> Result<(Vec<(usize, usize, usize)>, SlotIndex)> {
    let config = rope.config();
    let Some(first) = caches.first().map(|c| c.layout) else {
        return Err(value_err!(
            "kv_caches is empty: pass one cache tensor per layer"
        ));
    };
    for (i, cache) in caches.iter().enumerate() {
        let l = cache.layout;
        if l.head_dim != config.head_dim {
            return Err(value_err!(
                "kv_caches[{i}] has head_dim {}, expected head_dim = {}",
                l.head_dim,
                config.head_dim
            ));
        }
        if (l.num_blocks, l.block_size, l.kv_heads)
            != (first.num_blocks, first.block_size, first.kv_heads)
        {
            return Err(value_err!(
                "kv_caches[{i}] has (num_blocks, block_size, kv_heads) = ({}, {}, {}) but kv_caches[0] has ({}, {}, {}): every layer must match",
                l.num_blocks, l.block_size, l.kv_heads, first.num_blocks, first.block_size, first.kv_heads
            ));
        }
    }
    if caches.len() > 1 {
        // Layers are written from different threads: one tensor given for two layers (or two
        // views sharing elements) would race. vLLM's own layer views of one buffer interleave
        // (blocks outermost), so memory ranges may meet without any element being shared.
        check_layers_disjoint(caches)?;
    }
    if src_slots.len() != dst_slots.len() {
        return Err(value_err!(
            "src_slots has {} entries but dst_slots has {}: one source per destination",
            src_slots.len(),
            dst_slots.len()
        ));
    }
    deltas.check(src_slots.len(), config, "src_slots")?;
    let num_slots = first.num_slots();
    let mut dst_seen = SlotIndex::new(num_slots, src_slots.len());
    // (source slot, destination slot, entry index)
    let mut entries: Vec<(usize, usize, usize)> = Vec::with_capacity(src_slots.len());
    for (i, (&s, &d)) in src_slots.iter().zip(dst_slots).enumerate() {
        if s < 0 || d < 0 {
            continue;
        }
        if s as u64 >= num_slots as u64 {
            return Err(index_err!(
                "src_slots[{i}] = {s}: out of range for {} blocks x {} slots = {num_slots} slots",
                first.num_blocks,
                first.block_size
            ));
        }
        if d as u64 >= num_slots as u64 {
            return Err(index_err!(
                "dst_slots[{i}] = {d}: out of range for {} blocks x {} slots = {num_slots} slots",
                first.num_blocks,
                first.block_size
            ));
        }
        if let Some(earlier) = dst_seen.insert(d as usize, entries.len()) {
            return Err(value_err!(
                "dst_slots[{i}] = {d} repeats dst_slots[{}]: a destination slot may be written only once",
                entries[earlier].2
            ));
        }
        entries.push((s as usize, d as usize, i));
    }
    Ok((entries, dst_seen))
}

/// No element is shared by two layers: layers whose memory ranges meet must be views with
/// the same strides whose element sets interleave (the combined view, with a layer axis of
/// the pointer difference, stores every element once).
fn check_layers_disjoint<T>(caches: &[PagedCache<'_, T>]) -> Result<()> {
    let elem = std::mem::size_of::<T>() as isize;
    let ranges: Vec<Option<(usize, usize)>> = caches.iter().map(|c| c.address_range()).collect();
    let mut order: Vec<usize> = (0..caches.len()).filter(|&i| ranges[i].is_some()).collect();
    order.sort_unstable_by_key(|&i| ranges[i].map(|r| r.0));
    for (k, &i) in order.iter().enumerate() {
        let (_, end_i) = ranges[i].expect("filtered");
        for &j in &order[k + 1..] {
            let (start_j, _) = ranges[j].expect("filtered");
            if start_j >= end_i {
                break; // sorted by start: no later range meets range i
            }
            let (a, b) = (i.min(j), i.max(j));
            let (shape, strides) = caches[a].layout.shape5();
            let (_, strides_b) = caches[b].layout.shape5();
            let diff = (caches[b].ptr as isize).wrapping_sub(caches[a].ptr as isize);
            let interleaved = strides == strides_b
                && caches[a].layout.shape5().0 == caches[b].layout.shape5().0
                && diff % elem == 0
                && {
                    let mut shape6 = shape.to_vec();
                    let mut strides6 = strides.to_vec();
                    shape6.push(2);
                    strides6.push(diff / elem);
                    is_non_overlapping(&shape6, &strides6)
                };
            if !interleaved {
                return Err(value_err!(
                    "kv_caches[{a}] and kv_caches[{b}] share memory: every layer must be a separate \
                     tensor (or a view of its own elements); pass copies"
                ));
            }
        }
    }
    Ok(())
}

fn paged_moves<T: Float>(
    caches: &mut [PagedCache<'_, T>],
    entries: &[(usize, usize, usize)],
    dst_seen: &SlotIndex,
    deltas: Deltas<'_>,
    rope: &Rope,
    interleaved: bool,
) -> Result<usize> {
    let first = caches[0].layout;
    let plan = Plan::new(entries, dst_seen);
    let table = rope.table(deltas, entries.iter().map(|e| e.2 + 1).max().unwrap_or(0));
    let (heads, dim) = (first.kv_heads, first.head_dim);
    let min_entries = (64 / heads).max(1);
    let mut buffer: Vec<T> = Vec::new();
    // Layers one after another: views of one vLLM buffer may interleave in memory, so two
    // layers are never written at the same time.
    for cache in caches.iter_mut() {
        let l = cache.layout;
        let base = SendPtr(cache.ptr);
        let row = move |slot: usize, head: usize, value: bool| -> Row<T> {
            let (block, offset) = (slot / l.block_size, slot % l.block_size);
            let off = block as isize * l.block_stride
                + offset as isize * l.slot_stride
                + head as isize * l.head_stride
                + if value { l.value_offset } else { 0 };
            // SAFETY (of the offset): slot and head are in range, checked above.
            Row {
                ptr: unsafe { base.get().offset(off) },
                len: dim,
                stride: l.dim_stride,
            }
        };
        // Straight across, wave after wave: an entry runs in a later wave than every entry that
        // reads its destination, so every source is read before it is overwritten.
        for wave in &plan.waves {
            wave.par_iter()
                .with_min_len(min_entries)
                .for_each_init(Vec::new, |scratch, &e| {
                    let (s, d, i) = entries[e];
                    let (cos, sin, identity) = table.row(i);
                    for h in 0..heads {
                        // SAFETY: destinations are distinct slots of a non-overlapping view; no entry
                        // of this wave writes a row another entry of the wave reads (see `Plan`).
                        unsafe {
                            if s == d {
                                if !identity {
                                    rotate_row(row(d, h, false), cos, sin, interleaved, scratch);
                                }
                                continue;
                            }
                            if identity {
                                copy_row(row(s, h, false), row(d, h, false));
                            } else {
                                rotate_row_into(
                                    row(s, h, false),
                                    row(d, h, false),
                                    cos,
                                    sin,
                                    interleaved,
                                    scratch,
                                );
                            }
                            copy_row(row(s, h, true), row(d, h, true));
                        }
                    }
                });
        }
        if plan.staged.is_empty() {
            continue;
        }
        // Entries on cycles (e.g. two entries swapping slots): gather all, then scatter.
        let staged_entries = &plan.staged;
        buffer.clear();
        buffer.resize(staged_entries.len() * heads * 2 * dim, T::from_f32(0.0));
        let staged = SendPtr(buffer.as_mut_ptr());
        let stage = move |k: usize, h: usize, value: bool| -> Row<T> {
            let off = ((k * heads + h) * 2 + value as usize) * dim;
            // SAFETY (of the offset): inside the buffer.
            Row {
                ptr: unsafe { staged.get().add(off) },
                len: dim,
                stride: 1,
            }
        };
        staged_entries
            .par_iter()
            .enumerate()
            .with_min_len(min_entries)
            .for_each_init(Vec::new, |scratch, (k, &e)| {
                let (s, _, i) = entries[e];
                let (cos, sin, identity) = table.row(i);
                for h in 0..heads {
                    // SAFETY: the cache is only read in this phase; each buffer row has one writer.
                    unsafe {
                        if identity {
                            copy_row(row(s, h, false), stage(k, h, false));
                        } else {
                            rotate_row_into(
                                row(s, h, false),
                                stage(k, h, false),
                                cos,
                                sin,
                                interleaved,
                                scratch,
                            );
                        }
                        copy_row(row(s, h, true), stage(k, h, true));
                    }
                }
            });
        staged_entries
            .par_iter()
            .enumerate()
            .with_min_len(min_entries)
            .for_each(|(k, &e)| {
                let d = entries[e].1;
                for h in 0..heads {
                    // SAFETY: destinations are distinct slots; the buffer is only read here.
                    unsafe {
                        copy_row(stage(k, h, false), row(d, h, false));
                        copy_row(stage(k, h, true), row(d, h, true));
                    }
                }
            });
    }
    Ok(entries.len())
}

/// At most this many waves of direct moves; a longer chain (e.g. a shift by one slot) is
/// staged through a buffer instead, which costs one extra copy but stays parallel.
const MAX_WAVES: usize = 32;

/// The order of the moves. Entry `e` reads slot `src(e)`, which entry `writer(src(e))` (if any)
/// overwrites: `e` must read first. These edges form a functional graph; Kahn's algorithm peels
/// it into waves (entries nobody waits on first), and what remains lies on cycles, which are
/// gathered into a buffer and scattered last (their sources are written only by each other).
struct Plan {
    waves: Vec<Vec<usize>>,
    staged: Vec<usize>,
}

impl Plan {
    fn new(entries: &[(usize, usize, usize)], dst_index: &SlotIndex) -> Self {
        let m = entries.len();
        // The entry that overwrites e's source, and per entry how many readers it waits for.
        let mut overwriter = vec![usize::MAX; m];
        let mut waiting = vec![0u32; m];
        for (e, &(s, _, _)) in entries.iter().enumerate() {
            if let Some(f) = dst_index.get(s) {
                if f != e {
                    overwriter[e] = f;
                    waiting[f] += 1;
                }
            }
        }
        if overwriter.iter().all(|&f| f == usize::MAX) {
            return Plan {
                waves: vec![(0..m).collect()],
                staged: Vec::new(),
            };
        }
        let mut waves = Vec::new();
        let mut current: Vec<usize> = (0..m).filter(|&f| waiting[f] == 0).collect();
        while !current.is_empty() {
            if waves.len() == MAX_WAVES {
                return Plan {
                    waves: Vec::new(),
                    staged: (0..m).collect(),
                };
            }
            let mut next = Vec::new();
            for &e in &current {
                let f = overwriter[e];
                if f != usize::MAX {
                    waiting[f] -= 1;
                    if waiting[f] == 0 {
                        next.push(f);
                    }
                }
            }
            waves.push(std::mem::replace(&mut current, next));
        }
        let staged = (0..m).filter(|&f| waiting[f] > 0).collect();
        Plan { waves, staged }
    }
}

/// Which entry writes each destination slot: a dense array when the cache is not much larger
/// than the request, a hash map otherwise (a vLLM cache can hold millions of slots).
pub(crate) enum SlotIndex {
    Dense(Vec<usize>),
    Sparse(std::collections::HashMap<usize, usize>),
}

impl SlotIndex {
    fn new(num_slots: usize, entries: usize) -> Self {
        if num_slots <= 64 * entries + 4096 {
            SlotIndex::Dense(vec![usize::MAX; num_slots])
        } else {
            SlotIndex::Sparse(std::collections::HashMap::with_capacity(entries))
        }
    }

    /// Records `entry` at `slot`; returns the entry already there, if any.
    fn insert(&mut self, slot: usize, entry: usize) -> Option<usize> {
        match self {
            SlotIndex::Dense(v) if v[slot] != usize::MAX => Some(v[slot]),
            SlotIndex::Dense(v) => {
                v[slot] = entry;
                None
            }
            SlotIndex::Sparse(m) => match m.entry(slot) {
                std::collections::hash_map::Entry::Occupied(o) => Some(*o.get()),
                std::collections::hash_map::Entry::Vacant(v) => {
                    v.insert(entry);
                    None
                }
            },
        }
    }

    /// The entry writing `slot`, if any.
    pub(crate) fn get(&self, slot: usize) -> Option<usize> {
        match self {
            SlotIndex::Dense(v) => Some(v[slot]).filter(|&e| e != usize::MAX),
            SlotIndex::Sparse(m) => m.get(&slot).copied(),
        }
    }
}
