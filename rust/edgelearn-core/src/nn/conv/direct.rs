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

/// [`direct_available`] as an error for the direct kernels' entry points.
fn require_direct() -> Result<()> {
    if direct_available() {
        return Ok(());
    }
    Err(Error::invalid(
        "kernel",
        "the direct convolution needs the avx512vnni kernel",
    ))
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
    require_direct()?;
    #[cfg(target_arch = "x86_64")]
    x86::run(w, b, sa, sb, y, to, parallel);
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (sb, parallel);
    Ok(())
}

/// `dWᵀ (K × O)` of a stride-1 convolution as exact INT32 sums, straight from the padded planes (no patch
/// matrix is packed): `prod[k·O + o] = Σ_{n < cols} x[offs[k] + n] · dy[o·ld + n]`.
///
/// `xu` holds the planes as `v ^ 0x80` (`v + 128` read as u8, padding `0x80`), readable for `cols` rounded
/// up to 4 bytes from every offset; `dy` is `O` rows of `ld` bytes (`ld` a multiple of 4, at least `cols`
/// rounded up to 4), zero past `cols`. The kernel interleaves `dY` by groups of 4 positions (a 16-channel
/// panel of one group is the 64-byte vector `vpdpbusd` takes) and broadcasts the 4 bytes of `x` each patch row
/// reads at that group, so each tile is 16 patch rows × 16 output channels. The unsigned image adds
/// `128·Σ_n dy[o, n]` to every sum of channel `o`, subtracted at the end: sums wrap alike, so the results
/// are exact whenever `cols ≤` [`MAX_K_I32`](crate::gemm::MAX_K_I32). Same bits as the packed GEMM of
/// the patch rows by `dYᵀ`. Spread over the pool when `parallel`.
#[allow(clippy::too_many_arguments)]
pub fn dw_direct(
    xu: &[i8],
    offs: &[usize],
    cols: usize,
    dy: &[i8],
    ld: usize,
    o: usize,
    prod: &mut [i32],
    parallel: bool,
) -> Result<()> {
    let span = cols.div_ceil(4) * 4;
    if !ld.is_multiple_of(4) || ld < span {
        return Err(Error::invalid(
            "ld",
            format!("expected a multiple of 4 of at least {span}, got {ld}"),
        ));
    }
    if o.checked_mul(ld).is_none_or(|need| dy.len() < need) {
        return Err(Error::invalid(
            "dy",
            format!("expected {o} rows of {ld} bytes, got {} bytes", dy.len()),
        ));
    }
    if let Some((k, &at)) = offs
        .iter()
        .enumerate()
        .find(|&(_, &at)| at.checked_add(span).is_none_or(|end| end > xu.len()))
    {
        return Err(Error::invalid(
            "xu",
            format!(
                "patch row {k} at {at} with {span} positions reaches past the {} bytes",
                xu.len()
            ),
        ));
    }
    if offs.len().checked_mul(o) != Some(prod.len()) {
        return Err(Error::invalid(
            "prod",
            format!("expected {}x{o} values, got {}", offs.len(), prod.len()),
        ));
    }
    if ld > i32::MAX as usize / 16 {
        return Err(Error::invalid(
            "ld",
            format!("{ld} bytes a row is past the kernel's gather"),
        ));
    }
    require_direct()?;
    #[cfg(target_arch = "x86_64")]
    x86::dw(xu, offs, span / 4, dy, ld, o, prod, parallel)?;
    #[cfg(not(target_arch = "x86_64"))]
    let _ = parallel;
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

    /// [`super::dw_direct`] on this CPU (arguments checked), `groups` groups of 4 positions.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn dw(
        xu: &[i8],
        offs: &[usize],
        groups: usize,
        dy: &[i8],
        ld: usize,
        o: usize,
        prod: &mut [i32],
        parallel: bool,
    ) -> crate::error::Result<()> {
        let k = offs.len();
        if k == 0 || o == 0 {
            return Ok(());
        }
        let panels = o.div_ceil(16);
        // dY by groups of 4 positions: panel p, group g is the 64 bytes at (p·groups + g)·64, lane r the
        // 4 bytes of channel p·16 + r (zero past O)
        let mut dyg = crate::nn::take_i8(panels * groups * 64)?;
        let mut corr = vec![0i32; panels * 16];
        // SAFETY: `dw_direct` checked O rows of `ld ≥ 4·groups` bytes in `dy` and the kernel's features;
        // `dyg` and `corr` are sized for every panel.
        unsafe {
            group_dy(
                dy.as_ptr(),
                ld,
                o,
                groups,
                dyg.as_mut_ptr(),
                corr.as_mut_ptr(),
            )
        };
        let rtiles = k.div_ceil(16);
        let out = threads::OutPtr(prod.as_mut_ptr());
        let (dyg, xp) = (&dyg[..], xu.as_ptr() as usize);
        let part = |t: usize| {
            let (rt, p) = (t / panels, t % panels);
            let rows = 16.min(k - rt * 16);
            // rows past K repeat the last one (read, never stored)
            let ptrs: [usize; 16] = std::array::from_fn(|r| xp + offs[rt * 16 + r.min(rows - 1)]);
            let lanes = 16.min(o - p * 16);
            // SAFETY: `dw_direct` checked that every patch row has 4·groups bytes from its offset; the
            // panel holds groups·64 bytes; rows rt·16 .. +rows and lanes p·16 .. +lanes lie inside the
            // K × O output and parts write disjoint ones.
            unsafe {
                dw_tile(
                    &ptrs,
                    dyg.as_ptr().add(p * groups * 64),
                    groups,
                    corr.as_ptr().add(p * 16),
                    out.ptr().add(rt * 16 * o + p * 16),
                    o,
                    rows,
                    ((1u32 << lanes) - 1) as u16,
                )
            }
        };
        let parts = rtiles * panels;
        let macs = k * o * groups * 4;
        if parallel && parts > 1 && macs >= PAR_MIN_MACS {
            threads::run_parts(parts, part);
        } else {
            (0..parts).for_each(part);
        }
        Ok(())
    }

    /// `dy` (`o` rows of `ld` bytes) interleaved by groups of 4 positions into `dst` (see [`dw`]), with
    /// `corr[c] = 128·Σ dy[c, ·]` (wrapping) per channel of every panel, zero past `o`.
    ///
    /// # Safety
    /// The CPU has avx512f+avx512bw+avx512vnni; `dy` holds `o` rows of `ld ≥ 4·groups` bytes, `ld` a
    /// multiple of 4 with `16·ld` within `i32`; `dst` holds `o.div_ceil(16)·groups·64` bytes and `corr`
    /// `o.div_ceil(16)·16` values.
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    unsafe fn group_dy(
        dy: *const i8,
        ld: usize,
        o: usize,
        groups: usize,
        dst: *mut i8,
        corr: *mut i32,
    ) {
        let lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
        let idx = _mm512_mullo_epi32(lane, _mm512_set1_epi32((ld / 4) as i32));
        let ones = _mm512_set1_epi8(1);
        for p in 0..o.div_ceil(16) {
            let lanes = 16.min(o - p * 16);
            let m = ((1u32 << lanes) - 1) as __mmask16;
            let base = dy.add(p * 16 * ld) as *const i32;
            let mut sums = _mm512_setzero_si512();
            for g in 0..groups {
                // lanes past `o` are not read (masked) and stay zero
                let v = _mm512_mask_i32gather_epi32::<4>(
                    _mm512_setzero_si512(),
                    m,
                    idx,
                    base.add(g) as *const _,
                );
                // Σ of each lane's 4 signed bytes (times unsigned ones)
                sums = _mm512_dpbusd_epi32(sums, ones, v);
                _mm512_storeu_si512(dst.add((p * groups + g) * 64) as *mut __m512i, v);
            }
            _mm512_storeu_si512(
                corr.add(p * 16) as *mut __m512i,
                _mm512_slli_epi32::<7>(sums),
            );
        }
    }

    /// One `dW` tile: 16 patch rows (their 4-byte groups read at `ptrs[r] + 4g`) × the 16 channels of the
    /// panel `dyg`; row `r` (`< rows`) minus `corr` is stored at `out + r·ldo`, lanes of `mask`.
    ///
    /// # Safety
    /// The CPU has avx512f+avx512bw+avx512vnni; each `ptrs[r]` is readable for `4·groups` bytes; `dyg`
    /// holds `groups·64` bytes and `corr` 16 values; the masked lanes of the first `rows` rows lie in the
    /// output.
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    unsafe fn dw_tile(
        ptrs: &[usize; 16],
        dyg: *const i8,
        groups: usize,
        corr: *const i32,
        out: *mut i32,
        ldo: usize,
        rows: usize,
        mask: u16,
    ) {
        let mut acc = [_mm512_setzero_si512(); 16];
        for g in 0..groups {
            let dv = _mm512_loadu_si512(dyg.add(g * 64) as *const __m512i);
            for (r, x) in acc.iter_mut().enumerate() {
                let xv = ((ptrs[r] + 4 * g) as *const i32).read_unaligned();
                *x = _mm512_dpbusd_epi32(*x, _mm512_set1_epi32(xv), dv);
            }
        }
        let c = _mm512_loadu_si512(corr as *const __m512i);
        for (r, x) in acc.iter().enumerate().take(rows) {
            _mm512_mask_storeu_epi32(out.add(r * ldo), mask, _mm512_sub_epi32(*x, c));
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
