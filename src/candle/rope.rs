//! Qwen2-VL / Qwen2.5-VL M-RoPE position ids on candle tensors (see [`crate::rope::mrope`]).

use candle_core::{DType as CandleDType, Device, Tensor};

use super::access::expect_cpu;
use super::{candle_err, IntoCandle, Result};
use crate::rope::{
    batch_positions, BatchInput, GridThw, MaskValue, MropeConfig, Seconds, TokenKinds,
};

/// The optional inputs of `get_rope_index` besides `input_ids`.
#[derive(Debug, Clone, Copy, Default)]
pub struct MropeInput<'a> {
    /// `[batch, seq]`, any integer or float dtype; a token is kept where it is non-zero.
    pub attention_mask: Option<&'a Tensor>,
    /// The processor's `image_grid_thw` (patch grids before the spatial merge).
    pub image_grid_thw: Option<&'a [GridThw]>,
    pub video_grid_thw: Option<&'a [GridThw]>,
    /// One per video (Qwen2.5-VL only).
    pub second_per_grid_ts: Option<&'a [Seconds]>,
}

/// A `[batch, seq]` tensor's values, row-major, converted by candle to `dtype`.
fn rows_of<T: candle_core::WithDType>(
    tensor: &Tensor,
    name: &str,
    dtype: CandleDType,
) -> Result<(Vec<T>, usize, usize)> {
    expect_cpu(tensor, name)?;
    let (batch, seq) = match tensor.dims() {
        &[b, s] => (b, s),
        dims => {
            return Err(candle_err(crate::value_err!(
                "{name}: expected a 2-D tensor [batch, seq], got shape {dims:?}"
            )))
        }
    };
    let values = tensor.to_dtype(dtype)?.flatten_all()?.to_vec1::<T>()?;
    Ok((values, batch, seq))
}

fn is_int(dtype: CandleDType) -> bool {
    matches!(
        dtype,
        CandleDType::U8 | CandleDType::U32 | CandleDType::I16 | CandleDType::I32 | CandleDType::I64
    )
}

/// Position ids (i64 `[3, batch, seq]`: t, h, w) and rope deltas (i64 `[batch]`) of a padded
/// batch `input_ids` (`[batch, seq]`, integer), equal to transformers'
/// `Qwen2VLModel.get_rope_index` (or Qwen2.5-VL's, by `config.model_type`). Masked-out tokens
/// get 0.
pub fn mrope_position_ids(
    input_ids: &Tensor,
    input: MropeInput<'_>,
    config: &MropeConfig,
) -> Result<(Tensor, Tensor)> {
    if !is_int(input_ids.dtype()) {
        return Err(candle_err(crate::type_err!(
            "input_ids: expected an integer dtype (u8, u32, i16, i32 or i64), got {:?}",
            input_ids.dtype()
        )));
    }
    let (ids, batch, seq) = rows_of::<i64>(input_ids, "input_ids", CandleDType::I64)?;
    let run = |mask: Option<&[_]>| -> Result<(Vec<i64>, Vec<i64>)> {
        positions(&ids, batch, seq, mask, &input, config)
    };
    let (positions, deltas) = match input.attention_mask {
        None => run(None)?,
        Some(mask) if is_int(mask.dtype()) => {
            let (values, b, s) = rows_of::<i64>(mask, "attention_mask", CandleDType::I64)?;
            check_mask_shape(b, s, batch, seq)?;
            run(Some(&values))?
        }
        Some(mask) => {
            // Float masks: non-zero (NaN included) is kept, as in `tensor.bool()`.
            let (values, b, s) = rows_of::<f64>(mask, "attention_mask", CandleDType::F64)?;
            check_mask_shape(b, s, batch, seq)?;
            positions(&ids, batch, seq, Some(&values), &input, config)?
        }
    };
    Ok((
        Tensor::from_vec(positions, (3, batch, seq), &Device::Cpu)?,
        Tensor::from_vec(deltas, batch, &Device::Cpu)?,
    ))
}

fn check_mask_shape(b: usize, s: usize, batch: usize, seq: usize) -> Result<()> {
    if (b, s) != (batch, seq) {
        return Err(candle_err(crate::value_err!(
            "attention_mask has shape [{b}, {s}] but input_ids has [{batch}, {seq}]: they must match"
        )));
    }
    Ok(())
}

fn positions<M: MaskValue>(
    ids: &[i64],
    batch: usize,
    seq: usize,
    mask: Option<&[M]>,
    input: &MropeInput<'_>,
    config: &MropeConfig,
) -> Result<(Vec<i64>, Vec<i64>)> {
    let batch_input = BatchInput {
        input_ids: ids,
        batch,
        seq,
        kinds: TokenKinds::FromIds,
        attention_mask: mask,
        image_grid_thw: input.image_grid_thw,
        video_grid_thw: input.video_grid_thw,
        second_per_grid_ts: input.second_per_grid_ts,
    };
    let mut out = vec![0i64; 3 * batch * seq];
    let mut deltas = vec![0i64; batch];
    batch_positions(&batch_input, config, &mut out, &mut deltas).candle()?;
    Ok((out, deltas))
}
