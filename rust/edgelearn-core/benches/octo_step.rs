//! One Octo INT8 conv layer step, forward + backward (`cargo bench -p edgelearn-core --bench octo_step`),
//! against the FP32 conv step of the same shape in the same run (the baseline of the INT8 claim).
//!
//! Shapes: the bundled CNN's second conv (batch 32, 16→32 channels, 14x14, 3x3, padding 1) and its first
//! (1→16 at 28x28). Threads: `EDGELEARN_NUM_THREADS` (default: all CPUs).

#[allow(dead_code)]
#[path = "../tests/common/mod.rs"]
mod common;

use std::hint::black_box;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion};
use edgelearn_core::nn::{conv2d_f32_backward, conv2d_f32_forward};
use edgelearn_core::octo::{self, Config, Grads, Layer};

/// Values in [-0.5, 0.5) from the tests' deterministic generator.
fn values(n: usize, seed: u64) -> Vec<f32> {
    let mut rng = common::Rng(seed);
    (0..n)
        .map(|_| (rng.next() >> 40) as f32 / (1u64 << 24) as f32 - 0.5)
        .collect()
}

fn bench_shape(c: &mut Criterion, name: &str, xs: [usize; 4], ws: [usize; 4]) {
    let layer = Layer::Conv2d {
        stride: (1, 1),
        padding: (1, 1),
    };
    let x = values(xs.iter().product(), 1);
    let w = values(ws.iter().product(), 2);
    let b = values(ws[0], 3);
    let ys = octo::output_shape(layer, &xs, &ws).unwrap();
    let ny: usize = ys.iter().product();
    let dy = values(ny, 4);
    let mut y = vec![0f32; ny];
    let mut dx = vec![0f32; x.len()];
    let mut dw = vec![0f32; w.len()];
    let mut db = vec![0f32; ws[0]];
    let cfg = Config::default();
    let mut g = c.benchmark_group(format!("conv_step/{name}"));
    g.sample_size(20)
        .measurement_time(Duration::from_secs(3))
        .warm_up_time(Duration::from_secs(1));
    let mut seed = 0u64;
    g.bench_function("int8_fwd_bwd", |bch| {
        bch.iter(|| {
            seed += 1;
            let saved = octo::forward(
                layer,
                cfg,
                &x,
                &xs,
                &w,
                &ws,
                Some(&b),
                None,
                seed,
                true,
                None,
                &mut y,
            )
            .unwrap();
            octo::backward(
                &saved,
                &dy,
                Grads {
                    dx: Some(&mut dx),
                    dw: Some(&mut dw),
                    db: Some(&mut db),
                    comp: None,
                },
            )
            .unwrap();
            black_box(&dw);
        })
    });
    g.bench_function("fp32_fwd_bwd", |bch| {
        bch.iter(|| {
            conv2d_f32_forward(&x, xs, &w, ws, Some(&b), (1, 1), (1, 1), &mut y).unwrap();
            conv2d_f32_backward(
                &x,
                xs,
                &w,
                ws,
                &dy,
                (1, 1),
                (1, 1),
                Some(&mut dx),
                &mut dw,
                &mut db,
            )
            .unwrap();
            black_box(&dw);
        })
    });
    g.finish();
}

fn benches(c: &mut Criterion) {
    bench_shape(c, "b32_16to32_14x14", [32, 16, 14, 14], [32, 16, 3, 3]);
    bench_shape(c, "b32_1to16_28x28", [32, 1, 28, 28], [16, 1, 3, 3]);
}

criterion_group!(octo_benches, benches);
criterion_main!(octo_benches);
