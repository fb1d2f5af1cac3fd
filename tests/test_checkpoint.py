"""Checkpoints: exact round trips, RNG state, corrupt files, and a writer SIGKILLed mid-write."""

import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from collections import OrderedDict

import numpy as np
import pytest

from edgelearn.checkpoint import get_rng_state, load_checkpoint, read_checkpoint, save_checkpoint, set_rng_state


class FakeModel:
    """The part of the nn.Module API a checkpoint uses."""

    def __init__(self, **arrays):
        self.arrays = OrderedDict(arrays)

    def state_dict(self):
        return OrderedDict((k, v.copy()) for k, v in self.arrays.items())

    def load_state_dict(self, state, strict=True):
        if strict and set(state) != set(self.arrays):
            raise ValueError(f"keys differ: {sorted(state)} vs {sorted(self.arrays)}")
        for k, v in state.items():
            self.arrays[k] = np.array(v)


class FakeStateful:
    def __init__(self, state):
        self.state = state

    def state_dict(self):
        return self.state

    def load_state_dict(self, state):
        self.state = state


def optimizer_state(rng):
    # PyTorch's layout: int-keyed state, tuples among the hyper-parameters
    return {
        "state": {0: {"momentum_buffer": rng.standard_normal((3, 2)).astype(np.float32), "step": 7},
                  1: {"exp_avg": rng.standard_normal(4).astype(np.float32), "step": np.int64(7)}},
        "param_groups": [{"lr": 0.05, "betas": (0.9, 0.999), "nesterov": True, "params": [0, 1]}],
    }


def test_round_trip_model_optimizer_scheduler_and_meta(tmp_path, rng):
    model = FakeModel(**{"0.weight": rng.standard_normal((3, 2)).astype(np.float32),
                         "1.running_mean": rng.standard_normal(4).astype(np.float32),
                         "1.quant_step": np.array(12, dtype=np.int64)})
    opt = FakeStateful(optimizer_state(rng))
    sched = FakeStateful({"last_epoch": 3, "base_lrs": [0.05], "T_max": 10})
    path = tmp_path / "run.safetensors"
    save_checkpoint(path, model, opt, sched, epoch=3, step=120, rng_state={"a": [1, 2]},
                    extra={"history": [{"loss": 1.5}], "config": {"dataset": "digits"}})

    model2 = FakeModel(**{k: np.zeros_like(v) for k, v in model.arrays.items()})
    opt2, sched2 = FakeStateful(None), FakeStateful(None)
    meta = load_checkpoint(path, model2, opt2, sched2)
    for k, v in model.arrays.items():
        assert model2.arrays[k].dtype == v.dtype and model2.arrays[k].shape == v.shape  # 0-d stays 0-d
        np.testing.assert_array_equal(model2.arrays[k], v)
    assert list(model2.arrays) == list(model.arrays)
    assert meta["epoch"] == 3 and meta["step"] == 120 and meta["rng_state"] == {"a": [1, 2]}
    assert meta["extra"]["config"] == {"dataset": "digits"}
    s = opt2.state
    assert set(s["state"]) == {0, 1}  # int keys survive JSON
    np.testing.assert_array_equal(s["state"][0]["momentum_buffer"], opt.state["state"][0]["momentum_buffer"])
    assert s["state"][1]["step"] == 7
    assert s["param_groups"][0]["betas"] == (0.9, 0.999)  # tuples stay tuples
    assert sched2.state == sched.state


def test_rng_state_round_trip_restores_every_stream():
    gen = np.random.default_rng(5)
    state = get_rng_state(data=gen)
    expected = (random.random(), np.random.random(), gen.random())
    random.random(), np.random.random(), gen.random()
    set_rng_state(state, data=gen)
    assert (random.random(), np.random.random(), gen.random()) == expected


def test_rng_state_survives_a_checkpoint(tmp_path):
    gen = np.random.default_rng(9)
    gen.random(3)
    path = tmp_path / "c.safetensors"
    save_checkpoint(path, FakeModel(w=np.zeros(1, np.float32)), rng_state=get_rng_state(g=gen))
    expected = gen.random(4)
    fresh = np.random.default_rng(0)
    set_rng_state(read_checkpoint(path)[1]["rng_state"], g=fresh)
    np.testing.assert_array_equal(fresh.random(4), expected)


@pytest.fixture
def saved(tmp_path, rng):
    path = tmp_path / "c.safetensors"
    save_checkpoint(path, FakeModel(w=rng.standard_normal((64, 64)).astype(np.float32)), epoch=1)
    return path


def test_truncated_checkpoint_raises_value_error(saved):
    blob = saved.read_bytes()
    for cut in (0, 7, 100, len(blob) // 2, len(blob) - 1):
        saved.write_bytes(blob[:cut])
        with pytest.raises(ValueError, match="checkpoint"):
            read_checkpoint(saved)


def test_flipped_tensor_byte_fails_the_checksum(saved):
    blob = bytearray(saved.read_bytes())
    blob[-10] ^= 0xFF
    saved.write_bytes(bytes(blob))
    with pytest.raises(ValueError, match="checksum"):
        read_checkpoint(saved)


def test_garbage_and_foreign_files_raise_value_error(tmp_path):
    from safetensors.numpy import save_file

    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\xff" * 8 + b"not a header")
    with pytest.raises(ValueError):
        read_checkpoint(junk)
    foreign = tmp_path / "foreign.safetensors"
    save_file({"w": np.zeros(3, np.float32)}, str(foreign))
    with pytest.raises(ValueError, match="not an edgelearn checkpoint"):
        read_checkpoint(foreign)


def test_missing_checkpoint_raises_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError):
        read_checkpoint(tmp_path / "nope.safetensors")


def test_checkpoint_without_optimizer_state_refuses_to_load_one(tmp_path):
    path = tmp_path / "c.safetensors"
    save_checkpoint(path, FakeModel(w=np.zeros(2, np.float32)))
    with pytest.raises(ValueError, match="no optimizer state"):
        load_checkpoint(path, FakeModel(w=np.zeros(2, np.float32)), FakeStateful(None))


# A writer that saves a large checkpoint over and over; step k stores tensors filled with k. It says "writing k"
# when a write starts, so the parent can kill it at random moments inside the write.
WRITER = textwrap.dedent(
    """
    import sys, numpy as np
    import safetensors.numpy as stn
    from edgelearn import checkpoint as ck

    class Model:
        def __init__(self, k):
            self.k = k
        def state_dict(self):
            return {"big": np.full((4, 1 << 20), self.k, np.float32), "step": np.array(self.k, np.int64)}

    class Opt:
        def __init__(self, k):
            self.k = k
        def state_dict(self):
            return {"state": {0: {"buf": np.full(1 << 18, -self.k, np.float32)}}, "param_groups": [{"lr": 0.1}]}

    real_save = stn.save_file
    def announced_save(*args, **kw):
        print("writing", current, flush=True)
        return real_save(*args, **kw)
    stn.save_file = announced_save

    path, start = sys.argv[1], int(sys.argv[2])
    current = start
    while True:
        ck.save_checkpoint(path, Model(current), Opt(current), epoch=current, step=current)
        print("saved", current, flush=True)
        current += 1
    """
)


class Sink:
    def __init__(self):
        self.arrays = {}

    def state_dict(self):
        return self.arrays

    def load_state_dict(self, state, strict=True):
        self.arrays = dict(state)


def test_kill_during_checkpoint_write_keeps_previous_loadable(tmp_path):
    path = tmp_path / "ckpt.safetensors"
    script = tmp_path / "writer.py"
    script.write_text(WRITER)
    chooser = random.Random(1234)
    killed_mid_write = 0
    last_saved = -1
    next_start = 0
    for round_ in range(6):
        proc = subprocess.Popen([sys.executable, str(script), str(path), str(next_start)],
                                stdout=subprocess.PIPE, text=True)
        try:
            writes_to_see = chooser.randint(1, 3)
            seen = 0
            for line in proc.stdout:
                kind, k = line.split()
                if kind == "saved":
                    last_saved = int(k)
                elif kind == "writing":
                    seen += 1
                    if seen >= writes_to_see and last_saved >= 0:
                        time.sleep(chooser.uniform(0, 0.03))
                        break
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            # saves the writer finished while this loop slept (their lines are still in the pipe)
            for line in proc.stdout.read().splitlines():
                parts = line.split()
                if len(parts) == 2 and parts[0] == "saved":
                    last_saved = int(parts[1])
            proc.stdout.close()
        if any(n.endswith(".tmp") for n in os.listdir(tmp_path)):
            killed_mid_write += 1

        model, opt = Sink(), Sink()
        meta = load_checkpoint(path, model, opt)  # must never raise
        k = meta["step"]
        assert k >= last_saved, "the checkpoint went back past the last completed save"
        assert k <= last_saved + 1  # the write in flight may have completed before the kill
        assert meta["epoch"] == k and int(model.arrays["step"]) == k
        assert np.all(model.arrays["big"] == k)
        assert np.all(opt.arrays["state"][0]["buf"] == -k)
        next_start = k + 1
    assert killed_mid_write >= 1, "no kill landed inside a write: the test did not exercise what it should"
    # the next save cleans up what the killed writers left behind
    save_checkpoint(path, Sink())
    assert not [n for n in os.listdir(tmp_path) if n.endswith(".tmp")]
