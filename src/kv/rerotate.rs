//! In-place re-rotation of cached keys `[tokens, heads, head_dim]` by a per-token position delta.

use rayon::prelude::*;

use crate::dtype::Float;
use crate::error::Result;
use crate::value_err;

use super::rope::{Deltas, KernelDeltas, Rope};
use super::strided::{check_disjoint, rotate_row, Row, SendPtr, StridedMut};

/// Rows handed to one rayon task at a time: enough to amortise scheduling.
pub(crate) const MIN_ROWS_PER_TASK: usize = 256;

/// Rotates every key `keys[l][t, h, :]` of every layer `l` by `deltas[t]`, in place: a key
/// stored at position `p` becomes the key at `p + delta`. All layers hold the same tokens.
pub fn rerotate_keys<T: Float>(
    keys: &mut [StridedMut<'_, T, 3>],
    deltas: Deltas<'_>,
    rope: &Rope,
) -> Result<()> {
    let tokens = check_rerotate(keys, &KernelDeltas::Host(deltas), rope)?;
    if tokens == 0 || keys.is_empty() {
        return Ok(());
    }
    let table = rope.table(deltas, tokens);
    let interleaved = rope.config().interleaved;
    let views: Vec<(SendPtr<T>, [usize; 3], [isize; 3])> = keys
        .iter()
        .map(|k| (SendPtr(k.ptr()), k.shape(), k.strides()))
        .collect();
    let heads_max = views.iter().map(|v| v.1[1]).max().unwrap_or(0).max(1);
    let min_tokens = (MIN_ROWS_PER_TASK / heads_max).max(1);
    (0..views.len() * tokens)
        .into_par_iter()
        .with_min_len(min_tokens)
        .for_each_init(Vec::new, |scratch, i| {
            let (l, t) = (i / tokens, i % tokens);
            let (cos, sin, identity) = table.row(t);
            if identity {
                return;
            }
            let (base, [_, heads, dim], [ts, hs, ds]) = views[l];
            for h in 0..heads {
                // SAFETY: each view is non-overlapping and the views are disjoint, so (l, t, h)
                // rows are disjoint and each is rotated by exactly one task.
                unsafe {
                    let ptr = base.get().offset(t as isize * ts + h as isize * hs);
                    rotate_row(
                        Row {
                            ptr,
                            len: dim,
                            stride: ds,
                        },
                        cos,
                        sin,
                        interleaved,
                        scratch,
                    );
                }
            }
        });
    Ok(())
}

/// The checks of [`rerotate_keys`] (nothing is touched); returns the number of tokens.
/// Shared with the CUDA backend.
pub(crate) fn check_rerotate<T: Float>(
    keys: &[StridedMut<'_, T, 3>],
    deltas: &KernelDeltas<'_>,
    rope: &Rope,
) -> Result<usize> {
    let config = rope.config();
    let Some(first) = keys.first().map(|k| k.shape()) else {
        return Ok(0);
    };
    for (l, view) in keys.iter().enumerate() {
        let [tokens, heads, dim] = view.shape();
        let name = if keys.len() == 1 {
            "keys".to_string()
        } else {
            format!("keys[{l}]")
        };
        if dim != config.head_dim {
            return Err(value_err!(
                "{name} has shape ({tokens}, {heads}, {dim}): expected [tokens, heads, head_dim] with head_dim = {}",
                config.head_dim
            ));
        }
        if tokens != first[0] {
            return Err(value_err!(
                "{name} has {tokens} tokens but keys[0] has {}: every layer must hold the same tokens",
                first[0]
            ));
        }
    }
    let name = if keys.len() == 1 {
        "keys' first dimension (tokens)"
    } else {
        "each layer's first dimension (tokens)"
    };
    let tokens = first[0];
    deltas.check(tokens, config, name)?;
    if keys.len() > 1 {
        let ranges: Vec<_> = keys
            .iter()
            .enumerate()
            .map(|(l, k)| (k.address_range(), format!("keys[{l}]")))
            .collect();
        check_disjoint(&ranges)?;
    }
    Ok(tokens)
}
