//! Bindings of `src/pvc`: `PVCSchedule` and `Calibration` (the stream and batch classes that
//! carry schedule state live with the detector in `triggers.rs`).

use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;

#[allow(unused_imports)]
use crate::python::errors::{opt_arg, Arg};

use super::triggers::Hit;
use crate::pvc::{Calibration as CoreCalibration, Reason, Schedule};

/// When reflection hits become calibrations (the image given to the model again).
///
/// warmup: no calibration before this many generated tokens. min_gap: at least this many
/// tokens from one calibration to the next. max_calibrations: at most this many per stream
/// (None: no limit). period: calibrate without a trigger once this many tokens have passed
/// since the last calibration (or the start); None: only triggers calibrate.
/// The default schedule calibrates at every hit.
#[pyclass(name = "PVCSchedule", module = "tvc_rs", frozen, eq, from_py_object)]
#[derive(Clone, PartialEq)]
pub struct PVCSchedule {
    pub inner: Schedule,
}

fn non_negative(name: &str, value: i64) -> PyResult<u64> {
    if value < 0 {
        return Err(PyValueError::new_err(format!(
            "{name} = {value}: must be >= 0"
        )));
    }
    Ok(value as u64)
}

#[pymethods]
impl PVCSchedule {
    #[new]
    #[pyo3(signature = (warmup = Arg::of(0), min_gap = Arg::of(0), max_calibrations=None, period=None), text_signature = "(warmup=0, min_gap=0, max_calibrations=None, period=None)")]
    fn new(
        warmup: Arg<i64>,
        min_gap: Arg<i64>,
        max_calibrations: Option<Arg<i64>>,
        period: Option<Arg<i64>>,
    ) -> PyResult<Self> {
        let warmup = warmup.get("warmup")?;
        let min_gap = min_gap.get("min_gap")?;
        let max_calibrations = opt_arg(max_calibrations, "max_calibrations")?;
        let period = opt_arg(period, "period")?;
        let warmup = non_negative("warmup", warmup)?;
        let min_gap = non_negative("min_gap", min_gap)?;
        let max_calibrations = match max_calibrations {
            None => None,
            Some(m) if (0..=u32::MAX as i64).contains(&m) => Some(m as u32),
            Some(m) => {
                return Err(PyValueError::new_err(format!(
                    "max_calibrations = {m}: must be >= 0 (or None for no limit)"
                )))
            }
        };
        let period = match period {
            None => None,
            Some(p) if p >= 1 => Some(p as u64),
            Some(p) => {
                return Err(PyValueError::new_err(format!(
                    "period = {p}: must be at least 1 token (or None for no periodic calibration)"
                )))
            }
        };
        Ok(PVCSchedule {
            inner: Schedule::new(warmup, min_gap, max_calibrations, period)?,
        })
    }

    #[getter]
    fn warmup(&self) -> u64 {
        self.inner.warmup
    }
    #[getter]
    fn min_gap(&self) -> u64 {
        self.inner.min_gap
    }
    #[getter]
    fn max_calibrations(&self) -> Option<u32> {
        self.inner.max_calibrations
    }
    #[getter]
    fn period(&self) -> Option<u64> {
        self.inner.period
    }

    fn __repr__(&self) -> String {
        let opt = |v: Option<String>| v.unwrap_or_else(|| "None".into());
        format!(
            "PVCSchedule(warmup={}, min_gap={}, max_calibrations={}, period={})",
            self.inner.warmup,
            self.inner.min_gap,
            opt(self.inner.max_calibrations.map(|m| m.to_string())),
            opt(self.inner.period.map(|p| p.to_string()))
        )
    }
}

crate::pyclass_arg_value!(PVCSchedule, "PVCSchedule");

/// A calibration decided at generated token `token_index`: `reason` is "trigger" (a
/// reflection phrase, in `hit`) or "period" (no phrase; `hit` is None).
#[pyclass(name = "Calibration", module = "tvc_rs", frozen, eq)]
#[derive(Clone, PartialEq)]
pub struct Calibration {
    #[pyo3(get)]
    pub token_index: u64,
    #[pyo3(get)]
    pub reason: &'static str,
    #[pyo3(get)]
    pub hit: Option<Hit>,
}

impl Calibration {
    pub fn new(calibration: &CoreCalibration, phrases: &[String]) -> Calibration {
        Calibration {
            token_index: calibration.token_index,
            reason: match calibration.reason {
                Reason::Trigger => "trigger",
                Reason::Period => "period",
            },
            hit: calibration.hit.map(|h| Hit::new(&h, phrases)),
        }
    }
}

#[pymethods]
impl Calibration {
    /// The phrase that triggered it, or None for a periodic calibration.
    #[getter]
    fn phrase(&self) -> Option<String> {
        self.hit.as_ref().map(|h| h.phrase.clone())
    }

    fn __repr__(&self) -> String {
        match &self.hit {
            Some(hit) => format!(
                "Calibration(token_index={}, reason='trigger', phrase={:?})",
                self.token_index, hit.phrase
            ),
            None => format!(
                "Calibration(token_index={}, reason='period')",
                self.token_index
            ),
        }
    }
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<PVCSchedule>()?;
    m.add_class::<Calibration>()?;
    Ok(())
}
