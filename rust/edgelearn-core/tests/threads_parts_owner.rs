//! `threads::for_each_part` on two threads, called from the pool's owner (the first thread that ran a
//! multi-threaded kernel, here the only test of this binary): both threads take parts, the caller
//! among them.

use std::collections::HashSet;
use std::sync::Mutex;

use edgelearn_core::threads;

#[test]
fn the_caller_and_the_other_worker_share_the_parts() {
    threads::set_num_threads(2).unwrap();
    let caller = std::thread::current().id();
    assert!(
        threads::runs_on_caller(),
        "the test thread should own the pool"
    );
    // Parts long enough (50 µs each) for the other worker to wake up and take some.
    let mut both = false;
    for _ in 0..50 {
        let ids = Mutex::new(HashSet::new());
        threads::for_each_part(64, |_| {
            ids.lock().unwrap().insert(std::thread::current().id());
            let t = std::time::Instant::now();
            while t.elapsed() < std::time::Duration::from_micros(50) {
                std::hint::spin_loop();
            }
            Ok::<(), ()>(())
        })
        .unwrap();
        let ids = ids.into_inner().unwrap();
        assert!(ids.contains(&caller), "the caller ran no part");
        if ids.len() == 2 {
            both = true;
            break;
        }
    }
    assert!(both, "no part ever ran on the other thread");
}
