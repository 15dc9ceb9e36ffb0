//! Halyard's broker core: sessions, routing, retained messages and wills, serving MQTT 3.1,
//! 3.1.1 and 5.0 over any `AsyncRead + AsyncWrite` stream. Transports live elsewhere; this
//! crate never opens a socket, so it is tested over in-memory pipes as well as TCP.
#![forbid(unsafe_code)]

pub mod admin;
pub mod auth;
pub mod config;
mod connection;
pub use connection::sim;
mod conn_info;
mod handle;
mod housekeeping;
mod lifecycle;
mod message;
mod own_queue;
mod queue;
mod recover;
mod registry;
mod retained;
mod route;
mod router;
mod session;
mod state;
mod stats;
mod timers;

pub use config::BrokerConfig;
pub use halyard_transport::{Event, Monitor, MonitorEvent, PeerInfo, Remote};
pub use handle::Broker;

/// The user property a bridge adds to every message it forwards, with the forwarding
/// broker's node id as value (one pair per broker crossed): a broker whose
/// `BrokerConfig::node_id` is among them drops the message instead of routing it again.
pub const HOP_PROPERTY: &str = "halyard-hop";

/// Whether user properties `props` say the message already went through broker `node`
/// (a [`HOP_PROPERTY`] naming it).
pub fn crossed(
    props: &[(halyard_codec::ByteString, halyard_codec::ByteString)],
    node: &str,
) -> bool {
    props
        .iter()
        .any(|(k, v)| &k[..] == HOP_PROPERTY && &v[..] == node)
}
pub use own_queue::{QueueOverride, QueuePolicy, QueueStats};
pub use stats::StatsSnapshot;
