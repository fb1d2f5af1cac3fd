//! SSE2 building blocks for packing 4-byte k-groups (the layout of every x86 kernel). SSE2 is part of
//! x86-64, so these need no feature detection. Callers check bounds; these functions only move bytes.

use std::arch::x86_64::*;

/// Transposes a 4-line × 4-group block: line `l` (at `src + l·ls`) holds groups `0..4` (16 bytes); group
/// `g` of lines `0..4` goes to `dst + g·gs` (16 bytes). Every byte is XOR-ed with `x`; in group 3 the
/// bytes outside `keep_last` become `x` (padding past the end of K).
///
/// # Safety
/// `src + l·ls .. +16` is readable for `l < 4` and `dst + g·gs .. +16` writable for `g < 4`.
#[inline]
pub(crate) unsafe fn transpose_4x4_groups(
    src: *const i8,
    ls: usize,
    dst: *mut i8,
    gs: usize,
    x: i8,
    keep_last: u32,
) {
    let xv = _mm_set1_epi8(x);
    let keep = _mm_set_epi32(keep_last as i32, -1, -1, -1);
    let load = |p: *const i8| {
        _mm_xor_si128(
            _mm_and_si128(_mm_loadu_si128(p as *const __m128i), keep),
            xv,
        )
    };
    let r0 = load(src);
    let r1 = load(src.add(ls));
    let r2 = load(src.add(2 * ls));
    let r3 = load(src.add(3 * ls));
    let t0 = _mm_unpacklo_epi32(r0, r1); // l0g0 l1g0 l0g1 l1g1
    let t1 = _mm_unpackhi_epi32(r0, r1); // l0g2 l1g2 l0g3 l1g3
    let t2 = _mm_unpacklo_epi32(r2, r3);
    let t3 = _mm_unpackhi_epi32(r2, r3);
    _mm_storeu_si128(dst as *mut __m128i, _mm_unpacklo_epi64(t0, t2));
    _mm_storeu_si128(dst.add(gs) as *mut __m128i, _mm_unpackhi_epi64(t0, t2));
    _mm_storeu_si128(dst.add(2 * gs) as *mut __m128i, _mm_unpacklo_epi64(t1, t3));
    _mm_storeu_si128(dst.add(3 * gs) as *mut __m128i, _mm_unpackhi_epi64(t1, t3));
}

/// Interleaves 16 lines of one group: k-row `u` (at `src + u·ks`) holds lines `0..16`; writes the 64
/// bytes `dst[l·4 + u] = row_u[l] ^ x`, with rows `u >= rows` (past the end of K) taken as zeros.
///
/// # Safety
/// `src + u·ks .. +16` is readable for `u < rows` and `dst .. +64` writable.
#[inline]
pub(crate) unsafe fn interleave_16_lines(
    src: *const i8,
    ks: usize,
    dst: *mut i8,
    x: i8,
    rows: usize,
) {
    let xv = _mm_set1_epi8(x);
    let load = |u: usize| {
        if u < rows {
            _mm_xor_si128(_mm_loadu_si128(src.add(u * ks) as *const __m128i), xv)
        } else {
            xv
        }
    };
    let (r0, r1, r2, r3) = (load(0), load(1), load(2), load(3));
    let a_lo = _mm_unpacklo_epi8(r0, r1); // lines 0..8 as (k0, k1) pairs
    let a_hi = _mm_unpackhi_epi8(r0, r1);
    let b_lo = _mm_unpacklo_epi8(r2, r3); // lines 0..8 as (k2, k3) pairs
    let b_hi = _mm_unpackhi_epi8(r2, r3);
    let d = dst as *mut __m128i;
    _mm_storeu_si128(d, _mm_unpacklo_epi16(a_lo, b_lo));
    _mm_storeu_si128(d.add(1), _mm_unpackhi_epi16(a_lo, b_lo));
    _mm_storeu_si128(d.add(2), _mm_unpacklo_epi16(a_hi, b_hi));
    _mm_storeu_si128(d.add(3), _mm_unpackhi_epi16(a_hi, b_hi));
}

/// [`interleave_16_lines`] from four separate k-rows: `dst[l·4 + u] = src[u][l]`, rows `u >= rows` zero.
///
/// # Safety
/// `src[u] .. +16` is readable for `u < rows` and `dst .. +64` writable.
#[inline]
pub(crate) unsafe fn interleave_16_rows(src: [*const i8; 4], rows: usize, dst: *mut i8) {
    let load = |u: usize| {
        if u < rows {
            _mm_loadu_si128(src[u] as *const __m128i)
        } else {
            _mm_setzero_si128()
        }
    };
    let (r0, r1, r2, r3) = (load(0), load(1), load(2), load(3));
    let a_lo = _mm_unpacklo_epi8(r0, r1);
    let a_hi = _mm_unpackhi_epi8(r0, r1);
    let b_lo = _mm_unpacklo_epi8(r2, r3);
    let b_hi = _mm_unpackhi_epi8(r2, r3);
    let d = dst as *mut __m128i;
    _mm_storeu_si128(d, _mm_unpacklo_epi16(a_lo, b_lo));
    _mm_storeu_si128(d.add(1), _mm_unpackhi_epi16(a_lo, b_lo));
    _mm_storeu_si128(d.add(2), _mm_unpacklo_epi16(a_hi, b_hi));
    _mm_storeu_si128(d.add(3), _mm_unpackhi_epi16(a_hi, b_hi));
}
