//! The AVX2 build of the element-wise loops (BatchNorm statistics and gradients, ReLU masks, 2x2 max
//! pooling) gives the
//! same bits as the portable build, on sizes that are not multiples of 8 or 512 (tails) and with NaN,
//! ±0 and negative values. Its own test binary: the switch is process-wide.

use edgelearn_core::{nn, quant};

struct Rng(u64);
impl Rng {
    fn f32s(&mut self, n: usize) -> Vec<f32> {
        (0..n)
            .map(|_| {
                self.0 = self
                    .0
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((self.0 >> 40) as f32 / (1u64 << 24) as f32) * 4.0 - 2.0
            })
            .collect()
    }
}

#[derive(Debug, PartialEq)]
struct Outputs {
    y: Vec<u32>,
    stats: Vec<u32>,
    dx: Vec<u32>,
    dx8: Vec<u32>,
    grads: Vec<u32>,
    relu: Vec<u32>,
    mask: Vec<u8>,
    pool: Vec<u32>,
    pool_idx: Vec<u8>,
    pool_dx: Vec<u32>,
    saved8: Vec<i8>,
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

fn run(shape: [usize; 4], seed: u64) -> Outputs {
    let [n, c, h, w] = shape;
    let len = n * c * h * w;
    let mut rng = Rng(seed);
    let x = rng.f32s(len);
    let dy = rng.f32s(len);
    let gamma = rng.f32s(c);
    let beta = rng.f32s(c);
    let (mut rm, mut rv) = (vec![0.1f32; c], vec![0.9f32; c]);
    let (mut mean, mut invstd) = (vec![0f32; c], vec![0f32; c]);
    let mut y = vec![0f32; len];
    nn::batchnorm2d_forward(
        &x,
        shape,
        Some(&gamma),
        Some(&beta),
        &mut rm,
        &mut rv,
        true,
        0.1,
        1e-5,
        &mut y,
        &mut mean,
        &mut invstd,
    )
    .unwrap();
    let (mut dx, mut dg, mut db) = (vec![0f32; len], vec![0f32; c], vec![0f32; c]);
    nn::batchnorm2d_backward(
        &dy,
        &x,
        shape,
        Some(&gamma),
        &mean,
        &invstd,
        &mut dx,
        &mut dg,
        &mut db,
    )
    .unwrap();
    let xq: Vec<i8> = x
        .iter()
        .map(|&v| (v * 60.0).round().clamp(-127.0, 127.0) as i8)
        .collect();
    let mut dx8 = dy.clone();
    let (mut dg8, mut db8) = (vec![0f32; c], vec![0f32; c]);
    nn::batchnorm2d_backward_i8_inplace(
        &mut dx8,
        &xq,
        1.0 / 60.0,
        shape,
        Some(&gamma),
        &mean,
        &invstd,
        &mut dg8,
        &mut db8,
    )
    .unwrap();
    // BatchNorm that also saves the input's int8 codes: exactly `quantize` (nearest) of the input, and
    // exactly the in-place forward's output and statistics
    let mut saved = x.clone();
    let (mut rm8, mut rv8) = (vec![0.1f32; c], vec![0.9f32; c]);
    let (mut mean8, mut invstd8) = (vec![0f32; c], vec![0f32; c]);
    let mut saved8 = vec![0i8; len];
    let (scale8, range8) = nn::batchnorm2d_forward_inplace_save_i8(
        &mut saved,
        shape,
        Some(&gamma),
        Some(&beta),
        &mut rm8,
        &mut rv8,
        0.1,
        1e-5,
        &mut mean8,
        &mut invstd8,
        &mut saved8,
    )
    .unwrap();
    let (want8, want_scale) =
        quant::quantize_per_tensor(&x, quant::Rounding::Nearest, quant::Clip::None).unwrap();
    assert_eq!(
        (saved8.clone(), scale8.to_bits()),
        (want8, want_scale.to_bits())
    );
    assert_eq!(
        [
            bits(&saved),
            bits(&mean8),
            bits(&invstd8),
            bits(&rm8),
            bits(&rv8)
        ],
        [bits(&y), bits(&mean), bits(&invstd), bits(&rm), bits(&rv)]
    );
    // and the range of what it wrote (the largest magnitude; tested at length in act_range_simd.rs)
    let amax = saved.iter().fold(0f32, |m, v| m.max(v.abs()));
    assert_eq!(range8.map(|r| r.amax().to_bits()), Some(amax.to_bits()));
    let mut relu = x.clone();
    relu[0] = f32::NAN;
    if len > 3 {
        relu[1] = -0.0;
        relu[2] = 0.0;
    }
    let mut mask = vec![0u8; nn::relu_mask_len(len)];
    nn::relu_forward_mask_inplace(&mut relu, &mut mask).unwrap();
    let mut back = dy.clone();
    nn::relu_backward_mask_inplace(&mut back, &mask).unwrap();
    // ReLU6: both bounds, with values at and beyond 6
    let mut relu6: Vec<f32> = relu.iter().zip(&x).map(|(_, &v)| v * 4.0).collect();
    relu6[0] = f32::NAN;
    if len > 3 {
        relu6[1] = 6.0;
        relu6[2] = -0.0;
    }
    let mut mask6 = vec![0u8; nn::relu_mask_len(len)];
    nn::relu6_forward_mask_inplace(&mut relu6, &mut mask6).unwrap();
    mask.extend(&mask6);
    relu.extend(&relu6);
    let mut grads = bits(&dg);
    grads.extend(bits(&db));
    grads.extend(bits(&dg8));
    grads.extend(bits(&db8));
    grads.extend(bits(&back));
    // 2x2 max pooling, with ties (quantised values), NaNs and -0.0 in the windows
    let mut px: Vec<f32> = x.iter().map(|&v| (v * 2.0).round() / 2.0).collect();
    for i in (0..len).step_by(7) {
        px[i] = f32::NAN;
    }
    for i in (3..len).step_by(11) {
        px[i] = -0.0;
    }
    let (mut pool, mut pool_idx, mut pool_dx) = (Vec::new(), Vec::new(), Vec::new());
    if h >= 2 && w >= 2 {
        let win = nn::Window2d::new((2, 2), (2, 2), (0, 0));
        let out = n * c * (h / 2) * (w / 2);
        let (mut y2, mut idx) = (vec![0f32; out], vec![0u8; out]);
        nn::maxpool2d_forward(&px, shape, win, &mut y2, &mut idx).unwrap();
        let mut dx2 = vec![f32::NAN; len];
        nn::maxpool2d_backward(&dy[..out], &idx, shape, win, &mut dx2).unwrap();
        (pool, pool_idx, pool_dx) = (bits(&y2), idx, bits(&dx2));
    }
    let mut stats = bits(&mean);
    stats.extend(bits(&invstd));
    stats.extend(bits(&rm));
    stats.extend(bits(&rv));
    Outputs {
        y: bits(&y),
        stats,
        dx: bits(&dx),
        dx8: bits(&dx8),
        grads,
        relu: bits(&relu),
        mask,
        pool,
        pool_idx,
        pool_dx,
        saved8,
    }
}

#[test]
fn avx2_and_portable_builds_give_the_same_bits() {
    for (i, shape) in [
        [2, 3, 7, 5],
        [2, 3, 9, 35],
        [1, 2, 4, 64],
        [3, 2, 29, 31],
        [2, 1, 1, 1],
        [4, 5, 8, 8],
        [2, 1, 1, 1030],
        [2, 2, 14, 14],
        [1, 2, 28, 28],
        [3, 7, 4, 4],
        [2, 9, 6, 4],
        [2, 300, 4, 4],
        [2, 600, 2, 2],
    ]
    .into_iter()
    .enumerate()
    {
        nn::set_elementwise_simd(true);
        let fast = run(shape, i as u64 + 1);
        nn::set_elementwise_simd(false);
        let portable = run(shape, i as u64 + 1);
        assert_eq!(fast, portable, "shape {shape:?}");
    }
    nn::set_elementwise_simd(true);
}

/// BatchNorm's statistics and gradient sums are taken per image in the pool and reduced in image order
/// (and ReLU and pooling are element-wise): every output is the same on 1, 2 and 3 threads, SIMD or
/// portable, on a shape above the parallel threshold (2^16 elements) with odd sizes.
#[test]
fn results_do_not_depend_on_the_thread_count() {
    use edgelearn_core::threads;
    let before = threads::num_threads();
    for simd in [true, false] {
        nn::set_elementwise_simd(simd);
        let outs: Vec<Outputs> = [1, 2, 3]
            .into_iter()
            .map(|t| {
                threads::set_num_threads(t).unwrap();
                run([9, 5, 37, 41], 11)
            })
            .collect();
        assert!(
            outs.windows(2).all(|w| w[0] == w[1]),
            "simd {simd}: results depend on the thread count"
        );
    }
    threads::set_num_threads(before).unwrap();
    nn::set_elementwise_simd(true);
}

#[test]
fn batchnorm_saving_int8_rejects_non_finite_input_like_quantize() {
    let shape = [2, 3, 4, 5];
    let mut x = Rng(5).f32s(120);
    x[77] = f32::NAN;
    let c = shape[1];
    let (mut rm, mut rv, mut mean, mut invstd) =
        (vec![0.0; c], vec![1.0; c], vec![0.0; c], vec![0.0; c]);
    let mut xq = vec![0i8; 120];
    let want =
        quant::quantize_per_tensor(&x, quant::Rounding::Nearest, quant::Clip::None).unwrap_err();
    let got = nn::batchnorm2d_forward_inplace_save_i8(
        &mut x,
        shape,
        None,
        None,
        &mut rm,
        &mut rv,
        0.1,
        1e-5,
        &mut mean,
        &mut invstd,
        &mut xq,
    )
    .unwrap_err();
    assert_eq!(got, want);
    assert_eq!(
        got.to_string(),
        "x: contains non-finite values (NaN or infinity) at index 77"
    );
}
