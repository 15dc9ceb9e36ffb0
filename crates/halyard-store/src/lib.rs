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

use std::collections::{BTreeMap, HashMap};
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
    /// Properties to forward (no topic alias, no subscription identifiers).
    pub properties: PublishProperties,
    /// Wall-clock expiry, if the message has a Message Expiry Interval.
    pub expires_at: Option<SystemTime>,
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
}

/// Everything a broker rebuilds on start.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Recovered {
    /// Sessions by client identifier.
    pub sessions: BTreeMap<String, RecoveredSession>,
    /// Retained messages by topic.
    pub retained: BTreeMap<String, StoredMessage>,
}

/// The durability contract. Implementations must be cheap to call from many tasks at once.
pub trait Store: Send + Sync + 'static {
    /// Records a batch of changes, in order.
    fn apply(&self, ops: Vec<Op>);
    /// The state to rebuild on start.
    fn recover(&self) -> Recovered;
}

/// Keeps no state at all (`persistence = "off"` with nothing to recover).
#[derive(Debug, Default)]
pub struct NullStore;

impl Store for NullStore {
    fn apply(&self, _ops: Vec<Op>) {}
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
                });
        }
        Op::SessionDelete { client_id } => {
            image.sessions.remove(&client_id);
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
    }
}

impl Store for MemoryStore {
    fn apply(&self, ops: Vec<Op>) {
        // Poisoning only happens if a panic interrupted an update; the image is still a
        // consistent set of maps, so keep going rather than take the broker down.
        let mut image = self.image.lock().unwrap_or_else(|e| e.into_inner());
        for op in ops {
            apply_op(&mut image, op);
        }
    }
    fn recover(&self) -> Recovered {
        self.image.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

/// Counts of what a store holds, for logs and `$SYS`.
pub fn summarize(r: &Recovered) -> HashMap<&'static str, usize> {
    HashMap::from([
        ("sessions", r.sessions.len()),
        (
            "subscriptions",
            r.sessions.values().map(|s| s.subscriptions.len()).sum(),
        ),
        ("retained", r.retained.len()),
    ])
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
}
