//! What a transport is (`Transport`, `Acceptor`), what its listeners and dialers are
//! given, and the per-address connection limits every listener checks.

use std::collections::HashMap;
use std::fmt;
use std::io;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::peer::*;
use crate::tls::{ClientTls, ReloadableTls};
use crate::url::{ListenerConfig, Url};
use crate::ws::WsSettings;

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

/// Per-address limits shared by every listener of a registry: connections open at once
/// from one IP address, and new connections per second from it (a token bucket with one
/// second of burst). Checked before any TLS or WebSocket handshake, so a flood costs us an
/// `accept` and a close, not a handshake; behind a PROXY header, on the client's address.
#[derive(Debug)]
pub struct IpLimits {
    pub(crate) max_open: usize,
    pub(crate) rate: f64,
    pub(crate) state: Mutex<HashMap<IpAddr, IpState>>,
}

#[derive(Debug)]
pub(crate) struct IpState {
    pub(crate) open: usize,
    pub(crate) tokens: f64,
    pub(crate) last: tokio::time::Instant,
}

/// Addresses tracked at once; beyond it, idle entries are forgotten.
pub(crate) const IP_LIMIT_TRACKED_ADDRESSES: usize = 65_536;

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

    pub(crate) fn admit(self: &Arc<Self>, ip: IpAddr) -> Result<IpGuard, &'static str> {
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
pub(crate) struct IpGuard {
    pub(crate) limits: Arc<IpLimits>,
    pub(crate) ip: IpAddr,
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

pub(crate) fn invalid(e: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, e)
}
