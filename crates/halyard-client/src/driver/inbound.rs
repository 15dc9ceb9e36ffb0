//! Packets from the broker: decoding the read buffer and one handler per packet, with
//! deliveries to subscriptions that wait when a subscriber's buffer is full.

use halyard_codec::{
    Ack, BytesMut, MAX_PACKET_SIZE, Packet, Publish, QoS, ReasonCode, TopicFilter, decode,
};
use tokio::sync::mpsc;
use tracing::debug;

use crate::events::PublishResult;
use crate::{Error, Message};

/// Bytes we let pile up in the write buffer before we stop pulling more from the queue;
/// beyond this the socket, not memory, is the buffer.
use super::*;

impl Driver {
    /// Decodes and handles buffered packets until the buffer is empty or a delivery waits.
    pub(super) fn process_input(
        &mut self,
        s: &mut Session,
        rbuf: &mut BytesMut,
    ) -> Result<(), (ReasonCode, String)> {
        let max = self.opts.maximum_packet_size.unwrap_or(MAX_PACKET_SIZE);
        while self.pending.is_none() {
            match decode(rbuf, s.version, max) {
                Ok(Some(p)) => self.handle_packet(s, p)?,
                Ok(None) => break,
                Err(e) => return Err((e.reason_code(), e.to_string())),
            }
        }
        Ok(())
    }

    pub(super) fn handle_packet(
        &mut self,
        s: &mut Session,
        p: Packet,
    ) -> Result<(), (ReasonCode, String)> {
        if let Some(t) = &s.trace {
            (t.0)(&format!("received {}", summary(&p)));
        }
        match p {
            Packet::Publish(p) => self.incoming_publish(s, p)?,
            Packet::PubAck(a) => {
                let Some(pos) = self.inflight.iter().position(|i| {
                    i.publish.packet_id == a.packet_id && i.publish.qos == QoS::AtLeastOnce
                }) else {
                    debug!(pid = a.packet_id, "PUBACK for an unknown packet id");
                    return Ok(());
                };
                let i = self.inflight.remove(pos).expect("position is in range");
                if let Some(d) = i.done {
                    let _ = d.send(ack_result(a));
                }
            }
            Packet::PubRec(a) => {
                let Some(pos) = self.inflight.iter().position(|i| {
                    i.publish.packet_id == a.packet_id && i.publish.qos == QoS::ExactlyOnce
                }) else {
                    // [MQTT-4.3.3-?] answer so the broker can finish: PUBREL, id not found.
                    let mut rel = Ack::new(a.packet_id);
                    rel.reason = ReasonCode::PacketIdentifierNotFound;
                    write_packet(s, &Packet::PubRel(rel));
                    return Ok(());
                };
                if a.reason.is_error() {
                    // The exchange ends with a failing PUBREC; no PUBREL [MQTT-4.3.3-8].
                    let i = self.inflight.remove(pos).expect("position is in range");
                    if let Some(d) = i.done {
                        let _ = d.send(ack_result(a));
                    }
                } else {
                    let i = &mut self.inflight[pos];
                    i.released = true;
                    i.result = ack_result(a).ok();
                    write_packet(s, &Packet::PubRel(Ack::new(i.publish.packet_id)));
                }
            }
            Packet::PubComp(a) => {
                if let Some(pos) = self
                    .inflight
                    .iter()
                    .position(|i| i.publish.packet_id == a.packet_id && i.released)
                {
                    let mut i = self.inflight.remove(pos).expect("position is in range");
                    if let Some(d) = i.done.take() {
                        let r = i.result.take().unwrap_or(PublishResult {
                            reason: ReasonCode::Success,
                            properties: Default::default(),
                        });
                        let _ = d.send(Ok(r));
                    }
                }
            }
            Packet::PubRel(a) => {
                // [MQTT-4.3.3-11] answer PUBREL with PUBCOMP; the id may be reused now.
                let known = self.awaiting_rel.remove(&a.packet_id);
                let mut comp = Ack::new(a.packet_id);
                if !known && s.version.is_v5() {
                    comp.reason = ReasonCode::PacketIdentifierNotFound;
                }
                write_packet(s, &Packet::PubComp(comp));
            }
            Packet::SubAck(a) => match self.acks.remove(&a.packet_id) {
                Some(AckWait::Subscribe(id)) => {
                    let reason = a
                        .reasons
                        .first()
                        .copied()
                        .unwrap_or(ReasonCode::UnspecifiedError);
                    if reason.is_error() {
                        if let Some(mut e) = self.subs.remove(&id)
                            && let Some(r) = e.reply.take()
                        {
                            let _ = r.send(Err(Error::Rejected {
                                reason,
                                reason_string: a.properties.reason_string.map(|s| s.to_string()),
                            }));
                        }
                    } else if let Some(e) = self.subs.get_mut(&id) {
                        e.confirmed = true;
                        let granted = QoS::from_u8(reason as u8).unwrap_or(QoS::AtMostOnce);
                        if let Some(r) = e.reply.take() {
                            let _ = r.send(Ok(granted));
                        }
                    }
                }
                _ => debug!(pid = a.packet_id, "unexpected SUBACK"),
            },
            Packet::UnsubAck(a) => {
                if let Some(AckWait::Unsubscribe(Some(r))) = self.acks.remove(&a.packet_id) {
                    let _ = r.send(Ok(()));
                }
            }
            Packet::PingResp => s.ping_sent = None,
            Packet::Disconnect(d) => {
                let text = d.properties.reason_string.as_deref().unwrap_or("");
                return Err((
                    d.reason,
                    format!(
                        "disconnected by the broker: {} (0x{:02X}) {text}",
                        crate::reason_text(d.reason),
                        d.reason as u8
                    ),
                ));
            }
            other => {
                return Err((
                    ReasonCode::ProtocolError,
                    format!("unexpected {} from the broker", other.name()),
                ));
            }
        }
        Ok(())
    }

    pub(super) fn incoming_publish(
        &mut self,
        s: &mut Session,
        mut p: Publish,
    ) -> Result<(), (ReasonCode, String)> {
        if let Some(alias) = p.properties.topic_alias {
            if alias == 0 || alias > self.opts.topic_alias_maximum {
                // [MQTT-3.3.2-9] an alias above our maximum is a protocol error.
                return Err((
                    ReasonCode::TopicAliasInvalid,
                    format!("topic alias {alias} out of range"),
                ));
            }
            if p.topic.is_empty() {
                match s.alias_in.get(&alias) {
                    Some(t) => p.topic = t.clone(),
                    None => {
                        return Err((
                            ReasonCode::ProtocolError,
                            format!("unknown topic alias {alias}"),
                        ));
                    }
                }
            } else {
                s.alias_in.insert(alias, p.topic.clone());
            }
        }
        let ack = match p.qos {
            QoS::AtMostOnce => None,
            QoS::AtLeastOnce => Some(Packet::PubAck(Ack::new(p.packet_id))),
            QoS::ExactlyOnce => {
                if self.awaiting_rel.contains(&p.packet_id) {
                    // A resent QoS 2 PUBLISH we already have: acknowledge, do not deliver
                    // twice [MQTT-4.3.3-10].
                    write_packet(s, &Packet::PubRec(Ack::new(p.packet_id)));
                    return Ok(());
                }
                Some(Packet::PubRec(Ack::new(p.packet_id)))
            }
        };
        let targets = self.targets(&p);
        let msg = Message {
            topic: p.topic.as_bytestring().clone(),
            payload: p.payload,
            qos: p.qos,
            retain: p.retain,
            dup: p.dup,
            packet_id: p.packet_id,
            properties: {
                let mut props = p.properties;
                props.topic_alias = None;
                props
            },
        };
        if p.qos == QoS::ExactlyOnce {
            self.awaiting_rel.insert(p.packet_id);
        }
        if targets.is_empty() {
            if self.unclaimed.len() >= UNCLAIMED_MAX {
                self.unclaimed.pop_front();
                debug!(
                    "a message for no subscription stream dropped: {UNCLAIMED_MAX} already kept"
                );
            }
            self.unclaimed.push_back(msg.clone());
        }
        self.pending = Some(PendingDelivery { msg, targets, ack });
        self.continue_delivery(s, None);
        Ok(())
    }

    /// Subscription streams a message goes to: by subscription identifier when the broker
    /// sent any (and to streams sharing a filter with them), else by matching filters.
    /// One PUBLISH reaches each stream once, even when several of the stream's filters
    /// match it (`subscribe_many`).
    pub(super) fn targets(&self, p: &Publish) -> Vec<u32> {
        let ids = &p.properties.subscription_identifiers;
        let matching: Vec<(u32, &SubEntry)> = if ids.is_empty() {
            self.subs
                .iter()
                .filter(|(_, e)| e.filter.matches(p.topic.as_str()))
                .map(|(id, e)| (*id, e))
                .collect()
        } else {
            let filters: Vec<&TopicFilter> = ids
                .iter()
                .filter_map(|id| self.subs.get(id))
                .map(|e| &e.filter)
                .collect();
            self.subs
                .iter()
                .filter(|(id, e)| ids.contains(id) || filters.contains(&&e.filter))
                .map(|(id, e)| (*id, e))
                .collect()
        };
        let mut out: Vec<u32> = Vec::with_capacity(matching.len());
        for (i, (id, e)) in matching.iter().enumerate() {
            if !matching[..i].iter().any(|(_, o)| o.tx.same_channel(&e.tx)) {
                out.push(*id);
            }
        }
        out
    }

    /// Hands the pending message to its remaining targets; stops at the first full buffer
    /// (the caller waits for room with `permit`). Sends the acknowledgement when done.
    pub(super) fn continue_delivery(
        &mut self,
        s: &mut Session,
        mut permit: Option<mpsc::OwnedPermit<Message>>,
    ) {
        let Some(mut pd) = self.pending.take() else {
            return;
        };
        while let Some(&id) = pd.targets.first() {
            if let Some(p) = permit.take() {
                p.send(pd.msg.clone());
                pd.targets.remove(0);
                continue;
            }
            let Some(e) = self.subs.get(&id) else {
                pd.targets.remove(0);
                continue;
            };
            match e.tx.try_send(pd.msg.clone()) {
                Ok(()) => {
                    pd.targets.remove(0);
                }
                Err(mpsc::error::TrySendError::Full(_)) => {
                    self.pending = Some(pd);
                    return;
                }
                Err(mpsc::error::TrySendError::Closed(_)) => {
                    // The stream was dropped: forget it, and unsubscribe when no other
                    // stream uses the filter.
                    pd.targets.remove(0);
                    if let Some(e) = self.subs.remove(&id)
                        && !self.subs.values().any(|o| o.filter == e.filter)
                    {
                        self.send_unsubscribe(s, e.filter, None);
                    }
                }
            }
        }
        if let Some(ack) = pd.ack {
            write_packet(s, &ack);
        }
    }
}
