//! Keep a subset of the visual tokens, optionally merging the dropped ones into the kept ones.

use rayon::prelude::*;

use crate::compress::grid::{check_grid_list, Grid};
use crate::compress::kernels::{
    matmul_nt, par_rows, par_rows_init, squared_norm, to_f32_slice, write_copy, write_scaled,
};
use crate::dtype::Float;
use crate::error::Result;
use crate::tensor::Strided;
use crate::{index_err, value_err};

/// Dropped tokens per similarity block: `[BLOCK, kept]` dot products at a time.
const BLOCK: usize = 32;
/// Norms below this count as this (cosine similarity of a zero vector is 0, not NaN).
const NORM_EPS: f32 = 1e-12;

/// Check user indices against `tokens` rows: in range (IndexError), strictly increasing, i.e.
/// sorted and without duplicates (ValueError); errors name `indices`.
pub fn check_indices(indices: &[i64], tokens: usize) -> Result<Vec<usize>> {
    let mut checked = Vec::with_capacity(indices.len());
    for (i, &index) in indices.iter().enumerate() {
        if index < 0 || index as u64 >= tokens as u64 {
            return Err(index_err!(
                "indices[{i}] = {index} is out of range for {tokens} tokens (the rows of x)"
            ));
        }
        if i > 0 {
            let previous = indices[i - 1];
            if index == previous {
                return Err(value_err!(
                    "indices[{i}] = {index} repeats indices[{}]: indices must be unique and sorted",
                    i - 1
                ));
            }
            if index < previous {
                return Err(value_err!(
                    "indices must be sorted in increasing order: indices[{i}] = {index} < indices[{}] = {previous}",
                    i - 1
                ));
            }
        }
        checked.push(index as usize);
    }
    Ok(checked)
}

fn check_sorted_in_range(indices: &[usize], tokens: usize) -> Result<()> {
    let as_i64: Vec<i64> = indices
        .iter()
        .map(|&i| i64::try_from(i).unwrap_or(i64::MAX))
        .collect();
    check_indices(&as_i64, tokens).map(|_| ())
}

/// The kept rows of `x` (`[tokens, dim]`) at `indices` (sorted, unique, in range), in order.
///
/// With `merge`, each dropped token is averaged into the kept token most similar to it
/// (cosine similarity; ties to the lower index), ToMe-style: every kept token starts with
/// size 1 and each token merged into it adds 1, so a kept token becomes the mean of itself and
/// the tokens merged into it. With no kept token, nothing can be merged and the result is empty.
pub fn prune_visual_tokens<T: Float>(
    x: &Strided<'_, T>,
    indices: &[usize],
    merge: bool,
) -> Result<Vec<T>> {
    if x.ndim() != 2 {
        return Err(value_err!(
            "x: expected a 2-D tensor [tokens, dim], got {} dimensions",
            x.ndim()
        ));
    }
    let (tokens, dim) = (x.shape()[0], x.shape()[1]);
    check_sorted_in_range(indices, tokens)?;
    let kept = indices.len();
    if !merge || kept == tokens || kept == 0 || dim == 0 {
        // About 1 MiB of copies per task: less runs faster on one thread than through rayon.
        let min_rows = (1 << 20) / (dim * std::mem::size_of::<T>()).max(1);
        return Ok(par_rows(kept, dim, min_rows, |i, out| {
            write_copy(out, x.row(indices[i]))
        }));
    }

    // f32 copies of the kept and dropped rows.
    let mut is_kept = vec![false; tokens];
    for &i in indices {
        is_kept[i] = true;
    }
    let dropped: Vec<usize> = (0..tokens).filter(|&i| !is_kept[i]).collect();
    let pack = |rows: &[usize]| -> Vec<f32> {
        let mut packed = vec![0f32; rows.len() * dim];
        packed
            .par_chunks_mut(dim)
            .zip(rows)
            .for_each(|(out, &row)| to_f32_slice(x.row(row), out));
        packed
    };
    let kept_rows = pack(indices);
    let dropped_rows = pack(&dropped);
    let inv_norms: Vec<f32> = kept_rows
        .par_chunks(dim)
        .map(|row| 1.0 / squared_norm(row).sqrt().max(NORM_EPS))
        .collect();

    // Most similar kept token of each dropped token: argmax over kept k of (d · k) / |k|
    // (the dropped token's own norm is a positive factor common to the row).
    let targets: Vec<usize> = dropped_rows
        .par_chunks(BLOCK * dim)
        .flat_map_iter(|rows| {
            let count = rows.len() / dim;
            let mut dots = vec![0f32; count * kept];
            matmul_nt(rows, &kept_rows, count, kept, dim, &mut dots);
            let best: Vec<usize> = dots
                .chunks_exact(kept)
                .map(|row| {
                    let mut best = (0, f32::NEG_INFINITY);
                    for (k, (&dot, &inv)) in row.iter().zip(&inv_norms).enumerate() {
                        let similarity = dot * inv;
                        // Strictly greater: ties keep the lower kept index. NaN never wins.
                        if similarity > best.1 {
                            best = (k, similarity);
                        }
                    }
                    best.0
                })
                .collect();
            best.into_iter()
        })
        .collect();

    // Members of each kept token, in token order (counting sort).
    let mut starts = vec![0usize; kept + 1];
    for &t in &targets {
        starts[t + 1] += 1;
    }
    for k in 0..kept {
        starts[k + 1] += starts[k];
    }
    let mut members = vec![0usize; dropped.len()];
    let mut next = starts.clone();
    for (j, &t) in targets.iter().enumerate() {
        members[next[t]] = j;
        next[t] += 1;
    }

    Ok(par_rows_init(
        kept,
        dim,
        1,
        || vec![0f32; dim],
        |acc, k, out| {
            acc.copy_from_slice(&kept_rows[k * dim..(k + 1) * dim]);
            let group = &members[starts[k]..starts[k + 1]];
            for &j in group {
                for (a, &v) in acc.iter_mut().zip(&dropped_rows[j * dim..(j + 1) * dim]) {
                    *a += v;
                }
            }
            write_scaled(out, acc, 1.0 / (1 + group.len()) as f32);
        },
    ))
}

/// Each index's `(t, h, w)` cell within its own grid (the grids' tokens one after the other),
/// `[indices.len()]` rows; for M-RoPE positions of a pruned image. Indices must be sorted.
pub fn token_cells(grids: &[Grid], indices: &[usize]) -> Result<Vec<[i64; 3]>> {
    let tokens: usize = grids.iter().map(Grid::tokens).sum();
    check_grid_list(grids, tokens, "")?;
    check_sorted_in_range(indices, tokens)?;
    let mut cells = Vec::with_capacity(indices.len());
    let mut grid_index = 0;
    let mut start = 0;
    for &i in indices {
        while i >= start + grids[grid_index].tokens() {
            start += grids[grid_index].tokens();
            grid_index += 1;
        }
        let grid = grids[grid_index];
        let local = i - start;
        let (t, rest) = (local / (grid.h * grid.w), local % (grid.h * grid.w));
        cells.push([t as i64, (rest / grid.w) as i64, (rest % grid.w) as i64]);
    }
    Ok(cells)
}
