//! Encoding into `BytesMut`. Every packet's exact size is known before it is written
//! ([`Packet::encoded_len`]), so a sender can honour the peer's Maximum Packet Size without
//! encoding first.

use bytes::{BufMut, BytesMut};

use crate::error::EncodeError;
use crate::packet::*;
use crate::primitives::{MAX_VARINT, binary_len, put_binary, put_varint, varint_len};
use crate::properties::{AckProperties, block_len, write_block};
use crate::{PublishProperties, QoS, ReasonCode, TopicName};

/// Size of a whole packet (fixed header included) with this remaining length.
const fn total_len(remaining: usize) -> usize {
    1 + varint_len(remaining as u32) + remaining
}

fn header(buf: &mut BytesMut, first: u8, remaining: usize) -> Result<(), EncodeError> {
    let rem = u32::try_from(remaining)
        .ok()
        .filter(|&r| r <= MAX_VARINT)
        .ok_or(EncodeError::PacketTooLarge)?;
    buf.reserve(total_len(remaining));
    buf.put_u8(first);
    put_varint(buf, rem);
    Ok(())
}

impl Packet {
    /// Exact number of bytes [`Packet::encode`] writes for `version`.
    pub fn encoded_len(&self, version: ProtocolVersion) -> usize {
        total_len(self.remaining_len(version))
    }

    /// Remaining length (the size after the fixed header) for `version`.
    pub fn remaining_len(&self, v: ProtocolVersion) -> usize {
        let v5 = v.is_v5();
        match self {
            Packet::Connect(c) => connect_len(c),
            Packet::ConnAck(c) => {
                2 + if v5 {
                    block_len(c.properties.wire_len())
                } else {
                    0
                }
            }
            Packet::Publish(p) => publish_len(p, v, p.properties.wire_len()),
            Packet::PubAck(a) | Packet::PubRec(a) | Packet::PubRel(a) | Packet::PubComp(a) => {
                ack_len(a, v)
            }
            Packet::Subscribe(s) => {
                2 + if v5 {
                    block_len(s.properties.wire_len())
                } else {
                    0
                } + s
                    .filters
                    .iter()
                    .map(|(f, _)| binary_len(f.as_str().as_bytes()) + 1)
                    .sum::<usize>()
            }
            Packet::SubAck(s) => {
                2 + if v5 {
                    block_len(s.properties.wire_len())
                } else {
                    0
                } + s.reasons.len()
            }
            Packet::Unsubscribe(u) => {
                2 + if v5 {
                    block_len(u.properties.wire_len())
                } else {
                    0
                } + u
                    .filters
                    .iter()
                    .map(|f| binary_len(f.as_str().as_bytes()))
                    .sum::<usize>()
            }
            Packet::UnsubAck(u) => {
                2 + if v5 {
                    block_len(u.properties.wire_len()) + u.reasons.len()
                } else {
                    0
                }
            }
            Packet::PingReq | Packet::PingResp => 0,
            Packet::Disconnect(d) if v5 => reason_props_len(d.reason, d.properties.wire_len()),
            Packet::Disconnect(_) => 0,
            Packet::Auth(a) => reason_props_len(a.reason, a.properties.wire_len()),
        }
    }

    /// Appends the packet's bytes for `version` to `buf`.
    pub fn encode(&self, v: ProtocolVersion, buf: &mut BytesMut) -> Result<(), EncodeError> {
        let start = buf.len();
        let remaining = self.remaining_len(v);
        let v5 = v.is_v5();
        match self {
            Packet::Connect(c) => {
                header(buf, 0x10, remaining)?;
                write_connect(c, buf)?;
            }
            Packet::ConnAck(c) => {
                header(buf, 0x20, remaining)?;
                buf.put_u8(u8::from(c.session_present));
                if v5 {
                    buf.put_u8(c.reason as u8);
                    write_block(buf, c.properties.wire_len(), |b| c.properties.write(b))?;
                } else {
                    buf.put_u8(c.reason.to_v3_connack());
                }
            }
            Packet::Publish(p) => {
                write_publish(p, v, buf, p.properties.wire_len(), |b| {
                    p.properties.write(b)
                })?;
            }
            Packet::PubAck(a) => write_ack(0x40, a, v, buf)?,
            Packet::PubRec(a) => write_ack(0x50, a, v, buf)?,
            Packet::PubRel(a) => write_ack(0x62, a, v, buf)?,
            Packet::PubComp(a) => write_ack(0x70, a, v, buf)?,
            Packet::Subscribe(s) => {
                if s.filters.is_empty() {
                    return Err(EncodeError::Invalid(
                        "SUBSCRIBE without filters [MQTT-3.8.3-3]",
                    ));
                }
                header(buf, 0x82, remaining)?;
                put_packet_id(buf, s.packet_id)?;
                if v5 {
                    write_block(buf, s.properties.wire_len(), |b| s.properties.write(b))?;
                }
                for (f, o) in &s.filters {
                    put_binary(buf, f.as_str().as_bytes(), "topic filter")?;
                    let mut byte = o.qos as u8;
                    if v5 {
                        byte |= u8::from(o.no_local) << 2
                            | u8::from(o.retain_as_published) << 3
                            | (o.retain_handling as u8) << 4;
                    }
                    buf.put_u8(byte);
                }
            }
            Packet::SubAck(s) => {
                header(buf, 0x90, remaining)?;
                buf.put_u16(s.packet_id);
                if v5 {
                    write_block(buf, s.properties.wire_len(), |b| s.properties.write(b))?;
                }
                for &rc in &s.reasons {
                    // 3.x knows only granted QoS 0-2 and 0x80 Failure.
                    let code = if v5 || !rc.is_error() { rc as u8 } else { 0x80 };
                    buf.put_u8(code);
                }
            }
            Packet::Unsubscribe(u) => {
                if u.filters.is_empty() {
                    return Err(EncodeError::Invalid(
                        "UNSUBSCRIBE without filters [MQTT-3.10.3-2]",
                    ));
                }
                header(buf, 0xA2, remaining)?;
                put_packet_id(buf, u.packet_id)?;
                if v5 {
                    write_block(buf, u.properties.wire_len(), |b| u.properties.write(b))?;
                }
                for f in &u.filters {
                    put_binary(buf, f.as_str().as_bytes(), "topic filter")?;
                }
            }
            Packet::UnsubAck(u) => {
                header(buf, 0xB0, remaining)?;
                buf.put_u16(u.packet_id);
                if v5 {
                    write_block(buf, u.properties.wire_len(), |b| u.properties.write(b))?;
                    for &rc in &u.reasons {
                        buf.put_u8(rc as u8);
                    }
                }
            }
            Packet::PingReq => header(buf, 0xC0, 0)?,
            Packet::PingResp => header(buf, 0xD0, 0)?,
            Packet::Disconnect(d) => {
                header(buf, 0xE0, remaining)?;
                if v5 {
                    write_reason_props(buf, d.reason, d.properties.wire_len(), |b| {
                        d.properties.write(b)
                    })?;
                }
            }
            Packet::Auth(a) => {
                if !v5 {
                    return Err(EncodeError::NotInVersion("AUTH"));
                }
                header(buf, 0xF0, remaining)?;
                write_reason_props(buf, a.reason, a.properties.wire_len(), |b| {
                    a.properties.write(b)
                })?;
            }
        }
        debug_assert_eq!(
            buf.len() - start,
            total_len(remaining),
            "{} length",
            self.name()
        );
        Ok(())
    }
}

fn put_packet_id(buf: &mut BytesMut, id: u16) -> Result<(), EncodeError> {
    if id == 0 {
        return Err(EncodeError::Invalid("packet identifier 0 [MQTT-2.2.1-3]"));
    }
    buf.put_u16(id);
    Ok(())
}

fn connect_len(c: &Connect) -> usize {
    let v5 = c.protocol.is_v5();
    let mut n = binary_len(c.protocol.protocol_name().as_bytes()) + 1 + 1 + 2;
    if v5 {
        n += block_len(c.properties.wire_len());
    }
    n += binary_len(c.client_id.as_str().as_bytes());
    if let Some(w) = &c.will {
        if v5 {
            n += block_len(will_properties_len(w));
        }
        n += binary_len(w.topic.as_str().as_bytes()) + binary_len(&w.payload);
    }
    n += c.username.as_ref().map_or(0, |u| binary_len(u.as_bytes()));
    n += c.password.as_ref().map_or(0, |p| binary_len(p));
    n
}

fn will_properties_len(w: &Will) -> usize {
    w.properties.wire_len() + w.delay_interval.map_or(0, |_| 5)
}

fn write_connect(c: &Connect, buf: &mut BytesMut) -> Result<(), EncodeError> {
    let v5 = c.protocol.is_v5();
    put_binary(buf, c.protocol.protocol_name().as_bytes(), "protocol name")?;
    // Mosquitto's bridge bit (3.x only; 5.0 has No Local and Retain As Published).
    let bridge = if c.bridge && !c.protocol.is_v5() {
        0x80
    } else {
        0
    };
    buf.put_u8(c.protocol.level() | bridge);
    if !v5 && c.password.is_some() && c.username.is_none() {
        return Err(EncodeError::Invalid(
            "password without user name [MQTT-3.1.2-22]",
        ));
    }
    let mut flags = u8::from(c.clean_start) << 1;
    if let Some(w) = &c.will {
        flags |= 0x04 | (w.qos as u8) << 3 | u8::from(w.retain) << 5;
    }
    flags |= u8::from(c.password.is_some()) << 6 | u8::from(c.username.is_some()) << 7;
    buf.put_u8(flags);
    buf.put_u16(c.keep_alive);
    if v5 {
        write_block(buf, c.properties.wire_len(), |b| c.properties.write(b))?;
    }
    put_binary(buf, c.client_id.as_str().as_bytes(), "client identifier")?;
    if let Some(w) = &c.will {
        if v5 {
            if w.properties.topic_alias.is_some()
                || !w.properties.subscription_identifiers.is_empty()
            {
                return Err(EncodeError::Invalid(
                    "topic alias or subscription id on a will",
                ));
            }
            write_block(buf, will_properties_len(w), |b| {
                if let Some(d) = w.delay_interval {
                    b.put_u8(crate::properties::id::WILL_DELAY_INTERVAL);
                    b.put_u32(d);
                }
                w.properties.write(b)
            })?;
        }
        if w.topic.is_empty() {
            return Err(EncodeError::Invalid("empty will topic"));
        }
        put_binary(buf, w.topic.as_str().as_bytes(), "will topic")?;
        put_binary(buf, &w.payload, "will payload")?;
    }
    if let Some(u) = &c.username {
        put_binary(buf, u.as_bytes(), "user name")?;
    }
    if let Some(p) = &c.password {
        put_binary(buf, p, "password")?;
    }
    Ok(())
}

fn publish_len(p: &Publish, v: ProtocolVersion, props_len: usize) -> usize {
    binary_len(p.topic.as_str().as_bytes())
        + if p.qos == QoS::AtMostOnce { 0 } else { 2 }
        + if v.is_v5() { block_len(props_len) } else { 0 }
        + p.payload.len()
}

fn write_publish(
    p: &Publish,
    v: ProtocolVersion,
    buf: &mut BytesMut,
    props_len: usize,
    write_props: impl FnOnce(&mut BytesMut) -> Result<(), EncodeError>,
) -> Result<(), EncodeError> {
    if p.topic.is_empty() && (!v.is_v5() || p.properties.topic_alias.is_none()) {
        return Err(EncodeError::Invalid(
            "empty topic name without a topic alias",
        ));
    }
    if p.dup && p.qos == QoS::AtMostOnce {
        return Err(EncodeError::Invalid("DUP on QoS 0 [MQTT-3.3.1-2]"));
    }
    let first = 0x30 | u8::from(p.dup) << 3 | (p.qos as u8) << 1 | u8::from(p.retain);
    header(buf, first, publish_len(p, v, props_len))?;
    put_binary(buf, p.topic.as_str().as_bytes(), "topic name")?;
    if p.qos != QoS::AtMostOnce {
        put_packet_id(buf, p.packet_id)?;
    }
    if v.is_v5() {
        write_block(buf, props_len, write_props)?;
    }
    buf.put_slice(&p.payload);
    Ok(())
}

/// The parts of a PUBLISH without properties, for [`encode_plain_publish`]: what a broker
/// forwards for most messages, written straight into a connection's buffer without
/// building a [`Publish`] (no reference-count traffic, no allocation).
#[derive(Debug, Clone, Copy)]
pub struct PlainPublish<'a> {
    /// DUP flag (QoS 1/2 only).
    pub dup: bool,
    /// Delivery QoS.
    pub qos: QoS,
    /// RETAIN flag.
    pub retain: bool,
    /// Must not be empty: without properties there is no topic alias to stand for it.
    pub topic: &'a str,
    /// Ignored for QoS 0.
    pub packet_id: u16,
    /// Application message.
    pub payload: &'a [u8],
}

impl PlainPublish<'_> {
    /// The topic, copied out (the receive path keeps it; the string was validated when it
    /// was decoded).
    pub fn owned_topic(&self) -> TopicName {
        TopicName::from_valid(self.topic)
    }

    /// An owned [`Publish`] with copies of the topic and payload (and empty properties):
    /// nothing in it refers to the buffer this was decoded from, so keeping the message
    /// (queued, retained, in flight) does not pin that buffer.
    pub fn to_publish(&self) -> Publish {
        Publish {
            dup: self.dup,
            qos: self.qos,
            retain: self.retain,
            // Two exact-size allocations; the string was validated when it was decoded.
            topic: TopicName::from_valid(self.topic),
            packet_id: if self.qos == QoS::AtMostOnce {
                0
            } else {
                self.packet_id
            },
            properties: PublishProperties::default(),
            raw_properties: bytes::Bytes::new(),
            payload: bytes::Bytes::copy_from_slice(self.payload),
        }
    }

    fn remaining_len(&self, v: ProtocolVersion) -> usize {
        binary_len(self.topic.as_bytes())
            + if self.qos == QoS::AtMostOnce { 0 } else { 2 }
            + usize::from(v.is_v5())
            + self.payload.len()
    }

    /// Exact number of bytes [`encode_plain_publish`] writes.
    pub fn encoded_len(&self, v: ProtocolVersion) -> usize {
        total_len(self.remaining_len(v))
    }
}

/// Encodes `p` for `v`; byte for byte what [`Packet::encode`] writes for the same PUBLISH
/// with empty properties (v5: an empty property block).
pub fn encode_plain_publish(
    p: &PlainPublish<'_>,
    v: ProtocolVersion,
    buf: &mut BytesMut,
) -> Result<(), EncodeError> {
    if p.topic.is_empty() {
        return Err(EncodeError::Invalid(
            "empty topic name without a topic alias",
        ));
    }
    if p.dup && p.qos == QoS::AtMostOnce {
        return Err(EncodeError::Invalid("DUP on QoS 0 [MQTT-3.3.1-2]"));
    }
    if p.topic.len() > usize::from(u16::MAX) {
        return Err(EncodeError::FieldTooLong("topic name"));
    }
    // Checked before anything is written, so an error leaves `buf` as it was.
    if p.qos != QoS::AtMostOnce && p.packet_id == 0 {
        return Err(EncodeError::Invalid("packet identifier 0 [MQTT-2.2.1-3]"));
    }
    let first = 0x30 | u8::from(p.dup) << 3 | (p.qos as u8) << 1 | u8::from(p.retain);
    header(buf, first, p.remaining_len(v))?;
    put_binary(buf, p.topic.as_bytes(), "topic name")?;
    if p.qos != QoS::AtMostOnce {
        buf.put_u16(p.packet_id);
    }
    if v.is_v5() {
        buf.put_u8(0);
    }
    buf.put_slice(p.payload);
    Ok(())
}

/// Encodes a v5 PUBLISH with its property block taken verbatim from
/// [`Publish::raw_properties`] (as received), for forwarding without re-encoding properties.
pub fn encode_publish_raw_properties(p: &Publish, buf: &mut BytesMut) -> Result<(), EncodeError> {
    let raw = &p.raw_properties;
    write_publish(p, ProtocolVersion::V5, buf, raw.len(), |b| {
        b.put_slice(raw);
        Ok(())
    })
}

/// Exact size of [`encode_publish_raw_properties`]'s output.
pub fn publish_raw_properties_len(p: &Publish) -> usize {
    total_len(publish_len(p, ProtocolVersion::V5, p.raw_properties.len()))
}

fn ack_len(a: &Ack, v: ProtocolVersion) -> usize {
    if !v.is_v5() {
        return 2;
    }
    // §3.4.2.1: omit the reason when Success and no properties; omit the properties when none.
    match (a.reason, a.properties.is_empty()) {
        (ReasonCode::Success, true) => 2,
        (_, true) => 3,
        (_, false) => 3 + block_len(a.properties.wire_len()),
    }
}

fn write_ack(
    first: u8,
    a: &Ack,
    v: ProtocolVersion,
    buf: &mut BytesMut,
) -> Result<(), EncodeError> {
    let len = ack_len(a, v);
    header(buf, first, len)?;
    put_packet_id(buf, a.packet_id)?;
    if len > 2 {
        buf.put_u8(a.reason as u8);
    }
    if len > 3 {
        write_block(buf, a.properties.wire_len(), |b| {
            AckProperties::write(&a.properties, b)
        })?;
    }
    Ok(())
}

fn reason_props_len(reason: ReasonCode, props_len: usize) -> usize {
    match (reason, props_len) {
        (ReasonCode::Success, 0) => 0,
        (_, 0) => 1,
        _ => 1 + block_len(props_len),
    }
}

fn write_reason_props(
    buf: &mut BytesMut,
    reason: ReasonCode,
    props_len: usize,
    write: impl FnOnce(&mut BytesMut) -> Result<(), EncodeError>,
) -> Result<(), EncodeError> {
    let len = reason_props_len(reason, props_len);
    if len > 0 {
        buf.put_u8(reason as u8);
    }
    if len > 1 {
        write_block(buf, props_len, write)?;
    }
    Ok(())
}
