//! FP32 convolution: im2col + GEMM ([`super::ConvAlgo::Im2colGemm`]), in the "weights on the left"
//! orientation of the module docs; a 1x1 stride-1 unpadded convolution reads the image as its patch
//! matrix.

use super::sums::sum_row;
use super::{
    check_bias, fold_in_order, for_each_chunk, gather_rows, patch_matrix, row_bias, scatter_rows,
    ConvShape,
};
use crate::error::Result;
use crate::nn::im2col::col2im;
use crate::nn::matmul::{sgemm, MatF32};
use crate::nn::{check_len, take_f32, Scratch};
use crate::threads;

/// `y = conv2d(x, w) + bias` in FP32. `x`: `(N, C, H, W)`, `w`: `(O, C, kh, kw)`, `bias`: `O` values or
/// none, `y`: `(N, O, OH, OW)` (see [`ConvShape::output`]), all C-ordered.
#[allow(clippy::too_many_arguments)]
pub fn conv2d_f32_forward(
    x: &[f32],
    x_shape: [usize; 4],
    w: &[f32],
    w_shape: [usize; 4],
    bias: Option<&[f32]>,
    stride: (usize, usize),
    padding: (usize, usize),
    y: &mut [f32],
) -> Result<ConvShape> {
    let s = ConvShape::new(x_shape, w_shape, stride, padding)?;
    forward(&s, x, w, bias, y)?;
    Ok(s)
}

/// [`conv2d_f32_forward`] of the checked shape `s`.
pub(super) fn forward(
    s: &ConvShape,
    x: &[f32],
    w: &[f32],
    bias: Option<&[f32]>,
    y: &mut [f32],
) -> Result<()> {
    let s = *s;
    check_len("x", x.len(), &s.input())?;
    check_len("w", w.len(), &s.weight())?;
    check_bias(bias, s.o)?;
    check_len("y", y.len(), &s.output())?;
    if y.is_empty() {
        return Ok(());
    }
    let (k, p, o, xs) = (s.k(), s.p(), s.o, s.x_img());
    let wm = MatF32::row_major(w, o, k)?;
    let nb = s.images_per_chunk(4, usize::MAX);
    for_each_chunk(y, o * p, nb, |n0, yc, par| {
        let nb = yc.len() / (o * p);
        let ld = nb * p;
        let mut col = Scratch::default();
        let cm = MatF32::row_major(
            patch_matrix(&s, &x[n0 * xs..(n0 + nb) * xs], nb, &mut col, par)?,
            k,
            ld,
        )?;
        if nb == 1 {
            if let Some(b) = bias {
                row_bias(yc, p, b, par, |row, bv| row.fill(bv));
            }
            // SAFETY: `yc` is one image's O×P output.
            unsafe { sgemm(&wm, &cm, yc.as_mut_ptr(), p, bias.is_some(), par) };
        } else {
            let mut out = take_f32(o * ld)?;
            // SAFETY: `out` is O×ld.
            unsafe { sgemm(&wm, &cm, out.as_mut_ptr(), ld, false, par) };
            scatter_rows(&out, ld, &s, nb, bias, yc);
        }
        Ok(())
    })?;
    Ok(())
}

/// Backward of [`conv2d_f32_forward`]: `dw (O, C, kh, kw)`, `db (O,)` and, if given, `dx (N, C, H, W)`
/// from `dy (N, O, OH, OW)`. Every output is overwritten.
#[allow(clippy::too_many_arguments)]
pub fn conv2d_f32_backward(
    x: &[f32],
    x_shape: [usize; 4],
    w: &[f32],
    w_shape: [usize; 4],
    dy: &[f32],
    stride: (usize, usize),
    padding: (usize, usize),
    dx: Option<&mut [f32]>,
    dw: &mut [f32],
    db: &mut [f32],
) -> Result<ConvShape> {
    let s = ConvShape::new(x_shape, w_shape, stride, padding)?;
    backward(&s, x, w, dy, dx, dw, db)?;
    Ok(s)
}

/// [`conv2d_f32_backward`] of the checked shape `s`.
pub(super) fn backward(
    s: &ConvShape,
    x: &[f32],
    w: &[f32],
    dy: &[f32],
    dx: Option<&mut [f32]>,
    dw: &mut [f32],
    db: &mut [f32],
) -> Result<()> {
    let s = *s;
    let (x_shape, w_shape) = (s.input(), s.weight());
    check_len("x", x.len(), &x_shape)?;
    check_len("w", w.len(), &w_shape)?;
    check_len("dy", dy.len(), &s.output())?;
    check_len("dw", dw.len(), &w_shape)?;
    check_len("db", db.len(), &[s.o])?;
    if let Some(d) = dx.as_deref() {
        check_len("dx", d.len(), &x_shape)?;
    }
    let (k, p, o, xs, n) = (s.k(), s.p(), s.o, s.x_img(), s.g.n);
    if n == 0 || o == 0 || xs == 0 {
        dw.fill(0.0);
        db.fill(0.0);
        if let Some(d) = dx {
            d.fill(0.0);
        }
        return Ok(());
    }
    let wm = MatF32::row_major(w, o, k)?;
    let nb = s.images_per_chunk(4, usize::MAX);
    let nchunks = n.div_ceil(nb);
    let par = nchunks < threads::num_threads();
    let dx_chunks: Vec<Option<&mut [f32]>> = match dx {
        Some(d) => d.chunks_mut(nb * xs).map(Some).collect(),
        None => (0..nchunks).map(|_| None).collect(),
    };
    let chunk =
        |acc: &mut (Vec<f32>, Vec<f64>), ci: usize, dxc: Option<&mut [f32]>| -> Result<()> {
            let n0 = ci * nb;
            let nb = nb.min(n - n0);
            let ld = nb * p;
            let dyc = &dy[n0 * o * p..(n0 + nb) * o * p];
            let mut dyt_buf: Scratch<f32>;
            let dyt = if nb == 1 {
                dyc
            } else {
                dyt_buf = take_f32(o * ld)?;
                gather_rows(dyc, &s, nb, &mut dyt_buf, ld);
                &dyt_buf[..]
            };
            for (oc, d) in acc.1.iter_mut().enumerate() {
                *d += sum_row(&dyt[oc * ld..(oc + 1) * ld]);
            }
            let dym = MatF32::row_major(dyt, o, ld)?;
            let xc = &x[n0 * xs..(n0 + nb) * xs];
            let mut col = Scratch::default();
            let cm = MatF32::row_major(patch_matrix(&s, xc, nb, &mut col, par)?, k, ld)?;
            let direct = s.image_is_patch_matrix(nb);
            // SAFETY: the accumulator is O×K.
            unsafe { sgemm(&dym, &cm.t(), acc.0.as_mut_ptr(), k, true, par) };
            if let Some(dxc) = dxc {
                if direct {
                    // SAFETY: `dxc` is one image, C×HW = K×P.
                    unsafe { sgemm(&wm.t(), &dym, dxc.as_mut_ptr(), p, false, par) };
                } else {
                    // col is no longer needed: reuse it for dcol.
                    unsafe { sgemm(&wm.t(), &dym, col.as_mut_ptr(), ld, false, par) };
                    for i in 0..nb {
                        col2im(&mut col[i * p..], ld, &s.g, &mut dxc[i * xs..(i + 1) * xs]);
                    }
                }
            }
            Ok(())
        };
    let zero = || (vec![0f32; o * k], vec![0f64; o]);
    // Fixed groups, summed in order: the same bits on any thread count.
    let (dw_acc, db_acc) = fold_in_order(dx_chunks, zero, chunk, |a, b| {
        a.0.iter_mut().zip(&b.0).for_each(|(x, y)| *x += y);
        a.1.iter_mut().zip(&b.1).for_each(|(x, y)| *x += y);
    })?;
    dw.copy_from_slice(&dw_acc);
    for (d, v) in db.iter_mut().zip(db_acc) {
        *d = v as f32;
    }
    Ok(())
}
