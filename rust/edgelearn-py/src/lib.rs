//! edgelearn._native: the thin PyO3 layer over edgelearn-core. Each function validates its arguments,
//! takes zero-copy views of numpy arrays, runs the core with the GIL released and maps errors to
//! Python exceptions. No algorithm lives here.

mod arrays;
mod bn_relu;
mod depthwise;
mod errors;
mod gemm;
mod info;
mod nn;
mod octo;
mod patchskip;
mod quant;
mod sgq;

use pyo3::prelude::*;

#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("__version__", edgelearn_core::VERSION)?;
    errors::register(m)?;
    m.add_function(wrap_pyfunction!(gemm::gemm_i8, m)?)?;
    m.add_function(wrap_pyfunction!(gemm::gemm_i8_f32, m)?)?;
    info::register(m)?;
    quant::register(m)?;
    nn::register(m)?;
    bn_relu::register(m)?;
    depthwise::register(m)?;
    octo::register(m)?;
    sgq::register(m)?;
    patchskip::register(m)?;
    Ok(())
}
