//! Neural-network operators of the training layer (FP32 and INT8), NCHW layout throughout.
//!
//! - [`matmul`]: FP32 GEMM on strided views (kernels from the `gemm` crate, threaded in our rayon pool).
//! - [`im2col`]: patch matrices of one image (generic over the element type, so INT8 data is unfolded
//!   as INT8) and the scatter-add back.
//! - [`conv`]: 2-D convolution forward/backward, FP32 and INT8, each shape's algorithm chosen once by a
//!   [`ConvPlan`] (im2col + GEMM, the padded grid, the direct VNNI kernel, or [`depthwise`]).
//! - [`depthwise`]: grouped and depthwise convolution (`groups > 1`) on its own direct kernels.
//! - [`pool`]: max and average pooling; [`batchnorm`]: 2-D batch normalisation; [`activation`]: ReLU;
//!   [`residual`]: the residual add.
//!
//! Not here: quantization itself ([`crate::quant`]), the INT8 GEMM kernels ([`crate::gemm`]), autograd.
//!
//! Every public function validates shapes and returns [`Error`] rather than panicking. Outputs are
//! caller-allocated slices, so the Python glue allocates each result once.

pub mod activation;
pub mod batchnorm;
pub mod bn_relu;
pub mod conv;
pub mod depthwise;
pub mod im2col;
pub mod matmul;
pub mod optim;
pub mod pool;
pub mod residual;

pub use activation::{
    relu6_backward, relu6_forward, relu6_forward_mask, relu6_forward_mask_inplace, relu_backward,
    relu_backward_mask, relu_backward_mask_inplace, relu_forward, relu_forward_mask,
    relu_forward_mask_inplace, relu_mask_len,
};
pub use batchnorm::{
    batchnorm2d_backward, batchnorm2d_backward_i8, batchnorm2d_backward_i8_inplace,
    batchnorm2d_forward, batchnorm2d_forward_inplace, batchnorm2d_forward_inplace_save_i8,
};
pub use bn_relu::{
    batchnorm2d_relu_backward_i8, batchnorm2d_relu_forward_save_i8, ReluOut, ReluSaved,
};
pub use conv::{
    channel_sums, channel_sums_and_range, conv2d_f32_backward, conv2d_f32_forward,
    conv2d_i8_backward, conv2d_i8_forward, ConvAlgo, ConvPlan, ConvShape, WeightScales,
};
pub use depthwise::{
    conv2d_grouped_f32_backward, conv2d_grouped_f32_forward, conv2d_grouped_i8_backward,
    conv2d_grouped_i8_forward, GroupedParams, GroupedShape,
};
pub use matmul::{matmul_f32, MatF32};
pub use pool::{
    avgpool2d_backward, avgpool2d_forward, maxpool2d_backward, maxpool2d_forward,
    pool2d_output_shape,
};
pub use residual::residual_add_inplace;

use std::cell::RefCell;

use crate::error::{Error, Result};
use crate::threads;

/// Kernel size, stride and padding of a 2-D sliding window (convolution or pooling).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Window2d {
    pub kernel: (usize, usize),
    pub stride: (usize, usize),
    pub padding: (usize, usize),
}

impl Window2d {
    pub fn new(kernel: (usize, usize), stride: (usize, usize), padding: (usize, usize)) -> Self {
        Window2d {
            kernel,
            stride,
            padding,
        }
    }
}

/// A window sliding over an `(N, C, H, W)` input: the input shape, the window and the output size.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Geometry {
    pub n: usize,
    pub c: usize,
    pub h: usize,
    pub w: usize,
    pub kh: usize,
    pub kw: usize,
    pub sh: usize,
    pub sw: usize,
    pub ph: usize,
    pub pw: usize,
    pub oh: usize,
    pub ow: usize,
}

impl Geometry {
    /// Checks the window against the input (`arg` names the input in messages) and computes `OH`, `OW`
    /// (floor mode, like PyTorch's default).
    pub fn new(arg: &'static str, shape: [usize; 4], win: Window2d) -> Result<Self> {
        let [n, c, h, w] = shape;
        let (kh, kw) = win.kernel;
        let (sh, sw) = win.stride;
        let (ph, pw) = win.padding;
        if kh == 0 || kw == 0 {
            return Err(Error::invalid(
                "kernel",
                format!("must be positive, got ({kh}, {kw})"),
            ));
        }
        if sh == 0 || sw == 0 {
            return Err(Error::invalid(
                "stride",
                format!("must be positive, got ({sh}, {sw})"),
            ));
        }
        const LIMIT: usize = 1 << 20;
        if [kh, kw, sh, sw, ph, pw].iter().any(|&v| v > LIMIT) {
            return Err(Error::invalid(
                "kernel",
                format!("kernel/stride/padding above {LIMIT} are not supported"),
            ));
        }
        if h + 2 * ph < kh || w + 2 * pw < kw {
            return Err(Error::invalid(
                arg,
                format!(
                    "spatial size ({h}, {w}) with padding ({ph}, {pw}) is smaller than the kernel ({kh}, {kw})"
                ),
            ));
        }
        let oh = (h + 2 * ph - kh) / sh + 1;
        let ow = (w + 2 * pw - kw) / sw + 1;
        shape_len(arg, &[n, c, h, w])?;
        shape_len("output", &[n, c, oh, ow])?;
        Ok(Geometry {
            n,
            c,
            h,
            w,
            kh,
            kw,
            sh,
            sw,
            ph,
            pw,
            oh,
            ow,
        })
    }

    /// Output pixels per plane.
    pub fn p(&self) -> usize {
        self.oh * self.ow
    }
    /// Rows of the patch matrix: `C·kh·kw`.
    pub fn k(&self) -> usize {
        self.c * self.kh * self.kw
    }
    /// Input pixels per plane.
    pub fn hw(&self) -> usize {
        self.h * self.w
    }
    /// True when the patch matrix of an image is the image itself (1x1 kernel, stride 1, no padding).
    pub fn is_pointwise(&self) -> bool {
        self.kh == 1 && self.kw == 1 && self.sh == 1 && self.sw == 1 && self.ph == 0 && self.pw == 0
    }
    /// The output columns `ox` whose input column `ox·sw + j − pw` lies inside `0..w`, as `lo..hi`.
    #[inline]
    pub(crate) fn valid_cols(&self, j: usize) -> (usize, usize) {
        let lo = if j >= self.pw {
            0
        } else {
            (self.pw - j).div_ceil(self.sw)
        };
        let hi = if self.w + self.pw > j {
            ((self.w + self.pw - j - 1) / self.sw + 1).min(self.ow)
        } else {
            0
        };
        (lo.min(hi), hi)
    }
    /// Same for rows.
    #[inline]
    pub(crate) fn valid_rows(&self, i: usize) -> (usize, usize) {
        let lo = if i >= self.ph {
            0
        } else {
            (self.ph - i).div_ceil(self.sh)
        };
        let hi = if self.h + self.ph > i {
            ((self.h + self.ph - i - 1) / self.sh + 1).min(self.oh)
        } else {
            0
        };
        (lo.min(hi), hi)
    }
}

/// Product of `dims`, or an error naming `arg` if it overflows.
pub(crate) fn shape_len(arg: &'static str, dims: &[usize]) -> Result<usize> {
    dims.iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d))
        .ok_or_else(|| Error::invalid(arg, format!("shape {dims:?} overflows the address space")))
}

/// Checks that a slice holds exactly `shape`'s element count.
pub(crate) fn check_len(arg: &'static str, len: usize, dims: &[usize]) -> Result<()> {
    let need = shape_len(arg, dims)?;
    if len != need {
        return Err(Error::invalid(
            arg,
            format!("expected shape {dims:?} ({need} elements), got {len} elements"),
        ));
    }
    Ok(())
}

/// Below this many elements an elementwise op runs on the caller's thread: a hop into the pool costs
/// more than the work.
pub(crate) const PAR_MIN_ELEMS: usize = 1 << 16;
#[cfg(target_arch = "x86_64")]
pub(crate) use crate::simd::elementwise_avx2;
pub use crate::simd::set_elementwise_simd;

/// Whether work of `elems` elements is worth spreading over the pool.
pub(crate) fn worth_parallel(elems: usize) -> bool {
    elems >= PAR_MIN_ELEMS && threads::num_threads() > 1
}

/// Calls `f(i, chunk)` for consecutive `chunk`-sized pieces of `out`, in the pool if `parallel`.
pub(crate) fn for_each_chunk<T: Send>(
    out: &mut [T],
    chunk: usize,
    parallel: bool,
    f: impl Fn(usize, &mut [T]) + Sync + Send,
) {
    let chunk = chunk.max(1);
    if parallel {
        let _ = threads::for_each_piece(out, chunk, |i, c| {
            f(i, c);
            Ok::<(), std::convert::Infallible>(())
        });
    } else {
        out.chunks_mut(chunk).enumerate().for_each(|(i, c)| f(i, c));
    }
}

/// Like [`for_each_chunk`] over two outputs cut in step.
pub(crate) fn for_each_chunk2<T: Send, U: Send>(
    a: &mut [T],
    ca: usize,
    b: &mut [U],
    cb: usize,
    parallel: bool,
    f: impl Fn(usize, &mut [T], &mut [U]) + Sync + Send,
) {
    let (ca, cb) = (ca.max(1), cb.max(1));
    if parallel {
        let (pa, pb) = (threads::Pieces::new(a, ca), threads::Pieces::new(b, cb));
        // (zip: as many parts as the shorter of the two cuts)
        threads::run_parts(pa.count().min(pb.count()), |i| {
            // SAFETY: for_each_part passes each index once: piece i of each output is borrowed once.
            f(i, unsafe { pa.piece(i) }, unsafe { pb.piece(i) });
        });
    } else {
        a.chunks_mut(ca)
            .zip(b.chunks_mut(cb))
            .enumerate()
            .for_each(|(i, (x, y))| f(i, x, y));
    }
}

// Per-thread scratch buffers, reused across calls so a training step allocates no temporaries.
thread_local! {
    static SCRATCH_F32: RefCell<Vec<Vec<f32>>> = const { RefCell::new(Vec::new()) };
    static SCRATCH_I8: RefCell<Vec<Vec<i8>>> = const { RefCell::new(Vec::new()) };
}

/// Element types with a per-thread free list of scratch vectors.
pub(crate) trait ScratchElem: Copy + Default + 'static {
    /// `None` during thread teardown, when the free list is already gone.
    fn with_free_list<R>(f: impl FnOnce(&mut Vec<Vec<Self>>) -> R) -> Option<R>;
}
impl ScratchElem for f32 {
    fn with_free_list<R>(f: impl FnOnce(&mut Vec<Vec<Self>>) -> R) -> Option<R> {
        SCRATCH_F32.try_with(|s| f(&mut s.borrow_mut())).ok()
    }
}
impl ScratchElem for i8 {
    fn with_free_list<R>(f: impl FnOnce(&mut Vec<Vec<Self>>) -> R) -> Option<R> {
        SCRATCH_I8.try_with(|s| f(&mut s.borrow_mut())).ok()
    }
}

/// `len` elements of scratch memory (contents unspecified) that go back to this thread's free list when
/// dropped. The vector behind it only ever grows, so a step that reuses buffers of varying sizes does
/// not zero-fill them again on every call (`Vec::resize` would, from its current length).
#[derive(Default)]
pub(crate) struct Scratch<T: ScratchElem> {
    buf: Vec<T>,
    len: usize,
}

impl<T: ScratchElem> Scratch<T> {
    /// Fallible: a buffer the system cannot provide is [`Error::OutOfMemory`], never an abort.
    pub(crate) fn new(len: usize) -> Result<Self> {
        // The last one freed when it is large enough (a kernel taking and freeing a small buffer per task
        // gets the same one back each time), else the largest free vector: buffers converge to the largest
        // size a step needs.
        let mut buf = T::with_free_list(|list| {
            if list.last().is_some_and(|b| b.len() >= len) {
                return list.pop();
            }
            let best = (0..list.len()).max_by_key(|&i| list[i].len());
            best.map(|i| list.swap_remove(i))
        })
        .flatten()
        .unwrap_or_default();
        if buf.len() < len {
            crate::alloc::check("scratch buffer", len, std::mem::size_of::<T>())?;
            buf.try_reserve_exact(len - buf.len())
                .map_err(|_| Error::OutOfMemory {
                    what: "scratch buffer".into(),
                    msg: format!(
                        "the system could not provide {}",
                        crate::alloc::human(len.saturating_mul(std::mem::size_of::<T>()))
                    ),
                })?;
            buf.resize(len, T::default());
        }
        Ok(Scratch { buf, len })
    }
}

impl<T: ScratchElem> std::ops::Deref for Scratch<T> {
    type Target = [T];
    fn deref(&self) -> &[T] {
        &self.buf[..self.len]
    }
}
impl<T: ScratchElem> std::ops::DerefMut for Scratch<T> {
    fn deref_mut(&mut self) -> &mut [T] {
        &mut self.buf[..self.len]
    }
}
impl<T: ScratchElem> Drop for Scratch<T> {
    fn drop(&mut self) {
        if self.buf.capacity() == 0 {
            return;
        }
        let buf = std::mem::take(&mut self.buf);
        // During thread teardown the free list may be gone already: then the buffer is simply freed.
        T::with_free_list(|list| {
            if list.len() < 4 {
                list.push(buf)
            }
        });
    }
}

/// Frees the scratch buffers every thread keeps (the calling thread's and the kernel pool's workers') and
/// the pooled int8 codes of INT8 layers ([`crate::alloc::take_codes`]), and returns how many bytes that
/// gave back. They only grow, to the largest size a call needed, so after a pass at a larger batch (an evaluation at `eval_batch_size`) they would keep that much memory resident
/// through the training steps that follow; the next calls allocate them again at the size they need.
pub fn release_scratch() -> usize {
    fn drain<T: ScratchElem>() -> usize {
        T::with_free_list(|list| {
            let bytes = list
                .iter()
                .map(|v| v.capacity() * std::mem::size_of::<T>())
                .sum();
            *list = Vec::new();
            bytes
        })
        .unwrap_or(0)
    }
    fn here() -> usize {
        drain::<f32>() + drain::<i8>()
    }
    let caller = std::thread::current().id();
    let workers: usize = threads::install(|| {
        rayon::broadcast(|_| {
            if std::thread::current().id() == caller {
                0 // counted below
            } else {
                here()
            }
        })
        .into_iter()
        .sum()
    });
    workers + here() + crate::alloc::release_codes()
}

/// A scratch vector of `len` f32 (contents unspecified) from this thread's free list.
pub(crate) fn take_f32(len: usize) -> Result<Scratch<f32>> {
    Scratch::new(len)
}
/// A scratch vector of `len` i8 (contents unspecified) from this thread's free list.
pub(crate) fn take_i8(len: usize) -> Result<Scratch<i8>> {
    Scratch::new(len)
}
