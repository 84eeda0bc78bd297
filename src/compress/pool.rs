//! kh x kw average pooling of visual tokens within each frame of their (t, h, w) grids.

use std::mem::MaybeUninit;

use crate::compress::grid::{check_grid_list, Grid};
use crate::compress::kernels::{mean_of_rows, par_rows_init};
use crate::dtype::Float;
use crate::error::Result;
use crate::tensor::Strided;
use crate::value_err;

/// The grid after pooling: `t` x `ceil(h / kh)` x `ceil(w / kw)`.
pub fn pooled_grid(grid: Grid, kh: usize, kw: usize) -> Grid {
    Grid::new(grid.t, grid.h.div_ceil(kh), grid.w.div_ceil(kw))
}

/// The checks of [`pool_visual_tokens`] (shared by the CPU and CUDA paths): `x` is
/// `[tokens, dim]`, the factors >= 1, the grids hold `tokens`. Returns the factors clamped to
/// the largest grid side.
pub(crate) fn check_pool(
    x: &[usize],
    grids: &[Grid],
    kh: usize,
    kw: usize,
) -> Result<(usize, usize)> {
    if x.len() != 2 {
        return Err(value_err!(
            "x: expected a 2-D tensor [tokens, dim], got {} dimensions",
            x.len()
        ));
    }
    if kh == 0 || kw == 0 {
        return Err(value_err!(
            "factor: every pooling factor must be >= 1, got ({kh}, {kw})"
        ));
    }
    let tokens = x[0];
    check_grid_list(grids, tokens, &format!("x has {tokens} rows"))?;
    // A factor beyond the largest grid side pools the same as that side: clamp it, so that no
    // size below is computed from a huge factor (`factor=2**31`).
    let kh = kh.min(grids.iter().map(|g| g.h).max().unwrap_or(1).max(1));
    let kw = kw.min(grids.iter().map(|g| g.w).max().unwrap_or(1).max(1));
    Ok((kh, kw))
}

/// The pooled tokens' count and grids (checked arguments).
pub fn pool_shape(grids: &[Grid], kh: usize, kw: usize) -> (usize, Vec<Grid>) {
    let new: Vec<Grid> = grids.iter().map(|&g| pooled_grid(g, kh, kw)).collect();
    (new.iter().map(Grid::tokens).sum(), new)
}

/// One output token: the input window it averages.
#[derive(Clone, Copy)]
struct Window {
    /// Input token of the window's top-left cell.
    start: usize,
    rows: usize,
    cols: usize,
    /// Tokens per grid row of the input (the step from one window row to the next).
    row_step: usize,
}

/// Average-pool `x` (`[tokens, dim]`, the tokens of `grids` one after the other, row-major on
/// each grid) with `kh` x `kw` windows inside each frame. Windows at the bottom and right edges
/// average only the cells they cover. Returns the pooled tokens (`[new_tokens, dim]`, row-major
/// on the new grids) and the new grids ([`pooled_grid`]).
pub fn pool_visual_tokens<T: Float>(
    x: &Strided<'_, T>,
    grids: &[Grid],
    kh: usize,
    kw: usize,
) -> Result<(Vec<T>, Vec<Grid>)> {
    let (kh, kw) = check_pool(x.shape(), grids, kh, kw)?;
    let dim = x.shape()[1];
    let mut windows = Vec::new();
    let mut new_grids = Vec::with_capacity(grids.len());
    let mut start = 0;
    for &grid in grids {
        let pooled = pooled_grid(grid, kh, kw);
        for frame in 0..grid.t {
            let frame_start = start + frame * grid.h * grid.w;
            for oh in 0..pooled.h {
                let r0 = oh * kh;
                for ow in 0..pooled.w {
                    let c0 = ow * kw;
                    windows.push(Window {
                        start: frame_start + r0 * grid.w + c0,
                        rows: kh.min(grid.h - r0),
                        cols: kw.min(grid.w - c0),
                        row_step: grid.w,
                    });
                }
            }
        }
        start += grid.tokens();
        new_grids.push(pooled);
    }

    // About 1 MiB of reads per task: less runs faster on one thread than through rayon.
    let min_rows = (1 << 20)
        / dim
            .saturating_mul(kh)
            .saturating_mul(kw)
            .saturating_mul(std::mem::size_of::<T>())
            .max(1);
    let pooled = par_rows_init(
        windows.len(),
        dim,
        min_rows,
        || {
            (
                vec![0f32; dim],
                vec![0f32; 4 * dim],
                Vec::with_capacity(kh * kw),
            )
        },
        |(acc, scratch, rows), o, out| pool_window(x, windows[o], acc, scratch, rows, out),
    );
    Ok((pooled, new_grids))
}

/// Average of one window into `out`.
fn pool_window<'a, T: Float>(
    x: &'a Strided<'_, T>,
    window: Window,
    acc: &mut [f32],
    scratch: &mut [f32],
    rows: &mut Vec<&'a [T]>,
    out: &mut [MaybeUninit<T>],
) {
    rows.clear();
    for r in 0..window.rows {
        let row_start = window.start + r * window.row_step;
        rows.extend((row_start..row_start + window.cols).map(|token| x.row(token)));
    }
    mean_of_rows(
        rows,
        1.0 / (window.rows * window.cols) as f32,
        acc,
        scratch,
        out,
    );
}
