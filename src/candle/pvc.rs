//! The reflection detector and the PVC schedule fed from a candle generation loop: the sampled
//! token(s) of a step come as a tensor (an `argmax` result, u32 or i64) and go to a
//! [`Monitor`] (one stream) or a [`MonitorBatch`] (a batch of streams).

use candle_core::{DType as CandleDType, Tensor};

use super::access::expect_cpu;
use super::{candle_err, IntoCandle, Result};
use crate::pvc::{Calibration, Monitor, MonitorBatch};
use crate::triggers::Detector;

/// The values of a scalar or 1-D integer tensor.
fn token_ids(tokens: &Tensor, name: &str) -> Result<Vec<i64>> {
    expect_cpu(tokens, name)?;
    if !matches!(
        tokens.dtype(),
        CandleDType::U8 | CandleDType::U32 | CandleDType::I16 | CandleDType::I32 | CandleDType::I64
    ) {
        return Err(candle_err(crate::type_err!(
            "{name}: expected integer token ids (u32 or i64), got {:?}",
            tokens.dtype()
        )));
    }
    if tokens.rank() > 1 {
        return Err(candle_err(crate::value_err!(
            "{name}: expected a scalar or a 1-D tensor of token ids, got shape {:?}",
            tokens.dims()
        )));
    }
    tokens
        .to_dtype(CandleDType::I64)?
        .flatten_all()?
        .to_vec1::<i64>()
}

/// Feeds one sampled token (a scalar or one-element integer tensor) to `monitor`; returns the
/// calibration the schedule decides at it, if any.
pub fn push_token(
    monitor: &mut Monitor,
    detector: &Detector,
    token: &Tensor,
) -> Result<Option<Calibration>> {
    let ids = token_ids(token, "token")?;
    let [id] = ids.as_slice() else {
        return Err(candle_err(crate::value_err!(
            "token: expected one token id, got {} (use step_batch for a batch)",
            ids.len()
        )));
    };
    monitor.push(detector, *id).candle()
}

/// One decoding step of a batch: `tokens[i]` (`[batch]`, integer) is the newest token of slot
/// `i`. Returns `(slot, calibration)` for every slot that calibrates at this step.
pub fn step_batch(batch: &mut MonitorBatch, tokens: &Tensor) -> Result<Vec<(usize, Calibration)>> {
    let ids = token_ids(tokens, "tokens")?;
    let mut calibrations = Vec::new();
    batch
        .step(&ids, |slot, c| calibrations.push((slot, c)))
        .candle()?;
    Ok(calibrations)
}
