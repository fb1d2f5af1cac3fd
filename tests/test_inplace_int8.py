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


def _run(model, x, y, layer_by_layer):
    model.train()
    if layer_by_layer:
        h = edgelearn.tensor(x)
        keep = []  # holding every intermediate: nothing may be donated
        for layer in model:
            h = layer(h)
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


def test_sequential_never_overwrites_its_input():
    model = _model()
    x = edgelearn.tensor(np.random.default_rng(1).random((4, 1, 12, 12), dtype=np.float32))
    before = x.numpy().copy()
    model(x)
    np.testing.assert_array_equal(x.numpy(), before)
