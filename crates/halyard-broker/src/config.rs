//! Broker settings. Every default is a named constant in [`defaults`] with its unit in the
//! name; the binary's TOML configuration maps onto [`BrokerConfig`] and documents the same
//! values. Names follow mosquitto's where mosquitto has the same setting.

use std::time::Duration;

use halyard_codec::QoS;

/// Default values, with units in their names.
pub mod defaults {
    /// Largest keep alive a client may use; v5 clients asking for more (or for 0) are told
    /// this value as Server Keep Alive, 3.x clients asking for more are refused (as mosquitto).
    pub const MAX_KEEPALIVE_SECS: u16 = 65_535;
    /// How long a new connection may take to send CONNECT.
    pub const CONNECT_TIMEOUT_SECS: u64 = 10;
    /// QoS 1/2 messages in flight to one client when it sets no Receive Maximum (3.x), and the
    /// Receive Maximum we advertise for messages from clients.
    pub const MAX_INFLIGHT_MESSAGES: u16 = 20;
    /// Messages queued for one session beyond those in flight.
    pub const MAX_QUEUED_MESSAGES: usize = 1000;
    /// Bytes of payload queued for one session.
    pub const MAX_QUEUED_BYTES: usize = 16 * 1024 * 1024;
    /// Largest packet accepted from or sent to a client (the MQTT 5 Maximum Packet Size).
    pub const MESSAGE_SIZE_LIMIT_BYTES: u32 = 16 * 1024 * 1024;
    /// Connections served at once; more get CONNACK 0x97 (v5) / 0x03 (3.x).
    pub const MAX_CONNECTIONS: usize = 100_000;
    /// Topic aliases a client may use towards us.
    pub const TOPIC_ALIAS_MAXIMUM: u16 = 10;
    /// Topic aliases we assign towards an MQTT 5 client, within the Topic Alias Maximum it
    /// advertises (clients that advertise none never get aliases; 0 here turns them off).
    pub const TOPIC_ALIAS_MAXIMUM_OUTBOUND: u16 = 10;
    /// Largest session expiry we grant, in seconds (`u32::MAX`: no cap): a week, so a
    /// session its client abandoned (or a client made in numbers) does not stay forever.
    /// v5 clients asking for more are told this value in CONNACK; 3.x persistent
    /// sessions get it too (unless `persistent_client_expiration` is shorter).
    pub const MAX_SESSION_EXPIRY_SECS: u32 = 7 * 24 * 3600;
    /// Sessions, connected or not, the broker holds at once (0: no limit); a CONNECT
    /// that would make one more gets CONNACK 0x97 (3.x: 0x03).
    pub const MAX_SESSIONS: usize = 1_000_000;
    /// Sessions one verified user name may hold at once (0: no limit). Off by default:
    /// fleets often share one credential across many devices.
    pub const MAX_SESSIONS_PER_USER: u32 = 0;
    /// How long a graceful shutdown waits for clients to be told and buffers to drain.
    pub const SHUTDOWN_TIMEOUT_SECS: u64 = 10;
    /// Bytes of encoded packets a connection buffers for writing before it stops taking
    /// more from its session (backpressure towards the queue).
    pub const WRITE_BUFFER_HIGH_WATER_BYTES: usize = 64 * 1024;
    /// Failed logins from one address within [`AUTH_FAILURE_WINDOW_SECS`] after which its
    /// further attempts are refused unchecked until the window ends.
    pub const AUTH_FAILURES_PER_WINDOW: u32 = 10;
    /// The window of [`AUTH_FAILURES_PER_WINDOW`].
    pub const AUTH_FAILURE_WINDOW_SECS: u64 = 60;
    /// Addresses whose failures are tracked at once (bounds that table's memory).
    pub const AUTH_FAILURE_TRACKED_ADDRESSES: usize = 65_536;
    /// Longest client identifier accepted (UUIDs and device names fit many times over).
    pub const MAX_CLIENT_ID_LENGTH_BYTES: usize = 256;
    /// Subscriptions one session may hold (0: no limit).
    pub const MAX_SUBSCRIPTIONS_PER_CLIENT: usize = 1_000;
    /// Levels in a topic name or filter (as EMQX's `max_topic_levels`).
    pub const MAX_TOPIC_LEVELS: usize = 128;
    /// Bytes in a topic name or filter.
    pub const MAX_TOPIC_LENGTH_BYTES: usize = 4_096;
    /// PUBLISH packets per second one client may send before its reads pause (0: no limit).
    pub const PUBLISH_RATE_MESSAGES_PER_SEC: u32 = 0;
    /// PUBLISH payload bytes per second one client may send before its reads pause
    /// (0: no limit).
    pub const PUBLISH_RATE_BYTES_PER_SEC: u64 = 0;
    /// Retained messages held at once (0: no limit); more are delivered but not retained.
    pub const MAX_RETAINED_MESSAGES: usize = 1_000_000;
    /// Payload bytes of all retained messages (0: no limit).
    pub const MAX_RETAINED_BYTES: usize = 256 * 1024 * 1024;
    /// User properties one message (PUBLISH or will) may carry (0: no limit). Each costs
    /// far more held in memory than its 5-byte minimum on the wire.
    pub const MAX_USER_PROPERTIES: usize = 128;
    /// Bytes of user property names and values one message may carry (0: no limit).
    pub const MAX_USER_PROPERTIES_BYTES: usize = 64 * 1024;
    /// Bytes of client messages alive at once, queued, in flight or retained, across all
    /// sessions (0: no budget). Past it, publishers are held back until deliveries free
    /// memory.
    pub const MAX_MEMORY_BYTES: usize = 1024 * 1024 * 1024;
}

/// Broker-wide settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BrokerConfig {
    /// This broker's name among bridged and clustered brokers: a message carrying it in
    /// a `halyard-hop` user property already went through here and is not routed again
    /// (bridge loops). `None`: no loop check.
    pub node_id: Option<String>,
    /// See [`defaults::MAX_KEEPALIVE_SECS`].
    pub max_keepalive: u16,
    /// See [`defaults::CONNECT_TIMEOUT_SECS`].
    pub connect_timeout: Duration,
    /// See [`defaults::MAX_INFLIGHT_MESSAGES`].
    pub max_inflight_messages: u16,
    /// See [`defaults::MAX_QUEUED_MESSAGES`].
    pub max_queued_messages: usize,
    /// See [`defaults::MAX_QUEUED_BYTES`].
    pub max_queued_bytes: usize,
    /// Queue QoS 0 messages for disconnected persistent sessions (mosquitto's
    /// `queue_qos0_messages`); they count against the same limits.
    pub queue_qos0_messages: bool,
    /// See [`defaults::MESSAGE_SIZE_LIMIT_BYTES`].
    pub message_size_limit: u32,
    /// See [`defaults::MAX_CONNECTIONS`].
    pub max_connections: usize,
    /// Whether retained messages are supported (`Retain Available`).
    pub retain_available: bool,
    /// Highest QoS accepted from clients and granted to subscriptions.
    pub max_qos: QoS,
    /// Accept clients that send no user name.
    pub allow_anonymous: bool,
    /// See [`defaults::TOPIC_ALIAS_MAXIMUM`].
    pub topic_alias_maximum: u16,
    /// See [`defaults::TOPIC_ALIAS_MAXIMUM_OUTBOUND`].
    pub topic_alias_maximum_outbound: u16,
    /// Session expiry for 3.x clients with clean session 0 (mosquitto's
    /// `persistent_client_expiration`); `None`: never.
    pub persistent_client_expiration: Option<Duration>,
    /// See [`defaults::MAX_SESSION_EXPIRY_SECS`].
    pub max_session_expiry_interval: u32,
    /// Offer shared subscriptions.
    pub shared_subscriptions: bool,
    /// See [`defaults::SHUTDOWN_TIMEOUT_SECS`].
    pub shutdown_timeout: Duration,
    /// See [`defaults::MAX_CLIENT_ID_LENGTH_BYTES`].
    pub max_client_id_length: usize,
    /// See [`defaults::MAX_SUBSCRIPTIONS_PER_CLIENT`].
    pub max_subscriptions_per_client: usize,
    /// See [`defaults::MAX_TOPIC_LEVELS`].
    pub max_topic_levels: usize,
    /// See [`defaults::MAX_TOPIC_LENGTH_BYTES`].
    pub max_topic_length: usize,
    /// See [`defaults::PUBLISH_RATE_MESSAGES_PER_SEC`].
    pub publish_rate_messages: u32,
    /// See [`defaults::PUBLISH_RATE_BYTES_PER_SEC`].
    pub publish_rate_bytes: u64,
    /// See [`defaults::MAX_RETAINED_MESSAGES`].
    pub max_retained_messages: usize,
    /// See [`defaults::MAX_RETAINED_BYTES`].
    pub max_retained_bytes: usize,
    /// See [`defaults::MAX_MEMORY_BYTES`].
    pub max_memory_bytes: usize,
    /// See [`defaults::MAX_SESSIONS`].
    pub max_sessions: usize,
    /// See [`defaults::MAX_SESSIONS_PER_USER`].
    pub max_sessions_per_user: u32,
    /// See [`defaults::MAX_USER_PROPERTIES`].
    pub max_user_properties: usize,
    /// See [`defaults::MAX_USER_PROPERTIES_BYTES`].
    pub max_user_properties_bytes: usize,
}

impl BrokerConfig {
    /// User properties one packet may carry before it is not even decoded (the codec's
    /// `decode_limited`): 8 times `max_user_properties` (0: no limit). Between the two a
    /// PUBLISH or will is refused on its own (0x97) and the connection stays; past it the
    /// connection closes (DISCONNECT / CONNACK 0x97), with at most this many built.
    pub(crate) fn decoded_user_properties(&self) -> u32 {
        match self.max_user_properties {
            0 => u32::MAX,
            n => u32::try_from(n.saturating_mul(8)).unwrap_or(u32::MAX),
        }
    }

    /// Why `props` are over the user-property limits, if they are.
    pub(crate) fn user_properties_over(
        &self,
        props: &[(halyard_codec::ByteString, halyard_codec::ByteString)],
    ) -> Option<&'static str> {
        if self.max_user_properties > 0 && props.len() > self.max_user_properties {
            return Some("more user properties than max_user_properties");
        }
        let bytes: usize = props.iter().map(|(k, v)| k.len() + v.len()).sum();
        (self.max_user_properties_bytes > 0 && bytes > self.max_user_properties_bytes)
            .then_some("user properties larger than max_user_properties_bytes")
    }
}

impl Default for BrokerConfig {
    fn default() -> Self {
        BrokerConfig {
            max_keepalive: defaults::MAX_KEEPALIVE_SECS,
            connect_timeout: Duration::from_secs(defaults::CONNECT_TIMEOUT_SECS),
            max_inflight_messages: defaults::MAX_INFLIGHT_MESSAGES,
            max_queued_messages: defaults::MAX_QUEUED_MESSAGES,
            max_queued_bytes: defaults::MAX_QUEUED_BYTES,
            queue_qos0_messages: false,
            message_size_limit: defaults::MESSAGE_SIZE_LIMIT_BYTES,
            max_connections: defaults::MAX_CONNECTIONS,
            retain_available: true,
            max_qos: QoS::ExactlyOnce,
            allow_anonymous: true,
            node_id: None,
            topic_alias_maximum: defaults::TOPIC_ALIAS_MAXIMUM,
            topic_alias_maximum_outbound: defaults::TOPIC_ALIAS_MAXIMUM_OUTBOUND,
            persistent_client_expiration: None,
            max_session_expiry_interval: defaults::MAX_SESSION_EXPIRY_SECS,
            shared_subscriptions: true,
            shutdown_timeout: Duration::from_secs(defaults::SHUTDOWN_TIMEOUT_SECS),
            max_client_id_length: defaults::MAX_CLIENT_ID_LENGTH_BYTES,
            max_subscriptions_per_client: defaults::MAX_SUBSCRIPTIONS_PER_CLIENT,
            max_topic_levels: defaults::MAX_TOPIC_LEVELS,
            max_topic_length: defaults::MAX_TOPIC_LENGTH_BYTES,
            publish_rate_messages: defaults::PUBLISH_RATE_MESSAGES_PER_SEC,
            publish_rate_bytes: defaults::PUBLISH_RATE_BYTES_PER_SEC,
            max_retained_messages: defaults::MAX_RETAINED_MESSAGES,
            max_retained_bytes: defaults::MAX_RETAINED_BYTES,
            max_memory_bytes: defaults::MAX_MEMORY_BYTES,
            max_sessions: defaults::MAX_SESSIONS,
            max_sessions_per_user: defaults::MAX_SESSIONS_PER_USER,
            max_user_properties: defaults::MAX_USER_PROPERTIES,
            max_user_properties_bytes: defaults::MAX_USER_PROPERTIES_BYTES,
        }
    }
}
