//! x86-64 kernels: AVX2, AVX-VNNI and AVX-512 VNNI. Each is compiled with `#[target_feature]` and only
//! handed out when the CPU reports the features, so the crate itself never needs a `target-cpu`.

/// The `pack_b_block` of an x86 kernel (inside its `impl Kernel`, with its `NR` = 16 and `KU` = 4): its
/// B panels through the AVX2 packer of that layout, [`pack::pack_b_4x16`]. A panels stay generic.
macro_rules! pack_b_block_4x16 {
    () => {
        fn pack_b_block(
            &self,
            out: &mut [i8],
            sums: &mut [i32],
            b: &crate::gemm::Operand,
            k0: usize,
            kc: usize,
            c0: usize,
            n: usize,
        ) {
            const _: () = assert!(
                NR == 16 && KU == 4,
                "pack_b_4x16 packs 16 columns × 4 k values"
            );
            // SAFETY: the kernel is only handed out on CPUs with AVX2 (its `detected()`); `out` and `sums`
            // are as the `pack_b_block` contract says.
            unsafe { super::pack::pack_b_4x16(out, sums, b, k0, kc, c0, n) }
        }
    };
}
pub(crate) use pack_b_block_4x16;

pub mod avx2;
// AVX-512 and AVX-VNNI intrinsics and target features are stable since Rust 1.89 (the workspace's
// `rust-version`).
pub mod avx512vnni;
pub mod avxvnni;
pub(crate) mod pack;

use super::{Candidate, Kernel};

fn make_avx512vnni() -> Option<&'static dyn Kernel> {
    avx512vnni::detected().then_some(&avx512vnni::AVX512VNNI as &'static dyn Kernel)
}

fn make_avxvnni() -> Option<&'static dyn Kernel> {
    avxvnni::detected().then_some(&avxvnni::AVXVNNI as &'static dyn Kernel)
}

fn make_avx2() -> Option<&'static dyn Kernel> {
    avx2::detected().then_some(&avx2::AVX2 as &'static dyn Kernel)
}

/// x86-64 kernels, best first.
pub(crate) fn candidates() -> Vec<Candidate> {
    vec![
        Candidate {
            name: "avx512vnni",
            features: avx512vnni::FEATURES,
            make: make_avx512vnni,
        },
        Candidate {
            name: "avxvnni",
            features: avxvnni::FEATURES,
            make: make_avxvnni,
        },
        Candidate {
            name: "avx2",
            features: avx2::FEATURES,
            make: make_avx2,
        },
    ]
}
