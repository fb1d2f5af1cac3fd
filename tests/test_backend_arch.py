"""Which INT8 kernel the run-time dispatch picks on this CPU.

scripts/test-aarch64.sh runs the suite under qemu as several CPUs and sets ``EDGELEARN_EXPECT_KERNEL``
(cortex-a72 -> neon, neoverse-n1 -> dotprod, max -> i8mm). When it is set, a different kernel is a failure,
never a skip: that is how a board would silently lose its fast path. Without it, only invariants are checked.
"""

import os
import platform
import subprocess
import sys

import numpy as np
import pytest

import edgelearn

EXPECT = os.environ.get("EDGELEARN_EXPECT_KERNEL") or None

# best first, per architecture; the dispatch must pick the best one the CPU has
AARCH64_KERNELS = ["i8mm", "dotprod", "neon"]
# CPU features (as backend_info reports them) that each aarch64 kernel needs
AARCH64_NEEDS = {"neon": {"neon"}, "dotprod": {"neon", "dotprod"}, "i8mm": {"neon", "i8mm"}}


def is_aarch64():
    return platform.machine().lower() in ("aarch64", "arm64")


@pytest.fixture
def auto_kernel():
    """Automatic choice (as on a board), restored afterwards whatever happens."""
    edgelearn.set_kernel(None)
    try:
        yield edgelearn.backend_info()["kernel"]
    finally:
        edgelearn.set_kernel(None)


@pytest.mark.skipif(EXPECT is None, reason="EDGELEARN_EXPECT_KERNEL not set (set by scripts/test-aarch64.sh)")
def test_dispatch_picks_the_expected_kernel(auto_kernel):
    assert auto_kernel == EXPECT, (
        f"expected kernel {EXPECT!r} on this CPU ({platform.machine()}), got {auto_kernel!r}; "
        f"backend_info() = {edgelearn.backend_info()!r}"
    )


@pytest.mark.skipif(EXPECT is None, reason="EDGELEARN_EXPECT_KERNEL not set (set by scripts/test-aarch64.sh)")
def test_expected_kernel_is_reported_by_a_fresh_process_and_the_cli():
    # a new interpreter, with no set_kernel() history, and the `edgelearn info --json` face of the same
    env = {k: v for k, v in os.environ.items() if k != "EDGELEARN_KERNEL"}
    code = "import edgelearn; print(edgelearn.backend_info()['kernel'])"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().splitlines()[-1] == EXPECT
    r = subprocess.run([sys.executable, "-m", "edgelearn", "info", "--json"], capture_output=True, text=True,
                       env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    assert f'"kernel": "{EXPECT}"' in r.stdout


def test_chosen_kernel_is_available_and_reported(auto_kernel):
    info = edgelearn.backend_info()
    assert auto_kernel in edgelearn.available_kernels()
    assert {"cpu_features", "kernel", "threads", "version"} <= set(info)
    assert info["threads"] >= 1 and info["version"] == edgelearn.__version__


@pytest.mark.skipif(not is_aarch64(), reason="aarch64 dispatch rules")
def test_aarch64_picks_the_best_kernel_the_cpu_has(auto_kernel):
    avail = edgelearn.available_kernels()
    features = set(edgelearn.backend_info()["cpu_features"])
    assert "neon" in avail, "every AArch64 CPU has NEON"
    for name in AARCH64_KERNELS:
        # a kernel is offered exactly when the CPU reports what it needs
        assert (name in avail) == (AARCH64_NEEDS[name] <= features), (name, avail, sorted(features))
    best = next(k for k in AARCH64_KERNELS if k in avail)
    assert auto_kernel == best


@pytest.mark.skipif(not is_aarch64(), reason="aarch64 dispatch rules")
def test_aarch64_kernels_the_cpu_lacks_are_refused(auto_kernel):
    # on a Pi 4 (cortex-a72) forcing sdot/smmla must be an error, not a SIGILL
    avail = edgelearn.available_kernels()
    for name in AARCH64_KERNELS:
        if name not in avail:
            with pytest.raises(edgelearn.KernelUnavailableError):
                edgelearn.set_kernel(name)
            assert edgelearn.backend_info()["kernel"] == auto_kernel


@pytest.mark.skipif(not is_aarch64(), reason="aarch64 dispatch rules")
def test_every_aarch64_kernel_this_cpu_has_agrees_with_numpy(rng):
    # one shape that spans several tiles and k-groups of every kernel (and a ragged edge)
    a = rng.integers(-128, 128, size=(19, 70), dtype=np.int16).astype(np.int8)
    b = rng.integers(-128, 128, size=(70, 27), dtype=np.int16).astype(np.int8)
    ref = a.astype(np.int64) @ b.astype(np.int64)
    try:
        for name in edgelearn.available_kernels():
            edgelearn.set_kernel(name)
            assert edgelearn.backend_info()["kernel"] == name
            np.testing.assert_array_equal(edgelearn.gemm_i8(a, b), ref, err_msg=name)
    finally:
        edgelearn.set_kernel(None)
