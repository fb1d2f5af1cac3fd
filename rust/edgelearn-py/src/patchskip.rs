//! `edgelearn._native.PatchSkip`: the patch-skip video runner of `edgelearn_core::patchskip`. Layers are
//! added one by one (`add_conv`, `add_batchnorm`, ...), then `run(frame)` takes float32 `(C, H, W)`
//! frames; `edgelearn.video.PatchSkipRunner` builds it from a `Sequential`.

use std::sync::{Arc, Mutex};

use edgelearn_core::nn::Window2d;
use edgelearn_core::patchskip::{Int8Scales, Layer, PatchSkip as Core, PatchSkipConfig, U8Input};
use numpy::ndarray::{ArrayView4, Dim};
use numpy::{PyArray, PyArray4, PyUntypedArrayMethods};
use pyo3::prelude::*;
use pyo3::types::PyDict;

use crate::arrays::readonly;
use crate::errors::{value_error, CoreResultExt};

fn vec_f32(arg: &str, obj: &Bound<'_, PyAny>, ndim: usize) -> PyResult<(Vec<f32>, Vec<usize>)> {
    let a = readonly::<f32>(arg, obj, "float32", Some(ndim))?;
    let shape = a.shape().to_vec();
    Ok((a.as_array().iter().copied().collect(), shape))
}

/// Frame outputs' memory, handed back when their arrays are gone (see [`OutputBuffer`]).
type OutputPool = Arc<Mutex<Vec<Vec<f32>>>>;

/// Most output buffers a runner keeps for reuse (a caller that holds a block of outputs, then drops
/// them, gets all of them back).
const POOL_MAX: usize = 16;

/// The memory of one frame output array (its NumPy base object). When the array and every view of it
/// are gone, the memory goes back to its runner's pool, and a later frame's output is copied into it.
///
/// Why: a frame output is a fresh allocation of the feature map's size (1.2 MB at 480x640 for the
/// default model), which glibc takes from the OS and gives back (mmap, or a trimmed heap top), so every
/// frame paid a page fault per 4 KiB page writing it. On this project's 2-vCPU VM that was 0.3–0.7 ms of
/// a 2–2.5 ms INT8 patch-skip frame at 480x640 (more on two threads, where faults also shoot down the
/// other core's TLB).
#[pyclass(module = "edgelearn._native", frozen)]
pub struct OutputBuffer {
    data: Vec<f32>,
    pool: OutputPool,
}

impl Drop for OutputBuffer {
    fn drop(&mut self) {
        let data = std::mem::take(&mut self.data);
        // a poisoned pool (a panic while it was locked) only loses the reuse
        if let Ok(mut pool) = self.pool.lock() {
            if pool.len() < POOL_MAX {
                pool.push(data);
            }
        }
    }
}

/// A copy of `out` in memory from `pool` (a buffer of the same length, else a new one; buffers of
/// another length, from an earlier stream shape, are dropped).
fn pooled_copy(pool: &OutputPool, out: &[f32]) -> Vec<f32> {
    let reused = pool.lock().ok().and_then(|mut p| {
        p.retain(|v| v.len() == out.len());
        p.pop()
    });
    match reused {
        Some(mut v) => {
            v.copy_from_slice(out);
            v
        }
        None => out.to_vec(),
    }
}

/// `data` as a `(1, c, h, w)` float32 array whose base object returns the memory to `pool`.
fn output_array<'py>(
    py: Python<'py>,
    data: Vec<f32>,
    pool: &OutputPool,
    [c, h, w]: [usize; 3],
) -> PyResult<Bound<'py, PyArray4<f32>>> {
    if data.len() != c * h * w {
        return Err(value_error(
            "output",
            format!(
                "{} values for an output of shape (1, {c}, {h}, {w})",
                data.len()
            ),
        ));
    }
    let owner = Bound::new(
        py,
        OutputBuffer {
            data,
            pool: Arc::clone(pool),
        },
    )?;
    let view = ArrayView4::from_shape((1, c, h, w), &owner.get().data[..])
        .map_err(|e| value_error("output", e))?;
    // SAFETY: `owner` becomes the array's base object, which keeps it (and its never-resized `data`)
    // alive as long as the array or any view of it; `data` is only taken back in `owner`'s `Drop`.
    Ok(unsafe { PyArray4::borrow_from_array(&view, owner.clone().into_any()) })
}

/// Patch-skip inference over a stream of frames (see `edgelearn.video.PatchSkipRunner`).
#[pyclass(module = "edgelearn._native")]
pub struct PatchSkip {
    cfg: PatchSkipConfig,
    layers: Vec<Layer>,
    core: Option<Core>,
    outputs: OutputPool,
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
            outputs: OutputPool::default(),
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
        let pool = &self.outputs;
        let out = py
            .detach(|| core.run(x, shape).map(|o| pooled_copy(pool, o)))
            .py()?;
        output_array(py, out, pool, core.output_shape().unwrap_or([0; 3]))
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
        let pool = &self.outputs;
        let out = py
            .detach(|| core.run_u8(x, input).map(|o| pooled_copy(pool, o)))
            .py()?;
        output_array(py, out, pool, core.output_shape().unwrap_or([0; 3]))
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
    m.add_class::<OutputBuffer>()?;
    m.add_class::<PatchSkip>()
}
