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

mod end;
mod guard;
mod handshake;
mod inbound;
mod open;
mod outbound;
mod proto;
pub mod sim;
mod subscribe;
#[cfg(test)]
mod tests;

use end::*;
use guard::*;
use handshake::*;
use open::*;
pub(crate) use proto::Proto;
use proto::*;

use std::future::{Future, poll_fn};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use halyard_codec::{BytesMut, Packet, ReasonCode, decode_limited};
use halyard_transport::PeerInfo;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::time::{Instant, sleep_until};

use crate::config::defaults::WRITE_BUFFER_HIGH_WATER_BYTES;
use crate::lifecycle::detach;
use crate::message::LazyNow;
use crate::state::Inner;
use crate::stats::Stats;

/// Initial read buffer; it grows to the largest packet seen (decode reserves the declared
/// size), so idle connections stay small.
const READ_BUFFER_INITIAL_BYTES: usize = 512;
/// Message ids a connection takes from the broker's counter at a time: one atomic add per
/// 64 messages instead of one per message.
const MESSAGE_ID_BLOCK: u8 = 64;
/// How long a closing connection may spend flushing its last packets (the DISCONNECT).
const CLOSE_FLUSH_TIMEOUT: Duration = Duration::from_secs(2);

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
    internal: bool,
) -> impl Future<Output = ()> + Send + 'static
where
    S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    let handshake = Box::pin(handshake(inner, stream, info, drain, internal));
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

/// One budget for every log line about a misbehaving or refused client: a flood of bad
/// connections costs a few lines a second, each reporting how many were suppressed.
static PEER_LOG: std::sync::LazyLock<halyard_transport::LogBudget> =
    std::sync::LazyLock::new(|| {
        halyard_transport::LogBudget::new(halyard_transport::LOG_LINES_PER_SECOND)
    });

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

/// The connection task's state: the protocol state (`Proto`) and what only the task
/// driving a socket needs.
struct Connection<S> {
    proto: Proto,
    io: S,
    /// Wakes a connection paused by its publish rate or the memory budget; made on the
    /// first pause (a `Sleep` is ~110 bytes, and most connections never pause).
    pause_timer: Option<Pin<Box<tokio::time::Sleep>>>,
    /// A clone of the shutdown drain's sender: shutdown waits until every one is gone.
    drain: Option<tokio::sync::mpsc::Sender<()>>,
}

/// A client silent this long (ns) before a read that starts with a PUBLISH yields first
/// (see `Then::Publish`). A publisher streaming at 1,000 messages a second or more never
/// waits this long between reads.
const PUBLISH_YIELD_AFTER_NS: u64 = 1_000_000;

/// The longest a PUBLISH waits for SUBSCRIBEs read before it, from its read (ns; see
/// `Then::Publish`).
const SUBSCRIBE_WAIT_NS: u64 = 2_000_000;

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

/// Why a session's kick closes its connection: keep alive run out, an administrator, the
/// broker shutting down, or a takeover.
pub(crate) fn kicked(reason: ReasonCode) -> Violation {
    match reason {
        ReasonCode::KeepAliveTimeout => {
            Violation::new(reason, "MQTT-3.1.2-22", "keep alive timeout")
        }
        ReasonCode::AdministrativeAction => {
            Violation::new(reason, "", "disconnected by an administrator")
        }
        ReasonCode::ServerShuttingDown => Violation::new(reason, "", "server shutting down"),
        _ => Violation::new(reason, "MQTT-3.1.4-3", "session taken over"),
    }
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

impl<S> Connection<S>
where
    S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    /// What runs before the loop first waits; `Some` when the connection ends already.
    pub(super) fn start(&mut self) -> Option<End> {
        // Shutdown reaches a running connection through its kick (`Broker::shutdown` kicks
        // every attached one after raising the flag; a watch here would be 120 bytes of
        // every connection's task). One attached after that sweep sees the flag here.
        if *self.proto.inner.shutdown.borrow() {
            return Some(End::Server(Violation::new(
                ReasonCode::ServerShuttingDown,
                "",
                "shutting down",
            )));
        }
        // Packets the client sent right behind CONNECT, read with it: handled now, not
        // when its next bytes happen to arrive (a `connect(); subscribe()` client would
        // wait for a SUBACK forever).
        self.proto.process_input(Instant::now())
    }

    pub(super) async fn main_loop(&mut self) -> End {
        loop {
            self.proto.durable_seen.set(0);
            if self.proto.has_pending_acks() {
                self.proto.release_acks();
            }
            if self.proto.wbuf.len() < WRITE_BUFFER_HIGH_WATER_BYTES {
                // The clock is read only if a queued message can expire.
                self.proto.fill(&mut LazyNow::default());
            }
            // Over its publish rate, a client is not read until its budget refills: it
            // slows down instead of us buffering or dropping. Keep alive does not run out
            // while we are the ones not reading. (No clock read unless one of them is on.)
            // The deadlines stay inside this block, so they are not part of the task's
            // state across the `select!` (every byte of it is memory per connection).
            let (throttled, paused) = {
                let now = (self.proto.rate.is_some()
                    || self.proto.flags.has(Flags::MEMORY_BLOCKED))
                .then(Instant::now);
                let throttled_until = now.and_then(|now| {
                    self.proto
                        .rate
                        .as_mut()?
                        .blocked_until(now, &self.proto.inner.stats)
                });
                if let Some(now) = now
                    && (throttled_until.is_some() || self.proto.flags.has(Flags::MEMORY_BLOCKED))
                {
                    self.proto.heard_at(now);
                }
                // One timer for both pauses; over the memory budget, look again every
                // MEMORY_RECHECK.
                let memory_recheck = now
                    .filter(|_| self.proto.flags.has(Flags::MEMORY_BLOCKED))
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
            let chunk = self.proto.read_chunk as usize;
            if chunk > 0 && self.proto.rbuf.capacity() - self.proto.rbuf.len() < chunk / 2 {
                self.proto.rbuf.reserve(chunk);
            }
            // (A buffer without room reads up to 64 bytes first: `poll_io` reads 64 on the
            // stack for one without capacity; `BytesMut` reserves 64 for a full one.)
            let read_room = (self.proto.rbuf.capacity() - self.proto.rbuf.len()).max(64);
            let writable = self.proto.writable_len();
            let want_write = writable > 0;
            // Stop reading while our replies to this client pile up unread: its own
            // input is then paused instead of our buffer growing.
            let can_read = self.proto.wbuf.len() < 2 * WRITE_BUFFER_HIGH_WATER_BYTES
                && !throttled
                && !self.proto.flags.has(Flags::MEMORY_BLOCKED);
            let can_fill = self.proto.wbuf.len() < WRITE_BUFFER_HIGH_WATER_BYTES;
            // Held acknowledgements or deliveries wait for the store (see `Held`):
            // `notify_durable` wakes us through the session's wake-up.
            let waiting_durable = self.proto.flags.has(Flags::DURABLE)
                && (self.proto.has_pending_acks()
                    || self.proto.flags.has(Flags::BLOCKED_ON_DURABLE)
                    || self.proto.has_holds());
            if waiting_durable {
                if !self.proto.inner.durable_tracked() {
                    // The store stopped (shutdown): nothing more becomes durable. What
                    // is held never goes out; it stays in flight in the session, and
                    // the client only ever sees it under an id that is on disk.
                    self.proto.wbuf.truncate(writable);
                    self.proto.held = None;
                    self.proto.flags.set(Flags::DURABLE, false);
                    continue;
                }
                let seen = self.proto.durable_seen.get();
                self.proto.inner.wait_durable(&self.proto.at.session);
                if self.proto.durable_now() > seen {
                    continue; // it moved before we were listed: look again now
                }
            }
            // The futures below are `poll_fn`s over fields, not `async` blocks: every
            // byte of this `select!` is in every connection's task for its whole life.
            // For the same reason no branch awaits: one that must (flush, yield) says so
            // and the await comes after, when the `select!`'s output is gone (awaited
            // inside a branch, that output stayed in the task's state: 24 bytes).
            self.proto
                .at
                .wake_armed
                .store(can_fill || waiting_durable, Ordering::Relaxed);
            let then = tokio::select! {
                biased;
                reason = poll_fn(|cx| self.proto.at.poll_kick(cx)) => {
                    if reason == ReasonCode::SessionTakenOver
                        && let Some(d) = self.unread_disconnect()
                    {
                        return End::ClientDisconnect(d);
                    }
                    return End::Server(kicked(reason));
                }
                r = {
                    let (io, rbuf, out) = (&mut self.io, &mut self.proto.rbuf, &self.proto.wbuf[..writable]);
                    poll_fn(move |cx| poll_io(cx, io, out, rbuf, want_write, can_read))
                },
                    if want_write || can_read => match r {
                    Io::Wrote(Ok(0) | Err(_)) => return End::Closed("write failed"),
                    Io::Wrote(Ok(n)) => {
                        bytes::Buf::advance(&mut self.proto.wbuf, n);
                        if let Some(h) = &mut self.proto.held {
                            for (at, _) in &mut h.writes {
                                *at -= n;
                            }
                        }
                        Stats::add(&self.proto.inner.stats.bytes_sent, n as u64);
                        // All that may be written now is written: flush (TLS). Asked of
                        // `writable_len` again rather than kept from before the `select!`,
                        // which would be 8 more bytes of every connection's task.
                        if self.proto.writable_len() == 0 { Then::Flush } else { Then::Loop }
                    }
                    Io::Read(Ok(0)) => return End::Closed("connection closed by client"),
                    Io::Read(Err(_)) => return End::Closed("read failed"),
                    Io::Read(Ok(n)) => {
                        Stats::add(&self.proto.inner.stats.bytes_received, n as u64);
                        let now = Instant::now();
                        // Silent since its last read for this long (before this one).
                        let quiet = self.proto.inner.ns_at(now).saturating_sub(self.proto.rx_ns);
                        self.proto.heard_at(now);
                        self.proto.size_reads(n, read_room);
                        // A read that starts with a PUBLISH from a client that was quiet
                        // waits for the connections woken with it to run first, and for
                        // SUBSCRIBEs being handled (see `Then::Publish`). One streaming
                        // does not yield per read: subscribers woken by its last batch
                        // would then run before this one is routed and write half as
                        // much per call (fan-out CPU per message 1.28x), and a stream
                        // races everything else anyway.
                        if self.proto.rbuf.first().is_some_and(|b| b >> 4 == 3)
                            && (quiet >= PUBLISH_YIELD_AFTER_NS
                                || self.proto.inner.subscribing.load(Ordering::SeqCst) > 0)
                        {
                            Then::Publish
                        } else {
                            // Publishers read meanwhile wait for this SUBSCRIBE.
                            let subscribing = has_subscribe(&self.proto.rbuf);
                            if subscribing {
                                self.proto.inner.subscribing.fetch_add(1, Ordering::SeqCst);
                            }
                            let end = self.proto.process_input(now);
                            if subscribing {
                                self.proto.inner.subscribing.fetch_sub(1, Ordering::SeqCst);
                            }
                            if let Some(end) = end {
                                return end;
                            }
                            Then::Loop
                        }
                    }
                },
                _ = poll_fn(|cx| self.proto.at.poll_woken(cx)), if can_fill || waiting_durable => {
                    // Woken by a publisher's batch, this task would run right after it
                    // (tokio's LIFO slot) and write that batch alone. Yielding once lets the
                    // other publishers ready now queue theirs first, so one write carries
                    // them all: a write system call was a fifth of a fan-in's CPU.
                    if can_fill { Then::Yield } else { Then::Loop }
                }
                _ = poll_fn(|cx| self.pause_timer.as_mut().expect("set when paused").as_mut().poll(cx)),
                    if paused => {
                    if self.proto.flags.has(Flags::MEMORY_BLOCKED) && !self.proto.inner.memory_over_budget(&self.proto.inner.cfg()) {
                        self.proto.flags.set(Flags::MEMORY_BLOCKED, false);
                    }
                    // Budget refilled or memory freed: handle what was already read, then
                    // read again (a PUBLISH still over a limit pauses again).
                    if let Some(end) = self.proto.process_input(Instant::now()) {
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
                    // (The deadline is read from `rx_ns` on each turn, not kept in a local
                    // across the await: every byte held there is in every connection's
                    // task for its whole life.)
                    while self.proto.inner.subscribing.load(Ordering::SeqCst) > 0
                        && self.proto.inner.ns_at(Instant::now())
                            < self.proto.rx_ns + SUBSCRIBE_WAIT_NS
                    {
                        tokio::task::yield_now().await;
                    }
                    // As read: the time `heard_at` noted for this input.
                    let now = self.proto.inner.instant_at(self.proto.rx_ns);
                    if let Some(end) = self.proto.process_input(now) {
                        return end;
                    }
                }
            }
        }
    }

    /// On a takeover: whether the client had already sent DISCONNECT on this connection,
    /// still unread (it disconnected and reconnected at once, and the new connection was
    /// read first). Its will must then not be published [MQTT-3.1.2-10]. Looks only at
    /// what can be read without waiting; the session now belongs to the new connection,
    /// so nothing else read here is acted on.
    pub(super) fn unread_disconnect(&mut self) -> Option<ReasonCode> {
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        let read = std::pin::pin!(self.io.read_buf(&mut self.proto.rbuf));
        if !matches!(
            std::future::Future::poll(read, &mut cx),
            std::task::Poll::Ready(Ok(1..))
        ) {
            return None;
        }
        let mut rest = self.proto.rbuf.split();
        let max_props = self.proto.live.decoded_user_properties();
        while let Ok(Some(p)) = decode_limited(
            &mut rest,
            self.proto.version,
            self.proto.cfg.message_size_limit,
            max_props,
        ) {
            if let Packet::Disconnect(d) = p {
                return Some(d.reason);
            }
        }
        None
    }
}

/// The socket driver's last resort: a task unwinding from a panic leaves its session as a
/// lost connection would.
impl Drop for Proto {
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
        detach(
            &self.inner,
            &self.at.session,
            self.at.conn_id,
            will,
            delay,
            Instant::now(),
        );
    }
}
