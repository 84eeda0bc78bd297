//! Maps the core's error kinds to Python exceptions.

use pyo3::exceptions::{PyIndexError, PyOSError, PyRuntimeError, PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::PyErr;

use crate::error::Error;

impl From<Error> for PyErr {
    fn from(err: Error) -> PyErr {
        match err {
            Error::Value(msg) => PyValueError::new_err(msg),
            Error::Type(msg) => PyTypeError::new_err(msg),
            Error::Index(msg) => PyIndexError::new_err(msg),
            Error::Io(msg) => PyOSError::new_err(msg),
            Error::Runtime(msg) => PyRuntimeError::new_err(msg),
        }
    }
}

/// The Python type name of `obj`, for messages such as "expected a NumPy array, got list".
pub(crate) fn type_name(obj: &Bound<'_, PyAny>) -> String {
    obj.get_type()
        .name()
        .map(|n| n.to_string())
        .unwrap_or_else(|_| "object".into())
}
