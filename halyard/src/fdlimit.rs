//! Open-file descriptors: a broker holds one per connection.

use std::os::fd::AsFd;

use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};

/// The most descriptor slots [`prepare`] sizes the kernel's table for (8 bytes of kernel
/// memory each: 512 KiB).
const PRESIZE_MAX: u64 = 65_536;

/// What [`prepare`] found and did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct FdLimits {
    /// The soft open-file limit at start.
    pub(crate) before: u64,
    /// The soft limit now (the hard limit, if raising it was allowed).
    pub(crate) now: u64,
    /// Descriptor slots the table was grown to hold (0 if that failed).
    pub(crate) presized: u64,
}

/// Raises the soft open-file limit to the hard one (as Go's runtime does: the soft
/// default of 1,024 on many systems caps a broker at ~1,000 clients), then grows the
/// process's descriptor table once to `min(limit, 65,536)` slots.
///
/// Why grow it now: the kernel doubles the table as descriptors are opened, and when more
/// than one thread shares it (any multi-threaded runtime) each doubling waits for an RCU
/// grace period (`expand_files` -> `synchronize_rcu`) inside `accept(2)`. On the bench
/// machine that blocked the accepting worker 12-21 ms at a time, about ten times on the
/// way to 10,000 connections: a third of the time `bench conn` took. Called while the
/// process has one thread, the growth does not wait, and later connections never do.
pub(crate) fn prepare() -> FdLimits {
    let lim = getrlimit(Resource::Nofile);
    let before = lim.current.unwrap_or(u64::MAX);
    // An unlimited hard limit is not accepted for NOFILE; the kernel's default cap is 2^20.
    let hard = lim.maximum.unwrap_or(1 << 20);
    let mut now = before;
    if hard > before
        && setrlimit(
            Resource::Nofile,
            Rlimit {
                current: Some(hard),
                maximum: lim.maximum,
            },
        )
        .is_ok()
    {
        now = hard;
    }
    let want = now.min(PRESIZE_MAX);
    let presized = std::fs::File::open("/dev/null")
        .ok()
        .and_then(|f| {
            // The lowest free descriptor at or above `want - 1`: the table now has room
            // for `want` (the kernel rounds up to a power of two). Closed at once.
            let min = i32::try_from(want.saturating_sub(1)).ok()?;
            rustix::io::fcntl_dupfd_cloexec(f.as_fd(), min).ok()
        })
        .map_or(0, |_| want);
    FdLimits {
        before,
        now,
        presized,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prepare_keeps_the_limit_at_least_where_it_was_and_sizes_the_table() {
        let before = getrlimit(Resource::Nofile).current.unwrap_or(u64::MAX);
        let l = prepare();
        assert_eq!(l.before, before);
        assert!(l.now >= l.before);
        let now = getrlimit(Resource::Nofile).current.unwrap_or(u64::MAX);
        assert_eq!(now, l.now);
        // /dev/null exists wherever the tests run, so the table was grown.
        assert_eq!(l.presized, l.now.min(PRESIZE_MAX));
        // The kernel's table has the slots now (`FDSize`: slots allocated).
        let status = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
        let slots: u64 = status
            .lines()
            .find_map(|l| l.strip_prefix("FDSize:"))
            .and_then(|v| v.trim().parse().ok())
            .expect("FDSize line");
        assert!(slots >= l.presized, "FDSize {slots} < {}", l.presized);
        // The descriptor used to grow it is closed again: a new one is a low number.
        let f = std::fs::File::open("/dev/null").expect("open /dev/null");
        assert!((std::os::fd::AsRawFd::as_raw_fd(&f) as u64) < l.presized.saturating_sub(1));
    }
}
