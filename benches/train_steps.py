"""FP32 vs INT8 training-step time in one process: the bundled CNN on Fashion-MNIST (batch 32), the three
models (FP32, INT8 LAC+PRC, INT8 without LAC) run in alternating blocks of 30 steps, so machine drift hits
them alike; prints each one's median step time and the INT8/FP32 speed ratio measured in the same run.

    python benches/train_steps.py                  # one thread, 12 rounds
    python benches/train_steps.py --threads 2 --rounds 20
"""

import argparse
import os
import time

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # numpy's BLAS threads would spin beside ours

import numpy as np  # noqa: E402

import edgelearn as el  # noqa: E402
from edgelearn import data, models, nn, optim  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=12, help="blocks of 30 steps per model (the first is warm-up)")
    args = ap.parse_args()
    el.set_num_threads(args.threads)
    train = data.get_dataset("fashion-mnist", seed=0).train
    batches = 1800
    x_all, y_all = train.images[: 32 * batches], train.labels[: 32 * batches]

    def make(precision, lac=True):
        el.manual_seed(0)
        m = models.build_model("cnn", train.image_shape, 10)
        if precision == "int8":
            el.octo(m, el.OctoConfig(lac=lac))
        m.train()
        return m, optim.SGD(m.parameters(), lr=0.02, momentum=0.9)

    runs = {"fp32": make("fp32"), "int8": make("int8"), "int8 no LAC": make("int8", lac=False)}
    loss_fn = nn.CrossEntropyLoss()
    times = {k: [] for k in runs}
    pos = dict.fromkeys(runs, 0)
    for rnd in range(args.rounds):
        for k, (model, opt) in runs.items():
            for j in range(30):
                i = pos[k] % batches
                pos[k] += 1
                xb = np.ascontiguousarray(x_all[32 * i: 32 * (i + 1)], dtype=np.float32)
                yb = y_all[32 * i: 32 * (i + 1)]
                t = time.perf_counter()
                opt.zero_grad()
                loss = loss_fn(model(el.tensor(xb)), yb) + model.regularization()
                loss.backward()
                opt.step()
                if rnd > 0 and j >= 3:  # first round and each block's first steps: cache warm-up
                    times[k].append(time.perf_counter() - t)
    med = {k: float(np.median(v)) * 1e3 for k, v in times.items()}
    for k, v in med.items():
        print(f"{k:12s} {v:6.3f} ms/step  {32 / v * 1e3:8.0f} img/s  {med['fp32'] / v:5.2f}x fp32")


if __name__ == "__main__":
    main()
