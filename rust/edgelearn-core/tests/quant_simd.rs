//! The quantize loops on each of their builds (portable, AVX2, AVX-512, each where the CPU has it): codes
//! and scales are the same bits on every build, and equal the scalar reference of the spec (`q =
//! clamp(round(x / scale), ±127)`, stochastic `min(floor(x / scale + u), 127)`) on random data of
//! lengths around the SIMD blocks, at rounding boundaries (where the SIMD loops must fall back from the
//! reciprocal to the division) and at the range ends. Its own test binary: the build switch is
//! process-wide, so every test holds [`SIMD`] while it flips it.

mod common;

use std::sync::Mutex;

use common::{values, Rng};
use edgelearn_core::quant::{
    quantize_into, set_quantize_simd, stochastic_uniform, Clip, Layout, QuantizeSimd, Rounding,
};

static SIMD: Mutex<()> = Mutex::new(());

const BUILDS: [QuantizeSimd; 3] = [
    QuantizeSimd::Portable,
    QuantizeSimd::Avx2,
    QuantizeSimd::Avx512,
];

/// Runs `f` on each build, the widest last; restores the default.
fn on_each_build(mut f: impl FnMut(QuantizeSimd)) {
    let _guard = SIMD.lock().unwrap_or_else(|e| e.into_inner());
    for b in BUILDS {
        set_quantize_simd(b);
        f(b);
    }
    set_quantize_simd(QuantizeSimd::Avx512);
}

fn quantize(x: &[f32], l: Layout, rounding: Rounding, clip: Clip) -> (Vec<i8>, Vec<u32>) {
    let mut q = vec![0i8; x.len()];
    let mut s = vec![0f32; l.channels];
    quantize_into(x, l, rounding, clip, &mut q, &mut s).unwrap();
    (q, s.iter().map(|v| v.to_bits()).collect())
}

/// Lengths around the 32- and 64-value SIMD blocks and the 16384-value parallel chunks.
const SIZES: [usize; 13] = [
    1, 31, 32, 33, 63, 64, 65, 97, 1000, 16_383, 16_385, 40_001, 70_017,
];

/// The spec's codes for a per-tensor `x` without clipping, given the scale the call returned.
fn reference_codes(x: &[f32], scale: f32, rounding: Rounding) -> Vec<i8> {
    x.iter()
        .enumerate()
        .map(|(i, &xi)| {
            let t = (xi / scale).clamp(-127.0, 127.0);
            match rounding {
                Rounding::Nearest => t.round_ties_even() as i8,
                Rounding::Stochastic { seed } => {
                    (t + stochastic_uniform(seed, i as u64)).floor().min(127.0) as i8
                }
            }
        })
        .collect()
}

#[test]
fn per_tensor_codes_are_the_same_bits_on_every_build_and_equal_the_reference() {
    let mut rng = Rng(3);
    let clips = [
        Clip::None,
        Clip::MinMax { kappa: 0.8 },
        Clip::Sigma { z: 2.0 },
    ];
    for n in SIZES {
        let mut x = values(&mut rng, n, 6.0);
        // a few outliers, so that clipping cuts
        for i in (0..n).step_by(53) {
            x[i] *= 40.0;
        }
        for rounding in [Rounding::Nearest, Rounding::Stochastic { seed: n as u64 }] {
            for clip in clips {
                let mut first: Option<(Vec<i8>, Vec<u32>)> = None;
                on_each_build(|b| {
                    let got = quantize(&x, Layout::per_tensor(n), rounding, clip);
                    if clip == Clip::None {
                        let want = reference_codes(&x, f32::from_bits(got.1[0]), rounding);
                        assert!(got.0 == want, "{b:?} n {n} {rounding:?}: not the reference");
                    }
                    match &first {
                        None => first = Some(got),
                        Some(f) => assert!(
                            *f == got,
                            "{b:?} differs from the portable build: n {n} {rounding:?} {clip:?}"
                        ),
                    }
                });
            }
        }
    }
}

#[test]
fn per_channel_codes_are_the_same_bits_on_every_build() {
    let mut rng = Rng(5);
    // long channel runs (outer 1 and several), and channels on the last axis (row runs)
    let layouts = [
        Layout {
            outer: 1,
            channels: 5,
            inner: 1031,
        },
        Layout {
            outer: 3,
            channels: 4,
            inner: 97,
        },
        Layout {
            outer: 301,
            channels: 67,
            inner: 1,
        },
    ];
    for l in layouts {
        let n = l.outer * l.channels * l.inner;
        let x = values(&mut rng, n, 2.0);
        for rounding in [Rounding::Nearest, Rounding::Stochastic { seed: 17 }] {
            for clip in [Clip::None, Clip::MinMax { kappa: 0.7 }] {
                let mut first: Option<(Vec<i8>, Vec<u32>)> = None;
                on_each_build(|b| {
                    let got = quantize(&x, l, rounding, clip);
                    match &first {
                        None => first = Some(got),
                        Some(f) => assert!(
                            *f == got,
                            "{b:?} differs from the portable build: {l:?} {rounding:?} {clip:?}"
                        ),
                    }
                });
            }
        }
    }
}

/// `v` moved by `k` units in the last place.
fn step(v: f32, k: i32) -> f32 {
    f32::from_bits((v.to_bits() as i32 + k) as u32)
}

#[test]
fn codes_at_rounding_boundaries_equal_the_reference_on_every_build() {
    let n = 64 * 64 + 37;
    for scale in [0.37f32, 1.0, 3.1e-3, 7.9e4] {
        // nearest: (k + 1/2)·scale moved by −3..=3 ulps; the last value pins the scale
        let mut x: Vec<f32> = (0..n - 1)
            .map(|i| {
                let k = (i % 254) as f32 - 127.0;
                step((k + 0.5) * scale, (i / 254 % 7) as i32 - 3)
            })
            .collect();
        x.push(127.0 * scale);
        on_each_build(|b| {
            let (q, s) = quantize(&x, Layout::per_tensor(n), Rounding::Nearest, Clip::None);
            let want = reference_codes(&x, f32::from_bits(s[0]), Rounding::Nearest);
            assert!(q == want, "{b:?} nearest, scale {scale}");
        });
        // stochastic: x/scale + u_i ≈ an integer, moved by −8..=8 ulps; where some move makes
        // x·(1/scale) + u and x/scale + u floor apart (the SIMD loops must fall back to the division
        // there), that one is taken
        let seed = 0x5eed ^ scale.to_bits() as u64;
        let rounding = Rounding::Stochastic { seed };
        let s = (127.0 * scale) / 127.0;
        let inv = 1.0 / s;
        let mut apart = 0;
        let mut x: Vec<f32> = (0..n - 1)
            .map(|i| {
                let k = (i % 250) as f32 - 124.0;
                let u = stochastic_uniform(seed, i as u64);
                let base = (k - u) * s;
                let split = (-8..=8).map(|d| step(base, d)).find(|&v| {
                    ((v * inv).max(-127.0) + u).floor() != ((v / s).max(-127.0) + u).floor()
                });
                apart += split.is_some() as usize;
                split.unwrap_or_else(|| step(base, (i / 250 % 7) as i32 - 3))
            })
            .collect();
        x.push(127.0 * scale);
        if inv * s != 1.0 {
            assert!(
                apart > 0,
                "scale {scale}: no value where the reciprocal misleads"
            );
        }
        on_each_build(|b| {
            let (q, s) = quantize(&x, Layout::per_tensor(n), rounding, Clip::None);
            let want = reference_codes(&x, f32::from_bits(s[0]), rounding);
            for (i, (&g, &w)) in q.iter().zip(&want).enumerate() {
                assert_eq!(g, w, "{b:?} stochastic, scale {scale}, x[{i}] = {:e}", x[i]);
            }
        });
    }
}

/// A seed under which some index below `n` draws noise `u` with `pred(u)`, and that index.
fn seed_with(n: u64, pred: impl Fn(f32) -> bool) -> (u64, usize) {
    for seed in 0..100_000u64 {
        if let Some(i) = (0..n).find(|&i| pred(stochastic_uniform(seed, i))) {
            return (seed, i as usize);
        }
    }
    panic!("no seed found");
}

/// The range ends under stochastic rounding: `127 + u` rounds up to 128 in f32 for `u` within 2^-18 of
/// 1 (the code is capped at 127), and with an absmax `a` for which `−a / (a / 127)` is below −127 in
/// f32, `−a` with a tiny `u` would floor to −128 without the clamp at −127.
#[test]
fn stochastic_codes_at_the_range_ends_equal_the_reference_on_every_build() {
    let n = 4096usize;
    let a = (0..100_000)
        .map(|j| 1.0f32 + j as f32 * 1.0e-4)
        .find(|&a| -a / (a / 127.0) < -127.0)
        .expect("an absmax whose quotient falls below -127");
    let s = a / 127.0;
    for (what, pred, v) in [
        (
            "top",
            Box::new(|u: f32| 127.0f32 + u == 128.0) as Box<dyn Fn(f32) -> bool>,
            a,
        ),
        (
            "bottom",
            Box::new(move |u: f32| (-a / s + u).floor() < -127.0),
            -a,
        ),
    ] {
        let (seed, at) = seed_with(n as u64, pred);
        let mut rng = Rng(seed);
        let mut x = values(&mut rng, n, a);
        x[at] = v;
        x[(at + 1) % n] = -v;
        let rounding = Rounding::Stochastic { seed };
        on_each_build(|b| {
            let (q, sc) = quantize(&x, Layout::per_tensor(n), rounding, Clip::None);
            assert_eq!(f32::from_bits(sc[0]), s);
            let want = reference_codes(&x, s, rounding);
            assert_eq!(want[at], if v > 0.0 { 127 } else { -127 });
            assert!(q == want, "{b:?} {what}: seed {seed}, x[{at}] = {v}");
        });
    }
}
