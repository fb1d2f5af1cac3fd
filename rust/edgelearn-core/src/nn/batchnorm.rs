//! 2-D batch normalisation over NCHW (statistics per channel over N, H, W), PyTorch semantics:
//! training normalises with the biased batch variance and updates the running variance with the
//! unbiased one; evaluation uses the running statistics.

#[cfg(target_arch = "x86_64")]
use super::elementwise_avx2;
use super::{check_len, for_each_chunk, worth_parallel};
use crate::error::{Error, Result};
use crate::quant::{abs_bits, ActRange, AmaxAcc};

/// `f(i, row)` for every image `i`, `row` its `c` entries (at `i·c..(i + 1)·c`, each a reduction over one
/// plane). In the pool the work is split by image: each worker reads whole, contiguous images, the same split
/// as the element-wise passes before and after, so the data stays in that core's cache.
fn per_image<T: Copy + Default + Send>(
    n: usize,
    c: usize,
    parallel: bool,
    f: impl Fn(usize, &mut [T]) + Sync + Send,
) -> Vec<T> {
    let mut parts = vec![T::default(); n * c];
    for_each_chunk(&mut parts, c, parallel, f);
    parts
}

/// Per-channel sums of the pairs `pair(parts[i·c + ch])` over the images, in image order.
pub(super) fn sum_in_image_order<T>(
    parts: &[T],
    c: usize,
    pair: impl Fn(&T) -> (f64, f64),
) -> Vec<(f64, f64)> {
    (0..c)
        .map(|ch| {
            let (mut a, mut b) = (0.0, 0.0);
            for part in parts.iter().skip(ch).step_by(c.max(1)) {
                let (da, db) = pair(part);
                a += da;
                b += db;
            }
            (a, b)
        })
        .collect()
}

/// `(Σ fa(u, v), Σ fb(u, v))` over paired elements, accumulated in 8 f32 lanes per block of 512 and in
/// f64 across blocks (vectorises, and stays accurate over large batches). Two functions rather than one
/// returning a pair, so each sum is its own 8-lane loop the vectoriser turns into one vector operation.
#[inline(always)]
fn pair_sums<V: Copy>(
    u: &[f32],
    v: &[V],
    fa: impl Fn(f32, V) -> f32,
    fb: impl Fn(f32, V) -> f32,
) -> (f64, f64) {
    let (mut s0, mut s1) = (0f64, 0f64);
    for (ub, vb) in u.chunks(512).zip(v.chunks(512)) {
        let (mut l0, mut l1) = ([0f32; 8], [0f32; 8]);
        for (uc, vc) in ub.chunks_exact(8).zip(vb.chunks_exact(8)) {
            let (uc, vc): (&[f32; 8], &[V; 8]) = (uc.try_into().unwrap(), vc.try_into().unwrap());
            for t in 0..8 {
                l0[t] += fa(uc[t], vc[t]);
            }
            for t in 0..8 {
                l1[t] += fb(uc[t], vc[t]);
            }
        }
        let tail = ub.len() / 8 * 8;
        for (&a, &b) in ub[tail..].iter().zip(&vb[tail..]) {
            s0 += fa(a, b) as f64;
            s1 += fb(a, b) as f64;
        }
        if tail > 0 {
            // (a chunk of fewer than 8 values has only zero lanes: adding them changes nothing, as the
            // sums, started at +0.0, are never -0.0)
            s0 += l0.iter().map(|&x| x as f64).sum::<f64>();
            s1 += l1.iter().map(|&x| x as f64).sum::<f64>();
        }
    }
    (s0, s1)
}

/// A saved BatchNorm input element: FP32, or an int8 code read as `code · scale`.
pub(crate) trait Saved: Copy + Sync + Send {
    fn value(self, scale: f32) -> f32;
    /// `value` of 8 consecutive elements (`scale` broadcast), with the same roundings.
    ///
    /// # Safety
    /// 8 elements are readable at `p`; only called from AVX2 code.
    #[cfg(target_arch = "x86_64")]
    unsafe fn values8(p: *const Self, scale: avx2::__m256) -> avx2::__m256;
}
impl Saved for f32 {
    #[inline(always)]
    fn value(self, _scale: f32) -> f32 {
        self
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn values8(p: *const Self, _scale: avx2::__m256) -> avx2::__m256 {
        avx2::_mm256_loadu_ps(p)
    }
}
impl Saved for i8 {
    #[inline(always)]
    fn value(self, scale: f32) -> f32 {
        self as f32 * scale
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn values8(p: *const Self, scale: avx2::__m256) -> avx2::__m256 {
        use avx2::*;
        let codes = _mm256_cvtepi8_epi32(_mm_loadl_epi64(p as *const __m128i));
        _mm256_mul_ps(_mm256_cvtepi32_ps(codes), scale)
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    pub(super) use std::arch::x86_64::*;

    /// [`super::pair_sums`] with its 8 lanes in one AVX register: `lanes(u8, v8)` gives both lane vectors.
    /// The same operations in the same order (lane-wise adds, then the tail, then the lanes in f64), so
    /// the result is bit-identical to the portable loop.
    ///
    /// # Safety
    /// The CPU has AVX2; `u` and `v` have the same length.
    #[inline(always)]
    pub(super) unsafe fn pair_sums<V: super::Saved>(
        u: &[f32],
        v: &[V],
        scale: f32,
        lanes: impl Fn(__m256, __m256) -> (__m256, __m256),
        fa: impl Fn(f32, V) -> f32,
        fb: impl Fn(f32, V) -> f32,
    ) -> (f64, f64) {
        debug_assert_eq!(u.len(), v.len());
        let sc = _mm256_set1_ps(scale);
        let (mut s0, mut s1) = (0f64, 0f64);
        let mut start = 0;
        while start < u.len() {
            let end = (start + 512).min(u.len());
            let full = start + (end - start) / 8 * 8;
            let (mut l0, mut l1) = (_mm256_setzero_ps(), _mm256_setzero_ps());
            let mut i = start;
            while i < full {
                let (a, b) = lanes(
                    _mm256_loadu_ps(u.as_ptr().add(i)),
                    V::values8(v.as_ptr().add(i), sc),
                );
                l0 = _mm256_add_ps(l0, a);
                l1 = _mm256_add_ps(l1, b);
                i += 8;
            }
            for j in full..end {
                s0 += fa(u[j], v[j]) as f64;
                s1 += fb(u[j], v[j]) as f64;
            }
            let (mut a8, mut b8) = ([0f32; 8], [0f32; 8]);
            _mm256_storeu_ps(a8.as_mut_ptr(), l0);
            _mm256_storeu_ps(b8.as_mut_ptr(), l1);
            s0 += a8.iter().map(|&x| x as f64).sum::<f64>();
            s1 += b8.iter().map(|&x| x as f64).sum::<f64>();
            start = end;
        }
        (s0, s1)
    }
}

// The hot loops below are instantiated twice: as built, and inside a `#[target_feature(enable =
// "avx2,fma")]` function (picked at run time, see `super::elementwise_avx2`). Their per-element closures
// are created inside those functions, so they inherit the features and inline into the vector loop.

/// Planes shorter than this (the 2x2 and 1x1 maps late in a network, one call per image and channel) take
/// the portable loops: for them the AVX2 call, its lane reductions and tail cost more than the arithmetic
/// (BatchNorm + ReLU + pooling forward of a (32, 64, 2, 2) batch: 95 µs, mostly per-plane overhead). A
/// plane shorter than one vector is all tail either way, so the sums are the same bits.
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
pub(super) const SIMD_MIN: usize = 8;

/// Forward statistics of one plane: `(Σ d, Σ d²)` with `d = x − shift`.
fn stat_sums(p: &[f32], shift: f32) -> (f64, f64) {
    #[cfg(target_arch = "x86_64")]
    if elementwise_avx2() && p.len() >= SIMD_MIN {
        #[target_feature(enable = "avx2,fma")]
        unsafe fn with_avx2(p: &[f32], shift: f32) -> (f64, f64) {
            use avx2::*;
            let sv = _mm256_set1_ps(shift);
            avx2::pair_sums(
                p,
                p,
                1.0,
                |u, _| {
                    let d = _mm256_sub_ps(u, sv);
                    (d, _mm256_mul_ps(d, d))
                },
                |v, _| v - shift,
                |v, _| (v - shift) * (v - shift),
            )
        }
        // SAFETY: the CPU has AVX2 and FMA.
        return unsafe { with_avx2(p, shift) };
    }
    pair_sums(p, p, |v, _| v - shift, |v, _| (v - shift) * (v - shift))
}

/// [`stat_sums`] of every plane of one image (`xi`: `C` planes of `hw` values, `shifts[ch]` each), handed
/// to `put(ch, sums)`, bit for bit. Planes shorter than [`SIMD_MIN`] are taken 8 channels at a time, one
/// plane per lane, each lane adding its plane's values in order from 0 as the portable loop does: on the
/// 4x4 and 2x2 maps of a small network a call per plane cost several times its arithmetic.
fn image_stat_sums(xi: &[f32], hw: usize, shifts: &[f32], mut put: impl FnMut(usize, (f64, f64))) {
    let c = shifts.len();
    debug_assert_eq!(xi.len(), c * hw);
    let mut ch0 = 0;
    if hw < SIMD_MIN {
        while ch0 + 8 <= c {
            let block = &xi[ch0 * hw..(ch0 + 8) * hw];
            let sh: [f32; 8] = shifts[ch0..ch0 + 8].try_into().unwrap();
            let (mut a, mut b) = ([0f64; 8], [0f64; 8]);
            for t in 0..hw {
                for l in 0..8 {
                    let d = block[l * hw + t] - sh[l];
                    a[l] += d as f64;
                    b[l] += (d * d) as f64;
                }
            }
            for l in 0..8 {
                put(ch0 + l, (a[l], b[l]));
            }
            ch0 += 8;
        }
    }
    for ch in ch0..c {
        put(ch, stat_sums(&xi[ch * hw..(ch + 1) * hw], shifts[ch]));
    }
}

/// Backward sums of one plane: `(Σ dy, Σ dy·(x − mu))`.
pub(super) fn grad_sums<X: Saved>(dy: &[f32], x: &[X], scale: f32, mu: f32) -> (f64, f64) {
    #[cfg(target_arch = "x86_64")]
    if elementwise_avx2() && dy.len() >= SIMD_MIN {
        #[target_feature(enable = "avx2,fma")]
        unsafe fn with_avx2<X: Saved>(dy: &[f32], x: &[X], scale: f32, mu: f32) -> (f64, f64) {
            use avx2::*;
            let mv = _mm256_set1_ps(mu);
            avx2::pair_sums(
                dy,
                x,
                scale,
                |g, xv| (g, _mm256_mul_ps(g, _mm256_sub_ps(xv, mv))),
                |g, _| g,
                |g, v: X| g * (v.value(scale) - mu),
            )
        }
        // SAFETY: the CPU has AVX2 and FMA.
        return unsafe { with_avx2(dy, x, scale, mu) };
    }
    pair_sums(dy, x, |g, _| g, |g, v: X| g * (v.value(scale) - mu))
}

/// [`grad_sums`] of consecutive planes of `hw` values (`dy`, `x` hold whole planes; plane `j` with mean
/// `mu(j)`), handed to `put(j, sums)`, bit for bit. Planes shorter than [`SIMD_MIN`] are taken 8 at a time,
/// one plane per lane, each lane adding its plane's values in order from 0 as the portable loop does (see
/// [`image_stat_sums`]).
pub(super) fn planes_grad_sums<X: Saved>(
    dy: &[f32],
    x: &[X],
    hw: usize,
    scale: f32,
    mu: impl Fn(usize) -> f32,
    mut put: impl FnMut(usize, (f64, f64)),
) {
    debug_assert_eq!(dy.len(), x.len());
    let planes = dy.len().checked_div(hw).unwrap_or(0);
    let mut j0 = 0;
    if hw < SIMD_MIN {
        while j0 + 8 <= planes {
            let (g, v) = (&dy[j0 * hw..(j0 + 8) * hw], &x[j0 * hw..(j0 + 8) * hw]);
            let m: [f32; 8] = std::array::from_fn(|l| mu(j0 + l));
            let (mut a, mut b) = ([0f64; 8], [0f64; 8]);
            for t in 0..hw {
                for l in 0..8 {
                    let gv = g[l * hw + t];
                    a[l] += gv as f64;
                    b[l] += (gv * (v[l * hw + t].value(scale) - m[l])) as f64;
                }
            }
            for l in 0..8 {
                put(j0 + l, (a[l], b[l]));
            }
            j0 += 8;
        }
    }
    for j in j0..planes {
        let r = j * hw..(j + 1) * hw;
        put(j, grad_sums(&dy[r.clone()], &x[r], scale, mu(j)));
    }
}

/// `o = g·a + x·b + k` element-wise; `g = None` reads `o` itself as `g` (in place).
pub(super) fn affine3<X: Saved>(
    o: &mut [f32],
    g: Option<&[f32]>,
    x: &[X],
    scale: f32,
    abk: (f32, f32, f32),
) {
    #[inline(always)]
    fn body<X: Saved>(
        o: &mut [f32],
        g: Option<&[f32]>,
        x: &[X],
        scale: f32,
        (a, b, k): (f32, f32, f32),
    ) {
        match g {
            Some(g) => {
                for ((o, &g), &v) in o.iter_mut().zip(g).zip(x) {
                    *o = g * a + v.value(scale) * b + k;
                }
            }
            None => {
                for (o, &v) in o.iter_mut().zip(x) {
                    *o = *o * a + v.value(scale) * b + k;
                }
            }
        }
    }
    #[cfg(target_arch = "x86_64")]
    if elementwise_avx2() && o.len() >= SIMD_MIN {
        #[target_feature(enable = "avx2,fma")]
        unsafe fn avx2<X: Saved>(
            o: &mut [f32],
            g: Option<&[f32]>,
            x: &[X],
            scale: f32,
            abk: (f32, f32, f32),
        ) {
            body(o, g, x, scale, abk)
        }
        // SAFETY: the CPU has AVX2 and FMA.
        return unsafe { avx2(o, g, x, scale, abk) };
    }
    body(o, g, x, scale, abk)
}

fn opt_len(arg: &'static str, v: Option<&[f32]>, c: usize) -> Result<()> {
    match v {
        Some(v) => check_len(arg, v.len(), &[c]),
        None => Ok(()),
    }
}

/// Forward. `x`, `y`: `(N, C, H, W)`; `gamma`, `beta` (none: 1 and 0), `running_mean`, `running_var`,
/// `mean`, `invstd`: `C` values. Writes `y` and the statistics used (`mean`, `invstd = 1/√(var+eps)`);
/// in training also updates the running statistics in place with `momentum` (PyTorch's convention:
/// `running = (1−momentum)·running + momentum·batch`).
#[allow(clippy::too_many_arguments)]
pub(super) fn forward_coefficients(
    x: &[f32],
    shape: [usize; 4],
    gamma: Option<&[f32]>,
    beta: Option<&[f32]>,
    running_mean: &mut [f32],
    running_var: &mut [f32],
    training: bool,
    momentum: f32,
    eps: f32,
    mean: &mut [f32],
    invstd: &mut [f32],
    range: Option<&mut (f32, f32)>,
) -> Result<Vec<(f32, f32)>> {
    let [n, c, h, w] = shape;
    check_len("x", x.len(), &shape)?;
    opt_len("gamma", gamma, c)?;
    opt_len("beta", beta, c)?;
    check_len("running_mean", running_mean.len(), &[c])?;
    check_len("running_var", running_var.len(), &[c])?;
    check_len("mean", mean.len(), &[c])?;
    check_len("invstd", invstd.len(), &[c])?;
    if !(eps.is_finite() && eps >= 0.0) {
        return Err(Error::invalid(
            "eps",
            format!("must be finite and >= 0, got {eps}"),
        ));
    }
    if !(momentum.is_finite() && (0.0..=1.0).contains(&momentum)) {
        return Err(Error::invalid(
            "momentum",
            format!("must be in [0, 1], got {momentum}"),
        ));
    }
    let hw = h * w;
    let m = n * hw;
    let parallel = worth_parallel(x.len());
    if training {
        if m <= 1 {
            return Err(Error::invalid(
                "x",
                format!(
                    "expected more than 1 value per channel when training, got shape {shape:?}"
                ),
            ));
        }
        // Shifted sums (shift = the channel's first value) keep E[x²]−E[x]² free of cancellation.
        let shifts: Vec<f32> = (0..c).map(|ch| x[ch * hw]).collect();
        let image = |i: usize| &x[i * c * hw..(i + 1) * c * hw];
        let sums = match range {
            None => {
                let parts = per_image(n, c, parallel, |i, row| {
                    image_stat_sums(image(i), hw, &shifts, |ch, s| row[ch] = s)
                });
                sum_in_image_order(&parts, c, |&p| p)
            }
            Some(range) => {
                // the statistics and the data's range in one read of each plane
                // (the range of a whole image at its first channel: one scan per image, not per plane)
                type Part = ((f64, f64), Option<(f32, f32, bool)>);
                let parts = per_image(n, c, parallel, |i, row: &mut [Part]| {
                    row[0].1 = Some(crate::quant::run_min_max(image(i)));
                    image_stat_sums(image(i), hw, &shifts, |ch, s| row[ch].0 = s)
                });
                let (mut mn, mut mx) = (f32::INFINITY, f32::NEG_INFINITY);
                for &(a, b, bad) in parts.iter().filter_map(|(_, r)| r.as_ref()) {
                    if bad {
                        return Err(crate::quant::non_finite_error(x));
                    }
                    (mn, mx) = (mn.min(a), mx.max(b));
                }
                *range = (mn, mx);
                sum_in_image_order(&parts, c, |&(sums, _)| sums)
            }
        };
        for (ch, &(s, ss)) in sums.iter().enumerate() {
            let shift = x[ch * hw];
            let dm = s / m as f64;
            let var = (ss / m as f64 - dm * dm).max(0.0);
            let mu = shift as f64 + dm;
            mean[ch] = mu as f32;
            invstd[ch] = (1.0 / (var + eps as f64).sqrt()) as f32;
            let unbiased = var * m as f64 / (m - 1) as f64;
            running_mean[ch] =
                ((1.0 - momentum) as f64 * running_mean[ch] as f64 + momentum as f64 * mu) as f32;
            running_var[ch] = ((1.0 - momentum) as f64 * running_var[ch] as f64
                + momentum as f64 * unbiased) as f32;
        }
    } else {
        for ch in 0..c {
            mean[ch] = running_mean[ch];
            invstd[ch] = (1.0 / (running_var[ch] as f64 + eps as f64).sqrt()) as f32;
        }
    }
    // y = x·a + b with a = γ·invstd, b = β − mean·a.
    let ab: Vec<(f32, f32)> = (0..c)
        .map(|ch| {
            let a = gamma.map_or(1.0, |g| g[ch]) * invstd[ch];
            (a, beta.map_or(0.0, |b| b[ch]) - mean[ch] * a)
        })
        .collect();
    Ok(ab)
}

#[allow(clippy::too_many_arguments)]
pub fn batchnorm2d_forward(
    x: &[f32],
    shape: [usize; 4],
    gamma: Option<&[f32]>,
    beta: Option<&[f32]>,
    running_mean: &mut [f32],
    running_var: &mut [f32],
    training: bool,
    momentum: f32,
    eps: f32,
    y: &mut [f32],
    mean: &mut [f32],
    invstd: &mut [f32],
) -> Result<()> {
    check_len("y", y.len(), &shape)?;
    let ab = forward_coefficients(
        x,
        shape,
        gamma,
        beta,
        running_mean,
        running_var,
        training,
        momentum,
        eps,
        mean,
        invstd,
        None,
    )?;
    let [_, c, h, w] = shape;
    let hw = h * w;
    if hw == 0 {
        return Ok(());
    }
    for_each_chunk(y, hw, worth_parallel(x.len()), |plane, yp| {
        let (a, b) = ab[plane % c];
        for (o, &v) in yp.iter_mut().zip(&x[plane * hw..(plane + 1) * hw]) {
            *o = v * a + b;
        }
    });
    Ok(())
}

/// [`batchnorm2d_forward`] writing `y` over `x` (same values, same statistics); for callers that own `x`
/// and do not need it afterwards (INT8 training saves a quantized copy first).
#[allow(clippy::too_many_arguments)]
pub fn batchnorm2d_forward_inplace(
    x: &mut [f32],
    shape: [usize; 4],
    gamma: Option<&[f32]>,
    beta: Option<&[f32]>,
    running_mean: &mut [f32],
    running_var: &mut [f32],
    training: bool,
    momentum: f32,
    eps: f32,
    mean: &mut [f32],
    invstd: &mut [f32],
) -> Result<()> {
    forward_inplace(
        x,
        shape,
        gamma,
        beta,
        (running_mean, running_var),
        training,
        (momentum, eps),
        (mean, invstd),
        None,
    )?;
    Ok(())
}

/// Training-mode [`batchnorm2d_forward_inplace`] that also writes `xq`, the int8 codes of the input under
/// one per-tensor scale (returned): bit for bit what `quantize` with nearest rounding and no clipping gives
/// (and its error for non-finite input), which INT8 training saves for the backward pass
/// ([`batchnorm2d_backward_i8`]). One pass reads each plane for the statistics and the range, one
/// quantizes and normalises each image while it is in cache: two reads of `x` instead of four.
/// Also returns the output's range, taken as it is written ([`ActRange`]; `None` if it holds NaN or an
/// infinity), for the INT8 layer that quantizes it next (a linear bottleneck's projection).
#[allow(clippy::too_many_arguments)]
pub fn batchnorm2d_forward_inplace_save_i8(
    x: &mut [f32],
    shape: [usize; 4],
    gamma: Option<&[f32]>,
    beta: Option<&[f32]>,
    running_mean: &mut [f32],
    running_var: &mut [f32],
    momentum: f32,
    eps: f32,
    mean: &mut [f32],
    invstd: &mut [f32],
    xq: &mut [i8],
) -> Result<(f32, Option<ActRange>)> {
    forward_inplace_save_i8(
        x,
        shape,
        (gamma, beta),
        (running_mean, running_var),
        (momentum, eps),
        (mean, invstd),
        xq,
        true,
    )
}

/// [`batchnorm2d_forward_inplace_save_i8`]; `want_range: false` when an activation overwrites the output
/// next (its range is then that op's to take): the range is `None`.
#[allow(clippy::too_many_arguments)]
pub(super) fn forward_inplace_save_i8(
    x: &mut [f32],
    shape: [usize; 4],
    (gamma, beta): (Option<&[f32]>, Option<&[f32]>),
    (running_mean, running_var): (&mut [f32], &mut [f32]),
    (momentum, eps): (f32, f32),
    (mean, invstd): (&mut [f32], &mut [f32]),
    xq: &mut [i8],
    want_range: bool,
) -> Result<(f32, Option<ActRange>)> {
    check_len("xq", xq.len(), &shape)?;
    let (scale, range) = forward_inplace(
        x,
        shape,
        gamma,
        beta,
        (running_mean, running_var),
        true,
        (momentum, eps),
        (mean, invstd),
        Some((xq, want_range)),
    )?;
    Ok((
        scale.expect("a range is taken when codes are asked for"),
        range,
    ))
}

crate::simd::avx2_multiversion! {
/// `xp = xp·a + b` (one plane of BatchNorm's output) and the largest [`abs_bits`] written.
fn normalise_plane_amax(xp: &mut [f32], a: f32, b: f32) -> u32 {
    let mut m = 0u32;
    for v in xp.iter_mut() {
        *v = *v * a + b;
        m = m.max(abs_bits(*v));
    }
    m
}
}

/// The two in-place forwards: with `xq`, also the input's codes and their scale, and (its flag) the
/// output's range.
#[allow(clippy::too_many_arguments)]
fn forward_inplace(
    x: &mut [f32],
    shape: [usize; 4],
    gamma: Option<&[f32]>,
    beta: Option<&[f32]>,
    (running_mean, running_var): (&mut [f32], &mut [f32]),
    training: bool,
    (momentum, eps): (f32, f32),
    (mean, invstd): (&mut [f32], &mut [f32]),
    xq: Option<(&mut [i8], bool)>,
) -> Result<(Option<f32>, Option<ActRange>)> {
    let mut range = (0.0, 0.0);
    let ab = forward_coefficients(
        x,
        shape,
        gamma,
        beta,
        running_mean,
        running_var,
        training,
        momentum,
        eps,
        mean,
        invstd,
        xq.is_some().then_some(&mut range),
    )?;
    let [_, c, h, w] = shape;
    let hw = h * w;
    let parallel = worth_parallel(x.len());
    let normalise = |xp: &mut [f32], (a, b): (f32, f32)| {
        for v in xp.iter_mut() {
            *v = *v * a + b;
        }
    };
    let Some((xq, want_range)) = xq else {
        if hw > 0 {
            for_each_chunk(x, hw, parallel, |plane, xp| normalise(xp, ab[plane % c]));
        }
        return Ok((None, None));
    };
    let scale = crate::quant::scale_from_min_max(range.0, range.1);
    let acc = AmaxAcc::new();
    if hw > 0 {
        let codes = crate::quant::NearestCodes::new(scale);
        // image by image (one quantizer call per image: its setup costs about as much as a small plane)
        super::for_each_chunk2(x, c * hw, xq, c * hw, parallel, |_, xi, qi| {
            codes.run(xi, qi);
            if want_range {
                let planes = xi.chunks_exact_mut(hw).zip(&ab);
                let m = planes.fold(0, |m, (xp, &(a, b))| m.max(normalise_plane_amax(xp, a, b)));
                acc.add_abs_bits(m);
            } else {
                for (xp, &ab) in xi.chunks_exact_mut(hw).zip(&ab) {
                    normalise(xp, ab);
                }
            }
        });
    }
    Ok((Some(scale), want_range.then(|| acc.finish(x)).flatten()))
}

/// Backward of training-mode [`batchnorm2d_forward`] given the `mean` and `invstd` it returned:
/// `dx (N, C, H, W)`, `dgamma`, `dbeta (C,)`.
#[allow(clippy::too_many_arguments)]
pub fn batchnorm2d_backward(
    dy: &[f32],
    x: &[f32],
    shape: [usize; 4],
    gamma: Option<&[f32]>,
    mean: &[f32],
    invstd: &[f32],
    dx: &mut [f32],
    dgamma: &mut [f32],
    dbeta: &mut [f32],
) -> Result<()> {
    backward_impl(dy, x, 1.0, shape, gamma, mean, invstd, dx, dgamma, dbeta)
}

/// [`batchnorm2d_backward`] reading the saved input as int8 codes `xq` with a per-tensor `x_scale`
/// (`x = xq·x_scale`, exactly as `dequantize` would give it), so INT8 training never materialises an FP32
/// copy of the saved input.
#[allow(clippy::too_many_arguments)]
pub fn batchnorm2d_backward_i8(
    dy: &[f32],
    xq: &[i8],
    x_scale: f32,
    shape: [usize; 4],
    gamma: Option<&[f32]>,
    mean: &[f32],
    invstd: &[f32],
    dx: &mut [f32],
    dgamma: &mut [f32],
    dbeta: &mut [f32],
) -> Result<()> {
    check_x_scale(x_scale)?;
    backward_impl(
        dy, xq, x_scale, shape, gamma, mean, invstd, dx, dgamma, dbeta,
    )
}

/// The int8 backward's scale of the saved codes: finite and > 0.
pub(super) fn check_x_scale(x_scale: f32) -> Result<()> {
    if !(x_scale.is_finite() && x_scale > 0.0) {
        return Err(Error::invalid(
            "x_scale",
            format!("must be finite and > 0, got {x_scale}"),
        ));
    }
    Ok(())
}

/// The backward's per-channel arrays: `gamma` (if any), `mean`, `invstd`, `dgamma`, `dbeta` hold `c` values.
pub(super) fn check_channel_args(
    c: usize,
    gamma: Option<&[f32]>,
    mean: &[f32],
    invstd: &[f32],
    dgamma: &[f32],
    dbeta: &[f32],
) -> Result<()> {
    opt_len("gamma", gamma, c)?;
    check_len("mean", mean.len(), &[c])?;
    check_len("invstd", invstd.len(), &[c])?;
    check_len("dgamma", dgamma.len(), &[c])?;
    check_len("dbeta", dbeta.len(), &[c])
}

/// Checks, per-channel sums and the coefficients `(a, b, k)` of `dx = dy·a + x·b + k`; writes `dgamma`, `dbeta`.
#[allow(clippy::too_many_arguments)]
fn backward_coefficients<X: Saved>(
    dy: &[f32],
    x: &[X],
    scale: f32,
    shape: [usize; 4],
    gamma: Option<&[f32]>,
    mean: &[f32],
    invstd: &[f32],
    dgamma: &mut [f32],
    dbeta: &mut [f32],
) -> Result<Vec<(f32, f32, f32)>> {
    let [n, c, h, w] = shape;
    check_len("x", x.len(), &shape)?;
    check_len("dy", dy.len(), &shape)?;
    check_channel_args(c, gamma, mean, invstd, dgamma, dbeta)?;
    let hw = h * w;
    let parallel = worth_parallel(x.len());
    let parts = per_image(n, c, parallel, |i, row| {
        let r = i * c * hw..(i + 1) * c * hw;
        planes_grad_sums(
            &dy[r.clone()],
            &x[r],
            hw,
            scale,
            |ch| mean[ch],
            |ch, v| row[ch] = v,
        )
    });
    let sums = sum_in_image_order(&parts, c, |&p| p);
    Ok(coefficients_from_sums(
        &sums,
        n * hw,
        gamma,
        mean,
        invstd,
        dgamma,
        dbeta,
    ))
}

/// The coefficients `(a, b, k)` of `dx = dy·a + x·b + k` per channel from the per-channel sums
/// `(Σ dy, Σ dy·(x − mean))` over `m` values; writes `dgamma`, `dbeta`.
pub(super) fn coefficients_from_sums(
    sums: &[(f64, f64)],
    m: usize,
    gamma: Option<&[f32]>,
    mean: &[f32],
    invstd: &[f32],
    dgamma: &mut [f32],
    dbeta: &mut [f32],
) -> Vec<(f32, f32, f32)> {
    let m = m as f64;
    // dx = γ·invstd·(dy − Σdy/M − x̂·Σ(dy·x̂)/M), written as dx = dy·a + x·b + k per channel.
    (0..sums.len())
        .map(|ch| {
            let (sdy, sdyxc) = sums[ch];
            let is = invstd[ch] as f64;
            dbeta[ch] = sdy as f32;
            dgamma[ch] = (sdyxc * is) as f32;
            if m == 0.0 {
                return (0.0, 0.0, 0.0);
            }
            let g = gamma.map_or(1.0, |g| g[ch]) as f64;
            let a = g * is;
            let b = -a * is * is * sdyxc / m;
            let k = -a * sdy / m - b * mean[ch] as f64;
            (a as f32, b as f32, k as f32)
        })
        .collect()
}

#[allow(clippy::too_many_arguments)]
fn backward_impl<X: Saved>(
    dy: &[f32],
    x: &[X],
    scale: f32,
    shape: [usize; 4],
    gamma: Option<&[f32]>,
    mean: &[f32],
    invstd: &[f32],
    dx: &mut [f32],
    dgamma: &mut [f32],
    dbeta: &mut [f32],
) -> Result<()> {
    check_len("dx", dx.len(), &shape)?;
    let coef = backward_coefficients(dy, x, scale, shape, gamma, mean, invstd, dgamma, dbeta)?;
    let [_, c, h, w] = shape;
    let hw = h * w;
    if hw == 0 {
        return Ok(());
    }
    for_each_chunk(dx, hw, worth_parallel(x.len()), |plane, dp| {
        let (a, b, k) = coef[plane % c];
        let r = plane * hw..(plane + 1) * hw;
        affine3(dp, Some(&dy[r.clone()]), &x[r], scale, (a, b, k));
    });
    Ok(())
}

/// [`batchnorm2d_backward_i8`] writing `dx` over `dy` (same values; `dy` is consumed). Saves the
/// allocation of a second activation-sized gradient when the caller owns `dy`.
#[allow(clippy::too_many_arguments)]
pub fn batchnorm2d_backward_i8_inplace(
    dy: &mut [f32],
    xq: &[i8],
    x_scale: f32,
    shape: [usize; 4],
    gamma: Option<&[f32]>,
    mean: &[f32],
    invstd: &[f32],
    dgamma: &mut [f32],
    dbeta: &mut [f32],
) -> Result<()> {
    check_x_scale(x_scale)?;
    let coef = backward_coefficients(dy, xq, x_scale, shape, gamma, mean, invstd, dgamma, dbeta)?;
    let [_, c, h, w] = shape;
    let hw = h * w;
    if hw == 0 {
        return Ok(());
    }
    for_each_chunk(dy, hw, worth_parallel(xq.len()), |plane, dp| {
        let (a, b, k) = coef[plane % c];
        let r = plane * hw..(plane + 1) * hw;
        affine3(dp, None, &xq[r], x_scale, (a, b, k));
    });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The plane sums, portable and AVX2 (where the CPU has it), equal a plain f64 accumulation to float
    /// rounding at every length from 0 to 40 (planes shorter than one vector, one block plus a tail, several
    /// blocks), so a block's lanes left out of a sum fail it.
    #[test]
    fn plane_sums_equal_a_plain_reference_at_every_length() {
        for len in 0..40 {
            let x: Vec<f32> = (0..len)
                .map(|i| ((i * 37 % 23) as f32 - 11.0) * 0.3)
                .collect();
            let dy: Vec<f32> = (0..len)
                .map(|i| ((i * 13 % 17) as f32 - 8.0) * 0.1)
                .collect();
            let (shift, mu) = (0.7f32, -0.4f32);
            let near = |a: f64, b: f64| (a - b).abs() <= 1e-4 * (1.0 + b.abs());
            let want_s = (
                x.iter().map(|&v| (v - shift) as f64).sum::<f64>(),
                x.iter()
                    .map(|&v| ((v - shift) * (v - shift)) as f64)
                    .sum::<f64>(),
            );
            let want_g = (
                dy.iter().map(|&g| g as f64).sum::<f64>(),
                dy.iter()
                    .zip(&x)
                    .map(|(&g, &v)| (g * (v - mu)) as f64)
                    .sum::<f64>(),
            );
            for simd in [false, true] {
                crate::simd::set_elementwise_simd(simd);
                let s = stat_sums(&x, shift);
                let g = grad_sums(&dy, &x, 1.0, mu);
                crate::simd::set_elementwise_simd(true);
                assert!(
                    near(s.0, want_s.0) && near(s.1, want_s.1),
                    "stat, len {len}, simd {simd}: {s:?} vs {want_s:?}"
                );
                assert!(
                    near(g.0, want_g.0) && near(g.1, want_g.1),
                    "grad, len {len}, simd {simd}: {g:?} vs {want_g:?}"
                );
            }
        }
    }

    /// The sums of a whole image's planes give each plane's own [`stat_sums`] bits (and a run of planes'
    /// backward sums each plane's [`grad_sums`]), on planes of every
    /// length below and around [`SIMD_MIN`] and channel counts with and without a partial block of 8, with
    /// the shift of each channel its first value, -0.0 and large values among the data.
    #[test]
    fn image_and_run_sums_equal_plane_sums() {
        for hw in 1..=10 {
            for c in [1, 7, 8, 9, 17, 24] {
                let mut x: Vec<f32> = (0..c * hw)
                    .map(|i| ((i * 7919 % 1013) as f32 - 506.0) * 0.0137 + (i % 5) as f32 * 1e3)
                    .collect();
                x[c * hw / 2] = -0.0;
                let shifts: Vec<f32> = (0..c).map(|ch| x[(ch * 3 % c) * hw] + 0.5).collect();
                for simd in [false, true] {
                    crate::simd::set_elementwise_simd(simd);
                    let mut got = vec![(f64::NAN, f64::NAN); c];
                    image_stat_sums(&x, hw, &shifts, |ch, v| got[ch] = v);
                    let want: Vec<(f64, f64)> = (0..c)
                        .map(|ch| stat_sums(&x[ch * hw..(ch + 1) * hw], shifts[ch]))
                        .collect();
                    crate::simd::set_elementwise_simd(true);
                    let bits = |v: &[(f64, f64)]| {
                        v.iter()
                            .map(|p| (p.0.to_bits(), p.1.to_bits()))
                            .collect::<Vec<_>>()
                    };
                    assert_eq!(bits(&got), bits(&want), "hw {hw}, c {c}, simd {simd}");
                    // the backward sums likewise, on int8 codes and on FP32 values
                    let dy: Vec<f32> = (0..c * hw)
                        .map(|i| ((i * 13 % 17) as f32 - 8.0) * 0.1)
                        .collect();
                    let xq: Vec<i8> = (0..c * hw)
                        .map(|i| ((i * 37 % 255) as i32 - 127) as i8)
                        .collect();
                    crate::simd::set_elementwise_simd(simd);
                    let (mut g8, mut g32) =
                        (vec![(f64::NAN, f64::NAN); c], vec![(f64::NAN, f64::NAN); c]);
                    planes_grad_sums(&dy, &xq, hw, 0.02, |j| shifts[j], |j, v| g8[j] = v);
                    planes_grad_sums(&dy, &x, hw, 1.0, |j| shifts[j], |j, v| g32[j] = v);
                    let plane = |j: usize| j * hw..(j + 1) * hw;
                    let want8: Vec<(f64, f64)> = (0..c)
                        .map(|j| grad_sums(&dy[plane(j)], &xq[plane(j)], 0.02, shifts[j]))
                        .collect();
                    let want32: Vec<(f64, f64)> = (0..c)
                        .map(|j| grad_sums(&dy[plane(j)], &x[plane(j)], 1.0, shifts[j]))
                        .collect();
                    crate::simd::set_elementwise_simd(true);
                    assert_eq!(
                        bits(&g8),
                        bits(&want8),
                        "int8 grad sums, hw {hw}, c {c}, simd {simd}"
                    );
                    assert_eq!(
                        bits(&g32),
                        bits(&want32),
                        "grad sums, hw {hw}, c {c}, simd {simd}"
                    );
                }
            }
        }
    }

    /// The int8 backward equals the FP32 backward on the dequantized input, bit for bit, and a naive
    /// per-element reference of the formula within float tolerance.
    #[test]
    fn backward_i8_matches_dequantized_fp32() {
        let shape = [3, 4, 5, 6];
        let len = 3 * 4 * 5 * 6;
        let xq: Vec<i8> = (0..len)
            .map(|i| ((i * 37 % 255) as i32 - 127) as i8)
            .collect();
        let scale = 0.0173f32;
        let x: Vec<f32> = xq.iter().map(|&q| q as f32 * scale).collect();
        let dy: Vec<f32> = (0..len)
            .map(|i| ((i * 13 % 17) as f32 - 8.0) * 0.1)
            .collect();
        let gamma = [0.5f32, 1.0, 1.5, -2.0];
        let (mut rm, mut rv) = (vec![0f32; 4], vec![1f32; 4]);
        let (mut y, mut mean, mut invstd) = (vec![0f32; len], vec![0f32; 4], vec![0f32; 4]);
        batchnorm2d_forward(
            &x,
            shape,
            Some(&gamma),
            None,
            &mut rm,
            &mut rv,
            true,
            0.1,
            1e-5,
            &mut y,
            &mut mean,
            &mut invstd,
        )
        .unwrap();
        let (mut dx, mut dg, mut db) = (vec![0f32; len], vec![0f32; 4], vec![0f32; 4]);
        batchnorm2d_backward(
            &dy,
            &x,
            shape,
            Some(&gamma),
            &mean,
            &invstd,
            &mut dx,
            &mut dg,
            &mut db,
        )
        .unwrap();
        let (mut dx8, mut dg8, mut db8) = (vec![0f32; len], vec![0f32; 4], vec![0f32; 4]);
        batchnorm2d_backward_i8(
            &dy,
            &xq,
            scale,
            shape,
            Some(&gamma),
            &mean,
            &invstd,
            &mut dx8,
            &mut dg8,
            &mut db8,
        )
        .unwrap();
        assert_eq!(dx, dx8);
        assert_eq!(dg, dg8);
        assert_eq!(db, db8);
        // naive reference: dx = γ·invstd·(dy − mean(dy) − x̂·mean(dy·x̂))
        let (n, c, hw) = (3, 4, 30);
        for ch in 0..c {
            let idx: Vec<usize> = (0..n)
                .flat_map(|i| (0..hw).map(move |p| (i * c + ch) * hw + p))
                .collect();
            let m = idx.len() as f64;
            let xh = |i: usize| (x[i] as f64 - mean[ch] as f64) * invstd[ch] as f64;
            let mdy = idx.iter().map(|&i| dy[i] as f64).sum::<f64>() / m;
            let mdyx = idx.iter().map(|&i| dy[i] as f64 * xh(i)).sum::<f64>() / m;
            for &i in &idx {
                let want =
                    gamma[ch] as f64 * invstd[ch] as f64 * (dy[i] as f64 - mdy - xh(i) * mdyx);
                assert!(
                    (dx8[i] as f64 - want).abs() < 1e-4 * (1.0 + want.abs()),
                    "dx[{i}] {} vs {want}",
                    dx8[i]
                );
            }
            assert!((db8[ch] as f64 - mdy * m).abs() < 1e-3);
        }
        let (mut gi, mut dgi, mut dbi) = (dy.clone(), vec![0f32; 4], vec![0f32; 4]);
        batchnorm2d_backward_i8_inplace(
            &mut gi,
            &xq,
            scale,
            shape,
            Some(&gamma),
            &mean,
            &invstd,
            &mut dgi,
            &mut dbi,
        )
        .unwrap();
        assert_eq!(gi, dx8);
        assert_eq!(dgi, dg8);
        assert_eq!(dbi, db8);
        // in-place forward: same output and statistics as the out-of-place one
        let (mut rm2, mut rv2) = (vec![0f32; 4], vec![1f32; 4]);
        let (mut xi, mut mean2, mut invstd2) = (x.clone(), vec![0f32; 4], vec![0f32; 4]);
        batchnorm2d_forward_inplace(
            &mut xi,
            shape,
            Some(&gamma),
            None,
            &mut rm2,
            &mut rv2,
            true,
            0.1,
            1e-5,
            &mut mean2,
            &mut invstd2,
        )
        .unwrap();
        assert_eq!(xi, y);
        assert_eq!(
            (mean2, invstd2, rm2, rv2),
            (mean.clone(), invstd.clone(), rm.clone(), rv.clone())
        );
        assert!(batchnorm2d_backward_i8(
            &dy, &xq, 0.0, shape, None, &mean, &invstd, &mut dx8, &mut dg8, &mut db8
        )
        .is_err());
    }
}
