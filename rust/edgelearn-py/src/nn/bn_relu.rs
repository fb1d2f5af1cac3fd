//! BatchNorm → ReLU (→ 2x2 max pool) of INT8 training in one call per direction (over
//! `edgelearn_core::nn::bn_relu`).

use edgelearn_core::nn::{self, ReluOut, ReluSaved};
use numpy::{PyArray1, PyArrayDyn, PyArrayMethods, PyUntypedArrayMethods};
use pyo3::prelude::*;

use super::batchnorm::batchnorm_inplace_call;
use crate::arrays::{as_mut, empty, i8_4d, inout_arr, opt_vec, vec_of, F32Out, In};
use crate::errors::{value_error, CoreResultExt};
use crate::octo::ActivationRange;

/// Training BatchNorm over `x` (in place) saving the input's int8 codes, then ReLU (`relu6`: ReLU6), then (`pool`) 2x2/stride-2
/// max pooling. Returns `(mean, invstd, xq, x_scale, saved, y)`: `saved` is the ReLU bit mask and `y` is `x`
/// itself (now `relu(bn(x))`) without pooling; with pooling `saved` is the argmax offsets and `y` a new
/// `(N, C, H/2, W/2)` array (`x` is left holding `bn(x)`). A 7th element is `y`'s `ActivationRange` (for
/// the INT8 layer that quantizes `y` next: `octo_forward(x_range=...)`), or `None` if `y` has NaN or +inf.
#[pyfunction]
#[pyo3(signature = (x, gamma, beta, running_mean, running_var, momentum, eps, pool, relu6=false))]
#[allow(clippy::too_many_arguments)]
#[allow(clippy::type_complexity)]
fn batchnorm2d_relu_forward_save_i8_<'py>(
    py: Python<'py>,
    x: &Bound<'py, PyAny>,
    gamma: Option<&Bound<'py, PyAny>>,
    beta: Option<&Bound<'py, PyAny>>,
    running_mean: &Bound<'py, PyAny>,
    running_var: &Bound<'py, PyAny>,
    momentum: f64,
    eps: f64,
    pool: bool,
    relu6: bool,
) -> PyResult<(
    Bound<'py, PyArray1<f32>>,
    Bound<'py, PyArray1<f32>>,
    Bound<'py, PyArrayDyn<i8>>,
    f32,
    Bound<'py, PyArrayDyn<u8>>,
    Bound<'py, PyAny>,
    Option<ActivationRange>,
)> {
    let shape = inout_arr("x", x, Some(4))?.shape().to_vec();
    if pool && relu6 {
        return Err(value_error("relu6", "ReLU6 is fused without pooling only"));
    }
    let xq = empty::<i8>(py, "xq", &shape)?;
    let pooled = [shape[0], shape[1], shape[2] / 2, shape[3] / 2];
    let (saved, y) = if pool {
        (
            empty::<u8>(py, "idx", &pooled)?,
            Some(empty::<f32>(py, "y", &pooled)?),
        )
    } else {
        let n: usize = shape.iter().product();
        (empty::<u8>(py, "mask", &[nn::relu_mask_len(n)])?, None)
    };
    let (mean, invstd, (scale, range)) = {
        let mut qw = xq.readwrite();
        let qv = as_mut(&mut qw)?;
        let mut sw = saved.readwrite();
        let sv = as_mut(&mut sw)?;
        let mut yw = y.as_ref().map(|y| y.readwrite());
        let out = match yw.as_mut() {
            Some(yw) => ReluOut::Pool2x2 {
                y: as_mut(yw)?,
                idx: sv,
            },
            None if relu6 => ReluOut::Relu6Mask(sv),
            None => ReluOut::Mask(sv),
        };
        batchnorm_inplace_call(
            py,
            x,
            gamma,
            beta,
            running_mean,
            running_var,
            |x, xs, g, b, rm, rv, m, i| {
                nn::batchnorm2d_relu_forward_save_i8(
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
                    out,
                )
            },
        )?
    };
    let y = match y {
        Some(y) => y.into_any(),
        None => x.clone(),
    };
    let range = range.map(|range| ActivationRange { range });
    Ok((mean, invstd, xq, scale, saved, y, range))
}

/// Backward of `batchnorm2d_relu_forward_save_i8_` from `dy` (the output's gradient) and what it saved.
/// Without pooling `dy` is overwritten with dx and returned; with pooling dx is a new array. Returns
/// `(dx, dgamma, dbeta)`.
#[pyfunction]
#[allow(clippy::too_many_arguments)]
fn batchnorm2d_relu_backward_i8_<'py>(
    py: Python<'py>,
    dy: &Bound<'py, PyAny>,
    saved: &Bound<'py, PyAny>,
    pool: bool,
    xq: &Bound<'py, PyAny>,
    x_scale: f64,
    gamma: Option<&Bound<'py, PyAny>>,
    mean: &Bound<'py, PyAny>,
    invstd: &Bound<'py, PyAny>,
) -> PyResult<(Bound<'py, PyAny>, F32Out<'py>, F32Out<'py>)> {
    let xq = i8_4d("xq", xq)?;
    let saved_arr = In::<u8>::new("saved", saved, "uint8", None)?;
    let mut dyw = inout_arr("dy", dy, Some(4))?;
    let want: Vec<usize> = if pool {
        let s = &xq.shape;
        vec![s[0], s[1], s[2] / 2, s[3] / 2]
    } else {
        xq.shape.clone()
    };
    if dyw.shape() != want.as_slice() {
        return Err(value_error(
            "dy",
            format!("expected shape {want:?}, got {:?}", dyw.shape()),
        ));
    }
    let c = xq.shape[1];
    let gamma = opt_vec("gamma", gamma, c, "channel")?;
    let mean = vec_of("mean", mean, c, "channel")?;
    let invstd = vec_of("invstd", invstd, c, "channel")?;
    let dgamma = empty::<f32>(py, "dgamma", &[c])?;
    let dbeta = empty::<f32>(py, "dbeta", &[c])?;
    let dx = if pool {
        Some(empty::<f32>(py, "dx", &xq.shape)?)
    } else {
        None
    };
    {
        let (mut b, mut d) = (dgamma.readwrite(), dbeta.readwrite());
        let (dgv, dbv) = (as_mut(&mut b)?, as_mut(&mut d)?);
        let mut dxw = dx.as_ref().map(|d| d.readwrite());
        let dxv = match dxw.as_mut() {
            Some(w) => Some(as_mut(w)?),
            None => None,
        };
        let dyv = as_mut(&mut dyw)?;
        let sv = saved_arr.slice();
        let rs = if pool {
            ReluSaved::Pool2x2(sv)
        } else {
            ReluSaved::Mask(sv)
        };
        let (xv, xs, gv, mv, iv) = (
            xq.slice(),
            xq.shape4(),
            gamma.as_ref().map(|g| g.slice()),
            mean.slice(),
            invstd.slice(),
        );
        let s = x_scale as f32;
        py.detach(|| {
            nn::batchnorm2d_relu_backward_i8(dyv, rs, xv, s, xs, gv, mv, iv, dxv, dgv, dbv)
        })
        .py()?;
    }
    let dx = match dx {
        Some(d) => d.into_any(),
        None => dy.clone(),
    };
    Ok((dx, dgamma, dbeta))
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(batchnorm2d_relu_forward_save_i8_, m)?)?;
    m.add_function(wrap_pyfunction!(batchnorm2d_relu_backward_i8_, m)?)?;
    Ok(())
}
