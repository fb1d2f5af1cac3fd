"""FP32 baseline check: edgelearn's FP32 GEMM (``matmul_f32``, the ``gemm`` crate in edgelearn's thread pool)
vs numpy float32 matmul (OpenBLAS) on the GEMMs the FP32 training layers run, same process, same threads.

Every INT8 speed claim is a ratio against edgelearn FP32, so FP32 must not be a straw man: this prints
GFLOP/s of both and their ratio per shape, and the geometric mean. The shapes are the CNN of ``octo.md`` at
batch 32 in the conv layers' "weights on the left" orientation (``Y = W·col``, ``dW = dY·colᵀ``,
``dcol = Wᵀ·dY``; ``T`` marks an operand read as a transposed view) and the Linear layers of the MLP.

    python benches/fp32_gemm.py                 # 1 and 2 threads
    python benches/fp32_gemm.py --threads 1

Note: some machines set OPENBLAS_CORETYPE / OPENBLAS_L2_SIZE for old OpenBLAS builds, which slows a current
numpy. For numpy's best, run with both unset: ``env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python ...``
(the script prints which OpenBLAS kernel numpy runs when threadpoolctl is installed).
"""

from __future__ import annotations

import argparse
import math
import os
import time

import numpy as np

import edgelearn
from edgelearn import _native

try:
    from threadpoolctl import threadpool_info, threadpool_limits
except ImportError:  # pragma: no cover - optional
    threadpool_info = threadpool_limits = None

# (M, K, N, layout, what)
SHAPES = [
    (16, 9, 25088, "NN", "conv1 forward  W·col (32 images side by side)"),
    (32, 144, 1764, "NN", "conv2 forward  W·col (9 images)"),
    (64, 288, 196, "NN", "conv3 forward  W·col (4 images)"),
    (16, 25088, 9, "NT", "conv1 dW = dY·colᵀ"),
    (32, 1764, 144, "NT", "conv2 dW = dY·colᵀ"),
    (64, 196, 288, "NT", "conv3 dW = dY·colᵀ"),
    (144, 32, 1764, "TN", "conv2 dcol = Wᵀ·dY"),
    (288, 64, 196, "TN", "conv3 dcol = Wᵀ·dY"),
    (32, 784, 256, "NT", "MLP fc1 forward X·Wᵀ"),
    (32, 256, 784, "NN", "MLP fc1 dX = dY·W"),
    (256, 32, 784, "TN", "MLP fc1 dW = dYᵀ·X"),
]


def operands(m, k, n, layout, rng):
    a = rng.standard_normal((m, k) if layout[0] == "N" else (k, m), dtype=np.float32)
    b = rng.standard_normal((k, n) if layout[1] == "N" else (n, k), dtype=np.float32)
    return (a if layout[0] == "N" else a.T), (b if layout[1] == "N" else b.T)


def best_time(fn, min_time=0.25, max_reps=500):
    fn()
    times = []
    t_end = time.perf_counter() + min_time
    while len(times) < 5 or (time.perf_counter() < t_end and len(times) < max_reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    args = ap.parse_args(argv)
    if threadpool_limits is None:
        print("note: threadpoolctl is not installed; numpy keeps its default thread count")
    else:
        blas = [i for i in threadpool_info() if i.get("user_api") == "blas"]
        if blas:
            print(f"numpy BLAS: {blas[0].get('internal_api')} {blas[0].get('version')} "
                  f"arch={blas[0].get('architecture')}")
    rng = np.random.default_rng(0)
    print(f"{'M':>5} {'K':>6} {'N':>6} {'lay':>3} {'thr':>3} {'edgelearn':>10} {'numpy':>10} {'ratio':>6}  GEMM")
    for threads in args.threads:
        edgelearn.set_num_threads(threads)
        ratios = []
        for m, k, n, layout, what in SHAPES:
            a, b = operands(m, k, n, layout, rng)
            flop = 2.0 * m * k * n
            if threadpool_limits is not None:
                with threadpool_limits(limits=threads, user_api="blas"):
                    t_np = best_time(lambda: a @ b)
            else:
                t_np = best_time(lambda: a @ b)
            t_el = best_time(lambda: _native.matmul_f32(a, b))
            np.testing.assert_allclose(_native.matmul_f32(a, b), a @ b, rtol=1e-3, atol=1e-3 * math.sqrt(k))
            ratio = t_np / t_el
            ratios.append(ratio)
            print(f"{m:>5} {k:>6} {n:>6} {layout:>3} {threads:>3} {flop / t_el / 1e9:>10.1f} "
                  f"{flop / t_np / 1e9:>10.1f} {ratio:>5.2f}x  {what}", flush=True)
        gm = math.exp(sum(math.log(r) for r in ratios) / len(ratios))
        print(f"{threads} thread(s): edgelearn FP32 / numpy FP32 geometric mean {gm:.2f}x, "
              f"min {min(ratios):.2f}x")
    edgelearn.set_num_threads(os.cpu_count() or 1)


if __name__ == "__main__":
    main()
