"""Optimizers (``SGD``, ``Adam``, ``AdamW``) and learning-rate schedulers (``StepLR``, ``CosineAnnealingLR``).

PyTorch semantics and state-dict layout: ``param_groups`` is a list of dicts (``"params"`` plus
hyper-parameters, which schedulers change in place); ``state_dict()`` is
``{"state": {index: {...arrays...}}, "param_groups": [{..., "params": [indices]}]}`` with copies of the arrays,
and ``load_state_dict`` restores it exactly. Updates are in place on the parameters' FP32 master arrays, with
vectorised numpy (a handful of passes per parameter per step).
"""

from __future__ import annotations

import copy
import math
from typing import Any, Dict, Iterable, List, Mapping, Optional, Tuple, Union

import numpy as np

from . import _native
from .tensor import Tensor

__all__ = ["Optimizer", "SGD", "Adam", "AdamW", "LRScheduler", "StepLR", "CosineAnnealingLR"]


def _hyper(owner: str, name: str, value: Any, lo: float = 0.0, hi: float = math.inf, hi_open: bool = False) -> float:
    """``value`` as a float if it is a finite real number in ``[lo, hi]`` (``[lo, hi)`` with ``hi_open``);
    otherwise ``ValueError``/``TypeError`` naming ``owner``'s argument ``name``."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise TypeError(f"{owner}: {name} must be a number, got {value!r}")
    v = float(value)
    if not math.isfinite(v) or v < lo or v > hi or (hi_open and v >= hi):
        upper = "" if hi == math.inf else (f", < {hi}" if hi_open else f", ≤ {hi}")
        raise ValueError(f"{owner}: {name} must be a finite number ≥ {lo}{upper}, got {value!r}")
    return v


def _count(owner: str, name: str, value: Any, lo: int = 1) -> int:
    """``value`` as an int ≥ ``lo`` (a bool or a float is refused), naming the argument."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{owner}: {name} must be an integer, got {value!r}")
    if value < lo:
        raise ValueError(f"{owner}: {name} must be ≥ {lo}, got {value!r}")
    return int(value)


def _same_kind(where: str, saved: Any, own: Any) -> None:
    """Refuses a restored hyper-parameter or counter whose kind differs from the live one (an int where an
    int is, a finite real where a float is, a sequence of those of the same length, a bool for a bool)."""
    if isinstance(own, bool):
        ok = isinstance(saved, (bool, np.bool_))
    elif isinstance(own, (int, np.integer)):
        ok = isinstance(saved, (int, np.integer)) and not isinstance(saved, bool)
    elif isinstance(own, (float, np.floating)):
        ok = (isinstance(saved, (int, float, np.integer, np.floating)) and not isinstance(saved, bool)
              and math.isfinite(float(saved)))
    elif isinstance(own, (list, tuple)):
        ok = isinstance(saved, (list, tuple)) and len(saved) == len(own)
        if ok:
            for i, (a, b) in enumerate(zip(saved, own)):
                _same_kind(f"{where}[{i}]", a, b)
    elif own is None:
        ok = saved is None or (isinstance(saved, (int, float)) and not isinstance(saved, bool))
    else:
        ok = True
    if not ok:
        raise ValueError(f"load_state_dict: {where} is {saved!r}, expected a value like {own!r}")


class Optimizer:
    """Base class: holds ``param_groups`` and per-parameter ``state``; subclasses implement ``_update``."""

    defaults: Dict[str, Any]

    def __init__(self, params: Iterable[Any], defaults: Dict[str, Any]):
        self.defaults = dict(defaults)
        groups = list(params)
        if not groups:
            raise ValueError("params: the optimizer got an empty parameter list")
        if not isinstance(groups[0], dict):
            groups = [{"params": groups}]
        self.param_groups: List[Dict[str, Any]] = []
        seen = set()
        for g in groups:
            group = dict(g)
            ps = group["params"]
            group["params"] = [ps] if isinstance(ps, Tensor) else list(ps)
            for p in group["params"]:
                if not isinstance(p, Tensor):
                    raise TypeError(f"params: expected Tensors/Parameters, got {type(p).__name__}")
                if id(p) in seen:
                    raise ValueError("params: a parameter appears in more than one place")
                seen.add(id(p))
            for k, v in self.defaults.items():
                group.setdefault(k, v)
            self.param_groups.append(group)
        self.state: Dict[int, Dict[str, Any]] = {}  # keyed by id(param)

    def _params(self) -> List[Tensor]:
        return [p for g in self.param_groups for p in g["params"]]

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self._params():
            if set_to_none:
                p.grad = None
            elif p.grad is not None:
                p.grad.data[...] = 0

    def step(self) -> None:
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                self._update(p, p.grad.data, group, self.state.setdefault(id(p), {}))

    def _update(self, p: Tensor, g: np.ndarray, group: Dict[str, Any], state: Dict[str, Any]) -> None:
        raise NotImplementedError

    def state_dict(self) -> Dict[str, Any]:
        index = {id(p): i for i, p in enumerate(self._params())}
        state = {
            index[pid]: {k: (np.array(v, copy=True) if isinstance(v, np.ndarray) else v) for k, v in s.items()}
            for pid, s in self.state.items()
            if pid in index
        }
        groups = []
        for g in self.param_groups:
            d = {k: copy.deepcopy(v) for k, v in g.items() if k != "params"}
            d["params"] = [index[id(p)] for p in g["params"]]
            groups.append(d)
        return {"state": state, "param_groups": groups}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore hyper-parameters and buffers; raises ``ValueError`` if the groups or shapes do not match."""
        if not isinstance(state_dict, Mapping):
            raise ValueError(f"load_state_dict: expected a dict with 'state' and 'param_groups', got {type(state_dict).__name__}")
        groups = state_dict.get("param_groups")
        if groups is None or "state" not in state_dict:
            raise ValueError("load_state_dict: expected a dict with 'state' and 'param_groups'")
        if not isinstance(groups, (list, tuple)) or not all(isinstance(g, Mapping) for g in groups):
            raise ValueError("load_state_dict: 'param_groups' must be a list of dicts")
        if len(groups) != len(self.param_groups):
            raise ValueError(f"load_state_dict: {len(groups)} parameter groups given, optimizer has {len(self.param_groups)}")
        params = self._params()
        for i, (saved, own) in enumerate(zip(groups, self.param_groups)):
            sp = saved.get("params")
            if not isinstance(sp, (list, tuple)) or not all(isinstance(j, int) and not isinstance(j, bool) for j in sp):
                raise ValueError(f"load_state_dict: param_groups[{i}]['params'] must be a list of parameter indices")
            for k, v in saved.items():
                if k == "params":
                    continue
                if k not in own and k != "initial_lr":  # a scheduler's, present or not
                    raise ValueError(f"load_state_dict: param_groups[{i}] has unknown hyper-parameter {k!r}")
                _same_kind(f"param_groups[{i}][{k!r}]", v, own.get(k, 0.0))
            missing = [k for k in own if k not in saved and k != "params" and k != "initial_lr"]
            if missing:
                raise ValueError(f"load_state_dict: param_groups[{i}] lacks {', '.join(map(repr, missing))}")
            if len(saved["params"]) != len(own["params"]):
                raise ValueError(
                    f"load_state_dict: group {i} has {len(saved['params'])} parameters, optimizer has {len(own['params'])}"
                )
        new_state: Dict[int, Dict[str, Any]] = {}
        if not isinstance(state_dict["state"], Mapping):
            raise ValueError("load_state_dict: 'state' must be a dict of per-parameter states")
        try:
            saved_state = {int(k): v for k, v in state_dict["state"].items()}
        except (TypeError, ValueError):
            raise ValueError("load_state_dict: 'state' keys must be parameter indices (ints)") from None
        for k, v in saved_state.items():
            if not isinstance(v, Mapping):
                raise ValueError(f"load_state_dict: state[{k}] must be a dict, got {type(v).__name__}")
            for name, value in v.items():
                if name == "step":
                    _same_kind(f"state[{k}]['step']", value, 0)
                elif isinstance(value, np.ndarray) and value.dtype != np.float32:
                    raise ValueError(f"load_state_dict: state[{k}][{name!r}] has dtype {value.dtype}, expected float32")
        for saved, own in zip(groups, self.param_groups):
            for si, p in zip(saved["params"], own["params"]):
                if si not in saved_state:
                    continue
                entry = {}
                for k, v in saved_state[si].items():
                    if isinstance(v, np.ndarray) and v.shape == p.data.shape:
                        entry[k] = np.array(v, dtype=p.data.dtype, copy=True)
                    elif isinstance(v, np.ndarray) and v.ndim > 0:
                        raise ValueError(f"load_state_dict: state {k!r} has shape {v.shape}, parameter has {p.data.shape}")
                    else:
                        entry[k] = copy.deepcopy(v)
                new_state[id(p)] = entry
        for saved, own in zip(groups, self.param_groups):
            for k, v in saved.items():
                if k != "params":
                    own[k] = copy.deepcopy(v)
        self.state = new_state
        del params


class SGD(Optimizer):
    """Stochastic gradient descent with momentum, dampening, weight decay and Nesterov (PyTorch's update)."""

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        momentum: float = 0.0,
        dampening: float = 0.0,
        weight_decay: float = 0.0,
        nesterov: bool = False,
    ):
        lr = _hyper("SGD", "lr", lr)
        momentum = _hyper("SGD", "momentum", momentum)
        dampening = _hyper("SGD", "dampening", dampening, hi=1.0)
        weight_decay = _hyper("SGD", "weight_decay", weight_decay)
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ValueError("SGD: nesterov needs momentum > 0 and dampening = 0")
        super().__init__(
            params, dict(lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay, nesterov=nesterov)
        )

    def step(self) -> None:
        """One update of every parameter with a gradient. Parameters whose momentum buffer exists (or with
        no momentum) are updated together in one core call (``_native.sgd_step``, the same arithmetic as
        :meth:`_update`, bit for bit); a first step with momentum creates the buffer in :meth:`_update`."""
        states = self.state
        f32 = np.float32
        for group in self.param_groups:
            mom = group["momentum"]
            ps, gs, bs = [], [], []
            for p in group["params"]:
                grad = p.grad
                if grad is None:
                    continue
                state = states.get(id(p))
                if state is None:
                    state = states[id(p)] = {}
                g = grad.data
                buf = state.get("momentum_buffer")
                d = p.data
                if (mom and buf is None) or type(d) is not np.ndarray or d.dtype != f32 or not d.flags.c_contiguous:
                    self._update(p, g, group, state)
                    continue
                if g.dtype != f32 or not g.flags.c_contiguous:
                    g = np.ascontiguousarray(g, dtype=f32)
                ps.append(d)
                gs.append(g)
                bs.append(buf)
            if ps:
                _native.sgd_step(
                    ps, gs, bs if mom else None, float(np.float32(group["lr"])), float(np.float32(mom)),
                    float(np.float32(1.0 - group["dampening"])), float(np.float32(group["weight_decay"])),
                    bool(group["nesterov"]),
                )

    def _update(self, p: Tensor, g: np.ndarray, group: Dict[str, Any], state: Dict[str, Any]) -> None:
        wd, mom, damp = group["weight_decay"], group["momentum"], group["dampening"]
        if wd:
            g = g + np.float32(wd) * p.data
        if mom:
            buf = state.get("momentum_buffer")
            if buf is None:
                buf = state["momentum_buffer"] = np.array(g, dtype=p.data.dtype, copy=True)
            else:
                buf *= np.float32(mom)
                buf += np.float32(1.0 - damp) * g
            g = g + np.float32(mom) * buf if group["nesterov"] else buf
        p.data -= np.float32(group["lr"]) * g


class Adam(Optimizer):
    """Adam (Kingma & Ba) with PyTorch's bias correction; ``weight_decay`` is L2 added to the gradient."""

    _decoupled = False

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        betas: Tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        amsgrad: bool = False,
    ):
        name = type(self).__name__
        lr = _hyper(name, "lr", lr)
        eps = _hyper(name, "eps", eps)
        weight_decay = _hyper(name, "weight_decay", weight_decay)
        if not isinstance(betas, (tuple, list)) or len(betas) != 2:
            raise ValueError(f"{name}: betas must be a pair of numbers in [0, 1), got {betas!r}")
        betas = (_hyper(name, "betas[0]", betas[0], hi=1.0, hi_open=True),
                 _hyper(name, "betas[1]", betas[1], hi=1.0, hi_open=True))
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, amsgrad=amsgrad))

    def _update(self, p: Tensor, g: np.ndarray, group: Dict[str, Any], state: Dict[str, Any]) -> None:
        lr, (b1, b2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
        if wd:
            if self._decoupled:
                p.data *= np.float32(1.0 - lr * wd)
            else:
                g = g + np.float32(wd) * p.data
        if "step" not in state:
            state["step"] = 0
            state["exp_avg"] = np.zeros_like(p.data)
            state["exp_avg_sq"] = np.zeros_like(p.data)
            if group["amsgrad"]:
                state["max_exp_avg_sq"] = np.zeros_like(p.data)
        state["step"] += 1
        t = state["step"]
        m, v = state["exp_avg"], state["exp_avg_sq"]
        m *= np.float32(b1)
        m += np.float32(1.0 - b1) * g
        v *= np.float32(b2)
        v += np.float32(1.0 - b2) * (g * g)
        bc1 = 1.0 - b1**t
        bc2 = 1.0 - b2**t
        if group["amsgrad"]:
            vmax = state["max_exp_avg_sq"]
            np.maximum(vmax, v, out=vmax)
            v = vmax
        denom = np.sqrt(v) / np.float32(math.sqrt(bc2))
        denom += np.float32(eps)
        p.data -= np.float32(lr / bc1) * (m / denom)


class AdamW(Adam):
    """Adam with decoupled weight decay (``p *= 1 - lr·wd`` before the Adam step); default wd 0.01."""

    _decoupled = True

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        betas: Tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        amsgrad: bool = False,
    ):
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad)


class LRScheduler:
    """Base scheduler: ``step()`` advances ``last_epoch`` and writes each group's ``lr`` (closed forms)."""

    def __init__(self, optimizer: Optimizer, last_epoch: int = -1):
        self.optimizer = optimizer
        if last_epoch == -1:
            for g in optimizer.param_groups:
                g.setdefault("initial_lr", g["lr"])
        else:
            for i, g in enumerate(optimizer.param_groups):
                if "initial_lr" not in g:
                    raise KeyError(f"param group {i} has no 'initial_lr': resume needs last_epoch=-1 or a loaded state")
        self.base_lrs = [g["initial_lr"] for g in optimizer.param_groups]
        self.last_epoch = last_epoch
        self.step()

    def get_lr(self) -> List[float]:
        raise NotImplementedError

    def step(self) -> None:
        self.last_epoch += 1
        lrs = self.get_lr()
        for g, lr in zip(self.optimizer.param_groups, lrs):
            g["lr"] = lr
        self._last_lr = list(lrs)

    def get_last_lr(self) -> List[float]:
        return list(self._last_lr)

    def state_dict(self) -> Dict[str, Any]:
        return {k: copy.deepcopy(v) for k, v in self.__dict__.items() if k != "optimizer"}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned; raises ``ValueError`` (nothing changed) if a key is
        unknown or missing or a value is not of the kind this scheduler holds (an int counter, finite
        floats, lists of the same length)."""
        if not isinstance(state_dict, Mapping):
            raise ValueError(f"load_state_dict: expected a dict, got {type(state_dict).__name__}")
        own = self.state_dict()
        unknown = [k for k in state_dict if k not in own]
        missing = [k for k in own if k not in state_dict]
        if unknown or missing:
            raise ValueError(f"load_state_dict for {type(self).__name__}: "
                             + "; ".join(([f"unknown keys {unknown}"] if unknown else [])
                                         + ([f"missing keys {missing}"] if missing else [])))
        for k, v in state_dict.items():
            _same_kind(f"{type(self).__name__}.{k}", v, own[k])
        for k, v in state_dict.items():
            setattr(self, k, copy.deepcopy(v))


class StepLR(LRScheduler):
    """``lr = base_lr · gamma^(epoch // step_size)``."""

    def __init__(self, optimizer: Optimizer, step_size: int, gamma: float = 0.1, last_epoch: int = -1):
        self.step_size = _count("StepLR", "step_size", step_size)
        self.gamma = _hyper("StepLR", "gamma", gamma)
        super().__init__(optimizer, last_epoch)

    def get_lr(self) -> List[float]:
        return [base * self.gamma ** (self.last_epoch // self.step_size) for base in self.base_lrs]


class CosineAnnealingLR(LRScheduler):
    """``lr = eta_min + (base_lr − eta_min)·(1 + cos(π·epoch/T_max))/2``."""

    def __init__(self, optimizer: Optimizer, T_max: int, eta_min: float = 0.0, last_epoch: int = -1):
        self.T_max = _count("CosineAnnealingLR", "T_max", T_max)
        self.eta_min = _hyper("CosineAnnealingLR", "eta_min", eta_min)
        super().__init__(optimizer, last_epoch)

    def get_lr(self) -> List[float]:
        c = (1.0 + math.cos(math.pi * self.last_epoch / self.T_max)) / 2.0
        return [self.eta_min + (base - self.eta_min) * c for base in self.base_lrs]
