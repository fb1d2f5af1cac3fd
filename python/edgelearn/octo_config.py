"""``OctoConfig``: the knobs of Octo INT8 training (``docs/octo.md``), a plain frozen value.

A leaf module (it imports nothing from edgelearn), so ``functional``, ``nn`` and ``octo`` can all use it
without an import circle. ``edgelearn.octo`` / ``edgelearn.nn.octo`` hold the module rewriter.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Optional, Tuple, Union

__all__ = ["OctoConfig"]

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
    - ``per_channel_weights``: quantize W per output channel instead of per tensor. Forward and dW stay on
      INT8 kernels; dX contracts over output channels, where a per-channel scale cannot be factored out of
      an INT8 product, so that one product runs in FP32 on the integer codes scaled by ``s_dy·s_w[o]``.
    - ``int8_saved_activations``: also keep BatchNorm inputs as int8 (read directly by the core's backward)
      and ReLU outputs as 1-bit masks for backward, so every saved activation of a conv/BN/ReLU network is
      8-bit or less (without it BatchNorm and ReLU keep FP32 and the saving is limited to the Linear/Conv
      inputs). In this mode Compensation, BatchNorm and ReLU also write their output over an input that
      ``Sequential`` donates (an intermediate nobody else references) and BatchNorm/ReLU backward overwrite
      an incoming gradient the autograd sweep owns (the ``owned`` contract of ``tensor.make_result``), so a step
      holds about one FP32 activation at a time.
    - ``seed``: base seed of stochastic rounding (X, dY and, if chosen, W); each layer and step derives its
      own seed from it, so a run is reproducible and resumable (each INT8 layer keeps its step count as the
      ``quant_step`` buffer), and bit-identical whatever the thread count.
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
