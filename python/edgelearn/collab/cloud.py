"""The cloud side of split learning: one cloud model trained by any number of edge sessions.

:class:`Cloud` owns the cloud part of the model and its optimizer. Each connected edge gets a
:class:`CloudSession` (its codec settings, gradient codec, step counter and traffic counters: state that is
never shared). A session turns one request envelope into one reply envelope (:meth:`CloudSession.handle`);
the transport (gRPC, or a direct call in-process) only moves bytes.

Concurrency and atomicity: a training step (forward, loss, backward, optimizer step) runs entirely under
``Cloud.lock`` with no I/O inside, so steps of different edges are serialized and the model is only ever
seen between whole steps. Everything an edge sends is decoded and validated *before* the lock is taken,
and a step whose loss or gradients are not finite is refused before the optimizer runs. An edge that goes
away mid-message loses that message (its partial chunks are dropped); one that goes away while its step
runs gets that step applied whole and the reply discarded. Either way the model never holds half a step.

Exactly-once steps across reconnects and restarts: an edge names itself with a stable ``edge_key`` in HELLO
and numbers its TRAIN messages (``step`` = 1, 2, ...). The cloud keeps an :class:`EdgeRecord` per key: the
number of that edge's steps applied and the (float32) feature gradients of the last one. A TRAIN for the next
step is applied; a TRAIN repeating the last applied step (the edge never got the reply) is answered from the
record without touching the model; anything else is refused. With ``checkpoint=DIR`` the cloud writes
``DIR/cloud.safetensors`` (model, optimizer, step count, every edge record) atomically every
``checkpoint_every`` steps, inside the step's lock (so it holds whole steps only), and on
:meth:`Cloud.save_checkpoint`; ``resume=True`` starts from it. GRAD replies tell the edge which of its steps
the latest checkpoint holds (``checkpoint_step``), so it keeps its own state from that step on and can roll
back to it when a restarted cloud resumes there.
"""

from __future__ import annotations

import hashlib
import os
import threading
import time
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

from .. import checkpoint as ckpt
from .. import optim, sgq
from ..functional import cross_entropy
from ..models import MODEL_NAMES
from ..tensor import Tensor, no_grad
from .codec import MODES, TensorCodec, relative_l2
from .protocol import (BYE, CALIBRATE, CALIBRATED, EVAL, EVAL_RESULT, GRAD, HELLO, KIND_NAMES, PULL, STATE, TRAIN,
                       WELCOME, MAX_INPUT_ELEMENTS, CollabError, ProtocolError, WireStats, pack, unpack)
from .split import batchnorm_calibration, build_split, is_model_spec, output_shape, split_spec

__all__ = ["Cloud", "CloudSession", "EdgeRecord", "ArchitectureMismatch", "InputTooLarge", "LABEL_DTYPES",
           "CHECKPOINT_NAME", "MAX_INPUT_ELEMENTS", "MAX_CLASSES", "architecture_digest"]

#: File name of the cloud's checkpoint inside ``--checkpoint DIR``.
CHECKPOINT_NAME = "cloud.safetensors"
_MAX_KEY = 128


def architecture_digest(module) -> str:
    """SHA-256 (hex, first 16 digits) of a module's state-dict names, shapes and dtypes: what an edge compares
    with the cloud's announcement to know it built the same part of the same model."""
    h = hashlib.sha256()
    for name, value in module.state_dict().items():
        arr = np.asarray(value)
        h.update(f"{name}:{arr.dtype.str}:{arr.shape};".encode())
    return h.hexdigest()[:16]


class EdgeRecord:
    """What the cloud remembers of one edge (by its ``edge_key``) across its connections and the cloud's own
    restarts: ``applied`` steps, the feature gradients and reply of the last one (to answer a repeated
    TRAIN), and ``checkpointed``: ``applied`` as of the latest checkpoint (``None`` without checkpoints)."""

    def __init__(self, key: str, applied: int = 0, checkpointed: Optional[int] = None):
        self.key = key
        self.applied = int(applied)
        self.checkpointed = checkpointed
        self.last_grad: Optional[np.ndarray] = None
        self.last_reply: Optional[Dict[str, Any]] = None
        self.owner: Optional[int] = None  # edge_id of the session driving it

#: Label encodings an edge may use (one byte per label when there are at most 256 classes).
LABEL_DTYPES = {"u1": np.uint8, "<u2": np.uint16, "<i4": np.int32}


#: Cap on the class count a HELLO may fix (the last layer grows with it).
MAX_CLASSES = 1 << 12


class ArchitectureMismatch(CollabError):
    """An edge's data or settings do not fit the cloud's model (gRPC: FAILED_PRECONDITION)."""


class InputTooLarge(CollabError):
    """A HELLO asks for a model larger than this cloud's limits (gRPC: RESOURCE_EXHAUSTED)."""


class Cloud:
    """The cloud part of ``model`` split at ``split``, with an SGD (Nesterov momentum) optimizer.

    The architecture needs the input shape and class count: give ``input_shape``/``classes`` here, or let the
    first edge's HELLO fix them (later edges must match). ``seed`` initialises the full model, exactly as an
    unsplit run with that seed would; edges build their part from the same seed (sent in WELCOME).
    """

    def __init__(self, model: str = "cnn", split: int = 4, seed: int = 0, lr: float = 0.02, momentum: float = 0.9,
                 weight_decay: float = 5e-4, input_shape: Optional[Tuple[int, int, int]] = None,
                 classes: Optional[int] = None, max_batch: int = 4096, log=None, checkpoint: Optional[str] = None,
                 checkpoint_every: int = 0, resume: bool = False, max_input_elements: int = MAX_INPUT_ELEMENTS):
        if not is_model_spec(model):
            raise ValueError(f"model: expected one of {MODEL_NAMES} or onnx:PATH, got {model!r}")
        self.model_name, self.split, self.seed = model, split_spec(split), int(seed)
        # checked now, not at the first HELLO (the model is built then)
        self.lr = optim._hyper("Cloud", "lr", lr)
        self.momentum = optim._hyper("Cloud", "momentum", momentum)
        self.weight_decay = optim._hyper("Cloud", "weight_decay", weight_decay)
        self.max_batch = int(max_batch)
        if isinstance(max_input_elements, bool) or not isinstance(max_input_elements, int) or max_input_elements < 1:
            raise ValueError(f"max_input_elements: expected an int >= 1, got {max_input_elements!r}")
        self.max_input_elements = max_input_elements
        self.log = log or (lambda message: None)
        #: Serializes model updates (and the forwards/backwards that produce them).
        self.lock = threading.Lock()
        self.model = None
        self.optimizer = None
        self.input_shape: Optional[Tuple[int, ...]] = None
        self.classes: Optional[int] = None
        self.feature_shape: Optional[Tuple[int, ...]] = None
        self.steps = 0
        self._sessions_lock = threading.Condition()
        self._next_id = 1
        self.active: Dict[int, "CloudSession"] = {}
        self.ended: List[Dict[str, Any]] = []
        self.records: Dict[str, EdgeRecord] = {}
        if isinstance(checkpoint_every, bool) or not isinstance(checkpoint_every, int) or checkpoint_every < 0:
            raise ValueError(f"checkpoint_every: expected an int >= 0, got {checkpoint_every!r}")
        if (checkpoint_every or resume) and not checkpoint:
            raise ValueError("checkpoint_every and resume need a checkpoint directory")
        self.checkpoint_dir = os.fspath(checkpoint) if checkpoint else None
        self.checkpoint_every = checkpoint_every
        self.checkpoint_steps: Optional[int] = None  # cloud steps in the latest checkpoint written or loaded
        if (input_shape is None) != (classes is None):
            raise ValueError("input_shape and classes: give both or neither")
        path = self.checkpoint_path
        if resume and path and os.path.exists(path):
            self._resume(path, input_shape, classes)
        elif input_shape is not None:
            self._build(tuple(int(v) for v in input_shape), int(classes))
        if resume and path and not os.path.exists(path):
            self.log(f"no checkpoint at {path} yet: starting from scratch")

    @property
    def checkpoint_path(self) -> Optional[str]:
        return os.path.join(self.checkpoint_dir, CHECKPOINT_NAME) if self.checkpoint_dir else None

    def _settings(self) -> Dict[str, Any]:
        return {"model": self.model_name, "split": self.split, "seed": self.seed, "lr": self.lr,
                "momentum": self.momentum, "weight_decay": self.weight_decay,
                "input_shape": list(self.input_shape) if self.input_shape else None, "classes": self.classes}

    def _resume(self, path: str, input_shape, classes) -> None:
        state, meta = ckpt.read_checkpoint(path)
        extra = meta.get("extra") or {}
        saved = extra.get("cloud") or {}
        for key, own in (("model", self.model_name), ("split", self.split), ("seed", self.seed)):
            if saved.get(key) != own:
                raise ValueError(f"{path}: the checkpoint is of {key} {saved.get(key)!r}, this cloud was started "
                                 f"with {key} {own!r} (start it with the checkpoint's settings)")
        shape, n = saved.get("input_shape"), saved.get("classes")
        if shape is None:  # checkpointed before any edge fixed the architecture
            if input_shape is not None:
                self._build(tuple(int(v) for v in input_shape), int(classes))
            return
        if input_shape is not None and (tuple(input_shape), classes) != (tuple(shape), n):
            raise ValueError(f"{path}: the checkpoint is for input {tuple(shape)} with {n} classes, not "
                             f"{tuple(input_shape)} with {classes}")
        self._build(tuple(int(v) for v in shape), int(n))
        ckpt.load_model_state(self.model, state, path)
        try:
            self.optimizer.load_state_dict(meta["optimizer"])
        except (ValueError, TypeError, KeyError) as exc:
            raise ckpt.CheckpointError(f"{path}: optimizer state does not fit: {exc}") from None
        self.steps = self.checkpoint_steps = int(meta["step"])
        grads = extra.get("grads") or {}
        for key, rec in (extra.get("edges") or {}).items():
            record = EdgeRecord(key, rec["applied"], rec["applied"])
            if key in grads and rec.get("reply") is not None:
                record.last_grad = np.array(grads[key], dtype=np.float32)
                record.last_reply = rec["reply"]
            self.records[key] = record
        self.log(f"resumed from {path}: {self.steps} steps applied, {len(self.records)} edges known "
                 f"({', '.join(f'{k}: {r.applied}' for k, r in self.records.items()) or 'none'})")

    def save_checkpoint(self) -> Optional[str]:
        """Writes the checkpoint now (between steps); returns its path (None without a checkpoint directory or
        before the model exists)."""
        with self.lock:
            return self._save_locked()

    def _save_locked(self) -> Optional[str]:
        path = self.checkpoint_path
        if path is None or self.model is None:
            return None
        edges = {k: {"applied": r.applied, "reply": r.last_reply} for k, r in self.records.items()}
        grads = {k: r.last_grad for k, r in self.records.items() if r.last_grad is not None}
        ckpt.save_checkpoint(path, self.model, self.optimizer, step=self.steps,
                             extra={"cloud": self._settings(), "edges": edges, "grads": grads,
                                    "architecture": architecture_digest(self.model)})
        self.checkpoint_steps = self.steps
        for r in self.records.values():
            r.checkpointed = r.applied
        return path

    def _build(self, input_shape: Tuple[int, ...], classes: int) -> None:
        edge, cloud = build_split(self.model_name, input_shape, classes, self.split, self.seed)
        self.input_shape, self.classes = input_shape, classes
        self.feature_shape = output_shape(edge, input_shape)
        self.edge_digest = architecture_digest(edge)
        self.model = cloud
        self.params = list(cloud.parameters())
        self.optimizer = optim.SGD(self.params, lr=self.lr, momentum=self.momentum,
                                   weight_decay=self.weight_decay, nesterov=self.momentum > 0)

    def ensure_model(self, input_shape: Tuple[int, ...], classes: int) -> None:
        """Builds the model for the first edge; refuses an edge whose data does not fit it."""
        with self.lock:
            if self.model is None:
                values = int(np.prod(input_shape))
                if values > self.max_input_elements:
                    raise InputTooLarge(
                        f"input shape {list(input_shape)} ({values} values per sample) is above this cloud's limit of "
                        f"{self.max_input_elements} (--max-input-elements; or start the cloud with --dataset to fix "
                        "the shape)")
                if classes > MAX_CLASSES:
                    raise InputTooLarge(f"{classes} classes is above this cloud's limit of {MAX_CLASSES}")
                self._build(input_shape, classes)
                self.log(f"cloud model: {self.model_name} split at {self.split}, input {input_shape}, "
                         f"{classes} classes, features {self.feature_shape}")
            elif (self.input_shape, self.classes) != (input_shape, classes):
                raise ArchitectureMismatch(
                    f"this cloud trains {self.model_name} for input {self.input_shape} with {self.classes} classes; "
                    f"the edge has input {input_shape} with {classes} classes")

    # --- sessions ------------------------------------------------------------------------------------------
    def record(self, key: str, session: "CloudSession") -> EdgeRecord:
        """The record of edge ``key``, now driven by ``session`` (a newer connection of the same edge takes it
        over; a dropped session of it no longer counts as ended)."""
        with self._sessions_lock:
            rec = self.records.get(key)
            if rec is None:
                rec = self.records[key] = EdgeRecord(key, 0, 0 if self.checkpoint_dir else None)
            rec.owner = session.edge_id
            self.ended = [e for e in self.ended if not (e.get("edge_key") == key and e["status"] == "dropped")]
        return rec

    def open_session(self, peer: str = "in-process") -> "CloudSession":
        with self._sessions_lock:
            session = CloudSession(self, self._next_id, peer)
            self._next_id += 1
            self.active[session.edge_id] = session
        return session

    def close_session(self, session: "CloudSession", status: str, reason: str = "") -> Dict[str, Any]:
        """Ends a session as ``completed`` (said BYE), ``dropped`` (went away) or ``rejected`` (broke the
        protocol). Returns its summary, also kept in :attr:`ended`."""
        summary = session.summary(status, reason)
        with self._sessions_lock:
            if self.active.pop(session.edge_id, None) is None:
                return summary
            self.ended.append(summary)
            self._sessions_lock.notify_all()
        return summary

    def record_refusal(self, peer: str, reason: str) -> Dict[str, Any]:
        """Counts a call refused before any session began (a wrong or missing token) as a ``rejected`` session
        in :attr:`ended`, so ``--edges N`` and the summary see it."""
        with self._sessions_lock:
            summary = {"edge_id": None, "name": f"edge at {peer}", "peer": peer, "status": "rejected", "steps": 0,
                       "reason": reason}
            self.ended.append(summary)
            self._sessions_lock.notify_all()
        return summary

    def wait_ended(self, count: int, timeout: Optional[float] = None) -> bool:
        """Blocks until ``count`` sessions have ended (any way); False on timeout."""
        with self._sessions_lock:
            return self._sessions_lock.wait_for(lambda: len(self.ended) >= count, timeout)

    def state_dict(self) -> Dict[str, np.ndarray]:
        """A consistent copy of the cloud model's state (taken between steps)."""
        with self.lock:
            return self.model.state_dict() if self.model is not None else {}


class CloudSession:
    """One edge's conversation with the cloud. Not thread-safe: one transport stream drives it."""

    def __init__(self, cloud: Cloud, edge_id: int, peer: str):
        self.cloud, self.edge_id, self.peer = cloud, edge_id, peer
        self.name = f"edge-{edge_id}"
        self.settings: Optional[Dict[str, Any]] = None
        self.feature_codec: Optional[TensorCodec] = None
        self.grad_codec: Optional[TensorCodec] = None
        self.stats = WireStats()
        self.steps = 0
        self.grad_error_sum = 0.0
        self.calibration_batches = 0
        self.record: Optional[EdgeRecord] = None
        self.finished = False
        self.started = time.time()

    def handle(self, message: bytes) -> bytes:
        """The reply to one request envelope. Raises :class:`ProtocolError` (or ``sgq.FrameError``) for bad
        input and :class:`ArchitectureMismatch` for an edge that does not fit; the model is untouched then."""
        kind, meta, blobs = unpack(message)
        self.stats.count("up", kind, len(message))
        if self.finished:
            raise ProtocolError(f"{KIND_NAMES[kind]} after BYE")
        if kind == HELLO:
            reply = self._hello(meta)
        elif self.settings is None:
            raise ProtocolError(f"{KIND_NAMES[kind]} before HELLO")
        elif self.record.owner != self.edge_id:
            raise ProtocolError(f"{KIND_NAMES[kind]} on a connection superseded by a newer one of the same edge")
        elif kind == TRAIN:
            reply = self._train(meta, blobs)
        elif kind == EVAL:
            reply = self._eval(meta, blobs)
        elif kind == CALIBRATE:
            reply = self._calibrate(meta, blobs)
        elif kind == PULL:
            reply = self._pull()
        elif kind == BYE:
            self.finished = True
            reply = pack(BYE, {"steps": self.steps})
        else:
            raise ProtocolError(f"unexpected {KIND_NAMES[kind]} from an edge")
        self.stats.count("down", unpack_kind(reply), len(reply))
        return reply

    def _hello(self, meta: Dict[str, Any]) -> bytes:
        if self.settings is not None:
            raise ProtocolError("second HELLO in one session")
        cloud = self.cloud
        input_shape = _int_list(meta.get("input_shape"), "input_shape", 3, 3)
        classes = _int_field(meta, "classes", 2, 1 << 16)
        mode = meta.get("mode")
        if mode not in MODES:
            raise ProtocolError(f"mode: expected one of {MODES}, got {mode!r}")
        bits = _int_field(meta, "bits", 1, 8)
        group = _int_field(meta, "group", 1, 1 << 16)
        stripe_rows = meta.get("stripe_rows")
        if stripe_rows is not None:
            stripe_rows = _int_field(meta, "stripe_rows", 1, 1 << 16)
        for key, own in (("model", cloud.model_name), ("split", cloud.split)):
            if key == "model" and str(meta.get(key)).startswith("onnx:") and own.startswith("onnx:"):
                continue  # its own copy of the file: the edge checks the architecture digest of its part
            if meta.get(key) is not None and meta[key] != own:
                raise ArchitectureMismatch(f"the edge asked for {key} {meta[key]!r}; this cloud serves {key} {own!r}")
        key = meta.get("edge_key")
        if key is not None and (not isinstance(key, str) or not 1 <= len(key) <= _MAX_KEY):
            raise ProtocolError(f"edge_key: expected a string of 1 to {_MAX_KEY} characters, got {key!r}")
        cloud.ensure_model(tuple(input_shape), classes)
        if isinstance(meta.get("name"), str) and meta["name"]:
            self.name = f"{meta['name'][:64]} (edge-{self.edge_id})"
        self.record = cloud.record(key if key is not None else f"anonymous-{self.edge_id}", self)
        send_order = meta.get("send_order", "changed")
        if send_order not in ("changed", "always"):
            raise ProtocolError(f"send_order: expected 'changed' or 'always', got {send_order!r}")
        try:
            grad_clip = sgq.parse_clip(meta.get("grad_clip"))
        except (TypeError, ValueError) as exc:
            raise ProtocolError(f"grad_clip: {exc}") from None
        if grad_clip is not None and mode != "sgq":
            raise ProtocolError(f"grad_clip: range clipping only applies to mode 'sgq', not {mode!r}")
        self.settings = {"mode": mode, "bits": bits, "group": group, "stripe_rows": stripe_rows,
                         "grad_clip": grad_clip}
        self.feature_codec = TensorCodec(mode, bits, group, stripe_rows)
        self.grad_codec = TensorCodec(mode, bits, group, stripe_rows, rounding="stochastic",
                                      seed=(cloud.seed * 1_000_003 + self.edge_id) % (1 << 63),
                                      send_order=send_order, clip=grad_clip)
        clipped = f", clipped to {grad_clip[0]} {grad_clip[1]:g}" if grad_clip else ""
        detail = {"sgq": f", {bits} bits, gradients in groups of {group}, stripes of {stripe_rows or 'H/4'} rows"
                         f"{clipped}",
                  "uniform": f", {bits} bits"}.get(mode, "")
        cloud.log(f"{self.name} joined from {self.peer}: mode {mode}{detail}")
        if self.record.applied:
            cloud.log(f"{self.name} resumes: {self.record.applied} of its steps applied"
                      + (f", {self.record.checkpointed} in the checkpoint" if self.record.checkpointed is not None
                         else ""))
        return pack(WELCOME, {"edge_id": self.edge_id, "model": cloud.model_name, "split": cloud.split,
                              "seed": cloud.seed, "feature_shape": list(cloud.feature_shape),
                              "input_shape": list(cloud.input_shape), "classes": cloud.classes,
                              "edge_key": self.record.key, "applied_step": self.record.applied,
                              "checkpoint_step": self.record.checkpointed,
                              "architecture": cloud.edge_digest})

    def _batch(self, meta: Dict[str, Any], blobs: List[bytes]) -> Tuple[np.ndarray, np.ndarray]:
        """Decoded, validated features and labels of a TRAIN/EVAL message."""
        if len(blobs) != 2:
            raise ProtocolError(f"expected 2 blobs (features, labels), got {len(blobs)}")
        shape = _int_list(meta.get("shape"), "shape", 2, 4)
        expected = self.cloud.feature_shape
        if tuple(shape[1:]) != expected or not 1 <= shape[0] <= self.cloud.max_batch:
            raise ProtocolError(f"features of shape {tuple(shape)}; expected (N, {', '.join(map(str, expected))}) "
                                f"with 1 <= N <= {self.cloud.max_batch}")
        features = self.feature_codec.decode(blobs[0], shape, "features")
        dtype = LABEL_DTYPES.get(meta.get("labels"))
        if dtype is None:
            raise ProtocolError(f"labels: unknown encoding {meta.get('labels')!r}; expected one of {list(LABEL_DTYPES)}")
        if len(blobs[1]) != shape[0] * np.dtype(dtype).itemsize:
            raise ProtocolError(f"labels: {len(blobs[1])} bytes for {shape[0]} samples of {meta['labels']}")
        labels = np.frombuffer(blobs[1], dtype=dtype).astype(np.int64)
        if labels.min() < 0 or labels.max() >= self.cloud.classes:
            raise ProtocolError(f"labels: values must lie in [0, {self.cloud.classes}), got "
                                f"[{labels.min()}, {labels.max()}]")
        return features, labels

    def _train(self, meta: Dict[str, Any], blobs: List[bytes]) -> bytes:
        features, labels = self._batch(meta, blobs)
        cloud, rec = self.cloud, self.record
        step = meta.get("step")
        if step is not None:
            step = _int_field(meta, "step", 1, 1 << 40)
            if step == rec.applied and rec.last_grad is not None and rec.last_grad.shape == features.shape:
                return self._replay()
            if step != rec.applied + 1:
                raise ProtocolError(f"TRAIN step {step}: this cloud has applied {rec.applied} steps of "
                                    f"{rec.key!r}, so it expects step {rec.applied + 1}")
        with cloud.lock:  # the whole step, nothing else: no I/O while the model is between states
            model = cloud.model
            model.train()
            # BatchNorm running statistics move during the forward pass: keep them to undo a refused step
            buffers = {name: np.array(b, copy=True) for name, b in model.named_buffers()}
            try:
                x = Tensor(features, requires_grad=True)
                logits = model(x)
                loss = cross_entropy(logits, labels)
                loss_value = float(loss.item())
                cloud.optimizer.zero_grad()
                if not np.isfinite(loss_value):
                    raise ProtocolError(f"step refused: the loss is {loss_value} (features out of range?)")
                loss.backward()
                grad = x.grad.data
                if not np.isfinite(grad).all() or not all(
                        p.grad is None or np.isfinite(p.grad.data).all() for p in cloud.params):
                    raise ProtocolError("step refused: non-finite gradients (features out of range?)")
            except BaseException:
                cloud.optimizer.zero_grad()
                for name, b in model.named_buffers():
                    np.copyto(b, buffers[name])
                raise
            cloud.optimizer.step()
            cloud.steps += 1
            correct = int((np.argmax(logits.data, axis=1) == labels).sum())
            rec.applied += 1
            rec.last_grad = np.array(grad, dtype=np.float32, copy=True)
            rec.last_reply = {"loss": loss_value, "correct": correct, "n": len(labels)}
            if cloud.checkpoint_every and cloud.steps % cloud.checkpoint_every == 0:
                cloud._save_locked()
        self.steps += 1
        self.stats.train_samples += len(labels)
        return self._grad_reply(grad, rec.last_reply)

    def _grad_reply(self, grad: np.ndarray, reply: Dict[str, Any], replayed: bool = False) -> bytes:
        blob = self.grad_codec.encode(grad)
        error = relative_l2(self.grad_codec.decode_sent(blob, grad.shape, "gradients"), grad)
        self.grad_error_sum += error
        meta = {"step": self.record.applied, "loss": reply["loss"], "correct": reply["correct"], "n": reply["n"],
                "grad_rel_l2": error, "shape": list(grad.shape), "checkpoint_step": self.record.checkpointed}
        if replayed:
            meta["replayed"] = True
        return pack(GRAD, meta, [blob])

    def _replay(self) -> bytes:
        """The reply to a step already applied (its reply was lost with the connection): the stored gradients,
        the model untouched."""
        rec = self.record
        self.cloud.log(f"{self.name}: step {rec.applied} was applied before the connection broke; "
                       "answering it again without applying it twice")
        return self._grad_reply(rec.last_grad, rec.last_reply, replayed=True)

    def _pull(self) -> bytes:
        """The cloud part's weights and optimizer state (``join --save-full``)."""
        import safetensors.numpy as stn

        cloud = self.cloud
        tensors: Dict[str, np.ndarray] = {}
        with cloud.lock:
            state = cloud.model.state_dict()
            for name, value in state.items():
                tensors[f"model/{name}"] = ckpt._contiguous(np.asarray(value))
            opt = ckpt._encode(cloud.optimizer.state_dict(), "optimizer", tensors)
            steps = cloud.steps
        return pack(STATE, {"model_keys": list(state), "optimizer": opt, "steps": steps,
                            "applied": self.record.applied}, [stn.save(tensors)])

    def _eval(self, meta: Dict[str, Any], blobs: List[bytes]) -> bytes:
        features, labels = self._batch(meta, blobs)
        cloud = self.cloud
        with cloud.lock:
            cloud.model.eval()
            try:
                with no_grad():
                    logits = cloud.model(Tensor(features))
            finally:
                cloud.model.train()
        loss_sum = float(cross_entropy(logits, labels, reduction="sum").item())
        correct = int((np.argmax(logits.data, axis=1) == labels).sum())
        self.stats.eval_samples += len(labels)
        return pack(EVAL_RESULT, {"loss_sum": loss_sum, "correct": correct, "n": len(labels)})

    def _calibrate(self, meta: Dict[str, Any], blobs: List[bytes]) -> bytes:
        batch = meta.get("batch")
        if batch not in (0, self.calibration_batches):
            raise ProtocolError(f"CALIBRATE batch {batch!r}: expected 0 (start) or {self.calibration_batches} (next)")
        features, _ = self._batch(meta, blobs)
        cloud = self.cloud
        with cloud.lock, batchnorm_calibration(cloud.model, batch):
            cloud.model(Tensor(features))
        self.calibration_batches = batch + 1
        return pack(CALIBRATED, {"batch": batch})

    def summary(self, status: str, reason: str = "") -> Dict[str, Any]:
        out = {"edge_id": self.edge_id, "name": self.name, "peer": self.peer, "status": status, "steps": self.steps,
               "edge_key": self.record.key if self.record else None,
               "applied": self.record.applied if self.record else 0,
               "settings": self.settings, "seconds": time.time() - self.started,
               "grad_rel_l2": self.grad_error_sum / self.steps if self.steps else None}
        if reason:
            out["reason"] = reason
        out.update(self.stats.summary())
        return out


def unpack_kind(message: bytes) -> int:
    """The kind byte of an envelope this side packed."""
    return message[5]


def _int_field(meta: Dict[str, Any], key: str, lo: int, hi: int) -> int:
    value = meta.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise ProtocolError(f"{key}: expected an int in [{lo}, {hi}], got {value!r}")
    return value


def _int_list(value: Any, key: str, min_len: int, max_len: int) -> List[int]:
    if not isinstance(value, list) or not min_len <= len(value) <= max_len or not all(
            isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= 1 << 24 for v in value):
        raise ProtocolError(f"{key}: expected {min_len} to {max_len} positive ints, got {value!r}")
    return value
