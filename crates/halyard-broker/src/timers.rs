//! The broker's deadlines: a queue of timed events (session expiry, delayed wills,
//! retained sweeps) and the keep-alive deadlines of every connection, served by the
//! housekeeping task.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::Notify;
use tokio::time::Instant;

use crate::session::Session;

/// Deadlines the broker must act on even with no connection involved.
pub(crate) enum TimerEvent {
    /// Discard the session if it is still disconnected since the given connection.
    SessionExpiry(Arc<Session>, u64),
    /// Publish the pending will if still disconnected since the given connection.
    Will(Arc<Session>, u64),
    RetainedSweep,
}

/// A deadline queue served by the housekeeping task.
#[derive(Default)]
pub(crate) struct Timers {
    queue: Mutex<BTreeMap<(Instant, u64), TimerEvent>>,
    seq: AtomicU64,
    pub(crate) changed: Notify,
    /// Keep-alive deadlines [MQTT-3.1.2-22] by (milliseconds since the broker started,
    /// connection id), one entry per connection that has a keep alive: ~40 bytes of this
    /// map instead of a tokio `Sleep` (a 128-byte block) in every connection. An entry is
    /// moved forward when it comes due and the client was heard from meanwhile
    /// (`Session::last_rx`), so a connection costs one look every 1.5 keep alives, not
    /// one timer reset per read. See `Inner::keepalive_*`.
    pub(crate) keepalive: Mutex<BTreeMap<(u64, u64), Arc<Session>>>,
}

impl Timers {
    pub(crate) fn schedule(&self, at: Instant, ev: TimerEvent) {
        let seq = self.seq.fetch_add(1, Ordering::Relaxed);
        let mut q = self.queue.lock().unwrap_or_else(|e| e.into_inner());
        let earliest = q.keys().next().is_none_or(|k| at < k.0);
        q.insert((at, seq), ev);
        drop(q);
        if earliest {
            self.changed.notify_one();
        }
    }

    pub(crate) fn next_deadline(&self) -> Option<Instant> {
        let q = self.queue.lock().unwrap_or_else(|e| e.into_inner());
        q.keys().next().map(|k| k.0)
    }

    pub(crate) fn take_due(&self, now: Instant) -> Vec<TimerEvent> {
        let mut q = self.queue.lock().unwrap_or_else(|e| e.into_inner());
        let later = q.split_off(&(now, u64::MAX));
        std::mem::replace(&mut *q, later).into_values().collect()
    }
}

/// The milliseconds value (see `Inner::ms_at`) with the low 32 bits `low` nearest to
/// `now`: a keep-alive deadline from the part the session keeps.
pub(crate) fn restore_ms(now: u64, low: u32) -> u64 {
    let due = (now & !0xFFFF_FFFF) | u64::from(low);
    if due > now + (1 << 31) {
        due.saturating_sub(1 << 32)
    } else if due + (1 << 31) < now {
        due + (1 << 32)
    } else {
        due
    }
}
