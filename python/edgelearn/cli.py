"""The ``edgelearn`` command-line tool: a face over the public API, never a second implementation.

Every error a user can cause (a bad flag value, an unreadable or unwritable path, a malformed checkpoint, too
little memory) ends in one ``edgelearn: error: ...`` line on stderr saying what to do, with exit status 2;
Ctrl-C ends in one line (for ``train --checkpoint``, with the command that resumes), exit status 130.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import sys
from typing import NoReturn


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one ``edgelearn: error: ...`` line (the usage is one ``--help`` away)."""

    def error(self, message: str) -> "NoReturn":  # type: ignore[override]
        self.exit(2, f"edgelearn: error: {message} (see '{self.prog} --help')\n")


def _number(kind: type = float, lo: "float | None" = None, hi: "float | None" = None, lo_open: bool = False):
    """An argparse type: a finite ``kind`` (int or float) in ``[lo, hi]`` (``(lo, hi]`` with ``lo_open``)."""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, got {text!r}")
        if kind is float and not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"expected a finite number, got {text}")
        if lo is not None and (value < lo or (lo_open and value == lo)):
            raise argparse.ArgumentTypeError(f"expected a number {'>' if lo_open else '>='} {lo:g}, got {text}")
        if hi is not None and value > hi:
            raise argparse.ArgumentTypeError(f"expected a number <= {hi:g}, got {text}")
        return value

    parse.__name__ = "integer" if kind is int else "number"  # argparse names the type in some messages
    return parse


_port = _number(int, 0, 65535)
_positive_float = _number(float, 0, lo_open=True)
_nonneg_float_f = _number(float, 0)


def _writable(path: str, flag: str) -> None:
    """Fails now (``ValueError`` naming ``flag``) if ``path`` cannot be written, rather than after a long run."""
    import tempfile

    if os.path.isdir(path):
        raise ValueError(f"{flag}: {path} is a directory; give a file path such as {os.path.join(path, 'out')}")
    directory = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(directory, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".edgelearn-write-test.", dir=directory)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise ValueError(f"{flag}: cannot write {path}: {exc.strerror or exc}; choose a writable location") from None


def _cmd_info(args: argparse.Namespace) -> int:
    import edgelearn

    info = edgelearn.backend_info()
    if args.json:
        print(json.dumps(info))
        return 0
    width = max(len(k) for k in info)
    for key, value in info.items():
        if isinstance(value, (list, tuple)):
            value = ", ".join(map(str, value)) or "(none)"
        print(f"{key:<{width}}  {value}")
    return 0


_positive_int = _number(int, 1)
_nonnegative_int = _number(int, 0)


PRC_DEFAULT = "minmax"


def _cmd_train(args: argparse.Namespace) -> int:
    import edgelearn
    from edgelearn import data as eldata
    from edgelearn import optim
    from edgelearn.models import build_model
    from edgelearn.train import evaluate, fit

    if args.threads is not None:
        edgelearn.set_num_threads(args.threads)
    if args.resume and not args.checkpoint:
        raise ValueError("--resume needs --checkpoint PATH")
    for flag in ("checkpoint", "log_csv", "log_json", "plot"):
        if getattr(args, flag):
            _writable(getattr(args, flag), "--" + flag.replace("_", "-"))
    splits = eldata.get_dataset(args.dataset, seed=args.seed)
    train, test = splits.train, splits.test
    augment = None
    if args.augment != "none":
        transforms = [eldata.RandomCrop(args.crop_padding)]
        if args.augment == "crop-flip":
            transforms.append(eldata.RandomHorizontalFlip())
        augment = eldata.Compose(transforms)

    edgelearn.manual_seed(args.seed)
    model = build_model(args.model, train.image_shape, train.num_classes)
    if args.precision == "int8":
        prc = None if args.no_prc or args.prc == "none" else args.prc
        config = edgelearn.OctoConfig(lac=not args.no_lac, prc=prc, z=args.prc_z, kappa=args.prc_kappa,
                                      per_channel_weights=args.per_channel_weights,
                                      grad_rounding=args.grad_rounding,
                                      seed=args.seed)
        edgelearn.octo(model, config)
    params = list(model.parameters())
    if args.optimizer == "sgd":
        opt = optim.SGD(params, lr=args.lr, momentum=0.9, weight_decay=args.weight_decay, nesterov=True)
    else:
        opt = optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay)
    scheduler = optim.CosineAnnealingLR(opt, T_max=args.epochs)

    settings = {k: v for k, v in vars(args).items() if k != "func"}
    if not args.json:
        print(f"training {args.model} ({args.precision}) on {args.dataset}: {len(train)} train / {len(test)} test "
              f"images {train.image_shape}, {args.epochs} epochs, batch {args.batch_size}, "
              f"{edgelearn.get_num_threads()} threads, kernel {edgelearn.backend_info().get('kernel')}")
    history = fit(
        model, opt, train, test, args.epochs,
        scheduler=scheduler, batch_size=args.batch_size, seed=args.seed, augment=augment,
        checkpoint=args.checkpoint, resume=args.resume, log_csv=args.log_csv, log_json=args.log_json,
        plot=args.plot, progress=not args.no_progress, verbose=True, config=settings,
    )
    result = evaluate(model, test)
    print(f"test accuracy: {100 * result['accuracy']:.2f}% ({result['n']} images, test loss {result['loss']:.4f})")
    if args.json:
        summary = history.summary()
        print(json.dumps({
            "test_accuracy": result["accuracy"],
            "test_loss": result["loss"],
            "train_images_per_s": summary["train_images_per_s"],
            "epochs": len(history),
            "precision": args.precision,
            "dataset": args.dataset,
            "model": args.model,
            "batch_size": args.batch_size,
            "seed": args.seed,
            "lac": args.precision == "int8" and not args.no_lac,
            "prc": (None if args.no_prc or args.prc == "none" else args.prc) if args.precision == "int8" else None,
            "grad_rounding": args.grad_rounding if args.precision == "int8" else None,
            "per_channel_weights": args.per_channel_weights if args.precision == "int8" else None,
            "threads": edgelearn.get_num_threads(),
            "kernel": edgelearn.backend_info().get("kernel"),
            "peak_rss_mb": summary["peak_rss_mb"],
            "rss_before_first_step_mb": summary["rss_before_first_step_mb"],
            "train_peak_rss_mb": summary["train_peak_rss_mb"],
            "train_memory_mb": summary["train_memory_mb"],
            "resumed_from_epoch": summary["resumed_from_epoch"],
            "final_train_loss": history.records[-1]["train_loss"] if len(history) else None,
        }))
    return 0


# --------------------------------------------------------------------------------------------------------------
# collab: the cloud (serve) and an edge device (join) of split learning over gRPC


def _say_flush(message: str) -> None:
    print(message, flush=True)


def _token(args: argparse.Namespace):
    import os

    return args.token if args.token is not None else os.environ.get("EDGELEARN_COLLAB_TOKEN") or None


def _cmd_collab_serve(args: argparse.Namespace) -> int:
    import os
    import signal
    import threading
    import time

    import edgelearn
    from edgelearn.collab import Cloud
    from edgelearn.collab.transport import CloudServer

    if args.threads is not None:
        edgelearn.set_num_threads(args.threads)
    input_shape = classes = None
    if args.dataset:
        from edgelearn import data as eldata

        train = eldata.get_dataset(args.dataset, seed=args.seed).train
        input_shape, classes = train.image_shape, train.num_classes
    if args.port_file:
        _writable(args.port_file, "--port-file")
    cloud = Cloud(args.model, args.split, seed=args.seed, lr=args.lr, momentum=args.momentum,
                  weight_decay=args.weight_decay, input_shape=input_shape, classes=classes,
                  max_input_elements=args.max_input_elements, log=_say_flush)
    server = CloudServer(cloud, args.host, args.port, token=_token(args), tls_cert=args.tls_cert,
                         tls_key=args.tls_key, max_edges=args.max_edges,
                         max_message_bytes=int(args.max_message_mb * 2**20), idle_timeout=args.idle_timeout,
                         log=_say_flush)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    server.start()
    if args.port_file:
        tmp = f"{args.port_file}.tmp"
        with open(tmp, "w") as f:
            f.write(f"{server.port}\n")
        os.replace(tmp, args.port_file)
    _say_flush(f"cloud listening on {args.host}:{server.port} ({'TLS' if server.tls else 'no TLS'}, "
               f"{'token required' if server.token else 'no token'}): {args.model} split at {args.split}"
               + (f"; exits after {args.edges} edge sessions" if args.edges else ""))
    deadline = time.monotonic() + args.timeout if args.timeout else None
    timed_out = False
    try:
        while not stop.is_set():
            if args.edges and cloud.wait_ended(args.edges, 0.2):
                break
            if not args.edges:
                stop.wait(0.2)
            if deadline is not None and time.monotonic() > deadline:
                timed_out = True
                break
    finally:
        server.stop(grace=2.0)
    ended = list(cloud.ended)
    counts = {s: sum(e["status"] == s for e in ended) for s in ("completed", "dropped", "rejected")}
    _say_flush(f"cloud stopped: {cloud.steps} steps applied; {counts['completed']} edges completed, "
               f"{counts['dropped']} dropped, {counts['rejected']} rejected")
    if args.json:
        print(json.dumps({"port": server.port, "steps": cloud.steps, **counts, "sessions": ended,
                          "timed_out": timed_out}, default=str))
    if timed_out:
        print(f"edgelearn: error: --timeout {args.timeout:g} s reached with {len(ended)} of {args.edges} edge "
              "sessions ended", file=sys.stderr)
        return 1
    return 0


def _cmd_collab_join(args: argparse.Namespace) -> int:
    import time

    import edgelearn
    from edgelearn import data as eldata
    from edgelearn.collab import Edge, train_edge
    from edgelearn.collab.transport import GrpcTransport

    if args.threads is not None:
        edgelearn.set_num_threads(args.threads)
    splits = eldata.get_dataset(args.dataset, seed=args.seed)
    train, test = splits.train, splits.test
    t0 = time.perf_counter()
    transport = GrpcTransport(args.server, token=_token(args), root_cert=args.tls_root_cert,
                              server_name=args.tls_server_name, connect_timeout=args.connect_timeout,
                              max_message_bytes=int(args.max_message_mb * 2**20))
    try:
        octo_config = None
        if args.precision == "int8":
            octo_config = edgelearn.OctoConfig(seed=args.seed)
        edge = Edge(transport, train.image_shape, train.num_classes, mode=args.mode, bits=args.bits,
                    group=args.group, stripe_rows=args.stripe_rows, precision=args.precision,
                    octo_config=octo_config, lr=args.lr, name=args.name, model=args.model, split=args.split,
                    feature_group=args.feature_group, feature_stripe_rows=args.feature_stripe_rows or None,
                    feature_ranges=args.feature_ranges, constant_blocks=not args.no_constant_blocks)
    except BaseException:
        transport.close()
        raise
    _say_flush(f"edge {edge.edge_id} joined {args.server}: {edge.model_name} split at {edge.split} "
               f"({args.precision} edge part), {args.mode} {edge.summary()['bits']}-bit features "
               f"{edge.feature_shape}, {len(train)} train / {len(test)} test images of {args.dataset}")
    try:
        result = train_edge(edge, train, None if args.no_eval else test, epochs=args.epochs, steps=args.steps,
                            batch_size=args.batch_size, seed=args.seed, eval_limit=args.eval_limit,
                            bn_recalibration_batches=args.bn_recalibration_batches,
                            progress=not args.no_progress, log_every=args.log_every, log=_say_flush)
    except BaseException:
        transport.close()
        raise
    result.update(dataset=args.dataset, server=args.server, seconds=time.perf_counter() - t0)
    up, down = result["bytes_up_per_sample"], result["bytes_down_per_sample"]
    _say_flush(f"trained {result['steps']} steps ({result['train_samples']} samples): train loss "
               f"{result['train_loss']:.4f}, feature rel. L2 error {result['feature_rel_l2'] or 0:.4f}, "
               f"gradient {result['grad_rel_l2'] or 0:.4f}")
    if up is not None:
        _say_flush(f"wire: {up:.1f} B/sample up, {down:.1f} B/sample down ({result['bytes_up']} B up, "
                   f"{result['bytes_down']} B down in all); {result['compression_vs_fp32']:.2f}x less than fp32 "
                   f"features + gradients ({2 * result['fp32_feature_bytes_per_sample']} B/sample)")
    if "test_accuracy" in result:
        _say_flush(f"test accuracy: {100 * result['test_accuracy']:.2f}% ({result['test_samples']} images, "
                   f"through the split)")
    if args.json:
        print(json.dumps(result, default=str))
    return 0


def _add_collab_parser(sub) -> None:
    from edgelearn.collab.protocol import MAX_MESSAGE_BYTES

    p_collab = sub.add_parser(
        "collab", help="collaborative (split) learning over gRPC: a cloud (serve) and edge devices (join)",
        description="Split learning: each edge device trains the first layers of a model on its own data and "
                    "sends (SGQ-compressed) features to one cloud, which trains the rest and sends gradients "
                    "back. The cloud decides the model, split and seed; edges send their data's shape.")
    csub = p_collab.add_subparsers(dest="collab_command", metavar="ACTION")
    csub.required = True
    from edgelearn.collab.cloud import MAX_INPUT_ELEMENTS
    from edgelearn.collab.transport import IDLE_TIMEOUT

    max_mb = MAX_MESSAGE_BYTES / 2**20
    message_mb = _number(float, 0, 2047, lo_open=True)  # gRPC lengths are int32

    p_serve = csub.add_parser("serve", help="run the cloud", description="Run the cloud part of split learning.")
    p_serve.add_argument("--model", choices=("mlp", "cnn"), default="cnn")
    p_serve.add_argument("--split", type=_positive_int, default=4,
                         help="layer index of the split: edge = layers [0, split), cloud = the rest (default 4)")
    p_serve.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0 for other machines)")
    p_serve.add_argument("--port", type=_port, default=50051, help="TCP port; 0 picks a free one (see --port-file)")
    p_serve.add_argument("--port-file", metavar="PATH", help="write the port listened on to PATH")
    p_serve.add_argument("--dataset", default=None,
                         help="fix the model's input shape and classes from this dataset now (default: from the "
                              "first edge's HELLO)")
    p_serve.add_argument("--seed", type=int, default=0, help="initialisation of the model (edges use it too)")
    p_serve.add_argument("--lr", type=_nonneg_float_f, default=0.02)
    p_serve.add_argument("--momentum", type=_nonneg_float_f, default=0.9)
    p_serve.add_argument("--weight-decay", type=_nonneg_float_f, default=5e-4)
    p_serve.add_argument("--token", default=None, help="shared token edges must send "
                                                       "(default: $EDGELEARN_COLLAB_TOKEN; none = open)")
    p_serve.add_argument("--tls-cert", metavar="PEM", help="TLS certificate chain (with --tls-key)")
    p_serve.add_argument("--tls-key", metavar="PEM", help="TLS private key (with --tls-cert)")
    p_serve.add_argument("--edges", type=_nonnegative_int, default=0,
                         help="exit after this many edge sessions ended (completed, dropped or rejected); "
                              "0 = serve until SIGINT/SIGTERM")
    p_serve.add_argument("--max-edges", type=_positive_int, default=8, help="edges training at once (default 8)")
    p_serve.add_argument("--max-message-mb", type=message_mb, default=max_mb,
                         help=f"largest message (a batch of features) accepted, MiB (default {max_mb:g})")
    p_serve.add_argument("--idle-timeout", type=_positive_float, default=IDLE_TIMEOUT, metavar="SECONDS",
                         help="end a stream that sends nothing (or does not finish a message) for this long "
                              f"(default {IDLE_TIMEOUT:g})")
    p_serve.add_argument("--max-input-elements", type=_positive_int, default=MAX_INPUT_ELEMENTS, metavar="N",
                         help="largest input (C*H*W values per sample) an edge's HELLO may fix the model to "
                              f"(default {MAX_INPUT_ELEMENTS}; --dataset fixes the shape instead)")
    p_serve.add_argument("--timeout", type=_nonneg_float_f, default=0,
                         help="give up after this many seconds (0 = never)")
    p_serve.add_argument("--threads", type=_positive_int, default=None, help="engine threads")
    p_serve.add_argument("--json", action="store_true", help="end with one JSON line: steps, sessions, traffic")
    p_serve.set_defaults(func=_cmd_collab_serve)

    p_join = csub.add_parser("join", help="run an edge device",
                             description="Train the edge part of the cloud's model on a local dataset.")
    p_join.add_argument("--server", required=True, metavar="HOST:PORT", help="the cloud to dial")
    p_join.add_argument("--dataset", default="digits", help="as in `edgelearn train` (default digits)")
    p_join.add_argument("--mode", choices=("sgq", "uniform", "fp16", "fp32"), default="sgq",
                        help="wire format of features and gradients (default sgq)")
    p_join.add_argument("--bits", type=int, choices=range(1, 9), default=4, metavar="{1..8}",
                        help="code width of sgq/uniform (default 4)")
    p_join.add_argument("--group", type=_positive_int, default=4,
                        help="SGQ channels per group of the gradients (default 4)")
    p_join.add_argument("--stripe-rows", type=_positive_int, default=None,
                        help="SGQ rows per stripe of the gradients (default H/4)")
    p_join.add_argument("--feature-group", type=_positive_int, default=1,
                        help="SGQ channels per group of the features (default 1)")
    p_join.add_argument("--feature-stripe-rows", type=_nonnegative_int, default=1, metavar="N",
                        help="SGQ rows per stripe of the features (default 1; 0: H/4)")
    p_join.add_argument("--feature-ranges", choices=("frame", "sample"), default="frame",
                        help="SGQ feature ranges per (group, stripe) of each batch, or per sample too "
                             "(default frame; gradients always per sample)")
    p_join.add_argument("--no-constant-blocks", action="store_true",
                        help="give constant feature blocks a code per element (default: one code per block)")
    p_join.add_argument("--precision", choices=("int8", "fp32"), default="int8",
                        help="training precision of the edge part (default int8, Octo)")
    p_join.add_argument("--epochs", type=_positive_int, default=1)
    p_join.add_argument("--steps", "--max-steps", dest="steps", type=_positive_int, default=None,
                        help="stop after this many steps in all")
    p_join.add_argument("--batch-size", type=_positive_int, default=64)
    p_join.add_argument("--lr", type=_nonneg_float_f, default=0.02)
    p_join.add_argument("--seed", type=int, default=0, help="data split and order, stochastic rounding")
    p_join.add_argument("--model", choices=("mlp", "cnn"), default=None, help="fail unless the cloud serves this")
    p_join.add_argument("--split", type=_positive_int, default=None, help="fail unless the cloud splits here")
    p_join.add_argument("--name", default="", help="name shown in the cloud's log")
    p_join.add_argument("--token", default=None, help="the cloud's shared token (default: $EDGELEARN_COLLAB_TOKEN)")
    p_join.add_argument("--tls-root-cert", "--tls-ca", dest="tls_root_cert", metavar="PEM",
                        help="use TLS, trusting this root certificate")
    p_join.add_argument("--tls-server-name", default=None, help="name to check in the cloud's certificate")
    p_join.add_argument("--connect-timeout", type=_positive_float, default=30.0, help="seconds to wait for the cloud")
    p_join.add_argument("--max-message-mb", type=message_mb, default=max_mb, help="largest reply accepted, MiB")
    p_join.add_argument("--eval-limit", type=_positive_int, default=None, help="evaluate on the first N test images")
    p_join.add_argument("--no-eval", action="store_true", help="skip the test-set evaluation")
    p_join.add_argument("--bn-recalibration-batches", type=_nonnegative_int, default=32,
                        help="re-estimate BatchNorm statistics of both parts on this many batches after training "
                             "(0 = off; default 32)")
    p_join.add_argument("--log-every", type=_nonnegative_int, default=0, help="print a line every N steps")
    p_join.add_argument("--threads", type=_positive_int, default=None, help="engine threads")
    p_join.add_argument("--no-progress", action="store_true", help="no progress bar")
    p_join.add_argument("--json", action="store_true",
                        help="end with one JSON line: test_accuracy, bytes_up_per_sample, bytes_down_per_sample, "
                             "compression_vs_fp32, feature_rel_l2, grad_rel_l2, steps, ...")
    p_join.set_defaults(func=_cmd_collab_join)


_nonneg_float = _nonneg_float_f
_nonneg_int = _nonnegative_int


def _cmd_video(args: argparse.Namespace) -> int:
    import edgelearn
    from edgelearn.video import PatchSkipRunner, frames
    from edgelearn.video.pipeline import load_video_model, run_video, save_plot

    if args.threads is not None:
        edgelearn.set_num_threads(args.threads)
    if args.save_plot:
        _writable(args.save_plot, "--save-plot")
    model = load_video_model(args.model, seed=args.seed)
    runner = PatchSkipRunner(model, patch=args.patch, threshold=args.threshold, refresh_every=args.refresh,
                             error_bound=args.error_bound)
    reader = frames(args.path, max_frames=args.max_frames)
    total = reader.frame_count if args.max_frames is None else min(args.max_frames, reader.frame_count or args.max_frames)
    stream = reader if args.downsample == 1 else (f[::args.downsample, ::args.downsample] for f in reader)
    run = run_video(stream, model, runner, compare_dense=args.compare_dense, progress=not args.no_progress and not args.json,
                    total=total)
    if run.frames == 0:
        raise ValueError(f"{args.path}: no frames decoded")
    summary = run.summary()
    summary.update(path=str(args.path), model=args.model, patch=args.patch, threshold=args.threshold,
                   refresh=args.refresh, error_bound=args.error_bound, input_shape=list(runner.input_shape or ()))
    if args.save_plot:
        save_plot(run, args.save_plot, title=f"{os.path.basename(str(args.path))}: {args.model}, patch {args.patch}, "
                                             f"threshold {args.threshold}")
    if args.json:
        print(json.dumps(summary))
        return 0
    print(f"{run.frames} frames {tuple(runner.input_shape or ())} of {args.path}, model {args.model}, patch {args.patch}, threshold {args.threshold}, "
          f"refresh every {args.refresh or 'never'}")
    print(f"patch-skip: {summary['patchskip_fps']:.1f} frames/s, work recomputed {100 * summary['mean_compute_fraction']:.1f}% "
          f"(skipped {100 * summary['skip_fraction']:.1f}%), input patches flagged {100 * summary['mean_patch_fraction']:.1f}%, "
          f"gate {summary['mean_gate_ms']:.3f} ms/frame, {summary['dense_frames']} dense frames")
    if args.compare_dense:
        print(f"dense:      {summary['dense_fps']:.1f} frames/s -> speedup {summary['speedup']:.2f}x")
        print(f"error vs dense (relative L2): mean {summary['mean_rel_l2_error']:.2e}, max {summary['max_rel_l2_error']:.2e}")
    if args.save_plot:
        print(f"plot written to {args.save_plot}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="edgelearn", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    p_info = sub.add_parser("info", help="CPU features seen, INT8 kernel chosen, thread count, version")
    p_info.add_argument("--json", action="store_true", help="print one JSON object")
    p_info.set_defaults(func=_cmd_info)

    p_train = sub.add_parser(
        "train",
        help="train a model on a real dataset and print test accuracy (default: INT8 CNN on scikit-learn digits)",
        description="Train a model on a real dataset (FP32 or Octo INT8) and print its test accuracy.",
    )
    p_train.add_argument("--dataset", default="digits",
                         help="digits (default), mnist5k, fashion-mnist, idx:PATH (directory or DIR/PREFIX of the "
                              "four IDX files) or cifar10:PATH")
    p_train.add_argument("--model", choices=("mlp", "cnn"), default="cnn")
    p_train.add_argument("--precision", choices=("int8", "fp32"), default="int8")
    p_train.add_argument("--epochs", type=_positive_int, default=10)
    p_train.add_argument("--batch-size", type=_positive_int, default=32)
    p_train.add_argument("--seed", type=int, default=0, help="seeds the split, the initialisation, the data order "
                                                             "and stochastic rounding")
    p_train.add_argument("--threads", type=_positive_int, default=None, help="engine threads (default: all cores)")
    p_train.add_argument("--optimizer", choices=("sgd", "adamw"), default="sgd",
                         help="SGD with Nesterov momentum 0.9 (default) or AdamW; cosine learning-rate schedule")
    p_train.add_argument("--lr", type=_positive_float, default=None,
                         help="learning rate (default 0.02 for SGD, 0.002 for AdamW)")
    p_train.add_argument("--weight-decay", type=_nonneg_float_f, default=5e-4)
    p_train.add_argument("--augment", choices=("none", "crop", "crop-flip"), default="none",
                         help="random crop with padding (and horizontal flip)")
    p_train.add_argument("--crop-padding", type=_nonnegative_int, default=2)
    p_train.add_argument("--no-lac", action="store_true", help="INT8 without loss-aware compensation")
    p_train.add_argument("--no-prc", action="store_true", help="INT8 without range clipping of gradients "
                         "(same as --prc none)")
    p_train.add_argument("--prc", choices=("minmax", "sigma", "none"), default=PRC_DEFAULT,
                         help=f"range clipping of incoming gradients: kappa*[min,max] or mean +- z*sigma "
                              f"(default {PRC_DEFAULT})")
    p_train.add_argument("--prc-z", type=_positive_float, default=2.576, help="z of --prc sigma (default 2.576)")
    p_train.add_argument("--prc-kappa", type=_positive_float, default=0.95,
                         help="kappa of --prc minmax (default 0.95)")
    p_train.add_argument("--per-channel-weights", action="store_true",
                         help="INT8: one weight scale per output channel instead of per tensor")
    p_train.add_argument("--grad-rounding", choices=["nearest", "stochastic"], default="stochastic",
                         help="INT8: rounding of incoming gradients after range clipping (default stochastic)")
    p_train.add_argument("--checkpoint", metavar="PATH", help="save a checkpoint (.safetensors) after every epoch")
    p_train.add_argument("--resume", action="store_true", help="continue exactly from --checkpoint if it exists")
    p_train.add_argument("--log-csv", metavar="PATH", help="per-epoch metrics as CSV")
    p_train.add_argument("--log-json", metavar="PATH", help="per-epoch metrics as JSON")
    p_train.add_argument("--plot", metavar="PATH", help='loss/accuracy curves as an image (needs "edgelearn[plot]")')
    p_train.add_argument("--no-progress", action="store_true", help="no progress bar")
    p_train.add_argument("--json", action="store_true",
                         help="end with one JSON line: test_accuracy, train_images_per_s, epochs, precision, "
                              "dataset, peak_rss_mb, ...")
    p_train.set_defaults(func=_cmd_train)
    _add_collab_parser(sub)

    p_video = sub.add_parser(
        "video",
        help="run a conv net over a video with patch skipping (PASS); print throughput, skip fraction, error vs dense",
        description="Run a conv net over a video file (anything PyAV/OpenCV decodes) or a camera index, recomputing "
                    "only the patches that changed, and print frames/s, the fraction of work skipped and (with "
                    "--compare-dense) the speedup and relative L2 error vs dense inference in the same process.",
    )
    p_video.add_argument("path", help="video file, or a camera index such as 0")
    p_video.add_argument("--model", default="fcn",
                         help="built-in architecture (fcn: fully convolutional, default; cnn: conv backbone + pooled "
                              "classifier), randomly initialised from --seed, or a checkpoint from "
                              "'edgelearn train --checkpoint' (a cnn; one-channel models see luma)")
    p_video.add_argument("--patch", type=_positive_int, default=16, help="side of the gate's patches in pixels (16)")
    p_video.add_argument("--threshold", type=_nonneg_float, default=0.05,
                         help="recompute a patch when its max change since its cached reference exceeds this "
                              "(input units: [0, 1] pixels; 0 = any change; default 0.05)")
    p_video.add_argument("--refresh", type=_nonneg_int, default=0, metavar="K",
                         help="dense refresh every K frames (0 = first frame only, default)")
    p_video.add_argument("--error-bound", type=_nonneg_float, default=0.0,
                         help="also refresh densely when the estimated input error (relative L2) passes this (0 = off)")
    p_video.add_argument("--compare-dense", action="store_true",
                         help="also run the model densely on every frame: speedup and error vs dense")
    p_video.add_argument("--max-frames", type=_positive_int, default=None, help="stop after this many frames")
    p_video.add_argument("--downsample", type=_positive_int, default=1,
                         help="keep every k-th pixel in both directions (for large clips)")
    p_video.add_argument("--seed", type=int, default=0, help="initialisation of a built-in model")
    p_video.add_argument("--threads", type=_positive_int, default=None, help="engine threads (default: all cores)")
    p_video.add_argument("--save-plot", metavar="FILE",
                         help='per-frame plot of skip fraction and error over time (needs "edgelearn[plot]")')
    p_video.add_argument("--no-progress", action="store_true", help="no progress bar")
    p_video.add_argument("--json", action="store_true", help="print one JSON object (no progress bar)")
    p_video.set_defaults(func=_cmd_video)
    return parser


def _resume_command(argv: "list[str]") -> str:
    """The command line that continues an interrupted ``train --checkpoint`` run."""
    args = [a for a in argv]
    if "--resume" not in args:
        args.append("--resume")
    return "edgelearn " + " ".join(shlex.quote(a) for a in args)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    if getattr(args, "command", None) == "train" and args.lr is None:
        args.lr = 0.02 if args.optimizer == "sgd" else 0.002
    try:
        return args.func(args)
    except KeyboardInterrupt:
        line = "edgelearn: interrupted"
        if getattr(args, "command", None) == "train" and getattr(args, "checkpoint", None):
            line += f"; to continue from the last saved epoch: {_resume_command(argv)}"
        print(line, file=sys.stderr)
        return 130
    except MemoryError as exc:
        print(f"edgelearn: error: out of memory: {exc or 'an allocation failed'}; use smaller inputs (batch size, "
              "frame size) or a machine with more memory", file=sys.stderr)
        return 2
    except (ValueError, TypeError) as exc:  # bad settings, malformed checkpoints (CheckpointError) are user errors
        print(f"edgelearn: error: {exc}", file=sys.stderr)
        return 2
    except (FileNotFoundError, ImportError) as exc:  # a dataset or optional extra missing: the message says how to get it
        print(f"edgelearn: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # unreadable/unwritable paths, a full disk
        where = f"{exc.filename}: " if getattr(exc, "filename", None) else ""
        print(f"edgelearn: error: {where}{exc.strerror or exc}; check the path and its permissions", file=sys.stderr)
        return 2
    except Exception as exc:
        from edgelearn.collab.protocol import CollabError

        if isinstance(exc, CollabError):  # refused, unreachable or broken peer: the message says which
            print(f"edgelearn: error: {exc}", file=sys.stderr)
            return 1
        raise


if __name__ == "__main__":
    sys.exit(main())
