//! The activation ranges of the producers that write signed or unclamped values, on the AVX2 and the
//! portable build of their loops: BatchNorm's in-place INT8-training forward (a linear bottleneck's
//! projection, no activation after it), the residual add, and ReLU with its mask into a new array. Each
//! range is exactly the largest magnitude of what the op wrote, describes that slice, and is `None` when a
//! NaN or an infinity is among the values (wherever it is: first, last, in a SIMD group or in the tail);
//! the values written are the same bits as the plain arithmetic. Its own test binary: the SIMD switch is
//! process-wide, so every test here holds [`SIMD`] while it flips it.

mod common;

use std::sync::Mutex;

use common::{amax, values, Rng};
use edgelearn_core::nn::{
    self, batchnorm2d_forward_inplace, batchnorm2d_forward_inplace_save_i8, relu_forward_mask,
    relu_mask_len, residual_add_inplace,
};
use edgelearn_core::octo::{self, Config, Layer};
use edgelearn_core::quant::ActRange;

static SIMD: Mutex<()> = Mutex::new(());

/// Runs `f` on the AVX2 build (where the CPU has it) and on the portable one.
fn on_both_builds(f: impl Fn(&str)) {
    let _guard = SIMD.lock().unwrap_or_else(|e| e.into_inner());
    for simd in [true, false] {
        nn::set_elementwise_simd(simd);
        f(if simd { "simd" } else { "portable" });
    }
    nn::set_elementwise_simd(true);
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|f| f.to_bits()).collect()
}

/// Lengths around the 8-lane groups and the 16384-value parallel chunks.
const SIZES: [usize; 14] = [
    0, 1, 7, 8, 9, 15, 16, 17, 33, 1000, 16383, 16385, 70_001, 300_000,
];

/// Where a bad value goes in `n` values: first, last, middle, the last full group of 8, the tail.
fn positions(n: usize) -> Vec<usize> {
    let mut at = vec![0, n - 1, n / 2, (n / 8 * 8).saturating_sub(1), n / 8 * 8];
    at.retain(|&i| i < n);
    at.dedup();
    at
}

#[test]
fn residual_add_range_is_the_sums_largest_magnitude() {
    on_both_builds(|build| {
        let mut rng = Rng(21);
        for n in SIZES {
            let a = values(&mut rng, n, 40.0);
            let b = values(&mut rng, n, 40.0);
            let mut out = a.clone();
            let r = residual_add_inplace(&mut out, &b).unwrap().unwrap();
            let want: Vec<f32> = a.iter().zip(&b).map(|(x, y)| x + y).collect();
            assert_eq!(bits(&out), bits(&want), "{build} n={n}: sums");
            assert_eq!(r.amax().to_bits(), amax(&out).to_bits(), "{build} n={n}");
            assert!(r.describes(&out));
            // -0.0 + -0.0 stays -0.0; its magnitude is 0
            let mut z = vec![-0.0f32; n];
            let r = residual_add_inplace(&mut z, &vec![-0.0f32; n])
                .unwrap()
                .unwrap();
            assert!(z.iter().all(|v| v.to_bits() == (-0.0f32).to_bits()));
            assert_eq!(r.amax().to_bits(), 0, "{build} n={n}: zeros");
        }
        for n in [16usize, 21, 70_001] {
            for at in positions(n) {
                for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
                    let (mut out, b) = (values(&mut rng, n, 1.0), values(&mut rng, n, 1.0));
                    out[at] = bad;
                    let r = residual_add_inplace(&mut out, &b).unwrap();
                    assert!(r.is_none(), "{build} n={n} at={at} {bad}");
                }
                // finite operands, an overflowing sum
                let (mut out, mut b) = (values(&mut rng, n, 1.0), values(&mut rng, n, 1.0));
                (out[at], b[at]) = (f32::MAX, f32::MAX);
                assert!(residual_add_inplace(&mut out, &b).unwrap().is_none());
                assert_eq!(out[at], f32::INFINITY);
            }
        }
    });
    let mut out = vec![0f32; 8];
    assert!(residual_add_inplace(&mut out, &[0f32; 7]).is_err());
}

/// BatchNorm's in-place INT8-training forward of `x` (its output is `x`), with its range.
fn batchnorm_save_i8(
    x: &mut [f32],
    shape: [usize; 4],
    gamma: &[f32],
    beta: &[f32],
) -> Option<ActRange> {
    let c = shape[1];
    let (mut rm, mut rv) = (vec![0f32; c], vec![1f32; c]);
    let (mut mean, mut invstd) = (vec![0f32; c], vec![0f32; c]);
    let mut xq = vec![0i8; x.len()];
    let (_, r) = batchnorm2d_forward_inplace_save_i8(
        x,
        shape,
        Some(gamma),
        Some(beta),
        &mut rm,
        &mut rv,
        0.1,
        1e-5,
        &mut mean,
        &mut invstd,
        &mut xq,
    )
    .unwrap();
    r
}

#[test]
fn batchnorm_range_is_the_outputs_largest_magnitude() {
    on_both_builds(|build| {
        let mut rng = Rng(9);
        for shape in [
            [2usize, 3, 5, 7],
            [2, 1, 1, 9],
            [3, 2, 4, 4],
            [4, 8, 16, 16],
            [32, 16, 28, 28],
            [2, 0, 4, 4],
        ] {
            let n: usize = shape.iter().product();
            let c = shape[1];
            let x = values(&mut rng, n, 6.0);
            let gamma = values(&mut rng, c, 4.0);
            let beta = values(&mut rng, c, 2.0);
            let mut y = x.clone();
            let r = batchnorm_save_i8(&mut y, shape, &gamma, &beta).unwrap();
            assert!(r.describes(&y), "{build} {shape:?}");
            assert_eq!(r.amax().to_bits(), amax(&y).to_bits(), "{build} {shape:?}");
            // the output is the plain in-place forward's, bit for bit
            let (mut rm, mut rv) = (vec![0f32; c], vec![1f32; c]);
            let (mut mean, mut invstd) = (vec![0f32; c], vec![0f32; c]);
            let mut want = x.clone();
            batchnorm2d_forward_inplace(
                &mut want,
                shape,
                Some(&gamma),
                Some(&beta),
                &mut rm,
                &mut rv,
                true,
                0.1,
                1e-5,
                &mut mean,
                &mut invstd,
            )
            .unwrap();
            assert_eq!(bits(&y), bits(&want), "{build} {shape:?}: output");
        }
        // an infinity at a chosen place: channel `ch` all zero but one S = 1e4 (mean S/m, invstd about
        // √m/S over its m values), so with γ = MAX/4 the factor a = γ·invstd stays finite, S·a ≈ γ√m
        // overflows and the zeros give the finite shift
        let shape = [2usize, 3, 5, 7];
        let (c, hw) = (shape[1], shape[2] * shape[3]);
        let plane_len = shape[0] * hw;
        for ch in [0, c - 1] {
            for at in positions(plane_len) {
                let mut x = values(&mut rng, shape.iter().product(), 2.0);
                for i in 0..shape[0] {
                    x[(i * c + ch) * hw..(i * c + ch + 1) * hw].fill(0.0);
                }
                x[((at / hw) * c + ch) * hw + at % hw] = 1e4;
                let mut gamma = vec![1f32; c];
                gamma[ch] = f32::MAX / 4.0;
                let beta = vec![0f32; c];
                let mut y = x.clone();
                let r = batchnorm_save_i8(&mut y, shape, &gamma, &beta);
                assert_eq!(y.iter().filter(|v| v.is_infinite()).count(), 1);
                assert!(r.is_none(), "{build} ch={ch} at={at}");
                // and a NaN shift makes the channel NaN
                let mut beta = vec![0f32; c];
                beta[ch] = f32::NAN;
                let mut y = x.clone();
                gamma[ch] = 1.0;
                assert!(batchnorm_save_i8(&mut y, shape, &gamma, &beta).is_none());
            }
        }
    });
}

#[test]
fn relu_mask_into_new_array_range_is_exact() {
    on_both_builds(|build| {
        let mut rng = Rng(5);
        for n in SIZES {
            let x = values(&mut rng, n, 20.0);
            let (mut y, mut m) = (vec![f32::NAN; n], vec![0u8; relu_mask_len(n)]);
            let r = relu_forward_mask(&x, &mut y, &mut m).unwrap().unwrap();
            let want: Vec<f32> = x.iter().map(|&v| if v < 0.0 { 0.0 } else { v }).collect();
            assert_eq!(bits(&y), bits(&want), "{build} n={n}");
            assert_eq!(r.amax().to_bits(), amax(&y).to_bits(), "{build} n={n}");
            assert!(r.describes(&y));
        }
        for n in [16usize, 21, 70_001] {
            for at in positions(n) {
                for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
                    let mut x = values(&mut rng, n, 1.0);
                    x[at] = bad;
                    let (mut y, mut m) = (vec![0f32; n], vec![0u8; relu_mask_len(n)]);
                    let r = relu_forward_mask(&x, &mut y, &mut m).unwrap();
                    // -inf becomes 0: a finite output
                    assert_eq!(
                        r.is_some(),
                        bad == f32::NEG_INFINITY,
                        "{build} n={n} at={at}"
                    );
                    if let Some(r) = r {
                        assert_eq!(r.amax(), amax(&y));
                    }
                }
            }
        }
    });
}

#[test]
fn layer_step_with_a_producers_range_is_the_step_without() {
    let mut rng = Rng(33);
    let (xs, ws) = ([4usize, 8, 12, 12], [6usize, 8, 1, 1]);
    let n: usize = xs.iter().product();
    let w = values(&mut rng, 48, 1.0);
    let mut x = values(&mut rng, n, 3.0);
    let r = residual_add_inplace(&mut x, &values(&mut rng, n, 3.0))
        .unwrap()
        .unwrap();
    let layer = Layer::Conv2d {
        stride: (1, 1),
        padding: (0, 0),
    };
    let ny = 4 * 6 * 12 * 12;
    let (mut y0, mut y1) = (vec![0f32; ny], vec![0f32; ny]);
    let c = Config::default();
    let s0 = octo::forward(
        layer, c, &x, &xs, &w, &ws, None, None, 5, true, None, &mut y0,
    )
    .unwrap();
    let s1 = octo::forward(
        layer,
        c,
        &x,
        &xs,
        &w,
        &ws,
        None,
        None,
        5,
        true,
        Some(&r),
        &mut y1,
    )
    .unwrap();
    assert_eq!((s0.sx.to_bits(), &s0.xq), (s1.sx.to_bits(), &s1.xq));
    assert_eq!(bits(&y0), bits(&y1));
}
