//! The INT8 convolution gives the same bits whatever GEMM kernel runs it: with AVX-512 VNNI the padded-grid
//! shapes take the direct kernel (the image read in place, channels in groups of 4, outputs stored
//! straight from the tile), every other kernel the packed GEMM, and the INT32 sums and the epilogue are
//! exact and ordered alike. Shapes cover channel counts that are and are not multiples of 4, output
//! channels past a 16-row panel, grids whose tiles straddle images and rows, bias or none, per-channel
//! weight scales, and batches split into several chunks. The direct kernel also computes `dW` on the grid
//! (patch rows broadcast from the planes, `dY` interleaved by 4 positions), against the packed GEMM.

use edgelearn_core::gemm::{available_kernels, set_kernel, Scale};
use edgelearn_core::nn;
use edgelearn_core::nn::conv::direct::direct_available;

mod common;
use common::Rng;

type Case = ([usize; 4], [usize; 4], (usize, usize));

const CASES: &[Case] = &[
    ([3, 8, 7, 7], [20, 8, 3, 3], (1, 1)),
    ([2, 12, 14, 14], [5, 12, 3, 3], (1, 1)),
    ([33, 4, 5, 9], [16, 4, 3, 3], (1, 1)),
    ([4, 16, 9, 23], [33, 16, 3, 3], (1, 1)),
    ([5, 13, 6, 17], [7, 13, 3, 5], (2, 1)),
    ([2, 4, 8, 30], [3, 4, 3, 3], (0, 0)),
    ([1, 32, 7, 7], [64, 32, 3, 3], (1, 1)),
    ([6, 1, 12, 28], [16, 1, 3, 3], (1, 1)),
    // dW on the grid in several chunks of images, each spread over the pool
    ([40, 16, 20, 20], [24, 16, 3, 3], (1, 1)),
    // 5x5 taps, 5 channels, 17 outputs: partial tiles of patch rows and of output channels
    ([3, 5, 11, 13], [17, 5, 5, 5], (2, 2)),
];

type Outs = (Vec<u32>, Vec<u32>, Vec<u32>);

fn run(case: &Case, per_channel: bool, with_bias: bool, rng_seed: u64) -> Outs {
    let (xs, ws, pad) = *case;
    let mut rng = Rng(rng_seed);
    let xq = rng.i8s(xs.iter().product());
    let wq = rng.i8s(ws.iter().product());
    let (oh, ow) = (xs[2] + 2 * pad.0 - ws[2] + 1, xs[3] + 2 * pad.1 - ws[3] + 1);
    let dyq = rng.i8s(xs[0] * ws[0] * oh * ow);
    let bias: Vec<f32> = (0..ws[0]).map(|o| 0.25 - 0.01 * o as f32).collect();
    let sw_vec: Vec<f32> = (0..ws[0]).map(|o| 0.003 + 0.0007 * o as f32).collect();
    let sw = if per_channel {
        Scale::PerIndex(&sw_vec)
    } else {
        Scale::Scalar(0.0061)
    };
    let mut y = vec![f32::NAN; dyq.len()];
    nn::conv2d_i8_forward(
        &xq,
        xs,
        0.013,
        &wq,
        ws,
        sw,
        with_bias.then_some(&bias[..]),
        (1, 1),
        pad,
        &mut y,
    )
    .unwrap();
    let mut dx = vec![f32::NAN; xq.len()];
    let mut dw = vec![f32::NAN; wq.len()];
    nn::conv2d_i8_backward(
        &xq,
        xs,
        0.013,
        &wq,
        ws,
        sw,
        &dyq,
        0.0021,
        (1, 1),
        pad,
        Some(&mut dx),
        &mut dw,
    )
    .unwrap();
    let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
    (bits(&y), bits(&dx), bits(&dw))
}

#[test]
fn int8_convolution_is_bit_identical_across_kernels() {
    let kernels = available_kernels();
    for (ci, case) in CASES.iter().enumerate() {
        for per_channel in [false, true] {
            for with_bias in [false, true] {
                let mut first: Option<(&str, Outs)> = None;
                for k in &kernels {
                    set_kernel(Some(k.name())).unwrap();
                    if k.name() == "avx512vnni" {
                        assert!(direct_available(), "avx512vnni active but no direct kernel");
                    }
                    let got = run(case, per_channel, with_bias, 77 + ci as u64);
                    match &first {
                        None => first = Some((k.name(), got)),
                        Some((name, want)) => {
                            for (what, g, w) in [
                                ("y", &got.0, &want.0),
                                ("dx", &got.1, &want.1),
                                ("dw", &got.2, &want.2),
                            ] {
                                assert!(
                                    g == w,
                                    "{what} of {case:?} (per_channel={per_channel}, bias={with_bias}) differs between kernels {} and {name}",
                                    k.name()
                                );
                            }
                        }
                    }
                }
            }
        }
    }
    set_kernel(None).unwrap();
}
