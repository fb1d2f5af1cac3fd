//! Baseline NEON kernel (every AArch64 CPU): `smull`/`smull2` into i16, then `sadalp` into i32.
//!
//! A 4×4 tile with `ku = 16`: each k-group gives every row and every column one 16-byte vector, and each
//! `(row, column)` pair owns an `int32x4` accumulator that is reduced horizontally once at the end.
//!
//! Exactness: a single i8·i8 product fits i16 (|−128·−128| = 16384), but the sum of two does not
//! (−128·−128 + −128·−128 = 32768), so `smlal2` on top of `smull` is never used. Each i16 product vector
//! goes straight into `sadalp`, which adds adjacent pairs (at most 32768) into i32 lanes.

use std::arch::aarch64::*;

use crate::gemm::Kernel;

pub struct Neon;

pub static NEON: Neon = Neon;

const MR: usize = 4;
const NR: usize = 4;
const KU: usize = 16;

impl Kernel for Neon {
    fn name(&self) -> &'static str {
        "neon"
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
        // SAFETY: the caller upholds `Kernel::tile`'s contract, which is exactly `tile_4x4`'s.
        unsafe { tile_4x4(kgroups, a, b, c, ldc, accumulate) }
    }
}

/// Adds the 16 products of `a` and `b` to `acc` in pairs (exact for all i8 inputs).
#[inline(always)]
unsafe fn dot16(acc: int32x4_t, a: int8x16_t, b: int8x16_t) -> int32x4_t {
    // SAFETY: NEON is part of the aarch64 baseline; these intrinsics touch registers only.
    unsafe {
        let lo = vmull_s8(vget_low_s8(a), vget_low_s8(b));
        let hi = vmull_high_s8(a, b);
        vpadalq_s16(vpadalq_s16(acc, lo), hi)
    }
}

/// Horizontal sums of four accumulators: lane `j` of the result is the sum of the lanes of `v[j]`.
#[inline(always)]
unsafe fn reduce4(v: &[int32x4_t; 4]) -> int32x4_t {
    // SAFETY: register-only NEON arithmetic.
    unsafe { vpaddq_s32(vpaddq_s32(v[0], v[1]), vpaddq_s32(v[2], v[3])) }
}

/// Safety: `a` holds `kgroups·4·16` bytes, `b` holds `kgroups·4·16` bytes, and `c` has 4 rows of 4
/// writable i32 spaced `ldc` apart (the `Kernel::tile` contract for this shape).
#[target_feature(enable = "neon")]
unsafe fn tile_4x4(
    kgroups: usize,
    a: *const i8,
    b: *const i8,
    c: *mut i32,
    ldc: usize,
    accumulate: bool,
) {
    // SAFETY: every load stays inside the panels described above, every store inside the tile.
    unsafe {
        let zero = vdupq_n_s32(0);
        let mut acc = [[zero; NR]; MR];
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
            for r in 0..MR {
                for j in 0..NR {
                    acc[r][j] = dot16(acc[r][j], av[r], bv[j]);
                }
            }
            pa = pa.add(MR * KU);
            pb = pb.add(NR * KU);
        }
        for (r, row) in acc.iter().enumerate() {
            let mut sums = reduce4(row);
            let p = c.add(r * ldc);
            if accumulate {
                sums = vaddq_s32(sums, vld1q_s32(p));
            }
            vst1q_s32(p, sums);
        }
    }
}
