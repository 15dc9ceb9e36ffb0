//! Typed MQTT control packets. One set of types serves all protocol versions: fields that
//! exist only in MQTT 5 (properties, most reason codes) are ignored when encoding for 3.x and
//! left at their defaults when decoding 3.x.

use bytes::Bytes;
use bytestring::ByteString;

use crate::properties::{AckProperties, Properties, PublishProperties};
use crate::{ReasonCode, TopicFilter, TopicName};

/// The protocol level negotiated by CONNECT.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ProtocolVersion {
    /// MQTT 3.1: protocol name "MQIsdp", level 3.
    V3_1 = 3,
    /// MQTT 3.1.1: protocol name "MQTT", level 4.
    V3_1_1 = 4,
    /// MQTT 5.0: protocol name "MQTT", level 5.
    V5 = 5,
}

impl ProtocolVersion {
    /// True for MQTT 5.0.
    pub const fn is_v5(self) -> bool {
        matches!(self, ProtocolVersion::V5)
    }
    /// The Protocol Level byte of CONNECT.
    pub const fn level(self) -> u8 {
        self as u8
    }
    /// The Protocol Name of CONNECT.
    pub const fn protocol_name(self) -> &'static str {
        match self {
            ProtocolVersion::V3_1 => "MQIsdp",
            _ => "MQTT",
        }
    }
}

/// Quality of service.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub enum QoS {
    /// QoS 0: fire and forget.
    #[default]
    AtMostOnce = 0,
    /// QoS 1: acknowledged with PUBACK.
    AtLeastOnce = 1,
    /// QoS 2: PUBREC / PUBREL / PUBCOMP.
    ExactlyOnce = 2,
}

impl QoS {
    /// The QoS for a two-bit value (3 is not a QoS).
    pub const fn from_u8(v: u8) -> Option<QoS> {
        match v {
            0 => Some(QoS::AtMostOnce),
            1 => Some(QoS::AtLeastOnce),
            2 => Some(QoS::ExactlyOnce),
            _ => None,
        }
    }
}

/// A client identifier: an MQTT UTF-8 string, possibly empty (the client then asks the
/// server to assign one). Length limits beyond 65,535 bytes are the server's policy.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct ClientId(pub(crate) ByteString);

impl ClientId {
    /// Wraps a string; fails on U+0000 [MQTT-1.5.4-2] or more than 65,535 bytes.
    pub fn new(s: impl Into<ByteString>) -> Result<Self, crate::EncodeError> {
        let s = s.into();
        if s.len() > usize::from(u16::MAX) {
            return Err(crate::EncodeError::FieldTooLong("client identifier"));
        }
        if s.as_bytes().contains(&0) {
            return Err(crate::EncodeError::Invalid(
                "client identifier contains U+0000",
            ));
        }
        Ok(ClientId(s))
    }
    /// The identifier.
    pub fn as_str(&self) -> &str {
        &self.0
    }
    /// True when the client asked for a server-assigned identifier.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
    /// Whether every server must accept it: 1 to 23 characters of `0-9a-zA-Z`
    /// [MQTT-3.1.3-5].
    pub fn is_always_allowed(&self) -> bool {
        (1..=23).contains(&self.0.len()) && self.0.bytes().all(|b| b.is_ascii_alphanumeric())
    }
}

impl std::fmt::Display for ClientId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// CONNECT (section 3.1).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Connect {
    /// Protocol name and level; encoding always uses this, whatever version it is asked for.
    pub protocol: ProtocolVersion,
    /// Mosquitto's bridge bit (3.1/3.1.1 only: protocol level with 0x80 set): the client is
    /// a bridge; its subscriptions act as No Local and Retain As Published.
    pub bridge: bool,
    /// Clean Start (v5) / Clean Session (3.x).
    pub clean_start: bool,
    /// Keep alive in seconds; 0 turns the mechanism off.
    pub keep_alive: u16,
    /// The client identifier (may be empty).
    pub client_id: ClientId,
    /// The will message, if any.
    pub will: Option<Will>,
    /// User name.
    pub username: Option<ByteString>,
    /// Password (binary data).
    pub password: Option<Bytes>,
    /// CONNECT properties (v5).
    pub properties: Properties,
}

/// A will message carried by CONNECT (section 3.1.3.2 - 3.1.3.4).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Will {
    /// Will Topic.
    pub topic: TopicName,
    /// Will Payload.
    pub payload: Bytes,
    /// Will QoS.
    pub qos: QoS,
    /// Will Retain.
    pub retain: bool,
    /// Will Delay Interval in seconds (v5 property 0x18).
    pub delay_interval: Option<u32>,
    /// The other will properties (v5); topic alias and subscription identifiers never apply.
    pub properties: PublishProperties,
}

/// CONNACK (section 3.2). For 3.x the reason is mapped to and from the return codes 0-5.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnAck {
    /// Session Present.
    pub session_present: bool,
    /// Connect Reason Code (v5) or the mapped return code (3.x).
    pub reason: ReasonCode,
    /// CONNACK properties (v5).
    pub properties: Properties,
}

/// PUBLISH (section 3.3).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Publish {
    /// DUP flag: this may be a redelivery.
    pub dup: bool,
    /// QoS.
    pub qos: QoS,
    /// RETAIN flag.
    pub retain: bool,
    /// Topic name; empty only when a v5 Topic Alias stands in for it [MQTT-3.3.2-1].
    pub topic: TopicName,
    /// Packet identifier: non-zero for QoS 1 and 2, 0 (and not sent) for QoS 0.
    pub packet_id: u16,
    /// Typed PUBLISH properties (v5).
    pub properties: PublishProperties,
    /// The v5 property block exactly as received, so it can be forwarded unchanged
    /// (empty when encoded by us or for 3.x). Encoding writes `properties`, never this; see
    /// [`crate::encode_publish_raw_properties`] to send these bytes.
    pub raw_properties: Bytes,
    /// Application payload: a slice of the read buffer, never copied.
    pub payload: Bytes,
}

impl Publish {
    /// A QoS 0, non-retained PUBLISH with no properties.
    pub fn new(topic: TopicName, payload: impl Into<Bytes>) -> Self {
        Publish {
            dup: false,
            qos: QoS::AtMostOnce,
            retain: false,
            topic,
            packet_id: 0,
            properties: PublishProperties::default(),
            raw_properties: Bytes::new(),
            payload: payload.into(),
        }
    }
}

/// PUBACK, PUBREC, PUBREL and PUBCOMP share this shape (sections 3.4 - 3.7).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ack {
    /// Packet identifier of the PUBLISH (or PUBREL) being answered.
    pub packet_id: u16,
    /// Reason code (v5; always Success in 3.x).
    pub reason: ReasonCode,
    /// Properties (v5).
    pub properties: AckProperties,
}

impl Ack {
    /// A successful acknowledgement without properties.
    pub fn new(packet_id: u16) -> Self {
        Ack {
            packet_id,
            reason: ReasonCode::Success,
            properties: AckProperties::default(),
        }
    }
}

/// Retain Handling subscription option (section 3.8.3.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum RetainHandling {
    /// 0: send retained messages at the time of the subscribe.
    #[default]
    SendOnSubscribe = 0,
    /// 1: send them only if the subscription did not exist.
    SendIfNew = 1,
    /// 2: do not send them.
    DoNotSend = 2,
}

/// Options of one subscription (section 3.8.3.1). Only `qos` exists in 3.x.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct SubscriptionOptions {
    /// Maximum QoS.
    pub qos: QoS,
    /// Do not send the client its own messages (v5).
    pub no_local: bool,
    /// Keep the RETAIN flag as published (v5).
    pub retain_as_published: bool,
    /// When to send retained messages (v5).
    pub retain_handling: RetainHandling,
}

/// SUBSCRIBE (section 3.8).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Subscribe {
    /// Packet identifier (non-zero).
    pub packet_id: u16,
    /// At least one filter with its options [MQTT-3.8.3-3].
    pub filters: Vec<(TopicFilter, SubscriptionOptions)>,
    /// Subscription Identifier and User Properties (v5).
    pub properties: Properties,
}

/// SUBACK (section 3.9). For 3.x, failure codes are sent as 0x80.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubAck {
    /// Packet identifier of the SUBSCRIBE.
    pub packet_id: u16,
    /// One reason code per filter, in order.
    pub reasons: Vec<ReasonCode>,
    /// Properties (v5).
    pub properties: AckProperties,
}

/// UNSUBSCRIBE (section 3.10).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unsubscribe {
    /// Packet identifier (non-zero).
    pub packet_id: u16,
    /// At least one filter [MQTT-3.10.3-2].
    pub filters: Vec<TopicFilter>,
    /// User Properties (v5).
    pub properties: Properties,
}

/// UNSUBACK (section 3.11). 3.x carries no reason codes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnsubAck {
    /// Packet identifier of the UNSUBSCRIBE.
    pub packet_id: u16,
    /// One reason code per filter (v5; empty for 3.x).
    pub reasons: Vec<ReasonCode>,
    /// Properties (v5).
    pub properties: AckProperties,
}

/// DISCONNECT (section 3.14). 3.x carries neither reason nor properties.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Disconnect {
    /// Reason code (v5).
    pub reason: ReasonCode,
    /// Session Expiry Interval, Reason String, Server Reference, User Properties (v5).
    pub properties: Properties,
}

impl Disconnect {
    /// A DISCONNECT with this reason and no properties.
    pub fn new(reason: ReasonCode) -> Self {
        Disconnect {
            reason,
            properties: Properties::default(),
        }
    }
}

/// AUTH (section 3.15, MQTT 5 only).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Auth {
    /// Success, Continue authentication or Re-authenticate.
    pub reason: ReasonCode,
    /// Authentication Method / Data, Reason String, User Properties.
    pub properties: Properties,
}

/// Any MQTT control packet.
#[derive(Debug, Clone, PartialEq, Eq)]
#[allow(missing_docs)]
pub enum Packet {
    Connect(Box<Connect>),
    ConnAck(ConnAck),
    Publish(Publish),
    PubAck(Ack),
    PubRec(Ack),
    PubRel(Ack),
    PubComp(Ack),
    Subscribe(Subscribe),
    SubAck(SubAck),
    Unsubscribe(Unsubscribe),
    UnsubAck(UnsubAck),
    PingReq,
    PingResp,
    Disconnect(Disconnect),
    Auth(Auth),
}

impl Packet {
    /// The packet's name, for logs.
    pub fn name(&self) -> &'static str {
        match self {
            Packet::Connect(_) => "CONNECT",
            Packet::ConnAck(_) => "CONNACK",
            Packet::Publish(_) => "PUBLISH",
            Packet::PubAck(_) => "PUBACK",
            Packet::PubRec(_) => "PUBREC",
            Packet::PubRel(_) => "PUBREL",
            Packet::PubComp(_) => "PUBCOMP",
            Packet::Subscribe(_) => "SUBSCRIBE",
            Packet::SubAck(_) => "SUBACK",
            Packet::Unsubscribe(_) => "UNSUBSCRIBE",
            Packet::UnsubAck(_) => "UNSUBACK",
            Packet::PingReq => "PINGREQ",
            Packet::PingResp => "PINGRESP",
            Packet::Disconnect(_) => "DISCONNECT",
            Packet::Auth(_) => "AUTH",
        }
    }
}
