//! 2-D convolution (`edgelearn_core::nn::conv`), FP32 and INT8, each call running the shape's
//! [`ConvPlan`]; and the per-channel sums of gradients.

use edgelearn_core::gemm::Scale;
use edgelearn_core::nn::{self, ConvPlan};
use numpy::{PyArray1, PyArrayDyn, PyArrayMethods};
use pyo3::prelude::*;

use crate::arrays::{
    as_mut, dy_shape_check, empty, f32_4d, i8_4d, opt_pair, opt_vec, F32Out, In, ScaleArg,
};
use crate::errors::{value_error, CoreResultExt};

fn conv_plan(
    x: [usize; 4],
    w: [usize; 4],
    stride: (usize, usize),
    padding: (usize, usize),
) -> PyResult<ConvPlan> {
    ConvPlan::dense(x, w, stride, padding).py()
}

/// [`conv_plan`] of the INT8 ops, whose operands are `xq` and `wq`.
fn conv_plan_i8(
    xq: [usize; 4],
    wq: [usize; 4],
    stride: (usize, usize),
    padding: (usize, usize),
) -> PyResult<ConvPlan> {
    ConvPlan::dense(xq, wq, stride, padding)
        .map_err(|e| e.for_arg("x", "xq").for_arg("w", "wq"))
        .py()
}

/// FP32 convolution: x (N, C, H, W), w (O, C, kh, kw), bias (O,) or None → y (N, O, OH, OW).
#[pyfunction]
#[pyo3(signature = (x, w, bias=None, stride=None, padding=None))]
fn conv2d_f32_forward<'py>(
    py: Python<'py>,
    x: &Bound<'py, PyAny>,
    w: &Bound<'py, PyAny>,
    bias: Option<&Bound<'py, PyAny>>,
    stride: Option<&Bound<'py, PyAny>>,
    padding: Option<&Bound<'py, PyAny>>,
) -> PyResult<Bound<'py, PyArrayDyn<f32>>> {
    let (x, w) = (f32_4d("x", x)?, f32_4d("w", w)?);
    let (stride, padding) = (
        opt_pair("stride", stride, 1)?,
        opt_pair("padding", padding, 0)?,
    );
    let plan = conv_plan(x.shape4(), w.shape4(), stride, padding)?;
    let (out, o) = (plan.output(), plan.output()[1]);
    let bias = opt_vec("bias", bias, o, "output channel")?;
    let y = empty::<f32>(py, "y", &out)?;
    {
        let mut yw = y.readwrite();
        let yv = as_mut(&mut yw)?;
        let (xv, wv, bv) = (x.slice(), w.slice(), bias.as_ref().map(|b| b.slice()));
        py.detach(|| plan.forward_f32(xv, wv, bv, yv)).py()?;
    }
    Ok(y)
}

type ConvGrads<'py> = (
    Option<Bound<'py, PyArrayDyn<f32>>>,
    Bound<'py, PyArrayDyn<f32>>,
    Bound<'py, PyArrayDyn<f32>>,
);

/// Gradients of the FP32 convolution: (dx or None, dw, db).
#[pyfunction]
#[pyo3(signature = (x, w, dy, stride=None, padding=None, need_dx=true))]
fn conv2d_f32_backward<'py>(
    py: Python<'py>,
    x: &Bound<'py, PyAny>,
    w: &Bound<'py, PyAny>,
    dy: &Bound<'py, PyAny>,
    stride: Option<&Bound<'py, PyAny>>,
    padding: Option<&Bound<'py, PyAny>>,
    need_dx: bool,
) -> PyResult<ConvGrads<'py>> {
    let (x, w, dy) = (f32_4d("x", x)?, f32_4d("w", w)?, f32_4d("dy", dy)?);
    let (stride, padding) = (
        opt_pair("stride", stride, 1)?,
        opt_pair("padding", padding, 0)?,
    );
    let plan = conv_plan(x.shape4(), w.shape4(), stride, padding)?;
    let (out, o) = (plan.output(), plan.output()[1]);
    dy_shape_check("dy", &dy.shape, out)?;
    let dx = if need_dx {
        Some(empty::<f32>(py, "dx", &x.shape)?)
    } else {
        None
    };
    let dw = empty::<f32>(py, "dw", &w.shape)?;
    let db = empty::<f32>(py, "db", &[o])?;
    {
        let mut dxw = dx.as_ref().map(|a| a.readwrite());
        let dxv = match dxw.as_mut() {
            Some(a) => Some(as_mut(a)?),
            None => None,
        };
        let (mut dww, mut dbw) = (dw.readwrite(), db.readwrite());
        let (dwv, dbv) = (as_mut(&mut dww)?, as_mut(&mut dbw)?);
        let (xv, wv, dyv) = (x.slice(), w.slice(), dy.slice());
        py.detach(|| plan.backward_f32(xv, wv, dyv, dxv, dwv, dbv))
            .py()?;
    }
    Ok((dx, dw, db))
}

/// INT8 convolution on the INT8 GEMM: xq int8 (N, C, H, W) with scale sx, wq int8 (O, C, kh, kw) with
/// scale sw (float or float32 (O,)), bias float32 (O,) or None → y float32 (N, O, OH, OW).
#[pyfunction]
#[pyo3(signature = (xq, sx, wq, sw, bias=None, stride=None, padding=None))]
#[allow(clippy::too_many_arguments)]
fn conv2d_i8_forward<'py>(
    py: Python<'py>,
    xq: &Bound<'py, PyAny>,
    sx: &Bound<'py, PyAny>,
    wq: &Bound<'py, PyAny>,
    sw: &Bound<'py, PyAny>,
    bias: Option<&Bound<'py, PyAny>>,
    stride: Option<&Bound<'py, PyAny>>,
    padding: Option<&Bound<'py, PyAny>>,
) -> PyResult<Bound<'py, PyArrayDyn<f32>>> {
    let (xq, wq) = (i8_4d("xq", xq)?, i8_4d("wq", wq)?);
    let (stride, padding) = (
        opt_pair("stride", stride, 1)?,
        opt_pair("padding", padding, 0)?,
    );
    let plan = conv_plan_i8(xq.shape4(), wq.shape4(), stride, padding)?;
    let (out, o) = (plan.output(), plan.output()[1]);
    let sx = ScaleArg::new("sx", sx, None)?.scalar();
    let sw = ScaleArg::new("sw", sw, Some((o, "output channel")))?;
    let bias = opt_vec("bias", bias, o, "output channel")?;
    let y = empty::<f32>(py, "y", &out)?;
    {
        let mut yw = y.readwrite();
        let yv = as_mut(&mut yw)?;
        let (xv, wv, bv, swv) = (
            xq.slice(),
            wq.slice(),
            bias.as_ref().map(|b| b.slice()),
            sw.scale(),
        );
        py.detach(|| plan.forward_i8(xv, sx, wv, swv, bv, yv))
            .py()?;
    }
    Ok(y)
}

/// Gradients of the INT8 convolution from an INT8 output gradient (dyq, sdy): (dx float32 or None, dw).
#[pyfunction]
#[pyo3(signature = (xq, sx, wq, sw, dyq, sdy, stride=None, padding=None, need_dx=true))]
#[allow(clippy::too_many_arguments)]
fn conv2d_i8_backward<'py>(
    py: Python<'py>,
    xq: &Bound<'py, PyAny>,
    sx: &Bound<'py, PyAny>,
    wq: &Bound<'py, PyAny>,
    sw: &Bound<'py, PyAny>,
    dyq: &Bound<'py, PyAny>,
    sdy: &Bound<'py, PyAny>,
    stride: Option<&Bound<'py, PyAny>>,
    padding: Option<&Bound<'py, PyAny>>,
    need_dx: bool,
) -> PyResult<(Option<F32Out<'py>>, F32Out<'py>)> {
    let (xq, wq, dyq) = (i8_4d("xq", xq)?, i8_4d("wq", wq)?, i8_4d("dyq", dyq)?);
    let (stride, padding) = (
        opt_pair("stride", stride, 1)?,
        opt_pair("padding", padding, 0)?,
    );
    let plan = conv_plan_i8(xq.shape4(), wq.shape4(), stride, padding)?;
    let codes = I8Backward::new(py, &xq, sx, &wq, sw, &dyq, sdy, plan.output(), need_dx)?;
    codes.run(py, |xv, sx, wv, swv, dyv, sdy, dxv, dwv| {
        plan.backward_i8(xv, sx, wv, swv, dyv, sdy, dxv, dwv)
    })
}

/// What the INT8 convolution backwards (`conv2d_i8_backward`, `conv2d_grouped_i8_backward`) share: the
/// codes and their scales checked against the convolution's output shape (`sw`: one scale, or one per
/// output channel), and `dx` (when asked for) and `dw` allocated.
pub(super) struct I8Backward<'a, 'py> {
    xq: &'a In<'py, i8>,
    wq: &'a In<'py, i8>,
    dyq: &'a In<'py, i8>,
    sx: f32,
    sdy: f32,
    sw: ScaleArg<'py>,
    dx: Option<F32Out<'py>>,
    dw: F32Out<'py>,
}

impl<'a, 'py> I8Backward<'a, 'py> {
    #[allow(clippy::too_many_arguments)]
    pub(super) fn new(
        py: Python<'py>,
        xq: &'a In<'py, i8>,
        sx: &Bound<'py, PyAny>,
        wq: &'a In<'py, i8>,
        sw: &Bound<'py, PyAny>,
        dyq: &'a In<'py, i8>,
        sdy: &Bound<'py, PyAny>,
        output: [usize; 4],
        need_dx: bool,
    ) -> PyResult<Self> {
        dy_shape_check("dyq", &dyq.shape, output)?;
        let sx = ScaleArg::new("sx", sx, None)?.scalar();
        let sdy = ScaleArg::new("sdy", sdy, None)?.scalar();
        let sw = ScaleArg::new("sw", sw, Some((output[1], "output channel")))?;
        let dx = if need_dx {
            Some(empty::<f32>(py, "dx", &xq.shape)?)
        } else {
            None
        };
        let dw = empty::<f32>(py, "dw", &wq.shape)?;
        Ok(I8Backward {
            xq,
            wq,
            dyq,
            sx,
            sdy,
            sw,
            dx,
            dw,
        })
    }

    /// Runs `call` on the views with the GIL released; returns `(dx, dw)`.
    pub(super) fn run(
        self,
        py: Python<'py>,
        call: impl FnOnce(
                &[i8],
                f32,
                &[i8],
                Scale,
                &[i8],
                f32,
                Option<&mut [f32]>,
                &mut [f32],
            ) -> edgelearn_core::Result<()>
            + Send,
    ) -> PyResult<(Option<F32Out<'py>>, F32Out<'py>)> {
        {
            let mut dxw = self.dx.as_ref().map(|a| a.readwrite());
            let dxv = match dxw.as_mut() {
                Some(a) => Some(as_mut(a)?),
                None => None,
            };
            let mut dww = self.dw.readwrite();
            let dwv = as_mut(&mut dww)?;
            let (xv, wv, dyv, swv) = (
                self.xq.slice(),
                self.wq.slice(),
                self.dyq.slice(),
                self.sw.scale(),
            );
            let (sx, sdy) = (self.sx, self.sdy);
            py.detach(|| call(xv, sx, wv, swv, dyv, sdy, dxv, dwv))
                .py()?;
        }
        Ok((self.dx, self.dw))
    }
}

/// Per-channel sums of a float32 array of shape `(N, C, ...)`: `Σ` over every axis but 1, in f64 per
/// plane (the bias gradient of the INT8 layers). Returns a float32 `(C,)` array.
#[pyfunction]
fn channel_sums<'py>(
    py: Python<'py>,
    x: &Bound<'py, PyAny>,
) -> PyResult<Bound<'py, PyArray1<f32>>> {
    let x = In::<f32>::new("x", x, "float32", None)?;
    if x.shape.len() < 2 {
        return Err(value_error(
            "x",
            &format!(
                "needs at least 2 dimensions (N, C, ...), got shape {:?}",
                x.shape
            ),
        ));
    }
    let c = x.shape[1];
    let out = PyArray1::<f32>::zeros(py, c, false);
    {
        let mut w = out.readwrite();
        let ov = w
            .as_slice_mut()
            .map_err(|_| value_error("out", "internal: not contiguous"))?;
        let (xv, shape) = (x.slice(), &x.shape);
        py.detach(|| nn::channel_sums(xv, shape, ov)).py()?;
    }
    Ok(out)
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(channel_sums, m)?)?;
    m.add_function(wrap_pyfunction!(conv2d_f32_forward, m)?)?;
    m.add_function(wrap_pyfunction!(conv2d_f32_backward, m)?)?;
    m.add_function(wrap_pyfunction!(conv2d_i8_forward, m)?)?;
    m.add_function(wrap_pyfunction!(conv2d_i8_backward, m)?)?;
    Ok(())
}
