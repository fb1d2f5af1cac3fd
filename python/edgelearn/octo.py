"""``edgelearn.octo``: Octo INT8 training, ``OctoConfig`` and ``octo(model, config)`` / ``fp32(model)``.

The config is a leaf value (``edgelearn.octo_config``) and the rewriter lives beside the modules it
rewrites (``edgelearn.nn.octo``); this module re-exports both under their historical names.
"""

from .nn.octo import fp32, octo
from .octo_config import OctoConfig

__all__ = ["OctoConfig", "octo", "fp32"]
