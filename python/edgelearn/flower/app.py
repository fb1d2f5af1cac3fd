"""The Flower apps of split learning: :data:`client_app` (the edge part, INT8 by default) and :data:`server_app`
(the cloud part). See :mod:`edgelearn.flower` for the wire format and the message flow."""

from __future__ import annotations

import hashlib
import json
import time
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

try:
    from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
    from flwr.clientapp import ClientApp
    from flwr.serverapp import Grid, ServerApp
except ImportError as exc:  # pragma: no cover - the message is the point
    raise ImportError('edgelearn.flower needs Flower: pip install "edgelearn[flower]"') from exc

from .. import checkpoint as ckpt
from .. import sgq
from .. import data as eldata
from ..collab import protocol
from ..collab.cloud import Cloud, architecture_digest
from ..collab.codec import TensorCodec
from ..collab.edge import apply_gradients, calibration_features
from ..collab.split import build_split, split_spec
from ..octo import OctoConfig, octo
from ..optim import SGD
from ..tensor import no_grad, tensor
from . import DEFAULT_CONFIG, STYPE_FRAME, STYPE_RAW

__all__ = ["client_app", "server_app", "run_split", "EdgeWorker"]

client_app = ClientApp()
server_app = ServerApp()

_STATE_KEY = "edgelearn.edge"
_EVAL_BATCH = 256


def _settings(run_config: Dict[str, Any]) -> Dict[str, Any]:
    out = dict(DEFAULT_CONFIG)
    out.update({k: v for k, v in run_config.items() if k in DEFAULT_CONFIG})
    return out


def _tensor_array(blob: bytes, shape: Tuple[int, ...], mode: str) -> Array:
    return Array(dtype="float32", shape=tuple(int(s) for s in shape), stype=STYPE_RAW if mode == "fp32" else STYPE_FRAME,
                 data=bytes(blob))


def _array_blob(array: Array, mode: str, what: str) -> Tuple[bytes, Tuple[int, ...]]:
    expected = STYPE_RAW if mode == "fp32" else STYPE_FRAME
    if array.stype != expected or array.dtype != "float32":
        raise protocol.ProtocolError(f"{what}: Array of stype {array.stype!r} / dtype {array.dtype!r}, expected "
                                     f"stype {expected!r} / float32")
    return bytes(array.data), tuple(int(s) for s in array.shape)


def _labels_array(y: np.ndarray) -> Array:
    return Array(np.ascontiguousarray(y.astype(np.uint8 if y.max(initial=0) < 256 else np.int32)))


# --------------------------------------------------------------------------------------------------------------
# ClientApp: the edge part


class EdgeWorker:
    """The edge part of one SuperNode, rebuilt for each message from the run settings and ``context.state``."""

    def __init__(self, cfg: Dict[str, Any], context: Context):
        self.cfg = cfg
        self.context = context
        seed = int(cfg["seed"])
        splits = eldata.get_dataset(str(cfg["dataset"]), seed=seed)
        pid = int(context.node_config.get("partition-id", 0))
        parts = int(context.node_config.get("num-partitions", 1))
        if not 0 <= pid < parts:
            raise ValueError(f"node config: partition-id {pid} is not in [0, num-partitions={parts})")
        train = splits.train
        if parts > 1:
            idx = np.arange(pid, len(train), parts)
            train = eldata.ArrayDataset(train.images[idx], train.labels[idx], train.name, train.classes)
        self.train, self.test = train, splits.test
        self.loader = eldata.DataLoader(train, batch_size=int(cfg["batch-size"]), shuffle=True, seed=seed)
        self.model, _ = build_split(str(cfg["model"]), train.image_shape, train.num_classes,
                                    split_spec(cfg["split"]), int(cfg.get("init-seed", seed)))
        self.digest = architecture_digest(self.model)
        if cfg["precision"] == "int8":
            octo(self.model, OctoConfig(seed=int(cfg.get("init-seed", seed))))
        self.optimizer = SGD(list(self.model.parameters()), lr=float(cfg["lr"]), momentum=0.9, weight_decay=5e-4,
                             nesterov=True)
        self.mode = str(cfg["mode"])
        fsr = int(cfg["feature-stripe-rows"]) or None
        self.feature_codec = TensorCodec(self.mode, int(cfg["bits"]), int(cfg["feature-group"]), fsr,
                                         ranges=str(cfg["feature-ranges"]),
                                         constant_blocks=bool(cfg["constant-blocks"]),
                                         clip=sgq.parse_clip(str(cfg.get("feature-clip", ""))))
        self.grad_codec = TensorCodec(self.mode, int(cfg["bits"]), int(cfg["group"]), int(cfg["stripe-rows"]) or None)
        self.saved = context.state.config_records.get(_STATE_KEY)
        if self.saved is not None:
            state = ckpt._safetensors_numpy().load(self.saved["weights"])
            self.model.load_state_dict({k[6:]: v for k, v in state.items() if k.startswith("model/")})
            self.optimizer.load_state_dict(ckpt._decode(json.loads(self.saved["optimizer"]), state))
            order = list(self.saved.get("grad_order") or [])
            if order and self.grad_codec._codec is not None:  # the gradient stream's channel order so far
                self.grad_codec._codec.received_order = order

    def _save(self, step: int, features_digest: str = "") -> None:
        tensors = {f"model/{k}": ckpt._contiguous(v) for k, v in self.model.state_dict().items()}
        opt = ckpt._encode(self.optimizer.state_dict(), "optimizer", tensors)
        self.context.state.config_records[_STATE_KEY] = ConfigRecord({
            "weights": ckpt._safetensors_numpy().save(tensors), "optimizer": json.dumps(opt), "step": step,
            "features": features_digest, "grad_order": self._grad_order()})

    def _grad_order(self) -> List[int]:
        codec = self.grad_codec._codec
        return [int(v) for v in (codec.received_order or [])] if codec is not None else []

    def batch(self, k: int) -> Tuple[np.ndarray, np.ndarray]:
        """Training batch of step ``k`` (1-based), as ``collab.train_edge`` orders them."""
        epoch, i = divmod(k - 1, len(self.loader))
        bs = self.loader.batch_size
        idx = self.loader.order(epoch)[i * bs:(i + 1) * bs]
        return self.train.images[idx], self.train.labels[idx]

    def _forward(self, k: int):
        x, y = self.batch(k)
        self.model.train()
        out = self.model(tensor(x))
        return out, y

    def apply(self, grad_array: Optional[Array], k: int) -> None:
        """Backward and step for step ``k`` from the cloud's gradients: its forward pass is recomputed from the
        state saved before it (and must reproduce the features that were sent)."""
        if grad_array is None:
            return
        if self.saved is None or int(self.saved["step"]) != k:
            raise protocol.ProtocolError(f"gradients for step {k}, but this node's saved state is of step "
                                         f"{None if self.saved is None else self.saved['step']}")
        out, _ = self._forward(k)
        features = np.ascontiguousarray(out.data)
        if hashlib.sha256(features.tobytes()).hexdigest() != self.saved["features"]:
            raise RuntimeError(f"step {k}: the recomputed forward pass differs from the one sent (non-deterministic "
                               "edge part?)")
        blob, shape = _array_blob(grad_array, self.mode, "gradients")
        if shape != features.shape:
            raise protocol.ProtocolError(f"gradients of shape {shape} for features of shape {features.shape}")
        apply_gradients(self.model, self.optimizer, out, self.grad_codec.decode(blob, shape, "feature gradients"))

    def features(self, k: int) -> Tuple[Array, Array, float]:
        """Features (as an SGQ-frame Array) and labels of step ``k``; saves the state they were computed from."""
        before = {"model": self.model.state_dict()}
        out, y = self._forward(k)
        features = np.ascontiguousarray(out.data)
        blob = self.feature_codec.encode(features)
        error = float(np.linalg.norm(self.feature_codec.decode_sent(blob, features.shape, "features") - features)
                      / max(float(np.linalg.norm(features)), 1e-30))
        self.model.load_state_dict(before["model"])  # the state *before* this forward pass is what step k redoes
        self._save(k, hashlib.sha256(features.tobytes()).hexdigest())
        return _tensor_array(blob, features.shape, self.mode), _labels_array(y), error


def _config(message: Message) -> Dict[str, Any]:
    return dict(message.content.config_records["config"])


@client_app.query("hello")
def _hello(message: Message, context: Context) -> Message:
    cfg = _config(message)
    splits = eldata.get_dataset(str(cfg["dataset"]), seed=int(cfg["seed"]))
    pid = int(context.node_config.get("partition-id", 0))
    parts = int(context.node_config.get("num-partitions", 1))
    n = len(range(pid, len(splits.train), parts))
    return Message(RecordDict({"hello": ConfigRecord({
        "input_shape": list(splits.train.image_shape), "classes": splits.train.num_classes, "train_samples": n,
        "partition": pid, "partitions": parts})}), reply_to=message)


@client_app.train("split")
def _train(message: Message, context: Context) -> Message:
    cfg = _config(message)
    worker = EdgeWorker(cfg, context)
    if worker.digest != cfg["architecture"]:
        raise protocol.ProtocolError(f"the cloud announces edge architecture {cfg['architecture']}; this node "
                                     f"built {worker.digest}")
    k = int(cfg["step"])
    grads = message.content.array_records.get("grad")
    worker.apply(grads["grad"] if grads is not None else None, k - 1)
    content = RecordDict()
    if cfg["action"] == "train":
        features, labels, error = worker.features(k)
        content["features"] = ArrayRecord({"features": features, "labels": labels})
        content["metrics"] = MetricRecord({"feature_rel_l2": error})
    else:  # "calibrate": after the last step, the BatchNorm re-estimation batches
        arrays = {}
        for i, features, labels in calibration_features(worker.model, worker.train,
                                                        int(cfg["bn-recalibration-batches"]),
                                                        int(cfg["batch-size"]), int(cfg["seed"]) + 7919):
            arrays[f"features.{i}"] = _tensor_array(worker.feature_codec.encode(features), features.shape,
                                                    worker.mode)
            arrays[f"labels.{i}"] = _labels_array(labels)
        worker._save(k)
        content["features"] = ArrayRecord(arrays)
    return Message(content, reply_to=message)


@client_app.evaluate("split")
def _evaluate(message: Message, context: Context) -> Message:
    cfg = _config(message)
    worker = EdgeWorker(cfg, context)
    limit = int(cfg["eval-limit"]) or len(worker.test)
    n = min(limit, len(worker.test))
    arrays = {}
    worker.model.eval()
    for j, start in enumerate(range(0, n, _EVAL_BATCH)):
        x = worker.test.images[start:min(start + _EVAL_BATCH, n)]
        with no_grad():
            features = np.ascontiguousarray(worker.model(tensor(x)).data)
        arrays[f"features.{j}"] = _tensor_array(worker.feature_codec.encode(features), features.shape, worker.mode)
        arrays[f"labels.{j}"] = _labels_array(worker.test.labels[start:start + len(x)])
    return Message(RecordDict({"features": ArrayRecord(arrays)}), reply_to=message)


# --------------------------------------------------------------------------------------------------------------
# ServerApp: the cloud part


def _labels_blob(array: Array) -> Tuple[str, bytes]:
    y = array.numpy()
    if y.dtype == np.uint8:
        return "u1", y.tobytes()
    return "<i4", y.astype("<i4").tobytes()


def _ok(replies, what: str) -> Dict[int, Message]:
    out = {}
    for reply in replies:
        if reply.has_error():
            raise RuntimeError(f"{what}: node {reply.metadata.src_node_id} failed: {reply.error.reason}")
        out[reply.metadata.src_node_id] = reply
    return out


def run_split(grid: Grid, run_config: Dict[str, Any], log=print, timeout: Optional[float] = None) -> Dict[str, Any]:
    """The ServerApp's work: split training of the run's model with every connected node as an edge, through
    a :class:`~edgelearn.collab.Cloud` (one :class:`~edgelearn.collab.CloudSession` per node: the same
    envelopes and byte counts as ``edgelearn collab``). Returns the summary (per node: steps, test accuracy,
    bytes per sample each way; and the Flower payload bytes of the SGQ frames)."""
    cfg = _settings(run_config)
    mode = str(cfg["mode"])
    t0 = time.perf_counter()
    deadline = time.monotonic() + float(cfg["wait-nodes-s"])
    nodes = sorted(grid.get_node_ids())
    while len(nodes) < int(cfg["min-nodes"]) and time.monotonic() < deadline:
        time.sleep(0.5)
        nodes = sorted(grid.get_node_ids())
    if len(nodes) < max(1, int(cfg["min-nodes"])):
        raise RuntimeError(f"{len(nodes)} SuperNodes connected, min-nodes is {cfg['min-nodes']} (waited "
                           f"{cfg['wait-nodes-s']} s)")
    base = ConfigRecord({k: v for k, v in cfg.items() if k not in ("result-file", "min-nodes", "wait-nodes-s")})
    frames = {"stypes": set(), "count": 0}

    def seen(array: Array) -> None:
        frames["stypes"].add(array.stype)
        frames["count"] += 1

    def send(message_type: str, extra: Dict[int, Dict[str, Any]], arrays: Optional[Dict[int, Array]] = None,
             targets: Optional[List[int]] = None) -> Dict[int, Message]:
        msgs = []
        for node in targets if targets is not None else nodes:
            content = RecordDict({"config": ConfigRecord(dict(base, **extra.get(node, {})))})
            if arrays and node in arrays:
                content["grad"] = ArrayRecord({"grad": arrays[node]})
            msgs.append(Message(content, dst_node_id=node, message_type=message_type))
        return _ok(grid.send_and_receive(msgs, timeout=timeout), message_type)

    hellos = {n: dict(r.content.config_records["hello"]) for n, r in send("query.hello", {}).items()}
    first = hellos[nodes[0]]
    cloud = Cloud(str(cfg["model"]), split_spec(cfg["split"]), seed=int(cfg["seed"]), lr=float(cfg["lr"]),
                  input_shape=tuple(first["input_shape"]), classes=int(first["classes"]), log=log)
    sessions, total, per_epoch, payload = {}, {}, {}, {n: {"up": 0, "down": 0} for n in nodes}
    per_node: Dict[int, Dict[str, Any]] = {}
    for node in nodes:
        session = cloud.open_session(f"flower-node-{node}")
        hello = {"input_shape": list(hellos[node]["input_shape"]), "classes": int(hellos[node]["classes"]),
                 "mode": mode, "bits": int(cfg["bits"]), "group": int(cfg["group"]),
                 "stripe_rows": int(cfg["stripe-rows"]) or None, "name": f"node-{node}", "edge_key": str(node),
                 "grad_clip": list(sgq.parse_clip(str(cfg.get("grad-clip", ""))) or []) or None}
        session.handle(protocol.pack(protocol.HELLO, hello))
        sessions[node] = session
        per_epoch[node] = max(1, -(-int(hellos[node]["train_samples"]) // int(cfg["batch-size"])))
        total[node] = per_epoch[node] * int(cfg["epochs"])
        if int(cfg["steps"]):
            total[node] = min(total[node], int(cfg["steps"]))
        per_node[node] = {"partition": hellos[node]["partition"], "train_samples": hellos[node]["train_samples"],
                          "feature_rel_l2_sum": 0.0, "loss_sum": 0.0, "seen": 0, "correct": 0}
    arch = {"architecture": cloud.edge_digest, "init-seed": cloud.seed}
    log(f"split training of {cfg['model']} at {cfg['split']} over Flower: {len(nodes)} nodes, {mode} "
        f"{cfg['bits']}-bit, {max(total.values())} steps")
    pending: Dict[int, Array] = {}
    for k in range(1, max(total.values()) + 1):
        active = [n for n in nodes if k <= total[n]]
        replies = send("train.split", {n: dict(arch, action="train", step=k) for n in active}, pending, active)
        for node in active:  # one cloud step per node, serialized as collab serializes its edges
            arrays = replies[node].content.array_records["features"]
            blob, shape = _array_blob(arrays["features"], mode, "features")
            kind, labels = _labels_blob(arrays["labels"])
            seen(arrays["features"])
            payload[node]["up"] += len(blob) + len(labels)
            reply = sessions[node].handle(protocol.pack(protocol.TRAIN, {"shape": list(shape), "labels": kind,
                                                                         "step": k}, [blob, labels]))
            _, meta, blobs = protocol.unpack(reply)
            payload[node]["down"] += len(blobs[0])
            pending[node] = _tensor_array(blobs[0], meta["shape"], mode)
            seen(pending[node])
            stats = per_node[node]
            stats["feature_rel_l2_sum"] += float(replies[node].content.metric_records["metrics"]["feature_rel_l2"])
            if (k - 1) // per_epoch[node] == (total[node] - 1) // per_epoch[node]:  # the last epoch's metrics
                stats["loss_sum"] += meta["loss"] * meta["n"]
                stats["correct"] += meta["correct"]
                stats["seen"] += meta["n"]
    # the last step's gradients, then the BatchNorm re-estimation of both parts
    replies = send("train.split", {n: dict(arch, action="calibrate", step=total[n] + 1) for n in nodes}, pending)
    for node in nodes:
        arrays = replies[node].content.array_records["features"]
        i = 0
        while f"features.{i}" in arrays:
            blob, shape = _array_blob(arrays[f"features.{i}"], mode, "calibration features")
            kind, labels = _labels_blob(arrays[f"labels.{i}"])
            sessions[node].handle(protocol.pack(protocol.CALIBRATE, {"shape": list(shape), "labels": kind,
                                                                     "batch": i}, [blob, labels]))
            i += 1
    train_seconds = time.perf_counter() - t0
    replies = send("evaluate.split", {n: arch for n in nodes})
    results = []
    for node in nodes:
        arrays = replies[node].content.array_records["features"]
        correct = n = 0
        j = 0
        while f"features.{j}" in arrays:
            blob, shape = _array_blob(arrays[f"features.{j}"], mode, "test features")
            kind, labels = _labels_blob(arrays[f"labels.{j}"])
            _, meta, _ = protocol.unpack(sessions[node].handle(protocol.pack(
                protocol.EVAL, {"shape": list(shape), "labels": kind}, [blob, labels])))
            correct += meta["correct"]
            n += meta["n"]
            j += 1
        sessions[node].handle(protocol.pack(protocol.BYE, {}))
        summary = cloud.close_session(sessions[node], "completed")
        stats = per_node[node]
        results.append({
            "node_id": node, "partition": stats["partition"], "train_samples": stats["train_samples"],
            "steps": total[node], "test_accuracy": correct / max(n, 1), "test_samples": n,
            "train_loss": stats["loss_sum"] / max(stats["seen"], 1),
            "train_accuracy": stats["correct"] / max(stats["seen"], 1),
            "feature_rel_l2": stats["feature_rel_l2_sum"] / max(total[node], 1),
            "grad_rel_l2": summary["grad_rel_l2"],
            "bytes_up_per_sample": summary["bytes_up_per_sample"],
            "bytes_down_per_sample": summary["bytes_down_per_sample"],
            "bytes_per_sample": summary["bytes_per_sample"],
            "frame_bytes_up_per_sample": payload[node]["up"] / max(summary["train_samples"], 1),
            "frame_bytes_down_per_sample": payload[node]["down"] / max(summary["train_samples"], 1)})
    fp32 = 4 * int(np.prod(cloud.feature_shape))
    out = {"nodes": results, "mode": mode, "bits": int(cfg["bits"]), "precision": cfg["precision"],
           "model": cfg["model"], "split": split_spec(cfg["split"]), "dataset": cfg["dataset"],
           "stype": STYPE_RAW if mode == "fp32" else STYPE_FRAME, "feature_shape": list(cloud.feature_shape),
           "fp32_feature_bytes_per_sample": fp32, "cloud_steps": cloud.steps, "train_seconds": train_seconds,
           "test_accuracy": float(np.mean([r["test_accuracy"] for r in results])),
           "bytes_per_sample": float(np.mean([r["bytes_per_sample"] for r in results])),
           "frames": {"count": frames["count"], "stypes": sorted(frames["stypes"])}}
    out["compression_vs_fp32"] = 2 * fp32 / out["bytes_per_sample"]
    return out


@server_app.main()
def _main(grid: Grid, context: Context) -> None:
    from flwr.common.logger import log as flwr_log
    from logging import INFO

    result = run_split(grid, dict(context.run_config), log=lambda m: flwr_log(INFO, "edgelearn: %s", m))
    flwr_log(INFO, "edgelearn result: %s", json.dumps(result))
    path = str(context.run_config.get("result-file") or "")
    if path:
        import os

        tmp = f"{path}.tmp"
        with open(tmp, "w") as f:
            json.dump(result, f)
        os.replace(tmp, path)
