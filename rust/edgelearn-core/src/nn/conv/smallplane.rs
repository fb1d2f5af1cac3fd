//! INT8 convolution on small planes as one dense GEMM per product.
//!
//! On a plane of a few pixels (the 4x4 and 2x2 maps of an 8x8 input after pooling) a convolution is a linear
//! map from the `C·H·W` input values of an image to its `O·OH·OW` outputs whose matrix `E` is small: row
//! `(o, q)`, column `(c, r)` holds the weight tap `w[o, c, i, j]` that output pixel `q` applies to input pixel
//! `r`, or 0. With the images as rows, NCHW activations are that GEMM's operands as they lie in memory:
//!
//! - forward `Y (N × O·P) = Xq · Eᵀ`, rescaled by `sx·sw` with the bias per output channel;
//! - backward `dX (N × C·HW) = dYq · E`, rescaled by `sdy·sw`; `dE = dYqᵀ · Xq` in exact INT32, whose entries
//!   are added (exactly, in i64) into the taps they came from: `dW`, rescaled once by `sdy·sx`.
//!
//! No patch matrix, no col2im, no per-image loop: on tiny planes those cost more than the arithmetic. The
//! integer sums are the convolution's own (the zeros of `E` add nothing), and the rescale is the INT8 GEMM's
//! epilogue, so outputs are those of the im2col and padded-grid paths bit for bit (test). It applies while `E`
//! costs at most twice the MACs of the convolution (padded taps included) and stays small; a
//! [`ConvPlan`](super::ConvPlan) made for per-tensor weight scales chooses it ([`ConvAlgo::SmallPlane`](super::ConvAlgo::SmallPlane)).

use super::ConvShape;
use crate::error::Result;
use crate::gemm::{self, MatRef, Scale, MAX_K_I32};
use crate::nn::{take_i8, Geometry};

/// Largest `E` (bytes) this path builds.
const MAX_EXPANDED: usize = 1 << 20;

/// Whether the small-plane path applies to `s` (see the module docs).
pub fn applies(s: &ConvShape) -> bool {
    let g = &s.g;
    let (pin, pout) = (g.h * g.w, g.oh * g.ow);
    let dense = s.o * pout * g.c * pin;
    let conv = s.o * pout * g.c * g.kh * g.kw;
    pout > 0 && pout <= 16 && dense <= 2 * conv && dense <= MAX_EXPANDED && g.n <= MAX_K_I32
}

/// Calls `f(row, col, tap)` for every nonzero position of `E`: row `o·P + q`, column `c·HW + r`, tap index
/// `(o·C + c)·kh·kw + i·kw + j` of `w`.
fn for_each_tap(g: &Geometry, o: usize, mut f: impl FnMut(usize, usize, usize)) {
    let (pin, pout, kk) = (g.h * g.w, g.oh * g.ow, g.kh * g.kw);
    for oc in 0..o {
        for oy in 0..g.oh {
            for ox in 0..g.ow {
                let row = oc * pout + oy * g.ow + ox;
                for i in 0..g.kh {
                    let iy = (oy * g.sh + i) as isize - g.ph as isize;
                    if iy < 0 || iy as usize >= g.h {
                        continue;
                    }
                    for j in 0..g.kw {
                        let ix = (ox * g.sw + j) as isize - g.pw as isize;
                        if ix < 0 || ix as usize >= g.w {
                            continue;
                        }
                        let r = iy as usize * g.w + ix as usize;
                        for ch in 0..g.c {
                            f(row, ch * pin + r, (oc * g.c + ch) * kk + i * g.kw + j);
                        }
                    }
                }
            }
        }
    }
}

/// `E` (`O·P × C·HW`, row-major) of the codes `wq (O, C, kh, kw)`.
fn expand(s: &ConvShape, wq: &[i8]) -> Result<crate::nn::Scratch<i8>> {
    let g = &s.g;
    let cols = g.c * g.h * g.w;
    let mut e = take_i8(s.o * g.oh * g.ow * cols)?;
    e.fill(0);
    for_each_tap(g, s.o, |row, col, tap| e[row * cols + col] = wq[tap]);
    Ok(e)
}

/// `y = conv2d(sx·xq, sw·wq) + bias` (shapes checked by the caller, `s` from [`ConvShape::new`]).
pub fn forward(
    s: &ConvShape,
    xq: &[i8],
    sx: f32,
    wq: &[i8],
    sw: f32,
    bias: Option<&[f32]>,
    y: &mut [f32],
) -> Result<()> {
    let g = &s.g;
    let (cols, rows) = (g.c * g.h * g.w, s.o * g.oh * g.ow);
    let e = expand(s, wq)?;
    let pout = g.oh * g.ow;
    let bias_rows: Option<Vec<f32>> = bias.map(|b| (0..rows).map(|r| b[r / pout]).collect());
    gemm::gemm_i8_f32(
        &MatRef::row_major(xq, g.n, cols)?,
        &MatRef::row_major(&e, rows, cols)?.t(),
        Scale::Scalar(sx),
        Scale::Scalar(sw),
        bias_rows.as_deref(),
        y,
    )
}

/// Backward from the output gradient `sdy·dyq`: `dx` and `dw`, each when asked for.
#[allow(clippy::too_many_arguments)]
pub fn backward(
    s: &ConvShape,
    xq: &[i8],
    sx: f32,
    wq: &[i8],
    sw: f32,
    dyq: &[i8],
    sdy: f32,
    dx: Option<&mut [f32]>,
    dw: Option<&mut [f32]>,
) -> Result<()> {
    let g = &s.g;
    let (cols, rows) = (g.c * g.h * g.w, s.o * g.oh * g.ow);
    let dym = MatRef::row_major(dyq, g.n, rows)?;
    if let Some(dx) = dx {
        let e = expand(s, wq)?;
        gemm::gemm_i8_f32(
            &dym,
            &MatRef::row_major(&e, rows, cols)?,
            Scale::Scalar(sdy),
            Scale::Scalar(sw),
            None,
            dx,
        )?;
    }
    let Some(dw) = dw else {
        return Ok(());
    };
    // dE: exact (N ≤ MAX_K_I32 products of at most 127·127 per entry)
    let mut de = vec![0i32; rows * cols];
    gemm::gemm_i8(&dym.t(), &MatRef::row_major(xq, g.n, cols)?, &mut de)?;
    let mut acc = vec![0i64; dw.len()];
    for_each_tap(g, s.o, |row, col, tap| {
        acc[tap] += de[row * cols + col] as i64
    });
    let scale = sdy as f64 * sx as f64;
    for (d, &a) in dw.iter_mut().zip(&acc) {
        *d = (a as f64 * scale) as f32;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nn::conv::{conv2d_i8_backward, conv2d_i8_forward};

    fn codes(len: usize, seed: usize) -> Vec<i8> {
        (0..len)
            .map(|i| (((i * 7919 + seed * 104_729) % 255) as i32 - 127) as i8)
            .collect()
    }

    /// Forward, dX and dW equal the general INT8 convolution's bit for bit (extreme codes included).
    #[test]
    fn matches_the_general_convolution() {
        // (x shape, w shape, stride, padding)
        let cases = [
            ([5, 32, 2, 2], [64, 32, 3, 3], (1, 1), (1, 1)),
            ([3, 16, 4, 4], [32, 16, 3, 3], (1, 1), (1, 1)),
            ([4, 3, 4, 3], [5, 3, 3, 2], (2, 1), (1, 0)),
            ([2, 4, 3, 3], [6, 4, 3, 3], (1, 1), (0, 0)),
            ([3, 8, 3, 3], [4, 8, 3, 3], (2, 2), (1, 1)),
        ];
        for (ci, &(xs, ws, stride, padding)) in cases.iter().enumerate() {
            let s = ConvShape::new(xs, ws, stride, padding).unwrap();
            assert!(applies(&s), "case {ci}");
            let mut xq = codes(xs.iter().product(), ci);
            let wq = codes(ws.iter().product(), ci + 7);
            xq[0] = -127;
            let out = s.output();
            let ylen: usize = out.iter().product();
            let dyq = codes(ylen, ci + 3);
            let bias: Vec<f32> = (0..ws[0]).map(|i| i as f32 * 0.25 - 1.0).collect();
            let (sx, sw, sdy) = (0.013f32, 0.0071f32, 0.0023f32);
            let mut y0 = vec![0f32; ylen];
            let mut y1 = vec![0f32; ylen];
            conv2d_i8_forward(
                &xq,
                xs,
                sx,
                &wq,
                ws,
                Scale::Scalar(sw),
                Some(&bias),
                stride,
                padding,
                &mut y0,
            )
            .unwrap();
            forward(&s, &xq, sx, &wq, sw, Some(&bias), &mut y1).unwrap();
            assert_eq!(y0, y1, "forward, case {ci}");
            let xlen: usize = xs.iter().product();
            let wlen: usize = ws.iter().product();
            let (mut dx0, mut dw0) = (vec![0f32; xlen], vec![0f32; wlen]);
            let (mut dx1, mut dw1) = (vec![0f32; xlen], vec![0f32; wlen]);
            conv2d_i8_backward(
                &xq,
                xs,
                sx,
                &wq,
                ws,
                Scale::Scalar(sw),
                &dyq,
                sdy,
                stride,
                padding,
                Some(&mut dx0),
                &mut dw0,
            )
            .unwrap();
            backward(
                &s,
                &xq,
                sx,
                &wq,
                sw,
                &dyq,
                sdy,
                Some(&mut dx1),
                Some(&mut dw1),
            )
            .unwrap();
            // dX: exact INT32 sums, one rescale (the general path adds rescaled FP32 terms in col2im
            // where it cannot take the transposed convolution): the exact reference bit for bit, the
            // general path to float rounding
            assert_eq!(dx1, reference_dx(&s, &wq, &dyq, sdy * sw), "dx, case {ci}");
            for (a, b) in dx0.iter().zip(&dx1) {
                assert!(
                    (a - b).abs() <= 1e-5 * (1.0 + a.abs()),
                    "dx, case {ci}: {a} vs {b}"
                );
            }
            assert_eq!(dw0, dw1, "dw, case {ci}");
        }
    }

    /// `dX` from direct integer sums over `(o, i, j)`, then `acc · scale`.
    fn reference_dx(s: &ConvShape, wq: &[i8], dyq: &[i8], scale: f32) -> Vec<f32> {
        let g = &s.g;
        let mut acc = vec![0i64; g.n * g.c * g.h * g.w];
        for n in 0..g.n {
            for o in 0..s.o {
                for oy in 0..g.oh {
                    for ox in 0..g.ow {
                        let d = dyq[((n * s.o + o) * g.oh + oy) * g.ow + ox] as i64;
                        for c in 0..g.c {
                            for i in 0..g.kh {
                                for j in 0..g.kw {
                                    let iy = (oy * g.sh + i) as isize - g.ph as isize;
                                    let ix = (ox * g.sw + j) as isize - g.pw as isize;
                                    if iy < 0 || ix < 0 || iy as usize >= g.h || ix as usize >= g.w
                                    {
                                        continue;
                                    }
                                    let w = wq[((o * g.c + c) * g.kh + i) * g.kw + j] as i64;
                                    acc[((n * g.c + c) * g.h + iy as usize) * g.w + ix as usize] +=
                                        d * w;
                                }
                            }
                        }
                    }
                }
            }
        }
        acc.iter().map(|&a| a as f32 * scale).collect()
    }

    /// Large planes and expansions that cost far more than the convolution stay on the general path.
    #[test]
    fn applies_only_to_small_planes() {
        let big = ConvShape::new([32, 32, 7, 7], [64, 32, 3, 3], (1, 1), (1, 1)).unwrap();
        assert!(!applies(&big));
        let first = ConvShape::new([32, 1, 8, 8], [16, 1, 3, 3], (1, 1), (1, 1)).unwrap();
        assert!(!applies(&first)); // 64 output pixels
        let pointwise = ConvShape::new([3, 8, 2, 2], [4, 8, 1, 1], (1, 1), (0, 0)).unwrap();
        assert!(!applies(&pointwise)); // E would be 4x the MACs
    }
}
