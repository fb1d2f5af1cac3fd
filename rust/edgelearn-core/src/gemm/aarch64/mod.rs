//! aarch64 kernels: NEON (`smull`/`sadalp`), dotprod (`sdot`) and i8mm (`smmla`), picked by
//! `is_aarch64_feature_detected!` so one binary runs on a Cortex-A72 and uses newer instructions where present.
//!
//! All three multiply s8 by s8 directly, so none uses the `a_shifted` (+128) trick of the x86 VNNI kernels.

pub mod dotprod;
pub mod i8mm;
pub mod neon;

use super::{Candidate, Kernel};

fn make_i8mm() -> Option<&'static dyn Kernel> {
    (std::arch::is_aarch64_feature_detected!("neon")
        && std::arch::is_aarch64_feature_detected!("i8mm"))
    .then_some(&i8mm::I8MM as &'static dyn Kernel)
}

fn make_dotprod() -> Option<&'static dyn Kernel> {
    (std::arch::is_aarch64_feature_detected!("neon")
        && std::arch::is_aarch64_feature_detected!("dotprod"))
    .then_some(&dotprod::DOTPROD as &'static dyn Kernel)
}

fn make_neon() -> Option<&'static dyn Kernel> {
    std::arch::is_aarch64_feature_detected!("neon").then_some(&neon::NEON as &'static dyn Kernel)
}

/// aarch64 kernels, best first.
pub(crate) fn candidates() -> Vec<Candidate> {
    vec![
        Candidate {
            name: "i8mm",
            features: &["neon", "i8mm"],
            make: make_i8mm,
        },
        Candidate {
            name: "dotprod",
            features: &["neon", "dotprod"],
            make: make_dotprod,
        },
        Candidate {
            name: "neon",
            features: &["neon"],
            make: make_neon,
        },
    ]
}
