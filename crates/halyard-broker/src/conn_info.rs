//! Who is (or was last) connected to a session: the admin API's and `$SYS`'s view of a
//! connection, and the client address as logs show it.

use std::sync::Arc;

use halyard_codec::ProtocolVersion;

/// Who is (or was last) connected to a session, for the admin API and `$SYS`.
#[derive(Debug, Clone)]
pub struct ConnInfo {
    /// The client's address (or transport name).
    pub peer: Peer,
    /// The listener's URL.
    pub listener: Arc<str>,
    /// The authenticated user name, if any.
    pub username: Option<Arc<str>>,
    /// The protocol level spoken.
    pub protocol: ProtocolVersion,
    /// The keep alive in force (seconds; 0: none).
    pub keep_alive: u16,
    /// Clean start / clean session flag of the CONNECT.
    pub clean_start: bool,
    /// Mosquitto's bridge bit was set (3.x): subscriptions act as No Local and Retain As
    /// Published.
    pub bridge: bool,
    /// When the CONNACK was sent, in milliseconds since the Unix epoch (8 bytes where a
    /// `SystemTime` takes 16: one allocation per connection, in the 80-byte class).
    connected_ms: u64,
}

/// Milliseconds since the Unix epoch (0 before it): how a session keeps its connect and
/// close times in 8 bytes.
pub(crate) fn unix_ms(t: std::time::SystemTime) -> u64 {
    t.duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// A client's address as logs and the admin API show it: an IPv4 address and port kept
/// inline (no string allocated per connection for the most common client), anything
/// else (IPv6, Unix socket, transport names, PROXY-protocol sources) as its text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Peer {
    /// An IPv4 client.
    V4(std::net::SocketAddrV4),
    /// Any other client, as displayed.
    Text(Arc<str>),
}

impl From<&halyard_transport::Remote> for Peer {
    fn from(r: &halyard_transport::Remote) -> Self {
        match r {
            halyard_transport::Remote::Ip(std::net::SocketAddr::V4(a)) => Peer::V4(*a),
            other => Peer::Text(other.to_string().into()),
        }
    }
}

impl std::fmt::Display for Peer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Peer::V4(a) => a.fmt(f),
            Peer::Text(t) => f.write_str(t),
        }
    }
}

impl ConnInfo {
    pub(crate) fn new(
        peer: Peer,
        listener: Arc<str>,
        username: Option<Arc<str>>,
        protocol: ProtocolVersion,
        keep_alive: u16,
        clean_start: bool,
    ) -> Self {
        let connected_ms = unix_ms(std::time::SystemTime::now());
        ConnInfo {
            peer,
            listener,
            username,
            protocol,
            keep_alive,
            clean_start,
            bridge: false,
            connected_ms,
        }
    }

    /// What a session restored from the store knows of its last connection: the
    /// identity it is bound to and the protocol. No peer or listener (empty), connected
    /// at the epoch (0 ms).
    pub(crate) fn restored(username: Option<Arc<str>>, protocol: ProtocolVersion) -> Self {
        ConnInfo {
            peer: Peer::Text("".into()),
            listener: "".into(),
            username,
            protocol,
            keep_alive: 0,
            clean_start: false,
            bridge: false,
            connected_ms: 0,
        }
    }

    /// When the CONNACK was sent (to the millisecond).
    pub fn connected_at(&self) -> std::time::SystemTime {
        std::time::UNIX_EPOCH + std::time::Duration::from_millis(self.connected_ms)
    }
}
