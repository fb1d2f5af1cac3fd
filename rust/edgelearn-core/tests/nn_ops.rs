//! nn operators against naive reference implementations (direct loops in f64).

use edgelearn_core::gemm::Scale;
use edgelearn_core::nn::{self, MatF32, Window2d};

/// Small deterministic generator (xorshift), so tests need no extra crates.
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
        (0..n)
            .map(|_| ((self.next() % 255) as i32 - 127) as i8)
            .collect()
    }
}

fn close(got: &[f32], want: &[f64], tol: f64, what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let scale = want.iter().fold(1.0f64, |m, v| m.max(v.abs()));
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        assert!(
            (g as f64 - w).abs() <= tol * scale,
            "{what}[{i}]: got {g}, want {w}"
        );
    }
}

struct Case {
    x: [usize; 4],
    w: [usize; 4],
    stride: (usize, usize),
    padding: (usize, usize),
}

const CASES: &[Case] = &[
    // wide stride-1 images: the INT8 forward takes the padded-grid (implicit im2col) path, and so does
    // the INT8 backward's dX (a forward convolution of dY with the flipped, transposed kernel)
    Case {
        x: [2, 3, 5, 20],
        w: [4, 3, 3, 3],
        stride: (1, 1),
        padding: (1, 1),
    },
    Case {
        x: [1, 2, 4, 30],
        w: [3, 2, 3, 3],
        stride: (1, 1),
        padding: (0, 0),
    },
    Case {
        x: [3, 5, 6, 33],
        w: [17, 5, 3, 5],
        stride: (1, 1),
        padding: (2, 1),
    },
    // narrow stride-1 images (unpadded, asymmetric kernel and padding, a batch big enough for several
    // images per chunk): dX through dcol and col2im
    Case {
        x: [3, 2, 6, 7],
        w: [4, 2, 3, 3],
        stride: (1, 1),
        padding: (0, 0),
    },
    Case {
        x: [2, 3, 5, 6],
        w: [2, 3, 3, 2],
        stride: (1, 1),
        padding: (1, 0),
    },
    Case {
        x: [40, 2, 5, 5],
        w: [3, 2, 5, 5],
        stride: (1, 1),
        padding: (2, 2),
    },
    Case {
        x: [2, 3, 7, 5],
        w: [4, 3, 3, 3],
        stride: (1, 1),
        padding: (1, 1),
    },
    Case {
        x: [3, 2, 9, 8],
        w: [5, 2, 3, 3],
        stride: (2, 2),
        padding: (1, 1),
    },
    Case {
        x: [2, 4, 6, 6],
        w: [3, 4, 1, 1],
        stride: (1, 1),
        padding: (0, 0),
    },
    Case {
        x: [1, 3, 5, 7],
        w: [2, 3, 1, 1],
        stride: (2, 1),
        padding: (0, 0),
    },
    Case {
        x: [2, 1, 8, 9],
        w: [6, 1, 5, 3],
        stride: (2, 3),
        padding: (2, 0),
    },
    Case {
        x: [5, 2, 4, 4],
        w: [3, 2, 2, 2],
        stride: (1, 1),
        padding: (0, 0),
    },
    Case {
        x: [9, 3, 11, 13],
        w: [8, 3, 3, 3],
        stride: (1, 1),
        padding: (1, 1),
    },
    Case {
        x: [2, 2, 3, 3],
        w: [2, 2, 3, 3],
        stride: (1, 1),
        padding: (3, 2),
    },
];

fn out_hw(c: &Case) -> (usize, usize) {
    (
        (c.x[2] + 2 * c.padding.0 - c.w[2]) / c.stride.0 + 1,
        (c.x[3] + 2 * c.padding.1 - c.w[3]) / c.stride.1 + 1,
    )
}

/// Calls `f(n, o, oy, ox, c, i, j, x_index, w_index)` for every in-bounds term of the convolution sum.
fn for_each_term(c: &Case, mut f: impl FnMut(usize, usize, usize, usize, usize, usize)) {
    let [n, ci, h, w] = c.x;
    let [o, _, kh, kw] = c.w;
    let (oh, ow) = out_hw(c);
    for b in 0..n {
        for oc in 0..o {
            for oy in 0..oh {
                for ox in 0..ow {
                    let yi = ((b * o + oc) * oh + oy) * ow + ox;
                    for ch in 0..ci {
                        for i in 0..kh {
                            for j in 0..kw {
                                let iy = (oy * c.stride.0 + i) as isize - c.padding.0 as isize;
                                let ix = (ox * c.stride.1 + j) as isize - c.padding.1 as isize;
                                if iy < 0 || ix < 0 || iy as usize >= h || ix as usize >= w {
                                    continue;
                                }
                                let xi = ((b * ci + ch) * h + iy as usize) * w + ix as usize;
                                let wi = ((oc * ci + ch) * kh + i) * kw + j;
                                f(yi, oc, xi, wi, 0, 0);
                            }
                        }
                    }
                }
            }
        }
    }
}

fn conv_ref(
    c: &Case,
    x: &[f64],
    w: &[f64],
    bias: Option<&[f32]>,
    dy: &[f64],
) -> (Vec<f64>, Vec<f64>, Vec<f64>, Vec<f64>) {
    let (oh, ow) = out_hw(c);
    let ny = c.x[0] * c.w[0] * oh * ow;
    let mut y = vec![0f64; ny];
    let mut dx = vec![0f64; x.len()];
    let mut dw = vec![0f64; w.len()];
    let mut db = vec![0f64; c.w[0]];
    for_each_term(c, |yi, _, xi, wi, _, _| {
        y[yi] += x[xi] * w[wi];
        dx[xi] += dy[yi] * w[wi];
        dw[wi] += dy[yi] * x[xi];
    });
    for (yi, v) in y.iter_mut().enumerate() {
        let oc = (yi / (oh * ow)) % c.w[0];
        if let Some(b) = bias {
            *v += b[oc] as f64;
        }
        db[oc] += dy[yi];
    }
    (y, dx, dw, db)
}

fn to64<T: Copy + Into<f64>>(v: &[T]) -> Vec<f64> {
    v.iter().map(|&a| a.into()).collect()
}

#[test]
fn conv2d_f32_matches_direct_loops_forward_and_backward() {
    let mut rng = Rng(0x1234_5678);
    for c in CASES {
        let (oh, ow) = out_hw(c);
        let x = rng.f32s(c.x.iter().product());
        let w = rng.f32s(c.w.iter().product());
        let bias = rng.f32s(c.w[0]);
        let dy = rng.f32s(c.x[0] * c.w[0] * oh * ow);
        let (y_ref, dx_ref, dw_ref, db_ref) =
            conv_ref(c, &to64(&x), &to64(&w), Some(&bias), &to64(&dy));
        for use_bias in [true, false] {
            let mut y = vec![f32::NAN; dy.len()];
            let b = if use_bias { Some(&bias[..]) } else { None };
            let s =
                nn::conv2d_f32_forward(&x, c.x, &w, c.w, b, c.stride, c.padding, &mut y).unwrap();
            assert_eq!(s.output(), [c.x[0], c.w[0], oh, ow]);
            let want: Vec<f64> = if use_bias {
                y_ref.clone()
            } else {
                conv_ref(c, &to64(&x), &to64(&w), None, &to64(&dy)).0
            };
            close(&y, &want, 1e-5, &format!("y {:?} {:?}", c.x, c.w));
        }
        let mut dx = vec![f32::NAN; x.len()];
        let mut dw = vec![f32::NAN; w.len()];
        let mut db = vec![f32::NAN; c.w[0]];
        nn::conv2d_f32_backward(
            &x,
            c.x,
            &w,
            c.w,
            &dy,
            c.stride,
            c.padding,
            Some(&mut dx),
            &mut dw,
            &mut db,
        )
        .unwrap();
        close(&dx, &dx_ref, 1e-5, "dx");
        close(&dw, &dw_ref, 1e-5, "dw");
        close(&db, &db_ref, 1e-5, "db");
        let mut dw2 = vec![f32::NAN; w.len()];
        nn::conv2d_f32_backward(
            &x, c.x, &w, c.w, &dy, c.stride, c.padding, None, &mut dw2, &mut db,
        )
        .unwrap();
        close(&dw2, &dw_ref, 1e-5, "dw without dx");
    }
}

#[test]
fn conv2d_i8_equals_fp32_conv_of_dequantized_inputs() {
    let mut rng = Rng(0x9e37_79b9);
    for c in CASES {
        let (oh, ow) = out_hw(c);
        let xq = rng.i8s(c.x.iter().product());
        let wq = rng.i8s(c.w.iter().product());
        let dyq = rng.i8s(c.x[0] * c.w[0] * oh * ow);
        let bias = rng.f32s(c.w[0]);
        let (sx, sdy) = (0.013f32, 0.0021f32);
        let sw_vec: Vec<f32> = (0..c.w[0]).map(|o| 0.004 + 0.001 * o as f32).collect();
        for per_channel in [false, true] {
            let sw_of = |o: usize| if per_channel { sw_vec[o] } else { 0.007 };
            let sw = if per_channel {
                Scale::PerIndex(&sw_vec)
            } else {
                Scale::Scalar(0.007)
            };
            let x: Vec<f64> = xq.iter().map(|&v| v as f64 * sx as f64).collect();
            let kk = c.w[1] * c.w[2] * c.w[3];
            let w: Vec<f64> = wq
                .iter()
                .enumerate()
                .map(|(i, &v)| v as f64 * sw_of(i / kk) as f64)
                .collect();
            let dy: Vec<f64> = dyq.iter().map(|&v| v as f64 * sdy as f64).collect();
            let (y_ref, dx_ref, dw_ref, _) = conv_ref(c, &x, &w, Some(&bias), &dy);
            let mut y = vec![f32::NAN; dyq.len()];
            nn::conv2d_i8_forward(
                &xq,
                c.x,
                sx,
                &wq,
                c.w,
                sw,
                Some(&bias),
                c.stride,
                c.padding,
                &mut y,
            )
            .unwrap();
            close(
                &y,
                &y_ref,
                1e-6,
                &format!("i8 y {:?} per_channel={per_channel}", c.w),
            );
            let mut dx = vec![f32::NAN; xq.len()];
            let mut dw = vec![f32::NAN; wq.len()];
            nn::conv2d_i8_backward(
                &xq,
                c.x,
                sx,
                &wq,
                c.w,
                sw,
                &dyq,
                sdy,
                c.stride,
                c.padding,
                Some(&mut dx),
                &mut dw,
            )
            .unwrap();
            close(&dx, &dx_ref, 1e-6, "i8 dx");
            close(&dw, &dw_ref, 1e-6, "i8 dw");
            // without dX (a first layer), dW takes its own path (the padded grid where it applies)
            let mut dw_only = vec![f32::NAN; wq.len()];
            nn::conv2d_i8_backward(
                &xq,
                c.x,
                sx,
                &wq,
                c.w,
                sw,
                &dyq,
                sdy,
                c.stride,
                c.padding,
                None,
                &mut dw_only,
            )
            .unwrap();
            close(&dw_only, &dw_ref, 1e-6, "i8 dw without dx");
        }
    }
}

#[test]
fn conv2d_rejects_mismatched_shapes() {
    let x = vec![0f32; 2 * 3 * 5 * 5];
    let w = vec![0f32; 4 * 2 * 3 * 3];
    let mut y = vec![0f32; 2 * 4 * 5 * 5];
    let e = nn::conv2d_f32_forward(
        &x,
        [2, 3, 5, 5],
        &w,
        [4, 2, 3, 3],
        None,
        (1, 1),
        (1, 1),
        &mut y,
    )
    .unwrap_err();
    assert!(e.to_string().starts_with("w:"), "{e}");
    let w = vec![0f32; 4 * 3 * 7 * 7];
    let e = nn::conv2d_f32_forward(
        &x,
        [2, 3, 5, 5],
        &w,
        [4, 3, 7, 7],
        None,
        (1, 1),
        (0, 0),
        &mut y,
    )
    .unwrap_err();
    assert!(e.to_string().starts_with("x:"), "{e}");
    let e = nn::conv2d_f32_forward(
        &x,
        [2, 3, 5, 5],
        &w,
        [4, 3, 7, 7],
        None,
        (0, 1),
        (1, 1),
        &mut y,
    )
    .unwrap_err();
    assert!(e.to_string().starts_with("stride:"), "{e}");
}

#[test]
fn matmul_f32_handles_transposed_views_bias_and_threads() {
    let mut rng = Rng(42);
    for &(m, k, n) in &[
        (1, 1, 1),
        (7, 5, 3),
        (130, 33, 17),
        (64, 300, 200),
        (3, 0, 4),
    ] {
        let a = rng.f32s(m * k);
        let b = rng.f32s(k * n);
        let bias = rng.f32s(n);
        let mut want = vec![0f64; m * n];
        for i in 0..m {
            for j in 0..n {
                want[i * n + j] = bias[j] as f64
                    + (0..k)
                        .map(|p| a[i * k + p] as f64 * b[p * n + j] as f64)
                        .sum::<f64>();
            }
        }
        // a stored transposed (K×M) and viewed as M×K
        let at: Vec<f32> = (0..k * m).map(|t| a[(t % m) * k + t / m]).collect();
        let av = MatF32::new(&at, m, k, 1, m).unwrap();
        let bv = MatF32::row_major(&b, k, n).unwrap();
        let mut c = vec![f32::NAN; m * n];
        nn::matmul_f32(&av, &bv, Some(&bias), &mut c).unwrap();
        close(&c, &want, 1e-5, &format!("matmul {m}x{k}x{n}"));
    }
    let a = vec![0f32; 6];
    assert!(nn::matmul_f32(
        &MatF32::row_major(&a, 2, 3).unwrap(),
        &MatF32::row_major(&a, 2, 3).unwrap(),
        None,
        &mut [0.0; 9]
    )
    .is_err());
}

fn pool_ref(
    x: &[f32],
    s: [usize; 4],
    k: (usize, usize),
    st: (usize, usize),
    p: (usize, usize),
    max: bool,
) -> (Vec<f64>, Vec<u8>) {
    let [n, c, h, w] = s;
    let oh = (h + 2 * p.0 - k.0) / st.0 + 1;
    let ow = (w + 2 * p.1 - k.1) / st.1 + 1;
    let mut y = vec![];
    let mut idx = vec![];
    for pl in 0..n * c {
        for oy in 0..oh {
            for ox in 0..ow {
                let (mut best, mut at, mut sum) = (f64::NEG_INFINITY, 0u8, 0f64);
                let mut first = true;
                for i in 0..k.0 {
                    for j in 0..k.1 {
                        let iy = (oy * st.0 + i) as isize - p.0 as isize;
                        let ix = (ox * st.1 + j) as isize - p.1 as isize;
                        if iy < 0 || ix < 0 || iy as usize >= h || ix as usize >= w {
                            continue;
                        }
                        let v = x[pl * h * w + iy as usize * w + ix as usize] as f64;
                        sum += v;
                        if first || v > best {
                            best = v;
                            at = (i * k.1 + j) as u8;
                            first = false;
                        }
                    }
                }
                y.push(if max { best } else { sum / (k.0 * k.1) as f64 });
                idx.push(at);
            }
        }
    }
    (y, idx)
}

#[test]
fn pooling_matches_reference_and_backward_is_the_adjoint() {
    let mut rng = Rng(7);
    let cases = [
        ([2, 3, 8, 8], (2, 2), (2, 2), (0, 0)),
        // 2x2 fast path with an odd last row and column that no window covers (their dx must be 0)
        ([2, 2, 7, 9], (2, 2), (2, 2), (0, 0)),
        ([1, 3, 3, 2], (2, 2), (2, 2), (0, 0)),
        // even heights: planes pooled stacked, in runs of whole planes with a partial last run; width 4
        // (8 windows from 4 row pairs at a time, and a rest) and width 2 (windows of 4 consecutive values)
        ([3, 7, 4, 4], (2, 2), (2, 2), (0, 0)),
        ([2, 700, 4, 4], (2, 2), (2, 2), (0, 0)),
        ([2, 9, 6, 4], (2, 2), (2, 2), (0, 0)),
        ([2, 1100, 2, 2], (2, 2), (2, 2), (0, 0)),
        ([2, 5, 2, 3], (2, 2), (2, 2), (0, 0)),
        ([1, 2, 7, 9], (3, 3), (2, 2), (1, 1)),
        ([2, 1, 5, 6], (3, 2), (1, 2), (1, 0)),
        ([1, 1, 4, 4], (1, 1), (1, 1), (0, 0)),
        // global windows (average pooling's one-window-per-plane path; 33 planes: blocks of 8 and a rest)
        ([3, 11, 7, 7], (7, 7), (7, 7), (0, 0)),
        ([2, 3, 5, 4], (5, 4), (1, 1), (0, 0)),
        ([1, 2, 1, 1], (1, 1), (1, 1), (0, 0)),
    ];
    for (s, k, st, p) in cases {
        let x = rng.f32s(s.iter().product());
        let win = Window2d::new(k, st, p);
        for max in [true, false] {
            let (y_ref, idx_ref) = pool_ref(&x, s, k, st, p, max);
            let mut y = vec![f32::NAN; y_ref.len()];
            let mut idx = vec![0u8; y_ref.len()];
            if max {
                nn::maxpool2d_forward(&x, s, win, &mut y, &mut idx).unwrap();
                assert_eq!(idx, idx_ref);
            } else {
                nn::avgpool2d_forward(&x, s, win, &mut y).unwrap();
            }
            close(&y, &y_ref, 1e-6, "pool y");
            // <dy, J·dx_probe> == <J^T dy, probe>: check via a finite linear identity for avg and the
            // argmax scatter for max.
            let dy = rng.f32s(y.len());
            let mut dx = vec![f32::NAN; x.len()];
            if max {
                nn::maxpool2d_backward(&dy, &idx, s, win, &mut dx).unwrap();
            } else {
                nn::avgpool2d_backward(&dy, s, win, &mut dx).unwrap();
            }
            let probe = rng.f32s(x.len());
            let mut yp = vec![0f32; y.len()];
            if max {
                // max pooling is linear in x for a fixed argmax: gather probe at the argmax
                let g = nn::Geometry::new("x", s, win).unwrap();
                for (t, &a) in idx.iter().enumerate() {
                    let pl = t / g.p();
                    let (oy, ox) = ((t % g.p()) / g.ow, t % g.ow);
                    let iy = oy * st.0 + a as usize / k.1 - p.0;
                    let ix = ox * st.1 + a as usize % k.1 - p.1;
                    yp[t] = probe[pl * g.hw() + iy * s[3] + ix];
                }
            } else {
                nn::avgpool2d_forward(&probe, s, win, &mut yp).unwrap();
            }
            let lhs: f64 = dy.iter().zip(&yp).map(|(&a, &b)| a as f64 * b as f64).sum();
            let rhs: f64 = dx
                .iter()
                .zip(&probe)
                .map(|(&a, &b)| a as f64 * b as f64)
                .sum();
            assert!((lhs - rhs).abs() < 1e-4, "{lhs} vs {rhs}");
        }
    }
    let x = vec![0f32; 16];
    let mut y = vec![0f32; 4];
    let mut idx = vec![0u8; 4];
    let e = nn::maxpool2d_forward(
        &x,
        [1, 1, 4, 4],
        Window2d::new((2, 2), (2, 2), (2, 2)),
        &mut y,
        &mut idx,
    )
    .unwrap_err();
    assert!(e.to_string().starts_with("padding:"), "{e}");
    let e = nn::maxpool2d_forward(
        &x,
        [1, 1, 4, 4],
        Window2d::new((16, 16), (1, 1), (8, 8)),
        &mut y,
        &mut idx,
    )
    .unwrap_err();
    assert!(e.to_string().starts_with("kernel:"), "{e}");
    let bad = vec![200u8; 4];
    let e = nn::maxpool2d_backward(
        &[1.0; 4],
        &bad,
        [1, 1, 4, 4],
        Window2d::new((2, 2), (2, 2), (0, 0)),
        &mut [0.0; 16],
    )
    .unwrap_err();
    assert!(e.to_string().starts_with("idx:"), "{e}");
}

#[test]
fn batchnorm_training_matches_reference_and_updates_running_stats() {
    let mut rng = Rng(99);
    let s = [4, 3, 5, 6];
    let [n, c, h, w] = s;
    let x: Vec<f32> = rng
        .f32s(n * c * h * w)
        .iter()
        .map(|v| v * 3.0 + 10.0)
        .collect();
    let gamma = rng.f32s(c);
    let beta = rng.f32s(c);
    let (mut rm, mut rv) = (vec![0.5f32; c], vec![2.0f32; c]);
    let (mut y, mut mean, mut invstd) = (vec![0f32; x.len()], vec![0f32; c], vec![0f32; c]);
    nn::batchnorm2d_forward(
        &x,
        s,
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
    let m = (n * h * w) as f64;
    let at = |b: usize, ch: usize, t: usize| ((b * c + ch) * h * w) + t;
    let dy = rng.f32s(x.len());
    let (mut dx, mut dg, mut dbeta) = (vec![0f32; x.len()], vec![0f32; c], vec![0f32; c]);
    nn::batchnorm2d_backward(
        &dy,
        &x,
        s,
        Some(&gamma),
        &mean,
        &invstd,
        &mut dx,
        &mut dg,
        &mut dbeta,
    )
    .unwrap();
    for ch in 0..c {
        let vals: Vec<(usize, f64)> = (0..n)
            .flat_map(|b| (0..h * w).map(move |t| at(b, ch, t)))
            .map(|i| (i, x[i] as f64))
            .collect();
        let mu = vals.iter().map(|v| v.1).sum::<f64>() / m;
        let var = vals.iter().map(|v| (v.1 - mu).powi(2)).sum::<f64>() / m;
        let is = 1.0 / (var + 1e-5).sqrt();
        assert!((mean[ch] as f64 - mu).abs() < 1e-5 && (invstd[ch] as f64 - is).abs() < 1e-5 * is);
        assert!((rm[ch] as f64 - (0.9 * 0.5 + 0.1 * mu)).abs() < 1e-5);
        assert!((rv[ch] as f64 - (0.9 * 2.0 + 0.1 * var * m / (m - 1.0))).abs() < 1e-5);
        let (sdy, sdyxh) = vals.iter().fold((0.0, 0.0), |(a, b), &(i, v)| {
            (a + dy[i] as f64, b + dy[i] as f64 * (v - mu) * is)
        });
        assert!((dbeta[ch] as f64 - sdy).abs() < 1e-4 && (dg[ch] as f64 - sdyxh).abs() < 1e-4);
        for &(i, v) in &vals {
            let xh = (v - mu) * is;
            assert!((y[i] as f64 - (xh * gamma[ch] as f64 + beta[ch] as f64)).abs() < 1e-5);
            let want = gamma[ch] as f64 * is * (dy[i] as f64 - sdy / m - xh * sdyxh / m);
            assert!((dx[i] as f64 - want).abs() < 1e-4, "dx {} vs {want}", dx[i]);
        }
    }
    // eval uses (and leaves) the running statistics
    let (rm0, rv0) = (rm.clone(), rv.clone());
    nn::batchnorm2d_forward(
        &x,
        s,
        None,
        None,
        &mut rm,
        &mut rv,
        false,
        0.1,
        1e-5,
        &mut y,
        &mut mean,
        &mut invstd,
    )
    .unwrap();
    assert_eq!((rm.clone(), rv.clone()), (rm0, rv0));
    assert!(
        (y[0] as f64 - (x[0] as f64 - rm[0] as f64) / (rv[0] as f64 + 1e-5).sqrt()).abs() < 1e-5
    );
    let e = nn::batchnorm2d_forward(
        &x[..3],
        [1, 3, 1, 1],
        None,
        None,
        &mut rm,
        &mut rv,
        true,
        0.1,
        1e-5,
        &mut y[..3],
        &mut mean,
        &mut invstd,
    )
    .unwrap_err();
    assert!(e.to_string().starts_with("x:"), "{e}");
}

#[test]
fn relu_forward_and_backward() {
    let x = [-1.0f32, 0.0, 2.5, f32::NAN, -0.0, 3.0];
    let mut y = [9.0f32; 6];
    nn::relu_forward(&x, &mut y).unwrap();
    assert_eq!(&y[..3], &[0.0, 0.0, 2.5]);
    assert!(y[3].is_nan());
    let mut dx = [9.0f32; 6];
    nn::relu_backward(&[1.0; 6], &y, &mut dx).unwrap();
    assert_eq!(dx, [0.0, 0.0, 1.0, 0.0, 0.0, 1.0]);
    assert!(nn::relu_forward(&x, &mut [0.0; 5]).is_err());
    // large enough to take the threaded path
    let big: Vec<f32> = (0..200_000).map(|i| (i % 7) as f32 - 3.0).collect();
    let mut out = vec![0f32; big.len()];
    nn::relu_forward(&big, &mut out).unwrap();
    assert!(out.iter().zip(&big).all(|(&o, &v)| o == v.max(0.0)));
}

#[test]
fn channel_sums_and_range_is_channel_sums_plus_min_max_bit_for_bit() {
    let mut r = Rng(77);
    // the last one large enough to be spread over the pool (with more than one thread)
    for shape in [[3usize, 5, 17, 16], [2, 3, 20, 20], [4, 8, 48, 48]] {
        let n: usize = shape.iter().product();
        let mut x = r.f32s(n);
        let (mut want, mut got) = (vec![0f32; shape[1]], vec![0f32; shape[1]]);
        nn::channel_sums(&x, &shape, &mut want).unwrap();
        let (lo, hi, bad) = nn::channel_sums_and_range(&x, &shape, &mut got)
            .unwrap()
            .expect("planes of at least 256 values");
        assert_eq!(got, want, "{shape:?}");
        let lo_ref = x.iter().copied().fold(f32::INFINITY, f32::min);
        let hi_ref = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        assert_eq!((lo, hi, bad), (lo_ref, hi_ref, false), "{shape:?}");
        x[n / 2] = f32::NAN;
        let (.., bad) = nn::channel_sums_and_range(&x, &shape, &mut got)
            .unwrap()
            .unwrap();
        assert!(bad, "{shape:?}: NaN not seen");
    }
    // small planes: left to channel_sums (summed image by image there)
    let x = r.f32s(2 * 3 * 7 * 7);
    let mut out = vec![0f32; 3];
    assert!(nn::channel_sums_and_range(&x, &[2, 3, 7, 7], &mut out)
        .unwrap()
        .is_none());
}
