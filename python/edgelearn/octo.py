"""Octo INT8 training switch: ``OctoConfig`` (the knobs of ``docs/octo.md``) and ``octo(model, config)``.

``octo`` turns every ``Linear``/``Conv2d`` of a model into its INT8 mode (INT8 GEMMs for Y, dX and dW, int8 saved
activations, PRC on incoming gradients, FP32 master weights) and, with LAC on, puts a ``Compensation`` layer right
after each of them. The numerics live in ``edgelearn.functional``; this module only rewires modules.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Optional, Tuple, Union

__all__ = ["OctoConfig", "octo", "fp32"]

_ROUNDINGS = ("nearest", "stochastic")
_PRC_MODES = ("sigma", "minmax", None)


@dataclass(frozen=True)
class OctoConfig:
    """Knobs of INT8 training. Defaults are the ones of ``docs/octo.md``.

    - ``act_rounding``: rounding of forward activations X in training ('stochastic' default, or 'nearest').
      In eval mode activations always use nearest rounding (deterministic inference).
    - ``weight_rounding``: rounding of weights W ('nearest' default).
    - ``grad_rounding``: rounding of incoming gradients dY after PRC ('stochastic' default, or 'nearest').
      ``octo.md`` names nearest as its default; we measured stochastic (unbiased) rounding closer to FP32:
      Fashion-MNIST, bundled CNN, 3 epochs, seed 0: FP32 89.16%, INT8 stochastic 88.62%, nearest 88.15%.
    - ``prc``: Parameterized Range Clipping of dY before quantizing: 'minmax' (clip to κ·[min, max], default),
      'sigma' (clip to mean ± z·σ) or None (off). ``octo.md`` leaves the default mode open; we measured
      'sigma' at z = 2.576 diverging on the bundled CNN (Fashion-MNIST, 1 epoch: train loss 7.3 vs 0.60):
      dY after BatchNorm is heavy-tailed, so a 99% interval clips much of the signal.
    - ``z``, ``kappa``: parameters of the two PRC modes (2.576 = 99% interval; 0.95).
    - ``lac``: insert a Compensation layer after each INT8 layer; ``lam`` is its regulariser weight λ.
    - ``per_channel_weights``: quantize W per output channel instead of per tensor (forward GEMM; the
      backward dX GEMM uses a per-tensor copy of Wq, since a scale along the reduction axis cannot be fused).
    - ``int8_saved_activations``: also keep BatchNorm inputs as int8 (read directly by the core's backward)
      and ReLU outputs as 1-bit masks for backward, so every saved activation of a conv/BN/ReLU network is
      8-bit or less (without it BatchNorm and ReLU keep FP32 and the saving is limited to the Linear/Conv
      inputs). In this mode Compensation, BatchNorm and ReLU also write their output over an input that
      ``Sequential`` donates (an intermediate nobody else references) and BatchNorm/ReLU backward overwrite
      an unshared incoming gradient, so a step holds about one FP32 activation at a time.
    - ``seed``: base seed of stochastic rounding; each layer and step derives its own seed from it, so a run
      is reproducible and resumable (each INT8 layer keeps its step count as the ``quant_step`` buffer).
    """

    act_rounding: str = "stochastic"
    weight_rounding: str = "nearest"
    grad_rounding: str = "stochastic"
    prc: Optional[str] = "minmax"
    z: float = 2.576
    kappa: float = 0.95
    lac: bool = True
    lam: float = 0.1
    per_channel_weights: bool = False
    int8_saved_activations: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("act_rounding", "weight_rounding", "grad_rounding"):
            if getattr(self, name) not in _ROUNDINGS:
                raise ValueError(f"{name}: expected one of {_ROUNDINGS}, got {getattr(self, name)!r}")
        if self.prc not in _PRC_MODES:
            raise ValueError(f"prc: expected 'sigma', 'minmax' or None, got {self.prc!r}")
        if not self.z > 0:
            raise ValueError(f"z: expected a positive number, got {self.z}")
        if not 0 < self.kappa <= 1:
            raise ValueError(f"kappa: expected a number in (0, 1], got {self.kappa}")
        if self.lam < 0:
            raise ValueError(f"lam: expected λ ≥ 0, got {self.lam}")

    def prc_clip(self) -> Union[None, Tuple[str, float]]:
        """The ``clip`` argument of ``edgelearn.quantize`` for incoming gradients."""
        if self.prc == "sigma":
            return ("sigma", float(self.z))
        if self.prc == "minmax":
            return ("minmax", float(self.kappa))
        return None

    def replace(self, **changes: Any) -> "OctoConfig":
        return dataclasses.replace(self, **changes)


def octo(model: Any, config: Optional[OctoConfig] = None) -> Any:
    """Switch ``model`` to Octo INT8 training in place and return it.

    Every ``Linear``/``Conv2d`` (at any depth) gets INT8 mode with ``config``; with ``config.lac`` a
    ``Compensation`` over its output channels is placed right after it: as the next item when the parent is a
    ``Sequential`` (later items are renumbered), otherwise by replacing the attribute with
    ``Sequential(layer, Compensation)``. Calling ``octo`` again re-applies the config without adding a second
    Compensation. Parameters are kept (FP32 master weights), so convert before building the optimizer or
    rebuild it afterwards: Compensation parameters are new.
    """
    from . import nn

    if config is None:
        config = OctoConfig()
    if not isinstance(config, OctoConfig):
        raise TypeError(f"config: expected an OctoConfig or None, got {type(config).__name__}")
    counter = [0]
    if isinstance(model, (nn.Linear, nn.Conv2d)):
        model.set_int8(config, layer_id=0)
        return model
    _convert(model, config, counter, nn)
    _set_saved_activations(model, config.int8_saved_activations, nn)
    return model


def _set_saved_activations(model: Any, int8: bool, nn: Any) -> None:
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.save_int8 = int8
        elif isinstance(m, nn.ReLU):
            m.save_mask = int8


def _convert(module: Any, config: OctoConfig, counter: list, nn: Any) -> None:
    if isinstance(module, nn.Sequential):
        items = list(module)
        new_items = []
        for i, child in enumerate(items):
            if isinstance(child, (nn.Linear, nn.Conv2d)):
                child.set_int8(config, layer_id=counter[0])
                counter[0] += 1
                new_items.append(child)
                nxt = items[i + 1] if i + 1 < len(items) else None
                if isinstance(nxt, nn.Compensation):
                    nxt.lam = config.lam
                    continue
                if config.lac:
                    new_items.append(nn.Compensation(child.out_features_or_channels, lam=config.lam))
            elif isinstance(child, nn.Compensation) and not config.lac:
                # LAC switched off on an already converted model: drop the compensation layers
                continue
            else:
                _convert(child, config, counter, nn)
                new_items.append(child)
        module._reset_items(new_items)
        return
    for name, child in list(module.named_children()):
        if isinstance(child, (nn.Linear, nn.Conv2d)):
            child.set_int8(config, layer_id=counter[0])
            counter[0] += 1
            if config.lac:
                setattr(module, name, nn.Sequential(child, nn.Compensation(child.out_features_or_channels, lam=config.lam)))
        else:
            _convert(child, config, counter, nn)


def fp32(model: Any) -> Any:
    """Switch every Linear/Conv2d of ``model`` back to FP32 mode and BN/ReLU back to FP32 saves (Compensation
    layers stay; returns model)."""
    from . import nn

    for m in model.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            m.set_int8(None)
    _set_saved_activations(model, False, nn)
    return model
