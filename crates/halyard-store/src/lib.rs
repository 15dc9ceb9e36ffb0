//! The durability contract between the broker and a store.
//!
//! The broker describes every change that must survive a restart as an [`Op`] and hands
//! batches of them to [`Store::apply`]. On start it asks [`Store::recover`] for the state to
//! rebuild. Ops are idempotent (applying one twice leaves the same state), so a store may
//! replay a log that overlaps a snapshot.
//!
//! [`MemoryStore`] keeps the recovered image in memory: it is the reference implementation
//! (what a durable store must return after a restart) and lets tests restart a broker
//! in-process. It survives only as long as the process.
#![forbid(unsafe_code)]

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};

pub mod log;
pub mod record;

pub use log::{LogConfig, LogStore, RecoveryReport, SyncMode, private_dir};
use std::sync::Mutex;
use std::time::SystemTime;

use halyard_codec::{Bytes, ProtocolVersion, PublishProperties, QoS, SubscriptionOptions};

/// A message as stored: what is needed to deliver it again.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredMessage {
    /// Topic name.
    pub topic: String,
    /// Payload.
    pub payload: Bytes,
    /// QoS it was published with.
    pub qos: QoS,
    /// Properties to forward (no topic alias, no subscription identifiers); boxed and
    /// only when there are any (see [`StoredMessage::boxed`]): the store's image keeps
    /// every pending message, and most have none.
    pub properties: Option<Box<PublishProperties>>,
    /// Wall-clock expiry, if the message has a Message Expiry Interval.
    pub expires_at: Option<SystemTime>,
}

impl StoredMessage {
    /// Properties as [`StoredMessage::properties`] keeps them.
    pub fn boxed(p: PublishProperties) -> Option<Box<PublishProperties>> {
        (!p.is_empty()).then(|| Box::new(p))
    }
    /// The properties, empty when there are none.
    pub fn publish_properties(&self) -> PublishProperties {
        self.properties.as_deref().cloned().unwrap_or_default()
    }
}

/// A session's persistent header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionRecord {
    /// Client identifier.
    pub client_id: String,
    /// Protocol version of the last connection.
    pub protocol: ProtocolVersion,
    /// Session Expiry Interval in seconds (`u32::MAX`: never).
    pub expiry_interval: u32,
    /// When the client disconnected; `None` while connected.
    pub disconnected_at: Option<SystemTime>,
    /// The identity the session is bound to.
    pub owner: SessionOwner,
}

/// The identity a session is bound to: only the same identity may resume it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum SessionOwner {
    /// Written before sessions were bound to an identity (a record without the field):
    /// the next connection that resumes the session binds it.
    #[default]
    Unknown,
    /// A client without a verified user name.
    Anonymous,
    /// A verified user name.
    User(String),
}

/// One subscription of a session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubscriptionRecord {
    /// The full filter, `$share/...` included.
    pub filter: String,
    /// Subscription options.
    pub options: SubscriptionOptions,
    /// Subscription identifier (v5).
    pub identifier: Option<u32>,
}

/// One delivery of a stored message to a session: what the session will send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredDelivery {
    /// The message (see [`Op::MessagePut`]).
    pub message_id: u64,
    /// Granted QoS for this delivery.
    pub qos: QoS,
    /// RETAIN flag to send.
    pub retain: bool,
    /// Subscription identifiers to send.
    pub subscription_ids: Vec<u32>,
    /// The shared subscription (`$share/...`) this copy was chosen for.
    pub shared: Option<String>,
}

/// A delivery sent and not yet completed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredInflight {
    /// Packet identifier it was sent with.
    pub packet_id: u16,
    /// The delivery.
    pub delivery: StoredDelivery,
    /// PUBREC received (QoS 2): waiting for PUBCOMP; PUBREL is resent on reconnect.
    pub released: bool,
}

/// A session's in-flight deliveries: in the order they were sent, found by packet id.
///
/// Every `Sent`, `Released` and `Completed` op finds its entry by packet id, both in
/// recovery and in the log writer's live image. A `Vec` made each of them a scan of the
/// whole window (up to 65,535 entries for a v5 client), which made the writer and a
/// restart quadratic in the window size.
#[derive(Debug, Clone, Default)]
pub struct Inflight {
    /// Send order -> entry.
    by_order: BTreeMap<u64, StoredInflight>,
    /// Packet id -> send order.
    by_packet: HashMap<u16, u64>,
    next: u64,
}

impl Inflight {
    /// The entries, oldest first.
    pub fn iter(&self) -> impl DoubleEndedIterator<Item = &StoredInflight> {
        self.by_order.values()
    }

    /// How many there are.
    pub fn len(&self) -> usize {
        self.by_order.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.by_order.is_empty()
    }

    /// Adds `f` as the newest, replacing any entry with its packet id.
    pub fn insert(&mut self, f: StoredInflight) {
        self.remove(f.packet_id);
        let order = self.next;
        self.next += 1;
        self.by_packet.insert(f.packet_id, order);
        self.by_order.insert(order, f);
    }

    /// The entry sent with `packet_id`.
    pub fn get_mut(&mut self, packet_id: u16) -> Option<&mut StoredInflight> {
        let order = self.by_packet.get(&packet_id)?;
        self.by_order.get_mut(order)
    }

    /// Removes and returns the entry sent with `packet_id`.
    pub fn remove(&mut self, packet_id: u16) -> Option<StoredInflight> {
        let order = self.by_packet.remove(&packet_id)?;
        self.by_order.remove(&order)
    }
}

/// Equal when the same entries are in the same order (send-order numbers are not compared:
/// an image rebuilt from a snapshot numbers them afresh).
impl PartialEq for Inflight {
    fn eq(&self, other: &Self) -> bool {
        self.len() == other.len() && self.iter().eq(other.iter())
    }
}

impl Eq for Inflight {}

impl IntoIterator for Inflight {
    type Item = StoredInflight;
    type IntoIter = std::collections::btree_map::IntoValues<u64, StoredInflight>;

    fn into_iter(self) -> Self::IntoIter {
        self.by_order.into_values()
    }
}

impl<'a> IntoIterator for &'a Inflight {
    type Item = &'a StoredInflight;
    type IntoIter = std::collections::btree_map::Values<'a, u64, StoredInflight>;

    fn into_iter(self) -> Self::IntoIter {
        self.by_order.values()
    }
}

impl FromIterator<StoredInflight> for Inflight {
    fn from_iter<I: IntoIterator<Item = StoredInflight>>(iter: I) -> Self {
        let mut set = Inflight::default();
        for f in iter {
            set.insert(f);
        }
        set
    }
}

/// A will waiting for its delay to pass (or for its session to end).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PendingWill {
    /// The will message.
    pub message: StoredMessage,
    /// Its retain flag.
    pub retain: bool,
    /// When it is due (wall clock).
    pub due: SystemTime,
}

/// A change that must survive a restart.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// Create or update a session header.
    SessionUpsert(SessionRecord),
    /// Remove a session and everything it owns (subscriptions, will).
    SessionDelete {
        /// Client identifier.
        client_id: String,
    },
    /// Add or replace a subscription (keyed by its full filter).
    Subscribe {
        /// Client identifier.
        client_id: String,
        /// The subscription.
        subscription: SubscriptionRecord,
    },
    /// Remove a subscription.
    Unsubscribe {
        /// Client identifier.
        client_id: String,
        /// The full filter.
        filter: String,
    },
    /// Set a retained message (replacing any on the same topic).
    RetainSet(StoredMessage),
    /// Delete the retained message of a topic.
    RetainDelete {
        /// Topic name.
        topic: String,
    },
    /// Set (or with `None` clear) a session's pending will.
    WillPending {
        /// Client identifier.
        client_id: String,
        /// The will, or `None` once it was published or cancelled.
        will: Option<PendingWill>,
    },
    /// A message body that deliveries refer to by id (written once per message).
    MessagePut {
        /// Broker-unique message id.
        id: u64,
        /// The message.
        message: StoredMessage,
    },
    /// A delivery appended to a session's queue.
    Enqueue {
        /// Client identifier.
        client_id: String,
        /// The delivery.
        delivery: StoredDelivery,
    },
    /// A queued delivery removed without being in flight (QoS 0 sent, dropped, expired,
    /// or handed to another shared-group member).
    Dequeue {
        /// Client identifier.
        client_id: String,
        /// The message id of the delivery.
        message_id: u64,
    },
    /// The head delivery with this message id moved from the queue to in flight.
    Sent {
        /// Client identifier.
        client_id: String,
        /// The message id of the delivery.
        message_id: u64,
        /// Packet identifier it was sent with.
        packet_id: u16,
    },
    /// PUBREC received for an in-flight QoS 2 delivery.
    Released {
        /// Client identifier.
        client_id: String,
        /// Packet identifier.
        packet_id: u16,
    },
    /// An in-flight delivery completed (PUBACK, PUBCOMP, or PUBREC with an error).
    Completed {
        /// Client identifier.
        client_id: String,
        /// Packet identifier.
        packet_id: u16,
    },
    /// A QoS 2 packet id received from the client, held until PUBREL (`held = true`), or
    /// released (`held = false`).
    InboundQos2 {
        /// Client identifier.
        client_id: String,
        /// Packet identifier.
        packet_id: u16,
        /// Whether it is now held.
        held: bool,
    },
}

/// A session with everything it owns, as recovered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecoveredSession {
    /// Its header.
    pub record: SessionRecord,
    /// Its subscriptions, by full filter.
    pub subscriptions: BTreeMap<String, SubscriptionRecord>,
    /// Its pending will, if any.
    pub will: Option<PendingWill>,
    /// Queued deliveries, oldest first. A deque: deliveries leave from the front, and a
    /// `Vec` made each one cost a move of the whole queue (O(n) per message).
    pub queue: VecDeque<StoredDelivery>,
    /// In-flight deliveries, in the order they were sent.
    pub inflight: Inflight,
    /// QoS 2 packet ids received and not yet released.
    pub inbound_qos2: Vec<u16>,
}

/// Everything a broker rebuilds on start.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Recovered {
    /// Sessions by client identifier.
    pub sessions: BTreeMap<String, RecoveredSession>,
    /// Retained messages by topic.
    pub retained: BTreeMap<String, StoredMessage>,
    /// Message bodies referred to by queued or in-flight deliveries, by id.
    pub messages: BTreeMap<u64, StoredMessage>,
    /// How many deliveries refer to each body; a body goes when its last delivery does,
    /// so a long-running store's image stays as small as what is pending.
    pub refs: HashMap<u64, u32>,
}

impl Recovered {
    /// Drops message bodies no delivery refers to any more.
    pub fn collect_garbage(&mut self) {
        let live: HashSet<u64> = self
            .sessions
            .values()
            .flat_map(|s| {
                s.queue
                    .iter()
                    .map(|d| d.message_id)
                    .chain(s.inflight.iter().map(|f| f.delivery.message_id))
            })
            .collect();
        self.messages.retain(|id, _| live.contains(id));
        self.refs.clear();
        for s in self.sessions.values() {
            for id in s
                .queue
                .iter()
                .map(|d| d.message_id)
                .chain(s.inflight.iter().map(|f| f.delivery.message_id))
            {
                *self.refs.entry(id).or_default() += 1;
            }
        }
    }

    fn release(&mut self, id: u64) {
        if let Some(n) = self.refs.get_mut(&id) {
            *n -= 1;
            if *n == 0 {
                self.refs.remove(&id);
                self.messages.remove(&id);
            }
        }
    }
}

/// The durability contract. Implementations must be cheap to call from many tasks at once.
///
/// Ordering: ops about one session are applied by the broker while it holds that session's
/// lock, so they reach the store in the order they happened. The store's own lock (if any)
/// is therefore always the innermost lock.
pub trait Store: Send + Sync + 'static {
    /// Records a batch of changes, in order, and returns a ticket: the batch is durable once
    /// [`Store::durable`] reports a value at or above it. 0 means "durable already".
    fn apply(&self, ops: Vec<Op>) -> u64;
    /// The state to rebuild on start.
    fn recover(&self) -> Recovered;
    /// The highest durable ticket, as it advances; `None` when every `apply` is durable on
    /// return (or never waited for, as with `SyncMode::Interval`).
    fn durable(&self) -> Option<tokio::sync::watch::Receiver<u64>> {
        None
    }
    /// Makes everything applied so far durable and stops background work (shutdown).
    fn flush(&self) {}
    /// Writer counters for `$SYS` and the metrics (None: nothing is written).
    fn metrics(&self) -> Option<StoreMetrics> {
        None
    }
}

/// Upper bounds (microseconds) of the fsync latency histogram's buckets; the last bucket
/// (+Inf) is implicit.
pub const SYNC_BUCKETS_MICROS: [u64; 12] = [
    100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 1_000_000,
];

/// A snapshot of a store's writer counters.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StoreMetrics {
    /// Group commits written.
    pub commits: u64,
    /// Ops written.
    pub ops: u64,
    /// Bytes appended to logs.
    pub bytes_written: u64,
    /// fsyncs done.
    pub syncs: u64,
    /// Total time in fsync, microseconds.
    pub sync_micros: u64,
    /// fsyncs per latency bucket (cumulative counts are built by the exporter), one more
    /// entry than [`SYNC_BUCKETS_MICROS`] for +Inf.
    pub sync_buckets: Vec<u64>,
    /// Compactions done.
    pub compactions: u64,
    /// Bytes on disk now (log and snapshot).
    pub disk_bytes: u64,
    /// Batches waiting for the writer.
    pub pending_batches: u64,
}

/// Keeps no state at all (`persistence = "off"` with nothing to recover).
#[derive(Debug, Default)]
pub struct NullStore;

impl Store for NullStore {
    fn apply(&self, _ops: Vec<Op>) -> u64 {
        0
    }
    fn recover(&self) -> Recovered {
        Recovered::default()
    }
}

/// The recovered image kept in memory; see the crate documentation.
#[derive(Debug, Default)]
pub struct MemoryStore {
    image: Mutex<Recovered>,
}

impl MemoryStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }
}

/// Applies one op to an image; shared by every implementation's recovery.
pub fn apply_op(image: &mut Recovered, op: Op) {
    match op {
        Op::SessionUpsert(record) => {
            let id = record.client_id.clone();
            image
                .sessions
                .entry(id)
                .and_modify(|s| s.record = record.clone())
                .or_insert_with(|| RecoveredSession {
                    record,
                    subscriptions: BTreeMap::new(),
                    will: None,
                    queue: VecDeque::new(),
                    inflight: Inflight::default(),
                    inbound_qos2: Vec::new(),
                });
        }
        Op::SessionDelete { client_id } => {
            if let Some(s) = image.sessions.remove(&client_id) {
                for d in s.queue {
                    image.release(d.message_id);
                }
                for f in s.inflight {
                    image.release(f.delivery.message_id);
                }
            }
        }
        Op::Subscribe {
            client_id,
            subscription,
        } => {
            if let Some(s) = image.sessions.get_mut(&client_id) {
                s.subscriptions
                    .insert(subscription.filter.clone(), subscription);
            }
        }
        Op::Unsubscribe { client_id, filter } => {
            if let Some(s) = image.sessions.get_mut(&client_id) {
                s.subscriptions.remove(&filter);
            }
        }
        Op::RetainSet(m) => {
            image.retained.insert(m.topic.clone(), m);
        }
        Op::RetainDelete { topic } => {
            image.retained.remove(&topic);
        }
        Op::WillPending { client_id, will } => {
            if let Some(s) = image.sessions.get_mut(&client_id) {
                s.will = will;
            }
        }
        Op::MessagePut { id, message } => {
            image.messages.insert(id, message);
        }
        Op::Enqueue {
            client_id,
            delivery,
        } => {
            if let Some(s) = image.sessions.get_mut(&client_id) {
                *image.refs.entry(delivery.message_id).or_default() += 1;
                s.queue.push_back(delivery);
            }
        }
        Op::Dequeue {
            client_id,
            message_id,
        } => {
            // One delivery: a session can hold two copies of one message (a shared and a
            // non-shared subscription matching it).
            if let Some(s) = image.sessions.get_mut(&client_id)
                && let Some(i) = s.queue.iter().position(|d| d.message_id == message_id)
            {
                s.queue.remove(i);
                image.release(message_id);
            }
        }
        Op::Sent {
            client_id,
            message_id,
            packet_id,
        } => {
            if let Some(s) = image.sessions.get_mut(&client_id)
                && let Some(i) = s.queue.iter().position(|d| d.message_id == message_id)
            {
                let Some(delivery) = s.queue.remove(i) else {
                    return;
                };
                s.inflight.insert(StoredInflight {
                    packet_id,
                    delivery,
                    released: false,
                });
            }
        }
        Op::Released {
            client_id,
            packet_id,
        } => {
            if let Some(f) = image
                .sessions
                .get_mut(&client_id)
                .and_then(|s| s.inflight.get_mut(packet_id))
            {
                f.released = true;
            }
        }
        Op::Completed {
            client_id,
            packet_id,
        } => {
            if let Some(s) = image.sessions.get_mut(&client_id)
                && let Some(f) = s.inflight.remove(packet_id)
            {
                image.release(f.delivery.message_id);
            }
        }
        Op::InboundQos2 {
            client_id,
            packet_id,
            held,
        } => {
            if let Some(s) = image.sessions.get_mut(&client_id) {
                s.inbound_qos2.retain(|&p| p != packet_id);
                if held {
                    s.inbound_qos2.push(packet_id);
                }
            }
        }
    }
}

impl Store for MemoryStore {
    fn apply(&self, ops: Vec<Op>) -> u64 {
        // Poisoning only happens if a panic interrupted an update; the image is still a
        // consistent set of maps, so keep going rather than take the broker down.
        let mut image = self.image.lock().unwrap_or_else(|e| e.into_inner());
        for op in ops {
            apply_op(&mut image, op);
        }
        0
    }
    fn recover(&self) -> Recovered {
        let mut image = self.image.lock().unwrap_or_else(|e| e.into_inner());
        image.collect_garbage();
        image.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn session(id: &str) -> Op {
        Op::SessionUpsert(SessionRecord {
            client_id: id.into(),
            protocol: ProtocolVersion::V5,
            expiry_interval: 60,
            disconnected_at: None,
            owner: SessionOwner::Anonymous,
        })
    }

    #[test]
    fn ops_are_idempotent_and_deletes_cascade() {
        let s = MemoryStore::new();
        let sub = Op::Subscribe {
            client_id: "a".into(),
            subscription: SubscriptionRecord {
                filter: "x/#".into(),
                options: SubscriptionOptions::default(),
                identifier: Some(3),
            },
        };
        s.apply(vec![session("a"), sub.clone(), session("a"), sub]);
        let r = s.recover();
        assert_eq!(r.sessions["a"].subscriptions.len(), 1);
        s.apply(vec![Op::SessionDelete {
            client_id: "a".into(),
        }]);
        assert!(s.recover().sessions.is_empty());
    }

    #[test]
    fn inflight_keeps_send_order_and_finds_entries_by_packet_id() {
        let f = |packet_id, message_id| StoredInflight {
            packet_id,
            delivery: StoredDelivery {
                message_id,
                qos: QoS::ExactlyOnce,
                retain: false,
                subscription_ids: vec![],
                shared: None,
            },
            released: false,
        };
        let mut set: Inflight = [f(5, 1), f(3, 2), f(9, 3)].into_iter().collect();
        let ids = |s: &Inflight| s.iter().map(|f| f.packet_id).collect::<Vec<_>>();
        assert_eq!(ids(&set), [5, 3, 9], "send order, not packet id order");
        assert_eq!(set.remove(3).map(|f| f.delivery.message_id), Some(2));
        assert!(set.remove(3).is_none());
        set.get_mut(9).expect("present").released = true;
        // A packet id sent again replaces its old entry and becomes the newest.
        set.insert(f(5, 4));
        assert_eq!(ids(&set), [9, 5]);
        assert!(set.iter().next().is_some_and(|f| f.released));
        // Equality is by content and order, not by the internal send-order numbers.
        let rebuilt: Inflight = set.iter().cloned().collect();
        assert_eq!(rebuilt, set);
        let reordered: Inflight = set.iter().rev().cloned().collect();
        assert_ne!(reordered, set);
    }

    #[test]
    fn queue_and_inflight_follow_the_delivery_lifecycle() {
        let s = MemoryStore::new();
        let msg = StoredMessage {
            topic: "t".into(),
            payload: Bytes::from_static(b"p"),
            qos: QoS::ExactlyOnce,
            properties: None,
            expires_at: None,
        };
        let d = |id| StoredDelivery {
            message_id: id,
            qos: QoS::ExactlyOnce,
            retain: false,
            subscription_ids: vec![],
            shared: None,
        };
        let c = || "a".to_string();
        s.apply(vec![
            session("a"),
            Op::MessagePut {
                id: 1,
                message: msg.clone(),
            },
            Op::MessagePut {
                id: 2,
                message: msg,
            },
            Op::Enqueue {
                client_id: c(),
                delivery: d(1),
            },
            Op::Enqueue {
                client_id: c(),
                delivery: d(2),
            },
            Op::Sent {
                client_id: c(),
                message_id: 1,
                packet_id: 7,
            },
            Op::Released {
                client_id: c(),
                packet_id: 7,
            },
            Op::InboundQos2 {
                client_id: c(),
                packet_id: 9,
                held: true,
            },
        ]);
        let r = s.recover();
        let a = &r.sessions["a"];
        assert_eq!(a.queue, VecDeque::from([d(2)]));
        assert_eq!(a.inflight.len(), 1);
        let f = a.inflight.iter().next().expect("one in flight");
        assert!(f.released && f.packet_id == 7);
        assert_eq!(a.inbound_qos2, vec![9]);
        s.apply(vec![
            Op::Completed {
                client_id: c(),
                packet_id: 7,
            },
            Op::Dequeue {
                client_id: c(),
                message_id: 2,
            },
            Op::InboundQos2 {
                client_id: c(),
                packet_id: 9,
                held: false,
            },
        ]);
        let r = s.recover();
        assert!(r.sessions["a"].queue.is_empty() && r.sessions["a"].inflight.is_empty());
        assert!(r.messages.is_empty(), "unreferenced bodies are collected");
    }
}
