"""SGQ codec benchmarks.

(a) codec throughput: encode / decode GB/s of float32 input at b = 2, 4, 8 (and the uniform 4-bit and
    fp16 baselines) on a 64x32x32x32 post-ReLU feature tensor, next to a numpy memory copy of the same
    tensor measured in the same run. Per-core numbers: ``EDGELEARN_NUM_THREADS=1 python benches/sgq.py``.
    Targets (per core, 4 bits): encode >= 2 GB/s, decode >= 4 GB/s.

(b) split training on Fashion-MNIST through ``edgelearn.collab`` (in-process transport: the same envelopes,
    chunks and byte counts as gRPC, no sockets): fp32 (no codec), fp16, uniform 4-bit, SGQ 4-bit, SGQ 2-bit,
    same seed and epochs: test accuracy through the split, bytes per sample each direction (features + labels
    up, gradients down, envelopes included), compression vs fp32, relative L2 reconstruction error of the
    features and the gradients (mean over steps). Then a bytes-vs-error check on the trained features: SGQ
    4-bit against uniform quantization at 4, 5 and 6 bits. Targets: SGQ 4-bit within 1.0 point of fp32,
    >= 7x less traffic than fp32, lower feature error than uniform 4-bit.
    ``python benches/sgq.py --part split --epochs 2`` (needs ``apt-get install dataset-fashion-mnist``).
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


SPLIT_CONFIGS = (
    ("fp32", dict(mode="fp32")),
    ("fp16", dict(mode="fp16")),
    ("uniform-4bit", dict(mode="uniform", bits=4)),
    ("sgq-4bit", dict(mode="sgq", bits=4)),
    ("sgq-2bit", dict(mode="sgq", bits=2)),
)


def split_training(args):
    from edgelearn import collab, data

    splits = data.get_dataset(args.dataset)
    train, test = splits.train, splits.test
    if args.train_subset:
        idx = np.random.default_rng(args.seed).permutation(len(train))[:args.train_subset]
        train = data.ArrayDataset(train.images[idx], train.labels[idx], train.name, train.classes)
    print(f"\nsplit training: {args.model} split at {args.split} on {args.dataset}, {len(train)} train / "
          f"{min(len(test), args.test_subset or len(test))} test images, {args.epochs} epochs, batch "
          f"{args.batch_size}, edge {args.precision}, seed {args.seed}, threads {edgelearn.get_num_threads()}")
    rows = []
    edges = {}
    for name, kw in SPLIT_CONFIGS:
        cloud = collab.Cloud(args.model, args.split, seed=args.seed)
        edge = collab.Edge(collab.LocalTransport(cloud), train.image_shape, train.num_classes,
                           precision=args.precision, group=args.group, stripe_rows=args.stripe_rows, **kw)
        r = collab.train_edge(edge, train, test, epochs=args.epochs, batch_size=args.batch_size, seed=args.seed,
                              eval_limit=args.test_subset or None, progress=not args.no_progress)
        rows.append((name, r))
        edges[name] = edge
        print(f"  {name}: test accuracy {100 * r['test_accuracy']:.2f}%  ({r['train_seconds']:.0f} s)", flush=True)
    base = rows[0][1]
    print(f"\n{'config':<13} {'test acc %':>10} {'up B/smp':>9} {'down B/smp':>10} {'ratio':>6} "
          f"{'feat relL2':>10} {'grad relL2':>10}")
    for name, r in rows:
        print(f"{name:<13} {100 * r['test_accuracy']:>10.2f} {r['bytes_up_per_sample']:>9.1f} "
              f"{r['bytes_down_per_sample']:>10.1f} {base['bytes_per_sample'] / r['bytes_per_sample']:>6.2f} "
              f"{r['feature_rel_l2']:>10.4f} {r['grad_rel_l2']:>10.4f}")
    result = dict(rows)
    diff = 100 * (result["sgq-4bit"]["test_accuracy"] - base["test_accuracy"])
    ratio = base["bytes_per_sample"] / result["sgq-4bit"]["bytes_per_sample"]
    print(f"\nSGQ 4-bit minus fp32 test accuracy: {diff:+.2f} points (target >= -1.0); traffic {ratio:.2f}x "
          f"smaller than fp32, both directions (target >= 7)")
    bytes_vs_error(edges["sgq-4bit"], test, args)


def bytes_vs_error(edge, test, args):
    """Frame bytes and feature error of SGQ vs uniform quantization on the trained edge's test features."""
    from edgelearn import no_grad, tensor

    edge.model.eval()
    with no_grad():
        x = np.ascontiguousarray(edge.model(tensor(test.images[:args.batch_size])).data)
    n = len(x)
    print(f"\nfeature frames of one test batch {x.shape} from the trained SGQ 4-bit edge (per sample):")
    print(f"{'codec':<13} {'bytes':>8} {'rel.L2':>8}")
    for name, kw in (("sgq-4bit", dict(bits=4)), ("sgq-3bit", dict(bits=3)), ("uniform-4bit", dict(mode="uniform", bits=4)),
                     ("uniform-5bit", dict(mode="uniform", bits=5)), ("uniform-6bit", dict(mode="uniform", bits=6))):
        frame = sgq.encode(x, group=args.group, stripe_rows=args.stripe_rows, **kw)
        err = np.linalg.norm(sgq.decode(frame) - x) / np.linalg.norm(x)
        print(f"{name:<13} {len(frame) / n:>8.1f} {err:>8.4f}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--part", choices=("codec", "split", "all"), default="all")
    ap.add_argument("--repeat", type=int, default=20, help="codec timing repetitions (best of)")
    ap.add_argument("--dataset", default="fashion-mnist")
    ap.add_argument("--model", default="cnn")
    ap.add_argument("--split", type=int, default=4, help="edge = layers [0, split) (default 4: 16x14x14 features)")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--train-subset", type=int, default=0, help="train on this many random images (0 = all)")
    ap.add_argument("--test-subset", type=int, default=0, help="evaluate on the first N test images (0 = all)")
    ap.add_argument("--precision", choices=("fp32", "int8"), default="fp32", help="edge part precision")
    ap.add_argument("--group", type=int, default=4)
    ap.add_argument("--stripe-rows", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args()
    if args.part in ("codec", "all"):
        codec_throughput(args.repeat)
    if args.part in ("split", "all"):
        split_training(args)


if __name__ == "__main__":
    main()
