//! Transports: listeners that accept connections and dialers that make them, keyed by URL
//! scheme (`tcp://`, `tls://`, `ws://`, `wss://`, `unix://`), with supervision, PROXY
//! protocol, TLS certificate rotation and a monitor event stream. Moves bytes; knows
//! nothing of MQTT. The broker takes any `AsyncRead + AsyncWrite`.
#![forbid(unsafe_code)]

mod forward;
mod listener;
pub mod monitor;
mod peer;
pub mod proxy;
mod registry;
mod rewind;
pub mod supervisor;
mod tcp;
pub mod tls;
mod transport;
mod unix;
mod url;
pub mod ws;
mod x509;

pub use listener::{
    ACCEPT_BACKOFF_INITIAL, ACCEPT_BACKOFF_MAX, ConnSink, ListenerHandle, ListenerStats,
    RESOURCE_ERRORS_BEFORE_RESTART, start_listener,
};
pub use monitor::{Event, LOG_LINES_PER_SECOND, LogBudget, Monitor, MonitorEvent};
pub use peer::{AsyncStream, BoxFuture, BoxStream, PeerInfo, Remote};
pub use registry::Registry;
pub use rewind::Rewind;
pub use supervisor::{ListenerStatus, RestartPolicy, SupervisorExit};
pub use transport::{Acceptor, DialOptions, IpLimits, ListenerCtx, Transport};
pub use url::{Cidr, LISTENER_KEYS, ListenerConfig, Url};
