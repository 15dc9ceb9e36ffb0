//! Broker conformance over the raw wire, for MQTT 3.1.1 and 5.0. Each test names the
//! normative statement it checks. Byte-exact expectations are written by hand.

mod common;

use std::time::Duration;

use common::*;
use halyard_broker::{Broker, BrokerConfig};
use halyard_codec::*;
use halyard_store::MemoryStore;
use halyard_testkit::{Recv, TestBroker, eventually, raw_duplex};

const SHORT: Duration = Duration::from_millis(300);

// ---------------------------------------------------------------- CONNECT

async fn first_packet_must_be_connect_mqtt_3_1_0_1(_v: ProtocolVersion) {
    let tb = TestBroker::start().await;
    let mut c = tb.raw().await;
    c.send_hex("C0 00").await; // PINGREQ
    assert!(c.expect_close().await.is_empty());
}

async fn second_connect_is_a_protocol_error_mqtt_3_1_0_2(v: ProtocolVersion) {
    let tb = TestBroker::start().await;
    let mut c = tb.raw().await;
    online(&mut c, v, "twice", true).await;
    c.send(&connect(v, "twice", true, 60)).await;
    expect_disconnect(&mut c, ReasonCode::ProtocolError).await;
}

async fn empty_client_id_mqtt_3_1_3_6_and_3_1_3_8(v: ProtocolVersion) {
    let tb = TestBroker::start().await;
    let mut c = tb.raw().await;
    let ack = handshake(&mut c, connect(v, "", true, 60)).await;
    assert_eq!(ack.reason, ReasonCode::Success);
    if v.is_v5() {
        // [MQTT-3.2.2-16]: the assigned identifier is returned.
        let id = ack
            .properties
            .assigned_client_identifier
            .expect("assigned id");
        assert!(!id.is_empty());
    }
    let mut c = tb.raw().await;
    let ack = handshake(&mut c, connect(v, "", false, 60)).await;
    if v.is_v5() {
        assert_eq!(ack.reason, ReasonCode::Success); // v5 allows it, with an assigned id
    } else {
        // [MQTT-3.1.3-8]: CONNACK 0x02 Identifier rejected, then close.
        assert_eq!(ack.reason, ReasonCode::ClientIdentifierNotValid);
        assert!(c.expect_close().await.is_empty());
    }
}

async fn session_present_and_clean_start_mqtt_3_2_2_2(v: ProtocolVersion) {
    let tb = TestBroker::start().await;
    let persistent = |clean| {
        connect_with(v, "keep", clean, |c| {
            c.properties.session_expiry_interval = Some(300);
        })
    };
    let mut a = tb.raw().await;
    assert!(!handshake(&mut a, persistent(false)).await.session_present);
    sub(&mut a, "s/p", QoS::AtLeastOnce).await;
    a.send_hex("E0 00").await;
    a.expect_close().await;
    let mut a = tb.raw().await;
    assert!(handshake(&mut a, persistent(false)).await.session_present);
    // The subscription survived: a publish reaches it.
    let mut p = tb.raw().await;
    online(&mut p, v, "pub", true).await;
    p.send(&publish("s/p", QoS::AtMostOnce, 0, b"x")).await;
    assert_eq!(recv_publish(&mut a).await.payload, &b"x"[..]);
    a.send_hex("E0 00").await;
    a.expect_close().await;
    // Clean start discards it [MQTT-3.1.2-4].
    let mut a = tb.raw().await;
    assert!(!handshake(&mut a, persistent(true)).await.session_present);
    p.send(&publish("s/p", QoS::AtMostOnce, 0, b"y")).await;
    a.expect_silence(SHORT).await;
}

async fn session_takeover_mqtt_3_1_4_3(v: ProtocolVersion) {
    let tb = TestBroker::start().await;
    let mut first = tb.raw().await;
    online(&mut first, v, "same", true).await;
    let mut second = tb.raw().await;
    online(&mut second, v, "same", true).await;
    expect_disconnect(&mut first, ReasonCode::SessionTakenOver).await;
    second.send_hex("C0 00").await;
    assert_eq!(second.recv().await, Packet::PingResp);
}

/// A takeover closes the old connection, so a session that lasts only as long as its
/// connection (v5 expiry 0, 3.1.1 clean session) ends with it and is not resumed, even by a
/// new connection asking to resume [MQTT-3.1.2-11] [MQTT-3.1.2-6] (as Mosquitto). A client
/// that sends DISCONNECT and reconnects at once must see session present 0 whichever of the
/// two connections the broker happens to read first.
async fn takeover_of_a_connection_scoped_session_does_not_resume_it_mqtt_3_1_2_11(
    v: ProtocolVersion,
) {
    let tb = TestBroker::start().await;
    let mut first = tb.raw().await;
    online(&mut first, v, "brief", true).await; // v5: no expiry property, so 0
    sub(&mut first, "brief/t", QoS::AtLeastOnce).await;
    let mut second = tb.raw().await;
    let ack = handshake(&mut second, connect(v, "brief", false, 60)).await;
    assert_eq!(ack.reason, ReasonCode::Success);
    assert!(
        !ack.session_present,
        "the old session ended with its connection"
    );
    expect_disconnect(&mut first, ReasonCode::SessionTakenOver).await;
    // Its subscription ended with it.
    let mut p = tb.raw().await;
    online(&mut p, v, "pub", true).await;
    p.send(&publish("brief/t", QoS::AtMostOnce, 0, b"x")).await;
    second.expect_silence(SHORT).await;

    // A session that outlives its connection is resumed by the takeover [MQTT-3.1.4-3].
    let persistent = || {
        connect_with(v, "lasting", false, |c| {
            c.properties.session_expiry_interval = Some(300);
        })
    };
    let mut a = tb.raw().await;
    assert!(!handshake(&mut a, persistent()).await.session_present);
    sub(&mut a, "lasting/t", QoS::AtLeastOnce).await;
    let mut b = tb.raw().await;
    assert!(handshake(&mut b, persistent()).await.session_present);
    expect_disconnect(&mut a, ReasonCode::SessionTakenOver).await;
    p.send(&publish("lasting/t", QoS::AtMostOnce, 0, b"y"))
        .await;
    assert_eq!(&recv_publish(&mut b).await.payload[..], b"y");
}

/// A clean-start CONNECT with a QoS 1 will "gone" on `will/{id}`.
fn connect_with_will(v: ProtocolVersion, id: &str) -> Packet {
    connect_with(v, id, true, |c| {
        c.will = Some(Will {
            topic: topic(&format!("will/{id}")),
            payload: Bytes::from_static(b"gone"),
            qos: QoS::AtLeastOnce,
            retain: false,
            delay_interval: None,
            properties: PublishProperties::default(),
        })
    })
}

/// A client that sends DISCONNECT and reconnects at once: when the broker reads the new
/// CONNECT first, the takeover still finds the DISCONNECT waiting on the old connection
/// and honors it, so the will is not published [MQTT-3.1.2-10]. (In-memory connections,
/// with the new CONNECT written before the old DISCONNECT, so the takeover comes first.)
async fn disconnect_unread_at_takeover_still_drops_the_will_mqtt_3_1_2_10(v: ProtocolVersion) {
    let tb = TestBroker::start().await;
    let mut s = tb.raw().await;
    online(&mut s, v, "watcher", true).await;
    sub(&mut s, "will/#", QoS::AtLeastOnce).await;
    let mut a = raw_duplex(&tb.broker);
    handshake(&mut a, connect_with_will(v, "quick")).await;
    let mut b = raw_duplex(&tb.broker);
    b.version = v;
    b.send(&connect(v, "quick", false, 60)).await;
    a.send_hex("E0 00").await;
    match b.recv().await {
        Packet::ConnAck(ack) => {
            assert_eq!(ack.reason, ReasonCode::Success);
            assert!(
                !ack.session_present,
                "a clean session does not outlive DISCONNECT"
            );
        }
        other => panic!("expected CONNACK, got {other:?}"),
    }
    a.expect_close().await;
    s.expect_silence(SHORT).await;
}

/// Clients may send packets right after CONNECT without waiting for CONNACK (3.1.4,
/// non-normative; paho's `connect(); subscribe()` does). When they arrive in the same read
/// as CONNECT they are handled at once, not left in the buffer until the client happens to
/// send more. (In-memory connection: one write is one read.)
async fn packets_pipelined_behind_connect_are_handled_3_1_4(v: ProtocolVersion) {
    let tb = TestBroker::start().await;
    let mut c = raw_duplex(&tb.broker);
    c.version = v;
    let mut bytes = bytes::BytesMut::new();
    connect_with(v, "eager", true, |c| {
        if v.is_v5() {
            c.properties.session_expiry_interval = Some(300);
        }
    })
    .encode(v, &mut bytes)
    .unwrap();
    subscribe(1, "eager/t", QoS::ExactlyOnce)
        .encode(v, &mut bytes)
        .unwrap();
    Packet::PingReq.encode(v, &mut bytes).unwrap();
    c.send_bytes(&bytes).await;
    assert!(matches!(c.recv().await, Packet::ConnAck(a) if a.reason == ReasonCode::Success));
    match c.recv().await {
        Packet::SubAck(a) => assert_eq!(a.packet_id, 1),
        other => panic!("expected SUBACK, got {other:?}"),
    }
    assert_eq!(c.recv().await, Packet::PingResp);
}

/// [MQTT-4.6.0-6]: a subscriber receives one publisher's messages in the order they were
/// published. QoS 0 deliveries of a batch are queued per subscriber at the batch's end
/// (`Deferred`); a QoS 1 message in the middle of the batch, a second subscriber and the
/// publisher's own later SUBSCRIBE must not reorder anything. One write is one read
/// here (in-memory connection), so all of it is one batch.
async fn a_batch_of_mixed_qos_keeps_publish_order_mqtt_4_6_0_6(v: ProtocolVersion) {
    let tb = TestBroker::start().await;
    let mut s1 = tb.raw().await;
    online(&mut s1, v, "ord-s1", true).await;
    sub(&mut s1, "ord/#", QoS::AtLeastOnce).await;
    let mut s2 = tb.raw().await;
    online(&mut s2, v, "ord-s2", true).await;
    sub(&mut s2, "ord/x", QoS::AtMostOnce).await;
    let mut p = raw_duplex(&tb.broker);
    p.version = v;
    online(&mut p, v, "ord-p", true).await;
    let qos = [0u8, 0, 1, 0, 1, 1, 0, 0];
    let mut bytes = bytes::BytesMut::new();
    for (i, q) in qos.iter().enumerate() {
        let q = QoS::from_u8(*q).unwrap();
        let id = if q == QoS::AtMostOnce {
            0
        } else {
            i as u16 + 1
        };
        publish("ord/x", q, id, &[i as u8])
            .encode(v, &mut bytes)
            .unwrap();
    }
    // The publisher subscribes behind its messages, then publishes once more: its own
    // copy of the last message comes after the SUBACK, and the others' stay in order.
    subscribe(100, "ord/#", QoS::AtMostOnce)
        .encode(v, &mut bytes)
        .unwrap();
    publish("ord/x", QoS::AtMostOnce, 0, &[8])
        .encode(v, &mut bytes)
        .unwrap();
    p.send_bytes(&bytes).await;
    for s in [&mut s1, &mut s2] {
        for i in 0..=8u8 {
            let m = recv_publish(s).await;
            assert_eq!(&m.payload[..], &[i], "out of order [MQTT-4.6.0-6]");
            if m.qos == QoS::AtLeastOnce {
                s.send(&Packet::PubAck(Ack::new(m.packet_id))).await;
            }
        }
    }
    let mut acks = 0;
    loop {
        match p.recv().await {
            Packet::PubAck(_) => acks += 1,
            Packet::SubAck(_) => break,
            other => panic!("expected PUBACK or SUBACK, got {other:?}"),
        }
    }
    assert_eq!(acks, 3);
    assert_eq!(&recv_publish(&mut p).await.payload[..], &[8]);
}

/// A batch of QoS 0 messages on one topic is held once and queued to each subscriber as
/// one run, and a subscriber that takes no identifiers gets the packets the segment keeps
/// encoded (`queue.rs`). Each subscriber still gets every message, in order
/// [MQTT-4.6.0-6], each with the identifiers of its own matching subscriptions
/// [MQTT-3.3.4-3] (v5; 3.1.1 has none), one copy for a subscriber with two overlapping
/// subscriptions [MQTT-3.3.4-2], and none larger than its Maximum Packet Size
/// [MQTT-3.1.2-25]. One write is one read here, so all 40 messages are one batch.
async fn a_batch_on_one_route_keeps_order_and_identifiers_mqtt_3_3_4_3(v: ProtocolVersion) {
    let tb = TestBroker::start().await;
    let o = SubscriptionOptions::default();
    let mut a = tb.raw().await;
    online(&mut a, V5, "run-a", true).await;
    a.send(&subscribe_opts(1, "run/#", o, Some(7))).await;
    a.recv().await;
    let mut b = tb.raw().await;
    online(&mut b, V5, "run-b", true).await;
    b.send(&subscribe_opts(1, "run/+", o, Some(9))).await;
    b.recv().await;
    b.send(&subscribe_opts(2, "run/x", o, Some(11))).await;
    b.recv().await;
    let mut c = tb.raw().await;
    online(&mut c, v, "run-c", true).await;
    sub(&mut c, "run/x", QoS::AtLeastOnce).await;
    // At most 30 bytes: a QoS 0 PUBLISH on `run/x` is 10 bytes and its payload.
    let mut d = tb.raw().await;
    let ack = handshake(
        &mut d,
        connect_with(V5, "run-d", true, |c| {
            c.properties.maximum_packet_size = Some(30)
        }),
    )
    .await;
    assert_eq!(ack.reason, ReasonCode::Success);
    sub(&mut d, "run/x", QoS::AtMostOnce).await;
    let mut p = raw_duplex(&tb.broker);
    p.version = v;
    online(&mut p, v, "run-p", true).await;
    let mut bytes = bytes::BytesMut::new();
    let payload = |i: u8| vec![i; usize::from(i) + 1];
    for i in 0..40u8 {
        publish("run/x", QoS::AtMostOnce, 0, &payload(i))
            .encode(v, &mut bytes)
            .unwrap();
    }
    p.send_bytes(&bytes).await;
    for (s, ids) in [(&mut a, vec![7]), (&mut b, vec![9, 11]), (&mut c, vec![])] {
        for i in 0..40u8 {
            let m = recv_publish(s).await;
            assert_eq!(&m.payload[..], payload(i), "out of order [MQTT-4.6.0-6]");
            assert_eq!(m.qos, QoS::AtMostOnce, "[MQTT-3.8.4-6]: the lower QoS");
            assert_eq!(m.topic.as_str(), "run/x");
            let mut got = m.properties.subscription_identifiers.clone();
            got.sort();
            assert_eq!(got, ids, "message {i} [MQTT-3.3.4-3]");
        }
        s.expect_silence(SHORT).await;
    }
    // Payloads of 1..=20 bytes fit in 30; the rest are not sent [MQTT-3.1.2-25].
    for i in 0..20u8 {
        assert_eq!(&recv_publish(&mut d).await.payload[..], payload(i));
    }
    d.expect_silence(SHORT).await;
}

async fn max_connections_refused_with_connack(v: ProtocolVersion) {
    let tb = TestBroker::with_config(BrokerConfig {
        max_connections: 1,
        ..Default::default()
    })
    .await;
    let mut a = tb.raw().await;
    online(&mut a, v, "one", true).await;
    let mut b = tb.raw().await;
    let ack = handshake(&mut b, connect(v, "two", true, 60)).await;
    // v5: 0x97 Quota exceeded; 3.1.1: 0x03 Server unavailable (mapped on the wire).
    assert_eq!(
        ack.reason,
        if v.is_v5() {
            ReasonCode::QuotaExceeded
        } else {
            ReasonCode::ServerUnavailable
        }
    );
    b.expect_close().await;
}

async fn keep_alive_above_max_keepalive_mqtt_3_2_2_21(v: ProtocolVersion) {
    let tb = TestBroker::with_config(BrokerConfig {
        max_keepalive: 30,
        ..Default::default()
    })
    .await;
    let mut c = tb.raw().await;
    let ack = handshake(&mut c, connect(v, "ka", true, 100)).await;
    if v.is_v5() {
        assert_eq!(ack.reason, ReasonCode::Success);
        assert_eq!(ack.properties.server_keep_alive, Some(30));
    } else {
        assert_eq!(ack.reason, ReasonCode::ClientIdentifierNotValid); // as mosquitto
    }
}

#[tokio::test]
async fn unsupported_protocol_level_gets_connack_0x01_mqtt_3_1_2_2() {
    let tb = TestBroker::start().await;
    let mut c = tb.raw().await;
    c.version = V3_1_1;
    c.send_hex("10 0D 00 04 4D 51 54 54 03 02 00 3C 00 01 61")
        .await; // "MQTT" level 3
    c.expect_close().await.iter().for_each(|p| {
        assert_eq!(
            *p,
            Packet::ConnAck(ConnAck {
                session_present: false,
                reason: ReasonCode::UnsupportedProtocolVersion,
                properties: Properties::default(),
            })
        )
    });
}

#[tokio::test]
async fn unsupported_protocol_bytes_exact() {
    // Hand-written expectation: 3.x CONNACK with return code 0x01.
    let tb = TestBroker::start().await;
    let mut s = tokio::net::TcpStream::connect(tb.addr).await.unwrap();
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    s.write_all(&halyard_testkit::hex_bytes(
        "10 0D 00 04 4D 51 54 54 07 02 00 3C 00 01 61",
    ))
    .await
    .unwrap();
    let mut got = Vec::new();
    s.read_to_end(&mut got).await.unwrap();
    assert_eq!(got, halyard_testkit::hex_bytes("20 02 00 01"));
}

#[tokio::test]
async fn malformed_v5_connect_gets_connack_0x81_mqtt_4_13_1_1() {
    let tb = TestBroker::start().await;
    let mut s = tokio::net::TcpStream::connect(tb.addr).await.unwrap();
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    // Reserved CONNECT flag set [MQTT-3.1.2-3].
    s.write_all(&halyard_testkit::hex_bytes(
        "10 0E 00 04 4D 51 54 54 05 03 00 3C 00 00 01 61",
    ))
    .await
    .unwrap();
    let mut got = Vec::new();
    s.read_to_end(&mut got).await.unwrap();
    assert_eq!(got, halyard_testkit::hex_bytes("20 03 00 81 00"));
}

#[tokio::test]
async fn v5_connack_advertises_capabilities_mqtt_3_2_2_3() {
    let cfg = BrokerConfig {
        max_qos: QoS::AtLeastOnce,
        retain_available: false,
        ..Default::default()
    };
    let tb = TestBroker::with_config(cfg).await;
    let mut c = tb.raw().await;
    let ack = online(&mut c, V5, "caps", true).await;
    let p = ack.properties;
    assert_eq!(p.receive_maximum, Some(20));
    assert_eq!(p.maximum_qos, Some(QoS::AtLeastOnce));
    assert_eq!(p.retain_available, Some(false));
    assert_eq!(p.maximum_packet_size, Some(16 * 1024 * 1024));
    assert_eq!(p.topic_alias_maximum, Some(10));
    assert_eq!(p.wildcard_subscription_available, Some(true));
    assert_eq!(p.subscription_identifier_available, Some(true));
    assert_eq!(p.shared_subscription_available, Some(true));
    // [MQTT-3.2.2-12]: QoS above Maximum QoS is answered with DISCONNECT 0x9B.
    c.send(&publish("t", QoS::ExactlyOnce, 1, b"")).await;
    expect_disconnect(&mut c, ReasonCode::QoSNotSupported).await;
    let mut c = tb.raw().await;
    online(&mut c, V5, "caps2", true).await;
    // [MQTT-3.2.2-13]: RETAIN when Retain Available is 0 gets DISCONNECT 0x9A.
    c.send(&Packet::Publish(Publish {
        retain: true,
        ..Publish::new(topic("t"), &b"x"[..])
    }))
    .await;
    expect_disconnect(&mut c, ReasonCode::RetainNotSupported).await;
}

#[tokio::test]
async fn enhanced_auth_method_not_supported_mqtt_4_12_0_1() {
    let tb = TestBroker::start().await;
    let mut c = tb.raw().await;
    let ack = handshake(
        &mut c,
        connect_with(V5, "auth", true, |c| {
            c.properties.authentication_method = Some("SCRAM-SHA-256".into());
        }),
    )
    .await;
    assert_eq!(ack.reason, ReasonCode::BadAuthenticationMethod);
}

#[tokio::test]
async fn disconnect_cannot_raise_session_expiry_from_zero_mqtt_3_14_2_2() {
    let tb = TestBroker::start().await;
    let mut c = tb.raw().await;
    online(&mut c, V5, "se", true).await;
    c.send(&Packet::Disconnect(Disconnect {
        reason: ReasonCode::Success,
        properties: Properties {
            session_expiry_interval: Some(60),
            ..Default::default()
        },
    }))
    .await;
    expect_disconnect(&mut c, ReasonCode::ProtocolError).await;
}

// ---------------------------------------------------------------- keep alive (paused time)

async fn keep_alive_enforced_at_one_and_a_half_times_mqtt_3_1_2_22(v: ProtocolVersion) {
    let broker = Broker::new(
        BrokerConfig::default(),
        std::sync::Arc::new(MemoryStore::new()),
    );
    let mut c = raw_duplex(&broker);
    handshake(&mut c, connect(v, "ka", true, 2)).await;
    // 2.9 s of silence is within 1.5 x 2 s; each packet starts the 3 s again (three
    // times: the broker moves its deadline forward when it comes due).
    for _ in 0..3 {
        c.expect_silence(Duration::from_millis(2900)).await;
        c.send_hex("C0 00").await;
        assert_eq!(c.recv().await, Packet::PingResp);
    }
    // Now silence for more than 3 s closes it (v5 with 0x8D Keep Alive timeout).
    match c.recv_within(Duration::from_millis(3100)).await {
        Recv::Closed => assert!(!v.is_v5()),
        Recv::Packet(Packet::Disconnect(d)) => {
            assert!(v.is_v5());
            assert_eq!(d.reason, ReasonCode::KeepAliveTimeout);
        }
        other => panic!("expected close after 1.5 x keep alive, got {other:?}"),
    }
}

async fn connect_timeout_closes_silent_connections(_v: ProtocolVersion) {
    let broker = Broker::new(
        BrokerConfig::default(),
        std::sync::Arc::new(MemoryStore::new()),
    );
    let mut c = raw_duplex(&broker);
    c.expect_silence(Duration::from_secs(9)).await;
    assert!(is_closed(&c.recv_within(Duration::from_secs(2)).await));
}

// ---------------------------------------------------------------- QoS flows

async fn qos1_and_qos2_flows_mqtt_4_3(v: ProtocolVersion) {
    let tb = TestBroker::start().await;
    let mut s = tb.raw().await;
    online(&mut s, v, "sub", true).await;
    sub(&mut s, "q/#", QoS::ExactlyOnce).await;
    let mut p = tb.raw().await;
    online(&mut p, v, "pub", true).await;

    p.send(&publish("q/1", QoS::AtLeastOnce, 10, b"one")).await;
    match p.recv().await {
        Packet::PubAck(a) => assert_eq!(a.packet_id, 10),
        other => panic!("{other:?}"),
    }
    let m = recv_publish(&mut s).await;
    assert_eq!((m.qos, &m.payload[..]), (QoS::AtLeastOnce, &b"one"[..]));
    s.send(&Packet::PubAck(Ack::new(m.packet_id))).await;

    // QoS 2 inbound: PUBREC, then PUBREL -> PUBCOMP [MQTT-4.3.3].
    p.send(&publish("q/2", QoS::ExactlyOnce, 11, b"two")).await;
    assert!(matches!(p.recv().await, Packet::PubRec(a) if a.packet_id == 11));
    // A resend before PUBREL is not delivered twice [MQTT-4.3.3-10].
    p.send(&Packet::Publish(Publish {
        dup: true,
        ..match publish("q/2", QoS::ExactlyOnce, 11, b"two") {
            Packet::Publish(x) => x,
            _ => unreachable!(),
        }
    }))
    .await;
    assert!(matches!(p.recv().await, Packet::PubRec(a) if a.packet_id == 11));
    p.send(&Packet::PubRel(Ack::new(11))).await;
    assert!(matches!(p.recv().await, Packet::PubComp(a) if a.packet_id == 11));

    // QoS 2 outbound: PUBLISH, PUBREC -> PUBREL, PUBCOMP.
    let m = recv_publish(&mut s).await;
    assert_eq!((m.qos, &m.payload[..]), (QoS::ExactlyOnce, &b"two"[..]));
    s.send(&Packet::PubRec(Ack::new(m.packet_id))).await;
    assert!(matches!(s.recv().await, Packet::PubRel(a) if a.packet_id == m.packet_id));
    s.send(&Packet::PubComp(Ack::new(m.packet_id))).await;
    s.expect_silence(SHORT).await; // exactly once
}

async fn delivered_qos_is_the_minimum_mqtt_3_8_4_6(v: ProtocolVersion) {
    let tb = TestBroker::start().await;
    let mut s = tb.raw().await;
    online(&mut s, v, "sub", true).await;
    sub(&mut s, "d", QoS::AtLeastOnce).await;
    let mut p = tb.raw().await;
    online(&mut p, v, "pub", true).await;
    p.send(&publish("d", QoS::ExactlyOnce, 1, b"x")).await;
    assert_eq!(recv_publish(&mut s).await.qos, QoS::AtLeastOnce);
    p.send(&publish("d", QoS::AtMostOnce, 0, b"y")).await;
    assert_eq!(recv_publish(&mut s).await.qos, QoS::AtMostOnce);
}

async fn unacked_messages_redelivered_with_dup_on_resume_mqtt_4_4_0_1(v: ProtocolVersion) {
    let tb = TestBroker::start().await;
    let pers = || {
        connect_with(v, "redeliver", false, |c| {
            c.properties.session_expiry_interval = Some(300)
        })
    };
    let mut s = tb.raw().await;
    handshake(&mut s, pers()).await;
    sub(&mut s, "r", QoS::ExactlyOnce).await;
    let mut p = tb.raw().await;
    online(&mut p, v, "pub", true).await;
    p.send(&publish("r", QoS::AtLeastOnce, 1, b"q1")).await;
    p.send(&publish("r", QoS::ExactlyOnce, 2, b"q2")).await;
    let m1 = recv_publish(&mut s).await;
    let m2 = recv_publish(&mut s).await;
    assert!(!m1.dup && !m2.dup);
    drop(s); // no acks, no DISCONNECT
    let mut s = tb.raw().await;
    assert!(handshake(&mut s, pers()).await.session_present);
    let r1 = recv_publish(&mut s).await;
    let r2 = recv_publish(&mut s).await;
    assert!(r1.dup && r2.dup, "[MQTT-3.3.1-1] DUP set on redelivery");
    assert_eq!((r1.packet_id, &r1.payload[..]), (m1.packet_id, &b"q1"[..]));
    assert_eq!((r2.packet_id, &r2.payload[..]), (m2.packet_id, &b"q2"[..]));
    // After PUBREC, a reconnect resends PUBREL instead [MQTT-4.4.0-1].
    s.send(&Packet::PubAck(Ack::new(r1.packet_id))).await;
    s.send(&Packet::PubRec(Ack::new(r2.packet_id))).await;
    assert!(matches!(s.recv().await, Packet::PubRel(a) if a.packet_id == r2.packet_id));
    drop(s);
    let mut s = tb.raw().await;
    assert!(handshake(&mut s, pers()).await.session_present);
    assert!(matches!(s.recv().await, Packet::PubRel(a) if a.packet_id == r2.packet_id));
    s.send(&Packet::PubComp(Ack::new(r2.packet_id))).await;
    s.expect_silence(SHORT).await;
}

async fn offline_messages_queued_in_order_mqtt_3_1_2_5(v: ProtocolVersion) {
    let tb = TestBroker::start().await;
    let pers = || {
        connect_with(v, "offline", false, |c| {
            c.properties.session_expiry_interval = Some(300)
        })
    };
    let mut s = tb.raw().await;
    handshake(&mut s, pers()).await;
    sub(&mut s, "o/#", QoS::AtLeastOnce).await;
    s.send_hex("E0 00").await;
    s.expect_close().await;
    let mut p = tb.raw().await;
    online(&mut p, v, "pub", true).await;
    for i in 0..5u8 {
        p.send(&publish("o/x", QoS::AtLeastOnce, u16::from(i) + 1, &[i]))
            .await;
        assert!(matches!(p.recv().await, Packet::PubAck(_)));
    }
    p.send(&publish("o/x", QoS::AtMostOnce, 0, b"qos0 not queued"))
        .await;
    // Routed (while the session is offline) before the PINGRESP comes back.
    p.send(&Packet::PingReq).await;
    assert_eq!(p.recv().await, Packet::PingResp);
    let mut s = tb.raw().await;
    assert!(handshake(&mut s, pers()).await.session_present);
    for i in 0..5u8 {
        let m = recv_publish(&mut s).await;
        assert_eq!(&m.payload[..], &[i]);
        s.send(&Packet::PubAck(Ack::new(m.packet_id))).await;
    }
    s.expect_silence(SHORT).await;
}

#[tokio::test]
async fn offline_queue_is_bounded_and_counted() {
    let cfg = BrokerConfig {
        max_queued_messages: 3,
        ..Default::default()
    };
    let tb = TestBroker::with_config(cfg).await;
    let pers = || {
        connect_with(V5, "bounded", false, |c| {
            c.properties.session_expiry_interval = Some(300)
        })
    };
    let mut s = tb.raw().await;
    handshake(&mut s, pers()).await;
    sub(&mut s, "b", QoS::AtLeastOnce).await;
    s.send_hex("E0 00").await;
    s.expect_close().await;
    let mut p = tb.raw().await;
    online(&mut p, V5, "pub", true).await;
    for i in 0..6u8 {
        p.send(&publish("b", QoS::AtLeastOnce, u16::from(i) + 1, &[i]))
            .await;
        p.recv().await;
    }
    assert_eq!(tb.broker.stats().dropped_queue_full, 3);
    let mut s = tb.raw().await;
    handshake(&mut s, pers()).await;
    for i in 0..3u8 {
        let m = recv_publish(&mut s).await;
        assert_eq!(
            &m.payload[..],
            &[i],
            "the oldest are kept; new ones are dropped when full"
        );
        s.send(&Packet::PubAck(Ack::new(m.packet_id))).await;
    }
    s.expect_silence(SHORT).await;
}

// ---------------------------------------------------------------- flow control & sizes

#[tokio::test]
async fn receive_maximum_of_the_client_is_respected_mqtt_3_3_4_7() {
    let tb = TestBroker::start().await;
    let mut s = tb.raw().await;
    handshake(
        &mut s,
        connect_with(V5, "rm", true, |c| c.properties.receive_maximum = Some(2)),
    )
    .await;
    sub(&mut s, "rm", QoS::AtLeastOnce).await;
    let mut p = tb.raw().await;
    online(&mut p, V5, "pub", true).await;
    for i in 0..5u8 {
        p.send(&publish("rm", QoS::AtLeastOnce, u16::from(i) + 1, &[i]))
            .await;
    }
    let a = recv_publish(&mut s).await;
    let b = recv_publish(&mut s).await;
    s.expect_silence(SHORT).await; // two in flight: no more until acknowledged
    s.send(&Packet::PubAck(Ack::new(a.packet_id))).await;
    let c = recv_publish(&mut s).await;
    assert_eq!(&c.payload[..], &[2]);
    s.expect_silence(SHORT).await;
    s.send(&Packet::PubAck(Ack::new(b.packet_id))).await;
    s.send(&Packet::PubAck(Ack::new(c.packet_id))).await;
    assert_eq!(&recv_publish(&mut s).await.payload[..], &[3]);
    assert_eq!(&recv_publish(&mut s).await.payload[..], &[4]);
}

#[tokio::test]
async fn client_exceeding_our_receive_maximum_gets_0x93_mqtt_3_3_4_9() {
    let cfg = BrokerConfig {
        max_inflight_messages: 2,
        ..Default::default()
    };
    let tb = TestBroker::with_config(cfg).await;
    let mut p = tb.raw().await;
    online(&mut p, V5, "flood", true).await;
    for id in 1..=3 {
        p.send(&publish("f", QoS::ExactlyOnce, id, b"x")).await; // never PUBREL
    }
    expect_disconnect(&mut p, ReasonCode::ReceiveMaximumExceeded).await;
}

async fn packet_over_maximum_size_disconnects_0x95(v: ProtocolVersion) {
    let tb = TestBroker::with_config(BrokerConfig {
        message_size_limit: 100,
        ..Default::default()
    })
    .await;
    let mut p = tb.raw().await;
    online(&mut p, v, "big", true).await;
    p.send(&publish("big", QoS::AtMostOnce, 0, &[0u8; 200]))
        .await;
    expect_disconnect(&mut p, ReasonCode::PacketTooLarge).await;
}

#[tokio::test]
async fn message_over_client_maximum_packet_size_is_not_sent_mqtt_3_1_2_25() {
    let tb = TestBroker::start().await;
    let mut s = tb.raw().await;
    handshake(
        &mut s,
        connect_with(V5, "small", true, |c| {
            c.properties.maximum_packet_size = Some(40)
        }),
    )
    .await;
    sub(&mut s, "m", QoS::AtLeastOnce).await;
    let mut p = tb.raw().await;
    online(&mut p, V5, "pub", true).await;
    p.send(&publish("m", QoS::AtLeastOnce, 1, &[1u8; 100]))
        .await;
    p.send(&publish("m", QoS::AtLeastOnce, 2, b"fits")).await;
    assert_eq!(&recv_publish(&mut s).await.payload[..], b"fits");
    eventually("drop counted", || tb.broker.stats().dropped_too_large == 1).await;
}

// ---------------------------------------------------------------- topic aliases

#[tokio::test]
async fn inbound_topic_aliases_mqtt_3_3_2_10() {
    let tb = TestBroker::start().await;
    let mut s = tb.raw().await;
    online(&mut s, V5, "sub", true).await;
    sub(&mut s, "alias/#", QoS::AtMostOnce).await;
    let mut p = tb.raw().await;
    online(&mut p, V5, "pub", true).await;
    let with_alias = |t: TopicName, payload: &'static [u8]| {
        Packet::Publish(Publish {
            properties: PublishProperties {
                topic_alias: Some(3),
                ..Default::default()
            },
            ..Publish::new(t, payload)
        })
    };
    p.send(&with_alias(topic("alias/a"), b"1")).await;
    p.send(&with_alias(TopicName::empty(), b"2")).await;
    let m1 = recv_publish(&mut s).await;
    let m2 = recv_publish(&mut s).await;
    assert_eq!(m2.topic.as_str(), "alias/a");
    assert_eq!((&m1.payload[..], &m2.payload[..]), (&b"1"[..], &b"2"[..]));
    assert_eq!(
        m2.properties.topic_alias, None,
        "aliases are per connection, never forwarded"
    );
    // Above our Topic Alias Maximum (10): 0x94 [MQTT-3.3.2-9].
    p.send(&Packet::Publish(Publish {
        properties: PublishProperties {
            topic_alias: Some(11),
            ..Default::default()
        },
        ..Publish::new(topic("alias/b"), &b""[..])
    }))
    .await;
    expect_disconnect(&mut p, ReasonCode::TopicAliasInvalid).await;
    // An alias never set: protocol error.
    let mut q = tb.raw().await;
    online(&mut q, V5, "pub2", true).await;
    q.send(&with_alias(TopicName::empty(), b"?")).await;
    expect_disconnect(&mut q, ReasonCode::ProtocolError).await;
}

#[tokio::test]
async fn outbound_topic_aliases_when_enabled() {
    let cfg = BrokerConfig {
        topic_alias_maximum_outbound: 5,
        ..Default::default()
    };
    let tb = TestBroker::with_config(cfg).await;
    let mut s = tb.raw().await;
    handshake(
        &mut s,
        connect_with(V5, "sub", true, |c| {
            c.properties.topic_alias_maximum = Some(5)
        }),
    )
    .await;
    sub(&mut s, "oa", QoS::AtMostOnce).await;
    let mut p = tb.raw().await;
    online(&mut p, V5, "pub", true).await;
    p.send(&publish("oa", QoS::AtMostOnce, 0, b"1")).await;
    p.send(&publish("oa", QoS::AtMostOnce, 0, b"2")).await;
    let a = recv_publish(&mut s).await;
    let b = recv_publish(&mut s).await;
    assert_eq!(
        (a.topic.as_str(), a.properties.topic_alias),
        ("oa", Some(1))
    );
    assert_eq!((b.topic.as_str(), b.properties.topic_alias), ("", Some(1)));
}

// ---------------------------------------------------------------- properties & expiry

#[tokio::test]
async fn publish_properties_forwarded_unchanged_mqtt_3_3_2_16_to_20() {
    let tb = TestBroker::start().await;
    let mut s = tb.raw().await;
    online(&mut s, V5, "sub", true).await;
    sub(&mut s, "props", QoS::AtMostOnce).await;
    let mut p = tb.raw().await;
    online(&mut p, V5, "pub", true).await;
    let props = PublishProperties {
        payload_format_indicator: Some(true),
        content_type: Some("text/plain".into()),
        response_topic: Some(topic("reply/here")),
        correlation_data: Some(Bytes::from_static(b"corr-1")),
        user_properties: vec![
            ("b".into(), "2".into()),
            ("a".into(), "1".into()),
            ("b".into(), "3".into()),
        ],
        ..Default::default()
    };
    p.send(&Packet::Publish(Publish {
        properties: props.clone(),
        ..Publish::new(topic("props"), &b"hello"[..])
    }))
    .await;
    let m = recv_publish(&mut s).await;
    assert_eq!(m.properties, props);
}

#[tokio::test]
async fn remaining_message_expiry_is_forwarded_mqtt_3_3_2_6() {
    let tb = TestBroker::start().await;
    let mut s = tb.raw().await;
    online(&mut s, V5, "sub", true).await;
    sub(&mut s, "exp", QoS::AtMostOnce).await;
    let mut p = tb.raw().await;
    online(&mut p, V5, "pub", true).await;
    p.send(&Packet::Publish(Publish {
        properties: PublishProperties {
            message_expiry_interval: Some(100),
            ..Default::default()
        },
        ..Publish::new(topic("exp"), &b"x"[..])
    }))
    .await;
    let m = recv_publish(&mut s).await;
    let left = m
        .properties
        .message_expiry_interval
        .expect("expiry forwarded");
    assert!((98..=100).contains(&left), "{left}");
}

/// The remaining lifetime is rounded up to whole seconds: forwarded at once, 60 stays 60
/// (Mosquitto's behaviour); after 1.5 s queued, 60 becomes 59 [MQTT-3.3.2-6].
#[tokio::test(start_paused = true)]
async fn remaining_message_expiry_rounds_up_mqtt_3_3_2_6() {
    let broker = Broker::new(
        BrokerConfig::default(),
        std::sync::Arc::new(MemoryStore::new()),
    );
    let pers = || {
        connect_with(V5, "exp-r", false, |c| {
            c.properties.session_expiry_interval = Some(300)
        })
    };
    let mut s = raw_duplex(&broker);
    handshake(&mut s, pers()).await;
    sub(&mut s, "r", QoS::AtLeastOnce).await;
    let mut p = raw_duplex(&broker);
    online(&mut p, V5, "pub-r", true).await;
    let sixty = |id: u16| {
        Packet::Publish(Publish {
            qos: QoS::AtLeastOnce,
            packet_id: id,
            properties: PublishProperties {
                message_expiry_interval: Some(60),
                ..Default::default()
            },
            ..Publish::new(topic("r"), &b"x"[..])
        })
    };
    p.send(&sixty(1)).await;
    p.recv().await;
    tokio::time::advance(Duration::from_micros(10)).await;
    let m = recv_publish(&mut s).await;
    assert_eq!(
        m.properties.message_expiry_interval,
        Some(60),
        "forwarded at once"
    );
    s.send(&Packet::PubAck(Ack::new(m.packet_id))).await;
    s.send_hex("E0 00").await;
    s.expect_close().await;
    p.send(&sixty(2)).await;
    p.recv().await;
    tokio::time::advance(Duration::from_millis(1500)).await;
    let mut s = raw_duplex(&broker);
    handshake(&mut s, pers()).await;
    let m = recv_publish(&mut s).await;
    assert_eq!(
        m.properties.message_expiry_interval,
        Some(59),
        "1.5 s queued"
    );
}

#[tokio::test(start_paused = true)]
async fn expired_queued_messages_are_dropped_mqtt_3_3_2_5() {
    let broker = Broker::new(
        BrokerConfig::default(),
        std::sync::Arc::new(MemoryStore::new()),
    );
    let pers = || {
        connect_with(V5, "exp-q", false, |c| {
            c.properties.session_expiry_interval = Some(300)
        })
    };
    let mut s = raw_duplex(&broker);
    handshake(&mut s, pers()).await;
    sub(&mut s, "e", QoS::AtLeastOnce).await;
    s.send_hex("E0 00").await;
    s.expect_close().await;
    let mut p = raw_duplex(&broker);
    online(&mut p, V5, "pub", true).await;
    p.send(&Packet::Publish(Publish {
        qos: QoS::AtLeastOnce,
        packet_id: 1,
        properties: PublishProperties {
            message_expiry_interval: Some(5),
            ..Default::default()
        },
        ..Publish::new(topic("e"), &b"short"[..])
    }))
    .await;
    p.send(&publish("e", QoS::AtLeastOnce, 2, b"long")).await;
    p.recv().await;
    p.recv().await;
    tokio::time::sleep(Duration::from_secs(6)).await;
    let mut s = raw_duplex(&broker);
    handshake(&mut s, pers()).await;
    assert_eq!(&recv_publish(&mut s).await.payload[..], b"long");
    assert_eq!(broker.stats().expired_messages, 1);
}

// ---------------------------------------------------------------- subscriptions

async fn dollar_topics_not_matched_by_leading_wildcards_mqtt_4_7_2_1(v: ProtocolVersion) {
    let tb = TestBroker::start().await;
    let mut s = tb.raw().await;
    online(&mut s, v, "sub", true).await;
    sub(&mut s, "#", QoS::AtMostOnce).await;
    sub(&mut s, "+/info", QoS::AtMostOnce).await;
    let mut p = tb.raw().await;
    online(&mut p, v, "pub", true).await;
    p.send(&publish("$app/info", QoS::AtMostOnce, 0, b"hidden"))
        .await;
    p.send(&publish("a/info", QoS::AtMostOnce, 0, b"seen"))
        .await;
    assert_eq!(&recv_publish(&mut s).await.payload[..], b"seen");
    s.expect_silence(SHORT).await;
}

async fn overlapping_subscriptions_deliver_once_with_max_qos_mqtt_3_3_4_2(v: ProtocolVersion) {
    let tb = TestBroker::start().await;
    let mut s = tb.raw().await;
    online(&mut s, v, "sub", true).await;
    sub(&mut s, "ov/+", QoS::AtMostOnce).await;
    sub(&mut s, "ov/#", QoS::AtLeastOnce).await;
    let mut p = tb.raw().await;
    online(&mut p, v, "pub", true).await;
    p.send(&publish("ov/x", QoS::AtLeastOnce, 1, b"x")).await;
    let m = recv_publish(&mut s).await;
    assert_eq!(m.qos, QoS::AtLeastOnce);
    s.send(&Packet::PubAck(Ack::new(m.packet_id))).await;
    s.expect_silence(SHORT).await;
}

#[tokio::test]
async fn subscription_identifiers_delivered_mqtt_3_3_4_3() {
    let tb = TestBroker::start().await;
    let mut s = tb.raw().await;
    online(&mut s, V5, "sub", true).await;
    let o = SubscriptionOptions::default();
    s.send(&subscribe_opts(1, "id/+", o, Some(7))).await;
    s.recv().await;
    s.send(&subscribe_opts(2, "id/#", o, Some(9))).await;
    s.recv().await;
    let mut p = tb.raw().await;
    online(&mut p, V5, "pub", true).await;
    p.send(&publish("id/x", QoS::AtMostOnce, 0, b"x")).await;
    let mut ids = recv_publish(&mut s)
        .await
        .properties
        .subscription_identifiers;
    ids.sort();
    assert_eq!(ids, vec![7, 9]);
}

#[tokio::test]
async fn no_local_and_retain_as_published_mqtt_3_8_3_3_and_3_3_1_12() {
    let tb = TestBroker::start().await;
    let mut c = tb.raw().await;
    online(&mut c, V5, "self", true).await;
    let o = SubscriptionOptions {
        no_local: true,
        ..Default::default()
    };
    c.send(&subscribe_opts(1, "nl", o, None)).await;
    c.recv().await;
    c.send(&publish("nl", QoS::AtMostOnce, 0, b"mine")).await;
    c.expect_silence(SHORT).await;

    let mut s = tb.raw().await;
    online(&mut s, V5, "rap", true).await;
    let o = SubscriptionOptions {
        retain_as_published: true,
        ..Default::default()
    };
    s.send(&subscribe_opts(1, "rap/keep", o, None)).await;
    s.recv().await;
    sub(&mut s, "rap/clear", QoS::AtMostOnce).await;
    for t in ["rap/keep", "rap/clear"] {
        c.send(&Packet::Publish(Publish {
            retain: true,
            ..Publish::new(topic(t), &b"r"[..])
        }))
        .await;
    }
    assert!(recv_publish(&mut s).await.retain, "RAP=1 keeps RETAIN");
    assert!(
        !recv_publish(&mut s).await.retain,
        "RAP=0 clears RETAIN [MQTT-3.3.1-12]"
    );
}

#[tokio::test]
async fn retain_handling_0_1_2_mqtt_3_3_1_9_to_11() {
    let tb = TestBroker::start().await;
    let mut p = tb.raw().await;
    online(&mut p, V5, "pub", true).await;
    p.send(&Packet::Publish(Publish {
        retain: true,
        ..Publish::new(topic("rh"), &b"kept"[..])
    }))
    .await;
    p.send_hex("C0 00").await;
    p.recv().await; // PINGRESP: the publish was processed
    let mut s = tb.raw().await;
    online(&mut s, V5, "sub", true).await;
    let opts = |rh| SubscriptionOptions {
        retain_handling: rh,
        ..Default::default()
    };
    s.send(&subscribe_opts(
        1,
        "rh",
        opts(RetainHandling::DoNotSend),
        None,
    ))
    .await;
    s.recv().await;
    s.expect_silence(SHORT).await;
    s.send(&subscribe_opts(
        2,
        "rh",
        opts(RetainHandling::SendIfNew),
        None,
    ))
    .await;
    s.recv().await;
    s.expect_silence(SHORT).await; // not new
    s.send(&subscribe_opts(
        3,
        "rh",
        opts(RetainHandling::SendOnSubscribe),
        None,
    ))
    .await;
    s.recv().await;
    assert!(recv_publish(&mut s).await.retain);
    let mut t = tb.raw().await;
    online(&mut t, V5, "sub2", true).await;
    t.send(&subscribe_opts(
        1,
        "rh",
        opts(RetainHandling::SendIfNew),
        None,
    ))
    .await;
    t.recv().await;
    assert_eq!(&recv_publish(&mut t).await.payload[..], b"kept");
}

async fn unsubscribe_stops_delivery_with_reason_codes_mqtt_3_10_4(v: ProtocolVersion) {
    let tb = TestBroker::start().await;
    let mut s = tb.raw().await;
    online(&mut s, v, "sub", true).await;
    sub(&mut s, "u", QoS::AtMostOnce).await;
    s.send(&Packet::Unsubscribe(Unsubscribe {
        packet_id: 5,
        filters: vec![
            TopicFilter::try_from("u").unwrap(),
            TopicFilter::try_from("never").unwrap(),
        ],
        properties: Properties::default(),
    }))
    .await;
    match s.recv().await {
        Packet::UnsubAck(u) => {
            assert_eq!(u.packet_id, 5);
            if v.is_v5() {
                assert_eq!(
                    u.reasons,
                    vec![ReasonCode::Success, ReasonCode::NoSubscriptionExisted]
                );
            }
        }
        other => panic!("{other:?}"),
    }
    let mut p = tb.raw().await;
    online(&mut p, v, "pub", true).await;
    p.send(&publish("u", QoS::AtMostOnce, 0, b"x")).await;
    s.expect_silence(SHORT).await;
}

async fn shared_subscriptions_round_robin_mqtt_4_8_2(v: ProtocolVersion) {
    let tb = TestBroker::start().await;
    let mut a = tb.raw().await;
    online(&mut a, v, "a", true).await;
    sub(&mut a, "$share/g/work", QoS::AtLeastOnce).await;
    let mut b = tb.raw().await;
    online(&mut b, v, "b", true).await;
    sub(&mut b, "$share/g/work", QoS::AtLeastOnce).await;
    let mut p = tb.raw().await;
    online(&mut p, v, "pub", true).await;
    for i in 0..4u16 {
        p.send(&publish("work", QoS::AtLeastOnce, i + 1, &[i as u8]))
            .await;
        p.recv().await;
    }
    let mut got = Vec::new();
    for c in [&mut a, &mut b] {
        for _ in 0..2 {
            let m = recv_publish(c).await;
            c.send(&Packet::PubAck(Ack::new(m.packet_id))).await;
            got.push(m.payload[0]);
        }
        c.expect_silence(SHORT).await;
    }
    got.sort();
    assert_eq!(got, vec![0, 1, 2, 3], "each message to exactly one member");
}

// ---------------------------------------------------------------- retained

async fn retained_set_replace_delete_mqtt_3_3_1_5_to_7(v: ProtocolVersion) {
    let tb = TestBroker::start().await;
    let mut p = tb.raw().await;
    online(&mut p, v, "pub", true).await;
    let retained = |t: &str, payload: &'static [u8]| {
        Packet::Publish(Publish {
            retain: true,
            qos: QoS::AtLeastOnce,
            packet_id: 1,
            ..Publish::new(topic(t), payload)
        })
    };
    p.send(&retained("ret/a", b"first")).await;
    p.recv().await;
    p.send(&retained("ret/a", b"second")).await;
    p.recv().await;
    p.send(&retained("ret/b", b"b")).await;
    p.recv().await;
    p.send(&retained("ret/b", b"")).await; // empty payload deletes [MQTT-3.3.1-6]
    p.recv().await;
    let mut s = tb.raw().await;
    online(&mut s, v, "sub", true).await;
    sub(&mut s, "ret/#", QoS::AtLeastOnce).await;
    let m = recv_publish(&mut s).await;
    assert!(
        m.retain,
        "[MQTT-3.3.1-8] RETAIN set on delivery at subscribe"
    );
    assert_eq!(
        (m.topic.as_str(), &m.payload[..]),
        ("ret/a", &b"second"[..])
    );
    s.send(&Packet::PubAck(Ack::new(m.packet_id))).await;
    s.expect_silence(SHORT).await;
    // Forwarded live messages carry RETAIN 0 for 3.1.1 and for RAP=0 [MQTT-3.3.1-9].
    p.send(&retained("ret/a", b"third")).await;
    let m = recv_publish(&mut s).await;
    assert!(!m.retain);
}

// ---------------------------------------------------------------- wills

async fn will_published_on_abnormal_close_not_on_disconnect_mqtt_3_1_2_8_and_10(
    v: ProtocolVersion,
) {
    let tb = TestBroker::start().await;
    let mut s = tb.raw().await;
    online(&mut s, v, "watcher", true).await;
    sub(&mut s, "will/#", QoS::AtLeastOnce).await;
    let with_will = |id: &str| connect_with_will(v, id);
    let mut a = tb.raw().await;
    handshake(&mut a, with_will("abrupt")).await;
    drop(a); // network close without DISCONNECT
    let m = recv_publish(&mut s).await;
    assert_eq!(
        (m.topic.as_str(), &m.payload[..]),
        ("will/abrupt", &b"gone"[..])
    );
    s.send(&Packet::PubAck(Ack::new(m.packet_id))).await;

    let mut b = tb.raw().await;
    handshake(&mut b, with_will("polite")).await;
    b.send_hex("E0 00").await; // normal DISCONNECT removes the will [MQTT-3.1.2-10]
    b.expect_close().await;
    s.expect_silence(SHORT).await;

    if v.is_v5() {
        let mut c = tb.raw().await;
        handshake(&mut c, with_will("with-will")).await;
        c.send_hex("E0 01 04").await; // DISCONNECT 0x04: publish the will [MQTT-3.14.4-3]
        c.expect_close().await;
        assert_eq!(recv_publish(&mut s).await.topic.as_str(), "will/with-will");
    }
}

#[tokio::test(start_paused = true)]
async fn will_delay_cancelled_by_reconnect_and_sent_after_delay_mqtt_3_1_3_9() {
    let broker = Broker::new(
        BrokerConfig::default(),
        std::sync::Arc::new(MemoryStore::new()),
    );
    let mut s = raw_duplex(&broker);
    online(&mut s, V5, "watcher", true).await;
    sub(&mut s, "wd", QoS::AtMostOnce).await;
    let with_delay = || {
        connect_with(V5, "delayed", false, |c| {
            c.properties.session_expiry_interval = Some(100);
            c.will = Some(Will {
                topic: topic("wd"),
                payload: Bytes::from_static(b"late"),
                qos: QoS::AtMostOnce,
                retain: false,
                delay_interval: Some(10),
                properties: PublishProperties::default(),
            })
        })
    };
    let mut a = raw_duplex(&broker);
    handshake(&mut a, with_delay()).await;
    drop(a);
    s.expect_silence(Duration::from_secs(5)).await;
    let mut a = raw_duplex(&broker); // back within the delay: no will
    assert!(handshake(&mut a, with_delay()).await.session_present);
    s.expect_silence(Duration::from_secs(15)).await;
    drop(a);
    s.expect_silence(Duration::from_secs(9)).await;
    assert_eq!(&recv_publish(&mut s).await.payload[..], b"late");
}

#[tokio::test(start_paused = true)]
async fn will_sent_at_session_end_if_before_delay_mqtt_3_1_3_9() {
    let broker = Broker::new(
        BrokerConfig::default(),
        std::sync::Arc::new(MemoryStore::new()),
    );
    let mut s = raw_duplex(&broker);
    online(&mut s, V5, "watcher", true).await;
    sub(&mut s, "we", QoS::AtMostOnce).await;
    let mut a = raw_duplex(&broker);
    handshake(
        &mut a,
        connect_with(V5, "short", false, |c| {
            c.properties.session_expiry_interval = Some(3);
            c.will = Some(Will {
                topic: topic("we"),
                payload: Bytes::from_static(b"end"),
                qos: QoS::AtMostOnce,
                retain: false,
                delay_interval: Some(60),
                properties: PublishProperties::default(),
            })
        }),
    )
    .await;
    drop(a);
    s.expect_silence(Duration::from_millis(2900)).await;
    assert_eq!(&recv_publish(&mut s).await.payload[..], b"end");
}

#[tokio::test(start_paused = true)]
async fn session_expires_after_its_interval_mqtt_3_1_2_11() {
    let broker = Broker::new(
        BrokerConfig::default(),
        std::sync::Arc::new(MemoryStore::new()),
    );
    let c5 = || {
        connect_with(V5, "exp", false, |c| {
            c.properties.session_expiry_interval = Some(10)
        })
    };
    let mut a = raw_duplex(&broker);
    handshake(&mut a, c5()).await;
    a.send_hex("E0 00").await;
    a.expect_close().await;
    tokio::time::sleep(Duration::from_secs(5)).await;
    let mut a = raw_duplex(&broker);
    assert!(handshake(&mut a, c5()).await.session_present);
    a.send_hex("E0 00").await;
    a.expect_close().await;
    tokio::time::sleep(Duration::from_secs(11)).await;
    let mut a = raw_duplex(&broker);
    assert!(!handshake(&mut a, c5()).await.session_present);
    assert_eq!(broker.stats().sessions_expired, 1);
}

#[tokio::test(start_paused = true)]
async fn persistent_client_expiration_applies_to_3_1_1() {
    let cfg = BrokerConfig {
        persistent_client_expiration: Some(Duration::from_secs(20)),
        ..Default::default()
    };
    let broker = Broker::new(cfg, std::sync::Arc::new(MemoryStore::new()));
    let mut a = raw_duplex(&broker);
    online(&mut a, V3_1_1, "old", false).await;
    a.send_hex("E0 00").await;
    a.expect_close().await;
    tokio::time::sleep(Duration::from_secs(21)).await;
    let mut a = raw_duplex(&broker);
    assert!(!online(&mut a, V3_1_1, "old", false).await.session_present);
}

// ---------------------------------------------------------------- robustness & shutdown

async fn malformed_packet_disconnects_only_that_client_mqtt_4_13(v: ProtocolVersion) {
    let tb = TestBroker::start().await;
    let mut good = tb.raw().await;
    online(&mut good, v, "good", true).await;
    sub(&mut good, "ok", QoS::AtMostOnce).await;
    let mut bad = tb.raw().await;
    online(&mut bad, v, "bad", true).await;
    bad.send_hex("36 07 00 03 61 2F 62 68 69").await; // QoS 3 [MQTT-3.3.1-4]
    expect_disconnect(&mut bad, ReasonCode::MalformedPacket).await;
    let mut p = tb.raw().await;
    online(&mut p, v, "pub", true).await;
    p.send(&publish("ok", QoS::AtMostOnce, 0, b"still fine"))
        .await;
    assert_eq!(&recv_publish(&mut good).await.payload[..], b"still fine");
}

/// Acknowledgements are read in place when they are four bytes; that path must refuse what
/// the decoder refuses: PUBREL flags other than 0010 [MQTT-3.6.1-1], other reserved flags
/// [MQTT-2.2.2-2] (malformed), packet id 0 [MQTT-2.2.1-3] (protocol error).
async fn acks_with_bad_flags_or_packet_id_0_disconnect_mqtt_3_6_1_1(v: ProtocolVersion) {
    let tb = TestBroker::start().await;
    for (i, (hex, reason)) in [
        ("60 02 00 01", ReasonCode::MalformedPacket),
        ("42 02 00 01", ReasonCode::MalformedPacket),
        ("72 02 00 01", ReasonCode::MalformedPacket),
        ("40 02 00 00", ReasonCode::ProtocolError),
        ("62 02 00 00", ReasonCode::ProtocolError),
    ]
    .into_iter()
    .enumerate()
    {
        let mut c = tb.raw().await;
        online(&mut c, v, &format!("bad-ack-{i}"), true).await;
        c.send_hex(hex).await;
        expect_disconnect(&mut c, reason).await;
    }
}

async fn graceful_shutdown_sends_0x8b(v: ProtocolVersion) {
    let tb = TestBroker::start().await;
    let mut c = tb.raw().await;
    online(&mut c, v, "bye", true).await;
    let b = tb.broker.clone();
    let done = tokio::spawn(async move { b.shutdown().await });
    expect_disconnect(&mut c, ReasonCode::ServerShuttingDown).await;
    assert!(done.await.unwrap(), "drained within the deadline");
    assert!(
        tokio::net::TcpStream::connect(tb.addr).await.is_err(),
        "listener closed"
    );
}

#[tokio::test]
async fn state_survives_a_broker_restart_on_the_same_store() {
    let store = std::sync::Arc::new(MemoryStore::new());
    let tb = TestBroker::with_store(BrokerConfig::default(), store.clone()).await;
    let pers = || {
        connect_with(V5, "durable", false, |c| {
            c.properties.session_expiry_interval = Some(600)
        })
    };
    let mut s = tb.raw().await;
    handshake(&mut s, pers()).await;
    sub(&mut s, "keep/#", QoS::AtLeastOnce).await;
    s.send_hex("E0 00").await;
    s.expect_close().await;
    let mut p = tb.raw().await;
    online(&mut p, V5, "pub", true).await;
    p.send(&Packet::Publish(Publish {
        retain: true,
        ..Publish::new(topic("keep/r"), &b"r"[..])
    }))
    .await;
    p.send_hex("C0 00").await;
    p.recv().await;
    tb.broker.shutdown().await;

    let tb2 = TestBroker::with_store(BrokerConfig::default(), store).await;
    let mut s = tb2.raw().await;
    assert!(handshake(&mut s, pers()).await.session_present);
    let mut p = tb2.raw().await;
    online(&mut p, V5, "pub", true).await;
    p.send(&publish("keep/live", QoS::AtLeastOnce, 1, b"after restart"))
        .await;
    assert_eq!(&recv_publish(&mut s).await.payload[..], b"after restart");
    let mut t = tb2.raw().await;
    online(&mut t, V5, "late", true).await;
    sub(&mut t, "keep/r", QoS::AtMostOnce).await;
    assert_eq!(&recv_publish(&mut t).await.payload[..], b"r");
}

both_versions!(
    first_packet_must_be_connect_mqtt_3_1_0_1,
    second_connect_is_a_protocol_error_mqtt_3_1_0_2,
    empty_client_id_mqtt_3_1_3_6_and_3_1_3_8,
    session_present_and_clean_start_mqtt_3_2_2_2,
    session_takeover_mqtt_3_1_4_3,
    takeover_of_a_connection_scoped_session_does_not_resume_it_mqtt_3_1_2_11,
    disconnect_unread_at_takeover_still_drops_the_will_mqtt_3_1_2_10,
    packets_pipelined_behind_connect_are_handled_3_1_4,
    a_batch_of_mixed_qos_keeps_publish_order_mqtt_4_6_0_6,
    a_batch_on_one_route_keeps_order_and_identifiers_mqtt_3_3_4_3,
    max_connections_refused_with_connack,
    keep_alive_above_max_keepalive_mqtt_3_2_2_21,
    qos1_and_qos2_flows_mqtt_4_3,
    delivered_qos_is_the_minimum_mqtt_3_8_4_6,
    unacked_messages_redelivered_with_dup_on_resume_mqtt_4_4_0_1,
    offline_messages_queued_in_order_mqtt_3_1_2_5,
    packet_over_maximum_size_disconnects_0x95,
    dollar_topics_not_matched_by_leading_wildcards_mqtt_4_7_2_1,
    overlapping_subscriptions_deliver_once_with_max_qos_mqtt_3_3_4_2,
    unsubscribe_stops_delivery_with_reason_codes_mqtt_3_10_4,
    shared_subscriptions_round_robin_mqtt_4_8_2,
    retained_set_replace_delete_mqtt_3_3_1_5_to_7,
    will_published_on_abnormal_close_not_on_disconnect_mqtt_3_1_2_8_and_10,
    malformed_packet_disconnects_only_that_client_mqtt_4_13,
    acks_with_bad_flags_or_packet_id_0_disconnect_mqtt_3_6_1_1,
    graceful_shutdown_sends_0x8b,
);
both_versions_paused!(
    keep_alive_enforced_at_one_and_a_half_times_mqtt_3_1_2_22,
    connect_timeout_closes_silent_connections,
);

#[tokio::test]
async fn shared_messages_of_a_departing_member_go_to_another_member_4_8_2() {
    let tb = TestBroker::start().await;
    let mut a = tb.raw().await;
    online(&mut a, V5, "member-a", true).await;
    sub(&mut a, "$share/g/jobs", QoS::AtLeastOnce).await;
    // b takes one message at a time (Receive Maximum 1) and never acknowledges.
    let mut b = tb.raw().await;
    handshake(
        &mut b,
        connect_with(V5, "member-b", true, |c| {
            c.properties.receive_maximum = Some(1)
        }),
    )
    .await;
    sub(&mut b, "$share/g/jobs", QoS::AtLeastOnce).await;
    let mut p = tb.raw().await;
    online(&mut p, V5, "pub", true).await;
    for i in 0..6u16 {
        p.send(&publish("jobs", QoS::AtLeastOnce, i + 1, &[i as u8]))
            .await;
        p.recv().await;
    }
    let mut got_a = Vec::new();
    for _ in 0..3 {
        let m = recv_publish(&mut a).await;
        a.send(&Packet::PubAck(Ack::new(m.packet_id))).await;
        got_a.push(m.payload[0]);
    }
    let first_b = recv_publish(&mut b).await.payload[0];
    drop(b); // b's session ends (expiry 0): its queued and unacknowledged QoS 1 move to a
    for _ in 0..3 {
        let m = recv_publish(&mut a).await;
        a.send(&Packet::PubAck(Ack::new(m.packet_id))).await;
        got_a.push(m.payload[0]);
    }
    a.expect_silence(SHORT).await;
    got_a.sort();
    assert_eq!(
        got_a,
        vec![0, 1, 2, 3, 4, 5],
        "b had {first_b}; everything reached a"
    );
}

#[tokio::test]
async fn queued_inflight_and_inbound_qos2_survive_a_restart_mqtt_4_3_3_and_4_4_0_1() {
    let store = std::sync::Arc::new(MemoryStore::new());
    let tb = TestBroker::with_store(BrokerConfig::default(), store.clone()).await;
    let pers = |id: &str| {
        connect_with(V5, id, false, |c| {
            c.properties.session_expiry_interval = Some(600)
        })
    };
    let mut s = tb.raw().await;
    handshake(&mut s, pers("rs-sub")).await;
    sub(&mut s, "rs/#", QoS::ExactlyOnce).await;
    let mut p = tb.raw().await;
    handshake(&mut p, pers("rs-pub")).await;
    p.send(&publish("rs/1", QoS::AtLeastOnce, 1, b"m1")).await;
    p.recv().await;
    p.send(&publish("rs/2", QoS::ExactlyOnce, 2, b"m2")).await;
    p.recv().await;
    p.send(&Packet::PubRel(Ack::new(2))).await;
    p.recv().await;
    let m1 = recv_publish(&mut s).await; // not acknowledged
    let m2 = recv_publish(&mut s).await;
    s.send(&Packet::PubRec(Ack::new(m2.packet_id))).await; // released, no PUBCOMP
    assert!(matches!(s.recv().await, Packet::PubRel(_)));
    drop(s);
    // The publisher leaves a QoS 2 message half done: PUBREC received, no PUBREL yet.
    p.send(&publish("rs/3", QoS::ExactlyOnce, 9, b"m3")).await;
    assert!(matches!(p.recv().await, Packet::PubRec(a) if a.packet_id == 9));
    drop(p);
    let mut q = tb.raw().await;
    online(&mut q, V5, "rs-other", true).await;
    q.send(&publish("rs/4", QoS::AtLeastOnce, 1, b"m4")).await; // queued for the offline sub
    q.recv().await;
    tb.broker.shutdown().await;

    let tb = TestBroker::with_store(BrokerConfig::default(), store).await;
    let mut s = tb.raw().await;
    assert!(handshake(&mut s, pers("rs-sub")).await.session_present);
    // In-flight first, in order: m1 again with DUP, PUBREL for m2; then the queue: m3, m4.
    let again = recv_publish(&mut s).await;
    assert!(again.dup && again.packet_id == m1.packet_id && &again.payload[..] == b"m1");
    assert!(matches!(s.recv().await, Packet::PubRel(a) if a.packet_id == m2.packet_id));
    let m3 = recv_publish(&mut s).await;
    assert_eq!(&m3.payload[..], b"m3");
    let m4 = recv_publish(&mut s).await;
    assert_eq!(&m4.payload[..], b"m4");
    // The publisher resends its half-done QoS 2 message: acknowledged, not delivered again.
    let mut p = tb.raw().await;
    assert!(handshake(&mut p, pers("rs-pub")).await.session_present);
    p.send(&Packet::Publish(Publish {
        dup: true,
        ..match publish("rs/3", QoS::ExactlyOnce, 9, b"m3") {
            Packet::Publish(x) => x,
            _ => unreachable!(),
        }
    }))
    .await;
    assert!(matches!(p.recv().await, Packet::PubRec(a) if a.packet_id == 9));
    p.send(&Packet::PubRel(Ack::new(9))).await;
    assert!(matches!(p.recv().await, Packet::PubComp(a) if a.reason == ReasonCode::Success));
    s.expect_silence(SHORT).await;
}

/// A store whose durability the test controls: tickets count up, nothing is durable until
/// the test says so.
struct GatedStore {
    inner: MemoryStore,
    next: std::sync::atomic::AtomicU64,
    durable: tokio::sync::watch::Sender<u64>,
}

impl GatedStore {
    fn new() -> std::sync::Arc<Self> {
        std::sync::Arc::new(GatedStore {
            inner: MemoryStore::new(),
            next: std::sync::atomic::AtomicU64::new(0),
            durable: tokio::sync::watch::channel(0).0,
        })
    }
}

impl halyard_store::Store for GatedStore {
    fn apply(&self, ops: Vec<halyard_store::Op>) -> u64 {
        self.inner.apply(ops);
        self.next.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1
    }
    fn recover(&self) -> halyard_store::Recovered {
        self.inner.recover()
    }
    fn durable(&self) -> Option<tokio::sync::watch::Receiver<u64>> {
        Some(self.durable.subscribe())
    }
}

#[tokio::test]
async fn acknowledgements_wait_until_the_store_made_the_change_durable() {
    let gated = GatedStore::new();
    let broker = Broker::new(BrokerConfig::default(), gated.clone());
    let pers = |id: &str| {
        connect_with(V5, id, false, |c| {
            c.properties.session_expiry_interval = Some(60)
        })
    };
    let mut s = raw_duplex(&broker);
    handshake(&mut s, pers("d-sub")).await;
    s.send(&subscribe(1, "d/#", QoS::AtLeastOnce)).await;
    s.expect_silence(SHORT).await; // SUBACK held: the subscription is not durable yet
    gated.durable.send_replace(u64::MAX >> 1);
    assert!(matches!(s.recv().await, Packet::SubAck(_)));
    s.send_hex("E0 00").await;
    s.expect_close().await;

    let mut p = raw_duplex(&broker);
    online(&mut p, V5, "d-pub", true).await;
    let before = gated.next.load(std::sync::atomic::Ordering::SeqCst);
    gated.durable.send_replace(before);
    p.send(&publish("d/1", QoS::AtLeastOnce, 1, b"x")).await;
    p.send(&publish("d/2", QoS::AtLeastOnce, 2, b"y")).await;
    p.send_hex("C0 00").await;
    // PINGRESP is not held, the PUBACKs are: the queued copies are not durable yet.
    assert_eq!(p.recv().await, Packet::PingResp);
    p.expect_silence(SHORT).await;
    gated.durable.send_replace(before + 1); // only the first message's ops
    assert!(matches!(p.recv().await, Packet::PubAck(a) if a.packet_id == 1));
    p.expect_silence(SHORT).await;
    gated.durable.send_replace(before + 2);
    assert!(
        matches!(p.recv().await, Packet::PubAck(a) if a.packet_id == 2),
        "in order"
    );
}

/// [MQTT-4.3.3-9] across a crash: a QoS 2 PUBLISH to a stored session reaches the client
/// only once its packet id (the `Sent` record) is durable. Otherwise a crash could lose the
/// id while the client holds the message and its PUBREC state, and the restarted broker
/// would resend the message under a new id, which the client must treat as a new message.
#[tokio::test]
async fn qos2_publish_to_a_stored_session_waits_until_its_packet_id_is_durable() {
    use std::sync::atomic::Ordering::SeqCst;
    let gated = GatedStore::new();
    let applied = |g: &GatedStore| g.next.load(SeqCst);
    // Waits until the store has seen more than `n` batches.
    async fn applied_beyond(g: &GatedStore, n: u64) {
        tokio::time::timeout(Duration::from_secs(10), async {
            while g.next.load(SeqCst) <= n {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        })
        .await
        .expect("the broker applied its store ops");
    }
    let broker = Broker::new(BrokerConfig::default(), gated.clone());
    for (v, id) in [(V5, "h2-v5"), (V3_1_1, "h2-311")] {
        let mut s = raw_duplex(&broker);
        let c = if v == V5 {
            connect_with(V5, id, false, |c| {
                c.properties.session_expiry_interval = Some(60)
            })
        } else {
            connect(V3_1_1, id, false, 60)
        };
        // CONNACK and SUBACK of a stored session wait for the store: make all durable.
        let n = applied(&gated);
        s.version = v;
        s.send(&c).await;
        applied_beyond(&gated, n).await;
        gated.durable.send_replace(applied(&gated));
        assert!(matches!(s.recv().await, Packet::ConnAck(_)));
        let n = applied(&gated);
        s.send(&subscribe(1, &format!("{id}/#"), QoS::ExactlyOnce))
            .await;
        applied_beyond(&gated, n).await;
        gated.durable.send_replace(applied(&gated));
        assert!(matches!(s.recv().await, Packet::SubAck(_)));

        let mut p = raw_duplex(&broker);
        online(&mut p, v, &format!("{id}-pub"), true).await;
        let n = applied(&gated);
        p.send(&publish(&format!("{id}/x"), QoS::ExactlyOnce, 1, b"once"))
            .await;
        applied_beyond(&gated, n).await;
        // The routing is durable: PUBREC to the publisher, and the subscriber's connection
        // takes the delivery from the queue, recording it as sent (one more batch).
        let routed = applied(&gated);
        gated.durable.send_replace(routed);
        assert!(matches!(p.recv().await, Packet::PubRec(_)));
        applied_beyond(&gated, routed).await;
        // ...but the PUBLISH stays in the broker until that record is durable.
        s.expect_silence(SHORT).await;
        gated.durable.send_replace(applied(&gated));
        let m = recv_publish(&mut s).await;
        assert_eq!(
            (m.qos, &m.payload[..]),
            (QoS::ExactlyOnce, &b"once"[..]),
            "{v:?}"
        );
        // PUBREL likewise waits until "PUBREC received" is durable: a client that got
        // PUBREL may complete and forget the id, so a restart that still saw the message as
        // unacknowledged would resend it and the client would deliver it twice
        // [MQTT-4.3.3-9].
        let n = applied(&gated);
        s.send(&Packet::PubRec(Ack::new(m.packet_id))).await;
        applied_beyond(&gated, n).await;
        s.expect_silence(SHORT).await;
        gated.durable.send_replace(applied(&gated));
        assert_eq!(
            s.recv().await,
            Packet::PubRel(Ack::new(m.packet_id)),
            "{v:?}"
        );
    }
}

#[tokio::test]
async fn log_store_restart_keeps_sessions_queues_and_retained() {
    let dir = std::env::temp_dir().join(format!("halyard-broker-logstore-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let open = || {
        std::sync::Arc::new(
            halyard_store::LogStore::open(halyard_store::LogConfig::new(&dir)).unwrap(),
        )
    };
    let pers = |id: &str| {
        connect_with(V5, id, false, |c| {
            c.properties.session_expiry_interval = Some(600)
        })
    };
    {
        let broker = Broker::new(BrokerConfig::default(), open());
        let mut s = raw_duplex(&broker);
        handshake(&mut s, pers("l-sub")).await;
        sub(&mut s, "l/#", QoS::ExactlyOnce).await;
        s.send_hex("E0 00").await;
        s.expect_close().await;
        let mut p = raw_duplex(&broker);
        online(&mut p, V5, "l-pub", true).await;
        for i in 0..3u16 {
            p.send(&publish("l/q", QoS::ExactlyOnce, i + 1, &[i as u8]))
                .await;
            assert!(matches!(p.recv().await, Packet::PubRec(_)));
        }
        p.send(&Packet::Publish(Publish {
            retain: true,
            qos: QoS::AtLeastOnce,
            packet_id: 9,
            ..Publish::new(topic("l/ret"), &b"kept"[..])
        }))
        .await;
        assert!(matches!(p.recv().await, Packet::PubAck(_)));
        broker.shutdown().await;
    }
    let broker = Broker::new(BrokerConfig::default(), open());
    let mut s = raw_duplex(&broker);
    assert!(handshake(&mut s, pers("l-sub")).await.session_present);
    let mut got = Vec::new();
    // QoS 2 ids whose PUBREL is still due (it comes once PUBREC's record is durable).
    let mut rel_due = std::collections::HashSet::new();
    while got.len() < 4 || !rel_due.is_empty() {
        match s.recv().await {
            Packet::Publish(m) => {
                got.push((m.topic.to_string(), m.payload.to_vec()));
                let a = Ack::new(m.packet_id);
                s.send(&if m.qos == QoS::ExactlyOnce {
                    rel_due.insert(m.packet_id);
                    Packet::PubRec(a)
                } else {
                    Packet::PubAck(a)
                })
                .await;
            }
            Packet::PubRel(a) => {
                rel_due.remove(&a.packet_id);
                s.send(&Packet::PubComp(Ack::new(a.packet_id))).await
            }
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(
        got,
        vec![
            ("l/q".into(), vec![0]),
            ("l/q".into(), vec![1]),
            ("l/q".into(), vec![2]),
            ("l/ret".into(), b"kept".to_vec())
        ]
    );
    // Everything was acknowledged: after one more restart nothing is delivered again.
    s.send_hex("C0 00").await;
    loop {
        match s.recv().await {
            Packet::PingResp => break,
            Packet::PubRel(a) => s.send(&Packet::PubComp(Ack::new(a.packet_id))).await,
            other => panic!("{other:?}"),
        }
    }
    s.send_hex("C0 00").await; // the PUBCOMP above was processed once this is answered
    assert_eq!(s.recv().await, Packet::PingResp);
    s.send_hex("E0 00").await;
    s.expect_close().await;
    broker.shutdown().await;
    drop(broker);
    // The store's directory lock goes with the last reference, once the tasks wound down.
    let store = loop {
        match halyard_store::LogStore::open(halyard_store::LogConfig::new(&dir)) {
            Ok(s) => break std::sync::Arc::new(s),
            Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
        }
    };
    let broker = Broker::new(BrokerConfig::default(), store);
    let mut s = raw_duplex(&broker);
    assert!(handshake(&mut s, pers("l-sub")).await.session_present);
    s.expect_silence(SHORT).await;
    broker.shutdown().await;
    let _ = std::fs::remove_dir_all(&dir);
}

/// Section 4.8.2: an unacknowledged QoS 1 message of a shared subscription goes to another
/// member when the session ends, whenever it ends: here on expiry (2 s after the close),
/// as it does at once for a session with expiry 0 (see the test above).
#[tokio::test(start_paused = true)]
async fn shared_inflight_of_an_expiring_session_goes_to_another_member_4_8_2() {
    let broker = Broker::new(
        BrokerConfig::default(),
        std::sync::Arc::new(MemoryStore::new()),
    );
    let mut b = raw_duplex(&broker);
    handshake(
        &mut b,
        connect_with(V5, "member-b", false, |c| {
            c.properties.session_expiry_interval = Some(2)
        }),
    )
    .await;
    sub(&mut b, "$share/g/jobs", QoS::AtLeastOnce).await;
    let mut p = raw_duplex(&broker);
    online(&mut p, V5, "pub", true).await;
    p.send(&publish("jobs", QoS::AtLeastOnce, 1, b"job")).await;
    p.recv().await;
    assert_eq!(&recv_publish(&mut b).await.payload[..], b"job"); // never acknowledged
    let mut a = raw_duplex(&broker);
    online(&mut a, V5, "member-a", true).await;
    sub(&mut a, "$share/g/jobs", QoS::AtLeastOnce).await;
    drop(b);
    // Kept for b while its session lasts (it would be resent to b on reconnect)...
    a.expect_silence(Duration::from_millis(1500)).await;
    // ...and a's once the session expires.
    let m = recv_publish(&mut a).await;
    assert_eq!(&m.payload[..], b"job");
}
