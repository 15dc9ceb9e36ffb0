//! Decode/encode micro-benchmarks: `cargo bench -p halyard-codec`.
//! Results are recorded in docs/benchmarks.md.

use divan::{Bencher, black_box};
use halyard_codec::*;

fn main() {
    divan::main();
}

fn qos0_64() -> Packet {
    Packet::Publish(Publish::new(
        TopicName::try_from("sensors/room1/temperature").unwrap(),
        Bytes::from(vec![0x42u8; 64]),
    ))
}

fn qos1_props_64() -> Packet {
    Packet::Publish(Publish {
        qos: QoS::AtLeastOnce,
        packet_id: 4242,
        properties: PublishProperties {
            payload_format_indicator: Some(true),
            message_expiry_interval: Some(3600),
            response_topic: Some(TopicName::try_from("replies/client-7").unwrap()),
            correlation_data: Some(Bytes::from_static(b"0123456789abcdef")),
            content_type: Some(ByteString::from_static("application/json")),
            user_properties: vec![
                (
                    ByteString::from_static("trace"),
                    ByteString::from_static("abc123"),
                ),
                (
                    ByteString::from_static("tenant"),
                    ByteString::from_static("acme"),
                ),
            ],
            ..Default::default()
        },
        ..Publish::new(
            TopicName::try_from("sensors/room1/temperature").unwrap(),
            Bytes::from(vec![0x42u8; 64]),
        )
    })
}

fn connect() -> Packet {
    Packet::Connect(Box::new(Connect {
        protocol: ProtocolVersion::V5,
        bridge: false,
        clean_start: false,
        keep_alive: 60,
        client_id: ClientId::new("bench-client-000001").unwrap(),
        will: Some(Will {
            topic: TopicName::try_from("clients/bench-client-000001/status").unwrap(),
            payload: Bytes::from_static(b"offline"),
            qos: QoS::AtLeastOnce,
            retain: true,
            delay_interval: Some(5),
            properties: PublishProperties::default(),
        }),
        username: Some(ByteString::from_static("user")),
        password: Some(Bytes::from_static(b"secret-password")),
        properties: Properties {
            session_expiry_interval: Some(3600),
            receive_maximum: Some(100),
            maximum_packet_size: Some(1 << 20),
            topic_alias_maximum: Some(16),
            ..Default::default()
        },
    }))
}

fn cases() -> [(&'static str, Packet, ProtocolVersion); 4] {
    [
        ("publish_qos0_64B_v311", qos0_64(), ProtocolVersion::V3_1_1),
        ("publish_qos0_64B_v5", qos0_64(), ProtocolVersion::V5),
        (
            "publish_qos1_64B_props_v5",
            qos1_props_64(),
            ProtocolVersion::V5,
        ),
        ("connect_v5_will_auth", connect(), ProtocolVersion::V5),
    ]
}

const NAMES: [&str; 4] = [
    "publish_qos0_64B_v311",
    "publish_qos0_64B_v5",
    "publish_qos1_64B_props_v5",
    "connect_v5_will_auth",
];

fn case(name: &str) -> (Packet, ProtocolVersion) {
    let (_, p, v) = cases().into_iter().find(|(n, _, _)| *n == name).unwrap();
    (p, v)
}

#[divan::bench(args = NAMES)]
fn decode_packet(bencher: Bencher<'_, '_>, name: &str) {
    let (p, v) = case(name);
    let mut wire = BytesMut::new();
    p.encode(v, &mut wire).unwrap();
    let wire = wire.freeze();
    bencher
        .with_inputs(|| BytesMut::from(&wire[..]))
        .bench_local_refs(|buf| black_box(decode(buf, v, MAX_PACKET_SIZE).unwrap()));
}

#[divan::bench(args = NAMES)]
fn encode_packet(bencher: Bencher<'_, '_>, name: &str) {
    let (p, v) = case(name);
    let mut out = BytesMut::with_capacity(4096);
    bencher.bench_local(|| {
        out.clear();
        black_box(&p).encode(v, &mut out).unwrap();
        black_box(out.len())
    });
}

#[divan::bench(args = NAMES)]
fn encoded_len(bencher: Bencher<'_, '_>, name: &str) {
    let (p, v) = case(name);
    bencher.bench_local(|| black_box(&p).encoded_len(v));
}
