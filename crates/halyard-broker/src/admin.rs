//! What operators see and change while the broker runs: the introspection and control
//! calls behind the admin API, `$SYS` and the metrics. Everything here takes the same locks
//! as the connections do, briefly and one at a time (the session map, then each session),
//! so a listing never stalls message flow for longer than copying one session's summary.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::SystemTime;

use halyard_codec::{
    Bytes, ProtocolVersion, PublishProperties, QoS, ReasonCode, TopicFilter, TopicName,
};
use halyard_store::Op;
use tokio::sync::broadcast;
use tokio::time::Instant;

use crate::config::BrokerConfig;
use crate::handle::Broker;
use crate::message::Message;
pub use crate::session::{ConnInfo, Peer};
use crate::state::Inner;
pub use crate::state::TAP_CAPACITY;

/// One session as the admin API lists it.
#[derive(Debug, Clone)]
pub struct ClientInfo {
    /// The client identifier.
    pub client_id: Arc<str>,
    /// A connection is attached now.
    pub connected: bool,
    /// The current or last connection (None for sessions restored from the store that
    /// have not reconnected since).
    pub conn: Option<Arc<ConnInfo>>,
    /// When the last connection closed.
    pub disconnected_at: Option<SystemTime>,
    /// The protocol of the session.
    pub protocol: ProtocolVersion,
    /// Session Expiry Interval in seconds (`u32::MAX`: never).
    pub expiry_interval: u32,
    /// Subscriptions held.
    pub subscriptions: usize,
    /// Messages queued (not yet sent).
    pub queued: usize,
    /// QoS 1/2 messages sent and not yet acknowledged.
    pub inflight: usize,
    /// Inbound QoS 2 packet ids awaiting PUBREL.
    pub inbound_qos2: usize,
    /// A will waits for its delay.
    pub will_pending: bool,
}

/// One subscription.
#[derive(Debug, Clone)]
pub struct SubscriptionInfo {
    /// The subscribing client.
    pub client_id: Arc<str>,
    /// The filter as subscribed (with `$share/group/` for shared subscriptions).
    pub filter: String,
    /// Maximum QoS granted.
    pub qos: QoS,
    /// No Local.
    pub no_local: bool,
    /// Retain As Published.
    pub retain_as_published: bool,
    /// Retain Handling (0, 1 or 2).
    pub retain_handling: u8,
    /// Subscription Identifier.
    pub identifier: Option<u32>,
}

/// One message as the admin API shows it (retained messages, the topic tap).
#[derive(Debug, Clone)]
pub struct MessageInfo {
    /// The topic.
    pub topic: String,
    /// The payload.
    pub payload: Bytes,
    /// QoS it was published with.
    pub qos: QoS,
    /// RETAIN flag it was published with.
    pub retain: bool,
    /// The publishing client (None for wills published by the broker and admin publishes).
    pub origin: Option<Arc<str>>,
    /// MQTT 5 properties (topic alias and subscription identifiers removed).
    pub properties: PublishProperties,
    /// Seconds until the Message Expiry Interval runs out.
    pub expires_in: Option<u64>,
}

impl MessageInfo {
    fn of(m: &Message, now: Instant) -> MessageInfo {
        MessageInfo {
            topic: m.topic.as_str().to_string(),
            payload: m.payload.clone(),
            qos: m.qos,
            retain: m.retain,
            origin: m.origin.clone(),
            properties: m.properties().clone(),
            expires_in: m
                .expires_at
                .map(|at| at.saturating_duration_since(now).as_secs()),
        }
    }
}

/// Gauges that are not counters (see [`Broker::stats`] for those).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Gauges {
    /// Sessions known, connected or not.
    pub sessions: usize,
    /// Sessions with a connection attached.
    pub sessions_connected: usize,
    /// Subscriptions in the index.
    pub subscriptions: usize,
    /// Retained messages held, not counting the broker's own `$SYS` ones.
    pub retained: usize,
    /// Payload bytes of retained messages.
    pub retained_bytes: usize,
    /// Messages alive (queued, in flight, retained).
    pub messages_alive: usize,
    /// Bytes of subscriptions charged to `max_memory_bytes` (filters and a fixed overhead).
    pub subscription_bytes: usize,
    /// Messages queued across sessions.
    pub queued: usize,
    /// Messages in flight across sessions.
    pub inflight: usize,
}

/// A live copy of every message routed, for the admin API's topic tap. Dropping it stops
/// the copying.
#[derive(Debug)]
pub struct Tap {
    rx: broadcast::Receiver<Arc<Message>>,
    taps: Arc<AtomicUsize>,
}

/// What [`Tap::recv`] yields.
#[derive(Debug)]
pub enum Tapped {
    /// A message.
    Message(Box<MessageInfo>),
    /// The tap fell behind and this many messages were skipped.
    Skipped(u64),
    /// The broker stopped.
    Closed,
}

impl Tap {
    /// The next routed message whose topic matches `filter`.
    pub async fn recv(&mut self, filter: &TopicFilter) -> Tapped {
        loop {
            match self.rx.recv().await {
                Ok(m) if filter.matches(m.topic.as_str()) => {
                    return Tapped::Message(Box::new(MessageInfo::of(&m, Instant::now())));
                }
                Ok(_) => {}
                Err(broadcast::error::RecvError::Lagged(n)) => return Tapped::Skipped(n),
                Err(broadcast::error::RecvError::Closed) => return Tapped::Closed,
            }
        }
    }
}

impl Drop for Tap {
    fn drop(&mut self) {
        self.taps.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Why an admin publish was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PublishError {
    /// Not a valid topic name (empty, wildcards, over the limits...).
    BadTopic(String),
    /// QoS above the broker's maximum, or RETAIN while retain is unavailable.
    NotSupported(&'static str),
}

impl std::fmt::Display for PublishError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PublishError::BadTopic(why) => write!(f, "bad topic: {why}"),
            PublishError::NotSupported(why) => f.write_str(why),
        }
    }
}

impl std::error::Error for PublishError {}

impl Broker {
    /// Every session, connected or not, sorted by client id.
    pub fn clients(&self) -> Vec<ClientInfo> {
        let mut out: Vec<ClientInfo> = self
            .inner()
            .sessions_snapshot()
            .into_iter()
            .map(|s| client_info(&s.client_id, &s.lock()))
            .collect();
        out.sort_by(|a, b| a.client_id.cmp(&b.client_id));
        out
    }

    /// One session and its subscriptions.
    pub fn client(&self, client_id: &str) -> Option<(ClientInfo, Vec<SubscriptionInfo>)> {
        let s = self.inner().session(client_id)?;
        let st = s.lock();
        let info = client_info(&s.client_id, &st);
        let mut subs = subscriptions_of(&s.client_id, &st);
        subs.sort_by(|a, b| a.filter.cmp(&b.filter));
        Some((info, subs))
    }

    /// Disconnects a client (MQTT 5: DISCONNECT with 0x98 Administrative action). Its
    /// session stays for its expiry interval, as after any disconnection. False when no
    /// connection is attached to that client id.
    pub fn kick(&self, client_id: &str) -> bool {
        let Some(s) = self.inner().session(client_id) else {
            return false;
        };
        let mut st = s.lock();
        s.kick(&mut st, ReasonCode::AdministrativeAction)
    }

    /// Every subscription, sorted by client id then filter.
    pub fn subscriptions(&self) -> Vec<SubscriptionInfo> {
        let mut out = Vec::new();
        for s in self.inner().sessions_snapshot() {
            let st = s.lock();
            out.extend(subscriptions_of(&s.client_id, &st));
        }
        out.sort_by(|a, b| (&a.client_id, &a.filter).cmp(&(&b.client_id, &b.filter)));
        out
    }

    /// Unexpired retained messages matching `filter`, sorted by topic.
    pub fn retained(&self, filter: &TopicFilter) -> Vec<MessageInfo> {
        let now = Instant::now();
        let mut out: Vec<MessageInfo> = self
            .inner()
            .retained
            .matching(filter, now)
            .iter()
            .map(|m| MessageInfo::of(m, now))
            .collect();
        out.sort_by(|a, b| a.topic.cmp(&b.topic));
        out
    }

    /// Removes a topic's retained message without publishing anything. False if there was
    /// none.
    pub fn delete_retained(&self, topic: &str) -> bool {
        let inner = self.inner();
        if !inner.retained.remove(topic) {
            return false;
        }
        inner.store.apply(vec![Op::RetainDelete {
            topic: topic.to_string(),
        }]);
        true
    }

    /// Publishes a message as the broker (no client, no ACL check: the admin API is
    /// authenticated on its own). With a durable store, returns once the message's routing
    /// is durable, as a publisher's PUBACK would. Returns how many subscriptions matched.
    pub async fn publish(
        &self,
        topic: &str,
        payload: Bytes,
        qos: QoS,
        retain: bool,
        properties: PublishProperties,
    ) -> Result<usize, PublishError> {
        let inner = self.inner();
        let cfg = inner.cfg();
        let name = TopicName::new(topic).map_err(|e| PublishError::BadTopic(e.to_string()))?;
        if topic.starts_with('$') {
            return Err(PublishError::BadTopic(
                "topics starting with $ are the broker's".into(),
            ));
        }
        if Inner::topic_over_limits(&cfg, topic) {
            return Err(PublishError::BadTopic(
                "over max_topic_levels or max_topic_length".into(),
            ));
        }
        if qos > cfg.max_qos {
            return Err(PublishError::NotSupported("QoS above max_qos"));
        }
        if retain && !cfg.retain_available {
            return Err(PublishError::NotSupported("retain is not available"));
        }
        let msg = Arc::new(
            Message::new(
                inner.message_id(),
                name,
                payload,
                qos,
                retain,
                properties,
                None,
                Instant::now(),
            )
            .charged_to(inner.memory),
        );
        inner.stats.received(qos);
        let (matched, ticket) =
            inner.publish(&msg, None, &mut Default::default(), Vec::new(), &cfg, None);
        if let Some(mut rx) = inner.store.durable() {
            let _ = rx.wait_for(|&d| d >= ticket).await;
        }
        Ok(matched)
    }

    /// Publishes one of the broker's own `$SYS/...` topics: retained, QoS 0, not stored,
    /// not counted as received.
    pub fn publish_sys(&self, topic: &str, payload: impl Into<Bytes>) {
        if !topic.starts_with("$SYS/") {
            return;
        }
        let inner = self.inner();
        let Ok(name) = TopicName::new(topic) else {
            return;
        };
        let msg = Arc::new(Message::new(
            inner.message_id(),
            name,
            payload.into(),
            QoS::AtMostOnce,
            true,
            PublishProperties::default(),
            None,
            Instant::now(),
        ));
        inner.publish(
            &msg,
            None,
            &mut Default::default(),
            Vec::new(),
            &inner.cfg(),
            None,
        );
    }

    /// A live copy of the messages routed from now on.
    pub fn tap(&self) -> Tap {
        let inner = self.inner();
        inner.taps.fetch_add(1, Ordering::Relaxed);
        Tap {
            rx: inner.tap.subscribe(),
            taps: inner.taps.clone(),
        }
    }

    /// Sessions, subscriptions, retained messages and message counts now.
    pub fn gauges(&self) -> Gauges {
        let inner = self.inner();
        let mut g = Gauges {
            subscriptions: inner.subs.len(),
            retained: inner
                .retained
                .len()
                .saturating_sub(inner.retained.dollar_len()),
            retained_bytes: inner.retained.bytes(),
            messages_alive: inner.memory.messages(),
            subscription_bytes: inner.memory.subscription_bytes(),
            ..Gauges::default()
        };
        for s in inner.sessions_snapshot() {
            g.sessions += 1;
            g.sessions_connected += usize::from(s.is_online());
            let st = s.lock();
            g.queued += st.queue.len();
            g.inflight += st.inflight.len();
        }
        g
    }

    /// The settings in force.
    pub fn config(&self) -> Arc<BrokerConfig> {
        self.inner().cfg()
    }

    /// Applies new settings (a reload). Connections already established keep what their
    /// CONNACK told them (maximum QoS, receive maximum, packet size, keep alive...);
    /// broker-wide limits (queues, retained, memory, topic sizes, subscriptions per client,
    /// max_connections) apply at once, new connections get everything.
    pub fn set_config(&self, cfg: BrokerConfig) {
        self.inner().replace_config(cfg);
    }
}

fn client_info(client_id: &Arc<str>, st: &crate::session::SessionState) -> ClientInfo {
    ClientInfo {
        client_id: client_id.clone(),
        connected: st.conn().is_some(),
        conn: st.info.clone(),
        disconnected_at: st.disconnected_at(),
        protocol: st.protocol,
        expiry_interval: st.expiry_interval,
        subscriptions: st.subscriptions.len(),
        queued: st.queue.len(),
        inflight: st.inflight.len(),
        inbound_qos2: st.inbound_qos2.len(),
        will_pending: st.pending_will.is_some(),
    }
}

fn subscriptions_of(
    client_id: &Arc<str>,
    st: &crate::session::SessionState,
) -> Vec<SubscriptionInfo> {
    st.subscriptions
        .values()
        .map(|s| SubscriptionInfo {
            client_id: client_id.clone(),
            filter: s.filter.to_string(),
            qos: s.options.qos,
            no_local: s.options.no_local,
            retain_as_published: s.options.retain_as_published,
            retain_handling: s.options.retain_handling as u8,
            identifier: s.id,
        })
        .collect()
}

impl Broker {
    /// The store writer's counters (None when nothing is persisted).
    pub fn store_metrics(&self) -> Option<halyard_store::StoreMetrics> {
        self.inner().store.metrics()
    }
}
