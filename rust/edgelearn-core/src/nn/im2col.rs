//! Patch matrices (im2col) and their adjoint (col2im) for one image.
//!
//! The patch matrix of an image `(C, H, W)` has `K = C·kh·kw` rows ordered `(c, i, j)` — the order of a
//! weight tensor `(O, C, kh, kw)` read as `O × K` — and `P = OH·OW` columns ordered `(oy, ox)`, so
//! `W · col` is the image's `(O, OH, OW)` output directly. Rows are written `ld` elements apart, which lets
//! several images sit side by side in one `K × (nb·P)` matrix. Generic over the element type: INT8
//! activations are unfolded as INT8 (4x less traffic than FP32).

use super::Geometry;

/// Writes the `K × P` patch matrix of `x` (one image, `C·H·W` elements) into `col` (row stride `ld`,
/// `ld ≥ P`); padding reads as `T::default()` (zero).
///
/// # Panics
/// If `x` or `col` is too short for `g` (callers check shapes first).
pub fn im2col<T: Copy + Default>(x: &[T], g: &Geometry, col: &mut [T], ld: usize) {
    let (hw, ow, p) = (g.hw(), g.ow, g.p());
    assert!(x.len() >= g.c * hw && ld >= p && (g.k() == 0 || col.len() >= (g.k() - 1) * ld + p));
    let zero = T::default();
    if g.sh == 1 && g.sw == 1 && g.ow == g.w {
        im2col_same_width(x, g, col, ld);
        return;
    }
    if phase_path(g) {
        im2col_phases(x, g, col, ld);
        return;
    }
    let mut row = 0;
    for c in 0..g.c {
        let plane = &x[c * hw..(c + 1) * hw];
        for i in 0..g.kh {
            let (ylo, yhi) = g.valid_rows(i);
            for j in 0..g.kw {
                let (xlo, xhi) = g.valid_cols(j);
                let dst = &mut col[row * ld..row * ld + p];
                dst[..ylo * ow].fill(zero);
                dst[yhi * ow..].fill(zero);
                if let Some((from, len)) = same_width_span(g, i, j, ylo, yhi, xlo, xhi) {
                    // Output rows are as wide as input rows: the valid part of this patch row is one
                    // contiguous run of the plane (one copy instead of one per output row); the columns
                    // outside xlo..xhi picked up neighbouring rows' pixels and are zeroed after.
                    let at = ylo * ow + xlo;
                    dst[at..at + len].copy_from_slice(&plane[from..from + len]);
                    for oy in ylo..yhi {
                        let d = &mut dst[oy * ow..(oy + 1) * ow];
                        fill_few(&mut d[..xlo], zero);
                        fill_few(&mut d[xhi..], zero);
                    }
                    row += 1;
                    continue;
                }
                for oy in ylo..yhi {
                    let d = &mut dst[oy * ow..(oy + 1) * ow];
                    fill_few(&mut d[..xlo], zero);
                    fill_few(&mut d[xhi..], zero);
                    if xlo == xhi {
                        continue;
                    }
                    let iy = oy * g.sh + i - g.ph;
                    let ix0 = xlo * g.sw + j - g.pw;
                    let src = &plane[iy * g.w + ix0..];
                    if g.sw == 1 {
                        d[xlo..xhi].copy_from_slice(&src[..xhi - xlo]);
                    } else {
                        for (t, v) in d[xlo..xhi].iter_mut().enumerate() {
                            *v = src[t * g.sw];
                        }
                    }
                }
                row += 1;
            }
        }
    }
}

/// [`im2col`] of a stride-1 window whose output rows are as wide as the input rows (a 3x3 "same"
/// convolution, say): every patch row is one contiguous run of its plane (see [`same_width_span`]) with
/// the wrapped-around border columns zeroed. The valid ranges of each window offset are computed once
/// per call rather than per channel (they cost integer divisions), and the per-output-row work is only
/// the border stores, skipped for the offsets that have none.
fn im2col_same_width<T: Copy + Default>(x: &[T], g: &Geometry, col: &mut [T], ld: usize) {
    let (hw, ow, p) = (g.hw(), g.ow, g.p());
    let zero = T::default();
    // sized up front: a growing Vec reallocates, and glibc's realloc takes the arena lock that the
    // other threads of a parallel op contend for (see [`crate::alloc::offsets`])
    let mut taps = Vec::with_capacity(g.kh * g.kw);
    for i in 0..g.kh {
        taps.extend((0..g.kw).map(|j| (g.valid_rows(i), g.valid_cols(j))));
    }
    let mut row = 0;
    for plane in x[..g.c * hw].chunks_exact(hw.max(1)).take(g.c) {
        for (t, &((ylo, yhi), (xlo, xhi))) in taps.iter().enumerate() {
            let (i, j) = (t / g.kw, t % g.kw);
            let dst = &mut col[row * ld..row * ld + p];
            row += 1;
            let Some((from, len)) = same_width_span(g, i, j, ylo, yhi, xlo, xhi) else {
                dst.fill(zero);
                continue;
            };
            write_run(
                dst,
                &plane[from..from + len],
                (ylo, yhi),
                (xlo, xhi),
                ow,
                zero,
            );
        }
    }
}

/// Writes the patch row `dst` (`P` values, `ow` a row) of a window offset whose valid outputs
/// `ylo..yhi × xlo..xhi` read the contiguous input run `run` (from output `(ylo, xlo)` on): zeros
/// elsewhere, including the run's wrapped-around border columns.
#[inline(always)]
fn write_run<T: Copy>(
    dst: &mut [T],
    run: &[T],
    (ylo, yhi): (usize, usize),
    (xlo, xhi): (usize, usize),
    ow: usize,
    zero: T,
) {
    fill_few(&mut dst[..ylo * ow], zero);
    fill_few(&mut dst[yhi * ow..], zero);
    let at = ylo * ow + xlo;
    dst[at..at + run.len()].copy_from_slice(run);
    if xlo > 0 || xhi < ow {
        for d in dst[ylo * ow..yhi * ow].chunks_exact_mut(ow) {
            fill_few(&mut d[..xlo], zero);
            fill_few(&mut d[xhi..], zero);
        }
    }
}

/// The adjoint of [`write_run`]: adds the run of patch row `src` (from output `(ylo, xlo)` on) into
/// `dst` (as long as the run), its wrapped-around border entries zeroed first so that they add nothing.
#[inline(always)]
fn add_run(
    dst: &mut [f32],
    src: &mut [f32],
    (ylo, yhi): (usize, usize),
    (xlo, xhi): (usize, usize),
    ow: usize,
) {
    if xlo > 0 || xhi < ow {
        for r in src[ylo * ow..yhi * ow].chunks_exact_mut(ow) {
            fill_few(&mut r[..xlo], 0.0);
            fill_few(&mut r[xhi..], 0.0);
        }
    }
    let (at, len) = (ylo * ow + xlo, dst.len());
    for (dv, &sv) in dst.iter_mut().zip(&src[at..at + len]) {
        *dv += sv;
    }
}

/// [`im2col`] of a strided window (stride `(sh, sw)`, not both 1) whose output rows are as wide as a
/// column phase of the input (`ow == ceil(W / sw)`: a 3x3 window with padding 1 or a 1x1 window without
/// padding at stride 2, say). Each plane is first split into its `sh·sw` phase planes — phase `(ry, rx)`
/// holds the pixels `(Y·sh + ry, X·sw + rx)` at `(Y, X)`, `ceil(H/sh) × ow` — in which window offset
/// `(i, j)` is a stride-1 window: with `i − ph = qy·sh + ry` (Euclidean division) output pixel `(oy, ox)`
/// reads phase `(ry, rx)` at `(oy + qy, ox + qx)`. So every patch row is one contiguous run of a phase
/// plane, the wrapped-around border columns zeroed after, as in [`im2col_same_width`]; the strided
/// gather (one element at a time) becomes one pass that splits the plane and copies of whole runs.
fn im2col_phases<T: Copy + Default>(x: &[T], g: &Geometry, col: &mut [T], ld: usize) {
    let (hw, p) = (g.hw(), g.p());
    let phase_len = g.h.div_ceil(g.sh) * g.ow;
    let zero = T::default();
    let (taps, used) = phase_taps(g);
    let mut phases = vec![zero; g.sh * g.sw * phase_len];
    let mut row = 0;
    for plane in x[..g.c * hw].chunks_exact(hw).take(g.c) {
        split_phases(plane, g, &used, &mut phases);
        for &((ylo, yhi), (xlo, xhi), tap) in &taps {
            let dst = &mut col[row * ld..row * ld + p];
            row += 1;
            let Some((ph, from, len)) = tap else {
                dst.fill(zero);
                continue;
            };
            let run = &phases[ph * phase_len + from..ph * phase_len + from + len];
            write_run(dst, run, (ylo, yhi), (xlo, xhi), g.ow, zero);
        }
    }
}

/// The valid output rows and columns of each window offset `(i, j)` (row-major) of a strided window, with
/// (phase index, start of its run in the phase plane, run length) where it reads any pixel
/// ([`im2col_phases`]), and which phases some offset reads (a 1x1 window at stride 2 reads one of four).
type PhaseTap = (
    (usize, usize),
    (usize, usize),
    Option<(usize, usize, usize)>,
);

fn phase_taps(g: &Geometry) -> (Vec<PhaseTap>, Vec<bool>) {
    let (ow, sh, sw) = (g.ow, g.sh, g.sw);
    let mut taps = Vec::with_capacity(g.kh * g.kw);
    let mut used = vec![false; sh * sw];
    for i in 0..g.kh {
        let (ylo, yhi) = g.valid_rows(i);
        let (qy, ry) = phase_of(i, g.ph, sh);
        for j in 0..g.kw {
            let (xlo, xhi) = g.valid_cols(j);
            let (qx, rx) = phase_of(j, g.pw, sw);
            let tap = (ylo < yhi && xlo < xhi).then(|| {
                // valid outputs read phase rows ylo+qy.. and columns xlo+qx.., both >= 0
                let from = (ylo as isize + qy) as usize * ow + (xlo as isize + qx) as usize;
                used[ry * sw + rx] = true;
                (ry * sw + rx, from, (yhi - 1 - ylo) * ow + xhi - xlo)
            });
            taps.push(((ylo, yhi), (xlo, xhi), tap));
        }
    }
    (taps, used)
}

/// Window offset `k` with padding `pad` at stride `s` as `(q, r)`, `k − pad = q·s + r` with `0 ≤ r < s`:
/// output `o` reads input `(o + q)·s + r`, entry `o + q` of phase `r`.
fn phase_of(k: usize, pad: usize, s: usize) -> (isize, usize) {
    let a = k as isize - pad as isize;
    (a.div_euclid(s as isize), a.rem_euclid(s as isize) as usize)
}

/// Whether [`im2col`] and [`col2im`] take the phase planes for `g` (see [`im2col_phases`]).
fn phase_path(g: &Geometry) -> bool {
    (g.sh > 1 || g.sw > 1) && g.ow > 0 && g.ow == g.w.div_ceil(g.sw)
}

/// Splits `plane` (`H × W`) into the phase planes of [`im2col_phases`] (`hp × ow` each, `ow =
/// ceil(W/sw)`, phase `ry·sw + rx`) that `used` marks. Entries past the plane's last row or column in a
/// phase are not written: no valid output reads them (they lie outside every window offset's valid range).
fn split_phases<T: Copy>(plane: &[T], g: &Geometry, used: &[bool], phases: &mut [T]) {
    let (w, ow, sh, sw) = (g.w, g.ow, g.sh, g.sw);
    let phase_len = g.h.div_ceil(sh) * ow;
    for (y, src) in plane.chunks_exact(w).enumerate() {
        let (ry, yy) = (y % sh, y / sh);
        let want = &used[ry * sw..(ry + 1) * sw];
        if !want.contains(&true) {
            continue;
        }
        let base = ry * sw * phase_len + yy * ow;
        if sw == 2 {
            // the usual stride: one de-interleaving loop over pairs (vectorised), then the odd last column
            let (a, b) = phases[base..].split_at_mut(phase_len);
            let (even, odd) = (&mut a[..ow], &mut b[..ow]);
            if want[0] && want[1] {
                for ((e, o), pair) in even.iter_mut().zip(odd.iter_mut()).zip(src.chunks_exact(2)) {
                    *e = pair[0];
                    *o = pair[1];
                }
            } else {
                let (dst, r) = if want[0] { (even, 0) } else { (odd, 1) };
                for (d, pair) in dst.iter_mut().zip(src.chunks_exact(2)) {
                    *d = pair[r];
                }
            }
            if w % 2 == 1 && want[0] {
                a[w / 2] = src[w - 1];
            }
            continue;
        }
        for (xx, &v) in src.iter().enumerate() {
            phases[base + (xx % sw) * phase_len + xx / sw] = v;
        }
    }
}

/// `d.fill(v)` for the usual border widths (0 to 2 elements, from padding) without a `memset` call, which
/// costs more than the store itself at that size and runs once per patch row and output row.
#[inline(always)]
fn fill_few<T: Copy>(d: &mut [T], v: T) {
    match d.len() {
        0 => {}
        1 => d[0] = v,
        2 => {
            d[0] = v;
            d[1] = v;
        }
        _ => d.fill(v),
    }
}

/// For a stride-1 window whose output rows are as wide as the input rows (`ow == w`, e.g. a 3x3 kernel
/// with padding 1): the valid outputs `ylo..yhi × xlo..xhi` of window offset `(i, j)` read one contiguous
/// run of the plane. Returns that run as `(start in the plane, length)`; its position in the patch row
/// is `ylo·ow + xlo`. `None` if the shape is not of that kind or the run is empty.
#[inline]
fn same_width_span(
    g: &Geometry,
    i: usize,
    j: usize,
    ylo: usize,
    yhi: usize,
    xlo: usize,
    xhi: usize,
) -> Option<(usize, usize)> {
    if g.sh != 1 || g.sw != 1 || g.ow != g.w || ylo >= yhi || xlo >= xhi {
        return None;
    }
    let iy0 = ylo + i - g.ph;
    let ix0 = xlo + j - g.pw;
    Some((iy0 * g.w + ix0, (yhi - 1 - ylo) * g.ow + xhi - xlo))
}

crate::simd::avx2_multiversion! {
/// Writes the adjoint of [`im2col`] of the `K × P` matrix `col` (row stride `ld`) into the image `dx`
/// (`C·H·W`, overwritten): overlapping windows accumulate and padding positions are dropped.
///
/// `col` is scratch: entries that fall on padding may be zeroed on the way (the stride-1 path adds whole
/// contiguous runs, with the wrapped-around border entries set to zero first).
///
/// # Panics
/// If `dx` or `col` is too short for `g`.
pub fn col2im(col: &mut [f32], ld: usize, g: &Geometry, dx: &mut [f32]) {
    let (hw, ow, p) = (g.hw(), g.ow, g.p());
    assert!(dx.len() >= g.c * hw && ld >= p && (g.k() == 0 || col.len() >= (g.k() - 1) * ld + p));
    if phase_path(g) {
        col2im_phases(col, ld, g, dx);
        return;
    }
    let taps = g.kh * g.kw;
    // A stride-1 window whose output is as large as the input has a tap (the centre of a "same"
    // convolution) that maps the patch row onto the plane one to one: it initialises the plane, saving
    // a zero-fill pass.
    let full_tap =
        (g.sh == 1 && g.sw == 1 && g.oh == g.h && g.ow == g.w && g.ph < g.kh && g.pw < g.kw)
            .then_some(g.ph * g.kw + g.pw);
    for c in 0..g.c {
        let plane = &mut dx[c * hw..(c + 1) * hw];
        match full_tap {
            Some(t) => plane.copy_from_slice(&col[(c * taps + t) * ld..(c * taps + t) * ld + p]),
            None => plane.fill(0.0),
        }
        for i in 0..g.kh {
            let (ylo, yhi) = g.valid_rows(i);
            for j in 0..g.kw {
                if full_tap == Some(i * g.kw + j) {
                    continue;
                }
                let (xlo, xhi) = g.valid_cols(j);
                let row = c * taps + i * g.kw + j;
                let src = &mut col[row * ld..row * ld + p];
                if let Some((to, len)) = same_width_span(g, i, j, ylo, yhi, xlo, xhi) {
                    // As in im2col: one contiguous run
                    add_run(&mut plane[to..to + len], src, (ylo, yhi), (xlo, xhi), ow);
                    continue;
                }
                if xlo < xhi {
                    for oy in ylo..yhi {
                        let s = &src[oy * ow + xlo..oy * ow + xhi];
                        let iy = oy * g.sh + i - g.ph;
                        let ix0 = xlo * g.sw + j - g.pw;
                        let d = &mut plane[iy * g.w + ix0..];
                        if g.sw == 1 {
                            for (dv, &sv) in d[..s.len()].iter_mut().zip(s) {
                                *dv += sv;
                            }
                        } else {
                            for (t, &sv) in s.iter().enumerate() {
                                d[t * g.sw] += sv;
                            }
                        }
                    }
                }
            }
        }
    }
}
}

/// [`col2im`] of a strided window that [`im2col_phases`] unfolds: each patch row adds as one contiguous run
/// into its phase plane (its wrapped-around border entries zeroed first), then the phase planes merge
/// into the image plane. Every pixel belongs to one phase entry and receives the window offsets' terms in
/// the same order as in the direct path.
#[inline(always)]
fn col2im_phases(col: &mut [f32], ld: usize, g: &Geometry, dx: &mut [f32]) {
    let (hw, ow, p) = (g.hw(), g.ow, g.p());
    let phase_len = g.h.div_ceil(g.sh) * ow;
    let (taps, _) = phase_taps(g);
    let mut phases = vec![0f32; g.sh * g.sw * phase_len];
    for (c, plane) in dx[..g.c * hw].chunks_exact_mut(hw).take(g.c).enumerate() {
        phases.fill(0.0);
        for (t, &((ylo, yhi), (xlo, xhi), tap)) in taps.iter().enumerate() {
            let Some((ph, to, len)) = tap else { continue };
            let row = c * taps.len() + t;
            let src = &mut col[row * ld..row * ld + p];
            let run = &mut phases[ph * phase_len + to..ph * phase_len + to + len];
            add_run(run, src, (ylo, yhi), (xlo, xhi), ow);
        }
        merge_phases(&phases, g, plane);
    }
}

/// The inverse of [`split_phases`] over every phase: `plane` (`H × W`, overwritten) from the phase planes.
#[inline(always)]
fn merge_phases(phases: &[f32], g: &Geometry, plane: &mut [f32]) {
    let (w, ow, sh, sw) = (g.w, g.ow, g.sh, g.sw);
    let phase_len = g.h.div_ceil(sh) * ow;
    for (y, dst) in plane.chunks_exact_mut(w).enumerate() {
        let base = (y % sh) * sw * phase_len + (y / sh) * ow;
        if sw == 2 {
            let (even, odd) = (
                &phases[base..base + ow],
                &phases[base + phase_len..base + phase_len + ow],
            );
            for ((&e, &o), pair) in even.iter().zip(odd).zip(dst.chunks_exact_mut(2)) {
                pair[0] = e;
                pair[1] = o;
            }
            if w % 2 == 1 {
                dst[w - 1] = even[w / 2];
            }
            continue;
        }
        for (xx, v) in dst.iter_mut().enumerate() {
            *v = phases[base + (xx % sw) * phase_len + xx / sw];
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nn::Window2d;

    /// Calls `f(patch-matrix index, pixel index)` for every valid (offset, output pixel) pair, offsets in order.
    fn for_each_tap(g: &Geometry, mut f: impl FnMut(usize, usize)) {
        for c in 0..g.c {
            for i in 0..g.kh {
                for j in 0..g.kw {
                    let r = (c * g.kh + i) * g.kw + j;
                    for oy in 0..g.oh {
                        for ox in 0..g.ow {
                            let iy = (oy * g.sh + i) as isize - g.ph as isize;
                            let ix = (ox * g.sw + j) as isize - g.pw as isize;
                            if iy >= 0 && ix >= 0 && (iy as usize) < g.h && (ix as usize) < g.w {
                                f(
                                    r * g.p() + oy * g.ow + ox,
                                    (c * g.h + iy as usize) * g.w + ix as usize,
                                );
                            }
                        }
                    }
                }
            }
        }
    }

    fn reference(x: &[f32], g: &Geometry) -> Vec<f32> {
        let mut col = vec![0.0; g.k() * g.p()];
        for_each_tap(g, |q, px| col[q] = x[px]);
        col
    }

    /// col2im by direct indexing: each window offset's terms added in offset order, as every path adds them.
    fn reference_col2im(col: &[f32], ld: usize, g: &Geometry) -> Vec<f32> {
        let mut dx = vec![0.0; g.c * g.hw()];
        let p = g.p();
        for_each_tap(g, |q, px| dx[px] += col[q / p * ld + q % p]);
        dx
    }

    #[test]
    fn im2col_matches_direct_indexing_and_col2im_is_its_adjoint() {
        let cases = [
            ([1, 2, 5, 7], (3, 3), (1, 1), (1, 1)),
            ([1, 3, 6, 5], (3, 2), (2, 1), (0, 1)),
            ([1, 1, 7, 7], (1, 1), (2, 2), (0, 0)),
            ([1, 2, 4, 4], (5, 5), (1, 3), (2, 2)),
            ([1, 2, 9, 8], (3, 3), (3, 2), (3, 3)),
            ([1, 2, 4, 4], (5, 5), (1, 1), (2, 2)),
            ([1, 1, 1, 1], (3, 3), (1, 1), (1, 1)),
            ([1, 3, 6, 1], (3, 1), (1, 1), (1, 0)),
            ([1, 2, 6, 5], (3, 3), (1, 1), (1, 1)),
            ([1, 1, 3, 9], (1, 3), (1, 1), (0, 1)),
            // strided windows as wide as a column phase (the phase-plane path), even and odd sizes
            ([1, 2, 8, 8], (3, 3), (2, 2), (1, 1)),
            ([1, 3, 7, 7], (3, 3), (2, 2), (1, 1)),
            ([1, 2, 7, 9], (1, 1), (2, 2), (0, 0)),
            ([1, 2, 9, 10], (5, 5), (3, 3), (2, 2)),
            ([1, 1, 6, 5], (3, 1), (2, 1), (1, 0)),
            ([1, 1, 2, 2], (3, 3), (2, 2), (1, 1)),
            ([1, 2, 5, 6], (3, 3), (2, 2), (0, 0)),
            ([1, 2, 11, 6], (3, 3), (2, 3), (1, 1)),
        ];
        for (shape, k, s, p) in cases {
            let g = Geometry::new("x", shape, Window2d::new(k, s, p)).unwrap();
            let x: Vec<f32> = (0..g.c * g.hw()).map(|v| v as f32 * 0.5 - 3.0).collect();
            let ld = g.p() + 3;
            let mut col = vec![f32::NAN; g.k() * ld];
            im2col(&x, &g, &mut col, ld);
            let want = reference(&x, &g);
            // INT8 activations take the same paths (generic over the element)
            let xq: Vec<i8> = (0..g.c * g.hw()).map(|v| (v % 97) as i8 - 48).collect();
            let mut colq = vec![i8::MIN; g.k() * ld];
            im2col(&xq, &g, &mut colq, ld);
            let wantq = reference(&xq.iter().map(|&v| v as f32).collect::<Vec<_>>(), &g);
            for r in 0..g.k() {
                assert_eq!(
                    &col[r * ld..r * ld + g.p()],
                    &want[r * g.p()..(r + 1) * g.p()],
                    "{shape:?} {k:?}"
                );
                let got: Vec<f32> = colq[r * ld..r * ld + g.p()]
                    .iter()
                    .map(|&v| v as f32)
                    .collect();
                assert_eq!(
                    got,
                    &wantq[r * g.p()..(r + 1) * g.p()],
                    "int8 {shape:?} {k:?} {s:?}"
                );
            }
            // <im2col(x), c> == <x, col2im(c)> for any c.
            let cvals: Vec<f32> = (0..g.k() * ld)
                .map(|v| ((v * 7) % 11) as f32 - 5.0)
                .collect();
            // col2im overwrites dx (NaN here) and may zero padding entries of its scratch input.
            let mut back = vec![f32::NAN; x.len()];
            col2im(&mut cvals.clone(), ld, &g, &mut back);
            let lhs: f64 = (0..g.k())
                .flat_map(|r| (0..g.p()).map(move |q| (r, q)))
                .map(|(r, q)| col[r * ld + q] as f64 * cvals[r * ld + q] as f64)
                .sum();
            let rhs: f64 = x
                .iter()
                .zip(&back)
                .map(|(&a, &b)| a as f64 * b as f64)
                .sum();
            assert!(
                (lhs - rhs).abs() < 1e-6 * lhs.abs().max(1.0),
                "{lhs} vs {rhs}"
            );
            // strided windows: the same sums, term by term in offset order (non-integer terms: a change of
            // order would show in the rounding; a stride-1 "same" window starts from its centre offset)
            if g.sh == 1 && g.sw == 1 {
                continue;
            }
            let fvals: Vec<f32> = cvals
                .iter()
                .enumerate()
                .map(|(v, &c)| c * 0.37 + v as f32 * 1e-3)
                .collect();
            let mut got = vec![f32::NAN; x.len()];
            col2im(&mut fvals.clone(), ld, &g, &mut got);
            assert_eq!(
                got,
                reference_col2im(&fvals, ld, &g),
                "col2im {shape:?} {k:?} {s:?}"
            );
        }
    }
}
