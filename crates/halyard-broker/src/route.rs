//! Routing one message to the sessions that match it: retained first, then a delivery
//! per matching session, QoS 0 ones deferred to the end of the publisher's batch
//! (`Deferred`), shared subscriptions redispatched when a member leaves, wills.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use halyard_codec::QoS;
use halyard_store::Op;
use tracing::{debug, info};

use crate::auth::Identity;
use crate::config::BrokerConfig;
use crate::message::Message;
use crate::message::stored;
use crate::queue::{Entry, Run, Segment};
use crate::router::{Match, Routes};
use crate::session::{Enqueued, Outgoing, QueueLimits, Session};
use crate::state::Inner;
use crate::stats::Stats;

/// QoS 0 deliveries routed while a connection handles one batch of packets, queued per
/// session when the batch ends (or before anything that must not overtake them): in a
/// fan-out, one session lock and one wake-up per subscriber per batch instead of per
/// message (the lock's release and the wake-up were a third of the CPU per delivery).
/// Messages in a row on one cached route are gathered into a [`Segment`] that each
/// matched session queues as one [`Run`] (see `queue.rs`).
#[derive(Debug, Default)]
pub(crate) struct Deferred {
    /// Session (by address) -> its entry in `groups`.
    index: foldhash::HashMap<usize, usize>,
    groups: Vec<(Arc<Session>, Vec<Entry>)>,
    /// Items held (deliveries, messages of the open segment and its members); at
    /// [`Deferred::MAX`] they are queued at once. Queue limits apply only when queued, so
    /// without a bound a 64 KiB read of tiny messages to many subscribers could hold
    /// millions of deliveries here.
    len: usize,
    /// Emptied group vectors kept for the next batch: a fan-out to 100 subscribers
    /// otherwise allocated 100 vectors per batch and grew each one several times. Bounded
    /// (`SPARE_MAX` of at most `SPARE_CAPACITY`, ~80 KiB), and dropped with the batch state
    /// when the connection goes idle.
    spare: Vec<Vec<Entry>>,
    /// The open segment: QoS 0 messages, in order, all routed with the same cached
    /// match...
    seg: Vec<Arc<Message>>,
    /// ...whose sessions (as their index in `groups`) and subscription identifiers these are.
    seg_members: Vec<(usize, Box<[u32]>)>,
}

impl Deferred {
    const MAX: usize = 1024;
    const SPARE_MAX: usize = 128;
    const SPARE_CAPACITY: usize = 16;

    /// Holds the deliveries of QoS 0 message `msg` to `matches`. `same_route`: `matches`
    /// is the cached result the previous message was routed with, and holds no shared
    /// subscription.
    fn push_message(&mut self, matches: &mut [Match], msg: &Arc<Message>, same_route: bool) {
        // A RETAIN flag may be forwarded to some sessions and not to others; such a
        // message (rare: a retained one is usually stored, which defers nothing) is held
        // per delivery.
        let segment = same_route && !msg.retain;
        if !self.seg.is_empty() {
            if segment {
                self.seg.push(msg.clone());
                self.len += 1;
                return;
            }
            self.close_segment();
        }
        if segment && !matches.is_empty() {
            for m in matches.iter() {
                let g = self.group(&m.session);
                self.seg_members
                    .push((g, m.subscription_ids.as_slice().into()));
            }
            self.seg.push(msg.clone());
            self.len += 1 + matches.len();
            return;
        }
        for m in matches {
            self.len += 1;
            let out = m.delivery(msg.clone());
            let g = self.group(&m.session);
            self.groups[g].1.push(Entry::One(out));
        }
    }

    /// The index in `groups` of `session`'s deliveries, added if new.
    fn group(&mut self, session: &Arc<Session>) -> usize {
        // Fan-in: usually the same session as the last delivery.
        if let Some(i) = self.groups.len().checked_sub(1)
            && Arc::ptr_eq(&self.groups[i].0, session)
        {
            return i;
        }
        let key = Arc::as_ptr(session) as usize;
        *self.index.entry(key).or_insert_with(|| {
            // The session's reference is taken once per batch, not per delivery.
            let outs = self.spare.pop().unwrap_or_default();
            self.groups.push((session.clone(), outs));
            self.groups.len() - 1
        })
    }

    /// Hands the open segment to its sessions: a run each (one delivery each when it
    /// holds a single message).
    fn close_segment(&mut self) {
        if self.seg.len() == 1 {
            let msg = self.seg.pop().expect("one message");
            for (g, subscription_ids) in self.seg_members.drain(..) {
                self.groups[g].1.push(Entry::One(Outgoing {
                    msg: msg.clone(),
                    qos: QoS::AtMostOnce,
                    retain: false,
                    subscription_ids,
                    shared: None,
                    recorded: false,
                }));
            }
        } else if !self.seg.is_empty() {
            let seg = Segment::new(std::mem::take(&mut self.seg), self.seg_members.len());
            for (g, subscription_ids) in self.seg_members.drain(..) {
                self.groups[g]
                    .1
                    .push(Entry::Run(Run::new(seg.clone(), subscription_ids)));
            }
        }
        self.seg_members.clear();
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.groups.is_empty()
    }
}

impl Inner {
    /// Routes one message: retains it if asked, then queues a delivery to every matching
    /// session. `origin` is the publishing client, for No Local. Runs on the publisher's task. Every store op this causes, plus `extra`,
    /// goes to the store in **one** batch, so a crash keeps all or none of it. Returns how
    /// many sessions matched and the ticket to wait for before acknowledging the publisher.
    pub(crate) fn publish(
        &self,
        msg: &Arc<Message>,
        origin: Option<&str>,
        routes: &mut Routes,
        extra: Vec<Op>,
        cfg: &BrokerConfig,
        deferred: Option<&mut Deferred>,
    ) -> (usize, u64) {
        let mut ops = Vec::new();
        let retain = msg.retain
            && cfg.retain_available
            && match self
                .retained
                .set(msg, cfg.max_retained_messages, cfg.max_retained_bytes)
            {
                crate::retained::SetOutcome::Done => true,
                crate::retained::SetOutcome::OverLimit => {
                    // Delivered as usual, just not kept: the limit bounds memory and disk.
                    Stats::inc(&self.stats.retained_refused);
                    debug!(topic = %msg.topic, "retained message limit reached; not retained");
                    false
                }
            };
        // $SYS topics are the broker's live state: retained for new subscribers, never
        // stored (they are republished after a restart anyway).
        if retain && !msg.topic.as_str().starts_with("$SYS/") {
            ops.push(if msg.payload.is_empty() {
                Op::RetainDelete {
                    topic: msg.topic.to_string(),
                }
            } else {
                Op::RetainSet(stored(msg))
            });
        }
        let (matches, same_route) = self.subs.matches_cached(msg.topic.as_str(), origin, routes);
        // Other nodes with a matching subscription get it once each (standalone: none).
        let matched = matches.len() + self.subs.forward(msg);
        if matched == 0 && !msg.topic.as_str().starts_with('$') {
            Stats::inc(&self.stats.dropped_no_subscribers);
        }
        if self.taps.load(Ordering::Relaxed) > 0 {
            let _ = self.tap.send(msg.clone());
        }
        let limits = Self::queue_limits(cfg);
        // A QoS 0 message's deliveries are all QoS 0: nothing to store, nothing that waits
        // for a ticket, so a publisher's batch may queue them per session at its end.
        // Anything else first flushes what was deferred, so each session still receives
        // in publish order.
        let deferred = match deferred {
            Some(d) if msg.qos == QoS::AtMostOnce && extra.is_empty() && ops.is_empty() => {
                d.push_message(matches, msg, same_route);
                // No `set_ticket`: only recorded (QoS 1/2) deliveries read the ticket, and
                // a QoS 0 message never has one; the compare-exchange was 2.6% of a fan-in.
                if d.len >= Deferred::MAX {
                    self.flush_deferred(d, limits);
                }
                return (matched, 0);
            }
            other => other,
        };
        if let Some(d) = deferred {
            self.flush_deferred(d, limits);
        }
        let deliveries = matches.iter_mut().map(|m| {
            let out = m.delivery(msg.clone());
            (&m.session, out)
        });
        let ticket = self.enqueue_stamped(Some(msg), deliveries, ops, extra, limits);
        (matched, ticket)
    }

    /// Whether a session whose queue policy is `Block` and whose queue is full matches
    /// `msg`: then the publish is refused whole (PUBACK 0x97), so no subscriber receives a
    /// message its publisher was told failed. Free unless such a queue exists.
    pub(crate) fn refuses(
        &self,
        msg: &Message,
        origin: Option<&str>,
        routes: &mut Routes,
        cfg: &BrokerConfig,
    ) -> bool {
        if self.blocking_queues.load(Ordering::Relaxed) == 0 {
            return false;
        }
        let (matches, _) = self.subs.matches_cached(msg.topic.as_str(), origin, routes);
        let base = Self::queue_limits(cfg);
        for m in matches.iter() {
            if let Some(own) = self.own_queue(&m.session)
                && own.limits.policy == crate::session::QueuePolicy::Block
                && m.session
                    .would_overflow(Self::limits_with(Some(&own), base), msg.cost())
            {
                own.refused.fetch_add(1, Ordering::Relaxed);
                Stats::inc(&self.stats.dropped_queue_full);
                return true;
            }
        }
        false
    }

    /// Queues deliveries and makes them durable together: each is queued on its session;
    /// the store ops that makes, after `ops` and before `extra` (a retained set, an inbound
    /// QoS 2 id), go to the store in **one** batch, so a crash keeps all or none; every
    /// message delivered, and `stamp`, gets that batch's ticket, which its recorded
    /// deliveries wait for before they are written (see `Message::ticket`). The one path
    /// from deliveries to the store: publish, shared redispatch and retained messages on
    /// subscribe all come here. Returns the ticket (0: nothing stored).
    pub(crate) fn enqueue_stamped<S: AsRef<Session>>(
        &self,
        stamp: Option<&Arc<Message>>,
        deliveries: impl IntoIterator<Item = (S, Outgoing)>,
        mut ops: Vec<Op>,
        extra: Vec<Op>,
        limits: QueueLimits,
    ) -> u64 {
        // Usually one message (a publish to its subscribers): kept without a vector.
        let mut first = stamp.cloned();
        let mut more: Vec<Arc<Message>> = Vec::new();
        for (session, out) in deliveries {
            match &first {
                Some(f) if Arc::ptr_eq(f, &out.msg) => {}
                None => first = Some(out.msg.clone()),
                Some(_) => {
                    if !more.last().is_some_and(|m| Arc::ptr_eq(m, &out.msg)) {
                        more.push(out.msg.clone());
                    }
                }
            }
            let own = self.own_queue(session.as_ref());
            let (r, _) =
                session
                    .as_ref()
                    .enqueue(out, Self::limits_with(own.as_deref(), limits), &mut ops);
            self.count_enqueue(r);
            if let Some(o) = own {
                count_own(&o, r, 1);
            }
        }
        ops.extend(extra);
        let ticket = if ops.is_empty() {
            0
        } else {
            self.store.apply(ops)
        };
        for m in first.iter().chain(&more) {
            m.set_ticket(ticket);
        }
        ticket
    }

    /// Queues what a batch deferred (see [`Deferred`]): one lock and one wake-up per
    /// session.
    pub(crate) fn flush_deferred(&self, d: &mut Deferred, limits: QueueLimits) {
        if d.seg.is_empty() && d.groups.is_empty() {
            return; // every QoS 1/2 publish comes here first
        }
        d.close_segment();
        // QoS 0 deliveries record nothing; should one ever do, it still reaches the store.
        let mut ops = Vec::new();
        for (session, mut outs) in d.groups.drain(..) {
            let own = self.own_queue(&session);
            let l = Self::limits_with(own.as_deref(), limits);
            session.enqueue_many(outs.drain(..), l, &mut ops, |r, n| {
                self.count_enqueue_n(r, n);
                if let Some(o) = &own {
                    count_own(o, r, n);
                }
            });
            if outs.capacity() <= Deferred::SPARE_CAPACITY && d.spare.len() < Deferred::SPARE_MAX {
                d.spare.push(outs);
            }
        }
        d.index.clear();
        d.len = 0;
        if !ops.is_empty() {
            self.store.apply(ops);
        }
    }

    /// Hands deliveries a departing shared-group member did not send to other members of
    /// the same group (§4.8.2); with no other member they stay with `leaving`. One store
    /// batch for all of them.
    pub(crate) fn redispatch_shared(&self, leaving: &Arc<Session>, outs: Vec<Outgoing>) {
        let limits = Self::queue_limits(&self.cfg.load());
        let deliveries = outs.into_iter().filter_map(|out| {
            let filter = out.shared.clone()?;
            Some(match self.subs.pick_other_member(&filter, leaving) {
                Some(m) => m.into_delivery(out.msg),
                None => (
                    leaving.clone(),
                    Outgoing {
                        recorded: false,
                        ..out
                    },
                ),
            })
        });
        self.enqueue_stamped(None, deliveries, Vec::new(), Vec::new(), limits);
    }

    pub(crate) fn count_enqueue(&self, r: Enqueued) {
        self.count_enqueue_n(r, 1);
    }

    /// Counts outcome `r` for `n` messages.
    pub(crate) fn count_enqueue_n(&self, r: Enqueued, n: usize) {
        let counter = match r {
            Enqueued::Queued | Enqueued::DroppedEnded => return,
            Enqueued::QueuedEvictedQos0 => &self.stats.dropped_qos0_evicted,
            Enqueued::DroppedFull | Enqueued::QueuedDroppedOldest => &self.stats.dropped_queue_full,
            Enqueued::DroppedOfflineQos0 => &self.stats.dropped_offline_qos0,
        };
        Stats::add(counter, n as u64);
    }

    /// Publishes a will, if its client may still write to its topic: rights are checked
    /// again here, not only at CONNECT, since they may have changed in between (reload,
    /// a delay, a restart).
    pub(crate) fn publish_will(&self, session: &Session, msg: &Arc<Message>) {
        let client_id = &*session.client_id;
        let who = Identity {
            client_id: session.client_id.clone(),
            username: session.lock().owner().flatten().cloned(),
        };
        if !self.may_write(&who, msg.topic.as_str()) {
            Stats::inc(&self.stats.publish_denied);
            info!(client_id, user = who.username.as_deref(), topic = %msg.topic, "will not published: its client may not write to its topic");
            return;
        }
        debug!(client_id, topic = %msg.topic, "publishing will");
        Stats::inc(&self.stats.wills_published);
        let origin = msg.origin.as_deref();
        self.publish(
            msg,
            origin,
            &mut Routes::default(),
            Vec::new(),
            &self.cfg.load(),
            None,
        );
    }
}

/// Counts outcome `r` of `n` messages against a session's own queue limits.
fn count_own(o: &crate::session::OwnQueue, r: Enqueued, n: usize) {
    let c = match r {
        Enqueued::QueuedDroppedOldest => &o.dropped_oldest,
        Enqueued::DroppedFull => &o.dropped_new,
        _ => return,
    };
    c.fetch_add(n as u64, Ordering::Relaxed);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Broker;
    use halyard_codec::TopicName;
    use halyard_codec::{Bytes, ProtocolVersion, SubscriptionOptions, TopicFilter};
    use tokio::time::Instant;

    /// A broker whose `n` sessions all subscribe to `t`, queueing QoS 0 while offline.
    fn fanout_fixture(n: usize) -> (Broker, Vec<Arc<Session>>) {
        fanout_fixture_with(
            n,
            BrokerConfig {
                queue_qos0_messages: true,
                ..BrokerConfig::default()
            },
        )
    }

    fn fanout_fixture_with(n: usize, cfg: BrokerConfig) -> (Broker, Vec<Arc<Session>>) {
        let broker = Broker::new(cfg, Arc::new(halyard_store::MemoryStore::new()));
        let filter = TopicFilter::try_from("t").expect("valid filter");
        let subs: Vec<Arc<Session>> = (0..n)
            .map(|i| Arc::new(Session::new(format!("s{i}").into(), ProtocolVersion::V5, 0)))
            .collect();
        for s in &subs {
            broker
                .inner
                .subs
                .subscribe(&filter, s, SubscriptionOptions::default(), None);
        }
        (broker, subs)
    }

    /// Publishes QoS 0 message `id` on `t` as a batch of publisher `p` would.
    fn publish_deferred(inner: &Inner, id: u64, deferred: &mut Deferred, routes: &mut Routes) {
        publish_deferred_on(inner, "t", id, deferred, routes);
    }

    fn publish_deferred_on(
        inner: &Inner,
        topic: &str,
        id: u64,
        deferred: &mut Deferred,
        routes: &mut Routes,
    ) {
        let msg = Arc::new(Message::new(
            id,
            TopicName::new(topic).expect("valid topic"),
            Bytes::from_static(b"x"),
            QoS::AtMostOnce,
            false,
            Default::default(),
            None,
            Instant::now(),
        ));
        inner.publish(
            &msg,
            Some("p"),
            routes,
            Vec::new(),
            &inner.cfg(),
            Some(deferred),
        );
    }

    fn queued_ids(s: &Session) -> Vec<u64> {
        s.lock().queue.message_ids()
    }

    /// Asserts that every session in `subs` has exactly `ids` queued, in order.
    fn assert_queued(subs: &[Arc<Session>], ids: impl Iterator<Item = u64>) {
        let ids: Vec<u64> = ids.collect();
        for s in subs {
            assert_eq!(queued_ids(s), ids, "{}", s.client_id);
        }
    }

    /// A publisher's batch holds at most `Deferred::MAX` items outside the session queues
    /// (a 64 KiB read of tiny messages to many subscribers would otherwise hold millions
    /// of deliveries), and every message reaches every queue, in order. Messages in a row
    /// on one route are held once (a segment), and each session queues them as one run.
    #[tokio::test]
    async fn deferred_deliveries_stay_bounded_and_all_arrive() {
        let (broker, subs) = fanout_fixture_with(
            10,
            BrokerConfig {
                queue_qos0_messages: true,
                max_queued_messages: 10_000,
                ..BrokerConfig::default()
            },
        );
        let inner = &broker.inner;
        let (mut deferred, mut routes) = (Deferred::default(), Routes::default());
        let mut most = 0;
        let mut flushes = 0;
        for id in 0..3000u64 {
            let before = deferred.len;
            publish_deferred(inner, id, &mut deferred, &mut routes);
            flushes += usize::from(deferred.len < before);
            most = most.max(deferred.len);
        }
        assert!(most <= Deferred::MAX, "most held at once: {most}");
        // One item per message in a segment (plus its 10 members): ~1,000 messages per
        // segment, where one item per delivery would flush every ~100 messages.
        assert!((2..=3).contains(&flushes), "{flushes} flushes");
        inner.flush_deferred(&mut deferred, Inner::queue_limits(&inner.cfg()));
        assert_eq!(deferred.len, 0);
        assert_queued(&subs, 0..3000);
        for s in &subs {
            let st = s.lock();
            assert_eq!(st.queue.len(), 3000);
            assert_eq!(st.queue.bytes(), 3000 * 2, "topic `t` and payload `x`");
            // The first message of the route is held per delivery, the rest in runs.
            assert!(
                st.queue.entries() <= 1 + flushes + 1,
                "{} entries",
                st.queue.entries()
            );
        }
    }

    /// When the route changes with every message, nothing is gathered: the bound holds per
    /// delivery, and the order still holds.
    #[tokio::test]
    async fn deferred_deliveries_without_segments_stay_bounded() {
        let (broker, subs) = fanout_fixture(10);
        let inner = &broker.inner;
        let (mut deferred, mut routes) = (Deferred::default(), Routes::default());
        let mut most = 0;
        for id in 0..500u64 {
            // Every other message goes to a topic nobody subscribed to.
            let topic = if id % 2 == 0 { "t" } else { "u" };
            publish_deferred_on(inner, topic, id, &mut deferred, &mut routes);
            most = most.max(deferred.len);
        }
        // 10 deliveries per message on `t`: the bound is reached, never passed.
        assert!(
            (Deferred::MAX - 10..=Deferred::MAX).contains(&most),
            "most deferred at once: {most}"
        );
        inner.flush_deferred(&mut deferred, Inner::queue_limits(&inner.cfg()));
        for s in &subs {
            assert_eq!(queued_ids(s), (0..500).step_by(2).collect::<Vec<u64>>());
            assert_eq!(s.lock().queue.entries(), 250, "one entry per delivery");
        }
    }

    /// A run meets the queue's limits exactly as its messages one by one would: a full
    /// queue evicts its oldest QoS 0 messages (the run's own first ones included), an
    /// offline session without QoS 0 queueing drops them, an ended one takes none; each
    /// drop is counted once per message.
    #[tokio::test]
    async fn runs_meet_queue_limits_like_single_deliveries() {
        let (broker, subs) = fanout_fixture_with(
            3,
            BrokerConfig {
                queue_qos0_messages: true,
                max_queued_messages: 4,
                ..BrokerConfig::default()
            },
        );
        let inner = &broker.inner;
        subs[2].lock().ended = true;
        let (mut deferred, mut routes) = (Deferred::default(), Routes::default());
        for id in 0..10u64 {
            publish_deferred(inner, id, &mut deferred, &mut routes);
        }
        inner.flush_deferred(&mut deferred, Inner::queue_limits(&inner.cfg()));
        for s in &subs[..2] {
            assert_eq!(queued_ids(s), [6, 7, 8, 9], "the newest 4 stay");
            assert_eq!(s.lock().queue.bytes(), 4 * 2);
        }
        assert!(queued_ids(&subs[2]).is_empty());
        assert_eq!(inner.stats.snapshot().dropped_qos0_evicted, 2 * 6);

        // Without QoS 0 queueing for offline sessions.
        let mut cfg = (*inner.cfg()).clone();
        cfg.queue_qos0_messages = false;
        inner.replace_config(cfg);
        for id in 10..20u64 {
            publish_deferred(inner, id, &mut deferred, &mut routes);
        }
        inner.flush_deferred(&mut deferred, Inner::queue_limits(&inner.cfg()));
        assert_eq!(queued_ids(&subs[0]), [6, 7, 8, 9]);
        assert_eq!(inner.stats.snapshot().dropped_offline_qos0, 2 * 10);
        assert_eq!(inner.stats.snapshot().dropped_qos0_evicted, 2 * 6);
    }

    /// The group vectors of one batch are reused by the next (a fan-out allocated one per
    /// subscriber per batch), within their bound, and reuse keeps every session's order.
    #[tokio::test]
    async fn deferred_reuses_a_bounded_number_of_group_vectors() {
        let (broker, subs) = fanout_fixture(Deferred::SPARE_MAX + 22);
        let inner = &broker.inner;
        let (mut deferred, mut routes) = (Deferred::default(), Routes::default());
        // Batches of 3 messages (3 x 150 deliveries < Deferred::MAX: flushed by us only).
        for batch in 0..4u64 {
            for id in batch * 3..batch * 3 + 3 {
                publish_deferred(inner, id, &mut deferred, &mut routes);
            }
            if batch > 0 {
                // The spares of the last batch went to this one's first groups.
                assert!(
                    deferred.spare.is_empty(),
                    "batch {batch}: spares left unused"
                );
            }
            inner.flush_deferred(&mut deferred, Inner::queue_limits(&inner.cfg()));
            assert_eq!(
                deferred.spare.len(),
                Deferred::SPARE_MAX,
                "bounded in number"
            );
            assert!(
                deferred
                    .spare
                    .iter()
                    .all(|v| v.is_empty() && v.capacity() <= Deferred::SPARE_CAPACITY)
            );
        }
        assert_queued(&subs, 0..12);
    }
}
