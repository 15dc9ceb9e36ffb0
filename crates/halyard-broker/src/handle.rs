//! `Broker`, the cheap handle embedders hold: make one, feed it connections, read its
//! numbers, shut it down.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use arc_swap::ArcSwap;
use halyard_codec::ReasonCode;
use halyard_store::Store;
use halyard_transport::{Monitor, PeerInfo};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::{Semaphore, mpsc, watch};
use tokio::time::Instant;
use tracing::{info, warn};

use crate::auth::{Anonymous, Security};
use crate::config::BrokerConfig;
use crate::housekeeping::{housekeeping, notify_durable};
use crate::registry::{LocalSessions, SessionOwnership};
use crate::retained::Retained;
use crate::router::{RoutingInterest, SubscriptionIndex};
use crate::state::{AuthFailures, Inner};
use crate::stats::{Stats, StatsSnapshot};
use crate::timers::Timers;

/// A cheap handle to a running broker. Feed it connections with
/// [`Broker::spawn_connection`]; stop it with [`Broker::shutdown`].
#[derive(Debug, Clone)]
pub struct Broker {
    pub(crate) inner: Arc<Inner>,
    /// Every connection task holds a clone of the sender; shutdown drops ours and waits
    /// until the receiver sees the last one go (mini-redis' drain pattern).
    drain: Arc<Mutex<Option<mpsc::Sender<()>>>>,
    drain_rx: Arc<tokio::sync::Mutex<mpsc::Receiver<()>>>,
}

impl Broker {
    /// Builds the broker, restores what `store` recovered, and starts its housekeeping
    /// task. Must be called within a Tokio runtime.
    pub fn new(cfg: BrokerConfig, store: Arc<dyn Store>) -> Broker {
        Self::with_seams(
            cfg,
            store,
            Box::new(LocalSessions::default()),
            Box::new(SubscriptionIndex::default()),
        )
    }

    /// [`Broker::new`] with the two seams a cluster replaces: who owns each session, and
    /// which sessions and nodes a topic reaches (see ARCHITECTURE.md, "Seams").
    pub(crate) fn with_seams(
        cfg: BrokerConfig,
        store: Arc<dyn Store>,
        sessions: Box<dyn SessionOwnership>,
        subs: Box<dyn RoutingInterest>,
    ) -> Broker {
        let inner = Inner::new(
            cfg,
            store,
            sessions,
            subs,
            crate::message::MemoryUse::new_static(),
        );
        tokio::spawn(housekeeping(inner.clone()));
        if let Some(rx) = inner.store.durable() {
            tokio::spawn(notify_durable(Arc::downgrade(&inner), rx));
        }
        let (tx, rx) = mpsc::channel(1);
        Broker {
            inner,
            drain: Arc::new(Mutex::new(Some(tx))),
            drain_rx: Arc::new(tokio::sync::Mutex::new(rx)),
        }
    }

    /// Serves one client connection on its own task. `peer` says who it is (an address
    /// for logs, or what a transport learnt: TLS identity, listener, proxy).
    /// A panic in the task ends that connection only: the session is detached as on a
    /// lost connection (will included) and everything else carries on.
    pub fn spawn_connection<S>(&self, stream: S, peer: impl Into<PeerInfo>)
    where
        S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
    {
        self.spawn(stream, peer.into(), false);
    }

    /// Serves an in-process client of the broker itself (a bridge's local side): it is
    /// trusted as the configuration that made it, so it is neither authenticated nor held
    /// to the ACL, and it alone may use client ids under `$bridge/` (a network client
    /// asking for one is refused with 0x85, so none can take a bridge's queue over).
    pub fn spawn_internal<S>(&self, stream: S, name: &str)
    where
        S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
    {
        let peer = PeerInfo::new(halyard_transport::Remote::Named(Arc::from(name)));
        self.spawn(stream, peer, true);
    }

    fn spawn<S>(&self, stream: S, peer: PeerInfo, internal: bool)
    where
        S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
    {
        let Some(guard) = self.drain.lock().unwrap_or_else(|e| e.into_inner()).clone() else {
            return; // shutting down: drop the stream
        };
        let inner = self.inner.clone();
        // At debug level and above, every log line of this connection carries its peer
        // and, once CONNECT is accepted, its client id (JSON logs show them as span
        // fields). Not at info: an enabled span keeps its fields in the subscriber's
        // registry for the connection's whole life, ~1 KB per connection (3.3 KB instead
        // of 2.3 KB per idle connection at the default level), and every info or warn
        // line of a connection names its peer and client id itself.
        let span = tracing::debug_span!(
            "conn",
            peer = %peer,
            client_id = tracing::field::Empty
        );
        let task = crate::connection::serve(inner, stream, peer, guard, internal);
        if span.is_disabled() {
            // A disabled span is still 32 bytes of every task (tokio rounds a task up to
            // 128-byte lines, so those bytes decide between 256 and 384 per connection).
            tokio::spawn(task);
        } else {
            tokio::spawn(tracing::Instrument::instrument(task, span));
        }
    }

    /// Replaces the authentication and authorization settings (a reload). Connections
    /// already established keep their session; new CONNECTs use the new settings.
    pub fn set_security(&self, security: Security) {
        *self
            .inner
            .security
            .write()
            .unwrap_or_else(|e| e.into_inner()) = Arc::new(security);
        self.inner.auth_failures.clear();
        self.inner
            .security_generation
            .fetch_add(1, Ordering::Release);
    }

    /// Gives the broker's own session `client_id` (under `$bridge/`) its own queue limits
    /// and overflow policy, replacing any it had. Other client ids are refused.
    pub fn set_queue_limits(
        &self,
        client_id: &str,
        limits: crate::session::QueueOverride,
    ) -> Result<(), String> {
        if !client_id.starts_with(crate::session::INTERNAL_CLIENT_ID_PREFIX) {
            return Err(format!(
                "{client_id}: only the broker's own sessions ($bridge/...) have their own queue limits"
            ));
        }
        let mut map = self
            .inner
            .queue_overrides
            .write()
            .unwrap_or_else(|e| e.into_inner());
        let old = map.insert(
            Arc::from(client_id),
            Arc::new(crate::session::OwnQueue::new(limits)),
        );
        let was = old.is_some_and(|o| o.limits.policy == crate::session::QueuePolicy::Block);
        let is = limits.policy == crate::session::QueuePolicy::Block;
        if is && !was {
            self.inner.blocking_queues.fetch_add(1, Ordering::Relaxed);
        } else if was && !is {
            self.inner.blocking_queues.fetch_sub(1, Ordering::Relaxed);
        }
        Ok(())
    }

    /// Removes `client_id`'s own queue limits (the broker's apply again).
    pub fn clear_queue_limits(&self, client_id: &str) {
        let old = self
            .inner
            .queue_overrides
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .remove(client_id);
        if old.is_some_and(|o| o.limits.policy == crate::session::QueuePolicy::Block) {
            self.inner.blocking_queues.fetch_sub(1, Ordering::Relaxed);
        }
    }

    /// The queue of session `client_id` now: depth, bytes, in flight, and for a session
    /// with its own limits what they dropped. `None` if there is no such session.
    pub fn queue_stats(&self, client_id: &str) -> Option<crate::session::QueueStats> {
        let session = self.inner.sessions.get(client_id)?;
        let own = self.inner.own_queue(&session);
        let st = session.lock();
        Some(crate::session::QueueStats {
            depth: st.queue.len(),
            bytes: st.queue.bytes(),
            in_flight: st.inflight.len(),
            dropped_oldest: own
                .as_ref()
                .map_or(0, |o| o.dropped_oldest.load(Ordering::Relaxed)),
            dropped_new: own
                .as_ref()
                .map_or(0, |o| o.dropped_new.load(Ordering::Relaxed)),
            refused: own
                .as_ref()
                .map_or(0, |o| o.refused.load(Ordering::Relaxed)),
        })
    }

    /// The authentication and authorization settings in force.
    pub fn security(&self) -> Arc<Security> {
        self.inner.security()
    }

    /// The monitor event stream (connections here; listeners emit into the same one
    /// when given this monitor).
    pub fn monitor(&self) -> &Monitor {
        &self.inner.monitor
    }

    /// A receiver that turns true when graceful shutdown begins (for listeners).
    pub fn shutdown_signal(&self) -> watch::Receiver<bool> {
        self.inner.shutdown.subscribe()
    }

    /// Graceful shutdown: stop taking connections, tell every client (v5: DISCONNECT 0x8B),
    /// and wait up to `shutdown_timeout` for connection tasks to drain. Returns false if the
    /// deadline passed with connections still open.
    pub async fn shutdown(&self) -> bool {
        info!("shutting down: disconnecting clients");
        self.inner.shutdown.send_replace(true);
        // Running connections learn it through their kick (`Session::kick`); any attached after
        // this sweep sees the flag when it starts (`Connection::run`).
        for s in self.inner.sessions_snapshot() {
            let mut st = s.lock();
            s.kick(&mut st, ReasonCode::ServerShuttingDown);
        }
        self.drain.lock().unwrap_or_else(|e| e.into_inner()).take();
        let mut rx = self.drain_rx.lock().await;
        let drained = tokio::time::timeout(self.inner.cfg().shutdown_timeout, rx.recv())
            .await
            .is_ok();
        if !drained {
            warn!("shutdown deadline passed with connections still open");
        }
        // Make everything applied durable and stop the store's writer.
        let store = self.inner.store.clone();
        let _ = tokio::task::spawn_blocking(move || store.flush()).await;
        drained
    }

    /// Current counters.
    pub fn stats(&self) -> StatsSnapshot {
        let mut s = self.inner.stats.snapshot();
        s.message_bytes_alive = self.inner.memory.bytes() as u64;
        s.connections_current = self.inner.stats.connections_current.load(Ordering::Relaxed);
        s
    }

    /// Sessions known (connected or not), subscriptions, retained messages.
    pub fn counts(&self) -> (usize, usize, usize) {
        let sessions = self.inner.sessions.len();
        (sessions, self.inner.subs.len(), self.inner.retained.len())
    }

    /// How long the broker has run.
    pub fn uptime(&self) -> Duration {
        self.inner.started.elapsed()
    }

    pub(crate) fn inner(&self) -> &Arc<Inner> {
        &self.inner
    }
}

impl Inner {
    /// The broker's shared state, rebuilt from what `store` recovered, with no task
    /// started: [`Broker::with_seams`] starts the housekeeping and durability tasks; the
    /// simulator (`crate::sim`) drives time itself.
    pub(crate) fn new(
        cfg: BrokerConfig,
        store: Arc<dyn Store>,
        sessions: Box<dyn SessionOwnership>,
        subs: Box<dyn RoutingInterest>,
        memory: &'static crate::message::MemoryUse,
    ) -> Arc<Inner> {
        let (shutdown, _) = watch::channel(false);
        let cfg_allow_anonymous = cfg.allow_anonymous;
        let inner = Arc::new(Inner {
            permits: Arc::new(Semaphore::new(
                cfg.max_connections.min(Semaphore::MAX_PERMITS),
            )),
            cfg: ArcSwap::from_pointee(cfg),
            durable: store.durable(),
            sessions,
            subs,
            retained: Retained::default(),
            store,
            stats: Stats::default(),
            shutdown,
            next_conn_id: AtomicU64::new(1),
            next_message_id: AtomicU64::new(1),
            timers: Timers::default(),
            monitor: Monitor::default(),
            security: RwLock::new(Arc::new(Security {
                anonymous: if cfg_allow_anonymous {
                    Anonymous::Allow
                } else {
                    Anonymous::Deny
                },
                ..Security::default()
            })),
            auth_failures: AuthFailures::default(),
            security_generation: AtomicU64::new(0),
            memory,
            tap: tokio::sync::broadcast::channel(crate::state::TAP_CAPACITY).0,
            taps: Arc::default(),
            durable_waiters: Mutex::default(),
            started: Instant::now(),
            started_wall: std::time::SystemTime::now(),
            subscribing: Default::default(),
            queue_overrides: Default::default(),
            blocking_queues: Default::default(),
        });
        inner.recover();
        inner
    }
}

#[cfg(test)]
mod seam_tests {
    //! The seams are used: a broker built with other implementations routes and attaches
    //! through them.
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use halyard_codec::SubscriptionOptions;
    use halyard_codec::{
        Bytes, ClientId, Connect, Packet, Properties, ProtocolVersion, Publish, QoS, ReasonCode,
        TopicFilter, TopicName,
    };
    use halyard_testkit::RawClient;

    use super::*;
    use crate::registry::{Full, SessionLimits};
    use crate::router::{Match, Routes};
    use crate::session::Session;

    /// This node's index plus one other node that wants everything.
    #[derive(Debug, Default)]
    struct OneRemote {
        local: SubscriptionIndex,
        forwarded: Arc<AtomicUsize>,
    }

    impl RoutingInterest for OneRemote {
        fn subscribe(
            &self,
            f: &TopicFilter,
            s: &Arc<Session>,
            o: SubscriptionOptions,
            id: Option<u32>,
        ) -> bool {
            self.local.subscribe(f, s, o, id)
        }
        fn unsubscribe(&self, f: &TopicFilter, s: &Arc<Session>) -> bool {
            self.local.unsubscribe(f, s)
        }
        fn matches_cached<'r>(
            &self,
            t: &str,
            o: Option<&str>,
            r: &'r mut Routes,
        ) -> (&'r mut [Match], bool) {
            self.local.matches_cached(t, o, r)
        }
        fn pick_other_member(&self, f: &TopicFilter, l: &Arc<Session>) -> Option<Match> {
            self.local.pick_other_member(f, l)
        }
        fn len(&self) -> usize {
            self.local.len()
        }
        fn forward(&self, _msg: &Arc<crate::message::Message>) -> usize {
            self.forwarded.fetch_add(1, Ordering::Relaxed);
            1
        }
    }

    /// Local sessions, except that client ids under `elsewhere/` are held by another node
    /// that refuses to give them up.
    #[derive(Debug, Default)]
    struct Elsewhere(LocalSessions);

    impl SessionOwnership for Elsewhere {
        fn get(&self, id: &str) -> Option<Arc<Session>> {
            self.0.get(id)
        }
        fn claim(
            &self,
            id: &str,
            owner: Option<&Arc<str>>,
            limits: SessionLimits,
        ) -> Result<Option<Arc<Session>>, Full> {
            if id.starts_with("elsewhere/") {
                return Err(Full::Sessions);
            }
            self.0.claim(id, owner, limits)
        }
        fn insert(&self, id: Arc<str>, s: Arc<Session>, owner: Option<Arc<str>>) {
            self.0.insert(id, s, owner)
        }
        fn remove(&self, id: &str, s: &Arc<Session>) {
            self.0.remove(id, s)
        }
        fn snapshot(&self) -> Vec<Arc<Session>> {
            self.0.snapshot()
        }
        fn len(&self) -> usize {
            self.0.len()
        }
    }

    fn pipe(broker: &Broker) -> RawClient<tokio::io::DuplexStream> {
        let (a, b) = tokio::io::duplex(64 * 1024);
        broker.spawn_connection(b, "duplex");
        RawClient::new(a)
    }

    fn connect(id: &str) -> Packet {
        Packet::Connect(Box::new(Connect {
            protocol: ProtocolVersion::V5,
            bridge: false,
            clean_start: true,
            keep_alive: 0,
            client_id: ClientId::new(id).unwrap(),
            will: None,
            username: None,
            password: None,
            properties: Properties::default(),
        }))
    }

    #[tokio::test]
    async fn publish_reaches_the_routing_seam_and_attach_the_ownership_seam() {
        let routing = OneRemote::default();
        let forwarded = routing.forwarded.clone();
        let broker = Broker::with_seams(
            BrokerConfig::default(),
            Arc::new(halyard_store::MemoryStore::new()),
            Box::new(Elsewhere::default()),
            Box::new(routing),
        );
        let mut c = pipe(&broker);
        c.send(&connect("here")).await;
        assert!(matches!(c.recv().await, Packet::ConnAck(a) if a.reason == ReasonCode::Success));
        // No local subscriber, one remote node: matched, so not 0x10 No matching
        // subscribers [MQTT-3.4.2.1].
        c.send(&Packet::Publish(Publish {
            qos: QoS::AtLeastOnce,
            packet_id: 1,
            ..Publish::new(TopicName::try_from("t").unwrap(), Bytes::from_static(b"x"))
        }))
        .await;
        match c.recv().await {
            Packet::PubAck(a) => assert_eq!(a.reason, ReasonCode::Success, "{a:?}"),
            other => panic!("expected PUBACK, got {other:?}"),
        }
        assert_eq!(forwarded.load(Ordering::Relaxed), 1);
        // A client id another node holds is refused by the claim, before any session.
        let mut d = pipe(&broker);
        d.send(&connect("elsewhere/1")).await;
        assert!(
            matches!(d.recv().await, Packet::ConnAck(a) if a.reason == ReasonCode::QuotaExceeded)
        );
        assert_eq!(broker.counts().0, 1);
    }
}
