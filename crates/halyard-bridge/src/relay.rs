//! The relay between a bridge's two connections: which packet goes where, under which
//! packet id, and what each side's acknowledgement releases (see `link.rs` for why packet
//! ids pass through unchanged).

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::sync::atomic::Ordering;

use halyard_codec::{Ack, ByteString, Bytes, Packet, Publish, QoS, ReasonCode, TopicName};
use halyard_transport::BoxStream;
use tokio::io::DuplexStream;
use tokio::time::Instant;
use tracing::{debug, warn};

use crate::config::Bridge;
use crate::link::Shared;
use crate::wire::Wire;

/// An `out` message on its way: where it stands with the remote.
#[derive(Debug)]
enum Out {
    /// Sent at QoS 1, PUBACK awaited. `local`: the QoS the local broker delivered at.
    Ack { publish: Publish, local: QoS },
    /// Sent at QoS 2, PUBREC awaited.
    Rec { publish: Publish },
    /// PUBREC relayed to the local broker; its PUBREL awaited (to relay).
    Rel,
    /// PUBREL sent to the remote, PUBCOMP awaited.
    Comp,
    /// Finished with the remote (or sent at QoS 0); the local broker's PUBREL is
    /// answered here.
    LocalRel,
}

impl Out {
    /// Whether the remote counts it against its Receive Maximum.
    fn at_remote(&self) -> bool {
        !matches!(self, Out::LocalRel)
    }
}

/// Everything a link keeps while its local connection lasts.
pub(crate) struct Relay {
    b: Arc<Bridge>,
    node_id: Option<String>,
    shared: Arc<Shared>,
    /// `out` deliveries in flight, by packet id, with their order.
    out: HashMap<u16, (u64, Out)>,
    order: BTreeMap<u64, u16>,
    seq: u64,
    /// `out` deliveries not yet sent (remote down, or its window full): packet id, the
    /// local QoS, the packet for the remote.
    held: VecDeque<(u16, QoS, Publish, Instant)>,
    /// `in` QoS 2 ids this bridge answered itself (dropped messages).
    in_self: HashSet<u16>,
    /// The remote's limits (from CONNACK).
    pub(crate) window: usize,
    /// Lowered when the remote answers 0x97 (quota exceeded): a limit it did not
    /// announce. Kept across reconnects.
    pub(crate) cap: usize,
    pub(crate) remote_max_packet: u32,
    pub(crate) remote_max_qos: QoS,
    pub(crate) remote_retain: bool,
    pub(crate) remote_v5: bool,
}

impl Relay {
    pub(crate) fn new(b: Arc<Bridge>, node_id: Option<String>, shared: Arc<Shared>) -> Relay {
        Relay {
            b,
            node_id,
            shared,
            out: HashMap::new(),
            order: BTreeMap::new(),
            seq: 0,
            held: VecDeque::new(),
            in_self: HashSet::new(),
            window: 0,
            cap: usize::MAX,
            remote_max_packet: u32::MAX,
            remote_max_qos: QoS::ExactlyOnce,
            remote_retain: true,
            remote_v5: true,
        }
    }

    fn at_remote(&self) -> usize {
        self.out.values().filter(|(_, o)| o.at_remote()).count()
    }

    pub(crate) fn publish_gauges(&self) {
        self.shared.held.store(self.held.len(), Ordering::Relaxed);
        self.shared
            .in_flight
            .store(self.at_remote(), Ordering::Relaxed);
    }

    fn track(&mut self, pid: u16, o: Out) {
        self.seq += 1;
        if let Some((old, _)) = self.out.insert(pid, (self.seq, o)) {
            self.order.remove(&old);
        }
        self.order.insert(self.seq, pid);
    }

    fn forget(&mut self, pid: u16) -> Option<Out> {
        let (seq, o) = self.out.remove(&pid)?;
        self.order.remove(&seq);
        Some(o)
    }

    /// A packet id free on the remote connection for the bridge's own SUBSCRIBE.
    pub(crate) fn free_id(&self) -> u16 {
        let held: HashSet<u16> = self.held.iter().map(|h| h.0).collect();
        (1..=u16::MAX)
            .rev()
            .find(|id| !self.out.contains_key(id) && !held.contains(id))
            .unwrap_or(u16::MAX)
    }

    /// An `out` message from the local session: to the remote, held, or dropped (and
    /// acknowledged, so it leaves the queue).
    fn outgoing(
        &mut self,
        p: Publish,
        local: &mut Wire<DuplexStream>,
        remote: Option<&mut Wire<BoxStream>>,
    ) {
        let lq = p.qos;
        let pid = p.packet_id;
        let Some(topic) = self
            .b
            .rules
            .iter()
            .filter(|r| r.direction.out())
            .find_map(|r| r.to_remote(p.topic.as_str()))
        else {
            self.shared.dropped_unmapped.fetch_add(1, Ordering::Relaxed);
            debug!(bridge = %self.b.config.name, topic = %p.topic, "bridge: no out rule maps this topic; dropped");
            self.ack_local_done(local, pid, lq);
            return;
        };
        let Ok(topic) = TopicName::new(topic.as_str()) else {
            self.shared.dropped_unmapped.fetch_add(1, Ordering::Relaxed);
            self.ack_local_done(local, pid, lq);
            return;
        };
        let mut properties = p.properties;
        properties.topic_alias = None;
        properties.subscription_identifiers.clear();
        if let Some(node) = &self.node_id {
            properties.user_properties.push((
                ByteString::from(halyard_broker::HOP_PROPERTY),
                ByteString::from(node.as_str()),
            ));
        }
        let out = Publish {
            dup: false,
            qos: lq,
            retain: p.retain && self.b.config.outgoing_retain,
            topic,
            packet_id: pid,
            properties,
            raw_properties: Bytes::new(),
            payload: p.payload,
        };
        match remote {
            Some(r) if lq == QoS::AtMostOnce => {
                self.send_out(r, local, pid, lq, out);
            }
            None if lq == QoS::AtMostOnce => {
                // QoS 0 carries no promise; holding it would hold memory the local
                // session's Receive Maximum does not bound.
                self.shared
                    .dropped_qos0_offline
                    .fetch_add(1, Ordering::Relaxed);
            }
            Some(r) if self.held.is_empty() && self.at_remote() < self.window.min(self.cap) => {
                self.send_out(r, local, pid, lq, out);
            }
            _ => self.held.push_back((pid, lq, out, Instant::now())),
        }
    }

    /// Sends one `out` message to the remote at the QoS both sides allow.
    fn send_out(
        &mut self,
        remote: &mut Wire<BoxStream>,
        local: &mut Wire<DuplexStream>,
        pid: u16,
        lq: QoS,
        mut p: Publish,
    ) {
        p.qos = lq.min(self.remote_max_qos);
        if !self.remote_retain {
            p.retain = false;
        }
        if p.qos == QoS::AtMostOnce {
            p.packet_id = 0;
        }
        let packet = Packet::Publish(p);
        if packet.encoded_len(remote.version) > self.remote_max_packet as usize {
            // [MQTT-3.1.2-24]: never above the remote's Maximum Packet Size.
            self.shared
                .dropped_too_large
                .fetch_add(1, Ordering::Relaxed);
            warn!(bridge = %self.b.config.name, "bridge: message larger than the remote's Maximum Packet Size; dropped");
            self.ack_local_done(local, pid, lq);
            return;
        }
        remote.send(&packet);
        self.shared.forwarded_out.fetch_add(1, Ordering::Relaxed);
        let Packet::Publish(p) = packet else {
            unreachable!()
        };
        match p.qos {
            QoS::AtMostOnce => self.ack_local_done(local, pid, lq),
            QoS::AtLeastOnce => self.track(
                pid,
                Out::Ack {
                    publish: p,
                    local: lq,
                },
            ),
            QoS::ExactlyOnce => self.track(pid, Out::Rec { publish: p }),
        }
    }

    /// Finishes a local delivery the remote will not acknowledge: PUBACK, or PUBREC with
    /// the PUBREL answered here.
    fn ack_local_done(&mut self, local: &mut Wire<DuplexStream>, pid: u16, lq: QoS) {
        match lq {
            QoS::AtMostOnce => {}
            QoS::AtLeastOnce => local.send(&Packet::PubAck(Ack::new(pid))),
            QoS::ExactlyOnce => {
                local.send(&Packet::PubRec(Ack::new(pid)));
                self.track(pid, Out::LocalRel);
            }
        }
    }

    /// Sends held messages while the remote's window allows.
    pub(crate) fn drain(&mut self, remote: &mut Wire<BoxStream>, local: &mut Wire<DuplexStream>) {
        while self.at_remote() < self.window.min(self.cap)
            && let Some((pid, lq, mut p, since)) = self.held.pop_front()
        {
            // Its Message Expiry runs on while it waits here too [MQTT-3.3.2-5]:
            // reduced by that time [MQTT-3.3.2-6], or the message is not sent.
            if let Some(e) = p.properties.message_expiry_interval {
                let waited = u32::try_from(since.elapsed().as_secs()).unwrap_or(u32::MAX);
                if waited >= e {
                    self.shared.dropped_expired.fetch_add(1, Ordering::Relaxed);
                    self.ack_local_done(local, pid, lq);
                    continue;
                }
                p.properties.message_expiry_interval = Some(e - waited);
            }
            self.send_out(remote, local, pid, lq, p);
        }
    }

    /// After (re)connecting: what the remote has not acknowledged goes again, in order,
    /// PUBLISH with DUP and the same packet id, or PUBREL [MQTT-4.4.0-1].
    pub(crate) fn resend(&mut self, remote: &mut Wire<BoxStream>) {
        let limit = self.window.min(self.cap);
        let mut sent = 0;
        let mut back = Vec::new();
        for pid in self.order.values() {
            match &self.out[pid].1 {
                Out::Comp => {
                    remote.send(&Packet::PubRel(Ack::new(*pid)));
                    sent += 1;
                }
                Out::Ack { publish, .. } | Out::Rec { publish } if sent < limit => {
                    let mut p = publish.clone();
                    p.dup = true;
                    remote.send(&Packet::Publish(p));
                    sent += 1;
                }
                // Over the window (it shrank): back to the head of the held ones.
                Out::Ack { .. } | Out::Rec { .. } => back.push(*pid),
                Out::Rel | Out::LocalRel => {}
            }
        }
        for pid in back.into_iter().rev() {
            let (lq, mut p) = match self.forget(pid) {
                Some(Out::Ack { publish, local }) => (local, publish),
                Some(Out::Rec { publish }) => (QoS::ExactlyOnce, publish),
                _ => continue,
            };
            p.dup = true;
            self.held.push_front((pid, lq, p, Instant::now()));
        }
    }

    /// A packet from the local broker.
    pub(crate) fn on_local(
        &mut self,
        packet: Packet,
        local: &mut Wire<DuplexStream>,
        mut remote: Option<&mut Wire<BoxStream>>,
    ) -> Result<(), String> {
        match packet {
            Packet::Publish(p) => self.outgoing(p, local, remote),
            Packet::PubRel(a) => match self.out.get(&a.packet_id).map(|o| &o.1) {
                Some(Out::LocalRel) => {
                    self.forget(a.packet_id);
                    local.send(&Packet::PubComp(Ack::new(a.packet_id)));
                }
                // Relayed (also when unknown: the local session resent it after a
                // restart, and only the remote knows the exchange).
                _ => {
                    self.track(a.packet_id, Out::Comp);
                    if let Some(r) = remote.as_deref_mut() {
                        r.send(&Packet::PubRel(Ack::new(a.packet_id)));
                    }
                }
            },
            // Acknowledgements of `in` messages: relayed unchanged.
            Packet::PubAck(a) => relay(remote, &Packet::PubAck(a)),
            Packet::PubRec(a) => relay(remote, &Packet::PubRec(a)),
            Packet::PubComp(a) => relay(remote, &Packet::PubComp(a)),
            Packet::SubAck(s) => {
                if s.reasons.iter().any(|r| r.is_error()) {
                    warn!(bridge = %self.b.config.name, reasons = ?s.reasons, "bridge: the local broker refused a subscription");
                }
            }
            Packet::UnsubAck(_) | Packet::PingResp => {}
            Packet::Disconnect(d) => {
                return Err(format!("the local broker disconnected ({:?})", d.reason));
            }
            other => return Err(format!("unexpected {} from the local broker", other.name())),
        }
        Ok(())
    }

    /// A packet from the remote.
    pub(crate) fn on_remote(
        &mut self,
        packet: Packet,
        local: &mut Wire<DuplexStream>,
        remote: &mut Wire<BoxStream>,
    ) -> Result<(), String> {
        match packet {
            Packet::Publish(p) => self.incoming(p, local, remote),
            Packet::PubAck(a) | Packet::PubRec(a) if a.reason == ReasonCode::QuotaExceeded => {
                // Not a refusal of the message: the remote is full. Send fewer at once,
                // and this one again after a pause (it stays in flight here).
                self.cap = (self.at_remote() / 2).max(1);
                return Err(format!(
                    "the remote is over its quota (0x97); {} in flight from now on",
                    self.cap
                ));
            }
            Packet::PubAck(a) => {
                if let Some(Out::Ack { local: lq, .. }) = self.out.get(&a.packet_id).map(|o| &o.1) {
                    let lq = *lq;
                    self.forget(a.packet_id);
                    self.refused(&a);
                    match lq {
                        QoS::ExactlyOnce => {
                            local.send(&Packet::PubRec(Ack::new(a.packet_id)));
                            self.track(a.packet_id, Out::LocalRel);
                        }
                        _ => local.send(&Packet::PubAck(Ack::new(a.packet_id))),
                    }
                }
            }
            Packet::PubRec(a) => {
                if let Some(Out::Rec { .. }) = self.out.get(&a.packet_id).map(|o| &o.1) {
                    if a.reason.is_error() {
                        // The exchange ends at the remote [MQTT-4.3.3-4]; locally it
                        // finishes here.
                        self.refused(&a);
                        self.track(a.packet_id, Out::LocalRel);
                    } else {
                        self.track(a.packet_id, Out::Rel);
                    }
                    local.send(&Packet::PubRec(Ack::new(a.packet_id)));
                }
            }
            Packet::PubComp(a) => {
                if let Some(Out::Comp) = self.out.get(&a.packet_id).map(|o| &o.1) {
                    self.forget(a.packet_id);
                    local.send(&Packet::PubComp(Ack::new(a.packet_id)));
                }
            }
            Packet::PubRel(a) => {
                if self.in_self.remove(&a.packet_id) {
                    remote.send(&Packet::PubComp(Ack::new(a.packet_id)));
                } else {
                    local.send(&Packet::PubRel(Ack::new(a.packet_id)));
                }
            }
            Packet::SubAck(s) => {
                if s.reasons.iter().any(|r| r.is_error()) {
                    warn!(bridge = %self.b.config.name, reasons = ?s.reasons, "bridge: the remote refused a subscription");
                    self.shared.error("the remote refused a subscription");
                }
            }
            Packet::UnsubAck(_) | Packet::PingResp => {}
            Packet::Disconnect(d) => {
                return Err(format!(
                    "the remote disconnected: {} ({:#04x})",
                    halyard_client::reason_text(d.reason),
                    d.reason as u8
                ));
            }
            other => return Err(format!("unexpected {} from the remote", other.name())),
        }
        self.drain(remote, local);
        Ok(())
    }

    fn refused(&self, a: &Ack) {
        if a.reason.is_error() {
            self.shared
                .dropped_remote_refused
                .fetch_add(1, Ordering::Relaxed);
            warn!(bridge = %self.b.config.name, reason = ?a.reason, "bridge: the remote refused a message; dropped");
        }
    }

    /// An `in` message: to the local broker under the same packet id, unless it maps to
    /// no rule or already went through this broker (then answered here).
    fn incoming(
        &mut self,
        p: Publish,
        local: &mut Wire<DuplexStream>,
        remote: &mut Wire<BoxStream>,
    ) {
        let pid = p.packet_id;
        let looped = self
            .node_id
            .as_deref()
            .is_some_and(|node| halyard_broker::crossed(&p.properties.user_properties, node));
        let topic = self
            .b
            .rules
            .iter()
            .filter(|r| r.direction.inward())
            .find_map(|r| r.to_local(p.topic.as_str()))
            .and_then(|t| TopicName::new(t.as_str()).ok());
        let topic = match topic {
            Some(t) if !looped => t,
            _ => {
                let counter = if looped {
                    &self.shared.dropped_loop
                } else {
                    &self.shared.dropped_unmapped
                };
                counter.fetch_add(1, Ordering::Relaxed);
                match p.qos {
                    QoS::AtMostOnce => {}
                    QoS::AtLeastOnce => remote.send(&Packet::PubAck(Ack::new(pid))),
                    QoS::ExactlyOnce => {
                        self.in_self.insert(pid);
                        remote.send(&Packet::PubRec(Ack::new(pid)));
                    }
                }
                return;
            }
        };
        let mut properties = p.properties;
        properties.topic_alias = None;
        properties.subscription_identifiers.clear();
        self.shared.forwarded_in.fetch_add(1, Ordering::Relaxed);
        local.send(&Packet::Publish(Publish {
            dup: p.dup,
            qos: p.qos,
            retain: p.retain,
            topic,
            packet_id: pid,
            properties,
            raw_properties: Bytes::new(),
            payload: p.payload,
        }));
    }
}

fn relay(remote: Option<&mut Wire<BoxStream>>, p: &Packet) {
    // With the remote away the acknowledgement is lost; the remote's persistent session
    // sends the message again, and the local broker acknowledges it again (QoS 2: it
    // still holds the packet id).
    if let Some(r) = remote {
        r.send(p);
    }
}
