//! The crate's one error type. Messages name the argument at fault and what was expected.

use thiserror::Error;

#[derive(Debug, Error, Clone, PartialEq)]
pub enum Error {
    /// An argument has a wrong shape, size, layout or value.
    #[error("{arg}: {msg}")]
    InvalidArgument { arg: &'static str, msg: String },
    /// The result could not be represented (e.g. INT32 accumulation could overflow).
    #[error("{arg}: {msg}")]
    Overflow { arg: &'static str, msg: String },
    /// A kernel was asked for that this CPU (or build) does not have.
    #[error("kernel {name:?} is not available: {msg}")]
    KernelUnavailable { name: String, msg: String },
    /// Input contained NaN or infinity where finite values are required.
    #[error("{arg}: contains non-finite values (NaN or infinity) at index {index}")]
    NonFinite { arg: &'static str, index: usize },
    /// Bytes that should be an SGQ frame are not a valid one (bad magic, version, lengths, CRC, shape…).
    #[error("malformed SGQ frame: {msg}")]
    Frame { msg: String },
    /// An allocation sized by the input is above the memory limit or the system refused it
    /// (see [`crate::alloc`]).
    #[error("{what}: {msg}")]
    OutOfMemory { what: String, msg: String },
}

pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub fn invalid(arg: &'static str, msg: impl Into<String>) -> Self {
        Error::InvalidArgument {
            arg,
            msg: msg.into(),
        }
    }
    pub fn frame(msg: impl Into<String>) -> Self {
        Error::Frame { msg: msg.into() }
    }
    pub fn overflow(arg: &'static str, msg: impl Into<String>) -> Self {
        Error::Overflow {
            arg,
            msg: msg.into(),
        }
    }
    /// The same error, naming the argument `to` where it named `from`: for operations whose operands go
    /// by other names than in the check that failed (the INT8 convolutions' `xq`, `wq` for a shape
    /// check's `x`, `w`).
    pub fn for_arg(self, from: &str, to: &'static str) -> Self {
        match self {
            Error::InvalidArgument { arg, msg } if arg == from => {
                Error::InvalidArgument { arg: to, msg }
            }
            Error::Overflow { arg, msg } if arg == from => Error::Overflow { arg: to, msg },
            Error::NonFinite { arg, index } if arg == from => Error::NonFinite { arg: to, index },
            e => e,
        }
    }
}
