//! MQTT over WebSocket (RFC 6455; MQTT 5.0 section 6): the upgrade handshake for both
//! ends, and [`WsStream`], which turns binary frames back into the plain byte stream the
//! MQTT codec reads, so MQTT packets may span frames and a frame may carry several packets.
//!
//! Written here rather than taken from tungstenite: MQTT needs a byte stream, not
//! messages; payloads stream through without being buffered whole (the MQTT codec
//! already bounds packet size); and a refused upgrade (wrong path, missing `Upgrade`, a
//! disallowed `Origin`) gets a clear HTTP error response, which tungstenite's server
//! handshake does not give for every case.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use bytes::{Buf, BufMut, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};

/// The GUID of RFC 6455 section 1.3.
const ACCEPT_GUID: &str = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11";
/// Longest HTTP request/response head we read.
pub const MAX_HTTP_HEAD: usize = 8192;
/// Above this much unsent output, `poll_write` waits for the socket before taking more.
const WRITE_HIGH_WATER: usize = 64 * 1024;
/// Subprotocols we speak, in order of preference ([MQTT-6.0.0-3], `mqttv3.1` for 3.1).
pub const SUBPROTOCOLS: [&str; 2] = ["mqtt", "mqttv3.1"];

/// Which end of the connection we are: servers read masked frames and write unmasked
/// ones, clients the reverse (RFC 6455 section 5.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// The broker's side.
    Server,
    /// A client's side.
    Client,
}

/// Server settings of a `ws://`/`wss://` listener.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WsSettings {
    /// The HTTP path MQTT is served at (e.g. `/mqtt`); other paths get 404.
    pub path: String,
    /// Browser `Origin`s allowed to connect; empty allows any (and requests without one).
    pub allowed_origins: Vec<String>,
}

/// Why an upgrade was refused; the HTTP response has already been sent.
#[derive(Debug)]
pub struct UpgradeRefused {
    /// The HTTP status sent.
    pub status: u16,
    /// Why, as sent in the body.
    pub why: String,
}

impl std::fmt::Display for UpgradeRefused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "websocket upgrade refused with HTTP {}: {}",
            self.status, self.why
        )
    }
}

/// A parsed HTTP head: start line and headers (names lower-cased, repeats joined by ", ").
#[derive(Debug)]
struct Head {
    start: String,
    headers: Vec<(String, String)>,
}

impl Head {
    fn get(&self, name: &str) -> Option<String> {
        let vals: Vec<&str> = self
            .headers
            .iter()
            .filter(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
            .collect();
        (!vals.is_empty()).then(|| vals.join(", "))
    }
    fn has_token(&self, name: &str, token: &str) -> bool {
        self.get(name)
            .is_some_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
    }
}

/// Reads an HTTP head; returns it and the bytes after it.
async fn read_head<S: AsyncRead + Unpin>(s: &mut S) -> io::Result<(Head, BytesMut)> {
    let mut buf = BytesMut::with_capacity(1024);
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = buf.split_to(end + 4);
            let text = std::str::from_utf8(&head[..end]).map_err(|_| {
                io::Error::new(io::ErrorKind::InvalidData, "HTTP head is not UTF-8")
            })?;
            let mut lines = text.split("\r\n");
            let start = lines.next().unwrap_or_default().to_string();
            let mut headers = Vec::new();
            for l in lines {
                let Some((n, v)) = l.split_once(':') else {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!("malformed HTTP header line `{l}`"),
                    ));
                };
                headers.push((n.trim().to_ascii_lowercase(), v.trim().to_string()));
            }
            return Ok((Head { start, headers }, buf));
        }
        if buf.len() >= MAX_HTTP_HEAD {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("HTTP head longer than {MAX_HTTP_HEAD} bytes"),
            ));
        }
        if s.read_buf(&mut buf).await? == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "connection closed during the HTTP upgrade",
            ));
        }
    }
}

fn accept_key(key: &str) -> String {
    let d = aws_lc_rs::digest::digest(
        &aws_lc_rs::digest::SHA1_FOR_LEGACY_USE_ONLY,
        format!("{key}{ACCEPT_GUID}").as_bytes(),
    );
    B64.encode(d.as_ref())
}

/// Whether a browser from `origin` may open a WebSocket here (cross-site WebSocket
/// hijacking: a page elsewhere would use the visitor's network position and cookies).
/// With no list, only the listener's own origin (the `Origin`'s host and port are the
/// `Host`'s) and clients that send no `Origin` (not browsers: browsers always send it);
/// with a list, its origins (`*`: any).
fn origin_allowed(allowed: &[String], origin: Option<&str>, host: Option<&str>) -> bool {
    if allowed.is_empty() {
        let Some(origin) = origin else { return true };
        let authority = origin.split_once("://").map_or(origin, |(_, a)| a);
        return host.is_some_and(|h| h.eq_ignore_ascii_case(authority));
    }
    let origin = origin.unwrap_or_default();
    allowed
        .iter()
        .any(|o| o == "*" || o.eq_ignore_ascii_case(origin))
}

async fn refuse<S: AsyncWrite + Unpin>(
    s: &mut S,
    status: u16,
    reason: &str,
    extra: &str,
    why: String,
) -> io::Error {
    let body = format!("{why}\n");
    let resp = format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n{extra}\r\n{body}",
        body.len()
    );
    let _ = s.write_all(resp.as_bytes()).await;
    let _ = s.shutdown().await;
    io::Error::new(
        io::ErrorKind::InvalidData,
        UpgradeRefused { status, why }.to_string(),
    )
}

/// The server side of the upgrade. On success the `101 Switching Protocols` response has
/// been sent; on refusal an HTTP error response naming the problem has been sent and the
/// error says the same.
pub async fn accept<S: AsyncRead + AsyncWrite + Unpin>(
    mut s: S,
    cfg: &WsSettings,
) -> io::Result<WsStream<S>> {
    let (head, rest) = match read_head(&mut s).await {
        Ok(h) => h,
        Err(e) if e.kind() == io::ErrorKind::InvalidData => {
            return Err(refuse(
                &mut s,
                400,
                "Bad Request",
                "",
                format!("not an HTTP request: {e}"),
            )
            .await);
        }
        Err(e) => return Err(e),
    };
    let mut parts = head.start.split(' ');
    let (method, target, version) = (parts.next(), parts.next(), parts.next());
    let (Some(method), Some(target), Some(version)) = (method, target, version) else {
        return Err(refuse(
            &mut s,
            400,
            "Bad Request",
            "",
            format!("malformed request line `{}`", head.start),
        )
        .await);
    };
    if !version.starts_with("HTTP/1.") {
        return Err(refuse(
            &mut s,
            400,
            "Bad Request",
            "",
            format!("unsupported HTTP version `{version}`"),
        )
        .await);
    }
    let path = target.split('?').next().unwrap_or_default();
    if path != cfg.path {
        return Err(refuse(
            &mut s,
            404,
            "Not Found",
            "",
            format!(
                "no MQTT endpoint at `{path}`: MQTT over WebSocket is served at `{}`",
                cfg.path
            ),
        )
        .await);
    }
    if method != "GET" {
        return Err(refuse(
            &mut s,
            405,
            "Method Not Allowed",
            "Allow: GET\r\n",
            format!("method `{method}` not allowed: a WebSocket upgrade is a GET"),
        )
        .await);
    }
    if !head.has_token("upgrade", "websocket") || !head.has_token("connection", "upgrade") {
        return Err(refuse(
            &mut s,
            426,
            "Upgrade Required",
            "Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n",
            "this endpoint speaks MQTT over WebSocket: send `Upgrade: websocket` and `Connection: Upgrade`".into(),
        )
        .await);
    }
    if head.get("sec-websocket-version").as_deref() != Some("13") {
        return Err(refuse(
            &mut s,
            426,
            "Upgrade Required",
            "Sec-WebSocket-Version: 13\r\n",
            "only WebSocket version 13 is supported".into(),
        )
        .await);
    }
    let key = head.get("sec-websocket-key").unwrap_or_default();
    if B64.decode(key.as_bytes()).map(|k| k.len()) != Ok(16) {
        return Err(refuse(
            &mut s,
            400,
            "Bad Request",
            "",
            "missing or malformed Sec-WebSocket-Key".into(),
        )
        .await);
    }
    if !origin_allowed(
        &cfg.allowed_origins,
        head.get("origin").as_deref(),
        head.get("host").as_deref(),
    ) {
        let origin = head.get("origin").unwrap_or_default();
        return Err(refuse(
            &mut s,
            403,
            "Forbidden",
            "",
            format!("origin `{origin}` is not allowed (allowed_origins)"),
        )
        .await);
    }
    // [MQTT-6.0.0-3]/[MQTT-6.0.0-4]: select "mqtt" when offered. A client that offers
    // none is tolerated (some embedded clients omit the header); one that offers only
    // others cannot be served.
    let protocol = match head.get("sec-websocket-protocol") {
        None => None,
        Some(offered) => {
            let offered: Vec<&str> = offered.split(',').map(str::trim).collect();
            match SUBPROTOCOLS.iter().find(|p| offered.contains(p)) {
                Some(p) => Some(*p),
                None => {
                    return Err(refuse(
                        &mut s,
                        400,
                        "Bad Request",
                        "",
                        format!(
                            "none of the offered subprotocols ({}) is `mqtt`",
                            offered.join(", ")
                        ),
                    )
                    .await);
                }
            }
        }
    };
    let mut resp = format!(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {}\r\n",
        accept_key(&key)
    );
    if let Some(p) = protocol {
        resp.push_str(&format!("Sec-WebSocket-Protocol: {p}\r\n"));
    }
    resp.push_str("\r\n");
    s.write_all(resp.as_bytes()).await?;
    s.flush().await?;
    Ok(WsStream::new(s, Role::Server, rest))
}

/// The client side of the upgrade: asks for `path` on `host` with subprotocol `mqtt`.
pub async fn connect<S: AsyncRead + AsyncWrite + Unpin>(
    mut s: S,
    host: &str,
    path: &str,
    origin: Option<&str>,
) -> io::Result<WsStream<S>> {
    let mut raw = [0u8; 16];
    aws_lc_rs::rand::fill(&mut raw).map_err(|_| io::Error::other("no randomness"))?;
    let key = B64.encode(raw);
    let mut req = format!(
        "GET {path} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: mqtt\r\n"
    );
    if let Some(o) = origin {
        req.push_str(&format!("Origin: {o}\r\n"));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes()).await?;
    s.flush().await?;
    let (head, rest) = read_head(&mut s).await?;
    let status = head.start.split(' ').nth(1).unwrap_or_default();
    if status != "101" {
        return Err(io::Error::new(
            io::ErrorKind::ConnectionRefused,
            format!("websocket upgrade refused: `{}`", head.start),
        ));
    }
    if head.get("sec-websocket-accept") != Some(accept_key(&key)) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "websocket upgrade: wrong Sec-WebSocket-Accept",
        ));
    }
    Ok(WsStream::new(s, Role::Client, rest))
}

/// A WebSocket connection seen as a byte stream: reads yield the payload of binary
/// frames (continuations included), writes send binary frames. Pings are answered, the
/// close handshake is completed, and anything RFC 6455 or [MQTT-6.0.0-1] forbids (text
/// frames, unmasked client frames, unknown opcodes) closes the connection with a close
/// frame carrying the matching status code.
#[derive(Debug)]
pub struct WsStream<S> {
    inner: S,
    role: Role,
    rbuf: BytesMut,
    wbuf: BytesMut,
    /// Payload bytes of the current data frame not yet read.
    data_left: u64,
    mask: Option<[u8; 4]>,
    mask_pos: usize,
    /// A fragmented data message is open (its continuations are expected).
    in_message: bool,
    read_eof: bool,
    close_sent: bool,
}

enum Step {
    NeedMore,
    Handled,
    Closed,
}

fn apply_mask(data: &mut [u8], mask: [u8; 4], start: usize) {
    for (i, b) in data.iter_mut().enumerate() {
        *b ^= mask[(start + i) & 3];
    }
}

/// Appends one frame to `out`; `mask` is the client's masking key.
pub fn encode_frame(out: &mut BytesMut, opcode: u8, payload: &[u8], mask: Option<[u8; 4]>) {
    out.reserve(payload.len() + 14);
    out.put_u8(0x80 | opcode);
    let mbit = if mask.is_some() { 0x80 } else { 0 };
    match payload.len() {
        n @ 0..=125 => out.put_u8(mbit | n as u8),
        n @ 126..=65535 => {
            out.put_u8(mbit | 126);
            out.put_u16(n as u16);
        }
        n => {
            out.put_u8(mbit | 127);
            out.put_u64(n as u64);
        }
    }
    match mask {
        Some(m) => {
            out.put_slice(&m);
            let start = out.len();
            out.put_slice(payload);
            apply_mask(&mut out[start..], m, 0);
        }
        None => out.put_slice(payload),
    }
}

impl<S> WsStream<S> {
    /// Wraps an already upgraded connection; `buffered` holds bytes read past the
    /// handshake.
    pub fn new(inner: S, role: Role, buffered: BytesMut) -> Self {
        WsStream {
            inner,
            role,
            rbuf: buffered,
            wbuf: BytesMut::new(),
            data_left: 0,
            mask: None,
            mask_pos: 0,
            in_message: false,
            read_eof: false,
            close_sent: false,
        }
    }

    fn our_mask(&self) -> Option<[u8; 4]> {
        match self.role {
            Role::Server => None,
            Role::Client => {
                let mut m = [0u8; 4];
                let _ = aws_lc_rs::rand::fill(&mut m);
                Some(m)
            }
        }
    }

    fn queue_close(&mut self, code: Option<u16>) {
        if self.close_sent {
            return;
        }
        self.close_sent = true;
        let payload = code.map(u16::to_be_bytes);
        let mask = self.our_mask();
        encode_frame(
            &mut self.wbuf,
            0x8,
            payload.as_ref().map_or(&[][..], |p| &p[..]),
            mask,
        );
    }

    /// Fails the connection: queue a close frame with `code`, stop reading.
    fn fail(&mut self, code: u16, why: &str) -> io::Error {
        self.queue_close(Some(code));
        self.read_eof = true;
        io::Error::new(io::ErrorKind::InvalidData, format!("websocket: {why}"))
    }

    /// Consumes one frame header (and a whole control frame) from `rbuf`.
    fn parse_frame(&mut self) -> io::Result<Step> {
        let b = &self.rbuf[..];
        if b.len() < 2 {
            return Ok(Step::NeedMore);
        }
        let (fin, rsv, opcode) = (b[0] & 0x80 != 0, b[0] & 0x70, b[0] & 0x0F);
        let masked = b[1] & 0x80 != 0;
        let (len, mut hdr) = match b[1] & 0x7F {
            126 => {
                if b.len() < 4 {
                    return Ok(Step::NeedMore);
                }
                (u64::from(u16::from_be_bytes([b[2], b[3]])), 4)
            }
            127 => {
                if b.len() < 10 {
                    return Ok(Step::NeedMore);
                }
                let mut l = [0u8; 8];
                l.copy_from_slice(&b[2..10]);
                (u64::from_be_bytes(l), 10)
            }
            n => (u64::from(n), 2),
        };
        let mask = if masked {
            if b.len() < hdr + 4 {
                return Ok(Step::NeedMore);
            }
            let m = [b[hdr], b[hdr + 1], b[hdr + 2], b[hdr + 3]];
            hdr += 4;
            Some(m)
        } else {
            None
        };
        if rsv != 0 {
            return Err(self.fail(1002, "reserved bits set (no extension was negotiated)"));
        }
        if len >> 63 != 0 {
            return Err(self.fail(1002, "frame length has the top bit set"));
        }
        match (self.role, masked) {
            (Role::Server, false) => return Err(self.fail(1002, "client frame not masked")),
            (Role::Client, true) => return Err(self.fail(1002, "server frame masked")),
            _ => {}
        }
        match opcode {
            0x0 | 0x2 => {
                if opcode == 0x0 && !self.in_message {
                    return Err(self.fail(1002, "continuation frame without a message"));
                }
                if opcode == 0x2 && self.in_message {
                    return Err(self.fail(1002, "new message before the fragmented one ended"));
                }
                self.in_message = !fin;
                self.rbuf.advance(hdr);
                self.data_left = len;
                self.mask = mask;
                self.mask_pos = 0;
                Ok(Step::Handled)
            }
            // [MQTT-6.0.0-1]: MQTT travels in binary frames only.
            0x1 => Err(self.fail(
                1003,
                "text frame received; MQTT uses binary frames [MQTT-6.0.0-1]",
            )),
            0x8..=0xA => {
                if !fin || len > 125 {
                    return Err(self.fail(1002, "fragmented or oversized control frame"));
                }
                let total = hdr + len as usize;
                if self.rbuf.len() < total {
                    return Ok(Step::NeedMore);
                }
                self.rbuf.advance(hdr);
                let mut payload = self.rbuf.split_to(len as usize);
                if let Some(m) = mask {
                    apply_mask(&mut payload, m, 0);
                }
                match opcode {
                    0x9 => {
                        if !self.close_sent {
                            let mask = self.our_mask();
                            encode_frame(&mut self.wbuf, 0xA, &payload, mask);
                        }
                        Ok(Step::Handled)
                    }
                    0xA => Ok(Step::Handled),
                    _ => {
                        if payload.len() == 1 {
                            return Err(self.fail(1002, "close frame with a one-byte body"));
                        }
                        let code = (payload.len() >= 2)
                            .then(|| u16::from_be_bytes([payload[0], payload[1]]));
                        // Echo the peer's status code (RFC 6455 section 5.5.1).
                        self.queue_close(code);
                        self.read_eof = true;
                        Ok(Step::Closed)
                    }
                }
            }
            o => Err(self.fail(1002, &format!("unknown opcode {o}"))),
        }
    }
}

impl<S: AsyncWrite + Unpin> WsStream<S> {
    fn poll_drain(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while !self.wbuf.is_empty() {
            let n = ready!(Pin::new(&mut self.inner).poll_write(cx, &self.wbuf))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.wbuf.advance(n);
        }
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for WsStream<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        loop {
            // Answer pings and closes as soon as they are read, whether or not the
            // application is writing; a pending write wakes this task again.
            if !this.wbuf.is_empty()
                && let Poll::Ready(Err(e)) = this.poll_drain(cx)
            {
                return Poll::Ready(Err(e));
            }
            if this.read_eof || out.remaining() == 0 {
                return Poll::Ready(Ok(()));
            }
            if this.data_left > 0 {
                if !this.rbuf.is_empty() {
                    let n = (this.rbuf.len() as u64)
                        .min(this.data_left)
                        .min(out.remaining() as u64) as usize;
                    let mut chunk = this.rbuf.split_to(n);
                    if let Some(m) = this.mask {
                        apply_mask(&mut chunk, m, this.mask_pos);
                    }
                    out.put_slice(&chunk);
                    this.data_left -= n as u64;
                    this.mask_pos += n;
                    return Poll::Ready(Ok(()));
                }
            } else {
                match this.parse_frame() {
                    Err(e) => {
                        let _ = this.poll_drain(cx);
                        return Poll::Ready(Err(e));
                    }
                    Ok(Step::Handled) => continue,
                    Ok(Step::Closed) => continue,
                    Ok(Step::NeedMore) => {}
                }
            }
            let mut tmp = [0u8; 8192];
            let mut rb = ReadBuf::new(&mut tmp);
            ready!(Pin::new(&mut this.inner).poll_read(cx, &mut rb))?;
            if rb.filled().is_empty() {
                // The peer went away without a close frame: end of stream.
                this.read_eof = true;
                return Poll::Ready(Ok(()));
            }
            this.rbuf.extend_from_slice(rb.filled());
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for WsStream<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        if this.close_sent {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                "websocket is closing",
            )));
        }
        if this.wbuf.len() >= WRITE_HIGH_WATER {
            ready!(this.poll_drain(cx))?;
        }
        let mask = this.our_mask();
        encode_frame(&mut this.wbuf, 0x2, buf, mask);
        if let Poll::Ready(Err(e)) = this.poll_drain(cx) {
            return Poll::Ready(Err(e));
        }
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(self.poll_drain(cx))?;
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.queue_close(Some(1000));
        ready!(self.poll_drain(cx))?;
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::duplex;

    fn settings() -> WsSettings {
        WsSettings {
            path: "/mqtt".into(),
            allowed_origins: vec![],
        }
    }

    #[test]
    fn accept_key_matches_rfc6455_example() {
        // RFC 6455 section 1.3.
        assert_eq!(
            accept_key("dGhlIHNhbXBsZSBub25jZQ=="),
            "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
        );
    }

    #[tokio::test]
    async fn client_and_server_exchange_bytes_across_frames() {
        let (a, b) = duplex(64 * 1024);
        let server = tokio::spawn(async move {
            let mut ws = accept(b, &settings()).await.expect("upgrade");
            let mut got = vec![0u8; 11];
            ws.read_exact(&mut got).await.unwrap();
            ws.write_all(b"pong").await.unwrap();
            ws.flush().await.unwrap();
            got
        });
        let mut c = connect(a, "localhost", "/mqtt", None)
            .await
            .expect("client");
        // One MQTT packet split over two frames.
        c.write_all(b"hello").await.unwrap();
        c.write_all(b" world").await.unwrap();
        c.flush().await.unwrap();
        let mut back = [0u8; 4];
        c.read_exact(&mut back).await.unwrap();
        assert_eq!(&back, b"pong");
        assert_eq!(server.await.unwrap(), b"hello world");
    }

    /// Cross-site WebSocket hijacking: with no `allowed_origins`, a browser page from
    /// another origin is refused, the listener's own origin and non-browser clients (no
    /// `Origin`) are served; a list allows its origins, `*` any.
    #[test]
    fn origins_default_to_same_origin() {
        let host = Some("broker.example:8080");
        let by = |list: &[&str], origin| {
            let list: Vec<String> = list.iter().map(|o| o.to_string()).collect();
            origin_allowed(&list, origin, host)
        };
        assert!(by(&[], None));
        assert!(by(&[], Some("http://broker.example:8080")));
        assert!(by(&[], Some("https://BROKER.example:8080")));
        assert!(!by(&[], Some("http://evil.example")));
        assert!(!by(&[], Some("http://broker.example:9999")));
        assert!(!origin_allowed(
            &[],
            Some("http://broker.example:8080"),
            None
        ));
        assert!(by(&["https://app.example"], Some("https://app.example")));
        assert!(!by(
            &["https://app.example"],
            Some("http://broker.example:8080")
        ));
        assert!(by(&["*"], Some("http://any.example")));
    }

    /// A raw client: sends the upgrade, returns the response head and the stream.
    async fn raw_upgrade(
        extra: &str,
        path: &str,
    ) -> (
        String,
        tokio::io::DuplexStream,
        tokio::task::JoinHandle<io::Result<WsStream<tokio::io::DuplexStream>>>,
    ) {
        let (mut a, b) = duplex(64 * 1024);
        let server = tokio::spawn(async move {
            let cfg = WsSettings {
                path: "/mqtt".into(),
                allowed_origins: vec!["https://good.example".into()],
            };
            accept(b, &cfg).await
        });
        let req = format!("GET {path} HTTP/1.1\r\nHost: x\r\n{extra}\r\n");
        a.write_all(req.as_bytes()).await.unwrap();
        let mut resp = Vec::new();
        let mut byte = [0u8; 1];
        while !resp.ends_with(b"\r\n\r\n") {
            if a.read(&mut byte).await.unwrap() == 0 {
                break;
            }
            resp.push(byte[0]);
        }
        (String::from_utf8(resp).unwrap(), a, server)
    }

    const UPGRADE: &str = "Upgrade: websocket\r\nConnection: keep-alive, Upgrade\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nOrigin: https://good.example\r\n";

    #[tokio::test]
    async fn refusals_are_clear_http_errors() {
        let (r, _, s) = raw_upgrade(UPGRADE, "/other").await;
        assert!(r.starts_with("HTTP/1.1 404 "), "{r}");
        assert!(s.await.unwrap().unwrap_err().to_string().contains("/mqtt"));
        let (r, _, _) = raw_upgrade("Accept: */*\r\n", "/mqtt").await;
        assert!(r.starts_with("HTTP/1.1 426 "), "{r}");
        let (r, _, _) = raw_upgrade(&UPGRADE.replace("good", "evil"), "/mqtt").await;
        assert!(r.starts_with("HTTP/1.1 403 "), "{r}");
        let (r, _, _) = raw_upgrade(
            &format!("{UPGRADE}Sec-WebSocket-Protocol: chat\r\n"),
            "/mqtt",
        )
        .await;
        assert!(r.starts_with("HTTP/1.1 400 "), "{r}");
        let (r, _, _) = raw_upgrade(
            &UPGRADE.replace("dGhlIHNhbXBsZSBub25jZQ==", "short"),
            "/mqtt",
        )
        .await;
        assert!(r.starts_with("HTTP/1.1 400 "), "{r}");
    }

    #[tokio::test]
    async fn several_packets_in_one_frame_fragments_ping_and_close() {
        let (r, mut a, s) = raw_upgrade(
            &format!("{UPGRADE}Sec-WebSocket-Protocol: mqttv3.1, mqtt\r\n"),
            "/mqtt",
        )
        .await;
        assert!(r.starts_with("HTTP/1.1 101 "), "{r}");
        assert!(r.contains("Sec-WebSocket-Protocol: mqtt\r\n"), "{r}");
        assert!(
            r.contains("Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n"),
            "{r}"
        );
        let mut ws = s.await.unwrap().unwrap();
        let m = Some([1, 2, 3, 4]);
        let mut out = BytesMut::new();
        // Two PINGREQs in one binary frame, then a message fragmented into a non-final
        // binary frame, a ping between the fragments, and a final continuation.
        encode_frame(&mut out, 0x2, &[0xC0, 0x00, 0xC0, 0x00], m);
        let first = out.len();
        out.put_u8(0x02); // binary, not FIN
        out.put_u8(0x80 | 2);
        out.put_slice(&[9, 9, 9, 9]);
        let s = out.len();
        out.put_slice(&[0x30, 0x03]);
        apply_mask(&mut out[s..], [9, 9, 9, 9], 0);
        encode_frame(&mut out, 0x9, b"hi", m);
        let cont = out.len();
        encode_frame(&mut out, 0x0, &[0, 1, b'a'], m);
        out[cont] = 0x80; // FIN continuation
        assert!(first > 0);
        a.write_all(&out).await.unwrap();
        let mut got = [0u8; 9];
        ws.read_exact(&mut got).await.unwrap();
        assert_eq!(got, [0xC0, 0, 0xC0, 0, 0x30, 0x03, 0, 1, b'a']);
        // The ping was answered with an unmasked pong carrying the same payload.
        let mut pong = [0u8; 4];
        a.read_exact(&mut pong).await.unwrap();
        assert_eq!(pong, [0x8A, 2, b'h', b'i']);
        // Close: the server echoes the status code and reports end of stream.
        let mut c = BytesMut::new();
        encode_frame(&mut c, 0x8, &1000u16.to_be_bytes(), m);
        a.write_all(&c).await.unwrap();
        let mut rest = [0u8; 1];
        assert_eq!(ws.read(&mut rest).await.unwrap(), 0);
        let mut close = [0u8; 4];
        a.read_exact(&mut close).await.unwrap();
        assert_eq!(close, [0x88, 2, 0x03, 0xE8]);
    }

    #[tokio::test]
    async fn text_and_unmasked_frames_close_the_connection() {
        for (frame, code) in [
            (
                {
                    let mut b = BytesMut::new();
                    encode_frame(&mut b, 0x1, b"x", Some([0; 4]));
                    b
                },
                1003u16,
            ),
            (
                {
                    let mut b = BytesMut::new();
                    encode_frame(&mut b, 0x2, b"x", None);
                    b
                },
                1002,
            ),
        ] {
            let (_, mut a, s) = raw_upgrade(UPGRADE, "/mqtt").await;
            let mut ws = s.await.unwrap().unwrap();
            a.write_all(&frame).await.unwrap();
            let mut buf = [0u8; 8];
            assert!(ws.read(&mut buf).await.is_err());
            let mut close = [0u8; 4];
            a.read_exact(&mut close).await.unwrap();
            assert_eq!(close[..2], [0x88, 2]);
            assert_eq!(u16::from_be_bytes([close[2], close[3]]), code);
        }
    }
}
