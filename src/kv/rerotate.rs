//! In-place re-rotation of cached keys `[tokens, heads, head_dim]` by a per-token position delta.

use rayon::prelude::*;

use crate::dtype::Float;
use crate::error::Result;
use crate::value_err;

use super::rope::{Deltas, Rope};
use super::strided::{rotate_row, Row, SendPtr, StridedMut};

/// Rows handed to one rayon task at a time: enough to amortise scheduling.
pub(crate) const MIN_ROWS_PER_TASK: usize = 256;

/// Rotates every key `keys[t, h, :]` by `deltas[t]`, in place: a key stored at position `p`
/// becomes the key at `p + delta`.
pub fn rerotate_keys<T: Float>(
    keys: &mut StridedMut<'_, T, 3>,
    deltas: Deltas<'_>,
    rope: &Rope,
) -> Result<()> {
    let [tokens, heads, dim] = keys.shape();
    let config = rope.config();
    if dim != config.head_dim {
        return Err(value_err!(
            "keys has shape ({tokens}, {heads}, {dim}): its last dimension must equal head_dim = {}",
            config.head_dim
        ));
    }
    deltas.check(tokens, config, "keys' first dimension (tokens)")?;
    if tokens == 0 || heads == 0 {
        return Ok(());
    }
    let table = rope.table(deltas, tokens);
    let [ts, hs, ds] = keys.strides();
    let base = SendPtr(keys.ptr());
    let interleaved = config.interleaved;
    let min_tokens = (MIN_ROWS_PER_TASK / heads).max(1);
    (0..tokens)
        .into_par_iter()
        .with_min_len(min_tokens)
        .for_each_init(Vec::new, |scratch, t| {
            let (cos, sin, identity) = table.row(t);
            if identity {
                return;
            }
            for h in 0..heads {
                // SAFETY: the view is non-overlapping, so (t, h) rows are disjoint and each is
                // rotated by exactly one task.
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
