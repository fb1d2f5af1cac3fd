//! Mapping of core errors to Python exceptions. Bad arguments become `ValueError`/`TypeError` (or a
//! subclass), so callers can catch them the usual way; allocations above the memory limit or refused by
//! the system become `MemoryError`; nothing here panics.

use edgelearn_core::Error;
use pyo3::create_exception;
use pyo3::exceptions::{PyMemoryError, PyTypeError, PyValueError};
use pyo3::prelude::*;

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

/// Converts a core error to the Python exception for it.
pub fn to_py(e: Error) -> PyErr {
    match e {
        Error::KernelUnavailable { .. } => KernelUnavailableError::new_err(e.to_string()),
        Error::Frame { .. } => FrameError::new_err(e.to_string()),
        Error::InvalidArgument { .. } | Error::Overflow { .. } | Error::NonFinite { .. } => {
            PyValueError::new_err(e.to_string())
        }
        Error::OutOfMemory { .. } => PyMemoryError::new_err(e.to_string()),
    }
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

pub fn value_error(arg: &str, msg: impl std::fmt::Display) -> PyErr {
    PyValueError::new_err(format!("{arg}: {msg}"))
}
