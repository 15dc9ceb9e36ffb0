//! Broker-wide counters: relaxed atomics, incremented on the paths they count.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

macro_rules! counters {
    ($($name:ident: $doc:literal,)*) => {
        /// Live counters.
        #[derive(Debug, Default)]
        pub(crate) struct Stats { $(pub(crate) $name: AtomicU64,)* }

        /// A point-in-time copy of the counters.
        #[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
        pub struct StatsSnapshot { $(#[doc = $doc] pub $name: u64,)* }

        impl Stats {
            pub(crate) fn snapshot(&self) -> StatsSnapshot {
                let mut s = StatsSnapshot { $($name: self.$name.load(Relaxed),)* };
                s.messages_received =
                    s.messages_received_qos0 + s.messages_received_qos1 + s.messages_received_qos2;
                s.messages_sent = s.messages_sent_qos0 + s.messages_sent_qos1 + s.messages_sent_qos2;
                s
            }
        }
    };
}

counters! {
    connections_current: "Connections past CONNECT and not yet closed.",
    connections_total: "Connections accepted (CONNACK success) since start.",
    connections_refused: "CONNECTs answered with a refusal.",
    messages_received: "PUBLISH packets received from clients (the sum of the QoS counters).",
    messages_sent: "PUBLISH packets sent to clients (the sum of the QoS counters).",
    messages_received_qos0: "QoS 0 PUBLISH packets received.",
    messages_received_qos1: "QoS 1 PUBLISH packets received.",
    messages_received_qos2: "QoS 2 PUBLISH packets received.",
    messages_sent_qos0: "QoS 0 PUBLISH packets sent.",
    messages_sent_qos1: "QoS 1 PUBLISH packets sent.",
    messages_sent_qos2: "QoS 2 PUBLISH packets sent.",
    dropped_no_subscribers: "Messages routed to no subscriber.",
    connections_maximum: "The most connections open at once since start; a gauge.",
    bytes_received: "Bytes read from clients.",
    bytes_sent: "Bytes written to clients.",
    dropped_queue_full: "Messages not queued because a session queue was full.",
    dropped_qos0_evicted: "Queued QoS 0 messages evicted to make room for newer ones.",
    dropped_offline_qos0: "QoS 0 messages not queued for offline sessions.",
    dropped_too_large: "Deliveries skipped because they exceed the client's Maximum Packet Size.",
    expired_messages: "Queued messages dropped because their Message Expiry Interval passed.",
    sessions_expired: "Sessions discarded when their expiry interval ran out.",
    wills_published: "Will messages published.",
    protocol_errors: "Connections closed for a malformed packet or protocol error.",
    publish_denied: "PUBLISH packets refused by the authorizer (not routed).",
    subscribe_denied: "Subscriptions refused by the authorizer.",
    dropped_not_authorized: "Deliveries withheld because the subscriber may not read the topic.",
    subscribe_quota_exceeded: "Subscriptions refused because the client holds max_subscriptions_per_client, or max_memory_bytes is reached.",
    topic_refused: "Topic names or filters refused for exceeding max_topic_levels or max_topic_length.",
    sessions_refused: "CONNECTs refused because max_sessions or max_sessions_per_user was reached.",
    properties_refused: "Messages and wills refused for exceeding max_user_properties or max_user_properties_bytes.",
    publish_throttled: "Times a client's reads were paused by its publish rate limit.",
    retained_refused: "Retained messages not retained because max_retained_messages/bytes was reached.",
    publish_paused_memory: "Times a publisher was held back because max_memory_bytes was reached.",
    bridge_loops_dropped: "Messages not routed because they had already crossed this broker (a bridge loop; see the halyard-hop user property).",
    message_bytes_alive: "Bytes of client messages alive now (queued, in flight, retained); a gauge.",
}

impl Stats {
    // One shared counter per message and direction (the totals are summed when read): each
    // is a contended cache line between cores.
    pub(crate) fn received(&self, qos: halyard_codec::QoS) {
        Self::inc(match qos {
            halyard_codec::QoS::AtMostOnce => &self.messages_received_qos0,
            halyard_codec::QoS::AtLeastOnce => &self.messages_received_qos1,
            halyard_codec::QoS::ExactlyOnce => &self.messages_received_qos2,
        });
    }
    pub(crate) fn sent(&self, qos: halyard_codec::QoS) {
        Self::inc(match qos {
            halyard_codec::QoS::AtMostOnce => &self.messages_sent_qos0,
            halyard_codec::QoS::AtLeastOnce => &self.messages_sent_qos1,
            halyard_codec::QoS::ExactlyOnce => &self.messages_sent_qos2,
        });
    }
    /// Adds per-QoS counts gathered over a batch (a connection's read or fill): one
    /// atomic operation per batch instead of one per message. Resets `by_qos`.
    pub(crate) fn add_received(&self, by_qos: &mut [u32; 3]) {
        Self::add_by_qos(
            [
                &self.messages_received_qos0,
                &self.messages_received_qos1,
                &self.messages_received_qos2,
            ],
            by_qos,
        );
    }
    pub(crate) fn add_sent(&self, by_qos: &mut [u32; 3]) {
        Self::add_by_qos(
            [
                &self.messages_sent_qos0,
                &self.messages_sent_qos1,
                &self.messages_sent_qos2,
            ],
            by_qos,
        );
    }
    fn add_by_qos(counters: [&AtomicU64; 3], by_qos: &mut [u32; 3]) {
        for (c, n) in counters.into_iter().zip(by_qos.iter_mut()) {
            if *n > 0 {
                c.fetch_add(u64::from(std::mem::take(n)), Relaxed);
            }
        }
    }
    pub(crate) fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Relaxed);
    }
    pub(crate) fn inc(counter: &AtomicU64) {
        counter.fetch_add(1, Relaxed);
    }
    pub(crate) fn dec(counter: &AtomicU64) {
        counter.fetch_sub(1, Relaxed);
    }
}
