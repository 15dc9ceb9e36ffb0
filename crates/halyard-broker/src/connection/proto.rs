//! One client's protocol state, socket-free and clock-free (`Proto`): bytes in, bytes
//! out, time passed in. `Connection` (mod.rs) drives it over a socket; `crate::sim` drives
//! it with bytes and a virtual clock.
//!
//! The methods a packet passes through are `#[inline]`: as methods of the generic
//! `Connection<S>` they were instantiated in the driver's codegen unit and inlined; as
//! `Proto`'s they are not generic, and thin LTO left them out of line (QoS 1 pairs 1.09x
//! CPU per message, `bench/ab.py`).

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use halyard_codec::{BytesMut, Packet, ProtocolVersion, QoS, ReasonCode, TopicName};

use crate::auth::{AuthExchange, EnhancedAuth};
use halyard_codec::{ByteString, Bytes};
use tokio::time::Instant;

use super::*;
use crate::message::Message;
use crate::router::Routes;
use crate::session::{ConnInfo, Session};
use crate::state::Inner;

/// One client's protocol state, socket-free and clock-free: bytes go in
/// (`Proto::handle_input`), bytes come out (`Proto::fill` into `wbuf`), and the time is
/// passed in. The connection task (`Connection`) drives it over a socket; the simulator
/// (`crate::sim`) drives it with bytes and a virtual clock.
pub(crate) struct Proto {
    pub(super) inner: Arc<Inner>,
    /// The settings this connection was accepted under: what its CONNACK advertised
    /// (Maximum QoS, Receive Maximum, Maximum Packet Size...) holds for its lifetime even
    /// when a reload changes the broker's.
    pub(super) cfg: Arc<crate::config::BrokerConfig>,
    /// The broker's settings now (limits a reload changes for everyone), read once per
    /// batch of packets in `process_input` rather than once per check.
    pub(super) live: Arc<crate::config::BrokerConfig>,
    /// What a batch of received PUBLISH packets accumulates; boxed and only once the
    /// client publishes, to keep idle connections small.
    pub(super) batch: Option<Box<Batch>>,
    pub(super) rbuf: BytesMut,
    pub(super) wbuf: BytesMut,
    /// Peer, listener, user name and protocol, as shown by the admin API; also the
    /// session's (one allocation for both, and every log line's peer).
    pub(super) info: Arc<ConnInfo>,
    pub(super) version: ProtocolVersion,
    /// The session, this connection's id in it and the kicks seen (see `Attachment`).
    pub(super) at: Attachment,
    /// When the last read returned, as nanoseconds since the broker started (see
    /// `Inner::instant_at`): 8 bytes where an `Instant` takes 16.
    pub(super) rx_ns: u64,
    /// Message ids taken from the broker's counter in blocks of `MESSAGE_ID_BLOCK` (see
    /// `Inner::message_ids`): the next one, and how many of the block are left.
    pub(super) next_id: u64,
    pub(super) ids_left: u8,
    /// The client's Receive Maximum: QoS 1/2 messages we may have in flight to it.
    pub(super) client_receive_max: u16,
    /// The client's Maximum Packet Size.
    pub(super) client_max_packet: u32,
    /// Topic aliases both ways, made on first use (most clients never use them, and every
    /// byte here is memory per connection).
    pub(super) aliases: Option<Box<Aliases>>,
    pub(super) alias_out_max: u16,
    /// Will, enhanced authentication: boxed, and only for a client that has one of them.
    pub(super) rare: Option<Box<Rare>>,
    /// The last topic this client published to and its subscribers (see `Routes`); made
    /// on the first PUBLISH and dropped when the connection goes idle.
    pub(super) routes: Option<Box<Routes>>,
    /// The highest durable ticket read in this turn of `main_loop` (0: none read).
    pub(super) durable_seen: std::cell::Cell<u64>,
    /// Acknowledgements and writes waiting for the store (see `Held`).
    pub(super) held: Option<Box<Held>>,
    pub(super) acl: AclCache,
    /// Only when publish rate limits are configured.
    pub(super) rate: Option<Box<PublishRate>>,
    /// Bytes to have room for before the next read (0: whatever the buffer has; see
    /// `size_reads`).
    pub(super) read_chunk: u32,
    /// Yes/no state, one bit each (see `Flags`).
    pub(super) flags: Flags,
}

/// A connection's yes/no state in one byte: seven `bool`s put `Connection` 8 bytes past
/// the allocator's 256-byte class.
#[derive(Clone, Copy, Default)]
pub(super) struct Flags(u8);

impl Flags {
    /// The client has a keep alive: reads are noted in `Session::last_rx` for the
    /// broker's keep-alive check (`Inner::keepalive_expire`).
    pub(super) const KEEPALIVE: u8 = 1;
    /// CONNECT asked for a session expiry of 0 (a DISCONNECT may not raise it then).
    pub(super) const EXPIRY_ZERO: u8 = 1 << 1;
    /// The store tracks durability (see `Inner::durable_now`), and had not stopped when
    /// this connection last looked.
    pub(super) const DURABLE: u8 = 1 << 2;
    /// The queue's head is a recorded delivery whose store batch is not durable yet.
    pub(super) const BLOCKED_ON_DURABLE: u8 = 1 << 3;
    /// `finish` ran; if not, the task is unwinding from a panic (see `Drop`).
    pub(super) const FINISHED: u8 = 1 << 4;
    /// A PUBLISH waits for the memory budget.
    pub(super) const MEMORY_BLOCKED: u8 = 1 << 5;
    /// Holds one of the `max_connections` permits (see `handshake`).
    pub(super) const HOLDS_PERMIT: u8 = 1 << 6;
    /// An in-process client of the broker (`CertAuth::Internal`): no ACL applies.
    pub(super) const TRUSTED: u8 = 1 << 7;

    pub(super) fn has(self, flag: u8) -> bool {
        self.0 & flag != 0
    }

    pub(super) fn set(&mut self, flag: u8, on: bool) {
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
pub(super) struct Attachment {
    pub(super) session: Arc<Session>,
    pub(super) conn_id: u64,
    /// The session's kick count this connection last looked at (see `Session::poll_kick`);
    /// an atomic only to be `Sync` (the `select!` borrows it across an await).
    pub(super) kicks_seen: AtomicU32,
    /// This turn's `select!` also polls the wake-up, which registers the waker (and looks
    /// at the kick count under the slot's lock): the kick branch then need not lock the
    /// slot too. Publishers waking a busy subscriber contend for that lock.
    pub(super) wake_armed: std::sync::atomic::AtomicBool,
}

impl Attachment {
    pub(super) fn poll_kick(&self, cx: &mut std::task::Context<'_>) -> std::task::Poll<ReasonCode> {
        let register = !self.wake_armed.load(Ordering::Relaxed);
        self.session
            .poll_kick(cx, self.conn_id, &self.kicks_seen, register)
    }

    pub(super) fn poll_woken(&self, cx: &mut std::task::Context<'_>) -> std::task::Poll<()> {
        self.session.poll_woken(cx, &self.kicks_seen)
    }
}

/// What waits until the store has made a ticket durable. Made on first use: a session
/// that is not persisted never needs it, and every byte of `Connection` is memory per
/// connection.
#[derive(Default)]
pub(super) struct Held {
    /// Acknowledgements waiting until their store ticket is durable, in the order they
    /// must be sent [MQTT-4.6.0-2] (PUBACK/PUBREC/PUBCOMP in the order of the packets).
    pub(super) acks: VecDeque<(u64, Packet)>,
    /// `(at, ticket)`, oldest first: the bytes of `wbuf` from `at` on may not be written
    /// until `ticket` is durable. One per fill that buffered a QoS 2 PUBLISH to a stored
    /// session: its packet id (the `Sent` record) must survive a crash before the client
    /// can see it, or a restart would resend the message under a new packet id and the
    /// client, which dedupes QoS 2 by packet id [MQTT-4.3.3-9], would deliver it twice.
    /// Everything buffered after it waits too, so order is kept. One entry per fill (not
    /// one for all) so that later fills do not push back the release of earlier ones.
    pub(super) writes: VecDeque<(usize, u64)>,
}

/// What a batch of PUBLISH packets accumulates until `process_input` ends it.
#[derive(Default)]
pub(super) struct Batch {
    /// QoS 0 deliveries, queued when the batch ends (see `Deferred`).
    pub(super) deferred: crate::route::Deferred,
    /// PUBLISH packets received by QoS, added to the stats once per batch.
    pub(super) received: [u32; 3],
    /// Bytes and count of the messages routed, charged to the memory budget once per
    /// batch (see `MemoryUse`).
    pub(super) charged: (usize, u32),
}

/// What only some clients have: a will, enhanced authentication. Boxed, made only for
/// them: every byte of `Connection` is memory per connection.
#[derive(Default)]
pub(super) struct Rare {
    pub(super) will: Option<Arc<Message>>,
    pub(super) will_delay: u32,
    /// The enhanced authentication method of CONNECT, for re-authentication, and a
    /// re-authentication in progress.
    pub(super) enhanced: Option<(ByteString, Arc<dyn EnhancedAuth>)>,
    pub(super) reauth: Option<Box<dyn AuthExchange>>,
}

/// Topic aliases of one connection.
#[derive(Default)]
pub(super) struct Aliases {
    /// Inbound [MQTT-3.3.2-10]: they live as long as the connection.
    pub(super) inbound: HashMap<u16, TopicName>,
    /// Outbound, the ones we assigned.
    pub(super) outbound: HashMap<TopicName, u16>,
}

/// Read sizes `size_reads` moves between.
pub(super) const READ_CHUNK_MIN: usize = 512;
pub(super) const READ_CHUNK_MAX: usize = 64 * 1024;

/// A received PUBLISH once its topic is known, without its properties (see
/// `Connection::accept_publish`). Topic and payload are owned, never slices of the read
/// buffer.
pub(super) struct Incoming {
    pub(super) topic: TopicName,
    pub(super) payload: Bytes,
    pub(super) qos: QoS,
    pub(super) retain: bool,
    pub(super) packet_id: u16,
}

/// How often a client held back by the memory budget looks again.
pub(super) const MEMORY_RECHECK: Duration = Duration::from_millis(10);

impl Proto {
    /// The will and its delay, taken: it is published at most once.
    pub(super) fn take_will(&mut self) -> (Option<Arc<Message>>, u32) {
        self.rare
            .as_mut()
            .map_or((None, 0), |r| (r.will.take(), r.will_delay))
    }
}

impl Proto {
    /// The client was heard from (or is not read from on purpose, which must not run its
    /// keep alive out) at `now`.
    #[inline]
    pub(super) fn heard_at(&mut self, now: Instant) {
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
    pub(super) fn size_reads(&mut self, n: usize, room: usize) {
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
}
