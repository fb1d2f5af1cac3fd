//! The Octo INT8 layer step (`edgelearn_core::octo`) against the FP32 step on its dequantized operands:
//! the forward output is the FP32 layer of `sx·Xq` and `sw·Wq` plus the fused bias, and backward's
//! gradients are the FP32 gradients of that layer for the dequantized, PRC-clipped gradient `sdy·dYq`,
//! up to float32 rounding. Codes and scales are checked against `quant::quantize_into` with the seeds
//! the step documents. Linear and Conv2d, per-tensor and per-channel weights, both PRC modes.

mod common;

use common::Rng;
use edgelearn_core::nn::{
    conv2d_f32_backward, conv2d_f32_forward, conv2d_grouped_f32_backward,
    conv2d_grouped_f32_forward, matmul_f32, GroupedParams, MatF32,
};
use edgelearn_core::octo::{self, Compensation, Config, Grads, Layer, RoundMode, GRAD_SEED_XOR};
use edgelearn_core::quant::{quantize_into, Clip, Layout, Rounding};

fn normals(rng: &mut Rng, n: usize, scale: f32) -> Vec<f32> {
    (0..n)
        .map(|_| {
            // sum of 4 uniforms: bell-shaped, with some tails
            let s: f32 = (0..4)
                .map(|_| (rng.next() >> 40) as f32 / (1u64 << 24) as f32)
                .sum();
            (s - 2.0) * scale
        })
        .collect()
}

fn quant(x: &[f32], layout: Layout, r: Rounding, clip: Clip) -> (Vec<i8>, Vec<f32>) {
    let mut q = vec![0i8; x.len()];
    let mut s = vec![0f32; layout.channels];
    quantize_into(x, layout, r, clip, &mut q, &mut s).unwrap();
    (q, s)
}

fn deq(q: &[i8], s: &[f32], per: usize) -> Vec<f32> {
    q.iter()
        .enumerate()
        .map(|(i, &v)| v as f32 * s[if s.len() == 1 { 0 } else { i / per }])
        .collect()
}

#[track_caller]
fn close(name: &str, got: &[f32], want: &[f32]) {
    assert_eq!(got.len(), want.len(), "{name}: length");
    let amax = want.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-30);
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!(
            (g - w).abs() <= 2e-5 * amax,
            "{name}[{i}]: {g} vs {w} (max |ref| {amax})"
        );
    }
}

struct Case {
    layer: Layer,
    x_shape: Vec<usize>,
    w_shape: Vec<usize>,
    config: Config,
}

fn run(case: &Case, seed: u64) {
    let mut rng = Rng(seed);
    let nx: usize = case.x_shape.iter().product();
    let nw: usize = case.w_shape.iter().product();
    let o = case.w_shape[0];
    let x = normals(&mut rng, nx, 1.0);
    let w = normals(&mut rng, nw, 0.3);
    let bias = normals(&mut rng, o, 0.1);
    let (alpha, mu, beta) = (
        normals(&mut rng, o, 1.0),
        normals(&mut rng, o, 0.1),
        normals(&mut rng, o, 0.1),
    );
    let comp = Compensation {
        alpha: &alpha,
        mu: &mu,
        beta: &beta,
    };
    let y_shape = octo::output_shape(case.layer, &case.x_shape, &case.w_shape).unwrap();
    let ny: usize = y_shape.iter().product();
    let mut y = vec![0f32; ny];
    let step_seed = seed.wrapping_mul(31) + 7;
    let saved = octo::forward(
        case.layer,
        case.config,
        &x,
        &case.x_shape,
        &w,
        &case.w_shape,
        Some(&bias),
        Some(comp),
        step_seed,
        true,
        None,
        &mut y,
    )
    .unwrap();

    // codes and scales: quantize_into with the documented seeds
    let act = match case.config.act_rounding {
        RoundMode::Nearest => Rounding::Nearest,
        RoundMode::Stochastic => Rounding::Stochastic { seed: step_seed },
    };
    let (xq, sx) = quant(&x, Layout::per_tensor(nx), act, Clip::None);
    assert_eq!(saved.xq, xq);
    assert_eq!(saved.sx, sx[0]);
    let wl = if case.config.per_channel_weights {
        Layout::from_shape(&case.w_shape, Some(0), "w").unwrap()
    } else {
        Layout::per_tensor(nw)
    };
    let (wq, sw) = quant(&w, wl, Rounding::Nearest, Clip::None);
    assert_eq!(saved.wq, wq);
    assert_eq!(saved.sw, sw);
    let xd = deq(&xq, &sx, nx);
    let wd = deq(&wq, &sw, nw / o);
    let shift: Vec<f32> = (0..o)
        .map(|i| alpha[i] * mu[i] + beta[i] + bias[i])
        .collect();

    // forward = FP32 layer of the dequantized operands
    let mut y_ref = vec![0f32; ny];
    match case.layer {
        Layer::Linear => {
            let (n, k) = (case.x_shape[0], case.x_shape[1]);
            let xm = MatF32::row_major(&xd, n, k).unwrap();
            let wm = MatF32::row_major(&wd, o, k).unwrap();
            matmul_f32(&xm, &wm.t(), Some(&shift), &mut y_ref).unwrap();
        }
        Layer::Conv2d { stride, padding } => {
            let xs: [usize; 4] = case.x_shape[..].try_into().unwrap();
            let ws: [usize; 4] = case.w_shape[..].try_into().unwrap();
            conv2d_f32_forward(&xd, xs, &wd, ws, Some(&shift), stride, padding, &mut y_ref)
                .unwrap();
        }
        Layer::GroupedConv2d(p) => {
            let xs: [usize; 4] = case.x_shape[..].try_into().unwrap();
            let ws: [usize; 4] = case.w_shape[..].try_into().unwrap();
            conv2d_grouped_f32_forward(&xd, xs, &wd, ws, Some(&shift), p, &mut y_ref).unwrap();
        }
    }
    close("y", &y, &y_ref);

    // backward = FP32 gradients for the dequantized, clipped gradient
    let dy = normals(&mut rng, ny, 0.01);
    let grad_r = match case.config.grad_rounding {
        RoundMode::Nearest => Rounding::Nearest,
        RoundMode::Stochastic => Rounding::Stochastic {
            seed: step_seed ^ GRAD_SEED_XOR,
        },
    };
    let (gq, sg) = quant(&dy, Layout::per_tensor(ny), grad_r, case.config.prc);
    let gd = deq(&gq, &sg, ny);
    let (mut dx, mut dw, mut db) = (vec![0f32; nx], vec![0f32; nw], vec![0f32; o]);
    let (mut da, mut dm, mut dbeta) = (vec![0f32; o], vec![0f32; o], vec![0f32; o]);
    octo::backward(
        &saved,
        &dy,
        Grads {
            dx: Some(&mut dx),
            dw: Some(&mut dw),
            db: Some(&mut db),
            comp: Some((&mut da, &mut dm, &mut dbeta)),
        },
    )
    .unwrap();
    let (mut dx_ref, mut dw_ref, mut db_q) = (vec![0f32; nx], vec![0f32; nw], vec![0f32; o]);
    match case.layer {
        Layer::Linear => {
            let (n, k) = (case.x_shape[0], case.x_shape[1]);
            let gm = MatF32::row_major(&gd, n, o).unwrap();
            matmul_f32(
                &gm,
                &MatF32::row_major(&wd, o, k).unwrap(),
                None,
                &mut dx_ref,
            )
            .unwrap();
            matmul_f32(
                &gm.t(),
                &MatF32::row_major(&xd, n, k).unwrap(),
                None,
                &mut dw_ref,
            )
            .unwrap();
        }
        Layer::Conv2d { stride, padding } => {
            let xs: [usize; 4] = case.x_shape[..].try_into().unwrap();
            let ws: [usize; 4] = case.w_shape[..].try_into().unwrap();
            conv2d_f32_backward(
                &xd,
                xs,
                &wd,
                ws,
                &gd,
                stride,
                padding,
                Some(&mut dx_ref),
                &mut dw_ref,
                &mut db_q,
            )
            .unwrap();
        }
        Layer::GroupedConv2d(p) => {
            let xs: [usize; 4] = case.x_shape[..].try_into().unwrap();
            let ws: [usize; 4] = case.w_shape[..].try_into().unwrap();
            conv2d_grouped_f32_backward(
                &xd,
                xs,
                &wd,
                ws,
                &gd,
                p,
                Some(&mut dx_ref),
                &mut dw_ref,
                &mut db_q,
            )
            .unwrap();
        }
    }
    close("dx", &dx, &dx_ref);
    close("dw", &dw, &dw_ref);
    // Σ dY of the FP32 (unclipped) gradient, in f64
    let per = ny / (y_shape[0] * o);
    let mut sums = vec![0f64; o];
    for (i, &v) in dy.iter().enumerate() {
        sums[(i / per) % o] += v as f64;
    }
    let sums: Vec<f32> = sums.iter().map(|&s| s as f32).collect();
    close("db", &db, &sums);
    let want_da: Vec<f32> = (0..o).map(|i| db[i] * mu[i]).collect();
    let want_dm: Vec<f32> = (0..o).map(|i| db[i] * alpha[i]).collect();
    assert_eq!(da, want_da);
    assert_eq!(dm, want_dm);
    assert_eq!(dbeta, db);
}

fn configs() -> Vec<Config> {
    let base = Config::default();
    vec![
        base,
        Config {
            per_channel_weights: true,
            ..base
        },
        Config {
            prc: Clip::Sigma { z: 2.576 },
            grad_rounding: RoundMode::Nearest,
            ..base
        },
        Config {
            prc: Clip::None,
            act_rounding: RoundMode::Nearest,
            ..base
        },
    ]
}

#[test]
fn linear_step_is_the_fp32_step_of_the_dequantized_operands() {
    for (i, config) in configs().into_iter().enumerate() {
        for (n, k, o) in [(5, 7, 3), (32, 64, 10), (1, 1, 1)] {
            let case = Case {
                layer: Layer::Linear,
                x_shape: vec![n, k],
                w_shape: vec![o, k],
                config,
            };
            run(&case, 100 + i as u64 * 10 + n as u64);
        }
    }
}

#[test]
fn conv_step_is_the_fp32_step_of_the_dequantized_operands() {
    let geoms = [
        // (x shape, w shape, stride, padding): padded grid, strided im2col, pointwise, wider, and a 4x4
        // map (the small-plane algorithm with per-tensor weight scales)
        (
            [3usize, 3, 9, 9],
            [8usize, 3, 3, 3],
            (1usize, 1usize),
            (1usize, 1usize),
        ),
        ([2, 4, 8, 7], [5, 4, 3, 3], (2, 2), (1, 0)),
        ([2, 6, 5, 5], [4, 6, 1, 1], (1, 1), (0, 0)),
        ([4, 16, 7, 7], [32, 16, 3, 3], (1, 1), (1, 1)),
        ([3, 4, 4, 4], [6, 4, 3, 3], (1, 1), (1, 1)),
        // 16x16 output planes: the channel sums of dY and its range in one pass
        ([2, 2, 16, 16], [3, 2, 3, 3], (1, 1), (1, 1)),
    ];
    for (i, config) in configs().into_iter().enumerate() {
        for (j, (xs, ws, stride, padding)) in geoms.iter().enumerate() {
            let case = Case {
                layer: Layer::Conv2d {
                    stride: *stride,
                    padding: *padding,
                },
                x_shape: xs.to_vec(),
                w_shape: ws.to_vec(),
                config,
            };
            run(&case, 1000 + (i * 10 + j) as u64);
        }
    }
}

#[test]
fn grouped_conv_step_is_the_fp32_step_of_the_dequantized_operands() {
    let geoms = [
        // (x shape, w shape, groups, stride, padding, dilation): depthwise, multiplier 2 at stride 2,
        // grouped, dilated depthwise
        (
            [2usize, 8, 9, 9],
            [8usize, 1, 3, 3],
            8usize,
            1usize,
            1usize,
            1usize,
        ),
        ([2, 4, 9, 9], [8, 1, 3, 3], 4, 2, 1, 1),
        ([2, 6, 7, 7], [4, 3, 3, 3], 2, 1, 1, 1),
        ([1, 4, 10, 10], [4, 1, 3, 3], 4, 1, 2, 2),
    ];
    for (i, config) in configs().into_iter().enumerate() {
        for (j, &(xs, ws, g, s, p, d)) in geoms.iter().enumerate() {
            let case = Case {
                layer: Layer::GroupedConv2d(GroupedParams::new(g, (s, s), (p, p), (d, d))),
                x_shape: xs.to_vec(),
                w_shape: ws.to_vec(),
                config,
            };
            run(&case, 5000 + (i * 10 + j) as u64);
        }
    }
}

#[test]
fn layer_step_rejects_bad_shapes_without_panicking() {
    let cfg = Config::default();
    let mut y = vec![0f32; 6];
    let e = octo::forward(
        Layer::Linear,
        cfg,
        &[0.0; 6],
        &[2, 3],
        &[0.0; 8],
        &[2, 4],
        None,
        None,
        0,
        true,
        None,
        &mut y,
    );
    assert!(e.is_err());
    let conv = Layer::Conv2d {
        stride: (1, 1),
        padding: (0, 0),
    };
    let e = octo::forward(
        conv,
        cfg,
        &[0.0; 6],
        &[2, 3],
        &[0.0; 6],
        &[2, 3],
        None,
        None,
        0,
        true,
        None,
        &mut y,
    );
    assert!(e.is_err());
    let x = [1.0f32, -2.0, 0.5, 3.0, 0.0, 1.0];
    let w = [0.5f32, -1.0, 2.0, 0.25, 1.0, -0.5];
    let saved = octo::forward(
        Layer::Linear,
        cfg,
        &x,
        &[2, 3],
        &w,
        &[2, 3],
        None,
        None,
        0,
        true,
        None,
        &mut y[..4],
    )
    .unwrap();
    let mut dw = vec![0f32; 6];
    let bad = octo::backward(
        &saved,
        &[0.0; 3],
        Grads {
            dx: None,
            dw: Some(&mut dw),
            db: None,
            comp: None,
        },
    );
    assert!(bad.is_err());
    let mut da = [0f32; 2];
    let (mut dm, mut dbt) = ([0f32; 2], [0f32; 2]);
    let no_comp = octo::backward(
        &saved,
        &[0.0; 4],
        Grads {
            dx: None,
            dw: None,
            db: None,
            comp: Some((&mut da, &mut dm, &mut dbt)),
        },
    );
    assert!(
        no_comp.is_err(),
        "Compensation gradients without a fused Compensation"
    );
}
