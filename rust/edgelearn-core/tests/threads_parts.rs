//! `threads::for_each_part` / `for_each_piece`: every part runs exactly once whatever the thread count,
//! the first error comes back and the later parts are skipped, a panic in a part
//! reaches the caller, and parts nest (that the caller takes parts: `threads_parts_owner.rs`). Its own test
//! binary, since the thread count is process-wide.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use edgelearn_core::threads;

/// The thread count is process-wide: the tests of this file run one at a time.
static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

#[test]
fn every_part_runs_once_on_any_thread_count() {
    let _g = serial();
    for n in [1, 2, 3, 4] {
        threads::set_num_threads(n).unwrap();
        for count in [0usize, 1, 2, 3, 7, 64, 1000] {
            let hits: Vec<AtomicUsize> = (0..count).map(|_| AtomicUsize::new(0)).collect();
            threads::for_each_part(count, |i| {
                hits[i].fetch_add(1, Ordering::Relaxed);
                Ok::<(), ()>(())
            })
            .unwrap();
            assert!(
                hits.iter().all(|h| h.load(Ordering::Relaxed) == 1),
                "{n} threads, {count} parts"
            );
        }
    }
}

#[test]
fn pieces_cover_the_output_in_order() {
    let _g = serial();
    for n in [1, 2, 4] {
        threads::set_num_threads(n).unwrap();
        for (len, chunk) in [
            (0usize, 3usize),
            (10, 3),
            (12, 4),
            (5, 10),
            (1000, 7),
            (9, 0),
        ] {
            let mut out = vec![usize::MAX; len];
            threads::for_each_piece(&mut out, chunk, |i, piece| {
                for (k, v) in piece.iter_mut().enumerate() {
                    *v = i * chunk.max(1) + k;
                }
                Ok::<(), ()>(())
            })
            .unwrap();
            assert_eq!(
                out,
                (0..len).collect::<Vec<_>>(),
                "{n} threads, {len}/{chunk}"
            );
        }
    }
}

#[test]
fn the_first_error_returns_and_later_parts_are_skipped() {
    let _g = serial();
    for n in [1, 2, 4] {
        threads::set_num_threads(n).unwrap();
        let ran = AtomicUsize::new(0);
        let r = threads::for_each_part(10_000, |i| {
            ran.fetch_add(1, Ordering::Relaxed);
            if i == 3 {
                Err(format!("part {i}"))
            } else {
                Ok(())
            }
        });
        assert_eq!(r, Err("part 3".to_string()), "{n} threads");
        // parts claimed after the failure are skipped (those already running finish)
        assert!(ran.load(Ordering::Relaxed) < 10_000, "{n} threads");
    }
}

#[test]
fn a_panic_in_a_part_reaches_the_caller_and_the_pool_keeps_working() {
    let _g = serial();
    for n in [1, 2] {
        threads::set_num_threads(n).unwrap();
        let r = std::panic::catch_unwind(|| {
            threads::for_each_part(16, |i| {
                if i == 9 {
                    panic!("part 9");
                }
                Ok::<(), ()>(())
            })
        });
        assert!(r.is_err(), "{n} threads");
        let hits = AtomicUsize::new(0);
        threads::for_each_part(16, |_| {
            hits.fetch_add(1, Ordering::Relaxed);
            Ok::<(), ()>(())
        })
        .unwrap();
        assert_eq!(hits.load(Ordering::Relaxed), 16);
    }
}

#[test]
fn parts_nest() {
    let _g = serial();
    for n in [1, 2, 3] {
        threads::set_num_threads(n).unwrap();
        let grid: Vec<AtomicUsize> = (0..8 * 9).map(|_| AtomicUsize::new(0)).collect();
        threads::for_each_part(8, |i| {
            threads::for_each_part(9, |j| {
                grid[i * 9 + j].fetch_add(1, Ordering::Relaxed);
                Ok::<(), ()>(())
            })
        })
        .unwrap();
        assert!(
            grid.iter().all(|h| h.load(Ordering::Relaxed) == 1),
            "{n} threads"
        );
    }
}
