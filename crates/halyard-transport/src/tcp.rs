//! `tcp://` and `tls://`: TCP listeners and dialers, TLS on top.

use std::io;
use std::sync::Arc;

use tokio::net::{TcpListener, TcpStream};

use crate::peer::*;
use crate::transport::*;
use crate::url::{ListenerConfig, Url};

#[derive(Debug)]
pub(crate) struct TcpAcceptor(TcpListener);

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
pub(crate) const LISTEN_BACKLOG: u32 = 4096;

pub(crate) async fn bind_tcp(cfg: &ListenerConfig) -> io::Result<Box<dyn Acceptor>> {
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

pub(crate) async fn dial_tcp(url: &Url) -> io::Result<TcpStream> {
    let (host, port) = url.host_port().map_err(invalid)?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let s = TcpStream::connect((host, port)).await?;
    let _ = s.set_nodelay(true);
    Ok(s)
}

pub(crate) async fn tls_accept(
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

pub(crate) async fn tls_dial(
    url: &Url,
    stream: BoxStream,
    opts: &DialOptions,
) -> io::Result<BoxStream> {
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
pub(crate) struct TcpStack {
    pub(crate) tls: bool,
    pub(crate) ws: bool,
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
