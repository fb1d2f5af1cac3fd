//! Optimizer steps (`edgelearn_core::nn::optim`), in place over lists of parameters.

use edgelearn_core::nn;
use pyo3::prelude::*;

use crate::arrays::{as_mut, inout_arr, In};
use crate::errors::{value_error, CoreResultExt};

/// One SGD step over a list of parameters, in place (see `edgelearn_core::nn::optim::sgd_update`):
/// `params[i]` and `momentum_buffers[i]` (float32, C-contiguous, writable) are updated from `grads[i]`
/// (float32, C-contiguous, same size). `momentum_buffers` may be None when `momentum` is 0.
#[pyfunction]
#[pyo3(signature = (params, grads, momentum_buffers, lr, momentum, one_minus_dampening, weight_decay, nesterov))]
#[allow(clippy::too_many_arguments)]
fn sgd_step<'py>(
    py: Python<'py>,
    params: Vec<Bound<'py, PyAny>>,
    grads: Vec<Bound<'py, PyAny>>,
    momentum_buffers: Option<Vec<Bound<'py, PyAny>>>,
    lr: f32,
    momentum: f32,
    one_minus_dampening: f32,
    weight_decay: f32,
    nesterov: bool,
) -> PyResult<()> {
    if grads.len() != params.len() {
        return Err(value_error(
            "grads",
            format!("has {} arrays for {} parameters", grads.len(), params.len()),
        ));
    }
    if let Some(b) = &momentum_buffers {
        if b.len() != params.len() {
            return Err(value_error(
                "momentum_buffers",
                format!("has {} arrays for {} parameters", b.len(), params.len()),
            ));
        }
    }
    let h = nn::optim::Sgd {
        lr,
        momentum,
        one_minus_dampening,
        weight_decay,
        nesterov,
    };
    let mut pw = Vec::with_capacity(params.len());
    let mut gr = Vec::with_capacity(params.len());
    let mut bw = Vec::with_capacity(params.len());
    for (i, (p, g)) in params.iter().zip(&grads).enumerate() {
        pw.push(inout_arr(&format!("params[{i}]"), p, None)?);
        gr.push(In::<f32>::new(&format!("grads[{i}]"), g, "float32", None)?);
        if let Some(bs) = &momentum_buffers {
            bw.push(inout_arr(&format!("momentum_buffers[{i}]"), &bs[i], None)?);
        }
    }
    let mut ps = Vec::with_capacity(pw.len());
    for a in pw.iter_mut() {
        ps.push(as_mut(a)?);
    }
    let mut bs: Vec<Option<&mut [f32]>> = Vec::with_capacity(params.len());
    for a in bw.iter_mut() {
        bs.push(Some(as_mut(a)?));
    }
    bs.resize_with(ps.len(), || None);
    let items: Vec<nn::optim::SgdParam> = ps
        .into_iter()
        .zip(gr.iter().map(|g| g.slice()))
        .zip(bs)
        .map(|((p, g), buf)| nn::optim::SgdParam { p, g, buf })
        .collect();
    py.detach(|| nn::optim::sgd_update_all(items, &h)).py()
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(sgd_step, m)?)?;
    Ok(())
}
