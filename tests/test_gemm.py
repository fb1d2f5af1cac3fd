"""gemm_i8 / gemm_i8_f32 against numpy integer matmul, for every kernel this CPU has, plus error cases."""

import os
import subprocess
import sys
import threading

import numpy as np
import pytest

import edgelearn

SHAPES = [(1, 1, 1), (2, 3, 4), (7, 13, 5), (17, 33, 65), (64, 64, 64), (5, 1000, 3), (300, 27, 16),
          (144, 300, 32), (1, 257, 97), (97, 3, 1), (33, 64, 129)]


def rand_i8(rng, shape, full_range=True):
    lo = -128 if full_range else -127
    return rng.integers(lo, 128, size=shape, dtype=np.int16).astype(np.int8)


def ref(a, b):
    return a.astype(np.int64) @ b.astype(np.int64)


@pytest.mark.parametrize("m,k,n", SHAPES)
def test_gemm_i8_matches_numpy_for_each_kernel(kernel, rng, m, k, n):
    a, b = rand_i8(rng, (m, k)), rand_i8(rng, (k, n))
    for aa in (a, np.asfortranarray(a)):
        for bb in (b, np.asfortranarray(b)):
            c = edgelearn.gemm_i8(aa, bb)
            assert c.dtype == np.int32 and c.shape == (m, n)
            np.testing.assert_array_equal(c, ref(a, b))


def test_transposed_views_are_read_in_place(kernel, rng):
    # the three training GEMMs: Y = X·Wᵀ, dX = dY·W, dW = dYᵀ·X
    x, w, dy = rand_i8(rng, (37, 29)), rand_i8(rng, (11, 29)), rand_i8(rng, (37, 11))
    np.testing.assert_array_equal(edgelearn.gemm_i8(x, w.T), ref(x, w.T))
    np.testing.assert_array_equal(edgelearn.gemm_i8(dy, w), ref(dy, w))
    np.testing.assert_array_equal(edgelearn.gemm_i8(dy.T, x), ref(dy.T, x))


def test_row_slices_with_unit_inner_stride_are_accepted(rng):
    big = rand_i8(rng, (20, 50))
    a, b = big[3:9, 5:17], big[:12, 20:27]
    np.testing.assert_array_equal(edgelearn.gemm_i8(a, b), ref(a, b))


def test_extreme_values_are_exact(kernel):
    a = np.full((3, 4096), -128, np.int8)
    b = np.full((4096, 5), -128, np.int8)
    np.testing.assert_array_equal(edgelearn.gemm_i8(a, b), np.full((3, 5), 4096 * 16384))
    a[:, ::2] = 127
    b[1::3] = -127
    np.testing.assert_array_equal(edgelearn.gemm_i8(a, b), ref(a, b))


def test_zero_k_gives_zeros_and_empty_m_n_give_empty(kernel):
    assert (edgelearn.gemm_i8(np.zeros((3, 0), np.int8), np.zeros((0, 4), np.int8)) == 0).all()
    assert edgelearn.gemm_i8(np.zeros((0, 5), np.int8), np.zeros((5, 4), np.int8)).shape == (0, 4)
    assert edgelearn.gemm_i8(np.zeros((3, 5), np.int8), np.zeros((5, 0), np.int8)).shape == (3, 0)


@pytest.mark.parametrize("per_row,per_col,with_bias", [(False, False, False), (True, False, True),
                                                        (False, True, True), (True, True, False)])
def test_gemm_i8_f32_rescales_and_adds_bias(kernel, rng, per_row, per_col, with_bias):
    m, k, n = 45, 70, 33
    a, b = rand_i8(rng, (m, k)), rand_i8(rng, (k, n))
    sa = rng.uniform(0.001, 0.1, m).astype(np.float32) if per_row else np.float32(0.02)
    sb = rng.uniform(0.001, 0.1, n).astype(np.float32) if per_col else 0.03
    bias = rng.standard_normal(n).astype(np.float32) if with_bias else None
    c = edgelearn.gemm_i8_f32(a, b, sa, sb, bias=bias)
    want = ref(a, b) * (np.reshape(np.float64(sa), (-1, 1)) * np.reshape(np.float64(sb), (1, -1)))
    if bias is not None:
        want = want + bias
    assert c.dtype == np.float32
    np.testing.assert_allclose(c, want, rtol=2e-6, atol=1e-5)


def test_gemm_i8_f32_accepts_k_beyond_int32_limit():
    k = 131_071 * 2 + 5
    a = np.full((2, k), -128, np.int8)
    b = np.full((k, 3), -128, np.int8)
    c = edgelearn.gemm_i8_f32(a, b, 1.0, 1.0)
    np.testing.assert_allclose(c, np.full((2, 3), k * 16384.0), rtol=1e-6)


def test_gemm_i8_refuses_k_whose_int32_result_could_overflow():
    k = 131_072
    with pytest.raises(ValueError, match="overflow"):
        edgelearn.gemm_i8(np.zeros((1, k), np.int8), np.zeros((k, 1), np.int8))


@pytest.mark.parametrize(
    "a,b,exc,match",
    [
        (np.zeros((2, 3), np.float32), np.zeros((3, 2), np.int8), TypeError, "a: expected dtype int8"),
        (np.zeros((2, 3), np.int8), np.zeros((3, 2), np.int16), TypeError, "b: expected dtype int8"),
        ([[1, 2]], np.zeros((2, 2), np.int8), TypeError, "a: expected a numpy.ndarray"),
        (np.zeros((2, 3, 1), np.int8), np.zeros((3, 2), np.int8), ValueError, "a: expected 2 dimensions"),
        (np.zeros(3, np.int8), np.zeros((3, 2), np.int8), ValueError, "a: expected 2 dimensions"),
        (np.zeros((2, 3), np.int8), np.zeros((4, 2), np.int8), ValueError, "inner dimensions differ"),
        (np.zeros((8, 8), np.int8)[::2, ::2], np.zeros((4, 2), np.int8), ValueError, "not contiguous"),
        (np.zeros((4, 4), np.int8)[::-1], np.zeros((4, 2), np.int8), ValueError, "negative strides"),
    ],
)
def test_bad_operands_raise_naming_the_argument(a, b, exc, match):
    with pytest.raises(exc, match=match):
        edgelearn.gemm_i8(a, b)


def test_bad_scales_and_bias_raise():
    a, b = np.ones((4, 5), np.int8), np.ones((5, 3), np.int8)
    with pytest.raises(ValueError, match="scale_a: expected 4 values"):
        edgelearn.gemm_i8_f32(a, b, np.ones(3, np.float32), 1.0)
    with pytest.raises(TypeError, match="scale_b"):
        edgelearn.gemm_i8_f32(a, b, 1.0, np.ones(3, np.float64))
    with pytest.raises(TypeError, match="scale_b"):
        edgelearn.gemm_i8_f32(a, b, 1.0, "x")
    with pytest.raises(ValueError, match="scale_a"):
        edgelearn.gemm_i8_f32(a, b, float("nan"), 1.0)
    with pytest.raises(ValueError, match="bias: expected 3 values"):
        edgelearn.gemm_i8_f32(a, b, 1.0, 1.0, bias=np.ones(4, np.float32))
    with pytest.raises(ValueError, match="bias"):
        edgelearn.gemm_i8_f32(a, b, 1.0, 1.0, bias=np.array([1, np.inf, 2], np.float32))


def test_kernels_release_the_gil():
    """A Python thread keeps running while another thread is inside one long gemm_i8 call: with the GIL
    held, no tick could be recorded strictly inside the call's time window."""
    import time

    a = np.ones((2048, 4096), np.int8)
    b = np.ones((4096, 1024), np.int8)
    window = {}
    stop = threading.Event()
    ticks = []

    def work():
        time.sleep(0.05)  # let the counter start
        window["start"] = time.perf_counter()
        window["out"] = edgelearn.gemm_i8(a, b)
        window["end"] = time.perf_counter()
        stop.set()

    def count():
        while not stop.is_set():
            ticks.append(time.perf_counter())

    threads = [threading.Thread(target=count), threading.Thread(target=work)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert (window["out"] == 4096).all()
    start, end = window["start"], window["end"]
    assert end - start > 0.005, "the call was too short to observe"
    inside = [t for t in ticks if start + 0.001 < t < end - 0.001]
    assert len(inside) > 10, f"only {len(inside)} ticks during a {end - start:.3f}s kernel call"


def test_two_threads_call_kernels_at_once(rng):
    a, b = rand_i8(rng, (300, 200)), rand_i8(rng, (200, 100))
    want = ref(a, b)
    results = [None] * 4

    def work(i):
        for _ in range(5):
            results[i] = edgelearn.gemm_i8(a, b)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for r in results:
        np.testing.assert_array_equal(r, want)


def run_py(code, **env):
    full = dict(os.environ, **env)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=full, timeout=120)


def test_environment_forces_each_available_kernel():
    for name in edgelearn.available_kernels():
        r = run_py("import edgelearn, numpy as np; a=np.ones((5,7),np.int8);"
                   "assert (edgelearn.gemm_i8(a, a.T) == 7).all(); print(edgelearn.backend_info()['kernel'])",
                   EDGELEARN_KERNEL=name)
        assert r.returncode == 0, r.stderr
        assert r.stdout.strip() == name


def test_environment_naming_a_missing_kernel_is_an_error():
    missing = "neon" if edgelearn.backend_info()["arch"] == "x86_64" else "avx2"
    r = run_py("import edgelearn, numpy as np; edgelearn.gemm_i8(np.ones((2,2),np.int8), np.ones((2,2),np.int8))",
               EDGELEARN_KERNEL=missing)
    assert r.returncode != 0 and "KernelUnavailableError" in r.stderr and missing in r.stderr
    r = run_py("import edgelearn; edgelearn.set_kernel('bogus')")
    assert "unknown kernel" in r.stderr


def test_threads_setting_from_environment_and_setter():
    r = run_py("import edgelearn; print(edgelearn.backend_info()['threads'])", EDGELEARN_NUM_THREADS="1")
    assert r.stdout.strip() == "1", r.stderr
    edgelearn.set_num_threads(1)
    assert edgelearn.get_num_threads() == 1
    with pytest.raises(ValueError, match="threads"):
        edgelearn.set_num_threads(0)
    edgelearn.set_num_threads(2)
    assert edgelearn.get_num_threads() == 2


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork (POSIX)")
def test_kernels_work_in_a_forked_child():
    a = np.ones((300, 300), np.int8)
    edgelearn.gemm_i8(a, a)  # the pool exists in the parent before fork
    pid = os.fork()
    if pid == 0:  # child: must not deadlock on the parent's (absent) worker threads
        ok = bool((edgelearn.gemm_i8(a, a) == 300).all())
        os._exit(0 if ok else 1)
    _, status = os.waitpid(pid, 0)
    assert os.WEXITSTATUS(status) == 0


def test_backend_info_fields():
    info = edgelearn.backend_info()
    assert {"cpu_features", "kernel", "threads", "version"} <= set(info)
    assert info["kernel"] in edgelearn.available_kernels()
    assert info["version"] == edgelearn.__version__


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork (POSIX)")
def test_a_forked_child_of_a_thread_that_owns_the_pool_runs_kernels():
    """The main thread of a fresh process with 2 threads becomes worker 0 of its pool (it takes part in every
    parallel op); after fork its workers are gone, and the child must neither hang nor compute wrongly."""
    import subprocess
    import sys

    code = r'''
import os, numpy as np, edgelearn
from edgelearn import _native
assert edgelearn.get_num_threads() == 2
a = np.ones((300, 300), np.int8)
edgelearn.gemm_i8(a, a)
x = np.random.default_rng(0).standard_normal((1 << 20,)).astype(np.float32)
q0, s0 = edgelearn.quantize(x, rounding="stochastic", seed=3)
pid = os.fork()
if pid == 0:
    q, s = edgelearn.quantize(x, rounding="stochastic", seed=3)
    ok = bool((edgelearn.gemm_i8(a, a) == 300).all()) and np.array_equal(q, q0) and s == s0
    os._exit(0 if ok else 1)
_, status = os.waitpid(pid, 0)
raise SystemExit(os.WEXITSTATUS(status))
'''
    env = dict(os.environ, EDGELEARN_NUM_THREADS="2")
    r = subprocess.run([sys.executable, "-c", code], env=env, timeout=120, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
