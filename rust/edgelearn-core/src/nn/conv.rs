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
//!
//! INT8, stride 1 (`PaddedGrid`): no patch matrix at all. A chunk of images is laid side by side on
//! zero-padded planes, where every patch row is the plane read from an offset: the forward packs its
//! `B` straight from the planes, or (AVX-512 VNNI, [`gemm::direct`]) reads them in place with channels
//! interleaved by 4 and stores its tiles straight into NCHW; `dX` is the forward convolution of `dY`
//! with the flipped, transposed kernel; `dW` reads the planes as a rows `A` operand. All sums are
//! exact INT32, so every path gives the same bits.

use rayon::prelude::*;

use super::im2col::{col2im, im2col};
use super::matmul::{sgemm, MatF32};
use super::{check_len, shape_len, take_f32, take_i8, Geometry, Scratch, Window2d};
use crate::error::{Error, Result};
use crate::gemm::{self, MatRef, RowsRef, Scale, MAX_K_I32};
use crate::threads;

/// The padded grid computes `S/OW` times the outputs (see [`PaddedGrid`]); it is used while the extra
/// `S/OW − 1` stays within this fraction (numerator, denominator).
const GRID_MAX_EXTRA: (usize, usize) = (1, 7);

/// Bytes of patch matrix per chunk of images (about an L2 cache).
const COL_BUDGET: usize = 256 * 1024;

/// Bytes of implicit patch matrix per chunk of the padded grid: larger chunks mean fewer, wider GEMMs
/// (one thread, batch 32, 32→64 channels at 7x7: backward 384 µs with 128 KiB, 346 with 1 MiB).
const GRID_BUDGET: usize = 1024 * 1024;

/// Pixels per plane from which a 1x1 convolution runs one GEMM per image, in place (one thread, batch 32,
/// INT8 16→96 channels at 56x56: forward about 8 ms through gathered chunks of 5 images, 6 in place).
const POINTWISE_DIRECT_MIN: usize = 256;

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
        let y = shape_len("y", &[g.n, w[0], g.oh, g.ow])?;
        // The output and (at most) one image's patch matrix are allocated together: refuse absurd ones
        // (huge padding) before anything is allocated.
        crate::alloc::check("y", y.saturating_add(g.k().saturating_mul(g.p())), 4)?;
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
    /// and the chunk's pixel count stays within `max_cols` (the INT32 bound of the `dW` product). A 1x1
    /// convolution on planes of at least [`POINTWISE_DIRECT_MIN`] pixels takes one image per chunk: its
    /// GEMMs then read `x` and write `y`/`dx` in place, with no copy of either.
    fn images_per_chunk(&self, elem_bytes: usize, max_cols: usize) -> usize {
        if self.g.is_pointwise() && self.p() >= POINTWISE_DIRECT_MIN {
            return 1;
        }
        let per = (self.k() * self.p() * elem_bytes).max(1);
        let n = self.g.n.max(1);
        let mut nb = (COL_BUDGET / per).clamp(1, n);
        nb = nb.min(n.div_ceil(threads::num_threads()));
        nb = nb.min((max_cols / self.p().max(1)).max(1));
        nb.max(1)
    }
}

pub(super) fn check_bias(bias: Option<&[f32]>, o: usize) -> Result<()> {
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

pub(super) fn check_scalar_scale(arg: &'static str, s: f32) -> Result<()> {
    if !s.is_finite() {
        return Err(Error::invalid(arg, format!("must be finite, got {s}")));
    }
    Ok(())
}

pub(super) fn check_weight_scale(sw: &Scale, o: usize) -> Result<()> {
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

/// Sum of `v` in 32 independent f32 lanes (no add waits on the one before) per block of 2048 values,
/// each block flushed to f64.
#[inline(always)]
fn sum_lanes(v: &[f32]) -> f64 {
    let mut total = 0f64;
    for block in v.chunks(2048) {
        let mut lanes = [[0f32; 8]; 4];
        let mut quads = block.chunks_exact(32);
        for q in &mut quads {
            for (l, c8) in lanes.iter_mut().zip(q.chunks_exact(8)) {
                for (a, &x) in l.iter_mut().zip(c8) {
                    *a += x;
                }
            }
        }
        total += quads.remainder().iter().map(|&x| x as f64).sum::<f64>();
        total += lanes.iter().flatten().map(|&x| x as f64).sum::<f64>();
    }
    total
}

/// Channel sums of planes smaller than this are added image by image into a `C × plane` accumulator
/// (vectors across channels) while it stays within `CHANNEL_SUM_ROWS_MAX` floats; larger planes are
/// summed one by one (one thread, batch 32: 7x7 planes 5 µs image by image against 25 plane by plane;
/// 28x28 planes 17 µs plane by plane against 22 channel by channel).
const CHANNEL_SUM_PLANE_MIN: usize = 256;
const CHANNEL_SUM_ROWS_MAX: usize = 1 << 16;

crate::simd::avx2_multiversion! {
/// `out[c] = Σ x[n, c, ...]` of a C-ordered `x` of shape `(N, C, rest...)` (`plane` values per `(n, c)`):
/// the bias gradient `Σ dY` of the INT8 layers. Small images are first added image by image into one
/// `C × plane` f32 array (full-width vector adds whatever the plane size, N values per element), then
/// each channel's row is summed ([`sum_lanes`]); larger planes one by one.
fn channel_sums_body(x: &[f32], c: usize, plane: usize, out: &mut [f32]) {
    let img = c * plane;
    if plane < CHANNEL_SUM_PLANE_MIN && img <= CHANNEL_SUM_ROWS_MAX {
        let mut acc = vec![0f32; img];
        for im in x.chunks_exact(img) {
            for (a, &v) in acc.iter_mut().zip(im) {
                *a += v;
            }
        }
        for (o, row) in out.iter_mut().zip(acc.chunks_exact(plane)) {
            *o = sum_lanes(row) as f32;
        }
    } else {
        let mut acc = vec![0f64; c];
        for (i, p) in x.chunks_exact(plane).enumerate() {
            acc[i % c] += sum_lanes(p);
        }
        for (o, a) in out.iter_mut().zip(acc) {
            *o = a as f32;
        }
    }
}
}

/// `out (C,) = Σ over every axis but 1` of `x` with `shape (N, C, rest...)`: the per-channel sum of an
/// FP32 gradient (a bias gradient). An error if the sizes disagree.
pub fn channel_sums(x: &[f32], shape: &[usize], out: &mut [f32]) -> Result<()> {
    if shape.len() < 2 {
        return Err(Error::invalid(
            "x",
            format!("needs at least 2 dimensions (N, C, ...), got shape {shape:?}"),
        ));
    }
    check_len("x", x.len(), shape)?;
    let c = shape[1];
    if out.len() != c {
        return Err(Error::invalid(
            "out",
            format!("expected {c} values (one per channel), got {}", out.len()),
        ));
    }
    let plane: usize = shape[2..].iter().product();
    if plane == 0 || c == 0 || x.is_empty() {
        out.fill(0.0);
        return Ok(());
    }
    channel_sums_body(x, c, plane, out);
    Ok(())
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
    if n <= nb {
        // one chunk: on the calling thread (its GEMM still spreads over the pool when large enough)
        return f(0, out, inner_parallel);
    }
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
                col = take_f32(k * p)?;
                im2col(xc, &s.g, &mut col, p);
                MatF32::row_major(&col, k, p)?
            };
            // SAFETY: `yc` is one image's O×P output.
            unsafe { sgemm(&wm, &cm, yc.as_mut_ptr(), p, bias.is_some(), par) };
        } else {
            let ld = nb * p;
            let mut col = take_f32(k * ld)?;
            for i in 0..nb {
                im2col(&xc[i * xs..(i + 1) * xs], &s.g, &mut col[i * p..], ld);
            }
            let mut out = take_f32(o * ld)?;
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
                dyt_buf = take_f32(o * ld)?;
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
                col = take_f32(k * ld)?;
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

/// Implicit im2col for stride-1 INT8 convolutions. A chunk of `nb` images is copied side by side into
/// one zero-padded plane per channel: `Hp = H + 2ph` rows of `Wp = nb·S + pw` bytes, image `i` at column
/// `pw + i·S` with `S = W + pw`, so neighbouring images share their `pw` zero columns. Outputs are
/// computed on a grid as wide as a padded row (output `(i, r, j)` at grid column `r·Wp + i·S + j`), and on
/// that grid row `(c, ki, kj)` of the patch matrix is the padded plane itself read from offset
/// `c·plane + ki·Wp + kj`: the GEMM packs its `B` operand straight from the plane ([`RowsRef`]), so no
/// patch matrix is written or read. The grid holds `S − OW` unused columns per image row (1/7 of the
/// outputs for a 3x3 kernel with padding 1 on 7x7 images, 1/14 on 14x14), so it is used only while that
/// stays within [`GRID_MAX_EXTRA`].
struct PaddedGrid {
    g: Geometry,
    /// Output channels.
    o: usize,
    /// Column stride of one image in a padded row, `W + pw`.
    s: usize,
}

/// One chunk's layout on the grid of [`PaddedGrid`].
struct GridChunk {
    /// Padded row width `nb·S + pw`: the grid's row stride.
    wp: usize,
    /// Bytes of one channel's padded plane, `Hp·Wp`.
    plane: usize,
    /// Grid columns the GEMM computes: up to the last real output.
    ncols: usize,
}

impl PaddedGrid {
    /// Whether `s` takes the grid: stride 1 and the grid's extra columns within [`GRID_MAX_EXTRA`] of
    /// the `OW` real ones.
    fn applies(s: &ConvShape) -> bool {
        let g = s.g;
        let usable = g.sh == 1 && g.sw == 1 && !g.is_pointwise() && s.o > 0 && g.oh > 0 && g.ow > 0;
        usable && (g.w + g.pw - g.ow) * GRID_MAX_EXTRA.1 <= GRID_MAX_EXTRA.0 * g.ow
    }

    /// The grid for `s`, if it [`applies`](Self::applies).
    fn new(s: &ConvShape) -> Option<Self> {
        Self::applies(s).then_some(PaddedGrid {
            g: s.g,
            o: s.o,
            s: s.g.w + s.g.pw,
        })
    }

    /// Images per chunk: the chunk's buffers near [`GRID_BUDGET`] (the implicit patch matrix, `K × ncols`
    /// bytes once packed, and the FP32 output of the GEMM, `O × ncols` floats; they are kept for reuse,
    /// so this also bounds the memory a training step holds), and every thread gets a chunk.
    fn images_per_chunk(&self) -> usize {
        let g = &self.g;
        let per = ((g.k() + 4 * self.o) * g.oh * self.s).max(1);
        let n = g.n.max(1);
        (GRID_BUDGET / per)
            .clamp(1, n)
            .min(n.div_ceil(threads::num_threads()))
            .max(1)
    }

    fn chunk(&self, nb: usize) -> GridChunk {
        let g = &self.g;
        let wp = nb * self.s + g.pw;
        GridChunk {
            wp,
            plane: (g.h + 2 * g.ph) * wp,
            ncols: (g.oh - 1) * wp + (nb - 1) * self.s + g.ow,
        }
    }

    /// `nb` images `x (nb, C, H, W)` in the zero-padded planes of `c` (returned: `C` planes, plus the
    /// bytes the last patch row reads past them).
    fn pad(&self, x: &[i8], nb: usize, c: &GridChunk) -> Result<Scratch<i8>> {
        let g = &self.g;
        // The last patch row (ch = C−1, ki = kh−1, kj = kw−1) reads ncols bytes from its offset.
        let len = (g.c - 1) * c.plane + (g.kh - 1) * c.wp + g.kw - 1 + c.ncols;
        let mut xp = take_i8(len.max(g.c * c.plane))?;
        lay_on_grid(x, nb, g.c, g.h, g.w, &self.image_at(c), &mut xp);
        Ok(xp)
    }

    /// Where the input images go on the padded planes of `c`.
    fn image_at(&self, c: &GridChunk) -> GridAt {
        GridAt {
            plane: c.plane,
            wp: c.wp,
            top: self.g.ph,
            left: self.g.pw,
            s: self.s,
        }
    }

    /// `nb` images `x (nb, C, H, W)` laid for the direct kernel (channels interleaved by 4, see
    /// [`lay_grouped`]), with their k-group offsets `(c/4, ki, kj)` in positions.
    fn grouped(&self, x: &[i8], nb: usize, c: &GridChunk) -> Result<(Scratch<i8>, Vec<usize>)> {
        let g = &self.g;
        let cgs = g.c.div_ceil(4);
        let offsets = self.tap_offsets(cgs, c);
        // The kernel reads whole tiles of 16 positions from every k-group's offset.
        let span = c.ncols.div_ceil(16) * 16;
        let positions = (offsets.iter().max().copied().unwrap_or(0) + span).max(cgs * c.plane);
        let mut buf = take_i8(positions * 4)?;
        lay_grouped(x, nb, g.c, g.h, g.w, &self.image_at(c), &mut buf);
        Ok((buf, offsets))
    }

    /// Offsets of the taps `(plane, ki, kj)` of `planes` padded planes of `c`: the patch rows
    /// `(ch, ki, kj)` (`planes = C`), or the direct kernel's k-groups `(c/4, ki, kj)` in positions.
    fn tap_offsets(&self, planes: usize, c: &GridChunk) -> Vec<usize> {
        let g = &self.g;
        (0..planes)
            .flat_map(|pl| {
                (0..g.kh).flat_map(move |i| (0..g.kw).map(move |j| pl * c.plane + i * c.wp + j))
            })
            .collect()
    }

    /// Images per chunk of the `dW` product, whose reduction runs over the `ncols` grid columns: as
    /// [`images_per_chunk`](Self::images_per_chunk), with `ncols` within [`MAX_K_I32`] (`None` if one
    /// image is already past it).
    fn dw_images_per_chunk(&self) -> Option<usize> {
        let g = &self.g;
        let fit = (MAX_K_I32 / g.oh).saturating_sub(g.pw) / self.s;
        (fit >= 1).then(|| self.images_per_chunk().min(fit))
    }

    /// `dWᵀ (K × O)` of a chunk as exact INT32 sums, `prod = col(x) · dYᵀ` over the grid: the patch rows
    /// of the padded planes are the `A` operand ([`gemm::gemm_i8_rows_a`]), and `dY (nb, O, OH, OW)` is
    /// laid on the grid with zeros in the unused columns, so those contribute nothing.
    fn dw_chunk(&self, x: &[i8], dy: &[i8], nb: usize, o: usize, prod: &mut [i32]) -> Result<()> {
        let c = self.chunk(nb);
        let xp = self.pad(x, nb, &c)?;
        let offsets = self.tap_offsets(self.g.c, &c);
        let a = RowsRef::new(&xp, &offsets, c.ncols)?;
        let g = &self.g;
        let mut dyg = take_i8(o * c.ncols)?;
        let at = GridAt {
            plane: c.ncols,
            wp: c.wp,
            top: 0,
            left: 0,
            s: self.s,
        };
        lay_on_grid(dy, nb, o, g.oh, g.ow, &at, &mut dyg);
        let b = MatRef::row_major(&dyg, o, c.ncols)?.t();
        gemm::gemm_i8_rows_a(&a, &b, prod)
    }

    /// `y (nb, O, OH, OW)` of the chunk of images `x (nb, C, H, W)`: through the direct kernel when
    /// `direct` weights are given, else the GEMM with the planes as a rows operand.
    #[allow(clippy::too_many_arguments)]
    fn forward_chunk(
        &self,
        x: &[i8],
        nb: usize,
        wm: &MatRef,
        direct: Option<&gemm::direct::DirectWeights>,
        sw: Scale,
        sx: f32,
        bias: Option<&[f32]>,
        y: &mut [f32],
        parallel: bool,
    ) -> Result<()> {
        let c = self.chunk(nb);
        let o = wm.rows();
        let g = &self.g;
        let to = gemm::direct::GridScatter {
            wp: c.wp,
            s: self.s,
            ow: g.ow,
            nb,
            p: g.p(),
            bias,
        };
        if let Some(dw) = direct {
            let (img, offsets) = self.grouped(x, nb, &c)?;
            let b = gemm::direct::GroupedImage::new(&img, &offsets, c.ncols)?;
            return gemm::direct::conv_direct_f32(dw, &b, sw, sx, y, &to, parallel);
        }
        let mut out = take_f32(o * c.ncols)?;
        let xp = self.pad(x, nb, &c)?;
        let offsets = self.tap_offsets(self.g.c, &c);
        let b = RowsRef::new(&xp, &offsets, c.ncols)?;
        gemm::gemm_i8_f32_rows(wm, &b, sw, Scale::Scalar(sx), None, &mut out)?;
        match bias {
            Some(b) => scatter_grid_bias(&out, c.ncols, o, &to, b, y),
            None => scatter_grid(&out, c.ncols, o, &to, y),
        }
        Ok(())
    }
}

/// Where [`lay_on_grid`] puts images: row `r` of plane `pl` of image `i` at
/// `pl·plane + (r + top)·wp + left + i·s`.
struct GridAt {
    plane: usize,
    wp: usize,
    top: usize,
    left: usize,
    s: usize,
}

/// `KEEP16[16 − len ..][..16]` keeps the first `len` bytes of 16.
static KEEP16: [u8; 32] = {
    let mut k = [0u8; 32];
    let mut i = 0;
    while i < 16 {
        k[i] = 0xff;
        i += 1;
    }
    k
};

/// Lays the `nb` images `src (nb, C, rows, w)` on a grid for the direct kernel
/// ([`gemm::direct::GroupedImage`]): channels interleaved by 4, byte `j` of position
/// `cg·plane + (r + top)·wp + left + i·s + col` is `src[i, 4·cg + j, r, col] ^ 0x80`, and every other
/// byte `0x80` (the zero of the shifted values, also for channels past `C`). As in [`lay_on_grid`],
/// positions are written in increasing order, 16 at a time, the ones past a row as `0x80`.
fn lay_grouped(
    src: &[i8],
    nb: usize,
    c: usize,
    rows: usize,
    w: usize,
    at: &GridAt,
    dst: &mut [i8],
) {
    dst.fill(0x80u8 as i8);
    let (plane_in, img) = (rows * w, c * rows * w);
    // (x86) a run is moved in whole blocks of 16 positions: 16-byte reads per channel, 64-byte writes
    #[cfg(target_arch = "x86_64")]
    let span = w.div_ceil(16) * 16;
    for cg in 0..c.div_ceil(4) {
        let nch = (c - 4 * cg).min(4);
        for r in 0..rows {
            for i in 0..nb {
                let d = cg * at.plane + (r + at.top) * at.wp + at.left + i * at.s;
                let so = i * img + (4 * cg * rows + r) * w;
                #[cfg(target_arch = "x86_64")]
                if (d + span) * 4 <= dst.len() && so + (nch - 1) * plane_in + span <= src.len() {
                    use std::arch::x86_64::*;
                    // SAFETY: every 16-byte read (channels `< nch`, blocks below `span`) and 64-byte
                    // write was just checked to lie inside `src`/`dst`; SSE2 is part of x86-64.
                    unsafe {
                        let flip = _mm_set1_epi8(0x80u8 as i8);
                        let sp = src.as_ptr().add(so);
                        let dp = dst.as_mut_ptr().add(d * 4);
                        let mut q = 0;
                        while q < w {
                            let len = (w - q).min(16);
                            let keep =
                                _mm_loadu_si128(KEEP16.as_ptr().add(16 - len) as *const __m128i);
                            let rows4: [__m128i; 4] = std::array::from_fn(|j| {
                                if j < nch {
                                    let v =
                                        _mm_loadu_si128(sp.add(j * plane_in + q) as *const __m128i);
                                    _mm_xor_si128(_mm_and_si128(v, keep), flip)
                                } else {
                                    flip
                                }
                            });
                            gemm::x86::pack::store_interleaved(rows4, dp.add(q * 4));
                            q += 16;
                        }
                    }
                    continue;
                }
                for col in 0..w {
                    for j in 0..4 {
                        let v = if j < nch {
                            src[so + j * plane_in + col]
                        } else {
                            0
                        };
                        dst[(d + col) * 4 + j] = v ^ (0x80u8 as i8);
                    }
                }
            }
        }
    }
}

/// Lays the `nb` images `src (nb, planes, rows, w)` side by side on a grid `dst` that is zero everywhere
/// else (see [`GridAt`]). Rows are written in increasing address order, 16 bytes at a time with the
/// bytes past a row written as zeros (a later row rewrites any that are its own), so a short row costs
/// one load, one mask and one store rather than a `memcpy` call.
#[allow(clippy::too_many_arguments)]
fn lay_on_grid(
    src: &[i8],
    nb: usize,
    planes: usize,
    rows: usize,
    w: usize,
    at: &GridAt,
    dst: &mut [i8],
) {
    dst.fill(0);
    if nb == 0 || planes == 0 || rows == 0 || w == 0 {
        return;
    }
    let img = planes * rows * w;
    assert!(nb * img <= src.len());
    let last_d = (planes - 1) * at.plane + (rows - 1 + at.top) * at.wp + at.left + (nb - 1) * at.s;
    assert!(last_d + w <= dst.len());
    let (slen, dlen) = (src.len(), dst.len());
    let (sp, dp) = (src.as_ptr(), dst.as_mut_ptr());
    for pl in 0..planes {
        for r in 0..rows {
            let mut so = (pl * rows + r) * w;
            let mut d = pl * at.plane + (r + at.top) * at.wp + at.left;
            for _ in 0..nb {
                let mut q = 0;
                while q < w {
                    let len = (w - q).min(16);
                    let (dq, sq) = (d + q, so + q);
                    // SAFETY: every run lies inside `src` and `dst` (asserted above for the last, the
                    // largest offsets); 16-byte moves only where both have 16 bytes.
                    unsafe {
                        if dq + 16 <= dlen && sq + 16 <= slen {
                            let v = std::ptr::read_unaligned(sp.add(sq) as *const u128);
                            let keep = std::ptr::read_unaligned(
                                KEEP16.as_ptr().add(16 - len) as *const u128
                            );
                            std::ptr::write_unaligned(dp.add(dq) as *mut u128, v & keep);
                        } else {
                            std::ptr::copy_nonoverlapping(sp.add(sq), dp.add(dq), len);
                        }
                    }
                    q += 16;
                }
                so += img;
                d += at.s;
            }
        }
    }
}

/// Eight values `s[..8]` (plus `bv` if `ADD`) into `d[..8]`.
#[inline(always)]
fn move8<const ADD: bool>(d: &mut [f32], s: &[f32], bv: f32) {
    let sv: &[f32; 8] = s[..8].try_into().unwrap();
    let dv: &mut [f32; 8] = (&mut d[..8]).try_into().unwrap();
    for t in 0..8 {
        dv[t] = if ADD { sv[t] + bv } else { sv[t] };
    }
}

/// Copies output row `(i, oc, r)` of a grid `src (O × ncols)` to `y` at the place `to` gives (plus
/// `bias[oc]` if `ADD`), rows in increasing order of `y` address, in blocks of 8 values: a row of 8 or
/// more ends with a block overlapping the one before; a shorter row is moved as 8 values when both ends
/// have room, the extra ones landing on outputs a later row overwrites.
#[inline(always)]
fn scatter_grid_body<const ADD: bool>(
    src: &[f32],
    ncols: usize,
    o: usize,
    to: &gemm::direct::GridScatter,
    bias: &[f32],
    y: &mut [f32],
) {
    let ow = to.ow;
    let total = y.len();
    for i in 0..to.nb {
        for oc in 0..o {
            let bv = if ADD { bias[oc] } else { 0.0 };
            for r in 0..to.p / ow {
                let sb = oc * ncols + r * to.wp + i * to.s;
                let db = (i * o + oc) * to.p + r * ow;
                if ow >= 8 {
                    let (s, d) = (&src[sb..sb + ow], &mut y[db..db + ow]);
                    let mut q = 0;
                    loop {
                        let b = q.min(ow - 8);
                        move8::<ADD>(&mut d[b..], &s[b..], bv);
                        q += 8;
                        if q >= ow {
                            break;
                        }
                    }
                } else if db + 8 <= total && sb + 8 <= src.len() {
                    move8::<ADD>(&mut y[db..], &src[sb..], bv);
                } else {
                    for (d, &v) in y[db..db + ow].iter_mut().zip(&src[sb..sb + ow]) {
                        *d = if ADD { v + bv } else { v };
                    }
                }
            }
        }
    }
}

crate::simd::avx2_multiversion! {
/// `y` from the grid output `src (O × ncols)` of [`PaddedGrid`] (the layout of the direct kernel's
/// [`gemm::direct::GridScatter`]; its bias is not read here).
fn scatter_grid(src: &[f32], ncols: usize, o: usize, to: &gemm::direct::GridScatter, y: &mut [f32]) {
    scatter_grid_body::<false>(src, ncols, o, to, &[], y)
}
}

crate::simd::avx2_multiversion! {
/// [`scatter_grid`] plus `bias[o]`.
fn scatter_grid_bias(
    src: &[f32],
    ncols: usize,
    o: usize,
    to: &gemm::direct::GridScatter,
    bias: &[f32],
    y: &mut [f32],
) {
    scatter_grid_body::<true>(src, ncols, o, to, bias, y)
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
    if let Some(grid) = PaddedGrid::new(&s) {
        // The direct kernel pads channels to groups of 4: used while that adds at most a quarter
        // (one thread, batch 32, 1 channel at 28x28: 92 µs through the GEMM, 106 direct).
        let direct = if s.g.c.div_ceil(4) * 4 * 4 <= s.g.c * 5 && gemm::direct::direct_available() {
            Some(gemm::direct::DirectWeights::new(
                wq,
                o,
                s.g.c,
                s.g.kh * s.g.kw,
            )?)
        } else {
            None
        };
        for_each_chunk(y, o * p, grid.images_per_chunk(), |n0, yc, par| {
            let nb = yc.len() / (o * p);
            let x = &xq[n0 * xs..(n0 + nb) * xs];
            grid.forward_chunk(x, nb, &wm, direct.as_ref(), sw, sx, bias, yc, par)
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
            col = take_i8(k * ld)?;
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
            let mut out = take_f32(o * ld)?;
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
    // With dX done (or not asked for), dW can take the padded grid. It saves the patch matrix
    // (K × nb·P bytes) but lays dY on the grid (O × ncols bytes), so it pays only when K > O (one
    // thread, batch 32, 1→16 channels at 28x28: 67 µs through the patch matrix, 87 on the grid).
    let grid = match dx {
        None if k > o => {
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
            gr.dw_chunk(&xq[n0 * xs..(n0 + nb) * xs], dyc, nb, o, &mut acc.prod)?;
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
        let xc = &xq[n0 * xs..(n0 + nb) * xs];
        let direct = s.g.is_pointwise() && nb == 1;
        let mut col = Scratch::default();
        if !direct {
            col = take_i8(k * ld)?;
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
            add_prod(acc);
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
