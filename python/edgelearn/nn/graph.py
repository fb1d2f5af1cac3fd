"""Module graphs: ``GraphModule`` (a DAG of modules, as ONNX import builds it) and the small graph ops a DAG
needs beyond PyTorch's layer set: ``Add``, ``Mul`` (two inputs or one input and a constant, numpy
broadcasting), ``Concat``, ``Reshape``, ``GlobalAvgPool`` (mean over H, W) , ``Clip``, ``Hardsigmoid`` and
``ZeroPad2d``.

What does not live here: reading or writing ONNX files (``edgelearn.onnx``), the layers every model uses
(``edgelearn.nn.layers``).
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from ..tensor import Tensor, as_tensor, make_result
from .module import Module, frozen_input, is_frozen_layer, run_subbatched

__all__ = [
    "Add",
    "Clip",
    "Concat",
    "GlobalAvgPool",
    "GraphModule",
    "Hardsigmoid",
    "Mul",
    "Reshape",
    "ZeroPad2d",
    "clip",
    "concat",
    "hard_sigmoid",
]


# --- functional forms ---------------------------------------------------------------------------------------


def clip(x: Any, lo: Optional[float], hi: Optional[float]) -> Tensor:
    """``min(max(x, lo), hi)`` (either bound may be ``None``); the gradient passes where x is inside the range.
    Backward keeps a one-byte mask, not the input."""
    x = as_tensor(x)
    xd = x.data
    y = np.clip(xd, lo, hi).astype(np.float32, copy=False)
    inside = np.ones(xd.shape, dtype=bool)
    if lo is not None:
        inside &= xd > lo
    if hi is not None:
        inside &= xd < hi
    return make_result(y, (x,), lambda g: (g * inside,), "clip")


def hard_sigmoid(x: Any, alpha: float = 1.0 / 6.0, beta: float = 0.5) -> Tensor:
    """``clip(alpha·x + beta, 0, 1)`` (ONNX HardSigmoid; PyTorch's ``hardsigmoid`` is alpha=1/6, beta=0.5)."""
    x = as_tensor(x)
    t = x.data * np.float32(alpha) + np.float32(beta)
    y = np.clip(t, 0.0, 1.0).astype(np.float32, copy=False)
    inside = (t > 0.0) & (t < 1.0)
    a = np.float32(alpha)
    return make_result(y, (x,), lambda g: (g * inside * a,), "hard_sigmoid")


def concat(tensors: Sequence[Any], axis: int = 1) -> Tensor:
    """Concatenation along ``axis``; backward splits the gradient back."""
    ts = [as_tensor(t) for t in tensors]
    if not ts:
        raise ValueError("concat: expected at least one tensor")
    nd = ts[0].ndim
    ax = axis % nd if nd else 0
    bounds = np.cumsum([t.shape[ax] for t in ts])[:-1]

    def backward(g: np.ndarray):
        return tuple(np.ascontiguousarray(p) for p in np.split(g, bounds, axis=ax))

    return make_result(np.concatenate([t.data for t in ts], axis=ax), tuple(ts), backward, "concat")


# --- modules ------------------------------------------------------------------------------------------------


class _WithConstant(Module):
    """A binary op whose second operand is either the next input or a fixed ``constant`` buffer."""

    samplewise_forward = True

    def __init__(self, constant: Optional[np.ndarray] = None):
        super().__init__()
        self.register_buffer("constant", None if constant is None else np.ascontiguousarray(constant, np.float32))

    def samplewise(self) -> bool:
        """A constant broadcast over the batch (a scalar, a leading size 1, a per-feature vector or a
        (C, H, W) block): each sample on its own. A constant that may span the batch (2-D or 4-D with a
        leading size above 1) might pair rows of different samples: not samplewise."""
        c = self.constant
        return c is None or c.ndim in (0, 1, 3) or c.shape[0] == 1

    def _operands(self, a: Any, b: Any) -> Tuple[Tensor, Any]:
        if b is None:
            if self.constant is None:
                raise ValueError(f"{type(self).__name__}: expected two inputs (no constant operand)")
            b = self.constant
        return as_tensor(a), b

    def extra_repr(self) -> str:
        return "" if self.constant is None else f"constant={tuple(self.constant.shape)}"


class Add(_WithConstant):
    """``a + b`` with numpy broadcasting (``b`` is the ``constant`` buffer when one was given)."""

    def forward(self, a: Any, b: Any = None) -> Tensor:
        a, b = self._operands(a, b)
        return a + b


class Mul(_WithConstant):
    """``a * b`` with numpy broadcasting (e.g. squeeze-excite: (N, C, H, W) times (N, C, 1, 1))."""

    def forward(self, a: Any, b: Any = None) -> Tensor:
        a, b = self._operands(a, b)
        return a * b


class Concat(Module):
    samplewise_forward = True

    def samplewise(self) -> bool:
        return self.axis >= 1  # along the batch (or from the end, of an unknown rank): not per sample

    def __init__(self, axis: int = 1):
        super().__init__()
        self.axis = int(axis)

    def forward(self, *xs: Any) -> Tensor:
        return concat(xs, self.axis)

    def extra_repr(self) -> str:
        return f"axis={self.axis}"


class Reshape(Module):
    """Reshape to a fixed ``shape`` with ONNX's conventions: 0 copies the input's size on that axis, -1 is
    inferred (at most one)."""

    samplewise_forward = True

    def samplewise(self) -> bool:
        return bool(self.shape) and self.shape[0] == 0  # keeps the batch axis as it is

    def __init__(self, shape: Sequence[int]):
        super().__init__()
        self.shape = tuple(int(s) for s in shape)
        if sum(1 for s in self.shape if s == -1) > 1 or any(s < -1 for s in self.shape):
            raise ValueError(f"shape: at most one -1 and no other negative size, got {self.shape}")

    def forward(self, x: Any) -> Tensor:
        x = as_tensor(x)
        target = tuple(x.shape[i] if s == 0 else s for i, s in enumerate(self.shape))
        return x.reshape(target)

    def extra_repr(self) -> str:
        return f"shape={self.shape}"


class GlobalAvgPool(Module):
    """Mean over H and W of (N, C, H, W): (N, C, 1, 1) with ``keepdims``, else (N, C)."""

    samplewise_forward = True

    def __init__(self, keepdims: bool = True):
        super().__init__()
        self.keepdims = bool(keepdims)

    def forward(self, x: Any) -> Tensor:
        from .. import functional as F

        x = as_tensor(x)
        y = F.adaptive_avg_pool2d(x, 1)
        return y if self.keepdims else y.reshape(y.shape[:2])

    def extra_repr(self) -> str:
        return f"keepdims={self.keepdims}"


class Clip(Module):
    """``clamp(x, min, max)`` (ONNX Clip); ReLU and ReLU6 are the special cases (0, inf) and (0, 6)."""

    samplewise_forward = True

    def __init__(self, min: Optional[float] = None, max: Optional[float] = None):  # noqa: A002 (PyTorch's names)
        super().__init__()
        self.min = None if min is None else float(min)
        self.max = None if max is None else float(max)

    def forward(self, x: Any) -> Tensor:
        return clip(x, self.min, self.max)

    def extra_repr(self) -> str:
        return f"min={self.min}, max={self.max}"


class Hardsigmoid(Module):
    """``clip(alpha·x + beta, 0, 1)``; the defaults are PyTorch's ``nn.Hardsigmoid`` (ONNX's are 0.2, 0.5)."""

    samplewise_forward = True

    def __init__(self, alpha: float = 1.0 / 6.0, beta: float = 0.5):
        super().__init__()
        self.alpha, self.beta = float(alpha), float(beta)

    def forward(self, x: Any) -> Tensor:
        return hard_sigmoid(x, self.alpha, self.beta)

    def extra_repr(self) -> str:
        return f"alpha={self.alpha:.6g}, beta={self.beta:.6g}"


class ZeroPad2d(Module):
    """Zero padding of (N, C, H, W) by ``(left, right, top, bottom)`` (PyTorch's order)."""

    samplewise_forward = True

    def __init__(self, padding: Sequence[int]):
        super().__init__()
        p = tuple(int(v) for v in padding)
        if len(p) != 4 or min(p) < 0:
            raise ValueError(f"padding: expected (left, right, top, bottom) >= 0, got {padding}")
        self.padding = p

    def forward(self, x: Any) -> Tensor:
        x = as_tensor(x)
        left, right, top, bottom = self.padding
        h, w = x.shape[2], x.shape[3]
        y = np.pad(x.data, ((0, 0), (0, 0), (top, bottom), (left, right)))
        return make_result(y, (x,), lambda g: (np.ascontiguousarray(g[:, :, top:top + h, left:left + w]),), "pad")

    def extra_repr(self) -> str:
        return f"{self.padding}"


class GraphModule(Module):
    """Modules wired as a directed acyclic graph of named values.

    ``nodes`` lists ``(module_name, input_names, output_name)`` in an order where every input is computed
    before it is read (a topological order); ``inputs`` names the values the caller passes, ``output`` the
    value returned. Each node's module is a child registered under ``module_name``, so parameters have the
    usual dotted names. A value is dropped right after its last reader runs, so a chain holds about one
    activation at a time, like ``Sequential``.

    The frozen nodes (each :func:`~edgelearn.nn.module.is_frozen_layer`, reading only the graph's inputs or
    other frozen nodes, with at least one layer among them: the frozen part of a ``--train last:K``
    fine-tuning) run first, on sub-batches of ``FROZEN_SUBBATCH`` samples, as ``run_chain`` runs a frozen
    prefix; the values the rest of the graph reads from them are gathered for the whole batch.
    """

    samplewise_forward = True

    def __init__(self, inputs: Sequence[str], output: str, nodes: Sequence[Tuple[str, Sequence[str], str]] = (),
                 modules: Optional[Dict[str, Module]] = None):
        super().__init__()
        self.inputs = [str(n) for n in inputs]
        self.output = str(output)
        self.nodes: List[List[Any]] = []
        for name, module in (modules or {}).items():
            self.add_module(name, module)
        for name, ins, out in nodes:
            self.add_node(name, ins, out)

    def add_node(self, module_name: str, inputs: Sequence[str], output: str, module: Optional[Module] = None) -> None:
        """Append a node reading ``inputs`` and writing ``output`` with the child ``module_name`` (registered
        here first when ``module`` is given)."""
        if module is not None:
            self.add_module(module_name, module)
        if module_name not in self._modules:
            raise ValueError(f"add_node: no child module named {module_name!r}")
        known = set(self.inputs) | {n[2] for n in self.nodes}
        missing = [i for i in inputs if i not in known]
        if missing:
            raise ValueError(f"add_node {module_name!r}: inputs {missing} are not computed before it")
        if output in known:
            raise ValueError(f"add_node {module_name!r}: value {output!r} is already written")
        self.nodes.append([module_name, [str(i) for i in inputs], str(output)])
        object.__setattr__(self, "_plan", None)

    def _last_use(self) -> List[List[str]]:
        plan = self.__dict__.get("_plan")
        if plan is not None:
            return plan
        last: Dict[str, int] = {}
        for i, (_, ins, _) in enumerate(self.nodes):
            for v in ins:
                last[v] = i
        plan = [[] for _ in self.nodes]
        for v, i in last.items():
            if v != self.output:
                plan[i].append(v)
        object.__setattr__(self, "_plan", plan)
        return plan

    def forward(self, *xs: Any) -> Any:
        if len(xs) != len(self.inputs):
            raise ValueError(f"GraphModule: expected {len(self.inputs)} input(s) ({', '.join(self.inputs)}), "
                             f"got {len(xs)}")
        env: Dict[str, Any] = dict(zip(self.inputs, xs))
        release = self._last_use()
        modules = self._modules
        frozen = self._frozen_nodes(xs)
        if frozen:
            self._run_frozen(env, frozen)
        for i, (name, ins, out) in enumerate(self.nodes):
            if i not in frozen:
                env[out] = modules[name](*[env[v] for v in ins])
            for v in release[i]:
                env.pop(v, None)
        return env[self.output]

    def _frozen_nodes(self, xs: Sequence[Any]) -> Dict[int, None]:
        """The nodes that may run on sub-batches (see the class docs), in order; empty when none may."""
        arrays = [a for a in (frozen_input(x) for x in xs) if a is not None]
        if len(arrays) != len(xs) or len({a.shape[0] for a in arrays}) != 1:
            return {}
        known, has_layer = set(self.inputs), False
        frozen: Dict[int, None] = {}
        for i, (name, ins, out) in enumerate(self.nodes):
            ok, params = is_frozen_layer(self._modules[name])
            if ins and ok and all(v in known for v in ins):
                known.add(out)
                frozen[i] = None
                has_layer = has_layer or params
        return frozen if has_layer else {}

    def _run_frozen(self, env: Dict[str, Any], frozen: Dict[int, None]) -> None:
        """Runs the ``frozen`` nodes sub-batch by sub-batch; puts the values other nodes (or the caller) read
        from them into ``env``, for the whole batch."""
        nodes, modules = self.nodes, self._modules
        made = {nodes[i][2] for i in frozen}
        wanted = [v for v in made if v == self.output or any(
            v in ins for j, (_, ins, _) in enumerate(nodes) if j not in frozen)]
        last: Dict[str, int] = {}
        for i in frozen:
            for v in nodes[i][1]:
                last[v] = i
        inputs = {v: (x.data if isinstance(x, Tensor) else x) for v, x in env.items()}

        def run(rows: slice) -> List[Any]:
            local: Dict[str, Any] = {v: Tensor(a[rows]) for v, a in inputs.items()}
            for i in frozen:
                name, ins, out = nodes[i]
                local[out] = modules[name](*[local[v] for v in ins])
                for v in ins:
                    if last[v] == i and v not in wanted:
                        local.pop(v, None)  # a sub-batch's intermediate: freed once its last reader ran
            return [local[v] for v in wanted]

        n = next(iter(inputs.values())).shape[0]
        env.update(zip(wanted, run_subbatched(n, run)))

    def extra_repr(self) -> str:
        return f"inputs={self.inputs}, output={self.output!r}, {len(self.nodes)} nodes"
