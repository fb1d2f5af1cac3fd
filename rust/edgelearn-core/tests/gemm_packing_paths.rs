//! Every kernel, bit-exact against the naive reference, on the shapes that exercise each packing path:
//! vector transposes of 4 lines × 4 k-groups (k contiguous) and interleaves of 16 lines (lines contiguous),
//! their overlapping last blocks, the masked partial k-group (K mod 4 ≠ 0) with live bytes after each line,
//! the bounds fallback at the end of the buffer, padded and strided views, several k-blocks, and both thread
//! counts.

use edgelearn_core::gemm::{
    available_kernels, gemm_i8_f32_with, gemm_i8_with, gemm_reference, Blocking, Kernel, MatRef,
    Scale,
};
use edgelearn_core::threads;

fn bytes(n: usize, seed: u64) -> Vec<i8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as i8
        })
        .collect()
}

/// A `rows × cols` view with leading dimension `ld ≥` its contiguous extent, in either order; the bytes
/// between lines are garbage (nonzero) so any over-read that is not masked shows up.
fn padded<'a>(data: &'a [i8], rows: usize, cols: usize, ld: usize, col_major: bool) -> MatRef<'a> {
    if col_major {
        MatRef::new(data, rows, cols, 1, ld).unwrap()
    } else {
        MatRef::new(data, rows, cols, ld, 1).unwrap()
    }
}

fn check(kernel: &dyn Kernel, blk: Blocking, a: &MatRef, b: &MatRef, what: &str) {
    let (m, n) = (a.rows(), b.cols());
    let want = gemm_reference(a, b).unwrap();
    let mut got = vec![0x5a5a_5a5ai32; m * n];
    gemm_i8_with(kernel, blk, a, b, &mut got).unwrap();
    if let Some(idx) = got.iter().zip(&want).position(|(&g, &w)| g as i64 != w) {
        panic!(
            "kernel {} {what} m={m} k={} n={n} {blk:?}: mismatch at ({}, {}): got {} want {}",
            kernel.name(),
            a.cols(),
            idx / n,
            idx % n,
            got[idx],
            want[idx]
        );
    }
}

#[test]
fn kernels_are_exact_around_tile_and_group_boundaries() {
    let blks = [
        Blocking::default(),
        Blocking {
            mc: 48,
            nc: 32,
            kc: 40,
        },
    ];
    let mut seed = 1;
    for &m in &[15usize, 16, 17, 33, 50] {
        for &k in &[3usize, 4, 5, 15, 16, 17, 27, 30, 67] {
            for &n in &[15usize, 16, 17, 35] {
                seed += 1;
                for &(am, bm) in &[(false, false), (true, false), (false, true), (true, true)] {
                    let lda = if am { m } else { k };
                    let ldb = if bm { k } else { n };
                    let a_len = if am { lda * k } else { lda * m };
                    let b_len = if bm { ldb * n } else { ldb * k };
                    let a = bytes(a_len, seed);
                    let b = bytes(b_len, seed + 1000);
                    let av = padded(&a, m, k, lda, am);
                    let bv = padded(&b, k, n, ldb, bm);
                    for kernel in available_kernels() {
                        for blk in blks {
                            check(
                                kernel,
                                blk,
                                &av,
                                &bv,
                                &format!("A col-major {am}, B col-major {bm}"),
                            );
                        }
                    }
                }
            }
        }
    }
}

#[test]
fn kernels_are_exact_on_views_with_gaps_between_lines() {
    // Leading dimensions larger than the view: the over-read of a partial k-group lands in the gap.
    let (m, k, n) = (37, 27, 19);
    for &(am, bm) in &[(false, false), (true, true), (false, true), (true, false)] {
        let (lda, ldb) = (
            if am { m + 5 } else { k + 3 },
            if bm { k + 7 } else { n + 2 },
        );
        let a = bytes(lda * if am { k } else { m }, 7);
        let b = bytes(ldb * if bm { n } else { k }, 8);
        let av = padded(&a, m, k, lda, am);
        let bv = padded(&b, k, n, ldb, bm);
        for kernel in available_kernels() {
            check(kernel, Blocking::default(), &av, &bv, "gapped views");
        }
    }
    // Element strides > 1 on both axes (the generic path).
    let a = bytes(2 * 3 * 40 * 30, 9);
    let av = MatRef::new(&a, 40, 29, 2 * 30 * 3, 3).unwrap();
    let b = bytes(29 * 2 * 21 * 2, 10);
    let bv = MatRef::new(&b, 29, 21, 2 * 21 * 2, 2).unwrap();
    for kernel in available_kernels() {
        check(kernel, Blocking::default(), &av, &bv, "strided views");
    }
}

#[test]
fn kernels_are_exact_on_scaled_down_training_shapes_in_every_order() {
    // (M, K, N) of the training GEMMs with M or K scaled down so the reference stays quick; K > kc for the
    // dW shape so several k-blocks accumulate.
    let shapes = [
        (1000, 27, 16),
        (700, 144, 32),
        (300, 288, 64),
        (144, 2500, 32),
        (64, 784, 256),
        (784, 64, 256),
    ];
    for (si, &(m, k, n)) in shapes.iter().enumerate() {
        let a = bytes(m * k, 100 + si as u64);
        let b = bytes(k * n, 200 + si as u64);
        for &(am, bm) in &[(false, false), (true, false), (false, true), (true, true)] {
            let av = if am {
                MatRef::col_major(&a, m, k)
            } else {
                MatRef::row_major(&a, m, k)
            }
            .unwrap();
            let bv = if bm {
                MatRef::col_major(&b, k, n)
            } else {
                MatRef::row_major(&b, k, n)
            }
            .unwrap();
            for kernel in available_kernels() {
                check(
                    kernel,
                    Blocking {
                        mc: 96,
                        nc: 1024,
                        kc: 1024,
                    },
                    &av,
                    &bv,
                    "training shape",
                );
            }
        }
    }
}

#[test]
fn results_do_not_depend_on_the_thread_count() {
    let (m, k, n) = (300, 200, 70);
    let a = bytes(m * k, 11);
    let b = bytes(k * n, 12);
    let av = MatRef::col_major(&a, m, k).unwrap();
    let bv = MatRef::row_major(&b, k, n).unwrap();
    let sa: Vec<f32> = (0..m).map(|i| 0.5 + i as f32 * 1e-3).collect();
    let sb: Vec<f32> = (0..n).map(|j| 0.25 + j as f32 * 1e-3).collect();
    let bias: Vec<f32> = (0..n).map(|j| j as f32 * 0.1).collect();
    let before = threads::num_threads();
    let mut outs = Vec::new();
    for t in [1, 2] {
        threads::set_num_threads(t).unwrap();
        for kernel in available_kernels() {
            check(
                kernel,
                Blocking::default(),
                &av,
                &bv,
                &format!("{t} threads"),
            );
            let mut c = vec![0f32; m * n];
            gemm_i8_f32_with(
                kernel,
                Blocking::default(),
                &av,
                &bv,
                Scale::PerIndex(&sa),
                Scale::PerIndex(&sb),
                Some(&bias),
                &mut c,
            )
            .unwrap();
            outs.push(c.iter().map(|v| v.to_bits()).collect::<Vec<_>>());
        }
    }
    threads::set_num_threads(before).unwrap();
    assert!(
        outs.windows(2).all(|w| w[0] == w[1]),
        "f32 results differ across kernels or thread counts"
    );
}
