"""Hostile ONNX files: each one raises a named exception of edgelearn.onnx, never a crash, a hang or a huge
allocation."""

from __future__ import annotations

import os

import numpy as np
import pytest

onnx = pytest.importorskip("onnx", reason='needs the onnx extra: pip install "edgelearn[onnx]"')

from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from edgelearn import onnx as elonnx  # noqa: E402


def conv_model(nodes=None, inits=None, opset=17, inputs=None):
    nodes = nodes if nodes is not None else [
        helper.make_node("Conv", ["x", "w"], ["y"], kernel_shape=[3, 3], pads=[1, 1, 1, 1])]
    inits = inits if inits is not None else [numpy_helper.from_array(np.ones((4, 2, 3, 3), np.float32), "w")]
    inputs = inputs or [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 8, 8])]
    graph = helper.make_graph(nodes, "t", inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              initializer=inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def raw_tensor(name, dims, nbytes):
    t = TensorProto(name=name, data_type=TensorProto.FLOAT, dims=dims)
    t.raw_data = b"\0" * nbytes
    return t


def external_tensor(name, dims, location, offset=0, length=None):
    t = TensorProto(name=name, data_type=TensorProto.FLOAT, dims=dims)
    t.data_location = TensorProto.EXTERNAL
    entries = [("location", location), ("offset", str(offset))]
    if length is not None:
        entries.append(("length", str(length)))
    for k, v in entries:
        e = t.external_data.add()
        e.key, e.value = k, v
    return t


def test_valid_model_loads():  # the baseline every hostile case below departs from
    assert elonnx.load(conv_model().SerializeToString()) is not None


def test_empty_bytes():
    with pytest.raises(elonnx.OnnxFormatError):
        elonnx.load(b"")


def test_random_bytes():
    with pytest.raises(elonnx.OnnxFormatError):
        elonnx.load(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())


def test_truncated_file():
    data = conv_model().SerializeToString()
    with pytest.raises(elonnx.OnnxFormatError):
        elonnx.load(data[: len(data) // 2])


def test_huge_dims_are_refused_before_any_allocation():
    t = TensorProto(name="w", data_type=TensorProto.FLOAT, dims=[1 << 20, 1 << 20, 3, 3])
    with pytest.raises(elonnx.OnnxLimitError):
        elonnx.load(conv_model(inits=[t]).SerializeToString())


def test_initializer_bytes_do_not_match_its_shape():
    with pytest.raises(elonnx.InvalidInitializerError):
        elonnx.load(conv_model(inits=[raw_tensor("w", [4, 2, 3, 3], 4 * 2 * 3 * 3 * 4 - 8)]).SerializeToString())


def test_initializer_value_count_does_not_match_its_shape():
    t = TensorProto(name="w", data_type=TensorProto.FLOAT, dims=[4, 2, 3, 3])
    t.float_data.extend([1.0] * 10)
    with pytest.raises(elonnx.InvalidInitializerError):
        elonnx.load(conv_model(inits=[t]).SerializeToString())


def test_negative_dimension():
    with pytest.raises(elonnx.InvalidInitializerError):
        elonnx.load(conv_model(inits=[raw_tensor("w", [4, -2, 3, 3], 0)]).SerializeToString())


def test_cycle():
    nodes = [helper.make_node("Relu", ["x", "b"], ["a"]), helper.make_node("Relu", ["a"], ["b"]),
             helper.make_node("Relu", ["b"], ["y"])]
    with pytest.raises(elonnx.InvalidGraphError, match="cycle"):
        elonnx.load(conv_model(nodes=nodes, inits=[]).SerializeToString())


def test_dangling_input():
    nodes = [helper.make_node("Add", ["x", "nowhere"], ["y"])]
    with pytest.raises(elonnx.InvalidGraphError, match="dangling"):
        elonnx.load(conv_model(nodes=nodes, inits=[]).SerializeToString())


def test_value_written_twice():
    nodes = [helper.make_node("Relu", ["x"], ["a"]), helper.make_node("Relu", ["x"], ["a"]),
             helper.make_node("Relu", ["a"], ["y"])]
    with pytest.raises(elonnx.InvalidGraphError, match="twice"):
        elonnx.load(conv_model(nodes=nodes, inits=[]).SerializeToString())


def test_unknown_operator_names_node_op_and_supported_list():
    nodes = [helper.make_node("LSTM", ["x", "w"], ["y"], name="my_lstm")]
    with pytest.raises(elonnx.UnsupportedOperatorError) as info:
        elonnx.load(conv_model(nodes=nodes).SerializeToString())
    msg = str(info.value)
    assert "my_lstm" in msg and "LSTM" in msg and "Conv" in msg and "GlobalAveragePool" in msg
    assert info.value.op == "LSTM" and info.value.node == "my_lstm"


def test_custom_domain_operator():
    nodes = [helper.make_node("FusedConv", ["x", "w"], ["y"], domain="com.microsoft")]
    with pytest.raises(elonnx.UnsupportedOperatorError):
        elonnx.load(conv_model(nodes=nodes).SerializeToString())


def test_external_data_escaping_the_folder(tmp_path):
    secret = tmp_path / "secret.bin"
    secret.write_bytes(b"\0" * 288)
    inner = tmp_path / "model"
    inner.mkdir()
    path = inner / "m.onnx"
    onnx.save(conv_model(inits=[external_tensor("w", [4, 2, 3, 3], "../secret.bin")]), os.fspath(path))
    with pytest.raises(elonnx.ExternalDataError, match="leaves"):
        elonnx.load(path)


def test_external_data_absolute_path(tmp_path):
    path = tmp_path / "m.onnx"
    onnx.save(conv_model(inits=[external_tensor("w", [4, 2, 3, 3], "/etc/passwd")]), os.fspath(path))
    with pytest.raises(elonnx.ExternalDataError):
        elonnx.load(path)


def test_external_data_symlink_out_of_the_folder(tmp_path):
    outside = tmp_path / "outside.bin"
    outside.write_bytes(b"\0" * 288)
    inner = tmp_path / "model"
    inner.mkdir()
    os.symlink(outside, inner / "w.bin")
    path = inner / "m.onnx"
    onnx.save(conv_model(inits=[external_tensor("w", [4, 2, 3, 3], "w.bin")]), os.fspath(path))
    with pytest.raises(elonnx.ExternalDataError, match="leaves"):
        elonnx.load(path)


def test_external_data_range_past_the_end_of_its_file(tmp_path):
    (tmp_path / "w.bin").write_bytes(b"\0" * 100)
    path = tmp_path / "m.onnx"
    onnx.save(conv_model(inits=[external_tensor("w", [4, 2, 3, 3], "w.bin", offset=0)]), os.fspath(path))
    with pytest.raises(elonnx.ExternalDataError, match="past the end"):
        elonnx.load(path)


def test_external_data_length_disagrees_with_shape(tmp_path):
    (tmp_path / "w.bin").write_bytes(b"\0" * 4096)
    path = tmp_path / "m.onnx"
    onnx.save(conv_model(inits=[external_tensor("w", [4, 2, 3, 3], "w.bin", length=16)]), os.fspath(path))
    with pytest.raises(elonnx.ExternalDataError):
        elonnx.load(path)


def test_external_data_from_bytes_is_refused():
    with pytest.raises(elonnx.ExternalDataError):
        elonnx.load(conv_model(inits=[external_tensor("w", [4, 2, 3, 3], "w.bin")]).SerializeToString())


@pytest.mark.parametrize("attrs", [
    dict(kernel_shape=[3, 3], strides=[0, 0]),
    dict(kernel_shape=[3, 3], pads=[-1, 0, 0, 0]),
    dict(kernel_shape=[3, 3], pads=[1 << 40, 0, 0, 0]),
    dict(kernel_shape=[3, 3], group=0),
    dict(kernel_shape=[3, 3], group=3),
    dict(kernel_shape=[5, 5]),
    dict(kernel_shape=[3, 3], strides=[1, 1, 1]),
])
def test_absurd_conv_attributes(attrs):
    nodes = [helper.make_node("Conv", ["x", "w"], ["y"], **attrs)]
    with pytest.raises(elonnx.InvalidAttributeError):
        elonnx.load(conv_model(nodes=nodes).SerializeToString())


def test_weights_that_do_not_fit_the_input_channels():
    inits = [numpy_helper.from_array(np.ones((4, 5, 3, 3), np.float32), "w")]  # the input has 2 channels
    with pytest.raises(elonnx.InvalidGraphError, match="shapes"):
        elonnx.load(conv_model(inits=inits).SerializeToString())


def test_batchnorm_parameter_sizes_disagree():
    f = lambda n, k: numpy_helper.from_array(np.ones(k, np.float32), n)  # noqa: E731
    nodes = [helper.make_node("BatchNormalization", ["x", "s", "b", "m", "v"], ["y"])]
    with pytest.raises(elonnx.InvalidInitializerError):
        elonnx.load(conv_model(nodes=nodes, inits=[f("s", 2), f("b", 2), f("m", 3), f("v", 2)]).SerializeToString())


def test_dynamic_reshape_is_an_unsupported_variant():
    nodes = [helper.make_node("Shape", ["x"], ["s"]), helper.make_node("Reshape", ["x", "s"], ["y"])]
    with pytest.raises(elonnx.UnsupportedOperatorError):
        elonnx.load(conv_model(nodes=nodes, inits=[]).SerializeToString())


def test_opset_too_old():
    with pytest.raises(elonnx.UnsupportedModelError, match="opset"):
        elonnx.load(conv_model(opset=7).SerializeToString())


def test_two_graph_inputs():
    inputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [1, 2, 8, 8]) for n in ("x", "x2")]
    with pytest.raises(elonnx.UnsupportedModelError):
        elonnx.load(conv_model(inputs=inputs).SerializeToString())


def test_file_above_the_size_limit(tmp_path):
    path = tmp_path / "m.onnx"
    onnx.save(conv_model(), os.fspath(path))
    with pytest.raises(elonnx.OnnxLimitError):
        elonnx.load(path, limits=elonnx.Limits(max_file_bytes=64))


def test_more_nodes_than_the_limit():
    nodes = [helper.make_node("Relu", ["x"], ["a0"])] + [
        helper.make_node("Relu", [f"a{i}"], [f"a{i + 1}"]) for i in range(20)] + [
        helper.make_node("Relu", ["a20"], ["y"])]
    with pytest.raises(elonnx.OnnxLimitError):
        elonnx.load(conv_model(nodes=nodes, inits=[]).SerializeToString(), limits=elonnx.Limits(max_nodes=10))


def test_recursive_model_local_function():
    f = helper.make_function("local", "Loop1", ["a"], ["b"], [helper.make_node("Loop1", ["a"], ["b"], domain="local")],
                             opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("local", 1)])
    m = conv_model(nodes=[helper.make_node("Loop1", ["x"], ["y"], domain="local")], inits=[])
    m.functions.append(f)
    m.opset_import.append(helper.make_opsetid("local", 1))
    with pytest.raises(elonnx.InvalidGraphError, match="recursion"):
        elonnx.load(m.SerializeToString())


def test_every_error_is_a_value_error():
    for cls in (elonnx.OnnxFormatError, elonnx.OnnxLimitError, elonnx.InvalidGraphError,
                elonnx.InvalidInitializerError, elonnx.InvalidAttributeError, elonnx.ExternalDataError,
                elonnx.UnsupportedModelError, elonnx.UnsupportedOperatorError):
        assert issubclass(cls, elonnx.OnnxError) and issubclass(cls, ValueError)
