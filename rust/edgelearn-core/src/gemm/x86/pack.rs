//! Packing for the layout of every x86 kernel, 4-byte k-groups: SSE2 building blocks (part of x86-64, so
//! they need no feature detection; callers check bounds, these functions only move bytes), used by the
//! generic packers and the padded grid, and the AVX2 `B` packer of 16-column panels ([`pack_b_4x16`])
//! that the AVX2 and VNNI kernels use as their `pack_b_block`.

use std::arch::x86_64::*;

/// Transposes a 4-line × 4-group block: line `l` (at `src[l]`) holds groups `0..4` (16 bytes); group
/// `g` of lines `0..4` goes to `dst + g·gs` (16 bytes). Every byte is XOR-ed with `x`; in group 3 the
/// bytes outside `keep_last` become `x` (padding past the end of K).
///
/// # Safety
/// `src[l] .. +16` is readable for `l < 4` and `dst + g·gs .. +16` writable for `g < 4`.
#[inline]
pub(crate) unsafe fn transpose_4x4_groups(
    src: [*const i8; 4],
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
    let [r0, r1, r2, r3] = src.map(load);
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
    store_interleaved([load(0), load(1), load(2), load(3)], dst);
}

/// Writes the 64 bytes `dst[l·4 + u] = r[u][l]` for 16 lines `l` of the four k-rows `r[u]`.
///
/// # Safety
/// `dst .. +64` is writable.
#[inline(always)]
pub(crate) unsafe fn store_interleaved(r: [__m128i; 4], dst: *mut i8) {
    let d = dst as *mut __m128i;
    for (q, v) in interleave4(r).into_iter().enumerate() {
        _mm_storeu_si128(d.add(q), v);
    }
}

/// The 64 bytes of [`store_interleaved`] as four vectors (lines 0..4, 4..8, 8..12, 12..16).
#[inline(always)]
unsafe fn interleave4(r: [__m128i; 4]) -> [__m128i; 4] {
    let a_lo = _mm_unpacklo_epi8(r[0], r[1]); // lines 0..8 as (k0, k1) pairs
    let a_hi = _mm_unpackhi_epi8(r[0], r[1]);
    let b_lo = _mm_unpacklo_epi8(r[2], r[3]); // lines 0..8 as (k2, k3) pairs
    let b_hi = _mm_unpackhi_epi8(r[2], r[3]);
    [
        _mm_unpacklo_epi16(a_lo, b_lo),
        _mm_unpackhi_epi16(a_lo, b_lo),
        _mm_unpacklo_epi16(a_hi, b_hi),
        _mm_unpackhi_epi16(a_hi, b_hi),
    ]
}

/// Writes one group (four k-rows `r` of 16 lines) interleaved at `dst` (64 bytes) and adds its 16
/// column sums to `acc` (lines 0..4, 4..8, 8..12, 12..16): maddubs(1, v) adds each line's k-byte pairs
/// exactly in i16, madd(·, 1) the two pairs, 2 ops per 4 lines instead of widening every row.
///
/// # Safety
/// AVX2 (inlined into the callers' AVX2 code); `dst .. +64` is writable.
#[inline(always)]
unsafe fn store_group(r: [__m128i; 4], dst: *mut i8, acc: &mut [__m128i; 4]) {
    let (ones8, ones16) = (_mm_set1_epi8(1), _mm_set1_epi16(1));
    let d = dst as *mut __m128i;
    for (q, v) in interleave4(r).into_iter().enumerate() {
        _mm_storeu_si128(d.add(q), v);
        acc[q] = _mm_add_epi32(acc[q], _mm_madd_epi16(_mm_maddubs_epi16(ones8, v), ones16));
    }
}

/// The `B` panels of the AVX2 and VNNI kernels (groups of 4 k values, 16 columns) and their column sums
/// in one pass: the rows of a [`RowsRef`](crate::gemm::RowsRef) or of a row-major view (the patch matrix
/// of a forward convolution, `dY` of `Wᵀ·dY`) through AVX2; any other view through the generic packer.
///
/// # Safety
/// The CPU has AVX2; `out`/`sums` are as `Kernel::pack_b_block` asks for (`ceil(n/16)` panels).
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn pack_b_4x16(
    out: &mut [i8],
    sums: &mut [i32],
    b: &crate::gemm::Operand,
    k0: usize,
    kc: usize,
    c0: usize,
    n: usize,
) {
    use crate::gemm::Operand;
    match b {
        Operand::Rows(r) => pack_b_rows_4x16(out, sums, r, k0, kc, c0, n),
        Operand::Strided(m) if m.col_stride() == 1 => {
            pack_b_rowmajor_4x16(out, sums, m.data(), m.row_stride(), k0, kc, c0, n)
        }
        Operand::Strided(_) => crate::gemm::pack::pack_b(out, sums, b, k0, kc, c0, n, 16, 4),
    }
}

/// `pack_b_rows` for 4-value groups and 16-column panels (the VNNI kernels' layout): per group, four
/// 16-byte row loads become 64 packed bytes and the panel's column sums ([`store_group`]), with no
/// bounds checks in the loop for whole panels (a [`RowsRef`](crate::gemm::RowsRef) guarantees every row's `cols` bytes exist).
///
/// # Safety
/// The CPU has AVX2; `out`/`sums` are as `pack_b` asks for (`ceil(n/16)` panels).
#[target_feature(enable = "avx2")]
unsafe fn pack_b_rows_4x16(
    out: &mut [i8],
    sums: &mut [i32],
    b: &crate::gemm::RowsRef,
    k0: usize,
    kc: usize,
    c0: usize,
    n: usize,
) {
    use std::arch::x86_64::*;
    let kgroups = kc.div_ceil(4);
    let panels = n.div_ceil(16);
    let panel_len = kgroups * 64;
    assert!(out.len() >= panels * panel_len && sums.len() >= panels * 16);
    assert!(k0 + kc <= b.rows() && c0 + n <= b.cols());
    for p in 0..panels {
        let first = c0 + p * 16;
        let lines = 16.min(n - p * 16);
        let panel = out.as_mut_ptr().add(p * panel_len);
        let mut acc = [_mm_setzero_si128(); 4];
        let full_groups = if lines == 16 { kc / 4 } else { 0 };
        if full_groups > 0 {
            // Whole panels: four unchecked 16-byte loads per group (rows k0..k0+kc exist, each with
            // `cols ≥ first + 16` bytes: checked by `RowsRef::new` and the assert above).
            let (data, offsets) = b.parts();
            let offs = &offsets[k0..k0 + 4 * full_groups];
            let base = data.as_ptr().add(first);
            for (g, o4) in offs.chunks_exact(4).enumerate() {
                let r = [0, 1, 2, 3].map(|u| _mm_loadu_si128(base.add(o4[u]) as *const __m128i));
                store_group(r, panel.add(g * 64), &mut acc);
            }
        }
        for g in full_groups..kgroups {
            let rows = 4.min(kc - g * 4);
            let mut r = [_mm_setzero_si128(); 4];
            for (u, ru) in r.iter_mut().enumerate().take(rows) {
                let row = b.row(k0 + g * 4 + u, first, lines);
                *ru = if lines == 16 {
                    _mm_loadu_si128(row.as_ptr() as *const __m128i)
                } else {
                    let mut tail = [0i8; 16];
                    tail[..lines].copy_from_slice(row);
                    _mm_loadu_si128(tail.as_ptr() as *const __m128i)
                };
            }
            store_group(r, panel.add(g * 64), &mut acc);
        }
        for (q, a) in acc.into_iter().enumerate() {
            _mm_storeu_si128(sums.as_mut_ptr().add(p * 16 + 4 * q) as *mut __m128i, a);
        }
    }
}

/// The same packing of a row-major `B` (column stride 1, row `k` at `k·rs`): the usual `B` of a
/// forward convolution (the patch matrix) or of `Wᵀ·dY` (dY).
///
/// # Safety
/// The CPU has AVX2; `out`/`sums` are as `pack_b` asks for.
#[target_feature(enable = "avx2")]
#[allow(clippy::too_many_arguments)]
unsafe fn pack_b_rowmajor_4x16(
    out: &mut [i8],
    sums: &mut [i32],
    data: &[i8],
    rs: usize,
    k0: usize,
    kc: usize,
    c0: usize,
    n: usize,
) {
    assert!(kc == 0 || n == 0 || (k0 + kc - 1) * rs + c0 + n <= data.len());
    // SAFETY: rows k0..k0+kc hold columns c0..c0+n (asserted just above).
    pack_b_4x16_body(out, sums, data, |k| k * rs, k0, kc, c0, n)
}

/// Per panel of 16 columns and group of 4 k-rows: four 16-byte row loads into [`store_group`]. Row `k`
/// of `B` starts at `data[row_off(k)]`.
///
/// # Safety
/// AVX2 (the callers' target feature); `data[row_off(k) + c0 .. row_off(k) + c0 + n]` is in bounds for
/// every `k` in `k0..k0 + kc`.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn pack_b_4x16_body(
    out: &mut [i8],
    sums: &mut [i32],
    data: &[i8],
    row_off: impl Fn(usize) -> usize,
    k0: usize,
    kc: usize,
    c0: usize,
    n: usize,
) {
    use std::arch::x86_64::*;
    let kgroups = kc.div_ceil(4);
    let panels = n.div_ceil(16);
    let panel_len = kgroups * 64;
    assert!(out.len() >= panels * panel_len && sums.len() >= panels * 16);
    for p in 0..panels {
        let first = c0 + p * 16;
        let lines = 16.min(n - p * 16);
        let panel = out.as_mut_ptr().add(p * panel_len);
        let mut acc = [_mm_setzero_si128(); 4];
        let base = data.as_ptr().add(first);
        // whole groups of a whole panel: four plain 16-byte loads each
        let full_groups = if lines == 16 { kc / 4 } else { 0 };
        for g in 0..full_groups {
            let k = k0 + 4 * g;
            let r =
                [0, 1, 2, 3].map(|u| _mm_loadu_si128(base.add(row_off(k + u)) as *const __m128i));
            store_group(r, panel.add(g * 64), &mut acc);
        }
        for g in full_groups..kgroups {
            let rows = 4.min(kc - g * 4);
            let mut r = [_mm_setzero_si128(); 4];
            for (u, ru) in r.iter_mut().enumerate().take(rows) {
                let off = row_off(k0 + g * 4 + u);
                *ru = if lines == 16 {
                    _mm_loadu_si128(base.add(off) as *const __m128i)
                } else {
                    let mut tail = [0i8; 16];
                    tail[..lines].copy_from_slice(&data[off + first..off + first + lines]);
                    _mm_loadu_si128(tail.as_ptr() as *const __m128i)
                };
            }
            store_group(r, panel.add(g * 64), &mut acc);
        }
        for (q, a) in acc.into_iter().enumerate() {
            _mm_storeu_si128(sums.as_mut_ptr().add(p * 16 + 4 * q) as *mut __m128i, a);
        }
    }
}
