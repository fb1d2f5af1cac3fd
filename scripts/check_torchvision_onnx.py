#!/usr/bin/env python
"""Export torchvision models with both of PyTorch's ONNX exporters and import them with edgelearn.onnx.load.

Needs torch and torchvision (never dependencies of edgelearn), onnx and onnxruntime. For each model
(mobilenet_v2, resnet18, mobilenet_v3_small by default, random weights: nothing is downloaded) and each exporter
(TorchScript: ``dynamo=False``; dynamo: ``dynamo=True``, which writes weights to an external ``.onnx.data``
file beside the model), it prints the operators in the file, then compares edgelearn's eval-mode output with
ONNX Runtime's and with PyTorch's (relative L2), and checks one INT8 training step runs on the imported graph.
Exits 1 if any import fails or differs by more than --tol.

    python scripts/check_torchvision_onnx.py [--models mobilenet_v2,resnet18] [--size 224]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np


def rel_l2(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="mobilenet_v2,resnet18,mobilenet_v3_small")
    parser.add_argument("--exporters", default="torchscript,dynamo")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--tol", type=float, default=1e-4)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    try:
        import torch
        import torchvision
    except ImportError:
        print("torch and torchvision are not importable: nothing to check (they are not edgelearn dependencies)")
        return 0
    import onnx
    import onnxruntime as ort

    import edgelearn as el
    from edgelearn import onnx as elonnx

    torch.manual_seed(0)
    rows = []
    failed = False
    x = np.random.default_rng(0).standard_normal((2, 3, args.size, args.size)).astype(np.float32)
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            net = getattr(torchvision.models, name)(weights=None).eval()
            with torch.no_grad():
                ref = net(torch.from_numpy(x)).numpy()
            for exporter in args.exporters.split(","):
                path = os.path.join(tmp, f"{name}-{exporter}.onnx")
                row = {"model": name, "exporter": exporter}
                try:
                    t0 = time.perf_counter()
                    torch.onnx.export(net, (torch.from_numpy(x[:1]),), path, dynamo=exporter == "dynamo",
                                      input_names=["input"], output_names=["logits"],
                                      **({} if exporter == "dynamo" else {"opset_version": 17}))
                    row["export_s"] = round(time.perf_counter() - t0, 1)
                    proto = onnx.load(path, load_external_data=False)
                    row["opset"] = next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))
                    row["operators"] = sorted({n.op_type for n in proto.graph.node})
                    row["external_data"] = sorted(f for f in os.listdir(tmp) if f.startswith(f"{name}-{exporter}")
                                                  and f.endswith(".data"))
                    model = elonnx.load(path)
                    with el.no_grad():
                        model.eval()
                        ours = np.concatenate([model(el.tensor(x[i:i + 1])).numpy() for i in range(len(x))])
                    sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
                    theirs = np.concatenate([sess.run(None, {sess.get_inputs()[0].name: x[i:i + 1]})[0]
                                             for i in range(len(x))])
                    row["rel_l2_vs_onnxruntime"] = rel_l2(ours, theirs)
                    row["rel_l2_vs_torch"] = rel_l2(ours, ref)
                    el.octo(model)
                    model.train()
                    opt = el.optim.SGD([p for p in model.parameters()], lr=1e-3)
                    loss = el.functional.cross_entropy(model(el.tensor(x[:2, :, :64, :64])), np.array([1, 2]))
                    opt.zero_grad()
                    (loss + model.regularization()).backward()
                    opt.step()
                    row["int8_step_loss"] = float(loss.item())
                    row["ok"] = row["rel_l2_vs_onnxruntime"] <= args.tol and np.isfinite(row["int8_step_loss"])
                except Exception as exc:  # report every model, then fail
                    row["error"] = f"{type(exc).__name__}: {exc}"
                    row["ok"] = False
                failed |= not row["ok"]
                rows.append(row)
                if not args.json:
                    status = "ok" if row["ok"] else "FAIL"
                    detail = (row.get("error") or f"opset {row['opset']}, vs ORT {row['rel_l2_vs_onnxruntime']:.2e}, "
                              f"vs torch {row['rel_l2_vs_torch']:.2e}, INT8 step loss {row['int8_step_loss']:.3f}, "
                              f"external data {row['external_data'] or 'none'}")
                    print(f"{status:4} {name:20} {exporter:11} {detail}")
                    if "operators" in row:
                        print(f"     operators: {', '.join(row['operators'])}")
                for f in os.listdir(tmp):
                    os.unlink(os.path.join(tmp, f))
    if args.json:
        print(json.dumps(rows, indent=1))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
