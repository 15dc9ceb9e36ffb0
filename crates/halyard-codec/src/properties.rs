//! MQTT 5 properties (section 2.2.2). One table says each identifier's data type and which
//! packets may carry it; decoding walks the property block once, rejecting unknown or
//! misplaced identifiers (malformed, §2.2.2.2) and repeats (protocol error), then hands each
//! value to the packet's own typed property struct.

use bytes::{BufMut, Bytes, BytesMut};
use bytestring::ByteString;

use crate::error::{DecodeError, EncodeError, ErrorKind};
use crate::primitives::{Reader, binary_len, put_binary, put_varint, varint_len};
use crate::{QoS, TopicName};

/// Property identifiers (MQTT 5 table 2-4).
#[allow(missing_docs)]
pub mod id {
    pub const PAYLOAD_FORMAT_INDICATOR: u8 = 0x01;
    pub const MESSAGE_EXPIRY_INTERVAL: u8 = 0x02;
    pub const CONTENT_TYPE: u8 = 0x03;
    pub const RESPONSE_TOPIC: u8 = 0x08;
    pub const CORRELATION_DATA: u8 = 0x09;
    pub const SUBSCRIPTION_IDENTIFIER: u8 = 0x0B;
    pub const SESSION_EXPIRY_INTERVAL: u8 = 0x11;
    pub const ASSIGNED_CLIENT_IDENTIFIER: u8 = 0x12;
    pub const SERVER_KEEP_ALIVE: u8 = 0x13;
    pub const AUTHENTICATION_METHOD: u8 = 0x15;
    pub const AUTHENTICATION_DATA: u8 = 0x16;
    pub const REQUEST_PROBLEM_INFORMATION: u8 = 0x17;
    pub const WILL_DELAY_INTERVAL: u8 = 0x18;
    pub const REQUEST_RESPONSE_INFORMATION: u8 = 0x19;
    pub const RESPONSE_INFORMATION: u8 = 0x1A;
    pub const SERVER_REFERENCE: u8 = 0x1C;
    pub const REASON_STRING: u8 = 0x1F;
    pub const RECEIVE_MAXIMUM: u8 = 0x21;
    pub const TOPIC_ALIAS_MAXIMUM: u8 = 0x22;
    pub const TOPIC_ALIAS: u8 = 0x23;
    pub const MAXIMUM_QOS: u8 = 0x24;
    pub const RETAIN_AVAILABLE: u8 = 0x25;
    pub const USER_PROPERTY: u8 = 0x26;
    pub const MAXIMUM_PACKET_SIZE: u8 = 0x27;
    pub const WILDCARD_SUBSCRIPTION_AVAILABLE: u8 = 0x28;
    pub const SUBSCRIPTION_IDENTIFIER_AVAILABLE: u8 = 0x29;
    pub const SHARED_SUBSCRIPTION_AVAILABLE: u8 = 0x2A;
}

/// Which property block is being read; each allows its own identifiers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum PropertyContext {
    Connect,
    Will,
    ConnAck,
    Publish,
    /// PUBACK, PUBREC, PUBREL, PUBCOMP, SUBACK, UNSUBACK.
    Ack,
    Subscribe,
    Unsubscribe,
    Disconnect,
    Auth,
}

#[derive(Clone, Copy)]
enum Type {
    Byte,
    U16,
    U32,
    VarInt,
    Str,
    Bin,
    Pair,
}

const fn type_of(id: u8) -> Option<Type> {
    use id::*;
    Some(match id {
        PAYLOAD_FORMAT_INDICATOR
        | REQUEST_PROBLEM_INFORMATION
        | REQUEST_RESPONSE_INFORMATION
        | MAXIMUM_QOS
        | RETAIN_AVAILABLE
        | WILDCARD_SUBSCRIPTION_AVAILABLE
        | SUBSCRIPTION_IDENTIFIER_AVAILABLE
        | SHARED_SUBSCRIPTION_AVAILABLE => Type::Byte,
        SERVER_KEEP_ALIVE | RECEIVE_MAXIMUM | TOPIC_ALIAS_MAXIMUM | TOPIC_ALIAS => Type::U16,
        MESSAGE_EXPIRY_INTERVAL
        | SESSION_EXPIRY_INTERVAL
        | WILL_DELAY_INTERVAL
        | MAXIMUM_PACKET_SIZE => Type::U32,
        SUBSCRIPTION_IDENTIFIER => Type::VarInt,
        CONTENT_TYPE
        | RESPONSE_TOPIC
        | ASSIGNED_CLIENT_IDENTIFIER
        | AUTHENTICATION_METHOD
        | RESPONSE_INFORMATION
        | SERVER_REFERENCE
        | REASON_STRING => Type::Str,
        CORRELATION_DATA | AUTHENTICATION_DATA => Type::Bin,
        USER_PROPERTY => Type::Pair,
        _ => return None,
    })
}

const fn bits(ids: &[u8]) -> u64 {
    let mut m = 0u64;
    let mut i = 0;
    while i < ids.len() {
        m |= 1 << ids[i];
        i += 1;
    }
    m
}

/// The identifiers each packet may carry (MQTT 5 table 2-4).
const fn allowed(ctx: PropertyContext) -> u64 {
    use id::*;
    match ctx {
        PropertyContext::Connect => bits(&[
            SESSION_EXPIRY_INTERVAL,
            AUTHENTICATION_METHOD,
            AUTHENTICATION_DATA,
            REQUEST_PROBLEM_INFORMATION,
            REQUEST_RESPONSE_INFORMATION,
            RECEIVE_MAXIMUM,
            TOPIC_ALIAS_MAXIMUM,
            USER_PROPERTY,
            MAXIMUM_PACKET_SIZE,
        ]),
        PropertyContext::Will => bits(&[
            PAYLOAD_FORMAT_INDICATOR,
            MESSAGE_EXPIRY_INTERVAL,
            CONTENT_TYPE,
            RESPONSE_TOPIC,
            CORRELATION_DATA,
            WILL_DELAY_INTERVAL,
            USER_PROPERTY,
        ]),
        PropertyContext::ConnAck => bits(&[
            SESSION_EXPIRY_INTERVAL,
            ASSIGNED_CLIENT_IDENTIFIER,
            SERVER_KEEP_ALIVE,
            AUTHENTICATION_METHOD,
            AUTHENTICATION_DATA,
            RESPONSE_INFORMATION,
            SERVER_REFERENCE,
            REASON_STRING,
            RECEIVE_MAXIMUM,
            TOPIC_ALIAS_MAXIMUM,
            MAXIMUM_QOS,
            RETAIN_AVAILABLE,
            USER_PROPERTY,
            MAXIMUM_PACKET_SIZE,
            WILDCARD_SUBSCRIPTION_AVAILABLE,
            SUBSCRIPTION_IDENTIFIER_AVAILABLE,
            SHARED_SUBSCRIPTION_AVAILABLE,
        ]),
        PropertyContext::Publish => bits(&[
            PAYLOAD_FORMAT_INDICATOR,
            MESSAGE_EXPIRY_INTERVAL,
            CONTENT_TYPE,
            RESPONSE_TOPIC,
            CORRELATION_DATA,
            SUBSCRIPTION_IDENTIFIER,
            TOPIC_ALIAS,
            USER_PROPERTY,
        ]),
        PropertyContext::Ack => bits(&[REASON_STRING, USER_PROPERTY]),
        PropertyContext::Subscribe => bits(&[SUBSCRIPTION_IDENTIFIER, USER_PROPERTY]),
        PropertyContext::Unsubscribe => bits(&[USER_PROPERTY]),
        PropertyContext::Disconnect => bits(&[
            SESSION_EXPIRY_INTERVAL,
            SERVER_REFERENCE,
            REASON_STRING,
            USER_PROPERTY,
        ]),
        PropertyContext::Auth => bits(&[
            AUTHENTICATION_METHOD,
            AUTHENTICATION_DATA,
            REASON_STRING,
            USER_PROPERTY,
        ]),
    }
}

/// One decoded property value.
#[derive(Debug)]
pub(crate) enum Value {
    Byte(u8),
    U16(u16),
    U32(u32),
    VarInt(u32),
    Str(ByteString),
    Bin(Bytes),
    Pair(ByteString, ByteString),
}

/// Walks one property block: reads its length, then each property, checking identifier,
/// placement and repeats; `each` receives the values in wire order. Returns the raw block
/// (without its length prefix) so that a PUBLISH can be forwarded unchanged.
pub(crate) fn read_properties(
    r: &mut Reader,
    ctx: PropertyContext,
    mut each: impl FnMut(u8, Value) -> Result<(), DecodeError>,
) -> Result<Bytes, DecodeError> {
    let len = r.varint()? as usize;
    if len > r.remaining() {
        return Err(DecodeError::malformed(
            "MQTT-2.2.2.1",
            "property length runs past the end of the packet",
        ));
    }
    let raw = r.take(len)?;
    let mut p = Reader::new(raw.clone());
    let mut seen = 0u64;
    let mask = allowed(ctx);
    while !p.is_empty() {
        let ident = p.varint()?;
        let known = u8::try_from(ident)
            .ok()
            .and_then(|i| type_of(i).map(|t| (i, t)));
        let Some((ident, ty)) = known else {
            return Err(DecodeError::malformed(
                "MQTT-2.2.2.2",
                "unknown property identifier",
            ));
        };
        // §2.2.2.2: an identifier not valid for its packet type is a Malformed Packet.
        if mask & (1 << ident) == 0 {
            return Err(DecodeError::malformed(
                "MQTT-2.2.2.2",
                "property not allowed on this packet",
            ));
        }
        // Every property but User Property (and Subscription Identifier on PUBLISH) may
        // appear at most once; a repeat is a Protocol Error (each property's section).
        let repeatable = ident == id::USER_PROPERTY
            || (ident == id::SUBSCRIPTION_IDENTIFIER && ctx == PropertyContext::Publish);
        if !repeatable && seen & (1 << ident) != 0 {
            return Err(DecodeError::protocol(
                "MQTT-2.2.2.2",
                "property included more than once",
            ));
        }
        seen |= 1 << ident;
        let value = match ty {
            Type::Byte => Value::Byte(p.u8()?),
            Type::U16 => Value::U16(p.u16()?),
            Type::U32 => Value::U32(p.u32()?),
            Type::VarInt => Value::VarInt(p.varint()?),
            Type::Str => Value::Str(p.string()?),
            Type::Bin => Value::Bin(p.binary()?),
            Type::Pair => {
                // Counted on the packet's reader: a packet may hold more than one block.
                r.user_properties_left =
                    r.user_properties_left
                        .checked_sub(1)
                        .ok_or(DecodeError::new(
                            ErrorKind::UserPropertiesOverLimit,
                            "MQTT-2.2.2.2",
                            "more user properties than the receiver accepts in one packet",
                        ))?;
                Value::Pair(p.string()?, p.string()?)
            }
        };
        each(ident, value)?;
    }
    Ok(raw)
}

fn flag(v: u8, section: &'static str) -> Result<bool, DecodeError> {
    match v {
        0 => Ok(false),
        1 => Ok(true),
        _ => Err(DecodeError::protocol(
            section,
            "property value must be 0 or 1",
        )),
    }
}

fn nonzero_u16(v: u16, section: &'static str, what: &'static str) -> Result<u16, DecodeError> {
    if v == 0 {
        return Err(DecodeError::protocol(section, what));
    }
    Ok(v)
}

fn subscription_id(v: u32) -> Result<u32, DecodeError> {
    // §3.8.2.1.2: "It is a Protocol Error if the Subscription Identifier has a value of 0".
    if v == 0 {
        return Err(DecodeError::protocol(
            "MQTT-3.8.2.1.2",
            "subscription identifier is 0",
        ));
    }
    Ok(v)
}

// The table above decides which identifiers reach each setter, so a value of the wrong
// variant cannot arrive; the fallback arm keeps the setters total without a panic.
const UNREACHABLE: DecodeError =
    DecodeError::malformed("MQTT-2.2.2.2", "property value of the wrong type");

/// Properties of PUBLISH, and of a will message (section 3.3.2.3 and 3.1.3.2).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PublishProperties {
    /// 0x01: payload is UTF-8 (true) or unspecified bytes (false).
    pub payload_format_indicator: Option<bool>,
    /// 0x02: lifetime in seconds.
    pub message_expiry_interval: Option<u32>,
    /// 0x23: topic alias (PUBLISH only, never 0).
    pub topic_alias: Option<u16>,
    /// 0x08: response topic (a topic name, no wildcards) [MQTT-3.3.2-14].
    pub response_topic: Option<TopicName>,
    /// 0x09: correlation data.
    pub correlation_data: Option<Bytes>,
    /// 0x0B: subscription identifiers (server to client only; may repeat).
    pub subscription_identifiers: Vec<u32>,
    /// 0x03: content type.
    pub content_type: Option<ByteString>,
    /// 0x26: user properties, in order.
    pub user_properties: Vec<(ByteString, ByteString)>,
}

impl PublishProperties {
    /// No property at all (field checks: cheaper than comparing with the default).
    pub fn is_empty(&self) -> bool {
        self.payload_format_indicator.is_none()
            && self.message_expiry_interval.is_none()
            && self.topic_alias.is_none()
            && self.response_topic.is_none()
            && self.correlation_data.is_none()
            && self.subscription_identifiers.is_empty()
            && self.content_type.is_none()
            && self.user_properties.is_empty()
    }

    /// The same properties with every string and binary value copied out of the buffer
    /// they were decoded from (see [`crate::TopicName::copy_with`]) into one buffer of
    /// their own: one allocation for all of them, where a copy each cost an allocation
    /// per user property key and value.
    pub fn copied(&self) -> PublishProperties {
        let mut buf = BytesMut::with_capacity(self.value_bytes());
        for b in self
            .response_topic
            .iter()
            .map(|t| t.as_str().as_bytes())
            .chain(self.correlation_data.iter().map(|d| &d[..]))
            .chain(self.content_type.iter().map(|c| &c.as_bytes()[..]))
            .chain(
                self.user_properties
                    .iter()
                    .flat_map(|(k, v)| [&k.as_bytes()[..], &v.as_bytes()[..]]),
            )
        {
            buf.put_slice(b);
        }
        let mut all = buf.freeze();
        let mut take = |n: usize| all.split_to(n);
        // Each slice was valid UTF-8 (or a topic name) where it came from.
        let text = |b: Bytes| ByteString::try_from(b).unwrap_or_default();
        let response_topic = self.response_topic.as_ref().map(|t| {
            TopicName::new(text(take(t.as_str().len()))).unwrap_or_else(|_| t.copy_with(&[]).0)
        });
        let correlation_data = self.correlation_data.as_ref().map(|d| take(d.len()));
        let content_type = self.content_type.as_ref().map(|c| text(take(c.len())));
        let mut user_properties = Vec::with_capacity(self.user_properties.len());
        for (k, v) in &self.user_properties {
            let k = text(take(k.len()));
            user_properties.push((k, text(take(v.len()))));
        }
        PublishProperties {
            payload_format_indicator: self.payload_format_indicator,
            message_expiry_interval: self.message_expiry_interval,
            topic_alias: self.topic_alias,
            response_topic,
            correlation_data,
            subscription_identifiers: self.subscription_identifiers.clone(),
            content_type,
            user_properties,
        }
    }

    /// Bytes these properties hold in memory beyond their own struct: the values' bytes
    /// and the user properties' vector (what a broker charges to its memory budgets for a
    /// message it keeps; many small user properties cost far more than their wire size).
    pub fn held_bytes(&self) -> usize {
        let pair = std::mem::size_of::<(ByteString, ByteString)>();
        self.value_bytes()
            + self.subscription_identifiers.capacity() * 4
            + self.user_properties.capacity() * pair
    }

    /// Bytes of the string and binary values (what [`Self::copied`] copies).
    fn value_bytes(&self) -> usize {
        self.response_topic.as_ref().map_or(0, |t| t.as_str().len())
            + self.correlation_data.as_ref().map_or(0, Bytes::len)
            + self.content_type.as_ref().map_or(0, |c| c.len())
            + self
                .user_properties
                .iter()
                .map(|(k, v)| k.len() + v.len())
                .sum::<usize>()
    }

    /// Read a PUBLISH's (or, with `will_delay`, a will's) property block.
    pub(crate) fn read(
        r: &mut Reader,
        ctx: PropertyContext,
        mut will_delay: Option<&mut Option<u32>>,
    ) -> Result<(Self, Bytes), DecodeError> {
        let mut p = PublishProperties::default();
        let raw = read_properties(r, ctx, |ident, v| {
            match (ident, v) {
                (id::PAYLOAD_FORMAT_INDICATOR, Value::Byte(b)) => {
                    p.payload_format_indicator = Some(flag(b, "MQTT-3.3.2.3.2")?);
                }
                (id::MESSAGE_EXPIRY_INTERVAL, Value::U32(x)) => p.message_expiry_interval = Some(x),
                (id::TOPIC_ALIAS, Value::U16(x)) => {
                    if x == 0 {
                        // [MQTT-3.3.2-8] a Topic Alias of 0 is not permitted.
                        return Err(DecodeError::new(
                            ErrorKind::TopicAliasInvalid,
                            "MQTT-3.3.2-8",
                            "topic alias is 0",
                        ));
                    }
                    p.topic_alias = Some(x);
                }
                (id::RESPONSE_TOPIC, Value::Str(s)) => {
                    let t = TopicName::new(s).map_err(|_| {
                        DecodeError::protocol(
                            "MQTT-3.3.2-14",
                            "response topic is not a valid topic name",
                        )
                    })?;
                    p.response_topic = Some(t);
                }
                (id::CORRELATION_DATA, Value::Bin(b)) => p.correlation_data = Some(b),
                (id::SUBSCRIPTION_IDENTIFIER, Value::VarInt(x)) => {
                    p.subscription_identifiers.push(subscription_id(x)?);
                }
                (id::CONTENT_TYPE, Value::Str(s)) => p.content_type = Some(s),
                (id::USER_PROPERTY, Value::Pair(k, v)) => p.user_properties.push((k, v)),
                (id::WILL_DELAY_INTERVAL, Value::U32(x)) => {
                    if let Some(d) = will_delay.as_deref_mut() {
                        *d = Some(x);
                    }
                }
                _ => return Err(UNREACHABLE),
            }
            Ok(())
        })?;
        Ok((p, raw))
    }

    /// Length of the property block without its length prefix.
    pub fn wire_len(&self) -> usize {
        let mut n = 0;
        n += opt_len(&self.payload_format_indicator, |_| 1);
        n += opt_len(&self.message_expiry_interval, |_| 4);
        n += opt_len(&self.topic_alias, |_| 2);
        n += opt_len(&self.response_topic, |t| binary_len(t.as_str().as_bytes()));
        n += opt_len(&self.correlation_data, |b| binary_len(b));
        n += self
            .subscription_identifiers
            .iter()
            .map(|&s| 1 + varint_len(s))
            .sum::<usize>();
        n += opt_len(&self.content_type, |s| binary_len(s.as_bytes()));
        n += user_properties_len(&self.user_properties);
        n
    }

    pub(crate) fn write(&self, buf: &mut BytesMut) -> Result<(), EncodeError> {
        if let Some(v) = self.payload_format_indicator {
            buf.put_u8(id::PAYLOAD_FORMAT_INDICATOR);
            buf.put_u8(v.into());
        }
        if let Some(v) = self.message_expiry_interval {
            buf.put_u8(id::MESSAGE_EXPIRY_INTERVAL);
            buf.put_u32(v);
        }
        if let Some(v) = self.topic_alias {
            if v == 0 {
                return Err(EncodeError::Invalid("topic alias 0 [MQTT-3.3.2-8]"));
            }
            buf.put_u8(id::TOPIC_ALIAS);
            buf.put_u16(v);
        }
        if let Some(t) = &self.response_topic {
            buf.put_u8(id::RESPONSE_TOPIC);
            put_binary(buf, t.as_str().as_bytes(), "response topic")?;
        }
        if let Some(b) = &self.correlation_data {
            buf.put_u8(id::CORRELATION_DATA);
            put_binary(buf, b, "correlation data")?;
        }
        for &s in &self.subscription_identifiers {
            if s == 0 || s > crate::primitives::MAX_VARINT {
                return Err(EncodeError::Invalid("subscription identifier out of range"));
            }
            buf.put_u8(id::SUBSCRIPTION_IDENTIFIER);
            put_varint(buf, s);
        }
        if let Some(s) = &self.content_type {
            buf.put_u8(id::CONTENT_TYPE);
            put_binary(buf, s.as_bytes(), "content type")?;
        }
        write_user_properties(buf, &self.user_properties)
    }
}

/// Properties of PUBACK, PUBREC, PUBREL, PUBCOMP, SUBACK and UNSUBACK.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AckProperties {
    /// 0x1F: human-readable reason.
    pub reason_string: Option<ByteString>,
    /// 0x26: user properties, in order.
    pub user_properties: Vec<(ByteString, ByteString)>,
}

impl AckProperties {
    pub(crate) fn read(r: &mut Reader) -> Result<Self, DecodeError> {
        let mut p = AckProperties::default();
        read_properties(r, PropertyContext::Ack, |ident, v| {
            match (ident, v) {
                (id::REASON_STRING, Value::Str(s)) => p.reason_string = Some(s),
                (id::USER_PROPERTY, Value::Pair(k, v)) => p.user_properties.push((k, v)),
                _ => return Err(UNREACHABLE),
            }
            Ok(())
        })?;
        Ok(p)
    }
    /// True when no property is set (the block can then be omitted on acks).
    pub fn is_empty(&self) -> bool {
        self.reason_string.is_none() && self.user_properties.is_empty()
    }
    /// Length of the property block without its length prefix.
    pub fn wire_len(&self) -> usize {
        opt_len(&self.reason_string, |s| binary_len(s.as_bytes()))
            + user_properties_len(&self.user_properties)
    }
    pub(crate) fn write(&self, buf: &mut BytesMut) -> Result<(), EncodeError> {
        if let Some(s) = &self.reason_string {
            buf.put_u8(id::REASON_STRING);
            put_binary(buf, s.as_bytes(), "reason string")?;
        }
        write_user_properties(buf, &self.user_properties)
    }
}

/// Properties of the less frequent packets: CONNECT, CONNACK, SUBSCRIBE, UNSUBSCRIBE,
/// DISCONNECT and AUTH. Decoding only ever fills the fields the packet allows; encoding
/// writes every field that is set, so callers set only those.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[allow(missing_docs)]
pub struct Properties {
    pub session_expiry_interval: Option<u32>,
    pub assigned_client_identifier: Option<ByteString>,
    pub server_keep_alive: Option<u16>,
    pub authentication_method: Option<ByteString>,
    pub authentication_data: Option<Bytes>,
    pub request_problem_information: Option<bool>,
    pub request_response_information: Option<bool>,
    pub response_information: Option<ByteString>,
    pub server_reference: Option<ByteString>,
    pub reason_string: Option<ByteString>,
    /// Never 0 (§3.1.2.11.3, §3.2.2.3.3).
    pub receive_maximum: Option<u16>,
    pub topic_alias_maximum: Option<u16>,
    /// Only 0 or 1 may be sent (§3.2.2.3.4); absent means 2.
    pub maximum_qos: Option<QoS>,
    pub retain_available: Option<bool>,
    /// Never 0 (§3.1.2.11.4).
    pub maximum_packet_size: Option<u32>,
    pub wildcard_subscription_available: Option<bool>,
    pub subscription_identifier_available: Option<bool>,
    pub shared_subscription_available: Option<bool>,
    /// SUBSCRIBE only; never 0.
    pub subscription_identifier: Option<u32>,
    pub user_properties: Vec<(ByteString, ByteString)>,
}

impl Properties {
    pub(crate) fn read(r: &mut Reader, ctx: PropertyContext) -> Result<Self, DecodeError> {
        let mut p = Properties::default();
        read_properties(r, ctx, |ident, v| {
            match (ident, v) {
                (id::SESSION_EXPIRY_INTERVAL, Value::U32(x)) => p.session_expiry_interval = Some(x),
                (id::ASSIGNED_CLIENT_IDENTIFIER, Value::Str(s)) => {
                    p.assigned_client_identifier = Some(s);
                }
                (id::SERVER_KEEP_ALIVE, Value::U16(x)) => p.server_keep_alive = Some(x),
                (id::AUTHENTICATION_METHOD, Value::Str(s)) => p.authentication_method = Some(s),
                (id::AUTHENTICATION_DATA, Value::Bin(b)) => p.authentication_data = Some(b),
                (id::REQUEST_PROBLEM_INFORMATION, Value::Byte(b)) => {
                    p.request_problem_information = Some(flag(b, "MQTT-3.1.2.11.7")?);
                }
                (id::REQUEST_RESPONSE_INFORMATION, Value::Byte(b)) => {
                    p.request_response_information = Some(flag(b, "MQTT-3.1.2.11.6")?);
                }
                (id::RESPONSE_INFORMATION, Value::Str(s)) => p.response_information = Some(s),
                (id::SERVER_REFERENCE, Value::Str(s)) => p.server_reference = Some(s),
                (id::REASON_STRING, Value::Str(s)) => p.reason_string = Some(s),
                (id::RECEIVE_MAXIMUM, Value::U16(x)) => {
                    p.receive_maximum =
                        Some(nonzero_u16(x, "MQTT-3.1.2.11.3", "receive maximum is 0")?);
                }
                (id::TOPIC_ALIAS_MAXIMUM, Value::U16(x)) => p.topic_alias_maximum = Some(x),
                (id::MAXIMUM_QOS, Value::Byte(b)) => {
                    p.maximum_qos = Some(match b {
                        0 => QoS::AtMostOnce,
                        1 => QoS::AtLeastOnce,
                        _ => {
                            return Err(DecodeError::protocol(
                                "MQTT-3.2.2.3.4",
                                "maximum QoS must be 0 or 1",
                            ));
                        }
                    });
                }
                (id::RETAIN_AVAILABLE, Value::Byte(b)) => {
                    p.retain_available = Some(flag(b, "MQTT-3.2.2.3.5")?);
                }
                (id::MAXIMUM_PACKET_SIZE, Value::U32(x)) => {
                    if x == 0 {
                        return Err(DecodeError::protocol(
                            "MQTT-3.1.2.11.4",
                            "maximum packet size is 0",
                        ));
                    }
                    p.maximum_packet_size = Some(x);
                }
                (id::WILDCARD_SUBSCRIPTION_AVAILABLE, Value::Byte(b)) => {
                    p.wildcard_subscription_available = Some(flag(b, "MQTT-3.2.2.3.11")?);
                }
                (id::SUBSCRIPTION_IDENTIFIER_AVAILABLE, Value::Byte(b)) => {
                    p.subscription_identifier_available = Some(flag(b, "MQTT-3.2.2.3.12")?);
                }
                (id::SHARED_SUBSCRIPTION_AVAILABLE, Value::Byte(b)) => {
                    p.shared_subscription_available = Some(flag(b, "MQTT-3.2.2.3.13")?);
                }
                (id::SUBSCRIPTION_IDENTIFIER, Value::VarInt(x)) => {
                    p.subscription_identifier = Some(subscription_id(x)?);
                }
                (id::USER_PROPERTY, Value::Pair(k, v)) => p.user_properties.push((k, v)),
                _ => return Err(UNREACHABLE),
            }
            Ok(())
        })?;
        Ok(p)
    }

    /// Length of the property block without its length prefix.
    pub fn wire_len(&self) -> usize {
        let s = |s: &ByteString| binary_len(s.as_bytes());
        opt_len(&self.session_expiry_interval, |_| 4)
            + opt_len(&self.assigned_client_identifier, s)
            + opt_len(&self.server_keep_alive, |_| 2)
            + opt_len(&self.authentication_method, s)
            + opt_len(&self.authentication_data, |b| binary_len(b))
            + opt_len(&self.request_problem_information, |_| 1)
            + opt_len(&self.request_response_information, |_| 1)
            + opt_len(&self.response_information, s)
            + opt_len(&self.server_reference, s)
            + opt_len(&self.reason_string, s)
            + opt_len(&self.receive_maximum, |_| 2)
            + opt_len(&self.topic_alias_maximum, |_| 2)
            + opt_len(&self.maximum_qos, |_| 1)
            + opt_len(&self.retain_available, |_| 1)
            + opt_len(&self.maximum_packet_size, |_| 4)
            + opt_len(&self.wildcard_subscription_available, |_| 1)
            + opt_len(&self.subscription_identifier_available, |_| 1)
            + opt_len(&self.shared_subscription_available, |_| 1)
            + opt_len(&self.subscription_identifier, |&x| varint_len(x))
            + user_properties_len(&self.user_properties)
    }

    pub(crate) fn write(&self, buf: &mut BytesMut) -> Result<(), EncodeError> {
        let put_u8 = |buf: &mut BytesMut, ident: u8, v: Option<u8>| {
            if let Some(v) = v {
                buf.put_u8(ident);
                buf.put_u8(v);
            }
        };
        let put_u16 = |buf: &mut BytesMut, ident: u8, v: Option<u16>| {
            if let Some(v) = v {
                buf.put_u8(ident);
                buf.put_u16(v);
            }
        };
        let put_u32 = |buf: &mut BytesMut, ident: u8, v: Option<u32>| {
            if let Some(v) = v {
                buf.put_u8(ident);
                buf.put_u32(v);
            }
        };
        let put_str = |buf: &mut BytesMut, ident: u8, v: Option<&[u8]>, what| {
            if let Some(v) = v {
                buf.put_u8(ident);
                put_binary(buf, v, what)?;
            }
            Ok::<_, EncodeError>(())
        };
        let b = |v: Option<bool>| v.map(u8::from);
        put_u32(
            buf,
            id::SESSION_EXPIRY_INTERVAL,
            self.session_expiry_interval,
        );
        put_str(
            buf,
            id::ASSIGNED_CLIENT_IDENTIFIER,
            self.assigned_client_identifier
                .as_ref()
                .map(|s| s.as_bytes().as_ref()),
            "assigned client identifier",
        )?;
        put_u16(buf, id::SERVER_KEEP_ALIVE, self.server_keep_alive);
        put_str(
            buf,
            id::AUTHENTICATION_METHOD,
            self.authentication_method
                .as_ref()
                .map(|s| s.as_bytes().as_ref()),
            "authentication method",
        )?;
        put_str(
            buf,
            id::AUTHENTICATION_DATA,
            self.authentication_data.as_deref(),
            "authentication data",
        )?;
        put_u8(
            buf,
            id::REQUEST_PROBLEM_INFORMATION,
            b(self.request_problem_information),
        );
        put_u8(
            buf,
            id::REQUEST_RESPONSE_INFORMATION,
            b(self.request_response_information),
        );
        put_str(
            buf,
            id::RESPONSE_INFORMATION,
            self.response_information
                .as_ref()
                .map(|s| s.as_bytes().as_ref()),
            "response information",
        )?;
        put_str(
            buf,
            id::SERVER_REFERENCE,
            self.server_reference
                .as_ref()
                .map(|s| s.as_bytes().as_ref()),
            "server reference",
        )?;
        put_str(
            buf,
            id::REASON_STRING,
            self.reason_string.as_ref().map(|s| s.as_bytes().as_ref()),
            "reason string",
        )?;
        if self.receive_maximum == Some(0) {
            return Err(EncodeError::Invalid("receive maximum 0"));
        }
        put_u16(buf, id::RECEIVE_MAXIMUM, self.receive_maximum);
        put_u16(buf, id::TOPIC_ALIAS_MAXIMUM, self.topic_alias_maximum);
        if self.maximum_qos == Some(QoS::ExactlyOnce) {
            return Err(EncodeError::Invalid(
                "maximum QoS 2 is never sent (§3.2.2.3.4)",
            ));
        }
        put_u8(buf, id::MAXIMUM_QOS, self.maximum_qos.map(|q| q as u8));
        put_u8(buf, id::RETAIN_AVAILABLE, b(self.retain_available));
        if self.maximum_packet_size == Some(0) {
            return Err(EncodeError::Invalid("maximum packet size 0"));
        }
        put_u32(buf, id::MAXIMUM_PACKET_SIZE, self.maximum_packet_size);
        put_u8(
            buf,
            id::WILDCARD_SUBSCRIPTION_AVAILABLE,
            b(self.wildcard_subscription_available),
        );
        put_u8(
            buf,
            id::SUBSCRIPTION_IDENTIFIER_AVAILABLE,
            b(self.subscription_identifier_available),
        );
        put_u8(
            buf,
            id::SHARED_SUBSCRIPTION_AVAILABLE,
            b(self.shared_subscription_available),
        );
        if let Some(x) = self.subscription_identifier {
            if x == 0 || x > crate::primitives::MAX_VARINT {
                return Err(EncodeError::Invalid("subscription identifier out of range"));
            }
            buf.put_u8(id::SUBSCRIPTION_IDENTIFIER);
            put_varint(buf, x);
        }
        write_user_properties(buf, &self.user_properties)
    }
}

fn opt_len<T>(v: &Option<T>, f: impl FnOnce(&T) -> usize) -> usize {
    v.as_ref().map_or(0, |v| 1 + f(v))
}

fn user_properties_len(props: &[(ByteString, ByteString)]) -> usize {
    props
        .iter()
        .map(|(k, v)| 1 + binary_len(k.as_bytes()) + binary_len(v.as_bytes()))
        .sum()
}

fn write_user_properties(
    buf: &mut BytesMut,
    props: &[(ByteString, ByteString)],
) -> Result<(), EncodeError> {
    for (k, v) in props {
        buf.put_u8(id::USER_PROPERTY);
        put_binary(buf, k.as_bytes(), "user property name")?;
        put_binary(buf, v.as_bytes(), "user property value")?;
    }
    Ok(())
}

/// Writes a property block: its variable-byte-integer length, then the properties.
pub(crate) fn write_block(
    buf: &mut BytesMut,
    len: usize,
    write: impl FnOnce(&mut BytesMut) -> Result<(), EncodeError>,
) -> Result<(), EncodeError> {
    let len32 = u32::try_from(len)
        .ok()
        .filter(|&l| l <= crate::primitives::MAX_VARINT)
        .ok_or(EncodeError::PacketTooLarge)?;
    put_varint(buf, len32);
    let before = buf.len();
    write(buf)?;
    debug_assert_eq!(buf.len() - before, len, "property length computed wrongly");
    Ok(())
}

/// Wire length of a property block including its length prefix.
pub(crate) fn block_len(len: usize) -> usize {
    varint_len(u32::try_from(len).unwrap_or(u32::MAX)) + len
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copied_properties_do_not_share_the_decoded_buffer() {
        let wire = Bytes::from_static(b"reply/tocorrtext/plainkv");
        let s = |r: std::ops::Range<usize>| ByteString::try_from(wire.slice(r)).unwrap();
        let p = PublishProperties {
            payload_format_indicator: Some(true),
            message_expiry_interval: Some(9),
            response_topic: Some(TopicName::new(s(0..8)).unwrap()),
            correlation_data: Some(wire.slice(8..12)),
            content_type: Some(s(12..22)),
            user_properties: vec![(s(22..23), s(23..24))],
            ..PublishProperties::default()
        };
        let c = p.copied();
        assert_eq!(c, p);
        let outside = |b: &[u8]| !wire.as_ptr_range().contains(&b.as_ptr());
        // One buffer for all of them, each value where it was decoded in order.
        let base = c.response_topic.as_ref().unwrap().as_str().as_ptr();
        assert_eq!(c.user_properties[0].1.as_ptr(), base.wrapping_add(23));
        assert!(outside(
            c.response_topic.as_ref().unwrap().as_str().as_bytes()
        ));
        assert!(outside(c.correlation_data.as_ref().unwrap()));
        assert!(outside(c.content_type.as_ref().unwrap().as_bytes()));
        assert!(outside(c.user_properties[0].0.as_bytes()));
        assert!(outside(c.user_properties[0].1.as_bytes()));
    }
}
