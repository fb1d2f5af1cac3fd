#!/usr/bin/env python
"""Fine-tuning on your own images: INT8 vs FP32 accuracy and the memory of sparse updates (``--train last:K``).

1. Pre-train a model with edgelearn (FP32) on Fashion-MNIST classes 0-4 (T-shirt, Trouser, Pullover, Dress,
   Coat; a stratified subset of ``--pretrain-images``) and save the checkpoint.
2. Write the held-out classes 5-9 (Sandal, Shirt, Sneaker, Bag, Ankle boot) as PNGs in the torchvision layout:
   ``train/<class>/`` from Fashion-MNIST's train split, ``val/<class>/`` from its test split.
3. Run ``edgelearn finetune CHECKPOINT --dataset folder:DIR`` in fresh processes (so each measures its own
   memory) for every (precision, --train) pair and seed, rounds interleaved, and print the table: validation
   accuracy (median over seeds), training memory (``train_memory_mb``: peak RSS over the training steps minus
   the RSS before the first one, at ``--batch-size``) and images/s.

Checks printed at the end: INT8 ``last:2`` within 1.0 point of FP32 ``last:2``; INT8 ``last:2`` training memory
at most 0.5x INT8 ``all``. Needs ``apt-get install dataset-fashion-mnist`` and Pillow.

    python benches/finetune.py [--model resnet20] [--seeds 0,1,2] [--epochs 3] [--batch-size 128] [--workdir DIR]

The model is ``resnet20`` by default: with ``last:2`` only its last block's two convolutions and the head
train, so the 19 frozen convolutions cost only their forward (nothing saved, each activation freed once
consumed, frozen BatchNorms in eval form, run 32 images at a time), while ``all`` keeps every layer's int8
input, BatchNorm input and ReLU mask for backward. The
bundled 3-convolution ``cnn`` is no test of sparse updates: ``last:2`` trains two of its three convolutions.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile

import numpy as np


def write_folder(root: str, train, test, classes, per_class_train: int, per_class_val: int) -> None:
    from PIL import Image

    from edgelearn.data import FASHION_MNIST_CLASSES

    for split, ds, n in (("train", train, per_class_train), ("val", test, per_class_val)):
        for c in classes:
            d = os.path.join(root, split, FASHION_MNIST_CLASSES[c].replace("/", "-").replace(" ", "_"))
            os.makedirs(d, exist_ok=True)
            for i in np.flatnonzero(ds.labels == c)[:n]:
                Image.fromarray((ds.images[i, 0] * 255).round().astype(np.uint8)).save(os.path.join(d, f"{i}.png"))


def pretrain(path: str, model_name: str, train, epochs: int, n: int, seed: int) -> float:
    import edgelearn as el
    from edgelearn import data, models, optim

    el.manual_seed(seed)
    per_class = n // 5
    mask = np.sort(np.concatenate([np.flatnonzero(train.labels == c)[:per_class] for c in range(5)]))
    ds = data.ArrayDataset(train.images[mask], train.labels[mask], "fashion-mnist-0-4")
    model = models.build_model(model_name, ds.image_shape, 5)
    opt = optim.SGD(model.parameters(), lr=0.02, momentum=0.9, nesterov=True, weight_decay=5e-4)
    history = el.fit(model, opt, ds, None, epochs, batch_size=64, seed=seed, progress=False, verbose=False,
                     checkpoint=path, config={"image_shape": list(ds.image_shape), "model": model_name})
    return history.records[-1]["train_accuracy"]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="resnet20", help="a zoo name (edgelearn.models.MODEL_NAMES)")
    parser.add_argument("--pretrain-epochs", type=int, default=2)
    parser.add_argument("--pretrain-images", type=int, default=15000)
    parser.add_argument("--train-per-class", type=int, default=1000)
    parser.add_argument("--val-per-class", type=int, default=1000)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=0.02)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--runs", default="int8:last:2,fp32:last:2,int8:all,fp32:all")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", metavar="PATH", help="also write every run's JSON here")
    parser.add_argument("--workdir", metavar="DIR",
                        help="keep the pre-trained checkpoint and the PNG folder here, and reuse them when they are "
                             "already there (same --model; default: a temporary directory)")
    args = parser.parse_args(argv)

    from edgelearn import data

    train, test = data.load_fashion_mnist()
    runs = [tuple(r.split(":", 1)) for r in args.runs.split(",")]
    seeds = [int(s) for s in args.seeds.split(",")]
    results = {r: [] for r in runs}
    with contextlib.ExitStack() as stack:
        tmp = args.workdir or stack.enter_context(tempfile.TemporaryDirectory())
        os.makedirs(tmp, exist_ok=True)
        ckpt = os.path.join(tmp, "pretrained.safetensors")
        folder = os.path.join(tmp, "images")
        if os.path.exists(ckpt) and os.path.isdir(folder):
            print(f"reusing the pre-trained {ckpt} and the images in {folder}")
        else:
            acc = pretrain(ckpt, args.model, train, args.pretrain_epochs, args.pretrain_images, 0)
            print(f"pre-trained {args.model} (FP32) on Fashion-MNIST classes 0-4: train accuracy {100 * acc:.2f}%")
            write_folder(folder, train, test, range(5, 10), args.train_per_class, args.val_per_class)
            print(f"wrote {folder}: classes 5-9, {args.train_per_class}/class train, "
                  f"{args.val_per_class}/class val")
        for seed in seeds:  # rounds interleave the configurations
            for precision, mode in runs:
                cmd = [sys.executable, "-m", "edgelearn", "finetune", ckpt, "--dataset", f"folder:{folder}",
                       "--precision", precision, "--train", mode, "--epochs", str(args.epochs),
                       "--batch-size", str(args.batch_size), "--lr", str(args.lr), "--seed", str(seed),
                       "--json", "--no-progress"]
                if args.threads:
                    cmd += ["--threads", str(args.threads)]
                out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
                row = json.loads(out.strip().splitlines()[-1])
                results[(precision, mode)].append(row)
                print(f"  seed {seed} {precision:4} --train {mode:8} val {100 * row['test_accuracy']:.2f}%  "
                      f"train memory {row['train_memory_mb']:.1f} MB  {row['train_images_per_s']:.0f} img/s",
                      flush=True)

    def med(r, key):
        return statistics.median(x[key] for x in results[r])

    print(f"\n{args.model}, {args.epochs} epochs, batch {args.batch_size}, seeds {seeds} (medians; shared machine)")
    print(f"{'run':22} {'val acc %':>10} {'train MB':>9} {'img/s':>7} {'trainable':>10}")
    for r in runs:
        print(f"{r[0] + ' --train ' + r[1]:22} {100 * med(r, 'test_accuracy'):10.2f} {med(r, 'train_memory_mb'):9.1f} "
              f"{med(r, 'train_images_per_s'):7.0f} {results[r][0]['trainable_parameters']:10d}")
    ok = True
    if ("int8", "last:2") in results and ("fp32", "last:2") in results:
        gap = 100 * (med(("fp32", "last:2"), "test_accuracy") - med(("int8", "last:2"), "test_accuracy"))
        print(f"INT8 last:2 vs FP32 last:2: {gap:+.2f} points below FP32 (limit 1.0): {'ok' if gap <= 1.0 else 'FAIL'}")
        ok &= gap <= 1.0
    if ("int8", "last:2") in results and ("int8", "all") in results:
        ratio = med(("int8", "last:2"), "train_memory_mb") / med(("int8", "all"), "train_memory_mb")
        print(f"INT8 training memory last:2 / all at batch {args.batch_size}: {med(('int8', 'last:2'), 'train_memory_mb'):.1f} "
              f"/ {med(('int8', 'all'), 'train_memory_mb'):.1f} MB = {ratio:.2f}x (limit 0.5): "
              f"{'ok' if ratio <= 0.5 else 'FAIL'}")
        ok &= ratio <= 0.5
    if args.json:
        with open(args.json, "w") as f:
            json.dump({f"{p}:{m}": rows for (p, m), rows in results.items()}, f, indent=1)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
