//! Symmetric INT8 quantization: per-tensor or per-channel scales, nearest or stochastic rounding, and
//! Octo's parameterized range clipping (PRC) applied before the scale is computed.
//!
//! For one channel (the whole tensor when per tensor), with `c(x)` the clipped value:
//!
//! ```text
//! scale = max(absmax(c(x)) / 127, f32::MIN_POSITIVE)   (f32 division; 1.0 if absmax is 0)
//! q     = clamp(round(c(x) / scale), -127, 127)     (f32 division, never a multiply by 1/scale)
//! ```
//!
//! so numpy's `np.rint(x / scale)` in float32 reproduces nearest rounding bit for bit.
//!
//! Tensors are seen through a [`Layout`] `(outer, channels, inner)`: a C-ordered array whose channel
//! axis has `channels` entries, `outer` the product of the axes before it and `inner` of those after.
//! Per tensor is `(1, 1, len)`.
//!
//! Results never depend on the thread count: reductions use a partition fixed by the layout alone and
//! combine partial results in a fixed order, and stochastic rounding draws its noise from a
//! counter-based hash of `(seed, flat element index)`.
//!
//! Files: this one holds the types ([`Rounding`], [`Clip`], [`Layout`]) and the entry points with their
//! argument checks and chunking; [`stats`] the per-tensor/per-channel statistics, clip bounds and scales;
//! [`rng`] the counter-based noise of stochastic rounding and fresh seeds; [`kernels`] the element-wise
//! quantize loops (scalar, AVX2, AVX-512) and their dispatch.
//!
//! What does not live here: INT8 GEMM (`gemm`), the per-layer training logic ([`crate::octo`]).

mod kernels;
mod rng;
mod stats;
#[cfg(test)]
mod tests;

pub use rng::{random_seed, stochastic_uniform};
pub use stats::{absmax, scale_for_absmax};

use crate::error::{Error, Result};
use crate::threads;
use kernels::{quantize_chunk, quantize_run_uniform};
use stats::{channel_stats, first_non_finite, first_pass_chunk, params, tensor_stats, Params};

/// Largest code magnitude; the grid is symmetric, `-128` is never produced.
pub const QMAX: i8 = 127;
/// Default `z` of [`Clip::Sigma`]: the two-sided 99% interval of a normal distribution.
pub const DEFAULT_SIGMA_Z: f64 = 2.576;
/// Default `kappa` of [`Clip::MinMax`].
pub const DEFAULT_MINMAX_KAPPA: f64 = 0.95;

/// Below this many elements everything runs on the caller's thread (a pool hop costs more than the work).
/// With the caller taking part and the other workers kept warm, two chunks already pay: the 32x32x7x7
/// input of the bundled CNN's third conv (50k values, stochastic rounding) took 27 µs on one thread and
/// did not scale with 1 << 16 here.
pub const PARALLEL_MIN_ELEMENTS: usize = 1 << 15;
/// Work unit of the element-wise passes when they run in parallel.
const ELEMENTWISE_CHUNK: usize = 1 << 14;

/// How `x / scale` becomes an integer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Rounding {
    /// Round half to even (like `np.rint`).
    Nearest,
    /// `floor(x/scale + u)` with `u` in `[0, 1)` from [`stochastic_uniform`]`(seed, flat index)`:
    /// unbiased, reproducible for a seed, independent of the thread count.
    Stochastic { seed: u64 },
}

/// Range clipping applied to the values before the scale is computed (Octo's PRC). Clipped elements keep
/// their clipped value. Bounds are computed per channel (per tensor for a per-tensor layout).
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Clip {
    /// No clipping.
    None,
    /// Clip to `[mean − z·σ, mean + z·σ]`; mean and σ (population, ddof = 0) in f64, bounds rounded to
    /// f32. `z` must be finite and > 0.
    Sigma { z: f64 },
    /// Clip to `[κ·min, κ·max]`; products in f64, rounded to f32. `kappa` must be in `(0, 1]`.
    MinMax { kappa: f64 },
}

impl Clip {
    /// Checks the parameter (`z > 0` finite, `kappa` in `(0, 1]`), naming the argument `clip`.
    pub fn validate(&self) -> Result<()> {
        match *self {
            Clip::None => Ok(()),
            Clip::Sigma { z } if z.is_finite() && z > 0.0 => Ok(()),
            Clip::Sigma { z } => Err(Error::invalid(
                "clip",
                format!("sigma z must be finite and > 0, got {z}"),
            )),
            Clip::MinMax { kappa } if kappa > 0.0 && kappa <= 1.0 => Ok(()),
            Clip::MinMax { kappa } => Err(Error::invalid(
                "clip",
                format!("minmax kappa must be in (0, 1], got {kappa}"),
            )),
        }
    }
}

/// A C-ordered tensor seen as `(outer, channels, inner)`, the channel axis in the middle.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Layout {
    pub outer: usize,
    pub channels: usize,
    pub inner: usize,
}

impl Layout {
    /// One scale for `len` elements.
    pub fn per_tensor(len: usize) -> Self {
        Layout {
            outer: 1,
            channels: 1,
            inner: len,
        }
    }

    /// The layout of a C-ordered array of `shape`: per channel along `axis` (negative counts from the
    /// end, as in numpy), per tensor if `axis` is `None`. `arg` names the axis argument in errors.
    pub fn from_shape(shape: &[usize], axis: Option<isize>, arg: &'static str) -> Result<Self> {
        let product = |dims: &[usize]| {
            dims.iter()
                .try_fold(1usize, |acc, &d| acc.checked_mul(d))
                .ok_or_else(|| {
                    Error::invalid("x", format!("shape {shape:?} has too many elements"))
                })
        };
        let Some(axis) = axis else {
            return Ok(Layout::per_tensor(product(shape)?));
        };
        let ndim = shape.len() as isize;
        let a = if axis < 0 { axis + ndim } else { axis };
        if a < 0 || a >= ndim {
            return Err(Error::invalid(
                arg,
                format!("axis {axis} is out of range for an array with {ndim} dimensions (shape {shape:?})"),
            ));
        }
        let a = a as usize;
        let layout = Layout {
            outer: product(&shape[..a])?,
            channels: shape[a],
            inner: product(&shape[a + 1..])?,
        };
        layout.len()?;
        Ok(layout)
    }

    /// Number of elements, or an error if it overflows `usize`.
    pub fn len(&self) -> Result<usize> {
        self.outer
            .checked_mul(self.channels)
            .and_then(|n| n.checked_mul(self.inner))
            .ok_or_else(|| Error::invalid("layout", format!("{self:?} has too many elements")))
    }

    /// True if the layout holds no element.
    pub fn is_empty(&self) -> bool {
        self.outer == 0 || self.channels == 0 || self.inner == 0
    }

    /// One channel is one contiguous run: fold outer into inner so the passes see a single run.
    fn normalised(self) -> Self {
        if self.channels == 1 {
            Layout::per_tensor(self.outer * self.inner)
        } else {
            self
        }
    }
}

/// A run of consecutive elements with a simple channel pattern.
enum Run {
    /// `len` elements from flat index `pos`, all of channel `ch`.
    Uniform { pos: usize, len: usize, ch: usize },
    /// `len` elements from flat index `pos`, of channels `ch0, ch0 + 1, …` (only when `inner == 1`).
    Row { pos: usize, len: usize, ch0: usize },
}

/// Splits the flat range `[start, end)` of a normalised layout into runs, in order.
#[inline(always)]
fn for_each_run(layout: Layout, start: usize, end: usize, mut f: impl FnMut(Run)) {
    let (c, inner) = (layout.channels, layout.inner);
    let mut pos = start;
    if inner == 1 && c > 1 {
        while pos < end {
            let ch0 = pos % c;
            let len = (c - ch0).min(end - pos);
            f(Run::Row { pos, len, ch0 });
            pos += len;
        }
    } else {
        while pos < end {
            let ch = (pos / inner) % c;
            let len = (inner - pos % inner).min(end - pos);
            f(Run::Uniform { pos, len, ch });
            pos += len;
        }
    }
}

/// Large enough to split, and more than one thread: with one thread the work stays on the caller's thread
/// (a hop to the pool's single worker costs a wake-up per call; results are the same either way, since
/// chunking does not depend on where chunks run).
fn parallel_for(n: usize) -> bool {
    n >= PARALLEL_MIN_ELEMENTS && threads::num_threads() > 1
}

/// Maps `f` over `0..count`, in the edgelearn pool when `parallel`; results in index order.
fn map_indices<T: Send>(
    count: usize,
    parallel: bool,
    f: impl Fn(usize) -> T + Sync + Send,
) -> Vec<T> {
    if parallel && count > 1 {
        let mut out: Vec<Option<T>> = (0..count).map(|_| None).collect();
        crate::nn::for_each_chunk(&mut out, 1, true, |i, slot| slot[0] = Some(f(i)));
        out.into_iter().flatten().collect()
    } else {
        (0..count).map(f).collect()
    }
}

/// The widest build of the quantize loops a test lets run: 2 = AVX-512, 1 = AVX2, 0 = portable (each
/// still only where the CPU has it). Process-wide, for tests ([`set_quantize_simd`]).
static QUANTIZE_SIMD_CAP: std::sync::atomic::AtomicU8 = std::sync::atomic::AtomicU8::new(2);

/// The widest SIMD build the quantize loops may pick.
#[doc(hidden)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum QuantizeSimd {
    Portable = 0,
    Avx2 = 1,
    Avx512 = 2,
}

/// Caps the SIMD build of the quantize loops (statistics pass and codes) for the whole process, so tests
/// can run each build on a CPU that has the wider ones; the results are the same bits on every build.
/// Not for production use: the default (`Avx512`) picks the widest build the CPU has.
#[doc(hidden)]
pub fn set_quantize_simd(cap: QuantizeSimd) {
    QUANTIZE_SIMD_CAP.store(cap as u8, std::sync::atomic::Ordering::Relaxed);
}

#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
fn quantize_simd_cap() -> u8 {
    QUANTIZE_SIMD_CAP.load(std::sync::atomic::Ordering::Relaxed)
}

#[cfg(target_arch = "x86_64")]
pub(super) fn avx512_ok() -> bool {
    quantize_simd_cap() >= 2
        && std::arch::is_x86_feature_detected!("avx512f")
        && std::arch::is_x86_feature_detected!("avx512dq")
        && std::arch::is_x86_feature_detected!("avx512bw")
        && std::arch::is_x86_feature_detected!("avx512vl")
}

#[cfg(target_arch = "x86_64")]
pub(super) fn avx2_ok() -> bool {
    quantize_simd_cap() >= 1 && std::arch::is_x86_feature_detected!("avx2")
}

/// Runs `f(start, chunk)` over `out` split into element-wise chunks, in parallel for large tensors.
fn for_each_out_chunk<T: Send>(out: &mut [T], f: impl Fn(usize, &mut [T]) + Sync + Send) {
    if parallel_for(out.len()) {
        crate::nn::for_each_chunk(out, ELEMENTWISE_CHUNK, true, |i, c| {
            f(i * ELEMENTWISE_CHUNK, c)
        });
    } else {
        f(0, out);
    }
}

fn check_sizes(
    layout: Layout,
    x_arg: &'static str,
    x_len: usize,
    out_arg: &'static str,
    out_len: usize,
) -> Result<usize> {
    let n = layout.len()?;
    if x_len != n {
        return Err(Error::invalid(
            x_arg,
            format!("has {x_len} elements, layout {layout:?} needs {n}"),
        ));
    }
    if out_len != n {
        return Err(Error::invalid(
            out_arg,
            format!("has {out_len} elements, expected {n} (one per input element)"),
        ));
    }
    Ok(n)
}

/// Quantizes `x` (C-ordered, seen through `layout`) into `q` (same length) and `scales` (one per channel,
/// `layout.channels` values; one for a per-tensor layout). Every element of `q` and `scales` is written.
///
/// Errors: sizes that do not match the layout, a bad [`Clip`] parameter, or NaN/inf in `x`
/// ([`Error::NonFinite`], with the flat index of the first one). Empty channels get scale 1.0.
pub fn quantize_into(
    x: &[f32],
    layout: Layout,
    rounding: Rounding,
    clip: Clip,
    q: &mut [i8],
    scales: &mut [f32],
) -> Result<()> {
    check_sizes(layout, "x", x.len(), "q", q.len())?;
    if scales.len() != layout.channels {
        return Err(Error::invalid(
            "scales",
            format!(
                "has {} elements, expected {} (one per channel)",
                scales.len(),
                layout.channels
            ),
        ));
    }
    clip.validate()?;
    if layout.is_empty() {
        scales.fill(1.0);
        return Ok(());
    }
    let layout = layout.normalised();
    let want_sigma = matches!(clip, Clip::Sigma { .. });
    let stats = if layout.channels == 1 {
        tensor_stats(x, want_sigma)?
    } else {
        channel_stats(x, layout, want_sigma)?
    };
    let p = params(&stats, clip, scales);
    let scales: &[f32] = scales;
    for_each_out_chunk(q, |start, qc| {
        quantize_chunk(x, qc, start, layout, &p, scales, rounding)
    });
    Ok(())
}

/// [`quantize_into`] of a per-tensor layout whose min and max the caller took in its own pass over `x`
/// (for instance [`run_min_max`] per run, combined; `x` must be finite): the same codes and scale,
/// without the statistics pass. Returns the scale. `Clip::Sigma` needs moments: it takes the full
/// [`quantize_into`].
pub(crate) fn quantize_per_tensor_with_range(
    x: &[f32],
    (min, max): (f32, f32),
    rounding: Rounding,
    clip: Clip,
    q: &mut [i8],
) -> Result<f32> {
    let mut scale = [1f32];
    if matches!(clip, Clip::Sigma { .. }) || x.is_empty() {
        quantize_into(
            x,
            Layout::per_tensor(x.len()),
            rounding,
            clip,
            q,
            &mut scale,
        )?;
        return Ok(scale[0]);
    }
    let layout = Layout::per_tensor(x.len());
    check_sizes(layout, "x", x.len(), "q", q.len())?;
    clip.validate()?;
    let p = params(&stats::ChannelStats::of_range(min, max), clip, &mut scale);
    for_each_out_chunk(q, |start, qc| {
        quantize_chunk(x, qc, start, layout, &p, &scale, rounding)
    });
    Ok(scale[0])
}

/// Nearest-rounding codes of `x` under a given per-tensor `scale`, without clipping: the codes
/// [`quantize_into`] writes when its statistics give that scale; values beyond `127·scale` saturate.
/// Same SIMD dispatch and threading as [`quantize_into`]. `q` must be as long as `x`.
pub fn quantize_nearest_with_scale(x: &[f32], scale: f32, q: &mut [i8]) -> Result<()> {
    if q.len() != x.len() {
        return Err(Error::invalid(
            "q",
            format!(
                "has {} elements, expected {} (one per input)",
                q.len(),
                x.len()
            ),
        ));
    }
    if !(scale.is_finite() && scale > 0.0) {
        return Err(Error::invalid(
            "scale",
            format!("must be finite and positive, got {scale}"),
        ));
    }
    let layout = Layout::per_tensor(x.len());
    let p = Params {
        lo: vec![f32::NEG_INFINITY],
        hi: vec![f32::INFINITY],
    };
    let scales = [scale];
    for_each_out_chunk(q, |start, qc| {
        quantize_chunk(x, qc, start, layout, &p, &scales, Rounding::Nearest)
    });
    Ok(())
}

/// [`quantize_nearest_with_scale`] of one short run, without the per-call checks and setup (no
/// allocation, no thread dispatch): the same bits. `scale` must be finite and positive.
#[inline(always)]
pub(crate) fn quantize_nearest_run(x: &[f32], scale: f32, q: &mut [i8]) {
    debug_assert!(scale.is_finite() && scale > 0.0 && x.len() == q.len());
    quantize_run_uniform(
        x,
        q,
        f32::NEG_INFINITY,
        f32::INFINITY,
        scale,
        Rounding::Nearest,
        0,
    )
}

/// The code [`quantize_nearest_run`] gives one value `x` under `scale` (the same bits), for callers that
/// quantize values as they compute them.
#[inline(always)]
pub(crate) fn nearest_code(x: f32, scale: f32) -> i8 {
    kernels::round_nearest(kernels::scaled(x, f32::NEG_INFINITY, f32::INFINITY, scale))
}

/// `(min, max, has non-finite)` of one contiguous run, on the SIMD first pass of [`quantize_into`]:
/// combined over runs (min of mins, max of maxes) it gives the per-tensor scale `quantize_into` would
/// take, for callers that scan the data in their own pass.
pub(crate) fn run_min_max(xs: &[f32]) -> (f32, f32, bool) {
    let (mn, mx, _, bad) = first_pass_chunk(xs, false);
    (mn, mx, bad)
}

/// The per-tensor scale [`quantize_into`] takes (nearest rounding, no clip) from the data's min and max.
pub(crate) fn scale_from_min_max(mn: f32, mx: f32) -> f32 {
    scale_for_absmax(mn.abs().max(mx.abs()))
}

/// The largest magnitude of an activation, handed from the op that wrote it to the INT8 layer that
/// quantizes it, so that layer skips its statistics pass over `X` (see [`crate::octo::forward`]).
///
/// The activation's per-tensor scale without clipping depends on its min and max only through
/// `max(|min|, |max|)` ([`scale_from_min_max`]; the sign of a zero does not matter), so that is all a
/// range carries. It is made only by ops that computed it from every value they wrote (with no NaN or
/// infinity among them: [`quantize_into`] rejects those, so such an output gets no range and the layer
/// takes its own pass, which reports the error), or by [`ActRange::of`]; it records the address and
/// length of the values it describes, and [`crate::octo::forward`] rejects it for any other slice. A
/// range too small (or too large) for the data it is given with cannot be built outside this crate.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ActRange {
    amax: f32,
    addr: usize,
    len: usize,
}

impl ActRange {
    /// The range of `x` from a pass over it (`None` if `x` holds NaN or an infinity).
    pub fn of(x: &[f32]) -> Option<Self> {
        let (mn, mx, bad) = stats::tensor_min_max(x);
        let amax = if x.is_empty() {
            0.0
        } else {
            mn.abs().max(mx.abs())
        };
        (!bad).then(|| ActRange::new(x, amax))
    }

    /// `amax` must be the largest magnitude of the finite values `x` (the slice an op just wrote).
    pub(crate) fn new(x: &[f32], amax: f32) -> Self {
        ActRange {
            amax,
            addr: x.as_ptr() as usize,
            len: x.len(),
        }
    }

    /// The largest magnitude.
    pub fn amax(&self) -> f32 {
        self.amax
    }

    /// Whether this is the range of `x` (the slice it was made for: same address and length).
    pub fn describes(&self, x: &[f32]) -> bool {
        self.addr == x.as_ptr() as usize && self.len == x.len()
    }
}

/// The bit pattern of `|v|`: finite magnitudes order like these integers, and NaN and the infinities lie
/// above [`f32::MAX`]'s. A running maximum of them is exact, needs no NaN handling and vectorises (an
/// integer maximum), so ops that write signed values (BatchNorm, the residual add) take their range so.
#[inline(always)]
pub(crate) fn abs_bits(v: f32) -> u32 {
    v.to_bits() & 0x7fff_ffff
}

/// Collects the largest magnitude of an op's outputs over chunks done in any order on any thread (the
/// maximum is exact, so the result does not depend on the order), and whether a NaN or an infinity was
/// seen.
pub(crate) struct AmaxAcc {
    bits: std::sync::atomic::AtomicU32,
    bad: std::sync::atomic::AtomicBool,
}

impl AmaxAcc {
    pub(crate) fn new() -> Self {
        AmaxAcc {
            bits: std::sync::atomic::AtomicU32::new(0),
            bad: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// Adds a chunk's result: `amax` the largest `|v|` of its finite values, `bad` whether it had a NaN or
    /// an infinity.
    pub(crate) fn add(&self, amax: f32, bad: bool) {
        use std::sync::atomic::Ordering::Relaxed;
        // non-negative floats order like their bit patterns; an infinity is bad anyway
        let bad = bad || !amax.is_finite();
        self.bits.fetch_max(amax.abs().to_bits(), Relaxed);
        if bad {
            self.bad.store(true, Relaxed);
        }
    }

    /// Adds a chunk's largest [`abs_bits`] (NaN and infinities included, which make the result bad).
    pub(crate) fn add_abs_bits(&self, m: u32) {
        use std::sync::atomic::Ordering::Relaxed;
        if m > f32::MAX.to_bits() {
            self.bad.store(true, Relaxed);
        } else {
            self.bits.fetch_max(m, Relaxed);
        }
    }

    /// The range of `x` (the values the chunks were), `None` if any chunk was bad.
    pub(crate) fn finish(self, x: &[f32]) -> Option<ActRange> {
        (!self.bad.into_inner()).then(|| ActRange::new(x, f32::from_bits(self.bits.into_inner())))
    }
}

/// [`quantize_into`] of a per-tensor layout without clipping under the largest magnitude `range` holds:
/// the same codes and scale, without the statistics pass. Returns the scale. `range` must describe `x`
/// (else [`Error::InvalidArgument`] on `x_range`).
pub(crate) fn quantize_per_tensor_with_amax(
    x: &[f32],
    range: &ActRange,
    rounding: Rounding,
    q: &mut [i8],
) -> Result<f32> {
    if !range.describes(x) {
        return Err(Error::invalid(
            "x_range",
            format!(
                "describes another array (address {:#x}, {} values) than x ({} values)",
                range.addr,
                range.len,
                x.len()
            ),
        ));
    }
    quantize_per_tensor_with_range(x, (0.0, range.amax), rounding, Clip::None, q)
}

/// The error [`quantize_into`] gives for non-finite input (the first such index of `x`).
pub(crate) fn non_finite_error(x: &[f32]) -> Error {
    first_non_finite(x)
}

/// Nearest-rounding, unclipped codes under one per-tensor scale, run by run on the SIMD kernels of
/// [`quantize_into`] (the same bits): for callers that quantize a tensor piece by piece in their own
/// parallel pass.
pub(crate) struct NearestCodes {
    p: Params,
    scale: [f32; 1],
}

impl NearestCodes {
    /// `scale` must be finite and positive.
    pub(crate) fn new(scale: f32) -> Self {
        debug_assert!(scale.is_finite() && scale > 0.0);
        NearestCodes {
            p: Params {
                lo: vec![f32::NEG_INFINITY],
                hi: vec![f32::INFINITY],
            },
            scale: [scale],
        }
    }

    /// Codes of `x` into `q` (same length).
    pub(crate) fn run(&self, x: &[f32], q: &mut [i8]) {
        debug_assert_eq!(x.len(), q.len());
        quantize_chunk(
            x,
            q,
            0,
            Layout::per_tensor(x.len()),
            &self.p,
            &self.scale,
            Rounding::Nearest,
        );
    }
}

/// `out = q · scale[channel]` in f32. `scales` must hold `layout.channels` finite values > 0.
pub fn dequantize_into(q: &[i8], layout: Layout, scales: &[f32], out: &mut [f32]) -> Result<()> {
    check_sizes(layout, "q", q.len(), "out", out.len())?;
    if scales.len() != layout.channels {
        return Err(Error::invalid(
            "scale",
            format!(
                "has {} elements, expected {} (one per channel)",
                scales.len(),
                layout.channels
            ),
        ));
    }
    if let Some((i, s)) = scales
        .iter()
        .enumerate()
        .find(|(_, s)| !(s.is_finite() && **s > 0.0))
    {
        return Err(Error::invalid(
            "scale",
            format!("must be finite and > 0, got {s} at index {i}"),
        ));
    }
    let layout = layout.normalised();
    for_each_out_chunk(out, |start, oc| {
        for_each_run(layout, start, start + oc.len(), |run| match run {
            Run::Uniform { pos, len, ch } => {
                let s = scales[ch];
                for (o, &v) in oc[pos - start..pos - start + len]
                    .iter_mut()
                    .zip(&q[pos..pos + len])
                {
                    *o = v as f32 * s;
                }
            }
            Run::Row { pos, len, ch0 } => {
                let it = q[pos..pos + len].iter().zip(&scales[ch0..ch0 + len]);
                for (o, (&v, &s)) in oc[pos - start..pos - start + len].iter_mut().zip(it) {
                    *o = v as f32 * s;
                }
            }
        })
    });
    Ok(())
}

/// Per-tensor convenience: `(codes, scale)`.
pub fn quantize_per_tensor(x: &[f32], rounding: Rounding, clip: Clip) -> Result<(Vec<i8>, f32)> {
    let mut q = vec![0i8; x.len()];
    let mut s = [0f32];
    quantize_into(
        x,
        Layout::per_tensor(x.len()),
        rounding,
        clip,
        &mut q,
        &mut s,
    )?;
    Ok((q, s[0]))
}

/// Per-channel convenience: `(codes, scales)` for a C-ordered `x` of the given layout.
pub fn quantize_per_channel(
    x: &[f32],
    layout: Layout,
    rounding: Rounding,
    clip: Clip,
) -> Result<(Vec<i8>, Vec<f32>)> {
    let mut q = vec![0i8; x.len()];
    let mut s = vec![0f32; layout.channels];
    quantize_into(x, layout, rounding, clip, &mut q, &mut s)?;
    Ok((q, s))
}

/// `q · scale` for a per-tensor scale.
pub fn dequantize_per_tensor(q: &[i8], scale: f32) -> Result<Vec<f32>> {
    let mut out = vec![0f32; q.len()];
    dequantize_into(q, Layout::per_tensor(q.len()), &[scale], &mut out)?;
    Ok(out)
}
