//! With one thread, kernels run on the calling thread (a one-worker pool made of that thread): results
//! must not change, nested and concurrent callers must not deadlock, and switching back to a real pool
//! must keep working. Its own test binary, since the thread count is process-wide.

use edgelearn_core::gemm::{gemm_i8, gemm_reference, MatRef};
use edgelearn_core::threads;

/// The thread count is process-wide: the tests of this file run one at a time.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn operands(m: usize, k: usize, n: usize, seed: u64) -> (Vec<i8>, Vec<i8>) {
    let mut s = seed;
    let mut next = || {
        s = s
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (s >> 56) as i8
    };
    let a = (0..m * k).map(|_| next()).collect();
    let b = (0..k * n).map(|_| next()).collect();
    (a, b)
}

fn check(m: usize, k: usize, n: usize, seed: u64) {
    let (a, b) = operands(m, k, n, seed);
    let am = MatRef::row_major(&a, m, k).unwrap();
    let bm = MatRef::row_major(&b, k, n).unwrap();
    let mut c = vec![0i32; m * n];
    gemm_i8(&am, &bm, &mut c).unwrap();
    let want = gemm_reference(&am, &bm).unwrap();
    assert!(
        c.iter().zip(&want).all(|(&x, &y)| x as i64 == y),
        "{m}x{k}x{n}"
    );
}

#[test]
fn one_thread_runs_inline_from_any_thread_and_switches_back() {
    let _guard = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    threads::set_num_threads(1).unwrap();
    // Inside install the pool has exactly one thread: the caller.
    let caller = std::thread::current().id();
    let (n, id) = threads::install(|| (rayon::current_num_threads(), std::thread::current().id()));
    assert_eq!((n, id), (1, caller));
    // Nested installs and parallel iterators inside them stay on the caller.
    let inner = threads::install(|| threads::install(|| std::thread::current().id()));
    assert_eq!(inner, caller);
    check(67, 131, 45, 1);
    // Several OS threads at once, each with its own inline pool.
    let handles: Vec<_> = (0..4)
        .map(|t| {
            std::thread::spawn(move || {
                (0..20).for_each(|i| check(33 + t, 70 + i, 29, t as u64 * 100 + i as u64))
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
    // Back to a real pool, then to one thread again.
    threads::set_num_threads(2).unwrap();
    assert_eq!(threads::install(rayon::current_num_threads), 2);
    check(128, 300, 96, 7);
    threads::set_num_threads(1).unwrap();
    check(128, 300, 96, 8);
}

#[test]
fn the_calling_thread_takes_part_with_several_threads() {
    // (its own process state: this test file's other test switches the count too, so pin it here)
    let _guard = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    threads::set_num_threads(2).unwrap();
    std::thread::spawn(|| {
        // a fresh thread in no pool becomes worker 0 of a 2-thread pool: kernels start on it
        assert!(threads::runs_on_caller());
        assert_eq!(threads::install(rayon::current_num_threads), 2);
        assert_eq!(threads::install(rayon::current_thread_index), Some(0));
        // both workers take part in a parallel op started by the caller
        // a spin long enough that even qemu reaches the check below inside it
        threads::set_keep_warm(std::time::Duration::from_millis(200));
        let ids: std::collections::HashSet<_> = threads::install(|| {
            use rayon::prelude::*;
            (0..64)
                .into_par_iter()
                .map(|_| {
                    std::thread::sleep(std::time::Duration::from_millis(1));
                    std::thread::current().id()
                })
                .collect::<Vec<_>>()
        })
        .into_iter()
        .collect();
        assert!(ids.contains(&std::thread::current().id()));
        // the other worker stays warm after the op (ready for the next one), then parks again
        assert_eq!(threads::warm_workers(), 1);
        std::thread::sleep(std::time::Duration::from_millis(400));
        assert_eq!(threads::warm_workers(), 0);
        threads::set_keep_warm(threads::KEEP_WARM);
        check(128, 300, 96, 9);
        // another thread count: the owner still gets right results (through the shared pool)
        threads::set_num_threads(1).unwrap();
        check(64, 100, 32, 10);
        threads::set_num_threads(2).unwrap();
        assert!(threads::runs_on_caller());
    })
    .join()
    .unwrap();
}
