//! Helpers shared by integration tests (`mod common;`).

/// Small deterministic generator (splitmix64; tests must not depend on a crate's RNG stream across
/// versions).
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    #[allow(dead_code)]
    pub fn i8s(&mut self, n: usize) -> Vec<i8> {
        (0..n).map(|_| self.next() as i8).collect()
    }
}

/// `n` values uniform in `[-scale/2, scale/2)` (24-bit steps).
#[allow(dead_code)]
pub fn values(rng: &mut Rng, n: usize, scale: f32) -> Vec<f32> {
    (0..n)
        .map(|_| ((rng.next() >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * scale)
        .collect()
}

/// The largest magnitude of `x`, by the definition (what an activation range must hold).
#[allow(dead_code)]
pub fn amax(x: &[f32]) -> f32 {
    x.iter().fold(0f32, |m, v| m.max(v.abs()))
}
