//! AVX-512 VNNI kernel: `vpdpbusd` on zmm registers, 16 rows × 16 columns per tile.
//!
//! `vpdpbusd` multiplies unsigned by signed bytes, so packed A holds `a + 128` (`a_shifted`) and the tile
//! subtracts `128 · colsum(B)` at the end. Sums may wrap in between; the final result is exact modulo 2³²,
//! and the driver bounds `K` so the true result fits in i32.
//!
//! Why 16 × 16: one zmm of B (16 columns × 4 k values) per k-group and one broadcast dword of A per row keep
//! 16 independent accumulators, enough to hide `vpdpbusd` latency at one per cycle (the Zen 4 rate for zmm),
//! with few loads per multiply. Sixteen rows divide every training shape, and 16 columns waste nothing on
//! the narrow outputs (N = 16, 32, 64) that convolution backward passes produce.

use std::arch::x86_64::*;

use crate::gemm::Kernel;

pub struct Avx512Vnni;

pub static AVX512VNNI: Avx512Vnni = Avx512Vnni;

const MR: usize = 16;
const NR: usize = 16;
const KU: usize = 4;

/// CPU features [`AVX512VNNI`] needs, as `is_x86_feature_detected!` spells them.
pub const FEATURES: &[&str] = &["avx2", "avx512f", "avx512bw", "avx512vnni"];

pub(crate) fn detected() -> bool {
    // AVX2 for the packing (every AVX-512 CPU has it)
    is_x86_feature_detected!("avx2")
        && is_x86_feature_detected!("avx512f")
        && is_x86_feature_detected!("avx512bw")
        && is_x86_feature_detected!("avx512vnni")
}

impl Kernel for Avx512Vnni {
    fn name(&self) -> &'static str {
        "avx512vnni"
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
    fn a_shifted(&self) -> bool {
        true
    }
    unsafe fn tile(
        &self,
        kgroups: usize,
        a: *const i8,
        b: *const i8,
        bsum: *const i32,
        c: *mut i32,
        ldc: usize,
        accumulate: bool,
    ) {
        // SAFETY: the `Kernel::tile` contract, and `detected()` held when this kernel was handed out.
        tile_16x16(kgroups, a, b, bsum, c, ldc, accumulate)
    }
}

/// Safety: the CPU has avx512f+avx512bw+avx512vnni; `a` holds `kgroups·16·4` shifted bytes, `b`
/// `kgroups·16·4` bytes, `bsum` 16 i32, and `c` 16 rows of 16 writable i32, `ldc` apart.
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
unsafe fn tile_16x16(
    kgroups: usize,
    a: *const i8,
    b: *const i8,
    bsum: *const i32,
    c: *mut i32,
    ldc: usize,
    accumulate: bool,
) {
    let mut acc = [_mm512_setzero_si512(); MR];
    let mut ap = a as *const i32;
    let mut bp = b as *const __m512i;
    for _ in 0..kgroups {
        let bv = _mm512_loadu_si512(bp);
        for (r, x) in acc.iter_mut().enumerate() {
            let av = _mm512_set1_epi32(ap.add(r).read_unaligned());
            *x = _mm512_dpbusd_epi32(*x, av, bv);
        }
        ap = ap.add(MR);
        bp = bp.add(1);
    }
    // Undo the +128 on A: Σ(a+128)·b = Σa·b + 128·Σb.
    let corr = _mm512_slli_epi32::<7>(_mm512_loadu_si512(bsum as *const __m512i));
    for (r, x) in acc.iter().enumerate() {
        let dst = c.add(r * ldc) as *mut __m512i;
        let mut v = _mm512_sub_epi32(*x, corr);
        if accumulate {
            v = _mm512_add_epi32(v, _mm512_loadu_si512(dst));
        }
        _mm512_storeu_si512(dst, v);
    }
}
