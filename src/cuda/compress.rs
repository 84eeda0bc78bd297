//! Visual-token compression on a GPU: the launchers of `kernels/compress.cu`.
//!
//! Inputs and outputs are [`TensorView`]s of device memory (outputs allocated by the caller).
//! Every argument is checked by [`crate::compress`]'s operations, which call these after the
//! checks they share with the CPU path; the launchers only make sure of their outputs' shapes. Everything runs on the
//! caller's stream without waiting for the GPU, except mass selection, whose output size depends
//! on the data: [`select_mass`] copies a 32-byte header (the count, or the first bad score) back to
//! the host, one synchronisation of the stream.

use super::args::compress::*;
use super::driver::{device, Stream};
use super::sources::KernelFile;
use crate::compress::cpu::select_tokens;
use crate::compress::{pool_shape, Budget, Grid, Rule};
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::tensor::{tuple_str, Device, TensorView};
use crate::value_err;

fn ordinal(view: &TensorView<'_>) -> Result<i32> {
    match view.device() {
        Device::Cuda(id) => Ok(id),
        other => Err(value_err!(
            "{}: expected a CUDA tensor, got one on {other}",
            view.name()
        )),
    }
}

fn dtype_code(dtype: DType) -> i32 {
    match dtype {
        DType::F32 => 0,
        DType::F16 => 1,
        _ => 2,
    }
}

fn tag(dtype: DType) -> &'static str {
    match dtype {
        DType::F32 => "f32",
        DType::F16 => "f16",
        _ => "bf16",
    }
}

fn ptr(view: &TensorView<'_>) -> u64 {
    view.data_ptr() as u64
}

/// How kernels read the rows of a 2-D view `[rows, dim]` and write a row-major output: with
/// packed 16-byte accesses (`w` elements at a time, the `_v` kernels) when sizes, strides and
/// both pointers allow it, else one element at a time (`_s`).
fn row_access(x: &TensorView<'_>, out_ptr: u64) -> (usize, &'static str) {
    if rows_packed(x, out_ptr) {
        (16 / x.dtype().size_bytes(), "v")
    } else {
        (1, "s")
    }
}

/// Packed (16-byte) access to rows of a 2-D view `[rows, dim]` and a row-major output.
fn rows_packed(x: &TensorView<'_>, out_ptr: u64) -> bool {
    let w = (16 / x.dtype().size_bytes()) as isize;
    let (dim, strides) = (x.dim(1) as isize, x.strides());
    (strides[1] == 1 || dim <= 1)
        && dim % w == 0
        && strides[0].rem_euclid(w) == 0
        && ptr(x) % 16 == 0
        && out_ptr % 16 == 0
}

fn expect_output(out: &TensorView<'_>, dtype: DType, shape: &[usize], device: i32) -> Result<()> {
    if out.dtype() != dtype
        || out.shape() != shape
        || !out.is_contiguous()
        || out.device() != Device::Cuda(device)
    {
        return Err(Error::Runtime(format!(
            "internal error: output {} is {} {} on {}, expected a contiguous {dtype} {} on cuda:{device}",
            out.name(),
            out.dtype(),
            out.shape_str(),
            out.device(),
            tuple_str(shape)
        )));
    }
    Ok(())
}

/// Average-pools `x` `[tokens, dim]` (checked grids) into `out` `[pool_shape().0, dim]`.
pub fn pool_visual_tokens(
    stream: Stream,
    x: &TensorView<'_>,
    grids: &[Grid],
    kh: usize,
    kw: usize,
    out: &TensorView<'_>,
) -> Result<()> {
    let ordinal = ordinal(x)?;
    let (count, new) = pool_shape(grids, kh, kw);
    let dim = x.dim(1);
    expect_output(out, x.dtype(), &[count, dim], ordinal)?;
    if count == 0 || dim == 0 {
        return Ok(());
    }
    let dev = device(ordinal)?;
    let (w, variant) = row_access(x, ptr(out));
    let f = dev.function(
        KernelFile::Compress,
        &format!("pool_{}_{variant}", tag(x.dtype())),
    )?;
    let (mut in_start, mut out_start) = (0i64, 0i64);
    for (chunk, pooled) in grids.chunks(MAX_GRIDS).zip(new.chunks(MAX_GRIDS)) {
        let mut args = PoolArgs {
            x: ptr(x),
            out: ptr(out),
            row_stride: x.strides()[0] as i64,
            col_stride: x.strides()[1] as i64,
            dim: dim as i64,
            in_start: [0; MAX_GRIDS],
            out_start: [0; MAX_GRIDS + 1],
            t: [0; MAX_GRIDS],
            h: [0; MAX_GRIDS],
            w: [0; MAX_GRIDS],
            num_grids: chunk.len() as i32,
            kh: kh as i32,
            kw: kw as i32,
            pad: 0,
        };
        let first_out = out_start;
        for (i, (g, p)) in chunk.iter().zip(pooled).enumerate() {
            args.in_start[i] = in_start;
            args.out_start[i] = out_start;
            (args.t[i], args.h[i], args.w[i]) = (g.t as i32, g.h as i32, g.w as i32);
            in_start += g.tokens() as i64;
            out_start += p.tokens() as i64;
        }
        args.out_start[chunk.len()] = out_start;
        let packs = dim.div_ceil(w);
        let grid = (
            (out_start - first_out) as u32,
            packs.div_ceil(128) as u32,
            1,
        );
        // SAFETY: the views are live device memory of this device; shapes checked.
        unsafe { dev.launch(f, grid, 128, 0, stream, &args)? };
    }
    Ok(())
}

/// Scores of the keys into `out` (`[k_tokens]` float32), with `workspace` (`[q_tokens *
/// q_heads]` float32: each attention row's log-sum-exp when `lse` is not given).
pub fn visual_token_scores(
    stream: Stream,
    query: &TensorView<'_>,
    keys: &TensorView<'_>,
    lse: Option<&TensorView<'_>>,
    scale: f32,
    out: &TensorView<'_>,
    workspace: &TensorView<'_>,
) -> Result<()> {
    let ordinal = ordinal(query)?;
    let k_tokens = keys.dim(0);
    expect_output(out, DType::F32, &[k_tokens], ordinal)?;
    expect_output(
        workspace,
        DType::F32,
        &[query.dim(0) * query.dim(1)],
        ordinal,
    )?;
    if k_tokens == 0 {
        return Ok(());
    }
    let dev = device(ordinal)?;
    let rows = query.dim(0) * query.dim(1);
    let s3 = |v: &TensorView<'_>| {
        [
            v.strides()[0] as i64,
            v.strides()[1] as i64,
            v.strides()[2] as i64,
        ]
    };
    let args = ScoresArgs {
        query: ptr(query),
        keys: ptr(keys),
        lse: lse.map_or(0, ptr),
        row_lse: ptr(workspace),
        out: ptr(out),
        query_strides: s3(query),
        key_strides: s3(keys),
        lse_strides: lse.map_or([0, 0], |l| [l.strides()[0] as i64, l.strides()[1] as i64]),
        q_tokens: query.dim(0) as i64,
        k_tokens: k_tokens as i64,
        q_heads: query.dim(1) as i32,
        kv_heads: keys.dim(1) as i32,
        head_dim: query.dim(2) as i32,
        lse_dtype: lse.map_or(0, |l| dtype_code(l.dtype())),
        scale,
        pad: 0,
    };
    let t = tag(query.dtype());
    // SAFETY: live device views, shapes checked; the workspace holds one float per row.
    unsafe {
        if lse.is_none() {
            let f = dev.function(KernelFile::Compress, &format!("scores_rows_{t}"))?;
            dev.launch(f, (rows as u32, 1, 1), 256, 0, stream, &args)?;
        }
        let f = dev.function(KernelFile::Compress, &format!("scores_keys_{t}"))?;
        dev.launch(
            f,
            (k_tokens.div_ceil(8) as u32, 1, 1),
            256,
            0,
            stream,
            &args,
        )?;
    }
    Ok(())
}

/// The `count` highest scores' indices, increasing, into `out` (int64 device memory of `count`
/// entries at `out_ptr`). No NaN check (it would need a copy to the host): NaN ranks lowest.
pub fn select_topk(
    stream: Stream,
    scores: &TensorView<'_>,
    count: usize,
    out_ptr: u64,
) -> Result<()> {
    let n = scores.dim(0);
    if count == 0 || n == 0 {
        return Ok(());
    }
    let dev = device(ordinal(scores)?)?;
    let args = SelectArgs {
        scores: ptr(scores),
        out: out_ptr,
        n: n as i64,
        stride: scores.strides()[0] as i64,
        count: count as i64,
        dtype: dtype_code(scores.dtype()),
        pad: 0,
    };
    let f = dev.function(KernelFile::Compress, "select_topk")?;
    // SAFETY: live device views; `out` holds count indices.
    unsafe { dev.launch(f, (1, 1, 1), 1024, 0, stream, &args) }
}

/// int64 words of workspace [`select_mass`] needs for `n` scores: the indices and a header.
pub fn mass_workspace_len(n: usize) -> usize {
    n + 4
}

/// Mass ("dynamic") selection (`budget`'s rule is [`Rule::Mass`]) into `workspace`
/// (`mass_workspace_len(n)` int64 at `ws_ptr`):
/// returns the count; the sorted indices are `workspace[..count]`. Waits for the GPU once (the
/// count decides the output size). Scores that fit in shared memory are sorted and summed on the
/// GPU (in f64, in the CPU path's order, so the count is the same); larger inputs are copied to
/// the host and selected there.
///
/// # Safety
/// `ws_ptr` must be device memory of `mass_workspace_len(n)` int64 words on the scores' device.
pub unsafe fn select_mass(
    stream: Stream,
    scores: &TensorView<'_>,
    budget: Budget,
    ws_ptr: u64,
) -> Result<usize> {
    let n = scores.dim(0);
    let Rule::Mass(mass) = budget.rule() else {
        return Err(Error::Runtime(format!(
            "internal error: mass selection with {budget:?}"
        )));
    };
    let (min_keep, max_keep) = (budget.min_keep(), budget.max_keep());
    let dev = device(ordinal(scores)?)?;
    let pow2 = n.next_power_of_two().max(1);
    if n > 0 && pow2 * 8 <= dev.max_shared_optin.max(0) as usize && n < (1 << 30) {
        let args = MassArgs {
            scores: ptr(scores),
            out: ws_ptr,
            header: ws_ptr + 8 * n as u64,
            n: n as i64,
            stride: scores.strides()[0] as i64,
            mass,
            min_keep: min_keep as i64,
            max_keep: max_keep.map_or(-1, |m| m as i64),
            dtype: dtype_code(scores.dtype()),
            pow2: pow2 as i32,
        };
        let f = dev.function(KernelFile::Compress, "select_mass")?;
        dev.launch(f, (1, 1, 1), 1024, (pow2 * 8) as u32, stream, &args)?;
        let mut header = [0u8; 32];
        dev.copy_to_host(&mut header, ws_ptr + 8 * n as u64, stream)?;
        let word =
            |i: usize| i64::from_ne_bytes(header[8 * i..8 * i + 8].try_into().expect("8 bytes"));
        if word(0) >= 0 {
            return Ok(word(0) as usize);
        }
        if word(1) >= 0 {
            return Err(value_err!(
                "scores[{}] is NaN: scores must not contain NaN",
                word(1)
            ));
        }
        let value = f32::from_bits(word(3) as u32);
        return Err(value_err!(
            "scores[{}] = {value}: mass selection needs finite, non-negative scores",
            word(2)
        ));
    }
    // Too many scores for one block's shared memory: select on the host.
    let values = read_scores(&dev, stream, scores)?;
    let kept = select_tokens(&values, budget)?;
    let kept: Vec<i64> = kept.into_iter().map(|i| i as i64).collect();
    let bytes: Vec<u8> = kept.iter().flat_map(|v| v.to_ne_bytes()).collect();
    dev.copy_to_device(ws_ptr, &bytes, stream)?;
    Ok(kept.len())
}

/// The scores as f32 on the host (a synchronising copy).
fn read_scores(
    dev: &super::driver::Device,
    stream: Stream,
    scores: &TensorView<'_>,
) -> Result<Vec<f32>> {
    let n = scores.dim(0);
    if n == 0 {
        return Ok(Vec::new());
    }
    let stride = scores.strides()[0];
    let size = scores.dtype().size_bytes();
    // The whole span from the lowest to the highest element (strides may be negative).
    let (low, high) = if stride >= 0 {
        (0, stride * (n as isize - 1))
    } else {
        (stride * (n as isize - 1), 0)
    };
    let mut raw = vec![0u8; (high - low + 1) as usize * size];
    let start = (ptr(scores) as i64 + low as i64 * size as i64) as u64;
    // SAFETY: the span lies inside the view's memory.
    unsafe { dev.copy_to_host(&mut raw, start, stream)? };
    Ok((0..n as isize)
        .map(|i| {
            let at = ((i * stride - low) as usize) * size;
            let b = &raw[at..at + size];
            match scores.dtype() {
                DType::F32 => f32::from_ne_bytes(b.try_into().expect("4 bytes")),
                DType::F16 => {
                    half::f16::from_bits(u16::from_ne_bytes(b.try_into().expect("2 bytes")))
                        .to_f32()
                }
                _ => half::bf16::from_bits(u16::from_ne_bytes(b.try_into().expect("2 bytes")))
                    .to_f32(),
            }
        })
        .collect())
}

/// Reads `count` int64 indices from device memory (a synchronising copy), e.g. to check indices
/// given as a CUDA tensor.
///
/// # Safety
/// `src` must be device memory of the device `ordinal` holding `count` int64 values.
pub unsafe fn read_indices(
    ordinal: i32,
    stream: Stream,
    src: u64,
    count: usize,
) -> Result<Vec<i64>> {
    let dev = device(ordinal)?;
    let mut raw = vec![0u8; 8 * count];
    dev.copy_to_host(&mut raw, src, stream)?;
    Ok(raw
        .chunks_exact(8)
        .map(|b| i64::from_ne_bytes(b.try_into().expect("8 bytes")))
        .collect())
}

/// Copies host int64 values to device memory at `dst` on `stream`.
///
/// # Safety
/// `dst` must be device memory of `ordinal` with room for `values`.
pub unsafe fn write_indices(ordinal: i32, stream: Stream, dst: u64, values: &[i64]) -> Result<()> {
    let dev = device(ordinal)?;
    let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_ne_bytes()).collect();
    dev.copy_to_device(dst, &bytes, stream)
}

/// Rows `indices` (int64 device memory, `count` of them, checked) of `x` into `out` `[count, dim]`.
pub fn gather(
    stream: Stream,
    x: &TensorView<'_>,
    indices: u64,
    count: usize,
    out: &TensorView<'_>,
) -> Result<()> {
    let ordinal = ordinal(x)?;
    let dim = x.dim(1);
    expect_output(out, x.dtype(), &[count, dim], ordinal)?;
    if count == 0 || dim == 0 {
        return Ok(());
    }
    let dev = device(ordinal)?;
    let (w, variant) = row_access(x, ptr(out));
    let args = GatherArgs {
        x: ptr(x),
        out: ptr(out),
        indices,
        count: count as i64,
        dim: dim as i64,
        row_stride: x.strides()[0] as i64,
        col_stride: x.strides()[1] as i64,
    };
    let f = dev.function(
        KernelFile::Compress,
        &format!("gather_{}_{variant}", tag(x.dtype())),
    )?;
    // SAFETY: live device views; indices checked in range.
    unsafe {
        dev.launch(
            f,
            (count as u32, dim.div_ceil(w).div_ceil(128) as u32, 1),
            128,
            0,
            stream,
            &args,
        )
    }
}

/// Each index's (t, h, w) cell within its own grid into `out` (`[count, 3]` int64).
pub fn token_cells(
    stream: Stream,
    ordinal: i32,
    indices: u64,
    count: usize,
    grids: &[Grid],
    out: &TensorView<'_>,
) -> Result<()> {
    expect_output(out, DType::I64, &[count, 3], ordinal)?;
    if count == 0 {
        return Ok(());
    }
    let dev = device(ordinal)?;
    let f = dev.function(KernelFile::Compress, "token_cells")?;
    let mut start = 0i64;
    for chunk in grids.chunks(MAX_GRIDS) {
        let mut args = CellsArgs {
            indices,
            out: ptr(out),
            count: count as i64,
            in_start: [0; MAX_GRIDS + 1],
            t: [0; MAX_GRIDS],
            h: [0; MAX_GRIDS],
            w: [0; MAX_GRIDS],
            num_grids: chunk.len() as i32,
            pad: 0,
        };
        for (i, g) in chunk.iter().enumerate() {
            args.in_start[i] = start;
            (args.t[i], args.h[i], args.w[i]) = (g.t as i32, g.h as i32, g.w as i32);
            start += g.tokens() as i64;
        }
        args.in_start[chunk.len()] = start;
        // SAFETY: live device memory; indices checked in range.
        unsafe { dev.launch(f, (count.div_ceil(256) as u32, 1, 1), 256, 0, stream, &args)? };
    }
    Ok(())
}

/// int64 words of workspace [`merge`] needs: the dropped indices, the kept rows' inverse norms
/// (f32) and each dropped row's target (i32).
pub fn merge_workspace_len(tokens: usize, kept: usize) -> usize {
    let dropped = tokens - kept;
    dropped + kept.div_ceil(2) + dropped.div_ceil(2)
}

/// ToMe-style merge of the dropped rows of `x` into the most similar kept rows (indices at
/// `kept`, int64 device memory, `n_kept` of them, sorted), into `out` `[n_kept, dim]`.
///
/// # Safety
/// `kept` and `ws` must be device memory of the device of `x` (`n_kept` int64 and
/// `merge_workspace_len` int64 words).
pub unsafe fn merge(
    stream: Stream,
    x: &TensorView<'_>,
    kept: u64,
    n_kept: usize,
    ws: u64,
    out: &TensorView<'_>,
) -> Result<()> {
    let ordinal = ordinal(x)?;
    let (tokens, dim) = (x.dim(0), x.dim(1));
    expect_output(out, x.dtype(), &[n_kept, dim], ordinal)?;
    if n_kept == 0 || dim == 0 {
        return Ok(());
    }
    if n_kept == tokens {
        return gather(stream, x, kept, n_kept, out);
    }
    let dev = device(ordinal)?;
    let n_dropped = tokens - n_kept;
    let dropped = ws;
    let inv_norms = ws + 8 * n_dropped as u64;
    let target = inv_norms + 8 * n_kept.div_ceil(2) as u64;
    let (rs, cs) = (x.strides()[0] as i64, x.strides()[1] as i64);
    let t = tag(x.dtype());
    let f = dev.function(KernelFile::Compress, "complement")?;
    dev.launch(
        f,
        (1, 1, 1),
        1024,
        0,
        stream,
        &ComplementArgs {
            kept,
            dropped,
            n: tokens as i64,
            count: n_kept as i64,
        },
    )?;
    let f = dev.function(KernelFile::Compress, &format!("inv_norms_{t}"))?;
    let norms = NormArgs {
        x: ptr(x),
        out: inv_norms,
        rows: kept,
        count: n_kept as i64,
        dim: dim as i64,
        row_stride: rs,
        col_stride: cs,
    };
    dev.launch(f, (n_kept.div_ceil(8) as u32, 1, 1), 256, 0, stream, &norms)?;
    let f = dev.function(KernelFile::Compress, &format!("similarity_{t}"))?;
    let sim = SimilarityArgs {
        x: ptr(x),
        kept,
        dropped,
        inv_norms,
        target,
        n_kept: n_kept as i64,
        n_dropped: n_dropped as i64,
        dim: dim as i64,
        row_stride: rs,
        col_stride: cs,
    };
    dev.launch(
        f,
        (n_dropped.div_ceil(32) as u32, 1, 1),
        256,
        0,
        stream,
        &sim,
    )?;
    let (w, variant) = row_access(x, ptr(out));
    let f = dev.function(KernelFile::Compress, &format!("merge_{t}_{variant}"))?;
    let args = MergeArgs {
        x: ptr(x),
        out: ptr(out),
        kept,
        dropped,
        target,
        n_kept: n_kept as i64,
        n_dropped: n_dropped as i64,
        dim: dim as i64,
        row_stride: rs,
        col_stride: cs,
    };
    dev.launch(
        f,
        (n_kept as u32, dim.div_ceil(w).div_ceil(128) as u32, 1),
        128,
        0,
        stream,
        &args,
    )
}
