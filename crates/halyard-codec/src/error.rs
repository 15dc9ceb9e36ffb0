//! Decode and encode errors.
//!
//! A decode error says what goes on the wire (through [`DecodeError::reason_code`]) and which
//! rule of the specification was broken, so that the broker can log it and answer with the
//! right CONNACK / DISCONNECT without knowing codec internals.

use std::fmt;

use crate::{ProtocolVersion, ReasonCode};

/// The class of a decode failure; each maps to one MQTT 5 reason code.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorKind {
    /// The bytes cannot be parsed as the specification defines them (0x81).
    Malformed,
    /// Parsed, but the data is not allowed by the protocol (0x82).
    Protocol,
    /// The declared packet size is over the receiver's Maximum Packet Size (0x95).
    PacketTooLarge,
    /// CONNECT with a protocol name or level we do not speak (v5 0x84, v3.1.1 return code 0x01).
    UnsupportedProtocolVersion,
    /// A Topic Alias of zero (0x94).
    TopicAliasInvalid,
    /// More user properties in one packet than the receiver decodes (0x97): refused before
    /// they are built, since each costs far more in memory than on the wire.
    UserPropertiesOverLimit,
}

impl ErrorKind {
    /// The MQTT 5 reason code a DISCONNECT (or CONNACK) carries for this error.
    pub const fn reason_code(self) -> ReasonCode {
        match self {
            ErrorKind::Malformed => ReasonCode::MalformedPacket,
            ErrorKind::Protocol => ReasonCode::ProtocolError,
            ErrorKind::PacketTooLarge => ReasonCode::PacketTooLarge,
            ErrorKind::UnsupportedProtocolVersion => ReasonCode::UnsupportedProtocolVersion,
            ErrorKind::TopicAliasInvalid => ReasonCode::TopicAliasInvalid,
            ErrorKind::UserPropertiesOverLimit => ReasonCode::QuotaExceeded,
        }
    }
}

/// Why a packet could not be decoded. After an error the stream is out of sync: the
/// connection must be closed (after a DISCONNECT / CONNACK carrying [`Self::reason_code`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DecodeError {
    /// What class of error this is.
    pub kind: ErrorKind,
    /// The normative statement broken, as in the specification (`MQTT-3.3.2-2`), or the
    /// section that defines the field (`MQTT-1.5.5`) where no numbered statement exists.
    pub rule: &'static str,
    /// A short human-readable description of the problem.
    pub detail: &'static str,
    /// The protocol version the failing packet was read under, when known. For a CONNECT
    /// this is the level it declared (if we speak it): the broker answers in that format.
    pub version: Option<ProtocolVersion>,
}

impl DecodeError {
    pub(crate) const fn new(kind: ErrorKind, rule: &'static str, detail: &'static str) -> Self {
        DecodeError {
            kind,
            rule,
            detail,
            version: None,
        }
    }
    pub(crate) const fn malformed(rule: &'static str, detail: &'static str) -> Self {
        Self::new(ErrorKind::Malformed, rule, detail)
    }
    pub(crate) const fn protocol(rule: &'static str, detail: &'static str) -> Self {
        Self::new(ErrorKind::Protocol, rule, detail)
    }
    /// The MQTT 5 reason code to send before closing.
    pub const fn reason_code(&self) -> ReasonCode {
        self.kind.reason_code()
    }
    /// True for 0x81 Malformed Packet.
    pub fn is_malformed(&self) -> bool {
        self.kind == ErrorKind::Malformed
    }
    /// True for 0x82 Protocol Error.
    pub fn is_protocol_error(&self) -> bool {
        self.kind == ErrorKind::Protocol
    }
}

impl fmt::Display for DecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let what = match self.kind {
            ErrorKind::Malformed => "malformed packet",
            ErrorKind::Protocol => "protocol error",
            ErrorKind::PacketTooLarge => "packet too large",
            ErrorKind::UnsupportedProtocolVersion => "unsupported protocol version",
            ErrorKind::TopicAliasInvalid => "topic alias invalid",
            ErrorKind::UserPropertiesOverLimit => "too many user properties",
        };
        write!(
            f,
            "{what} (0x{:02X}) [{}]: {}",
            self.reason_code() as u8,
            self.rule,
            self.detail
        )
    }
}

impl std::error::Error for DecodeError {}

/// Why a packet could not be encoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EncodeError {
    /// A string or binary field is longer than 65,535 bytes.
    FieldTooLong(&'static str),
    /// The packet's remaining length would exceed 268,435,455 bytes.
    PacketTooLarge,
    /// The packet does not exist in the protocol version asked for (e.g. AUTH in 3.1.1).
    NotInVersion(&'static str),
    /// A value the specification forbids (e.g. packet identifier 0 on a QoS 1 PUBLISH).
    Invalid(&'static str),
}

impl fmt::Display for EncodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            EncodeError::FieldTooLong(what) => write!(f, "{what} is longer than 65535 bytes"),
            EncodeError::PacketTooLarge => f.write_str("packet exceeds 268435455 bytes"),
            EncodeError::NotInVersion(what) => write!(f, "{what} does not exist in this version"),
            EncodeError::Invalid(what) => write!(f, "invalid value: {what}"),
        }
    }
}

impl std::error::Error for EncodeError {}
