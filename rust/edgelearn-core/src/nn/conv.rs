//! 2-D convolution, forward and backward, in FP32 and INT8 (NCHW, weights `(O, C, kh, kw)`).
//!
//! Method: im2col + GEMM, in the "weights on the left" orientation. For a chunk of `nb` images the patch
//! matrices sit side by side in one `K × (nb·P)` matrix (`K = C·kh·kw`, `P = OH·OW`), and
//!
//! - forward: `Y' = W (O×K) · col (K×nb·P)` — with `nb = 1` this is the image's `(O, OH, OW)` output in
//!   place (NCHW, no transpose); with `nb > 1` one copy puts rows back in NCHW order and adds the bias;
//! - backward: `dW += dY' (O×nb·P) · colᵀ`, `dcol = Wᵀ · dY'` then col2im per image.
//!
//! The chunk size keeps a chunk's patch matrix near L2 size, and chunks are spread over the pool (each
//! one's GEMM runs on its worker; with fewer chunks than threads the GEMM itself is threaded). 1x1
//! stride-1 unpadded convolutions skip im2col: an image already is its patch matrix.
//!
//! INT8: patches are unfolded as INT8 and multiplied on the INT8 GEMM ([`crate::gemm`]), whose epilogue
//! applies `sw[o]·sx` (per-tensor or per-output-channel weight scale: a per-row scale of `W`). `dW` sums
//! exact INT32 products (in i64 across chunks) before the single rescale by `sdy·sx`. `dX` contracts over
//! output channels, so a per-channel weight scale cannot be factored out of an INT8 product: that case
//! scales `dY` by `sdy·sw[o]` in FP32 and runs the FP32 GEMM (exact up to float rounding, like the rest).

use rayon::prelude::*;

use super::im2col::{col2im, im2col};
use super::matmul::{sgemm, MatF32};
use super::{check_len, shape_len, take_f32, take_i8, Geometry, Scratch, Window2d};
use crate::error::{Error, Result};
use crate::gemm::{self, MatRef, RowsRef, Scale, MAX_K_I32};
use crate::threads;

/// The padded-width grid computes Wp/OW times the outputs; past about 1/7 extra the patch matrix is
/// cheaper (one thread, batch 32: 16→32 channels at 14x14 went from 235 to 187 µs per forward, 32→64 at
/// 7x7 from 216 to 241 µs).
const GRID_MAX_EXTRA: f64 = 1.0 / 7.0;

/// Bytes of patch matrix per chunk of images (about an L2 cache).
const COL_BUDGET: usize = 256 * 1024;

/// The shapes of one convolution: input geometry (with the kernel as window) and output channels.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConvShape {
    pub g: Geometry,
    pub o: usize,
}

impl ConvShape {
    /// Checks `x (N, C, H, W)` against `w (O, C, kh, kw)`, stride and padding.
    pub fn new(
        x: [usize; 4],
        w: [usize; 4],
        stride: (usize, usize),
        padding: (usize, usize),
    ) -> Result<Self> {
        if w[1] != x[1] {
            return Err(Error::invalid(
                "w",
                format!(
                    "has {} input channels (shape {w:?}) but x has {} (shape {x:?})",
                    w[1], x[1]
                ),
            ));
        }
        shape_len("w", &w)?;
        let g = Geometry::new("x", x, Window2d::new((w[2], w[3]), stride, padding))?;
        shape_len("y", &[g.n, w[0], g.oh, g.ow])?;
        Ok(ConvShape { g, o: w[0] })
    }
    /// `(N, O, OH, OW)`.
    pub fn output(&self) -> [usize; 4] {
        [self.g.n, self.o, self.g.oh, self.g.ow]
    }
    fn k(&self) -> usize {
        self.g.k()
    }
    fn p(&self) -> usize {
        self.g.p()
    }
    /// Elements of one input image.
    fn x_img(&self) -> usize {
        self.g.c * self.g.hw()
    }
    /// Images per chunk: the chunk's patch matrix stays near `COL_BUDGET`, every thread gets a chunk,
    /// and the chunk's pixel count stays within `max_cols` (the INT32 bound of the `dW` product).
    fn images_per_chunk(&self, elem_bytes: usize, max_cols: usize) -> usize {
        let per = (self.k() * self.p() * elem_bytes).max(1);
        let n = self.g.n.max(1);
        let mut nb = (COL_BUDGET / per).clamp(1, n);
        nb = nb.min(n.div_ceil(threads::num_threads()));
        nb = nb.min((max_cols / self.p().max(1)).max(1));
        nb.max(1)
    }
}

fn check_bias(bias: Option<&[f32]>, o: usize) -> Result<()> {
    match bias {
        Some(b) if b.len() != o => Err(Error::invalid(
            "bias",
            format!(
                "expected {o} values (one per output channel), got {}",
                b.len()
            ),
        )),
        _ => Ok(()),
    }
}

fn check_scalar_scale(arg: &'static str, s: f32) -> Result<()> {
    if !s.is_finite() {
        return Err(Error::invalid(arg, format!("must be finite, got {s}")));
    }
    Ok(())
}

fn check_weight_scale(sw: &Scale, o: usize) -> Result<()> {
    match sw {
        Scale::Scalar(s) => check_scalar_scale("sw", *s),
        Scale::PerIndex(v) => {
            if v.len() != o {
                return Err(Error::invalid(
                    "sw",
                    format!(
                        "expected a scalar or {o} values (one per output channel), got {}",
                        v.len()
                    ),
                ));
            }
            match v.iter().position(|s| !s.is_finite()) {
                Some(index) => Err(Error::NonFinite { arg: "sw", index }),
                None => Ok(()),
            }
        }
    }
}

/// Sum of a row, accumulated in f64 over 8 f32 lanes (fast and accurate enough for bias gradients).
fn sum_row(v: &[f32]) -> f64 {
    let mut lanes = [0f32; 8];
    let mut total = 0f64;
    for block in v.chunks(8 * 256) {
        for c in block.chunks_exact(8) {
            for (l, &x) in lanes.iter_mut().zip(c) {
                *l += x;
            }
        }
        total += block
            .chunks_exact(8)
            .remainder()
            .iter()
            .map(|&x| x as f64)
            .sum::<f64>();
        total += lanes.iter().map(|&x| x as f64).sum::<f64>();
        lanes = [0.0; 8];
    }
    total
}

/// Copies rows `(o, i·P..)` of the `O × nb·P` matrix `src` into the NCHW chunk `y (nb, O, P)`,
/// adding `bias[o]`.
fn scatter_rows(
    src: &[f32],
    ld: usize,
    s: &ConvShape,
    nb: usize,
    bias: Option<&[f32]>,
    y: &mut [f32],
) {
    let p = s.p();
    for i in 0..nb {
        for oc in 0..s.o {
            let from = &src[oc * ld + i * p..oc * ld + (i + 1) * p];
            let to = &mut y[(i * s.o + oc) * p..(i * s.o + oc + 1) * p];
            match bias {
                Some(b) => {
                    let bv = b[oc];
                    for (t, &f) in to.iter_mut().zip(from) {
                        *t = f + bv;
                    }
                }
                None => to.copy_from_slice(from),
            }
        }
    }
}

/// Copies the NCHW chunk `dy (nb, O, P)` into the `O × nb·P` matrix `dst` (rows `ld` apart).
fn gather_rows<T: Copy>(dy: &[T], s: &ConvShape, nb: usize, dst: &mut [T], ld: usize) {
    let p = s.p();
    for i in 0..nb {
        for oc in 0..s.o {
            dst[oc * ld + i * p..oc * ld + (i + 1) * p]
                .copy_from_slice(&dy[(i * s.o + oc) * p..(i * s.o + oc + 1) * p]);
        }
    }
}

/// Runs `f(first_image, chunk_of_out, gemm_threaded)` for each chunk of `nb` images of the NCHW output
/// `out` (`per_image` elements per image) in the pool; stops at the first error.
fn for_each_chunk<T: Send>(
    out: &mut [T],
    per_image: usize,
    nb: usize,
    f: impl Fn(usize, &mut [T], bool) -> Result<()> + Sync + Send,
) -> Result<()> {
    let n = out.len() / per_image.max(1);
    let inner_parallel = n.div_ceil(nb) < threads::num_threads();
    threads::install(|| {
        out.par_chunks_mut(nb * per_image)
            .enumerate()
            .try_for_each(|(ci, c)| f(ci * nb, c, inner_parallel))
    })
}

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
    check_len("x", x.len(), &x_shape)?;
    check_len("w", w.len(), &w_shape)?;
    check_bias(bias, s.o)?;
    check_len("y", y.len(), &s.output())?;
    if y.is_empty() {
        return Ok(s);
    }
    let (k, p, o, xs) = (s.k(), s.p(), s.o, s.x_img());
    let wm = MatF32::row_major(w, o, k)?;
    let nb = s.images_per_chunk(4, usize::MAX);
    for_each_chunk(y, o * p, nb, |n0, yc, par| {
        let nb = yc.len() / (o * p);
        let xc = &x[n0 * xs..(n0 + nb) * xs];
        if nb == 1 {
            if let Some(b) = bias {
                for (row, &bv) in yc.chunks_exact_mut(p).zip(b) {
                    row.fill(bv);
                }
            }
            let mut col: Scratch<f32>;
            let cm = if s.g.is_pointwise() {
                MatF32::row_major(xc, k, p)?
            } else {
                col = take_f32(k * p);
                im2col(xc, &s.g, &mut col, p);
                MatF32::row_major(&col, k, p)?
            };
            // SAFETY: `yc` is one image's O×P output.
            unsafe { sgemm(&wm, &cm, yc.as_mut_ptr(), p, bias.is_some(), par) };
        } else {
            let ld = nb * p;
            let mut col = take_f32(k * ld);
            for i in 0..nb {
                im2col(&xc[i * xs..(i + 1) * xs], &s.g, &mut col[i * p..], ld);
            }
            let mut out = take_f32(o * ld);
            // SAFETY: `out` is O×ld.
            unsafe {
                sgemm(
                    &wm,
                    &MatF32::row_major(&col, k, ld)?,
                    out.as_mut_ptr(),
                    ld,
                    false,
                    par,
                )
            };
            scatter_rows(&out, ld, &s, nb, bias, yc);
        }
        Ok(())
    })?;
    Ok(s)
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
        return Ok(s);
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
                dyt_buf = take_f32(o * ld);
                gather_rows(dyc, &s, nb, &mut dyt_buf, ld);
                &dyt_buf[..]
            };
            for (oc, d) in acc.1.iter_mut().enumerate() {
                *d += sum_row(&dyt[oc * ld..(oc + 1) * ld]);
            }
            let dym = MatF32::row_major(dyt, o, ld)?;
            let xc = &x[n0 * xs..(n0 + nb) * xs];
            let direct = s.g.is_pointwise() && nb == 1;
            let mut col = Scratch::default();
            if !direct {
                col = take_f32(k * ld);
                for i in 0..nb {
                    im2col(&xc[i * xs..(i + 1) * xs], &s.g, &mut col[i * p..], ld);
                }
            }
            let cm = if direct {
                MatF32::row_major(xc, k, p)?
            } else {
                MatF32::row_major(&col, k, ld)?
            };
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
    let (dw_acc, db_acc) = threads::install(|| {
        dx_chunks
            .into_par_iter()
            .enumerate()
            .try_fold(zero, |mut acc, (ci, dxc)| {
                chunk(&mut acc, ci, dxc).map(|_| acc)
            })
            .try_reduce(zero, |mut a, b| {
                a.0.iter_mut().zip(&b.0).for_each(|(x, y)| *x += y);
                a.1.iter_mut().zip(&b.1).for_each(|(x, y)| *x += y);
                Ok(a)
            })
    })?;
    dw.copy_from_slice(&dw_acc);
    for (d, v) in db.iter_mut().zip(db_acc) {
        *d = v as f32;
    }
    Ok(s)
}

/// Implicit im2col for stride-1 INT8 convolutions. The image is copied into a zero-padded plane per
/// channel (`(H + 2ph) × (W + 2pw)`), and outputs are computed on a grid as wide as a padded row
/// (`OH × Wp`, the last `Wp − OW` columns of each row being discarded). On that grid, row `(c, i, j)` of
/// the patch matrix is the padded image itself read from offset `c·plane + i·Wp + j`: the GEMM packs its
/// `B` operand straight from the padded image ([`RowsRef`]), so no patch matrix is written or read.
/// Costs `Wp/OW − 1` extra output columns (14% for a 3x3 kernel on 14x14) against one pass fewer over a
/// buffer `kh·kw` times the image, so it is used only while that overhead stays under 1/7.
struct PaddedGrid {
    g: Geometry,
    /// Padded row width `W + 2pw`: the grid's row stride.
    wp: usize,
    /// Offsets of the patch rows `(c, i, j)` in the padded image.
    offsets: Vec<usize>,
}

impl PaddedGrid {
    /// Whether `s` takes the grid: stride 1 and the grid's extra columns within [`GRID_MAX_EXTRA`] of
    /// the `OW` real ones.
    fn applies(s: &ConvShape) -> bool {
        let g = s.g;
        let usable = g.sh == 1 && g.sw == 1 && !g.is_pointwise() && s.o > 0 && g.oh > 0 && g.ow > 0;
        usable && (g.w + 2 * g.pw - g.ow) as f64 <= GRID_MAX_EXTRA * g.ow as f64
    }

    /// The grid for `s`, if it [`applies`](Self::applies).
    fn new(s: &ConvShape) -> Option<Self> {
        if !Self::applies(s) {
            return None;
        }
        let g = s.g;
        let wp = g.w + 2 * g.pw;
        let plane = (g.h + 2 * g.ph) * wp;
        let offsets = (0..g.c)
            .flat_map(|c| {
                (0..g.kh).flat_map(move |i| (0..g.kw).map(move |j| c * plane + i * wp + j))
            })
            .collect();
        Some(PaddedGrid { g, wp, offsets })
    }

    /// `y (O, OH, OW)` of one image `x (C, H, W)`.
    fn forward_image(
        &self,
        x: &[i8],
        wm: &MatRef,
        sw: Scale,
        sx: f32,
        bias: Option<&[f32]>,
        y: &mut [f32],
    ) -> Result<()> {
        let (g, wp) = (&self.g, self.wp);
        let plane = (g.h + 2 * g.ph) * wp;
        let ncols = g.oh * wp;
        // The last patch row (c = C−1, i = kh−1, j = kw−1) ends at C·plane + kw − 1.
        let mut xp = take_i8(g.c * plane + g.kw - 1);
        xp.fill(0);
        for (ch, img) in x.chunks_exact(g.hw()).enumerate() {
            for (yy, row) in img.chunks_exact(g.w).enumerate() {
                let d = ch * plane + (yy + g.ph) * wp + g.pw;
                xp[d..d + g.w].copy_from_slice(row);
            }
        }
        let b = RowsRef::new(&xp, &self.offsets, ncols)?;
        let o = wm.rows();
        let mut out = take_f32(o * ncols);
        gemm::gemm_i8_f32_rows(wm, &b, sw, Scale::Scalar(sx), None, &mut out)?;
        drop_grid_columns(&out, ncols, wp, g.ow, g.p(), bias, y);
        Ok(())
    }
}

crate::simd::avx2_multiversion! {
/// `y (O, P)` from the padded-grid output `src (O, ncols = OH·wp)`: each grid row's first `ow` values,
/// plus `bias[o]` when given.
fn drop_grid_columns(
    src: &[f32],
    ncols: usize,
    wp: usize,
    ow: usize,
    p: usize,
    bias: Option<&[f32]>,
    y: &mut [f32],
) {
    for (oc, (dst, src)) in y.chunks_exact_mut(p).zip(src.chunks_exact(ncols)).enumerate() {
        let rows = dst.chunks_exact_mut(ow).zip(src.chunks_exact(wp));
        match bias {
            Some(b) => {
                let bv = b[oc];
                for (d, sr) in rows {
                    for (d, &v) in d.iter_mut().zip(&sr[..ow]) {
                        *d = v + bv;
                    }
                }
            }
            None => {
                for (d, sr) in rows {
                    d.copy_from_slice(&sr[..ow]);
                }
            }
        }
    }
}
}

/// `dX` of a stride-1 convolution `s` as a forward convolution: `dX = conv2d(dY, W̃)` with padding
/// `(kh−1−ph, kw−1−pw)`, where `W̃ (C, O, kh, kw)` is `W` with input and output channels swapped and the
/// window flipped ([`flipped_transpose`]). Run through [`conv2d_i8_forward`] on the padded grid this
/// needs neither the `K × P` FP32 `dcol` nor col2im, and the INT32 sums over `(o, i, j)` are exact
/// before the one rescale (col2im adds rescaled FP32 terms). Returns that forward's shape (input `dY`
/// of one image), or `None` where the identity does not hold (stride > 1, padding ≥ the window) or
/// where that forward would not take the padded grid: through a patch matrix of `dY` (O·kh·kw rows) it
/// is slower than dcol + col2im (32→64 channels at 7x7: 458 against 400 µs per batch of 32).
fn transposed_dx_shape(s: &ConvShape) -> Option<ConvShape> {
    let g = s.g;
    if g.sh != 1 || g.sw != 1 || g.ph >= g.kh || g.pw >= g.kw {
        return None;
    }
    let st = ConvShape::new(
        [1, s.o, g.oh, g.ow],
        [g.c, s.o, g.kh, g.kw],
        (1, 1),
        (g.kh - 1 - g.ph, g.kw - 1 - g.pw),
    )
    .ok()?;
    (st.g.oh == g.h && st.g.ow == g.w && PaddedGrid::applies(&st)).then_some(st)
}

/// `W̃` of [`transposed_dx_shape`]: `(C, O, kh, kw)` from `wq (O, C, kh, kw)`, window flipped.
fn flipped_transpose(s: &ConvShape, wq: &[i8]) -> Vec<i8> {
    let g = s.g;
    let (kh, kw, c, o) = (g.kh, g.kw, g.c, s.o);
    let mut wt = vec![0i8; wq.len()];
    for oc in 0..o {
        for ch in 0..c {
            for i in 0..kh {
                for j in 0..kw {
                    wt[((ch * o + oc) * kh + (kh - 1 - i)) * kw + (kw - 1 - j)] =
                        wq[((oc * c + ch) * kh + i) * kw + j];
                }
            }
        }
    }
    wt
}

/// INT8 convolution: `y = conv2d(sx·xq, sw·wq) + bias` in FP32, on the INT8 GEMM. `sw` is one scale or
/// one per output channel.
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
    let s = ConvShape::new(x_shape, w_shape, stride, padding)?;
    check_len("xq", xq.len(), &x_shape)?;
    check_len("wq", wq.len(), &w_shape)?;
    check_scalar_scale("sx", sx)?;
    check_weight_scale(&sw, s.o)?;
    check_bias(bias, s.o)?;
    check_len("y", y.len(), &s.output())?;
    if y.is_empty() {
        return Ok(s);
    }
    let (k, p, o, xs) = (s.k(), s.p(), s.o, s.x_img());
    let wm = MatRef::row_major(wq, o, k)?;
    if let Some(imp) = PaddedGrid::new(&s) {
        for_each_chunk(y, o * p, 1, |n0, yc, _| {
            imp.forward_image(&xq[n0 * xs..(n0 + 1) * xs], &wm, sw, sx, bias, yc)
        })?;
        return Ok(s);
    }
    let nb = s.images_per_chunk(1, usize::MAX);
    for_each_chunk(y, o * p, nb, |n0, yc, _| {
        let nb = yc.len() / (o * p);
        let ld = nb * p;
        let xc = &xq[n0 * xs..(n0 + nb) * xs];
        let direct = s.g.is_pointwise() && nb == 1;
        let mut col = Scratch::default();
        if !direct {
            col = take_i8(k * ld);
            for i in 0..nb {
                im2col(&xc[i * xs..(i + 1) * xs], &s.g, &mut col[i * p..], ld);
            }
        }
        let cm = if direct {
            MatRef::row_major(xc, k, p)?
        } else {
            MatRef::row_major(&col, k, ld)?
        };
        if nb == 1 {
            gemm::gemm_i8_f32(&wm, &cm, sw, Scale::Scalar(sx), None, yc)?;
            if let Some(b) = bias {
                for (row, &bv) in yc.chunks_exact_mut(p).zip(b) {
                    row.iter_mut().for_each(|v| *v += bv);
                }
            }
        } else {
            let mut out = take_f32(o * ld);
            gemm::gemm_i8_f32(&wm, &cm, sw, Scale::Scalar(sx), None, &mut out)?;
            scatter_rows(&out, ld, &s, nb, bias, yc);
        }
        Ok(())
    })?;
    Ok(s)
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
    let s = ConvShape::new(x_shape, w_shape, stride, padding)?;
    check_len("xq", xq.len(), &x_shape)?;
    check_len("wq", wq.len(), &w_shape)?;
    check_len("dyq", dyq.len(), &s.output())?;
    check_scalar_scale("sx", sx)?;
    check_scalar_scale("sdy", sdy)?;
    check_weight_scale(&sw, s.o)?;
    check_len("dw", dw.len(), &w_shape)?;
    if let Some(d) = dx.as_deref() {
        check_len("dx", d.len(), &x_shape)?;
    }
    let (k, p, o, xs, n) = (s.k(), s.p(), s.o, s.x_img(), s.g.n);
    if n == 0 || o == 0 || xs == 0 {
        dw.fill(0.0);
        if let Some(d) = dx {
            d.fill(0.0);
        }
        return Ok(s);
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
    if let (Scale::Scalar(swv), Some(d), Some(st)) =
        (sw, dx.as_deref_mut(), transposed_dx_shape(&s))
    {
        let g = s.g;
        conv2d_i8_forward(
            dyq,
            [n, o, g.oh, g.ow],
            sdy,
            &flipped_transpose(&s, wq),
            [g.c, o, g.kh, g.kw],
            Scale::Scalar(swv),
            None,
            (1, 1),
            (st.g.ph, st.g.pw),
            d,
        )?;
        dx = None; // done: the chunks below compute dW only
    }
    let nb = s.images_per_chunk(1, MAX_K_I32);
    let nchunks = n.div_ceil(nb);
    let par = nchunks < threads::num_threads();
    let dx_chunks: Vec<Option<&mut [f32]>> = match dx {
        Some(d) => d.chunks_mut(nb * xs).map(Some).collect(),
        None => (0..nchunks).map(|_| None).collect(),
    };
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
        let mut dyt_buf: Scratch<i8>;
        let dyt = if nb == 1 {
            dyc
        } else {
            dyt_buf = take_i8(o * ld);
            gather_rows(dyc, &s, nb, &mut dyt_buf, ld);
            &dyt_buf[..]
        };
        let dym = MatRef::row_major(dyt, o, ld)?;
        let xc = &xq[n0 * xs..(n0 + nb) * xs];
        let direct = s.g.is_pointwise() && nb == 1;
        let mut col = Scratch::default();
        if !direct {
            col = take_i8(k * ld);
            for i in 0..nb {
                im2col(&xc[i * xs..(i + 1) * xs], &s.g, &mut col[i * p..], ld);
            }
        }
        let cm = if direct {
            MatRef::row_major(xc, k, p)?
        } else {
            MatRef::row_major(&col, k, ld)?
        };
        // dW: exact INT32 products, summed in i64-exact f64 across chunks. Computed transposed,
        // dWᵀ (K × O) = col · dYᵀ: the wide patch matrix is the A operand (packed without column sums)
        // and only the O columns of dYᵀ need the VNNI kernel's column sums.
        if ld <= MAX_K_I32 {
            gemm::gemm_i8(&cm, &dym.t(), &mut acc.prod)?;
            acc.dw
                .iter_mut()
                .zip(&acc.prod)
                .for_each(|(a, &v)| *a += v as f64);
        } else {
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
        if let Some(dxc) = dxc {
            // dcol = Wᵀ·dY (K × ld), written straight into dx when the patch matrix is the image.
            let dcol_into = |dst: &mut [f32]| -> Result<()> {
                match (&wfm, sw) {
                    (Some(wfm), Scale::PerIndex(swv)) => {
                        let mut dys = take_f32(o * ld);
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
                let mut dcol = take_f32(k * ld);
                dcol_into(&mut dcol)?;
                for i in 0..nb {
                    col2im(&mut dcol[i * p..], ld, &s.g, &mut dxc[i * xs..(i + 1) * xs]);
                }
            }
        }
        Ok(())
    };
    let zero = || Acc {
        dw: vec![0f64; o * k],
        prod: vec![0i32; o * k],
        prod_f32: vec![0f32; o * k],
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
    let scale = sdy as f64 * sx as f64;
    // acc.dw is dWᵀ (K × O)
    for (oc, row) in dw.chunks_exact_mut(k).enumerate() {
        for (kk, d) in row.iter_mut().enumerate() {
            *d = (acc.dw[kk * o + oc] * scale) as f32;
        }
    }
    Ok(s)
}
