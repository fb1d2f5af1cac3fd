"""INT8 training reuses buffers in place (Sequential donates unshared intermediates; unshared gradients are
overwritten): results must equal the out-of-place path, and tensors someone else holds are never touched."""

import numpy as np
import pytest

import edgelearn
from edgelearn import nn
from edgelearn.functional import cross_entropy
from edgelearn.models import cnn


def _model():
    edgelearn.manual_seed(3)
    m = cnn(1, 10, 12)
    edgelearn.octo(m, edgelearn.OctoConfig(seed=5))
    return m


def _run(model, x, y, layer_by_layer, fuse=True):
    model.train()
    if layer_by_layer:
        h = edgelearn.tensor(x)
        keep = []  # holding every intermediate: nothing may be donated
        layers = list(model)
        i = 0
        while i < len(layers):
            layer = layers[i]
            nxt = layers[i + 1] if i + 1 < len(layers) else None
            if fuse and nxt is not None and getattr(layer, "fuses_with", lambda _: False)(nxt):
                h = layer(h, compensation=nxt)  # what Sequential does with an INT8 layer + its LAC
                i += 2
            else:
                h = layer(h)
                i += 1
            keep.append(h)
        logits = h
        snapshot = [k.numpy().copy() for k in keep]
    else:
        logits, keep, snapshot = model(edgelearn.tensor(x)), [], []
    loss = cross_entropy(logits, y) + model.regularization()
    model.zero_grad() if hasattr(model, "zero_grad") else None
    loss.backward()
    for k, s in zip(keep, snapshot):
        np.testing.assert_array_equal(k.numpy(), s)  # held intermediates were not overwritten
    return logits.numpy().copy(), [p.grad.numpy().copy() for p in model.parameters()]


def test_sequential_inplace_equals_layer_by_layer():
    rng = np.random.default_rng(0)
    x = rng.random((6, 1, 12, 12), dtype=np.float32)
    y = rng.integers(0, 10, 6)
    a, b = _model(), _model()
    la, ga = _run(a, x, y, layer_by_layer=False)
    lb, gb = _run(b, x, y, layer_by_layer=True)
    np.testing.assert_array_equal(la, lb)
    assert len(ga) == len(gb)
    for u, v in zip(ga, gb):
        np.testing.assert_array_equal(u, v)


def test_fused_compensation_equals_separate_compensation_layer():
    """Sequential applies each LAC Compensation inside the INT8 layer before it (its shift joins the GEMM
    epilogue's bias): outputs and every gradient, α, μ, β included, match the separate layer up to float
    rounding (the shift is added to the bias before, not to the output after)."""
    rng = np.random.default_rng(2)
    x = rng.random((6, 1, 12, 12), dtype=np.float32)
    y = rng.integers(0, 10, 6)
    a, b = _model(), _model()
    assert any(getattr(m, "fuses_with", lambda _: False)(n) for m, n in zip(list(a), list(a)[1:]))
    la, ga = _run(a, x, y, layer_by_layer=False)
    lb, gb = _run(b, x, y, layer_by_layer=True, fuse=False)
    np.testing.assert_allclose(la, lb, rtol=1e-4, atol=1e-5)
    assert len(ga) == len(gb)
    for u, v in zip(ga, gb):
        np.testing.assert_allclose(u, v, rtol=1e-3, atol=1e-4 * max(1.0, float(np.abs(v).max())))


def test_fused_compensation_rejects_a_mismatched_layer():
    edgelearn.manual_seed(0)
    lin = nn.Linear(4, 3)
    edgelearn.octo(lin)
    with pytest.raises(ValueError, match="compensation"):
        lin(edgelearn.tensor(np.ones((2, 4), np.float32)), compensation=nn.Compensation(5))
    fp = nn.Linear(4, 3)
    with pytest.raises(ValueError, match="compensation"):
        fp(edgelearn.tensor(np.ones((2, 4), np.float32)), compensation=nn.Compensation(3))


def test_sequential_never_overwrites_its_input():
    model = _model()
    x = edgelearn.tensor(np.random.default_rng(1).random((4, 1, 12, 12), dtype=np.float32))
    before = x.numpy().copy()
    model(x)
    np.testing.assert_array_equal(x.numpy(), before)


def test_inplace_paths_are_taken_by_contract(monkeypatch):
    """The in-place variants run in a plain Sequential step (donated activations, gradients the autograd
    sweep owns), and never when the caller keeps the intermediates: the optimisation cannot switch off (or
    on) silently."""
    from edgelearn import _native

    # a plain Sequential runs each INT8 BatchNorm → ReLU (→ max pool) as one op each way (in place); counted:
    # the in-place-only `..._` functions always, relu_forward_mask when `out` is its first argument
    names = ["batchnorm2d_relu_forward_save_i8_", "batchnorm2d_relu_backward_i8_",
             "batchnorm2d_forward_save_i8_", "relu_forward_mask"]
    calls = dict.fromkeys(names, 0)
    for name in names:
        real = getattr(_native, name)

        def counted(*a, _real=real, _name=name, **kw):
            if _name.endswith("_") or kw.get("out") is a[0]:
                calls[_name] += 1
            return _real(*a, **kw)

        monkeypatch.setattr(_native, name, counted)
    rng = np.random.default_rng(1)
    x = rng.random((4, 1, 12, 12), dtype=np.float32)
    y = rng.integers(0, 10, 4)
    _run(_model(), x, y, layer_by_layer=False)
    assert calls["batchnorm2d_relu_forward_save_i8_"] == calls["batchnorm2d_relu_backward_i8_"] == 3, calls
    assert calls["batchnorm2d_forward_save_i8_"] == calls["relu_forward_mask"] == 0, calls
    calls.update(dict.fromkeys(names, 0))
    _run(_model(), x, y, layer_by_layer=True)
    assert sum(calls.values()) == 0, calls


def test_a_gradient_the_caller_passed_is_never_overwritten():
    model = _model()
    out = model(edgelearn.tensor(np.random.default_rng(2).random((3, 1, 12, 12), dtype=np.float32)))
    g = np.ones(out.shape, np.float32)
    out.backward(g)
    np.testing.assert_array_equal(g, 1.0)
