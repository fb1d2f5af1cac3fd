//! edgelearn-core: the engine of edgelearn, in pure Rust (no PyO3).
//!
//! - [`quant`]: symmetric INT8 quantization (per tensor / per channel), rounding, range clipping.
//! - [`gemm`]: `C[i32] = A[i8]·B[i8]` with packing, per-ISA micro-kernels, run-time dispatch, threading.
//! - [`nn`]: conv (im2col + GEMM), pooling, batch norm, ReLU and FP32 GEMM, FP32 and INT8.
//! - [`octo`]: the Octo INT8 layer step (Linear/Conv2d), one function per direction.
//! - [`sgq`]: SGQ codec for split learning: channel order, groups × stripes, b-bit packing, wire frames.
//! - [`alloc`]: the limit on allocations sized by input, and fallible allocation under it.
//! - [`threads`]: the rayon pool used by every kernel (size from `EDGELEARN_NUM_THREADS`, fork-safe).
//!
//! Every public function validates its arguments and returns [`Error`] instead of panicking, so the
//! Python glue never sees a panic.
//!
//! These docs are for the package's developers: build them with
//! `cargo doc -p edgelearn-core --no-deps --document-private-items`, where the module docs' links to private
//! files and helpers resolve (hence the allow below; every other rustdoc lint stays an error under `-D warnings`).
#![allow(rustdoc::private_intra_doc_links)]

pub mod alloc;
pub mod error;
pub mod gemm;
pub mod nn;
pub mod octo;
pub mod patchskip;
pub mod quant;
pub mod sgq;
#[macro_use]
mod simd;
pub mod threads;

pub use error::{Error, Result};

/// Crate version, reported by `backend_info()`.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
