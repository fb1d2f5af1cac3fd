//! Max and average pooling over NCHW planes, forward and backward (floor mode, PyTorch semantics:
//! max pooling treats padding as −∞ and propagates NaN; average pooling counts padding, i.e.
//! `count_include_pad=True`, dividing by `kh·kw`).
//!
//! Max pooling records the argmax as its offset `i·kw + j` inside the window (one byte per output), so
//! backward needs neither the input nor a second search.

use std::sync::atomic::{AtomicBool, Ordering};

use super::{check_len, for_each_chunk, for_each_chunk2, worth_parallel, Geometry, Window2d};
use crate::error::{Error, Result};

fn geometry(arg: &'static str, shape: [usize; 4], win: Window2d) -> Result<Geometry> {
    let g = Geometry::new(arg, shape, win)?;
    if g.ph > g.kh / 2 || g.pw > g.kw / 2 {
        return Err(Error::invalid(
            "padding",
            format!(
                "must be at most half the kernel size ({}, {}), got ({}, {})",
                g.kh, g.kw, g.ph, g.pw
            ),
        ));
    }
    Ok(g)
}

/// Input rows `lo..hi` covered by output row `oy`'s window, and the window row of `lo`.
#[inline]
fn span(o: usize, s: usize, p: usize, k: usize, len: usize) -> (usize, usize, usize) {
    let start = (o * s) as isize - p as isize;
    let lo = start.max(0) as usize;
    let hi = ((start + k as isize) as usize).min(len);
    (lo, hi, (lo as isize - start) as usize)
}

/// Output shape `(N, C, OH, OW)` of a pooling window over `shape`.
pub fn pool2d_output_shape(shape: [usize; 4], win: Window2d) -> Result<[usize; 4]> {
    let g = geometry("x", shape, win)?;
    Ok([g.n, g.c, g.oh, g.ow])
}

/// Max pooling: `y` and `idx` are `(N, C, OH, OW)`; `idx` holds the window offset `i·kw + j` of each
/// maximum, so the window may have at most 255 elements.
pub fn maxpool2d_forward(
    x: &[f32],
    shape: [usize; 4],
    win: Window2d,
    y: &mut [f32],
    idx: &mut [u8],
) -> Result<Geometry> {
    let g = geometry("x", shape, win)?;
    if g.kh * g.kw > 255 {
        return Err(Error::invalid(
            "kernel",
            format!(
                "window of {}x{} = {} elements exceeds 255 (argmax offsets are stored as uint8)",
                g.kh,
                g.kw,
                g.kh * g.kw
            ),
        ));
    }
    check_len("x", x.len(), &shape)?;
    let out = [g.n, g.c, g.oh, g.ow];
    check_len("y", y.len(), &out)?;
    check_len("idx", idx.len(), &out)?;
    let (hw, p) = (g.hw(), g.p());
    for_each_chunk2(y, p, idx, p, worth_parallel(x.len()), |plane, yp, ip| {
        let xp = &x[plane * hw..(plane + 1) * hw];
        if g.kh == 2 && g.kw == 2 && g.sh == 2 && g.sw == 2 && g.ph == 0 && g.pw == 0 {
            maxpool_2x2(xp, g.w, g.oh, g.ow, yp, ip);
            return;
        }
        for oy in 0..g.oh {
            let (y0, y1, wi) = span(oy, g.sh, g.ph, g.kh, g.h);
            for ox in 0..g.ow {
                let (x0, x1, wj) = span(ox, g.sw, g.pw, g.kw, g.w);
                let mut best = f32::NEG_INFINITY;
                let mut at = wi * g.kw + wj;
                for (ii, iy) in (y0..y1).enumerate() {
                    let row = &xp[iy * g.w..];
                    for (jj, &v) in row[x0..x1].iter().enumerate() {
                        // Branch-free selects: with real data the comparison is unpredictable.
                        let take = v > best || v.is_nan();
                        best = if take { v } else { best };
                        at = if take { (wi + ii) * g.kw + wj + jj } else { at };
                    }
                }
                yp[oy * g.ow + ox] = best;
                ip[oy * g.ow + ox] = at as u8;
            }
        }
    });
    Ok(g)
}

/// The common 2x2, stride-2, unpadded window (every window fully inside the plane).
fn maxpool_2x2(xp: &[f32], w: usize, oh: usize, ow: usize, yp: &mut [f32], ip: &mut [u8]) {
    #[inline(always)]
    fn pick(best: f32, at: u8, v: f32, k: u8) -> (f32, u8) {
        let take = v > best || v.is_nan();
        (if take { v } else { best }, if take { k } else { at })
    }
    for oy in 0..oh {
        let r0 = &xp[2 * oy * w..2 * oy * w + 2 * ow];
        let r1 = &xp[(2 * oy + 1) * w..(2 * oy + 1) * w + 2 * ow];
        let (yr, ir) = (
            &mut yp[oy * ow..(oy + 1) * ow],
            &mut ip[oy * ow..(oy + 1) * ow],
        );
        for ox in 0..ow {
            let (b, a) = (r0[2 * ox], 0u8);
            let (b, a) = pick(b, a, r0[2 * ox + 1], 1);
            let (b, a) = pick(b, a, r1[2 * ox], 2);
            let (b, a) = pick(b, a, r1[2 * ox + 1], 3);
            yr[ox] = b;
            ir[ox] = a;
        }
    }
}

/// Backward of [`maxpool_2x2`]: windows do not overlap, so every input gets either its window's gradient
/// or zero, written once, row pair by row pair (no zero-fill pass, no bounds checks in the inner loop).
/// Offsets in `ip` must be at most 3 (checked by the caller).
fn maxpool_2x2_backward(
    dyp: &[f32],
    ip: &[u8],
    h: usize,
    w: usize,
    oh: usize,
    ow: usize,
    dp: &mut [f32],
) {
    for oy in 0..oh {
        let (top, bottom) = dp[2 * oy * w..(2 * oy + 2) * w].split_at_mut(w);
        let (dyr, ir) = (&dyp[oy * ow..(oy + 1) * ow], &ip[oy * ow..(oy + 1) * ow]);
        for (((t, b), &v), &at) in top
            .chunks_exact_mut(2)
            .zip(bottom.chunks_exact_mut(2))
            .zip(dyr)
            .zip(ir)
        {
            t[0] = if at == 0 { v } else { 0.0 };
            t[1] = if at == 1 { v } else { 0.0 };
            b[0] = if at == 2 { v } else { 0.0 };
            b[1] = if at == 3 { v } else { 0.0 };
        }
        // An odd last column is in no window.
        top[2 * ow..].fill(0.0);
        bottom[2 * ow..].fill(0.0);
    }
    // Likewise an odd last row.
    dp[2 * oh * w..h * w].fill(0.0);
}

/// Backward of [`maxpool2d_forward`]: `dx (input_shape)` gets each `dy` at its recorded argmax
/// (summed where windows overlap). Fails if an offset in `idx` lies outside its window or the input.
pub fn maxpool2d_backward(
    dy: &[f32],
    idx: &[u8],
    input_shape: [usize; 4],
    win: Window2d,
    dx: &mut [f32],
) -> Result<Geometry> {
    let g = geometry("input_shape", input_shape, win)?;
    let out = [g.n, g.c, g.oh, g.ow];
    check_len("dy", dy.len(), &out)?;
    check_len("idx", idx.len(), &out)?;
    check_len("dx", dx.len(), &input_shape)?;
    let (hw, p) = (g.hw(), g.p());
    let bad = AtomicBool::new(false);
    for_each_chunk(dx, hw, worth_parallel(dx.len()), |plane, dp| {
        let (dyp, ip) = (
            &dy[plane * p..(plane + 1) * p],
            &idx[plane * p..(plane + 1) * p],
        );
        if g.kh == 2 && g.kw == 2 && g.sh == 2 && g.sw == 2 && g.ph == 0 && g.pw == 0 {
            if ip.iter().any(|&at| at > 3) {
                bad.store(true, Ordering::Relaxed);
                return;
            }
            maxpool_2x2_backward(dyp, ip, g.h, g.w, g.oh, g.ow, dp);
            return;
        }
        dp.fill(0.0);
        for oy in 0..g.oh {
            for ox in 0..g.ow {
                let at = ip[oy * g.ow + ox] as usize;
                let (i, j) = (at / g.kw, at % g.kw);
                let iy = (oy * g.sh + i) as isize - g.ph as isize;
                let ix = (ox * g.sw + j) as isize - g.pw as isize;
                if i >= g.kh || iy < 0 || ix < 0 || iy as usize >= g.h || ix as usize >= g.w {
                    bad.store(true, Ordering::Relaxed);
                    continue;
                }
                dp[iy as usize * g.w + ix as usize] += dyp[oy * g.ow + ox];
            }
        }
    });
    if bad.load(Ordering::Relaxed) {
        return Err(Error::invalid("idx", "holds a window offset outside the window or the input (not from maxpool2d_forward with these arguments?)"));
    }
    Ok(g)
}

/// Average pooling (`count_include_pad=True`): `y (N, C, OH, OW)`.
pub fn avgpool2d_forward(
    x: &[f32],
    shape: [usize; 4],
    win: Window2d,
    y: &mut [f32],
) -> Result<Geometry> {
    let g = geometry("x", shape, win)?;
    check_len("x", x.len(), &shape)?;
    check_len("y", y.len(), &[g.n, g.c, g.oh, g.ow])?;
    let (hw, p) = (g.hw(), g.p());
    let inv = 1.0 / (g.kh * g.kw) as f32;
    for_each_chunk(y, p, worth_parallel(x.len()), |plane, yp| {
        let xp = &x[plane * hw..(plane + 1) * hw];
        for oy in 0..g.oh {
            let (y0, y1, _) = span(oy, g.sh, g.ph, g.kh, g.h);
            for ox in 0..g.ow {
                let (x0, x1, _) = span(ox, g.sw, g.pw, g.kw, g.w);
                let mut s = 0.0f32;
                for iy in y0..y1 {
                    s += xp[iy * g.w + x0..iy * g.w + x1].iter().sum::<f32>();
                }
                yp[oy * g.ow + ox] = s * inv;
            }
        }
    });
    Ok(g)
}

/// Backward of [`avgpool2d_forward`]: each `dy / (kh·kw)` spread over its window's in-bounds inputs.
pub fn avgpool2d_backward(
    dy: &[f32],
    input_shape: [usize; 4],
    win: Window2d,
    dx: &mut [f32],
) -> Result<Geometry> {
    let g = geometry("input_shape", input_shape, win)?;
    check_len("dy", dy.len(), &[g.n, g.c, g.oh, g.ow])?;
    check_len("dx", dx.len(), &input_shape)?;
    let (hw, p) = (g.hw(), g.p());
    let inv = 1.0 / (g.kh * g.kw) as f32;
    for_each_chunk(dx, hw, worth_parallel(dx.len()), |plane, dp| {
        dp.fill(0.0);
        let dyp = &dy[plane * p..(plane + 1) * p];
        for oy in 0..g.oh {
            let (y0, y1, _) = span(oy, g.sh, g.ph, g.kh, g.h);
            for ox in 0..g.ow {
                let (x0, x1, _) = span(ox, g.sw, g.pw, g.kw, g.w);
                let v = dyp[oy * g.ow + ox] * inv;
                for iy in y0..y1 {
                    dp[iy * g.w + x0..iy * g.w + x1]
                        .iter_mut()
                        .for_each(|d| *d += v);
                }
            }
        }
    });
    Ok(g)
}
