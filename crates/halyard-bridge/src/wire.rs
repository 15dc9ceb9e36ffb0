//! One MQTT connection as the bridge drives it: packets in from a read buffer, packets
//! out through a write buffer flushed after each event. The bridge speaks MQTT itself
//! (not through the client library) because it forwards packet ids and acknowledgements
//! unchanged between its two sides; see `link.rs`.

use std::io;

use halyard_codec::{BytesMut, Packet, ProtocolVersion, decode};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tracing::warn;

pub(crate) struct Wire<S> {
    io: S,
    rbuf: BytesMut,
    wbuf: BytesMut,
    pub(crate) version: ProtocolVersion,
    max_in: u32,
    /// For log lines: `local` or the remote's URL.
    pub(crate) name: String,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Wire<S> {
    pub(crate) fn new(io: S, version: ProtocolVersion, max_in: u32, name: String) -> Self {
        Wire {
            io,
            rbuf: BytesMut::with_capacity(16 * 1024),
            wbuf: BytesMut::with_capacity(16 * 1024),
            version,
            max_in,
            name,
        }
    }

    /// Queues `p` to be written at the next [`Wire::flush`]. A packet that cannot be
    /// encoded (a field over its size limit) is logged and skipped.
    pub(crate) fn send(&mut self, p: &Packet) {
        if let Err(e) = p.encode(self.version, &mut self.wbuf) {
            warn!(to = %self.name, packet = p.name(), error = %e, "bridge: packet not encodable; skipped");
        }
    }

    pub(crate) async fn flush(&mut self) -> io::Result<()> {
        if self.wbuf.is_empty() {
            return Ok(());
        }
        self.io.write_all(&self.wbuf).await?;
        self.wbuf.clear();
        self.io.flush().await
    }

    /// The next packet. Cancel-safe: what was read stays in the buffer.
    pub(crate) async fn read(&mut self) -> Result<Packet, String> {
        loop {
            match decode(&mut self.rbuf, self.version, self.max_in) {
                Ok(Some(p)) => return Ok(p),
                Ok(None) => {
                    let n = self
                        .io
                        .read_buf(&mut self.rbuf)
                        .await
                        .map_err(|e| format!("{}: {e}", self.name))?;
                    if n == 0 {
                        return Err(format!("{}: connection closed", self.name));
                    }
                }
                Err(e) => return Err(format!("{}: malformed packet: {e}", self.name)),
            }
        }
    }
}
