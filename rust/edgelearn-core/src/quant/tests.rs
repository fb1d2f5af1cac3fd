//! Unit tests of quantization: rounding, scales, clipping, layouts, errors, the noise of stochastic
//! rounding.

use super::kernels::{quantize_run_uniform, round_nearest, round_stochastic, scaled};
use super::*;

fn q_nearest(x: &[f32]) -> (Vec<i8>, f32) {
    quantize_per_tensor(x, Rounding::Nearest, Clip::None).unwrap()
}

#[test]
fn scale_is_absmax_over_127_and_codes_round_half_to_even() {
    let (q, s) = q_nearest(&[127.0, -63.5, 0.5, 1.5, 2.5, -0.5, -1.5, 0.0]);
    assert_eq!(s, 1.0);
    assert_eq!(q, vec![127, -64, 0, 2, 2, 0, -2, 0]);
}

#[test]
fn all_zero_input_gets_scale_one() {
    let (q, s) = q_nearest(&[0.0; 10]);
    assert_eq!(s, 1.0);
    assert!(q.iter().all(|&v| v == 0));
    let (q, s) = q_nearest(&[]);
    assert_eq!((q.len(), s), (0, 1.0));
}

#[test]
fn magic_rounding_matches_round_ties_even_on_the_whole_range() {
    let mut t = -127.0f32;
    while t <= 127.0 {
        assert_eq!(round_nearest(t) as f32, t.round_ties_even(), "t = {t}");
        t += 0.125;
    }
    for t in [
        -0.5f32,
        0.5,
        126.5,
        -126.5,
        0.49999997,
        -0.49999997,
        1e-30,
        -1e-30,
    ] {
        assert_eq!(round_nearest(t) as f32, t.round_ties_even(), "t = {t}");
    }
}

#[test]
fn stochastic_codes_are_capped_where_the_sum_rounds_up_to_128() {
    // 127 + (1 − 2^-24) rounds to 128.0 in f32
    assert_eq!(127.0f32 + (1.0 - 1.0 / (1u32 << 24) as f32), 128.0);
    assert_eq!(
        round_stochastic(127.0, 1.0 - 1.0 / (1u32 << 24) as f32),
        127
    );
    assert_eq!(round_stochastic(-127.0, 0.0), -127);
}

#[test]
fn stochastic_floor_is_exact_at_integer_boundaries() {
    assert_eq!(round_stochastic(0.0, 0.0), 0);
    assert_eq!(round_stochastic(-1e-30, 0.0), -1);
    assert_eq!(round_stochastic(-1e-30, 1.0 / (1 << 24) as f32), 0);
    assert_eq!(round_stochastic(1e-30, 1.0 - 1.0 / (1 << 24) as f32), 0);
    assert_eq!(
        round_stochastic(126.99999, 1.0 - 1.0 / (1 << 24) as f32),
        127
    );
    assert_eq!(round_stochastic(127.0, 0.999), 127);
    assert_eq!(round_stochastic(-127.0, 0.0), -127);
    assert_eq!(round_stochastic(-126.5, 0.5), -126);
    assert_eq!(round_stochastic(-126.5, 0.49), -127);
}

#[test]
fn per_channel_matches_per_tensor_on_each_channel() {
    // shape (2, 3, 4) per channel along axis 1
    let x: Vec<f32> = (0..24)
        .map(|i| ((i * 7 % 11) as f32 - 5.0) * (1.0 + (i / 4 % 3) as f32))
        .collect();
    let layout = Layout::from_shape(&[2, 3, 4], Some(1), "axis").unwrap();
    assert_eq!(
        layout,
        Layout {
            outer: 2,
            channels: 3,
            inner: 4
        }
    );
    let (q, s) = quantize_per_channel(&x, layout, Rounding::Nearest, Clip::None).unwrap();
    for (c, &sc_all) in s.iter().enumerate() {
        let idx: Vec<usize> = (0..2)
            .flat_map(|o| (0..4).map(move |i| (o * 3 + c) * 4 + i))
            .collect();
        let xc: Vec<f32> = idx.iter().map(|&i| x[i]).collect();
        let (qc, sc) = q_nearest(&xc);
        assert_eq!(sc, sc_all);
        assert_eq!(qc, idx.iter().map(|&i| q[i]).collect::<Vec<_>>());
    }
}

#[test]
fn last_axis_channels_use_row_runs() {
    let x: Vec<f32> = (0..15)
        .map(|i| i as f32 * if i % 3 == 0 { 10.0 } else { 1.0 })
        .collect();
    let layout = Layout::from_shape(&[5, 3], Some(-1), "axis").unwrap();
    let (q, s) = quantize_per_channel(&x, layout, Rounding::Nearest, Clip::None).unwrap();
    assert_eq!(s, vec![120.0 / 127.0, 13.0 / 127.0, 14.0 / 127.0]);
    for (i, &v) in x.iter().enumerate() {
        assert_eq!(q[i] as f32, (v / s[i % 3]).round_ties_even());
    }
}

#[test]
fn minmax_clip_scales_the_range() {
    let x = [-100.0f32, 50.0, 0.0, 80.0];
    let (q, s) = quantize_per_tensor(&x, Rounding::Nearest, Clip::MinMax { kappa: 0.5 }).unwrap();
    // clipped to [-50, 40]: scale from 50, the two largest values land on 40
    assert_eq!(s, 50.0 / 127.0);
    assert_eq!(q, vec![-127, 102, 0, 102]);
}

#[test]
fn sigma_clip_bounds_use_population_sigma() {
    let mut x = vec![0.0f32; 99];
    x.push(1000.0);
    // mean 10, σ = sqrt(9900) ≈ 99.5; hi = 10 + 1·99.5
    let (q, s) = quantize_per_tensor(&x, Rounding::Nearest, Clip::Sigma { z: 1.0 }).unwrap();
    let hi = (10.0 + 9900f64.sqrt()) as f32;
    assert_eq!(s, hi / 127.0);
    assert_eq!(q[99], 127);
    assert!(q[..99].iter().all(|&v| v == 0));
}

#[test]
fn constant_channel_with_sigma_clip_keeps_its_value() {
    let x = [3.0f32; 7];
    let (q, s) = quantize_per_tensor(&x, Rounding::Nearest, Clip::Sigma { z: 2.576 }).unwrap();
    assert_eq!(s, 3.0 / 127.0);
    assert!(q.iter().all(|&v| v == 127));
}

#[test]
fn bad_arguments_are_errors_not_panics() {
    let x = [1.0f32, 2.0];
    let mut q = [0i8; 2];
    let mut s = [0f32; 1];
    let l = Layout::per_tensor(2);
    assert!(quantize_into(
        &x,
        l,
        Rounding::Nearest,
        Clip::Sigma { z: 0.0 },
        &mut q,
        &mut s
    )
    .is_err());
    assert!(quantize_into(
        &x,
        l,
        Rounding::Nearest,
        Clip::Sigma { z: f64::NAN },
        &mut q,
        &mut s
    )
    .is_err());
    assert!(quantize_into(
        &x,
        l,
        Rounding::Nearest,
        Clip::MinMax { kappa: 1.5 },
        &mut q,
        &mut s
    )
    .is_err());
    assert!(quantize_into(
        &x,
        l,
        Rounding::Nearest,
        Clip::MinMax { kappa: 0.0 },
        &mut q,
        &mut s
    )
    .is_err());
    assert!(quantize_into(&x, l, Rounding::Nearest, Clip::None, &mut q[..1], &mut s).is_err());
    assert!(quantize_into(&x, l, Rounding::Nearest, Clip::None, &mut q, &mut [0.0; 2]).is_err());
    assert!(quantize_into(
        &x,
        Layout::per_tensor(3),
        Rounding::Nearest,
        Clip::None,
        &mut q,
        &mut s
    )
    .is_err());
    assert!(Layout::from_shape(&[2, 3], Some(2), "axis").is_err());
    assert!(Layout::from_shape(&[2, 3], Some(-3), "axis").is_err());
    assert!(Layout::from_shape(&[], Some(0), "axis").is_err());
    assert!(Layout::from_shape(&[usize::MAX, 3], None, "axis").is_err());
    let mut out = [0f32; 2];
    for bad in [0.0f32, -1.0, f32::NAN, f32::INFINITY] {
        assert!(dequantize_into(&[1, 2], l, &[bad], &mut out).is_err());
    }
}

#[test]
fn non_finite_input_reports_the_first_index() {
    for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
        let mut x = vec![1.0f32; 100];
        x[37] = bad;
        x[80] = bad;
        let e = quantize_per_tensor(&x, Rounding::Nearest, Clip::None).unwrap_err();
        assert_eq!(
            e,
            Error::NonFinite {
                arg: "x",
                index: 37
            }
        );
        let layout = Layout {
            outer: 10,
            channels: 5,
            inner: 2,
        };
        let e = quantize_per_channel(&x, layout, Rounding::Nearest, Clip::Sigma { z: 1.0 })
            .unwrap_err();
        assert_eq!(
            e,
            Error::NonFinite {
                arg: "x",
                index: 37
            }
        );
        let layout = Layout {
            outer: 20,
            channels: 5,
            inner: 1,
        };
        let e = quantize_per_channel(&x, layout, Rounding::Nearest, Clip::None).unwrap_err();
        assert_eq!(
            e,
            Error::NonFinite {
                arg: "x",
                index: 37
            }
        );
    }
}

#[test]
fn empty_channels_get_scale_one() {
    let layout = Layout {
        outer: 0,
        channels: 4,
        inner: 3,
    };
    for clip in [
        Clip::None,
        Clip::Sigma { z: 1.0 },
        Clip::MinMax { kappa: 0.9 },
    ] {
        let (q, s) = quantize_per_channel(&[], layout, Rounding::Nearest, clip).unwrap();
        assert!(q.is_empty());
        assert_eq!(s, vec![1.0; 4]);
    }
    let layout = Layout {
        outer: 3,
        channels: 0,
        inner: 3,
    };
    let (q, s) = quantize_per_channel(&[], layout, Rounding::Nearest, Clip::None).unwrap();
    assert!(q.is_empty() && s.is_empty());
}

/// The noise follows the flat index across 2^32 boundaries, on the portable loop and on the AVX2 one
/// (runs long enough for its 32-value blocks on both sides of the boundary).
#[test]
fn stochastic_noise_follows_the_index_across_a_2_pow_32_boundary() {
    let xs: Vec<f32> = (0..200).map(|i| i as f32 * 0.0137 - 1.3).collect();
    let (seed, scale) = (77u64, 0.01f32);
    let rounding = Rounding::Stochastic { seed };
    let run = |name: &str, qs: &mut [i8], pos: usize| match name {
        "portable" => quantize_run_uniform(&xs, qs, -1e9, 1e9, scale, rounding, pos),
        #[cfg(target_arch = "x86_64")]
        // SAFETY: only listed below when the CPU has AVX2.
        "avx2" => unsafe {
            super::kernels::quantize_run_uniform_avx2(&xs, qs, -1e9, 1e9, scale, rounding, pos)
        },
        _ => unreachable!(),
    };
    #[allow(unused_mut)]
    let mut loops = vec!["portable"];
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        loops.push("avx2");
    }
    for name in loops {
        for pos in [(1usize << 32) - 67, (1usize << 32) - 64, 3 << 32] {
            let mut qs = vec![0i8; xs.len()];
            run(name, &mut qs, pos);
            for (j, (&q, &x)) in qs.iter().zip(&xs).enumerate() {
                let t = scaled(x, -1e9, 1e9, scale);
                let expect = (t + stochastic_uniform(seed, (pos + j) as u64)).floor();
                assert_eq!(q as f32, expect, "{name}: index {}", pos + j);
            }
        }
    }
}

#[test]
fn stochastic_uniform_is_on_the_2_pow_minus_24_grid() {
    for i in 0..1000 {
        let u = stochastic_uniform(42, i);
        assert!((0.0..1.0).contains(&u));
        assert_eq!((u * (1u32 << 24) as f32).fract(), 0.0);
    }
    assert_ne!(stochastic_uniform(1, 0), stochastic_uniform(2, 0));
    // the high half of the index selects another key
    assert_ne!(
        stochastic_uniform(1, 5),
        stochastic_uniform(1, 5 + (1 << 32))
    );
}

#[test]
fn dequantize_multiplies_by_the_channel_scale() {
    let layout = Layout {
        outer: 2,
        channels: 2,
        inner: 1,
    };
    let mut out = [0f32; 4];
    dequantize_into(&[1, -2, 3, 127], layout, &[0.5, 2.0], &mut out).unwrap();
    assert_eq!(out, [0.5, -4.0, 1.5, 254.0]);
    assert_eq!(
        dequantize_per_tensor(&[-127, 4], 0.25).unwrap(),
        vec![-31.75, 1.0]
    );
}

#[test]
fn random_seeds_differ() {
    assert_ne!(random_seed(), random_seed());
}

#[test]
fn quantize_with_scale_matches_quantize_into_and_absmax() {
    let x: Vec<f32> = (0..10_000)
        .map(|i| ((i * 7919 % 1000) as f32 - 500.0) / 37.0)
        .collect();
    let (q, s) = quantize_per_tensor(&x, Rounding::Nearest, Clip::None).unwrap();
    assert_eq!(scale_for_absmax(absmax(&x)), s);
    let mut q2 = vec![0i8; x.len()];
    quantize_nearest_with_scale(&x, s, &mut q2).unwrap();
    assert_eq!(q, q2);
    // a smaller scale saturates instead of wrapping
    quantize_nearest_with_scale(&x, s / 4.0, &mut q2).unwrap();
    assert!(q2.iter().all(|&v| v >= -127) && q2.contains(&127));
    assert!(quantize_nearest_with_scale(&x, 0.0, &mut q2).is_err());
    assert!(quantize_nearest_with_scale(&x, 1.0, &mut q2[..5]).is_err());
    assert_eq!(scale_for_absmax(0.0), 1.0);
}

/// Where `x/scale` falls just below −127 and the noise is within 2^-18 of 1, the reference (clamp to −127,
/// then add `u`) rounds the sum up to −126: the SIMD kernels, which clamp only from below before adding
/// the noise, must give the same codes, as at the top of the range.
#[test]
fn stochastic_codes_at_the_range_ends_with_noise_near_one_equal_the_reference() {
    let seed = 7u64;
    // elements whose noise is within 2^-18 of 1 (about one in 2^18)
    let near_one: Vec<usize> = (0..4_000_000usize)
        .filter(|&i| stochastic_uniform(seed, i as u64) >= 1.0 - 1.0 / (1 << 18) as f32)
        .take(4)
        .collect();
    assert!(!near_one.is_empty());
    let n = near_one.last().unwrap() + 100;
    // an absmax whose scale makes -amax/scale fall below -127 (and amax/scale above 127)
    let amax = (1..1000)
        .map(|k| 1.0f32 + k as f32 * 0.001)
        .find(|&a| {
            let s = scale_for_absmax(a);
            -a * (1.0 / s) < -127.0 && -a / s < -127.0
        })
        .expect("a scale that rounds down");
    for sign in [-1.0f32, 1.0] {
        let mut x: Vec<f32> = (0..n).map(|i| ((i % 17) as f32 - 8.0) * 0.01).collect();
        x[0] = -sign * amax;
        for &i in &near_one {
            x[i] = sign * amax;
        }
        let (q, s) = quantize_per_tensor(&x, Rounding::Stochastic { seed }, Clip::None).unwrap();
        assert_eq!(s, scale_for_absmax(amax));
        for &i in &near_one {
            let want = round_stochastic(
                scaled(x[i], f32::NEG_INFINITY, f32::INFINITY, s),
                stochastic_uniform(seed, i as u64),
            );
            assert_eq!(q[i], want, "element {i} of sign {sign}");
        }
    }
}
