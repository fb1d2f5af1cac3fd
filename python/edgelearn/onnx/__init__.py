"""``edgelearn.onnx``: bring your own model in (``load``) and hand the trained one to an inference runtime
(``export``). Needs the optional ``onnx`` package: ``pip install "edgelearn[onnx]"``.

- :func:`load` builds a trainable :class:`edgelearn.nn.GraphModule` from an ONNX file (CNN operators of
  ``torch.onnx.export``, both exporters, opsets 11 to current), treating the file as hostile.
- :func:`export` writes any edgelearn model as an FP32 ONNX graph that ONNX Runtime runs (INT8-trained models
  export their master weights, with the LAC shift folded into the bias).
"""

from .errors import (
    ExternalDataError,
    InvalidAttributeError,
    InvalidGraphError,
    InvalidInitializerError,
    OnnxError,
    OnnxExportError,
    OnnxFormatError,
    OnnxLimitError,
    UnsupportedModelError,
    UnsupportedOperatorError,
)
from .exporter import EXPORT_OPSET, export, fp32_outputs
from .importer import MIN_OPSET, SUPPORTED_OPS, Limits, load

__all__ = [
    "EXPORT_OPSET",
    "ExternalDataError",
    "InvalidAttributeError",
    "InvalidGraphError",
    "InvalidInitializerError",
    "Limits",
    "MIN_OPSET",
    "OnnxError",
    "OnnxExportError",
    "OnnxFormatError",
    "OnnxLimitError",
    "SUPPORTED_OPS",
    "UnsupportedModelError",
    "UnsupportedOperatorError",
    "export",
    "fp32_outputs",
    "load",
]
