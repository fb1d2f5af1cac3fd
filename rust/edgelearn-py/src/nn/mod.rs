//! Neural-network operators (`edgelearn.nn` builds autograd on these), one file per module of
//! `edgelearn_core::nn`: argument checks, zero-copy views, one output allocation per result, GIL released
//! around the core call. The argument helpers they share live in [`crate::arrays`].
//!
//! Float arrays are float32 and NCHW; 4-D inputs must be C-contiguous (only `matmul_f32` reads strided
//! views). `stride`, `padding` and `kernel` take an int or a 2-tuple of ints. Ops that can write their
//! result over an argument take `out=`: passing that argument itself runs the in-place form.

mod activation;
mod batchnorm;
mod bn_relu;
mod conv;
mod depthwise;
mod matmul;
mod optim;
mod pool;
mod residual;

use pyo3::prelude::*;

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    matmul::register(m)?;
    conv::register(m)?;
    depthwise::register(m)?;
    batchnorm::register(m)?;
    bn_relu::register(m)?;
    activation::register(m)?;
    pool::register(m)?;
    residual::register(m)?;
    optim::register(m)?;
    Ok(())
}
