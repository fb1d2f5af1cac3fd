//! Max and average pooling over NCHW planes, forward and backward (floor mode, PyTorch semantics:
//! max pooling treats padding as −∞ and propagates NaN; average pooling counts padding, i.e.
//! `count_include_pad=True`, dividing by `kh·kw`).
//!
//! Max pooling records the argmax as its offset `i·kw + j` inside the window (one byte per output), so
//! backward needs neither the input nor a second search.

use std::sync::atomic::{AtomicBool, Ordering};

#[cfg(target_arch = "x86_64")]
use super::elementwise_avx2;
use super::{check_len, for_each_chunk, for_each_chunk2, worth_parallel, Geometry, Window2d};
use crate::error::{Error, Result};

fn geometry(arg: &'static str, shape: [usize; 4], win: Window2d) -> Result<Geometry> {
    let g = Geometry::new(arg, shape, win)?;
    if g.ph > g.kh / 2 || g.pw > g.kw / 2 {
        return Err(Error::invalid(
            "padding",
            format!(
                "must be at most half the kernel size ({}, {}), got ({}, {})",
                g.kh, g.kw, g.ph, g.pw
            ),
        ));
    }
    Ok(g)
}

/// Input rows `lo..hi` covered by output row `oy`'s window, and the window row of `lo`.
#[inline]
fn span(o: usize, s: usize, p: usize, k: usize, len: usize) -> (usize, usize, usize) {
    let start = (o * s) as isize - p as isize;
    let lo = start.max(0) as usize;
    let hi = ((start + k as isize) as usize).min(len);
    (lo, hi, (lo as isize - start) as usize)
}

/// Output shape `(N, C, OH, OW)` of a pooling window over `shape`.
pub fn pool2d_output_shape(shape: [usize; 4], win: Window2d) -> Result<[usize; 4]> {
    let g = geometry("x", shape, win)?;
    Ok([g.n, g.c, g.oh, g.ow])
}

/// Max pooling: `y` and `idx` are `(N, C, OH, OW)`; `idx` holds the window offset `i·kw + j` of each
/// maximum, so the window may have at most 255 elements.
pub fn maxpool2d_forward(
    x: &[f32],
    shape: [usize; 4],
    win: Window2d,
    y: &mut [f32],
    idx: &mut [u8],
) -> Result<Geometry> {
    let g = geometry("x", shape, win)?;
    if g.kh * g.kw > 255 {
        return Err(Error::invalid(
            "kernel",
            format!(
                "window of {}x{} = {} elements exceeds 255 (argmax offsets are stored as uint8)",
                g.kh,
                g.kw,
                g.kh * g.kw
            ),
        ));
    }
    check_len("x", x.len(), &shape)?;
    let out = [g.n, g.c, g.oh, g.ow];
    check_len("y", y.len(), &out)?;
    check_len("idx", idx.len(), &out)?;
    let (hw, p) = (g.hw(), g.p());
    if g.kh == 2 && g.kw == 2 && g.sh == 2 && g.sw == 2 && g.ph == 0 && g.pw == 0 && p > 0 {
        // runs of whole planes (one call for the thousands of 4x4 and 2x2 planes of a small network)
        let k = (STACK_VALUES / hw).max(1);
        for_each_chunk2(
            y,
            k * p,
            idx,
            k * p,
            worth_parallel(x.len()),
            |i, yp, ip| {
                let planes = yp.len() / p;
                maxpool_2x2_planes(&x[i * k * hw..][..planes * hw], planes, g.h, g.w, yp, ip);
            },
        );
        return Ok(g);
    }
    for_each_chunk2(y, p, idx, p, worth_parallel(x.len()), |plane, yp, ip| {
        let xp = &x[plane * hw..(plane + 1) * hw];
        for oy in 0..g.oh {
            let (y0, y1, wi) = span(oy, g.sh, g.ph, g.kh, g.h);
            for ox in 0..g.ow {
                let (x0, x1, wj) = span(ox, g.sw, g.pw, g.kw, g.w);
                let mut best = f32::NEG_INFINITY;
                let mut at = wi * g.kw + wj;
                for (ii, iy) in (y0..y1).enumerate() {
                    let row = &xp[iy * g.w..];
                    for (jj, &v) in row[x0..x1].iter().enumerate() {
                        // Branch-free selects: with real data the comparison is unpredictable.
                        let take = v > best || v.is_nan();
                        best = if take { v } else { best };
                        at = if take { (wi + ii) * g.kw + wj + jj } else { at };
                    }
                }
                yp[oy * g.ow + ox] = best;
                ip[oy * g.ow + ox] = at as u8;
            }
        }
    });
    Ok(g)
}

/// How many values of consecutive planes the 2x2 pooling (and the fused BatchNorm + ReLU + pooling) takes
/// at a time: whole planes, at least one; 16 KiB of FP32, well inside L1.
pub(super) const STACK_VALUES: usize = 4096;

/// [`maxpool_2x2`] of `planes` consecutive `h x w` planes: stacked as one tall plane when the height is even
/// (row pairs never straddle two planes), else plane by plane.
pub(super) fn maxpool_2x2_planes(
    xp: &[f32],
    planes: usize,
    h: usize,
    w: usize,
    yp: &mut [f32],
    ip: &mut [u8],
) {
    let (oh, ow) = (h / 2, w / 2);
    if h % 2 == 0 {
        return maxpool_2x2(xp, w, planes * oh, ow, yp, ip);
    }
    let (hw, p) = (h * w, oh * ow);
    for j in 0..planes {
        let (yj, ij) = (&mut yp[j * p..(j + 1) * p], &mut ip[j * p..(j + 1) * p]);
        maxpool_2x2(&xp[j * hw..(j + 1) * hw], w, oh, ow, yj, ij);
    }
}

/// [`maxpool_2x2_backward`] of `planes` consecutive `h x w` planes, stacked as [`maxpool_2x2_planes`].
pub(super) fn maxpool_2x2_backward_planes(
    dyp: &[f32],
    ip: &[u8],
    planes: usize,
    h: usize,
    w: usize,
    dp: &mut [f32],
) {
    let (oh, ow) = (h / 2, w / 2);
    if h % 2 == 0 {
        return maxpool_2x2_backward(dyp, ip, planes * h, w, planes * oh, ow, dp);
    }
    let (hw, p) = (h * w, oh * ow);
    for (j, dj) in dp[..planes * hw].chunks_exact_mut(hw).enumerate() {
        let r = j * p..(j + 1) * p;
        maxpool_2x2_backward(&dyp[r.clone()], &ip[r], h, w, oh, ow, dj);
    }
}

/// Rows of fewer windows than this take the portable loop (same results): on the 4x4 and 2x2 maps of small
/// inputs the AVX2 row call and its masks cost more than the few comparisons.
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
const ROW_SIMD_MIN: usize = 4;

/// The common 2x2, stride-2, unpadded window (every window fully inside the plane).
pub(super) fn maxpool_2x2(
    xp: &[f32],
    w: usize,
    oh: usize,
    ow: usize,
    yp: &mut [f32],
    ip: &mut [u8],
) {
    #[inline(always)]
    fn pick(best: f32, at: u8, v: f32, k: u8) -> (f32, u8) {
        let take = v > best || v.is_nan();
        (if take { v } else { best }, if take { k } else { at })
    }
    if w == 2 && ow == 1 {
        // planes of width 2: each window is 4 consecutive values (row 2·oy, then row 2·oy + 1)
        for ((win, y), at) in xp[..4 * oh]
            .chunks_exact(4)
            .zip(&mut yp[..oh])
            .zip(&mut ip[..oh])
        {
            let (b, a) = pick(win[0], 0, win[1], 1);
            let (b, a) = pick(b, a, win[2], 2);
            (*y, *at) = pick(b, a, win[3], 3);
        }
        return;
    }
    #[allow(unused_mut)]
    let mut rows_done = 0;
    #[cfg(target_arch = "x86_64")]
    if elementwise_avx2() && w == 4 && ow == 2 {
        // SAFETY: the CPU has AVX2; a plane of width 4 holds 8 values per output row, yp and ip 2.
        rows_done = unsafe { avx2::maxpool_2x2_w4(xp, oh, yp, ip) };
    }
    for oy in rows_done..oh {
        let r0 = &xp[2 * oy * w..2 * oy * w + 2 * ow];
        let r1 = &xp[(2 * oy + 1) * w..(2 * oy + 1) * w + 2 * ow];
        let (yr, ir) = (
            &mut yp[oy * ow..(oy + 1) * ow],
            &mut ip[oy * ow..(oy + 1) * ow],
        );
        #[allow(unused_mut)]
        let mut done = 0;
        #[cfg(target_arch = "x86_64")]
        if elementwise_avx2() && ow >= ROW_SIMD_MIN {
            // SAFETY: the CPU has AVX2; r0/r1 hold 2·ow values, yr/ir ow.
            done = unsafe { avx2::maxpool_2x2_row(r0, r1, yr, ir) };
        }
        for ox in done..ow {
            let (b, a) = (r0[2 * ox], 0u8);
            let (b, a) = pick(b, a, r0[2 * ox + 1], 1);
            let (b, a) = pick(b, a, r1[2 * ox], 2);
            let (b, a) = pick(b, a, r1[2 * ox + 1], 3);
            yr[ox] = b;
            ir[ox] = a;
        }
    }
}

/// Backward of [`maxpool_2x2`]: windows do not overlap, so every input gets either its window's gradient
/// or zero, written once, row pair by row pair (no zero-fill pass, no bounds checks in the inner loop).
/// Offsets in `ip` must be at most 3 (checked by the caller).
pub(super) fn maxpool_2x2_backward(
    dyp: &[f32],
    ip: &[u8],
    h: usize,
    w: usize,
    oh: usize,
    ow: usize,
    dp: &mut [f32],
) {
    if w == 2 && ow == 1 && h == 2 * oh {
        // planes of width 2: each window is 4 consecutive values
        for ((d, &v), &at) in dp[..4 * oh]
            .chunks_exact_mut(4)
            .zip(&dyp[..oh])
            .zip(&ip[..oh])
        {
            for (k, d) in d.iter_mut().enumerate() {
                *d = if at as usize == k { v } else { 0.0 };
            }
        }
        return;
    }
    for oy in 0..oh {
        let (top, bottom) = dp[2 * oy * w..(2 * oy + 2) * w].split_at_mut(w);
        let (dyr, ir) = (&dyp[oy * ow..(oy + 1) * ow], &ip[oy * ow..(oy + 1) * ow]);
        #[allow(unused_mut)]
        let mut done = 0;
        #[cfg(target_arch = "x86_64")]
        if elementwise_avx2() && ow >= ROW_SIMD_MIN {
            // SAFETY: the CPU has AVX2; top/bottom hold at least 2·ow values, dyr/ir ow.
            done = unsafe { avx2::maxpool_2x2_backward_row(dyr, ir, top, bottom) };
        }
        for (((t, b), &v), &at) in top[2 * done..]
            .chunks_exact_mut(2)
            .zip(bottom[2 * done..].chunks_exact_mut(2))
            .zip(&dyr[done..])
            .zip(&ir[done..])
        {
            t[0] = if at == 0 { v } else { 0.0 };
            t[1] = if at == 1 { v } else { 0.0 };
            b[0] = if at == 2 { v } else { 0.0 };
            b[1] = if at == 3 { v } else { 0.0 };
        }
        // An odd last column is in no window.
        top[2 * ow..].fill(0.0);
        bottom[2 * ow..].fill(0.0);
    }
    // Likewise an odd last row.
    dp[2 * oh * w..h * w].fill(0.0);
}

/// AVX2 rows of the 2x2 max pooling (8 windows at a time), with the portable loop's semantics: the first
/// of equal maxima wins, a NaN is taken (and then kept).
#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    /// The even- and odd-indexed values of 16 consecutive floats, each in order.
    #[inline(always)]
    unsafe fn deinterleave(p: *const f32) -> (__m256, __m256) {
        let (a, b) = (_mm256_loadu_ps(p), _mm256_loadu_ps(p.add(8)));
        // within 128-bit lanes: [a0 a2 b0 b2 | a4 a6 b4 b6]; the 64-bit permute restores the order
        let even = _mm256_shuffle_ps::<0b10_00_10_00>(a, b);
        let odd = _mm256_shuffle_ps::<0b11_01_11_01>(a, b);
        let fix = |v: __m256| {
            _mm256_castpd_ps(_mm256_permute4x64_pd::<0b11_01_10_00>(_mm256_castps_pd(v)))
        };
        (fix(even), fix(odd))
    }

    /// Lanes `0..n` of 8 (n clamped to 0..=8) as an AVX2 load/store mask.
    #[inline(always)]
    unsafe fn lanes(n: usize) -> __m256i {
        _mm256_cmpgt_epi32(
            _mm256_set1_epi32(n.min(8) as i32),
            _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7),
        )
    }

    /// [`deinterleave`] of the first `n` (< 16) floats at `p`, without reading past them (masked loads).
    #[inline(always)]
    unsafe fn deinterleave_masked(p: *const f32, n: usize) -> (__m256, __m256) {
        let mut buf = [0f32; 16];
        _mm256_storeu_ps(buf.as_mut_ptr(), _mm256_maskload_ps(p, lanes(n)));
        let hi = _mm256_maskload_ps(p.wrapping_add(8), lanes(n.saturating_sub(8)));
        _mm256_storeu_ps(buf.as_mut_ptr().add(8), hi);
        deinterleave(buf.as_ptr())
    }

    /// The 8 windows of two rows' 16 values: (max, offset code 0..3 per window).
    #[inline(always)]
    unsafe fn windows8(
        (e0, o0): (__m256, __m256),
        (e1, o1): (__m256, __m256),
    ) -> (__m256, __m256i) {
        let mut best = e0;
        let mut at = _mm256_setzero_si256();
        for (v, code) in [(o0, 1), (e1, 2), (o1, 3)] {
            let take = _mm256_or_ps(
                _mm256_cmp_ps::<_CMP_GT_OQ>(v, best),
                _mm256_cmp_ps::<_CMP_UNORD_Q>(v, v),
            );
            best = _mm256_blendv_ps(best, v, take);
            at = _mm256_blendv_epi8(at, _mm256_set1_epi32(code), _mm256_castps_si256(take));
        }
        (best, at)
    }

    /// The low byte of each 32-bit lane of `v` into `dst` (at most 8 bytes).
    #[inline(always)]
    unsafe fn store_codes(v: __m256i, dst: &mut [u8]) {
        let mut codes = [0i32; 8];
        _mm256_storeu_si256(codes.as_mut_ptr() as *mut __m256i, v);
        for (d, &c) in dst.iter_mut().zip(&codes) {
            *d = c as u8;
        }
    }

    /// First windows of the `w`-wide blocks covering `0..n` (`n ≥ w`): `0, w, 2w, …`, the last one moved
    /// back to end at `n`, overlapping the block before (its overlapped windows are recomputed with the
    /// same values: no masked stores, which are slow on some CPUs).
    #[inline(always)]
    fn block_starts(n: usize, w: usize) -> impl Iterator<Item = usize> {
        (0..n.div_ceil(w)).map(move |b| (b * w).min(n - w))
    }

    /// Planes 4 wide (two windows per output row): 8 windows from 4 row pairs (32 consecutive values,
    /// each pair the top row then the bottom row) at a time, through [`windows8`]. Returns the number of
    /// output rows done (a multiple of 4; the caller does the rest).
    ///
    /// # Safety
    /// The CPU has AVX2; `xp` holds `8·oh` values, `yp` and `ip` `2·oh`.
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn maxpool_2x2_w4(
        xp: &[f32],
        oh: usize,
        yp: &mut [f32],
        ip: &mut [u8],
    ) -> usize {
        assert!(xp.len() >= 8 * oh && yp.len() >= 2 * oh && ip.len() >= 2 * oh);
        let blocks = oh / 4;
        for b in 0..blocks {
            let p = xp.as_ptr().add(32 * b);
            let v = [0, 8, 16, 24].map(|k| _mm256_loadu_ps(p.add(k)));
            // lane 0 of each 128-bit half: top row, lane 1: bottom row (two pairs per shuffle)
            let even = (
                _mm256_shuffle_ps::<0b10_00_10_00>(v[0], v[1]),
                _mm256_shuffle_ps::<0b10_00_10_00>(v[2], v[3]),
            );
            let odd = (
                _mm256_shuffle_ps::<0b11_01_11_01>(v[0], v[1]),
                _mm256_shuffle_ps::<0b11_01_11_01>(v[2], v[3]),
            );
            let (best, at) = windows8(
                (
                    _mm256_permute2f128_ps::<0x20>(even.0, even.1),
                    _mm256_permute2f128_ps::<0x20>(odd.0, odd.1),
                ),
                (
                    _mm256_permute2f128_ps::<0x31>(even.0, even.1),
                    _mm256_permute2f128_ps::<0x31>(odd.0, odd.1),
                ),
            );
            _mm256_storeu_ps(yp.as_mut_ptr().add(8 * b), best);
            store_codes(at, &mut ip[8 * b..8 * b + 8]);
        }
        4 * blocks
    }

    /// Windows `k0..k0 + 8` of one output row (full loads and stores).
    #[inline(always)]
    unsafe fn forward_block8(r0: &[f32], r1: &[f32], yr: &mut [f32], ir: &mut [u8], k0: usize) {
        let (best, at) = windows8(
            deinterleave(r0.as_ptr().add(2 * k0)),
            deinterleave(r1.as_ptr().add(2 * k0)),
        );
        _mm256_storeu_ps(yr.as_mut_ptr().add(k0), best);
        store_codes(at, &mut ir[k0..k0 + 8]);
    }

    /// Windows `k0..k0 + 4` of one output row, in SSE registers (same selects as [`windows8`]).
    #[inline(always)]
    unsafe fn forward_block4(r0: &[f32], r1: &[f32], yr: &mut [f32], ir: &mut [u8], k0: usize) {
        let de = |r: &[f32]| {
            let (a, b) = (
                _mm_loadu_ps(r.as_ptr().add(2 * k0)),
                _mm_loadu_ps(r.as_ptr().add(2 * k0 + 4)),
            );
            (
                _mm_shuffle_ps::<0b10_00_10_00>(a, b),
                _mm_shuffle_ps::<0b11_01_11_01>(a, b),
            )
        };
        let ((e0, o0), (e1, o1)) = (de(r0), de(r1));
        let mut best = e0;
        let mut at = _mm_setzero_si128();
        for (v, code) in [(o0, 1), (e1, 2), (o1, 3)] {
            let take = _mm_or_ps(_mm_cmpgt_ps(v, best), _mm_cmpunord_ps(v, v));
            best = _mm_blendv_ps(best, v, take);
            at = _mm_blendv_epi8(at, _mm_set1_epi32(code), _mm_castps_si128(take));
        }
        _mm_storeu_ps(yr.as_mut_ptr().add(k0), best);
        let bytes = _mm_packus_epi16(_mm_packus_epi32(at, at), _mm_setzero_si128());
        ir[k0..k0 + 4].copy_from_slice(&(_mm_cvtsi128_si32(bytes) as u32).to_le_bytes());
    }

    /// All windows of one output row: `yr[ox]`, `ir[ox]` from input rows `r0`, `r1`, 8 at a time; the
    /// last partial block is recomputed overlapping the one before (same values written again), in
    /// 4-window blocks for rows of 4 to 7 windows, and with masked loads for shorter rows.
    /// Returns `yr.len()`.
    ///
    /// # Safety
    /// The CPU has AVX2; `r0`, `r1` hold `2·yr.len()` values; `ir.len() == yr.len()`.
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn maxpool_2x2_row(
        r0: &[f32],
        r1: &[f32],
        yr: &mut [f32],
        ir: &mut [u8],
    ) -> usize {
        let ow = yr.len();
        assert!(r0.len() >= 2 * ow && r1.len() >= 2 * ow && ir.len() >= ow);
        if ow >= 8 {
            block_starts(ow, 8).for_each(|k| forward_block8(r0, r1, yr, ir, k));
        } else if ow >= 4 {
            block_starts(ow, 4).for_each(|k| forward_block4(r0, r1, yr, ir, k));
        } else if ow > 0 {
            let (best, at) = windows8(
                deinterleave_masked(r0.as_ptr(), 2 * ow),
                deinterleave_masked(r1.as_ptr(), 2 * ow),
            );
            let mut buf = [0f32; 8];
            _mm256_storeu_ps(buf.as_mut_ptr(), best);
            for (d, &x) in yr.iter_mut().zip(&buf) {
                *d = x;
            }
            store_codes(at, &mut ir[..ow]);
        }
        ow
    }

    /// Backward of 8 windows starting at window `k0`: writes `top`/`bottom` values `2k0..2k0 + 16`.
    #[inline(always)]
    unsafe fn backward_block8(
        dyr: &[f32],
        ir: &[u8],
        top: &mut [f32],
        bottom: &mut [f32],
        k0: usize,
    ) {
        let v = _mm256_loadu_ps(dyr.as_ptr().add(k0));
        let at = _mm256_cvtepu8_epi32(_mm_loadl_epi64(ir.as_ptr().add(k0) as *const __m128i));
        let pick = |code: i32| {
            _mm256_and_ps(
                v,
                _mm256_castsi256_ps(_mm256_cmpeq_epi32(at, _mm256_set1_epi32(code))),
            )
        };
        for (row, (a, b)) in [(top, (pick(0), pick(1))), (bottom, (pick(2), pick(3)))] {
            // interleave a (even columns) and b (odd columns) back into 16 consecutive values
            let (lo, hi) = (_mm256_unpacklo_ps(a, b), _mm256_unpackhi_ps(a, b));
            let p = row.as_mut_ptr().add(2 * k0);
            _mm256_storeu_ps(p, _mm256_permute2f128_ps::<0x20>(lo, hi));
            _mm256_storeu_ps(p.add(8), _mm256_permute2f128_ps::<0x31>(lo, hi));
        }
    }

    /// [`backward_block8`] for 4 windows (SSE registers).
    #[inline(always)]
    unsafe fn backward_block4(
        dyr: &[f32],
        ir: &[u8],
        top: &mut [f32],
        bottom: &mut [f32],
        k0: usize,
    ) {
        let v = _mm_loadu_ps(dyr.as_ptr().add(k0));
        let codes = u32::from_le_bytes([ir[k0], ir[k0 + 1], ir[k0 + 2], ir[k0 + 3]]);
        let at = _mm_cvtepu8_epi32(_mm_cvtsi32_si128(codes as i32));
        let pick = |code: i32| {
            _mm_and_ps(
                v,
                _mm_castsi128_ps(_mm_cmpeq_epi32(at, _mm_set1_epi32(code))),
            )
        };
        for (row, (a, b)) in [(top, (pick(0), pick(1))), (bottom, (pick(2), pick(3)))] {
            let p = row.as_mut_ptr().add(2 * k0);
            _mm_storeu_ps(p, _mm_unpacklo_ps(a, b));
            _mm_storeu_ps(p.add(4), _mm_unpackhi_ps(a, b));
        }
    }

    /// Backward of [`maxpool_2x2_row`]: writes `top[0..2n]`, `bottom[0..2n]` for the `n = dyr.len()`
    /// windows, 8 at a time. The last partial block is recomputed overlapping the one before (the
    /// overlapped windows get the same values again; masked stores are slow on some CPUs), in 4-window
    /// blocks when the row has fewer than 8. Returns the number of windows done (all but rows of fewer
    /// than 4). Offsets in `ir` are at most 3 (checked by the caller).
    ///
    /// # Safety
    /// The CPU has AVX2; `top`, `bottom` hold `2·dyr.len()` values; `ir.len() == dyr.len()`.
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn maxpool_2x2_backward_row(
        dyr: &[f32],
        ir: &[u8],
        top: &mut [f32],
        bottom: &mut [f32],
    ) -> usize {
        let ow = dyr.len();
        assert!(ir.len() >= ow && top.len() >= 2 * ow && bottom.len() >= 2 * ow);
        if ow >= 8 {
            block_starts(ow, 8).for_each(|k| backward_block8(dyr, ir, top, bottom, k));
            ow
        } else if ow >= 4 {
            block_starts(ow, 4).for_each(|k| backward_block4(dyr, ir, top, bottom, k));
            ow
        } else {
            0
        }
    }
}

/// Backward of [`maxpool2d_forward`]: `dx (input_shape)` gets each `dy` at its recorded argmax
/// (summed where windows overlap). Fails if an offset in `idx` lies outside its window or the input.
pub fn maxpool2d_backward(
    dy: &[f32],
    idx: &[u8],
    input_shape: [usize; 4],
    win: Window2d,
    dx: &mut [f32],
) -> Result<Geometry> {
    let g = geometry("input_shape", input_shape, win)?;
    let out = [g.n, g.c, g.oh, g.ow];
    check_len("dy", dy.len(), &out)?;
    check_len("idx", idx.len(), &out)?;
    check_len("dx", dx.len(), &input_shape)?;
    let (hw, p) = (g.hw(), g.p());
    let bad = AtomicBool::new(false);
    for_each_chunk(dx, hw, worth_parallel(dx.len()), |plane, dp| {
        let (dyp, ip) = (
            &dy[plane * p..(plane + 1) * p],
            &idx[plane * p..(plane + 1) * p],
        );
        if g.kh == 2 && g.kw == 2 && g.sh == 2 && g.sw == 2 && g.ph == 0 && g.pw == 0 {
            // a max reduction, which vectorises (`any` stops early and runs a byte at a time)
            if ip.iter().fold(0u8, |m, &at| m.max(at)) > 3 {
                bad.store(true, Ordering::Relaxed);
                return;
            }
            maxpool_2x2_backward(dyp, ip, g.h, g.w, g.oh, g.ow, dp);
            return;
        }
        dp.fill(0.0);
        for oy in 0..g.oh {
            for ox in 0..g.ow {
                let at = ip[oy * g.ow + ox] as usize;
                let (i, j) = (at / g.kw, at % g.kw);
                let iy = (oy * g.sh + i) as isize - g.ph as isize;
                let ix = (ox * g.sw + j) as isize - g.pw as isize;
                if i >= g.kh || iy < 0 || ix < 0 || iy as usize >= g.h || ix as usize >= g.w {
                    bad.store(true, Ordering::Relaxed);
                    continue;
                }
                dp[iy as usize * g.w + ix as usize] += dyp[oy * g.ow + ox];
            }
        }
    });
    if bad.load(Ordering::Relaxed) {
        return Err(Error::invalid("idx", "holds a window offset outside the window or the input (not from maxpool2d_forward with these arguments?)"));
    }
    Ok(g)
}

/// Average pooling (`count_include_pad=True`): `y (N, C, OH, OW)`.
pub fn avgpool2d_forward(
    x: &[f32],
    shape: [usize; 4],
    win: Window2d,
    y: &mut [f32],
) -> Result<Geometry> {
    let g = geometry("x", shape, win)?;
    check_len("x", x.len(), &shape)?;
    check_len("y", y.len(), &[g.n, g.c, g.oh, g.ow])?;
    let (hw, p) = (g.hw(), g.p());
    let inv = 1.0 / (g.kh * g.kw) as f32;
    if is_global(&g) && hw > 0 {
        // One window per plane (global average pooling): blocks of planes summed side by side, each in
        // the general loop's order (row sums, then their running sum), so the chains overlap.
        const B: usize = 8;
        for_each_chunk(y, B, worth_parallel(x.len()), |ci, yb| {
            let first = ci * B;
            let xb = &x[first * hw..(first + yb.len()) * hw];
            let mut s = [0f32; B];
            for iy in 0..g.h {
                for (k, sk) in s.iter_mut().enumerate().take(yb.len()) {
                    let r = k * hw + iy * g.w;
                    *sk += xb[r..r + g.w].iter().sum::<f32>();
                }
            }
            for (o, &sk) in yb.iter_mut().zip(&s) {
                *o = sk * inv;
            }
        });
        return Ok(g);
    }
    for_each_chunk(y, p, worth_parallel(x.len()), |plane, yp| {
        let xp = &x[plane * hw..(plane + 1) * hw];
        for oy in 0..g.oh {
            let (y0, y1, _) = span(oy, g.sh, g.ph, g.kh, g.h);
            for ox in 0..g.ow {
                let (x0, x1, _) = span(ox, g.sw, g.pw, g.kw, g.w);
                let mut s = 0.0f32;
                for iy in y0..y1 {
                    s += xp[iy * g.w + x0..iy * g.w + x1].iter().sum::<f32>();
                }
                yp[oy * g.ow + ox] = s * inv;
            }
        }
    });
    Ok(g)
}

/// One unpadded window covering the whole plane (global average pooling).
fn is_global(g: &Geometry) -> bool {
    g.kh == g.h && g.kw == g.w && g.ph == 0 && g.pw == 0 && g.oh == 1 && g.ow == 1
}

/// Backward of [`avgpool2d_forward`]: each `dy / (kh·kw)` spread over its window's in-bounds inputs.
pub fn avgpool2d_backward(
    dy: &[f32],
    input_shape: [usize; 4],
    win: Window2d,
    dx: &mut [f32],
) -> Result<Geometry> {
    let g = geometry("input_shape", input_shape, win)?;
    check_len("dy", dy.len(), &[g.n, g.c, g.oh, g.ow])?;
    check_len("dx", dx.len(), &input_shape)?;
    let (hw, p) = (g.hw(), g.p());
    let inv = 1.0 / (g.kh * g.kw) as f32;
    if is_global(&g) {
        // every input gets its plane's one gradient, `0 + dy/(kh·kw)` as the general loop adds it
        for_each_chunk(dx, hw, worth_parallel(dx.len()), |plane, dp| {
            dp.fill(0.0 + dy[plane] * inv);
        });
        return Ok(g);
    }
    for_each_chunk(dx, hw, worth_parallel(dx.len()), |plane, dp| {
        dp.fill(0.0);
        let dyp = &dy[plane * p..(plane + 1) * p];
        for oy in 0..g.oh {
            let (y0, y1, _) = span(oy, g.sh, g.ph, g.kh, g.h);
            for ox in 0..g.ow {
                let (x0, x1, _) = span(ox, g.sw, g.pw, g.kw, g.w);
                let v = dyp[oy * g.ow + ox] * inv;
                for iy in y0..y1 {
                    dp[iy * g.w + x0..iy * g.w + x1]
                        .iter_mut()
                        .for_each(|d| *d += v);
                }
            }
        }
    });
    Ok(g)
}
