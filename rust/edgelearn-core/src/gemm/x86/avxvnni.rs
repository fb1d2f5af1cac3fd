//! AVX-VNNI kernel (Alder Lake and later, Zen 5): VEX-encoded `vpdpbusd` on ymm, 6 rows × 16 columns.
//!
//! The same +128 trick as the AVX-512 VNNI kernel: packed A holds `a + 128` (`a_shifted`), and the tile
//! subtracts `128 · colsum(B)`. With 16 ymm registers, 6 × 2 accumulators plus two B vectors and one
//! broadcast fit without spilling, and 12 independent sums cover `vpdpbusd`'s latency at two per cycle.

use std::arch::x86_64::*;

use crate::gemm::Kernel;

pub struct AvxVnni;

pub static AVXVNNI: AvxVnni = AvxVnni;

const MR: usize = 6;
const NR: usize = 16;
const KU: usize = 4;
const NV: usize = NR / 8;

/// CPU features [`AVXVNNI`] needs, as `is_x86_feature_detected!` spells them.
pub const FEATURES: &[&str] = &["avx2", "avxvnni"];

pub(crate) fn detected() -> bool {
    is_x86_feature_detected!("avx2") && is_x86_feature_detected!("avxvnni")
}

impl Kernel for AvxVnni {
    fn name(&self) -> &'static str {
        "avxvnni"
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
        tile_6x16(kgroups, a, b, bsum, c, ldc, accumulate)
    }
}

/// Safety: the CPU has avx2+avxvnni; `a` holds `kgroups·6·4` shifted bytes, `b` `kgroups·16·4` bytes,
/// `bsum` 16 i32, and `c` 6 rows of 16 writable i32, `ldc` apart.
#[target_feature(enable = "avx2,avxvnni")]
unsafe fn tile_6x16(
    kgroups: usize,
    a: *const i8,
    b: *const i8,
    bsum: *const i32,
    c: *mut i32,
    ldc: usize,
    accumulate: bool,
) {
    tile_body(
        |acc, a, b| _mm256_dpbusd_avx_epi32(acc, a, b),
        kgroups,
        a,
        b,
        bsum,
        c,
        ldc,
        accumulate,
    )
}

/// The tile with `dpbusd` passed in, so tests can run the same code with the EVEX (AVX-512 VL) encoding on
/// CPUs that have AVX-512 VNNI but not AVX-VNNI.
///
/// Safety: as [`tile_6x16`], and the caller has the features `dpbusd` and AVX2 need (it is inlined into a
/// `#[target_feature]` function).
#[allow(clippy::too_many_arguments)]
#[inline(always)]
unsafe fn tile_body(
    dpbusd: impl Fn(__m256i, __m256i, __m256i) -> __m256i,
    kgroups: usize,
    a: *const i8,
    b: *const i8,
    bsum: *const i32,
    c: *mut i32,
    ldc: usize,
    accumulate: bool,
) {
    let mut acc = [[_mm256_setzero_si256(); NV]; MR];
    let mut ap = a as *const i32;
    let mut bp = b as *const __m256i;
    for _ in 0..kgroups {
        let mut bv = [_mm256_setzero_si256(); NV];
        for (v, x) in bv.iter_mut().enumerate() {
            *x = _mm256_loadu_si256(bp.add(v));
        }
        for (r, row) in acc.iter_mut().enumerate() {
            let av = _mm256_set1_epi32(ap.add(r).read_unaligned());
            for (x, &bw) in row.iter_mut().zip(&bv) {
                *x = dpbusd(*x, av, bw);
            }
        }
        ap = ap.add(MR);
        bp = bp.add(NV);
    }
    // Undo the +128 on A: Σ(a+128)·b = Σa·b + 128·Σb.
    let mut corr = [_mm256_setzero_si256(); NV];
    for (v, x) in corr.iter_mut().enumerate() {
        *x = _mm256_slli_epi32::<7>(_mm256_loadu_si256((bsum as *const __m256i).add(v)));
    }
    for (r, row) in acc.iter().enumerate() {
        for (v, (x, &k)) in row.iter().zip(&corr).enumerate() {
            let dst = (c.add(r * ldc) as *mut __m256i).add(v);
            let mut y = _mm256_sub_epi32(*x, k);
            if accumulate {
                y = _mm256_add_epi32(y, _mm256_loadu_si256(dst));
            }
            _mm256_storeu_si256(dst, y);
        }
    }
}

#[cfg(test)]
mod tests {
    //! This CPU may lack AVX-VNNI; the kernel's code still runs here with `vpdpbusd` in its EVEX form,
    //! which computes the same thing, whenever AVX-512 VNNI + VL are present.
    use super::*;
    use crate::gemm::{gemm_i8_with, gemm_reference, Blocking, MatRef};

    struct AvxVnniOnEvex;

    /// Safety: as `tile_6x16`, with avx2+avx512f+avx512vl+avx512vnni instead of avxvnni.
    #[target_feature(enable = "avx2,avx512f,avx512vl,avx512vnni")]
    unsafe fn tile_evex(
        kgroups: usize,
        a: *const i8,
        b: *const i8,
        bsum: *const i32,
        c: *mut i32,
        ldc: usize,
        accumulate: bool,
    ) {
        tile_body(
            |acc, a, b| _mm256_dpbusd_epi32(acc, a, b),
            kgroups,
            a,
            b,
            bsum,
            c,
            ldc,
            accumulate,
        )
    }

    impl Kernel for AvxVnniOnEvex {
        fn name(&self) -> &'static str {
            "avxvnni-on-evex"
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
            tile_evex(kgroups, a, b, bsum, c, ldc, accumulate)
        }
    }

    #[test]
    fn avxvnni_tile_code_matches_reference() {
        let have = ["avx2", "avx512f", "avx512vl", "avx512vnni"];
        if !(is_x86_feature_detected!("avx2")
            && is_x86_feature_detected!("avx512f")
            && is_x86_feature_detected!("avx512vl")
            && is_x86_feature_detected!("avx512vnni"))
        {
            eprintln!("skipped: needs {}", have.join("+"));
            return;
        }
        let mut x = 12345u32;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            (x >> 8) as i8
        };
        for &(m, k, n) in &[
            (1, 1, 1),
            (6, 4, 16),
            (7, 27, 17),
            (13, 130, 33),
            (64, 300, 48),
        ] {
            let mut a: Vec<i8> = (0..m * k).map(|_| next()).collect();
            let b: Vec<i8> = (0..k * n).map(|_| next()).collect();
            a[0] = -128;
            for blk in [
                Blocking::default(),
                Blocking {
                    mc: 12,
                    nc: 16,
                    kc: 8,
                },
            ] {
                let av = MatRef::row_major(&a, m, k).unwrap();
                let bv = MatRef::row_major(&b, k, n).unwrap();
                let want = gemm_reference(&av, &bv).unwrap();
                let mut got = vec![0i32; m * n];
                gemm_i8_with(&AvxVnniOnEvex, blk, &av, &bv, &mut got).unwrap();
                assert!(
                    got.iter().zip(&want).all(|(&g, &w)| g as i64 == w),
                    "m={m} k={k} n={n} {blk:?}"
                );
            }
        }
    }
}
