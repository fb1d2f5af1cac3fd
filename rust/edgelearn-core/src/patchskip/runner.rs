//! The per-stream runner: reference frame, per-layer output caches, the per-frame schedule.
//!
//! Layers are grouped into stages: one spatial op (FP32 or INT8 conv, max/avg pooling, or identity when a
//! model starts with a pointwise op) followed by the pointwise ops (ReLU, eval batch norm, per-channel
//! affine) applied in place to its output. Per frame:
//!
//! 1. Gate ([`gate`]): flag the input patches (size `patch`) whose max |frame − reference| over all
//!    channels exceeds the threshold; copy the frame into the reference on those patches only. The
//!    reference is therefore exactly what the caches were computed from, so slow drifts accumulate until
//!    they trip the gate (no silent loss of small changes). The gate also estimates the error left
//!    (relative L2 of the unflagged change); past `error_bound` the frame runs densely instead.
//! 2. For each stage: dilate the dirty pixels of its input through its window ([`dilate`]) to the output
//!    pixels (tiles of `tile`, 1 by default) that can change, and recompute only those rectangles,
//!    reading the cached input map around them ([`conv_rects`], [`conv_rects_i8`], [`pool_rects`]), then
//!    apply the pointwise ops there. A stage whose dirty part passes `dense_above` runs its dense kernel.
//! 3. The first frame after construction/[`PatchSkip::reset`], every `refresh_every`-th frame and error
//!    refreshes run densely. INT8 input scales are calibrated on dense frames ([`Int8Scales::Frozen`]) or
//!    recomputed every frame with a full-layer recompute when they move ([`Int8Scales::Dynamic`]).
//!
//! Invariant: every cache equals dense inference of the reference frame (up to float rounding of the
//! GEMM's summation order; for INT8 with the cached input scales); with threshold 0 the reference equals
//! the frame, hence output = dense.

use std::time::Instant;

use super::input::{gate_u8, U8Input};
use super::region::{dilate, gate, GateResult, TileMap};
use super::tile_ops::{
    conv_rects, conv_rects_i8, pointwise_rects, pool_rects, quantize_rects, ConvI8Params,
    ConvParams, DirectPlan, NextCodes, Pointwise, Rect,
};
use crate::error::{Error, Result};
use crate::nn::{Geometry, Window2d};
use crate::quant::{absmax, quantize_nearest_with_scale, scale_for_absmax};

/// One layer of the chain, as given by the caller.
#[derive(Clone, Debug)]
pub enum Layer {
    /// `weight (o, c/groups, kh, kw)`, optional bias `(o,)`; `groups` > 1 for grouped/depthwise
    /// convolutions, `dilation` as PyTorch's.
    Conv2d {
        weight: Vec<f32>,
        shape: [usize; 4],
        bias: Option<Vec<f32>>,
        stride: (usize, usize),
        padding: (usize, usize),
        groups: usize,
        dilation: (usize, usize),
    },
    /// Eval-mode batch norm with running statistics: `y = x·a + b`, `a = γ/√(var+eps)`, `b = β − mean·a`.
    BatchNorm2d {
        gamma: Vec<f32>,
        beta: Vec<f32>,
        mean: Vec<f32>,
        var: Vec<f32>,
        eps: f32,
    },
    /// Octo INT8 convolution in eval mode: weight codes `wq (o, c/groups, kh, kw)`, weight scale `sw` (one
    /// value or one per output channel), optional FP32 bias; its input is quantized per tensor, nearest
    /// rounding.
    Conv2dInt8 {
        wq: Vec<i8>,
        sw: Vec<f32>,
        shape: [usize; 4],
        bias: Option<Vec<f32>>,
        stride: (usize, usize),
        padding: (usize, usize),
        groups: usize,
        dilation: (usize, usize),
    },
    /// Per-channel `y = x·a + b` (e.g. LAC compensation folded: `a = 1`, `b = α⊙μ + β`).
    Affine {
        a: Vec<f32>,
        b: Vec<f32>,
    },
    Relu,
    /// `min(max(x, 0), 6)`.
    Relu6,
    MaxPool2d(Window2d),
    AvgPool2d(Window2d),
    /// Remembers the current tensor (the output of the layers so far, or the input before any) as the next
    /// mark (numbered 0, 1, ... in order); later pointwise layers start a new stage, so it stays as it is.
    Mark,
    /// The next layer reads mark `m` instead of the current tensor (a side branch such as a ResNet
    /// downsample).
    From(usize),
    /// Adds mark `m` (same shape) to the current tensor (a residual add); pointwise layers after it apply
    /// to the sum.
    Add(usize),
}

/// How an INT8 convolution's input scale is chosen on frames that are not recomputed densely.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Int8Scales {
    /// Calibrated whenever the layer is recomputed in full (dense frames, or a dirty part past
    /// `dense_above`) and held in between: every cached value stays valid, values beyond the calibrated
    /// range saturate at ±127.
    Frozen,
    /// Recomputed from the layer's whole input every frame, as the model does; when it changes, the layer
    /// (and so everything after it) is recomputed in full. Exact, but slow when the range moves.
    Dynamic,
}

/// Gate and schedule settings.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct PatchSkipConfig {
    /// Side of the gate's input patches, in pixels.
    pub patch: usize,
    /// A patch is recomputed when its max |change| exceeds this (0: any change).
    pub threshold: f32,
    /// Dense refresh every this many frames (0: only the first frame).
    pub refresh_every: usize,
    /// Side of the output tiles each layer recomputes, in output pixels.
    pub tile: usize,
    /// Dense refresh when the gate's estimated error ([`FrameStats::estimated_error`]) exceeds this
    /// (0: never).
    pub error_bound: f32,
    /// Input scales of INT8 convolutions.
    pub int8_scales: Int8Scales,
    /// A layer whose dirty output covers at least this fraction of its map is recomputed with the dense
    /// kernel instead (fragmented sparse work costs more per pixel: halo gathers, small GEMMs); 1: never
    /// unless all of it is dirty.
    pub dense_above: f32,
}

impl Default for PatchSkipConfig {
    fn default() -> Self {
        PatchSkipConfig {
            patch: 16,
            threshold: 0.0,
            refresh_every: 0,
            tile: 1,
            error_bound: 0.0,
            int8_scales: Int8Scales::Frozen,
            dense_above: 0.85,
        }
    }
}

/// What the last frame cost.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct FrameStats {
    /// Frame index since construction / reset (0-based).
    pub frame: usize,
    /// Whether the frame ran densely (first frame or forced refresh).
    pub dense: bool,
    /// Fraction of input patches the gate flagged.
    pub patch_fraction: f64,
    /// Per stage: fraction of output tiles recomputed.
    pub layer_fractions: Vec<f64>,
    /// Recomputed work over dense work, weighting each stage's recomputed output pixels by its cost per pixel.
    pub compute_fraction: f64,
    /// Relative L2 distance between the frame and the input the caches now represent (the change in
    /// the patches the gate let through); 0 on dense frames.
    pub estimated_error: f64,
    /// Whether the frame ran densely because `estimated_error` passed `error_bound`.
    pub error_refresh: bool,
    /// Wall time of the frame (gate + recompute), seconds.
    pub seconds: f64,
    /// Wall time of the change gate (frame checks and scores, flags, reference update; for uint8 frames
    /// also the conversion of the flagged patches), seconds.
    pub gate_seconds: f64,
    /// Wall time of the region bookkeeping (dilation through each layer, rectangles, bands), seconds.
    pub bookkeeping_seconds: f64,
    /// Wall time of the layers' recompute (sparse bands or dense stages), seconds.
    pub recompute_seconds: f64,
    /// Per stage: wall time of its recompute, seconds (0 for a stage nothing reached).
    pub layer_seconds: Vec<f64>,
    /// Whether the output changed (some output pixel was recomputed); a dense tail after the runner
    /// need not run again when it did not.
    pub output_changed: bool,
}

#[derive(Clone, Debug)]
enum Spatial {
    Conv(ConvParams),
    ConvI8(ConvI8Params),
    MaxPool(Window2d),
    AvgPool(Window2d),
    Identity,
    /// Adds the output of source `s` (see [`Stage::src`]) to the input.
    Add(usize),
}

#[derive(Debug)]
struct Stage {
    /// What the stage reads: 0 the input (reference), `j + 1` the output of stage `j` (always an earlier one).
    src: usize,
    spatial: Spatial,
    post: Vec<Pointwise>,
    /// Kept to build `post` once the channel count is known.
    bn: Vec<(usize, Layer)>,
    in_shape: [usize; 3],
    out_shape: [usize; 3],
    out: Vec<f32>,
    /// multiply-adds (or reads) per output pixel, for the compute fraction
    cost: f64,
    /// input scale the cache of an INT8 conv was computed with
    sx: f32,
    /// an INT8 conv's input codes with scale `sx` (kept up to date where the input changes)
    xq: Vec<i8>,
    /// an INT8 conv's weights packed for the direct kernel, when its bands take it
    direct: Option<DirectPlan>,
    /// the stage that alone reads this one's output, when it is an INT8 conv: a sparse conv stage
    /// writes that stage's input codes with its outputs ([`NextCodes`])
    next_i8: Option<usize>,
    /// `out` misses outputs that were written as the reader's codes alone since the stage last ran in
    /// full (see [`PatchSkip::run_sparse`]): only those codes describe them
    stale: bool,
}

impl Stage {
    fn window(&self) -> Window2d {
        match &self.spatial {
            Spatial::Conv(p) => p.window(),
            Spatial::ConvI8(p) => p.window(),
            Spatial::MaxPool(w) | Spatial::AvgPool(w) => *w,
            Spatial::Identity | Spatial::Add(_) => Window2d::new((1, 1), (1, 1), (0, 0)),
        }
    }
}

/// Source `s` of a stage (0: the input `reference`, `j + 1`: the output of stage `j` among `prev`).
fn source<'a>(reference: &'a [f32], prev: &'a [Stage], s: usize) -> &'a [f32] {
    if s == 0 {
        reference
    } else {
        &prev[s - 1].out
    }
}

/// Patch-skip inference of a conv / pool / pointwise chain over a stream of `(c, h, w)` frames.
#[derive(Debug)]
pub struct PatchSkip {
    cfg: PatchSkipConfig,
    stages: Vec<Stage>,
    shape: Option<[usize; 3]>,
    reference: Vec<f32>,
    /// the uint8 frame bytes `reference` was converted from, with their conversion (uint8 streams only)
    reference_u8: Option<(U8Input, Vec<u8>)>,
    frames: usize,
    stats: FrameStats,
    /// Sparse conv stages write their f32 outputs even where the reader takes their codes alone (tests
    /// compare the codes with those outputs).
    keep_values: bool,
    /// Stale stages run in full because their reader was (see `run_sparse`), for the tests.
    forced_full: usize,
}

fn bn_affine(gamma: &[f32], beta: &[f32], mean: &[f32], var: &[f32], eps: f32) -> Pointwise {
    // the same arithmetic as crate::nn::batchnorm2d_forward in eval mode
    let (mut a, mut b) = (
        Vec::with_capacity(gamma.len()),
        Vec::with_capacity(gamma.len()),
    );
    for ch in 0..gamma.len() {
        let invstd = (1.0 / (var[ch] as f64 + eps as f64).sqrt()) as f32;
        let ac = gamma[ch] * invstd;
        a.push(ac);
        b.push(beta[ch] - mean[ch] * ac);
    }
    Pointwise::Affine { a, b }
}

impl PatchSkip {
    /// Builds a runner over `layers` (in order). Shapes are checked against the first frame.
    pub fn new(layers: Vec<Layer>, cfg: PatchSkipConfig) -> Result<Self> {
        if cfg.patch == 0 {
            return Err(Error::invalid("patch", "must be positive, got 0"));
        }
        if cfg.tile == 0 {
            return Err(Error::invalid("tile", "must be positive, got 0"));
        }
        if cfg.threshold.is_nan() || cfg.threshold < 0.0 {
            return Err(Error::invalid(
                "threshold",
                format!("must be >= 0 and not NaN, got {}", cfg.threshold),
            ));
        }
        if cfg.error_bound.is_nan() || cfg.error_bound < 0.0 {
            return Err(Error::invalid(
                "error_bound",
                format!("must be >= 0 and not NaN (0: off), got {}", cfg.error_bound),
            ));
        }
        if !(cfg.dense_above > 0.0 && cfg.dense_above <= 1.0) {
            return Err(Error::invalid(
                "dense_above",
                format!("must be in (0, 1], got {}", cfg.dense_above),
            ));
        }
        if layers.is_empty() {
            return Err(Error::invalid("layers", "the model has no layers"));
        }
        let mut stages: Vec<Stage> = Vec::new();
        // the source the next layer reads, and whether pointwise layers must start a new stage there (the
        // source is marked, or it is not the last stage's output)
        let mut cur = 0usize;
        let mut sealed = false;
        let mut marks: Vec<usize> = Vec::new();
        let new_stage = |src, spatial| Stage {
            src,
            spatial,
            post: Vec::new(),
            bn: Vec::new(),
            in_shape: [0; 3],
            out_shape: [0; 3],
            out: Vec::new(),
            cost: 0.0,
            sx: 1.0,
            xq: Vec::new(),
            direct: None,
            next_i8: None,
            stale: false,
        };
        let mark = |marks: &[usize], i: usize, m: usize| {
            marks.get(m).copied().ok_or_else(|| {
                Error::invalid(
                    "layers",
                    format!(
                        "layer {i}: mark {m} does not exist yet ({} marks so far)",
                        marks.len()
                    ),
                )
            })
        };
        for (i, layer) in layers.into_iter().enumerate() {
            let spatial_before = stages.len();
            match layer {
                Layer::Mark => {
                    marks.push(cur);
                    sealed = true;
                    continue;
                }
                Layer::From(m) => {
                    cur = mark(&marks, i, m)?;
                    sealed = true;
                    continue;
                }
                Layer::Add(m) => {
                    let other = mark(&marks, i, m)?;
                    stages.push(new_stage(cur, Spatial::Add(other)));
                }
                Layer::Conv2d {
                    weight,
                    shape,
                    bias,
                    stride,
                    padding,
                    groups,
                    dilation,
                } => {
                    check_conv(
                        i,
                        weight.len(),
                        shape,
                        bias.as_deref(),
                        stride,
                        groups,
                        dilation,
                    )?;
                    stages.push(new_stage(
                        cur,
                        Spatial::Conv(ConvParams {
                            weight,
                            shape,
                            bias,
                            stride,
                            padding,
                            groups,
                            dilation,
                        }),
                    ));
                }
                Layer::Conv2dInt8 {
                    wq,
                    sw,
                    shape,
                    bias,
                    stride,
                    padding,
                    groups,
                    dilation,
                } => {
                    check_conv(
                        i,
                        wq.len(),
                        shape,
                        bias.as_deref(),
                        stride,
                        groups,
                        dilation,
                    )?;
                    if sw.len() != 1 && sw.len() != shape[0] {
                        return Err(Error::invalid(
                            "layers",
                            format!(
                                "layer {i}: INT8 conv weight scale must have 1 or {} values, got {}",
                                shape[0],
                                sw.len()
                            ),
                        ));
                    }
                    if let Some(j) = sw.iter().position(|v| !(v.is_finite() && *v > 0.0)) {
                        return Err(Error::invalid(
                            "layers",
                            format!("layer {i}: INT8 conv weight scale {j} must be finite and positive, got {}", sw[j]),
                        ));
                    }
                    let p = ConvI8Params {
                        wq,
                        sw,
                        shape,
                        bias,
                        stride,
                        padding,
                        groups,
                        dilation,
                    };
                    let direct = p.direct_weights()?;
                    stages.push(Stage {
                        direct,
                        ..new_stage(cur, Spatial::ConvI8(p))
                    });
                }
                Layer::MaxPool2d(w) | Layer::AvgPool2d(w)
                    if w.kernel.0 == 0
                        || w.kernel.1 == 0
                        || w.stride.0 == 0
                        || w.stride.1 == 0
                        || w.padding.0 > w.kernel.0 / 2
                        || w.padding.1 > w.kernel.1 / 2 =>
                {
                    return Err(Error::invalid("layers", format!("layer {i}: bad pooling window {w:?} (positive kernel/stride, padding at most half the kernel)")));
                }
                Layer::MaxPool2d(w) => stages.push(new_stage(cur, Spatial::MaxPool(w))),
                Layer::AvgPool2d(w) => stages.push(new_stage(cur, Spatial::AvgPool(w))),
                Layer::Relu | Layer::Relu6 | Layer::BatchNorm2d { .. } | Layer::Affine { .. } => {
                    if cur == 0 || sealed || cur != stages.len() {
                        stages.push(new_stage(cur, Spatial::Identity));
                        cur = stages.len();
                        sealed = false;
                    }
                    let st = stages.last_mut().expect("a stage exists");
                    match layer {
                        Layer::Relu => st.post.push(Pointwise::Relu),
                        Layer::Relu6 => st.post.push(Pointwise::Relu6),
                        Layer::Affine { a, b } => {
                            if a.len() != b.len() {
                                return Err(Error::invalid(
                                    "layers",
                                    format!("layer {i}: affine scale and shift lengths differ ({} vs {})", a.len(), b.len()),
                                ));
                            }
                            st.bn.push((st.post.len(), Layer::Affine { a, b }));
                            st.post.push(Pointwise::Relu); // placeholder, replaced in configure
                        }
                        bn => {
                            st.bn.push((st.post.len(), bn));
                            st.post.push(Pointwise::Relu); // placeholder, replaced in configure
                        }
                    }
                }
            }
            if stages.len() > spatial_before {
                cur = stages.len();
                sealed = false;
            }
        }
        if stages.is_empty() {
            return Err(Error::invalid(
                "layers",
                "the model has no layers to run (only marks)",
            ));
        }
        if cur != stages.len() {
            return Err(Error::invalid(
                "layers",
                "the model ends on a side branch (a From without the Add that joins it)",
            ));
        }
        Ok(PatchSkip {
            cfg,
            stages,
            shape: None,
            reference: Vec::new(),
            reference_u8: None,
            frames: 0,
            stats: FrameStats::default(),
            keep_values: false,
            forced_full: 0,
        })
    }

    pub fn config(&self) -> PatchSkipConfig {
        self.cfg
    }

    /// Forgets the stream: the next frame runs densely and may have any shape.
    pub fn reset(&mut self) {
        self.shape = None;
        self.frames = 0;
        self.reference = Vec::new();
        self.reference_u8 = None;
        self.stats = FrameStats::default();
        for st in &mut self.stages {
            st.out = Vec::new();
            st.stale = false;
        }
    }

    /// Statistics of the last frame.
    pub fn stats(&self) -> &FrameStats {
        &self.stats
    }

    /// Shape `(c, h, w)` of the frames this stream was started with, if any.
    pub fn input_shape(&self) -> Option<[usize; 3]> {
        self.shape
    }

    /// Shape of the output, once a frame has been seen.
    pub fn output_shape(&self) -> Option<[usize; 3]> {
        self.shape
            .map(|_| self.stages.last().map_or([0; 3], |s| s.out_shape))
    }

    /// Checks every stage against an input of `shape` and allocates the caches.
    fn configure(&mut self, shape: [usize; 3]) -> Result<()> {
        // shapes[s]: the shape of source s (0: the input, j + 1: stage j's output)
        let mut shapes = vec![shape];
        for (i, st) in self.stages.iter_mut().enumerate() {
            let cur = shapes[st.src];
            let [c, h, w] = cur;
            let win = st.window();
            let (oc, cost) = match &st.spatial {
                Spatial::Conv(p) => {
                    if p.shape[1] * p.groups != c {
                        return Err(Error::invalid("frame", format!("stage {i}: conv expects {} input channels, got {c} (input shape {shape:?})", p.shape[1] * p.groups)));
                    }
                    (
                        p.shape[0],
                        (p.shape[0] * p.shape[1] * p.shape[2] * p.shape[3]) as f64,
                    )
                }
                Spatial::ConvI8(p) => {
                    if p.shape[1] * p.groups != c {
                        return Err(Error::invalid("frame", format!("stage {i}: conv expects {} input channels, got {c} (input shape {shape:?})", p.shape[1] * p.groups)));
                    }
                    (
                        p.shape[0],
                        (p.shape[0] * p.shape[1] * p.shape[2] * p.shape[3]) as f64,
                    )
                }
                Spatial::MaxPool(_) | Spatial::AvgPool(_) => {
                    (c, (c * win.kernel.0 * win.kernel.1) as f64)
                }
                Spatial::Identity => (c, c as f64),
                Spatial::Add(other) => {
                    if shapes[*other] != cur {
                        return Err(Error::invalid("frame", format!("stage {i}: residual add of shapes {cur:?} and {:?} (input shape {shape:?})", shapes[*other])));
                    }
                    (c, c as f64)
                }
            };
            let g = Geometry::new("frame", [1, c, h, w], win).map_err(|e| {
                Error::invalid(
                    "frame",
                    format!("stage {i}: input shape {cur:?} does not fit the layer ({e})"),
                )
            })?;
            for (pos, layer) in &st.bn {
                match layer {
                    Layer::BatchNorm2d {
                        gamma,
                        beta,
                        mean,
                        var,
                        eps,
                    } => {
                        if [gamma.len(), beta.len(), mean.len(), var.len()]
                            .iter()
                            .any(|&n| n != oc)
                        {
                            return Err(Error::invalid(
                                "frame",
                                format!(
                                    "stage {i}: batch norm has {} channels, its input has {oc}",
                                    gamma.len()
                                ),
                            ));
                        }
                        st.post[*pos] = bn_affine(gamma, beta, mean, var, *eps);
                    }
                    Layer::Affine { a, b } => {
                        if a.len() != oc {
                            return Err(Error::invalid(
                                "frame",
                                format!(
                                    "stage {i}: per-channel affine has {} channels, its input has {oc}",
                                    a.len()
                                ),
                            ));
                        }
                        st.post[*pos] = Pointwise::Affine {
                            a: a.clone(),
                            b: b.clone(),
                        };
                    }
                    _ => {}
                }
            }
            st.in_shape = cur;
            st.out_shape = [oc, g.oh, g.ow];
            let out_len = oc.checked_mul(g.oh * g.ow).unwrap_or(usize::MAX);
            st.out = crate::alloc::try_vec(
                &format!("frame: stage {i}'s output {:?}", [oc, g.oh, g.ow]),
                out_len,
                0.0,
            )?;
            st.cost = cost + st.post.len() as f64 * oc as f64;
            shapes.push(st.out_shape);
        }
        // the single reader of each stage's output, when it is an INT8 conv
        for i in 0..self.stages.len() {
            let readers: Vec<usize> = (0..self.stages.len())
                .filter(|&j| {
                    let st = &self.stages[j];
                    st.src == i + 1 || matches!(st.spatial, Spatial::Add(o) if o == i + 1)
                })
                .collect();
            self.stages[i].next_i8 = match readers[..] {
                [j] if matches!(self.stages[j].spatial, Spatial::ConvI8(_)) => Some(j),
                _ => None,
            };
        }
        self.shape = Some(shape);
        self.reference = crate::alloc::try_vec("frame", shape.iter().product(), 0.0)?;
        Ok(())
    }

    /// Runs one `(c, h, w)` frame (C-ordered) and returns the output `(c', h', w')` cache.
    pub fn run(&mut self, frame: &[f32], shape: [usize; 3]) -> Result<&[f32]> {
        let t0 = Instant::now();
        let n = shape
            .iter()
            .try_fold(1usize, |a, &d| a.checked_mul(d))
            .unwrap_or(usize::MAX);
        if frame.len() != n || n == 0 {
            return Err(Error::invalid(
                "frame",
                format!(
                    "expected a non-empty frame of shape {shape:?}, got {} values",
                    frame.len()
                ),
            ));
        }
        if let Some(i) = frame.iter().position(|v| !v.is_finite()) {
            return Err(Error::NonFinite {
                arg: "frame",
                index: i,
            });
        }
        self.check_shape(shape)?;
        self.reference_u8 = None;
        let mut stats = FrameStats {
            frame: self.frames,
            ..FrameStats::default()
        };
        let mut dirty = None;
        if !self.scheduled_dense() {
            let g = gate(
                frame,
                &self.reference,
                shape,
                self.cfg.patch,
                self.cfg.threshold,
            )?;
            if let Some(map) = self.judge(g, &mut stats) {
                let [c, h, w] = shape;
                for (y0, y1, x0, x1) in map.rects() {
                    for ch in 0..c {
                        for y in y0..y1 {
                            let o = (ch * h + y) * w;
                            self.reference[o + x0..o + x1].copy_from_slice(&frame[o + x0..o + x1]);
                        }
                    }
                }
                dirty = Some(map);
            }
        }
        if dirty.is_none() {
            self.reference.copy_from_slice(frame);
        }
        stats.gate_seconds = t0.elapsed().as_secs_f64();
        self.finish(dirty, stats, t0)
    }

    /// Runs one uint8 `(H, W, C_in)` frame (a decoded video frame, C-ordered), converted to the model's
    /// input as `input` says ([`U8Input`], the arithmetic of `edgelearn.video.preprocess`). The gate
    /// compares bytes with the bytes the caches were computed from, and only flagged patches are
    /// converted to float: a frame where nothing changed costs one pass over its bytes. Same results as
    /// [`run`](Self::run) on the converted frame (up to the gate's rounding of a change exactly at the
    /// threshold).
    pub fn run_u8(&mut self, frame: &[u8], input: U8Input) -> Result<&[f32]> {
        let t0 = Instant::now();
        let [h, w, cin] = input.hwc;
        if frame.len() != h * w * cin {
            return Err(Error::invalid(
                "frame",
                format!(
                    "expected {} bytes for a {:?} frame, got {}",
                    h * w * cin,
                    input.hwc,
                    frame.len()
                ),
            ));
        }
        let shape = input.chw;
        self.check_shape(shape)?;
        let mut stats = FrameStats {
            frame: self.frames,
            ..FrameStats::default()
        };
        let same_stream = matches!(&self.reference_u8, Some((inp, _)) if *inp == input);
        let mut dirty = None;
        if same_stream && !self.scheduled_dense() {
            let (inp, bytes) = self.reference_u8.as_mut().expect("checked above");
            let g = gate_u8(frame, bytes, inp, self.cfg.patch, self.cfg.threshold)?;
            if let Some(map) = self.judge(g, &mut stats) {
                let (inp, bytes) = self.reference_u8.as_mut().expect("checked above");
                for rect @ (y0, y1, x0, x1) in map.rects() {
                    for y in y0..y1 {
                        let r = (y * w + x0) * cin..(y * w + x1) * cin;
                        bytes[r.clone()].copy_from_slice(&frame[r]);
                    }
                    inp.convert_rect(frame, rect, &mut self.reference);
                }
                dirty = Some(map);
            }
        }
        if dirty.is_none() {
            input.convert_rect(frame, (0, h, 0, w), &mut self.reference);
            match &mut self.reference_u8 {
                Some((_, bytes)) if same_stream => bytes.copy_from_slice(frame),
                _ => self.reference_u8 = Some((input, frame.to_vec())),
            }
        }
        stats.gate_seconds = t0.elapsed().as_secs_f64();
        self.finish(dirty, stats, t0)
    }

    /// Checks `shape` against the stream's (configuring the runner on its first frame).
    fn check_shape(&mut self, shape: [usize; 3]) -> Result<()> {
        match self.shape {
            None => self.configure(shape),
            Some(s) if s != shape => {
                Err(Error::invalid("frame", format!("shape changed mid-stream: expected {s:?} (the first frame's), got {shape:?}; call reset() to start a new stream")))
            }
            _ => Ok(()),
        }
    }

    /// Whether this frame runs densely by schedule (first frame, forced refresh).
    fn scheduled_dense(&self) -> bool {
        self.frames == 0
            || (self.cfg.refresh_every > 0 && self.frames.is_multiple_of(self.cfg.refresh_every))
    }

    /// The gate's verdict: the dirty patches, or `None` for an error refresh (recorded in `stats`).
    fn judge(&self, g: GateResult, stats: &mut FrameStats) -> Option<TileMap> {
        stats.estimated_error = g.estimated_error();
        stats.error_refresh =
            self.cfg.error_bound > 0.0 && stats.estimated_error > self.cfg.error_bound as f64;
        if stats.error_refresh {
            return None;
        }
        stats.patch_fraction = g.map.fraction();
        Some(g.map)
    }

    /// Recomputes the frame (densely when `dirty` is `None`; the reference is up to date) and records
    /// its statistics.
    fn finish(
        &mut self,
        dirty: Option<TileMap>,
        mut stats: FrameStats,
        t0: Instant,
    ) -> Result<&[f32]> {
        match dirty {
            None => {
                let t = Instant::now();
                stats.dense = true;
                stats.estimated_error = 0.0;
                stats.layer_seconds = self.run_dense()?;
                stats.patch_fraction = 1.0;
                stats.layer_fractions = vec![1.0; self.stages.len()];
                stats.compute_fraction = 1.0;
                stats.output_changed = true;
                stats.recompute_seconds = t.elapsed().as_secs_f64();
            }
            Some(map) => {
                let (done, total) = self.run_sparse(map, &mut stats)?;
                stats.compute_fraction = if total > 0.0 { done / total } else { 0.0 };
            }
        }
        self.frames += 1;
        stats.seconds = t0.elapsed().as_secs_f64();
        self.stats = stats;
        Ok(&self.stages.last().expect("at least one stage").out)
    }

    /// Recomputes every stage densely; returns each stage's wall time.
    fn run_dense(&mut self) -> Result<Vec<f64>> {
        let mut times = Vec::with_capacity(self.stages.len());
        for i in 0..self.stages.len() {
            let t = Instant::now();
            let (prev, rest) = self.stages.split_at_mut(i);
            let st = &mut rest[0];
            let input = source(&self.reference, prev, st.src);
            let other = match st.spatial {
                Spatial::Add(o) => Some(source(&self.reference, prev, o)),
                _ => None,
            };
            dense_stage(st, input, other)?;
            st.stale = false;
            times.push(t.elapsed().as_secs_f64());
        }
        Ok(times)
    }

    /// Recomputes the tiles reachable from the dirty input patches; returns (work done, dense work) and
    /// fills the per-layer fractions, the time split and `output_changed` of `stats`.
    ///
    /// Codes alone: a conv stage whose only reader is an INT8 conv writes that reader's input codes with
    /// its outputs ([`NextCodes`]), and with frozen scales (where the dirty maps, and which stages run in
    /// full, follow from the gate alone and are planned first) leaves its f32 outputs out unless the
    /// reader runs in full this frame, the one case in which it reads the f32 map. The map is then
    /// `stale`; a stale stage whose reader runs in full runs in full itself (before it, planned from the
    /// last stage back), so a full reader always reads a whole, current map. Every code and every output
    /// of the last stage is the same as with the f32 outputs written (test
    /// `codes_alone_change_no_output`).
    fn run_sparse(&mut self, gate: TileMap, stats: &mut FrameStats) -> Result<(f64, f64)> {
        // per source (0: the input, j + 1: stage j's output): its dirty tiles, and the rectangles that
        // changed (`None`: all of it)
        let mut changed: Vec<Option<Vec<Rect>>> = vec![Some(gate.rects())];
        // per source: whether its reader's input codes were written with it this frame
        let mut coded: Vec<bool> = vec![false; self.stages.len() + 1];
        let (mut done, mut total) = (0.0, 0.0);
        let (mut book, mut work) = (0.0f64, 0.0f64);
        let n = self.stages.len();
        let last = n - 1;
        let dense_above = self.cfg.dense_above as f64;
        // per source: its dirty tiles (a stage in full: all of them); planned here for every stage with
        // frozen scales, else made as the stages run
        let mut maps: Vec<TileMap> = Vec::with_capacity(n + 1);
        maps.push(gate);
        // with frozen scales: which stages run in full, and which of them only because they were stale
        let plan = if self.cfg.int8_scales == Int8Scales::Frozen {
            let tb = Instant::now();
            let (mut full, mut forced) = (vec![false; n], vec![false; n]);
            for (i, st) in self.stages.iter().enumerate() {
                let mut m = stage_map(st, &maps, self.cfg.tile)?;
                if m.fraction() >= dense_above {
                    m.fill(true);
                    full[i] = true;
                }
                maps.push(m);
            }
            for i in (0..n).rev() {
                if let Some(j) = self.stages[i].next_i8 {
                    // its only reader is `j`, already in full: filling its map changes no other map
                    if full[j] && self.stages[i].stale && !full[i] {
                        full[i] = true;
                        forced[i] = true;
                        maps[i + 1].fill(true);
                        self.forced_full += 1;
                    }
                }
            }
            book += tb.elapsed().as_secs_f64();
            Some((full, forced))
        } else {
            None
        };
        for i in 0..n {
            let tb = Instant::now();
            let (prev, rest) = self.stages.split_at_mut(i);
            let (cur, later) = rest.split_at_mut(1);
            let st = &mut cur[0];
            let input = source(&self.reference, prev, st.src);
            let [oc, oh, ow] = st.out_shape;
            let other = match st.spatial {
                Spatial::Add(o) => Some(source(&self.reference, prev, o)),
                _ => None,
            };
            let full = match &plan {
                Some((full, _)) => full[i],
                None => {
                    let mut m = stage_map(st, &maps, self.cfg.tile)?;
                    let mut full = m.fraction() >= dense_above;
                    if let (Spatial::ConvI8(_), Int8Scales::Dynamic) =
                        (&st.spatial, self.cfg.int8_scales)
                    {
                        // the whole layer's codes change with the scale
                        full |= input_scale(input) != st.sx;
                    }
                    if full {
                        m.fill(true);
                    }
                    maps.push(m);
                    full
                }
            };
            let out_map = &maps[i + 1];
            if full {
                stats.layer_fractions.push(1.0);
                done += (oh * ow) as f64 * st.cost;
                total += (oh * ow) as f64 * st.cost;
                book += tb.elapsed().as_secs_f64();
                let tw = Instant::now();
                if plan.as_ref().is_some_and(|(_, forced)| forced[i]) {
                    refresh_stage(st, input, &changed[st.src], coded[st.src])?;
                } else {
                    dense_stage(st, input, other)?;
                }
                st.stale = false;
                let dt = tw.elapsed().as_secs_f64();
                work += dt;
                stats.layer_seconds.push(dt);
                stats.output_changed |= i == last;
                changed.push(None);
                continue;
            }
            let rects = out_map.rects();
            stats.layer_fractions.push(out_map.fraction());
            let px: usize = rects
                .iter()
                .map(|&(y0, y1, x0, x1)| (y1 - y0) * (x1 - x0))
                .sum();
            done += px as f64 * st.cost;
            total += (oh * ow) as f64 * st.cost;
            book += tb.elapsed().as_secs_f64();
            if rects.is_empty() {
                // nothing reaches this stage: its cache holds
                stats.layer_seconds.push(0.0);
                changed.push(Some(rects));
                continue;
            }
            let tw = Instant::now();
            stats.output_changed |= i == last;
            // the reader's codes, written with the outputs (it was set up by a dense frame); the outputs
            // too unless codes alone do (see above)
            let is_i8 = matches!(st.spatial, Spatial::ConvI8(_));
            let values = |j: usize| {
                self.keep_values || !is_i8 || plan.as_ref().is_none_or(|(full, _)| full[j])
            };
            let next = st
                .next_i8
                .map(|j| (values(j), &mut later[j - i - 1]))
                .filter(|(_, r)| r.xq.len() == st.out.len())
                .map(|(values, r)| NextCodes {
                    codes: &mut r.xq,
                    sx: r.sx,
                    values,
                });
            coded[i + 1] =
                next.is_some() && matches!(st.spatial, Spatial::Conv(_) | Spatial::ConvI8(_));
            if coded[i + 1] && next.as_ref().is_some_and(|c| !c.values) {
                st.stale = true;
            }
            match &st.spatial {
                Spatial::Conv(p) => conv_rects(
                    input,
                    st.in_shape,
                    p,
                    &st.post,
                    &rects,
                    &mut st.out,
                    (oh, ow),
                    next,
                )?,
                Spatial::ConvI8(p) => {
                    let (sx, shape) = (st.sx, st.in_shape);
                    update_codes(
                        &mut st.xq,
                        sx,
                        shape,
                        input,
                        &changed[st.src],
                        coded[st.src],
                    )?;
                    conv_rects_i8(
                        &st.xq,
                        st.in_shape,
                        p,
                        st.sx,
                        &st.post,
                        &rects,
                        &mut st.out,
                        (oh, ow),
                        st.direct.as_ref(),
                        next,
                    )?
                }
                Spatial::MaxPool(win) | Spatial::AvgPool(win) => {
                    let avg = matches!(st.spatial, Spatial::AvgPool(_));
                    pool_rects(input, st.in_shape, *win, avg, &rects, &mut st.out, (oh, ow));
                    pointwise_rects(&st.post, &rects, &mut st.out, oc, (oh, ow));
                }
                Spatial::Identity | Spatial::Add(_) => {
                    let [c, h, w] = st.in_shape;
                    for ch in 0..c {
                        for &(y0, y1, x0, x1) in &rects {
                            for y in y0..y1 {
                                let o = (ch * h + y) * w;
                                let (dst, a) =
                                    (&mut st.out[o + x0..o + x1], &input[o + x0..o + x1]);
                                match other {
                                    Some(b) => {
                                        let b = &b[o + x0..o + x1];
                                        dst.iter_mut()
                                            .zip(a.iter().zip(b))
                                            .for_each(|(d, (x, y))| *d = x + y);
                                    }
                                    None => dst.copy_from_slice(a),
                                }
                            }
                        }
                    }
                    pointwise_rects(&st.post, &rects, &mut st.out, oc, (oh, ow));
                }
            }
            let dt = tw.elapsed().as_secs_f64();
            work += dt;
            stats.layer_seconds.push(dt);
            changed.push(Some(rects));
        }
        stats.bookkeeping_seconds = book;
        stats.recompute_seconds = work;
        Ok((done, total))
    }
}

/// Recomputes the whole output of a stale INT8 conv stage for a reader that runs in full (see
/// `PatchSkip::run_sparse`): from its input codes, brought up to date as its sparse frames do, and its
/// held scale (no recalibration), so the map gets the values every sparse frame would have written.
fn refresh_stage(
    st: &mut Stage,
    input: &[f32],
    changed: &Option<Vec<Rect>>,
    coded: bool,
) -> Result<()> {
    let [oc, oh, ow] = st.out_shape;
    let [c, h, w] = st.in_shape;
    let Spatial::ConvI8(p) = &st.spatial else {
        return Err(Error::invalid(
            "stage",
            "internal: only an INT8 conv stage is refreshed",
        ));
    };
    update_codes(&mut st.xq, st.sx, st.in_shape, input, changed, coded)?;
    p.forward(&st.xq, [1, c, h, w], st.sx, p.padding, &mut st.out)?;
    pointwise_rects(&st.post, &[(0, oh, 0, ow)], &mut st.out, oc, (oh, ow));
    Ok(())
}

/// Brings an INT8 conv stage's input codes `xq` (scale `sx`) up to date with its `input` this frame:
/// nothing to do when the stage before wrote them with its outputs (`coded`), else the rectangles that
/// changed (`None`: all of it).
fn update_codes(
    xq: &mut [i8],
    sx: f32,
    in_shape: [usize; 3],
    input: &[f32],
    changed: &Option<Vec<Rect>>,
    coded: bool,
) -> Result<()> {
    match changed {
        Some(_) if coded => {}
        Some(r) => quantize_rects(input, in_shape, sx, r, xq),
        None => quantize_nearest_with_scale(input, sx, xq)?,
    }
    Ok(())
}

/// The output tiles of `st` to recompute: its window over the dirty tiles of its source(s) among `maps`
/// (0: the input, `j + 1`: stage `j`).
fn stage_map(st: &Stage, maps: &[TileMap], tile: usize) -> Result<TileMap> {
    let [_, oh, ow] = st.out_shape;
    let mut m = dilate(&maps[st.src], st.window(), oh, ow, tile)?;
    if let Spatial::Add(o) = st.spatial {
        let identity = Window2d::new((1, 1), (1, 1), (0, 0));
        m.union_with(&dilate(&maps[o], identity, oh, ow, tile)?);
    }
    Ok(m)
}

/// Recomputes a whole stage from its input with the dense kernels (an INT8 conv recalibrates its input
/// scale: every cached value is rewritten, so the cache stays consistent).
fn dense_stage(st: &mut Stage, input: &[f32], other: Option<&[f32]>) -> Result<()> {
    let [oc, oh, ow] = st.out_shape;
    let full: [Rect; 1] = [(0, oh, 0, ow)];
    let [c, h, w] = st.in_shape;
    match &st.spatial {
        Spatial::Conv(p) => p.forward(input, [1, c, h, w], p.padding, &mut st.out)?,
        Spatial::ConvI8(p) => {
            st.sx = input_scale(input);
            st.xq.resize(input.len(), 0);
            quantize_nearest_with_scale(input, st.sx, &mut st.xq)?;
            p.forward(&st.xq, [1, c, h, w], st.sx, p.padding, &mut st.out)?;
        }
        Spatial::MaxPool(win) => pool_rects(
            input,
            st.in_shape,
            *win,
            false,
            &full,
            &mut st.out,
            (oh, ow),
        ),
        Spatial::AvgPool(win) => {
            pool_rects(input, st.in_shape, *win, true, &full, &mut st.out, (oh, ow))
        }
        Spatial::Identity => st.out.copy_from_slice(input),
        Spatial::Add(_) => {
            let b = other.expect("an add stage gets its second operand");
            st.out
                .iter_mut()
                .zip(input.iter().zip(b))
                .for_each(|(d, (x, y))| *d = x + y);
        }
    }
    pointwise_rects(&st.post, &full, &mut st.out, oc, (oh, ow));
    Ok(())
}

/// The per-tensor input scale of an INT8 conv: `absmax / 127`, as `quantize` computes it.
fn input_scale(x: &[f32]) -> f32 {
    scale_for_absmax(absmax(x))
}

/// Checks a conv layer's weight length, bias, stride, groups and dilation (`i` names the layer).
fn check_conv(
    i: usize,
    weight_len: usize,
    shape: [usize; 4],
    bias: Option<&[f32]>,
    stride: (usize, usize),
    groups: usize,
    dilation: (usize, usize),
) -> Result<()> {
    let [o, c, kh, kw] = shape;
    if weight_len != o * c * kh * kw || o == 0 || c == 0 || kh == 0 || kw == 0 {
        return Err(Error::invalid(
            "layers",
            format!("layer {i}: conv weight of shape {shape:?} has {weight_len} values"),
        ));
    }
    if bias.is_some_and(|b| b.len() != o) {
        return Err(Error::invalid(
            "layers",
            format!("layer {i}: conv bias must have {o} values"),
        ));
    }
    if stride.0 == 0 || stride.1 == 0 || dilation.0 == 0 || dilation.1 == 0 {
        return Err(Error::invalid(
            "layers",
            format!("layer {i}: stride and dilation must be positive"),
        ));
    }
    if groups == 0 || o % groups != 0 {
        return Err(Error::invalid(
            "layers",
            format!(
                "layer {i}: groups ({groups}) must be positive and divide the {o} output channels"
            ),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lcg(seed: &mut u64) -> f32 {
        *seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((*seed >> 40) as f32) / (1u64 << 24) as f32
    }

    fn layers(seed: &mut u64, int8: bool) -> Vec<Layer> {
        let mut out = Vec::new();
        for &(o, c, k, s, p) in &[(6, 3, 3, 1, 1), (5, 6, 3, 2, 1), (4, 5, 1, 1, 0)] {
            let n = o * c * k * k;
            let weight: Vec<f32> = (0..n).map(|_| lcg(seed) - 0.5).collect();
            let bias = Some((0..o).map(|_| lcg(seed) - 0.5).collect::<Vec<_>>());
            if int8 {
                let amax = weight.iter().fold(0.0f32, |m, v| m.max(v.abs()));
                let sw = scale_for_absmax(amax);
                let mut wq = vec![0i8; n];
                quantize_nearest_with_scale(&weight, sw, &mut wq).unwrap();
                out.push(Layer::Conv2dInt8 {
                    wq,
                    sw: vec![sw],
                    shape: [o, c, k, k],
                    bias,
                    stride: (s, s),
                    padding: (p, p),
                    groups: 1,
                    dilation: (1, 1),
                });
                out.push(Layer::Affine {
                    a: vec![1.0; o],
                    b: (0..o).map(|_| lcg(seed) - 0.5).collect(),
                });
            } else {
                out.push(Layer::Conv2d {
                    weight,
                    shape: [o, c, k, k],
                    bias,
                    stride: (s, s),
                    padding: (p, p),
                    groups: 1,
                    dilation: (1, 1),
                });
            }
            out.push(Layer::Relu);
        }
        out.insert(3, Layer::MaxPool2d(Window2d::new((2, 2), (2, 2), (0, 0))));
        out
    }

    /// A moving blob over a `shape` frame: `frames` frames where a `blob` rectangle from `start` moves by
    /// `step` per frame (values inside the frame's range, so INT8 scales hold still). Checks that sparse
    /// frames of `net` at threshold 0 give what a runner that recomputes every frame densely gives, to
    /// within `tol` per value (0: bit for bit, as INT8 must be; FP32 GEMMs may sum in another order), and
    /// that later frames ran sparsely on under 90% of the work; returns the sparse runner.
    #[allow(clippy::too_many_arguments)]
    fn check_sparse_equals_dense(
        net: Vec<Layer>,
        scales: Int8Scales,
        patch: usize,
        seed: &mut u64,
        shape: [usize; 3],
        frames: usize,
        blob: (usize, usize),
        start: (usize, usize),
        step: (usize, usize),
        tol: f32,
    ) -> PatchSkip {
        let cfg = PatchSkipConfig {
            patch,
            int8_scales: scales,
            ..PatchSkipConfig::default()
        };
        let mut sparse = PatchSkip::new(net.clone(), cfg).unwrap();
        let mut dense = PatchSkip::new(
            net,
            PatchSkipConfig {
                refresh_every: 1,
                ..cfg
            },
        )
        .unwrap();
        let [c, h, w] = shape;
        let mut frame: Vec<f32> = (0..c * h * w).map(|_| lcg(seed)).collect();
        for t in 0..frames {
            let (y0, x0) = (start.0 + step.0 * t, start.1 + step.1 * t);
            for ch in 0..c {
                for y in y0..y0 + blob.0 {
                    for x in x0..x0 + blob.1 {
                        frame[(ch * h + y) * w + x] = lcg(seed) * 0.9;
                    }
                }
            }
            let a = sparse.run(&frame, shape).unwrap().to_vec();
            let b = dense.run(&frame, shape).unwrap().to_vec();
            let err = a
                .iter()
                .zip(&b)
                .map(|(x, y)| (x - y).abs())
                .fold(0.0f32, f32::max);
            assert!(
                b.iter().any(|&v| v != 0.0) && (err <= tol),
                "frame {t}: max |sparse - dense| {err} (tolerance {tol})"
            );
            if t > 0 {
                let st = sparse.stats();
                assert!(!st.dense && st.compute_fraction < 0.9, "frame {t}: {st:?}");
            }
        }
        sparse
    }

    fn sparse_equals_dense(int8: bool, scales: Int8Scales) {
        let mut seed = 7u64;
        let net = layers(&mut seed, int8);
        check_sparse_equals_dense(
            net,
            scales,
            5,
            &mut seed,
            [3, 23, 29],
            5,
            (3, 3),
            (2, 3),
            (4, 5),
            if int8 { 0.0 } else { 1e-5 },
        );
    }

    /// A residual net: a block with an identity skip (ReLU6 after the add) and one with a 1x1 stride-2
    /// side branch (as a ResNet downsample), FP32 or INT8 convs.
    fn residual_layers(seed: &mut u64, int8: bool) -> Vec<Layer> {
        let mut conv = |o: usize, c: usize, k: usize, s: usize| {
            let n = o * c * k * k;
            let weight: Vec<f32> = (0..n).map(|_| (lcg(seed) - 0.5) * 0.6).collect();
            let bias = Some((0..o).map(|_| lcg(seed) - 0.5).collect::<Vec<_>>());
            let (stride, padding) = ((s, s), (k / 2, k / 2));
            if int8 {
                let sw = scale_for_absmax(weight.iter().fold(0.0f32, |m, v| m.max(v.abs())));
                let mut wq = vec![0i8; n];
                quantize_nearest_with_scale(&weight, sw, &mut wq).unwrap();
                Layer::Conv2dInt8 {
                    wq,
                    sw: vec![sw],
                    shape: [o, c, k, k],
                    bias,
                    stride,
                    padding,
                    groups: 1,
                    dilation: (1, 1),
                }
            } else {
                Layer::Conv2d {
                    weight,
                    shape: [o, c, k, k],
                    bias,
                    stride,
                    padding,
                    groups: 1,
                    dilation: (1, 1),
                }
            }
        };
        vec![
            conv(6, 3, 3, 1),
            Layer::Relu,
            Layer::Mark, // 0: block input
            conv(6, 6, 3, 1),
            Layer::Relu6,
            Layer::Add(0),
            Layer::Relu6,
            Layer::Mark, // 1: next block's input
            conv(8, 6, 3, 2),
            Layer::Relu,
            conv(8, 8, 3, 1),
            Layer::Mark, // 2: main path
            Layer::From(1),
            conv(8, 6, 1, 2),
            Layer::Add(2),
            Layer::Relu,
        ]
    }

    #[test]
    fn residual_sparse_frames_equal_dense() {
        for (int8, scales) in [(false, Int8Scales::Frozen), (true, Int8Scales::Dynamic)] {
            let mut seed = 11u64;
            let net = residual_layers(&mut seed, int8);
            let sparse = check_sparse_equals_dense(
                net,
                scales,
                4,
                &mut seed,
                [3, 21, 26],
                4,
                (3, 2),
                (1, 2),
                (5, 6),
                if int8 { 0.0 } else { 1e-5 },
            );
            assert_eq!(sparse.output_shape(), Some([8, 11, 13]));
            assert_eq!(sparse.stats().layer_fractions.len(), 7, "int8={int8}"); // 5 convs + 2 adds
        }
    }

    #[test]
    fn residual_layers_are_checked() {
        // relu, mark 0, a 2x2 stride-2 pool, then `last`
        let net = |last: Layer| {
            let pool = Layer::MaxPool2d(Window2d::new((2, 2), (2, 2), (0, 0)));
            PatchSkip::new(
                vec![Layer::Relu, Layer::Mark, pool, last],
                PatchSkipConfig::default(),
            )
        };
        let e = PatchSkip::new(vec![Layer::Relu, Layer::Add(0)], PatchSkipConfig::default())
            .unwrap_err();
        assert!(e.to_string().contains("mark 0 does not exist"), "{e}");
        let e = net(Layer::From(0)).unwrap_err();
        assert!(e.to_string().contains("side branch"), "{e}");
        // a branch that later joins is fine; shapes of an add must match (the pool halves the mark's size)
        let mut ps = net(Layer::Add(0)).unwrap();
        let e = ps.run(&[0.5; 2 * 4 * 4], [2, 4, 4]).unwrap_err();
        assert!(e.to_string().contains("residual add"), "{e}");
    }

    /// An INT8 conv's cached input codes stay the quantization of its whole input with its scale when the
    /// conv before it writes them with its outputs (frozen scales, a threshold: the reference lags the
    /// frames), on one and on two threads.
    #[test]
    fn fused_next_codes_equal_quantized_input() {
        for threads in [1usize, 2] {
            crate::threads::set_num_threads(threads).unwrap();
            let mut seed = 13u64;
            let mut net = layers(&mut seed, true);
            net.remove(3); // the pool: conv -> conv -> conv
            let cfg = PatchSkipConfig {
                patch: 4,
                threshold: 0.05,
                ..PatchSkipConfig::default()
            };
            let mut ps = PatchSkip::new(net, cfg).unwrap();
            // the f32 outputs the codes are compared with
            ps.keep_values = true;
            let (h, w) = (37, 45);
            let mut frame: Vec<f32> = (0..3 * h * w).map(|_| lcg(&mut seed)).collect();
            for t in 0..5 {
                for ch in 0..3 {
                    for y in 3 + 4 * t..12 + 4 * t {
                        for x in 2 + 5 * t..15 + 5 * t {
                            frame[(ch * h + y) * w + x] = lcg(&mut seed);
                        }
                    }
                }
                ps.run(&frame, [3, h, w]).unwrap();
                assert!(t == 0 || !ps.stats().dense);
                for j in 1..ps.stages.len() {
                    let (prev, rest) = ps.stages.split_at(j);
                    let st = &rest[0];
                    if let Spatial::ConvI8(_) = st.spatial {
                        assert_eq!(prev[st.src - 1].next_i8, Some(j));
                        let x = &prev[st.src - 1].out;
                        let mut q = vec![0i8; x.len()];
                        quantize_nearest_with_scale(x, st.sx, &mut q).unwrap();
                        assert_eq!(st.xq, q, "threads {threads} frame {t} stage {j}");
                    }
                }
            }
        }
        crate::threads::set_num_threads(1).unwrap();
    }

    /// Codes alone (sparse conv stages leave out the f32 outputs their INT8 reader does not read, see
    /// `run_sparse`) change no output and no code: the same frames through a runner that writes every
    /// f32 output give the same bits, for chains and residual nets, thresholds 0 and 0.05, readers that
    /// run in full inside sparse frames (low `dense_above`, frames with large changes; also right after
    /// a dense refresh, before any stage is stale) and dense refreshes, on one and on two threads. The stream must also reach the two cases the rule is for:
    /// a stage left stale, and a stale stage run in full because its reader was.
    #[test]
    fn codes_alone_change_no_output() {
        let (mut went_stale, mut forced) = (false, false);
        for threads in [1usize, 2] {
            crate::threads::set_num_threads(threads).unwrap();
            for (net_kind, dense_above, threshold, refresh) in [
                (0, 0.85f32, 0.0f32, 0usize),
                (0, 0.5, 0.05, 0),
                (0, 0.5, 0.0, 10),
                (0, 0.2, 0.0, 0),
                (1, 0.5, 0.0, 0),
                (1, 0.5, 0.0, 10),
                (1, 0.85, 0.05, 5),
            ] {
                let mut seed = 29u64 + net_kind as u64;
                let net = if net_kind == 0 {
                    let mut net = layers(&mut seed, true);
                    net.remove(3); // the pool: conv -> conv -> conv
                    net
                } else {
                    residual_layers(&mut seed, true)
                };
                let cfg = PatchSkipConfig {
                    patch: 4,
                    threshold,
                    dense_above,
                    refresh_every: refresh,
                    ..PatchSkipConfig::default()
                };
                let mut alone = PatchSkip::new(net.clone(), cfg).unwrap();
                let mut both = PatchSkip::new(net, cfg).unwrap();
                both.keep_values = true;
                let (h, w) = (37, 45);
                let mut frame: Vec<f32> = (0..3 * h * w).map(|_| lcg(&mut seed)).collect();
                for t in 0..16 {
                    // a small moving blob; every fourth frame twelve scattered 4x4 ones instead, whose
                    // halos cover more of the stride-2 layer's map than of the first one's (about 0.6
                    // against 0.47: with `dense_above` 0.5 the reader runs in full while the stage
                    // before it does not); every eighth a change over most of the frame
                    let blobs: Vec<(usize, usize, usize, usize)> = match t % 8 {
                        7 => vec![(2, 30, 1, 40)],
                        3 => (0..12)
                            .map(|b| {
                                let (y, x) = ((b * 7 + t) % 33, (b * 11 + 3 * t) % 41);
                                (y, y + 4, x, x + 4)
                            })
                            .collect(),
                        _ => vec![(3 + t, 9 + t, 2 + 2 * t, 10 + 2 * t)],
                    };
                    for ch in 0..3 {
                        for &(y0, y1, x0, x1) in &blobs {
                            for y in y0..y1 {
                                for x in x0..x1 {
                                    frame[(ch * h + y) * w + x] = lcg(&mut seed);
                                }
                            }
                        }
                    }
                    let ya = alone.run(&frame, [3, h, w]).unwrap().to_vec();
                    let yb = both.run(&frame, [3, h, w]).unwrap().to_vec();
                    let what = format!(
                        "threads {threads} net {net_kind} dense_above {dense_above} frame {t}"
                    );
                    assert_eq!(alone.stats().dense, both.stats().dense, "{what}");
                    for (k, (sa, sb)) in alone.stages.iter().zip(&both.stages).enumerate() {
                        assert_eq!(sa.sx.to_bits(), sb.sx.to_bits(), "{what} stage {k}: scale");
                        let bad = sa.xq.iter().zip(&sb.xq).position(|(a, b)| a != b);
                        assert!(bad.is_none(), "{what} stage {k}: code {bad:?} differs");
                        assert!(!sb.stale, "{what}");
                    }
                    let bad = ya
                        .iter()
                        .zip(&yb)
                        .position(|(a, b)| a.to_bits() != b.to_bits());
                    assert!(bad.is_none(), "{what}: output {bad:?} differs");
                    went_stale |= alone.stages.iter().any(|s| s.stale);
                }
                forced |= alone.forced_full > 0;
                assert_eq!(both.forced_full, 0);
            }
        }
        crate::threads::set_num_threads(1).unwrap();
        assert!(went_stale, "no stage ever wrote codes alone");
        assert!(forced, "no stale stage was ever run in full for its reader");
    }

    #[test]
    fn fp32_sparse_frames_equal_dense() {
        sparse_equals_dense(false, Int8Scales::Frozen);
    }

    #[test]
    fn int8_sparse_frames_equal_dense_with_dynamic_scales() {
        sparse_equals_dense(true, Int8Scales::Dynamic);
    }

    /// A stride-1 INT8 conv over bands wide enough for the direct kernel with the layer's packed
    /// weights, narrow bands, the 3-channel first layer and a stride-2 conv through the batched GEMM on
    /// their phase grids, FP32 too: the sparse frames equal dense ones (INT8 bit for bit) on one and on
    /// two threads.
    #[test]
    fn wide_bands_and_threads_equal_dense() {
        for threads in [1usize, 2] {
            crate::threads::set_num_threads(threads).unwrap();
            for int8 in [false, true] {
                let mut seed = 12u64;
                let mut net = Vec::new();
                // (8, 8, 1): channels in whole groups of 4, so its bands take the direct VNNI kernel
                // with the layer's packed weights where that kernel runs
                // (5, 7, 1): a partial group of three channels on the direct kernel's grid
                for &(o, c, s) in &[(8usize, 3usize, 1usize), (8, 8, 1), (7, 8, 2), (5, 7, 1)] {
                    let n = o * c * 9;
                    let weight: Vec<f32> = (0..n).map(|_| lcg(&mut seed) - 0.5).collect();
                    let bias = Some((0..o).map(|_| lcg(&mut seed) - 0.5).collect::<Vec<_>>());
                    net.push(if int8 {
                        let sw =
                            scale_for_absmax(weight.iter().fold(0.0f32, |m, v| m.max(v.abs())));
                        let mut wq = vec![0i8; n];
                        quantize_nearest_with_scale(&weight, sw, &mut wq).unwrap();
                        Layer::Conv2dInt8 {
                            wq,
                            sw: vec![sw],
                            shape: [o, c, 3, 3],
                            bias,
                            stride: (s, s),
                            padding: (1, 1),
                            groups: 1,
                            dilation: (1, 1),
                        }
                    } else {
                        Layer::Conv2d {
                            weight,
                            shape: [o, c, 3, 3],
                            bias,
                            stride: (s, s),
                            padding: (1, 1),
                            groups: 1,
                            dilation: (1, 1),
                        }
                    });
                    net.push(Layer::Relu);
                }
                let cfg = PatchSkipConfig {
                    patch: 8,
                    int8_scales: Int8Scales::Dynamic,
                    ..PatchSkipConfig::default()
                };
                let mut sparse = PatchSkip::new(net.clone(), cfg).unwrap();
                for st in [1, 3] {
                    assert_eq!(
                        sparse.stages[st].direct.is_some(),
                        int8 && crate::nn::conv::direct::direct_available()
                    );
                }
                let mut dense = PatchSkip::new(
                    net,
                    PatchSkipConfig {
                        refresh_every: 1,
                        ..cfg
                    },
                )
                .unwrap();
                let (h, w) = (64, 140);
                let shape = [3, h, w];
                let mut frame: Vec<f32> = (0..3 * h * w).map(|_| lcg(&mut seed)).collect();
                for t in 0..4 {
                    // a wide blob (bands of 30+ columns) and a narrow one
                    for ch in 0..3 {
                        for y in 4 + 3 * t..40 + 3 * t {
                            for x in 10 + 5 * t..80 + 5 * t {
                                frame[(ch * h + y) * w + x] = lcg(&mut seed) * 0.9;
                            }
                        }
                        frame[(ch * h + 33) * w + 60 - t] = 0.5;
                        // wide bands at the left and right edges (the window's padding columns)
                        for y in 48..56 {
                            for x in (0..24 + t).chain(w - 24 - t..w) {
                                frame[(ch * h + y) * w + x] = lcg(&mut seed) * 0.9;
                            }
                        }
                    }
                    let a = sparse.run(&frame, shape).unwrap().to_vec();
                    let b = dense.run(&frame, shape).unwrap().to_vec();
                    if int8 {
                        assert_eq!(a, b, "threads {threads}, frame {t}");
                    } else {
                        let err = a
                            .iter()
                            .zip(&b)
                            .map(|(x, y)| (x - y).abs())
                            .fold(0.0f32, f32::max);
                        assert!(err <= 1e-5, "threads {threads}, frame {t}: {err}");
                    }
                    if t > 0 {
                        let st = sparse.stats();
                        assert!(
                            !st.dense && st.compute_fraction < 0.9 && st.output_changed,
                            "{st:?}"
                        );
                    }
                }
            }
        }
        crate::threads::set_num_threads(1).unwrap();
    }

    /// uint8 frames give the outputs of their float conversion, frame by frame; an unchanged frame
    /// recomputes nothing and says the output did not change.
    #[test]
    fn u8_frames_equal_float_frames() {
        let mut seed = 5u64;
        let net = layers(&mut seed, false);
        let cfg = PatchSkipConfig {
            patch: 4,
            ..PatchSkipConfig::default()
        };
        let (mut a, mut b) = (
            PatchSkip::new(net.clone(), cfg).unwrap(),
            PatchSkip::new(net, cfg).unwrap(),
        );
        let (h, w) = (23, 29);
        let input = U8Input::new(
            [h, w, 3],
            None,
            Some(vec![0.4, 0.5, 0.6]),
            Some(vec![0.2, 0.3, 0.25]),
        )
        .unwrap();
        let mut bytes: Vec<u8> = (0..h * w * 3)
            .map(|_| (lcg(&mut seed) * 255.0) as u8)
            .collect();
        for t in 0..4 {
            if t == 1 || t == 2 {
                for k in 0..6 {
                    bytes[(5 * t + k) * w * 3 + 3 * t] ^= 0x55;
                }
            }
            if t == 3 {
                // no change at all on this frame
                let before = a.run_u8(&bytes, input.clone()).unwrap().to_vec();
                assert_eq!(a.stats().compute_fraction, 0.0);
                assert!(!a.stats().output_changed);
                let again = a.run_u8(&bytes, input.clone()).unwrap().to_vec();
                assert_eq!(before, again);
                continue;
            }
            let mut x = vec![0.0; 3 * h * w];
            input.convert_rect(&bytes, (0, h, 0, w), &mut x);
            let ya = a.run_u8(&bytes, input.clone()).unwrap().to_vec();
            let yb = b.run(&x, [3, h, w]).unwrap().to_vec();
            assert_eq!(ya, yb, "frame {t}");
        }
    }

    /// A uint8 stream through INT8 convs gives the same outputs and statistics on one and on two threads
    /// (the gate's patch rows and the requantizing of changed inputs then run in parallel: in unit tests
    /// from any size on).
    #[test]
    fn u8_stream_is_the_same_on_two_threads() {
        let run = |threads: usize| {
            crate::threads::set_num_threads(threads).unwrap();
            let mut seed = 9u64;
            let cfg = PatchSkipConfig {
                patch: 5,
                threshold: 0.02,
                ..PatchSkipConfig::default()
            };
            let mut ps = PatchSkip::new(layers(&mut seed, true), cfg).unwrap();
            let (h, w) = (31, 37);
            let input = U8Input::new([h, w, 3], None, None, None).unwrap();
            let mut bytes: Vec<u8> = (0..h * w * 3)
                .map(|_| (lcg(&mut seed) * 255.0) as u8)
                .collect();
            let mut out = Vec::new();
            for t in 0..5 {
                for y in 2 + 4 * t..9 + 4 * t {
                    for x in 3 * t..3 * t + 30 {
                        bytes[y * w * 3 + x] = (lcg(&mut seed) * 255.0) as u8;
                    }
                }
                bytes[(3 * w + 30) * 3] ^= 1; // below the threshold
                let y = ps.run_u8(&bytes, input.clone()).unwrap().to_vec();
                let st = ps.stats();
                assert!(t == 0 || (!st.dense && st.compute_fraction < 0.9), "{st:?}");
                out.push((
                    y,
                    st.patch_fraction,
                    st.estimated_error,
                    st.layer_fractions.clone(),
                ));
            }
            out
        };
        let (one, two) = (run(1), run(2));
        crate::threads::set_num_threads(1).unwrap();
        assert_eq!(one, two);
    }

    /// Grouped, depthwise and dilated convolutions (FP32 and INT8) run sparse frames equal to dense ones.
    #[test]
    fn grouped_and_dilated_convs_equal_dense() {
        for int8 in [false, true] {
            let mut seed = 21u64;
            let mut net = Vec::new();
            // (o, c, k, stride, pad, groups, dilation)
            for &(o, c, k, s, pd, g, d) in &[
                (8usize, 4usize, 3usize, 1usize, 1usize, 1usize, 2usize),
                (8, 8, 3, 1, 1, 8, 1),
                (6, 8, 3, 2, 1, 2, 1),
            ] {
                let n = o * (c / g) * k * k;
                let weight: Vec<f32> = (0..n).map(|_| lcg(&mut seed) - 0.5).collect();
                let bias = Some((0..o).map(|_| lcg(&mut seed) - 0.5).collect::<Vec<_>>());
                let shape = [o, c / g, k, k];
                net.push(if int8 {
                    let sw = scale_for_absmax(weight.iter().fold(0.0f32, |m, v| m.max(v.abs())));
                    let mut wq = vec![0i8; n];
                    quantize_nearest_with_scale(&weight, sw, &mut wq).unwrap();
                    Layer::Conv2dInt8 {
                        wq,
                        sw: vec![sw],
                        shape,
                        bias,
                        stride: (s, s),
                        padding: (pd, pd),
                        groups: g,
                        dilation: (d, d),
                    }
                } else {
                    Layer::Conv2d {
                        weight,
                        shape,
                        bias,
                        stride: (s, s),
                        padding: (pd, pd),
                        groups: g,
                        dilation: (d, d),
                    }
                });
                net.push(Layer::Relu);
            }
            check_sparse_equals_dense(
                net,
                Int8Scales::Dynamic,
                6,
                &mut seed,
                [4, 30, 44],
                4,
                (6, 24),
                (3, 2),
                (4, 6),
                if int8 { 0.0 } else { 1e-5 },
            );
        }
    }

    #[test]
    fn rejects_bad_config_and_shape_change() {
        let mut seed = 1u64;
        let bad = PatchSkipConfig {
            error_bound: -1.0,
            ..PatchSkipConfig::default()
        };
        assert!(PatchSkip::new(layers(&mut seed, false), bad).is_err());
        let mut r = PatchSkip::new(layers(&mut seed, true), PatchSkipConfig::default()).unwrap();
        r.run(&vec![0.5; 3 * 16 * 16], [3, 16, 16]).unwrap();
        let err = r.run(&vec![0.5; 3 * 16 * 17], [3, 16, 17]).unwrap_err();
        assert!(
            err.to_string().contains("shape changed mid-stream"),
            "{err}"
        );
        let err = PatchSkip::new(
            vec![Layer::Conv2dInt8 {
                wq: vec![1; 9],
                sw: vec![0.0],
                shape: [1, 1, 3, 3],
                bias: None,
                stride: (1, 1),
                padding: (0, 0),
                groups: 1,
                dilation: (1, 1),
            }],
            PatchSkipConfig::default(),
        )
        .unwrap_err();
        assert!(err.to_string().contains("weight scale"), "{err}");
    }
}
