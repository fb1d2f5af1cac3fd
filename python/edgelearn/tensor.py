"""A small tape-based autograd: ``Tensor`` (numpy storage), the recording switch (``no_grad``) and basic ops.

Every differentiable op records one ``_Node`` holding a backward closure and links to its parents' nodes.
Nodes never hold their inputs' data: a closure keeps exactly what its backward needs (an INT8 layer keeps its
int8 input, not the FP32 one), so the memory an op saves is the memory its closure captures.

Semantics follow PyTorch where it has an answer:

- ``Tensor.grad`` is a ``Tensor`` (or ``None``), set on leaf tensors that require grad, and *accumulated* by
  successive ``backward()`` calls until reset (``optimizer.zero_grad()``).
- ``backward()`` frees the graph it ran through; calling it again on the same graph raises ``RuntimeError``.
- ``edgelearn.tensor(array)`` copies; floating input becomes float32 (the engine's type) unless ``dtype`` says
  otherwise; integer input (class labels) keeps its type.

Heavy ops (GEMM, convolution, normalisation, pooling) live in ``edgelearn.functional`` and call the Rust core
once per op; the ops here are numpy glue (elementwise, reshapes, reductions).
"""

from __future__ import annotations

import threading
from typing import Any, Callable, Iterable, Optional, Sequence, Tuple, Union

import numpy as np

from . import _native

__all__ = ["Tensor", "tensor", "as_tensor", "no_grad", "enable_grad", "is_grad_enabled"]

_state = threading.local()


def is_grad_enabled() -> bool:
    """Whether ops record themselves for backward (per thread; on unless inside ``no_grad()``)."""
    return getattr(_state, "enabled", True)


class _GradMode:
    _mode = True

    def __enter__(self) -> None:
        self._prev = is_grad_enabled()
        _state.enabled = self._mode

    def __exit__(self, *exc: Any) -> None:
        _state.enabled = self._prev

    def __call__(self, fn: Callable) -> Callable:
        mode = self._mode

        def wrapped(*args: Any, **kwargs: Any) -> Any:
            prev = is_grad_enabled()
            _state.enabled = mode
            try:
                return fn(*args, **kwargs)
            finally:
                _state.enabled = prev

        wrapped.__name__ = getattr(fn, "__name__", "wrapped")
        wrapped.__doc__ = getattr(fn, "__doc__", None)
        return wrapped


class no_grad(_GradMode):
    """Context manager (or decorator) inside which no op is recorded: outputs never require grad."""

    _mode = False


class enable_grad(_GradMode):
    """Context manager (or decorator) that turns recording back on inside a ``no_grad`` block."""

    _mode = True


class _Node:
    """One recorded op: ``backward(grad_out) -> tuple of parent grads (numpy or None)``.

    A leaf node (``leaf`` set) accumulates into ``leaf.grad`` instead.
    """

    __slots__ = ("backward", "parents", "leaf", "name", "owns_grads")

    def __init__(self, backward: Optional[Callable], parents: Tuple[Optional["_Node"], ...], leaf: Optional["Tensor"] = None, name: str = "", owns_grads: bool = False):
        self.backward = backward
        self.parents = parents
        self.leaf = leaf
        self.name = name
        # the ownership contract (see ``make_result``): backward(g, g_owned), fresh outputs
        self.owns_grads = owns_grads


ArrayLike = Union["Tensor", np.ndarray, float, int, Sequence]


class Tensor:
    """An n-d array with an optional gradient. Storage is a numpy array (``.numpy()`` returns it, no copy)."""

    # ``_owned``: the op that made this tensor says its storage is this tensor's alone (fresh, not kept by any
    # backward); ``_donated``: ``Sequential`` hands such an intermediate, which only it holds, to the next
    # layer, which may then overwrite the storage instead of allocating a new activation. ``_range``: the
    # ``_native.ActivationRange`` of ``data`` that the op which wrote it returned (or None), passed to the INT8
    # layer that quantizes it next so it skips its statistics pass; an op that overwrites ``data`` clears it.
    __slots__ = ("data", "requires_grad", "grad", "_node", "_owned", "_donated", "_range", "__weakref__")
    __array_priority__ = 1000.0  # so ndarray <op> Tensor defers to Tensor's reflected op

    def __init__(self, data: Any, requires_grad: bool = False):
        if isinstance(data, Tensor):
            data = data.data
        self.data = data if isinstance(data, np.ndarray) else np.asarray(data)
        if requires_grad and not np.issubdtype(self.data.dtype, np.floating):
            raise ValueError(f"requires_grad: only floating tensors can require gradients, got dtype {self.data.dtype}")
        self.requires_grad = bool(requires_grad)
        self.grad: Optional[Tensor] = None
        self._node: Optional[_Node] = None
        self._owned = False
        self._donated = False
        self._range: Any = None

    # --- plain properties ---------------------------------------------------------------------------------
    @property
    def shape(self) -> Tuple[int, ...]:
        return self.data.shape

    @property
    def dtype(self) -> np.dtype:
        return self.data.dtype

    @property
    def ndim(self) -> int:
        return self.data.ndim

    @property
    def is_leaf(self) -> bool:
        return self._node is None or self._node.leaf is self

    def size(self, dim: Optional[int] = None) -> Union[int, Tuple[int, ...]]:
        return self.data.shape if dim is None else self.data.shape[dim]

    def numel(self) -> int:
        return int(self.data.size)

    def numpy(self) -> np.ndarray:
        """The storage array itself (no copy), like ``torch.Tensor.numpy()``."""
        return self.data

    def item(self) -> Any:
        return self.data.item()

    def tolist(self) -> Any:
        return self.data.tolist()

    def detach(self) -> "Tensor":
        """The same storage, cut from the graph."""
        return Tensor(self.data)

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        return self.data if dtype is None else self.data.astype(dtype)

    def __len__(self) -> int:
        return len(self.data)

    def __repr__(self) -> str:
        extra = ", requires_grad=True" if self.requires_grad else ""
        body = np.array2string(self.data, separator=", ", prefix="tensor(")
        return f"tensor({body}{extra})"

    def argmax(self, axis: Optional[int] = None) -> "Tensor":
        return Tensor(np.argmax(self.data, axis=axis))

    def zero_(self) -> "Tensor":
        self.data[...] = 0
        return self

    def requires_grad_(self, mode: bool = True) -> "Tensor":
        if self._node is not None and self._node.leaf is not self:
            raise RuntimeError("requires_grad_: only leaf tensors can change requires_grad")
        self.requires_grad = bool(mode)
        self._node = None
        return self

    # --- graph ------------------------------------------------------------------------------------------
    def _graph_node(self) -> Optional[_Node]:
        """This tensor's node in the graph (a leaf gets an accumulating node on first use)."""
        if not self.requires_grad:
            return None
        if self._node is None:
            self._node = _Node(None, (), leaf=self, name="leaf")
        return self._node

    def backward(self, gradient: Optional[ArrayLike] = None) -> None:
        """Reverse-mode sweep from this tensor; leaf ``.grad`` values accumulate. Frees the graph."""
        if not self.requires_grad:
            raise RuntimeError("backward: tensor does not require grad and has no graph")
        if gradient is None:
            if self.data.size != 1:
                raise RuntimeError(f"backward: gradient can be implicit only for a scalar, got shape {self.shape}")
            g = np.ones_like(self.data)
        else:
            g = np.asarray(gradient.data if isinstance(gradient, Tensor) else gradient, dtype=self.data.dtype)
            if g.shape != self.data.shape:
                raise ValueError(f"backward: gradient has shape {g.shape}, expected {self.data.shape}")
        root = self._graph_node()
        assert root is not None
        order = _topological_order(root)
        grads = {id(root): g}
        owned = set()  # ids of nodes whose pending gradient is the sweep's alone (may be overwritten)
        # A gradient an op computes on another thread (``_native.DeferredGrad``: the INT8 layers' dW) is
        # taken when something needs its value: a leaf's after the sweep, so that the thread computes it
        # while the sweep goes on through the earlier layers. Every one is taken before backward returns.
        deferred = []
        for node in order:  # outputs before inputs (``order`` keeps every node alive: ids stay unique)
            key = id(node)
            g = grads.pop(key, None)
            if node.leaf is not None:
                if type(g) is _Deferred:
                    deferred.append((node.leaf, g))
                elif g is not None:
                    # a gradient the sweep owns becomes the leaf's .grad as it is (no copy)
                    _accumulate_leaf(node.leaf, g, fresh=key in owned)
                continue
            g_owned = key in owned
            if type(g) is _Deferred:
                g, g_owned = g.wait(), True  # a fresh array
            if node.backward is None:
                raise RuntimeError(
                    "backward: the graph was already freed by an earlier backward() (or built under no_grad)"
                )
            if g is None:
                parent_grads = (None,) * len(node.parents)
            elif node.owns_grads:
                parent_grads = node.backward(g, g_owned)
            else:
                parent_grads = node.backward(g)
            pg_ids = [id(q) for q in parent_grads] if node.owns_grads else None
            for parent, pg in zip(node.parents, parent_grads):
                if parent is None or pg is None:
                    continue
                pkey = id(parent)
                prev = grads.get(pkey)
                # Exclusively the sweep's: the node promises fresh arrays (the incoming g only if that was
                # owned), and no other parent got the same array.
                fresh = (pg_ids is not None and type(pg) is np.ndarray and (pg is not g or g_owned)
                         and pg_ids.count(id(pg)) == 1)
                if prev is None:
                    grads[pkey] = pg
                    if fresh:
                        owned.add(pkey)
                    continue
                if type(prev) is _Deferred or type(pg) is _Deferred:
                    if type(prev) is _Deferred:
                        prev = grads[pkey] = prev.wait()  # fresh: the sweep's own
                        owned.add(pkey)
                    if type(pg) is _Deferred:
                        pg = pg.wait()
                if pkey in owned and prev.shape == pg.shape and prev.flags.writeable:
                    _add_into(prev, pg)  # accumulate into a buffer the sweep owns
                elif fresh and pg.shape == prev.shape and pg.flags.writeable:
                    grads[pkey] = _add_into(pg, prev)  # into the op's fresh gradient (the same sum)
                    owned.add(pkey)
                else:
                    grads[pkey] = prev + pg
                    owned.add(pkey)  # a fresh sum
            node.backward = None  # free saved activations as soon as they are used
            node.parents = ()
            parent_grads = pg = g = prev = pg_ids = None
        for leaf, pending in deferred:
            _accumulate_leaf(leaf, pending.wait(), fresh=True)


_Deferred = _native.DeferredGrad

#: Below this many values a gradient sum stays with numpy (a core call costs a few microseconds).
_CORE_ADD_MIN = 1 << 15


def _add_into(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``a += b`` (IEEE additions: the bits of ``a + b`` either way round), returns ``a``. Large float32
    arrays go to the core's add, which spreads over the threads; numpy's is single-threaded."""
    if (a.size >= _CORE_ADD_MIN and a.dtype == np.float32 and b.dtype == np.float32 and a.flags.c_contiguous
            and b.flags.c_contiguous and not np.may_share_memory(a, b)):
        _native.residual_add_(a, b)
    else:
        np.add(a, b, out=a)
    return a


def _accumulate_leaf(t: Tensor, g: np.ndarray, fresh: bool = False) -> None:
    """Adds ``g`` to ``t.grad`` (a copy of it when there is none, or ``g`` itself when ``fresh``: a writable
    array nothing else holds)."""
    if g.shape != t.data.shape:
        raise RuntimeError(f"internal: gradient shape {g.shape} does not match leaf shape {t.data.shape}")
    if t.grad is None:
        own = fresh and type(g) is np.ndarray and g.dtype == t.data.dtype and g.flags.writeable
        t.grad = Tensor(g if own else np.array(g, dtype=t.data.dtype, copy=True))
    else:
        t.grad.data += g


def _topological_order(root: _Node) -> list:
    """Nodes reachable from ``root``, each after every node that consumes it (iterative DFS)."""
    seen = set()
    post: list = []
    stack = [(root, False)]
    pop, push, visit, finish = stack.pop, stack.append, seen.add, post.append
    while stack:
        node, expanded = pop()
        if expanded:
            finish(node)
            continue
        key = id(node)
        if key in seen:
            continue
        visit(key)
        push((node, True))
        for p in node.parents:
            if p is not None and id(p) not in seen:
                push((p, False))
    post.reverse()
    return post


def make_result(data: np.ndarray, parents: Sequence[Optional[Tensor]], backward: Callable, name: str = "", *,
                owned: bool = False, owns_grads: bool = False) -> Tensor:
    """Wrap an op's output; record ``backward`` when recording is on and some parent requires grad.

    ``backward(grad_out)`` returns one numpy gradient (or ``None``) per parent, in the parent's shape.

    The buffer-ownership contract (said by the op, never inferred from reference counts):

    - ``owned=True``: ``data`` is a fresh array that only the result holds (``backward`` does not keep it), so
      ``Sequential`` may donate the result to the next layer, which may then overwrite it (see
      ``functional._take_donated``).
    - ``owns_grads=True``: ``backward`` is called as ``backward(grad_out, grad_owned)``; ``grad_owned`` says
      the sweep holds the only reference to ``grad_out`` (the op may overwrite it and return it), and every
      array it returns is fresh, or ``grad_out`` itself.
    """
    out = Tensor(data)
    out._owned = owned
    if getattr(_state, "enabled", True):  # is_grad_enabled(), inlined: this runs for every op
        nodes = tuple([p._graph_node() if p is not None and p.requires_grad else None for p in parents])
        if nodes.count(None) != len(nodes):
            out.requires_grad = True
            out._node = _Node(backward, nodes, name=name, owns_grads=owns_grads)
    return out


def as_tensor(x: ArrayLike, dtype: Any = None) -> Tensor:
    """``x`` if it is already a Tensor, else a Tensor over ``np.asarray(x)`` (no copy when possible)."""
    if isinstance(x, Tensor):
        return x
    arr = np.asarray(x, dtype=dtype)
    if dtype is None and arr.dtype == np.float64:
        arr = arr.astype(np.float32)
    return Tensor(arr)


def tensor(data: ArrayLike, requires_grad: bool = False, dtype: Any = None) -> Tensor:
    """A new Tensor holding a copy of ``data``; floating data becomes float32 unless ``dtype`` is given."""
    if isinstance(data, Tensor):
        data = data.data
    arr = np.array(data, dtype=dtype, copy=True)
    if dtype is None and arr.dtype.kind == "f" and arr.dtype != np.float32:  # np.floating, without issubdtype
        arr = arr.astype(np.float32)
    return Tensor(np.ascontiguousarray(arr), requires_grad=requires_grad)


# --- elementwise and shape ops (numpy glue) ----------------------------------------------------------------


def _unbroadcast(g: np.ndarray, shape: Tuple[int, ...]) -> np.ndarray:
    """Sum ``g`` down to ``shape`` (undo numpy broadcasting)."""
    if g.shape == shape:
        return g
    lead = g.ndim - len(shape)
    if lead > 0:
        g = g.sum(axis=tuple(range(lead)))
    axes = tuple(i for i, n in enumerate(shape) if n == 1 and g.shape[i] != 1)
    if axes:
        g = g.sum(axis=axes, keepdims=True)
    return g.reshape(shape)


def _operand(x: ArrayLike, like: Tensor) -> Tensor:
    if isinstance(x, Tensor):
        return x
    return Tensor(np.asarray(x, dtype=like.data.dtype))


def _add(a: Tensor, b: Tensor) -> Tensor:
    sa, sb = a.shape, b.shape
    return make_result(a.data + b.data, (a, b), lambda g: (_unbroadcast(g, sa), _unbroadcast(g, sb)), "add")


def _sub(a: Tensor, b: Tensor) -> Tensor:
    sa, sb = a.shape, b.shape
    return make_result(a.data - b.data, (a, b), lambda g: (_unbroadcast(g, sa), _unbroadcast(-g, sb)), "sub")


def _mul(a: Tensor, b: Tensor) -> Tensor:
    ad, bd = a.data, b.data
    na, nb = a.requires_grad, b.requires_grad

    def backward(g: np.ndarray):
        return (
            _unbroadcast(g * bd, ad.shape) if na else None,
            _unbroadcast(g * ad, bd.shape) if nb else None,
        )

    return make_result(ad * bd, (a, b), backward, "mul")


def _div(a: Tensor, b: Tensor) -> Tensor:
    ad, bd = a.data, b.data
    na, nb = a.requires_grad, b.requires_grad

    def backward(g: np.ndarray):
        return (
            _unbroadcast(g / bd, ad.shape) if na else None,
            _unbroadcast(-g * ad / (bd * bd), bd.shape) if nb else None,
        )

    return make_result(ad / bd, (a, b), backward, "div")


def _matmul(a: Tensor, b: Tensor) -> Tensor:
    """2-D ``a @ b`` on the core's FP32 GEMM; backward ``dA = dY·Bᵀ``, ``dB = Aᵀ·dY`` on the same GEMM."""
    if a.ndim != 2 or b.ndim != 2:
        raise ValueError(f"matmul: expected two 2-D tensors, got shapes {a.shape} and {b.shape}")
    if a.shape[1] != b.shape[0]:
        raise ValueError(f"matmul: inner dimensions differ: {a.shape} @ {b.shape}")
    ad, bd = _f32(a.data), _f32(b.data)
    na, nb = a.requires_grad, b.requires_grad

    def backward(g: np.ndarray):
        return (
            _native.matmul_f32(g, bd.T) if na else None,
            _native.matmul_f32(ad.T, g) if nb else None,
        )

    return make_result(_native.matmul_f32(ad, bd), (a, b), backward, "matmul")


def _f32(x: np.ndarray) -> np.ndarray:
    return x if x.dtype == np.float32 else x.astype(np.float32)


class _Ops:
    """Operator and method implementations attached to Tensor below (kept together for reading)."""

    @staticmethod
    def add(self: Tensor, other: ArrayLike) -> Tensor:
        return _add(self, _operand(other, self))

    @staticmethod
    def radd(self: Tensor, other: ArrayLike) -> Tensor:
        return _add(_operand(other, self), self)

    @staticmethod
    def sub(self: Tensor, other: ArrayLike) -> Tensor:
        return _sub(self, _operand(other, self))

    @staticmethod
    def rsub(self: Tensor, other: ArrayLike) -> Tensor:
        return _sub(_operand(other, self), self)

    @staticmethod
    def mul(self: Tensor, other: ArrayLike) -> Tensor:
        return _mul(self, _operand(other, self))

    @staticmethod
    def rmul(self: Tensor, other: ArrayLike) -> Tensor:
        return _mul(_operand(other, self), self)

    @staticmethod
    def truediv(self: Tensor, other: ArrayLike) -> Tensor:
        return _div(self, _operand(other, self))

    @staticmethod
    def rtruediv(self: Tensor, other: ArrayLike) -> Tensor:
        return _div(_operand(other, self), self)

    @staticmethod
    def neg(self: Tensor) -> Tensor:
        return make_result(-self.data, (self,), lambda g: (-g,), "neg")

    @staticmethod
    def pow(self: Tensor, exponent: float) -> Tensor:
        if isinstance(exponent, Tensor):
            raise TypeError("pow: only a constant exponent is supported")
        x = self.data
        e = float(exponent)
        return make_result(x**e, (self,), lambda g: (g * e * x ** (e - 1.0),), "pow")

    @staticmethod
    def matmul(self: Tensor, other: ArrayLike) -> Tensor:
        return _matmul(self, _operand(other, self))

    @staticmethod
    def rmatmul(self: Tensor, other: ArrayLike) -> Tensor:
        return _matmul(_operand(other, self), self)

    @staticmethod
    def exp(self: Tensor) -> Tensor:
        y = np.exp(self.data)
        return make_result(y, (self,), lambda g: (g * y,), "exp")

    @staticmethod
    def log(self: Tensor) -> Tensor:
        x = self.data
        return make_result(np.log(x), (self,), lambda g: (g / x,), "log")

    @staticmethod
    def reshape(self: Tensor, *shape: Any) -> Tensor:
        if len(shape) == 1 and isinstance(shape[0], (tuple, list)):
            shape = tuple(shape[0])
        src = self.shape
        out = make_result(self.data.reshape(shape), (self,), lambda g: (g.reshape(src),), "reshape")
        if self._range is not None and self.data.flags.c_contiguous:
            out._range = self._range  # a view of the same values (same address and length)
        return out

    @staticmethod
    def flatten(self: Tensor, start_dim: int = 0, end_dim: int = -1) -> Tensor:
        nd = max(self.ndim, 1)
        s, e = start_dim % nd, end_dim % nd
        if s > e:
            raise ValueError(f"flatten: start_dim {start_dim} comes after end_dim {end_dim}")
        shape = self.shape[:s] + (-1,) + self.shape[e + 1 :]
        if self.data.size == 0:
            shape = self.shape[:s] + (int(np.prod(self.shape[s : e + 1])),) + self.shape[e + 1 :]
        return _Ops.reshape(self, shape)

    @staticmethod
    def transpose(self: Tensor, *axes: Any) -> Tensor:
        if len(axes) == 1 and isinstance(axes[0], (tuple, list)):
            axes = tuple(axes[0])
        if not axes:
            axes = tuple(reversed(range(self.ndim)))
        inv = tuple(np.argsort(axes))
        return make_result(self.data.transpose(axes), (self,), lambda g: (g.transpose(inv),), "transpose")

    @staticmethod
    def sum(self: Tensor, axis: Any = None, keepdims: bool = False) -> Tensor:
        src = self.shape
        dtype = self.data.dtype

        def backward(g: np.ndarray):
            if not keepdims and axis is not None:
                g = np.expand_dims(g, axis)
            elif not keepdims:
                g = g.reshape((1,) * len(src))
            return (np.broadcast_to(g, src).astype(dtype, copy=True),)

        return make_result(np.asarray(self.data.sum(axis=axis, keepdims=keepdims)), (self,), backward, "sum")

    @staticmethod
    def mean(self: Tensor, axis: Any = None, keepdims: bool = False) -> Tensor:
        n = self.data.size if axis is None else int(np.prod([self.shape[a] for a in np.atleast_1d(axis)]))
        return _Ops.sum(self, axis=axis, keepdims=keepdims) * (1.0 / max(n, 1))

    @staticmethod
    def getitem(self: Tensor, index: Any) -> Tensor:
        if isinstance(index, Tensor):
            index = index.data
        src, dtype = self.shape, self.data.dtype

        def backward(g: np.ndarray):
            full = np.zeros(src, dtype=dtype)
            np.add.at(full, index, g)  # handles repeated fancy indices
            return (full,)

        return make_result(np.asarray(self.data[index]), (self,), backward, "getitem")


Tensor.__add__ = _Ops.add  # type: ignore[attr-defined]
Tensor.__radd__ = _Ops.radd  # type: ignore[attr-defined]
Tensor.__sub__ = _Ops.sub  # type: ignore[attr-defined]
Tensor.__rsub__ = _Ops.rsub  # type: ignore[attr-defined]
Tensor.__mul__ = _Ops.mul  # type: ignore[attr-defined]
Tensor.__rmul__ = _Ops.rmul  # type: ignore[attr-defined]
Tensor.__truediv__ = _Ops.truediv  # type: ignore[attr-defined]
Tensor.__rtruediv__ = _Ops.rtruediv  # type: ignore[attr-defined]
Tensor.__neg__ = _Ops.neg  # type: ignore[attr-defined]
Tensor.__pow__ = _Ops.pow  # type: ignore[attr-defined]
Tensor.__matmul__ = _Ops.matmul  # type: ignore[attr-defined]
Tensor.__rmatmul__ = _Ops.rmatmul  # type: ignore[attr-defined]
Tensor.__getitem__ = _Ops.getitem  # type: ignore[attr-defined]
Tensor.matmul = _Ops.matmul  # type: ignore[attr-defined]
Tensor.exp = _Ops.exp  # type: ignore[attr-defined]
Tensor.log = _Ops.log  # type: ignore[attr-defined]
Tensor.reshape = _Ops.reshape  # type: ignore[attr-defined]
Tensor.view = _Ops.reshape  # type: ignore[attr-defined]
Tensor.flatten = _Ops.flatten  # type: ignore[attr-defined]
Tensor.transpose = _Ops.transpose  # type: ignore[attr-defined]
Tensor.T = property(lambda self: _Ops.transpose(self))  # type: ignore[attr-defined]
Tensor.sum = _Ops.sum  # type: ignore[attr-defined]
Tensor.mean = _Ops.mean  # type: ignore[attr-defined]
