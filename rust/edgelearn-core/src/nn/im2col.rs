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
                for oy in ylo..yhi {
                    let d = &mut dst[oy * ow..(oy + 1) * ow];
                    d[..xlo].fill(zero);
                    d[xhi..].fill(zero);
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

/// Adds the `K × P` matrix `col` (row stride `ld`) back onto the image `dx` (`C·H·W`): the adjoint of
/// [`im2col`], so overlapping windows accumulate and padding positions are dropped.
///
/// # Panics
/// If `dx` or `col` is too short for `g`.
pub fn col2im_add(col: &[f32], ld: usize, g: &Geometry, dx: &mut [f32]) {
    let (hw, ow, p) = (g.hw(), g.ow, g.p());
    assert!(dx.len() >= g.c * hw && ld >= p && (g.k() == 0 || col.len() >= (g.k() - 1) * ld + p));
    let mut row = 0;
    for c in 0..g.c {
        let plane = &mut dx[c * hw..(c + 1) * hw];
        for i in 0..g.kh {
            let (ylo, yhi) = g.valid_rows(i);
            for j in 0..g.kw {
                let (xlo, xhi) = g.valid_cols(j);
                let src = &col[row * ld..row * ld + p];
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
                row += 1;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nn::Window2d;

    fn reference(x: &[f32], g: &Geometry) -> Vec<f32> {
        let mut col = vec![0.0; g.k() * g.p()];
        for c in 0..g.c {
            for i in 0..g.kh {
                for j in 0..g.kw {
                    let r = (c * g.kh + i) * g.kw + j;
                    for oy in 0..g.oh {
                        for ox in 0..g.ow {
                            let iy = (oy * g.sh + i) as isize - g.ph as isize;
                            let ix = (ox * g.sw + j) as isize - g.pw as isize;
                            if iy >= 0 && ix >= 0 && (iy as usize) < g.h && (ix as usize) < g.w {
                                col[r * g.p() + oy * g.ow + ox] =
                                    x[(c * g.h + iy as usize) * g.w + ix as usize];
                            }
                        }
                    }
                }
            }
        }
        col
    }

    #[test]
    fn im2col_matches_direct_indexing_and_col2im_is_its_adjoint() {
        let cases = [
            ([1, 2, 5, 7], (3, 3), (1, 1), (1, 1)),
            ([1, 3, 6, 5], (3, 2), (2, 1), (0, 1)),
            ([1, 1, 7, 7], (1, 1), (2, 2), (0, 0)),
            ([1, 2, 4, 4], (5, 5), (1, 3), (2, 2)),
            ([1, 2, 9, 8], (3, 3), (3, 2), (3, 3)),
        ];
        for (shape, k, s, p) in cases {
            let g = Geometry::new("x", shape, Window2d::new(k, s, p)).unwrap();
            let x: Vec<f32> = (0..g.c * g.hw()).map(|v| v as f32 * 0.5 - 3.0).collect();
            let ld = g.p() + 3;
            let mut col = vec![f32::NAN; g.k() * ld];
            im2col(&x, &g, &mut col, ld);
            let want = reference(&x, &g);
            for r in 0..g.k() {
                assert_eq!(
                    &col[r * ld..r * ld + g.p()],
                    &want[r * g.p()..(r + 1) * g.p()],
                    "{shape:?} {k:?}"
                );
            }
            // <im2col(x), c> == <x, col2im(c)> for any c.
            let cvals: Vec<f32> = (0..g.k() * ld)
                .map(|v| ((v * 7) % 11) as f32 - 5.0)
                .collect();
            let mut back = vec![0.0; x.len()];
            col2im_add(&cvals, ld, &g, &mut back);
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
        }
    }
}
