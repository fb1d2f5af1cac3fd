//! SGQ (stripe-wise group quantization): the feature/gradient codec of collaborative (split) learning,
//! bytes in and out. Spec: `docs/sgq.md`.
//!
//! A float32 tensor `N×C×H×W` is encoded as
//! 1. a channel order (a permutation putting channels with similar ranges next to each other, [`order`]),
//! 2. groups of `g` consecutive channels in that order, each group's `g×H×W` block cut into horizontal
//!    stripes of `r` rows ([`layout`]),
//! 3. per (sample, group, stripe) — or, with [`RangeScope::Frame`], per (group, stripe) shared by all the
//!    samples of the frame — a range `[lo, hi]` stored as IEEE binary16, rounded *outwards* from the
//!    block's float32 min and max so it covers every value, and codes
//!    `q = round((x − lo) / (hi − lo) · (2^b − 1))`, `b ∈ 1..=8`, nearest (half up) or stochastic
//!    (`floor(t + u)`, `u` from a counter-based hash of the seed and the code index),
//! 4. codes bit-packed densely ([`bitpack`]) into a versioned, CRC-checked frame ([`frame`]);
//!    optionally ([`Settings::constant_blocks`]) a (sample, group, stripe) block whose values are all
//!    equal carries one code instead of one per element, marked in a map of one bit per block.
//!
//! With [`Settings::clip`] the encoder narrows each block's `[min, max]` before rounding it outwards
//! (range clipping; values beyond the narrowed range take its nearer end's code): an encoder-side choice,
//! the frame format is the same. The bound below then holds for the value clamped to its block's range.
//!
//! The encoder quantizes against the binary16 `lo`/`hi` the decoder reads back, so the reconstruction
//! `lo + q · (hi − lo)/(2^b − 1)` is within half a step (nearest) or one step (stochastic) of `x`, up to
//! float32 rounding of a few ulps of `max(|lo|, |hi|)`. A block with `hi == lo` decodes to `lo` exactly.
//!
//! Two baselines share the frame format and code path: [`Mode::Uniform`] (one per-tensor range at
//! `b` bits) and [`Mode::Fp16`] (raw binary16 values). Values must be finite with `|x| ≤ 65504` (the
//! binary16 range) in every mode.
//!
//! # Frame format, version 2 (all integers little-endian)
//!
//! ```text
//! offset size  field
//!  0      4    magic b"SGQF"
//!  4      2    version u16 = 2 (1 is still read: the same layout, flag bits 2..4 must be 0)
//!  6      1    dtype of the source tensor: 1 = float32 (the only one)
//!  7      1    mode: 0 = sgq, 1 = uniform (per tensor), 2 = fp16 (raw)
//!  8      1    bits b: 1..=8 for sgq/uniform, 16 for fp16
//!  9      1    flags: bit 0 = stochastic rounding, bit 1 = permutation present,
//!              bit 2 = ranges per frame (one per (group, stripe), shared by the N samples; sgq only),
//!              bit 3 = stream order (the channel order is the last one an earlier frame of the
//!              same stream carried; no permutation here; sgq only; excludes bit 1),
//!              bit 4 = constant-block map (sgq only); bits 5..7 are 0
//! 10      1    ndim of the caller's array: 2 (N,C), 3 (N,C,L) or 4 (N,C,H,W)
//! 11      1    reserved, 0
//! 12      4    N  u32   ┐ the 4-D shape; (N,C) is stored as N×C×1×1 and
//! 16      4    C  u32   │ (N,C,L) as N×C×L×1, so stripes cut along L;
//! 20      4    H  u32   │ every dimension ≥ 1, N·C·H·W ≤ MAX_ELEMENTS
//! 24      4    W  u32   ┘
//! 28      4    group g u32: sgq 1..=C; 0 in the other modes
//! 32      4    stripe rows r u32: sgq 1..=H; 0 in the other modes
//! 36      4    permutation length in bytes u32: 2·C if flag bit 1, else 0
//! 40      4    ranges length in bytes u32: sgq 4·N·G·S with G = ⌈C/g⌉, S = ⌈H/r⌉ (bit 2: 4·G·S),
//!              plus ⌈N·G·S / 8⌉ with bit 4 (the map ends this section); uniform 4, fp16 0
//! 44      8    codes length in bytes u64: ⌈K·b / 8⌉ with K codes: N·C·H·W, less (elements − 1) per
//!              constant block with bit 4 (fp16: 2·N·C·H·W)
//! 52      4    CRC32 (IEEE) of bytes 0..52 followed by bytes 56..end
//! 56      .    permutation: C × u16, entry p = the source channel placed at position p
//!         .    ranges: per range lo, hi as binary16 bit patterns (u16 each), ranges in (n, group,
//!              stripe) order, stripe fastest (bit 2: (group, stripe) order); uniform: one range;
//!              lo ≤ hi, both finite
//!         .    constant-block map (bit 4): bit (n·G + k)·S + s, least significant bit first, is 1
//!              when block (group k, stripe s) of sample n is constant; unused bits of the last byte 0
//!         .    codes: sgq/uniform: element i of the (n, position p, h, w) order (w fastest) takes bits
//!              i·b .. i·b+b of the stream, bit k of the stream being bit k mod 8 of byte k / 8 (least
//!              significant bit first); unused bits of the last byte are 0. With bit 4 the same walk
//!              skips the elements of constant blocks except the first one of each (first position of
//!              its group, first row of its stripe, w = 0), whose code the whole block decodes to.
//!              fp16: binary16 values in the original (n, c, h, w) order.
//! ```
//! Without a permutation and without bit 3, the order is the identity. The frame ends exactly after
//! the codes. A frame may not decode to more than [`MAX_EXPANSION`] float32 bytes per frame byte (only
//! constant blocks can come near: 1-bit codes alone give 32); the encoder leaves out a map that would.
//!
//! Decoding ([`frame::parse`]) validates all of this, with checked arithmetic and before allocating
//! anything sized by the header, and returns [`Error::Frame`](crate::Error::Frame) for any violation.
//! A frame with bit 3 is not self-contained: [`decode`] refuses it with a frame error that says so, and
//! [`decode_with_order`] decodes it given the stream's order (checked to be a permutation of `0..C`).
//!
//! Why the order is sent only when it changes, why per-frame ranges and constant blocks exist: at `b`
//! bits without constant blocks the codes of SGQ and of the uniform baseline are the same size, so
//! every byte of ranges and permutation is overhead and SGQ can never be the smaller frame. On
//! 64×16×14×14 post-ReLU features (Fashion-MNIST split 4, `benches/sgq.py`) per-sample ranges for
//! groups of 4 and stripes of 3 rows cost 80 bytes per sample (5 % of the frame); ranges per frame for
//! groups of 1 channel and stripes of 1 row cost 14 bytes per sample, and the 12–13 % of channel rows
//! that are constant (the image's empty border: zero, or the channel's background value) save about
//! 150 bytes per sample as one code each, so that frame is ~9 % smaller than uniform 4-bit's with half
//! its error.
//!
//! What does not live here: the transport (gRPC, Python side) and codec state across frames (the Python
//! `Codec` keeps the channel order it sent and the one it received, and passes them in).

pub mod bitpack;
pub mod codec;
pub mod frame;
pub mod layout;
pub mod order;

pub use codec::{decode, decode_with_order, encode, Plan};
pub use frame::{parse, Frame, Header};
pub use layout::Shape;

use crate::quant::{Clip, Rounding};

/// Largest element count of a frame (a header asking for more is rejected before any allocation).
pub const MAX_ELEMENTS: usize = 1 << 32;
/// Largest ratio of decoded float32 bytes to frame bytes a decoder accepts. Without a constant-block
/// map a frame is at most 32 (1-bit codes); the encoder leaves the map out of a frame it would push
/// past this.
pub const MAX_EXPANSION: usize = 1024;
/// Largest magnitude binary16 holds; values beyond it cannot be encoded.
pub const F16_MAX: f32 = 65504.0;
/// Default channels per group.
pub const DEFAULT_GROUP: usize = 4;

/// Which encoding a frame uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Channel order, groups × stripes, one binary16 range per (sample, group, stripe).
    Sgq,
    /// One binary16 range for the whole tensor (the uniform per-tensor baseline).
    Uniform,
    /// Raw binary16 values (the fp16 baseline); `bits` is 16 and rounding nearest.
    Fp16,
}

impl Mode {
    pub fn name(self) -> &'static str {
        match self {
            Mode::Sgq => "sgq",
            Mode::Uniform => "uniform",
            Mode::Fp16 => "fp16",
        }
    }
}

/// Encoder settings.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Settings {
    pub mode: Mode,
    /// 1..=8 for sgq/uniform; ignored (16) for fp16.
    pub bits: u8,
    /// Channels per group (sgq), ≥ 1; clamped to C.
    pub group: usize,
    /// Rows per stripe (sgq); 0 means `max(H / 4, 1)`; clamped to H.
    pub stripe_rows: usize,
    /// Nearest or stochastic (seeded) rounding of the codes.
    pub rounding: Rounding,
    /// Ranges per (sample, group, stripe) or per (group, stripe) for the whole frame (sgq).
    pub ranges: RangeScope,
    /// Blocks (sample, group, stripe) whose values are all equal carry one code instead of one per
    /// element, marked in a map of one bit per block (sgq).
    pub constant_blocks: bool,
    /// Range clipping (sgq): each block's range is narrowed from `[min, max]` before the codes are
    /// computed, and values outside it take the nearest end's code. [`Clip::Sigma`]:
    /// `[max(min, μ − z·σ), min(max, μ + z·σ)]` with the block's mean and population σ (f64);
    /// [`Clip::MinMax`]: `κ·[min, max]` within `[min, max]` (for a block of one sign, only the side
    /// away from zero moves). Mode uniform and fp16 refuse a clip.
    /// An encoder-side choice: frames are the same format and decoders need not know.
    pub clip: Clip,
}

/// Which elements share one range in mode sgq.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum RangeScope {
    /// One range per (sample, group, stripe): `4·N·G·S` bytes of ranges.
    #[default]
    Sample,
    /// One range per (group, stripe) shared by the N samples of the frame: `4·G·S` bytes.
    Frame,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            mode: Mode::Sgq,
            bits: 4,
            group: DEFAULT_GROUP,
            stripe_rows: 0,
            rounding: Rounding::Nearest,
            ranges: RangeScope::Sample,
            constant_blocks: false,
            clip: Clip::None,
        }
    }
}
