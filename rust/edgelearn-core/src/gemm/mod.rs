//! INT8 GEMM: `C[i32] = A[i8] · B[i8]`, and a fused variant rescaling to f32 with a bias.
//!
//! Layout handling lives in packing, never in the tile loops: `A` and `B` are [`MatRef`] views with
//! arbitrary element strides (or [`RowsRef`] row lists), so `X·Wᵀ`, `dY·W` and `dYᵀ·X` all read their
//! operands in place. Each [`Kernel`] packs its own panels (the generic packers of `pack` unless it has
//! a faster one for its layout) and its tile loop only ever sees packed panels:
//!
//! - packed A, one panel of `mr` rows: for each k-group of `ku` values, `mr` rows × `ku` bytes
//!   (`a[g][r][u]`), zero-padded past `M` and `K`, and XOR-ed with 0x80 when [`Kernel::a_shifted`]
//!   (u8·s8 instructions such as `vpdpbusd`, corrected with the column sums of B);
//! - packed B, one panel of `nr` columns: for each k-group, `nr` columns × `ku` bytes (`b[g][c][u]`),
//!   zero-padded, with the `nr` column sums of the panel over the k-block.
//!
//! The kernel is picked once at run time ([`dispatch`]); `EDGELEARN_KERNEL` forces one.
//! INT32 results cannot overflow silently: [`gemm_i8`] refuses `K > MAX_K_I32`, and [`gemm_i8_f32`] splits
//! larger `K` into chunks that each fit and accumulates them in f32.

mod dispatch;
mod driver;
mod pack;
pub mod scalar;

#[cfg(target_arch = "aarch64")]
pub mod aarch64;
#[cfg(target_arch = "x86_64")]
pub mod x86;

pub use dispatch::{
    active_kernel, available_kernels, cpu_features, kernel_by_name, set_kernel, Candidate,
    KNOWN_KERNELS,
};
pub use driver::{
    gemm_i8, gemm_i8_f32, gemm_i8_f32_rows, gemm_i8_f32_rows_with, gemm_i8_f32_with,
    gemm_i8_rows_a, gemm_i8_rows_a_with, gemm_i8_with, gemm_reference, Blocking, Scale,
};

use crate::error::{Error, Result};

/// Largest `K` for which an INT32 result can never overflow: `K·128·128 ≤ 2³¹−1`.
pub const MAX_K_I32: usize = ((i32::MAX as u64) / (128 * 128)) as usize; // 131_071

/// Largest tile any kernel may declare (bounds the stack buffer used for edge tiles).
pub const MAX_MR: usize = 32;
pub const MAX_NR: usize = 64;

/// A `K × N` INT8 matrix given by its rows: row `k` is the contiguous run
/// `data[offsets[k] .. offsets[k] + N]`, and rows may overlap. This is an implicit im2col: for a stride-1
/// convolution over a zero-padded image laid out with the padded row width, row `(c, i, j)` of the patch
/// matrix is the image read from offset `c·plane + i·width + j` (see `nn::conv::grid`). Used as the `B` operand
/// of [`gemm_i8_f32_rows`], it is packed straight from the image, with no patch matrix in memory.
#[derive(Clone, Copy, Debug)]
pub struct RowsRef<'a> {
    data: &'a [i8],
    offsets: &'a [usize],
    cols: usize,
}

impl<'a> RowsRef<'a> {
    /// Fails if a row would reach past the end of `data`.
    pub fn new(data: &'a [i8], offsets: &'a [usize], cols: usize) -> Result<Self> {
        if let Some((k, &o)) = offsets
            .iter()
            .enumerate()
            .find(|&(_, &o)| o.checked_add(cols).is_none_or(|end| end > data.len()))
        {
            return Err(Error::invalid(
                "b",
                format!(
                    "row {k} at offset {o} with {cols} columns reaches past the {} bytes of data",
                    data.len()
                ),
            ));
        }
        Ok(RowsRef {
            data,
            offsets,
            cols,
        })
    }
    pub fn rows(&self) -> usize {
        self.offsets.len()
    }
    pub fn cols(&self) -> usize {
        self.cols
    }
    /// The bytes and the row offsets (`new` checked that every row's `cols` bytes exist).
    #[inline]
    pub(crate) fn parts(&self) -> (&'a [i8], &'a [usize]) {
        (self.data, self.offsets)
    }
    /// Row `k`, columns `c0..c0+n`.
    #[inline]
    pub(crate) fn row(&self, k: usize, c0: usize, n: usize) -> &'a [i8] {
        let o = self.offsets[k] + c0;
        &self.data[o..o + n]
    }
}

/// A read-only view of an INT8 matrix with element strides (rows `rs`, columns `cs`).
#[derive(Clone, Copy, Debug)]
pub struct MatRef<'a> {
    data: &'a [i8],
    rows: usize,
    cols: usize,
    rs: usize,
    cs: usize,
}

impl<'a> MatRef<'a> {
    /// A view of `rows × cols` elements where element `(r, c)` is `data[r*rs + c*cs]`.
    /// Fails if any element would fall outside `data`.
    pub fn new(data: &'a [i8], rows: usize, cols: usize, rs: usize, cs: usize) -> Result<Self> {
        if rows > 0 && cols > 0 {
            let last = (rows - 1)
                .checked_mul(rs)
                .and_then(|x| (cols - 1).checked_mul(cs).and_then(|y| x.checked_add(y)))
                .ok_or_else(|| Error::invalid("matrix", "strides overflow the address space"))?;
            if last >= data.len() {
                return Err(Error::invalid(
                    "matrix",
                    format!(
                        "a {rows}x{cols} view with strides ({rs}, {cs}) needs {} elements, buffer has {}",
                        last + 1,
                        data.len()
                    ),
                ));
            }
        }
        Ok(MatRef {
            data,
            rows,
            cols,
            rs,
            cs,
        })
    }

    /// A row-major (C-ordered) `rows × cols` matrix.
    pub fn row_major(data: &'a [i8], rows: usize, cols: usize) -> Result<Self> {
        Self::check_len(data, rows, cols)?;
        Self::new(data, rows, cols, cols, 1)
    }

    /// A column-major (Fortran-ordered) `rows × cols` matrix.
    pub fn col_major(data: &'a [i8], rows: usize, cols: usize) -> Result<Self> {
        Self::check_len(data, rows, cols)?;
        Self::new(data, rows, cols, 1, rows)
    }

    fn check_len(data: &[i8], rows: usize, cols: usize) -> Result<()> {
        match rows.checked_mul(cols) {
            Some(n) if n == data.len() => Ok(()),
            _ => Err(Error::invalid(
                "matrix",
                format!("{rows}x{cols} elements expected, buffer has {}", data.len()),
            )),
        }
    }

    /// The transpose, as a view (no copy).
    pub fn t(self) -> Self {
        MatRef {
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
    pub fn row_stride(&self) -> usize {
        self.rs
    }
    pub fn col_stride(&self) -> usize {
        self.cs
    }
    pub fn data(&self) -> &'a [i8] {
        self.data
    }

    /// Element `(r, c)`; panics out of range (use in tests and references only).
    pub fn get(&self, r: usize, c: usize) -> i8 {
        assert!(r < self.rows && c < self.cols);
        self.data[r * self.rs + c * self.cs]
    }
}

/// A GEMM operand as the driver hands it to a kernel's packing: a strided [`MatRef`], or a [`RowsRef`]
/// (an implicit im2col) whose rows are the operand's rows (the GEMM's rows as `A`, its k-rows as `B`).
#[derive(Clone, Copy, Debug)]
pub enum Operand<'a> {
    Strided(MatRef<'a>),
    Rows(RowsRef<'a>),
}

impl Operand<'_> {
    pub fn rows(&self) -> usize {
        match self {
            Operand::Strided(m) => m.rows(),
            Operand::Rows(r) => r.rows(),
        }
    }
    pub fn cols(&self) -> usize {
        match self {
            Operand::Strided(m) => m.cols(),
            Operand::Rows(r) => r.cols(),
        }
    }
}

/// An INT8 micro-kernel: computes one `mr × nr` tile from packed panels, and packs those panels.
///
/// Implementations are zero-sized statics handed out by a [`Candidate`] only when the CPU has the
/// instructions they use. As in rten-gemm, a kernel owns its packing: the driver only ever calls
/// [`pack_a_block`](Self::pack_a_block) and [`pack_b_block`](Self::pack_b_block). Their defaults are the
/// generic packers for the kernel's `mr`, `nr`, `ku` and `a_shifted` (layout in the module docs); a kernel
/// whose layout has a faster packer (with the instructions the kernel already needs) overrides them.
pub trait Kernel: Sync + Send {
    /// Name used by `EDGELEARN_KERNEL` and reported by `backend_info()`.
    fn name(&self) -> &'static str;
    /// Rows of A per micro-tile (≤ [`MAX_MR`]).
    fn mr(&self) -> usize;
    /// Columns of B per micro-tile (≤ [`MAX_NR`]).
    fn nr(&self) -> usize;
    /// k values stored together per row/column in the packed panels (1, 2, 4, 8 or 16).
    fn ku(&self) -> usize;
    /// True when packed A holds `a ^ 0x80` (i.e. `a + 128` as u8) and the kernel subtracts
    /// `128 · colsum(B)` (passed as `bsum`) to recover the signed product.
    fn a_shifted(&self) -> bool {
        false
    }
    /// Bytes of one packed A panel of `kgroups` k-groups: `kgroups·mr·ku` in the generic layout; a kernel
    /// whose [`pack_a_block`](Self::pack_a_block) stores wider values says so here (the driver sizes the
    /// A buffer with it).
    fn a_panel_bytes(&self, kgroups: usize) -> usize {
        kgroups * self.mr() * self.ku()
    }
    /// Packs rows `r0..r0+m` and k values `k0..k0+kc` of `a` into `ceil(m/mr)` panels of
    /// [`a_panel_bytes`](Self::a_panel_bytes)`(ceil(kc/ku))` bytes at the start of `out`; generic layout:
    /// zero-padded, XOR 0x80 when `a_shifted`.
    fn pack_a_block(&self, out: &mut [i8], a: &Operand, r0: usize, m: usize, k0: usize, kc: usize) {
        pack::pack_a(
            out,
            a,
            r0,
            m,
            k0,
            kc,
            self.mr(),
            self.ku(),
            self.a_shifted(),
        )
    }
    /// Packs k values `k0..k0+kc` and columns `c0..c0+n` of `b` into `ceil(n/nr)` panels of
    /// `ceil(kc/ku)·nr·ku` bytes at the start of `out` (zero-padded), and each panel's `nr` column sums
    /// (zero past `n`) into `sums`.
    #[allow(clippy::too_many_arguments)]
    fn pack_b_block(
        &self,
        out: &mut [i8],
        sums: &mut [i32],
        b: &Operand,
        k0: usize,
        kc: usize,
        c0: usize,
        n: usize,
    ) {
        pack::pack_b(out, sums, b, k0, kc, c0, n, self.nr(), self.ku())
    }
    /// Computes the `mr × nr` tile `C = Ap · Bp` over `kgroups` k-groups.
    ///
    /// # Safety
    /// The CPU has the features this kernel was created for; `a` points to
    /// [`a_panel_bytes`](Self::a_panel_bytes)`(kgroups)` bytes, `b` to
    /// `kgroups·nr·ku` bytes, `bsum` to `nr` i32 (column sums of this B panel over these k-groups), and `c`
    /// to `mr` rows of `nr` writable i32 spaced `ldc` elements apart. If `accumulate`, the tile is added to
    /// `c`, otherwise it overwrites `c`. INT32 arithmetic wraps (the driver bounds `K` so results fit).
    #[allow(clippy::too_many_arguments)]
    unsafe fn tile(
        &self,
        kgroups: usize,
        a: *const i8,
        b: *const i8,
        bsum: *const i32,
        c: *mut i32,
        ldc: usize,
        accumulate: bool,
    );
}
