//! Grouped and depthwise convolution: every kernel this CPU has gives the scalar kernel's bits (FP32 and
//! INT8, forward and backward, random and edge shapes), the scalar results match a direct f64
//! reference, FP32 gradients match finite differences, and INT8 stays within quantization error of FP32.

use edgelearn_core::gemm::Scale;
use edgelearn_core::nn::depthwise::{
    conv2d_grouped_f32_backward_with, conv2d_grouped_f32_forward_with,
    conv2d_grouped_i8_backward_with, conv2d_grouped_i8_forward_with, depthwise_kernels, DwKernel,
    GroupedParams, GroupedShape,
};

/// Small deterministic generator (xorshift).
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn f32s(&mut self, n: usize) -> Vec<f32> {
        (0..n)
            .map(|_| (self.next() % 20001) as f32 / 10000.0 - 1.0)
            .collect()
    }
    fn i8s(&mut self, n: usize) -> Vec<i8> {
        (0..n).map(|_| (self.next() % 256) as u8 as i8).collect()
    }
}

#[derive(Clone, Copy, Debug)]
struct Case {
    x: [usize; 4],
    o: usize,
    k: (usize, usize),
    p: GroupedParams,
}

fn case(
    n: usize,
    c: usize,
    h: usize,
    w: usize,
    o: usize,
    groups: usize,
    k: usize,
    s: usize,
    pad: usize,
    d: usize,
) -> Case {
    Case {
        x: [n, c, h, w],
        o,
        k: (k, k),
        p: GroupedParams::new(groups, (s, s), (pad, pad), (d, d)),
    }
}

impl Case {
    fn w_shape(&self) -> [usize; 4] {
        [self.o, self.x[1] / self.p.groups, self.k.0, self.k.1]
    }
    fn shape(&self) -> GroupedShape {
        GroupedShape::new(self.x, self.w_shape(), self.p).unwrap()
    }
}

fn cases() -> Vec<Case> {
    let mut v = vec![
        case(2, 4, 9, 9, 4, 4, 3, 1, 1, 1),     // depthwise 3x3
        case(2, 4, 9, 9, 4, 4, 3, 2, 1, 1),     // stride 2
        case(1, 3, 8, 10, 6, 3, 3, 1, 1, 1),    // channel multiplier 2
        case(1, 3, 11, 13, 6, 3, 3, 2, 1, 1),   // multiplier 2, stride 2, odd sizes
        case(2, 4, 7, 7, 6, 2, 3, 1, 1, 1),     // grouped: 2 in / 3 out per group
        case(1, 6, 12, 12, 9, 3, 3, 2, 0, 1),   // grouped, stride 2, no padding
        case(1, 4, 10, 10, 4, 4, 3, 1, 2, 2),   // dilation 2
        case(1, 2, 9, 9, 2, 2, 3, 2, 2, 2),     // dilation 2, stride 2
        case(1, 2, 12, 12, 2, 2, 5, 1, 2, 1),   // 5x5
        case(1, 4, 6, 6, 4, 2, 1, 1, 0, 1),     // 1x1 grouped
        case(1, 2, 5, 5, 2, 2, 3, 1, 3, 1),     // padding beyond the window: scatter dX at stride 1
        case(1, 2, 9, 10, 2, 2, 3, 2, 3, 1),    // and at stride 2
        case(2, 3, 10, 11, 3, 3, 3, 3, 1, 1), // stride 3, rows and columns the forward's floor drops
        case(1, 4, 10, 12, 8, 2, 5, 2, 2, 1), // grouped 5x5 at stride 2
        case(1, 32, 6, 37, 4, 2, 3, 1, 1, 1), // 16 channels per group: 144 taps per output
        case(3, 48, 5, 6, 48, 48, 3, 1, 1, 1), // more groups than tasks: a forward task runs 3
        case(10, 14, 4, 5, 28, 14, 3, 2, 1, 1), // 2 groups a task, multiplier 2, stride 2
    ];
    // edge widths around every vector length (1, 4, 8, 16, 32 lanes)
    for w in [1, 3, 7, 8, 9, 15, 16, 17, 31, 33, 40] {
        v.push(case(1, 2, 3, w, 2, 2, 3, 1, 1, 1));
        v.push(case(1, 2, 3, 2 * w, 4, 2, 3, 2, 1, 1));
    }
    v
}

// --- f64 reference ---------------------------------------------------------------------------------------

/// Visits every (n, o, oy, ox, c, i, j, x index) term of the convolution.
fn for_terms(s: &GroupedShape, mut f: impl FnMut(usize, usize, usize, usize)) {
    let (cg, og) = (s.cg(), s.og());
    for n in 0..s.n {
        for o in 0..s.o {
            let g = o / og;
            for oy in 0..s.oh {
                for ox in 0..s.ow {
                    let yi = ((n * s.o + o) * s.oh + oy) * s.ow + ox;
                    for ci in 0..cg {
                        for i in 0..s.kh {
                            for j in 0..s.kw {
                                let y = (oy * s.sh + i * s.dh) as isize - s.ph as isize;
                                let x = (ox * s.sw + j * s.dw) as isize - s.pw as isize;
                                if y < 0 || x < 0 || y >= s.h as isize || x >= s.w as isize {
                                    continue;
                                }
                                let c = g * cg + ci;
                                let xi = ((n * s.c + c) * s.h + y as usize) * s.w + x as usize;
                                let wi = ((o * cg + ci) * s.kh + i) * s.kw + j;
                                f(yi, xi, wi, o);
                            }
                        }
                    }
                }
            }
        }
    }
}

fn ref_forward(s: &GroupedShape, x: &[f64], w: &[f64]) -> Vec<f64> {
    let mut y = vec![0f64; s.n * s.o * s.oh * s.ow];
    for_terms(s, |yi, xi, wi, _| y[yi] += x[xi] * w[wi]);
    y
}

fn ref_backward(s: &GroupedShape, x: &[f64], w: &[f64], dy: &[f64]) -> (Vec<f64>, Vec<f64>) {
    let (mut dx, mut dw) = (vec![0f64; x.len()], vec![0f64; w.len()]);
    for_terms(s, |yi, xi, wi, _| {
        dx[xi] += dy[yi] * w[wi];
        dw[wi] += dy[yi] * x[xi];
    });
    (dx, dw)
}

fn f64s<T: Copy + Into<f64>>(v: &[T]) -> Vec<f64> {
    v.iter().map(|&a| a.into()).collect()
}

fn assert_close(what: &str, got: &[f32], want: &[f64], tol: f64) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        assert!(
            (g as f64 - w).abs() <= tol * (1.0 + w.abs()),
            "{what}[{i}]: {g} vs {w}"
        );
    }
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|a| a.to_bits()).collect()
}

// --- runs ------------------------------------------------------------------------------------------------

struct F32Out {
    y: Vec<f32>,
    dx: Vec<f32>,
    dw: Vec<f32>,
    db: Vec<f32>,
}

fn run_f32(k: &DwKernel, c: &Case, x: &[f32], w: &[f32], b: &[f32], dy: &[f32]) -> F32Out {
    let s = c.shape();
    let mut y = vec![0f32; s.n * s.o * s.oh * s.ow];
    conv2d_grouped_f32_forward_with(k, x, c.x, w, c.w_shape(), Some(b), c.p, &mut y).unwrap();
    let (mut dx, mut dw, mut db) = (vec![0f32; x.len()], vec![0f32; w.len()], vec![0f32; s.o]);
    conv2d_grouped_f32_backward_with(
        k,
        x,
        c.x,
        w,
        c.w_shape(),
        dy,
        c.p,
        Some(&mut dx),
        &mut dw,
        &mut db,
    )
    .unwrap();
    F32Out { y, dx, dw, db }
}

struct I8Out {
    y: Vec<f32>,
    dx: Vec<f32>,
    dw: Vec<f32>,
}

#[allow(clippy::too_many_arguments)]
fn run_i8(
    k: &DwKernel,
    c: &Case,
    xq: &[i8],
    sx: f32,
    wq: &[i8],
    sw: Scale,
    b: &[f32],
    dyq: &[i8],
    sdy: f32,
) -> I8Out {
    let s = c.shape();
    let mut y = vec![0f32; s.n * s.o * s.oh * s.ow];
    conv2d_grouped_i8_forward_with(k, xq, c.x, sx, wq, c.w_shape(), sw, Some(b), c.p, &mut y)
        .unwrap();
    let (mut dx, mut dw) = (vec![0f32; xq.len()], vec![0f32; wq.len()]);
    conv2d_grouped_i8_backward_with(
        k,
        xq,
        c.x,
        sx,
        wq,
        c.w_shape(),
        sw,
        dyq,
        sdy,
        c.p,
        Some(&mut dx),
        &mut dw,
    )
    .unwrap();
    I8Out { y, dx, dw }
}

fn scalar() -> &'static DwKernel {
    depthwise_kernels()
        .into_iter()
        .find(|k| k.name == "scalar")
        .unwrap()
}

#[test]
fn fp32_scalar_matches_reference_and_every_kernel_matches_scalar_bits() {
    let mut rng = Rng(0x9E3779B97F4A7C15);
    for c in cases() {
        let s = c.shape();
        let x = rng.f32s(c.x.iter().product());
        let w = rng.f32s(c.w_shape().iter().product());
        let b = rng.f32s(s.o);
        let dy = rng.f32s(s.n * s.o * s.oh * s.ow);
        let want = run_f32(scalar(), &c, &x, &w, &b, &dy);
        let mut y_ref = ref_forward(&s, &f64s(&x), &f64s(&w));
        for (i, v) in y_ref.iter_mut().enumerate() {
            *v += b[(i / (s.oh * s.ow)) % s.o] as f64;
        }
        let (dx_ref, dw_ref) = ref_backward(&s, &f64s(&x), &f64s(&w), &f64s(&dy));
        assert_close(&format!("{c:?} y"), &want.y, &y_ref, 1e-4);
        assert_close(&format!("{c:?} dx"), &want.dx, &dx_ref, 1e-4);
        assert_close(&format!("{c:?} dw"), &want.dw, &dw_ref, 1e-4);
        for k in depthwise_kernels() {
            let got = run_f32(k, &c, &x, &w, &b, &dy);
            assert_eq!(bits(&got.y), bits(&want.y), "{} {c:?}: y", k.name);
            assert_eq!(bits(&got.dx), bits(&want.dx), "{} {c:?}: dx", k.name);
            assert_eq!(bits(&got.dw), bits(&want.dw), "{} {c:?}: dw", k.name);
            assert_eq!(bits(&got.db), bits(&want.db), "{} {c:?}: db", k.name);
        }
    }
}

#[test]
fn int8_is_exact_and_every_kernel_matches_scalar_bits() {
    let mut rng = Rng(12345);
    for c in cases() {
        let s = c.shape();
        // full int8 range, -128 included
        let xq = rng.i8s(c.x.iter().product());
        let wq = rng.i8s(c.w_shape().iter().product());
        let dyq = rng.i8s(s.n * s.o * s.oh * s.ow);
        let b = rng.f32s(s.o);
        let (sx, sdy) = (0.5f32, 0.25f32);
        let per: Vec<f32> = (0..s.o).map(|o| 0.125 * (o + 1) as f32).collect();
        for sw in [Scale::Scalar(0.125), Scale::PerIndex(&per)] {
            let want = run_i8(scalar(), &c, &xq, sx, &wq, sw, &b, &dyq, sdy);
            // integer reference: the sums are exact, so only the final rescale rounds
            let swv = |o: usize| match sw {
                Scale::Scalar(v) => v as f64,
                Scale::PerIndex(v) => v[o] as f64,
            };
            let mut y_ref = vec![0f64; want.y.len()];
            let (mut dx_ref, mut dw_ref) = (vec![0f64; xq.len()], vec![0f64; wq.len()]);
            for_terms(&s, |yi, xi, wi, o| {
                y_ref[yi] += xq[xi] as f64 * wq[wi] as f64;
                dx_ref[xi] += dyq[yi] as f64 * wq[wi] as f64 * swv(o) * sdy as f64;
                dw_ref[wi] += dyq[yi] as f64 * xq[xi] as f64;
            });
            for (i, v) in y_ref.iter_mut().enumerate() {
                let o = (i / (s.oh * s.ow)) % s.o;
                *v = *v * sx as f64 * swv(o) + b[o] as f64;
            }
            dw_ref.iter_mut().for_each(|v| *v *= sx as f64 * sdy as f64);
            assert_close(&format!("{c:?} y"), &want.y, &y_ref, 1e-6);
            assert_close(&format!("{c:?} dx"), &want.dx, &dx_ref, 1e-6);
            assert_close(&format!("{c:?} dw"), &want.dw, &dw_ref, 1e-6);
            for k in depthwise_kernels() {
                let got = run_i8(k, &c, &xq, sx, &wq, sw, &b, &dyq, sdy);
                assert_eq!(bits(&got.y), bits(&want.y), "{} {c:?}: y", k.name);
                assert_eq!(bits(&got.dx), bits(&want.dx), "{} {c:?}: dx", k.name);
                assert_eq!(bits(&got.dw), bits(&want.dw), "{} {c:?}: dw", k.name);
            }
        }
    }
}

/// The INT8 weight gradient is an exact integer sum times one scale, so every kernel must give
/// `(Σ dyq·xq as f64 · sx·sdy) as f32` to the bit: stride-1 "same" windows (column shifts at every edge,
/// planes from 1x1 to 32x32, many images), wider padding, stride 2.
#[test]
fn int8_weight_gradient_is_the_exact_integer_sum_on_every_kernel() {
    let mut rng = Rng(0xD1CE);
    let mut shapes = vec![
        case(3, 4, 16, 16, 4, 4, 3, 1, 1, 1),   // depthwise 3x3 "same"
        case(2, 4, 4, 4, 8, 4, 3, 1, 1, 1),     // channel multiplier 2, tiny plane
        case(2, 4, 7, 5, 6, 2, 3, 1, 1, 1),     // grouped: 2 in / 3 out per group
        case(2, 2, 9, 11, 2, 2, 5, 1, 2, 1),    // 5x5
        case(2, 4, 3, 3, 4, 2, 1, 1, 0, 1),     // 1x1 grouped
        case(2, 2, 1, 1, 2, 2, 3, 1, 1, 1),     // 1x1 plane: padding as wide as the plane
        case(2, 2, 6, 2, 2, 2, 5, 1, 2, 1),     // padding as wide as the plane
        case(2, 2, 9, 9, 2, 2, 3, 2, 1, 1),     // stride 2
        case(130, 1, 32, 32, 1, 1, 3, 1, 1, 1), // many images
    ];
    for w in [1, 2, 3, 7, 15, 16, 17, 33] {
        shapes.push(case(3, 2, 5, w, 2, 2, 3, 1, 1, 1));
    }
    for c in shapes {
        let s = c.shape();
        let xq = rng.i8s(c.x.iter().product());
        let wq = rng.i8s(c.w_shape().iter().product());
        let dyq = rng.i8s(s.n * s.o * s.oh * s.ow);
        let (sx, sdy) = (0.5f32, 0.375f32);
        let mut sums = vec![0i64; wq.len()];
        for_terms(&s, |yi, xi, wi, _| {
            sums[wi] += dyq[yi] as i64 * xq[xi] as i64
        });
        let want: Vec<f32> = sums
            .iter()
            .map(|&v| (v as f64 * (sdy as f64 * sx as f64)) as f32)
            .collect();
        for k in depthwise_kernels() {
            let mut dw = vec![0f32; wq.len()];
            let sw = Scale::Scalar(0.125);
            conv2d_grouped_i8_backward_with(
                k,
                &xq,
                c.x,
                sx,
                &wq,
                c.w_shape(),
                sw,
                &dyq,
                sdy,
                c.p,
                None,
                &mut dw,
            )
            .unwrap();
            assert_eq!(bits(&dw), bits(&want), "{} {c:?}: dw", k.name);
        }
    }
}

#[test]
fn fp32_gradients_match_finite_differences() {
    let mut rng = Rng(777);
    for c in [
        case(2, 3, 6, 7, 6, 3, 3, 2, 1, 1),
        case(1, 4, 6, 6, 4, 2, 3, 1, 1, 2),
    ] {
        let s = c.shape();
        let x = rng.f32s(c.x.iter().product());
        let w = rng.f32s(c.w_shape().iter().product());
        let b = vec![0f32; s.o];
        let r = rng.f32s(s.n * s.o * s.oh * s.ow); // L = Σ r·y, so dL/dy = r
        let k = depthwise_kernels()[0];
        let loss = |x: &[f32], w: &[f32]| -> f64 {
            let mut y = vec![0f32; r.len()];
            conv2d_grouped_f32_forward_with(k, x, c.x, w, c.w_shape(), Some(&b), c.p, &mut y)
                .unwrap();
            y.iter().zip(&r).map(|(&a, &b)| a as f64 * b as f64).sum()
        };
        let g = run_f32(k, &c, &x, &w, &b, &r);
        let h = 1e-2f32;
        for i in (0..x.len()).step_by(7) {
            let (mut xp, mut xm) = (x.clone(), x.clone());
            xp[i] += h;
            xm[i] -= h;
            let fd = (loss(&xp, &w) - loss(&xm, &w)) / (2.0 * h as f64);
            assert!(
                (fd - g.dx[i] as f64).abs() < 2e-3,
                "{c:?} dx[{i}]: fd {fd} vs {}",
                g.dx[i]
            );
        }
        for i in 0..w.len() {
            let (mut wp, mut wm) = (w.clone(), w.clone());
            wp[i] += h;
            wm[i] -= h;
            let fd = (loss(&x, &wp) - loss(&x, &wm)) / (2.0 * h as f64);
            assert!(
                (fd - g.dw[i] as f64).abs() < 2e-3,
                "{c:?} dw[{i}]: fd {fd} vs {}",
                g.dw[i]
            );
        }
    }
}

/// Symmetric per-tensor quantization (nearest), as the Python layer does.
fn quantize(v: &[f32]) -> (Vec<i8>, f32) {
    let m = v.iter().fold(0f32, |a, &b| a.max(b.abs())).max(1e-12);
    let s = m / 127.0;
    (
        v.iter()
            .map(|&a| (a / s).round().clamp(-127.0, 127.0) as i8)
            .collect(),
        s,
    )
}

#[test]
fn int8_is_within_quantization_error_of_fp32() {
    let mut rng = Rng(4242);
    let c = case(4, 8, 14, 14, 8, 8, 3, 1, 1, 1);
    let s = c.shape();
    let x = rng.f32s(c.x.iter().product());
    let w = rng.f32s(c.w_shape().iter().product());
    let dy = rng.f32s(s.n * s.o * s.oh * s.ow);
    let b = vec![0f32; s.o];
    let k = depthwise_kernels()[0];
    let f = run_f32(k, &c, &x, &w, &b, &dy);
    let ((xq, sx), (wq, sw), (dyq, sdy)) = (quantize(&x), quantize(&w), quantize(&dy));
    let q = run_i8(k, &c, &xq, sx, &wq, Scale::Scalar(sw), &b, &dyq, sdy);
    let rel = |a: &[f32], b: &[f32]| {
        let num: f64 = a
            .iter()
            .zip(b)
            .map(|(&p, &q)| ((p - q) as f64).powi(2))
            .sum();
        let den: f64 = b.iter().map(|&q| (q as f64).powi(2)).sum();
        (num / den).sqrt()
    };
    for (what, e) in [
        ("y", rel(&q.y, &f.y)),
        ("dx", rel(&q.dx, &f.dx)),
        ("dw", rel(&q.dw, &f.dw)),
    ] {
        assert!(e < 0.02, "{what}: relative error {e}");
    }
}

#[test]
fn bad_groups_are_errors_not_panics() {
    let p = |g| GroupedParams::new(g, (1, 1), (0, 0), (1, 1));
    assert!(GroupedShape::new([1, 4, 5, 5], [4, 1, 3, 3], p(0)).is_err());
    assert!(GroupedShape::new([1, 4, 5, 5], [6, 1, 3, 3], p(4)).is_err()); // 4 does not divide 6
    assert!(GroupedShape::new([1, 4, 5, 5], [4, 2, 3, 3], p(4)).is_err()); // C/groups is 1
    assert!(GroupedShape::new([1, 4, 2, 2], [4, 1, 3, 3], p(4)).is_err()); // window larger than input
    let mut y = vec![0f32; 4];
    let k = depthwise_kernels()[0];
    assert!(conv2d_grouped_f32_forward_with(
        k,
        &[0.0; 16],
        [1, 4, 2, 2],
        &[0.0; 4],
        [4, 1, 1, 1],
        None,
        p(4),
        &mut y[..3]
    )
    .is_err());
}

#[test]
fn the_kernels_this_cpu_has_are_all_tested() {
    let names: Vec<&str> = depthwise_kernels().iter().map(|k| k.name).collect();
    eprintln!("depthwise kernels: {names:?}");
    assert_eq!(names.last(), Some(&"scalar"));
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        assert!(names.contains(&"avx2"), "{names:?}");
    }
    #[cfg(target_arch = "aarch64")]
    assert!(names.contains(&"neon"), "{names:?}");
    // the choice follows the GEMM kernel's
    assert_eq!(
        edgelearn_core::nn::depthwise::depthwise_kernel_for("scalar").name,
        "scalar"
    );
}
