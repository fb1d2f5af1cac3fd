//! Statistics of the values to quantize (min, max and, for sigma clipping, mean and σ; per tensor or per
//! channel, in an order fixed by the layout alone), the clip bounds they give and the scales.

#[cfg(target_arch = "x86_64")]
use super::{avx2_ok, avx512_ok};
use super::{map_indices, parallel_for, Clip, Layout, QMAX};
use crate::error::{Error, Result};
use crate::threads;

/// Per-tensor statistics are reduced over chunks of this many elements, combined in chunk order.
const STATS_CHUNK: usize = 1 << 16;
/// Independent accumulators per reduction, so the compiler can keep them in one vector register.
const LANES: usize = 8;

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
pub(super) struct ChannelStats {
    min: Vec<f32>,
    max: Vec<f32>,
    /// Sum (then mean), only for sigma clipping.
    mean: Vec<f64>,
    /// Sum of squared deviations (then σ), only for sigma clipping.
    sd: Vec<f64>,
}

impl ChannelStats {
    /// One channel's min and max (no moments: not for sigma clipping).
    pub(super) fn of_range(min: f32, max: f32) -> Self {
        ChannelStats {
            min: vec![min],
            max: vec![max],
            mean: Vec::new(),
            sd: Vec::new(),
        }
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
pub(super) fn first_pass_chunk(xs: &[f32], want_sum: bool) -> (f32, f32, f64, bool) {
    #[cfg(target_arch = "x86_64")]
    {
        if avx512_ok() {
            // SAFETY: the CPU supports these features, checked just above.
            return unsafe { first_pass_chunk_avx512(xs, want_sum) };
        }
        if avx2_ok() {
            // SAFETY: as above.
            return unsafe { first_pass_chunk_avx2(xs, want_sum) };
        }
    }
    first_pass_uniform(std::iter::once((0, xs.len())), xs, want_sum)
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
/// `(min, max, has non-finite)` of `x` on the chunks and combination order of [`tensor_stats`].
pub(super) fn tensor_min_max(x: &[f32]) -> (f32, f32, bool) {
    let n = x.len();
    let parts = map_indices(n.div_ceil(STATS_CHUNK), parallel_for(n), |i| {
        first_pass_chunk(&x[i * STATS_CHUNK..((i + 1) * STATS_CHUNK).min(n)], false)
    });
    let (mut mn, mut mx, mut bad) = (f32::INFINITY, f32::NEG_INFINITY, false);
    for &(a, b, _, nf) in &parts {
        mn = mn.min(a);
        mx = mx.max(b);
        bad |= nf;
    }
    (mn, mx, bad)
}

pub(super) fn tensor_stats(x: &[f32], want_sigma: bool) -> Result<ChannelStats> {
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
pub(super) fn channel_stats(x: &[f32], layout: Layout, want_sigma: bool) -> Result<ChannelStats> {
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
pub(super) fn first_non_finite(x: &[f32]) -> Error {
    let index = x.iter().position(|v| !v.is_finite()).unwrap_or(0);
    Error::NonFinite { arg: "x", index }
}

/// Clip bounds and scales per channel from the statistics.
pub(super) struct Params {
    pub lo: Vec<f32>,
    pub hi: Vec<f32>,
}

pub(super) fn params(st: &ChannelStats, clip: Clip, scales: &mut [f32]) -> Params {
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
