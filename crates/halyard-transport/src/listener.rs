//! The transport registry, listeners (bind -> supervised accept loop -> per-connection
//! handshakes -> the broker) and dialers.
//!
//! Per connection the layers are: socket, optional PROXY header, optional TLS, optional
//! WebSocket. The handshakes run on a task of their own under `handshake_timeout`, so a
//! slow or silent client never holds up `accept`. A connection with no handshake to run
//! (plain TCP or a Unix socket, no PROXY header) goes to the broker from the accept loop
//! itself; the broker's CONNECT timeout covers a silent client from there.

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};
use tokio::task::JoinHandle;
use tracing::{debug, info, warn};

use crate::monitor::{Event, Monitor};
use crate::rewind::Rewind;
use crate::supervisor::{ListenerStatus, SupervisorExit, SupervisorState, supervise};
use crate::tls::{ClientTls, ReloadableTls};
use crate::url::{ListenerConfig, Url};
use crate::ws::WsSettings;

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

/// A bound listening socket.
pub trait Acceptor: Send {
    /// The next raw connection.
    fn accept(&mut self) -> BoxFuture<'_, io::Result<(BoxStream, Remote)>>;
    /// Where it listens (the real port when bound to port 0).
    fn local_addr(&self) -> String;
}

/// What a listener's handshakes need.
#[derive(Debug)]
pub struct ListenerCtx {
    /// The listener's settings.
    pub cfg: ListenerConfig,
    /// Its TLS configuration, replaceable at run time.
    pub tls: Option<Arc<ReloadableTls>>,
    /// Its WebSocket settings.
    pub ws: Option<WsSettings>,
}

/// Options for dialing out (client library, bridges, tests).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DialOptions {
    /// TLS settings for `tls://` and `wss://`.
    pub tls: ClientTls,
    /// Time allowed to connect and finish the handshakes.
    pub connect_timeout: Duration,
    /// `Origin` header sent on WebSocket upgrades.
    pub ws_origin: Option<String>,
}

impl Default for DialOptions {
    fn default() -> Self {
        DialOptions {
            tls: ClientTls::default(),
            connect_timeout: Duration::from_secs(10),
            ws_origin: None,
        }
    }
}

/// One URL scheme: how to listen and how to dial.
pub trait Transport: Send + Sync + fmt::Debug {
    /// Binds a listening socket for `cfg`.
    fn bind<'a>(&'a self, cfg: &'a ListenerConfig) -> BoxFuture<'a, io::Result<Box<dyn Acceptor>>>;
    /// Runs the server-side handshakes on an accepted stream (after any PROXY header);
    /// returns the stream MQTT runs on and the client certificate identity, if any.
    fn upgrade(
        &self,
        stream: BoxStream,
        ctx: Arc<ListenerCtx>,
    ) -> BoxFuture<'static, io::Result<(BoxStream, Option<String>)>>;
    /// Whether `upgrade` does anything. A transport without handshakes (plain TCP, Unix
    /// sockets) hands its connections to MQTT straight from the accept loop: no task, no
    /// timer and no boxed future per connection just to run a no-op.
    fn has_handshake(&self) -> bool {
        true
    }
    /// Connects to `url`.
    fn dial<'a>(
        &'a self,
        url: &'a Url,
        opts: &'a DialOptions,
    ) -> BoxFuture<'a, io::Result<BoxStream>>;
}

/// Transports keyed by URL scheme. `Registry::default()` has `tcp`, `tls`, `ws`, `wss`
/// and `unix`; embedders may register more. Listeners started through one registry share
/// its per-address limits.
#[derive(Debug, Clone)]
pub struct Registry {
    map: HashMap<String, Arc<dyn Transport>>,
    ip_limits: Option<Arc<IpLimits>>,
}

/// Per-address limits shared by every listener of a registry: connections open at once
/// from one IP address, and new connections per second from it (a token bucket with one
/// second of burst). Checked before any TLS or WebSocket handshake, so a flood costs us an
/// `accept` and a close, not a handshake; behind a PROXY header, on the client's address.
#[derive(Debug)]
pub struct IpLimits {
    max_open: usize,
    rate: f64,
    state: Mutex<HashMap<IpAddr, IpState>>,
}

#[derive(Debug)]
struct IpState {
    open: usize,
    tokens: f64,
    last: tokio::time::Instant,
}

/// Addresses tracked at once; beyond it, idle entries are forgotten.
const IP_LIMIT_TRACKED_ADDRESSES: usize = 65_536;

impl IpLimits {
    /// `max_open` connections per address (0: no limit), `rate` new connections per second
    /// per address (0: no limit).
    pub fn new(max_open: usize, rate: f64) -> Arc<IpLimits> {
        Arc::new(IpLimits {
            max_open,
            rate,
            state: Mutex::new(HashMap::new()),
        })
    }

    fn admit(self: &Arc<Self>, ip: IpAddr) -> Result<IpGuard, &'static str> {
        let now = tokio::time::Instant::now();
        let mut map = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if map.len() >= IP_LIMIT_TRACKED_ADDRESSES && !map.contains_key(&ip) {
            // An idle address's bucket is full again after a second: forgetting it is exact.
            map.retain(|_, s| s.open > 0 || now.duration_since(s.last) < Duration::from_secs(1));
        }
        let burst = self.rate.max(1.0);
        let s = map.entry(ip).or_insert(IpState {
            open: 0,
            tokens: burst,
            last: now,
        });
        if self.rate > 0.0 {
            let dt = now.duration_since(s.last).as_secs_f64();
            s.tokens = (s.tokens + dt * self.rate).min(burst);
            s.last = now;
            if s.tokens < 1.0 {
                return Err("too many new connections per second from this address");
            }
        }
        if self.max_open > 0 && s.open >= self.max_open {
            return Err("too many connections from this address");
        }
        if self.rate > 0.0 {
            s.tokens -= 1.0;
        }
        s.open += 1;
        Ok(IpGuard {
            limits: self.clone(),
            ip,
        })
    }
}

/// One open connection counted against its address.
#[derive(Debug)]
struct IpGuard {
    limits: Arc<IpLimits>,
    ip: IpAddr,
}

impl Drop for IpGuard {
    fn drop(&mut self) {
        let mut map = self.limits.state.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(s) = map.get_mut(&self.ip) {
            s.open = s.open.saturating_sub(1);
            if s.open == 0 && self.limits.rate == 0.0 {
                map.remove(&self.ip);
            }
        }
    }
}

impl Default for Registry {
    fn default() -> Self {
        let mut r = Registry::empty();
        r.register(
            "tcp",
            Arc::new(TcpStack {
                tls: false,
                ws: false,
            }),
        );
        r.register(
            "tls",
            Arc::new(TcpStack {
                tls: true,
                ws: false,
            }),
        );
        r.register(
            "ws",
            Arc::new(TcpStack {
                tls: false,
                ws: true,
            }),
        );
        r.register(
            "wss",
            Arc::new(TcpStack {
                tls: true,
                ws: true,
            }),
        );
        r.register("unix", Arc::new(Unix));
        r
    }
}

impl Registry {
    /// A registry with no transports.
    pub fn empty() -> Registry {
        Registry {
            map: HashMap::new(),
            ip_limits: None,
        }
    }

    /// Applies per-address limits to every listener started through this registry.
    pub fn with_ip_limits(mut self, limits: Arc<IpLimits>) -> Registry {
        self.ip_limits = Some(limits);
        self
    }

    /// Adds or replaces the transport for `scheme`.
    pub fn register(&mut self, scheme: &str, t: Arc<dyn Transport>) {
        self.map.insert(scheme.to_ascii_lowercase(), t);
    }

    /// The known schemes, sorted.
    pub fn schemes(&self) -> Vec<String> {
        let mut v: Vec<String> = self.map.keys().cloned().collect();
        v.sort();
        v
    }

    /// The transport for `scheme`, or an error listing the known ones.
    pub fn get(&self, scheme: &str) -> Result<Arc<dyn Transport>, String> {
        self.map.get(scheme).cloned().ok_or_else(|| {
            format!(
                "unknown scheme `{scheme}://` (known: {})",
                self.schemes().join(", ")
            )
        })
    }

    /// Connects to `url` (any registered scheme) within `opts.connect_timeout`.
    pub async fn dial(&self, url: &str, opts: &DialOptions) -> io::Result<BoxStream> {
        let u = Url::parse(url).map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        let t = self
            .get(&u.scheme)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        tokio::time::timeout(opts.connect_timeout, t.dial(&u, opts))
            .await
            .map_err(|_| {
                io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("connecting to {url} timed out"),
                )
            })?
    }
}

fn invalid(e: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, e)
}

// ---- tcp ----

#[derive(Debug)]
struct TcpAcceptor(TcpListener);

impl Acceptor for TcpAcceptor {
    fn accept(&mut self) -> BoxFuture<'_, io::Result<(BoxStream, Remote)>> {
        Box::pin(async move {
            let (s, peer) = self.0.accept().await?;
            // MQTT packets are small and latency-sensitive; the broker batches its own
            // writes, so Nagle only adds delay.
            let _ = s.set_nodelay(true);
            Ok((Box::new(s) as BoxStream, Remote::Ip(peer)))
        })
    }
    fn local_addr(&self) -> String {
        self.0
            .local_addr()
            .map_or_else(|_| "?".into(), |a| a.to_string())
    }
}

/// Connections the kernel queues for `accept` (capped by `net.core.somaxconn`). The
/// standard library's `bind` asks for 128: a burst of a few hundred connecting clients
/// (a fleet reconnecting after an outage) overflowed it, and each dropped SYN cost its
/// client a one-second retransmit (`bench conn` showed ~1% of connects at 1 s).
const LISTEN_BACKLOG: u32 = 4096;

async fn bind_tcp(cfg: &ListenerConfig) -> io::Result<Box<dyn Acceptor>> {
    let (host, port) = cfg.parsed.host_port().map_err(invalid)?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let mut last = None;
    for addr in tokio::net::lookup_host((host, port)).await? {
        let bound = (|| {
            let socket = if addr.is_ipv4() {
                tokio::net::TcpSocket::new_v4()?
            } else {
                tokio::net::TcpSocket::new_v6()?
            };
            // As `TcpListener::bind` does: a restart can reuse the port at once.
            socket.set_reuseaddr(true)?;
            socket.bind(addr)?;
            socket.listen(LISTEN_BACKLOG)
        })();
        match bound {
            Ok(l) => return Ok(Box::new(TcpAcceptor(l))),
            Err(e) => last = Some(e),
        }
    }
    Err(last.unwrap_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            "the host resolves to no address",
        )
    }))
}

async fn dial_tcp(url: &Url) -> io::Result<TcpStream> {
    let (host, port) = url.host_port().map_err(invalid)?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let s = TcpStream::connect((host, port)).await?;
    let _ = s.set_nodelay(true);
    Ok(s)
}

async fn tls_accept(
    stream: BoxStream,
    ctx: &ListenerCtx,
) -> io::Result<(BoxStream, Option<String>)> {
    let tls = ctx
        .tls
        .as_ref()
        .ok_or_else(|| io::Error::other("TLS listener without TLS settings"))?;
    let acceptor = tokio_rustls::TlsAcceptor::from(tls.current());
    let s = acceptor.accept(stream).await?;
    let identity = crate::tls::peer_identity(s.get_ref().1);
    Ok((Box::new(s), identity))
}

async fn tls_dial(url: &Url, stream: BoxStream, opts: &DialOptions) -> io::Result<BoxStream> {
    let (host, _) = url.host_port().map_err(invalid)?;
    let cfg = crate::tls::client_config(&opts.tls).map_err(invalid)?;
    let name = crate::tls::server_name(host, &opts.tls).map_err(invalid)?;
    let s = tokio_rustls::TlsConnector::from(cfg)
        .connect(name, stream)
        .await?;
    Ok(Box::new(s))
}

/// The TCP-based stacks: `tcp` (plain), `tls`, `ws` and `wss`.
#[derive(Debug)]
struct TcpStack {
    tls: bool,
    ws: bool,
}

impl Transport for TcpStack {
    fn bind<'a>(&'a self, cfg: &'a ListenerConfig) -> BoxFuture<'a, io::Result<Box<dyn Acceptor>>> {
        Box::pin(bind_tcp(cfg))
    }
    fn upgrade(
        &self,
        s: BoxStream,
        ctx: Arc<ListenerCtx>,
    ) -> BoxFuture<'static, io::Result<(BoxStream, Option<String>)>> {
        let (tls, ws) = (self.tls, self.ws);
        Box::pin(async move {
            let (s, identity) = if tls {
                tls_accept(s, &ctx).await?
            } else {
                (s, None)
            };
            if !ws {
                return Ok((s, identity));
            }
            let settings = ctx
                .ws
                .as_ref()
                .ok_or_else(|| io::Error::other("WebSocket listener without settings"))?;
            let s = crate::ws::accept(s, settings).await?;
            Ok((Box::new(s) as BoxStream, identity))
        })
    }
    fn has_handshake(&self) -> bool {
        self.tls || self.ws
    }
    fn dial<'a>(
        &'a self,
        url: &'a Url,
        opts: &'a DialOptions,
    ) -> BoxFuture<'a, io::Result<BoxStream>> {
        Box::pin(async move {
            let mut s: BoxStream = Box::new(dial_tcp(url).await?);
            if self.tls {
                s = tls_dial(url, s, opts).await?;
            }
            if self.ws {
                let path = if url.path.is_empty() {
                    "/mqtt"
                } else {
                    &url.path
                };
                let ws =
                    crate::ws::connect(s, &url.authority, path, opts.ws_origin.as_deref()).await?;
                s = Box::new(ws);
            }
            Ok(s)
        })
    }
}

// ---- unix ----

#[derive(Debug)]
struct UnixAcceptor {
    l: UnixListener,
    name: Arc<str>,
    /// The socket file, removed when the listener closes (None for abstract sockets).
    file: Option<PathBuf>,
}

impl Drop for UnixAcceptor {
    fn drop(&mut self) {
        if let Some(p) = &self.file {
            let _ = std::fs::remove_file(p);
        }
    }
}

impl Acceptor for UnixAcceptor {
    fn accept(&mut self) -> BoxFuture<'_, io::Result<(BoxStream, Remote)>> {
        Box::pin(async move {
            let (s, _) = self.l.accept().await?;
            Ok((Box::new(s) as BoxStream, Remote::Unix(self.name.clone())))
        })
    }
    fn local_addr(&self) -> String {
        self.name.to_string()
    }
}

/// Removes a socket file left by a previous run, but only if nothing answers on it
/// and it is a socket: never delete a regular file or a live broker's socket.
fn remove_stale_socket(path: &std::path::Path) -> io::Result<()> {
    use std::os::unix::fs::FileTypeExt;
    match std::fs::symlink_metadata(path) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
        Ok(m) if !m.file_type().is_socket() => Err(io::Error::new(
            io::ErrorKind::AlreadyExists,
            format!(
                "{} exists and is not a socket; not removing it",
                path.display()
            ),
        )),
        Ok(_) => match std::os::unix::net::UnixStream::connect(path) {
            Ok(_) => Err(io::Error::new(
                io::ErrorKind::AddrInUse,
                format!("another process is listening on {}", path.display()),
            )),
            Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
                info!(path = %path.display(), "removing a stale socket file");
                std::fs::remove_file(path)
            }
            Err(e) => Err(e),
        },
    }
}

fn bind_unix(cfg: &ListenerConfig) -> io::Result<Box<dyn Acceptor>> {
    let p = cfg.parsed.unix_path().map_err(invalid)?;
    if let Some(name) = p.strip_prefix('@') {
        #[cfg(target_os = "linux")]
        {
            use std::os::linux::net::SocketAddrExt;
            let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes())?;
            let l = std::os::unix::net::UnixListener::bind_addr(&addr)?;
            l.set_nonblocking(true)?;
            return Ok(Box::new(UnixAcceptor {
                l: UnixListener::from_std(l)?,
                name: p.as_str().into(),
                file: None,
            }));
        }
        #[cfg(not(target_os = "linux"))]
        return Err(io::Error::new(
            io::ErrorKind::Unsupported,
            format!("abstract socket @{name} needs Linux"),
        ));
    }
    let path = PathBuf::from(&p);
    remove_stale_socket(&path)?;
    let l = UnixListener::bind(&path)?;
    let acceptor = UnixAcceptor {
        l,
        name: p.as_str().into(),
        file: Some(path.clone()),
    };
    if let Some(mode) = cfg.socket_mode {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode))?;
    }
    Ok(Box::new(acceptor))
}

#[derive(Debug)]
struct Unix;

impl Transport for Unix {
    fn bind<'a>(&'a self, cfg: &'a ListenerConfig) -> BoxFuture<'a, io::Result<Box<dyn Acceptor>>> {
        Box::pin(async move { bind_unix(cfg) })
    }
    fn upgrade(
        &self,
        s: BoxStream,
        _: Arc<ListenerCtx>,
    ) -> BoxFuture<'static, io::Result<(BoxStream, Option<String>)>> {
        Box::pin(async move { Ok((s, None)) })
    }
    fn has_handshake(&self) -> bool {
        false
    }
    fn dial<'a>(
        &'a self,
        url: &'a Url,
        _: &'a DialOptions,
    ) -> BoxFuture<'a, io::Result<BoxStream>> {
        Box::pin(async move {
            let p = url.unix_path().map_err(invalid)?;
            if let Some(name) = p.strip_prefix('@') {
                #[cfg(target_os = "linux")]
                {
                    use std::os::linux::net::SocketAddrExt;
                    let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes())?;
                    let s = std::os::unix::net::UnixStream::connect_addr(&addr)?;
                    s.set_nonblocking(true)?;
                    return Ok(Box::new(UnixStream::from_std(s)?) as BoxStream);
                }
                #[cfg(not(target_os = "linux"))]
                return Err(io::Error::new(
                    io::ErrorKind::Unsupported,
                    format!("abstract socket @{name} needs Linux"),
                ));
            }
            Ok(Box::new(UnixStream::connect(p).await?) as BoxStream)
        })
    }
}

// ---- listeners ----

/// Called with each connection that completed its handshakes.
pub type ConnSink = Arc<dyn Fn(BoxStream, PeerInfo) + Send + Sync>;

/// Counters of one listener.
#[derive(Debug, Default)]
pub struct ListenerStats {
    /// Connections accepted (before handshakes).
    pub accepted: AtomicU64,
    /// Connections closed at once because `max_connections` was reached.
    pub refused: AtomicU64,
    /// PROXY/TLS/WebSocket handshakes that failed or timed out.
    pub handshake_failed: AtomicU64,
    /// Connections open now (handed to the broker and not yet closed).
    pub open: AtomicUsize,
}

/// Consecutive resource-exhaustion `accept` errors (EMFILE, ENFILE, ENOBUFS, ENOMEM)
/// after which the accept loop gives up and lets its supervisor restart the listener.
pub const RESOURCE_ERRORS_BEFORE_RESTART: u32 = 10;
/// First pause after a resource-exhaustion `accept` error, doubled up to
/// [`ACCEPT_BACKOFF_MAX`].
pub const ACCEPT_BACKOFF_INITIAL: Duration = Duration::from_millis(10);
/// Longest pause between failed `accept`s.
pub const ACCEPT_BACKOFF_MAX: Duration = Duration::from_secs(1);

struct Shared {
    name: Arc<str>,
    ctx: Arc<ListenerCtx>,
    transport: Arc<dyn Transport>,
    sink: ConnSink,
    monitor: Monitor,
    limit: Option<Arc<Semaphore>>,
    stats: Arc<ListenerStats>,
    state: Arc<SupervisorState>,
    local: Mutex<String>,
    ip_limits: Option<Arc<IpLimits>>,
}

impl fmt::Debug for Shared {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Listener")
            .field("name", &self.name)
            .field("stats", &self.stats)
            .finish_non_exhaustive()
    }
}

/// A connection's place in its listener: counted in the `open` gauge, holding one of
/// the listener's `max_connections` and its address's count until dropped.
struct Slot {
    _permit: Option<OwnedSemaphorePermit>,
    /// Boxed: only with per-address limits, and 24 bytes more of every connection
    /// otherwise.
    _ip: Option<Box<IpGuard>>,
    stats: Arc<ListenerStats>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.stats.open.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A connection's stream with its `Slot`.
struct Held<S> {
    inner: S,
    _slot: Slot,
}

impl Slot {
    /// `stream` with this slot, in one allocation for the most common streams: a plain
    /// TCP stream is moved out of its box (one box per connection instead of two, which
    /// is memory per idle connection); others stay boxed inside.
    fn hold(self, stream: BoxStream) -> BoxStream {
        use std::any::Any;
        // The stream's own type (through the trait object), not the box's.
        if (&*stream as &dyn Any).is::<tokio::net::TcpStream>() {
            let any: Box<dyn Any> = stream;
            match any.downcast::<tokio::net::TcpStream>() {
                Ok(tcp) => {
                    return Box::new(Held {
                        inner: *tcp,
                        _slot: self,
                    });
                }
                Err(_) => unreachable!("checked just above"),
            }
        }
        Box::new(Held {
            inner: stream,
            _slot: self,
        })
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Held<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Held<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

fn is_transient(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::Interrupted
            | io::ErrorKind::WouldBlock
    )
}

fn is_resource_exhaustion(e: &io::Error) -> bool {
    // EMFILE, ENFILE, ENOBUFS, ENOMEM
    matches!(e.raw_os_error(), Some(24 | 23 | 105 | 12))
}

impl Shared {
    fn refuse(&self, peer: &Remote, why: &'static str) {
        self.stats.refused.fetch_add(1, Ordering::Relaxed);
        debug!(listener = %self.name, %peer, why, "connection refused");
        self.monitor.emit(Event::Refused {
            listener: self.name.clone(),
            peer: peer.to_string(),
            why,
        });
    }

    /// Counts a connection against its address's limits.
    fn admit_ip(&self, remote: &Remote) -> Result<Option<IpGuard>, &'static str> {
        match (&self.ip_limits, remote) {
            (Some(l), Remote::Ip(a)) => l.admit(a.ip()).map(Some),
            _ => Ok(None),
        }
    }

    /// Hands a connection whose handshakes are done to MQTT.
    fn open(
        &self,
        stream: BoxStream,
        remote: Remote,
        proxy: Option<Remote>,
        tls_identity: Option<String>,
        permit: Option<OwnedSemaphorePermit>,
        ip_guard: Option<IpGuard>,
    ) {
        self.stats.open.fetch_add(1, Ordering::Relaxed);
        let stream = Slot {
            _permit: permit,
            _ip: ip_guard.map(Box::new),
            stats: self.stats.clone(),
        }
        .hold(stream);
        let peer = PeerInfo {
            remote,
            listener: self.name.clone(),
            proxy,
            tls_identity,
            identity_as_username: self.ctx.cfg.use_identity_as_username,
            allow_anonymous: self.ctx.cfg.allow_anonymous,
        };
        (self.sink)(stream, peer);
    }

    fn handle(self: &Arc<Self>, stream: BoxStream, remote: Remote) {
        self.stats.accepted.fetch_add(1, Ordering::Relaxed);
        // Behind a PROXY header the socket's address is the proxy's: check after it.
        let mut ip_guard = None;
        if self.ctx.cfg.proxy_protocol
            && !self.ctx.cfg.trusted_proxies.is_empty()
            && let Remote::Ip(a) = &remote
            && !self
                .ctx
                .cfg
                .trusted_proxies
                .iter()
                .any(|c| c.contains(a.ip()))
        {
            // Its header would choose the client address every limit and log believes.
            return self.refuse(&remote, "not a trusted proxy (trusted_proxies)");
        }
        if !self.ctx.cfg.proxy_protocol {
            match self.admit_ip(&remote) {
                Ok(g) => ip_guard = g,
                Err(why) => return self.refuse(&remote, why),
            }
        }
        let permit = match &self.limit {
            Some(sem) => match sem.clone().try_acquire_owned() {
                Ok(p) => Some(p),
                Err(_) => {
                    return self.refuse(&remote, "the listener's max_connections is reached");
                }
            },
            None => None,
        };
        self.monitor.emit_conn(|| Event::Accepted {
            listener: self.name.clone(),
            peer: remote.to_string(),
        });
        if !self.ctx.cfg.proxy_protocol && !self.transport.has_handshake() {
            return self.open(stream, remote, None, None, permit, ip_guard);
        }
        let me = self.clone();
        tokio::spawn(async move {
            // Formatted only if the handshake fails (see `Monitor::emit_conn`).
            let shown = remote.clone();
            let work = async {
                let (mut stream, mut remote, mut proxy) = (stream, remote, None);
                if me.ctx.cfg.proxy_protocol {
                    let (h, rest) = crate::proxy::read_header(&mut stream).await?;
                    if let crate::proxy::ProxyHeader::Proxied { source, .. } = h {
                        proxy = Some(std::mem::replace(&mut remote, Remote::Ip(source)));
                    }
                    match me.admit_ip(&remote) {
                        Ok(g) => ip_guard = g,
                        Err(why) => {
                            me.refuse(&remote, why);
                            return Err(io::Error::other(why));
                        }
                    }
                    stream = Box::new(Rewind::new(rest, stream));
                }
                let (stream, identity) = me.transport.upgrade(stream, me.ctx.clone()).await?;
                Ok::<_, io::Error>((stream, remote, proxy, identity))
            };
            let r = match tokio::time::timeout(me.ctx.cfg.handshake_timeout, work).await {
                Ok(r) => r,
                Err(_) => Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "handshake timed out",
                )),
            };
            match r {
                Ok((stream, remote, proxy, tls_identity)) => {
                    me.open(stream, remote, proxy, tls_identity, permit, ip_guard);
                }
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
                    // Closed before the handshake ended: port probes and health checks
                    // do this all day; counted, not reported as a failure.
                    me.stats.handshake_failed.fetch_add(1, Ordering::Relaxed);
                    debug!(listener = %me.name, peer = %shown, error = %e, "closed during the handshake");
                }
                Err(e) => {
                    me.stats.handshake_failed.fetch_add(1, Ordering::Relaxed);
                    debug!(listener = %me.name, peer = %shown, error = %e, "handshake failed");
                    me.monitor.emit(Event::HandshakeFailed {
                        listener: me.name.clone(),
                        peer: shown.to_string(),
                        error: e.to_string(),
                    });
                }
            }
        });
    }

    /// Accepts until shutdown (`Ok`) or a failure the supervisor should handle (`Err`).
    async fn accept_loop(
        self: Arc<Self>,
        mut acceptor: Box<dyn Acceptor>,
        mut shutdown: watch::Receiver<bool>,
    ) -> io::Result<()> {
        let mut backoff = ACCEPT_BACKOFF_INITIAL;
        let mut resource_errors = 0u32;
        if *shutdown.borrow_and_update() {
            return Ok(());
        }
        loop {
            let r = tokio::select! {
                _ = shutdown.changed() => return Ok(()),
                r = acceptor.accept() => r,
            };
            match r {
                Ok((stream, remote)) => {
                    backoff = ACCEPT_BACKOFF_INITIAL;
                    resource_errors = 0;
                    self.handle(stream, remote);
                }
                Err(e) if is_transient(&e) => {
                    debug!(listener = %self.name, error = %e, "accept: transient error");
                }
                Err(e) if is_resource_exhaustion(&e) => {
                    resource_errors += 1;
                    if resource_errors >= RESOURCE_ERRORS_BEFORE_RESTART {
                        return Err(io::Error::new(
                            e.kind(),
                            format!("accept failed {resource_errors} times in a row: {e}"),
                        ));
                    }
                    // Out of descriptors: pause instead of spinning, mini-redis style.
                    warn!(listener = %self.name, error = %e, backoff_ms = backoff.as_millis() as u64, "accept failed; backing off");
                    tokio::select! {
                        _ = shutdown.changed() => return Ok(()),
                        _ = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(ACCEPT_BACKOFF_MAX);
                }
                Err(e) => return Err(e),
            }
        }
    }

    fn reload_tls(&self, force: bool) -> Result<bool, String> {
        let Some(tls) = &self.ctx.tls else {
            return Ok(false);
        };
        let r = if force {
            tls.reload().map(|()| true)
        } else {
            tls.reload_if_changed()
        };
        match &r {
            Ok(true) => {
                self.monitor.emit(Event::TlsReloaded {
                    listener: self.name.clone(),
                });
            }
            Ok(false) => {}
            Err(e) => {
                self.monitor.emit(Event::TlsReloadFailed {
                    listener: self.name.clone(),
                    error: e.clone(),
                });
            }
        }
        r
    }
}

/// A running, supervised listener.
#[derive(Debug)]
pub struct ListenerHandle {
    shared: Arc<Shared>,
    task: JoinHandle<SupervisorExit>,
}

impl ListenerHandle {
    /// The listener's URL.
    pub fn name(&self) -> &str {
        &self.shared.name
    }
    /// Where it listens now.
    pub fn local_addr(&self) -> String {
        self.shared
            .local
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
    /// Its supervisor's view.
    pub fn status(&self) -> ListenerStatus {
        self.shared.state.status()
    }
    /// Restarts so far.
    pub fn restarts(&self) -> u32 {
        self.shared.state.restarts()
    }
    /// Its counters.
    pub fn stats(&self) -> &ListenerStats {
        &self.shared.stats
    }
    /// Reloads the TLS files now (SIGHUP). `Ok(false)` for a listener without TLS; on
    /// `Err` the previous files stay in use.
    pub fn reload_tls(&self) -> Result<bool, String> {
        self.shared.reload_tls(true)
    }
    /// Waits for the listener to stop (shutdown, or given up by its supervisor).
    pub async fn join(self) -> SupervisorExit {
        self.task.await.unwrap_or(SupervisorExit::Failed)
    }
}

/// Binds `cfg`'s listener (a failure here is returned, for the caller to report at
/// start-up) and runs it under a supervisor until `shutdown`. Each connection that
/// completes its handshakes goes to `sink`.
pub async fn start_listener(
    registry: &Registry,
    cfg: ListenerConfig,
    monitor: Monitor,
    shutdown: watch::Receiver<bool>,
    sink: ConnSink,
) -> Result<ListenerHandle, String> {
    cfg.validate().map_err(|e| format!("{}: {e}", cfg.url))?;
    if cfg.proxy_protocol && cfg.trusted_proxies.is_empty() && cfg.parsed.scheme != "unix" {
        warn!(listener = %cfg.url, "proxy_protocol without trusted_proxies: any peer that reaches this listener can claim any client address");
    }
    let transport = registry.get(&cfg.parsed.scheme)?;
    let tls = match cfg.tls.clone() {
        Some(files) => Some(Arc::new(
            ReloadableTls::load(files).map_err(|e| format!("{}: {e}", cfg.url))?,
        )),
        None => None,
    };
    let ws = matches!(cfg.parsed.scheme.as_str(), "ws" | "wss").then(|| WsSettings {
        path: cfg.ws_path(),
        allowed_origins: cfg.allowed_origins.clone(),
    });
    let acceptor = transport
        .bind(&cfg)
        .await
        .map_err(|e| format!("cannot listen on {}: {e}", cfg.url))?;
    let name: Arc<str> = cfg.url.as_str().into();
    let limit = (cfg.max_connections > 0).then(|| {
        Arc::new(Semaphore::new(
            cfg.max_connections.min(Semaphore::MAX_PERMITS),
        ))
    });
    let policy = cfg.restart;
    let reload_every = cfg.tls_reload_interval;
    let shared = Arc::new(Shared {
        name: name.clone(),
        ctx: Arc::new(ListenerCtx { cfg, tls, ws }),
        transport,
        sink,
        monitor: monitor.clone(),
        limit,
        stats: Arc::default(),
        state: Arc::new(SupervisorState::default()),
        local: Mutex::new(acceptor.local_addr()),
        ip_limits: registry.ip_limits.clone(),
    });
    monitor.emit(Event::Listening {
        listener: name.clone(),
        local: acceptor.local_addr(),
    });
    let first = Mutex::new(Some(acceptor));
    let s2 = shared.clone();
    let sd = shutdown.clone();
    let task = tokio::spawn(supervise(
        name,
        policy,
        monitor,
        shared.state.clone(),
        shutdown.clone(),
        move |_attempt| {
            let me = s2.clone();
            let sd = sd.clone();
            let prebound = first.lock().unwrap_or_else(|e| e.into_inner()).take();
            async move {
                let acceptor = match prebound {
                    Some(a) => a,
                    None => {
                        let a = me.transport.bind(&me.ctx.cfg).await?;
                        *me.local.lock().unwrap_or_else(|e| e.into_inner()) = a.local_addr();
                        me.monitor.emit(Event::Listening {
                            listener: me.name.clone(),
                            local: a.local_addr(),
                        });
                        a
                    }
                };
                me.accept_loop(acceptor, sd).await
            }
        },
    ));
    if shared.ctx.tls.is_some() && !reload_every.is_zero() {
        let weak = Arc::downgrade(&shared);
        let mut sd = shutdown;
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = sd.changed() => break,
                    _ = tokio::time::sleep(reload_every) => {}
                }
                let Some(s) = weak.upgrade() else { break };
                let _ = s.reload_tls(false);
            }
        });
    }
    Ok(ListenerHandle { shared, task })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Fails `accept` with the errors in `script`, then with `last` forever.
    struct Scripted {
        script: Vec<i32>,
        last: i32,
    }

    impl Acceptor for Scripted {
        fn accept(&mut self) -> BoxFuture<'_, io::Result<(BoxStream, Remote)>> {
            let code = if self.script.is_empty() {
                self.last
            } else {
                self.script.remove(0)
            };
            Box::pin(async move { Err(io::Error::from_raw_os_error(code)) })
        }
        fn local_addr(&self) -> String {
            "scripted".into()
        }
    }

    fn shared() -> Arc<Shared> {
        let cfg = ListenerConfig::from_url("tcp://127.0.0.1:0").unwrap();
        Arc::new(Shared {
            name: "test".into(),
            ctx: Arc::new(ListenerCtx {
                cfg,
                tls: None,
                ws: None,
            }),
            transport: Registry::default().get("tcp").unwrap(),
            sink: Arc::new(|_, _| {}),
            monitor: Monitor::default(),
            limit: None,
            stats: Arc::default(),
            state: Arc::default(),
            local: Mutex::new(String::new()),
            ip_limits: None,
        })
    }

    #[tokio::test(start_paused = true)]
    async fn persistent_emfile_ends_the_accept_loop_after_backing_off() {
        let (_tx, rx) = watch::channel(false);
        // Transient errors (ECONNABORTED, EINTR) are skipped without a pause; then EMFILE
        // forever: ten attempts with 10, 20, ... 1000 ms pauses between them.
        let a = Scripted {
            script: vec![103, 4, 103],
            last: 24,
        };
        let t0 = tokio::time::Instant::now();
        let e = shared().accept_loop(Box::new(a), rx).await.unwrap_err();
        assert!(e.to_string().contains("10 times in a row"), "{e}");
        let waited: u64 = [10, 20, 40, 80, 160, 320, 640, 1000, 1000].iter().sum();
        assert_eq!(t0.elapsed(), Duration::from_millis(waited));
    }

    #[tokio::test(start_paused = true)]
    async fn shutdown_ends_the_accept_loop_during_its_backoff() {
        let (tx, rx) = watch::channel(false);
        let s = shared();
        let task = tokio::spawn(s.accept_loop(
            Box::new(Scripted {
                script: vec![],
                last: 24,
            }),
            rx,
        ));
        tokio::time::sleep(Duration::from_millis(100)).await;
        tx.send(true).unwrap();
        assert!(task.await.unwrap().is_ok());
    }
}
