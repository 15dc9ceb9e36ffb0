//! Sans-IO MQTT 3.1, 3.1.1 and 5.0 wire format: bytes to typed packets and back.
//!
//! - [`decode`] reads one packet from a `BytesMut`: a packet, "need more bytes", or a
//!   [`DecodeError`] that says whether it is malformed (0x81), a protocol error (0x82), too
//!   large (0x95), ..., and which normative statement it breaks.
//! - [`Packet::encode`] writes a packet; [`Packet::encoded_len`] tells its exact size first.
//! - [`TopicName`], [`TopicFilter`] and [`ClientId`] enforce the specification's rules at
//!   construction.
//!
//! No I/O, no clock, no async runtime: the broker and the client drive it.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod decode;
mod encode;
mod error;
mod packet;
mod primitives;
mod properties;
mod reason;
mod topic;

pub use bytes::{Bytes, BytesMut};
pub use bytestring::ByteString;
pub use decode::{
    PlainAck, PlainDecode, decode, decode_first, decode_limited, decode_plain_ack,
    decode_plain_publish,
};
pub use encode::{
    PlainPublish, encode_plain_publish, encode_publish_raw_properties, publish_raw_properties_len,
};
pub use error::{DecodeError, EncodeError, ErrorKind};
pub use packet::*;
pub use primitives::{MAX_VARINT, varint_len};
pub use properties::{AckProperties, Properties, PublishProperties, id as property_id};
pub use reason::ReasonCode;
pub use topic::{TopicError, TopicFilter, TopicName};

/// Largest Remaining Length the fixed header can express (268,435,455 bytes).
pub const MAX_REMAINING_LENGTH: usize = MAX_VARINT as usize;

/// Largest possible MQTT packet: the largest remaining length plus a 5-byte fixed header.
pub const MAX_PACKET_SIZE: u32 = MAX_VARINT + 5;
