//! Armv8.6 INT8 matrix-multiply kernel (`smmla`, FEAT_I8MM: Neoverse V1/N2, Cortex-A510/A710 and later).
//!
//! `smmla acc.4s, a.16b, b.16b` treats `a` as 2 rows × 8 k and `b` as 2 columns × 8 k and adds the 2×2
//! product `[r0c0, r0c1, r1c0, r1c1]` to `acc`. With `ku = 8`, a 16-byte load of packed A is exactly two
//! rows and one of packed B exactly two columns, so the packing needs no special case. An 8×8 tile keeps
//! 16 accumulators (4 row pairs × 4 column pairs) plus 4 A and 4 B vectors in registers; the 2×2 blocks
//! are interleaved back into rows with `zip1`/`zip2` on 64-bit lanes at the end.
//!
//! The intrinsic `vmmlaq_s32` is unstable, hence `asm!` inside a function compiled with the `i8mm` target
//! feature. `smmla` is exact: eight i8·i8 products sum to at most 131072 in magnitude.

use std::arch::aarch64::*;
use std::arch::asm;

use crate::gemm::Kernel;

pub struct I8mm;

pub static I8MM: I8mm = I8mm;

const MR: usize = 8;
const NR: usize = 8;
const KU: usize = 8;

impl Kernel for I8mm {
    fn name(&self) -> &'static str {
        "i8mm"
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
        // SAFETY: this kernel is only handed out when `i8mm` was detected; the caller upholds the
        // `Kernel::tile` contract, which is exactly `tile_8x8`'s.
        unsafe { tile_8x8(kgroups, a, b, c, ldc, accumulate) }
    }
}

/// `acc += a (2×8) · b (2×8)ᵀ` as a 2×2 block (`smmla`).
macro_rules! smmla {
    ($acc:expr, $a:expr, $b:expr) => {
        asm!(
            "smmla {acc:v}.4s, {a:v}.16b, {b:v}.16b",
            acc = inout(vreg) $acc,
            a = in(vreg) $a,
            b = in(vreg) $b,
            options(pure, nomem, nostack, preserves_flags),
        )
    };
}

/// Safety: the CPU has `i8mm`; `a` holds `kgroups·8·8` bytes, `b` holds `kgroups·8·8` bytes, and `c` has
/// 8 rows of 8 writable i32 spaced `ldc` apart (the `Kernel::tile` contract for this shape).
#[target_feature(enable = "neon,i8mm")]
unsafe fn tile_8x8(
    kgroups: usize,
    a: *const i8,
    b: *const i8,
    c: *mut i32,
    ldc: usize,
    accumulate: bool,
) {
    // SAFETY: every load stays inside the panels described above, every store inside the tile; `smmla` is
    // available by this function's precondition.
    unsafe {
        let zero = vdupq_n_s32(0);
        // acc[i][j] holds rows 2i, 2i+1 × columns 2j, 2j+1.
        let mut acc = [[zero; NR / 2]; MR / 2];
        let (mut pa, mut pb) = (a, b);
        for _ in 0..kgroups {
            let av = [
                vld1q_s8(pa),
                vld1q_s8(pa.add(16)),
                vld1q_s8(pa.add(32)),
                vld1q_s8(pa.add(48)),
            ];
            let bv = [
                vld1q_s8(pb),
                vld1q_s8(pb.add(16)),
                vld1q_s8(pb.add(32)),
                vld1q_s8(pb.add(48)),
            ];
            smmla!(acc[0][0], av[0], bv[0]);
            smmla!(acc[0][1], av[0], bv[1]);
            smmla!(acc[0][2], av[0], bv[2]);
            smmla!(acc[0][3], av[0], bv[3]);
            smmla!(acc[1][0], av[1], bv[0]);
            smmla!(acc[1][1], av[1], bv[1]);
            smmla!(acc[1][2], av[1], bv[2]);
            smmla!(acc[1][3], av[1], bv[3]);
            smmla!(acc[2][0], av[2], bv[0]);
            smmla!(acc[2][1], av[2], bv[1]);
            smmla!(acc[2][2], av[2], bv[2]);
            smmla!(acc[2][3], av[2], bv[3]);
            smmla!(acc[3][0], av[3], bv[0]);
            smmla!(acc[3][1], av[3], bv[1]);
            smmla!(acc[3][2], av[3], bv[2]);
            smmla!(acc[3][3], av[3], bv[3]);
            pa = pa.add(MR * KU);
            pb = pb.add(NR * KU);
        }
        for (i, pair) in acc.iter().enumerate() {
            let top = c.add(2 * i * ldc);
            let bottom = top.add(ldc);
            for h in 0..NR / 4 {
                // Two 2×2 blocks side by side → 4 columns of the top row and 4 of the bottom row.
                let l = vreinterpretq_s64_s32(pair[2 * h]);
                let r = vreinterpretq_s64_s32(pair[2 * h + 1]);
                let mut t = vreinterpretq_s32_s64(vzip1q_s64(l, r));
                let mut u = vreinterpretq_s32_s64(vzip2q_s64(l, r));
                let (pt, pu) = (top.add(4 * h), bottom.add(4 * h));
                if accumulate {
                    t = vaddq_s32(t, vld1q_s32(pt));
                    u = vaddq_s32(u, vld1q_s32(pu));
                }
                vst1q_s32(pt, t);
                vst1q_s32(pu, u);
            }
        }
    }
}
