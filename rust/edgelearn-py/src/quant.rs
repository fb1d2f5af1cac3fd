//! `_quantize`, `_dequantize`: the native halves of `edgelearn.quantize` / `edgelearn.dequantize`.
//!
//! The Python wrapper (`python/edgelearn/quant.py`) converts dtypes and copies non-contiguous input;
//! here every argument is still checked (the functions are callable directly), inputs are read in place,
//! outputs are allocated once, uninitialised, and filled by the core with the GIL released.

use edgelearn_core::quant::{self, Clip, Layout, Rounding};
use numpy::{IxDyn, PyArrayDyn, PyArrayMethods, PyReadonlyArrayDyn, PyUntypedArrayMethods};
use pyo3::prelude::*;

use crate::arrays::{check_size, new_array, readonly};
use crate::errors::{value_error, CoreResultExt};

/// A C-contiguous slice of a borrowed array, or an error naming `arg`.
pub(crate) fn c_slice<'a, T: numpy::Element>(
    arg: &str,
    arr: &'a PyReadonlyArrayDyn<'_, T>,
) -> PyResult<&'a [T]> {
    if arr.len() > 0 && !arr.is_c_contiguous() {
        return Err(value_error(
            arg,
            "must be C-contiguous; pass numpy.ascontiguousarray(...) instead",
        ));
    }
    arr.as_slice().map_err(|e| value_error(arg, e))
}

fn rounding_from(name: &str, seed: Option<u64>) -> PyResult<Rounding> {
    match name {
        "nearest" => Ok(Rounding::Nearest),
        "stochastic" => Ok(Rounding::Stochastic {
            seed: seed.unwrap_or_else(quant::random_seed),
        }),
        other => Err(value_error(
            "rounding",
            format!("expected 'nearest' or 'stochastic', got {other:?}"),
        )),
    }
}

pub(crate) fn clip_from(clip: Option<(String, f64)>) -> PyResult<Clip> {
    let clip = match clip {
        None => Clip::None,
        Some((mode, p)) => match mode.as_str() {
            "sigma" => Clip::Sigma { z: p },
            "minmax" => Clip::MinMax { kappa: p },
            other => {
                return Err(value_error(
                    "clip",
                    format!("unknown mode {other:?}; expected 'sigma' or 'minmax'"),
                ))
            }
        },
    };
    clip.validate().py()?;
    Ok(clip)
}

/// Quantizes a C-contiguous float32 array: returns `(q int8 same shape, scale float32 of shape () or (C,))`.
/// `rounding` is `"nearest"` or `"stochastic"` (`seed=None` draws a fresh seed; ignored for nearest);
/// `clip` is `None` or `(mode, param)` with mode `"sigma"` (param z) or `"minmax"` (param kappa).
#[pyfunction]
#[pyo3(signature = (x, per_channel_axis=None, rounding="nearest".to_string(), seed=None, clip=None))]
#[allow(clippy::type_complexity)]
pub fn _quantize<'py>(
    py: Python<'py>,
    x: &Bound<'py, PyAny>,
    per_channel_axis: Option<isize>,
    rounding: String,
    seed: Option<u64>,
    clip: Option<(String, f64)>,
) -> PyResult<(Bound<'py, PyArrayDyn<i8>>, Bound<'py, PyArrayDyn<f32>>)> {
    let x = readonly::<f32>("x", x, "float32", None)?;
    let shape = x.shape().to_vec();
    check_size("x", &shape)?;
    let layout = Layout::from_shape(&shape, per_channel_axis, "per_channel_axis").py()?;
    let rounding = rounding_from(&rounding, seed)?;
    let clip = clip_from(clip)?;
    let scale_shape: &[usize] = if per_channel_axis.is_some() {
        &[layout.channels]
    } else {
        &[]
    };
    // Uninitialised outputs; quantize_into writes every element (or fails, and they are dropped).
    let q = new_array::<i8, _>(py, "q", IxDyn(&shape))?;
    let scale = new_array::<f32, _>(py, "scale", IxDyn(scale_shape))?;
    {
        let mut q_rw = q.readwrite();
        let mut s_rw = scale.readwrite();
        let qs = q_rw.as_slice_mut().map_err(|e| value_error("q", e))?;
        let ss = s_rw.as_slice_mut().map_err(|e| value_error("scale", e))?;
        let xs = c_slice("x", &x)?;
        py.detach(|| quant::quantize_into(xs, layout, rounding, clip, qs, ss))
            .py()?;
    }
    Ok((q, scale))
}

/// `q · scale` as float32: `scale` 0-d with `axis=None`, or 1-D of length `q.shape[axis]`.
#[pyfunction]
#[pyo3(signature = (q, scale, axis=None))]
pub fn _dequantize<'py>(
    py: Python<'py>,
    q: &Bound<'py, PyAny>,
    scale: &Bound<'py, PyAny>,
    axis: Option<isize>,
) -> PyResult<Bound<'py, PyArrayDyn<f32>>> {
    let q = readonly::<i8>("q", q, "int8", None)?;
    let shape = q.shape().to_vec();
    check_size("q", &shape)?;
    let layout = Layout::from_shape(&shape, axis, "axis").py()?;
    let want_ndim = if axis.is_some() { 1 } else { 0 };
    let scale = readonly::<f32>("scale", scale, "float32", None)?;
    if scale.ndim() != want_ndim {
        let expected = if axis.is_some() {
            format!(
                "a 1-D array of {} values (one per entry of q along axis {})",
                layout.channels,
                axis.unwrap_or(0)
            )
        } else {
            "a 0-d array (per-tensor scale); pass axis=... for per-channel scales".to_string()
        };
        return Err(value_error(
            "scale",
            format!("expected {expected}, got shape {:?}", scale.shape()),
        ));
    }
    if scale.len() != layout.channels {
        return Err(value_error(
            "scale",
            format!(
                "has {} values, expected {} (q.shape[{}])",
                scale.len(),
                layout.channels,
                axis.unwrap_or(0)
            ),
        ));
    }
    // Uninitialised output; dequantize_into writes every element (or fails, and it is dropped).
    let out = new_array::<f32, _>(py, "out", IxDyn(&shape))?;
    {
        let mut out_rw = out.readwrite();
        let os = out_rw.as_slice_mut().map_err(|e| value_error("out", e))?;
        let (qs, ss) = (c_slice("q", &q)?, c_slice("scale", &scale)?);
        py.detach(|| quant::dequantize_into(qs, layout, ss, os))
            .py()?;
    }
    Ok(out)
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(_quantize, m)?)?;
    m.add_function(wrap_pyfunction!(_dequantize, m)?)?;
    Ok(())
}
