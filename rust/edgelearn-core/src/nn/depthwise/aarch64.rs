//! NEON builds of the grouped-convolution inner loops ([`super::kernels`] states what each computes), and
//! a dotprod variant whose INT8 weight-gradient dot uses `sdot` (16 products per instruction; via `asm!`,
//! the intrinsic being unstable). FP32 loops multiply then add (`fmul` + `fadd`, never `fmla`) in the
//! scalar reference's order, so results are bit-identical to it; INT8 sums are exact INT32.

use std::arch::aarch64::*;
use std::arch::asm;

use super::kernels::{dot_f32_row_tail, DwKernel};

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

#[target_feature(enable = "neon")]
unsafe fn corr_f32_neon(
    out: *mut f32,
    ldo: usize,
    src: *const f32,
    lds: usize,
    rows: usize,
    len: usize,
    offs: &[usize],
    w: &[f32],
) {
    let nt = offs.len().min(w.len());
    for r in 0..rows {
        let o = out.add(r * ldo);
        let s = src.add(r * lds);
        let mut k = 0;
        while k + 8 <= len {
            let mut a0 = vld1q_f32(o.add(k));
            let mut a1 = vld1q_f32(o.add(k + 4));
            for t in 0..nt {
                let wv = vdupq_n_f32(*w.get_unchecked(t));
                let p = s.add(*offs.get_unchecked(t) + k);
                a0 = vaddq_f32(a0, vmulq_f32(wv, vld1q_f32(p)));
                a1 = vaddq_f32(a1, vmulq_f32(wv, vld1q_f32(p.add(4))));
            }
            vst1q_f32(o.add(k), a0);
            vst1q_f32(o.add(k + 4), a1);
            k += 8;
        }
        while k < len {
            let mut acc = *o.add(k);
            for t in 0..nt {
                acc += *w.get_unchecked(t) * *s.add(*offs.get_unchecked(t) + k);
            }
            *o.add(k) = acc;
            k += 1;
        }
    }
}

#[target_feature(enable = "neon")]
unsafe fn corr_i8_neon(
    out: *mut i32,
    ldo: usize,
    src: *const i8,
    lds: usize,
    rows: usize,
    len: usize,
    offs: &[usize],
    w: &[i32],
) {
    let nt = offs.len().min(w.len());
    for r in 0..rows {
        let o = out.add(r * ldo);
        let s = src.add(r * lds);
        let mut k = 0;
        while k + 8 <= len {
            let mut a0 = vld1q_s32(o.add(k));
            let mut a1 = vld1q_s32(o.add(k + 4));
            for t in 0..nt {
                let wv = vdup_n_s16(*w.get_unchecked(t) as i16);
                let x = vmovl_s8(vld1_s8(s.add(*offs.get_unchecked(t) + k)));
                a0 = vmlal_s16(a0, vget_low_s16(x), wv);
                a1 = vmlal_s16(a1, vget_high_s16(x), wv);
            }
            vst1q_s32(o.add(k), a0);
            vst1q_s32(o.add(k + 4), a1);
            k += 8;
        }
        while k < len {
            let mut acc = *o.add(k);
            for t in 0..nt {
                acc = acc
                    .wrapping_add(*w.get_unchecked(t) * *s.add(*offs.get_unchecked(t) + k) as i32);
            }
            *o.add(k) = acc;
            k += 1;
        }
    }
}

#[target_feature(enable = "neon")]
unsafe fn dot_f32_neon(
    a: *const f32,
    lda: usize,
    src: *const f32,
    lds: usize,
    rows: usize,
    len: usize,
    offs: &[usize],
    lanes: &mut [[f32; 16]],
) {
    for (l, &off) in lanes.iter_mut().zip(offs) {
        let lp = l.as_mut_ptr();
        let mut acc = [
            vld1q_f32(lp),
            vld1q_f32(lp.add(4)),
            vld1q_f32(lp.add(8)),
            vld1q_f32(lp.add(12)),
        ];
        for r in 0..rows {
            let (ar, sr) = (a.add(r * lda), src.add(r * lds + off));
            let mut k = 0;
            while k + 16 <= len {
                for (q, v) in acc.iter_mut().enumerate() {
                    let i = k + 4 * q;
                    *v = vaddq_f32(*v, vmulq_f32(vld1q_f32(ar.add(i)), vld1q_f32(sr.add(i))));
                }
                k += 16;
            }
            if k < len {
                for (q, v) in acc.iter().enumerate() {
                    vst1q_f32(lp.add(4 * q), *v);
                }
                dot_f32_row_tail(ar, sr, k, len, l);
                let lp = l.as_mut_ptr();
                acc = [
                    vld1q_f32(lp),
                    vld1q_f32(lp.add(4)),
                    vld1q_f32(lp.add(8)),
                    vld1q_f32(lp.add(12)),
                ];
            }
        }
        let lp = l.as_mut_ptr();
        for (q, v) in acc.iter().enumerate() {
            vst1q_f32(lp.add(4 * q), *v);
        }
    }
}

#[target_feature(enable = "neon")]
unsafe fn dot_i8_neon(
    a: *const i8,
    lda: usize,
    src: *const i8,
    lds: usize,
    rows: usize,
    len: usize,
    offs: &[usize],
    sums: &mut [i64],
) {
    for (sum, &off) in sums.iter_mut().zip(offs) {
        for r in 0..rows {
            let (ar, sr) = (a.add(r * lda), src.add(r * lds + off));
            let mut acc = vdupq_n_s32(0);
            let mut k = 0;
            while k + 16 <= len {
                let (av, sv) = (vld1q_s8(ar.add(k)), vld1q_s8(sr.add(k)));
                let lo = vmull_s8(vget_low_s8(av), vget_low_s8(sv));
                let hi = vmull_high_s8(av, sv);
                acc = vpadalq_s16(acc, lo);
                acc = vpadalq_s16(acc, hi);
                k += 16;
            }
            let mut tail = 0i32;
            while k < len {
                tail += *ar.add(k) as i32 * *sr.add(k) as i32;
                k += 1;
            }
            *sum += vaddvq_s32(acc) as i64 + tail as i64;
        }
    }
}

#[target_feature(enable = "neon,dotprod")]
unsafe fn dot_i8_dotprod(
    a: *const i8,
    lda: usize,
    src: *const i8,
    lds: usize,
    rows: usize,
    len: usize,
    offs: &[usize],
    sums: &mut [i64],
) {
    for (sum, &off) in sums.iter_mut().zip(offs) {
        for r in 0..rows {
            let (ar, sr) = (a.add(r * lda), src.add(r * lds + off));
            let mut acc = vdupq_n_s32(0);
            let mut k = 0;
            while k + 16 <= len {
                let (av, sv) = (vld1q_s8(ar.add(k)), vld1q_s8(sr.add(k)));
                // SAFETY: register-only instruction of FEAT_DotProd, enabled on this function.
                asm!(
                    "sdot {acc:v}.4s, {a:v}.16b, {b:v}.16b",
                    acc = inout(vreg) acc,
                    a = in(vreg) av,
                    b = in(vreg) sv,
                    options(pure, nomem, nostack, preserves_flags),
                );
                k += 16;
            }
            let mut tail = 0i32;
            while k < len {
                tail += *ar.add(k) as i32 * *sr.add(k) as i32;
                k += 1;
            }
            *sum += vaddvq_s32(acc) as i64 + tail as i64;
        }
    }
}
