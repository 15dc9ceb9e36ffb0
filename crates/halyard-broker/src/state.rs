//! The state every connection task shares (`Inner`) and its accessors: settings,
//! security, ids, the clock the broker keeps time by, and durability. Behaviour lives in
//! the rooms beside it: routing (`route.rs`), session lifecycle (`lifecycle.rs`), timers
//! (`housekeeping.rs`), recovery (`recover.rs`), the handle (`handle.rs`).

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use arc_swap::ArcSwap;
use halyard_codec::{ProtocolVersion, QoS};
use halyard_store::Store;
use halyard_transport::Monitor;
use tokio::sync::{Semaphore, watch};
use tokio::time::Instant;
use tracing::warn;

use crate::auth::{Access, Identity, Security, sys_denied};
use crate::config::{BrokerConfig, defaults};
use crate::message::Message;
use crate::registry::SessionOwnership;
use crate::retained::Retained;
use crate::router::RoutingInterest;
use crate::session::{QueueLimits, Session, SessionState};
use crate::stats::Stats;
use crate::timers::{Timers, restore_ms};

/// State shared by every connection task.
pub(crate) struct Inner {
    /// Swapped whole on reload; readers take a cheap snapshot (`cfg()`).
    pub(crate) cfg: ArcSwap<BrokerConfig>,
    /// Who holds each client id's session (`registry.rs`; a cluster replaces it).
    pub(crate) sessions: Box<dyn SessionOwnership>,
    /// Which sessions (and, in a cluster, nodes) match a topic (`router.rs`; a cluster
    /// replaces it).
    pub(crate) subs: Box<dyn RoutingInterest>,
    pub(crate) retained: Retained,
    pub(crate) store: Arc<dyn Store>,
    pub(crate) stats: Stats,
    /// One permit per connection up to `max_connections`.
    pub(crate) permits: Arc<Semaphore>,
    /// Flips to true once when graceful shutdown begins.
    pub(crate) shutdown: watch::Sender<bool>,
    pub(crate) next_conn_id: AtomicU64,
    /// Message ids; restarts above the highest recovered id.
    pub(crate) next_message_id: AtomicU64,
    pub(crate) timers: Timers,
    /// Connection events for the log and the admin API (never blocks).
    pub(crate) monitor: Monitor,
    /// Authentication and authorization; swapped whole on reload.
    pub(crate) security: RwLock<Arc<Security>>,
    /// Failed logins per source address.
    pub(crate) auth_failures: AuthFailures,
    /// Moves on every `set_security`: connections drop their cached access decisions.
    pub(crate) security_generation: AtomicU64,
    /// Bytes of client messages alive (see `max_memory_bytes`).
    pub(crate) memory: &'static crate::message::MemoryUse,
    /// Copies of routed messages for admin topic taps; only sent to while `taps` > 0, so
    /// routing pays one relaxed load when nobody watches.
    pub(crate) tap: tokio::sync::broadcast::Sender<Arc<Message>>,
    pub(crate) taps: Arc<std::sync::atomic::AtomicUsize>,
    /// Sessions whose connection waits for the store to make a ticket durable (see
    /// `notify_durable`); each at most once (`Session::durable_waiting`).
    pub(crate) durable_waiters: Mutex<Vec<Arc<Session>>>,
    /// The store's durable ticket (None: every change is durable at once). One receiver
    /// for every connection, read with `borrow` (a connection's own was 16 bytes of it).
    pub(crate) durable: Option<watch::Receiver<u64>>,
    pub(crate) started: Instant,
    /// The wall clock when `started` was read (see `wall_at`).
    pub(crate) started_wall: std::time::SystemTime,
    /// SUBSCRIBE packets read from a socket and not yet handled: a PUBLISH read meanwhile
    /// on another connection waits for them, briefly (see `Then::Publish` in connection.rs).
    pub(crate) subscribing: std::sync::atomic::AtomicUsize,
    /// Queue limits of the broker's own sessions (`$bridge/...`, whose `Session::overridden`
    /// is set), by client id: a bridge's store-and-forward queue has its own bounds and
    /// overflow policy. Read per delivery to such a session only.
    pub(crate) queue_overrides: RwLock<HashMap<Arc<str>, Arc<crate::session::OwnQueue>>>,
    /// How many of `queue_overrides` have the `Block` policy (0: publishes skip the check).
    pub(crate) blocking_queues: std::sync::atomic::AtomicUsize,
}

/// Failed logins per source address in a sliding window: past
/// [`defaults::AUTH_FAILURES_PER_WINDOW`] failures in [`defaults::AUTH_FAILURE_WINDOW_SECS`],
/// further attempts from that address are refused without checking the password, which
/// makes guessing slow and keeps slow hashes from being used to burn our CPU.
#[derive(Debug, Default)]
pub(crate) struct AuthFailures {
    map: Mutex<HashMap<std::net::IpAddr, (u32, Instant)>>,
}

impl AuthFailures {
    fn window() -> Duration {
        Duration::from_secs(defaults::AUTH_FAILURE_WINDOW_SECS)
    }

    pub(crate) fn blocked(&self, ip: std::net::IpAddr) -> bool {
        let map = self.map.lock().unwrap_or_else(|e| e.into_inner());
        map.get(&ip).is_some_and(|&(n, since)| {
            n >= defaults::AUTH_FAILURES_PER_WINDOW && since.elapsed() < Self::window()
        })
    }

    pub(crate) fn record(&self, ip: std::net::IpAddr) {
        let mut map = self.map.lock().unwrap_or_else(|e| e.into_inner());
        if map.len() >= defaults::AUTH_FAILURE_TRACKED_ADDRESSES {
            // Bounded: forget windows that ended (and, if all are live, everything).
            map.retain(|_, (_, since)| since.elapsed() < Self::window());
            if map.len() >= defaults::AUTH_FAILURE_TRACKED_ADDRESSES {
                map.clear();
            }
        }
        let e = map.entry(ip).or_insert((0, Instant::now()));
        if e.1.elapsed() >= Self::window() {
            *e = (0, Instant::now());
        }
        e.0 += 1;
        if e.0 == defaults::AUTH_FAILURES_PER_WINDOW {
            warn!(%ip, failures = e.0, "too many failed logins; refusing this address for a while");
        }
    }

    pub(crate) fn clear(&self) {
        self.map.lock().unwrap_or_else(|e| e.into_inner()).clear();
    }
}

impl fmt::Debug for Inner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Inner").finish_non_exhaustive()
    }
}

impl Inner {
    /// The settings in force now.
    pub(crate) fn cfg(&self) -> Arc<BrokerConfig> {
        self.cfg.load_full()
    }

    /// Swaps the settings; `max_connections` resizes the connection permits.
    pub(crate) fn replace_config(&self, cfg: BrokerConfig) {
        let old = self.cfg.swap(Arc::new(cfg));
        let new = self.cfg.load();
        let (was, now) = (
            old.max_connections.min(Semaphore::MAX_PERMITS),
            new.max_connections.min(Semaphore::MAX_PERMITS),
        );
        if now > was {
            self.permits.add_permits(now - was);
        } else if was > now {
            // Open connections are never closed by a lower limit. Free permits are dropped
            // now; the rest are taken (and dropped) as connections close: until then the
            // waiting acquire is served first, so new connections are refused while more
            // than the new limit are open.
            let rest = (was - now) - self.permits.forget_permits(was - now);
            if rest > 0 {
                let permits = self.permits.clone();
                tokio::spawn(async move {
                    let n = u32::try_from(rest).unwrap_or(u32::MAX);
                    if let Ok(p) = permits.acquire_many_owned(n).await {
                        p.forget();
                    }
                });
            }
        }
    }

    /// The sessions now (a copy of the map's values; the map lock is held only to copy).
    pub(crate) fn sessions_snapshot(&self) -> Vec<Arc<Session>> {
        self.sessions.snapshot()
    }

    pub(crate) fn session(&self, client_id: &str) -> Option<Arc<Session>> {
        self.sessions.get(client_id)
    }

    pub(crate) fn message_id(&self) -> u64 {
        self.next_message_id.fetch_add(1, Ordering::Relaxed)
    }

    /// `n` message ids at once, for a connection to hand out itself: the counter is shared
    /// by every core. Ids need only be unique; unused ones are skipped.
    pub(crate) fn message_ids(&self, n: u64) -> std::ops::Range<u64> {
        let start = self.next_message_id.fetch_add(n, Ordering::Relaxed);
        start..start + n
    }

    pub(crate) fn queue_limits(cfg: &BrokerConfig) -> QueueLimits {
        QueueLimits {
            max_messages: cfg.max_queued_messages,
            max_bytes: cfg.max_queued_bytes,
            queue_qos0_offline: cfg.queue_qos0_messages,
            policy: None,
        }
    }

    /// `session`'s own queue limits, if it has them (see `queue_overrides`).
    #[inline]
    pub(crate) fn own_queue(&self, session: &Session) -> Option<Arc<crate::session::OwnQueue>> {
        if !session.overridden.load(Ordering::Relaxed) {
            return None;
        }
        self.queue_overrides
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(&session.client_id)
            .cloned()
    }

    /// `base`, or `own`'s limits.
    pub(crate) fn limits_with(
        own: Option<&crate::session::OwnQueue>,
        base: QueueLimits,
    ) -> QueueLimits {
        match own {
            Some(o) => QueueLimits {
                max_messages: o.limits.max_messages,
                max_bytes: o.limits.max_bytes,
                policy: Some(o.limits.policy),
                ..base
            },
            None => base,
        }
    }

    /// Whether the messages alive and the subscriptions exceed `max_memory_bytes` (0: no
    /// budget). The hot-path
    /// checks take the settings from the caller, who reads them once per batch of packets:
    /// an `ArcSwap` load per check was ~4% of the CPU per message.
    pub(crate) fn memory_over_budget(&self, cfg: &BrokerConfig) -> bool {
        let max = cfg.max_memory_bytes;
        max > 0 && self.memory.bytes() + self.memory.subscription_bytes() >= max
    }

    /// Whether a topic name or filter exceeds `max_topic_length` or `max_topic_levels`.
    pub(crate) fn topic_over_limits(cfg: &BrokerConfig, topic: &str) -> bool {
        topic.len() > cfg.max_topic_length
            || topic.bytes().filter(|&b| b == b'/').count() + 1 > cfg.max_topic_levels
    }

    pub(crate) fn security_generation(&self) -> u64 {
        self.security_generation.load(Ordering::Acquire)
    }

    pub(crate) fn security(&self) -> Arc<Security> {
        self.security
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Whether `who` may publish to `topic` by the rules in force. `$SYS` is the
    /// broker's own: no client writes there, whatever the ACL says, but for its own
    /// bridge state topic (`auth::sys_denied`).
    pub(crate) fn may_write(&self, who: &Identity, topic: &str) -> bool {
        !sys_denied(topic, &who.client_id)
            && self
                .security()
                .authorizer
                .as_ref()
                .is_none_or(|a| a.check(who, Access::Write, topic))
    }

    /// Nanoseconds from the broker's start to `at` (584 years fit): how a connection
    /// keeps the time of its last read in 8 bytes.
    pub(crate) fn ns_at(&self, at: Instant) -> u64 {
        u64::try_from(at.saturating_duration_since(self.started).as_nanos()).unwrap_or(u64::MAX)
    }

    /// The instant `ns_at` gave `ns` for.
    pub(crate) fn instant_at(&self, ns: u64) -> Instant {
        self.started + std::time::Duration::from_nanos(ns)
    }

    /// The wall-clock time of `at`, for what is stored (disconnect times, will due times)
    /// and shown: the wall clock read at start plus the monotonic time since, so every
    /// time the broker keeps comes from the one `Instant` it is handed.
    pub(crate) fn wall_at(&self, at: Instant) -> std::time::SystemTime {
        self.started_wall + at.saturating_duration_since(self.started)
    }

    /// Milliseconds from the broker's start to `at`: the clock of keep-alive deadlines.
    pub(crate) fn ms_at(&self, at: Instant) -> u64 {
        self.ns_at(at) / 1_000_000
    }

    /// Sets the keep-alive deadline of `session`'s attached connection `conn_id` to `due`
    /// (see `ms_at`). With the session locked (`st`), which orders this against the
    /// connection's end (`keepalive_cancel`).
    pub(crate) fn keepalive_schedule(
        &self,
        session: &Arc<Session>,
        st: &mut SessionState,
        conn_id: u64,
        due: u64,
    ) {
        // The low 32 bits only: 8 bytes more took every session into the next allocator
        // size class. `keepalive_cancel` restores the rest.
        st.keepalive_due = due as u32;
        let mut q = self
            .timers
            .keepalive
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let earliest = q.keys().next().is_none_or(|k| due < k.0);
        q.insert((due, conn_id), session.clone());
        drop(q);
        if earliest {
            self.timers.changed.notify_one();
        }
    }

    /// Starts the keep-alive clock of connection `conn_id`, just attached to `session`
    /// (`st`, locked) with its `ConnInfo`.
    pub(crate) fn keepalive_start(
        &self,
        session: &Arc<Session>,
        st: &mut SessionState,
        conn_id: u64,
        now: Instant,
    ) {
        let limit = st
            .info
            .as_ref()
            .map_or(0, |i| u64::from(i.keep_alive) * 1500);
        if limit > 0 {
            let now = self.ms_at(now);
            session.last_rx.store(now as u32, Ordering::Relaxed);
            self.keepalive_schedule(session, st, conn_id, now + limit);
        }
    }

    /// Drops the keep-alive deadline of `st`'s attached connection `conn_id` (it ends, or
    /// another takes the session over). With the session locked.
    pub(crate) fn keepalive_cancel(&self, st: &SessionState, conn_id: u64, now: Instant) {
        if st.info.as_ref().is_none_or(|i| i.keep_alive == 0) {
            return;
        }
        // A deadline is never more than 2^31 ms (24 days) from now: a keep alive is at
        // most 65,535 s, 1.5 times that is 27 hours, and a due one is handled at once. So
        // the value with the kept low 32 bits nearest to now is the deadline.
        let due = restore_ms(self.ms_at(now), st.keepalive_due);
        self.timers
            .keepalive
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&(due, conn_id));
    }

    /// The highest ticket the store has made durable (`u64::MAX` when it does not track).
    pub(crate) fn durable_now(&self) -> u64 {
        self.durable.as_ref().map_or(u64::MAX, |r| *r.borrow())
    }

    /// Whether the store tracks durability and still runs (after it stopped, nothing more
    /// becomes durable).
    pub(crate) fn durable_tracked(&self) -> bool {
        self.durable
            .as_ref()
            .is_some_and(|r| r.has_changed().is_ok())
    }
}

/// The protocol name used in logs.
pub(crate) fn version_name(v: ProtocolVersion) -> &'static str {
    match v {
        ProtocolVersion::V3_1 => "3.1",
        ProtocolVersion::V3_1_1 => "3.1.1",
        ProtocolVersion::V5 => "5.0",
    }
}

/// The QoS granted for a requested one under the broker's maximum.
pub(crate) fn grant(requested: QoS, max: QoS) -> QoS {
    requested.min(max)
}

/// Messages a topic tap buffers before it reports a gap (it never slows publishers).
pub const TAP_CAPACITY: usize = 1024;
