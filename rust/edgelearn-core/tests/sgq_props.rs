//! SGQ codec laws: decode(encode(x)) within the quantization bound for random shapes, bit widths,
//! groups, stripes and both roundings; reproducibility; baselines; and frames that were tampered with.

use edgelearn_core::quant::{Clip, Rounding};
use edgelearn_core::sgq::{self, frame, Mode, Plan, RangeScope, Settings, Shape};
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
    check_bound_with(x, bytes, stochastic_bound, None)
}

/// [`check_bound`] for a frame that may use its stream's order `stream`.
fn check_bound_with(x: &[f32], bytes: &[u8], stochastic_bound: bool, stream: Option<&[u32]>) {
    let f = sgq::parse(bytes).unwrap();
    let h = f.header;
    let grid = h.grid();
    let order = f.order(stream).unwrap();
    let ranges = f.ranges_f32();
    let (_, y) = sgq::decode_with_order(bytes, stream).unwrap();
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
        for (mode, ranges) in [(Mode::Sgq, RangeScope::Sample), (Mode::Sgq, RangeScope::Frame), (Mode::Uniform, RangeScope::Sample)] {
            let settings = Settings { mode, bits, group, stripe_rows: stripe, rounding, ranges, constant_blocks: false, clip: Clip::None };
            let bytes = sgq::encode(&x, shape, 4, &settings, None).unwrap();
            check_bound(&x, &bytes, stochastic);
        }
    }

    /// Constant blocks (all-zero rows after a ReLU, a constant offset) decode exactly, and frames that
    /// leave the order out decode within the bound given the stream's order.
    #[test]
    fn constant_blocks_and_stream_order_frames_round_trip(
        n in 1usize..4, c in 2usize..11, h in 1usize..9, w in 1usize..9,
        bits in 1u8..=8, group in 1usize..6, stripe in 0usize..5, seed in any::<u64>(),
        constant in prop_oneof![Just(0.0f32), Just(1.5f32), Just(-3.0f32), Just(0.1f32)],
        frame_ranges in any::<bool>(), constant_blocks in any::<bool>(), stochastic in any::<bool>(),
    ) {
        let shape = Shape { n, c, h, w };
        let mut x = values(n * c * h * w, seed, 2.0, 0.0);
        // channels 0 and 1: constant planes, so a group of them (order by range width) is constant
        let plane = h * w;
        for s in 0..n {
            for ch in 0..2 {
                x[(s * c + ch) * plane..(s * c + ch + 1) * plane].fill(constant);
            }
        }
        let ranges = if frame_ranges { RangeScope::Frame } else { RangeScope::Sample };
        let rounding = if stochastic { Rounding::Stochastic { seed } } else { Rounding::Nearest };
        let settings = Settings { bits, group, stripe_rows: stripe, ranges, constant_blocks, rounding, ..Settings::default() };
        let order: Vec<u32> = (0..c as u32).rev().collect();
        let mut plan = Plan::new(&x, shape, 4, &settings, Some(&order)).unwrap();
        let full_len = plan.frame_len();
        plan.omit_order();
        prop_assert_eq!(plan.frame_len(), full_len - 2 * c);
        let mut bytes = vec![0u8; plan.frame_len()];
        plan.write(&x, &mut bytes).unwrap();
        let msg = match sgq::decode(&bytes) {
            Err(Error::Frame { msg }) => msg,
            other => panic!("a stream-order frame decoded without the order: {other:?}"),
        };
        prop_assert!(msg.contains("order="), "{}", msg);
        check_bound_with(&x, &bytes, stochastic, Some(&order));
        let (header, y) = sgq::decode_with_order(&bytes, Some(&order)).unwrap();
        prop_assert_eq!(header.constant_map, constant_blocks);
        // the frame without the map: every element has a code
        let plain = Plan::new(&x, shape, 4, &Settings { constant_blocks: false, ..settings }, Some(&order)).unwrap();
        let saved_codes = plain.header().codes_len - header.codes_len;
        let g = group.min(c);
        let mut exact_blocks = 0;
        for (p, &ch) in order.iter().enumerate() {
            let k = p / g;
            if ch < 2 && order[k * g..((k + 1) * g).min(c)].iter().all(|&m| m < 2) {
                // a block of constant planes only: decoded exactly
                exact_blocks += 1;
                let stripe_len = header.grid().stripe_rows * w;
                for s in 0..n {
                    let at = (s * c + ch as usize) * plane;
                    for seg in y[at..at + plane].chunks(stripe_len) {
                        let v0 = seg[0];
                        // one code for the block (map), or equal values rounded alike (nearest)
                        if constant_blocks || !stochastic {
                            prop_assert!(seg.iter().all(|&v| v == v0), "a constant block decoded unevenly");
                        }
                        if constant != 0.1 && !stochastic {
                            // binary16-exact constants: decoded exactly
                            prop_assert_eq!(v0, constant);
                        }
                    }
                }
            }
        }
        prop_assert!(g > 2 || exact_blocks > 0);
        // the codes: one per element, except one per constant block (the groups made only of the two
        // constant channels) with the map
        let grid = header.grid();
        let mut codes = n * c * h * w;
        if constant_blocks {
            for k in 0..grid.groups {
                let members = &order[k * grid.group..((k + 1) * grid.group).min(c)];
                if members.iter().all(|&m| m < 2) {
                    for s in 0..grid.stripes {
                        codes -= n * (frame::block_elements(shape, &grid, k, s) - 1);
                    }
                }
            }
        }
        prop_assert_eq!(header.codes_len, ((codes * bits as usize).div_ceil(8)) as u64);
        if !constant_blocks {
            prop_assert_eq!(saved_codes, 0);
        }
        // a wrong stream order is refused, not used
        let short: Vec<u32> = (0..c as u32 - 1).collect();
        let refused = matches!(sgq::decode_with_order(&bytes, Some(&short)), Err(Error::Frame { .. }));
        prop_assert!(refused, "a stream order of {} channels was used for {}", c - 1, c);
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
    assert_eq!(f.order(None).unwrap(), order);
    let identity = sgq::encode(&x, shape, 4, &Settings::default(), Some(&[0, 1, 2, 3])).unwrap();
    assert!(!sgq::parse(&identity).unwrap().header.has_permutation);
    // omitting an identity order changes nothing: the frame stays self-contained
    let mut plan = Plan::new(&x, shape, 4, &Settings::default(), Some(&[0, 1, 2, 3])).unwrap();
    plan.omit_order();
    assert!(!plan.header().stream_order);
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
    expect_frame_error(&edited(4, &3u16.to_le_bytes()), "version");
    expect_frame_error(&edited(4, &0u16.to_le_bytes()), "version");
    // version 1 has no flag bits 2 and 3; version 2 refuses "permutation" together with "stream order"
    let mut v1 = sample_frame();
    v1[4..6].copy_from_slice(&1u16.to_le_bytes());
    v1[9] |= 8;
    frame::seal(&mut v1);
    expect_frame_error(&v1, "flag");
    expect_frame_error(&edited(9, &[2 | 8]), "at most one");
    // frame ranges flag without matching ranges length
    expect_frame_error(&edited(9, &[2 | 4]), "ranges length");
    expect_frame_error(&edited(9, &[2 | 16]), "ranges length");
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

#[test]
fn version_1_frames_still_decode() {
    // a v1 frame is a v2 frame without flag bits 2 and 3: relabel one and it must decode identically
    let v2 = sample_frame();
    let mut v1 = v2.clone();
    v1[4..6].copy_from_slice(&1u16.to_le_bytes());
    frame::seal(&mut v1);
    let (h1, y1) = sgq::decode(&v1).unwrap();
    assert_eq!(h1.version, 1);
    assert_eq!(y1, sgq::decode(&v2).unwrap().1);
}

#[test]
fn frame_ranges_are_shared_by_the_samples() {
    let shape = Shape {
        n: 8,
        c: 6,
        h: 8,
        w: 5,
    };
    let x = values(8 * 6 * 8 * 5, 11, 3.0, 1.0);
    let per = |ranges| Settings {
        ranges,
        ..Settings::default()
    };
    let sample = sgq::encode(&x, shape, 4, &per(RangeScope::Sample), None).unwrap();
    let whole = sgq::encode(&x, shape, 4, &per(RangeScope::Frame), None).unwrap();
    let (hs, hf) = (
        sgq::parse(&sample).unwrap().header,
        sgq::parse(&whole).unwrap().header,
    );
    assert!(hf.frame_ranges && !hs.frame_ranges);
    // 2 groups x 4 stripes: 8 ranges per sample, or 8 for the frame
    assert_eq!(hs.ranges_len, 4 * 8 * 8);
    assert_eq!(hf.ranges_len, 4 * 8);
    assert_eq!(sample.len() - whole.len(), 4 * 8 * 7);
    check_bound(&x, &whole, false);
}

/// Post-ReLU-like features whose top rows are all zero: blocks there are constant.
fn zero_rows_frame(constant_blocks: bool) -> (Vec<f32>, Vec<u8>) {
    let shape = Shape {
        n: 3,
        c: 4,
        h: 6,
        w: 6,
    };
    let mut x: Vec<f32> = values(3 * 4 * 6 * 6, 21, 2.0, 0.5)
        .into_iter()
        .map(|v| v.max(0.0))
        .collect();
    for n in 0..3 {
        for c in 0..4 {
            let at = (n * 4 + c) * 36;
            x[at..at + 12].fill(0.0); // rows 0 and 1
        }
    }
    let s = Settings {
        group: 2,
        stripe_rows: 2,
        ranges: RangeScope::Frame,
        constant_blocks,
        ..Settings::default()
    };
    let bytes = sgq::encode(&x, shape, 4, &s, Some(&[0, 1, 2, 3])).unwrap();
    (x, bytes)
}

#[test]
fn constant_blocks_carry_one_code() {
    let (x, with_map) = zero_rows_frame(true);
    let (_, without) = zero_rows_frame(false);
    let f = sgq::parse(&with_map).unwrap();
    assert!(f.header.constant_map);
    // 3 samples x 2 groups x 3 stripes = 18 blocks, a 3-byte map; stripe 0 of both groups is zero
    assert_eq!(f.map.len(), 3);
    let constant: Vec<usize> = (0..18).filter(|&i| f.is_constant(i)).collect();
    assert_eq!(constant, vec![0, 3, 6, 9, 12, 15]);
    // each saves 2 channels x 2 rows x 6 - 1 = 23 codes of 4 bits; the map costs 3 bytes
    let saved = 6 * 23 * 4 / 8;
    assert_eq!(without.len() - with_map.len(), saved - 3);
    let (_, y) = sgq::decode(&with_map).unwrap();
    assert_eq!(y, sgq::decode(&without).unwrap().1);
    check_bound(&x, &with_map, false);
}

#[test]
fn decode_rejects_a_constant_map_that_disagrees_with_the_codes() {
    let (_, good) = zero_rows_frame(true);
    let f = sgq::parse(&good).unwrap();
    let map_at = good.len() - f.codes.len() - f.map.len();
    // one more constant block: the codes length no longer matches
    let mut b = good.clone();
    b[map_at] |= 2;
    frame::seal(&mut b);
    expect_frame_error(&b, "constant-block map makes it");
    // a bit past the last block (18 blocks: bits 2..7 of the third byte are unused)
    let mut b = good.clone();
    b[map_at + 2] |= 0x80;
    frame::seal(&mut b);
    expect_frame_error(&b, "unused bits");
    // a codes length beyond the elements
    let mut b = good.clone();
    b[44..52].copy_from_slice(&(1u64 << 20).to_le_bytes());
    frame::seal(&mut b);
    expect_frame_error(&b, "codes length");
}

#[test]
fn the_encoder_leaves_out_a_map_that_would_expand_past_the_limit() {
    // one all-zero block of 64 x 64 x 64 elements per sample: with the map the frame would be ~70
    // bytes for 1 MiB of output
    let shape = Shape {
        n: 1,
        c: 64,
        h: 64,
        w: 64,
    };
    let x = vec![0f32; 64 * 64 * 64];
    let s = Settings {
        group: 64,
        stripe_rows: 64,
        constant_blocks: true,
        ..Settings::default()
    };
    let bytes = sgq::encode(&x, shape, 4, &s, None).unwrap();
    let h = sgq::parse(&bytes).unwrap().header;
    assert!(!h.constant_map);
    assert!(4 * x.len() <= sgq::MAX_EXPANSION * bytes.len());
    assert_eq!(sgq::decode(&bytes).unwrap().1, x);
}

/// Reference clip interval of one block from its elements (f64 moments, as the encoder defines it).
fn reference_clip(block: &[f32], clip: Clip) -> (f32, f32) {
    let mn = block.iter().cloned().fold(f32::INFINITY, f32::min);
    let mx = block.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
    let (lo, hi) = match clip {
        Clip::None => (mn, mx),
        Clip::MinMax { kappa } => ((mn as f64 * kappa) as f32, (mx as f64 * kappa) as f32),
        Clip::Sigma { z } => {
            let n = block.len() as f64;
            let mean = block.iter().map(|&v| v as f64).sum::<f64>() / n;
            let var = block
                .iter()
                .map(|&v| (v as f64 - mean).powi(2))
                .sum::<f64>()
                / n;
            (
                (mean - z * var.sqrt()) as f32,
                (mean + z * var.sqrt()) as f32,
            )
        }
    };
    let lo = lo.clamp(mn, mx);
    (lo, hi.clamp(lo, mx))
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    /// Range clipping: every block's binary16 range is its clip interval rounded outwards (within one
    /// binary16 step), inside the block's own [min, max]; every element decodes within the rounding
    /// bound of its value clamped to that range.
    #[test]
    fn clipped_ranges_follow_the_clip_law(
        n in 1usize..4, c in 1usize..9, h in 1usize..8, w in 1usize..8,
        bits in 1u8..=4, group in 1usize..5, stripe in 0usize..4, frame_ranges in any::<bool>(),
        stochastic in any::<bool>(), seed in any::<u64>(), sigma in any::<bool>(), param in 0.3f64..3.0,
        offset in -1.0f32..1.0,
    ) {
        let shape = Shape { n, c, h, w };
        let mut x = values(n * c * h * w, seed, 2.0, offset);
        // heavy tails: a few large outliers
        for i in (0..x.len()).step_by(7) {
            x[i] *= 20.0;
        }
        let clip = if sigma { Clip::Sigma { z: param } } else { Clip::MinMax { kappa: param.min(1.0) } };
        let rounding = if stochastic { Rounding::Stochastic { seed } } else { Rounding::Nearest };
        let ranges = if frame_ranges { RangeScope::Frame } else { RangeScope::Sample };
        let s = Settings { bits, group, stripe_rows: stripe, rounding, ranges, clip, ..Settings::default() };
        let bytes = sgq::encode(&x, shape, 4, &s, None).unwrap();
        let f = sgq::parse(&bytes).unwrap();
        let hd = f.header;
        let grid = hd.grid();
        let order = f.order(None).unwrap();
        let frame_ranges_f32 = f.ranges_f32();
        let (_, y) = sgq::decode(&bytes).unwrap();
        let plane = h * w;
        // the elements of each range, gathered through the frame's own grid and order
        let mut blocks: Vec<Vec<usize>> = vec![Vec::new(); frame_ranges_f32.len()];
        for s_n in 0..n {
            for (p, &ch) in order.iter().enumerate() {
                for hw in 0..plane {
                    blocks[grid.range_index(s_n, p, hw / w)].push((s_n * c + ch as usize) * plane + hw);
                }
            }
        }
        let levels = ((1u32 << bits) - 1) as f32;
        for (r, idx) in blocks.iter().enumerate() {
            let vals: Vec<f32> = idx.iter().map(|&i| x[i]).collect();
            let (want_lo, want_hi) = reference_clip(&vals, clip);
            let (mn, mx) = reference_clip(&vals, Clip::None);
            let (lo, hi) = frame_ranges_f32[r];
            let ulp = |v: f32| (v.abs() / 1024.0).max(6.0e-8) * 1.01;
            prop_assert!(lo <= want_lo + 1e-5 * want_lo.abs() && lo >= want_lo - ulp(want_lo) - 1e-5 * want_lo.abs(),
                         "block {} lo {} vs clip {}", r, lo, want_lo);
            prop_assert!(hi >= want_hi - 1e-5 * want_hi.abs() && hi <= want_hi + ulp(want_hi) + 1e-5 * want_hi.abs(),
                         "block {} hi {} vs clip {}", r, hi, want_hi);
            prop_assert!(lo >= mn - ulp(mn) && hi <= mx + ulp(mx));
            let step = (hi - lo) / levels;
            let bound = if stochastic { step } else { step / 2.0 };
            for &i in idx {
                let clamped = x[i].clamp(lo, hi);
                let slack = 4.0 * f32::EPSILON * lo.abs().max(hi.abs());
                prop_assert!((y[i] - clamped).abs() <= bound + slack,
                             "x[{}] = {} clamped {} decoded {} (range [{}, {}])", i, x[i], clamped, y[i], lo, hi);
            }
        }
    }
}

#[test]
fn clipping_cuts_the_error_of_the_bulk_of_heavy_tailed_values_at_two_bits() {
    let shape = Shape {
        n: 4,
        c: 8,
        h: 8,
        w: 8,
    };
    // mostly small values, one large outlier per block of 4 channels x 2 rows
    let mut x = values(4 * 8 * 64, 5, 1.0, 0.0);
    for i in (0..x.len()).step_by(64) {
        x[i] = 6.0;
    }
    let err = |clip| {
        let s = Settings {
            bits: 2,
            clip,
            ..Settings::default()
        };
        let y = sgq::decode(&sgq::encode(&x, shape, 4, &s, None).unwrap())
            .unwrap()
            .1;
        // the error of the bulk (every value but the outliers), which clipping is for
        let bulk = |v: &[f32]| -> Vec<f64> {
            v.iter()
                .enumerate()
                .filter(|(i, _)| i % 64 != 0)
                .map(|(_, &a)| a as f64)
                .collect()
        };
        let (xb, yb) = (bulk(&x), bulk(&y));
        let num: f64 = xb.iter().zip(&yb).map(|(a, b)| (a - b).powi(2)).sum();
        let den: f64 = xb.iter().map(|a| a.powi(2)).sum();
        (num / den).sqrt()
    };
    let (plain, sigma, minmax) = (
        err(Clip::None),
        err(Clip::Sigma { z: 2.0 }),
        err(Clip::MinMax { kappa: 0.5 }),
    );
    assert!(sigma < 0.85 * plain, "sigma {sigma} vs none {plain}");
    assert!(minmax < 0.85 * plain, "minmax {minmax} vs none {plain}");
    // a clip beyond every block's extremes changes nothing
    let s = |clip| Settings {
        bits: 2,
        clip,
        ..Settings::default()
    };
    assert_eq!(
        sgq::encode(&x, shape, 4, &s(Clip::Sigma { z: 1e6 }), None).unwrap(),
        sgq::encode(&x, shape, 4, &s(Clip::None), None).unwrap()
    );
    assert_eq!(
        sgq::encode(&x, shape, 4, &s(Clip::MinMax { kappa: 1.0 }), None).unwrap(),
        sgq::encode(&x, shape, 4, &s(Clip::None), None).unwrap()
    );
    // only mode sgq clips; bad parameters are refused
    for (mode, clip) in [
        (Mode::Uniform, Clip::Sigma { z: 2.0 }),
        (Mode::Fp16, Clip::MinMax { kappa: 0.9 }),
        (Mode::Sgq, Clip::Sigma { z: -1.0 }),
        (Mode::Sgq, Clip::MinMax { kappa: 1.5 }),
    ] {
        let bad = Settings {
            mode,
            clip,
            ..Settings::default()
        };
        match sgq::encode(&x, shape, 4, &bad, None) {
            Err(Error::InvalidArgument { arg, .. }) => assert_eq!(arg, "clip"),
            other => panic!("expected an invalid clip argument, got {other:?}"),
        }
    }
}
