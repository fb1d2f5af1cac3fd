//! `_sgq_encode`, `_sgq_decode`, `_sgq_frame_info`, `_sgq_channel_order`: the native halves of
//! `edgelearn.sgq`. The input array is read in place, the frame is written straight into the returned
//! `bytes` (allocated once at its exact length), decoding writes straight into the returned array; all
//! codec work runs with the GIL released. Malformed frames raise `FrameError` (a `ValueError`).

use edgelearn_core::quant::{self, Rounding};
use edgelearn_core::sgq::{self, Mode, Plan, Settings, Shape};
use numpy::{IxDyn, PyArrayDyn, PyArrayMethods, PyReadonlyArrayDyn, PyUntypedArrayMethods};
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict};

use crate::arrays::{check_size, readonly};
use crate::errors::{value_error, CoreResultExt, FrameError};

/// The 4-D shape a 2-, 3- or 4-D array is encoded as: (N,C) → N×C×1×1, (N,C,L) → N×C×L×1.
fn shape_4d(shape: &[usize]) -> PyResult<Shape> {
    match *shape {
        [n, c] => Ok(Shape { n, c, h: 1, w: 1 }),
        [n, c, l] => Ok(Shape { n, c, h: l, w: 1 }),
        [n, c, h, w] => Ok(Shape { n, c, h, w }),
        _ => Err(value_error(
            "x",
            format!("expected 2 (N,C), 3 (N,C,L) or 4 (N,C,H,W) dimensions, got shape {shape:?}"),
        )),
    }
}

fn c_slice<'a>(arr: &'a PyReadonlyArrayDyn<'_, f32>) -> PyResult<&'a [f32]> {
    if !arr.is_c_contiguous() {
        return Err(value_error(
            "x",
            "must be C-contiguous; pass numpy.ascontiguousarray(...) instead",
        ));
    }
    arr.as_slice().map_err(|e| value_error("x", e))
}

fn mode_from(name: &str) -> PyResult<Mode> {
    match name {
        "sgq" => Ok(Mode::Sgq),
        "uniform" => Ok(Mode::Uniform),
        "fp16" => Ok(Mode::Fp16),
        other => Err(value_error(
            "mode",
            format!("expected 'sgq', 'uniform' or 'fp16', got {other:?}"),
        )),
    }
}

/// Encodes a C-contiguous float32 array of 2, 3 or 4 dimensions into an SGQ frame (`bytes`).
/// `stripe_rows=0` means `max(H/4, 1)`; `order` fixes the channel order (mode sgq), `None` computes it;
/// `seed=None` with stochastic rounding draws a fresh seed.
#[pyfunction]
#[pyo3(signature = (x, mode="sgq".to_string(), bits=4, group=4, stripe_rows=0, rounding="nearest".to_string(), seed=None, order=None))]
#[allow(clippy::too_many_arguments)]
pub fn _sgq_encode<'py>(
    py: Python<'py>,
    x: &Bound<'py, PyAny>,
    mode: String,
    bits: u8,
    group: usize,
    stripe_rows: usize,
    rounding: String,
    seed: Option<u64>,
    order: Option<Vec<u32>>,
) -> PyResult<Bound<'py, PyBytes>> {
    let x = readonly::<f32>("x", x, "float32", None)?;
    let dims = x.shape().to_vec();
    let shape = shape_4d(&dims)?;
    check_size("x", &dims)?;
    let rounding = match rounding.as_str() {
        "nearest" => Rounding::Nearest,
        "stochastic" => Rounding::Stochastic {
            seed: seed.unwrap_or_else(quant::random_seed),
        },
        other => {
            return Err(value_error(
                "rounding",
                format!("expected 'nearest' or 'stochastic', got {other:?}"),
            ))
        }
    };
    let settings = Settings {
        mode: mode_from(&mode)?,
        bits,
        group,
        stripe_rows,
        rounding,
    };
    let xs = c_slice(&x)?;
    let ndim = dims.len() as u8;
    let plan = py
        .detach(|| Plan::new(xs, shape, ndim, &settings, order.as_deref()))
        .py()?;
    PyBytes::new_with(py, plan.frame_len(), |out| {
        py.detach(|| plan.write(xs, out)).py()
    })
}

/// Decodes a frame into a new float32 array of the shape it was encoded from.
#[pyfunction]
pub fn _sgq_decode<'py>(py: Python<'py>, frame: &[u8]) -> PyResult<Bound<'py, PyArrayDyn<f32>>> {
    let parsed = py.detach(|| sgq::parse(frame)).py()?;
    let shape = parsed.header.original_shape();
    // SAFETY: uninitialised output; decode_into writes every element (or fails, and it is dropped).
    let out = unsafe { PyArrayDyn::<f32>::new(py, IxDyn(&shape), false) };
    {
        let mut rw = out.readwrite();
        let os = rw.as_slice_mut().map_err(|e| value_error("out", e))?;
        py.detach(|| sgq::codec::decode_into(&parsed, os)).py()?;
    }
    Ok(out)
}

/// Validates a frame (CRC included) and returns its header fields as a dict.
#[pyfunction]
pub fn _sgq_frame_info<'py>(py: Python<'py>, frame: &[u8]) -> PyResult<Bound<'py, PyDict>> {
    let h = py.detach(|| sgq::parse(frame)).py()?.header;
    let d = PyDict::new(py);
    d.set_item("version", h.version)?;
    d.set_item("dtype", "float32")?;
    d.set_item("mode", h.mode.name())?;
    d.set_item("bits", h.bits)?;
    d.set_item("rounding", h.rounding_name())?;
    d.set_item("permutation", h.has_permutation)?;
    d.set_item("shape", pyo3::types::PyTuple::new(py, h.original_shape())?)?;
    let s = h.shape;
    d.set_item("shape_4d", (s.n, s.c, s.h, s.w))?;
    d.set_item("group", h.group)?;
    d.set_item("stripe_rows", h.stripe_rows)?;
    d.set_item("permutation_bytes", h.permutation_len)?;
    d.set_item("ranges_bytes", h.ranges_len)?;
    d.set_item("codes_bytes", h.codes_len)?;
    d.set_item("header_bytes", sgq::frame::HEADER_LEN)?;
    d.set_item("frame_bytes", h.frame_len())?;
    d.set_item("crc32", h.crc32)?;
    Ok(d)
}

/// The channel order SGQ picks for a float32 array of 2, 3 or 4 dimensions (list of channel indices).
#[pyfunction]
pub fn _sgq_channel_order(py: Python<'_>, x: &Bound<'_, PyAny>) -> PyResult<Vec<u32>> {
    let x = readonly::<f32>("x", x, "float32", None)?;
    let dims = x.shape().to_vec();
    let shape = shape_4d(&dims)?;
    check_size("x", &dims)?;
    let xs = c_slice(&x)?;
    py.detach(|| sgq::codec::channel_order(xs, shape)).py()
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("FrameError", m.py().get_type::<FrameError>())?;
    m.add_function(wrap_pyfunction!(_sgq_encode, m)?)?;
    m.add_function(wrap_pyfunction!(_sgq_decode, m)?)?;
    m.add_function(wrap_pyfunction!(_sgq_frame_info, m)?)?;
    m.add_function(wrap_pyfunction!(_sgq_channel_order, m)?)?;
    Ok(())
}
