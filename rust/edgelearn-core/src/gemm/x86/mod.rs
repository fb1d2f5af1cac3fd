//! x86-64 kernels: AVX2, AVX-VNNI and AVX-512 VNNI. Each is compiled with `#[target_feature]` and only
//! handed out when the CPU reports the features, so the crate itself never needs a `target-cpu`.

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
