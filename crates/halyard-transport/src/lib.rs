//! Listeners that accept connections and hand them on. The broker never sees a socket
//! type: it takes any `AsyncRead + AsyncWrite`.
#![forbid(unsafe_code)]

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tracing::{info, warn};

/// First pause after a failed `accept`, doubled on each further failure.
pub const ACCEPT_BACKOFF_INITIAL: Duration = Duration::from_millis(10);
/// Longest pause between failed `accept`s.
pub const ACCEPT_BACKOFF_MAX: Duration = Duration::from_secs(1);

/// Accepts TCP connections until `shutdown` turns true, handing each to `on_conn`.
///
/// An `accept` error (EMFILE when out of file descriptors, ECONNABORTED, ...) does not end
/// the listener: it pauses with exponential backoff, so a full descriptor table is not a
/// busy loop, and resets the backoff after the next success (mini-redis' pattern).
pub async fn serve_tcp<F>(
    listener: TcpListener,
    mut shutdown: watch::Receiver<bool>,
    mut on_conn: F,
) where
    F: FnMut(TcpStream, SocketAddr),
{
    let local = listener.local_addr().ok();
    let mut backoff = ACCEPT_BACKOFF_INITIAL;
    if *shutdown.borrow_and_update() {
        return;
    }
    loop {
        tokio::select! {
            _ = shutdown.changed() => break,
            r = listener.accept() => match r {
                Ok((stream, peer)) => {
                    backoff = ACCEPT_BACKOFF_INITIAL;
                    // MQTT packets are small and latency-sensitive; we batch writes
                    // ourselves, so Nagle only adds delay.
                    let _ = stream.set_nodelay(true);
                    on_conn(stream, peer);
                }
                Err(e) => {
                    warn!(listener = ?local, error = %e, backoff_ms = backoff.as_millis() as u64, "accept failed; backing off");
                    tokio::select! {
                        _ = shutdown.changed() => break,
                        _ = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(ACCEPT_BACKOFF_MAX);
                }
            }
        }
    }
    info!(listener = ?local, "listener stopped");
}

/// Binds a TCP listener, naming the address in the error.
pub async fn bind_tcp(addr: &str) -> io::Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .map_err(|e| io::Error::new(e.kind(), format!("cannot listen on tcp://{addr}: {e}")))
}
