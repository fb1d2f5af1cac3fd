"""The edge side of split learning: the first layers of the model, trained on the device's own data.

Per step (:meth:`Edge.train_step`): edge forward -> encode features -> TRAIN to the cloud -> the cloud runs
its forward/backward/step and answers GRAD with the encoded feature gradients -> edge backward/step.
:func:`train_edge` runs epochs (or a step budget) of that and evaluates through the split on test data.

The edge talks through a *transport*: anything with ``exchange(message: bytes) -> bytes`` and ``close()``.
:class:`LocalTransport` calls a :class:`~edgelearn.collab.cloud.Cloud` in this process (the benchmarks and
the equivalence tests), :class:`~edgelearn.collab.transport.GrpcTransport` dials a remote cloud. Both carry
the same envelopes, cut into the same chunks, so their byte counts agree.

Reconnecting: :func:`train_edge` given a ``reconnect`` callable (a new transport to the same cloud) survives a
cloud that goes away: it retries with bounded exponential backoff (:class:`RetryPolicy`), says HELLO again
with the same ``edge_key`` and reconciles with the step count the cloud reports (:meth:`Edge.reconnect`):
the edge keeps copies of its own state after every step from the cloud's latest checkpoint on, so it rolls
back to exactly the step a restarted cloud resumed from, and a step the cloud applied whose reply was lost is
recomputed and answered from the cloud's record, never applied twice.
"""

from __future__ import annotations

import copy
import dataclasses
import time
import uuid
from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional, Tuple

import numpy as np

from .. import optim, sgq
from ..checkpoint import save_checkpoint
from ..data import ArrayDataset, DataLoader
from ..octo import OctoConfig, octo
from ..tensor import no_grad, tensor
from ..train import _progress_bar
from .cloud import ArchitectureMismatch, Cloud, architecture_digest
from .codec import MODES, TensorCodec, relative_l2
from .protocol import (BYE, CALIBRATE, CALIBRATED, EVAL, EVAL_RESULT, GRAD, HELLO, KIND_NAMES, PULL, STATE, TRAIN,
                       WELCOME, CollabError, ConnectionLost, ProtocolError, WireStats, chunks, pack, reassemble,
                       unpack)
from .split import batchnorm_calibration, build_split, is_model_spec, join_parts, output_shape, split_spec

__all__ = ["Edge", "LocalTransport", "RetryPolicy", "train_edge"]


@dataclass(frozen=True)
class RetryPolicy:
    """How an edge retries a lost cloud: up to ``attempts`` reconnections per outage, waiting ``initial``
    seconds before the first and doubling (``factor``) up to ``maximum`` seconds between them."""

    attempts: int = 10
    initial: float = 0.5
    maximum: float = 10.0
    factor: float = 2.0

    def __post_init__(self) -> None:
        if self.attempts < 0 or not self.initial >= 0 or not self.maximum >= self.initial or not self.factor >= 1:
            raise ValueError(f"RetryPolicy: bad settings {self} (attempts >= 0, 0 <= initial <= maximum, factor >= 1)")

    def delays(self):
        delay = self.initial
        for _ in range(self.attempts):
            yield delay
            delay = min(delay * self.factor, self.maximum)


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
    ``feature_clip`` and ``grad_clip`` (sgq; ``None``, ``"sigma:Z"``, ``("sigma", z)``, ``"minmax:KAPPA"``; see
    :func:`edgelearn.sgq.parse_clip`) narrow each range block before its codes are computed: this edge clips
    the features it sends, the cloud (told in HELLO) the gradients it sends back. At 2 bits
    ``feature_clip="sigma:2.5", grad_clip="sigma:1.5"`` kept split training within a point of fp32
    (``benches/sgq.py``).
    ``precision="int8"`` trains the edge part with Octo INT8 (``octo_config``, default ``OctoConfig()``).
    ``model``/``split`` (optional) are checked against the cloud's. The optimizer is SGD with Nesterov
    momentum, like ``edgelearn train``'s default.
    """

    def __init__(self, transport: Any, input_shape: Tuple[int, int, int], classes: int, *, mode: str = "sgq",
                 bits: int = 4, group: int = 4, stripe_rows: Optional[int] = None, precision: str = "fp32",
                 octo_config: Optional[OctoConfig] = None, lr: float = 0.02, momentum: float = 0.9,
                 weight_decay: float = 5e-4, name: str = "", model: Optional[str] = None,
                 split: Optional[int] = None, feature_group: int = 1, feature_stripe_rows: Optional[int] = 1,
                 feature_ranges: str = "frame", constant_blocks: bool = True, edge_key: Optional[str] = None,
                 feature_clip: Any = None, grad_clip: Any = None):
        if mode not in MODES:
            raise ValueError(f"mode: expected one of {MODES}, got {mode!r}")
        if precision not in ("fp32", "int8"):
            raise ValueError(f"precision: expected 'fp32' or 'int8', got {precision!r}")
        self.transport = transport
        self.input_shape, self.classes = tuple(int(v) for v in input_shape), int(classes)
        self.mode, self.bits, self.precision = mode, int(bits), precision
        feature_clip, grad_clip = sgq.parse_clip(feature_clip), sgq.parse_clip(grad_clip)
        if mode != "sgq" and (feature_clip or grad_clip):
            raise ValueError(f"feature_clip/grad_clip: range clipping only applies to mode 'sgq', not {mode!r}")
        self.feature_clip, self.grad_clip = feature_clip, grad_clip
        self.stats = WireStats()
        self.feature_error_sum = 0.0
        self.grad_error_sum = 0.0
        self.steps = 0
        self.edge_key = edge_key or uuid.uuid4().hex
        self._hello = {"input_shape": list(self.input_shape), "classes": self.classes, "mode": mode,
                       "bits": self.bits, "group": int(group), "stripe_rows": stripe_rows, "precision": precision,
                       "name": name, "model": model, "split": split, "feature_group": int(feature_group),
                       "feature_stripe_rows": feature_stripe_rows, "feature_ranges": feature_ranges,
                       "constant_blocks": bool(constant_blocks), "edge_key": self.edge_key,
                       "grad_clip": list(grad_clip) if grad_clip else None}
        self._codec_settings = (mode, bits, group, stripe_rows, feature_group, feature_stripe_rows, feature_ranges,
                                constant_blocks)
        welcome, _ = self._request(HELLO, self._hello, (), WELCOME)
        self.edge_id = welcome.get("edge_id")
        self.model_name, self.split, self.seed = welcome.get("model"), welcome.get("split"), welcome.get("seed")
        try:
            self.split = split_spec(self.split)
        except (TypeError, ValueError):
            raise ProtocolError(f"WELCOME: bad split {self.split!r}") from None
        if not is_model_spec(self.model_name) or isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ProtocolError(f"WELCOME: bad model {self.model_name!r} or seed {self.seed!r}")
        self.cloud_model = self.model_name
        if self.model_name.startswith("onnx:") and isinstance(model, str) and model.startswith("onnx:"):
            self.model_name = model  # this edge's own copy of the ONNX file (its part's digest is checked below)
        self.model, _ = build_split(self.model_name, self.input_shape, self.classes, self.split, self.seed)
        self.feature_shape = output_shape(self.model, self.input_shape)
        self.architecture = architecture_digest(self.model)
        self._check_welcome(welcome)
        if welcome.get("applied_step"):
            raise CollabError(f"the cloud already applied {welcome['applied_step']} steps of an edge named "
                              f"{self.edge_key!r}; a new edge needs another edge key")
        self.octo_config = (octo_config or OctoConfig(seed=self.seed)) if precision == "int8" else None
        if precision == "int8":
            octo(self.model, self.octo_config)
        self.optimizer = optim.SGD(list(self.model.parameters()), lr=lr, momentum=momentum,
                                   weight_decay=weight_decay, nesterov=momentum > 0)
        self._new_codecs()
        #: copies of this edge's state after step k, for every k from the cloud's latest checkpoint on (and
        #: always the current one): what a reconnection rolls back to
        self._snapshots: Dict[int, Dict[str, Any]] = {}
        self._checkpoint_step: Optional[int] = welcome.get("checkpoint_step")
        self.cloud_steps = 0  # this edge's steps the cloud held at the last (re)connection
        self._snapshot()

    def _new_codecs(self) -> None:
        """Fresh codecs: a new connection starts new frame streams (channel orders, rounding seeds)."""
        mode, bits, group, stripe_rows, feature_group, feature_stripe_rows, ranges, constant = self._codec_settings
        self.feature_codec = TensorCodec(mode, bits, feature_group, feature_stripe_rows, rounding="nearest",
                                         ranges=ranges, constant_blocks=constant, clip=self.feature_clip)
        self.grad_codec = TensorCodec(mode, bits, group, stripe_rows)

    def _check_welcome(self, welcome: Dict[str, Any]) -> None:
        announced = welcome.get("architecture")
        if announced is not None and announced != self.architecture:
            raise ArchitectureMismatch(f"the cloud announces an edge part with architecture digest {announced!r}; "
                                       f"the part this edge built from {self.model_name!r} split at {self.split} "
                                       f"has {self.architecture!r} (another model file or edgelearn version?)")
        if list(self.feature_shape) != welcome.get("feature_shape"):
            raise ProtocolError(f"WELCOME: the cloud expects features {welcome.get('feature_shape')}, this edge's "
                                f"part makes {list(self.feature_shape)}")

    def _snapshot(self) -> None:
        self._snapshots[self.steps] = {
            "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
            "counters": (self.feature_error_sum, self.grad_error_sum, self.stats.train_samples)}
        keep_from = self.steps if self._checkpoint_step is None else min(self._checkpoint_step, self.steps)
        for k in [k for k in self._snapshots if k < keep_from]:
            del self._snapshots[k]

    def _restore(self, step: int) -> None:
        snap = self._snapshots.get(step)
        if snap is None:
            raise CollabError(f"the cloud resumed this edge at step {step}, but this edge kept its state only for "
                              f"steps {sorted(self._snapshots)} (was the cloud restarted from an older checkpoint?)")
        self.model.load_state_dict(snap["model"])
        self.optimizer.load_state_dict(copy.deepcopy(snap["optimizer"]))
        self.feature_error_sum, self.grad_error_sum, self.stats.train_samples = snap["counters"]
        self.steps = step
        for k in [k for k in self._snapshots if k > step]:
            del self._snapshots[k]

    def reconnect(self, transport: Any) -> int:
        """Continues over ``transport`` (a new connection to the cloud, possibly restarted from its checkpoint):
        HELLO with the same edge key and settings, then this edge goes back to the step the cloud holds (a
        step the cloud applied but whose reply was lost is redone next, and answered without being applied
        again). Returns the number of steps both sides now agree on."""
        try:
            self.transport.close()
        except Exception:  # the old connection is broken anyway
            pass
        self.transport = transport
        welcome, _ = self._request(HELLO, self._hello, (), WELCOME)
        if (welcome.get("model"), welcome.get("split"), welcome.get("seed")) != (self.cloud_model, self.split,
                                                                               self.seed):
            raise ArchitectureMismatch(f"the cloud now serves {welcome.get('model')!r} split at {welcome.get('split')}"
                                       f" with seed {welcome.get('seed')}, not the model this edge trains")
        self._check_welcome(welcome)
        self.edge_id = welcome.get("edge_id")
        applied = welcome.get("applied_step")
        if isinstance(applied, bool) or not isinstance(applied, int) or applied < 0:
            raise ProtocolError(f"WELCOME: bad applied_step {applied!r}")
        if applied > self.steps + 1:
            raise CollabError(f"the cloud holds {applied} steps of this edge, which has done only {self.steps}")
        self._checkpoint_step = welcome.get("checkpoint_step")
        # back to a clean copy of the state after step min(applied, steps): a failed step's forward pass moved
        # BatchNorm statistics and INT8 rounding counters, which the redone step must not see twice
        self._restore(min(applied, self.steps))
        self._new_codecs()
        self.cloud_steps = applied
        return self.steps

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
        apply_gradients(self.model, self.optimizer, out, grad)
        self.steps += 1
        self.stats.train_samples += len(y)
        self.feature_error_sum += feature_error
        self.grad_error_sum += float(reply.get("grad_rel_l2") or 0.0)
        if "checkpoint_step" in reply:
            self._checkpoint_step = reply["checkpoint_step"]
        self._snapshot()
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
        n = 0
        for i, features, labels in calibration_features(self.model, data, batches, batch_size, seed):
            meta, blobs = self._features_message(features, labels)
            meta["batch"] = i
            self._request(CALIBRATE, meta, blobs, CALIBRATED)
            n += len(labels)
        return n

    def pull_cloud_state(self) -> Tuple[Dict[str, np.ndarray], Dict[str, Any]]:
        """The cloud part's current weights (state dict) and optimizer state dict, asked of the cloud."""
        import safetensors.numpy as stn

        from ..checkpoint import _decode

        meta, blobs = self._request(PULL, {}, (), STATE)
        if len(blobs) != 1:
            raise ProtocolError(f"STATE: expected 1 blob, got {len(blobs)}")
        try:
            tensors = stn.load(blobs[0])
        except Exception as exc:  # SafetensorError: hostile or broken bytes
            raise ProtocolError(f"STATE: the weights are not valid safetensors bytes: {exc}") from None
        keys = meta.get("model_keys")
        if not isinstance(keys, list) or not all(isinstance(k, str) and f"model/{k}" in tensors for k in keys):
            raise ProtocolError("STATE: model_keys do not match the tensors sent")
        try:
            optimizer = _decode(meta.get("optimizer"), tensors)
        except (ValueError, TypeError, AttributeError) as exc:
            raise ProtocolError(f"STATE: bad optimizer state: {exc}") from None
        return {k: tensors[f"model/{k}"] for k in keys}, optimizer

    def full_model(self):
        """``(model, optimizer)``: the whole trained model (this edge's part followed by the cloud's, with the
        cloud's current weights) as one ``Sequential``, and one SGD optimizer over it carrying both parts'
        momentum, as ``edgelearn train`` would hold them."""
        cloud_state, cloud_opt = self.pull_cloud_state()
        _, cloud_part = build_split(self.model_name, self.input_shape, self.classes, self.split, self.seed)
        cloud_part.load_state_dict(cloud_state, strict=True)
        model = join_parts(self.model, cloud_part)
        group = self.optimizer.param_groups[0]
        opt = optim.SGD(list(model.parameters()), lr=group["lr"], momentum=group["momentum"],
                        weight_decay=group["weight_decay"], nesterov=group["nesterov"])
        edge_opt = self.optimizer.state_dict()
        offset = len(list(self.model.parameters()))
        state = dict(edge_opt["state"])
        state.update({int(k) + offset: v for k, v in cloud_opt["state"].items()})
        merged = {"state": state, "param_groups": [dict(edge_opt["param_groups"][0],
                                                        params=list(range(len(opt.param_groups[0]["params"]))))]}
        opt.load_state_dict(merged)
        return model, opt

    def config(self, **extra: Any) -> Dict[str, Any]:
        """What a checkpoint records about this split model (``extra.config``; see
        :func:`edgelearn.collab.split.model_from_split_config`), plus ``extra``."""
        out = {"collab": True, "model": self.model_name, "split": self.split, "init_seed": self.seed,
               "precision": self.precision, "mode": self.mode, "bits": self.bits,
               **({"feature_clip": list(self.feature_clip)} if self.feature_clip else {}),
               **({"grad_clip": list(self.grad_clip)} if self.grad_clip else {}),
               "octo": dataclasses.asdict(self.octo_config) if self.octo_config is not None else None}
        out.update(extra)
        return out

    def save(self, path: str, **config: Any) -> None:
        """Writes this edge's part (model, optimizer, step count) as a checkpoint at ``path``, atomically."""
        save_checkpoint(path, self.model, self.optimizer, step=self.steps,
                        extra={"config": self.config(part="edge", **config)})

    def save_full(self, path: str, epochs: int = 1, **config: Any) -> None:
        """Asks the cloud for its part and writes the whole model (see :meth:`full_model`) as one checkpoint
        at ``path`` that ``edgelearn train --resume --checkpoint PATH`` (and so evaluation), ``edgelearn video
        --model PATH`` and ``edgelearn export`` read. It records ``epochs`` done and a cosine schedule over
        them (``train --resume`` continues it if asked for more epochs)."""
        model, opt = self.full_model()
        scheduler = optim.CosineAnnealingLR(opt, T_max=max(int(epochs), 1))
        save_checkpoint(path, model, opt, scheduler, epoch=int(epochs), step=self.steps,
                        extra={"history": [], "config": self.config(part="full", epochs=int(epochs),
                                                                    image_shape=list(self.input_shape),
                                                                    num_classes=self.classes, **config)})

    def close(self) -> None:
        """Says BYE (the cloud counts the session as completed) and closes the transport."""
        try:
            self._request(BYE, {"steps": self.steps}, (), BYE)
        finally:
            self.transport.close()

    def summary(self) -> Dict[str, Any]:
        out = {"edge_id": self.edge_id, "mode": self.mode, "bits": self.bits if self.mode in ("uniform", "sgq")
               else (16 if self.mode == "fp16" else 32), "precision": self.precision, "steps": self.steps,
               "feature_clip": self.feature_clip, "grad_clip": self.grad_clip,
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


def apply_gradients(model, optimizer, out, grad: np.ndarray) -> None:
    """The edge's half of a step: backward from the cloud's feature gradients ``grad`` through ``out`` (the
    edge part's output), plus the LAC regulariser of an INT8 part, then one optimizer step."""
    optimizer.zero_grad()
    out.backward(grad)
    if any(hasattr(type(m), "regularization_term") for m in model.modules()):
        reg = model.regularization()
        if reg.requires_grad:
            reg.backward()
    optimizer.step()


def calibration_features(model, data: ArrayDataset, batches: int, batch_size: int, seed: int):
    """``(i, features, labels)`` of the ``batches`` seeded random batches of ``data`` that re-estimate the
    BatchNorm statistics of a split model: the edge part's own statistics move as each batch passes
    (:func:`~edgelearn.collab.split.batchnorm_calibration`), the features go to the cloud as batch ``i``."""
    n = min(len(data), batches * batch_size)
    if n == 0:
        return
    idx = np.sort(np.random.default_rng(seed).choice(len(data), size=n, replace=False))
    for i, start in enumerate(range(0, n, batch_size)):
        sel = idx[start:start + batch_size]
        with batchnorm_calibration(model, i):
            features = np.ascontiguousarray(model(tensor(data.images[sel])).data)
        yield i, features, data.labels[sel]


def train_edge(edge: Edge, train: ArrayDataset, test: Optional[ArrayDataset] = None, *, epochs: int = 1,
               steps: Optional[int] = None, batch_size: int = 64, seed: int = 0, eval_limit: Optional[int] = None,
               bn_recalibration_batches: int = 32, progress: bool = True, log_every: int = 0, log=print,
               close: bool = True, reconnect: Optional[Callable[[], Any]] = None,
               retry: RetryPolicy = RetryPolicy(), save: Optional[str] = None, save_full: Optional[str] = None,
               config: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """Trains ``edge`` for ``epochs`` epochs of ``train`` (at most ``steps`` steps in all), re-estimates the
    BatchNorm statistics of both parts on ``bn_recalibration_batches`` training batches (0: off; see
    :meth:`Edge.recalibrate_batchnorm`), then evaluates on ``test`` (the first ``eval_limit`` samples)
    through the split. Returns the edge's summary with
    ``train_loss``, ``train_accuracy``, ``test_accuracy``, ``test_loss``, ``seconds``, traffic per sample.

    Step ``k`` (0-based) always trains on batch ``k mod len(loader)`` of epoch ``k // len(loader)`` of a
    loader seeded by ``seed``, so a run that went back to an earlier step sees the same batches again. With
    ``reconnect`` (a callable returning a new transport to the cloud), a lost connection
    (:class:`~edgelearn.collab.protocol.ConnectionLost`) is retried following ``retry`` and training goes on
    from the step the cloud holds (:meth:`Edge.reconnect`); ``reconnections`` in the result counts them.
    ``save`` writes the edge part (:meth:`Edge.save`) and ``save_full`` the whole model (:meth:`Edge.save_full`;
    then ``full_model_test_accuracy`` is the accuracy of that checkpoint evaluated locally, no codec) at the
    end; ``config`` is added to what they record."""
    loader = DataLoader(train, batch_size=batch_size, shuffle=True, seed=seed)
    per_epoch = len(loader)
    total = per_epoch * epochs if steps is None else min(steps, per_epoch * epochs)
    bar = _progress_bar(total, f"edge {edge.edge_id}", progress)
    t0 = time.perf_counter()
    reconnections = [0]
    records: Dict[int, Tuple[float, int, int]] = {}  # step -> (loss * n, correct, n)
    orders: Dict[int, np.ndarray] = {}

    def batch(k: int) -> Tuple[np.ndarray, np.ndarray]:
        epoch, i = divmod(k, per_epoch)
        if epoch not in orders:
            orders.clear()
            orders[epoch] = loader.order(epoch)
        idx = orders[epoch][i * batch_size:(i + 1) * batch_size]
        return train.images[idx], train.labels[idx]

    def retrying(fn: Callable[[], Any]) -> Any:
        while True:
            try:
                return fn()
            except ConnectionLost as exc:
                if reconnect is None or retry.attempts == 0:
                    raise
                _reconnect(edge, reconnect, retry, log, exc)
                reconnections[0] += 1
                bar.n = edge.steps
                for k in [k for k in records if k > edge.steps]:
                    del records[k]

    def train_loop() -> None:
        while edge.steps < total:
            k = edge.steps
            x, y = batch(k)
            r = edge.train_step(x, y)
            records[k + 1] = (r["loss"] * r["n"], r["correct"], r["n"])
            bar.update(1)
            if log_every and edge.steps % log_every == 0:
                log(f"step {edge.steps}/{total} loss {r['loss']:.4f} feature err {r['feature_rel_l2']:.4f}")

    result: Dict[str, Any] = {}

    def run() -> None:
        # one phase, retried whole: after a reconnection the cloud may hold fewer steps than were done, so the
        # training loop first catches up (a no-op when nothing was lost), then everything after it is redone
        train_loop()
        edge.recalibrate_batchnorm(train, bn_recalibration_batches, batch_size, seed=seed + 7919)
        result["train_seconds"] = time.perf_counter() - t0
        if test is not None:
            ev = edge.evaluate(test, limit=eval_limit)
            result.update(test_accuracy=ev["accuracy"], test_loss=ev["loss"], test_samples=ev["n"])
        settings = dict(config or {}, batch_size=batch_size, data_seed=seed)
        if save:
            edge.save(save, **settings)
            result["saved"] = save
        if save_full:
            edge.save_full(save_full, epochs=-(-total // per_epoch) if total else 0, **settings)
            result["saved_full"] = save_full
        if close:
            edge.close()

    try:
        retrying(run)
        last_epoch = (total - 1) // per_epoch if total else 0
        last = [v for k, v in records.items() if (k - 1) // per_epoch == last_epoch]
        seen = sum(v[2] for v in last)
        result.update(train_loss=sum(v[0] for v in last) / max(seen, 1),
                      train_accuracy=sum(v[1] for v in last) / max(seen, 1), epochs=epochs, batch_size=batch_size,
                      reconnections=reconnections[0])
        if save_full and test is not None:
            from ..checkpoint import load_checkpoint
            from ..train import evaluate
            from .split import model_from_split_config

            rebuilt = model_from_split_config(edge.config(), edge.input_shape, edge.classes)
            load_checkpoint(save_full, rebuilt)
            result["full_model_test_accuracy"] = evaluate(rebuilt, _first(test, eval_limit))["accuracy"]
    finally:
        bar.close()
    summary = edge.summary()
    summary.update(result)
    return summary


def _first(data: ArrayDataset, limit: Optional[int]) -> ArrayDataset:
    if limit is None or limit >= len(data):
        return data
    return ArrayDataset(data.images[:limit], data.labels[:limit], data.name, data.classes)


def _reconnect(edge: Edge, connect: Callable[[], Any], policy: RetryPolicy, log, cause: Exception) -> None:
    log(f"lost the cloud ({cause}); reconnecting (up to {policy.attempts} attempts)")
    last: Exception = cause
    for attempt, delay in enumerate(policy.delays(), 1):
        time.sleep(delay)
        try:
            transport = connect()
        except ConnectionLost as exc:
            last = exc
            continue
        try:
            steps = edge.reconnect(transport)
        except ConnectionLost as exc:
            last = exc
            continue
        redo = (f"; its reply to step {edge.cloud_steps} was lost: redoing it (answered, not applied again)"
                if edge.cloud_steps > steps else "")
        log(f"reconnected (attempt {attempt}): the cloud holds {edge.cloud_steps} steps of this edge; continuing "
            f"from step {steps}{redo}")
        return
    raise ConnectionLost(f"gave up after {policy.attempts} reconnection attempts: {last}")
