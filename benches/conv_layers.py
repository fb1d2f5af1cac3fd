"""Per-layer convolution times of the bundled CNN (batch 32, 3x3, padding 1), FP32 against INT8 in the same
run: forward, backward (dX and dW), and the INT8 quantization of the input and of the gradient. Then the
depthwise 3x3 and 1x1 layers of MobileNetV2 (batch 32): edgelearn FP32 and INT8 forward + backward (INT8: the
Octo layer step, ``octo_forward``/``octo_backward``, quantization included) against PyTorch FP32
(``torch.nn.functional.conv2d`` and autograd) when torch is importable.

    python benches/conv_layers.py              # one thread
    python benches/conv_layers.py --threads 2
    python benches/conv_layers.py --only mobilenet
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
    ap.add_argument("--only", choices=("cnn", "mobilenet"), default=None, help="one of the two tables")
    args = ap.parse_args()
    el.set_num_threads(args.threads)
    if args.only in (None, "cnn"):
        cnn_layers(args)
    if args.only in (None, "mobilenet"):
        mobilenet_layers(args)


# (label, batch, in channels, size, out channels, kernel, stride, groups)
MOBILENET_LAYERS = [
    ("dw3x3 32ch @56", 32, 32, 56, 32, 3, 1, 32),
    ("dw3x3 96ch @28 s2", 32, 96, 28, 96, 3, 2, 96),
    ("dw3x3 144ch @14", 32, 144, 14, 144, 3, 1, 144),
    ("dw3x3 384ch @7", 32, 384, 7, 384, 3, 1, 384),
    ("pw 32->16 @56", 32, 32, 56, 16, 1, 1, 1),
    ("pw 16->96 @56", 32, 16, 56, 96, 1, 1, 1),
    ("pw 144->24 @28", 32, 144, 28, 24, 1, 1, 1),
    ("pw 384->64 @7", 32, 384, 7, 64, 1, 1, 1),
]


def mobilenet_layers(args) -> None:
    try:
        import torch

        torch.set_num_threads(args.threads)
    except ImportError:
        torch = None
        print("note: torch is not importable; no PyTorch column")
    rng = np.random.default_rng(1)
    print(f"\nMobileNetV2 layers, forward + backward (dX, dW), {args.threads} thread(s), µs best of 7")
    print(f"{'layer':<20} {'fp32':>8} {'int8':>8} {'torch':>8} {'int8/fp32':>10} {'fp32/torch':>11}")
    for label, n, c, h, o, k, s, g in MOBILENET_LAYERS:
        x = rng.standard_normal((n, c, h, h)).astype(np.float32)
        w = (rng.standard_normal((o, c // g, k, k)) * 0.1).astype(np.float32)
        pad = (k - 1) // 2
        oh = (h + 2 * pad - k) // s + 1
        gy = rng.standard_normal((n, o, oh, oh)).astype(np.float32)
        st, pd = (s, s), (pad, pad)
        if g > 1:
            def fp32():
                _native.conv2d_grouped_f32_forward(x, w, None, st, pd, None, g)
                _native.conv2d_grouped_f32_backward(x, w, gy, st, pd, None, g)
        else:
            def fp32():
                _native.conv2d_f32_forward(x, w, None, st, pd)
                _native.conv2d_f32_backward(x, w, gy, st, pd)

        def int8():
            # the Octo layer step as training runs it: one core call per direction, quantization of X,
            # W and dY (PRC) inside (no bias: the layers of MobileNetV2 have none)
            _, saved = _native.octo_forward(x, w, None, None, st, pd, "stochastic", "nearest", "stochastic",
                                            ("minmax", 0.95), False, 1, True, None, g)
            _native.octo_backward(saved, gy, need_dx=True, need_dw=True, need_db=False)

        reps = max(2, int(2e7 / (n * c * h * h * k * k * max(1, o // g))))
        tf, tq = best_us(fp32, n=reps), best_us(int8, n=reps)
        tt = float("nan")
        if torch is not None:
            xt = torch.from_numpy(x).requires_grad_(True)
            wt = torch.from_numpy(w).requires_grad_(True)
            gt = torch.from_numpy(gy)

            def torch_step():
                y = torch.nn.functional.conv2d(xt, wt, None, s, pad, 1, g)
                y.backward(gt)
                xt.grad = None
                wt.grad = None

            tt = best_us(torch_step, n=reps)
        print(f"{label:<20} {tf:8.0f} {tq:8.0f} {tt:8.0f} {tf / tq:9.2f}x {tt / tf:10.2f}x", flush=True)


def cnn_layers(args) -> None:
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
