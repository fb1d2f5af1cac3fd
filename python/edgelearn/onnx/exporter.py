"""``export``: an FP32 ONNX graph of any edgelearn model, for ONNX Runtime (or any ONNX inference engine).

The model is traced: it runs once in eval mode on an input of ``input_shape`` while every layer call and every
tensor-level op between layers (``x + identity`` in a residual block, ``x.flatten(1)``, ...) is recorded as an
ONNX node. INT8-trained models export their FP32 master weights; a Compensation (LAC) layer becomes a constant
per-channel shift folded into the preceding convolution's or linear layer's bias; BatchNorm exports its eval
form (running statistics). Dropout becomes Identity. The batch dimension is symbolic (``N``).

What does not live here: reading ONNX (``edgelearn.onnx.importer``).
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np

from .. import functional as F
from .. import nn
from ..nn.graph import Add, Clip, Concat, GlobalAvgPool, Hardsigmoid, Mul, Reshape, ZeroPad2d
from ..nn.module import Module
from ..tensor import Tensor, no_grad, tensor
from .errors import OnnxExportError

__all__ = ["EXPORT_OPSET", "export", "fp32_outputs"]

#: The opset ``export`` writes (ONNX Runtime has run it for years; HardSwish needs 14).
EXPORT_OPSET = 17


class _Trace:
    """The ONNX nodes and initializers recorded while the model runs, keyed by the identity of its tensors."""

    def __init__(self) -> None:
        from onnx import helper

        self.helper = helper
        self.nodes: List[Any] = []
        self.initializers: Dict[str, np.ndarray] = {}
        self.names: Dict[int, str] = {}
        self.keep: List[Tensor] = []  # tensors named so far stay alive, so their ids are never reused
        self.depth = 0
        self.counter = 0
        self.kinds: Dict[str, str] = {}  # value name -> op type of its producer
        self.rename: Dict[str, str] = {}
        self.module_names: Dict[int, str] = {}  # id(module) -> dotted name in the model
        self.labels: set = set()  # node names taken from module names
        self.quantized = False
        self.current_input: Optional[Tensor] = None  # the input of the layer being recorded

    def qdq_activation(self, name: str, x: Any) -> str:
        """Quantize-dequantize an activation with a per-tensor symmetric INT8 scale from the traced values."""
        absmax = float(np.max(np.abs(np.asarray(x.data if isinstance(x, Tensor) else x)))) if x is not None else 0.0
        scale = self.constant(np.asarray(max(absmax, 1e-12) / 127.0, np.float32), "act.scale")
        zero = self.constant(np.asarray(0, np.int8), "act.zero")
        q = self.node("QuantizeLinear", [name, scale, zero], None, "quant")
        return self.node("DequantizeLinear", [q, scale, zero], None, "dequant")

    def dq_weight(self, w: np.ndarray, per_channel: bool, stem: str) -> str:
        """An INT8 weight initializer (nearest rounding, symmetric, per tensor or per output channel) and its
        DequantizeLinear."""
        axes = tuple(range(1, w.ndim))
        absmax = np.max(np.abs(w), axis=axes) if per_channel else np.asarray(np.max(np.abs(w)))
        scale = (np.maximum(absmax, 1e-12) / 127.0).astype(np.float32)
        shaped = scale.reshape((-1,) + (1,) * (w.ndim - 1)) if per_channel else scale
        q = np.clip(np.round(w / shaped), -127, 127).astype(np.int8)
        zero = np.zeros(scale.shape, np.int8)
        names = [self.constant(q, f"{stem}.weight_int8"), self.constant(scale, f"{stem}.weight_scale"),
                 self.constant(zero, f"{stem}.weight_zero")]
        return self.node("DequantizeLinear", names, None, "dequant", **({"axis": 0} if per_channel else {}))

    def label(self, m: Any, out: Any) -> None:
        """Name the node that produced a layer's output after the layer's dotted name in the model (``"4"``,
        ``"features.0.0"``), so the graph reads like the model and imports back under the same names."""
        name = self.module_names.get(id(m))
        value = self.names.get(id(out)) if isinstance(out, Tensor) else None
        if not name or value is None or name in self.labels:
            return
        for n in reversed(self.nodes):
            if n.output[0] == value:
                n.name = name
                self.labels.add(name)
                return

    def stem_of(self, m: Any, default: str) -> str:
        """The module's dotted name in the model (so initializers read ``features.0.weight`` as in PyTorch)."""
        return self.module_names.get(id(m)) or default

    def param(self, m: Any, arr: np.ndarray, suffix: str, default: str) -> str:
        name = f"{self.stem_of(m, default)}.{suffix}"
        if name in self.initializers:
            return self.constant(arr, f"{default}.{suffix}")
        self.initializers[name] = np.ascontiguousarray(arr)
        return name

    def fresh(self, stem: str) -> str:
        self.counter += 1
        return f"{stem}_{self.counter}"

    def name_of(self, t: Any, what: str) -> str:
        if isinstance(t, Tensor) and id(t) in self.names:
            return self.names[id(t)]
        if isinstance(t, Tensor):
            raise OnnxExportError(f"{what}: its input was computed by an operation the exporter does not trace "
                                  f"(only edgelearn layers and +, *, reshape/flatten between them are recorded)")
        return self.constant(np.asarray(t, np.float32), "const")

    def bind(self, t: Tensor, name: str) -> None:
        self.names[id(t)] = name
        self.keep.append(t)

    def constant(self, arr: np.ndarray, stem: str) -> str:
        name = self.fresh(stem)
        self.initializers[name] = np.ascontiguousarray(arr)
        return name

    def node(self, op: str, inputs: Sequence[str], out: Optional[Tensor], stem: str, **attrs: Any) -> str:
        name = self.fresh(stem)
        self.nodes.append(self.helper.make_node(op, list(inputs), [name], name=f"{op}_{self.counter}", **attrs))
        self.kinds[name] = op
        if out is not None:
            self.bind(out, name)
        return name


def _compensation_shift(comp: Any) -> np.ndarray:
    a, m, b = comp.alpha.data, comp.mu.data, comp.beta.data
    return (a * m + b).astype(np.float32)


def _broadcast_channels(shift: np.ndarray, ndim: int) -> np.ndarray:
    """A (C,) or (C, H, W) per-sample constant shaped to add to an (N, C, ...) activation of rank ``ndim``."""
    if shift.ndim == 1:
        return shift.reshape((1, -1) + (1,) * (ndim - 2))
    return shift.reshape((1,) + shift.shape)


def _pair(v: Any) -> Tuple[int, int]:
    return F._pair(v, "size")


# --- layer handlers: (trace, module, input names, output tensor, call kwargs) -> None ------------------------


def _conv(tr: _Trace, m: Any, ins: List[str], out: Tensor, kw: Dict[str, Any]) -> None:
    w = m.weight.data.astype(np.float32)
    bias = np.zeros(w.shape[0], np.float32) if m.bias is None else m.bias.data.astype(np.float32).copy()
    comp = kw.get("compensation")
    if comp is not None:
        bias = bias + _compensation_shift(comp).reshape(-1)
    ph, pw = _pair(m.padding)
    attrs: Dict[str, Any] = dict(kernel_shape=list(w.shape[2:]), strides=list(_pair(m.stride)), pads=[ph, pw, ph, pw],
                                 group=int(getattr(m, "groups", 1)))
    dil = getattr(m, "dilation", None)
    if dil is not None:
        attrs["dilations"] = list(_pair(dil))
    if tr.quantized:
        per_channel = bool(getattr(getattr(m, "int8", None), "per_channel_weights", False))
        x_name, w_name = tr.qdq_activation(ins[0], tr.current_input), tr.dq_weight(w, per_channel, "conv")
    else:
        x_name, w_name = ins[0], tr.param(m, w, "weight", "conv")
    tr.node("Conv", [x_name, w_name, tr.param(m, bias, "bias", "conv")], out, "conv", **attrs)


def _linear(tr: _Trace, m: Any, ins: List[str], out: Tensor, kw: Dict[str, Any]) -> None:
    w = m.weight.data.astype(np.float32)
    bias = np.zeros(w.shape[0], np.float32) if m.bias is None else m.bias.data.astype(np.float32).copy()
    comp = kw.get("compensation")
    if comp is not None:
        bias = bias + _compensation_shift(comp).reshape(-1)
    if tr.quantized:
        per_channel = bool(getattr(getattr(m, "int8", None), "per_channel_weights", False))
        x_name, w_name = tr.qdq_activation(ins[0], tr.current_input), tr.dq_weight(w, per_channel, "fc")
    else:
        x_name, w_name = ins[0], tr.param(m, w, "weight", "fc")
    tr.node("Gemm", [x_name, w_name, tr.param(m, bias, "bias", "fc")], out, "fc", transB=1)


def _batchnorm(tr: _Trace, m: Any, ins: List[str], out: Tensor, kw: Dict[str, Any]) -> None:
    consts = [tr.param(m, np.asarray(a, np.float32), n, "bn") for n, a in (
        ("weight", m.weight.data), ("bias", m.bias.data), ("running_mean", m.running_mean),
        ("running_var", m.running_var))]
    tr.node("BatchNormalization", [ins[0]] + consts, out, "bn", epsilon=float(m.eps))


def _clip_node(tr: _Trace, ins: List[str], out: Tensor, lo: Optional[float], hi: Optional[float]) -> None:
    args = [ins[0], tr.constant(np.asarray(lo, np.float32), "min") if lo is not None else "",
            tr.constant(np.asarray(hi, np.float32), "max") if hi is not None else ""]
    while args[-1] == "":
        args.pop()
    tr.node("Clip", args, out, "clip")


def _simple(op: str) -> Callable:
    def handler(tr: _Trace, m: Any, ins: List[str], out: Tensor, kw: Dict[str, Any]) -> None:
        tr.node(op, ins[:1], out, op.lower())

    return handler


def _pool(op: str) -> Callable:
    def handler(tr: _Trace, m: Any, ins: List[str], out: Tensor, kw: Dict[str, Any]) -> None:
        k = _pair(m.kernel_size)
        s = k if m.stride is None else _pair(m.stride)
        p = _pair(m.padding)
        attrs: Dict[str, Any] = dict(kernel_shape=list(k), strides=list(s), pads=[p[0], p[1], p[0], p[1]])
        if op == "AveragePool":
            attrs["count_include_pad"] = 1
        tr.node(op, ins[:1], out, op.lower(), **attrs)

    return handler


def _adaptive_avg(tr: _Trace, m: Any, ins: List[str], out: Tensor, kw: Dict[str, Any], x: Tensor) -> None:
    oh, ow = _pair(m.output_size)
    if (oh, ow) == (1, 1):
        tr.node("GlobalAveragePool", ins[:1], out, "gap")
        return
    h, w = x.shape[2], x.shape[3]
    k = (h // oh, w // ow)
    tr.node("AveragePool", ins[:1], out, "avgpool", kernel_shape=list(k), strides=list(k))


def _global_avg(tr: _Trace, m: Any, ins: List[str], out: Tensor, kw: Dict[str, Any]) -> None:
    if m.keepdims:
        tr.node("GlobalAveragePool", ins[:1], out, "gap")
    else:
        pooled = tr.node("GlobalAveragePool", ins[:1], None, "gap")
        tr.node("Flatten", [pooled], out, "flatten", axis=1)


def _flatten(tr: _Trace, m: Any, ins: List[str], out: Tensor, kw: Dict[str, Any], x: Tensor) -> None:
    _reshape_to(tr, ins[0], x, out)


def _reshape_to(tr: _Trace, src: str, x: Tensor, out: Tensor) -> None:
    if len(out.shape) == 2 and out.shape[0] == x.shape[0]:
        tr.node("Flatten", [src], out, "flatten", axis=1)
        return
    shape = list(out.shape)
    if shape and x.ndim and shape[0] == x.shape[0]:
        shape[0] = 0  # keep whatever batch comes in
    tr.node("Reshape", [src, tr.constant(np.asarray(shape, np.int64), "shape")], out, "reshape")


def _identity(tr: _Trace, m: Any, ins: List[str], out: Tensor, kw: Dict[str, Any]) -> None:
    tr.node("Identity", ins[:1], out, "identity")


def _compensation(tr: _Trace, m: Any, ins: List[str], out: Tensor, kw: Dict[str, Any], x: Tensor) -> None:
    shift = _broadcast_channels(_compensation_shift(m), x.ndim)
    tr.node("Add", [ins[0], tr.constant(shift, "lac.shift")], out, "lac")


def _binary(op: str) -> Callable:
    def handler(tr: _Trace, m: Any, ins: List[str], out: Tensor, kw: Dict[str, Any]) -> None:
        if len(ins) == 1:
            ins = ins + [tr.constant(np.asarray(m.constant, np.float32), "const")]
        tr.node(op, ins[:2], out, op.lower())

    return handler


def _concat(tr: _Trace, m: Any, ins: List[str], out: Tensor, kw: Dict[str, Any]) -> None:
    tr.node("Concat", ins, out, "concat", axis=int(m.axis))


def _reshape_module(tr: _Trace, m: Any, ins: List[str], out: Tensor, kw: Dict[str, Any], x: Tensor) -> None:
    _reshape_to(tr, ins[0], x, out)


def _zero_pad(tr: _Trace, m: Any, ins: List[str], out: Tensor, kw: Dict[str, Any]) -> None:
    left, right, top, bottom = m.padding
    pads = np.asarray([0, 0, top, left, 0, 0, bottom, right], np.int64)
    tr.node("Pad", [ins[0], tr.constant(pads, "pads")], out, "pad")


def _hardsigmoid(tr: _Trace, m: Any, ins: List[str], out: Tensor, kw: Dict[str, Any]) -> None:
    tr.node("HardSigmoid", ins[:1], out, "hardsigmoid", alpha=float(getattr(m, "alpha", 1.0 / 6.0)),
            beta=float(getattr(m, "beta", 0.5)))


def _handlers() -> List[Tuple[type, Callable, bool]]:
    """(layer class, handler, handler wants the input tensor) in match order (subclasses before bases)."""
    table: List[Tuple[type, Callable, bool]] = [
        (nn.Conv2d, _conv, False),
        (nn.Linear, _linear, False),
        (nn.BatchNorm2d, _batchnorm, False),
        (nn.ReLU, _simple("Relu"), False),
        (nn.AvgPool2d, _pool("AveragePool"), False),  # AvgPool2d subclasses MaxPool2d: match it first
        (nn.MaxPool2d, _pool("MaxPool"), False),
        (nn.AdaptiveAvgPool2d, _adaptive_avg, True),
        (GlobalAvgPool, _global_avg, False),
        (nn.Flatten, _flatten, True),
        (nn.Identity, _identity, False),
        (nn.Dropout, _identity, False),
        (nn.Compensation, _compensation, True),
        (Add, _binary("Add"), False),
        (Mul, _binary("Mul"), False),
        (Concat, _concat, False),
        (Reshape, _reshape_module, True),
        (ZeroPad2d, _zero_pad, False),
        (Clip, lambda tr, m, ins, out, kw: _clip_node(tr, ins, out, m.min, m.max), False),
        (Hardsigmoid, _hardsigmoid, False),
    ]
    # layers of the PyTorch set that may not exist in every edgelearn version
    optional = {
        "ReLU6": lambda tr, m, ins, out, kw: _clip_node(tr, ins, out, 0.0, 6.0),
        "Hardswish": _simple("HardSwish"),
        "Sigmoid": _simple("Sigmoid"),
    }
    for name, handler in optional.items():
        cls = getattr(nn, name, None)
        if cls is not None:
            table.insert(0, (cls, handler, False))
    return table


# --- tracing --------------------------------------------------------------------------------------------------


@contextmanager
def _tracing(tr: _Trace) -> Iterator[None]:
    """Patch ``Module.__call__`` and the Tensor ops used between layers to record ONNX nodes."""
    table = _handlers()
    original_call = Module.__call__

    def lookup(m: Module) -> Optional[Tuple[Callable, bool]]:
        for cls, handler, wants_x in table:
            if isinstance(m, cls):
                return handler, wants_x
        return None

    def traced_call(self: Module, *args: Any, **kwargs: Any) -> Any:
        if tr.depth > 0:
            return original_call(self, *args, **kwargs)
        found = lookup(self)
        if found is None:
            if not any(True for _ in self.children()):
                raise OnnxExportError(f"{type(self).__name__}: no ONNX form for this layer (export knows "
                                      f"{', '.join(sorted({c.__name__ for c, _, _ in table}))})")
            return original_call(self, *args, **kwargs)  # a container: its children and tensor ops get traced
        handler, wants_x = found
        ins = [tr.name_of(a, type(self).__name__) for a in args if a is not None]
        tr.current_input = args[0] if args else None
        tr.depth += 1
        try:
            out = original_call(self, *args, **kwargs)
        finally:
            tr.depth -= 1
        if wants_x:
            handler(tr, self, ins, out, kwargs, args[0])
        else:
            handler(tr, self, ins, out, kwargs)
        tr.label(self, out)
        return out

    patched: List[Tuple[Any, str, Any]] = []

    def patch(owner: Any, attr: str, make: Callable[[Any], Any]) -> None:
        old = getattr(owner, attr)
        patched.append((owner, attr, old))
        setattr(owner, attr, make(old))

    def binary(op: str, reflected: bool) -> Callable[[Any], Any]:
        def make(old: Any) -> Any:
            def traced(self: Tensor, other: Any) -> Any:
                out = old(self, other)
                if tr.depth == 0:
                    a, b = tr.name_of(self, op), tr.name_of(other, op)
                    tr.node(op, [b, a] if reflected else [a, b], out, op.lower())
                return out

            return traced

        return make

    def reshaping(old: Any) -> Any:
        def traced(self: Tensor, *a: Any, **k: Any) -> Any:
            out = old(self, *a, **k)
            if tr.depth == 0:
                _reshape_to(tr, tr.name_of(self, "reshape"), self, out)
            return out

        return traced

    Module.__call__ = traced_call  # type: ignore[method-assign]
    try:
        patch(Tensor, "__add__", binary("Add", False))
        patch(Tensor, "__radd__", binary("Add", True))
        patch(Tensor, "__mul__", binary("Mul", False))
        patch(Tensor, "__rmul__", binary("Mul", True))
        patch(F, "residual_add", binary("Add", False))  # the zoo's residual blocks (out + identity, in place)
        for attr in ("flatten", "reshape", "view"):
            patch(Tensor, attr, reshaping)
        yield
    finally:
        Module.__call__ = original_call  # type: ignore[method-assign]
        for owner, attr, old in reversed(patched):
            setattr(owner, attr, old)


def _fold_shifts(tr: _Trace) -> None:
    """An ``Add`` of a per-channel constant right after a Conv/Gemm whose output nothing else reads joins that
    layer's bias (the LAC shift of a Compensation that was not fused)."""
    readers: Dict[str, int] = {}
    for n in tr.nodes:
        for i in n.input:
            readers[i] = readers.get(i, 0) + 1
    producer = {n.output[0]: n for n in tr.nodes}
    keep = []
    rename: Dict[str, str] = {}
    for n in tr.nodes:
        n.input[:] = [rename.get(i, i) for i in n.input]
        if n.op_type == "Add" and len(n.input) == 2 and n.input[1] in tr.initializers:
            src = producer.get(n.input[0])
            shift = tr.initializers[n.input[1]]
            if (src is not None and src.op_type in ("Conv", "Gemm") and readers.get(n.input[0]) == 1
                    and len(src.input) == 3):
                bias = tr.initializers[src.input[2]]
                c = bias.shape[0]
                expected = (1, c, 1, 1) if src.op_type == "Conv" else (1, c)
                if shift.shape == expected:
                    tr.initializers[src.input[2]] = (bias + shift.reshape(-1)).astype(np.float32)
                    rename[n.output[0]] = src.output[0]
                    continue
        keep.append(n)
    tr.nodes = keep
    tr.rename = rename


def export(model: Any, path: Union[str, "os.PathLike[str]", None], input_shape: Sequence[int], *,
           opset: int = EXPORT_OPSET, input_name: str = "input", output_name: str = "output",
           dynamic_batch: bool = True, quantized: bool = False, calibration: Any = None) -> Any:
    """Write ``model`` as an FP32 ONNX graph to ``path`` and return the ``onnx.ModelProto``.

    ``input_shape``: the shape of one input batch, e.g. ``(1, 3, 224, 224)`` (a shape without the batch
    dimension gets batch 1). The graph takes any batch size when ``dynamic_batch`` (the default). The model runs
    once in eval mode on zeros of that shape to trace it; its train/eval mode is restored afterwards.
    ``path=None`` only builds and returns the model.

    ``quantized=True`` writes a QDQ INT8 graph instead: every Conv/Gemm reads its input through
    QuantizeLinear/DequantizeLinear with a per-tensor symmetric scale (absmax/127 of that input over the
    ``calibration`` images, which the trace runs on; required) and an INT8 weight (nearest rounding, per tensor,
    or per output channel where the layer's OctoConfig says so) through DequantizeLinear; ONNX Runtime runs it
    with its INT8 kernels. Activation scales are static here, where edgelearn's INT8 eval mode computes them per
    batch, so outputs differ by about the quantization error.
    """
    try:
        import onnx
        from onnx import TensorProto, helper, numpy_helper
    except ImportError as exc:
        raise ImportError('ONNX export needs the onnx package: pip install "edgelearn[onnx]"') from exc
    shape = tuple(int(s) for s in input_shape)
    if len(shape) in (1, 3):
        shape = (1,) + shape
    if len(shape) not in (2, 4) or min(shape) < 1:
        raise ValueError(f"input_shape: expected (N, C, H, W) or (N, features) of positive sizes, got {tuple(input_shape)}")
    tr = _Trace()
    tr.quantized = bool(quantized)
    if quantized:
        if calibration is None:
            raise ValueError("quantized=True needs calibration images (an array shaped like a batch of inputs)")
        cal = np.ascontiguousarray(np.asarray(calibration, np.float32))
        if cal.ndim != len(shape) or cal.shape[1:] != shape[1:] or len(cal) < 1:
            raise ValueError(f"calibration: expected images of shape (n, {', '.join(map(str, shape[1:]))}), "
                             f"got {cal.shape}")
    if isinstance(model, Module):
        tr.module_names = {id(m): n for n, m in model.named_modules() if n}
    x = tensor(cal if quantized else np.zeros(shape, np.float32))
    tr.bind(x, input_name)
    was_training = getattr(model, "training", False)
    model.eval()
    try:
        with no_grad(), _tracing(tr):
            y = model(x)
    finally:
        model.train(was_training)
    if not isinstance(y, Tensor):
        raise OnnxExportError(f"the model returned a {type(y).__name__}; export handles one output tensor")
    out = tr.name_of(y, "the model's output")
    _fold_shifts(tr)
    out = tr.rename.get(out, out)
    if out == input_name:
        tr.nodes.append(helper.make_node("Identity", [input_name], [output_name], name="Identity_out"))
    else:
        for n in tr.nodes:
            n.output[:] = [output_name if o == out else o for o in n.output]
            n.input[:] = [output_name if i == out else i for i in n.input]
    used = {i for n in tr.nodes for i in n.input}
    inits = [numpy_helper.from_array(arr, name) for name, arr in tr.initializers.items() if name in used]
    batch = "N" if dynamic_batch else shape[0]
    graph = helper.make_graph(
        tr.nodes, "edgelearn",
        [helper.make_tensor_value_info(input_name, TensorProto.FLOAT, [batch, *shape[1:]])],
        [helper.make_tensor_value_info(output_name, TensorProto.FLOAT, [batch, *y.shape[1:]])],
        initializer=inits,
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", int(opset))],
                              producer_name="edgelearn")
    proto.ir_version = min(proto.ir_version, 8)  # readable by ONNX Runtime releases of the last years
    onnx.checker.check_model(proto)
    if path is not None:
        path = os.fspath(path)
        tmp = f"{path}.tmp"
        with open(tmp, "wb") as f:
            f.write(proto.SerializeToString())
        os.replace(tmp, path)
    return proto


def fp32_outputs(model: Any, x: Any, batch_size: int = 256) -> np.ndarray:
    """What the exported graph computes: ``model``'s eval-mode outputs on ``x`` with every INT8 layer run in FP32
    on its master weights (the model's modes and step counters are left as they were). Compare these with ONNX
    Runtime's outputs; an INT8 model's own eval mode also quantizes activations, so its outputs differ by the
    quantization error while its predictions almost always agree."""
    from ..nn.module import _tree_changed

    layers = [m for m in model.modules() if getattr(m, "int8", None) is not None]
    saved = [(m, m.int8) for m in layers]
    was_training = getattr(model, "training", False)
    xs = np.asarray(x, np.float32)
    try:
        for m in layers:
            object.__setattr__(m, "int8", None)
        _tree_changed()
        model.eval()
        with no_grad():
            return np.concatenate([model(tensor(xs[i:i + batch_size])).numpy() for i in range(0, len(xs), batch_size)])
    finally:
        for m, cfg in saved:
            object.__setattr__(m, "int8", cfg)
        _tree_changed()
        model.train(was_training)
