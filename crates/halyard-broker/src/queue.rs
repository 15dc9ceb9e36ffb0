//! A session's queue: the deliveries waiting to be sent, in order.
//!
//! Most entries are one delivery ([`Outgoing`]). A publisher's batch of QoS 0 messages on
//! one route becomes a [`Segment`], and each session the route matched queues a [`Run`]
//! over it: one reference and one entry per session per batch instead of one per message.
//! In a fan-out, taking and dropping a reference to the message per delivery (two locked
//! instructions on a shared count) and moving a 40-byte delivery twice were a quarter of
//! the broker's CPU per delivery.
//!
//! A segment of small plain messages also keeps their packets encoded ([`Frames`], once
//! per protocol version, by the first subscriber to send them): every other subscriber
//! copies a run's packets into its write buffer in one go instead of encoding each.

use halyard_codec::TopicFilter;
use std::collections::VecDeque;
use std::sync::{Arc, OnceLock};

use halyard_codec::{
    BytesMut, PlainPublish, ProtocolVersion, QoS, TopicName, encode_plain_publish,
};

use crate::message::{MemoryUse, Message};

/// One queued or in-flight delivery of a message to this session.
#[derive(Debug, Clone)]
pub(crate) struct Outgoing {
    pub(crate) msg: Arc<Message>,
    /// Granted QoS: the lower of the message's and the subscription's.
    pub(crate) qos: QoS,
    /// RETAIN flag to send (retained-on-subscribe or Retain As Published).
    pub(crate) retain: bool,
    /// Identifiers of all matching subscriptions [MQTT-3.3.4-3]. A boxed slice and a
    /// boxed filter below: a queued delivery is 40 bytes instead of 80, which is memory
    /// per queued message and bytes written per delivery in a fan-out.
    pub(crate) subscription_ids: Box<[u32]>,
    /// Set when this copy was chosen for a shared subscription: if this session goes
    /// away before sending it, another member of the group gets it.
    pub(crate) shared: Option<Box<TopicFilter>>,
    /// Recorded in the store: it may only be sent once the message's ticket is durable.
    pub(crate) recorded: bool,
}

/// The largest segment (in message bytes) whose packets are kept encoded: the frames are
/// a copy, worth it for small messages (where encoding and the per-message work of the
/// write are most of a delivery's cost), not for large ones (where copying the payload
/// is, either way).
const FRAMES_MAX_BYTES: usize = 32 * 1024;

/// Consecutive QoS 0 messages of one publisher's batch with one route (so the same
/// sessions, with the same subscription identifiers), none with RETAIN set and none for
/// a shared subscription: what every session on the route gets is the same.
#[derive(Debug)]
pub(crate) struct Segment {
    msgs: Vec<Arc<Message>>,
    /// Queue bytes of all the messages (see [`Message::cost`]).
    cost: usize,
    /// Whether `frames` are used: several sessions share the segment, every message is
    /// plain ([`Message::is_plain`]) and all together are small (`FRAMES_MAX_BYTES`).
    framed: bool,
    /// The packets for 3.x and for v5 subscribers, encoded by the first to need them.
    frames: [OnceLock<Option<Frames>>; 2],
    /// Where the frames' bytes are charged (the messages' count).
    account: Option<&'static MemoryUse>,
}

/// A segment's messages as QoS 0 PUBLISH packets, back to back.
#[derive(Debug)]
pub(crate) struct Frames {
    bytes: BytesMut,
    /// Where each message's packet ends in `bytes`.
    ends: Vec<usize>,
    /// The longest packet (a client's Maximum Packet Size may be smaller).
    longest: usize,
}

impl Segment {
    /// The segment of `msgs` for `members` sessions.
    pub(crate) fn new(msgs: Vec<Arc<Message>>, members: usize) -> Arc<Segment> {
        let cost = msgs.iter().map(|m| m.cost()).sum();
        // One session encodes each message once either way: frames would only add a copy.
        let framed = members > 1 && cost <= FRAMES_MAX_BYTES && msgs.iter().all(|m| m.is_plain());
        let account = msgs.first().and_then(|m| m.account());
        Arc::new(Segment {
            msgs,
            cost,
            framed,
            frames: Default::default(),
            account,
        })
    }

    /// The packets for a subscriber speaking `version`, if this segment keeps them.
    fn frames(&self, version: ProtocolVersion) -> Option<&Frames> {
        if !self.framed {
            return None;
        }
        let v5 = version.is_v5();
        self.frames[usize::from(v5)]
            .get_or_init(|| {
                let mut bytes = BytesMut::with_capacity(self.cost + self.msgs.len() * 8);
                let mut ends = Vec::with_capacity(self.msgs.len());
                let mut longest = 0;
                for m in &self.msgs {
                    let start = bytes.len();
                    let p = PlainPublish {
                        dup: false,
                        qos: QoS::AtMostOnce,
                        retain: false,
                        topic: m.topic.as_str(),
                        packet_id: 0,
                        payload: &m.payload,
                    };
                    // 3.1 and 3.1.1 encode a PUBLISH alike.
                    let v = if v5 {
                        ProtocolVersion::V5
                    } else {
                        ProtocolVersion::V3_1_1
                    };
                    encode_plain_publish(&p, v, &mut bytes).ok()?;
                    ends.push(bytes.len());
                    longest = longest.max(bytes.len() - start);
                }
                if let Some(a) = self.account {
                    a.add_bytes(bytes.capacity() as isize);
                }
                Some(Frames {
                    bytes,
                    ends,
                    longest,
                })
            })
            .as_ref()
    }
}

impl Drop for Segment {
    fn drop(&mut self) {
        if let Some(a) = self.account {
            for f in self.frames.iter().filter_map(|f| f.get()).flatten() {
                a.add_bytes(-(f.bytes.capacity() as isize));
            }
        }
    }
}

/// One session's share of a [`Segment`]: its messages from `next` on, each delivered at
/// QoS 0 with RETAIN clear, not recorded, not shared.
#[derive(Debug)]
pub(crate) struct Run {
    seg: Arc<Segment>,
    /// The first message not yet sent (or evicted).
    next: u32,
    subscription_ids: Box<[u32]>,
}

impl Run {
    pub(crate) fn new(seg: Arc<Segment>, subscription_ids: Box<[u32]>) -> Run {
        Run {
            seg,
            next: 0,
            subscription_ids,
        }
    }

    /// Messages left.
    pub(crate) fn len(&self) -> usize {
        self.seg.msgs.len() - self.next as usize
    }

    /// Queue bytes of the messages left. (Not kept in the run: a queue entry is then no
    /// bigger than a single delivery.)
    pub(crate) fn cost(&self) -> usize {
        if self.next == 0 {
            self.seg.cost
        } else {
            self.seg.msgs[self.next as usize..]
                .iter()
                .map(|m| m.cost())
                .sum()
        }
    }

    fn front(&self) -> &Arc<Message> {
        &self.seg.msgs[self.next as usize]
    }

    /// Drops the first message left; its cost.
    fn advance(&mut self) -> usize {
        let c = self.front().cost();
        self.next += 1;
        c
    }

    fn delivery(&self, msg: &Arc<Message>) -> Outgoing {
        Outgoing {
            msg: msg.clone(),
            qos: QoS::AtMostOnce,
            retain: false,
            subscription_ids: self.subscription_ids.clone(),
            shared: None,
            recorded: false,
        }
    }

    /// The messages left as single deliveries.
    pub(crate) fn into_deliveries(self) -> impl Iterator<Item = Outgoing> {
        let start = self.next as usize;
        (start..self.seg.msgs.len()).map(move |i| self.delivery(&self.seg.msgs[i]))
    }
}

/// A queued delivery, or several (see the module comment).
#[derive(Debug)]
pub(crate) enum Entry {
    One(Outgoing),
    Run(Run),
}

/// The front run's packets from its next message on (see [`Queue::front_frames`]).
#[derive(Debug)]
pub(crate) struct FrontFrames<'a> {
    /// The topic of all of them.
    pub(crate) topic: &'a TopicName,
    pub(crate) subscription_ids: &'a [u32],
    frames: &'a Frames,
    next: usize,
}

impl<'a> FrontFrames<'a> {
    pub(crate) fn longest(&self) -> usize {
        self.frames.longest
    }

    /// As many whole packets as fit in `room` bytes (at least one): how many, and their
    /// bytes.
    pub(crate) fn take(&self, room: usize) -> (usize, &'a [u8]) {
        let ends = &self.frames.ends;
        let start = self.next.checked_sub(1).map_or(0, |i| ends[i]);
        let n = ends[self.next..]
            .partition_point(|&e| e - start <= room)
            .max(1);
        (n, &self.frames.bytes[start..ends[self.next + n - 1]])
    }
}

/// The front delivery, borrowed: QoS 0 is written from here without taking it apart.
#[derive(Debug)]
pub(crate) struct Front<'a> {
    pub(crate) msg: &'a Arc<Message>,
    pub(crate) qos: QoS,
    pub(crate) retain: bool,
    pub(crate) recorded: bool,
    pub(crate) subscription_ids: &'a [u32],
}

#[derive(Debug, Default)]
pub(crate) struct Queue {
    entries: VecDeque<Entry>,
    /// Messages queued (a run counts each one it has left): what `max_queued_messages`
    /// bounds and the admin API shows.
    len: usize,
    /// Their [`Message::cost`]: what `max_queued_bytes` bounds.
    bytes: usize,
}

impl Queue {
    #[inline]
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    #[inline]
    pub(crate) fn bytes(&self) -> usize {
        self.bytes
    }

    #[inline]
    pub(crate) fn push(&mut self, out: Outgoing) {
        self.len += 1;
        self.bytes += out.msg.cost();
        self.entries.push_back(Entry::One(out));
    }

    /// Queues a run as it is: the caller has checked the limits.
    pub(crate) fn push_run(&mut self, run: Run) {
        if run.len() == 0 {
            return;
        }
        self.len += run.len();
        self.bytes += run.cost();
        self.entries.push_back(Entry::Run(run));
    }

    #[inline]
    pub(crate) fn front(&self) -> Option<Front<'_>> {
        Some(match self.entries.front()? {
            Entry::One(o) => Front {
                msg: &o.msg,
                qos: o.qos,
                retain: o.retain,
                recorded: o.recorded,
                subscription_ids: &o.subscription_ids,
            },
            Entry::Run(r) => Front {
                msg: r.front(),
                qos: QoS::AtMostOnce,
                retain: false,
                recorded: false,
                subscription_ids: &r.subscription_ids,
            },
        })
    }

    /// The front entry's packets for a subscriber speaking `version`, when it is a run
    /// whose segment keeps them (see [`Frames`]).
    #[inline]
    pub(crate) fn front_frames(&self, version: ProtocolVersion) -> Option<FrontFrames<'_>> {
        let Some(Entry::Run(r)) = self.entries.front() else {
            return None;
        };
        Some(FrontFrames {
            topic: &r.front().topic,
            subscription_ids: &r.subscription_ids,
            frames: r.seg.frames(version)?,
            next: r.next as usize,
        })
    }

    /// Removes the first `n` messages of the front run (after they were written from
    /// [`Queue::front_frames`]).
    pub(crate) fn drop_front_run(&mut self, n: usize) {
        let Some(Entry::Run(r)) = self.entries.front_mut() else {
            return;
        };
        let n = n.min(r.len());
        let start = r.next as usize;
        self.bytes -= r.seg.msgs[start..start + n]
            .iter()
            .map(|m| m.cost())
            .sum::<usize>();
        self.len -= n;
        r.next += n as u32;
        if r.len() == 0 {
            self.entries.pop_front();
        }
    }

    /// Takes the front delivery out (one of a run is made into its own delivery).
    #[inline(always)]
    pub(crate) fn pop_front(&mut self) -> Option<Outgoing> {
        if let Entry::Run(r) = self.entries.front_mut()? {
            let out = r.delivery(r.front());
            self.drop_front();
            return Some(out);
        }
        let Some(Entry::One(out)) = self.entries.pop_front() else {
            unreachable!("the front entry was just seen to be one delivery");
        };
        self.len -= 1;
        self.bytes -= out.msg.cost();
        Some(out)
    }

    /// Removes the front delivery (after it was written from [`Queue::front`]).
    #[inline]
    pub(crate) fn drop_front(&mut self) {
        let done = match self.entries.front_mut() {
            None => return,
            Some(Entry::One(o)) => {
                self.bytes -= o.msg.cost();
                true
            }
            Some(Entry::Run(r)) => {
                self.bytes -= r.advance();
                r.len() == 0
            }
        };
        self.len -= 1;
        if done {
            self.entries.pop_front();
        }
    }

    /// Drops the oldest QoS 0 delivery (the queue is full, and QoS 0 is the one class the
    /// sender accepted losing). False when there is none.
    pub(crate) fn evict_oldest_qos0(&mut self) -> bool {
        let Some(i) = self.entries.iter().position(|e| match e {
            Entry::One(o) => o.qos == QoS::AtMostOnce,
            Entry::Run(_) => true,
        }) else {
            return false;
        };
        let done = match &mut self.entries[i] {
            Entry::One(o) => {
                self.bytes -= o.msg.cost();
                true
            }
            Entry::Run(r) => {
                self.bytes -= r.advance();
                r.len() == 0
            }
        };
        self.len -= 1;
        if done {
            self.entries.remove(i);
        }
        true
    }

    /// Takes out the single deliveries `take` chooses, keeping the order of the rest.
    /// (Runs are never for a shared subscription, the one thing taken out.)
    pub(crate) fn take_where(&mut self, mut take: impl FnMut(&Outgoing) -> bool) -> Vec<Outgoing> {
        let mut taken = Vec::new();
        let mut kept = VecDeque::with_capacity(self.entries.len());
        for e in std::mem::take(&mut self.entries) {
            match e {
                Entry::One(o) if take(&o) => {
                    self.len -= 1;
                    self.bytes -= o.msg.cost();
                    taken.push(o);
                }
                e => kept.push_back(e),
            }
        }
        self.entries = kept;
        taken
    }

    pub(crate) fn clear(&mut self) {
        self.entries.clear();
        self.len = 0;
        self.bytes = 0;
    }

    /// The message ids queued, in order.
    #[cfg(test)]
    pub(crate) fn message_ids(&self) -> Vec<u64> {
        let mut ids = Vec::with_capacity(self.len);
        for e in &self.entries {
            match e {
                Entry::One(o) => ids.push(o.msg.id),
                Entry::Run(r) => ids.extend(r.seg.msgs[r.next as usize..].iter().map(|m| m.id)),
            }
        }
        ids
    }

    /// How many entries hold the queued messages (tests: runs are kept whole).
    #[cfg(test)]
    pub(crate) fn entries(&self) -> usize {
        self.entries.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use halyard_codec::{Bytes, PublishProperties};
    use tokio::time::Instant;

    /// A message without properties.
    fn message(id: u64, topic: &str, payload: Bytes, qos: QoS) -> Message {
        Message::new(
            id,
            TopicName::new(topic).expect("valid topic"),
            payload,
            qos,
            false,
            Default::default(),
            None,
            Instant::now(),
        )
    }

    fn msg(id: u64, payload: &'static [u8]) -> Arc<Message> {
        Arc::new(message(
            id,
            "t",
            Bytes::from_static(payload),
            QoS::AtLeastOnce,
        ))
    }

    fn one(m: Arc<Message>, qos: QoS) -> Outgoing {
        Outgoing {
            msg: m,
            qos,
            retain: false,
            subscription_ids: Box::default(),
            shared: None,
            recorded: false,
        }
    }

    /// [Q1 "a", run of "bb" "ccc" "dddd" with identifier 7, Q0 "e"]
    fn mixed() -> Queue {
        let mut q = Queue::default();
        q.push(one(msg(1, b"a"), QoS::AtLeastOnce));
        let seg = Segment::new(vec![msg(2, b"bb"), msg(3, b"ccc"), msg(4, b"dddd")], 2);
        q.push_run(Run::new(seg, vec![7].into()));
        q.push(one(msg(5, b"e"), QoS::AtMostOnce));
        q
    }

    #[test]
    fn a_run_counts_each_message_and_its_bytes() {
        let q = mixed();
        assert_eq!(q.len(), 5);
        // Each message costs its topic (`t`) and payload.
        assert_eq!(q.bytes(), 2 + 3 + 4 + 5 + 2);
        assert_eq!(q.entries(), 3);
        assert_eq!(q.message_ids(), [1, 2, 3, 4, 5]);
    }

    #[test]
    fn the_front_of_a_run_is_its_next_message_at_qos_0() {
        let mut q = mixed();
        let o = q.pop_front().expect("queued");
        assert_eq!((o.msg.id, o.qos), (1, QoS::AtLeastOnce));
        let f = q.front().expect("queued");
        assert_eq!(
            (f.msg.id, f.qos, f.retain, f.recorded),
            (2, QoS::AtMostOnce, false, false)
        );
        assert_eq!(f.subscription_ids, [7]);
        // Written from the front, then dropped: the run stays until its last message.
        q.drop_front();
        assert_eq!((q.len(), q.bytes(), q.entries()), (3, 4 + 5 + 2, 2));
        // Taken out as a delivery of its own, with the run's identifiers.
        let o = q.pop_front().expect("queued");
        assert_eq!(
            (o.msg.id, o.qos, &o.subscription_ids[..]),
            (3, QoS::AtMostOnce, &[7][..])
        );
        q.drop_front();
        assert_eq!(
            (q.len(), q.bytes(), q.entries()),
            (1, 2, 1),
            "the emptied run is gone"
        );
        assert_eq!(q.pop_front().map(|o| o.msg.id), Some(5));
        assert!(q.front().is_none() && q.pop_front().is_none());
        assert_eq!((q.len(), q.bytes()), (0, 0));
        q.drop_front(); // nothing to drop: no effect
        assert_eq!(q.len(), 0);
    }

    #[test]
    fn eviction_takes_the_oldest_qos_0_message_even_inside_a_run() {
        let mut q = mixed();
        for (left, ids) in [
            (4, &[1, 3, 4, 5][..]),
            (3, &[1, 4, 5]),
            (2, &[1, 5]),
            (1, &[1]),
        ] {
            assert!(q.evict_oldest_qos0());
            assert_eq!(q.len(), left);
            assert_eq!(q.message_ids(), ids);
        }
        assert!(!q.evict_oldest_qos0(), "QoS 1 is never evicted");
        assert_eq!((q.bytes(), q.entries()), (2, 1));
    }

    #[test]
    fn taking_deliveries_out_keeps_runs_and_order() {
        let mut q = mixed();
        let taken = q.take_where(|o| o.msg.id != 3);
        assert_eq!(taken.iter().map(|o| o.msg.id).collect::<Vec<_>>(), [1, 5]);
        assert_eq!(q.message_ids(), [2, 3, 4]);
        assert_eq!((q.len(), q.bytes()), (3, 3 + 4 + 5));
        let rest: Vec<u64> = std::iter::from_fn(|| q.pop_front())
            .map(|o| o.msg.id)
            .collect();
        assert_eq!(rest, [2, 3, 4]);
        let mut q = mixed();
        q.clear();
        assert_eq!((q.len(), q.bytes(), q.entries()), (0, 0, 0));
    }

    #[test]
    fn a_run_taken_apart_gives_the_messages_left() {
        let seg = Segment::new(vec![msg(2, b"bb"), msg(3, b"ccc"), msg(4, b"dddd")], 2);
        let mut run = Run::new(seg.clone(), vec![9].into());
        assert_eq!((run.len(), run.cost()), (3, 3 + 4 + 5));
        run.advance();
        assert_eq!((run.len(), run.cost()), (2, 4 + 5));
        let outs: Vec<Outgoing> = run.into_deliveries().collect();
        assert_eq!(outs.iter().map(|o| o.msg.id).collect::<Vec<_>>(), [3, 4]);
        assert!(
            outs.iter()
                .all(|o| o.qos == QoS::AtMostOnce && o.subscription_ids[..] == [9])
        );
        // An empty run is not queued.
        let mut q = Queue::default();
        let mut run = Run::new(seg, Box::default());
        for _ in 0..3 {
            run.advance();
        }
        q.push_run(run);
        assert_eq!((q.len(), q.entries()), (0, 0));
    }

    fn plain(id: u64, payload: Vec<u8>, account: &'static MemoryUse) -> Arc<Message> {
        Arc::new(message(id, "f/x", Bytes::from(payload), QoS::AtMostOnce).charged_to(account))
    }

    /// A shared segment of small plain messages keeps their QoS 0 packets, per protocol
    /// version: they decode (with our codec) to exactly the PUBLISH packets the single
    /// deliveries would be, in order; `take` stops at whole packets within the room it is
    /// given (at least one); the frames' bytes are charged to the broker's count while
    /// the segment lives.
    #[test]
    fn a_shared_segment_keeps_its_packets_encoded_per_version() {
        use halyard_codec::{Packet, decode};
        let account = MemoryUse::new_static();
        let msgs: Vec<Arc<Message>> = (0..5u8)
            .map(|i| plain(u64::from(i), vec![i; usize::from(i) + 1], account))
            .collect();
        let charged = account.bytes();
        let seg = Segment::new(msgs, 2);
        for v in [
            ProtocolVersion::V3_1_1,
            ProtocolVersion::V5,
            ProtocolVersion::V3_1,
        ] {
            let mut q = Queue::default();
            q.push_run(Run::new(seg.clone(), Box::default()));
            let f = q.front_frames(v).expect("framed");
            assert_eq!(f.topic.as_str(), "f/x");
            // 3.1.1: 2 + 2 + 3 (topic) + payload; v5 one more (no properties).
            let extra = usize::from(v.is_v5());
            assert_eq!(f.longest(), 7 + extra + 5);
            // Room for the first two and part of the third: two packets.
            let (n, bytes) = f.take(7 + extra + 1 + 7 + extra + 2 + 3);
            assert_eq!(n, 2);
            let mut all = BytesMut::from(bytes);
            q.drop_front_run(n);
            assert_eq!((q.len(), q.bytes()), (3, 3 * 3 + 3 + 4 + 5));
            // No room at all still gives one packet (the caller writes at least one).
            let f = q.front_frames(v).expect("framed");
            let (n, bytes) = f.take(0);
            assert_eq!(n, 1);
            all.extend_from_slice(bytes);
            q.drop_front_run(n);
            let (n, bytes) = q.front_frames(v).expect("framed").take(usize::MAX);
            assert_eq!(n, 2);
            all.extend_from_slice(bytes);
            q.drop_front_run(n);
            assert_eq!((q.len(), q.bytes(), q.entries()), (0, 0, 0));
            for i in 0..5u8 {
                let Ok(Some(Packet::Publish(p))) = decode(&mut all, v, u32::MAX) else {
                    panic!("{v:?}: packet {i} does not decode");
                };
                assert_eq!(
                    (p.topic.as_str(), p.qos, p.retain, p.dup),
                    ("f/x", QoS::AtMostOnce, false, false)
                );
                assert_eq!(&p.payload[..], vec![i; usize::from(i) + 1]);
                assert!(p.properties.is_empty(), "{v:?}");
            }
            assert!(all.is_empty());
        }
        // Both versions' frames (3.1 shares 3.1.1's) are charged while the segment lives.
        assert!(
            account.bytes() >= charged + 2 * (5 * 7 + 15),
            "{}",
            account.bytes()
        );
        drop(seg);
        assert_eq!(account.bytes(), 0, "messages and frames refunded");
    }

    /// No frames where they would not pay or would not be the same for everyone: one
    /// member only, a message with properties, with an expiry or with RETAIN, or a
    /// large segment.
    #[test]
    fn frames_only_for_shared_small_plain_segments() {
        let account = MemoryUse::new_static();
        let framed = |seg: Arc<Segment>| {
            let mut q = Queue::default();
            q.push_run(Run::new(seg, Box::default()));
            q.front_frames(ProtocolVersion::V5).is_some()
        };
        let small = || vec![plain(1, vec![1], account), plain(2, vec![2], account)];
        assert!(framed(Segment::new(small(), 2)));
        assert!(!framed(Segment::new(small(), 1)), "one member");
        let with = |f: fn(&mut PublishProperties), retain: bool| {
            let mut props = PublishProperties::default();
            f(&mut props);
            Arc::new(Message::new(
                3,
                TopicName::new("f/x").expect("valid topic"),
                Bytes::from_static(b"p"),
                QoS::AtMostOnce,
                retain,
                props,
                None,
                Instant::now(),
            ))
        };
        let user = with(|p| p.user_properties.push(("k".into(), "v".into())), false);
        let expiring = with(|p| p.message_expiry_interval = Some(60), false);
        let retained = with(|_| {}, true);
        for odd in [user, expiring, retained] {
            let mut msgs = small();
            msgs.push(odd);
            assert!(!framed(Segment::new(msgs, 2)));
        }
        let big: Vec<Arc<Message>> = (0..2)
            .map(|i| plain(i, vec![0; FRAMES_MAX_BYTES / 2], account))
            .collect();
        assert!(!framed(Segment::new(big, 2)), "over FRAMES_MAX_BYTES");
    }
}
