//! Data representations of section 1.5: integers, variable byte integers, UTF-8 strings,
//! binary data, string pairs. Reading works on a `Bytes` holding exactly one packet body, so
//! strings and binary fields are zero-copy slices of the read buffer.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use bytestring::ByteString;

use crate::error::{DecodeError, EncodeError};

/// Largest value a variable byte integer can carry (4 bytes) [MQTT-1.5.5].
pub const MAX_VARINT: u32 = 268_435_455;

const TRUNCATED: DecodeError =
    DecodeError::malformed("MQTT-2.1.4", "a field runs past the end of the packet");

/// Reads fields from one packet body; every read checks the remaining length first.
#[derive(Debug)]
pub(crate) struct Reader {
    buf: Bytes,
    /// User properties this packet may still hold (see `decode_limited`): each costs far
    /// more decoded than its 5-byte minimum on the wire.
    pub(crate) user_properties_left: u32,
}

impl Reader {
    pub(crate) fn new(buf: Bytes) -> Self {
        Reader {
            buf,
            user_properties_left: u32::MAX,
        }
    }
    pub(crate) fn remaining(&self) -> usize {
        self.buf.len()
    }
    pub(crate) fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }
    pub(crate) fn u8(&mut self) -> Result<u8, DecodeError> {
        if self.buf.is_empty() {
            return Err(TRUNCATED);
        }
        Ok(self.buf.get_u8())
    }
    pub(crate) fn u16(&mut self) -> Result<u16, DecodeError> {
        if self.buf.len() < 2 {
            return Err(TRUNCATED);
        }
        Ok(self.buf.get_u16())
    }
    pub(crate) fn u32(&mut self) -> Result<u32, DecodeError> {
        if self.buf.len() < 4 {
            return Err(TRUNCATED);
        }
        Ok(self.buf.get_u32())
    }
    /// A variable byte integer inside a packet body (property lengths, subscription ids).
    pub(crate) fn varint(&mut self) -> Result<u32, DecodeError> {
        match decode_varint(&self.buf) {
            VarInt::Value(v, n) => {
                self.buf.advance(n);
                Ok(v)
            }
            VarInt::Incomplete => Err(TRUNCATED),
            VarInt::TooLong => Err(VARINT_TOO_LONG),
        }
    }
    pub(crate) fn take(&mut self, n: usize) -> Result<Bytes, DecodeError> {
        if self.buf.len() < n {
            return Err(TRUNCATED);
        }
        Ok(self.buf.split_to(n))
    }
    /// Everything left (a PUBLISH payload).
    pub(crate) fn rest(&mut self) -> Bytes {
        std::mem::take(&mut self.buf)
    }
    /// Binary Data: two-byte length then that many bytes [MQTT-1.5.6].
    pub(crate) fn binary(&mut self) -> Result<Bytes, DecodeError> {
        let n = self.u16()? as usize;
        self.take(n)
    }
    /// UTF-8 Encoded String [MQTT-1.5.4].
    pub(crate) fn string(&mut self) -> Result<ByteString, DecodeError> {
        let raw = self.binary()?;
        utf8(raw)
    }
}

pub(crate) const VARINT_TOO_LONG: DecodeError =
    DecodeError::malformed("MQTT-1.5.5", "variable byte integer longer than 4 bytes");

/// Validates the string rules of section 1.5.4 and wraps without copying.
pub(crate) fn utf8(raw: Bytes) -> Result<ByteString, DecodeError> {
    // [MQTT-1.5.4-1]: well-formed UTF-8; this also rejects encoded surrogates U+D800..U+DFFF.
    let s = ByteString::try_from(raw)
        .map_err(|_| DecodeError::malformed("MQTT-1.5.4-1", "string is not well-formed UTF-8"))?;
    // [MQTT-1.5.4-2]: must not include U+0000.
    if s.as_bytes().contains(&0) {
        return Err(DecodeError::malformed(
            "MQTT-1.5.4-2",
            "string contains the null character U+0000",
        ));
    }
    Ok(s)
}

/// Outcome of reading a variable byte integer from the front of a buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum VarInt {
    /// The value and how many bytes it took.
    Value(u32, usize),
    /// The buffer ends before the last byte.
    Incomplete,
    /// A fifth byte would be needed [MQTT-1.5.5].
    TooLong,
}

pub(crate) fn decode_varint(buf: &[u8]) -> VarInt {
    let mut value: u32 = 0;
    for i in 0..4 {
        let Some(&b) = buf.get(i) else {
            return VarInt::Incomplete;
        };
        value |= u32::from(b & 0x7F) << (7 * i);
        if b & 0x80 == 0 {
            return VarInt::Value(value, i + 1);
        }
    }
    VarInt::TooLong
}

/// Bytes a variable byte integer takes on the wire.
pub const fn varint_len(v: u32) -> usize {
    match v {
        0..=127 => 1,
        128..=16_383 => 2,
        16_384..=2_097_151 => 3,
        _ => 4,
    }
}

pub(crate) fn put_varint(buf: &mut BytesMut, mut v: u32) {
    debug_assert!(v <= MAX_VARINT);
    loop {
        let mut b = (v & 0x7F) as u8;
        v >>= 7;
        if v > 0 {
            b |= 0x80;
        }
        buf.put_u8(b);
        if v == 0 {
            break;
        }
    }
}

/// Writes a two-byte length prefix and the bytes; `what` names the field in the error.
pub(crate) fn put_binary(
    buf: &mut BytesMut,
    b: &[u8],
    what: &'static str,
) -> Result<(), EncodeError> {
    let n = u16::try_from(b.len()).map_err(|_| EncodeError::FieldTooLong(what))?;
    buf.put_u16(n);
    buf.put_slice(b);
    Ok(())
}

/// Wire length of a length-prefixed string or binary field.
pub(crate) const fn binary_len(b: &[u8]) -> usize {
    2 + b.len()
}
