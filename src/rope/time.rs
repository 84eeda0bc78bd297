//! Temporal spacing of video positions in Qwen2.5-VL.
//!
//! transformers computes the temporal index of frame group `i` of a video as
//! `(torch.arange(t) * time_interval).long()` with
//! `time_interval = tokens_per_second * second_per_grid_ts[video]`. The dtype that product is
//! computed in depends on what the caller passed (a float32 tensor, a float64 tensor, a list of
//! Python floats, NumPy scalars, integers, ...) and the rounding of that dtype decides the
//! truncated result. [`TimeInterval`] keeps the interval together with the arithmetic it is
//! applied in, and [`TimeInterval::qwen2_5_vl`] derives both from the inputs by PyTorch's and
//! NumPy's promotion rules, so the positions match bit for bit.

use half::{bf16, f16};

use crate::error::Result;
use crate::value_err;

/// `vision_config.tokens_per_second`: an integer in every released config, but a float is legal.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum TokensPerSecond {
    Int(i64),
    Float(f64),
}

impl TokensPerSecond {
    fn as_f32(self) -> f32 {
        match self {
            TokensPerSecond::Int(v) => v as f32,
            TokensPerSecond::Float(v) => v as f32,
        }
    }

    fn as_f64(self) -> f64 {
        match self {
            TokensPerSecond::Int(v) => v as f64,
            TokensPerSecond::Float(v) => v,
        }
    }
}

/// One `second_per_grid_ts` value in the dtype it was given in.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum SecondsValue {
    /// Any integer or bool dtype (Python `int`, `numpy.int64`, an int64 tensor element, ...).
    Int(i64),
    F16(f16),
    BF16(bf16),
    F32(f32),
    F64(f64),
}

/// One `second_per_grid_ts` value and where it came from: an element of a PyTorch tensor
/// (iterating a tensor yields 0-d tensors, which keep their dtype in arithmetic) or a Python /
/// NumPy scalar (which PyTorch treats as a "weak" Python number: float32 arithmetic for floats).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Seconds {
    pub value: SecondsValue,
    pub from_tensor: bool,
}

impl Seconds {
    /// A Python `float` (or `numpy.float64`) value.
    pub fn python_float(value: f64) -> Self {
        Seconds {
            value: SecondsValue::F64(value),
            from_tensor: false,
        }
    }

    /// Whether the value is finite (NaN and infinities give meaningless positions).
    pub fn is_finite(&self) -> bool {
        match self.value {
            SecondsValue::Int(_) => true,
            SecondsValue::F16(v) => v.is_finite(),
            SecondsValue::BF16(v) => v.is_finite(),
            SecondsValue::F32(v) => v.is_finite(),
            SecondsValue::F64(v) => v.is_finite(),
        }
    }
}

/// The spacing of temporal positions of one vision input and the arithmetic it is applied in:
/// the temporal index of frame group `i` is `trunc(i * interval)` computed in that arithmetic.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum TimeInterval {
    /// Exact integer product (images, Qwen2-VL videos, integer inputs).
    Int(i64),
    /// `i` and the interval rounded to float16, product rounded to float16 (a float16 tensor).
    F16(f16),
    /// As `F16`, in bfloat16.
    BF16(bf16),
    /// Product in float32 (float32 tensors, Python / NumPy float scalars).
    F32(f32),
    /// Product in float64 (float64 tensors).
    F64(f64),
}

impl Default for TimeInterval {
    fn default() -> Self {
        TimeInterval::Int(1)
    }
}

impl TimeInterval {
    /// The temporal index of frame group `i` (before the start position is added).
    #[inline]
    pub fn scale(self, i: i64) -> i64 {
        match self {
            TimeInterval::Int(k) => i.wrapping_mul(k),
            TimeInterval::F32(k) => ((i as f32) * k) as i64,
            TimeInterval::F64(k) => ((i as f64) * k) as i64,
            TimeInterval::F16(k) => {
                let product = f16::from_f32(i as f32).to_f32() * k.to_f32();
                f16::from_f32(product).to_f32() as i64
            }
            TimeInterval::BF16(k) => {
                let product = bf16::from_f32(i as f32).to_f32() * k.to_f32();
                bf16::from_f32(product).to_f32() as i64
            }
        }
    }

    /// The interval of a Qwen2.5-VL video: `tokens_per_second * second_per_grid_ts`, in the
    /// arithmetic PyTorch (and NumPy, for NumPy scalars) would use for these operands.
    pub fn qwen2_5_vl(tokens_per_second: TokensPerSecond, seconds: Seconds) -> Result<Self> {
        if !seconds.is_finite() {
            return Err(value_err!(
                "second_per_grid_ts must be finite, got {:?}",
                seconds.value
            ));
        }
        if let TokensPerSecond::Float(v) = tokens_per_second {
            if !v.is_finite() {
                return Err(value_err!("tokens_per_second must be finite, got {v}"));
            }
        }
        use SecondsValue as S;
        use TokensPerSecond as Tps;
        Ok(if seconds.from_tensor {
            // `tps * tensor0d` keeps the tensor's dtype (an integer tensor times a float becomes
            // float32); the Python number is read in the op's compute type (f32 for all floats
            // but float64). `arange(t) * that` is then computed in the same dtype.
            match (seconds.value, tokens_per_second) {
                (S::Int(s), Tps::Int(k)) => TimeInterval::Int(k.wrapping_mul(s)),
                (S::Int(s), Tps::Float(k)) => TimeInterval::F32(k as f32 * s as f32),
                (S::F32(s), k) => TimeInterval::F32(k.as_f32() * s),
                (S::F64(s), k) => TimeInterval::F64(k.as_f64() * s),
                (S::F16(s), k) => TimeInterval::F16(f16::from_f32(k.as_f32() * s.to_f32())),
                (S::BF16(s), k) => TimeInterval::BF16(bf16::from_f32(k.as_f32() * s.to_f32())),
            }
        } else {
            // Python / NumPy scalars: the product is a Python or NumPy number (NumPy keeps the
            // scalar's float dtype, a Python number is "weak"); PyTorch multiplies the int64
            // arange by a Python float in float32.
            match (seconds.value, tokens_per_second) {
                (S::Int(s), Tps::Int(k)) => TimeInterval::Int(k.wrapping_mul(s)),
                (S::Int(s), Tps::Float(k)) => TimeInterval::F32((k * s as f64) as f32),
                (S::F64(s), k) => TimeInterval::F32((k.as_f64() * s) as f32),
                (S::F32(s), k) => TimeInterval::F32(k.as_f32() * s),
                (S::F16(s), k) => {
                    let k16 = f16::from_f64(k.as_f64());
                    TimeInterval::F32(f16::from_f32(k16.to_f32() * s.to_f32()).to_f32())
                }
                (S::BF16(s), k) => {
                    let k16 = bf16::from_f64(k.as_f64());
                    TimeInterval::F32(bf16::from_f32(k16.to_f32() * s.to_f32()).to_f32())
                }
            }
        })
    }
}
