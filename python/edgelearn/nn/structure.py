"""A model's structure as plain JSON data, so a checkpoint can rebuild the model it holds without the code
that first built it (an imported ONNX graph, a fine-tuned zoo model with a new head, an INT8 model with its
Compensation layers).

``describe(model)`` records, per module: its class (an ``edgelearn`` class), its plain attributes (numbers,
strings, tuples, lists, dicts of them, an ``OctoConfig``), the names of its parameters and buffers, and its
children. ``rebuild(description, state)`` makes the same tree again: classes are looked up only inside the
``edgelearn`` package and must be ``Module`` subclasses, no constructor runs, and every parameter and buffer
takes its array (and so its shape) from ``state``, the checkpoint's tensors, so nothing is sized by a field of
the description.

What does not live here: files (``edgelearn.checkpoint``).
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import Any, Dict, Mapping

import numpy as np

from .module import Module, Parameter

__all__ = ["StructureError", "describe", "rebuild"]

_MAX_DEPTH = 64


class StructureError(ValueError):
    """A model that cannot be described, or a description that cannot be rebuilt."""


def _encode(value: Any, where: str) -> Any:
    from ..octo_config import OctoConfig

    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(value)
    if isinstance(value, tuple):
        return {"tuple": [_encode(v, where) for v in value]}
    if isinstance(value, list):
        return [_encode(v, where) for v in value]
    if isinstance(value, dict) and all(isinstance(k, str) for k in value):
        return {"dict": {k: _encode(v, where) for k, v in value.items()}}
    if isinstance(value, OctoConfig):
        return {"octo": dataclasses.asdict(value)}
    raise StructureError(f"{where}: cannot describe a {type(value).__name__} attribute")


def _decode(value: Any, where: str) -> Any:
    from ..octo_config import OctoConfig

    if isinstance(value, list):
        return [_decode(v, where) for v in value]
    if isinstance(value, dict):
        if set(value) == {"tuple"} and isinstance(value["tuple"], list):
            return tuple(_decode(v, where) for v in value["tuple"])
        if set(value) == {"dict"} and isinstance(value["dict"], dict):
            return {str(k): _decode(v, where) for k, v in value["dict"].items()}
        if set(value) == {"octo"} and isinstance(value["octo"], dict):
            try:
                return OctoConfig(**value["octo"])
            except TypeError as exc:
                raise StructureError(f"{where}: bad OctoConfig {value['octo']!r}") from exc
        raise StructureError(f"{where}: unknown encoded value {sorted(value)}")
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise StructureError(f"{where}: unexpected {type(value).__name__}")


def describe(model: Module, _path: str = "") -> Dict[str, Any]:
    """JSON-able description of ``model``'s module tree (see the module docstring)."""
    cls = type(model)
    if not isinstance(model, Module) or not cls.__module__.startswith("edgelearn."):
        raise StructureError(f"{_path or 'model'}: {cls.__module__}.{cls.__qualname__} is not an edgelearn module")
    attrs = {}
    for key, value in model.__dict__.items():
        if key.startswith("_") or key == "training":
            continue
        attrs[key] = _encode(value, f"{_path or 'model'}.{key}")
    return {
        "class": f"{cls.__module__}:{cls.__qualname__}",
        "attrs": attrs,
        "parameters": {k: v is not None for k, v in model._parameters.items()},
        "buffers": {k: v is not None for k, v in model._buffers.items()},
        "children": {k: (None if m is None else describe(m, f"{_path}.{k}" if _path else k))
                     for k, m in model._modules.items()},
    }


def _resolve(spec: Any, where: str) -> type:
    if not isinstance(spec, str) or ":" not in spec:
        raise StructureError(f"{where}: bad class reference {spec!r}")
    module_name, qualname = spec.split(":", 1)
    if not (module_name == "edgelearn" or module_name.startswith("edgelearn.")) or not all(
            part.isidentifier() for part in module_name.split(".") + qualname.split(".")):
        raise StructureError(f"{where}: class {spec!r} is not inside the edgelearn package")
    try:
        obj: Any = importlib.import_module(module_name)
        for part in qualname.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError) as exc:
        raise StructureError(f"{where}: class {spec!r} not found in this edgelearn") from exc
    if not isinstance(obj, type) or not issubclass(obj, Module):
        raise StructureError(f"{where}: {spec!r} is not a Module class")
    return obj


def rebuild(description: Mapping[str, Any], state: Mapping[str, np.ndarray], _prefix: str = "",
            _depth: int = 0) -> Module:
    """The module tree of ``description`` with parameters and buffers taken from ``state`` (dotted names)."""
    where = _prefix.rstrip(".") or "model"
    if _depth > _MAX_DEPTH or not isinstance(description, Mapping):
        raise StructureError(f"{where}: malformed or too deeply nested description")
    cls = _resolve(description.get("class"), where)
    module = cls.__new__(cls)
    Module.__init__(module)
    attrs = description.get("attrs") or {}
    if not isinstance(attrs, Mapping):
        raise StructureError(f"{where}: attrs must be a mapping")
    for key, value in attrs.items():
        if not isinstance(key, str) or key.startswith("_") or not key.isidentifier():
            raise StructureError(f"{where}: bad attribute name {key!r}")
        object.__setattr__(module, key, _decode(value, f"{where}.{key}"))
    for table, make in (("parameters", lambda a: Parameter(a)), ("buffers", lambda a: np.array(a, copy=True))):
        entries = description.get(table) or {}
        if not isinstance(entries, Mapping):
            raise StructureError(f"{where}: {table} must be a mapping")
        store = module._parameters if table == "parameters" else module._buffers
        for name, present in entries.items():
            if not present:
                store[str(name)] = None
                continue
            key = f"{_prefix}{name}"
            if key not in state:
                raise StructureError(f"{where}: no tensor {key!r} in the state for this {table[:-1]}")
            store[str(name)] = make(state[key])
    children = description.get("children") or {}
    if not isinstance(children, Mapping):
        raise StructureError(f"{where}: children must be a mapping")
    for name, child in children.items():
        if not isinstance(name, str) or not name or "." in name:
            raise StructureError(f"{where}: bad child name {name!r}")
        module._modules[name] = None if child is None else rebuild(child, state, f"{_prefix}{name}.", _depth + 1)
    return module
