//! Tile bitmaps and how a dirty region travels through a layer.
//!
//! A feature map of `h × w` pixels is cut into square tiles of `tile` pixels (the last row/column of
//! tiles may be partial); a [`TileMap`] holds one "dirty" flag per tile. The input frame uses tiles of
//! the gate's patch size `p`; every layer's output uses tiles of the runner's tile size.
//!
//! Dilation: an output pixel `oy` reads input rows `oy·s − pad .. oy·s − pad + k`, so a dirty input row
//! range `a..b` reaches exactly the output rows whose window touches it ([`window_span`]) — a halo of
//! about `k/s` rows, shrinking with the stride. [`dilate`] maps every horizontal run of dirty input tiles
//! this way and marks the output tiles the result touches.

use crate::error::{Error, Result};
use crate::nn::Window2d;

/// One flag per `tile × tile` tile of an `h × w` map, stored as bits (64 tiles of a row per word), so
/// counting, scanning for runs and marking rectangles cost per word, not per tile.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TileMap {
    h: usize,
    w: usize,
    tile: usize,
    rows: usize,
    cols: usize,
    /// words per tile row
    wpr: usize,
    bits: Vec<u64>,
}

/// Bits `a..b` (`a < b ≤ 64`) of a word.
#[inline]
fn word_mask(a: usize, b: usize) -> u64 {
    let hi = if b >= 64 { u64::MAX } else { (1u64 << b) - 1 };
    hi & !((1u64 << a) - 1)
}

impl TileMap {
    /// An all-clean map. `tile` must be positive.
    pub fn new(h: usize, w: usize, tile: usize) -> Result<Self> {
        if tile == 0 {
            return Err(Error::invalid("tile", "must be positive, got 0"));
        }
        let (rows, cols) = (h.div_ceil(tile), w.div_ceil(tile));
        let wpr = cols.div_ceil(64);
        Ok(TileMap {
            h,
            w,
            tile,
            rows,
            cols,
            wpr,
            bits: vec![0; rows * wpr],
        })
    }
    pub fn height(&self) -> usize {
        self.h
    }
    pub fn width(&self) -> usize {
        self.w
    }
    pub fn tile(&self) -> usize {
        self.tile
    }
    /// Tiles per column and per row: `(ceil(h/tile), ceil(w/tile))`.
    pub fn grid(&self) -> (usize, usize) {
        (self.rows, self.cols)
    }
    pub fn get(&self, r: usize, c: usize) -> bool {
        r < self.rows && c < self.cols && (self.bits[r * self.wpr + c / 64] >> (c % 64)) & 1 == 1
    }
    pub fn set(&mut self, r: usize, c: usize) {
        if r < self.rows && c < self.cols {
            self.bits[r * self.wpr + c / 64] |= 1u64 << (c % 64);
        }
    }
    pub fn fill(&mut self, v: bool) {
        self.bits.fill(0);
        if v {
            for r in 0..self.rows {
                self.set_cols(r, 0, self.cols);
            }
        }
    }
    /// Sets tiles `c0..c1` (`c0 < c1 ≤ cols`) of tile row `r`.
    fn set_cols(&mut self, r: usize, c0: usize, c1: usize) {
        let row = &mut self.bits[r * self.wpr..(r + 1) * self.wpr];
        let (w0, w1) = (c0 / 64, (c1 - 1) / 64);
        for (k, word) in row.iter_mut().enumerate().take(w1 + 1).skip(w0) {
            let a = if k == w0 { c0 % 64 } else { 0 };
            let b = if k == w1 { (c1 - 1) % 64 + 1 } else { 64 };
            *word |= word_mask(a, b);
        }
    }
    /// Marks every tile that is dirty in `other` too (a map of the same size and tiles).
    pub fn union_with(&mut self, other: &TileMap) {
        debug_assert_eq!((self.h, self.w, self.tile), (other.h, other.w, other.tile));
        for (a, &b) in self.bits.iter_mut().zip(&other.bits) {
            *a |= b;
        }
    }
    /// Number of dirty tiles.
    pub fn count(&self) -> usize {
        self.bits.iter().map(|w| w.count_ones() as usize).sum()
    }
    /// Dirty tiles over all tiles (0 for an empty map).
    pub fn fraction(&self) -> f64 {
        let n = self.rows * self.cols;
        if n == 0 {
            0.0
        } else {
            self.count() as f64 / n as f64
        }
    }
    /// Pixels covered by dirty tiles (partial tiles count their real size).
    pub fn dirty_pixels(&self) -> usize {
        self.runs()
            .iter()
            .map(|&(r, c0, c1)| {
                let (y0, y1, x0, x1) = self.run_rect(r, c0, c1);
                (y1 - y0) * (x1 - x0)
            })
            .sum()
    }
    /// Pixel rectangle `(y0, y1, x0, x1)` (half-open, clipped to the map) of tiles `c0..c1` in tile row `r`.
    pub fn run_rect(&self, r: usize, c0: usize, c1: usize) -> (usize, usize, usize, usize) {
        let t = self.tile;
        (
            (r * t).min(self.h),
            ((r + 1) * t).min(self.h),
            (c0 * t).min(self.w),
            (c1 * t).min(self.w),
        )
    }
    /// Marks every tile that the pixel rectangle `y0..y1 × x0..x1` touches (empty rectangles mark nothing).
    pub fn mark_rect(&mut self, y0: usize, y1: usize, x0: usize, x1: usize) {
        let (y1, x1) = (y1.min(self.h), x1.min(self.w));
        if y0 >= y1 || x0 >= x1 {
            return;
        }
        let t = self.tile;
        for r in y0 / t..=(y1 - 1) / t {
            self.set_cols(r, x0 / t, (x1 - 1) / t + 1);
        }
    }
    /// Calls `f(c0, c1)` for each maximal run of dirty tiles `c0..c1` of tile row `r`, left to right,
    /// skipping clean words whole.
    fn row_runs(&self, r: usize, mut f: impl FnMut(usize, usize)) {
        let row = &self.bits[r * self.wpr..(r + 1) * self.wpr];
        let mut open: Option<usize> = None;
        for (k, &word) in row.iter().enumerate() {
            let base = k * 64;
            let mut pos = 0usize;
            while pos < 64 {
                let rest = word >> pos;
                match open {
                    None => {
                        if rest == 0 {
                            break;
                        }
                        pos += rest.trailing_zeros() as usize;
                        open = Some(base + pos);
                    }
                    Some(c0) => {
                        let ones = (!rest).trailing_zeros() as usize; // 64 - pos at most
                        let ones = ones.min(64 - pos);
                        pos += ones;
                        if pos < 64 {
                            f(c0, base + pos);
                            open = None;
                        }
                    }
                }
            }
        }
        if let Some(c0) = open {
            f(c0, self.cols);
        }
    }
    /// Maximal horizontal runs of dirty tiles as `(row, c0, c1)` (tiles `c0..c1`), row-major order.
    pub fn runs(&self) -> Vec<(usize, usize, usize)> {
        let mut out = Vec::new();
        for r in 0..self.rows {
            self.row_runs(r, |c0, c1| out.push((r, c0, c1)));
        }
        out
    }
    /// The dirty area as disjoint pixel rectangles `(y0, y1, x0, x1)`: the horizontal runs of each tile
    /// row, each merged with the run of the row above when both span the same columns (fewer, taller
    /// rectangles: less halo to gather per recomputed pixel).
    pub fn rects(&self) -> Vec<(usize, usize, usize, usize)> {
        let mut out: Vec<(usize, usize, usize, usize)> = Vec::new();
        // runs of the previous tile row as (c0, c1, index into out), sorted by c0
        let mut open: Vec<(usize, usize, usize)> = Vec::new();
        let mut next: Vec<(usize, usize, usize)> = Vec::new();
        for r in 0..self.rows {
            let mut j = 0; // cursor into `open`
            self.row_runs(r, |c0, c| {
                while j < open.len() && open[j].0 < c0 {
                    j += 1;
                }
                let (y0, y1, x0, x1) = self.run_rect(r, c0, c);
                match open.get(j) {
                    Some(&(a, b, i)) if a == c0 && b == c => {
                        out[i].1 = y1;
                        next.push((c0, c, i));
                    }
                    _ => {
                        out.push((y0, y1, x0, x1));
                        next.push((c0, c, out.len() - 1));
                    }
                }
            });
            std::mem::swap(&mut open, &mut next);
            next.clear();
        }
        out
    }
}

/// Output indices `lo..hi` (clipped to `0..out_len`) whose window (`k` taps, stride `s`, padding `p`)
/// touches input indices `a..b`: `oy·s − p ≤ b − 1` and `oy·s − p + k − 1 ≥ a`. Empty as `(x, x)`.
pub fn window_span(
    a: usize,
    b: usize,
    k: usize,
    s: usize,
    p: usize,
    out_len: usize,
) -> (usize, usize) {
    if a >= b || k == 0 || s == 0 {
        return (0, 0);
    }
    let lo = (a + p).saturating_sub(k - 1).div_ceil(s);
    let hi = ((b - 1 + p) / s + 1).min(out_len);
    (lo.min(hi), hi)
}

/// The output tiles (`out_h × out_w` map, tiles of `out_tile`) that a layer with window `win` can change
/// when the dirty input tiles of `input` change.
pub fn dilate(
    input: &TileMap,
    win: Window2d,
    out_h: usize,
    out_w: usize,
    out_tile: usize,
) -> Result<TileMap> {
    let mut out = TileMap::new(out_h, out_w, out_tile)?;
    for (r, c0, c1) in input.runs() {
        let (y0, y1, x0, x1) = input.run_rect(r, c0, c1);
        let (oy0, oy1) = window_span(y0, y1, win.kernel.0, win.stride.0, win.padding.0, out_h);
        let (ox0, ox1) = window_span(x0, x1, win.kernel.1, win.stride.1, win.padding.1, out_w);
        out.mark_rect(oy0, oy1, ox0, ox1);
    }
    Ok(out)
}

/// What the gate saw in one frame.
#[derive(Clone, Debug, PartialEq)]
pub struct GateResult {
    /// The patches to recompute.
    pub map: TileMap,
    /// Σ (frame − reference)² over the patches *not* flagged: the change the caches will not see.
    pub skipped_sq: f64,
    /// Σ frame².
    pub frame_sq: f64,
}

impl GateResult {
    /// Relative L2 distance between the frame and the input the caches represent once the flagged
    /// patches are refreshed: `sqrt(skipped_sq / frame_sq)` (0 for an all-zero frame with no change).
    pub fn estimated_error(&self) -> f64 {
        if self.frame_sq > 0.0 {
            (self.skipped_sq / self.frame_sq).sqrt()
        } else if self.skipped_sq > 0.0 {
            f64::INFINITY
        } else {
            0.0
        }
    }
}

/// The change gate: flags each `patch × patch` patch of a `(c, h, w)` frame whose largest absolute
/// difference to `reference` over all channels exceeds `threshold` (NaN differences count as changed).
/// With `threshold = 0` any change at all flags the patch. Also sums the squared change of the patches
/// it leaves alone (the drift estimate, see [`GateResult`]).
pub fn gate(
    frame: &[f32],
    reference: &[f32],
    shape: [usize; 3],
    patch: usize,
    threshold: f32,
) -> Result<GateResult> {
    let [c, h, w] = shape;
    let n = c * h * w;
    if frame.len() != n || reference.len() != n {
        return Err(Error::invalid(
            "frame",
            format!(
                "expected {n} values for shape {shape:?}, got {} (reference {})",
                frame.len(),
                reference.len()
            ),
        ));
    }
    let mut map = TileMap::new(h, w, patch)?;
    let cols = map.cols;
    let mut score = vec![0.0f32; map.rows * cols];
    let mut energy = vec![0.0f64; map.rows * cols];
    let mut frame_sq = 0.0f64;
    for ch in 0..c {
        for y in 0..h {
            let base = (ch * h + y) * w;
            let (fr, rr) = (&frame[base..base + w], &reference[base..base + w]);
            let srow = (y / patch) * cols;
            let mut row_sq = 0.0f64;
            for (pc, (fs, rs)) in fr.chunks(patch).zip(rr.chunks(patch)).enumerate() {
                let (m, e, sq) = segment_scores(fs, rs);
                let s = &mut score[srow + pc];
                *s = if m > *s || m.is_nan() { m } else { *s };
                energy[srow + pc] += e as f64;
                row_sq += sq as f64;
            }
            frame_sq += row_sq;
        }
    }
    let mut skipped_sq = 0.0f64;
    for (i, (&s, &e)) in score.iter().zip(&energy).enumerate() {
        let flagged = s.is_nan() || s > threshold;
        if flagged {
            map.set(i / cols, i % cols);
        } else {
            skipped_sq += e;
        }
    }
    Ok(GateResult {
        map,
        skipped_sq,
        frame_sq,
    })
}

/// `(max |a − b|, Σ (a − b)², Σ a²)` of one row segment of a patch, NaN-propagating in the max. Eight
/// independent lanes, so the reductions vectorise (a single float accumulator is a serial chain).
#[inline]
fn segment_scores(a: &[f32], b: &[f32]) -> (f32, f32, f32) {
    const L: usize = 8;
    let (mut m, mut e, mut sq) = ([0.0f32; L], [0.0f32; L], [0.0f32; L]);
    let mut nan = false;
    let (ac, bc) = (a.chunks_exact(L), b.chunks_exact(L));
    let (ar, br) = (ac.remainder(), bc.remainder());
    for (x, r) in ac.zip(bc) {
        for i in 0..L {
            let d = x[i] - r[i];
            nan |= d.is_nan();
            m[i] = m[i].max(d.abs());
            e[i] += d * d;
            sq[i] += x[i] * x[i];
        }
    }
    for (i, (&x, &r)) in ar.iter().zip(br).enumerate() {
        let d = x - r;
        nan |= d.is_nan();
        m[i] = m[i].max(d.abs());
        e[i] += d * d;
        sq[i] += x * x;
    }
    let mx = if nan {
        f32::NAN
    } else {
        m.iter().fold(0.0f32, |a, &v| a.max(v))
    };
    (mx, e.iter().sum(), sq.iter().sum())
}

/// The patches [`gate`] flags.
pub fn changed_patches(
    frame: &[f32],
    reference: &[f32],
    shape: [usize; 3],
    patch: usize,
    threshold: f32,
) -> Result<TileMap> {
    Ok(gate(frame, reference, shape, patch, threshold)?.map)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn brute_span(a: usize, b: usize, k: usize, s: usize, p: usize, out_len: usize) -> Vec<usize> {
        (0..out_len)
            .filter(|&o| {
                let start = (o * s) as isize - p as isize;
                (start..start + k as isize).any(|i| i >= a as isize && i < b as isize)
            })
            .collect()
    }

    #[test]
    fn window_span_matches_brute_force() {
        for k in 1usize..6 {
            for s in 1..4 {
                for p in 0..=k / 2 {
                    for len in k.saturating_sub(2 * p).max(1)..20 {
                        let out_len = (len + 2 * p - k) / s + 1;
                        for a in 0..len {
                            for b in a + 1..=len {
                                let (lo, hi) = window_span(a, b, k, s, p, out_len);
                                let want = brute_span(a, b, k, s, p, out_len);
                                assert_eq!(
                                    (lo..hi).collect::<Vec<_>>(),
                                    want,
                                    "k{k} s{s} p{p} len{len} {a}..{b}"
                                );
                            }
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn dilate_3x3_stride1_adds_one_pixel_halo() {
        let mut m = TileMap::new(32, 32, 8).unwrap();
        m.set(1, 1); // pixels 8..16
        let d = dilate(&m, Window2d::new((3, 3), (1, 1), (1, 1)), 32, 32, 4).unwrap();
        // output 7..17 touched -> 4-px tiles 1..=4
        for r in 0..8 {
            for c in 0..8 {
                assert_eq!(
                    d.get(r, c),
                    (1..=4).contains(&r) && (1..=4).contains(&c),
                    "{r},{c}"
                );
            }
        }
    }

    #[test]
    fn dilate_stride2_halves_the_region() {
        let mut m = TileMap::new(32, 32, 16).unwrap();
        m.set(1, 0); // rows 16..32, cols 0..16
        let d = dilate(&m, Window2d::new((3, 3), (2, 2), (1, 1)), 16, 16, 4).unwrap();
        // rows: o*2-1+2 >= 16 -> o >= 7.5 -> 8; o*2-1 <= 31 -> o <= 16 -> 8..16; cols 0..=8
        assert!(!d.get(1, 0) && d.get(2, 0) && d.get(3, 0));
        assert!(d.get(2, 2) && !d.get(2, 3));
        assert_eq!(d.count(), 2 * 3);
    }

    #[test]
    fn dilate_empty_stays_empty_and_partial_tiles_clip() {
        let m = TileMap::new(17, 13, 5).unwrap();
        assert_eq!(
            dilate(&m, Window2d::new((5, 5), (1, 1), (2, 2)), 17, 13, 8)
                .unwrap()
                .count(),
            0
        );
        let mut m = TileMap::new(17, 13, 5).unwrap();
        m.set(3, 2); // pixels rows 15..17, cols 10..13
        assert_eq!(m.run_rect(3, 2, 3), (15, 17, 10, 13));
        let d = dilate(&m, Window2d::new((2, 2), (2, 2), (0, 0)), 8, 6, 4).unwrap();
        // rows 7..8, cols 5..6
        assert!(d.get(1, 1));
        assert_eq!(d.count(), 1);
    }

    #[test]
    fn gate_flags_only_changed_patches() {
        let shape = [2, 10, 11];
        let r = vec![0.5f32; 220];
        let mut f = r.clone();
        assert_eq!(changed_patches(&f, &r, shape, 4, 0.0).unwrap().count(), 0);
        f[110 + 9 * 11 + 10] = 0.6; // channel 1, pixel (9, 10): last partial patch
        let m = changed_patches(&f, &r, shape, 4, 0.0).unwrap();
        assert_eq!(m.count(), 1);
        assert!(m.get(2, 2));
        assert_eq!(changed_patches(&f, &r, shape, 4, 0.2).unwrap().count(), 0);
        f[0] = f32::NAN;
        assert!(changed_patches(&f, &r, shape, 4, 10.0).unwrap().get(0, 0));
    }

    #[test]
    fn rects_cover_exactly_the_dirty_tiles_disjointly() {
        let mut m = TileMap::new(23, 30, 4).unwrap();
        for &(r, c) in &[
            (0, 1),
            (0, 2),
            (1, 1),
            (1, 2),
            (2, 1),
            (2, 5),
            (3, 5),
            (3, 6),
            (5, 7),
        ] {
            m.set(r, c);
        }
        let rects = m.rects();
        let mut cover = vec![0u8; 23 * 30];
        for &(y0, y1, x0, x1) in &rects {
            for y in y0..y1 {
                for x in x0..x1 {
                    cover[y * 30 + x] += 1;
                }
            }
        }
        for y in 0..23 {
            for x in 0..30 {
                assert_eq!(cover[y * 30 + x], m.get(y / 4, x / 4) as u8, "{y},{x}");
            }
        }
        // tiles (0..2, 1..3) merge into one rectangle; (2,5) and (3,5..7) do not
        assert!(rects.contains(&(0, 8, 4, 12)));
        assert_eq!(rects.len(), 5);
    }

    #[test]
    fn gate_sums_the_skipped_change() {
        let shape = [1, 4, 8];
        let r = vec![1.0f32; 32];
        let mut f = r.clone();
        f[0] = 1.5; // patch (0, 0): flagged at 0.25
        f[7] = 1.1; // patch (0, 1): skipped, d = 0.1
        let g = gate(&f, &r, shape, 4, 0.25).unwrap();
        assert!(g.map.get(0, 0) && !g.map.get(0, 1));
        assert!((g.skipped_sq - 0.01).abs() < 1e-6, "{}", g.skipped_sq);
        let want = (0.01f64 / (30.0 + 1.5f64 * 1.5 + 1.1 * 1.1)).sqrt();
        assert!((g.estimated_error() - want).abs() < 1e-6);
    }
}
