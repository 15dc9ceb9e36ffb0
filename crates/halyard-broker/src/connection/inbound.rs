//! Packets from the client: decoding the read buffer (with fast paths for plain
//! PUBLISH and acknowledgements) and one handler per packet type.

use std::sync::Arc;

use halyard_codec::{
    Ack, AckProperties, Disconnect, Packet, PlainAck, PlainDecode, Publish, QoS, ReasonCode,
    decode_limited, decode_plain_ack, decode_plain_publish,
};
use halyard_store::Op;

use crate::auth::{Access, AuthStep};
use halyard_codec::Bytes;
use tokio::time::Instant;
use tracing::{debug, warn};

use super::*;
use crate::message::{Message, Props};
use crate::session::Awaiting;
use crate::state::Inner;
use crate::stats::Stats;

impl Proto {
    /// Decodes and handles every complete packet in the read buffer, then ends the batch:
    /// deferred deliveries queued, counts and memory charged once.
    #[inline]
    pub(crate) fn process_input(&mut self, now: Instant) -> Option<End> {
        self.live = self.inner.cfg();
        let end = self.process_packets(now);
        self.flush_deferred();
        if let Some(b) = &mut self.batch {
            self.inner.stats.add_received(&mut b.received);
            let (bytes, messages) = std::mem::take(&mut b.charged);
            self.inner.memory.charge(bytes, messages as usize);
        }
        end
    }

    #[inline]
    pub(super) fn flush_deferred(&mut self) {
        if let Some(b) = &mut self.batch
            && !b.deferred.is_empty()
        {
            self.inner
                .flush_deferred(&mut b.deferred, Inner::queue_limits(&self.live));
        }
    }

    #[inline]
    pub(super) fn process_packets(&mut self, now: Instant) -> Option<End> {
        loop {
            // Packets already read wait too while the publish budget is spent.
            if let Some(r) = &mut self.rate
                && r.blocked_until(now, &self.inner.stats).is_some()
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
                if let Err(end) = self.accept_publish(p, Props::NONE, now) {
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
                    if let Err(end) = self.handle(p, now) {
                        return Some(end);
                    }
                }
                Ok(None) => return None,
                Err(e) => {
                    Stats::inc(&self.inner.stats.protocol_errors);
                    if let Some(suppressed) = PEER_LOG.admit() {
                        warn!(peer = %self.info.peer, client_id = %self.at.session.client_id, error = %e, suppressed, "bad packet; disconnecting");
                    }
                    return Some(End::Server(Violation::from(&e)));
                }
            }
        }
    }

    #[inline]
    pub(super) fn handle(&mut self, p: Packet, now: Instant) -> Result<(), End> {
        match p {
            Packet::Publish(p) => self.on_publish(p, now),
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
                self.on_subscribe(s, now);
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
            Packet::Connect(_) => Err(self.protocol_error("MQTT-3.1.0-2", "second CONNECT")),
            Packet::Auth(a) => self.on_auth(&a),
            other => {
                debug!(packet = other.name(), "client sent a server-only packet");
                Err(self.protocol_error("", "packet only a server may send"))
            }
        }
    }

    /// Re-authentication on a live connection (section 4.12.1): the client starts it with
    /// AUTH 0x19 and the method of its CONNECT [MQTT-4.12.1-1]; success is AUTH 0x00, failure
    /// a DISCONNECT [MQTT-4.12.1-2]. Publications continue meanwhile.
    pub(super) fn on_auth(&mut self, a: &halyard_codec::Auth) -> Result<(), End> {
        let Some((name, method)) = self.rare.as_ref().and_then(|r| r.enhanced.clone()) else {
            return Err(
                self.protocol_error("MQTT-4.12.0-2", "AUTH without enhanced authentication")
            );
        };
        if a.properties.authentication_method.as_ref() != Some(&name) {
            return Err(
                self.protocol_error("MQTT-4.12.1-1", "AUTH with another method than CONNECT's")
            );
        }
        let data = a.properties.authentication_data.as_deref();
        let reauth = self.rare.as_mut().and_then(|r| r.reauth.take());
        let step = match (a.reason, reauth) {
            (ReasonCode::ReAuthenticate, None) => method.start(data),
            (ReasonCode::ContinueAuthentication, Some(mut ex)) => ex.step(data),
            _ => return Err(self.protocol_error("MQTT-4.12.0-2", "unexpected AUTH reason code")),
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
            AuthStep::Success { .. } => Err(End::Server(Violation::new(
                ReasonCode::NotAuthorized,
                "",
                "re-authenticated as another user",
            ))),
            AuthStep::Failure(_) => Err(End::Server(Violation::new(
                ReasonCode::NotAuthorized,
                "MQTT-4.12.1-2",
                "re-authentication failed",
            ))),
        }
    }

    pub(super) fn protocol_error(&self, rule: &'static str, detail: &'static str) -> End {
        let why = Violation::new(ReasonCode::ProtocolError, rule, detail);
        Stats::inc(&self.inner.stats.protocol_errors);
        if let Some(suppressed) = PEER_LOG.admit() {
            warn!(peer = %self.info.peer, client_id = %self.at.session.client_id, %why, suppressed, "protocol error; disconnecting");
        }
        End::Server(why)
    }

    /// `p`'s topic, payload and properties must not be slices of the read buffer.
    #[inline]
    pub(super) fn on_publish(&mut self, mut p: Publish, now: Instant) -> Result<(), End> {
        let topic_alias_maximum = self.cfg.topic_alias_maximum;
        if let Some(alias) = p.properties.topic_alias {
            if alias > topic_alias_maximum {
                // [MQTT-3.3.2-9]: over our Topic Alias Maximum.
                Stats::inc(&self.inner.stats.protocol_errors);
                return Err(End::Server(Violation::new(
                    ReasonCode::TopicAliasInvalid,
                    "MQTT-3.3.2-9",
                    "topic alias above maximum",
                )));
            }
            if p.topic.is_empty() {
                match self.aliases.as_ref().and_then(|a| a.inbound.get(&alias)) {
                    Some(t) => p.topic = t.clone(),
                    None => return Err(self.protocol_error("MQTT-3.3.2-12", "unknown topic alias")),
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
            return Err(
                self.protocol_error("MQTT-3.3.4-6", "subscription identifier from a client")
            );
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
            now,
        )
    }

    /// Answers a PUBLISH that goes nowhere with `ack`: PUBACK or PUBREC (nothing for QoS
    /// 0). Its packet id is not held: a QoS 2 exchange ends at the PUBREC.
    #[inline]
    pub(super) fn answer_unrouted(&mut self, qos: QoS, ack: Ack) {
        match qos {
            QoS::AtMostOnce => {}
            QoS::AtLeastOnce => self.ack(0, Packet::PubAck(ack)),
            QoS::ExactlyOnce => self.ack(0, Packet::PubRec(ack)),
        }
    }

    /// The checks and routing every PUBLISH goes through once its topic is known. Its
    /// properties come apart: most messages have none, and the fast path in
    /// `process_packets` never builds them.
    #[inline]
    pub(super) fn accept_publish(
        &mut self,
        p: Incoming,
        properties: Props,
        now: Instant,
    ) -> Result<(), End> {
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
            r.spend(p.payload.len(), now);
        }
        if p.qos > max_qos {
            return Err(End::Server(Violation::new(
                ReasonCode::QoSNotSupported,
                "MQTT-3.2.2-12",
                "QoS above maximum QoS",
            )));
        }
        if p.retain && !retain_available {
            return Err(End::Server(Violation::new(
                ReasonCode::RetainNotSupported,
                "MQTT-3.2.2-13",
                "retain not available",
            )));
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
                return Err(End::Server(Violation::new(
                    ReasonCode::ReceiveMaximumExceeded,
                    "MQTT-3.3.4-9",
                    "receive maximum exceeded",
                )));
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
        if !denied
            && !invalid_payload
            && let Some(node) = &self.live.node_id
            && properties
                .get()
                .is_some_and(|p| crate::crossed(&p.user_properties, node))
        {
            // It already went through this broker and came back over a bridge (a loop):
            // acknowledged, not routed again.
            Stats::inc(&self.inner.stats.bridge_loops_dropped);
            if p.qos == QoS::ExactlyOnce {
                self.release_inbound(p.packet_id);
            }
        } else if denied {
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
            if self.inner.refuses(
                &msg,
                Some(&self.at.session.client_id),
                self.routes.get_or_insert_default(),
                &self.live,
            ) {
                // A bridge's queue with `queue_policy = "block"` is full. 3.1.1 has no
                // refusal: closing before the acknowledgement makes the client keep the
                // message and send it again after reconnecting.
                if p.qos != QoS::AtMostOnce && !v5 {
                    return Err(End::Server(Violation::new(
                        ReasonCode::QuotaExceeded,
                        "queue_policy",
                        "a bridge queue is full (queue_policy = block)",
                    )));
                }
                reason = ReasonCode::QuotaExceeded;
                if p.qos == QoS::ExactlyOnce {
                    self.release_inbound(p.packet_id);
                }
            } else {
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
        }
        let ack = Ack {
            packet_id: p.packet_id,
            reason: if v5 { reason } else { ReasonCode::Success },
            properties: AckProperties::default(),
        };
        match p.qos {
            QoS::AtMostOnce => {
                if invalid_payload {
                    return Err(End::Server(Violation::new(
                        ReasonCode::PayloadFormatInvalid,
                        "MQTT-3.3.2-4",
                        "payload is not UTF-8",
                    )));
                }
            }
            QoS::AtLeastOnce => self.ack(ticket, Packet::PubAck(ack)),
            QoS::ExactlyOnce => self.ack(ticket, Packet::PubRec(ack)),
        }
        Ok(())
    }

    #[inline]
    pub(super) fn on_ack(&mut self, packet_id: u16, expect: Awaiting) {
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

    #[inline]
    pub(super) fn on_pubrec(&mut self, a: &Ack) {
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
    #[inline]
    pub(super) fn release_inbound(&self, packet_id: u16) -> (bool, u64) {
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

    #[inline]
    pub(super) fn on_pubrel(&mut self, packet_id: u16) {
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

    pub(super) fn on_disconnect(&mut self, d: &Disconnect) -> Result<(), End> {
        if let Some(expiry) = d.properties.session_expiry_interval {
            if self.flags.has(Flags::EXPIRY_ZERO) && expiry != 0 {
                return Err(self.protocol_error(
                    "MQTT-3.14.2-2",
                    "session expiry raised from 0 on DISCONNECT",
                ));
            }
            self.at.session.lock().expiry_interval =
                expiry.min(self.cfg.max_session_expiry_interval);
        }
        Err(End::ClientDisconnect(d.reason))
    }
}
