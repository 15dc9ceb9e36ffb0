//! Test helpers: an in-process broker on an ephemeral loopback port (or over in-memory
//! pipes for paused-time tests) and a raw-wire client that sends exact bytes and reads
//! packets back, for behaviour a client library would hide.
#![forbid(unsafe_code)]

pub mod pki;
pub mod procs;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use halyard_broker::{Broker, BrokerConfig};
use halyard_codec::{BytesMut, DecodeError, MAX_PACKET_SIZE, Packet, ProtocolVersion, decode};
use halyard_store::{MemoryStore, Store};
use halyard_transport::{ListenerConfig, ListenerHandle, Registry, start_listener};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, DuplexStream};
use tokio::net::TcpStream;

/// How long test reads wait before failing: generous, tests poll for conditions.
pub const RECV_TIMEOUT: Duration = Duration::from_secs(5);

/// A broker listening on `127.0.0.1:0`, stopped when dropped (its tasks end with the
/// test's runtime).
#[derive(Debug)]
pub struct TestBroker {
    /// The broker handle.
    pub broker: Broker,
    /// Where it listens.
    pub addr: SocketAddr,
    /// The store it uses (share it with a second broker to test restarts).
    pub store: Arc<MemoryStore>,
    /// Its supervised `tcp://127.0.0.1:0` listener.
    pub listener: ListenerHandle,
}

impl TestBroker {
    /// Starts a broker with default settings.
    pub async fn start() -> TestBroker {
        Self::with_config(BrokerConfig::default()).await
    }

    /// Starts a broker with these settings and a fresh memory store.
    pub async fn with_config(cfg: BrokerConfig) -> TestBroker {
        Self::with_store(cfg, Arc::new(MemoryStore::new())).await
    }

    /// Starts a broker on an existing store (to check what survives a restart).
    pub async fn with_store(cfg: BrokerConfig, store: Arc<MemoryStore>) -> TestBroker {
        let broker = Broker::new(cfg, store.clone() as Arc<dyn Store>);
        let listener = listen(&broker, "tcp://127.0.0.1:0").await;
        let addr = listener.local_addr().parse().expect("a socket address");
        TestBroker {
            broker,
            addr,
            store,
            listener,
        }
    }

    /// Adds a listener (any scheme, options as URL query parameters).
    pub async fn listen(&self, url: &str) -> ListenerHandle {
        listen(&self.broker, url).await
    }

    /// A raw client over TCP.
    pub async fn raw(&self) -> RawClient<TcpStream> {
        RawClient::new(TcpStream::connect(self.addr).await.expect("connect"))
    }

    /// `host:port` for client libraries.
    pub fn host_port(&self) -> (String, u16) {
        (self.addr.ip().to_string(), self.addr.port())
    }
}

/// Starts a supervised listener for `url` feeding `broker`.
pub async fn listen(broker: &Broker, url: &str) -> ListenerHandle {
    let cfg = ListenerConfig::from_url(url).expect("listener URL");
    let b = broker.clone();
    start_listener(
        &Registry::default(),
        cfg,
        broker.monitor().clone(),
        broker.shutdown_signal(),
        Arc::new(move |s, peer| b.spawn_connection(s, peer)),
    )
    .await
    .expect("listener starts")
}

/// A raw client over an in-memory pipe to `broker` (works with paused time).
pub fn raw_duplex(broker: &Broker) -> RawClient<DuplexStream> {
    let (a, b) = tokio::io::duplex(64 * 1024);
    broker.spawn_connection(b, "duplex");
    RawClient::new(a)
}

/// What a raw read produced. (Test-only: the size difference between variants is fine.)
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub enum Recv {
    /// A packet.
    Packet(Packet),
    /// The broker closed the connection.
    Closed,
    /// Nothing within the timeout.
    Timeout,
    /// Bytes we could not decode.
    Bad(DecodeError),
}

/// Sends bytes and packets, reads packets, with a protocol version for decoding.
#[derive(Debug)]
pub struct RawClient<S> {
    stream: S,
    buf: BytesMut,
    /// Version used to decode what the broker sends.
    pub version: ProtocolVersion,
}

impl<S: AsyncRead + AsyncWrite + Unpin> RawClient<S> {
    /// Wraps a connected stream (decoding as v5 until told otherwise).
    pub fn new(stream: S) -> Self {
        RawClient {
            stream,
            buf: BytesMut::new(),
            version: ProtocolVersion::V5,
        }
    }

    /// Writes raw bytes.
    pub async fn send_bytes(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).await.expect("write");
        // TLS and WebSocket streams buffer; plain sockets ignore this.
        self.stream.flush().await.expect("flush");
    }

    /// Writes a hex string (spaces allowed).
    pub async fn send_hex(&mut self, hex: &str) {
        self.send_bytes(&hex_bytes(hex)).await;
    }

    /// Encodes and writes a packet in `self.version` (CONNECT in its own).
    pub async fn send(&mut self, p: &Packet) {
        let v = match p {
            Packet::Connect(c) => c.protocol,
            _ => self.version,
        };
        let mut out = BytesMut::new();
        p.encode(v, &mut out).expect("encode");
        self.send_bytes(&out).await;
    }

    /// Reads the next packet, the close, or times out after `wait`.
    pub async fn recv_within(&mut self, wait: Duration) -> Recv {
        let fut = async {
            loop {
                match decode(&mut self.buf, self.version, MAX_PACKET_SIZE) {
                    Ok(Some(p)) => return Recv::Packet(p),
                    Ok(None) => {}
                    Err(e) => return Recv::Bad(e),
                }
                match self.stream.read_buf(&mut self.buf).await {
                    Ok(0) | Err(_) => return Recv::Closed,
                    Ok(_) => {}
                }
            }
        };
        tokio::time::timeout(wait, fut)
            .await
            .unwrap_or(Recv::Timeout)
    }

    /// Reads the next packet; panics on close or timeout.
    pub async fn recv(&mut self) -> Packet {
        match self.recv_within(RECV_TIMEOUT).await {
            Recv::Packet(p) => p,
            other => panic!("expected a packet, got {other:?}"),
        }
    }

    /// Asserts the broker closes the connection (any packets before the close are
    /// returned).
    pub async fn expect_close(&mut self) -> Vec<Packet> {
        let mut seen = Vec::new();
        loop {
            match self.recv_within(RECV_TIMEOUT).await {
                Recv::Packet(p) => seen.push(p),
                Recv::Closed => return seen,
                other => panic!("expected the connection to close, got {other:?} after {seen:?}"),
            }
        }
    }

    /// Asserts nothing arrives within `wait`.
    pub async fn expect_silence(&mut self, wait: Duration) {
        match self.recv_within(wait).await {
            Recv::Timeout => {}
            other => panic!("expected silence, got {other:?}"),
        }
    }
}

/// A CONNECT of protocol `v` for `id`, without will, credentials or properties.
pub fn connect_packet(v: ProtocolVersion, id: &str, clean: bool, keep_alive: u16) -> Packet {
    Packet::Connect(Box::new(halyard_codec::Connect {
        protocol: v,
        bridge: false,
        clean_start: clean,
        keep_alive,
        client_id: halyard_codec::ClientId::new(id).expect("valid client id"),
        will: None,
        username: None,
        password: None,
        properties: halyard_codec::Properties::default(),
    }))
}

/// Parses a hex string with optional whitespace.
pub fn hex_bytes(s: &str) -> Vec<u8> {
    let digits: String = s.split_whitespace().collect();
    assert!(
        digits.len().is_multiple_of(2),
        "odd number of hex digits in {s:?}"
    );
    (0..digits.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&digits[i..i + 2], 16).expect("hex digit"))
        .collect()
}

/// Polls `cond` every few milliseconds until it holds or `RECV_TIMEOUT` passes.
pub async fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + RECV_TIMEOUT;
    while !cond() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for: {what}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}
