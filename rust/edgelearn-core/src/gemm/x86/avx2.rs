//! AVX2 kernel: exact s8·s8 with `vpmaddwd` on sign-extended values, 4 rows × 16 columns.
//!
//! `vpmaddubsw` would be faster but is u8·s8 and saturates its i16 pair sums (2·128·128 > 32767), so
//! -128 inputs would come out wrong. Instead products are i16·i16 (`vpmaddwd`, exact in i32). B keeps the
//! packed layout of the VNNI kernels (each 32-bit lane holds one column's 4 k values) and its bytes are
//! sign-extended in place to i16 in two halves: the odd bytes by an arithmetic shift right of the 16-bit
//! words, the even bytes by shift left then right (per k-group, shared by the 4 rows). A is packed
//! already widened ([`Avx2::pack_a_block`]): per k-group and row the i16 values `a0, a2, a1, a3`, so
//! a row's even pair and odd pair are two 32-bit broadcasts, with no shifts in the loop. `vpmaddwd` of
//! the odd halves gives `a1·b1 + a3·b3`, of the even halves `a0·b0 + a2·b2`, both exact in i32.
//!
//! Widening A at packing time took the three shifts per row and k-group out of the tile loop (12 of
//! the loop's 18 shifts); on AMD Zen 1 that raised `benches/gemm.py` 2048³ from about 32 to 37 GOP/s,
//! numpy FP32's rate on that CPU. Not measured on other AVX2 CPUs.

use std::arch::x86_64::*;

use crate::gemm::{Kernel, Operand};

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
    fn a_panel_bytes(&self, kgroups: usize) -> usize {
        kgroups * MR * KU * 2
    }
    /// The generic panels (4 rows × 4 bytes per k-group) are packed into the upper half of `out`, then
    /// widened forward in place to 4 rows × 4 i16 per k-group, each row's values reordered
    /// `a0, a2, a1, a3` (even pair, odd pair). Group `j` is read from `H + 16j` and written to `32j..32j+32`
    /// (`H`: the generic length), which ends before group `j + 1` starts; every group is loaded before
    /// its store.
    fn pack_a_block(&self, out: &mut [i8], a: &Operand, r0: usize, m: usize, k0: usize, kc: usize) {
        // the generic panels' length: half of this kernel's wider ones
        let half = m.div_ceil(MR) * self.a_panel_bytes(kc.div_ceil(KU)) / 2;
        let out = &mut out[..2 * half];
        crate::gemm::pack::pack_a(&mut out[half..], a, r0, m, k0, kc, MR, KU, false);
        // SAFETY: the kernel is only handed out on CPUs with AVX2 (its `detected()`); `out` holds
        // 2·half bytes.
        unsafe { widen_a(out, half) }
    }
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

/// Widens the generic A panels in `out[half..]` (16-byte k-groups, 4 rows × `a0 a1 a2 a3`) into `out`
/// (32-byte k-groups, 4 rows × i16 `a0 a2 a1 a3`).
///
/// Safety: the CPU has avx2; `out` holds `2·half` bytes and `half` is a multiple of 16.
#[target_feature(enable = "avx2")]
unsafe fn widen_a(out: &mut [i8], half: usize) {
    debug_assert!(half.is_multiple_of(16) && out.len() >= 2 * half);
    let order = _mm_setr_epi8(0, 2, 1, 3, 4, 6, 5, 7, 8, 10, 9, 11, 12, 14, 13, 15);
    let p = out.as_mut_ptr();
    for j in 0..half / 16 {
        let x = _mm_loadu_si128(p.add(half + 16 * j) as *const __m128i);
        let y = _mm256_cvtepi8_epi16(_mm_shuffle_epi8(x, order));
        _mm256_storeu_si256(p.add(32 * j) as *mut __m256i, y);
    }
}

/// Safety: the CPU has avx2; `a` holds `kgroups·4·8` bytes (widened, see [`widen_a`]), `b` `kgroups·16·4` bytes, and `c` 4 rows of
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
            let a_even = _mm256_set1_epi32(ap.add(2 * r).read_unaligned());
            let a_odd = _mm256_set1_epi32(ap.add(2 * r + 1).read_unaligned());
            for (v, s) in row.iter_mut().enumerate() {
                *s = _mm256_add_epi32(*s, _mm256_madd_epi16(a_odd, b_odd[v]));
                *s = _mm256_add_epi32(*s, _mm256_madd_epi16(a_even, b_even[v]));
            }
        }
        ap = ap.add(2 * MR);
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
