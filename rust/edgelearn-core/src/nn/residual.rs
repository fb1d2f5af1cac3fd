//! The residual add of a block, `out += identity` in place over the main path's output (which only the
//! block holds), returning the sum's range for the INT8 layer that quantizes it next ([`ActRange`]).
//! Not here: the ReLU a ResNet block applies after the add ([`super::activation`]).

use super::{for_each_chunk, worth_parallel};
use crate::error::{Error, Result};
use crate::quant::{abs_bits, ActRange, AmaxAcc};

/// Elements per parallel task.
const CHUNK: usize = 1 << 14;

crate::simd::avx2_multiversion! {
/// `out += other` over one chunk (same lengths) and the largest [`abs_bits`] of the sums.
fn add_chunk_amax(out: &mut [f32], other: &[f32]) -> u32 {
    let mut m = 0u32;
    for (o, &v) in out.iter_mut().zip(other) {
        *o += v;
        m = m.max(abs_bits(*o));
    }
    m
}
}

/// `out = out + identity` element by element (IEEE addition, the same bits as numpy's `out + identity`),
/// and the range of the sums, taken as they are written (`None` if one is NaN or an infinity).
pub fn residual_add_inplace(out: &mut [f32], identity: &[f32]) -> Result<Option<ActRange>> {
    if identity.len() != out.len() {
        return Err(Error::invalid(
            "identity",
            format!(
                "has {} elements, expected {} (as many as out)",
                identity.len(),
                out.len()
            ),
        ));
    }
    let acc = AmaxAcc::new();
    for_each_chunk(out, CHUNK, worth_parallel(identity.len()), |i, oc| {
        let n = oc.len();
        acc.add_abs_bits(add_chunk_amax(oc, &identity[i * CHUNK..i * CHUNK + n]));
    });
    Ok(acc.finish(out))
}
