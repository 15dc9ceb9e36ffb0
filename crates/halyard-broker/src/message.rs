//! An application message inside the broker, and how it is encoded for subscribers.
//!
//! A message is received once, wrapped in an `Arc`, and shared by every session it is
//! delivered to: payload and properties are never copied. A message without properties
//! (most of them) is encoded straight into each connection's write buffer: header, topic,
//! packet id, payload, which costs what copying cached bytes would. A message with
//! properties has its PUBLISH bytes encoded at most once per wire shape (3.x or 5, with or
//! without a packet identifier) and cached; each delivery copies those bytes into the
//! write buffer and patches the first byte (DUP/QoS/RETAIN) and the packet identifier in
//! place. Only deliveries that change the properties (subscription identifiers, a
//! remaining expiry, a topic alias) encode afresh.

use halyard_store::StoredMessage;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::SystemTime;

use halyard_codec::{
    Bytes, BytesMut, Packet, PlainPublish, ProtocolVersion, Publish, PublishProperties, QoS,
    TopicName, encode_plain_publish,
};
use tokio::time::Instant;

static NO_PROPERTIES: PublishProperties = PublishProperties {
    payload_format_indicator: None,
    message_expiry_interval: None,
    topic_alias: None,
    response_topic: None,
    correlation_data: None,
    subscription_identifiers: Vec::new(),
    content_type: None,
    user_properties: Vec::new(),
};

/// Properties as decoded, copied out of the read buffer when there are any (see
/// [`TopicName::copy_with`]).
pub(crate) fn owned_properties(p: PublishProperties) -> PublishProperties {
    if p.is_empty() { p } else { p.copied() }
}

/// What only a message with properties carries.
#[derive(Debug)]
struct WithProperties {
    properties: PublishProperties,
    /// What the properties hold in memory (`PublishProperties::held_bytes` and this
    /// box), fixed at creation: part of the message's [`Message::cost`].
    held: usize,
    /// Encoded PUBLISH per (v5, has packet id): see [`Message::cached`].
    cache: [OnceLock<Bytes>; 4],
}

/// One application message as routed by the broker.
#[derive(Debug)]
pub(crate) struct Message {
    /// Broker-unique id; stored deliveries refer to the body by it.
    pub(crate) id: u64,
    /// Set once the body was written to the store (it is written at most once).
    pub(crate) persisted: AtomicBool,
    /// Store ticket of the batch that recorded this message's deliveries: a recorded
    /// delivery is sent only once it is durable, so a subscriber's acknowledgement can never
    /// reach the store before the enqueue it refers to. `u64::MAX` until routing finished
    /// (and for good on a client's QoS 0 message, whose deliveries are never recorded).
    pub(crate) ticket: AtomicU64,
    pub(crate) topic: TopicName,
    pub(crate) payload: Bytes,
    pub(crate) qos: QoS,
    pub(crate) retain: bool,
    /// Properties to forward (never a topic alias or subscription identifiers) and the
    /// encode cache, which only messages with properties use. Boxed and only when there
    /// are any: most messages have none, and inline they were more than half of every
    /// message body (memory per queued message, and bytes moved per PUBLISH).
    properties: Option<Box<WithProperties>>,
    /// When the Message Expiry Interval runs out.
    pub(crate) expires_at: Option<Instant>,
    /// The publishing client, for No Local of a will and for the admin API (who published a
    /// retained message, or one seen by a tap). A client's other messages leave it out:
    /// their routing is given the client id, and the clone was an atomic operation per
    /// message, and another where it is dropped.
    pub(crate) origin: Option<Arc<str>>,
    /// The broker-wide count this message's bytes are charged to while it lives (one per
    /// broker, never freed: a reference here saves two atomic operations per message
    /// that an `Arc` cost).
    account: Option<&'static MemoryUse>,
}

/// Bytes of messages alive in the broker (queued, in flight, retained): what the global
/// memory budget is checked against. Charged when a client's message is routed, refunded
/// when the last reference to it goes.
///
/// Signed: a publishing connection charges its messages once per batch of packets (two
/// atomic operations per batch instead of per message), so a message delivered and dropped
/// on another core before its batch ends is refunded first and the counts dip below their
/// true value for that moment. Readers clamp at zero.
#[derive(Debug, Default)]
pub(crate) struct MemoryUse {
    bytes: std::sync::atomic::AtomicIsize,
    /// Messages alive (for `$SYS/broker/store/messages/count` and the metrics).
    messages: std::sync::atomic::AtomicIsize,
    /// Bytes of subscriptions (`Subscription::cost`): checked against the same budget,
    /// kept apart so `message_bytes_alive` stays the messages' own.
    subscriptions: std::sync::atomic::AtomicIsize,
}

impl MemoryUse {
    /// One per broker for the life of the process: messages refer to it without
    /// reference counting (a few bytes per broker started, which only tests do often).
    pub(crate) fn new_static() -> &'static MemoryUse {
        Box::leak(Box::default())
    }

    /// Charges `messages` messages of `bytes` bytes in all.
    pub(crate) fn charge(&self, bytes: usize, messages: usize) {
        if messages > 0 {
            self.bytes.fetch_add(bytes as isize, Ordering::Relaxed);
            self.messages
                .fetch_add(messages as isize, Ordering::Relaxed);
        }
    }

    pub(crate) fn bytes(&self) -> usize {
        self.bytes.load(Ordering::Relaxed).max(0) as usize
    }

    /// Charges (or, negative, refunds) bytes that are no message's own: the packets a
    /// segment keeps encoded (`queue::Frames`).
    pub(crate) fn add_bytes(&self, bytes: isize) {
        self.bytes.fetch_add(bytes, Ordering::Relaxed);
    }

    /// Charges (or, negative, refunds) a subscription's bytes.
    pub(crate) fn add_subscription_bytes(&self, bytes: isize) {
        self.subscriptions.fetch_add(bytes, Ordering::Relaxed);
    }

    pub(crate) fn subscription_bytes(&self) -> usize {
        self.subscriptions.load(Ordering::Relaxed).max(0) as usize
    }

    pub(crate) fn messages(&self) -> usize {
        self.messages.load(Ordering::Relaxed).max(0) as usize
    }
}

impl Drop for Message {
    fn drop(&mut self) {
        if let Some(a) = &self.account {
            a.bytes.fetch_sub(self.cost() as isize, Ordering::Relaxed);
            a.messages.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

/// The properties a received message keeps (never a topic alias or subscription
/// identifiers), boxed with its encode cache; nothing at all for most messages.
#[derive(Debug)]
pub(crate) struct Props(Option<Box<WithProperties>>);

impl Props {
    /// A message without properties.
    pub(crate) const NONE: Props = Props(None);

    pub(crate) fn new(mut properties: PublishProperties) -> Props {
        properties.topic_alias = None;
        properties.subscription_identifiers.clear();
        Props((!properties.is_empty()).then(|| {
            Box::new(WithProperties {
                held: properties.held_bytes() + std::mem::size_of::<WithProperties>(),
                properties,
                cache: Default::default(),
            })
        }))
    }

    pub(crate) fn get(&self) -> Option<&PublishProperties> {
        self.0.as_deref().map(|w| &w.properties)
    }
}

impl Message {
    #[allow(clippy::too_many_arguments)] // a plain constructor of a plain record
    pub(crate) fn new(
        id: u64,
        topic: TopicName,
        payload: Bytes,
        qos: QoS,
        retain: bool,
        properties: PublishProperties,
        origin: Option<Arc<str>>,
        now: Instant,
    ) -> Self {
        Self::from_parts(
            id,
            topic,
            payload,
            qos,
            retain,
            Props::new(properties),
            origin,
            now,
            None,
        )
    }

    /// A message from its parts, refunded to `account` (if any) when it is dropped; the
    /// caller charges it ([`MemoryUse::charge`], once per batch). The receive path builds
    /// it straight into its `Arc` with this: a PUBLISH decoded to a
    /// `Publish` (264 bytes) and then to a `Message` was about a kilobyte of copies.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn from_parts(
        id: u64,
        topic: TopicName,
        payload: Bytes,
        qos: QoS,
        retain: bool,
        properties: Props,
        origin: Option<Arc<str>>,
        now: Instant,
        account: Option<&'static MemoryUse>,
    ) -> Self {
        let expires_at = properties
            .get()
            .and_then(|p| p.message_expiry_interval)
            .map(|s| now + std::time::Duration::from_secs(u64::from(s)));
        Message {
            id,
            persisted: AtomicBool::new(false),
            ticket: AtomicU64::new(u64::MAX),
            topic,
            payload,
            qos,
            retain,
            properties: properties.0,
            expires_at,
            origin,
            account,
        }
    }

    /// The properties to forward (never a topic alias or subscription identifiers).
    pub(crate) fn properties(&self) -> &PublishProperties {
        self.properties
            .as_deref()
            .map_or(&NO_PROPERTIES, |w| &w.properties)
    }

    /// Marks the batch that recorded this message's deliveries (0: none recorded).
    pub(crate) fn set_ticket(&self, ticket: u64) {
        // A later batch (re-dispatch, retained on subscribe) may record more deliveries of
        // the same message; keep the first ticket for those recorded first unless unset.
        let _ = self
            .ticket
            .compare_exchange(u64::MAX, ticket, Ordering::AcqRel, Ordering::Acquire);
        if ticket != 0 {
            self.ticket.fetch_max(ticket, Ordering::AcqRel);
        }
    }

    pub(crate) fn is_expired(&self, now: Instant) -> bool {
        self.expires_at.is_some_and(|e| e <= now)
    }

    /// [`Self::is_expired`], reading the clock only for a message that can expire.
    pub(crate) fn is_expired_lazy(&self, now: &mut LazyNow) -> bool {
        self.expires_at.is_some_and(|e| e <= now.get())
    }

    /// Charges this message's bytes to `account` until it is dropped.
    pub(crate) fn charged_to(mut self, account: &'static MemoryUse) -> Self {
        account.charge(self.cost(), 1);
        self.account = Some(account);
        self
    }

    /// What this message holds, for every budget it is charged to (queue bytes,
    /// retained bytes, `max_memory_bytes`): payload, topic and, when it has any, its
    /// properties as held in memory (`WithProperties::held`). Fixed for the message's
    /// life: charges and refunds must match.
    pub(crate) fn cost(&self) -> usize {
        self.payload.len()
            + self.topic.as_str().len()
            + self.properties.as_deref().map_or(0, |w| w.held)
    }

    /// The broker-wide count this message is charged to, if any.
    pub(crate) fn account(&self) -> Option<&'static MemoryUse> {
        self.account
    }

    /// Whether a QoS 0 delivery of this message is the same packet for every subscriber
    /// of one protocol version that takes no subscription identifier and no topic alias:
    /// no properties, no expiry (whose remaining time changes), no RETAIN to forward.
    pub(crate) fn is_plain(&self) -> bool {
        self.properties.is_none() && self.expires_at.is_none() && !self.retain
    }

    /// The PUBLISH for this delivery, with packet id 0 as a placeholder when `with_id`.
    fn build(&self, qos: QoS, properties: PublishProperties) -> Publish {
        Publish {
            dup: false,
            qos,
            retain: false,
            topic: self.topic.clone(),
            packet_id: if qos == QoS::AtMostOnce { 0 } else { 1 },
            properties,
            raw_properties: Bytes::new(),
            payload: self.payload.clone(),
        }
    }

    fn cached<'a>(&'a self, w: &'a WithProperties, v5: bool, with_id: bool) -> &'a Bytes {
        let slot = &w.cache[usize::from(v5) * 2 + usize::from(with_id)];
        slot.get_or_init(|| {
            let version = if v5 {
                ProtocolVersion::V5
            } else {
                ProtocolVersion::V3_1_1
            };
            let qos = if with_id {
                QoS::AtLeastOnce
            } else {
                QoS::AtMostOnce
            };
            let p = Packet::Publish(self.build(qos, w.properties.clone()));
            let mut buf = BytesMut::with_capacity(p.encoded_len(version));
            // Topic and properties were validated on the way in and the size against the
            // limit; an encode error here would mean a codec bug, so fall back to empty,
            // which `write` reports as "too large" and the delivery is dropped and counted.
            if p.encode(version, &mut buf).is_err() {
                return Bytes::new();
            }
            buf.freeze()
        })
    }
}

/// What a delivery writes besides the shared message.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Delivery<'a> {
    pub(crate) qos: QoS,
    pub(crate) retain: bool,
    pub(crate) dup: bool,
    pub(crate) packet_id: u16,
    pub(crate) subscription_ids: &'a [u32],
    /// A topic alias to send instead of (`Some((alias, false))`) or together with
    /// (`Some((alias, true))`) the topic name.
    pub(crate) alias: Option<(u16, bool)>,
}

/// Why a delivery was not written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum WriteError {
    /// Larger than the client's Maximum Packet Size [MQTT-3.1.2-25]: dropped.
    TooLarge,
}

/// The current time, read at most once and only if asked for. Most messages carry no
/// expiry, and on virtual machines without a usable TSC every clock read is a system call.
#[derive(Default)]
pub(crate) struct LazyNow(Option<Instant>);

impl LazyNow {
    /// A time already known (read by the caller, or a simulator's virtual clock).
    pub(crate) fn at(now: Instant) -> Self {
        LazyNow(Some(now))
    }

    pub(crate) fn get(&mut self) -> Instant {
        *self.0.get_or_insert_with(Instant::now)
    }
}

/// Appends the PUBLISH for one delivery of `msg` to `out`.
pub(crate) fn write(
    msg: &Message,
    d: Delivery<'_>,
    version: ProtocolVersion,
    max_packet_size: u32,
    now: &mut LazyNow,
    out: &mut BytesMut,
) -> Result<(), WriteError> {
    let v5 = version.is_v5();
    let plain =
        !v5 || (d.subscription_ids.is_empty() && msg.expires_at.is_none() && d.alias.is_none());
    if plain {
        let Some(with_properties) = msg.properties.as_deref() else {
            // No properties: encoding is a header, the topic, the packet id and the
            // payload, as cheap as copying cached bytes, and it needs no allocation for the
            // cache (which in fan-in, one delivery per message, was pure overhead).
            let p = PlainPublish {
                dup: d.dup,
                qos: d.qos,
                retain: d.retain,
                topic: msg.topic.as_str(),
                packet_id: d.packet_id,
                payload: &msg.payload,
            };
            if p.encoded_len(version) > max_packet_size as usize {
                return Err(WriteError::TooLarge);
            }
            return encode_plain_publish(&p, version, out).map_err(|_| WriteError::TooLarge);
        };
        let with_id = d.qos != QoS::AtMostOnce;
        let bytes = msg.cached(with_properties, v5, with_id);
        if bytes.is_empty() || bytes.len() > max_packet_size as usize {
            return Err(WriteError::TooLarge);
        }
        let start = out.len();
        out.extend_from_slice(bytes);
        out[start] = 0x30 | u8::from(d.dup) << 3 | (d.qos as u8) << 1 | u8::from(d.retain);
        if with_id {
            // The packet id follows the fixed header and the length-prefixed topic name.
            let at = start + fixed_header_len(bytes) + 2 + msg.topic.as_str().len();
            out[at..at + 2].copy_from_slice(&d.packet_id.to_be_bytes());
        }
        return Ok(());
    }
    let mut props = msg.properties().clone();
    props.subscription_identifiers = d.subscription_ids.to_vec();
    if let Some(expires) = msg.expires_at {
        // [MQTT-3.3.2-6]: forward the remaining lifetime, in whole seconds rounded up: a
        // message of 60 s forwarded at once says 60, not 59 (and one with a fraction of
        // a second left does not say 0).
        let left = expires.saturating_duration_since(now.get());
        let secs = left.as_secs() + u64::from(left.subsec_nanos() > 0);
        props.message_expiry_interval = Some(u32::try_from(secs).unwrap_or(u32::MAX));
    }
    let mut p = msg.build(d.qos, props);
    p.dup = d.dup;
    p.retain = d.retain;
    p.packet_id = if d.qos == QoS::AtMostOnce {
        0
    } else {
        d.packet_id
    };
    if let Some((alias, keep_topic)) = d.alias {
        p.properties.topic_alias = Some(alias);
        if !keep_topic {
            p.topic = TopicName::empty();
        }
    }
    let p = Packet::Publish(p);
    if p.encoded_len(version) > max_packet_size as usize {
        return Err(WriteError::TooLarge);
    }
    p.encode(version, out).map_err(|_| WriteError::TooLarge)
}

/// Length of the fixed header of a packet we encoded: the type byte and the remaining
/// length, whose last byte is the first without the continuation bit.
fn fixed_header_len(bytes: &[u8]) -> usize {
    1 + bytes[1..]
        .iter()
        .take(4)
        .position(|b| b & 0x80 == 0)
        .map_or(4, |i| i + 1)
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

#[cfg(test)]
mod tests {
    /// A message body is memory per queued message, an allocation per PUBLISH and bytes
    /// moved while it is built: keep it within 160 bytes (with the `Arc` counts, the
    /// allocator's 160-byte class) unless there is a reason. It is 136 now: what only
    /// messages with properties need (the encode cache, 160 bytes alone) is boxed.
    #[test]
    fn a_message_stays_small() {
        let size = std::mem::size_of::<super::Message>();
        assert!(size <= 144, "Message is {size} bytes");
    }
}
