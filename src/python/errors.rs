//! Maps the core's error kinds to Python exceptions.

use pyo3::exceptions::{
    PyIndexError, PyMemoryError, PyOSError, PyRuntimeError, PyTypeError, PyValueError,
};
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
            Error::Memory(msg) => PyMemoryError::new_err(msg),
        }
    }
}

/// Prefixes a core error's message with the argument it is about (`tokens: token id 7 is ...`),
/// for core functions that check a value without knowing its argument's name.
pub fn about(name: &'static str) -> impl Fn(Error) -> Error {
    move |err| {
        let prefix = |msg: String| {
            if msg.starts_with(name) {
                msg
            } else {
                format!("{name}: {msg}")
            }
        };
        match err {
            Error::Value(m) => Error::Value(prefix(m)),
            Error::Type(m) => Error::Type(prefix(m)),
            Error::Index(m) => Error::Index(prefix(m)),
            other => other,
        }
    }
}

/// The Python type name of `obj`, for messages such as "expected a NumPy array, got list".
pub fn type_name(obj: &Bound<'_, PyAny>) -> String {
    obj.get_type()
        .name()
        .map(|n| n.to_string())
        .unwrap_or_else(|_| "object".into())
}

// ---- scalar arguments that name themselves in errors ----

use pyo3::types::{PyBool, PyFloat, PyInt, PyString};
use pyo3::Borrowed;

/// What was wrong with an argument, before its name is known: the kind (TypeError when the kind
/// of object is wrong, ValueError when its value is), a path inside it (`"[2]"`) and the message.
#[derive(Debug, Clone)]
pub struct ArgError {
    value: bool,
    path: String,
    msg: String,
}

impl ArgError {
    fn type_(msg: String) -> Self {
        ArgError {
            value: false,
            path: String::new(),
            msg,
        }
    }
    fn value(msg: String) -> Self {
        ArgError {
            value: true,
            path: String::new(),
            msg,
        }
    }
    /// A TypeError-kind error (for `ArgValue` impls outside this module).
    pub fn wrong_type(msg: String) -> Self {
        Self::type_(msg)
    }
    fn at(mut self, index: usize) -> Self {
        self.path = format!("[{index}]{}", self.path);
        self
    }
    /// The Python exception, the message starting with the argument's name.
    pub fn named(&self, name: &str) -> PyErr {
        let msg = format!("{name}{}: {}", self.path, self.msg);
        if self.value {
            PyValueError::new_err(msg)
        } else {
            PyTypeError::new_err(msg)
        }
    }
}

fn short_repr(obj: &Bound<'_, PyAny>) -> String {
    let r = obj
        .repr()
        .map(|r| r.to_string())
        .unwrap_or_else(|_| type_name(obj));
    if r.chars().count() > 60 {
        let head: String = r.chars().take(57).collect();
        format!("{head}...")
    } else {
        r
    }
}

/// A NumPy (or other) bool scalar: refused where an int is expected, as `bool` is.
fn is_boolish(obj: &Bound<'_, PyAny>) -> bool {
    obj.is_instance_of::<PyBool>() || matches!(type_name(obj).as_str(), "bool_" | "bool")
}

/// How one kind of argument is read from Python, with errors that do not yet know its name.
pub trait ArgValue: Sized {
    fn read(obj: &Bound<'_, PyAny>) -> Result<Self, ArgError>;
}

macro_rules! int_arg_value {
    ($($t:ty),*) => {$(
        impl ArgValue for $t {
            fn read(obj: &Bound<'_, PyAny>) -> Result<Self, ArgError> {
                if is_boolish(obj) {
                    return Err(ArgError::type_(format!("expected an int, got bool ({})", short_repr(obj))));
                }
                match obj.extract::<$t>() {
                    Ok(v) => Ok(v),
                    Err(_) if obj.is_instance_of::<PyInt>() || obj.hasattr("__index__").unwrap_or(false) => {
                        Err(ArgError::value(format!(
                            "expected an int in [{}, {}], got {}",
                            <$t>::MIN, <$t>::MAX, short_repr(obj)
                        )))
                    }
                    Err(_) => Err(ArgError::type_(format!("expected an int, got {}", type_name(obj)))),
                }
            }
        }
    )*};
}
int_arg_value!(i64, i32, u32, u64, usize, isize, u8, u16);

macro_rules! float_arg_value {
    ($($t:ty),*) => {$(
        impl ArgValue for $t {
            fn read(obj: &Bound<'_, PyAny>) -> Result<Self, ArgError> {
                if obj.is_instance_of::<PyString>() || obj.is_none() {
                    return Err(ArgError::type_(format!("expected a number, got {}", type_name(obj))));
                }
                match obj.extract::<f64>() {
                    Ok(v) => Ok(v as $t),
                    Err(_) if obj.is_instance_of::<PyInt>() => Err(ArgError::value(format!(
                        "expected a number that fits a float, got {}",
                        short_repr(obj)
                    ))),
                    Err(_) => Err(ArgError::type_(format!("expected a number, got {}", type_name(obj)))),
                }
            }
        }
    )*};
}
float_arg_value!(f64, f32);

impl ArgValue for bool {
    fn read(obj: &Bound<'_, PyAny>) -> Result<Self, ArgError> {
        obj.extract::<bool>()
            .map_err(|_| ArgError::type_(format!("expected a bool, got {}", type_name(obj))))
    }
}

impl ArgValue for String {
    fn read(obj: &Bound<'_, PyAny>) -> Result<Self, ArgError> {
        if !obj.is_instance_of::<PyString>() {
            return Err(ArgError::type_(format!(
                "expected a str, got {}",
                type_name(obj)
            )));
        }
        obj.extract::<String>().map_err(|e| {
            ArgError::value(format!(
                "expected a str that is valid Unicode: {}",
                e.value(obj.py())
            ))
        })
    }
}

impl<T: ArgValue> ArgValue for Vec<T> {
    fn read(obj: &Bound<'_, PyAny>) -> Result<Self, ArgError> {
        if obj.is_instance_of::<PyString>()
            || obj.is_instance_of::<PyInt>()
            || obj.is_instance_of::<PyFloat>()
            || obj.is_none()
        {
            return Err(ArgError::type_(format!(
                "expected a sequence, got {}",
                type_name(obj)
            )));
        }
        // An array or tensor is read through tolist() when small: iterating a tensor makes one
        // object per row (a zero-stride view of 2**31 rows would take minutes).
        let converted;
        let obj = if !(obj.is_instance_of::<pyo3::types::PyList>()
            || obj.is_instance_of::<pyo3::types::PyTuple>())
            && obj.hasattr("shape").unwrap_or(false)
            && obj.hasattr("tolist").unwrap_or(false)
        {
            let shape: Vec<usize> =
                obj.getattr("shape")
                    .and_then(|s| s.extract())
                    .map_err(|_| {
                        ArgError::type_(format!("expected a sequence, got {}", type_name(obj)))
                    })?;
            let numel = shape.iter().try_fold(1usize, |n, &d| n.checked_mul(d));
            if numel.is_none_or(|n| n > 1 << 24) {
                return Err(ArgError::value(format!(
                    "expected a sequence, got {} of shape {shape:?} (too many elements)",
                    type_name(obj)
                )));
            }
            converted = obj.call_method0("tolist").map_err(|e| {
                ArgError::type_(format!("cannot be read as a list: {}", e.value(obj.py())))
            })?;
            &converted
        } else {
            obj
        };
        let len = obj
            .len()
            .map_err(|_| ArgError::type_(format!("expected a sequence, got {}", type_name(obj))))?;
        let iter = obj
            .try_iter()
            .map_err(|_| ArgError::type_(format!("expected a sequence, got {}", type_name(obj))))?;
        let mut out = Vec::new();
        out.try_reserve(len.min(1 << 20))
            .map_err(|_| ArgError::value("too long".into()))?;
        for (i, item) in iter.enumerate() {
            let item = item.map_err(|e| {
                ArgError::type_(format!("cannot be iterated: {}", e.value(obj.py()))).at(i)
            })?;
            out.push(T::read(&item).map_err(|e| e.at(i))?);
        }
        Ok(out)
    }
}

impl<A: ArgValue, B: ArgValue> ArgValue for (A, B) {
    fn read(obj: &Bound<'_, PyAny>) -> Result<Self, ArgError> {
        let items: Vec<Bound<'_, PyAny>> = if obj.is_instance_of::<pyo3::types::PyTuple>()
            || obj.is_instance_of::<pyo3::types::PyList>()
        {
            obj.try_iter()
                .and_then(|it| it.collect::<PyResult<Vec<_>>>())
                .map_err(|_| ArgError::type_(format!("expected a pair, got {}", type_name(obj))))?
        } else {
            return Err(ArgError::type_(format!(
                "expected a pair, got {}",
                type_name(obj)
            )));
        };
        if items.len() != 2 {
            return Err(ArgError::value(format!(
                "expected a pair, got {} items",
                items.len()
            )));
        }
        Ok((
            A::read(&items[0]).map_err(|e| e.at(0))?,
            B::read(&items[1]).map_err(|e| e.at(1))?,
        ))
    }
}

impl<A: ArgValue, B: ArgValue, C: ArgValue> ArgValue for (A, B, C) {
    fn read(obj: &Bound<'_, PyAny>) -> Result<Self, ArgError> {
        let items: Vec<Bound<'_, PyAny>> = if obj.is_instance_of::<pyo3::types::PyTuple>()
            || obj.is_instance_of::<pyo3::types::PyList>()
        {
            obj.try_iter()
                .and_then(|it| it.collect::<PyResult<Vec<_>>>())
                .map_err(|_| {
                    ArgError::type_(format!("expected a triple, got {}", type_name(obj)))
                })?
        } else {
            return Err(ArgError::type_(format!(
                "expected a triple, got {}",
                type_name(obj)
            )));
        };
        if items.len() != 3 {
            return Err(ArgError::value(format!(
                "expected 3 items, got {}",
                items.len()
            )));
        }
        Ok((
            A::read(&items[0]).map_err(|e| e.at(0))?,
            B::read(&items[1]).map_err(|e| e.at(1))?,
            C::read(&items[2]).map_err(|e| e.at(2))?,
        ))
    }
}

/// `ArgValue` for a `#[pyclass]` that is `Clone` (`PVCSchedule`, `DVRPolicy`): "expected a
/// PVCSchedule, got str".
#[macro_export]
macro_rules! pyclass_arg_value {
    ($t:ty, $py_name:literal) => {
        impl $crate::python::errors::ArgValue for $t {
            fn read(
                obj: &pyo3::Bound<'_, pyo3::PyAny>,
            ) -> Result<Self, $crate::python::errors::ArgError> {
                obj.extract::<$t>().map_err(|_| {
                    $crate::python::errors::ArgError::wrong_type(format!(
                        "expected a {}, got {}",
                        $py_name,
                        $crate::python::errors::type_name(obj)
                    ))
                })
            }
        }
    };
}

/// A scalar (or small sequence) argument whose conversion errors name it.
///
/// PyO3 reports a failed conversion without the argument's name (only as a note), and turns a
/// too-large int into `OverflowError: Python int too large to convert to C long`. Declaring the
/// parameter as `Arg<T>` defers the error; `arg.get("name")?` raises it as `TypeError` (wrong
/// kind of object, bool for an int included) or `ValueError` (out of range), the message
/// starting with the name: `head_dim: expected an int, got float`.
pub struct Arg<T>(Result<T, ArgError>);

impl<T> Arg<T> {
    /// A default value.
    pub const fn of(value: T) -> Self {
        Arg(Ok(value))
    }
    /// The value, or the conversion error naming `name`.
    pub fn get(self, name: &str) -> PyResult<T> {
        self.0.map_err(|e| e.named(name))
    }
}

impl<'a, 'py, T: ArgValue> FromPyObject<'a, 'py> for Arg<T> {
    type Error = PyErr;
    fn extract(obj: Borrowed<'a, 'py, PyAny>) -> PyResult<Self> {
        Ok(Arg(T::read(&obj)))
    }
}

/// An optional [`Arg`]: `None` stays `None`.
pub fn opt_arg<T>(arg: Option<Arg<T>>, name: &str) -> PyResult<Option<T>> {
    arg.map(|a| a.get(name)).transpose()
}

/// Reads `obj` as argument `name` of kind `T` (for arguments taken as `&Bound<PyAny>`).
#[allow(dead_code)]
pub fn read_arg<T: ArgValue>(obj: &Bound<'_, PyAny>, name: &str) -> PyResult<T> {
    T::read(obj).map_err(|e| e.named(name))
}
