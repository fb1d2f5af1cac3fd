"""``edgelearn.video``: video inference helpers.

- :class:`PatchSkipRunner` runs a conv net over a stream of frames recomputing only the regions that changed
  (PASS-style patch skipping, real sparse compute in Rust, FP32 and INT8 convs); :func:`preprocess` turns a
  video frame into the model's input the way the runner does.
- :func:`frames` decodes a video file or a camera to uint8 RGB frames (PyAV or OpenCV).
- :func:`synthetic_clip` makes a static-camera clip with moving objects (tests, benchmarks, demos).
"""

from .decode import VideoError, VideoReader, frames
from .runner import PatchSkipRunner, UnsupportedLayerError, preprocess
from .synthetic import synthetic_clip, write_clip

__all__ = [
    "PatchSkipRunner",
    "UnsupportedLayerError",
    "VideoError",
    "VideoReader",
    "frames",
    "preprocess",
    "synthetic_clip",
    "write_clip",
]
