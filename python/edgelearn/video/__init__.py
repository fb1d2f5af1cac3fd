"""``edgelearn.video``: video inference helpers.

- :class:`PatchSkipRunner` runs a conv net over a stream of frames recomputing only the regions that changed
  (PASS-style patch skipping, real sparse compute in Rust, FP32 and INT8 convs); :func:`preprocess` turns a
  video frame into the model's input the way the runner does.
- :func:`frames` decodes a video file or a camera to uint8 RGB frames (PyAV or OpenCV).
- :mod:`.pipeline` runs a clip densely and with patch skipping side by side (``edgelearn video``).
- :func:`synthetic_clip` makes a static-camera clip with moving objects (tests, benchmarks, demos).
"""

from . import pipeline
from .decode import VideoError, VideoReader, frames
from .pipeline import rel_l2
from .runner import PatchSkipRunner, UnsupportedLayerError, preprocess
from .synthetic import synthetic_clip, write_clip

__all__ = [
    "PatchSkipRunner",
    "UnsupportedLayerError",
    "VideoError",
    "VideoReader",
    "frames",
    "preprocess",
    "rel_l2",
    "synthetic_clip",
    "write_clip",
]
