//! The Octo INT8 layer step: one call per direction (`octo_forward`, `octo_backward`) over
//! `edgelearn_core::octo`, with the state between them in an opaque `OctoSaved` object (int8 codes and
//! scales, owned by Rust; Python only keeps it alive until backward). With `defer_dw`, backward returns
//! `dW` as a `DeferredGrad` computed on another thread of the pool (`threads::defer`); its `wait()` gives
//! the array.

use edgelearn_core::nn::depthwise::GroupedParams;
use std::sync::{Arc, Mutex};

use edgelearn_core::octo::{self, Compensation, Config, Grads, Layer, RoundMode, Saved};
use edgelearn_core::quant::ActRange;
use edgelearn_core::threads::{self, Deferred};
use numpy::{
    IxDyn, PyArray1, PyArrayDyn, PyArrayMethods, PyReadonlyArrayDyn, PyUntypedArrayMethods,
};
use pyo3::prelude::*;

use crate::arrays::{check_size, readonly};
use crate::errors::{value_error, CoreResultExt};
use crate::quant::{c_slice, clip_from};

/// What `octo_forward` saved for `octo_backward`: the int8 input and weight codes and their scales.
#[pyclass(module = "edgelearn._native", frozen)]
pub struct OctoSaved {
    // shared with a deferred dW job, which may outlive this object
    saved: Arc<Saved>,
}

/// The range of an activation (its largest magnitude), made by the op that wrote it and handed to the INT8
/// layer that quantizes it (`octo_forward(x_range=...)`), which then skips its statistics pass over X.
/// Only the core's producers make one (no constructor): it holds the address and length of the array it
/// was taken from, and `octo_forward` rejects it for any other array.
#[pyclass(module = "edgelearn._native", frozen)]
pub struct ActivationRange {
    pub(crate) range: ActRange,
}

impl From<ActRange> for ActivationRange {
    fn from(range: ActRange) -> Self {
        ActivationRange { range }
    }
}

#[pymethods]
impl ActivationRange {
    /// The largest magnitude of the activation's values.
    #[getter]
    fn amax(&self) -> f32 {
        self.range.amax()
    }

    fn __repr__(&self) -> String {
        format!("ActivationRange(amax={})", self.range.amax())
    }
}

/// A weight gradient being computed on another thread (`octo_backward(defer_dw=True)`).
#[pyclass(module = "edgelearn._native", frozen)]
pub struct DeferredGrad {
    job: Mutex<Option<Deferred<Vec<f32>>>>,
    shape: Vec<usize>,
}

#[pymethods]
impl DeferredGrad {
    /// The gradient's shape.
    #[getter]
    fn shape(&self) -> Vec<usize> {
        self.shape.clone()
    }
    /// Whether the gradient is computed (`wait` returns at once).
    fn done(&self) -> bool {
        let job = self.job.lock().unwrap_or_else(|e| e.into_inner());
        job.as_ref().is_none_or(|j| j.is_done())
    }
    /// The gradient, a new float32 array: waits for the thread computing it (or computes it here if no
    /// thread has started). Once only.
    fn wait<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyArrayDyn<f32>>> {
        let job = self.job.lock().unwrap_or_else(|e| e.into_inner()).take();
        let Some(job) = job else {
            return Err(value_error("wait", "this gradient was already taken"));
        };
        let v = py.detach(|| job.wait()).py()?;
        PyArray1::from_vec(py, v).reshape(IxDyn(&self.shape))
    }
    fn __repr__(&self) -> String {
        format!("DeferredGrad(shape {:?}, done {})", self.shape, self.done())
    }
}

#[pymethods]
impl OctoSaved {
    /// Bytes held between forward and backward (int8 codes and scales).
    #[getter]
    fn nbytes(&self) -> usize {
        self.saved.nbytes()
    }
    /// Shape of the layer input.
    #[getter]
    fn input_shape(&self) -> Vec<usize> {
        self.saved.x_shape.clone()
    }
    /// `(xq, sx)`: a copy of the saved int8 input codes and their scale.
    fn input_codes<'py>(&self, py: Python<'py>) -> PyResult<(Bound<'py, PyArrayDyn<i8>>, f32)> {
        let a = PyArrayDyn::<i8>::zeros(py, IxDyn(&self.saved.x_shape), false);
        a.readwrite()
            .as_slice_mut()
            .map_err(|e| value_error("xq", e))?
            .copy_from_slice(&self.saved.xq);
        Ok((a, self.saved.sx))
    }
    fn __repr__(&self) -> String {
        format!(
            "OctoSaved({:?}, input {:?}, {} bytes)",
            self.saved.layer,
            self.saved.x_shape,
            self.saved.nbytes()
        )
    }
}

fn round_mode(arg: &str, name: &str) -> PyResult<RoundMode> {
    match name {
        "nearest" => Ok(RoundMode::Nearest),
        "stochastic" => Ok(RoundMode::Stochastic),
        other => Err(value_error(
            arg,
            format!("expected 'nearest' or 'stochastic', got {other:?}"),
        )),
    }
}

fn f32_c<'py>(arg: &str, obj: &Bound<'py, PyAny>) -> PyResult<PyReadonlyArrayDyn<'py, f32>> {
    let a = readonly::<f32>(arg, obj, "float32", None)?;
    c_slice(arg, &a)?;
    Ok(a)
}

fn uninit<'py>(
    py: Python<'py>,
    arg: &str,
    dims: &[usize],
) -> PyResult<Bound<'py, PyArrayDyn<f32>>> {
    check_size(arg, dims)?;
    // SAFETY: the core writes every element before Python sees the array (or fails and it is dropped).
    Ok(unsafe { PyArrayDyn::<f32>::new(py, IxDyn(dims), false) })
}

/// Forward of an INT8 Linear (`stride=None`: x (N, K), w (O, K)) or Conv2d (`stride`/`padding` pairs:
/// x (N, C, H, W), w (O, C, kh, kw)). `compensation` is `None` or `(alpha, mu, beta)`, each (O,).
/// `prc` is `None` or `(mode, param)` as in `quantize(clip=...)`. `x_range`: the `ActivationRange` the op
/// that wrote `x` returned (the same codes, without a statistics pass over `x`; a range of another array is
/// a ValueError). Returns `(y, OctoSaved)`.
#[pyfunction]
#[pyo3(signature = (x, w, bias, compensation, stride, padding, act_rounding, weight_rounding, grad_rounding,
                    prc, per_channel_weights, seed, training, dilation=None, groups=1, x_range=None))]
#[allow(clippy::too_many_arguments)]
pub fn octo_forward<'py>(
    py: Python<'py>,
    x: &Bound<'py, PyAny>,
    w: &Bound<'py, PyAny>,
    bias: Option<&Bound<'py, PyAny>>,
    compensation: Option<(Bound<'py, PyAny>, Bound<'py, PyAny>, Bound<'py, PyAny>)>,
    stride: Option<(usize, usize)>,
    padding: Option<(usize, usize)>,
    act_rounding: &str,
    weight_rounding: &str,
    grad_rounding: &str,
    prc: Option<(String, f64)>,
    per_channel_weights: bool,
    seed: u64,
    training: bool,
    dilation: Option<(usize, usize)>,
    groups: usize,
    x_range: Option<PyRef<'py, ActivationRange>>,
) -> PyResult<(Bound<'py, PyArrayDyn<f32>>, OctoSaved)> {
    let x_range = x_range.map(|r| r.range);
    let config = Config {
        act_rounding: round_mode("act_rounding", act_rounding)?,
        weight_rounding: round_mode("weight_rounding", weight_rounding)?,
        grad_rounding: round_mode("grad_rounding", grad_rounding)?,
        prc: clip_from(prc)?,
        per_channel_weights,
    };
    let dilation = dilation.unwrap_or((1, 1));
    let layer = match stride {
        None => Layer::Linear,
        Some(stride) if groups != 1 || dilation != (1, 1) => Layer::GroupedConv2d(
            GroupedParams::new(groups, stride, padding.unwrap_or((0, 0)), dilation),
        ),
        Some(stride) => Layer::Conv2d {
            stride,
            padding: padding.unwrap_or((0, 0)),
        },
    };
    let (x, w) = (f32_c("x", x)?, f32_c("w", w)?);
    let bias = match bias {
        Some(b) if !b.is_none() => Some(f32_c("bias", b)?),
        _ => None,
    };
    let comp = match &compensation {
        Some((a, m, b)) => Some((f32_c("alpha", a)?, f32_c("mu", m)?, f32_c("beta", b)?)),
        None => None,
    };
    let (xs, ws) = (x.shape().to_vec(), w.shape().to_vec());
    let y_shape = octo::output_shape(layer, &xs, &ws).py()?;
    let y = uninit(py, "y", &y_shape)?;
    let saved = {
        let mut yw = y.readwrite();
        let yv = yw.as_slice_mut().map_err(|e| value_error("y", e))?;
        let (xv, wv) = (c_slice("x", &x)?, c_slice("w", &w)?);
        let bv = match &bias {
            Some(b) => Some(c_slice("bias", b)?),
            None => None,
        };
        let cv = match &comp {
            Some((a, m, b)) => Some(Compensation {
                alpha: c_slice("alpha", a)?,
                mu: c_slice("mu", m)?,
                beta: c_slice("beta", b)?,
            }),
            None => None,
        };
        py.detach(|| {
            octo::forward(
                layer,
                config,
                xv,
                &xs,
                wv,
                &ws,
                bv,
                cv,
                seed,
                training,
                x_range.as_ref(),
                yv,
            )
        })
        .py()?
    };
    Ok((
        y,
        OctoSaved {
            saved: Arc::new(saved),
        },
    ))
}

type Opt<'py> = Option<Bound<'py, PyArrayDyn<f32>>>;

/// Backward of `octo_forward` from the float32 output gradient `dy`: `(dx, dw, db, dalpha, dmu, dbeta)`,
/// each `None` unless asked for (`need_comp` needs a Compensation fused in forward). With `defer_dw`
/// (and `need_dw`) `dw` is a `DeferredGrad`: computed on another thread of the pool while the caller goes
/// on (with one thread, here before returning); the same values either way. A grouped convolution computes
/// `dW` with `dX` anyway, so it returns `dw` as an array even with `defer_dw`.
#[pyfunction]
#[pyo3(signature = (saved, dy, need_dx=true, need_dw=true, need_db=true, need_comp=false, defer_dw=false))]
#[allow(clippy::type_complexity, clippy::too_many_arguments)]
pub fn octo_backward<'py>(
    py: Python<'py>,
    saved: &Bound<'py, OctoSaved>,
    dy: &Bound<'py, PyAny>,
    need_dx: bool,
    need_dw: bool,
    need_db: bool,
    need_comp: bool,
    defer_dw: bool,
) -> PyResult<(
    Opt<'py>,
    Option<Bound<'py, PyAny>>,
    Opt<'py>,
    Opt<'py>,
    Opt<'py>,
    Opt<'py>,
)> {
    let st = &saved.get().saved;
    // a grouped layer computes dW with dX anyway: deferring would compute it twice
    let defer_dw = defer_dw && need_dw && st.splits_dw_for_free();
    let dy = f32_c("dy", dy)?;
    if dy.shape() != st.y_shape.as_slice() {
        return Err(value_error(
            "dy",
            format!(
                "expected shape {:?} (the layer output), got {:?}",
                st.y_shape,
                dy.shape()
            ),
        ));
    }
    if need_comp && !st.has_compensation() {
        return Err(value_error(
            "need_comp",
            "no Compensation was fused in this layer's forward",
        ));
    }
    let o = [st.out_channels()];
    let alloc = |need: bool, dims: &[usize], arg: &str| -> PyResult<Opt<'py>> {
        need.then(|| uninit(py, arg, dims)).transpose()
    };
    let dx = alloc(need_dx, &st.x_shape, "dx")?;
    let dw = alloc(need_dw && !defer_dw, &st.w_shape, "dw")?;
    let db = alloc(need_db, &o, "db")?;
    let da = alloc(need_comp, &o, "dalpha")?;
    let dm = alloc(need_comp, &o, "dmu")?;
    let dbt = alloc(need_comp, &o, "dbeta")?;
    {
        let mut ws: Vec<Option<numpy::PyReadwriteArrayDyn<'py, f32>>> =
            [&dx, &dw, &db, &da, &dm, &dbt]
                .iter()
                .map(|a| a.as_ref().map(|a| a.readwrite()))
                .collect();
        let mut sl: Vec<Option<&mut [f32]>> = Vec::with_capacity(6);
        for a in ws.iter_mut() {
            sl.push(match a {
                Some(a) => Some(a.as_slice_mut().map_err(|e| value_error("output", e))?),
                None => None,
            });
        }
        let mut it = sl.into_iter();
        let (gx, gw, gb) = (
            it.next().flatten(),
            it.next().flatten(),
            it.next().flatten(),
        );
        let comp = match (
            it.next().flatten(),
            it.next().flatten(),
            it.next().flatten(),
        ) {
            (Some(a), Some(m), Some(b)) => Some((a, m, b)),
            _ => None,
        };
        let dyv = c_slice("dy", &dy)?;
        let grads = Grads {
            dx: gx,
            dw: gw,
            db: gb,
            comp,
        };
        if !defer_dw {
            py.detach(|| octo::backward(st, dyv, grads)).py()?;
        } else {
            let job = py
                .detach(|| {
                    let codes = octo::backward_input(st, dyv, grads)?;
                    let saved = Arc::clone(st);
                    Ok(threads::defer(move || {
                        let mut dw = vec![0f32; saved.wq.len()];
                        octo::weight_grad(&saved, &codes, &mut dw)?;
                        Ok(dw)
                    }))
                })
                .py()?;
            let grad = DeferredGrad {
                job: Mutex::new(Some(job)),
                shape: st.w_shape.clone(),
            };
            let dw = Bound::new(py, grad)?.into_any();
            return Ok((dx, Some(dw), db, da, dm, dbt));
        }
    }
    Ok((dx, dw.map(Bound::into_any), db, da, dm, dbt))
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<OctoSaved>()?;
    m.add_class::<DeferredGrad>()?;
    m.add_class::<ActivationRange>()?;
    m.add_function(wrap_pyfunction!(octo_forward, m)?)?;
    m.add_function(wrap_pyfunction!(octo_backward, m)?)?;
    Ok(())
}
