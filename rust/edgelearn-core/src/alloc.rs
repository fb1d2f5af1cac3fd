//! Allocations sized by input: one limit, checked before anything is allocated, and fallible allocation
//! (`try_reserve`) so an exhausted address space becomes [`Error::OutOfMemory`] instead of an abort.
//!
//! The limit on one allocation is, unless set with [`set_memory_limit`] (Python:
//! `edgelearn.set_memory_limit`) or `EDGELEARN_MEMORY_LIMIT` (bytes, `K`/`M`/`G` suffixes allowed), the
//! smaller of the machine's physical memory and the process's address-space limit (`RLIMIT_AS`); a
//! request above [`CHECK_AVAILABLE_ABOVE`] must also fit in the memory the system has available now
//! (Linux: `MemAvailable + SwapFree`). Linux overcommits, so without that check a huge output would be
//! "allocated" and the process killed by the OOM killer while writing it.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::OnceLock;

use crate::error::{Error, Result};

/// Requests above this many bytes are also checked against the memory available now (reading it costs a
/// few microseconds, nothing next to filling that much memory).
pub const CHECK_AVAILABLE_ABOVE: usize = 256 << 20;

/// 0: automatic (see the module doc).
static LIMIT: AtomicUsize = AtomicUsize::new(0);

/// Sets the largest allocation (bytes) one call may request; `None` restores the automatic limit.
pub fn set_memory_limit(bytes: Option<usize>) -> Result<()> {
    match bytes {
        Some(0) => Err(Error::invalid(
            "limit",
            "must be a positive number of bytes (None restores the automatic limit)",
        )),
        Some(b) => {
            LIMIT.store(b, Ordering::Relaxed);
            Ok(())
        }
        None => {
            LIMIT.store(0, Ordering::Relaxed);
            Ok(())
        }
    }
}

/// The largest allocation (bytes) one call may request, and where that number comes from.
pub fn memory_limit() -> (usize, &'static str) {
    match LIMIT.load(Ordering::Relaxed) {
        0 => automatic_limit(),
        b => (b, "set with set_memory_limit"),
    }
}

fn parse_bytes(s: &str) -> Option<usize> {
    let s = s.trim();
    let (num, mul) = match s.chars().last()?.to_ascii_uppercase() {
        'K' => (&s[..s.len() - 1], 1usize << 10),
        'M' => (&s[..s.len() - 1], 1 << 20),
        'G' => (&s[..s.len() - 1], 1 << 30),
        _ => (s, 1),
    };
    num.trim()
        .parse::<usize>()
        .ok()
        .and_then(|n| n.checked_mul(mul))
        .filter(|&n| n > 0)
}

fn automatic_limit() -> (usize, &'static str) {
    static ENV: OnceLock<Option<usize>> = OnceLock::new();
    let env = *ENV.get_or_init(|| {
        std::env::var("EDGELEARN_MEMORY_LIMIT")
            .ok()
            .and_then(|v| parse_bytes(&v))
    });
    if let Some(b) = env {
        return (b, "EDGELEARN_MEMORY_LIMIT");
    }
    let phys = physical_memory();
    match address_space_limit() {
        Some(a) if a < phys => (a, "the address-space limit (RLIMIT_AS)"),
        _ => (phys, "physical memory"),
    }
}

#[cfg(unix)]
fn physical_memory() -> usize {
    static PHYS: OnceLock<usize> = OnceLock::new();
    *PHYS.get_or_init(|| {
        // SAFETY: sysconf has no preconditions.
        let (pages, size) = unsafe {
            (
                libc::sysconf(libc::_SC_PHYS_PAGES),
                libc::sysconf(libc::_SC_PAGESIZE),
            )
        };
        if pages > 0 && size > 0 {
            (pages as usize).saturating_mul(size as usize)
        } else {
            usize::MAX
        }
    })
}

/// `MemAvailable + SwapFree` from `/proc/meminfo` (bytes), where there is one.
fn available_memory() -> Option<usize> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let field = |name: &str| -> Option<usize> {
        let line = text.lines().find(|l| l.starts_with(name))?;
        let kb: usize = line[name.len()..]
            .trim()
            .trim_end_matches("kB")
            .trim()
            .parse()
            .ok()?;
        kb.checked_mul(1024)
    };
    Some(field("MemAvailable:")?.saturating_add(field("SwapFree:").unwrap_or(0)))
}

#[cfg(not(unix))]
fn physical_memory() -> usize {
    usize::MAX
}

/// Read on every call: a process may lower its limit at any time.
#[cfg(unix)]
fn address_space_limit() -> Option<usize> {
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: r is a valid out-pointer.
    let ok = unsafe { libc::getrlimit(libc::RLIMIT_AS, &mut r) } == 0;
    (ok && r.rlim_cur != libc::RLIM_INFINITY)
        .then(|| usize::try_from(r.rlim_cur).unwrap_or(usize::MAX))
}

#[cfg(not(unix))]
fn address_space_limit() -> Option<usize> {
    None
}

/// `bytes` as "12.3 GiB".
pub fn human(bytes: usize) -> String {
    const UNITS: [&str; 5] = ["bytes", "KiB", "MiB", "GiB", "TiB"];
    let mut v = bytes as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{bytes} bytes")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

/// Fails with [`Error::OutOfMemory`] if `count` elements of `elem_bytes` bytes each (for `what`) exceed
/// the limit (or `usize`); returns the byte count otherwise.
pub fn check(what: &str, count: usize, elem_bytes: usize) -> Result<usize> {
    let (mut limit, mut source) = memory_limit();
    let bytes = count.checked_mul(elem_bytes);
    if matches!(bytes, Some(b) if b > CHECK_AVAILABLE_ABOVE && b <= limit)
        && LIMIT.load(Ordering::Relaxed) == 0
    {
        if let Some(avail) = available_memory() {
            if avail < limit {
                (limit, source) = (avail, "the memory available now");
            }
        }
    }
    match bytes {
        Some(b) if b <= limit => Ok(b),
        b => Err(Error::OutOfMemory {
            what: what.to_string(),
            msg: format!(
                "needs {} ({count} elements), more than the limit of {} ({source}); use smaller \
                 inputs, or raise the limit with edgelearn.set_memory_limit(bytes) if the machine \
                 really has the memory",
                b.map(human)
                    .unwrap_or_else(|| "more than the address space".into()),
                human(limit)
            ),
        }),
    }
}

/// A vector of `n` copies of `value`, allocated fallibly after [`check`]: exhausted memory is an error,
/// never an abort.
pub fn try_vec<T: Clone>(what: &str, n: usize, value: T) -> Result<Vec<T>> {
    let bytes = check(what, n, std::mem::size_of::<T>())?;
    let mut v = Vec::new();
    v.try_reserve_exact(n).map_err(|_| Error::OutOfMemory {
        what: what.to_string(),
        msg: format!("the system could not provide {}", human(bytes)),
    })?;
    v.resize(n, value);
    Ok(v)
}

/// The offsets `g·plane + i·row + j` of the taps `(g, i, j)` of `groups` planes of a `kh × kw` kernel (plane
/// `g` at `g·plane`, rows `row` apart), in that order, in a vector sized up front.
///
/// Kernels build such small vectors inside parallel ops, on every thread at once. Collected from nested
/// iterators (`flat_map`, whose size is unknown), a vector grows by `realloc`, and glibc's `realloc`
/// always locks the arena that owns the block (its per-thread cache serves `malloc` and `free` only). In
/// INT8 training on two threads, both threads of a convolution growing such vectors (and Python freeing
/// arrays meanwhile) were the largest cause of threads sleeping on a lock. An exact `malloc` of a small
/// block takes no lock.
pub fn offsets(groups: usize, kh: usize, kw: usize, plane: usize, row: usize) -> Vec<usize> {
    let mut v = Vec::with_capacity(groups * kh * kw);
    for g in 0..groups {
        for i in 0..kh {
            v.extend((0..kw).map(|j| g * plane + i * row + j));
        }
    }
    v
}

/// Int8 code buffers that outlive the call that filled them (an INT8 layer's saved activation codes,
/// kept from forward to backward), handed back when their owner is dropped and reused by the next
/// forward: a training step then writes its codes into memory the previous step already touched instead
/// of a fresh zeroed allocation. A buffer is only ever reused after its owner gave it back, so nothing
/// still referenced (by an autograd graph, a deferred gradient job) is written.
static CODE_POOL: std::sync::Mutex<CodePool> = std::sync::Mutex::new(CodePool {
    bufs: Vec::new(),
    bytes: 0,
});

/// Most buffers and bytes the pool keeps (beyond that the oldest are freed).
const CODE_POOL_MAX_BUFS: usize = 256;
const CODE_POOL_MAX_BYTES: usize = 512 << 20;

struct CodePool {
    bufs: Vec<Vec<i8>>,
    bytes: usize,
}

/// `n` int8 codes (contents unspecified: the caller overwrites them all) from the pool when it holds a
/// buffer of at least `n` (the smallest such one), else a new zero-filled one (fallible as [`try_vec`]).
pub fn take_codes(what: &str, n: usize) -> Result<Vec<i8>> {
    let reused = CODE_POOL.lock().unwrap_or_else(|e| e.into_inner()).take(n);
    match reused {
        Some(v) => Ok(v),
        None => try_vec(what, n, 0i8),
    }
}

impl CodePool {
    /// The smallest pooled buffer of capacity ≥ `n`, resized to `n` (within capacity: no reallocation, and
    /// only a grown tail is written).
    fn take(&mut self, n: usize) -> Option<Vec<i8>> {
        let best = (0..self.bufs.len())
            .filter(|&i| self.bufs[i].capacity() >= n)
            .min_by_key(|&i| self.bufs[i].capacity())?;
        let mut v = self.bufs.remove(best);
        self.bytes -= v.capacity();
        v.resize(n, 0);
        Some(v)
    }

    /// Keeps `v` for reuse, freeing the oldest buffers beyond the pool's limits.
    fn give(&mut self, v: Vec<i8>) {
        if v.capacity() == 0 || v.capacity() > CODE_POOL_MAX_BYTES {
            return;
        }
        self.bytes += v.capacity();
        self.bufs.push(v);
        while self.bufs.len() > CODE_POOL_MAX_BUFS || self.bytes > CODE_POOL_MAX_BYTES {
            let old = self.bufs.remove(0);
            self.bytes -= old.capacity();
        }
    }
}

/// Hands a buffer from [`take_codes`] back for reuse.
pub fn give_codes(v: Vec<i8>) {
    CODE_POOL.lock().unwrap_or_else(|e| e.into_inner()).give(v)
}

/// Frees the pooled code buffers; returns how many bytes that gave back.
pub fn release_codes() -> usize {
    let mut pool = CODE_POOL.lock().unwrap_or_else(|e| e.into_inner());
    pool.bufs = Vec::new();
    std::mem::take(&mut pool.bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn absurd_requests_are_errors_not_aborts() {
        let e = try_vec::<f32>("y", usize::MAX / 2, 0.0).unwrap_err();
        assert!(matches!(e, Error::OutOfMemory { .. }), "{e}");
        assert!(e.to_string().starts_with("y: "), "{e}");
        let e = check("col", 1 << 62, 4).unwrap_err();
        assert!(e.to_string().contains("address space"), "{e}");
        assert_eq!(try_vec("v", 3, 7u8).unwrap(), vec![7, 7, 7]);
    }

    #[test]
    fn code_buffers_come_back_sized_and_best_fit() {
        // a pool of the test's own (the global one is shared with concurrently running tests)
        let mut pool = CodePool {
            bufs: Vec::new(),
            bytes: 0,
        };
        assert!(pool.take(10).is_none());
        let (small, big) = (vec![1i8; 1000], vec![2i8; 5000]);
        let (ps, pb) = (small.as_ptr(), big.as_ptr());
        pool.give(big);
        pool.give(small);
        assert_eq!(pool.bytes, 6000);
        // the smallest buffer that fits, resized to the request without reallocating
        let a = pool.take(600).unwrap();
        assert_eq!((a.len(), a.as_ptr()), (600, ps));
        let b = pool.take(2000).unwrap();
        assert_eq!((b.len(), b.as_ptr()), (2000, pb));
        assert!(pool.take(1).is_none());
        assert_eq!(pool.bytes, 0);
        // beyond the byte limit the oldest buffers go
        pool.give(Vec::with_capacity(CODE_POOL_MAX_BYTES));
        pool.give(vec![0i8; 64]);
        assert_eq!(pool.bufs.len(), 1);
        assert_eq!(pool.bytes, 64);
        // the global pool hands out sized buffers and frees on release
        let c = take_codes("xq", 1000).unwrap();
        assert_eq!(c.len(), 1000);
        give_codes(c);
        release_codes();
    }

    #[test]
    fn parses_sizes() {
        assert_eq!(parse_bytes("512M"), Some(512 << 20));
        assert_eq!(parse_bytes("2g"), Some(2 << 30));
        assert_eq!(parse_bytes("1000"), Some(1000));
        assert_eq!(parse_bytes("0"), None);
        assert_eq!(parse_bytes("x"), None);
        assert!(human(3 << 30).starts_with("3.0 GiB"));
    }
}
