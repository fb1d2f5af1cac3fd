//! The GEMM driver: cache blocking, packing, threading and the f32 epilogue around a [`Kernel`].
//!
//! Loop order (BLIS style): for each k-block `pc` the whole `B[pc, :]` is packed once (in parallel), then
//! tasks of `mc × nc` output each pack their `A[ic, pc]` block into a thread-local buffer and sweep the
//! micro-kernel over it. On the last k-block a task applies the epilogue to its own (cache-warm) region.

use std::cell::RefCell;

use rayon::prelude::*;

use super::pack::{pack_a, pack_b};
use super::{active_kernel, Kernel, MatRef, MAX_K_I32, MAX_MR, MAX_NR};
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
        Blocking { mc: 96, nc: 1024, kc: 2048 }
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
    fn at(&self, i: usize) -> f32 {
        match self {
            Scale::Scalar(s) => *s,
            Scale::PerIndex(v) => v[i],
        }
    }
    fn check(&self, arg: &'static str, n: usize, what: &str) -> Result<()> {
        match self {
            Scale::Scalar(s) if !s.is_finite() => Err(Error::invalid(arg, format!("must be finite, got {s}"))),
            Scale::Scalar(_) => Ok(()),
            Scale::PerIndex(v) => {
                if v.len() != n {
                    return Err(Error::invalid(
                        arg,
                        format!("expected a scalar or {n} values (one per {what}), got {}", v.len()),
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
    ToF32 { sa: Scale<'a>, sb: Scale<'a>, bias: Option<&'a [f32]> },
}

#[derive(Clone, Copy)]
struct OutPtr(*mut i32);
// SAFETY: tasks write disjoint regions of the output; the pointer outlives the parallel section.
unsafe impl Send for OutPtr {}
unsafe impl Sync for OutPtr {}

impl OutPtr {
    // A method (not field access) so closures capture the Send wrapper, not the raw pointer.
    #[inline]
    fn ptr(self) -> *mut i32 {
        self.0
    }
}

thread_local! {
    static A_BUF: RefCell<Vec<i8>> = const { RefCell::new(Vec::new()) };
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
        _ => Err(Error::invalid("out", format!("expected {m}x{n} = {} elements, got {len}", m.saturating_mul(n)))),
    }
}

/// `c = a · b` (row-major `M×N` i32) with the active kernel. Fails if `K > MAX_K_I32`.
pub fn gemm_i8(a: &MatRef, b: &MatRef, c: &mut [i32]) -> Result<()> {
    gemm_i8_with(active_kernel()?, Blocking::default(), a, b, c)
}

/// `c = a · b` with an explicit kernel and blocking (tests and benches use this).
pub fn gemm_i8_with(kernel: &dyn Kernel, blk: Blocking, a: &MatRef, b: &MatRef, c: &mut [i32]) -> Result<()> {
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
    run(kernel, blk, a, b, c.as_mut_ptr(), &Epilogue::None);
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
    gemm_i8_f32_with(active_kernel()?, Blocking::default(), a, b, scale_a, scale_b, bias, c)
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
    check_out(c.len(), m, n)?;
    scale_a.check("scale_a", m, "row of a")?;
    scale_b.check("scale_b", n, "column of b")?;
    if let Some(bv) = bias {
        Scale::PerIndex(bv).check("bias", n, "column of b")?;
    }
    if m == 0 || n == 0 {
        return Ok(());
    }
    if k <= MAX_K_I32 {
        // The f32 output doubles as i32 scratch: same size and alignment, converted in place per task.
        let out = c.as_mut_ptr() as *mut i32;
        run(kernel, blk, a, b, out, &Epilogue::ToF32 { sa: scale_a, sb: scale_b, bias });
        return Ok(());
    }
    // Large K: INT32 partial products over K-chunks that cannot overflow, accumulated in f32.
    let chunk = MAX_K_I32 / 64 * 64;
    let mut acc = vec![0i32; m * n];
    c.fill(0.0);
    let mut k0 = 0;
    while k0 < k {
        let kc = chunk.min(k - k0);
        let a_sub = MatRef::new(&a.data()[k0 * a.col_stride()..], m, kc, a.row_stride(), a.col_stride())?;
        let b_sub = MatRef::new(&b.data()[k0 * b.row_stride()..], kc, n, b.row_stride(), b.col_stride())?;
        run(kernel, blk, &a_sub, &b_sub, acc.as_mut_ptr(), &Epilogue::None);
        threads::install(|| {
            c.par_chunks_mut(n).zip(acc.par_chunks(n)).enumerate().for_each(|(i, (crow, arow))| {
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

/// Converts rows `i0..i0+mm`, columns `j0..j0+nn` of the i32 output (row stride `ldc`) to f32 in place.
///
/// # Safety
/// `out` covers that region and no other thread touches it.
unsafe fn epilogue_f32(
    out: *mut i32,
    ldc: usize,
    (i0, mm): (usize, usize),
    (j0, nn): (usize, usize),
    sa: &Scale,
    sb: &Scale,
    bias: Option<&[f32]>,
) {
    for i in i0..i0 + mm {
        let row = out.add(i * ldc + j0);
        let s = sa.at(i);
        let acc = std::slice::from_raw_parts(row as *const i32, nn);
        let mut tmp = [0f32; 256];
        let mut j = 0;
        while j < nn {
            let w = 256.min(nn - j);
            for t in 0..w {
                let mut v = acc[j + t] as f32 * (s * sb.at(j0 + j + t));
                if let Some(bv) = bias {
                    v += bv[j0 + j + t];
                }
                tmp[t] = v;
            }
            std::ptr::copy_nonoverlapping(tmp.as_ptr(), (row as *mut f32).add(j), w);
            j += w;
        }
    }
}

/// Chooses task sizes so there are enough tasks for the threads.
fn task_sizes(kernel: &dyn Kernel, blk: Blocking, m: usize, n: usize, nthreads: usize) -> (usize, usize) {
    let (mr, nr) = (kernel.mr(), kernel.nr());
    let mut mc = blk.mc.max(mr).div_ceil(mr) * mr;
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
    }
    (mc, nc)
}

fn run(kernel: &dyn Kernel, blk: Blocking, a: &MatRef, b: &MatRef, out: *mut i32, epi: &Epilogue) {
    let (m, k, n) = (a.rows(), a.cols(), b.cols());
    if m == 0 || n == 0 {
        return;
    }
    let out = OutPtr(out);
    let (mr, nr, ku) = (kernel.mr(), kernel.nr(), kernel.ku());
    assert!(mr <= MAX_MR && nr <= MAX_NR && ku >= 1, "kernel {} declares an oversized tile", kernel.name());
    threads::install(|| {
        let nthreads = rayon::current_num_threads();
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
        let (mc, nc) = task_sizes(kernel, blk, m, n, nthreads);
        let n_panels = n.div_ceil(nr);
        let kblocks = k.div_ceil(kc_max);
        let mut bpack: Vec<i8> = Vec::new();
        let mut bsum: Vec<i32> = vec![0; n_panels * nr];
        for pb in 0..kblocks {
            let k0 = pb * kc_max;
            let kc = kc_max.min(k - k0);
            let kgroups = kc.div_ceil(ku);
            let bpanel_len = kgroups * nr * ku;
            bpack.resize(n_panels * bpanel_len, 0);
            // Pack B[k0.., :] in parallel chunks of whole panels.
            let panels_per_chunk = (n_panels.div_ceil(nthreads * 4)).max(1);
            bpack
                .par_chunks_mut(panels_per_chunk * bpanel_len)
                .zip(bsum.par_chunks_mut(panels_per_chunk * nr))
                .enumerate()
                .for_each(|(ci, (dst, sums))| {
                    let c0 = ci * panels_per_chunk * nr;
                    let cols = (panels_per_chunk * nr).min(n - c0);
                    pack_b(dst, sums, b, k0, kc, c0, cols, nr, ku);
                });
            let accumulate = pb > 0;
            let last = pb + 1 == kblocks;
            let m_tasks = m.div_ceil(mc);
            let n_tasks = n.div_ceil(nc);
            let bpack = &bpack;
            let bsum = &bsum;
            (0..m_tasks * n_tasks).into_par_iter().for_each(|t| {
                let (ti, tj) = (t / n_tasks, t % n_tasks);
                let i0 = ti * mc;
                let mm = mc.min(m - i0);
                let j0 = tj * nc;
                let nn = nc.min(n - j0);
                let apanel_len = kgroups * mr * ku;
                A_BUF.with(|cell| {
                    let mut abuf = cell.borrow_mut();
                    let need = mm.div_ceil(mr) * apanel_len;
                    if abuf.len() < need {
                        abuf.resize(need, 0);
                    }
                    pack_a(&mut abuf[..need], a, i0, mm, k0, kc, mr, ku, kernel.a_shifted());
                    let mut edge = [0i32; MAX_MR * MAX_NR];
                    let q0 = j0 / nr;
                    for q in 0..nn.div_ceil(nr) {
                        let jj = j0 + q * nr;
                        let ncols = nr.min(n - jj);
                        let bp = bpack[(q0 + q) * bpanel_len..].as_ptr();
                        let bs = bsum[(q0 + q) * nr..].as_ptr();
                        for p in 0..mm.div_ceil(mr) {
                            let ii = i0 + p * mr;
                            let nrows = mr.min(m - ii);
                            let ap = abuf[p * apanel_len..].as_ptr();
                            // SAFETY: panels have the lengths the kernel contract asks for; the output tile
                            // lies inside this task's region; the kernel was created for this CPU.
                            unsafe {
                                if nrows == mr && ncols == nr {
                                    kernel.tile(kgroups, ap, bp, bs, out.ptr().add(ii * n + jj), n, accumulate);
                                } else {
                                    kernel.tile(kgroups, ap, bp, bs, edge.as_mut_ptr(), nr, false);
                                    for r in 0..nrows {
                                        let dst = out.ptr().add((ii + r) * n + jj);
                                        for cc in 0..ncols {
                                            let v = edge[r * nr + cc];
                                            if accumulate {
                                                *dst.add(cc) = (*dst.add(cc)).wrapping_add(v);
                                            } else {
                                                *dst.add(cc) = v;
                                            }
                                        }
                                    }
                                }
                            }
                        }
                    }
                    if last {
                        if let Epilogue::ToF32 { sa, sb, bias } = epi {
                            // SAFETY: this task owns rows i0..i0+mm, columns j0..j0+nn.
                            unsafe { epilogue_f32(out.ptr(), n, (i0, mm), (j0, nn), sa, sb, *bias) };
                        }
                    }
                });
            });
        }
    });
}
