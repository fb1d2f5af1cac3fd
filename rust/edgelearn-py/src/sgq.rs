//! `_sgq_encode`, `_sgq_decode`, `_sgq_frame_info`, `_sgq_channel_order`: the native halves of
//! `edgelearn.sgq`. The input array is read in place, the frame is written straight into the returned
//! `bytes` (allocated once at its exact length), decoding writes straight into the returned array; all
//! codec work runs with the GIL released. Malformed frames raise `FrameError` (a `ValueError`).

use edgelearn_core::quant::{self, Rounding};
use edgelearn_core::sgq::{self, Mode, Plan, RangeScope, Settings, Shape};
use numpy::{IxDyn, PyArrayDyn, PyArrayMethods, PyReadonlyArrayDyn, PyUntypedArrayMethods};
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict};

use crate::arrays::{check_size, new_array, readonly};
use crate::errors::{value_error, CoreResultExt, FrameError};
use crate::quant::clip_from;

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
/// `seed=None` with stochastic rounding draws a fresh seed; `ranges` is "sample" or "frame";
/// `send_order=False` leaves a non-identity order out of the frame (the receiver holds it);
/// `constant_blocks=True` gives constant blocks one code and the frame a map of them; `clip` is `None` or
/// `(mode, param)` as in `quantize(clip=...)`, applied per range block (mode sgq).
#[pyfunction]
#[pyo3(signature = (x, mode="sgq".to_string(), bits=4, group=4, stripe_rows=0, rounding="nearest".to_string(), seed=None, order=None, ranges="sample".to_string(), send_order=true, constant_blocks=false, clip=None))]
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
    ranges: String,
    send_order: bool,
    constant_blocks: bool,
    clip: Option<(String, f64)>,
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
    let ranges = match ranges.as_str() {
        "sample" => RangeScope::Sample,
        "frame" => RangeScope::Frame,
        other => {
            return Err(value_error(
                "ranges",
                format!("expected 'sample' or 'frame', got {other:?}"),
            ))
        }
    };
    let settings = Settings {
        mode: mode_from(&mode)?,
        bits,
        group,
        stripe_rows,
        rounding,
        ranges,
        constant_blocks,
        clip: clip_from(clip)?,
    };
    let xs = c_slice(&x)?;
    let ndim = dims.len() as u8;
    let mut plan = py
        .detach(|| Plan::new(xs, shape, ndim, &settings, order.as_deref()))
        .py()?;
    if !send_order {
        plan.omit_order();
    }
    PyBytes::new_with(py, plan.frame_len(), |out| {
        py.detach(|| plan.write(xs, out)).py()
    })
}

/// Decodes a frame into a new float32 array of the shape it was encoded from. `order` is the stream's
/// channel order, needed by (and only used for) frames that leave it out.
#[pyfunction]
#[pyo3(signature = (frame, order=None))]
pub fn _sgq_decode<'py>(
    py: Python<'py>,
    frame: &[u8],
    order: Option<Vec<u32>>,
) -> PyResult<Bound<'py, PyArrayDyn<f32>>> {
    let (parsed, order) = py
        .detach(|| {
            let parsed = sgq::parse(frame)?;
            let order = parsed.order(order.as_deref())?;
            Ok::<_, edgelearn_core::Error>((parsed, order))
        })
        .py()?;
    let shape = parsed.header.original_shape();
    // Uninitialised output; decode_into writes every element (or fails, and it is dropped).
    let out = new_array::<f32, _>(py, "frame", IxDyn(&shape))?;
    {
        let mut rw = out.readwrite();
        let os = rw.as_slice_mut().map_err(|e| value_error("out", e))?;
        py.detach(|| sgq::codec::decode_into(&parsed, &order, os))
            .py()?;
    }
    Ok(out)
}

/// Validates a frame (CRC included) and returns its header fields as a dict (`order_list`: the
/// permutation the frame carries, or None).
#[pyfunction]
pub fn _sgq_frame_info<'py>(py: Python<'py>, frame: &[u8]) -> PyResult<Bound<'py, PyDict>> {
    let parsed = py.detach(|| sgq::parse(frame)).py()?;
    let h = parsed.header;
    let d = PyDict::new(py);
    d.set_item("version", h.version)?;
    d.set_item("dtype", "float32")?;
    d.set_item("mode", h.mode.name())?;
    d.set_item("bits", h.bits)?;
    d.set_item("rounding", h.rounding_name())?;
    d.set_item("permutation", h.has_permutation)?;
    d.set_item("order", parsed.order_source())?;
    d.set_item("constant_map", h.constant_map)?;
    d.set_item(
        "constant_blocks",
        (0..8 * parsed.map.len())
            .filter(|&i| parsed.is_constant(i))
            .count(),
    )?;
    d.set_item("map_bytes", parsed.map.len())?;
    d.set_item(
        "order_list",
        if h.has_permutation {
            Some(parsed.order(None).py()?)
        } else {
            None
        },
    )?;
    d.set_item(
        "ranges",
        match h.mode {
            Mode::Sgq if h.frame_ranges => "frame",
            Mode::Sgq => "sample",
            Mode::Uniform => "tensor",
            Mode::Fp16 => "none",
        },
    )?;
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
