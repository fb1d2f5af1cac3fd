//! Packing of A and B blocks into the panel layouts micro-kernels read (see the module docs of `gemm`).
//! Transposes and F-ordered inputs are handled here, by reading through the views' strides.

use super::MatRef;

/// Packs rows `r0..r0+m` and k values `k0..k0+kc` of `a` into `out`, as `ceil(m/mr)` panels of
/// `kgroups·mr·ku` bytes (`kgroups = ceil(kc/ku)`), zero-padded, XOR 0x80 if `shift`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn pack_a(
    out: &mut [i8],
    a: &MatRef,
    r0: usize,
    m: usize,
    k0: usize,
    kc: usize,
    mr: usize,
    ku: usize,
    shift: bool,
) {
    let kgroups = kc.div_ceil(ku);
    let panels = m.div_ceil(mr);
    let panel_len = kgroups * mr * ku;
    debug_assert!(out.len() >= panels * panel_len);
    let x = if shift { 0x80u8 as i8 } else { 0 };
    let data = a.data();
    let (rs, cs) = (a.row_stride(), a.col_stride());
    for p in 0..panels {
        let panel = &mut out[p * panel_len..(p + 1) * panel_len];
        let rows_here = mr.min(m - p * mr);
        for r in 0..mr {
            if r >= rows_here {
                for g in 0..kgroups {
                    let dst = &mut panel[(g * mr + r) * ku..(g * mr + r + 1) * ku];
                    dst.fill(x);
                }
                continue;
            }
            let row = r0 + p * mr + r;
            let base = row * rs + k0 * cs;
            for g in 0..kgroups {
                let dst = &mut panel[(g * mr + r) * ku..(g * mr + r + 1) * ku];
                let kk = g * ku;
                let n = ku.min(kc - kk);
                if cs == 1 {
                    let src = &data[base + kk..base + kk + n];
                    for (d, s) in dst[..n].iter_mut().zip(src) {
                        *d = *s ^ x;
                    }
                } else {
                    for u in 0..n {
                        dst[u] = data[base + (kk + u) * cs] ^ x;
                    }
                }
                dst[n..].fill(x);
            }
        }
    }
}

/// Packs k values `k0..k0+kc` and columns `c0..c0+n` of `b` into `out`, as `ceil(n/nr)` panels of
/// `kgroups·nr·ku` bytes, zero-padded; writes each panel's `nr` column sums into `sums`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn pack_b(
    out: &mut [i8],
    sums: &mut [i32],
    b: &MatRef,
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
    debug_assert!(out.len() >= panels * panel_len && sums.len() >= panels * nr);
    let data = b.data();
    let (rs, cs) = (b.row_stride(), b.col_stride());
    for q in 0..panels {
        let panel = &mut out[q * panel_len..(q + 1) * panel_len];
        let cols_here = nr.min(n - q * nr);
        for c in 0..nr {
            let mut sum = 0i32;
            if c < cols_here {
                let col = c0 + q * nr + c;
                let base = k0 * rs + col * cs;
                for g in 0..kgroups {
                    let dst = &mut panel[(g * nr + c) * ku..(g * nr + c + 1) * ku];
                    let kk = g * ku;
                    let cnt = ku.min(kc - kk);
                    if rs == 1 {
                        let src = &data[base + kk..base + kk + cnt];
                        dst[..cnt].copy_from_slice(src);
                    } else {
                        for u in 0..cnt {
                            dst[u] = data[base + (kk + u) * rs];
                        }
                    }
                    dst[cnt..].fill(0);
                    sum += dst[..cnt].iter().map(|&v| v as i32).sum::<i32>();
                }
            } else {
                for g in 0..kgroups {
                    panel[(g * nr + c) * ku..(g * nr + c + 1) * ku].fill(0);
                }
            }
            sums[q * nr + c] = sum;
        }
    }
}
