//! Layer ops evaluated on output rectangles only, reading the cached input feature map around them.
//!
//! The dirty rectangles of a layer are cut into horizontal bands ([`bands`]: at most [`MAX_COLS`] output
//! pixels, smaller when there are threads to feed) that run in parallel over the pool. A convolution
//! band reads the input window its outputs need (zero where the window leaves the map, i.e. the layer's
//! padding). Ungrouped FP32 ([`conv_rects`]) and INT8 ([`conv_rects_i8`]) bands are batched side by side
//! in one patch matrix for one GEMM (`W · col`); kernels wider than 1x1 lay the window out as its stride
//! phases ([`phase_grid`]) so that each tap's row of the patch matrix is one contiguous copy (a few extra
//! columns per output row, computed and dropped). INT8 stride-1 layers with the direct VNNI kernel's
//! packed weights ([`DirectPlan`]) run their bands through it on a grid laid from the cached codes;
//! grouped/dilated convs run the dense grouped kernels on each band's window. The outputs are scattered
//! into the cache with the bias and the stage's pointwise ops applied in the same pass ([`store_row`]).
//! Work is proportional to the dirty area (plus the halo gather), never to the whole map. Pooling and
//! pointwise ops loop over the rectangle directly, in the same order as the dense kernels of
//! [`crate::nn`], so their results are bit-identical.

use crate::error::{Error, Result};
use crate::gemm::{self, MatRef, Scale};
use crate::nn::conv::direct::{self as direct_conv, DirectWeights, GridScatter, GroupedImage};
use crate::nn::matmul::{sgemm, PAR_MIN_MACS};
use crate::nn::{
    conv2d_f32_forward, conv2d_grouped_f32_forward, conv2d_grouped_i8_forward, conv2d_i8_forward,
    take_f32, Geometry, GroupedParams, MatF32, Window2d,
};
use crate::quant::{nearest_code, quantize_nearest_run};
use crate::threads::{self, OutPtr};

/// A half-open pixel rectangle `(y0, y1, x0, x1)` of an output map.
pub type Rect = (usize, usize, usize, usize);

/// A convolution's parameters: `weight (o, c/groups, kh, kw)` C-ordered, optional `bias (o,)`.
#[derive(Clone, Debug)]
pub struct ConvParams {
    pub weight: Vec<f32>,
    pub shape: [usize; 4],
    pub bias: Option<Vec<f32>>,
    pub stride: (usize, usize),
    pub padding: (usize, usize),
    pub groups: usize,
    pub dilation: (usize, usize),
}

/// The input window a (possibly dilated) kernel of `shape` reads: `(k − 1)·d + 1` per axis.
fn span_kernel(shape: [usize; 4], dilation: (usize, usize)) -> (usize, usize) {
    (
        (shape[2] - 1) * dilation.0 + 1,
        (shape[3] - 1) * dilation.1 + 1,
    )
}

/// Whether a convolution is grouped or dilated (it then runs on [`crate::nn::depthwise`]'s kernels).
fn is_grouped(groups: usize, dilation: (usize, usize)) -> bool {
    groups != 1 || dilation != (1, 1)
}

impl ConvParams {
    /// The input window each output reads (a dilated kernel spans `(k − 1)·d + 1`).
    pub fn window(&self) -> Window2d {
        Window2d::new(
            span_kernel(self.shape, self.dilation),
            self.stride,
            self.padding,
        )
    }

    /// The dense convolution of `x (1, c, h, w)` with `padding` into `y`, on the kernels the layer takes
    /// anywhere else (grouped/dilated ones on the grouped kernels).
    pub fn forward(
        &self,
        x: &[f32],
        shape: [usize; 4],
        padding: (usize, usize),
        y: &mut [f32],
    ) -> Result<()> {
        let b = self.bias.as_deref();
        if is_grouped(self.groups, self.dilation) {
            let gp = GroupedParams::new(self.groups, self.stride, padding, self.dilation);
            conv2d_grouped_f32_forward(x, shape, &self.weight, self.shape, b, gp, y)?;
        } else {
            conv2d_f32_forward(
                x,
                shape,
                &self.weight,
                self.shape,
                b,
                self.stride,
                padding,
                y,
            )?;
        }
        Ok(())
    }
}

/// An INT8 convolution: weight codes `wq (o, c/groups, kh, kw)` with one scale or one per output channel
/// `sw`, optional FP32 bias; inputs are quantized per tensor with nearest rounding (the eval-mode Octo
/// conv).
#[derive(Clone, Debug)]
pub struct ConvI8Params {
    pub wq: Vec<i8>,
    pub sw: Vec<f32>,
    pub shape: [usize; 4],
    pub bias: Option<Vec<f32>>,
    pub stride: (usize, usize),
    pub padding: (usize, usize),
    pub groups: usize,
    pub dilation: (usize, usize),
}

impl ConvI8Params {
    /// The input window each output reads (a dilated kernel spans `(k − 1)·d + 1`).
    pub fn window(&self) -> Window2d {
        Window2d::new(
            span_kernel(self.shape, self.dilation),
            self.stride,
            self.padding,
        )
    }
    pub fn weight_scale(&self) -> Scale<'_> {
        if self.sw.len() == 1 {
            Scale::Scalar(self.sw[0])
        } else {
            Scale::PerIndex(&self.sw)
        }
    }

    /// The dense INT8 convolution of the codes `xq (1, c, h, w)` (scale `sx`) with `padding` into `y`:
    /// the plan the layer takes anywhere else (direct VNNI / padded grid / patch matrix; grouped and
    /// dilated convs on the grouped kernels).
    #[allow(clippy::too_many_arguments)]
    pub fn forward(
        &self,
        xq: &[i8],
        shape: [usize; 4],
        sx: f32,
        padding: (usize, usize),
        y: &mut [f32],
    ) -> Result<()> {
        let (b, sw) = (self.bias.as_deref(), self.weight_scale());
        if is_grouped(self.groups, self.dilation) {
            let gp = GroupedParams::new(self.groups, self.stride, padding, self.dilation);
            conv2d_grouped_i8_forward(xq, shape, sx, &self.wq, self.shape, sw, b, gp, y)?;
        } else {
            conv2d_i8_forward(
                xq,
                shape,
                sx,
                &self.wq,
                self.shape,
                sw,
                b,
                self.stride,
                padding,
                y,
            )?;
        }
        Ok(())
    }
}

/// The direct VNNI kernel's packed weights of an INT8 convolution, built once per layer (see
/// [`ConvI8Params::direct_weights`]).
pub struct DirectPlan(DirectWeights);

impl std::fmt::Debug for DirectPlan {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("DirectPlan")
    }
}

impl ConvI8Params {
    /// The packed weights for the direct VNNI kernel when this layer takes it on its bands (stride 1,
    /// not grouped or dilated, a kernel wider than 1x1, channels padded to groups of 4 by at most a
    /// quarter — the dense plan's rule — and the kernel available here); `None` otherwise.
    pub fn direct_weights(&self) -> Result<Option<DirectPlan>> {
        let [o, c, kh, kw] = self.shape;
        let fits = self.stride == (1, 1)
            && !is_grouped(self.groups, self.dilation)
            && (kh > 1 || kw > 1)
            && c.div_ceil(4) * 16 <= c * 5;
        if !(fits && direct_conv::direct_available()) {
            return Ok(None);
        }
        Ok(Some(DirectPlan(DirectWeights::new(
            &self.wq,
            o,
            c,
            kh * kw,
        )?)))
    }
}

/// A pointwise op applied after a layer (in place on its output).
#[derive(Clone, Debug)]
pub enum Pointwise {
    /// `max(x, 0)` (NaN stays NaN).
    Relu,
    /// `min(max(x, 0), 6)` (NaN stays NaN), PyTorch's `ReLU6`.
    Relu6,
    /// `x·a[c] + b[c]` per channel (eval-mode batch norm, LAC compensation with `a = 1`).
    Affine { a: Vec<f32>, b: Vec<f32> },
}

/// Most output pixels in one band (see [`bands`]): bounds a band's patch matrix (`K × band` values).
const MAX_COLS: usize = 8192;

/// Fewest output pixels per band when bands are cut smaller to spread work over threads.
const MIN_BAND: usize = 256;

/// The shapes and window of one convolution evaluated on rectangles.
struct ConvGeom {
    in_shape: [usize; 3],
    o: usize,
    kernel: (usize, usize),
    stride: (usize, usize),
    padding: (usize, usize),
    out_hw: (usize, usize),
    /// the next INT8 conv's input codes `(o, oh, ow)` and scale, written with the outputs, and whether
    /// the f32 outputs are written too (see [`NextCodes`])
    codes: CodesOut,
}

/// [`NextCodes`] as the band tasks take it: the codes, their scale and whether the f32 values are written too.
type CodesOut = Option<(OutPtr<i8>, f32, bool)>;

/// The input codes of the INT8 convolution that reads a layer's output, with their per-tensor scale:
/// when given, the layer writes them for the pixels it recomputes (its outputs, after the pointwise ops,
/// quantized with `sx`, nearest rounding: the codes quantizing the whole map gives), while the rows are
/// in cache, so that the next layer need not read them back to requantize. `codes` has the layout of the
/// layer's output.
///
/// `values: false` writes the codes alone: the layer's f32 map is then left without these outputs (it
/// no longer describes them), which pays where the next conv is the map's only reader and reads the
/// codes (at a quarter of the bytes); the caller must not read those values back.
pub struct NextCodes<'a> {
    pub codes: &'a mut [i8],
    pub sx: f32,
    pub values: bool,
}

/// The raw form of `next` for the tasks, after checking it covers an output of `len` values.
fn codes_ptr(next: Option<NextCodes<'_>>, len: usize) -> Result<CodesOut> {
    match next {
        None => Ok(None),
        Some(n) if n.codes.len() == len && n.sx.is_finite() && n.sx > 0.0 => {
            Ok(Some((OutPtr(n.codes.as_mut_ptr()), n.sx, n.values)))
        }
        Some(n) => Err(Error::invalid(
            "codes",
            format!(
                "next layer's codes: {} values with scale {} for an output of {len}",
                n.codes.len(),
                n.sx
            ),
        )),
    }
}

/// Cuts `rects` into horizontal bands of at most `max_px` output pixels (a band is at least one row),
/// so that bands bound the scratch memory and spread over threads. Bands stay disjoint.
pub fn bands(rects: &[Rect], max_px: usize) -> Vec<Rect> {
    let mut out = Vec::with_capacity(rects.len());
    for &(y0, y1, x0, x1) in rects {
        if y1 <= y0 || x1 <= x0 {
            continue;
        }
        let rows = (max_px / (x1 - x0)).max(1);
        let mut y = y0;
        while y < y1 {
            let e = (y + rows).min(y1);
            out.push((y, e, x0, x1));
            y = e;
        }
    }
    out
}

/// The band size for `px` dirty output pixels of a layer costing `cost` per pixel: whole up to
/// [`MAX_COLS`] on one thread; with more threads, about four bands per thread (at least [`MIN_BAND`]
/// pixels) once the work is worth spreading.
fn band_size(px: usize, cost: usize) -> usize {
    let t = threads::num_threads();
    if t <= 1 || px * cost < PAR_MIN_MACS {
        return MAX_COLS;
    }
    (px / (4 * t)).clamp(MIN_BAND, MAX_COLS)
}

/// Groups consecutive bands into batches of at most `max_cols` output pixels (the band size: with
/// threads, batches stay as many as the bands were cut for them).
fn batches(bands: &[Rect], max_cols: usize) -> Vec<std::ops::Range<usize>> {
    let mut out = Vec::new();
    let mut start = 0;
    while start < bands.len() {
        let (mut end, mut cols) = (start, 0);
        while end < bands.len() {
            let (y0, y1, x0, x1) = bands[end];
            let n = (y1 - y0) * (x1 - x0);
            if end > start && cols + n > max_cols {
                break;
            }
            cols += n;
            end += 1;
        }
        out.push(start..end);
        start = end;
    }
    out
}

/// Runs `f` on every item, spread over the pool when `parallel` (else in order on this thread).
fn for_each_task<T: Sync>(
    items: &[T],
    parallel: bool,
    f: impl Fn(&T) -> Result<()> + Sync + Send,
) -> Result<()> {
    if parallel {
        threads::for_each_part(items.len(), |i| f(&items[i]))
    } else {
        items.iter().try_for_each(f)
    }
}

/// Copies (through `convert`) the input window read by outputs `rect` into `win (c, wh, ww)`, zero where
/// the window leaves the map (the layer's padding); returns the window's geometry for `im2col`.
fn gather_window<S: Copy, T: Copy + Default>(
    x: &[S],
    cg: &ConvGeom,
    rect: Rect,
    win: &mut [T],
    convert: &impl Fn(&[S], &mut [T]),
) -> Result<Geometry> {
    let [c, h, w] = cg.in_shape;
    let ((kh, kw), (sh, sw), (ph, pw)) = (cg.kernel, cg.stride, cg.padding);
    let (y0, y1, x0, x1) = rect;
    let (rh, rw) = (y1 - y0, x1 - x0);
    let (wh, ww) = ((rh - 1) * sh + kh, (rw - 1) * sw + kw);
    let iy0 = (y0 * sh) as isize - ph as isize;
    let ix0 = (x0 * sw) as isize - pw as isize;
    let win = &mut win[..c * wh * ww];
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
            convert(&plane[s0..s0 + (hi - lo)], &mut dst[lo..hi]);
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

/// Values of the input window of output `rect` (see [`gather_window`]).
fn window_len(cg: &ConvGeom, rect: Rect) -> usize {
    let (y0, y1, x0, x1) = rect;
    let wh = (y1 - y0 - 1) * cg.stride.0 + cg.kernel.0;
    let ww = (x1 - x0 - 1) * cg.stride.1 + cg.kernel.1;
    cg.in_shape[0] * wh * ww
}

crate::simd::avx2_multiversion! {
    /// Applies `ops` in order to one row segment of channel `ch`, in place: the usual op lists (an affine
    /// then a ReLU/ReLU6, or two affines then one) in one branch-free pass, others op by op; each element
    /// sees the same operations in the same order either way.
    fn apply_ops(ops: &[Pointwise], ch: usize, row: &mut [f32]) {
        match ops {
            [Pointwise::Affine { a, b }, Pointwise::Relu] => {
                let (a, b) = (a[ch], b[ch]);
                map_in_place(row, |v| relu(v * a + b))
            }
            [Pointwise::Affine { a, b }, Pointwise::Relu6] => {
                let (a, b) = (a[ch], b[ch]);
                map_in_place(row, |v| relu6(v * a + b))
            }
            [Pointwise::Affine { a, b }, Pointwise::Affine { a: c, b: d }, Pointwise::Relu] => {
                let (a, b, c, d) = (a[ch], b[ch], c[ch], d[ch]);
                map_in_place(row, |v| relu((v * a + b) * c + d))
            }
            _ => {
                for op in ops {
                    match op {
                        Pointwise::Relu => map_in_place(row, relu),
                        Pointwise::Relu6 => map_in_place(row, relu6),
                        Pointwise::Affine { a, b } => {
                            let (a, b) = (a[ch], b[ch]);
                            map_in_place(row, |v| v * a + b)
                        }
                    }
                }
            }
        }
    }
}

/// `row[i] = f(row[i])` (an index loop, as [`map_row`]).
#[inline(always)]
fn map_in_place(row: &mut [f32], f: impl Fn(f32) -> f32) {
    for i in 0..row.len() {
        row[i] = f(row[i]);
    }
}

crate::simd::avx2_multiversion! {
    /// Writes the band outputs `src (o × ld)` (output row `r` of the band from column `off + r·rs`, `at =
    /// (off, rs)`) into `y` at `rect` (plus `bias` when given), then applies `ops` there while the rows are
    /// in cache. One call per band: the rows' epilogue ([`store_row`]) is inlined here, so a short band row
    /// pays no call or dispatch of its own.
    ///
    /// # Safety
    /// `y` points to an `(o, oh, ow)` map that no other thread writes inside `rect`, and so do `codes`
    /// when given.
    unsafe fn scatter_band(
        src: &[f32],
        ld: usize,
        at: (usize, usize),
        rect: Rect,
        o: usize,
        out_hw: (usize, usize),
        bias: Option<&[f32]>,
        ops: &[Pointwise],
        dst: (OutPtr<f32>, CodesOut),
    ) {
        // codes alone (see `NextCodes`): the f32 stores left out. Two copies of the row loop, inlined
        // here (a closure would be compiled without this function's AVX2)
        // SAFETY: as the caller guarantees.
        if dst.1.is_none_or(|c| c.2) {
            unsafe { scatter_rows(src, ld, at, rect, o, out_hw, bias, ops, dst, true) }
        } else {
            unsafe { scatter_rows(src, ld, at, rect, o, out_hw, bias, ops, dst, false) }
        }
    }
}

/// The row loop of [`scatter_band`]; `store: false` leaves the f32 values out (codes alone).
///
/// # Safety
/// As [`scatter_band`].
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn scatter_rows(
    src: &[f32],
    ld: usize,
    at: (usize, usize),
    rect: Rect,
    o: usize,
    out_hw: (usize, usize),
    bias: Option<&[f32]>,
    ops: &[Pointwise],
    dst: (OutPtr<f32>, CodesOut),
    store: bool,
) {
    let ((off, rs), (oh, ow), (y, codes)) = (at, out_hw, dst);
    let (y0, y1, x0, x1) = rect;
    let (rh, rw) = (y1 - y0, x1 - x0);
    for oc in 0..o {
        for r in 0..rh {
            let at = (oc * oh + y0 + r) * ow + x0;
            // SAFETY: the row lies inside the map and inside `rect`, which only this task writes.
            let dst = unsafe { std::slice::from_raw_parts_mut(y.ptr().add(at), rw) };
            let s0 = oc * ld + off + r * rs;
            // SAFETY: `codes` has the layout of `y` (checked by `codes_ptr`); same row.
            let row_codes = codes.map(|(q, sx, _)| {
                (
                    unsafe { std::slice::from_raw_parts_mut(q.ptr().add(at), rw) },
                    sx,
                )
            });
            store_row(
                dst,
                &src[s0..s0 + rw],
                bias.map(|b| b[oc]),
                ops,
                oc,
                row_codes,
                store,
            );
        }
    }
}

#[inline(always)]
fn relu(v: f32) -> f32 {
    if v < 0.0 {
        0.0
    } else {
        v
    }
}

#[inline(always)]
fn relu6(v: f32) -> f32 {
    if v < 0.0 {
        0.0
    } else if v > 6.0 {
        6.0
    } else {
        v
    }
}

/// `dst[i] = f(src[i])` (an index loop: iterator adapters may stay out-of-line calls, which would not
/// get the AVX2 build of the caller). With `codes`, also writes the next layer's codes of the values
/// (`store: false`: the codes alone, `dst` left as it was; see [`NextCodes`]; the bits
/// of [`crate::quant::quantize_nearest_with_scale`]) while they are in registers. In vectors of
/// [`LANES`]; a row of at least one vector ends with a vector overlapping the one before (`dst` and
/// `src` are distinct, so the values written twice are the same), a shorter row runs one value at a
/// time. Band rows are short: a loop the compiler unrolls to four vectors per step (or a scalar
/// remainder) would run much of them one value at a time, and a tail padded through a copy on the
/// stack stalls on the store forwarding of the copy (it was most of this function's time).
#[inline(always)]
fn map_row(
    dst: &mut [f32],
    src: &[f32],
    f: impl Fn(f32) -> f32,
    codes: Option<(&mut [i8], f32)>,
    store: bool,
) {
    let n = dst.len().min(src.len());
    let (dst, src) = (&mut dst[..n], &src[..n]);
    match codes {
        None => {
            let one = |d: &mut [f32], s: &[f32]| {
                let (d, s): (&mut [f32; LANES], &[f32; LANES]) =
                    (d.try_into().unwrap(), s.try_into().unwrap());
                for i in 0..LANES {
                    d[i] = f(s[i]);
                }
            };
            if n < LANES {
                for i in 0..n {
                    dst[i] = f(src[i]);
                }
                return;
            }
            let mut o = 0;
            loop {
                let b = o.min(n - LANES);
                one(&mut dst[b..b + LANES], &src[b..b + LANES]);
                o += LANES;
                if o >= n {
                    break;
                }
            }
        }
        Some((q, sx)) => {
            let q = &mut q[..n];
            let one = |d: &mut [f32], c: &mut [i8], s: &[f32]| {
                let (d, c, s): (&mut [f32; LANES], &mut [i8; LANES], &[f32; LANES]) = (
                    d.try_into().unwrap(),
                    c.try_into().unwrap(),
                    s.try_into().unwrap(),
                );
                for i in 0..LANES {
                    let v = f(s[i]);
                    if store {
                        d[i] = v;
                    }
                    c[i] = nearest_code(v, sx);
                }
            };
            if n < LANES {
                for i in 0..n {
                    let v = f(src[i]);
                    if store {
                        dst[i] = v;
                    }
                    q[i] = nearest_code(v, sx);
                }
                return;
            }
            let mut o = 0;
            loop {
                let b = o.min(n - LANES);
                one(
                    &mut dst[b..b + LANES],
                    &mut q[b..b + LANES],
                    &src[b..b + LANES],
                );
                o += LANES;
                if o >= n {
                    break;
                }
            }
        }
    }
}

/// f32 lanes of an AVX2 vector: the step of the elementwise row loops.
const LANES: usize = 8;

/// `dst = ops(pre(src))` for channel `ch`, in one pass for the usual op lists (an affine, a ReLU or
/// ReLU6, or an affine then one of them), else `pre` then [`apply_ops`]: each element sees the same
/// operations in the same order either way.
#[inline(always)]
fn epilogue(
    dst: &mut [f32],
    src: &[f32],
    pre: impl Fn(f32) -> f32 + Copy,
    ops: &[Pointwise],
    ch: usize,
    codes: Option<(&mut [i8], f32)>,
    store: bool,
) {
    match ops {
        [] => map_row(dst, src, pre, codes, store),
        [Pointwise::Relu] => map_row(dst, src, |v| relu(pre(v)), codes, store),
        [Pointwise::Relu6] => map_row(dst, src, |v| relu6(pre(v)), codes, store),
        [Pointwise::Affine { a, b }] => {
            let (a, b) = (a[ch], b[ch]);
            map_row(dst, src, |v| pre(v) * a + b, codes, store)
        }
        [Pointwise::Affine { a, b }, Pointwise::Relu] => {
            let (a, b) = (a[ch], b[ch]);
            map_row(dst, src, |v| relu(pre(v) * a + b), codes, store)
        }
        [Pointwise::Affine { a, b }, Pointwise::Relu6] => {
            let (a, b) = (a[ch], b[ch]);
            map_row(dst, src, |v| relu6(pre(v) * a + b), codes, store)
        }
        // an INT8 (Octo) conv's compensation, then batch norm
        [Pointwise::Affine { a, b }, Pointwise::Affine { a: c, b: d }, rest @ ..] => {
            let (a, b, c, d) = (a[ch], b[ch], c[ch], d[ch]);
            let two = move |v: f32| (pre(v) * a + b) * c + d;
            match rest {
                [] => map_row(dst, src, two, codes, store),
                [Pointwise::Relu] => map_row(dst, src, |v| relu(two(v)), codes, store),
                [Pointwise::Relu6] => map_row(dst, src, |v| relu6(two(v)), codes, store),
                _ => {
                    map_row(dst, src, two, None, true);
                    apply_ops(rest, ch, dst);
                    write_codes(dst, codes);
                }
            }
        }
        _ => {
            map_row(dst, src, pre, None, true);
            apply_ops(ops, ch, dst);
            write_codes(dst, codes);
        }
    }
}

/// The codes of `values` into `codes` when given (see [`map_row`]).
#[inline(always)]
fn write_codes(values: &[f32], codes: Option<(&mut [i8], f32)>) {
    if let Some((q, sx)) = codes {
        let n = q.len().min(values.len());
        for i in 0..n {
            q[i] = nearest_code(values[i], sx);
        }
    }
}

/// One output row segment of channel `ch`: `dst = src (+ bias)`, then `ops` (see [`epilogue`]), and the
/// next layer's codes of it when given (inlined into [`scatter_band`]'s AVX2 build).
#[inline(always)]
fn store_row(
    dst: &mut [f32],
    src: &[f32],
    bias: Option<f32>,
    ops: &[Pointwise],
    ch: usize,
    codes: Option<(&mut [i8], f32)>,
    store: bool,
) {
    match bias {
        None => epilogue(dst, src, |v| v, ops, ch, codes, store),
        Some(b) => epilogue(dst, src, move |v| v + b, ops, ch, codes, store),
    }
}

/// The shared driver of the batched paths of [`conv_rects`] and [`conv_rects_i8`]: each batch of bands
/// is gathered and unfolded side by side into `col (k × cols)`, `gemm(col, cols, out)` fills
/// `out (o × cols)`, and the columns are scattered into `y`, adding `bias` (`None` when the GEMM
/// already did, as the FP32 one does so that its rounding matches the dense conv's) and applying `ops`.
/// Batches (of at most `max_cols` output pixels) run in parallel over the pool when `parallel`.
#[allow(clippy::too_many_arguments)]
fn conv_batches<T: GatherElem + Send + Sync + crate::nn::ScratchElem>(
    x: &[T],
    cg: &ConvGeom,
    bias: Option<&[f32]>,
    ops: &[Pointwise],
    bands: &[Rect],
    y: &mut [f32],
    (parallel, max_cols): (bool, usize),
    gemm: impl Fn(&[T], usize, &mut [f32]) -> Result<()> + Sync,
) -> Result<()> {
    let [c, _, _] = cg.in_shape;
    let (kh, kw) = cg.kernel;
    let k = c * kh * kw;
    let o = cg.o;
    let yp = OutPtr(y.as_mut_ptr());
    let work = batches(bands, max_cols);
    // kernels wider than 1x1 unfold from the band's phase grid (see `phase_grid`): one contiguous copy
    // per tap instead of one per tap and output row
    let grid = kh * kw > 1;
    let layout = |rect: Rect| {
        let (rh, rw) = (rect.1 - rect.0, rect.3 - rect.2);
        if grid {
            let gw = rw + (kw - 1) / cg.stride.1;
            ((rh - 1) * gw + rw, gw)
        } else {
            (rh * rw, rw)
        }
    };
    for_each_task(&work, parallel, |range| {
        let batch = &bands[range.clone()];
        let cols: usize = batch.iter().map(|&r| layout(r).0).sum();
        if cols == 0 {
            return Ok(());
        }
        let mut col = crate::nn::Scratch::<T>::new(k * cols)?;
        let mut off = 0;
        if grid {
            let most = batch
                .iter()
                .map(|&r| phase_grid_len(cg, r))
                .max()
                .unwrap_or(0);
            let mut buf = crate::nn::Scratch::<T>::new(most)?;
            for &rect in batch {
                let n = layout(rect).0;
                let (gh, gw) = phase_grid(x, cg, rect, &mut buf);
                let (sh, sw) = cg.stride;
                for ch in 0..c {
                    for ki in 0..kh {
                        for kj in 0..kw {
                            let row = (ch * kh + ki) * kw + kj;
                            let start = ((ch * sh + ki % sh) * sw + kj % sw) * gh * gw
                                + (ki / sh) * gw
                                + kj / sw;
                            col[row * cols + off..row * cols + off + n]
                                .copy_from_slice(&buf[start..start + n]);
                        }
                    }
                }
                off += n;
            }
        } else {
            for &rect in batch {
                im2col_rect(x, cg, rect, &mut col, cols, off);
                off += layout(rect).0;
            }
        }
        let mut out = take_f32(o * cols)?;
        gemm(&col[..k * cols], cols, &mut out[..o * cols])?;
        let mut off = 0;
        for &rect in batch {
            let (n, rs) = layout(rect);
            // SAFETY: bands are disjoint and each belongs to one batch; `y` is (o, oh, ow).
            unsafe {
                scatter_band(
                    &out,
                    cols,
                    (off, rs),
                    rect,
                    o,
                    cg.out_hw,
                    bias,
                    ops,
                    (yp, cg.codes),
                )
            };
            off += n;
        }
        Ok(())
    })
}

/// Values of the phase grid of output `rect` (see [`phase_grid`]).
fn phase_grid_len(cg: &ConvGeom, rect: Rect) -> usize {
    let ((kh, kw), (sh, sw)) = (cg.kernel, cg.stride);
    let gh = rect.1 - rect.0 + (kh - 1) / sh;
    let gw = rect.3 - rect.2 + (kw - 1) / sw;
    cg.in_shape[0] * sh * sw * gh * gw
}

/// The input window of the outputs `rect` split into its `sh × sw` stride phases, from the map
/// `x (c, h, w)`: `buf (c, sh, sw, gh, gw)` with `gh = rh + (kh − 1)/sh`, `gw = rw + (kw − 1)/sw`, where
/// phase `(pi, pj)` at `(t, u)` holds input `((y0 + t)·sh + pi − ph, (x0 + u)·sw + pj − pw)` (zero outside
/// the map: the padding). Tap `(ki, kj)` of output `(r, q)` reads phase `(ki % sh, kj % sw)` at
/// `(r + ki/sh, q + kj/sw)`, so on this grid (row stride `gw`) the inputs of one tap for the whole band
/// are one contiguous run of `(rh − 1)·gw + rw` values (the `gw − rw` between rows are extra columns
/// the GEMM computes and the scatter skips). Phases no tap reads (a kernel smaller than its stride)
/// are left as they are. Returns `(gh, gw)`.
fn phase_grid<T: GatherElem>(x: &[T], cg: &ConvGeom, rect: Rect, buf: &mut [T]) -> (usize, usize) {
    let [c, h, w] = cg.in_shape;
    let ((kh, kw), (sh, sw), (ph, pw)) = (cg.kernel, cg.stride, cg.padding);
    let (y0, y1, x0, x1) = rect;
    let (gh, gw) = (y1 - y0 + (kh - 1) / sh, x1 - x0 + (kw - 1) / sw);
    for ch in 0..c {
        let plane = &x[ch * h * w..(ch + 1) * h * w];
        for pi in 0..sh.min(kh) {
            for pj in 0..sw.min(kw) {
                let base = ((ch * sh + pi) * sw + pj) * gh * gw;
                gather_rows(
                    plane,
                    (h, w),
                    &mut buf[base..base + gh * gw],
                    gw,
                    ((y0 * sh + pi) as isize - ph as isize, sh),
                    ((x0 * sw + pj) as isize - pw as isize, sw),
                );
            }
        }
    }
    (gh, gw)
}

/// The patch matrix of the outputs `rect` straight from the map `x (c, h, w)`: row `(ch, ki, kj)` of
/// `col` (row stride `ld`) gets, from column `off`, the input each output of the rectangle reads at that
/// tap (zero where it falls in the padding) — what gathering the window and unfolding it gives, in one
/// pass.
fn im2col_rect<T: GatherElem>(
    x: &[T],
    cg: &ConvGeom,
    rect: Rect,
    col: &mut [T],
    ld: usize,
    off: usize,
) {
    let [c, h, w] = cg.in_shape;
    let ((kh, kw), (sh, sw), (ph, pw)) = (cg.kernel, cg.stride, cg.padding);
    let (y0, y1, x0, x1) = rect;
    let (rh, rw) = (y1 - y0, x1 - x0);
    for ch in 0..c {
        let plane = &x[ch * h * w..(ch + 1) * h * w];
        for ki in 0..kh {
            for kj in 0..kw {
                let row = (ch * kh + ki) * kw + kj;
                gather_rows(
                    plane,
                    (h, w),
                    &mut col[row * ld + off..row * ld + off + rh * rw],
                    rw,
                    ((y0 * sh + ki) as isize - ph as isize, sh),
                    ((x0 * sw + kj) as isize - pw as isize, sw),
                );
            }
        }
    }
}

/// Fills `dst` (rows of `n` values) from the plane `(h, w)`: row `t` gets input row `iy0 + t·sy` at
/// columns `ix0 + q·sx` (`q` in `0..n`), zero where the row or column leaves the plane (the padding).
fn gather_rows<T: GatherElem>(
    plane: &[T],
    (h, w): (usize, usize),
    dst: &mut [T],
    n: usize,
    (iy0, sy): (isize, usize),
    (ix0, sx): (isize, usize),
) {
    let zero = T::default();
    // columns q whose input column ix0 + q·sx lies in 0..w
    let qa = if ix0 >= 0 {
        0
    } else {
        ((-ix0) as usize).div_ceil(sx)
    }
    .min(n);
    let qb = if ix0 >= w as isize {
        0
    } else {
        ((w as isize - 1 - ix0) as usize / sx + 1).min(n)
    }
    .max(qa);
    for (t, d) in dst.chunks_exact_mut(n).enumerate() {
        let iy = iy0 + (t * sy) as isize;
        if iy < 0 || iy >= h as isize || qa == qb {
            d.fill(zero);
            continue;
        }
        let src = &plane[iy as usize * w..(iy as usize + 1) * w];
        d[..qa].fill(zero);
        d[qb..].fill(zero);
        let s0 = (ix0 + (qa * sx) as isize) as usize;
        if sx == 1 {
            d[qa..qb].copy_from_slice(&src[s0..s0 + (qb - qa)]);
        } else if sx == 2 {
            T::take_even(&mut d[qa..qb], &src[s0..]);
        } else {
            d[qa..qb]
                .iter_mut()
                .zip(src[s0..].iter().step_by(sx))
                .for_each(|(v, &s)| *v = s);
        }
    }
}

/// Element types of the gathers ([`gather_rows`]), each with its copy of every other value.
trait GatherElem: Copy + Default {
    /// `d[q] = src[2q]` for every `q` of `d` (the common stride), `src` at least `2·(d.len() − 1) + 1`
    /// long. An index loop with a constant step, which the compiler turns into vector loads and
    /// shuffles for f32 (an iterator's `step_by` stays one value at a time).
    #[inline]
    fn take_even(d: &mut [Self], src: &[Self]) {
        if d.is_empty() {
            return;
        }
        let src = &src[..2 * d.len() - 1];
        for q in 0..d.len() {
            d[q] = src[2 * q];
        }
    }
}

impl GatherElem for f32 {}

impl GatherElem for i8 {
    /// For codes the index loop stays one byte at a time: on x86-64, blocks of 16 (then 8) outputs
    /// (see [`take_even_blocks`]); elsewhere, and for what is left, one at a time.
    #[inline]
    fn take_even(d: &mut [i8], src: &[i8]) {
        #[cfg(target_arch = "x86_64")]
        let q = {
            let q = take_even_blocks::<16>(d, src, 0);
            take_even_blocks::<8>(d, src, q)
        };
        #[cfg(not(target_arch = "x86_64"))]
        let q = 0;
        for q in q..d.len() {
            d[q] = src[2 * q];
        }
    }
}

/// `d[q] = src[2q]` from output `q` on, in blocks of `W` outputs (16 or 8) while they fit, the last block
/// overlapping the one before; returns the first output not written. A block keeps each 16-bit lane's low
/// byte (`and`) and packs the lanes (`packuswb`; they hold 0..=255, so nothing saturates).
#[cfg(target_arch = "x86_64")]
#[inline]
fn take_even_blocks<const W: usize>(d: &mut [i8], src: &[i8], mut q: usize) -> usize {
    use std::arch::x86_64::*;
    let n = d.len();
    let block = |d: &mut [i8], q: usize| {
        let (s, o) = (&src[2 * q..2 * q + 2 * W], &mut d[q..q + W]);
        // SAFETY: SSE2 is part of x86-64; `s` holds 2·W bytes (W = 8: one 16-byte load) and `o` W
        // (unaligned loads and stores).
        unsafe {
            let m = _mm_set1_epi16(0x00ff);
            let a = _mm_and_si128(_mm_loadu_si128(s.as_ptr().cast()), m);
            if W == 16 {
                let b = _mm_and_si128(_mm_loadu_si128(s.as_ptr().add(16).cast()), m);
                _mm_storeu_si128(o.as_mut_ptr().cast(), _mm_packus_epi16(a, b));
            } else {
                _mm_storel_epi64(o.as_mut_ptr().cast(), _mm_packus_epi16(a, a));
            }
        }
    };
    while q + W <= n && 2 * q + 2 * W <= src.len() {
        block(d, q);
        q += W;
    }
    if q < n && n >= W && 2 * n <= src.len() {
        block(d, n - W);
        q = n;
    }
    q
}

fn check_conv_shapes(
    x: usize,
    in_shape: [usize; 3],
    (shape, groups): ([usize; 4], usize),
    w: usize,
    y: usize,
    out_hw: (usize, usize),
) -> Result<()> {
    let [c, h, wd] = in_shape;
    let [o, wc, kh, kw] = shape;
    if wc * groups != c || x != c * h * wd || y != o * out_hw.0 * out_hw.1 || w != o * wc * kh * kw
    {
        return Err(Error::invalid(
            "x",
            format!("conv tile: shapes disagree (input {in_shape:?}, weight {shape:?})"),
        ));
    }
    Ok(())
}

/// Output pixels of `rects`.
fn pixels(rects: &[Rect]) -> usize {
    rects.iter().map(|&(a, b, c, d)| (b - a) * (d - c)).sum()
}

/// Writes `conv(x)` (plus bias), then the pointwise `ops`, into the rectangles `rects` of
/// `y (o, oh, ow)`; `x` is `(c, h, w)`. Bands of the rectangles run in parallel over the pool. With
/// `next`, the next INT8 conv's input codes are written there too ([`NextCodes`]).
#[allow(clippy::too_many_arguments)]
pub fn conv_rects(
    x: &[f32],
    in_shape: [usize; 3],
    p: &ConvParams,
    ops: &[Pointwise],
    rects: &[Rect],
    y: &mut [f32],
    out_hw: (usize, usize),
    next: Option<NextCodes<'_>>,
) -> Result<()> {
    check_conv_shapes(
        x.len(),
        in_shape,
        (p.shape, p.groups),
        p.weight.len(),
        y.len(),
        out_hw,
    )?;
    let [o, c, kh, kw] = p.shape;
    let k = c * kh * kw;
    let cg = ConvGeom {
        in_shape,
        o,
        kernel: p.window().kernel,
        stride: p.stride,
        padding: p.padding,
        out_hw,
        codes: codes_ptr(next, y.len())?,
    };
    let px = pixels(rects);
    let size = band_size(px, o * k);
    let bands = bands(rects, size);
    let parallel = bands.len() > 1;
    let copy = |src: &[f32], dst: &mut [f32]| dst.copy_from_slice(src);
    if is_grouped(p.groups, p.dilation) {
        return conv_per_band(x, &cg, ops, &bands, y, parallel, copy, |win, shape, out| {
            p.forward(win, shape, (0, 0), out)
        });
    }
    let wm = MatF32::row_major(&p.weight, o, k)?;
    let bias = p.bias.as_deref();
    conv_batches(
        x,
        &cg,
        None,
        ops,
        &bands,
        y,
        (parallel, size),
        |col, cols, out| {
            // like the dense conv: the output starts as the bias and the GEMM accumulates onto it, so
            // each output sees the same additions in the same order
            for (oc, row) in out.chunks_exact_mut(cols).enumerate() {
                row.fill(bias.map_or(0.0, |b| b[oc]));
            }
            let cm = MatF32::row_major(col, k, cols)?;
            // SAFETY: `out` is o × cols, row stride `cols`, not aliased.
            unsafe {
                sgemm(
                    &wm,
                    &cm,
                    out.as_mut_ptr(),
                    cols,
                    true,
                    !parallel && o * cols * k >= PAR_MIN_MACS && threads::num_threads() > 1,
                )
            };
            Ok(())
        },
    )
}

/// Each band on its own: its input window gathered through `convert` into a `(1, c, wh, ww)` image,
/// `conv(window, shape, out)` (a dense convolution with no padding, bias included) fills
/// `out (o, rh, rw)`, scattered into `y` with `ops` applied. Bands run in parallel when `parallel`.
#[allow(clippy::too_many_arguments)]
fn conv_per_band<S: Copy + Sync, T: Copy + Default + Send + Sync + crate::nn::ScratchElem>(
    x: &[S],
    cg: &ConvGeom,
    ops: &[Pointwise],
    bands: &[Rect],
    y: &mut [f32],
    parallel: bool,
    convert: impl Fn(&[S], &mut [T]) + Sync,
    conv: impl Fn(&[T], [usize; 4], &mut [f32]) -> Result<()> + Sync,
) -> Result<()> {
    let yp = OutPtr(y.as_mut_ptr());
    let o = cg.o;
    for_each_task(bands, parallel, |&rect| {
        let mut win = crate::nn::Scratch::<T>::new(window_len(cg, rect))?;
        let g = gather_window(x, cg, rect, &mut win, &convert)?;
        let (rh, rw) = (g.oh, g.ow);
        let mut out = take_f32(o * rh * rw)?;
        conv(&win[..g.c * g.h * g.w], [1, g.c, g.h, g.w], &mut out)?;
        // SAFETY: bands are disjoint, each handled by one task; `y` is (o, oh, ow).
        unsafe {
            scatter_band(
                &out,
                rh * rw,
                (0, rw),
                rect,
                o,
                cg.out_hw,
                None,
                ops,
                (yp, cg.codes),
            )
        };
        Ok(())
    })
}

/// INT8 counterpart of [`conv_rects`], reading the layer's input codes `xq (c, h, w)` (the input quantized
/// with the per-tensor scale `sx`, nearest rounding, as the dense INT8 conv quantizes it; the runner keeps
/// them cached and requantizes only where its input changed). When the layer has the direct VNNI
/// kernel's packed weights ([`DirectPlan`]: stride 1), bands at least [`I8_DIRECT_MIN_WIDTH`] wide run
/// through it on a grid laid from the codes; grouped/dilated convs run the dense grouped kernel on each
/// band's window; every other band (any stride, the 3-channel first layer) is unfolded from its phase
/// grid side by side for one INT8 GEMM with the `sw[o]·sx` epilogue. Every path sums exact INT32
/// products before the same rescale, so all give the same bits as the dense conv. With `next`, the next
/// INT8 conv's input codes are written there too ([`NextCodes`]).
#[allow(clippy::too_many_arguments)]
pub fn conv_rects_i8(
    xq: &[i8],
    in_shape: [usize; 3],
    p: &ConvI8Params,
    sx: f32,
    ops: &[Pointwise],
    rects: &[Rect],
    y: &mut [f32],
    out_hw: (usize, usize),
    direct: Option<&DirectPlan>,
    next: Option<NextCodes<'_>>,
) -> Result<()> {
    check_conv_shapes(
        xq.len(),
        in_shape,
        (p.shape, p.groups),
        p.wq.len(),
        y.len(),
        out_hw,
    )?;
    let [o, c, kh, kw] = p.shape;
    let k = c * kh * kw;
    let cg = ConvGeom {
        in_shape,
        o,
        kernel: p.window().kernel,
        stride: p.stride,
        padding: p.padding,
        out_hw,
        codes: codes_ptr(next, y.len())?,
    };
    let px = pixels(rects);
    let size = band_size(px, o * k);
    let all = bands(rects, size);
    let parallel = all.len() > 1;
    let grouped = is_grouped(p.groups, p.dilation);
    // without the direct kernel's packed weights, every band of an ungrouped conv is unfolded from its
    // phase grid for the INT8 GEMM (no per-band window image, plan or allocation)
    let grid = direct.is_some() && (kh > 1 || kw > 1);
    let (dense, narrow): (Vec<Rect>, Vec<Rect>) = all
        .into_iter()
        .partition(|r| grouped || (grid && r.3 - r.2 >= I8_DIRECT_MIN_WIDTH));
    let copy = |src: &[i8], dst: &mut [i8]| dst.copy_from_slice(src);
    if let (Some(dw), false) = (direct, dense.is_empty()) {
        let yp = OutPtr(y.as_mut_ptr());
        let bias = p.bias.as_deref();
        for_each_task(&dense, parallel, |&rect| {
            // SAFETY: bands are disjoint, each handled by one task; `y` is (o, oh, ow).
            unsafe { direct_band(xq, &cg, &dw.0, p.weight_scale(), sx, bias, ops, rect, yp) }
        })?;
    } else if !dense.is_empty() {
        conv_per_band(
            xq,
            &cg,
            ops,
            &dense,
            y,
            parallel,
            copy,
            |win, shape, out| p.forward(win, shape, sx, (0, 0), out),
        )?;
    }
    if narrow.is_empty() {
        return Ok(());
    }
    let wm = MatRef::row_major(&p.wq, o, k)?;
    conv_batches(
        xq,
        &cg,
        p.bias.as_deref(),
        ops,
        &narrow,
        y,
        (parallel, size),
        |col, cols, out| {
            let cm = MatRef::row_major(col, k, cols)?;
            gemm::gemm_i8_f32(&wm, &cm, p.weight_scale(), Scale::Scalar(sx), None, out)
        },
    )
}

/// Narrowest band (output columns) that runs through the direct kernel when the layer has its packed
/// weights ([`DirectPlan`]): its grid computes `kw − 1` extra columns per row and reads the codes in place.
const I8_DIRECT_MIN_WIDTH: usize = 8;

/// One band through the direct VNNI kernel with the layer's packed weights: the band's input window is
/// laid straight from the cached codes `xq (c, h, w)` on a grid of its own (channels interleaved by 4,
/// stored `v ^ 0x80`, `0x80` in the padding: [`GroupedImage`]), the kernel writes `o × rh·rw` outputs
/// with `sw[o]·sx` and the bias (the dense plan's epilogue, so the same bits), and they are scattered
/// into `y` with `ops` applied.
///
/// # Safety
/// `y` points to an `(o, oh, ow)` map that no other thread writes inside `rect`.
#[allow(clippy::too_many_arguments)]
unsafe fn direct_band(
    xq: &[i8],
    cg: &ConvGeom,
    dw: &DirectWeights,
    sw: Scale,
    sx: f32,
    bias: Option<&[f32]>,
    ops: &[Pointwise],
    rect: Rect,
    y: OutPtr<f32>,
) -> Result<()> {
    let [c, h, w] = cg.in_shape;
    let ((kh, kw), (ph, pw)) = (cg.kernel, cg.padding);
    let (y0, y1, x0, x1) = rect;
    let (rh, rw) = (y1 - y0, x1 - x0);
    let (wh, ww) = (rh - 1 + kh, rw - 1 + kw);
    let (cgs, plane) = (c.div_ceil(4), wh * ww);
    let ncols = (rh - 1) * ww + rw;
    let offsets = crate::alloc::offsets(cgs, kh, kw, plane, ww);
    // the kernel reads whole tiles of 16 positions from every k-group's offset
    let span = ncols.div_ceil(16) * 16;
    let positions = (offsets.iter().max().copied().unwrap_or(0) + span).max(cgs * plane);
    // Only the window's planes are written (the padding `0x80`): the positions past them, which the
    // kernel's whole tiles also read, feed only output columns the scatter drops.
    let mut buf = crate::nn::Scratch::<i8>::new(positions * 4)?;
    let pad = 0x80u8 as i8;
    // window columns inside 0..w
    let ix0 = x0 as isize - pw as isize;
    let lo = ((-ix0).max(0) as usize).min(ww);
    let hi = ((w as isize - ix0).max(0) as usize).min(ww).max(lo);
    for g in 0..cgs {
        let nch = (c - 4 * g).min(4);
        for t in 0..wh {
            let row = &mut buf[(g * plane + t * ww) * 4..(g * plane + (t + 1) * ww) * 4];
            let iy = (y0 + t) as isize - ph as isize;
            if iy < 0 || iy >= h as isize || lo == hi {
                row.fill(pad);
                continue;
            }
            row[..lo * 4].fill(pad);
            row[hi * 4..].fill(pad);
            let src0 = iy as usize * w + (ix0 + lo as isize) as usize;
            let dst = &mut row[lo * 4..hi * 4];
            let plane_in =
                |j: usize| &xq[(4 * g + j) * h * w + src0..(4 * g + j) * h * w + src0 + (hi - lo)];
            if nch == 4 {
                // a full group of four channels in one interleaving pass
                let (a, b, c2, d2) = (plane_in(0), plane_in(1), plane_in(2), plane_in(3));
                interleave4(dst, a, b, c2, d2);
                continue;
            }
            // the bytes of a partial group's missing channels stay as they are: their weights are 0
            for j in 0..nch {
                for (d, &v) in dst.chunks_exact_mut(4).zip(plane_in(j)) {
                    d[j] = v ^ (0x80u8 as i8);
                }
            }
        }
    }
    let img = GroupedImage::new(&buf, &offsets, ncols)?;
    let to = GridScatter {
        wp: ww,
        s: ww,
        ow: rw,
        nb: 1,
        p: rh * rw,
        bias,
    };
    let o = cg.o;
    let mut out = take_f32(o * rh * rw)?;
    direct_conv::conv_direct_f32(dw, &img, sw, sx, &mut out, &to, false)?;
    // SAFETY: as the caller guarantees.
    unsafe {
        scatter_band(
            &out,
            rh * rw,
            (0, rw),
            rect,
            o,
            cg.out_hw,
            None,
            ops,
            (y, cg.codes),
        )
    };
    Ok(())
}

crate::simd::avx2_multiversion! {
    /// `dst[4i + j] = p_j[i] ^ 0x80` for the four planes `p_0..p_3` (the direct kernel's grid of a full
    /// group of four channels), `i` in `0..dst.len() / 4`.
    fn interleave4(dst: &mut [i8], a: &[i8], b: &[i8], c: &[i8], d: &[i8]) {
        let n = (dst.len() / 4).min(a.len()).min(b.len()).min(c.len()).min(d.len());
        let (dst, a, b, c, d) = (&mut dst[..4 * n], &a[..n], &b[..n], &c[..n], &d[..n]);
        let m = 0x80u8 as i8;
        for i in 0..n {
            dst[4 * i] = a[i] ^ m;
            dst[4 * i + 1] = b[i] ^ m;
            dst[4 * i + 2] = c[i] ^ m;
            dst[4 * i + 3] = d[i] ^ m;
        }
    }
}

/// Fewest values [`quantize_rects`] spreads over the threads.
/// (Any size in unit tests, so that they take the parallel path.)
const QUANT_PAR_MIN: usize = if cfg!(test) { 1 } else { 1 << 15 };

/// Quantizes the rectangles `rects` of `x (c, h, w)` into `xq` (same layout) with the per-tensor scale
/// `sx`, nearest rounding: the same codes as quantizing the whole map. Channels run in parallel over the
/// pool when there is enough to do.
pub fn quantize_rects(x: &[f32], shape: [usize; 3], sx: f32, rects: &[Rect], xq: &mut [i8]) {
    let [c, h, w] = shape;
    let whole = x.len() >= c * h * w && xq.len() >= c * h * w;
    if whole && c > 1 && threads::num_threads() > 1 && c * pixels(rects) >= QUANT_PAR_MIN {
        crate::nn::for_each_chunk(&mut xq[..c * h * w], h * w, true, |ch, qc| {
            quantize_rects_on(&x[ch * h * w..(ch + 1) * h * w], [1, h, w], sx, rects, qc)
        });
    } else {
        quantize_rects_on(x, shape, sx, rects, xq)
    }
}

crate::simd::avx2_multiversion! {
    /// [`quantize_rects`] on this thread.
    fn quantize_rects_on(x: &[f32], shape: [usize; 3], sx: f32, rects: &[Rect], xq: &mut [i8]) {
        let [c, h, w] = shape;
        for ch in 0..c {
            for &(y0, y1, x0, x1) in rects {
                for y in y0..y1 {
                    let o = (ch * h + y) * w;
                    quantize_nearest_run(&x[o + x0..o + x1], sx, &mut xq[o + x0..o + x1]);
                }
            }
        }
    }
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
                apply_ops(ops, ch, &mut yp[oy * ow + x0..oy * ow + x1]);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lcg(seed: &mut u64) -> f32 {
        *seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((*seed >> 40) as f32 / (1u64 << 24) as f32) * 8.0 - 4.0
    }

    /// One value through `bias` and `ops` in order, one at a time: the oracle of the vector epilogue.
    fn reference(v: f32, bias: Option<f32>, ops: &[Pointwise], ch: usize) -> f32 {
        let mut v = bias.map_or(v, |b| v + b);
        for op in ops {
            v = match op {
                Pointwise::Relu => relu(v),
                Pointwise::Relu6 => relu6(v),
                Pointwise::Affine { a, b } => v * a[ch] + b[ch],
            };
        }
        v
    }

    /// The stride-2 gather takes every other value for i8 codes (whole blocks, an overlapping last
    /// block, the rest one at a time) and f32 values, from a source just long enough or longer.
    #[test]
    fn take_even_takes_every_other_value() {
        for n in 0..=53 {
            for extra in [0usize, 1, 7] {
                let len = if n == 0 {
                    extra
                } else {
                    2 * (n - 1) + 1 + extra
                };
                let src8: Vec<i8> = (0..len).map(|i| (i * 73 + 11) as u8 as i8).collect();
                let mut d8 = vec![0i8; n];
                i8::take_even(&mut d8, &src8);
                let want8: Vec<i8> = (0..n).map(|q| src8[2 * q]).collect();
                assert_eq!(d8, want8, "i8 n {n} extra {extra}");
                let src32: Vec<f32> = (0..len).map(|i| i as f32 * 0.5 - 3.0).collect();
                let mut d32 = vec![f32::NAN; n];
                f32::take_even(&mut d32, &src32);
                let want32: Vec<f32> = (0..n).map(|q| src32[2 * q]).collect();
                assert_eq!(d32, want32, "f32 n {n} extra {extra}");
            }
        }
    }

    /// The band epilogue (the AVX2 build where the CPU has it) writes exactly what the one-value-at-a-time
    /// oracle gives, values and next-layer codes, for rows shorter than, equal to and longer than a
    /// vector (rows that end with an overlapping vector), and leaves everything outside the band alone.
    #[test]
    fn scatter_band_matches_scalar_oracle_on_every_row_length() {
        let mut seed = 7u64;
        let o = 3;
        let affine = |seed: &mut u64| Pointwise::Affine {
            a: (0..o).map(|_| lcg(seed)).collect(),
            b: (0..o).map(|_| lcg(seed)).collect(),
        };
        let op_lists: Vec<Vec<Pointwise>> = vec![
            vec![],
            vec![Pointwise::Relu],
            vec![Pointwise::Relu6],
            vec![affine(&mut seed)],
            vec![affine(&mut seed), Pointwise::Relu],
            vec![affine(&mut seed), Pointwise::Relu6],
            vec![affine(&mut seed), affine(&mut seed)],
            vec![affine(&mut seed), affine(&mut seed), Pointwise::Relu],
            vec![affine(&mut seed), affine(&mut seed), Pointwise::Relu6],
            vec![Pointwise::Relu, affine(&mut seed), Pointwise::Relu6],
        ];
        let (oh, ow) = (5, 40);
        for ops in &op_lists {
            for rw in 1..=33 {
                for (with_bias, with_codes, values) in [
                    (false, false, true),
                    (true, true, true),
                    (false, true, true),
                    (true, true, false),
                    (false, true, false),
                ] {
                    let x0 = (rw * 3) % (ow - rw + 1);
                    let rect = (1, 4, x0, x0 + rw);
                    let rh = rect.1 - rect.0;
                    let ld = rh * rw + 5;
                    let src: Vec<f32> = (0..o * ld).map(|_| lcg(&mut seed)).collect();
                    let bias: Vec<f32> = (0..o).map(|_| lcg(&mut seed)).collect();
                    let bias = with_bias.then_some(&bias[..]);
                    let sx = 0.05f32;
                    let mut y = vec![f32::NAN; o * oh * ow];
                    let mut q = vec![99i8; o * oh * ow];
                    let codes = with_codes.then(|| (OutPtr(q.as_mut_ptr()), sx, values));
                    // SAFETY: one thread; `y` and `q` are (o, oh, ow), the rect lies inside.
                    unsafe {
                        scatter_band(
                            &src,
                            ld,
                            (2, rw),
                            rect,
                            o,
                            (oh, ow),
                            bias,
                            ops,
                            (OutPtr(y.as_mut_ptr()), codes),
                        )
                    };
                    for oc in 0..o {
                        for yy in 0..oh {
                            for xx in 0..ow {
                                let at = (oc * oh + yy) * ow + xx;
                                let inside =
                                    yy >= rect.0 && yy < rect.1 && xx >= rect.2 && xx < rect.3;
                                if !inside {
                                    assert!(
                                        y[at].is_nan() && q[at] == 99,
                                        "wrote outside the band"
                                    );
                                    continue;
                                }
                                let s = src[oc * ld + 2 + (yy - rect.0) * rw + (xx - rect.2)];
                                let want = reference(s, bias.map(|b| b[oc]), ops, oc);
                                if values {
                                    assert_eq!(
                                        y[at].to_bits(),
                                        want.to_bits(),
                                        "ops {ops:?} width {rw} at ({oc}, {yy}, {xx})"
                                    );
                                } else {
                                    // codes alone: the op lists of one fused loop leave the values out;
                                    // the others may use the row as scratch
                                    use Pointwise::{Affine as A, Relu as R, Relu6 as R6};
                                    let fused = matches!(
                                        ops.as_slice(),
                                        [] | [R | R6]
                                            | [A { .. }]
                                            | [A { .. }, R | R6]
                                            | [A { .. }, A { .. }]
                                            | [A { .. }, A { .. }, R | R6]
                                    );
                                    assert!(
                                        y[at].is_nan() || !fused && y[at] == want,
                                        "codes alone wrote a value: ops {ops:?} width {rw}"
                                    );
                                }
                                let code = if with_codes {
                                    nearest_code(want, sx)
                                } else {
                                    99
                                };
                                assert_eq!(q[at], code, "code: ops {ops:?} width {rw}");
                            }
                        }
                    }
                }
            }
        }
    }
}
