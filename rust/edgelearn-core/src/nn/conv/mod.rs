//! 2-D convolution, forward and backward, in FP32 and INT8 (NCHW, weights `(O, C, kh, kw)`).
//!
//! How a convolution runs is chosen once per shape and GEMM kernel by a [`ConvPlan`] ([`plan`]), which
//! names the algorithm ([`ConvAlgo`]): im2col + GEMM, the padded grid (GEMM or the direct VNNI kernel), one
//! dense GEMM on small planes (per-tensor weight scales only), or the grouped/depthwise kernels of
//! [`crate::nn::depthwise`]. The `conv2d_*` functions build a plan and run it. Files: [`plan`] (the choice
//! and its dispatch), [`f32`](mod@f32) and [`i8`](mod@i8) (the two element types), [`grid`] (the padded grid: layouts and
//! scatter), [`direct`] (the AVX-512 VNNI direct kernel on that grid), [`smallplane`] (small planes as
//! one dense GEMM), [`sums`] (channel sums: bias gradients). Not here: im2col itself ([`super::im2col`]), the
//! GEMMs ([`crate::gemm`], [`super::matmul`]), quantization.
//!
//!
//! Method: im2col + GEMM, in the "weights on the left" orientation. For a chunk of `nb` images the patch
//! matrices sit side by side in one `K × (nb·P)` matrix (`K = C·kh·kw`, `P = OH·OW`), and
//!
//! - forward: `Y' = W (O×K) · col (K×nb·P)` — with `nb = 1` this is the image's `(O, OH, OW)` output in
//!   place (NCHW, no transpose); with `nb > 1` one copy puts rows back in NCHW order and adds the bias;
//! - backward: `dW += dY' (O×nb·P) · colᵀ`, `dcol = Wᵀ · dY'` then col2im per image.
//!
//! The chunk size keeps a chunk's patch matrix near L2 size, and chunks are spread over the pool (each
//! one's GEMM runs on its worker; with fewer chunks than threads, e.g. one image at inference, the GEMM,
//! the unfolding (by groups of input channels) and the bias rows are threaded instead). 1x1 stride-1
//! unpadded convolutions skip im2col: an image already is its patch matrix.
//!
//! INT8: patches are unfolded as INT8 and multiplied on the INT8 GEMM ([`crate::gemm`]), whose epilogue
//! applies `sw[o]·sx` (per-tensor or per-output-channel weight scale: a per-row scale of `W`). `dW` sums
//! exact INT32 products (in i64 across chunks) before the single rescale by `sdy·sx`. `dX` contracts over
//! output channels, so a per-channel weight scale cannot be factored out of an INT8 product: that case
//! scales `dY` by `sdy·sw[o]` in FP32 and runs the FP32 GEMM (exact up to float rounding, like the rest).
//!
//! INT8, stride 1 (`PaddedGrid`): no patch matrix at all. A chunk of images is laid side by side on
//! zero-padded planes, where every patch row is the plane read from an offset: the forward packs its
//! `B` straight from the planes, or (AVX-512 VNNI, [`direct`]) reads them in place with channels
//! interleaved by 4 and stores its tiles straight into NCHW; `dX` is the forward convolution of `dY`
//! with the flipped, transposed kernel; `dW` reads the planes as a rows `A` operand. All sums are
//! exact INT32, so every path gives the same bits.

pub mod direct;
mod f32;
mod grid;
mod i8;
pub mod plan;
mod smallplane;
mod sums;

pub use self::f32::{conv2d_f32_backward, conv2d_f32_forward};
pub use self::i8::{conv2d_i8_backward, conv2d_i8_forward};
pub use plan::{ConvAlgo, ConvPlan, WeightScales};
pub use sums::{channel_sums, channel_sums_and_range};

use rayon::prelude::*;

use super::im2col::im2col;
use super::{shape_len, Geometry, Scratch, ScratchElem, Window2d};
use crate::error::{Error, Result};
use crate::gemm::Scale;
use crate::threads;

/// Bytes of patch matrix per chunk of images (about an L2 cache).
const COL_BUDGET: usize = 256 * 1024;

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
    /// `(N, C, H, W)`.
    pub fn input(&self) -> [usize; 4] {
        [self.g.n, self.g.c, self.g.h, self.g.w]
    }
    /// `(O, C, kh, kw)`.
    pub fn weight(&self) -> [usize; 4] {
        [self.o, self.g.c, self.g.kh, self.g.kw]
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
    /// Whether a chunk of `nb` images is its own patch matrix (one image of a 1x1 stride-1 unpadded
    /// convolution: `C × HW` is `K × P`), read in place by [`patch_matrix`].
    fn image_is_patch_matrix(&self, nb: usize) -> bool {
        self.g.is_pointwise() && nb == 1
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

/// Below this many patch-matrix elements the unfolding stays on the calling thread.
const PAR_MIN_PATCH: usize = 1 << 17;

/// The `K × nb·P` patch matrix of the chunk `xc` of `nb` images (their patch matrices side by side, row
/// stride `nb·P`): for one image of a 1x1 stride-1 unpadded convolution the image itself, read in place;
/// else unfolded (im2col) into `col`, a scratch buffer taken here.
///
/// `parallel` (the chunk's GEMM is threaded: fewer chunks than threads, e.g. one image at inference): a
/// large matrix is unfolded by groups of input channels over the pool (the rows of channels `c0..c1` are
/// one contiguous block, whatever `nb`). Unfolding copies values, so the matrix is the same either way.
/// On one 240x320 image, 16 channels, 3x3 stride 2 (a 2.7 MB patch matrix, INT8) the serial unfolding
/// was a third of the layer's time and did not shrink with threads.
fn patch_matrix<'a, T: ScratchElem + Send + Sync>(
    s: &ConvShape,
    xc: &'a [T],
    nb: usize,
    col: &'a mut Scratch<T>,
    parallel: bool,
) -> Result<&'a [T]> {
    if s.image_is_patch_matrix(nb) {
        return Ok(xc);
    }
    let (p, xs) = (s.p(), s.x_img());
    let ld = nb * p;
    *col = Scratch::new(s.k() * ld)?;
    let (c, taps) = (s.g.c, s.g.kh * s.g.kw);
    let threads = threads::num_threads();
    if parallel && threads > 1 && c > 1 && taps > 0 && s.k() * ld >= PAR_MIN_PATCH {
        let per = c.div_ceil(4 * threads).max(1);
        let hw = s.g.hw();
        let g = s.g;
        super::for_each_chunk(&mut col[..], per * taps * ld, true, |gi, rows| {
            let c0 = gi * per;
            let sub = Geometry {
                c: per.min(c - c0),
                ..g
            };
            for i in 0..nb {
                let x = &xc[i * xs + c0 * hw..i * xs + (c0 + sub.c) * hw];
                im2col(x, &sub, &mut rows[i * p..], ld);
            }
        });
    } else {
        for i in 0..nb {
            im2col(&xc[i * xs..(i + 1) * xs], &s.g, &mut col[i * p..], ld);
        }
    }
    Ok(&col[..])
}

/// `op(row o, bias[o])` on every row of one image's output `y (O × P)` (adding the bias after a GEMM, or
/// setting it before one accumulates), spread over the pool by groups of rows when `parallel` and large.
fn row_bias(
    y: &mut [f32],
    p: usize,
    bias: &[f32],
    parallel: bool,
    op: impl Fn(&mut [f32], f32) + Sync,
) {
    let parallel = parallel && super::worth_parallel(y.len());
    // groups of rows: about four a thread in the pool, else all of them
    let per = if parallel {
        bias.len().div_ceil(4 * threads::num_threads()).max(1)
    } else {
        bias.len().max(1)
    };
    super::for_each_chunk(y, per * p, parallel, |i, rows| {
        for (row, &bv) in rows.chunks_exact_mut(p.max(1)).zip(&bias[i * per..]) {
            op(row, bv);
        }
    });
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
    threads::for_each_piece(out, nb * per_image, |ci, c| f(ci * nb, c, inner_parallel))
}

/// Groups of chunks whose partial sums [`fold_in_order`] keeps apart: a constant, so that a floating-point
/// sum over chunks is grouped the same way on any thread count (up to this many groups run at once).
const SUM_GROUPS: usize = 8;

/// Runs `f(acc, chunk index, item)` over `items` in [`SUM_GROUPS`] contiguous groups spread over the pool,
/// each group folding its chunks in order into its own accumulator, then adds the groups in order with
/// `add`. Unlike a work-stealing fold, which chunks share an accumulator does not depend on the thread
/// count or on scheduling, so FP32 sums (which are not associative) come out bit-identical on every run.
/// Stops at the first error.
fn fold_in_order<T: Send, A: Send>(
    items: Vec<T>,
    zero: impl Fn() -> A + Sync + Send,
    f: impl Fn(&mut A, usize, T) -> Result<()> + Sync + Send,
    add: impl Fn(&mut A, &A),
) -> Result<A> {
    let per_group = items.len().div_ceil(SUM_GROUPS).max(1);
    let groups: Vec<Result<A>> = threads::install(|| {
        items
            .into_par_iter()
            .enumerate()
            .fold_chunks(
                per_group,
                || Ok(zero()),
                |acc: Result<A>, (ci, item)| {
                    let mut acc = acc?;
                    f(&mut acc, ci, item)?;
                    Ok(acc)
                },
            )
            .collect()
    });
    let mut groups = groups.into_iter();
    let mut total = groups.next().unwrap_or_else(|| Ok(zero()))?;
    for g in groups {
        add(&mut total, &g?);
    }
    Ok(total)
}
