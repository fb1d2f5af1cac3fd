//! The activation range handed from the op that writes an activation to the INT8 layer that quantizes it
//! (`quant::ActRange`, `octo::forward(x_range)`): the layer step with the producer's range gives the same
//! output, codes and scale, bit for bit, as the step that takes its own statistics pass; the producers'
//! ranges (ReLU/ReLU6 with mask, fused BatchNorm → ReLU (→ 2x2 max pool)) are exactly the largest
//! magnitude of what they wrote, on the AVX2 and scalar paths and over the pool; a range made for another
//! slice is rejected. A range smaller than the data cannot be made outside the crate (no constructor
//! takes a number), so that case needs no test here.

mod common;

use common::{amax, values, Rng};
use edgelearn_core::nn::{
    batchnorm2d_relu_forward_save_i8, relu6_forward_mask_inplace, relu_forward_mask_inplace,
    relu_mask_len, GroupedParams, ReluOut,
};
use edgelearn_core::octo::{self, Config, Layer, RoundMode};
use edgelearn_core::quant::{ActRange, Clip};
use edgelearn_core::Error;

fn layers() -> Vec<(Layer, Vec<usize>, Vec<usize>)> {
    vec![
        (Layer::Linear, vec![5, 37], vec![7, 37]),
        (
            Layer::Conv2d {
                stride: (1, 1),
                padding: (1, 1),
            },
            vec![2, 3, 9, 11],
            vec![4, 3, 3, 3],
        ),
        // large enough for the quantize pass to run in parallel chunks
        (
            Layer::Conv2d {
                stride: (2, 2),
                padding: (0, 0),
            },
            vec![4, 8, 40, 40],
            vec![8, 8, 1, 1],
        ),
        (
            Layer::GroupedConv2d(GroupedParams::new(6, (1, 1), (1, 1), (1, 1))),
            vec![2, 6, 8, 8],
            vec![6, 1, 3, 3],
        ),
    ]
}

#[test]
fn forward_with_range_is_forward_bit_for_bit() {
    let mut rng = Rng(11);
    for (layer, xs, ws) in layers() {
        let nx: usize = xs.iter().product();
        let nw: usize = ws.iter().product();
        let o = ws[0];
        let w = values(&mut rng, nw, 0.5);
        let bias = values(&mut rng, o, 0.1);
        // signed data, ReLU-like data with -0.0 among the zeros, all zeros, one huge value
        let signed = values(&mut rng, nx, 3.0);
        let relu: Vec<f32> = signed
            .iter()
            .enumerate()
            .map(|(i, &v)| {
                if v < 0.0 {
                    if i % 2 == 0 {
                        -0.0
                    } else {
                        0.0
                    }
                } else {
                    v
                }
            })
            .collect();
        let zeros = vec![0f32; nx];
        let mut spike = signed.clone();
        spike[nx / 2] = -1e30;
        for x in [&signed, &relu, &zeros, &spike] {
            for (act_rounding, training) in [
                (RoundMode::Stochastic, true),
                (RoundMode::Nearest, true),
                (RoundMode::Stochastic, false),
            ] {
                for per_channel_weights in [false, true] {
                    let config = Config {
                        act_rounding,
                        per_channel_weights,
                        prc: Clip::MinMax { kappa: 0.9 },
                        ..Config::default()
                    };
                    let ny = octo::output_shape(layer, &xs, &ws)
                        .unwrap()
                        .iter()
                        .product();
                    let (mut y0, mut y1) = (vec![0f32; ny], vec![0f32; ny]);
                    let run = |range: Option<&ActRange>, y: &mut [f32]| {
                        octo::forward(
                            layer,
                            config,
                            x,
                            &xs,
                            &w,
                            &ws,
                            Some(&bias),
                            None,
                            77,
                            training,
                            range,
                            y,
                        )
                        .unwrap()
                    };
                    let s0 = run(None, &mut y0);
                    let range = ActRange::of(x).unwrap();
                    assert_eq!(range.amax(), amax(x));
                    let s1 = run(Some(&range), &mut y1);
                    let ctx = format!("{layer:?} {xs:?} {config:?} training={training}");
                    assert_eq!(s0.sx.to_bits(), s1.sx.to_bits(), "{ctx}: sx");
                    assert_eq!(s0.xq, s1.xq, "{ctx}: codes");
                    assert_eq!(s0.wq, s1.wq, "{ctx}: weight codes");
                    let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
                    assert_eq!(bits(&y0), bits(&y1), "{ctx}: y");
                }
            }
        }
    }
}

#[test]
fn range_of_another_slice_is_rejected() {
    let mut rng = Rng(3);
    let xs = [4usize, 6];
    let x = values(&mut rng, 24, 1.0);
    let w = values(&mut rng, 12, 1.0);
    // the same length and a smaller range: the range of another array, or of a prefix, is refused
    let small: Vec<f32> = x.iter().map(|v| v * 0.5).collect();
    let mut y = vec![0f32; 8];
    for r in [
        ActRange::of(&small).unwrap(),
        ActRange::of(&x[..12]).unwrap(),
    ] {
        let e = octo::forward(
            Layer::Linear,
            Config::default(),
            &x,
            &xs,
            &w,
            &[2, 6],
            None,
            None,
            1,
            true,
            Some(&r),
            &mut y,
        )
        .unwrap_err();
        assert!(
            matches!(e, Error::InvalidArgument { arg: "x_range", .. }),
            "{e:?}"
        );
    }
    // a reshaped view (same address and length) keeps its range
    let r = ActRange::of(&x).unwrap();
    assert!(r.describes(&x[..]));
    assert!(!r.describes(&x[1..]));
}

#[test]
fn relu_mask_ranges_are_exact() {
    let mut rng = Rng(5);
    // tails not a multiple of 8 (scalar path after the AVX2 groups), one chunk, many chunks (pool)
    for n in [0usize, 1, 7, 8, 13, 64, 1000, 4099, 70_001, 300_000] {
        let x = values(&mut rng, n, 20.0);
        for six in [false, true] {
            let mut y = x.clone();
            let mut m = vec![0u8; relu_mask_len(n)];
            let r = if six {
                relu6_forward_mask_inplace(&mut y, &mut m)
            } else {
                relu_forward_mask_inplace(&mut y, &mut m)
            }
            .unwrap()
            .unwrap();
            assert_eq!(r.amax().to_bits(), amax(&y).to_bits(), "n={n} six={six}");
            assert!(r.describes(&y));
        }
    }
    // NaN anywhere (in a SIMD group or in the tail) and +inf give no range; ReLU6 clamps +inf to 6
    for n in [16usize, 21, 70_001] {
        for at in [0, n - 1, n / 2] {
            for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
                let mut x = values(&mut rng, n, 1.0);
                x[at] = bad;
                let mut m = vec![0u8; relu_mask_len(n)];
                let mut y = x.clone();
                let r = relu_forward_mask_inplace(&mut y, &mut m).unwrap();
                let finite_out = y.iter().all(|v| v.is_finite());
                assert_eq!(r.is_some(), finite_out, "relu n={n} at={at} {bad}");
                if let Some(r) = r {
                    assert_eq!(r.amax(), amax(&y));
                }
                let mut y = x.clone();
                let r = relu6_forward_mask_inplace(&mut y, &mut m).unwrap();
                assert_eq!(r.is_some(), !bad.is_nan(), "relu6 n={n} at={at} {bad}");
                if let Some(r) = r {
                    assert_eq!(r.amax(), amax(&y));
                }
            }
        }
    }
}

#[test]
fn fused_batchnorm_relu_ranges_are_exact() {
    let mut rng = Rng(9);
    for shape in [
        [2usize, 3, 5, 7],
        [4, 8, 16, 16],
        [32, 16, 28, 28],
        [1, 2, 1, 3],
    ] {
        let n: usize = shape.iter().product();
        let c = shape[1];
        for form in 0..3 {
            if form == 2 && (shape[2] < 2 || shape[3] < 2) {
                continue;
            }
            let mut x = values(&mut rng, n, 4.0);
            let gamma = values(&mut rng, c, 2.0);
            let beta = values(&mut rng, c, 1.0);
            let (mut rm, mut rv) = (vec![0f32; c], vec![1f32; c]);
            let (mut mean, mut invstd) = (vec![0f32; c], vec![0f32; c]);
            let mut xq = vec![0i8; n];
            let mut mask = vec![0u8; relu_mask_len(n)];
            let pn = shape[0] * c * (shape[2] / 2) * (shape[3] / 2);
            let (mut y, mut idx) = (vec![0f32; pn], vec![0u8; pn]);
            let out = match form {
                0 => ReluOut::Mask(&mut mask),
                1 => ReluOut::Relu6Mask(&mut mask),
                _ => ReluOut::Pool2x2 {
                    y: &mut y,
                    idx: &mut idx,
                },
            };
            let (_, r) = batchnorm2d_relu_forward_save_i8(
                &mut x,
                shape,
                Some(&gamma),
                Some(&beta),
                &mut rm,
                &mut rv,
                0.1,
                1e-5,
                &mut mean,
                &mut invstd,
                &mut xq,
                out,
            )
            .unwrap();
            let r = r.unwrap();
            let written: &[f32] = if form == 2 { &y } else { &x };
            assert!(r.describes(written), "{shape:?} form {form}");
            assert_eq!(
                r.amax().to_bits(),
                amax(written).to_bits(),
                "{shape:?} form {form}"
            );
        }
    }
}
