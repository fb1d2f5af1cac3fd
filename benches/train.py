"""Training benchmark: accuracy, speed and memory of edgelearn FP32 vs Octo INT8 (and its ablations), next to
PyTorch FP32 on the same model, data and seed when torch is importable.

Every edgelearn row is one fresh ``edgelearn train --json`` process (so peak RSS belongs to that run alone);
the PyTorch row trains the same architecture with the same data order, optimizer and schedule in its own
process, with the same BatchNorm re-estimation after each epoch as ``fit`` (32 batches of a seeded sample).
Training memory ("train MB") is measured after one warm-up step for every row: peak RSS over the later training
steps minus the RSS right after the first step; "cold MB" beside it is the peak over all steps minus the RSS
before the first (see ``edgelearn.train``: the kernel's high-water mark is reset and read around the steps, so
data loading and evaluation do not count; the PyTorch row is measured the same way). Each edgelearn row checks
that its run reports the settings the row names (precision, LAC, PRC mode).

    python benches/train.py                                  # Fashion-MNIST, 3 epochs, CNN and MLP, 1 and 2 threads
    python benches/train.py --dataset digits --epochs 2      # quick run on the bundled dataset
    python benches/train.py --models cnn --threads 1 --batch-size 256 --epochs 1   # memory comparison
    python benches/train.py --models cnn --threads 1 --repeat 3   # median speed of 3 interleaved runs each
    python benches/train.py --models resnet20 mobilenet_v2 --image-size 32 --width-mult 0.5 \
        --train-subset 15000 --rows fp32 int8       # the edge architectures on Fashion-MNIST at 32x32

The PyTorch rows of ``resnet20`` / ``mobilenet_v2`` / ``resnet18`` are built from plain ``torch.nn`` with the
zoo's architecture (same stems for small images, same widths), data, order and schedule.

"img/s" (and every ratio) is the speed of the training steps; "epoch/s" counts each epoch's BatchNorm
re-estimation too (32 batches; ~2% of a full Fashion-MNIST epoch, but a third of an epoch of a 1000-image
``--train-subset``, which would hide the step speed), and the JSON has both plus ``bn_recalibration_s``.

With ``--repeat N`` every row runs N times, in N rounds that each run all rows at every thread count in turn
(so drift of a busy or thermally throttled machine hits every row and the thread-count ratio alike); the table shows the median images/s (the JSON also
lists each run's), and accuracy and memory of the first run (training is deterministic for a seed).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

ROWS = [
    ("edgelearn fp32", ["--precision", "fp32"]),
    ("edgelearn int8 (LAC+PRC)", ["--precision", "int8"]),
    ("edgelearn int8, no LAC", ["--precision", "int8", "--no-lac"]),
    ("edgelearn int8, no PRC", ["--precision", "int8", "--prc", "none"]),
    ("edgelearn int8, PRC sigma", ["--precision", "int8", "--prc", "sigma"]),
]
#: What each row's run must report having done (its JSON line), so a row never silently measures another setting.
ROW_EXPECTS = {
    "edgelearn fp32": {"precision": "fp32"},
    "edgelearn int8 (LAC+PRC)": {"precision": "int8", "lac": True, "prc": "minmax"},
    "edgelearn int8, no LAC": {"precision": "int8", "lac": False, "prc": "minmax"},
    "edgelearn int8, no PRC": {"precision": "int8", "lac": True, "prc": None},
    "edgelearn int8, PRC sigma": {"precision": "int8", "lac": True, "prc": "sigma"},
}


ROW_KEYS = {"fp32": "edgelearn fp32", "int8": "edgelearn int8 (LAC+PRC)", "no-lac": "edgelearn int8, no LAC",
            "no-prc": "edgelearn int8, no PRC", "prc-sigma": "edgelearn int8, PRC sigma"}


def data_flags(args):
    out = []
    if args.image_size:
        out += ["--image-size", str(args.image_size)]
    if args.train_subset:
        out += ["--train-subset", str(args.train_subset)]
    if args.test_subset:
        out += ["--test-subset", str(args.test_subset)]
    return out


#: The speed the table and the ratios use: images/s of the training steps. Each epoch of every row (edgelearn's
#: ``fit`` and the PyTorch loop alike) also re-estimates BatchNorm statistics on 32 batches; that fixed cost is
#: about 2% of an epoch on the full 60k images but a third of one on a 1000-image timing subset, so it is timed
#: apart (``bn_recalibration_s``) and the epoch speed including it is the "epoch/s" column
#: (``train_images_per_s``).
STEP_SPEED = "train_step_images_per_s"


def run_edgelearn(name, model, flags, args, threads):
    cmd = [sys.executable, "-m", "edgelearn", "train", "--dataset", args.dataset, "--model", model,
           "--epochs", str(args.epochs), "--batch-size", str(args.batch_size), "--seed", str(args.seed),
           "--threads", str(threads), "--no-progress", "--compare", "none", "--json",
           *(["--width-mult", str(args.width_mult)] if model == "mobilenet_v2" else []),  # (others refuse it)
           *data_flags(args), *flags]
    env = dict(os.environ, EDGELEARN_NUM_THREADS=str(threads))
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-2000:]}")
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    out["wall_s"] = time.perf_counter() - t0
    wrong = {k: (out.get(k), v) for k, v in ROW_EXPECTS[name].items() if out.get(k) != v}
    if wrong:
        raise SystemExit(f"row {name!r} ran with other settings than it names (got, expected): {wrong}")
    return out


TORCH_SCRIPT = r'''
import json, resource, sys, time
import numpy as np, torch
from edgelearn import data as eldata
from edgelearn.data import DataLoader
args = json.loads(sys.argv[1])
torch.set_num_threads(args["threads"])
torch.manual_seed(args["seed"])
splits = eldata.get_dataset(args["dataset"], seed=args["seed"])
train, test = splits.train, splits.test
if args.get("train_subset"):
    train = eldata.stratified_subset(train, args["train_subset"], seed=args["seed"])
if args.get("test_subset"):
    test = eldata.stratified_subset(test, args["test_subset"], seed=args["seed"])
if args.get("image_size"):
    train, test = eldata.fit_images(train, args["image_size"]), eldata.fit_images(test, args["image_size"])
c, h, w = train.image_shape
k = train.num_classes
nn = torch.nn
small = min(h, w) < 64

def bn_conv(i, o, k=3, s=1, g=1, act=True):
    layers = [nn.Conv2d(i, o, k, s, (k - 1) // 2, groups=g, bias=False), nn.BatchNorm2d(o)]
    return nn.Sequential(*layers, nn.ReLU6()) if act else nn.Sequential(*layers)

class Basic(nn.Module):
    def __init__(self, i, o, s):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(i, o, 3, s, 1, bias=False), nn.BatchNorm2d(o)
        self.conv2, self.bn2 = nn.Conv2d(o, o, 3, 1, 1, bias=False), nn.BatchNorm2d(o)
        self.relu = nn.ReLU()
        self.down = None if s == 1 and i == o else nn.Sequential(nn.Conv2d(i, o, 1, s, bias=False), nn.BatchNorm2d(o))
    def forward(self, x):
        out = self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x)))))
        return self.relu(out + (x if self.down is None else self.down(x)))

def resnet(layers, widths, stem):
    mods = ([nn.Conv2d(c, widths[0], 3, 1, 1, bias=False)] if stem == "cifar" else
            [nn.Conv2d(c, widths[0], 7, 2, 3, bias=False)])
    mods += [nn.BatchNorm2d(widths[0]), nn.ReLU()] + ([] if stem == "cifar" else [nn.MaxPool2d(3, 2, 1)])
    prev = widths[0]
    for i, (n, o) in enumerate(zip(layers, widths)):
        for j in range(n):
            mods.append(Basic(prev, o, 2 if i > 0 and j == 0 else 1)); prev = o
    return nn.Sequential(*mods, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(prev, k))

class Inverted(nn.Module):
    def __init__(self, i, o, s, t):
        super().__init__()
        hid = int(round(i * t)); self.res = s == 1 and i == o
        layers = ([bn_conv(i, hid, 1)] if t != 1 else []) + [bn_conv(hid, hid, 3, s, hid), bn_conv(hid, o, 1, act=False)]
        self.conv = nn.Sequential(*layers)
    def forward(self, x):
        return x + self.conv(x) if self.res else self.conv(x)

def mobilenet_v2(wm):
    from edgelearn.models.mobilenet import _SETTING, _make_divisible
    ch = _make_divisible(32 * wm); last = _make_divisible(1280 * max(1.0, wm))
    mods = [bn_conv(c, ch, 3, 1 if small else 2)]
    for idx, (t, co, n, s) in enumerate(_SETTING):
        o = _make_divisible(co * wm); s = 1 if small and idx == 1 else s
        for j in range(n):
            mods.append(Inverted(ch, o, s if j == 0 else 1, t)); ch = o
    mods += [bn_conv(ch, last, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(0.2), nn.Linear(last, k)]
    return nn.Sequential(*mods)

if args["model"] == "resnet20":
    model = resnet([3, 3, 3], [16, 32, 64], "cifar")
elif args["model"] == "resnet18":
    model = resnet([2, 2, 2, 2], [64, 128, 256, 512], "cifar" if small else "imagenet")
elif args["model"] == "mobilenet_v2":
    model = mobilenet_v2(args["width_mult"])
elif args["model"] == "mlp":
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(c * h * w, 256), torch.nn.ReLU(),
                                torch.nn.Linear(256, 128), torch.nn.ReLU(), torch.nn.Linear(128, k))
else:
    layers, prev = [], c
    for i, ch in enumerate((16, 32, 64)):
        layers += [torch.nn.Conv2d(prev, ch, 3, padding=1), torch.nn.BatchNorm2d(ch), torch.nn.ReLU()]
        if i < 2 and min(h, w) >= 4:
            layers.append(torch.nn.MaxPool2d(2)); h, w = h // 2, w // 2
        prev = ch
    layers += [torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(prev, k)]
    model = torch.nn.Sequential(*layers)
lr = 0.02
opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, nesterov=True, weight_decay=5e-4)
sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=args["epochs"])
loader = DataLoader(train, batch_size=args["batch_size"], shuffle=True, seed=args["seed"])
def rss_mb():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20
# measured as edgelearn.train.fit does: same allocator setting, RSS before the first step, peak (VmHWM reset
# before each epoch's first step) read after its last step, so data loading and evaluation are not counted
from edgelearn.train import _hwm_rss_mb, _reset_peak_rss, release_idle_memory, release_large_buffers


def recalibrate_batchnorm(seed):
    # what edgelearn.train.recalibrate_batchnorm does after each epoch of fit: running statistics re-estimated
    # as the exact average over 32 batches of a seeded sample of the training images, other layers in eval mode
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    if not bns:
        return
    n = min(len(train), 32 * args["batch_size"])
    idx = np.sort(np.random.default_rng(seed).choice(len(train), size=n, replace=False))
    model.eval()
    for bn in bns:
        bn.reset_running_stats(); bn.momentum = None; bn.train()  # momentum None: cumulative average
    with torch.no_grad():
        for s in range(0, n, args["batch_size"]):
            model(torch.from_numpy(np.ascontiguousarray(train.images[idx[s:s + args["batch_size"]]])))
    for bn in bns:
        bn.momentum = 0.1
    model.train()


release_large_buffers()
before = rss_mb()
after_first, warm_peak = 0.0, 0.0
seen, secs, recal_secs, train_peak = 0, 0.0, 0.0, 0.0
for epoch in range(args["epochs"]):
    model.train(); loader.set_epoch(epoch); reset = _reset_peak_rss(); t0 = time.perf_counter()
    for x, y in loader:
        loss = torch.nn.functional.cross_entropy(model(torch.from_numpy(x)), torch.from_numpy(y))
        opt.zero_grad(); loss.backward(); opt.step(); seen += len(y)
        if not after_first:  # one warm-up step: the warm memory figure starts here (as fit does)
            first = _hwm_rss_mb() if reset else None
            if first is not None:
                train_peak = max(train_peak, first)
            release_idle_memory()  # as fit does: freed feature maps kept by the heap are not the reference
            after_first = rss_mb(); reset = _reset_peak_rss()
    t_recal = time.perf_counter()
    recalibrate_batchnorm(args["seed"] + 7919 * (epoch + 1))
    t_end = time.perf_counter()
    secs += t_end - t0; recal_secs += t_end - t_recal; sched.step()
    hwm = _hwm_rss_mb() if reset else None
    if hwm is not None:
        warm_peak = max(warm_peak, hwm)
    train_peak = max(train_peak, hwm if hwm is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
model.eval(); correct = 0
with torch.no_grad():
    for i in range(0, len(test), 512):
        correct += int((model(torch.from_numpy(test.images[i:i+512])).argmax(1).numpy() == test.labels[i:i+512]).sum())
peak = max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, train_peak)
print(json.dumps({"test_accuracy": correct / len(test), "train_images_per_s": seen / secs,
                  "train_step_images_per_s": seen / (secs - recal_secs), "bn_recalibration_s": recal_secs,
                  "peak_rss_mb": peak,
                  "rss_before_first_step_mb": before, "train_memory_mb": max(0.0, train_peak - before),
                  "train_memory_warm_mb": max(0.0, warm_peak - after_first) if warm_peak and after_first
                  else max(0.0, train_peak - before)}))
'''


def run_torch(model, args, threads):
    payload = json.dumps({"model": model, "dataset": args.dataset, "epochs": args.epochs,
                          "batch_size": args.batch_size, "seed": args.seed, "threads": threads,
                          "image_size": args.image_size, "train_subset": args.train_subset,
                          "test_subset": args.test_subset,
                          "width_mult": args.width_mult})
    proc = subprocess.run([sys.executable, "-c", TORCH_SCRIPT, payload], capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"PyTorch baseline failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def torch_available():
    return subprocess.run([sys.executable, "-c", "import torch"], capture_output=True).returncode == 0


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", default="fashion-mnist")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--models", nargs="+", default=["cnn", "mlp"],
                    choices=["cnn", "mlp", "resnet20", "mobilenet_v2", "resnet18"])
    ap.add_argument("--width-mult", type=float, default=1.0, help="mobilenet_v2 width multiplier")
    ap.add_argument("--image-size", type=int, default=None, help="pad/resize images to SxS (32 for the zoo)")
    ap.add_argument("--train-subset", type=int, default=None, help="stratified subset of N training images")
    ap.add_argument("--test-subset", type=int, default=None,
                    help="stratified subset of N test images (accuracy on it; for timing runs)")
    ap.add_argument("--rows", nargs="+", default=list(ROW_KEYS), choices=list(ROW_KEYS),
                    help="edgelearn rows to run (default all: fp32, int8 and the two ablations)")
    ap.add_argument("--no-torch", action="store_true", help="leave out the PyTorch FP32 row")
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--repeat", type=int, default=1,
                    help="runs per row, interleaved in rounds; the table shows the median images/s")
    ap.add_argument("--json", metavar="PATH", help="also write all rows as JSON")
    args = ap.parse_args(argv)
    if args.repeat < 1:
        ap.error("--repeat must be at least 1")
    have_torch = not args.no_torch and torch_available()
    rows_run = [(name, flags) for name, flags in ROWS if name in {ROW_KEYS[r] for r in args.rows}]
    if not have_torch:
        print("note: torch is not importable; the PyTorch FP32 row is left out")
    print(f"dataset={args.dataset} epochs={args.epochs} batch={args.batch_size} seed={args.seed}"
          + (f" train-subset={args.train_subset}" if args.train_subset else "")
          + (f" test-subset={args.test_subset} (accuracy on it)" if args.test_subset else ""))
    header = (f"{'model':<12} {'thr':>3}  {'run':<26} {'test acc':>8} {'img/s':>8} {'vs fp32':>8} {'epoch/s':>8} "
              f"{'peak MB':>8} {'train MB':>9} {'cold MB':>8}")
    print(header)
    print("-" * len(header))
    results = []
    for model in args.models:
        # Every repeat runs every thread count and row in turn, so that a ratio between thread counts
        # (and between rows) compares runs of the same stretch of a shared machine's load.
        names = [name for name, _ in rows_run] + (["pytorch fp32"] if have_torch else [])
        by_threads = {threads: {name: [] for name in names} for threads in args.threads}
        for _ in range(args.repeat):
            for threads in args.threads:
                for name, flags in rows_run:
                    by_threads[threads][name].append(run_edgelearn(name, model, flags, args, threads))
                if have_torch:
                    by_threads[threads]["pytorch fp32"].append(run_torch(model, args, threads))
        for threads in args.threads:
            fp32_speed = None
            runs = by_threads[threads]
            rows = []
            for name, rs in runs.items():
                r = dict(rs[0])
                for key in (STEP_SPEED, "train_images_per_s"):
                    r[key] = statistics.median(x[key] for x in rs)
                    if args.repeat > 1:
                        r[key + "_runs"] = [x[key] for x in rs]
                rows.append((name, r))
            for name, r in rows:
                if name == "edgelearn fp32":
                    fp32_speed = r[STEP_SPEED]
                ratio = f"{r[STEP_SPEED] / fp32_speed:>7.2f}x" if fp32_speed else f"{'-':>8}"
                print(f"{model:<12} {threads:>3}  {name:<26} {100 * r['test_accuracy']:>7.2f}% "
                      f"{r[STEP_SPEED]:>8.0f} {ratio} {r['train_images_per_s']:>8.0f} {r['peak_rss_mb']:>8.1f} "
                      f"{r['train_memory_warm_mb']:>9.1f} {r['train_memory_mb']:>8.1f}", flush=True)
                results.append({"model": model, "threads": threads, "run": name, **r})
    print_ratios(results)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


def print_ratios(results):
    """The ratios the acceptance points are stated in, from the medians above (same run)."""
    speed = {(r["model"], r["threads"], r["run"]): r[STEP_SPEED] for r in results}
    int8 = "edgelearn int8 (LAC+PRC)"
    lines = []
    for (model, threads, run), s in speed.items():
        if run != int8:
            continue
        parts = []
        for base, label in (("edgelearn fp32", "fp32"), ("pytorch fp32", "pytorch")):
            if (model, threads, base) in speed:
                parts.append(f"int8/{label} {s / speed[(model, threads, base)]:.2f}x")
        one = speed.get((model, 1, int8))
        if threads != 1 and one:
            parts.append(f"int8 {threads} thr / 1 thr {s / one:.2f}x")
        if parts:
            lines.append(f"{model:<12} {threads:>3}  " + ", ".join(parts))
    if lines:
        print("ratios (medians, same run):")
        print("\n".join(lines))


if __name__ == "__main__":
    main()
