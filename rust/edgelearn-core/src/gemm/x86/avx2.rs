//! AVX2 kernel: exact s8·s8 with `vpmaddwd` on sign-extended bytes, 4 rows × 16 columns.
//!
//! `vpmaddubsw` would be faster but is u8·s8 and saturates its i16 pair sums (2·128·128 > 32767), so
//! -128 inputs would come out wrong. Instead each 32-bit lane holds one column's 4 k values (the same
//! layout as `vpdpbusd`), and its bytes are sign-extended in place to i16 in two halves: the odd bytes by
//! an arithmetic shift right of the 16-bit words, the even bytes by shift left then right. `vpmaddwd` of
//! the odd halves gives `a1·b1 + a3·b3`, of the even halves `a0·b0 + a2·b2`, both exact in i32.

use std::arch::x86_64::*;

use crate::gemm::Kernel;

pub struct Avx2;

pub static AVX2: Avx2 = Avx2;

const MR: usize = 4;
const NR: usize = 16;
const KU: usize = 4;
const NV: usize = NR / 8;

/// CPU features [`AVX2`] needs, as `is_x86_feature_detected!` spells them.
pub const FEATURES: &[&str] = &["avx2"];

pub(crate) fn detected() -> bool {
    is_x86_feature_detected!("avx2")
}

impl Kernel for Avx2 {
    fn name(&self) -> &'static str {
        "avx2"
    }
    fn mr(&self) -> usize {
        MR
    }
    fn nr(&self) -> usize {
        NR
    }
    fn ku(&self) -> usize {
        KU
    }
    super::pack_b_block_4x16!();
    unsafe fn tile(
        &self,
        kgroups: usize,
        a: *const i8,
        b: *const i8,
        _bsum: *const i32,
        c: *mut i32,
        ldc: usize,
        accumulate: bool,
    ) {
        // SAFETY: the `Kernel::tile` contract, and `detected()` held when this kernel was handed out.
        tile_4x16(kgroups, a, b, c, ldc, accumulate)
    }
}

/// Safety: the CPU has avx2; `a` holds `kgroups·4·4` bytes, `b` `kgroups·16·4` bytes, and `c` 4 rows of
/// 16 writable i32, `ldc` apart.
#[target_feature(enable = "avx2")]
unsafe fn tile_4x16(
    kgroups: usize,
    a: *const i8,
    b: *const i8,
    c: *mut i32,
    ldc: usize,
    accumulate: bool,
) {
    let mut acc = [[_mm256_setzero_si256(); NV]; MR];
    let mut ap = a as *const i32;
    let mut bp = b as *const __m256i;
    for _ in 0..kgroups {
        let mut b_odd = [_mm256_setzero_si256(); NV];
        let mut b_even = [_mm256_setzero_si256(); NV];
        for v in 0..NV {
            let x = _mm256_loadu_si256(bp.add(v));
            b_odd[v] = _mm256_srai_epi16::<8>(x);
            b_even[v] = _mm256_srai_epi16::<8>(_mm256_slli_epi16::<8>(x));
        }
        for (r, row) in acc.iter_mut().enumerate() {
            let x = _mm256_set1_epi32(ap.add(r).read_unaligned());
            let a_odd = _mm256_srai_epi16::<8>(x);
            let a_even = _mm256_srai_epi16::<8>(_mm256_slli_epi16::<8>(x));
            for (v, s) in row.iter_mut().enumerate() {
                *s = _mm256_add_epi32(*s, _mm256_madd_epi16(a_odd, b_odd[v]));
                *s = _mm256_add_epi32(*s, _mm256_madd_epi16(a_even, b_even[v]));
            }
        }
        ap = ap.add(MR);
        bp = bp.add(NV);
    }
    for (r, row) in acc.iter().enumerate() {
        for (v, x) in row.iter().enumerate() {
            let dst = (c.add(r * ldc) as *mut __m256i).add(v);
            let y = if accumulate {
                _mm256_add_epi32(*x, _mm256_loadu_si256(dst))
            } else {
                *x
            };
            _mm256_storeu_si256(dst, y);
        }
    }
}
