//! The wire format (byte layout in the [module docs](super)): writing a header, and parsing a frame from
//! untrusted bytes. [`parse`] checks the magic, version, every field, the lengths against the header
//! (checked arithmetic, [`MAX_ELEMENTS`](super::MAX_ELEMENTS)), the exact frame length, the CRC, the
//! permutation and the ranges before it returns; nothing it allocates is larger than the frame itself.

use half::f16;

use super::layout::{Grid, Shape};
use super::{order, Mode, MAX_ELEMENTS};
use crate::error::{Error, Result};

pub const MAGIC: [u8; 4] = *b"SGQF";
pub const VERSION: u16 = 1;
pub const HEADER_LEN: usize = 56;
pub const DTYPE_F32: u8 = 1;
/// Byte range of the CRC field.
pub const CRC_AT: usize = 52;

const FLAG_STOCHASTIC: u8 = 1;
const FLAG_PERMUTATION: u8 = 2;

/// The decoded header fields.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    pub version: u16,
    pub mode: Mode,
    pub bits: u8,
    pub stochastic: bool,
    pub has_permutation: bool,
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
            Mode::Sgq => Grid::sgq(self.shape, self.group as usize, self.stripe_rows as usize),
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
        let flags = (self.stochastic as u8) * FLAG_STOCHASTIC
            | (self.has_permutation as u8) * FLAG_PERMUTATION;
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
    pub codes: &'a [u8],
}

impl Frame<'_> {
    /// The channel order (identity without a permutation). C is bounded by the frame length.
    pub fn order(&self) -> Vec<u32> {
        if self.header.has_permutation {
            self.permutation
                .chunks_exact(2)
                .map(|b| u16::from_le_bytes([b[0], b[1]]) as u32)
                .collect()
        } else {
            (0..self.header.shape.c as u32).collect()
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
    if version != VERSION {
        return Err(bad(format!(
            "unknown version {version}, this decoder reads version {VERSION}"
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
    if flags & !(FLAG_STOCHASTIC | FLAG_PERMUTATION) != 0 {
        return Err(bad(format!("unknown flag bits {flags:#04x}")));
    }
    let (stochastic, has_permutation) =
        (flags & FLAG_STOCHASTIC != 0, flags & FLAG_PERMUTATION != 0);
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
        if has_permutation {
            return Err(bad(format!(
                "mode {} cannot carry a permutation",
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
        ndim,
        shape,
        group,
        stripe_rows,
        permutation_len,
        ranges_len,
        codes_len,
        crc32,
    };
    let expect_ranges = match mode {
        Mode::Fp16 => 0u64,
        _ => header
            .grid()
            .ranges(shape.n)
            .and_then(|r| r.checked_mul(4))
            .map_or(u64::MAX, |v| v as u64),
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
    if codes_len != expect_codes {
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
    let rest = &bytes[HEADER_LEN..];
    let frame = Frame {
        header,
        permutation: &rest[..p],
        ranges: &rest[p..p + r],
        codes: &rest[p + r..],
    };
    if header.has_permutation && !order::is_permutation(&frame.order()) {
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
        let used_bits = (header.shape.elements("frame")? as u64 * header.bits as u64) % 8;
        if used_bits != 0 {
            let last = frame.codes.last().copied().unwrap_or(0);
            if last >> used_bits != 0 {
                return Err(bad("unused bits of the last code byte are not 0"));
            }
        }
    }
    Ok(frame)
}
