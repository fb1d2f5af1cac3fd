"""``Module`` (parameters, buffers, children, train/eval, state dicts), ``Parameter`` and ``Sequential``.

Semantics follow PyTorch: attribute assignment registers parameters and submodules; names are dotted paths
(``"0.weight"``, ``"features.3.running_mean"``). ``state_dict()`` maps names to numpy arrays (copies) and holds
parameters and buffers (e.g. BatchNorm running statistics); ``load_state_dict`` copies values *into* the existing
arrays, so an optimizer built on the model keeps working after a load.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, Callable, Dict, Iterable, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from ..tensor import Tensor, is_grad_enabled

__all__ = ["Module", "Parameter", "Sequential", "fusion_plan", "run_chain"]


class Parameter(Tensor):
    """A Tensor that a Module registers as a trainable parameter (requires grad by default)."""

    __slots__ = ()

    def __init__(self, data: Any, requires_grad: bool = True):
        arr = data.data if isinstance(data, Tensor) else np.asarray(data)
        if arr.dtype != np.float32:
            arr = arr.astype(np.float32)
        super().__init__(np.ascontiguousarray(arr), requires_grad=requires_grad)

    def __repr__(self) -> str:
        return "Parameter containing:\n" + super().__repr__()


# Bumped by every change of any module tree (a child added, replaced or removed), so a module may cache
# what it derives from its tree (``regularization`` keeps its list of loss-term modules) and know when
# that cache is stale.
_TREE_EPOCH = [0]


def _tree_changed() -> None:
    _TREE_EPOCH[0] += 1


class Module:
    """Base class of layers and models: override ``forward``; call the module to run it."""

    #: True for layers whose ``forward`` returns a new op result and keeps no reference to it, so
    #: ``Sequential`` may donate that result's storage to the next layer (see ``Sequential.forward``).
    #: Off by default: a custom module might keep or return a tensor someone else holds.
    returns_private_output = False

    #: True for modules whose own computation treats each sample of a batch on its own (no batch statistics,
    #: nothing mixed across samples), so that :meth:`samplewise` may hold once their children agree. Off by
    #: default: a custom ``forward`` might mix samples.
    samplewise_forward = False

    def __init__(self) -> None:
        object.__setattr__(self, "_parameters", OrderedDict())
        object.__setattr__(self, "_buffers", OrderedDict())
        object.__setattr__(self, "_modules", OrderedDict())
        object.__setattr__(self, "training", True)

    # --- registration -----------------------------------------------------------------------------------
    def __setattr__(self, name: str, value: Any) -> None:
        if "_parameters" not in self.__dict__:
            raise AttributeError(f"{type(self).__name__}.__init__ must call super().__init__() before setting {name!r}")
        if name in self._modules or isinstance(value, (Module, Parameter)) or name in self._parameters:
            _tree_changed()
        for table in (self._parameters, self._buffers, self._modules):
            # a module or parameter replaced by another keeps its place (as in PyTorch): registration order is
            # execution order for the zoo's blocks, which fine-tuning's layer selection and state dicts rely on
            keep = ((table is self._buffers and isinstance(value, np.ndarray))
                    or (table is self._modules and isinstance(value, Module))
                    or (table is self._parameters and isinstance(value, Parameter)))
            if name in table and not keep:
                del table[name]
        if isinstance(value, Parameter):
            self.__dict__.pop(name, None)
            self._parameters[name] = value
        elif isinstance(value, Module):
            self.__dict__.pop(name, None)
            self._modules[name] = value
        elif name in self._buffers:
            self._buffers[name] = value
        else:
            object.__setattr__(self, name, value)

    def __getattr__(self, name: str) -> Any:
        d = self.__dict__
        for table in ("_parameters", "_buffers", "_modules"):
            if table in d and name in d[table]:
                return d[table][name]
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def __delattr__(self, name: str) -> None:
        if name in self._modules:
            _tree_changed()
        for table in (self._parameters, self._buffers, self._modules):
            if name in table:
                del table[name]
                return
        object.__delattr__(self, name)

    def register_buffer(self, name: str, value: Optional[np.ndarray], optional: bool = False) -> None:
        """A named array that is state but not trained (saved in ``state_dict``), e.g. running statistics.

        ``optional``: saved like any buffer, but a state dict without it still loads with ``strict=True`` (the
        buffer keeps its value): edgelearn-only bookkeeping such as ``Dropout``'s step counter, so state dicts
        of other frameworks with the same layout load."""
        self.__dict__.pop(name, None)
        self._buffers[name] = value
        if optional:
            if "_optional_buffers" not in self.__dict__:
                object.__setattr__(self, "_optional_buffers", set())
            self._optional_buffers.add(name)

    def register_parameter(self, name: str, param: Optional[Parameter]) -> None:
        if param is None:
            self._parameters[name] = None
        else:
            setattr(self, name, param)

    def add_module(self, name: str, module: Optional["Module"]) -> None:
        _tree_changed()
        self._modules[name] = module

    # --- running ----------------------------------------------------------------------------------------
    def forward(self, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError(f"{type(self).__name__} must implement forward()")

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.forward(*args, **kwargs)

    def samplewise(self) -> bool:
        """Whether running this module on sub-batches and stacking the outputs gives what one call on the whole
        batch gives, in its current mode: its own computation mixes no samples (``samplewise_forward``) and
        neither does any child's (a BatchNorm using batch statistics does; an INT8 layer's activation scale is
        per tensor, so there sub-batches differ by rounding only). See :func:`run_chain`."""
        return type(self).samplewise_forward and all(m.samplewise() for m in self._modules.values() if m is not None)

    def train(self, mode: bool = True) -> "Module":
        for m in self.modules():
            object.__setattr__(m, "training", bool(mode))
        return self

    def eval(self) -> "Module":
        return self.train(False)

    # --- traversal --------------------------------------------------------------------------------------
    def named_children(self) -> Iterator[Tuple[str, "Module"]]:
        for name, m in self._modules.items():
            if m is not None:
                yield name, m

    def children(self) -> Iterator["Module"]:
        for _, m in self.named_children():
            yield m

    def named_modules(self, prefix: str = "") -> Iterator[Tuple[str, "Module"]]:
        seen = set()
        stack: List[Tuple[str, Module]] = [(prefix, self)]
        while stack:
            name, m = stack.pop()
            if id(m) in seen:
                continue
            seen.add(id(m))
            yield name, m
            kids = [(f"{name}.{n}" if name else n, c) for n, c in m.named_children()]
            stack.extend(reversed(kids))

    def modules(self) -> Iterator["Module"]:
        for _, m in self.named_modules():
            yield m

    def _named_members(self, table: str, prefix: str, recurse: bool) -> Iterator[Tuple[str, Any]]:
        seen = set()
        mods = self.named_modules(prefix) if recurse else iter([(prefix, self)])
        for mname, m in mods:
            for n, v in getattr(m, table).items():
                if v is None or id(v) in seen:
                    continue
                seen.add(id(v))
                yield (f"{mname}.{n}" if mname else n), v

    def named_parameters(self, prefix: str = "", recurse: bool = True) -> Iterator[Tuple[str, Parameter]]:
        return self._named_members("_parameters", prefix, recurse)

    def parameters(self, recurse: bool = True) -> Iterator[Parameter]:
        for _, p in self.named_parameters(recurse=recurse):
            yield p

    def named_buffers(self, prefix: str = "", recurse: bool = True) -> Iterator[Tuple[str, np.ndarray]]:
        return self._named_members("_buffers", prefix, recurse)

    def buffers(self, recurse: bool = True) -> Iterator[np.ndarray]:
        for _, b in self.named_buffers(recurse=recurse):
            yield b

    def apply(self, fn: Callable[["Module"], None]) -> "Module":
        for m in self.modules():
            fn(m)
        return self

    def zero_grad(self) -> None:
        for p in self.parameters():
            p.grad = None

    def regularization(self) -> Tensor:
        """Sum of the loss terms modules ask for (each Compensation's ``0.5·λ·(‖μ‖²+‖β‖²)``); 0 if none.

        Add it to the training loss: ``loss = cross_entropy(model(x), y) + model.regularization()``.
        """
        cache = self.__dict__.get("_regularizers")
        if cache is None or cache[0] != _TREE_EPOCH[0]:
            mods = [m for m in self.modules() if getattr(type(m), "regularization_term", None) is not None]
            cache = (_TREE_EPOCH[0], mods)
            object.__setattr__(self, "_regularizers", cache)
        mods = cache[1]
        if not mods:
            return Tensor(np.zeros((), np.float32))
        fused = getattr(type(mods[0]), "regularization_terms", None)
        if fused is not None and all(type(m) is type(mods[0]) for m in mods):
            return fused(mods)  # one recorded op for all of them (e.g. every LAC layer's penalty)
        total: Optional[Tensor] = None
        for m in mods:
            term = m.regularization_term()
            total = term if total is None else total + term
        return total

    # --- state ------------------------------------------------------------------------------------------
    def _state_items(self) -> Iterator[Tuple[str, np.ndarray]]:
        for mname, m in self.named_modules():
            for n, p in m._parameters.items():
                if p is not None:
                    yield (f"{mname}.{n}" if mname else n), p.data
            for n, b in m._buffers.items():
                if b is not None:
                    yield (f"{mname}.{n}" if mname else n), b

    def state_dict(self) -> "OrderedDict[str, np.ndarray]":
        """Parameters and buffers by dotted name, as copies (safe to keep while training continues)."""
        return OrderedDict((k, np.array(v, copy=True)) for k, v in self._state_items())

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True) -> Tuple[List[str], List[str]]:
        """Copy ``state_dict`` into this module's arrays in place.

        Raises ``ValueError`` on any shape mismatch, and with ``strict`` on any missing or unexpected name
        (nothing is modified when it raises). Returns ``(missing_keys, unexpected_keys)``.
        """
        own = OrderedDict(self._state_items())
        optional = {(f"{mname}.{n}" if mname else n) for mname, m in self.named_modules()
                    for n in m.__dict__.get("_optional_buffers", ())}
        missing = [k for k in own if k not in state_dict and k not in optional]
        unexpected = [k for k in state_dict if k not in own]
        problems = []
        for k, dst in own.items():
            if k in state_dict:
                src = np.asarray(state_dict[k].data if isinstance(state_dict[k], Tensor) else state_dict[k])
                if src.shape != dst.shape:
                    problems.append(f"{k}: shape {src.shape} in the state dict, {dst.shape} in the model")
        if strict:
            if missing:
                problems.append("missing keys: " + ", ".join(missing))
            if unexpected:
                problems.append("unexpected keys: " + ", ".join(unexpected))
        if problems:
            raise ValueError(f"load_state_dict for {type(self).__name__}: " + "; ".join(problems))
        for k, dst in own.items():
            if k in state_dict:
                v = state_dict[k]
                np.copyto(dst, np.asarray(v.data if isinstance(v, Tensor) else v), casting="unsafe")
        return missing, unexpected

    # --- display ----------------------------------------------------------------------------------------
    def extra_repr(self) -> str:
        return ""

    def __repr__(self) -> str:
        kids = list(self.named_children())
        head = f"{type(self).__name__}({self.extra_repr()}"
        if not kids:
            return head + ")"
        lines = [head]
        for n, m in kids:
            sub = repr(m).replace("\n", "\n  ")
            lines.append(f"  ({n}): {sub}")
        return "\n".join(lines) + "\n)"


class Sequential(Module):
    """Modules applied in order; children are named "0", "1", ... (renumbered when items are inserted)."""

    samplewise_forward = True

    def __init__(self, *modules: Union[Module, "OrderedDict[str, Module]"]):
        super().__init__()
        if len(modules) == 1 and isinstance(modules[0], OrderedDict):
            for name, m in modules[0].items():
                self.add_module(name, m)
        else:
            for i, m in enumerate(modules):
                if not isinstance(m, Module):
                    raise TypeError(f"Sequential: item {i} is a {type(m).__name__}, not a Module")
                self.add_module(str(i), m)

    def _fusion_plan(self) -> list:
        """``[(module, fused_next_or_None), ...]`` (see :func:`fusion_plan`), cached until the module tree or a
        layer's FP32/INT8 mode changes (both bump the tree epoch)."""
        cache = self.__dict__.get("_fusion")
        if cache is not None and cache[0] == _TREE_EPOCH[0]:
            return cache[1]
        plan = fusion_plan(list(self._modules.values()))
        object.__setattr__(self, "_fusion", (_TREE_EPOCH[0], plan))
        return plan

    def forward(self, x: Any) -> Any:
        return run_chain(x, self._fusion_plan())

    def samplewise(self) -> bool:
        if type(self).forward is not Sequential.forward and "samplewise_forward" not in type(self).__dict__:
            return False  # a subclass with a forward of its own says for itself
        return super().samplewise()

    def __len__(self) -> int:
        return len(self._modules)

    def __iter__(self) -> Iterator[Module]:
        return iter(list(self._modules.values()))

    def __getitem__(self, idx: Union[int, slice]) -> Any:
        items = list(self._modules.values())
        if isinstance(idx, slice):
            return Sequential(*items[idx])
        return items[idx]

    def append(self, module: Module) -> "Sequential":
        self._reset_items(list(self) + [module])
        return self

    def insert(self, index: int, module: Module) -> "Sequential":
        items = list(self)
        items.insert(index, module)
        self._reset_items(items)
        return self

    def _reset_items(self, items: List[Module]) -> None:
        _tree_changed()
        self._modules.clear()
        for i, m in enumerate(items):
            self._modules[str(i)] = m


def _inline(items: List[Module]) -> List[Module]:
    """``items`` with every plain nested ``Sequential`` (no ``forward`` of its own) replaced by its items,
    recursively: one flat chain, so that a stage's or a wrapper's input is not kept alive by the frame that
    called it while the stage runs (each intermediate is freed as soon as the next item has consumed it), and
    octo's ``Sequential(layer, Compensation)`` wrappers fuse and donate like the rest."""
    flat: List[Module] = []
    for m in items:
        if type(m) is Sequential and "forward" not in m.__dict__:
            flat.extend(_inline(list(m._modules.values())))
        else:
            flat.append(m)
    return flat


def fusion_plan(items: List[Module]) -> list:
    """``[(module, fused_next_or_None), ...]`` for modules applied in order (nested plain Sequentials
    inlined, see :func:`_inline`): each INT8 Linear/Conv2d paired with the LAC Compensation that follows it
    (``fuses_with``), each INT8-mode BatchNorm2d with the tuple of the ReLU (and max pool) after it
    (``fuses_activation``)."""
    items = _inline(items)
    plan, i = [], 0
    while i < len(items):
        m = items[i]
        nxt = items[i + 1] if i + 1 < len(items) else None
        fuses_with = getattr(m, "fuses_with", None)
        fuses_activation = getattr(m, "fuses_activation", None)
        if nxt is not None and fuses_with is not None and fuses_with(nxt):
            plan.append((m, nxt))
            i += 2
        elif fuses_activation is not None and (k := fuses_activation(items[i + 1:i + 3])):
            plan.append((m, tuple(items[i + 1:i + 1 + k])))
            i += 1 + k
        else:
            plan.append((m, None))
            i += 1
    return plan


def _plan_members(entry: tuple) -> list:
    """The modules of one ``fusion_plan`` entry (the layer and those it applies itself)."""
    m, fused = entry
    return [m, *fused] if type(fused) is tuple else [m, fused]


#: The most samples a frozen prefix runs on at once (see :func:`run_chain`). A frozen layer keeps nothing for
#: backward, so what it costs is its forward's working set: a few activations of the sub-batch instead of the
#: batch. 32 keeps the kernels' work per call large (at 28x28, 25k output pixels per convolution).
FROZEN_SUBBATCH = 32


def _frozen_prefix(xd: Optional[np.ndarray], plan: list) -> int:
    """How many leading items of ``plan`` may run on sub-batches of ``xd`` (see :func:`frozen_input`): frozen
    samplewise items (:func:`is_frozen_layer`), at least one of them a layer with parameters."""
    if xd is None:
        return 0
    n, has_layer = 0, False
    for entry in plan:
        checks = [is_frozen_layer(m) for m in _plan_members(entry)]
        if not all(frozen for frozen, _ in checks):
            break
        has_layer = has_layer or any(params for _, params in checks)
        n += 1
    return n if has_layer else 0


def is_frozen_layer(m: Optional["Module"]) -> Tuple[bool, bool]:
    """``(frozen, has_parameters)`` for one item of a frozen prefix: samplewise in its current mode and no
    parameter that requires grad."""
    if m is None:
        return True, False
    params = list(m.parameters())
    return m.samplewise() and not any(p.requires_grad for p in params), bool(params)


def frozen_input(x: Any) -> Optional[np.ndarray]:
    """``x``'s array when a frozen prefix may run on sub-batches of it (more than :data:`FROZEN_SUBBATCH`
    samples, no gradient needed), else None."""
    from ..tensor import is_grad_enabled

    xd = x.data if isinstance(x, Tensor) else x
    if not isinstance(xd, np.ndarray) or xd.ndim < 2 or xd.shape[0] <= FROZEN_SUBBATCH:
        return None
    if isinstance(x, Tensor) and x.requires_grad and is_grad_enabled():
        return None
    return xd


def run_subbatched(n: int, run: Callable[[slice], Sequence[Any]]) -> List[Tensor]:
    """Calls ``run(rows)`` for each sub-batch of :data:`FROZEN_SUBBATCH` of ``n`` samples and writes what it
    returns into arrays for the whole batch (fresh arrays only the results hold: a next layer may write over
    them). The peak is one sub-batch's working set plus these outputs."""
    outs: Optional[List[np.ndarray]] = None
    for start in range(0, n, FROZEN_SUBBATCH):
        rows = slice(start, min(n, start + FROZEN_SUBBATCH))
        parts = [p.data if isinstance(p, Tensor) else np.asarray(p) for p in run(rows)]
        if outs is None:
            outs = [np.empty((n,) + p.shape[1:], p.dtype) for p in parts]
        for out, p in zip(outs, parts):
            out[rows] = p
        del parts
    results = []
    for out in outs or []:
        t = Tensor(out)
        t._owned = True
        results.append(t)
    return results


def run_chain(x: Any, plan: list, donate_input: bool = False) -> Any:
    """Applies ``plan`` (from :func:`fusion_plan`) to ``x`` as ``Sequential`` does, with its optimisations: an
    INT8 layer applies the Compensation that follows it inside its own op, and an intermediate output is donated
    to the next layer by contract (INT8-mode Compensation/BatchNorm/ReLU write over it). Blocks that are not a
    ``Sequential`` (residual blocks) run their main path through this too.

    A frozen prefix (leading layers whose parameters need no gradient, on an input that needs none, each
    :meth:`Module.samplewise`: the part of a ``--train last:K`` fine-tuning before the first trainable layer)
    runs on sub-batches of at most :data:`FROZEN_SUBBATCH` samples, its outputs gathered into one batch: it
    keeps nothing for backward, so its memory is its forward's working set, now that of a sub-batch.

    ``donate_input``: the caller promises that ``x`` is an intermediate it drops after this call (e.g. the sum
    of a residual add); it is donated to the first layer when its op said the storage is its alone (``owned``).
    """
    first, mine_first = 0, donate_input
    xd = frozen_input(x)
    frozen = _frozen_prefix(xd, plan)
    if frozen and xd is not None:
        whole = xd  # each sub-batch is a view of it: never donated
        (x,) = run_subbatched(whole.shape[0], lambda rows: [run_chain(Tensor(whole[rows]), plan[:frozen])])
        first, mine_first = frozen, True
    producer: Any = None
    if not is_grad_enabled() or any(type(f) is tuple and not m.training for m, f in plan[first:]):
        # BatchNorm → ReLU (→ pool) is fused for training only: otherwise (eval, no_grad, an ONNX trace) each
        # module runs by itself
        plan = plan[:first] + [e for m, f in plan[first:]
                               for e in ([(m, None)] + [(a, None) for a in f] if type(f) is tuple else [(m, f)])]
    for i in range(first, len(plan)):
        m, fused = plan[i]
        # Buffer donation, by contract (no reference counting): an intermediate made by the previous item is
        # handed to the next one when its op said the storage is the result's alone (``owned``, see
        # ``make_result``) and that item is a layer that keeps no reference to what it returns
        # (``returns_private_output``). Only this loop holds it then, so INT8-mode Compensation/BatchNorm/ReLU
        # may write their output over it. The chain's own input only when the caller says so.
        mine = mine_first if i == first else producer.returns_private_output
        if mine and type(x) is Tensor and x._owned:
            x._donated = True
        if type(fused) is tuple:
            # An INT8-mode BatchNorm2d followed by ReLU (and a 2x2 max pool): one op each way in training.
            x = m(x, act=fused)
            producer = fused[-1]
        elif fused is not None:
            # An INT8 Linear/Conv2d followed by its LAC Compensation: the compensation's per-channel
            # shift rides in the layer's GEMM epilogue as extra bias (one pass over Y fewer each way).
            x = m(x, compensation=fused)
            producer = m
        else:
            x = m(x)
            producer = m
    if type(x) is Tensor:
        x._donated = False  # a donation nobody took ends here: the caller's tensor is never overwritten
    return x
