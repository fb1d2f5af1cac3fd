"""Each variant of the core's error maps to its own Python exception class (rust/edgelearn-py/src/errors.rs),
with the core's message unchanged; all of them are ValueError or MemoryError subclasses, so callers catching
the builtin classes keep working."""

import numpy as np
import pytest

import edgelearn
from edgelearn import _native, sgq


@pytest.fixture
def memory_limit():
    yield edgelearn.set_memory_limit
    edgelearn.set_memory_limit(None)


def test_invalid_argument():
    with pytest.raises(edgelearn.InvalidArgumentError, match=r"^b: inner dimensions differ"):
        edgelearn.gemm_i8(np.zeros((2, 3), np.int8), np.zeros((4, 3), np.int8))
    # the glue's own argument checks raise the same class
    with pytest.raises(edgelearn.InvalidArgumentError):
        _native.conv2d_f32_forward(np.ones((1, 1, 2, 2), np.float32), np.ones((1, 2, 1, 1), np.float32), None, 1, 0)


def test_accumulator_overflow():
    k = 140_000  # 127·127·k exceeds INT32
    with pytest.raises(edgelearn.AccumulatorOverflowError, match=r"^a: K = 140000 exceeds"):
        edgelearn.gemm_i8(np.ones((1, k), np.int8), np.ones((k, 1), np.int8))


def test_non_finite():
    with pytest.raises(edgelearn.NonFiniteError, match=r"^x: contains non-finite values .* at index 2"):
        edgelearn.quantize(np.array([0.0, 1.0, np.inf], np.float32))


def test_kernel_unavailable():
    with pytest.raises(edgelearn.KernelUnavailableError, match="no-such-kernel"):
        edgelearn.set_kernel("no-such-kernel")


def test_frame():
    with pytest.raises(sgq.FrameError, match=r"^malformed SGQ frame"):
        sgq.decode(b"not a frame at all")


def test_memory_limit(memory_limit):
    memory_limit(64 << 20)
    with pytest.raises(edgelearn.MemoryLimitError, match=r"result: needs 37\.3 GiB"):
        edgelearn.gemm_i8(np.ones((100000, 1), np.int8), np.ones((1, 100000), np.int8))


def test_classes_are_distinct_and_builtin_compatible():
    classes = [edgelearn.InvalidArgumentError, edgelearn.AccumulatorOverflowError, edgelearn.NonFiniteError,
               edgelearn.KernelUnavailableError, sgq.FrameError, edgelearn.MemoryLimitError]
    assert len(set(classes)) == len(classes)
    assert all(issubclass(c, ValueError) for c in classes[:-1])
    assert issubclass(edgelearn.MemoryLimitError, MemoryError)
