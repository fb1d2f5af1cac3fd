"""Fine-tuning a pretrained model on your own data: load it (ONNX file, zoo name or checkpoint), give it a new
classifier head for your classes, choose what trains (the sparse-update idea of tiny-training), train.

- :func:`load_pretrained` — ``.onnx`` (``edgelearn.onnx.load``), checkpoint (``edgelearn.checkpoint.load_model``)
  or a zoo name (``edgelearn.models``).
- :func:`replace_head` — the last Linear (the classifier) becomes a fresh ``Linear(in, classes)``.
- :func:`select_trainable` — ``head``, ``last:K``, ``bn+head`` or ``all``: sets ``requires_grad`` and returns the
  parameters to optimise. Frozen layers whose input needs no gradient either (the prefix before the first
  trainable layer) record nothing for backward and keep nothing for it (no int8 input codes, no BatchNorm
  copy, no ReLU mask; see ``edgelearn.functional._records``), and each of their activations is freed once the
  next layer consumed it; frozen BatchNorms keep their statistics (eval form), so no layer of the prefix mixes
  the images of a batch and the prefix runs in sub-batches (``edgelearn.nn.module.FROZEN_SUBBATCH``): the
  frozen prefix costs only its forward on a sub-batch. That is where ``last:K`` saves memory.

What does not live here: the training loop (``edgelearn.train.fit``), the command line (``edgelearn.cli``).
"""

from __future__ import annotations

import os
import re
from typing import Any, List, Optional, Tuple

from . import nn

__all__ = ["TRAIN_MODES", "calibrate_unfolded_batchnorm", "load_pretrained", "replace_head", "select_trainable", "weight_layer_groups"]

TRAIN_MODES = ("head", "last:K", "bn+head", "all")


def load_pretrained(source: str, *, unfold_batchnorm: bool = False,
                    image_shape: Optional[Tuple[int, int, int]] = None) -> Tuple[nn.Module, str]:
    """``(model, kind)`` from an ``.onnx`` file (kind ``"onnx"``), an edgelearn checkpoint (``"checkpoint"``) or a
    zoo model name (``"zoo"``: ``edgelearn.models.MODEL_NAMES``, built for ``image_shape`` (C, H, W) and randomly
    initialised, since no weights are downloaded here; its head is replaced anyway)."""
    from . import models

    src = os.fspath(source)
    if src.lower().endswith(".onnx"):
        from . import onnx as elonnx

        return elonnx.load(src, unfold_batchnorm=unfold_batchnorm), "onnx"
    if os.path.isfile(src):
        from .checkpoint import load_model

        return load_model(src)[0], "checkpoint"
    if src in models.MODEL_NAMES:
        if image_shape is None:
            raise ValueError(f"model {src!r}: a zoo model needs the image shape (C, H, W) to be built")
        return models.build_model(src, tuple(image_shape), 2), "zoo"
    raise FileNotFoundError(f"model: {src!r} is neither an .onnx file, a checkpoint file nor a zoo model name "
                            f"({', '.join(models.MODEL_NAMES)})")


def _parent_of(model: nn.Module, dotted: str) -> Tuple[nn.Module, str]:
    parent = model
    parts = dotted.split(".")
    for p in parts[:-1]:
        parent = parent._modules[p]
    return parent, parts[-1]


def find_head(model: nn.Module) -> Tuple[str, nn.Module]:
    """``(dotted name, layer)`` of the classifier: the last ``Linear`` in execution order (module registration
    order; topological order for an imported graph)."""
    found = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not found:
        raise ValueError("the model has no Linear layer to use as the classifier head")
    return found[-1]


def replace_head(model: nn.Module, num_classes: int) -> nn.Linear:
    """Replace the classifier head (see :func:`find_head`) with a fresh ``Linear(in_features, num_classes)`` (its
    Compensation too, in an INT8 model) and return the new layer. The rest keeps its pretrained weights."""
    if num_classes < 2:
        raise ValueError(f"num_classes: expected at least 2, got {num_classes}")
    name, old = find_head(model)
    new = nn.Linear(old.in_features, int(num_classes), bias=True)
    if old.int8 is not None:
        new.set_int8(old.int8, old.layer_id)
    parent, attr = _parent_of(model, name)
    items = list(parent._modules.items())
    pos = [k for k, _ in items].index(attr)
    setattr(parent, attr, new)
    if pos + 1 < len(items) and isinstance(items[pos + 1][1], nn.Compensation):
        comp = items[pos + 1][1]
        setattr(parent, items[pos + 1][0], nn.Compensation(int(num_classes), lam=comp.lam))
    return new


def weight_layer_groups(model: nn.Module) -> List[List[nn.Module]]:
    """The model's Conv2d/Linear layers in execution order, each with the parameterised layers that follow it
    before the next one (its BatchNorm, its Compensation)."""
    groups: List[List[nn.Module]] = []
    for _, m in model.named_modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            groups.append([m])
        elif any(p is not None for p in m._parameters.values()):
            if groups:
                groups[-1].append(m)
            else:
                groups.append([m])
    return groups


def select_trainable(model: nn.Module, mode: str) -> List[nn.Parameter]:
    """Set ``requires_grad`` by ``mode`` and return the trainable parameters.

    - ``all``: every parameter.
    - ``head``: the classifier head (and its Compensation).
    - ``last:K``: the head and the K Conv2d/Linear layers before it, each with its BatchNorm and Compensation.
    - ``bn+head``: the head, every BatchNorm and Compensation, and the biases of every conv/linear layer (for
      imported models whose BatchNorm the exporter folded into the convolutions, the biases are what is left
      of it).

    A BatchNorm none of whose parameters train is frozen whole (``BatchNorm2d.frozen``): it normalises with its
    running statistics in training mode too and does not update them, as a frozen layer of an inference graph
    (Keras' ``trainable=False``). So the frozen prefix treats each image on its own and runs in sub-batches
    (``edgelearn.nn.module.run_chain``).
    """
    groups = weight_layer_groups(model)
    _, head = find_head(model)
    head_index = next(i for i, g in enumerate(groups) if g[0] is head)
    trainable: set = set()
    m = re.fullmatch(r"last:(\d+)", mode.strip())
    if mode == "all":
        trainable = {id(p) for p in model.parameters()}
    elif mode == "head" or m:
        k = int(m.group(1)) if m else 0
        for g in groups[max(0, head_index - k):]:
            for layer in g:
                trainable.update(id(p) for p in layer.parameters())
    elif mode == "bn+head":
        for g in groups[head_index:]:
            for layer in g:
                trainable.update(id(p) for p in layer.parameters())
        for layer in model.modules():
            if isinstance(layer, (nn.BatchNorm2d, nn.Compensation)):
                trainable.update(id(p) for p in layer.parameters())
            elif isinstance(layer, (nn.Conv2d, nn.Linear)) and layer.bias is not None:
                trainable.add(id(layer.bias))
    else:
        raise ValueError(f"train: expected one of head, last:K (K >= 0), bn+head, all; got {mode!r}")
    params = []
    for p in model.parameters():
        p.requires_grad = id(p) in trainable
        p._node = None
        if p.requires_grad:
            params.append(p)
    for layer in model.modules():
        if isinstance(layer, nn.BatchNorm2d):
            # a frozen BatchNorm keeps its (pretrained) statistics too: it runs in eval form
            layer.frozen = not any(p.requires_grad for p in layer.parameters())
    return params


def describe_selection(model: nn.Module) -> Optional[dict]:
    """Counts of trainable and total parameters (elements)."""
    total = sum(p.data.size for p in model.parameters())
    trained = sum(p.data.size for p in model.parameters() if p.requires_grad)
    return {"trainable_parameters": int(trained), "total_parameters": int(total)}


def calibrate_unfolded_batchnorm(model: nn.Module, data: Any, *, batches: int = 8, batch_size: int = 64,
                                 seed: int = 0) -> int:
    """Give every BatchNorm that ``edgelearn.onnx.load(..., unfold_batchnorm=True)`` inserted the statistics of
    its input over ``batches`` batches of ``data`` (an ``ArrayDataset``, ``ImageFolder`` or ``DataLoader``), with
    ``weight = sqrt(var + eps)`` and ``bias = mean + (the conv bias it holds)``: the layer stays the identity
    (plus that bias) in eval mode, and in training mode starts as (nearly) the identity on batches like these,
    instead of rescaling the pretrained features. Returns the number of images used (0: nothing to calibrate)."""
    import numpy as np

    from .data import DataLoader
    from .tensor import no_grad, tensor

    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d) and getattr(m, "unfolded", False)]
    if not bns:
        return 0
    dataset = data.dataset if isinstance(data, DataLoader) else data
    n = min(len(dataset), batches * batch_size)
    idx = np.sort(np.random.default_rng(seed).choice(len(dataset), size=n, replace=False))
    sums = {id(bn): [0.0, 0.0, 0] for bn in bns}

    def recorder(bn: nn.BatchNorm2d):
        original = type(bn).forward

        def forward(x: Any) -> Any:
            xd = np.asarray(x.data if hasattr(x, "data") else x, np.float64)
            acc = sums[id(bn)]
            acc[0] = acc[0] + xd.sum(axis=(0, 2, 3))
            acc[1] = acc[1] + (xd * xd).sum(axis=(0, 2, 3))
            acc[2] += xd.size // xd.shape[1]
            return original(bn, x)

        return forward

    was_training = model.training
    model.eval()
    try:
        for bn in bns:
            object.__setattr__(bn, "forward", recorder(bn))
        with no_grad():
            for start in range(0, n, batch_size):
                chunk = idx[start:start + batch_size]
                x = dataset.load_batch(chunk) if hasattr(dataset, "load_batch") else dataset.images[chunk]
                model(tensor(np.ascontiguousarray(x)))
    finally:
        for bn in bns:
            bn.__dict__.pop("forward", None)
        model.train(was_training)
    for bn in bns:
        s1, s2, count = sums[id(bn)]
        mean = s1 / max(count, 1)
        var = np.maximum(s2 / max(count, 1) - mean * mean, 0.0)
        bias = bn.bias.data.astype(np.float64)
        bn.running_mean[...] = mean
        bn.running_var[...] = var
        bn.weight.data[...] = np.sqrt(var + bn.eps)
        bn.bias.data[...] = mean + bias
    return n
