//! BatchNorm → ReLU (→ 2x2 max pool) of INT8 training as one op each way.
//!
//! The unfused chain makes three calls per direction (BatchNorm saving its input as int8 codes, ReLU saving a
//! bit mask, max pooling saving its argmax) and as many full-resolution passes over the activation. Fused:
//!
//! - forward: the statistics pass, then image by image the codes, the normalisation and — with pooling — the
//!   2x2 maximum of the normalised plane while it is in cache. ReLU commutes with the maximum, so it runs on
//!   the pooled output only; a window whose maximum is not positive records the argmax offset
//!   [`NO_GRAD`] (ReLU passes no gradient there). Without pooling, ReLU and its mask follow in the same call.
//! - backward: with pooling, the gradient is scattered to the argmax and the BatchNorm sums taken in the same
//!   pass over each plane, then the BatchNorm affine map runs in place; without, ReLU's mask is applied and
//!   the BatchNorm sums taken in the same pass over each plane, then the affine map runs in place.
//!
//! Results are those of the unfused ops on finite input, bit for bit (same per-element arithmetic, same
//! per-(image, channel) sums added in image order), so also the same whatever the thread count.

use super::batchnorm::{
    affine3, check_channel_args, check_x_scale, coefficients_from_sums, forward_coefficients,
    planes_grad_sums, sum_in_image_order,
};
use super::pool::{maxpool_2x2_backward_planes, maxpool_2x2_planes, STACK_VALUES};
use super::{check_len, for_each_chunk, for_each_chunk2, worth_parallel};
use crate::error::{Error, Result};
use crate::quant::{ActRange, AmaxAcc};
use crate::threads;

/// Argmax offset of a pooled window through which ReLU passes no gradient (its maximum is not positive):
/// the 2x2 backward writes zeros for any offset other than 0..=3.
pub const NO_GRAD: u8 = 4;

/// What follows the BatchNorm: ReLU with its bit mask, or ReLU and 2x2/stride-2 max pooling.
pub enum ReluOut<'a> {
    /// `x` becomes `relu(bn(x))`; `mask`: [`super::relu_mask_len`] bytes, bit set where the output is > 0.
    Mask(&'a mut [u8]),
    /// ReLU6 instead of ReLU: `x` becomes `relu6(bn(x))`; `mask` as for [`ReluOut::Mask`], bit set where
    /// `0 < bn(x) < 6` (see [`super::relu6_forward_mask_inplace`]).
    Relu6Mask(&'a mut [u8]),
    /// `y (N, C, H/2, W/2)` = `maxpool2x2(relu(bn(x)))`, `idx` its argmax offsets (or [`NO_GRAD`]); `x`
    /// holds `bn(x)` afterwards (scratch for the caller).
    Pool2x2 { y: &'a mut [f32], idx: &'a mut [u8] },
}

/// The saved state [`batchnorm2d_relu_backward_i8`] reads for the activation: the mask or the argmax offsets.
pub enum ReluSaved<'a> {
    Mask(&'a [u8]),
    Pool2x2(&'a [u8]),
}

fn pooled_shape([n, c, h, w]: [usize; 4]) -> [usize; 4] {
    [n, c, h / 2, w / 2]
}

/// Training-mode BatchNorm (in place, running statistics updated) with the input's int8 codes `xq` (nearest,
/// per-tensor scale, returned), followed by ReLU or ReLU + 2x2 max pooling (see [`ReluOut`]). Returns the
/// codes' scale and the range of the output (`x`, or `y` with pooling; `None` if it holds NaN or +inf),
/// taken as the output is written, for the INT8 layer that quantizes it next ([`ActRange`]); `mean`,
/// `invstd` are what the backward needs.
#[allow(clippy::too_many_arguments)]
pub fn batchnorm2d_relu_forward_save_i8(
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
    out: ReluOut<'_>,
) -> Result<(f32, Option<ActRange>)> {
    let (mask, six) = match out {
        ReluOut::Mask(mask) => (Ok(mask), false),
        ReluOut::Relu6Mask(mask) => (Ok(mask), true),
        ReluOut::Pool2x2 { y, idx } => (Err((y, idx)), false),
    };
    let (y, idx) = match mask {
        Ok(mask) => {
            // the activation overwrites BatchNorm's output next: its range is the one to take
            let (scale, _) = super::batchnorm::forward_inplace_save_i8(
                x,
                shape,
                (gamma, beta),
                (running_mean, running_var),
                (momentum, eps),
                (mean, invstd),
                xq,
                false,
            )?;
            let range = if six {
                super::relu6_forward_mask_inplace(x, mask)?
            } else {
                super::relu_forward_mask_inplace(x, mask)?
            };
            return Ok((scale, range));
        }
        Err(pool) => pool,
    };
    check_len("xq", xq.len(), &shape)?;
    let ps = pooled_shape(shape);
    check_len("y", y.len(), &ps)?;
    check_len("idx", idx.len(), &ps)?;
    let mut range = (0.0, 0.0);
    let ab = forward_coefficients(
        x,
        shape,
        gamma,
        beta,
        running_mean,
        running_var,
        true,
        momentum,
        eps,
        mean,
        invstd,
        Some(&mut range),
    )?;
    let [_, c, h, w] = shape;
    let (hw, oh, ow) = (h * w, h / 2, w / 2);
    let p = oh * ow;
    let scale = crate::quant::scale_from_min_max(range.0, range.1);
    if hw == 0 || c == 0 {
        return Ok((scale, ActRange::of(y)));
    }
    let codes = crate::quant::NearestCodes::new(scale);
    let acc = AmaxAcc::new();
    // Channels taken together: their planes are normalised one by one, then pooled and ReLU'd as one run
    // while the group is in cache (with an even height, a group's stacked planes pool as one tall plane:
    // row pairs never straddle two planes). On the 4x4 and 2x2 planes late in a small network this turns
    // thousands of calls of a few values each into a few long ones; a large plane is a group of one.
    let group = (STACK_VALUES / hw).max(1).min(c);
    let image = |((xi, qi), (yi, ii)): ((&mut [f32], &mut [i8]), (&mut [f32], &mut [u8]))| {
        codes.run(xi, qi);
        let (mut mx, mut nan) = (0f32, false);
        for ch0 in (0..c).step_by(group) {
            let chs = ch0..(ch0 + group).min(c);
            for (ch, &(a, b)) in chs.clone().zip(&ab[chs.clone()]) {
                // the same expression as BatchNorm's normalisation (same bits)
                for v in xi[ch * hw..(ch + 1) * hw].iter_mut() {
                    *v = *v * a + b;
                }
            }
            let (xg, yg, ig) = (
                &xi[ch0 * hw..chs.end * hw],
                &mut yi[ch0 * p..chs.end * p],
                &mut ii[ch0 * p..chs.end * p],
            );
            maxpool_2x2_planes(xg, chs.len(), h, w, yg, ig);
            let (m, bad) = relu_pooled(yg, ig);
            // (a maximum of non-negative non-NaN values: the order it is taken in does not matter)
            mx = if m > mx { m } else { mx };
            nan |= bad;
        }
        acc.add(mx, nan);
    };
    let (xs, ys) = (c * hw, c * p.max(1));
    if worth_parallel(x.len()) {
        let n = x.len() / xs;
        let (px, pq) = (threads::Pieces::new(x, xs), threads::Pieces::new(xq, xs));
        let (py, pi) = (threads::Pieces::new(y, ys), threads::Pieces::new(idx, ys));
        threads::run_parts(n, |i| {
            // SAFETY: for_each_part passes each image index once: its pieces are borrowed once.
            let parts = unsafe { ((px.piece(i), pq.piece(i)), (py.piece(i), pi.piece(i))) };
            image(parts);
        });
    } else {
        x.chunks_mut(xs)
            .zip(xq.chunks_mut(xs))
            .zip(y.chunks_mut(ys).zip(idx.chunks_mut(ys)))
            .for_each(image);
    }
    Ok((scale, acc.finish(y)))
}

/// ReLU over pooled values `yp` as the unfused op computes it (`v < 0` becomes 0; NaN and -0.0 stay), no
/// gradient ([`NO_GRAD`] in `ip`) through a window whose maximum is not positive, and the output's range:
/// its largest value (0 at least) and whether it holds a NaN. AVX2 where the CPU has it: the sign of a
/// normalised value is a coin toss, so the scalar loop's branches mispredict half the time. The result is
/// the same bits either way (a maximum of non-NaN values does not depend on the order it is taken in, and
/// +0.0 starts every lane as it starts the scalar loop).
fn relu_pooled(yp: &mut [f32], ip: &mut [u8]) -> (f32, bool) {
    debug_assert_eq!(yp.len(), ip.len());
    #[allow(unused_mut)]
    let (mut done, mut mx, mut nan) = (0, 0f32, false);
    #[cfg(target_arch = "x86_64")]
    if crate::simd::elementwise_avx2() && yp.len() >= 8 {
        // SAFETY: the CPU has AVX2; yp and ip have the same length (the AVX2 loop takes whole blocks of 8:
        // a shorter plane is all the portable loop's anyway).
        (done, mx, nan) = unsafe { relu_pooled_avx2(yp, ip) };
    }
    let (m, n) = relu_pooled_scalar(&mut yp[done..], &mut ip[done..], mx);
    (m, nan | n)
}

/// The reference loop of [`relu_pooled`] from a running maximum `mx`.
fn relu_pooled_scalar(yp: &mut [f32], ip: &mut [u8], mut mx: f32) -> (f32, bool) {
    let mut nan = false;
    for (v, at) in yp.iter_mut().zip(ip.iter_mut()) {
        let keep = *v > 0.0;
        *at = if keep { *at } else { NO_GRAD };
        *v = if *v < 0.0 { 0.0 } else { *v };
        mx = if *v > mx { *v } else { mx };
        nan |= v.is_nan();
    }
    (mx, nan)
}

/// [`relu_pooled`] over whole blocks of 8: returns how many values it did, their maximum and NaN flag.
///
/// # Safety
/// The CPU has AVX2; `ip.len() >= yp.len()`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn relu_pooled_avx2(yp: &mut [f32], ip: &mut [u8]) -> (usize, f32, bool) {
    use std::arch::x86_64::*;
    assert!(ip.len() >= yp.len());
    let blocks = yp.len() / 8;
    let zero = _mm256_setzero_ps();
    let no_grad = _mm_set1_epi8(NO_GRAD as i8);
    let (mut mx, mut nan) = (zero, zero);
    for b in 0..blocks {
        let (py, pi) = (yp.as_mut_ptr().add(8 * b), ip.as_mut_ptr().add(8 * b));
        let v = _mm256_loadu_ps(py);
        let keep = _mm256_castps_si256(_mm256_cmp_ps::<_CMP_GT_OQ>(v, zero));
        // v < 0 (ordered) -> 0; NaN and -0.0 are not below zero and stay
        let out = _mm256_andnot_ps(_mm256_cmp_ps::<_CMP_LT_OQ>(v, zero), v);
        _mm256_storeu_ps(py, out);
        // max_ps(a, b) is `a > b ? a : b`: the scalar loop's step, lane by lane
        mx = _mm256_max_ps(out, mx);
        nan = _mm256_or_ps(nan, _mm256_cmp_ps::<_CMP_UNORD_Q>(out, out));
        // the 8 lane masks as 8 bytes: keep the window's offset, else NO_GRAD
        let w = _mm_packs_epi32(
            _mm256_castsi256_si128(keep),
            _mm256_extracti128_si256::<1>(keep),
        );
        let k8 = _mm_packs_epi16(w, w);
        let at = _mm_loadl_epi64(pi as *const __m128i);
        _mm_storel_epi64(pi as *mut __m128i, _mm_blendv_epi8(no_grad, at, k8));
    }
    let mut lanes = [0f32; 8];
    _mm256_storeu_ps(lanes.as_mut_ptr(), mx);
    let m = lanes.iter().fold(0f32, |m, &v| if v > m { v } else { m });
    (8 * blocks, m, _mm256_movemask_ps(nan) != 0)
}

/// Backward of [`batchnorm2d_relu_forward_save_i8`]. With [`ReluSaved::Mask`] `dy` has the input's shape
/// and is overwritten with `dx` (`dx` must be `None`); with [`ReluSaved::Pool2x2`] `dy` is the pooled
/// gradient and `dx` (the input's shape) receives the result. Writes `dgamma`, `dbeta`.
#[allow(clippy::too_many_arguments)]
pub fn batchnorm2d_relu_backward_i8(
    dy: &mut [f32],
    saved: ReluSaved<'_>,
    xq: &[i8],
    x_scale: f32,
    shape: [usize; 4],
    gamma: Option<&[f32]>,
    mean: &[f32],
    invstd: &[f32],
    dx: Option<&mut [f32]>,
    dgamma: &mut [f32],
    dbeta: &mut [f32],
) -> Result<()> {
    check_x_scale(x_scale)?;
    check_len("xq", xq.len(), &shape)?;
    check_channel_args(shape[1], gamma, mean, invstd, dgamma, dbeta)?;
    let [_, _, h, w] = shape;
    let hw = h * w;
    // the gradient array the BatchNorm half works in, and the first step on each of its planes
    type First<'f> = Box<dyn Fn(usize, &mut [f32]) + Sync + Send + 'f>;
    let (g, first): (&mut [f32], First<'_>) = match (saved, dx) {
        (ReluSaved::Mask(mask), None) => {
            check_len("dy", dy.len(), &shape)?;
            check_len("mask", mask.len(), &[super::relu_mask_len(dy.len())])?;
            // ReLU's mask applied to a run of planes (at its bit offset: a plane need not start on a mask
            // byte)
            let first = move |plane: usize, dp: &mut [f32]| {
                super::activation::apply_mask_from(dp, mask, plane * hw)
            };
            (dy, Box::new(first))
        }
        (ReluSaved::Pool2x2(idx), Some(dx)) => {
            check_len("dx", dx.len(), &shape)?;
            let ps = pooled_shape(shape);
            check_len("dy", dy.len(), &ps)?;
            check_len("idx", idx.len(), &ps)?;
            // a max reduction, which vectorises (`any` stops early and runs a byte at a time)
            if idx.iter().fold(0u8, |m, &at| m.max(at)) > NO_GRAD {
                return Err(Error::invalid(
                    "idx",
                    "holds an offset outside the 2x2 window",
                ));
            }
            let (oh, ow) = (h / 2, w / 2);
            let p = oh * ow;
            let dy = &*dy;
            // the pooled gradient scattered to the argmax, over a run of planes: stacked as one tall plane
            // when the height is even (row pairs never straddle two planes)
            let first = move |plane: usize, dp: &mut [f32]| {
                let planes = dp.len() / hw;
                let r = plane * p..(plane + planes) * p;
                maxpool_2x2_backward_planes(&dy[r.clone()], &idx[r], planes, h, w, dp)
            };
            (dx, Box::new(first))
        }
        _ => {
            return Err(Error::invalid(
                "dx",
                "expected an output array with pooling and none (in place) with a mask",
            ))
        }
    };
    fused_backward_i8(
        g, xq, x_scale, shape, gamma, mean, invstd, dgamma, dbeta, first,
    )
}

/// The BatchNorm half of [`batchnorm2d_relu_backward_i8`] over the activation's gradient `g` (`shape`,
/// arguments checked by the caller): plane by plane, `first` writes the plane's gradient into `g` (ReLU's mask
/// applied, or the pooled gradient scattered) and the plane's BatchNorm sums are taken while it is in cache;
/// then BatchNorm's affine map runs in place. The per-(image, channel) sums are added in image order, so the
/// bits are those of the unfused ops whatever the thread count.
#[allow(clippy::too_many_arguments)]
fn fused_backward_i8(
    g: &mut [f32],
    xq: &[i8],
    x_scale: f32,
    shape: [usize; 4],
    gamma: Option<&[f32]>,
    mean: &[f32],
    invstd: &[f32],
    dgamma: &mut [f32],
    dbeta: &mut [f32],
    first: impl Fn(usize, &mut [f32]) + Sync + Send,
) -> Result<()> {
    let [n, c, h, w] = shape;
    let hw = h * w;
    if hw == 0 || c == 0 {
        dgamma.fill(0.0);
        dbeta.fill(0.0);
        return Ok(());
    }
    let parallel = worth_parallel(g.len());
    // runs of whole planes (one plane when planes are large): `first` and the affine map take a run at a
    // time, the sums stay per plane
    let k = (STACK_VALUES / hw).max(1);
    let mut parts = vec![(0f64, 0f64); n * c];
    for_each_chunk2(g, k * hw, &mut parts, k, parallel, |run, gr, pr| {
        let plane0 = run * k;
        first(plane0, gr);
        let xr = &xq[plane0 * hw..plane0 * hw + gr.len()];
        planes_grad_sums(
            gr,
            xr,
            hw,
            x_scale,
            |j| mean[(plane0 + j) % c],
            |j, v| pr[j] = v,
        );
    });
    let sums = sum_in_image_order(&parts, c, |&s| s);
    let coef = coefficients_from_sums(&sums, n * hw, gamma, mean, invstd, dgamma, dbeta);
    for_each_chunk(g, k * hw, parallel, |run, gr| {
        for (j, gp) in gr.chunks_exact_mut(hw).enumerate() {
            let plane = run * k + j;
            affine3(
                gp,
                None,
                &xq[plane * hw..(plane + 1) * hw],
                x_scale,
                coef[plane % c],
            );
        }
    });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The AVX2 blocks of `relu_pooled` give the reference loop's bits (values, offsets, maximum, NaN flag)
    /// on random values with ±0, NaN and infinities, every length 0..40 (whole blocks of 8 and every tail).
    #[test]
    fn relu_pooled_equals_scalar_reference() {
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        for len in 0..40 {
            for trial in 0..6 {
                let vals: Vec<f32> = (0..len)
                    .map(|_| match next() % 11 {
                        0 => 0.0,
                        1 => -0.0,
                        2 if trial > 2 => f32::NAN,
                        3 if trial > 3 => f32::INFINITY,
                        4 if trial > 3 => f32::NEG_INFINITY,
                        _ => (next() % 2001) as f32 / 100.0 - 10.0,
                    })
                    .collect();
                let idx: Vec<u8> = (0..len).map(|_| (next() % 4) as u8).collect();
                let (mut y0, mut i0) = (vals.clone(), idx.clone());
                let r0 = relu_pooled_scalar(&mut y0, &mut i0, 0.0);
                let (mut y1, mut i1) = (vals.clone(), idx.clone());
                let r1 = relu_pooled(&mut y1, &mut i1);
                let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                assert_eq!(bits(&y0), bits(&y1), "len {len} trial {trial}");
                assert_eq!(i0, i1, "len {len} trial {trial}");
                assert_eq!((r0.0.to_bits(), r0.1), (r1.0.to_bits(), r1.1));
                #[cfg(target_arch = "x86_64")]
                if crate::simd::elementwise_avx2() {
                    let (mut y2, mut i2) = (vals.clone(), idx.clone());
                    // SAFETY: AVX2 checked; same lengths
                    let (done, m, n) = unsafe { relu_pooled_avx2(&mut y2, &mut i2) };
                    assert_eq!(done, len / 8 * 8);
                    let (m2, n2) = relu_pooled_scalar(&mut y2[done..], &mut i2[done..], m);
                    assert_eq!(bits(&y0), bits(&y2));
                    assert_eq!(i0, i2);
                    assert_eq!((r0.0.to_bits(), r0.1), (m2.to_bits(), n | n2));
                }
            }
        }
    }

    /// The pooled forward gives the bits of BatchNorm's own forward followed by a plain window-by-window
    /// 2x2 maximum and ReLU (values, argmax or [`NO_GRAD`], codes, scale, statistics, output range), and
    /// the pooled backward those of a plain scatter to the argmax followed by BatchNorm's int8 backward, on
    /// planes whose channels span several groups of [`STACK_VALUES`] with a partial last one, odd planes,
    /// planes of width 2 and 3, and a plane of one value per window row.
    #[test]
    fn pooled_forward_and_backward_equal_unfused_reference() {
        for shape in [
            [2, 9, 30, 30],
            [2, 5, 33, 33],
            [2, 1500, 2, 2],
            [3, 300, 4, 4],
            [2, 7, 3, 2],
            [2, 4, 2, 3],
            [2, 3, 5, 5],
        ] {
            let [n, c, h, w] = shape;
            let len = n * c * h * w;
            let x0: Vec<f32> = (0..len)
                .map(|i| ((i * 7919 % 1013) as f32 - 500.0) * 0.01 + (i % 3) as f32)
                .collect();
            let gamma: Vec<f32> = (0..c).map(|i| 0.5 + (i % 7) as f32 * 0.25).collect();
            let beta: Vec<f32> = (0..c).map(|i| (i % 5) as f32 * 0.2 - 0.4).collect();
            let run = |fused: bool| {
                let mut x = x0.clone();
                let (mut rm, mut rv) = (vec![0f32; c], vec![1f32; c]);
                let (mut mean, mut invstd) = (vec![0f32; c], vec![0f32; c]);
                let mut xq = vec![0i8; len];
                let (oh, ow) = (h / 2, w / 2);
                let mut y = vec![0f32; n * c * oh * ow];
                let mut idx = vec![0u8; y.len()];
                let (scale, range) = if fused {
                    batchnorm2d_relu_forward_save_i8(
                        &mut x,
                        shape,
                        Some(&gamma),
                        Some(&beta),
                        &mut rm,
                        &mut rv,
                        0.1,
                        1e-5,
                        &mut mean,
                        &mut invstd,
                        &mut xq,
                        ReluOut::Pool2x2 {
                            y: &mut y,
                            idx: &mut idx,
                        },
                    )
                    .unwrap()
                } else {
                    let (scale, _) = super::super::batchnorm::forward_inplace_save_i8(
                        &mut x,
                        shape,
                        (Some(&gamma), Some(&beta)),
                        (&mut rm, &mut rv),
                        (0.1, 1e-5),
                        (&mut mean, &mut invstd),
                        &mut xq,
                        false,
                    )
                    .unwrap();
                    for plane in 0..n * c {
                        let xp = &x[plane * h * w..(plane + 1) * h * w];
                        for oy in 0..oh {
                            for ox in 0..ow {
                                let at = |k: usize| xp[(2 * oy + k / 2) * w + 2 * ox + k % 2];
                                let (mut best, mut arg) = (at(0), 0u8);
                                for k in 1..4 {
                                    if at(k) > best || at(k).is_nan() {
                                        (best, arg) = (at(k), k as u8);
                                    }
                                }
                                let o = (plane * oh + oy) * ow + ox;
                                y[o] = if best < 0.0 { 0.0 } else { best };
                                idx[o] = if best > 0.0 { arg } else { NO_GRAD };
                            }
                        }
                    }
                    (scale, ActRange::of(&y))
                };
                let amax = range.map(|r| r.amax().to_bits());
                // backward from a gradient with a zero and a negative zero in it
                let mut dy: Vec<f32> = (0..y.len())
                    .map(|i| ((i * 31 % 23) as f32 - 11.0) * 0.05)
                    .collect();
                dy[0] = -0.0;
                let mut dx = vec![f32::NAN; len];
                let (mut dg, mut db) = (vec![0f32; c], vec![0f32; c]);
                if fused {
                    batchnorm2d_relu_backward_i8(
                        &mut dy,
                        ReluSaved::Pool2x2(&idx),
                        &xq,
                        scale,
                        shape,
                        Some(&gamma),
                        &mean,
                        &invstd,
                        Some(&mut dx),
                        &mut dg,
                        &mut db,
                    )
                    .unwrap();
                } else {
                    dx.fill(0.0);
                    for plane in 0..n * c {
                        for oy in 0..oh {
                            for ox in 0..ow {
                                let o = (plane * oh + oy) * ow + ox;
                                if idx[o] < 4 {
                                    let (i, j) = (idx[o] as usize / 2, idx[o] as usize % 2);
                                    dx[plane * h * w + (2 * oy + i) * w + 2 * ox + j] = dy[o];
                                }
                            }
                        }
                    }
                    super::super::batchnorm2d_backward_i8_inplace(
                        &mut dx,
                        &xq,
                        scale,
                        shape,
                        Some(&gamma),
                        &mean,
                        &invstd,
                        &mut dg,
                        &mut db,
                    )
                    .unwrap();
                }
                let grads = [dx, dg, db].concat();
                (x, xq, y, idx, scale.to_bits(), mean, invstd, amax, grads)
            };
            let (a, b) = (run(true), run(false));
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&a.0), bits(&b.0), "bn(x) of {shape:?}");
            assert_eq!(a.1, b.1, "codes of {shape:?}");
            assert_eq!(bits(&a.2), bits(&b.2), "y of {shape:?}");
            assert_eq!(a.3, b.3, "argmax of {shape:?}");
            assert_eq!(a.4, b.4, "scale of {shape:?}");
            assert_eq!(bits(&a.5), bits(&b.5), "mean of {shape:?}");
            assert_eq!(bits(&a.6), bits(&b.6), "invstd of {shape:?}");
            assert_eq!(a.7, b.7, "range of {shape:?}");
            assert_eq!(bits(&a.8), bits(&b.8), "dx, dgamma, dbeta of {shape:?}");
        }
    }

    /// An empty batch is no panic either way (the core is called with whatever shapes a caller passes).
    #[test]
    fn empty_batch_backward_does_not_panic() {
        let shape = [0, 3, 4, 4];
        let (gamma, mean, invstd) = (vec![1f32; 3], vec![0f32; 3], vec![1f32; 3]);
        let (mut dg, mut db) = (vec![0f32; 3], vec![0f32; 3]);
        let (mut dy, mut dx) = (Vec::<f32>::new(), Vec::<f32>::new());
        for pool in [true, false] {
            let (saved, out) = if pool {
                (ReluSaved::Pool2x2(&[]), Some(&mut dx[..]))
            } else {
                (ReluSaved::Mask(&[]), None)
            };
            let r = batchnorm2d_relu_backward_i8(
                &mut dy,
                saved,
                &[],
                0.1,
                shape,
                Some(&gamma),
                &mean,
                &invstd,
                out,
                &mut dg,
                &mut db,
            );
            assert!(
                r.is_ok() && dg == [0.0; 3] && db == [0.0; 3],
                "pool {pool}: {r:?}"
            );
        }
    }

    /// The fused mask backward gives the bits of the two unfused calls (mask pass, then BatchNorm's
    /// in-place int8 backward), on planes that start on a mask byte and on planes that do not.
    #[test]
    fn mask_backward_equals_unfused_calls() {
        for shape in [
            [3, 4, 4, 4],
            [2, 3, 8, 5],
            [2, 2, 3, 3],
            [2, 3, 1, 5],
            [3, 2, 1, 1],
        ] {
            let len: usize = shape.iter().product();
            let c = shape[1];
            let xq: Vec<i8> = (0..len)
                .map(|i| ((i * 37 % 255) as i32 - 127) as i8)
                .collect();
            let dy: Vec<f32> = (0..len)
                .map(|i| ((i * 13 % 17) as f32 - 8.0) * 0.1)
                .collect();
            let mask: Vec<u8> = (0..super::super::relu_mask_len(len))
                .map(|i| (i * 91 % 256) as u8)
                .collect();
            let gamma: Vec<f32> = (0..c).map(|i| 0.5 + i as f32).collect();
            let mean: Vec<f32> = (0..c).map(|i| 0.1 * i as f32 - 0.2).collect();
            let invstd: Vec<f32> = (0..c).map(|i| 1.0 + 0.3 * i as f32).collect();
            let (mut dg, mut db) = (vec![0f32; c], vec![0f32; c]);
            let mut fused = dy.clone();
            batchnorm2d_relu_backward_i8(
                &mut fused,
                ReluSaved::Mask(&mask),
                &xq,
                0.02,
                shape,
                Some(&gamma),
                &mean,
                &invstd,
                None,
                &mut dg,
                &mut db,
            )
            .unwrap();
            let (mut dg_ref, mut db_ref) = (vec![0f32; c], vec![0f32; c]);
            let mut unfused = dy.clone();
            super::super::relu_backward_mask_inplace(&mut unfused, &mask).unwrap();
            super::super::batchnorm2d_backward_i8_inplace(
                &mut unfused,
                &xq,
                0.02,
                shape,
                Some(&gamma),
                &mean,
                &invstd,
                &mut dg_ref,
                &mut db_ref,
            )
            .unwrap();
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&fused), bits(&unfused), "dx of {shape:?}");
            assert_eq!(bits(&dg), bits(&dg_ref), "dgamma of {shape:?}");
            assert_eq!(bits(&db), bits(&db_ref), "dbeta of {shape:?}");
            assert!(batchnorm2d_relu_backward_i8(
                &mut fused,
                ReluSaved::Mask(&mask[1..]),
                &xq,
                0.02,
                shape,
                Some(&gamma),
                &mean,
                &invstd,
                None,
                &mut dg,
                &mut db,
            )
            .is_err());
        }
    }
}
