//! Mapping of core errors to Python exceptions: one exception class per variant of the core's
//! [`Error`] (the message is the core's, unchanged). Bad arguments are `ValueError` subclasses, so
//! callers can catch them the usual way; allocations above the memory limit or refused by the system
//! are a `MemoryError` subclass; nothing here panics.
//!
//! Rust's orphan rule forbids `impl From<edgelearn_core::Error> for PyErr` in this crate (both types
//! are foreign), so the one conversion is [`to_py`], applied by `CoreResultExt::py` (`.py()?`).

use edgelearn_core::Error;
use pyo3::create_exception;
use pyo3::exceptions::{PyMemoryError, PyTypeError, PyValueError};
use pyo3::prelude::*;

create_exception!(
    edgelearn,
    InvalidArgumentError,
    PyValueError,
    "An argument has a wrong shape, size, layout or value (the message names the argument and what was \
     expected)."
);

create_exception!(
    edgelearn,
    AccumulatorOverflowError,
    PyValueError,
    "A result could not be represented exactly, e.g. an INT32 accumulation over this many terms could \
     overflow."
);

create_exception!(
    edgelearn,
    NonFiniteError,
    PyValueError,
    "An input holds NaN or infinity where finite values are required (the message gives the first index)."
);

create_exception!(
    edgelearn,
    MemoryLimitError,
    PyMemoryError,
    "An allocation sized by the input is above edgelearn's memory limit (`set_memory_limit`, \
     `EDGELEARN_MEMORY_LIMIT`) or the system refused it."
);

create_exception!(
    edgelearn,
    KernelUnavailableError,
    PyValueError,
    "The requested INT8 kernel is unknown or this CPU lacks the instructions it needs."
);

create_exception!(
    edgelearn.sgq,
    FrameError,
    PyValueError,
    "Bytes that should be an SGQ frame are malformed (bad magic, unknown version, truncated, wrong CRC, \
     lengths that disagree, absurd shapes)."
);

/// Converts a core error to the Python exception of its variant.
pub fn to_py(e: Error) -> PyErr {
    let msg = e.to_string();
    match e {
        Error::InvalidArgument { .. } => InvalidArgumentError::new_err(msg),
        Error::Overflow { .. } => AccumulatorOverflowError::new_err(msg),
        Error::KernelUnavailable { .. } => KernelUnavailableError::new_err(msg),
        Error::NonFinite { .. } => NonFiniteError::new_err(msg),
        Error::Frame { .. } => FrameError::new_err(msg),
        Error::OutOfMemory { .. } => MemoryLimitError::new_err(msg),
    }
}

/// Adds the exception classes of [`to_py`] (but `FrameError`, which `sgq` adds) to the module.
pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    let py = m.py();
    m.add(
        "InvalidArgumentError",
        py.get_type::<InvalidArgumentError>(),
    )?;
    m.add(
        "AccumulatorOverflowError",
        py.get_type::<AccumulatorOverflowError>(),
    )?;
    m.add("NonFiniteError", py.get_type::<NonFiniteError>())?;
    m.add("MemoryLimitError", py.get_type::<MemoryLimitError>())?;
    m.add(
        "KernelUnavailableError",
        py.get_type::<KernelUnavailableError>(),
    )?;
    Ok(())
}

/// `?`-friendly conversion of core results.
pub trait CoreResultExt<T> {
    fn py(self) -> PyResult<T>;
}

impl<T> CoreResultExt<T> for edgelearn_core::Result<T> {
    fn py(self) -> PyResult<T> {
        self.map_err(to_py)
    }
}

pub fn type_error(arg: &str, msg: impl std::fmt::Display) -> PyErr {
    PyTypeError::new_err(format!("{arg}: {msg}"))
}

/// A bad argument caught by the glue (dtype aside): the same class as the core's `InvalidArgument`.
pub fn value_error(arg: &str, msg: impl std::fmt::Display) -> PyErr {
    InvalidArgumentError::new_err(format!("{arg}: {msg}"))
}
