"""The video pipeline behind ``edgelearn video``: load a model (built-in name or training checkpoint), run it
over decoded frames with :class:`PatchSkipRunner` and, optionally, densely on the same frames in the same
process (alternating in short blocks, so both see the same machine load), and summarise throughput, recompute fraction and
error vs dense. Also the per-frame plot.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, List, Optional

import numpy as np

from ..nn import Module
from ..tensor import no_grad, tensor
from .runner import PatchSkipRunner

__all__ = ["load_video_model", "VideoRun", "run_video", "save_plot", "rel_l2", "prediction_agreement"]


def rel_l2(y: np.ndarray, ref: np.ndarray) -> float:
    """``‖y − ref‖ / ‖ref‖`` (0 when both are 0)."""
    # plain reductions, not np.linalg.norm: a BLAS call leaves OpenBLAS threads spinning, which steals
    # cores from the very inference being timed
    r = np.asarray(ref, np.float64)
    d = float(np.sqrt(np.square(np.asarray(y, np.float64) - r).sum()))
    n = float(np.sqrt(np.square(r).sum()))
    return d / n if n > 0 else (0.0 if d == 0 else float("inf"))


def prediction_agreement(y: np.ndarray, ref: np.ndarray) -> float:
    """Fraction of predictions on which ``y`` and ``ref`` agree: the argmax over channels per pixel for a dense
    head ``(1, C, H, W)``, the argmax over classes for a classifier ``(1, classes)`` (1.0 or 0.0 per frame)."""
    y, ref = np.asarray(y), np.asarray(ref)
    if y.shape != ref.shape:
        raise ValueError(f"prediction_agreement: shapes differ ({y.shape} vs {ref.shape})")
    if y.ndim < 2 or y.shape[1] == 0:
        return 1.0 if np.array_equal(y, ref) else 0.0
    return float(np.mean(np.argmax(y, axis=1) == np.argmax(ref, axis=1)))


def load_video_model(spec: str, seed: int = 0, width_mult: float = 1.0, pretrained: bool = True) -> Module:
    """A model for video in eval mode: a built-in name of ``edgelearn.models.VIDEO_MODEL_NAMES`` (``"fcn"``
    with the trained weights shipped with the package unless ``pretrained=False``, see
    ``edgelearn.models.fcn_weights``; otherwise random initialisation from ``seed``) or the path of a checkpoint written by ``edgelearn train --checkpoint``
    (rebuilt from its stored settings: architecture, precision, LAC; then its weights loaded strictly), or
    one written by ``edgelearn collab join --save-full`` (a cnn trained split). ``width_mult`` scales a built-in
    ``mobilenet_v2``."""
    from .. import models
    from ..nn import manual_seed

    if spec in models.VIDEO_MODEL_NAMES:
        manual_seed(seed)
        return models.build_video_model(spec, width_mult=width_mult, pretrained=pretrained).eval()
    if width_mult != 1.0:
        raise ValueError(f"width_mult (--width-mult) scales a built-in mobilenet_v2; the checkpoint {spec!r} keeps "
                         f"the widths it was trained with (got {width_mult})")
    if not (os.path.exists(spec) or spec.endswith(".safetensors")):
        raise ValueError(f"model: {spec!r} is neither a built-in architecture ({', '.join(models.VIDEO_MODEL_NAMES)}) "
                         "nor a checkpoint file")
    from .. import nn
    from ..run import load_trained

    model = load_trained(spec).model  # the trained architecture, precision and weights
    if not any(isinstance(m, nn.Conv2d) for m in model.modules()):
        raise ValueError(f"{spec}: the model has no convolutional part to run on video (train --model cnn)")
    return model.eval()


def set_precision(model: Module, precision: Optional[str] = None) -> str:
    """Puts ``model`` in ``precision`` (``"fp32"``, ``"int8"``: Octo with the default ``OctoConfig``; ``None``:
    as it is) and returns the precision it runs in. A model already in the asked precision is left as it is, so
    an INT8 checkpoint keeps its own Octo settings (LAC, per-channel weights)."""
    from ..octo import OctoConfig, fp32, octo

    def current() -> str:
        return "int8" if any(getattr(m, "int8", None) is not None for m in model.modules()) else "fp32"

    if precision not in (None, "fp32", "int8"):
        raise ValueError(f"precision: expected 'fp32', 'int8' or None, got {precision!r}")
    if precision is not None and precision != current():
        (octo(model, OctoConfig()) if precision == "int8" else fp32(model)).eval()
    return current()


@dataclass
class VideoRun:
    """Per-frame records and totals of one pass over a clip."""

    frames: int = 0
    skip_seconds: float = 0.0
    dense_seconds: float = 0.0
    records: List[Dict[str, Any]] = field(default_factory=list)

    def summary(self) -> Dict[str, Any]:
        fr = [r["compute_fraction"] for r in self.records]
        errs = [r["error"] for r in self.records if r.get("error") is not None]
        out: Dict[str, Any] = {
            "frames": self.frames,
            "patchskip_fps": self.frames / self.skip_seconds if self.skip_seconds > 0 else None,
            "mean_compute_fraction": float(np.mean(fr)) if fr else None,
            "mean_patch_fraction": float(np.mean([r["patch_fraction"] for r in self.records])) if fr else None,
            "skip_fraction": 1.0 - float(np.mean(fr)) if fr else None,
            "dense_frames": int(sum(r["dense"] for r in self.records)),
            "mean_gate_ms": 1e3 * float(np.mean([r["gate_seconds"] for r in self.records])) if fr else None,
            "mean_estimated_error": float(np.mean([r["estimated_error"] for r in self.records])) if fr else None,
        }
        if self.dense_seconds > 0:
            out["dense_fps"] = self.frames / self.dense_seconds
            out["speedup"] = self.dense_seconds / self.skip_seconds if self.skip_seconds > 0 else None
        if errs:
            out["mean_rel_l2_error"] = float(np.mean(errs))
            out["max_rel_l2_error"] = float(np.max(errs))
            agree = [r["agreement"] for r in self.records if r.get("agreement") is not None]
            out["mean_agreement"] = float(np.mean(agree))
            out["min_agreement"] = float(np.min(agree))
        if fr:
            cf = float(np.mean(fr))
            out["ideal_speedup"] = 1.0 / cf if cf > 0 else None
            if out.get("speedup") and out["ideal_speedup"]:
                out["realised_fraction"] = out["speedup"] / out["ideal_speedup"]

            def ms(key: str) -> float:
                return 1e3 * float(np.mean([r.get(key, 0.0) for r in self.records]))

            split = {k: ms(f"{k}_seconds") for k in ("gate", "bookkeeping", "recompute", "tail")}
            split["other"] = ms("seconds") - sum(split.values())
            out["time_split_ms"] = split
            layers = [r["layer_seconds"] for r in self.records if r.get("layer_seconds") and not r.get("dense")]
            if layers and all(len(v) == len(layers[0]) for v in layers):
                out["layer_ms"] = [1e3 * float(v) for v in np.mean(np.asarray(layers, np.float64), axis=0)]
            out["mean_frame_ms"] = ms("seconds")
        return out


def run_video(
    frames: Iterable[np.ndarray],
    model: Module,
    runner: PatchSkipRunner,
    compare_dense: bool = False,
    progress: bool = False,
    total: Optional[int] = None,
    block: int = 8,
) -> VideoRun:
    """Runs ``runner`` over ``frames`` and, with ``compare_dense``, ``model`` densely on the same frames (same
    preprocessing), recording per frame the runner's stats and the relative L2 error vs dense.

    The two alternate in blocks of ``block`` frames (patch-skip on a block, then dense on it): both see the
    same machine load, and neither evicts the other's working set from the caches on every frame, which
    frame-by-frame alternation would (a deployment runs one of them, not both). With ``compare_dense`` one
    untimed dense pass on the first frame warms the process up for both."""
    if block < 1:
        raise ValueError(f"block: must be >= 1, got {block}")
    run = VideoRun()
    it: Iterable[np.ndarray] = frames
    if progress:
        from tqdm import tqdm

        it = tqdm(frames, total=total, unit="frame", desc="video")
    model.eval()
    pending: List[np.ndarray] = []

    def flush() -> None:
        outs, recs = [], []
        if compare_dense and not run.records:
            # one untimed dense pass first: the process's first conv call pays for its scratch buffers and
            # page faults, which would otherwise be charged to whichever of the two runs first (patch skip)
            model(tensor(runner.preprocess(pending[0])[None]))
        t0 = time.perf_counter()
        for frame in pending:
            outs.append(runner(frame))
            recs.append(runner.stats)
        run.skip_seconds += time.perf_counter() - t0
        if compare_dense:
            refs = []
            t0 = time.perf_counter()
            for frame in pending:
                refs.append(model(tensor(runner.preprocess(frame)[None])).numpy())
            run.dense_seconds += time.perf_counter() - t0
            for rec, y, ref in zip(recs, outs, refs):
                rec["error"] = rel_l2(y, ref)
                rec["agreement"] = prediction_agreement(y, ref)
        else:
            for rec in recs:
                rec["error"] = rec["agreement"] = None
        run.records.extend(recs)
        run.frames += len(pending)
        pending.clear()

    with no_grad():
        for frame in it:
            pending.append(frame)
            if len(pending) == block:
                flush()
        if pending:
            flush()
    return run


def save_plot(run: VideoRun, path: "os.PathLike[str] | str", title: str = "") -> None:
    """Per-frame plot: fraction recomputed (compute and input patches) and error vs dense (or the runner's
    estimated input error when no dense comparison ran) over time. Needs matplotlib (``edgelearn[plot]``)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ImportError('--save-plot needs matplotlib: pip install "edgelearn[plot]"') from None
    t = np.arange(len(run.records))
    fig, (a1, a2) = plt.subplots(2, 1, figsize=(8, 5), sharex=True)
    a1.plot(t, [r["compute_fraction"] for r in run.records], label="work recomputed")
    a1.plot(t, [r["patch_fraction"] for r in run.records], label="input patches flagged", alpha=0.7)
    a1.set_ylabel("fraction")
    a1.set_ylim(0, 1.05)
    a1.legend(loc="upper right")
    errs = [r["error"] for r in run.records]
    if all(e is not None for e in errs) and errs:
        a2.plot(t, errs, color="C3", label="rel. L2 error vs dense")
    a2.plot(t, [r["estimated_error"] for r in run.records], color="C2", alpha=0.7, label="estimated input error")
    a2.set_xlabel("frame")
    a2.set_ylabel("relative L2")
    a2.legend(loc="upper right")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(os.fspath(path), dpi=100)
    plt.close(fig)
