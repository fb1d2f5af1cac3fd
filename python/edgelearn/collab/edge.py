"""The edge side of split learning: the first layers of the model, trained on the device's own data.

Per step (:meth:`Edge.train_step`): edge forward -> encode features -> TRAIN to the cloud -> the cloud runs
its forward/backward/step and answers GRAD with the encoded feature gradients -> edge backward/step.
:func:`train_edge` runs epochs (or a step budget) of that and evaluates through the split on test data.

The edge talks through a *transport*: anything with ``exchange(message: bytes) -> bytes`` and ``close()``.
:class:`LocalTransport` calls a :class:`~edgelearn.collab.cloud.Cloud` in this process (the benchmarks and
the equivalence tests), :class:`~edgelearn.collab.transport.GrpcTransport` dials a remote cloud. Both carry
the same envelopes, cut into the same chunks, so their byte counts agree.
"""

from __future__ import annotations

import time
from typing import Any, Dict, Optional, Tuple

import numpy as np

from .. import optim
from ..data import ArrayDataset, DataLoader
from ..models import MODEL_NAMES
from ..octo import OctoConfig, octo
from ..tensor import no_grad, tensor
from ..train import _progress_bar
from .cloud import Cloud
from .codec import MODES, TensorCodec, relative_l2
from .protocol import (BYE, CALIBRATE, CALIBRATED, EVAL, EVAL_RESULT, GRAD, HELLO, KIND_NAMES, TRAIN, WELCOME,
                       ProtocolError, WireStats, chunks, pack, reassemble, unpack)
from .split import batchnorm_calibration, build_split, output_shape

__all__ = ["Edge", "LocalTransport", "train_edge"]


class LocalTransport:
    """An in-process transport to ``cloud``: the same envelopes and chunks as gRPC, without a socket."""

    def __init__(self, cloud: Cloud, peer: str = "in-process"):
        self.cloud = cloud
        self.session = cloud.open_session(peer)
        self._closed = False

    def exchange(self, message: bytes) -> bytes:
        reply = self.session.handle(_through_chunks(message))
        return _through_chunks(reply)

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self.cloud.close_session(self.session, "completed" if self.session.finished else "dropped")


def _through_chunks(message: bytes) -> bytes:
    return next(reassemble(chunks(message)))


def _labels_blob(y: np.ndarray, classes: int) -> Tuple[str, bytes]:
    if classes <= 256:
        return "u1", y.astype(np.uint8).tobytes()
    if classes <= 65536:
        return "<u2", y.astype("<u2").tobytes()
    return "<i4", y.astype("<i4").tobytes()


class Edge:
    """An edge device: says HELLO (its data's shape and its codec settings), receives the model name, split
    and seed from the cloud, and builds its part of the model from them.

    ``mode`` is one of ``fp32``, ``fp16``, ``uniform``, ``sgq`` (see :mod:`edgelearn.collab.codec`);
    In ``sgq`` mode the gradients use ``group`` channels per group and ``stripe_rows`` rows per stripe
    (``None``: H/4) with a range per sample, group and stripe and stochastic rounding; the features use
    ``feature_group``/``feature_stripe_rows`` with ``feature_ranges`` (``"frame"``: a range per group and
    stripe shared by the batch, or ``"sample"``) and ``constant_blocks`` (a block whose values are all
    equal gets one code). The feature defaults (groups of 1 channel, stripes of 1 row, ranges per frame,
    constant blocks) are what made SGQ 4-bit frames smaller than uniform 4-bit ones with half the error on
    Fashion-MNIST split features (``benches/sgq.py``): zero rows after ReLU are common there.
    ``precision="int8"`` trains the edge part with Octo INT8 (``octo_config``, default ``OctoConfig()``).
    ``model``/``split`` (optional) are checked against the cloud's. The optimizer is SGD with Nesterov
    momentum, like ``edgelearn train``'s default.
    """

    def __init__(self, transport: Any, input_shape: Tuple[int, int, int], classes: int, *, mode: str = "sgq",
                 bits: int = 4, group: int = 4, stripe_rows: Optional[int] = None, precision: str = "fp32",
                 octo_config: Optional[OctoConfig] = None, lr: float = 0.02, momentum: float = 0.9,
                 weight_decay: float = 5e-4, name: str = "", model: Optional[str] = None,
                 split: Optional[int] = None, feature_group: int = 1, feature_stripe_rows: Optional[int] = 1,
                 feature_ranges: str = "frame", constant_blocks: bool = True):
        if mode not in MODES:
            raise ValueError(f"mode: expected one of {MODES}, got {mode!r}")
        if precision not in ("fp32", "int8"):
            raise ValueError(f"precision: expected 'fp32' or 'int8', got {precision!r}")
        self.transport = transport
        self.input_shape, self.classes = tuple(int(v) for v in input_shape), int(classes)
        self.mode, self.bits, self.precision = mode, int(bits), precision
        self.stats = WireStats()
        self.feature_error_sum = 0.0
        self.grad_error_sum = 0.0
        self.steps = 0
        hello = {"input_shape": list(self.input_shape), "classes": self.classes, "mode": mode, "bits": self.bits,
                 "group": int(group), "stripe_rows": stripe_rows, "precision": precision, "name": name,
                 "model": model, "split": split, "feature_group": int(feature_group),
                 "feature_stripe_rows": feature_stripe_rows, "feature_ranges": feature_ranges,
                 "constant_blocks": bool(constant_blocks)}
        welcome, _ = self._request(HELLO, hello, (), WELCOME)
        self.edge_id = welcome.get("edge_id")
        self.model_name, self.split, self.seed = welcome.get("model"), welcome.get("split"), welcome.get("seed")
        if self.model_name not in MODEL_NAMES or not all(
                isinstance(v, int) and not isinstance(v, bool) for v in (self.split, self.seed)):
            raise ProtocolError(f"WELCOME: bad model {self.model_name!r}, split {self.split!r} or seed {self.seed!r}")
        self.model, _ = build_split(self.model_name, self.input_shape, self.classes, self.split, self.seed)
        self.feature_shape = output_shape(self.model, self.input_shape)
        if list(self.feature_shape) != welcome.get("feature_shape"):
            raise ProtocolError(f"WELCOME: the cloud expects features {welcome.get('feature_shape')}, this edge's "
                                f"part makes {list(self.feature_shape)}")
        if precision == "int8":
            octo(self.model, octo_config or OctoConfig(seed=self.seed))
        self.optimizer = optim.SGD(list(self.model.parameters()), lr=lr, momentum=momentum,
                                   weight_decay=weight_decay, nesterov=momentum > 0)
        self._has_regularizer = any(hasattr(type(m), "regularization_term") for m in self.model.modules())
        self.feature_codec = TensorCodec(mode, bits, feature_group, feature_stripe_rows, rounding="nearest",
                                         ranges=feature_ranges, constant_blocks=constant_blocks)
        self.grad_codec = TensorCodec(mode, bits, group, stripe_rows)

    def _request(self, kind: int, meta: Dict[str, Any], blobs, expect: int):
        message = pack(kind, meta, blobs)
        self.stats.count("up", kind, len(message))
        reply = self.transport.exchange(message)
        got, reply_meta, reply_blobs = unpack(reply)
        self.stats.count("down", got, len(reply))
        if got != expect:
            raise ProtocolError(f"expected {KIND_NAMES[expect]} from the cloud, got {KIND_NAMES[got]}")
        return reply_meta, reply_blobs

    def _features_message(self, features: np.ndarray, y: np.ndarray) -> Tuple[Dict[str, Any], list]:
        blob = self.feature_codec.encode(features)
        label_kind, labels = _labels_blob(y, self.classes)
        return {"shape": list(features.shape), "labels": label_kind}, [blob, labels]

    def train_step(self, x: np.ndarray, y: np.ndarray) -> Dict[str, Any]:
        """One split-training step on a batch; returns the cloud's ``loss``/``correct``/``n`` and the relative
        L2 reconstruction errors of the features and the gradients."""
        self.model.train()
        out = self.model(tensor(x))
        features = np.ascontiguousarray(out.data)
        meta, blobs = self._features_message(features, y)
        feature_error = relative_l2(self.feature_codec.decode_sent(blobs[0], features.shape, "features"), features)
        meta["step"] = self.steps + 1
        reply, reply_blobs = self._request(TRAIN, meta, blobs, GRAD)
        if len(reply_blobs) != 1:
            raise ProtocolError(f"GRAD: expected 1 blob, got {len(reply_blobs)}")
        grad_blob = reply_blobs[0]
        grad = self.grad_codec.decode(grad_blob, features.shape, "feature gradients")
        self.optimizer.zero_grad()
        out.backward(grad)
        if self._has_regularizer:
            reg = self.model.regularization()
            if reg.requires_grad:
                reg.backward()
        self.optimizer.step()
        self.steps += 1
        self.stats.train_samples += len(y)
        self.feature_error_sum += feature_error
        self.grad_error_sum += float(reply.get("grad_rel_l2") or 0.0)
        return {"loss": float(reply["loss"]), "correct": int(reply["correct"]), "n": int(reply["n"]),
                "feature_rel_l2": feature_error, "grad_rel_l2": reply.get("grad_rel_l2")}

    def evaluate(self, data: ArrayDataset, batch_size: int = 256, limit: Optional[int] = None) -> Dict[str, float]:
        """Loss and accuracy of the split model (edge, encoded features, cloud) on ``data``."""
        n_total = len(data) if limit is None else min(len(data), int(limit))
        loss_sum, correct, n = 0.0, 0, 0
        self.model.eval()
        try:
            for start in range(0, n_total, batch_size):
                x = data.images[start:min(start + batch_size, n_total)]
                y = data.labels[start:min(start + batch_size, n_total)]
                with no_grad():
                    features = np.ascontiguousarray(self.model(tensor(x)).data)
                meta, blobs = self._features_message(features, y)
                reply, _ = self._request(EVAL, meta, blobs, EVAL_RESULT)
                loss_sum += float(reply["loss_sum"])
                correct += int(reply["correct"])
                n += int(reply["n"])
        finally:
            self.model.train()
        self.stats.eval_samples += n
        return {"loss": loss_sum / max(n, 1), "accuracy": correct / max(n, 1), "n": n}

    def recalibrate_batchnorm(self, data: ArrayDataset, batches: int = 32, batch_size: int = 64,
                              seed: int = 0) -> int:
        """Re-estimates the BatchNorm running statistics of both parts (edge here, cloud via CALIBRATE
        messages) from ``batches`` seeded random batches of ``data``, as ``edgelearn.fit`` does after each
        epoch (eval-mode statistics otherwise lag behind the moving weights). Returns the images used."""
        n = min(len(data), batches * batch_size)
        if n == 0:
            return 0
        idx = np.sort(np.random.default_rng(seed).choice(len(data), size=n, replace=False))
        for i, start in enumerate(range(0, n, batch_size)):
            sel = idx[start:start + batch_size]
            with batchnorm_calibration(self.model, i):
                features = np.ascontiguousarray(self.model(tensor(data.images[sel])).data)
            meta, blobs = self._features_message(features, data.labels[sel])
            meta["batch"] = i
            self._request(CALIBRATE, meta, blobs, CALIBRATED)
        return n

    def close(self) -> None:
        """Says BYE (the cloud counts the session as completed) and closes the transport."""
        try:
            self._request(BYE, {"steps": self.steps}, (), BYE)
        finally:
            self.transport.close()

    def summary(self) -> Dict[str, Any]:
        out = {"edge_id": self.edge_id, "mode": self.mode, "bits": self.bits if self.mode in ("uniform", "sgq")
               else (16 if self.mode == "fp16" else 32), "precision": self.precision, "steps": self.steps,
               "model": self.model_name, "split": self.split, "feature_shape": list(self.feature_shape),
               "feature_rel_l2": self.feature_error_sum / self.steps if self.steps else None,
               "grad_rel_l2": self.grad_error_sum / self.steps if self.steps else None}
        out.update(self.stats.summary())
        fp32 = 4 * int(np.prod(self.feature_shape)) if self.feature_shape else None
        out["fp32_feature_bytes_per_sample"] = fp32
        if fp32 and out["bytes_per_sample"]:
            # traffic of this run vs. the raw float32 features and gradients it replaces (both directions)
            out["compression_vs_fp32"] = 2 * fp32 / out["bytes_per_sample"]
        return out


def train_edge(edge: Edge, train: ArrayDataset, test: Optional[ArrayDataset] = None, *, epochs: int = 1,
               steps: Optional[int] = None, batch_size: int = 64, seed: int = 0, eval_limit: Optional[int] = None,
               bn_recalibration_batches: int = 32, progress: bool = True, log_every: int = 0, log=print,
               close: bool = True) -> Dict[str, Any]:
    """Trains ``edge`` for ``epochs`` epochs of ``train`` (at most ``steps`` steps in all), re-estimates the
    BatchNorm statistics of both parts on ``bn_recalibration_batches`` training batches (0: off; see
    :meth:`Edge.recalibrate_batchnorm`), then evaluates on ``test`` (the first ``eval_limit`` samples)
    through the split. Returns the edge's summary with
    ``train_loss``, ``train_accuracy``, ``test_accuracy``, ``test_loss``, ``seconds``, traffic per sample."""
    loader = DataLoader(train, batch_size=batch_size, shuffle=True, seed=seed)
    total = len(loader) * epochs if steps is None else min(steps, len(loader) * epochs)
    bar = _progress_bar(total, f"edge {edge.edge_id}", progress)
    t0 = time.perf_counter()
    loss_sum, correct, seen = 0.0, 0, 0
    try:
        done = False
        for epoch in range(epochs):
            loader.set_epoch(epoch)
            loss_sum, correct, seen = 0.0, 0, 0
            for x, y in loader:
                r = edge.train_step(x, y)
                loss_sum += r["loss"] * r["n"]
                correct += r["correct"]
                seen += r["n"]
                bar.update(1)
                bar.set_postfix(loss=f"{loss_sum / seen:.4f}", acc=f"{correct / seen:.3f}", refresh=False)
                if log_every and edge.steps % log_every == 0:
                    log(f"step {edge.steps}/{total} loss {r['loss']:.4f} feature err {r['feature_rel_l2']:.4f}")
                if edge.steps >= total:
                    done = True
                    break
            if done:
                break
        edge.recalibrate_batchnorm(train, bn_recalibration_batches, batch_size, seed=seed + 7919)
        train_seconds = time.perf_counter() - t0
        result = {"train_loss": loss_sum / max(seen, 1), "train_accuracy": correct / max(seen, 1),
                  "train_seconds": train_seconds, "epochs": epochs, "batch_size": batch_size}
        if test is not None:
            ev = edge.evaluate(test, limit=eval_limit)
            result.update(test_accuracy=ev["accuracy"], test_loss=ev["loss"], test_samples=ev["n"])
        if close:
            edge.close()
    finally:
        bar.close()
    summary = edge.summary()
    summary.update(result)
    return summary
