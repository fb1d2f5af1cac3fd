//! INT8 convolution on small planes as one dense GEMM per product.
//!
//! On a plane of a few pixels (the 4x4 and 2x2 maps of an 8x8 input after pooling) a convolution is a linear
//! map from the `C·H·W` input values of an image to its `O·OH·OW` outputs whose matrix `E` is small: row
//! `(o, q)`, column `(c, r)` holds the weight tap `w[o, c, i, j]` that output pixel `q` applies to input pixel
//! `r`, or 0. With the images as rows, NCHW activations are that GEMM's operands as they lie in memory:
//!
//! - forward `Y (N × O·P) = Xq · Eᵀ`, rescaled by `sx·sw` with the bias per output channel;
//! - backward `dX (N × C·HW) = dYq · E`, rescaled by `sdy·sw`; `dE = dYqᵀ · Xq` in exact INT32, whose entries
//!   are added (exactly, in i64) into the taps they came from: `dW`, rescaled once by `sdy·sx`.
//!
//! No patch matrix, no col2im, no per-image loop: on tiny planes those cost more than the arithmetic. The
//! integer sums are the convolution's own (the zeros of `E` add nothing), and the rescale is the INT8 GEMM's
//! epilogue, so outputs are those of the im2col and padded-grid paths bit for bit (test). It applies while `E`
//! costs at most twice the MACs of the convolution (padded taps included) and stays small; a
//! [`ConvPlan`](super::ConvPlan) made for per-tensor weight scales chooses it ([`ConvAlgo::SmallPlane`](super::ConvAlgo::SmallPlane)).

use super::ConvShape;
use crate::error::Result;
use crate::gemm::{self, MatRef, Scale, MAX_K_I32};
use crate::nn::{take_i8, Geometry};

/// Largest `E` (bytes) this path builds.
const MAX_EXPANDED: usize = 1 << 20;

/// Whether the small-plane path applies to `s` (see the module docs).
pub fn applies(s: &ConvShape) -> bool {
    let g = &s.g;
    let (pin, pout) = (g.h * g.w, g.oh * g.ow);
    let dense = s.o * pout * g.c * pin;
    let conv = s.o * pout * g.c * g.kh * g.kw;
    pout > 0
        && pout <= 16
        && dense <= 2 * conv
        && dense <= MAX_EXPANDED
        && g.n <= MAX_K_I32
        && g.kh * g.kw < NONE as usize
}

/// In a tap map, the input pixels an output pixel does not read.
const NONE: u8 = 0x80;

/// The tap map of `g`: entry `q·pin + r` is the tap index `i·kw + j` output pixel `q` applies to input
/// pixel `r`, or [`NONE`] (padding, or outside the window), then 16 entries [`NONE`]. `applies` keeps
/// `kh·kw` below [`NONE`].
fn tap_map(g: &Geometry) -> Vec<u8> {
    let pin = g.h * g.w;
    // 16 entries of slack: the SIMD lookups read whole 16-entry pieces
    let mut map = vec![NONE; g.oh * g.ow * pin + 16];
    for oy in 0..g.oh {
        for ox in 0..g.ow {
            let q = oy * g.ow + ox;
            for i in 0..g.kh {
                let iy = (oy * g.sh + i) as isize - g.ph as isize;
                if iy < 0 || iy as usize >= g.h {
                    continue;
                }
                for j in 0..g.kw {
                    let ix = (ox * g.sw + j) as isize - g.pw as isize;
                    if ix < 0 || ix as usize >= g.w {
                        continue;
                    }
                    map[q * pin + iy as usize * g.w + ix as usize] = (i * g.kw + j) as u8;
                }
            }
        }
    }
    map
}

/// `E` (`O·P × C·HW`, row-major) of the codes `wq (O, C, kh, kw)`: segment `(o, q, c)` (the `HW` columns
/// of channel `c` in row `o·P + q`) is the tap map's row `q` looked up in the `kh·kw` codes of `w[o, c]`.
/// Every byte is written, zeros included. The scratch holds [`SLACK`] bytes past `E` (see
/// [`fill_segments`]): `E` is its first `O·P·C·HW`.
fn expand(s: &ConvShape, wq: &[i8]) -> Result<crate::nn::Scratch<i8>> {
    let g = &s.g;
    let map = tap_map(g);
    let mut e = take_i8(s.o * g.oh * g.ow * g.c * g.h * g.w + SLACK)?;
    fill_segments(
        &mut e,
        wq,
        &map,
        [s.o, g.c, g.h * g.w, g.oh * g.ow, g.kh * g.kw],
    );
    Ok(e)
}

/// Bytes past `E` that [`fill_segments`] may overwrite: its 16-byte stores are never split.
const SLACK: usize = 16;

/// [`expand`]'s lookups into `e` (`E` then [`SLACK`] bytes): one table lookup of 16 entries per
/// instruction (x86-64 `pshufb` with AVX2 on; aarch64 `tbl`) when the kernel has at most 16 taps, else (or
/// with the SIMD loops off) one entry at a time. The same bytes of `E` either way (test
/// `expansion_equals_the_tap_by_tap_reference`).
fn fill_segments(e: &mut [i8], wq: &[i8], map: &[u8], dims: [usize; 5]) {
    let [o, c, pin, pout, kk] = dims;
    assert!(
        e.len() == o * pout * c * pin + SLACK
            && wq.len() == o * c * kk
            && map.len() == pout * pin + 16
    );
    #[cfg(target_arch = "x86_64")]
    if kk <= 16 && crate::simd::elementwise_avx2() {
        // SAFETY: the CPU has AVX2 (so SSSE3); lengths checked above.
        unsafe { fill_segments_x86(e, wq, map, dims) };
        return;
    }
    #[cfg(target_arch = "aarch64")]
    if kk <= 16 {
        // SAFETY: NEON is the aarch64 baseline; lengths checked above.
        unsafe { fill_segments_neon(e, wq, map, dims) };
        return;
    }
    fill_segments_scalar(e, wq, map, dims);
}

fn fill_segments_scalar(e: &mut [i8], wq: &[i8], map: &[u8], [o, c, pin, pout, kk]: [usize; 5]) {
    let cols = c * pin;
    for oc in 0..o {
        for ch in 0..c {
            let w = &wq[(oc * c + ch) * kk..][..kk];
            for q in 0..pout {
                let seg = &mut e[(oc * pout + q) * cols + ch * pin..][..pin];
                for (d, &t) in seg.iter_mut().zip(&map[q * pin..][..pin]) {
                    *d = w.get(t as usize).copied().unwrap_or(0);
                }
            }
        }
    }
}

/// Runs `look(table, 16 map entries, out)` over every 16-entry piece of every segment, in memory order.
/// A segment's partial last piece is stored whole (the map carries 16 [`NONE`] entries of slack, `e`
/// [`SLACK`] bytes): the bytes past the segment belong to the segments after it, which are written next.
/// A table is one 16-byte load of `w[o, c]`'s codes and what follows them (entries past `kh·kw` are never
/// looked up: the map holds taps below `kh·kw` or [`NONE`]); the last few come from a padded copy.
///
/// # Safety
/// The slices have the lengths [`fill_segments`] checks (`map` with its 16 entries of slack, `e` with
/// [`SLACK`] bytes), `kk <= 16`, `load_table` reads 16 bytes and `look` reads 16 entries and writes 16
/// bytes at the pointers they are given.
#[inline(always)]
unsafe fn fill_segments_by16<V: Copy>(
    e: &mut [i8],
    wq: &[i8],
    map: &[u8],
    [o, c, pin, pout, kk]: [usize; 5],
    load_table: impl Fn(*const i8) -> V,
    look: impl Fn(V, *const u8, *mut i8),
) {
    let mut tail = [0i8; 32];
    let at_end = wq.len().saturating_sub(16);
    tail[..wq.len() - at_end].copy_from_slice(&wq[at_end..]);
    let table = |k: usize| {
        if k + 16 <= wq.len() {
            load_table(wq.as_ptr().add(k))
        } else {
            load_table(tail.as_ptr().add(k - at_end))
        }
    };
    let mut tables = Vec::with_capacity(c);
    let ep = e.as_mut_ptr();
    for oc in 0..o {
        tables.clear();
        tables.extend((0..c).map(|ch| table((oc * c + ch) * kk)));
        for q in 0..pout {
            let row = map.as_ptr().add(q * pin);
            let mut out = ep.add((oc * pout + q) * c * pin);
            for &t in &tables {
                let mut r = 0;
                while r < pin {
                    look(t, row.add(r), out.add(r));
                    r += 16;
                }
                out = out.add(pin);
            }
        }
    }
}

/// # Safety
/// The CPU has AVX2; as [`fill_segments_by16`].
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn fill_segments_x86(e: &mut [i8], wq: &[i8], map: &[u8], dims: [usize; 5]) {
    use std::arch::x86_64::*;
    fill_segments_by16(
        e,
        wq,
        map,
        dims,
        |t| _mm_loadu_si128(t as *const __m128i),
        // pshufb: an index with its top bit set (NONE) gives 0
        |t, ix, out| {
            let v = _mm_shuffle_epi8(t, _mm_loadu_si128(ix as *const __m128i));
            _mm_storeu_si128(out as *mut __m128i, v)
        },
    )
}

/// # Safety
/// As [`fill_segments_by16`].
#[cfg(target_arch = "aarch64")]
unsafe fn fill_segments_neon(e: &mut [i8], wq: &[i8], map: &[u8], dims: [usize; 5]) {
    use std::arch::aarch64::*;
    fill_segments_by16(
        e,
        wq,
        map,
        dims,
        |t| vld1q_s8(t),
        // tbl: an index of 16 or more (NONE) gives 0
        |t, ix, out| vst1q_s8(out, vqtbl1q_s8(t, vld1q_u8(ix))),
    )
}

/// `dW` codes' exact sums from `dE` (`O·P × C·HW`, see [`backward`]): each entry of `dE` added into the
/// tap it came from, `acc (O, C, kh·kw)`.
fn fold_taps(de: &[i32], map: &[u8], [o, c, pin, pout, kk]: [usize; 5], acc: &mut [i64]) {
    let cols = c * pin;
    // per output pixel: (input pixel, tap) of the taps it reads
    let pairs: Vec<Vec<(usize, usize)>> = (0..pout)
        .map(|q| {
            (0..pin)
                .filter(|&r| map[q * pin + r] != NONE)
                .map(|r| (r, map[q * pin + r] as usize))
                .collect()
        })
        .collect();
    for oc in 0..o {
        for (q, pq) in pairs.iter().enumerate() {
            let row = &de[(oc * pout + q) * cols..][..cols];
            for ch in 0..c {
                let seg = &row[ch * pin..][..pin];
                let a = &mut acc[(oc * c + ch) * kk..][..kk];
                for &(r, t) in pq {
                    a[t] += seg[r] as i64;
                }
            }
        }
    }
}

/// `y = conv2d(sx·xq, sw·wq) + bias` (shapes checked by the caller, `s` from [`ConvShape::new`]).
pub fn forward(
    s: &ConvShape,
    xq: &[i8],
    sx: f32,
    wq: &[i8],
    sw: f32,
    bias: Option<&[f32]>,
    y: &mut [f32],
) -> Result<()> {
    let g = &s.g;
    let (cols, rows) = (g.c * g.h * g.w, s.o * g.oh * g.ow);
    let e = expand(s, wq)?;
    let pout = g.oh * g.ow;
    let bias_rows: Option<Vec<f32>> = bias.map(|b| (0..rows).map(|r| b[r / pout]).collect());
    gemm::gemm_i8_f32(
        &MatRef::row_major(xq, g.n, cols)?,
        &MatRef::row_major(&e[..rows * cols], rows, cols)?.t(),
        Scale::Scalar(sx),
        Scale::Scalar(sw),
        bias_rows.as_deref(),
        y,
    )
}

/// Backward from the output gradient `sdy·dyq`: `dx` and `dw`, each when asked for.
#[allow(clippy::too_many_arguments)]
pub fn backward(
    s: &ConvShape,
    xq: &[i8],
    sx: f32,
    wq: &[i8],
    sw: f32,
    dyq: &[i8],
    sdy: f32,
    dx: Option<&mut [f32]>,
    dw: Option<&mut [f32]>,
) -> Result<()> {
    let g = &s.g;
    let (cols, rows) = (g.c * g.h * g.w, s.o * g.oh * g.ow);
    let dym = MatRef::row_major(dyq, g.n, rows)?;
    if let Some(dx) = dx {
        let e = expand(s, wq)?;
        gemm::gemm_i8_f32(
            &dym,
            &MatRef::row_major(&e[..rows * cols], rows, cols)?,
            Scale::Scalar(sdy),
            Scale::Scalar(sw),
            None,
            dx,
        )?;
    }
    let Some(dw) = dw else {
        return Ok(());
    };
    // dE: exact (N ≤ MAX_K_I32 products of at most 127·127 per entry)
    let mut de = vec![0i32; rows * cols];
    gemm::gemm_i8(&dym.t(), &MatRef::row_major(xq, g.n, cols)?, &mut de)?;
    let mut acc = vec![0i64; dw.len()];
    let dims = [s.o, g.c, g.h * g.w, g.oh * g.ow, g.kh * g.kw];
    fold_taps(&de, &tap_map(g), dims, &mut acc);
    let scale = sdy as f64 * sx as f64;
    for (d, &a) in dw.iter_mut().zip(&acc) {
        *d = (a as f64 * scale) as f32;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nn::conv::{conv2d_i8_backward, conv2d_i8_forward};

    fn codes(len: usize, seed: usize) -> Vec<i8> {
        (0..len)
            .map(|i| (((i * 7919 + seed * 104_729) % 255) as i32 - 127) as i8)
            .collect()
    }

    /// Forward, dX and dW equal the general INT8 convolution's bit for bit (extreme codes included).
    #[test]
    fn matches_the_general_convolution() {
        // (x shape, w shape, stride, padding)
        let cases = [
            ([5, 32, 2, 2], [64, 32, 3, 3], (1, 1), (1, 1)),
            ([3, 16, 4, 4], [32, 16, 3, 3], (1, 1), (1, 1)),
            ([4, 3, 4, 3], [5, 3, 3, 2], (2, 1), (1, 0)),
            ([2, 4, 3, 3], [6, 4, 3, 3], (1, 1), (0, 0)),
            ([3, 8, 3, 3], [4, 8, 3, 3], (2, 2), (1, 1)),
        ];
        for (ci, &(xs, ws, stride, padding)) in cases.iter().enumerate() {
            let s = ConvShape::new(xs, ws, stride, padding).unwrap();
            assert!(applies(&s), "case {ci}");
            let mut xq = codes(xs.iter().product(), ci);
            let wq = codes(ws.iter().product(), ci + 7);
            xq[0] = -127;
            let out = s.output();
            let ylen: usize = out.iter().product();
            let dyq = codes(ylen, ci + 3);
            let bias: Vec<f32> = (0..ws[0]).map(|i| i as f32 * 0.25 - 1.0).collect();
            let (sx, sw, sdy) = (0.013f32, 0.0071f32, 0.0023f32);
            let mut y0 = vec![0f32; ylen];
            let mut y1 = vec![0f32; ylen];
            conv2d_i8_forward(
                &xq,
                xs,
                sx,
                &wq,
                ws,
                Scale::Scalar(sw),
                Some(&bias),
                stride,
                padding,
                &mut y0,
            )
            .unwrap();
            forward(&s, &xq, sx, &wq, sw, Some(&bias), &mut y1).unwrap();
            assert_eq!(y0, y1, "forward, case {ci}");
            let xlen: usize = xs.iter().product();
            let wlen: usize = ws.iter().product();
            let (mut dx0, mut dw0) = (vec![0f32; xlen], vec![0f32; wlen]);
            let (mut dx1, mut dw1) = (vec![0f32; xlen], vec![0f32; wlen]);
            conv2d_i8_backward(
                &xq,
                xs,
                sx,
                &wq,
                ws,
                Scale::Scalar(sw),
                &dyq,
                sdy,
                stride,
                padding,
                Some(&mut dx0),
                &mut dw0,
            )
            .unwrap();
            backward(
                &s,
                &xq,
                sx,
                &wq,
                sw,
                &dyq,
                sdy,
                Some(&mut dx1),
                Some(&mut dw1),
            )
            .unwrap();
            // dX: exact INT32 sums, one rescale (the general path adds rescaled FP32 terms in col2im
            // where it cannot take the transposed convolution): the exact reference bit for bit, the
            // general path to float rounding
            assert_eq!(dx1, reference_dx(&s, &wq, &dyq, sdy * sw), "dx, case {ci}");
            for (a, b) in dx0.iter().zip(&dx1) {
                assert!(
                    (a - b).abs() <= 1e-5 * (1.0 + a.abs()),
                    "dx, case {ci}: {a} vs {b}"
                );
            }
            assert_eq!(dw0, dw1, "dw, case {ci}");
        }
    }

    /// `dX` from direct integer sums over `(o, i, j)`, then `acc · scale`.
    fn reference_dx(s: &ConvShape, wq: &[i8], dyq: &[i8], scale: f32) -> Vec<f32> {
        let g = &s.g;
        let mut acc = vec![0i64; g.n * g.c * g.h * g.w];
        for n in 0..g.n {
            for o in 0..s.o {
                for oy in 0..g.oh {
                    for ox in 0..g.ow {
                        let d = dyq[((n * s.o + o) * g.oh + oy) * g.ow + ox] as i64;
                        for c in 0..g.c {
                            for i in 0..g.kh {
                                for j in 0..g.kw {
                                    let iy = (oy * g.sh + i) as isize - g.ph as isize;
                                    let ix = (ox * g.sw + j) as isize - g.pw as isize;
                                    if iy < 0 || ix < 0 || iy as usize >= g.h || ix as usize >= g.w
                                    {
                                        continue;
                                    }
                                    let w = wq[((o * g.c + c) * g.kh + i) * g.kw + j] as i64;
                                    acc[((n * g.c + c) * g.h + iy as usize) * g.w + ix as usize] +=
                                        d * w;
                                }
                            }
                        }
                    }
                }
            }
        }
        acc.iter().map(|&a| a as f32 * scale).collect()
    }

    /// `E` and the folding of `dE` into taps, with the SIMD lookups and without, equal a tap-by-tap
    /// reference: 16-entry pieces whole and partial (planes of 4, 16, 20 and 25 pixels), padding, stride
    /// 2, and a 5x5 kernel (25 taps: past one 16-entry table).
    #[test]
    fn expansion_equals_the_tap_by_tap_reference() {
        let cases = [
            ([2, 16, 4, 4], [8, 16, 3, 3], (1, 1), (1, 1)),
            ([2, 5, 2, 2], [3, 5, 3, 3], (1, 1), (1, 1)),
            ([1, 3, 4, 5], [4, 3, 3, 2], (2, 1), (1, 0)),
            ([1, 2, 5, 5], [3, 2, 5, 5], (2, 2), (2, 2)),
            // fewer codes than one 16-byte table load; a 4x4 kernel (16 taps, every table entry used)
            ([1, 1, 2, 2], [1, 1, 3, 3], (1, 1), (1, 1)),
            ([2, 3, 4, 4], [5, 3, 4, 4], (1, 1), (1, 1)),
        ];
        for (ci, &(xs, ws, stride, padding)) in cases.iter().enumerate() {
            let s = ConvShape::new(xs, ws, stride, padding).unwrap();
            let g = &s.g;
            let (pin, pout, kk) = (g.h * g.w, g.oh * g.ow, g.kh * g.kw);
            let cols = g.c * pin;
            let wq = codes(ws.iter().product(), ci + 11);
            // reference: every tap written where it lands, from the geometry
            let mut want = vec![0i8; s.o * pout * cols];
            let mut taps = Vec::new(); // (row, col, tap index into wq)
            for o in 0..s.o {
                for oy in 0..g.oh {
                    for ox in 0..g.ow {
                        for i in 0..g.kh {
                            for j in 0..g.kw {
                                let iy = (oy * g.sh + i) as isize - g.ph as isize;
                                let ix = (ox * g.sw + j) as isize - g.pw as isize;
                                if iy < 0 || ix < 0 || iy as usize >= g.h || ix as usize >= g.w {
                                    continue;
                                }
                                for c in 0..g.c {
                                    let row = o * pout + oy * g.ow + ox;
                                    let col = c * pin + iy as usize * g.w + ix as usize;
                                    let tap = ((o * g.c + c) * g.kh + i) * g.kw + j;
                                    want[row * cols + col] = wq[tap];
                                    taps.push((row, col, tap));
                                }
                            }
                        }
                    }
                }
            }
            let de: Vec<i32> = (0..want.len())
                .map(|i| ((i * 7919) % 200_003) as i32 - 100_000)
                .collect();
            let mut want_acc = vec![0i64; wq.len()];
            for &(row, col, tap) in &taps {
                want_acc[tap] += de[row * cols + col] as i64;
            }
            let mut acc = vec![0i64; wq.len()];
            fold_taps(&de, &tap_map(g), [s.o, g.c, pin, pout, kk], &mut acc);
            assert_eq!(acc, want_acc, "dE folded into taps, case {ci}");
            for simd in [true, false] {
                crate::simd::set_elementwise_simd(simd);
                let mut e = take_i8(want.len() + SLACK).unwrap();
                e.fill(77); // every byte must be written
                fill_segments(&mut e, &wq, &tap_map(g), [s.o, g.c, pin, pout, kk]);
                crate::simd::set_elementwise_simd(true);
                assert_eq!(&e[..want.len()], &want[..], "E, case {ci}, simd {simd}");
            }
        }
    }

    /// Large planes and expansions that cost far more than the convolution stay on the general path.
    #[test]
    fn applies_only_to_small_planes() {
        let big = ConvShape::new([32, 32, 7, 7], [64, 32, 3, 3], (1, 1), (1, 1)).unwrap();
        assert!(!applies(&big));
        let first = ConvShape::new([32, 1, 8, 8], [16, 1, 3, 3], (1, 1), (1, 1)).unwrap();
        assert!(!applies(&first)); // 64 output pixels
        let pointwise = ConvShape::new([3, 8, 2, 2], [4, 8, 1, 1], (1, 1), (0, 0)).unwrap();
        assert!(!applies(&pointwise)); // E would be 4x the MACs
    }
}
