"""edgelearn: on-device training for small ARM boards and any CPU.

The engine (``edgelearn._native``, Rust) provides INT8 GEMM kernels picked at run time for the CPU
(x86-64 AVX2 / AVX-512 VNNI / AVX-VNNI, aarch64 NEON / dotprod / i8mm, scalar fallback) and
quantization primitives. Every kernel releases the GIL.
"""

from ._native import (
    AccumulatorOverflowError,
    InvalidArgumentError,
    KernelUnavailableError,
    MemoryLimitError,
    NonFiniteError,
    __version__,
    available_kernels,
    backend_info,
    gemm_i8,
    gemm_i8_f32,
    get_memory_limit,
    get_num_threads,
    set_kernel,
    set_memory_limit,
    set_num_threads,
)
from .quant import dequantize, quantize
from . import functional, nn, optim
from .nn.init import manual_seed
from .octo import OctoConfig, octo
from .tensor import Tensor, enable_grad, is_grad_enabled, no_grad, tensor
from . import checkpoint, data, models, train
from . import sgq
from . import video
from .checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from .train import evaluate, fit

__all__ = [
    "CheckpointError",
    "checkpoint",
    "data",
    "evaluate",
    "fit",
    "load_checkpoint",
    "models",
    "save_checkpoint",
    "sgq",
    "train",
    "OctoConfig",
    "Tensor",
    "enable_grad",
    "functional",
    "is_grad_enabled",
    "manual_seed",
    "nn",
    "no_grad",
    "octo",
    "optim",
    "tensor",
    "KernelUnavailableError",
    "InvalidArgumentError",
    "AccumulatorOverflowError",
    "NonFiniteError",
    "MemoryLimitError",
    "__version__",
    "available_kernels",
    "backend_info",
    "dequantize",
    "gemm_i8",
    "gemm_i8_f32",
    "get_memory_limit",
    "get_num_threads",
    "quantize",
    "set_kernel",
    "set_memory_limit",
    "set_num_threads",
]
