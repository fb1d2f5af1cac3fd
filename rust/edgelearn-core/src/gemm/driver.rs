//! The GEMM driver: cache blocking, packing, threading and the f32 epilogue around a [`Kernel`].
//!
//! Loop order (BLIS style): for each k-block `pc` the whole `B[pc, :]` is packed once (in parallel), then
//! tasks of `mc × nc` output each pack their `A[ic, pc]` block into a thread-local buffer and sweep the
//! micro-kernel over it. On the last k-block a task applies the epilogue to its own (cache-warm) region.

use std::cell::RefCell;

use rayon::prelude::*;

use super::{active_kernel, Kernel, MatRef, Operand, RowsRef, MAX_K_I32, MAX_MR, MAX_NR};
use crate::error::{Error, Result};
use crate::threads;

/// Cache-blocking sizes. `mc`/`nc` are rounded to the kernel's `mr`/`nr`, `kc` to its `ku`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Blocking {
    pub mc: usize,
    pub nc: usize,
    pub kc: usize,
}

impl Default for Blocking {
    fn default() -> Self {
        Blocking {
            mc: 96,
            nc: 1024,
            kc: 2048,
        }
    }
}

/// A scale factor: one for the whole operand, or one per row of A / per column of B.
#[derive(Clone, Copy, Debug)]
pub enum Scale<'a> {
    Scalar(f32),
    PerIndex(&'a [f32]),
}

impl Scale<'_> {
    #[inline]
    pub(crate) fn at(&self, i: usize) -> f32 {
        match self {
            Scale::Scalar(s) => *s,
            Scale::PerIndex(v) => v[i],
        }
    }
    fn check(&self, arg: &'static str, n: usize, what: &str) -> Result<()> {
        match self {
            Scale::Scalar(s) if !s.is_finite() => {
                Err(Error::invalid(arg, format!("must be finite, got {s}")))
            }
            Scale::Scalar(_) => Ok(()),
            Scale::PerIndex(v) => {
                if v.len() != n {
                    return Err(Error::invalid(
                        arg,
                        format!(
                            "expected a scalar or {n} values (one per {what}), got {}",
                            v.len()
                        ),
                    ));
                }
                match v.iter().position(|x| !x.is_finite()) {
                    Some(index) => Err(Error::NonFinite { arg, index }),
                    None => Ok(()),
                }
            }
        }
    }
}

enum Epilogue<'a> {
    None,
    /// Convert the i32 region in place to `acc·(sa[i]·sb[j]) + bias[j]` as f32.
    ToF32 {
        sa: Scale<'a>,
        sb: Scale<'a>,
        bias: Option<&'a [f32]>,
    },
}

thread_local! {
    static A_BUF: RefCell<PackBuf> = RefCell::new(PackBuf::default());
}

/// Naive triple-loop reference (the test oracle): row-major `M×N` result in i64, independent of packing.
pub fn gemm_reference(a: &MatRef, b: &MatRef) -> Result<Vec<i64>> {
    check_dims(a, b)?;
    let (m, k, n) = (a.rows(), a.cols(), b.cols());
    let mut c = vec![0i64; m * n];
    for i in 0..m {
        for p in 0..k {
            let av = a.get(i, p) as i64;
            for j in 0..n {
                c[i * n + j] += av * b.get(p, j) as i64;
            }
        }
    }
    Ok(c)
}

fn check_dims(a: &MatRef, b: &MatRef) -> Result<()> {
    if a.cols() != b.rows() {
        return Err(Error::invalid(
            "b",
            format!(
                "inner dimensions differ: a is {}x{}, b is {}x{} (a.shape[1] must equal b.shape[0])",
                a.rows(),
                a.cols(),
                b.rows(),
                b.cols()
            ),
        ));
    }
    Ok(())
}

fn check_out(len: usize, m: usize, n: usize) -> Result<()> {
    match m.checked_mul(n) {
        Some(x) if x == len => Ok(()),
        _ => Err(Error::invalid(
            "out",
            format!(
                "expected {m}x{n} = {} elements, got {len}",
                m.saturating_mul(n)
            ),
        )),
    }
}

/// The output length, scales and bias of an `M×N` f32 GEMM.
fn check_f32_outputs(
    len: usize,
    m: usize,
    n: usize,
    scale_a: &Scale,
    scale_b: &Scale,
    bias: Option<&[f32]>,
) -> Result<()> {
    check_out(len, m, n)?;
    scale_a.check("scale_a", m, "row of a")?;
    scale_b.check("scale_b", n, "column of b")?;
    if let Some(bv) = bias {
        Scale::PerIndex(bv).check("bias", n, "column of b")?;
    }
    Ok(())
}

/// `c = a · b` (row-major `M×N` i32) with the active kernel. Fails if `K > MAX_K_I32`.
pub fn gemm_i8(a: &MatRef, b: &MatRef, c: &mut [i32]) -> Result<()> {
    gemm_i8_with(active_kernel()?, Blocking::default(), a, b, c)
}

/// `c = a · b` with an explicit kernel and blocking (tests and benches use this).
pub fn gemm_i8_with(
    kernel: &dyn Kernel,
    blk: Blocking,
    a: &MatRef,
    b: &MatRef,
    c: &mut [i32],
) -> Result<()> {
    check_dims(a, b)?;
    check_out(c.len(), a.rows(), b.cols())?;
    if a.cols() > MAX_K_I32 {
        return Err(Error::overflow(
            "a",
            format!(
                "K = {} exceeds {MAX_K_I32}: the INT32 result could overflow; use gemm_i8_f32, which splits K",
                a.cols()
            ),
        ));
    }
    run(
        kernel,
        blk,
        Operand::Strided(*a),
        Operand::Strided(*b),
        c.as_mut_ptr(),
        &Epilogue::None,
    );
    Ok(())
}

/// `c = (a · b) · (scale_a[i] · scale_b[j]) + bias[j]` as f32 (row-major `M×N`), any `K`.
pub fn gemm_i8_f32(
    a: &MatRef,
    b: &MatRef,
    scale_a: Scale,
    scale_b: Scale,
    bias: Option<&[f32]>,
    c: &mut [f32],
) -> Result<()> {
    gemm_i8_f32_with(
        active_kernel()?,
        Blocking::default(),
        a,
        b,
        scale_a,
        scale_b,
        bias,
        c,
    )
}

#[allow(clippy::too_many_arguments)]
pub fn gemm_i8_f32_with(
    kernel: &dyn Kernel,
    blk: Blocking,
    a: &MatRef,
    b: &MatRef,
    scale_a: Scale,
    scale_b: Scale,
    bias: Option<&[f32]>,
    c: &mut [f32],
) -> Result<()> {
    check_dims(a, b)?;
    let (m, k, n) = (a.rows(), a.cols(), b.cols());
    check_f32_outputs(c.len(), m, n, &scale_a, &scale_b, bias)?;
    if m == 0 || n == 0 {
        return Ok(());
    }
    if k <= MAX_K_I32 {
        // The f32 output doubles as i32 scratch: same size and alignment, converted in place per task.
        let out = c.as_mut_ptr() as *mut i32;
        run(
            kernel,
            blk,
            Operand::Strided(*a),
            Operand::Strided(*b),
            out,
            &Epilogue::ToF32 {
                sa: scale_a,
                sb: scale_b,
                bias,
            },
        );
        return Ok(());
    }
    // Large K: INT32 partial products over K-chunks that cannot overflow, accumulated in f32.
    let chunk = MAX_K_I32 / 64 * 64;
    let mut acc = vec![0i32; m * n];
    c.fill(0.0);
    let mut k0 = 0;
    while k0 < k {
        let kc = chunk.min(k - k0);
        let a_sub = MatRef::new(
            &a.data()[k0 * a.col_stride()..],
            m,
            kc,
            a.row_stride(),
            a.col_stride(),
        )?;
        let b_sub = MatRef::new(
            &b.data()[k0 * b.row_stride()..],
            kc,
            n,
            b.row_stride(),
            b.col_stride(),
        )?;
        run(
            kernel,
            blk,
            Operand::Strided(a_sub),
            Operand::Strided(b_sub),
            acc.as_mut_ptr(),
            &Epilogue::None,
        );
        threads::install(|| {
            c.par_chunks_mut(n)
                .zip(acc.par_chunks(n))
                .enumerate()
                .for_each(|(i, (crow, arow))| {
                    let sa = scale_a.at(i);
                    for (j, (cv, &av)) in crow.iter_mut().zip(arow).enumerate() {
                        *cv += av as f32 * (sa * scale_b.at(j));
                    }
                })
        });
        k0 += kc;
    }
    if let Some(bv) = bias {
        for row in c.chunks_mut(n) {
            for (cv, &bb) in row.iter_mut().zip(bv) {
                *cv += bb;
            }
        }
    }
    Ok(())
}

/// `c = (a · b) · (scale_a[i] · scale_b[j]) + bias[j]` as f32 (row-major `M×N`) with `b` given by its rows
/// (an implicit im2col, see [`RowsRef`]); `K` at most [`MAX_K_I32`].
pub fn gemm_i8_f32_rows(
    a: &MatRef,
    b: &RowsRef,
    scale_a: Scale,
    scale_b: Scale,
    bias: Option<&[f32]>,
    c: &mut [f32],
) -> Result<()> {
    gemm_i8_f32_rows_with(
        active_kernel()?,
        Blocking::default(),
        a,
        b,
        scale_a,
        scale_b,
        bias,
        c,
    )
}

/// [`gemm_i8_f32_rows`] with an explicit kernel and blocking (tests use this).
#[allow(clippy::too_many_arguments)]
pub fn gemm_i8_f32_rows_with(
    kernel: &dyn Kernel,
    blk: Blocking,
    a: &MatRef,
    b: &RowsRef,
    scale_a: Scale,
    scale_b: Scale,
    bias: Option<&[f32]>,
    c: &mut [f32],
) -> Result<()> {
    let (m, k, n) = (a.rows(), a.cols(), b.cols());
    if k != b.rows() {
        return Err(Error::invalid(
            "b",
            format!(
                "inner dimensions differ: a is {m}x{k}, b has {} rows",
                b.rows()
            ),
        ));
    }
    if k > MAX_K_I32 {
        return Err(Error::overflow(
            "a",
            format!("K = {k} exceeds {MAX_K_I32}: the INT32 result could overflow"),
        ));
    }
    check_f32_outputs(c.len(), m, n, &scale_a, &scale_b, bias)?;
    if m == 0 || n == 0 {
        return Ok(());
    }
    run(
        kernel,
        blk,
        Operand::Strided(*a),
        Operand::Rows(*b),
        c.as_mut_ptr() as *mut i32,
        &Epilogue::ToF32 {
            sa: scale_a,
            sb: scale_b,
            bias,
        },
    );
    Ok(())
}

/// `c = a · b` (row-major `M×N` i32) with `a` given by its rows: row `i` of `a` is the run
/// `a.row(i)` of `K` values (an implicit im2col as the left operand, see [`RowsRef`]). Fails if
/// `K > MAX_K_I32`.
pub fn gemm_i8_rows_a(a: &RowsRef, b: &MatRef, c: &mut [i32]) -> Result<()> {
    gemm_i8_rows_a_with(active_kernel()?, Blocking::default(), a, b, c)
}

/// [`gemm_i8_rows_a`] with an explicit kernel and blocking (tests use this).
pub fn gemm_i8_rows_a_with(
    kernel: &dyn Kernel,
    blk: Blocking,
    a: &RowsRef,
    b: &MatRef,
    c: &mut [i32],
) -> Result<()> {
    let (m, k) = (a.rows(), a.cols());
    if k != b.rows() {
        return Err(Error::invalid(
            "b",
            format!(
                "inner dimensions differ: a is {m}x{k}, b is {}x{}",
                b.rows(),
                b.cols()
            ),
        ));
    }
    check_out(c.len(), m, b.cols())?;
    if k > MAX_K_I32 {
        return Err(Error::overflow(
            "a",
            format!("K = {k} exceeds {MAX_K_I32}: the INT32 result could overflow"),
        ));
    }
    run(
        kernel,
        blk,
        Operand::Rows(*a),
        Operand::Strided(*b),
        c.as_mut_ptr(),
        &Epilogue::None,
    );
    Ok(())
}

crate::simd::avx2_multiversion! {
/// Converts rows `i0..i0+mm`, columns `j0..j0+nn` of the i32 output (row stride `ldc`) to f32 in place.
///
/// Every element is `acc as f32 * (sa[i] * sb[j])`, then `+ bias[j]`, in that order whatever the kernel,
/// so results are bit-identical across kernels and thread counts. The f32 bits are stored into the i32
/// slots they replace (same size and alignment).
///
/// # Safety
/// `out` covers that region and no other thread touches it.
unsafe fn epilogue_f32(
    out: *mut i32,
    ldc: usize,
    rows: (usize, usize),
    cols: (usize, usize),
    sa: &Scale,
    sb: &Scale,
    bias: Option<&[f32]>,
) {
    let ((i0, mm), (j0, nn)) = (rows, cols);
    let bias = bias.map(|b| &b[j0..j0 + nn]);
    let sb = match sb {
        Scale::Scalar(x) => Scale::Scalar(*x),
        Scale::PerIndex(v) => Scale::PerIndex(&v[j0..j0 + nn]),
    };
    for i in i0..i0 + mm {
        let row = std::slice::from_raw_parts_mut(out.add(i * ldc + j0), nn);
        let s = sa.at(i);
        // One loop per case, so each compiles to straight vector code.
        match (&sb, bias) {
            (Scale::Scalar(b), None) => {
                let f = s * b;
                for e in row.iter_mut() {
                    *e = (*e as f32 * f).to_bits() as i32;
                }
            }
            (Scale::Scalar(b), Some(bv)) => {
                let f = s * b;
                for (e, &c) in row.iter_mut().zip(bv) {
                    *e = (*e as f32 * f + c).to_bits() as i32;
                }
            }
            (Scale::PerIndex(sv), None) => {
                for (e, &t) in row.iter_mut().zip(*sv) {
                    *e = (*e as f32 * (s * t)).to_bits() as i32;
                }
            }
            (Scale::PerIndex(sv), Some(bv)) => {
                for ((e, &t), &c) in row.iter_mut().zip(*sv).zip(bv) {
                    *e = (*e as f32 * (s * t) + c).to_bits() as i32;
                }
            }
        }
    }
}
}

/// Shrinks the task tile (`mc`, `nc`) so the threads get equal work: with few tasks, a count that is not a
/// multiple of the threads leaves one idle at the end (64 row panels on 2 threads: 16 tasks of 4 panels,
/// not 11 of 6; 144×32 outputs: split the 2 column panels rather than 9 row panels).
fn balance_tasks(
    m: usize,
    n: usize,
    mr: usize,
    nr: usize,
    mc: usize,
    nc: usize,
    nthreads: usize,
) -> (usize, usize) {
    let (pm, pn) = (m.div_ceil(mr), n.div_ceil(nr));
    let (mp0, np0) = (mc / mr, nc / nr);
    let tasks = |mp: usize, np: usize| pm.div_ceil(mp) * pn.div_ceil(np);
    // Useful work over the work of the busiest thread (in tiles) times the threads: 1 is perfect balance.
    let score = |mp: usize, np: usize| {
        let busiest = tasks(mp, np).div_ceil(nthreads) * mp.min(pm) * np.min(pn);
        (pm * pn) as f64 / (busiest * nthreads) as f64
    };
    let mut best = (mp0, np0);
    let mut best_score = score(mp0, np0);
    for np in [np0, np0.div_ceil(2), np0.div_ceil(4)] {
        for mp in (1..=mp0).rev() {
            let sc = score(mp, np);
            let enough = tasks(mp, np) >= 2 * nthreads;
            let best_enough = tasks(best.0, best.1) >= 2 * nthreads;
            // Clearly better balance wins; at equal balance, enough tasks, then bigger tasks.
            let better = sc > best_score + 0.02
                || (sc > best_score - 0.02
                    && ((enough && !best_enough)
                        || (enough == best_enough && mp * np > best.0 * best.1)));
            if better {
                best = (mp, np);
                best_score = sc;
            }
        }
    }
    (best.0 * mr, best.1 * nr)
}

/// Chooses task sizes so there are enough tasks for the threads.
///
/// `mc` rows are meant for a `kc`-deep block: when K is shallower, a task takes proportionally more rows
/// (the packed A block keeps its size), so small-K GEMMs are not dominated by per-task overhead.
fn task_sizes(
    kernel: &dyn Kernel,
    blk: Blocking,
    m: usize,
    k: usize,
    n: usize,
    nthreads: usize,
) -> (usize, usize) {
    let (mr, nr) = (kernel.mr(), kernel.nr());
    let depth = k.clamp(1, blk.kc.max(1));
    let rows = blk.mc.saturating_mul(blk.kc.max(1) / depth);
    let mut mc = rows.max(mr).div_ceil(mr) * mr;
    let mut nc = blk.nc.max(nr).div_ceil(nr) * nr;
    mc = mc.min(m.div_ceil(mr) * mr);
    nc = nc.min(n.div_ceil(nr) * nr);
    if nthreads > 1 {
        let want = 2 * nthreads;
        loop {
            let tasks = m.div_ceil(mc) * n.div_ceil(nc);
            if tasks >= want {
                break;
            }
            if mc > mr && (mc >= nc || nc <= nr) {
                mc = (mc / 2).div_ceil(mr) * mr;
            } else if nc > nr {
                nc = (nc / 2).div_ceil(nr) * nr;
            } else {
                break;
            }
        }
        (mc, nc) = balance_tasks(m, n, mr, nr, mc, nc, nthreads);
    }
    (mc, nc)
}

fn run(kernel: &dyn Kernel, blk: Blocking, a: Operand, b: Operand, out: *mut i32, epi: &Epilogue) {
    let (m, k, n) = (a.rows(), a.cols(), b.cols());
    debug_assert_eq!(k, b.rows());
    if m == 0 || n == 0 {
        return;
    }
    // tasks write disjoint tiles of the output
    let out = crate::threads::OutPtr(out);
    let (mr, nr, ku) = (kernel.mr(), kernel.nr(), kernel.ku());
    assert!(
        mr <= MAX_MR && nr <= MAX_NR && ku >= 1,
        "kernel {} declares an oversized tile",
        kernel.name()
    );
    let body = |nthreads: usize| {
        if k == 0 {
            // SAFETY: `out` has m*n elements (checked by the callers).
            let c = unsafe { std::slice::from_raw_parts_mut(out.ptr(), m * n) };
            c.fill(0);
            if let Epilogue::ToF32 { sa, sb, bias } = epi {
                unsafe { epilogue_f32(out.ptr(), n, (0, m), (0, n), sa, sb, *bias) };
            }
            return;
        }
        let kc_max = blk.kc.max(ku).div_ceil(ku) * ku;
        let (mc, nc) = task_sizes(kernel, blk, m, k, n, nthreads);
        let n_panels = n.div_ceil(nr);
        let kblocks = k.div_ceil(kc_max);
        let kgroups_max = kc_max.min(k).div_ceil(ku);
        let mut bufs = SharedBuffers::take();
        let (bpack, bsum) = bufs.get(n_panels * kgroups_max * nr * ku, n_panels * nr);
        for pb in 0..kblocks {
            let k0 = pb * kc_max;
            let kc = kc_max.min(k - k0);
            let kgroups = kc.div_ceil(ku);
            let bpanel_len = kgroups * nr * ku;
            let bpack = &mut bpack[..n_panels * bpanel_len];
            // Pack B[k0.., :] in parallel chunks of whole panels.
            let panels_per_chunk = if nthreads == 1 {
                n_panels
            } else {
                n_panels.div_ceil(nthreads * 4).max(1)
            };
            if panels_per_chunk >= n_panels {
                kernel.pack_b_block(bpack, bsum, &b, k0, kc, 0, n);
            } else {
                bpack
                    .par_chunks_mut(panels_per_chunk * bpanel_len)
                    .zip(bsum.par_chunks_mut(panels_per_chunk * nr))
                    .enumerate()
                    .for_each(|(ci, (dst, sums))| {
                        let c0 = ci * panels_per_chunk * nr;
                        let cols = (panels_per_chunk * nr).min(n - c0);
                        kernel.pack_b_block(dst, sums, &b, k0, kc, c0, cols);
                    });
            }
            let accumulate = pb > 0;
            let last = pb + 1 == kblocks;
            let m_tasks = m.div_ceil(mc);
            let n_tasks = n.div_ceil(nc);
            let bpack = &*bpack;
            let bsum = &*bsum;
            let task = |t: usize| {
                let (ti, tj) = (t / n_tasks, t % n_tasks);
                let i0 = ti * mc;
                let mm = mc.min(m - i0);
                let j0 = tj * nc;
                let nn = nc.min(n - j0);
                let apanel_len = kernel.a_panel_bytes(kgroups);
                A_BUF.with(|cell| {
                    let mut abuf = cell.borrow_mut();
                    let abuf = abuf.bytes(mm.div_ceil(mr) * apanel_len);
                    kernel.pack_a_block(abuf, &a, i0, mm, k0, kc);
                    let q0 = j0 / nr;
                    let tile_at = |p: usize, q: usize| {
                        let jj = j0 + q * nr;
                        let ncols = nr.min(n - jj);
                        let bp = bpack[(q0 + q) * bpanel_len..].as_ptr();
                        let bs = bsum[(q0 + q) * nr..].as_ptr();
                        let ii = i0 + p * mr;
                        let nrows = mr.min(m - ii);
                        let ap = abuf[p * apanel_len..].as_ptr();
                        // SAFETY: panels have the lengths the kernel contract asks for; the output tile
                        // lies inside this task's region; the kernel was created for this CPU.
                        unsafe {
                            any_tile(
                                kernel,
                                kgroups,
                                ap,
                                bp,
                                bs,
                                out.ptr().add(ii * n + jj),
                                n,
                                accumulate,
                                nrows,
                                ncols,
                            );
                        }
                    };
                    let (row_panels, col_panels) = (mm.div_ceil(mr), nn.div_ceil(nr));
                    if kgroups <= SHALLOW_KGROUPS {
                        // Shallow K: a tile is mostly its stores. Along a row panel, the `mr` rows are
                        // written left to right, `mr` sequential streams the prefetchers follow; down a
                        // column panel every tile would touch `mr` new lines far apart (a latency-bound
                        // read-for-ownership each, once the output exceeds the caches).
                        for p in 0..row_panels {
                            for q in 0..col_panels {
                                tile_at(p, q);
                            }
                        }
                    } else {
                        // Deep K: the B panel stays in L1 while the A panels of the block stream past.
                        for q in 0..col_panels {
                            for p in 0..row_panels {
                                tile_at(p, q);
                            }
                        }
                    }
                    if last {
                        if let Epilogue::ToF32 { sa, sb, bias } = epi {
                            // SAFETY: this task owns rows i0..i0+mm, columns j0..j0+nn.
                            unsafe {
                                epilogue_f32(out.ptr(), n, (i0, mm), (j0, nn), sa, sb, *bias)
                            };
                        }
                    }
                });
            };
            if nthreads == 1 {
                (0..m_tasks * n_tasks).for_each(task);
            } else {
                (0..m_tasks * n_tasks).into_par_iter().for_each(task);
            }
        }
        bufs.give_back();
    };
    // A small product (the classifier of a CNN, say) runs on the calling thread: handing it to the pool
    // costs more than the work.
    if m.saturating_mul(n).saturating_mul(k) < SMALL_GEMM_MACS {
        body(1);
    } else {
        threads::install(|| body(rayon::current_num_threads()));
    }
}

/// Up to this many k-groups (K ≤ 64 with 4 bytes a group) a task walks its tiles along row panels (see
/// `run`): a tile's 16 stores then outweigh its products. One thread, batch 32, the 1x1 layer 144→24 at
/// 28x28 of MobileNetV2: its INT8 `dX` (K = 24) took 9.8 ms walking down column panels, 2.4 ms along rows
/// (3.2 and 2.1 ms in a quieter hold).
const SHALLOW_KGROUPS: usize = 16;

/// Below this many multiply-accumulates a GEMM is not worth a thread hand-off.
const SMALL_GEMM_MACS: usize = 1 << 18;

/// The `nrows × ncols` tile at `c`: the kernel's tile when it is whole, else (a tile that overhangs M or
/// N) computed into a scratch tile and the valid part copied out.
///
/// # Safety
/// As for [`Kernel::tile`], except that `c` only needs `nrows` rows of `ncols` i32.
#[allow(clippy::too_many_arguments)]
unsafe fn any_tile(
    kernel: &dyn Kernel,
    kgroups: usize,
    ap: *const i8,
    bp: *const i8,
    bs: *const i32,
    c: *mut i32,
    ldc: usize,
    accumulate: bool,
    nrows: usize,
    ncols: usize,
) {
    let nr = kernel.nr();
    if nrows == kernel.mr() && ncols == nr {
        return kernel.tile(kgroups, ap, bp, bs, c, ldc, accumulate);
    }
    // Left uninitialized: the kernel overwrites the whole mr × nr tile (accumulate = false).
    let mut edge = std::mem::MaybeUninit::<[i32; MAX_MR * MAX_NR]>::uninit();
    let e = edge.as_mut_ptr() as *mut i32;
    kernel.tile(kgroups, ap, bp, bs, e, nr, false);
    for r in 0..nrows {
        let dst = c.add(r * ldc);
        let src = e.add(r * nr);
        for cc in 0..ncols {
            let v = *src.add(cc);
            *dst.add(cc) = if accumulate {
                (*dst.add(cc)).wrapping_add(v)
            } else {
                v
            };
        }
    }
}

/// 64 bytes, 64-byte aligned: packed panels start on cache lines, so kernels' vector loads never split one.
#[derive(Clone, Copy)]
#[repr(C, align(64))]
struct Line([i8; 64]);

/// A growable, cache-line aligned byte buffer that keeps its memory between GEMM calls.
#[derive(Default)]
struct PackBuf(Vec<Line>);

impl PackBuf {
    /// The first `len` bytes, growing (never shrinking) the buffer. Contents are unspecified: packing
    /// writes every byte a kernel reads, padding included.
    fn bytes(&mut self, len: usize) -> &mut [i8] {
        let lines = len.div_ceil(64);
        if self.0.len() < lines {
            self.0.resize(lines, Line([0; 64]));
        }
        // SAFETY: the Vec holds at least `len` initialized bytes; Line is plain bytes.
        unsafe { std::slice::from_raw_parts_mut(self.0.as_mut_ptr() as *mut i8, len) }
    }
}

/// The packed B block and its column sums, shared by all tasks of one call and kept for the next call on
/// the same thread (re-allocating and page-faulting a megabyte per call costs more than a small GEMM).
#[derive(Default)]
struct SharedBuffers {
    bpack: PackBuf,
    bsum: Vec<i32>,
}

thread_local! {
    /// Per calling thread, so concurrent GEMMs (one per image of a convolution, on every worker) each
    /// keep their buffer; a nested call on the same thread (work stolen while waiting) finds it taken
    /// and uses a fresh one.
    static B_BUF: RefCell<SharedBuffers> = RefCell::new(SharedBuffers::default());
}

/// Buffers larger than this are freed after the call instead of being kept.
const KEEP_BYTES: usize = 64 << 20;

impl SharedBuffers {
    /// This thread's cached buffers, or new ones if a call on this thread holds them.
    fn take() -> Self {
        B_BUF
            .try_with(|c| c.try_borrow_mut().map(|mut b| std::mem::take(&mut *b)).ok())
            .ok()
            .flatten()
            .unwrap_or_default()
    }
    fn get(&mut self, pack_len: usize, sums_len: usize) -> (&mut [i8], &mut [i32]) {
        if self.bsum.len() < sums_len {
            self.bsum.resize(sums_len, 0);
        }
        (self.bpack.bytes(pack_len), &mut self.bsum[..sums_len])
    }
    fn give_back(self) {
        if self.bpack.0.len() * 64 <= KEEP_BYTES {
            let _ = B_BUF.try_with(|c| {
                if let Ok(mut b) = c.try_borrow_mut() {
                    if b.bpack.0.len() <= self.bpack.0.len() {
                        *b = self;
                    }
                }
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::balance_tasks;

    #[test]
    fn tasks_split_evenly_across_threads() {
        // 1024³ with 16×16 tiles on 2 threads: 16 tasks of 4 row panels instead of 11 of 6.
        assert_eq!(balance_tasks(1024, 1024, 16, 16, 96, 1024, 2), (64, 1024));
        // dW = dYᵀ·X, 144×32 outputs: 9 row panels do not halve, 2 column panels do.
        let (mc, nc) = balance_tasks(144, 32, 16, 16, 32, 32, 2);
        assert_eq!(
            (144usize.div_ceil(mc) * 32usize.div_ceil(nc)) % 2,
            0,
            "mc={mc} nc={nc}"
        );
        // Small K, tall A: an even number of nearly equal row blocks.
        let (mc, _) = balance_tasks(32768, 16, 16, 16, 455 * 16, 16, 2);
        assert_eq!(32768usize.div_ceil(mc) % 2, 0);
        assert!(mc >= 300 * 16, "tasks stay large: mc={mc}");
    }
}
