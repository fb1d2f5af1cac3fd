//! Every kernel this CPU has, bit-exact against the naive reference, on random and edge shapes and layouts.

use edgelearn_core::gemm::{
    available_kernels, gemm_i8_f32_with, gemm_i8_with, gemm_reference, kernel_by_name, Blocking,
    Kernel, MatRef, Scale, MAX_K_I32,
};
use proptest::prelude::*;

/// Small deterministic generator (tests must not depend on a crate's RNG stream across versions).
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn i8s(&mut self, n: usize) -> Vec<i8> {
        (0..n).map(|_| self.next() as i8).collect()
    }
}

#[derive(Clone, Copy, Debug)]
enum Layout {
    Row,
    Col,
}

fn view<'a>(data: &'a [i8], rows: usize, cols: usize, l: Layout) -> MatRef<'a> {
    match l {
        Layout::Row => MatRef::row_major(data, rows, cols).unwrap(),
        Layout::Col => MatRef::col_major(data, rows, cols).unwrap(),
    }
}

fn check(
    kernel: &dyn Kernel,
    blk: Blocking,
    m: usize,
    k: usize,
    n: usize,
    la: Layout,
    lb: Layout,
    a: &[i8],
    b: &[i8],
) {
    let av = view(a, m, k, la);
    let bv = view(b, k, n, lb);
    let want = gemm_reference(&av, &bv).unwrap();
    let mut got = vec![0x5555_5555i32; m * n];
    gemm_i8_with(kernel, blk, &av, &bv, &mut got).unwrap();
    for (idx, (&g, &w)) in got.iter().zip(&want).enumerate() {
        assert_eq!(
            g as i64,
            w,
            "kernel {} m={m} k={k} n={n} {la:?}/{lb:?} {blk:?}: mismatch at ({}, {})",
            kernel.name(),
            idx / n.max(1),
            idx % n.max(1)
        );
    }
}

const SHAPES: &[(usize, usize, usize)] = &[
    (1, 1, 1),
    (1, 0, 1),
    (0, 5, 3),
    (3, 5, 0),
    (2, 3, 4),
    (7, 13, 5),
    (16, 16, 16),
    (17, 33, 65),
    (31, 63, 47),
    (64, 64, 64),
    (65, 129, 33),
    (5, 1000, 3),
    (300, 27, 16),
    (144, 300, 32),
    (1, 257, 97),
    (97, 3, 1),
    (128, 7, 129),
    // shallow K (≤ 64: the driver walks tiles along row panels) and just past it, with edge panels
    (50, 24, 100),
    (40, 64, 50),
    (40, 68, 50),
];

fn blockings() -> Vec<Blocking> {
    vec![
        Blocking::default(),
        Blocking {
            mc: 8,
            nc: 16,
            kc: 16,
        },
        Blocking {
            mc: 5,
            nc: 3,
            kc: 7,
        },
    ]
}

#[test]
fn every_kernel_matches_reference_on_edge_shapes() {
    let mut rng = Rng(42);
    for kernel in available_kernels() {
        for &(m, k, n) in SHAPES {
            let a = rng.i8s(m * k);
            let b = rng.i8s(k * n);
            for la in [Layout::Row, Layout::Col] {
                for lb in [Layout::Row, Layout::Col] {
                    for blk in blockings() {
                        check(kernel, blk, m, k, n, la, lb, &a, &b);
                    }
                }
            }
        }
    }
}

#[test]
fn every_kernel_is_exact_at_extreme_values() {
    // All -128·-128 products at the largest K the i32 API accepts: the result is exactly 2^31 - 16384.
    let (m, n) = (3, 5);
    let k = MAX_K_I32;
    let a = vec![-128i8; m * k];
    let b = vec![-128i8; k * n];
    for kernel in available_kernels() {
        let mut c = vec![0i32; m * n];
        gemm_i8_with(
            kernel,
            Blocking::default(),
            &MatRef::row_major(&a, m, k).unwrap(),
            &MatRef::row_major(&b, k, n).unwrap(),
            &mut c,
        )
        .unwrap();
        assert!(
            c.iter().all(|&v| v as i64 == (k as i64) * 16384),
            "kernel {}",
            kernel.name()
        );
        // and mixed signs at ±127 / -128
        let a2: Vec<i8> = (0..m * 64)
            .map(|i| if i % 3 == 0 { 127 } else { -128 })
            .collect();
        let b2: Vec<i8> = (0..64 * n)
            .map(|i| if i % 2 == 0 { -127 } else { -128 })
            .collect();
        check(
            kernel,
            Blocking::default(),
            m,
            64,
            n,
            Layout::Row,
            Layout::Row,
            &a2,
            &b2,
        );
    }
}

#[test]
fn i32_api_refuses_k_that_could_overflow() {
    let k = MAX_K_I32 + 1;
    let a = vec![0i8; k];
    let b = vec![0i8; k];
    let mut c = vec![0i32; 1];
    let err = gemm_i8_with(
        &edgelearn_core::gemm::scalar::SCALAR,
        Blocking::default(),
        &MatRef::row_major(&a, 1, k).unwrap(),
        &MatRef::row_major(&b, k, 1).unwrap(),
        &mut c,
    )
    .unwrap_err();
    assert!(err.to_string().contains("overflow"), "{err}");
}

#[test]
fn f32_variant_splits_large_k_without_overflow() {
    let k = MAX_K_I32 * 2 + 77;
    let a = vec![-128i8; 2 * k];
    let b = vec![-128i8; k * 3];
    for kernel in available_kernels() {
        let mut c = vec![0f32; 6];
        gemm_i8_f32_with(
            kernel,
            Blocking::default(),
            &MatRef::row_major(&a, 2, k).unwrap(),
            &MatRef::row_major(&b, k, 3).unwrap(),
            Scale::Scalar(0.5),
            Scale::Scalar(0.25),
            Some(&[1.0, 2.0, 3.0]),
            &mut c,
        )
        .unwrap();
        let want = k as f64 * 16384.0 * 0.125;
        for (j, v) in c.iter().enumerate() {
            let w = want + [1.0, 2.0, 3.0][j % 3];
            assert!(
                ((*v as f64) - w).abs() / w < 1e-6,
                "kernel {} got {v} want {w}",
                kernel.name()
            );
        }
    }
}

#[test]
fn f32_epilogue_is_identical_across_kernels() {
    let mut rng = Rng(7);
    let (m, k, n) = (37, 91, 29);
    let a = rng.i8s(m * k);
    let b = rng.i8s(k * n);
    let sa: Vec<f32> = (0..m).map(|i| 0.01 + i as f32 * 1e-3).collect();
    let sb: Vec<f32> = (0..n).map(|j| 0.02 + j as f32 * 1e-3).collect();
    let bias: Vec<f32> = (0..n).map(|j| j as f32 - 3.0).collect();
    let mut outs = Vec::new();
    for kernel in available_kernels() {
        let mut c = vec![0f32; m * n];
        gemm_i8_f32_with(
            kernel,
            Blocking::default(),
            &MatRef::row_major(&a, m, k).unwrap(),
            &MatRef::row_major(&b, k, n).unwrap(),
            Scale::PerIndex(&sa),
            Scale::PerIndex(&sb),
            Some(&bias),
            &mut c,
        )
        .unwrap();
        outs.push((kernel.name(), c));
    }
    let want = gemm_reference(
        &MatRef::row_major(&a, m, k).unwrap(),
        &MatRef::row_major(&b, k, n).unwrap(),
    )
    .unwrap();
    for (name, c) in &outs {
        for i in 0..m {
            for j in 0..n {
                let w = want[i * n + j] as f32 * (sa[i] * sb[j]) + bias[j];
                assert_eq!(
                    c[i * n + j].to_bits(),
                    w.to_bits(),
                    "kernel {name} at ({i},{j})"
                );
            }
        }
    }
}

#[test]
fn unknown_or_missing_kernel_is_an_error() {
    assert!(kernel_by_name("nope")
        .err()
        .unwrap()
        .to_string()
        .contains("unknown kernel"));
    assert!(kernel_by_name("scalar").is_ok());
    #[cfg(target_arch = "x86_64")]
    assert!(kernel_by_name("neon")
        .err()
        .unwrap()
        .to_string()
        .contains("not built"));
}

#[test]
fn mismatched_inner_dims_are_rejected() {
    let a = vec![0i8; 6];
    let b = vec![0i8; 6];
    let mut c = vec![0i32; 4];
    let e = gemm_i8_with(
        &edgelearn_core::gemm::scalar::SCALAR,
        Blocking::default(),
        &MatRef::row_major(&a, 2, 3).unwrap(),
        &MatRef::row_major(&b, 2, 3).unwrap(),
        &mut c,
    )
    .unwrap_err();
    assert!(e.to_string().contains("inner dimensions"), "{e}");
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, .. ProptestConfig::default() })]
    /// Law: every kernel equals the naive product for any shape, layout, blocking and values.
    #[test]
    fn kernels_equal_reference(m in 0usize..40, k in 0usize..150, n in 0usize..40, seed in any::<u64>(),
                               la in any::<bool>(), lb in any::<bool>(), kc in 1usize..64) {
        let mut rng = Rng(seed);
        let a = rng.i8s(m * k);
        let b = rng.i8s(k * n);
        let la = if la { Layout::Row } else { Layout::Col };
        let lb = if lb { Layout::Row } else { Layout::Col };
        for kernel in available_kernels() {
            check(kernel, Blocking { mc: 16, nc: 32, kc }, m, k, n, la, lb, &a, &b);
        }
    }
}

/// `B` given by (overlapping) rows of one buffer, as the implicit im2col of a stride-1 convolution reads
/// it, gives bit for bit the result of the same matrix materialised, for every kernel, blocking and
/// edge shape (columns not a multiple of any panel width, K not a multiple of any group, one row, ...).
#[test]
fn rows_operand_equals_the_materialised_matrix() {
    use edgelearn_core::gemm::{gemm_i8_f32_rows_with, RowsRef};
    let mut rng = Rng(7);
    for kernel in available_kernels() {
        for &(m, k, n) in &[
            (1, 1, 1),
            (3, 9, 17),
            (16, 144, 224),
            (7, 13, 63),
            (33, 27, 16),
            (5, 4, 40),
        ] {
            let data = rng.i8s(k * 3 + n + 40);
            // shifted, overlapping runs, like (c, i, j) taps of a padded image
            let offsets: Vec<usize> = (0..k).map(|r| (r * 7 + r / 3) % (k * 3 + 40)).collect();
            let b_rows = RowsRef::new(&data, &offsets, n).unwrap();
            let dense: Vec<i8> = offsets
                .iter()
                .flat_map(|&o| data[o..o + n].to_vec())
                .collect();
            let a = rng.i8s(m * k);
            let am = MatRef::row_major(&a, m, k).unwrap();
            let bm = MatRef::row_major(&dense, k, n).unwrap();
            let sa: Vec<f32> = (0..m).map(|i| 0.01 + i as f32 * 1e-3).collect();
            for blk in blockings() {
                let mut want = vec![0f32; m * n];
                gemm_i8_f32_with(
                    kernel,
                    blk,
                    &am,
                    &bm,
                    Scale::PerIndex(&sa),
                    Scale::Scalar(0.5),
                    None,
                    &mut want,
                )
                .unwrap();
                let mut got = vec![f32::NAN; m * n];
                gemm_i8_f32_rows_with(
                    kernel,
                    blk,
                    &am,
                    &b_rows,
                    Scale::PerIndex(&sa),
                    Scale::Scalar(0.5),
                    None,
                    &mut got,
                )
                .unwrap();
                assert_eq!(
                    got.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                    want.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                    "kernel {} blocking {blk:?} shape {m}x{k}x{n}",
                    kernel.name()
                );
            }
        }
    }
    // a row reaching past the buffer is refused, not read
    let data = [0i8; 10];
    assert!(RowsRef::new(&data, &[0, 5], 6).is_err());
}

/// `A` given by (overlapping) rows of one buffer, as the `dW` product of a stride-1 convolution reads the
/// padded image, equals the reference product of the materialised matrix for every kernel and blocking,
/// on edge shapes: rows ending at the very end of the buffer (the vector packer must not read past it),
/// K not a multiple of any group, fewer rows than a panel, empty products.
#[test]
fn rows_as_a_operand_equals_the_materialised_matrix() {
    use edgelearn_core::gemm::{gemm_i8_rows_a_with, RowsRef};
    let mut rng = Rng(11);
    for kernel in available_kernels() {
        for &(m, k, n) in &[
            (1, 1, 1),
            (9, 1799, 16),
            (17, 13, 5),
            (288, 63, 64),
            (4, 16, 3),
            (5, 17, 33),
            (0, 9, 4),
            (6, 0, 4),
            (6, 9, 0),
        ] {
            let len = 3 * m + k + 5;
            let data = rng.i8s(len);
            // the last row ends exactly at the end of the buffer
            let offsets: Vec<usize> = (0..m)
                .map(|r| {
                    if r + 1 == m {
                        len - k
                    } else {
                        (r * 3 + r / 4) % (len - k + 1)
                    }
                })
                .collect();
            let a_rows = RowsRef::new(&data, &offsets, k).unwrap();
            let dense: Vec<i8> = offsets
                .iter()
                .flat_map(|&o| data[o..o + k].to_vec())
                .collect();
            let am = MatRef::row_major(&dense, m, k).unwrap();
            let b = rng.i8s(k * n);
            for lb in [Layout::Row, Layout::Col] {
                let bm = view(&b, k, n, lb);
                let want = gemm_reference(&am, &bm).unwrap();
                for blk in blockings() {
                    let mut got = vec![0x5555_5555i32; m * n];
                    gemm_i8_rows_a_with(kernel, blk, &a_rows, &bm, &mut got).unwrap();
                    assert_eq!(
                        got.iter().map(|&v| v as i64).collect::<Vec<_>>(),
                        want,
                        "kernel {} blocking {blk:?} shape {m}x{k}x{n} {lb:?}",
                        kernel.name()
                    );
                }
            }
        }
    }
    // mismatched inner dimensions and K past the INT32 bound are errors
    let data = [1i8; 64];
    let a = RowsRef::new(&data, &[0, 3], 10).unwrap();
    let b = [0i8; 9 * 2];
    let bm = MatRef::row_major(&b, 9, 2).unwrap();
    let e = edgelearn_core::gemm::gemm_i8_rows_a(&a, &bm, &mut [0; 4]).unwrap_err();
    assert!(e.to_string().contains("inner dimensions"), "{e}");
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 32, .. ProptestConfig::default() })]
    /// Law: a rows operand as `A` equals the product of its materialised matrix, for any row offsets.
    #[test]
    fn rows_a_equals_reference(m in 0usize..40, k in 0usize..120, n in 0usize..40, seed in any::<u64>(),
                               kc in 1usize..64, spread in 1usize..50) {
        use edgelearn_core::gemm::{gemm_i8_rows_a_with, RowsRef};
        let mut rng = Rng(seed);
        let len = k + spread;
        let data = rng.i8s(len);
        let offsets: Vec<usize> = (0..m).map(|_| (rng.next() as usize) % (spread + 1)).collect();
        let a_rows = RowsRef::new(&data, &offsets, k).unwrap();
        let dense: Vec<i8> = offsets.iter().flat_map(|&o| data[o..o + k].to_vec()).collect();
        let am = MatRef::row_major(&dense, m, k).unwrap();
        let b = rng.i8s(k * n);
        let bm = MatRef::col_major(&b, k, n).unwrap();
        let want = gemm_reference(&am, &bm).unwrap();
        for kernel in available_kernels() {
            let mut got = vec![0i32; m * n];
            gemm_i8_rows_a_with(kernel, Blocking { mc: 16, nc: 32, kc }, &a_rows, &bm, &mut got).unwrap();
            prop_assert_eq!(got.iter().map(|&v| v as i64).collect::<Vec<_>>(), want.clone());
        }
    }
}
