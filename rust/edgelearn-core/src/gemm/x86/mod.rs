//! x86-64 kernels: AVX2, AVX-VNNI and AVX-512 VNNI. Each is compiled with `#[target_feature]` and only
//! handed out when the CPU reports the features, so the crate itself never needs a `target-cpu`.

use super::Candidate;

/// x86-64 kernels, best first.
pub(crate) fn candidates() -> Vec<Candidate> {
    Vec::new()
}
