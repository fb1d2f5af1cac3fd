//! ReLU and ReLU6 (`edgelearn_core::nn::activation`): plain, and with the saved activation as a packed bit
//! mask.

use edgelearn_core::nn;
use numpy::{PyArrayDyn, PyArrayMethods, PyUntypedArrayMethods};
use pyo3::prelude::*;

use crate::arrays::{as_mut, empty, f32_array, inout_arr, out_or_new, writable, F32Out, In};
use crate::errors::{value_error, CoreResultExt};
use crate::octo::ActivationRange;
use edgelearn_core::quant::ActRange;

/// `max(x, 0)` for a float32 array of any shape.
#[pyfunction]
fn relu_forward<'py>(
    py: Python<'py>,
    x: &Bound<'py, PyAny>,
) -> PyResult<Bound<'py, PyArrayDyn<f32>>> {
    map_new(py, x, nn::relu_forward)
}

/// `dy * (y > 0)` (y is relu_forward's output).
#[pyfunction]
fn relu_backward<'py>(
    py: Python<'py>,
    dy: &Bound<'py, PyAny>,
    y: &Bound<'py, PyAny>,
) -> PyResult<Bound<'py, PyArrayDyn<f32>>> {
    grad_from_output(py, dy, y, nn::relu_backward)
}

/// `min(max(x, 0), 6)` for a float32 array of any shape (NaN stays NaN).
#[pyfunction]
fn relu6_forward<'py>(
    py: Python<'py>,
    x: &Bound<'py, PyAny>,
) -> PyResult<Bound<'py, PyArrayDyn<f32>>> {
    map_new(py, x, nn::relu6_forward)
}

/// `dy * (0 < y < 6)` (y is relu6_forward's output).
#[pyfunction]
fn relu6_backward<'py>(
    py: Python<'py>,
    dy: &Bound<'py, PyAny>,
    y: &Bound<'py, PyAny>,
) -> PyResult<Bound<'py, PyArrayDyn<f32>>> {
    grad_from_output(py, dy, y, nn::relu6_backward)
}

/// A new array `op(x)` of `x`'s shape.
fn map_new<'py>(
    py: Python<'py>,
    x: &Bound<'py, PyAny>,
    op: fn(&[f32], &mut [f32]) -> edgelearn_core::Result<()>,
) -> PyResult<Bound<'py, PyArrayDyn<f32>>> {
    let x = In::<f32>::new("x", x, "float32", None)?;
    let y = empty::<f32>(py, "y", &x.shape)?;
    {
        let mut yw = y.readwrite();
        let yv = as_mut(&mut yw)?;
        let xv = x.slice();
        py.detach(|| op(xv, yv)).py()?;
    }
    Ok(y)
}

/// A new array `dx = op(dy, y)` from an activation's output gradient and its saved output `y`.
fn grad_from_output<'py>(
    py: Python<'py>,
    dy: &Bound<'py, PyAny>,
    y: &Bound<'py, PyAny>,
    op: fn(&[f32], &[f32], &mut [f32]) -> edgelearn_core::Result<()>,
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
        py.detach(|| op(dyv, yv, dxv)).py()?;
    }
    Ok(dx)
}

/// `(max(x, 0), mask, range)` with `mask = (x > 0)` packed one bit per element (uint8, ceil(n/8) bytes, bit
/// i%8 of byte i/8, as numpy.packbits(..., bitorder="little") of the flattened array): ReLU's saved
/// activation. The output goes to `out` when given; `out=x` overwrites `x` (the caller owns it). `range`:
/// the output's `ActivationRange` (for `octo_forward(x_range=...)`), `None` if it has NaN or +inf.
#[pyfunction]
#[pyo3(signature = (x, out=None))]
fn relu_forward_mask<'py>(
    py: Python<'py>,
    x: &Bound<'py, PyAny>,
    out: Option<&Bound<'py, PyAny>>,
) -> PyResult<MaskOut<'py>> {
    clamp_forward_mask(
        py,
        x,
        out,
        nn::relu_forward_mask_inplace,
        nn::relu_forward_mask,
    )
}

/// `(min(max(x, 0), 6), mask, range)` with `mask = (0 < x < 6)` packed as for `relu_forward_mask` (ReLU6's
/// saved activation; `relu_backward_mask` applies it). `out` and `range` as for `relu_forward_mask`.
#[pyfunction]
#[pyo3(signature = (x, out=None))]
fn relu6_forward_mask<'py>(
    py: Python<'py>,
    x: &Bound<'py, PyAny>,
    out: Option<&Bound<'py, PyAny>>,
) -> PyResult<MaskOut<'py>> {
    clamp_forward_mask(
        py,
        x,
        out,
        nn::relu6_forward_mask_inplace,
        nn::relu6_forward_mask,
    )
}

type InplaceMask = fn(&mut [f32], &mut [u8]) -> edgelearn_core::Result<Option<ActRange>>;
type CopyMask = fn(&[f32], &mut [f32], &mut [u8]) -> edgelearn_core::Result<Option<ActRange>>;
/// `(y, mask, range)` of `relu_forward_mask` / `relu6_forward_mask`.
type MaskOut<'py> = (
    F32Out<'py>,
    Bound<'py, PyArrayDyn<u8>>,
    Option<ActivationRange>,
);

/// The body of `relu_forward_mask` / `relu6_forward_mask`: in place when `out` is `x`, else into `out` or
/// a new array.
fn clamp_forward_mask<'py>(
    py: Python<'py>,
    x: &Bound<'py, PyAny>,
    out: Option<&Bound<'py, PyAny>>,
    inplace: InplaceMask,
    copy: CopyMask,
) -> PyResult<MaskOut<'py>> {
    if let Some(o) = out.filter(|o| o.is(x)) {
        let mut xw = inout_arr("x", x, None)?;
        let n: usize = xw.shape().iter().product();
        let mask = empty::<u8>(py, "mask", &[nn::relu_mask_len(n)])?;
        let range = {
            let mut mw = mask.readwrite();
            let mv = as_mut(&mut mw)?;
            let xv = as_mut(&mut xw)?;
            py.detach(|| inplace(xv, mv)).py()?
        };
        return Ok((f32_array("out", o)?, mask, range.map(ActivationRange::from)));
    }
    let x = In::<f32>::new("x", x, "float32", None)?;
    let y = out_or_new(py, out, "y", &x.shape)?;
    let mask = empty::<u8>(py, "mask", &[nn::relu_mask_len(x.slice().len())])?;
    let range = {
        let (mut yw, mut mw) = (writable("out", &y)?, mask.readwrite());
        let (yv, mv) = (as_mut(&mut yw)?, as_mut(&mut mw)?);
        let xv = x.slice();
        py.detach(|| copy(xv, yv, mv)).py()?
    };
    Ok((y, mask, range.map(ActivationRange::from)))
}

/// `dy` where the mask bit is set, else 0 (mask from relu_forward_mask: packed bits, uint8). The result
/// goes to `out` when given; `out=dy` overwrites `dy` (the caller owns it).
#[pyfunction]
#[pyo3(signature = (dy, mask, out=None))]
fn relu_backward_mask<'py>(
    py: Python<'py>,
    dy: &Bound<'py, PyAny>,
    mask: &Bound<'py, PyAny>,
    out: Option<&Bound<'py, PyAny>>,
) -> PyResult<F32Out<'py>> {
    let mask = In::<u8>::new("mask", mask, "uint8", Some(1))?;
    if let Some(o) = out.filter(|o| o.is(dy)) {
        let mut dyw = inout_arr("dy", dy, None)?;
        let dyv = as_mut(&mut dyw)?;
        let mv = mask.slice();
        py.detach(|| nn::relu_backward_mask_inplace(dyv, mv)).py()?;
        return f32_array("out", o);
    }
    let dy = In::<f32>::new("dy", dy, "float32", None)?;
    let dx = out_or_new(py, out, "dx", &dy.shape)?;
    {
        let mut w = writable("out", &dx)?;
        let dxv = as_mut(&mut w)?;
        let (dyv, mv) = (dy.slice(), mask.slice());
        py.detach(|| nn::relu_backward_mask(dyv, mv, dxv)).py()?;
    }
    Ok(dx)
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(relu_forward, m)?)?;
    m.add_function(wrap_pyfunction!(relu_backward, m)?)?;
    m.add_function(wrap_pyfunction!(relu6_forward, m)?)?;
    m.add_function(wrap_pyfunction!(relu6_backward, m)?)?;
    m.add_function(wrap_pyfunction!(relu_forward_mask, m)?)?;
    m.add_function(wrap_pyfunction!(relu6_forward_mask, m)?)?;
    m.add_function(wrap_pyfunction!(relu_backward_mask, m)?)?;
    Ok(())
}
