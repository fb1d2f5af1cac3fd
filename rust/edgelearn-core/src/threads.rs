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
//! Kernels whose work comes in a few large parts (a convolution's image chunks, a BatchNorm's images) run
//! them with [`for_each_part`]: every thread claims parts, its own share first, and the caller waits for
//! the parts still running elsewhere without parking (a parked thread took 50–100 µs to wake up on a
//! two-vCPU VM, as long as the part it waited for).
//!
//! Warm workers: rayon parks an idle worker after a few dozen rounds of `yield` (tens of
//! microseconds), and a training step is a chain of parallel ops of 50–500 µs with Python between them,
//! so a parked worker woke up too late to steal its half of the next op and the caller did all the work
//! (INT8 training on two threads ran at the speed of one). After every parallel op of the owner pool the
//! other workers therefore stay awake for [`KEEP_WARM`], taking pending work at once
//! (`rayon::yield_now`, yielding the core to other runnable threads between looks), as OpenMP runtimes
//! spin for their block time. The spin ends `KEEP_WARM` after the
//! last op; `EDGELEARN_SPIN_US` (0 turns it off) sets the time.
//!
//! Fork safety: worker threads do not survive `fork()`, so a `pthread_atfork` child handler marks the
//! pools stale and the child builds a fresh shared pool on first use (the stale ones are leaked, never
//! joined).

use std::cell::{Cell, RefCell};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Once, OnceLock};
use std::time::{Duration, Instant};

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
    // No worker of the parent runs here (the warm jobs counted died with their threads).
    WARM_JOBS.store(0, Ordering::SeqCst);
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

/// An integer environment variable: `None` when unset, `Some(Err(value))` when not an integer in `range`.
fn env_int(
    name: &str,
    range: std::ops::RangeInclusive<u64>,
) -> Option<std::result::Result<u64, String>> {
    let v = std::env::var(name).ok()?;
    Some(match v.trim().parse::<u64>() {
        Ok(n) if range.contains(&n) => Ok(n),
        _ => Err(v),
    })
}

fn default_threads() -> usize {
    match env_threads_setting() {
        Ok(Some(n)) => n,
        // unset or invalid (backend_info reports the invalid setting): all available cores
        _ => std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1),
    }
}

/// Parses `EDGELEARN_NUM_THREADS` strictly (used by `backend_info` to report a bad setting).
pub fn env_threads_setting() -> Result<Option<usize>> {
    match env_int("EDGELEARN_NUM_THREADS", 1..=MAX_THREADS as u64) {
        None => Ok(None),
        Some(Ok(n)) => Ok(Some(n as usize)),
        Some(Err(v)) => Err(Error::invalid(
            "EDGELEARN_NUM_THREADS",
            format!("expected an integer in 1..={MAX_THREADS}, got {v:?}"),
        )),
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
    let mut st = lock();
    if st.threads == 0 {
        // Settled once: `available_parallelism` reads the cgroup's CPU quota from /sys on each call, and
        // kernels ask for the thread count on every call (uncached it cost a quarter of a small step).
        st.threads = default_threads();
    }
    st.threads
}

/// Sets the number of threads kernels use (rebuilds the pool). `n` must be in `1..=MAX_THREADS`.
///
/// A thread that has run kernels belongs to its first pool for life (rayon frees no thread it took with
/// `use_current_thread`): its one-thread pool, or the owner pool of the count it first ran in parallel
/// with. After a change of the count, its kernels run in the shared pool ([`install`]), a hop per op.
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
        let r = p.install(f);
        keep_warm(&p, n);
        return r;
    }
    match pool() {
        Some(p) => p.install(f),
        None => f(),
    }
}

/// How long the owner pool's other workers stay awake after its last parallel op (see the module docs).
/// 300 µs already gave the full gain on the CNN of `benches/train.py` (two threads, batch 32: 4.2 ms a
/// step without spinning, 3.3 with 300, 1000 or 2000 µs); 500 leaves room for slower Python between ops.
pub const KEEP_WARM: Duration = Duration::from_micros(500);

/// Warm jobs spawned and not finished.
static WARM_JOBS: AtomicUsize = AtomicUsize::new(0);
/// When the owner pool's last parallel op ended, in nanoseconds since [`epoch`].
static LAST_OP_NS: AtomicU64 = AtomicU64::new(0);

thread_local! {
    /// This thread is inside a warm job (a nested one returns at once).
    static IN_WARM: Cell<bool> = const { Cell::new(false) };
}

fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

fn now_ns() -> u64 {
    epoch().elapsed().as_nanos() as u64
}

/// The spin time in ns (`u64::MAX`: not read yet).
static SPIN_NS: AtomicU64 = AtomicU64::new(u64::MAX);

/// The spin time: set by [`set_keep_warm`], else `EDGELEARN_SPIN_US` microseconds if set (0 = never
/// spin), else [`KEEP_WARM`].
fn spin_ns() -> u64 {
    let v = SPIN_NS.load(Ordering::Relaxed);
    if v != u64::MAX {
        return v;
    }
    // (an invalid value is ignored; larger ones are capped at 1 s)
    let v = match env_int("EDGELEARN_SPIN_US", 0..=u64::MAX) {
        Some(Ok(us)) => us.min(1_000_000) * 1000,
        _ => KEEP_WARM.as_nanos() as u64,
    };
    SPIN_NS.store(v, Ordering::Relaxed);
    v
}

/// Sets how long the other workers stay warm after a parallel op (zero: they park at once; at most 1 s).
pub fn set_keep_warm(d: Duration) {
    SPIN_NS.store(
        d.min(Duration::from_secs(1)).as_nanos() as u64,
        Ordering::Relaxed,
    );
}

/// Marks the end of a parallel op of `p` (an `n`-thread owner pool whose worker 0 is the caller) and
/// makes sure its `n − 1` other workers are spinning in a warm job.
fn keep_warm(p: &rayon::ThreadPool, n: usize) {
    let spin = spin_ns();
    if spin == 0 {
        return;
    }
    LAST_OP_NS.store(now_ns(), Ordering::Relaxed);
    let mut running = WARM_JOBS.load(Ordering::Relaxed);
    while running < n - 1 {
        match WARM_JOBS.compare_exchange_weak(
            running,
            running + 1,
            Ordering::AcqRel,
            Ordering::Relaxed,
        ) {
            Ok(_) => {
                p.spawn(warm_job);
                running += 1;
            }
            Err(now) => running = now,
        }
    }
}

/// Runs pending work of the pool as soon as it appears, until the spin time after the pool's last op. Never
/// on worker 0 (the caller, which must return to Python) nor nested in another warm job.
fn warm_job() {
    if rayon::current_thread_index() == Some(0) || IN_WARM.with(Cell::get) {
        WARM_JOBS.fetch_sub(1, Ordering::AcqRel);
        return;
    }
    IN_WARM.with(|c| c.set(true));
    loop {
        match rayon::yield_now() {
            Some(rayon::Yield::Executed) => {}
            _ => {
                let last = LAST_OP_NS.load(Ordering::Relaxed);
                if now_ns().saturating_sub(last) > spin_ns() {
                    break;
                }
                // yield, not a bare spin: a busy machine's other threads get the core meanwhile
                std::thread::yield_now();
            }
        }
    }
    IN_WARM.with(|c| c.set(false));
    WARM_JOBS.fetch_sub(1, Ordering::AcqRel);
}

/// Warm jobs running or queued (for tests: one per extra worker right after a parallel op of the owner
/// pool, none once [`KEEP_WARM`] has passed without one).
pub fn warm_workers() -> usize {
    WARM_JOBS.load(Ordering::Acquire)
}

/// A job handed to another thread by [`defer`]; [`wait`](Deferred::wait) gives its result.
///
/// Made for work whose result is needed later than the caller's next step: the Octo layer backward
/// hands its `dW` to a worker and returns `dX` to Python, which goes on with the backward of the earlier
/// layers (Python, which no kernel can split, then overlaps with the `dW` products); the autograd sweep
/// waits for every such gradient before it returns.
pub struct Deferred<T> {
    inner: Arc<DeferredInner<T>>,
}

type Job<T> = Box<dyn FnOnce() -> Result<T> + Send>;

struct DeferredInner<T> {
    /// The job until a thread takes it (a worker, or `wait` when no worker got to it first).
    job: Mutex<Option<Job<T>>>,
    /// Its outcome (`Err` of a panic: the payload, resumed in `wait`).
    result: Mutex<Option<std::thread::Result<Result<T>>>>,
    done: std::sync::Condvar,
}

/// A deferred job of any result type, as the queue holds it.
trait Pending: Send + Sync {
    fn run_if_pending(&self);
}

impl<T: Send> Pending for DeferredInner<T> {
    /// Runs the job if no thread has taken it yet.
    fn run_if_pending(&self) {
        let job = self.job.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(f) = job {
            let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
            *self.result.lock().unwrap_or_else(|e| e.into_inner()) = Some(r);
            self.done.notify_all();
        }
    }
}

impl<T> DeferredInner<T> {
    fn is_done(&self) -> bool {
        self.result
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_some()
    }
}

/// Deferred jobs in the order they were made. Workers take them from here (not from a rayon deque: the
/// caller, worker 0 of the owner pool, pops its own deque while it waits inside a parallel op, and would
/// then run a whole `dW` before going back to Python).
static DEFERRED: Mutex<std::collections::VecDeque<Arc<dyn Pending>>> =
    Mutex::new(std::collections::VecDeque::new());

/// Runs deferred jobs until none is left.
fn run_deferred() {
    loop {
        let next = DEFERRED
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .pop_front();
        match next {
            Some(job) => job.run_if_pending(),
            None => return,
        }
    }
}

/// Runs `f` on another thread of the pool while the caller goes on; [`Deferred::wait`] returns its
/// result (and runs `f` itself if no worker has started it). With one thread `f` runs here and now, so
/// a result never depends on the thread count, only on `f`.
///
/// The job is queued and every worker but the caller is told to look at the queue (a rayon broadcast,
/// which wakes a parked worker): the caller never picks it up inside its own parallel ops.
pub fn defer<T: Send + 'static>(f: impl FnOnce() -> Result<T> + Send + 'static) -> Deferred<T> {
    let inner = Arc::new(DeferredInner {
        job: Mutex::new(Some(Box::new(f) as Job<T>)),
        result: Mutex::new(None),
        done: std::sync::Condvar::new(),
    });
    let n = num_threads();
    let target = if n > 1 {
        // the owner pool when this thread is its worker 0, else the shared pool (no caller in it)
        owner_pool(n)
            .map(|p| (p, true))
            .or_else(|| pool().map(|p| (p, false)))
    } else {
        None
    };
    match target {
        Some((p, skip_caller)) => {
            DEFERRED
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push_back(Arc::clone(&inner) as Arc<dyn Pending>);
            p.spawn_broadcast(move |ctx| {
                if !(skip_caller && ctx.index() == 0) {
                    run_deferred();
                }
            });
        }
        None => inner.run_if_pending(),
    }
    Deferred { inner }
}

impl<T: Send> Deferred<T> {
    /// Whether the result is there (`wait` will not block).
    pub fn is_done(&self) -> bool {
        self.inner.is_done()
    }

    /// The job's result: at once if it is done, after running it here if no thread took it, else when
    /// the worker running it is done (the caller meanwhile takes part in the job's parallel pieces). A
    /// panic in the job resumes here.
    pub fn wait(self) -> Result<T> {
        self.inner.run_if_pending();
        if !self.inner.is_done() {
            let n = num_threads();
            if let Some(p) = (n > 1).then(|| owner_pool(n)).flatten() {
                p.install(|| {
                    while !self.inner.is_done() {
                        if rayon::yield_now() != Some(rayon::Yield::Executed) {
                            std::thread::yield_now();
                        }
                    }
                });
            }
        }
        let mut r = self.inner.result.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            if let Some(out) = r.take() {
                return out.unwrap_or_else(|p| std::panic::resume_unwind(p));
            }
            r = self.inner.done.wait(r).unwrap_or_else(|e| e.into_inner());
        }
    }
}

/// Runs `f(i)` for every part `i` in `0..count` on the pool's threads and returns the first error (the
/// parts after it are skipped). Every thread claims parts, the caller included: first those of its own
/// share of the parts (the same share of every op over a batch, see [`Homes`]), then the last unclaimed
/// ones of the others' shares, so a worker that joins late (busy with a deferred `dW`, or just woken) takes
/// fewer parts instead of the caller waiting for the ones it was handed. Which thread runs a part never changes
/// what the part computes: `f(i)` must depend on `i` alone and parts must not overlap in what they write.
///
/// The caller waits for the parts others run without sleeping (it yields its core between looks). A
/// rayon `join` parks the waiting thread after a few dozen yields, and waking it again took 50–100 µs on
/// a two-vCPU VM, as long as the half of a convolution it was waiting for: INT8 convolutions in training
/// on two threads ran hardly faster than on one.
pub fn for_each_part<E: Send>(
    count: usize,
    f: impl Fn(usize) -> std::result::Result<(), E> + Sync,
) -> std::result::Result<(), E> {
    if count <= 1 || num_threads() == 1 {
        return (0..count).try_for_each(f);
    }
    install(|| {
        let helpers = (rayon::current_num_threads().saturating_sub(1)).min(count - 1);
        if helpers == 0 {
            return (0..count).try_for_each(&f);
        }
        // Parts are claimed in runs of consecutive ones, about four runs a thread: a claim is an atomic
        // update, which costs as much as a small part (a channel plane of a pooling backward), while four
        // runs a thread still let a late thread take less.
        let threads = helpers + 1;
        let run_len = count.div_ceil(4 * threads).max(1);
        let runs = count.div_ceil(run_len);
        let homes = Homes::new(runs, threads);
        let finished = AtomicUsize::new(0);
        let failed = AtomicBool::new(false);
        let first_err: Mutex<Option<E>> = Mutex::new(None);
        /// Counts a claimed run as finished when dropped, also when `f` panics (the caller's wait ends
        /// and rayon's scope resumes the panic).
        struct Done<'a>(&'a AtomicUsize);
        impl Drop for Done<'_> {
            fn drop(&mut self) {
                self.0.fetch_add(1, Ordering::Release);
            }
        }
        let run = || {
            let me = rayon::current_thread_index().unwrap_or(0);
            while let Some(r) = homes.claim(me) {
                let _done = Done(&finished);
                for i in r * run_len..((r + 1) * run_len).min(count) {
                    if failed.load(Ordering::Relaxed) {
                        break;
                    }
                    if let Err(e) = f(i) {
                        failed.store(true, Ordering::Relaxed);
                        first_err
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .get_or_insert(e);
                    }
                }
            }
        };
        rayon::scope(|s| {
            for _ in 0..helpers.min(runs - 1) {
                s.spawn(|_| run());
            }
            run();
            // every run is claimed; wait for those still running elsewhere
            while finished.load(Ordering::Acquire) < runs {
                if rayon::yield_now() != Some(rayon::Yield::Executed) {
                    std::thread::yield_now();
                }
            }
        });
        match first_err.into_inner().unwrap_or_else(|p| p.into_inner()) {
            Some(e) => Err(e),
            None => Ok(()),
        }
    })
}

/// The runs of a [`for_each_part`] dealt out to its threads: thread `k` (its index in the pool) owns the
/// `k`-th of `threads` consecutive ranges of runs and takes them from the front; a thread whose range is
/// done takes runs of the others from their back. So with threads that arrive on time, image `i` of every
/// op over a batch runs on the same thread (the `i·threads/n`-th), which reads what it wrote in the op
/// before from its own cache. Claimed dynamically, the halves of consecutive ops landed on either core and
/// each op read half its input from the other core's cache. A chain of BatchNorm + ReLU + pooling forward
/// and backward calls (32x16x28x28, each on the previous one's output) ran 1.4x faster on two threads than
/// on one with one shared counter, 1.75x with homes. A late thread still takes less: the others take its
/// runs from the back.
struct Homes {
    /// Per thread, its range of unclaimed runs as `front << 32 | back`.
    ranges: Vec<Padded>,
}

/// An atomic on a cache line of its own (the threads claim from different ones).
#[repr(align(128))]
struct Padded(AtomicU64);

impl Homes {
    fn new(runs: usize, threads: usize) -> Homes {
        // (for_each_part makes about four runs a thread, and threads <= MAX_THREADS)
        assert!(
            runs <= u32::MAX as usize,
            "{runs} runs do not fit a 32-bit range"
        );
        let (runs, t) = (runs as u64, threads.max(1) as u64);
        let ranges = (0..t)
            .map(|k| Padded(AtomicU64::new((k * runs / t) << 32 | ((k + 1) * runs / t))))
            .collect();
        Homes { ranges }
    }

    /// The next run for thread `me`: the front of its own range, else the back of another's (the next
    /// ones after `me` first), `None` when every run is claimed.
    fn claim(&self, me: usize) -> Option<usize> {
        let t = self.ranges.len();
        if me < t {
            if let Some(r) = Self::take(&self.ranges[me].0, true) {
                return Some(r);
            }
        }
        (1..=t)
            .map(|d| (me + d) % t)
            .filter(|&k| k != me)
            .find_map(|k| Self::take(&self.ranges[k].0, false))
    }

    fn take(range: &AtomicU64, front: bool) -> Option<usize> {
        let mut cur = range.load(Ordering::Relaxed);
        loop {
            let (a, b) = (cur >> 32, cur & 0xffff_ffff);
            if a >= b {
                return None;
            }
            let (next, r) = if front {
                ((a + 1) << 32 | b, a)
            } else {
                (a << 32 | (b - 1), b - 1)
            };
            match range.compare_exchange_weak(cur, next, Ordering::Relaxed, Ordering::Relaxed) {
                Ok(_) => return Some(r as usize),
                Err(now) => cur = now,
            }
        }
    }
}

/// [`for_each_part`] for parts that cannot fail.
pub fn run_parts(count: usize, f: impl Fn(usize) + Sync) {
    let _ = for_each_part(count, |i| {
        f(i);
        Ok::<(), std::convert::Infallible>(())
    });
}

/// [`for_each_part`] over the consecutive `chunk`-element pieces of `out` (the last one may be shorter):
/// `f(i, piece)` for piece `i`.
pub fn for_each_piece<T: Send, E: Send>(
    out: &mut [T],
    chunk: usize,
    f: impl Fn(usize, &mut [T]) -> std::result::Result<(), E> + Sync,
) -> std::result::Result<(), E> {
    let pieces = Pieces::new(out, chunk);
    // SAFETY: for_each_part passes each part index once, so each piece is borrowed once.
    for_each_part(pieces.count(), |i| f(i, unsafe { pieces.piece(i) }))
}

/// An output cut into consecutive `chunk`-element pieces (the last may be shorter) for the parts of
/// [`for_each_part`] to write, piece `i` by part `i`: several outputs cut in step (an op writing
/// per-image pieces of three arrays) without zipping parallel iterators.
pub(crate) struct Pieces<'a, T> {
    base: OutPtr<T>,
    len: usize,
    chunk: usize,
    _out: std::marker::PhantomData<&'a mut [T]>,
}

// SAFETY: a `Pieces` only hands out disjoint pieces of an exclusively borrowed slice (see `piece`), so
// sharing it between threads is sharing `&mut` pieces of `T: Send`.
unsafe impl<T: Send> Sync for Pieces<'_, T> {}
unsafe impl<T: Send> Send for Pieces<'_, T> {}

impl<'a, T> Pieces<'a, T> {
    pub(crate) fn new(out: &'a mut [T], chunk: usize) -> Self {
        Pieces {
            base: OutPtr(out.as_mut_ptr()),
            len: out.len(),
            chunk: chunk.max(1),
            _out: std::marker::PhantomData,
        }
    }

    /// How many pieces.
    pub(crate) fn count(&self) -> usize {
        self.len.div_ceil(self.chunk)
    }

    /// Piece `i` (`i < count()`).
    ///
    /// # Safety
    /// At most one reference to a piece may be alive: call it once per piece, as the part that owns it.
    #[allow(clippy::mut_from_ref)]
    pub(crate) unsafe fn piece(&self, i: usize) -> &'a mut [T] {
        let start = i * self.chunk;
        assert!(
            start < self.len || (start == 0 && self.len == 0),
            "piece {i} out of range"
        );
        let n = self.chunk.min(self.len - start);
        // SAFETY: [start, start + n) lies inside the borrowed slice; the caller borrows it once.
        unsafe { std::slice::from_raw_parts_mut(self.base.get().add(start), n) }
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
    /// The pointer, through a reference (for a wrapper of a non-`Copy` element type).
    #[inline]
    pub(crate) fn get(&self) -> *mut T {
        self.0
    }
}

#[cfg(test)]
mod tests {
    use super::Homes;

    /// Whatever order the threads claim in (including indices beyond the thread count, as a thread of a
    /// larger pool would have), every run is claimed exactly once; a thread takes its own range front to
    /// back, and a thread whose range is empty the last unclaimed run of another's.
    #[test]
    fn homes_deal_every_run_once_own_range_first() {
        let mut state = 0x2545_f491_4f6c_dd1du64;
        let mut next = || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        for threads in 1..=5 {
            for runs in 0..=17 {
                for _trial in 0..20 {
                    let homes = Homes::new(runs, threads);
                    let range = |k: usize| k * runs / threads..(k + 1) * runs / threads;
                    let mut seen = vec![false; runs];
                    loop {
                        let me = (next() % (threads as u64 + 1)) as usize;
                        let Some(r) = homes.claim(me) else {
                            assert!(seen.iter().all(|&s| s), "{threads} threads, {runs} runs");
                            break;
                        };
                        assert!(!seen[r], "run {r} claimed twice");
                        seen[r] = true;
                        let free =
                            |k: usize| range(k).filter(|&i| !seen[i] || i == r).collect::<Vec<_>>();
                        if me < threads && !free(me).is_empty() {
                            // its own range is not empty: the first of its unclaimed runs
                            assert_eq!(Some(r), free(me).first().copied(), "thread {me}");
                        } else {
                            // stolen: the last unclaimed run of the range it belongs to
                            let k = (0..threads).find(|&k| range(k).contains(&r)).unwrap();
                            assert_eq!(Some(r), free(k).last().copied(), "thread {me} from {k}");
                        }
                    }
                }
            }
        }
    }
}
