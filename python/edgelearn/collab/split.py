"""Splitting a ``Sequential`` into the part that runs on the edge device and the part that runs in the cloud."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator, List, Optional, Tuple, Union

import numpy as np

from .. import nn
from ..models import build_model
from ..nn.init import manual_seed
from ..tensor import no_grad, tensor

__all__ = ["chain", "split_points", "split_model", "build_split", "output_shape", "batchnorm_calibration", "join_parts",
           "is_split_config", "model_from_split_config", "split_spec", "build_model_spec", "is_model_spec"]


def chain(module: nn.Module) -> List[Tuple[str, nn.Module]]:
    """``[(name, child), ...]``: the modules ``module`` applies one after the other, in order, by the names
    of its state dict: a ``Sequential``'s items, or what a model that is a chain of named parts but not a
    ``Sequential`` (a zoo model: ``conv1, bn1, relu, layer1, ..., fc``) lists in its ``split_chain()``."""
    if hasattr(module, "split_chain"):
        return list(module.split_chain())
    if isinstance(module, nn.Sequential):
        return list(module.named_children())
    raise TypeError(f"model: a {type(module).__name__} is not a chain of layers (an edgelearn.nn.Sequential, or a "
                    "model with split_chain()); it cannot be split")


def split_points(model: nn.Module) -> List[str]:
    """Every name ``split`` accepts for ``model``: top-level parts, and inside nested chains their parts
    (``features.7``), except the first of the whole model (the edge part would be empty)."""
    names: List[str] = []

    def walk(module: nn.Module, prefix: str) -> None:
        for name, child in chain(module):
            full = f"{prefix}{name}"
            names.append(full)
            if isinstance(child, nn.Sequential) or hasattr(child, "split_chain"):
                walk(child, f"{full}.")

    if isinstance(model, nn.GraphModule):
        return [n[0] for i, n in enumerate(model.nodes) if i > 0 and _graph_cut(model, i) is not None]
    walk(model, "")
    return [n for n in names if _flat_index(model, n)[0] > 0]


def _flat_index(model: nn.Module, name: str) -> Tuple[int, List[Tuple[str, nn.Module]]]:
    """Expands the chain along ``name``'s path; returns the position of ``name`` in the expanded chain."""
    items = [(n, m) for n, m in chain(model)]
    while True:
        for i, (n, m) in enumerate(items):
            if n == name:
                return i, items
            if name.startswith(n + ".") and (isinstance(m, nn.Sequential) or hasattr(m, "split_chain")):
                items = items[:i] + [(f"{n}.{c}", cm) for c, cm in chain(m)] + items[i + 1:]
                break
        else:
            raise ValueError(f"split: no module named {name!r} where the model can be cut; expected one of "
                             f"{', '.join(split_points(model)[:40])}")


def split_spec(value: Union[int, str]) -> Union[int, str]:
    """A split as given on a command line or in a message: a layer index (``4``, ``"4"``) or a dotted module
    name (``"features.7"``)."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer, str)):
        raise TypeError(f"split: expected a layer index or a module name, got {type(value).__name__}")
    if isinstance(value, str):
        if value.isdigit():
            return int(value)
        if not value or len(value) > 200 or not all(p.isidentifier() or p.isdigit() for p in value.split(".")):
            raise ValueError(f"split: {value!r} is neither a layer index nor a dotted module name")
        return value
    return int(value)


def split_model(model: nn.Module, index: Union[int, str]) -> Tuple[nn.Sequential, nn.Sequential]:
    """``(edge, cloud)``: the layers before and from ``index`` of ``model``, sharing the layers (and so the
    parameters) of ``model``; ``edge(x)`` fed to ``cloud`` computes exactly ``model(x)``.

    ``index`` is a position in the model's chain of layers (a ``Sequential``: ``model[:index]``,
    ``model[index:]``) or the dotted name of the module the cloud part starts with, at any depth of nested
    chains: ``"features.7"`` cuts a MobileNetV2 inside its ``features`` (see :func:`split_points`). Both parts
    are ``Sequential``s numbered from 0. Split before switching a part to INT8 (:func:`edgelearn.octo` inserts
    Compensation layers, which would shift the indices).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected an edgelearn.nn.Module, got {type(model).__name__}")
    index = split_spec(index)
    if isinstance(model, nn.GraphModule):
        return _split_graph(model, index)
    if isinstance(index, str):
        at, items = _flat_index(model, index)
        if at == 0:
            raise ValueError(f"split: {index!r} is the model's first layer; the edge part would be empty")
        return nn.Sequential(*[m for _, m in items[:at]]), nn.Sequential(*[m for _, m in items[at:]])
    items = [m for _, m in chain(model)]
    if not 1 <= index < len(items):
        raise ValueError(f"split: expected a layer index in [1, {len(items) - 1}] for a model of {len(items)} "
                         f"layers (edge = layers [0, split), cloud = layers [split, {len(items)})), got {index}")
    return nn.Sequential(*items[:index]), nn.Sequential(*items[index:])


def _graph_cut(graph: "nn.GraphModule", at: int) -> Optional[str]:
    """The one value crossing a cut of ``graph`` before node ``at`` (None when the cut is not a single tensor)."""
    before = {n[2] for n in graph.nodes[:at]}
    read_after = {v for n in graph.nodes[at:] for v in n[1]} | {graph.output}
    crossing = (before | set(graph.inputs)) & read_after
    if len(crossing) != 1 or next(iter(crossing)) in graph.inputs:
        return None
    return next(iter(crossing))


def _split_graph(graph: "nn.GraphModule", index: Union[int, str]) -> Tuple["nn.GraphModule", "nn.GraphModule"]:
    """A DAG (an ONNX import) cut before node ``index`` (its position, or its module's name): valid where
    exactly one value crosses the cut (not inside a residual block)."""
    names = [n[0] for n in graph.nodes]
    if isinstance(index, str):
        if index not in names:
            raise ValueError(f"split: no node named {index!r}; nodes where this graph can be cut: "
                             f"{', '.join(split_points(graph)[:40])}")
        at = names.index(index)
    else:
        at = index
        if not 1 <= at < len(names):
            raise ValueError(f"split: expected a node index in [1, {len(names) - 1}], got {index}")
    value = _graph_cut(graph, at)
    if at == 0 or value is None:
        raise ValueError(f"split: the graph cannot be cut before node {names[at]!r}: more than one value (or the "
                         f"input) crosses there; cut points: {', '.join(split_points(graph)[:40])}")
    modules = dict(graph.named_children())
    edge = nn.GraphModule(graph.inputs, value, [tuple(n) for n in graph.nodes[:at]],
                          {n[0]: modules[n[0]] for n in graph.nodes[:at]})
    cloud = nn.GraphModule([value], graph.output, [tuple(n) for n in graph.nodes[at:]],
                           {n[0]: modules[n[0]] for n in graph.nodes[at:]})
    return edge, cloud


def build_model_spec(spec: str, input_shape: Tuple[int, int, int], classes: int, seed: int = 0) -> nn.Module:
    """The model a collab cloud serves: a built-in or zoo name (see :func:`edgelearn.models.build_model`,
    initialised from ``seed``) or ``onnx:PATH``, an ONNX file imported by :func:`edgelearn.onnx.load` (its
    weights are the file's; it must take ``input_shape`` and give ``classes`` outputs)."""
    if isinstance(spec, str) and spec.startswith("onnx:"):
        from .. import onnx as elonnx

        model = elonnx.load(spec[len("onnx:"):])
        out = output_shape(model, tuple(input_shape))
        if out != (int(classes),):
            raise ValueError(f"model {spec}: for input {tuple(input_shape)} it gives outputs of shape {out}, "
                             f"expected ({classes},) for {classes} classes")
        return model
    manual_seed(seed)
    return build_model(spec, tuple(input_shape), int(classes))


def is_model_spec(spec: Any) -> bool:
    """Whether ``spec`` names a model :func:`build_model_spec` builds."""
    from ..models import MODEL_NAMES

    return isinstance(spec, str) and (spec in MODEL_NAMES or (spec.startswith("onnx:") and len(spec) > 5))


def build_split(model_name: str, input_shape: Tuple[int, int, int], classes: int, split: Union[int, str],
                seed: int = 0) -> Tuple[nn.Sequential, nn.Sequential]:
    """The reference model ``model_name`` (see :func:`edgelearn.models.build_model`) initialised from ``seed``
    and split at ``split``. Edge and cloud call this with the same arguments, so together they hold exactly
    the model an unsplit run would start from."""
    return split_model(build_model_spec(model_name, input_shape, classes, seed), split)


def join_parts(edge: nn.Sequential, cloud: nn.Sequential) -> nn.Sequential:
    """One ``Sequential`` running ``edge`` then ``cloud`` (sharing their layers): the whole split model, with
    state-dict names numbered as :func:`model_from_split_config` rebuilds them (the two parts' items, or the
    two parts themselves when they are graphs)."""
    if isinstance(edge, nn.Sequential) and isinstance(cloud, nn.Sequential):
        return nn.Sequential(*list(edge), *list(cloud))
    return nn.Sequential(edge, cloud)


def is_split_config(config) -> bool:
    """Whether a checkpoint's ``extra.config`` describes a model trained split (``join --save-full``)."""
    return isinstance(config, dict) and isinstance(config.get("split"), (int, str)) and config.get("collab") is True


def model_from_split_config(config, input_shape: Tuple[int, int, int], classes: int) -> nn.Sequential:
    """The (untrained) whole model a ``join --save-full`` checkpoint holds, from its ``extra.config``: the
    reference model ``config["model"]`` split at ``config["split"]``, the edge part switched to Octo INT8
    (with ``config["octo"]``) when ``config["precision"] == "int8"``, the cloud part FP32, joined again.
    Load the checkpoint's weights into it."""
    from ..octo import OctoConfig, octo

    edge, cloud = build_split(config["model"], tuple(input_shape), int(classes), config["split"],
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
