//! The thread pool every parallel kernel runs in.
//!
//! Pools owned by this crate (not rayon's global pool, whose size cannot change once built). The size
//! comes from `EDGELEARN_NUM_THREADS`, else the number of CPUs, and [`set_num_threads`] changes it.
//!
//! The calling thread takes part in every parallel op: the first thread that runs a kernel with `n > 1`
//! threads becomes worker 0 of an `n`-thread pool (rayon's `use_current_thread`), so its kernels start
//! on that thread at once and the `n − 1` other workers steal halves of the work, instead of the caller
//! handing each op to a sleeping worker and sleeping until it is done. Ops below a measured work
//! threshold never leave the caller (see `PAR_MIN_*` of each kernel module). With one thread each calling
//! thread is the only worker of its own one-thread pool. Other threads (and the owner after the thread
//! count changed) run kernels in a shared pool of the current size.
//!
//! Fork safety: worker threads do not survive `fork()`, so a `pthread_atfork` child handler marks the
//! pools stale and the child builds a fresh shared pool on first use (the stale ones are leaked, never
//! joined).

use std::cell::RefCell;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Once};

use crate::error::{Error, Result};

/// Upper bound on the thread count a caller may ask for (an absurd value is a bug, not a wish).
pub const MAX_THREADS: usize = 1024;

struct PoolState {
    threads: usize,
    /// The shared pool (callers hand their work to it).
    pool: Option<Arc<rayon::ThreadPool>>,
    /// The pool whose worker 0 is the thread that first ran a multi-threaded kernel.
    owner: Option<Arc<rayon::ThreadPool>>,
    /// No owner pool is built any more (one exists, failed to build, or was lost in a fork).
    owner_taken: bool,
}

static STATE: Mutex<PoolState> = Mutex::new(PoolState {
    threads: 0,
    pool: None,
    owner: None,
    owner_taken: false,
});
static FORKED: AtomicBool = AtomicBool::new(false);
static ATFORK: Once = Once::new();

#[cfg(unix)]
extern "C" fn after_fork_in_child() {
    FORKED.store(true, Ordering::SeqCst);
}

fn register_atfork() {
    ATFORK.call_once(|| {
        #[cfg(unix)]
        // SAFETY: registers a handler that only stores to an atomic, which is async-signal-safe.
        unsafe {
            libc::pthread_atfork(None, None, Some(after_fork_in_child));
        }
    });
}

fn default_threads() -> usize {
    match std::env::var("EDGELEARN_NUM_THREADS") {
        Ok(v) => match v.trim().parse::<usize>() {
            Ok(n) if (1..=MAX_THREADS).contains(&n) => n,
            _ => std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1),
        },
        Err(_) => std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1),
    }
}

/// Parses `EDGELEARN_NUM_THREADS` strictly (used by `backend_info` to report a bad setting).
pub fn env_threads_setting() -> Result<Option<usize>> {
    match std::env::var("EDGELEARN_NUM_THREADS") {
        Err(_) => Ok(None),
        Ok(v) => match v.trim().parse::<usize>() {
            Ok(n) if (1..=MAX_THREADS).contains(&n) => Ok(Some(n)),
            _ => Err(Error::invalid(
                "EDGELEARN_NUM_THREADS",
                format!("expected an integer in 1..={MAX_THREADS}, got {v:?}"),
            )),
        },
    }
}

fn lock() -> std::sync::MutexGuard<'static, PoolState> {
    // A poisoned lock only means another thread panicked while holding it; the state stays usable.
    STATE.lock().unwrap_or_else(|e| e.into_inner())
}

fn pool() -> Option<Arc<rayon::ThreadPool>> {
    register_atfork();
    let mut st = lock();
    if FORKED.swap(false, Ordering::SeqCst) {
        // The parent's workers do not exist in this process: leak the pool object instead of joining them.
        if let Some(p) = st.pool.take() {
            std::mem::forget(p);
        }
        if let Some(p) = st.owner.take() {
            std::mem::forget(p);
        }
    }
    if st.threads == 0 {
        st.threads = default_threads();
    }
    if st.pool.is_none() {
        let built = rayon::ThreadPoolBuilder::new()
            .num_threads(st.threads)
            .thread_name(|i| format!("edgelearn-{i}"))
            .build();
        match built {
            Ok(p) => st.pool = Some(Arc::new(p)),
            // Could not spawn a thread (e.g. a tight RLIMIT_NPROC): run on the caller's thread.
            Err(_) => st.threads = 1,
        }
    }
    st.pool.clone()
}

/// Number of threads kernels use.
pub fn num_threads() -> usize {
    let st = lock();
    if st.threads == 0 {
        default_threads()
    } else {
        st.threads
    }
}

/// Sets the number of threads kernels use (rebuilds the pool). `n` must be in `1..=MAX_THREADS`.
pub fn set_num_threads(n: usize) -> Result<()> {
    if !(1..=MAX_THREADS).contains(&n) {
        return Err(Error::invalid(
            "threads",
            format!("expected 1..={MAX_THREADS}, got {n}"),
        ));
    }
    let mut st = lock();
    if st.threads != n {
        st.threads = n;
        st.pool = None;
    }
    Ok(())
}

thread_local! {
    /// This thread's one-thread pool, of which the thread itself is the only worker (`None` inside: it
    /// could not be built, e.g. the thread already belongs to a pool). Built on first use.
    static INLINE: RefCell<Option<Option<Arc<rayon::ThreadPool>>>> = const { RefCell::new(None) };
}

/// The calling thread's one-worker pool (see [`install`]).
fn inline_pool() -> Option<Arc<rayon::ThreadPool>> {
    INLINE.with(|cell| {
        cell.borrow_mut()
            .get_or_insert_with(|| {
                rayon::ThreadPoolBuilder::new()
                    .num_threads(1)
                    .use_current_thread()
                    .build()
                    .ok()
                    .map(Arc::new)
            })
            .clone()
    })
}

/// The owner pool if this thread may run `n`-thread work in it inline: it is the pool's size and this
/// thread is one of its workers (worker 0, the owner, or a worker inside a parallel op). Builds the pool
/// with the calling thread as worker 0 on the first multi-threaded call from a thread in no pool.
fn owner_pool(n: usize) -> Option<Arc<rayon::ThreadPool>> {
    if FORKED.load(Ordering::SeqCst) {
        drop(pool()); // a forked child: forget the parent's pools first
    }
    let (owner, try_build) = {
        let st = lock();
        (st.owner.clone(), !st.owner_taken)
    };
    if let Some(p) = owner {
        return (p.current_num_threads() == n && p.current_thread_index().is_some()).then_some(p);
    }
    if !try_build || rayon::current_thread_index().is_some() {
        return None;
    }
    let mut st = lock();
    if st.owner_taken || FORKED.load(Ordering::SeqCst) {
        return None;
    }
    st.owner_taken = true;
    let built = rayon::ThreadPoolBuilder::new()
        .num_threads(n)
        .use_current_thread()
        .thread_name(|i| format!("edgelearn-{i}"))
        .build()
        .ok()
        .map(Arc::new);
    st.owner.clone_from(&built);
    built
}

/// Runs `f` inside the pool, so `rayon::join`/par_iter in `f` use edgelearn's threads (even with one
/// thread, nothing falls through to rayon's global pool).
///
/// `f` starts on the calling thread whenever it can (see the module docs): with one thread always (a
/// one-worker pool made of the caller), with more on the owner thread and inside parallel ops. Handing
/// each kernel call to a separate worker and waking the caller afterwards costs tens of microseconds
/// per call (far more on a loaded machine), which dominated small training steps.
pub fn install<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    let n = num_threads();
    if n == 1 {
        if let Some(p) = inline_pool() {
            return p.install(f);
        }
    } else if let Some(p) = owner_pool(n) {
        return p.install(f);
    }
    match pool() {
        Some(p) => p.install(f),
        None => f(),
    }
}

/// Whether a kernel called from this thread starts on this thread (no hand-off to a pool worker).
pub fn runs_on_caller() -> bool {
    let me = std::thread::current().id();
    install(|| std::thread::current().id()) == me
}

/// A raw output pointer that parallel tasks share, each writing a disjoint part of the output.
#[derive(Clone, Copy)]
pub(crate) struct OutPtr<T>(pub(crate) *mut T);
// SAFETY: users hand it to tasks that write disjoint regions of an output which outlives the parallel
// section (each use states which regions).
unsafe impl<T> Send for OutPtr<T> {}
unsafe impl<T> Sync for OutPtr<T> {}

impl<T> OutPtr<T> {
    // A method (not field access) so closures capture the Send wrapper, not the raw pointer.
    #[inline]
    pub(crate) fn ptr(self) -> *mut T {
        self.0
    }
}
