//! How the broker ends a connection it refuses or closes: the first packet before the
//! protocol version is known, and the last packet (a refusing CONNACK, a DISCONNECT) read
//! by a client that keeps writing after it.

mod common;

use std::time::Duration;

use common::*;
use halyard_broker::BrokerConfig;
use halyard_codec::*;
use halyard_testkit::{TestBroker, hex_bytes};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Sends `bytes` as a client's first packet and returns everything the broker sends until
/// it closes (a timeout fails the test).
async fn first_packet_answer(tb: &TestBroker, bytes: &[u8]) -> Vec<u8> {
    let mut s = TcpStream::connect(tb.addr).await.unwrap();
    s.write_all(bytes).await.unwrap();
    let mut got = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut got)).await;
    assert!(read.is_ok(), "the broker did not close after {bytes:02x?}");
    got
}

/// [MQTT-3.1.4-1], [MQTT-3.2.2-6]: a CONNECT that is not valid before its protocol level is
/// known, or a first packet that is not a CONNECT, is closed without a CONNACK (a 3.x
/// CONNACK has no codes for it, and MQTT 5 section 4.13.1 gives a reason only for an error
/// in a CONNECT).
#[tokio::test]
async fn invalid_first_packets_are_closed_without_connack_mqtt_3_1_4_1_and_3_2_2_6() {
    let tb = TestBroker::with_config(BrokerConfig {
        message_size_limit: 1024 * 1024,
        ..Default::default()
    })
    .await;
    let cases = [
        // 3.1.1 CONNECT with reserved fixed-header flags 0001 [MQTT-2.1.3-1].
        "11 10 00 04 4d 51 54 54 04 02 00 3c 00 04 65 33 31 31",
        // A five-byte Remaining Length [MQTT-1.5.5].
        "10 ff ff ff ff 7f",
        // A 3.1.1 CONNECT declaring 20,000,000 bytes: too large, and 3.1.1 cannot say so.
        "10 80 da c4 09 00 04 4d 51 54 54 04 02 00 3c",
        // A 3.1 CONNECT declaring the same.
        "10 80 da c4 09 00 06 4d 51 49 73 64 70 03 02 00 3c",
        // Reserved packet type 0.
        "00 00",
        // A SUBSCRIBE first [MQTT-3.1.0-1].
        "82 06 00 01 00 01 74 00",
        // A v5 CONNECT with reserved flags: its level is not known from the fixed header.
        "12 11 00 04 4d 51 54 54 05 02 00 3c 00 00 04 65 33 31 31",
    ];
    for hex in cases {
        let got = first_packet_answer(&tb, &hex_bytes(hex)).await;
        assert!(got.is_empty(), "{hex}: expected no bytes, got {got:02x?}");
    }
    // A v5 CONNECT declaring the same size is told 0x95 [MQTT-3.2.2-6 allows a CONNACK
    // with a reason code to a v5 client; section 4.13.1].
    let got = first_packet_answer(
        &tb,
        &hex_bytes("10 80 da c4 09 00 04 4d 51 54 54 05 02 00 3c"),
    )
    .await;
    assert_eq!(
        got,
        hex_bytes("20 03 00 95 00"),
        "v5 CONNECT over the size limit"
    );
}

/// MQTT 5.0 section 3.1.2.11.10: "It is a Protocol Error to include Authentication Data if
/// there is no Authentication Method."
#[tokio::test]
async fn authentication_data_without_a_method_is_a_protocol_error_3_1_2_11_10() {
    let tb = TestBroker::start().await;
    let mut c = tb.raw().await;
    let ack = handshake(
        &mut c,
        connect_with(V5, "auth-data", true, |c| {
            c.properties.authentication_data = Some(Bytes::from_static(b"secret"))
        }),
    )
    .await;
    assert_eq!(ack.reason, ReasonCode::ProtocolError, "{ack:?}");
    assert!(c.expect_close().await.is_empty());
}

/// After `trigger`, writes a PINGREQ every 2 ms for 200 ms as a busy client would (every
/// write must succeed: a RST from the broker would fail them), then reads what the broker
/// sent until it closes, and returns the packets.
async fn keep_writing_then_read(
    s: &mut TcpStream,
    v: ProtocolVersion,
    trigger: &[u8],
) -> Vec<Packet> {
    s.write_all(trigger).await.unwrap();
    for i in 0..100 {
        if let Err(e) = s.write_all(&[0xC0, 0x00]).await {
            panic!("write {i} after the trigger failed: {e} (the broker reset the connection)");
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let mut buf = BytesMut::new();
    let mut packets = Vec::new();
    loop {
        while let Some(p) = decode(&mut buf, v, MAX_PACKET_SIZE).unwrap() {
            packets.push(p);
        }
        let read = tokio::time::timeout(Duration::from_secs(5), s.read_buf(&mut buf))
            .await
            .expect("the broker closes");
        match read {
            Ok(0) => return packets,
            Ok(_) => {}
            Err(e) => {
                panic!("read failed after {packets:?}: {e} (the broker reset the connection)")
            }
        }
    }
}

fn encoded(p: &Packet, v: ProtocolVersion) -> Vec<u8> {
    let mut b = BytesMut::new();
    p.encode(v, &mut b).unwrap();
    b.to_vec()
}

async fn connected(tb: &TestBroker, v: ProtocolVersion, id: &str) -> TcpStream {
    let mut s = TcpStream::connect(tb.addr).await.unwrap();
    s.write_all(&encoded(&connect(v, id, true, 60), v))
        .await
        .unwrap();
    let mut buf = BytesMut::new();
    loop {
        s.read_buf(&mut buf).await.unwrap();
        if let Some(p) = decode(&mut buf, v, MAX_PACKET_SIZE).unwrap() {
            assert!(
                matches!(&p, Packet::ConnAck(a) if a.reason == ReasonCode::Success),
                "{p:?}"
            );
            return s;
        }
    }
}

fn last_disconnect(packets: &[Packet]) -> ReasonCode {
    match packets.last() {
        Some(Packet::Disconnect(d)) => d.reason,
        other => panic!("expected a DISCONNECT last, got {other:?} in {packets:?}"),
    }
}

/// [MQTT-3.3.4-9] 0x93: a client that keeps writing after its third QoS 2 PUBLISH over
/// Receive Maximum 2 still reads the DISCONNECT [MQTT-4.13.2-1].
#[tokio::test]
async fn disconnect_0x93_reaches_a_client_that_keeps_writing() {
    let tb = TestBroker::with_config(BrokerConfig {
        max_inflight_messages: 2,
        ..Default::default()
    })
    .await;
    let mut s = connected(&tb, V5, "flood").await;
    let mut trigger = Vec::new();
    for id in 1..=3 {
        trigger.extend(encoded(&publish("f", QoS::ExactlyOnce, id, b"x"), V5));
    }
    let got = keep_writing_then_read(&mut s, V5, &trigger).await;
    assert_eq!(last_disconnect(&got), ReasonCode::ReceiveMaximumExceeded);
}

/// Protocol error (a second CONNECT [MQTT-3.1.0-2]), packet too large (0x95), and a
/// session taken over (0x8E [MQTT-3.1.4-3]): the DISCONNECT is read by a client that keeps
/// writing.
#[tokio::test]
async fn every_server_disconnect_reaches_a_client_that_keeps_writing() {
    let tb = TestBroker::with_config(BrokerConfig {
        message_size_limit: 1000,
        ..Default::default()
    })
    .await;
    let mut s = connected(&tb, V5, "twice").await;
    let got =
        keep_writing_then_read(&mut s, V5, &encoded(&connect(V5, "twice", true, 60), V5)).await;
    assert_eq!(last_disconnect(&got), ReasonCode::ProtocolError);

    let mut s = connected(&tb, V5, "big").await;
    let big = encoded(&publish("big", QoS::AtMostOnce, 0, &[0u8; 2000]), V5);
    let got = keep_writing_then_read(&mut s, V5, &big).await;
    assert_eq!(last_disconnect(&got), ReasonCode::PacketTooLarge);

    // Taken over while it writes: the new connection arrives during the writes.
    let mut old = connected(&tb, V5, "taken").await;
    let takeover = tokio::spawn({
        let addr = tb.addr;
        async move {
            tokio::time::sleep(Duration::from_millis(20)).await;
            let mut s = TcpStream::connect(addr).await.unwrap();
            s.write_all(&encoded(&connect(V5, "taken", true, 60), V5))
                .await
                .unwrap();
            let mut b = [0u8; 16];
            let _ = s.read(&mut b).await;
            s
        }
    });
    let got = keep_writing_then_read(&mut old, V5, &[]).await;
    let _new = takeover.await.unwrap();
    assert_eq!(last_disconnect(&got), ReasonCode::SessionTakenOver);
}

/// A refusing CONNACK (3.1.1 return code 2, v5 0x85: client id over the limit) reaches a
/// client that writes on without waiting for it [MQTT-3.2.2-5].
async fn refusing_connack_reaches_a_client_that_keeps_writing(v: ProtocolVersion) {
    let tb = TestBroker::with_config(BrokerConfig {
        max_client_id_length: 8,
        ..Default::default()
    })
    .await;
    let mut s = TcpStream::connect(tb.addr).await.unwrap();
    let got = keep_writing_then_read(
        &mut s,
        v,
        &encoded(&connect(v, "much-too-long-an-id", true, 60), v),
    )
    .await;
    match got.as_slice() {
        [Packet::ConnAck(a)] => assert_eq!(a.reason, ReasonCode::ClientIdentifierNotValid),
        other => panic!("expected one refusing CONNACK, got {other:?}"),
    }
}

both_versions!(refusing_connack_reaches_a_client_that_keeps_writing);

/// An administrator's kick (0x98) and the broker shutting down (0x8B [MQTT-4.13.2-1]):
/// the DISCONNECT is read by a client that keeps writing meanwhile.
#[tokio::test]
async fn kick_and_shutdown_disconnects_reach_a_client_that_keeps_writing() {
    let tb = TestBroker::start().await;
    let mut kicked = connected(&tb, V5, "kicked").await;
    let broker = tb.broker.clone();
    let kick = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(broker.kick("kicked"), "the client is connected");
    });
    let got = keep_writing_then_read(&mut kicked, V5, &[]).await;
    kick.await.unwrap();
    assert_eq!(last_disconnect(&got), ReasonCode::AdministrativeAction);

    let mut s = connected(&tb, V5, "at-shutdown").await;
    let broker = tb.broker.clone();
    let stop = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(20)).await;
        broker.shutdown().await
    });
    let got = keep_writing_then_read(&mut s, V5, &[]).await;
    stop.await.unwrap();
    assert_eq!(last_disconnect(&got), ReasonCode::ServerShuttingDown);
}
