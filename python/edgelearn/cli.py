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

#: ``edgelearn.models.MODEL_NAMES``, written out so building the parser imports nothing heavy (a test checks).
TRAIN_MODELS = ("mlp", "cnn", "resnet20", "resnet18", "mobilenet_v2")

DESCRIPTION = """\
On-device training for small ARM boards and any CPU: INT8 training (Octo), SGQ-compressed split learning and
PASS patch-skip video inference. Start with `edgelearn train` (an INT8 CNN on scikit-learn's digits, compared
with the same run in FP32), then `edgelearn COMMAND --help`."""


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


def _clip_arg(text: str):
    """An argparse type: a range clip for SGQ (``none``, ``sigma``, ``sigma:Z``, ``minmax``, ``minmax:KAPPA``)."""
    from edgelearn import sgq

    try:
        return sgq.parse_clip(text)
    except (TypeError, ValueError) as exc:
        raise argparse.ArgumentTypeError(f"{exc} (expected none, sigma[:Z] or minmax[:KAPPA])") from None


_clip_arg.__name__ = "clip"
_positive_int = _number(int, 1)
_nonnegative_int = _number(int, 0)
_port = _number(int, 0, 65535)
_positive_float = _number(float, 0, lo_open=True)
_nonneg_float = _number(float, 0)
_nonneg_int = _nonnegative_int


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


def _collab_model_arg(text: str) -> str:
    from edgelearn.collab.split import is_model_spec
    from edgelearn.models import MODEL_NAMES

    if not is_model_spec(text):
        raise argparse.ArgumentTypeError(f"expected one of {', '.join(MODEL_NAMES)} or onnx:PATH, got {text!r}")
    return text


def _split_arg(text: str):
    from edgelearn.collab.split import split_spec

    try:
        value = split_spec(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    if isinstance(value, int) and value < 1:
        raise argparse.ArgumentTypeError(f"expected a layer index >= 1 or a module name, got {text}")
    return value




PRC_DEFAULT = "minmax"


def plural(n: int, word: str, words: str = "") -> str:
    """``1 epoch``, ``3 epochs`` (``words``: an irregular plural)."""
    return f"{n} {word if n == 1 else (words or word + 's')}"


def _train_once(args: argparse.Namespace, train, test, precision: str, verbose: bool, quiet: bool = False):
    """One training run of ``args`` in ``precision``: ``(model, history, test result)``. ``quiet``: the comparison
    run (no checkpoint, logs or plot; a progress bar on a terminal only)."""
    from edgelearn import data as eldata
    from edgelearn import optim, run
    from edgelearn.train import evaluate, fit

    augment = None
    if args.augment != "none":
        transforms = [eldata.RandomCrop(args.crop_padding)]
        if args.augment == "crop-flip":
            transforms.append(eldata.RandomHorizontalFlip())
        augment = eldata.Compose(transforms)
    settings = {k: v for k, v in vars(args).items() if k != "func"}
    settings["precision"] = precision
    settings["data"] = run.data_info(train)
    split_config = _split_checkpoint_config(args.checkpoint) if args.resume and not quiet else None
    if split_config is not None:
        # a whole model trained split (`collab join --save-full`): its own architecture and precisions
        from edgelearn.collab.split import model_from_split_config
        from edgelearn.nn import manual_seed

        manual_seed(args.seed)
        model = model_from_split_config(split_config, train.image_shape, train.num_classes)
        args.model, args.precision = split_config["model"], split_config["precision"]
    else:
        model = run.build(settings, train.image_shape, train.num_classes)
    params = list(model.parameters())
    if args.optimizer == "sgd":
        opt = optim.SGD(params, lr=args.lr, momentum=0.9, weight_decay=args.weight_decay, nesterov=True)
    else:
        opt = optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay)
    scheduler = optim.CosineAnnealingLR(opt, T_max=args.epochs)
    history = fit(
        model, opt, train, test, args.epochs,
        scheduler=scheduler, batch_size=args.batch_size, seed=args.seed, augment=augment,
        checkpoint=None if quiet else args.checkpoint, resume=not quiet and args.resume,
        log_csv=None if quiet else args.log_csv, log_json=None if quiet else args.log_json,
        plot=None if quiet else args.plot, progress=not args.no_progress, verbose=verbose,
        config=settings, val_name="test",
    )
    return model, history, evaluate(model, test)


def _subset(train, n: int):
    from edgelearn.data import ArrayDataset

    n = min(len(train), n)
    return ArrayDataset(train.images[:n], train.labels[:n], train.name, train.classes)


def _one_epoch(args: argparse.Namespace, train, precision: str, batch_size: int):
    from edgelearn import optim, run
    from edgelearn.train import fit

    model = run.build({**vars(args), "precision": precision}, train.image_shape, train.num_classes)
    return fit(model, optim.SGD(model.parameters(), lr=0.0), train, None, 1, batch_size=batch_size,
               seed=args.seed, progress=False, verbose=False, bn_recalibration_batches=0)


def _warm_up(args: argparse.Namespace, train, precisions) -> None:
    """Two untimed steps in each precision before a comparison, so that neither measured run pays the process's
    one-time costs (lazy imports, the thread pool, the allocator's first growth) in its speed or memory."""
    for precision in precisions:
        _one_epoch(args, _subset(train, 2 * args.batch_size), precision, args.batch_size)


#: The comparison measures training memory on one step of a batch this large (in input bytes, up to the whole
#: training set): a small batch of small images needs less memory than the resident-set size resolves.
CALIBRATION_INPUT_BYTES = 1 << 23


def _step_memory(args: argparse.Namespace, train, precisions):
    """``(batch, {precision: MB})``: the memory one training step at a large batch adds, per precision."""
    c, h, w = train.image_shape
    batch = max(args.batch_size, min(len(train), CALIBRATION_INPUT_BYTES // (4 * c * h * w)))
    data = _subset(train, batch)
    return batch, {p: _one_epoch(args, data, p, batch).train_memory_mb for p in precisions}


def _compare_line(main: dict, other: dict, precision: str, other_precision: str) -> str:
    def ratio(a, b):
        return f"{a / b:.2f}x" if a and b else "n/a"

    mem = main["step_memory_mb"]
    return (f"{precision.upper()} vs {other_precision.upper()}, same run: test accuracy "
            f"{100 * main['test_accuracy']:.2f}% vs {100 * other['test_accuracy']:.2f}%, "
            f"{main['train_images_per_s']:.0f} vs {other['train_images_per_s']:.0f} images/s "
            f"({ratio(main['train_images_per_s'], other['train_images_per_s'])}); memory to train one batch of "
            f"{mem['batch']}: {mem[precision]:.1f} vs {mem[other_precision]:.1f} MB "
            f"({ratio(mem[precision], mem[other_precision])})")


def _check_checkpoint_flags(args: argparse.Namespace, explicit: set) -> None:
    """Resume rules: an existing checkpoint is continued (--resume) with its saved settings, or replaced
    (--overwrite); never silently overwritten, never resumed with settings that make it another run."""
    from edgelearn import run

    if args.resume and args.overwrite:
        raise ValueError("--resume continues the checkpoint and --overwrite replaces it: give one of them")
    if not args.checkpoint:
        if args.resume or args.overwrite:
            raise ValueError(f"{'--resume' if args.resume else '--overwrite'} needs --checkpoint PATH")
        return
    exists = os.path.exists(args.checkpoint)
    if exists and not args.resume and not args.overwrite:
        raise ValueError(f"{args.checkpoint} already exists: add --resume to continue that run, or --overwrite "
                              "to start a new one over it")
    if args.resume and exists:
        saved, _ = run.read_settings(args.checkpoint)
        merged = run.resume_settings(saved, vars(args), explicit, args.checkpoint)
        for key, value in merged.items():
            setattr(args, key, value)


def _cmd_train(args: argparse.Namespace) -> int:
    import edgelearn
    from edgelearn import data as eldata

    if args.threads is not None:
        edgelearn.set_num_threads(args.threads)
    for flag in ("checkpoint", "log_csv", "log_json", "plot"):
        if getattr(args, flag, None):
            _writable(getattr(args, flag), "--" + flag.replace("_", "-"))
    _check_checkpoint_flags(args, getattr(args, "explicit", set()))
    args.__dict__.pop("explicit", None)
    if args.width_mult != 1.0 and args.model != "mobilenet_v2" and not args.resume:
        raise ValueError(f"--width-mult applies only to --model mobilenet_v2, not to {args.model!r} "
                         f"(got {args.width_mult})")
    if args.lr is None:
        args.lr = 0.02 if args.optimizer == "sgd" else 0.002
    compare = args.compare
    if compare == "auto":
        compare = "fp32" if args.dataset == "digits" and args.precision == "int8" and not args.resume else "none"
    args.compare = compare
    splits = eldata.get_dataset(args.dataset, seed=args.seed)
    train, test = splits.train, splits.test
    if getattr(args, "train_subset", None):
        train = eldata.stratified_subset(train, args.train_subset, seed=args.seed)
    if getattr(args, "test_subset", None):
        test = eldata.stratified_subset(test, args.test_subset, seed=args.seed)
    if getattr(args, "image_size", None):
        train, test = eldata.fit_images(train, args.image_size), eldata.fit_images(test, args.image_size)

    if not args.json:
        octo = ""
        if args.precision == "int8":
            prc = "off" if args.no_prc or args.prc == "none" else args.prc
            octo = f": Octo, LAC {'off' if args.no_lac else 'on'}, PRC {prc}"
        print(f"training {args.model} ({args.precision}{octo}) on {args.dataset}: {len(train)} train / "
              f"{len(test)} test images {train.image_shape}, {plural(args.epochs, 'epoch')}, batch {args.batch_size}, "
              f"{plural(edgelearn.get_num_threads(), 'thread')}, kernel {edgelearn.backend_info().get('kernel')}")
    if compare not in ("none", args.precision):
        _warm_up(args, train, (args.precision, compare))
    model, history, result = _train_once(args, train, test, args.precision, verbose=True)
    print(f"test accuracy: {100 * result['accuracy']:.2f}% ({result['n']} images, test loss {result['loss']:.4f})")
    summary = history.summary()
    out = {
        "test_accuracy": result["accuracy"],
        "test_loss": result["loss"],
        "test_images": result["n"],
        "train_images": len(train),
        "train_images_per_s": summary["train_images_per_s"],
        "train_step_images_per_s": summary["train_step_images_per_s"],
        "bn_recalibration_s": summary["bn_recalibration_s"],
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
        "train_memory_warm_mb": summary["train_memory_warm_mb"],
        "resumed_from_epoch": summary["resumed_from_epoch"],
        "final_train_loss": history.records[-1]["train_loss"] if len(history) else None,
        "checkpoint": args.checkpoint,
    }
    if compare != "none" and compare != args.precision:
        if not args.json:
            print(f"the same run in {compare.upper()} for comparison (--compare none skips it) ...", flush=True)
        _, other_history, other_result = _train_once(args, train, test, compare, verbose=False, quiet=True)
        other_summary = other_history.summary()
        other = {"precision": compare, "test_accuracy": other_result["accuracy"],
                 "train_images_per_s": other_summary["train_images_per_s"],
                 "train_memory_mb": other_summary["train_memory_mb"]}
        batch, memory = _step_memory(args, train, (args.precision, compare))
        out["compare"] = other
        out["step_memory_mb"] = {"batch": batch, **memory}
        print(_compare_line(out, other, args.precision, compare))
    if args.json:
        print(json.dumps(out))
    return 0


def _split_checkpoint_config(path):
    """The ``extra.config`` of checkpoint ``path`` when it holds a model trained split (``collab join
    --save-full``), else None (no file, or an ordinary ``edgelearn train`` checkpoint)."""
    if not path or not os.path.exists(path):
        return None
    from edgelearn import checkpoint as ckpt
    from edgelearn.collab.split import is_split_config

    _, meta = ckpt.read_checkpoint(path)
    config = (meta.get("extra") or {}).get("config")
    return config if is_split_config(config) else None


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
    if args.resume and not args.checkpoint:
        raise ValueError("--resume needs --checkpoint DIR")
    if args.port_file:
        _writable(args.port_file, "--port-file")
    cloud = Cloud(args.model, args.split, seed=args.seed, lr=args.lr, momentum=args.momentum,
                  weight_decay=args.weight_decay, input_shape=input_shape, classes=classes, log=_say_flush,
                  checkpoint=args.checkpoint, checkpoint_every=args.checkpoint_every if args.checkpoint else 0,
                  resume=args.resume, max_input_elements=args.max_input_elements)
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
               + (f"; exits after {plural(args.edges, 'edge session')}" if args.edges else ""))
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
        saved = cloud.save_checkpoint()
        if saved:
            _say_flush(f"checkpoint written: {saved} ({cloud.steps} steps)")
    ended = list(cloud.ended)
    counts = {s: sum(e["status"] == s for e in ended) for s in ("completed", "dropped", "rejected")}
    _say_flush(f"cloud stopped: {plural(cloud.steps, 'step')} applied; {plural(counts['completed'], 'edge')} "
               f"completed, {counts['dropped']} dropped, {counts['rejected']} rejected")
    if args.json:
        print(json.dumps({"port": server.port, "steps": cloud.steps, **counts, "sessions": ended,
                          "timed_out": timed_out}, default=str))
    if timed_out:
        print(f"edgelearn: error: --timeout {args.timeout:g} s reached with {len(ended)} of {plural(args.edges, 'edge session')} "
              "ended", file=sys.stderr)
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
    def connect(timeout=args.connect_timeout):
        return GrpcTransport(args.server, token=_token(args), root_cert=args.tls_root_cert,
                             server_name=args.tls_server_name, connect_timeout=timeout,
                             max_message_bytes=int(args.max_message_mb * 2**20))

    from edgelearn.collab import RetryPolicy

    retry = RetryPolicy(attempts=args.retries, initial=args.retry_initial, maximum=args.retry_max)
    transport = connect()
    try:
        octo_config = None
        if args.precision == "int8":
            octo_config = edgelearn.OctoConfig(seed=args.seed)
        edge = Edge(transport, train.image_shape, train.num_classes, mode=args.mode, bits=args.bits,
                    group=args.group, stripe_rows=args.stripe_rows, precision=args.precision,
                    octo_config=octo_config, lr=args.lr, name=args.name, model=args.model, split=args.split,
                    feature_group=args.feature_group, feature_stripe_rows=args.feature_stripe_rows or None,
                    feature_ranges=args.feature_ranges, constant_blocks=not args.no_constant_blocks,
                    edge_key=args.edge_key, feature_clip=args.feature_clip, grad_clip=args.grad_clip)
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
                            progress=not args.no_progress, log_every=args.log_every, log=_say_flush,
                            reconnect=lambda: connect(max(args.retry_max, 1.0)), retry=retry, save=args.save,
                            save_full=args.save_full, config={"dataset": args.dataset, "seed": args.seed})
    except BaseException:
        transport.close()
        raise
    result.update(dataset=args.dataset, server=args.server, seconds=time.perf_counter() - t0)
    up, down = result["bytes_up_per_sample"], result["bytes_down_per_sample"]
    _say_flush(f"trained {plural(result['steps'], 'step')} ({plural(result['train_samples'], 'sample')}): train loss "
               f"{result['train_loss']:.4f}, feature rel. L2 error {result['feature_rel_l2'] or 0:.4f}, "
               f"gradient {result['grad_rel_l2'] or 0:.4f}")
    if up is not None:
        _say_flush(f"wire: {up:.1f} B/sample up, {down:.1f} B/sample down ({result['bytes_up']} B up, "
                   f"{result['bytes_down']} B down in all); {result['compression_vs_fp32']:.2f}x less than fp32 "
                   f"features + gradients ({2 * result['fp32_feature_bytes_per_sample']} B/sample)")
    if "test_accuracy" in result:
        _say_flush(f"test accuracy: {100 * result['test_accuracy']:.2f}% ({result['test_samples']} images, "
                   f"through the split)")
    if args.save:
        _say_flush(f"edge part saved to {args.save}")
    if args.save_full:
        text = f"whole model saved to {args.save_full}"
        if "full_model_test_accuracy" in result:
            text += f" (test accuracy {100 * result['full_model_test_accuracy']:.2f}% evaluated from it, no codec)"
        _say_flush(text)
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
    from edgelearn.collab.protocol import IDLE_TIMEOUT, MAX_INPUT_ELEMENTS

    max_mb = MAX_MESSAGE_BYTES / 2**20
    message_mb = _number(float, 0, 2047, lo_open=True)  # gRPC lengths are int32

    p_serve = csub.add_parser("serve", help="run the cloud", description="Run the cloud part of split learning.")
    p_serve.add_argument("--model", type=_collab_model_arg, default="cnn",
                         help="a built-in or zoo architecture (edgelearn.models.MODEL_NAMES), or onnx:PATH (an "
                              "ONNX model, split at a node name; edges need their own copy) (default cnn)")
    p_serve.add_argument("--split", type=_split_arg, default=4,
                         help="where the cloud part starts: a layer index (edge = layers [0, split)) or a module "
                              "name such as features.7 (default 4)")
    p_serve.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0 for other machines)")
    p_serve.add_argument("--port", type=_port, default=50051, help="TCP port; 0 picks a free one (see --port-file)")
    p_serve.add_argument("--port-file", metavar="PATH", help="write the port listened on to PATH")
    p_serve.add_argument("--dataset", default=None,
                         help="fix the model's input shape and classes from this dataset now (default: from the "
                              "first edge's HELLO)")
    p_serve.add_argument("--seed", type=int, default=0, help="initialisation of the model (edges use it too)")
    p_serve.add_argument("--lr", type=_nonneg_float, default=0.02)
    p_serve.add_argument("--momentum", type=_nonneg_float, default=0.9)
    p_serve.add_argument("--weight-decay", type=_nonneg_float, default=5e-4)
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
    p_serve.add_argument("--timeout", type=_nonneg_float, default=0, help="give up after this many seconds (0 = never)")
    p_serve.add_argument("--threads", type=_positive_int, default=None, help="engine threads")
    p_serve.add_argument("--checkpoint", metavar="DIR",
                         help="write the cloud part (model, optimizer, step, per-edge step counts) to "
                              "DIR/cloud.safetensors atomically every --checkpoint-every steps and at exit")
    p_serve.add_argument("--checkpoint-every", type=_positive_int, default=50, metavar="N",
                         help="steps (of all edges) between checkpoints (default 50)")
    p_serve.add_argument("--resume", action="store_true",
                         help="start from DIR/cloud.safetensors if it exists (edges reconnect and go on from it)")
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
    p_join.add_argument("--feature-clip", type=_clip_arg, default=None, metavar="SPEC",
                        help="SGQ range clipping of the features per block: none (default), sigma[:Z] (mean ± Z·σ "
                             "within [min, max]) or minmax[:KAPPA]; at 2 bits sigma:2.5 kept accuracy")
    p_join.add_argument("--grad-clip", type=_clip_arg, default=None, metavar="SPEC",
                        help="SGQ range clipping of the gradients the cloud sends, as --feature-clip (sigma:1.5 "
                             "at 2 bits)")
    p_join.add_argument("--precision", choices=("int8", "fp32"), default="int8",
                        help="training precision of the edge part (default int8, Octo)")
    p_join.add_argument("--epochs", type=_positive_int, default=1)
    p_join.add_argument("--steps", "--max-steps", dest="steps", type=_positive_int, default=None,
                        help="stop after this many steps in all")
    p_join.add_argument("--batch-size", type=_positive_int, default=64)
    p_join.add_argument("--lr", type=_nonneg_float, default=0.02)
    p_join.add_argument("--seed", type=int, default=0, help="data split and order, stochastic rounding")
    p_join.add_argument("--model", type=_collab_model_arg, default=None,
                        help="fail unless the cloud serves this; onnx:PATH: this edge's copy of the cloud's ONNX model")
    p_join.add_argument("--split", type=_split_arg, default=None, help="fail unless the cloud splits here")
    p_join.add_argument("--name", default="", help="name shown in the cloud's log")
    p_join.add_argument("--edge-key", default=None,
                        help="identity of this edge's training run at the cloud (default: random per run)")
    p_join.add_argument("--save", metavar="PATH", help="write the edge part (model, optimizer, step) at the end")
    p_join.add_argument("--save-full", metavar="PATH",
                        help="at the end, ask the cloud for its part and write the whole model as one checkpoint "
                             "(for `edgelearn train --resume --checkpoint PATH`, `video --model`, `export`)")
    p_join.add_argument("--retries", type=_nonnegative_int, default=10,
                        help="reconnection attempts when the cloud goes away (0 = fail at once; default 10)")
    p_join.add_argument("--retry-initial", type=_nonneg_float, default=0.5, metavar="S",
                        help="seconds before the first reconnection attempt (doubling after each; default 0.5)")
    p_join.add_argument("--retry-max", type=_nonneg_float, default=10.0, metavar="S",
                        help="longest wait between reconnection attempts, seconds (default 10)")
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


def _cmd_predict(args: argparse.Namespace) -> int:
    import numpy as np

    from edgelearn import run
    from edgelearn.predict import predict, read_inputs

    trained = run.load_trained(args.checkpoint)
    inputs = read_inputs(args.input, trained.image_shape, labels=args.labels, classes=trained.classes,
                         invert=args.invert)
    probs = predict(trained.model, inputs.images)
    top = min(args.top, probs.shape[1])
    order = np.argsort(-probs, axis=1, kind="stable")[:, :top]
    rows = [{"input": name, "class": trained.classes[int(o[0])], "index": int(o[0]),
             "probability": float(p[o[0]]),
             "top": [{"class": trained.classes[int(k)], "probability": float(p[k])} for k in o]}
            for name, p, o in zip(inputs.names, probs, order)]
    result = {"checkpoint": args.checkpoint, "input": args.input, "n": len(rows)}
    if inputs.labels is not None:
        for row, label in zip(rows, inputs.labels):
            row["label"] = label
        result["accuracy"] = sum(r["class"] == r["label"] for r in rows) / len(rows)
    if args.json:
        print(json.dumps({**result, "predictions": rows}))
        return 0
    shown = rows if args.show == 0 else rows[:args.show]
    width = max(len(r["input"]) for r in shown)
    for r in shown:
        guesses = ", ".join(f"{t['class']} {100 * t['probability']:.1f}%" for t in r["top"])
        label = f"   (label {r['label']})" if "label" in r else ""
        print(f"{r['input']:<{width}}  {guesses}{label}")
    if len(shown) < len(rows):
        print(f"... and {plural(len(rows) - len(shown), 'more image')} (--show 0 lists all, --json gives all)")
    if "accuracy" in result:
        print(f"accuracy: {100 * result['accuracy']:.2f}% ({plural(len(rows), 'image')})")
    return 0


def _cmd_demo_clip(args: argparse.Namespace) -> int:
    from edgelearn import video

    try:
        import av  # noqa: F401
    except ImportError as exc:
        raise ImportError('writing a clip needs PyAV: pip install "edgelearn[video]"') from exc
    video.write_clip(args.path, video.synthetic_clip(args.frames, args.height, args.width, seed=args.seed))
    print(f"wrote {args.path}: {plural(args.frames, 'frame')} of {args.width}x{args.height} (a static camera, "
          f"moving objects); try: edgelearn video {args.path} --compare-dense")
    return 0


def _cmd_video(args: argparse.Namespace) -> int:
    import edgelearn
    from edgelearn.video import PatchSkipRunner, frames
    from edgelearn.video.pipeline import load_video_model, run_video, save_plot, set_precision

    if args.threads is not None:
        edgelearn.set_num_threads(args.threads)
    if args.save_plot:
        _writable(args.save_plot, "--save-plot")
    model = load_video_model(args.model, seed=args.seed, width_mult=args.width_mult, pretrained=not args.random_init)
    precision = set_precision(model, args.precision)
    runner = PatchSkipRunner(model, patch=args.patch, threshold=args.threshold, refresh_every=args.refresh,
                             error_bound=args.error_bound, int8_scales=args.int8_scales)
    reader = frames(args.path, max_frames=args.max_frames)
    total = reader.frame_count if args.max_frames is None else min(args.max_frames, reader.frame_count or args.max_frames)
    stream = reader if args.downsample == 1 else (f[::args.downsample, ::args.downsample] for f in reader)
    run = run_video(stream, model, runner, compare_dense=args.compare_dense, progress=not args.no_progress and not args.json,
                    total=total)
    if run.frames == 0:
        raise ValueError(f"{args.path}: no frames decoded")
    summary = run.summary()
    summary.update(path=str(args.path), model=args.model, precision=precision,
                   int8_scales=args.int8_scales if precision == "int8" else None, patch=args.patch, threshold=args.threshold,
                   refresh=args.refresh, error_bound=args.error_bound, input_shape=list(runner.input_shape or ()))
    if args.save_plot:
        save_plot(run, args.save_plot, title=f"{os.path.basename(str(args.path))}: {args.model}, patch {args.patch}, "
                                             f"threshold {args.threshold}")
    if args.json:
        print(json.dumps(summary))
        return 0
    print(f"{run.frames} frames {tuple(runner.input_shape or ())} of {args.path}, model {args.model} ({precision}), "
          f"patch {args.patch}, threshold {args.threshold}, "
          + (f"dense refresh every {plural(args.refresh, 'frame')}" if args.refresh else "no periodic dense refresh"))
    print(f"patch-skip: {summary['patchskip_fps']:.1f} frames/s, work recomputed {100 * summary['mean_compute_fraction']:.1f}% "
          f"(skipped {100 * summary['skip_fraction']:.1f}%), input patches flagged {100 * summary['mean_patch_fraction']:.1f}%, "
          f"gate {summary['mean_gate_ms']:.3f} ms/frame, {plural(summary['dense_frames'], 'dense frame')}")
    split = summary["time_split_ms"]
    print(f"time per frame {summary['mean_frame_ms']:.2f} ms: gate {split['gate']:.2f}, bookkeeping {split['bookkeeping']:.2f}, "
          f"recompute {split['recompute']:.2f}, tail {split['tail']:.2f}, other {split['other']:.2f} ms")
    if args.compare_dense:
        print(f"dense:      {summary['dense_fps']:.1f} frames/s -> speedup {summary['speedup']:.2f}x "
              f"(ideal 1/work {summary['ideal_speedup']:.2f}x: {100 * summary['realised_fraction']:.0f}% realised)")
        print(f"error vs dense (relative L2): mean {summary['mean_rel_l2_error']:.2e}, max {summary['max_rel_l2_error']:.2e}; "
              f"prediction agreement (argmax) mean {100 * summary['mean_agreement']:.2f}%, min {100 * summary['min_agreement']:.2f}%")
    if args.save_plot:
        print(f"plot written to {args.save_plot}")
    return 0


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Shows each option's default, unless its help text already says it (or there is none worth showing)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if (not action.option_strings or default in (None, False, argparse.SUPPRESS) or "default" in text
                or "%(default)" in text):
            return text
        return f"{text} (default: %(default)s)" if text else "default: %(default)s"


class _Parser(argparse.ArgumentParser):
    """Every command's parser: option defaults in --help (also for options declared without a help text), and a
    usage error as one ``edgelearn: error: ...`` line (the usage is one ``--help`` away)."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", _HelpFormatter)
        super().__init__(*args, **kwargs)

    def add_argument(self, *args, **kwargs):
        if (kwargs.get("help") is None and args and str(args[0]).startswith("-")
                and kwargs.get("default") not in (None, False, argparse.SUPPRESS)):
            kwargs["help"] = "default: %(default)s"
        return super().add_argument(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"edgelearn: error: {message} (see '{self.prog} --help')\n")


def _version() -> str:
    import platform

    from edgelearn import __version__, backend_info

    return f"edgelearn {__version__} (Python {platform.python_version()}, {platform.machine()}, INT8 kernel " \
           f"{backend_info().get('kernel')})"


class _VersionAction(argparse.Action):
    def __init__(self, option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS, help=None):
        super().__init__(option_strings, dest=dest, default=default, nargs=0, help=help)

    def __call__(self, parser, namespace, values, option_string=None):
        print(_version())
        parser.exit()


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="edgelearn", description=DESCRIPTION)
    parser.add_argument("--version", action=_VersionAction, help="print the version (and the INT8 kernel) and exit")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    parser.commands = sub.choices  # type: ignore[attr-defined]

    p_info = sub.add_parser("info", help="CPU features seen, INT8 kernel chosen, thread count, version")
    p_info.add_argument("--json", action="store_true", help="print one JSON object")
    p_info.set_defaults(func=_cmd_info)

    p_train = sub.add_parser(
        "train",
        help="train a model on a real dataset and print test accuracy (default: INT8 CNN on scikit-learn digits)",
        description="Train a model on a real dataset (FP32 or Octo INT8) and print its test accuracy.",
    )
    p_train.add_argument("--dataset", default="digits",
                         help="digits (default: scikit-learn's 1,797 8x8 digits, seconds), mnist5k, fashion-mnist, "
                              "idx:PATH (directory or DIR/PREFIX of the four IDX files) or cifar10:PATH")
    p_train.add_argument("--model", choices=TRAIN_MODELS, default="cnn",
                         help="architecture: mlp, cnn, resnet20 (CIFAR ResNet-20), resnet18, mobilenet_v2 "
                              "(torchvision layouts; ImageNet stems adapt to images below 64 pixels)")
    p_train.add_argument("--width-mult", type=float, default=1.0,
                         help="mobilenet_v2: width multiplier (default 1.0; 0.5 and 0.35 are the edge sizes)")
    p_train.add_argument("--image-size", type=_positive_int, default=None, metavar="S",
                         help="pad (centred, zeros) or resize (bilinear) every image to SxS, e.g. 32 for "
                              "Fashion-MNIST on resnet20/mobilenet_v2")
    p_train.add_argument("--train-subset", type=_positive_int, default=None, metavar="N",
                         help="train on a stratified subset of N training images (same share of every class, "
                              "drawn with --seed); the test set stays whole")
    p_train.add_argument("--test-subset", type=_positive_int, default=None, metavar="N",
                         help="evaluate on a stratified subset of N test images (drawn with --seed), e.g. to time "
                              "a large model without scoring the whole test set after every epoch")
    p_train.add_argument("--precision", choices=("int8", "fp32"), default="int8",
                         help="int8: Octo INT8 training (LAC + PRC); fp32: the baseline")
    p_train.add_argument("--compare", choices=("auto", "fp32", "int8", "none"), default="auto",
                         help="then train the same run in this precision and print one line comparing accuracy, "
                              "images/s and training memory (default auto: fp32 for an int8 run on digits, where "
                              "it takes seconds; none otherwise)")
    p_train.add_argument("--epochs", type=_positive_int, default=10, help="epochs (cosine learning-rate schedule)")
    p_train.add_argument("--batch-size", type=_positive_int, default=32, help="images per step")
    p_train.add_argument("--seed", type=int, default=0, help="seeds the split, the initialisation, the data order "
                                                             "and stochastic rounding (default 0)")
    p_train.add_argument("--threads", type=_positive_int, default=None, help="engine threads (default: all cores)")
    p_train.add_argument("--optimizer", choices=("sgd", "adamw"), default="sgd",
                         help="SGD with Nesterov momentum 0.9 (default) or AdamW; cosine learning-rate schedule")
    p_train.add_argument("--lr", type=_positive_float, default=None,
                         help="learning rate (default 0.02 for SGD, 0.002 for AdamW)")
    p_train.add_argument("--weight-decay", type=_nonneg_float, default=5e-4, help="L2 weight decay")
    p_train.add_argument("--augment", choices=("none", "crop", "crop-flip"), default="none",
                         help="random crop with padding (and horizontal flip)")
    p_train.add_argument("--crop-padding", type=_nonnegative_int, default=2, help="padding of --augment crop")
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
    p_train.add_argument("--checkpoint", metavar="PATH",
                         help="save the run (.safetensors: weights, optimizer, settings) after every epoch; "
                              "refuses an existing file unless --resume or --overwrite")
    p_train.add_argument("--resume", action="store_true",
                         help="continue the run saved in --checkpoint with its saved settings (epochs, schedule, "
                              "batch size, seed, precision, model, ...); a flag that contradicts them is refused")
    p_train.add_argument("--overwrite", action="store_true", help="start a new run over an existing --checkpoint")
    p_train.add_argument("--log-csv", metavar="PATH", help="per-epoch metrics as CSV")
    p_train.add_argument("--log-json", metavar="PATH", help="per-epoch metrics as JSON")
    p_train.add_argument("--plot", metavar="PATH", help='loss/accuracy curves as an image (needs "edgelearn[plot]")')
    p_train.add_argument("--no-progress", action="store_true", help="no progress bar")
    p_train.add_argument("--json", action="store_true",
                         help="end with one JSON line: test_accuracy, train_images_per_s (epochs with "
                              "their BatchNorm re-estimation), train_step_images_per_s (the training steps "
                              "alone), bn_recalibration_s, epochs, precision, dataset, peak_rss_mb, train_memory_mb, compare, ...")
    p_train.set_defaults(func=_cmd_train)
    _add_collab_parser(sub)
    from .cli_finetune import add_parsers as _add_finetune_parsers

    _add_finetune_parsers(sub, _positive_int)

    p_predict = sub.add_parser(
        "predict", help="classify images with a trained checkpoint: classes with probabilities",
        description="Rebuild the model a 'edgelearn train --checkpoint' run saved and classify INPUT: an image file "
                    "(PNG, JPEG, ...; resized to the training images' size, greyscale or RGB as the model takes), "
                    "an IDX image file (uint8 scaled to [0, 1] as in training) or a folder of images (one subfolder "
                    "per class gives labels and an accuracy).")
    p_predict.add_argument("checkpoint", metavar="CHECKPOINT", help="a .safetensors file from 'edgelearn train'")
    p_predict.add_argument("input", metavar="INPUT", help="image file, IDX image file or folder of images")
    p_predict.add_argument("--labels", metavar="IDX", help="IDX label file for IDX images: also print the accuracy")
    p_predict.add_argument("--top", type=_positive_int, default=3, help="classes shown per image")
    p_predict.add_argument("--show", type=_nonnegative_int, default=20, help="images listed (0 = all)")
    p_predict.add_argument("--invert", action="store_true",
                           help="use 1 - pixel (dark ink on light paper, for models trained on light-on-dark digits)")
    p_predict.add_argument("--json", action="store_true",
                           help="print one JSON object: n, accuracy (with labels), predictions (input, class, "
                                "probability, top)")
    p_predict.set_defaults(func=_cmd_predict)

    p_clip = sub.add_parser(
        "demo-clip", help="write a short synthetic video (static camera, moving objects) to try 'edgelearn video'",
        description="Write a short synthetic clip (a fixed textured background with coloured squares moving across "
                    "it, as a fixed camera sees) to PATH with PyAV, to try 'edgelearn video' without a video file.")
    p_clip.add_argument("path", metavar="PATH", help="output file, e.g. clip.mp4")
    p_clip.add_argument("--frames", type=_positive_int, default=60, help="number of frames")
    p_clip.add_argument("--height", type=_positive_int, default=96, help="frame height in pixels")
    p_clip.add_argument("--width", type=_positive_int, default=128, help="frame width in pixels")
    p_clip.add_argument("--seed", type=int, default=0, help="scene and motion")
    p_clip.set_defaults(func=_cmd_demo_clip)

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
                              "classifier; the zoo's resnet20, resnet18, mobilenet_v2 with their classifiers), "
                              "fcn with the trained weights shipped with the package, the others randomly initialised from --seed, "
                              "or a checkpoint from 'edgelearn train --checkpoint' "
                              "(any conv model; one-channel models see luma)")
    p_video.add_argument("--width-mult", type=_positive_float, default=1.0,
                         help="width multiplier of a built-in mobilenet_v2 (1.0)")
    p_video.add_argument("--precision", choices=("fp32", "int8"), default=None,
                         help="run the model in FP32 or in Octo INT8 (INT8 convolutions, per-tensor input scales "
                              "held between frames); default: the model's own (FP32 for a built-in, the precision "
                              "a checkpoint was trained in)")
    p_video.add_argument("--int8-scales", choices=("frozen", "dynamic"), default="frozen",
                         help="INT8 input scales: frozen (calibrated when a layer runs in full, held in between: "
                              "cached tiles stay valid, so even --threshold 0 differs from dense INT8 by that "
                              "rounding) or dynamic (recomputed every frame as dense INT8 does; a layer whose scale "
                              "moves is recomputed in full: equal to dense at --threshold 0, slower)")
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
    p_video.add_argument("--random-init", action="store_true",
                         help="fcn: random weights from --seed instead of the trained weights shipped with the package "
                              "(the other built-in models are always random)")
    p_video.add_argument("--threads", type=_positive_int, default=None, help="engine threads (default: all cores)")
    p_video.add_argument("--save-plot", metavar="FILE",
                         help='per-frame plot of skip fraction and error over time (needs "edgelearn[plot]")')
    p_video.add_argument("--no-progress", action="store_true", help="no progress bar")
    p_video.add_argument("--json", action="store_true", help="print one JSON object (no progress bar)")
    p_video.set_defaults(func=_cmd_video)
    return parser


def _resume_command(argv: "list[str]") -> str:
    """The command line that continues an interrupted ``train --checkpoint`` run."""
    args = [a for a in argv if a != "--overwrite"]
    if "--resume" not in args:
        args.append("--resume")
    return "edgelearn " + " ".join(shlex.quote(a) for a in args)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    if getattr(args, "command", None) == "train":  # the flags typed, which a resumed run must not contradict
        from edgelearn.run import explicit_dests

        args.explicit = explicit_dests(parser.commands["train"], argv[argv.index("train") + 1:])
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
