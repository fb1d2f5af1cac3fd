"""``edgelearn finetune`` and ``edgelearn export``: the command-line face of ``edgelearn.finetune`` and
``edgelearn.onnx`` (registered by ``edgelearn.cli.build_parser``)."""

from __future__ import annotations

import argparse
import json
import os
from typing import Any, Optional, Sequence, Tuple


def _floats(text: str) -> Tuple[float, ...]:
    try:
        return tuple(float(v) for v in text.split(","))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from exc


def _shape(text: str) -> Tuple[int, ...]:
    try:
        shape = tuple(int(v) for v in text.replace("x", ",").split(","))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected sizes such as 3,224,224, got {text!r}") from exc
    if len(shape) not in (1, 2, 3, 4) or min(shape) < 1:
        raise argparse.ArgumentTypeError(f"expected (N,)C,H,W or N,features of positive sizes, got {text!r}")
    return shape


def _model_image_shape(model: Any, meta_shape: Optional[Sequence[int]]) -> Tuple[Optional[int], Optional[Tuple[int, int]]]:
    """(channels, (H, W)) the model expects, as far as it says: an imported graph's declared input, a checkpoint's
    recorded image shape, else the first convolution's input channels and no size."""
    from . import nn

    shape = getattr(model, "input_shape", None)
    if shape and len(shape) == 4 and all(s is not None for s in shape[1:]):
        return int(shape[1]), (int(shape[2]), int(shape[3]))
    if meta_shape and len(meta_shape) == 3:
        return int(meta_shape[0]), (int(meta_shape[1]), int(meta_shape[2]))
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            return int(m.in_channels), None
    return None, None


def _cmd_finetune(args: argparse.Namespace) -> int:
    import edgelearn
    from edgelearn import data as eldata
    from edgelearn import optim
    from edgelearn.finetune import describe_selection, load_pretrained, replace_head, select_trainable
    from edgelearn.octo import fp32
    from edgelearn.train import evaluate, fit

    if args.threads is not None:
        edgelearn.set_num_threads(args.threads)
    if args.resume and not args.checkpoint:
        raise ValueError("--resume needs --checkpoint PATH")
    edgelearn.manual_seed(args.seed)
    model, kind = load_pretrained(args.model, unfold_batchnorm=args.unfold_batchnorm)
    meta_shape = None
    if kind == "checkpoint":
        from edgelearn.checkpoint import read_checkpoint

        extra = (read_checkpoint(args.model)[1].get("extra") or {})
        config = extra.get("config") or {}
        meta_shape = config.get("image_shape") or (config.get("data") or {}).get("image_shape")
    channels, size = _model_image_shape(model, meta_shape)
    if args.channels is not None:
        channels = args.channels
    image_size: Any = args.image_size if args.image_size is not None else size
    mean, std = args.mean, args.std
    if args.normalize == "imagenet":
        mean, std = eldata.ImageFolder.IMAGENET_MEAN, eldata.ImageFolder.IMAGENET_STD
    splits = eldata.get_dataset(args.dataset, seed=args.seed, image_size=image_size, channels=channels or 3,
                                mean=mean, std=std, cache=args.cache, val_fraction=args.val_fraction) \
        if args.dataset.startswith("folder:") else eldata.get_dataset(args.dataset, seed=args.seed)
    train, test = splits.train, splits.test
    replace_head(model, train.num_classes)
    if args.precision == "int8":
        edgelearn.octo(model, edgelearn.OctoConfig(lac=not args.no_lac, seed=args.seed))
    else:
        fp32(model)
    params = select_trainable(model, args.train)
    if not params:
        raise ValueError(f"--train {args.train}: nothing to train")
    if args.optimizer == "sgd":
        opt = optim.SGD(params, lr=args.lr, momentum=0.9, weight_decay=args.weight_decay, nesterov=True)
    else:
        opt = optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay)
    scheduler = optim.CosineAnnealingLR(opt, T_max=args.epochs)
    settings = {k: v for k, v in vars(args).items() if k != "func"}
    settings["image_shape"] = list(train.image_shape)
    counts = describe_selection(model)
    if not args.json:
        print(f"fine-tuning {args.model} ({kind}, {args.precision}, --train {args.train}: "
              f"{counts['trainable_parameters']} of {counts['total_parameters']} parameters) on {args.dataset}: "
              f"{len(train)} train / {len(test)} val images {train.image_shape}, {train.num_classes} classes, "
              f"{args.epochs} epochs, batch {args.batch_size}")
    history = fit(model, opt, train, test, args.epochs, scheduler=scheduler, batch_size=args.batch_size,
                  seed=args.seed, checkpoint=args.checkpoint, resume=args.resume, log_csv=args.log_csv,
                  log_json=args.log_json, progress=not args.no_progress, verbose=not args.json, config=settings)
    result = evaluate(model, test)
    print(f"val accuracy: {100 * result['accuracy']:.2f}% ({result['n']} images, val loss {result['loss']:.4f})")
    if args.output:
        from edgelearn import onnx as elonnx

        elonnx.export(model, args.output, (1,) + tuple(train.image_shape))
        if not args.json:
            print(f"wrote {args.output}")
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
            "model_kind": kind,
            "train": args.train,
            "num_classes": train.num_classes,
            "image_shape": list(train.image_shape),
            "batch_size": args.batch_size,
            "seed": args.seed,
            "lac": args.precision == "int8" and not args.no_lac,
            "threads": edgelearn.get_num_threads(),
            "kernel": edgelearn.backend_info().get("kernel"),
            "peak_rss_mb": summary["peak_rss_mb"],
            "rss_before_first_step_mb": summary["rss_before_first_step_mb"],
            "train_peak_rss_mb": summary["train_peak_rss_mb"],
            "train_memory_mb": summary["train_memory_mb"],
            "resumed_from_epoch": summary["resumed_from_epoch"],
            "final_train_loss": history.records[-1]["train_loss"] if len(history) else None,
            "onnx": args.output,
            **counts,
        }))
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    import numpy as np

    from edgelearn import onnx as elonnx
    from edgelearn.checkpoint import load_model

    model, meta = load_model(args.checkpoint)
    shape = args.input_shape
    if shape is None:
        config = (meta.get("extra") or {}).get("config") or {}
        shape = config.get("image_shape") or (config.get("data") or {}).get("image_shape")
        declared = getattr(model, "input_shape", None)
        if shape is None and declared and all(s is not None for s in declared[1:]):
            shape = declared[1:]
    if shape is None:
        raise ValueError("--input-shape C,H,W is needed: the checkpoint does not record its image shape")
    shape = tuple(shape)
    if len(shape) in (1, 3):
        shape = (1,) + shape
    proto = elonnx.export(model, args.output, shape)
    report = {"onnx": args.output, "input_shape": list(shape), "nodes": len(proto.graph.node),
              "operators": sorted({n.op_type for n in proto.graph.node}), "bytes": os.path.getsize(args.output)}
    if args.check:
        import onnxruntime as ort

        x = np.random.default_rng(0).standard_normal((4,) + shape[1:]).astype(np.float32)
        sess = ort.InferenceSession(args.output, providers=["CPUExecutionProvider"])
        got = sess.run(None, {sess.get_inputs()[0].name: x})[0]
        ref = elonnx.fp32_outputs(model, x)
        report["relative_l2_vs_edgelearn"] = float(np.linalg.norm(got - ref) / max(np.linalg.norm(ref), 1e-30))
    if args.json:
        print(json.dumps(report))
    else:
        print(f"wrote {args.output}: {report['nodes']} nodes ({', '.join(report['operators'])}), input "
              f"{report['input_shape']} (batch dimension free), {report['bytes']} bytes")
        if "relative_l2_vs_edgelearn" in report:
            print(f"ONNX Runtime vs edgelearn (FP32 master weights): relative L2 {report['relative_l2_vs_edgelearn']:.2e}")
    return 0


def add_parsers(sub: Any, positive_int: Any) -> None:
    p = sub.add_parser(
        "finetune",
        help="fine-tune a pretrained model (.onnx, checkpoint or zoo name) on your own images (INT8 by default)",
        description="Load a pretrained model, replace its classifier head for the dataset's classes, train the "
                    "chosen part of it (INT8 Octo by default) and report validation accuracy; optionally write "
                    "the result as ONNX.",
    )
    p.add_argument("model", help="an .onnx file, an edgelearn checkpoint (.safetensors) or a zoo model name")
    p.add_argument("--dataset", required=True,
                   help="folder:PATH (one folder per class, or train/ and val/ subfolders) or any dataset "
                        "'edgelearn train' reads")
    p.add_argument("--train", default="all", metavar="{head,last:K,bn+head,all}",
                   help="what trains: the new head only; the head and the last K conv/linear layers (with their "
                        "BatchNorm); the head, BatchNorm and biases; or everything (default)")
    p.add_argument("--precision", choices=("int8", "fp32"), default="int8")
    p.add_argument("--epochs", type=positive_int, default=5)
    p.add_argument("--batch-size", type=positive_int, default=32)
    p.add_argument("--lr", type=float, default=0.01, help="learning rate (default 0.01)")
    p.add_argument("--optimizer", choices=("sgd", "adamw"), default="sgd")
    p.add_argument("--weight-decay", type=float, default=5e-4)
    p.add_argument("--seed", type=int, default=0, help="seeds the split, the new head, the data order and rounding")
    p.add_argument("--threads", type=positive_int, default=None)
    p.add_argument("--image-size", type=int, default=None,
                   help="side of the images fed to the model (default: the model's declared input, else the "
                        "first image's size)")
    p.add_argument("--channels", type=int, choices=(1, 3), default=None,
                   help="1 (grayscale) or 3 (RGB); default: what the model's first convolution takes")
    p.add_argument("--normalize", choices=("none", "imagenet"), default="none",
                   help="imagenet: torchvision's mean/std (for torchvision-trained models); none: pixels in [0, 1]")
    p.add_argument("--mean", type=_floats, default=0.0, help="per-channel mean, e.g. 0.5,0.5,0.5")
    p.add_argument("--std", type=_floats, default=1.0, help="per-channel std")
    p.add_argument("--val-fraction", type=float, default=0.2,
                   help="validation share of a folder without train/ and val/ subfolders (stratified, seeded)")
    p.add_argument("--cache", action="store_true", help="keep decoded images in memory as uint8")
    p.add_argument("--unfold-batchnorm", action="store_true",
                   help="ONNX models: put a BatchNorm2d after every convolution the exporter folded it into")
    p.add_argument("--no-lac", action="store_true", help="INT8 without loss-aware compensation")
    p.add_argument("--checkpoint", metavar="PATH", help="save a checkpoint after every epoch (atomic)")
    p.add_argument("--resume", action="store_true", help="continue exactly from --checkpoint if it exists")
    p.add_argument("--output", "-o", metavar="MODEL.onnx", help="write the fine-tuned model as ONNX")
    p.add_argument("--log-csv", metavar="PATH")
    p.add_argument("--log-json", metavar="PATH")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--json", action="store_true",
                   help="end with one JSON line (as 'train': test_accuracy, train_memory_mb, ...; plus train, "
                        "trainable_parameters, num_classes, onnx)")
    p.set_defaults(func=_cmd_finetune)

    e = sub.add_parser("export", help="write a checkpoint's model as an ONNX file (FP32, for ONNX Runtime)",
                       description="Write the model a checkpoint holds as an FP32 ONNX graph (INT8-trained models "
                                   "export their master weights, LAC folded into the bias).")
    e.add_argument("checkpoint", help="an edgelearn checkpoint (.safetensors)")
    e.add_argument("output", help="the .onnx file to write")
    e.add_argument("--input-shape", type=_shape, default=None,
                   help="C,H,W of one image (default: the image shape the checkpoint records)")
    e.add_argument("--check", action="store_true",
                   help="run the written file in ONNX Runtime and print its relative L2 difference to edgelearn")
    e.add_argument("--json", action="store_true", help="print one JSON object")
    e.set_defaults(func=_cmd_export)
