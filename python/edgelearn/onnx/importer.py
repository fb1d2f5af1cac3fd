"""``load``: an ONNX model (CNN-class operators) as an edgelearn ``GraphModule`` that trains like any model.

The file is hostile until checked. ``onnx`` parses the protobuf (never a hand-written reader); everything the
model then says is checked before it is used: the file size, the node and tensor counts, every tensor's rank,
dimensions and element count against limits and against the bytes actually stored, external-data paths (they
must stay inside the model's folder) and ranges, every attribute an operator reads, the graph's wiring (no
cycles, no value read before anyone writes it, no value written twice). No buffer is sized by a field that was
not checked first. Problems raise the named exceptions of :mod:`edgelearn.onnx.errors`.

What does not live here: the layers (``edgelearn.nn``), writing ONNX (``edgelearn.onnx.exporter``).
"""

from __future__ import annotations

import os
import re
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from .. import nn
from ..nn.graph import Add, Clip, Concat, GlobalAvgPool, GraphModule, Hardsigmoid, Mul, Reshape, ZeroPad2d
from .errors import (
    ExternalDataError,
    InvalidAttributeError,
    InvalidGraphError,
    InvalidInitializerError,
    OnnxError,
    OnnxFormatError,
    OnnxLimitError,
    UnsupportedModelError,
    UnsupportedOperatorError,
)

__all__ = ["Limits", "SUPPORTED_OPS", "MIN_OPSET", "load"]

#: The oldest default-domain opset read (Clip's bounds became inputs in 11).
MIN_OPSET = 11

SUPPORTED_OPS = (
    "Add", "AveragePool", "BatchNormalization", "Clip", "Concat", "Constant", "Conv", "Dropout", "Flatten", "Gemm",
    "GlobalAveragePool", "HardSigmoid", "HardSwish", "Identity", "MatMul", "MaxPool", "Mul", "ReduceMean", "Relu",
    "Reshape", "Sigmoid",
)


@dataclass(frozen=True)
class Limits:
    """Upper bounds ``load`` enforces before trusting a model (raise :class:`OnnxLimitError` beyond them)."""

    max_file_bytes: int = 1 << 31          # protobuf's own 2 GiB ceiling
    max_external_bytes: int = 4 << 30      # all external weight data together
    max_tensor_elements: int = 1 << 28     # one initializer or constant (1 GiB of float32)
    max_total_elements: int = 1 << 30      # all of them together
    max_nodes: int = 100_000
    max_rank: int = 8
    max_kernel: int = 1024                 # kernel side, stride, padding, dilation
    max_channels: int = 1 << 20


def _onnx():
    try:
        import onnx
    except ImportError as exc:
        raise ImportError('ONNX import and export need the onnx package: pip install "edgelearn[onnx]"') from exc
    return onnx


# --------------------------------------------------------------------------------------------------------------
# Reading the bytes


def _read_model_bytes(source: Union[str, "os.PathLike[str]", bytes, bytearray, memoryview], limits: Limits
                      ) -> Tuple[bytes, Optional[str]]:
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
        if len(data) > limits.max_file_bytes:
            raise OnnxLimitError(f"model is {len(data)} bytes, more than the limit of {limits.max_file_bytes}")
        return data, None
    path = os.fspath(source)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"ONNX model not found: {path}")
    size = os.path.getsize(path)
    if size > limits.max_file_bytes:
        raise OnnxLimitError(f"{path}: {size} bytes, more than the limit of {limits.max_file_bytes}")
    with open(path, "rb") as f:
        data = f.read(limits.max_file_bytes + 1)
    if len(data) > limits.max_file_bytes:
        raise OnnxLimitError(f"{path}: grew past the limit of {limits.max_file_bytes} bytes while being read")
    return data, os.path.dirname(os.path.abspath(path))


def _parse(data: bytes) -> Any:
    onnx = _onnx()
    if not data:
        raise OnnxFormatError("empty input: not an ONNX model")
    model = onnx.ModelProto()
    try:
        model.ParseFromString(data)
    except Exception as exc:  # google.protobuf.message.DecodeError and friends: not a (whole) ModelProto
        raise OnnxFormatError(f"not an ONNX model (protobuf decoding failed: {exc}); truncated or corrupt file?") from exc
    if not model.HasField("graph") or len(model.graph.node) == 0:
        raise OnnxFormatError("not an ONNX model: no graph or an empty graph (truncated file?)")
    if model.ir_version <= 0:
        raise OnnxFormatError(f"not an ONNX model: ir_version {model.ir_version}")
    return model


def _default_opset(model: Any) -> int:
    onnx = _onnx()
    version = None
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx"):
            version = int(imp.version)
    newest = onnx.defs.onnx_opset_version()
    if version is None:
        raise UnsupportedModelError("the model imports no default-domain (ai.onnx) opset")
    if not MIN_OPSET <= version <= newest:
        raise UnsupportedModelError(f"opset {version}: edgelearn reads opsets {MIN_OPSET} to {newest}; "
                                    f"convert older models with onnx.version_converter")
    return version


# --------------------------------------------------------------------------------------------------------------
# Tensors


_DTYPES = {1: np.float32, 11: np.float64, 10: np.float16, 7: np.int64, 6: np.int32, 3: np.int8, 2: np.uint8,
           9: np.bool_}
# typed repeated fields a TensorProto may hold its values in, by data type
_TYPED_FIELDS = {1: "float_data", 11: "double_data", 7: "int64_data", 6: "int32_data", 3: "int32_data",
                 2: "int32_data", 9: "int32_data", 10: "int32_data"}


class _ExternalData:
    """Reads external tensor data from files inside ``base_dir`` only, each byte range checked first."""

    def __init__(self, base_dir: Optional[str], limits: Limits):
        self.base = None if base_dir is None else os.path.realpath(base_dir)
        self.limits = limits
        self.total = 0

    def read(self, tensor: Any, nbytes: int) -> bytes:
        entries = {e.key: e.value for e in tensor.external_data}
        name = tensor.name
        if self.base is None:
            raise ExternalDataError(f"tensor {name!r}: external data needs the model loaded from a file path, "
                                    "not bytes")
        location = entries.get("location", "")
        if not location or "\x00" in location or os.path.isabs(location) or location.startswith(("/", "\\")):
            raise ExternalDataError(f"tensor {name!r}: external data location {location!r} must be a relative path "
                                    "inside the model's folder")
        path = os.path.realpath(os.path.join(self.base, location))
        if os.path.commonpath([path, self.base]) != self.base:
            raise ExternalDataError(f"tensor {name!r}: external data location {location!r} leaves the model's folder")
        try:
            offset = int(entries.get("offset", "0"))
            length = int(entries["length"]) if "length" in entries else nbytes
        except ValueError as exc:
            raise ExternalDataError(f"tensor {name!r}: external data offset/length are not integers") from exc
        if offset < 0 or length != nbytes:
            raise ExternalDataError(f"tensor {name!r}: external data offset {offset}, length {length}; the tensor's "
                                    f"shape needs exactly {nbytes} bytes")
        if not os.path.isfile(path):
            raise ExternalDataError(f"tensor {name!r}: external data file {location!r} not found beside the model")
        size = os.path.getsize(path)
        if offset + length > size:
            raise ExternalDataError(f"tensor {name!r}: external data [{offset}, {offset + length}) runs past the end "
                                    f"of {location!r} ({size} bytes)")
        self.total += length
        if self.total > self.limits.max_external_bytes:
            raise OnnxLimitError(f"external data exceeds the limit of {self.limits.max_external_bytes} bytes")
        with open(path, "rb") as f:
            f.seek(offset)
            data = f.read(length)
        if len(data) != length:
            raise ExternalDataError(f"tensor {name!r}: short read from {location!r}")
        return data


class _Budget:
    def __init__(self, limits: Limits):
        self.limits = limits
        self.elements = 0

    def take(self, n: int, what: str) -> None:
        if n > self.limits.max_tensor_elements:
            raise OnnxLimitError(f"{what}: {n} elements, more than the limit of {self.limits.max_tensor_elements}")
        self.elements += n
        if self.elements > self.limits.max_total_elements:
            raise OnnxLimitError(f"tensors hold more than {self.limits.max_total_elements} elements in total")


def _tensor_to_array(t: Any, external: _ExternalData, budget: _Budget, limits: Limits) -> np.ndarray:
    """A checked copy of a TensorProto's values: shape and type validated, element count bounded, the stored
    byte or value count equal to what the shape needs, all before any buffer is allocated."""
    name = t.name or "<unnamed>"
    dims = list(t.dims)
    if len(dims) > limits.max_rank:
        raise InvalidInitializerError(f"tensor {name!r}: rank {len(dims)} above {limits.max_rank}")
    if any(d < 0 for d in dims):
        raise InvalidInitializerError(f"tensor {name!r}: negative dimension in {dims}")
    n = 1
    for d in dims:
        n *= int(d)
        if n > limits.max_tensor_elements:
            break
    budget.take(n, f"tensor {name!r} with dims {dims}")
    dtype = _DTYPES.get(int(t.data_type))
    if dtype is None:
        raise InvalidInitializerError(f"tensor {name!r}: data type {t.data_type} is not supported")
    if t.HasField("segment"):
        raise InvalidInitializerError(f"tensor {name!r}: segmented tensors are not supported")
    itemsize = np.dtype(dtype).itemsize
    if t.data_location == 1:  # EXTERNAL
        raw = external.read(t, n * itemsize)
        arr = np.frombuffer(raw, dtype=np.dtype(dtype).newbyteorder("<"))
    elif t.HasField("raw_data"):
        raw = t.raw_data
        if len(raw) != n * itemsize:
            raise InvalidInitializerError(f"tensor {name!r}: {len(raw)} bytes stored, shape {dims} of "
                                          f"{np.dtype(dtype).name} needs {n * itemsize}")
        arr = np.frombuffer(raw, dtype=np.dtype(dtype).newbyteorder("<"))
    else:
        field = _TYPED_FIELDS.get(int(t.data_type))
        values = getattr(t, field) if field else ()
        if len(values) != n:
            raise InvalidInitializerError(f"tensor {name!r}: {len(values)} values stored, shape {dims} needs {n}")
        if int(t.data_type) == 10:  # float16 values travel as their bit patterns in int32_data
            arr = np.asarray(values, dtype=np.uint16).view(np.float16)
        else:
            arr = np.asarray(values, dtype=dtype)
    arr = arr.reshape(dims).astype(dtype, copy=True)
    if arr.dtype.kind == "f":
        arr = arr.astype(np.float32, copy=False)
    return arr


# --------------------------------------------------------------------------------------------------------------
# Graph wiring


def _topological_nodes(graph: Any, available: set, limits: Limits) -> List[Any]:
    """Nodes in an order where each input is available before it is read; refuses cycles, dangling inputs and
    values written twice."""
    nodes = list(graph.node)
    if len(nodes) > limits.max_nodes:
        raise OnnxLimitError(f"{len(nodes)} nodes, more than the limit of {limits.max_nodes}")
    producer: Dict[str, int] = {}
    for i, node in enumerate(nodes):
        for out in node.output:
            if not out:
                continue
            if out in producer or out in available:
                raise InvalidGraphError(f"node {_node_name(node, i)!r}: value {out!r} is written twice")
            producer[out] = i
    waiting = [0] * len(nodes)
    readers: Dict[int, List[int]] = {}
    for i, node in enumerate(nodes):
        for inp in node.input:
            if not inp or inp in available:
                continue
            if inp not in producer:
                raise InvalidGraphError(f"node {_node_name(node, i)!r} ({node.op_type}): input {inp!r} is neither a "
                                        "graph input, an initializer nor any node's output (dangling input)")
            waiting[i] += 1
            readers.setdefault(producer[inp], []).append(i)
    ready = deque(i for i in range(len(nodes)) if waiting[i] == 0)
    order: List[int] = []
    while ready:
        i = ready.popleft()
        order.append(i)
        for j in readers.get(i, ()):
            waiting[j] -= 1
            if waiting[j] == 0:
                ready.append(j)
    if len(order) != len(nodes):
        stuck = [_node_name(nodes[i], i) for i in range(len(nodes)) if waiting[i] > 0][:5]
        raise InvalidGraphError(f"the graph has a cycle (nodes that wait on each other: {', '.join(stuck)})")
    return [nodes[i] for i in order]


def _node_name(node: Any, index: int) -> str:
    return node.name or f"{node.op_type}_{index}"


# --------------------------------------------------------------------------------------------------------------
# Attributes


class _Attrs:
    def __init__(self, node: Any, where: str, limits: Limits):
        self.where = where
        self.limits = limits
        self.values: Dict[str, Any] = {}
        onnx = _onnx()
        for a in node.attribute:
            if a.type == onnx.AttributeProto.INT:
                self.values[a.name] = int(a.i)
            elif a.type == onnx.AttributeProto.FLOAT:
                self.values[a.name] = float(a.f)
            elif a.type == onnx.AttributeProto.INTS:
                if len(a.ints) > 64:
                    raise InvalidAttributeError(f"{where}: attribute {a.name!r} has {len(a.ints)} values")
                self.values[a.name] = [int(v) for v in a.ints]
            elif a.type == onnx.AttributeProto.FLOATS:
                if len(a.floats) > 64:
                    raise InvalidAttributeError(f"{where}: attribute {a.name!r} has {len(a.floats)} values")
                self.values[a.name] = [float(v) for v in a.floats]
            elif a.type == onnx.AttributeProto.STRING:
                self.values[a.name] = a.s.decode("utf-8", "replace")
            elif a.type == onnx.AttributeProto.TENSOR:
                self.values[a.name] = a.t
            else:
                self.values[a.name] = a

    def int(self, name: str, default: int, lo: int, hi: int) -> int:
        v = self.values.get(name, default)
        if not isinstance(v, int) or not lo <= v <= hi:
            raise InvalidAttributeError(f"{self.where}: attribute {name}={v!r} outside [{lo}, {hi}]")
        return v

    def float(self, name: str, default: float) -> float:
        v = self.values.get(name, default)
        if not isinstance(v, float) or not np.isfinite(v):
            raise InvalidAttributeError(f"{self.where}: attribute {name}={v!r} is not a finite number")
        return v

    def ints(self, name: str, default: Optional[List[int]], length: int, lo: int, hi: int) -> List[int]:
        v = self.values.get(name, default)
        if v is None:
            raise InvalidAttributeError(f"{self.where}: attribute {name!r} is required")
        if not isinstance(v, list) or len(v) != length or any(not lo <= x <= hi for x in v):
            raise InvalidAttributeError(f"{self.where}: attribute {name}={v!r}: expected {length} integers in "
                                        f"[{lo}, {hi}]")
        return v

    def string(self, name: str, default: str) -> str:
        v = self.values.get(name, default)
        if not isinstance(v, str):
            raise InvalidAttributeError(f"{self.where}: attribute {name!r} is not a string")
        return v


# --------------------------------------------------------------------------------------------------------------
# The converter


class _Importer:
    def __init__(self, model: Any, base_dir: Optional[str], limits: Limits, unfold_batchnorm: bool):
        self.model = model
        self.graph = model.graph
        self.limits = limits
        self.opset = _default_opset(model)
        self.unfold_batchnorm = unfold_batchnorm
        self.external = _ExternalData(base_dir, limits)
        self.budget = _Budget(limits)
        self.consts: Dict[str, np.ndarray] = {}
        self.alias: Dict[str, str] = {}
        self.gm: Optional[GraphModule] = None
        self.used_names: set = set()
        self.consumers: Dict[str, List[Any]] = {}
        self.batch: Optional[int] = None
        self.producer_module: Dict[str, nn.Module] = {}
        self.current = ("", "")

    # --- values ---
    def value(self, name: str) -> str:
        while name in self.alias:
            name = self.alias[name]
        return name

    def unsupported(self, detail: str) -> UnsupportedOperatorError:
        node, op = self.current
        return UnsupportedOperatorError(node, op, SUPPORTED_OPS, detail)

    def const(self, name: str, where: str, what: str) -> np.ndarray:
        name = self.value(name)
        if name not in self.consts:
            raise self.unsupported(f"{what} must be a constant (initializer or Constant), not computed")
        return self.consts[name]

    def module_name(self, node: Any, index: int, weight: Optional[str] = None) -> str:
        base = weight[: -len(".weight")] if weight and weight.endswith(".weight") else (node.name or node.op_type)
        name = re.sub(r"[^0-9A-Za-z_]+", "_", base).strip("_") or node.op_type.lower()
        if name[0].isdigit():
            name = f"{node.op_type.lower()}_{name}"
        candidate, k = name, 1
        while candidate in self.used_names or hasattr(GraphModule, candidate) or candidate in (
                "inputs", "output", "nodes", "training"):
            k += 1
            candidate = f"{name}_{k}"
        self.used_names.add(candidate)
        return candidate

    def emit(self, node: Any, index: int, module: nn.Module, inputs: Sequence[str], output: str,
             weight: Optional[str] = None) -> None:
        assert self.gm is not None
        name = self.module_name(node, index, weight)
        self.gm.add_node(name, [self.value(i) for i in inputs], output, module=module)
        self.producer_module[output] = module

    # --- entry ---
    def run(self) -> GraphModule:
        graph = self.graph
        for t in graph.initializer:
            if not t.name:
                raise InvalidInitializerError("an initializer has no name")
            if t.name in self.consts:
                raise InvalidGraphError(f"initializer {t.name!r} is defined twice")
            self.consts[t.name] = _tensor_to_array(t, self.external, self.budget, self.limits)
        if len(graph.sparse_initializer):
            raise UnsupportedModelError("sparse initializers are not supported")
        inputs = [vi for vi in graph.input if vi.name not in self.consts]
        if len(inputs) != 1:
            raise UnsupportedModelError(f"expected one graph input (the image batch), found {len(inputs)}: "
                                        f"{[vi.name for vi in inputs]}")
        inp = inputs[0]
        ttype = inp.type.tensor_type if inp.type.HasField("tensor_type") else None
        if ttype is None or ttype.elem_type not in (1, 0):
            raise UnsupportedModelError(f"input {inp.name!r}: expected a float32 tensor")
        dims = list(ttype.shape.dim) if ttype.HasField("shape") else []
        if dims and dims[0].HasField("dim_value"):
            self.batch = int(dims[0].dim_value)
        self.input_shape = tuple(int(d.dim_value) if d.HasField("dim_value") and d.dim_value > 0 else None
                                 for d in dims)
        if len(graph.output) != 1:
            raise UnsupportedModelError(f"expected one graph output, found {len(graph.output)}")
        out_name = graph.output[0].name
        available = set(self.consts) | {inp.name}
        order = _topological_nodes(graph, available, self.limits)
        produced = {o for n in graph.node for o in n.output if o}
        if out_name not in produced and out_name not in available:
            raise InvalidGraphError(f"graph output {out_name!r} is not produced by any node")
        for n in order:
            for i in n.input:
                if i:
                    self.consumers.setdefault(i, []).append(n)
        self.gm = GraphModule([inp.name], out_name)
        for index, node in enumerate(order):
            self.convert(node, index)
        final = self.value(out_name)
        if final in self.consts:
            raise UnsupportedModelError("the graph's output is a constant (it does not depend on the input)")
        self.gm.output = final
        self.gm.nodes = [n for n in self.gm.nodes if self._needed(n, final)]  # drop nodes nothing reads
        object.__setattr__(self.gm, "_plan", None)
        for name in list(self.gm._modules):
            if name not in {n[0] for n in self.gm.nodes}:
                del self.gm._modules[name]
        return self.gm

    def _needed(self, node: List[Any], final: str) -> bool:
        if not hasattr(self, "_live"):
            live = {final}
            for name, ins, out in reversed(self.gm.nodes):
                if out in live:
                    live.update(ins)
            self._live = live
        return node[2] in self._live

    # --- nodes ---
    def convert(self, node: Any, index: int) -> None:
        op = node.op_type
        where = f"{_node_name(node, index)} ({op})"
        if node.domain not in ("", "ai.onnx"):
            raise UnsupportedOperatorError(_node_name(node, index), f"{node.domain}::{op}", SUPPORTED_OPS)
        handler = _HANDLERS.get(op)
        if handler is None:
            raise UnsupportedOperatorError(_node_name(node, index), op, SUPPORTED_OPS)
        self.current = (_node_name(node, index), op)
        attrs = _Attrs(node, where, self.limits)
        inputs = list(node.input)
        # a node whose inputs are all constants and that has a constant meaning is folded (Constant, Identity,
        # Reshape of a constant shape): it adds no layer
        handler(self, node, index, where, attrs, inputs)

    def single_output(self, node: Any, where: str) -> str:
        outs = [o for o in node.output]
        if not outs or not outs[0]:
            raise InvalidGraphError(f"{where}: no output")
        for extra in outs[1:]:
            if extra and extra in self.consumers:
                raise self.unsupported(f"its optional output {extra!r} is used")
        return outs[0]

    def activation(self, name: str, where: str) -> str:
        v = self.value(name)
        if v in self.consts:
            raise self.unsupported("a constant where an activation was expected")
        return v


# --- handlers ---------------------------------------------------------------------------------------------------

_HANDLERS: Dict[str, Callable[..., None]] = {}


def _handles(*ops: str):
    def register(fn):
        for op in ops:
            _HANDLERS[op] = fn
        return fn

    return register


def _require_inputs(inputs: List[str], lo: int, hi: int, where: str) -> None:
    if not lo <= len(inputs) <= hi or any(not inputs[i] for i in range(lo)):
        raise InvalidGraphError(f"{where}: expected {lo} to {hi} inputs, got {len(inputs)}")


def _optional(inputs: List[str], i: int) -> Optional[str]:
    return inputs[i] if len(inputs) > i and inputs[i] else None


def _pads_2d(attrs: _Attrs, lim: int, kernel: Sequence[int]) -> Tuple[int, int, int, int]:
    auto = attrs.string("auto_pad", "NOTSET")
    if auto not in ("NOTSET", "VALID"):
        raise InvalidAttributeError(f"{attrs.where}: auto_pad={auto!r} is not supported (export with explicit pads)")
    if auto == "VALID":
        return (0, 0, 0, 0)
    top, left, bottom, right = attrs.ints("pads", [0, 0, 0, 0], 4, 0, lim)
    return top, left, bottom, right


@_handles("Constant")
def _constant(imp: _Importer, node, index, where, attrs, inputs) -> None:
    out = imp.single_output(node, where)
    v = attrs.values
    if "value" in v:
        arr = _tensor_to_array(v["value"], imp.external, imp.budget, imp.limits)
    elif "value_float" in v:
        arr = np.asarray(attrs.float("value_float", 0.0), np.float32)
    elif "value_floats" in v:
        arr = np.asarray(v["value_floats"], np.float32)
    elif "value_int" in v:
        arr = np.asarray(v["value_int"], np.int64)
    elif "value_ints" in v:
        arr = np.asarray(v["value_ints"], np.int64)
    else:
        raise imp.unsupported(f"attributes {sorted(v)} (sparse or string constants)")
    imp.consts[out] = arr


@_handles("Identity", "Dropout")
def _identity(imp: _Importer, node, index, where, attrs, inputs) -> None:
    _require_inputs(inputs, 1, 3, where)
    out = imp.single_output(node, where)
    src = imp.value(inputs[0])
    ratio = 0.0
    if node.op_type == "Dropout":
        if imp.opset < 12:
            ratio = attrs.float("ratio", 0.5)
        elif _optional(inputs, 1):
            r = imp.const(inputs[1], where, "ratio")
            ratio = float(r.reshape(-1)[0]) if r.size == 1 else -1.0
        else:
            ratio = 0.5
        if _optional(inputs, 2):
            mode = imp.const(inputs[2], where, "training_mode")
            if mode.size != 1 or bool(mode.reshape(-1)[0]):
                raise imp.unsupported("training_mode=True")
        if not 0.0 <= ratio < 1.0:
            raise InvalidAttributeError(f"{where}: dropout ratio {ratio} outside [0, 1)")
    if src in imp.consts:
        imp.consts[out] = imp.consts[src]
    elif node.op_type == "Dropout" and ratio > 0.0:
        imp.emit(node, index, nn.Dropout(ratio, seed=index), [src], out)
    else:
        imp.alias[out] = src


@_handles("Conv")
def _conv(imp: _Importer, node, index, where, attrs, inputs) -> None:
    _require_inputs(inputs, 2, 3, where)
    out = imp.single_output(node, where)
    x = imp.activation(inputs[0], where)
    w = imp.const(inputs[1], where, "the weight")
    lim = imp.limits.max_kernel
    if w.ndim != 4:
        raise imp.unsupported(f"{w.ndim - 2}-D convolution (only 2-D is supported)")
    o, cg, kh, kw = (int(s) for s in w.shape)
    if min(o, cg, kh, kw) < 1 or max(kh, kw) > lim or o > imp.limits.max_channels:
        raise InvalidAttributeError(f"{where}: weight shape {w.shape} out of range")
    group = attrs.int("group", 1, 1, imp.limits.max_channels)
    if o % group:
        raise InvalidAttributeError(f"{where}: {o} output channels are not divisible into group={group}")
    if "kernel_shape" in attrs.values and attrs.ints("kernel_shape", None, 2, 1, lim) != [kh, kw]:
        raise InvalidAttributeError(f"{where}: kernel_shape {attrs.values['kernel_shape']} does not match the "
                                    f"weight's {[kh, kw]}")
    strides = attrs.ints("strides", [1, 1], 2, 1, lim)
    dilations = attrs.ints("dilations", [1, 1], 2, 1, lim)
    top, left, bottom, right = _pads_2d(attrs, lim, (kh, kw))
    if dilations != [1, 1]:
        raise imp.unsupported(f"dilations={dilations}")
    b_name = _optional(inputs, 2)
    b = imp.const(b_name, where, "the bias") if b_name else None
    if b is not None and b.shape != (o,):
        raise InvalidInitializerError(f"{where}: bias shape {b.shape}, expected ({o},)")
    src = x
    if (top, left) != (bottom, right):
        pad_out = f"{out}::pad"
        imp.emit(node, index, ZeroPad2d((left, right, top, bottom)), [src], pad_out)
        src, pad = pad_out, (0, 0)
    else:
        pad = (top, left)
    unfold = imp.unfold_batchnorm and not _feeds_batchnorm(imp, out)
    conv = nn.Conv2d(cg * group, o, (kh, kw), stride=tuple(strides), padding=pad,
                     bias=b is not None and not unfold, groups=group)
    conv.weight.data[...] = w
    if b is not None and not unfold:
        conv.bias.data[...] = b
    if unfold:
        conv_out = f"{out}::conv"
        imp.emit(node, index, conv, [src], conv_out, weight=inputs[1])
        bn = nn.BatchNorm2d(o)
        # identity in eval mode: (x - 0)/sqrt(1 - eps + eps)·1 + b
        bn.running_var[...] = 1.0 - bn.eps
        if b is not None:
            bn.bias.data[...] = b
        imp.emit(node, index, bn, [conv_out], out, weight=f"{inputs[1]}_bn.weight")
    else:
        imp.emit(node, index, conv, [src], out, weight=inputs[1])


def _feeds_batchnorm(imp: _Importer, value: str) -> bool:
    readers = imp.consumers.get(value, [])
    return len(readers) == 1 and readers[0].op_type == "BatchNormalization"


@_handles("Gemm")
def _gemm(imp: _Importer, node, index, where, attrs, inputs) -> None:
    _require_inputs(inputs, 2, 3, where)
    out = imp.single_output(node, where)
    x = imp.activation(inputs[0], where)
    b = imp.const(inputs[1], where, "operand B")
    if attrs.int("transA", 0, 0, 1):
        raise imp.unsupported("transA=1")
    trans_b = attrs.int("transB", 0, 0, 1)
    alpha, beta = attrs.float("alpha", 1.0), attrs.float("beta", 1.0)
    if b.ndim != 2:
        raise InvalidInitializerError(f"{where}: operand B has shape {b.shape}, expected 2-D")
    w = b if trans_b else b.T
    out_f, in_f = (int(s) for s in w.shape)
    if min(out_f, in_f) < 1:
        raise InvalidInitializerError(f"{where}: operand B has shape {b.shape}")
    c_name = _optional(inputs, 2)
    c = imp.const(c_name, where, "operand C") if c_name else None
    lin = nn.Linear(in_f, out_f, bias=c is not None)
    lin.weight.data[...] = alpha * w
    if c is not None:
        if c.size not in (1, out_f) or (c.ndim == 2 and c.shape[0] != 1) or c.ndim > 2:
            raise InvalidInitializerError(f"{where}: operand C has shape {c.shape}, expected ({out_f},)")
        lin.bias.data[...] = beta * np.broadcast_to(c.reshape(-1), (out_f,))
    imp.emit(node, index, lin, [x], out, weight=inputs[1])


@_handles("MatMul")
def _matmul(imp: _Importer, node, index, where, attrs, inputs) -> None:
    _require_inputs(inputs, 2, 2, where)
    out = imp.single_output(node, where)
    x = imp.activation(inputs[0], where)
    b = imp.const(inputs[1], where, "the second operand")
    if b.ndim != 2 or min(b.shape) < 1:
        raise imp.unsupported(f"a second operand of shape {b.shape} (only a 2-D weight is supported)")
    lin = nn.Linear(int(b.shape[0]), int(b.shape[1]), bias=False)
    lin.weight.data[...] = b.T
    imp.emit(node, index, lin, [x], out, weight=inputs[1])


@_handles("BatchNormalization")
def _batchnorm(imp: _Importer, node, index, where, attrs, inputs) -> None:
    _require_inputs(inputs, 5, 5, where)
    out = imp.single_output(node, where)
    x = imp.activation(inputs[0], where)
    if attrs.int("training_mode", 0, 0, 1):
        raise imp.unsupported("training_mode=1")
    eps = attrs.float("epsilon", 1e-5)
    momentum = attrs.float("momentum", 0.9)
    if not 0 < eps < 1 or not 0 <= momentum <= 1:
        raise InvalidAttributeError(f"{where}: epsilon={eps}, momentum={momentum} out of range")
    scale, bias, mean, var = (imp.const(inputs[i], where, n) for i, n in
                              ((1, "scale"), (2, "B"), (3, "input_mean"), (4, "input_var")))
    c = scale.size
    if any(a.shape != (c,) for a in (scale, bias, mean, var)) or c < 1:
        raise InvalidInitializerError(f"{where}: scale, B, mean and var must all have shape ({c},)")
    if (var < 0).any():
        raise InvalidInitializerError(f"{where}: negative variance")
    bn = nn.BatchNorm2d(c, eps=eps, momentum=1.0 - momentum)  # ONNX's momentum weighs the old statistics
    bn.weight.data[...] = scale
    bn.bias.data[...] = bias
    bn.running_mean[...] = mean
    bn.running_var[...] = var
    imp.emit(node, index, bn, [x], out, weight=inputs[1])


def _activation_layer(make: Callable[[], nn.Module]):
    def handler(imp: _Importer, node, index, where, attrs, inputs) -> None:
        _require_inputs(inputs, 1, 1, where)
        out = imp.single_output(node, where)
        imp.emit(node, index, make(), [imp.activation(inputs[0], where)], out)

    return handler


def _layer(name: str) -> Callable[[], nn.Module]:
    """A PyTorch-named layer of ``edgelearn.nn`` (looked up when used, so a missing one names itself)."""

    def make() -> nn.Module:
        cls = getattr(nn, name, None)
        if cls is None:
            raise UnsupportedModelError(f"this edgelearn has no nn.{name} layer yet")
        return cls()

    return make


_HANDLERS["Relu"] = _activation_layer(nn.ReLU)
_HANDLERS["Sigmoid"] = _activation_layer(_layer("Sigmoid"))
_HANDLERS["HardSwish"] = _activation_layer(_layer("Hardswish"))
_HANDLERS["GlobalAveragePool"] = _activation_layer(lambda: nn.AdaptiveAvgPool2d(1))


@_handles("HardSigmoid")
def _hardsigmoid(imp: _Importer, node, index, where, attrs, inputs) -> None:
    _require_inputs(inputs, 1, 1, where)
    out = imp.single_output(node, where)
    layer = Hardsigmoid(attrs.float("alpha", 0.2), attrs.float("beta", 0.5))
    imp.emit(node, index, layer, [imp.activation(inputs[0], where)], out)


@_handles("Clip")
def _clip(imp: _Importer, node, index, where, attrs, inputs) -> None:
    _require_inputs(inputs, 1, 3, where)
    out = imp.single_output(node, where)
    x = imp.activation(inputs[0], where)
    if imp.opset < 11:  # pragma: no cover (refused earlier); kept for clarity of the two forms
        lo, hi = attrs.float("min", -np.inf), attrs.float("max", np.inf)
    else:
        bounds = []
        for i, what in ((1, "min"), (2, "max")):
            name = _optional(inputs, i)
            if name is None:
                bounds.append(None)
                continue
            v = imp.const(name, where, what)
            if v.size != 1 or not np.isfinite(v).all():
                raise InvalidAttributeError(f"{where}: {what} must be one finite number, got shape {v.shape}")
            bounds.append(float(v.reshape(-1)[0]))
        lo, hi = bounds
    if lo is not None and hi is not None and lo > hi:
        raise InvalidAttributeError(f"{where}: min {lo} > max {hi}")
    if lo == 0.0 and hi is None:
        layer: nn.Module = nn.ReLU()
    elif lo == 0.0 and hi == 6.0 and hasattr(nn, "ReLU6"):
        layer = nn.ReLU6()
    else:
        layer = Clip(lo, hi)
    imp.emit(node, index, layer, [x], out)


@_handles("Add", "Mul")
def _binary(imp: _Importer, node, index, where, attrs, inputs) -> None:
    _require_inputs(inputs, 2, 2, where)
    out = imp.single_output(node, where)
    a, b = imp.value(inputs[0]), imp.value(inputs[1])
    cls = Add if node.op_type == "Add" else Mul
    if a in imp.consts and b in imp.consts:
        with np.errstate(all="ignore"):
            try:
                np.broadcast_shapes(imp.consts[a].shape, imp.consts[b].shape)
            except ValueError as exc:
                raise InvalidGraphError(f"{where}: operand shapes do not broadcast") from exc
            imp.consts[out] = (imp.consts[a] + imp.consts[b]) if cls is Add else (imp.consts[a] * imp.consts[b])
        return
    if a in imp.consts:
        a, b = b, a  # both ops commute
    if b in imp.consts:
        c = imp.consts[b].astype(np.float32)
        # MatMul + Add(bias): the bias joins the Linear the MatMul became
        lin = imp.producer_module.get(a)
        if (cls is Add and isinstance(lin, nn.Linear) and lin.bias is None and len(imp.consumers.get(a, [])) == 1
                and c.size == lin.out_features and (c.ndim == 1 or (c.ndim == 2 and c.shape[0] == 1))):
            lin.bias = nn.Parameter(c.reshape(-1).copy())
            imp.alias[out] = a
            return
        if c.ndim > imp.limits.max_rank:
            raise InvalidInitializerError(f"{where}: constant of rank {c.ndim}")
        imp.emit(node, index, cls(c), [a], out)
        return
    imp.emit(node, index, cls(), [a, b], out)


@_handles("Concat")
def _concat(imp: _Importer, node, index, where, attrs, inputs) -> None:
    if not inputs or any(not i for i in inputs):
        raise InvalidGraphError(f"{where}: expected at least one input")
    out = imp.single_output(node, where)
    axis = attrs.int("axis", 1, -imp.limits.max_rank, imp.limits.max_rank - 1)
    names = [imp.activation(i, where) for i in inputs]
    imp.emit(node, index, Concat(axis), names, out)


def _pool_common(imp: _Importer, node, index, where, attrs) -> Tuple[Tuple[int, int], Tuple[int, int], Tuple[int, int]]:
    lim = imp.limits.max_kernel
    k = attrs.ints("kernel_shape", None, 2, 1, lim)
    s = attrs.ints("strides", [1, 1], 2, 1, lim)
    top, left, bottom, right = _pads_2d(attrs, lim, k)
    if (top, left) != (bottom, right):
        raise imp.unsupported(f"asymmetric pads {[top, left, bottom, right]}")
    if top > k[0] // 2 or left > k[1] // 2:
        raise InvalidAttributeError(f"{where}: pads {[top, left]} larger than half the kernel {k}")
    if attrs.int("ceil_mode", 0, 0, 1):
        raise imp.unsupported("ceil_mode=1")
    if attrs.ints("dilations", [1, 1], 2, 1, lim) != [1, 1]:
        raise imp.unsupported("dilations")
    return (k[0], k[1]), (s[0], s[1]), (top, left)


@_handles("MaxPool")
def _maxpool(imp: _Importer, node, index, where, attrs, inputs) -> None:
    _require_inputs(inputs, 1, 1, where)
    out = imp.single_output(node, where)
    k, s, p = _pool_common(imp, node, index, where, attrs)
    if attrs.int("storage_order", 0, 0, 1):
        raise imp.unsupported("storage_order=1")
    imp.emit(node, index, nn.MaxPool2d(k, s, p), [imp.activation(inputs[0], where)], out)


@_handles("AveragePool")
def _avgpool(imp: _Importer, node, index, where, attrs, inputs) -> None:
    _require_inputs(inputs, 1, 1, where)
    out = imp.single_output(node, where)
    k, s, p = _pool_common(imp, node, index, where, attrs)
    if p != (0, 0) and not attrs.int("count_include_pad", 0, 0, 1):
        raise imp.unsupported("padding with count_include_pad=0")
    imp.emit(node, index, nn.AvgPool2d(k, s, p), [imp.activation(inputs[0], where)], out)


@_handles("ReduceMean")
def _reduce_mean(imp: _Importer, node, index, where, attrs, inputs) -> None:
    _require_inputs(inputs, 1, 2, where)
    out = imp.single_output(node, where)
    if imp.opset >= 18:
        axes_name = _optional(inputs, 1)
        axes = None if axes_name is None else [int(a) for a in imp.const(axes_name, where, "axes").reshape(-1)[:16]]
    else:
        axes = attrs.values.get("axes")
    keepdims = attrs.int("keepdims", 1, 0, 1)
    if axes is None or sorted(a % 4 for a in axes) != [2, 3] or len(axes) != 2:
        raise imp.unsupported(f"axes={axes} (only the mean over H and W, axes [2, 3], is supported)")
    imp.emit(node, index, GlobalAvgPool(bool(keepdims)), [imp.activation(inputs[0], where)], out)


@_handles("Flatten")
def _flatten(imp: _Importer, node, index, where, attrs, inputs) -> None:
    _require_inputs(inputs, 1, 1, where)
    out = imp.single_output(node, where)
    axis = attrs.int("axis", 1, -imp.limits.max_rank, imp.limits.max_rank)
    if axis != 1:
        raise imp.unsupported(f"axis={axis}")
    imp.emit(node, index, nn.Flatten(1, -1), [imp.activation(inputs[0], where)], out)


@_handles("Reshape")
def _reshape(imp: _Importer, node, index, where, attrs, inputs) -> None:
    _require_inputs(inputs, 2, 2, where)
    out = imp.single_output(node, where)
    shape = imp.const(inputs[1], where, "shape (dynamic reshapes are not supported)")
    if shape.ndim != 1 or shape.dtype.kind not in "iu" or not 1 <= shape.size <= imp.limits.max_rank:
        raise InvalidAttributeError(f"{where}: shape must be a 1-D integer tensor of 1 to {imp.limits.max_rank} "
                                    f"values, got {shape.dtype} {shape.shape}")
    dims = [int(d) for d in shape]
    if any(d < -1 or d > imp.limits.max_tensor_elements for d in dims) or dims.count(-1) > 1:
        raise InvalidAttributeError(f"{where}: shape {dims}")
    if attrs.int("allowzero", 0, 0, 1) and 0 in dims:
        raise imp.unsupported("allowzero=1 with a 0")
    src = imp.value(inputs[0])
    if src in imp.consts:
        try:
            imp.consts[out] = imp.consts[src].reshape([imp.consts[src].shape[i] if d == 0 else d
                                                        for i, d in enumerate(dims)])
        except (ValueError, IndexError) as exc:
            raise InvalidGraphError(f"{where}: cannot reshape a constant of shape {imp.consts[src].shape} to {dims}") from exc
        return
    if imp.batch is not None and dims[0] == imp.batch:
        dims[0] = 0  # the exporter wrote the batch size it traced with: keep whatever batch comes in
    imp.emit(node, index, Reshape(dims), [src], out)


# --------------------------------------------------------------------------------------------------------------


def _check_functions(model: Any) -> Any:
    """Inline model-local functions (the dynamo exporter may emit them) after refusing recursive ones."""
    if not len(model.functions):
        return model
    calls: Dict[Tuple[str, str], set] = {}
    for f in model.functions:
        calls[(f.domain, f.name)] = {(n.domain, n.op_type) for n in f.node}
    state: Dict[Tuple[str, str], int] = {}

    def visit(key: Tuple[str, str]) -> None:
        state[key] = 1
        for callee in calls.get(key, ()):
            if callee in calls:
                if state.get(callee) == 1:
                    raise InvalidGraphError(f"model-local function {key[1]!r} calls itself (recursion)")
                if callee not in state:
                    visit(callee)
        state[key] = 2

    for key in calls:
        if key not in state:
            visit(key)
    if sum(len(f.node) for f in model.functions) > 100_000:
        raise OnnxLimitError("model-local functions hold more than 100000 nodes")
    from onnx import inliner

    try:
        return inliner.inline_local_functions(model)
    except Exception as exc:  # malformed function bodies
        raise InvalidGraphError(f"cannot inline the model's local functions: {exc}") from exc


def load(source: Union[str, "os.PathLike[str]", bytes, bytearray, memoryview], *, unfold_batchnorm: bool = False,
         limits: Optional[Limits] = None, check: bool = True) -> GraphModule:
    """An ONNX model (a file path or its bytes) as a trainable edgelearn :class:`~edgelearn.nn.GraphModule`.

    Operators: see :data:`SUPPORTED_OPS` (the CNN operators of ``torch.onnx.export`` of torchvision-class models,
    opsets 11 to the newest ``onnx`` knows); external weight data (``.onnx.data`` beside the model, as the dynamo
    exporter writes) is read from the model's folder only. Weights become parameters of the usual layers
    (``Conv2d``, ``Linear``, ``BatchNorm2d``, ...); names follow the ONNX initializers where they look like
    PyTorch's (``features_0_0.weight`` for ``features.0.0.weight``), else the node names.

    ``unfold_batchnorm``: exporters fold BatchNorm into the convolutions; with this flag every Conv not already
    followed by BatchNormalization gets a ``BatchNorm2d`` after it, set up as the identity in eval mode (the
    conv's bias moves into its beta) so fine-tuning can train normalisation again (see
    ``edgelearn.onnx.calibrate_unfolded_batchnorm``).
    ``check``: run one batch-1 forward pass on zeros when the input shape is static, so shapes that do not fit
    together fail here (:class:`InvalidGraphError`) and not in the first training step.
    Hostile files raise the named subclasses of :class:`OnnxError`; an operator outside the list raises
    :class:`UnsupportedOperatorError` naming the node, the op and the supported list.
    """
    limits = limits or Limits()
    data, base_dir = _read_model_bytes(source, limits)
    model = _parse(data)
    del data
    _default_opset(model)
    model = _check_functions(model)
    imp = _Importer(model, base_dir, limits, unfold_batchnorm)
    gm = imp.run()
    gm.eval()
    shape = imp.input_shape
    gm.input_shape = shape  # (N, C, H, W) as the file declares it, None for symbolic sizes
    if check and len(shape) >= 2 and all(d is not None for d in shape[1:]):
        _dry_run(gm, (1,) + tuple(shape[1:]))
    return gm


def _dry_run(gm: GraphModule, shape: Tuple[int, ...]) -> None:
    from ..tensor import no_grad, tensor

    n = int(np.prod(shape))
    if n > (1 << 26):
        raise OnnxLimitError(f"input shape {shape} is too large to check")
    try:
        with no_grad():
            gm(tensor(np.zeros(shape, np.float32)))
    except OnnxError:
        raise
    except (ValueError, IndexError) as exc:
        raise InvalidGraphError(f"the graph's shapes do not fit together for an input of shape {shape}: {exc}") from exc
