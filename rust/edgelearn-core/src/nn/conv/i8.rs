//! INT8 convolution on the INT8 GEMM and the padded grid: forward, and backward with an INT8 `dY`.

use rayon::prelude::*;

use super::grid::PaddedGrid;
use super::plan::{ConvAlgo, DensePlan, WeightScales};
use super::{check_bias, check_scalar_scale, check_weight_scale, direct, smallplane};
use super::{for_each_chunk, gather_rows, patch_matrix, row_bias, scatter_rows, ConvShape};
use crate::error::{Error, Result};
use crate::gemm::{self, MatRef, Scale, MAX_K_I32};
use crate::nn::im2col::col2im;
use crate::nn::matmul::{sgemm, MatF32};
use crate::nn::{check_len, take_f32, take_i8, Scratch};
use crate::threads;

/// `W̃` of [`DensePlan::dx_transposed`]: `(C, O, kh, kw)` from `wq (O, C, kh, kw)`, window flipped.
fn flipped_transpose(s: &ConvShape, wq: &[i8]) -> Vec<i8> {
    let (kk, c, o) = (s.g.kh * s.g.kw, s.g.c, s.o);
    let mut wt = vec![0i8; wq.len()];
    // Flipping both window axes of a row-major kh × kw block reverses it.
    for (oc, w_o) in wq.chunks_exact(c * kk).enumerate() {
        for (ch, src) in w_o.chunks_exact(kk).enumerate() {
            let dst = &mut wt[(ch * o + oc) * kk..(ch * o + oc + 1) * kk];
            for (d, &v) in dst.iter_mut().zip(src.iter().rev()) {
                *d = v;
            }
        }
    }
    wt
}

/// The one weight scale a [`ConvAlgo::SmallPlane`] plan (made for [`WeightScales::PerTensor`]) runs with.
fn per_tensor(sw: Scale) -> Result<f32> {
    match sw {
        Scale::Scalar(v) => Ok(v),
        Scale::PerIndex(v) => Err(Error::invalid(
            "sw",
            format!(
                "this convolution was planned for one weight scale per tensor (small-plane algorithm), got {} scales",
                v.len()
            ),
        )),
    }
}

/// The checked shape of an INT8 convolution, errors naming its operands `xq` and `wq`.
fn int8_shape(
    x_shape: [usize; 4],
    w_shape: [usize; 4],
    stride: (usize, usize),
    padding: (usize, usize),
) -> Result<ConvShape> {
    ConvShape::new(x_shape, w_shape, stride, padding)
        .map_err(|e| e.for_arg("x", "xq").for_arg("w", "wq"))
}

/// INT8 convolution: `y = conv2d(sx·xq, sw·wq) + bias` in FP32, on the INT8 GEMM. `sw` is one scale or
/// one per output channel. Runs the [`ConvPlan`](super::ConvPlan) of the shape.
#[allow(clippy::too_many_arguments)]
pub fn conv2d_i8_forward(
    xq: &[i8],
    x_shape: [usize; 4],
    sx: f32,
    wq: &[i8],
    w_shape: [usize; 4],
    sw: Scale,
    bias: Option<&[f32]>,
    stride: (usize, usize),
    padding: (usize, usize),
    y: &mut [f32],
) -> Result<ConvShape> {
    let plan = DensePlan::new(
        int8_shape(x_shape, w_shape, stride, padding)?,
        WeightScales::Any,
    );
    forward(&plan.shape, plan.forward, xq, sx, wq, sw, bias, y)?;
    Ok(plan.shape)
}

/// [`conv2d_i8_forward`] of shape `s` by `algo` (the plan's INT8 forward).
#[allow(clippy::too_many_arguments)]
pub(super) fn forward(
    s: &ConvShape,
    algo: ConvAlgo,
    xq: &[i8],
    sx: f32,
    wq: &[i8],
    sw: Scale,
    bias: Option<&[f32]>,
    y: &mut [f32],
) -> Result<()> {
    let s = *s;
    check_len("xq", xq.len(), &s.input())?;
    check_len("wq", wq.len(), &s.weight())?;
    check_scalar_scale("sx", sx)?;
    check_weight_scale(&sw, s.o)?;
    check_bias(bias, s.o)?;
    check_len("y", y.len(), &s.output())?;
    if y.is_empty() {
        return Ok(());
    }
    if algo == ConvAlgo::SmallPlane {
        return smallplane::forward(&s, xq, sx, wq, per_tensor(sw)?, bias, y);
    }
    let (k, p, o, xs) = (s.k(), s.p(), s.o, s.x_img());
    let wm = MatRef::row_major(wq, o, k)?;
    if let ConvAlgo::DirectVnni | ConvAlgo::PaddedGrid = algo {
        let grid = PaddedGrid::of(&s);
        let direct = if algo == ConvAlgo::DirectVnni {
            Some(direct::DirectWeights::new(wq, o, s.g.c, s.g.kh * s.g.kw)?)
        } else {
            None
        };
        for_each_chunk(y, o * p, grid.images_per_chunk(), |n0, yc, par| {
            let nb = yc.len() / (o * p);
            let x = &xq[n0 * xs..(n0 + nb) * xs];
            grid.forward_chunk(x, nb, &wm, direct.as_ref(), sw, sx, bias, yc, par)
        })?;
        return Ok(());
    }
    // an image's layer: one image per GEMM, whose output rows are the image's output planes (no scatter)
    let nb = if super::plan::image_layer(&s) {
        1
    } else {
        s.images_per_chunk(1, usize::MAX)
    };
    for_each_chunk(y, o * p, nb, |n0, yc, par| {
        let nb = yc.len() / (o * p);
        let ld = nb * p;
        let xc = &xq[n0 * xs..(n0 + nb) * xs];
        let mut col = Scratch::default();
        let cm = MatRef::row_major(patch_matrix(&s, xc, nb, &mut col, par)?, k, ld)?;
        if nb == 1 {
            gemm::gemm_i8_f32(&wm, &cm, sw, Scale::Scalar(sx), None, yc)?;
            if let Some(b) = bias {
                row_bias(yc, p, b, par, |row, bv| {
                    row.iter_mut().for_each(|v| *v += bv)
                });
            }
        } else {
            let mut out = take_f32(o * ld)?;
            gemm::gemm_i8_f32(&wm, &cm, sw, Scale::Scalar(sx), None, &mut out)?;
            scatter_rows(&out, ld, &s, nb, bias, yc);
        }
        Ok(())
    })?;
    Ok(())
}

/// Backward of [`conv2d_i8_forward`] with an INT8 output gradient `sdy·dyq`:
/// `dw = sdy·sx·(dYqᵀ·col(Xq))` and, if given, `dx = col2im(Wᵀ·dY)` (INT8 GEMM with per-tensor `sw`).
/// Both outputs are overwritten.
#[allow(clippy::too_many_arguments)]
pub fn conv2d_i8_backward(
    xq: &[i8],
    x_shape: [usize; 4],
    sx: f32,
    wq: &[i8],
    w_shape: [usize; 4],
    sw: Scale,
    dyq: &[i8],
    sdy: f32,
    stride: (usize, usize),
    padding: (usize, usize),
    dx: Option<&mut [f32]>,
    dw: &mut [f32],
) -> Result<ConvShape> {
    let plan = DensePlan::new(
        int8_shape(x_shape, w_shape, stride, padding)?,
        WeightScales::Any,
    );
    backward(&plan, xq, sx, wq, sw, dyq, sdy, dx, Some(dw))?;
    Ok(plan.shape)
}

/// [`conv2d_i8_backward`] as the dense plan `plan` says; either gradient may be left out (`None`), so
/// `dX` and `dW` can also run apart (the Octo layer step computes `dW` on another thread).
#[allow(clippy::too_many_arguments)]
pub(super) fn backward(
    plan: &DensePlan,
    xq: &[i8],
    sx: f32,
    wq: &[i8],
    sw: Scale,
    dyq: &[i8],
    sdy: f32,
    dx: Option<&mut [f32]>,
    dw: Option<&mut [f32]>,
) -> Result<()> {
    let s = plan.shape;
    let (x_shape, w_shape) = (s.input(), s.weight());
    check_len("xq", xq.len(), &x_shape)?;
    check_len("wq", wq.len(), &w_shape)?;
    check_len("dyq", dyq.len(), &s.output())?;
    check_scalar_scale("sx", sx)?;
    check_scalar_scale("sdy", sdy)?;
    check_weight_scale(&sw, s.o)?;
    if let Some(d) = dw.as_deref() {
        check_len("dw", d.len(), &w_shape)?;
    }
    if let Some(d) = dx.as_deref() {
        check_len("dx", d.len(), &x_shape)?;
    }
    let (k, p, o, xs, n) = (s.k(), s.p(), s.o, s.x_img(), s.g.n);
    if n == 0 || o == 0 || xs == 0 {
        if let Some(d) = dw {
            d.fill(0.0);
        }
        if let Some(d) = dx {
            d.fill(0.0);
        }
        return Ok(());
    }
    if plan.forward == ConvAlgo::SmallPlane {
        return smallplane::backward(&s, xq, sx, wq, per_tensor(sw)?, dyq, sdy, dx, dw);
    }
    let wm = MatRef::row_major(wq, o, k)?;
    // Per-channel weight scales: dX runs in FP32 on the exact integer weights (see the module docs).
    let wf: Option<Vec<f32>> = match sw {
        Scale::PerIndex(_) if dx.is_some() => Some(wq.iter().map(|&v| v as f32).collect()),
        _ => None,
    };
    let wfm = match &wf {
        Some(v) => Some(MatF32::row_major(v, o, k)?),
        None => None,
    };
    let mut dx = dx;
    if let (Scale::Scalar(swv), Some(d), Some((st, algo))) =
        (sw, dx.as_deref_mut(), plan.dx_transposed)
    {
        let g = s.g;
        let st = ConvShape::new(
            [n, o, g.oh, g.ow],
            [g.c, o, g.kh, g.kw],
            (1, 1),
            (st.g.ph, st.g.pw),
        )?;
        let wt = flipped_transpose(&s, wq);
        forward(&st, algo, dyq, sdy, &wt, Scale::Scalar(swv), None, d)?;
        dx = None; // done: the chunks below compute dW only
    }
    let want_dw = dw.is_some();
    if dx.is_none() && !want_dw {
        return Ok(());
    }
    let grid = match dx {
        None if plan.dw_grid => {
            PaddedGrid::new(&s).and_then(|gr| gr.dw_images_per_chunk().map(|nb| (gr, nb)))
        }
        _ => None,
    };
    let nb = match &grid {
        Some((_, nb)) => *nb,
        None => s.images_per_chunk(1, MAX_K_I32),
    };
    let nchunks = n.div_ceil(nb);
    let par = nchunks < threads::num_threads();
    let dx_chunks: Vec<Option<&mut [f32]>> = match dx {
        Some(d) => d.chunks_mut(nb * xs).map(Some).collect(),
        None => (0..nchunks).map(|_| None).collect(),
    };
    // a fold's dW sums and its buffers for one chunk's products, allocated on its first chunk (a fold
    // that gets none allocates nothing; the products are written whole, never read first)
    struct Acc {
        dw: Vec<f64>,
        prod: Vec<i32>,
        prod_f32: Vec<f32>,
    }
    let chunk = |acc: &mut Acc, ci: usize, dxc: Option<&mut [f32]>| -> Result<()> {
        let n0 = ci * nb;
        let nb = nb.min(n - n0);
        let ld = nb * p;
        let dyc = &dyq[n0 * o * p..(n0 + nb) * o * p];
        let add_prod = |acc: &mut Acc| {
            acc.dw
                .iter_mut()
                .zip(&acc.prod)
                .for_each(|(a, &v)| *a += v as f64)
        };
        if let Some((gr, _)) = &grid {
            acc.prod.resize(acc.dw.len(), 0);
            gr.dw_chunk(&xq[n0 * xs..(n0 + nb) * xs], dyc, nb, o, &mut acc.prod, par)?;
            add_prod(acc);
            return Ok(());
        }
        let mut dyt_buf: Scratch<i8>;
        let dyt = if nb == 1 {
            dyc
        } else {
            dyt_buf = take_i8(o * ld)?;
            gather_rows(dyc, &s, nb, &mut dyt_buf, ld);
            &dyt_buf[..]
        };
        let dym = MatRef::row_major(dyt, o, ld)?;
        let direct = s.image_is_patch_matrix(nb);
        if want_dw {
            let xc = &xq[n0 * xs..(n0 + nb) * xs];
            let mut col = Scratch::default();
            let cm = MatRef::row_major(patch_matrix(&s, xc, nb, &mut col, par)?, k, ld)?;
            // dW: exact INT32 products, summed in i64-exact f64 across chunks. Computed transposed,
            // dWᵀ (K × O) = col · dYᵀ: the wide patch matrix is the A operand (packed without column
            // sums) and only the O columns of dYᵀ need the VNNI kernel's column sums.
            if ld <= MAX_K_I32 {
                acc.prod.resize(acc.dw.len(), 0);
                gemm::gemm_i8(&cm, &dym.t(), &mut acc.prod)?;
                add_prod(acc);
            } else {
                acc.prod_f32.resize(acc.dw.len(), 0.0);
                gemm::gemm_i8_f32(
                    &cm,
                    &dym.t(),
                    Scale::Scalar(1.0),
                    Scale::Scalar(1.0),
                    None,
                    &mut acc.prod_f32,
                )?;
                acc.dw
                    .iter_mut()
                    .zip(&acc.prod_f32)
                    .for_each(|(a, &v)| *a += v as f64);
            }
        }
        if let Some(dxc) = dxc {
            // dcol = Wᵀ·dY (K × ld), written straight into dx when the patch matrix is the image.
            let dcol_into = |dst: &mut [f32]| -> Result<()> {
                match (&wfm, sw) {
                    (Some(wfm), Scale::PerIndex(swv)) => {
                        let mut dys = take_f32(o * ld)?;
                        for (oc, row) in dys.chunks_exact_mut(ld).enumerate() {
                            let sc = sdy * swv[oc];
                            for (d, &q) in row.iter_mut().zip(&dyt[oc * ld..(oc + 1) * ld]) {
                                *d = q as f32 * sc;
                            }
                        }
                        let dysm = MatF32::row_major(&dys, o, ld)?;
                        // SAFETY: `dst` is K×ld.
                        unsafe { sgemm(&wfm.t(), &dysm, dst.as_mut_ptr(), ld, false, par) };
                        Ok(())
                    }
                    _ => gemm::gemm_i8_f32(&wm.t(), &dym, sw, Scale::Scalar(sdy), None, dst),
                }
            };
            if direct {
                dcol_into(dxc)?;
            } else {
                let mut dcol = take_f32(k * ld)?;
                dcol_into(&mut dcol)?;
                for i in 0..nb {
                    col2im(&mut dcol[i * p..], ld, &s.g, &mut dxc[i * xs..(i + 1) * xs]);
                }
            }
        }
        Ok(())
    };
    let dw_len = if want_dw { o * k } else { 0 };
    let zero = || Acc {
        dw: vec![0f64; dw_len],
        prod: Vec::new(),
        prod_f32: Vec::new(),
    };
    let acc = threads::install(|| {
        dx_chunks
            .into_par_iter()
            .enumerate()
            .try_fold(zero, |mut acc, (ci, dxc)| {
                chunk(&mut acc, ci, dxc).map(|_| acc)
            })
            .try_reduce(zero, |mut a, b| {
                a.dw.iter_mut().zip(&b.dw).for_each(|(x, y)| *x += y);
                Ok(a)
            })
    })?;
    let Some(dw) = dw else {
        return Ok(());
    };
    let scale = sdy as f64 * sx as f64;
    // acc.dw is dWᵀ (K × O)
    for (oc, row) in dw.chunks_exact_mut(k).enumerate() {
        for (kk, d) in row.iter_mut().enumerate() {
            *d = (acc.dw[kk * o + oc] * scale) as f32;
        }
    }
    Ok(())
}
