//! Listeners (bind -> supervised accept loop -> per-connection
//! handshakes -> the broker): a supervised accept loop per
//! listener.
//!
//! Per connection the layers are: socket, optional PROXY header, optional TLS, optional
//! WebSocket. The handshakes run on a task of their own under `handshake_timeout`, so a
//! slow or silent client never holds up `accept`. A connection with no handshake to run
//! (plain TCP or a Unix socket, no PROXY header) goes to the broker from the accept loop
//! itself; the broker's CONNECT timeout covers a silent client from there.

use std::fmt;
use std::io;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};
use tokio::task::JoinHandle;
use tracing::{debug, warn};

use crate::monitor::{Event, Monitor};
use crate::peer::*;
use crate::registry::*;
use crate::rewind::Rewind;
use crate::supervisor::{ListenerStatus, SupervisorExit, SupervisorState, supervise};
use crate::tls::ReloadableTls;
use crate::transport::*;
use crate::url::ListenerConfig;
use crate::ws::WsSettings;

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

pub(crate) struct Shared {
    pub(crate) name: Arc<str>,
    pub(crate) ctx: Arc<ListenerCtx>,
    pub(crate) transport: Arc<dyn Transport>,
    pub(crate) sink: ConnSink,
    pub(crate) monitor: Monitor,
    pub(crate) limit: Option<Arc<Semaphore>>,
    pub(crate) stats: Arc<ListenerStats>,
    pub(crate) state: Arc<SupervisorState>,
    pub(crate) local: Mutex<String>,
    pub(crate) ip_limits: Option<Arc<IpLimits>>,
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
pub(crate) struct Slot {
    pub(crate) _permit: Option<OwnedSemaphorePermit>,
    /// Boxed: only with per-address limits, and 24 bytes more of every connection
    /// otherwise.
    pub(crate) _ip: Option<Box<IpGuard>>,
    pub(crate) stats: Arc<ListenerStats>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.stats.open.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A connection's stream with its `Slot`.
pub(crate) struct Held<S> {
    pub(crate) inner: S,
    pub(crate) _slot: Slot,
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

crate::forward::forward_read!(Held, inner);
crate::forward::forward_write!(Held, inner);

pub(crate) fn is_transient(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::Interrupted
            | io::ErrorKind::WouldBlock
    )
}

pub(crate) fn is_resource_exhaustion(e: &io::Error) -> bool {
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
    pub(crate) shared: Arc<Shared>,
    pub(crate) task: JoinHandle<SupervisorExit>,
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
