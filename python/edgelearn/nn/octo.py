"""``octo(model, config)``: switch a model to Octo INT8 training in place; ``fp32(model)`` switches back.

``octo`` turns every ``Linear``/``Conv2d`` of a model into its INT8 mode (one core call per layer and
direction: INT8 GEMMs for Y, dX and dW, int8 saved activations, PRC on incoming gradients, FP32 master
weights) and, with LAC on, puts a ``Compensation`` layer right after each of them. It lives beside the
modules it rewrites; the numerics are the core's (``edgelearn_core::octo``).
"""

from __future__ import annotations

from typing import Any, Optional

from ..octo_config import OctoConfig
from .layers import BatchNorm2d, Compensation, Conv2d, Linear, ReLU, ReLU6
from .module import Sequential

__all__ = ["OctoConfig", "octo", "fp32"]


def octo(model: Any, config: Optional[OctoConfig] = None) -> Any:
    """Switch ``model`` to Octo INT8 training in place and return it.

    Every ``Linear``/``Conv2d`` (at any depth) gets INT8 mode with ``config``; with ``config.lac`` a
    ``Compensation`` over its output channels is placed right after it: as the next item when the parent is a
    ``Sequential`` (later items are renumbered), otherwise by replacing the attribute with
    ``Sequential(layer, Compensation)``. Calling ``octo`` again re-applies the config without adding a second
    Compensation. Parameters are kept (FP32 master weights), so convert before building the optimizer or
    rebuild it afterwards: Compensation parameters are new.
    """
    if config is None:
        config = OctoConfig()
    if not isinstance(config, OctoConfig):
        raise TypeError(f"config: expected an OctoConfig or None, got {type(config).__name__}")
    counter = [0]
    if isinstance(model, (Linear, Conv2d)):
        model.set_int8(config, layer_id=0)
        return model
    _convert(model, config, counter)
    _set_saved_activations(model, config.int8_saved_activations)
    return model


def _set_saved_activations(model: Any, int8: bool) -> None:
    for m in model.modules():
        if isinstance(m, BatchNorm2d):
            m.save_int8 = int8
        elif isinstance(m, (ReLU, ReLU6)):
            m.save_mask = int8


def _convert(module: Any, config: OctoConfig, counter: list) -> None:
    if isinstance(module, Sequential):
        items = list(module)
        new_items = []
        for i, child in enumerate(items):
            if isinstance(child, (Linear, Conv2d)):
                child.set_int8(config, layer_id=counter[0])
                counter[0] += 1
                new_items.append(child)
                nxt = items[i + 1] if i + 1 < len(items) else None
                if isinstance(nxt, Compensation):
                    nxt.lam = config.lam
                    continue
                if config.lac:
                    new_items.append(Compensation(child.out_features_or_channels, lam=config.lam))
            elif isinstance(child, Compensation) and not config.lac:
                # LAC switched off on an already converted model: drop the compensation layers
                continue
            else:
                _convert(child, config, counter)
                new_items.append(child)
        module._reset_items(new_items)
        return
    for name, child in list(module.named_children()):
        if isinstance(child, (Linear, Conv2d)):
            child.set_int8(config, layer_id=counter[0])
            counter[0] += 1
            if config.lac:
                setattr(module, name, Sequential(child, Compensation(child.out_features_or_channels, lam=config.lam)))
        else:
            _convert(child, config, counter)


def fp32(model: Any) -> Any:
    """Switch every Linear/Conv2d of ``model`` back to FP32 mode and BN/ReLU back to FP32 saves (Compensation
    layers stay; returns model)."""
    for m in model.modules():
        if isinstance(m, (Linear, Conv2d)):
            m.set_int8(None)
    _set_saved_activations(model, False)
    return model
