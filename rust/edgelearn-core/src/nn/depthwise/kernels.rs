//! The four inner loops of grouped/depthwise convolution, per ISA, and their run-time choice.
//!
//! Every loop works on *rows*: `rows` rows of `len` values, rows `ld*` elements apart, and a list of
//! *taps* (element offsets into a zero-padded source plane, see `super::Planes`):
//!
//! - `corr_*`: `out[r·ldo + k] += Σ_t w[t] · src[r·lds + offs[t] + k]` (taps in order; FP32: one multiply
//!   then one add per tap, never fused, so every kernel gives the same bits; INT8: exact INT32);
//! - `dot_f32`: `lanes[t][k mod 16] += a[r·lda + k] · src[r·lds + offs[t] + k]`, rows in order, `k` in
//!   increasing order within a row: the canonical 16-lane order every kernel reproduces exactly (the
//!   caller flushes the lanes to f64);
//! - `dot_i8`: `sums[t] += Σ a[r·lda + k] · src[r·lds + offs[t] + k]` exactly (INT32 per row, i64 across).
//!
//! The kernels are `unsafe fn`s on raw pointers; [`CorrTile`] and [`DotRowF32`]/[`DotRowI8`] check every bound once and call
//! them. The choice follows the GEMM kernel ([`crate::gemm::active_kernel`], so `EDGELEARN_KERNEL` and
//! `set_kernel` force both): `scalar` → scalar, `avx2`/`avxvnni` → AVX2, `avx512vnni` → AVX-512,
//! `neon` → NEON, `dotprod`/`i8mm` → NEON with `sdot` for the INT8 weight gradient.

use crate::error::{Error, Result};

/// Largest `len` of one INT8 row (an INT32 lane holds at most that many products of ±128·±128).
pub const MAX_ROW_I8: usize = crate::gemm::MAX_K_I32;

pub type CorrF32 = unsafe fn(*mut f32, usize, *const f32, usize, usize, usize, &[usize], &[f32]);
pub type CorrI8 = unsafe fn(*mut i32, usize, *const i8, usize, usize, usize, &[usize], &[i32]);
pub type DotF32 =
    unsafe fn(*const f32, usize, *const f32, usize, usize, usize, &[usize], &mut [[f32; 16]]);
pub type DotI8 = unsafe fn(*const i8, usize, *const i8, usize, usize, usize, &[usize], &mut [i64]);
/// `corr_i8` into zero with the sums stored as `sum as f32 · scale + bias` (the last two arguments);
/// returns `false`, having written nothing, where the kernel has no such path for these taps.
pub type CorrI8Scaled =
    unsafe fn(*mut f32, usize, *const i8, usize, usize, usize, &[usize], &[i32], f32, f32) -> bool;

/// One ISA's set of inner loops.
pub struct DwKernel {
    pub name: &'static str,
    pub corr_f32: CorrF32,
    pub corr_i8: CorrI8,
    /// A fused-rescale `corr_i8` where the kernel has one (see [`DwKernel::corr_i8_scaled`]).
    pub corr_i8_scaled: Option<CorrI8Scaled>,
    pub dot_f32: DotF32,
    pub dot_i8: DotI8,
}

impl std::fmt::Debug for DwKernel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "DwKernel({})", self.name)
    }
}

// --- the shared tile loops ------------------------------------------------------------------------------

/// One ISA's inner `corr` kernel: `W` outputs of a row at a time ([`Self::block`]), fewer at the end of a
/// row ([`Self::tail`]); the taps and weights live in `self`. [`corr_rows`] runs it over a row block.
pub(super) trait CorrTile {
    type Out;
    type Src;
    /// Outputs per full block.
    const W: usize;
    /// `out[k] += Σ_t w[t]·src[offs[t] + k]` for `k < W`.
    unsafe fn block(&self, out: *mut Self::Out, src: *const Self::Src);
    /// The same for `k < n`, `0 < n < W`.
    unsafe fn tail(&self, out: *mut Self::Out, src: *const Self::Src, n: usize);
}

/// The `corr` row loop every kernel shares: `rows` rows of `len` outputs, `ldo`/`lds` apart. Inlined
/// into each ISA's `#[target_feature]` entry point and monomorphised on the tile, so it costs nothing
/// over a hand-written loop.
#[inline(always)]
pub(super) unsafe fn corr_rows<K: CorrTile>(
    tile: &K,
    out: *mut K::Out,
    ldo: usize,
    src: *const K::Src,
    lds: usize,
    rows: usize,
    len: usize,
) {
    for r in 0..rows {
        let (o, s) = (out.add(r * ldo), src.add(r * lds));
        let mut k = 0;
        while k + K::W <= len {
            tile.block(o.add(k), s.add(k));
            k += K::W;
        }
        if k < len {
            tile.tail(o.add(k), s.add(k), len - k);
        }
    }
}

/// One ISA's FP32 `dot` over one row, accumulating into `Acc` (the 16 canonical lanes in registers).
pub(super) trait DotRowF32 {
    type Acc;
    unsafe fn load(&self, lanes: &[f32; 16]) -> Self::Acc;
    /// `acc[k mod 16] += a[k]·s[k]` for `k < len`, in increasing `k`.
    unsafe fn row(&self, acc: &mut Self::Acc, a: *const f32, s: *const f32, len: usize);
    unsafe fn store(&self, acc: Self::Acc, lanes: &mut [f32; 16]);
}

/// The `dot_f32` loop every kernel shares: per tap, its lanes loaded once, every row added, stored once.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn dot_f32_rows<K: DotRowF32>(
    kern: &K,
    a: *const f32,
    lda: usize,
    src: *const f32,
    lds: usize,
    rows: usize,
    len: usize,
    offs: &[usize],
    lanes: &mut [[f32; 16]],
) {
    for (l, &off) in lanes.iter_mut().zip(offs) {
        let mut acc = kern.load(l);
        for r in 0..rows {
            kern.row(&mut acc, a.add(r * lda), src.add(r * lds + off), len);
        }
        kern.store(acc, l);
    }
}

/// One ISA's exact INT8 dot of one row (`len ≤ MAX_ROW_I8`, so INT32 inside the row is enough).
pub(super) trait DotRowI8 {
    unsafe fn row(&self, a: *const i8, s: *const i8, len: usize) -> i32;
}

/// The `dot_i8` loop every per-row kernel shares: `sums[t] += Σ_rows row(a, src + offs[t])`.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn dot_i8_rows<K: DotRowI8>(
    kern: &K,
    a: *const i8,
    lda: usize,
    src: *const i8,
    lds: usize,
    rows: usize,
    len: usize,
    offs: &[usize],
    sums: &mut [i64],
) {
    for (sum, &off) in sums.iter_mut().zip(offs) {
        for r in 0..rows {
            *sum += kern.row(a.add(r * lda), src.add(r * lds + off), len) as i64;
        }
    }
}

/// `DwKernel` entry points (the function-pointer signatures of [`CorrF32`], [`CorrI8`], [`DotF32`],
/// [`DotI8`]) that run one shared loop on one tile, compiled with the given attributes (an ISA's
/// `#[target_feature]`): `corr NAME<OUT, SRC, W>(WRAP)` runs [`corr_rows`] on `WRAP(Taps::new(offs, w))`;
/// `dot_f32 NAME(KERN)` and `dot_i8 NAME(KERN)` run [`dot_f32_rows`] / [`dot_i8_rows`] on `KERN`.
macro_rules! dw_entry {
    ($(#[$a:meta])* corr $name:ident<$out:ty, $src:ty, $w:ty>($wrap:expr)) => {
        $(#[$a])*
        #[allow(clippy::too_many_arguments)]
        unsafe fn $name(
            out: *mut $out,
            ldo: usize,
            src: *const $src,
            lds: usize,
            rows: usize,
            len: usize,
            offs: &[usize],
            w: &[$w],
        ) {
            let tile = ($wrap)($crate::nn::depthwise::kernels::Taps::new(offs, w));
            $crate::nn::depthwise::kernels::corr_rows(&tile, out, ldo, src, lds, rows, len)
        }
    };
    ($(#[$a:meta])* dot_f32 $name:ident($kern:expr)) => {
        $(#[$a])*
        #[allow(clippy::too_many_arguments)]
        unsafe fn $name(
            a: *const f32,
            lda: usize,
            src: *const f32,
            lds: usize,
            rows: usize,
            len: usize,
            offs: &[usize],
            lanes: &mut [[f32; 16]],
        ) {
            $crate::nn::depthwise::kernels::dot_f32_rows(
                &$kern, a, lda, src, lds, rows, len, offs, lanes,
            )
        }
    };
    ($(#[$a:meta])* dot_i8 $name:ident($kern:expr)) => {
        $(#[$a])*
        #[allow(clippy::too_many_arguments)]
        unsafe fn $name(
            a: *const i8,
            lda: usize,
            src: *const i8,
            lds: usize,
            rows: usize,
            len: usize,
            offs: &[usize],
            sums: &mut [i64],
        ) {
            $crate::nn::depthwise::kernels::dot_i8_rows(
                &$kern, a, lda, src, lds, rows, len, offs, sums,
            )
        }
    };
}
pub(super) use dw_entry;

// --- scalar reference ------------------------------------------------------------------------------------

/// The taps of a `corr` call (`offs` and `w` of one length); as a [`CorrTile`], the scalar reference one
/// output at a time (vector kernels use it for their tails).
#[derive(Clone, Copy)]
pub(super) struct Taps<'a, W> {
    pub offs: &'a [usize],
    pub w: &'a [W],
}

impl<'a, W> Taps<'a, W> {
    #[inline(always)]
    pub fn new(offs: &'a [usize], w: &'a [W]) -> Self {
        let nt = offs.len().min(w.len());
        Taps {
            offs: &offs[..nt],
            w: &w[..nt],
        }
    }
}

impl CorrTile for Taps<'_, f32> {
    type Out = f32;
    type Src = f32;
    const W: usize = 1;
    #[inline(always)]
    unsafe fn block(&self, out: *mut f32, src: *const f32) {
        let mut acc = *out;
        for (&off, &wt) in self.offs.iter().zip(self.w) {
            acc += wt * *src.add(off);
        }
        *out = acc;
    }
    #[inline(always)]
    unsafe fn tail(&self, out: *mut f32, src: *const f32, n: usize) {
        for k in 0..n {
            self.block(out.add(k), src.add(k));
        }
    }
}

impl CorrTile for Taps<'_, i32> {
    type Out = i32;
    type Src = i8;
    const W: usize = 1;
    #[inline(always)]
    unsafe fn block(&self, out: *mut i32, src: *const i8) {
        let mut acc = *out;
        for (&off, &wt) in self.offs.iter().zip(self.w) {
            acc = acc.wrapping_add(wt * *src.add(off) as i32);
        }
        *out = acc;
    }
    #[inline(always)]
    unsafe fn tail(&self, out: *mut i32, src: *const i8, n: usize) {
        for k in 0..n {
            self.block(out.add(k), src.add(k));
        }
    }
}

/// The canonical 16-lane dot of one tap over one row, from `k0` on (vector kernels call it for their tails).
#[inline(always)]
pub(super) unsafe fn dot_f32_row_tail(
    a: *const f32,
    s: *const f32,
    k0: usize,
    len: usize,
    lanes: &mut [f32; 16],
) {
    for k in k0..len {
        lanes[k % 16] += *a.add(k) * *s.add(k);
    }
}

/// The scalar reference dots.
pub(super) struct ScalarDot;

impl DotRowF32 for ScalarDot {
    type Acc = [f32; 16];
    #[inline(always)]
    unsafe fn load(&self, lanes: &[f32; 16]) -> [f32; 16] {
        *lanes
    }
    #[inline(always)]
    unsafe fn row(&self, acc: &mut [f32; 16], a: *const f32, s: *const f32, len: usize) {
        dot_f32_row_tail(a, s, 0, len, acc)
    }
    #[inline(always)]
    unsafe fn store(&self, acc: [f32; 16], lanes: &mut [f32; 16]) {
        *lanes = acc;
    }
}

impl DotRowI8 for ScalarDot {
    #[inline(always)]
    unsafe fn row(&self, a: *const i8, s: *const i8, len: usize) -> i32 {
        dot_i8_row_tail(a, s, 0, len)
    }
}

/// `Σ a[k]·s[k]` for `k0 ≤ k < len` in INT32 (vector kernels call it for their tails).
#[inline(always)]
pub(super) unsafe fn dot_i8_row_tail(a: *const i8, s: *const i8, k0: usize, len: usize) -> i32 {
    let mut acc = 0i32;
    for k in k0..len {
        acc += *a.add(k) as i32 * *s.add(k) as i32;
    }
    acc
}

dw_entry!(corr corr_f32_scalar<f32, f32, f32>(std::convert::identity));
dw_entry!(corr corr_i8_scalar<i32, i8, i32>(std::convert::identity));
dw_entry!(dot_f32 dot_f32_scalar(ScalarDot));
dw_entry!(dot_i8 dot_i8_scalar(ScalarDot));

pub static SCALAR: DwKernel = DwKernel {
    name: "scalar",
    corr_f32: corr_f32_scalar,
    corr_i8: corr_i8_scalar,
    corr_i8_scaled: None,
    dot_f32: dot_f32_scalar,
    dot_i8: dot_i8_scalar,
};

// --- choice ----------------------------------------------------------------------------------------------

/// The kernels this CPU runs, best first (`scalar` last).
pub fn depthwise_kernels() -> Vec<&'static DwKernel> {
    #[allow(unused_mut)]
    let mut v: Vec<&'static DwKernel> = Vec::new();
    #[cfg(target_arch = "x86_64")]
    {
        if super::x86::avx512_detected() {
            v.push(&super::x86::AVX512);
        }
        if super::x86::avx2_detected() {
            v.push(&super::x86::AVX2);
        }
    }
    #[cfg(target_arch = "aarch64")]
    {
        if std::arch::is_aarch64_feature_detected!("dotprod") {
            v.push(&super::aarch64::DOTPROD);
        }
        v.push(&super::aarch64::NEON);
    }
    v.push(&SCALAR);
    v
}

/// The depthwise kernel paired with the GEMM kernel called `gemm_name`.
pub fn depthwise_kernel_for(gemm_name: &str) -> &'static DwKernel {
    let want = match gemm_name {
        "avx512vnni" => "avx512",
        "avx2" | "avxvnni" => "avx2",
        "dotprod" | "i8mm" => "dotprod",
        "neon" => "neon",
        _ => "scalar",
    };
    depthwise_kernels()
        .into_iter()
        .find(|k| k.name == want)
        .unwrap_or(&SCALAR)
}

/// The kernel of the active GEMM choice (see the module docs).
pub fn active_depthwise_kernel() -> Result<&'static DwKernel> {
    Ok(depthwise_kernel_for(crate::gemm::active_kernel()?.name()))
}

// --- checked calls ---------------------------------------------------------------------------------------

/// Index one past the last element `rows` rows of `len` at `ld` apart from `base` reach (`None` = overflow).
fn reach(base: usize, rows: usize, ld: usize, len: usize) -> Option<usize> {
    if rows == 0 || len == 0 {
        return Some(0);
    }
    (rows - 1)
        .checked_mul(ld)?
        .checked_add(base)?
        .checked_add(len)
}

fn bounds(arg: &'static str, need: Option<usize>, have: usize) -> Result<()> {
    match need {
        Some(n) if n <= have => Ok(()),
        _ => Err(Error::invalid(
            arg,
            format!("row block reaches past the {have} elements of the buffer"),
        )),
    }
}

/// A block of `rows × len` outputs and the source rows it reads (see the module docs).
#[derive(Clone, Copy, Debug)]
pub struct Rows {
    pub rows: usize,
    pub len: usize,
    /// Output (or `a`) row stride.
    pub ldo: usize,
    /// Source row stride.
    pub lds: usize,
}

impl Rows {
    fn check_src<T>(&self, src: &[T], offs: &[usize]) -> Result<()> {
        if offs.is_empty() {
            return Ok(());
        }
        let max_off = offs.iter().copied().max().unwrap_or(0);
        bounds(
            "src",
            reach(max_off, self.rows, self.lds, self.len),
            src.len(),
        )
    }
    fn check_out<T>(&self, out: &[T]) -> Result<()> {
        bounds("out", reach(0, self.rows, self.ldo, self.len), out.len())
    }
}

fn check_taps(offs: usize, w: usize) -> Result<()> {
    if offs != w {
        return Err(Error::invalid(
            "w",
            format!("{w} weights for {offs} tap offsets"),
        ));
    }
    Ok(())
}

/// The checks of an INT8 `corr` call; `false` when there is nothing to compute.
fn check_corr_i8<T>(out: &[T], src: &[i8], b: Rows, offs: &[usize], w: &[i32]) -> Result<bool> {
    check_taps(offs.len(), w.len())?;
    b.check_out(out)?;
    b.check_src(src, offs)?;
    if let Some(i) = w.iter().position(|v| !(-128..=127).contains(v)) {
        return Err(Error::invalid(
            "w",
            format!("weight {i} is not an int8 value"),
        ));
    }
    Ok(b.rows > 0 && b.len > 0)
}

impl DwKernel {
    /// `out[r·ldo + k] += Σ_t w[t]·src[r·lds + offs[t] + k]` in FP32.
    pub fn corr_f32(
        &self,
        out: &mut [f32],
        src: &[f32],
        b: Rows,
        offs: &[usize],
        w: &[f32],
    ) -> Result<()> {
        check_taps(offs.len(), w.len())?;
        b.check_out(out)?;
        b.check_src(src, offs)?;
        if b.rows == 0 || b.len == 0 {
            return Ok(());
        }
        // SAFETY: bounds checked above; the kernel's CPU features were detected when it was handed out.
        unsafe {
            (self.corr_f32)(
                out.as_mut_ptr(),
                b.ldo,
                src.as_ptr(),
                b.lds,
                b.rows,
                b.len,
                offs,
                w,
            )
        };
        Ok(())
    }

    /// INT8 `corr`: exact INT32 sums (the caller bounds the number of taps, see [`MAX_ROW_I8`]).
    pub fn corr_i8(
        &self,
        out: &mut [i32],
        src: &[i8],
        b: Rows,
        offs: &[usize],
        w: &[i32],
    ) -> Result<()> {
        if !check_corr_i8(out, src, b, offs, w)? {
            return Ok(());
        }
        // SAFETY: as in corr_f32.
        unsafe {
            (self.corr_i8)(
                out.as_mut_ptr(),
                b.ldo,
                src.as_ptr(),
                b.lds,
                b.rows,
                b.len,
                offs,
                w,
            )
        };
        Ok(())
    }

    /// `out[r·ldo + k] = (Σ_t w[t]·src[r·lds + offs[t] + k]) as f32 · scale + bias`: the exact INT32 sums
    /// (wrapping, as [`Self::corr_i8`] from zero) rescaled with one multiply and one add. Through the
    /// kernel's fused path where it has one, else `corr_i8` into `out`'s own memory as INT32 and a
    /// rescale in place: the same bits either way.
    #[allow(clippy::too_many_arguments)]
    pub fn corr_i8_scaled(
        &self,
        out: &mut [f32],
        src: &[i8],
        b: Rows,
        offs: &[usize],
        w: &[i32],
        scale: f32,
        bias: f32,
    ) -> Result<()> {
        if !check_corr_i8(out, src, b, offs, w)? {
            return Ok(());
        }
        if let Some(f) = self.corr_i8_scaled {
            // SAFETY: as in corr_f32.
            let done = unsafe {
                f(
                    out.as_mut_ptr(),
                    b.ldo,
                    src.as_ptr(),
                    b.lds,
                    b.rows,
                    b.len,
                    offs,
                    w,
                    scale,
                    bias,
                )
            };
            if done {
                return Ok(());
            }
        }
        // SAFETY: f32 and i32 have the same size and alignment; the view is dropped before `out` is used.
        let acc: &mut [i32] =
            unsafe { std::slice::from_raw_parts_mut(out.as_mut_ptr() as *mut i32, out.len()) };
        for r in 0..b.rows {
            acc[r * b.ldo..][..b.len].fill(0);
        }
        self.corr_i8(acc, src, b, offs, w)?;
        for r in 0..b.rows {
            for v in out[r * b.ldo..][..b.len].iter_mut() {
                *v = (v.to_bits() as i32) as f32 * scale + bias;
            }
        }
        Ok(())
    }

    /// `lanes[t][k mod 16] += a[r·ldo + k]·src[r·lds + offs[t] + k]` (canonical order, see the module docs).
    pub fn dot_f32(
        &self,
        a: &[f32],
        src: &[f32],
        b: Rows,
        offs: &[usize],
        lanes: &mut [[f32; 16]],
    ) -> Result<()> {
        check_taps(offs.len(), lanes.len())?;
        bounds("a", reach(0, b.rows, b.ldo, b.len), a.len())?;
        b.check_src(src, offs)?;
        if b.rows == 0 || b.len == 0 {
            return Ok(());
        }
        // SAFETY: as in corr_f32.
        unsafe {
            (self.dot_f32)(
                a.as_ptr(),
                b.ldo,
                src.as_ptr(),
                b.lds,
                b.rows,
                b.len,
                offs,
                lanes,
            )
        };
        Ok(())
    }

    /// `sums[t] += Σ a[r·ldo + k]·src[r·lds + offs[t] + k]`, exact; `len ≤ MAX_ROW_I8`.
    pub fn dot_i8(
        &self,
        a: &[i8],
        src: &[i8],
        b: Rows,
        offs: &[usize],
        sums: &mut [i64],
    ) -> Result<()> {
        check_taps(offs.len(), sums.len())?;
        if b.len > MAX_ROW_I8 {
            return Err(Error::overflow(
                "len",
                format!(
                    "rows of {} values could overflow INT32 (at most {MAX_ROW_I8})",
                    b.len
                ),
            ));
        }
        bounds("a", reach(0, b.rows, b.ldo, b.len), a.len())?;
        b.check_src(src, offs)?;
        if b.rows == 0 || b.len == 0 {
            return Ok(());
        }
        // SAFETY: as in corr_f32.
        unsafe {
            (self.dot_i8)(
                a.as_ptr(),
                b.ldo,
                src.as_ptr(),
                b.lds,
                b.rows,
                b.len,
                offs,
                sums,
            )
        };
        Ok(())
    }
}
