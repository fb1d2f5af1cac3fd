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
//! What does not live here: INT8 GEMM (`gemm`), the per-layer training logic (Python side).

use rayon::prelude::*;

use crate::error::{Error, Result};
use crate::threads;

/// Largest code magnitude; the grid is symmetric, `-128` is never produced.
pub const QMAX: i8 = 127;
/// Default `z` of [`Clip::Sigma`]: the two-sided 99% interval of a normal distribution.
pub const DEFAULT_SIGMA_Z: f64 = 2.576;
/// Default `kappa` of [`Clip::MinMax`].
pub const DEFAULT_MINMAX_KAPPA: f64 = 0.95;

/// Below this many elements everything runs on the caller's thread (a pool hop costs more than the work).
pub const PARALLEL_MIN_ELEMENTS: usize = 1 << 16;
/// Per-tensor statistics are reduced over chunks of this many elements, combined in chunk order.
const STATS_CHUNK: usize = 1 << 16;
/// Work unit of the element-wise passes when they run in parallel.
const ELEMENTWISE_CHUNK: usize = 1 << 14;
/// Independent accumulators per reduction, so the compiler can keep them in one vector register.
const LANES: usize = 8;
/// Adding and subtracting 1.5·2^23 rounds an f32 of magnitude < 2^22 to an integer, ties to even, in
/// the default rounding mode; unlike `round_ties_even` it vectorises without SSE4.1.
const ROUND_MAGIC: f32 = 12_582_912.0;

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

// ---------------------------------------------------------------------------------------------------
// Statistics
// ---------------------------------------------------------------------------------------------------

/// Min, max and "has a non-finite value" of a run. Non-finite detection accumulates `v - v`, which is 0
/// for finite `v` and NaN for NaN/inf, so the loop is plain vector arithmetic.
#[allow(clippy::eq_op)] // `v - v` is the finiteness test, on purpose
#[inline(always)]
fn scan_run(xs: &[f32]) -> (f32, f32, bool) {
    let mut mn = [f32::INFINITY; LANES];
    let mut mx = [f32::NEG_INFINITY; LANES];
    let mut nan = [0f32; LANES];
    let chunks = xs.chunks_exact(LANES);
    let rest = chunks.remainder();
    for c in chunks {
        for l in 0..LANES {
            let v = c[l];
            mn[l] = if v < mn[l] { v } else { mn[l] };
            mx[l] = if v > mx[l] { v } else { mx[l] };
            nan[l] += v - v;
        }
    }
    for (l, &v) in rest.iter().enumerate() {
        mn[l] = if v < mn[l] { v } else { mn[l] };
        mx[l] = if v > mx[l] { v } else { mx[l] };
        nan[l] += v - v;
    }
    let lo = mn
        .iter()
        .fold(f32::INFINITY, |a, &b| if b < a { b } else { a });
    let hi = mx
        .iter()
        .fold(f32::NEG_INFINITY, |a, &b| if b > a { b } else { a });
    (lo, hi, nan.iter().any(|v| v.is_nan()))
}

/// Sum of `(x - center)^p` in f64 over a run, `p` = 1 or 2, with a fixed lane order.
#[inline(always)]
fn moment_run<const SQUARE: bool>(xs: &[f32], center: f64) -> f64 {
    let mut acc = [0f64; LANES];
    let term = |v: f32| {
        let d = v as f64 - center;
        if SQUARE {
            d * d
        } else {
            d
        }
    };
    let chunks = xs.chunks_exact(LANES);
    let rest = chunks.remainder();
    for c in chunks {
        for l in 0..LANES {
            acc[l] += term(c[l]);
        }
    }
    for (l, &v) in rest.iter().enumerate() {
        acc[l] += term(v);
    }
    ((acc[0] + acc[4]) + (acc[2] + acc[6])) + ((acc[1] + acc[5]) + (acc[3] + acc[7]))
}

/// Per-channel statistics, struct of arrays.
struct ChannelStats {
    min: Vec<f32>,
    max: Vec<f32>,
    /// Sum (then mean), only for sigma clipping.
    mean: Vec<f64>,
    /// Sum of squared deviations (then σ), only for sigma clipping.
    sd: Vec<f64>,
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
        threads::install(|| (0..count).into_par_iter().map(&f).collect())
    } else {
        (0..count).map(f).collect()
    }
}

/// First pass over one channel's data (or a chunk of it) plus, for sigma, the sum; returns min, max,
/// sum, has-non-finite. Every run of the channel is visited in flat order.
#[inline(always)]
fn first_pass_uniform(
    runs: impl Iterator<Item = (usize, usize)>,
    x: &[f32],
    want_sum: bool,
) -> (f32, f32, f64, bool) {
    let (mut mn, mut mx, mut sum, mut bad) = (f32::INFINITY, f32::NEG_INFINITY, 0f64, false);
    for (pos, len) in runs {
        let xs = &x[pos..pos + len];
        let (a, b, nf) = scan_run(xs);
        mn = mn.min(a);
        mx = mx.max(b);
        bad |= nf;
        if want_sum && !nf {
            sum += moment_run::<false>(xs, 0.0);
        }
    }
    (mn, mx, sum, bad)
}

/// [`first_pass_uniform`] over one contiguous chunk, compiled for AVX-512 or AVX2 where the CPU has it
/// (min, max, the finiteness flag and the f64 sum in fixed lane order are exact, so results are identical).
fn first_pass_chunk(xs: &[f32], want_sum: bool) -> (f32, f32, f64, bool) {
    #[cfg(target_arch = "x86_64")]
    {
        if avx512_ok() {
            // SAFETY: the CPU supports these features, checked just above.
            return unsafe { first_pass_chunk_avx512(xs, want_sum) };
        }
        if std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: as above.
            return unsafe { first_pass_chunk_avx2(xs, want_sum) };
        }
    }
    first_pass_uniform(std::iter::once((0, xs.len())), xs, want_sum)
}

#[cfg(target_arch = "x86_64")]
fn avx512_ok() -> bool {
    std::arch::is_x86_feature_detected!("avx512f")
        && std::arch::is_x86_feature_detected!("avx512dq")
        && std::arch::is_x86_feature_detected!("avx512bw")
        && std::arch::is_x86_feature_detected!("avx512vl")
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2")]
unsafe fn first_pass_chunk_avx512(xs: &[f32], want_sum: bool) -> (f32, f32, f64, bool) {
    if want_sum {
        return first_pass_uniform(std::iter::once((0, xs.len())), xs, want_sum);
    }
    // Min, max and the finiteness flag with explicit 16-lane vectors and four independent accumulators
    // (the autovectorised `scan_run` interleaves min and max with lane permutes). `min_ps(v, m)` is
    // `v < m ? v : m`, exactly `scan_run`'s select, and the result does not depend on the lane grouping
    // except for the sign of a zero extreme, which the scale (|lo|, |hi|) and the clipped codes ignore.
    use std::arch::x86_64::*;
    let n = xs.len();
    let ptr = xs.as_ptr();
    let mut mn = [_mm512_set1_ps(f32::INFINITY); 4];
    let mut mx = [_mm512_set1_ps(f32::NEG_INFINITY); 4];
    let mut bad = [_mm512_setzero_ps(); 4];
    let mut i = 0;
    while i + 64 <= n {
        for a in 0..4 {
            let v = _mm512_loadu_ps(ptr.add(i + 16 * a));
            mn[a] = _mm512_min_ps(v, mn[a]);
            mx[a] = _mm512_max_ps(v, mx[a]);
            bad[a] = _mm512_add_ps(bad[a], _mm512_sub_ps(v, v));
        }
        i += 64;
    }
    let (mut lo, mut hi, mut nf) = (f32::INFINITY, f32::NEG_INFINITY, false);
    for a in 0..4 {
        let (mut l, mut h, mut b) = ([0f32; 16], [0f32; 16], [0f32; 16]);
        _mm512_storeu_ps(l.as_mut_ptr(), mn[a]);
        _mm512_storeu_ps(h.as_mut_ptr(), mx[a]);
        _mm512_storeu_ps(b.as_mut_ptr(), bad[a]);
        for t in 0..16 {
            lo = if l[t] < lo { l[t] } else { lo };
            hi = if h[t] > hi { h[t] } else { hi };
            nf |= b[t].is_nan();
        }
    }
    let (a, b, tail_nf) = scan_run(&xs[i..]);
    lo = if a < lo { a } else { lo };
    hi = if b > hi { b } else { hi };
    (lo, hi, 0.0, nf || tail_nf)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn first_pass_chunk_avx2(xs: &[f32], want_sum: bool) -> (f32, f32, f64, bool) {
    first_pass_uniform(std::iter::once((0, xs.len())), xs, want_sum)
}

/// Statistics of a non-empty per-tensor layout: fixed chunks of `STATS_CHUNK`, partials combined in chunk order.
fn tensor_stats(x: &[f32], want_sigma: bool) -> Result<ChannelStats> {
    let n = x.len();
    let chunks = n.div_ceil(STATS_CHUNK);
    let par = parallel_for(n);
    let chunk_range = |i: usize| (i * STATS_CHUNK, ((i + 1) * STATS_CHUNK).min(n));
    let parts = map_indices(chunks, par, |i| {
        let (s, e) = chunk_range(i);
        first_pass_chunk(&x[s..e], want_sigma)
    });
    let (mut mn, mut mx, mut sum, mut bad) = (f32::INFINITY, f32::NEG_INFINITY, 0f64, false);
    for &(a, b, s, nf) in &parts {
        mn = mn.min(a);
        mx = mx.max(b);
        sum += s;
        bad |= nf;
    }
    if bad {
        return Err(first_non_finite(x));
    }
    let (mut mean, mut sd) = (Vec::new(), Vec::new());
    if want_sigma {
        let m = sum / n as f64;
        let parts = map_indices(chunks, par, |i| {
            let (s, e) = chunk_range(i);
            moment_run::<true>(&x[s..e], m)
        });
        let ss: f64 = parts.iter().sum();
        mean.push(m);
        sd.push((ss / n as f64).sqrt());
    }
    Ok(ChannelStats {
        min: vec![mn],
        max: vec![mx],
        mean,
        sd,
    })
}

/// Statistics of a non-empty per-channel layout. Each channel is reduced on one thread in flat order, so the
/// result does not depend on how channels are split among threads.
fn channel_stats(x: &[f32], layout: Layout, want_sigma: bool) -> Result<ChannelStats> {
    let Layout {
        outer,
        channels: c,
        inner,
    } = layout;
    let n = x.len();
    let par = parallel_for(n);
    // Channel blocks (any split gives the same result): a few per thread for load balance, each at
    // least a few thousand elements of work, and when channels are the last axis wide enough that a
    // block reads whole cache lines of every row.
    let per_channel = (outer * inner).max(1);
    let block = if par {
        let min_width = if inner == 1 { 64 } else { 1 };
        c.div_ceil(4 * threads::num_threads())
            .max(4096 / per_channel)
            .max(min_width)
            .clamp(1, c)
    } else {
        c
    };
    let blocks = c.div_ceil(block);
    let count = (outer * inner) as f64;

    let parts = map_indices(blocks, par, |b| {
        let (c0, c1) = (b * block, ((b + 1) * block).min(c));
        let w = c1 - c0;
        let mut mn = vec![f32::INFINITY; w];
        let mut mx = vec![f32::NEG_INFINITY; w];
        let mut sum = vec![0f64; if want_sigma { w } else { 0 }];
        let mut bad = false;
        if inner == 1 {
            for o in 0..outer {
                let row = &x[o * c + c0..o * c + c1];
                for ((v, a), b) in row.iter().zip(mn.iter_mut()).zip(mx.iter_mut()) {
                    *a = if *v < *a { *v } else { *a };
                    *b = if *v > *b { *v } else { *b };
                }
                bad |= scan_run(row).2;
                if want_sigma {
                    for (v, s) in row.iter().zip(sum.iter_mut()) {
                        *s += *v as f64;
                    }
                }
            }
        } else {
            for (j, ch) in (c0..c1).enumerate() {
                let runs = (0..outer).map(|o| ((o * c + ch) * inner, inner));
                let (a, b, s, nf) = first_pass_uniform(runs, x, want_sigma);
                mn[j] = a;
                mx[j] = b;
                if want_sigma {
                    sum[j] = s;
                }
                bad |= nf;
            }
        }
        if bad || !want_sigma {
            return (mn, mx, Vec::new(), Vec::new(), bad);
        }
        let mean: Vec<f64> = sum.iter().map(|s| s / count).collect();
        let mut ss = vec![0f64; w];
        if inner == 1 {
            for o in 0..outer {
                let row = &x[o * c + c0..o * c + c1];
                for ((v, m), s) in row.iter().zip(&mean).zip(ss.iter_mut()) {
                    let d = *v as f64 - m;
                    *s += d * d;
                }
            }
        } else {
            for (j, ch) in (c0..c1).enumerate() {
                ss[j] = (0..outer)
                    .map(|o| moment_run::<true>(&x[(o * c + ch) * inner..][..inner], mean[j]))
                    .fold(0.0, |a, b| a + b);
            }
        }
        let sd = ss.iter().map(|s| (s / count).sqrt()).collect();
        (mn, mx, mean, sd, bad)
    });

    let mut st = ChannelStats {
        min: Vec::with_capacity(c),
        max: Vec::with_capacity(c),
        mean: Vec::with_capacity(if want_sigma { c } else { 0 }),
        sd: Vec::with_capacity(if want_sigma { c } else { 0 }),
    };
    for (mn, mx, mean, sd, bad) in parts {
        if bad {
            return Err(first_non_finite(x));
        }
        st.min.extend(mn);
        st.max.extend(mx);
        st.mean.extend(mean);
        st.sd.extend(sd);
    }
    Ok(st)
}

/// The error for the first NaN/inf of `x` (only called once one is known to exist).
fn first_non_finite(x: &[f32]) -> Error {
    let index = x.iter().position(|v| !v.is_finite()).unwrap_or(0);
    Error::NonFinite { arg: "x", index }
}

/// Clip bounds and scales per channel from the statistics.
struct Params {
    lo: Vec<f32>,
    hi: Vec<f32>,
}

fn params(st: &ChannelStats, clip: Clip, scales: &mut [f32]) -> Params {
    let c = scales.len();
    let mut lo = Vec::with_capacity(c);
    let mut hi = Vec::with_capacity(c);
    for (ch, scale) in scales.iter_mut().enumerate() {
        let (mn, mx) = (st.min[ch], st.max[ch]);
        let (l, h) = match clip {
            Clip::None => (f32::NEG_INFINITY, f32::INFINITY),
            Clip::MinMax { kappa } => ((kappa * mn as f64) as f32, (kappa * mx as f64) as f32),
            Clip::Sigma { z } => {
                let (m, s) = (st.mean[ch], st.sd[ch]);
                ((m - z * s) as f32, (m + z * s) as f32)
            }
        };
        // Clipping is monotone, so the clipped absmax is that of the clipped extremes.
        let amax = mn.max(l).min(h).abs().max(mx.max(l).min(h).abs());
        *scale = scale_for_absmax(amax);
        lo.push(l);
        hi.push(h);
    }
    Params { lo, hi }
}

/// The scale of values whose largest magnitude (after clipping) is `amax`: `amax / 127`, 1.0 for 0.
pub fn scale_for_absmax(amax: f32) -> f32 {
    let s = amax / QMAX as f32;
    // A subnormal scale has too few mantissa bits for the ±scale/2 bound to hold, so scales are floored at
    // the smallest normal f32 (codes of such tiny tensors are then 0, within the bound).
    if s > 0.0 {
        s.max(f32::MIN_POSITIVE)
    } else {
        1.0
    }
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

/// Largest `|x|` (eight lanes, so it vectorises; NaN-free input assumed, as the runner checks frames).
pub fn absmax(x: &[f32]) -> f32 {
    let mut m = [0.0f32; 8];
    let chunks = x.chunks_exact(8);
    let rem = chunks.remainder();
    for c in chunks {
        for i in 0..8 {
            m[i] = m[i].max(c[i].abs());
        }
    }
    rem.iter()
        .fold(m.iter().fold(0.0f32, |a, &v| a.max(v)), |a, &v| {
            a.max(v.abs())
        })
}

// ---------------------------------------------------------------------------------------------------
// Element-wise passes
// ---------------------------------------------------------------------------------------------------

/// splitmix64's output function.
#[inline(always)]
fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

const GOLDEN_GAMMA: u64 = 0x9E37_79B9_7F4A_7C15;

/// The per-call key derived from a seed (mixing keeps nearby seeds from giving shifted streams).
#[inline(always)]
fn stream_key(seed: u64) -> u64 {
    mix64(seed ^ 0x5851_F42D_4C95_7F2D)
}

/// The noise of stochastic rounding for element `index` under `seed`: a multiple of 2^-24 in `[0, 1)`,
/// `(h32(lo32(index) + k) >> 8) · 2^-24` where `h32` is the 32-bit "lowbias32" mixer
/// (`x ^= x>>16; x *= 0x7feb352d; x ^= x>>15; x *= 0x846ca68b; x ^= x>>16`), all arithmetic mod 2^32,
/// and `k = lo32(mix64(key + hi32(index)·γ))` with `key = mix64(seed ^ 0x5851F42D4C957F2D)`, `mix64`
/// splitmix64's finaliser and `γ = 0x9E3779B97F4A7C15`. 32-bit lanes keep it as cheap as nearest
/// rounding on SIMD units (16 lanes per AVX-512 op). Defined here so other implementations (and tests)
/// can reproduce stochastic codes exactly.
pub fn stochastic_uniform(seed: u64, index: u64) -> f32 {
    let k = block_key(stream_key(seed), index >> 32);
    uniform_f32(k, index as u32)
}

/// The 32-bit key of the block of 2^32 indices whose high half is `hi`.
#[inline(always)]
fn block_key(key: u64, hi: u64) -> u32 {
    mix64(key.wrapping_add(hi.wrapping_mul(GOLDEN_GAMMA))) as u32
}

/// lowbias32 (C. Wellons' hash-prospector): a bijective 32-bit mixer with low avalanche bias.
#[inline(always)]
fn hash32(mut x: u32) -> u32 {
    x ^= x >> 16;
    x = x.wrapping_mul(0x7feb_352d);
    x ^= x >> 15;
    x = x.wrapping_mul(0x846c_a68b);
    x ^ (x >> 16)
}

#[inline(always)]
fn uniform_f32(block_key: u32, index_lo: u32) -> f32 {
    // 24 bits: exact in f32 (and in i32 → f32 conversion)
    (hash32(index_lo.wrapping_add(block_key)) >> 8) as i32 as f32 * (1.0 / (1u32 << 24) as f32)
}

/// Calls `f(k, lo, range)` for the sub-ranges of `pos..pos + len` (as offsets `range` from `pos`) whose
/// flat indices share their high 32 bits: `k` is that block's key, `lo` the low half of the first index.
#[inline(always)]
fn for_each_key_block(
    key: u64,
    pos: usize,
    len: usize,
    mut f: impl FnMut(u32, u32, std::ops::Range<usize>),
) {
    let mut j = 0;
    while j < len {
        let idx = (pos + j) as u64;
        let to_boundary = ((1u64 << 32) - (idx & 0xFFFF_FFFF)).min((len - j) as u64) as usize;
        f(block_key(key, idx >> 32), idx as u32, j..j + to_boundary);
        j += to_boundary;
    }
}

/// `clamp(c(x)/scale, -127, 127)` in f32 (the quotient is a division, as the spec requires).
#[inline(always)]
fn scaled(x: f32, lo: f32, hi: f32, scale: f32) -> f32 {
    let t = x.max(lo).min(hi) / scale;
    t.max(-(QMAX as f32)).min(QMAX as f32)
}

/// Round half to even of `t` in [-127, 127]: `t + 1.5·2^23` lands where the f32 spacing is exactly 1, so
/// the addition rounds (ties to even) and the integer sits in the low mantissa bits. Pure vector
/// arithmetic, unlike `round_ties_even` (SSE4.1) or the saturating `as i32`.
#[inline(always)]
fn round_nearest(t: f32) -> i8 {
    ((t + ROUND_MAGIC).to_bits() as i32).wrapping_sub(ROUND_MAGIC.to_bits() as i32) as i8
}

/// `min(floor(t + u), 127)` with the sum `t + u` an IEEE f32 addition (round to nearest even), `t` in
/// [-127, 127] and `u` in [0, 1) a multiple of 2^-24. The sum is exact unless `t`'s ulp exceeds 2^-24;
/// the rounding biases the expected code by less than 2^-18 (half the f32 ulp at 127). It can round
/// `127 + u` up to 128 (u ≥ 1 − 2^-18), hence the cap: codes stay in [-127, 127]. The floor is
/// round-to-nearest (magic constant) minus one where that rounded up; everything stays in 32-bit
/// vector lanes.
#[inline(always)]
fn round_stochastic(t: f32, u: f32) -> i8 {
    let v = t + u;
    let s = v + ROUND_MAGIC;
    let nearest = (s.to_bits() as i32).wrapping_sub(ROUND_MAGIC.to_bits() as i32);
    let rounded_up = ((s - ROUND_MAGIC) > v) as i32;
    (nearest - rounded_up).min(QMAX as i32) as i8
}

#[inline(always)]
fn quantize_run_uniform(
    xs: &[f32],
    qs: &mut [i8],
    lo: f32,
    hi: f32,
    scale: f32,
    rounding: Rounding,
    pos: usize,
) {
    match rounding {
        Rounding::Nearest => {
            for (q, &x) in qs.iter_mut().zip(xs) {
                *q = round_nearest(scaled(x, lo, hi, scale));
            }
        }
        Rounding::Stochastic { seed } => {
            for_each_key_block(stream_key(seed), pos, xs.len(), |k, lo32, r| {
                let mut i = lo32;
                for (q, &x) in qs[r.clone()].iter_mut().zip(&xs[r]) {
                    *q = round_stochastic(scaled(x, lo, hi, scale), uniform_f32(k, i));
                    i = i.wrapping_add(1);
                }
            });
        }
    }
}

#[inline(always)]
fn quantize_run_row(
    xs: &[f32],
    qs: &mut [i8],
    lo: &[f32],
    hi: &[f32],
    scale: &[f32],
    rounding: Rounding,
    pos: usize,
) {
    match rounding {
        Rounding::Nearest => {
            let params = lo.iter().zip(hi).zip(scale);
            for ((q, &x), ((&l, &h), &s)) in qs.iter_mut().zip(xs).zip(params) {
                *q = round_nearest(scaled(x, l, h, s));
            }
        }
        Rounding::Stochastic { seed } => {
            for_each_key_block(stream_key(seed), pos, xs.len(), |k, lo32, r| {
                let params = lo[r.clone()]
                    .iter()
                    .zip(&hi[r.clone()])
                    .zip(&scale[r.clone()]);
                let mut i = lo32;
                for ((q, &x), ((&l, &h), &s)) in qs[r.clone()].iter_mut().zip(&xs[r]).zip(params) {
                    *q = round_stochastic(scaled(x, l, h, s), uniform_f32(k, i));
                    i = i.wrapping_add(1);
                }
            });
        }
    }
}

/// Runs `f(start, chunk)` over `out` split into element-wise chunks, in parallel for large tensors.
fn for_each_out_chunk<T: Send>(out: &mut [T], f: impl Fn(usize, &mut [T]) + Sync + Send) {
    if parallel_for(out.len()) {
        threads::install(|| {
            out.par_chunks_mut(ELEMENTWISE_CHUNK)
                .enumerate()
                .for_each(|(i, c)| f(i * ELEMENTWISE_CHUNK, c))
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

/// Quantizes the elements `start..start + qc.len()` into `qc`. On x86-64 with AVX2 the same code is
/// compiled a second time for AVX2 (twice the vector width; bit-identical results, since every step is
/// an exactly rounded IEEE operation or integer arithmetic and nothing is contracted into FMA).
fn quantize_chunk(
    x: &[f32],
    qc: &mut [i8],
    start: usize,
    layout: Layout,
    p: &Params,
    scales: &[f32],
    rounding: Rounding,
) {
    #[cfg(target_arch = "x86_64")]
    {
        if avx512_ok() {
            // SAFETY: the CPU supports these features, checked just above.
            return unsafe { quantize_chunk_avx512(x, qc, start, layout, p, scales, rounding) };
        }
        if std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU supports AVX2, checked just above.
            return unsafe { quantize_chunk_avx2(x, qc, start, layout, p, scales, rounding) };
        }
    }
    quantize_chunk_body(x, qc, start, layout, p, scales, rounding)
}

/// The same body compiled for AVX-512 (16 lanes per op, masked tails).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2")]
unsafe fn quantize_chunk_avx512(
    x: &[f32],
    qc: &mut [i8],
    start: usize,
    layout: Layout,
    p: &Params,
    scales: &[f32],
    rounding: Rounding,
) {
    if layout.channels == 1 {
        // per tensor: blocks of 64 with explicit vectors (see `quantize_uniform_avx512`)
        let n = qc.len();
        let xs = &x[start..start + n];
        let (lo, hi, scale) = (p.lo[0], p.hi[0], scales[0]);
        match rounding {
            Rounding::Nearest => {
                let done = quantize_uniform_avx512(xs, qc, lo, hi, scale, None);
                quantize_run_uniform(
                    &xs[done..],
                    &mut qc[done..],
                    lo,
                    hi,
                    scale,
                    rounding,
                    start + done,
                );
            }
            Rounding::Stochastic { seed } => {
                for_each_key_block(stream_key(seed), start, n, |k, lo32, r| {
                    let (xr, qr) = (&xs[r.clone()], &mut qc[r.clone()]);
                    let done = quantize_uniform_avx512(xr, qr, lo, hi, scale, Some((k, lo32)));
                    let mut i = lo32.wrapping_add(done as u32);
                    for (q, &x) in qr[done..].iter_mut().zip(&xr[done..]) {
                        *q = round_stochastic(scaled(x, lo, hi, scale), uniform_f32(k, i));
                        i = i.wrapping_add(1);
                    }
                });
            }
        }
        return;
    }
    quantize_chunk_body(x, qc, start, layout, p, scales, rounding)
}

/// The whole blocks of 64 of a per-tensor run, as [`scaled`] then [`round_nearest`] (`noise: None`) or
/// [`round_stochastic`] (capped at 127 like it) with [`uniform_f32`]`(key, lo32 + i)` (`Some((key, lo32))`), bit for bit: the
/// same IEEE operations in 16 lanes, except that `x / scale` is first taken as `x · (1/scale)` (a vector
/// division costs about ten times a multiplication). The two differ by at most 3 units of 2^-24 relative,
/// under 2.3e-5 on [-127, 127], so they round to the same code unless the value rounded (`t` for
/// nearest, `t + u` for stochastic) lies within [`FAST_DIV_MARGIN`] of a rounding boundary (a half-integer,
/// an integer); a block of 16 with such a lane (about 0.8% of blocks on random data) is recomputed with the
/// division. Inputs are finite (the first pass checked), so `max`/`min` need no
/// NaN handling. The 64 codes are packed to bytes with two saturating packs (exact: codes lie in
/// [-127, 127]) and one permute, one 64-byte store: AMD's truncating `vpmovdb` store is slow. Returns
/// how many elements it did.
/// How close to a rounding boundary the multiply-by-reciprocal quotient of [`quantize_uniform_avx512`] may
/// come before the exact division is taken instead: 2^-12, ten times the largest difference of the two.
#[cfg(target_arch = "x86_64")]
const FAST_DIV_MARGIN: f32 = 1.0 / 4096.0;

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2")]
unsafe fn quantize_uniform_avx512(
    xs: &[f32],
    qs: &mut [i8],
    lo: f32,
    hi: f32,
    scale: f32,
    noise: Option<(u32, u32)>,
) -> usize {
    use std::arch::x86_64::*;
    let n = xs.len().min(qs.len()) / 64 * 64;
    let (vlo, vhi, vs) = (
        _mm512_set1_ps(lo),
        _mm512_set1_ps(hi),
        _mm512_set1_ps(scale),
    );
    let (qlo, qhi) = (_mm512_set1_ps(-(QMAX as f32)), _mm512_set1_ps(QMAX as f32));
    let magic = _mm512_set1_ps(ROUND_MAGIC);
    let magic_bits = _mm512_set1_epi32(ROUND_MAGIC.to_bits() as i32);
    let order = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
    let lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    let inv24 = _mm512_set1_ps(1.0 / (1u32 << 24) as f32);
    // 1/scale is finite: scales are floored at the smallest normal f32
    let vinv = _mm512_set1_ps(1.0 / scale);
    let (margin, half_less_margin) = (
        _mm512_set1_ps(FAST_DIV_MARGIN),
        _mm512_set1_ps(0.5 - FAST_DIV_MARGIN),
    );
    // |v − the nearest integer to v|
    let off_int = |v: __m512| {
        _mm512_abs_ps(_mm512_sub_ps(
            v,
            _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(v),
        ))
    };
    let (ptr, out) = (xs.as_ptr(), qs.as_mut_ptr());
    let mut i = 0;
    while i < n {
        let mut q = [_mm512_setzero_si512(); 4];
        for (b, qb) in q.iter_mut().enumerate() {
            let v = _mm512_loadu_ps(ptr.add(i + 16 * b));
            let xc = _mm512_min_ps(_mm512_max_ps(v, vlo), vhi);
            let clamp = |t: __m512| _mm512_min_ps(_mm512_max_ps(t, qlo), qhi);
            let mut t = clamp(_mm512_mul_ps(xc, vinv));
            let exact = |xc: __m512| clamp(_mm512_div_ps(xc, vs));
            *qb = match noise {
                None => {
                    // near a half-integer: the division decides
                    if _mm512_cmp_ps_mask::<_CMP_GT_OQ>(off_int(t), half_less_margin) != 0 {
                        t = exact(xc);
                    }
                    _mm512_sub_epi32(_mm512_castps_si512(_mm512_add_ps(t, magic)), magic_bits)
                }
                Some((key, lo32)) => {
                    // hash32(index + key) for 16 consecutive indices (wrapping u32 arithmetic)
                    let base = lo32.wrapping_add((i + 16 * b) as u32).wrapping_add(key);
                    let mut h = _mm512_add_epi32(_mm512_set1_epi32(base as i32), lane);
                    h = _mm512_xor_si512(h, _mm512_srli_epi32::<16>(h));
                    h = _mm512_mullo_epi32(h, _mm512_set1_epi32(0x7feb_352d));
                    h = _mm512_xor_si512(h, _mm512_srli_epi32::<15>(h));
                    h = _mm512_mullo_epi32(h, _mm512_set1_epi32(0x846c_a68bu32 as i32));
                    h = _mm512_xor_si512(h, _mm512_srli_epi32::<16>(h));
                    let u = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_srli_epi32::<8>(h)), inv24);
                    let mut v = _mm512_add_ps(t, u);
                    // near an integer: the division decides
                    if _mm512_cmp_ps_mask::<_CMP_LT_OQ>(off_int(v), margin) != 0 {
                        v = _mm512_add_ps(exact(xc), u);
                    }
                    let s = _mm512_add_ps(v, magic);
                    let nearest = _mm512_sub_epi32(_mm512_castps_si512(s), magic_bits);
                    let up = _mm512_cmp_ps_mask::<_CMP_GT_OQ>(_mm512_sub_ps(s, magic), v);
                    let floor = _mm512_mask_sub_epi32(nearest, up, nearest, _mm512_set1_epi32(1));
                    _mm512_min_epi32(floor, _mm512_set1_epi32(QMAX as i32))
                }
            };
        }
        let w0 = _mm512_packs_epi32(q[0], q[1]);
        let w1 = _mm512_packs_epi32(q[2], q[3]);
        let bytes = _mm512_permutexvar_epi32(order, _mm512_packs_epi16(w0, w1));
        _mm512_storeu_si512(out.add(i) as *mut __m512i, bytes);
        i += 64;
    }
    n
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn quantize_chunk_avx2(
    x: &[f32],
    qc: &mut [i8],
    start: usize,
    layout: Layout,
    p: &Params,
    scales: &[f32],
    rounding: Rounding,
) {
    quantize_chunk_body(x, qc, start, layout, p, scales, rounding)
}

#[inline(always)]
fn quantize_chunk_body(
    x: &[f32],
    qc: &mut [i8],
    start: usize,
    layout: Layout,
    p: &Params,
    scales: &[f32],
    rounding: Rounding,
) {
    if layout.channels == 1 {
        // per tensor: one uniform run, called directly so it is compiled (inlined) with the caller's
        // target features rather than through the run-splitting closure
        let n = qc.len();
        quantize_run_uniform(
            &x[start..start + n],
            qc,
            p.lo[0],
            p.hi[0],
            scales[0],
            rounding,
            start,
        );
        return;
    }
    for_each_run(layout, start, start + qc.len(), |run| match run {
        Run::Uniform { pos, len, ch } => quantize_run_uniform(
            &x[pos..pos + len],
            &mut qc[pos - start..pos - start + len],
            p.lo[ch],
            p.hi[ch],
            scales[ch],
            rounding,
            pos,
        ),
        Run::Row { pos, len, ch0 } => quantize_run_row(
            &x[pos..pos + len],
            &mut qc[pos - start..pos - start + len],
            &p.lo[ch0..ch0 + len],
            &p.hi[ch0..ch0 + len],
            &scales[ch0..ch0 + len],
            rounding,
            pos,
        ),
    })
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

/// A fresh seed for stochastic rounding when the caller gives none: std's per-process random hash keys
/// (taken from the OS), a process-wide counter and the clock, mixed. Not reproducible by design.
pub fn random_seed() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(COUNTER.fetch_add(1, Ordering::Relaxed));
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    h.write_u128(nanos);
    h.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn q_nearest(x: &[f32]) -> (Vec<i8>, f32) {
        quantize_per_tensor(x, Rounding::Nearest, Clip::None).unwrap()
    }

    #[test]
    fn scale_is_absmax_over_127_and_codes_round_half_to_even() {
        let (q, s) = q_nearest(&[127.0, -63.5, 0.5, 1.5, 2.5, -0.5, -1.5, 0.0]);
        assert_eq!(s, 1.0);
        assert_eq!(q, vec![127, -64, 0, 2, 2, 0, -2, 0]);
    }

    #[test]
    fn all_zero_input_gets_scale_one() {
        let (q, s) = q_nearest(&[0.0; 10]);
        assert_eq!(s, 1.0);
        assert!(q.iter().all(|&v| v == 0));
        let (q, s) = q_nearest(&[]);
        assert_eq!((q.len(), s), (0, 1.0));
    }

    #[test]
    fn magic_rounding_matches_round_ties_even_on_the_whole_range() {
        let mut t = -127.0f32;
        while t <= 127.0 {
            assert_eq!(round_nearest(t) as f32, t.round_ties_even(), "t = {t}");
            t += 0.125;
        }
        for t in [
            -0.5f32,
            0.5,
            126.5,
            -126.5,
            0.49999997,
            -0.49999997,
            1e-30,
            -1e-30,
        ] {
            assert_eq!(round_nearest(t) as f32, t.round_ties_even(), "t = {t}");
        }
    }

    #[test]
    fn stochastic_codes_are_capped_where_the_sum_rounds_up_to_128() {
        // 127 + (1 − 2^-24) rounds to 128.0 in f32
        assert_eq!(127.0f32 + (1.0 - 1.0 / (1u32 << 24) as f32), 128.0);
        assert_eq!(
            round_stochastic(127.0, 1.0 - 1.0 / (1u32 << 24) as f32),
            127
        );
        assert_eq!(round_stochastic(-127.0, 0.0), -127);
    }

    #[test]
    fn stochastic_floor_is_exact_at_integer_boundaries() {
        assert_eq!(round_stochastic(0.0, 0.0), 0);
        assert_eq!(round_stochastic(-1e-30, 0.0), -1);
        assert_eq!(round_stochastic(-1e-30, 1.0 / (1 << 24) as f32), 0);
        assert_eq!(round_stochastic(1e-30, 1.0 - 1.0 / (1 << 24) as f32), 0);
        assert_eq!(
            round_stochastic(126.99999, 1.0 - 1.0 / (1 << 24) as f32),
            127
        );
        assert_eq!(round_stochastic(127.0, 0.999), 127);
        assert_eq!(round_stochastic(-127.0, 0.0), -127);
        assert_eq!(round_stochastic(-126.5, 0.5), -126);
        assert_eq!(round_stochastic(-126.5, 0.49), -127);
    }

    #[test]
    fn per_channel_matches_per_tensor_on_each_channel() {
        // shape (2, 3, 4) per channel along axis 1
        let x: Vec<f32> = (0..24)
            .map(|i| ((i * 7 % 11) as f32 - 5.0) * (1.0 + (i / 4 % 3) as f32))
            .collect();
        let layout = Layout::from_shape(&[2, 3, 4], Some(1), "axis").unwrap();
        assert_eq!(
            layout,
            Layout {
                outer: 2,
                channels: 3,
                inner: 4
            }
        );
        let (q, s) = quantize_per_channel(&x, layout, Rounding::Nearest, Clip::None).unwrap();
        for (c, &sc_all) in s.iter().enumerate() {
            let idx: Vec<usize> = (0..2)
                .flat_map(|o| (0..4).map(move |i| (o * 3 + c) * 4 + i))
                .collect();
            let xc: Vec<f32> = idx.iter().map(|&i| x[i]).collect();
            let (qc, sc) = q_nearest(&xc);
            assert_eq!(sc, sc_all);
            assert_eq!(qc, idx.iter().map(|&i| q[i]).collect::<Vec<_>>());
        }
    }

    #[test]
    fn last_axis_channels_use_row_runs() {
        let x: Vec<f32> = (0..15)
            .map(|i| i as f32 * if i % 3 == 0 { 10.0 } else { 1.0 })
            .collect();
        let layout = Layout::from_shape(&[5, 3], Some(-1), "axis").unwrap();
        let (q, s) = quantize_per_channel(&x, layout, Rounding::Nearest, Clip::None).unwrap();
        assert_eq!(s, vec![120.0 / 127.0, 13.0 / 127.0, 14.0 / 127.0]);
        for (i, &v) in x.iter().enumerate() {
            assert_eq!(q[i] as f32, (v / s[i % 3]).round_ties_even());
        }
    }

    #[test]
    fn minmax_clip_scales_the_range() {
        let x = [-100.0f32, 50.0, 0.0, 80.0];
        let (q, s) =
            quantize_per_tensor(&x, Rounding::Nearest, Clip::MinMax { kappa: 0.5 }).unwrap();
        // clipped to [-50, 40]: scale from 50, the two largest values land on 40
        assert_eq!(s, 50.0 / 127.0);
        assert_eq!(q, vec![-127, 102, 0, 102]);
    }

    #[test]
    fn sigma_clip_bounds_use_population_sigma() {
        let mut x = vec![0.0f32; 99];
        x.push(1000.0);
        // mean 10, σ = sqrt(9900) ≈ 99.5; hi = 10 + 1·99.5
        let (q, s) = quantize_per_tensor(&x, Rounding::Nearest, Clip::Sigma { z: 1.0 }).unwrap();
        let hi = (10.0 + 9900f64.sqrt()) as f32;
        assert_eq!(s, hi / 127.0);
        assert_eq!(q[99], 127);
        assert!(q[..99].iter().all(|&v| v == 0));
    }

    #[test]
    fn constant_channel_with_sigma_clip_keeps_its_value() {
        let x = [3.0f32; 7];
        let (q, s) = quantize_per_tensor(&x, Rounding::Nearest, Clip::Sigma { z: 2.576 }).unwrap();
        assert_eq!(s, 3.0 / 127.0);
        assert!(q.iter().all(|&v| v == 127));
    }

    #[test]
    fn bad_arguments_are_errors_not_panics() {
        let x = [1.0f32, 2.0];
        let mut q = [0i8; 2];
        let mut s = [0f32; 1];
        let l = Layout::per_tensor(2);
        assert!(quantize_into(
            &x,
            l,
            Rounding::Nearest,
            Clip::Sigma { z: 0.0 },
            &mut q,
            &mut s
        )
        .is_err());
        assert!(quantize_into(
            &x,
            l,
            Rounding::Nearest,
            Clip::Sigma { z: f64::NAN },
            &mut q,
            &mut s
        )
        .is_err());
        assert!(quantize_into(
            &x,
            l,
            Rounding::Nearest,
            Clip::MinMax { kappa: 1.5 },
            &mut q,
            &mut s
        )
        .is_err());
        assert!(quantize_into(
            &x,
            l,
            Rounding::Nearest,
            Clip::MinMax { kappa: 0.0 },
            &mut q,
            &mut s
        )
        .is_err());
        assert!(quantize_into(&x, l, Rounding::Nearest, Clip::None, &mut q[..1], &mut s).is_err());
        assert!(
            quantize_into(&x, l, Rounding::Nearest, Clip::None, &mut q, &mut [0.0; 2]).is_err()
        );
        assert!(quantize_into(
            &x,
            Layout::per_tensor(3),
            Rounding::Nearest,
            Clip::None,
            &mut q,
            &mut s
        )
        .is_err());
        assert!(Layout::from_shape(&[2, 3], Some(2), "axis").is_err());
        assert!(Layout::from_shape(&[2, 3], Some(-3), "axis").is_err());
        assert!(Layout::from_shape(&[], Some(0), "axis").is_err());
        assert!(Layout::from_shape(&[usize::MAX, 3], None, "axis").is_err());
        let mut out = [0f32; 2];
        for bad in [0.0f32, -1.0, f32::NAN, f32::INFINITY] {
            assert!(dequantize_into(&[1, 2], l, &[bad], &mut out).is_err());
        }
    }

    #[test]
    fn non_finite_input_reports_the_first_index() {
        for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
            let mut x = vec![1.0f32; 100];
            x[37] = bad;
            x[80] = bad;
            let e = quantize_per_tensor(&x, Rounding::Nearest, Clip::None).unwrap_err();
            assert_eq!(
                e,
                Error::NonFinite {
                    arg: "x",
                    index: 37
                }
            );
            let layout = Layout {
                outer: 10,
                channels: 5,
                inner: 2,
            };
            let e = quantize_per_channel(&x, layout, Rounding::Nearest, Clip::Sigma { z: 1.0 })
                .unwrap_err();
            assert_eq!(
                e,
                Error::NonFinite {
                    arg: "x",
                    index: 37
                }
            );
            let layout = Layout {
                outer: 20,
                channels: 5,
                inner: 1,
            };
            let e = quantize_per_channel(&x, layout, Rounding::Nearest, Clip::None).unwrap_err();
            assert_eq!(
                e,
                Error::NonFinite {
                    arg: "x",
                    index: 37
                }
            );
        }
    }

    #[test]
    fn empty_channels_get_scale_one() {
        let layout = Layout {
            outer: 0,
            channels: 4,
            inner: 3,
        };
        for clip in [
            Clip::None,
            Clip::Sigma { z: 1.0 },
            Clip::MinMax { kappa: 0.9 },
        ] {
            let (q, s) = quantize_per_channel(&[], layout, Rounding::Nearest, clip).unwrap();
            assert!(q.is_empty());
            assert_eq!(s, vec![1.0; 4]);
        }
        let layout = Layout {
            outer: 3,
            channels: 0,
            inner: 3,
        };
        let (q, s) = quantize_per_channel(&[], layout, Rounding::Nearest, Clip::None).unwrap();
        assert!(q.is_empty() && s.is_empty());
    }

    #[test]
    fn stochastic_noise_follows_the_index_across_a_2_pow_32_boundary() {
        let xs: Vec<f32> = (0..9).map(|i| i as f32 * 0.37 - 1.3).collect();
        let (seed, scale) = (77u64, 0.01f32);
        for pos in [(1usize << 32) - 4, 3 << 32] {
            let mut qs = vec![0i8; xs.len()];
            quantize_run_uniform(
                &xs,
                &mut qs,
                -1e9,
                1e9,
                scale,
                Rounding::Stochastic { seed },
                pos,
            );
            for (j, (&q, &x)) in qs.iter().zip(&xs).enumerate() {
                let t = scaled(x, -1e9, 1e9, scale);
                let expect = (t + stochastic_uniform(seed, (pos + j) as u64)).floor();
                assert_eq!(q as f32, expect, "index {}", pos + j);
            }
        }
    }

    #[test]
    fn stochastic_uniform_is_on_the_2_pow_minus_24_grid() {
        for i in 0..1000 {
            let u = stochastic_uniform(42, i);
            assert!((0.0..1.0).contains(&u));
            assert_eq!((u * (1u32 << 24) as f32).fract(), 0.0);
        }
        assert_ne!(stochastic_uniform(1, 0), stochastic_uniform(2, 0));
        // the high half of the index selects another key
        assert_ne!(
            stochastic_uniform(1, 5),
            stochastic_uniform(1, 5 + (1 << 32))
        );
    }

    #[test]
    fn dequantize_multiplies_by_the_channel_scale() {
        let layout = Layout {
            outer: 2,
            channels: 2,
            inner: 1,
        };
        let mut out = [0f32; 4];
        dequantize_into(&[1, -2, 3, 127], layout, &[0.5, 2.0], &mut out).unwrap();
        assert_eq!(out, [0.5, -4.0, 1.5, 254.0]);
        assert_eq!(
            dequantize_per_tensor(&[-127, 4], 0.25).unwrap(),
            vec![-31.75, 1.0]
        );
    }

    #[test]
    fn random_seeds_differ() {
        assert_ne!(random_seed(), random_seed());
    }

    #[test]
    fn quantize_with_scale_matches_quantize_into_and_absmax() {
        let x: Vec<f32> = (0..10_000)
            .map(|i| ((i * 7919 % 1000) as f32 - 500.0) / 37.0)
            .collect();
        let (q, s) = quantize_per_tensor(&x, Rounding::Nearest, Clip::None).unwrap();
        assert_eq!(scale_for_absmax(absmax(&x)), s);
        let mut q2 = vec![0i8; x.len()];
        quantize_nearest_with_scale(&x, s, &mut q2).unwrap();
        assert_eq!(q, q2);
        // a smaller scale saturates instead of wrapping
        quantize_nearest_with_scale(&x, s / 4.0, &mut q2).unwrap();
        assert!(q2.iter().all(|&v| v >= -127) && q2.contains(&127));
        assert!(quantize_nearest_with_scale(&x, 0.0, &mut q2).is_err());
        assert!(quantize_nearest_with_scale(&x, 1.0, &mut q2[..5]).is_err());
        assert_eq!(scale_for_absmax(0.0), 1.0);
    }
}
