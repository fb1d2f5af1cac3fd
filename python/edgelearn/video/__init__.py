"""``edgelearn.video``: video inference helpers. :class:`PatchSkipRunner` runs a conv net over a stream of
frames recomputing only the regions that changed (PASS-style patch skipping, real sparse compute in Rust)."""

from .runner import PatchSkipRunner, UnsupportedLayerError

__all__ = ["PatchSkipRunner", "UnsupportedLayerError"]
