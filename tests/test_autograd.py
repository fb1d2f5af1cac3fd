"""The tape autograd: Tensor basics, op gradients against float64 finite differences, graph handling,
``no_grad``, losses."""

import gc
import weakref

import numpy as np
import pytest

import edgelearn as el
from edgelearn import _native
from edgelearn import functional as F


def needs_native(*names):
    missing = [n for n in names if not hasattr(_native, n)]
    return pytest.mark.skipif(bool(missing), reason=f"native ops not built yet: {missing}")


def numeric_grad(fn, x, eps=1e-6):
    """Central differences of the float64 scalar ``fn(x)`` with respect to every element of ``x``."""
    x = np.array(x, dtype=np.float64)
    g = np.zeros_like(x)
    for i in np.ndindex(x.shape):
        old = x[i]
        x[i] = old + eps
        hi = fn(x)
        x[i] = old - eps
        lo = fn(x)
        x[i] = old
        g[i] = (hi - lo) / (2 * eps)
    return g


def check_unary(op, x, rng, rtol=1e-6, atol=1e-8):
    """Backward of ``op`` (a Tensor -> Tensor function) equals finite differences of sum(op(x)·R) in float64."""
    t = el.Tensor(np.array(x, np.float64), requires_grad=True)
    y = op(t)
    r = rng.standard_normal(y.shape)
    (y * r).sum().backward()
    num = numeric_grad(lambda v: float((op(el.Tensor(v)).numpy() * r).sum()), x)
    np.testing.assert_allclose(t.grad.numpy(), num, rtol=rtol, atol=atol)


# --- Tensor basics -------------------------------------------------------------------------------------------


def test_tensor_copies_and_makes_floats_float32():
    a = np.arange(6, dtype=np.float64).reshape(2, 3)
    t = el.tensor(a, requires_grad=True)
    assert t.dtype == np.float32 and t.shape == (2, 3) and t.requires_grad and t.grad is None
    a[0, 0] = 100
    assert t.numpy()[0, 0] == 0
    assert el.tensor([1, 2, 3]).dtype.kind == "i"
    assert el.tensor(a, dtype=np.float64).dtype == np.float64


def test_numpy_returns_storage_without_copy():
    t = el.tensor(np.ones(3))
    t.numpy()[1] = 5
    assert t.numpy()[1] == 5


def test_integer_tensor_cannot_require_grad():
    with pytest.raises(ValueError, match="requires_grad"):
        el.Tensor(np.arange(3), requires_grad=True)


def test_item_and_detach():
    t = el.tensor(3.5, requires_grad=True)
    assert (t * 2).item() == 7.0
    assert not (t * 2).detach().requires_grad


# --- op gradients vs finite differences ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, op",
    [
        ("add_broadcast", lambda t: t + el.Tensor(np.linspace(-1, 1, 4))),
        ("radd_scalar", lambda t: 2.0 + t),
        ("sub", lambda t: t - t * t),
        ("rsub", lambda t: 1.0 - t),
        ("mul_self", lambda t: t * t),
        ("div", lambda t: t / (t * t + 2.0)),
        ("rdiv", lambda t: 1.0 / (t * t + 1.0)),
        ("neg", lambda t: -t),
        ("pow", lambda t: (t * t + 1.0) ** 1.5),
        ("exp", lambda t: t.exp()),
        ("log", lambda t: (t * t + 1.0).log()),
        ("reshape", lambda t: t.reshape(4, 3) * el.Tensor(np.arange(12.0).reshape(4, 3))),
        ("view_flatten", lambda t: t.view(2, 6).flatten() * el.Tensor(np.arange(12.0))),
        ("transpose", lambda t: t.T * el.Tensor(np.arange(12.0).reshape(4, 3))),
        ("sum_axis", lambda t: t.sum(axis=1) * el.Tensor(np.arange(3.0))),
        ("sum_keepdims", lambda t: t * t.sum(axis=0, keepdims=True)),
        ("mean", lambda t: t.mean(axis=0) * t.mean()),
        ("getitem_slice", lambda t: t[1:, ::2]),
        ("getitem_fancy_repeated", lambda t: t[np.array([0, 2, 0]), 1]),
    ],
)
def test_op_gradient_matches_finite_differences(name, op, rng):
    check_unary(op, rng.standard_normal((3, 4)), rng)


def test_broadcast_operand_gets_summed_gradient(rng):
    a = el.Tensor(rng.standard_normal((3, 4)), requires_grad=True)
    b = el.Tensor(rng.standard_normal((1, 4)), requires_grad=True)
    (a * b).sum().backward()
    np.testing.assert_allclose(b.grad.numpy(), a.numpy().sum(axis=0, keepdims=True))
    np.testing.assert_allclose(a.grad.numpy(), np.broadcast_to(b.numpy(), (3, 4)))


@needs_native("matmul_f32")
def test_matmul_gradient_matches_finite_differences(rng):
    a0 = rng.standard_normal((3, 5)).astype(np.float32)
    b0 = rng.standard_normal((5, 2)).astype(np.float32)
    r = rng.standard_normal((3, 2))
    a, b = el.tensor(a0, requires_grad=True), el.tensor(b0, requires_grad=True)
    y = a @ b
    np.testing.assert_allclose(y.numpy(), a0 @ b0, rtol=1e-5, atol=1e-5)
    (y * r.astype(np.float32)).sum().backward()
    ga = numeric_grad(lambda v: float(((v @ b0.astype(np.float64)) * r).sum()), a0)
    gb = numeric_grad(lambda v: float(((a0.astype(np.float64) @ v) * r).sum()), b0)
    np.testing.assert_allclose(a.grad.numpy(), ga, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(b.grad.numpy(), gb, rtol=1e-4, atol=1e-4)


# --- graph handling -----------------------------------------------------------------------------------------


def test_diamond_graph_sums_both_paths():
    x = el.tensor(3.0, requires_grad=True)
    a = x * 2.0
    b = x * x
    (a * b + a).backward()  # d/dx (2x·x² + 2x) = 6x² + 2
    assert x.grad.item() == pytest.approx(6 * 9 + 2)


def test_grads_accumulate_across_backward_calls():
    x = el.tensor([1.0, 2.0], requires_grad=True)
    (x * 3.0).sum().backward()
    (x * x).sum().backward()
    np.testing.assert_allclose(x.grad.numpy(), [3 + 2, 3 + 4])


def test_grad_is_a_tensor_of_the_leaf_shape_and_dtype():
    x = el.tensor(np.ones((2, 3)), requires_grad=True)
    (x * 2.0).sum().backward()
    assert isinstance(x.grad, el.Tensor) and x.grad.shape == (2, 3) and x.grad.dtype == np.float32


def test_only_leaves_get_grad():
    x = el.tensor([1.0], requires_grad=True)
    h = x * 2.0
    (h * h).sum().backward()
    assert h.grad is None and x.grad is not None and not h.is_leaf and x.is_leaf


def test_backward_twice_on_a_freed_graph_raises():
    x = el.tensor([1.0, 2.0], requires_grad=True)
    y = (x * x).sum()
    y.backward()
    with pytest.raises(RuntimeError, match="freed"):
        y.backward()


def test_backward_of_non_scalar_needs_a_gradient():
    x = el.tensor([1.0, 2.0], requires_grad=True)
    y = x * 2.0
    with pytest.raises(RuntimeError, match="scalar"):
        y.backward()
    y.backward(np.array([1.0, 10.0]))
    np.testing.assert_allclose(x.grad.numpy(), [2.0, 20.0])


def test_backward_without_grad_raises():
    with pytest.raises(RuntimeError, match="does not require grad"):
        el.tensor([1.0]).sum().backward()


def test_deep_chain_does_not_hit_the_recursion_limit():
    x = el.tensor(1.0, requires_grad=True)
    y = x
    for _ in range(5000):
        y = y + 1.0
    y.backward()
    assert x.grad.item() == 1.0


def test_backward_frees_saved_arrays():
    x = el.tensor(np.ones(1000), requires_grad=True)
    h = x * 3.0
    y = h * h  # saves h's storage twice
    ref = weakref.ref(h.numpy())
    del h
    gc.collect()
    assert ref() is not None
    y.sum().backward()
    gc.collect()
    assert ref() is None


# --- recording switch ---------------------------------------------------------------------------------------


def test_no_grad_records_nothing():
    x = el.tensor([1.0, 2.0], requires_grad=True)
    with el.no_grad():
        y = x * 2.0 + 1.0
        assert not el.is_grad_enabled()
        with el.enable_grad():
            z = x * 2.0
    assert el.is_grad_enabled()
    assert not y.requires_grad and z.requires_grad


def test_no_grad_as_decorator_restores_mode_after_errors():
    @el.no_grad()
    def f(t):
        assert not el.is_grad_enabled()
        raise KeyError("boom")

    with pytest.raises(KeyError):
        f(el.tensor([1.0]))
    assert el.is_grad_enabled()


# --- losses -------------------------------------------------------------------------------------------------


def reference_cross_entropy(z, t, eps):
    z = z - z.max(axis=1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    n, c = z.shape
    q = np.full((n, c), eps / c)
    q[np.arange(n), t] += 1 - eps
    return float(-(q * logp).sum() / n)


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_cross_entropy_value_and_gradient(smoothing, rng):
    z = rng.standard_normal((5, 4)) * 3
    t = rng.integers(0, 4, 5)
    logits = el.tensor(z, requires_grad=True)
    loss = F.cross_entropy(logits, t, label_smoothing=smoothing)
    assert loss.item() == pytest.approx(reference_cross_entropy(z, t, smoothing), rel=1e-5)
    loss.backward()
    num = numeric_grad(lambda v: reference_cross_entropy(v, t, smoothing), z)
    np.testing.assert_allclose(logits.grad.numpy(), num, rtol=1e-3, atol=1e-5)


def test_cross_entropy_is_stable_for_huge_logits():
    loss = F.cross_entropy(el.tensor([[1e4, 0.0, -1e4]]), np.array([0]))
    assert np.isfinite(loss.item()) and loss.item() == pytest.approx(0.0, abs=1e-6)


def test_cross_entropy_rejects_bad_targets():
    with pytest.raises(ValueError, match="target"):
        F.cross_entropy(el.tensor(np.zeros((2, 3))), np.array([0, 3]))
    with pytest.raises(ValueError, match="target"):
        F.cross_entropy(el.tensor(np.zeros((2, 3))), np.array([0.0, 1.0]))


def test_mse_value_and_gradient(rng):
    p0, t0 = rng.standard_normal((3, 2)), rng.standard_normal((3, 2))
    p = el.Tensor(p0.copy(), requires_grad=True)
    loss = F.mse(p, t0)
    assert loss.item() == pytest.approx(((p0 - t0) ** 2).mean())
    loss.backward()
    np.testing.assert_allclose(p.grad.numpy(), 2 * (p0 - t0) / p0.size)
    assert F.mse(el.Tensor(p0), t0, reduction="sum").item() == pytest.approx(((p0 - t0) ** 2).sum())


def test_a_leaf_takes_a_gradient_the_sweep_owns_without_a_copy():
    """An op under the ownership contract (``owns_grads``) returns fresh arrays: the leaf's ``.grad`` is that
    array itself. An op without the contract (its gradient may be shared) gets a copy, so accumulating into
    ``.grad`` later never writes into an array someone else holds."""
    from edgelearn.tensor import make_result

    w = el.tensor(np.ones(3, np.float32), requires_grad=True)
    returned = []

    def fresh_backward(g, _owned=False):
        returned.append(np.full(3, 2.0, np.float32))
        return (returned[-1],)

    make_result(np.zeros(3, np.float32), (w,), fresh_backward, "fresh", owns_grads=True).backward(
        np.ones(3, np.float32))
    assert w.grad.numpy() is returned[0]
    shared = np.full(3, 5.0, np.float32)
    v = el.tensor(np.ones(3, np.float32), requires_grad=True)
    make_result(np.zeros(3, np.float32), (v,), lambda g: (shared,), "shared").backward(np.ones(3, np.float32))
    assert v.grad.numpy() is not shared
    v.grad.numpy()[...] += 1
    np.testing.assert_array_equal(shared, 5.0)


def test_a_gradient_passed_through_twice_is_copied_for_the_leaf():
    """The same array handed to two parents (``a + b`` passes ``g`` to both) is not the sweep's alone: each
    leaf gets its own ``.grad``."""
    a = el.tensor(np.ones(3, np.float32), requires_grad=True)
    b = el.tensor(np.ones(3, np.float32), requires_grad=True)
    (a + b).backward(np.ones(3, np.float32))
    assert a.grad.numpy() is not b.grad.numpy()
    a.grad.numpy()[...] = 7
    np.testing.assert_array_equal(b.grad.numpy(), 1.0)



def test_large_gradient_sums_equal_numpy_sums_bit_for_bit(monkeypatch):
    """A tensor read by several ops gets the sum of their gradients; large float32 sums go to the core's
    (threaded) add, into the sweep's buffer or into an op's fresh gradient. Values on a grid of 1/4 make every
    partial sum exact, so any order gives numpy's bits."""
    rng = np.random.default_rng(3)
    shape = (4, 8, 32, 32)  # 32768 values: the core's add
    x = el.tensor(rng.integers(-8, 9, shape).astype(np.float32) / 4, requires_grad=True)
    w = [rng.integers(-8, 9, shape).astype(np.float32) / 4 for _ in range(3)]
    adds = []
    real = _native.residual_add_
    monkeypatch.setattr(_native, "residual_add_", lambda a, b: adds.append(1) or real(a, b))
    # x feeds three products and a ReLU (whose backward hands a fresh array)
    # (ReLU with a saved mask hands back a fresh array it says is the sweep's; arriving after the product's
    # gradient, which is not, the sum goes into the fresh one)
    loss = x * el.tensor(w[0]) + F.relu(x, save_mask=True)
    for t in [x * el.tensor(w[1]), x * el.tensor(w[2]), F.relu(x)]:
        loss = loss + t
    loss.sum().backward()
    want = w[0] + w[1] + w[2] + 2 * (x.data > 0).astype(np.float32)
    assert adds  # the core's add took part
    np.testing.assert_array_equal(x.grad.data.view(np.uint32), want.view(np.uint32))
