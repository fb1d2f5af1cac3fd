//! FP32 GEMM on strided views: the FP32 baseline of every INT8 layer, and `matmul_f32` for Python.
//!
//! The kernels come from the `gemm` crate (see the dependency note in Cargo.toml; `::gemm` here, not
//! [`crate::gemm`], which is our INT8 GEMM); this module adds bounds-checked views, the bias epilogue and
//! threading: the output is cut into row (or column) bands, one single-threaded product per band, in
//! edgelearn's rayon pool, so `EDGELEARN_NUM_THREADS` governs FP32 work too.

use rayon::prelude::*;

use crate::error::{Error, Result};
use crate::threads;

/// A read-only view of an f32 matrix: element `(r, c)` is `data[r·rs + c·cs]`.
#[derive(Clone, Copy, Debug)]
pub struct MatF32<'a> {
    data: &'a [f32],
    rows: usize,
    cols: usize,
    rs: usize,
    cs: usize,
}

impl<'a> MatF32<'a> {
    /// A strided view; fails if any element would fall outside `data`.
    pub fn new(data: &'a [f32], rows: usize, cols: usize, rs: usize, cs: usize) -> Result<Self> {
        if rows > 0 && cols > 0 {
            let last = (rows - 1)
                .checked_mul(rs)
                .and_then(|x| (cols - 1).checked_mul(cs).and_then(|y| x.checked_add(y)))
                .ok_or_else(|| Error::invalid("matrix", "strides overflow the address space"))?;
            if last >= data.len() || rs > isize::MAX as usize || cs > isize::MAX as usize {
                return Err(Error::invalid(
                    "matrix",
                    format!(
                        "a {rows}x{cols} view with strides ({rs}, {cs}) needs {} elements, buffer has {}",
                        last.saturating_add(1),
                        data.len()
                    ),
                ));
            }
        }
        Ok(MatF32 {
            data,
            rows,
            cols,
            rs,
            cs,
        })
    }
    /// A C-ordered `rows × cols` matrix (`data.len()` must be exactly `rows·cols`).
    pub fn row_major(data: &'a [f32], rows: usize, cols: usize) -> Result<Self> {
        if rows.checked_mul(cols) != Some(data.len()) {
            return Err(Error::invalid(
                "matrix",
                format!("{rows}x{cols} elements expected, buffer has {}", data.len()),
            ));
        }
        Self::new(data, rows, cols, cols, 1)
    }
    /// The transpose, as a view.
    pub fn t(self) -> Self {
        MatF32 {
            data: self.data,
            rows: self.cols,
            cols: self.rows,
            rs: self.cs,
            cs: self.rs,
        }
    }
    pub fn rows(&self) -> usize {
        self.rows
    }
    pub fn cols(&self) -> usize {
        self.cols
    }
}

/// Below this many multiply-adds one thread does the whole product (a pool hop costs microseconds).
pub(crate) const PAR_MIN_MACS: usize = 1 << 18;

/// `c = a·b + bias[None, :]` into the C-ordered `M × N` slice `c`. `bias`, if given, has `N` values.
pub fn matmul_f32(a: &MatF32, b: &MatF32, bias: Option<&[f32]>, c: &mut [f32]) -> Result<()> {
    if a.cols != b.rows {
        return Err(Error::invalid(
            "b",
            format!(
                "inner dimensions differ: a is {}x{}, b is {}x{} (a.shape[1] must equal b.shape[0])",
                a.rows, a.cols, b.rows, b.cols
            ),
        ));
    }
    let (m, n) = (a.rows, b.cols);
    if m.checked_mul(n) != Some(c.len()) {
        return Err(Error::invalid(
            "out",
            format!("expected {m}x{n} elements, got {}", c.len()),
        ));
    }
    if let Some(bv) = bias {
        if bv.len() != n {
            return Err(Error::invalid(
                "bias",
                format!(
                    "expected {n} values (one per column of b), got {}",
                    bv.len()
                ),
            ));
        }
        for row in c.chunks_exact_mut(n.max(1)) {
            row.copy_from_slice(bv);
        }
    }
    let parallel = m * n * a.cols >= PAR_MIN_MACS && threads::num_threads() > 1;
    // SAFETY: views are bounds-checked; `c` is M×N with row stride N.
    unsafe { sgemm(a, b, c.as_mut_ptr(), n, bias.is_some(), parallel) };
    Ok(())
}

/// `C = A·B` (or `C += A·B` if `accumulate`) with `C` row-major, row stride `ldc`, on this thread or (if
/// `parallel`) split over the pool in bands.
///
/// # Safety
/// `c` points to `A.rows` rows of `B.cols` writable elements spaced `ldc` apart, not aliased by `a`/`b`.
pub(crate) unsafe fn sgemm(
    a: &MatF32,
    b: &MatF32,
    c: *mut f32,
    ldc: usize,
    accumulate: bool,
    parallel: bool,
) {
    let (m, k, n) = (a.rows, a.cols, b.cols);
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            for i in 0..m {
                std::slice::from_raw_parts_mut(c.add(i * ldc), n).fill(0.0);
            }
        }
        return;
    }
    let band = |i0: usize, mm: usize, j0: usize, nn: usize, c: *mut f32| {
        // SAFETY (whole closure): offsets stay inside the checked views and the caller's output.
        ::gemm::gemm(
            mm,
            nn,
            k,
            c.add(i0 * ldc + j0),
            1,
            ldc as isize,
            accumulate,
            a.data.as_ptr().add(i0 * a.rs),
            a.cs as isize,
            a.rs as isize,
            b.data.as_ptr().add(j0 * b.cs),
            b.cs as isize,
            b.rs as isize,
            1.0,
            1.0,
            false,
            false,
            false,
            ::gemm::Parallelism::None,
        );
    };
    let nthreads = if parallel { threads::num_threads() } else { 1 };
    if nthreads <= 1 {
        band(0, m, 0, n, c);
        return;
    }
    // Bands a multiple of 16 wide (a whole number of micro-tiles), at least two per thread.
    // each band writes a disjoint part of the output
    let out = crate::threads::OutPtr(c);
    let tasks = 2 * nthreads;
    if m >= n || n < 32 {
        let rows = m.div_ceil(tasks).div_ceil(16) * 16;
        threads::install(|| {
            (0..m.div_ceil(rows)).into_par_iter().for_each(|t| {
                let i0 = t * rows;
                band(i0, rows.min(m - i0), 0, n, out.ptr());
            })
        });
    } else {
        let cols = n.div_ceil(tasks).div_ceil(16) * 16;
        threads::install(|| {
            (0..n.div_ceil(cols)).into_par_iter().for_each(|t| {
                let j0 = t * cols;
                band(0, m, j0, cols.min(n - j0), out.ptr());
            })
        });
    }
}
