//! Session state (section 4.1): subscriptions, the queue of messages waiting to be sent,
//! messages in flight to the client, QoS 2 packet ids received and not yet released, the
//! pending will. A session outlives its connections while its expiry interval runs.
//!
//! Locking: one `std::sync::Mutex` per session. It is held only for short, non-async
//! sections (enqueue from a publisher's task; fill/ack from the owning connection's task)
//! and never while any other lock is taken; see ARCHITECTURE.md for the order.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use halyard_codec::{ProtocolVersion, QoS, ReasonCode, SubscriptionOptions, TopicFilter};
use halyard_store::{Op, Store, StoredDelivery};

pub(crate) use crate::conn_info::unix_ms;
pub use crate::conn_info::{ConnInfo, Peer};
use crate::message::Message;
pub(crate) use crate::own_queue::{OwnQueue, QueueOverride, QueuePolicy, QueueStats};
pub(crate) use crate::queue::Outgoing;
use crate::queue::{Entry, Queue, Run};

/// What an outgoing QoS 1/2 message waits for (section 4.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Awaiting {
    /// QoS 1 sent, waiting for PUBACK.
    Ack,
    /// QoS 2 sent, waiting for PUBREC.
    Rec,
    /// PUBREL sent, waiting for PUBCOMP.
    Comp,
}

#[derive(Debug)]
pub(crate) struct Inflight {
    pub(crate) out: Outgoing,
    pub(crate) state: Awaiting,
    /// Send order, to redeliver in the original order on reconnect [MQTT-4.6.0-1].
    pub(crate) seq: u64,
}

/// A subscription as the session remembers it.
#[derive(Debug, Clone)]
pub(crate) struct Subscription {
    pub(crate) filter: TopicFilter,
    pub(crate) options: SubscriptionOptions,
    pub(crate) id: Option<u32>,
}

/// What one subscription holds beyond its filter's bytes, charged to `max_memory_bytes`
/// with them: the session's map entry and `Subscription`, and the topic index's entry
/// (measured ~150-200 bytes together; a round figure, not an allocator count).
pub(crate) const SUBSCRIPTION_OVERHEAD_BYTES: usize = 192;

impl Subscription {
    /// Bytes this subscription is charged to the memory budget (refunded when it goes).
    pub(crate) fn cost(filter: &str) -> isize {
        (filter.len() + SUBSCRIPTION_OVERHEAD_BYTES) as isize
    }
}

/// The link from a session to the connection currently attached to it (whose id is
/// `SessionState::generation`).
#[derive(Debug)]
pub(crate) struct ConnLink {
    /// The connection was told to close with this reason (admin kick, shutdown, keep
    /// alive run out; see `Session::kick`). A takeover needs none: the connection sees
    /// that it is no longer attached.
    pub(crate) kick: Option<ReasonCode>,
}

/// A will waiting for its delay (or for the session to end).
#[derive(Debug)]
pub(crate) struct PendingWill {
    pub(crate) msg: Arc<Message>,
}

#[derive(Debug)]
pub(crate) struct SessionState {
    /// The attached connection, if any; its id is `generation` (not kept twice: with
    /// `SessionHash` and `Qos2Ids`, what keeps a session in the allocator's 256-byte
    /// class). One byte.
    conn: Option<ConnLink>,
    /// Milliseconds since the Unix epoch when the last connection closed; 0: attached,
    /// never connected, or ended by a takeover that did not resume it.
    closed_ms: u64,
    /// The current or last connection; kept after it closes (admin API). Its user name
    /// is the identity the session is bound to (see [`SessionState::owner`]); a session
    /// restored from the store gets one with its stored owner.
    pub(crate) info: Option<Arc<ConnInfo>>,
    /// Id of the last connection attached; timers carry it to ignore stale events.
    pub(crate) generation: u64,
    pub(crate) protocol: ProtocolVersion,
    pub(crate) subscriptions: HashMap<Box<str>, Subscription, SessionHash>,
    pub(crate) queue: Queue,
    pub(crate) inflight: HashMap<u16, Inflight, SessionHash>,
    pub(crate) inflight_seq: u64,
    next_packet_id: u16,
    /// QoS 2 packet ids received and PUBREC'd, not yet released by PUBREL (section 4.3.3).
    pub(crate) inbound_qos2: Qos2Ids,
    /// Session Expiry Interval in seconds; `u32::MAX` never expires.
    pub(crate) expiry_interval: u32,
    /// The attached connection's keep-alive deadline in `Inner::timers`, low 32 bits (see
    /// `Inner::keepalive_schedule`).
    pub(crate) keepalive_due: u32,
    pub(crate) pending_will: Option<PendingWill>,
    /// Set once the session is discarded; publishers then stop queueing to it.
    pub(crate) ended: bool,
    /// Whether the store holds this session (so its end must be recorded too).
    pub(crate) stored: bool,
}

/// The hasher of a session's maps: foldhash with one random seed per process, kept in a
/// static instead of in every map (8 bytes per map; with the boxed QoS 2 ids below, what
/// brings a session into the allocator's 256-byte class). Per-process random, so keys a
/// client chooses (topic filters) cannot be aimed at collisions from outside.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct SessionHash;

impl std::hash::BuildHasher for SessionHash {
    type Hasher = foldhash::fast::FoldHasher<'static>;

    fn build_hasher(&self) -> Self::Hasher {
        static STATE: std::sync::LazyLock<foldhash::fast::RandomState> =
            std::sync::LazyLock::new(Default::default);
        STATE.build_hasher()
    }
}

/// QoS 2 packet ids received and not yet released: boxed on first use (most clients never
/// publish at QoS 2, and the set was 40 bytes of every session).
// Boxed on purpose: the box is 8 bytes of the session, an empty `HashSet` 32.
#[allow(clippy::box_collection)]
#[derive(Debug, Default)]
pub(crate) struct Qos2Ids(Option<Box<HashSet<u16, SessionHash>>>);

impl Qos2Ids {
    pub(crate) fn contains(&self, id: &u16) -> bool {
        self.0.as_ref().is_some_and(|s| s.contains(id))
    }

    pub(crate) fn len(&self) -> usize {
        self.0.as_ref().map_or(0, |s| s.len())
    }

    pub(crate) fn insert(&mut self, id: u16) -> bool {
        self.0.get_or_insert_default().insert(id)
    }

    pub(crate) fn remove(&mut self, id: &u16) -> bool {
        self.0.as_mut().is_some_and(|s| s.remove(id))
    }

    pub(crate) fn clear(&mut self) {
        self.0 = None;
    }

    pub(crate) fn extend(&mut self, ids: impl IntoIterator<Item = u16>) {
        let mut ids = ids.into_iter().peekable();
        if ids.peek().is_some() {
            self.0.get_or_insert_default().extend(ids);
        }
    }
}

/// Client ids of the broker's own sessions (bridges' store-and-forward queues): only
/// in-process clients (`Broker::spawn_internal`) may use them.
pub(crate) const INTERNAL_CLIENT_ID_PREFIX: &str = "$bridge/";

/// Limits applied when queueing.
#[derive(Debug, Clone, Copy)]
pub(crate) struct QueueLimits {
    pub(crate) max_messages: usize,
    pub(crate) max_bytes: usize,
    pub(crate) queue_qos0_offline: bool,
    /// `None`: the broker's policy (evict the oldest QoS 0, else drop the new message).
    pub(crate) policy: Option<QueuePolicy>,
}

/// What happened to a message offered to a session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Enqueued {
    Queued,
    /// Queued after evicting the oldest queued QoS 0 message (counted as dropped).
    QueuedEvictedQos0,
    /// Not queued: the session's queue is full of QoS 1/2 messages.
    DroppedFull,
    /// Not queued: QoS 0 for an offline session, with `queue_qos0_messages` off.
    DroppedOfflineQos0,
    /// Not queued: the session has ended.
    DroppedEnded,
    /// Queued after dropping the oldest queued message (policy `DropOldest`).
    QueuedDroppedOldest,
}

#[derive(Debug)]
pub(crate) struct Session {
    pub(crate) client_id: Arc<str>,
    pub(crate) state: Mutex<SessionState>,
    /// Wakes the attached connection's task when something was queued (see `wake`).
    wake: Wake,
    /// A wake-up not yet seen (tokio's permit): set before the waker is woken, consumed
    /// by the poll that returns ready. Beside the other flags, not in `Wake`: there it
    /// took the session into the next allocator size class.
    wake_pending: AtomicBool,
    /// Mirrors `state.conn.is_some()` so routing can prefer online shared-group members
    /// without taking the session lock.
    pub(crate) online: AtomicBool,
    /// Listed in `Inner::durable_waiters` (see `Inner::wait_durable`).
    pub(crate) durable_waiting: AtomicBool,
    /// The session has its own queue limits, in `Inner::queue_overrides` (bridges).
    pub(crate) overridden: AtomicBool,
    /// When the attached connection last read from its client, in milliseconds since the
    /// broker started (`Inner::ms_at`), wrapping: for its keep alive. Written by the
    /// connection without the lock; in what was padding.
    pub(crate) last_rx: AtomicU32,
    /// Counts the kicks and takeovers of this session's connections; a connection polls
    /// it (`poll_kick`) to learn it must close. It replaced a `oneshot` channel per
    /// connection (64 bytes each). Changed under the `Wake` lock, see `poll_kick`.
    kicks: AtomicU32,
}

/// Wakes the connection attached to a session: `tokio::sync::Notify::notify_one` for one
/// waiter (with `Session::wake_pending`, see `Session::wake`). Its wait is a `poll_fn` of
/// 8 bytes in the connection's `select!`, where tokio's `Notified` future was 64 bytes: a
/// quarter of every connection's task, idle or not.
///
/// One waker slot: the attached connection's, woken by new messages and by kicks. A
/// connection registers only while no kick or takeover has come since it last looked
/// (`Session::kicks`, checked under this lock, which every kick takes), so a connection
/// taken over never overwrites its successor's waker. `detach` clears the slot: a kept
/// waker would keep the ended task's memory alive.
#[derive(Debug, Default)]
pub(crate) struct Wake(Mutex<Option<std::task::Waker>>);

impl Wake {
    fn slot(&self) -> MutexGuard<'_, Option<std::task::Waker>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl SessionState {
    /// The identity this session is bound to: `Some(None)` anonymous, `Some(Some(user))`
    /// a verified user name, `None` unknown (restored from a store written before
    /// sessions were bound; the next connection that resumes it binds it).
    pub(crate) fn owner(&self) -> Option<Option<&Arc<str>>> {
        self.info.as_ref().map(|i| i.username.as_ref())
    }

    /// The attached connection, if any.
    pub(crate) fn conn(&self) -> Option<&ConnLink> {
        self.conn.as_ref()
    }

    pub(crate) fn conn_mut(&mut self) -> Option<&mut ConnLink> {
        self.conn.as_mut()
    }

    /// Whether connection `conn_id` is the one attached.
    pub(crate) fn is_attached(&self, conn_id: u64) -> bool {
        self.conn.is_some() && self.generation == conn_id
    }

    /// Attaches connection `conn_id` (no longer disconnected).
    pub(crate) fn attach(&mut self, conn_id: u64) {
        self.conn = Some(ConnLink { kick: None });
        self.generation = conn_id;
        self.closed_ms = 0;
    }

    /// Detaches the attached connection, which closed at `at`.
    pub(crate) fn detach_at(&mut self, at: std::time::SystemTime) {
        self.conn = None;
        // 0 is "never connected".
        self.closed_ms = unix_ms(at).max(1);
    }

    /// Takes the attached connection away (a takeover): the session is then attached to
    /// the new one or ended. Returns the id of the connection taken away.
    pub(crate) fn take_conn(&mut self) -> Option<u64> {
        self.conn.take()?;
        self.closed_ms = 0;
        Some(self.generation)
    }

    /// When the last connection closed (None while connected or never connected).
    pub(crate) fn disconnected_at(&self) -> Option<std::time::SystemTime> {
        (self.conn.is_none() && self.closed_ms > 0)
            .then(|| std::time::UNIX_EPOCH + std::time::Duration::from_millis(self.closed_ms))
    }
}

impl Session {
    pub(crate) fn new(
        client_id: Arc<str>,
        protocol: ProtocolVersion,
        expiry_interval: u32,
    ) -> Self {
        let internal = client_id.starts_with(INTERNAL_CLIENT_ID_PREFIX);
        Session {
            client_id,
            state: Mutex::new(SessionState {
                conn: None,
                closed_ms: 0,
                info: None,
                generation: 0,
                protocol,
                subscriptions: Default::default(),
                queue: Queue::default(),
                inflight: Default::default(),
                inflight_seq: 0,
                next_packet_id: 1,
                inbound_qos2: Qos2Ids::default(),
                expiry_interval,
                keepalive_due: 0,
                pending_will: None,
                ended: false,
                stored: false,
            }),
            wake: Wake::default(),
            wake_pending: AtomicBool::new(false),
            online: AtomicBool::new(false),
            durable_waiting: AtomicBool::new(false),
            overridden: AtomicBool::new(internal),
            last_rx: AtomicU32::new(0),
            kicks: AtomicU32::new(0),
        }
    }

    /// The kick count a connection attached now starts from (see `poll_kick`).
    pub(crate) fn kicks(&self) -> u32 {
        self.kicks.load(Ordering::Acquire)
    }

    /// Tells the attached connection to close with `reason`; with the session locked
    /// (`st`). False when none is attached or it was already told.
    pub(crate) fn kick(&self, st: &mut SessionState, reason: ReasonCode) -> bool {
        match st.conn_mut() {
            Some(c) if c.kick.is_none() => {
                c.kick = Some(reason);
                self.kicked();
                true
            }
            _ => false,
        }
    }

    /// Wakes the connection that was attached: it was kicked (`kick`), or taken away
    /// from this session by a takeover (with the session locked, after `take_conn`).
    pub(crate) fn kicked(&self) {
        let waker = {
            let mut slot = self.wake.slot();
            self.kicks.fetch_add(1, Ordering::AcqRel);
            slot.take()
        };
        if let Some(w) = waker {
            w.wake();
        }
    }

    /// Ready with the reason once connection `conn_id` must close: it was kicked, or it
    /// is no longer the one attached (taken over: Session taken over). `seen` is the kick
    /// count it last looked at; only a change takes the session lock. `register`: false
    /// when the caller polls `poll_woken` right after, which registers its waker.
    pub(crate) fn poll_kick(
        &self,
        cx: &mut std::task::Context<'_>,
        conn_id: u64,
        seen: &AtomicU32,
        register: bool,
    ) -> std::task::Poll<ReasonCode> {
        loop {
            let now = self.kicks.load(Ordering::Acquire);
            if now != seen.load(Ordering::Relaxed) {
                seen.store(now, Ordering::Relaxed);
                let st = self.lock();
                match st.conn() {
                    Some(c) if st.generation == conn_id => {
                        if let Some(r) = c.kick {
                            return std::task::Poll::Ready(r);
                        }
                    }
                    _ => return std::task::Poll::Ready(ReasonCode::SessionTakenOver),
                }
            }
            if !register {
                return std::task::Poll::Pending;
            }
            let mut slot = self.wake.slot();
            if self.kicks.load(Ordering::Acquire) != now {
                continue; // kicked since the look above: look again
            }
            if !slot.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
                *slot = Some(cx.waker().clone());
            }
            return std::task::Poll::Pending;
        }
    }

    /// Wakes the attached connection (`Notify::notify_one`: a wake-up with nobody waiting
    /// is kept for the next wait).
    pub(crate) fn wake(&self) {
        // Already pending: the waiter was woken by whoever set it, or looks before it
        // waits (`poll_woken` checks after registering).
        if self.wake_pending.swap(true, Ordering::AcqRel) {
            return;
        }
        let waker = self.wake.slot().take();
        if let Some(w) = waker {
            w.wake();
        }
    }

    /// Ready once per wake-up (several before a poll count as one).
    /// `seen`: as for `poll_kick`; after a kick the waker is not registered (it could
    /// be a successor's slot) and the wake-up is ready, so the connection looks at its
    /// kick.
    pub(crate) fn poll_woken(
        &self,
        cx: &mut std::task::Context<'_>,
        seen: &AtomicU32,
    ) -> std::task::Poll<()> {
        if self.wake_pending.swap(false, Ordering::AcqRel) {
            return std::task::Poll::Ready(());
        }
        {
            let mut slot = self.wake.slot();
            if self.kicks.load(Ordering::Acquire) != seen.load(Ordering::Relaxed) {
                return std::task::Poll::Ready(());
            }
            if !slot.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
                *slot = Some(cx.waker().clone());
            }
        }
        // A wake-up between the first look and the registration took no waker, or an
        // older one: look again.
        if self.wake_pending.swap(false, Ordering::AcqRel) {
            std::task::Poll::Ready(())
        } else {
            std::task::Poll::Pending
        }
    }

    /// Forgets the waiting task (its connection ended).
    pub(crate) fn forget_waker(&self) {
        let waker = self.wake.slot().take();
        drop(waker);
    }

    /// Locks the state. A poisoned lock means a panic happened mid-update in some
    /// connection's task; the maps are still structurally valid, so carry on.
    pub(crate) fn lock(&self) -> MutexGuard<'_, SessionState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn is_online(&self) -> bool {
        self.online.load(Ordering::Relaxed)
    }

    /// Offers a message to this session, applying the queue policy (ARCHITECTURE.md):
    /// a full queue first evicts its oldest QoS 0 message; if it holds none, the new
    /// message is dropped. Drops are returned so the caller counts them.
    /// QoS 1/2 deliveries to a session that outlives its connection are recorded in `store`
    /// (under the session lock, so the session's ops stay in order). Returns what happened
    /// and the store ticket to wait for (0: nothing to wait for).
    pub(crate) fn enqueue(
        &self,
        out: Outgoing,
        limits: QueueLimits,
        ops: &mut Vec<Op>,
    ) -> (Enqueued, u64) {
        let mut st = self.lock();
        let r = self.enqueue_locked(&mut st, out, limits, ops);
        let online = st.conn().is_some();
        drop(st);
        if online && matches!(r, Enqueued::Queued | Enqueued::QueuedEvictedQos0) {
            self.wake();
        }
        (r, 0)
    }

    /// [`Self::enqueue`] for several deliveries, in order, under one lock and with one
    /// wake-up: a publisher's batch of QoS 0 messages costs each subscriber one lock and
    /// one wake-up, not one per message. `counted` sees each outcome other than
    /// [`Enqueued::Queued`], with the number of messages it applies to.
    pub(crate) fn enqueue_many(
        &self,
        entries: impl IntoIterator<Item = Entry>,
        limits: QueueLimits,
        ops: &mut Vec<Op>,
        mut counted: impl FnMut(Enqueued, usize),
    ) {
        let mut st = self.lock();
        let mut queued = false;
        let one = |st: &mut SessionState,
                   out,
                   ops: &mut Vec<Op>,
                   counted: &mut dyn FnMut(Enqueued, usize)| {
            let r = self.enqueue_locked(st, out, limits, ops);
            if r != Enqueued::Queued {
                counted(r, 1);
            }
            matches!(r, Enqueued::Queued | Enqueued::QueuedEvictedQos0)
        };
        for e in entries {
            match e {
                Entry::One(out) => queued |= one(&mut st, out, ops, &mut counted),
                Entry::Run(run) => match Self::run_fits(&st, &run, limits) {
                    Ok(()) => {
                        st.queue.push_run(run);
                        queued = true;
                    }
                    Err(Some(r)) => counted(r, run.len()),
                    // Near the limits: message by message, so evictions and drops are
                    // exactly those of single deliveries.
                    Err(None) => {
                        for out in run.into_deliveries() {
                            queued |= one(&mut st, out, ops, &mut counted);
                        }
                    }
                },
            }
        }
        let online = st.conn().is_some();
        drop(st);
        if online && queued {
            self.wake();
        }
    }

    /// Whether a message of `cost` bytes would find this session's queue full under
    /// `limits` (for the `Block` policy, checked before routing).
    pub(crate) fn would_overflow(&self, limits: QueueLimits, cost: usize) -> bool {
        let st = self.lock();
        !st.ended
            && (st.queue.len() >= limits.max_messages
                || (limits.max_bytes > 0 && st.queue.bytes() + cost > limits.max_bytes))
    }

    /// Whether `run` may be queued whole: `Err(Some(_))` when all of it is dropped,
    /// `Err(None)` when the queue's limits need a look per message.
    fn run_fits(st: &SessionState, run: &Run, limits: QueueLimits) -> Result<(), Option<Enqueued>> {
        if st.ended {
            return Err(Some(Enqueued::DroppedEnded));
        }
        if st.conn().is_none() && !limits.queue_qos0_offline {
            return Err(Some(Enqueued::DroppedOfflineQos0));
        }
        let fits = st.queue.len() + run.len() <= limits.max_messages
            && (limits.max_bytes == 0 || st.queue.bytes() + run.cost() <= limits.max_bytes);
        if fits { Ok(()) } else { Err(None) }
    }

    fn enqueue_locked(
        &self,
        st: &mut SessionState,
        mut out: Outgoing,
        limits: QueueLimits,
        ops: &mut Vec<Op>,
    ) -> Enqueued {
        let cost = out.msg.cost();
        if st.ended {
            return Enqueued::DroppedEnded;
        }
        let online = st.conn().is_some();
        if out.qos == QoS::AtMostOnce && !online && !limits.queue_qos0_offline {
            return Enqueued::DroppedOfflineQos0;
        }
        let full = |st: &SessionState| {
            st.queue.len() >= limits.max_messages
                || (limits.max_bytes > 0 && st.queue.bytes() + cost > limits.max_bytes)
        };
        let mut result = Enqueued::Queued;
        match limits.policy {
            None => {}
            Some(QueuePolicy::DropOldest) => {
                while full(st) {
                    let Some(old) = st.queue.pop_front() else {
                        return Enqueued::DroppedFull; // larger than the byte limit alone
                    };
                    if old.recorded {
                        ops.push(Op::Dequeue {
                            client_id: self.client_id.to_string(),
                            message_id: old.msg.id,
                        });
                    }
                    result = Enqueued::QueuedDroppedOldest;
                }
            }
            // `Block` is decided before routing (`Session::refuses`); a message that gets
            // here anyway (a will, a retained message on subscribe) is dropped.
            Some(QueuePolicy::DropNew | QueuePolicy::Block) if full(st) => {
                return Enqueued::DroppedFull;
            }
            Some(_) => {}
        }
        if full(st) {
            // Drop-oldest for QoS 0: it is the one class the sender accepted losing.
            if !st.queue.evict_oldest_qos0() {
                return Enqueued::DroppedFull;
            }
            result = Enqueued::QueuedEvictedQos0;
            if full(st) {
                return Enqueued::DroppedFull;
            }
        }
        if st.persists(&out) {
            out.recorded = true;
            if !out.msg.persisted.swap(true, Ordering::Relaxed) {
                ops.push(Op::MessagePut {
                    id: out.msg.id,
                    message: crate::message::stored(&out.msg),
                });
            }
            ops.push(Op::Enqueue {
                client_id: self.client_id.to_string(),
                delivery: delivery_record(&out),
            });
        }
        st.queue.push(out);
        result
    }
}

/// The stored form of a delivery.
pub(crate) fn delivery_record(out: &Outgoing) -> StoredDelivery {
    StoredDelivery {
        message_id: out.msg.id,
        qos: out.qos,
        retain: out.retain,
        subscription_ids: out.subscription_ids.to_vec(),
        shared: out.shared.as_ref().map(|f| f.as_str().to_string()),
    }
}

impl SessionState {
    /// Whether this delivery's state is recorded in the store: QoS 1/2 to a session that
    /// outlives its connection. (QoS 0 carries no promise; a clean session dies with it.)
    pub(crate) fn persists(&self, out: &Outgoing) -> bool {
        self.expiry_interval > 0 && out.qos != QoS::AtMostOnce
    }

    /// Whether inbound QoS 2 ids and acks of this session are recorded.
    pub(crate) fn persistent(&self) -> bool {
        self.expiry_interval > 0
    }

    /// A packet id not in flight [MQTT-2.2.1-2]. The caller keeps the in-flight count
    /// below 65,535 (it is bounded by Receive Maximum), so a free id exists.
    pub(crate) fn alloc_packet_id(&mut self) -> u16 {
        loop {
            let id = self.next_packet_id;
            self.next_packet_id = self.next_packet_id.checked_add(1).unwrap_or(1);
            if !self.inflight.contains_key(&id) {
                return id;
            }
        }
    }

    /// Removes the queued (not yet sent) deliveries that came through a shared
    /// subscription, and with `include_inflight` also the unacknowledged QoS 1 ones.
    pub(crate) fn take_shared(
        &mut self,
        include_inflight: bool,
        client_id: &str,
        store: &dyn Store,
        durable: u64,
    ) -> Vec<Outgoing> {
        let mut ops = Vec::new();
        let mut taken = self.queue.take_where(|o| {
            // A recorded copy whose enqueue is not durable yet stays: its Dequeue could
            // otherwise reach the store before its Enqueue.
            let settled = !o.recorded || o.msg.ticket.load(Ordering::Acquire) <= durable;
            o.shared.is_some() && settled
        });
        for o in &taken {
            if self.persists(o) {
                ops.push(Op::Dequeue {
                    client_id: client_id.to_string(),
                    message_id: o.msg.id,
                });
            }
        }
        if include_inflight {
            let ids: Vec<u16> = self
                .inflight
                .iter()
                // QoS 1 only: an in-flight QoS 2 message must not go to another member
                // [MQTT-4.8.2-5]; for QoS 1 the spec says SHOULD §4.8.2.
                .filter(|(_, f)| f.out.shared.is_some() && f.out.qos == QoS::AtLeastOnce)
                .map(|(&id, _)| id)
                .collect();
            for id in ids {
                if let Some(f) = self.inflight.remove(&id) {
                    if self.persists(&f.out) {
                        ops.push(Op::Completed {
                            client_id: client_id.to_string(),
                            packet_id: id,
                        });
                    }
                    taken.push(f.out);
                }
            }
        }
        if !ops.is_empty() {
            store.apply(ops);
        }
        taken
    }

    /// Drops everything queued and in flight (clean start, session end).
    pub(crate) fn clear_messages(&mut self) {
        self.queue.clear();
        self.inflight.clear();
        self.inbound_qos2.clear();
    }
}

#[cfg(test)]
mod size_tests {
    /// A queued delivery is memory per queued message and bytes written per delivery in a
    /// fan-out: keep what only some deliveries need (identifiers, a shared group) boxed.
    #[test]
    fn a_queued_delivery_stays_small() {
        let size = std::mem::size_of::<super::Outgoing>();
        assert!(size <= 40, "Outgoing is {size} bytes");
        // A queue entry is one delivery or a run of them: no bigger than one delivery.
        let entry = std::mem::size_of::<crate::queue::Entry>();
        assert!(entry <= 40, "a queue entry is {entry} bytes");
    }
}
