//! 2-D batch normalisation (`edgelearn_core::nn::batchnorm`), FP32 and with an int8 saved input.

use edgelearn_core::nn;
use numpy::ndarray::Dim;
use numpy::{PyArray1, PyArrayDyn, PyArrayMethods, PyUntypedArrayMethods};
use pyo3::prelude::*;

use crate::arrays::{
    as_mut, empty, f32_4d, f32_array, i8_4d, inout_arr, inout_vec, opt_vec, out_or_new, vec_of,
    writable, F32Out,
};
use crate::errors::{value_error, CoreResultExt};
use crate::octo::ActivationRange;

type BnOut<'py> = (
    Bound<'py, PyArrayDyn<f32>>,
    Bound<'py, PyArray1<f32>>,
    Bound<'py, PyArray1<f32>>,
);

/// Batch norm over (N, H, W) per channel: (y, mean, invstd). Training updates running stats in place. The
/// output goes to `out` when given; `out=x` overwrites `x` (the caller owns it, e.g. INT8 training, which
/// saved a quantized copy of `x` first).
#[pyfunction]
#[pyo3(signature = (x, gamma, beta, running_mean, running_var, training, momentum=0.1, eps=1e-5, out=None))]
#[allow(clippy::too_many_arguments)]
fn batchnorm2d_forward<'py>(
    py: Python<'py>,
    x: &Bound<'py, PyAny>,
    gamma: Option<&Bound<'py, PyAny>>,
    beta: Option<&Bound<'py, PyAny>>,
    running_mean: &Bound<'py, PyAny>,
    running_var: &Bound<'py, PyAny>,
    training: bool,
    momentum: f64,
    eps: f64,
    out: Option<&Bound<'py, PyAny>>,
) -> PyResult<BnOut<'py>> {
    if let Some(o) = out.filter(|o| o.is(x)) {
        let (mean, invstd, ()) = batchnorm_inplace_call(
            py,
            x,
            gamma,
            beta,
            running_mean,
            running_var,
            |x, xs, g, b, rm, rv, m, i| {
                nn::batchnorm2d_forward_inplace(
                    x,
                    xs,
                    g,
                    b,
                    rm,
                    rv,
                    training,
                    momentum as f32,
                    eps as f32,
                    m,
                    i,
                )
            },
        )?;
        return Ok((f32_array("out", o)?, mean, invstd));
    }
    let x = f32_4d("x", x)?;
    let c = x.shape[1];
    let gamma = opt_vec("gamma", gamma, c, "channel")?;
    let beta = opt_vec("beta", beta, c, "channel")?;
    let mut rm = inout_vec("running_mean", running_mean, c)?;
    let mut rv = inout_vec("running_var", running_var, c)?;
    let y = out_or_new(py, out, "y", &x.shape)?;
    let mean = PyArray1::<f32>::zeros(py, Dim([c]), false);
    let invstd = PyArray1::<f32>::zeros(py, Dim([c]), false);
    {
        let (mut yw, mut mw, mut iw) = (writable("out", &y)?, mean.readwrite(), invstd.readwrite());
        let yv = as_mut(&mut yw)?;
        let mv = mw.as_slice_mut().map_err(|e| value_error("mean", e))?;
        let iv = iw.as_slice_mut().map_err(|e| value_error("invstd", e))?;
        let rmv = as_mut(&mut rm)?;
        let rvv = as_mut(&mut rv)?;
        let (xv, xs) = (x.slice(), x.shape4());
        let (gv, bv) = (
            gamma.as_ref().map(|g| g.slice()),
            beta.as_ref().map(|b| b.slice()),
        );
        py.detach(|| {
            nn::batchnorm2d_forward(
                xv,
                xs,
                gv,
                bv,
                rmv,
                rvv,
                training,
                momentum as f32,
                eps as f32,
                yv,
                mv,
                iv,
            )
        })
        .py()?;
    }
    Ok((y, mean, invstd))
}

/// Batch-norm gradients (training mode) from the forward's mean and invstd: (dx, dgamma, dbeta).
#[pyfunction]
fn batchnorm2d_backward<'py>(
    py: Python<'py>,
    dy: &Bound<'py, PyAny>,
    x: &Bound<'py, PyAny>,
    gamma: Option<&Bound<'py, PyAny>>,
    mean: &Bound<'py, PyAny>,
    invstd: &Bound<'py, PyAny>,
) -> PyResult<(F32Out<'py>, F32Out<'py>, F32Out<'py>)> {
    let (dy, x) = (f32_4d("dy", dy)?, f32_4d("x", x)?);
    if dy.shape != x.shape {
        return Err(value_error(
            "dy",
            format!("expected the shape of x {:?}, got {:?}", x.shape, dy.shape),
        ));
    }
    let c = x.shape[1];
    let gamma = opt_vec("gamma", gamma, c, "channel")?;
    let mean = vec_of("mean", mean, c, "channel")?;
    let invstd = vec_of("invstd", invstd, c, "channel")?;
    let dx = empty::<f32>(py, "dx", &x.shape)?;
    let dgamma = empty::<f32>(py, "dgamma", &[c])?;
    let dbeta = empty::<f32>(py, "dbeta", &[c])?;
    {
        let (mut a, mut b, mut d) = (dx.readwrite(), dgamma.readwrite(), dbeta.readwrite());
        let (dxv, dgv, dbv) = (as_mut(&mut a)?, as_mut(&mut b)?, as_mut(&mut d)?);
        let (dyv, xv, xs, gv, mv, iv) = (
            dy.slice(),
            x.slice(),
            x.shape4(),
            gamma.as_ref().map(|g| g.slice()),
            mean.slice(),
            invstd.slice(),
        );
        py.detach(|| nn::batchnorm2d_backward(dyv, xv, xs, gv, mv, iv, dxv, dgv, dbv))
            .py()?;
    }
    Ok((dx, dgamma, dbeta))
}

/// [`batchnorm2d_backward`] with the saved input as int8 codes `xq` and its per-tensor scale
/// (`x = xq·x_scale`): (dx, dgamma, dbeta) without an FP32 copy of x. `dx` goes to `out` when given;
/// `out=dy` overwrites `dy` (the caller owns it).
#[pyfunction]
#[pyo3(signature = (dy, xq, x_scale, gamma, mean, invstd, out=None))]
#[allow(clippy::too_many_arguments)]
fn batchnorm2d_backward_i8<'py>(
    py: Python<'py>,
    dy: &Bound<'py, PyAny>,
    xq: &Bound<'py, PyAny>,
    x_scale: f64,
    gamma: Option<&Bound<'py, PyAny>>,
    mean: &Bound<'py, PyAny>,
    invstd: &Bound<'py, PyAny>,
    out: Option<&Bound<'py, PyAny>>,
) -> PyResult<(F32Out<'py>, F32Out<'py>, F32Out<'py>)> {
    if let Some(o) = out.filter(|o| o.is(dy)) {
        let (dgamma, dbeta) = backward_i8_inplace(py, dy, xq, x_scale, gamma, mean, invstd)?;
        return Ok((f32_array("out", o)?, dgamma, dbeta));
    }
    let (dy, xq) = (f32_4d("dy", dy)?, i8_4d("xq", xq)?);
    if dy.shape != xq.shape {
        return Err(value_error(
            "dy",
            format!(
                "expected the shape of xq {:?}, got {:?}",
                xq.shape, dy.shape
            ),
        ));
    }
    let c = xq.shape[1];
    let gamma = opt_vec("gamma", gamma, c, "channel")?;
    let mean = vec_of("mean", mean, c, "channel")?;
    let invstd = vec_of("invstd", invstd, c, "channel")?;
    let dx = out_or_new(py, out, "dx", &xq.shape)?;
    let dgamma = empty::<f32>(py, "dgamma", &[c])?;
    let dbeta = empty::<f32>(py, "dbeta", &[c])?;
    {
        let (mut a, mut b, mut d) = (writable("out", &dx)?, dgamma.readwrite(), dbeta.readwrite());
        let (dxv, dgv, dbv) = (as_mut(&mut a)?, as_mut(&mut b)?, as_mut(&mut d)?);
        let (dyv, xv, xs, gv, mv, iv) = (
            dy.slice(),
            xq.slice(),
            xq.shape4(),
            gamma.as_ref().map(|g| g.slice()),
            mean.slice(),
            invstd.slice(),
        );
        let s = x_scale as f32;
        py.detach(|| nn::batchnorm2d_backward_i8(dyv, xv, s, xs, gv, mv, iv, dxv, dgv, dbv))
            .py()?;
    }
    Ok((dx, dgamma, dbeta))
}

/// The arguments of an in-place batch norm forward, checked: `x` (N, C, H, W) and the per-channel vectors.
/// Runs `f(x, shape, gamma, beta, running_mean, running_var, mean, invstd)` with the GIL released and
/// returns the new (mean, invstd) with its result.
#[allow(clippy::too_many_arguments)]
#[allow(clippy::type_complexity)]
pub(super) fn batchnorm_inplace_call<'py, R: Send>(
    py: Python<'py>,
    x: &Bound<'py, PyAny>,
    gamma: Option<&Bound<'py, PyAny>>,
    beta: Option<&Bound<'py, PyAny>>,
    running_mean: &Bound<'py, PyAny>,
    running_var: &Bound<'py, PyAny>,
    f: impl FnOnce(
            &mut [f32],
            [usize; 4],
            Option<&[f32]>,
            Option<&[f32]>,
            &mut [f32],
            &mut [f32],
            &mut [f32],
            &mut [f32],
        ) -> edgelearn_core::Result<R>
        + Send,
) -> PyResult<(Bound<'py, PyArray1<f32>>, Bound<'py, PyArray1<f32>>, R)> {
    let mut xw = inout_arr("x", x, Some(4))?;
    let shape = xw.shape().to_vec();
    let xs = [shape[0], shape[1], shape[2], shape[3]];
    let c = xs[1];
    let gamma = opt_vec("gamma", gamma, c, "channel")?;
    let beta = opt_vec("beta", beta, c, "channel")?;
    let mut rm = inout_vec("running_mean", running_mean, c)?;
    let mut rv = inout_vec("running_var", running_var, c)?;
    let mean = PyArray1::<f32>::zeros(py, Dim([c]), false);
    let invstd = PyArray1::<f32>::zeros(py, Dim([c]), false);
    let r = {
        let (mut mw, mut iw) = (mean.readwrite(), invstd.readwrite());
        let xv = as_mut(&mut xw)?;
        let mv = mw.as_slice_mut().map_err(|e| value_error("mean", e))?;
        let iv = iw.as_slice_mut().map_err(|e| value_error("invstd", e))?;
        let rmv = as_mut(&mut rm)?;
        let rvv = as_mut(&mut rv)?;
        let (gv, bv) = (
            gamma.as_ref().map(|g| g.slice()),
            beta.as_ref().map(|b| b.slice()),
        );
        py.detach(|| f(xv, xs, gv, bv, rmv, rvv, mv, iv)).py()?
    };
    Ok((mean, invstd, r))
}

/// In-place training batch norm that also returns the input's int8 codes: overwrites `x` with the
/// output, returns (mean, invstd, xq, x_scale, range), `xq` exactly `quantize(x, "nearest")` of the input
/// (one pass fewer over `x` than quantizing first). INT8 training saves `xq` for the backward pass.
/// `range`: the output's `ActivationRange` (for `octo_forward(x_range=...)`), or `None` if it has NaN or
/// an infinity.
#[pyfunction]
#[pyo3(signature = (x, gamma, beta, running_mean, running_var, momentum=0.1, eps=1e-5))]
#[allow(clippy::too_many_arguments)]
#[allow(clippy::type_complexity)]
fn batchnorm2d_forward_save_i8_<'py>(
    py: Python<'py>,
    x: &Bound<'py, PyAny>,
    gamma: Option<&Bound<'py, PyAny>>,
    beta: Option<&Bound<'py, PyAny>>,
    running_mean: &Bound<'py, PyAny>,
    running_var: &Bound<'py, PyAny>,
    momentum: f64,
    eps: f64,
) -> PyResult<(
    Bound<'py, PyArray1<f32>>,
    Bound<'py, PyArray1<f32>>,
    Bound<'py, PyArrayDyn<i8>>,
    f32,
    Option<ActivationRange>,
)> {
    let shape = inout_arr("x", x, Some(4))?.shape().to_vec();
    let xq = empty::<i8>(py, "xq", &shape)?;
    let (mean, invstd, (scale, range)) = {
        let mut qw = xq.readwrite();
        let qv = as_mut(&mut qw)?;
        batchnorm_inplace_call(
            py,
            x,
            gamma,
            beta,
            running_mean,
            running_var,
            |x, xs, g, b, rm, rv, m, i| {
                nn::batchnorm2d_forward_inplace_save_i8(
                    x,
                    xs,
                    g,
                    b,
                    rm,
                    rv,
                    momentum as f32,
                    eps as f32,
                    m,
                    i,
                    qv,
                )
            },
        )?
    };
    let range = range.map(|range| ActivationRange { range });
    Ok((mean, invstd, xq, scale, range))
}

/// [`batchnorm2d_backward_i8`] with `out=dy`: overwrites `dy` with dx, returns (dgamma, dbeta).
#[allow(clippy::too_many_arguments)]
fn backward_i8_inplace<'py>(
    py: Python<'py>,
    dy: &Bound<'py, PyAny>,
    xq: &Bound<'py, PyAny>,
    x_scale: f64,
    gamma: Option<&Bound<'py, PyAny>>,
    mean: &Bound<'py, PyAny>,
    invstd: &Bound<'py, PyAny>,
) -> PyResult<(F32Out<'py>, F32Out<'py>)> {
    let xq = i8_4d("xq", xq)?;
    let mut dyw = inout_arr("dy", dy, Some(4))?;
    if dyw.shape() != xq.shape.as_slice() {
        return Err(value_error(
            "dy",
            format!(
                "expected the shape of xq {:?}, got {:?}",
                xq.shape,
                dyw.shape()
            ),
        ));
    }
    let c = xq.shape[1];
    let gamma = opt_vec("gamma", gamma, c, "channel")?;
    let mean = vec_of("mean", mean, c, "channel")?;
    let invstd = vec_of("invstd", invstd, c, "channel")?;
    let dgamma = empty::<f32>(py, "dgamma", &[c])?;
    let dbeta = empty::<f32>(py, "dbeta", &[c])?;
    {
        let (mut b, mut d) = (dgamma.readwrite(), dbeta.readwrite());
        let (dgv, dbv) = (as_mut(&mut b)?, as_mut(&mut d)?);
        let dyv = as_mut(&mut dyw)?;
        let (xv, xs, gv, mv, iv) = (
            xq.slice(),
            xq.shape4(),
            gamma.as_ref().map(|g| g.slice()),
            mean.slice(),
            invstd.slice(),
        );
        let s = x_scale as f32;
        py.detach(|| nn::batchnorm2d_backward_i8_inplace(dyv, xv, s, xs, gv, mv, iv, dgv, dbv))
            .py()?;
    }
    Ok((dgamma, dbeta))
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(batchnorm2d_forward, m)?)?;
    m.add_function(wrap_pyfunction!(batchnorm2d_backward, m)?)?;
    m.add_function(wrap_pyfunction!(batchnorm2d_backward_i8, m)?)?;
    m.add_function(wrap_pyfunction!(batchnorm2d_forward_save_i8_, m)?)?;
    Ok(())
}
