//! Layer ops evaluated on output rectangles only, reading the cached input feature map around them.
//!
//! A convolution over a set of rectangles gathers, per rectangle, the input window its outputs read
//! (zero where the window leaves the map, i.e. the layer's padding), unfolds it with the crate's
//! [`im2col`] side by side in one patch matrix and runs one FP32 GEMM (`W · col`) for the whole batch,
//! then scatters the columns into the output cache. Work is proportional to the dirty area (plus the
//! halo gather), never to the whole map. Pooling and pointwise ops loop over the rectangle directly,
//! in the same order as the dense kernels of [`crate::nn`], so their results are bit-identical.

use crate::error::{Error, Result};
use crate::nn::im2col::im2col;
use crate::nn::{matmul_f32, Geometry, MatF32, Window2d};

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

/// A pointwise op applied after a layer (in place on its output).
#[derive(Clone, Debug)]
pub enum Pointwise {
    /// `max(x, 0)` (NaN stays NaN).
    Relu,
    /// `x·a[c] + b[c]` per channel (eval-mode batch norm).
    Affine { a: Vec<f32>, b: Vec<f32> },
}

/// Most patch-matrix columns unfolded at once (bounds the scratch memory of a batch).
const MAX_COLS: usize = 8192;

/// Reusable buffers of the sparse conv path.
#[derive(Default, Debug)]
pub struct Scratch {
    win: Vec<f32>,
    col: Vec<f32>,
    out: Vec<f32>,
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
    let [c, h, w] = in_shape;
    let [o, wc, kh, kw] = p.shape;
    let (sh, sw) = p.stride;
    let (ph, pw) = p.padding;
    let (oh, ow) = out_hw;
    if wc != c
        || x.len() != c * h * w
        || y.len() != o * oh * ow
        || p.weight.len() != o * c * kh * kw
    {
        return Err(Error::invalid(
            "x",
            format!(
                "conv tile: shapes disagree (input {in_shape:?}, weight {:?})",
                p.shape
            ),
        ));
    }
    let k = c * kh * kw;
    let wm = MatF32::row_major(&p.weight, o, k)?;
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
        scratch.col.resize(k * cols, 0.0);
        let mut off = 0;
        for &(y0, y1, x0, x1) in batch {
            let (rh, rw) = (y1 - y0, x1 - x0);
            if rh == 0 || rw == 0 {
                continue;
            }
            // the input window read by outputs y0..y1 × x0..x1
            let (wh, ww) = ((rh - 1) * sh + kh, (rw - 1) * sw + kw);
            let iy0 = (y0 * sh) as isize - ph as isize;
            let ix0 = (x0 * sw) as isize - pw as isize;
            scratch.win.resize(c * wh * ww, 0.0);
            for ch in 0..c {
                let plane = &x[ch * h * w..(ch + 1) * h * w];
                for t in 0..wh {
                    let dst = &mut scratch.win[(ch * wh + t) * ww..(ch * wh + t + 1) * ww];
                    let iy = iy0 + t as isize;
                    if iy < 0 || iy >= h as isize {
                        dst.fill(0.0);
                        continue;
                    }
                    let row = &plane[iy as usize * w..(iy as usize + 1) * w];
                    // columns of the window inside 0..w
                    let lo = (-ix0).max(0) as usize;
                    let hi = ((w as isize - ix0).max(0) as usize).min(ww);
                    if lo >= hi {
                        dst.fill(0.0);
                        continue;
                    }
                    dst[..lo].fill(0.0);
                    dst[hi..].fill(0.0);
                    let s0 = (ix0 + lo as isize) as usize;
                    dst[lo..hi].copy_from_slice(&row[s0..s0 + (hi - lo)]);
                }
            }
            let g = Geometry::new(
                "x",
                [1, c, wh, ww],
                Window2d::new((kh, kw), (sh, sw), (0, 0)),
            )?;
            debug_assert_eq!((g.oh, g.ow), (rh, rw));
            im2col(
                &scratch.win[..c * wh * ww],
                &g,
                &mut scratch.col[off..],
                cols,
            );
            off += rh * rw;
        }
        scratch.out.resize(o * cols, 0.0);
        let cm = MatF32::row_major(&scratch.col[..k * cols], k, cols)?;
        matmul_f32(&wm, &cm, None, &mut scratch.out[..o * cols])?;
        let mut off = 0;
        for &(y0, y1, x0, x1) in batch {
            let (rh, rw) = (y1 - y0, x1 - x0);
            for oc in 0..o {
                let bv = p.bias.as_ref().map(|b| b[oc]);
                let src = &scratch.out[oc * cols + off..oc * cols + off + rh * rw];
                for r in 0..rh {
                    let d0 = (oc * oh + y0 + r) * ow + x0;
                    let dst = &mut y[d0..d0 + rw];
                    let s = &src[r * rw..(r + 1) * rw];
                    match bv {
                        Some(b) => dst.iter_mut().zip(s).for_each(|(d, &v)| *d = b + v),
                        None => dst.copy_from_slice(s),
                    }
                }
            }
            off += rh * rw;
        }
    }
    Ok(())
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

/// Applies `ops` in order, in place, to the rectangles `rects` of `y (c, oh, ow)`.
pub fn pointwise_rects(
    ops: &[Pointwise],
    rects: &[Rect],
    y: &mut [f32],
    c: usize,
    out_hw: (usize, usize),
) {
    let (oh, ow) = out_hw;
    for op in ops {
        for ch in 0..c {
            let yp = &mut y[ch * oh * ow..(ch + 1) * oh * ow];
            for &(y0, y1, x0, x1) in rects {
                for oy in y0..y1 {
                    let row = &mut yp[oy * ow + x0..oy * ow + x1];
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
