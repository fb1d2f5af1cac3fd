"""SGQ codec benchmarks.

(a) codec throughput: encode / decode GB/s of float32 input at b = 2, 4, 8 (and the uniform 4-bit and
    fp16 baselines) on a 64x32x32x32 post-ReLU feature tensor, next to a numpy memory copy of the same
    tensor measured in the same run. Per-core numbers: ``EDGELEARN_NUM_THREADS=1 python benches/sgq.py``.
    Targets (per core, 4 bits): encode >= 2 GB/s, decode >= 4 GB/s.

(b) split training on Fashion-MNIST through ``edgelearn.collab`` (in-process transport: the same envelopes,
    chunks and byte counts as gRPC, no sockets): fp32 (no codec), fp16, uniform 4-bit, SGQ 4-bit (collab's
    feature default: groups of 1 channel, stripes of 1 row, ranges per frame, constant blocks as one code),
    SGQ 4-bit "blocks" (features like the gradients: groups of 4, stripes of H/4 rows, ranges per sample),
    SGQ 2-bit (feature default), and the >= 16x rows: SGQ 2-bit with 2-bit gradients in larger range blocks
    (``sgq-2bit-g4r7``: groups of 4 channels x stripes of 7 rows; ``-g8r7``; ``-g16``: one range per sample;
    ``sgq-2bit-g4r7-clip``: the 4 x 7 blocks with range clipping, features to mean + 2.5 sigma and gradients
    to mean +- 1.5 sigma of each block), same seed and epochs: test
    accuracy through the split, bytes per sample each direction (features + labels up, gradients down,
    envelopes included), compression vs fp32, relative L2 reconstruction error of the features and the
    gradients (mean over steps). Then a bytes-vs-error table on the trained features of one batch: SGQ at
    several (bits, group, stripe rows, range scope) settings against uniform quantization at 4, 5 and 6
    bits, frames as sent inside a stream (the channel order already known to the receiver), and the SGQ
    setting of least error whose frame is no larger than uniform 4-bit's. Targets: SGQ 4-bit within 1.0
    point of fp32, >= 7x less traffic than fp32, lower feature error than uniform 4-bit; a <= 2-bit row with
    >= 16x less traffic than fp32 within 1.0 point of fp32 at every seed. ``--seeds 0,1,2`` runs the table at
    each seed (fp32 retrained at each) and ends with every row's accuracy vs fp32 per seed, median and worst.
    ``python benches/sgq.py --part split --epochs 2`` (needs ``apt-get install dataset-fashion-mnist``);
    the >= 16x row at three seeds: ``python benches/sgq.py --part split --seeds 0,1,2 --configs
    fp32,sgq-2bit-g4r7,sgq-2bit-g4r7-clip``.
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
    print(f"{'config':<14} {'frame MiB':>9} {'ratio':>6} {'rel.L2':>8} {'encode GB/s':>12} {'decode GB/s':>12}")
    print(f"{'numpy copy':<14} {'':>9} {'':>6} {'':>8} {gb / t_copy:>12.2f} {gb / t_copy:>12.2f}")
    configs = [(f"sgq-{b}bit", dict(bits=b)) for b in (2, 4, 8)]
    # the collab feature setting: per-channel rows, ranges per frame, constant blocks as one code
    configs += [("sgq-4bit-rows", dict(bits=4, group=1, stripe_rows=1, ranges="frame", constant_blocks=True))]
    configs += [("uniform-4bit", dict(bits=4, mode="uniform")), ("fp16", dict(mode="fp16"))]
    for name, kw in configs:
        frame = sgq.encode(x, **kw)
        te = best_seconds(lambda: sgq.encode(x, **kw), repeat)
        td = best_seconds(lambda: sgq.decode(frame), repeat)
        err = np.linalg.norm(sgq.decode(frame) - x) / np.linalg.norm(x)
        print(
            f"{name:<14} {len(frame) / 2**20:>9.2f} {x.nbytes / len(frame):>6.1f} {err:>8.4f} "
            f"{gb / te:>12.2f} {gb / td:>12.2f}"
        )


SPLIT_CONFIGS = (
    ("fp32", dict(mode="fp32")),
    ("fp16", dict(mode="fp16")),
    ("uniform-4bit", dict(mode="uniform", bits=4)),
    ("sgq-4bit", dict(mode="sgq", bits=4)),
    ("sgq-4bit-blocks", dict(mode="sgq", bits=4, feature_group=4, feature_stripe_rows=None, feature_ranges="sample",
                             constant_blocks=False)),
    ("sgq-2bit", dict(mode="sgq", bits=2)),
    # the >= 16x settings: 2-bit features as above, 2-bit gradients with fewer ranges per sample (the ranges
    # are 80 of the 867 B/sample of the gradients in groups of 4 channels x stripes of H/4 rows)
    ("sgq-2bit-g4r7", dict(mode="sgq", bits=2, group=4, stripe_rows=7)),
    ("sgq-2bit-g8r7", dict(mode="sgq", bits=2, group=8, stripe_rows=7)),
    ("sgq-2bit-g16", dict(mode="sgq", bits=2, group=16, stripe_rows=14)),
    # the same 4 x 7 blocks with range clipping (Octo's PRC per SGQ block): features to mean + 2.5 sigma,
    # gradients to mean +- 1.5 sigma, each within the block's [min, max]; same frame sizes
    ("sgq-2bit-g4r7-clip", dict(mode="sgq", bits=2, group=4, stripe_rows=7, feature_clip="sigma:2.5",
                                grad_clip="sigma:1.5")),
)


def split_training(args):
    from edgelearn import collab, data

    splits = data.get_dataset(args.dataset)
    seeds = [int(v) for v in args.seeds.split(",")] if args.seeds else [args.seed]
    chosen = args.configs.split(",") if args.configs else [name for name, _ in SPLIT_CONFIGS]
    unknown = set(chosen) - {name for name, _ in SPLIT_CONFIGS}
    if unknown or "fp32" not in chosen:
        raise SystemExit(f"--configs: unknown {sorted(unknown)} (fp32, the baseline, is required); "
                         f"known: {', '.join(name for name, _ in SPLIT_CONFIGS)}")
    per_seed = {}
    for seed in seeds:
        train, test = splits.train, splits.test
        if args.train_subset:
            idx = np.random.default_rng(seed).permutation(len(train))[:args.train_subset]
            train = data.ArrayDataset(train.images[idx], train.labels[idx], train.name, train.classes)
        print(f"\nsplit training: {args.model} split at {args.split} on {args.dataset}, {len(train)} train / "
              f"{min(len(test), args.test_subset or len(test))} test images, {args.epochs} epochs, batch "
              f"{args.batch_size}, edge {args.precision}, seed {seed}, threads {edgelearn.get_num_threads()}")
        rows = []
        edges = {}
        for name, kw in SPLIT_CONFIGS:
            if name not in chosen:
                continue
            kw = dict(dict(group=args.group, stripe_rows=args.stripe_rows), **kw)
            cloud = collab.Cloud(args.model, args.split, seed=seed)
            edge = collab.Edge(collab.LocalTransport(cloud), train.image_shape, train.num_classes,
                               precision=args.precision, **kw)
            r = collab.train_edge(edge, train, test, epochs=args.epochs, batch_size=args.batch_size, seed=seed,
                                  eval_limit=args.test_subset or None, progress=not args.no_progress)
            rows.append((name, r))
            edges[name] = edge
            print(f"  {name}: test accuracy {100 * r['test_accuracy']:.2f}%  ({r['train_seconds']:.0f} s)",
                  flush=True)
        per_seed[seed] = rows
        split_table(rows, seed)
        if "sgq-4bit" in edges and seed == seeds[-1]:
            bytes_vs_error(edges["sgq-4bit"], test, args)
    if len(seeds) > 1:
        seeds_summary(per_seed)


def split_table(rows, seed):
    base = rows[0][1]
    print(f"\n{'config':<19} {'test acc %':>10} {'up B/smp':>9} {'down B/smp':>10} {'ratio':>6} "
          f"{'feat relL2':>10} {'grad relL2':>10}   (seed {seed})")
    for name, r in rows:
        print(f"{name:<19} {100 * r['test_accuracy']:>10.2f} {r['bytes_up_per_sample']:>9.1f} "
              f"{r['bytes_down_per_sample']:>10.1f} {base['bytes_per_sample'] / r['bytes_per_sample']:>6.2f} "
              f"{r['feature_rel_l2']:>10.4f} {r['grad_rel_l2']:>10.4f}")
    result = dict(rows)
    low = [(base["bytes_per_sample"] / r["bytes_per_sample"], name, r) for name, r in rows if r["bits"] <= 2]
    fit = [(100 * (r["test_accuracy"] - base["test_accuracy"]), ratio, name) for ratio, name, r in low
           if ratio >= 16]
    if fit:
        diff, ratio, name = max(fit)
        print(f"\nbest <= 2-bit setting with >= 16x less traffic than fp32 (both directions) at seed {seed}: {name}, "
              f"{ratio:.2f}x, test accuracy {diff:+.2f} points vs fp32 (target >= -1.0): "
              f"{'MET' if diff >= -1.0 else 'NOT MET'}")
    elif low:
        print("\nno <= 2-bit setting reached 16x less traffic than fp32")
    if "sgq-4bit" not in result:
        return
    diff = 100 * (result["sgq-4bit"]["test_accuracy"] - base["test_accuracy"])
    ratio = base["bytes_per_sample"] / result["sgq-4bit"]["bytes_per_sample"]
    print(f"\nSGQ 4-bit minus fp32 test accuracy: {diff:+.2f} points (target >= -1.0); traffic {ratio:.2f}x "
          f"smaller than fp32, both directions (target >= 7)")
    uni = result.get("uniform-4bit")
    for name in ("sgq-4bit", "sgq-4bit-blocks"):
        r = result.get(name)
        if r is None or uni is None:
            continue
        extra = r["bytes_up_per_sample"] - uni["bytes_up_per_sample"]
        print(f"{name} vs uniform-4bit, upstream (features): {extra:+.1f} B/sample "
              f"({100 * extra / uni['bytes_up_per_sample']:+.2f} %), feature rel.L2 {r['feature_rel_l2']:.4f} vs "
              f"{uni['feature_rel_l2']:.4f}: {'no more bytes' if extra <= 0 else 'MORE bytes'}")


def seeds_summary(per_seed):
    """Per config: test accuracy minus fp32's (trained with the same seed) at every seed, the median and the
    worst; and which >= 16x settings stay within 1.0 point at every seed."""
    seeds = list(per_seed)
    names = [name for name, _ in per_seed[seeds[0]]]
    print(f"\nacross seeds {', '.join(map(str, seeds))}: test accuracy minus fp32 (points), traffic vs fp32")
    print(f"{'config':<19} " + " ".join(f"{'seed ' + str(s):>8}" for s in seeds) + f" {'median':>8} {'worst':>8} "
          f"{'ratio':>6}")
    held = []
    for name in names[1:]:
        diffs, ratios = [], []
        for s in seeds:
            rows = dict(per_seed[s])
            base, r = rows["fp32"], rows[name]
            diffs.append(100 * (r["test_accuracy"] - base["test_accuracy"]))
            ratios.append(base["bytes_per_sample"] / r["bytes_per_sample"])
        print(f"{name:<19} " + " ".join(f"{d:>+8.2f}" for d in diffs) + f" {float(np.median(diffs)):>+8.2f} "
              f"{min(diffs):>+8.2f} {min(ratios):>6.2f}")
        if dict(per_seed[seeds[0]])[name]["bits"] <= 2 and min(ratios) >= 16:
            held.append((min(diffs), float(np.median(diffs)), min(ratios), name))
    if held:
        worst, median, ratio, name = max(held)
        print(f"\n>= 16x row: {name}, >= {ratio:.2f}x less traffic than fp32 at every seed, test accuracy vs fp32 "
              f"median {median:+.2f}, worst {worst:+.2f} points (target >= -1.0 at every seed): "
              f"{'MET' if worst >= -1.0 else 'NOT MET'}")


def bytes_vs_error(edge, test, args):
    """Frame bytes and feature error of SGQ vs uniform quantization on the trained edge's test features, frames
    as sent inside a stream (the receiver already holds the channel order)."""
    from edgelearn import no_grad, tensor

    edge.model.eval()
    with no_grad():
        x = np.ascontiguousarray(edge.model(tensor(test.images[:args.batch_size])).data)
    n, h = len(x), x.shape[2]
    order = sgq.channel_order(x)
    r = args.stripe_rows or max(h // 4, 1)
    print(f"\nfeature frames of one test batch {x.shape} from the trained SGQ 4-bit edge, channel order known to "
          f"the receiver (bytes per sample, header included):")
    print(f"{'codec':<40} {'bytes':>8} {'rel.L2':>8}")
    configs = [(f"uniform-{b}bit", dict(mode="uniform", bits=b)) for b in (4, 5, 6)]
    for bits in (4, 3):
        for g, rows, scope, const in ((args.group, r, "sample", False), (2 * args.group, 2 * r, "sample", False),
                                      (x.shape[1], h, "sample", False), (args.group, r, "frame", False),
                                      (args.group, r, "frame", True), (2, 1, "frame", True), (1, 2, "frame", True),
                                      (1, 1, "frame", False), (1, 1, "frame", True)):
            configs.append((f"sgq-{bits}bit g{g} r{rows} ranges/{scope}{' +const' if const else ''}",
                            dict(bits=bits, group=g, stripe_rows=rows, ranges=scope, constant_blocks=const,
                                 order=order if g > 1 else None, send_order=False)))
    results = {}
    for name, kw in configs:
        frame = sgq.encode(x, **kw)
        y = sgq.decode(frame, order=kw.get("order"))
        err = float(np.linalg.norm(y - x) / np.linalg.norm(x))
        results[name] = (len(frame), err)
        print(f"{name:<40} {len(frame) / n:>8.1f} {err:>8.4f}")
    u_bytes, u_err = results["uniform-4bit"]
    fits = [(err, name, size) for name, (size, err) in results.items() if name.startswith("sgq") and size <= u_bytes]
    best4 = [f for f in fits if f[1].startswith("sgq-4bit")]
    print(f"SGQ 4-bit settings with bytes <= uniform-4bit ({u_bytes / n:.1f} B/sample): "
          f"{', '.join(f[1] for f in sorted(best4)) or 'none'}")
    if fits:
        err, name, size = min(fits)
        print(f"matched bytes: best SGQ with bytes <= uniform-4bit is {name}: {size / n:.1f} B/sample, rel.L2 {err:.4f} "
              f"vs uniform-4bit {u_bytes / n:.1f} B/sample, rel.L2 {u_err:.4f}")


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
    ap.add_argument("--seeds", default="", help="comma-separated seeds (e.g. 0,1,2): the table per seed, then "
                                                "every config's accuracy vs fp32 at each seed, median and worst")
    ap.add_argument("--configs", default="", help="comma-separated rows of the split table to run (default all; "
                                                   "fp32 is the baseline and required)")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args()
    if args.part in ("codec", "all"):
        codec_throughput(args.repeat)
    if args.part in ("split", "all"):
        split_training(args)


if __name__ == "__main__":
    main()
