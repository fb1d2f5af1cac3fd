"""Seeded parameter initialisation: one module-level generator, reseeded by ``edgelearn.manual_seed``."""

from __future__ import annotations

import math
from typing import Tuple

import numpy as np

__all__ = ["manual_seed", "generator", "uniform_fan_in", "next_seed"]

_gen = np.random.default_rng(0)


def manual_seed(seed: int) -> None:
    """Reseed the generator behind parameter initialisation and default Dropout/Compensation seeds."""
    # reseed in place: code holding generator() (checkpoints saving its state) keeps a live reference
    _gen.bit_generator.state = np.random.default_rng(int(seed)).bit_generator.state


def generator() -> np.random.Generator:
    return _gen


def next_seed() -> int:
    return int(_gen.integers(0, 2**63 - 1))


def uniform_fan_in(shape: Tuple[int, ...], fan_in: int) -> np.ndarray:
    """U(-1/√fan_in, 1/√fan_in), PyTorch's default for Linear/Conv weights and biases."""
    bound = 1.0 / math.sqrt(max(fan_in, 1))
    return _gen.uniform(-bound, bound, size=shape).astype(np.float32)
