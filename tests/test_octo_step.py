"""The Octo INT8 layer step against an independent numpy reference of the whole step.

Forward: X quantized per tensor (stochastic with the layer's seed, or nearest), W per tensor or per output
channel, the integer product/convolution of the codes computed exactly in int64, rescaled by ``sx·sw`` and
shifted by the bias plus the fused Compensation ``α⊙μ + β``. Backward: dY PRC-clipped (minmax or sigma) and
quantized with the gradient seed, ``dW = (dYqᵀ·Xq)·sdy·sx`` and ``dX = (dYq·Wq)·sdy·sw`` from exact integer
sums (per-channel weights: ``Σ_o dYq·sdy·sw[o]·Wq``), ``db = Σ dY`` and the Compensation gradients.

Results must agree to float32 rounding (a few ulps of the largest value): each of these mutations moves some
gradient by ~1% or more and fails here — PRC clipping removed, gradient rounding forced to nearest, a 2% error
in the dW or dY scale, the FP32 backward without gradient quantization, per-channel codes with a mean scale.
"""

import numpy as np
import pytest

import edgelearn as el
from edgelearn import functional as F
from edgelearn.tensor import Tensor
from test_quant import ref_quantize

GRAD_SEED_XOR = 0x5DEECE66D
WEIGHT_SEED_XOR = 0x2545F4914F6CDD1D


def _pad(x, p):
    return np.pad(x, ((0, 0), (0, 0), (p[0], p[0]), (p[1], p[1])))


def ref_conv_int(xq, wq, stride, padding):
    """Exact int64 convolution of int8 codes: (N, C, H, W) * (O, C, kh, kw) -> (N, O, OH, OW)."""
    xp = _pad(xq.astype(np.int64), padding)
    o, c, kh, kw = wq.shape
    n, _, hp, wp = xp.shape
    oh, ow = (hp - kh) // stride[0] + 1, (wp - kw) // stride[1] + 1
    y = np.zeros((n, o, oh, ow), np.int64)
    for i in range(kh):
        for j in range(kw):
            patch = xp[:, :, i:i + stride[0] * oh:stride[0], j:j + stride[1] * ow:stride[1]]
            y += np.einsum("nchw,oc->nohw", patch, wq[:, :, i, j].astype(np.int64))
    return y


def ref_conv_grads_int(xq, wq, gq, stride, padding, w_of_o=None):
    """Exact sums ``dW[o,c,i,j] = Σ g·x`` (int64) and ``dX = Σ_o g·w`` (w_of_o: per-o weights as float64)."""
    xp = _pad(xq.astype(np.int64), padding)
    o, c, kh, kw = wq.shape
    n, _, oh, ow = gq.shape
    g = gq.astype(np.int64)
    w = wq.astype(np.int64) if w_of_o is None else w_of_o
    dw = np.zeros(wq.shape, np.int64)
    dxp = np.zeros(xp.shape, w.dtype)
    for i in range(kh):
        for j in range(kw):
            sl = (slice(None), slice(None), slice(i, i + stride[0] * oh, stride[0]), slice(j, j + stride[1] * ow, stride[1]))
            dw[:, :, i, j] = np.einsum("nohw,nchw->oc", g, xp[sl])
            dxp[sl] += np.einsum("nohw,oc->nchw", g if w_of_o is None else g.astype(np.float64), w[:, :, i, j])
    h, wd = xq.shape[2], xq.shape[3]
    return dw, dxp[:, :, padding[0]:padding[0] + h, padding[1]:padding[1] + wd]


def ref_step(kind, x, w, b, comp, cfg, seed, dy, stride=None, padding=None):
    """The whole Octo step in numpy: returns (y, dx, dw, db, (dα, dμ, dβ))."""
    f32 = np.float32
    xq, sx = ref_quantize(x, None, None, cfg.act_rounding, seed)
    axis = 0 if cfg.per_channel_weights else None
    wq, sw = ref_quantize(w, axis, None, cfg.weight_rounding, seed ^ WEIGHT_SEED_XOR)
    o = w.shape[0]
    sw_o = np.broadcast_to(sw, (o,)).astype(f32)
    alpha, mu, beta = comp
    shift = (alpha * mu + beta) + b  # float32, in that order
    if kind == "linear":
        acc = xq.astype(np.int64) @ wq.astype(np.int64).T
        y = acc.astype(f32) * (f32(sx) * sw_o)[None, :] + shift[None, :]
    else:
        acc = ref_conv_int(xq, wq, stride, padding)
        y = acc.astype(f32) * (f32(sx) * sw_o)[None, :, None, None] + shift[None, :, None, None]
    gq, sg = ref_quantize(dy, None, cfg.prc_clip(), cfg.grad_rounding, seed ^ GRAD_SEED_XOR)
    sg, sx = float(sg), float(sx)
    if kind == "linear":
        dw_int = gq.astype(np.int64).T @ xq.astype(np.int64)
        if cfg.per_channel_weights:
            dx = (gq.astype(np.float64) * (sg * sw_o.astype(np.float64))[None, :]) @ wq.astype(np.float64)
        else:
            dx = (gq.astype(np.int64) @ wq.astype(np.int64)) * (sg * float(sw))
        db = dy.astype(np.float64).sum(axis=0)
    else:
        if cfg.per_channel_weights:
            w_of_o = wq.astype(np.float64) * sw_o.astype(np.float64)[:, None, None, None]
            dw_int, dx = ref_conv_grads_int(xq, wq, gq, stride, padding, w_of_o)
            dx = dx * sg
        else:
            dw_int, dx_int = ref_conv_grads_int(xq, wq, gq, stride, padding)
            dx = dx_int * (sg * float(sw))
        db = dy.astype(np.float64).sum(axis=(0, 2, 3))
    dw = dw_int * (sg * sx)
    db = db.astype(f32)
    return y, dx, dw, db, (db * mu, db * alpha, db)


def assert_f32_close(name, got, want, ulps=8):
    """Equal up to float32 rounding: within ``ulps`` units of the last place of the largest value."""
    want = np.asarray(want, np.float64)
    tol = ulps * np.spacing(np.float32(np.abs(want).max()))
    err = np.abs(got.astype(np.float64) - want).max()
    assert err <= tol, f"{name}: max error {err:.3g} > {tol:.3g} (max |ref| {np.abs(want).max():.3g})"


CONFIGS = {
    "default": el.OctoConfig(),
    "per-channel": el.OctoConfig(per_channel_weights=True),
    "sigma-nearest": el.OctoConfig(prc="sigma", grad_rounding="nearest"),
    "sigma-z1.5": el.OctoConfig(prc="sigma", z=1.5),
    "no-prc-nearest-x": el.OctoConfig(prc=None, act_rounding="nearest"),
    "minmax-0.8": el.OctoConfig(kappa=0.8, weight_rounding="stochastic"),
}
CONV_SHAPES = [
    # x shape, w shape, stride, padding: padded grid (direct kernel), strided patch matrix, pointwise, wider
    ((2, 3, 9, 9), (8, 3, 3, 3), (1, 1), (1, 1)),
    ((2, 4, 8, 7), (5, 4, 3, 3), (2, 2), (1, 0)),
    ((3, 6, 5, 5), (4, 6, 1, 1), (1, 1), (0, 0)),
    ((4, 16, 7, 7), (32, 16, 3, 3), (1, 1), (1, 1)),
]


def _heavy_tailed(rng, shape, scale):
    # gradients after BatchNorm are heavy-tailed: PRC clips some of them in both modes
    return (rng.standard_t(3, size=shape) * scale).astype(np.float32)


def _tensors(rng, x_shape, w_shape):
    o = w_shape[0]
    x = Tensor(rng.standard_normal(x_shape).astype(np.float32), requires_grad=True)
    w = el.nn.Parameter(rng.standard_normal(w_shape).astype(np.float32) * 0.3)
    b = el.nn.Parameter(rng.standard_normal(o).astype(np.float32) * 0.1)
    comp = tuple(el.nn.Parameter(rng.standard_normal(o).astype(np.float32) * s) for s in (1.0, 0.1, 0.1))
    return x, w, b, comp


def _check(kind, rng, cfg, x_shape, w_shape, stride=None, padding=None):
    x, w, b, comp = _tensors(rng, x_shape, w_shape)
    seed = int(rng.integers(0, 2**62))
    if kind == "linear":
        y = F.linear_int8(x, w, b, cfg, seed=seed, training=True, compensation=comp)
    else:
        y = F.conv2d_int8(x, w, b, cfg, stride, padding, seed=seed, training=True, compensation=comp)
    dy = _heavy_tailed(rng, y.shape, 0.01)
    y.backward(dy)
    ry, rdx, rdw, rdb, (rda, rdm, rdbeta) = ref_step(
        kind, x.data, w.data, b.data, tuple(t.data for t in comp), cfg, seed, dy, stride, padding)
    assert_f32_close("y", y.data, ry)
    assert_f32_close("dx", x.grad.data, rdx)
    assert_f32_close("dw", w.grad.data, rdw)
    assert_f32_close("db", b.grad.data, rdb)
    np.testing.assert_array_equal(comp[0].grad.data, b.grad.data * comp[1].data)
    np.testing.assert_array_equal(comp[1].grad.data, b.grad.data * comp[0].data)
    np.testing.assert_array_equal(comp[2].grad.data, b.grad.data)
    assert_f32_close("dalpha", comp[0].grad.data, rda)
    return y


@pytest.mark.parametrize("cfg", CONFIGS.values(), ids=CONFIGS.keys())
@pytest.mark.parametrize("shape", [(32, 64, 10), (5, 7, 3), (1, 300, 1)], ids=str)
def test_linear_step_matches_the_numpy_reference(cfg, shape):
    n, k, o = shape
    _check("linear", np.random.default_rng(n * 1000 + k), cfg, (n, k), (o, k))


@pytest.mark.parametrize("cfg", CONFIGS.values(), ids=CONFIGS.keys())
@pytest.mark.parametrize("geom", CONV_SHAPES, ids=lambda g: f"{g[0]}x{g[1]}s{g[2][0]}p{g[3][0]}")
def test_conv_step_matches_the_numpy_reference(cfg, geom):
    x_shape, w_shape, stride, padding = geom
    _check("conv", np.random.default_rng(sum(x_shape) * 7 + w_shape[0]), cfg, x_shape, w_shape, stride, padding)


def test_sigma_prc_clips_the_gradient_before_quantizing():
    """Sigma mode differs from minmax and from no clipping on a heavy-tailed gradient, and matches its
    own reference (z = 2.576 and a tighter z)."""
    rng = np.random.default_rng(3)
    x, w, b, comp = _tensors(rng, (4, 16, 7, 7), (32, 16, 3, 3))
    dy = _heavy_tailed(rng, (4, 32, 7, 7), 0.01)
    grads = {}
    for prc in ("sigma", "minmax", None):
        cfg = el.OctoConfig(prc=prc, grad_rounding="nearest")
        w.grad = None
        y = F.conv2d_int8(x, w, b, cfg, 1, 1, seed=11, training=True)
        y.backward(dy)
        grads[prc] = w.grad.data.copy()
        _, _, rdw, _, _ = ref_step("conv", x.data, w.data, b.data, tuple(t.data for t in comp), cfg, 11, dy,
                                   (1, 1), (1, 1))
        assert_f32_close(f"dw {prc}", grads[prc], rdw)
    assert not np.array_equal(grads["sigma"], grads["minmax"])
    assert not np.array_equal(grads["sigma"], grads[None])


def test_layer_step_is_bit_identical_whatever_the_thread_count():
    rng = np.random.default_rng(5)
    x, w, b, comp = _tensors(rng, (8, 16, 14, 14), (32, 16, 3, 3))
    dy = _heavy_tailed(rng, (8, 32, 14, 14), 0.01)
    prev = el.get_num_threads()
    out = []
    try:
        for t in (1, 2, 3):
            el.set_num_threads(t)
            x.grad = w.grad = None
            y = F.conv2d_int8(x, w, b, el.OctoConfig(), 1, 1, seed=99, training=True, compensation=comp)
            y.backward(dy)
            out.append((y.data.copy(), x.grad.data.copy(), w.grad.data.copy()))
    finally:
        el.set_num_threads(prev)
    for got in out[1:]:
        for a, b_ in zip(out[0], got):
            np.testing.assert_array_equal(a, b_)


def test_eval_mode_rounds_activations_to_nearest():
    rng = np.random.default_rng(8)
    x, w, b, comp = _tensors(rng, (3, 10), (4, 10))
    cfg = el.OctoConfig()
    with el.no_grad():
        y1 = F.linear_int8(x, w, b, cfg, seed=1, training=False)
        y2 = F.linear_int8(x, w, b, cfg, seed=2, training=False)
    np.testing.assert_array_equal(y1.data, y2.data)
    xq, sx = ref_quantize(x.data)
    wq, sw = ref_quantize(w.data)
    want = (xq.astype(np.int64) @ wq.astype(np.int64).T).astype(np.float32) * (np.float32(sx) * np.float32(sw)) + b.data
    assert_f32_close("y", y1.data, want)
