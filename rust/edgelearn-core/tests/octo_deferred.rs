//! The Octo backward in two parts (`backward_input`, then `weight_grad`, as the Python glue runs them with
//! `dW` on another thread) gives what the one-call `backward` gives, bit for bit, for every layer kind, with
//! `dW` computed on the same thread, on a worker (`threads::defer`) and whatever the thread count. Its own
//! test binary, since the thread count is process-wide.

use edgelearn_core::nn::GroupedParams;
use edgelearn_core::octo::{self, Compensation, Config, Grads, Layer};
use edgelearn_core::threads;
use std::sync::Arc;

/// Uniform values in `[-scale/2, scale/2)` from a 64-bit LCG state.
fn values(rng: &mut u64, n: usize, scale: f32) -> Vec<f32> {
    (0..n)
        .map(|_| {
            *rng = rng
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((*rng >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * scale
        })
        .collect()
}

struct Out {
    dx: Vec<f32>,
    dw: Vec<f32>,
    db: Vec<f32>,
    dcomp: [Vec<f32>; 3],
}

/// Forward, then backward as one call (`split` false) or in two parts with `dW` deferred.
fn step(layer: Layer, xs: &[usize], ws: &[usize], split: bool) -> Out {
    let mut rng = xs.iter().product::<usize>() as u64 + 17;
    let x = values(&mut rng, xs.iter().product(), 4.0);
    let w = values(&mut rng, ws.iter().product(), 0.5);
    let o = ws[0];
    let b = values(&mut rng, o, 0.1);
    let (alpha, mu, beta) = (
        values(&mut rng, o, 1.0),
        values(&mut rng, o, 1.0),
        values(&mut rng, o, 1.0),
    );
    let comp = Compensation {
        alpha: &alpha,
        mu: &mu,
        beta: &beta,
    };
    let ys = octo::output_shape(layer, xs, ws).unwrap();
    let mut y = vec![0f32; ys.iter().product()];
    let cfg = Config::default();
    let saved = octo::forward(
        layer,
        cfg,
        &x,
        xs,
        &w,
        ws,
        Some(&b),
        Some(comp),
        7,
        true,
        None,
        &mut y,
    )
    .unwrap();
    let dy = values(&mut rng, y.len(), 0.02);
    let mut out = Out {
        dx: vec![0f32; x.len()],
        dw: vec![0f32; w.len()],
        db: vec![0f32; o],
        dcomp: [vec![0f32; o], vec![0f32; o], vec![0f32; o]],
    };
    let [da, dm, dbeta] = &mut out.dcomp;
    let mut grads = Grads {
        dx: Some(&mut out.dx),
        dw: None,
        db: Some(&mut out.db),
        comp: Some((da, dm, dbeta)),
    };
    if !split {
        grads.dw = Some(&mut out.dw);
        octo::backward(&saved, &dy, grads).unwrap();
        return out;
    }
    let codes = octo::backward_input(&saved, &dy, grads).unwrap();
    let saved = Arc::new(saved);
    let job = {
        let saved = Arc::clone(&saved);
        threads::defer(move || {
            let mut dw = vec![0f32; saved.wq.len()];
            octo::weight_grad(&saved, &codes, &mut dw)?;
            Ok(dw)
        })
    };
    out.dw = job.wait().unwrap();
    out
}

#[test]
fn deferred_weight_gradient_is_the_one_call_backward_bit_for_bit() {
    let cases: Vec<(Layer, Vec<usize>, Vec<usize>)> = vec![
        (Layer::Linear, vec![6, 20], vec![5, 20]),
        // padded grid (dX as the transposed convolution), 1-channel grid dW, small-plane, strided im2col
        (
            Layer::Conv2d {
                stride: (1, 1),
                padding: (1, 1),
            },
            vec![3, 8, 7, 7],
            vec![6, 8, 3, 3],
        ),
        (
            Layer::Conv2d {
                stride: (1, 1),
                padding: (1, 1),
            },
            vec![3, 4, 2, 2],
            vec![8, 4, 3, 3],
        ),
        (
            Layer::Conv2d {
                stride: (2, 2),
                padding: (1, 1),
            },
            vec![2, 3, 9, 9],
            vec![4, 3, 3, 3],
        ),
        (
            Layer::GroupedConv2d(GroupedParams::new(2, (1, 1), (1, 1), (1, 1))),
            vec![2, 4, 6, 6],
            vec![6, 2, 3, 3],
        ),
    ];
    for threads_n in [1, 2] {
        threads::set_num_threads(threads_n).unwrap();
        for (i, (layer, xs, ws)) in cases.iter().enumerate() {
            let one = step(*layer, xs, ws, false);
            let two = step(*layer, xs, ws, true);
            assert_eq!(one.dx, two.dx, "dx, case {i}, {threads_n} threads");
            assert_eq!(one.dw, two.dw, "dw, case {i}, {threads_n} threads");
            assert_eq!(one.db, two.db, "db, case {i}, {threads_n} threads");
            assert_eq!(one.dcomp, two.dcomp, "compensation, case {i}");
        }
    }
}

#[test]
fn backward_input_refuses_a_weight_gradient_output() {
    let (xs, ws) = ([2usize, 3], [4usize, 3]);
    let x = vec![0.5f32; 6];
    let w = vec![0.25f32; 12];
    let mut y = vec![0f32; 8];
    let saved = octo::forward(
        Layer::Linear,
        Config::default(),
        &x,
        &xs,
        &w,
        &ws,
        None,
        None,
        1,
        true,
        None,
        &mut y,
    )
    .unwrap();
    let mut dw = vec![0f32; 12];
    let grads = Grads {
        dx: None,
        dw: Some(&mut dw),
        db: None,
        comp: None,
    };
    let err = octo::backward_input(&saved, &[0.1f32; 8], grads)
        .err()
        .expect("an error");
    assert!(err.to_string().starts_with("dw:"), "{err}");
}
