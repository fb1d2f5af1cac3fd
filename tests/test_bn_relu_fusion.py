"""INT8 training runs BatchNorm2d → ReLU (→ 2x2 max pool) as one core op each way (``F.batch_norm2d_relu``):
the same outputs, gradients and running statistics as the three ops one by one, bit for bit, over several
training steps, with and without pooling, on even and odd planes, on one and two threads."""

import numpy as np
import pytest

import edgelearn
from edgelearn import _native, nn, optim
from edgelearn.functional import cross_entropy
from edgelearn.nn.module import fusion_plan, run_chain


def _model(image, pool=True, channels=(8, 16), act=nn.ReLU):
    edgelearn.manual_seed(4)
    layers, c = [], 1
    for i, ch in enumerate(channels):
        layers += [nn.Conv2d(c, ch, 3, padding=1), nn.BatchNorm2d(ch), act()]
        if pool and i == 0:
            layers.append(nn.MaxPool2d(2))
        c = ch
    m = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, 10))
    edgelearn.octo(m, edgelearn.OctoConfig(seed=9))
    return m


def _unfused(plan):
    out = []
    for m, fused in plan:
        if type(fused) is tuple:
            out += [(m, None)] + [(f, None) for f in fused]
        else:
            out.append((m, fused))
    return out


def _train(model, fuse, steps=3, image=11, n=6):
    rng = np.random.default_rng(image)
    opt = optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    plan = fusion_plan(list(model))
    if not fuse:
        plan = _unfused(plan)
    model.train()
    logs = []
    for _ in range(steps):
        x = rng.standard_normal((n, 1, image, image)).astype(np.float32)
        y = rng.integers(0, 10, n)
        opt.zero_grad()
        logits = run_chain(edgelearn.tensor(x), plan)
        loss = cross_entropy(logits, y) + model.regularization()
        loss.backward()
        opt.step()
        logs.append(logits.numpy().copy())
    state = {k: v.copy() for k, v in model.state_dict().items()}
    return logs, state


@pytest.mark.parametrize("image,pool", [(12, True), (11, True), (9, False), (2, True)])
def test_fused_equals_one_by_one(image, pool):
    fused_plan = fusion_plan(list(_model(image, pool)))
    kinds = [len(f) for _, f in fused_plan if type(f) is tuple]
    assert kinds == ([2, 1] if pool else [1, 1])  # the fusion applies (ReLU + pool, then ReLU alone)
    la, sa = _train(_model(image, pool), fuse=True, image=image)
    lb, sb = _train(_model(image, pool), fuse=False, image=image)
    for u, v in zip(la, lb):
        np.testing.assert_array_equal(u, v)
    assert sa.keys() == sb.keys()
    for k in sa:
        np.testing.assert_array_equal(sa[k], sb[k], err_msg=k)


def test_relu6_fused_equals_one_by_one():
    """BatchNorm2d → ReLU6 fuses too (ReLU6's clamp and its 0 < x < 6 mask in the same op)."""
    fused_plan = fusion_plan(list(_model(9, pool=True, act=nn.ReLU6)))
    assert [len(f) for _, f in fused_plan if type(f) is tuple] == [1, 1]  # never with the pool
    la, sa = _train(_model(9, True, act=nn.ReLU6), fuse=True, image=9)
    lb, sb = _train(_model(9, True, act=nn.ReLU6), fuse=False, image=9)
    for u, v in zip(la, lb):
        np.testing.assert_array_equal(u, v)
    for k in sa:
        np.testing.assert_array_equal(sa[k], sb[k], err_msg=k)


def test_relu6_mask_matches_numpy():
    from edgelearn.functional import relu6

    x = np.random.default_rng(0).uniform(-3, 9, (3, 4, 5, 7)).astype(np.float32)
    x[0, 0, 0, :3] = [0.0, 6.0, -0.0]
    g = np.random.default_rng(1).standard_normal(x.shape).astype(np.float32)
    t = edgelearn.tensor(x.copy(), requires_grad=True)
    y = relu6(t, save_mask=True)
    np.testing.assert_array_equal(y.numpy(), np.clip(x, 0, 6))
    y.backward(g)
    np.testing.assert_array_equal(t.grad, np.where((x > 0) & (x < 6), g, 0))


def test_fused_same_on_one_and_two_threads():
    before = edgelearn.get_num_threads()
    try:
        out = []
        for t in (1, 2):
            edgelearn.set_num_threads(t)
            # a batch large enough that the fused passes run over the pool
            out.append(_train(_model(28), fuse=True, steps=2, image=28, n=32))
    finally:
        edgelearn.set_num_threads(before)
    (la, sa), (lb, sb) = out
    for u, v in zip(la, lb):
        np.testing.assert_array_equal(u, v)
    for k in sa:
        np.testing.assert_array_equal(sa[k], sb[k], err_msg=k)


def test_pooled_backward_rejects_bad_offsets():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 3, 4, 4)).astype(np.float32)
    c = 3
    mean, invstd, xq, sx, idx, y, _ = _native.batchnorm2d_relu_forward_save_i8_(
        x, np.ones(c, np.float32), np.zeros(c, np.float32), np.zeros(c, np.float32), np.ones(c, np.float32),
        0.1, 1e-5, True)
    assert y.shape == (2, 3, 2, 2) and idx.shape == y.shape
    assert np.all((idx == 4) == (y <= 0)) and np.all(y >= 0)
    bad = idx.copy()
    bad[0, 0, 0, 0] = 5
    with pytest.raises(ValueError, match="idx"):
        _native.batchnorm2d_relu_backward_i8_(np.ones_like(y), bad, True, xq, sx, None, mean, invstd)
    with pytest.raises(ValueError, match="dy"):
        _native.batchnorm2d_relu_backward_i8_(np.ones_like(x), idx, True, xq, sx, None, mean, invstd)


def test_empty_batch_is_an_error_or_zero_gradients_never_a_panic():
    """A batch of no images: the fused forward refuses it by name; the backward (whose arrays a caller may
    pass directly) gives zero parameter gradients and an empty dx, with and without pooling."""
    from edgelearn import InvalidArgumentError

    c = 3
    ones, zeros = np.ones(c, np.float32), np.zeros(c, np.float32)
    with pytest.raises(InvalidArgumentError, match="more than 1 value per channel"):
        _native.batchnorm2d_relu_forward_save_i8_(
            np.zeros((0, c, 4, 4), np.float32), ones, zeros, zeros.copy(), ones.copy(), 0.1, 1e-5, True, False)
    xq = np.zeros((0, c, 4, 4), np.int8)
    for pool, dy, saved in [(True, np.zeros((0, c, 2, 2), np.float32), np.zeros((0, c, 2, 2), np.uint8)),
                            (False, np.zeros((0, c, 4, 4), np.float32), np.zeros(0, np.uint8))]:
        dx, dgamma, dbeta = _native.batchnorm2d_relu_backward_i8_(dy, saved, pool, xq, 0.1, ones, zeros, ones)
        assert dx.shape == (0, c, 4, 4)
        np.testing.assert_array_equal(dgamma, zeros)
        np.testing.assert_array_equal(dbeta, zeros)
