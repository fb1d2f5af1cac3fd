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
    spy(monkeypatch, "relu_forward_mask", masks)  # (in place on a donated input: out=x)
    fused = []
    spy(monkeypatch, "batchnorm2d_relu_forward_save_i8_", fused)  # BatchNorm → ReLU as one op: codes and mask
    loss = cross_entropy(model(tensor(x)), y)
    nodes = graph_nodes(loss)
    names = sorted(n.name for n in nodes if n.leaf is None)
    leaves = {id(n.leaf) for n in nodes if n.leaf is not None}
    trainable = {id(p) for p in model.parameters() if p.requires_grad}

    # the graph is the trainable suffix only: its layers, the last block's add and ReLUs, the loss
    conv, lin = ("conv2d_int8", "linear_int8") if precision == "int8" else ("conv2d", "linear")
    expect = {"batch_norm2d": 2, conv: 2, lin: 1, "relu": 2, "add": 1, "cross_entropy": 1}
    if precision == "int8":  # the block's first BatchNorm → ReLU runs as one op (F.batch_norm2d_relu)
        expect.update({"batch_norm2d": 1, "relu": 1, "batch_norm2d_relu": 1})
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
        assert len(quantized) + len(fused) == 2 and len(masks) + len(fused) == 2 and len(fused) == 1
        assert sum(s.nbytes for s in held) < saved_bytes(nodes, model)
    else:
        assert not quantized and not masks and not fused
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


def _convs_batch_sizes(monkeypatch) -> dict:
    """Records, per Conv2d, the batch sizes it was called with."""
    seen: dict = {}
    real = nn.Conv2d.forward

    def forward(self, x, compensation=None):
        seen.setdefault(id(self), []).append(x.shape[0])
        return real(self, x, compensation=compensation)

    monkeypatch.setattr(nn.Conv2d, "forward", forward)
    return seen


def assert_subbatches_change_nothing(monkeypatch, build, mode: str, x, y, subbatch: int):
    """One FP32 training step of ``build()`` with ``--train mode``, with the frozen part run in sub-batches of
    ``subbatch`` samples and in one pass: the same logits and gradients. Returns (batch sizes each Conv2d
    saw in the sub-batched step, that model)."""
    from edgelearn.nn import module as nn_module

    def step(size: int):
        monkeypatch.setattr(nn_module, "FROZEN_SUBBATCH", size)
        model = build()
        select_trainable(model, mode)
        logits = model(tensor(x))
        cross_entropy(logits, y).backward()
        return model, logits.numpy(), [p.grad.numpy().copy() for p in model.parameters() if p.requires_grad]

    _, whole, whole_grads = step(10**9)
    seen = _convs_batch_sizes(monkeypatch)
    model, out, grads = step(subbatch)
    np.testing.assert_allclose(out, whole, rtol=1e-5, atol=1e-6)
    assert len(grads) == len(whole_grads) > 0
    for g, w in zip(grads, whole_grads):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-6)
    return seen, model


def test_frozen_prefix_runs_in_subbatches_with_frozen_statistics(monkeypatch):
    """--train last:2: the frozen BatchNorms keep their running statistics (eval form), so the frozen prefix
    treats each image on its own and runs on sub-batches of at most FROZEN_SUBBATCH images; the trainable
    suffix sees the whole batch. In FP32 the result equals one pass over the batch."""
    from edgelearn.nn import module as nn_module
    from edgelearn.train import recalibrate_batchnorm

    x = np.random.default_rng(1).random((70, 1, 12, 12), dtype=np.float32)
    y = np.arange(70) % 5

    seen, model = assert_subbatches_change_nothing(monkeypatch, lambda: resnet("fp32"), "last:2", x, y, 32)
    convs = {id(m): m for m in model.modules() if isinstance(m, nn.Conv2d)}
    frozen = [k for k, m in convs.items() if not m.weight.requires_grad]
    assert len(frozen) == 19 and all(seen[k] == [32, 32, 6] for k in frozen)
    assert all(seen[k] == [70] for k in convs if k not in frozen)  # the two trainable ones

    bns = {n: m for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)}
    fresh = resnet("fp32")  # the statistics the frozen BatchNorms started from
    start = {n: m.running_mean.copy() for n, m in fresh.named_modules() if isinstance(m, nn.BatchNorm2d)}
    trainable_bns = {n for n, m in bns.items() if not m.frozen}
    assert trainable_bns == {"layer3.2.bn1", "layer3.2.bn2"}
    for n, m in bns.items():
        moved = not np.array_equal(m.running_mean, start[n])
        assert moved == (n in trainable_bns), n
        assert int(m.num_batches_tracked) == (1 if n in trainable_bns else 0), n
    recalibrate_batchnorm(model, (x, y), batches=1, batch_size=35)
    assert all(np.array_equal(m.running_mean, start[n]) for n, m in bns.items() if m.frozen)

    # training everything: BatchNorms use batch statistics and no layer is run in sub-batches
    seen.clear()
    monkeypatch.setattr(nn_module, "FROZEN_SUBBATCH", 32)
    full = resnet("int8")
    select_trainable(full, "all")
    cross_entropy(full(tensor(x)), y).backward()
    assert not any(m.frozen for m in full.modules() if isinstance(m, nn.BatchNorm2d))
    assert all(v == [70] for v in seen.values()) and len(seen) == 21


@pytest.mark.parametrize("precision", ["int8", "fp32"])
def test_frozen_prefix_peak_is_a_subbatch_working_set(monkeypatch, precision):
    """The memory ``--train last:2`` saves: the traced peak of a training step (forward and backward, batch 128)
    is about one full-batch activation of the first stage (int8; two in FP32, whose suffix keeps FP32 inputs);
    one pass of the frozen prefix over the whole batch holds about three (a residual block's input and its two
    convolutions' outputs)."""
    import tracemalloc

    from edgelearn.nn import module as nn_module

    x = np.random.default_rng(0).random((128, 1, 16, 16), dtype=np.float32)
    y = np.arange(128) % 5
    activation = 128 * 16 * 16 * 16 * 4  # (N, 16, H, W) float32

    def peak(subbatch: int) -> int:
        monkeypatch.setattr(nn_module, "FROZEN_SUBBATCH", subbatch)
        model = resnet(precision)
        select_trainable(model, "last:2")
        cross_entropy(model(tensor(x)), y).backward()  # warm-up: lazily built state is not what is measured
        tracemalloc.start()
        try:
            loss = cross_entropy(model(tensor(x)), y)
            loss.backward()
            del loss
            return tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()

    whole, sub = peak(10**9), peak(32)
    assert whole > 2.5 * activation, whole / activation  # what is saved: the prefix's full-batch working set
    assert sub < 0.6 * whole and sub < 2 * activation, (sub / activation, whole / activation)


def test_graph_module_runs_its_frozen_nodes_in_subbatches(monkeypatch):
    """An imported model (a GraphModule DAG: residual add, squeeze-excite Mul of two values) fine-tuned with
    --train last:1: the frozen nodes run on sub-batches, the values the trainable part reads are gathered for
    the whole batch, and in FP32 outputs and gradients equal one pass over the batch."""
    def build() -> nn.GraphModule:
        el.manual_seed(3)
        g = nn.GraphModule(["x"], "logits")
        g.add_node("c1", ["x"], "a", nn.Conv2d(2, 8, 3, padding=1))
        g.add_node("bn1", ["a"], "b", nn.BatchNorm2d(8))
        g.add_node("r1", ["b"], "c", nn.ReLU())
        g.add_node("c2", ["c"], "d", nn.Conv2d(8, 8, 3, padding=1))
        g.add_node("add", ["d", "c"], "e", nn.Add())
        g.add_node("pool", ["e"], "s", nn.GlobalAvgPool())
        g.add_node("gate", ["s"], "t", nn.Hardsigmoid())
        g.add_node("se", ["e", "t"], "f", nn.Mul())
        g.add_node("c3", ["f"], "h", nn.Conv2d(8, 8, 3, padding=1))
        g.add_node("res", ["h", "f"], "i", nn.Add())  # the trainable part also reads a frozen value
        g.add_node("gap", ["i"], "j", nn.GlobalAvgPool(keepdims=False))
        g.add_node("fc", ["j"], "logits", nn.Linear(8, 3))
        return g.train()

    x = np.random.default_rng(2).random((45, 2, 6, 6), dtype=np.float32)
    y = np.arange(45) % 3

    seen, model = assert_subbatches_change_nothing(monkeypatch, build, "last:1", x, y, 16)  # fc and c3
    assert seen[id(model.c1)] == seen[id(model.c2)] == [16, 16, 13]
    assert seen[id(model.c3)] == [45]
    assert sorted(model._frozen_nodes([tensor(x)])) == list(range(8))  # up to the squeeze-excite product
