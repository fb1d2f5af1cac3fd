//! `threads::defer`: a job runs on a worker while the caller goes on, `wait` returns its result (running it on
//! the caller when no worker took it), with one thread it runs at once, errors and panics reach `wait`. Its
//! own test binary, since the thread count is process-wide.

use edgelearn_core::threads;
use edgelearn_core::Error;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

#[test]
fn with_one_thread_the_job_runs_before_defer_returns() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    threads::set_num_threads(1).unwrap();
    let me = std::thread::current().id();
    let job = threads::defer(move || Ok(std::thread::current().id() == me));
    assert!(job.is_done());
    assert!(job.wait().unwrap());
}

#[test]
fn with_two_threads_a_worker_runs_it_while_the_caller_goes_on() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    threads::set_num_threads(2).unwrap();
    let me = std::thread::current().id();
    let release = Arc::new(AtomicBool::new(false));
    let r = Arc::clone(&release);
    let job = threads::defer(move || {
        // blocks until the caller, which must have come back from `defer`, lets it finish
        let t0 = Instant::now();
        while !r.load(Ordering::Acquire) && t0.elapsed() < Duration::from_secs(10) {
            std::thread::yield_now();
        }
        Ok(std::thread::current().id())
    });
    release.store(true, Ordering::Release);
    let ran_on = job.wait().unwrap();
    // a worker took it (or, on a starved machine, the caller in `wait`): either way the caller got here
    let _ = ran_on == me;
    // many jobs in a row, waited in any order, each gives its own result
    let jobs: Vec<_> = (0..16u64)
        .map(|i| threads::defer(move || Ok((0..1000u64).map(|k| k * i).sum::<u64>())))
        .collect();
    for (i, j) in jobs.into_iter().enumerate().rev() {
        assert_eq!(j.wait().unwrap(), 499_500 * i as u64);
    }
}

#[test]
fn errors_and_panics_of_the_job_reach_wait() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    for n in [1, 2] {
        threads::set_num_threads(n).unwrap();
        let job =
            threads::defer(|| -> edgelearn_core::Result<()> { Err(Error::invalid("dw", "bad")) });
        assert_eq!(job.wait().unwrap_err().to_string(), "dw: bad");
        let job = threads::defer(|| -> edgelearn_core::Result<()> { panic!("boom") });
        let caught = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| job.wait()));
        assert!(caught.is_err(), "{n} threads");
    }
}
