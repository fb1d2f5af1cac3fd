//! The AVX2 build of the patch-skip runner's element-wise loops (the requantizing of changed INT8
//! inputs, the fused bias / affine / ReLU / ReLU6 epilogue written while bands are scattered into the
//! caches) gives the same bits and the same statistics as the portable build: a uint8 stream through
//! FP32 and INT8 convs of stride 1 and 2 whose stages end in every epilogue pattern (none, ReLU, ReLU6,
//! affine, affine + ReLU, affine + ReLU6, two affines with or without a ReLU, and longer lists), on a
//! frame whose sides are not multiples of the patch or of 8. Its own test binary: the switch is
//! process-wide.

use edgelearn_core::nn;
use edgelearn_core::patchskip::{Layer, PatchSkip, PatchSkipConfig, U8Input};
use edgelearn_core::quant::{quantize_nearest_with_scale, scale_for_absmax};

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> f32 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (self.0 >> 40) as f32 / (1u64 << 24) as f32
    }
    fn vec(&mut self, n: usize, lo: f32, hi: f32) -> Vec<f32> {
        (0..n).map(|_| lo + (hi - lo) * self.next()).collect()
    }
}

fn conv(rng: &mut Rng, o: usize, c: usize, k: usize, s: usize, int8: bool) -> Layer {
    let weight = rng.vec(o * c * k * k, -0.5, 0.5);
    let bias = Some(rng.vec(o, -0.5, 0.5));
    let (stride, padding, groups, dilation) = ((s, s), (k / 2, k / 2), 1, (1, 1));
    if int8 {
        let sw = scale_for_absmax(weight.iter().fold(0.0f32, |m, v| m.max(v.abs())));
        let mut wq = vec![0i8; weight.len()];
        quantize_nearest_with_scale(&weight, sw, &mut wq).unwrap();
        Layer::Conv2dInt8 {
            wq,
            sw: vec![sw],
            shape: [o, c, k, k],
            bias,
            stride,
            padding,
            groups,
            dilation,
        }
    } else {
        Layer::Conv2d {
            weight,
            shape: [o, c, k, k],
            bias,
            stride,
            padding,
            groups,
            dilation,
        }
    }
}

fn affine(rng: &mut Rng, c: usize) -> Layer {
    Layer::Affine {
        a: rng.vec(c, 0.5, 1.5),
        b: rng.vec(c, -0.5, 0.5),
    }
}

fn net(int8: bool) -> Vec<Layer> {
    let mut rng = Rng(3);
    let bn = |rng: &mut Rng, c: usize| Layer::BatchNorm2d {
        gamma: rng.vec(c, 0.5, 1.5),
        beta: rng.vec(c, -0.5, 0.5),
        mean: rng.vec(c, -0.2, 0.2),
        var: rng.vec(c, 0.5, 1.5),
        eps: 1e-5,
    };
    let mut v = vec![
        conv(&mut rng, 8, 3, 3, 1, int8),
        bn(&mut rng, 8),
        Layer::Relu,
    ];
    v.extend([
        conv(&mut rng, 8, 8, 3, 2, int8),
        affine(&mut rng, 8),
        Layer::Relu6,
    ]);
    v.extend([conv(&mut rng, 8, 8, 3, 1, int8), Layer::Relu6]);
    v.extend([conv(&mut rng, 8, 8, 3, 1, int8), affine(&mut rng, 8)]);
    // an Octo conv's compensation then batch norm (two affines), with and without a ReLU after them
    v.extend([
        conv(&mut rng, 8, 8, 3, 1, int8),
        affine(&mut rng, 8),
        bn(&mut rng, 8),
    ]);
    v.extend([
        conv(&mut rng, 8, 8, 3, 2, int8),
        affine(&mut rng, 8),
        bn(&mut rng, 8),
        Layer::Relu,
    ]);
    v.extend([conv(&mut rng, 8, 8, 3, 1, int8), Layer::Relu]);
    v.extend([
        conv(&mut rng, 8, 8, 3, 1, int8),
        Layer::Relu,
        affine(&mut rng, 8),
    ]);
    v.push(conv(&mut rng, 5, 8, 1, 1, int8));
    v
}

/// Output bits and the gate's statistics of a moving-blob uint8 stream.
fn run(int8: bool) -> Vec<(Vec<u32>, f64, Vec<f64>, f64, bool)> {
    let (h, w) = (37, 45);
    let input = U8Input::new([h, w, 3], None, None, None).unwrap();
    let cfg = PatchSkipConfig {
        patch: 8,
        threshold: 0.03,
        ..PatchSkipConfig::default()
    };
    let mut ps = PatchSkip::new(net(int8), cfg).unwrap();
    let mut rng = Rng(9);
    let mut frame: Vec<u8> = (0..h * w * 3).map(|_| (rng.next() * 255.0) as u8).collect();
    let mut out = Vec::new();
    for t in 0..6 {
        // a blob that moves, and low-level noise the gate must weigh against its threshold
        for y in 3 + 4 * t..12 + 4 * t {
            for x in 2 + 5 * t..13 + 5 * t {
                for ch in 0..3 {
                    frame[(y * w + x) * 3 + ch] = (rng.next() * 255.0) as u8;
                }
            }
        }
        for _ in 0..40 {
            let i = (rng.next() * (h * w * 3) as f32) as usize;
            frame[i] = frame[i].saturating_add(if t % 2 == 0 { 3 } else { 12 });
        }
        let y = ps.run_u8(&frame, input.clone()).unwrap();
        let bits = y.iter().map(|v| v.to_bits()).collect();
        let st = ps.stats();
        assert!(t == 0 || !st.dense, "frame {t} ran densely");
        out.push((
            bits,
            st.patch_fraction,
            st.layer_fractions.clone(),
            st.estimated_error,
            st.output_changed,
        ));
    }
    out
}

#[test]
fn avx2_and_portable_builds_give_the_same_patch_skip_results() {
    for int8 in [false, true] {
        nn::set_elementwise_simd(true);
        let a = run(int8);
        nn::set_elementwise_simd(false);
        let b = run(int8);
        nn::set_elementwise_simd(true);
        assert!(
            a.iter().skip(1).any(|f| f.1 > 0.0 && f.1 < 1.0),
            "int8 {int8}: the gate never skipped"
        );
        assert_eq!(a, b, "int8 {int8}");
    }
}
