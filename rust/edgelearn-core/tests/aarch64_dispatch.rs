//! aarch64 run-time dispatch: the kernel picked matches what the CPU offers.
//!
//! `scripts/test-aarch64-core.sh` runs this under qemu with several `-cpu` models and sets
//! `EDGELEARN_EXPECT_KERNEL` (neon / dotprod / i8mm) to the kernel that model must select; when it is set,
//! a different choice fails the test. Without it the tests only check that dispatch is self-consistent.
#![cfg(target_arch = "aarch64")]

use edgelearn_core::gemm::{
    active_kernel, available_kernels, cpu_features, gemm_i8, kernel_by_name, MatRef,
};

/// Kernels each expectation implies, best first, and the features that must (not) be seen.
fn expectation(
    name: &str,
) -> (
    &'static [&'static str],
    &'static [&'static str],
    &'static [&'static str],
) {
    match name {
        "neon" => (&["neon", "scalar"], &["neon"], &["dotprod", "i8mm"]),
        "dotprod" => (
            &["dotprod", "neon", "scalar"],
            &["neon", "dotprod"],
            &["i8mm"],
        ),
        "i8mm" => (
            &["i8mm", "dotprod", "neon", "scalar"],
            &["neon", "dotprod", "i8mm"],
            &[],
        ),
        other => panic!("EDGELEARN_EXPECT_KERNEL={other:?}: expected neon, dotprod or i8mm"),
    }
}

fn expected_kernel() -> Option<String> {
    match std::env::var("EDGELEARN_EXPECT_KERNEL") {
        Ok(v) if !v.trim().is_empty() => Some(v.trim().to_ascii_lowercase()),
        _ => None,
    }
}

#[test]
fn active_kernel_is_the_one_this_cpu_should_pick() {
    let forced = std::env::var("EDGELEARN_KERNEL").unwrap_or_default();
    let active = active_kernel().expect("active kernel").name();
    let available: Vec<&str> = available_kernels().iter().map(|k| k.name()).collect();
    let features = cpu_features();
    eprintln!("cpu features: {features:?}; available: {available:?}; active: {active}");
    if forced.trim().is_empty() {
        assert_eq!(
            active, available[0],
            "without EDGELEARN_KERNEL the best available kernel is used"
        );
    }
    let Some(want) = expected_kernel() else {
        return;
    };
    let (kernels, present, absent) = expectation(&want);
    assert_eq!(
        active, want,
        "EDGELEARN_EXPECT_KERNEL={want} but dispatch picked {active} (features {features:?})"
    );
    assert_eq!(
        available, kernels,
        "available kernels for EDGELEARN_EXPECT_KERNEL={want}"
    );
    for f in present {
        assert!(
            features.contains(f),
            "feature {f} should be detected for {want}: {features:?}"
        );
    }
    for f in absent {
        assert!(
            !features.contains(f),
            "feature {f} should be absent for {want}: {features:?}"
        );
    }
}

#[test]
fn kernels_this_cpu_lacks_are_refused_with_the_missing_feature() {
    let available: Vec<&str> = available_kernels().iter().map(|k| k.name()).collect();
    for name in ["neon", "dotprod", "i8mm"] {
        match kernel_by_name(name) {
            Ok(k) => {
                assert_eq!(k.name(), name);
                assert!(available.contains(&name));
            }
            Err(e) => {
                assert!(
                    !available.contains(&name),
                    "{name} is available but kernel_by_name failed: {e}"
                );
                let msg = e.to_string();
                assert!(msg.contains("lacks") && msg.contains(name), "{msg}");
            }
        }
    }
    // NEON is part of the AArch64 baseline: always there.
    assert!(available.contains(&"neon"));
}

#[test]
fn active_kernel_computes_a_gemm_exactly() {
    // Goes through the cached dispatch (the path Python uses), with the i16 pair-overflow corner
    // (-128·-128 + -128·-128) in every k-pair and odd sizes that hit edge tiles.
    let (m, k, n) = (19, 37, 23);
    let a: Vec<i8> = (0..m * k)
        .map(|i| if i % 5 == 0 { 127 } else { -128 })
        .collect();
    let b: Vec<i8> = (0..k * n)
        .map(|i| if i % 7 == 3 { 1 } else { -128 })
        .collect();
    let av = MatRef::row_major(&a, m, k).unwrap();
    let bv = MatRef::row_major(&b, k, n).unwrap();
    let mut c = vec![0i32; m * n];
    gemm_i8(&av, &bv, &mut c).unwrap();
    for i in 0..m {
        for j in 0..n {
            let want: i64 = (0..k)
                .map(|p| a[i * k + p] as i64 * b[p * n + j] as i64)
                .sum();
            assert_eq!(
                c[i * n + j] as i64,
                want,
                "({i},{j}) with {}",
                active_kernel().unwrap().name()
            );
        }
    }
}
