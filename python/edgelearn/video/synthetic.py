"""A static-camera scene with moving objects, made up on the spot: :func:`synthetic_clip` (uint8 RGB frames)
and :func:`write_clip` (encode frames to a file with PyAV) for tests, benchmarks and demos."""

from __future__ import annotations

import os
from typing import Iterable, List

import numpy as np

__all__ = ["synthetic_clip", "write_clip"]


def synthetic_clip(
    n: int = 60, height: int = 120, width: int = 160, objects: int = 3, size: int = 12, seed: int = 0,
    noise: float = 0.0,
) -> List[np.ndarray]:
    """``n`` uint8 ``(height, width, 3)`` frames: a fixed textured background (smooth gradients plus a few
    rectangles, like a room seen by a fixed camera) and ``objects`` coloured squares of side ``size`` moving in
    straight lines, bouncing off the borders. ``noise`` adds Gaussian sensor noise (std in grey levels)."""
    if n < 0 or height < 1 or width < 1 or objects < 0 or size < 1:
        raise ValueError(f"synthetic_clip: bad sizes (n={n}, height={height}, width={width}, objects={objects}, size={size})")
    g = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    bg = np.stack([
        90 + 60 * np.sin(xx / (width / 3.1)) * np.cos(yy / (height / 2.3)),
        110 + 50 * np.cos(xx / (width / 1.7) + 1.0),
        100 + 40 * np.sin(yy / (height / 1.9) + 0.5),
    ], axis=-1)
    for _ in range(6):
        y0, x0 = g.integers(0, height), g.integers(0, width)
        bg[y0:y0 + g.integers(4, max(5, height // 4)), x0:x0 + g.integers(4, max(5, width // 4))] = g.integers(30, 220, 3)
    pos = g.uniform([0, 0], [max(1, height - size), max(1, width - size)], (objects, 2))
    vel = g.uniform(0.8, 2.5, (objects, 2)) * g.choice([-1, 1], (objects, 2))
    colours = g.integers(0, 256, (objects, 3))
    out = []
    for _ in range(n):
        f = bg.copy()
        for k in range(objects):
            y, x = int(pos[k, 0]), int(pos[k, 1])
            f[y:y + size, x:x + size] = colours[k]
            pos[k] += vel[k]
            for d, lim in ((0, height - size), (1, width - size)):
                if not 0 <= pos[k, d] <= max(lim, 0):
                    vel[k, d] = -vel[k, d]
                    pos[k, d] = min(max(pos[k, d], 0), max(lim, 0))
        if noise > 0:
            f = f + g.normal(0, noise, f.shape)
        out.append(np.clip(np.rint(f), 0, 255).astype(np.uint8))
    return out


def write_clip(path: "os.PathLike[str] | str", frames: Iterable[np.ndarray], fps: int = 25, codec: str = "mpeg4") -> None:
    """Encode uint8 ``(H, W, 3)`` RGB frames to ``path`` with PyAV (``mpeg4`` by default: in every FFmpeg
    build; pass ``"libx264"`` for H.264 where available). Even frame sizes are safest for yuv420p."""
    import av

    frames = list(frames)
    if not frames:
        raise ValueError("write_clip: no frames")
    h, w = frames[0].shape[:2]
    with av.open(os.fspath(path), mode="w") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        stream.options = {"qscale": "2"} if codec == "mpeg4" else {}
        for f in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(f), format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
