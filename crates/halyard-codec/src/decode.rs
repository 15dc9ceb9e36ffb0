//! Streaming decode: a complete packet, "need more bytes", or an error naming the rule.

use bytes::{Buf, BytesMut};

use crate::encode::PlainPublish;
use crate::error::{DecodeError, ErrorKind};
use crate::packet::*;
use crate::primitives::{Reader, VARINT_TOO_LONG, VarInt, decode_varint};
use crate::properties::{AckProperties, Properties, PropertyContext, PublishProperties};
use crate::reason::ReasonContext;
use crate::{QoS, ReasonCode, TopicError, TopicFilter, TopicName};

/// Decodes one packet from the front of `buf`.
///
/// - `Ok(Some(packet))`: the packet's bytes were removed from `buf`; string, binary and
///   payload fields are slices of them (no copy).
/// - `Ok(None)`: more bytes are needed; `buf` is untouched apart from capacity reserved for
///   the declared packet.
/// - `Err(e)`: the stream is broken; close the connection after sending `e.reason_code()`.
///
/// `version` is the version negotiated on this connection; a CONNECT is always decoded by
/// the version it declares. `max_packet_size` is the largest whole packet (fixed header
/// included) we accept: a larger declared size is refused from the fixed header alone, before
/// any of the body is buffered [§3.2.2.3.6, MQTT-3.1.2-24].
pub fn decode(
    buf: &mut BytesMut,
    version: ProtocolVersion,
    max_packet_size: u32,
) -> Result<Option<Packet>, DecodeError> {
    decode_limited(buf, version, max_packet_size, u32::MAX)
}

/// [`decode`], refusing a packet with more than `max_user_properties` user properties in
/// all its property blocks ([`ErrorKind::UserPropertiesOverLimit`], reason 0x97) before
/// more of them are built: a receiver facing untrusted peers bounds what one packet costs
/// decoded, not only on the wire.
pub fn decode_limited(
    buf: &mut BytesMut,
    version: ProtocolVersion,
    max_packet_size: u32,
    max_user_properties: u32,
) -> Result<Option<Packet>, DecodeError> {
    let Some(&first) = buf.first() else {
        return Ok(None);
    };
    let with_version = |mut e: DecodeError| {
        e.version = Some(version);
        e
    };
    let kind = first >> 4;
    check_fixed_header_flags(kind, first & 0x0F, version).map_err(with_version)?;
    let (remaining, len_bytes) = match decode_varint(&buf[1..]) {
        VarInt::Value(v, n) => (v as usize, n),
        VarInt::Incomplete => return Ok(None),
        VarInt::TooLong => return Err(with_version(VARINT_TOO_LONG)),
    };
    let total = 1 + len_bytes + remaining;
    if total > max_packet_size as usize {
        return Err(with_version(DecodeError::new(
            ErrorKind::PacketTooLarge,
            "MQTT-3.2.2.3.6",
            "packet is larger than the maximum packet size",
        )));
    }
    if buf.len() < total {
        buf.reserve(total - buf.len());
        return Ok(None);
    }
    let mut body = buf.split_to(total).freeze();
    body.advance(1 + len_bytes);
    let mut r = Reader::new(body);
    r.user_properties_left = max_user_properties;
    let flags = first & 0x0F;
    if kind == 1 {
        // CONNECT sets `version` itself from the level it declares.
        return decode_connect(&mut r).map(|c| Some(Packet::Connect(Box::new(c))));
    }
    decode_body(kind, flags, &mut r, version)
        .map(Some)
        .map_err(with_version)
}

/// Decodes the first packet of a connection, which must be a CONNECT, before its protocol
/// version is known. Unlike [`decode_limited`], an error carries a version only once the
/// CONNECT's protocol level was read: a fixed header that is not CONNECT's, a malformed
/// Remaining Length, or a packet that is not CONNECT at all has `version: None`, and the
/// receiver closes without a CONNACK [MQTT-3.1.4-1], [MQTT-3.2.2-6] (MQTT 5 section 4.13.1
/// gives a CONNACK reason only for an error in a CONNECT). An oversized CONNECT is refused
/// from its header alone, with the version its protocol level declares (3.x has no reason
/// code for it and gets none).
pub fn decode_first(
    buf: &mut BytesMut,
    max_packet_size: u32,
    max_user_properties: u32,
) -> Result<Option<Packet>, DecodeError> {
    let Some(&first) = buf.first() else {
        return Ok(None);
    };
    if first != 0x10 {
        return Err(DecodeError::protocol(
            "MQTT-3.1.0-1",
            "the first packet is not a CONNECT with reserved flags 0",
        ));
    }
    let (remaining, len_bytes) = match decode_varint(&buf[1..]) {
        VarInt::Value(v, n) => (v as usize, n),
        VarInt::Incomplete => return Ok(None),
        VarInt::TooLong => return Err(VARINT_TOO_LONG),
    };
    if 1 + len_bytes + remaining > max_packet_size as usize {
        // Which version to answer in: the protocol level, once enough of the header is here.
        let header = &buf[1 + len_bytes..];
        let level = match header {
            [0, 4, b'M', b'Q', b'T', b'T', level, ..] => Some(*level),
            [0, 6, b'M', b'Q', b'I', b's', b'd', b'p', level, ..] => Some(*level),
            [0, 4, ..] if header.len() < 7 => return Ok(None),
            [0, 6, ..] if header.len() < 9 => return Ok(None),
            [] | [_] => return Ok(None),
            _ => None,
        };
        let mut e = DecodeError::new(
            ErrorKind::PacketTooLarge,
            "MQTT-3.2.2.3.6",
            "packet is larger than the maximum packet size",
        );
        e.version = (level == Some(5)).then_some(ProtocolVersion::V5);
        return Err(e);
    }
    decode_limited(
        buf,
        ProtocolVersion::V5,
        max_packet_size,
        max_user_properties,
    )
}

/// Which acknowledgement [`decode_plain_ack`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PlainAck {
    /// PUBACK.
    PubAck,
    /// PUBREC.
    PubRec,
    /// PUBREL.
    PubRel,
    /// PUBCOMP.
    PubComp,
}

/// The acknowledgement fast path: a four-byte PUBACK, PUBREC, PUBREL or PUBCOMP (no reason
/// code, no properties: all of 3.x, most of 5, and reason Success there) at the front of
/// `buf`, and its packet identifier; the caller advances the buffer by 4. Anything else,
/// wrong flags [MQTT-3.6.1-1] and packet identifier 0 [MQTT-2.2.1-3] included, is `None`:
/// [`decode`] handles it (and names the error). `decode` splits the buffer for every
/// packet, two reference-count operations that are most of an acknowledgement's cost.
pub fn decode_plain_ack(buf: &[u8]) -> Option<(PlainAck, u16)> {
    let &[first, 2, hi, lo] = buf.first_chunk::<4>()? else {
        return None;
    };
    let kind = match first {
        0x40 => PlainAck::PubAck,
        0x50 => PlainAck::PubRec,
        0x62 => PlainAck::PubRel,
        0x70 => PlainAck::PubComp,
        _ => return None,
    };
    let id = u16::from_be_bytes([hi, lo]);
    (id != 0).then_some((kind, id))
}

/// What [`decode_plain_publish`] found at the front of a buffer.
#[derive(Debug)]
pub enum PlainDecode<'a> {
    /// A complete, valid PUBLISH without properties, this many bytes long, borrowed from
    /// the buffer.
    Plain(PlainPublish<'a>, usize),
    /// Anything else: another packet, an incomplete one, a PUBLISH with properties, or an
    /// invalid one. [`decode`] handles it (and names the error, if any).
    Other,
}

/// The receive fast path: a PUBLISH without properties (all of 3.x, most of 5), read in
/// place. [`decode`] hands out slices of the read buffer, which cost reference-count
/// operations on one shared counter for the packet, its topic and its payload, only for
/// a broker to copy them out; this returns borrowed fields instead, and the caller
/// advances the buffer by the length once done. It accepts exactly the packets that
/// `decode` decodes to the same PUBLISH with empty properties, and nothing invalid:
/// anything it is not sure of is [`PlainDecode::Other`].
pub fn decode_plain_publish(
    buf: &[u8],
    version: ProtocolVersion,
    max_packet_size: u32,
) -> PlainDecode<'_> {
    use PlainDecode::Other;
    let Some(&first) = buf.first() else {
        return Other;
    };
    if first >> 4 != 3 {
        return Other;
    }
    let dup = first & 0x08 != 0;
    let retain = first & 0x01 != 0;
    let Some(qos) = QoS::from_u8((first >> 1) & 0x03) else {
        return Other;
    };
    if dup && qos == QoS::AtMostOnce {
        return Other;
    }
    let VarInt::Value(remaining, len_bytes) = decode_varint(&buf[1..]) else {
        return Other;
    };
    let total = 1 + len_bytes + remaining as usize;
    if total > max_packet_size as usize || buf.len() < total {
        return Other;
    }
    let body = &buf[1 + len_bytes..total];
    let Some((len, rest)) = body.split_first_chunk::<2>() else {
        return Other;
    };
    let topic_len = usize::from(u16::from_be_bytes(*len));
    if topic_len == 0 || rest.len() < topic_len {
        return Other;
    }
    let (topic, mut rest) = rest.split_at(topic_len);
    // [MQTT-1.5.4-2] no U+0000, [MQTT-3.3.2-2] no wildcards in a topic name.
    if topic.iter().any(|&b| matches!(b, 0 | b'+' | b'#')) {
        return Other;
    }
    // [MQTT-1.5.4-1]
    let Ok(topic) = std::str::from_utf8(topic) else {
        return Other;
    };
    let mut packet_id = 0;
    if qos != QoS::AtMostOnce {
        let Some((id, after)) = rest.split_first_chunk::<2>() else {
            return Other;
        };
        packet_id = u16::from_be_bytes(*id);
        if packet_id == 0 {
            return Other;
        }
        rest = after;
    }
    if version.is_v5() {
        // An empty property block is the single byte 0.
        match rest.split_first() {
            Some((0, after)) => rest = after,
            _ => return Other,
        }
    }
    PlainDecode::Plain(
        PlainPublish {
            dup,
            qos,
            retain,
            topic,
            packet_id,
            payload: rest,
        },
        total,
    )
}

/// [MQTT-2.1.3-1]: reserved flag bits must hold the listed values; PUBLISH's flags are
/// checked with the packet.
fn check_fixed_header_flags(
    kind: u8,
    flags: u8,
    version: ProtocolVersion,
) -> Result<(), DecodeError> {
    let expected = match kind {
        0 => {
            return Err(DecodeError::malformed(
                "MQTT-2.1.2",
                "reserved packet type 0",
            ));
        }
        15 if !version.is_v5() => {
            return Err(DecodeError::malformed(
                "MQTT-2.1.2",
                "packet type 15 is reserved before MQTT 5",
            ));
        }
        3 => return Ok(()),
        6 | 8 | 10 => 0b0010,
        _ => 0,
    };
    if flags != expected {
        return Err(DecodeError::malformed(
            "MQTT-2.1.3-1",
            "reserved fixed header flags have the wrong value",
        ));
    }
    Ok(())
}

fn trailing(r: &Reader, what: &'static str) -> Result<(), DecodeError> {
    if r.is_empty() {
        Ok(())
    } else {
        Err(DecodeError::malformed("MQTT-2.1.4", what))
    }
}

fn packet_id(r: &mut Reader) -> Result<u16, DecodeError> {
    let id = r.u16()?;
    if id == 0 {
        // [MQTT-2.2.1-3] (3.1.1: MQTT-2.3.1-1): packets that need one carry a non-zero id.
        return Err(DecodeError::protocol(
            "MQTT-2.2.1-3",
            "packet identifier is 0",
        ));
    }
    Ok(id)
}

fn reason(r: &mut Reader, ctx: ReasonContext) -> Result<ReasonCode, DecodeError> {
    let b = r.u8()?;
    ReasonCode::from_u8(b)
        .filter(|rc| rc.allowed_in(ctx))
        .ok_or(DecodeError::protocol(
            "MQTT-2.4",
            "reason code not valid for this packet",
        ))
}

fn topic_name(s: bytestring::ByteString) -> Result<TopicName, DecodeError> {
    TopicName::new(s).map_err(TopicError::into_decode_error)
}

fn decode_connect(r: &mut Reader) -> Result<Connect, DecodeError> {
    let name = r.string()?;
    let level = r.u8()?;
    // Mosquitto's bridge bit: a 3.x level with 0x80 set marks a bridge (it asks not to
    // get its own messages back, and for retained flags as published).
    let bridge = matches!(level, 0x83 | 0x84);
    let protocol = match (&*name, level & if bridge { 0x7F } else { 0xFF }) {
        ("MQIsdp", 3) => ProtocolVersion::V3_1,
        ("MQTT", 4) => ProtocolVersion::V3_1_1,
        ("MQTT", 5) => ProtocolVersion::V5,
        ("MQIsdp" | "MQTT", _) => {
            return Err(DecodeError::new(
                ErrorKind::UnsupportedProtocolVersion,
                "MQTT-3.1.2-2",
                "unsupported protocol level",
            ));
        }
        _ => {
            return Err(DecodeError::new(
                ErrorKind::UnsupportedProtocolVersion,
                "MQTT-3.1.2-1",
                "unknown protocol name",
            ));
        }
    };
    let mut c = decode_connect_body(r, protocol).map_err(|mut e| {
        e.version = Some(protocol);
        e
    })?;
    c.bridge = bridge;
    Ok(c)
}

fn decode_connect_body(r: &mut Reader, protocol: ProtocolVersion) -> Result<Connect, DecodeError> {
    let flags = r.u8()?;
    if flags & 0x01 != 0 {
        return Err(DecodeError::malformed(
            "MQTT-3.1.2-3",
            "reserved CONNECT flag is set",
        ));
    }
    let clean_start = flags & 0x02 != 0;
    let will_flag = flags & 0x04 != 0;
    let will_qos_bits = (flags >> 3) & 0x03;
    let will_retain = flags & 0x20 != 0;
    let password_flag = flags & 0x40 != 0;
    let username_flag = flags & 0x80 != 0;
    let Some(will_qos) = QoS::from_u8(will_qos_bits) else {
        return Err(DecodeError::malformed("MQTT-3.1.2-12", "will QoS is 3"));
    };
    if !will_flag && will_qos_bits != 0 {
        return Err(DecodeError::malformed(
            "MQTT-3.1.2-11",
            "will QoS set without will flag",
        ));
    }
    if !will_flag && will_retain {
        return Err(DecodeError::malformed(
            "MQTT-3.1.2-13",
            "will retain set without will flag",
        ));
    }
    if !protocol.is_v5() && password_flag && !username_flag {
        // 3.1.1 [MQTT-3.1.2-22]; MQTT 5 allows a password without a user name.
        return Err(DecodeError::malformed(
            "MQTT-3.1.2-22",
            "password flag set without user name flag",
        ));
    }
    let keep_alive = r.u16()?;
    let properties = if protocol.is_v5() {
        Properties::read(r, PropertyContext::Connect)?
    } else {
        Properties::default()
    };
    // [MQTT-3.1.3-3], [MQTT-3.1.3-4]: the client identifier is the first payload field.
    let client_id = ClientId(r.string()?);
    let will = if will_flag {
        let mut delay_interval = None;
        let will_properties = if protocol.is_v5() {
            PublishProperties::read(r, PropertyContext::Will, Some(&mut delay_interval))?.0
        } else {
            PublishProperties::default()
        };
        let topic = topic_name(r.string()?)?;
        let payload = r.binary()?;
        Some(Will {
            topic,
            payload,
            qos: will_qos,
            retain: will_retain,
            delay_interval,
            properties: will_properties,
        })
    } else {
        None
    };
    let username = if username_flag {
        Some(r.string()?)
    } else {
        None
    };
    let password = if password_flag {
        Some(r.binary()?)
    } else {
        None
    };
    trailing(r, "bytes after the end of the CONNECT payload")?;
    Ok(Connect {
        protocol,
        bridge: false,
        clean_start,
        keep_alive,
        client_id,
        will,
        username,
        password,
        properties,
    })
}

fn decode_body(
    kind: u8,
    flags: u8,
    r: &mut Reader,
    v: ProtocolVersion,
) -> Result<Packet, DecodeError> {
    Ok(match kind {
        2 => Packet::ConnAck(decode_connack(r, v)?),
        3 => Packet::Publish(decode_publish(flags, r, v)?),
        4 => Packet::PubAck(decode_ack(r, v, ReasonContext::PubAckRec)?),
        5 => Packet::PubRec(decode_ack(r, v, ReasonContext::PubAckRec)?),
        6 => Packet::PubRel(decode_ack(r, v, ReasonContext::PubRelComp)?),
        7 => Packet::PubComp(decode_ack(r, v, ReasonContext::PubRelComp)?),
        8 => Packet::Subscribe(decode_subscribe(r, v)?),
        9 => Packet::SubAck(decode_suback(r, v)?),
        10 => Packet::Unsubscribe(decode_unsubscribe(r, v)?),
        11 => Packet::UnsubAck(decode_unsuback(r, v)?),
        12 => {
            trailing(r, "PINGREQ has a remaining length other than 0")?;
            Packet::PingReq
        }
        13 => {
            trailing(r, "PINGRESP has a remaining length other than 0")?;
            Packet::PingResp
        }
        14 => Packet::Disconnect(decode_disconnect(r, v)?),
        15 => Packet::Auth(decode_auth(r)?),
        // Types 0 and 1 are handled before; the type is four bits.
        _ => return Err(DecodeError::malformed("MQTT-2.1.2", "reserved packet type")),
    })
}

fn decode_connack(r: &mut Reader, v: ProtocolVersion) -> Result<ConnAck, DecodeError> {
    let ack_flags = r.u8()?;
    if ack_flags & 0xFE != 0 {
        return Err(DecodeError::malformed(
            "MQTT-3.2.2-1",
            "reserved CONNACK acknowledge flags are set",
        ));
    }
    let session_present = ack_flags & 0x01 != 0;
    let (reason, properties) = if v.is_v5() {
        let reason = reason(r, ReasonContext::ConnAck)?;
        (reason, Properties::read(r, PropertyContext::ConnAck)?)
    } else {
        let rc = r.u8()?;
        let reason = ReasonCode::from_v3_connack(rc).ok_or(DecodeError::protocol(
            "MQTT-3.2.2.3",
            "CONNACK return code is reserved",
        ))?;
        (reason, Properties::default())
    };
    if session_present && reason.is_error() {
        // [MQTT-3.2.2-6] (3.1.1: MQTT-3.2.2-4).
        return Err(DecodeError::protocol(
            "MQTT-3.2.2-6",
            "session present set on a refused connection",
        ));
    }
    trailing(r, "bytes after the end of CONNACK")?;
    Ok(ConnAck {
        session_present,
        reason,
        properties,
    })
}

fn decode_publish(flags: u8, r: &mut Reader, v: ProtocolVersion) -> Result<Publish, DecodeError> {
    let dup = flags & 0x08 != 0;
    let retain = flags & 0x01 != 0;
    let Some(qos) = QoS::from_u8((flags >> 1) & 0x03) else {
        return Err(DecodeError::malformed("MQTT-3.3.1-4", "PUBLISH with QoS 3"));
    };
    if dup && qos == QoS::AtMostOnce {
        return Err(DecodeError::protocol(
            "MQTT-3.3.1-2",
            "DUP flag set on a QoS 0 PUBLISH",
        ));
    }
    let topic_str = r.string()?;
    let packet_id = if qos == QoS::AtMostOnce {
        0
    } else {
        packet_id(r)?
    };
    let (properties, raw_properties) = if v.is_v5() {
        PublishProperties::read(r, PropertyContext::Publish, None)?
    } else {
        Default::default()
    };
    let topic = if topic_str.is_empty() && properties.topic_alias.is_some() {
        // v5: a zero-length topic name is allowed with a Topic Alias [MQTT-3.3.2-1 and §3.3.2.3.4].
        TopicName::empty()
    } else {
        topic_name(topic_str)?
    };
    Ok(Publish {
        dup,
        qos,
        retain,
        topic,
        packet_id,
        properties,
        raw_properties,
        payload: r.rest(),
    })
}

fn decode_ack(r: &mut Reader, v: ProtocolVersion, ctx: ReasonContext) -> Result<Ack, DecodeError> {
    let packet_id = packet_id(r)?;
    if !v.is_v5() {
        trailing(r, "acknowledgement has a remaining length other than 2")?;
        return Ok(Ack::new(packet_id));
    }
    // §3.4.2.1: reason and properties may be omitted when Success / none.
    let reason = if r.is_empty() {
        ReasonCode::Success
    } else {
        reason(r, ctx)?
    };
    let properties = if r.is_empty() {
        AckProperties::default()
    } else {
        AckProperties::read(r)?
    };
    trailing(r, "bytes after the acknowledgement's properties")?;
    Ok(Ack {
        packet_id,
        reason,
        properties,
    })
}

fn decode_subscribe(r: &mut Reader, v: ProtocolVersion) -> Result<Subscribe, DecodeError> {
    let packet_id = packet_id(r)?;
    let properties = if v.is_v5() {
        Properties::read(r, PropertyContext::Subscribe)?
    } else {
        Properties::default()
    };
    let mut filters = Vec::new();
    while !r.is_empty() {
        let filter = TopicFilter::new(r.string()?).map_err(TopicError::into_decode_error)?;
        let o = r.u8()?;
        let reserved = if v.is_v5() { 0xC0 } else { 0xFC };
        if o & reserved != 0 {
            // [MQTT-3.8.3-5] (3.1.1: MQTT-3.8.3-4).
            return Err(DecodeError::malformed(
                "MQTT-3.8.3-5",
                "reserved subscription option bits are set",
            ));
        }
        let Some(qos) = QoS::from_u8(o & 0x03) else {
            return Err(DecodeError::malformed(
                "MQTT-3.8.3-4",
                "subscription QoS is 3",
            ));
        };
        let retain_handling = match (o >> 4) & 0x03 {
            0 => RetainHandling::SendOnSubscribe,
            1 => RetainHandling::SendIfNew,
            2 => RetainHandling::DoNotSend,
            _ => {
                return Err(DecodeError::protocol(
                    "MQTT-3.8.3.1",
                    "retain handling is 3",
                ));
            }
        };
        let options = SubscriptionOptions {
            qos,
            no_local: o & 0x04 != 0,
            retain_as_published: o & 0x08 != 0,
            retain_handling,
        };
        if options.no_local && filter.is_shared() {
            return Err(DecodeError::protocol(
                "MQTT-3.8.3-4",
                "No Local set on a shared subscription",
            ));
        }
        filters.push((filter, options));
    }
    if filters.is_empty() {
        return Err(DecodeError::protocol(
            "MQTT-3.8.3-3",
            "SUBSCRIBE without topic filters",
        ));
    }
    Ok(Subscribe {
        packet_id,
        filters,
        properties,
    })
}

fn decode_suback(r: &mut Reader, v: ProtocolVersion) -> Result<SubAck, DecodeError> {
    let packet_id = packet_id(r)?;
    let properties = if v.is_v5() {
        AckProperties::read(r)?
    } else {
        AckProperties::default()
    };
    let mut reasons = Vec::with_capacity(r.remaining());
    while !r.is_empty() {
        let rc = if v.is_v5() {
            reason(r, ReasonContext::SubAck)?
        } else {
            match r.u8()? {
                0x00 => ReasonCode::GRANTED_QOS0,
                0x01 => ReasonCode::GrantedQoS1,
                0x02 => ReasonCode::GrantedQoS2,
                0x80 => ReasonCode::UnspecifiedError,
                _ => {
                    return Err(DecodeError::protocol(
                        "MQTT-3.9.3-2",
                        "SUBACK return code is reserved",
                    ));
                }
            }
        };
        reasons.push(rc);
    }
    if reasons.is_empty() {
        return Err(DecodeError::protocol(
            "MQTT-3.9.3-1",
            "SUBACK without return codes",
        ));
    }
    Ok(SubAck {
        packet_id,
        reasons,
        properties,
    })
}

fn decode_unsubscribe(r: &mut Reader, v: ProtocolVersion) -> Result<Unsubscribe, DecodeError> {
    let packet_id = packet_id(r)?;
    let properties = if v.is_v5() {
        Properties::read(r, PropertyContext::Unsubscribe)?
    } else {
        Properties::default()
    };
    let mut filters = Vec::new();
    while !r.is_empty() {
        filters.push(TopicFilter::new(r.string()?).map_err(TopicError::into_decode_error)?);
    }
    if filters.is_empty() {
        return Err(DecodeError::protocol(
            "MQTT-3.10.3-2",
            "UNSUBSCRIBE without topic filters",
        ));
    }
    Ok(Unsubscribe {
        packet_id,
        filters,
        properties,
    })
}

fn decode_unsuback(r: &mut Reader, v: ProtocolVersion) -> Result<UnsubAck, DecodeError> {
    let packet_id = packet_id(r)?;
    if !v.is_v5() {
        trailing(r, "UNSUBACK has a remaining length other than 2")?;
        return Ok(UnsubAck {
            packet_id,
            reasons: Vec::new(),
            properties: AckProperties::default(),
        });
    }
    let properties = AckProperties::read(r)?;
    let mut reasons = Vec::with_capacity(r.remaining());
    while !r.is_empty() {
        reasons.push(reason(r, ReasonContext::UnsubAck)?);
    }
    if reasons.is_empty() {
        return Err(DecodeError::protocol(
            "MQTT-3.11.3",
            "UNSUBACK without reason codes",
        ));
    }
    Ok(UnsubAck {
        packet_id,
        reasons,
        properties,
    })
}

fn decode_disconnect(r: &mut Reader, v: ProtocolVersion) -> Result<Disconnect, DecodeError> {
    if !v.is_v5() {
        trailing(r, "DISCONNECT has a remaining length other than 0")?;
        return Ok(Disconnect::new(ReasonCode::NORMAL_DISCONNECTION));
    }
    // §3.14.2.1: a remaining length of 0 means Normal disconnection without properties.
    let reason = if r.is_empty() {
        ReasonCode::NORMAL_DISCONNECTION
    } else {
        reason(r, ReasonContext::Disconnect)?
    };
    let properties = if r.is_empty() {
        Properties::default()
    } else {
        Properties::read(r, PropertyContext::Disconnect)?
    };
    trailing(r, "bytes after the DISCONNECT properties")?;
    Ok(Disconnect { reason, properties })
}

fn decode_auth(r: &mut Reader) -> Result<Auth, DecodeError> {
    // §3.15.2.1: reason and properties may be omitted for Success without properties.
    let reason = if r.is_empty() {
        ReasonCode::Success
    } else {
        reason(r, ReasonContext::Auth)?
    };
    let properties = if r.is_empty() {
        Properties::default()
    } else {
        Properties::read(r, PropertyContext::Auth)?
    };
    trailing(r, "bytes after the AUTH properties")?;
    Ok(Auth { reason, properties })
}
