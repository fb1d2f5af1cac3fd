//! Armv8.2 dot-product kernel (`sdot`, FEAT_DotProd: Cortex-A55/A76, Neoverse N1 and later).
//!
//! An 8×12 tile with `ku = 4`. Per k-group, packed A is 2 vectors (rows 0–3 and 4–7, 4 k each) and
//! packed B is 3 vectors (columns 0–3, 4–7, 8–11). The by-element form
//! `sdot acc.4s, b.16b, a.4b[r]` adds row `r`'s 4 k-values dotted with each of 4 columns, so the 24
//! accumulators are already row-major `int32x4` pieces of C (no transpose at the end). 24 accumulators,
//! 2 A and 3 B vectors use 29 of the 32 vector registers.
//!
//! `vdotq_s32`/`vdotq_laneq_s32` are still unstable, hence `asm!` inside a function compiled with the
//! `dotprod` target feature (never a crate-wide `target-cpu`). `sdot` is exact: four i8·i8 products sum
//! to at most 65536 in magnitude before joining the wrapping i32 accumulator.

use std::arch::aarch64::*;
use std::arch::asm;

use crate::gemm::Kernel;

pub struct DotProd;

pub static DOTPROD: DotProd = DotProd;

const MR: usize = 8;
const NR: usize = 12;
const KU: usize = 4;

impl Kernel for DotProd {
    fn name(&self) -> &'static str {
        "dotprod"
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
        // SAFETY: this kernel is only handed out when `dotprod` was detected; the caller upholds the
        // `Kernel::tile` contract, which is exactly `tile_8x12`'s.
        unsafe { tile_8x12(kgroups, a, b, c, ldc, accumulate) }
    }
}

/// `acc += b · a.4b[lane]` for one accumulator (`sdot`, by element).
macro_rules! sdot_lane {
    ($acc:expr, $b:expr, $a:expr, $lane:literal) => {
        asm!(
            concat!("sdot {acc:v}.4s, {b:v}.16b, {a:v}.4b[", stringify!($lane), "]"),
            acc = inout(vreg) $acc,
            b = in(vreg) $b,
            a = in(vreg) $a,
            options(pure, nomem, nostack, preserves_flags),
        )
    };
}

/// One row of the tile: row `lane` of the A vector against the three B vectors.
macro_rules! sdot_row {
    ($acc:expr, $b:expr, $a:expr, $lane:literal) => {
        sdot_lane!($acc[0], $b[0], $a, $lane);
        sdot_lane!($acc[1], $b[1], $a, $lane);
        sdot_lane!($acc[2], $b[2], $a, $lane);
    };
}

/// Safety: the CPU has `dotprod`; `a` holds `kgroups·8·4` bytes, `b` holds `kgroups·12·4` bytes, and `c` has
/// 8 rows of 12 writable i32 spaced `ldc` apart (the `Kernel::tile` contract for this shape).
#[target_feature(enable = "neon,dotprod")]
unsafe fn tile_8x12(
    kgroups: usize,
    a: *const i8,
    b: *const i8,
    c: *mut i32,
    ldc: usize,
    accumulate: bool,
) {
    // SAFETY: every load stays inside the panels described above, every store inside the tile; `sdot` is
    // available by this function's precondition.
    unsafe {
        let zero = vdupq_n_s32(0);
        let mut acc = [[zero; 3]; MR];
        let (mut pa, mut pb) = (a, b);
        for _ in 0..kgroups {
            let a0 = vld1q_s8(pa);
            let a1 = vld1q_s8(pa.add(16));
            let bv = [vld1q_s8(pb), vld1q_s8(pb.add(16)), vld1q_s8(pb.add(32))];
            sdot_row!(acc[0], bv, a0, 0);
            sdot_row!(acc[1], bv, a0, 1);
            sdot_row!(acc[2], bv, a0, 2);
            sdot_row!(acc[3], bv, a0, 3);
            sdot_row!(acc[4], bv, a1, 0);
            sdot_row!(acc[5], bv, a1, 1);
            sdot_row!(acc[6], bv, a1, 2);
            sdot_row!(acc[7], bv, a1, 3);
            pa = pa.add(MR * KU);
            pb = pb.add(NR * KU);
        }
        for (r, row) in acc.iter().enumerate() {
            let p = c.add(r * ldc);
            for (j, &v) in row.iter().enumerate() {
                let q = p.add(4 * j);
                let v = if accumulate {
                    vaddq_s32(v, vld1q_s32(q))
                } else {
                    v
                };
                vst1q_s32(q, v);
            }
        }
    }
}
