//! How a client connects: broker URLs, identity, session, limits and reconnect policy.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use halyard_codec::{Bytes, ProtocolVersion, QoS};
use halyard_transport::DialOptions;

use crate::Message;

/// Default first reconnect delay ceiling.
pub const DEFAULT_RECONNECT_INITIAL: Duration = Duration::from_secs(1);
/// Default cap on the reconnect delay.
pub const DEFAULT_RECONNECT_MAX: Duration = Duration::from_secs(60);
/// Default keep alive.
pub const DEFAULT_KEEP_ALIVE: Duration = Duration::from_secs(60);
/// Default bound on messages held while disconnected or while the broker's receive window
/// is full.
pub const DEFAULT_MAX_QUEUED: usize = 1000;
/// Default buffer of each subscription stream.
pub const DEFAULT_SUBSCRIPTION_BUFFER: usize = 256;
/// Default time allowed for TCP + TLS/WebSocket + CONNECT/CONNACK.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Default number of QoS 1/2 messages we let the broker have in flight to us (v5 Receive
/// Maximum sent in CONNECT).
pub const DEFAULT_RECEIVE_MAXIMUM: u16 = 256;
/// Default window of unacknowledged QoS 1/2 messages we send to an MQTT 3.x broker, which
/// cannot tell us its limit (v5 announces Receive Maximum). Mosquitto and paho use 20 too;
/// brokers drop what exceeds their own limit, silently for a 3.x client.
pub const DEFAULT_V3_MAX_INFLIGHT: u16 = 20;
/// Default number of topic aliases we accept from the broker.
pub const DEFAULT_TOPIC_ALIAS_MAXIMUM: u16 = 64;

/// Reconnect policy: capped exponential backoff with full jitter.
///
/// Before attempt `n` (0-based, counted since the last successful CONNACK) the client waits
/// a uniformly random time in `[0, min(max, initial * 2^n)]`, so a restarted broker is not
/// hit by every client at the same instant.
#[derive(Debug, Clone)]
pub struct Reconnect {
    /// Reconnect at all after a connection is lost or refused. Off: the first failure
    /// closes the client (what command-line tools want).
    pub enabled: bool,
    /// Delay ceiling before the first retry.
    pub initial: Duration,
    /// Cap on the delay ceiling.
    pub max: Duration,
    /// Retry when the very first connection attempt fails. Command-line tools turn this
    /// off: a wrong address or password should end them, a broker that restarts later
    /// should not.
    pub retry_first_connect: bool,
}

impl Default for Reconnect {
    fn default() -> Self {
        Reconnect {
            enabled: true,
            initial: DEFAULT_RECONNECT_INITIAL,
            max: DEFAULT_RECONNECT_MAX,
            retry_first_connect: true,
        }
    }
}

/// A callback that sees one line per packet sent or received, in the style of
/// mosquitto's `-d` output (`sending PUBLISH (d0, q1, r0, m1, 't', ... (5 bytes))`).
#[derive(Clone)]
pub struct PacketTrace(pub Arc<dyn Fn(&str) + Send + Sync>);

impl fmt::Debug for PacketTrace {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("PacketTrace")
    }
}

/// Everything a client needs to connect. Fields are public; `ClientOptions::new(url)` fills
/// in the defaults above.
#[derive(Debug, Clone)]
pub struct ClientOptions {
    /// Broker URLs (`tcp://`, `tls://`, `ws://`, `wss://`, `unix://`), tried in order; after
    /// the last one the client starts again at the first.
    pub urls: Vec<String>,
    /// Protocol version to speak.
    pub protocol: ProtocolVersion,
    /// Client identifier; empty asks the broker to assign one (v5 returns it in CONNACK).
    pub client_id: String,
    /// Clean Start (v5) / Clean Session (3.x) on the first connection. Reconnections always
    /// ask to resume the session when `session_expiry` is non-zero (v5) or when this is
    /// false (3.x).
    pub clean_start: bool,
    /// Keep alive; zero disables it.
    pub keep_alive: Duration,
    /// v5 Session Expiry Interval in seconds (0: the session ends with the connection).
    pub session_expiry: u32,
    /// User name.
    pub username: Option<String>,
    /// Password.
    pub password: Option<Bytes>,
    /// Will message (its `properties` carry the v5 will properties; the will delay is
    /// `will_delay`).
    pub will: Option<Message>,
    /// v5 Will Delay Interval in seconds.
    pub will_delay: Option<u32>,
    /// v5 Receive Maximum we announce.
    pub receive_maximum: u16,
    /// v5 Maximum Packet Size we announce (`None`: no limit).
    pub maximum_packet_size: Option<u32>,
    /// Unacknowledged QoS 1/2 messages we send at once. `None`: the broker's Receive
    /// Maximum for v5, [`DEFAULT_V3_MAX_INFLIGHT`] for 3.x. The smaller of this and the
    /// broker's Receive Maximum applies.
    pub max_inflight: Option<u16>,
    /// v5 Topic Alias Maximum we accept from the broker.
    pub topic_alias_maximum: u16,
    /// Use topic aliases on our own PUBLISHes, up to the broker's Topic Alias Maximum.
    pub outgoing_topic_aliases: bool,
    /// v5 Request Response Information.
    pub request_response_information: bool,
    /// v5 Request Problem Information (`None`: not sent, the broker's default applies).
    pub request_problem_information: Option<bool>,
    /// v5 user properties of CONNECT.
    pub user_properties: Vec<(String, String)>,
    /// Transport options: TLS files, connect timeout, WebSocket origin.
    pub dial: DialOptions,
    /// Reconnect policy.
    pub reconnect: Reconnect,
    /// Bound on outgoing messages waiting to be sent; a publish beyond it fails with
    /// [`crate::Error::QueueFull`].
    pub max_queued: usize,
    /// Buffer of each subscription stream. When a stream's buffer is full the client stops
    /// reading from the broker until there is room (the broker then holds the messages,
    /// within its own limits), so a slow consumer never costs unbounded memory here.
    pub subscription_buffer: usize,
    /// Packet trace for debugging (`halyard sub -d`).
    pub trace: Option<PacketTrace>,
    /// Prefix of the response topic used by [`crate::Client::request`]; a random suffix is
    /// added. When the broker returns Response Information, that is used instead.
    pub response_topic_prefix: String,
}

impl ClientOptions {
    /// Options for one broker URL with the defaults: MQTT 5, random client id, clean start,
    /// 60 s keep alive, reconnect 1 s doubling to 60 s with full jitter.
    pub fn new(url: impl Into<String>) -> Self {
        ClientOptions {
            urls: vec![url.into()],
            protocol: ProtocolVersion::V5,
            client_id: String::new(),
            clean_start: true,
            keep_alive: DEFAULT_KEEP_ALIVE,
            session_expiry: 0,
            username: None,
            password: None,
            will: None,
            will_delay: None,
            receive_maximum: DEFAULT_RECEIVE_MAXIMUM,
            maximum_packet_size: None,
            max_inflight: None,
            topic_alias_maximum: DEFAULT_TOPIC_ALIAS_MAXIMUM,
            outgoing_topic_aliases: false,
            request_response_information: false,
            request_problem_information: None,
            user_properties: Vec::new(),
            dial: DialOptions {
                connect_timeout: DEFAULT_CONNECT_TIMEOUT,
                ..DialOptions::default()
            },
            reconnect: Reconnect::default(),
            max_queued: DEFAULT_MAX_QUEUED,
            subscription_buffer: DEFAULT_SUBSCRIPTION_BUFFER,
            trace: None,
            response_topic_prefix: "_halyard/rr".into(),
        }
    }

    /// Adds a fallback broker URL.
    pub fn url(mut self, url: impl Into<String>) -> Self {
        self.urls.push(url.into());
        self
    }
    /// Sets the protocol version.
    pub fn protocol(mut self, v: ProtocolVersion) -> Self {
        self.protocol = v;
        self
    }
    /// Sets the client identifier.
    pub fn client_id(mut self, id: impl Into<String>) -> Self {
        self.client_id = id.into();
        self
    }
    /// Sets Clean Start / Clean Session.
    pub fn clean_start(mut self, clean: bool) -> Self {
        self.clean_start = clean;
        self
    }
    /// Sets the keep alive.
    pub fn keep_alive(mut self, k: Duration) -> Self {
        self.keep_alive = k;
        self
    }
    /// Sets the v5 session expiry interval (seconds).
    pub fn session_expiry(mut self, secs: u32) -> Self {
        self.session_expiry = secs;
        self
    }
    /// Sets user name and password.
    pub fn credentials(mut self, user: impl Into<String>, password: impl Into<Bytes>) -> Self {
        self.username = Some(user.into());
        self.password = Some(password.into());
        self
    }
    /// Sets the will message.
    pub fn will(mut self, will: Message) -> Self {
        self.will = Some(will);
        self
    }
    /// Sets the reconnect policy.
    pub fn reconnect(mut self, r: Reconnect) -> Self {
        self.reconnect = r;
        self
    }
    /// Sets the bound on queued outgoing messages.
    pub fn max_queued(mut self, n: usize) -> Self {
        self.max_queued = n;
        self
    }

    pub(crate) fn validate(&self) -> Result<(), crate::Error> {
        if self.urls.is_empty() {
            return Err(crate::Error::Protocol("no broker URL given".into()));
        }
        if let Some(w) = &self.will {
            if w.qos > QoS::ExactlyOnce {
                return Err(crate::Error::Protocol("bad will QoS".into()));
            }
            halyard_codec::TopicName::new(w.topic.clone())?;
        }
        Ok(())
    }
}
