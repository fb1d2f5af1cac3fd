//! INT8 GEMM throughput (`cargo bench -p edgelearn-core --bench gemm`), in ops/s with 2·M·N·K ops per GEMM.
//!
//! - square sizes 256³ … 2048³ with the active kernel (`EDGELEARN_KERNEL` forces one), and the scalar
//!   kernel at the small sizes as a baseline;
//! - the six training shapes (M, K, N) of the INT8 convolution/linear passes, with A row-major (C order,
//!   as in `Y = X·Wᵀ`, `dX = dY·W`) and column-major (F order, as `dYᵀ` is in `dW = dYᵀ·X`).
//!
//! Threads: `EDGELEARN_NUM_THREADS` (default: all CPUs). Kept short (10 samples, 2 s) so the whole run takes
//! a few minutes.

use std::hint::black_box;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use edgelearn_core::gemm::{active_kernel, gemm_i8_with, kernel_by_name, Blocking, Kernel, MatRef};

const SQUARE: &[usize] = &[256, 512, 1024, 2048];
const SCALAR_UP_TO: usize = 512;
/// (M, K, N) of the training GEMMs.
const TRAINING: &[(usize, usize, usize)] = &[
    (32768, 27, 16),
    (32768, 144, 32),
    (8192, 288, 64),
    (144, 8192, 32),
    (64, 784, 256),
    (784, 64, 256),
];

/// Deterministic pseudo-random bytes covering the whole i8 range (including -128).
fn bytes(n: usize, seed: u64) -> Vec<i8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as i8
        })
        .collect()
}

#[derive(Clone, Copy)]
enum Order {
    C,
    F,
}

fn bench_one(
    c: &mut Criterion,
    group: &str,
    kernel: &dyn Kernel,
    (m, k, n): (usize, usize, usize),
    a_order: Order,
) {
    let a = bytes(m * k, 1);
    let b = bytes(k * n, 2);
    let av = match a_order {
        Order::C => MatRef::row_major(&a, m, k),
        Order::F => MatRef::col_major(&a, m, k),
    }
    .unwrap();
    let bv = MatRef::row_major(&b, k, n).unwrap();
    let mut out = vec![0i32; m * n];
    let mut g = c.benchmark_group(group);
    g.sample_size(10)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2));
    g.throughput(Throughput::Elements(2 * (m * n * k) as u64));
    let order = match a_order {
        Order::C => "A=C",
        Order::F => "A=F",
    };
    g.bench_with_input(
        BenchmarkId::new(kernel.name(), format!("{m}x{k}x{n}/{order}")),
        &(),
        |bch, _| {
            bch.iter(|| {
                gemm_i8_with(
                    kernel,
                    Blocking::default(),
                    black_box(&av),
                    black_box(&bv),
                    &mut out,
                )
                .unwrap()
            })
        },
    );
    g.finish();
}

fn square(c: &mut Criterion) {
    let active = active_kernel().expect("no usable kernel (check EDGELEARN_KERNEL)");
    let scalar = kernel_by_name("scalar").unwrap();
    for &s in SQUARE {
        bench_one(c, "gemm_i8_square", active, (s, s, s), Order::C);
        if s <= SCALAR_UP_TO && active.name() != scalar.name() {
            bench_one(c, "gemm_i8_square", scalar, (s, s, s), Order::C);
        }
    }
}

fn training(c: &mut Criterion) {
    let active = active_kernel().expect("no usable kernel (check EDGELEARN_KERNEL)");
    for &shape in TRAINING {
        bench_one(c, "gemm_i8_training", active, shape, Order::C);
        bench_one(c, "gemm_i8_training", active, shape, Order::F);
    }
}

criterion_group!(benches, square, training);
criterion_main!(benches);
