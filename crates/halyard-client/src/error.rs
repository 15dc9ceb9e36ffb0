//! What can go wrong, in terms a caller can act on.

use std::fmt;
use std::io;

use halyard_codec::{ReasonCode, TopicError};

/// Errors from the client.
#[derive(Debug)]
#[non_exhaustive]
pub enum Error {
    /// Connecting failed: DNS, TCP, TLS or WebSocket (the URL tried is in the message).
    Connect(io::Error),
    /// The broker refused the connection with this CONNACK reason code.
    Refused {
        /// CONNACK reason code (3.x return codes are mapped to their v5 equivalents).
        reason: ReasonCode,
        /// The broker's Reason String, if it sent one.
        reason_string: Option<String>,
    },
    /// The broker answered a PUBLISH, SUBSCRIBE or UNSUBSCRIBE with a failure reason code.
    Rejected {
        /// The reason code (0x80 or above).
        reason: ReasonCode,
        /// The broker's Reason String, if it sent one.
        reason_string: Option<String>,
    },
    /// The client was closed (by [`crate::Client::disconnect`] or because every handle was
    /// dropped), or it gave up connecting because reconnecting is off.
    Closed,
    /// The bounded outgoing queue is full (the broker is away or slower than the caller).
    QueueFull,
    /// No answer in time.
    Timeout,
    /// A topic name or filter that breaks the specification.
    InvalidTopic(TopicError),
    /// The message is larger than the broker's Maximum Packet Size.
    PacketTooLarge {
        /// Encoded size of the PUBLISH.
        size: usize,
        /// The broker's limit.
        max: u32,
    },
    /// The broker does not accept this (QoS above its Maximum QoS, retain unavailable, ...).
    NotSupported(&'static str),
    /// The broker broke the protocol or the connection dropped in a way worth reporting.
    Protocol(String),
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Connect(e) => write!(f, "connection failed: {e}"),
            Error::Refused {
                reason,
                reason_string,
            } => {
                write!(
                    f,
                    "connection refused: {} (0x{:02X})",
                    reason_text(*reason),
                    *reason as u8
                )?;
                if let Some(s) = reason_string {
                    write!(f, ": {s}")?;
                }
                Ok(())
            }
            Error::Rejected {
                reason,
                reason_string,
            } => {
                write!(
                    f,
                    "rejected by the broker: {} (0x{:02X})",
                    reason_text(*reason),
                    *reason as u8
                )?;
                if let Some(s) = reason_string {
                    write!(f, ": {s}")?;
                }
                Ok(())
            }
            Error::Closed => f.write_str("the client is closed"),
            Error::QueueFull => f.write_str("the outgoing queue is full"),
            Error::Timeout => f.write_str("timed out"),
            Error::InvalidTopic(e) => write!(f, "invalid topic: {e}"),
            Error::PacketTooLarge { size, max } => write!(
                f,
                "message of {size} bytes exceeds the broker's maximum packet size of {max}"
            ),
            Error::NotSupported(what) => write!(f, "not supported by the broker: {what}"),
            Error::Protocol(s) => write!(f, "protocol error: {s}"),
        }
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Error::Connect(e) => Some(e),
            Error::InvalidTopic(e) => Some(e),
            _ => None,
        }
    }
}

impl From<TopicError> for Error {
    fn from(e: TopicError) -> Self {
        Error::InvalidTopic(e)
    }
}

/// Human words for a reason code, as mosquitto's clients print them.
pub fn reason_text(r: ReasonCode) -> &'static str {
    use ReasonCode as R;
    match r {
        R::Success => "Success",
        R::GrantedQoS1 => "Granted QoS 1",
        R::GrantedQoS2 => "Granted QoS 2",
        R::DisconnectWithWillMessage => "Disconnect with Will Message",
        R::NoMatchingSubscribers => "No matching subscribers",
        R::NoSubscriptionExisted => "No subscription existed",
        R::ContinueAuthentication => "Continue authentication",
        R::ReAuthenticate => "Re-authenticate",
        R::UnspecifiedError => "Unspecified error",
        R::MalformedPacket => "Malformed Packet",
        R::ProtocolError => "Protocol Error",
        R::ImplementationSpecificError => "Implementation specific error",
        R::UnsupportedProtocolVersion => "Unsupported Protocol Version",
        R::ClientIdentifierNotValid => "Client Identifier not valid",
        R::BadUserNameOrPassword => "Bad User Name or Password",
        R::NotAuthorized => "Not authorized",
        R::ServerUnavailable => "Server unavailable",
        R::ServerBusy => "Server busy",
        R::Banned => "Banned",
        R::ServerShuttingDown => "Server shutting down",
        R::BadAuthenticationMethod => "Bad authentication method",
        R::KeepAliveTimeout => "Keep Alive timeout",
        R::SessionTakenOver => "Session taken over",
        R::TopicFilterInvalid => "Topic Filter invalid",
        R::TopicNameInvalid => "Topic Name invalid",
        R::PacketIdentifierInUse => "Packet Identifier in use",
        R::PacketIdentifierNotFound => "Packet Identifier not found",
        R::ReceiveMaximumExceeded => "Receive Maximum exceeded",
        R::TopicAliasInvalid => "Topic Alias invalid",
        R::PacketTooLarge => "Packet too large",
        R::MessageRateTooHigh => "Message rate too high",
        R::QuotaExceeded => "Quota exceeded",
        R::AdministrativeAction => "Administrative action",
        R::PayloadFormatInvalid => "Payload format invalid",
        R::RetainNotSupported => "Retain not supported",
        R::QoSNotSupported => "QoS not supported",
        R::UseAnotherServer => "Use another server",
        R::ServerMoved => "Server moved",
        R::SharedSubscriptionsNotSupported => "Shared Subscriptions not supported",
        R::ConnectionRateExceeded => "Connection rate exceeded",
        R::MaximumConnectTime => "Maximum connect time",
        R::SubscriptionIdentifiersNotSupported => "Subscription identifiers not supported",
        R::WildcardSubscriptionsNotSupported => "Wildcard Subscriptions not supported",
    }
}
