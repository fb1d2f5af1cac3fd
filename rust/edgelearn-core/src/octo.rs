//! The Octo INT8 layer step (`docs/octo.md`): one function per direction for an INT8 `Linear` or
//! `Conv2d`, so a training step crosses into the core once per layer and direction.
//!
//! Forward ([`forward`]): quantize `X` (stochastic or nearest) and `W` (per tensor or per output
//! channel), `Y = (Xq·Wqᵀ)·sx·sw + bias'` on the INT8 GEMM / convolution with the rescale and the bias
//! fused in the epilogue, where `bias' = (α⊙μ + β) + b` folds in a Loss-aware Compensation layer that
//! follows the layer. It returns a [`Saved`] state holding the int8 `Xq`, `sx`, `Wq` and `sw`: what
//! backward needs, never the FP32 input. A convolution runs the [`ConvPlan`] forward makes for its
//! shapes and weight scales (per-tensor weights also allow the small-plane algorithm), kept in
//! [`Saved`] so backward runs the same plan; this module chooses no algorithm itself.
//!
//! Backward ([`backward`]): PRC-clip and quantize `dY` (per tensor), `dW = (dYqᵀ·Xq)·sdy·sx` and
//! `dX = (dYq·Wq)·sdy·sw` on INT8 kernels (exact INT32 sums, one rescale), and the per-channel sums
//! `s = Σ dY` in FP32 that give `db = s` and the Compensation gradients `dα = s⊙μ`, `dμ = s⊙α`,
//! `dβ = s`. With per-channel weight scales, `dX` contracts over output channels, so the scales cannot
//! be factored out of an INT8 product: that one product runs in FP32 on the integer codes scaled by
//! `sdy·sw[o]` (exact up to float rounding).
//!
//! Seeds: the activation codes use `seed`, the gradient codes `seed ^ GRAD_SEED_XOR`, stochastic weight
//! codes `seed ^ WEIGHT_SEED_XOR`; stochastic rounding is a pure function of (seed, flat index), so a
//! step gives the same bits whatever the thread count.

use crate::error::{Error, Result};
use crate::gemm::{self, MatRef, Scale};
use crate::nn::conv::{channel_sums, channel_sums_and_range, ConvPlan, WeightScales};
use crate::nn::depthwise::GroupedParams;
use crate::nn::matmul::{sgemm, MatF32};
use crate::nn::{shape_len, take_f32, take_i8, Scratch};
use crate::quant::{
    non_finite_error, quantize_into, quantize_per_tensor_with_amax, quantize_per_tensor_with_range,
    ActRange, Clip, Layout, Rounding,
};
use crate::threads;

/// XOR-ed into a step's seed for the rounding of its incoming gradient.
pub const GRAD_SEED_XOR: u64 = 0x5DEE_CE66D;
/// XOR-ed into a step's seed for stochastic rounding of the weights.
pub const WEIGHT_SEED_XOR: u64 = 0x2545_F491_4F6C_DD1D;

/// A rounding mode without its seed (the step supplies the seed).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RoundMode {
    Nearest,
    Stochastic,
}

impl RoundMode {
    fn with_seed(self, seed: u64) -> Rounding {
        match self {
            RoundMode::Nearest => Rounding::Nearest,
            RoundMode::Stochastic => Rounding::Stochastic { seed },
        }
    }
}

/// The knobs of an INT8 layer (`OctoConfig` in Python).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Config {
    /// Rounding of `X` in training (eval always rounds to nearest).
    pub act_rounding: RoundMode,
    pub weight_rounding: RoundMode,
    /// Rounding of `dY` after PRC.
    pub grad_rounding: RoundMode,
    /// PRC: range clipping of `dY` before it is quantized.
    pub prc: Clip,
    /// One weight scale per output channel instead of one per tensor.
    pub per_channel_weights: bool,
}

impl Default for Config {
    /// The defaults of `docs/octo.md` as built: stochastic X and dY, nearest W, PRC minmax κ = 0.95.
    fn default() -> Self {
        Config {
            act_rounding: RoundMode::Stochastic,
            weight_rounding: RoundMode::Nearest,
            grad_rounding: RoundMode::Stochastic,
            prc: Clip::MinMax { kappa: 0.95 },
            per_channel_weights: false,
        }
    }
}

/// Which layer: `Linear` (`X (N, K)`, `W (O, K)`), `Conv2d` (`X (N, C, H, W)`, `W (O, C, kh, kw)`) or a
/// grouped `Conv2d`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Layer {
    Linear,
    Conv2d {
        stride: (usize, usize),
        padding: (usize, usize),
    },
    /// A grouped, depthwise or dilated `Conv2d` (`W (O, C/groups, kh, kw)`), on the direct grouped
    /// kernels of [`crate::nn::depthwise`].
    GroupedConv2d(GroupedParams),
}

/// A Loss-aware Compensation `y + α⊙μ + β` (per output channel) applied inside the layer.
#[derive(Clone, Copy, Debug)]
pub struct Compensation<'a> {
    pub alpha: &'a [f32],
    pub mu: &'a [f32],
    pub beta: &'a [f32],
}

/// What [`forward`] keeps for [`backward`]: int8 codes and scales (no FP32 activation).
#[derive(Clone, Debug)]
pub struct Saved {
    pub layer: Layer,
    pub config: Config,
    pub seed: u64,
    pub x_shape: Vec<usize>,
    pub w_shape: Vec<usize>,
    pub y_shape: Vec<usize>,
    pub xq: Vec<i8>,
    pub sx: f32,
    pub wq: Vec<i8>,
    /// One scale, or one per output channel.
    pub sw: Vec<f32>,
    /// `(α, μ)` of a fused Compensation as they were in forward (its gradients need them).
    comp: Option<(Vec<f32>, Vec<f32>)>,
    /// How a convolution layer runs, forward and backward (`None` for `Linear`).
    plan: Option<ConvPlan>,
}

impl Drop for Saved {
    fn drop(&mut self) {
        crate::alloc::give_codes(std::mem::take(&mut self.xq));
    }
}

impl Saved {
    fn sw_scale(&self) -> Scale<'_> {
        if self.sw.len() == 1 && !self.config.per_channel_weights {
            Scale::Scalar(self.sw[0])
        } else {
            Scale::PerIndex(&self.sw)
        }
    }
    /// Output channels.
    pub fn out_channels(&self) -> usize {
        self.w_shape[0]
    }
    /// Whether a Compensation was fused in forward (backward then gives its gradients).
    pub fn has_compensation(&self) -> bool {
        self.comp.is_some()
    }
    /// Whether splitting backward into [`backward_input`] and [`weight_grad`] costs no more than one
    /// [`backward`] call: true for Linear and dense convolutions; a grouped convolution's `dX` pass
    /// computes `dW` as well, so splitting it would compute `dW` twice.
    pub fn splits_dw_for_free(&self) -> bool {
        self.plan.as_ref().is_none_or(ConvPlan::dw_apart_is_free)
    }
    /// Bytes held (codes and scales): what a layer keeps between forward and backward.
    pub fn nbytes(&self) -> usize {
        self.xq.len() + self.wq.len() + 4 * (self.sw.len() + 1)
    }
}

/// The gradients [`backward`] writes (each `None` is not computed).
pub struct Grads<'a> {
    /// `(N, ...)` like `X`.
    pub dx: Option<&'a mut [f32]>,
    /// Like `W`.
    pub dw: Option<&'a mut [f32]>,
    /// `(O,)`: `Σ dY` per output channel.
    pub db: Option<&'a mut [f32]>,
    /// `(dα, dμ, dβ)`, each `(O,)`; only with a Compensation fused in forward.
    pub comp: Option<(&'a mut [f32], &'a mut [f32], &'a mut [f32])>,
}

/// The output shape and, for a convolution, its plan (made for the weight scales `config` asks for).
fn shapes(
    layer: Layer,
    config: &Config,
    x_shape: &[usize],
    w_shape: &[usize],
) -> Result<(Vec<usize>, Option<ConvPlan>)> {
    let params = match layer {
        Layer::Linear => {
            if x_shape.len() != 2 {
                return Err(Error::invalid(
                    "x",
                    format!("expected shape (N, K), got {x_shape:?}"),
                ));
            }
            if w_shape.len() != 2 || w_shape[1] != x_shape[1] {
                return Err(Error::invalid(
                    "w",
                    format!(
                        "expected shape (O, {}) for x of shape {x_shape:?}, got {w_shape:?}",
                        x_shape[1]
                    ),
                ));
            }
            let y = vec![x_shape[0], w_shape[0]];
            shape_len("y", &y)?;
            return Ok((y, None));
        }
        Layer::Conv2d { stride, padding } => GroupedParams::new(1, stride, padding, (1, 1)),
        Layer::GroupedConv2d(p) => p,
    };
    let scales = if config.per_channel_weights {
        WeightScales::Any
    } else {
        WeightScales::PerTensor
    };
    let plan =
        ConvPlan::with_weight_scales(four4("x", x_shape)?, four4("w", w_shape)?, params, scales)?;
    Ok((plan.output().to_vec(), Some(plan)))
}

fn four4(arg: &'static str, s: &[usize]) -> Result<[usize; 4]> {
    s.try_into()
        .map_err(|_| Error::invalid(arg, format!("expected 4 dimensions, got shape {s:?}")))
}

fn check_channels(arg: &'static str, v: &[f32], o: usize) -> Result<()> {
    if v.len() != o {
        return Err(Error::invalid(
            arg,
            format!(
                "expected {o} values (one per output channel), got {}",
                v.len()
            ),
        ));
    }
    Ok(())
}

/// The epilogue bias: `b`, plus `(α⊙μ + β)` of a fused Compensation (rounded in that order, in f32).
fn epilogue_bias(
    bias: Option<&[f32]>,
    comp: Option<&Compensation>,
    o: usize,
) -> Result<Option<Vec<f32>>> {
    if let Some(b) = bias {
        check_channels("bias", b, o)?;
    }
    let Some(c) = comp else {
        return Ok(bias.map(|b| b.to_vec()));
    };
    check_channels("alpha", c.alpha, o)?;
    check_channels("mu", c.mu, o)?;
    check_channels("beta", c.beta, o)?;
    let mut shift: Vec<f32> = (0..o).map(|i| c.alpha[i] * c.mu[i] + c.beta[i]).collect();
    if let Some(b) = bias {
        shift.iter_mut().zip(b).for_each(|(s, &bv)| *s += bv);
    }
    Ok(Some(shift))
}

/// Forward of an INT8 layer: writes `y` (`(N, O)` or `(N, O, OH, OW)`, see [`output_shape`]) and returns
/// the state [`backward`] needs. `training` picks `config.act_rounding` for `X` (else nearest).
///
/// `x_range`: the range of `X` from the op that wrote it ([`ActRange`], which must describe `x`: else
/// [`Error::InvalidArgument`] on `x_range`), for the same output and state bit for bit without the
/// statistics pass over `X`; `None`: the pass runs here.
#[allow(clippy::too_many_arguments)]
pub fn forward(
    layer: Layer,
    config: Config,
    x: &[f32],
    x_shape: &[usize],
    w: &[f32],
    w_shape: &[usize],
    bias: Option<&[f32]>,
    comp: Option<Compensation>,
    seed: u64,
    training: bool,
    x_range: Option<&ActRange>,
    y: &mut [f32],
) -> Result<Saved> {
    let (y_shape, plan) = shapes(layer, &config, x_shape, w_shape)?;
    crate::nn::check_len("x", x.len(), x_shape)?;
    crate::nn::check_len("w", w.len(), w_shape)?;
    crate::nn::check_len("y", y.len(), &y_shape)?;
    config.prc.validate()?;
    let o = w_shape[0];
    let bias_eff = epilogue_bias(bias, comp.as_ref(), o)?;
    let act = if training {
        config.act_rounding
    } else {
        RoundMode::Nearest
    };
    // memory a previous step's codes used (handed back when its Saved was dropped)
    let mut xq = crate::alloc::take_codes("xq", x.len())?;
    let mut sx = [1f32];
    match x_range {
        Some(r) => sx[0] = quantize_per_tensor_with_amax(x, r, act.with_seed(seed), &mut xq)?,
        None => quantize_into(
            x,
            Layout::per_tensor(x.len()),
            act.with_seed(seed),
            Clip::None,
            &mut xq,
            &mut sx,
        )?,
    }
    let mut wq = vec![0i8; w.len()];
    let (w_layout, n_sw) = if config.per_channel_weights {
        (Layout::from_shape(w_shape, Some(0), "w")?, o)
    } else {
        (Layout::per_tensor(w.len()), 1)
    };
    let mut sw = vec![0f32; n_sw];
    let w_round = config.weight_rounding.with_seed(seed ^ WEIGHT_SEED_XOR);
    quantize_into(w, w_layout, w_round, Clip::None, &mut wq, &mut sw)?;
    let saved = Saved {
        layer,
        config,
        seed,
        x_shape: x_shape.to_vec(),
        w_shape: w_shape.to_vec(),
        y_shape,
        xq,
        sx: sx[0],
        wq,
        sw,
        comp: comp.map(|c| (c.alpha.to_vec(), c.mu.to_vec())),
        plan,
    };
    let swv = saved.sw_scale();
    match &saved.plan {
        Some(plan) => {
            plan.forward_i8(&saved.xq, saved.sx, &saved.wq, swv, bias_eff.as_deref(), y)?
        }
        None => {
            let (n, k) = (x_shape[0], x_shape[1]);
            let xm = MatRef::row_major(&saved.xq, n, k)?;
            let wm = MatRef::row_major(&saved.wq, o, k)?;
            gemm::gemm_i8_f32(
                &xm,
                &wm.t(),
                Scale::Scalar(saved.sx),
                swv,
                bias_eff.as_deref(),
                y,
            )?;
        }
    }
    Ok(saved)
}

/// The output shape of [`forward`] for these input and weight shapes.
pub fn output_shape(layer: Layer, x_shape: &[usize], w_shape: &[usize]) -> Result<Vec<usize>> {
    Ok(shapes(layer, &Config::default(), x_shape, w_shape)?.0)
}

/// The quantized output gradient of a backward step (PRC-clipped `dY` codes and their scale): what `dX`
/// and `dW` are computed from. [`backward_input`] returns it so that [`weight_grad`] can run later, on
/// another thread.
pub struct GradCodes {
    gq: Scratch<i8>,
    sg: f32,
}

/// Backward of an INT8 layer from the FP32 output gradient `dy` (shape `saved.y_shape`): quantizes
/// `dY` with PRC and the configured rounding, then writes the requested gradients of `grads`.
pub fn backward(saved: &Saved, dy: &[f32], grads: Grads) -> Result<()> {
    let Grads { dx, dw, db, comp } = grads;
    let need_codes = dx.is_some() || dw.is_some();
    match prologue(
        saved,
        dy,
        dx.as_deref(),
        dw.as_deref(),
        db,
        comp,
        need_codes,
    )? {
        Some(codes) => products(saved, &codes, dx, dw),
        None => Ok(()),
    }
}

/// [`backward`] without `dW` (`grads.dw` must be `None`): writes `dx`, `db` and the Compensation
/// gradients, and returns the gradient codes from which [`weight_grad`] computes `dW`, then or later.
/// Together they give what [`backward`] gives, bit for bit.
pub fn backward_input(saved: &Saved, dy: &[f32], grads: Grads) -> Result<GradCodes> {
    let Grads { dx, dw, db, comp } = grads;
    if dw.is_some() {
        return Err(Error::invalid(
            "dw",
            "backward_input leaves dW to weight_grad (pass None)",
        ));
    }
    let codes =
        prologue(saved, dy, dx.as_deref(), None, db, comp, true)?.expect("codes are asked for");
    products(saved, &codes, dx, None)?;
    Ok(codes)
}

/// `dW` (like `W`) of the backward step that returned `codes` ([`backward_input`] on `saved`).
pub fn weight_grad(saved: &Saved, codes: &GradCodes, dw: &mut [f32]) -> Result<()> {
    crate::nn::check_len("dw", dw.len(), &saved.w_shape)?;
    products(saved, codes, None, Some(dw))
}

/// Checks `dy` and the outputs, writes the bias and Compensation gradients and, if `need_codes`,
/// quantizes `dY`.
fn prologue(
    saved: &Saved,
    dy: &[f32],
    dx: Option<&[f32]>,
    dw: Option<&[f32]>,
    db: Option<&mut [f32]>,
    comp: Option<(&mut [f32], &mut [f32], &mut [f32])>,
    need_codes: bool,
) -> Result<Option<GradCodes>> {
    crate::nn::check_len("dy", dy.len(), &saved.y_shape)?;
    let o = saved.out_channels();
    if let Some(d) = dx {
        crate::nn::check_len("dx", d.len(), &saved.x_shape)?;
    }
    if let Some(d) = dw {
        crate::nn::check_len("dw", d.len(), &saved.w_shape)?;
    }
    if let Some(d) = db.as_deref() {
        check_channels("db", d, o)?;
    }
    if let Some((a, m, b)) = comp.as_ref() {
        if saved.comp.is_none() {
            return Err(Error::invalid(
                "compensation",
                "gradients asked for a Compensation that was not fused in forward",
            ));
        }
        check_channels("dalpha", a, o)?;
        check_channels("dmu", m, o)?;
        check_channels("dbeta", b, o)?;
    }
    let cfg = saved.config;
    // The range of dY for its codes, when the channel sums below take it in the same read of dY.
    let mut range = None;
    // Σ dY per output channel (the bias and Compensation gradients), in FP32 from the unclipped dY.
    if db.is_some() || comp.is_some() {
        let mut sums = take_f32(o)?;
        if need_codes && !matches!(cfg.prc, Clip::Sigma { .. }) {
            range = channel_sums_and_range(dy, &saved.y_shape, &mut sums)?;
        }
        if range.is_none() {
            channel_sums(dy, &saved.y_shape, &mut sums)?;
        }
        if let Some((da, dm, dbeta)) = comp {
            let (alpha, mu) = saved.comp.as_ref().expect("checked above");
            for i in 0..o {
                da[i] = sums[i] * mu[i];
                dm[i] = sums[i] * alpha[i];
                dbeta[i] = sums[i];
            }
        }
        if let Some(d) = db {
            d.copy_from_slice(&sums);
        }
    }
    if !need_codes {
        return Ok(None);
    }
    // a reused scratch buffer (no page faults on a fresh one)
    let mut gq = take_i8(dy.len())?;
    let rounding = cfg.grad_rounding.with_seed(saved.seed ^ GRAD_SEED_XOR);
    let sg = match range {
        Some((_, _, true)) => return Err(non_finite_error(dy)),
        Some((lo, hi, false)) => {
            quantize_per_tensor_with_range(dy, (lo, hi), rounding, cfg.prc, &mut gq)?
        }
        None => {
            let mut sg = [1f32];
            let layout = Layout::per_tensor(dy.len());
            quantize_into(dy, layout, rounding, cfg.prc, &mut gq, &mut sg)?;
            sg[0]
        }
    };
    Ok(Some(GradCodes { gq, sg }))
}

/// `dX` and `dW` (each if given) from the gradient codes.
fn products(
    saved: &Saved,
    codes: &GradCodes,
    dx: Option<&mut [f32]>,
    dw: Option<&mut [f32]>,
) -> Result<()> {
    if dx.is_none() && dw.is_none() {
        return Ok(());
    }
    let (gq, sg) = (&codes.gq[..], codes.sg);
    let swv = saved.sw_scale();
    let o = saved.out_channels();
    match &saved.plan {
        Some(plan) => {
            plan.backward_i8_parts(&saved.xq, saved.sx, &saved.wq, swv, gq, sg, dx, dw)?;
        }
        None => {
            let (n, k) = (saved.x_shape[0], saved.x_shape[1]);
            let gm = MatRef::row_major(gq, n, o)?;
            if let Some(dw) = dw {
                let xm = MatRef::row_major(&saved.xq, n, k)?;
                gemm::gemm_i8_f32(
                    &gm.t(),
                    &xm,
                    Scale::Scalar(sg),
                    Scale::Scalar(saved.sx),
                    None,
                    dw,
                )?;
            }
            if let Some(dx) = dx {
                let wm = MatRef::row_major(&saved.wq, o, k)?;
                match swv {
                    Scale::Scalar(s) => {
                        gemm::gemm_i8_f32(&gm, &wm, Scale::Scalar(sg), Scale::Scalar(s), None, dx)?
                    }
                    Scale::PerIndex(swc) => {
                        // dX = Σ_o (dYq·sdy·sw[o])·Wq: FP32 on the integer codes (see the module docs).
                        let mut g = take_f32(n * o)?;
                        for (row, qrow) in
                            g.chunks_exact_mut(o.max(1)).zip(gq.chunks_exact(o.max(1)))
                        {
                            for ((d, &q), &s) in row.iter_mut().zip(qrow).zip(swc) {
                                *d = q as f32 * (sg * s);
                            }
                        }
                        let wf: Vec<f32> = saved.wq.iter().map(|&v| v as f32).collect();
                        let gmf = MatF32::row_major(&g, n, o)?;
                        let wmf = MatF32::row_major(&wf, o, k)?;
                        let par = n * o * k >= crate::nn::matmul::PAR_MIN_MACS
                            && threads::num_threads() > 1;
                        // SAFETY: dx is N×K (checked), row stride K, not aliased by the operands.
                        unsafe { sgemm(&gmf, &wmf, dx.as_mut_ptr(), k, false, par) };
                    }
                }
            }
        }
    }
    Ok(())
}
