"""Splitting a ``Sequential`` into the part that runs on the edge device and the part that runs in the cloud."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Tuple

import numpy as np

from .. import nn
from ..models import build_model
from ..nn.init import manual_seed
from ..tensor import no_grad, tensor

__all__ = ["split_model", "build_split", "output_shape", "batchnorm_calibration", "join_parts", "is_split_config",
           "model_from_split_config"]


def split_model(model: nn.Sequential, index: int) -> Tuple[nn.Sequential, nn.Sequential]:
    """``(model[:index], model[index:])``: the edge part and the cloud part, sharing the layers (and so the
    parameters) of ``model``. ``edge(x)`` fed to ``cloud`` computes exactly ``model(x)``.

    Split before switching a part to INT8 (:func:`edgelearn.octo` inserts Compensation layers, which would
    shift the indices).
    """
    if not isinstance(model, nn.Sequential):
        raise TypeError(f"model: expected an edgelearn.nn.Sequential, got {type(model).__name__}")
    if isinstance(index, bool) or not isinstance(index, (int, np.integer)):
        raise TypeError(f"split: expected an int layer index, got {type(index).__name__}")
    if not 1 <= index < len(model):
        raise ValueError(f"split: expected a layer index in [1, {len(model) - 1}] for a model of {len(model)} "
                         f"layers (edge = layers [0, split), cloud = layers [split, {len(model)})), got {index}")
    return model[:index], model[index:]


def build_split(model_name: str, input_shape: Tuple[int, int, int], classes: int, split: int,
                seed: int = 0) -> Tuple[nn.Sequential, nn.Sequential]:
    """The reference model ``model_name`` (see :func:`edgelearn.models.build_model`) initialised from ``seed``
    and split at ``split``. Edge and cloud call this with the same arguments, so together they hold exactly
    the model an unsplit run would start from."""
    manual_seed(seed)
    return split_model(build_model(model_name, tuple(input_shape), int(classes)), split)


def join_parts(edge: nn.Sequential, cloud: nn.Sequential) -> nn.Sequential:
    """One ``Sequential`` running ``edge`` then ``cloud`` (sharing their layers): the whole split model, with
    state-dict names numbered as :func:`model_from_split_config` rebuilds them."""
    return nn.Sequential(*list(edge), *list(cloud))


def is_split_config(config) -> bool:
    """Whether a checkpoint's ``extra.config`` describes a model trained split (``join --save-full``)."""
    return isinstance(config, dict) and isinstance(config.get("split"), int) and config.get("collab") is True


def model_from_split_config(config, input_shape: Tuple[int, int, int], classes: int) -> nn.Sequential:
    """The (untrained) whole model a ``join --save-full`` checkpoint holds, from its ``extra.config``: the
    reference model ``config["model"]`` split at ``config["split"]``, the edge part switched to Octo INT8
    (with ``config["octo"]``) when ``config["precision"] == "int8"``, the cloud part FP32, joined again.
    Load the checkpoint's weights into it."""
    from ..octo import OctoConfig, octo

    edge, cloud = build_split(config["model"], tuple(input_shape), int(classes), int(config["split"]),
                              int(config.get("init_seed", 0)))
    if config.get("precision") == "int8":
        octo(edge, OctoConfig(**(config.get("octo") or {})))
    return join_parts(edge, cloud)


def output_shape(module: nn.Module, input_shape: Tuple[int, ...]) -> Tuple[int, ...]:
    """Per-sample output shape of ``module`` for one input of ``input_shape`` (one eval-mode pass, no state
    changes)."""
    was_training = module.training
    module.eval()
    try:
        with no_grad():
            out = module(tensor(np.zeros((1, *input_shape), np.float32)))
    finally:
        module.train(was_training)
    return tuple(out.shape[1:])


@contextmanager
def batchnorm_calibration(module: nn.Module, batch: int) -> Iterator[None]:
    """Inside: forward passes of ``module`` add batch number ``batch`` (0, 1, ...) to a re-estimation of its
    BatchNorm running statistics as the exact average over the batches seen (batch 0 resets them); every other
    layer runs in eval mode, nothing records gradients. The same rule as
    :func:`edgelearn.train.recalibrate_batchnorm`, cut into steps, so edge and cloud can each apply it to
    their part while the features of a batch travel between them."""
    bns = [m for m in module.modules() if isinstance(m, nn.BatchNorm2d)]
    was_training = module.training
    saved = [bn.momentum for bn in bns]
    module.eval()
    try:
        for bn in bns:
            if batch == 0:
                bn.running_mean[...] = 0.0
                bn.running_var[...] = 1.0
            bn.momentum = 1.0 / (batch + 1)
            bn.train()
        with no_grad():
            yield
    finally:
        for bn, momentum in zip(bns, saved):
            bn.momentum = momentum
        module.train(was_training)
