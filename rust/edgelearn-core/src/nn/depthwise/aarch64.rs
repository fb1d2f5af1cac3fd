//! NEON builds of the grouped-convolution inner loops ([`super::kernels`] states what each computes), and
//! a dotprod variant whose INT8 weight-gradient dot uses `sdot` (16 products per instruction; via `asm!`,
//! the intrinsic being unstable). FP32 loops multiply then add (`fmul` + `fadd`, never `fmla`) in the
//! scalar reference's order, so results are bit-identical to it; INT8 sums are exact INT32.

use std::arch::aarch64::*;
use std::arch::asm;

use super::kernels::{
    dot_f32_row_tail, dot_i8_row_tail, dw_entry, CorrTile, DotRowF32, DotRowI8, DwKernel, Taps,
};

pub static NEON: DwKernel = DwKernel {
    name: "neon",
    corr_f32: corr_f32_neon,
    corr_i8: corr_i8_neon,
    corr_i8_scaled: None,
    dot_f32: dot_f32_neon,
    dot_i8: dot_i8_neon,
};

pub static DOTPROD: DwKernel = DwKernel {
    name: "dotprod",
    corr_f32: corr_f32_neon,
    corr_i8: corr_i8_neon,
    corr_i8_scaled: None,
    dot_f32: dot_f32_neon,
    dot_i8: dot_i8_dotprod,
};

/// The NEON tiles: 8 outputs of `corr` per block, 16 canonical lanes of `dot_f32`, 16 bytes per `dot_i8`
/// step (`vmull` + `vpadal`, or `sdot` on [`DotprodDot`]); tails through the scalar reference.
struct Neon<T>(T);

impl CorrTile for Neon<Taps<'_, f32>> {
    type Out = f32;
    type Src = f32;
    const W: usize = 8;
    #[inline(always)]
    unsafe fn block(&self, o: *mut f32, s: *const f32) {
        let mut a0 = vld1q_f32(o);
        let mut a1 = vld1q_f32(o.add(4));
        for (&off, &w) in self.0.offs.iter().zip(self.0.w) {
            let wv = vdupq_n_f32(w);
            let p = s.add(off);
            a0 = vaddq_f32(a0, vmulq_f32(wv, vld1q_f32(p)));
            a1 = vaddq_f32(a1, vmulq_f32(wv, vld1q_f32(p.add(4))));
        }
        vst1q_f32(o, a0);
        vst1q_f32(o.add(4), a1);
    }
    #[inline(always)]
    unsafe fn tail(&self, o: *mut f32, s: *const f32, n: usize) {
        self.0.tail(o, s, n)
    }
}

impl CorrTile for Neon<Taps<'_, i32>> {
    type Out = i32;
    type Src = i8;
    const W: usize = 8;
    #[inline(always)]
    unsafe fn block(&self, o: *mut i32, s: *const i8) {
        let mut a0 = vld1q_s32(o);
        let mut a1 = vld1q_s32(o.add(4));
        for (&off, &w) in self.0.offs.iter().zip(self.0.w) {
            let wv = vdup_n_s16(w as i16);
            let x = vmovl_s8(vld1_s8(s.add(off)));
            a0 = vmlal_s16(a0, vget_low_s16(x), wv);
            a1 = vmlal_s16(a1, vget_high_s16(x), wv);
        }
        vst1q_s32(o, a0);
        vst1q_s32(o.add(4), a1);
    }
    #[inline(always)]
    unsafe fn tail(&self, o: *mut i32, s: *const i8, n: usize) {
        self.0.tail(o, s, n)
    }
}

#[inline(always)]
unsafe fn load_lanes(l: &[f32; 16]) -> [float32x4_t; 4] {
    let p = l.as_ptr();
    [
        vld1q_f32(p),
        vld1q_f32(p.add(4)),
        vld1q_f32(p.add(8)),
        vld1q_f32(p.add(12)),
    ]
}

impl DotRowF32 for Neon<()> {
    type Acc = [float32x4_t; 4];
    #[inline(always)]
    unsafe fn load(&self, l: &[f32; 16]) -> Self::Acc {
        load_lanes(l)
    }
    #[inline(always)]
    unsafe fn row(&self, acc: &mut Self::Acc, a: *const f32, s: *const f32, len: usize) {
        let mut k = 0;
        while k + 16 <= len {
            for (q, v) in acc.iter_mut().enumerate() {
                let i = k + 4 * q;
                *v = vaddq_f32(*v, vmulq_f32(vld1q_f32(a.add(i)), vld1q_f32(s.add(i))));
            }
            k += 16;
        }
        if k < len {
            let mut l = [0f32; 16];
            self.store(*acc, &mut l);
            dot_f32_row_tail(a, s, k, len, &mut l);
            *acc = load_lanes(&l);
        }
    }
    #[inline(always)]
    unsafe fn store(&self, acc: Self::Acc, l: &mut [f32; 16]) {
        for (q, v) in acc.iter().enumerate() {
            vst1q_f32(l.as_mut_ptr().add(4 * q), *v);
        }
    }
}

impl DotRowI8 for Neon<()> {
    #[inline(always)]
    unsafe fn row(&self, a: *const i8, s: *const i8, len: usize) -> i32 {
        let mut acc = vdupq_n_s32(0);
        let mut k = 0;
        while k + 16 <= len {
            let (av, sv) = (vld1q_s8(a.add(k)), vld1q_s8(s.add(k)));
            acc = vpadalq_s16(acc, vmull_s8(vget_low_s8(av), vget_low_s8(sv)));
            acc = vpadalq_s16(acc, vmull_high_s8(av, sv));
            k += 16;
        }
        vaddvq_s32(acc) + dot_i8_row_tail(a, s, k, len)
    }
}

/// The dotprod `dot_i8` row: one `sdot` per 16 bytes.
struct DotprodDot;

impl DotRowI8 for DotprodDot {
    #[inline(always)]
    unsafe fn row(&self, a: *const i8, s: *const i8, len: usize) -> i32 {
        let mut acc = vdupq_n_s32(0);
        let mut k = 0;
        while k + 16 <= len {
            let (av, sv) = (vld1q_s8(a.add(k)), vld1q_s8(s.add(k)));
            // SAFETY: register-only instruction of FEAT_DotProd, enabled on the calling function.
            asm!(
                "sdot {acc:v}.4s, {a:v}.16b, {b:v}.16b",
                acc = inout(vreg) acc,
                a = in(vreg) av,
                b = in(vreg) sv,
                options(pure, nomem, nostack, preserves_flags),
            );
            k += 16;
        }
        vaddvq_s32(acc) + dot_i8_row_tail(a, s, k, len)
    }
}

dw_entry!(
    #[target_feature(enable = "neon")]
    corr corr_f32_neon<f32, f32, f32>(Neon)
);

dw_entry!(
    #[target_feature(enable = "neon")]
    corr corr_i8_neon<i32, i8, i32>(Neon)
);

dw_entry!(
    #[target_feature(enable = "neon")]
    dot_f32 dot_f32_neon(Neon(()))
);

dw_entry!(
    #[target_feature(enable = "neon")]
    dot_i8 dot_i8_neon(Neon(()))
);

dw_entry!(
    #[target_feature(enable = "neon,dotprod")]
    dot_i8 dot_i8_dotprod(DotprodDot)
);
