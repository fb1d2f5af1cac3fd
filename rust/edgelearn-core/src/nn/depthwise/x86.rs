//! AVX2 and AVX-512 builds of the grouped-convolution inner loops ([`super::kernels`] states what each
//! computes). FP32 loops multiply then add (never FMA) in the scalar reference's order, and partial
//! vectors are masked rather than padded, so every result is bit-identical to the scalar one; INT8 sums
//! are exact INT32.

use std::arch::x86_64::*;

use super::kernels::DwKernel;

pub(super) fn avx2_detected() -> bool {
    is_x86_feature_detected!("avx2")
}

pub(super) fn avx512_detected() -> bool {
    is_x86_feature_detected!("avx512f")
        && is_x86_feature_detected!("avx512bw")
        && is_x86_feature_detected!("avx512vl")
}

pub static AVX2: DwKernel = DwKernel {
    name: "avx2",
    corr_f32: corr_f32_avx2,
    corr_i8: corr_i8_avx2,
    dot_f32: dot_f32_avx2,
    dot_i8: dot_i8_avx2,
};

pub static AVX512: DwKernel = DwKernel {
    name: "avx512",
    corr_f32: corr_f32_avx512,
    corr_i8: corr_i8_avx512,
    dot_f32: dot_f32_avx512,
    dot_i8: dot_i8_avx512,
};

// --- AVX2 ------------------------------------------------------------------------------------------------

/// Lane mask of the first `n < 8` lanes.
#[inline(always)]
unsafe fn mask8(n: usize) -> __m256i {
    let idx = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    _mm256_cmpgt_epi32(_mm256_set1_epi32(n as i32), idx)
}

#[target_feature(enable = "avx2")]
unsafe fn corr_f32_avx2(
    out: *mut f32,
    ldo: usize,
    src: *const f32,
    lds: usize,
    rows: usize,
    len: usize,
    offs: &[usize],
    w: &[f32],
) {
    let nt = offs.len().min(w.len());
    for r in 0..rows {
        let o = out.add(r * ldo);
        let s = src.add(r * lds);
        let mut k = 0;
        while k + 16 <= len {
            let mut a0 = _mm256_loadu_ps(o.add(k));
            let mut a1 = _mm256_loadu_ps(o.add(k + 8));
            for t in 0..nt {
                let wv = _mm256_set1_ps(*w.get_unchecked(t));
                let p = s.add(*offs.get_unchecked(t) + k);
                a0 = _mm256_add_ps(a0, _mm256_mul_ps(wv, _mm256_loadu_ps(p)));
                a1 = _mm256_add_ps(a1, _mm256_mul_ps(wv, _mm256_loadu_ps(p.add(8))));
            }
            _mm256_storeu_ps(o.add(k), a0);
            _mm256_storeu_ps(o.add(k + 8), a1);
            k += 16;
        }
        while k < len {
            let m = mask8((len - k).min(8));
            let mut a0 = _mm256_maskload_ps(o.add(k), m);
            for t in 0..nt {
                let wv = _mm256_set1_ps(*w.get_unchecked(t));
                let p = s.add(*offs.get_unchecked(t) + k);
                a0 = _mm256_add_ps(a0, _mm256_mul_ps(wv, _mm256_maskload_ps(p, m)));
            }
            _mm256_maskstore_ps(o.add(k), m, a0);
            k += 8;
        }
    }
}

/// Eight int8 at `p` (only the first `n ≤ 8` read) as eight i32.
#[inline(always)]
unsafe fn load8_i8(p: *const i8, n: usize) -> __m256i {
    if n >= 8 {
        _mm256_cvtepi8_epi32(_mm_loadl_epi64(p as *const __m128i))
    } else {
        let mut buf = [0i8; 8];
        std::ptr::copy_nonoverlapping(p, buf.as_mut_ptr(), n);
        _mm256_cvtepi8_epi32(_mm_loadl_epi64(buf.as_ptr() as *const __m128i))
    }
}

#[target_feature(enable = "avx2")]
unsafe fn corr_i8_avx2(
    out: *mut i32,
    ldo: usize,
    src: *const i8,
    lds: usize,
    rows: usize,
    len: usize,
    offs: &[usize],
    w: &[i32],
) {
    let nt = offs.len().min(w.len());
    for r in 0..rows {
        let o = out.add(r * ldo);
        let s = src.add(r * lds);
        let mut k = 0;
        while k + 16 <= len {
            let mut a0 = _mm256_loadu_si256(o.add(k) as *const __m256i);
            let mut a1 = _mm256_loadu_si256(o.add(k + 8) as *const __m256i);
            for t in 0..nt {
                let wv = _mm256_set1_epi32(*w.get_unchecked(t));
                let p = s.add(*offs.get_unchecked(t) + k);
                a0 = _mm256_add_epi32(a0, _mm256_mullo_epi32(wv, load8_i8(p, 8)));
                a1 = _mm256_add_epi32(a1, _mm256_mullo_epi32(wv, load8_i8(p.add(8), 8)));
            }
            _mm256_storeu_si256(o.add(k) as *mut __m256i, a0);
            _mm256_storeu_si256(o.add(k + 8) as *mut __m256i, a1);
            k += 16;
        }
        while k < len {
            let n = (len - k).min(8);
            let m = mask8(n);
            let mut a0 = _mm256_maskload_epi32(o.add(k), m);
            for t in 0..nt {
                let wv = _mm256_set1_epi32(*w.get_unchecked(t));
                let p = s.add(*offs.get_unchecked(t) + k);
                a0 = _mm256_add_epi32(a0, _mm256_mullo_epi32(wv, load8_i8(p, n)));
            }
            _mm256_maskstore_epi32(o.add(k), m, a0);
            k += 8;
        }
    }
}

#[target_feature(enable = "avx2")]
unsafe fn dot_f32_avx2(
    a: *const f32,
    lda: usize,
    src: *const f32,
    lds: usize,
    rows: usize,
    len: usize,
    offs: &[usize],
    lanes: &mut [[f32; 16]],
) {
    for (l, &off) in lanes.iter_mut().zip(offs) {
        let mut l0 = _mm256_loadu_ps(l.as_ptr());
        let mut l1 = _mm256_loadu_ps(l.as_ptr().add(8));
        for r in 0..rows {
            let (ar, sr) = (a.add(r * lda), src.add(r * lds + off));
            let mut k = 0;
            while k + 16 <= len {
                l0 = _mm256_add_ps(
                    l0,
                    _mm256_mul_ps(_mm256_loadu_ps(ar.add(k)), _mm256_loadu_ps(sr.add(k))),
                );
                l1 = _mm256_add_ps(
                    l1,
                    _mm256_mul_ps(
                        _mm256_loadu_ps(ar.add(k + 8)),
                        _mm256_loadu_ps(sr.add(k + 8)),
                    ),
                );
                k += 16;
            }
            if k < len {
                // the partial block adds only to its own lanes (a masked add would turn -0.0 into +0.0)
                let n = len - k;
                let m0 = mask8(n.min(8));
                let p0 = _mm256_mul_ps(
                    _mm256_maskload_ps(ar.add(k), m0),
                    _mm256_maskload_ps(sr.add(k), m0),
                );
                l0 = _mm256_blendv_ps(l0, _mm256_add_ps(l0, p0), _mm256_castsi256_ps(m0));
                if n > 8 {
                    let m1 = mask8(n - 8);
                    let p1 = _mm256_mul_ps(
                        _mm256_maskload_ps(ar.add(k + 8), m1),
                        _mm256_maskload_ps(sr.add(k + 8), m1),
                    );
                    l1 = _mm256_blendv_ps(l1, _mm256_add_ps(l1, p1), _mm256_castsi256_ps(m1));
                }
            }
        }
        _mm256_storeu_ps(l.as_mut_ptr(), l0);
        _mm256_storeu_ps(l.as_mut_ptr().add(8), l1);
    }
}

#[inline(always)]
unsafe fn hsum_epi32_avx2(v: __m256i) -> i32 {
    let s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    let s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0b01_00_11_10));
    let s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0b10_11_00_01));
    _mm_cvtsi128_si32(s)
}

#[target_feature(enable = "avx2")]
unsafe fn dot_i8_avx2(
    a: *const i8,
    lda: usize,
    src: *const i8,
    lds: usize,
    rows: usize,
    len: usize,
    offs: &[usize],
    sums: &mut [i64],
) {
    for (sum, &off) in sums.iter_mut().zip(offs) {
        for r in 0..rows {
            let (ar, sr) = (a.add(r * lda), src.add(r * lds + off));
            let mut acc = _mm256_setzero_si256();
            let mut k = 0;
            while k + 16 <= len {
                let av = _mm256_cvtepi8_epi16(_mm_loadu_si128(ar.add(k) as *const __m128i));
                let sv = _mm256_cvtepi8_epi16(_mm_loadu_si128(sr.add(k) as *const __m128i));
                acc = _mm256_add_epi32(acc, _mm256_madd_epi16(av, sv));
                k += 16;
            }
            let mut tail = 0i32;
            while k < len {
                tail += *ar.add(k) as i32 * *sr.add(k) as i32;
                k += 1;
            }
            *sum += hsum_epi32_avx2(acc) as i64 + tail as i64;
        }
    }
}

// --- AVX-512 ---------------------------------------------------------------------------------------------

#[inline(always)]
fn mask16(n: usize) -> __mmask16 {
    if n >= 16 {
        0xFFFF
    } else {
        ((1u32 << n) - 1) as __mmask16
    }
}

#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
unsafe fn corr_f32_avx512(
    out: *mut f32,
    ldo: usize,
    src: *const f32,
    lds: usize,
    rows: usize,
    len: usize,
    offs: &[usize],
    w: &[f32],
) {
    let nt = offs.len().min(w.len());
    for r in 0..rows {
        let o = out.add(r * ldo);
        let s = src.add(r * lds);
        let mut k = 0;
        while k + 32 <= len {
            let mut a0 = _mm512_loadu_ps(o.add(k));
            let mut a1 = _mm512_loadu_ps(o.add(k + 16));
            for t in 0..nt {
                let wv = _mm512_set1_ps(*w.get_unchecked(t));
                let p = s.add(*offs.get_unchecked(t) + k);
                a0 = _mm512_add_ps(a0, _mm512_mul_ps(wv, _mm512_loadu_ps(p)));
                a1 = _mm512_add_ps(a1, _mm512_mul_ps(wv, _mm512_loadu_ps(p.add(16))));
            }
            _mm512_storeu_ps(o.add(k), a0);
            _mm512_storeu_ps(o.add(k + 16), a1);
            k += 32;
        }
        while k < len {
            let m = mask16(len - k);
            let mut a0 = _mm512_maskz_loadu_ps(m, o.add(k));
            for t in 0..nt {
                let wv = _mm512_set1_ps(*w.get_unchecked(t));
                let p = s.add(*offs.get_unchecked(t) + k);
                a0 = _mm512_add_ps(a0, _mm512_mul_ps(wv, _mm512_maskz_loadu_ps(m, p)));
            }
            _mm512_mask_storeu_ps(o.add(k), m, a0);
            k += 16;
        }
    }
}

/// Sums of 32 outputs from tap pairs: `vpmaddwd` of the two taps' sign-extended inputs, interleaved,
/// against the pair's weights (two i16 products per i32 lane, exact). `lo`/`hi` hold outputs
/// `8j..8j+3` / `8j+4..8j+7` in 128-bit lane `j`; [`unscramble`] puts them in order.
#[inline(always)]
unsafe fn pair_sums_avx512(
    s: *const i8,
    k: usize,
    offs: &[usize],
    pairs: &[i32],
    mask: u32,
) -> (__m512i, __m512i) {
    let (mut lo, mut hi) = (_mm512_setzero_si512(), _mm512_setzero_si512());
    let nt = offs.len();
    for (pi, &wp) in pairs.iter().enumerate() {
        let t = 2 * pi;
        let a = _mm512_cvtepi8_epi16(_mm256_maskz_loadu_epi8(
            mask,
            s.add(*offs.get_unchecked(t) + k),
        ));
        let b = if t + 1 < nt {
            _mm512_cvtepi8_epi16(_mm256_maskz_loadu_epi8(
                mask,
                s.add(*offs.get_unchecked(t + 1) + k),
            ))
        } else {
            _mm512_setzero_si512()
        };
        let wv = _mm512_set1_epi32(wp);
        lo = _mm512_add_epi32(lo, _mm512_madd_epi16(_mm512_unpacklo_epi16(a, b), wv));
        hi = _mm512_add_epi32(hi, _mm512_madd_epi16(_mm512_unpackhi_epi16(a, b), wv));
    }
    (lo, hi)
}

/// Outputs `0..16` and `16..32` in order from the lane-interleaved sums of [`pair_sums_avx512`].
#[inline(always)]
unsafe fn unscramble(lo: __m512i, hi: __m512i) -> (__m512i, __m512i) {
    let i0 = _mm512_setr_epi64(0, 1, 8, 9, 2, 3, 10, 11);
    let i1 = _mm512_setr_epi64(4, 5, 12, 13, 6, 7, 14, 15);
    (
        _mm512_permutex2var_epi64(lo, i0, hi),
        _mm512_permutex2var_epi64(lo, i1, hi),
    )
}

#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
unsafe fn corr_i8_avx512(
    out: *mut i32,
    ldo: usize,
    src: *const i8,
    lds: usize,
    rows: usize,
    len: usize,
    offs: &[usize],
    w: &[i32],
) {
    let nt = offs.len().min(w.len());
    let offs = &offs[..nt];
    // weights of tap pairs (2i, 2i+1) as the two i16 halves of one i32 (an odd last tap pairs with 0)
    let np = nt.div_ceil(2);
    let (mut stack, mut heap) = ([0i32; 64], Vec::new());
    let pairs: &mut [i32] = if np <= 64 {
        &mut stack[..np]
    } else {
        heap.resize(np, 0);
        &mut heap[..]
    };
    for (pi, p) in pairs.iter_mut().enumerate() {
        let w0 = w[2 * pi] as i16 as u16 as u32;
        let w1 = w.get(2 * pi + 1).map_or(0, |&v| v as i16 as u16 as u32);
        *p = (w0 | (w1 << 16)) as i32;
    }
    let pairs = &*pairs;
    for r in 0..rows {
        let o = out.add(r * ldo);
        let s = src.add(r * lds);
        let mut k = 0;
        while k < len {
            let rem = len - k;
            let mask = if rem >= 32 {
                u32::MAX
            } else {
                (1u32 << rem) - 1
            };
            let (lo, hi) = pair_sums_avx512(s, k, offs, pairs, mask);
            let (r0, r1) = unscramble(lo, hi);
            let (m0, m1) = (mask as u16, (mask >> 16) as u16);
            let a0 = _mm512_add_epi32(_mm512_maskz_loadu_epi32(m0, o.add(k)), r0);
            _mm512_mask_storeu_epi32(o.add(k), m0, a0);
            if m1 != 0 {
                let a1 = _mm512_add_epi32(_mm512_maskz_loadu_epi32(m1, o.add(k + 16)), r1);
                _mm512_mask_storeu_epi32(o.add(k + 16), m1, a1);
            }
            k += 32;
        }
    }
}

#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
unsafe fn dot_f32_avx512(
    a: *const f32,
    lda: usize,
    src: *const f32,
    lds: usize,
    rows: usize,
    len: usize,
    offs: &[usize],
    lanes: &mut [[f32; 16]],
) {
    for (l, &off) in lanes.iter_mut().zip(offs) {
        let mut acc = _mm512_loadu_ps(l.as_ptr());
        for r in 0..rows {
            let (ar, sr) = (a.add(r * lda), src.add(r * lds + off));
            let mut k = 0;
            while k + 16 <= len {
                acc = _mm512_add_ps(
                    acc,
                    _mm512_mul_ps(_mm512_loadu_ps(ar.add(k)), _mm512_loadu_ps(sr.add(k))),
                );
                k += 16;
            }
            if k < len {
                let m = mask16(len - k);
                let p = _mm512_mul_ps(
                    _mm512_maskz_loadu_ps(m, ar.add(k)),
                    _mm512_maskz_loadu_ps(m, sr.add(k)),
                );
                acc = _mm512_mask_add_ps(acc, m, acc, p);
            }
        }
        _mm512_storeu_ps(l.as_mut_ptr(), acc);
    }
}

#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
unsafe fn dot_i8_avx512(
    a: *const i8,
    lda: usize,
    src: *const i8,
    lds: usize,
    rows: usize,
    len: usize,
    offs: &[usize],
    sums: &mut [i64],
) {
    for (sum, &off) in sums.iter_mut().zip(offs) {
        for r in 0..rows {
            let (ar, sr) = (a.add(r * lda), src.add(r * lds + off));
            let mut acc = _mm512_setzero_si512();
            let mut k = 0;
            while k < len {
                let m = if len - k >= 32 {
                    u32::MAX
                } else {
                    (1u32 << (len - k)) - 1
                };
                let av = _mm512_cvtepi8_epi16(_mm256_maskz_loadu_epi8(m, ar.add(k)));
                let sv = _mm512_cvtepi8_epi16(_mm256_maskz_loadu_epi8(m, sr.add(k)));
                acc = _mm512_add_epi32(acc, _mm512_madd_epi16(av, sv));
                k += 32;
            }
            *sum += _mm512_reduce_add_epi32(acc) as i64;
        }
    }
}
