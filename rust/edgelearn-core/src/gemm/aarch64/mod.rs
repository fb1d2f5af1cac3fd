//! aarch64 kernels: NEON (`smull`/`sadalp`), dotprod (`sdot`) and i8mm (`smmla`), picked by
//! `is_aarch64_feature_detected!` so one binary runs on a Cortex-A72 and uses newer instructions where present.

use super::Candidate;

/// aarch64 kernels, best first.
pub(crate) fn candidates() -> Vec<Candidate> {
    Vec::new()
}
