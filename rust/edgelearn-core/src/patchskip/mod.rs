//! PASS-style patch-skip inference for video: recompute only the parts of a conv net's feature maps that
//! a changed input patch can reach, reuse cached results for the rest.
//!
//! - [`region`]: tile bitmaps ([`TileMap`]), the per-patch change gate and the dilation of a dirty region
//!   through one layer's window (stride-aware halos).
//! - [`input`]: uint8 frames as the model's input ([`U8Input`]) and the change gate on their bytes.
//! - [`tile_ops`]: conv / pooling / pointwise ops evaluated on output rectangles only, in bands spread
//!   over the thread pool, reading the cached input feature map around them.
//! - [`runner`]: [`PatchSkip`], the per-stream state (input reference, per-layer output caches) and the
//!   per-frame schedule (dense first frame and every K frames, sparse otherwise).
//!
//! Not here: video decoding, the Python module walk (`edgelearn.video`).

pub mod input;
pub mod region;
pub mod runner;
pub mod tile_ops;

pub use input::{gate_u8, U8Input};
pub use region::{changed_patches, dilate, gate, window_span, GateResult, TileMap};
pub use runner::{FrameStats, Int8Scales, Layer, PatchSkip, PatchSkipConfig};
