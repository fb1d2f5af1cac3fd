//! Per-channel sums of FP32 gradients (bias gradients): [`channel_sums`], and the row sum of the FP32
//! convolution's `db`.

use crate::error::{Error, Result};
use crate::nn::{check_len, worth_parallel};
use crate::threads;

/// Sum of a row, accumulated in f64 over 8 f32 lanes (fast and accurate enough for bias gradients).
pub(super) fn sum_row(v: &[f32]) -> f64 {
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

crate::simd::avx2_multiversion! {
/// The plane sums ([`sum_lanes`]) of one image `im` (`C` planes of `plane` values) into `sums`, and the
/// image's min, max and whether it holds a non-finite value, in one scan of the whole image after the
/// sums, while it is in cache: a scan per plane paid its 16-lane reduction once per plane (1024 times for
/// a batch of 32 at 32 channels of 16x16; that layer's Octo backward took 1297 µs with it, 1168-1233
/// without, one thread).
fn image_sums_and_range(im: &[f32], plane: usize, sums: &mut [f64]) -> (f32, f32, bool) {
    for (s, p) in sums.iter_mut().zip(im.chunks_exact(plane)) {
        *s = sum_lanes(p);
    }
    crate::quant::run_min_max(&im[..sums.len() * plane])
}
}

/// [`channel_sums`] plus the min and max of `x` and whether it holds a non-finite value, in one read of
/// `x` spread over the pool image by image: the Octo backward needs both of `dY` (the bias gradient and
/// the range of its codes). Only where [`channel_sums`] sums plane by plane (planes of at least
/// `CHANNEL_SUM_PLANE_MIN` values), with the same bits: plane sums added in plane order, whatever the
/// thread count. `Ok(None)` (nothing written) for smaller planes, whose sums run faster image by image
/// in [`channel_sums`].
pub fn channel_sums_and_range(
    x: &[f32],
    shape: &[usize],
    out: &mut [f32],
) -> Result<Option<(f32, f32, bool)>> {
    if shape.len() < 3 {
        return Ok(None);
    }
    check_len("x", x.len(), shape)?;
    let c = shape[1];
    let plane: usize = shape[2..].iter().product();
    let img = c * plane;
    if out.len() != c || x.is_empty() || img == 0 {
        return Ok(None); // channel_sums reports the mismatch or writes the zeros
    }
    if plane < CHANNEL_SUM_PLANE_MIN && img <= CHANNEL_SUM_ROWS_MAX {
        return Ok(None);
    }
    let mut sums = vec![0f64; x.len() / plane];
    let ranges: Vec<(f32, f32, bool)> = if worth_parallel(x.len()) {
        let n = x.len() / img;
        let mut ranges = vec![(0f32, 0f32, false); n];
        let (ps, pr) = (
            threads::Pieces::new(&mut sums, c),
            threads::Pieces::new(&mut ranges, 1),
        );
        threads::run_parts(n, |i| {
            // SAFETY: for_each_part passes each image index once: its pieces are borrowed once.
            let (s, r) = unsafe { (ps.piece(i), pr.piece(i)) };
            r[0] = image_sums_and_range(&x[i * img..(i + 1) * img], plane, s);
        });
        ranges
    } else {
        x.chunks_exact(img)
            .zip(sums.chunks_exact_mut(c))
            .map(|(im, s)| image_sums_and_range(im, plane, s))
            .collect()
    };
    let mut acc = vec![0f64; c];
    for (i, &s) in sums.iter().enumerate() {
        acc[i % c] += s;
    }
    for (o, a) in out.iter_mut().zip(acc) {
        *o = a as f32;
    }
    let (mut lo, mut hi, mut bad) = (f32::INFINITY, f32::NEG_INFINITY, false);
    for &(a, b, nf) in &ranges {
        lo = lo.min(a);
        hi = hi.max(b);
        bad |= nf;
    }
    Ok(Some((lo, hi, bad)))
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
