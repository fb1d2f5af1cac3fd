//! The noise of stochastic rounding: a counter-based hash of `(seed, flat element index)`, so codes do not
//! depend on how the work is split ([`stochastic_uniform`] is its definition), and fresh seeds.

/// splitmix64's output function.
#[inline(always)]
fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

const GOLDEN_GAMMA: u64 = 0x9E37_79B9_7F4A_7C15;

/// The per-call key derived from a seed (mixing keeps nearby seeds from giving shifted streams).
#[inline(always)]
pub(super) fn stream_key(seed: u64) -> u64 {
    mix64(seed ^ 0x5851_F42D_4C95_7F2D)
}

/// The noise of stochastic rounding for element `index` under `seed`: a multiple of 2^-24 in `[0, 1)`,
/// `(h32(lo32(index) + k) >> 8) · 2^-24` where `h32` is the 32-bit "lowbias32" mixer
/// (`x ^= x>>16; x *= 0x7feb352d; x ^= x>>15; x *= 0x846ca68b; x ^= x>>16`), all arithmetic mod 2^32,
/// and `k = lo32(mix64(key + hi32(index)·γ))` with `key = mix64(seed ^ 0x5851F42D4C957F2D)`, `mix64`
/// splitmix64's finaliser and `γ = 0x9E3779B97F4A7C15`. 32-bit lanes keep it as cheap as nearest
/// rounding on SIMD units (16 lanes per AVX-512 op). Defined here so other implementations (and tests)
/// can reproduce stochastic codes exactly.
pub fn stochastic_uniform(seed: u64, index: u64) -> f32 {
    let k = block_key(stream_key(seed), index >> 32);
    uniform_f32(k, index as u32)
}

/// The 32-bit key of the block of 2^32 indices whose high half is `hi`.
#[inline(always)]
fn block_key(key: u64, hi: u64) -> u32 {
    mix64(key.wrapping_add(hi.wrapping_mul(GOLDEN_GAMMA))) as u32
}

/// lowbias32 (C. Wellons' hash-prospector): a bijective 32-bit mixer with low avalanche bias.
#[inline(always)]
fn hash32(mut x: u32) -> u32 {
    x ^= x >> 16;
    x = x.wrapping_mul(0x7feb_352d);
    x ^= x >> 15;
    x = x.wrapping_mul(0x846c_a68b);
    x ^ (x >> 16)
}

#[inline(always)]
pub(super) fn uniform_f32(block_key: u32, index_lo: u32) -> f32 {
    // 24 bits: exact in f32 (and in i32 → f32 conversion)
    (hash32(index_lo.wrapping_add(block_key)) >> 8) as i32 as f32 * (1.0 / (1u32 << 24) as f32)
}

/// Calls `f(k, lo, range)` for the sub-ranges of `pos..pos + len` (as offsets `range` from `pos`) whose
/// flat indices share their high 32 bits: `k` is that block's key, `lo` the low half of the first index.
#[inline(always)]
pub(super) fn for_each_key_block(
    key: u64,
    pos: usize,
    len: usize,
    mut f: impl FnMut(u32, u32, std::ops::Range<usize>),
) {
    let mut j = 0;
    while j < len {
        let idx = (pos + j) as u64;
        let to_boundary = ((1u64 << 32) - (idx & 0xFFFF_FFFF)).min((len - j) as u64) as usize;
        f(block_key(key, idx >> 32), idx as u32, j..j + to_boundary);
        j += to_boundary;
    }
}

/// A fresh seed for stochastic rounding when the caller gives none: std's per-process random hash keys
/// (taken from the OS), a process-wide counter and the clock, mixed. Not reproducible by design.
pub fn random_seed() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(COUNTER.fetch_add(1, Ordering::Relaxed));
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    h.write_u128(nanos);
    h.finish()
}
