//! Run-time choice of an AVX2 build for hot element-wise loops (x86-64).
//!
//! The crate is built for the baseline ISA of its target (SSE2 on x86-64, so one wheel runs on every
//! CPU); there, widening int8, converting int32 to float or packing mask bits takes long instruction
//! sequences. Hot loops are written once as `#[inline(always)]` code and also instantiated inside a
//! `#[target_feature(enable = "avx2,fma")]` function, picked when [`elementwise_avx2`] is true
//! ([`avx2_multiversion!`] writes the pair). Results are bit-identical either way: no reassociation, and
//! no contraction into FMA (Rust never fuses `a * b + c` by itself). On aarch64 NEON is the baseline.
//! Per-element closures must be created inside the AVX2 function (they then inherit its features and
//! inline); a closure passed in from outside stays a call.

use std::sync::atomic::{AtomicU8, Ordering};

/// 0 = portable, 1 = AVX2, 2 = not decided yet (from the CPU on first use).
static ELEMENTWISE_AVX2: AtomicU8 = AtomicU8::new(2);

/// Turns the AVX2 build of the element-wise loops (BatchNorm sums, ReLU masks, pooling, GEMM packing
/// sums and epilogue, col2im) off or back on (when the CPU has AVX2 and FMA). Tests use this to run both.
pub fn set_elementwise_simd(enabled: bool) {
    ELEMENTWISE_AVX2.store((enabled && cpu_has_avx2()) as u8, Ordering::Relaxed);
}

fn cpu_has_avx2() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// True if element-wise loops may use AVX2 and FMA (the CPU has them and tests did not turn them off).
#[inline]
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
pub(crate) fn elementwise_avx2() -> bool {
    let mut mode = ELEMENTWISE_AVX2.load(Ordering::Relaxed);
    if mode == 2 {
        mode = cpu_has_avx2() as u8;
        ELEMENTWISE_AVX2.store(mode, Ordering::Relaxed);
    }
    mode == 1
}

/// `avx2_multiversion! { fn name(a: A, b: B) -> R { body } }` defines `name`, which runs `body` built
/// for AVX2 + FMA when [`elementwise_avx2`] is true and as built otherwise. Plain (non-generic)
/// functions with simple `ident: Type` parameters; `unsafe fn` keeps the caller's obligations.
macro_rules! avx2_multiversion {
    ($(#[$meta:meta])* $vis:vis $(unsafe $($u:lifetime)?)? fn $name:ident($($arg:ident: $ty:ty),* $(,)?) $(-> $ret:ty)? $body:block) => {
        $(#[$meta])*
        #[allow(clippy::too_many_arguments)]
        $vis $(unsafe $($u)?)? fn $name($($arg: $ty),*) $(-> $ret)? {
            #[inline(always)]
            #[allow(clippy::too_many_arguments, unused_unsafe)]
            $(unsafe $($u)?)? fn body($($arg: $ty),*) $(-> $ret)? $body
            #[cfg(target_arch = "x86_64")]
            if $crate::simd::elementwise_avx2() {
                #[target_feature(enable = "avx2,fma")]
                #[allow(clippy::too_many_arguments)]
                unsafe fn avx2($($arg: $ty),*) $(-> $ret)? {
                    #[allow(unused_unsafe)]
                    unsafe { body($($arg),*) }
                }
                // SAFETY: the CPU has AVX2 and FMA; `body`'s own contract is the caller's.
                #[allow(unused_unsafe)]
                return unsafe { avx2($($arg),*) };
            }
            #[allow(unused_unsafe)]
            unsafe { body($($arg),*) }
        }
    };
}
pub(crate) use avx2_multiversion;
