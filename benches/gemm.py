"""INT8 GEMM throughput: edgelearn vs numpy float32 matmul (and PyTorch when importable), same process.

Prints one table: for each shape and thread count, edgelearn INT8 GOP/s, numpy float32 GFLOP/s and their
ratio (2·M·N·K operations either way). Operands are laid out as the training GEMMs use them (``T`` marks a
transposed, i.e. F-ordered, view that both libraries read in place).

    python benches/gemm.py                 # full table, 1 and 2 threads
    python benches/gemm.py --quick         # small shapes only (a smoke run)
    python benches/gemm.py --json out.json # also write the rows as JSON
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np

import edgelearn

try:  # numpy's BLAS thread count, set per row so both libraries get the same cores
    from threadpoolctl import threadpool_limits
except ImportError:  # pragma: no cover - optional
    threadpool_limits = None

try:
    import torch
except ImportError:
    torch = None

# (M, K, N, layout): layout says which operand is a transposed view: "NN", "NT" (B = Wᵀ), "TN" (A = dYᵀ)
SQUARE = [(256, 256, 256, "NN"), (512, 512, 512, "NN"), (1024, 1024, 1024, "NN"), (2048, 2048, 2048, "NN")]
TRAINING = [
    (32768, 27, 16, "NT"),  # conv forward, im2col rows · Wᵀ (3x3x3 -> 16)
    (32768, 144, 32, "NT"),  # conv forward (16x3x3 -> 32)
    (8192, 288, 64, "NT"),  # conv forward (32x3x3 -> 64)
    (144, 8192, 32, "TN"),  # conv weight gradient dYᵀ·X
    (64, 784, 256, "NT"),  # linear forward X·Wᵀ
    (784, 64, 256, "TN"),  # linear weight gradient Xᵀ·dY
]


def operands(m, k, n, layout, rng):
    a = rng.integers(-127, 128, size=(m, k) if layout[0] == "N" else (k, m), dtype=np.int16).astype(np.int8)
    b = rng.integers(-127, 128, size=(k, n) if layout[1] == "N" else (n, k), dtype=np.int16).astype(np.int8)
    if layout[0] == "T":
        a = a.T
    if layout[1] == "T":
        b = b.T
    return a, b


def best_time(fn, min_time=0.3, max_reps=200):
    fn()  # warm-up (page faults, packing buffers, BLAS init)
    times = []
    t_end = time.perf_counter() + min_time
    while len(times) < 3 or (time.perf_counter() < t_end and len(times) < max_reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def measure(m, k, n, layout, threads, rng):
    a, b = operands(m, k, n, layout, rng)
    af, bf = a.astype(np.float32), b.astype(np.float32)
    if layout[0] == "T":
        af = np.asfortranarray(af)
    if layout[1] == "T":
        bf = np.asfortranarray(bf)
    ops = 2.0 * m * n * k
    edgelearn.set_num_threads(threads)
    row = {"m": m, "k": k, "n": n, "layout": layout, "threads": threads, "kernel": edgelearn.backend_info()["kernel"]}
    row["edgelearn_int8_gops"] = ops / best_time(lambda: edgelearn.gemm_i8(a, b)) / 1e9
    if threadpool_limits is not None:
        with threadpool_limits(limits=threads):
            row["numpy_f32_gflops"] = ops / best_time(lambda: af @ bf) / 1e9
    else:
        row["numpy_f32_gflops"] = ops / best_time(lambda: af @ bf) / 1e9
    row["ratio_vs_numpy"] = row["edgelearn_int8_gops"] / row["numpy_f32_gflops"]
    if torch is not None:
        torch.set_num_threads(threads)
        ta, tb = torch.from_numpy(np.ascontiguousarray(af)), torch.from_numpy(np.ascontiguousarray(bf))
        row["torch_f32_gflops"] = ops / best_time(lambda: ta @ tb) / 1e9
        try:
            ia, ib = torch.from_numpy(np.ascontiguousarray(a)), torch.from_numpy(np.ascontiguousarray(b))
            row["torch_int_mm_gops"] = ops / best_time(lambda: torch._int_mm(ia, ib)) / 1e9
        except (RuntimeError, AttributeError):  # _int_mm has shape limits on CPU
            row["torch_int_mm_gops"] = None
    return row


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small shapes only")
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="thread counts (default: 1 2)")
    ap.add_argument("--json", metavar="PATH", help="write the rows as JSON")
    args = ap.parse_args(argv)
    if threadpool_limits is None:
        print("note: threadpoolctl is not installed, numpy uses its default thread count "
              "(pip install threadpoolctl for a per-row match)")
    shapes = SQUARE[:2] + TRAINING[4:] if args.quick else SQUARE + TRAINING
    rng = np.random.default_rng(0)
    info = edgelearn.backend_info()
    print(f"edgelearn {info['version']}  kernel={info['kernel']}  cpu_features={','.join(info['cpu_features'])}")
    cols = ["M", "K", "N", "lay", "thr", "int8 GOP/s", "np f32 GFLOP/s", "ratio"]
    if torch is not None:
        cols += ["torch f32", "torch int_mm"]
    print("  ".join(f"{c:>14}" if i > 4 else f"{c:>6}" for i, c in enumerate(cols)))
    rows = []
    for threads in args.threads:
        for m, k, n, layout in shapes:
            r = measure(m, k, n, layout, threads, rng)
            rows.append(r)
            cells = [f"{m:>6}", f"{k:>6}", f"{n:>6}", f"{layout:>6}", f"{threads:>6}",
                     f"{r['edgelearn_int8_gops']:>14.1f}", f"{r['numpy_f32_gflops']:>14.1f}",
                     f"{r['ratio_vs_numpy']:>13.2f}x"]
            if torch is not None:
                im = r.get("torch_int_mm_gops")
                cells += [f"{r['torch_f32_gflops']:>14.1f}", f"{im:>14.1f}" if im else f"{'n/a':>14}"]
            print("  ".join(cells), flush=True)
    by = {(r["m"], r["k"], r["n"], r["threads"]): r["edgelearn_int8_gops"] for r in rows}
    if (1024, 1024, 1024, 1) in by and (1024, 1024, 1024, 2) in by:
        print(f"2-thread scaling at 1024^3: {by[(1024, 1024, 1024, 2)] / by[(1024, 1024, 1024, 1)]:.2f}x")
    edgelearn.set_num_threads(os.cpu_count() or 1)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"backend": info, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
