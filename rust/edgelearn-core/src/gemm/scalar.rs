//! The portable scalar kernel: the fallback on any CPU and the oracle the SIMD kernels are tested against
//! (together with the naive `gemm_reference`, which does not pack at all).

use super::Kernel;

pub struct Scalar;

pub static SCALAR: Scalar = Scalar;

const MR: usize = 4;
const NR: usize = 4;
const KU: usize = 4;

impl Kernel for Scalar {
    fn name(&self) -> &'static str {
        "scalar"
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
        // SAFETY: lengths per the `Kernel::tile` contract.
        let a = std::slice::from_raw_parts(a, kgroups * MR * KU);
        let b = std::slice::from_raw_parts(b, kgroups * NR * KU);
        let mut acc = [[0i32; NR]; MR];
        for g in 0..kgroups {
            let ag = &a[g * MR * KU..(g + 1) * MR * KU];
            let bg = &b[g * NR * KU..(g + 1) * NR * KU];
            for (r, accr) in acc.iter_mut().enumerate() {
                for (cc, v) in accr.iter_mut().enumerate() {
                    let mut s = 0i32;
                    for u in 0..KU {
                        s += ag[r * KU + u] as i32 * bg[cc * KU + u] as i32;
                    }
                    *v = v.wrapping_add(s);
                }
            }
        }
        for (r, accr) in acc.iter().enumerate() {
            for (cc, &v) in accr.iter().enumerate() {
                let p = c.add(r * ldc + cc);
                *p = if accumulate { (*p).wrapping_add(v) } else { v };
            }
        }
    }
}
