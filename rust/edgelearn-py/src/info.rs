//! Backend introspection and settings: kernel choice, thread count, CPU features.

use edgelearn_core::{gemm, threads};
use pyo3::prelude::*;
use pyo3::types::PyDict;

use crate::errors::CoreResultExt;

/// Features seen, kernel chosen, threads, version. Raises if `EDGELEARN_KERNEL` names a kernel this CPU lacks.
#[pyfunction]
fn backend_info(py: Python<'_>) -> PyResult<Bound<'_, PyDict>> {
    let d = PyDict::new(py);
    threads::env_threads_setting().py()?;
    d.set_item("version", edgelearn_core::VERSION)?;
    d.set_item("arch", std::env::consts::ARCH)?;
    d.set_item("cpu_features", gemm::cpu_features())?;
    d.set_item("kernel", gemm::active_kernel().py()?.name())?;
    d.set_item("available_kernels", available_kernels())?;
    d.set_item("threads", threads::num_threads())?;
    Ok(d)
}

/// Names of the kernels this CPU can run, best first.
#[pyfunction]
fn available_kernels() -> Vec<&'static str> {
    gemm::available_kernels().iter().map(|k| k.name()).collect()
}

/// Forces a kernel by name (`None`: automatic choice again, honouring `EDGELEARN_KERNEL`).
#[pyfunction]
#[pyo3(signature = (name=None))]
fn set_kernel(name: Option<&str>) -> PyResult<()> {
    gemm::set_kernel(name).py()
}

/// Sets the number of threads kernels use.
#[pyfunction]
fn set_num_threads(n: usize) -> PyResult<()> {
    threads::set_num_threads(n).py()
}

/// Number of threads kernels use.
#[pyfunction]
fn get_num_threads() -> usize {
    threads::num_threads()
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(backend_info, m)?)?;
    m.add_function(wrap_pyfunction!(available_kernels, m)?)?;
    m.add_function(wrap_pyfunction!(set_kernel, m)?)?;
    m.add_function(wrap_pyfunction!(set_num_threads, m)?)?;
    m.add_function(wrap_pyfunction!(get_num_threads, m)?)?;
    Ok(())
}
