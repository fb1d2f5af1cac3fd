//! SGQ codec throughput (`cargo bench -p edgelearn-core --bench sgq`), in bytes of float32 input per
//! second, on a 64×32×32×32 feature tensor (post-ReLU-like values with per-channel scales):
//! encode and decode at b = 2, 4, 8 in mode sgq, the uniform and fp16 baselines at 4 bits / 16 bits,
//! and a plain `copy_from_slice` of the same tensor as the memory-bandwidth reference.
//!
//! Threads: `EDGELEARN_NUM_THREADS` (default: all CPUs); per-core numbers need `EDGELEARN_NUM_THREADS=1`.

use std::hint::black_box;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use edgelearn_core::sgq::{self, Mode, Settings, Shape};

const SHAPE: Shape = Shape {
    n: 64,
    c: 32,
    h: 32,
    w: 32,
};

fn features() -> Vec<f32> {
    let mut s = 0x1234_5678_9abc_def1u64;
    let plane = SHAPE.h * SHAPE.w;
    (0..SHAPE.n * SHAPE.c * plane)
        .map(|i| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            let scale = 0.1 + ((i / plane) % SHAPE.c) as f32 * 0.2;
            let v = ((s >> 40) as f32 / (1u64 << 24) as f32 - 0.3) * scale;
            v.max(0.0)
        })
        .collect()
}

fn bench(c: &mut Criterion) {
    let x = features();
    let bytes = (x.len() * 4) as u64;
    let mut g = c.benchmark_group("sgq");
    g.sample_size(20)
        .measurement_time(Duration::from_secs(2))
        .warm_up_time(Duration::from_millis(500));
    g.throughput(Throughput::Bytes(bytes));
    let mut copy = vec![0f32; x.len()];
    g.bench_function("memcpy", |b| b.iter(|| copy.copy_from_slice(black_box(&x))));
    let configs: Vec<(String, Settings)> = [2u8, 4, 8]
        .iter()
        .map(|&bits| {
            (
                format!("sgq-b{bits}"),
                Settings {
                    bits,
                    ..Settings::default()
                },
            )
        })
        .chain([
            (
                "uniform-b4".to_string(),
                Settings {
                    mode: Mode::Uniform,
                    ..Settings::default()
                },
            ),
            (
                "fp16".to_string(),
                Settings {
                    mode: Mode::Fp16,
                    ..Settings::default()
                },
            ),
        ])
        .collect();
    for (name, settings) in &configs {
        let frame = sgq::encode(&x, SHAPE, 4, settings, None).unwrap();
        g.bench_with_input(BenchmarkId::new("encode", name), settings, |b, s| {
            b.iter(|| sgq::encode(black_box(&x), SHAPE, 4, s, None).unwrap())
        });
        g.bench_with_input(BenchmarkId::new("decode", name), &frame, |b, f| {
            b.iter(|| sgq::decode(black_box(f)).unwrap())
        });
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
