//! Layer ops evaluated on output rectangles only, reading the cached input feature map around them.
//!
//! A convolution over a set of rectangles gathers, per rectangle, the input window its outputs read
//! (zero where the window leaves the map, i.e. the layer's padding), unfolds it with the crate's
//! [`im2col`] side by side in one patch matrix and runs one GEMM (`W · col`) for the whole batch, then
//! scatters the columns into the output cache: FP32 ([`conv_rects`]) or INT8 ([`conv_rects_i8`], the
//! window quantized on the fly with the layer's input scale, the INT8 GEMM with its fused rescale).
//! Work is proportional to the dirty area (plus the halo gather), never to the whole map. Pooling and
//! pointwise ops loop over the rectangle directly, in the same order as the dense kernels of
//! [`crate::nn`], so their results are bit-identical.

use crate::error::{Error, Result};
use crate::gemm::{self, MatRef, Scale};
use crate::nn::im2col::im2col;
use crate::nn::matmul::{sgemm, PAR_MIN_MACS};
use crate::nn::{Geometry, MatF32, Window2d};
use crate::quant::quantize_nearest_with_scale;
use crate::threads;

/// A half-open pixel rectangle `(y0, y1, x0, x1)` of an output map.
pub type Rect = (usize, usize, usize, usize);

/// A convolution's parameters: `weight (o, c, kh, kw)` C-ordered, optional `bias (o,)`.
#[derive(Clone, Debug)]
pub struct ConvParams {
    pub weight: Vec<f32>,
    pub shape: [usize; 4],
    pub bias: Option<Vec<f32>>,
    pub stride: (usize, usize),
    pub padding: (usize, usize),
}

impl ConvParams {
    pub fn window(&self) -> Window2d {
        Window2d::new((self.shape[2], self.shape[3]), self.stride, self.padding)
    }
}

/// An INT8 convolution: weight codes `wq (o, c, kh, kw)` with one scale or one per output channel `sw`,
/// optional FP32 bias; inputs are quantized per tensor with nearest rounding (the eval-mode Octo conv).
#[derive(Clone, Debug)]
pub struct ConvI8Params {
    pub wq: Vec<i8>,
    pub sw: Vec<f32>,
    pub shape: [usize; 4],
    pub bias: Option<Vec<f32>>,
    pub stride: (usize, usize),
    pub padding: (usize, usize),
}

impl ConvI8Params {
    pub fn window(&self) -> Window2d {
        Window2d::new((self.shape[2], self.shape[3]), self.stride, self.padding)
    }
    pub fn weight_scale(&self) -> Scale<'_> {
        if self.sw.len() == 1 {
            Scale::Scalar(self.sw[0])
        } else {
            Scale::PerIndex(&self.sw)
        }
    }
}

/// A pointwise op applied after a layer (in place on its output).
#[derive(Clone, Debug)]
pub enum Pointwise {
    /// `max(x, 0)` (NaN stays NaN).
    Relu,
    /// `x·a[c] + b[c]` per channel (eval-mode batch norm, LAC compensation with `a = 1`).
    Affine { a: Vec<f32>, b: Vec<f32> },
}

/// Most patch-matrix columns unfolded at once (bounds the scratch memory of a batch).
const MAX_COLS: usize = 8192;

/// Reusable buffers of the sparse conv paths.
#[derive(Default, Debug)]
pub struct Scratch {
    win: Vec<f32>,
    col: Vec<f32>,
    win_i8: Vec<i8>,
    col_i8: Vec<i8>,
    out: Vec<f32>,
    /// the quantized input of a dense INT8 conv
    pub xq: Vec<i8>,
}

/// The shapes and window of one convolution evaluated on rectangles.
struct ConvGeom {
    in_shape: [usize; 3],
    o: usize,
    kernel: (usize, usize),
    stride: (usize, usize),
    padding: (usize, usize),
    out_hw: (usize, usize),
}

/// Copies (through `convert`) the input window read by outputs `rect` into `win (c, wh, ww)`, zero where
/// the window leaves the map (the layer's padding); returns the window's geometry for `im2col`.
fn gather_window<T: Copy + Default>(
    x: &[f32],
    cg: &ConvGeom,
    rect: Rect,
    win: &mut Vec<T>,
    convert: &impl Fn(&[f32], &mut [T]) -> Result<()>,
) -> Result<Geometry> {
    let [c, h, w] = cg.in_shape;
    let ((kh, kw), (sh, sw), (ph, pw)) = (cg.kernel, cg.stride, cg.padding);
    let (y0, y1, x0, x1) = rect;
    let (rh, rw) = (y1 - y0, x1 - x0);
    let (wh, ww) = ((rh - 1) * sh + kh, (rw - 1) * sw + kw);
    let iy0 = (y0 * sh) as isize - ph as isize;
    let ix0 = (x0 * sw) as isize - pw as isize;
    win.resize(c * wh * ww, T::default());
    // columns of the window inside 0..w
    let lo = ((-ix0).max(0) as usize).min(ww);
    let hi = ((w as isize - ix0).max(0) as usize).min(ww).max(lo);
    let zero = T::default();
    for ch in 0..c {
        let plane = &x[ch * h * w..(ch + 1) * h * w];
        for t in 0..wh {
            let dst = &mut win[(ch * wh + t) * ww..(ch * wh + t + 1) * ww];
            let iy = iy0 + t as isize;
            if iy < 0 || iy >= h as isize || lo >= hi {
                dst.fill(zero);
                continue;
            }
            dst[..lo].fill(zero);
            dst[hi..].fill(zero);
            let s0 = iy as usize * w + (ix0 + lo as isize) as usize;
            convert(&plane[s0..s0 + (hi - lo)], &mut dst[lo..hi])?;
        }
    }
    let g = Geometry::new(
        "x",
        [1, c, wh, ww],
        Window2d::new((kh, kw), (sh, sw), (0, 0)),
    )?;
    debug_assert_eq!((g.oh, g.ow), (rh, rw));
    Ok(g)
}

/// The shared driver of [`conv_rects`] and [`conv_rects_i8`]: batches of rectangles are gathered and
/// unfolded side by side into `col (k × cols)`, `gemm(col, cols, out)` fills `out (o × cols)`, and the
/// columns are scattered into `y`, adding `bias` (`None` when the GEMM already did, as the FP32 one
/// does so that its rounding matches the dense conv's).
#[allow(clippy::too_many_arguments)]
fn conv_rects_with<T: Copy + Default>(
    x: &[f32],
    cg: &ConvGeom,
    bias: Option<&[f32]>,
    rects: &[Rect],
    y: &mut [f32],
    bufs: (&mut Vec<T>, &mut Vec<T>, &mut Vec<f32>),
    convert: impl Fn(&[f32], &mut [T]) -> Result<()>,
    mut gemm: impl FnMut(&[T], usize, &mut [f32]) -> Result<()>,
) -> Result<()> {
    let (win, col, out) = bufs;
    let [c, _, _] = cg.in_shape;
    let k = c * cg.kernel.0 * cg.kernel.1;
    let o = cg.o;
    let (oh, ow) = cg.out_hw;
    let mut start = 0;
    while start < rects.len() {
        // a batch of rectangles with at most MAX_COLS output pixels (at least one rectangle)
        let mut end = start;
        let mut cols = 0;
        while end < rects.len() {
            let (y0, y1, x0, x1) = rects[end];
            let n = (y1 - y0) * (x1 - x0);
            if end > start && cols + n > MAX_COLS {
                break;
            }
            cols += n;
            end += 1;
        }
        let batch = &rects[start..end];
        start = end;
        if cols == 0 {
            continue;
        }
        col.resize(k * cols, T::default());
        let mut off = 0;
        for &rect in batch {
            let (y0, y1, x0, x1) = rect;
            if y1 <= y0 || x1 <= x0 {
                continue;
            }
            let g = gather_window(x, cg, rect, win, &convert)?;
            im2col(&win[..], &g, &mut col[off..], cols);
            off += g.p();
        }
        out.resize(o * cols, 0.0);
        gemm(&col[..k * cols], cols, &mut out[..o * cols])?;
        let mut off = 0;
        for &(y0, y1, x0, x1) in batch {
            let (rh, rw) = (y1.saturating_sub(y0), x1.saturating_sub(x0));
            for oc in 0..o {
                let bv = bias.map(|b| b[oc]);
                let src = &out[oc * cols + off..oc * cols + off + rh * rw];
                for r in 0..rh {
                    let d0 = (oc * oh + y0 + r) * ow + x0;
                    let dst = &mut y[d0..d0 + rw];
                    let s = &src[r * rw..(r + 1) * rw];
                    match bv {
                        Some(b) => dst.iter_mut().zip(s).for_each(|(d, &v)| *d = v + b),
                        None => dst.copy_from_slice(s),
                    }
                }
            }
            off += rh * rw;
        }
    }
    Ok(())
}

fn check_conv_shapes(
    x: usize,
    in_shape: [usize; 3],
    shape: [usize; 4],
    w: usize,
    y: usize,
    out_hw: (usize, usize),
) -> Result<()> {
    let [c, h, wd] = in_shape;
    let [o, wc, kh, kw] = shape;
    if wc != c || x != c * h * wd || y != o * out_hw.0 * out_hw.1 || w != o * c * kh * kw {
        return Err(Error::invalid(
            "x",
            format!("conv tile: shapes disagree (input {in_shape:?}, weight {shape:?})"),
        ));
    }
    Ok(())
}

/// Writes `conv(x)` (plus bias) into the rectangles `rects` of `y (o, oh, ow)`; `x` is `(c, h, w)`.
#[allow(clippy::too_many_arguments)]
pub fn conv_rects(
    x: &[f32],
    in_shape: [usize; 3],
    p: &ConvParams,
    rects: &[Rect],
    y: &mut [f32],
    out_hw: (usize, usize),
    scratch: &mut Scratch,
) -> Result<()> {
    check_conv_shapes(x.len(), in_shape, p.shape, p.weight.len(), y.len(), out_hw)?;
    let [o, c, kh, kw] = p.shape;
    let k = c * kh * kw;
    let wm = MatF32::row_major(&p.weight, o, k)?;
    let cg = ConvGeom {
        in_shape,
        o,
        kernel: (kh, kw),
        stride: p.stride,
        padding: p.padding,
        out_hw,
    };
    let bias = p.bias.as_deref();
    conv_rects_with(
        x,
        &cg,
        None,
        rects,
        y,
        (&mut scratch.win, &mut scratch.col, &mut scratch.out),
        |src, dst| {
            dst.copy_from_slice(src);
            Ok(())
        },
        |col, cols, out| {
            // like the dense conv: the output starts as the bias and the GEMM accumulates onto it, so
            // each output sees the same additions in the same order
            for (oc, row) in out.chunks_exact_mut(cols).enumerate() {
                row.fill(bias.map_or(0.0, |b| b[oc]));
            }
            let cm = MatF32::row_major(col, k, cols)?;
            let parallel = o * cols * k >= PAR_MIN_MACS && threads::num_threads() > 1;
            // SAFETY: `out` is o × cols (resized by the caller), row stride `cols`, not aliased.
            unsafe { sgemm(&wm, &cm, out.as_mut_ptr(), cols, true, parallel) };
            Ok(())
        },
    )
}

/// INT8 counterpart of [`conv_rects`]: the gathered input is quantized with the per-tensor scale `sx`
/// (nearest rounding, as the dense INT8 conv quantizes its whole input), multiplied on the INT8 GEMM
/// with the `sw[o]·sx` epilogue, then the bias is added.
#[allow(clippy::too_many_arguments)]
pub fn conv_rects_i8(
    x: &[f32],
    in_shape: [usize; 3],
    p: &ConvI8Params,
    sx: f32,
    rects: &[Rect],
    y: &mut [f32],
    out_hw: (usize, usize),
    scratch: &mut Scratch,
) -> Result<()> {
    check_conv_shapes(x.len(), in_shape, p.shape, p.wq.len(), y.len(), out_hw)?;
    let [o, c, kh, kw] = p.shape;
    let k = c * kh * kw;
    let wm = MatRef::row_major(&p.wq, o, k)?;
    let cg = ConvGeom {
        in_shape,
        o,
        kernel: (kh, kw),
        stride: p.stride,
        padding: p.padding,
        out_hw,
    };
    conv_rects_with(
        x,
        &cg,
        p.bias.as_deref(),
        rects,
        y,
        (&mut scratch.win_i8, &mut scratch.col_i8, &mut scratch.out),
        |src, dst| quantize_nearest_with_scale(src, sx, dst),
        |col, cols, out| {
            let cm = MatRef::row_major(col, k, cols)?;
            gemm::gemm_i8_f32(&wm, &cm, p.weight_scale(), Scale::Scalar(sx), None, out)
        },
    )
}

/// Input span `lo..hi` of output index `o` (window `k`, stride `s`, padding `p`), clipped to `0..len`.
#[inline]
fn span(o: usize, s: usize, p: usize, k: usize, len: usize) -> (usize, usize) {
    let start = (o * s) as isize - p as isize;
    (
        (start.max(0)) as usize,
        ((start + k as isize).max(0) as usize).min(len),
    )
}

/// Max (`avg = false`, padding is −∞, NaN propagates) or average (`count_include_pad`) pooling of
/// `x (c, h, w)` into the rectangles `rects` of `y (c, oh, ow)`. Same arithmetic order as
/// [`crate::nn::maxpool2d_forward`] / [`crate::nn::avgpool2d_forward`].
pub fn pool_rects(
    x: &[f32],
    in_shape: [usize; 3],
    win: Window2d,
    avg: bool,
    rects: &[Rect],
    y: &mut [f32],
    out_hw: (usize, usize),
) {
    let [c, h, w] = in_shape;
    let (oh, ow) = out_hw;
    let (kh, kw) = win.kernel;
    let inv = 1.0 / (kh * kw) as f32;
    for ch in 0..c {
        let xp = &x[ch * h * w..(ch + 1) * h * w];
        let yp = &mut y[ch * oh * ow..(ch + 1) * oh * ow];
        for &(y0, y1, x0, x1) in rects {
            for oy in y0..y1 {
                let (r0, r1) = span(oy, win.stride.0, win.padding.0, kh, h);
                for ox in x0..x1 {
                    let (c0, c1) = span(ox, win.stride.1, win.padding.1, kw, w);
                    yp[oy * ow + ox] = if avg {
                        let mut s = 0.0f32;
                        for iy in r0..r1 {
                            s += xp[iy * w + c0..iy * w + c1].iter().sum::<f32>();
                        }
                        s * inv
                    } else {
                        let mut best = f32::NEG_INFINITY;
                        for iy in r0..r1 {
                            for &v in &xp[iy * w + c0..iy * w + c1] {
                                if v > best || v.is_nan() {
                                    best = v;
                                }
                            }
                        }
                        best
                    };
                }
            }
        }
    }
}

/// Applies `ops` in order, in place, to the rectangles `rects` of `y (c, oh, ow)`. All ops run on one row
/// segment before the next (it stays in L1), each element seeing them in order: the same arithmetic as
/// applying each op to the whole map in turn.
pub fn pointwise_rects(
    ops: &[Pointwise],
    rects: &[Rect],
    y: &mut [f32],
    c: usize,
    out_hw: (usize, usize),
) {
    if ops.is_empty() {
        return;
    }
    let (oh, ow) = out_hw;
    for ch in 0..c {
        let yp = &mut y[ch * oh * ow..(ch + 1) * oh * ow];
        for &(y0, y1, x0, x1) in rects {
            for oy in y0..y1 {
                let row = &mut yp[oy * ow + x0..oy * ow + x1];
                for op in ops {
                    match op {
                        Pointwise::Relu => row.iter_mut().for_each(|v| {
                            if *v < 0.0 {
                                *v = 0.0
                            }
                        }),
                        Pointwise::Affine { a, b } => {
                            let (a, b) = (a[ch], b[ch]);
                            row.iter_mut().for_each(|v| *v = *v * a + b);
                        }
                    }
                }
            }
        }
    }
}
