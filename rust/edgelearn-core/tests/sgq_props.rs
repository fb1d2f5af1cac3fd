//! SGQ codec laws: decode(encode(x)) within the quantization bound for random shapes, bit widths,
//! groups, stripes and both roundings; reproducibility; baselines; and frames that were tampered with.

use edgelearn_core::quant::Rounding;
use edgelearn_core::sgq::{self, frame, Mode, Settings, Shape};
use edgelearn_core::{threads, Error};
use proptest::prelude::*;

fn values(n: usize, seed: u64, scale: f32, offset: f32) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            ((s >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * scale + offset
        })
        .collect()
}

/// Checks every element against the bound of its block, read from the frame's own ranges.
fn check_bound(x: &[f32], bytes: &[u8], stochastic_bound: bool) {
    let f = sgq::parse(bytes).unwrap();
    let h = f.header;
    let grid = h.grid();
    let order = f.order();
    let ranges = f.ranges_f32();
    let (_, y) = sgq::decode(bytes).unwrap();
    let s = h.shape;
    let levels = ((1u32 << h.bits) - 1) as f32;
    let plane = s.h * s.w;
    for n in 0..s.n {
        for (p, &ch) in order.iter().enumerate() {
            for hw in 0..plane {
                let i = (n * s.c + ch as usize) * plane + hw;
                let (lo, hi) = ranges[grid.range_index(n, p, hw / s.w)];
                assert!(
                    lo <= x[i] && x[i] <= hi,
                    "range [{lo}, {hi}] misses x[{i}] = {}",
                    x[i]
                );
                let step = (hi - lo) / levels;
                let slack = 4.0 * f32::EPSILON * lo.abs().max(hi.abs());
                let err = (y[i] - x[i]).abs();
                let bound = if stochastic_bound { step } else { step / 2.0 };
                assert!(
                    err <= bound + slack,
                    "x[{i}] = {} decoded {} (err {err}, bound {bound})",
                    x[i],
                    y[i]
                );
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 96, ..ProptestConfig::default() })]

    #[test]
    fn round_trip_is_within_the_quantization_bound(
        n in 1usize..4, c in 1usize..11, h in 1usize..9, w in 1usize..9,
        bits in 1u8..=8, group in 1usize..6, stripe in 0usize..5,
        stochastic in any::<bool>(), seed in any::<u64>(),
        scale in prop_oneof![Just(1e-3f32), Just(1.0f32), Just(300.0f32)], offset in -2.0f32..2.0,
    ) {
        let shape = Shape { n, c, h, w };
        let x = values(n * c * h * w, seed, scale, offset);
        let rounding = if stochastic { Rounding::Stochastic { seed } } else { Rounding::Nearest };
        for mode in [Mode::Sgq, Mode::Uniform] {
            let settings = Settings { mode, bits, group, stripe_rows: stripe, rounding };
            let bytes = sgq::encode(&x, shape, 4, &settings, None).unwrap();
            check_bound(&x, &bytes, stochastic);
        }
    }

    #[test]
    fn any_single_byte_change_is_rejected(pos_frac in 0.0f64..1.0, xor in 1u8..=255, seed in any::<u64>()) {
        let shape = Shape { n: 2, c: 5, h: 6, w: 3 };
        let x = values(180, seed, 2.0, 0.0);
        let mut bytes = sgq::encode(&x, shape, 4, &Settings::default(), None).unwrap();
        let pos = ((bytes.len() as f64 * pos_frac) as usize).min(bytes.len() - 1);
        bytes[pos] ^= xor;
        let rejected = matches!(sgq::decode(&bytes), Err(Error::Frame { .. }));
        prop_assert!(rejected, "a changed byte at {} was accepted", pos);
    }
}

#[test]
fn fp16_mode_round_trips_through_binary16() {
    let shape = Shape {
        n: 3,
        c: 2,
        h: 5,
        w: 7,
    };
    let x = values(210, 3, 100.0, 1.0);
    let s = Settings {
        mode: Mode::Fp16,
        ..Settings::default()
    };
    let bytes = sgq::encode(&x, shape, 4, &s, None).unwrap();
    assert_eq!(bytes.len(), frame::HEADER_LEN + 2 * x.len());
    let (h, y) = sgq::decode(&bytes).unwrap();
    assert_eq!(h.bits, 16);
    for (a, b) in x.iter().zip(&y) {
        assert_eq!(*b, half::f16::from_f32(*a).to_f32());
    }
}

#[test]
fn frames_do_not_depend_on_the_thread_count() {
    let shape = Shape {
        n: 4,
        c: 16,
        h: 33,
        w: 31,
    }; // > PARALLEL_MIN_ELEMENTS, odd plane size
    let x = values(4 * 16 * 33 * 31, 9, 4.0, 1.0);
    for (bits, rounding) in [
        (3u8, Rounding::Nearest),
        (5, Rounding::Stochastic { seed: 77 }),
    ] {
        let s = Settings {
            bits,
            rounding,
            ..Settings::default()
        };
        threads::set_num_threads(1).unwrap();
        let one = sgq::encode(&x, shape, 4, &s, None).unwrap();
        let dec_one = sgq::decode(&one).unwrap().1;
        threads::set_num_threads(4).unwrap();
        let four = sgq::encode(&x, shape, 4, &s, None).unwrap();
        let dec_four = sgq::decode(&four).unwrap().1;
        assert_eq!(one, four);
        assert_eq!(dec_one, dec_four);
        check_bound(&x, &four, rounding != Rounding::Nearest);
    }
}

#[test]
fn stochastic_rounding_is_unbiased() {
    let shape = Shape {
        n: 1,
        c: 1,
        h: 1,
        w: 2,
    };
    // range [0, 1] at 1 bit: 0.3 rounds up with probability 0.3
    let x = [0.0f32, 0.0, 0.3, 1.0];
    let shape4 = Shape { w: 4, ..shape };
    let mut sum = 0.0f64;
    let trials = 4000;
    for seed in 0..trials {
        let s = Settings {
            bits: 1,
            rounding: Rounding::Stochastic { seed },
            ..Settings::default()
        };
        sum += sgq::decode(&sgq::encode(&x, shape4, 4, &s, None).unwrap())
            .unwrap()
            .1[2] as f64;
    }
    let mean = sum / trials as f64;
    assert!((mean - 0.3).abs() < 0.03, "mean {mean}");
}

#[test]
fn given_order_is_used_and_sent() {
    let shape = Shape {
        n: 1,
        c: 4,
        h: 2,
        w: 2,
    };
    let x = values(16, 1, 1.0, 0.0);
    let order = [3u32, 1, 0, 2];
    let bytes = sgq::encode(&x, shape, 4, &Settings::default(), Some(&order)).unwrap();
    let f = sgq::parse(&bytes).unwrap();
    assert!(f.header.has_permutation);
    assert_eq!(f.order(), order);
    let identity = sgq::encode(&x, shape, 4, &Settings::default(), Some(&[0, 1, 2, 3])).unwrap();
    assert!(!sgq::parse(&identity).unwrap().header.has_permutation);
    assert!(sgq::encode(&x, shape, 4, &Settings::default(), Some(&[0, 1, 1, 2])).is_err());
}

fn sample_frame() -> Vec<u8> {
    let shape = Shape {
        n: 2,
        c: 6,
        h: 4,
        w: 5,
    };
    sgq::encode(
        &values(240, 5, 3.0, 0.5),
        shape,
        4,
        &Settings {
            bits: 3,
            ..Settings::default()
        },
        None,
    )
    .unwrap()
}

fn expect_frame_error(bytes: &[u8], needle: &str) {
    match sgq::decode(bytes) {
        Err(Error::Frame { msg }) => assert!(msg.contains(needle), "{msg:?} lacks {needle:?}"),
        other => panic!("expected a frame error containing {needle:?}, got {other:?}"),
    }
}

/// Edits a header field and re-seals the CRC, so validation past the CRC is reached.
fn edited(at: usize, value: &[u8]) -> Vec<u8> {
    let mut b = sample_frame();
    b[at..at + value.len()].copy_from_slice(value);
    frame::seal(&mut b);
    b
}

#[test]
fn decode_rejects_tampered_frames() {
    let good = sample_frame();
    assert!(sgq::decode(&good).is_ok());
    expect_frame_error(&good[..10], "truncated");
    expect_frame_error(&good[..good.len() - 1], "truncated");
    let mut longer = good.clone();
    longer.push(0);
    expect_frame_error(&longer, "trailing");
    expect_frame_error(&edited(0, b"XGQF"), "magic");
    expect_frame_error(&edited(4, &2u16.to_le_bytes()), "version");
    expect_frame_error(&edited(6, &[2]), "dtype");
    expect_frame_error(&edited(7, &[9]), "mode");
    expect_frame_error(&edited(8, &[9]), "bits");
    expect_frame_error(&edited(8, &[0]), "bits");
    expect_frame_error(&edited(9, &[0x80]), "flag");
    expect_frame_error(&edited(10, &[5]), "ndim");
    expect_frame_error(&edited(11, &[1]), "reserved");
    expect_frame_error(&edited(12, &0u32.to_le_bytes()), "zero dimension");
    expect_frame_error(&edited(12, &u32::MAX.to_le_bytes()), "limit");
    expect_frame_error(&edited(16, &u32::MAX.to_le_bytes()), "limit");
    expect_frame_error(&edited(12, &3u32.to_le_bytes()), "length");
    expect_frame_error(&edited(28, &0u32.to_le_bytes()), "group");
    expect_frame_error(&edited(28, &7u32.to_le_bytes()), "group");
    expect_frame_error(&edited(32, &9u32.to_le_bytes()), "stripe");
    expect_frame_error(&edited(36, &0u32.to_le_bytes()), "permutation length");
    expect_frame_error(&edited(40, &u32::MAX.to_le_bytes()), "ranges length");
    expect_frame_error(&edited(44, &u64::MAX.to_le_bytes()), "codes length");
    let mut crc = good.clone();
    crc[frame::CRC_AT] ^= 1;
    expect_frame_error(&crc, "CRC");
    // a repeated channel in the permutation
    let p = frame::HEADER_LEN;
    let first = [good[p], good[p + 1]];
    expect_frame_error(&edited(p + 2, &first), "permutation");
    // a range with lo > hi, and a NaN range
    let r = p + 12;
    expect_frame_error(&edited(r, &[0x00, 0x3c, 0x00, 0x00]), "range");
    expect_frame_error(&edited(r, &[0x00, 0x7e, 0x00, 0x7e]), "range");
}
