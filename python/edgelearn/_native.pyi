"""Type stubs for edgelearn._native, the Rust extension (checked against the module by mypy.stubtest)."""

from typing import Any, Optional, Union

import numpy as np
import numpy.typing as npt

__version__: str

class KernelUnavailableError(ValueError): ...

# --- engine: GEMM ---
def gemm_i8(a: npt.NDArray[np.int8], b: npt.NDArray[np.int8]) -> npt.NDArray[np.int32]: ...
def gemm_i8_f32(
    a: npt.NDArray[np.int8],
    b: npt.NDArray[np.int8],
    scale_a: Union[float, npt.NDArray[np.float32]],
    scale_b: Union[float, npt.NDArray[np.float32]],
    bias: Optional[npt.NDArray[np.float32]] = None,
) -> npt.NDArray[np.float32]: ...

# --- engine: backend settings ---
def backend_info() -> dict[str, Any]: ...
def available_kernels() -> list[str]: ...
def set_kernel(name: Optional[str] = None) -> None: ...
def set_num_threads(n: int) -> None: ...
def get_num_threads() -> int: ...

# --- quantization ---
