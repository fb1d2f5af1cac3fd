//! uint8 video frames as the model's input, and the change gate on them.
//!
//! A decoded frame is uint8 `(H, W, C_in)` (`C_in` = 1, 3 or 4; a fourth channel is ignored). The model
//! input is float32 `(C, H, W)`, built with exactly the arithmetic of `edgelearn.video.preprocess`:
//! `v = u / 255`; RGB to one channel as BT.601 luma `0.299·R + 0.587·G + 0.114·B`, grey to three channels
//! by repetition; then `(v − mean[c]) / std[c]` where given. [`gate_u8`] scores each patch on the bytes
//! (no float frame at all when nothing changed), and only the flagged patches are converted
//! ([`U8Input::convert_rect`]) into the float reference the caches read.

use super::region::{GateResult, TileMap};
use crate::error::{Error, Result};
use crate::threads;

/// Frames of at least this many bytes are gated on all threads (patch rows in parallel).
/// (Any size in unit tests, so that they take the parallel path.)
const GATE_PAR_MIN_BYTES: usize = if cfg!(test) { 1 } else { 1 << 16 };

/// BT.601 luma weights, as `edgelearn.video.runner.LUMA` (float32).
pub const LUMA: [f32; 3] = [0.299, 0.587, 0.114];

/// How the bytes of a pixel become the model's channels.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    /// model channel `c` = byte `c` (1 or 3 channels)
    Direct,
    /// one model channel: luma of bytes 0..3
    Luma,
    /// three model channels, each byte 0
    Repeat,
}

/// The conversion of uint8 `(H, W, C_in)` frames to the model's `(C, H, W)` input.
#[derive(Clone, Debug, PartialEq)]
pub struct U8Input {
    /// Frame shape `(H, W, C_in)`.
    pub hwc: [usize; 3],
    /// Model input shape `(C, H, W)`.
    pub chw: [usize; 3],
    mode: Mode,
    mean: Option<Vec<f32>>,
    std: Option<Vec<f32>>,
    /// model units of one grey level per model channel, `1 / (255·std[c])`
    unit: Vec<f32>,
    /// every model channel is the same affine map of one byte each (the gate's byte-wise fast path)
    uniform: bool,
}

impl U8Input {
    /// A frame of shape `hwc` fed to a model with `channels` input channels (`None`: as many as the frame
    /// has, 1 or 3), normalised by `mean`/`std` (one value per model channel) when given.
    pub fn new(
        hwc: [usize; 3],
        channels: Option<usize>,
        mean: Option<Vec<f32>>,
        std: Option<Vec<f32>>,
    ) -> Result<Self> {
        let [h, w, cin] = hwc;
        if !matches!(cin, 1 | 3 | 4) || h == 0 || w == 0 {
            return Err(Error::invalid(
                "frame",
                format!("a uint8 frame must be (H, W), (H, W, 1), (H, W, 3) or (H, W, 4) with H, W > 0, got {hwc:?}"),
            ));
        }
        let have = if cin == 1 { 1 } else { 3 };
        let c = channels.unwrap_or(have);
        let mode = match (have, c) {
            (a, b) if a == b => Mode::Direct,
            (3, 1) => Mode::Luma,
            (1, 3) => Mode::Repeat,
            _ => {
                return Err(Error::invalid(
                    "frame",
                    format!(
                    "the model takes {c} input channels; a frame with {cin} channels gives 1 or 3"
                ),
                ))
            }
        };
        for (name, v) in [("mean", &mean), ("std", &std)] {
            if let Some(v) = v {
                if v.len() != c {
                    return Err(Error::invalid(
                        name,
                        format!(
                            "expected {c} values (one per model channel), got {}",
                            v.len()
                        ),
                    ));
                }
                if v.iter().any(|x| !x.is_finite())
                    || (name == "std" && v.iter().any(|&x| x <= 0.0))
                {
                    return Err(Error::invalid(
                        name,
                        format!("values must be finite (std positive), got {v:?}"),
                    ));
                }
            }
        }
        let unit: Vec<f32> = (0..c)
            .map(|ch| 1.0 / (255.0 * std.as_ref().map_or(1.0, |s| s[ch])))
            .collect();
        let same = |v: &Option<Vec<f32>>| v.as_ref().is_none_or(|v| v.iter().all(|&x| x == v[0]));
        let uniform = mode != Mode::Luma && cin != 4 && same(&mean) && same(&std);
        Ok(U8Input {
            hwc,
            chw: [c, h, w],
            mode,
            mean,
            std,
            unit,
            uniform,
        })
    }

    /// The model channels of one pixel's bytes `px` (`C_in` of them), as `preprocess` computes them.
    #[inline]
    fn pixel(&self, px: &[u8], out: &mut [f32; 3]) {
        let v = |j: usize| px[j] as f32 / 255.0;
        match self.mode {
            Mode::Direct => {
                for (j, o) in out.iter_mut().enumerate().take(self.chw[0]) {
                    *o = v(j);
                }
            }
            Mode::Luma => out[0] = LUMA[0] * v(0) + LUMA[1] * v(1) + LUMA[2] * v(2),
            Mode::Repeat => *out = [v(0); 3],
        }
        for (ch, o) in out.iter_mut().enumerate().take(self.chw[0]) {
            if let Some(m) = &self.mean {
                *o -= m[ch];
            }
            if let Some(s) = &self.std {
                *o /= s[ch];
            }
        }
    }

    /// Writes the model input of the pixels `y0..y1 × x0..x1` of `frame` into `out (C, H, W)`.
    pub fn convert_rect(
        &self,
        frame: &[u8],
        (y0, y1, x0, x1): (usize, usize, usize, usize),
        out: &mut [f32],
    ) {
        let [h, w, cin] = self.hwc;
        let c = self.chw[0];
        if self.mode == Mode::Direct {
            // channel by channel, a row segment at a time: the arithmetic of `pixel`, without its
            // per-pixel dispatch
            for ch in 0..c {
                let m = self.mean.as_ref().map(|m| m[ch]);
                let s = self.std.as_ref().map(|s| s[ch]);
                for y in y0..y1 {
                    let src = &frame[(y * w + x0) * cin..(y * w + x1) * cin];
                    let o = (ch * h + y) * w;
                    let dst = &mut out[o + x0..o + x1];
                    match (m, s) {
                        (None, None) => {
                            for (d, p) in dst.iter_mut().zip(src.chunks_exact(cin)) {
                                *d = p[ch] as f32 / 255.0;
                            }
                        }
                        _ => {
                            for (d, p) in dst.iter_mut().zip(src.chunks_exact(cin)) {
                                let mut v = p[ch] as f32 / 255.0;
                                if let Some(m) = m {
                                    v -= m;
                                }
                                if let Some(s) = s {
                                    v /= s;
                                }
                                *d = v;
                            }
                        }
                    }
                }
            }
            return;
        }
        let mut px = [0.0f32; 3];
        for y in y0..y1 {
            let row = &frame[(y * w) * cin..(y + 1) * w * cin];
            for x in x0..x1 {
                self.pixel(&row[x * cin..x * cin + cin], &mut px);
                for (ch, &v) in px.iter().enumerate().take(c) {
                    out[(ch * h + y) * w + x] = v;
                }
            }
        }
    }

    /// `Σ x²` of the model input over the bytes of a fast-path segment, from `Σ u` and `Σ u²` over its `n`
    /// bytes: `x = (u/255 − m)/s`.
    fn sq_from_sums(&self, n: u64, s1: u64, s2: u64) -> f64 {
        let m = self.mean.as_ref().map_or(0.0, |m| m[0]) as f64;
        let s = self.std.as_ref().map_or(1.0, |s| s[0]) as f64;
        let (n, s1, s2) = (n as f64, s1 as f64, s2 as f64);
        let rep = if self.mode == Mode::Repeat { 3.0 } else { 1.0 };
        rep * (s2 / (255.0 * 255.0) - 2.0 * m * s1 / 255.0 + n * m * m) / (s * s)
    }
}

/// The change gate on uint8 frames: flags each `patch × patch` patch whose largest change of the model
/// input since `reference` (same layout as `frame`) exceeds `threshold` (`threshold = 0`: any changed
/// byte), and sums the change it lets through and the frame's energy in model units, as
/// [`super::region::gate`] does on float frames.
pub fn gate_u8(
    frame: &[u8],
    reference: &[u8],
    input: &U8Input,
    patch: usize,
    threshold: f32,
) -> Result<GateResult> {
    let [h, w, cin] = input.hwc;
    let n = h * w * cin;
    if frame.len() != n || reference.len() != n {
        return Err(Error::invalid(
            "frame",
            format!(
                "expected {n} bytes for a {:?} frame, got {} (reference {})",
                input.hwc,
                frame.len(),
                reference.len()
            ),
        ));
    }
    let mut map = TileMap::new(h, w, patch)?;
    let (rows, cols) = map.grid();
    let mut score = vec![0.0f32; rows * cols];
    let mut any = vec![false; rows * cols];
    let mut energy = vec![0.0f64; rows * cols];
    let mut frame_sq = 0.0f64;
    let seg = patch * cin;
    if input.uniform {
        let unit = input.unit[0];
        let rep = if input.mode == Mode::Repeat { 3.0 } else { 1.0 };
        // one patch row: its scores, flags and energies; returns its (Σ frame, Σ frame²)
        let patch_row = |pr: usize, (score, any, energy): (&mut [f32], &mut [bool], &mut [f64])| {
            let (mut mx, mut e) = (vec![0u8; cols], vec![0u64; cols]);
            let rows = pr * patch * w * cin..((pr + 1) * patch).min(h) * w * cin;
            let (t1, t2) = gate_rows(
                &frame[rows.clone()],
                &reference[rows],
                w * cin,
                seg,
                &mut mx,
                &mut e,
            );
            for pc in 0..cols {
                any[pc] = mx[pc] > 0;
                score[pc] = mx[pc] as f32 * unit;
                energy[pc] = rep * e[pc] as f64 * (unit as f64) * (unit as f64);
            }
            (t1, t2)
        };
        let add = |a: (u64, u64), b: (u64, u64)| (a.0 + b.0, a.1 + b.1);
        // integer sums: the same totals in any order
        let (t1, t2) = if threads::num_threads() > 1 && n >= GATE_PAR_MIN_BYTES && rows > 1 {
            let (ps, pa) = (
                threads::Pieces::new(&mut score, cols),
                threads::Pieces::new(&mut any, cols),
            );
            let pe = threads::Pieces::new(&mut energy, cols);
            let mut sums = vec![(0u64, 0u64); rows];
            let pt = threads::Pieces::new(&mut sums, 1);
            threads::run_parts(rows, |pr| {
                // SAFETY: for_each_part passes each patch row once: its pieces are borrowed once.
                let (s, a, e, t) =
                    unsafe { (ps.piece(pr), pa.piece(pr), pe.piece(pr), pt.piece(pr)) };
                t[0] = patch_row(pr, (s, a, e));
            });
            sums.into_iter().fold((0, 0), add)
        } else {
            score
                .chunks_mut(cols)
                .zip(any.chunks_mut(cols))
                .zip(energy.chunks_mut(cols))
                .enumerate()
                .map(|(pr, ((s, a), e))| patch_row(pr, (s, a, e)))
                .fold((0, 0), add)
        };
        frame_sq = input.sq_from_sums(n as u64, t1, t2);
    } else {
        let c = input.chw[0];
        let (mut pf, mut pr_) = ([0.0f32; 3], [0.0f32; 3]);
        for y in 0..h {
            let (fr, rr) = (
                &frame[y * w * cin..(y + 1) * w * cin],
                &reference[y * w * cin..(y + 1) * w * cin],
            );
            let srow = (y / patch) * cols;
            for x in 0..w {
                let (a, b) = (&fr[x * cin..x * cin + cin], &rr[x * cin..x * cin + cin]);
                input.pixel(a, &mut pf);
                let i = srow + x / patch;
                let used = if cin == 4 { 3 } else { cin };
                if a[..used] != b[..used] {
                    any[i] = true;
                    input.pixel(b, &mut pr_);
                    for ch in 0..c {
                        let d = pf[ch] - pr_[ch];
                        score[i] = score[i].max(d.abs());
                        energy[i] += (d as f64) * (d as f64);
                    }
                }
                for &v in &pf[..c] {
                    frame_sq += (v as f64) * (v as f64);
                }
            }
        }
    }
    let mut skipped_sq = 0.0f64;
    for i in 0..rows * cols {
        let flagged = if threshold == 0.0 {
            any[i]
        } else {
            score[i] > threshold
        };
        if flagged {
            let (r, c) = (i / cols, i % cols);
            map.set(r, c);
        } else {
            skipped_sq += energy[i];
        }
    }
    Ok(GateResult {
        map,
        skipped_sq,
        frame_sq,
    })
}

/// The rows of one patch row of a uniform frame (`fr`/`rr`: whole rows of `len` bytes): per patch
/// segment of `seg` bytes, the largest |frame − reference| over all its rows into `mx` and
/// Σ (frame − reference)² added to `e`; returns the rows' (Σ frame, Σ frame²). The same integers as
/// [`gate_row`] on each row in turn; on x86-64 with segments of whole 16-byte vectors the rows are
/// accumulated vertically, per vector, and each patch is reduced once per patch row
/// ([`gate_rows_sse2`]), not once per row.
fn gate_rows(
    fr: &[u8],
    rr: &[u8],
    len: usize,
    seg: usize,
    mx: &mut [u8],
    e: &mut [u64],
) -> (u64, u64) {
    #[cfg(target_arch = "x86_64")]
    if seg % 16 == 0 && len > 0 && fr.len() / len <= GATE_ROWS_MAX {
        if len >= 32 && crate::simd::elementwise_avx2() {
            // SAFETY: the CPU has AVX2.
            return unsafe { gate_rows_avx2(fr, rr, len, seg, mx, e) };
        }
        return gate_rows_sse2(fr, rr, len, seg, mx, e);
    }
    let (mut t1, mut t2) = (0u64, 0u64);
    for (a, b) in fr.chunks(len.max(1)).zip(rr.chunks(len.max(1))) {
        let (s1, s2) = gate_row(a, b, seg, mx, e);
        t1 += s1;
        t2 += s2;
    }
    (t1, t2)
}

/// The bytes `from..` of a row (past its last whole vector) as the scalar reference takes them: into the
/// patch maxima `mx` and squared-change sums `e`; returns their (Σ frame, Σ frame²).
#[cfg(target_arch = "x86_64")]
#[inline(always)]
fn gate_row_tail(
    a: &[u8],
    b: &[u8],
    from: usize,
    seg: usize,
    mx: &mut [u8],
    e: &mut [u64],
) -> (u64, u64) {
    let (mut t1, mut t2) = (0u64, 0u64);
    for (i, (&x, &r)) in a.iter().zip(b).enumerate().skip(from) {
        let d = x.abs_diff(r);
        let pc = i / seg;
        mx[pc] = mx[pc].max(d);
        e[pc] += d as u64 * d as u64;
        t1 += x as u64;
        t2 += x as u64 * x as u64;
    }
    (t1, t2)
}

/// Most rows [`gate_rows_sse2`] accumulates in its INT32 lanes (each row adds at most 4·255² per lane).
#[cfg(target_arch = "x86_64")]
const GATE_ROWS_MAX: usize = (i32::MAX as usize) / (4 * 255 * 255);

/// One 16-byte step of the SSE2 gates: `|x − r|` into the running max `m` and the INT32 sums of its
/// squares `dd` (`pmaddwd`), `x²` into `xx` and Σ x into the two u64 lanes of `s1` (`psadbw`).
#[cfg(target_arch = "x86_64")]
#[inline(always)]
fn sse2_step(
    x: std::arch::x86_64::__m128i,
    r: std::arch::x86_64::__m128i,
    (m, dd): (
        &mut std::arch::x86_64::__m128i,
        &mut std::arch::x86_64::__m128i,
    ),
    (xx, s1): (
        &mut std::arch::x86_64::__m128i,
        &mut std::arch::x86_64::__m128i,
    ),
) {
    use std::arch::x86_64::*;
    // SAFETY: SSE2 is part of the x86-64 baseline; register operations only.
    unsafe {
        let zero = _mm_setzero_si128();
        let d = _mm_or_si128(_mm_subs_epu8(x, r), _mm_subs_epu8(r, x));
        *m = _mm_max_epu8(*m, d);
        let (dl, dh) = (_mm_unpacklo_epi8(d, zero), _mm_unpackhi_epi8(d, zero));
        *dd = _mm_add_epi32(
            *dd,
            _mm_add_epi32(_mm_madd_epi16(dl, dl), _mm_madd_epi16(dh, dh)),
        );
        let (xl, xh) = (_mm_unpacklo_epi8(x, zero), _mm_unpackhi_epi8(x, zero));
        *xx = _mm_add_epi32(
            *xx,
            _mm_add_epi32(_mm_madd_epi16(xl, xl), _mm_madd_epi16(xh, xh)),
        );
        *s1 = _mm_add_epi64(*s1, _mm_sad_epu8(x, zero));
    }
}

/// Vectors per accumulation block of the SSE2 gates' Σ x²: INT32 lanes gain at most 4·255² per vector.
#[cfg(target_arch = "x86_64")]
const BLOCK: usize = 2048;

/// The sum of the four u32 lanes of `v`.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
fn sum32(v: std::arch::x86_64::__m128i) -> u64 {
    let mut l = [0u32; 4];
    // SAFETY: an unaligned 16-byte store into a 16-byte array.
    unsafe { std::arch::x86_64::_mm_storeu_si128(l.as_mut_ptr() as *mut _, v) };
    l.iter().map(|&x| x as u64).sum()
}

/// The largest byte of `m`.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
fn sse2_hmax(m: std::arch::x86_64::__m128i) -> u8 {
    use std::arch::x86_64::*;
    // SAFETY: SSE2 is part of the x86-64 baseline; register operations only.
    unsafe {
        let m = _mm_max_epu8(m, _mm_srli_si128(m, 8));
        let m = _mm_max_epu8(m, _mm_srli_si128(m, 4));
        let m = _mm_max_epu8(m, _mm_srli_si128(m, 2));
        let m = _mm_max_epu8(m, _mm_srli_si128(m, 1));
        (_mm_cvtsi128_si32(m) & 0xff) as u8
    }
}

/// [`gate_rows`] with SSE2 for segments of whole vectors (`seg % 16 == 0`): per 16-byte column of the
/// rows a running max of |a − b| and INT32 sums of its squares (`pmaddwd`), reduced per patch after the
/// last row; Σ a by `psadbw`, Σ a² by `pmaddwd`; the bytes past the last whole vector of a row as in
/// the scalar reference.
#[cfg(target_arch = "x86_64")]
fn gate_rows_sse2(
    fr: &[u8],
    rr: &[u8],
    len: usize,
    seg: usize,
    mx: &mut [u8],
    e: &mut [u64],
) -> (u64, u64) {
    use std::arch::x86_64::*;
    debug_assert!(seg % 16 == 0 && fr.len() / len <= GATE_ROWS_MAX);
    let nv = len / 16;
    let v = nv * 16;
    let (mut t1, mut t2) = (0u64, 0u64);
    // SAFETY: SSE2 is part of the x86-64 baseline; every load reads 16 bytes at `16·j < v ≤ len` of a
    // row of `len` bytes inside `fr`/`rr`.
    unsafe {
        let zero = _mm_setzero_si128();
        let mut mxv = vec![zero; nv];
        let mut ddv = vec![zero; nv];
        for (a, b) in fr.chunks_exact(len).zip(rr.chunks_exact(len)) {
            let mut s1 = zero;
            for blk in (0..nv).step_by(BLOCK) {
                let mut xx = zero;
                for j in blk..nv.min(blk + BLOCK) {
                    let x = _mm_loadu_si128(a.as_ptr().add(16 * j) as *const __m128i);
                    let r = _mm_loadu_si128(b.as_ptr().add(16 * j) as *const __m128i);
                    sse2_step(x, r, (&mut mxv[j], &mut ddv[j]), (&mut xx, &mut s1));
                }
                t2 += sum32(xx);
            }
            let mut l = [0u64; 2];
            _mm_storeu_si128(l.as_mut_ptr() as *mut __m128i, s1);
            t1 += l[0] + l[1];
            let (u1, u2) = gate_row_tail(a, b, v, seg, mx, e);
            (t1, t2) = (t1 + u1, t2 + u2);
        }
        for j in 0..nv {
            let pc = 16 * j / seg;
            mx[pc] = mx[pc].max(sse2_hmax(mxv[j]));
            e[pc] += sum32(ddv[j]);
        }
    }
    (t1, t2)
}

/// [`gate_rows_sse2`] with AVX2: 32-byte columns, each of whose 16-byte halves lies inside one patch
/// segment (`seg % 16 == 0`) and is reduced into its own patch after the last row. The same integers:
/// every lane does the SSE2 step's arithmetic, `unpack`/`madd`/`sad` stay within 128-bit halves.
///
/// # Safety
/// The CPU has AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn gate_rows_avx2(
    fr: &[u8],
    rr: &[u8],
    len: usize,
    seg: usize,
    mx: &mut [u8],
    e: &mut [u64],
) -> (u64, u64) {
    use std::arch::x86_64::*;
    debug_assert!(seg % 16 == 0 && fr.len() / len <= GATE_ROWS_MAX);
    let nv = len / 32;
    let v = nv * 32;
    let (mut t1, mut t2) = (0u64, 0u64);
    let zero = _mm256_setzero_si256();
    let mut mxv = vec![zero; nv];
    let mut ddv = vec![zero; nv];
    let sum32x8 =
        |v: __m256i| sum32(_mm256_castsi256_si128(v)) + sum32(_mm256_extracti128_si256::<1>(v));
    for (a, b) in fr.chunks_exact(len).zip(rr.chunks_exact(len)) {
        let mut s1 = zero;
        for blk in (0..nv).step_by(BLOCK) {
            let mut xx = zero;
            for j in blk..nv.min(blk + BLOCK) {
                // SAFETY: 32 bytes at 32·j < v ≤ len, inside a row of `fr`/`rr`.
                let x = unsafe { _mm256_loadu_si256(a.as_ptr().add(32 * j) as *const __m256i) };
                let r = unsafe { _mm256_loadu_si256(b.as_ptr().add(32 * j) as *const __m256i) };
                let d = _mm256_or_si256(_mm256_subs_epu8(x, r), _mm256_subs_epu8(r, x));
                mxv[j] = _mm256_max_epu8(mxv[j], d);
                let (dl, dh) = (_mm256_unpacklo_epi8(d, zero), _mm256_unpackhi_epi8(d, zero));
                ddv[j] = _mm256_add_epi32(
                    ddv[j],
                    _mm256_add_epi32(_mm256_madd_epi16(dl, dl), _mm256_madd_epi16(dh, dh)),
                );
                let (xl, xh) = (_mm256_unpacklo_epi8(x, zero), _mm256_unpackhi_epi8(x, zero));
                xx = _mm256_add_epi32(
                    xx,
                    _mm256_add_epi32(_mm256_madd_epi16(xl, xl), _mm256_madd_epi16(xh, xh)),
                );
                s1 = _mm256_add_epi64(s1, _mm256_sad_epu8(x, zero));
            }
            t2 += sum32x8(xx);
        }
        let mut l = [0u64; 4];
        // SAFETY: an unaligned 32-byte store into a 32-byte array.
        unsafe { _mm256_storeu_si256(l.as_mut_ptr() as *mut __m256i, s1) };
        t1 += l.iter().sum::<u64>();
        let (u1, u2) = gate_row_tail(a, b, v, seg, mx, e);
        (t1, t2) = (t1 + u1, t2 + u2);
    }
    for j in 0..nv {
        let halves = [
            (
                _mm256_castsi256_si128(mxv[j]),
                _mm256_castsi256_si128(ddv[j]),
            ),
            (
                _mm256_extracti128_si256::<1>(mxv[j]),
                _mm256_extracti128_si256::<1>(ddv[j]),
            ),
        ];
        for (h, (m, dd)) in halves.into_iter().enumerate() {
            let pc = (32 * j + 16 * h) / seg;
            mx[pc] = mx[pc].max(sse2_hmax(m));
            e[pc] += sum32(dd);
        }
    }
    (t1, t2)
}

/// One row of a uniform frame: for each patch segment of `seg` bytes, the largest |frame − reference|
/// into `mx` and Σ (frame − reference)² added to `e`; returns the row's (Σ frame, Σ frame²). SSE2 on
/// x86-64 (its baseline), [`gate_row_scalar`] elsewhere: the same integers.
fn gate_row(fr: &[u8], rr: &[u8], seg: usize, mx: &mut [u8], e: &mut [u64]) -> (u64, u64) {
    #[cfg(target_arch = "x86_64")]
    {
        gate_row_sse2(fr, rr, seg, mx, e)
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        gate_row_scalar(fr, rr, seg, mx, e)
    }
}

/// The scalar reference of [`gate_row`].
fn gate_row_scalar(fr: &[u8], rr: &[u8], seg: usize, mx: &mut [u8], e: &mut [u64]) -> (u64, u64) {
    let (mut t1, mut t2) = (0u64, 0u64);
    for (pc, (a, b)) in fr.chunks(seg).zip(rr.chunks(seg)).enumerate() {
        let (mut m, mut sq) = (0u8, 0u64);
        for (&x, &r) in a.iter().zip(b) {
            let d = x.abs_diff(r);
            m = m.max(d);
            sq += d as u64 * d as u64;
            t1 += x as u64;
            t2 += x as u64 * x as u64;
        }
        mx[pc] = mx[pc].max(m);
        e[pc] += sq;
    }
    (t1, t2)
}

/// [`gate_row`] with SSE2: 16 bytes at a time, |a − b| from two saturating subtractions, squares summed
/// in pairs by `pmaddwd`, Σ a by `psadbw`; a segment's last `seg % 16` bytes as in the scalar reference.
#[cfg(target_arch = "x86_64")]
fn gate_row_sse2(fr: &[u8], rr: &[u8], seg: usize, mx: &mut [u8], e: &mut [u64]) -> (u64, u64) {
    use std::arch::x86_64::*;
    let (mut t1, mut t2) = (0u64, 0u64);
    // SAFETY: SSE2 is part of the x86-64 baseline; every load reads 16 bytes inside `a`/`b` (offsets
    // below `v`, a multiple of 16 not above their lengths).
    unsafe {
        let zero = _mm_setzero_si128();
        for (pc, (a, b)) in fr.chunks(seg).zip(rr.chunks(seg)).enumerate() {
            let n = a.len().min(b.len());
            let v = n / 16 * 16;
            let (mut m, mut sq, mut s1) = (zero, 0u64, zero);
            for blk in (0..v).step_by(16 * BLOCK) {
                let (mut dd, mut xx) = (zero, zero);
                for i in (blk..v.min(blk + 16 * BLOCK)).step_by(16) {
                    let x = _mm_loadu_si128(a.as_ptr().add(i) as *const __m128i);
                    let r = _mm_loadu_si128(b.as_ptr().add(i) as *const __m128i);
                    sse2_step(x, r, (&mut m, &mut dd), (&mut xx, &mut s1));
                }
                sq += sum32(dd);
                t2 += sum32(xx);
            }
            let mut l = [0u64; 2];
            _mm_storeu_si128(l.as_mut_ptr() as *mut __m128i, s1);
            // the last n − v bytes as one segment of the scalar reference
            let (mut mt, mut et) = ([sse2_hmax(m)], [sq]);
            let (u1, u2) = gate_row_scalar(&a[v..n], &b[v..n], (n - v).max(1), &mut mt, &mut et);
            t1 += l[0] + l[1] + u1;
            t2 += u2;
            mx[pc] = mx[pc].max(mt[0]);
            e[pc] += et[0];
        }
    }
    (t1, t2)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::patchskip::region::gate;

    fn frame(seed: &mut u64, n: usize) -> Vec<u8> {
        (0..n)
            .map(|_| {
                *seed = seed
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                (*seed >> 56) as u8
            })
            .collect()
    }

    /// The SSE2 row gate gives the scalar reference's integers: segments shorter than, equal to and
    /// not multiples of 16 bytes, rows that end in a partial segment, extreme bytes (0 and 255).
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn sse2_row_gate_equals_scalar() {
        let mut seed = 3u64;
        for &(n, seg) in &[
            (1usize, 1usize),
            (47, 3),
            (48, 48),
            (100, 24),
            (333, 16),
            (513, 64),
            (4099, 4099),
        ] {
            for extreme in [false, true] {
                let (mut a, mut b) = (frame(&mut seed, n), frame(&mut seed, n));
                if extreme {
                    for (i, (x, y)) in a.iter_mut().zip(b.iter_mut()).enumerate() {
                        (*x, *y) = if i % 3 == 0 { (255, 0) } else { (0, 255) };
                    }
                }
                let cols = n.div_ceil(seg);
                let (mut m1, mut e1) = (vec![7u8; cols], vec![5u64; cols]);
                let (mut m2, mut e2) = (m1.clone(), e1.clone());
                let t1 = gate_row_scalar(&a, &b, seg, &mut m1, &mut e1);
                let t2 = gate_row_sse2(&a, &b, seg, &mut m2, &mut e2);
                assert_eq!(
                    (t1, m1, e1),
                    (t2, m2, e2),
                    "n {n} seg {seg} extreme {extreme}"
                );
            }
        }
    }

    /// The vertical patch-row gate gives the per-row reference's integers: rows whose length is and is
    /// not a multiple of 16 bytes, segments of 16, 48 and 64 bytes (and 24: the per-row path), one row
    /// and many, extreme bytes.
    #[test]
    fn patch_row_gate_equals_per_row() {
        let mut seed = 5u64;
        for &(rows, len, seg) in &[
            (1usize, 16usize, 16usize),
            (16, 960, 48),
            (7, 100, 16),
            (16, 1000, 64),
            (3, 72, 24),
            (33, 47, 48),
            // AVX2: a column's halves in two patches (seg 48), a 16-byte tail (len 48, 80), more than
            // one accumulation block of Σ x² in a row (BLOCK vectors)
            (5, 32, 16),
            (4, 48, 16),
            (3, 80, 16),
            (2, 70_000, 80),
        ] {
            for extreme in [false, true] {
                let (mut a, mut b) = (frame(&mut seed, rows * len), frame(&mut seed, rows * len));
                if extreme {
                    for (i, (x, y)) in a.iter_mut().zip(b.iter_mut()).enumerate() {
                        (*x, *y) = if i % 3 == 0 { (255, 0) } else { (0, 255) };
                    }
                }
                let cols = len.div_ceil(seg);
                let (mut m1, mut e1) = (vec![7u8; cols], vec![5u64; cols]);
                let (mut m2, mut e2) = (m1.clone(), e1.clone());
                let (mut t1, mut t2) = (0u64, 0u64);
                for (x, y) in a.chunks(len).zip(b.chunks(len)) {
                    let (s1, s2) = gate_row_scalar(x, y, seg, &mut m1, &mut e1);
                    t1 += s1;
                    t2 += s2;
                }
                let t = gate_rows(&a, &b, len, seg, &mut m2, &mut e2);
                assert_eq!(
                    ((t1, t2), &m1, &e1),
                    (t, &m2, &e2),
                    "rows {rows} len {len} seg {seg} extreme {extreme}"
                );
                // each vector build on its own (gate_rows takes the widest the CPU has)
                #[cfg(target_arch = "x86_64")]
                if seg % 16 == 0 {
                    let (mut m3, mut e3) = (vec![7u8; cols], vec![5u64; cols]);
                    let t = gate_rows_sse2(&a, &b, len, seg, &mut m3, &mut e3);
                    assert_eq!(
                        ((t1, t2), &m1, &e1),
                        (t, &m3, &e3),
                        "sse2 rows {rows} len {len} seg {seg}"
                    );
                    if len >= 32 && std::arch::is_x86_feature_detected!("avx2") {
                        let (mut m4, mut e4) = (vec![7u8; cols], vec![5u64; cols]);
                        // SAFETY: the CPU has AVX2.
                        let t = unsafe { gate_rows_avx2(&a, &b, len, seg, &mut m4, &mut e4) };
                        assert_eq!(
                            ((t1, t2), &m1, &e1),
                            (t, &m4, &e4),
                            "avx2 rows {rows} len {len} seg {seg}"
                        );
                    }
                }
            }
        }
    }

    fn to_float(u: &[u8], inp: &U8Input) -> Vec<f32> {
        let [c, h, w] = inp.chw;
        let mut out = vec![0.0; c * h * w];
        inp.convert_rect(u, (0, h, 0, w), &mut out);
        out
    }

    /// The byte gate flags what the float gate flags on the converted frames (thresholds away from
    /// rounding ties), and its error estimate agrees.
    #[test]
    fn u8_gate_matches_float_gate() {
        let mut seed = 3u64;
        for &(cin, ch, ref mean, ref std) in &[
            (3usize, None, None, None),
            (3, Some(1usize), None, None),
            (1, Some(3), None, None),
            (4, None, None, None),
            (
                3,
                None,
                Some(vec![0.4f32, 0.5, 0.6]),
                Some(vec![0.2f32, 0.25, 0.3]),
            ),
            (3, None, Some(vec![0.5f32; 3]), Some(vec![0.25f32; 3])),
        ] {
            let (h, w) = (21, 35);
            let inp = U8Input::new([h, w, cin], ch, mean.clone(), std.clone()).unwrap();
            let a = frame(&mut seed, h * w * cin);
            let mut b = a.clone();
            // a few changed bytes of different sizes
            for (k, d) in [(5usize, 3u8), (200, 40), (600, 90), (h * w * cin - 1, 1)] {
                b[k] = b[k].wrapping_add(d);
            }
            for th in [0.0f32, 0.03, 0.2] {
                let g8 = gate_u8(&b, &a, &inp, 8, th).unwrap();
                let gf = gate(&to_float(&b, &inp), &to_float(&a, &inp), inp.chw, 8, th).unwrap();
                assert_eq!(g8.map, gf.map, "cin {cin} ch {ch:?} th {th}");
                assert!(
                    (g8.frame_sq - gf.frame_sq).abs() <= 1e-6 * gf.frame_sq,
                    "{} {}",
                    g8.frame_sq,
                    gf.frame_sq
                );
                // the float gate sums float32 differences of rounded values
                let tol = 1e-4 * gf.skipped_sq.max(1e-9);
                assert!(
                    (g8.skipped_sq - gf.skipped_sq).abs() <= tol,
                    "{} {}",
                    g8.skipped_sq,
                    gf.skipped_sq
                );
            }
        }
    }

    #[test]
    fn conversion_is_preprocess_arithmetic() {
        let inp = U8Input::new([1, 2, 3], Some(1), Some(vec![0.1]), Some(vec![0.3])).unwrap();
        let f = [10u8, 200, 30, 255, 0, 7];
        let mut out = vec![0.0; 2];
        inp.convert_rect(&f, (0, 1, 0, 2), &mut out);
        let l = |p: &[u8]| {
            ((LUMA[0] * (p[0] as f32 / 255.0)
                + LUMA[1] * (p[1] as f32 / 255.0)
                + LUMA[2] * (p[2] as f32 / 255.0))
                - 0.1)
                / 0.3
        };
        assert_eq!(out, vec![l(&f[..3]), l(&f[3..])]);
        assert!(U8Input::new([4, 4, 2], None, None, None).is_err());
        assert!(U8Input::new([4, 4, 3], Some(2), None, None).is_err());
        assert!(U8Input::new([4, 4, 3], None, None, Some(vec![1.0, 0.0, 1.0])).is_err());
    }
}
