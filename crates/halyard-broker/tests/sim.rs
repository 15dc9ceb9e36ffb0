//! Timing rules checked at exact instants with the deterministic simulator
//! (`halyard_broker::sim`): bytes in, bytes out, a virtual clock, no runtime and no
//! sleeping. For MQTT 3.1.1 and 5.0.

mod common;

use std::time::Duration;

use common::*;
use halyard_broker::BrokerConfig;
use halyard_broker::sim::{Conn, Sim};
use halyard_codec::*;

fn bytes(p: &Packet, v: ProtocolVersion) -> Vec<u8> {
    let mut b = BytesMut::new();
    p.encode(v, &mut b).unwrap();
    b.to_vec()
}

/// Everything the broker wrote to `c` since last asked, decoded.
fn packets(sim: &mut Sim, c: Conn, v: ProtocolVersion) -> Vec<Packet> {
    let mut buf = BytesMut::from(&sim.output(c)[..]);
    let mut out = Vec::new();
    while let Some(p) = decode(&mut buf, v, MAX_PACKET_SIZE).unwrap() {
        out.push(p);
    }
    assert!(buf.is_empty(), "a partial packet was written");
    out
}

fn open(sim: &mut Sim, v: ProtocolVersion, p: &Packet) -> (Conn, ConnAck) {
    let c = sim.open(&bytes(p, v));
    match packets(sim, c, v).as_slice() {
        [Packet::ConnAck(a)] => (c, a.clone()),
        other => panic!("expected a CONNACK, got {other:?}"),
    }
}

fn online(sim: &mut Sim, v: ProtocolVersion, id: &str) -> Conn {
    let (c, ack) = open(sim, v, &connect(v, id, true, 0));
    assert_eq!(ack.reason, ReasonCode::Success);
    c
}

fn subscribed(sim: &mut Sim, v: ProtocolVersion, id: &str, filter: &str, qos: QoS) -> Conn {
    let c = online(sim, v, id);
    sim.send(c, &bytes(&subscribe(1, filter, qos), v));
    assert!(matches!(packets(sim, c, v).as_slice(), [Packet::SubAck(_)]));
    c
}

fn publishes(ps: &[Packet]) -> Vec<&Publish> {
    ps.iter()
        .filter_map(|p| match p {
            Packet::Publish(p) => Some(p),
            _ => None,
        })
        .collect()
}

/// [MQTT-3.1.2-22]: silent for more than 1.5 times the keep alive, the client is
/// disconnected (v5 with 0x8D, [MQTT-4.13.2-1]); any packet starts the time again.
fn keep_alive_at_one_and_a_half_times_mqtt_3_1_2_22(v: ProtocolVersion) {
    let mut sim = Sim::new(BrokerConfig::default());
    let (c, _) = open(&mut sim, v, &connect(v, "ka", true, 2));
    for _ in 0..3 {
        sim.advance(Duration::from_millis(2999));
        assert!(sim.is_open(c));
        sim.send(c, &bytes(&Packet::PingReq, v));
        assert_eq!(packets(&mut sim, c, v), vec![Packet::PingResp]);
    }
    sim.advance(Duration::from_millis(2999));
    assert!(sim.is_open(c), "2.999 s of silence is within 1.5 x 2 s");
    sim.advance(Duration::from_millis(2));
    assert!(!sim.is_open(c), "3.001 s of silence is not");
    let last = packets(&mut sim, c, v);
    if v.is_v5() {
        assert!(
            matches!(last.as_slice(), [Packet::Disconnect(d)] if d.reason == ReasonCode::KeepAliveTimeout),
            "{last:?}"
        );
    } else {
        assert!(last.is_empty(), "3.1.1 gets the close only: {last:?}");
    }
}

/// [MQTT-3.1.2-23] (v5 Session Expiry Interval) and 3.1.1's persistent sessions under
/// `persistent_client_expiration`: the session outlives its connection for exactly the
/// interval.
fn session_expires_after_its_interval_mqtt_3_1_2_23(v: ProtocolVersion) {
    let mut sim = Sim::new(BrokerConfig {
        persistent_client_expiration: Some(Duration::from_secs(10)),
        ..BrokerConfig::default()
    });
    let persistent = || {
        connect_with(v, "exp", false, |c| {
            c.keep_alive = 0;
            c.properties.session_expiry_interval = Some(10)
        })
    };
    let (c, ack) = open(&mut sim, v, &persistent());
    assert!(!ack.session_present);
    sim.drop_connection(c);
    sim.advance(Duration::from_millis(9999));
    let (c, ack) = open(&mut sim, v, &persistent());
    assert!(ack.session_present, "resumed 9.999 s after the close");
    sim.drop_connection(c);
    sim.advance(Duration::from_millis(10_001));
    let (_, ack) = open(&mut sim, v, &persistent());
    assert!(!ack.session_present, "gone 10.001 s after the close");
}

/// [MQTT-3.1.3-9]: a v5 will with a delay is published when the delay passes (not
/// before); 3.1.1 has no delay and publishes it at once [MQTT-3.1.2-8].
fn will_published_after_its_delay_mqtt_3_1_3_9(v: ProtocolVersion) {
    let mut sim = Sim::new(BrokerConfig::default());
    let watcher = subscribed(&mut sim, v, "watcher", "wills/#", QoS::AtMostOnce);
    let (c, _) = open(
        &mut sim,
        v,
        &connect_with(v, "mortal", true, |c| {
            c.keep_alive = 0;
            c.properties.session_expiry_interval = Some(60);
            c.will = Some(Will {
                topic: topic("wills/mortal"),
                payload: Bytes::from_static(b"gone"),
                qos: QoS::AtMostOnce,
                retain: false,
                delay_interval: Some(5),
                properties: Default::default(),
            });
        }),
    );
    sim.drop_connection(c);
    if v.is_v5() {
        sim.advance(Duration::from_millis(4999));
        assert!(
            publishes(&packets(&mut sim, watcher, v)).is_empty(),
            "not before 5 s"
        );
        sim.advance(Duration::from_millis(2));
    }
    let got = packets(&mut sim, watcher, v);
    let wills = publishes(&got);
    assert_eq!(wills.len(), 1, "{got:?}");
    assert_eq!(&wills[0].payload[..], b"gone");
}

/// [MQTT-3.3.4-7], [MQTT-3.3.4-8], [MQTT-4.9.0-2]: no more unacknowledged QoS 1 messages
/// to a client than its Receive Maximum (3.1.1: the broker's `max_inflight_messages`);
/// each PUBACK lets one more go, in order [MQTT-4.6.0-6].
fn flow_control_within_receive_maximum_mqtt_3_3_4_7(v: ProtocolVersion) {
    let mut sim = Sim::new(BrokerConfig {
        max_inflight_messages: 2,
        ..BrokerConfig::default()
    });
    let (s, _) = open(
        &mut sim,
        v,
        &connect_with(v, "slow", true, |c| {
            c.keep_alive = 0;
            c.properties.receive_maximum = Some(2)
        }),
    );
    sim.send(s, &bytes(&subscribe(1, "flow", QoS::AtLeastOnce), v));
    assert!(matches!(
        packets(&mut sim, s, v).as_slice(),
        [Packet::SubAck(_)]
    ));
    let p = online(&mut sim, v, "fast");
    for i in 1..=5u16 {
        sim.send(
            p,
            &bytes(&publish("flow", QoS::AtLeastOnce, i, &[i as u8]), v),
        );
    }
    assert_eq!(packets(&mut sim, p, v).len(), 5, "five PUBACKs");
    let first = packets(&mut sim, s, v);
    let got = publishes(&first);
    assert_eq!(got.iter().map(|p| p.payload[0]).collect::<Vec<_>>(), [1, 2]);
    let acked = got[0].packet_id;
    sim.send(s, &bytes(&Packet::PubAck(Ack::new(acked)), v));
    let next = packets(&mut sim, s, v);
    assert_eq!(
        publishes(&next)
            .iter()
            .map(|p| p.payload[0])
            .collect::<Vec<_>>(),
        [3]
    );
}

both_versions_sync!(
    keep_alive_at_one_and_a_half_times_mqtt_3_1_2_22,
    session_expires_after_its_interval_mqtt_3_1_2_23,
    will_published_after_its_delay_mqtt_3_1_3_9,
    flow_control_within_receive_maximum_mqtt_3_3_4_7,
);

/// Every hand-written invalid packet of the codec's vectors (and valid flows around it),
/// sent behind a valid CONNECT in chunks of 1 to 7 bytes with time passing between
/// them: the broker never panics, and everything it writes is a valid packet of the
/// client's version (what a client library would reject, it never sends).
#[test]
fn invalid_packets_never_make_the_broker_write_garbage() {
    let vectors = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../halyard-codec/tests/vectors/invalid.txt"
    ))
    .unwrap();
    let connects = [
        (
            ProtocolVersion::V3_1,
            "101100064d5149736470030200020003616263",
        ),
        (V3_1_1, "100f00044d5154540402000200036162 63"),
        (V5, "101000044d515454050200020000036162 63"),
    ];
    // Valid traffic after each invalid packet's connection ends or not: subscribe to
    // everything, publish QoS 1 and 2, a PUBREL, a retained message, a ping.
    let flow = "8206000100012302 3206000161000161 3406000161000262 62020002 310400016178 c000";
    let mut checked = 0;
    for (i, line) in vectors
        .lines()
        .filter(|l| l.starts_with(|c: char| c.is_ascii_digit()))
        .enumerate()
    {
        let cols: Vec<&str> = line.split('|').map(str::trim).collect();
        let (v, connect) = connects
            .iter()
            .find(|(v, _)| match cols[0] {
                "3.1" => *v == ProtocolVersion::V3_1,
                "3.1.1" => *v == V3_1_1,
                _ => *v == V5,
            })
            .unwrap();
        let mut input = halyard_testkit::hex_bytes(connect);
        input.extend(halyard_testkit::hex_bytes(flow));
        input.extend(halyard_testkit::hex_bytes(cols[3]));
        input.extend(halyard_testkit::hex_bytes(flow));
        let mut sim = Sim::new(BrokerConfig::default());
        let c = sim.open(&[]);
        let mut out = BytesMut::new();
        for part in input.chunks(1 + i % 7) {
            sim.send(c, part);
            out.extend_from_slice(&sim.output(c));
            sim.advance(Duration::from_millis(700 * (i % 4) as u64));
        }
        sim.drop_connection(c);
        sim.advance(Duration::from_secs(600));
        out.extend_from_slice(&sim.output(c));
        let mut n = 0;
        while decode(&mut out, *v, MAX_PACKET_SIZE)
            .unwrap_or_else(|e| panic!("line {line:?}: the broker wrote an invalid packet: {e}"))
            .is_some()
        {
            n += 1;
        }
        assert!(out.is_empty(), "line {line:?}: a partial packet");
        assert!(n >= 1, "line {line:?}: not even a CONNACK");
        checked += 1;
    }
    assert!(checked > 200, "{checked} vectors");
}
