"""Video decoding to numpy frames: :func:`frames` over a file or a camera, through PyAV (default) or OpenCV.

Frames are uint8 ``(H, W, 3)`` RGB arrays, whatever the backend (OpenCV's BGR is converted). Nothing is decoded
by hand here; this module only opens the source, checks it and converts each picture.
"""

from __future__ import annotations

import os
from typing import Any, Iterator, Optional, Union

import numpy as np

__all__ = ["VideoError", "VideoReader", "frames"]

Source = Union[str, "os.PathLike[str]", int]

_INSTALL = 'pip install "edgelearn[video]"  (PyAV), or pip install opencv-python-headless'


class VideoError(ValueError):
    """A video source exists but cannot be opened or decoded (the message names it and says why)."""


def _is_camera(source: Any) -> bool:
    return isinstance(source, (int, np.integer)) or (isinstance(source, str) and source.isdigit())


class VideoReader:
    """An open video source; iterate it for uint8 ``(H, W, 3)`` RGB frames.

    Opens (and checks) the source at construction, so a missing or unreadable file fails here, not at the
    first frame. ``fps``, ``width``, ``height`` and ``frame_count`` (``None`` when the container does not say)
    describe the stream. Use as a context manager or call :meth:`close`.
    """

    def __init__(self, source: Source, backend: str = "auto", max_frames: Optional[int] = None):
        if backend not in ("auto", "av", "opencv"):
            raise ValueError(f"backend: expected 'auto', 'av' or 'opencv', got {backend!r}")
        if max_frames is not None and int(max_frames) < 0:
            raise ValueError(f"max_frames: must be >= 0 or None, got {max_frames}")
        self.source = source
        self.max_frames = None if max_frames is None else int(max_frames)
        self.camera = _is_camera(source)
        if not self.camera:
            path = os.fspath(source)
            if not os.path.exists(path):
                raise FileNotFoundError(f"video file not found: {path}")
            if os.path.isdir(path):
                raise VideoError(f"{path}: is a directory, not a video file")
        self.backend = self._pick(backend)
        self._container: Any = None
        self._capture: Any = None
        self._iter: Optional[Iterator[np.ndarray]] = None
        self.fps: Optional[float] = None
        self.frame_count: Optional[int] = None
        self.width = self.height = 0
        if self.backend == "av":
            self._open_av()
        else:
            self._open_opencv()

    @staticmethod
    def _pick(backend: str) -> str:
        if backend in ("auto", "av"):
            try:
                import av  # noqa: F401

                return "av"
            except ImportError:
                if backend == "av":
                    raise ImportError(f"PyAV is not installed: {_INSTALL}") from None
        try:
            import cv2  # noqa: F401

            return "opencv"
        except ImportError:
            raise ImportError(f"no video decoder installed: {_INSTALL}") from None

    def _open_av(self) -> None:
        import av

        try:
            if self.camera:
                # Linux cameras through FFmpeg's video4linux2 input
                self._container = av.open(f"/dev/video{int(self.source)}", format="v4l2")
            else:
                self._container = av.open(os.fspath(self.source))
        except (av.error.FFmpegError, OSError) as exc:
            raise VideoError(f"{self._name()}: cannot open as video ({type(exc).__name__}: {exc})") from exc
        if not self._container.streams.video:
            self._container.close()
            raise VideoError(f"{self._name()}: has no video stream")
        stream = self._container.streams.video[0]
        stream.thread_type = "AUTO"
        self.width, self.height = int(stream.codec_context.width), int(stream.codec_context.height)
        rate = stream.average_rate or stream.guessed_rate
        self.fps = float(rate) if rate else None
        self.frame_count = int(stream.frames) or None
        self._stream = stream

    def _open_opencv(self) -> None:
        import cv2

        cap = cv2.VideoCapture(int(self.source) if self.camera else os.fspath(self.source))
        if not cap.isOpened():
            raise VideoError(f"{self._name()}: cannot open as video (OpenCV)")
        self._capture = cap
        self.width = int(cap.get(cv2.CAP_PROP_FRAME_WIDTH))
        self.height = int(cap.get(cv2.CAP_PROP_FRAME_HEIGHT))
        self.fps = float(cap.get(cv2.CAP_PROP_FPS)) or None
        self.frame_count = int(cap.get(cv2.CAP_PROP_FRAME_COUNT)) or None

    def _name(self) -> str:
        return f"camera {int(self.source)}" if self.camera else os.fspath(self.source)

    def _decode_av(self) -> Iterator[np.ndarray]:
        import av

        try:
            for frame in self._container.decode(self._stream):
                yield frame.to_ndarray(format="rgb24")
        except av.error.FFmpegError as exc:
            raise VideoError(f"{self._name()}: decoding failed ({type(exc).__name__}: {exc})") from exc

    def _decode_opencv(self) -> Iterator[np.ndarray]:
        import cv2

        while True:
            ok, bgr = self._capture.read()
            if not ok:
                return
            yield np.ascontiguousarray(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB))

    def __iter__(self) -> Iterator[np.ndarray]:
        if self._iter is None:
            inner = self._decode_av() if self.backend == "av" else self._decode_opencv()
            self._iter = self._limited(inner)
        return self._iter

    def _limited(self, inner: Iterator[np.ndarray]) -> Iterator[np.ndarray]:
        n = 0
        try:
            for f in inner:
                if self.max_frames is not None and n >= self.max_frames:
                    return
                n += 1
                yield f
            if n == 0 and not self.camera:
                raise VideoError(f"{self._name()}: no frame could be decoded")
        finally:
            self.close()

    def __next__(self) -> np.ndarray:
        return next(iter(self))

    def close(self) -> None:
        if self._container is not None:
            self._container.close()
            self._container = None
        if self._capture is not None:
            self._capture.release()
            self._capture = None

    def __enter__(self) -> "VideoReader":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def frames(source: Source, backend: str = "auto", max_frames: Optional[int] = None) -> VideoReader:
    """Decoded frames of a video file (any format FFmpeg/OpenCV reads) or a camera index, as uint8
    ``(H, W, 3)`` RGB numpy arrays::

        for frame in edgelearn.video.frames("clip.mp4"):
            y = runner(frame)

    ``backend``: ``"auto"`` (PyAV if installed, else OpenCV), ``"av"`` or ``"opencv"``. A missing file raises
    ``FileNotFoundError``, an unreadable one :class:`VideoError` (a ``ValueError``), no decoder ``ImportError``
    with the install command.
    """
    return VideoReader(source, backend=backend, max_frames=max_frames)
