//! Transports: listeners that accept connections and dialers that make them, keyed by URL
//! scheme (`tcp://`, `tls://`, `ws://`, `wss://`, `unix://`), with supervision, PROXY
//! protocol, TLS certificate rotation and a monitor event stream. Moves bytes; knows
//! nothing of MQTT. The broker takes any `AsyncRead + AsyncWrite`.
#![forbid(unsafe_code)]

mod listener;
pub mod monitor;
pub mod proxy;
mod rewind;
pub mod supervisor;
pub mod tls;
mod url;
pub mod ws;
mod x509;

pub use listener::{
    ACCEPT_BACKOFF_INITIAL, ACCEPT_BACKOFF_MAX, Acceptor, AsyncStream, BoxFuture, BoxStream,
    ConnSink, DialOptions, IpLimits, ListenerCtx, ListenerHandle, ListenerStats, PeerInfo,
    RESOURCE_ERRORS_BEFORE_RESTART, Registry, Remote, Transport, start_listener,
};
pub use monitor::{Event, LOG_LINES_PER_SECOND, LogBudget, Monitor, MonitorEvent};
pub use rewind::Rewind;
pub use supervisor::{ListenerStatus, RestartPolicy, SupervisorExit};
pub use url::{Cidr, LISTENER_KEYS, ListenerConfig, Url};
