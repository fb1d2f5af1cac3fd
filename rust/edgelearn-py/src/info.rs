//! Backend introspection and settings: kernel choice, thread count, CPU features.

use edgelearn_core::{alloc, gemm, threads};
use pyo3::prelude::*;
use pyo3::types::PyDict;

use crate::errors::{type_error, value_error, CoreResultExt};

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

/// Sets the number of threads kernels use (1 or more).
///
/// For speed, set it once, before the first kernel runs (as `EDGELEARN_NUM_THREADS` or the CLI's
/// `--threads` do): the thread that calls the kernels joins the pool of the first count it runs with, for
/// life, and takes a share of every op there; after a change of the count its calls hand each op to
/// another pool and wait for it (tens of microseconds per op: a third of INT8 patch skip's speed at one
/// thread). Results do not depend on the count.
#[pyfunction]
fn set_num_threads(n: &Bound<'_, PyAny>) -> PyResult<()> {
    if n.is_instance_of::<pyo3::types::PyBool>() {
        return Err(type_error("n", "expected a positive int, got a bool"));
    }
    let v: i64 = n.extract().map_err(|_| {
        type_error(
            "n",
            format!(
                "expected a positive int, got {}",
                n.repr().map(|r| r.to_string()).unwrap_or_default()
            ),
        )
    })?;
    let n = usize::try_from(v).ok().filter(|&n| n >= 1).ok_or_else(|| {
        value_error(
            "n",
            format!("the number of threads must be at least 1, got {v}"),
        )
    })?;
    threads::set_num_threads(n).map_err(|e| match e {
        edgelearn_core::Error::InvalidArgument { msg, .. } => value_error("n", msg),
        e => crate::errors::to_py(e),
    })
}

/// Sets the largest allocation (bytes) one call may request (`None`: the automatic limit, the smaller
/// of physical memory and the address-space limit). Requests above it raise `MemoryError`.
#[pyfunction]
#[pyo3(signature = (limit))]
fn set_memory_limit(limit: Option<&Bound<'_, PyAny>>) -> PyResult<()> {
    let bytes = match limit {
        None => None,
        Some(o) if o.is_none() => None,
        Some(o) => {
            let v: i64 = o
                .extract()
                .map_err(|_| type_error("limit", "expected a positive int (bytes) or None"))?;
            Some(usize::try_from(v).ok().filter(|&b| b > 0).ok_or_else(|| {
                value_error(
                    "limit",
                    format!("must be a positive number of bytes or None, got {v}"),
                )
            })?)
        }
    };
    alloc::set_memory_limit(bytes).py()
}

/// The largest allocation (bytes) one call may request, and where the number comes from.
#[pyfunction]
fn get_memory_limit() -> (usize, &'static str) {
    alloc::memory_limit()
}

/// Number of threads kernels use.
#[pyfunction]
fn get_num_threads() -> usize {
    threads::num_threads()
}

/// Frees the kernels' per-thread scratch buffers (they keep the largest size a call needed); returns the
/// bytes given back. `edgelearn.train.fit` calls it after evaluation passes.
#[pyfunction]
fn release_scratch(py: Python<'_>) -> usize {
    py.detach(edgelearn_core::nn::release_scratch)
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(backend_info, m)?)?;
    m.add_function(wrap_pyfunction!(available_kernels, m)?)?;
    m.add_function(wrap_pyfunction!(set_kernel, m)?)?;
    m.add_function(wrap_pyfunction!(set_num_threads, m)?)?;
    m.add_function(wrap_pyfunction!(get_num_threads, m)?)?;
    m.add_function(wrap_pyfunction!(release_scratch, m)?)?;
    m.add_function(wrap_pyfunction!(set_memory_limit, m)?)?;
    m.add_function(wrap_pyfunction!(get_memory_limit, m)?)?;
    Ok(())
}
