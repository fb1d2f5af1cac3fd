//! How a convolution runs, chosen once per shape and GEMM kernel: [`ConvPlan`] and its [`ConvAlgo`].
//!
//! Every choice between algorithms lives here (as candle's `Conv2dImpl` or XNNPACK's operator setup),
//! so the kernels in [`super::f32`], [`super::i8`] and [`crate::nn::depthwise`] run what they are told.
//! A plan depends on the shapes and on the active GEMM kernel (the direct kernel needs AVX-512 VNNI):
//! a layer that runs one shape every step can keep it, and on how the INT8 weights will be scaled
//! ([`WeightScales`]: the small-plane algorithm needs one scale per tensor). Not in a plan: chunk sizes
//! (they follow the thread count when the plan runs) and packed weights (weights change every step).

use super::grid::PaddedGrid;
use super::{direct, smallplane, ConvShape};
use crate::error::Result;
use crate::gemm::Scale;
use crate::nn::depthwise::{
    conv2d_grouped_f32_backward, conv2d_grouped_f32_forward, conv2d_grouped_i8_backward,
    conv2d_grouped_i8_forward, GroupedParams, GroupedShape,
};

/// The algorithm of a convolution's (INT8) forward product.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConvAlgo {
    /// Stride 1 on the padded grid, the images read in place by the AVX-512 VNNI direct kernel
    /// ([`super::direct`]), only the weights packed.
    DirectVnni,
    /// Stride 1 on the padded grid, the GEMM packing its `B` operand straight from the padded planes.
    PaddedGrid,
    /// A patch matrix (im2col; for a 1x1 stride-1 unpadded convolution the image itself) and the GEMM.
    /// FP32 convolutions always run this way.
    Im2colGemm,
    /// `groups > 1` or a dilation: the direct grouped kernels of [`crate::nn::depthwise`].
    Depthwise,
    /// A plane of at most 16 output pixels as one dense GEMM per product (`nn::conv::smallplane`): no
    /// patch matrix, col2im or per-image loop. Needs one weight scale per tensor
    /// ([`WeightScales::PerTensor`]); its `dX` sums exact INT32 terms before one rescale, so it is only
    /// chosen where the caller asked for it (the Octo layer step).
    SmallPlane,
}

/// How the INT8 weights a plan runs with are scaled: what an algorithm may rely on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WeightScales {
    /// One scale or one per output channel: the plan runs with either.
    Any,
    /// One scale per tensor ([`Scale::Scalar`]): also allows [`ConvAlgo::SmallPlane`].
    PerTensor,
}

/// The plan of a dense convolution (`groups == 1`, no dilation).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct DensePlan {
    pub shape: ConvShape,
    /// The INT8 forward, and with `SmallPlane` the INT8 backward too: `DirectVnni`, `PaddedGrid`,
    /// `Im2colGemm` or `SmallPlane`.
    pub forward: ConvAlgo,
    /// INT8 `dX` with a per-tensor weight scale as the forward convolution of `dY` by the flipped,
    /// transposed kernel: that forward's shape for one image and its algorithm, where it pays.
    pub dx_transposed: Option<(ConvShape, ConvAlgo)>,
    /// INT8 `dW` on the padded grid when `dX` is not computed chunk by chunk beside it.
    pub dw_grid: bool,
}

impl DensePlan {
    pub fn new(shape: ConvShape, scales: WeightScales) -> Self {
        let s = &shape;
        if scales == WeightScales::PerTensor && smallplane::applies(s) {
            return DensePlan {
                shape,
                forward: ConvAlgo::SmallPlane,
                dx_transposed: None,
                dw_grid: false,
            };
        }
        // With dX done apart (or not asked for), dW can take the padded grid. It saves the patch matrix
        // (K × nb·P bytes) but lays dY on the grid (O × ncols bytes), so it pays only when K > O (one
        // thread, batch 32, 1→16 channels at 28x28: 67 µs through the patch matrix, 87 on the grid).
        let dw_grid = s.g.k() > s.o
            && PaddedGrid::new(s).is_some_and(|gr| gr.dw_images_per_chunk().is_some());
        DensePlan {
            shape,
            // An image's layer (fewer than 4 channels) takes a patch matrix and GEMM per image, which
            // writes its output planes in place: the grid's channel padding, grid-sized output and scatter
            // cost more than the product (1 channel at 28x28, 16 out, batch 32, 1 thread: the layer's
            // Octo forward 360 → 240 µs in a loop of that layer alone, 2 interleaved rounds).
            forward: if image_layer(s) {
                ConvAlgo::Im2colGemm
            } else {
                int8_forward_algo(s)
            },
            dx_transposed: transposed_dx_shape(s).map(|st| (st, int8_forward_algo(&st))),
            dw_grid,
        }
    }
}

/// Below this many input channels a convolution's INT8 forward runs image by image through a patch matrix
/// (see [`DensePlan::new`]).
const IMAGE_CHANNELS: usize = 4;

/// An image's layer (fewer than [`IMAGE_CHANNELS`] input channels): the plan gives it a patch matrix and
/// GEMM, and `super::i8::forward` multiplies it image by image.
pub(super) fn image_layer(s: &ConvShape) -> bool {
    s.g.c < IMAGE_CHANNELS
}

/// The INT8 forward of `s`: the padded grid when it applies, read by the direct kernel when that runs
/// here and the channels' padding to groups of 4 adds at most a quarter (one thread, batch 32, 1 channel
/// at 28x28: 92 µs through the GEMM, 106 direct); else im2col + GEMM.
fn int8_forward_algo(s: &ConvShape) -> ConvAlgo {
    if !PaddedGrid::applies(s) {
        ConvAlgo::Im2colGemm
    } else if s.g.c.div_ceil(4) * 4 * 4 <= s.g.c * 5 && direct::direct_available() {
        ConvAlgo::DirectVnni
    } else {
        ConvAlgo::PaddedGrid
    }
}

/// `dX` of a stride-1 convolution `s` as a forward convolution: `dX = conv2d(dY, W̃)` with padding
/// `(kh−1−ph, kw−1−pw)`, where `W̃ (C, O, kh, kw)` is `W` with input and output channels swapped and the
/// window flipped. Run on the padded grid this needs neither the `K × P` FP32 `dcol` nor col2im, and the
/// INT32 sums over `(o, i, j)` are exact before the one rescale (col2im adds rescaled FP32 terms).
/// Returns that forward's shape (input `dY` of one image), or `None` where the identity does not hold
/// (stride > 1, padding ≥ the window) or where that forward would not take the padded grid: through a
/// patch matrix of `dY` (O·kh·kw rows) it is slower than dcol + col2im (32→64 channels at 7x7: 458
/// against 400 µs per batch of 32).
fn transposed_dx_shape(s: &ConvShape) -> Option<ConvShape> {
    let g = s.g;
    if g.sh != 1 || g.sw != 1 || g.ph >= g.kh || g.pw >= g.kw {
        return None;
    }
    let st = ConvShape::new(
        [1, s.o, g.oh, g.ow],
        [g.c, s.o, g.kh, g.kw],
        (1, 1),
        (g.kh - 1 - g.ph, g.kw - 1 - g.pw),
    )
    .ok()?;
    (st.g.oh == g.h && st.g.ow == g.w && PaddedGrid::applies(&st)).then_some(st)
}

#[derive(Clone, Copy, Debug)]
enum Kind {
    Dense(DensePlan),
    Grouped(GroupedShape, GroupedParams),
}

/// How one convolution `x (N, C, H, W)` ∗ `w (O, C/groups, kh, kw)` runs, forward and backward, in FP32
/// and INT8. The `run` methods check their operands as the `conv2d_*` functions do (the same errors).
#[derive(Clone, Copy, Debug)]
pub struct ConvPlan {
    x_shape: [usize; 4],
    w_shape: [usize; 4],
    kind: Kind,
}

impl ConvPlan {
    /// The plan for these shapes and parameters: `groups > 1` or a dilation take the grouped kernels
    /// (the rule of `edgelearn.functional.conv2d`), the rest [`dense`](Self::dense).
    pub fn new(x_shape: [usize; 4], w_shape: [usize; 4], p: GroupedParams) -> Result<Self> {
        Self::with_weight_scales(x_shape, w_shape, p, WeightScales::Any)
    }

    /// [`new`](Self::new) for INT8 weights scaled as `scales` says; the INT8 `run` methods then refuse
    /// other weight scales.
    pub fn with_weight_scales(
        x_shape: [usize; 4],
        w_shape: [usize; 4],
        p: GroupedParams,
        scales: WeightScales,
    ) -> Result<Self> {
        if p.groups != 1 || p.dilation != (1, 1) {
            let gs = GroupedShape::new(x_shape, w_shape, p)?;
            return Ok(ConvPlan {
                x_shape,
                w_shape,
                kind: Kind::Grouped(gs, p),
            });
        }
        let s = ConvShape::new(x_shape, w_shape, p.stride, p.padding)?;
        Ok(ConvPlan {
            x_shape,
            w_shape,
            kind: Kind::Dense(DensePlan::new(s, scales)),
        })
    }

    /// The plan of a dense convolution (`groups == 1`, no dilation).
    pub fn dense(
        x_shape: [usize; 4],
        w_shape: [usize; 4],
        stride: (usize, usize),
        padding: (usize, usize),
    ) -> Result<Self> {
        let p = GroupedParams::new(1, stride, padding, (1, 1));
        Self::with_weight_scales(x_shape, w_shape, p, WeightScales::Any)
    }

    /// The algorithm of the INT8 forward (FP32 dense convolutions always run [`ConvAlgo::Im2colGemm`]).
    pub fn algo(&self) -> ConvAlgo {
        match &self.kind {
            Kind::Dense(d) => d.forward,
            Kind::Grouped(..) => ConvAlgo::Depthwise,
        }
    }

    /// Whether [`backward_i8_parts`](Self::backward_i8_parts) computes `dX` without `dW` for less than
    /// the joint call: false for the grouped kernels, which compute `dW` with `dX` anyway.
    pub fn dw_apart_is_free(&self) -> bool {
        matches!(self.kind, Kind::Dense(_))
    }

    /// `(N, O, OH, OW)`.
    pub fn output(&self) -> [usize; 4] {
        match &self.kind {
            Kind::Dense(d) => d.shape.output(),
            Kind::Grouped(gs, _) => gs.output(),
        }
    }

    /// `y = conv2d(x, w) + bias` in FP32 (see [`super::conv2d_f32_forward`]).
    pub fn forward_f32(
        &self,
        x: &[f32],
        w: &[f32],
        bias: Option<&[f32]>,
        y: &mut [f32],
    ) -> Result<()> {
        match &self.kind {
            Kind::Dense(d) => super::f32::forward(&d.shape, x, w, bias, y),
            Kind::Grouped(_, p) => {
                conv2d_grouped_f32_forward(x, self.x_shape, w, self.w_shape, bias, *p, y)
                    .map(|_| ())
            }
        }
    }

    /// `dw`, `db` and, if given, `dx` in FP32 (see [`super::conv2d_f32_backward`]).
    pub fn backward_f32(
        &self,
        x: &[f32],
        w: &[f32],
        dy: &[f32],
        dx: Option<&mut [f32]>,
        dw: &mut [f32],
        db: &mut [f32],
    ) -> Result<()> {
        match &self.kind {
            Kind::Dense(d) => super::f32::backward(&d.shape, x, w, dy, dx, dw, db),
            Kind::Grouped(_, p) => {
                conv2d_grouped_f32_backward(x, self.x_shape, w, self.w_shape, dy, *p, dx, dw, db)
                    .map(|_| ())
            }
        }
    }

    /// `y = conv2d(sx·xq, sw·wq) + bias` (see [`super::conv2d_i8_forward`]). A plan made for
    /// [`WeightScales::PerTensor`] refuses per-channel `sw` when it runs [`ConvAlgo::SmallPlane`].
    #[allow(clippy::too_many_arguments)]
    pub fn forward_i8(
        &self,
        xq: &[i8],
        sx: f32,
        wq: &[i8],
        sw: Scale,
        bias: Option<&[f32]>,
        y: &mut [f32],
    ) -> Result<()> {
        match &self.kind {
            Kind::Dense(d) => super::i8::forward(&d.shape, d.forward, xq, sx, wq, sw, bias, y),
            Kind::Grouped(_, p) => {
                conv2d_grouped_i8_forward(xq, self.x_shape, sx, wq, self.w_shape, sw, bias, *p, y)
                    .map(|_| ())
            }
        }
    }

    /// `dw` and, if given, `dx` from an INT8 `sdy·dyq` (see [`super::conv2d_i8_backward`]; weight
    /// scales as in [`forward_i8`](Self::forward_i8)).
    #[allow(clippy::too_many_arguments)]
    pub fn backward_i8(
        &self,
        xq: &[i8],
        sx: f32,
        wq: &[i8],
        sw: Scale,
        dyq: &[i8],
        sdy: f32,
        dx: Option<&mut [f32]>,
        dw: &mut [f32],
    ) -> Result<()> {
        self.backward_i8_parts(xq, sx, wq, sw, dyq, sdy, dx, Some(dw))
    }

    /// [`backward_i8`](Self::backward_i8) with `dw` optional too: `dX` and `dW` can run apart (each
    /// alone costs what it costs in the joint call; a grouped convolution computes `dW` anyway).
    #[allow(clippy::too_many_arguments)]
    pub fn backward_i8_parts(
        &self,
        xq: &[i8],
        sx: f32,
        wq: &[i8],
        sw: Scale,
        dyq: &[i8],
        sdy: f32,
        dx: Option<&mut [f32]>,
        dw: Option<&mut [f32]>,
    ) -> Result<()> {
        match &self.kind {
            Kind::Dense(d) => super::i8::backward(d, xq, sx, wq, sw, dyq, sdy, dx, dw),
            Kind::Grouped(..) if dw.is_none() && dx.is_none() => Ok(()),
            Kind::Grouped(_, p) => {
                let mut scratch;
                let dw = match dw {
                    Some(d) => d,
                    None => {
                        scratch = crate::nn::take_f32(wq.len())?;
                        &mut scratch[..]
                    }
                };
                conv2d_grouped_i8_backward(
                    xq,
                    self.x_shape,
                    sx,
                    wq,
                    self.w_shape,
                    sw,
                    dyq,
                    sdy,
                    *p,
                    dx,
                    dw,
                )
                .map(|_| ())
            }
        }
    }
}
