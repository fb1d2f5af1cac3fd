//! Direct INT8 convolution for the AVX-512 VNNI kernel: the image is read in place by the micro-kernel,
//! with no packing of the patch matrix.
//!
//! On the padded grid of a stride-1 convolution (see `nn::conv::grid`), the patch matrix `B (K × N)` has a row
//! per tap `(c, ki, kj)` that is the padded image read from an offset. Stored with the channels
//! interleaved by groups of 4 (`[c/4][row][col][c%4]`, a [`GroupedImage`]), the 4 values of a k-group
//! `(c/4, ki, kj)` at grid position `n` are one dword, and the 16 positions `n0..n0+16` are 64
//! consecutive bytes: exactly the `B` vector `vpdpbusd` takes. So a 16 (output channels) × 16
//! (positions) tile loads its `B` straight from the image at `offset[g] + n0` for each k-group `g`,
//! and only the weights (small) are packed ([`DirectWeights`]).
//!
//! `vpdpbusd` multiplies unsigned by signed bytes: the image is the unsigned operand, stored as
//! `v ^ 0x80` (`v + 128` read as u8, padding `0x80`), the weights are signed, and the tile subtracts
//! `128·Σ_k w[o, k]` per output channel, a constant of the weights. The INT32 sums are exact, so results
//! are the same bits as the packed GEMM path with the same epilogue, `acc as f32 · (sa[o]·sb)`.

use crate::error::{Error, Result};
use crate::gemm::Scale;

/// An image on a padded grid with channels interleaved by 4 (see the module docs): the 4 bytes of k-group
/// `g` at grid position `n` are `data[(offsets[g] + n)·4 ..][..4]`, each `v ^ 0x80`.
#[derive(Clone, Copy, Debug)]
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
pub struct GroupedImage<'a> {
    data: &'a [i8],
    offsets: &'a [usize],
    cols: usize,
}

impl<'a> GroupedImage<'a> {
    /// Fails unless every k-group has its `cols` positions, rounded up to a whole tile of 16, in `data`
    /// (the kernel reads whole tiles).
    pub fn new(data: &'a [i8], offsets: &'a [usize], cols: usize) -> Result<Self> {
        let span = cols.div_ceil(16) * 16;
        if let Some((g, &o)) = offsets.iter().enumerate().find(|&(_, &o)| {
            o.checked_add(span)
                .and_then(|e| e.checked_mul(4))
                .is_none_or(|end| end > data.len())
        }) {
            return Err(Error::invalid(
                "b",
                format!(
                    "k-group {g} at position {o} with {span} positions reaches past the {} bytes of data",
                    data.len()
                ),
            ));
        }
        Ok(GroupedImage {
            data,
            offsets,
            cols,
        })
    }
}

/// Convolution weights `w (O, C, taps)` packed for the direct kernel: 16-row panels of k-groups
/// `(c/4, tap)`, each row's 4 bytes the weights of channels `4·(c/4) .. +4` (zero past `C`), and
/// `128·Σ w[o, ·]` per row.
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
pub struct DirectWeights {
    packed: Vec<i8>,
    corr: Vec<i32>,
    o: usize,
    kgroups: usize,
}

impl DirectWeights {
    /// `w`: `O × C × taps` row-major.
    pub fn new(w: &[i8], o: usize, c: usize, taps: usize) -> Result<Self> {
        if w.len() != o * c * taps {
            return Err(Error::invalid(
                "w",
                format!(
                    "expected {o}x{c}x{taps} = {} values, got {}",
                    o * c * taps,
                    w.len()
                ),
            ));
        }
        let cg = c.div_ceil(4);
        let kgroups = cg * taps;
        let panels = o.div_ceil(16);
        let mut packed = vec![0i8; panels * kgroups * 64];
        let mut corr = vec![0i32; panels * 16];
        for (oc, w_o) in w.chunks_exact(c * taps).enumerate() {
            let (p, r) = (oc / 16, oc % 16);
            let panel = &mut packed[p * kgroups * 64..(p + 1) * kgroups * 64];
            // row r of k-group (cg, t) is bytes (g·16 + r)·4 .. +4: channel j of the group at + j
            for (cg, w_g) in w_o.chunks(4 * taps).enumerate() {
                let dst = &mut panel[cg * taps * 64..(cg + 1) * taps * 64];
                for (j, src) in w_g.chunks_exact(taps).enumerate() {
                    for (t, &v) in src.iter().enumerate() {
                        dst[(t * 16 + r) * 4 + j] = v;
                    }
                }
            }
            corr[oc] = 128 * w_o.iter().map(|&v| v as i32).sum::<i32>();
        }
        Ok(DirectWeights {
            packed,
            corr,
            o,
            kgroups,
        })
    }
}

/// Whether [`conv_direct_f32`] runs here: the active GEMM kernel is AVX-512 VNNI (the only one with a
/// direct tile; every other kernel takes the packed path, with the same results).
pub fn direct_available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        matches!(crate::gemm::active_kernel(), Ok(k) if k.name() == "avx512vnni")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Where [`conv_direct_f32`] writes: grid position `n = r·wp + i·s + j` of output channel `o`, for
/// `j < ow` and `i < nb`, is output `y[i·O·P + o·P + r·ow + j]` (`P` outputs per channel and image),
/// plus `bias[o]` when given; the other positions of the grid are dropped.
#[derive(Clone, Copy, Debug)]
pub struct GridScatter<'a> {
    pub wp: usize,
    pub s: usize,
    pub ow: usize,
    pub nb: usize,
    pub p: usize,
    pub bias: Option<&'a [f32]>,
}

/// `y = (W · B) as f32 · (sa[o]·sb) (+ bias[o])` at the places [`GridScatter`] gives, straight from
/// the tiles' registers. Tiles of 16 positions are spread over the pool when `parallel`. An error if the
/// kernel is not available here ([`direct_available`]) or the sizes disagree.
pub fn conv_direct_f32(
    w: &DirectWeights,
    b: &GroupedImage,
    sa: Scale,
    sb: f32,
    y: &mut [f32],
    to: &GridScatter,
    parallel: bool,
) -> Result<()> {
    if b.offsets.len() != w.kgroups {
        return Err(Error::invalid(
            "b",
            format!(
                "has {} k-groups, the weights {}",
                b.offsets.len(),
                w.kgroups
            ),
        ));
    }
    let (o, cols) = (w.o, b.cols);
    if y.len() != to.nb * o * to.p {
        return Err(Error::invalid(
            "y",
            format!("expected {}x{o}x{} values, got {}", to.nb, to.p, y.len()),
        ));
    }
    // Every kept position must land inside y: rows r < P/ow, images i < nb, columns j < ow.
    let rows_out = to.p.checked_div(to.ow).unwrap_or(0);
    if to.ow == 0 || to.s < to.ow || to.wp < to.nb * to.s || cols > rows_out * to.wp {
        return Err(Error::invalid(
            "to",
            format!("grid {to:?} does not fit {cols} positions"),
        ));
    }
    for (arg, v) in [("scale_a", sa_values(&sa)), ("bias", to.bias)] {
        if let Some(v) = v {
            if v.len() != o {
                return Err(Error::invalid(
                    arg,
                    format!("expected {o} values, got {}", v.len()),
                ));
            }
        }
    }
    if !direct_available() {
        return Err(Error::invalid(
            "kernel",
            "the direct convolution needs the avx512vnni kernel".to_string(),
        ));
    }
    #[cfg(target_arch = "x86_64")]
    x86::run(w, b, sa, sb, y, to, parallel);
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (sb, parallel);
    Ok(())
}

fn sa_values<'a>(sa: &Scale<'a>) -> Option<&'a [f32]> {
    match *sa {
        Scale::PerIndex(v) => Some(v),
        Scale::Scalar(_) => None,
    }
}

/// Below this many multiply-adds a direct convolution runs on the calling thread (a pool hop costs
/// microseconds).
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
const PAR_MIN_MACS: usize = 1 << 18;

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::{DirectWeights, GridScatter, GroupedImage, PAR_MIN_MACS};
    use crate::gemm::Scale;
    use crate::threads;

    /// A run of kept positions in a tile: the lanes of `mask` go to `y[at + lane + o·P]` (`at` is the
    /// output index of lane 0, which may lie before the output).
    #[derive(Clone, Copy, Default)]
    struct Seg {
        mask: u16,
        at: isize,
    }

    /// The runs of kept positions among `n0 .. n0 + 16` (below `cols`); returns how many. One division
    /// per tile, then the row, image and column advance with the position.
    fn segments(to: &GridScatter, o: usize, n0: usize, cols: usize, segs: &mut [Seg; 16]) -> usize {
        let end = (n0 + 16).min(cols);
        let (mut r, q) = (n0 / to.wp, n0 % to.wp);
        let (mut i, mut j) = (q / to.s, q % to.s);
        let (mut n, mut k) = (n0, 0);
        while n < end {
            if i >= to.nb {
                // past the last image of the row: on to the next row
                n += to.wp - (i * to.s + j);
                r += 1;
                (i, j) = (0, 0);
                continue;
            }
            if j >= to.ow {
                // the gap before the next image
                n += to.s - j;
                (i, j) = (i + 1, 0);
                continue;
            }
            let len = (to.ow - j).min(end - n);
            let lane = n - n0;
            segs[k] = Seg {
                mask: (((1u32 << len) - 1) << lane) as u16,
                at: (i * o * to.p + r * to.ow + j) as isize - lane as isize,
            };
            k += 1;
            n += len;
            j += len;
        }
        k
    }

    pub(super) fn run(
        w: &DirectWeights,
        b: &GroupedImage,
        sa: Scale,
        sb: f32,
        y: &mut [f32],
        to: &GridScatter,
        parallel: bool,
    ) {
        let panels = w.o.div_ceil(16);
        let scale: Vec<f32> = (0..panels * 16)
            .map(|i| if i < w.o { sa.at(i) * sb } else { 0.0 })
            .collect();
        let bias: Option<Vec<f32>> = to.bias.map(|bv| {
            (0..panels * 16)
                .map(|i| bv.get(i).copied().unwrap_or(0.0))
                .collect()
        });
        let tiles = b.cols.div_ceil(16);
        // tiles write disjoint outputs
        let out = threads::OutPtr(y.as_mut_ptr());
        let tile = |t: usize| {
            let n0 = t * 16;
            let mut segs = [Seg::default(); 16];
            let nseg = segments(to, w.o, n0, b.cols, &mut segs);
            if nseg == 0 {
                return;
            }
            for p in 0..panels {
                let rows = 16.min(w.o - p * 16);
                // SAFETY: `GroupedImage::new` checked that every k-group has whole tiles of positions
                // in `data`; the panel holds `kgroups·64` bytes; `conv_direct_f32` checked that every
                // kept position of rows `p·16 .. +rows` lands inside `y`; tiles write disjoint outputs;
                // `direct_available` held, so the CPU has the features.
                unsafe {
                    tile_16x16(
                        w.kgroups,
                        w.packed.as_ptr().add(p * w.kgroups * 64),
                        b.data.as_ptr().add(n0 * 4),
                        b.offsets.as_ptr(),
                        w.corr.as_ptr().add(p * 16),
                        scale.as_ptr().add(p * 16),
                        bias.as_ref().map(|v| v.as_ptr().add(p * 16)),
                        out.ptr().add(p * 16 * to.p),
                        to.p,
                        rows,
                        &segs[..nseg],
                    )
                }
            }
        };
        let macs = w.o * w.kgroups * 4 * b.cols;
        if parallel && threads::num_threads() > 1 && tiles > 1 && macs >= PAR_MIN_MACS {
            threads::run_parts(tiles, |t| {
                tile(t);
            });
        } else {
            (0..tiles).for_each(tile);
        }
    }

    /// One tile: 16 output channels (rows of the packed panel `a`) × 16 positions of the image `img`
    /// (already advanced to the tile's first position). Row `r` is `(acc − corr[r]) as f32 · scale[r]`
    /// (`+ bias[r]`), and the lanes of each run `seg` are stored at `y + r·ldc + seg.at` (masked
    /// stores, so the lanes outside a run are never touched), for the first `rows` rows.
    ///
    /// # Safety
    /// The CPU has avx512f+avx512bw+avx512vnni; `a` holds `kgroups·64` bytes; `img + offs[g]·4 .. +64`
    /// is readable for every `g < kgroups`; `corr`/`scale`/`bias` hold 16 values; every run of every row
    /// lies inside the output `y` points into.
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    unsafe fn tile_16x16(
        kgroups: usize,
        a: *const i8,
        img: *const i8,
        offs: *const usize,
        corr: *const i32,
        scale: *const f32,
        bias: Option<*const f32>,
        y: *mut f32,
        ldc: usize,
        rows: usize,
        segs: &[Seg],
    ) {
        let mut acc = [_mm512_setzero_si512(); 16];
        let mut ap = a as *const i32;
        for g in 0..kgroups {
            let bv = _mm512_loadu_si512(img.add(*offs.add(g) * 4) as *const __m512i);
            for (r, x) in acc.iter_mut().enumerate() {
                *x = _mm512_dpbusd_epi32(*x, bv, _mm512_set1_epi32(ap.add(r).read_unaligned()));
            }
            ap = ap.add(16);
        }
        for (r, x) in acc.iter().enumerate().take(rows) {
            let v = _mm512_sub_epi32(*x, _mm512_set1_epi32(*corr.add(r)));
            let mut f = _mm512_mul_ps(_mm512_cvtepi32_ps(v), _mm512_set1_ps(*scale.add(r)));
            if let Some(bp) = bias {
                f = _mm512_add_ps(f, _mm512_set1_ps(*bp.add(r)));
            }
            let row = y.wrapping_add(r * ldc);
            for sg in segs {
                // the masked-off lanes' addresses (which may lie outside `y`) are not accessed
                _mm512_mask_storeu_ps(row.wrapping_offset(sg.at), sg.mask, f);
            }
        }
    }
}
