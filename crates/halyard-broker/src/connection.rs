//! One client connection: CONNECT handshake, then a single task that reads, writes and
//! keeps time for that client.
//!
//! The task owns the socket, a read buffer and a write buffer. Its loop waits on, in
//! priority order: a kick (session takeover, admin kick, broker shutdown, keep alive run
//! out: the broker's housekeeping task checks keep alives, see `Inner::keepalive_expire`),
//! the socket becoming writable (when there is something to write), readable input, the
//! session's wake-up (something was queued), and a pause timer. Reading, writing and waking are all
//! cancel-safe, so one `select!` serves both directions without a second task: a client
//! that stops reading never blocks our reading of its acks, and vice versa.

use std::collections::{HashMap, VecDeque};
use std::future::{Future, poll_fn};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use halyard_codec::{
    Ack, AckProperties, BytesMut, ConnAck, Connect, DecodeError, Disconnect, ErrorKind, Packet,
    PlainAck, PlainDecode, Properties, ProtocolVersion, Publish, QoS, ReasonCode, SubAck,
    Subscribe, SubscriptionOptions, TopicName, UnsubAck, Unsubscribe, decode_first, decode_limited,
    decode_plain_ack, decode_plain_publish,
};
use halyard_store::{Op, PendingWill as StoredWill};
use halyard_transport::{Event, PeerInfo};

use crate::auth::{
    Access, Anonymous, AuthExchange, AuthStep, AuthVerdict, Authorizer, Credentials, EnhancedAuth,
    Identity, Security, is_sys,
};
use crate::registry::Full;
use halyard_codec::{ByteString, Bytes};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::time::{Instant, sleep_until, timeout};
use tracing::{debug, info, warn};

use crate::broker::{Inner, grant, stored, version_name};
use crate::config::defaults::WRITE_BUFFER_HIGH_WATER_BYTES;
use crate::message::{self, Delivery, Message, Props};
use crate::router::Routes;
use crate::session::{Awaiting, ConnInfo, Outgoing, Peer, PendingWill, Session, Subscription};
use crate::stats::Stats;

/// Initial read buffer; it grows to the largest packet seen (decode reserves the declared
/// size), so idle connections stay small.
const READ_BUFFER_INITIAL_BYTES: usize = 512;
/// Message ids a connection takes from the broker's counter at a time: one atomic add per
/// 64 messages instead of one per message.
const MESSAGE_ID_BLOCK: u8 = 64;
/// How long a closing connection may spend flushing its last packets (the DISCONNECT).
const CLOSE_FLUSH_TIMEOUT: Duration = Duration::from_secs(2);

/// Why a connection ended; decides the will and the log line.
#[derive(Debug)]
enum End {
    /// DISCONNECT from the client with this reason (0x04 keeps the will).
    ClientDisconnect(ReasonCode),
    /// The peer closed the socket or it failed.
    Closed(&'static str),
    /// We closed it, telling a v5 client this reason.
    Server(ReasonCode, &'static str),
}

/// The connection task's future; `drain` (the shutdown drain's sender) is dropped when
/// it ends.
///
/// Its size is memory per connection, idle ones included, for their whole life. So the
/// handshake (reading CONNECT with its timeout, authentication, the session attach: ~3 KB
/// of future that is over once the connection runs) is boxed, and it owns the stream, the
/// peer info and the drain sender: captured by this future instead, they would stay in it
/// for good. The connection keeps the drain sender and its `max_connections` permit.
pub(crate) fn serve<S>(
    inner: Arc<Inner>,
    stream: S,
    info: PeerInfo,
    drain: tokio::sync::mpsc::Sender<()>,
) -> impl Future<Output = ()> + Send + 'static
where
    S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    let handshake = Box::pin(handshake(inner, stream, info, drain));
    async move {
        // Boxed and borrowed by `main_loop`: the connection is stored once, not again in
        // this future's state for the awaited result, the binding and the loop's future.
        // The loop is awaited here, not inside another `async fn`, whose own state would
        // be 24 bytes more of every connection's task.
        if let Some(mut conn) = handshake.await {
            let end = match conn.start() {
                Some(end) => end,
                None => conn.main_loop().await,
            };
            // Boxed: its timeout and close writes would otherwise size every
            // connection's task for its whole life, though they run once, at the end.
            Box::pin(conn.finish(end)).await;
        }
    }
}

/// Everything up to a running connection: CONNECT read, checked and answered.
async fn handshake<S>(
    inner: Arc<Inner>,
    stream: S,
    info: PeerInfo,
    drain: tokio::sync::mpsc::Sender<()>,
) -> Option<Box<Connection<S>>>
where
    S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    let peer = Peer::from(&info.remote);
    // One stream, not `tokio::io::split` halves: the task that owns it polls both
    // directions itself (`Connection::main_loop`), and split's shared half costs an
    // allocation per connection and a lock per read and write.
    let mut io = stream;
    let mut rbuf = BytesMut::with_capacity(READ_BUFFER_INITIAL_BYTES);
    let max_in = inner.cfg().message_size_limit;
    let max_props = inner.cfg().decoded_user_properties();
    // [MQTT-3.1.4-1]-adjacent: a connection that never sends CONNECT is not kept.
    let first = timeout(
        inner.cfg().connect_timeout,
        read_first(&mut io, &mut rbuf, max_in, max_props),
    )
    .await;
    let connect = match first {
        Err(_) => {
            debug!(%peer, "no CONNECT within the connect timeout; closing");
            return None;
        }
        Ok(Err(ReadError::Closed)) => return None,
        Ok(Err(ReadError::Decode(e))) => {
            refuse_bad_connect(&inner, &mut io, &peer, &e).await;
            return None;
        }
        Ok(Ok(Packet::Connect(c))) => c,
        Ok(Ok(other)) => {
            // [MQTT-3.1.0-1]: the first packet must be CONNECT.
            if let Some(suppressed) = PEER_LOG.admit() {
                info!(%peer, packet = other.name(), suppressed, "first packet is not CONNECT [MQTT-3.1.0-1]; closing");
            }
            return None;
        }
    };
    let permit = inner.permits.clone().try_acquire_owned().ok();
    let mut connect = *connect;
    // A listener with `use_identity_as_username` authenticates by the verified client
    // certificate and replaces the user name with its identity (as mosquitto does).
    let cert = match (info.identity_as_username, &info.tls_identity) {
        (false, _) => CertAuth::NotUsed,
        (true, Some(id)) => {
            connect.username = Some(id.as_str().into());
            CertAuth::Verified
        }
        (true, None) => CertAuth::Missing,
    };
    let security = inner.security();
    let anonymous = match info.allow_anonymous {
        Some(true) => Anonymous::Allow,
        Some(false) => Anonymous::Deny,
        None => security.anonymous,
    };
    let admission = Admission {
        have_permit: permit.is_some(),
        cert,
        anonymous_ok: anonymous.allows(&info),
        security,
        info,
    };
    let mut conn =
        Box::new(Connection::accept(inner.clone(), connect, peer, io, rbuf, admission).await?);
    // Held as a flag, given back in `Drop`: the permit itself would be 16 bytes more of
    // every connection's task or `Connection`.
    if let Some(p) = permit {
        p.forget();
        conn.flags.set(Flags::HOLDS_PERMIT, true);
    }
    conn.drain = Some(drain);
    Some(conn)
}

/// How the listener's client-certificate identity applies to a CONNECT.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum CertAuth {
    /// The listener does not use certificate identities.
    NotUsed,
    /// `use_identity_as_username`, and the client's certificate had an identity.
    Verified,
    /// `use_identity_as_username`, but no identity: refused.
    Missing,
}

/// What the connection task decided before CONNECT is checked.
#[derive(Debug)]
struct Admission {
    /// Within `max_connections`.
    have_permit: bool,
    cert: CertAuth,
    /// An anonymous client from this peer may connect (listener or broker policy).
    anonymous_ok: bool,
    /// The security settings in force when the connection arrived.
    security: Arc<Security>,
    info: PeerInfo,
}

/// Authenticates a CONNECT that passed the protocol checks: certificate identity, then
/// anonymous policy, then the authenticator (on a blocking thread), with failures per
/// source address rate-limited. `Ok` carries the verified user name, the identity the
/// ACL and the session are bound to; `None` is anonymous.
///
/// A user name nothing can verify (no authenticator configured) is no identity: the
/// client is anonymous, let in only where anonymous clients are, and never gets the
/// rights of the user it names.
async fn authenticate(
    inner: &Inner,
    c: &Connect,
    admission: &Admission,
) -> Result<Option<Arc<str>>, (ReasonCode, &'static str)> {
    let claimed = c.username.as_ref().map(|u| Arc::<str>::from(&u[..]));
    if admission.cert == CertAuth::Verified {
        return Ok(claimed);
    }
    let anonymous = |why| {
        if admission.anonymous_ok {
            Ok(None)
        } else {
            Err((ReasonCode::NotAuthorized, why))
        }
    };
    let Some(username) = &c.username else {
        return anonymous("anonymous clients not allowed");
    };
    let Some(authn) = admission.security.authenticator.clone() else {
        return anonymous(
            "no password file: a user name cannot be verified, and anonymous clients are not allowed",
        );
    };
    let ip = match &admission.info.remote {
        halyard_transport::Remote::Ip(a) => Some(a.ip()),
        _ => None,
    };
    if let Some(ip) = ip
        && inner.auth_failures.blocked(ip)
    {
        return Err((
            ReasonCode::BadUserNameOrPassword,
            "too many failed attempts from this address; try later",
        ));
    }
    let creds = Credentials {
        client_id: c.client_id.as_str().to_string(),
        username: Some(username.to_string()),
        password: c.password.as_ref().map(|p| p.to_vec()),
        peer: admission.info.clone(),
    };
    // Password hashes are slow on purpose: keep them off the async workers.
    let verdict = tokio::task::spawn_blocking(move || authn.authenticate(&creds))
        .await
        .unwrap_or(AuthVerdict::NotAuthorized);
    match verdict {
        AuthVerdict::Allow => Ok(claimed),
        AuthVerdict::BadCredentials => {
            if let Some(ip) = ip {
                inner.auth_failures.record(ip);
            }
            Err((
                ReasonCode::BadUserNameOrPassword,
                "bad user name or password",
            ))
        }
        AuthVerdict::NotAuthorized => Err((ReasonCode::NotAuthorized, "not authorized")),
    }
}

/// Refuses a CONNECT: counted, logged (rate-limited), told to the monitor, answered with
/// CONNACK `reason` (v5 with `why` as its reason string; 3.x gets the return code the
/// codec maps `reason` to).
async fn refuse_connect<W: AsyncRead + AsyncWrite + Unpin>(
    inner: &Inner,
    io: &mut W,
    peer: &Peer,
    c: &Connect,
    reason: ReasonCode,
    why: &'static str,
) {
    let v = c.protocol;
    Stats::inc(&inner.stats.connections_refused);
    if let Some(suppressed) = PEER_LOG.admit() {
        info!(%peer, client_id = %c.client_id, user = c.username.as_deref(), protocol = version_name(v), reason = ?reason, why, suppressed, "refused CONNECT");
    }
    inner.monitor.emit_conn(|| Event::AuthFailed {
        peer: peer.to_string(),
        client_id: c.client_id.as_str().to_string(),
        reason: format!("{reason:?}: {why}"),
    });
    let ack = Packet::ConnAck(ConnAck {
        session_present: false,
        reason,
        properties: Properties {
            reason_string: v.is_v5().then(|| why.into()),
            ..Properties::default()
        },
    });
    write_now(io, &ack, v).await;
}

/// One budget for every log line about a misbehaving or refused client: a flood of bad
/// connections costs a few lines a second, each reporting how many were suppressed.
static PEER_LOG: std::sync::LazyLock<halyard_transport::LogBudget> =
    std::sync::LazyLock::new(|| {
        halyard_transport::LogBudget::new(halyard_transport::LOG_LINES_PER_SECOND)
    });

enum ReadError {
    Closed,
    Decode(DecodeError),
}

/// Reads the first packet, a CONNECT of a version not known yet (see `decode_first`).
async fn read_first<R: AsyncRead + Unpin>(
    rd: &mut R,
    rbuf: &mut BytesMut,
    max: u32,
    max_user_properties: u32,
) -> Result<Packet, ReadError> {
    loop {
        match decode_first(rbuf, max, max_user_properties) {
            Ok(Some(p)) => return Ok(p),
            Ok(None) => {}
            Err(e) => return Err(ReadError::Decode(e)),
        }
        match rd.read_buf(rbuf).await {
            Ok(0) | Err(_) => return Err(ReadError::Closed),
            Ok(_) => {}
        }
    }
}

async fn read_packet<R: AsyncRead + Unpin>(
    rd: &mut R,
    rbuf: &mut BytesMut,
    version: ProtocolVersion,
    max: u32,
    max_user_properties: u32,
) -> Result<Packet, ReadError> {
    loop {
        match decode_limited(rbuf, version, max, max_user_properties) {
            Ok(Some(p)) => return Ok(p),
            Ok(None) => {}
            Err(e) => return Err(ReadError::Decode(e)),
        }
        match rd.read_buf(rbuf).await {
            Ok(0) | Err(_) => return Err(ReadError::Closed),
            Ok(_) => {}
        }
    }
}

/// Writes `p` as the last packet of a connection, then closes it as [`linger`] does.
async fn write_now<S: AsyncRead + AsyncWrite + Unpin>(io: &mut S, p: &Packet, v: ProtocolVersion) {
    let mut buf = BytesMut::new();
    if p.encode(v, &mut buf).is_ok() {
        let _ = timeout(CLOSE_FLUSH_TIMEOUT, io.write_all(&buf)).await;
        linger(io).await;
    }
}

/// How long, and for how many bytes, a connection we close reads what its client still
/// sends (see `linger`).
const LINGER: Duration = Duration::from_secs(1);
const LINGER_BYTES: usize = 64 * 1024;

/// Ends a connection whose last packet (a refusing CONNACK, a DISCONNECT) was written:
/// shuts down our write side, then reads and discards until the client closes, for at most
/// `LINGER` and `LINGER_BYTES`. Closing a socket with unread input makes the kernel send a
/// RST, which can destroy that last packet before the client reads it: a client that kept
/// writing (more QoS 2 PUBLISHes past Receive Maximum) would see "broken pipe", never the
/// reason. Boxed callers only (it runs once, at the end).
async fn linger<S: AsyncRead + AsyncWrite + Unpin>(io: &mut S) {
    let _ = timeout(CLOSE_FLUSH_TIMEOUT, io.shutdown()).await;
    let mut sink = [0u8; 4096];
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

/// Answers a CONNECT that could not be decoded. Protocol level problems get CONNACK 0x84
/// (v5) / 0x01 (3.x) [MQTT-3.1.2-2]; other errors in a v5 CONNECT get a CONNACK with the
/// error's reason [MQTT-4.13.1-1]; 3.x gets a plain close.
async fn refuse_bad_connect<W: AsyncRead + AsyncWrite + Unpin>(
    inner: &Inner,
    wr: &mut W,
    peer: &Peer,
    e: &DecodeError,
) {
    Stats::inc(&inner.stats.connections_refused);
    if let Some(suppressed) = PEER_LOG.admit() {
        info!(%peer, error = %e, suppressed, "refused CONNECT");
    }
    inner.monitor.emit_conn(|| Event::AuthFailed {
        peer: peer.to_string(),
        client_id: String::new(),
        reason: e.to_string(),
    });
    let v = match (e.kind, e.version) {
        (ErrorKind::UnsupportedProtocolVersion, Some(ProtocolVersion::V5)) => ProtocolVersion::V5,
        (ErrorKind::UnsupportedProtocolVersion, _) => ProtocolVersion::V3_1_1,
        (_, Some(ProtocolVersion::V5)) => ProtocolVersion::V5,
        _ => return,
    };
    let ack = Packet::ConnAck(ConnAck {
        session_present: false,
        reason: e.reason_code(),
        properties: Properties::default(),
    });
    write_now(wr, &ack, v).await;
}

/// What `poll_io` found ready.
enum Io {
    Wrote(std::io::Result<usize>),
    Read(std::io::Result<usize>),
}

/// Polls the stream for writing `out` (when `write`), then for reading into `rbuf` (when
/// `read`): one `select!` branch for both directions of the one stream, writing first.
fn poll_io<S: AsyncRead + AsyncWrite + Unpin>(
    cx: &mut std::task::Context<'_>,
    io: &mut S,
    out: &[u8],
    rbuf: &mut BytesMut,
    write: bool,
    read: bool,
) -> std::task::Poll<Io> {
    use std::task::Poll;
    if write && let Poll::Ready(r) = Pin::new(&mut *io).poll_write(cx, out) {
        return Poll::Ready(Io::Wrote(r));
    }
    if !read {
        return Poll::Pending;
    }
    if rbuf.capacity() == 0 {
        // No buffer (an idle connection, see `size_reads`): wait on a stack buffer, so
        // an idle connection holds none, and keep what arrives. As large as the 64 bytes
        // `read_buf` would reserve, so the adaptive read size behaves the same.
        let mut tmp = [0u8; 64];
        let mut rb = tokio::io::ReadBuf::new(&mut tmp);
        return match Pin::new(&mut *io).poll_read(cx, &mut rb) {
            Poll::Ready(r) => {
                rbuf.extend_from_slice(rb.filled());
                Poll::Ready(Io::Read(r.map(|()| rb.filled().len())))
            }
            Poll::Pending => Poll::Pending,
        };
    }
    std::pin::pin!(io.read_buf(rbuf)).poll(cx).map(Io::Read)
}

struct Connection<S> {
    inner: Arc<Inner>,
    /// The settings this connection was accepted under: what its CONNACK advertised
    /// (Maximum QoS, Receive Maximum, Maximum Packet Size...) holds for its lifetime even
    /// when a reload changes the broker's.
    cfg: Arc<crate::config::BrokerConfig>,
    /// The broker's settings now (limits a reload changes for everyone), read once per
    /// batch of packets in `process_input` rather than once per check.
    live: Arc<crate::config::BrokerConfig>,
    /// What a batch of received PUBLISH packets accumulates; boxed and only once the
    /// client publishes, to keep idle connections small.
    batch: Option<Box<Batch>>,
    io: S,
    rbuf: BytesMut,
    wbuf: BytesMut,
    /// Peer, listener, user name and protocol, as shown by the admin API; also the
    /// session's (one allocation for both, and every log line's peer).
    info: Arc<ConnInfo>,
    version: ProtocolVersion,
    /// The session, this connection's id in it and the kicks seen (see `Attachment`).
    at: Attachment,
    /// Wakes a connection paused by its publish rate or the memory budget; made on the
    /// first pause (a `Sleep` is ~110 bytes, and most connections never pause).
    pause_timer: Option<Pin<Box<tokio::time::Sleep>>>,
    /// When the last read returned, as nanoseconds since the broker started (see
    /// `Inner::instant_at`): 8 bytes where an `Instant` takes 16.
    rx_ns: u64,
    /// Message ids taken from the broker's counter in blocks of `MESSAGE_ID_BLOCK` (see
    /// `Inner::message_ids`): the next one, and how many of the block are left.
    next_id: u64,
    ids_left: u8,
    /// The client's Receive Maximum: QoS 1/2 messages we may have in flight to it.
    client_receive_max: u16,
    /// The client's Maximum Packet Size.
    client_max_packet: u32,
    /// Topic aliases both ways, made on first use (most clients never use them, and every
    /// byte here is memory per connection).
    aliases: Option<Box<Aliases>>,
    alias_out_max: u16,
    /// Will, enhanced authentication: boxed, and only for a client that has one of them.
    rare: Option<Box<Rare>>,
    /// The last topic this client published to and its subscribers (see `Routes`); made
    /// on the first PUBLISH and dropped when the connection goes idle.
    routes: Option<Box<Routes>>,
    /// The highest durable ticket read in this turn of `main_loop` (0: none read).
    durable_seen: std::cell::Cell<u64>,
    /// Acknowledgements and writes waiting for the store (see `Held`).
    held: Option<Box<Held>>,
    acl: AclCache,
    /// Only when publish rate limits are configured.
    rate: Option<Box<PublishRate>>,
    /// Bytes to have room for before the next read (0: whatever the buffer has; see
    /// `size_reads`).
    read_chunk: u32,
    /// A clone of the shutdown drain's sender: shutdown waits until every one is gone.
    drain: Option<tokio::sync::mpsc::Sender<()>>,
    /// Yes/no state, one bit each (see `Flags`).
    flags: Flags,
}

/// A connection's yes/no state in one byte: seven `bool`s put `Connection` 8 bytes past
/// the allocator's 256-byte class.
#[derive(Clone, Copy, Default)]
struct Flags(u8);

impl Flags {
    /// The client has a keep alive: reads are noted in `Session::last_rx` for the
    /// broker's keep-alive check (`Inner::keepalive_expire`).
    const KEEPALIVE: u8 = 1;
    /// CONNECT asked for a session expiry of 0 (a DISCONNECT may not raise it then).
    const EXPIRY_ZERO: u8 = 1 << 1;
    /// The store tracks durability (see `Inner::durable_now`), and had not stopped when
    /// this connection last looked.
    const DURABLE: u8 = 1 << 2;
    /// The queue's head is a recorded delivery whose store batch is not durable yet.
    const BLOCKED_ON_DURABLE: u8 = 1 << 3;
    /// `finish` ran; if not, the task is unwinding from a panic (see `Drop`).
    const FINISHED: u8 = 1 << 4;
    /// A PUBLISH waits for the memory budget.
    const MEMORY_BLOCKED: u8 = 1 << 5;
    /// Holds one of the `max_connections` permits (see `handshake`).
    const HOLDS_PERMIT: u8 = 1 << 6;

    fn has(self, flag: u8) -> bool {
        self.0 & flag != 0
    }

    fn set(&mut self, flag: u8, on: bool) {
        if on {
            self.0 |= flag;
        } else {
            self.0 &= !flag;
        }
    }
}

/// A connection's place in its session. One struct, so that each of the `select!`'s kick
/// and wake-up branches captures one pointer: three were 24 bytes more of every task,
/// which took it past tokio's 256-byte task size.
struct Attachment {
    session: Arc<Session>,
    conn_id: u64,
    /// The session's kick count this connection last looked at (see `Session::poll_kick`);
    /// an atomic only to be `Sync` (the `select!` borrows it across an await).
    kicks_seen: AtomicU32,
    /// This turn's `select!` also polls the wake-up, which registers the waker (and looks
    /// at the kick count under the slot's lock): the kick branch then need not lock the
    /// slot too. Publishers waking a busy subscriber contend for that lock.
    wake_armed: std::sync::atomic::AtomicBool,
}

impl Attachment {
    fn poll_kick(&self, cx: &mut std::task::Context<'_>) -> std::task::Poll<ReasonCode> {
        let register = !self.wake_armed.load(Ordering::Relaxed);
        self.session
            .poll_kick(cx, self.conn_id, &self.kicks_seen, register)
    }

    fn poll_woken(&self, cx: &mut std::task::Context<'_>) -> std::task::Poll<()> {
        self.session.poll_woken(cx, &self.kicks_seen)
    }
}

/// What waits until the store has made a ticket durable. Made on first use: a session
/// that is not persisted never needs it, and every byte of `Connection` is memory per
/// connection.
#[derive(Default)]
struct Held {
    /// Acknowledgements waiting until their store ticket is durable, in the order they
    /// must be sent [MQTT-4.6.0-2] (PUBACK/PUBREC/PUBCOMP in the order of the packets).
    acks: VecDeque<(u64, Packet)>,
    /// `(at, ticket)`, oldest first: the bytes of `wbuf` from `at` on may not be written
    /// until `ticket` is durable. One per fill that buffered a QoS 2 PUBLISH to a stored
    /// session: its packet id (the `Sent` record) must survive a crash before the client
    /// can see it, or a restart would resend the message under a new packet id and the
    /// client, which dedupes QoS 2 by packet id [MQTT-4.3.3-9], would deliver it twice.
    /// Everything buffered after it waits too, so order is kept. One entry per fill (not
    /// one for all) so that later fills do not push back the release of earlier ones.
    writes: VecDeque<(usize, u64)>,
}

/// What a batch of PUBLISH packets accumulates until `process_input` ends it.
#[derive(Default)]
struct Batch {
    /// QoS 0 deliveries, queued when the batch ends (see `Deferred`).
    deferred: crate::broker::Deferred,
    /// PUBLISH packets received by QoS, added to the stats once per batch.
    received: [u32; 3],
    /// Bytes and count of the messages routed, charged to the memory budget once per
    /// batch (see `MemoryUse`).
    charged: (usize, u32),
}

/// What only some clients have: a will, enhanced authentication. Boxed, made only for
/// them: every byte of `Connection` is memory per connection.
#[derive(Default)]
struct Rare {
    will: Option<Arc<Message>>,
    will_delay: u32,
    /// The enhanced authentication method of CONNECT, for re-authentication, and a
    /// re-authentication in progress.
    enhanced: Option<(ByteString, Arc<dyn EnhancedAuth>)>,
    reauth: Option<Box<dyn AuthExchange>>,
}

/// Topic aliases of one connection.
#[derive(Default)]
struct Aliases {
    /// Inbound [MQTT-3.3.2-10]: they live as long as the connection.
    inbound: HashMap<u16, TopicName>,
    /// Outbound, the ones we assigned.
    outbound: HashMap<TopicName, u16>,
}

/// The longest a PUBLISH waits for SUBSCRIBEs read before it (see `Then::Publish`).
const SUBSCRIBE_WAIT: Duration = Duration::from_millis(2);

/// Whether a SUBSCRIBE is among the first complete packets in `buf` (the first 16 looked at).
fn has_subscribe(buf: &[u8]) -> bool {
    let mut at = 0;
    for _ in 0..16 {
        let Some(&first) = buf.get(at) else {
            return false;
        };
        if first >> 4 == 8 {
            return true;
        }
        let (mut len, mut shift, mut i) = (0usize, 0, at + 1);
        loop {
            let Some(&b) = buf.get(i) else { return false };
            len |= usize::from(b & 0x7F) << shift;
            i += 1;
            if b & 0x80 == 0 || shift == 21 {
                break;
            }
            shift += 7;
        }
        at = i + len;
    }
    false
}

/// What `main_loop` does after its `select!` (see there).
enum Then {
    Loop,
    Flush,
    Yield,
    /// Yield, then handle the input read, which starts with a PUBLISH. A subscriber's
    /// SUBSCRIBE that reached the broker before this PUBLISH is often read in the same
    /// turn of the IO driver, which wakes both tasks at once; tokio then runs the
    /// last-woken first (its LIFO slot), and the PUBLISH would be routed before the
    /// SUBSCRIBE is seen. A yield runs after every task queued on this worker and any it
    /// can steal, so the SUBSCRIBE goes first (see "Ordering across connections" in
    /// ARCHITECTURE.md).
    Publish,
}

/// Read sizes `size_reads` moves between.
const READ_CHUNK_MIN: usize = 512;
const READ_CHUNK_MAX: usize = 64 * 1024;

/// A received PUBLISH once its topic is known, without its properties (see
/// `Connection::accept_publish`). Topic and payload are owned, never slices of the read
/// buffer.
struct Incoming {
    topic: TopicName,
    payload: Bytes,
    qos: QoS,
    retain: bool,
    packet_id: u16,
}

/// How often a client held back by the memory budget looks again.
const MEMORY_RECHECK: Duration = Duration::from_millis(10);

/// The stream and read buffer an authentication exchange talks over before the session
/// exists.
struct AuthIo<'a, S> {
    io: &'a mut S,
    rbuf: &'a mut BytesMut,
}

fn auth_packet(reason: ReasonCode, name: &ByteString, data: Option<Vec<u8>>) -> Packet {
    Packet::Auth(halyard_codec::Auth {
        reason,
        properties: Properties {
            authentication_method: Some(name.clone()),
            authentication_data: data.map(Bytes::from),
            ..Properties::default()
        },
    })
}

fn auth_refusal(inner: &Inner, v: AuthVerdict, peer: &PeerInfo) -> (ReasonCode, &'static str) {
    match v {
        AuthVerdict::BadCredentials | AuthVerdict::Allow => {
            if let halyard_transport::Remote::Ip(a) = &peer.remote {
                inner.auth_failures.record(a.ip());
            }
            (ReasonCode::BadUserNameOrPassword, "authentication failed")
        }
        AuthVerdict::NotAuthorized => (ReasonCode::NotAuthorized, "not authorized"),
    }
}

/// Runs an enhanced authentication exchange at CONNECT time (section 4.12): AUTH 0x18 out,
/// AUTH 0x18 back, each within the CONNECT timeout, until the method decides.
async fn exchange<S>(
    inner: &Inner,
    name: &ByteString,
    mut step: AuthStep,
    io: &mut AuthIo<'_, S>,
    peer: &PeerInfo,
) -> Result<(String, Option<Vec<u8>>), (ReasonCode, &'static str)>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    if let halyard_transport::Remote::Ip(a) = &peer.remote
        && inner.auth_failures.blocked(a.ip())
    {
        return Err((
            ReasonCode::BadUserNameOrPassword,
            "too many failed attempts from this address; try later",
        ));
    }
    loop {
        match step {
            AuthStep::Success { username, data } => return Ok((username, data)),
            AuthStep::Failure(v) => return Err(auth_refusal(inner, v, peer)),
            AuthStep::Continue(data, mut ex) => {
                let mut buf = BytesMut::new();
                let _ = auth_packet(ReasonCode::ContinueAuthentication, name, Some(data))
                    .encode(ProtocolVersion::V5, &mut buf);
                if io.io.write_all(&buf).await.is_err() || io.io.flush().await.is_err() {
                    return Err((
                        ReasonCode::UnspecifiedError,
                        "connection lost during authentication",
                    ));
                }
                let next = timeout(
                    inner.cfg().connect_timeout,
                    read_packet(
                        io.io,
                        io.rbuf,
                        ProtocolVersion::V5,
                        inner.cfg().message_size_limit,
                        inner.cfg().decoded_user_properties(),
                    ),
                )
                .await;
                match next {
                    Ok(Ok(Packet::Auth(a)))
                        if a.reason == ReasonCode::ContinueAuthentication
                            && a.properties.authentication_method.as_ref() == Some(name) =>
                    {
                        step = ex.step(a.properties.authentication_data.as_deref());
                    }
                    Ok(Ok(_)) => {
                        return Err((
                            ReasonCode::ProtocolError,
                            "expected AUTH continuing the same method [MQTT-4.12.0-2]",
                        ));
                    }
                    _ => {
                        return Err((
                            ReasonCode::UnspecifiedError,
                            "no AUTH within the connect timeout",
                        ));
                    }
                }
            }
        }
    }
}

/// A client's publish budget: token buckets of messages and payload bytes, refilled
/// continuously at the configured rates with one second of burst. Spending may go below
/// zero (a packet is never split); reads pause until the budget is positive again. Exists
/// only for connections with a rate configured (`PublishRate::new`).
#[derive(Debug)]
struct PublishRate {
    msgs_per_sec: f64,
    bytes_per_sec: f64,
    msgs: f64,
    bytes: f64,
    last: Instant,
    throttled: bool,
}

impl PublishRate {
    /// `None` when no rate is configured.
    fn new(cfg: &crate::config::BrokerConfig) -> Option<Self> {
        let m = f64::from(cfg.publish_rate_messages);
        let b = cfg.publish_rate_bytes as f64;
        let r = PublishRate {
            msgs_per_sec: m,
            bytes_per_sec: b,
            msgs: m,
            bytes: b,
            last: Instant::now(),
            throttled: false,
        };
        r.enabled().then_some(r)
    }

    fn enabled(&self) -> bool {
        self.msgs_per_sec > 0.0 || self.bytes_per_sec > 0.0
    }

    fn refill(&mut self, now: Instant) {
        let dt = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        self.msgs = (self.msgs + dt * self.msgs_per_sec).min(self.msgs_per_sec);
        self.bytes = (self.bytes + dt * self.bytes_per_sec).min(self.bytes_per_sec);
    }

    fn spend(&mut self, payload: usize) {
        self.refill(Instant::now());
        if self.msgs_per_sec > 0.0 {
            self.msgs -= 1.0;
        }
        if self.bytes_per_sec > 0.0 {
            self.bytes -= payload as f64;
        }
    }

    /// When reading may resume, if the budget is spent.
    /// Counts each new pause in `stats.publish_throttled`.
    fn blocked_until(&mut self, now: Instant, stats: &Stats) -> Option<Instant> {
        self.refill(now);
        let wait = |have: f64, rate: f64| {
            if rate > 0.0 && have < 0.0 {
                -have / rate
            } else {
                0.0
            }
        };
        let secs = wait(self.msgs, self.msgs_per_sec).max(wait(self.bytes, self.bytes_per_sec));
        if secs <= 0.0 {
            self.throttled = false;
            return None;
        }
        if !self.throttled {
            self.throttled = true;
            Stats::inc(&stats.publish_throttled);
        }
        Some(now + Duration::from_secs_f64(secs))
    }
}

/// Topic access decisions of one connection, dropped when the rules change (the broker's
/// security generation moves) and bounded in size.
#[derive(Debug, Default)]
struct AclCache {
    generation: u64,
    /// Only while an authorizer is configured: boxed, as most brokers have none.
    checked: Option<Box<AclChecked>>,
}

#[derive(Debug)]
struct AclChecked {
    authorizer: Arc<dyn Authorizer>,
    identity: Identity,
    /// One map per `Access` (write, subscribe, read).
    decisions: [Decisions; 3],
}

/// Cached decisions of one access kind, by topic.
type Decisions = HashMap<Box<str>, bool>;

/// Most cached decisions per connection and access kind; beyond it the cache starts over.
const ACL_CACHE_ENTRIES: usize = 1024;

impl<S> Drop for Connection<S> {
    fn drop(&mut self) {
        if self.flags.has(Flags::HOLDS_PERMIT) {
            self.inner.permits.add_permits(1);
        }
        // Only a panic gets here without `finish`: close this connection only, as if the
        // network had failed (will included), so the session can expire or be resumed.
        // (A task cancelled by runtime teardown is not a lost connection; leave it.)
        if self.flags.has(Flags::FINISHED) || !std::thread::panicking() {
            return;
        }
        tracing::error!(peer = %self.info.peer, client_id = %self.at.session.client_id, "connection task panicked; closing this connection only");
        Stats::dec(&self.inner.stats.connections_current);
        let (will, delay) = self.take_will();
        detach(&self.inner, &self.at.session, self.at.conn_id, will, delay);
    }
}

impl<S> Connection<S> {
    /// The will and its delay, taken: it is published at most once.
    fn take_will(&mut self) -> (Option<Arc<Message>>, u32) {
        self.rare
            .as_mut()
            .map_or((None, 0), |r| (r.will.take(), r.will_delay))
    }
}

impl<S> Connection<S>
where
    S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    /// Validates CONNECT, attaches the session and sends CONNACK. `None` when refused.
    async fn accept(
        inner: Arc<Inner>,
        mut c: Connect,
        peer: Peer,
        mut io: S,
        mut rbuf: BytesMut,
        admission: Admission,
    ) -> Option<Self> {
        let v = c.protocol;
        let v5 = v.is_v5();
        let cfg = inner.cfg();
        let refuse = |reason: ReasonCode, why: &'static str| (reason, why);
        let mut assigned = None;
        let check = (|| {
            if admission.cert == CertAuth::Missing {
                return Err(refuse(
                    ReasonCode::NotAuthorized,
                    "use_identity_as_username: no client certificate identity",
                ));
            }
            if !admission.have_permit {
                return Err(refuse(ReasonCode::QuotaExceeded, "max_connections reached"));
            }
            if c.client_id.is_empty() {
                // v5: we assign one [MQTT-3.1.3-6]. 3.1.1: only with clean session
                // [MQTT-3.1.3-8]. 3.1 requires an identifier.
                if v == ProtocolVersion::V3_1 || (!v5 && !c.clean_start) {
                    return Err(refuse(
                        ReasonCode::ClientIdentifierNotValid,
                        "empty client id without clean session [MQTT-3.1.3-8]",
                    ));
                }
            } else if v == ProtocolVersion::V3_1 && c.client_id.as_str().len() > 23 {
                return Err(refuse(
                    ReasonCode::ClientIdentifierNotValid,
                    "3.1 client id over 23 bytes",
                ));
            } else if c.client_id.as_str().len() > cfg.max_client_id_length {
                return Err(refuse(
                    ReasonCode::ClientIdentifierNotValid,
                    "client id longer than max_client_id_length",
                ));
            }
            if v5
                && let Some(m) = &c.properties.authentication_method
                && !admission
                    .security
                    .enhanced
                    .iter()
                    .any(|e| e.method() == &m[..])
            {
                // A method we do not offer [MQTT-4.12.0-1].
                return Err(refuse(
                    ReasonCode::BadAuthenticationMethod,
                    "unsupported authentication method",
                ));
            }
            if v5
                && c.properties.authentication_data.is_some()
                && c.properties.authentication_method.is_none()
            {
                return Err(refuse(
                    ReasonCode::ProtocolError,
                    "authentication data without an authentication method [MQTT-3.1.2.11.10]",
                ));
            }
            if !v5 && c.keep_alive > cfg.max_keepalive {
                // 3.x has no Server Keep Alive; refuse as mosquitto does.
                return Err(refuse(
                    ReasonCode::ClientIdentifierNotValid,
                    "keep alive above max_keepalive",
                ));
            }
            if let Some(w) = &c.will {
                if let Some(why) = cfg.user_properties_over(&w.properties.user_properties) {
                    Stats::inc(&inner.stats.properties_refused);
                    return Err(refuse(ReasonCode::QuotaExceeded, why));
                }
                if w.qos > cfg.max_qos {
                    return Err(refuse(
                        ReasonCode::QoSNotSupported,
                        "will QoS above maximum QoS [MQTT-3.2.2-12]",
                    ));
                }
                if w.retain && !cfg.retain_available {
                    return Err(refuse(
                        ReasonCode::RetainNotSupported,
                        "will retain unsupported [MQTT-3.2.2-13]",
                    ));
                }
            }
            Ok(())
        })();
        let mut enhanced: Option<(ByteString, Arc<dyn EnhancedAuth>)> = None;
        let mut auth_reply = None;
        let check = match (check, c.properties.authentication_method.clone()) {
            (Ok(()), None) => authenticate(&inner, &c, &admission).await,
            (Ok(()), Some(name)) => {
                let method = admission
                    .security
                    .enhanced
                    .iter()
                    .find(|e| e.method() == &name[..])
                    .cloned();
                match method {
                    None => Err((
                        ReasonCode::BadAuthenticationMethod,
                        "unsupported authentication method",
                    )),
                    Some(method) => {
                        let first = method.start(c.properties.authentication_data.as_deref());
                        let mut auth_io = AuthIo {
                            io: &mut io,
                            rbuf: &mut rbuf,
                        };
                        match exchange(&inner, &name, first, &mut auth_io, &admission.info).await {
                            Ok((user, data)) => {
                                c.username = Some(user.as_str().into());
                                auth_reply = data;
                                enhanced = Some((name, method));
                                Ok(Some(Arc::from(user.as_str())))
                            }
                            Err(e) => Err(e),
                        }
                    }
                }
            }
            (Err(e), _) => Err(e),
        };
        let user = match check {
            Ok(user) => user,
            Err((reason, why)) => {
                refuse_connect(&inner, &mut io, &peer, &c, reason, why).await;
                return None;
            }
        };
        let client_id: Arc<str> = if c.client_id.is_empty() {
            let id = assign_client_id(&inner);
            assigned = Some(id.clone());
            id.into()
        } else {
            c.client_id.as_str().into()
        };
        let who = Identity {
            client_id: client_id.clone(),
            username: user.clone(),
        };
        // The will is a PUBLISH the client makes now for later: the same write rights
        // apply (checked again when it is published; see `Inner::publish_will`).
        if let Some(w) = &c.will
            && !inner.may_write(&who, w.topic.as_str())
        {
            Stats::inc(&inner.stats.publish_denied);
            let why = "not authorized to publish to the will topic";
            refuse_connect(&inner, &mut io, &peer, &c, ReasonCode::NotAuthorized, why).await;
            return None;
        }
        tracing::Span::current().record("client_id", &*client_id);
        let requested_expiry = if v5 {
            c.properties.session_expiry_interval.unwrap_or(0)
        } else if c.clean_start {
            0
        } else {
            cfg.persistent_client_expiration
                .map_or(u32::MAX, |d| u32::try_from(d.as_secs()).unwrap_or(u32::MAX))
        };
        let expiry = requested_expiry.min(cfg.max_session_expiry_interval);

        // Keep alive: v5 gets Server Keep Alive when we override [MQTT-3.2.2-21].
        let server_keep_alive = (v5
            && (c.keep_alive > cfg.max_keepalive
                || (c.keep_alive == 0 && cfg.max_keepalive < u16::MAX)))
            .then_some(cfg.max_keepalive);
        let keep_alive = server_keep_alive.unwrap_or(c.keep_alive);
        let conn_info = Arc::new(ConnInfo::new(
            peer.clone(),
            admission.info.listener.clone(),
            user.clone(),
            v,
            keep_alive,
            c.clean_start,
        ));
        let conn_id = inner.next_conn_id.fetch_add(1, Ordering::Relaxed);
        let (session, present) = match attach_session(
            &inner,
            &client_id,
            c.clean_start,
            v,
            expiry,
            conn_id,
            conn_info.clone(),
        ) {
            Ok(attached) => attached,
            Err(e) => {
                let (reason, why) = match e {
                    // Neither resumed nor taken over, nor discarded by a clean start: the
                    // owner's session and live connection stay as they are.
                    NotAttached::OtherOwner => (
                        ReasonCode::NotAuthorized,
                        "client id in use by another user's session",
                    ),
                    NotAttached::Full(full) => {
                        Stats::inc(&inner.stats.sessions_refused);
                        let why = match full {
                            Full::Sessions => "max_sessions reached",
                            Full::User => "max_sessions_per_user reached",
                        };
                        (ReasonCode::QuotaExceeded, why)
                    }
                };
                refuse_connect(&inner, &mut io, &peer, &c, reason, why).await;
                return None;
            }
        };
        inner.persist_session(&session, true);

        // [MQTT-3.1.2-22]: 1.5 times the keep alive without a packet closes the connection.

        let mut props = Properties::default();
        if v5 {
            if expiry != requested_expiry {
                props.session_expiry_interval = Some(expiry);
            }
            if cfg.max_inflight_messages < u16::MAX {
                props.receive_maximum = Some(cfg.max_inflight_messages.max(1));
            }
            if cfg.max_qos < QoS::ExactlyOnce {
                props.maximum_qos = Some(cfg.max_qos);
            }
            props.retain_available = Some(cfg.retain_available);
            if cfg.message_size_limit < halyard_codec::MAX_PACKET_SIZE {
                props.maximum_packet_size = Some(cfg.message_size_limit);
            }
            if cfg.topic_alias_maximum > 0 {
                props.topic_alias_maximum = Some(cfg.topic_alias_maximum);
            }
            props.assigned_client_identifier = assigned.as_deref().map(Into::into);
            props.server_keep_alive = server_keep_alive;
            props.wildcard_subscription_available = Some(true);
            props.subscription_identifier_available = Some(true);
            props.shared_subscription_available = Some(cfg.shared_subscriptions);
            if let Some((name, _)) = &enhanced {
                props.authentication_method = Some(name.clone());
                props.authentication_data = auth_reply.map(Bytes::from);
            }
        }
        let ack = Packet::ConnAck(ConnAck {
            session_present: present,
            reason: ReasonCode::Success,
            properties: props,
        });
        let mut wbuf = BytesMut::with_capacity(ack.encoded_len(v));
        if ack.encode(v, &mut wbuf).is_err() {
            return None;
        }
        Stats::inc(&inner.stats.connections_total);
        let open = inner
            .stats
            .connections_current
            .fetch_add(1, Ordering::Relaxed)
            + 1;
        inner
            .stats
            .connections_maximum
            .fetch_max(open, Ordering::Relaxed);
        info!(
            %peer, client_id = %client_id, user = user.as_deref(), protocol = version_name(v),
            clean_start = c.clean_start, keep_alive, session_present = present, "client connected"
        );
        inner.monitor.emit_conn(|| Event::Connected {
            peer: peer.to_string(),
            client_id: client_id.to_string(),
            protocol: version_name(v),
        });

        let will = c.will.as_ref().map(|w| {
            // Copied out of the CONNECT's read buffer (the will lives as long as the
            // session; see `TopicName::copy_with`).
            let (topic, payload) = w.topic.copy_with(&w.payload);
            Arc::new(Message::new(
                inner.message_id(),
                topic,
                payload,
                w.qos,
                w.retain,
                crate::message::owned_properties(w.properties.clone()),
                Some(client_id.clone()),
                Instant::now(),
            ))
        });
        let client_receive_max = c.properties.receive_maximum.unwrap_or(if v5 {
            u16::MAX
        } else {
            cfg.max_inflight_messages.max(1)
        });
        // The CONNECT buffer goes unless a pipelined packet is still in it: an idle
        // connection then holds no read buffer until bytes arrive (see `poll_io`), and a
        // busy one grows its buffer as its reads fill it.
        let rbuf = if rbuf.is_empty() {
            BytesMut::new()
        } else {
            rbuf
        };
        let kicks_seen = session.kicks();
        let mut conn = Connection {
            cfg: cfg.clone(),
            live: cfg.clone(),
            batch: None,
            io,
            rbuf,
            wbuf,
            info: conn_info,
            version: v,
            at: Attachment {
                session,
                conn_id,
                kicks_seen: AtomicU32::new(kicks_seen),
                wake_armed: std::sync::atomic::AtomicBool::new(false),
            },
            pause_timer: None,
            rx_ns: inner.ns_at(Instant::now()),
            next_id: 0,
            ids_left: 0,
            client_receive_max,
            client_max_packet: c
                .properties
                .maximum_packet_size
                .unwrap_or(halyard_codec::MAX_PACKET_SIZE),
            aliases: None,
            alias_out_max: cfg
                .topic_alias_maximum_outbound
                .min(c.properties.topic_alias_maximum.unwrap_or(0)),
            rare: (will.is_some() || enhanced.is_some()).then(|| {
                Box::new(Rare {
                    will,
                    will_delay: c.will.as_ref().and_then(|w| w.delay_interval).unwrap_or(0),
                    enhanced,
                    reauth: None,
                })
            }),
            routes: None,
            durable_seen: std::cell::Cell::new(0),
            held: None,
            acl: AclCache {
                generation: u64::MAX, // loaded on first use
                checked: None,
            },
            rate: PublishRate::new(&cfg).map(Box::new),
            read_chunk: 0,
            drain: None,
            flags: {
                let mut f = Flags::default();
                f.set(Flags::KEEPALIVE, keep_alive > 0);
                f.set(Flags::EXPIRY_ZERO, requested_expiry == 0);
                f.set(Flags::DURABLE, inner.durable_tracked());
                f
            },
            inner,
        };
        if present {
            conn.resend_inflight();
        }
        Some(conn)
    }

    /// What runs before the loop first waits; `Some` when the connection ends already.
    fn start(&mut self) -> Option<End> {
        // Shutdown reaches a running connection through its kick (`Broker::shutdown` kicks
        // every attached one after raising the flag; a watch here would be 120 bytes of
        // every connection's task). One attached after that sweep sees the flag here.
        if *self.inner.shutdown.borrow() {
            return Some(End::Server(ReasonCode::ServerShuttingDown, "shutting down"));
        }
        // Packets the client sent right behind CONNECT, read with it: handled now, not
        // when its next bytes happen to arrive (a `connect(); subscribe()` client would
        // wait for a SUBACK forever).
        self.process_input()
    }

    async fn main_loop(&mut self) -> End {
        loop {
            self.durable_seen.set(0);
            if self.has_pending_acks() {
                self.release_acks();
            }
            if self.wbuf.len() < WRITE_BUFFER_HIGH_WATER_BYTES {
                self.fill();
            }
            // Over its publish rate, a client is not read until its budget refills: it
            // slows down instead of us buffering or dropping. Keep alive does not run out
            // while we are the ones not reading. (No clock read unless one of them is on.)
            // The deadlines stay inside this block, so they are not part of the task's
            // state across the `select!` (every byte of it is memory per connection).
            let (throttled, paused) = {
                let now = (self.rate.is_some() || self.flags.has(Flags::MEMORY_BLOCKED))
                    .then(Instant::now);
                let throttled_until =
                    now.and_then(|now| self.rate.as_mut()?.blocked_until(now, &self.inner.stats));
                if let Some(now) = now
                    && (throttled_until.is_some() || self.flags.has(Flags::MEMORY_BLOCKED))
                {
                    self.heard_at(now);
                }
                // One timer for both pauses; over the memory budget, look again every
                // MEMORY_RECHECK.
                let memory_recheck = now
                    .filter(|_| self.flags.has(Flags::MEMORY_BLOCKED))
                    .map(|n| n + MEMORY_RECHECK);
                let paused_until = match (throttled_until, memory_recheck) {
                    (Some(a), Some(b)) => Some(a.min(b)),
                    (a, b) => a.or(b),
                };
                if let Some(at) = paused_until {
                    match &mut self.pause_timer {
                        Some(t) if t.deadline() == at => {}
                        Some(t) => t.as_mut().reset(at),
                        None => self.pause_timer = Some(Box::pin(sleep_until(at))),
                    }
                }
                (throttled_until.is_some(), paused_until.is_some())
            };
            let chunk = self.read_chunk as usize;
            if chunk > 0 && self.rbuf.capacity() - self.rbuf.len() < chunk / 2 {
                self.rbuf.reserve(chunk);
            }
            // (A buffer without room reads up to 64 bytes first: `poll_io` reads 64 on the
            // stack for one without capacity; `BytesMut` reserves 64 for a full one.)
            let read_room = (self.rbuf.capacity() - self.rbuf.len()).max(64);
            let writable = self.writable_len();
            let want_write = writable > 0;
            // Stop reading while our replies to this client pile up unread: its own
            // input is then paused instead of our buffer growing.
            let can_read = self.wbuf.len() < 2 * WRITE_BUFFER_HIGH_WATER_BYTES
                && !throttled
                && !self.flags.has(Flags::MEMORY_BLOCKED);
            let can_fill = self.wbuf.len() < WRITE_BUFFER_HIGH_WATER_BYTES;
            // Held acknowledgements or deliveries wait for the store (see `Held`):
            // `notify_durable` wakes us through the session's wake-up.
            let waiting_durable = self.flags.has(Flags::DURABLE)
                && (self.has_pending_acks()
                    || self.flags.has(Flags::BLOCKED_ON_DURABLE)
                    || self.has_holds());
            if waiting_durable {
                if !self.inner.durable_tracked() {
                    // The store stopped (shutdown): nothing more becomes durable. What
                    // is held never goes out; it stays in flight in the session, and
                    // the client only ever sees it under an id that is on disk.
                    self.wbuf.truncate(writable);
                    self.held = None;
                    self.flags.set(Flags::DURABLE, false);
                    continue;
                }
                let seen = self.durable_seen.get();
                self.inner.wait_durable(&self.at.session);
                if self.durable_now() > seen {
                    continue; // it moved before we were listed: look again now
                }
            }
            // The futures below are `poll_fn`s over fields, not `async` blocks: every
            // byte of this `select!` is in every connection's task for its whole life.
            // For the same reason no branch awaits: one that must (flush, yield) says so
            // and the await comes after, when the `select!`'s output is gone (awaited
            // inside a branch, that output stayed in the task's state: 24 bytes).
            self.at
                .wake_armed
                .store(can_fill || waiting_durable, Ordering::Relaxed);
            let then = tokio::select! {
                biased;
                reason = poll_fn(|cx| self.at.poll_kick(cx)) => {
                    if reason == ReasonCode::SessionTakenOver
                        && let Some(d) = self.unread_disconnect()
                    {
                        return End::ClientDisconnect(d);
                    }
                    return End::Server(reason, match reason {
                        ReasonCode::KeepAliveTimeout => "keep alive timeout [MQTT-3.1.2-22]",
                        ReasonCode::AdministrativeAction => "disconnected by an administrator",
                        ReasonCode::ServerShuttingDown => "server shutting down",
                        _ => "session taken over [MQTT-3.1.4-3]",
                    });
                }
                r = {
                    let (io, rbuf, out) = (&mut self.io, &mut self.rbuf, &self.wbuf[..writable]);
                    poll_fn(move |cx| poll_io(cx, io, out, rbuf, want_write, can_read))
                },
                    if want_write || can_read => match r {
                    Io::Wrote(Ok(0) | Err(_)) => return End::Closed("write failed"),
                    Io::Wrote(Ok(n)) => {
                        bytes::Buf::advance(&mut self.wbuf, n);
                        if let Some(h) = &mut self.held {
                            for (at, _) in &mut h.writes {
                                *at -= n;
                            }
                        }
                        Stats::add(&self.inner.stats.bytes_sent, n as u64);
                        // All that may be written now is written: flush (TLS). Asked of
                        // `writable_len` again rather than kept from before the `select!`,
                        // which would be 8 more bytes of every connection's task.
                        if self.writable_len() == 0 { Then::Flush } else { Then::Loop }
                    }
                    Io::Read(Ok(0)) => return End::Closed("connection closed by client"),
                    Io::Read(Err(_)) => return End::Closed("read failed"),
                    Io::Read(Ok(n)) => {
                        Stats::add(&self.inner.stats.bytes_received, n as u64);
                        self.heard_at(Instant::now());
                        self.size_reads(n, read_room);
                        // A read that starts with a PUBLISH waits for the connections
                        // woken with it to run first (see `Then::Publish`).
                        if self.rbuf.first().is_some_and(|b| b >> 4 == 3) {
                            Then::Publish
                        } else {
                            // Publishers read meanwhile wait for this SUBSCRIBE.
                            let subscribing = has_subscribe(&self.rbuf);
                            if subscribing {
                                self.inner.subscribing.fetch_add(1, Ordering::SeqCst);
                            }
                            let end = self.process_input();
                            if subscribing {
                                self.inner.subscribing.fetch_sub(1, Ordering::SeqCst);
                            }
                            if let Some(end) = end {
                                return end;
                            }
                            Then::Loop
                        }
                    }
                },
                _ = poll_fn(|cx| self.at.poll_woken(cx)), if can_fill || waiting_durable => {
                    // Woken by a publisher's batch, this task would run right after it
                    // (tokio's LIFO slot) and write that batch alone. Yielding once lets the
                    // other publishers ready now queue theirs first, so one write carries
                    // them all: a write system call was a fifth of a fan-in's CPU.
                    if can_fill { Then::Yield } else { Then::Loop }
                }
                _ = poll_fn(|cx| self.pause_timer.as_mut().expect("set when paused").as_mut().poll(cx)),
                    if paused => {
                    if self.flags.has(Flags::MEMORY_BLOCKED) && !self.inner.memory_over_budget(&self.inner.cfg()) {
                        self.flags.set(Flags::MEMORY_BLOCKED, false);
                    }
                    // Budget refilled or memory freed: handle what was already read, then
                    // read again (a PUBLISH still over a limit pauses again).
                    if let Some(end) = self.process_input() {
                        return end;
                    }
                    Then::Loop
                }
            };
            match then {
                Then::Loop => {}
                Then::Flush => {
                    if self.io.flush().await.is_err() {
                        return End::Closed("flush failed");
                    }
                }
                Then::Yield => tokio::task::yield_now().await,
                Then::Publish => {
                    tokio::task::yield_now().await;
                    // A SUBSCRIBE read before this PUBLISH, being handled on another
                    // worker now: wait for it, a bounded while (a SUBSCRIBE takes
                    // microseconds; a stream of them must not stall publishers).
                    if self.inner.subscribing.load(Ordering::SeqCst) > 0 {
                        let until = Instant::now() + SUBSCRIBE_WAIT;
                        while self.inner.subscribing.load(Ordering::SeqCst) > 0
                            && Instant::now() < until
                        {
                            tokio::task::yield_now().await;
                        }
                    }
                    if let Some(end) = self.process_input() {
                        return end;
                    }
                }
            }
        }
    }

    /// The client was heard from (or is not read from on purpose, which must not run its
    /// keep alive out) at `now`.
    fn heard_at(&mut self, now: Instant) {
        self.rx_ns = self.inner.ns_at(now);
        if self.flags.has(Flags::KEEPALIVE) {
            // `Inner::ms_at(now)`, wrapping (see `Session::last_rx`).
            let ms = (self.rx_ns / 1_000_000) as u32;
            self.at.session.last_rx.store(ms, Ordering::Relaxed);
        }
    }

    /// Adapts the read size to the traffic: a read that filled the room it had doubles
    /// the next (up to READ_CHUNK_MAX), so a busy publisher is read in few system calls; a
    /// mostly empty one halves it, and once small, an emptied big buffer is given back, so
    /// an idle connection holds almost nothing.
    fn size_reads(&mut self, n: usize, room: usize) {
        if n >= room {
            // At most READ_CHUNK_MAX: fits the u32.
            self.read_chunk = (room * 2).clamp(READ_CHUNK_MIN, READ_CHUNK_MAX) as u32;
        } else if n < self.read_chunk as usize / 8 {
            self.read_chunk /= 2;
            if (self.read_chunk as usize) < READ_CHUNK_MIN {
                self.read_chunk = 0;
                if self.rbuf.is_empty() && self.rbuf.capacity() > READ_CHUNK_MIN {
                    self.rbuf = BytesMut::new();
                }
                // Idle: its cached matches would keep their sessions alive, and its batch
                // state (flushed at the end of every batch) is memory for nothing.
                self.routes = None;
                if self.batch.as_ref().is_some_and(|b| b.deferred.is_empty()) {
                    self.batch = None;
                }
            }
        }
    }

    /// Decodes and handles every complete packet in the read buffer.
    /// On a takeover: whether the client had already sent DISCONNECT on this connection,
    /// still unread (it disconnected and reconnected at once, and the new connection was
    /// read first). Its will must then not be published [MQTT-3.1.2-10]. Looks only at
    /// what can be read without waiting; the session now belongs to the new connection,
    /// so nothing else read here is acted on.
    fn unread_disconnect(&mut self) -> Option<ReasonCode> {
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        let read = std::pin::pin!(self.io.read_buf(&mut self.rbuf));
        if !matches!(
            std::future::Future::poll(read, &mut cx),
            std::task::Poll::Ready(Ok(1..))
        ) {
            return None;
        }
        let mut rest = self.rbuf.split();
        let max_props = self.live.decoded_user_properties();
        while let Ok(Some(p)) = decode_limited(
            &mut rest,
            self.version,
            self.cfg.message_size_limit,
            max_props,
        ) {
            if let Packet::Disconnect(d) = p {
                return Some(d.reason);
            }
        }
        None
    }

    fn process_input(&mut self) -> Option<End> {
        self.live = self.inner.cfg();
        let end = self.process_packets();
        self.flush_deferred();
        if let Some(b) = &mut self.batch {
            self.inner.stats.add_received(&mut b.received);
            let (bytes, messages) = std::mem::take(&mut b.charged);
            self.inner.memory.charge(bytes, messages as usize);
        }
        end
    }

    fn flush_deferred(&mut self) {
        if let Some(b) = &mut self.batch
            && !b.deferred.is_empty()
        {
            self.inner
                .flush_deferred(&mut b.deferred, Inner::queue_limits(&self.live));
        }
    }

    fn process_packets(&mut self) -> Option<End> {
        loop {
            // Packets already read wait too while the publish budget is spent.
            if let Some(r) = &mut self.rate
                && r.blocked_until(Instant::now(), &self.inner.stats).is_some()
            {
                return None;
            }
            // Over the broker's memory budget, a PUBLISH waits (and the client is not read
            // from) until deliveries free memory; acknowledgements and everything else
            // still flow, so subscribers keep draining.
            if self.rbuf.first().is_some_and(|b| b >> 4 == 3)
                && self.inner.memory_over_budget(&self.live)
            {
                if !self.flags.has(Flags::MEMORY_BLOCKED) {
                    Stats::inc(&self.inner.stats.publish_paused_memory);
                }
                self.flags.set(Flags::MEMORY_BLOCKED, true);
                return None;
            }
            // Most PUBLISH packets have no properties: read them in place and copy out only
            // topic and payload (see `decode_plain_publish`).
            if let PlainDecode::Plain(p, len) =
                decode_plain_publish(&self.rbuf, self.version, self.cfg.message_size_limit)
            {
                let p = Incoming {
                    topic: p.owned_topic(),
                    payload: Bytes::copy_from_slice(p.payload),
                    qos: p.qos,
                    retain: p.retain,
                    packet_id: p.packet_id,
                };
                bytes::Buf::advance(&mut self.rbuf, len);
                if let Err(end) = self.accept_publish(p, Props::NONE) {
                    return Some(end);
                }
                continue;
            }
            // Four-byte acknowledgements (most of them) are read in place too.
            if let Some((kind, packet_id)) = decode_plain_ack(&self.rbuf) {
                bytes::Buf::advance(&mut self.rbuf, 4);
                match kind {
                    PlainAck::PubAck => self.on_ack(packet_id, Awaiting::Ack),
                    PlainAck::PubRec => self.on_pubrec(&Ack::new(packet_id)),
                    PlainAck::PubRel => self.on_pubrel(packet_id),
                    PlainAck::PubComp => self.on_ack(packet_id, Awaiting::Comp),
                }
                continue;
            }
            match decode_limited(
                &mut self.rbuf,
                self.version,
                self.cfg.message_size_limit,
                self.live.decoded_user_properties(),
            ) {
                Ok(Some(p)) => {
                    let p = match p {
                        // Topic, payload and properties are copied out of the read buffer:
                        // slices of it would pin up to 64 KiB per message kept queued or
                        // retained.
                        Packet::Publish(mut p) => {
                            (p.topic, p.payload) = p.topic.copy_with(&p.payload);
                            p.properties = crate::message::owned_properties(p.properties);
                            p.raw_properties = Bytes::new();
                            Packet::Publish(p)
                        }
                        // Deliveries deferred so far go first: nothing this packet does
                        // (a SUBSCRIBE's retained messages, a session change) may
                        // overtake them.
                        other => {
                            self.flush_deferred();
                            other
                        }
                    };
                    if let Err(end) = self.handle(p) {
                        return Some(end);
                    }
                }
                Ok(None) => return None,
                Err(e) => {
                    Stats::inc(&self.inner.stats.protocol_errors);
                    if let Some(suppressed) = PEER_LOG.admit() {
                        warn!(peer = %self.info.peer, client_id = %self.at.session.client_id, error = %e, suppressed, "bad packet; disconnecting");
                    }
                    return Some(End::Server(e.reason_code(), e.detail));
                }
            }
        }
    }

    fn send(&mut self, p: &Packet) {
        // Our own packets are valid by construction and well under the size limits.
        let _ = p.encode(self.version, &mut self.wbuf);
    }

    /// Sends an acknowledgement once the store has made `ticket` durable: the client must
    /// not hear "received" for something a crash could lose. Acknowledgements stay in order.
    fn ack(&mut self, ticket: u64, p: Packet) {
        // Ticket 0: nothing was stored (a session that is not persisted), so no need to
        // read the store's durable ticket (a lock on its watch) per acknowledgement.
        if !self.has_pending_acks() && (ticket == 0 || ticket <= self.durable_now()) {
            self.send(&p);
        } else {
            self.held
                .get_or_insert_with(Box::default)
                .acks
                .push_back((ticket, p));
        }
    }

    fn has_pending_acks(&self) -> bool {
        self.held.as_ref().is_some_and(|h| !h.acks.is_empty())
    }

    fn has_holds(&self) -> bool {
        self.held.as_ref().is_some_and(|h| !h.writes.is_empty())
    }

    /// The store's durable ticket, remembered in `durable_seen` for `main_loop`.
    fn durable_now(&self) -> u64 {
        let d = if self.flags.has(Flags::DURABLE) {
            self.inner.durable_now()
        } else {
            u64::MAX
        };
        self.durable_seen.set(d);
        d
    }

    fn release_acks(&mut self) {
        let durable = self.durable_now();
        let Some(h) = &mut self.held else { return };
        while h.acks.front().is_some_and(|(t, _)| *t <= durable) {
            if let Some((_, p)) = h.acks.pop_front() {
                // As `send`: our own packets are valid by construction.
                let _ = p.encode(self.version, &mut self.wbuf);
            }
        }
    }

    fn handle(&mut self, p: Packet) -> Result<(), End> {
        match p {
            Packet::Publish(p) => self.on_publish(p),
            Packet::PubAck(a) => {
                self.on_ack(a.packet_id, Awaiting::Ack);
                Ok(())
            }
            Packet::PubRec(a) => {
                self.on_pubrec(&a);
                Ok(())
            }
            Packet::PubRel(a) => {
                self.on_pubrel(a.packet_id);
                Ok(())
            }
            Packet::PubComp(a) => {
                self.on_ack(a.packet_id, Awaiting::Comp);
                Ok(())
            }
            Packet::Subscribe(s) => {
                self.on_subscribe(s);
                Ok(())
            }
            Packet::Unsubscribe(u) => {
                self.on_unsubscribe(u);
                Ok(())
            }
            Packet::PingReq => {
                self.send(&Packet::PingResp);
                Ok(())
            }
            Packet::Disconnect(d) => self.on_disconnect(&d),
            Packet::Connect(_) => Err(self.protocol_error("second CONNECT [MQTT-3.1.0-2]")),
            Packet::Auth(a) => self.on_auth(&a),
            other => {
                debug!(packet = other.name(), "client sent a server-only packet");
                Err(self.protocol_error("packet only a server may send"))
            }
        }
    }

    /// Re-authentication on a live connection (section 4.12.1): the client starts it with
    /// AUTH 0x19 and the method of its CONNECT [MQTT-4.12.1-1]; success is AUTH 0x00, failure
    /// a DISCONNECT [MQTT-4.12.1-2]. Publications continue meanwhile.
    fn on_auth(&mut self, a: &halyard_codec::Auth) -> Result<(), End> {
        let Some((name, method)) = self.rare.as_ref().and_then(|r| r.enhanced.clone()) else {
            return Err(self.protocol_error("AUTH without enhanced authentication [MQTT-4.12.0-2]"));
        };
        if a.properties.authentication_method.as_ref() != Some(&name) {
            return Err(
                self.protocol_error("AUTH with another method than CONNECT's [MQTT-4.12.1-1]")
            );
        }
        let data = a.properties.authentication_data.as_deref();
        let reauth = self.rare.as_mut().and_then(|r| r.reauth.take());
        let step = match (a.reason, reauth) {
            (ReasonCode::ReAuthenticate, None) => method.start(data),
            (ReasonCode::ContinueAuthentication, Some(mut ex)) => ex.step(data),
            _ => return Err(self.protocol_error("unexpected AUTH reason code [MQTT-4.12.0-2]")),
        };
        match step {
            AuthStep::Continue(data, ex) => {
                if let Some(r) = &mut self.rare {
                    r.reauth = Some(ex);
                }
                self.send(&auth_packet(
                    ReasonCode::ContinueAuthentication,
                    &name,
                    Some(data),
                ));
                Ok(())
            }
            AuthStep::Success { username, data }
                if self.info.username.as_deref() == Some(username.as_str()) =>
            {
                self.send(&auth_packet(ReasonCode::Success, &name, data));
                Ok(())
            }
            AuthStep::Success { .. } => Err(End::Server(
                ReasonCode::NotAuthorized,
                "re-authenticated as another user",
            )),
            AuthStep::Failure(_) => Err(End::Server(
                ReasonCode::NotAuthorized,
                "re-authentication failed [MQTT-4.12.1-2]",
            )),
        }
    }

    fn protocol_error(&self, why: &'static str) -> End {
        Stats::inc(&self.inner.stats.protocol_errors);
        if let Some(suppressed) = PEER_LOG.admit() {
            warn!(peer = %self.info.peer, client_id = %self.at.session.client_id, why, suppressed, "protocol error; disconnecting");
        }
        End::Server(ReasonCode::ProtocolError, why)
    }

    /// `p`'s topic, payload and properties must not be slices of the read buffer.
    fn on_publish(&mut self, mut p: Publish) -> Result<(), End> {
        let topic_alias_maximum = self.cfg.topic_alias_maximum;
        if let Some(alias) = p.properties.topic_alias {
            if alias > topic_alias_maximum {
                // [MQTT-3.3.2-9]: over our Topic Alias Maximum.
                Stats::inc(&self.inner.stats.protocol_errors);
                return Err(End::Server(
                    ReasonCode::TopicAliasInvalid,
                    "topic alias above maximum [MQTT-3.3.2-9]",
                ));
            }
            if p.topic.is_empty() {
                match self.aliases.as_ref().and_then(|a| a.inbound.get(&alias)) {
                    Some(t) => p.topic = t.clone(),
                    None => return Err(self.protocol_error("unknown topic alias [MQTT-3.3.2-12]")),
                }
            } else {
                // A copy: the alias lives as long as the connection, and a slice would
                // pin the read buffer it came in.
                self.aliases
                    .get_or_insert_default()
                    .inbound
                    .insert(alias, p.topic.copy_with(&[]).0);
            }
        }
        if !p.properties.subscription_identifiers.is_empty() {
            return Err(self.protocol_error("subscription identifier from a client [MQTT-3.3.4-6]"));
        }
        if let Some(why) = self
            .live
            .user_properties_over(&p.properties.user_properties)
        {
            // Only v5 has properties. Refused before anything holds them: 0x97 for QoS
            // 1/2, QoS 0 dropped; counted either way.
            Stats::inc(&self.inner.stats.properties_refused);
            debug!(client_id = %self.at.session.client_id, why, "PUBLISH refused");
            let ack = Ack {
                reason: ReasonCode::QuotaExceeded,
                properties: AckProperties {
                    reason_string: Some(why.into()),
                    ..AckProperties::default()
                },
                ..Ack::new(p.packet_id)
            };
            self.answer_unrouted(p.qos, ack);
            return Ok(());
        }
        let Publish {
            topic,
            payload,
            qos,
            retain,
            packet_id,
            properties,
            ..
        } = p;
        self.accept_publish(
            Incoming {
                topic,
                payload,
                qos,
                retain,
                packet_id,
            },
            Props::new(properties),
        )
    }

    /// Answers a PUBLISH that goes nowhere with `ack`: PUBACK or PUBREC (nothing for QoS
    /// 0). Its packet id is not held: a QoS 2 exchange ends at the PUBREC.
    fn answer_unrouted(&mut self, qos: QoS, ack: Ack) {
        match qos {
            QoS::AtMostOnce => {}
            QoS::AtLeastOnce => self.ack(0, Packet::PubAck(ack)),
            QoS::ExactlyOnce => self.ack(0, Packet::PubRec(ack)),
        }
    }

    /// The checks and routing every PUBLISH goes through once its topic is known. Its
    /// properties come apart: most messages have none, and the fast path in
    /// `process_packets` never builds them.
    fn accept_publish(&mut self, p: Incoming, properties: Props) -> Result<(), End> {
        let v5 = self.version.is_v5();
        // What this connection's CONNACK promised (copied: an `Arc` clone per message is
        // two atomic operations for a few numbers).
        let (max_qos, retain_available, max_inflight) = (
            self.cfg.max_qos,
            self.cfg.retain_available,
            self.cfg.max_inflight_messages,
        );
        if Inner::topic_over_limits(&self.live, p.topic.as_str()) {
            // Valid MQTT, over our limits: v5 is told 0x90; 3.1.1 can only be given a
            // positive acknowledgement, and the message goes nowhere [MQTT-3.3.5-2].
            Stats::inc(&self.inner.stats.topic_refused);
            let ack = Ack {
                reason: if v5 {
                    ReasonCode::TopicNameInvalid
                } else {
                    ReasonCode::Success
                },
                ..Ack::new(p.packet_id)
            };
            self.answer_unrouted(p.qos, ack);
            return Ok(());
        }
        if let Some(r) = &mut self.rate {
            r.spend(p.payload.len());
        }
        if p.qos > max_qos {
            return Err(End::Server(
                ReasonCode::QoSNotSupported,
                "QoS above maximum QoS [MQTT-3.2.2-12]",
            ));
        }
        if p.retain && !retain_available {
            return Err(End::Server(
                ReasonCode::RetainNotSupported,
                "retain not available [MQTT-3.2.2-13]",
            ));
        }
        // Counted per batch (see `process_input`).
        self.batch.get_or_insert_default().received[p.qos as usize] += 1;
        let mut ticket = 0;
        if p.qos == QoS::ExactlyOnce {
            let mut st = self.at.session.lock();
            if st.inbound_qos2.contains(&p.packet_id) {
                // A resend of a message already received: acknowledge, do not deliver again
                // [MQTT-4.3.3-10].
                drop(st);
                self.ack(0, Packet::PubRec(Ack::new(p.packet_id)));
                return Ok(());
            }
            if st.inbound_qos2.len() >= usize::from(max_inflight.max(1)) {
                drop(st);
                Stats::inc(&self.inner.stats.protocol_errors);
                return Err(End::Server(
                    ReasonCode::ReceiveMaximumExceeded,
                    "receive maximum exceeded [MQTT-3.3.4-9]",
                ));
            }
            st.inbound_qos2.insert(p.packet_id);
        }
        let invalid_payload = v5
            && properties
                .get()
                .is_some_and(|p| p.payload_format_indicator == Some(true))
            && std::str::from_utf8(&p.payload).is_err();
        let denied = !invalid_payload && !self.allowed(Access::Write, p.topic.as_str());
        let mut reason = ReasonCode::Success;
        if denied {
            // v5: PUBACK/PUBREC 0x87 ends the exchange. 3.1.1 has no way to say no: a
            // positive acknowledgement, and the message goes nowhere [MQTT-3.3.5-2].
            Stats::inc(&self.inner.stats.publish_denied);
            if v5 {
                reason = ReasonCode::NotAuthorized;
                if p.qos == QoS::ExactlyOnce {
                    self.release_inbound(p.packet_id);
                }
            }
        } else if invalid_payload {
            // [MQTT-3.3.2-4]: the sender promised UTF-8; we may refuse it.
            reason = ReasonCode::PayloadFormatInvalid;
            if p.qos == QoS::ExactlyOnce {
                self.release_inbound(p.packet_id);
            }
        } else {
            // `p` owns its bytes: `process_input` copied them out of the read buffer.
            if self.ids_left == 0 {
                self.next_id = self.inner.message_ids(MESSAGE_ID_BLOCK.into()).start;
                self.ids_left = MESSAGE_ID_BLOCK;
            }
            let id = self.next_id;
            self.next_id += 1;
            self.ids_left -= 1;
            let msg = Arc::new(Message::from_parts(
                id,
                p.topic,
                p.payload,
                p.qos,
                p.retain,
                properties,
                // Only the admin API shows who published (retained messages, taps); No
                // Local is decided from the client id given to routing. An `Arc` clone
                // per message otherwise.
                (p.retain || self.inner.taps.load(std::sync::atomic::Ordering::Relaxed) > 0)
                    .then(|| self.at.session.client_id.clone()),
                // When it was read: its expiry counts from then, and it saves a clock read
                // per message.
                self.inner.instant_at(self.rx_ns),
                Some(self.inner.memory),
            ));
            // What its drop refunds (properties included).
            let b = self.batch.get_or_insert_default();
            b.charged.0 += msg.cost();
            b.charged.1 += 1;
            let mut extra = Vec::new();
            if p.qos == QoS::ExactlyOnce && self.at.session.lock().persistent() {
                // In the same batch as the routing: a crash keeps both or neither, so a held
                // id always means its copies are stored, and a resend after a crash that
                // lost the id routes the message for the first time.
                extra.push(Op::InboundQos2 {
                    client_id: self.at.session.client_id.to_string(),
                    packet_id: p.packet_id,
                    held: true,
                });
            }
            let (matched, t) = self.inner.publish(
                &msg,
                Some(&self.at.session.client_id),
                self.routes.get_or_insert_default(),
                extra,
                &self.live,
                Some(&mut self.batch.get_or_insert_default().deferred),
            );
            ticket = ticket.max(t);
            if v5 && matched == 0 {
                reason = ReasonCode::NoMatchingSubscribers;
            }
        }
        let ack = Ack {
            packet_id: p.packet_id,
            reason: if v5 { reason } else { ReasonCode::Success },
            properties: AckProperties::default(),
        };
        match p.qos {
            QoS::AtMostOnce => {
                if invalid_payload {
                    return Err(End::Server(
                        ReasonCode::PayloadFormatInvalid,
                        "payload is not UTF-8 [MQTT-3.3.2-4]",
                    ));
                }
            }
            QoS::AtLeastOnce => self.ack(ticket, Packet::PubAck(ack)),
            QoS::ExactlyOnce => self.ack(ticket, Packet::PubRec(ack)),
        }
        Ok(())
    }

    fn on_ack(&mut self, packet_id: u16, expect: Awaiting) {
        let mut st = self.at.session.lock();
        if st
            .inflight
            .get(&packet_id)
            .is_some_and(|f| f.state == expect)
        {
            if let Some(f) = st.inflight.remove(&packet_id)
                && st.persists(&f.out)
            {
                // The delivery is complete: the store must forget it (and, with its last
                // delivery, the message body).
                self.inner.store.apply(vec![Op::Completed {
                    client_id: self.at.session.client_id.to_string(),
                    packet_id,
                }]);
            }
        } else {
            debug!(client_id = %self.at.session.client_id, packet_id, "acknowledgement for an unknown packet id");
        }
    }

    fn on_pubrec(&mut self, a: &Ack) {
        let mut st = self.at.session.lock();
        let persistent = st.persistent();
        let client_id = || self.at.session.client_id.to_string();
        let packet_id = a.packet_id;
        // PUBREL waits until "PUBREC received" is durable: once the client has PUBREL it
        // may complete and forget the packet id, so a restart that still saw the message as
        // unacknowledged would resend the PUBLISH and the client would deliver it twice.
        let mut ticket = 0;
        let reply = match st.inflight.get_mut(&packet_id) {
            Some(f) if f.state == Awaiting::Rec && a.reason.is_error() => {
                // v5: a PUBREC with an error code ends the exchange; PUBREL is only sent for
                // codes below 0x80 [MQTT-4.3.3-4].
                st.inflight.remove(&packet_id);
                if persistent {
                    self.inner.store.apply(vec![Op::Completed {
                        client_id: client_id(),
                        packet_id,
                    }]);
                }
                None
            }
            Some(f) if matches!(f.state, Awaiting::Rec | Awaiting::Comp) => {
                if f.state == Awaiting::Rec && persistent {
                    ticket = self.inner.store.apply(vec![Op::Released {
                        client_id: client_id(),
                        packet_id,
                    }]);
                }
                f.state = Awaiting::Comp;
                Some(ReasonCode::Success)
            }
            _ => Some(ReasonCode::PacketIdentifierNotFound),
        };
        drop(st);
        if let Some(reason) = reply {
            let reason = if self.version.is_v5() {
                reason
            } else {
                ReasonCode::Success
            };
            self.ack(
                ticket,
                Packet::PubRel(Ack {
                    reason,
                    ..Ack::new(a.packet_id)
                }),
            );
        }
    }

    /// Forgets an inbound QoS 2 packet id: whether it was held, and the store ticket.
    fn release_inbound(&self, packet_id: u16) -> (bool, u64) {
        let mut st = self.at.session.lock();
        let known = st.inbound_qos2.remove(&packet_id);
        let mut ticket = 0;
        if known && st.persistent() {
            // PUBCOMP waits for this: after a crash the id must not still look held, or the
            // client's next message with that id would be taken for a resend and lost.
            ticket = self.inner.store.apply(vec![Op::InboundQos2 {
                client_id: self.at.session.client_id.to_string(),
                packet_id,
                held: false,
            }]);
        }
        (known, ticket)
    }

    fn on_pubrel(&mut self, packet_id: u16) {
        let (known, ticket) = self.release_inbound(packet_id);
        let reason = if known || !self.version.is_v5() {
            ReasonCode::Success
        } else {
            ReasonCode::PacketIdentifierNotFound
        };
        self.ack(
            ticket,
            Packet::PubComp(Ack {
                reason,
                ..Ack::new(packet_id)
            }),
        );
    }

    fn on_subscribe(&mut self, s: Subscribe) {
        let inner = self.inner.clone();
        let cfg = inner.cfg();
        let now = Instant::now();
        let id = s.properties.subscription_identifier;
        let mut reasons = Vec::with_capacity(s.filters.len());
        let mut retained = Vec::new();
        let mut ticket = 0;
        let not_authorized =
            if self.version.is_v5() && self.inner.security().subscribe_denied_not_authorized {
                ReasonCode::NotAuthorized
            } else {
                ReasonCode::UnspecifiedError // 0x80: 3.1.1's only failure code
            };
        for (filter, opts) in s.filters {
            if filter.is_shared() && !cfg.shared_subscriptions {
                reasons.push(ReasonCode::SharedSubscriptionsNotSupported);
                continue;
            }
            if Inner::topic_over_limits(&cfg, filter.filter()) {
                Stats::inc(&inner.stats.topic_refused);
                reasons.push(if self.version.is_v5() {
                    ReasonCode::TopicFilterInvalid
                } else {
                    ReasonCode::UnspecifiedError
                });
                continue;
            }
            {
                // A new subscription needs room in the session's count and in the memory
                // budget it is charged to (a replaced one is charged already).
                let st = self.at.session.lock();
                if !st.subscriptions.contains_key(filter.as_str())
                    && ((cfg.max_subscriptions_per_client > 0
                        && st.subscriptions.len() >= cfg.max_subscriptions_per_client)
                        || self.inner.memory_over_budget(&self.live))
                {
                    drop(st);
                    Stats::inc(&inner.stats.subscribe_quota_exceeded);
                    reasons.push(if self.version.is_v5() {
                        ReasonCode::QuotaExceeded
                    } else {
                        ReasonCode::UnspecifiedError
                    });
                    continue;
                }
            }
            // A shared subscription is authorized on its topic filter.
            if !self.allowed(Access::Subscribe, filter.filter()) {
                Stats::inc(&self.inner.stats.subscribe_denied);
                reasons.push(not_authorized);
                continue;
            }
            let qos = grant(opts.qos, cfg.max_qos);
            let options = SubscriptionOptions { qos, ..opts };
            // Kept for the session's life: not a slice pinning the read buffer.
            let filter = filter.copied();
            let sub = Subscription {
                filter: filter.clone(),
                options,
                id,
            };
            let existed = self
                .at
                .session
                .lock()
                .subscriptions
                .insert(filter.as_str().into(), sub.clone())
                .is_some();
            if !existed {
                self.inner
                    .memory
                    .add_subscription_bytes(Subscription::cost(filter.as_str()));
            }
            self.inner
                .subs
                .subscribe(&filter, &self.at.session, options, id);
            ticket = ticket.max(self.inner.persist_subscription(&self.at.session, &sub));
            reasons.push(match qos {
                QoS::AtMostOnce => ReasonCode::GRANTED_QOS0,
                QoS::AtLeastOnce => ReasonCode::GrantedQoS1,
                QoS::ExactlyOnce => ReasonCode::GrantedQoS2,
            });
            // Retained messages per Retain Handling [MQTT-3.3.1-9, MQTT-3.3.1-10,
            // MQTT-3.3.1-11]; none for shared subscriptions (as mosquitto, HiveMQ, EMQX:
            // a group member joining must not replay state to the whole group).
            use halyard_codec::RetainHandling::*;
            let send = !filter.is_shared()
                && match options.retain_handling {
                    SendOnSubscribe => true,
                    SendIfNew => !existed,
                    DoNotSend => false,
                };
            if send {
                for msg in self.inner.retained.matching(&filter, now) {
                    // Retained messages are filtered by read rights too.
                    if !self.allowed(Access::Read, msg.topic.as_str()) {
                        Stats::inc(&self.inner.stats.dropped_not_authorized);
                        continue;
                    }
                    retained.push(Outgoing {
                        qos: msg.qos.min(qos),
                        retain: true, // [MQTT-3.3.1-8]
                        subscription_ids: id.into_iter().collect(),
                        shared: None,
                        recorded: false,
                        msg,
                    });
                }
            }
        }
        // SUBACK for a persistent session only once the subscription is durable.
        self.ack(
            ticket,
            Packet::SubAck(SubAck {
                packet_id: s.packet_id,
                reasons,
                properties: AckProperties::default(),
            }),
        );
        let limits = Inner::queue_limits(&self.inner.cfg());
        let mut ops = Vec::new();
        let msgs: Vec<Arc<Message>> = retained.iter().map(|o| o.msg.clone()).collect();
        for out in retained {
            let (r, _) = self.at.session.enqueue(out, limits, &mut ops);
            self.inner.count_enqueue(r);
        }
        let t = if ops.is_empty() {
            0
        } else {
            self.inner.store.apply(ops)
        };
        for m in msgs {
            m.set_ticket(t);
        }
    }

    fn on_unsubscribe(&mut self, u: Unsubscribe) {
        let mut reasons = Vec::with_capacity(u.filters.len());
        let mut ticket = 0;
        for filter in u.filters {
            let existed = {
                let mut st = self.at.session.lock();
                let existed = st.subscriptions.remove(filter.as_str()).is_some();
                if existed {
                    self.inner
                        .memory
                        .add_subscription_bytes(-Subscription::cost(filter.as_str()));
                }
                if existed && st.stored {
                    ticket = self.inner.store.apply(vec![Op::Unsubscribe {
                        client_id: self.at.session.client_id.to_string(),
                        filter: filter.to_string(),
                    }]);
                }
                existed
            };
            self.inner.subs.unsubscribe(&filter, &self.at.session);
            reasons.push(if existed {
                ReasonCode::Success
            } else {
                ReasonCode::NoSubscriptionExisted
            });
        }
        self.ack(
            ticket,
            Packet::UnsubAck(UnsubAck {
                packet_id: u.packet_id,
                reasons,
                properties: AckProperties::default(),
            }),
        );
    }

    fn on_disconnect(&mut self, d: &Disconnect) -> Result<(), End> {
        if let Some(expiry) = d.properties.session_expiry_interval {
            if self.flags.has(Flags::EXPIRY_ZERO) && expiry != 0 {
                return Err(self
                    .protocol_error("session expiry raised from 0 on DISCONNECT [MQTT-3.14.2-2]"));
            }
            self.at.session.lock().expiry_interval =
                expiry.min(self.cfg.max_session_expiry_interval);
        }
        Err(End::ClientDisconnect(d.reason))
    }

    /// Moves queued messages into the write buffer within the client's Receive Maximum.
    fn fill(&mut self) {
        let mut now = message::LazyNow::default();
        let inner = self.inner.clone();
        let session = self.at.session.clone();
        let mut st = session.lock();
        // Store ops of this fill, applied once at the end while the lock is still held.
        let mut ops = Vec::new();
        let cid = || session.client_id.to_string();
        // Deliveries by QoS, added to the stats once at the end.
        let mut sent = [0u32; 3];
        self.flags.set(Flags::BLOCKED_ON_DURABLE, false);
        // Read at most once per fill, and only for a recorded delivery: the watch borrow
        // is not free, and a ticket that becomes durable meanwhile wakes the loop again.
        let mut durable = None;
        // Where the first QoS 2 PUBLISH to a stored session starts in `wbuf` (see `holds`).
        let mut hold_from = None;
        while self.wbuf.len() < WRITE_BUFFER_HIGH_WATER_BYTES {
            // A run of plain QoS 0 messages whose packets its segment keeps: copied as they
            // are, as many as fit (what the per-message path below would write for them,
            // with no identifiers or alias to add and none too large for this client).
            if let Some(f) = st.queue.front_frames(self.version)
                && (!self.version.is_v5() || f.subscription_ids.is_empty())
                && self.outbound_alias(f.topic).is_none()
                && f.longest() <= self.client_max_packet as usize
                && self.allowed(Access::Read, f.topic.as_str())
            {
                let (n, bytes) = f.take(WRITE_BUFFER_HIGH_WATER_BYTES - self.wbuf.len());
                self.wbuf.extend_from_slice(bytes);
                sent[0] += n as u32;
                st.queue.drop_front_run(n);
                continue;
            }
            let Some(front) = st.queue.front() else { break };
            // [MQTT-3.3.2-5]: expired before onward delivery started. Read rights are
            // checked on delivery, so a deny rule or a reload applies to queued messages.
            let skip = if front.msg.is_expired_lazy(&mut now) {
                Some(&inner.stats.expired_messages)
            } else if !self.allowed(Access::Read, front.msg.topic.as_str()) {
                Some(&inner.stats.dropped_not_authorized)
            } else {
                None
            };
            if let Some(counter) = skip {
                if let Some(o) = st.queue.pop_front()
                    && st.persists(&o)
                {
                    ops.push(Op::Dequeue {
                        client_id: cid(),
                        message_id: o.msg.id,
                    });
                }
                Stats::inc(counter);
                continue;
            }
            // A recorded delivery waits until its enqueue is durable (see Message::ticket).
            if front.recorded
                && front.msg.ticket.load(std::sync::atomic::Ordering::Acquire)
                    > *durable.get_or_insert_with(|| self.durable_now())
            {
                self.flags.set(Flags::BLOCKED_ON_DURABLE, true);
                break;
            }
            // Messages stay in order: a QoS 1/2 message waiting for window space holds back
            // everything behind it [MQTT-4.6.0-6].
            if front.qos != QoS::AtMostOnce
                && st.inflight.len() >= usize::from(self.client_receive_max)
            {
                break;
            }
            if front.qos == QoS::AtMostOnce {
                // Written from the queue as it stands (one of a run stays in its run):
                // nothing of a QoS 0 delivery outlives the write.
                let alias = self.outbound_alias(&front.msg.topic);
                let d = Delivery {
                    qos: QoS::AtMostOnce,
                    retain: front.retain,
                    dup: false,
                    packet_id: 0,
                    subscription_ids: front.subscription_ids,
                    alias,
                };
                match self.write_delivery(front.msg, d, &mut now) {
                    Ok(()) => {
                        self.alias_sent(&front.msg.topic, alias);
                        sent[0] += 1;
                    }
                    // [MQTT-3.1.2-25]: discard, acting as if it had been delivered.
                    Err(message::WriteError::TooLarge) => {
                        Stats::inc(&inner.stats.dropped_too_large);
                    }
                }
                st.queue.drop_front();
                continue;
            }
            let Some(out) = st.queue.pop_front() else {
                break;
            };
            let persists = st.persists(&out);
            let packet_id = if out.qos == QoS::AtMostOnce {
                0
            } else {
                st.alloc_packet_id()
            };
            let alias = self.outbound_alias(&out.msg.topic);
            let start = self.wbuf.len();
            let d = Delivery {
                qos: out.qos,
                retain: out.retain,
                dup: false,
                packet_id,
                subscription_ids: &out.subscription_ids,
                alias,
            };
            match self.write_delivery(&out.msg, d, &mut now) {
                Ok(()) => {
                    self.alias_sent(&out.msg.topic, alias);
                    sent[out.qos as usize] += 1;
                    if out.qos != QoS::AtMostOnce {
                        if persists {
                            ops.push(Op::Sent {
                                client_id: cid(),
                                message_id: out.msg.id,
                                packet_id,
                            });
                            if out.qos == QoS::ExactlyOnce && self.flags.has(Flags::DURABLE) {
                                hold_from.get_or_insert(start);
                            }
                        }
                        let state = if out.qos == QoS::AtLeastOnce {
                            Awaiting::Ack
                        } else {
                            Awaiting::Rec
                        };
                        st.inflight_seq += 1;
                        let seq = st.inflight_seq;
                        st.inflight
                            .insert(packet_id, crate::session::Inflight { out, state, seq });
                    }
                }
                Err(message::WriteError::TooLarge) => {
                    // [MQTT-3.1.2-25]: discard, acting as if it had been delivered.
                    Stats::inc(&inner.stats.dropped_too_large);
                    if persists {
                        ops.push(Op::Dequeue {
                            client_id: cid(),
                            message_id: out.msg.id,
                        });
                    }
                }
            }
        }
        inner.stats.add_sent(&mut sent);
        if !ops.is_empty() {
            let ticket = inner.store.apply(ops);
            if let Some(at) = hold_from {
                self.held
                    .get_or_insert_with(Box::default)
                    .writes
                    .push_back((at, ticket));
            }
        }
    }

    /// Appends one delivery of `msg` to the write buffer, in this client's protocol
    /// version and within its Maximum Packet Size.
    #[inline]
    fn write_delivery(
        &mut self,
        msg: &Message,
        d: Delivery<'_>,
        now: &mut message::LazyNow,
    ) -> Result<(), message::WriteError> {
        message::write(
            msg,
            d,
            self.version,
            self.client_max_packet,
            now,
            &mut self.wbuf,
        )
    }

    /// How much of `wbuf` may be written now (see `holds`).
    fn writable_len(&mut self) -> usize {
        if !self.has_holds() {
            return self.wbuf.len();
        }
        let durable = self.durable_now();
        let Some(h) = &mut self.held else {
            return self.wbuf.len();
        };
        while h.writes.front().is_some_and(|&(_, t)| t <= durable) {
            h.writes.pop_front();
        }
        h.writes.front().map_or(self.wbuf.len(), |&(at, _)| at)
    }

    /// Outbound topic alias for `topic`, when both sides allow them: `(alias, send the
    /// topic too)`. A new alias is only remembered by [`Self::alias_sent`] once the packet
    /// that introduces it was actually written.
    /// Whether this client may do `access` on `topic`, from the cache when possible.
    /// `$SYS` is the broker's: never writable by a client, whatever the rules say (the
    /// same rule as `Inner::may_write`, for the paths without a connection).
    fn allowed(&mut self, access: Access, topic: &str) -> bool {
        if access == Access::Write && is_sys(topic) {
            return false;
        }
        let generation = self.inner.security_generation();
        if generation != self.acl.generation {
            self.acl.generation = generation;
            self.acl.checked = self.inner.security().authorizer.clone().map(|authorizer| {
                Box::new(AclChecked {
                    authorizer,
                    identity: Identity {
                        client_id: self.at.session.client_id.clone(),
                        username: self.info.username.clone(),
                    },
                    decisions: Default::default(),
                })
            });
        }
        let Some(c) = &mut self.acl.checked else {
            return true;
        };
        let map = &mut c.decisions[access as usize];
        if let Some(&d) = map.get(topic) {
            return d;
        }
        let d = c.authorizer.check(&c.identity, access, topic);
        if map.len() >= ACL_CACHE_ENTRIES {
            map.clear();
        }
        map.insert(topic.into(), d);
        if !d {
            debug!(client_id = %self.at.session.client_id, ?access, topic, "denied by the authorizer");
        }
        d
    }

    fn outbound_alias(&self, topic: &TopicName) -> Option<(u16, bool)> {
        if self.alias_out_max == 0 {
            return None;
        }
        let assigned = self.aliases.as_ref().map(|a| &a.outbound);
        if let Some(&a) = assigned.and_then(|m| m.get(topic)) {
            return Some((a, false));
        }
        let next = u16::try_from(assigned.map_or(0, HashMap::len) + 1).ok()?;
        // All aliases in use: send the full topic (no reassignment, so no client ever sees
        // an alias change meaning under it).
        (next <= self.alias_out_max).then_some((next, true))
    }

    fn alias_sent(&mut self, topic: &TopicName, alias: Option<(u16, bool)>) {
        if let Some((a, true)) = alias {
            self.aliases
                .get_or_insert_default()
                .outbound
                .insert(topic.clone(), a);
        }
    }

    /// On session resume, resends unacknowledged PUBLISH with DUP and PUBREL in their
    /// original order [MQTT-4.4.0-1], each PUBLISH only if the client may still read it.
    fn resend_inflight(&mut self) {
        let mut now = message::LazyNow::default();
        let st = self.at.session.lock();
        let mut pending: Vec<(u64, u16, Awaiting, Outgoing)> = st
            .inflight
            .iter()
            .map(|(&id, f)| (f.seq, id, f.state, f.out.clone()))
            .collect();
        drop(st);
        pending.sort_by_key(|p| p.0);
        for (_, packet_id, state, out) in pending {
            if state == Awaiting::Comp {
                self.send(&Packet::PubRel(Ack::new(packet_id)));
                continue;
            }
            // Read rights are checked on every send, resends too: rules may have changed
            // since the first send. A message the client may no longer read is dropped
            // as if acknowledged.
            if !self.allowed(Access::Read, out.msg.topic.as_str()) {
                let mut st = self.at.session.lock();
                if let Some(f) = st.inflight.remove(&packet_id)
                    && st.persists(&f.out)
                {
                    self.inner.store.apply(vec![Op::Completed {
                        client_id: self.at.session.client_id.to_string(),
                        packet_id,
                    }]);
                }
                drop(st);
                Stats::inc(&self.inner.stats.dropped_not_authorized);
                continue;
            }
            let d = Delivery {
                qos: out.qos,
                retain: out.retain,
                dup: true,
                packet_id,
                subscription_ids: &out.subscription_ids,
                alias: None,
            };
            if self.write_delivery(&out.msg, d, &mut now).is_ok() {
                self.inner.stats.sent(out.qos);
            }
        }
    }

    /// Borrows the connection rather than taking it: a `self` moved into this future
    /// would be a second copy of the connection in every connection task's state.
    async fn finish(&mut self, end: End) {
        let v5 = self.version.is_v5();
        // QoS 2 PUBLISHes whose packet ids are not durable are not sent: the session keeps
        // them in flight and resends them (same ids, DUP) on the next connection.
        if self.has_holds() {
            let writable = self.writable_len();
            self.wbuf.truncate(writable);
        }
        // Tell a v5 client why we close [MQTT-4.13.2-1]; 3.x just gets the close.
        if let End::Server(reason, why) = &end
            && v5
        {
            let props = Properties {
                reason_string: Some((*why).into()),
                ..Properties::default()
            };
            self.send(&Packet::Disconnect(Disconnect {
                reason: *reason,
                properties: props,
            }));
        }
        let _ = timeout(CLOSE_FLUSH_TIMEOUT, async {
            while !self.wbuf.is_empty() {
                if self.io.write_buf(&mut self.wbuf).await.unwrap_or(0) == 0 {
                    break;
                }
            }
        })
        .await;

        Stats::dec(&self.inner.stats.connections_current);
        self.flags.set(Flags::FINISHED, true);
        self.inner.monitor.emit_conn(|| Event::Disconnected {
            peer: self.info.peer.to_string(),
            client_id: self.at.session.client_id.to_string(),
            reason: match &end {
                End::ClientDisconnect(r) => format!("client DISCONNECT {r:?}"),
                End::Closed(why) => format!("connection lost: {why}"),
                End::Server(r, why) => format!("closed by the server {r:?}: {why}"),
            },
        });

        let keep_will = match &end {
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
            End::Server(r, why) => {
                info!(peer = %self.info.peer, client_id = %self.at.session.client_id, reason = ?r, why, "disconnected by server")
            }
        }
        detach(
            &self.inner,
            &self.at.session,
            self.at.conn_id,
            will,
            will_delay,
        );
        // Last, once the session and will are settled: a client we close (DISCONNECT
        // sent, or 3.x closed on an error) is read until it closes too, so our last packet
        // is not lost to a RST. One that closed first has nothing more to read.
        if matches!(end, End::Closed(_)) {
            let _ = timeout(CLOSE_FLUSH_TIMEOUT, self.io.shutdown()).await;
        } else {
            linger(&mut self.io).await;
        }
    }
}

/// Why `attach_session` gave no session.
#[derive(Debug)]
enum NotAttached {
    /// The client id belongs to a session bound to another identity.
    OtherOwner,
    /// A new session would be over `max_sessions` or `max_sessions_per_user`.
    Full(Full),
}

/// Finds or creates the session for a new connection, taking it over from any connection
/// attached to it [MQTT-3.1.4-3]. Returns it and "session present". Refused when the
/// client id belongs to a session bound to another identity (`SessionState::owner`):
/// that session, and any connection attached to it, are left as they are, so no one
/// can read, discard or kick another user's session by naming its client id; and when a
/// new session is over the registry's limits (resuming one never is).
fn attach_session(
    inner: &Arc<Inner>,
    client_id: &Arc<str>,
    clean_start: bool,
    protocol: ProtocolVersion,
    expiry: u32,
    conn_id: u64,
    info: Arc<ConnInfo>,
) -> Result<(Arc<Session>, bool), NotAttached> {
    let existing = {
        let reg = inner.sessions.lock().unwrap_or_else(|e| e.into_inner());
        let existing = reg.get(client_id).cloned();
        // One more session only when none is there to resume or replace.
        if existing.is_none() {
            let cfg = inner.cfg();
            reg.admit(
                info.username.as_ref(),
                cfg.max_sessions,
                cfg.max_sessions_per_user,
            )
            .map_err(NotAttached::Full)?;
        }
        existing
    };
    if let Some(old) = existing {
        let mut st = old.lock();
        if !st.ended
            && let Some(owner) = st.owner()
            && owner != info.username.as_ref()
        {
            return Err(NotAttached::OtherOwner);
        }
        // Taking over closes the old connection, which ends a session that lasts only as
        // long as its connection (v5 expiry 0, 3.x clean session) [MQTT-3.1.2-11]: it is
        // not resumed. (Its DISCONNECT may also still be unread on the old socket; the
        // client then expects no session either.)
        let mut ends_with_old_connection = false;
        if let Some(old_id) = st.take_conn() {
            inner.keepalive_cancel(&st, old_id);
            ends_with_old_connection = st.expiry_interval == 0;
            old.kicked();
        }
        if !clean_start && !st.ended && !ends_with_old_connection {
            st.attach(conn_id);
            st.info = Some(info);
            inner.keepalive_start(&old, &mut st, conn_id);
            st.protocol = protocol;
            st.expiry_interval = expiry;
            // A new connection before the will delay cancels the will [MQTT-3.1.3-9].
            let had_will = st.pending_will.take().is_some();
            drop(st);
            if had_will {
                inner.store.apply(vec![Op::WillPending {
                    client_id: client_id.to_string(),
                    will: None,
                }]);
            }
            old.online.store(true, Ordering::Relaxed);
            return Ok((old, true));
        }
        drop(st);
        inner.end_session(&old);
    }
    let owner = info.username.clone();
    let session = Arc::new(Session::new(client_id.clone(), protocol, expiry));
    {
        let mut st = session.lock();
        st.attach(conn_id);
        st.info = Some(info);
        inner.keepalive_start(&session, &mut st, conn_id);
    }
    session.online.store(true, Ordering::Relaxed);
    inner
        .sessions
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .insert(client_id.clone(), session.clone(), owner);
    Ok((session, false))
}

/// Detaches a closed connection from its session: publishes or schedules its will, and
/// ends the session or starts its expiry clock.
fn detach(
    inner: &Arc<Inner>,
    session: &Arc<Session>,
    conn_id: u64,
    will: Option<Arc<Message>>,
    will_delay: u32,
) {
    let now = Instant::now();
    let mut st = session.lock();
    let still_mine = st.is_attached(conn_id);
    if still_mine {
        inner.keepalive_cancel(&st, conn_id);
        session.forget_waker();
        st.detach_at(std::time::SystemTime::now());
        session.online.store(false, Ordering::Relaxed);
    }
    let ends_now = st.ended || (still_mine && st.expiry_interval == 0);
    let mut publish_now = None;
    let mut pending_store = None;
    if let Some(w) = will {
        if ends_now || will_delay == 0 {
            publish_now = Some(w);
        } else if still_mine {
            // [MQTT-3.1.3-9]: published after the delay or at session end, whichever first.
            let due = now + Duration::from_secs(u64::from(will_delay));
            pending_store = Some(StoredWill {
                message: stored(&w),
                retain: w.retain,
                due: std::time::SystemTime::now() + Duration::from_secs(u64::from(will_delay)),
            });
            st.pending_will = Some(PendingWill { msg: w });
            inner.timers.schedule(
                due,
                crate::broker::TimerEvent::Will(session.clone(), conn_id),
            );
        }
        // Otherwise a new connection took the session over before the delay: not sent.
    }
    let expiry = st.expiry_interval;
    // Shared-subscription messages this member had not sent go to the other members; if
    // the session ends, its unacknowledged ones too (they would be lost otherwise).
    let orphans = if still_mine {
        let durable = inner.durable_now();
        st.take_shared(ends_now, &session.client_id, &*inner.store, durable)
    } else {
        Vec::new()
    };
    drop(st);
    if !orphans.is_empty() {
        inner.redispatch_shared(session, orphans);
    }
    if let Some(w) = publish_now {
        inner.publish_will(session, &w);
    }
    if !still_mine {
        return;
    }
    if ends_now {
        inner.end_session(session);
        return;
    }
    inner.persist_session(session, false);
    if let Some(w) = pending_store {
        inner.store.apply(vec![Op::WillPending {
            client_id: session.client_id.to_string(),
            will: Some(w),
        }]);
    }
    if expiry != u32::MAX {
        let at = now + Duration::from_secs(u64::from(expiry));
        inner.timers.schedule(
            at,
            crate::broker::TimerEvent::SessionExpiry(session.clone(), conn_id),
        );
    }
}

/// A server-assigned client identifier [MQTT-3.1.3-7]: unique within this broker's
/// lifetime by the connection counter, and across restarts by the start time.
fn assign_client_id(inner: &Inner) -> String {
    let n = inner.next_conn_id.fetch_add(1, Ordering::Relaxed);
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    format!("halyard-{t:x}-{n:x}")
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    /// Every connection, idle ones included, holds its task's future, its boxed
    /// `Connection` and its session for its whole life, so their sizes are memory per
    /// connection. The future was 4,496 bytes with the handshake inline and the connection
    /// stored up to three times in it (as `run`'s and `finish`'s `self`, and as the
    /// handshake's result); 744 + 744 after. Then 512 + 448: rarely used parts (topic
    /// aliases, the ACL decision cache, rate limiting, re-authentication, the pause timer)
    /// made on first use, and shutdown delivered through the kick channel instead of a
    /// watch per connection. Then 336 + 440: one stream instead of split halves, one
    /// broker task watching the store's durable ticket instead of a `changed()` future per
    /// connection, `poll_fn`s instead of `async` blocks in the `select!`, and what waits
    /// for durability boxed on first use. Then 264: `finish` boxed (it runs once, at the
    /// end), the pause deadlines and the writable length kept out of the `select!`'s
    /// state, and no tracing wrapper when the connection span is disabled
    /// (`Broker::spawn_connection`). Then 152 (a 256-byte task): the session's wake-up as
    /// a `poll_fn` over `session::Wake` instead of tokio's 64-byte `Notified`, the
    /// `max_connections` permit and the drain sender kept by `Connection`, `main_loop`
    /// awaited by `serve` itself (no `run` around it), and no await inside a `select!`
    /// branch (the branch's output stayed in the state across it).
    ///
    /// The bounds are allocator size classes: tokio allocates a task as a 32-byte header,
    /// the future (with its tracing span, if enabled) after the scheduler handle and task
    /// id, and a 48-byte trailer, rounded up to 128 bytes: 768 bytes per task at a
    /// 520-byte future, 512 at 336, 384 up to 272, 256 up to 152 (32 + 8 + 8 + 8 + 152 +
    /// 48; tokio's stage adds 8 bytes to the future: 392 at 280 was measured as a
    /// 512-byte task). mimalloc serves 256- and 320-byte blocks, so `Connection` and the session's
    /// `ArcInner` must fit those. `Connection` was 440 bytes (a 448-byte block) until the
    /// will and enhanced authentication (`Rare`), the batch counters (`Batch`) and the
    /// access cache (`AclChecked`) were boxed for the clients that use them, the store's
    /// durable ticket was read from one receiver in `Inner` and the keep-alive timer
    /// went to the broker's housekeeping task: 304 with the permit flag and drain sender.
    /// Then 256 (the 256-byte class): peer and user name read from the `ConnInfo` it
    /// shares with its session (one pointer instead of two strings), the last read's time
    /// in 8 bytes, message ids as a next id and a count, and its seven flags in a byte.
    /// The session fits mimalloc's 256-byte class (240 + the `Arc`'s counts) since its
    /// maps share one hasher (`SessionHash`), its QoS 2 ids are boxed on first use, the
    /// attached connection and the time of the last close share a field, and the wake-up's
    /// pending flag sits beside the session's other flags.
    #[tokio::test]
    async fn a_connection_task_stays_small() {
        let broker = crate::Broker::new(
            crate::config::BrokerConfig::default(),
            Arc::new(halyard_store::MemoryStore::new()),
        );
        let (a, _b) = tokio::io::duplex(64);
        let stream: Box<dyn halyard_transport::AsyncStream> = Box::new(a);
        let task = super::serve(
            broker.inner,
            stream,
            "test".into(),
            tokio::sync::mpsc::channel(1).0,
        );
        let size = std::mem::size_of_val(&task);
        assert!(size <= 152, "connection task future is {size} bytes");
        let conn =
            std::mem::size_of::<super::Connection<Box<dyn halyard_transport::AsyncStream>>>();
        assert!(conn <= 256, "Connection is {conn} bytes");
        let session = std::mem::size_of::<crate::session::Session>();
        assert!(session + 16 <= 256, "Session is {session} bytes");
        // Shared by the connection and its session: the 80-byte class with the `Arc`'s
        // counts, the peer's address inline.
        let info = std::mem::size_of::<crate::session::ConnInfo>();
        assert!(info + 16 <= 80, "ConnInfo is {info} bytes");
    }
}

#[cfg(test)]
mod lifecycle_tests {
    use std::sync::Arc;
    use std::time::Duration;

    use halyard_codec::{Packet, ProtocolVersion, ReasonCode};
    use halyard_testkit::{RawClient, Recv};
    use tokio::io::DuplexStream;

    async fn online(
        broker: &crate::Broker,
        id: &str,
        clean: bool,
        keep_alive: u16,
    ) -> RawClient<DuplexStream> {
        online_v(broker, id, clean, keep_alive, ProtocolVersion::V5).await
    }

    async fn online_v(
        broker: &crate::Broker,
        id: &str,
        clean: bool,
        keep_alive: u16,
        protocol: ProtocolVersion,
    ) -> RawClient<DuplexStream> {
        let (a, b) = tokio::io::duplex(64 * 1024);
        broker.spawn_connection(b, "duplex");
        let mut c = RawClient::new(a);
        c.version = protocol;
        c.send(&halyard_testkit::connect_packet(
            protocol, id, clean, keep_alive,
        ))
        .await;
        assert!(matches!(c.recv().await, Packet::ConnAck(_)));
        c
    }

    fn entries(broker: &crate::Broker) -> usize {
        broker.inner.timers.keepalive.lock().unwrap().len()
    }

    /// A keep-alive deadline [MQTT-3.1.2-22] leaves the broker's queue with its
    /// connection: at DISCONNECT, at a close, and at a takeover (the old connection's),
    /// so the queue holds one entry per live connection with a keep alive, and a taken
    /// over connection's deadline cannot close its successor.
    #[tokio::test(start_paused = true)]
    async fn keep_alive_deadlines_leave_with_their_connection() {
        let broker = crate::Broker::new(
            crate::config::BrokerConfig::default(),
            Arc::new(halyard_store::MemoryStore::new()),
        );
        let _none = online(&broker, "no-keep-alive", true, 0).await;
        assert_eq!(entries(&broker), 0);
        let mut a = online(&broker, "k", false, 2).await;
        assert_eq!(entries(&broker), 1);
        // Taken over (session resumed) by a connection with a longer keep alive: the old
        // deadline (3 s) goes with the old connection [MQTT-3.1.4-3].
        let mut b = online(&broker, "k", false, 4).await;
        match a.recv().await {
            Packet::Disconnect(d) => assert_eq!(d.reason, ReasonCode::SessionTakenOver),
            other => panic!("expected the takeover DISCONNECT, got {other:?}"),
        }
        halyard_testkit::eventually("old deadline removed", || entries(&broker) == 1).await;
        // Well past the old connection's 3 s, within the new one's 6 s.
        b.expect_silence(Duration::from_millis(5900)).await;
        match b.recv_within(Duration::from_millis(200)).await {
            Recv::Packet(Packet::Disconnect(d)) => {
                assert_eq!(d.reason, ReasonCode::KeepAliveTimeout)
            }
            other => panic!("expected Keep Alive timeout at 6 s, got {other:?}"),
        }
        halyard_testkit::eventually("expired deadline gone", || entries(&broker) == 0).await;
        // A client that disconnects and one whose socket closes take theirs along.
        let mut c = online(&broker, "c", true, 30).await;
        let d = online(&broker, "d", true, 30).await;
        assert_eq!(entries(&broker), 2);
        c.send_hex("E0 00").await;
        drop(d);
        halyard_testkit::eventually("closed connections' deadlines removed", || {
            entries(&broker) == 0
        })
        .await;
    }

    /// The session's wake-up has one waker slot (`session::Wake`): after a takeover that
    /// resumes the session [MQTT-3.1.4-3], every message published must wake the new
    /// connection, whatever the old one (kicked, not yet closed) does.
    #[tokio::test]
    async fn a_resumed_session_wakes_its_new_connection() {
        use halyard_codec::{QoS, SubscriptionOptions, TopicFilter, TopicName};
        let broker = crate::Broker::new(
            crate::config::BrokerConfig::default(),
            Arc::new(halyard_store::MemoryStore::new()),
        );
        let mut a = online_v(&broker, "w", false, 0, ProtocolVersion::V3_1_1).await;
        a.send(&Packet::Subscribe(halyard_codec::Subscribe {
            packet_id: 1,
            filters: vec![(
                TopicFilter::new("w/t").unwrap(),
                SubscriptionOptions {
                    qos: QoS::AtMostOnce,
                    ..Default::default()
                },
            )],
            properties: Default::default(),
        }))
        .await;
        assert!(matches!(a.recv().await, Packet::SubAck(_)));
        let mut p = online(&broker, "p", true, 0).await;
        // `a` waits, its waker in the slot; `b` takes the session over while `a` has
        // not been read from (its kick is pending, its close not yet seen).
        let mut b = online_v(&broker, "w", false, 0, ProtocolVersion::V3_1_1).await;
        for round in 0..20u8 {
            p.send(&Packet::Publish(halyard_codec::Publish::new(
                TopicName::new("w/t").unwrap(),
                vec![round],
            )))
            .await;
            match b.recv_within(Duration::from_secs(5)).await {
                Recv::Packet(Packet::Publish(m)) => assert_eq!(&m.payload[..], &[round]),
                other => panic!(
                    "round {round}: expected the message on the new connection, got {other:?}"
                ),
            }
        }
        drop(a);
    }

    /// The one waker slot after a takeover [MQTT-3.1.4-3]: the old connection, polled
    /// late (after its successor waits), learns Session taken over and leaves the
    /// successor's waker in place, so a message wakes the successor. Kicks reach only the
    /// attached connection, once. (Registering without the kick check, the old
    /// connection's waker replaced the new one's and this fails.)
    #[test]
    fn a_taken_over_connection_never_replaces_its_successors_waker() {
        use crate::session::Session;
        use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
        use std::task::{Context, Poll, Waker};
        struct Count(AtomicUsize);
        impl std::task::Wake for Count {
            fn wake(self: Arc<Self>) {
                self.0.fetch_add(1, Ordering::SeqCst);
            }
        }
        let count = |c: &Arc<Count>| c.0.load(Ordering::SeqCst);
        let (ca, cb) = (
            Arc::new(Count(AtomicUsize::new(0))),
            Arc::new(Count(AtomicUsize::new(0))),
        );
        let (wa, wb) = (Waker::from(ca.clone()), Waker::from(cb.clone()));
        let (mut cxa, mut cxb) = (Context::from_waker(&wa), Context::from_waker(&wb));

        let session = Session::new("s".into(), ProtocolVersion::V5, 0);
        session.lock().attach(1);
        let seen_a = AtomicU32::new(session.kicks());
        assert!(session.poll_kick(&mut cxa, 1, &seen_a, true).is_pending());
        assert!(session.poll_woken(&mut cxa, &seen_a).is_pending());

        // Connection 2 takes the session over (as `attach_session` does).
        {
            let mut st = session.lock();
            assert!(st.take_conn().is_some());
            session.kicked();
            st.attach(2);
        }
        assert_eq!(count(&ca), 1, "the takeover wakes the old connection");
        let seen_b = AtomicU32::new(session.kicks());
        assert!(session.poll_kick(&mut cxb, 2, &seen_b, true).is_pending());
        assert!(session.poll_woken(&mut cxb, &seen_b).is_pending());

        // The old connection runs late, its wake-up branch first (the worst order).
        assert!(session.poll_woken(&mut cxa, &seen_a).is_ready());
        assert_eq!(
            session.poll_kick(&mut cxa, 1, &seen_a, true),
            Poll::Ready(ReasonCode::SessionTakenOver)
        );
        session.wake();
        assert_eq!(count(&cb), 1, "a message wakes the new connection");
        assert_eq!(count(&ca), 1, "and not the old one");

        // An admin kick reaches the attached connection with its reason, once.
        let mut st = session.lock();
        assert!(session.kick(&mut st, ReasonCode::AdministrativeAction));
        assert!(!session.kick(&mut st, ReasonCode::ServerShuttingDown));
        drop(st);
        assert_eq!(
            session.poll_kick(&mut cxb, 2, &seen_b, true),
            Poll::Ready(ReasonCode::AdministrativeAction)
        );
    }

    /// The deadline keeps only its low 32 bits in the session; the rest is restored as
    /// the value nearest to now, also across a 2^32 ms boundary either way.
    #[test]
    fn keep_alive_deadline_restored_from_its_low_bits() {
        let restore = crate::broker::restore_ms;
        for now in [
            0u64,
            5_000,
            1 << 32,
            (1 << 32) + 10,
            (3 << 32) - 10,
            1 << 40,
        ] {
            for ahead in [0u64, 1, 98_302_500] {
                let due = now + ahead;
                assert_eq!(restore(now, due as u32), due, "now {now} due {due}");
            }
            if now >= 1_000 {
                let due = now - 1_000; // came due, not yet handled
                assert_eq!(restore(now, due as u32), due, "now {now} due {due}");
            }
        }
    }
}
