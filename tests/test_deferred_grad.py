"""dW of an INT8 layer computed on another thread (``octo_backward(defer_dw=True)`` → ``DeferredGrad``) while the
autograd sweep goes on: the same bits as computing it in the call, whatever the thread count, including a weight
shared by two layers (its gradients summed) and a weight that is an op's output (not a leaf)."""

import numpy as np
import pytest

import edgelearn as el
from edgelearn import _native
from edgelearn import functional as F
from edgelearn.tensor import Tensor


def _layer_state(rng):
    x = rng.standard_normal((4, 6, 5, 5)).astype(np.float32)
    w = (rng.standard_normal((6, 6, 3, 3)) * 0.3).astype(np.float32)
    b = np.zeros(6, np.float32)
    y, saved = _native.octo_forward(x, w, b, None, (1, 1), (1, 1), "stochastic", "nearest", "stochastic",
                                    ("minmax", 0.95), False, 3, True)
    return saved, (rng.standard_normal(y.shape) * 0.01).astype(np.float32)


def test_deferred_grad_is_the_in_call_dw():
    saved, dy = _layer_state(np.random.default_rng(0))
    dx0, dw0, db0, *_ = _native.octo_backward(saved, dy, True, True, True, False, False)
    dx1, pending, db1, *_ = _native.octo_backward(saved, dy, True, True, True, False, True)
    assert isinstance(pending, _native.DeferredGrad) and pending.shape == [6, 6, 3, 3]
    dw1 = pending.wait()
    assert pending.done()
    np.testing.assert_array_equal(dx0, dx1)
    np.testing.assert_array_equal(db0, db1)
    np.testing.assert_array_equal(dw0, dw1)
    with pytest.raises(el.InvalidArgumentError, match="wait"):
        pending.wait()
    # nothing to defer without dW
    _, dw, _, *_ = _native.octo_backward(saved, dy, True, False, True, False, True)
    assert dw is None


def test_a_grouped_layer_returns_dw_in_the_call_even_when_asked_to_defer():
    # the grouped kernels compute dW with dX anyway: deferring would compute it a second time
    rng = np.random.default_rng(2)
    x = rng.standard_normal((2, 6, 5, 5)).astype(np.float32)
    w = (rng.standard_normal((6, 1, 3, 3)) * 0.3).astype(np.float32)
    y, saved = _native.octo_forward(x, w, None, None, (1, 1), (1, 1), "stochastic", "nearest", "stochastic",
                                    ("minmax", 0.95), False, 3, True, None, 6)
    dy = (rng.standard_normal(y.shape) * 0.01).astype(np.float32)
    dx0, dw0, *_ = _native.octo_backward(saved, dy, True, True, False, False, False)
    dx1, dw1, *_ = _native.octo_backward(saved, dy, True, True, False, False, True)
    assert isinstance(dw1, np.ndarray)
    np.testing.assert_array_equal(dx0, dx1)
    np.testing.assert_array_equal(dw0, dw1)


def _grads(threads, defer):
    """Gradients of a small graph: a weight shared by two INT8 convolutions, and a weight that is an op's
    output (``w2 * 1``), so the sweep sums a deferred gradient and hands one to a non-leaf."""
    orig = _native.octo_backward
    if not defer:
        _native.octo_backward = lambda s, g, nx, nw, nb, nc, d=False: orig(s, g, nx, nw, nb, nc, False)
    prev = el.get_num_threads()
    try:
        el.set_num_threads(threads)
        rng = np.random.default_rng(1)
        x = Tensor(rng.standard_normal((3, 4, 6, 6)).astype(np.float32), requires_grad=True)
        w = el.nn.Parameter((rng.standard_normal((4, 4, 3, 3)) * 0.3).astype(np.float32))
        w2 = el.nn.Parameter((rng.standard_normal((4, 4, 3, 3)) * 0.3).astype(np.float32))
        b = el.nn.Parameter(np.zeros(4, np.float32))
        cfg = el.OctoConfig()
        h = F.conv2d_int8(x, w, b, cfg, 1, 1, seed=5)
        h = F.conv2d_int8(h, w, b, cfg, 1, 1, seed=6)
        h = F.conv2d_int8(h, w2 * 1.0, b, cfg, 1, 1, seed=7)
        (h * h).sum().backward()
        return [t.grad.data.copy() for t in (x, w, w2, b)]
    finally:
        _native.octo_backward = orig
        el.set_num_threads(prev)


def test_sweep_with_deferred_grads_is_bit_identical_to_in_call_and_across_threads():
    want = _grads(1, defer=False)
    for threads, defer in ((1, True), (2, True), (2, False)):
        for a, b in zip(want, _grads(threads, defer)):
            np.testing.assert_array_equal(a, b)
