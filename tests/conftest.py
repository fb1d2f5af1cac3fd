"""Shared fixtures: a seeded numpy generator and the list of kernels this CPU has."""

import numpy as np
import pytest

import edgelearn


@pytest.fixture
def rng():
    return np.random.default_rng(12345)


@pytest.fixture(params=edgelearn.available_kernels())
def kernel(request):
    """Runs a test once per kernel this CPU has, then restores automatic choice."""
    edgelearn.set_kernel(request.param)
    try:
        yield request.param
    finally:
        edgelearn.set_kernel(None)
