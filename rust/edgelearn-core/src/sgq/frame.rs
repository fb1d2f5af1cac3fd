//! The wire format (byte layout in the [module docs](super)): writing a header, and parsing a frame from
//! untrusted bytes. [`parse`] checks the magic, version, every field, the lengths against the header
//! (checked arithmetic, [`super::MAX_ELEMENTS`]), the exact frame length, the CRC, the
//! permutation and the ranges before it returns; nothing it allocates is larger than the frame itself.
//! It reads version 2 and version 1 (the same layout without flag bits 2 and 3, which it rejects there).

use half::f16;

use super::bitpack;
use super::layout::{Grid, Shape};
use super::{order, Mode, MAX_ELEMENTS, MAX_EXPANSION};
use crate::error::{Error, Result};

pub const MAGIC: [u8; 4] = *b"SGQF";
/// The version this encoder writes.
pub const VERSION: u16 = 2;
/// Versions this decoder reads.
pub const VERSIONS: [u16; 2] = [1, 2];
pub const HEADER_LEN: usize = 56;
pub const DTYPE_F32: u8 = 1;
/// Byte range of the CRC field.
pub const CRC_AT: usize = 52;

const FLAG_STOCHASTIC: u8 = 1;
const FLAG_PERMUTATION: u8 = 2;
const FLAG_FRAME_RANGES: u8 = 4;
const FLAG_STREAM_ORDER: u8 = 8;
const FLAG_CONSTANT_MAP: u8 = 16;

/// The decoded header fields.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    pub version: u16,
    pub mode: Mode,
    pub bits: u8,
    pub stochastic: bool,
    pub has_permutation: bool,
    /// Ranges per (group, stripe) shared by all samples (flag bit 2), instead of per sample.
    pub frame_ranges: bool,
    /// The channel order is the stream's last one, not in this frame (flag bit 3).
    pub stream_order: bool,
    /// A map of the (sample, group, stripe) blocks that are constant and carry one code (flag bit 4).
    pub constant_map: bool,
    /// Rank of the caller's array (2, 3 or 4).
    pub ndim: u8,
    pub shape: Shape,
    pub group: u32,
    pub stripe_rows: u32,
    pub permutation_len: u32,
    pub ranges_len: u32,
    pub codes_len: u64,
    pub crc32: u32,
}

impl Header {
    /// Total frame length (the header has been validated, so this cannot overflow).
    pub fn frame_len(&self) -> usize {
        HEADER_LEN
            + self.permutation_len as usize
            + self.ranges_len as usize
            + self.codes_len as usize
    }

    /// The caller's shape: 2, 3 or 4 dimensions.
    pub fn original_shape(&self) -> Vec<usize> {
        let s = self.shape;
        match self.ndim {
            2 => vec![s.n, s.c],
            3 => vec![s.n, s.c, s.h],
            _ => vec![s.n, s.c, s.h, s.w],
        }
    }

    /// The grid the ranges follow.
    pub fn grid(&self) -> Grid {
        match self.mode {
            Mode::Sgq => Grid::sgq(
                self.shape,
                self.group as usize,
                self.stripe_rows as usize,
                !self.frame_ranges,
            ),
            _ => Grid::whole(self.shape),
        }
    }

    /// Writes the 56 header bytes with a zero CRC field.
    pub fn write(&self, out: &mut [u8]) {
        let mode = match self.mode {
            Mode::Sgq => 0,
            Mode::Uniform => 1,
            Mode::Fp16 => 2,
        };
        let flag = |on: bool, bit: u8| if on { bit } else { 0 };
        let flags = flag(self.stochastic, FLAG_STOCHASTIC)
            | flag(self.has_permutation, FLAG_PERMUTATION)
            | flag(self.frame_ranges, FLAG_FRAME_RANGES)
            | flag(self.stream_order, FLAG_STREAM_ORDER)
            | flag(self.constant_map, FLAG_CONSTANT_MAP);
        out[0..4].copy_from_slice(&MAGIC);
        out[4..6].copy_from_slice(&self.version.to_le_bytes());
        out[6] = DTYPE_F32;
        out[7] = mode;
        out[8] = self.bits;
        out[9] = flags;
        out[10] = self.ndim;
        out[11] = 0;
        let s = self.shape;
        for (i, d) in [s.n, s.c, s.h, s.w].into_iter().enumerate() {
            out[12 + 4 * i..16 + 4 * i].copy_from_slice(&(d as u32).to_le_bytes());
        }
        out[28..32].copy_from_slice(&self.group.to_le_bytes());
        out[32..36].copy_from_slice(&self.stripe_rows.to_le_bytes());
        out[36..40].copy_from_slice(&self.permutation_len.to_le_bytes());
        out[40..44].copy_from_slice(&self.ranges_len.to_le_bytes());
        out[44..52].copy_from_slice(&self.codes_len.to_le_bytes());
        out[52..56].copy_from_slice(&0u32.to_le_bytes());
    }

    /// Bytes of the constant-block map: `⌈N·G·S / 8⌉` with flag bit 4, else 0 (validated header).
    pub fn map_len(&self) -> usize {
        if self.constant_map {
            let g = self.grid();
            (self.shape.n * g.groups * g.stripes).div_ceil(8)
        } else {
            0
        }
    }

    pub fn rounding_name(&self) -> &'static str {
        if self.stochastic {
            "stochastic"
        } else {
            "nearest"
        }
    }
}

/// CRC32 of a frame: bytes `0..52` then `56..`.
pub fn frame_crc(frame: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(&frame[..CRC_AT]);
    h.update(&frame[HEADER_LEN..]);
    h.finalize()
}

/// Sets the CRC field of a complete frame.
pub fn seal(frame: &mut [u8]) {
    let crc = frame_crc(frame);
    frame[CRC_AT..HEADER_LEN].copy_from_slice(&crc.to_le_bytes());
}

/// A validated frame: header and borrowed payload sections.
#[derive(Clone, Copy, Debug)]
pub struct Frame<'a> {
    pub header: Header,
    pub permutation: &'a [u8],
    pub ranges: &'a [u8],
    /// The constant-block map (empty without flag bit 4): bit `(n·G + k)·S + s`, least significant
    /// bit first, is 1 when block (group k, stripe s) of sample n is constant.
    pub map: &'a [u8],
    pub codes: &'a [u8],
}

impl Frame<'_> {
    /// The channel order: the frame's permutation, the identity when it has none, or for a frame that
    /// uses the stream's order ([`Header::stream_order`]) `stream`, which must then be a permutation of
    /// `0..C` (the receiver's copy of the last order the stream sent). `stream` is ignored otherwise.
    pub fn order(&self, stream: Option<&[u32]>) -> Result<Vec<u32>> {
        let c = self.header.shape.c;
        if self.header.stream_order {
            return match stream {
                Some(o) if o.len() == c && order::is_permutation(o) => Ok(o.to_vec()),
                Some(o) => Err(bad(format!(
                    "the frame uses the stream's channel order, and the order given has {} entries, \
                     not a permutation of 0..{c}",
                    o.len()
                ))),
                None => Err(bad(
                    "the frame carries no channel order: it uses the one an earlier frame of its stream \
                     sent; decode it with the Codec that received that frame, or pass order=",
                )),
            };
        }
        if self.header.has_permutation {
            // C entries: bounded by the frame length, which holds them
            Ok(self
                .permutation
                .chunks_exact(2)
                .map(|b| u16::from_le_bytes([b[0], b[1]]) as u32)
                .collect())
        } else {
            // identity: C ≤ the elements, and the codes hold at least one bit per element
            Ok((0..c as u32).collect())
        }
    }

    /// Whether block `index` (`(n·G + k)·S + s`) of the constant-block map is constant.
    #[inline(always)]
    pub fn is_constant(&self, index: usize) -> bool {
        self.map
            .get(index / 8)
            .is_some_and(|b| (b >> (index % 8)) & 1 == 1)
    }

    /// Number of codes in the stream: every element, except that a constant block has one code.
    pub fn code_count(&self) -> Result<usize> {
        let h = &self.header;
        let elements = h.shape.elements("frame")?;
        if !h.constant_map {
            return Ok(elements);
        }
        let g = h.grid();
        let mut count = elements;
        for n in 0..h.shape.n {
            for k in 0..g.groups {
                for s in 0..g.stripes {
                    if self.is_constant((n * g.groups + k) * g.stripes + s) {
                        count -= block_elements(h.shape, &g, k, s) - 1;
                    }
                }
            }
        }
        Ok(count)
    }

    /// Where the channel order of this frame comes from: "identity", "frame" or "stream".
    pub fn order_source(&self) -> &'static str {
        if self.header.stream_order {
            "stream"
        } else if self.header.has_permutation {
            "frame"
        } else {
            "identity"
        }
    }

    /// The ranges as `(lo, hi)` in float32 (bounded by the frame length).
    pub fn ranges_f32(&self) -> Vec<(f32, f32)> {
        self.ranges
            .chunks_exact(4)
            .map(|b| {
                (
                    f16::from_bits(u16::from_le_bytes([b[0], b[1]])).to_f32(),
                    f16::from_bits(u16::from_le_bytes([b[2], b[3]])).to_f32(),
                )
            })
            .collect()
    }
}

/// Elements of block (group `k`, stripe `s`) in one sample.
pub fn block_elements(shape: Shape, grid: &Grid, k: usize, s: usize) -> usize {
    let members = grid.group.min(shape.c - k * grid.group);
    let rows = grid.stripe_rows.min(shape.h - s * grid.stripe_rows);
    members * rows * shape.w
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn bad(msg: impl Into<String>) -> Error {
    Error::frame(msg)
}

/// Parses and fully validates the header fields of `bytes` (not the CRC nor the payload contents).
pub fn parse_header(bytes: &[u8]) -> Result<Header> {
    if bytes.len() < HEADER_LEN {
        return Err(bad(format!(
            "truncated: {} bytes, a header alone is {HEADER_LEN}",
            bytes.len()
        )));
    }
    if bytes[0..4] != MAGIC {
        return Err(bad(format!(
            "bad magic {:02x?}, expected {:02x?} (\"SGQF\")",
            &bytes[0..4],
            MAGIC
        )));
    }
    let version = u16::from_le_bytes([bytes[4], bytes[5]]);
    if !VERSIONS.contains(&version) {
        return Err(bad(format!(
            "unknown version {version}, this decoder reads versions {VERSIONS:?}"
        )));
    }
    if bytes[6] != DTYPE_F32 {
        return Err(bad(format!(
            "unknown dtype code {}, expected {DTYPE_F32} (float32)",
            bytes[6]
        )));
    }
    let mode = match bytes[7] {
        0 => Mode::Sgq,
        1 => Mode::Uniform,
        2 => Mode::Fp16,
        m => {
            return Err(bad(format!(
                "unknown mode code {m}, expected 0 (sgq), 1 (uniform) or 2 (fp16)"
            )))
        }
    };
    let bits = bytes[8];
    let flags = bytes[9];
    let known = if version == 1 {
        FLAG_STOCHASTIC | FLAG_PERMUTATION
    } else {
        FLAG_STOCHASTIC
            | FLAG_PERMUTATION
            | FLAG_FRAME_RANGES
            | FLAG_STREAM_ORDER
            | FLAG_CONSTANT_MAP
    };
    if flags & !known != 0 {
        return Err(bad(format!(
            "unknown flag bits {flags:#04x} for version {version}"
        )));
    }
    let (stochastic, has_permutation) =
        (flags & FLAG_STOCHASTIC != 0, flags & FLAG_PERMUTATION != 0);
    let (frame_ranges, stream_order) = (
        flags & FLAG_FRAME_RANGES != 0,
        flags & FLAG_STREAM_ORDER != 0,
    );
    let constant_map = flags & FLAG_CONSTANT_MAP != 0;
    if has_permutation && stream_order {
        return Err(bad(
            "flags say both 'permutation present' and 'stream order'; at most one may be set",
        ));
    }
    let ndim = bytes[10];
    if bytes[11] != 0 {
        return Err(bad("reserved byte 11 is not 0"));
    }
    let dims = [
        u32_at(bytes, 12),
        u32_at(bytes, 16),
        u32_at(bytes, 20),
        u32_at(bytes, 24),
    ];
    let shape = Shape {
        n: dims[0] as usize,
        c: dims[1] as usize,
        h: dims[2] as usize,
        w: dims[3] as usize,
    };
    let group = u32_at(bytes, 28);
    let stripe_rows = u32_at(bytes, 32);
    let permutation_len = u32_at(bytes, 36);
    let ranges_len = u32_at(bytes, 40);
    let codes_len = u64::from_le_bytes(
        bytes[44..52]
            .try_into()
            .map_err(|_| bad("truncated header"))?,
    );
    let crc32 = u32_at(bytes, 52);

    if dims.contains(&0) {
        return Err(bad(format!("shape {dims:?} has a zero dimension")));
    }
    let elements = shape
        .elements("frame")
        .ok()
        .filter(|&e| e <= MAX_ELEMENTS)
        .ok_or_else(|| {
            bad(format!(
                "shape {dims:?} exceeds the limit of {MAX_ELEMENTS} elements"
            ))
        })?;
    match ndim {
        2 if shape.h != 1 || shape.w != 1 => {
            return Err(bad(format!("ndim 2 needs H = W = 1, shape {dims:?}")))
        }
        3 if shape.w != 1 => return Err(bad(format!("ndim 3 needs W = 1, shape {dims:?}"))),
        2..=4 => {}
        _ => return Err(bad(format!("ndim {ndim} is not 2, 3 or 4"))),
    }
    match mode {
        Mode::Sgq | Mode::Uniform if !(1..=8).contains(&bits) => {
            return Err(bad(format!(
                "bits {bits} is not in 1..=8 for mode {}",
                mode.name()
            )))
        }
        Mode::Fp16 if bits != 16 => {
            return Err(bad(format!("bits {bits} must be 16 for mode fp16")))
        }
        Mode::Fp16 if stochastic => return Err(bad("mode fp16 cannot have stochastic rounding")),
        _ => {}
    }
    if mode == Mode::Sgq {
        if group == 0 || group as usize > shape.c {
            return Err(bad(format!("group {group} is not in 1..={}", shape.c)));
        }
        if stripe_rows == 0 || stripe_rows as usize > shape.h {
            return Err(bad(format!(
                "stripe rows {stripe_rows} is not in 1..={}",
                shape.h
            )));
        }
    } else {
        if group != 0 || stripe_rows != 0 {
            return Err(bad(format!(
                "group and stripe rows must be 0 in mode {}",
                mode.name()
            )));
        }
        if has_permutation || stream_order || frame_ranges || constant_map {
            return Err(bad(format!(
                "mode {} cannot carry a permutation, a stream order, frame ranges or a constant-block map",
                mode.name()
            )));
        }
    }
    let expect_perm = if has_permutation {
        if shape.c > 1 << 16 {
            return Err(bad(format!(
                "a permutation of {} channels does not fit u16 entries",
                shape.c
            )));
        }
        2 * shape.c as u64
    } else {
        0
    };
    if permutation_len as u64 != expect_perm {
        return Err(bad(format!(
            "permutation length {permutation_len} bytes, expected {expect_perm}"
        )));
    }
    let header = Header {
        version,
        mode,
        bits,
        stochastic,
        has_permutation,
        frame_ranges,
        stream_order,
        constant_map,
        ndim,
        shape,
        group,
        stripe_rows,
        permutation_len,
        ranges_len,
        codes_len,
        crc32,
    };
    // with a constant-block map, the ranges section ends with it: N·G·S bits
    let blocks = if constant_map {
        let g = header.grid();
        shape
            .n
            .checked_mul(g.groups)
            .and_then(|v| v.checked_mul(g.stripes))
            .map_or(u64::MAX / 16, |v| v as u64)
    } else {
        0
    };
    let map_bytes = blocks.div_ceil(8);
    let expect_ranges = match mode {
        Mode::Fp16 => 0u64,
        _ => header
            .grid()
            .ranges(shape.n)
            .and_then(|r| r.checked_mul(4))
            .map_or(u64::MAX / 2, |v| v as u64)
            .saturating_add(map_bytes),
    };
    if ranges_len as u64 != expect_ranges {
        return Err(bad(format!(
            "ranges length {ranges_len} bytes, expected {expect_ranges}"
        )));
    }
    let expect_codes = (elements as u64)
        .checked_mul(bits as u64)
        .map(|b| b.div_ceil(8))
        .unwrap_or(u64::MAX);
    if constant_map {
        // the exact count needs the map (checked by `parse`); here only its bounds: one code per block
        // at least, one per element at most
        let least = blocks.saturating_mul(bits as u64).div_ceil(8);
        if codes_len > expect_codes || codes_len < least {
            return Err(bad(format!(
                "codes length {codes_len} bytes, expected {least}..={expect_codes} with a \
                 constant-block map"
            )));
        }
    } else if codes_len != expect_codes {
        return Err(bad(format!(
            "codes length {codes_len} bytes, expected {expect_codes}"
        )));
    }
    let total = (HEADER_LEN as u64)
        .checked_add(permutation_len as u64)
        .and_then(|t| t.checked_add(ranges_len as u64))
        .and_then(|t| t.checked_add(codes_len))
        .ok_or_else(|| bad("section lengths overflow"))?;
    if total != bytes.len() as u64 {
        let what = if (bytes.len() as u64) < total {
            "truncated"
        } else {
            "trailing bytes"
        };
        return Err(bad(format!(
            "{what}: the header describes {total} bytes, got {}",
            bytes.len()
        )));
    }
    // constant blocks let a small frame stand for many elements: bound what it may decode to
    if (elements as u64).saturating_mul(4) > (MAX_EXPANSION as u64).saturating_mul(total) {
        return Err(bad(format!(
            "{elements} elements from a {total}-byte frame exceed the limit of {MAX_EXPANSION} \
             output bytes per frame byte"
        )));
    }
    Ok(header)
}

/// Parses and validates a whole frame (see the module docs). Never panics, whatever `bytes` holds.
pub fn parse(bytes: &[u8]) -> Result<Frame<'_>> {
    let header = parse_header(bytes)?;
    let crc = frame_crc(bytes);
    if crc != header.crc32 {
        return Err(bad(format!(
            "CRC mismatch: header says {:#010x}, content gives {crc:#010x}",
            header.crc32
        )));
    }
    let (p, r) = (header.permutation_len as usize, header.ranges_len as usize);
    let m = header.map_len();
    let rest = &bytes[HEADER_LEN..];
    let frame = Frame {
        header,
        permutation: &rest[..p],
        ranges: &rest[p..p + r - m],
        map: &rest[p + r - m..p + r],
        codes: &rest[p + r..],
    };
    if header.constant_map {
        let g = header.grid();
        let blocks = header.shape.n * g.groups * g.stripes;
        if blocks % 8 != 0 && frame.map[m - 1] >> (blocks % 8) != 0 {
            return Err(bad(
                "unused bits of the last constant-block map byte are not 0",
            ));
        }
        let expect = bitpack::packed_len(frame.code_count()?, header.bits as u32).unwrap_or(0);
        if header.codes_len != expect as u64 {
            return Err(bad(format!(
                "codes length {} bytes, the constant-block map makes it {expect}",
                header.codes_len
            )));
        }
    }
    if header.has_permutation && !order::is_permutation(&frame.order(None)?) {
        return Err(bad(format!(
            "the permutation is not a permutation of 0..{}",
            header.shape.c
        )));
    }
    for (i, (lo, hi)) in frame.ranges_f32().into_iter().enumerate() {
        if !(lo.is_finite() && hi.is_finite() && lo <= hi) {
            return Err(bad(format!(
                "range {i} is [{lo}, {hi}]; expected finite lo <= hi"
            )));
        }
    }
    if header.mode != Mode::Fp16 {
        let used_bits = (frame.code_count()? as u64 * header.bits as u64) % 8;
        if used_bits != 0 {
            let last = frame.codes.last().copied().unwrap_or(0);
            if last >> used_bits != 0 {
                return Err(bad("unused bits of the last code byte are not 0"));
            }
        }
    }
    Ok(frame)
}
