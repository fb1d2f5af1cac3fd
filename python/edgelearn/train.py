"""The training loop: ``fit`` (epochs of SGD with metrics, logs, plots, checkpoints and exact resume) and ``evaluate``.

Exact resume: everything a step depends on is either in the checkpoint or a pure function of ``(seed, epoch)``:

- model parameters and buffers (BatchNorm statistics, the INT8 layers' ``quant_step`` that seeds stochastic
  rounding, Dropout's ``step`` that seeds its masks), optimizer and scheduler state, epoch and step counters:
  saved in the checkpoint at the end of every epoch;
- the data order and augmentation of epoch ``e``: drawn from ``(seed, e)`` by :class:`edgelearn.data.DataLoader`;
- the global RNGs (Python ``random``, NumPy's legacy global, the parameter-initialisation generator): saved too,
  for code that draws from them between epochs.

So a run stopped after epoch ``k`` and resumed produces the same loss curve, bit for bit, as one that never stopped.

Memory is reported as in the benchmarks: ``rss_before_first_step_mb`` (from ``/proc/self/statm`` just before the
first training step, after data and model are in memory), ``peak_rss_mb`` (``getrusage`` ``ru_maxrss``, the whole
process) and ``train_memory_mb``, the memory training itself added: ``train_peak_rss_mb`` minus
``rss_before_first_step_mb``, where ``train_peak_rss_mb`` is the peak RSS over the training steps only. On Linux
the kernel's high-water mark is reset (``/proc/self/clear_refs``) right before each epoch's first step and read
(``VmHWM``) right after its last step (and the BatchNorm re-estimation), so neither the dataset load before
training (decompression peaks) nor the evaluation passes at ``eval_batch_size`` after it count as training
memory. Where the reset is unavailable the process peak up to the end of the last epoch's steps is used.
``train_memory_warm_mb`` is the same figure taken after one warm-up step: peak RSS over the later steps minus
the RSS right after the first step (``rss_after_first_step_mb``), so one-time growth on the first step (lazy
initialisation, allocator arenas, optimizer state) is left out; ``train_memory_mb`` is the cold figure.
Before each of those references ``fit`` frees idle memory (:func:`release_idle_memory`: kernel scratch
buffers grown by an evaluation pass, heap free pages), so the residue of data loading and of evaluation passes
is not counted either. ``fit`` also fixes glibc's mmap
and trim thresholds (:func:`release_large_buffers`; the same setting for every precision), so activation-sized
buffers are reused from the heap step after step instead of being unmapped and faulted in again.
"""

from __future__ import annotations

import csv
import gc
import json
import math
import os
import resource
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Tuple, Union

import numpy as np

from . import checkpoint as ckpt
from .data import ArrayDataset, DataLoader
from .functional import cross_entropy
from .nn import init as _init
from .tensor import Tensor, no_grad, tensor

__all__ = ["History", "evaluate", "fit", "peak_rss_mb", "current_rss_mb"]

LossFn = Callable[[Tensor, np.ndarray], Tensor]
DataLike = Union[ArrayDataset, DataLoader, Tuple[np.ndarray, np.ndarray]]

_RECORD_FIELDS = (
    "epoch", "train_loss", "train_accuracy", "val_loss", "val_accuracy", "lr", "train_images_per_s", "epoch_time_s",
    "bn_recalibration_s",
)


# --------------------------------------------------------------------------------------------------------------
# Memory


def current_rss_mb() -> float:
    """Resident set size now, in MiB (``/proc/self/statm``; falls back to the peak where that file is missing)."""
    try:
        with open("/proc/self/statm") as f:
            resident_pages = int(f.read().split()[1])
        return resident_pages * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        return peak_rss_mb()


#: Buffers at least this large are mmapped by glibc's malloc and returned to the OS when freed (see
#: :func:`release_large_buffers`): glibc's largest allowed threshold.
LARGE_BUFFER_BYTES = 32 << 20

_allocator_tuned = False


def release_large_buffers(threshold: int = LARGE_BUFFER_BYTES) -> bool:
    """Fixes glibc's malloc thresholds for training: buffers of ``threshold`` bytes or more are mmapped and
    returned to the OS when freed (``mallopt`` ``M_MMAP_THRESHOLD``), smaller ones come from the heap, which
    keeps up to twice that much free space at its top (``M_TRIM_THRESHOLD``) for the next step to reuse.

    By default glibc raises the mmap threshold dynamically each time a large block is freed, so which buffers
    are mmapped depends on allocation history. Fixed, it is the same for every precision and layer selection.
    The default, 32 MiB, is glibc's largest: every activation of a batch-32 MobileNetV2 or a batch-128 CNN
    (up to 13 MB) stays in the heap. With 4 MiB (the setting before) each such feature map was mmapped and
    unmapped on every step and the next step faulted fresh zeroed pages in again; page faults of one process
    serialise its threads: the CNN's INT8 training at batch 128 (``benches/train.py``, medians of 3) ran 7.0k
    images/s on one thread and 9.7k on two; with 32 MiB 8.3k and 13.2k. The price is memory: freed feature
    maps stay resident for the next step, and holes between longer-lived buffers stay resident too, so the
    training memory figures are the steady state's peak RSS (at batch 128 INT8 ResNet-20 took 101 MB against
    22 MB with 4 MiB; FP32 203 against 169). The heap's free pages still go back to the OS before each memory
    reference (:func:`release_idle_memory`, ``malloc_trim``), so data loading and evaluation leave nothing
    counted.

    Setting the mmap threshold also fixes glibc's trim threshold at its 128 KiB default (a freed feature map at
    the top of the heap would go back to the OS after every step and fault in again on the next), hence the
    explicit trim threshold. Called once by :func:`fit`, for every precision. Returns False where unavailable
    (non-glibc)."""
    global _allocator_tuned
    if _allocator_tuned:
        return True
    if not sys.platform.startswith("linux"):
        return False
    try:
        import ctypes

        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
    _allocator_tuned = bool(mallopt(M_MMAP_THRESHOLD, int(threshold)))
    if _allocator_tuned:
        mallopt(M_TRIM_THRESHOLD, 2 * int(threshold))
    return _allocator_tuned


def release_idle_memory() -> None:
    """Gives back memory that is resident but holds nothing: the kernels' per-thread scratch buffers (they keep
    the largest size a call needed, e.g. of an evaluation pass at ``eval_batch_size``) and, on glibc, the
    heap's free pages (``malloc_trim(0)``). ``fit`` calls it before it takes each memory reference (before the
    first step, before each epoch's steps), so the residue of data loading and of the previous epoch's
    evaluation is not counted as training memory (nor kept through training), for every precision and layer
    selection alike."""
    from . import _native

    _native.release_scratch()
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            ctypes.CDLL(None).malloc_trim(0)
        except (OSError, AttributeError):
            pass


def _reset_peak_rss() -> bool:
    """Resets the kernel's RSS high-water mark (``VmHWM``) to the current RSS; False where unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _hwm_rss_mb() -> Optional[float]:
    """``VmHWM`` of ``/proc/self/status`` in MiB (None where unavailable)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 2**10
    except (OSError, ValueError, IndexError):
        pass
    return None


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far, in MiB (``ru_maxrss``: KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10


# --------------------------------------------------------------------------------------------------------------
# History


@dataclass
class History:
    """What ``fit`` measured. ``records`` holds one dict per epoch (including epochs before a resume);
    ``history["val_accuracy"]`` is that metric's list over epochs. The summary fields cover this call only.
    """

    records: List[Dict[str, Any]] = field(default_factory=list)
    train_images_per_s: float = 0.0
    rss_before_first_step_mb: float = 0.0
    peak_rss_mb: float = 0.0
    train_peak_rss_mb: float = 0.0
    resumed_from_epoch: int = 0
    #: RSS right after the first training step, and the peak RSS over the steps after it (0: not measured).
    rss_after_first_step_mb: float = 0.0
    warm_peak_rss_mb: float = 0.0
    #: Of the training time, the seconds spent re-estimating BatchNorm statistics after each epoch, and the
    #: images/s of the training steps alone (the epoch time without that re-estimation).
    bn_recalibration_s: float = 0.0
    train_step_images_per_s: float = 0.0

    @property
    def train_memory_mb(self) -> float:
        """Cold: peak RSS over the training steps minus the RSS before the first step."""
        peak = self.train_peak_rss_mb or self.peak_rss_mb
        return max(0.0, peak - self.rss_before_first_step_mb)

    @property
    def train_memory_warm_mb(self) -> float:
        """Warm: peak RSS over the steps after the first minus the RSS right after it (the cold figure where
        the kernel's high-water mark cannot be reset)."""
        if not (self.warm_peak_rss_mb and self.rss_after_first_step_mb):
            return self.train_memory_mb
        return max(0.0, self.warm_peak_rss_mb - self.rss_after_first_step_mb)

    def __getitem__(self, key: str) -> List[Any]:
        return [r.get(key) for r in self.records]

    def __len__(self) -> int:
        return len(self.records)

    def summary(self) -> Dict[str, Any]:
        return {
            "epochs": len(self.records),
            "train_images_per_s": self.train_images_per_s,
            "train_step_images_per_s": self.train_step_images_per_s,
            "bn_recalibration_s": self.bn_recalibration_s,
            "rss_before_first_step_mb": self.rss_before_first_step_mb,
            "peak_rss_mb": self.peak_rss_mb,
            "train_peak_rss_mb": self.train_peak_rss_mb,
            "train_memory_mb": self.train_memory_mb,
            "rss_after_first_step_mb": self.rss_after_first_step_mb,
            "train_memory_warm_mb": self.train_memory_warm_mb,
            "resumed_from_epoch": self.resumed_from_epoch,
        }


# --------------------------------------------------------------------------------------------------------------
# Evaluation


def _batches(data: DataLike, batch_size: int) -> Iterable[Tuple[np.ndarray, np.ndarray]]:
    if isinstance(data, DataLoader):
        return data
    if isinstance(data, ArrayDataset) or hasattr(data, "load_batch"):
        return DataLoader(data, batch_size=batch_size, shuffle=False)
    if isinstance(data, tuple) and len(data) == 2:
        x, y = np.asarray(data[0], dtype=np.float32), np.asarray(data[1])
        return ((x[i:i + batch_size], y[i:i + batch_size]) for i in range(0, len(x), batch_size))
    raise TypeError(f"data: expected an ArrayDataset, a DataLoader or (images, labels), got {type(data).__name__}")


def evaluate(model: Any, data: DataLike, *, loss_fn: LossFn = cross_entropy, batch_size: int = 512) -> Dict[str, float]:
    """``{"loss", "accuracy", "n"}`` of ``model`` on ``data`` in eval mode without recording gradients
    (the model's train/eval mode is restored afterwards)."""
    was_training = getattr(model, "training", True)
    model.eval()
    total_loss = 0.0
    correct = 0
    n = 0
    try:
        with no_grad():
            for x, y in _batches(data, batch_size):
                logits = model(tensor(x))
                total_loss += float(loss_fn(logits, y).item()) * len(y)
                correct += int((np.argmax(logits.numpy(), axis=1) == y).sum())
                n += len(y)
    finally:
        model.train(was_training)
    if n == 0:
        raise ValueError("evaluate: no samples in data")
    return {"loss": total_loss / n, "accuracy": correct / n, "n": n}


# --------------------------------------------------------------------------------------------------------------
# Logs and plots


def _write_logs(records: List[Dict[str, Any]], log_csv: Optional[str], log_json: Optional[str]) -> None:
    # Rewritten whole after each epoch, so a resumed run's log holds the full curve and never duplicates rows.
    if log_csv:
        tmp = f"{log_csv}.tmp"
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=_RECORD_FIELDS, extrasaction="ignore")
            writer.writeheader()
            for r in records:
                writer.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in _RECORD_FIELDS})
        os.replace(tmp, log_csv)
    if log_json:
        tmp = f"{log_json}.tmp"
        with open(tmp, "w") as f:
            json.dump(records, f, indent=1)
        os.replace(tmp, log_json)


def _require_matplotlib() -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError as exc:
        raise ImportError('plotting needs matplotlib: pip install "edgelearn[plot]" (or: pip install matplotlib)') from exc


def plot_history(records: List[Dict[str, Any]], path: str) -> None:
    """Loss and accuracy curves (train and validation) over epochs, saved as an image (format from the suffix)."""
    _require_matplotlib()
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    epochs = [r["epoch"] for r in records]
    fig = Figure(figsize=(9, 3.5))
    FigureCanvasAgg(fig)
    ax_loss, ax_acc = fig.subplots(1, 2)
    for ax, metric, title in ((ax_loss, "loss", "loss"), (ax_acc, "accuracy", "accuracy")):
        ax.plot(epochs, [r[f"train_{metric}"] for r in records], marker="o", label="train")
        if any(r.get(f"val_{metric}") is not None for r in records):
            ax.plot(epochs, [r.get(f"val_{metric}") for r in records], marker="o", label="validation")
        ax.set_xlabel("epoch")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


# --------------------------------------------------------------------------------------------------------------
# fit


def _progress_bar(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    # Bars go to stderr and only to a terminal, so piped output (and --json's last line) stays clean.
    return tqdm(total=total, desc=desc, unit="batch", leave=False, file=sys.stderr,
                disable=not (enabled and sys.stderr.isatty()), dynamic_ncols=True)


def _say(message: str, verbose: bool) -> None:
    if verbose:
        from tqdm.auto import tqdm

        tqdm.write(message, file=sys.stdout)


class _Decoded:
    """``images[idx]`` of a dataset that decodes per batch (no rng: center crop, no flip)."""

    def __init__(self, dataset: Any):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, idx: Any) -> np.ndarray:
        return self.dataset.load_batch(idx)


def _batch_tensor(x: Any) -> Tensor:
    """A training batch as a Tensor: the loader's array itself when it already is float32 and C-contiguous
    (a model never writes over its input, and the batch is the step's alone), else a converted copy
    (``tensor``)."""
    if type(x) is np.ndarray and x.dtype == np.float32 and x.flags.c_contiguous:
        return Tensor(x)
    return tensor(x)


def recalibrate_batchnorm(model: Any, data: DataLike, *, batches: int = 32, batch_size: int = 64,
                          seed: int = 0) -> int:
    """Re-estimates every BatchNorm's running statistics as the exact average over ``batches`` batches of
    ``data`` (a fixed, seeded sample), with the other layers in eval mode and no gradients.

    Why: running statistics are an exponential average taken while the weights move. When training moves the
    weights along directions BatchNorm is blind to (a per-channel shift of its input, which INT8 gradient
    clipping nudges), eval-mode statistics lag behind the batch statistics the model was trained with.
    Re-estimating them with the final weights (BN re-estimation, common for quantized training) removes
    the lag. BatchNorms with frozen statistics (``frozen``) are left alone. Returns the number of images used
    (0 if the model has no BatchNorm to re-estimate).
    """
    bns = [m for m in model.modules() if hasattr(m, "running_mean") and hasattr(m, "momentum")
           and not getattr(m, "frozen", False)]  # frozen statistics stay as they are
    if not bns or batches <= 0:
        return 0
    dataset = data.dataset if isinstance(data, DataLoader) else data
    if isinstance(dataset, tuple):
        images = dataset[0]
    elif hasattr(dataset, "load_batch"):  # decoded per batch (ImageFolder): evaluation transforms
        images = _Decoded(dataset)
    else:
        images = dataset.images
    n = min(len(images), batches * batch_size)
    idx = np.sort(np.random.default_rng(seed).choice(len(images), size=n, replace=False))
    was_training = model.training
    saved = [(bn, bn.momentum) for bn in bns]
    model.eval()
    try:
        for bn in bns:
            bn.running_mean[...] = 0.0
            bn.running_var[...] = 1.0
            bn.train()
        with no_grad():
            for i, start in enumerate(range(0, n, batch_size)):
                for bn in bns:
                    bn.momentum = 1.0 / (i + 1)  # cumulative average over the batches seen
                model(tensor(np.ascontiguousarray(images[idx[start:start + batch_size]])))
    finally:
        for bn, momentum in saved:
            bn.momentum = momentum
        model.train(was_training)
    return n


def fit(
    model: Any,
    opt: Any,
    train: Union[ArrayDataset, DataLoader],
    val: Optional[DataLike] = None,
    epochs: int = 1,
    *,
    loss_fn: LossFn = cross_entropy,
    scheduler: Any = None,
    batch_size: int = 64,
    seed: int = 0,
    augment: Optional[Callable] = None,
    eval_batch_size: int = 512,
    checkpoint: Optional[Union[str, "os.PathLike[str]"]] = None,
    resume: bool = False,
    log_csv: Optional[Union[str, "os.PathLike[str]"]] = None,
    log_json: Optional[Union[str, "os.PathLike[str]"]] = None,
    plot: Optional[Union[str, "os.PathLike[str]"]] = None,
    progress: bool = True,
    verbose: bool = True,
    config: Optional[Mapping[str, Any]] = None,
    bn_recalibration_batches: int = 32,
    val_name: str = "val",
) -> History:
    """Train ``model`` with optimizer ``opt`` for ``epochs`` epochs (in total, counting epochs done before a resume).

    - ``train``: an :class:`ArrayDataset` (batched by a shuffling ``DataLoader(batch_size, seed, augment)``) or
      your own :class:`DataLoader`. ``val``: data evaluated after each epoch (no selection is made on it).
    - The loss is ``loss_fn(model(x), y) + model.regularization()`` (the LAC term; 0 for models without it);
      the curves report ``loss_fn`` alone. ``scheduler.step()`` runs once per epoch.
    - ``checkpoint``: file written (atomically) after every epoch; with ``resume`` an existing one is loaded and
      training continues exactly where it stopped (see the module docstring). ``config`` is stored in it.
    - ``log_csv`` / ``log_json``: per-epoch records, rewritten after each epoch. ``plot``: image of the curves
      (needs ``edgelearn[plot]``). ``progress``: tqdm bar on a terminal. ``verbose``: one line per epoch on stdout.
    - ``bn_recalibration_batches``: after each epoch, BatchNorm running statistics are re-estimated on this
      many training batches (see :func:`recalibrate_batchnorm`; counted in the training time and also reported
      on its own, ``History.bn_recalibration_s``; 0 turns it off).
    - ``val_name``: how the per-epoch line names ``val`` (``edgelearn train`` passes ``"test"``: it is the test
      set); the records keep the keys ``val_loss`` / ``val_accuracy``.
    """
    if epochs < 0:
        raise ValueError(f"epochs: expected >= 0, got {epochs}")
    if plot is not None:
        _require_matplotlib()  # fail before training, not after
    if resume and checkpoint is None:
        raise ValueError("resume=True needs a checkpoint path")
    loader = train if isinstance(train, DataLoader) else DataLoader(
        train, batch_size=batch_size, shuffle=True, seed=seed, augment=augment
    )
    if len(loader) == 0:
        raise ValueError("train: fewer samples than one batch")
    has_regularizer = callable(getattr(model, "regularization", None))

    history = History()
    start_epoch, step = 0, 0
    if resume and os.path.exists(os.fspath(checkpoint)):
        meta = ckpt.load_checkpoint(checkpoint, model, opt, scheduler)
        start_epoch, step = int(meta["epoch"]), int(meta["step"])
        if meta.get("rng_state"):
            ckpt.set_rng_state(meta["rng_state"], init=_init.generator())
        history.records = list((meta.get("extra") or {}).get("history", []))[:start_epoch]
        history.resumed_from_epoch = start_epoch
        _say(f"resumed from {os.fspath(checkpoint)} at epoch {start_epoch} (step {step})"
             + (f": the run already finished its {epochs} epoch{'s' if epochs != 1 else ''}, nothing left to train"
                if start_epoch >= epochs else ""), verbose)
    elif resume:
        _say(f"no checkpoint at {os.fspath(checkpoint)} yet: starting from scratch", verbose)

    release_large_buffers()
    release_idle_memory()
    history.rss_before_first_step_mb = current_rss_mb()
    process_peak = peak_rss_mb()
    images_seen = 0
    train_seconds = 0.0
    recalibration_seconds = 0.0
    for epoch in range(start_epoch, epochs):
        model.train()
        loader.set_epoch(epoch)
        loss_sum, correct, seen = 0.0, 0, 0
        bar = _progress_bar(len(loader), f"epoch {epoch + 1}/{epochs}", progress)
        process_peak = max(process_peak, peak_rss_mb())  # the reset below also lowers ru_maxrss
        release_idle_memory()  # what the last epoch's evaluation left resident is not training memory
        hwm_reset = _reset_peak_rss()
        t0 = time.perf_counter()
        # The objects that exist before the loop (modules, parameters, datasets, imported libraries) are moved
        # out of the collector's sight for the epoch: its full collections, triggered by the many small objects
        # a step makes, otherwise walk all of them (~3% of a small model's step). Not done when the caller
        # froze objects already (unfreeze would release theirs too).
        froze = gc.isenabled() and gc.get_freeze_count() == 0
        if froze:
            gc.freeze()
        try:
            for x, y in loader:
                logits = model(_batch_tensor(x))
                loss = loss_fn(logits, y)
                total = loss + model.regularization() if has_regularizer else loss
                opt.zero_grad()
                total.backward()
                opt.step()
                step += 1
                if not history.rss_after_first_step_mb:
                    # one warm-up step done: the warm memory figure starts here
                    first_hwm = _hwm_rss_mb() if hwm_reset else None
                    if first_hwm is not None:
                        history.train_peak_rss_mb = max(history.train_peak_rss_mb, first_hwm)
                    # what the step freed goes back first: the heap keeps freed feature maps for the next
                    # step (release_large_buffers), which would hide them from the warm figure
                    release_idle_memory()
                    history.rss_after_first_step_mb = current_rss_mb()
                    hwm_reset = _reset_peak_rss()
                batch_loss = float(loss.item())
                if not math.isfinite(batch_loss):
                    raise FloatingPointError(f"loss became {batch_loss} at epoch {epoch + 1}, step {step}: "
                                             "lower the learning rate")
                loss_sum += batch_loss * len(y)
                correct += int((np.argmax(logits.numpy(), axis=1) == y).sum())
                seen += len(y)
                bar.update(1)
                bar.set_postfix(loss=f"{loss_sum / seen:.4f}", acc=f"{correct / seen:.3f}", refresh=False)
        finally:
            if froze:
                gc.unfreeze()
            bar.close()
        t_recal = time.perf_counter()
        recalibrate_batchnorm(model, loader, batches=bn_recalibration_batches, batch_size=loader.batch_size,
                              seed=seed + 7919 * (epoch + 1))
        t_end = time.perf_counter()
        epoch_seconds, recal_seconds = t_end - t0, t_end - t_recal
        hwm = _hwm_rss_mb() if hwm_reset else None
        history.train_peak_rss_mb = max(history.train_peak_rss_mb, hwm if hwm is not None else peak_rss_mb())
        if hwm is not None:
            history.warm_peak_rss_mb = max(history.warm_peak_rss_mb, hwm)
        train_seconds += epoch_seconds
        recalibration_seconds += recal_seconds
        images_seen += seen
        lr = float(opt.param_groups[0]["lr"]) if getattr(opt, "param_groups", None) else None
        if scheduler is not None:
            scheduler.step()
        record: Dict[str, Any] = {
            "epoch": epoch + 1,
            "train_loss": loss_sum / seen,
            "train_accuracy": correct / seen,
            "val_loss": None,
            "val_accuracy": None,
            "lr": lr,
            "train_images_per_s": seen / epoch_seconds if epoch_seconds > 0 else float("inf"),
            "epoch_time_s": epoch_seconds,
            "bn_recalibration_s": recal_seconds,
        }
        if val is not None:
            v = evaluate(model, val, loss_fn=loss_fn, batch_size=eval_batch_size)
            record["val_loss"], record["val_accuracy"] = v["loss"], v["accuracy"]
        history.records.append(record)
        val_text = (f"  {val_name} loss {record['val_loss']:.4f}  {val_name} acc {100 * record['val_accuracy']:.2f}%"
                    if val is not None else "")
        _say(f"epoch {epoch + 1}/{epochs}  loss {record['train_loss']:.4f}  acc {100 * record['train_accuracy']:.2f}%"
             f"{val_text}  {record['train_images_per_s']:.0f} img/s", verbose)

        if checkpoint is not None:
            ckpt.save_checkpoint(
                checkpoint, model, opt, scheduler, epoch=epoch + 1, step=step,
                rng_state=ckpt.get_rng_state(init=_init.generator()),
                extra={"history": history.records, "seed": seed, "config": dict(config or {})},
            )
        _write_logs(history.records, log_csv and os.fspath(log_csv), log_json and os.fspath(log_json))

    history.train_images_per_s = images_seen / train_seconds if train_seconds > 0 else 0.0
    step_seconds = train_seconds - recalibration_seconds
    history.train_step_images_per_s = images_seen / step_seconds if step_seconds > 0 else 0.0
    history.bn_recalibration_s = recalibration_seconds
    history.peak_rss_mb = max(process_peak, peak_rss_mb(), history.train_peak_rss_mb)
    if plot is not None and history.records:
        plot_history(history.records, os.fspath(plot))
    return history
