//! Laws of the quantization primitives: round-trip bounds, code range, exactness against a scalar
//! reference, unbiased stochastic rounding, and results independent of the thread count.

use edgelearn_core::quant::{
    dequantize_into, quantize_into, quantize_per_channel, quantize_per_tensor, stochastic_uniform,
    Clip, Layout, Rounding, DEFAULT_MINMAX_KAPPA, DEFAULT_SIGMA_Z, PARALLEL_MIN_ELEMENTS,
};
use edgelearn_core::threads;
use proptest::prelude::*;

/// Small deterministic generator (tests must not depend on a crate's RNG stream across versions).
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Roughly normal values (sum of uniforms) times `scale`, with a few outliers.
    fn f32s(&mut self, n: usize, scale: f32) -> Vec<f32> {
        (0..n)
            .map(|_| {
                let s: f32 = (0..4)
                    .map(|_| (self.next() >> 40) as f32 / (1u64 << 24) as f32 - 0.5)
                    .sum();
                if self.next() % 97 == 0 {
                    s * scale * 20.0
                } else {
                    s * scale
                }
            })
            .collect()
    }
}

/// Clip bounds per channel computed independently (two-pass, sequential f64).
fn reference_bounds(x: &[f32], l: Layout, clip: Clip) -> Vec<(f32, f32)> {
    (0..l.channels)
        .map(|c| {
            let vals: Vec<f64> = (0..l.outer)
                .flat_map(|o| (0..l.inner).map(move |i| (o * l.channels + c) * l.inner + i))
                .map(|i| x[i] as f64)
                .collect();
            let n = vals.len() as f64;
            match clip {
                Clip::None => (f32::NEG_INFINITY, f32::INFINITY),
                Clip::MinMax { kappa } => {
                    let mn = vals.iter().cloned().fold(f64::INFINITY, f64::min);
                    let mx = vals.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                    ((kappa * mn) as f32, (kappa * mx) as f32)
                }
                Clip::Sigma { z } => {
                    let m = vals.iter().sum::<f64>() / n;
                    let sd = (vals.iter().map(|v| (v - m) * (v - m)).sum::<f64>() / n).sqrt();
                    ((m - z * sd) as f32, (m + z * sd) as f32)
                }
            }
        })
        .collect()
}

fn channel_of(l: Layout, i: usize) -> usize {
    (i / l.inner) % l.channels
}

fn clip_strategy() -> impl Strategy<Value = Clip> {
    prop_oneof![
        Just(Clip::None),
        (0.5f64..4.0).prop_map(|z| Clip::Sigma { z }),
        (0.05f64..=1.0).prop_map(|kappa| Clip::MinMax { kappa }),
    ]
}

fn case_strategy() -> impl Strategy<Value = (Layout, Vec<f32>)> {
    (1usize..4, 1usize..6, 1usize..9).prop_flat_map(|(outer, channels, inner)| {
        let n = outer * channels * inner;
        let value = prop_oneof![
            -1.0e3f32..1.0e3,
            -1.0e-3f32..1.0e-3,
            Just(0.0f32),
            -3.0e30f32..3.0e30
        ];
        (
            Just(Layout {
                outer,
                channels,
                inner,
            }),
            proptest::collection::vec(value, n),
        )
    })
}

/// Quantizes, dequantizes and checks |dequant − clip(x)| ≤ bound·scale for every element.
fn check_round_trip(
    x: &[f32],
    l: Layout,
    rounding: Rounding,
    clip: Clip,
    bound: f64,
) -> Result<(), TestCaseError> {
    let (q, s) = quantize_per_channel(x, l, rounding, clip).unwrap();
    let mut out = vec![0f32; x.len()];
    dequantize_into(&q, l, &s, &mut out).unwrap();
    let bounds = reference_bounds(x, l, clip);
    for (i, (&xi, &yi)) in x.iter().zip(&out).enumerate() {
        let c = channel_of(l, i);
        let (lo, hi) = bounds[c];
        let clipped = xi.max(lo).min(hi) as f64;
        let sc = s[c] as f64;
        prop_assert!((-127..=127).contains(&q[i]));
        // float slack: the quotient, the product and a 1-ulp difference in the clip bounds
        let tol = bound * sc + 2e-4 * sc + 1e-6 * clipped.abs();
        prop_assert!(
            (yi as f64 - clipped).abs() <= tol,
            "i={i} x={xi} clipped={clipped} deq={yi} q={} scale={sc} clip={clip:?}",
            q[i]
        );
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 300, ..ProptestConfig::default() })]

    #[test]
    fn nearest_round_trip_is_within_half_a_step((l, x) in case_strategy(), clip in clip_strategy()) {
        check_round_trip(&x, l, Rounding::Nearest, clip, 0.5)?;
    }

    #[test]
    fn stochastic_round_trip_is_within_one_step((l, x) in case_strategy(), clip in clip_strategy(), seed: u64) {
        check_round_trip(&x, l, Rounding::Stochastic { seed }, clip, 1.0)?;
    }

    #[test]
    fn nearest_codes_equal_the_scalar_reference((l, x) in case_strategy()) {
        let (q, s) = quantize_per_channel(&x, l, Rounding::Nearest, Clip::None).unwrap();
        let bounds = reference_bounds(&x, l, Clip::MinMax { kappa: 1.0 });
        for (&sc, &(lo, hi)) in s.iter().zip(&bounds) {
            let amax = lo.abs().max(hi.abs());
            let expect = if amax / 127.0 > 0.0 { amax / 127.0 } else { 1.0 };
            prop_assert_eq!(sc, expect);
        }
        for (i, &xi) in x.iter().enumerate() {
            let t = (xi / s[channel_of(l, i)]).round_ties_even().clamp(-127.0, 127.0);
            prop_assert_eq!(q[i] as f32, t);
        }
    }

    #[test]
    fn stochastic_codes_equal_the_scalar_reference((l, x) in case_strategy(), seed: u64) {
        let (q, s) = quantize_per_channel(&x, l, Rounding::Stochastic { seed }, Clip::None).unwrap();
        for (i, &xi) in x.iter().enumerate() {
            let t = (xi / s[channel_of(l, i)]).clamp(-127.0, 127.0);
            // 127 + u rounds to 128.0 in f32 when u > 1 - 2^-18: the code is capped at 127
            let expect = (t + stochastic_uniform(seed, i as u64)).floor().min(127.0);
            prop_assert_eq!(q[i] as f32, expect);
        }
    }

    #[test]
    fn per_channel_equals_per_tensor_on_each_channel(
        (l, x) in case_strategy(),
        kappa in prop_oneof![Just(None), (0.1f64..=1.0).prop_map(Some)],
    ) {
        let clip = kappa.map_or(Clip::None, |kappa| Clip::MinMax { kappa });
        let (q, s) = quantize_per_channel(&x, l, Rounding::Nearest, clip).unwrap();
        for (c, &s_c) in s.iter().enumerate() {
            let idx: Vec<usize> = (0..x.len()).filter(|&i| channel_of(l, i) == c).collect();
            let xc: Vec<f32> = idx.iter().map(|&i| x[i]).collect();
            let (qc, sc) = quantize_per_tensor(&xc, Rounding::Nearest, clip).unwrap();
            prop_assert_eq!(sc, s_c);
            prop_assert_eq!(qc, idx.iter().map(|&i| q[i]).collect::<Vec<_>>());
        }
    }

    #[test]
    fn codes_stay_in_range_for_extreme_values(
        x in proptest::collection::vec(prop_oneof![Just(f32::MAX), Just(-f32::MAX), Just(f32::MIN_POSITIVE),
            Just(1e-45f32), Just(-1e-45f32), -1.0f32..1.0], 1..40),
        seed: u64,
    ) {
        for rounding in [Rounding::Nearest, Rounding::Stochastic { seed }] {
            let (q, s) = quantize_per_tensor(&x, rounding, Clip::None).unwrap();
            prop_assert!(s.is_finite() && s > 0.0);
            prop_assert!(q.iter().all(|v| (-127..=127).contains(v)));
        }
    }

    #[test]
    fn stochastic_rounding_is_unbiased(v in -126.0f32..126.0, seed: u64) {
        // 127 pins the scale to exactly 1, so the codes of v average to v
        let n = 20_000;
        let mut x = vec![v; n + 1];
        x[0] = 127.0;
        let (q, s) = quantize_per_tensor(&x, Rounding::Stochastic { seed }, Clip::None).unwrap();
        prop_assert_eq!(s, 1.0);
        let mean = q[1..].iter().map(|&c| c as f64).sum::<f64>() / n as f64;
        let f = v as f64 - (v as f64).floor();
        let sd = (f * (1.0 - f) / n as f64).sqrt();
        prop_assert!((mean - v as f64).abs() <= 5.0 * sd + 1e-6, "mean {mean} v {v} sd {sd}");
        prop_assert!(q[1..].iter().all(|&c| c as f64 == (v as f64).floor() || c as f64 == (v as f64).floor() + 1.0));
    }
}

fn quantize_with_threads(
    threads_n: usize,
    x: &[f32],
    l: Layout,
    rounding: Rounding,
    clip: Clip,
) -> (Vec<i8>, Vec<f32>) {
    threads::set_num_threads(threads_n).unwrap();
    let mut q = vec![0i8; x.len()];
    let mut s = vec![0f32; l.channels];
    quantize_into(x, l, rounding, clip, &mut q, &mut s).unwrap();
    (q, s)
}

#[test]
fn same_seed_gives_same_codes_for_one_and_two_threads() {
    let mut rng = Rng(7);
    let layouts = [
        Layout::per_tensor(300_001),
        Layout {
            outer: 1,
            channels: 37,
            inner: 8111,
        },
        Layout {
            outer: 4099,
            channels: 73,
            inner: 1,
        },
        Layout {
            outer: 61,
            channels: 5,
            inner: 1001,
        },
        Layout {
            outer: 150_001,
            channels: 2,
            inner: 1,
        },
    ];
    for l in layouts {
        let n = l.outer * l.channels * l.inner;
        assert!(n >= PARALLEL_MIN_ELEMENTS);
        let x = rng.f32s(n, 3.0);
        for clip in [
            Clip::None,
            Clip::Sigma { z: DEFAULT_SIGMA_Z },
            Clip::MinMax {
                kappa: DEFAULT_MINMAX_KAPPA,
            },
        ] {
            for rounding in [Rounding::Nearest, Rounding::Stochastic { seed: 99 }] {
                let one = quantize_with_threads(1, &x, l, rounding, clip);
                let two = quantize_with_threads(2, &x, l, rounding, clip);
                assert!(
                    one == two,
                    "layout {l:?} clip {clip:?} rounding {rounding:?}"
                );
                let four = quantize_with_threads(4, &x, l, rounding, clip);
                assert!(
                    one == four,
                    "layout {l:?} clip {clip:?} rounding {rounding:?}"
                );
            }
        }
    }
    let _ = threads::set_num_threads(2);
}

#[test]
fn large_tensors_match_the_round_trip_law_and_the_reference() {
    let mut rng = Rng(11);
    for l in [
        Layout::per_tensor(200_003),
        Layout {
            outer: 3001,
            channels: 67,
            inner: 1,
        },
    ] {
        let n = l.outer * l.channels * l.inner;
        let x = rng.f32s(n, 0.1);
        for clip in [
            Clip::None,
            Clip::Sigma { z: 2.0 },
            Clip::MinMax { kappa: 0.8 },
        ] {
            check_round_trip(&x, l, Rounding::Nearest, clip, 0.5).unwrap();
            check_round_trip(&x, l, Rounding::Stochastic { seed: 5 }, clip, 1.0).unwrap();
        }
    }
}

#[test]
fn different_seeds_give_different_codes_and_same_seed_the_same() {
    let x = Rng(3).f32s(10_000, 1.0);
    let a = quantize_per_tensor(&x, Rounding::Stochastic { seed: 1 }, Clip::None).unwrap();
    let b = quantize_per_tensor(&x, Rounding::Stochastic { seed: 1 }, Clip::None).unwrap();
    let c = quantize_per_tensor(&x, Rounding::Stochastic { seed: 2 }, Clip::None).unwrap();
    assert_eq!(a, b);
    let differ = a.0.iter().zip(&c.0).filter(|(p, q)| p != q).count();
    assert!(differ > 1000, "only {differ} codes differ");
}

#[test]
fn sigma_clip_on_large_tensor_clips_outliers() {
    let mut x = Rng(5).f32s(100_000, 1.0);
    x[17] = 1e4;
    let (q, s) = quantize_per_tensor(&x, Rounding::Nearest, Clip::Sigma { z: 3.0 }).unwrap();
    assert_eq!(q[17], 127);
    let plain = quantize_per_tensor(&x, Rounding::Nearest, Clip::None)
        .unwrap()
        .1;
    assert!(s < plain / 100.0, "clipped scale {s} vs unclipped {plain}");
}

/// Values within a few ulps of every rounding boundary (half-integers of `x/scale` for nearest rounding,
/// integers of `x/scale + u` for stochastic) give the scalar reference's codes: the SIMD kernels take
/// `x·(1/scale)` first and must fall back to the division exactly where the two could round apart.
#[test]
fn codes_at_rounding_boundaries_equal_the_scalar_reference() {
    let n = 64 * 64;
    let step = |v: f32, k: i32| {
        let b = v.to_bits() as i32;
        f32::from_bits((b + k) as u32)
    };
    for (scale_seed, scale) in [(1u64, 0.37f32), (2, 1.0), (3, 3.1e-3), (4, 7.9e4)] {
        // nearest: (k + 1/2)·scale moved by −3..=3 ulps; the last value pins the scale to 127·scale / 127
        let mut x: Vec<f32> = (0..n - 1)
            .map(|i| {
                let k = (i % 254) as f32 - 127.0;
                step((k + 0.5) * scale, (i / 254 % 7) as i32 - 3)
            })
            .collect();
        x.push(127.0 * scale);
        let (q, s) = quantize_per_tensor(&x, Rounding::Nearest, Clip::None).unwrap();
        for (i, &xi) in x.iter().enumerate() {
            let t = (xi / s).round_ties_even().clamp(-127.0, 127.0);
            assert_eq!(q[i] as f32, t, "nearest, scale {scale}, x[{i}] = {xi:e}");
        }
        // stochastic: x/scale + u_i ≈ an integer, moved by −3..=3 ulps
        let seed = 0x5eed ^ scale_seed;
        let mut x: Vec<f32> = (0..n - 1)
            .map(|i| {
                let k = (i % 250) as f32 - 124.0;
                let u = stochastic_uniform(seed, i as u64);
                step((k - u) * scale, (i / 250 % 7) as i32 - 3)
            })
            .collect();
        x.push(127.0 * scale);
        let (q, s) = quantize_per_tensor(&x, Rounding::Stochastic { seed }, Clip::None).unwrap();
        for (i, &xi) in x.iter().enumerate() {
            let t = (xi / s).clamp(-127.0, 127.0);
            let expect = (t + stochastic_uniform(seed, i as u64)).floor().min(127.0);
            assert_eq!(
                q[i] as f32, expect,
                "stochastic, scale {scale}, x[{i}] = {xi:e}"
            );
        }
    }
}
