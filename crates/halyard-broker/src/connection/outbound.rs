//! Packets to the client: acknowledgements held until durable, the queue moved into
//! the write buffer within Receive Maximum, topic aliases, and resends on resume.

use std::collections::HashMap;

use halyard_codec::{Ack, Packet, QoS, TopicName};
use halyard_store::Op;

use crate::auth::Access;

use super::*;
use crate::config::defaults::WRITE_BUFFER_HIGH_WATER_BYTES;
use crate::message::{self, Delivery, Message};
use crate::session::{Awaiting, Outgoing};
use crate::stats::Stats;

impl Proto {
    #[inline]
    pub(super) fn send(&mut self, p: &Packet) {
        // Our own packets are valid by construction and well under the size limits.
        let _ = p.encode(self.version, &mut self.wbuf);
    }

    /// Sends an acknowledgement once the store has made `ticket` durable: the client must
    /// not hear "received" for something a crash could lose. Acknowledgements stay in order.
    #[inline]
    pub(super) fn ack(&mut self, ticket: u64, p: Packet) {
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

    #[inline]
    pub(super) fn has_pending_acks(&self) -> bool {
        self.held.as_ref().is_some_and(|h| !h.acks.is_empty())
    }

    #[inline]
    pub(super) fn has_holds(&self) -> bool {
        self.held.as_ref().is_some_and(|h| !h.writes.is_empty())
    }

    /// The store's durable ticket, remembered in `durable_seen` for `main_loop`.
    #[inline]
    pub(super) fn durable_now(&self) -> u64 {
        let d = if self.flags.has(Flags::DURABLE) {
            self.inner.durable_now()
        } else {
            u64::MAX
        };
        self.durable_seen.set(d);
        d
    }

    #[inline]
    pub(super) fn release_acks(&mut self) {
        let durable = self.durable_now();
        let Some(h) = &mut self.held else { return };
        while h.acks.front().is_some_and(|(t, _)| *t <= durable) {
            if let Some((_, p)) = h.acks.pop_front() {
                // As `send`: our own packets are valid by construction.
                let _ = p.encode(self.version, &mut self.wbuf);
            }
        }
    }

    /// Moves queued messages into the write buffer within the client's Receive Maximum.
    pub(crate) fn fill(&mut self, now: &mut message::LazyNow) {
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
            let skip = if front.msg.is_expired_lazy(now) {
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
                match self.write_delivery(front.msg, d, now) {
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
            match self.write_delivery(&out.msg, d, now) {
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
    pub(super) fn write_delivery(
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
    #[inline]
    pub(super) fn writable_len(&mut self) -> usize {
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
    #[inline]
    pub(super) fn outbound_alias(&self, topic: &TopicName) -> Option<(u16, bool)> {
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

    #[inline]
    pub(super) fn alias_sent(&mut self, topic: &TopicName, alias: Option<(u16, bool)>) {
        if let Some((a, true)) = alias {
            self.aliases
                .get_or_insert_default()
                .outbound
                .insert(topic.clone(), a);
        }
    }

    /// On session resume, resends unacknowledged PUBLISH with DUP and PUBREL in their
    /// original order [MQTT-4.4.0-1], each PUBLISH only if the client may still read it.
    pub(super) fn resend_inflight(&mut self, now: Instant) {
        let mut now = message::LazyNow::at(now);
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
}
