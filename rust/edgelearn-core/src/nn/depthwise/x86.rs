//! AVX2 and AVX-512 builds of the grouped-convolution inner loops ([`super::kernels`] states what each
//! computes). FP32 loops multiply then add (never FMA) in the scalar reference's order, and partial
//! vectors are masked rather than padded, so every result is bit-identical to the scalar one; INT8 sums
//! are exact INT32.

use std::arch::x86_64::*;

use super::kernels::{
    corr_rows, dot_i8_row_tail, dot_i8_rows, dw_entry, CorrTile, DotRowF32, DotRowI8, DwKernel,
    Taps,
};

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
    corr_i8_scaled: None,
    dot_f32: dot_f32_avx2,
    dot_i8: dot_i8_avx2,
};

pub static AVX512: DwKernel = DwKernel {
    name: "avx512",
    corr_f32: corr_f32_avx512,
    corr_i8: corr_i8_avx512,
    corr_i8_scaled: Some(corr_i8_scaled_avx512),
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

/// The AVX2 tiles: 16 outputs of `corr` per block (two vectors), masked 8-lane vectors for the tail;
/// 16 canonical lanes of `dot_f32` in two vectors; 16 bytes per `vpmaddwd` step of `dot_i8`.
struct Avx2<T>(T);

impl CorrTile for Avx2<Taps<'_, f32>> {
    type Out = f32;
    type Src = f32;
    const W: usize = 16;
    #[inline(always)]
    unsafe fn block(&self, o: *mut f32, s: *const f32) {
        let mut a0 = _mm256_loadu_ps(o);
        let mut a1 = _mm256_loadu_ps(o.add(8));
        for (&off, &w) in self.0.offs.iter().zip(self.0.w) {
            let wv = _mm256_set1_ps(w);
            let p = s.add(off);
            a0 = _mm256_add_ps(a0, _mm256_mul_ps(wv, _mm256_loadu_ps(p)));
            a1 = _mm256_add_ps(a1, _mm256_mul_ps(wv, _mm256_loadu_ps(p.add(8))));
        }
        _mm256_storeu_ps(o, a0);
        _mm256_storeu_ps(o.add(8), a1);
    }
    #[inline(always)]
    unsafe fn tail(&self, o: *mut f32, s: *const f32, n: usize) {
        for k in (0..n).step_by(8) {
            let m = mask8((n - k).min(8));
            let mut a0 = _mm256_maskload_ps(o.add(k), m);
            for (&off, &w) in self.0.offs.iter().zip(self.0.w) {
                let wv = _mm256_set1_ps(w);
                a0 = _mm256_add_ps(a0, _mm256_mul_ps(wv, _mm256_maskload_ps(s.add(off + k), m)));
            }
            _mm256_maskstore_ps(o.add(k), m, a0);
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

impl CorrTile for Avx2<Taps<'_, i32>> {
    type Out = i32;
    type Src = i8;
    const W: usize = 16;
    #[inline(always)]
    unsafe fn block(&self, o: *mut i32, s: *const i8) {
        let mut a0 = _mm256_loadu_si256(o as *const __m256i);
        let mut a1 = _mm256_loadu_si256(o.add(8) as *const __m256i);
        for (&off, &w) in self.0.offs.iter().zip(self.0.w) {
            let wv = _mm256_set1_epi32(w);
            let p = s.add(off);
            a0 = _mm256_add_epi32(a0, _mm256_mullo_epi32(wv, load8_i8(p, 8)));
            a1 = _mm256_add_epi32(a1, _mm256_mullo_epi32(wv, load8_i8(p.add(8), 8)));
        }
        _mm256_storeu_si256(o as *mut __m256i, a0);
        _mm256_storeu_si256(o.add(8) as *mut __m256i, a1);
    }
    #[inline(always)]
    unsafe fn tail(&self, o: *mut i32, s: *const i8, n: usize) {
        for k in (0..n).step_by(8) {
            let nk = (n - k).min(8);
            let m = mask8(nk);
            let mut a0 = _mm256_maskload_epi32(o.add(k), m);
            for (&off, &w) in self.0.offs.iter().zip(self.0.w) {
                let wv = _mm256_set1_epi32(w);
                a0 = _mm256_add_epi32(a0, _mm256_mullo_epi32(wv, load8_i8(s.add(off + k), nk)));
            }
            _mm256_maskstore_epi32(o.add(k), m, a0);
        }
    }
}

impl DotRowF32 for Avx2<()> {
    type Acc = (__m256, __m256);
    #[inline(always)]
    unsafe fn load(&self, l: &[f32; 16]) -> Self::Acc {
        (
            _mm256_loadu_ps(l.as_ptr()),
            _mm256_loadu_ps(l.as_ptr().add(8)),
        )
    }
    #[inline(always)]
    unsafe fn row(&self, (l0, l1): &mut Self::Acc, a: *const f32, s: *const f32, len: usize) {
        let mut k = 0;
        while k + 16 <= len {
            *l0 = _mm256_add_ps(
                *l0,
                _mm256_mul_ps(_mm256_loadu_ps(a.add(k)), _mm256_loadu_ps(s.add(k))),
            );
            *l1 = _mm256_add_ps(
                *l1,
                _mm256_mul_ps(_mm256_loadu_ps(a.add(k + 8)), _mm256_loadu_ps(s.add(k + 8))),
            );
            k += 16;
        }
        if k < len {
            // the partial block adds only to its own lanes (a masked add would turn -0.0 into +0.0)
            let n = len - k;
            let m0 = mask8(n.min(8));
            let p0 = _mm256_mul_ps(
                _mm256_maskload_ps(a.add(k), m0),
                _mm256_maskload_ps(s.add(k), m0),
            );
            *l0 = _mm256_blendv_ps(*l0, _mm256_add_ps(*l0, p0), _mm256_castsi256_ps(m0));
            if n > 8 {
                let m1 = mask8(n - 8);
                let p1 = _mm256_mul_ps(
                    _mm256_maskload_ps(a.add(k + 8), m1),
                    _mm256_maskload_ps(s.add(k + 8), m1),
                );
                *l1 = _mm256_blendv_ps(*l1, _mm256_add_ps(*l1, p1), _mm256_castsi256_ps(m1));
            }
        }
    }
    #[inline(always)]
    unsafe fn store(&self, (l0, l1): Self::Acc, l: &mut [f32; 16]) {
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

impl DotRowI8 for Avx2<()> {
    #[inline(always)]
    unsafe fn row(&self, a: *const i8, s: *const i8, len: usize) -> i32 {
        let mut acc = _mm256_setzero_si256();
        let mut k = 0;
        while k + 16 <= len {
            let av = _mm256_cvtepi8_epi16(_mm_loadu_si128(a.add(k) as *const __m128i));
            let sv = _mm256_cvtepi8_epi16(_mm_loadu_si128(s.add(k) as *const __m128i));
            acc = _mm256_add_epi32(acc, _mm256_madd_epi16(av, sv));
            k += 16;
        }
        hsum_epi32_avx2(acc) + dot_i8_row_tail(a, s, k, len)
    }
}

dw_entry!(
    #[target_feature(enable = "avx2")]
    corr corr_f32_avx2<f32, f32, f32>(Avx2)
);

dw_entry!(
    #[target_feature(enable = "avx2")]
    corr corr_i8_avx2<i32, i8, i32>(Avx2)
);

dw_entry!(
    #[target_feature(enable = "avx2")]
    dot_f32 dot_f32_avx2(Avx2(()))
);

dw_entry!(
    #[target_feature(enable = "avx2")]
    dot_i8 dot_i8_avx2(Avx2(()))
);

// --- AVX-512 ---------------------------------------------------------------------------------------------

#[inline(always)]
fn mask16(n: usize) -> __mmask16 {
    if n >= 16 {
        0xFFFF
    } else {
        ((1u32 << n) - 1) as __mmask16
    }
}

/// The AVX-512 tiles: 32 outputs of FP32 `corr` per block, masked 16-lane vectors for the tail; INT8
/// `corr` on tap pairs ([`TapPairs`]) or the 3x3 VNNI window ([`Window3x3`]); 16 canonical lanes of
/// `dot_f32` in one vector; `vpmaddwd` rows of `dot_i8` where VNNI is missing.
struct Avx512<T>(T);

impl CorrTile for Avx512<Taps<'_, f32>> {
    type Out = f32;
    type Src = f32;
    const W: usize = 32;
    #[inline(always)]
    unsafe fn block(&self, o: *mut f32, s: *const f32) {
        let mut a0 = _mm512_loadu_ps(o);
        let mut a1 = _mm512_loadu_ps(o.add(16));
        for (&off, &w) in self.0.offs.iter().zip(self.0.w) {
            let wv = _mm512_set1_ps(w);
            let p = s.add(off);
            a0 = _mm512_add_ps(a0, _mm512_mul_ps(wv, _mm512_loadu_ps(p)));
            a1 = _mm512_add_ps(a1, _mm512_mul_ps(wv, _mm512_loadu_ps(p.add(16))));
        }
        _mm512_storeu_ps(o, a0);
        _mm512_storeu_ps(o.add(16), a1);
    }
    #[inline(always)]
    unsafe fn tail(&self, o: *mut f32, s: *const f32, n: usize) {
        for k in (0..n).step_by(16) {
            let m = mask16(n - k);
            let mut a0 = _mm512_maskz_loadu_ps(m, o.add(k));
            for (&off, &w) in self.0.offs.iter().zip(self.0.w) {
                let wv = _mm512_set1_ps(w);
                a0 = _mm512_add_ps(
                    a0,
                    _mm512_mul_ps(wv, _mm512_maskz_loadu_ps(m, s.add(off + k))),
                );
            }
            _mm512_mask_storeu_ps(o.add(k), m, a0);
        }
    }
}

/// INT8 `corr` taps as pairs `(2i, 2i+1)`: the pair's two weights as the i16 halves of one i32 (an odd
/// last tap pairs with weight 0).
struct TapPairs<'a> {
    offs: &'a [usize],
    pairs: &'a [i32],
}

impl TapPairs<'_> {
    /// Sums of 32 outputs (`mask` selects the inputs read): `vpmaddwd` of each pair's two taps'
    /// sign-extended inputs, interleaved, against the pair's weights (two i16 products per i32 lane,
    /// exact). `lo`/`hi` hold outputs `8j..8j+3` / `8j+4..8j+7` in 128-bit lane `j`; [`unscramble`] puts
    /// them in order.
    #[inline(always)]
    unsafe fn sums(&self, s: *const i8, mask: u32) -> (__m512i, __m512i) {
        let (mut lo, mut hi) = (_mm512_setzero_si512(), _mm512_setzero_si512());
        let nt = self.offs.len();
        for (pi, &wp) in self.pairs.iter().enumerate() {
            let t = 2 * pi;
            let a = _mm512_cvtepi8_epi16(_mm256_maskz_loadu_epi8(
                mask,
                s.add(*self.offs.get_unchecked(t)),
            ));
            let b = if t + 1 < nt {
                _mm512_cvtepi8_epi16(_mm256_maskz_loadu_epi8(
                    mask,
                    s.add(*self.offs.get_unchecked(t + 1)),
                ))
            } else {
                _mm512_setzero_si512()
            };
            let wv = _mm512_set1_epi32(wp);
            lo = _mm512_add_epi32(lo, _mm512_madd_epi16(_mm512_unpacklo_epi16(a, b), wv));
            hi = _mm512_add_epi32(hi, _mm512_madd_epi16(_mm512_unpackhi_epi16(a, b), wv));
        }
        unscramble(lo, hi)
    }
}

impl CorrTile for Avx512<TapPairs<'_>> {
    type Out = i32;
    type Src = i8;
    const W: usize = 32;
    #[inline(always)]
    unsafe fn block(&self, o: *mut i32, s: *const i8) {
        let (r0, r1) = self.0.sums(s, u32::MAX);
        _mm512_storeu_si512(
            o as *mut __m512i,
            _mm512_add_epi32(_mm512_loadu_si512(o as *const __m512i), r0),
        );
        let o1 = o.add(16);
        _mm512_storeu_si512(
            o1 as *mut __m512i,
            _mm512_add_epi32(_mm512_loadu_si512(o1 as *const __m512i), r1),
        );
    }
    #[inline(always)]
    unsafe fn tail(&self, o: *mut i32, s: *const i8, n: usize) {
        let mask = (1u32 << n) - 1;
        let (r0, r1) = self.0.sums(s, mask);
        let (m0, m1) = (mask as u16, (mask >> 16) as u16);
        _mm512_mask_storeu_epi32(o, m0, _mm512_add_epi32(_mm512_maskz_loadu_epi32(m0, o), r0));
        if m1 != 0 {
            let o1 = o.add(16);
            _mm512_mask_storeu_epi32(
                o1,
                m1,
                _mm512_add_epi32(_mm512_maskz_loadu_epi32(m1, o1), r1),
            );
        }
    }
}

/// Outputs `0..16` and `16..32` in order from the lane-interleaved sums of [`TapPairs::sums`].
#[inline(always)]
unsafe fn unscramble(lo: __m512i, hi: __m512i) -> (__m512i, __m512i) {
    let i0 = _mm512_setr_epi64(0, 1, 8, 9, 2, 3, 10, 11);
    let i1 = _mm512_setr_epi64(4, 5, 12, 13, 6, 7, 14, 15);
    (
        _mm512_permutex2var_epi64(lo, i0, hi),
        _mm512_permutex2var_epi64(lo, i1, hi),
    )
}

/// A 3x3 window at column step 1 (tap `(i, j)` at offset `base + i·d + j`, taps in row-major order) with
/// int8 weights: `(base, (d, the three rows' weights as bytes [w0, w1, w2, 0], 128·Σw))`.
fn taps_3x3(offs: &[usize], w: &[i32]) -> Option<Taps3x3> {
    if offs.len() != 9 || w.len() < 9 || offs[3] < offs[0] {
        return None;
    }
    let (base, d) = (offs[0], offs[3] - offs[0]);
    let mut rows = [0i32; 3];
    let mut sum = 0i32;
    for i in 0..3 {
        let mut packed = 0u32;
        for j in 0..3 {
            let t = 3 * i + j;
            let wt = w[t];
            if offs[t] != base + i * d + j || !(-128..=127).contains(&wt) {
                return None;
            }
            packed |= (wt as i8 as u8 as u32) << (8 * j);
            sum += wt;
        }
        rows[i] = packed as i32;
    }
    Some((base, (d, rows, 128 * sum)))
}

fn vnni_vbmi_detected() -> bool {
    is_x86_feature_detected!("avx512vnni") && is_x86_feature_detected!("avx512vbmi")
}

/// Byte `4q + j` of a gathered vector is input `q + j` (`j < 3`); byte `4q + 3` (input `q + 2` again) meets
/// weight 0.
static GATHER_3X3: [u8; 64] = {
    let mut idx = [0u8; 64];
    let mut i = 0;
    while i < 64 {
        let (q, j) = (i / 4, i % 4);
        idx[i] = (q + if j < 2 { j } else { 2 }) as u8;
        i += 1;
    }
    idx
};

/// Where [`corr_i8_3x3_vnni_add`]/[`corr_i8_3x3_vnni_scaled`] puts the INT32 sums of up to 16 outputs (`m` masks the valid ones).
trait Store3x3 {
    type Out;
    unsafe fn store(&self, o: *mut Self::Out, m: __mmask16, acc: __m512i);
}

/// `out += sums` (INT32, wrapping): the plain `corr_i8`.
struct AddI32;

impl Store3x3 for AddI32 {
    type Out = i32;
    #[inline(always)]
    unsafe fn store(&self, o: *mut i32, m: __mmask16, acc: __m512i) {
        let a = _mm512_add_epi32(_mm512_maskz_loadu_epi32(m, o), acc);
        _mm512_mask_storeu_epi32(o, m, a);
    }
}

/// `out = sums as f32 · scale + bias` (one multiply, one add: the fallback's rounding).
struct ScaleF32 {
    scale: __m512,
    bias: __m512,
}

impl Store3x3 for ScaleF32 {
    type Out = f32;
    #[inline(always)]
    unsafe fn store(&self, o: *mut f32, m: __mmask16, acc: __m512i) {
        let v = _mm512_add_ps(
            _mm512_mul_ps(_mm512_cvtepi32_ps(acc), self.scale),
            self.bias,
        );
        _mm512_mask_storeu_ps(o, m, v);
    }
}

/// [`corr_i8_avx512`] for a 3x3 window at column step 1 ([`taps_3x3`]): per kernel row, one `vpermb`
/// gathers the three input bytes of each of 16 outputs into one 4-byte group (inputs flipped to unsigned,
/// `x + 128`), and one `vpdpbusd` multiplies them with the row's weights `[w0, w1, w2, 0]` and adds; the
/// sum starts at `−128·Σw`, which undoes the flip. Exact INT32 (wrapping, as the scalar loop), handed to
/// the store `S` 16 outputs at a time. Sources are relative to the window's first tap.
struct Window3x3<'a, S> {
    st: &'a S,
    idx: __m512i,
    flip: __m512i,
    w: [__m512i; 3],
    start: __m512i,
    d: usize,
}

impl<'a, S: Store3x3> Window3x3<'a, S> {
    #[inline(always)]
    unsafe fn new(st: &'a S, (d, [w0, w1, w2], flip_sum): (usize, [i32; 3], i32)) -> Self {
        Window3x3 {
            st,
            idx: _mm512_loadu_si512(GATHER_3X3.as_ptr() as *const __m512i),
            flip: _mm512_set1_epi8(-128),
            w: [
                _mm512_set1_epi32(w0),
                _mm512_set1_epi32(w1),
                _mm512_set1_epi32(w2),
            ],
            start: _mm512_set1_epi32(flip_sum.wrapping_neg()),
            d,
        }
    }
    /// The sums of outputs `0..n`, `n ≤ 16` (they read inputs `0..n + 2` of each kernel row).
    #[inline(always)]
    unsafe fn sums(&self, s: *const i8, n: usize) -> __m512i {
        let bmask: u64 = (1u64 << (n + 2)) - 1;
        let mut acc = self.start;
        for (i, w) in self.w.iter().enumerate() {
            let v = _mm512_maskz_loadu_epi8(bmask, s.add(i * self.d));
            let g = _mm512_permutexvar_epi8(self.idx, _mm512_xor_si512(v, self.flip));
            acc = _mm512_dpbusd_epi32(acc, g, *w);
        }
        acc
    }
}

impl<S: Store3x3> CorrTile for Window3x3<'_, S> {
    type Out = S::Out;
    type Src = i8;
    const W: usize = 16;
    #[inline(always)]
    unsafe fn block(&self, o: *mut S::Out, s: *const i8) {
        self.st.store(o, u16::MAX, self.sums(s, 16));
    }
    #[inline(always)]
    unsafe fn tail(&self, o: *mut S::Out, s: *const i8, n: usize) {
        self.st.store(o, (1u16 << n) - 1, self.sums(s, n));
    }
}

/// A 3x3 window of [`taps_3x3`]: `(base, (d, row weights, 128·Σw))`.
type Taps3x3 = (usize, (usize, [i32; 3], i32));

#[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx512vbmi")]
#[allow(clippy::too_many_arguments)]
unsafe fn corr_i8_3x3_vnni_add(
    out: *mut i32,
    ldo: usize,
    src: *const i8,
    lds: usize,
    rows: usize,
    len: usize,
    (base, taps): Taps3x3,
) {
    let tile = Window3x3::new(&AddI32, taps);
    corr_rows(&tile, out, ldo, src.add(base), lds, rows, len)
}

/// The fused-rescale `corr` of the AVX-512 kernel (see `DwKernel::corr_i8_scaled`): the 3x3 VNNI path
/// storing `sums·scale + bias` as f32; `false` (nothing written) for other windows or CPUs.
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
#[allow(clippy::too_many_arguments)]
unsafe fn corr_i8_scaled_avx512(
    out: *mut f32,
    ldo: usize,
    src: *const i8,
    lds: usize,
    rows: usize,
    len: usize,
    offs: &[usize],
    w: &[i32],
    scale: f32,
    bias: f32,
) -> bool {
    if offs.len() != 9 || !vnni_vbmi_detected() {
        return false;
    }
    let Some(taps) = taps_3x3(offs, w) else {
        return false;
    };
    corr_i8_3x3_vnni_scaled(out, ldo, src, lds, rows, len, taps, scale, bias);
    true
}

#[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx512vbmi")]
#[allow(clippy::too_many_arguments)]
unsafe fn corr_i8_3x3_vnni_scaled(
    out: *mut f32,
    ldo: usize,
    src: *const i8,
    lds: usize,
    rows: usize,
    len: usize,
    (base, taps): Taps3x3,
    scale: f32,
    bias: f32,
) {
    let st = ScaleF32 {
        scale: _mm512_set1_ps(scale),
        bias: _mm512_set1_ps(bias),
    };
    corr_rows(
        &Window3x3::new(&st, taps),
        out,
        ldo,
        src.add(base),
        lds,
        rows,
        len,
    )
}

dw_entry!(
    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    corr corr_f32_avx512<f32, f32, f32>(Avx512)
);

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
    if offs.len() == 9 && vnni_vbmi_detected() {
        if let Some(taps) = taps_3x3(offs, w) {
            return corr_i8_3x3_vnni_add(out, ldo, src, lds, rows, len, taps);
        }
    }
    let Taps { offs, w } = Taps::new(offs, w);
    let np = offs.len().div_ceil(2);
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
    let tile = Avx512(TapPairs { offs, pairs });
    corr_rows(&tile, out, ldo, src, lds, rows, len)
}

impl DotRowF32 for Avx512<()> {
    type Acc = __m512;
    #[inline(always)]
    unsafe fn load(&self, l: &[f32; 16]) -> __m512 {
        _mm512_loadu_ps(l.as_ptr())
    }
    #[inline(always)]
    unsafe fn row(&self, acc: &mut __m512, a: *const f32, s: *const f32, len: usize) {
        let mut k = 0;
        while k + 16 <= len {
            *acc = _mm512_add_ps(
                *acc,
                _mm512_mul_ps(_mm512_loadu_ps(a.add(k)), _mm512_loadu_ps(s.add(k))),
            );
            k += 16;
        }
        if k < len {
            let m = mask16(len - k);
            let p = _mm512_mul_ps(
                _mm512_maskz_loadu_ps(m, a.add(k)),
                _mm512_maskz_loadu_ps(m, s.add(k)),
            );
            *acc = _mm512_mask_add_ps(*acc, m, *acc, p);
        }
    }
    #[inline(always)]
    unsafe fn store(&self, acc: __m512, l: &mut [f32; 16]) {
        _mm512_storeu_ps(l.as_mut_ptr(), acc);
    }
}

impl DotRowI8 for Avx512<()> {
    #[inline(always)]
    unsafe fn row(&self, a: *const i8, s: *const i8, len: usize) -> i32 {
        let mut acc = _mm512_setzero_si512();
        let mut k = 0;
        while k < len {
            let m = if len - k >= 32 {
                u32::MAX
            } else {
                (1u32 << (len - k)) - 1
            };
            let av = _mm512_cvtepi8_epi16(_mm256_maskz_loadu_epi8(m, a.add(k)));
            let sv = _mm512_cvtepi8_epi16(_mm256_maskz_loadu_epi8(m, s.add(k)));
            acc = _mm512_add_epi32(acc, _mm512_madd_epi16(av, sv));
            k += 32;
        }
        _mm512_reduce_add_epi32(acc)
    }
}

dw_entry!(
    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    dot_f32 dot_f32_avx512(Avx512(()))
);

/// `vpdpbusd` steps per INT32 lane between flushes of [`dot_i8_vnni`]'s accumulators to i64: one step adds
/// four products of at most `255·128` in magnitude, so 16384 of them stay within i32.
const VNNI_DOT_FLUSH: usize = 16384;

/// Sum of the sixteen INT32 lanes of `v`, in i64 (the lanes may sum past i32).
#[inline(always)]
unsafe fn hsum_epi32_i64(v: __m512i) -> i64 {
    let lo = _mm512_cvtepi32_epi64(_mm512_castsi512_si256(v));
    let hi = _mm512_cvtepi32_epi64(_mm512_extracti64x4_epi64::<1>(v));
    _mm512_reduce_add_epi64(_mm512_add_epi64(lo, hi))
}

/// [`dot_i8_avx512`] for `T` taps at once on AVX-512 VNNI: per row, each block of 64 `a` bytes is loaded
/// once and one `vpdpbusd` per tap adds it against the tap's source bytes flipped to unsigned
/// (`s + 128`); the flip is undone from `Σ a` (one more `vpdpbusd` against ones) when the INT32 lanes are
/// flushed to i64, every [`VNNI_DOT_FLUSH`] steps and at the end. Exact, as the scalar loop (whose
/// per-row INT32 sums cannot overflow, `len ≤ MAX_ROW_I8`).
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
#[allow(clippy::too_many_arguments)]
unsafe fn dot_i8_vnni<const T: usize>(
    a: *const i8,
    lda: usize,
    src: *const i8,
    lds: usize,
    rows: usize,
    len: usize,
    offs: &[usize],
    sums: &mut [i64],
) {
    let mut off = [0usize; T];
    off.copy_from_slice(&offs[..T]);
    let (flip, ones) = (_mm512_set1_epi8(-128), _mm512_set1_epi8(1));
    let mut acc = [_mm512_setzero_si512(); T];
    let mut asum = _mm512_setzero_si512();
    let mut steps = 0;
    for r in 0..rows {
        let (ar, sr) = (a.add(r * lda), src.add(r * lds));
        let mut k = 0;
        while k < len {
            let m: u64 = if len - k >= 64 {
                u64::MAX
            } else {
                (1u64 << (len - k)) - 1
            };
            let av = _mm512_maskz_loadu_epi8(m, ar.add(k));
            asum = _mm512_dpbusd_epi32(asum, ones, av);
            for t in 0..T {
                let sv = _mm512_maskz_loadu_epi8(m, sr.add(off[t] + k));
                acc[t] = _mm512_dpbusd_epi32(acc[t], _mm512_xor_si512(sv, flip), av);
            }
            k += 64;
            steps += 1;
            if steps == VNNI_DOT_FLUSH {
                flush_vnni(&mut acc, &mut asum, sums);
                steps = 0;
            }
        }
    }
    flush_vnni(&mut acc, &mut asum, sums);
}

/// Adds the accumulators of [`dot_i8_vnni`] to `sums` (undoing the flip: `−128·Σ a` each) and zeroes them.
#[inline(always)]
unsafe fn flush_vnni<const T: usize>(acc: &mut [__m512i; T], asum: &mut __m512i, sums: &mut [i64]) {
    let corr = 128 * hsum_epi32_i64(*asum);
    for (s, v) in sums.iter_mut().zip(acc.iter_mut()) {
        *s += hsum_epi32_i64(*v) - corr;
        *v = _mm512_setzero_si512();
    }
    *asum = _mm512_setzero_si512();
}

fn vnni_detected() -> bool {
    is_x86_feature_detected!("avx512vnni")
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
    if !vnni_detected() {
        return dot_i8_rows(&Avx512(()), a, lda, src, lds, rows, len, offs, sums);
    }
    let nt = offs.len().min(sums.len());
    let mut t = 0;
    while t < nt {
        let (o, s) = (&offs[t..nt], &mut sums[t..nt]);
        t += match nt - t {
            9 => {
                dot_i8_vnni::<9>(a, lda, src, lds, rows, len, o, s);
                9
            }
            n if n >= 12 => {
                dot_i8_vnni::<12>(a, lda, src, lds, rows, len, o, s);
                12
            }
            n if n >= 4 => {
                dot_i8_vnni::<4>(a, lda, src, lds, rows, len, o, s);
                4
            }
            _ => {
                dot_i8_vnni::<1>(a, lda, src, lds, rows, len, o, s);
                1
            }
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nn::depthwise::kernels::{CorrI8, DotI8, SCALAR};

    fn rng(mut seed: u64) -> impl FnMut() -> u32 {
        move || {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (seed >> 33) as u32
        }
    }

    /// Extreme codes (-128, 127) mixed with random ones.
    fn codes(n: usize, next: &mut impl FnMut() -> u32) -> Vec<i8> {
        (0..n)
            .map(|i| match i % 7 {
                0 => -128,
                1 => 127,
                _ => next() as u8 as i8,
            })
            .collect()
    }

    /// One row block of `corr_i8` through `kern`, from `init`.
    #[allow(clippy::too_many_arguments)]
    fn corr(
        kern: CorrI8,
        init: &[i32],
        ldo: usize,
        src: &[i8],
        lds: usize,
        rows: usize,
        len: usize,
        offs: &[usize],
        w: &[i32],
    ) -> Vec<i32> {
        let mut out = init.to_vec();
        assert!((rows - 1) * ldo + len <= out.len());
        assert!((rows - 1) * lds + offs.iter().max().unwrap() + len <= src.len());
        // SAFETY: bounds asserted above; the caller checked the CPU features of `kern`.
        unsafe { kern(out.as_mut_ptr(), ldo, src.as_ptr(), lds, rows, len, offs, w) };
        out
    }

    /// One row block of `dot_i8` through `kern`.
    #[allow(clippy::too_many_arguments)]
    fn dot(
        kern: DotI8,
        a: &[i8],
        lda: usize,
        src: &[i8],
        lds: usize,
        rows: usize,
        len: usize,
        offs: &[usize],
    ) -> Vec<i64> {
        assert!((rows - 1) * lda + len <= a.len());
        assert!((rows - 1) * lds + offs.iter().max().unwrap() + len <= src.len());
        let mut sums: Vec<i64> = (0..offs.len()).map(|t| t as i64 * 1000 - 7).collect();
        // SAFETY: bounds asserted above; the caller checked the CPU features of `kern`.
        unsafe {
            kern(
                a.as_ptr(),
                lda,
                src.as_ptr(),
                lds,
                rows,
                len,
                offs,
                &mut sums,
            )
        };
        sums
    }

    /// The VNNI 3x3 path is what `corr_i8_avx512` takes for 3x3 taps at column step 1, and it gives the
    /// scalar loop's sums (every width around the 16-lane vector, extreme codes, wrapping sums, strided
    /// rows, a non-zero base); other tap patterns fall back.
    #[test]
    fn vnni_3x3_matches_scalar() {
        if !(avx512_detected() && vnni_vbmi_detected()) {
            eprintln!("skipped: this CPU has no AVX-512 VNNI + VBMI");
            return;
        }
        let mut next = rng(99);
        for len in [1, 2, 5, 14, 15, 16, 17, 30, 31, 32, 33, 47, 64] {
            let (rows, lds, d, base) = (3, len + 7, len + 9, 2);
            let src = codes((rows + 2) * d + rows * lds + len + 16, &mut next);
            let offs: Vec<usize> = (0..9).map(|t| base + (t / 3) * d + t % 3).collect();
            for wset in 0..3 {
                let w: Vec<i32> = (0..9)
                    .map(|t| match wset {
                        0 => -128,
                        1 => [127, -128][t % 2],
                        _ => (next() % 256) as i32 - 128,
                    })
                    .collect();
                assert!(taps_3x3(&offs, &w).is_some());
                let ldo = len + 3;
                // start from large sums so wrapping is exercised
                let init: Vec<i32> = (0..rows * ldo)
                    .map(|i| i32::MAX - 1000 + i as i32)
                    .collect();
                let run =
                    |k: CorrI8, init: &[i32]| corr(k, init, ldo, &src, lds, rows, len, &offs, &w);
                assert_eq!(
                    run(corr_i8_avx512, &init),
                    run(SCALAR.corr_i8, &init),
                    "len {len}, weights {wset}"
                );
                // the fused rescale: the scalar sums from zero, times the scale, plus the bias
                let (scale, bias) = (0.37f32, -1.25f32);
                let sums = run(SCALAR.corr_i8, &vec![0; rows * ldo]);
                let mut got = vec![f32::NAN; rows * ldo];
                // SAFETY: `got` is as long as the sums checked by `corr`.
                let done = unsafe {
                    corr_i8_scaled_avx512(
                        got.as_mut_ptr(),
                        ldo,
                        src.as_ptr(),
                        lds,
                        rows,
                        len,
                        &offs,
                        &w,
                        scale,
                        bias,
                    )
                };
                assert!(done, "the 3x3 window takes the fused path");
                for (i, (&g, &v)) in got.iter().zip(&sums).enumerate() {
                    if i % ldo < len {
                        assert_eq!(
                            g.to_bits(),
                            (v as f32 * scale + bias).to_bits(),
                            "len {len} at {i}"
                        );
                    } else {
                        assert!(g.is_nan(), "wrote past the row at {i}");
                    }
                }
            }
        }
        let offs: Vec<usize> = (0..9).map(|t| (t / 3) * 10 + 2 * (t % 3)).collect();
        assert!(
            taps_3x3(&offs, &[1; 9]).is_none(),
            "column step 2 is not this window"
        );
        let offs: Vec<usize> = (0..9).map(|t| (t / 3) * 10 + t % 3).collect();
        assert!(taps_3x3(&offs, &[300; 9]).is_none(), "weights beyond int8");
    }

    /// The VNNI weight-gradient dot gives the scalar loop's sums: every tap count the blocks split into
    /// (1..=14, 25), widths around the 64-byte vector, strided rows, extreme codes; and a plane long
    /// enough to pass the INT32 flush point at the largest products (`a = -128`, `s = 127`).
    #[test]
    fn vnni_dot_matches_scalar() {
        if !(avx512_detected() && vnni_detected()) {
            eprintln!("skipped: this CPU has no AVX-512 VNNI");
            return;
        }
        let mut next = rng(7);
        for nt in (1..=14).chain([25]) {
            for len in [1, 3, 15, 16, 17, 31, 33, 56, 63, 64, 65, 100, 129] {
                let (rows, lda, lds) = (3, len + 5, len + 11);
                let offs: Vec<usize> = (0..nt).map(|t| (t / 3) * lds + t % 3 + t / 5).collect();
                let a = codes((rows - 1) * lda + len, &mut next);
                let src = codes(
                    (rows - 1) * lds + offs.iter().max().unwrap() + len,
                    &mut next,
                );
                let run = |k: DotI8| dot(k, &a, lda, &src, lds, rows, len, &offs);
                assert_eq!(
                    run(dot_i8_avx512),
                    run(SCALAR.dot_i8),
                    "{nt} taps, len {len}"
                );
            }
        }
        let (len, rows) = (64, VNNI_DOT_FLUSH + 300);
        let a = vec![-128i8; rows * len];
        let src = vec![127i8; rows * len + 2];
        let run = |k: DotI8| dot(k, &a, len, &src, len, rows, len, &[0, 1, 2]);
        let want = run(SCALAR.dot_i8);
        assert_eq!(want[0], -7 - 128 * 127 * (rows * len) as i64);
        assert_eq!(run(dot_i8_avx512), want);
    }
}
