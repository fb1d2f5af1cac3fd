//! ReLU and ReLU6 forward and backward on flat buffers (any shape).

#[cfg(target_arch = "x86_64")]
use super::elementwise_avx2;
use super::{for_each_chunk, for_each_chunk2, worth_parallel};
use crate::error::{Error, Result};
use crate::quant::{abs_bits, ActRange, AmaxAcc};

/// Elements per parallel task.
const CHUNK: usize = 1 << 14;

fn same_len(arg: &'static str, got: usize, want: usize) -> Result<()> {
    if got != want {
        return Err(Error::invalid(
            arg,
            format!("expected {want} elements (the input's size), got {got}"),
        ));
    }
    Ok(())
}

/// `y = max(x, 0)`; NaN stays NaN (like PyTorch).
pub fn relu_forward(x: &[f32], y: &mut [f32]) -> Result<()> {
    map_elements(x, y, |v| if v < 0.0 { 0.0 } else { v })
}

/// `dx = dy` where `y > 0`, else 0 (`y` is the forward output).
pub fn relu_backward(dy: &[f32], y: &[f32], dx: &mut [f32]) -> Result<()> {
    grad_where_output(dy, y, dx, |v| v > 0.0)
}

/// `y = min(max(x, 0), 6)`; NaN stays NaN (like `np.clip` and PyTorch).
pub fn relu6_forward(x: &[f32], y: &mut [f32]) -> Result<()> {
    map_elements(x, y, |v| {
        let a = if v < 0.0 { 0.0 } else { v };
        if a > 6.0 {
            6.0
        } else {
            a
        }
    })
}

/// `dx = dy` where `0 < y < 6`, else 0 (`y` is the forward output): ReLU6's FP32 backward.
pub fn relu6_backward(dy: &[f32], y: &[f32], dx: &mut [f32]) -> Result<()> {
    grad_where_output(dy, y, dx, |v| v > 0.0 && v < 6.0)
}

/// `y = f(x)` element-wise, in parallel chunks for large inputs.
#[inline(always)]
fn map_elements(x: &[f32], y: &mut [f32], f: impl Fn(f32) -> f32 + Sync + Send) -> Result<()> {
    same_len("y", y.len(), x.len())?;
    for_each_chunk(y, CHUNK, worth_parallel(x.len()), |i, yc| {
        for (o, &v) in yc.iter_mut().zip(&x[i * CHUNK..]) {
            *o = f(v);
        }
    });
    Ok(())
}

/// `dx = dy` where `passes(y)`, else 0: the backward of an activation whose gradient is 1 or 0, read
/// from its saved output `y`.
#[inline(always)]
fn grad_where_output(
    dy: &[f32],
    y: &[f32],
    dx: &mut [f32],
    passes: impl Fn(f32) -> bool + Sync + Send,
) -> Result<()> {
    same_len("y", y.len(), dy.len())?;
    same_len("dx", dx.len(), dy.len())?;
    for_each_chunk(dx, CHUNK, worth_parallel(dy.len()), |i, dc| {
        let (d, yv) = (&dy[i * CHUNK..], &y[i * CHUNK..]);
        for ((o, &g), &v) in dc.iter_mut().zip(d).zip(yv) {
            *o = if passes(v) { g } else { 0.0 };
        }
    });
    Ok(())
}

/// Bytes of a packed ReLU mask of `n` elements: one bit per element, bit `i % 8` of byte `i / 8` is
/// element `i`'s `x > 0`.
pub fn relu_mask_len(n: usize) -> usize {
    n.div_ceil(8)
}

fn check_mask(mask: usize, n: usize) -> Result<()> {
    let want = relu_mask_len(n);
    if mask != want {
        return Err(Error::invalid(
            "mask",
            format!("expected {want} bytes (one bit per element of {n}), got {mask}"),
        ));
    }
    Ok(())
}

/// Packs `x > 0` of `xs` (at most 8·`mc.len()` values) into `mc`.
#[inline(always)]
fn pack_positive(xs: &[f32], mc: &mut [u8]) {
    let n = xs.len().min(8 * mc.len());
    let full = n / 8;
    // fixed 8-element groups: the compare and the bit gather vectorise
    for (m, x8) in mc[..full].iter_mut().zip(xs[..full * 8].chunks_exact(8)) {
        let mut b = 0u8;
        for j in 0..8 {
            b |= ((x8[j] > 0.0) as u8) << j;
        }
        *m = b;
    }
    if full < mc.len() {
        let mut b = 0u8;
        for (j, &v) in xs[full * 8..n].iter().enumerate() {
            b |= ((v > 0.0) as u8) << j;
        }
        mc[full] = b;
    }
}

/// For each mask byte, the 8 lane masks (all ones where the bit is set): selecting by AND keeps `g` bit for
/// bit where the bit is set and gives +0.0 elsewhere, like the branchy select, and vectorises.
const LANE_MASKS: [[u32; 8]; 256] = lane_masks();

const fn lane_masks() -> [[u32; 8]; 256] {
    let mut t = [[0u32; 8]; 256];
    let mut b = 0;
    while b < 256 {
        let mut j = 0;
        while j < 8 {
            if (b >> j) & 1 != 0 {
                t[b][j] = u32::MAX;
            }
            j += 1;
        }
        b += 1;
    }
    t
}

/// `o[j] = if bit j of b { g[j] } else { 0 }` over one group of up to 8 elements.
#[inline(always)]
fn select8(o8: &mut [f32], g8: &[f32], b: u8) {
    if o8.len() == 8 && g8.len() == 8 {
        let mk = &LANE_MASKS[b as usize];
        for j in 0..8 {
            o8[j] = f32::from_bits(g8[j].to_bits() & mk[j]);
        }
    } else {
        for (j, (o, &g)) in o8.iter_mut().zip(g8).enumerate() {
            *o = if (b >> j) & 1 != 0 { g } else { 0.0 };
        }
    }
}

/// `y = max(x, 0)` plus the packed bit mask `(x > 0)` that [`relu_backward_mask`] needs
/// ([`relu_mask_len`] bytes): the saved activation of a ReLU in INT8 training is 1/32 of the FP32 output.
/// Returns `y`'s range as [`relu_forward_mask_inplace`] does.
pub fn relu_forward_mask(x: &[f32], y: &mut [f32], mask: &mut [u8]) -> Result<Option<ActRange>> {
    same_len("y", y.len(), x.len())?;
    check_mask(mask.len(), x.len())?;
    let parallel = worth_parallel(x.len());
    let acc = AmaxAcc::new();
    for_each_chunk(y, CHUNK, parallel, |i, yc| {
        acc.add_abs_bits(relu_chunk_amax(&x[i * CHUNK..i * CHUNK + yc.len()], yc));
    });
    for_each_chunk(mask, CHUNK / 8, parallel, |i, mc| {
        pack_positive(&x[i * CHUNK..], mc)
    });
    Ok(acc.finish(y))
}

crate::simd::avx2_multiversion! {
/// `y = max(x, 0)` over one chunk (NaN stays NaN) and the largest [`abs_bits`] written.
fn relu_chunk_amax(x: &[f32], y: &mut [f32]) -> u32 {
    let mut m = 0u32;
    for (o, &v) in y.iter_mut().zip(x) {
        *o = if v < 0.0 { 0.0 } else { v };
        m = m.max(abs_bits(*o));
    }
    m
}
}

/// `dx = dy` where the mask bit is set, else 0 (`mask` from [`relu_forward_mask`]).
pub fn relu_backward_mask(dy: &[f32], mask: &[u8], dx: &mut [f32]) -> Result<()> {
    check_mask(mask.len(), dy.len())?;
    same_len("dx", dx.len(), dy.len())?;
    for_each_chunk(dx, CHUNK, worth_parallel(dy.len()), |i, dc| {
        let (d, mv) = (&dy[i * CHUNK..], &mask[i * CHUNK / 8..]);
        for ((o8, g8), &b) in dc.chunks_mut(8).zip(d.chunks(8)).zip(mv) {
            select8(o8, &g8[..o8.len().min(g8.len())], b);
        }
    });
    Ok(())
}

/// [`relu_forward_mask`] in place: `x = max(x, 0)` and the packed mask (for callers that own `x`).
/// Returns the output's range (largest value), taken as it is written; `None` if it holds NaN or +inf.
pub fn relu_forward_mask_inplace(x: &mut [f32], mask: &mut [u8]) -> Result<Option<ActRange>> {
    clamp_mask_inplace::<false>(x, mask)
}

/// ReLU6 with its saved activation as a bit mask, in place: `x = min(max(x, 0), 6)` (NaN stays NaN, like
/// `np.clip`) and the packed mask (layout of [`relu_forward_mask`]) of `0 < x < 6`, where ReLU6 passes the
/// gradient (PyTorch's `hardtanh_backward`); [`relu_backward_mask`] applies it.
/// Returns the output's range as [`relu_forward_mask_inplace`] does.
pub fn relu6_forward_mask_inplace(x: &mut [f32], mask: &mut [u8]) -> Result<Option<ActRange>> {
    clamp_mask_inplace::<true>(x, mask)
}

/// [`relu6_forward_mask_inplace`] into `y`, leaving `x` as it is (and `y`'s range).
pub fn relu6_forward_mask(x: &[f32], y: &mut [f32], mask: &mut [u8]) -> Result<Option<ActRange>> {
    same_len("y", y.len(), x.len())?;
    y.copy_from_slice(x);
    relu6_forward_mask_inplace(y, mask)
}

/// The clamp of ReLU (`SIX = false`: `max(x, 0)`, bit `x > 0`) or ReLU6 (`min(max(x, 0), 6)`, bit
/// `0 < x < 6`) in place, with its mask.
/// The output's largest value and whether it had NaN or +inf come out of the same pass (the values are in
/// registers): the range the next INT8 layer quantizes with ([`ActRange`]).
fn clamp_mask_inplace<const SIX: bool>(x: &mut [f32], mask: &mut [u8]) -> Result<Option<ActRange>> {
    check_mask(mask.len(), x.len())?;
    let parallel = worth_parallel(x.len());
    let acc = AmaxAcc::new();
    // One pass: each group of 8 is read once for its mask byte and clamped while in registers.
    for_each_chunk2(x, CHUNK, mask, CHUNK / 8, parallel, |_, xc, mc| {
        #[cfg(target_arch = "x86_64")]
        if elementwise_avx2() {
            // SAFETY: the CPU has AVX2; `mc` holds a byte per group of 8 of `xc`.
            let (full, mx, nan) = unsafe { clamp_mask_groups_avx2::<SIX>(xc, mc) };
            let (tmx, tnan) = clamp_mask_scalar::<SIX>(&mut xc[full * 8..], &mut mc[full..]);
            acc.add(mx.max(tmx), nan || tnan);
            return;
        }
        let (mx, nan) = clamp_mask_scalar::<SIX>(xc, mc);
        acc.add(mx, nan);
    });
    Ok(acc.finish(x))
}

/// One element of [`clamp_mask_inplace`]: the clamped value and its mask bit.
#[inline(always)]
fn clamp_one<const SIX: bool>(v: f32) -> (f32, bool) {
    if SIX {
        // NaN and -0.0 pass through (`f32::clamp` compares like the branches)
        (v.clamp(0.0, 6.0), v > 0.0 && v < 6.0)
    } else {
        (if v < 0.0 { 0.0 } else { v }, v > 0.0)
    }
}

/// [`clamp_mask_inplace`] of a chunk without SIMD (also the tail after the AVX2 groups).
/// Returns the largest output (at least 0.0) and whether an output was NaN.
fn clamp_mask_scalar<const SIX: bool>(xc: &mut [f32], mc: &mut [u8]) -> (f32, bool) {
    let (mut mx, mut nan) = (0f32, false);
    for (m, x8) in mc.iter_mut().zip(xc.chunks_mut(8)) {
        let mut b = 0u8;
        for (j, v) in x8.iter_mut().enumerate() {
            let (y, bit) = clamp_one::<SIX>(*v);
            b |= (bit as u8) << j;
            *v = y;
            mx = if y > mx { y } else { mx };
            nan |= y.is_nan();
        }
        *m = b;
    }
    (mx, nan)
}

/// Whole groups of 8 of [`clamp_mask_inplace`] with AVX2: ordered compares give the mask byte by
/// `movemask`, `x < 0` is cleared by AND-NOT and (ReLU6) `x > 6` replaced by 6, so NaN and −0.0 pass
/// through as in the scalar loop. Returns the number of groups done (`xc.len() / 8`), the largest output
/// (at least 0.0, over the non-NaN outputs) and whether an output was NaN.
///
/// # Safety
/// The CPU has AVX2 and `mc.len() ≥ xc.len() / 8`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn clamp_mask_groups_avx2<const SIX: bool>(
    xc: &mut [f32],
    mc: &mut [u8],
) -> (usize, f32, bool) {
    use std::arch::x86_64::*;
    let full = xc.len() / 8;
    assert!(mc.len() >= full);
    let (zero, six) = (_mm256_setzero_ps(), _mm256_set1_ps(6.0));
    // `max_ps(y, mx)` returns `mx` when `y` is NaN (which `nan` records) and the outputs are all ≥ ±0,
    // so the lanes' maximum is the scalar loop's
    let (mut mx, mut nan) = (zero, zero);
    let p = xc.as_mut_ptr();
    for g in 0..full {
        let v = _mm256_loadu_ps(p.add(g * 8));
        let mut pass = _mm256_cmp_ps::<_CMP_GT_OQ>(v, zero);
        let neg = _mm256_cmp_ps::<_CMP_LT_OQ>(v, zero);
        let mut y = _mm256_andnot_ps(neg, v);
        if SIX {
            pass = _mm256_and_ps(pass, _mm256_cmp_ps::<_CMP_LT_OQ>(v, six));
            y = _mm256_blendv_ps(y, six, _mm256_cmp_ps::<_CMP_GT_OQ>(v, six));
        }
        *mc.get_unchecked_mut(g) = _mm256_movemask_ps(pass) as u8;
        _mm256_storeu_ps(p.add(g * 8), y);
        mx = _mm256_max_ps(y, mx);
        nan = _mm256_or_ps(nan, _mm256_cmp_ps::<_CMP_UNORD_Q>(y, y));
    }
    let mut lanes = [0f32; 8];
    _mm256_storeu_ps(lanes.as_mut_ptr(), mx);
    let m = lanes.iter().fold(0f32, |a, &b| if b > a { b } else { a });
    (full, m, _mm256_movemask_ps(nan) != 0)
}

/// [`relu_backward_mask`] in place: `dy = 0` where the mask bit is clear (dy becomes dx).
pub fn relu_backward_mask_inplace(dy: &mut [f32], mask: &[u8]) -> Result<()> {
    check_mask(mask.len(), dy.len())?;
    let parallel = worth_parallel(dy.len());
    for_each_chunk(dy, CHUNK, parallel, |i, dc| {
        apply_mask(dc, &mask[i * CHUNK / 8..])
    });
    Ok(())
}

/// `dc[j] = 0` where bit `j` of the packed mask `mc` is clear (`mc` holds a byte per 8 elements of `dc`,
/// the last one possibly partial).
pub(super) fn apply_mask(dc: &mut [f32], mc: &[u8]) {
    assert!(
        mc.len() >= dc.len().div_ceil(8),
        "a mask byte per 8 elements"
    );
    #[cfg(target_arch = "x86_64")]
    if elementwise_avx2() {
        // SAFETY: the CPU has AVX2; `mc` holds a byte per group of 8 of `dc` (asserted above).
        let full = unsafe { select_groups_avx2(dc, mc) };
        return select_inplace(&mut dc[full * 8..], &mc[full..]);
    }
    select_inplace(dc, mc)
}

/// `dc[j] = 0` where bit `start + j` of the packed `mask` is clear: [`apply_mask`] for a run that starts at any
/// bit of the mask (a plane of a size not a multiple of 8), its head up to the next mask byte done bit by bit.
pub(super) fn apply_mask_from(dc: &mut [f32], mask: &[u8], start: usize) {
    let head = ((8 - start % 8) % 8).min(dc.len());
    let (dh, rest) = dc.split_at_mut(head);
    for (j, o) in dh.iter_mut().enumerate() {
        let bit = start + j;
        *o = if (mask[bit / 8] >> (bit % 8)) & 1 != 0 {
            *o
        } else {
            0.0
        };
    }
    if !rest.is_empty() {
        apply_mask(rest, &mask[(start + head) / 8..]);
    }
}

/// Whole groups of 8 of [`select_inplace`] with AVX2: the mask byte broadcast, each lane's bit tested into
/// an all-ones or all-zeros lane, and `dc` ANDed with it (the same bits as the table lookup). Returns the
/// number of groups done (`dc.len() / 8`).
///
/// # Safety
/// The CPU has AVX2 and `mask.len() ≥ dc.len() / 8`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn select_groups_avx2(dc: &mut [f32], mask: &[u8]) -> usize {
    use std::arch::x86_64::*;
    let full = dc.len() / 8;
    assert!(mask.len() >= full);
    let lane_bits = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
    let p = dc.as_mut_ptr();
    for g in 0..full {
        let b = _mm256_set1_epi32(*mask.get_unchecked(g) as i32);
        let keep = _mm256_cmpeq_epi32(_mm256_and_si256(b, lane_bits), lane_bits);
        let v = _mm256_loadu_ps(p.add(g * 8));
        _mm256_storeu_ps(p.add(g * 8), _mm256_and_ps(v, _mm256_castsi256_ps(keep)));
    }
    full
}

/// `dc[j] = 0` where bit `j` of the packed `mask` is clear.
fn select_inplace(dc: &mut [f32], mask: &[u8]) {
    for (o8, &b) in dc.chunks_mut(8).zip(mask) {
        if o8.len() == 8 {
            let mk = &LANE_MASKS[b as usize];
            for j in 0..8 {
                o8[j] = f32::from_bits(o8[j].to_bits() & mk[j]);
            }
        } else {
            for (j, o) in o8.iter_mut().enumerate() {
                *o = if (b >> j) & 1 != 0 { *o } else { 0.0 };
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mask_ops_match_reference() {
        let n = 70_001;
        let x: Vec<f32> = (0..n)
            .map(|i| ((i * 7919 % 1001) as f32 - 500.0) * 0.01)
            .collect();
        let dy: Vec<f32> = (0..n).map(|i| (i % 13) as f32 - 6.0).collect();
        let (mut y, mut m) = (vec![9.0f32; n], vec![9u8; relu_mask_len(n)]);
        relu_forward_mask(&x, &mut y, &mut m).unwrap();
        let mut y_ref = vec![0.0f32; n];
        relu_forward(&x, &mut y_ref).unwrap();
        assert_eq!(y, y_ref);
        for i in 0..n {
            assert_eq!((m[i / 8] >> (i % 8)) & 1, (x[i] > 0.0) as u8, "bit {i}");
        }
        let (mut dx, mut dx_ref) = (vec![9.0f32; n], vec![9.0f32; n]);
        relu_backward_mask(&dy, &m, &mut dx).unwrap();
        relu_backward(&dy, &y_ref, &mut dx_ref).unwrap();
        assert_eq!(dx, dx_ref);
        assert!(relu_backward_mask(&dy, &m[1..], &mut dx).is_err());
        let (mut xi, mut mi) = (x.clone(), vec![7u8; relu_mask_len(n)]);
        relu_forward_mask_inplace(&mut xi, &mut mi).unwrap();
        assert_eq!(xi, y_ref);
        assert_eq!(mi, m);
        let mut gi = dy.clone();
        relu_backward_mask_inplace(&mut gi, &m).unwrap();
        assert_eq!(gi, dx_ref);
    }

    #[test]
    fn relu6_mask_matches_reference() {
        let n = 70_003;
        let mut x: Vec<f32> = (0..n)
            .map(|i| ((i * 7919 % 1601) as f32 - 500.0) * 0.01)
            .collect();
        x[..6].copy_from_slice(&[f32::NAN, -0.0, 0.0, 6.0, f32::INFINITY, f32::NEG_INFINITY]);
        let (mut y, mut m) = (vec![9.0f32; n], vec![9u8; relu_mask_len(n)]);
        relu6_forward_mask(&x, &mut y, &mut m).unwrap();
        for i in 0..n {
            let v = x[i];
            let want = if v < 0.0 {
                0.0
            } else if v > 6.0 {
                6.0
            } else {
                v
            };
            assert_eq!(y[i].to_bits(), want.to_bits(), "y {i} of {v}");
            let bit = (m[i / 8] >> (i % 8)) & 1;
            assert_eq!(bit, (v > 0.0 && v < 6.0) as u8, "bit {i} of {v}");
        }
        assert!(x[..16]
            .iter()
            .zip(&y)
            .any(|(a, b)| a.to_bits() != b.to_bits()));
        assert!(relu6_forward_mask(&x, &mut y[1..], &mut m).is_err());
        // the FP32 pair (output kept instead of the mask) gives the same output and gradient
        let mut y32 = vec![9.0f32; n];
        relu6_forward(&x, &mut y32).unwrap();
        assert!(y32.iter().zip(&y).all(|(a, b)| a.to_bits() == b.to_bits()));
        let dy: Vec<f32> = (0..n).map(|i| (i % 13) as f32 - 6.0).collect();
        let (mut dx, mut dx_mask) = (vec![9.0f32; n], vec![9.0f32; n]);
        relu6_backward(&dy, &y32, &mut dx).unwrap();
        relu_backward_mask(&dy, &m, &mut dx_mask).unwrap();
        assert_eq!(dx, dx_mask);
        assert!(relu6_backward(&dy, &y32[1..], &mut dx).is_err());
    }
}
