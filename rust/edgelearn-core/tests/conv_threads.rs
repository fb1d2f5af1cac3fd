//! One image at a time (inference, video): the convolutions through a patch matrix unfold it by groups
//! of input channels over the pool and add the bias by groups of rows. Every thread count must give the
//! bits of one thread, and those must be the convolution's (a direct reference).

mod common;

use edgelearn_core::gemm::Scale;
use edgelearn_core::nn::{
    conv2d_f32_backward, conv2d_f32_forward, conv2d_i8_backward, conv2d_i8_forward,
};
use edgelearn_core::threads;

use common::{values, Rng};

/// `(x shape, w shape, stride, padding)`: patch matrices above the threshold of the parallel unfolding
/// (2^17 values), stride 2 (im2col path), an image layer (3 channels), and channel counts that do not
/// split evenly into groups.
const SHAPES: [([usize; 4], [usize; 4], usize, usize); 4] = [
    ([1, 16, 64, 80], [8, 16, 3, 3], 2, 1),
    ([1, 3, 160, 160], [16, 3, 3, 3], 1, 1),
    ([1, 13, 70, 66], [5, 13, 3, 3], 2, 1),
    ([2, 7, 90, 90], [4, 7, 3, 3], 2, 0),
];

fn out_shape(x: [usize; 4], w: [usize; 4], s: usize, p: usize) -> [usize; 4] {
    [
        x[0],
        w[0],
        (x[2] + 2 * p - w[2]) / s + 1,
        (x[3] + 2 * p - w[3]) / s + 1,
    ]
}

/// `Σ x·w` per output value, by the definition (f64 for FP32 operands, exact for integer codes).
fn reference(x: &[f64], xs: [usize; 4], w: &[f64], ws: [usize; 4], s: usize, p: usize) -> Vec<f64> {
    let ys = out_shape(xs, ws, s, p);
    let mut y = vec![0f64; ys.iter().product()];
    for n in 0..ys[0] {
        for o in 0..ys[1] {
            for oy in 0..ys[2] {
                for ox in 0..ys[3] {
                    let mut acc = 0f64;
                    for c in 0..xs[1] {
                        for i in 0..ws[2] {
                            for j in 0..ws[3] {
                                let (iy, ix) = (
                                    (oy * s + i) as isize - p as isize,
                                    (ox * s + j) as isize - p as isize,
                                );
                                if iy < 0 || ix < 0 || iy as usize >= xs[2] || ix as usize >= xs[3]
                                {
                                    continue;
                                }
                                let xv = x
                                    [((n * xs[1] + c) * xs[2] + iy as usize) * xs[3] + ix as usize];
                                acc += xv * w[((o * ws[1] + c) * ws[2] + i) * ws[3] + j];
                            }
                        }
                    }
                    y[((n * ys[1] + o) * ys[2] + oy) * ys[3] + ox] = acc;
                }
            }
        }
    }
    y
}

/// Where [`run`] puts the FP32 `dW`.
const FP32_DW: usize = 2;

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|f| f.to_bits()).collect()
}

/// One case's shapes and operands (FP32 and INT8 codes), the same on every call.
struct Ops {
    xs: [usize; 4],
    ws: [usize; 4],
    ys: [usize; 4],
    s: (usize, usize),
    p: (usize, usize),
    x: Vec<f32>,
    w: Vec<f32>,
    b: Vec<f32>,
    dy: Vec<f32>,
    xq: Vec<i8>,
    wq: Vec<i8>,
    dyq: Vec<i8>,
}

impl Ops {
    fn new(case: usize) -> Ops {
        let (xs, ws, s, p) = SHAPES[case];
        let ys = out_shape(xs, ws, s, p);
        let n = |d: [usize; 4]| d.iter().product::<usize>();
        let mut rng = Rng(case as u64 + 11);
        Ops {
            x: values(&mut rng, n(xs), 2.0),
            w: values(&mut rng, n(ws), 1.0),
            b: values(&mut rng, ws[0], 1.0),
            dy: values(&mut rng, n(ys), 1.0),
            xq: rng.i8s(n(xs)),
            wq: rng.i8s(n(ws)),
            dyq: rng.i8s(n(ys)),
            xs,
            ws,
            ys,
            s: (s, s),
            p: (p, p),
        }
    }

    fn y_len(&self) -> usize {
        self.ys.iter().product()
    }

    fn f32_forward(&self) -> Vec<f32> {
        let mut y = vec![0f32; self.y_len()];
        conv2d_f32_forward(
            &self.x,
            self.xs,
            &self.w,
            self.ws,
            Some(&self.b),
            self.s,
            self.p,
            &mut y,
        )
        .unwrap();
        y
    }

    /// `(dx, dw, db)`
    fn f32_backward(&self) -> [Vec<f32>; 3] {
        let (mut dx, mut dw, mut db) = (
            vec![0f32; self.x.len()],
            vec![0f32; self.w.len()],
            vec![0f32; self.ws[0]],
        );
        let (x, w) = (&self.x, &self.w);
        conv2d_f32_backward(
            x,
            self.xs,
            w,
            self.ws,
            &self.dy,
            self.s,
            self.p,
            Some(&mut dx),
            &mut dw,
            &mut db,
        )
        .unwrap();
        [dx, dw, db]
    }

    /// `sx = 0.5`, `sw = 0.25`
    fn i8_forward(&self) -> Vec<f32> {
        let mut y = vec![0f32; self.y_len()];
        let sw = Scale::Scalar(0.25);
        conv2d_i8_forward(
            &self.xq,
            self.xs,
            0.5,
            &self.wq,
            self.ws,
            sw,
            Some(&self.b),
            self.s,
            self.p,
            &mut y,
        )
        .unwrap();
        y
    }

    /// `(dx, dw)` with `sdy = 0.125`
    fn i8_backward(&self) -> [Vec<f32>; 2] {
        let (mut dx, mut dw) = (vec![0f32; self.x.len()], vec![0f32; self.w.len()]);
        let (xq, wq, sw) = (&self.xq, &self.wq, Scale::Scalar(0.25));
        conv2d_i8_backward(
            xq,
            self.xs,
            0.5,
            wq,
            self.ws,
            sw,
            &self.dyq,
            0.125,
            self.s,
            self.p,
            Some(&mut dx),
            &mut dw,
        )
        .unwrap();
        [dx, dw]
    }
}

/// Forward (with bias) and backward of both element types on `threads_n` threads, as bit patterns.
fn run(threads_n: usize, case: usize) -> Vec<Vec<u32>> {
    threads::set_num_threads(threads_n).unwrap();
    let ops = Ops::new(case);
    let [dx, dw, db] = ops.f32_backward();
    let [dxq, dwq] = ops.i8_backward();
    [ops.f32_forward(), dx, dw, db, ops.i8_forward(), dxq, dwq]
        .iter()
        .map(|v| bits(v))
        .collect()
}

/// One test: the thread count is process-wide, and tests of one binary run at the same time.
#[test]
fn one_image_convolutions_are_the_convolution_with_the_bits_of_one_thread() {
    on_two_threads_they_are_the_convolution();
    any_count_gives_the_bits_of_one_thread();
}

fn any_count_gives_the_bits_of_one_thread() {
    for case in 0..SHAPES.len() {
        let one = run(1, case);
        for t in [2, 3, 4] {
            let other = run(t, case);
            // all but the FP32 dW, which the other check compares with the definition: its GEMM sums
            // over the output positions in blocks that follow the thread count's bands
            let differ: Vec<usize> = (0..one.len())
                .filter(|&i| i != FP32_DW && other[i] != one[i])
                .collect();
            assert!(
                differ.is_empty(),
                "case {case}: {t} threads differ from one in outputs {differ:?}"
            );
        }
    }
    threads::set_num_threads(2).unwrap();
}

fn close(got: f32, want: f64, tol: f64) -> bool {
    (got as f64 - want).abs() <= tol * (1.0 + want.abs())
}

fn on_two_threads_they_are_the_convolution() {
    threads::set_num_threads(2).unwrap();
    for case in 0..SHAPES.len() {
        let ops = Ops::new(case);
        let (xs, ws, ys) = (ops.xs, ops.ws, ops.ys);
        let (s, p) = (ops.s.0, ops.p.0);
        let per_o = ys[2] * ys[3];
        let bias_of = |i: usize| ops.b[(i / per_o) % ws[0]] as f64;
        let f = |v: &[f32]| v.iter().map(|&a| a as f64).collect::<Vec<_>>();
        let fq = |v: &[i8]| v.iter().map(|&a| a as f64).collect::<Vec<_>>();
        let want = reference(&f(&ops.x), xs, &f(&ops.w), ws, s, p);
        for (i, (&got, &r)) in ops.f32_forward().iter().zip(&want).enumerate() {
            let r = r + bias_of(i);
            assert!(
                close(got, r, 1e-4),
                "case {case} fp32 y[{i}] = {got}, want {r}"
            );
        }
        let want = reference(&fq(&ops.xq), xs, &fq(&ops.wq), ws, s, p);
        for (i, (&got, &r)) in ops.i8_forward().iter().zip(&want).enumerate() {
            let r = r * 0.125 + bias_of(i);
            assert!(
                close(got, r, 1e-5),
                "case {case} int8 y[{i}] = {got}, want {r}"
            );
        }
        // dW[o, c, i, j] = Σ dY[n, o, ·] · X[n, c, shifted by (i, j)]
        let [_, dw, _] = ops.f32_backward();
        for o in 0..ws[0] {
            for c in 0..ws[1] {
                for i in 0..ws[2] {
                    for j in 0..ws[3] {
                        let mut want = 0f64;
                        for n in 0..ys[0] {
                            for oy in 0..ys[2] {
                                for ox in 0..ys[3] {
                                    let iy = (oy * s + i) as isize - p as isize;
                                    let ix = (ox * s + j) as isize - p as isize;
                                    if iy < 0
                                        || ix < 0
                                        || iy as usize >= xs[2]
                                        || ix as usize >= xs[3]
                                    {
                                        continue;
                                    }
                                    let xi = ((n * xs[1] + c) * xs[2] + iy as usize) * xs[3]
                                        + ix as usize;
                                    let yi = ((n * ys[1] + o) * ys[2] + oy) * ys[3] + ox;
                                    want += ops.dy[yi] as f64 * ops.x[xi] as f64;
                                }
                            }
                        }
                        let got = dw[((o * ws[1] + c) * ws[2] + i) * ws[3] + j];
                        assert!(
                            close(got, want, 1e-4),
                            "case {case} fp32 dw = {got}, want {want}"
                        );
                    }
                }
            }
        }
    }
}
