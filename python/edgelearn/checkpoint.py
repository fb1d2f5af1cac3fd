"""Checkpoints: one ``.safetensors`` file holding every array, with the rest as JSON in its metadata header.

Layout of a checkpoint file (format version 2):

- tensors ``model/<name>`` — ``model.state_dict()`` (parameters and buffers such as BatchNorm running stats);
  tensors ``optimizer/...`` and ``scheduler/...`` — every numpy array found in those objects' ``state_dict()``.
- metadata key ``edgelearn.checkpoint`` — JSON: ``format``, ``epoch``, ``step``, ``model_keys``, ``rng_state``,
  ``extra``, the optimizer's and scheduler's state dicts with each array replaced by a reference to its tensor,
  and ``architecture``: the model's module tree (``edgelearn.nn.structure.describe``) when it can be described,
  so :func:`load_model` rebuilds the model from the file alone (imported ONNX graphs, fine-tuned heads, INT8).
- metadata key ``edgelearn.sha256`` — SHA-256 of every tensor (name, dtype, shape, bytes) and of the exact JSON
  text above (safetensors checks its header but not the data; this catches flipped or zeroed bytes anywhere).

Reading treats the file as hostile: the checksum is verified before the JSON is parsed, the JSON is parsed with
a nesting limit (:data:`MAX_METADATA_DEPTH`) and validated against the schema above, tensors must have exactly
the dtype of what they are loaded into (``float32`` for parameters, optimizer and scheduler arrays), and
non-finite values are refused unless ``allow_nonfinite=True``. Every malformed file raises
:class:`CheckpointError` (a ``ValueError``) naming the file and the key at fault; a missing one
``FileNotFoundError``.

Format 1 files (written before metadata was checksummed: ``sha256`` inside the JSON covers the tensors only)
still load, with the same parsing limits and validation; the next save writes format 2.

Writes are atomic: the file is written to a temporary name in the same directory, fsync'ed, then ``os.replace``d
over the target (and the directory fsync'ed), so a process killed mid-write leaves the previous checkpoint intact.
The next save to the same path removes the temporary file such a kill left behind (one writer per path).

What does not live here: deciding *when* to checkpoint (``edgelearn.train.fit``).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import tempfile
from typing import Any, Dict, List, Mapping, Optional, Tuple

import numpy as np

__all__ = [
    "CHECKPOINT_FORMAT",
    "CheckpointError",
    "MAX_METADATA_DEPTH",
    "get_rng_state",
    "load_checkpoint",
    "load_model",
    "read_checkpoint",
    "save_checkpoint",
    "set_rng_state",
]

CHECKPOINT_FORMAT = 2
_READABLE_FORMATS = (1, 2)
_META_KEY = "edgelearn.checkpoint"
_SHA_KEY = "edgelearn.sha256"
#: Deepest nesting of lists/dicts the metadata JSON may have (optimizer state dicts need about 8).
MAX_METADATA_DEPTH = 64


class CheckpointError(ValueError):
    """A checkpoint file is corrupt, truncated, of an unknown format, or holds a value that does not fit what it
    is loaded into; the message names the file and the key."""


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


def _tensor_digest(tensors: Mapping[str, np.ndarray], meta_json: Optional[str] = None) -> str:
    """SHA-256 of the tensors (format 1) and, from format 2 on, of the metadata's exact JSON text."""
    h = hashlib.sha256()
    for key in sorted(tensors):
        arr = _contiguous(np.asarray(tensors[key]))
        h.update(f"{key}\0{arr.dtype.str}\0{arr.shape}\0".encode())
        h.update(memoryview(arr).cast("B"))
    if meta_json is not None:
        h.update(b"\0metadata\0")
        h.update(meta_json.encode())
    return h.hexdigest()


# --------------------------------------------------------------------------------------------------------------
# Reading hostile metadata: nesting limit, then a schema


def _json_depth(text: str) -> int:
    """Deepest nesting of ``[``/``{`` in a JSON text (brackets inside strings do not count)."""
    depth = deepest = 0
    in_string = escaped = False
    for ch in text:
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif ch in "]}":
            depth -= 1
    return deepest


def _parse_metadata(text: str, where: str) -> Dict[str, Any]:
    depth = _json_depth(text)
    if depth > MAX_METADATA_DEPTH:
        raise CheckpointError(f"{where}: metadata nests {depth} levels deep (limit {MAX_METADATA_DEPTH}): "
                              "not a checkpoint edgelearn wrote")
    try:
        meta = json.loads(text)
    except (json.JSONDecodeError, RecursionError) as exc:
        raise CheckpointError(f"{where}: corrupt checkpoint metadata: {exc}") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"{where}: metadata must be a JSON object, got {type(meta).__name__}")
    return meta


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _check_tree(obj: Any, key: str, tensors: Mapping[str, np.ndarray], where: str) -> None:
    """The encoded form :func:`_encode` writes: JSON values, and dicts that are either plain (no ``__`` keys) or
    exactly one tag (``__tensor__`` naming a stored tensor, ``__tuple__`` a list, ``__items__`` pairs)."""
    if isinstance(obj, list):
        for i, v in enumerate(obj):
            _check_tree(v, f"{key}[{i}]", tensors, where)
    elif isinstance(obj, dict):
        tags = [k for k in obj if k.startswith("__")]
        if not tags:
            for k, v in obj.items():
                _check_tree(v, f"{key}.{k}", tensors, where)
            return
        if len(obj) != 1 or tags[0] not in ("__tensor__", "__tuple__", "__items__"):
            raise CheckpointError(f"{where}: {key}: unknown tagged value with keys {sorted(obj)[:5]}")
        tag, value = tags[0], obj[tags[0]]
        if tag == "__tensor__":
            if not isinstance(value, str) or value not in tensors:
                raise CheckpointError(f"{where}: {key}: refers to missing tensor {value!r}")
        elif tag == "__tuple__":
            if not isinstance(value, list):
                raise CheckpointError(f"{where}: {key}: a tuple must be stored as a list, got {type(value).__name__}")
            _check_tree(value, key, tensors, where)
        else:
            if not isinstance(value, list) or not all(isinstance(p, list) and len(p) == 2 for p in value):
                raise CheckpointError(f"{where}: {key}: dict items must be a list of [key, value] pairs")
            for i, (k, v) in enumerate(value):
                if isinstance(k, (list, dict)) and not (isinstance(k, dict) and set(k) == {"__tuple__"}):
                    raise CheckpointError(f"{where}: {key}: item {i} has an unhashable key")
                _check_tree(k, f"{key}.key{i}", tensors, where)
                _check_tree(v, f"{key}[{i}]", tensors, where)
    elif isinstance(obj, float) and not math.isfinite(obj) and not key.startswith(("rng_state", "extra")):
        raise CheckpointError(f"{where}: {key}: non-finite value {obj!r}")


def _validate_meta(meta: Dict[str, Any], tensors: Mapping[str, np.ndarray], where: str) -> None:
    fmt = meta.get("format")
    if not _is_int(fmt) or fmt not in _READABLE_FORMATS:
        raise CheckpointError(f"{where}: unsupported checkpoint format {fmt!r} (this edgelearn reads formats "
                              f"{', '.join(map(str, _READABLE_FORMATS))})")
    for key in ("epoch", "step"):
        v = meta.get(key)
        if not _is_int(v) or v < 0:
            raise CheckpointError(f"{where}: {key}: expected an integer >= 0, got {v!r}")
    arch = meta.get("architecture")
    if arch is not None and not isinstance(arch, dict):
        raise CheckpointError(f"{where}: architecture: expected an object (a module tree) or null, got "
                              f"{type(arch).__name__}")
    keys = meta.get("model_keys")
    if keys is not None and (not isinstance(keys, list) or not all(isinstance(k, str) for k in keys)):
        raise CheckpointError(f"{where}: model_keys: expected a list of names")
    for key in ("optimizer", "scheduler", "rng_state", "extra"):
        v = meta.get(key)
        if v is None:
            continue
        if not isinstance(v, dict):
            raise CheckpointError(f"{where}: {key}: expected an object (a state dict) or null, got {type(v).__name__}")
        _check_tree(v, key, tensors, where)
    opt = meta.get("optimizer")
    if opt is not None and not ({"state", "param_groups"} <= set(opt) and isinstance(opt["param_groups"], list)):
        raise CheckpointError(f"{where}: optimizer: expected 'state' and a list of 'param_groups'")
    extra = meta.get("extra")
    if extra is not None:
        if "config" in extra and not isinstance(extra["config"], dict):
            raise CheckpointError(f"{where}: extra.config: expected an object")
        if "history" in extra and not isinstance(extra["history"], list):
            raise CheckpointError(f"{where}: extra.history: expected a list")
    rng = meta.get("rng_state")
    if rng is not None:
        _check_rng_state(rng, where)


def _check_rng_state(state: Mapping[str, Any], where: str) -> None:
    """The shape :func:`get_rng_state` writes (the values are checked again when restored)."""
    py = state.get("python")
    if py is not None and not (isinstance(py, list) and len(py) == 3 and isinstance(py[1], list)
                               and all(_is_int(v) for v in py[1])):
        raise CheckpointError(f"{where}: rng_state.python: expected [version, [ints], gauss]")
    npg = state.get("numpy_global")
    if npg is not None and not (isinstance(npg, list) and len(npg) == 5 and isinstance(npg[0], str)
                                and isinstance(npg[1], list) and all(_is_int(v) for v in npg[1])):
        raise CheckpointError(f"{where}: rng_state.numpy_global: expected [name, [ints], pos, has_gauss, cached]")
    gens = state.get("generators")
    if gens is not None and not (isinstance(gens, dict) and all(isinstance(v, dict) for v in gens.values())):
        raise CheckpointError(f"{where}: rng_state.generators: expected an object of generator states")


def _check_values(name: str, arr: np.ndarray, where: str, allow_nonfinite: bool) -> None:
    if not allow_nonfinite and arr.dtype.kind == "f" and arr.size and not np.isfinite(arr).all():
        bad = int(np.flatnonzero(~np.isfinite(arr.reshape(-1)))[0])
        raise CheckpointError(f"{where}: tensor {name!r} holds a non-finite value ({arr.reshape(-1)[bad]!r} at "
                              f"flat index {bad}); pass allow_nonfinite=True to load it anyway")


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
    """Restore what :func:`get_rng_state` captured (each named generator must be of the same bit generator).
    A malformed state raises :class:`CheckpointError` naming the part at fault."""
    part = "rng_state"
    try:
        if "python" in state:
            part = "rng_state.python"
            version, internal, gauss = state["python"]
            random.setstate((version, tuple(internal), gauss))
        if "numpy_global" in state:
            part = "rng_state.numpy_global"
            name, keys, pos, has_gauss, cached = state["numpy_global"]
            np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
        saved = state.get("generators", {})
        for name, gen in generators.items():
            part = f"rng_state.generators.{name}"
            if name not in saved:
                raise CheckpointError(f"checkpoint: no RNG state saved for generator {name!r}")
            gen.bit_generator.state = saved[name]
    except CheckpointError:
        raise
    except (TypeError, ValueError, KeyError, IndexError, OverflowError) as exc:
        raise CheckpointError(f"checkpoint: {part}: not a valid RNG state ({exc})") from None


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
    text = json.dumps(meta, allow_nan=True)
    header = {_META_KEY: text, _SHA_KEY: _tensor_digest(tensors, text)}

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


def read_checkpoint(
    path: "os.PathLike[str] | str", *, allow_nonfinite: bool = False
) -> Tuple[Dict[str, np.ndarray], Dict[str, Any]]:
    """``(model_state_dict, meta)`` from a checkpoint file, validated (see the module doc);
    ``meta["optimizer"]`` and ``meta["scheduler"]`` are the decoded state dicts (or ``None``). Raises
    :class:`CheckpointError` for anything malformed, including non-finite tensor values unless
    ``allow_nonfinite``.
    """
    stn = _safetensors_numpy()
    path = os.fspath(path)
    if not os.path.isfile(path):
        if os.path.isdir(path):
            raise CheckpointError(f"{path}: is a directory, not a checkpoint file")
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        from safetensors import safe_open

        with safe_open(path, framework="numpy") as f:
            header = f.metadata() or {}
        tensors = stn.load_file(path)
    except Exception as exc:  # SafetensorError and friends: all mean "this file is not a valid checkpoint"
        raise CheckpointError(f"{path}: corrupt or truncated checkpoint: {exc}") from None
    if _META_KEY not in header:
        raise CheckpointError(f"{path}: not an edgelearn checkpoint (no {_META_KEY!r} metadata)")
    text = header[_META_KEY]
    if _SHA_KEY in header:  # format 2: the checksum covers the metadata too, so check it before parsing
        if header[_SHA_KEY] != _tensor_digest(tensors, text):
            raise CheckpointError(f"{path}: corrupt checkpoint: tensors or metadata do not match the checksum")
        meta = _parse_metadata(text, path)
        if meta.get("format") == 1:
            raise CheckpointError(f"{path}: format 1 metadata under a format 2 checksum")
    else:  # format 1: the checksum (inside the metadata) covers the tensors only
        meta = _parse_metadata(text, path)
        if meta.get("format") not in (None, 1) and _is_int(meta.get("format")):
            raise CheckpointError(f"{path}: format {meta.get('format')} checkpoint without its {_SHA_KEY!r} checksum")
        if meta.get("sha256") != _tensor_digest(tensors):
            raise CheckpointError(f"{path}: corrupt checkpoint: tensor data does not match its checksum")
    _validate_meta(meta, tensors, path)
    for name, arr in tensors.items():
        if not name.startswith("model/") and not name.startswith("rng_state/") and arr.dtype.kind == "f" \
                and arr.dtype != np.float32:
            raise CheckpointError(f"{path}: tensor {name!r} has dtype {arr.dtype}, expected float32")
        _check_values(name, arr, path, allow_nonfinite or name.startswith(("rng_state/", "extra/")))
    model_state = {k[len("model/"):]: v for k, v in tensors.items() if k.startswith("model/")}
    keys = meta.get("model_keys")
    if isinstance(keys, list) and set(keys) == set(model_state):
        model_state = {k: model_state[k] for k in keys}  # keep the model's own order
    for field in ("optimizer", "scheduler", "rng_state", "extra"):
        if meta.get(field) is not None:
            meta[field] = _decode(meta[field], tensors)
    return model_state, meta


def check_model_state(model: Any, state: Mapping[str, np.ndarray], where: str = "checkpoint") -> None:
    """Refuses (:class:`CheckpointError`) a stored tensor whose dtype is not exactly that of the model's array of
    the same name (``float32`` for parameters): loading would convert it silently (int to float, float64 to
    float32 with overflow to inf). Shapes and missing names are ``load_state_dict``'s to check."""
    own = model.state_dict()
    for name, arr in state.items():
        dst = own.get(name)
        if dst is None:
            continue
        dst = dst.numpy() if hasattr(dst, "numpy") and not isinstance(dst, np.ndarray) else dst
        want = np.asarray(dst).dtype
        if np.asarray(arr).dtype != want:
            raise CheckpointError(f"{where}: model tensor {name!r} has dtype {np.asarray(arr).dtype}, the model's is "
                                  f"{want}")


def load_model_state(model: Any, state: Mapping[str, np.ndarray], where: str, strict: bool = True) -> None:
    """``model.load_state_dict(state)`` for a state read from checkpoint ``where``: dtypes checked
    (:func:`check_model_state`), and a state that does not fit the model is a :class:`CheckpointError`."""
    check_model_state(model, state, where)
    try:
        model.load_state_dict(state, strict=strict)
    except (ValueError, TypeError, KeyError) as exc:
        raise CheckpointError(f"{where}: model state does not fit: {exc}") from None


def load_checkpoint(
    path: "os.PathLike[str] | str",
    model: Any,
    optimizer: Any = None,
    scheduler: Any = None,
    strict: bool = True,
    *,
    allow_nonfinite: bool = False,
) -> Dict[str, Any]:
    """Load a checkpoint into ``model`` (and ``optimizer``/``scheduler`` when given) and return its metadata:
    ``epoch``, ``step``, ``rng_state``, ``extra`` (restoring RNG state is the caller's choice, see
    :func:`set_rng_state`). Raises :class:`CheckpointError` (nothing loaded into the model) if the file is
    malformed, a tensor's dtype differs from the model's, a value is non-finite (unless ``allow_nonfinite``) or
    a state dict does not fit what it is loaded into.
    """
    where = os.fspath(path)
    model_state, meta = read_checkpoint(path, allow_nonfinite=allow_nonfinite)
    check_model_state(model, model_state, where)
    if optimizer is not None and meta.get("optimizer") is None:
        raise CheckpointError(f"{where}: checkpoint holds no optimizer state")
    if scheduler is not None and meta.get("scheduler") is None:
        raise CheckpointError(f"{where}: checkpoint holds no scheduler state")
    for what, target, value in (("model", model, model_state), ("optimizer", optimizer, meta.get("optimizer")),
                                ("scheduler", scheduler, meta.get("scheduler"))):
        if target is None:
            continue
        try:
            if what == "model":
                target.load_state_dict(value, strict=strict)
            else:
                target.load_state_dict(value)
        except CheckpointError:
            raise
        except (ValueError, TypeError, KeyError, IndexError, AttributeError) as exc:
            raise CheckpointError(f"{where}: {what} state does not fit: {exc}") from None
    return meta


def load_model(path: "os.PathLike[str] | str", *, allow_nonfinite: bool = False) -> Tuple[Any, Dict[str, Any]]:
    """``(model, meta)``: the model a checkpoint holds, rebuilt from its stored architecture (see
    ``edgelearn.nn.structure``) with its weights, in eval mode. Raises :class:`CheckpointError` for a
    checkpoint without an architecture (written by an edgelearn before it stored one: rebuild the model in code
    and use :func:`load_checkpoint`) or with one that does not rebuild or fit its weights."""
    from .nn.structure import rebuild

    where = os.fspath(path)
    model_state, meta = read_checkpoint(path, allow_nonfinite=allow_nonfinite)
    arch = meta.get("architecture")
    if not isinstance(arch, dict):
        raise CheckpointError(f"{where}: the checkpoint holds no model architecture; build the model in code "
                              "and load its weights with load_checkpoint")
    try:
        model = rebuild(arch, model_state)
    except CheckpointError:
        raise
    except (ValueError, TypeError, KeyError, IndexError, AttributeError, RecursionError) as exc:
        raise CheckpointError(f"{where}: architecture: does not rebuild a model: {exc}") from None
    load_model_state(model, model_state, where)
    model.eval()
    return model, meta
