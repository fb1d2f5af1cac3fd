//! Grouped and depthwise convolution (`edgelearn_core::nn::depthwise`): argument checks, zero-copy views,
//! one allocation per result, GIL released around the core call. Same conventions as the other `nn` glue; `groups`
//! divides both channel counts, `dilation` is an int or a pair.

use edgelearn_core::nn::depthwise::{self as dw, GroupedParams, GroupedShape};
use numpy::PyArrayMethods;
use pyo3::prelude::*;

use super::conv::I8Backward;
use crate::arrays::{
    as_mut, dy_shape_check, empty, f32_4d, i8_4d, opt_pair, opt_vec, F32Out, ScaleArg,
};
use crate::errors::CoreResultExt;

fn params(
    groups: usize,
    stride: Option<&Bound<'_, PyAny>>,
    padding: Option<&Bound<'_, PyAny>>,
    dilation: Option<&Bound<'_, PyAny>>,
) -> PyResult<GroupedParams> {
    Ok(GroupedParams::new(
        groups,
        opt_pair("stride", stride, 1)?,
        opt_pair("padding", padding, 0)?,
        opt_pair("dilation", dilation, 1)?,
    ))
}

fn shape(x: [usize; 4], w: [usize; 4], p: GroupedParams) -> PyResult<GroupedShape> {
    GroupedShape::new(x, w, p).py()
}

/// [`shape`] of the INT8 ops, whose operands are `xq` and `wq`.
fn shape_i8(xq: [usize; 4], wq: [usize; 4], p: GroupedParams) -> PyResult<GroupedShape> {
    GroupedShape::new(xq, wq, p)
        .map_err(|e| e.for_arg("x", "xq").for_arg("w", "wq"))
        .py()
}

/// FP32 grouped convolution: x (N, C, H, W), w (O, C/groups, kh, kw), bias (O,) or None → y.
#[pyfunction]
#[pyo3(signature = (x, w, bias=None, stride=None, padding=None, dilation=None, groups=1))]
#[allow(clippy::too_many_arguments)]
fn conv2d_grouped_f32_forward<'py>(
    py: Python<'py>,
    x: &Bound<'py, PyAny>,
    w: &Bound<'py, PyAny>,
    bias: Option<&Bound<'py, PyAny>>,
    stride: Option<&Bound<'py, PyAny>>,
    padding: Option<&Bound<'py, PyAny>>,
    dilation: Option<&Bound<'py, PyAny>>,
    groups: usize,
) -> PyResult<F32Out<'py>> {
    let (x, w) = (f32_4d("x", x)?, f32_4d("w", w)?);
    let p = params(groups, stride, padding, dilation)?;
    let s = shape(x.shape4(), w.shape4(), p)?;
    let bias = opt_vec("bias", bias, s.o, "output channel")?;
    let y = empty::<f32>(py, "y", &s.output())?;
    {
        let mut yw = y.readwrite();
        let yv = as_mut(&mut yw)?;
        let (xv, wv, bv) = (x.slice(), w.slice(), bias.as_ref().map(|b| b.slice()));
        let (xs, ws) = (x.shape4(), w.shape4());
        py.detach(|| dw::conv2d_grouped_f32_forward(xv, xs, wv, ws, bv, p, yv))
            .py()?;
    }
    Ok(y)
}

/// Gradients of the FP32 grouped convolution: (dx or None, dw, db).
#[pyfunction]
#[pyo3(signature = (x, w, dy, stride=None, padding=None, dilation=None, groups=1, need_dx=true))]
#[allow(clippy::too_many_arguments)]
fn conv2d_grouped_f32_backward<'py>(
    py: Python<'py>,
    x: &Bound<'py, PyAny>,
    w: &Bound<'py, PyAny>,
    dy: &Bound<'py, PyAny>,
    stride: Option<&Bound<'py, PyAny>>,
    padding: Option<&Bound<'py, PyAny>>,
    dilation: Option<&Bound<'py, PyAny>>,
    groups: usize,
    need_dx: bool,
) -> PyResult<(Option<F32Out<'py>>, F32Out<'py>, F32Out<'py>)> {
    let (x, w, dy) = (f32_4d("x", x)?, f32_4d("w", w)?, f32_4d("dy", dy)?);
    let p = params(groups, stride, padding, dilation)?;
    let s = shape(x.shape4(), w.shape4(), p)?;
    dy_shape_check("dy", &dy.shape, s.output())?;
    let dx = if need_dx {
        Some(empty::<f32>(py, "dx", &x.shape)?)
    } else {
        None
    };
    let dwt = empty::<f32>(py, "dw", &w.shape)?;
    let db = empty::<f32>(py, "db", &[s.o])?;
    {
        let mut dxw = dx.as_ref().map(|a| a.readwrite());
        let dxv = match dxw.as_mut() {
            Some(a) => Some(as_mut(a)?),
            None => None,
        };
        let (mut dww, mut dbw) = (dwt.readwrite(), db.readwrite());
        let (dwv, dbv) = (as_mut(&mut dww)?, as_mut(&mut dbw)?);
        let (xv, wv, dyv, xs, ws) = (x.slice(), w.slice(), dy.slice(), x.shape4(), w.shape4());
        py.detach(|| dw::conv2d_grouped_f32_backward(xv, xs, wv, ws, dyv, p, dxv, dwv, dbv))
            .py()?;
    }
    Ok((dx, dwt, db))
}

/// INT8 grouped convolution: xq int8 with scale sx, wq int8 (O, C/groups, kh, kw) with scale sw (float or
/// float32 (O,)), bias float32 (O,) or None → y float32.
#[pyfunction]
#[pyo3(signature = (xq, sx, wq, sw, bias=None, stride=None, padding=None, dilation=None, groups=1))]
#[allow(clippy::too_many_arguments)]
fn conv2d_grouped_i8_forward<'py>(
    py: Python<'py>,
    xq: &Bound<'py, PyAny>,
    sx: &Bound<'py, PyAny>,
    wq: &Bound<'py, PyAny>,
    sw: &Bound<'py, PyAny>,
    bias: Option<&Bound<'py, PyAny>>,
    stride: Option<&Bound<'py, PyAny>>,
    padding: Option<&Bound<'py, PyAny>>,
    dilation: Option<&Bound<'py, PyAny>>,
    groups: usize,
) -> PyResult<F32Out<'py>> {
    let (xq, wq) = (i8_4d("xq", xq)?, i8_4d("wq", wq)?);
    let p = params(groups, stride, padding, dilation)?;
    let s = shape_i8(xq.shape4(), wq.shape4(), p)?;
    let sx = ScaleArg::new("sx", sx, None)?.scalar();
    let sw = ScaleArg::new("sw", sw, Some((s.o, "output channel")))?;
    let bias = opt_vec("bias", bias, s.o, "output channel")?;
    let y = empty::<f32>(py, "y", &s.output())?;
    {
        let mut yw = y.readwrite();
        let yv = as_mut(&mut yw)?;
        let (xv, wv, bv, swv) = (
            xq.slice(),
            wq.slice(),
            bias.as_ref().map(|b| b.slice()),
            sw.scale(),
        );
        let (xs, ws) = (xq.shape4(), wq.shape4());
        py.detach(|| dw::conv2d_grouped_i8_forward(xv, xs, sx, wv, ws, swv, bv, p, yv))
            .py()?;
    }
    Ok(y)
}

/// Gradients of the INT8 grouped convolution from an INT8 output gradient (dyq, sdy): (dx or None, dw).
#[pyfunction]
#[pyo3(signature = (xq, sx, wq, sw, dyq, sdy, stride=None, padding=None, dilation=None, groups=1, need_dx=true))]
#[allow(clippy::too_many_arguments)]
fn conv2d_grouped_i8_backward<'py>(
    py: Python<'py>,
    xq: &Bound<'py, PyAny>,
    sx: &Bound<'py, PyAny>,
    wq: &Bound<'py, PyAny>,
    sw: &Bound<'py, PyAny>,
    dyq: &Bound<'py, PyAny>,
    sdy: &Bound<'py, PyAny>,
    stride: Option<&Bound<'py, PyAny>>,
    padding: Option<&Bound<'py, PyAny>>,
    dilation: Option<&Bound<'py, PyAny>>,
    groups: usize,
    need_dx: bool,
) -> PyResult<(Option<F32Out<'py>>, F32Out<'py>)> {
    let (xq, wq, dyq) = (i8_4d("xq", xq)?, i8_4d("wq", wq)?, i8_4d("dyq", dyq)?);
    let p = params(groups, stride, padding, dilation)?;
    let s = shape_i8(xq.shape4(), wq.shape4(), p)?;
    let (xs, ws) = (xq.shape4(), wq.shape4());
    let codes = I8Backward::new(py, &xq, sx, &wq, sw, &dyq, sdy, s.output(), need_dx)?;
    codes.run(py, |xv, sx, wv, swv, dyv, sdy, dxv, dwv| {
        dw::conv2d_grouped_i8_backward(xv, xs, sx, wv, ws, swv, dyv, sdy, p, dxv, dwv).map(|_| ())
    })
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(conv2d_grouped_f32_forward, m)?)?;
    m.add_function(wrap_pyfunction!(conv2d_grouped_f32_backward, m)?)?;
    m.add_function(wrap_pyfunction!(conv2d_grouped_i8_forward, m)?)?;
    m.add_function(wrap_pyfunction!(conv2d_grouped_i8_backward, m)?)?;
    Ok(())
}
