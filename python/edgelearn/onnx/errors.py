"""Exceptions of ONNX import and export. Every one is a ``ValueError`` (bad input), so callers that catch
``ValueError`` keep working; catch :class:`OnnxError` for all import problems at once."""

from __future__ import annotations

from typing import Sequence

__all__ = [
    "ExternalDataError",
    "InvalidAttributeError",
    "InvalidGraphError",
    "InvalidInitializerError",
    "OnnxError",
    "OnnxExportError",
    "OnnxFormatError",
    "OnnxLimitError",
    "UnsupportedModelError",
    "UnsupportedOperatorError",
]


class OnnxError(ValueError):
    """An ONNX model that cannot be imported (base class of the import errors below)."""


class OnnxFormatError(OnnxError):
    """The bytes are not an ONNX model: not protobuf, truncated, or no graph."""


class OnnxLimitError(OnnxError):
    """The model exceeds a size limit of ``load`` (file bytes, tensor elements, node count, ...)."""


class UnsupportedModelError(OnnxError):
    """A well-formed model outside what edgelearn trains: opset, several inputs, non-float input, ..."""


class UnsupportedOperatorError(OnnxError):
    """A node whose operator (or operator variant) edgelearn has no layer for."""

    def __init__(self, node: str, op: str, supported: Sequence[str], detail: str = ""):
        self.node, self.op, self.supported = node, op, tuple(supported)
        what = f"operator {op!r}" + (f" ({detail})" if detail else "")
        super().__init__(f"node {node!r}: unsupported {what}; supported operators: {', '.join(self.supported)}")


class InvalidGraphError(OnnxError):
    """The graph is not a DAG of known values: a cycle, an input nobody produces, a value written twice, or
    shapes that do not fit together."""


class InvalidInitializerError(OnnxError):
    """A weight tensor whose declared shape, type and stored bytes disagree."""


class InvalidAttributeError(OnnxError):
    """A node attribute or constant operand out of range (negative or absurd sizes, wrong lengths, ...)."""


class ExternalDataError(OnnxError):
    """External weight data that is missing, out of range, or points outside the model's folder."""


class OnnxExportError(ValueError):
    """A model (or a part of it) that ``edgelearn.onnx.export`` cannot write as ONNX."""
