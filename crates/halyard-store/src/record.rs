//! The on-disk form of an [`Op`]: one record per op.
//!
//! ```text
//! record := len: u32 LE | crc32: u32 LE (of body) | body[len]
//! body   := version: u8 (= 1) | tag: u8 | fields
//! ```
//! An `apply` call of more than one op is preceded by a batch marker (tag 15, the op
//! count): recovery applies a batch whole or not at all.
//! Integers are LEB128 varints; strings and byte strings are varint-length-prefixed. A
//! message is stored as the MQTT 5 PUBLISH our codec encodes (topic, properties, payload),
//! so its properties reuse the codec's tested encoding.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use halyard_codec::{
    Bytes, BytesMut, Packet, ProtocolVersion, Publish, QoS, RetainHandling, SubscriptionOptions,
    TopicName, decode,
};

use crate::{
    Op, PendingWill, SessionOwner, SessionRecord, StoredDelivery, StoredMessage, SubscriptionRecord,
};

/// Format version of record bodies.
pub const RECORD_VERSION: u8 = 1;
/// Bytes before a record's body.
pub const HEADER_LEN: usize = 8;
/// Largest body accepted on read (a corrupt length must not make us allocate gigabytes).
pub const MAX_BODY_LEN: usize = 300 * 1024 * 1024;

/// Why a record could not be read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RecordError {
    /// The file ends inside the record (a write cut short by a crash).
    Torn,
    /// The checksum does not match.
    Checksum,
    /// The body does not parse (unknown version or tag, bad field).
    Body(&'static str),
}

impl std::fmt::Display for RecordError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RecordError::Torn => f.write_str("torn record (file ends inside it)"),
            RecordError::Checksum => f.write_str("checksum mismatch"),
            RecordError::Body(why) => write!(f, "unreadable record body: {why}"),
        }
    }
}

/// Appends the record for `op` to `out`.
pub fn encode(op: &Op, out: &mut Vec<u8>) {
    let start = out.len();
    out.extend_from_slice(&[0; HEADER_LEN]);
    let mut w = W(out);
    w.u8(RECORD_VERSION);
    match op {
        Op::SessionUpsert(r) => {
            w.u8(1);
            w.str(&r.client_id);
            w.u8(r.protocol.level());
            w.uv(u64::from(r.expiry_interval));
            w.time(r.disconnected_at);
            // Last, so records written before it still read (as `Unknown`).
            match &r.owner {
                SessionOwner::Unknown => {}
                SessionOwner::Anonymous => w.u8(0),
                SessionOwner::User(u) => {
                    w.u8(1);
                    w.str(u.as_str());
                }
            }
        }
        Op::SessionDelete { client_id } => {
            w.u8(2);
            w.str(client_id);
        }
        Op::Subscribe {
            client_id,
            subscription: s,
        } => {
            w.u8(3);
            w.str(client_id);
            w.str(&s.filter);
            w.u8(options_byte(&s.options));
            w.uv(s.identifier.map_or(0, u64::from));
        }
        Op::Unsubscribe { client_id, filter } => {
            w.u8(4);
            w.str(client_id);
            w.str(filter);
        }
        Op::RetainSet(m) => {
            w.u8(5);
            w.message(m);
        }
        Op::RetainDelete { topic } => {
            w.u8(6);
            w.str(topic);
        }
        Op::WillPending { client_id, will } => {
            w.u8(7);
            w.str(client_id);
            match will {
                None => w.u8(0),
                Some(pw) => {
                    w.u8(1);
                    w.u8(u8::from(pw.retain));
                    w.time(Some(pw.due));
                    w.message(&pw.message);
                }
            }
        }
        Op::MessagePut { id, message } => {
            w.u8(8);
            w.uv(*id);
            w.message(message);
        }
        Op::Enqueue {
            client_id,
            delivery: d,
        } => {
            w.u8(9);
            w.str(client_id);
            w.uv(d.message_id);
            w.u8(d.qos as u8 | u8::from(d.retain) << 2);
            w.uv(d.subscription_ids.len() as u64);
            for &i in &d.subscription_ids {
                w.uv(u64::from(i));
            }
            w.str(d.shared.as_deref().unwrap_or(""));
        }
        Op::Dequeue {
            client_id,
            message_id,
        } => {
            w.u8(10);
            w.str(client_id);
            w.uv(*message_id);
        }
        Op::Sent {
            client_id,
            message_id,
            packet_id,
        } => {
            w.u8(11);
            w.str(client_id);
            w.uv(*message_id);
            w.uv(u64::from(*packet_id));
        }
        Op::Released {
            client_id,
            packet_id,
        } => {
            w.u8(12);
            w.str(client_id);
            w.uv(u64::from(*packet_id));
        }
        Op::Completed {
            client_id,
            packet_id,
        } => {
            w.u8(13);
            w.str(client_id);
            w.uv(u64::from(*packet_id));
        }
        Op::InboundQos2 {
            client_id,
            packet_id,
            held,
        } => {
            w.u8(14);
            w.str(client_id);
            w.uv(u64::from(*packet_id));
            w.u8(u8::from(*held));
        }
    }
    seal(out, start);
}

/// Fills in the header (length and checksum) of the record whose body was written after
/// `start`.
fn seal(out: &mut [u8], start: usize) {
    let body_len = out.len() - start - HEADER_LEN;
    let crc = crc32fast::hash(&out[start + HEADER_LEN..]);
    out[start..start + 4].copy_from_slice(&(body_len as u32).to_le_bytes());
    out[start + 4..start + 8].copy_from_slice(&crc.to_le_bytes());
}

/// Tag of the batch marker: "the next `n` records are one `apply` call".
const TAG_BATCH: u8 = 15;

/// A record: an op, or the marker that frames a batch of ops.
// Values live one at a time on the replay loop's stack; boxing the op would cost an
// allocation per record for nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub enum Record {
    /// One change.
    Op(Op),
    /// The next `n` records form one batch: recovery applies all of them or none.
    Batch(u32),
}

/// Appends a batch marker for the `n` op records that follow. A crash can cut a group
/// commit's `write` short (a fatal signal stops a large write between pages); without the
/// marker, recovery would apply the front of a batch — e.g. a QoS 2 message's routing
/// without the held packet id written with it, so the client's resend would be routed twice.
pub fn encode_batch(n: u32, out: &mut Vec<u8>) {
    let start = out.len();
    out.extend_from_slice(&[0; HEADER_LEN]);
    let mut w = W(out);
    w.u8(RECORD_VERSION);
    w.u8(TAG_BATCH);
    w.uv(u64::from(n));
    seal(out, start);
}

/// Reads the record at the front of `buf`, marker or op, and its total length.
pub fn decode_any(buf: &[u8]) -> Result<(Record, usize), RecordError> {
    if buf.get(HEADER_LEN + 1) == Some(&TAG_BATCH) {
        let (mut r, total) = open(buf)?;
        r.u8()?;
        let n = u32::try_from(r.uv()?).map_err(|_| RecordError::Body("batch length"))?;
        return Ok((Record::Batch(n), total));
    }
    decode_record(buf).map(|(op, len)| (Record::Op(op), len))
}

/// Checks the record at the front of `buf` (length, checksum, version): a reader at its
/// tag, and the record's total length.
fn open(buf: &[u8]) -> Result<(R<'_>, usize), RecordError> {
    if buf.len() < HEADER_LEN {
        return Err(RecordError::Torn);
    }
    let len = u32::from_le_bytes(buf[0..4].try_into().unwrap_or_default()) as usize;
    let crc = u32::from_le_bytes(buf[4..8].try_into().unwrap_or_default());
    if len > MAX_BODY_LEN {
        return Err(RecordError::Body("length over the maximum"));
    }
    let Some(body) = buf.get(HEADER_LEN..HEADER_LEN + len) else {
        return Err(RecordError::Torn);
    };
    if crc32fast::hash(body) != crc {
        return Err(RecordError::Checksum);
    }
    let mut r = R(body);
    if r.u8()? != RECORD_VERSION {
        return Err(RecordError::Body("unknown record version"));
    }
    Ok((r, HEADER_LEN + len))
}

/// Reads the record at the front of `buf`: the op and the record's total length.
pub fn decode_record(buf: &[u8]) -> Result<(Op, usize), RecordError> {
    let (mut r, total) = open(buf)?;
    let op = match r.u8()? {
        1 => Op::SessionUpsert(SessionRecord {
            client_id: r.string()?,
            protocol: match r.u8()? {
                3 => ProtocolVersion::V3_1,
                4 => ProtocolVersion::V3_1_1,
                5 => ProtocolVersion::V5,
                _ => return Err(RecordError::Body("protocol level")),
            },
            expiry_interval: u32::try_from(r.uv()?).map_err(|_| RecordError::Body("expiry"))?,
            disconnected_at: r.time()?,
            owner: if r.0.is_empty() {
                SessionOwner::Unknown
            } else {
                match r.u8()? {
                    0 => SessionOwner::Anonymous,
                    1 => SessionOwner::User(r.string()?),
                    _ => return Err(RecordError::Body("session owner")),
                }
            },
        }),
        2 => Op::SessionDelete {
            client_id: r.string()?,
        },
        3 => Op::Subscribe {
            client_id: r.string()?,
            subscription: SubscriptionRecord {
                filter: r.string()?,
                options: options_from(r.u8()?)?,
                identifier: match r.uv()? {
                    0 => None,
                    i => Some(u32::try_from(i).map_err(|_| RecordError::Body("id"))?),
                },
            },
        },
        4 => Op::Unsubscribe {
            client_id: r.string()?,
            filter: r.string()?,
        },
        5 => Op::RetainSet(r.message()?),
        6 => Op::RetainDelete { topic: r.string()? },
        7 => {
            let client_id = r.string()?;
            let will = match r.u8()? {
                0 => None,
                _ => {
                    let retain = r.u8()? != 0;
                    let due = r.time()?.ok_or(RecordError::Body("will due"))?;
                    Some(PendingWill {
                        retain,
                        due,
                        message: r.message()?,
                    })
                }
            };
            Op::WillPending { client_id, will }
        }
        8 => Op::MessagePut {
            id: r.uv()?,
            message: r.message()?,
        },
        9 => {
            let client_id = r.string()?;
            let message_id = r.uv()?;
            let flags = r.u8()?;
            let qos = QoS::from_u8(flags & 3).ok_or(RecordError::Body("qos"))?;
            let n = r.uv()? as usize;
            let mut subscription_ids = Vec::with_capacity(n.min(16));
            for _ in 0..n {
                subscription_ids.push(u32::try_from(r.uv()?).map_err(|_| RecordError::Body("id"))?);
            }
            let shared = r.string()?;
            Op::Enqueue {
                client_id,
                delivery: StoredDelivery {
                    message_id,
                    qos,
                    retain: flags & 4 != 0,
                    subscription_ids,
                    shared: (!shared.is_empty()).then_some(shared),
                },
            }
        }
        10 => Op::Dequeue {
            client_id: r.string()?,
            message_id: r.uv()?,
        },
        11 => Op::Sent {
            client_id: r.string()?,
            message_id: r.uv()?,
            packet_id: r.u16v()?,
        },
        12 => Op::Released {
            client_id: r.string()?,
            packet_id: r.u16v()?,
        },
        13 => Op::Completed {
            client_id: r.string()?,
            packet_id: r.u16v()?,
        },
        14 => Op::InboundQos2 {
            client_id: r.string()?,
            packet_id: r.u16v()?,
            held: r.u8()? != 0,
        },
        _ => return Err(RecordError::Body("unknown tag")),
    };
    if !r.0.is_empty() {
        return Err(RecordError::Body("trailing bytes"));
    }
    Ok((op, total))
}

fn options_byte(o: &SubscriptionOptions) -> u8 {
    o.qos as u8
        | u8::from(o.no_local) << 2
        | u8::from(o.retain_as_published) << 3
        | (o.retain_handling as u8) << 4
}

fn options_from(b: u8) -> Result<SubscriptionOptions, RecordError> {
    Ok(SubscriptionOptions {
        qos: QoS::from_u8(b & 3).ok_or(RecordError::Body("qos"))?,
        no_local: b & 4 != 0,
        retain_as_published: b & 8 != 0,
        retain_handling: match (b >> 4) & 3 {
            0 => RetainHandling::SendOnSubscribe,
            1 => RetainHandling::SendIfNew,
            2 => RetainHandling::DoNotSend,
            _ => return Err(RecordError::Body("retain handling")),
        },
    })
}

struct W<'a>(&'a mut Vec<u8>);

impl W<'_> {
    fn u8(&mut self, b: u8) {
        self.0.push(b);
    }
    fn uv(&mut self, mut v: u64) {
        loop {
            let b = (v & 0x7F) as u8;
            v >>= 7;
            if v == 0 {
                self.0.push(b);
                return;
            }
            self.0.push(b | 0x80);
        }
    }
    fn bytes(&mut self, b: &[u8]) {
        self.uv(b.len() as u64);
        self.0.extend_from_slice(b);
    }
    fn str(&mut self, s: &str) {
        self.bytes(s.as_bytes());
    }
    fn time(&mut self, t: Option<SystemTime>) {
        // 0 = none; otherwise milliseconds since the epoch + 1.
        let ms = t.map_or(0, |t| {
            t.duration_since(UNIX_EPOCH)
                .map_or(1, |d| d.as_millis() as u64 + 1)
        });
        self.uv(ms);
    }
    fn message(&mut self, m: &StoredMessage) {
        self.time(m.expires_at);
        let topic = TopicName::try_from(m.topic.as_str()).unwrap_or_else(|_| TopicName::empty());
        let p = Packet::Publish(Publish {
            qos: m.qos,
            packet_id: if m.qos == QoS::AtMostOnce { 0 } else { 1 },
            properties: m.publish_properties(),
            ..Publish::new(topic, m.payload.clone())
        });
        let mut buf = BytesMut::with_capacity(p.encoded_len(ProtocolVersion::V5));
        // Topics and properties were validated when the message was received; an encode
        // failure leaves an empty field that the reader rejects as a bad record.
        let _ = p.encode(ProtocolVersion::V5, &mut buf);
        self.bytes(&buf);
    }
}

struct R<'a>(&'a [u8]);

impl R<'_> {
    fn u8(&mut self) -> Result<u8, RecordError> {
        let (&b, rest) = self.0.split_first().ok_or(RecordError::Body("short"))?;
        self.0 = rest;
        Ok(b)
    }
    fn uv(&mut self) -> Result<u64, RecordError> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let b = self.u8()?;
            v |= u64::from(b & 0x7F) << shift;
            if b & 0x80 == 0 {
                return Ok(v);
            }
        }
        Err(RecordError::Body("varint too long"))
    }
    fn u16v(&mut self) -> Result<u16, RecordError> {
        u16::try_from(self.uv()?).map_err(|_| RecordError::Body("packet id"))
    }
    fn bytes(&mut self) -> Result<&[u8], RecordError> {
        let n = self.uv()? as usize;
        if n > self.0.len() {
            return Err(RecordError::Body("field past the end"));
        }
        let (b, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(b)
    }
    fn string(&mut self) -> Result<String, RecordError> {
        String::from_utf8(self.bytes()?.to_vec()).map_err(|_| RecordError::Body("utf-8"))
    }
    fn time(&mut self) -> Result<Option<SystemTime>, RecordError> {
        Ok(match self.uv()? {
            0 => None,
            ms => Some(UNIX_EPOCH + Duration::from_millis(ms - 1)),
        })
    }
    fn message(&mut self) -> Result<StoredMessage, RecordError> {
        let expires_at = self.time()?;
        let mut buf = BytesMut::from(self.bytes()?);
        match decode(
            &mut buf,
            ProtocolVersion::V5,
            halyard_codec::MAX_PACKET_SIZE,
        ) {
            Ok(Some(Packet::Publish(p))) if buf.is_empty() => Ok(StoredMessage {
                topic: p.topic.to_string(),
                payload: Bytes::copy_from_slice(&p.payload),
                qos: p.qos,
                properties: StoredMessage::boxed(p.properties),
                expires_at,
            }),
            _ => Err(RecordError::Body("stored message")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use halyard_codec::PublishProperties;

    fn msg() -> StoredMessage {
        StoredMessage {
            topic: "a/b".into(),
            payload: Bytes::from_static(b"payload"),
            qos: QoS::ExactlyOnce,
            properties: StoredMessage::boxed(PublishProperties {
                content_type: Some("text".into()),
                user_properties: vec![("k".into(), "v".into())],
                ..Default::default()
            }),
            expires_at: Some(UNIX_EPOCH + Duration::from_millis(1_700_000_000_123)),
        }
    }

    pub(crate) fn all_ops() -> Vec<Op> {
        let c = || "client-é".to_string();
        vec![
            Op::SessionUpsert(SessionRecord {
                client_id: c(),
                protocol: ProtocolVersion::V5,
                expiry_interval: u32::MAX,
                disconnected_at: Some(UNIX_EPOCH + Duration::from_secs(5)),
                owner: SessionOwner::User("alice".into()),
            }),
            Op::SessionUpsert(SessionRecord {
                client_id: c(),
                protocol: ProtocolVersion::V3_1_1,
                expiry_interval: 60,
                disconnected_at: None,
                owner: SessionOwner::Anonymous,
            }),
            Op::SessionUpsert(SessionRecord {
                client_id: c(),
                protocol: ProtocolVersion::V3_1_1,
                expiry_interval: 60,
                disconnected_at: None,
                owner: SessionOwner::Unknown,
            }),
            Op::SessionDelete { client_id: c() },
            Op::Subscribe {
                client_id: c(),
                subscription: SubscriptionRecord {
                    filter: "$share/g/a/+".into(),
                    options: SubscriptionOptions {
                        qos: QoS::AtLeastOnce,
                        no_local: false,
                        retain_as_published: true,
                        retain_handling: RetainHandling::DoNotSend,
                    },
                    identifier: Some(268_435_455),
                },
            },
            Op::Unsubscribe {
                client_id: c(),
                filter: "x/#".into(),
            },
            Op::RetainSet(msg()),
            Op::RetainDelete {
                topic: "a/b".into(),
            },
            Op::WillPending {
                client_id: c(),
                will: Some(PendingWill {
                    message: msg(),
                    retain: true,
                    due: UNIX_EPOCH + Duration::from_secs(9),
                }),
            },
            Op::WillPending {
                client_id: c(),
                will: None,
            },
            Op::MessagePut {
                id: u64::MAX,
                message: msg(),
            },
            Op::Enqueue {
                client_id: c(),
                delivery: StoredDelivery {
                    message_id: 77,
                    qos: QoS::ExactlyOnce,
                    retain: true,
                    subscription_ids: vec![1, 300],
                    shared: Some("$share/g/t".into()),
                },
            },
            Op::Dequeue {
                client_id: c(),
                message_id: 77,
            },
            Op::Sent {
                client_id: c(),
                message_id: 77,
                packet_id: 65_535,
            },
            Op::Released {
                client_id: c(),
                packet_id: 1,
            },
            Op::Completed {
                client_id: c(),
                packet_id: 2,
            },
            Op::InboundQos2 {
                client_id: c(),
                packet_id: 3,
                held: true,
            },
        ]
    }

    #[test]
    fn every_op_round_trips() {
        for op in all_ops() {
            let mut buf = Vec::new();
            encode(&op, &mut buf);
            let (back, n) = decode_record(&buf).unwrap();
            assert_eq!(n, buf.len());
            assert_eq!(back, op);
        }
    }

    #[test]
    fn torn_and_corrupt_records_are_detected() {
        let mut buf = Vec::new();
        encode(&all_ops()[4], &mut buf);
        for cut in 0..buf.len() {
            assert_eq!(
                decode_record(&buf[..cut]).unwrap_err(),
                RecordError::Torn,
                "cut {cut}"
            );
        }
        for i in HEADER_LEN..buf.len() {
            let mut bad = buf.clone();
            bad[i] ^= 0x20;
            assert_eq!(
                decode_record(&bad).unwrap_err(),
                RecordError::Checksum,
                "flip {i}"
            );
        }
    }
}
