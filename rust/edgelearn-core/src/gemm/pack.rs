//! The generic packing of A and B blocks into the panel layout of the module docs of `gemm`, for any
//! tile (`mr`, `nr`) and group size (`ku`): what [`Kernel::pack_a_block`](super::Kernel::pack_a_block) and
//! [`Kernel::pack_b_block`](super::Kernel::pack_b_block) do unless a kernel packs its own panels (the x86
//! kernels' 4-value groups of 16 columns, `x86::pack`). Transposes and F-ordered inputs are handled here,
//! by reading through the views' strides.
//!
//! A panel of A and a panel of B have the same shape: `w` lines (rows of A, columns of B) × `kc` k values,
//! stored as `[g][line][u]` with `ku` k values per group. So one routine packs both, with three paths:
//! k contiguous in memory (row-major A, column-major B, the rows of a [`RowsRef`] as A: whole groups are
//! copied), lines contiguous (column-major A, row-major B: `ku` k-rows are interleaved byte by byte), and
//! any other stride. On x86-64, groups of 4 move through SSE2 (the baseline) transposes and interleaves.

use super::{Operand, RowsRef};

/// Packs rows `r0..r0+m` and k values `k0..k0+kc` of `a` into `out`, as `ceil(m/mr)` panels of
/// `kgroups·mr·ku` bytes (`kgroups = ceil(kc/ku)`), zero-padded, XOR 0x80 if `shift`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn pack_a(
    out: &mut [i8],
    a: &Operand,
    r0: usize,
    m: usize,
    k0: usize,
    kc: usize,
    mr: usize,
    ku: usize,
    shift: bool,
) {
    let src = match a {
        Operand::Strided(a) => Source {
            data: a.data(),
            line_stride: a.row_stride(),
            k_stride: a.col_stride(),
            line_offsets: None,
        },
        Operand::Rows(a) => {
            let (data, offsets) = a.parts();
            assert!(r0 + m <= offsets.len() && k0 + kc <= a.cols());
            Source {
                data,
                line_stride: 0,
                k_stride: 1,
                line_offsets: Some(offsets),
            }
        }
    };
    let x = if shift { 0x80u8 as i8 } else { 0 };
    pack_panels(out, &src, r0, m, k0, kc, mr, ku, x);
}

/// Packs k values `k0..k0+kc` and columns `c0..c0+n` of `b` into `out`, as `ceil(n/nr)` panels of
/// `kgroups·nr·ku` bytes, zero-padded; writes each panel's `nr` column sums into `sums`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn pack_b(
    out: &mut [i8],
    sums: &mut [i32],
    b: &Operand,
    k0: usize,
    kc: usize,
    c0: usize,
    n: usize,
    nr: usize,
    ku: usize,
) {
    match b {
        Operand::Strided(b) => {
            let src = Source {
                data: b.data(),
                line_stride: b.col_stride(),
                k_stride: b.row_stride(),
                line_offsets: None,
            };
            pack_panels(out, &src, c0, n, k0, kc, nr, ku, 0);
            column_sums(sums, &src, c0, n, k0, kc, nr);
        }
        Operand::Rows(b) => pack_b_rows(out, sums, b, k0, kc, c0, n, nr, ku),
    }
}

/// A matrix seen as lines (rows of A, columns of B) of k values: line `l` starts at `l·line_stride`, or
/// at `line_offsets[l]` for the rows of a [`RowsRef`] (whose k values are contiguous: `k_stride` 1).
struct Source<'a> {
    data: &'a [i8],
    line_stride: usize,
    k_stride: usize,
    line_offsets: Option<&'a [usize]>,
}

impl Source<'_> {
    /// Where line `l` starts in `data`.
    #[inline(always)]
    fn line(&self, l: usize) -> usize {
        match self.line_offsets {
            Some(o) => o[l],
            None => l * self.line_stride,
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn pack_panels(
    out: &mut [i8],
    src: &Source,
    l0: usize,
    n: usize,
    k0: usize,
    kc: usize,
    w: usize,
    ku: usize,
    x: i8,
) {
    match ku {
        1 => pack_panels_ku::<1>(out, src, l0, n, k0, kc, w, x),
        2 => pack_panels_ku::<2>(out, src, l0, n, k0, kc, w, x),
        4 => pack_panels_ku::<4>(out, src, l0, n, k0, kc, w, x),
        8 => pack_panels_ku::<8>(out, src, l0, n, k0, kc, w, x),
        16 => pack_panels_ku::<16>(out, src, l0, n, k0, kc, w, x),
        _ => panic!("unsupported ku {ku}: kernels pack 1, 2, 4, 8 or 16 k values per group"),
    }
}

/// `pack_panels` for a fixed `KU`, so that group copies compile to single moves.
#[allow(clippy::too_many_arguments)]
fn pack_panels_ku<const KU: usize>(
    out: &mut [i8],
    src: &Source,
    l0: usize,
    n: usize,
    k0: usize,
    kc: usize,
    w: usize,
    x: i8,
) {
    let kgroups = kc.div_ceil(KU);
    let full = kc / KU;
    let panels = n.div_ceil(w);
    let panel_len = kgroups * w * KU;
    assert!(out.len() >= panels * panel_len);
    let data = src.data;
    let (ls, ks) = (src.line_stride, src.k_stride);
    // only the k-contiguous path reads lines through `Source::line`
    assert!(src.line_offsets.is_none() || ks == 1);
    for p in 0..panels {
        let panel = &mut out[p * panel_len..(p + 1) * panel_len];
        let lines = w.min(n - p * w);
        let first = l0 + p * w;
        // Padding lines past the end of the matrix.
        if lines < w {
            for g in 0..kgroups {
                panel[(g * w + lines) * KU..(g + 1) * w * KU].fill(x);
            }
        }
        // Lines from which the partial last group (if any) is still to be written.
        let mut partial_from = 0;
        if ks == 1 {
            // k contiguous: each group of a line is KU consecutive bytes.
            #[allow(unused_mut)]
            let mut l_done = 0;
            #[cfg(target_arch = "x86_64")]
            if KU == 4 {
                while l_done + 4 <= lines {
                    let starts = [0, 1, 2, 3].map(|u| src.line(first + l_done + u) + k0);
                    if !transpose_4_lines(panel, data, starts, l_done, w, kc, x) {
                        break;
                    }
                    l_done += 4;
                }
            }
            partial_from = l_done;
            for l in l_done..lines {
                let base = src.line(first + l) + k0;
                let line = &data[base..base + kc];
                for (g, s) in line.chunks_exact(KU).enumerate() {
                    let d = &mut panel[(g * w + l) * KU..(g * w + l + 1) * KU];
                    for u in 0..KU {
                        d[u] = s[u] ^ x;
                    }
                }
            }
        } else if ls == 1 {
            // Lines contiguous: interleave KU k-rows, each `lines` bytes long.
            #[cfg(target_arch = "x86_64")]
            if KU == 4 && lines >= 16 {
                for g in 0..kgroups {
                    let base = (k0 + g * KU) * ks + first;
                    let rows = KU.min(kc - g * KU);
                    let dst = &mut panel[g * w * KU..(g * w + lines) * KU];
                    // Blocks of 16 lines; the last block may overlap the previous one (same bytes).
                    let mut l = 0;
                    loop {
                        let lb = l.min(lines - 16);
                        assert!(
                            base + (rows - 1) * ks + lb + 16 <= data.len()
                                && (lb + 16) * 4 <= dst.len()
                        );
                        // SAFETY: both ranges were just checked.
                        unsafe {
                            super::x86::pack::interleave_16_lines(
                                data.as_ptr().add(base + lb),
                                ks,
                                dst.as_mut_ptr().add(lb * 4),
                                x,
                                rows,
                            )
                        };
                        l += 16;
                        if l >= lines {
                            break;
                        }
                    }
                }
                continue;
            }
            for g in 0..full {
                let dst = &mut panel[g * w * KU..(g * w + lines) * KU];
                let base = (k0 + g * KU) * ks + first;
                let rows: [&[i8]; KU] =
                    std::array::from_fn(|u| &data[base + u * ks..base + u * ks + lines]);
                interleave::<KU>(dst, &rows, x);
            }
        } else {
            for l in 0..lines {
                let base = (first + l) * ls + k0 * ks;
                for g in 0..full {
                    let d = &mut panel[(g * w + l) * KU..(g * w + l + 1) * KU];
                    for u in 0..KU {
                        d[u] = data[base + (g * KU + u) * ks] ^ x;
                    }
                }
            }
        }
        continue_partial::<KU>(
            panel,
            src,
            first,
            partial_from..lines,
            k0,
            kc,
            full,
            kgroups,
            w,
            x,
        );
    }
}

/// Lines `l..l+4` of a panel of width `w` in 4-value groups, from `kc` k values starting at
/// `data[starts[u]]`: blocks of 4 lines × 4 groups transposed in registers, the last block overlapping
/// the one before (same bytes), the partial last group read whole with its tail masked to `x`. Returns
/// false (and writes nothing) when there are fewer than 4 groups or those whole-group reads would pass
/// the end of `data`.
#[cfg(target_arch = "x86_64")]
#[inline]
fn transpose_4_lines(
    panel: &mut [i8],
    data: &[i8],
    starts: [usize; 4],
    l: usize,
    w: usize,
    kc: usize,
    x: i8,
) -> bool {
    let kgroups = kc.div_ceil(4);
    if kgroups < 4 || starts.iter().any(|&s| s + kgroups * 4 > data.len()) {
        return false;
    }
    let rem = kc % 4;
    let last_keep = if rem == 0 {
        u32::MAX
    } else {
        (1u32 << (8 * rem)) - 1
    };
    let mut g = 0;
    loop {
        let gb = g.min(kgroups - 4);
        let keep = if gb + 4 == kgroups {
            last_keep
        } else {
            u32::MAX
        };
        assert!(((gb + 3) * w + l + 4) * 4 <= panel.len());
        // SAFETY: the source ranges were checked above, the destination just now.
        unsafe {
            super::x86::pack::transpose_4x4_groups(
                starts.map(|s| data.as_ptr().add(s + gb * 4)),
                panel.as_mut_ptr().add((gb * w + l) * 4),
                w * 4,
                x,
                keep,
            )
        };
        g += 4;
        if g >= kgroups {
            return true;
        }
    }
}

/// The last, partial group of a panel (when `KU` does not divide `kc`): real values then padding.
#[allow(clippy::too_many_arguments)]
#[inline]
fn continue_partial<const KU: usize>(
    panel: &mut [i8],
    src: &Source,
    first: usize,
    lines: std::ops::Range<usize>,
    k0: usize,
    kc: usize,
    full: usize,
    kgroups: usize,
    w: usize,
    x: i8,
) {
    if full == kgroups {
        return;
    }
    let rem = kc - full * KU;
    let (data, ks) = (src.data, src.k_stride);
    for l in lines {
        let base = src.line(first + l) + (k0 + full * KU) * ks;
        let d = &mut panel[(full * w + l) * KU..(full * w + l + 1) * KU];
        if ks == 1 && base + KU <= data.len() {
            // One load of KU bytes (the ones past `rem` belong to the next line or are unused).
            let v: [i8; KU] = data[base..base + KU].try_into().unwrap();
            for u in 0..KU {
                d[u] = if u < rem { v[u] ^ x } else { x };
            }
        } else {
            for u in 0..KU {
                d[u] = if u < rem { data[base + u * ks] ^ x } else { x };
            }
        }
    }
}

/// `dst[l·KU + u] = rows[u][l] ^ x`: a byte transpose of KU short rows, written so it vectorizes.
#[inline]
fn interleave<const KU: usize>(dst: &mut [i8], rows: &[&[i8]; KU], x: i8) {
    let n = rows[0].len();
    if KU == 4 {
        // Build each group as one u32 (little-endian byte order = k order).
        let x32 = u32::from_ne_bytes([x as u8; 4]);
        let (r0, r1, r2, r3) = (&rows[0][..n], &rows[1][..n], &rows[2][..n], &rows[3][..n]);
        for (l, d) in dst[..n * 4].chunks_exact_mut(4).enumerate() {
            let v = (r0[l] as u8 as u32)
                | ((r1[l] as u8 as u32) << 8)
                | ((r2[l] as u8 as u32) << 16)
                | ((r3[l] as u8 as u32) << 24);
            d.copy_from_slice(&(v ^ x32).to_le_bytes().map(|b| b as i8));
        }
    } else {
        for (l, d) in dst[..n * KU].chunks_exact_mut(KU).enumerate() {
            for u in 0..KU {
                d[u] = rows[u][l] ^ x;
            }
        }
    }
}

crate::simd::avx2_multiversion! {
/// Writes the sums over `k0..k0+kc` of lines `l0..l0+n` into `sums` (zero for padding lines of the last
/// panel of width `w`).
#[allow(clippy::too_many_arguments)]
fn column_sums(sums: &mut [i32], src: &Source, l0: usize, n: usize, k0: usize, kc: usize, w: usize) {
    let padded = n.div_ceil(w) * w;
    let sums = &mut sums[..padded];
    sums.fill(0);
    let data = src.data;
    let (ls, ks) = (src.line_stride, src.k_stride);
    if ks == 1 {
        for (l, s) in sums[..n].iter_mut().enumerate() {
            let base = (l0 + l) * ls + k0;
            *s = data[base..base + kc].iter().map(|&v| v as i32).sum();
        }
    } else if ls == 1 {
        for k in k0..k0 + kc {
            let row = &data[k * ks + l0..k * ks + l0 + n];
            for (s, &v) in sums[..n].iter_mut().zip(row) {
                *s += v as i32;
            }
        }
    } else {
        for (l, s) in sums[..n].iter_mut().enumerate() {
            *s = (k0..k0 + kc)
                .map(|k| data[(l0 + l) * ls + k * ks] as i32)
                .sum();
        }
    }
}
}

crate::simd::avx2_multiversion! {
/// [`pack_b`] for a [`RowsRef`]: each k-row is a contiguous run, so a group interleaves `ku` runs and
/// the column sums add whole runs.
fn pack_b_rows(
    out: &mut [i8],
    sums: &mut [i32],
    b: &RowsRef,
    k0: usize,
    kc: usize,
    c0: usize,
    n: usize,
    nr: usize,
    ku: usize,
) {
    let kgroups = kc.div_ceil(ku);
    let panels = n.div_ceil(nr);
    let panel_len = kgroups * nr * ku;
    assert!(out.len() >= panels * panel_len && sums.len() >= panels * nr);
    for p in 0..panels {
        let panel = &mut out[p * panel_len..(p + 1) * panel_len];
        let first = c0 + p * nr;
        let lines = nr.min(n - p * nr);
        let s = &mut sums[p * nr..(p + 1) * nr];
        s.fill(0);
        for k in k0..k0 + kc {
            for (t, &v) in s[..lines].iter_mut().zip(b.row(k, first, lines)) {
                *t += v as i32;
            }
        }
        for g in 0..kgroups {
            let rows = ku.min(kc - g * ku);
            let dst = &mut panel[g * nr * ku..(g + 1) * nr * ku];
            dst.fill(0);
            for u in 0..rows {
                let row = b.row(k0 + g * ku + u, first, lines);
                for (l, &v) in row.iter().enumerate() {
                    dst[l * ku + u] = v;
                }
            }
        }
    }
}
}
