"""The activation range handed from the op that writes an activation to the INT8 layer that quantizes it:
``batchnorm2d_relu_forward_save_i8_`` returns an ``ActivationRange`` of its output, ``F.batch_norm2d_relu``
keeps it on the result (``Tensor._range``), and the next ``octo_forward`` takes it (``x_range``) instead of a
statistics pass over X, with the same output, codes and scale bit for bit. A range for the wrong array is
refused; one cannot be built from Python (no constructor), so a range too small for its array cannot be
passed at all."""

import numpy as np
import pytest

import edgelearn
from edgelearn import _native, models, nn, optim
from edgelearn.functional import cross_entropy

ARGS = ("stochastic", "nearest", "stochastic", ("minmax", 0.95), False, 1234, True)


def _bn_relu(x, pool=False, relu6=False, gain=1.0):
    c = x.shape[1]
    rng = np.random.default_rng(c)
    gamma = (rng.standard_normal(c) * gain).astype(np.float32)
    beta = rng.standard_normal(c).astype(np.float32)
    out = _native.batchnorm2d_relu_forward_save_i8_(
        x, gamma, beta, np.zeros(c, np.float32), np.ones(c, np.float32), 0.1, 1e-5, pool, relu6)
    return out[5], out[6]


@pytest.mark.parametrize("pool,relu6", [(False, False), (False, True), (True, False)])
@pytest.mark.parametrize("shape", [(2, 3, 7, 9), (8, 16, 16, 16)])
def test_producer_range_is_the_output_amax_and_changes_nothing(shape, pool, relu6):
    x = np.random.default_rng(1).standard_normal(shape).astype(np.float32) * 3
    y, r = _bn_relu(x, pool, relu6)
    assert isinstance(r, _native.ActivationRange)
    assert r.amax == np.abs(y).max()
    w = np.random.default_rng(2).standard_normal((5, y.shape[1], 3, 3)).astype(np.float32)
    b = np.zeros(5, np.float32)
    y0, s0 = _native.octo_forward(y, w, b, None, (1, 1), (1, 1), *ARGS)
    y1, s1 = _native.octo_forward(y, w, b, None, (1, 1), (1, 1), *ARGS, x_range=r)
    np.testing.assert_array_equal(y0.view(np.uint32), y1.view(np.uint32))
    (q0, sx0), (q1, sx1) = s0.input_codes(), s1.input_codes()
    np.testing.assert_array_equal(q0, q1)
    assert np.float32(sx0).view(np.uint32) == np.float32(sx1).view(np.uint32)


def test_range_of_another_array_is_refused_and_none_cannot_be_made():
    x = np.random.default_rng(3).standard_normal((2, 4, 6, 6)).astype(np.float32)
    y, r = _bn_relu(x)
    w = np.ones((3, 4, 1, 1), np.float32)
    smaller = y * np.float32(0.5)  # same shape, other values: its range would be too small for y
    _, r_small = _bn_relu(np.random.default_rng(4).standard_normal((2, 4, 6, 6)).astype(np.float32))
    for other, rng in [(y, r_small), (smaller, r), (y.copy(), r)]:
        with pytest.raises(ValueError, match="x_range"):
            _native.octo_forward(other, w, None, None, (1, 1), (0, 0), *ARGS, x_range=rng)
    with pytest.raises(TypeError):
        _native.ActivationRange()  # no constructor: only the core's producers make one
    with pytest.raises((TypeError, AttributeError)):
        r.amax = 1.0  # frozen


def test_non_finite_output_gets_no_range():
    x = np.random.default_rng(5).standard_normal((2, 3, 4, 4)).astype(np.float32)
    _, r = _bn_relu(x.copy())
    assert r is not None
    # BatchNorm refuses non-finite input, but a huge gain overflows (inf, and NaN from inf - inf): no range, so
    # the layer takes its own pass, which reports the error as before (ReLU6's clamp of +inf to 6 is tested in
    # rust/edgelearn-core/tests/act_range.rs)
    for relu6 in (False, True):
        with np.errstate(over="ignore", invalid="ignore"):
            y, r = _bn_relu(x.copy(), relu6=relu6, gain=3e38)
        assert not np.isfinite(y).all() and r is None
        w = np.ones((3, 3, 1, 1), np.float32)
        with pytest.raises(edgelearn.NonFiniteError):
            _native.octo_forward(y, w, None, None, (1, 1), (0, 0), *ARGS, x_range=r)


def _train(model, shape, drop_ranges, steps=2, seed=0):
    """Losses and final parameters; ``drop_ranges``: octo_forward never gets the producer's range."""
    rng = np.random.default_rng(seed)
    opt = optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    real = _native.octo_forward
    used = []

    def spy(*a, **k):
        if drop_ranges:
            k.pop("x_range", None)
            a = a[:15]
        used.append(k.get("x_range", a[15] if len(a) > 15 else None) is not None)
        return real(*a, **k)

    losses = []
    _native.octo_forward = spy
    try:
        for _ in range(steps):
            x = edgelearn.tensor(rng.standard_normal(shape).astype(np.float32))
            loss = cross_entropy(model(x), rng.integers(0, 10, shape[0]))
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(float(loss.data))
    finally:
        _native.octo_forward = real
    return losses, [p.data.copy() for p in model.parameters()], used


@pytest.mark.parametrize("name", ["cnn", "mobilenet_v2", "resnet20"])
def test_training_with_ranges_is_training_without(name):
    def make():
        edgelearn.manual_seed(7)
        if name == "cnn":
            m = models.cnn(1, 10, image_size=16)
        elif name == "mobilenet_v2":
            m = models.mobilenet_v2(10, width_mult=0.25, in_channels=1, small_input=True)
        else:
            m = models.resnet20(10, in_channels=1)
        edgelearn.octo(m, edgelearn.OctoConfig(seed=3))
        return m.train()

    shape = (4, 1, 32, 32) if name == "mobilenet_v2" else (4, 1, 16, 16)
    la, pa, used_a = _train(make(), shape, drop_ranges=False)
    lb, pb, used_b = _train(make(), shape, drop_ranges=True)
    assert any(used_a) and not any(used_b)  # the ranges were handed over (and dropped in the reference)
    assert la == lb
    for u, v in zip(pa, pb):
        np.testing.assert_array_equal(u.view(np.uint32), v.view(np.uint32))


# --- the producers of signed activations: the residual add, BatchNorm without activation, ReLU into a new array


def _bn_save_i8(x, gain=1.0, shift=None):
    c = x.shape[1]
    rng = np.random.default_rng(c + 1)
    gamma = (rng.standard_normal(c) * gain).astype(np.float32)
    beta = rng.standard_normal(c).astype(np.float32) if shift is None else shift
    return _native.batchnorm2d_forward_save_i8_(
        x, gamma, beta, np.zeros(c, np.float32), np.ones(c, np.float32), 0.1, 1e-5)[4]


def _assert_step_same(y, r):
    w = np.random.default_rng(2).standard_normal((5, y.shape[1], 1, 1)).astype(np.float32)
    y0, s0 = _native.octo_forward(y, w, None, None, (1, 1), (0, 0), *ARGS)
    y1, s1 = _native.octo_forward(y, w, None, None, (1, 1), (0, 0), *ARGS, x_range=r)
    np.testing.assert_array_equal(y0.view(np.uint32), y1.view(np.uint32))
    assert np.float32(s0.input_codes()[1]).view(np.uint32) == np.float32(s1.input_codes()[1]).view(np.uint32)


@pytest.mark.parametrize("shape", [(2, 3, 7, 9), (8, 16, 16, 16), (1, 1, 1, 5)])
def test_residual_add_range_and_sum_are_exact(shape):
    rng = np.random.default_rng(11)
    a, b = (rng.standard_normal(shape).astype(np.float32) * 3 for _ in range(2))
    out = a.copy()
    r = _native.residual_add_(out, b)
    np.testing.assert_array_equal(out.view(np.uint32), (a + b).view(np.uint32))
    assert r.amax == np.abs(a + b).max()
    _assert_step_same(out, r)
    for bad in (np.nan, np.inf, -np.inf):
        out = a.copy()
        out.flat[-1] = bad
        assert _native.residual_add_(out, b) is None
    with pytest.raises(ValueError, match="identity"):
        _native.residual_add_(a.copy(), b[..., :-1].copy())


@pytest.mark.parametrize("shape", [(2, 3, 7, 9), (8, 16, 16, 16)])
def test_batchnorm_without_activation_range_is_exact(shape):
    x = np.random.default_rng(12).standard_normal(shape).astype(np.float32) * 3
    y = x.copy()
    r = _bn_save_i8(y)
    assert r.amax == np.abs(y).max()
    _assert_step_same(y, r)
    nan_shift = np.zeros(shape[1], np.float32)
    nan_shift[-1] = np.nan
    assert _bn_save_i8(x.copy(), shift=nan_shift) is None  # NaN output: no range, the layer's pass raises


def test_relu_mask_ranges_in_place_and_into_a_new_array():
    x = np.random.default_rng(13).standard_normal((3, 5, 7, 7)).astype(np.float32)
    for fwd, ref in ((_native.relu_forward_mask, np.maximum(x, 0)), (_native.relu6_forward_mask, np.clip(x, 0, 6))):
        y, _, r = fwd(x)
        assert r.amax == ref.max()
        _assert_step_same(y, r)
        xi = x.copy()
        yi, _, ri = fwd(xi, out=xi)
        assert yi is xi and ri.amax == ref.max()
        xn = x.copy()
        xn[1, 2, 3, 4] = np.nan
        assert fwd(xn)[2] is None


def test_residual_add_op_hands_the_range_on_and_clears_the_overwritten_one():
    from edgelearn import functional as F

    rng = np.random.default_rng(14)
    a = rng.standard_normal((2, 4, 6, 6)).astype(np.float32)
    b = rng.standard_normal((2, 4, 6, 6)).astype(np.float32)
    out = F.relu(edgelearn.tensor(a - 5, requires_grad=True), save_mask=True)  # owned, with a range
    assert out._range is not None
    s = F.residual_add(out, edgelearn.tensor(b))
    assert out._range is None and s._range.amax == np.abs(np.maximum(a - 5, 0) + b).max()
    # an identity that shares memory with out, or a strided one: numpy's add, no range
    base = edgelearn.tensor(a)
    base._owned = True
    s = F.residual_add(base, base.data[:, :, ::1, ::1])  # (as_tensor: the view itself, no copy)
    assert s._range is None and s.data is base.data
    np.testing.assert_array_equal(s.data, a + a)


# Octo layer calls per training step that get their input's range (of all), per model: the stem and the
# classifier read an input batch and a pooled (dropped-out) vector that no producer hands a range for
COVERAGE = {"cnn": (2, 4), "mobilenet_v2": (51, 53), "resnet20": (20, 22)}


@pytest.mark.parametrize("name", sorted(COVERAGE))
def test_range_coverage_per_step(name):
    edgelearn.manual_seed(7)
    if name == "cnn":
        m, shape = models.cnn(1, 10, image_size=16), (4, 1, 16, 16)
    elif name == "mobilenet_v2":
        m, shape = models.mobilenet_v2(10, width_mult=0.5, in_channels=1, small_input=True), (4, 1, 32, 32)
    else:
        m, shape = models.resnet20(10, in_channels=1), (4, 1, 16, 16)
    edgelearn.octo(m, edgelearn.OctoConfig(seed=3))
    _, _, used = _train(m.train(), shape, drop_ranges=False, steps=1)
    assert (sum(used), len(used)) == COVERAGE[name]
