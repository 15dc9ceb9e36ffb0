//! Who a connection is: the remote address and what the transport learnt of it.

use std::fmt;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;

use tokio::io::{AsyncRead, AsyncWrite};

/// A boxed, sendable future.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Any byte stream a connection can run over.
pub trait AsyncStream: AsyncRead + AsyncWrite + Send + Unpin + std::any::Any {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin + 'static> AsyncStream for T {}

/// A connection's stream after every handshake, whatever the transport.
pub type BoxStream = Box<dyn AsyncStream>;

/// Where a connection comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Remote {
    /// An IP client (the PROXY header's source when the listener uses it).
    Ip(SocketAddr),
    /// A Unix-socket client; the listener's path (Unix peers are usually unnamed).
    Unix(Arc<str>),
    /// Anything else (in-memory test pipes, embedders' transports).
    Named(Arc<str>),
}

impl fmt::Display for Remote {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Remote::Ip(a) => write!(f, "{a}"),
            Remote::Unix(p) => write!(f, "unix:{p}"),
            Remote::Named(n) => f.write_str(n),
        }
    }
}

/// What the broker learns about a connection from its transport.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerInfo {
    /// The client.
    pub remote: Remote,
    /// The listener's URL.
    pub listener: Arc<str>,
    /// The proxy's own address when a PROXY header supplied `remote`.
    pub proxy: Option<Remote>,
    /// The client certificate's identity (CN, else first SAN).
    pub tls_identity: Option<String>,
    /// The listener replaces the CONNECT user name with `tls_identity`.
    pub identity_as_username: bool,
    /// The listener's `allow_anonymous`, overriding the broker's when set.
    pub allow_anonymous: Option<bool>,
}

impl PeerInfo {
    /// A peer known only by its address.
    pub fn new(remote: Remote) -> PeerInfo {
        PeerInfo {
            remote,
            listener: Arc::from(""),
            proxy: None,
            tls_identity: None,
            identity_as_username: false,
            allow_anonymous: None,
        }
    }
}

impl fmt::Display for PeerInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.remote.fmt(f)
    }
}

impl From<SocketAddr> for PeerInfo {
    fn from(a: SocketAddr) -> Self {
        PeerInfo::new(Remote::Ip(a))
    }
}

impl From<&str> for PeerInfo {
    fn from(s: &str) -> Self {
        PeerInfo::new(Remote::Named(s.into()))
    }
}

impl From<String> for PeerInfo {
    fn from(s: String) -> Self {
        PeerInfo::new(Remote::Named(s.into()))
    }
}
