//! How a connection ends: why (`End`), the last packet, the linger that keeps it from
//! being lost to a RST, and the session detach.

use std::time::Duration;

use halyard_codec::{BytesMut, Disconnect, Packet, Properties, ProtocolVersion, ReasonCode};
use halyard_transport::Event;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::time::timeout;
use tracing::info;

use super::*;
use crate::lifecycle::detach;
use crate::stats::Stats;

/// Why a connection ended; decides the will and the log line.
#[derive(Debug, Clone, Copy)]
pub(crate) enum End {
    /// DISCONNECT from the client with this reason (0x04 keeps the will).
    ClientDisconnect(ReasonCode),
    /// The peer closed the socket or it failed.
    Closed(&'static str),
    /// We closed it, telling a v5 client why.
    Server(Violation),
}

/// A refusal by the server: the reason code sent (CONNACK or DISCONNECT), the rule it
/// enforces (a normative statement, a spec section, or the setting that sets the limit;
/// empty when neither applies), and what the client did. The broker's counterpart of the
/// codec's `DecodeError`; shown as `detail [rule]` in the reason string and the log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Violation {
    pub(crate) reason: ReasonCode,
    pub(crate) rule: &'static str,
    pub(crate) detail: &'static str,
}

impl Violation {
    pub(crate) const fn new(reason: ReasonCode, rule: &'static str, detail: &'static str) -> Self {
        Violation {
            reason,
            rule,
            detail,
        }
    }
}

impl std::fmt::Display for Violation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.rule.is_empty() {
            f.write_str(self.detail)
        } else {
            write!(f, "{} [{}]", self.detail, self.rule)
        }
    }
}

impl From<&halyard_codec::DecodeError> for Violation {
    fn from(e: &halyard_codec::DecodeError) -> Self {
        Violation::new(e.reason_code(), e.rule, e.detail)
    }
}

/// Writes `p` as the last packet of a connection, then closes it as [`linger`] does.
pub(super) async fn write_now<S: AsyncRead + AsyncWrite + Unpin>(
    io: &mut S,
    p: &Packet,
    v: ProtocolVersion,
) {
    let mut buf = BytesMut::new();
    if p.encode(v, &mut buf).is_ok() {
        let _ = timeout(CLOSE_FLUSH_TIMEOUT, io.write_all(&buf)).await;
        linger(io).await;
    }
}

/// How long, and for how many bytes, a connection we close reads what its client still
/// sends (see `linger`).
pub(super) const LINGER: Duration = Duration::from_secs(1);
pub(super) const LINGER_BYTES: usize = 64 * 1024;

/// Ends a connection whose last packet (a refusing CONNACK, a DISCONNECT) was written:
/// shuts down our write side, then reads and discards until the client closes, for at most
/// `LINGER` and `LINGER_BYTES`. Closing a socket with unread input makes the kernel send a
/// RST, which can destroy that last packet before the client reads it: a client that kept
/// writing (more QoS 2 PUBLISHes past Receive Maximum) would see "broken pipe", never the
/// reason. Its buffer is on the heap, made only when it runs: on the stack it made every
/// future that may call this (the handshake's, boxed per connection) 4 KiB larger, and
/// idle connections 60-80 bytes each through the allocator.
pub(super) async fn linger<S: AsyncRead + AsyncWrite + Unpin>(io: &mut S) {
    let _ = timeout(CLOSE_FLUSH_TIMEOUT, io.shutdown()).await;
    let mut sink = vec![0u8; 4096];
    let mut left = LINGER_BYTES;
    let _ = timeout(LINGER, async {
        while left > 0 {
            match io.read(&mut sink).await {
                Ok(0) | Err(_) => break,
                Ok(n) => left = left.saturating_sub(n),
            }
        }
    })
    .await;
}

impl<S> Connection<S>
where
    S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    /// Borrows the connection rather than taking it: a `self` moved into this future
    /// would be a second copy of the connection in every connection task's state.
    pub(super) async fn finish(&mut self, end: End) {
        self.proto.last_words(&end);
        let _ = timeout(CLOSE_FLUSH_TIMEOUT, async {
            while !self.proto.wbuf.is_empty() {
                if self.io.write_buf(&mut self.proto.wbuf).await.unwrap_or(0) == 0 {
                    break;
                }
            }
        })
        .await;
        let lost = matches!(end, End::Closed(_));
        self.proto.leave(&end, Instant::now());
        // Last, once the session and will are settled: a client we close (DISCONNECT
        // sent, or 3.x closed on an error) is read until it closes too, so our last packet
        // is not lost to a RST. One that closed first has nothing more to read.
        if lost {
            let _ = timeout(CLOSE_FLUSH_TIMEOUT, self.io.shutdown()).await;
        } else {
            linger(&mut self.io).await;
        }
    }
}

impl Proto {
    /// What is written before the close: what may be written of `wbuf` and, to a v5
    /// client the server closes, a DISCONNECT saying why [MQTT-4.13.2-1] (3.x just gets
    /// the close).
    pub(crate) fn last_words(&mut self, end: &End) {
        // QoS 2 PUBLISHes whose packet ids are not durable are not sent: the session keeps
        // them in flight and resends them (same ids, DUP) on the next connection.
        if self.has_holds() {
            let writable = self.writable_len();
            self.wbuf.truncate(writable);
        }
        if let End::Server(why) = end
            && self.version.is_v5()
        {
            let props = Properties {
                reason_string: Some(why.to_string().into()),
                ..Properties::default()
            };
            self.send(&Packet::Disconnect(Disconnect {
                reason: why.reason,
                properties: props,
            }));
        }
    }

    /// Leaves the session at `now`, the connection closed for `end`: counted, told to the
    /// monitor, logged; the will published, delayed or dropped [MQTT-3.1.2-8, MQTT-3.1.2-10];
    /// the session ended or its expiry started.
    pub(crate) fn leave(&mut self, end: &End, now: Instant) {
        Stats::dec(&self.inner.stats.connections_current);
        self.flags.set(Flags::FINISHED, true);
        self.inner.monitor.emit_conn(|| Event::Disconnected {
            peer: self.info.peer.to_string(),
            client_id: self.at.session.client_id.to_string(),
            reason: match &end {
                End::ClientDisconnect(r) => format!("client DISCONNECT {r:?}"),
                End::Closed(why) => format!("connection lost: {why}"),
                End::Server(why) => format!("closed by the server {:?}: {why}", why.reason),
            },
        });
        let keep_will = match end {
            End::ClientDisconnect(ReasonCode::DisconnectWithWillMessage) => true,
            End::ClientDisconnect(_) => false, // [MQTT-3.1.2-10] normal DISCONNECT drops it
            End::Closed(_) | End::Server(..) => true,
        };
        let (will, will_delay) = self.take_will();
        let will = will.filter(|_| keep_will);
        match &end {
            End::ClientDisconnect(r) => {
                info!(peer = %self.info.peer, client_id = %self.at.session.client_id, reason = ?r, "client disconnected")
            }
            End::Closed(why) => {
                info!(peer = %self.info.peer, client_id = %self.at.session.client_id, why, "connection lost")
            }
            End::Server(why) => {
                info!(peer = %self.info.peer, client_id = %self.at.session.client_id, reason = ?why.reason, %why, "disconnected by server")
            }
        }
        detach(
            &self.inner,
            &self.at.session,
            self.at.conn_id,
            will,
            will_delay,
            now,
        );
    }
}
