//! Max and average pooling (`edgelearn_core::nn::pool`).

use edgelearn_core::nn::{self, Window2d};
use numpy::{PyArrayDyn, PyArrayMethods};
use pyo3::prelude::*;

use crate::arrays::{as_mut, dy_shape_check, empty, f32_4d, opt_pair, pair, F32Out, In};
use crate::errors::{type_error, value_error, CoreResultExt};

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

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(maxpool2d_forward, m)?)?;
    m.add_function(wrap_pyfunction!(maxpool2d_backward, m)?)?;
    m.add_function(wrap_pyfunction!(avgpool2d_forward, m)?)?;
    m.add_function(wrap_pyfunction!(avgpool2d_backward, m)?)?;
    Ok(())
}
