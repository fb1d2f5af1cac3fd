//! The element-wise quantize loops: clip, divide by the scale, round (nearest or stochastic) and store
//! codes, per run of a layout; compiled for AVX-512 and AVX2 where the CPU has them (bit-identical to the
//! portable build) and dispatched per chunk ([`quantize_chunk`]).

use super::rng::{for_each_key_block, stream_key, uniform_f32};
use super::stats::Params;
#[cfg(target_arch = "x86_64")]
use super::{avx2_ok, avx512_ok};
use super::{for_each_run, Layout, Rounding, Run, QMAX};

/// Adding and subtracting 1.5·2^23 rounds an f32 of magnitude < 2^22 to an integer, ties to even, in
/// the default rounding mode; unlike `round_ties_even` it vectorises without SSE4.1.
const ROUND_MAGIC: f32 = 12_582_912.0;

/// `clamp(c(x)/scale, -127, 127)` in f32 (the quotient is a division, as the spec requires).
#[inline(always)]
pub(super) fn scaled(x: f32, lo: f32, hi: f32, scale: f32) -> f32 {
    let t = x.max(lo).min(hi) / scale;
    t.max(-(QMAX as f32)).min(QMAX as f32)
}

/// Round half to even of `t` in [-127, 127]: `t + 1.5·2^23` lands where the f32 spacing is exactly 1, so
/// the addition rounds (ties to even) and the integer sits in the low mantissa bits. Pure vector
/// arithmetic, unlike `round_ties_even` (SSE4.1) or the saturating `as i32`.
#[inline(always)]
pub(super) fn round_nearest(t: f32) -> i8 {
    ((t + ROUND_MAGIC).to_bits() as i32).wrapping_sub(ROUND_MAGIC.to_bits() as i32) as i8
}

/// `min(floor(t + u), 127)` with the sum `t + u` an IEEE f32 addition (round to nearest even), `t` in
/// [-127, 127] and `u` in [0, 1) a multiple of 2^-24. The sum is exact unless `t`'s ulp exceeds 2^-24;
/// the rounding biases the expected code by less than 2^-18 (half the f32 ulp at 127). It can round
/// `127 + u` up to 128 (u ≥ 1 − 2^-18), hence the cap: codes stay in [-127, 127]. The floor is
/// round-to-nearest (magic constant) minus one where that rounded up; everything stays in 32-bit
/// vector lanes.
#[inline(always)]
pub(super) fn round_stochastic(t: f32, u: f32) -> i8 {
    let v = t + u;
    let s = v + ROUND_MAGIC;
    let nearest = (s.to_bits() as i32).wrapping_sub(ROUND_MAGIC.to_bits() as i32);
    let rounded_up = ((s - ROUND_MAGIC) > v) as i32;
    (nearest - rounded_up).min(QMAX as i32) as i8
}

#[inline(always)]
pub(super) fn quantize_run_uniform(
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

/// Quantizes the elements `start..start + qc.len()` into `qc`. On x86-64 the runs of one channel take an
/// explicit AVX-512 ([`quantize_uniform_avx512`], per-tensor layouts) or AVX2 ([`quantize_uniform_avx2`])
/// loop, and the rest the portable code compiled again for that ISA; the bits are the same on every build
/// (every step is an exactly rounded IEEE operation or integer arithmetic, nothing contracted into FMA,
/// and the loops' reciprocal falls back to the division near a rounding boundary).
pub(super) fn quantize_chunk(
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
        if avx2_ok() {
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
        let (lo, hi, scale) = (p.lo[0], p.hi[0], scales[0]);
        let blocks = |xr: &[f32], qr: &mut [i8], noise| {
            // SAFETY: the CPU has these features (this function's contract).
            unsafe { quantize_uniform_avx512(xr, qr, lo, hi, scale, noise) }
        };
        let xs = &x[start..start + n];
        quantize_run_uniform_blocks(xs, qc, lo, hi, scale, rounding, start, blocks);
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
    // (one test for either rounding: a value within the margin of a half-integer (nearest) or of an
    // integer (stochastic: its distance from floor + ½))
    let half_less_margin = _mm512_set1_ps(0.5 - FAST_DIV_MARGIN);
    let abs = |v: __m512| _mm512_abs_ps(v);
    // activations are not clipped (lo, hi = ∓inf): no clip operations then
    let clips = lo != f32::NEG_INFINITY || hi != f32::INFINITY;
    let (ptr, out) = (xs.as_ptr(), qs.as_mut_ptr());
    let half = _mm512_set1_ps(0.5);
    // index + key of each lane of the next block of 16 (stochastic rounding)
    let mut hidx = match noise {
        Some((key, lo32)) => {
            _mm512_add_epi32(_mm512_set1_epi32(lo32.wrapping_add(key) as i32), lane)
        }
        None => lane,
    };
    let mut i = 0;
    while i < n {
        let mut q = [_mm512_setzero_si512(); 4];
        for (b, qb) in q.iter_mut().enumerate() {
            let v = _mm512_loadu_ps(ptr.add(i + 16 * b));
            let xc = if clips {
                _mm512_min_ps(_mm512_max_ps(v, vlo), vhi)
            } else {
                v
            };
            *qb = match noise {
                None => {
                    let clamp = |t: __m512| _mm512_min_ps(_mm512_max_ps(t, qlo), qhi);
                    let mut t = clamp(_mm512_mul_ps(xc, vinv));
                    let mut s = _mm512_add_ps(t, magic);
                    // near a half-integer (|t − nearest integer| = |t − (s − magic)|): the division decides
                    let off = abs(_mm512_sub_ps(t, _mm512_sub_ps(s, magic)));
                    if _mm512_cmp_ps_mask::<_CMP_GT_OQ>(off, half_less_margin) != 0 {
                        t = clamp(_mm512_div_ps(xc, vs));
                        s = _mm512_add_ps(t, magic);
                    }
                    _mm512_sub_epi32(_mm512_castps_si512(s), magic_bits)
                }
                Some(_) => {
                    // hash32(index + key) of the block's 16 consecutive indices (wrapping u32)
                    let mut h = hidx;
                    hidx = _mm512_add_epi32(hidx, _mm512_set1_epi32(16));
                    h = _mm512_xor_si512(h, _mm512_srli_epi32::<16>(h));
                    h = _mm512_mullo_epi32(h, _mm512_set1_epi32(0x7feb_352d));
                    h = _mm512_xor_si512(h, _mm512_srli_epi32::<15>(h));
                    h = _mm512_mullo_epi32(h, _mm512_set1_epi32(0x846c_a68bu32 as i32));
                    h = _mm512_xor_si512(h, _mm512_srli_epi32::<16>(h));
                    // u·2^24 (exact): v = t + u with one rounding, as the reference's addition (the
                    // product by 2^-24 is exact)
                    let u24 = _mm512_cvtepi32_ps(_mm512_srli_epi32::<8>(h));
                    // Only the lower clamp of `scaled` is applied here: above 127 the sum is ≥ 127 and the
                    // final cap gives 127 either way, while below −127 the clamp matters (−127 + u can round
                    // up to −126, which the reference gives).
                    let low = |t: __m512| _mm512_max_ps(t, qlo);
                    const FLOOR: i32 = _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC;
                    let mut v = _mm512_fmadd_ps(u24, inv24, low(_mm512_mul_ps(xc, vinv)));
                    let mut fl = _mm512_roundscale_ps::<FLOOR>(v);
                    // within the margin of an integer (|frac − ½| ≥ ½ − margin; an inexact `v − floor`
                    // only errs towards this side): the division decides
                    let frac = _mm512_sub_ps(v, fl);
                    if _mm512_cmp_ps_mask::<_CMP_GE_OQ>(
                        abs(_mm512_sub_ps(frac, half)),
                        half_less_margin,
                    ) != 0
                    {
                        v = _mm512_fmadd_ps(u24, inv24, low(_mm512_div_ps(xc, vs)));
                        fl = _mm512_roundscale_ps::<FLOOR>(v);
                    }
                    // floor(v) is an integer in [-127, 128]: converted exactly, then capped
                    _mm512_min_epi32(_mm512_cvttps_epi32(fl), _mm512_set1_epi32(QMAX as i32))
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

/// The AVX2 build: per-tensor layouts and the per-channel runs of one channel (`Run::Uniform`) take the
/// explicit 8-lane loop [`quantize_uniform_avx2`], which multiplies by the reciprocal and divides only
/// near a rounding boundary where the autovectorised body divides every value (that body was 7.5% of an
/// INT8 training epoch on an AMD Zen 1); row runs (channels on the last axis) keep the body.
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
    let uniform = |xs: &[f32], qs: &mut [i8], lo, hi, scale, pos| {
        // SAFETY: the CPU has AVX2 (this function's contract).
        unsafe { quantize_run_uniform_avx2(xs, qs, lo, hi, scale, rounding, pos) }
    };
    quantize_chunk_runs(x, qc, start, layout, p, scales, rounding, uniform)
}

/// [`quantize_run_uniform`] with its whole blocks of 32 on [`quantize_uniform_avx2`] (same bits).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
pub(super) unsafe fn quantize_run_uniform_avx2(
    xs: &[f32],
    qs: &mut [i8],
    lo: f32,
    hi: f32,
    scale: f32,
    rounding: Rounding,
    pos: usize,
) {
    let blocks = |xr: &[f32], qr: &mut [i8], noise| {
        // SAFETY: the CPU has AVX2 (this function's contract).
        unsafe { quantize_uniform_avx2(xr, qr, lo, hi, scale, noise) }
    };
    quantize_run_uniform_blocks(xs, qs, lo, hi, scale, rounding, pos, blocks)
}

/// [`quantize_run_uniform`] of the run at flat index `pos`, its leading whole SIMD blocks done by
/// `blocks(xs, qs, noise)` (which returns how many elements it did; `noise` is `Some((key, lo32))` of
/// the key block for stochastic rounding, as [`quantize_uniform_avx512`] takes it) and the rest by the
/// scalar code. `blocks` is a closure created inside the caller's `target_feature` function, so it
/// inlines with those features.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn quantize_run_uniform_blocks(
    xs: &[f32],
    qs: &mut [i8],
    lo: f32,
    hi: f32,
    scale: f32,
    rounding: Rounding,
    pos: usize,
    mut blocks: impl FnMut(&[f32], &mut [i8], Option<(u32, u32)>) -> usize,
) {
    match rounding {
        Rounding::Nearest => {
            let done = blocks(xs, qs, None);
            quantize_run_uniform(
                &xs[done..],
                &mut qs[done..],
                lo,
                hi,
                scale,
                rounding,
                pos + done,
            );
        }
        Rounding::Stochastic { seed } => {
            for_each_key_block(stream_key(seed), pos, xs.len(), |k, lo32, r| {
                let (xr, qr) = (&xs[r.clone()], &mut qs[r.clone()]);
                let done = blocks(xr, qr, Some((k, lo32)));
                let mut i = lo32.wrapping_add(done as u32);
                for (q, &x) in qr[done..].iter_mut().zip(&xr[done..]) {
                    *q = round_stochastic(scaled(x, lo, hi, scale), uniform_f32(k, i));
                    i = i.wrapping_add(1);
                }
            });
        }
    }
}

/// [`quantize_uniform_avx512`] in 8-lane AVX2 vectors, blocks of 32: the same operations and the same
/// fall-back to the division near a rounding boundary (per vector of 8), so the same bits as [`scaled`]
/// with [`round_nearest`] or [`round_stochastic`]. The floor is `vroundps` (AVX, exact); `t + u` is a
/// multiplication of `u·2^24` by 2^-24 (exact) then one addition, as in the reference (no FMA needed).
/// The cap at 127 is left to the saturating packs (a floor of 128 packs to 127). Returns how many
/// elements it did.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn quantize_uniform_avx2(
    xs: &[f32],
    qs: &mut [i8],
    lo: f32,
    hi: f32,
    scale: f32,
    noise: Option<(u32, u32)>,
) -> usize {
    use std::arch::x86_64::*;
    let n = xs.len().min(qs.len()) / 32 * 32;
    let (vlo, vhi, vs) = (
        _mm256_set1_ps(lo),
        _mm256_set1_ps(hi),
        _mm256_set1_ps(scale),
    );
    let (qlo, qhi) = (_mm256_set1_ps(-(QMAX as f32)), _mm256_set1_ps(QMAX as f32));
    let magic = _mm256_set1_ps(ROUND_MAGIC);
    let magic_bits = _mm256_set1_epi32(ROUND_MAGIC.to_bits() as i32);
    // after the two in-lane packs the 4-byte groups are q0a q1a q2a q3a q0b q1b q2b q3b
    let order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    let lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    let inv24 = _mm256_set1_ps(1.0 / (1u32 << 24) as f32);
    // 1/scale is finite: scales are floored at the smallest normal f32
    let vinv = _mm256_set1_ps(1.0 / scale);
    let half_less_margin = _mm256_set1_ps(0.5 - FAST_DIV_MARGIN);
    let sign = _mm256_set1_ps(-0.0);
    let abs = |v: __m256| _mm256_andnot_ps(sign, v);
    let clips = lo != f32::NEG_INFINITY || hi != f32::INFINITY;
    let (ptr, out) = (xs.as_ptr(), qs.as_mut_ptr());
    let half = _mm256_set1_ps(0.5);
    let mut hidx = match noise {
        Some((key, lo32)) => {
            _mm256_add_epi32(_mm256_set1_epi32(lo32.wrapping_add(key) as i32), lane)
        }
        None => lane,
    };
    let mut i = 0;
    while i < n {
        let mut q = [_mm256_setzero_si256(); 4];
        for (b, qb) in q.iter_mut().enumerate() {
            let v = _mm256_loadu_ps(ptr.add(i + 8 * b));
            let xc = if clips {
                _mm256_min_ps(_mm256_max_ps(v, vlo), vhi)
            } else {
                v
            };
            *qb = match noise {
                None => {
                    let clamp = |t: __m256| _mm256_min_ps(_mm256_max_ps(t, qlo), qhi);
                    let mut t = clamp(_mm256_mul_ps(xc, vinv));
                    let mut s = _mm256_add_ps(t, magic);
                    let off = abs(_mm256_sub_ps(t, _mm256_sub_ps(s, magic)));
                    if _mm256_movemask_ps(_mm256_cmp_ps::<_CMP_GT_OQ>(off, half_less_margin)) != 0 {
                        t = clamp(_mm256_div_ps(xc, vs));
                        s = _mm256_add_ps(t, magic);
                    }
                    _mm256_sub_epi32(_mm256_castps_si256(s), magic_bits)
                }
                Some(_) => {
                    let mut h = hidx;
                    hidx = _mm256_add_epi32(hidx, _mm256_set1_epi32(8));
                    h = _mm256_xor_si256(h, _mm256_srli_epi32::<16>(h));
                    h = _mm256_mullo_epi32(h, _mm256_set1_epi32(0x7feb_352d));
                    h = _mm256_xor_si256(h, _mm256_srli_epi32::<15>(h));
                    h = _mm256_mullo_epi32(h, _mm256_set1_epi32(0x846c_a68bu32 as i32));
                    h = _mm256_xor_si256(h, _mm256_srli_epi32::<16>(h));
                    let u = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_srli_epi32::<8>(h)), inv24);
                    // only the lower clamp (see `quantize_uniform_avx512`)
                    let low = |t: __m256| _mm256_max_ps(t, qlo);
                    let mut v = _mm256_add_ps(low(_mm256_mul_ps(xc, vinv)), u);
                    let mut fl = _mm256_floor_ps(v);
                    let frac = _mm256_sub_ps(v, fl);
                    let near = _mm256_cmp_ps::<_CMP_GE_OQ>(
                        abs(_mm256_sub_ps(frac, half)),
                        half_less_margin,
                    );
                    if _mm256_movemask_ps(near) != 0 {
                        v = _mm256_add_ps(low(_mm256_div_ps(xc, vs)), u);
                        fl = _mm256_floor_ps(v);
                    }
                    // floor(v) is an integer in [-127, 128]; the saturating packs below cap 128 at 127
                    _mm256_cvttps_epi32(fl)
                }
            };
        }
        let w0 = _mm256_packs_epi32(q[0], q[1]);
        let w1 = _mm256_packs_epi32(q[2], q[3]);
        let bytes = _mm256_permutevar8x32_epi32(_mm256_packs_epi16(w0, w1), order);
        _mm256_storeu_si256(out.add(i) as *mut __m256i, bytes);
        i += 32;
    }
    n
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
    let uniform = |xs: &[f32], qs: &mut [i8], lo, hi, scale, pos| {
        quantize_run_uniform(xs, qs, lo, hi, scale, rounding, pos)
    };
    quantize_chunk_runs(x, qc, start, layout, p, scales, rounding, uniform)
}

/// Quantizes the elements `start..start + qc.len()` run by run: `uniform(xs, qs, lo, hi, scale, pos)`
/// does the runs of one channel (the whole chunk when per tensor), [`quantize_run_row`] the rows of
/// channels on the last axis. `uniform` is a closure created in the caller, so it inlines with the
/// caller's target features.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn quantize_chunk_runs(
    x: &[f32],
    qc: &mut [i8],
    start: usize,
    layout: Layout,
    p: &Params,
    scales: &[f32],
    rounding: Rounding,
    mut uniform: impl FnMut(&[f32], &mut [i8], f32, f32, f32, usize),
) {
    if layout.channels == 1 {
        // per tensor: one uniform run, called directly rather than through the run-splitting closure
        let n = qc.len();
        uniform(&x[start..start + n], qc, p.lo[0], p.hi[0], scales[0], start);
        return;
    }
    for_each_run(layout, start, start + qc.len(), |run| match run {
        Run::Uniform { pos, len, ch } => uniform(
            &x[pos..pos + len],
            &mut qc[pos - start..pos - start + len],
            p.lo[ch],
            p.hi[ch],
            scales[ch],
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
