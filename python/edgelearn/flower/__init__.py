"""Split learning on Flower: the edge part of a model trains in a Flower ``ClientApp`` on each SuperNode, the cloud
part in the ``ServerApp``, and features and gradients travel over Flower's Message API as SGQ frames.

``pip install "edgelearn[flower]"``. The apps are :data:`edgelearn.flower.app.client_app` and
:data:`edgelearn.flower.app.server_app`; :func:`write_app` writes the Flower App directory (its
``pyproject.toml``) that ``flwr run`` sends to a SuperLink. The same code runs the cloud side as
``edgelearn collab serve`` (:class:`edgelearn.collab.Cloud`, one session per SuperNode, the same envelopes
and byte counts), so for the same settings the two give the same accuracy and bytes per sample.

On the wire (the Message API's ``Array``):

- features (ClientApp -> ServerApp) and feature gradients (ServerApp -> ClientApp) are one ``Array`` each,
  ``dtype="float32"``, ``shape`` the tensor's shape, and ``stype`` :data:`STYPE_FRAME` (``"edgelearn.sgq.v1"``):
  ``data`` is one SGQ frame exactly as :func:`edgelearn.sgq.encode` writes it (modes ``sgq``, ``uniform``,
  ``fp16``; header with magic, version, shape, bits, CRC32; see ``docs/sgq.md``), or, in mode ``fp32``,
  ``stype`` :data:`STYPE_RAW` (``"edgelearn.f32le"``): raw little-endian float32 bytes. As in ``edgelearn
  collab``, a gradient frame carries its channel order only when it changed; the ClientApp keeps the order
  received so far in ``context.state``.
- labels travel as a ``uint8`` (or ``int32``) ``numpy.ndarray`` Array; everything else in a ``ConfigRecord``.

Message flow per SuperNode (each arrow one Message and its reply): ``query.hello`` (the node's data shape),
then per step ``train.split`` (gradients of the previous step down, features of this step up), then
``train.calibrate`` (gradients of the last step down; BatchNorm re-estimation features up), then
``evaluate.split`` (test features up; the ServerApp reports accuracy). A ClientApp keeps no Python objects
between messages: the edge part's state lives in ``context.state``, and a step's backward pass recomputes its
forward pass from the state saved before it (deterministic, checked by a digest of the features sent).
"""

from __future__ import annotations

import os
from typing import Any, Dict, Optional

__all__ = ["STYPE_FRAME", "STYPE_RAW", "DEFAULT_CONFIG", "write_app"]

#: ``Array.stype`` of an SGQ frame (modes sgq, uniform, fp16): the bytes are one :func:`edgelearn.sgq.encode` frame.
STYPE_FRAME = "edgelearn.sgq.v1"
#: ``Array.stype`` of raw little-endian float32 bytes (mode fp32, no codec).
STYPE_RAW = "edgelearn.f32le"

#: The run configuration of the Flower App and its defaults (``flwr run ... --run-config 'bits=2 steps=100'``).
#: ``feature-clip``/``grad-clip`` are SGQ range clips as ``edgelearn collab join --feature-clip`` takes them
#: ("" none, "sigma:2.5"), ``stripe-rows``/``feature-stripe-rows`` 0 mean H/4, ``eval-limit`` 0 all test images, ``steps`` 0 the
#: whole ``epochs``, ``result-file`` "" no file (the ServerApp also logs its summary); the ServerApp waits up
#: to ``wait-nodes-s`` seconds for ``min-nodes`` SuperNodes, then trains with every node connected.
DEFAULT_CONFIG: Dict[str, Any] = {
    "model": "cnn", "split": 4, "dataset": "digits", "seed": 0, "lr": 0.02,
    "mode": "sgq", "bits": 4, "group": 4, "stripe-rows": 0,
    "feature-group": 1, "feature-stripe-rows": 1, "feature-ranges": "frame", "constant-blocks": True,
    "feature-clip": "", "grad-clip": "", "precision": "int8", "epochs": 1, "steps": 0, "batch-size": 64, "eval-limit": 0,
    "bn-recalibration-batches": 32, "result-file": "", "min-nodes": 1, "wait-nodes-s": 60.0,
}


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


def write_app(directory: "os.PathLike[str] | str", **config: Any) -> str:
    """Writes the Flower App directory for ``flwr run``: a ``pyproject.toml`` whose components are
    :mod:`edgelearn.flower.app`'s ``server_app`` and ``client_app`` and whose run configuration is
    :data:`DEFAULT_CONFIG` updated with ``config`` (Python names: ``batch_size=32`` sets ``batch-size``).
    Returns the directory. The SuperLink and SuperNodes need ``edgelearn[flower]`` installed."""
    values = dict(DEFAULT_CONFIG)
    for key, value in config.items():
        key = key.replace("_", "-")
        if key not in values:
            raise ValueError(f"{key}: not a run configuration key of the edgelearn Flower App "
                             f"(known: {', '.join(values)})")
        values[key] = value
    directory = os.fspath(directory)
    os.makedirs(directory, exist_ok=True)
    from .. import __version__

    lines = [
        "# The edgelearn split-learning Flower App: `flwr run . <superlink-connection>` sends it to a SuperLink.",
        "[build-system]", 'requires = ["hatchling"]', 'build-backend = "hatchling.build"', "",
        "[project]", 'name = "edgelearn-split"', 'version = "1.0.0"',
        'description = "Split learning with edgelearn: the edge part on SuperNodes, the cloud part in the ServerApp"',
        'license = "MIT OR Apache-2.0"',
        f'dependencies = ["edgelearn[flower]=={__version__}"]', "",
        "[tool.hatch.build.targets.wheel]", 'packages = ["."]', "",
        "[tool.flwr.app]", 'publisher = "edgelearn"', "",
        "[tool.flwr.app.components]", 'serverapp = "edgelearn.flower.app:server_app"',
        'clientapp = "edgelearn.flower.app:client_app"', "",
        "[tool.flwr.app.config]",
        *(f'{k} = {_toml_value(v)}' for k, v in values.items()), "",
    ]
    with open(os.path.join(directory, "pyproject.toml"), "w") as f:
        f.write("\n".join(lines))
    return directory


def __getattr__(name: str) -> Optional[Any]:
    if name in ("client_app", "server_app"):
        from . import app

        return getattr(app, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
