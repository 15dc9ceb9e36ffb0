//! A deterministic simulator: client connections driven with bytes and a virtual clock,
//! without sockets, tasks or an async runtime.
//!
//! The protocol state (`Proto`), the session lifecycle and the broker's timers
//! (`Inner::tick`) are the ones a running broker uses; only the driver differs. Time moves
//! only when [`Sim::advance`] says so, so keep alive, session expiry, will delay and
//! flow control can be checked at exact instants, and a fuzzer can drive the protocol
//! directly.
//!
//! Left to the socket driver, and so not simulated: transports and TLS, enhanced (AUTH)
//! authentication, pausing reads over the publish rate or the memory budget (input read
//! is handled at once), waiting for the store (the memory store makes everything durable
//! at once), and the connection permits of `max_connections`.

use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use halyard_codec::{BytesMut, Connect, Packet, decode_first};
use halyard_store::{MemoryStore, Store};
use halyard_transport::PeerInfo;
use tokio::time::Instant;

use super::*;
use crate::config::BrokerConfig;
use crate::message::LazyNow;
use crate::registry::LocalSessions;
use crate::router::SubscriptionIndex;
use crate::session::Peer;

/// The memory account every simulator shares: a broker's is leaked once for the life of
/// the process (messages refer to it without reference counting), and a fuzzer makes a
/// simulator per input. Shared, its counts are the sum over the simulators alive; each
/// message refunds its charge when dropped.
static SIM_MEMORY: std::sync::LazyLock<&'static crate::message::MemoryUse> =
    std::sync::LazyLock::new(crate::message::MemoryUse::new_static);

/// A broker and its clients, in virtual time.
pub struct Sim {
    inner: Arc<Inner>,
    now: Instant,
    conns: Vec<Slot>,
}

/// One simulated connection (an index into the simulator).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Conn(usize);

enum Slot {
    /// Bytes read before a whole CONNECT.
    Connecting(BytesMut),
    Open(Box<Proto>),
    /// Closed by the broker or the client; holds what was written and not yet taken.
    Closed(Vec<u8>),
}

impl std::fmt::Debug for Sim {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sim")
            .field("connections", &self.conns.len())
            .finish_non_exhaustive()
    }
}

impl Sim {
    /// A broker with `cfg` and an empty memory store, at an arbitrary instant.
    pub fn new(cfg: BrokerConfig) -> Sim {
        Self::with_store(cfg, Arc::new(MemoryStore::new()))
    }

    /// A broker with `cfg` on `store` (what it recovered is restored).
    pub fn with_store(cfg: BrokerConfig, store: Arc<dyn Store>) -> Sim {
        let inner = Inner::new(
            cfg,
            store,
            Box::new(LocalSessions::default()),
            Box::new(SubscriptionIndex::default()),
            *SIM_MEMORY,
        );
        Sim {
            now: inner.started,
            inner,
            conns: Vec::new(),
        }
    }

    /// The virtual time now.
    pub fn now(&self) -> Instant {
        self.now
    }

    /// Moves time forward by `d`: deadlines due meanwhile fire (keep alive, session
    /// expiry, delayed wills, retained sweeps) and connections kicked close.
    pub fn advance(&mut self, d: Duration) {
        self.now += d;
        self.inner.tick(self.now);
        self.reap();
    }

    /// Opens a connection whose client sends `bytes` first (a CONNECT, whole or in part).
    pub fn open(&mut self, bytes: &[u8]) -> Conn {
        let c = Conn(self.conns.len());
        self.conns.push(Slot::Connecting(BytesMut::new()));
        self.send(c, bytes);
        c
    }

    /// The client of `c` sends `bytes`; the broker handles them now.
    pub fn send(&mut self, c: Conn, bytes: &[u8]) {
        let now = self.now;
        match &mut self.conns[c.0] {
            Slot::Closed(_) => {}
            Slot::Connecting(rbuf) => {
                rbuf.extend_from_slice(bytes);
                let rbuf = std::mem::take(rbuf);
                self.conns[c.0] = self.handshake(rbuf);
            }
            Slot::Open(proto) => {
                proto.rbuf.extend_from_slice(bytes);
                proto.heard_at(now);
                if let Some(end) = proto.process_input(now) {
                    self.close(c, end);
                }
            }
        }
        self.reap();
    }

    /// What the broker has written to `c` since last asked (deliveries included), even
    /// after it closed.
    pub fn output(&mut self, c: Conn) -> Vec<u8> {
        self.reap();
        let now = self.now;
        match &mut self.conns[c.0] {
            Slot::Connecting(_) => Vec::new(),
            Slot::Closed(out) => std::mem::take(out),
            Slot::Open(proto) => {
                if proto.has_pending_acks() {
                    proto.release_acks();
                }
                proto.fill(&mut LazyNow::at(now));
                let n = proto.writable_len();
                proto.wbuf.split_to(n).to_vec()
            }
        }
    }

    /// Whether `c` is still open.
    pub fn is_open(&self, c: Conn) -> bool {
        !matches!(self.conns[c.0], Slot::Closed(_))
    }

    /// The network drops `c` (no DISCONNECT): its will applies [MQTT-3.1.2-8].
    pub fn drop_connection(&mut self, c: Conn) {
        self.close(c, End::Closed("connection lost"));
    }

    /// Reads a whole CONNECT from `rbuf` and opens its connection, or refuses it.
    fn handshake(&mut self, mut rbuf: BytesMut) -> Slot {
        let cfg = self.inner.cfg();
        let connect = match decode_first(
            &mut rbuf,
            cfg.message_size_limit,
            cfg.decoded_user_properties(),
        ) {
            Ok(None) => return Slot::Connecting(rbuf),
            Ok(Some(Packet::Connect(c))) => *c,
            // Not a CONNECT, or one that does not decode: the socket driver answers a v5
            // one with a CONNACK; here it is closed either way.
            Ok(Some(_)) | Err(_) => return Slot::Closed(Vec::new()),
        };
        let info = PeerInfo::from("sim");
        let peer = Peer::from(&info.remote);
        let security = self.inner.security();
        let admission = Admission {
            have_permit: true,
            cert: CertAuth::NotUsed,
            anonymous_ok: security.anonymous.allows(&info),
            security,
            info,
        };
        let refuse = |inner: &Inner, c: &Connect, why| {
            let mut out = BytesMut::new();
            let _ = refusal(inner, &peer, c, why).encode(c.protocol, &mut out);
            Slot::Closed(out.to_vec())
        };
        if let Err(why) = admit(&self.inner, &connect, &admission) {
            return refuse(&self.inner, &connect, why);
        }
        if connect.properties.authentication_method.is_some() {
            let why = Violation::new(
                ReasonCode::BadAuthenticationMethod,
                "",
                "enhanced authentication is not simulated",
            );
            return refuse(&self.inner, &connect, why);
        }
        let user = match authenticate_start(&self.inner, &connect, &admission) {
            Authentication::Done(r) => r,
            Authentication::Check(authn, creds) => {
                let verdict = authn.authenticate(&creds);
                authenticate_end(&self.inner, &connect, &admission, verdict)
            }
        };
        let user = match user {
            Ok(user) => user,
            Err(why) => return refuse(&self.inner, &connect, why),
        };
        let verified = Verified {
            user,
            enhanced: None,
            auth_reply: None,
            trusted: false,
        };
        let listener = Arc::<str>::from("sim");
        match Proto::open(
            self.inner.clone(),
            &connect,
            verified,
            &peer,
            listener,
            rbuf,
            self.now,
        ) {
            Ok(mut proto) => {
                // Packets sent right behind the CONNECT.
                let end = proto.process_input(self.now);
                let mut slot = Slot::Open(Box::new(proto));
                if let Some(end) = end {
                    slot = Self::closed(slot, &end, self.now);
                }
                slot
            }
            Err(why) => refuse(&self.inner, &connect, why),
        }
    }

    /// Closes every open connection whose session kicked it (keep alive, takeover).
    fn reap(&mut self) {
        let mut cx = Context::from_waker(Waker::noop());
        for i in 0..self.conns.len() {
            if let Slot::Open(proto) = &self.conns[i]
                && let Poll::Ready(reason) = proto.at.poll_kick(&mut cx)
            {
                self.close(Conn(i), End::Server(kicked(reason)));
            }
        }
    }

    fn close(&mut self, c: Conn, end: End) {
        let slot = std::mem::replace(&mut self.conns[c.0], Slot::Closed(Vec::new()));
        self.conns[c.0] = Self::closed(slot, &end, self.now);
    }

    /// `slot` closed for `end` at `now`: its last words kept for `output`, its session
    /// left.
    fn closed(slot: Slot, end: &End, now: Instant) -> Slot {
        match slot {
            Slot::Open(mut proto) => {
                proto.last_words(end);
                let out = proto.wbuf.split().to_vec();
                proto.leave(end, now);
                Slot::Closed(out)
            }
            other => other,
        }
    }
}
