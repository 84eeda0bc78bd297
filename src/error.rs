//! The one error type of the Rust core. It knows nothing of Python: each variant says what kind
//! of mistake it is, and the bindings map the kinds to `ValueError`, `TypeError`, `IndexError`,
//! `OSError` and `RuntimeError`. Messages name the argument and what was expected.

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// A value, shape or size is wrong (Python `ValueError`).
    #[error("{0}")]
    Value(String),
    /// A dtype or kind of object is wrong (Python `TypeError`).
    #[error("{0}")]
    Type(String),
    /// An index or id is out of range (Python `IndexError`).
    #[error("{0}")]
    Index(String),
    /// A file cannot be found or read (Python `OSError`).
    #[error("{0}")]
    Io(String),
    /// Something outside the caller's control failed (Python `RuntimeError`).
    #[error("{0}")]
    Runtime(String),
    /// A result or copy sized by an argument cannot be allocated (Python `MemoryError`).
    #[error("{0}")]
    Memory(String),
}

pub type Result<T> = std::result::Result<T, Error>;

/// `value_err!("...", args)` builds an [`Error::Value`] with a formatted message.
#[macro_export]
macro_rules! value_err {
    ($($arg:tt)*) => { $crate::error::Error::Value(format!($($arg)*)) };
}

/// `type_err!("...", args)` builds an [`Error::Type`] with a formatted message.
#[macro_export]
macro_rules! type_err {
    ($($arg:tt)*) => { $crate::error::Error::Type(format!($($arg)*)) };
}

/// `index_err!("...", args)` builds an [`Error::Index`] with a formatted message.
#[macro_export]
macro_rules! index_err {
    ($($arg:tt)*) => { $crate::error::Error::Index(format!($($arg)*)) };
}

/// `io_err!("...", args)` builds an [`Error::Io`] with a formatted message.
#[macro_export]
macro_rules! io_err {
    ($($arg:tt)*) => { $crate::error::Error::Io(format!($($arg)*)) };
}

/// A vector with room for `len` elements, or [`Error::Memory`] naming `what` (the argument whose
/// size asked for it) when the size overflows or the allocator refuses: never an abort.
pub fn try_vec<T>(len: usize, what: &str) -> Result<Vec<T>> {
    let mut v = Vec::new();
    v.try_reserve_exact(len).map_err(|_| {
        Error::Memory(format!(
            "{what}: cannot allocate {len} elements of {} bytes",
            std::mem::size_of::<T>()
        ))
    })?;
    Ok(v)
}

/// `len` copies of `T::default()`, allocated fallibly (see [`try_vec`]).
pub fn try_zeroed<T: Clone + Default>(len: usize, what: &str) -> Result<Vec<T>> {
    let mut v = try_vec(len, what)?;
    v.resize(len, T::default());
    Ok(v)
}

/// The product of sizes taken from arguments, or a `ValueError` naming `what` on overflow.
pub fn checked_size(dims: &[usize], what: &str) -> Result<usize> {
    dims.iter()
        .try_fold(1usize, |n, &d| n.checked_mul(d))
        .ok_or_else(|| Error::Value(format!("{what}: sizes {dims:?} overflow when multiplied")))
}
