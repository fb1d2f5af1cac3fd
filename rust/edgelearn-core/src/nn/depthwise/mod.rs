//! Grouped and depthwise 2-D convolution (`groups > 1`), FP32 and INT8, forward and backward, with its
//! own direct kernels (no GEMM per group).
//!
//! Shapes: `x (N, C, H, W)`, `w (O, C/groups, kh, kw)`, `y (N, O, OH, OW)`; `groups` divides `C` and `O`
//! (depthwise: `groups == C`, channel multiplier `O/C ≥ 1`); any stride, padding and dilation.
//!
//! Method: for each image and group, the group's input planes are copied once into zero-padded planes
//! ([`Pad`]); with a column stride `s > 1` each padded row is stored as `s` phases (columns `φ, φ+s, …`),
//! so every tap `(c, i, j)` of every output row reads a *contiguous* run at a fixed offset. One output
//! plane is then `Σ_taps w[tap] · shifted plane` ([`DwKernel::corr_f32`], register-blocked over the taps),
//! written straight into `y` (INT8: as INT32 in `y`'s own memory, rescaled in place).
//!
//! Backward, one call: `db = Σ dY`; `dX` (padding ≤ the dilated window) is the stride-1 forward
//! convolution of `dY` with the flipped kernel and input/output channels swapped (the same kernels; with
//! stride `s > 1` on `dY` spread out with `s − 1` zeros between values, which keeps every read contiguous),
//! otherwise a scatter of `w · dY` into padded `dX` planes (one tap at a time, `corr` with one tap); `dW[o, c, tap]` is a dot product of the `dY` plane with the shifted input
//! plane ([`DwKernel::dot_f32`], in a fixed 16-lane order flushed to f64 per plane, so the sum does not
//! depend on the kernel or the thread count). INT8 sums are exact (INT32 per plane, i64 across images).
//!
//! Work is spread over `(image, group)` pairs (forward, `dX`) and over groups (`dW`, each group's weight
//! gradient owned by one task).

#[cfg(target_arch = "aarch64")]
mod aarch64;
mod kernels;
#[cfg(target_arch = "x86_64")]
mod x86;

pub use kernels::{
    active_depthwise_kernel, depthwise_kernel_for, depthwise_kernels, DwKernel, Rows, MAX_ROW_I8,
};

use std::cell::RefCell;

use super::conv::{check_bias, check_scalar_scale, check_weight_scale};
use super::{check_len, shape_len, take_f32, take_i8};
use crate::error::{Error, Result};
use crate::gemm::{Scale, MAX_K_I32};
use crate::threads;

/// Groups, stride, padding and dilation of a convolution.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GroupedParams {
    pub groups: usize,
    pub stride: (usize, usize),
    pub padding: (usize, usize),
    pub dilation: (usize, usize),
}

impl GroupedParams {
    pub fn new(
        groups: usize,
        stride: (usize, usize),
        padding: (usize, usize),
        dilation: (usize, usize),
    ) -> Self {
        GroupedParams {
            groups,
            stride,
            padding,
            dilation,
        }
    }
}

/// The checked shapes of one grouped convolution.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GroupedShape {
    pub n: usize,
    pub c: usize,
    pub h: usize,
    pub w: usize,
    pub o: usize,
    pub groups: usize,
    pub kh: usize,
    pub kw: usize,
    pub sh: usize,
    pub sw: usize,
    pub ph: usize,
    pub pw: usize,
    pub dh: usize,
    pub dw: usize,
    pub oh: usize,
    pub ow: usize,
}

impl GroupedShape {
    /// Checks `x (N, C, H, W)` against `w (O, C/groups, kh, kw)` and the parameters.
    pub fn new(x: [usize; 4], w: [usize; 4], p: GroupedParams) -> Result<Self> {
        let [n, c, h, wd] = x;
        let [o, cg, kh, kw] = w;
        let g = p.groups;
        if g == 0 {
            return Err(Error::invalid("groups", "must be at least 1"));
        }
        if c % g != 0 || o % g != 0 {
            return Err(Error::invalid(
                "groups",
                format!("{g} groups must divide both the {c} input and the {o} output channels"),
            ));
        }
        if cg != c / g {
            return Err(Error::invalid(
                "w",
                format!(
                    "has {cg} input channels per group (shape {w:?}) but x has {c} channels in {g} groups, i.e. {}",
                    c / g
                ),
            ));
        }
        let ((sh, sw), (ph, pw), (dh, dw)) = (p.stride, p.padding, p.dilation);
        if kh == 0 || kw == 0 {
            return Err(Error::invalid(
                "w",
                format!("kernel must be positive, got ({kh}, {kw})"),
            ));
        }
        if sh == 0 || sw == 0 {
            return Err(Error::invalid(
                "stride",
                format!("must be positive, got ({sh}, {sw})"),
            ));
        }
        if dh == 0 || dw == 0 {
            return Err(Error::invalid(
                "dilation",
                format!("must be positive, got ({dh}, {dw})"),
            ));
        }
        const LIMIT: usize = 1 << 20;
        if [kh, kw, sh, sw, ph, pw, dh, dw, h, wd]
            .iter()
            .any(|&v| v > LIMIT)
        {
            return Err(Error::invalid(
                "x",
                format!(
                    "sizes, kernel, stride, padding or dilation above {LIMIT} are not supported"
                ),
            ));
        }
        let (eh, ew) = ((kh - 1) * dh + 1, (kw - 1) * dw + 1);
        if h + 2 * ph < eh || wd + 2 * pw < ew {
            return Err(Error::invalid(
                "x",
                format!(
                    "spatial size ({h}, {wd}) with padding ({ph}, {pw}) is smaller than the dilated kernel ({eh}, {ew})"
                ),
            ));
        }
        let oh = (h + 2 * ph - eh) / sh + 1;
        let ow = (wd + 2 * pw - ew) / sw + 1;
        shape_len("x", &x)?;
        shape_len("w", &w)?;
        shape_len("y", &[n, o, oh, ow])?;
        Ok(GroupedShape {
            n,
            c,
            h,
            w: wd,
            o,
            groups: g,
            kh,
            kw,
            sh,
            sw,
            ph,
            pw,
            dh,
            dw,
            oh,
            ow,
        })
    }
    /// `(N, O, OH, OW)`.
    pub fn output(&self) -> [usize; 4] {
        [self.n, self.o, self.oh, self.ow]
    }
    /// Input channels per group.
    pub fn cg(&self) -> usize {
        self.c / self.groups
    }
    /// Output channels per group.
    pub fn og(&self) -> usize {
        self.o / self.groups
    }
    fn taps(&self) -> usize {
        self.kh * self.kw
    }
    fn pad(&self) -> Pad {
        Pad {
            h: self.h,
            w: self.w,
            ph: self.ph,
            pw: self.pw,
            sh: self.sh,
            sw: self.sw,
        }
    }
    /// Tap offsets into one padded plane, in weight order `(i, j)`.
    fn tap_offsets(&self) -> Vec<usize> {
        let pad = self.pad();
        let mut v = Vec::with_capacity(self.taps());
        for i in 0..self.kh {
            for j in 0..self.kw {
                v.push(pad.offset(i * self.dh, j * self.dw));
            }
        }
        v
    }
    /// Tap offsets for all `cg` planes of a group laid one after another.
    fn group_offsets(&self) -> Vec<usize> {
        let (taps, plane) = (self.tap_offsets(), self.pad().plane_len());
        let mut v = Vec::with_capacity(self.cg() * taps.len());
        for c in 0..self.cg() {
            v.extend(taps.iter().map(|&t| c * plane + t));
        }
        v
    }
    /// The convolution whose forward is this one's `dX` (padding within the dilated window): input `dY`
    /// spread on a stride-1 grid (`s − 1` zeros between neighbours, plus the rows/columns the forward's
    /// floor dropped), channels swapped, same groups, stride 1, padding `(k−1)·d − p`. Returns it with the
    /// spread grid's height and width (`(OH, OW)` at stride 1: no spreading).
    fn transposed(&self) -> Option<(GroupedShape, usize, usize)> {
        let (qh, qw) = ((self.kh - 1) * self.dh, (self.kw - 1) * self.dw);
        if self.ph > qh || self.pw > qw {
            return None;
        }
        let rh = (self.h + 2 * self.ph - qh - 1) % self.sh;
        let rw = (self.w + 2 * self.pw - qw - 1) % self.sw;
        let hu = (self.oh - 1) * self.sh + 1 + rh;
        let wu = (self.ow - 1) * self.sw + 1 + rw;
        let t = GroupedShape::new(
            [self.n, self.o, hu, wu],
            [self.c, self.og(), self.kh, self.kw],
            GroupedParams::new(
                self.groups,
                (1, 1),
                (qh - self.ph, qw - self.pw),
                (self.dh, self.dw),
            ),
        )
        .ok()?;
        (t.oh == self.h && t.ow == self.w).then_some((t, hu, wu))
    }
    /// `dy` planes spread on the `hu × wu` grid of [`Self::transposed`] (a copy only when strided).
    fn spread<'a, T: Copy + Default>(
        &self,
        dy: &'a [T],
        hu: usize,
        wu: usize,
    ) -> std::borrow::Cow<'a, [T]>
    where
        [T]: ToOwned<Owned = Vec<T>>,
    {
        if self.sh == 1 && self.sw == 1 {
            return std::borrow::Cow::Borrowed(dy);
        }
        let (p, pu) = (self.oh * self.ow, hu * wu);
        let mut out = vec![T::default(); self.n * self.o * pu];
        for (src, dst) in dy
            .chunks_exact(p.max(1))
            .zip(out.chunks_exact_mut(pu.max(1)))
        {
            for (oy, row) in src.chunks_exact(self.ow.max(1)).enumerate() {
                let d = &mut dst[oy * self.sh * wu..];
                for (ox, &v) in row.iter().enumerate() {
                    d[ox * self.sw] = v;
                }
            }
        }
        std::borrow::Cow::Owned(out)
    }
    /// `W̃ (C, O/groups, kh, kw)` of [`Self::transposed`] from `w (O, C/groups, kh, kw)`, window flipped.
    fn flip_weights<T: Copy + Default>(&self, w: &[T]) -> Vec<T> {
        let (cg, og, kk) = (self.cg(), self.og(), self.taps());
        let mut out = vec![T::default(); w.len()];
        for g in 0..self.groups {
            for oi in 0..og {
                for ci in 0..cg {
                    let src = &w[((g * og + oi) * cg + ci) * kk..][..kk];
                    let dst = &mut out[((g * cg + ci) * og + oi) * kk..][..kk];
                    for (d, &v) in dst.iter_mut().zip(src.iter().rev()) {
                        *d = v;
                    }
                }
            }
        }
        out
    }
}

/// `dst.copy_from_slice(src)` for short runs, in fixed-size blocks the compiler turns into vector moves (the
/// last block overlaps the one before it) instead of a `memcpy` call per run.
#[inline(always)]
fn copy_short<T: Copy>(src: &[T], dst: &mut [T]) {
    fn blocks<T: Copy, const B: usize>(src: &[T], dst: &mut [T]) {
        let n = src.len();
        let mut i = 0;
        loop {
            let j = i.min(n - B); // the last block ends at n
            let s: [T; B] = src[j..j + B].try_into().expect("B elements");
            let d: &mut [T; B] = (&mut dst[j..j + B]).try_into().expect("B elements");
            *d = s;
            i += B;
            if i >= n {
                break;
            }
        }
    }
    debug_assert_eq!(src.len(), dst.len());
    match src.len() {
        n if n >= 16 => blocks::<T, 16>(src, dst),
        n if n >= 4 => blocks::<T, 4>(src, dst),
        _ => {
            for (d, &v) in dst.iter_mut().zip(src) {
                *d = v;
            }
        }
    }
}

/// `dst[k] = src[2k]` for every `k` of `dst` (`src` holds at least `2·dst.len() − 1` elements), in pairs
/// the compiler de-interleaves with vector shuffles.
#[inline(always)]
fn every_second<T: Copy>(src: &[T], dst: &mut [T]) {
    let full = (src.len() / 2).min(dst.len());
    for (d, pair) in dst[..full].iter_mut().zip(src.chunks_exact(2)) {
        *d = pair[0];
    }
    if full < dst.len() {
        dst[full] = src[2 * full];
    }
}

/// The zero-padded, column-phased copy of one input plane: padded row `r` (`0..h + 2ph`), phase `φ`
/// (`0..sw`) is the run `[(r·sw + φ)·wq ..][..wq]` holding padded columns `φ, φ + sw, …`.
#[derive(Clone, Copy, Debug)]
struct Pad {
    h: usize,
    w: usize,
    ph: usize,
    pw: usize,
    sh: usize,
    sw: usize,
}

impl Pad {
    fn hp(&self) -> usize {
        self.h + 2 * self.ph
    }
    fn wq(&self) -> usize {
        (self.w + 2 * self.pw).div_ceil(self.sw)
    }
    fn plane_len(&self) -> usize {
        self.hp() * self.sw * self.wq()
    }
    /// Distance between the starts of consecutive output rows.
    fn row_step(&self) -> usize {
        self.sh * self.sw * self.wq()
    }
    /// Offset of padded `(row, col)` for output `(0, 0)`.
    fn offset(&self, row: usize, col: usize) -> usize {
        (row * self.sw + col % self.sw) * self.wq() + col / self.sw
    }
    /// Copies `planes` input planes `src` (each `h·w`) into `dst` (each `plane_len`), zero-padded. Every
    /// element of `dst` is written once: padded row `r` is the contiguous run `r·sw·wq..(r + 1)·sw·wq`
    /// (its `sw` column phases one after the other), so the padding rows are one zero run and each input
    /// row lands phase by phase between the zeros of its borders.
    fn fill<T: Copy + Default>(&self, src: &[T], dst: &mut [T]) {
        let (hw, pl, wq, sw) = (self.h * self.w, self.plane_len(), self.wq(), self.sw);
        let (w, pw, run) = (self.w, self.pw, sw * wq);
        let zero = T::default();
        // per column phase (strided planes): the zeros before the row's elements (j0), the row's first
        // element in that phase (x0) and how many of them there are
        let phases: Vec<(usize, usize, usize)> = (0..if sw > 1 { sw } else { 0 })
            .map(|phase| {
                let j0 = pw.saturating_sub(phase).div_ceil(sw);
                let x0 = phase + sw * j0 - pw;
                let count = if x0 < w { (w - x0).div_ceil(sw) } else { 0 };
                (j0, x0, count)
            })
            .collect();
        for (sp, dp) in src
            .chunks_exact(hw.max(1))
            .zip(dst.chunks_exact_mut(pl.max(1)))
        {
            // one zero run for the whole plane, then the rows over it: short rows (a few to a few dozen
            // elements) cost three library calls each when written border by border
            dp.fill(zero);
            if w == 0 {
                continue;
            }
            let mid = &mut dp[self.ph * run..(self.ph + self.h) * run];
            if sw == 1 {
                for (row, seg) in sp.chunks_exact(w).zip(mid.chunks_exact_mut(run.max(1))) {
                    copy_short(row, &mut seg[pw..pw + w]);
                }
                continue;
            }
            for (row, seg) in sp.chunks_exact(w).zip(mid.chunks_exact_mut(run.max(1))) {
                for (sub, &(j0, x0, count)) in seg.chunks_exact_mut(wq).zip(&phases) {
                    if count == 0 {
                        continue;
                    }
                    let (from, to) = (&row[x0..], &mut sub[j0..j0 + count]);
                    if sw == 2 {
                        every_second(from, to);
                    } else {
                        for (d, &v) in to.iter_mut().zip(from.iter().step_by(sw)) {
                            *d = v;
                        }
                    }
                }
            }
        }
    }
    /// The inverse of [`Self::fill`] for one plane: the unpadded part of `src`, through `f`, into `dst`.
    fn extract<T: Copy>(&self, src: &[T], dst: &mut [f32], f: impl Fn(T) -> f32) {
        let wq = self.wq();
        for (y, row) in dst.chunks_exact_mut(self.w.max(1)).enumerate() {
            let r = y + self.ph;
            for (x, d) in row.iter_mut().enumerate() {
                let col = x + self.pw;
                *d = f(src[(r * self.sw + col % self.sw) * wq + col / self.sw]);
            }
        }
    }
}

thread_local! {
    static SCRATCH_I32: RefCell<Vec<i32>> = const { RefCell::new(Vec::new()) };
}

/// Runs `f` on `len` zeroed i32 of this thread's scratch.
fn with_i32<R>(len: usize, f: impl FnOnce(&mut [i32]) -> R) -> R {
    SCRATCH_I32.with(|s| {
        let mut v = std::mem::take(&mut *s.borrow_mut());
        if v.len() < len {
            v.resize(len, 0);
        }
        v[..len].fill(0);
        let r = f(&mut v[..len]);
        *s.borrow_mut() = v;
        r
    })
}

fn scale_at(sw: &Scale, o: usize) -> f32 {
    match sw {
        Scale::Scalar(s) => *s,
        Scale::PerIndex(v) => v[o],
    }
}

/// INT32 sums of one output reach `taps` products: refuse what could overflow.
fn check_i32_taps(taps: usize) -> Result<()> {
    if taps > MAX_K_I32 {
        return Err(Error::overflow(
            "w",
            format!("{taps} products per output could overflow INT32 (at most {MAX_K_I32})"),
        ));
    }
    Ok(())
}

// --- FP32 ------------------------------------------------------------------------------------------------

/// `y = conv2d(x, w, groups) + bias` in FP32 with the active kernel (see the module docs).
#[allow(clippy::too_many_arguments)]
pub fn conv2d_grouped_f32_forward(
    x: &[f32],
    x_shape: [usize; 4],
    w: &[f32],
    w_shape: [usize; 4],
    bias: Option<&[f32]>,
    p: GroupedParams,
    y: &mut [f32],
) -> Result<GroupedShape> {
    conv2d_grouped_f32_forward_with(
        active_depthwise_kernel()?,
        x,
        x_shape,
        w,
        w_shape,
        bias,
        p,
        y,
    )
}

/// [`conv2d_grouped_f32_forward`] on the kernel `kern`.
#[allow(clippy::too_many_arguments)]
pub fn conv2d_grouped_f32_forward_with(
    kern: &DwKernel,
    x: &[f32],
    x_shape: [usize; 4],
    w: &[f32],
    w_shape: [usize; 4],
    bias: Option<&[f32]>,
    p: GroupedParams,
    y: &mut [f32],
) -> Result<GroupedShape> {
    let s = GroupedShape::new(x_shape, w_shape, p)?;
    check_len("x", x.len(), &x_shape)?;
    check_len("w", w.len(), &w_shape)?;
    check_bias(bias, s.o)?;
    check_len("y", y.len(), &s.output())?;
    forward_f32(kern, &s, x, w, bias, y)?;
    Ok(s)
}

/// Runs `f(buf, n, g, out)` for every (image `n`, group `g`) of a forward output `y` (`per_group` elements
/// each), over the pool. A task runs several groups of one image (a divisor of the group count, so a task
/// never spans two images; about 64 tasks a batch, enough for the threads to share) with one scratch buffer
/// from `buf` for all of them instead of one per group.
fn for_each_group<T: Send, B>(
    s: &GroupedShape,
    y: &mut [T],
    per_group: usize,
    buf: impl Fn() -> Result<B> + Sync,
    f: impl Fn(&mut B, usize, usize, &mut [T]) -> Result<()> + Sync,
) -> Result<()> {
    let want = (s.n * s.groups).div_ceil(64).clamp(1, s.groups.max(1));
    let per = (1..=want)
        .rev()
        .find(|&d| s.groups.is_multiple_of(d))
        .unwrap_or(1);
    threads::for_each_piece(y, per * per_group, |task, ys| {
        let mut b = buf()?;
        for (j, yg) in ys.chunks_mut(per_group).enumerate() {
            let t = task * per + j;
            f(&mut b, t / s.groups, t % s.groups, yg)?;
        }
        Ok(())
    })
}

/// The FP32 forward on checked arguments.
fn forward_f32(
    kern: &DwKernel,
    s: &GroupedShape,
    x: &[f32],
    w: &[f32],
    bias: Option<&[f32]>,
    y: &mut [f32],
) -> Result<()> {
    let (cg, og, p) = (s.cg(), s.og(), s.oh * s.ow);
    if y.is_empty() {
        return Ok(());
    }
    let pad = s.pad();
    let (pl, xin) = (pad.plane_len(), cg * s.h * s.w);
    let offs = s.group_offsets();
    let kk = cg * s.taps();
    let rows = Rows {
        rows: s.oh,
        len: s.ow,
        ldo: s.ow,
        lds: pad.row_step(),
    };
    let buf = || take_f32(cg * pl);
    for_each_group(s, y, og * p, buf, |buf, n, g, yc| {
        pad.fill(&x[(n * s.c + g * cg) * s.h * s.w..][..xin], buf);
        for (oi, yp) in yc.chunks_exact_mut(p).enumerate() {
            let o = g * og + oi;
            yp.fill(bias.map_or(0.0, |b| b[o]));
            kern.corr_f32(yp, buf, rows, &offs, &w[o * kk..(o + 1) * kk])?;
        }
        Ok(())
    })
}

/// Backward of [`conv2d_grouped_f32_forward`]: `dw`, `db` and, if given, `dx`; all overwritten.
#[allow(clippy::too_many_arguments)]
pub fn conv2d_grouped_f32_backward(
    x: &[f32],
    x_shape: [usize; 4],
    w: &[f32],
    w_shape: [usize; 4],
    dy: &[f32],
    p: GroupedParams,
    dx: Option<&mut [f32]>,
    dw: &mut [f32],
    db: &mut [f32],
) -> Result<GroupedShape> {
    conv2d_grouped_f32_backward_with(
        active_depthwise_kernel()?,
        x,
        x_shape,
        w,
        w_shape,
        dy,
        p,
        dx,
        dw,
        db,
    )
}

/// [`conv2d_grouped_f32_backward`] on the kernel `kern`.
#[allow(clippy::too_many_arguments)]
pub fn conv2d_grouped_f32_backward_with(
    kern: &DwKernel,
    x: &[f32],
    x_shape: [usize; 4],
    w: &[f32],
    w_shape: [usize; 4],
    dy: &[f32],
    p: GroupedParams,
    dx: Option<&mut [f32]>,
    dw: &mut [f32],
    db: &mut [f32],
) -> Result<GroupedShape> {
    let s = GroupedShape::new(x_shape, w_shape, p)?;
    check_len("x", x.len(), &x_shape)?;
    check_len("w", w.len(), &w_shape)?;
    check_len("dy", dy.len(), &s.output())?;
    check_len("dw", dw.len(), &w_shape)?;
    check_len("db", db.len(), &[s.o])?;
    if let Some(d) = dx.as_deref() {
        check_len("dx", d.len(), &x_shape)?;
    }
    super::conv::channel_sums(dy, &s.output(), db)?;
    if let Some(dx) = dx {
        dx_f32(kern, &s, w, dy, dx)?;
    }
    dw_f32(kern, &s, x, dy, dw)?;
    Ok(s)
}

/// `dx` of the FP32 convolution from `dy`.
fn dx_f32(kern: &DwKernel, s: &GroupedShape, w: &[f32], dy: &[f32], dx: &mut [f32]) -> Result<()> {
    if dx.is_empty() {
        return Ok(());
    }
    if let Some((t, hu, wu)) = s.transposed() {
        return forward_f32(
            kern,
            &t,
            &s.spread(dy, hu, wu),
            &s.flip_weights(w),
            None,
            dx,
        );
    }
    let (cg, og, kk, p, hw) = (s.cg(), s.og(), s.taps(), s.oh * s.ow, s.h * s.w);
    let pad = s.pad();
    let (pl, taps) = (pad.plane_len(), s.tap_offsets());
    let rows = Rows {
        rows: s.oh,
        len: s.ow,
        ldo: pad.row_step(),
        lds: s.ow,
    };
    threads::for_each_piece(dx, cg * hw, |task, dxc| {
        let (n, g) = (task / s.groups, task % s.groups);
        let mut buf = take_f32(cg * pl)?;
        buf.fill(0.0);
        for oi in 0..og {
            let o = g * og + oi;
            let dyp = &dy[(n * s.o + o) * p..][..p];
            for ci in 0..cg {
                for (t, &off) in taps.iter().enumerate() {
                    let wv = w[(o * cg + ci) * kk + t];
                    kern.corr_f32(&mut buf[ci * pl + off..], dyp, rows, &[0], &[wv])?;
                }
            }
        }
        for (ci, d) in dxc.chunks_exact_mut(hw).enumerate() {
            pad.extract(&buf[ci * pl..(ci + 1) * pl], d, |v| v);
        }
        Ok(())
    })
}

/// `dw` of the FP32 convolution (each group's gradient owned by one task; f64 sums per plane).
fn dw_f32(kern: &DwKernel, s: &GroupedShape, x: &[f32], dy: &[f32], dw: &mut [f32]) -> Result<()> {
    let (cg, og, kk, p) = (s.cg(), s.og(), s.taps(), s.oh * s.ow);
    let pad = s.pad();
    let (pl, xin, taps) = (pad.plane_len(), cg * s.h * s.w, s.tap_offsets());
    let rows = Rows {
        rows: s.oh,
        len: s.ow,
        ldo: s.ow,
        lds: pad.row_step(),
    };
    threads::for_each_piece(dw, og * cg * kk, |g, dwc| {
        let mut acc = vec![0f64; dwc.len()];
        let mut lanes = vec![[0f32; 16]; kk];
        let mut buf = take_f32(cg * pl)?;
        for n in 0..s.n {
            pad.fill(&x[(n * s.c + g * cg) * s.h * s.w..][..xin], &mut buf);
            for oi in 0..og {
                let dyp = &dy[(n * s.o + g * og + oi) * p..][..p];
                for ci in 0..cg {
                    lanes.iter_mut().for_each(|l| *l = [0.0; 16]);
                    kern.dot_f32(dyp, &buf[ci * pl..(ci + 1) * pl], rows, &taps, &mut lanes)?;
                    let a = &mut acc[(oi * cg + ci) * kk..][..kk];
                    for (a, l) in a.iter_mut().zip(&lanes) {
                        *a += l.iter().map(|&v| v as f64).sum::<f64>();
                    }
                }
            }
        }
        for (d, a) in dwc.iter_mut().zip(acc) {
            *d = a as f32;
        }
        Ok(())
    })
}

// --- INT8 ------------------------------------------------------------------------------------------------

/// INT8 grouped convolution: `y = conv2d(sx·xq, sw·wq, groups) + bias` in FP32 (exact INT32 sums, one
/// rescale). `sw` is one scale or one per output channel.
#[allow(clippy::too_many_arguments)]
pub fn conv2d_grouped_i8_forward(
    xq: &[i8],
    x_shape: [usize; 4],
    sx: f32,
    wq: &[i8],
    w_shape: [usize; 4],
    sw: Scale,
    bias: Option<&[f32]>,
    p: GroupedParams,
    y: &mut [f32],
) -> Result<GroupedShape> {
    conv2d_grouped_i8_forward_with(
        active_depthwise_kernel()?,
        xq,
        x_shape,
        sx,
        wq,
        w_shape,
        sw,
        bias,
        p,
        y,
    )
}

/// [`conv2d_grouped_i8_forward`] on the kernel `kern`.
#[allow(clippy::too_many_arguments)]
pub fn conv2d_grouped_i8_forward_with(
    kern: &DwKernel,
    xq: &[i8],
    x_shape: [usize; 4],
    sx: f32,
    wq: &[i8],
    w_shape: [usize; 4],
    sw: Scale,
    bias: Option<&[f32]>,
    p: GroupedParams,
    y: &mut [f32],
) -> Result<GroupedShape> {
    let s = GroupedShape::new(x_shape, w_shape, p)?;
    check_len("xq", xq.len(), &x_shape)?;
    check_len("wq", wq.len(), &w_shape)?;
    check_scalar_scale("sx", sx)?;
    check_weight_scale(&sw, s.o)?;
    check_bias(bias, s.o)?;
    check_len("y", y.len(), &s.output())?;
    check_i32_taps(s.cg() * s.taps())?;
    let w32: Vec<i32> = wq.iter().map(|&v| v as i32).collect();
    forward_i8(kern, &s, xq, &w32, |o| sx * scale_at(&sw, o), bias, y)?;
    Ok(s)
}

/// The INT8 forward on checked arguments: output channel `o` is rescaled by `scale(o)`.
fn forward_i8(
    kern: &DwKernel,
    s: &GroupedShape,
    xq: &[i8],
    w32: &[i32],
    scale: impl Fn(usize) -> f32 + Sync + Send,
    bias: Option<&[f32]>,
    y: &mut [f32],
) -> Result<()> {
    let (cg, og, p) = (s.cg(), s.og(), s.oh * s.ow);
    if y.is_empty() {
        return Ok(());
    }
    let pad = s.pad();
    let (pl, xin) = (pad.plane_len(), cg * s.h * s.w);
    let offs = s.group_offsets();
    let kk = cg * s.taps();
    let rows = Rows {
        rows: s.oh,
        len: s.ow,
        ldo: s.ow,
        lds: pad.row_step(),
    };
    let buf = || take_i8(cg * pl);
    for_each_group(s, y, og * p, buf, |buf, n, g, yc| {
        pad.fill(&xq[(n * s.c + g * cg) * s.h * s.w..][..xin], buf);
        for (oi, yp) in yc.chunks_exact_mut(p).enumerate() {
            let o = g * og + oi;
            let w = &w32[o * kk..(o + 1) * kk];
            let b = bias.map_or(0.0, |b| b[o]);
            kern.corr_i8_scaled(yp, buf, rows, &offs, w, scale(o), b)?;
        }
        Ok(())
    })
}

/// Backward of [`conv2d_grouped_i8_forward`] with the INT8 output gradient `sdy·dyq`: `dw` and, if given,
/// `dx`, both overwritten (the bias gradient `Σ dY` is the caller's, from the FP32 gradient).
#[allow(clippy::too_many_arguments)]
pub fn conv2d_grouped_i8_backward(
    xq: &[i8],
    x_shape: [usize; 4],
    sx: f32,
    wq: &[i8],
    w_shape: [usize; 4],
    sw: Scale,
    dyq: &[i8],
    sdy: f32,
    p: GroupedParams,
    dx: Option<&mut [f32]>,
    dw: &mut [f32],
) -> Result<GroupedShape> {
    conv2d_grouped_i8_backward_with(
        active_depthwise_kernel()?,
        xq,
        x_shape,
        sx,
        wq,
        w_shape,
        sw,
        dyq,
        sdy,
        p,
        dx,
        dw,
    )
}

/// [`conv2d_grouped_i8_backward`] on the kernel `kern`.
#[allow(clippy::too_many_arguments)]
pub fn conv2d_grouped_i8_backward_with(
    kern: &DwKernel,
    xq: &[i8],
    x_shape: [usize; 4],
    sx: f32,
    wq: &[i8],
    w_shape: [usize; 4],
    sw: Scale,
    dyq: &[i8],
    sdy: f32,
    p: GroupedParams,
    dx: Option<&mut [f32]>,
    dw: &mut [f32],
) -> Result<GroupedShape> {
    let s = GroupedShape::new(x_shape, w_shape, p)?;
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
    check_i32_taps(s.og() * s.taps())?;
    if s.ow > MAX_ROW_I8 {
        return Err(Error::overflow(
            "dyq",
            format!(
                "output rows of {} values could overflow INT32 (at most {MAX_ROW_I8})",
                s.ow
            ),
        ));
    }
    if let Some(dx) = dx {
        dx_i8(kern, &s, wq, &sw, dyq, sdy, dx)?;
    }
    dw_i8(kern, &s, xq, dyq, (sdy as f64) * (sx as f64), dw)?;
    Ok(s)
}

/// `dx` of the INT8 convolution. The scale of a dX sum is `sdy·sw[o]`: one per input channel when each
/// group has one output channel or `sw` is a scalar; otherwise (per-channel scales, several outputs per
/// group) the exact integer weights run through the FP32 path on `sdy·sw[o]·dyq`.
fn dx_i8(
    kern: &DwKernel,
    s: &GroupedShape,
    wq: &[i8],
    sw: &Scale,
    dyq: &[i8],
    sdy: f32,
    dx: &mut [f32],
) -> Result<()> {
    if dx.is_empty() {
        return Ok(());
    }
    let (cg, og) = (s.cg(), s.og());
    let per_input = |c: usize| sdy * scale_at(sw, (c / cg) * og);
    if matches!(sw, Scale::PerIndex(_)) && og > 1 {
        let p = s.oh * s.ow;
        let dyf: Vec<f32> = dyq
            .iter()
            .enumerate()
            .map(|(i, &v)| v as f32 * sdy * scale_at(sw, (i / p) % s.o))
            .collect();
        let wf: Vec<f32> = wq.iter().map(|&v| v as f32).collect();
        return dx_f32(kern, s, &wf, &dyf, dx);
    }
    if let Some((t, hu, wu)) = s.transposed() {
        let wt: Vec<i32> = s.flip_weights(wq).iter().map(|&v| v as i32).collect();
        return forward_i8(kern, &t, &s.spread(dyq, hu, wu), &wt, per_input, None, dx);
    }
    let (kk, p, hw) = (s.taps(), s.oh * s.ow, s.h * s.w);
    let pad = s.pad();
    let (pl, taps) = (pad.plane_len(), s.tap_offsets());
    let rows = Rows {
        rows: s.oh,
        len: s.ow,
        ldo: pad.row_step(),
        lds: s.ow,
    };
    threads::for_each_piece(dx, cg * hw, |task, dxc| {
        let (n, g) = (task / s.groups, task % s.groups);
        with_i32(cg * pl, |buf| {
            for oi in 0..og {
                let o = g * og + oi;
                let dyp = &dyq[(n * s.o + o) * p..][..p];
                for ci in 0..cg {
                    for (t, &off) in taps.iter().enumerate() {
                        let wv = wq[(o * cg + ci) * kk + t] as i32;
                        kern.corr_i8(&mut buf[ci * pl + off..], dyp, rows, &[0], &[wv])?;
                    }
                }
            }
            for (ci, d) in dxc.chunks_exact_mut(hw).enumerate() {
                let sc = per_input(g * cg + ci);
                pad.extract(&buf[ci * pl..(ci + 1) * pl], d, |v| v as f32 * sc);
            }
            Ok(())
        })
    })
}

/// `dw = scale · Σ dYq·shifted Xq` of the INT8 convolution (exact sums, one task per group).
fn dw_i8(
    kern: &DwKernel,
    s: &GroupedShape,
    xq: &[i8],
    dyq: &[i8],
    scale: f64,
    dw: &mut [f32],
) -> Result<()> {
    let (cg, og, kk, p) = (s.cg(), s.og(), s.taps(), s.oh * s.ow);
    let pad = s.pad();
    let (pl, xin, taps) = (pad.plane_len(), cg * s.h * s.w, s.tap_offsets());
    let rows = Rows {
        rows: s.oh,
        len: s.ow,
        ldo: s.ow,
        lds: pad.row_step(),
    };
    threads::for_each_piece(dw, og * cg * kk, |g, dwc| {
        let mut acc = vec![0i64; dwc.len()];
        let mut buf = take_i8(cg * pl)?;
        for n in 0..s.n {
            pad.fill(&xq[(n * s.c + g * cg) * s.h * s.w..][..xin], &mut buf);
            for oi in 0..og {
                let dyp = &dyq[(n * s.o + g * og + oi) * p..][..p];
                for ci in 0..cg {
                    let a = &mut acc[(oi * cg + ci) * kk..][..kk];
                    kern.dot_i8(dyp, &buf[ci * pl..(ci + 1) * pl], rows, &taps, a)?;
                }
            }
        }
        for (d, a) in dwc.iter_mut().zip(acc) {
            *d = (a as f64 * scale) as f32;
        }
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copy_short_copies_every_length() {
        for n in 0..40 {
            let src: Vec<i16> = (0..n as i16).map(|v| v * 3 + 1).collect();
            let mut dst = vec![-1i16; n];
            copy_short(&src, &mut dst);
            assert_eq!(dst, src, "length {n}");
        }
    }

    #[test]
    fn pad_fill_matches_padded_reference() {
        for &(h, w, ph, pw, sw) in &[
            (3, 5, 1, 1, 1),
            (4, 17, 2, 1, 1),
            (5, 33, 1, 2, 1),
            (4, 7, 1, 1, 2),
        ] {
            let pad = Pad {
                h,
                w,
                ph,
                pw,
                sh: 1,
                sw,
            };
            let planes = 2;
            let src: Vec<i32> = (0..(planes * h * w) as i32).map(|v| v + 1).collect();
            let mut dst = vec![-7i32; planes * pad.plane_len()];
            pad.fill(&src, &mut dst);
            for p in 0..planes {
                for r in 0..pad.hp() {
                    for c in 0..w + 2 * pw {
                        let inside = r >= ph && r < ph + h && c >= pw && c < pw + w;
                        let want = if inside {
                            src[p * h * w + (r - ph) * w + c - pw]
                        } else {
                            0
                        };
                        let got = dst[p * pad.plane_len() + pad.offset(r, c)];
                        assert_eq!(got, want, "plane {p} row {r} col {c} of {h}x{w}");
                    }
                }
            }
        }
    }
}
