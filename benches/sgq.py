"""SGQ codec benchmarks.

(a) codec throughput: encode / decode GB/s of float32 input at b = 2, 4, 8 (and the uniform 4-bit and
    fp16 baselines) on a 64x32x32x32 post-ReLU feature tensor, next to a numpy memory copy of the same
    tensor measured in the same run. Per-core numbers: ``EDGELEARN_NUM_THREADS=1 python benches/sgq.py``.
    Targets (per core, 4 bits): encode >= 2 GB/s, decode >= 4 GB/s.

(b) the split-training table (Fashion-MNIST) comes with ``edgelearn.collab``.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

import edgelearn
from edgelearn import sgq


def best_seconds(fn, repeat):
    fn()
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def features(shape, seed=0):
    rng = np.random.default_rng(seed)
    scales = np.geomspace(0.05, 5.0, shape[1]).astype(np.float32)
    return np.maximum(rng.standard_normal(shape, dtype=np.float32) * scales[None, :, None, None], 0)


def codec_throughput(repeat):
    x = features((64, 32, 32, 32))
    gb = x.nbytes / 1e9
    out = np.empty_like(x)
    t_copy = best_seconds(lambda: np.copyto(out, x), repeat)
    print(f"threads={edgelearn.get_num_threads()}  tensor {x.shape} float32 = {x.nbytes / 2**20:.0f} MiB")
    print(f"{'config':<12} {'frame MiB':>9} {'ratio':>6} {'rel.L2':>8} {'encode GB/s':>12} {'decode GB/s':>12}")
    print(f"{'numpy copy':<12} {'':>9} {'':>6} {'':>8} {gb / t_copy:>12.2f} {gb / t_copy:>12.2f}")
    configs = [(f"sgq-{b}bit", dict(bits=b)) for b in (2, 4, 8)]
    configs += [("uniform-4bit", dict(bits=4, mode="uniform")), ("fp16", dict(mode="fp16"))]
    for name, kw in configs:
        frame = sgq.encode(x, **kw)
        te = best_seconds(lambda: sgq.encode(x, **kw), repeat)
        td = best_seconds(lambda: sgq.decode(frame), repeat)
        err = np.linalg.norm(sgq.decode(frame) - x) / np.linalg.norm(x)
        print(
            f"{name:<12} {len(frame) / 2**20:>9.2f} {x.nbytes / len(frame):>6.1f} {err:>8.4f} "
            f"{gb / te:>12.2f} {gb / td:>12.2f}"
        )


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=20)
    args = ap.parse_args()
    codec_throughput(args.repeat)


if __name__ == "__main__":
    main()
