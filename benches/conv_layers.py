"""Per-layer convolution times of the bundled CNN (batch 32, 3x3, padding 1), FP32 against INT8 in the same
run: forward, backward (dX and dW), and the INT8 quantization of the input and of the gradient.

    python benches/conv_layers.py              # one thread
    python benches/conv_layers.py --threads 2
"""

import argparse
import os
import time

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np  # noqa: E402

import edgelearn as el  # noqa: E402
from edgelearn import _native  # noqa: E402


def best_us(f, n=50, rep=7):
    f()
    best = float("inf")
    for _ in range(rep):
        t = time.perf_counter()
        for _ in range(n):
            f()
        best = min(best, (time.perf_counter() - t) / n * 1e6)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    el.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    total = {"fp32": 0.0, "int8": 0.0}
    print("layer            fp32 fwd  fp32 bwd | int8 fwd  int8 bwd  quant x  quant dY   (µs, best of 7)")
    for n, c, h, o in [(32, 1, 28, 16), (32, 16, 14, 32), (32, 32, 7, 64)]:
        x = rng.standard_normal((n, c, h, h)).astype(np.float32)
        w = (rng.standard_normal((o, c, 3, 3)) * 0.1).astype(np.float32)
        b = np.zeros(o, np.float32)
        gy = rng.standard_normal((n, o, h, h)).astype(np.float32)
        xq, sx = el.quantize(x)
        wq, sw = el.quantize(w)
        gq, sg = el.quantize(gy)
        sx, sw, sg = float(sx), float(sw), float(sg)
        need_dx = c > 1  # the first layer's input needs no gradient
        ff = best_us(lambda: _native.conv2d_f32_forward(x, w, b, (1, 1), (1, 1)))
        fb = best_us(lambda: _native.conv2d_f32_backward(x, w, gy, (1, 1), (1, 1), need_dx=need_dx))
        qf = best_us(lambda: _native.conv2d_i8_forward(xq, sx, wq, sw, b, (1, 1), (1, 1)))
        qb = best_us(lambda: _native.conv2d_i8_backward(xq, sx, wq, sw, gq, sg, (1, 1), (1, 1), need_dx=need_dx))
        qx = best_us(lambda: el.quantize(x, rounding="stochastic", seed=1))
        qg = best_us(lambda: el.quantize(gy, rounding="stochastic", seed=2, clip=("minmax", 0.95)))
        total["fp32"] += ff + fb
        total["int8"] += qf + qb + qx + qg
        print(f"{c:2d}->{o:2d} @{h:2d}x{h:<2d}   {ff:8.0f}  {fb:8.0f} | {qf:8.0f}  {qb:8.0f}  {qx:7.0f}  {qg:8.0f}")
    print(f"all layers: fp32 {total['fp32']:.0f} µs, int8 (with quantization) {total['int8']:.0f} µs: "
          f"{total['fp32'] / total['int8']:.2f}x")


if __name__ == "__main__":
    main()
