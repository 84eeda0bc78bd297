//! Maps the core's error kinds to Python exceptions.

use pyo3::exceptions::{PyIndexError, PyOSError, PyRuntimeError, PyTypeError, PyValueError};
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
