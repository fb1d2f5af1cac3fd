"""A training run described by its settings (the ``edgelearn train`` flags): the model those settings build, the
rules for resuming a saved run, and the trained model rebuilt from a checkpoint.

A checkpoint written by ``edgelearn train --checkpoint`` stores the run's settings (``extra["config"]``) and what
the data looked like (``extra["config"]["data"]``: ``image_shape``, ``num_classes``, ``classes``), so the model can
be rebuilt without the dataset (``load_trained``) and a resumed run can refuse settings that would make it a
different run (``resume_settings``).

What does not live here: the training loop (``edgelearn.train``) and the file format (``edgelearn.checkpoint``).
"""

from __future__ import annotations

import json
import os
from typing import Any, Dict, Iterable, Mapping, NamedTuple, Optional, Tuple

__all__ = ["FREE_SETTINGS", "SettingConflict", "Trained", "build", "load_trained", "octo_config", "resume_settings"]

#: Settings a resumed run may change: where output goes and how it is shown, never what is trained.
FREE_SETTINGS = frozenset({
    "threads", "checkpoint", "resume", "overwrite", "log_csv", "log_json", "plot", "no_progress", "json",
    "compare", "func", "command", "data",
})


class SettingConflict(ValueError):
    """A flag given on resume contradicts the saved run's settings."""


def octo_config(settings: Mapping[str, Any]):
    """The :class:`edgelearn.OctoConfig` of an INT8 run's settings (None for FP32)."""
    from .octo import OctoConfig

    if settings.get("precision", "int8") != "int8":
        return None
    prc = None if settings.get("no_prc") or settings.get("prc") == "none" else settings.get("prc", "minmax")
    return OctoConfig(lac=not settings.get("no_lac", False), prc=prc, z=settings.get("prc_z", 2.576),
                      kappa=settings.get("prc_kappa", 0.95),
                      per_channel_weights=bool(settings.get("per_channel_weights", False)),
                      grad_rounding=settings.get("grad_rounding", "stochastic"), seed=int(settings.get("seed", 0)))


def build(settings: Mapping[str, Any], image_shape: Tuple[int, int, int], num_classes: int):
    """The model of a run: architecture ``settings["model"]`` for ``image_shape`` and ``num_classes``, seeded from
    ``settings["seed"]``, turned to Octo INT8 training when ``settings["precision"] == "int8"``."""
    from .models import build_model
    from .nn import manual_seed
    from .octo import octo

    manual_seed(int(settings.get("seed", 0)))
    name = settings.get("model", "cnn")
    # only mobilenet_v2 has a width multiplier (runs of other models stored the flag's value unused)
    width_mult = float(settings.get("width_mult", 1.0) or 1.0) if name == "mobilenet_v2" else 1.0
    model = build_model(name, tuple(image_shape), int(num_classes), width_mult=width_mult)
    config = octo_config(settings)
    if config is not None:
        octo(model, config)
    return model


def _canonical(value: Any) -> Any:
    return json.loads(json.dumps(value))


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _show(name: str, value: Any) -> str:
    if isinstance(value, bool):
        return _flag(name) if value else f"no {_flag(name)}"
    return f"{_flag(name)} {value}"


def resume_settings(saved: Mapping[str, Any], given: Mapping[str, Any], explicit: Iterable[str],
                    path: str = "the checkpoint") -> Dict[str, Any]:
    """The settings a resumed run continues with: the saved run's, with the free ones (output, threads) from
    ``given``. A setting the user gave explicitly (``explicit``) that differs from the saved one raises
    :class:`SettingConflict` naming the flag. Settings the saved run does not record (newer flags) keep the
    given value."""
    out = dict(given)
    explicit = set(explicit)
    for key, value in given.items():
        if key in FREE_SETTINGS or key not in saved:
            continue
        if key in explicit and _canonical(value) != _canonical(saved[key]):
            raise SettingConflict(
                f"{_show(key, value)} conflicts with the run saved in {path} ({_show(key, saved[key])}); "
                f"drop the flag to continue that run, or start a new one with --overwrite or another --checkpoint")
        out[key] = saved[key]
    return out


class Trained(NamedTuple):
    """A trained model rebuilt from a checkpoint (in eval mode) and what the checkpoint says about it."""

    model: Any
    settings: Dict[str, Any]
    image_shape: Tuple[int, int, int]
    classes: Tuple[str, ...]
    epoch: int


def load_trained(path: "os.PathLike[str] | str") -> Trained:
    """Rebuild the model a checkpoint holds, with its weights, in eval mode: from the module tree the checkpoint
    stores (``edgelearn.checkpoint.load_model``: any ``edgelearn train``/``finetune`` model), else from the run's
    settings (architecture, precision, LAC/PRC) or a split-trained model's config (``collab join --save-full``).
    The image shape and class names come from the settings (or, for old checkpoints, the dataset they name)."""
    from . import checkpoint as ckpt
    from .collab.split import is_split_config, model_from_split_config

    path = os.fspath(path)
    state, meta = ckpt.read_checkpoint(path)
    settings = dict((meta.get("extra") or {}).get("config") or {})
    data = settings.get("data") or {}
    image_shape = data.get("image_shape") or settings.get("image_shape")
    classes = tuple(data.get("classes") or settings.get("classes") or ())
    num_classes = data.get("num_classes") or settings.get("num_classes") or len(classes) or None
    if (image_shape is None or num_classes is None) and "dataset" in settings:
        from .data import get_dataset  # written before checkpoints recorded the data's shape: ask the dataset

        train = get_dataset(settings["dataset"], seed=int(settings.get("seed", 0))).train
        image_shape, classes, num_classes = train.image_shape, train.classes, train.num_classes
    if image_shape is None or num_classes is None:
        raise ValueError(f"{path}: the checkpoint records neither its input shape nor its dataset; it must come "
                         "from 'edgelearn train' or 'edgelearn finetune' (from Python, use load_checkpoint)")
    if len(classes) != int(num_classes):
        classes = tuple(str(i) for i in range(int(num_classes)))
    if isinstance(meta.get("architecture"), dict):
        model, _ = ckpt.load_model(path)
    elif is_split_config(settings):
        model = model_from_split_config(settings, tuple(image_shape), int(num_classes))
        ckpt.load_model_state(model, state, path)
    elif "model" in settings:
        model = build(settings, tuple(image_shape), int(num_classes))
        ckpt.load_model_state(model, state, path)
    else:
        raise ValueError(f"{path}: the checkpoint records no architecture; rebuild the model in code and use "
                         "load_checkpoint")
    return Trained(model.eval(), settings, tuple(int(v) for v in image_shape), classes, int(meta.get("epoch", 0)))


def read_settings(path: "os.PathLike[str] | str") -> Tuple[Dict[str, Any], int]:
    """``(settings, epoch)`` saved in a training checkpoint (settings empty if it records none)."""
    from . import checkpoint as ckpt

    _, meta = ckpt.read_checkpoint(path)
    return dict((meta.get("extra") or {}).get("config") or {}), int(meta.get("epoch", 0))


def data_info(train: Any) -> Dict[str, Any]:
    """What a checkpoint records about the data: enough to rebuild the model and name its classes."""
    return {"image_shape": list(train.image_shape), "num_classes": int(train.num_classes),
            "classes": list(train.classes)}


def explicit_dests(parser: Any, argv: Optional[list]) -> set:
    """Destinations of the options actually given in ``argv`` to ``parser`` (an argparse parser whose defaults
    are temporarily suppressed, so only what the user typed lands in the namespace)."""
    import argparse

    saved = [(a, a.default) for a in parser._actions]
    try:
        for action, _ in saved:
            action.default = argparse.SUPPRESS
        namespace, _ = parser.parse_known_args(argv)
    finally:
        for action, default in saved:
            action.default = default
    return set(vars(namespace))
