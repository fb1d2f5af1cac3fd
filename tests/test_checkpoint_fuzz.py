"""Checkpoint fuzzing (Hypothesis, bounded): hostile metadata and tensors *with a valid checksum* (what a buggy
writer or an attacker produces; the checksum only catches accidents) and byte-level damage. Loading must either
succeed or raise ``CheckpointError`` -- never another exception, and a loaded scheduler must still step."""

import json
import math
import random

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.numpy import load_file, save_file

from edgelearn import Tensor, checkpoint, nn, optim
from edgelearn.checkpoint import CheckpointError, get_rng_state, load_checkpoint, save_checkpoint, set_rng_state

KEYS = ["__tensor__", "__tuple__", "__items__", "state", "param_groups", "params", "lr", "momentum", "T_max",
        "last_epoch", "base_lrs", "_last_lr", "python", "numpy_global", "generators", "config", "history", "x"]
LEAVES = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(allow_nan=True),
                   st.text(max_size=8), st.sampled_from(["model/weight", "optimizer/state/0/momentum_buffer"]))
JSON = st.recursive(LEAVES, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.sampled_from(KEYS), inner, max_size=4)), max_leaves=12)
FIELDS = ["format", "epoch", "step", "model_keys", "optimizer", "scheduler", "rng_state", "extra", "architecture"]
DTYPES = [np.float32, np.float64, np.float16, np.int32, np.int64, np.uint8, np.bool_]


def parts():
    model = nn.Linear(3, 2)
    opt = optim.SGD(list(model.parameters()), lr=0.1, momentum=0.9)
    sched = optim.CosineAnnealingLR(opt, T_max=4)
    return model, opt, sched


@pytest.fixture(scope="module")
def valid(tmp_path_factory):
    """(tensors, metadata dict) of a real checkpoint after one optimizer step."""
    model, opt, sched = parts()
    for p in model.parameters():
        p.grad = Tensor(np.ones_like(p.data))
    opt.step()
    sched.step()
    path = tmp_path_factory.mktemp("ck") / "valid.safetensors"
    save_checkpoint(path, model, opt, sched, epoch=1, step=1, rng_state=get_rng_state(),
                    extra={"config": {"model": "mlp"}, "history": []})
    from safetensors import safe_open

    with safe_open(str(path), "numpy") as f:
        meta = json.loads(f.metadata()[checkpoint._META_KEY])
    return load_file(str(path)), meta


def write(path, tensors, meta, fmt):
    if fmt == 1:
        meta = dict(meta, format=meta.get("format", 1) if meta.get("format") != 2 else 1,
                    sha256=checkpoint._tensor_digest(tensors))
        save_file(tensors, str(path), metadata={checkpoint._META_KEY: json.dumps(meta)})
    else:
        text = json.dumps(meta)
        save_file(tensors, str(path), metadata={checkpoint._META_KEY: text,
                                                checkpoint._SHA_KEY: checkpoint._tensor_digest(tensors, text)})


def load_all(path):
    """Load as `train --resume` does; returns normally or raises CheckpointError."""
    model, opt, sched = parts()
    meta = load_checkpoint(path, model, opt, sched)
    assert math.isfinite(sched.get_last_lr()[0])
    sched.step()  # a loaded scheduler must keep working
    if meta.get("rng_state"):
        saved = get_rng_state()
        try:
            set_rng_state(meta["rng_state"])
        finally:
            set_rng_state(saved)
    return meta


def nested_paths(obj, prefix=()):
    yield prefix
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from nested_paths(v, prefix + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from nested_paths(v, prefix + (i,))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                  HealthCheck.too_slow])
@given(data=st.data(), fmt=st.sampled_from([1, 2]))
def test_hostile_metadata_and_dtypes_load_or_raise_checkpoint_error(valid, tmp_path, data, fmt):
    tensors, meta = valid
    tensors = dict(tensors)
    meta = json.loads(json.dumps(meta))
    for _ in range(data.draw(st.integers(1, 3))):
        what = data.draw(st.sampled_from(["field", "nested", "dtype", "value"]))
        if what == "field":
            meta[data.draw(st.sampled_from(FIELDS))] = data.draw(JSON)
        elif what == "nested":
            paths = [p for p in nested_paths(meta) if p]
            path = data.draw(st.sampled_from(paths))
            node = meta
            for k in path[:-1]:
                node = node[k]
            node[path[-1]] = data.draw(JSON)
        elif what == "dtype":
            name = data.draw(st.sampled_from(sorted(tensors)))
            with np.errstate(invalid="ignore"):
                tensors[name] = tensors[name].astype(data.draw(st.sampled_from(DTYPES)))
        else:
            name = data.draw(st.sampled_from(sorted(tensors)))
            arr = np.array(tensors[name], copy=True)
            if arr.size and arr.dtype.kind == "f":
                arr.reshape(-1)[0] = data.draw(st.sampled_from([np.nan, np.inf, -np.inf, 1e30]))
            tensors[name] = arr
    path = tmp_path / f"fuzz{random.random()}.safetensors"
    write(path, tensors, meta, fmt)
    try:
        load_all(path)
    except CheckpointError:
        pass


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(cut=st.floats(0, 1), flips=st.lists(st.tuples(st.floats(0, 1), st.integers(0, 7)), max_size=3))
def test_damaged_bytes_load_or_raise_checkpoint_error(valid, tmp_path, cut, flips):
    tensors, meta = valid
    path = tmp_path / f"damaged{random.random()}.safetensors"
    write(path, tensors, meta, 2)
    blob = bytearray(path.read_bytes())
    for where, bit in flips:
        blob[int(where * (len(blob) - 1))] ^= 1 << bit
    if cut < 0.5:
        blob = blob[:int(cut * 2 * len(blob))]
    path.write_bytes(bytes(blob))
    try:
        load_all(path)
    except CheckpointError:
        pass
