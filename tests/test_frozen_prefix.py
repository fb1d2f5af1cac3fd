"""Sparse updates (``--train last:K``): the frozen prefix costs only its forward. Its layers record nothing in the
autograd graph and keep no saved state (no INT8 input codes, no BatchNorm int8 copy, no ReLU mask), and each of
its intermediates is freed once the next layer has consumed it. Checked on what is saved, not on timing."""

from __future__ import annotations

import gc

import numpy as np
import pytest

import edgelearn as el
from edgelearn import _native, models, nn
from edgelearn.finetune import select_trainable
from edgelearn.functional import cross_entropy
from edgelearn.tensor import Tensor, tensor


def graph_nodes(loss: Tensor) -> list:
    seen, stack, nodes = set(), [loss._node], []
    while stack:
        node = stack.pop()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        nodes.append(node)
        stack.extend(node.parents)
    return nodes


def saved_bytes(nodes: list, model: nn.Module) -> int:
    """Bytes the graph's backward closures hold (arrays other than the parameters themselves, and the INT8
    layers' saved codes)."""
    params = {id(p.data) for p in model.parameters()}
    total = 0
    for node in nodes:
        for cell in getattr(node.backward, "__closure__", None) or ():
            v = cell.cell_contents
            if isinstance(v, np.ndarray) and id(v) not in params:
                total += v.nbytes
            elif isinstance(v, _native.OctoSaved):
                total += v.nbytes
    return total


def spy(monkeypatch, name: str, calls: list) -> None:
    real = getattr(_native, name)

    def wrapped(*args, **kwargs):
        out = real(*args, **kwargs)
        calls.append(out)
        return out

    monkeypatch.setattr(_native, name, wrapped)


def resnet(precision: str) -> nn.Module:
    el.manual_seed(0)
    model = models.resnet20(5, 1)
    if precision == "int8":
        el.octo(model, el.OctoConfig(seed=0))
    return model.train()


@pytest.mark.parametrize("precision", ["int8", "fp32"])
def test_frozen_prefix_records_and_keeps_nothing(monkeypatch, precision):
    x = np.random.default_rng(0).random((4, 1, 16, 16), dtype=np.float32)
    y = np.arange(4) % 5
    full = resnet(precision)
    select_trainable(full, "all")
    all_nodes = graph_nodes(cross_entropy(full(tensor(x)), y))

    model = resnet(precision)
    select_trainable(model, "last:2")  # fc and the two convolutions of layer3.2, with their BN and LAC
    octo, quantized, masks = [], [], []
    spy(monkeypatch, "octo_forward", octo)
    spy(monkeypatch, "_quantize", quantized)  # BatchNorm's int8 saved input (of an input it may not overwrite)
    spy(monkeypatch, "batchnorm2d_forward_save_i8_", quantized)  # (of a donated input, normalised in place)
    spy(monkeypatch, "relu_forward_mask", masks)
    spy(monkeypatch, "relu_forward_mask_", masks)
    loss = cross_entropy(model(tensor(x)), y)
    nodes = graph_nodes(loss)
    names = sorted(n.name for n in nodes if n.leaf is None)
    leaves = {id(n.leaf) for n in nodes if n.leaf is not None}
    trainable = {id(p) for p in model.parameters() if p.requires_grad}

    # the graph is the trainable suffix only: its layers, the last block's add and ReLUs, the loss
    conv, lin = ("conv2d_int8", "linear_int8") if precision == "int8" else ("conv2d", "linear")
    expect = {"batch_norm2d": 2, conv: 2, lin: 1, "relu": 2, "add": 1, "cross_entropy": 1}
    assert {k: names.count(k) for k in expect} == expect, names
    assert leaves == trainable
    assert len(nodes) < len(all_nodes) / 5
    if precision == "int8":
        # every layer ran INT8, but only the three trainable ones keep their saved codes (held by the graph)
        assert len(octo) == 22  # 19 convolutions, 2 downsample convolutions, fc
        cells = [c.cell_contents for n in nodes for c in getattr(n.backward, "__closure__", None) or ()]
        held = [saved for _, saved in octo if any(v is saved for v in cells)]
        assert len(held) == 3
        # the other 19 are referenced by nothing but this test's spy (freed right after their forward)
        frozen = [out for out in octo if not any(v is out[1] for v in cells)]
        assert all(gc.get_referrers(out[1]) == [out] for out in frozen)
        # only the trainable BatchNorms quantize their input, only the last block's ReLUs make a mask
        assert len(quantized) == 2 and len(masks) == 2
        assert sum(s.nbytes for s in held) < saved_bytes(nodes, model)
    else:
        assert not quantized and not masks
    assert saved_bytes(nodes, model) < saved_bytes(all_nodes, full) / 5  # weights' int8 codes dominate here

    # backward reaches exactly the trainable parameters
    loss.backward()
    assert all((p.grad is not None) == p.requires_grad for p in model.parameters())


def test_nested_sequential_intermediates_are_freed_once_consumed():
    """A stage's input is not kept alive by the frame that called the stage: in a frozen chain, the stem's
    output is gone once the stage's first item has consumed it."""
    import weakref

    refs = []

    class Remember(nn.Module):  # keeps only a weak reference to its input, returns a fresh array
        def forward(self, x):
            refs.append(weakref.ref(x.data))
            return Tensor(x.data * 2)

    alive = []

    class Check(nn.Module):
        def forward(self, x):
            alive.append(refs[0]() is not None)
            return x

    el.manual_seed(0)
    stem = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU())
    model = nn.Sequential(stem, nn.Sequential(Remember(), Check()))
    el.octo(model, el.OctoConfig(seed=0))
    for p in model.parameters():
        p.requires_grad = False
    model.train()(tensor(np.ones((2, 1, 6, 6), np.float32)))
    assert alive == [False]


def test_release_scratch_gives_back_what_the_kernels_kept():
    """The kernels' per-thread scratch buffers keep the largest size a call needed (an evaluation at a big
    batch); ``fit`` frees them before each memory reference (``train.release_idle_memory``)."""
    el.manual_seed(0)
    conv = nn.Conv2d(16, 16, 3, padding=1)
    el.octo(conv, el.OctoConfig(seed=0))
    _native.release_scratch()
    conv(tensor(np.ones((8, 16, 12, 12), np.float32)))
    assert _native.release_scratch() > 0
    assert _native.release_scratch() == 0
