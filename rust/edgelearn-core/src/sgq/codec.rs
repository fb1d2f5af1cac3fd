//! Encode (statistics → channel order → binary16 ranges → codes → frame) and decode (frame → float32).
//!
//! Encoding is two passes over the input: per (sample, channel, stripe) min/max, then quantize-and-pack.
//! Work is split into chunks of [`CHUNK`] codes (a multiple of 8, so every chunk starts on a byte of the
//! packed stream) and runs in edgelearn's rayon pool for tensors of [`PARALLEL_MIN_ELEMENTS`] or more.
//! Decoding runs per sample and, for large samples, per channel plane. The output (frame bytes or
//! float32 values) is allocated once by the caller or here, never grown.
//!
//! Stochastic rounding draws `u ∈ [0, 1)` for code index `i` (position in the code stream) as
//! `(mix64(key + (i + 1)·γ) >> 40) · 2^-24`, `key = mix64(seed ^ 0x5347_5146_5347_5146)`: the same seed
//! gives the same frame for any thread count.

use half::f16;
use rayon::prelude::*;

use super::bitpack;
use super::frame::{self, block_elements, Frame, Header, HEADER_LEN};
use super::layout::{default_stripe_rows, for_each_run, Grid, Shape};
use super::order;
use super::{Mode, RangeScope, Settings, F16_MAX, MAX_ELEMENTS, MAX_EXPANSION};
use crate::error::{Error, Result};
use crate::quant::{Clip, Rounding};
use crate::threads;

/// Below this many elements everything runs on the caller's thread.
pub const PARALLEL_MIN_ELEMENTS: usize = 1 << 16;
/// Codes per work unit of the quantize-and-pack pass (multiple of 8).
const CHUNK: usize = 1 << 14;
/// Codes unpacked at a time when decoding.
const DECODE_BLOCK: usize = 2048;
const LANES: usize = 8;

fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

const GOLDEN_GAMMA: u64 = 0x9E37_79B9_7F4A_7C15;

fn stream_key(seed: u64) -> u64 {
    mix64(seed ^ 0x5347_5146_5347_5146)
}

#[inline(always)]
fn uniform(key: u64, index: usize) -> f32 {
    let z = mix64(key.wrapping_add((index as u64).wrapping_add(1).wrapping_mul(GOLDEN_GAMMA)));
    (z >> 40) as f32 * (1.0 / (1u32 << 24) as f32)
}

/// binary16 at or below `v` (`|v| ≤ 65504`).
fn f16_down(v: f32) -> f16 {
    let h = f16::from_f32(v);
    if h.to_f32() <= v {
        return h;
    }
    let b = h.to_bits();
    f16::from_bits(if b & 0x7fff == 0 {
        0x8001
    } else if b & 0x8000 == 0 {
        b - 1
    } else {
        b + 1
    })
}

/// binary16 at or above `v` (`|v| ≤ 65504`).
fn f16_up(v: f32) -> f16 {
    let h = f16::from_f32(v);
    if h.to_f32() >= v {
        return h;
    }
    let b = h.to_bits();
    f16::from_bits(if b & 0x7fff == 0 {
        0x0001
    } else if b & 0x8000 == 0 {
        b + 1
    } else {
        b - 1
    })
}

/// Min, max, and "holds a value that is non-finite or beyond binary16's range".
#[allow(clippy::eq_op)] // `v - v` is the finiteness test, on purpose
fn scan(xs: &[f32]) -> (f32, f32, bool) {
    let mut mn = [f32::INFINITY; LANES];
    let mut mx = [f32::NEG_INFINITY; LANES];
    let mut nan = [0f32; LANES];
    let chunks = xs.chunks_exact(LANES);
    let rest = chunks.remainder();
    for c in chunks {
        for l in 0..LANES {
            let v = c[l];
            mn[l] = if v < mn[l] { v } else { mn[l] };
            mx[l] = if v > mx[l] { v } else { mx[l] };
            nan[l] += v - v;
        }
    }
    for (l, &v) in rest.iter().enumerate() {
        mn[l] = if v < mn[l] { v } else { mn[l] };
        mx[l] = if v > mx[l] { v } else { mx[l] };
        nan[l] += v - v;
    }
    let (mut a, mut b, mut bad) = (f32::INFINITY, f32::NEG_INFINITY, false);
    for l in 0..LANES {
        a = a.min(mn[l]);
        b = b.max(mx[l]);
        bad |= nan[l] != 0.0;
    }
    (a, b, bad || a < -F16_MAX || b > F16_MAX)
}

/// The precise error for a tensor `scan` flagged.
fn value_error(x: &[f32]) -> Error {
    for (i, &v) in x.iter().enumerate() {
        if !v.is_finite() {
            return Error::NonFinite { arg: "x", index: i };
        }
        if v.abs() > F16_MAX {
            return Error::invalid(
                "x",
                format!("value {v} at index {i} is beyond the binary16 range ±{F16_MAX} the frame stores"),
            );
        }
    }
    Error::invalid("x", "holds a value that cannot be encoded")
}

fn maybe_parallel(n: usize) -> bool {
    n >= PARALLEL_MIN_ELEMENTS && threads::num_threads() > 1
}

/// Per (sample, channel, stripe of `rows` rows) min/max, `stripes` per plane, in (n, c, stripe) order.
fn plane_stats(x: &[f32], shape: Shape, rows: usize, stripes: usize) -> Result<Vec<(f32, f32)>> {
    let plane = shape.plane();
    let stripe_len = rows * shape.w;
    let mut stats = vec![(0f32, 0f32); shape.n * shape.c * stripes];
    let one = |(i, st): (usize, &mut [(f32, f32)])| -> bool {
        let xs = &x[i * plane..(i + 1) * plane];
        let mut bad = false;
        for (s, slot) in st.iter_mut().enumerate() {
            let seg = &xs[s * stripe_len..((s + 1) * stripe_len).min(plane)];
            let (mn, mx, b) = scan(seg);
            *slot = (mn, mx);
            bad |= b;
        }
        bad
    };
    let bad = if maybe_parallel(x.len()) {
        threads::install(|| {
            stats
                .par_chunks_mut(stripes)
                .enumerate()
                .with_min_len(8)
                .map(one)
                .reduce(|| false, |a, b| a | b)
        })
    } else {
        stats
            .chunks_mut(stripes)
            .enumerate()
            .map(one)
            .fold(false, |a, b| a | b)
    };
    if bad {
        return Err(value_error(x));
    }
    Ok(stats)
}

/// Per (sample, channel, stripe) `(sum, sum of squares)` in f64, in the order of [`plane_stats`] (for
/// sigma clipping; the values were checked finite by [`plane_stats`]).
fn plane_moments(x: &[f32], shape: Shape, rows: usize, stripes: usize) -> Vec<(f64, f64)> {
    let plane = shape.plane();
    let stripe_len = rows * shape.w;
    let mut out = vec![(0f64, 0f64); shape.n * shape.c * stripes];
    let one = |(i, st): (usize, &mut [(f64, f64)])| {
        let xs = &x[i * plane..(i + 1) * plane];
        for (s, slot) in st.iter_mut().enumerate() {
            let seg = &xs[s * stripe_len..((s + 1) * stripe_len).min(plane)];
            let mut acc = [(0f64, 0f64); LANES];
            let chunks = seg.chunks_exact(LANES);
            let rest = chunks.remainder();
            for c in chunks {
                for l in 0..LANES {
                    let v = c[l] as f64;
                    acc[l].0 += v;
                    acc[l].1 += v * v;
                }
            }
            for (l, &v) in rest.iter().enumerate() {
                acc[l].0 += v as f64;
                acc[l].1 += v as f64 * v as f64;
            }
            *slot = acc
                .iter()
                .fold((0.0, 0.0), |a, &(s1, s2)| (a.0 + s1, a.1 + s2));
        }
    };
    if maybe_parallel(x.len()) {
        threads::install(|| {
            out.par_chunks_mut(stripes)
                .enumerate()
                .with_min_len(8)
                .for_each(one)
        });
    } else {
        out.chunks_mut(stripes).enumerate().for_each(one);
    }
    out
}

/// A block's range `[mn, mx]` narrowed by `clip`; `moments` is the block's `(sum, sum of squares,
/// count)` (used by sigma clipping only). The result stays within `[mn, mx]` with `lo <= hi`.
fn clipped_range(mn: f32, mx: f32, clip: Clip, moments: (f64, f64, usize)) -> (f32, f32) {
    let (lo, hi) = match clip {
        Clip::None => return (mn, mx),
        Clip::MinMax { kappa } => ((mn as f64 * kappa) as f32, (mx as f64 * kappa) as f32),
        Clip::Sigma { z } => {
            let (sum, sq, count) = moments;
            let n = count.max(1) as f64;
            let mean = sum / n;
            let sd = (sq / n - mean * mean).max(0.0).sqrt();
            ((mean - z * sd) as f32, (mean + z * sd) as f32)
        }
    };
    let lo = lo.clamp(mn, mx);
    (lo, hi.clamp(lo, mx))
}

/// Per-channel `(min, max)` over the whole tensor from plane statistics.
fn channel_ranges(stats: &[(f32, f32)], shape: Shape, stripes: usize) -> Vec<(f32, f32)> {
    let mut out = vec![(f32::INFINITY, f32::NEG_INFINITY); shape.c];
    for (i, st) in stats.chunks(stripes).enumerate() {
        let slot = &mut out[i % shape.c];
        for &(mn, mx) in st {
            slot.0 = slot.0.min(mn);
            slot.1 = slot.1.max(mx);
        }
    }
    out
}

fn check_shape(x_len: usize, shape: Shape, ndim: u8) -> Result<usize> {
    let dims = [shape.n, shape.c, shape.h, shape.w];
    if dims.contains(&0) {
        return Err(Error::invalid(
            "x",
            format!("shape {dims:?} has no elements; SGQ frames hold at least one"),
        ));
    }
    if dims.iter().any(|&d| d > u32::MAX as usize) {
        return Err(Error::invalid(
            "x",
            format!("shape {dims:?} has a dimension beyond 2^32 - 1"),
        ));
    }
    let elements = shape.elements("x")?;
    if elements > MAX_ELEMENTS {
        return Err(Error::invalid(
            "x",
            format!("{elements} elements exceed the frame limit of {MAX_ELEMENTS}"),
        ));
    }
    if x_len != elements {
        return Err(Error::invalid(
            "x",
            format!("has {x_len} elements, shape {dims:?} needs {elements}"),
        ));
    }
    match ndim {
        2 if shape.h == 1 && shape.w == 1 => {}
        3 if shape.w == 1 => {}
        4 => {}
        _ => {
            return Err(Error::invalid(
                "ndim",
                format!("{ndim} does not fit shape {dims:?} (2: H = W = 1, 3: W = 1, or 4)"),
            ))
        }
    }
    Ok(elements)
}

/// The channel order SGQ would pick for `x` (entry `p` = source channel at position `p`).
pub fn channel_order(x: &[f32], shape: Shape) -> Result<Vec<u32>> {
    check_shape(x.len(), shape, 4)?;
    let stats = plane_stats(x, shape, shape.h, 1)?;
    Ok(order::order_from_ranges(&channel_ranges(&stats, shape, 1)))
}

/// Everything decided before the codes are written: header, channel order and ranges. Build it with
/// [`Plan::new`], allocate [`Plan::frame_len`] bytes, then [`Plan::write`].
#[derive(Clone, Debug)]
pub struct Plan {
    header: Header,
    grid: Grid,
    order: Vec<u32>,
    ranges: Vec<(f16, f16)>,
    rounding: Rounding,
    /// Per (sample, group, stripe) block: constant (one code)? Empty without a constant-block map.
    constant: Vec<bool>,
    /// Codes in the stream (the elements, less what constant blocks save).
    codes: usize,
}

impl Plan {
    /// Validates the arguments and computes the ranges. `x` is C-ordered `shape`; `ndim` (2, 3 or 4)
    /// is the caller's rank, recorded in the frame; `order` (sgq mode) fixes the channel order, `None`
    /// computes it from `x`.
    pub fn new(
        x: &[f32],
        shape: Shape,
        ndim: u8,
        settings: &Settings,
        order: Option<&[u32]>,
    ) -> Result<Plan> {
        let elements = check_shape(x.len(), shape, ndim)?;
        let mode = settings.mode;
        let bits = if mode == Mode::Fp16 {
            16
        } else {
            settings.bits
        };
        if mode != Mode::Fp16 && !(1..=8).contains(&bits) {
            return Err(Error::invalid(
                "bits",
                format!("expected 1..=8, got {bits}"),
            ));
        }
        if mode == Mode::Sgq && settings.group == 0 {
            return Err(Error::invalid(
                "group",
                "expected >= 1 channels per group, got 0",
            ));
        }
        let stochastic =
            matches!(settings.rounding, Rounding::Stochastic { .. }) && mode != Mode::Fp16;
        let rounding = if stochastic {
            settings.rounding
        } else {
            Rounding::Nearest
        };
        let grid = match mode {
            Mode::Sgq => {
                let rows = if settings.stripe_rows == 0 {
                    default_stripe_rows(shape.h)
                } else {
                    settings.stripe_rows
                };
                Grid::sgq(
                    shape,
                    settings.group,
                    rows,
                    settings.ranges == RangeScope::Sample,
                )
            }
            _ => Grid::whole(shape),
        };
        if let Some(o) = order {
            if mode != Mode::Sgq {
                return Err(Error::invalid(
                    "order",
                    format!(
                        "a channel order only applies to mode sgq, not {}",
                        mode.name()
                    ),
                ));
            }
            if o.len() != shape.c || !order::is_permutation(o) {
                return Err(Error::invalid(
                    "order",
                    format!(
                        "expected a permutation of 0..{}, got {} entries",
                        shape.c,
                        o.len()
                    ),
                ));
            }
        }
        let (stats_rows, stats_stripes) = if mode == Mode::Sgq {
            (grid.stripe_rows, grid.stripes)
        } else {
            (shape.h, 1)
        };
        if settings.clip != Clip::None && mode != Mode::Sgq {
            return Err(Error::invalid(
                "clip",
                format!(
                    "range clipping only applies to mode sgq, not {}",
                    mode.name()
                ),
            ));
        }
        settings.clip.validate()?;
        let stats = plane_stats(x, shape, stats_rows, stats_stripes)?;
        let moments = match settings.clip {
            Clip::Sigma { .. } => plane_moments(x, shape, stats_rows, stats_stripes),
            _ => Vec::new(),
        };
        let perm: Vec<u32> = match (mode, order) {
            (Mode::Sgq, Some(o)) => o.to_vec(),
            // groups of one channel: the order changes nothing, keep the identity (no bytes)
            (Mode::Sgq, None) if grid.group == 1 => (0..shape.c as u32).collect(),
            (Mode::Sgq, None) => {
                order::order_from_ranges(&channel_ranges(&stats, shape, stats_stripes))
            }
            _ => (0..shape.c as u32).collect(),
        };
        let has_permutation = !order::is_identity(&perm);
        if has_permutation && shape.c > 1 << 16 {
            return Err(Error::invalid(
                "x",
                format!("{} channels: a channel order holds at most 65536", shape.c),
            ));
        }
        let ranges: Vec<(f16, f16)> = match mode {
            Mode::Fp16 => Vec::new(),
            Mode::Uniform => {
                let (mn, mx) = stats
                    .iter()
                    .fold((f32::INFINITY, f32::NEG_INFINITY), |a, &(l, h)| {
                        (a.0.min(l), a.1.max(h))
                    });
                vec![(f16_down(mn), f16_up(mx))]
            }
            Mode::Sgq => {
                // per sample: the samples one at a time; per frame: all of them for each block
                let (sets, per_set) = if grid.per_sample {
                    (shape.n, 1)
                } else {
                    (1, shape.n)
                };
                let mut r = Vec::with_capacity(sets * grid.groups * grid.stripes);
                for set in 0..sets {
                    for k in 0..grid.groups {
                        let members = &perm[k * grid.group..((k + 1) * grid.group).min(shape.c)];
                        for s in 0..grid.stripes {
                            let (mut mn, mut mx) = (f32::INFINITY, f32::NEG_INFINITY);
                            let (mut sum, mut sq) = (0f64, 0f64);
                            for n in set * per_set..(set + 1) * per_set {
                                for &ch in members {
                                    let i = (n * shape.c + ch as usize) * grid.stripes + s;
                                    let (l, h) = stats[i];
                                    mn = mn.min(l);
                                    mx = mx.max(h);
                                    if let Some(&(s1, s2)) = moments.get(i) {
                                        sum += s1;
                                        sq += s2;
                                    }
                                }
                            }
                            let count = per_set * block_elements(shape, &grid, k, s);
                            let (lo, hi) = clipped_range(mn, mx, settings.clip, (sum, sq, count));
                            r.push((f16_down(lo), f16_up(hi)));
                        }
                    }
                }
                r
            }
        };
        // constant blocks (all values equal within one sample's block) and what they save
        let mut constant = Vec::new();
        let mut codes = elements;
        if mode == Mode::Sgq && settings.constant_blocks {
            constant.reserve(shape.n * grid.groups * grid.stripes);
            for n in 0..shape.n {
                for k in 0..grid.groups {
                    let members = &perm[k * grid.group..((k + 1) * grid.group).min(shape.c)];
                    for s in 0..grid.stripes {
                        let first = stats[(n * shape.c + members[0] as usize) * grid.stripes + s];
                        let same = members.iter().all(|&ch| {
                            let (l, h) = stats[(n * shape.c + ch as usize) * grid.stripes + s];
                            l == first.0 && h == first.0
                        });
                        constant.push(same);
                        if same {
                            codes -= block_elements(shape, &grid, k, s) - 1;
                        }
                    }
                }
            }
        }
        let map_len = constant.len().div_ceil(8);
        let mut codes_len = bitpack::packed_len(codes, bits as u32)
            .ok_or_else(|| Error::invalid("x", "too many elements"))?;
        let perm_len = if has_permutation { 2 * shape.c } else { 0 };
        let frame_len = HEADER_LEN + perm_len + 4 * ranges.len() + map_len + codes_len;
        let constant_map = !constant.is_empty()
            && elements.saturating_mul(4) <= MAX_EXPANSION.saturating_mul(frame_len);
        if !constant_map {
            // no map, or one that would make the frame expand past what decoders accept
            constant.clear();
            codes = elements;
            codes_len = bitpack::packed_len(codes, bits as u32)
                .ok_or_else(|| Error::invalid("x", "too many elements"))?;
        }
        let header = Header {
            version: frame::VERSION,
            mode,
            bits,
            stochastic,
            has_permutation,
            frame_ranges: mode == Mode::Sgq && !grid.per_sample,
            stream_order: false,
            constant_map,
            ndim,
            shape,
            group: if mode == Mode::Sgq {
                grid.group as u32
            } else {
                0
            },
            stripe_rows: if mode == Mode::Sgq {
                grid.stripe_rows as u32
            } else {
                0
            },
            permutation_len: if has_permutation {
                2 * shape.c as u32
            } else {
                0
            },
            ranges_len: u32::try_from(ranges.len() * 4 + constant.len().div_ceil(8)).map_err(
                |_| {
                    Error::invalid(
                        "x",
                        "too many (group, stripe) ranges for one frame; raise group or stripe_rows",
                    )
                },
            )?,
            codes_len: codes_len as u64,
            crc32: 0,
        };
        Ok(Plan {
            header,
            grid,
            order: perm,
            ranges,
            rounding,
            constant,
            codes,
        })
    }

    /// Leaves the channel order out of the frame when the receiver already holds it (it received it
    /// in an earlier frame of the same stream): the frame then says "stream order" and
    /// [`decode`] alone refuses it; [`decode_with_order`] decodes it given that order. No effect
    /// when the order is the identity (such frames say so and stay self-contained).
    pub fn omit_order(&mut self) {
        if self.header.has_permutation {
            self.header.has_permutation = false;
            self.header.stream_order = true;
            self.header.permutation_len = 0;
        }
    }

    /// Exact length of the frame [`Plan::write`] produces.
    pub fn frame_len(&self) -> usize {
        self.header.frame_len()
    }

    pub fn header(&self) -> &Header {
        &self.header
    }

    /// The channel order used (identity outside mode sgq).
    pub fn order(&self) -> &[u32] {
        &self.order
    }

    /// Writes the frame for `x` (the tensor the plan was made from) into `out` of [`Plan::frame_len`] bytes.
    pub fn write(&self, x: &[f32], out: &mut [u8]) -> Result<()> {
        let h = &self.header;
        let elements = h.shape.elements("x")?;
        if x.len() != elements {
            return Err(Error::invalid(
                "x",
                format!("has {} elements, the plan was made for {elements}", x.len()),
            ));
        }
        if out.len() != self.frame_len() {
            return Err(Error::invalid(
                "out",
                format!(
                    "has {} bytes, the frame needs {}",
                    out.len(),
                    self.frame_len()
                ),
            ));
        }
        h.write(&mut out[..HEADER_LEN]);
        let (perm_out, rest) = out[HEADER_LEN..].split_at_mut(h.permutation_len as usize);
        let (ranges_out, codes_out) = rest.split_at_mut(h.ranges_len as usize);
        if h.has_permutation {
            for (b, &p) in perm_out.chunks_exact_mut(2).zip(&self.order) {
                b.copy_from_slice(&(p as u16).to_le_bytes());
            }
        }
        let (ranges_out, map_out) = ranges_out.split_at_mut(4 * self.ranges.len());
        for (b, &(lo, hi)) in ranges_out.chunks_exact_mut(4).zip(&self.ranges) {
            b[..2].copy_from_slice(&lo.to_bits().to_le_bytes());
            b[2..].copy_from_slice(&hi.to_bits().to_le_bytes());
        }
        map_out.fill(0);
        for (i, _) in self.constant.iter().enumerate().filter(|(_, &c)| c) {
            map_out[i / 8] |= 1 << (i % 8);
        }
        if h.mode == Mode::Fp16 {
            write_fp16(x, codes_out);
        } else if h.constant_map {
            self.write_codes_mapped(x, codes_out);
        } else {
            self.write_codes(x, codes_out);
        }
        frame::seal(out);
        Ok(())
    }

    /// Quantization parameters per range: `(lo, (2^b − 1)/(hi − lo))`, 0 for an empty range.
    fn params(&self) -> Vec<(f32, f32)> {
        let top = ((1u32 << self.header.bits) - 1) as f32;
        self.ranges
            .iter()
            .map(|&(lo, hi)| {
                let (lo, hi) = (lo.to_f32(), hi.to_f32());
                (lo, if hi > lo { top / (hi - lo) } else { 0.0 })
            })
            .collect()
    }

    /// The codes of a frame with a constant-block map: per sample, the stream of
    /// [`write_codes`](Self::write_codes) with each constant block reduced to one code, at its
    /// first element (first channel position of the group, first row of the stripe). The codes are
    /// computed per sample (in parallel for large tensors) into one byte each, then packed.
    fn write_codes_mapped(&self, x: &[f32], codes_out: &mut [u8]) {
        let h = &self.header;
        let (shape, bits, grid) = (h.shape, h.bits as u32, &self.grid);
        let top = ((1u32 << bits) - 1) as f32;
        let params = self.params();
        let plane = shape.plane();
        let key = match self.rounding {
            Rounding::Stochastic { seed } => Some(stream_key(seed)),
            Rounding::Nearest => None,
        };
        let per_sample = |n: usize| -> usize {
            let blocks = &self.constant[n * grid.groups * grid.stripes..];
            let mut count = 0;
            for k in 0..grid.groups {
                for s in 0..grid.stripes {
                    count += if blocks[k * grid.stripes + s] {
                        1
                    } else {
                        block_elements(shape, grid, k, s)
                    };
                }
            }
            count
        };
        let mut starts = Vec::with_capacity(shape.n + 1);
        starts.push(0usize);
        for n in 0..shape.n {
            starts.push(starts[n] + per_sample(n));
        }
        let mut q = vec![0u8; self.codes];
        let mut slices = Vec::with_capacity(shape.n);
        let mut rest = q.as_mut_slice();
        for n in 0..shape.n {
            let (a, b) = rest.split_at_mut(starts[n + 1] - starts[n]);
            slices.push((n, a));
            rest = b;
        }
        let one = |(n, qs): (usize, &mut [u8])| {
            let mut at = 0;
            for p in 0..shape.c {
                let k = p / grid.group;
                let src = (n * shape.c + self.order[p] as usize) * plane;
                for s in 0..grid.stripes {
                    let row = s * grid.stripe_rows;
                    let len = grid.stripe_rows.min(shape.h - row) * shape.w;
                    let (lo, inv) = params[grid.range_index(n, p, row)];
                    let xs = if self.constant[(n * grid.groups + k) * grid.stripes + s] {
                        if p % grid.group != 0 {
                            continue;
                        }
                        &x[src + row * shape.w..src + row * shape.w + 1]
                    } else {
                        &x[src + row * shape.w..src + row * shape.w + len]
                    };
                    let out = &mut qs[at..at + xs.len()];
                    match key {
                        None => quantize_nearest(xs, out, lo, inv, top),
                        Some(key) => {
                            quantize_stochastic(xs, out, lo, inv, top, key, starts[n] + at)
                        }
                    }
                    at += xs.len();
                }
            }
        };
        let elements = shape.n * shape.c * plane;
        let chunk_bytes = CHUNK / 8 * bits as usize;
        let parallel = maybe_parallel(elements);
        if parallel {
            threads::install(|| slices.into_par_iter().for_each(one));
        } else {
            slices.into_iter().for_each(one);
        }
        let pack = |(out, qs): (&mut [u8], &[u8])| bitpack::pack(qs, bits, out);
        if parallel {
            threads::install(|| {
                codes_out
                    .par_chunks_mut(chunk_bytes)
                    .zip(q.par_chunks(CHUNK))
                    .for_each(pack)
            });
        } else {
            codes_out
                .chunks_mut(chunk_bytes)
                .zip(q.chunks(CHUNK))
                .for_each(pack);
        }
    }

    fn write_codes(&self, x: &[f32], codes_out: &mut [u8]) {
        let h = &self.header;
        let (shape, bits) = (h.shape, h.bits as u32);
        let elements = shape.n * shape.c * shape.plane();
        let top = ((1u32 << bits) - 1) as f32;
        let params: Vec<(f32, f32)> = self
            .ranges
            .iter()
            .map(|&(lo, hi)| {
                let (lo, hi) = (lo.to_f32(), hi.to_f32());
                (lo, if hi > lo { top / (hi - lo) } else { 0.0 })
            })
            .collect();
        let plane = shape.plane();
        let key = match self.rounding {
            Rounding::Stochastic { seed } => Some(stream_key(seed)),
            Rounding::Nearest => None,
        };
        let chunk_bytes = CHUNK / 8 * bits as usize;
        let one = |(k, out): (usize, &mut [u8])| {
            let start = k * CHUNK;
            let end = (start + CHUNK).min(elements);
            let mut buf = [0u8; CHUNK];
            for_each_run(shape, &self.grid, start, end, |r| {
                let src0 = (r.n * shape.c + self.order[r.p] as usize) * plane + r.hw;
                let xs = &x[src0..src0 + r.len];
                let qs = &mut buf[r.pos - start..r.pos - start + r.len];
                let (lo, inv) = params[r.range];
                match key {
                    None => quantize_nearest(xs, qs, lo, inv, top),
                    Some(key) => quantize_stochastic(xs, qs, lo, inv, top, key, r.pos),
                }
            });
            bitpack::pack(&buf[..end - start], bits, out);
        };
        if maybe_parallel(elements) {
            threads::install(|| {
                codes_out
                    .par_chunks_mut(chunk_bytes)
                    .enumerate()
                    .for_each(one)
            });
        } else {
            codes_out.chunks_mut(chunk_bytes).enumerate().for_each(one);
        }
    }
}

#[inline(always)]
fn quantize_nearest(xs: &[f32], qs: &mut [u8], lo: f32, inv: f32, top: f32) {
    for (q, &x) in qs.iter_mut().zip(xs) {
        // x >= lo, so t >= 0.5 and the truncating cast is floor(t): round half up
        *q = ((x - lo) * inv + 0.5).min(top) as u8;
    }
}

#[inline(always)]
fn quantize_stochastic(
    xs: &[f32],
    qs: &mut [u8],
    lo: f32,
    inv: f32,
    top: f32,
    key: u64,
    pos: usize,
) {
    for (j, (q, &x)) in qs.iter_mut().zip(xs).enumerate() {
        *q = ((x - lo) * inv + uniform(key, pos + j)).min(top) as u8;
    }
}

fn write_fp16(x: &[f32], out: &mut [u8]) {
    let one = |(xs, o): (&[f32], &mut [u8])| {
        for (&v, b) in xs.iter().zip(o.chunks_exact_mut(2)) {
            b.copy_from_slice(&f16::from_f32(v).to_bits().to_le_bytes());
        }
    };
    if maybe_parallel(x.len()) {
        threads::install(|| {
            x.par_chunks(CHUNK)
                .zip(out.par_chunks_mut(2 * CHUNK))
                .for_each(one)
        });
    } else {
        x.chunks(CHUNK).zip(out.chunks_mut(2 * CHUNK)).for_each(one);
    }
}

/// Encodes `x` (C-ordered `shape`, caller rank `ndim`) into a new frame.
pub fn encode(
    x: &[f32],
    shape: Shape,
    ndim: u8,
    settings: &Settings,
    order: Option<&[u32]>,
) -> Result<Vec<u8>> {
    let plan = Plan::new(x, shape, ndim, settings, order)?;
    let mut out = vec![0u8; plan.frame_len()];
    plan.write(x, &mut out)?;
    Ok(out)
}

/// Decodes a self-contained frame into a new float32 vector (C-ordered `header.shape`); a frame that
/// uses its stream's channel order is refused ([`decode_with_order`] takes that order).
pub fn decode(bytes: &[u8]) -> Result<(Header, Vec<f32>)> {
    decode_with_order(bytes, None)
}

/// Like [`decode`]; `stream_order` is the channel order a frame flagged "stream order" uses (the last
/// one its stream sent), ignored for self-contained frames.
pub fn decode_with_order(bytes: &[u8], stream_order: Option<&[u32]>) -> Result<(Header, Vec<f32>)> {
    let frame = frame::parse(bytes)?;
    let order = frame.order(stream_order)?;
    let mut out = crate::alloc::try_vec("frame", frame.header.shape.elements("frame")?, 0f32)?;
    decode_into(&frame, &order, &mut out)?;
    Ok((frame.header, out))
}

/// Decodes a parsed frame into `out` (exactly N·C·H·W elements); `order` is the frame's channel order,
/// from [`Frame::order`].
pub fn decode_into(frame: &Frame<'_>, order: &[u32], out: &mut [f32]) -> Result<()> {
    let h = &frame.header;
    let shape = h.shape;
    let elements = shape.elements("frame")?;
    if out.len() != elements {
        return Err(Error::invalid(
            "out",
            format!("has {} elements, the frame holds {elements}", out.len()),
        ));
    }
    if h.mode == Mode::Fp16 {
        // The encoder refuses non-finite values, so a payload holding one (all-ones exponent) is not a
        // frame it wrote.
        if let Some(i) = frame
            .codes
            .chunks_exact(2)
            .position(|b| u16::from_le_bytes([b[0], b[1]]) & 0x7c00 == 0x7c00)
        {
            return Err(Error::frame(format!(
                "the fp16 payload holds a NaN or infinity at element {i} (encoders refuse non-finite values)"
            )));
        }
        let one = |(b, o): (&[u8], &mut [f32])| {
            for (bb, v) in b.chunks_exact(2).zip(o.iter_mut()) {
                *v = f16::from_bits(u16::from_le_bytes([bb[0], bb[1]])).to_f32();
            }
        };
        if maybe_parallel(elements) {
            threads::install(|| {
                frame
                    .codes
                    .par_chunks(2 * CHUNK)
                    .zip(out.par_chunks_mut(CHUNK))
                    .for_each(one)
            });
        } else {
            frame
                .codes
                .chunks(2 * CHUNK)
                .zip(out.chunks_mut(CHUNK))
                .for_each(one);
        }
        return Ok(());
    }
    let bits = h.bits as u32;
    let top = ((1u32 << bits) - 1) as f32;
    let params: Vec<(f32, f32)> = frame
        .ranges_f32()
        .into_iter()
        .map(|(lo, hi)| (lo, (hi - lo) / top))
        .collect();
    if order.len() != shape.c || !order::is_permutation(order) {
        return Err(Error::invalid(
            "order",
            format!(
                "expected a permutation of 0..{}, got {} entries",
                shape.c,
                order.len()
            ),
        ));
    }
    let grid = h.grid();
    if h.constant_map {
        decode_mapped(frame, order, &params, out);
        return Ok(());
    }
    let plane = shape.plane();
    let sample = shape.c * plane;
    let stripe_len = grid.stripe_rows * shape.w;
    let codes = frame.codes;
    // One channel plane: code stream position (n, p) into `dst` (source channel order[p]).
    let decode_plane = |n: usize, p: usize, dst: &mut [f32]| {
        let first = (n * shape.c + p) * plane;
        let mut buf = [0u8; DECODE_BLOCK];
        let mut hw = 0;
        while hw < plane {
            let seg_end = if grid.per_block {
                ((hw / stripe_len + 1) * stripe_len).min(plane)
            } else {
                plane
            };
            let (lo, step) = params[grid.range_index(n, p, hw / shape.w)];
            while hw < seg_end {
                let len = (seg_end - hw).min(DECODE_BLOCK);
                let q = &mut buf[..len];
                bitpack::unpack(codes, bits, first + hw, q);
                for (o, &c) in dst[hw..hw + len].iter_mut().zip(q.iter()) {
                    *o = lo + c as f32 * step;
                }
                hw += len;
            }
        }
    };
    let decode_sample = |(n, dst): (usize, &mut [f32])| {
        if maybe_parallel(sample) && shape.c > 1 {
            let mut slots: Vec<Option<&mut [f32]>> = dst.chunks_mut(plane).map(Some).collect();
            let by_pos: Vec<(usize, &mut [f32])> = order
                .iter()
                .enumerate()
                .filter_map(|(p, &ch)| slots.get_mut(ch as usize)?.take().map(|s| (p, s)))
                .collect();
            by_pos
                .into_par_iter()
                .for_each(|(p, s)| decode_plane(n, p, s));
        } else {
            for (p, &ch) in order.iter().enumerate() {
                let ch = ch as usize;
                decode_plane(n, p, &mut dst[ch * plane..(ch + 1) * plane]);
            }
        }
    };
    if maybe_parallel(elements) {
        threads::install(|| {
            out.par_chunks_mut(sample)
                .enumerate()
                .for_each(decode_sample)
        });
    } else {
        out.chunks_mut(sample).enumerate().for_each(decode_sample);
    }
    Ok(())
}

/// Decodes a frame with a constant-block map (see [`Plan::write_codes_mapped`]), per sample.
fn decode_mapped(frame: &Frame<'_>, order: &[u32], params: &[(f32, f32)], out: &mut [f32]) {
    let h = &frame.header;
    let (shape, bits, grid) = (h.shape, h.bits as u32, h.grid());
    let plane = shape.plane();
    let sample = shape.c * plane;
    let blocks = grid.groups * grid.stripes;
    // where each sample's codes start (N + 1 entries; N ≤ 8 × the map's bytes)
    let mut starts = Vec::with_capacity(shape.n + 1);
    starts.push(0usize);
    for n in 0..shape.n {
        let mut count = 0;
        for k in 0..grid.groups {
            for s in 0..grid.stripes {
                count += if frame.is_constant(n * blocks + k * grid.stripes + s) {
                    1
                } else {
                    block_elements(shape, &grid, k, s)
                };
            }
        }
        starts.push(starts[n] + count);
    }
    let one = |(n, dst): (usize, &mut [f32])| {
        let mut at = starts[n];
        let mut buf = [0u8; DECODE_BLOCK];
        // the value of each constant block of this sample, read at its group's first position
        let mut values = vec![0f32; blocks];
        for (p, &ch) in order.iter().enumerate() {
            let k = p / grid.group;
            let plane_out = &mut dst[ch as usize * plane..(ch as usize + 1) * plane];
            for s in 0..grid.stripes {
                let row = s * grid.stripe_rows;
                let seg = &mut plane_out
                    [row * shape.w..(row + grid.stripe_rows.min(shape.h - row)) * shape.w];
                let (lo, step) = params[grid.range_index(n, p, row)];
                let b = k * grid.stripes + s;
                if frame.is_constant(n * blocks + b) {
                    if p % grid.group == 0 {
                        bitpack::unpack(frame.codes, bits, at, &mut buf[..1]);
                        values[b] = lo + buf[0] as f32 * step;
                        at += 1;
                    }
                    seg.fill(values[b]);
                    continue;
                }
                for part in seg.chunks_mut(DECODE_BLOCK) {
                    let q = &mut buf[..part.len()];
                    bitpack::unpack(frame.codes, bits, at, q);
                    for (o, &c) in part.iter_mut().zip(q.iter()) {
                        *o = lo + c as f32 * step;
                    }
                    at += part.len();
                }
            }
        }
    };
    if maybe_parallel(out.len()) {
        threads::install(|| out.par_chunks_mut(sample).enumerate().for_each(one));
    } else {
        out.chunks_mut(sample).enumerate().for_each(one);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn f16_rounding_is_outward() {
        for v in [
            0.1f32, -0.1, 1e-9, -1e-9, 0.0, 3.14159, -65504.0, 65504.0, 1234.567, -7e-6,
        ] {
            assert!(f16_down(v).to_f32() <= v, "{v}");
            assert!(f16_up(v).to_f32() >= v, "{v}");
            assert!(f16_down(v).to_f32().is_finite() && f16_up(v).to_f32().is_finite());
        }
    }

    #[test]
    fn constant_tensor_decodes_exactly() {
        let x = vec![0.5f32; 2 * 3 * 4 * 5];
        let shape = Shape {
            n: 2,
            c: 3,
            h: 4,
            w: 5,
        };
        let f = encode(&x, shape, 4, &Settings::default(), None).unwrap();
        assert_eq!(decode(&f).unwrap().1, x);
    }

    #[test]
    fn rejects_values_beyond_binary16() {
        let shape = Shape {
            n: 1,
            c: 1,
            h: 1,
            w: 2,
        };
        for bad in [f32::NAN, f32::INFINITY, 70000.0] {
            assert!(encode(&[0.0, bad], shape, 4, &Settings::default(), None).is_err());
        }
    }
}
