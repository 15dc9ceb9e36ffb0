//! The broker: shared state across connections and the handle embedders hold.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use halyard_codec::{ProtocolVersion, QoS, ReasonCode, TopicFilter, TopicName};
use halyard_store::{Op, SessionOwner, SessionRecord, Store, StoredMessage, SubscriptionRecord};
use halyard_transport::{Monitor, PeerInfo};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::{Notify, Semaphore, mpsc, watch};
use tokio::time::Instant;
use tracing::{debug, error, info, warn};

use crate::auth::{Access, Anonymous, Identity, Security, is_sys};
use crate::config::{BrokerConfig, defaults};
use crate::message::Message;
use crate::queue::{Entry, Run, Segment};
use crate::registry::Registry;
use crate::retained::Retained;
use crate::router::{Match, Routes, SubscriptionIndex};
use crate::session::{
    Awaiting, ConnInfo, Enqueued, Inflight, Outgoing, PendingWill, QueueLimits, Session,
    SessionState, Subscription,
};
use crate::stats::{Stats, StatsSnapshot};

/// How often expired retained messages are swept (they are never delivered once expired;
/// the sweep only frees memory).
const RETAINED_SWEEP_INTERVAL: Duration = Duration::from_secs(60);

/// State shared by every connection task.
pub(crate) struct Inner {
    /// Swapped whole on reload; readers take a cheap snapshot (`cfg()`).
    cfg: ArcSwap<BrokerConfig>,
    /// Client id -> session, with per-user counts (`registry.rs`). Locked only to find,
    /// insert or remove a session; never held while a session lock is taken.
    pub(crate) sessions: Mutex<Registry>,
    pub(crate) subs: SubscriptionIndex,
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
    security: RwLock<Arc<Security>>,
    /// Failed logins per source address.
    pub(crate) auth_failures: AuthFailures,
    /// Moves on every `set_security`: connections drop their cached access decisions.
    security_generation: AtomicU64,
    /// Bytes of client messages alive (see `max_memory_bytes`).
    pub(crate) memory: &'static crate::message::MemoryUse,
    /// Copies of routed messages for admin topic taps; only sent to while `taps` > 0, so
    /// routing pays one relaxed load when nobody watches.
    pub(crate) tap: tokio::sync::broadcast::Sender<Arc<Message>>,
    pub(crate) taps: Arc<std::sync::atomic::AtomicUsize>,
    /// Sessions whose connection waits for the store to make a ticket durable (see
    /// `notify_durable`); each at most once (`Session::durable_waiting`).
    durable_waiters: Mutex<Vec<Arc<Session>>>,
    /// The store's durable ticket (None: every change is durable at once). One receiver
    /// for every connection, read with `borrow` (a connection's own was 16 bytes of it).
    durable: Option<watch::Receiver<u64>>,
    started: Instant,
    /// SUBSCRIBE packets read from a socket and not yet handled: a PUBLISH read meanwhile
    /// on another connection waits for them, briefly (see `Then::Publish` in connection.rs).
    pub(crate) subscribing: std::sync::atomic::AtomicUsize,
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

    fn clear(&self) {
        self.map.lock().unwrap_or_else(|e| e.into_inner()).clear();
    }
}

impl fmt::Debug for Inner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Inner").finish_non_exhaustive()
    }
}

/// A cheap handle to a running broker. Feed it connections with
/// [`Broker::spawn_connection`]; stop it with [`Broker::shutdown`].
#[derive(Debug, Clone)]
pub struct Broker {
    pub(crate) inner: Arc<Inner>,
    /// Every connection task holds a clone of the sender; shutdown drops ours and waits
    /// until the receiver sees the last one go (mini-redis' drain pattern).
    drain: Arc<Mutex<Option<mpsc::Sender<()>>>>,
    drain_rx: Arc<tokio::sync::Mutex<mpsc::Receiver<()>>>,
}

impl Broker {
    /// Builds the broker, restores what `store` recovered, and starts its housekeeping
    /// task. Must be called within a Tokio runtime.
    pub fn new(cfg: BrokerConfig, store: Arc<dyn Store>) -> Broker {
        let (shutdown, _) = watch::channel(false);
        let cfg_allow_anonymous = cfg.allow_anonymous;
        let inner = Arc::new(Inner {
            permits: Arc::new(Semaphore::new(
                cfg.max_connections.min(Semaphore::MAX_PERMITS),
            )),
            cfg: ArcSwap::from_pointee(cfg),
            durable: store.durable(),
            sessions: Mutex::new(Registry::default()),
            subs: SubscriptionIndex::default(),
            retained: Retained::default(),
            store,
            stats: Stats::default(),
            shutdown,
            next_conn_id: AtomicU64::new(1),
            next_message_id: AtomicU64::new(1),
            timers: Timers::default(),
            monitor: Monitor::default(),
            security: RwLock::new(Arc::new(Security {
                anonymous: if cfg_allow_anonymous {
                    Anonymous::Allow
                } else {
                    Anonymous::Deny
                },
                ..Security::default()
            })),
            auth_failures: AuthFailures::default(),
            security_generation: AtomicU64::new(0),
            memory: crate::message::MemoryUse::new_static(),
            tap: tokio::sync::broadcast::channel(crate::admin::TAP_CAPACITY).0,
            taps: Arc::default(),
            durable_waiters: Mutex::default(),
            started: Instant::now(),
            subscribing: Default::default(),
        });
        inner.recover();
        tokio::spawn(housekeeping(inner.clone()));
        if let Some(rx) = inner.store.durable() {
            tokio::spawn(notify_durable(Arc::downgrade(&inner), rx));
        }
        let (tx, rx) = mpsc::channel(1);
        Broker {
            inner,
            drain: Arc::new(Mutex::new(Some(tx))),
            drain_rx: Arc::new(tokio::sync::Mutex::new(rx)),
        }
    }

    /// Serves one client connection on its own task. `peer` says who it is (an address
    /// for logs, or what a transport learnt: TLS identity, listener, proxy).
    /// A panic in the task ends that connection only: the session is detached as on a
    /// lost connection (will included) and everything else carries on.
    pub fn spawn_connection<S>(&self, stream: S, peer: impl Into<PeerInfo>)
    where
        S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
    {
        let Some(guard) = self.drain.lock().unwrap_or_else(|e| e.into_inner()).clone() else {
            return; // shutting down: drop the stream
        };
        let inner = self.inner.clone();
        let peer: PeerInfo = peer.into();
        // At debug level and above, every log line of this connection carries its peer
        // and, once CONNECT is accepted, its client id (JSON logs show them as span
        // fields). Not at info: an enabled span keeps its fields in the subscriber's
        // registry for the connection's whole life, ~1 KB per connection (3.3 KB instead
        // of 2.3 KB per idle connection at the default level), and every info or warn
        // line of a connection names its peer and client id itself.
        let span = tracing::debug_span!(
            "conn",
            peer = %peer,
            client_id = tracing::field::Empty
        );
        let task = crate::connection::serve(inner, stream, peer, guard);
        if span.is_disabled() {
            // A disabled span is still 32 bytes of every task (tokio rounds a task up to
            // 128-byte lines, so those bytes decide between 256 and 384 per connection).
            tokio::spawn(task);
        } else {
            tokio::spawn(tracing::Instrument::instrument(task, span));
        }
    }

    /// Replaces the authentication and authorization settings (a reload). Connections
    /// already established keep their session; new CONNECTs use the new settings.
    pub fn set_security(&self, security: Security) {
        *self
            .inner
            .security
            .write()
            .unwrap_or_else(|e| e.into_inner()) = Arc::new(security);
        self.inner.auth_failures.clear();
        self.inner
            .security_generation
            .fetch_add(1, Ordering::Release);
    }

    /// The authentication and authorization settings in force.
    pub fn security(&self) -> Arc<Security> {
        self.inner.security()
    }

    /// The monitor event stream (connections here; listeners emit into the same one
    /// when given this monitor).
    pub fn monitor(&self) -> &Monitor {
        &self.inner.monitor
    }

    /// A receiver that turns true when graceful shutdown begins (for listeners).
    pub fn shutdown_signal(&self) -> watch::Receiver<bool> {
        self.inner.shutdown.subscribe()
    }

    /// Graceful shutdown: stop taking connections, tell every client (v5: DISCONNECT 0x8B),
    /// and wait up to `shutdown_timeout` for connection tasks to drain. Returns false if the
    /// deadline passed with connections still open.
    pub async fn shutdown(&self) -> bool {
        info!("shutting down: disconnecting clients");
        self.inner.shutdown.send_replace(true);
        // Running connections learn it through their kick (`Session::kick`); any attached after
        // this sweep sees the flag when it starts (`Connection::run`).
        for s in self.inner.sessions_snapshot() {
            let mut st = s.lock();
            s.kick(&mut st, ReasonCode::ServerShuttingDown);
        }
        self.drain.lock().unwrap_or_else(|e| e.into_inner()).take();
        let mut rx = self.drain_rx.lock().await;
        let drained = tokio::time::timeout(self.inner.cfg().shutdown_timeout, rx.recv())
            .await
            .is_ok();
        if !drained {
            warn!("shutdown deadline passed with connections still open");
        }
        // Make everything applied durable and stop the store's writer.
        let store = self.inner.store.clone();
        let _ = tokio::task::spawn_blocking(move || store.flush()).await;
        drained
    }

    /// Current counters.
    pub fn stats(&self) -> StatsSnapshot {
        let mut s = self.inner.stats.snapshot();
        s.message_bytes_alive = self.inner.memory.bytes() as u64;
        s.connections_current = self.inner.stats.connections_current.load(Ordering::Relaxed);
        s
    }

    /// Sessions known (connected or not), subscriptions, retained messages.
    pub fn counts(&self) -> (usize, usize, usize) {
        let sessions = self
            .inner
            .sessions
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .len();
        (sessions, self.inner.subs.len(), self.inner.retained.len())
    }

    /// How long the broker has run.
    pub fn uptime(&self) -> Duration {
        self.inner.started.elapsed()
    }

    pub(crate) fn inner(&self) -> &Arc<Inner> {
        &self.inner
    }
}

/// QoS 0 deliveries routed while a connection handles one batch of packets, queued per
/// session when the batch ends (or before anything that must not overtake them): in a
/// fan-out, one session lock and one wake-up per subscriber per batch instead of per
/// message (the lock's release and the wake-up were a third of the CPU per delivery).
/// Messages in a row on one cached route are gathered into a [`Segment`] that each
/// matched session queues as one [`Run`] (see `queue.rs`).
#[derive(Debug, Default)]
pub(crate) struct Deferred {
    /// Session (by address) -> its entry in `groups`.
    index: foldhash::HashMap<usize, usize>,
    groups: Vec<(Arc<Session>, Vec<Entry>)>,
    /// Items held (deliveries, messages of the open segment and its members); at
    /// [`Deferred::MAX`] they are queued at once. Queue limits apply only when queued, so
    /// without a bound a 64 KiB read of tiny messages to many subscribers could hold
    /// millions of deliveries here.
    len: usize,
    /// Emptied group vectors kept for the next batch: a fan-out to 100 subscribers
    /// otherwise allocated 100 vectors per batch and grew each one several times. Bounded
    /// (`SPARE_MAX` of at most `SPARE_CAPACITY`, ~80 KiB), and dropped with the batch state
    /// when the connection goes idle.
    spare: Vec<Vec<Entry>>,
    /// The open segment: QoS 0 messages, in order, all routed with the same cached
    /// match...
    seg: Vec<Arc<Message>>,
    /// ...whose sessions (as their index in `groups`) and subscription identifiers these are.
    seg_members: Vec<(usize, Box<[u32]>)>,
}

impl Deferred {
    const MAX: usize = 1024;
    const SPARE_MAX: usize = 128;
    const SPARE_CAPACITY: usize = 16;

    /// Holds the deliveries of QoS 0 message `msg` to `matches`. `same_route`: `matches`
    /// is the cached result the previous message was routed with, and holds no shared
    /// subscription.
    fn push_message(&mut self, matches: &mut [Match], msg: &Arc<Message>, same_route: bool) {
        // A RETAIN flag may be forwarded to some sessions and not to others; such a
        // message (rare: a retained one is usually stored, which defers nothing) is held
        // per delivery.
        let segment = same_route && !msg.retain;
        if !self.seg.is_empty() {
            if segment {
                self.seg.push(msg.clone());
                self.len += 1;
                return;
            }
            self.close_segment();
        }
        if segment && !matches.is_empty() {
            for m in matches.iter() {
                let g = self.group(&m.session);
                self.seg_members
                    .push((g, m.subscription_ids.as_slice().into()));
            }
            self.seg.push(msg.clone());
            self.len += 1 + matches.len();
            return;
        }
        for m in matches {
            self.len += 1;
            let out = m.delivery(msg.clone());
            let g = self.group(&m.session);
            self.groups[g].1.push(Entry::One(out));
        }
    }

    /// The index in `groups` of `session`'s deliveries, added if new.
    fn group(&mut self, session: &Arc<Session>) -> usize {
        // Fan-in: usually the same session as the last delivery.
        if let Some(i) = self.groups.len().checked_sub(1)
            && Arc::ptr_eq(&self.groups[i].0, session)
        {
            return i;
        }
        let key = Arc::as_ptr(session) as usize;
        *self.index.entry(key).or_insert_with(|| {
            // The session's reference is taken once per batch, not per delivery.
            let outs = self.spare.pop().unwrap_or_default();
            self.groups.push((session.clone(), outs));
            self.groups.len() - 1
        })
    }

    /// Hands the open segment to its sessions: a run each (one delivery each when it
    /// holds a single message).
    fn close_segment(&mut self) {
        if self.seg.len() == 1 {
            let msg = self.seg.pop().expect("one message");
            for (g, subscription_ids) in self.seg_members.drain(..) {
                self.groups[g].1.push(Entry::One(Outgoing {
                    msg: msg.clone(),
                    qos: QoS::AtMostOnce,
                    retain: false,
                    subscription_ids,
                    shared: None,
                    recorded: false,
                }));
            }
        } else if !self.seg.is_empty() {
            let seg = Segment::new(std::mem::take(&mut self.seg), self.seg_members.len());
            for (g, subscription_ids) in self.seg_members.drain(..) {
                self.groups[g]
                    .1
                    .push(Entry::Run(Run::new(seg.clone(), subscription_ids)));
            }
        }
        self.seg_members.clear();
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.groups.is_empty()
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
        self.sessions
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .sessions()
            .cloned()
            .collect()
    }

    pub(crate) fn session(&self, client_id: &str) -> Option<Arc<Session>> {
        self.sessions
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(client_id)
            .cloned()
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
    /// broker's own: no client writes there, whatever the ACL says.
    pub(crate) fn may_write(&self, who: &Identity, topic: &str) -> bool {
        !is_sys(topic)
            && self
                .security()
                .authorizer
                .as_ref()
                .is_none_or(|a| a.check(who, Access::Write, topic))
    }

    /// Routes one message: retains it if asked, then queues a delivery to every matching
    /// session. `origin` is the publishing client, for No Local. Runs on the publisher's task. Every store op this causes, plus `extra`,
    /// goes to the store in **one** batch, so a crash keeps all or none of it. Returns how
    /// many sessions matched and the ticket to wait for before acknowledging the publisher.
    pub(crate) fn publish(
        &self,
        msg: &Arc<Message>,
        origin: Option<&str>,
        routes: &mut Routes,
        extra: Vec<Op>,
        cfg: &BrokerConfig,
        deferred: Option<&mut Deferred>,
    ) -> (usize, u64) {
        let mut ops = Vec::new();
        let retain = msg.retain
            && cfg.retain_available
            && match self
                .retained
                .set(msg, cfg.max_retained_messages, cfg.max_retained_bytes)
            {
                crate::retained::SetOutcome::Done => true,
                crate::retained::SetOutcome::OverLimit => {
                    // Delivered as usual, just not kept: the limit bounds memory and disk.
                    Stats::inc(&self.stats.retained_refused);
                    debug!(topic = %msg.topic, "retained message limit reached; not retained");
                    false
                }
            };
        // $SYS topics are the broker's live state: retained for new subscribers, never
        // stored (they are republished after a restart anyway).
        if retain && !msg.topic.as_str().starts_with("$SYS/") {
            ops.push(if msg.payload.is_empty() {
                Op::RetainDelete {
                    topic: msg.topic.to_string(),
                }
            } else {
                Op::RetainSet(stored(msg))
            });
        }
        let (matches, same_route) = self.subs.matches_cached(msg.topic.as_str(), origin, routes);
        let matched = matches.len();
        if matched == 0 && !msg.topic.as_str().starts_with('$') {
            Stats::inc(&self.stats.dropped_no_subscribers);
        }
        if self.taps.load(Ordering::Relaxed) > 0 {
            let _ = self.tap.send(msg.clone());
        }
        let limits = Self::queue_limits(cfg);
        // A QoS 0 message's deliveries are all QoS 0: nothing to store, nothing that waits
        // for a ticket, so a publisher's batch may queue them per session at its end.
        // Anything else first flushes what was deferred, so each session still receives
        // in publish order.
        let deferred = match deferred {
            Some(d) if msg.qos == QoS::AtMostOnce && extra.is_empty() && ops.is_empty() => {
                d.push_message(matches, msg, same_route);
                // No `set_ticket`: only recorded (QoS 1/2) deliveries read the ticket, and
                // a QoS 0 message never has one; the compare-exchange was 2.6% of a fan-in.
                if d.len >= Deferred::MAX {
                    self.flush_deferred(d, limits);
                }
                return (matched, 0);
            }
            other => other,
        };
        if let Some(d) = deferred {
            self.flush_deferred(d, limits);
        }
        for m in matches {
            let out = m.delivery(msg.clone());
            let (r, _) = m.session.enqueue(out, limits, &mut ops);
            self.count_enqueue(r);
        }
        ops.extend(extra);
        let ticket = if ops.is_empty() {
            0
        } else {
            self.store.apply(ops)
        };
        msg.set_ticket(ticket);
        (matched, ticket)
    }

    /// Queues what a batch deferred (see [`Deferred`]): one lock and one wake-up per
    /// session.
    pub(crate) fn flush_deferred(&self, d: &mut Deferred, limits: QueueLimits) {
        if d.seg.is_empty() && d.groups.is_empty() {
            return; // every QoS 1/2 publish comes here first
        }
        d.close_segment();
        // QoS 0 deliveries record nothing; should one ever do, it still reaches the store.
        let mut ops = Vec::new();
        for (session, mut outs) in d.groups.drain(..) {
            session.enqueue_many(outs.drain(..), limits, &mut ops, |r, n| {
                self.count_enqueue_n(r, n)
            });
            if outs.capacity() <= Deferred::SPARE_CAPACITY && d.spare.len() < Deferred::SPARE_MAX {
                d.spare.push(outs);
            }
        }
        d.index.clear();
        d.len = 0;
        if !ops.is_empty() {
            self.store.apply(ops);
        }
    }

    /// Hands deliveries a departing shared-group member did not send to other members of
    /// the same group (§4.8.2); with no other member they stay with `leaving`. One store
    /// batch for all of them.
    pub(crate) fn redispatch_shared(&self, leaving: &Arc<Session>, outs: Vec<Outgoing>) {
        let limits = Self::queue_limits(&self.cfg.load());
        let mut ops = Vec::new();
        let mut msgs = Vec::new();
        for out in outs {
            msgs.push(out.msg.clone());
            let Some(filter) = out.shared.clone() else {
                continue;
            };
            let r = match self.subs.pick_other_member(&filter, leaving) {
                Some(m) => {
                    let (session, out) = m.into_delivery(out.msg);
                    session.enqueue(out, limits, &mut ops)
                }
                None => leaving.enqueue(
                    Outgoing {
                        recorded: false,
                        ..out
                    },
                    limits,
                    &mut ops,
                ),
            };
            self.count_enqueue(r.0);
        }
        let ticket = if ops.is_empty() {
            0
        } else {
            self.store.apply(ops)
        };
        for m in msgs {
            m.set_ticket(ticket);
        }
    }

    pub(crate) fn count_enqueue(&self, r: Enqueued) {
        self.count_enqueue_n(r, 1);
    }

    /// Counts outcome `r` for `n` messages.
    pub(crate) fn count_enqueue_n(&self, r: Enqueued, n: usize) {
        let counter = match r {
            Enqueued::Queued | Enqueued::DroppedEnded => return,
            Enqueued::QueuedEvictedQos0 => &self.stats.dropped_qos0_evicted,
            Enqueued::DroppedFull => &self.stats.dropped_queue_full,
            Enqueued::DroppedOfflineQos0 => &self.stats.dropped_offline_qos0,
        };
        Stats::add(counter, n as u64);
    }

    /// Publishes a will, if its client may still write to its topic: rights are checked
    /// again here, not only at CONNECT, since they may have changed in between (reload,
    /// a delay, a restart).
    pub(crate) fn publish_will(&self, session: &Session, msg: &Arc<Message>) {
        let client_id = &*session.client_id;
        let who = Identity {
            client_id: session.client_id.clone(),
            username: session.lock().owner().flatten().cloned(),
        };
        if !self.may_write(&who, msg.topic.as_str()) {
            Stats::inc(&self.stats.publish_denied);
            info!(client_id, user = who.username.as_deref(), topic = %msg.topic, "will not published: its client may not write to its topic");
            return;
        }
        debug!(client_id, topic = %msg.topic, "publishing will");
        Stats::inc(&self.stats.wills_published);
        let origin = msg.origin.as_deref();
        self.publish(
            msg,
            origin,
            &mut Routes::default(),
            Vec::new(),
            &self.cfg.load(),
            None,
        );
    }

    /// Asks `notify_durable` to wake `session`'s connection the next time the store's
    /// durable ticket moves. The caller reads the ticket again after this: one that moved
    /// just before could not wake it.
    pub(crate) fn wait_durable(&self, session: &Arc<Session>) {
        if !session.durable_waiting.swap(true, Ordering::AcqRel) {
            self.durable_waiters
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(session.clone());
        }
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
    ) {
        let limit = st
            .info
            .as_ref()
            .map_or(0, |i| u64::from(i.keep_alive) * 1500);
        if limit > 0 {
            let now = self.ms_at(Instant::now());
            session.last_rx.store(now as u32, Ordering::Relaxed);
            self.keepalive_schedule(session, st, conn_id, now + limit);
        }
    }

    /// Drops the keep-alive deadline of `st`'s attached connection `conn_id` (it ends, or
    /// another takes the session over). With the session locked.
    pub(crate) fn keepalive_cancel(&self, st: &SessionState, conn_id: u64) {
        if st.info.as_ref().is_none_or(|i| i.keep_alive == 0) {
            return;
        }
        // A deadline is never more than 2^31 ms (24 days) from now: a keep alive is at
        // most 65,535 s, 1.5 times that is 27 hours, and a due one is handled at once. So
        // the value with the kept low 32 bits nearest to now is the deadline.
        let due = restore_ms(self.ms_at(Instant::now()), st.keepalive_due);
        self.timers
            .keepalive
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&(due, conn_id));
    }

    fn keepalive_next(&self) -> Option<Instant> {
        let q = self
            .timers
            .keepalive
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        q.keys()
            .next()
            .map(|k| self.started + Duration::from_millis(k.0))
    }

    /// Closes the connections whose keep alive ran out by `now` [MQTT-3.1.2-22] (through
    /// their kick, with Keep Alive timeout 0x8D) and moves the others' deadlines to 1.5
    /// keep alives after they were last heard from.
    fn keepalive_expire(&self, now: Instant) {
        let now_ms = self.ms_at(now);
        let due = {
            let mut q = self
                .timers
                .keepalive
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            let later = q.split_off(&(now_ms + 1, 0));
            std::mem::replace(&mut *q, later)
        };
        for ((_, conn_id), session) in due {
            let mut st = session.lock();
            if !st.is_attached(conn_id) {
                continue; // it ended or was taken over
            }
            let limit = st
                .info
                .as_ref()
                .map_or(0, |i| u64::from(i.keep_alive) * 1500);
            // Wrapping: `last_rx` keeps milliseconds in 32 bits. One read just now can be
            // ahead of `now_ms`: that is no silence at all.
            let since = (now_ms as u32).wrapping_sub(session.last_rx.load(Ordering::Relaxed));
            let silent = if since > 1 << 31 { 0 } else { u64::from(since) };
            if silent < limit {
                self.keepalive_schedule(&session, &mut st, conn_id, now_ms - silent + limit);
            } else {
                session.kick(&mut st, ReasonCode::KeepAliveTimeout);
            }
        }
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

    /// Discards a session: its subscriptions, queue and pending will (published now, as the
    /// session's end comes before its delay [MQTT-3.1.3-9]).
    /// Shared-subscription messages it holds, queued or QoS 1 in flight, go to the other
    /// members of their groups (section 4.8.2), whenever the session ends: at once (expiry
    /// 0), on expiry, or discarded by a clean start.
    pub(crate) fn end_session(&self, session: &Arc<Session>) {
        let (subs, will, stored, orphans) = {
            let mut st = session.lock();
            if st.ended {
                return;
            }
            st.ended = true;
            let orphans =
                st.take_shared(true, &session.client_id, &*self.store, self.durable_now());
            st.clear_messages();
            let subs: Vec<Subscription> = st.subscriptions.drain().map(|(_, s)| s).collect();
            (subs, st.pending_will.take(), st.stored, orphans)
        };
        {
            self.sessions
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&session.client_id, session);
        }
        for s in &subs {
            self.subs.unsubscribe(&s.filter, session);
            self.memory
                .add_subscription_bytes(-Subscription::cost(s.filter.as_str()));
        }
        if !orphans.is_empty() {
            self.redispatch_shared(session, orphans);
        }
        if stored {
            self.store.apply(vec![Op::SessionDelete {
                client_id: session.client_id.to_string(),
            }]);
        }
        if let Some(w) = will {
            self.publish_will(session, &w.msg);
        }
    }

    /// Records the session header if the session outlives its connection (clean sessions
    /// are never written). Under the session lock, to keep its ops in order.
    pub(crate) fn persist_session(&self, session: &Session, connected: bool) -> u64 {
        let mut st = session.lock();
        if st.expiry_interval == 0 || st.ended {
            return 0;
        }
        st.stored = true;
        let rec = SessionRecord {
            client_id: session.client_id.to_string(),
            protocol: st.protocol,
            expiry_interval: st.expiry_interval,
            disconnected_at: (!connected).then(SystemTime::now),
            owner: match st.owner() {
                None => SessionOwner::Unknown,
                Some(None) => SessionOwner::Anonymous,
                Some(Some(u)) => SessionOwner::User(u.to_string()),
            },
        };
        self.store.apply(vec![Op::SessionUpsert(rec)])
    }

    pub(crate) fn persist_subscription(&self, session: &Session, sub: &Subscription) -> u64 {
        let st = session.lock();
        if !st.stored {
            return 0;
        }
        self.store.apply(vec![Op::Subscribe {
            client_id: session.client_id.to_string(),
            subscription: SubscriptionRecord {
                filter: sub.filter.to_string(),
                options: sub.options,
                identifier: sub.id,
            },
        }])
    }

    /// Rebuilds sessions, subscriptions, pending wills and retained messages from the store.
    fn recover(self: &Arc<Self>) {
        let image = self.store.recover();
        if image.sessions.is_empty() && image.retained.is_empty() {
            return;
        }
        let max_id = image.messages.keys().next_back().copied().unwrap_or(0);
        self.next_message_id.store(max_id + 1, Ordering::Relaxed);
        let now = Instant::now();
        let wall = SystemTime::now();
        // Wall-clock instants from the store become monotonic ones relative to now.
        let to_instant = |t: SystemTime| match t.duration_since(wall) {
            Ok(ahead) => now + ahead,
            Err(behind) => now.checked_sub(behind.duration()).unwrap_or(now),
        };
        for (topic, m) in image.retained {
            let Ok(topic) = TopicName::try_from(topic.as_str()) else {
                warn!(
                    topic,
                    "skipping stored retained message with an invalid topic"
                );
                continue;
            };
            let mut msg = Message::new(
                self.message_id(),
                topic,
                m.payload,
                m.qos,
                true,
                m.properties.map(|p| *p).unwrap_or_default(),
                None,
                now,
            );
            msg.expires_at = m.expires_at.map(to_instant);
            msg.set_ticket(0);
            // Restored messages count against `max_memory_bytes` like received ones: a
            // large backlog holds publishers back until it drains.
            self.retained.restore(Arc::new(msg.charged_to(self.memory)));
        }
        // Message bodies shared by the recovered deliveries: one `Arc` per id.
        let mut bodies: HashMap<u64, Arc<Message>> = HashMap::new();
        for (&id, m) in &image.messages {
            let Ok(topic) = TopicName::try_from(m.topic.as_str()) else {
                warn!(
                    id,
                    topic = m.topic,
                    "skipping stored message with an invalid topic"
                );
                continue;
            };
            let mut msg = Message::new(
                id,
                topic,
                m.payload.clone(),
                m.qos,
                false,
                m.publish_properties(),
                None,
                now,
            );
            msg.expires_at = m.expires_at.map(to_instant);
            msg.persisted.store(true, Ordering::Relaxed);
            msg.set_ticket(0);
            bodies.insert(id, Arc::new(msg.charged_to(self.memory)));
        }
        // A delivery whose body is missing cannot be sent; the store's recovery should
        // never produce one, so it is counted and reported, not silently skipped.
        let missing = std::cell::Cell::new(0u64);
        let outgoing = |d: &halyard_store::StoredDelivery| {
            let body = bodies.get(&d.message_id);
            if body.is_none() {
                missing.set(missing.get() + 1);
            }
            body.map(|msg| Outgoing {
                msg: msg.clone(),
                qos: d.qos,
                retain: d.retain,
                subscription_ids: d.subscription_ids.clone().into_boxed_slice(),
                shared: d
                    .shared
                    .as_deref()
                    .and_then(|f| TopicFilter::try_from(f).ok())
                    .map(Box::new),
                recorded: true,
            })
        };
        let mut restored = 0;
        for (id, s) in image.sessions {
            let client_id: Arc<str> = id.as_str().into();
            let session = Arc::new(Session::new(
                client_id.clone(),
                s.record.protocol,
                s.record.expiry_interval,
            ));
            let user;
            {
                let mut st = session.lock();
                st.stored = true;
                let owner = match &s.record.owner {
                    SessionOwner::Unknown => None,
                    SessionOwner::Anonymous => Some(None),
                    SessionOwner::User(u) => Some(Some(u.as_str().into())),
                };
                st.info = owner.map(|user| Arc::new(ConnInfo::restored(user, s.record.protocol)));
                user = st.owner().flatten().cloned();
                for (filter, rec) in &s.subscriptions {
                    let Ok(f) = TopicFilter::try_from(filter.as_str()) else {
                        continue;
                    };
                    self.subs
                        .subscribe(&f, &session, rec.options, rec.identifier);
                    self.memory
                        .add_subscription_bytes(Subscription::cost(filter));
                    st.subscriptions.insert(
                        filter.as_str().into(),
                        Subscription {
                            filter: f,
                            options: rec.options,
                            id: rec.identifier,
                        },
                    );
                }
                for d in &s.queue {
                    if let Some(out) = outgoing(d) {
                        st.queue.push(out);
                    }
                }
                for f in &s.inflight {
                    if let Some(out) = outgoing(&f.delivery) {
                        st.inflight_seq += 1;
                        let state = match (out.qos, f.released) {
                            (_, true) => Awaiting::Comp,
                            (QoS::ExactlyOnce, false) => Awaiting::Rec,
                            _ => Awaiting::Ack,
                        };
                        let seq = st.inflight_seq;
                        st.inflight
                            .insert(f.packet_id, Inflight { out, state, seq });
                    }
                }
                st.inbound_qos2.extend(s.inbound_qos2.iter().copied());
                if let Some(w) = &s.will
                    && let Ok(topic) = TopicName::try_from(w.message.topic.as_str())
                {
                    let msg = Message::new(
                        self.message_id(),
                        topic,
                        w.message.payload.clone(),
                        w.message.qos,
                        w.retain,
                        w.message.publish_properties(),
                        Some(client_id.clone()),
                        now,
                    );
                    let due = to_instant(w.due);
                    st.pending_will = Some(PendingWill { msg: Arc::new(msg) });
                    self.timers
                        .schedule(due, TimerEvent::Will(session.clone(), 0));
                }
            }
            // A session that was connected when the store last saw it disconnected at the
            // crash: its expiry counts from now.
            let since = s.record.disconnected_at.map_or(now, to_instant);
            if s.record.expiry_interval != u32::MAX {
                let at = since + Duration::from_secs(u64::from(s.record.expiry_interval));
                self.timers
                    .schedule(at, TimerEvent::SessionExpiry(session.clone(), 0));
            }
            // Restored whatever the limits: they apply to new sessions.
            self.sessions
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(client_id, session, user);
            restored += 1;
        }
        if missing.get() > 0 {
            error!(
                deliveries = missing.get(),
                "stored deliveries refer to message bodies the store does not have; skipped"
            );
        }
        info!(
            sessions = restored,
            retained = self.retained.len(),
            "restored state from the store"
        );
    }
}

/// What the store keeps of a message.
pub(crate) fn stored(msg: &Message) -> StoredMessage {
    let now = Instant::now();
    StoredMessage {
        topic: msg.topic.to_string(),
        payload: msg.payload.clone(),
        qos: msg.qos,
        properties: StoredMessage::boxed(msg.properties().clone()),
        expires_at: msg
            .expires_at
            .map(|e| SystemTime::now() + e.saturating_duration_since(now)),
    }
}

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
    changed: Notify,
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

    fn next_deadline(&self) -> Option<Instant> {
        let q = self.queue.lock().unwrap_or_else(|e| e.into_inner());
        q.keys().next().map(|k| k.0)
    }

    fn take_due(&self, now: Instant) -> Vec<TimerEvent> {
        let mut q = self.queue.lock().unwrap_or_else(|e| e.into_inner());
        let later = q.split_off(&(now, u64::MAX));
        std::mem::replace(&mut *q, later).into_values().collect()
    }
}

/// One task per broker: each time the store makes more of its log durable, wakes the
/// connections waiting for it (held acknowledgements and deliveries, see
/// `Inner::wait_durable`). One watcher for all of them instead of a `changed()` future in
/// every connection's task, which was 136 bytes of each connection, idle ones included.
/// When the store stops, wakes them all a last time (they then see it closed).
async fn notify_durable(inner: std::sync::Weak<Inner>, mut rx: watch::Receiver<u64>) {
    loop {
        let stopped = rx.changed().await.is_err();
        let Some(inner) = inner.upgrade() else { return };
        let waiters = std::mem::take(
            &mut *inner
                .durable_waiters
                .lock()
                .unwrap_or_else(|e| e.into_inner()),
        );
        for s in waiters {
            s.durable_waiting.store(false, Ordering::Release);
            s.wake();
        }
        if stopped {
            return;
        }
    }
}

/// One task per broker: fires session expiry, delayed wills and retained sweeps.
async fn housekeeping(inner: Arc<Inner>) {
    let mut shutdown = inner.shutdown.subscribe();
    inner.timers.schedule(
        Instant::now() + RETAINED_SWEEP_INTERVAL,
        TimerEvent::RetainedSweep,
    );
    loop {
        let next = [inner.timers.next_deadline(), inner.keepalive_next()]
            .into_iter()
            .flatten()
            .min();
        tokio::select! {
            _ = shutdown.changed() => return,
            _ = inner.timers.changed.notified() => continue,
            _ = sleep_until_opt(next) => {}
        }
        let now = Instant::now();
        inner.keepalive_expire(now);
        for ev in inner.timers.take_due(now) {
            match ev {
                TimerEvent::SessionExpiry(session, generation) => {
                    let expired = {
                        let st = session.lock();
                        st.conn().is_none() && st.generation == generation && !st.ended
                    };
                    if expired {
                        info!(client_id = %session.client_id, "session expired");
                        Stats::inc(&inner.stats.sessions_expired);
                        inner.end_session(&session);
                    }
                }
                TimerEvent::Will(session, generation) => {
                    let will = {
                        let mut st = session.lock();
                        if st.conn().is_none() && st.generation == generation {
                            st.pending_will.take()
                        } else {
                            None
                        }
                    };
                    if let Some(w) = will {
                        inner.store.apply(vec![Op::WillPending {
                            client_id: session.client_id.to_string(),
                            will: None,
                        }]);
                        inner.publish_will(&session, &w.msg);
                    }
                }
                TimerEvent::RetainedSweep => {
                    let gone = inner.retained.sweep(now);
                    if !gone.is_empty() {
                        inner.store.apply(
                            gone.into_iter()
                                .map(|topic| Op::RetainDelete { topic })
                                .collect(),
                        );
                    }
                    inner
                        .timers
                        .schedule(now + RETAINED_SWEEP_INTERVAL, TimerEvent::RetainedSweep);
                }
            }
        }
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

async fn sleep_until_opt(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
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

#[cfg(test)]
mod tests {
    use super::*;
    use halyard_codec::{Bytes, ProtocolVersion, SubscriptionOptions, TopicFilter};

    /// A broker whose `n` sessions all subscribe to `t`, queueing QoS 0 while offline.
    fn fanout_fixture(n: usize) -> (Broker, Vec<Arc<Session>>) {
        fanout_fixture_with(
            n,
            BrokerConfig {
                queue_qos0_messages: true,
                ..BrokerConfig::default()
            },
        )
    }

    fn fanout_fixture_with(n: usize, cfg: BrokerConfig) -> (Broker, Vec<Arc<Session>>) {
        let broker = Broker::new(cfg, Arc::new(halyard_store::MemoryStore::new()));
        let filter = TopicFilter::try_from("t").expect("valid filter");
        let subs: Vec<Arc<Session>> = (0..n)
            .map(|i| Arc::new(Session::new(format!("s{i}").into(), ProtocolVersion::V5, 0)))
            .collect();
        for s in &subs {
            broker
                .inner
                .subs
                .subscribe(&filter, s, SubscriptionOptions::default(), None);
        }
        (broker, subs)
    }

    /// Publishes QoS 0 message `id` on `t` as a batch of publisher `p` would.
    fn publish_deferred(inner: &Inner, id: u64, deferred: &mut Deferred, routes: &mut Routes) {
        publish_deferred_on(inner, "t", id, deferred, routes);
    }

    fn publish_deferred_on(
        inner: &Inner,
        topic: &str,
        id: u64,
        deferred: &mut Deferred,
        routes: &mut Routes,
    ) {
        let msg = Arc::new(Message::new(
            id,
            TopicName::new(topic).expect("valid topic"),
            Bytes::from_static(b"x"),
            QoS::AtMostOnce,
            false,
            Default::default(),
            None,
            Instant::now(),
        ));
        inner.publish(
            &msg,
            Some("p"),
            routes,
            Vec::new(),
            &inner.cfg(),
            Some(deferred),
        );
    }

    fn queued_ids(s: &Session) -> Vec<u64> {
        s.lock().queue.message_ids()
    }

    /// Asserts that every session in `subs` has exactly `ids` queued, in order.
    fn assert_queued(subs: &[Arc<Session>], ids: impl Iterator<Item = u64>) {
        let ids: Vec<u64> = ids.collect();
        for s in subs {
            assert_eq!(queued_ids(s), ids, "{}", s.client_id);
        }
    }

    /// A publisher's batch holds at most `Deferred::MAX` items outside the session queues
    /// (a 64 KiB read of tiny messages to many subscribers would otherwise hold millions
    /// of deliveries), and every message reaches every queue, in order. Messages in a row
    /// on one route are held once (a segment), and each session queues them as one run.
    #[tokio::test]
    async fn deferred_deliveries_stay_bounded_and_all_arrive() {
        let (broker, subs) = fanout_fixture_with(
            10,
            BrokerConfig {
                queue_qos0_messages: true,
                max_queued_messages: 10_000,
                ..BrokerConfig::default()
            },
        );
        let inner = &broker.inner;
        let (mut deferred, mut routes) = (Deferred::default(), Routes::default());
        let mut most = 0;
        let mut flushes = 0;
        for id in 0..3000u64 {
            let before = deferred.len;
            publish_deferred(inner, id, &mut deferred, &mut routes);
            flushes += usize::from(deferred.len < before);
            most = most.max(deferred.len);
        }
        assert!(most <= Deferred::MAX, "most held at once: {most}");
        // One item per message in a segment (plus its 10 members): ~1,000 messages per
        // segment, where one item per delivery would flush every ~100 messages.
        assert!((2..=3).contains(&flushes), "{flushes} flushes");
        inner.flush_deferred(&mut deferred, Inner::queue_limits(&inner.cfg()));
        assert_eq!(deferred.len, 0);
        assert_queued(&subs, 0..3000);
        for s in &subs {
            let st = s.lock();
            assert_eq!(st.queue.len(), 3000);
            assert_eq!(st.queue.bytes(), 3000 * 2, "topic `t` and payload `x`");
            // The first message of the route is held per delivery, the rest in runs.
            assert!(
                st.queue.entries() <= 1 + flushes + 1,
                "{} entries",
                st.queue.entries()
            );
        }
    }

    /// When the route changes with every message, nothing is gathered: the bound holds per
    /// delivery, and the order still holds.
    #[tokio::test]
    async fn deferred_deliveries_without_segments_stay_bounded() {
        let (broker, subs) = fanout_fixture(10);
        let inner = &broker.inner;
        let (mut deferred, mut routes) = (Deferred::default(), Routes::default());
        let mut most = 0;
        for id in 0..500u64 {
            // Every other message goes to a topic nobody subscribed to.
            let topic = if id % 2 == 0 { "t" } else { "u" };
            publish_deferred_on(inner, topic, id, &mut deferred, &mut routes);
            most = most.max(deferred.len);
        }
        // 10 deliveries per message on `t`: the bound is reached, never passed.
        assert!(
            (Deferred::MAX - 10..=Deferred::MAX).contains(&most),
            "most deferred at once: {most}"
        );
        inner.flush_deferred(&mut deferred, Inner::queue_limits(&inner.cfg()));
        for s in &subs {
            assert_eq!(queued_ids(s), (0..500).step_by(2).collect::<Vec<u64>>());
            assert_eq!(s.lock().queue.entries(), 250, "one entry per delivery");
        }
    }

    /// A run meets the queue's limits exactly as its messages one by one would: a full
    /// queue evicts its oldest QoS 0 messages (the run's own first ones included), an
    /// offline session without QoS 0 queueing drops them, an ended one takes none; each
    /// drop is counted once per message.
    #[tokio::test]
    async fn runs_meet_queue_limits_like_single_deliveries() {
        let (broker, subs) = fanout_fixture_with(
            3,
            BrokerConfig {
                queue_qos0_messages: true,
                max_queued_messages: 4,
                ..BrokerConfig::default()
            },
        );
        let inner = &broker.inner;
        subs[2].lock().ended = true;
        let (mut deferred, mut routes) = (Deferred::default(), Routes::default());
        for id in 0..10u64 {
            publish_deferred(inner, id, &mut deferred, &mut routes);
        }
        inner.flush_deferred(&mut deferred, Inner::queue_limits(&inner.cfg()));
        for s in &subs[..2] {
            assert_eq!(queued_ids(s), [6, 7, 8, 9], "the newest 4 stay");
            assert_eq!(s.lock().queue.bytes(), 4 * 2);
        }
        assert!(queued_ids(&subs[2]).is_empty());
        assert_eq!(inner.stats.snapshot().dropped_qos0_evicted, 2 * 6);

        // Without QoS 0 queueing for offline sessions.
        let mut cfg = (*inner.cfg()).clone();
        cfg.queue_qos0_messages = false;
        inner.replace_config(cfg);
        for id in 10..20u64 {
            publish_deferred(inner, id, &mut deferred, &mut routes);
        }
        inner.flush_deferred(&mut deferred, Inner::queue_limits(&inner.cfg()));
        assert_eq!(queued_ids(&subs[0]), [6, 7, 8, 9]);
        assert_eq!(inner.stats.snapshot().dropped_offline_qos0, 2 * 10);
        assert_eq!(inner.stats.snapshot().dropped_qos0_evicted, 2 * 6);
    }

    /// The group vectors of one batch are reused by the next (a fan-out allocated one per
    /// subscriber per batch), within their bound, and reuse keeps every session's order.
    #[tokio::test]
    async fn deferred_reuses_a_bounded_number_of_group_vectors() {
        let (broker, subs) = fanout_fixture(Deferred::SPARE_MAX + 22);
        let inner = &broker.inner;
        let (mut deferred, mut routes) = (Deferred::default(), Routes::default());
        // Batches of 3 messages (3 x 150 deliveries < Deferred::MAX: flushed by us only).
        for batch in 0..4u64 {
            for id in batch * 3..batch * 3 + 3 {
                publish_deferred(inner, id, &mut deferred, &mut routes);
            }
            if batch > 0 {
                // The spares of the last batch went to this one's first groups.
                assert!(
                    deferred.spare.is_empty(),
                    "batch {batch}: spares left unused"
                );
            }
            inner.flush_deferred(&mut deferred, Inner::queue_limits(&inner.cfg()));
            assert_eq!(
                deferred.spare.len(),
                Deferred::SPARE_MAX,
                "bounded in number"
            );
            assert!(
                deferred
                    .spare
                    .iter()
                    .all(|v| v.is_empty() && v.capacity() <= Deferred::SPARE_CAPACITY)
            );
        }
        assert_queued(&subs, 0..12);
    }
}
