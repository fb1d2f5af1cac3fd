"""Optimizers and schedulers against hand-computed reference steps (PyTorch's update rules), and their state
dicts."""

import math

import numpy as np
import pytest

import edgelearn as el
from edgelearn import nn, optim

GRADS = [np.array([0.5, -1.0, 2.0]), np.array([-0.25, 0.5, 1.0]), np.array([1.0, 1.0, -3.0]), np.array([0.1, 0.0, 0.2])]
P0 = np.array([1.0, -2.0, 0.5])


def run(opt_factory, grads=GRADS):
    p = nn.Parameter(P0.copy())
    opt = opt_factory([p])
    out = []
    for g in grads:
        opt.zero_grad()
        p.grad = el.Tensor(g.astype(np.float32))
        opt.step()
        out.append(p.numpy().astype(np.float64).copy())
    return out


def sgd_reference(lr, momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False):
    p, buf, out = P0.copy(), None, []
    for g in GRADS:
        d = g + weight_decay * p
        if momentum:
            buf = d.copy() if buf is None else momentum * buf + (1 - dampening) * d
            d = d + momentum * buf if nesterov else buf
        p = p - lr * d
        out.append(p.copy())
    return out


def adam_reference(lr, b1, b2, eps, weight_decay=0.0, decoupled=False, amsgrad=False):
    p, m, v, vmax, out = P0.copy(), np.zeros(3), np.zeros(3), np.zeros(3), []
    for t, g in enumerate(GRADS, start=1):
        if decoupled:
            p = p * (1 - lr * weight_decay)
        else:
            g = g + weight_decay * p
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        vmax = np.maximum(vmax, v)
        vv = vmax if amsgrad else v
        mhat, vhat = m / (1 - b1**t), vv / (1 - b2**t)
        p = p - lr * mhat / (np.sqrt(vhat) + eps)
        out.append(p.copy())
    return out


@pytest.mark.parametrize(
    "kw",
    [
        dict(lr=0.1),
        dict(lr=0.1, momentum=0.9),
        dict(lr=0.1, momentum=0.9, dampening=0.5),
        dict(lr=0.05, momentum=0.8, nesterov=True),
        dict(lr=0.1, momentum=0.9, weight_decay=0.01, nesterov=True),
        dict(lr=0.1, weight_decay=0.1),
    ],
)
def test_sgd_matches_reference_steps(kw):
    for got, want in zip(run(lambda ps: optim.SGD(ps, **kw)), sgd_reference(**kw)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "kw",
    [dict(lr=0.1), dict(lr=0.1, momentum=0.9, dampening=0.3), dict(lr=0.05, momentum=0.8, nesterov=True),
     dict(lr=0.1, momentum=0.9, weight_decay=0.01, nesterov=True), dict(lr=0.3, weight_decay=0.1)],
)
def test_sgd_batched_core_step_equals_the_per_parameter_numpy_update_bit_for_bit(kw):
    rng = np.random.default_rng(3)
    shapes = [(7, 3), (5,), (2, 3, 4, 1), (0,), (1,)]
    init = [rng.standard_normal(s).astype(np.float32) for s in shapes]
    fast = [nn.Parameter(a.copy()) for a in init]
    slow = [nn.Parameter(a.copy()) for a in init]
    opt_fast, opt_slow = optim.SGD(fast, **kw), optim.SGD(slow, **kw)
    for step in range(4):
        grads = [rng.standard_normal(s).astype(np.float32) for s in shapes]
        for ps, opt in ((fast, opt_fast), (slow, opt_slow)):
            opt.zero_grad()
            for p, g in zip(ps, grads):
                p.grad = el.Tensor(g.copy())
        if step == 2:
            fast[1].grad = None  # a parameter without a gradient is left alone
            slow[1].grad = None
        opt_fast.step()
        for p in slow:  # the reference: the per-parameter numpy update
            if p.grad is not None:
                opt_slow._update(p, p.grad.data, opt_slow.param_groups[0], opt_slow.state.setdefault(id(p), {}))
        for a, b in zip(fast, slow):
            np.testing.assert_array_equal(a.numpy(), b.numpy())


def test_sgd_core_step_rejects_mismatched_arrays():
    from edgelearn import _native

    p = np.zeros(3, np.float32)
    with pytest.raises(ValueError, match="grad"):
        _native.sgd_step([p], [np.zeros(2, np.float32)], None, 0.1, 0.0, 1.0, 0.0, False)
    with pytest.raises(ValueError, match="momentum_buffer"):
        _native.sgd_step([p], [np.zeros(3, np.float32)], None, 0.1, 0.9, 1.0, 0.0, False)
    with pytest.raises(TypeError, match=r"momentum_buffers\[0\]"):
        _native.sgd_step([p], [np.zeros(3, np.float32)], [None], 0.1, 0.9, 1.0, 0.0, False)
    with pytest.raises(ValueError, match="grads"):
        _native.sgd_step([p], [], None, 0.1, 0.0, 1.0, 0.0, False)
    with pytest.raises(TypeError):
        _native.sgd_step([np.zeros(3)], [np.zeros(3, np.float32)], None, 0.1, 0.0, 1.0, 0.0, False)
    with pytest.raises(ValueError, match="C-contiguous"):
        _native.sgd_step([np.zeros((3, 2), np.float32).T], [np.zeros((2, 3), np.float32)], None, 0.1, 0.0, 1.0, 0.0, False)


@pytest.mark.parametrize(
    "kw",
    [dict(lr=0.01), dict(lr=0.1, betas=(0.8, 0.99), eps=1e-6), dict(lr=0.01, weight_decay=0.1),
     dict(lr=0.05, amsgrad=True)],
)
def test_adam_matches_reference_steps(kw):
    ref = adam_reference(kw["lr"], *kw.get("betas", (0.9, 0.999)), kw.get("eps", 1e-8),
                         weight_decay=kw.get("weight_decay", 0.0), amsgrad=kw.get("amsgrad", False))
    for got, want in zip(run(lambda ps: optim.Adam(ps, **kw)), ref):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_adamw_decouples_weight_decay():
    ref = adam_reference(0.01, 0.9, 0.999, 1e-8, weight_decay=0.5, decoupled=True)
    for got, want in zip(run(lambda ps: optim.AdamW(ps, lr=0.01, weight_decay=0.5)), ref):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert optim.AdamW([nn.Parameter(np.zeros(1))]).param_groups[0]["weight_decay"] == 0.01


def test_parameters_without_grad_are_skipped_and_updates_are_in_place():
    a, b = nn.Parameter(np.ones(2)), nn.Parameter(np.ones(2))
    storage = a.numpy()
    opt = optim.SGD([a, b], lr=1.0)
    a.grad = el.Tensor(np.full(2, 0.5, np.float32))
    opt.step()
    assert a.numpy() is storage
    np.testing.assert_array_equal(a.numpy(), [0.5, 0.5])
    np.testing.assert_array_equal(b.numpy(), [1.0, 1.0])


def test_zero_grad_sets_none_or_zeros():
    p = nn.Parameter(np.ones(2))
    opt = optim.SGD([p], lr=0.1)
    p.grad = el.Tensor(np.ones(2, np.float32))
    opt.zero_grad(set_to_none=False)
    np.testing.assert_array_equal(p.grad.numpy(), [0, 0])
    opt.zero_grad()
    assert p.grad is None


def test_param_groups_have_their_own_hyperparameters():
    a, b = nn.Parameter(np.ones(1)), nn.Parameter(np.ones(1))
    opt = optim.SGD([{"params": [a]}, {"params": [b], "lr": 1.0}], lr=0.1)
    a.grad = el.Tensor(np.ones(1, np.float32))
    b.grad = el.Tensor(np.ones(1, np.float32))
    opt.step()
    assert a.numpy()[0] == pytest.approx(0.9) and b.numpy()[0] == pytest.approx(0.0)


def test_optimizer_rejects_bad_arguments():
    with pytest.raises(ValueError):
        optim.SGD([], lr=0.1)
    with pytest.raises(ValueError):
        optim.SGD([nn.Parameter(np.ones(1))], lr=0.1, nesterov=True)
    with pytest.raises(ValueError):
        optim.Adam([nn.Parameter(np.ones(1))], betas=(1.0, 0.9))
    p = nn.Parameter(np.ones(1))
    with pytest.raises(ValueError, match="more than one"):
        optim.SGD([p, p], lr=0.1)


@pytest.mark.parametrize(
    "factory",
    [lambda ps: optim.SGD(ps, lr=0.1, momentum=0.9, nesterov=True), lambda ps: optim.Adam(ps, lr=0.01, amsgrad=True),
     lambda ps: optim.AdamW(ps, lr=0.01)],
)
def test_optimizer_state_dict_round_trip_continues_exactly(factory):
    def make():
        el.manual_seed(0)
        return nn.Linear(3, 2)

    model_a = make()
    opt_a = factory(model_a.parameters())
    grads = [np.random.default_rng(i).standard_normal((2, 3)).astype(np.float32) for i in range(6)]

    def step(model, opt, g):
        opt.zero_grad()
        model.weight.grad = el.Tensor(g)
        model.bias.grad = el.Tensor(g[:, 0].copy())
        opt.step()

    for g in grads[:3]:
        step(model_a, opt_a, g)
    saved_model, saved_opt = model_a.state_dict(), opt_a.state_dict()
    assert sorted(saved_opt) == ["param_groups", "state"] and saved_opt["param_groups"][0]["params"] == [0, 1]
    for g in grads[3:]:
        step(model_a, opt_a, g)

    model_b = make()
    opt_b = factory(model_b.parameters())
    model_b.load_state_dict(saved_model)
    opt_b.load_state_dict(saved_opt)
    for g in grads[3:]:
        step(model_b, opt_b, g)
    for k, v in model_a.state_dict().items():
        np.testing.assert_array_equal(model_b.state_dict()[k], v)


def test_optimizer_state_dict_is_a_copy():
    p = nn.Parameter(np.ones(2))
    opt = optim.SGD([p], lr=0.1, momentum=0.9)
    p.grad = el.Tensor(np.ones(2, np.float32))
    opt.step()
    sd = opt.state_dict()
    sd["state"][0]["momentum_buffer"][:] = 99
    sd["param_groups"][0]["lr"] = 5.0
    assert opt.param_groups[0]["lr"] == 0.1
    assert not np.any(opt.state_dict()["state"][0]["momentum_buffer"] == 99)


def test_optimizer_load_state_dict_rejects_mismatches():
    opt = optim.SGD([nn.Parameter(np.ones(2))], lr=0.1, momentum=0.9)
    other = optim.SGD([nn.Parameter(np.ones(2)), nn.Parameter(np.ones(3))], lr=0.1)
    with pytest.raises(ValueError, match="parameters"):
        opt.load_state_dict(other.state_dict())
    with pytest.raises(ValueError, match="groups"):
        opt.load_state_dict({"state": {}, "param_groups": []})
    big = optim.SGD([nn.Parameter(np.ones(5))], lr=0.1, momentum=0.9)
    big.param_groups[0]["params"][0].grad = el.Tensor(np.ones(5, np.float32))
    big.step()
    with pytest.raises(ValueError, match="shape"):
        opt.load_state_dict(big.state_dict())


# --- schedulers ---------------------------------------------------------------------------------------------


def lrs(sched, opt, n):
    out = []
    for _ in range(n):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


def test_step_lr():
    opt = optim.SGD([nn.Parameter(np.ones(1))], lr=1.0)
    sched = optim.StepLR(opt, step_size=2, gamma=0.5)
    assert lrs(sched, opt, 6) == pytest.approx([1.0, 1.0, 0.5, 0.5, 0.25, 0.25])
    assert sched.get_last_lr() == pytest.approx([0.125])


def test_cosine_annealing_lr():
    opt = optim.SGD([nn.Parameter(np.ones(1))], lr=0.1)
    sched = optim.CosineAnnealingLR(opt, T_max=4, eta_min=0.01)
    want = [0.01 + 0.09 * (1 + math.cos(math.pi * t / 4)) / 2 for t in range(5)]
    assert lrs(sched, opt, 5) == pytest.approx(want)


def test_scheduler_state_dict_round_trip():
    opt = optim.SGD([nn.Parameter(np.ones(1))], lr=0.1)
    sched = optim.CosineAnnealingLR(opt, T_max=10)
    for _ in range(3):
        sched.step()
    state, opt_state = sched.state_dict(), opt.state_dict()
    expected = lrs(sched, opt, 4)

    opt2 = optim.SGD([nn.Parameter(np.ones(1))], lr=0.1)
    sched2 = optim.CosineAnnealingLR(opt2, T_max=10)
    opt2.load_state_dict(opt_state)
    sched2.load_state_dict(state)
    assert lrs(sched2, opt2, 4) == pytest.approx(expected)
    assert "optimizer" not in state and state["last_epoch"] == 3
