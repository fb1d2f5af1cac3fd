//! `edgelearn._native.PatchSkip`: the patch-skip video runner of `edgelearn_core::patchskip`. Layers are
//! added one by one (`add_conv`, `add_batchnorm`, ...), then `run(frame)` takes float32 `(C, H, W)`
//! frames; `edgelearn.video.PatchSkipRunner` builds it from a `Sequential`.

use edgelearn_core::nn::Window2d;
use edgelearn_core::patchskip::{Int8Scales, Layer, PatchSkip as Core, PatchSkipConfig, U8Input};
use numpy::ndarray::Dim;
use numpy::{PyArray, PyArrayMethods, PyUntypedArrayMethods};
use pyo3::prelude::*;
use pyo3::types::PyDict;

use crate::arrays::readonly;
use crate::errors::{value_error, CoreResultExt};

fn vec_f32(arg: &str, obj: &Bound<'_, PyAny>, ndim: usize) -> PyResult<(Vec<f32>, Vec<usize>)> {
    let a = readonly::<f32>(arg, obj, "float32", Some(ndim))?;
    let shape = a.shape().to_vec();
    Ok((a.as_array().iter().copied().collect(), shape))
}

/// Patch-skip inference over a stream of frames (see `edgelearn.video.PatchSkipRunner`).
#[pyclass(module = "edgelearn._native")]
pub struct PatchSkip {
    cfg: PatchSkipConfig,
    layers: Vec<Layer>,
    core: Option<Core>,
}

impl PatchSkip {
    fn push(&mut self, l: Layer) -> PyResult<()> {
        if self.core.is_some() {
            return Err(value_error(
                "layers",
                "cannot add layers after the first frame",
            ));
        }
        self.layers.push(l);
        Ok(())
    }
}

#[pymethods]
impl PatchSkip {
    #[new]
    #[pyo3(signature = (patch=16, threshold=0.0, refresh_every=0, tile=1, error_bound=0.0, int8_scales="frozen", dense_above=0.85))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        patch: usize,
        threshold: f32,
        refresh_every: usize,
        tile: usize,
        error_bound: f32,
        int8_scales: &str,
        dense_above: f32,
    ) -> PyResult<Self> {
        let int8_scales = match int8_scales {
            "frozen" => Int8Scales::Frozen,
            "dynamic" => Int8Scales::Dynamic,
            other => {
                return Err(value_error(
                    "int8_scales",
                    format!("expected 'frozen' or 'dynamic', got {other:?}"),
                ))
            }
        };
        let cfg = PatchSkipConfig {
            patch,
            threshold,
            refresh_every,
            tile,
            error_bound,
            int8_scales,
            dense_above,
        };
        Core::new(vec![Layer::Relu], cfg).py()?; // validates the config
        Ok(PatchSkip {
            cfg,
            layers: Vec::new(),
            core: None,
        })
    }

    #[pyo3(signature = (weight, bias, stride, padding, groups=1, dilation=None))]
    #[allow(clippy::too_many_arguments)]
    fn add_conv(
        &mut self,
        weight: &Bound<'_, PyAny>,
        bias: Option<&Bound<'_, PyAny>>,
        stride: (usize, usize),
        padding: (usize, usize),
        groups: usize,
        dilation: Option<(usize, usize)>,
    ) -> PyResult<()> {
        let (w, s) = vec_f32("weight", weight, 4)?;
        let b = match bias {
            Some(b) if !b.is_none() => Some(vec_f32("bias", b, 1)?.0),
            _ => None,
        };
        self.push(Layer::Conv2d {
            weight: w,
            shape: [s[0], s[1], s[2], s[3]],
            bias: b,
            stride,
            padding,
            groups,
            dilation: dilation.unwrap_or((1, 1)),
        })
    }

    /// An INT8 (Octo, eval mode) conv: int8 weight codes, their scale (one or one per output channel).
    #[pyo3(signature = (wq, sw, bias, stride, padding, groups=1, dilation=None))]
    #[allow(clippy::too_many_arguments)]
    fn add_conv_i8(
        &mut self,
        wq: &Bound<'_, PyAny>,
        sw: &Bound<'_, PyAny>,
        bias: Option<&Bound<'_, PyAny>>,
        stride: (usize, usize),
        padding: (usize, usize),
        groups: usize,
        dilation: Option<(usize, usize)>,
    ) -> PyResult<()> {
        let codes = readonly::<i8>("wq", wq, "int8", Some(4))?;
        let s = codes.shape().to_vec();
        let wq: Vec<i8> = codes.as_array().iter().copied().collect();
        let sw = vec_f32("sw", sw, 1)?.0;
        let b = match bias {
            Some(b) if !b.is_none() => Some(vec_f32("bias", b, 1)?.0),
            _ => None,
        };
        self.push(Layer::Conv2dInt8 {
            wq,
            sw,
            shape: [s[0], s[1], s[2], s[3]],
            bias: b,
            stride,
            padding,
            groups,
            dilation: dilation.unwrap_or((1, 1)),
        })
    }

    /// A per-channel affine `y = x·a + b` (LAC compensation folded: `a = 1`, `b = α·μ + β`).
    fn add_affine(&mut self, a: &Bound<'_, PyAny>, b: &Bound<'_, PyAny>) -> PyResult<()> {
        let layer = Layer::Affine {
            a: vec_f32("a", a, 1)?.0,
            b: vec_f32("b", b, 1)?.0,
        };
        self.push(layer)
    }

    fn add_batchnorm(
        &mut self,
        gamma: &Bound<'_, PyAny>,
        beta: &Bound<'_, PyAny>,
        mean: &Bound<'_, PyAny>,
        var: &Bound<'_, PyAny>,
        eps: f32,
    ) -> PyResult<()> {
        let layer = Layer::BatchNorm2d {
            gamma: vec_f32("gamma", gamma, 1)?.0,
            beta: vec_f32("beta", beta, 1)?.0,
            mean: vec_f32("running_mean", mean, 1)?.0,
            var: vec_f32("running_var", var, 1)?.0,
            eps,
        };
        self.push(layer)
    }

    fn add_relu(&mut self) -> PyResult<()> {
        self.push(Layer::Relu)
    }

    fn add_relu6(&mut self) -> PyResult<()> {
        self.push(Layer::Relu6)
    }

    /// Remembers the current tensor as the next mark (0, 1, ...); see `add_from` and `add_residual`.
    fn add_mark(&mut self) -> PyResult<()> {
        self.push(Layer::Mark)
    }

    /// The next layer reads mark `mark` (a side branch, e.g. a ResNet downsample).
    fn add_from(&mut self, mark: usize) -> PyResult<()> {
        self.push(Layer::From(mark))
    }

    /// Adds mark `mark` to the current tensor (a residual add).
    fn add_residual(&mut self, mark: usize) -> PyResult<()> {
        self.push(Layer::Add(mark))
    }

    fn add_maxpool(
        &mut self,
        kernel: (usize, usize),
        stride: (usize, usize),
        padding: (usize, usize),
    ) -> PyResult<()> {
        self.push(Layer::MaxPool2d(Window2d::new(kernel, stride, padding)))
    }

    fn add_avgpool(
        &mut self,
        kernel: (usize, usize),
        stride: (usize, usize),
        padding: (usize, usize),
    ) -> PyResult<()> {
        self.push(Layer::AvgPool2d(Window2d::new(kernel, stride, padding)))
    }

    /// Runs one float32 `(C, H, W)` C-contiguous frame; returns the `(1, C', H', W')` output (a copy).
    fn run<'py>(
        &mut self,
        py: Python<'py>,
        frame: &Bound<'py, PyAny>,
    ) -> PyResult<Bound<'py, PyArray<f32, Dim<[usize; 4]>>>> {
        let arr = readonly::<f32>("frame", frame, "float32", Some(3))?;
        if !arr.is_c_contiguous() {
            return Err(value_error(
                "frame",
                "must be C-contiguous; pass numpy.ascontiguousarray(...)",
            ));
        }
        let sh = arr.shape();
        let shape = [sh[0], sh[1], sh[2]];
        if self.core.is_none() {
            self.core = Some(Core::new(self.layers.clone(), self.cfg).py()?);
        }
        let core = self.core.as_mut().expect("built above");
        let x = arr.as_slice().map_err(|e| value_error("frame", e))?;
        let out = py.detach(|| core.run(x, shape).map(|o| o.to_vec())).py()?;
        let [c, h, w] = core.output_shape().unwrap_or([0; 3]);
        let y = PyArray::from_vec(py, out).reshape([1, c, h, w])?;
        Ok(y)
    }

    /// Runs one uint8 `(H, W)` or `(H, W, C)` C-contiguous frame (a decoded video frame), converted to the
    /// model input as `edgelearn.video.preprocess(frame, channels, mean, std)` does; the gate works on the
    /// bytes and only changed patches are converted. Returns the `(1, C', H', W')` output (a copy).
    #[pyo3(signature = (frame, channels=None, mean=None, std=None))]
    fn run_u8<'py>(
        &mut self,
        py: Python<'py>,
        frame: &Bound<'py, PyAny>,
        channels: Option<usize>,
        mean: Option<&Bound<'py, PyAny>>,
        std: Option<&Bound<'py, PyAny>>,
    ) -> PyResult<Bound<'py, PyArray<f32, Dim<[usize; 4]>>>> {
        let arr = readonly::<u8>("frame", frame, "uint8", None)?;
        if !arr.is_c_contiguous() {
            return Err(value_error(
                "frame",
                "must be C-contiguous; pass numpy.ascontiguousarray(...)",
            ));
        }
        let sh = arr.shape();
        let hwc = match sh.len() {
            2 => [sh[0], sh[1], 1],
            3 => [sh[0], sh[1], sh[2]],
            _ => {
                return Err(value_error(
                    "frame",
                    format!("a uint8 frame must be (H, W) or (H, W, C), got shape {sh:?}"),
                ))
            }
        };
        let vec = |a: Option<&Bound<'py, PyAny>>, name: &str| -> PyResult<Option<Vec<f32>>> {
            match a {
                Some(a) if !a.is_none() => Ok(Some(vec_f32(name, a, 1)?.0)),
                _ => Ok(None),
            }
        };
        let input = U8Input::new(hwc, channels, vec(mean, "mean")?, vec(std, "std")?).py()?;
        if self.core.is_none() {
            self.core = Some(Core::new(self.layers.clone(), self.cfg).py()?);
        }
        let core = self.core.as_mut().expect("built above");
        let x = arr.as_slice().map_err(|e| value_error("frame", e))?;
        let out = py
            .detach(|| core.run_u8(x, input).map(|o| o.to_vec()))
            .py()?;
        let [c, h, w] = core.output_shape().unwrap_or([0; 3]);
        let y = PyArray::from_vec(py, out).reshape([1, c, h, w])?;
        Ok(y)
    }

    /// Forgets the stream: the next frame runs densely and may have a new shape.
    fn reset(&mut self) {
        if let Some(c) = self.core.as_mut() {
            c.reset();
        }
    }

    /// Statistics of the last frame as a dict.
    fn stats<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let d = PyDict::new(py);
        let s = self
            .core
            .as_ref()
            .map(|c| c.stats().clone())
            .unwrap_or_default();
        d.set_item("frame", s.frame)?;
        d.set_item("dense", s.dense)?;
        d.set_item("patch_fraction", s.patch_fraction)?;
        d.set_item("layer_fractions", s.layer_fractions)?;
        d.set_item("compute_fraction", s.compute_fraction)?;
        d.set_item("estimated_error", s.estimated_error)?;
        d.set_item("error_refresh", s.error_refresh)?;
        d.set_item("seconds", s.seconds)?;
        d.set_item("gate_seconds", s.gate_seconds)?;
        d.set_item("bookkeeping_seconds", s.bookkeeping_seconds)?;
        d.set_item("recompute_seconds", s.recompute_seconds)?;
        d.set_item("layer_seconds", s.layer_seconds)?;
        d.set_item("output_changed", s.output_changed)?;
        Ok(d)
    }
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<PatchSkip>()
}
