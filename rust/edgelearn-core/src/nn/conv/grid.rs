//! The padded grid of stride-1 INT8 convolutions ([`PaddedGrid`]): how images are laid on it (plain for
//! the GEMM, channels interleaved by 4 for the direct kernel) and how the grid's outputs go back to NCHW.

use super::direct;
use super::ConvShape;
use crate::error::Result;
use crate::gemm::{self, MatRef, RowsRef, Scale, MAX_K_I32};
use crate::nn::{take_f32, take_i8, Geometry, Scratch};
use crate::threads;

/// The padded grid computes `S/OW` times the outputs (see [`PaddedGrid`]); it is used while the extra
/// `S/OW − 1` stays within this fraction (numerator, denominator).
const GRID_MAX_EXTRA: (usize, usize) = (1, 7);

/// Bytes of implicit patch matrix per chunk of the padded grid: larger chunks mean fewer, wider GEMMs
/// (one thread, batch 32, 32→64 channels at 7x7: backward 384 µs with 128 KiB, 346 with 1 MiB).
const GRID_BUDGET: usize = 1024 * 1024;

/// Implicit im2col for stride-1 INT8 convolutions. A chunk of `nb` images is copied side by side into
/// one zero-padded plane per channel: `Hp = H + 2ph` rows of `Wp = nb·S + pw` bytes, image `i` at column
/// `pw + i·S` with `S = W + pw`, so neighbouring images share their `pw` zero columns. Outputs are
/// computed on a grid as wide as a padded row (output `(i, r, j)` at grid column `r·Wp + i·S + j`), and on
/// that grid row `(c, ki, kj)` of the patch matrix is the padded plane itself read from offset
/// `c·plane + ki·Wp + kj`: the GEMM packs its `B` operand straight from the plane ([`RowsRef`]), so no
/// patch matrix is written or read. The grid holds `S − OW` unused columns per image row (1/7 of the
/// outputs for a 3x3 kernel with padding 1 on 7x7 images, 1/14 on 14x14), so it is used only while that
/// stays within [`GRID_MAX_EXTRA`].
pub(super) struct PaddedGrid {
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
    pub(super) fn applies(s: &ConvShape) -> bool {
        let g = s.g;
        let usable = g.sh == 1 && g.sw == 1 && !g.is_pointwise() && s.o > 0 && g.oh > 0 && g.ow > 0;
        usable && (g.w + g.pw - g.ow) * GRID_MAX_EXTRA.1 <= GRID_MAX_EXTRA.0 * g.ow
    }

    /// The grid for `s`, if it [`applies`](Self::applies).
    pub(super) fn new(s: &ConvShape) -> Option<Self> {
        Self::applies(s).then(|| Self::of(s))
    }

    /// The grid for `s`, which a plan found it [`applies`](Self::applies) to.
    pub(super) fn of(s: &ConvShape) -> Self {
        PaddedGrid {
            g: s.g,
            o: s.o,
            s: s.g.w + s.g.pw,
        }
    }

    /// Images per chunk: the chunk's buffers near [`GRID_BUDGET`] (the implicit patch matrix, `K × ncols`
    /// bytes once packed, and the FP32 output of the GEMM, `O × ncols` floats; they are kept for reuse,
    /// so this also bounds the memory a training step holds), and every thread gets a chunk.
    pub(super) fn images_per_chunk(&self) -> usize {
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
    /// bytes the last patch row reads past them when each row reads `cols` bytes).
    fn pad(&self, x: &[i8], nb: usize, c: &GridChunk, cols: usize) -> Result<Scratch<i8>> {
        let g = &self.g;
        // The last patch row (ch = C−1, ki = kh−1, kj = kw−1) reads `cols` bytes from its offset.
        let len = (g.c - 1) * c.plane + (g.kh - 1) * c.wp + g.kw - 1 + cols;
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
        crate::alloc::offsets(planes, g.kh, g.kw, c.plane, c.wp)
    }

    /// Images per chunk of the `dW` product, whose reduction runs over the `ncols` grid columns: as
    /// [`images_per_chunk`](Self::images_per_chunk), with `ncols` within [`MAX_K_I32`] (`None` if one
    /// image is already past it).
    pub(super) fn dw_images_per_chunk(&self) -> Option<usize> {
        let g = &self.g;
        let fit = (MAX_K_I32 / g.oh).saturating_sub(g.pw) / self.s;
        (fit >= 1).then(|| self.images_per_chunk().min(fit))
    }

    /// `dWᵀ (K × O)` of a chunk as exact INT32 sums, `prod = col(x) · dYᵀ` over the grid: the patch rows
    /// of the padded planes are the `A` operand ([`gemm::gemm_i8_rows_a`]), and `dY (nb, O, OH, OW)` is
    /// laid on the grid with zeros in the unused columns, so those contribute nothing.
    ///
    /// With the direct kernel ([`direct::dw_direct`], spread over the pool when `parallel`) the planes are
    /// read in place; else the GEMM packs them.
    pub(super) fn dw_chunk(
        &self,
        x: &[i8],
        dy: &[i8],
        nb: usize,
        o: usize,
        prod: &mut [i32],
        parallel: bool,
    ) -> Result<()> {
        let c = self.chunk(nb);
        let g = &self.g;
        let offsets = self.tap_offsets(g.c, &c);
        let direct = direct::direct_available();
        // the direct kernel reads whole groups of 4 positions
        let ld = if direct {
            c.ncols.div_ceil(4) * 4
        } else {
            c.ncols
        };
        let mut dyg = take_i8(o * ld)?;
        let at = GridAt {
            plane: ld,
            wp: c.wp,
            top: 0,
            left: 0,
            s: self.s,
        };
        lay_on_grid(dy, nb, o, g.oh, g.ow, &at, &mut dyg);
        if direct {
            // the planes as `v ^ 0x80` (padding 0x80), with room for the last group of every patch row
            let mut xu = self.pad(x, nb, &c, ld)?;
            xu.iter_mut().for_each(|v| *v ^= i8::MIN);
            return direct::dw_direct(&xu, &offsets, c.ncols, &dyg, ld, o, prod, parallel);
        }
        let xp = self.pad(x, nb, &c, c.ncols)?;
        let a = RowsRef::new(&xp, &offsets, c.ncols)?;
        let b = MatRef::row_major(&dyg, o, c.ncols)?.t();
        gemm::gemm_i8_rows_a(&a, &b, prod)
    }

    /// `y (nb, O, OH, OW)` of the chunk of images `x (nb, C, H, W)`: through the direct kernel when
    /// `direct` weights are given, else the GEMM with the planes as a rows operand.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn forward_chunk(
        &self,
        x: &[i8],
        nb: usize,
        wm: &MatRef,
        direct: Option<&direct::DirectWeights>,
        sw: Scale,
        sx: f32,
        bias: Option<&[f32]>,
        y: &mut [f32],
        parallel: bool,
    ) -> Result<()> {
        let c = self.chunk(nb);
        let o = wm.rows();
        let g = &self.g;
        let to = direct::GridScatter {
            wp: c.wp,
            s: self.s,
            ow: g.ow,
            nb,
            p: g.p(),
            bias,
        };
        if let Some(dw) = direct {
            let (img, offsets) = self.grouped(x, nb, &c)?;
            let b = direct::GroupedImage::new(&img, &offsets, c.ncols)?;
            return direct::conv_direct_f32(dw, &b, sw, sx, y, &to, parallel);
        }
        let mut out = take_f32(o * c.ncols)?;
        let xp = self.pad(x, nb, &c, c.ncols)?;
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
/// ([`direct::GroupedImage`]): channels interleaved by 4, byte `j` of position
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
    to: &direct::GridScatter,
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
/// [`direct::GridScatter`]; its bias is not read here).
fn scatter_grid(src: &[f32], ncols: usize, o: usize, to: &direct::GridScatter, y: &mut [f32]) {
    scatter_grid_body::<false>(src, ncols, o, to, &[], y)
}
}

crate::simd::avx2_multiversion! {
/// [`scatter_grid`] plus `bias[o]`.
fn scatter_grid_bias(
    src: &[f32],
    ncols: usize,
    o: usize,
    to: &direct::GridScatter,
    bias: &[f32],
    y: &mut [f32],
) {
    scatter_grid_body::<true>(src, ncols, o, to, bias, y)
}
}
