"""Type stubs for edgelearn._native, the Rust extension (checked against the module by mypy.stubtest)."""

from typing import Any, Dict, Optional, Sequence, Tuple, Union

import numpy as np
import numpy.typing as npt
from typing import final

__all__ = [
    "__version__",
    "KernelUnavailableError",
    "InvalidArgumentError",
    "AccumulatorOverflowError",
    "NonFiniteError",
    "MemoryLimitError",
    "gemm_i8",
    "gemm_i8_f32",
    "backend_info",
    "available_kernels",
    "set_kernel",
    "set_num_threads",
    "get_num_threads",
    "release_scratch",
    "set_memory_limit",
    "get_memory_limit",
    "_quantize",
    "_dequantize",
    "matmul_f32",
    "channel_sums",
    "conv2d_f32_forward",
    "conv2d_f32_backward",
    "conv2d_i8_forward",
    "conv2d_i8_backward",
    "batchnorm2d_forward",
    "batchnorm2d_backward",
    "relu_forward",
    "relu_backward",
    "relu6_forward",
    "relu6_backward",
    "relu_forward_mask",
    "relu6_forward_mask",
    "relu_backward_mask",
    "batchnorm2d_backward_i8",
    "batchnorm2d_forward_save_i8_",
    "batchnorm2d_relu_forward_save_i8_",
    "batchnorm2d_relu_backward_i8_",
    "maxpool2d_forward",
    "maxpool2d_backward",
    "avgpool2d_forward",
    "avgpool2d_backward",
    "residual_add_",
    "sgd_step",
    "conv2d_grouped_f32_forward",
    "conv2d_grouped_f32_backward",
    "conv2d_grouped_i8_forward",
    "conv2d_grouped_i8_backward",
    "OctoSaved",
    "ActivationRange",
    "OutputBuffer",
    "octo_forward",
    "octo_backward",
    "DeferredGrad",
    "FrameError",
    "_sgq_encode",
    "_sgq_decode",
    "_sgq_frame_info",
    "_sgq_channel_order",
    "PatchSkip",
]

__version__: str

class KernelUnavailableError(ValueError): ...
class InvalidArgumentError(ValueError): ...
class AccumulatorOverflowError(ValueError): ...
class NonFiniteError(ValueError): ...
class MemoryLimitError(MemoryError): ...

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
def release_scratch() -> int: ...
def set_memory_limit(limit: Optional[int]) -> None: ...
def get_memory_limit() -> Tuple[int, str]: ...

# --- quantization ---
def _quantize(
    x: npt.NDArray[np.float32],
    per_channel_axis: Optional[int] = None,
    rounding: str = ...,
    seed: Optional[int] = None,
    clip: Optional[tuple[str, float]] = None,
) -> tuple[npt.NDArray[np.int8], npt.NDArray[np.float32]]: ...
def _dequantize(
    q: npt.NDArray[np.int8],
    scale: npt.NDArray[np.float32],
    axis: Optional[int] = None,
) -> npt.NDArray[np.float32]: ...

# --- nn ops ---
# float arrays are float32 NCHW and C-contiguous (matmul_f32 also reads F-ordered/transposed views);
# stride/padding/kernel take an int or a 2-tuple.
_Pair = Union[int, tuple[int, int]]
_F32 = npt.NDArray[np.float32]

def matmul_f32(a: _F32, b: _F32, bias: Optional[_F32] = None) -> _F32: ...
def channel_sums(x: _F32) -> _F32: ...
def conv2d_f32_forward(
    x: _F32, w: _F32, bias: Optional[_F32] = None, stride: Optional[_Pair] = None, padding: Optional[_Pair] = None
) -> _F32: ...
def conv2d_f32_backward(
    x: _F32,
    w: _F32,
    dy: _F32,
    stride: Optional[_Pair] = None,
    padding: Optional[_Pair] = None,
    need_dx: bool = True,
) -> tuple[Optional[_F32], _F32, _F32]: ...
def conv2d_i8_forward(
    xq: npt.NDArray[np.int8],
    sx: float,
    wq: npt.NDArray[np.int8],
    sw: Union[float, _F32],
    bias: Optional[_F32] = None,
    stride: Optional[_Pair] = None,
    padding: Optional[_Pair] = None,
) -> _F32: ...
def conv2d_i8_backward(
    xq: npt.NDArray[np.int8],
    sx: float,
    wq: npt.NDArray[np.int8],
    sw: Union[float, _F32],
    dyq: npt.NDArray[np.int8],
    sdy: float,
    stride: Optional[_Pair] = None,
    padding: Optional[_Pair] = None,
    need_dx: bool = True,
) -> tuple[Optional[_F32], _F32]: ...
def conv2d_grouped_f32_forward(
    x: _F32,
    w: _F32,
    bias: Optional[_F32] = None,
    stride: Optional[_Pair] = None,
    padding: Optional[_Pair] = None,
    dilation: Optional[_Pair] = None,
    groups: int = 1,
) -> _F32: ...
def conv2d_grouped_f32_backward(
    x: _F32,
    w: _F32,
    dy: _F32,
    stride: Optional[_Pair] = None,
    padding: Optional[_Pair] = None,
    dilation: Optional[_Pair] = None,
    groups: int = 1,
    need_dx: bool = True,
) -> tuple[Optional[_F32], _F32, _F32]: ...
def conv2d_grouped_i8_forward(
    xq: npt.NDArray[np.int8],
    sx: float,
    wq: npt.NDArray[np.int8],
    sw: Union[float, _F32],
    bias: Optional[_F32] = None,
    stride: Optional[_Pair] = None,
    padding: Optional[_Pair] = None,
    dilation: Optional[_Pair] = None,
    groups: int = 1,
) -> _F32: ...
def conv2d_grouped_i8_backward(
    xq: npt.NDArray[np.int8],
    sx: float,
    wq: npt.NDArray[np.int8],
    sw: Union[float, _F32],
    dyq: npt.NDArray[np.int8],
    sdy: float,
    stride: Optional[_Pair] = None,
    padding: Optional[_Pair] = None,
    dilation: Optional[_Pair] = None,
    groups: int = 1,
    need_dx: bool = True,
) -> tuple[Optional[_F32], _F32]: ...
def batchnorm2d_forward(
    x: _F32,
    gamma: Optional[_F32],
    beta: Optional[_F32],
    running_mean: _F32,
    running_var: _F32,
    training: bool,
    momentum: float = 0.1,
    eps: float = 1e-5,
    out: Optional[_F32] = None,
) -> tuple[_F32, _F32, _F32]: ...
def batchnorm2d_backward(
    dy: _F32, x: _F32, gamma: Optional[_F32], mean: _F32, invstd: _F32
) -> tuple[_F32, _F32, _F32]: ...
def relu_forward(x: _F32) -> _F32: ...
def relu_backward(dy: _F32, y: _F32) -> _F32: ...
def relu6_forward(x: _F32) -> _F32: ...
def relu6_backward(dy: _F32, y: _F32) -> _F32: ...

# ReLU saving a bit mask (uint8, packed) instead of its output. `out=` receives the result; passing the
# input itself (out=x, out=dy) overwrites it in place.
def relu_forward_mask(
    x: _F32, out: Optional[_F32] = None
) -> tuple[_F32, npt.NDArray[np.uint8], Optional[ActivationRange]]: ...
def relu6_forward_mask(
    x: _F32, out: Optional[_F32] = None
) -> tuple[_F32, npt.NDArray[np.uint8], Optional[ActivationRange]]: ...
def relu_backward_mask(dy: _F32, mask: npt.NDArray[np.uint8], out: Optional[_F32] = None) -> _F32: ...

# BatchNorm with an int8 saved input: the `_` function normalises x in place; out=dy overwrites dy with dx.
def batchnorm2d_forward_save_i8_(
    x: _F32,
    gamma: Optional[_F32],
    beta: Optional[_F32],
    running_mean: _F32,
    running_var: _F32,
    momentum: float = 0.1,
    eps: float = 1e-5,
) -> tuple[_F32, _F32, npt.NDArray[np.int8], float, Optional[ActivationRange]]: ...
def batchnorm2d_backward_i8(
    dy: _F32,
    xq: npt.NDArray[np.int8],
    x_scale: float,
    gamma: Optional[_F32],
    mean: _F32,
    invstd: _F32,
    out: Optional[_F32] = None,
) -> tuple[_F32, _F32, _F32]: ...

def batchnorm2d_relu_forward_save_i8_(
    x: _F32,
    gamma: Optional[_F32],
    beta: Optional[_F32],
    running_mean: _F32,
    running_var: _F32,
    momentum: float,
    eps: float,
    pool: bool,
    relu6: bool = False,
) -> tuple[_F32, _F32, npt.NDArray[np.int8], float, npt.NDArray[np.uint8], _F32, Optional[ActivationRange]]: ...
def batchnorm2d_relu_backward_i8_(
    dy: _F32,
    saved: npt.NDArray[np.uint8],
    pool: bool,
    xq: npt.NDArray[np.int8],
    x_scale: float,
    gamma: Optional[_F32],
    mean: _F32,
    invstd: _F32,
) -> tuple[_F32, _F32, _F32]: ...

# --- the Octo INT8 layer step: one call per direction, the state between them opaque ---
@final
class OctoSaved:
    @property
    def nbytes(self) -> int: ...
    @property
    def input_shape(self) -> list[int]: ...
    def input_codes(self) -> tuple[npt.NDArray[np.int8], float]: ...

@final
class ActivationRange:
    @property
    def amax(self) -> float: ...

def octo_forward(
    x: _F32,
    w: _F32,
    bias: Optional[_F32],
    compensation: Optional[tuple[_F32, _F32, _F32]],
    stride: Optional[tuple[int, int]],
    padding: Optional[tuple[int, int]],
    act_rounding: str,
    weight_rounding: str,
    grad_rounding: str,
    prc: Optional[tuple[str, float]],
    per_channel_weights: bool,
    seed: int,
    training: bool,
    dilation: Optional[tuple[int, int]] = None,
    groups: int = 1,
    x_range: Optional[ActivationRange] = None,
) -> tuple[_F32, OctoSaved]: ...
@final
class DeferredGrad:
    @property
    def shape(self) -> list[int]: ...
    def done(self) -> bool: ...
    def wait(self) -> _F32: ...

def octo_backward(
    saved: OctoSaved,
    dy: _F32,
    need_dx: bool = True,
    need_dw: bool = True,
    need_db: bool = True,
    need_comp: bool = False,
    defer_dw: bool = False,
) -> tuple[
    Optional[_F32],
    Union[_F32, DeferredGrad, None],
    Optional[_F32],
    Optional[_F32],
    Optional[_F32],
    Optional[_F32],
]: ...
def maxpool2d_forward(
    x: _F32, kernel: _Pair, stride: Optional[_Pair] = None, padding: Optional[_Pair] = None
) -> tuple[_F32, npt.NDArray[np.uint8]]: ...
def maxpool2d_backward(
    dy: _F32,
    idx: npt.NDArray[np.uint8],
    input_shape: tuple[int, int, int, int],
    kernel: _Pair,
    stride: Optional[_Pair] = None,
    padding: Optional[_Pair] = None,
) -> _F32: ...
def avgpool2d_forward(
    x: _F32, kernel: _Pair, stride: Optional[_Pair] = None, padding: Optional[_Pair] = None
) -> _F32: ...
def avgpool2d_backward(
    dy: _F32,
    input_shape: tuple[int, int, int, int],
    kernel: _Pair,
    stride: Optional[_Pair] = None,
    padding: Optional[_Pair] = None,
) -> _F32: ...

# The residual add of a block, in place over out; returns the sum's range (None: NaN or an infinity in it).
def residual_add_(out: _F32, identity: _F32) -> Optional[ActivationRange]: ...

def sgd_step(
    params: Sequence[_F32],
    grads: Sequence[_F32],
    momentum_buffers: Optional[Sequence[_F32]],
    lr: float,
    momentum: float,
    one_minus_dampening: float,
    weight_decay: float,
    nesterov: bool,
) -> None: ...

# --- sgq codec ---
class FrameError(ValueError): ...

def _sgq_encode(
    x: npt.NDArray[np.float32],
    mode: str = ...,
    bits: int = 4,
    group: int = 4,
    stripe_rows: int = 0,
    rounding: str = ...,
    seed: Optional[int] = None,
    order: Optional[list[int]] = None,
    ranges: str = ...,
    send_order: bool = True,
    constant_blocks: bool = False,
    clip: Optional[tuple[str, float]] = None,
) -> bytes: ...
def _sgq_decode(frame: bytes, order: Optional[list[int]] = None) -> npt.NDArray[np.float32]: ...
def _sgq_frame_info(frame: bytes) -> dict[str, Any]: ...
def _sgq_channel_order(x: npt.NDArray[np.float32]) -> list[int]: ...

# --- patch-skip video runner (edgelearn.video.PatchSkipRunner builds it from a Sequential) ---------------
@final
class OutputBuffer:
    """The memory of one PatchSkip frame output (the array's base object); reused for a later frame's
    output once the array and its views are gone."""

@final
class PatchSkip:
    def __new__(
        cls,
        patch: int = 16,
        threshold: float = 0.0,
        refresh_every: int = 0,
        tile: int = 1,
        error_bound: float = 0.0,
        int8_scales: str = "frozen",
        dense_above: float = 0.85,
    ) -> PatchSkip: ...
    def add_conv(
        self,
        weight: np.ndarray,
        bias: Optional[np.ndarray],
        stride: Tuple[int, int],
        padding: Tuple[int, int],
        groups: int = 1,
        dilation: Optional[Tuple[int, int]] = None,
    ) -> None: ...
    def add_conv_i8(
        self,
        wq: np.ndarray,
        sw: np.ndarray,
        bias: Optional[np.ndarray],
        stride: Tuple[int, int],
        padding: Tuple[int, int],
        groups: int = 1,
        dilation: Optional[Tuple[int, int]] = None,
    ) -> None: ...
    def add_affine(self, a: np.ndarray, b: np.ndarray) -> None: ...
    def add_batchnorm(self, gamma: np.ndarray, beta: np.ndarray, mean: np.ndarray, var: np.ndarray, eps: float) -> None: ...
    def add_relu(self) -> None: ...
    def add_relu6(self) -> None: ...
    def add_mark(self) -> None: ...
    def add_from(self, mark: int) -> None: ...
    def add_residual(self, mark: int) -> None: ...
    def add_maxpool(self, kernel: Tuple[int, int], stride: Tuple[int, int], padding: Tuple[int, int]) -> None: ...
    def add_avgpool(self, kernel: Tuple[int, int], stride: Tuple[int, int], padding: Tuple[int, int]) -> None: ...
    def run(self, frame: np.ndarray) -> np.ndarray: ...
    def run_u8(
        self,
        frame: np.ndarray,
        channels: Optional[int] = None,
        mean: Optional[np.ndarray] = None,
        std: Optional[np.ndarray] = None,
    ) -> np.ndarray: ...
    def reset(self) -> None: ...
    def stats(self) -> Dict[str, Any]: ...
