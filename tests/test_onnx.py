"""ONNX import (edgelearn vs ONNX Runtime on graphs built with onnx.helper), export round trips, and hostile
files. onnx and onnxruntime are in the test extra."""

from __future__ import annotations

import os

import numpy as np
import pytest

onnx = pytest.importorskip("onnx", reason='needs the onnx extra: pip install "edgelearn[onnx]"')
ort = pytest.importorskip("onnxruntime", reason='needs the onnx extra: pip install "edgelearn[onnx]"')

from onnx import TensorProto, helper, numpy_helper  # noqa: E402

import edgelearn as el  # noqa: E402
from edgelearn import nn  # noqa: E402
from edgelearn import onnx as elonnx  # noqa: E402

RNG = np.random.default_rng(0)


def _grouped_conv_supported() -> bool:
    try:
        nn.Conv2d(4, 4, 3, groups=4)
    except ValueError:
        return False
    return True


# Grouped/depthwise convolution and the ReLU6/Hardswish/Sigmoid layers come with the real-architectures issue;
# until they land these cases are expected failures (strict: they must pass once the layers exist).
needs_issue_12_layers = pytest.mark.xfail(
    not (_grouped_conv_supported() and all(hasattr(nn, n) for n in ("ReLU6", "Hardswish", "Sigmoid"))),
    reason="grouped conv and ReLU6/Hardswish/Sigmoid layers not in this edgelearn yet", strict=True)


def rel_l2(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-12))


def init(name: str, arr: np.ndarray):
    return numpy_helper.from_array(np.asarray(arr), name)


def w(*shape: int, scale: float = 0.3) -> np.ndarray:
    return (RNG.standard_normal(shape) * scale).astype(np.float32)


def model_bytes(nodes, inits, in_shape, opset=17, out_shape=None) -> bytes:
    graph = helper.make_graph(
        nodes, "t", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(in_shape))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, out_shape)], initializer=inits)
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = 8
    return m.SerializeToString()


def ort_run(data, x: np.ndarray) -> np.ndarray:
    sess = ort.InferenceSession(data if isinstance(data, bytes) else os.fspath(data),
                                providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x})[0]


def el_run(model, x: np.ndarray) -> np.ndarray:
    model.eval()
    with el.no_grad():
        return model(el.tensor(x)).numpy()


def check_against_ort(data: bytes, in_shape, tol=1e-4) -> nn.Module:
    x = RNG.standard_normal(in_shape).astype(np.float32)
    expected = ort_run(data, x)
    model = elonnx.load(data)
    got = el_run(model, x)
    assert got.shape == expected.shape
    err = rel_l2(got, expected)
    assert err <= tol, f"relative L2 {err:.2e}"
    return model


def bn_inits(prefix: str, c: int):
    return [init(f"{prefix}.s", 1 + 0.1 * w(c)), init(f"{prefix}.b", w(c)), init(f"{prefix}.m", w(c)),
            init(f"{prefix}.v", (0.5 + RNG.random(c)).astype(np.float32))]


def bn(prefix: str, x: str, y: str):
    return helper.make_node("BatchNormalization", [x, f"{prefix}.s", f"{prefix}.b", f"{prefix}.m", f"{prefix}.v"], [y],
                            epsilon=1e-5)


# --- one graph per operator family ---------------------------------------------------------------------------


def test_conv_batchnorm_relu_maxpool_match_onnxruntime():
    nodes = [helper.make_node("Conv", ["x", "cw", "cb"], ["c"], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1]),
             bn("bn", "c", "b"), helper.make_node("Relu", ["b"], ["r"]),
             helper.make_node("MaxPool", ["r"], ["y"], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1])]
    inits = [init("cw", w(8, 3, 3, 3)), init("cb", w(8))] + bn_inits("bn", 8)
    model = check_against_ort(model_bytes(nodes, inits, [2, 3, 16, 16]), (2, 3, 16, 16))
    assert sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) == 1


def test_conv_asymmetric_pads_and_averagepool_match_onnxruntime():
    nodes = [helper.make_node("Conv", ["x", "cw"], ["c"], kernel_shape=[3, 3], pads=[0, 1, 2, 1]),
             helper.make_node("AveragePool", ["c"], ["y"], kernel_shape=[2, 2], strides=[2, 2])]
    check_against_ort(model_bytes(nodes, [init("cw", w(4, 2, 3, 3))], [1, 2, 9, 10]), (1, 2, 9, 10))


@needs_issue_12_layers
def test_depthwise_and_grouped_conv_with_relu6_match_onnxruntime():
    nodes = [helper.make_node("Conv", ["x", "dw", "db"], ["d"], kernel_shape=[3, 3], pads=[1, 1, 1, 1], group=8,
                              strides=[2, 2]),
             helper.make_node("Clip", ["d", "lo", "hi"], ["r"]),
             helper.make_node("Conv", ["r", "gw"], ["y"], kernel_shape=[1, 1], group=2)]
    inits = [init("dw", w(8, 1, 3, 3)), init("db", w(8)), init("gw", w(6, 4, 1, 1)),
             init("lo", np.float32(0.0)), init("hi", np.float32(6.0))]
    check_against_ort(model_bytes(nodes, inits, [2, 8, 10, 10]), (2, 8, 10, 10))


def test_gemm_and_matmul_add_match_onnxruntime():
    nodes = [helper.make_node("Flatten", ["x"], ["f"], axis=1),
             helper.make_node("Gemm", ["f", "g1", "gb"], ["h"], transB=1, alpha=0.5, beta=2.0),
             helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("MatMul", ["r", "m"], ["mm"]),
             helper.make_node("Add", ["mm", "mb"], ["y"])]
    inits = [init("g1", w(16, 48)), init("gb", w(16)), init("m", w(16, 5)), init("mb", w(5))]
    model = check_against_ort(model_bytes(nodes, inits, [3, 3, 4, 4]), (3, 3, 4, 4))
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert len(linears) == 2 and all(lin.bias is not None for lin in linears)  # the Add became the bias


@needs_issue_12_layers
def test_squeeze_excite_hardswish_hardsigmoid_sigmoid_mul_match_onnxruntime():
    nodes = [helper.make_node("Conv", ["x", "cw", "cb"], ["c"], kernel_shape=[1, 1]),
             helper.make_node("HardSwish", ["c"], ["h"]),
             helper.make_node("GlobalAveragePool", ["h"], ["p"]),
             helper.make_node("Conv", ["p", "s1", "s1b"], ["s"], kernel_shape=[1, 1]),
             helper.make_node("Relu", ["s"], ["sr"]),
             helper.make_node("Conv", ["sr", "s2", "s2b"], ["e"], kernel_shape=[1, 1]),
             helper.make_node("HardSigmoid", ["e"], ["g"], alpha=1 / 6, beta=0.5),
             helper.make_node("Mul", ["h", "g"], ["m"]),
             helper.make_node("Sigmoid", ["m"], ["sg"]),
             helper.make_node("HardSigmoid", ["sg"], ["y"])]  # ONNX's own defaults 0.2, 0.5
    inits = [init("cw", w(8, 4, 1, 1)), init("cb", w(8)), init("s1", w(2, 8, 1, 1)), init("s1b", w(2)),
             init("s2", w(8, 2, 1, 1)), init("s2b", w(8))]
    check_against_ort(model_bytes(nodes, inits, [2, 4, 6, 6]), (2, 4, 6, 6))


def test_concat_clip_mul_constant_identity_dropout_match_onnxruntime():
    nodes = [helper.make_node("Conv", ["x", "a"], ["ca"], kernel_shape=[1, 1]),
             helper.make_node("Conv", ["x", "b"], ["cb"], kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
             helper.make_node("Concat", ["ca", "cb"], ["cat"], axis=1),
             helper.make_node("Clip", ["cat", "lo", "hi"], ["cl"]),
             helper.make_node("Constant", [], ["k"], value=init("kv", w(1, 7, 1, 1))),
             helper.make_node("Mul", ["k", "cl"], ["m"]),
             helper.make_node("Identity", ["m"], ["i"]),
             helper.make_node("Dropout", ["i"], ["d"]),
             helper.make_node("Add", ["d", "i"], ["y"])]
    inits = [init("a", w(3, 3, 1, 1)), init("b", w(4, 3, 3, 3)), init("lo", np.float32(-0.5)),
             init("hi", np.float32(0.7))]
    check_against_ort(model_bytes(nodes, inits, [2, 3, 5, 5]), (2, 3, 5, 5))


@pytest.mark.parametrize("opset", [13, 18])
@pytest.mark.parametrize("keepdims", [0, 1])
def test_reduce_mean_over_hw_attribute_and_input_axes_match_onnxruntime(opset, keepdims):
    if opset >= 18:
        rm = helper.make_node("ReduceMean", ["x", "axes"], ["r"], keepdims=keepdims)
        inits = [init("axes", np.asarray([2, 3], np.int64))]
    else:
        rm = helper.make_node("ReduceMean", ["x"], ["r"], axes=[-2, -1], keepdims=keepdims)
        inits = []
    nodes = [rm, helper.make_node("Flatten", ["r"], ["y"])]
    check_against_ort(model_bytes(nodes, inits, [2, 5, 4, 3], opset=opset), (2, 5, 4, 3))


def test_reshape_with_constant_shape_and_exported_batch_size():
    nodes = [helper.make_node("Constant", [], ["shape"], value=init("s", np.asarray([2, -1], np.int64))),
             helper.make_node("Reshape", ["x", "shape"], ["f"]),
             helper.make_node("Gemm", ["f", "g"], ["y"], transB=1)]
    data = model_bytes(nodes, [init("g", w(3, 24))], [2, 2, 3, 4])
    model = check_against_ort(data, (2, 2, 3, 4))
    # the traced batch size (2) becomes "whatever batch comes in"
    assert el_run(model, np.ones((5, 2, 3, 4), np.float32)).shape == (5, 3)


def test_opset_11_model_with_dropout_ratio_attribute():
    nodes = [helper.make_node("Conv", ["x", "cw"], ["c"], kernel_shape=[3, 3]),
             helper.make_node("Clip", ["c", "lo", "hi"], ["r"]),
             helper.make_node("Dropout", ["r"], ["d"], ratio=0.3),
             helper.make_node("GlobalAveragePool", ["d"], ["y"])]
    inits = [init("cw", w(4, 2, 3, 3)), init("lo", np.float32(0)), init("hi", np.float32(6))]
    check_against_ort(model_bytes(nodes, inits, [1, 2, 6, 6], opset=11), (1, 2, 6, 6))


def inverted_residual_nodes(c: int, e: int):
    nodes = [helper.make_node("Conv", ["x", "e.w", "e.b"], ["e"], kernel_shape=[1, 1]),
             helper.make_node("Clip", ["e", "zero", "six"], ["e6"]),
             helper.make_node("Conv", ["e6", "d.w", "d.b"], ["d"], kernel_shape=[3, 3], pads=[1, 1, 1, 1], group=e),
             helper.make_node("Clip", ["d", "zero", "six"], ["d6"]),
             helper.make_node("Conv", ["d6", "p.w", "p.b"], ["p"], kernel_shape=[1, 1]),
             helper.make_node("Add", ["x", "p"], ["y"])]
    inits = [init("e.w", w(e, c, 1, 1)), init("e.b", w(e)), init("d.w", w(e, 1, 3, 3)), init("d.b", w(e)),
             init("p.w", w(c, e, 1, 1)), init("p.b", w(c)), init("zero", np.float32(0)), init("six", np.float32(6))]
    return nodes, inits


@needs_issue_12_layers
def test_mobilenet_v2_inverted_residual_block_matches_onnxruntime():
    nodes, inits = inverted_residual_nodes(8, 48)
    model = check_against_ort(model_bytes(nodes, inits, [2, 8, 7, 7]), (2, 8, 7, 7))
    assert any(getattr(m, "groups", 1) == 48 for m in model.modules())


def test_resnet_basic_block_with_downsample_matches_onnxruntime():
    nodes = [helper.make_node("Conv", ["x", "c1"], ["a"], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1]),
             bn("bn1", "a", "ab"), helper.make_node("Relu", ["ab"], ["ar"]),
             helper.make_node("Conv", ["ar", "c2"], ["b"], kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
             bn("bn2", "b", "bb"),
             helper.make_node("Conv", ["x", "ds"], ["s"], kernel_shape=[1, 1], strides=[2, 2]),
             bn("bn3", "s", "sb"),
             helper.make_node("Add", ["bb", "sb"], ["sum"]), helper.make_node("Relu", ["sum"], ["y"])]
    inits = [init("c1", w(8, 4, 3, 3)), init("c2", w(8, 8, 3, 3)), init("ds", w(8, 4, 1, 1))]
    inits += bn_inits("bn1", 8) + bn_inits("bn2", 8) + bn_inits("bn3", 8)
    check_against_ort(model_bytes(nodes, inits, [2, 4, 8, 8]), (2, 4, 8, 8))


@needs_issue_12_layers
def test_imported_graph_trains_int8_and_keeps_dag(tmp_path):
    nodes, inits = inverted_residual_nodes(4, 8)
    nodes += [helper.make_node("GlobalAveragePool", ["y"], ["g"]), helper.make_node("Flatten", ["g"], ["f"]),
              helper.make_node("Gemm", ["f", "fc.weight", "fc.bias"], ["out"], transB=1)]
    nodes[5].output[0] = "y"
    inits += [init("fc.weight", w(3, 4)), init("fc.bias", w(3))]
    graph = helper.make_graph(nodes, "t", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4, 6, 6])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, None)], initializer=inits)
    data = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()
    model = elonnx.load(data)
    assert "fc.weight" in dict(model.named_parameters())  # PyTorch-looking initializer names are kept
    el.octo(model)
    opt = el.optim.SGD(model.parameters(), lr=0.05)
    x = RNG.standard_normal((8, 4, 6, 6)).astype(np.float32)
    y = np.arange(8) % 3
    model.train()
    losses = []
    for _ in range(15):
        loss = el.functional.cross_entropy(model(el.tensor(x)), y)
        opt.zero_grad()
        (loss + model.regularization()).backward()
        opt.step()
        losses.append(float(loss.item()))
    assert losses[-1] < losses[0]


def test_external_data_beside_the_model_is_read(tmp_path):
    nodes = [helper.make_node("Conv", ["x", "cw", "cb"], ["y"], kernel_shape=[3, 3], pads=[1, 1, 1, 1])]
    inits = [init("cw", w(16, 8, 3, 3)), init("cb", w(16))]
    graph = helper.make_graph(nodes, "t", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8, 5, 5])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], initializer=inits)
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    path = tmp_path / "m.onnx"
    onnx.save_model(m, os.fspath(path), save_as_external_data=True, location="m.onnx.data", size_threshold=0)
    assert (tmp_path / "m.onnx.data").exists()
    x = RNG.standard_normal((1, 8, 5, 5)).astype(np.float32)
    assert rel_l2(el_run(elonnx.load(path), x), ort_run(path, x)) <= 1e-4
