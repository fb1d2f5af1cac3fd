"""Checkpoints: one ``.safetensors`` file holding every array, with the rest as JSON in its metadata header.

Layout of a checkpoint file (format version 1):

- tensors ``model/<name>`` — ``model.state_dict()`` (parameters and buffers such as BatchNorm running stats);
  tensors ``optimizer/...`` and ``scheduler/...`` — every numpy array found in those objects' ``state_dict()``.
- metadata key ``edgelearn.checkpoint`` — JSON: ``format``, ``epoch``, ``step``, ``rng_state``, ``extra``, the
  optimizer's and scheduler's state dicts with each array replaced by a reference to its tensor, and a SHA-256
  of all tensor bytes (safetensors checks its header but not the data; this catches flipped or zeroed bytes),
  and ``architecture``: the model's module tree (``edgelearn.nn.structure.describe``) when it can be described,
  so :func:`load_model` rebuilds the model from the file alone (imported ONNX graphs, fine-tuned heads, INT8).

Writes are atomic: the file is written to a temporary name in the same directory, fsync'ed, then ``os.replace``d
over the target (and the directory fsync'ed), so a process killed mid-write leaves the previous checkpoint intact.
The next save to the same path removes the temporary file such a kill left behind (one writer per path).
A corrupt or truncated checkpoint raises ``ValueError``; a missing one ``FileNotFoundError``.

What does not live here: deciding *when* to checkpoint (``edgelearn.train.fit``).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import tempfile
from typing import Any, Dict, Mapping, Optional, Tuple

import numpy as np

__all__ = [
    "CHECKPOINT_FORMAT",
    "get_rng_state",
    "load_checkpoint",
    "load_model",
    "read_checkpoint",
    "save_checkpoint",
    "set_rng_state",
]

CHECKPOINT_FORMAT = 1
_META_KEY = "edgelearn.checkpoint"


def _safetensors_numpy():
    try:
        import safetensors.numpy as stn
    except ImportError as exc:  # a core dependency; only a broken install gets here
        raise ImportError("checkpoints need safetensors: pip install safetensors") from exc
    return stn


# --------------------------------------------------------------------------------------------------------------
# State dicts of any shape <-> (JSON tree, flat dict of arrays)
#
# Optimizer and scheduler state dicts nest dicts (possibly keyed by ints), lists, tuples, scalars and arrays.
# JSON keeps the structure; arrays move to tensors. Non-string keys and tuples are tagged so they come back
# exactly as they went in.


def _contiguous(arr: np.ndarray) -> np.ndarray:
    # not np.ascontiguousarray: it turns 0-d arrays (BatchNorm's counters, quant_step) into shape (1,)
    return arr if arr.flags.c_contiguous else np.array(arr, order="C")


def _encode(obj: Any, prefix: str, tensors: Dict[str, np.ndarray]) -> Any:
    if isinstance(obj, np.ndarray):
        key = prefix
        tensors[key] = _contiguous(obj)
        return {"__tensor__": key}
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, dict):
        if all(isinstance(k, str) and not k.startswith("__") for k in obj):
            return {k: _encode(v, f"{prefix}/{k}", tensors) for k, v in obj.items()}
        return {"__items__": [[_encode(k, f"{prefix}/key{i}", tensors), _encode(v, f"{prefix}/{i}", tensors)]
                              for i, (k, v) in enumerate(obj.items())]}
    if isinstance(obj, tuple):
        return {"__tuple__": [_encode(v, f"{prefix}/{i}", tensors) for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [_encode(v, f"{prefix}/{i}", tensors) for i, v in enumerate(obj)]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    # A Tensor-like object (has .numpy()) is stored as its array.
    if hasattr(obj, "numpy") and callable(obj.numpy):
        return _encode(np.asarray(obj.numpy()), prefix, tensors)
    raise TypeError(f"checkpoint: cannot store {type(obj).__name__} at {prefix!r}")


def _decode(obj: Any, tensors: Mapping[str, np.ndarray]) -> Any:
    if isinstance(obj, list):
        return [_decode(v, tensors) for v in obj]
    if isinstance(obj, dict):
        if set(obj) == {"__tensor__"}:
            key = obj["__tensor__"]
            if key not in tensors:
                raise ValueError(f"checkpoint: metadata refers to missing tensor {key!r}")
            return tensors[key]
        if set(obj) == {"__tuple__"}:
            return tuple(_decode(v, tensors) for v in obj["__tuple__"])
        if set(obj) == {"__items__"}:
            return {_decode(k, tensors): _decode(v, tensors) for k, v in obj["__items__"]}
        return {k: _decode(v, tensors) for k, v in obj.items()}
    return obj


def _tensor_digest(tensors: Mapping[str, np.ndarray]) -> str:
    h = hashlib.sha256()
    for key in sorted(tensors):
        arr = _contiguous(np.asarray(tensors[key]))
        h.update(f"{key}\0{arr.dtype.str}\0{arr.shape}\0".encode())
        h.update(memoryview(arr).cast("B"))
    return h.hexdigest()


# --------------------------------------------------------------------------------------------------------------
# RNG state


def get_rng_state(**generators: np.random.Generator) -> Dict[str, Any]:
    """JSON-able state of Python's ``random``, NumPy's legacy global RNG and the named numpy ``Generator``s."""
    version, internal, gauss = random.getstate()
    legacy = np.random.get_state()
    state: Dict[str, Any] = {
        "python": [version, list(internal), gauss],
        "numpy_global": [legacy[0], legacy[1].tolist(), int(legacy[2]), int(legacy[3]), float(legacy[4])],
        "generators": {name: gen.bit_generator.state for name, gen in generators.items()},
    }
    return state


def set_rng_state(state: Mapping[str, Any], **generators: np.random.Generator) -> None:
    """Restore what :func:`get_rng_state` captured (each named generator must be of the same bit generator)."""
    if "python" in state:
        version, internal, gauss = state["python"]
        random.setstate((version, tuple(internal), gauss))
    if "numpy_global" in state:
        name, keys, pos, has_gauss, cached = state["numpy_global"]
        np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    saved = state.get("generators", {})
    for name, gen in generators.items():
        if name not in saved:
            raise ValueError(f"checkpoint: no RNG state saved for generator {name!r}")
        gen.bit_generator.state = saved[name]


# --------------------------------------------------------------------------------------------------------------
# Write / read


def _fsync_dir(directory: str) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return  # some filesystems / platforms cannot open a directory; the rename is still atomic
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _temp_prefix(name: str) -> str:
    return f".{name}."


def _remove_stale_temporaries(directory: str, name: str) -> None:
    """Delete what a writer killed mid-write left behind for this target (one writer per checkpoint path)."""
    prefix = _temp_prefix(name)
    try:
        entries = os.listdir(directory)
    except OSError:
        return
    for entry in entries:
        if entry.startswith(prefix) and entry.endswith(".tmp"):
            try:
                os.unlink(os.path.join(directory, entry))
            except OSError:
                pass


def save_checkpoint(
    path: "os.PathLike[str] | str",
    model: Any,
    optimizer: Any = None,
    scheduler: Any = None,
    *,
    epoch: int = 0,
    step: int = 0,
    rng_state: Optional[Mapping[str, Any]] = None,
    extra: Optional[Mapping[str, Any]] = None,
) -> None:
    """Write ``model`` (and optionally ``optimizer``/``scheduler`` state, counters, RNG state and any JSON-able
    ``extra``) to ``path`` atomically. ``model`` is anything with ``state_dict() -> {name: array}``.
    """
    stn = _safetensors_numpy()
    path = os.fspath(path)
    tensors: Dict[str, np.ndarray] = {}
    model_state = model.state_dict()
    for name, value in model_state.items():
        arr = value.numpy() if hasattr(value, "numpy") and not isinstance(value, np.ndarray) else value
        tensors[f"model/{name}"] = _contiguous(np.asarray(arr))
    meta: Dict[str, Any] = {
        "format": CHECKPOINT_FORMAT,
        "epoch": int(epoch),
        "step": int(step),
        "model_keys": list(model_state.keys()),
        "optimizer": _encode(optimizer.state_dict(), "optimizer", tensors) if optimizer is not None else None,
        "scheduler": _encode(scheduler.state_dict(), "scheduler", tensors) if scheduler is not None else None,
        "rng_state": _encode(dict(rng_state), "rng_state", tensors) if rng_state is not None else None,
        "extra": _encode(dict(extra), "extra", tensors) if extra is not None else None,
    }
    meta["architecture"] = _describe(model)
    meta["sha256"] = _tensor_digest(tensors)
    header = {_META_KEY: json.dumps(meta, allow_nan=True)}

    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    _remove_stale_temporaries(directory, os.path.basename(path))
    fd, tmp = tempfile.mkstemp(prefix=_temp_prefix(os.path.basename(path)), suffix=".tmp", dir=directory)
    os.close(fd)
    try:
        stn.save_file(tensors, tmp, metadata=header)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    _fsync_dir(directory)


def _describe(model: Any) -> Optional[Dict[str, Any]]:
    from .nn.module import Module
    from .nn.structure import StructureError, describe

    if not isinstance(model, Module):
        return None
    try:
        return describe(model)
    except StructureError:  # a model with attributes outside the describable set: state only
        return None


def read_checkpoint(path: "os.PathLike[str] | str") -> Tuple[Dict[str, np.ndarray], Dict[str, Any]]:
    """``(model_state_dict, meta)`` from a checkpoint file, validated; ``meta["optimizer"]`` and
    ``meta["scheduler"]`` are the decoded state dicts (or ``None``).
    """
    stn = _safetensors_numpy()
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        from safetensors import safe_open

        with safe_open(path, framework="numpy") as f:
            header = f.metadata() or {}
        tensors = stn.load_file(path)
    except Exception as exc:  # SafetensorError and friends: all mean "this file is not a valid checkpoint"
        raise ValueError(f"{path}: corrupt or truncated checkpoint: {exc}") from exc
    if _META_KEY not in header:
        raise ValueError(f"{path}: not an edgelearn checkpoint (no {_META_KEY!r} metadata)")
    try:
        meta = json.loads(header[_META_KEY])
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: corrupt checkpoint metadata: {exc}") from exc
    if not isinstance(meta, dict) or meta.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path}: unsupported checkpoint format {meta.get('format') if isinstance(meta, dict) else meta!r}"
                         f" (this edgelearn reads format {CHECKPOINT_FORMAT})")
    if meta.get("sha256") != _tensor_digest(tensors):
        raise ValueError(f"{path}: corrupt checkpoint: tensor data does not match its checksum")
    model_state = {k[len("model/"):]: v for k, v in tensors.items() if k.startswith("model/")}
    keys = meta.get("model_keys")
    if isinstance(keys, list) and set(keys) == set(model_state):
        model_state = {k: model_state[k] for k in keys}  # keep the model's own order
    for field in ("optimizer", "scheduler", "rng_state", "extra"):
        if meta.get(field) is not None:
            meta[field] = _decode(meta[field], tensors)
    return model_state, meta


def load_checkpoint(
    path: "os.PathLike[str] | str",
    model: Any,
    optimizer: Any = None,
    scheduler: Any = None,
    strict: bool = True,
) -> Dict[str, Any]:
    """Load a checkpoint into ``model`` (and ``optimizer``/``scheduler`` when given) and return its metadata:
    ``epoch``, ``step``, ``rng_state``, ``extra`` (restoring RNG state is the caller's choice, see
    :func:`set_rng_state`).
    """
    model_state, meta = read_checkpoint(path)
    model.load_state_dict(model_state, strict=strict)
    if optimizer is not None:
        if meta.get("optimizer") is None:
            raise ValueError(f"{os.fspath(path)}: checkpoint holds no optimizer state")
        optimizer.load_state_dict(meta["optimizer"])
    if scheduler is not None:
        if meta.get("scheduler") is None:
            raise ValueError(f"{os.fspath(path)}: checkpoint holds no scheduler state")
        scheduler.load_state_dict(meta["scheduler"])
    return meta


def load_model(path: "os.PathLike[str] | str") -> Tuple[Any, Dict[str, Any]]:
    """``(model, meta)``: the model a checkpoint holds, rebuilt from its stored architecture (see
    ``edgelearn.nn.structure``) with its weights, in eval mode. Raises ``ValueError`` for a checkpoint without an
    architecture (written by an edgelearn before it stored one: rebuild the model in code and use
    :func:`load_checkpoint`)."""
    from .nn.structure import rebuild

    model_state, meta = read_checkpoint(path)
    arch = meta.get("architecture")
    if not isinstance(arch, dict):
        raise ValueError(f"{os.fspath(path)}: the checkpoint holds no model architecture; build the model in code "
                         "and load its weights with load_checkpoint")
    model = rebuild(arch, model_state)
    model.load_state_dict(model_state, strict=True)
    model.eval()
    return model, meta
