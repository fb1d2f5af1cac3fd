//! Neural-network operators (`edgelearn.nn` builds autograd on these): argument checks, zero-copy views,
//! one output allocation per result, GIL released around the core call.
//!
//! Float arrays are float32 and NCHW; 4-D inputs must be C-contiguous (only `matmul_f32` reads strided
//! views). `stride`, `padding` and `kernel` take an int or a 2-tuple of ints.

use edgelearn_core::gemm::Scale;
use edgelearn_core::nn::{self, ConvShape, MatF32, Window2d};
use numpy::ndarray::{Dim, IxDyn};
use numpy::{
    Element, PyArray1, PyArray2, PyArrayDyn, PyArrayMethods, PyReadonlyArrayDyn,
    PyReadwriteArrayDyn, PyUntypedArray, PyUntypedArrayMethods,
};
use pyo3::prelude::*;
use pyo3::types::PyTuple;

use crate::arrays::{check_aligned_inplace, check_size, new_array, readonly, span, strides_2d};
use crate::errors::{type_error, value_error, CoreResultExt};

/// A read-only, C-contiguous array with its shape.
pub(crate) struct In<'py, T: Element> {
    arr: PyReadonlyArrayDyn<'py, T>,
    pub(crate) shape: Vec<usize>,
}

impl<'py, T: Element> In<'py, T> {
    pub(crate) fn new(
        arg: &str,
        obj: &Bound<'py, PyAny>,
        dtype: &str,
        ndim: Option<usize>,
    ) -> PyResult<Self> {
        let arr = readonly::<T>(arg, obj, dtype, ndim)?;
        if !arr.is_c_contiguous() {
            return Err(value_error(
                arg,
                "must be C-contiguous; pass numpy.ascontiguousarray(...)",
            ));
        }
        let shape = arr.shape().to_vec();
        Ok(In { arr, shape })
    }
    pub(crate) fn slice(&self) -> &[T] {
        // C-contiguity was checked, so this cannot fail.
        self.arr.as_slice().unwrap_or(&[])
    }
    pub(crate) fn shape4(&self) -> [usize; 4] {
        [self.shape[0], self.shape[1], self.shape[2], self.shape[3]]
    }
}

pub(crate) fn f32_4d<'py>(arg: &str, obj: &Bound<'py, PyAny>) -> PyResult<In<'py, f32>> {
    In::new(arg, obj, "float32", Some(4))
}
pub(crate) fn i8_4d<'py>(arg: &str, obj: &Bound<'py, PyAny>) -> PyResult<In<'py, i8>> {
    In::new(arg, obj, "int8", Some(4))
}

/// An optional float32 vector of exactly `n` values (`None` or Python `None` → absent).
pub(crate) fn opt_vec<'py>(
    arg: &str,
    obj: Option<&Bound<'py, PyAny>>,
    n: usize,
    what: &str,
) -> PyResult<Option<In<'py, f32>>> {
    match obj {
        None => Ok(None),
        Some(o) if o.is_none() => Ok(None),
        Some(o) => Ok(Some(vec_of(arg, o, n, what)?)),
    }
}

pub(crate) fn vec_of<'py>(
    arg: &str,
    obj: &Bound<'py, PyAny>,
    n: usize,
    what: &str,
) -> PyResult<In<'py, f32>> {
    let v = In::new(arg, obj, "float32", Some(1))?;
    if v.shape[0] != n {
        return Err(value_error(
            arg,
            format!("expected {n} values (one per {what}), got {}", v.shape[0]),
        ));
    }
    Ok(v)
}

/// An int or a 2-tuple/list of non-negative ints.
fn pair(arg: &str, obj: &Bound<'_, PyAny>) -> PyResult<(usize, usize)> {
    let as_dim = |o: &Bound<'_, PyAny>| -> PyResult<usize> {
        if o.is_instance_of::<pyo3::types::PyBool>() {
            return Err(type_error(
                arg,
                "expected an int or a pair of ints, got a bool",
            ));
        }
        let v: i64 = o
            .extract()
            .map_err(|_| type_error(arg, "expected an int or a pair of ints"))?;
        usize::try_from(v).map_err(|_| value_error(arg, format!("must be non-negative, got {v}")))
    };
    if let Ok(t) = obj.cast::<PyTuple>() {
        if t.len() != 2 {
            return Err(value_error(
                arg,
                format!(
                    "expected an int or a pair of ints, got a tuple of {}",
                    t.len()
                ),
            ));
        }
        return Ok((as_dim(&t.get_item(0)?)?, as_dim(&t.get_item(1)?)?));
    }
    if let Ok(l) = obj.cast::<pyo3::types::PyList>() {
        if l.len() != 2 {
            return Err(value_error(
                arg,
                format!(
                    "expected an int or a pair of ints, got a list of {}",
                    l.len()
                ),
            ));
        }
        return Ok((as_dim(&l.get_item(0)?)?, as_dim(&l.get_item(1)?)?));
    }
    let v = as_dim(obj)?;
    Ok((v, v))
}

/// A scale: a Python/numpy float, a 0-d array, or (if `per_index` is given) a float32 vector of that length.
pub(crate) enum ScaleArg<'py> {
    Scalar(f32),
    Vector(In<'py, f32>),
}

impl<'py> ScaleArg<'py> {
    pub(crate) fn new(
        arg: &str,
        obj: &Bound<'py, PyAny>,
        per_index: Option<(usize, &str)>,
    ) -> PyResult<Self> {
        if obj.cast::<PyUntypedArray>().is_ok() {
            let arr = readonly::<f32>(arg, obj, "float32", None)?;
            match (arr.ndim(), per_index) {
                (0, _) => {
                    return Ok(ScaleArg::Scalar(
                        arr.as_array().iter().next().copied().unwrap_or(0.0),
                    ))
                }
                (1, Some((n, what))) => return Ok(ScaleArg::Vector(vec_of(arg, obj, n, what)?)),
                (d, _) => {
                    return Err(value_error(
                        arg,
                        format!(
                            "expected a float{}, got an array with {d} dimensions",
                            if per_index.is_some() {
                                " or a 1-D float32 array"
                            } else {
                                ""
                            }
                        ),
                    ))
                }
            }
        }
        if obj.is_instance_of::<pyo3::types::PyBool>() {
            return Err(type_error(arg, "expected a float, got a bool"));
        }
        let v: f64 = obj.extract().map_err(|_| {
            type_error(
                arg,
                format!(
                    "expected a float, got {}",
                    obj.get_type()
                        .name()
                        .map(|n| n.to_string())
                        .unwrap_or_default()
                ),
            )
        })?;
        Ok(ScaleArg::Scalar(v as f32))
    }
    pub(crate) fn scale(&self) -> Scale<'_> {
        match self {
            ScaleArg::Scalar(s) => Scale::Scalar(*s),
            ScaleArg::Vector(v) => Scale::PerIndex(v.slice()),
        }
    }
    pub(crate) fn scalar(&self) -> f32 {
        match self {
            ScaleArg::Scalar(s) => *s,
            ScaleArg::Vector(_) => f32::NAN,
        }
    }
}

/// A new uninitialised C-ordered array; every caller overwrites all of it before returning it.
pub(crate) fn empty<'py, T: Element>(
    py: Python<'py>,
    arg: &str,
    dims: &[usize],
) -> PyResult<Bound<'py, PyArrayDyn<T>>> {
    new_array(py, arg, IxDyn(dims))
}

pub(crate) fn as_mut<'a, T: Element>(
    arr: &'a mut numpy::PyReadwriteArrayDyn<'_, T>,
) -> PyResult<&'a mut [T]> {
    arr.as_slice_mut().map_err(|e| value_error("output", e))
}

/// A strided 2-D float32 operand of `matmul_f32`.
struct Operand<'py> {
    arr: PyReadonlyArrayDyn<'py, f32>,
    rows: usize,
    cols: usize,
    rs: usize,
    cs: usize,
}

impl<'py> Operand<'py> {
    fn new(arg: &str, obj: &Bound<'py, PyAny>) -> PyResult<Self> {
        let arr = readonly::<f32>(arg, obj, "float32", Some(2))?;
        let shape = arr.shape().to_vec();
        let mut strides = Vec::with_capacity(2);
        for &b in arr.strides() {
            if b % 4 != 0 {
                return Err(value_error(
                    arg,
                    "has strides that are not a multiple of the item size; pass a copy",
                ));
            }
            strides.push(b / 4);
        }
        let (rs, cs) = strides_2d(arg, &shape, &strides)?;
        Ok(Operand {
            arr,
            rows: shape[0],
            cols: shape[1],
            rs,
            cs,
        })
    }
    fn view(&self) -> PyResult<MatF32<'_>> {
        // SAFETY: pointer and element strides describe a live, borrowed numpy array.
        let data = unsafe {
            span(
                self.arr.data() as *const f32,
                self.rows,
                self.cols,
                self.rs,
                self.cs,
            )
        };
        MatF32::new(data, self.rows, self.cols, self.rs, self.cs).py()
    }
}

/// `a @ b + bias[None, :]` in float32; `a` (M, K) and `b` (K, N) may be C- or F-ordered (read in place).
#[pyfunction]
#[pyo3(signature = (a, b, bias=None))]
fn matmul_f32<'py>(
    py: Python<'py>,
    a: &Bound<'py, PyAny>,
    b: &Bound<'py, PyAny>,
    bias: Option<&Bound<'py, PyAny>>,
) -> PyResult<Bound<'py, PyArray2<f32>>> {
    let (a, b) = (Operand::new("a", a)?, Operand::new("b", b)?);
    if a.cols != b.rows {
        return Err(value_error(
            "b",
            format!(
                "inner dimensions differ: a has shape ({}, {}), b has shape ({}, {}); a.shape[1] must equal b.shape[0]",
                a.rows, a.cols, b.rows, b.cols
            ),
        ));
    }
    let bias = opt_vec("bias", bias, b.cols, "column of b")?;
    check_size("result", &[a.rows, b.cols])?;
    // matmul_f32 writes every element (bias or zero first when K = 0).
    let out: Bound<'py, PyArray2<f32>> = new_array(py, "result", [a.rows, b.cols])?;
    {
        let mut rw = out.readwrite();
        let c = rw.as_slice_mut().map_err(|e| value_error("result", e))?;
        let (av, bv) = (a.view()?, b.view()?);
        let bias = bias.as_ref().map(|v| v.slice());
        py.detach(|| nn::matmul_f32(&av, &bv, bias, c)).py()?;
    }
    Ok(out)
}

fn conv_shape(
    x: [usize; 4],
    w: [usize; 4],
    stride: (usize, usize),
    padding: (usize, usize),
) -> PyResult<ConvShape> {
    ConvShape::new(x, w, stride, padding).py()
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
    let s = conv_shape(x.shape4(), w.shape4(), stride, padding)?;
    let bias = opt_vec("bias", bias, s.o, "output channel")?;
    let y = empty::<f32>(py, "y", &s.output())?;
    {
        let mut yw = y.readwrite();
        let yv = as_mut(&mut yw)?;
        let (xv, wv, bv) = (x.slice(), w.slice(), bias.as_ref().map(|b| b.slice()));
        let (xs, ws) = (x.shape4(), w.shape4());
        py.detach(|| nn::conv2d_f32_forward(xv, xs, wv, ws, bv, stride, padding, yv))
            .py()?;
    }
    Ok(y)
}

pub(crate) fn opt_pair(
    arg: &str,
    obj: Option<&Bound<'_, PyAny>>,
    default: usize,
) -> PyResult<(usize, usize)> {
    match obj {
        None => Ok((default, default)),
        Some(o) if o.is_none() => Ok((default, default)),
        Some(o) => pair(arg, o),
    }
}

pub(crate) fn dy_shape_check(arg: &str, got: &[usize], want: [usize; 4]) -> PyResult<()> {
    if got != want {
        return Err(value_error(
            arg,
            format!("expected shape {want:?} (the convolution's output), got {got:?}"),
        ));
    }
    Ok(())
}

pub(crate) type F32Out<'py> = Bound<'py, PyArrayDyn<f32>>;

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
    let s = conv_shape(x.shape4(), w.shape4(), stride, padding)?;
    dy_shape_check("dy", &dy.shape, s.output())?;
    let dx = if need_dx {
        Some(empty::<f32>(py, "dx", &x.shape)?)
    } else {
        None
    };
    let dw = empty::<f32>(py, "dw", &w.shape)?;
    let db = empty::<f32>(py, "db", &[s.o])?;
    {
        let mut dxw = dx.as_ref().map(|a| a.readwrite());
        let dxv = match dxw.as_mut() {
            Some(a) => Some(as_mut(a)?),
            None => None,
        };
        let (mut dww, mut dbw) = (dw.readwrite(), db.readwrite());
        let (dwv, dbv) = (as_mut(&mut dww)?, as_mut(&mut dbw)?);
        let (xv, wv, dyv, xs, ws) = (x.slice(), w.slice(), dy.slice(), x.shape4(), w.shape4());
        py.detach(|| nn::conv2d_f32_backward(xv, xs, wv, ws, dyv, stride, padding, dxv, dwv, dbv))
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
    let s = conv_shape(xq.shape4(), wq.shape4(), stride, padding)
        .map_err(|e| rename(e, "x", "xq", "w", "wq"))?;
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
        py.detach(|| nn::conv2d_i8_forward(xv, xs, sx, wv, ws, swv, bv, stride, padding, yv))
            .py()?;
    }
    Ok(y)
}

/// Shape errors of the INT8 ops name their arguments `xq`/`wq`, not the core's `x`/`w`.
pub(crate) fn rename(e: PyErr, from1: &str, to1: &str, from2: &str, to2: &str) -> PyErr {
    Python::attach(|py| {
        let msg = e.value(py).to_string();
        let fixed = if let Some(rest) = msg.strip_prefix(&format!("{from1}:")) {
            format!("{to1}:{rest}")
        } else if let Some(rest) = msg.strip_prefix(&format!("{from2}:")) {
            format!("{to2}:{rest}")
        } else {
            return e;
        };
        value_error_raw(fixed)
    })
}

fn value_error_raw(msg: String) -> PyErr {
    pyo3::exceptions::PyValueError::new_err(msg)
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
    let s = conv_shape(xq.shape4(), wq.shape4(), stride, padding)
        .map_err(|e| rename(e, "x", "xq", "w", "wq"))?;
    dy_shape_check("dyq", &dyq.shape, s.output())?;
    let sx = ScaleArg::new("sx", sx, None)?.scalar();
    let sdy = ScaleArg::new("sdy", sdy, None)?.scalar();
    let sw = ScaleArg::new("sw", sw, Some((s.o, "output channel")))?;
    let dx = if need_dx {
        Some(empty::<f32>(py, "dx", &xq.shape)?)
    } else {
        None
    };
    let dw = empty::<f32>(py, "dw", &wq.shape)?;
    {
        let mut dxw = dx.as_ref().map(|a| a.readwrite());
        let dxv = match dxw.as_mut() {
            Some(a) => Some(as_mut(a)?),
            None => None,
        };
        let mut dww = dw.readwrite();
        let dwv = as_mut(&mut dww)?;
        let (xv, wv, dyv, swv, xs, ws) = (
            xq.slice(),
            wq.slice(),
            dyq.slice(),
            sw.scale(),
            xq.shape4(),
            wq.shape4(),
        );
        py.detach(|| {
            nn::conv2d_i8_backward(xv, xs, sx, wv, ws, swv, dyv, sdy, stride, padding, dxv, dwv)
        })
        .py()?;
    }
    Ok((dx, dw))
}

/// A writable, C-contiguous float32 vector of `n` values, updated in place.
fn inout_vec<'py>(
    arg: &str,
    obj: &Bound<'py, PyAny>,
    n: usize,
) -> PyResult<PyReadwriteArrayDyn<'py, f32>> {
    readonly::<f32>(arg, obj, "float32", Some(1))?; // dtype/rank messages
    let arr = obj
        .cast::<PyArrayDyn<f32>>()
        .map_err(|_| type_error(arg, "expected a float32 numpy.ndarray"))?;
    if arr.len() != n {
        return Err(value_error(
            arg,
            format!("expected {n} values (one per channel), got {}", arr.len()),
        ));
    }
    check_aligned_inplace(arg, arr.as_untyped())?;
    if !arr.is_c_contiguous() {
        return Err(value_error(
            arg,
            "must be contiguous (it is updated in place)",
        ));
    }
    arr.try_readwrite().map_err(|e| {
        value_error(
            arg,
            format!("must be a writable array not aliasing another argument: {e}"),
        )
    })
}

type BnOut<'py> = (
    Bound<'py, PyArrayDyn<f32>>,
    Bound<'py, PyArray1<f32>>,
    Bound<'py, PyArray1<f32>>,
);

/// Batch norm over (N, H, W) per channel: (y, mean, invstd). Training updates running stats in place.
#[pyfunction]
#[pyo3(signature = (x, gamma, beta, running_mean, running_var, training, momentum=0.1, eps=1e-5))]
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
) -> PyResult<BnOut<'py>> {
    let x = f32_4d("x", x)?;
    let c = x.shape[1];
    let gamma = opt_vec("gamma", gamma, c, "channel")?;
    let beta = opt_vec("beta", beta, c, "channel")?;
    let mut rm = inout_vec("running_mean", running_mean, c)?;
    let mut rv = inout_vec("running_var", running_var, c)?;
    let y = empty::<f32>(py, "y", &x.shape)?;
    let mean = PyArray1::<f32>::zeros(py, Dim([c]), false);
    let invstd = PyArray1::<f32>::zeros(py, Dim([c]), false);
    {
        let (mut yw, mut mw, mut iw) = (y.readwrite(), mean.readwrite(), invstd.readwrite());
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
/// (`x = xq·x_scale`): (dx, dgamma, dbeta) without an FP32 copy of x.
#[pyfunction]
#[allow(clippy::too_many_arguments)]
fn batchnorm2d_backward_i8<'py>(
    py: Python<'py>,
    dy: &Bound<'py, PyAny>,
    xq: &Bound<'py, PyAny>,
    x_scale: f64,
    gamma: Option<&Bound<'py, PyAny>>,
    mean: &Bound<'py, PyAny>,
    invstd: &Bound<'py, PyAny>,
) -> PyResult<(F32Out<'py>, F32Out<'py>, F32Out<'py>)> {
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
    let dx = empty::<f32>(py, "dx", &xq.shape)?;
    let dgamma = empty::<f32>(py, "dgamma", &[c])?;
    let dbeta = empty::<f32>(py, "dbeta", &[c])?;
    {
        let (mut a, mut b, mut d) = (dx.readwrite(), dgamma.readwrite(), dbeta.readwrite());
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

/// `(max(x, 0), mask)` with `mask = (x > 0)` packed one bit per element (uint8, ceil(n/8) bytes, bit i%8 of
/// byte i/8, as numpy.packbits(..., bitorder="little") of the flattened array): ReLU's saved activation.
#[pyfunction]
fn relu_forward_mask<'py>(
    py: Python<'py>,
    x: &Bound<'py, PyAny>,
) -> PyResult<(Bound<'py, PyArrayDyn<f32>>, Bound<'py, PyArrayDyn<u8>>)> {
    let x = In::<f32>::new("x", x, "float32", None)?;
    let y = empty::<f32>(py, "y", &x.shape)?;
    let mask = empty::<u8>(py, "mask", &[nn::relu_mask_len(x.slice().len())])?;
    {
        let (mut yw, mut mw) = (y.readwrite(), mask.readwrite());
        let (yv, mv) = (as_mut(&mut yw)?, as_mut(&mut mw)?);
        let xv = x.slice();
        py.detach(|| nn::relu_forward_mask(xv, yv, mv)).py()?;
    }
    Ok((y, mask))
}

/// `dy` where the mask bit is set, else 0 (mask from relu_forward_mask: packed bits, uint8).
#[pyfunction]
fn relu_backward_mask<'py>(
    py: Python<'py>,
    dy: &Bound<'py, PyAny>,
    mask: &Bound<'py, PyAny>,
) -> PyResult<Bound<'py, PyArrayDyn<f32>>> {
    let dy = In::<f32>::new("dy", dy, "float32", None)?;
    let mask = In::<u8>::new("mask", mask, "uint8", Some(1))?;
    let dx = empty::<f32>(py, "dx", &dy.shape)?;
    {
        let mut w = dx.readwrite();
        let dxv = as_mut(&mut w)?;
        let (dyv, mv) = (dy.slice(), mask.slice());
        py.detach(|| nn::relu_backward_mask(dyv, mv, dxv)).py()?;
    }
    Ok(dx)
}

/// A writable, C-contiguous float32 array of any shape (or `ndim` dimensions), updated in place.
pub(crate) fn inout_arr<'py>(
    arg: &str,
    obj: &Bound<'py, PyAny>,
    ndim: Option<usize>,
) -> PyResult<PyReadwriteArrayDyn<'py, f32>> {
    readonly::<f32>(arg, obj, "float32", ndim)?; // dtype/rank messages
    let arr = obj
        .cast::<PyArrayDyn<f32>>()
        .map_err(|_| type_error(arg, "expected a float32 numpy.ndarray"))?;
    check_aligned_inplace(arg, arr.as_untyped())?;
    if !arr.is_c_contiguous() {
        return Err(value_error(
            arg,
            "must be C-contiguous (it is updated in place)",
        ));
    }
    arr.try_readwrite().map_err(|e| {
        value_error(
            arg,
            format!("must be a writable array not aliasing another argument: {e}"),
        )
    })
}

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
    let gs: Vec<&[f32]> = gr.iter().map(|g| g.slice()).collect();
    py.detach(|| {
        ps.into_iter()
            .zip(gs)
            .zip(bs)
            .try_for_each(|((p, g), b)| nn::optim::sgd_update(p, g, b, &h))
    })
    .py()
}

/// The arguments of an in-place batch norm forward, checked: `x` (N, C, H, W) and the per-channel vectors.
/// Runs `f(x, shape, gamma, beta, running_mean, running_var, mean, invstd)` with the GIL released and
/// returns the new (mean, invstd) with its result.
#[allow(clippy::too_many_arguments)]
#[allow(clippy::type_complexity)]
pub(crate) fn batchnorm_inplace_call<'py, R: Send>(
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

/// In-place batch norm: overwrites `x` with the output, returns (mean, invstd). For INT8 training, which
/// saves a quantized copy of `x` first and owns `x`.
#[pyfunction]
#[pyo3(signature = (x, gamma, beta, running_mean, running_var, training, momentum=0.1, eps=1e-5))]
#[allow(clippy::too_many_arguments)]
fn batchnorm2d_forward_<'py>(
    py: Python<'py>,
    x: &Bound<'py, PyAny>,
    gamma: Option<&Bound<'py, PyAny>>,
    beta: Option<&Bound<'py, PyAny>>,
    running_mean: &Bound<'py, PyAny>,
    running_var: &Bound<'py, PyAny>,
    training: bool,
    momentum: f64,
    eps: f64,
) -> PyResult<(Bound<'py, PyArray1<f32>>, Bound<'py, PyArray1<f32>>)> {
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
    Ok((mean, invstd))
}

/// In-place training batch norm that also returns the input's int8 codes: overwrites `x` with the
/// output, returns (mean, invstd, xq, x_scale), `xq` exactly `quantize(x, "nearest")` of the input (one
/// pass fewer over `x` than quantizing first). INT8 training saves `xq` for the backward pass.
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
)> {
    let shape = inout_arr("x", x, Some(4))?.shape().to_vec();
    let xq = empty::<i8>(py, "xq", &shape)?;
    let (mean, invstd, scale) = {
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
    Ok((mean, invstd, xq, scale))
}

/// In-place [`batchnorm2d_backward_i8`]: overwrites `dy` with dx, returns (dgamma, dbeta).
#[pyfunction]
#[allow(clippy::too_many_arguments)]
fn batchnorm2d_backward_i8_<'py>(
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

/// In-place `relu_forward_mask`: `x = max(x, 0)`; returns the packed bit mask `(x > 0)`.
#[pyfunction]
fn relu_forward_mask_<'py>(
    py: Python<'py>,
    x: &Bound<'py, PyAny>,
) -> PyResult<Bound<'py, PyArrayDyn<u8>>> {
    let mut xw = inout_arr("x", x, None)?;
    let n: usize = xw.shape().iter().product();
    let mask = empty::<u8>(py, "mask", &[nn::relu_mask_len(n)])?;
    {
        let mut mw = mask.readwrite();
        let mv = as_mut(&mut mw)?;
        let xv = as_mut(&mut xw)?;
        py.detach(|| nn::relu_forward_mask_inplace(xv, mv)).py()?;
    }
    Ok(mask)
}

/// In-place `relu_backward_mask`: `dy = 0` where the mask bit is clear.
#[pyfunction]
fn relu_backward_mask_<'py>(
    py: Python<'py>,
    dy: &Bound<'py, PyAny>,
    mask: &Bound<'py, PyAny>,
) -> PyResult<()> {
    let mask = In::<u8>::new("mask", mask, "uint8", Some(1))?;
    let mut dyw = inout_arr("dy", dy, None)?;
    let dyv = as_mut(&mut dyw)?;
    let mv = mask.slice();
    py.detach(|| nn::relu_backward_mask_inplace(dyv, mv)).py()?;
    Ok(())
}

/// `max(x, 0)` for a float32 array of any shape.
#[pyfunction]
fn relu_forward<'py>(
    py: Python<'py>,
    x: &Bound<'py, PyAny>,
) -> PyResult<Bound<'py, PyArrayDyn<f32>>> {
    let x = In::<f32>::new("x", x, "float32", None)?;
    let y = empty::<f32>(py, "y", &x.shape)?;
    {
        let mut yw = y.readwrite();
        let yv = as_mut(&mut yw)?;
        let xv = x.slice();
        py.detach(|| nn::relu_forward(xv, yv)).py()?;
    }
    Ok(y)
}

/// `dy * (y > 0)` (y is relu_forward's output).
#[pyfunction]
fn relu_backward<'py>(
    py: Python<'py>,
    dy: &Bound<'py, PyAny>,
    y: &Bound<'py, PyAny>,
) -> PyResult<Bound<'py, PyArrayDyn<f32>>> {
    let dy = In::<f32>::new("dy", dy, "float32", None)?;
    let y = In::<f32>::new("y", y, "float32", None)?;
    if dy.shape != y.shape {
        return Err(value_error(
            "y",
            format!("expected the shape of dy {:?}, got {:?}", dy.shape, y.shape),
        ));
    }
    let dx = empty::<f32>(py, "dx", &dy.shape)?;
    {
        let mut w = dx.readwrite();
        let dxv = as_mut(&mut w)?;
        let (dyv, yv) = (dy.slice(), y.slice());
        py.detach(|| nn::relu_backward(dyv, yv, dxv)).py()?;
    }
    Ok(dx)
}

fn window(
    kernel: &Bound<'_, PyAny>,
    stride: Option<&Bound<'_, PyAny>>,
    padding: Option<&Bound<'_, PyAny>>,
) -> PyResult<Window2d> {
    let k = pair("kernel", kernel)?;
    let s = match stride {
        Some(o) if !o.is_none() => pair("stride", o)?,
        _ => k, // PyTorch: stride defaults to the kernel size
    };
    Ok(Window2d::new(k, s, opt_pair("padding", padding, 0)?))
}

fn input_shape(obj: &Bound<'_, PyAny>) -> PyResult<[usize; 4]> {
    let v: Vec<i64> = obj
        .extract()
        .map_err(|_| type_error("input_shape", "expected a sequence of 4 ints (N, C, H, W)"))?;
    if v.len() != 4 || v.iter().any(|&d| d < 0) {
        return Err(value_error(
            "input_shape",
            format!("expected 4 non-negative ints (N, C, H, W), got {v:?}"),
        ));
    }
    Ok([v[0] as usize, v[1] as usize, v[2] as usize, v[3] as usize])
}

fn pool_out(shape: [usize; 4], win: Window2d) -> PyResult<[usize; 4]> {
    nn::pool2d_output_shape(shape, win).py()
}

/// Max pooling: (y, idx) with idx uint8 = offset i·kw + j of each maximum inside its window.
#[pyfunction]
#[pyo3(signature = (x, kernel, stride=None, padding=None))]
fn maxpool2d_forward<'py>(
    py: Python<'py>,
    x: &Bound<'py, PyAny>,
    kernel: &Bound<'py, PyAny>,
    stride: Option<&Bound<'py, PyAny>>,
    padding: Option<&Bound<'py, PyAny>>,
) -> PyResult<(F32Out<'py>, Bound<'py, PyArrayDyn<u8>>)> {
    let x = f32_4d("x", x)?;
    let win = window(kernel, stride, padding)?;
    let out = pool_out(x.shape4(), win)?;
    let y = empty::<f32>(py, "y", &out)?;
    let idx = empty::<u8>(py, "idx", &out)?;
    {
        let (mut a, mut b) = (y.readwrite(), idx.readwrite());
        let (yv, iv) = (as_mut(&mut a)?, as_mut(&mut b)?);
        let (xv, xs) = (x.slice(), x.shape4());
        py.detach(|| nn::maxpool2d_forward(xv, xs, win, yv, iv))
            .py()?;
    }
    Ok((y, idx))
}

/// Gradient of max pooling from dy and the forward's idx.
#[pyfunction]
#[pyo3(signature = (dy, idx, input_shape, kernel, stride=None, padding=None))]
fn maxpool2d_backward<'py>(
    py: Python<'py>,
    dy: &Bound<'py, PyAny>,
    idx: &Bound<'py, PyAny>,
    input_shape: &Bound<'py, PyAny>,
    kernel: &Bound<'py, PyAny>,
    stride: Option<&Bound<'py, PyAny>>,
    padding: Option<&Bound<'py, PyAny>>,
) -> PyResult<Bound<'py, PyArrayDyn<f32>>> {
    let dy = f32_4d("dy", dy)?;
    let idx = In::<u8>::new("idx", idx, "uint8", Some(4))?;
    let shape = self::input_shape(input_shape)?;
    let win = window(kernel, stride, padding)?;
    let out = pool_out(shape, win)?;
    dy_shape_check("dy", &dy.shape, out)?;
    dy_shape_check("idx", &idx.shape, out)?;
    let dx = empty::<f32>(py, "dx", &shape)?;
    {
        let mut w = dx.readwrite();
        let dxv = as_mut(&mut w)?;
        let (dyv, iv) = (dy.slice(), idx.slice());
        py.detach(|| nn::maxpool2d_backward(dyv, iv, shape, win, dxv))
            .py()?;
    }
    Ok(dx)
}

/// Average pooling with count_include_pad=True.
#[pyfunction]
#[pyo3(signature = (x, kernel, stride=None, padding=None))]
fn avgpool2d_forward<'py>(
    py: Python<'py>,
    x: &Bound<'py, PyAny>,
    kernel: &Bound<'py, PyAny>,
    stride: Option<&Bound<'py, PyAny>>,
    padding: Option<&Bound<'py, PyAny>>,
) -> PyResult<Bound<'py, PyArrayDyn<f32>>> {
    let x = f32_4d("x", x)?;
    let win = window(kernel, stride, padding)?;
    let y = empty::<f32>(py, "y", &pool_out(x.shape4(), win)?)?;
    {
        let mut w = y.readwrite();
        let yv = as_mut(&mut w)?;
        let (xv, xs) = (x.slice(), x.shape4());
        py.detach(|| nn::avgpool2d_forward(xv, xs, win, yv)).py()?;
    }
    Ok(y)
}

/// Gradient of average pooling.
#[pyfunction]
#[pyo3(signature = (dy, input_shape, kernel, stride=None, padding=None))]
fn avgpool2d_backward<'py>(
    py: Python<'py>,
    dy: &Bound<'py, PyAny>,
    input_shape: &Bound<'py, PyAny>,
    kernel: &Bound<'py, PyAny>,
    stride: Option<&Bound<'py, PyAny>>,
    padding: Option<&Bound<'py, PyAny>>,
) -> PyResult<Bound<'py, PyArrayDyn<f32>>> {
    let dy = f32_4d("dy", dy)?;
    let shape = self::input_shape(input_shape)?;
    let win = window(kernel, stride, padding)?;
    dy_shape_check("dy", &dy.shape, pool_out(shape, win)?)?;
    let dx = empty::<f32>(py, "dx", &shape)?;
    {
        let mut w = dx.readwrite();
        let dxv = as_mut(&mut w)?;
        let dyv = dy.slice();
        py.detach(|| nn::avgpool2d_backward(dyv, shape, win, dxv))
            .py()?;
    }
    Ok(dx)
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
    m.add_function(wrap_pyfunction!(matmul_f32, m)?)?;
    m.add_function(wrap_pyfunction!(channel_sums, m)?)?;
    m.add_function(wrap_pyfunction!(conv2d_f32_forward, m)?)?;
    m.add_function(wrap_pyfunction!(conv2d_f32_backward, m)?)?;
    m.add_function(wrap_pyfunction!(conv2d_i8_forward, m)?)?;
    m.add_function(wrap_pyfunction!(conv2d_i8_backward, m)?)?;
    m.add_function(wrap_pyfunction!(batchnorm2d_forward, m)?)?;
    m.add_function(wrap_pyfunction!(batchnorm2d_backward, m)?)?;
    m.add_function(wrap_pyfunction!(relu_forward, m)?)?;
    m.add_function(wrap_pyfunction!(relu_backward, m)?)?;
    m.add_function(wrap_pyfunction!(relu_forward_mask, m)?)?;
    m.add_function(wrap_pyfunction!(relu_backward_mask, m)?)?;
    m.add_function(wrap_pyfunction!(batchnorm2d_backward_i8, m)?)?;
    m.add_function(wrap_pyfunction!(batchnorm2d_forward_, m)?)?;
    m.add_function(wrap_pyfunction!(batchnorm2d_forward_save_i8_, m)?)?;
    m.add_function(wrap_pyfunction!(batchnorm2d_backward_i8_, m)?)?;
    m.add_function(wrap_pyfunction!(relu_forward_mask_, m)?)?;
    m.add_function(wrap_pyfunction!(relu_backward_mask_, m)?)?;
    m.add_function(wrap_pyfunction!(maxpool2d_forward, m)?)?;
    m.add_function(wrap_pyfunction!(maxpool2d_backward, m)?)?;
    m.add_function(wrap_pyfunction!(avgpool2d_forward, m)?)?;
    m.add_function(wrap_pyfunction!(avgpool2d_backward, m)?)?;
    m.add_function(wrap_pyfunction!(sgd_step, m)?)?;
    Ok(())
}
