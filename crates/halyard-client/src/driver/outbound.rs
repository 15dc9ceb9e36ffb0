//! Packets to the broker: the session replayed or rebuilt after CONNACK, subscriptions,
//! publishes within the broker's Receive Maximum, and commands while online.

use std::sync::atomic::Ordering;

use halyard_codec::{
    Ack, Packet, Properties, Publish, QoS, ReasonCode, Subscribe, TopicFilter, TopicName,
    Unsubscribe,
};

use crate::events::{Command, PublishResult, Reply};

/// Bytes we let pile up in the write buffer before we stop pulling more from the queue;
/// beyond this the socket, not memory, is the buffer.
use super::*;

impl Driver {
    /// After CONNACK: replay or rebuild the session.
    pub(super) fn resume(&mut self, s: &mut Session, session_present: bool) {
        if session_present {
            // [MQTT-4.4.0-1] resend unacknowledged PUBLISH (with DUP) and PUBREL, in order.
            for i in 0..self.inflight.len() {
                let pkt = if self.inflight[i].released {
                    Packet::PubRel(Ack::new(self.inflight[i].publish.packet_id))
                } else {
                    self.inflight[i].publish.dup = true;
                    Packet::Publish(self.inflight[i].publish.clone())
                };
                write_packet(s, &pkt);
            }
            for f in std::mem::take(&mut self.unsub_later) {
                self.send_unsubscribe(s, f, None);
            }
        } else {
            // A new session: the broker kept nothing. Messages it had not acknowledged are
            // sent again as new ones; a QoS 2 message it had answered with PUBREC is already
            // its responsibility, so it is complete.
            self.awaiting_rel.clear();
            self.unsub_later.clear();
            let mut resend = Vec::new();
            for mut i in self.inflight.drain(..) {
                if i.released {
                    if let Some(d) = i.done.take() {
                        let _ = d.send(Ok(i.result.take().unwrap_or(PublishResult {
                            reason: ReasonCode::Success,
                            properties: Default::default(),
                        })));
                    }
                } else {
                    i.publish.dup = false;
                    resend.push(Outgoing {
                        publish: i.publish,
                        done: i.done,
                    });
                }
            }
            for o in resend.into_iter().rev() {
                self.queued.fetch_add(1, Ordering::AcqRel);
                self.queue.push_front(o);
            }
            for e in self.subs.values_mut() {
                e.confirmed = false;
            }
        }
        // SUBSCRIBEs sent on the lost connection are sent again below; their UNSUBACKs
        // will never come.
        for (_, w) in self.acks.drain() {
            if let AckWait::Unsubscribe(Some(r)) = w {
                let _ = r.send(Ok(()));
            }
        }
        let ids: Vec<u32> = self
            .subs
            .iter()
            .filter(|(_, e)| !e.confirmed)
            .map(|(id, _)| *id)
            .collect();
        for id in ids {
            self.send_subscribe(s, id);
        }
        self.pump(s);
    }

    pub(super) fn send_subscribe(&mut self, s: &mut Session, id: u32) {
        let pid = self.alloc_pid();
        let Some(e) = self.subs.get(&id) else { return };
        let properties = Properties {
            subscription_identifier: s.sub_ids.then_some(id),
            user_properties: e.user_properties.clone(),
            ..Properties::default()
        };
        let pkt = Packet::Subscribe(Subscribe {
            packet_id: pid,
            filters: vec![(e.filter.clone(), e.options)],
            properties,
        });
        self.acks.insert(pid, AckWait::Subscribe(id));
        write_packet(s, &pkt);
    }

    /// Writes an UNSUBSCRIBE; `reply` learns of the UNSUBACK.
    pub(super) fn send_unsubscribe(
        &mut self,
        s: &mut Session,
        filter: TopicFilter,
        reply: Option<Reply<()>>,
    ) {
        let pid = self.alloc_pid();
        self.acks.insert(pid, AckWait::Unsubscribe(reply));
        write_packet(
            s,
            &Packet::Unsubscribe(Unsubscribe {
                packet_id: pid,
                filters: vec![filter],
                properties: Properties::default(),
            }),
        );
    }

    /// A packet id not in use by our in-flight messages or pending (UN)SUBSCRIBEs.
    pub(super) fn alloc_pid(&mut self) -> u16 {
        loop {
            let pid = self.next_pid;
            self.next_pid = self.next_pid.checked_add(1).unwrap_or(1);
            if !self.acks.contains_key(&pid)
                && !self.inflight.iter().any(|i| i.publish.packet_id == pid)
            {
                return pid;
            }
        }
    }

    /// Moves queued messages to the write buffer while the broker's receive window and our
    /// write high-water mark allow.
    pub(super) fn pump(&mut self, s: &mut Session) {
        while s.wbuf.len() < WRITE_HIGH_WATER {
            let Some(head) = self.queue.front() else {
                break;
            };
            if head.publish.qos != QoS::AtMostOnce && self.inflight.len() >= s.window {
                break;
            }
            let Some(mut o) = self.queue.pop_front() else {
                break;
            };
            self.queued.fetch_sub(1, Ordering::AcqRel);
            if let Err(e) = check_publish(s, &o.publish) {
                if let Some(d) = o.done {
                    let _ = d.send(Err(e));
                }
                continue;
            }
            if o.publish.qos == QoS::AtMostOnce {
                self.write_publish(s, o.publish);
                if let Some(d) = o.done {
                    let _ = d.send(Ok(PublishResult {
                        reason: ReasonCode::Success,
                        properties: Default::default(),
                    }));
                }
            } else {
                o.publish.packet_id = self.alloc_pid();
                self.write_publish(s, o.publish.clone());
                self.inflight.push_back(Inflight {
                    publish: o.publish,
                    released: false,
                    result: None,
                    done: o.done,
                });
            }
        }
    }

    /// Writes a PUBLISH, replacing the topic by an alias when we may.
    pub(super) fn write_publish(&self, s: &mut Session, mut p: Publish) {
        if s.alias_max > 0 {
            if let Some(&a) = s.alias_out.get(&p.topic) {
                p.properties.topic_alias = Some(a);
                p.topic = TopicName::new("").unwrap_or_else(|_| p.topic.clone());
            } else if s.alias_out.len() < usize::from(s.alias_max) {
                let a = u16::try_from(s.alias_out.len() + 1).unwrap_or(u16::MAX);
                s.alias_out.insert(p.topic.clone(), a);
                p.properties.topic_alias = Some(a);
            }
        }
        write_packet(s, &Packet::Publish(p));
    }

    pub(super) fn online_command(&mut self, s: &mut Session, cmd: Command) {
        match cmd {
            Command::Publish { publish, done } => {
                self.queue.push_back(Outgoing {
                    publish,
                    done: Some(done),
                });
            }
            Command::Subscribe {
                filter,
                options,
                user_properties,
                tx,
                reply,
            } => {
                let id = self.add_sub(filter, options, user_properties, tx, reply);
                self.send_subscribe(s, id);
            }
            Command::Unsubscribe { filter, reply } => {
                self.remove_subs(&filter);
                self.send_unsubscribe(s, filter, Some(reply));
            }
            Command::Disconnect { .. } => unreachable!("handled by the caller"),
        }
    }
}
