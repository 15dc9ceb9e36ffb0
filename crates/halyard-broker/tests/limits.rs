//! Limits on what one client can make the broker hold, MQTT 3.1.1 and 5.0: client id
//! length, subscriptions per client, topic levels and length, publish rate (reads paused,
//! nothing dropped; paused time), retained count and bytes.

mod common;

use std::time::Duration;

use common::*;
use halyard_broker::BrokerConfig;
use halyard_codec::*;
use halyard_testkit::{TestBroker, raw_duplex};

fn cfg() -> BrokerConfig {
    BrokerConfig {
        max_client_id_length: 16,
        max_subscriptions_per_client: 2,
        max_topic_levels: 4,
        max_topic_length: 32,
        max_retained_messages: 2,
        max_retained_bytes: 16, // topic + payload (+ properties) of each
        ..BrokerConfig::default()
    }
}

async fn client_id_length(v: ProtocolVersion) {
    let tb = TestBroker::with_config(cfg()).await;
    let mut c = tb.raw().await;
    online(&mut c, v, "sixteen-bytes-id", true).await;
    let mut c = tb.raw().await;
    let ack = handshake(&mut c, connect(v, "seventeen-bytes-x", true, 60)).await;
    // v5 0x85; 3.1.1 return code 2 (identifier rejected) [MQTT-3.2.2-6 table].
    assert_eq!(ack.reason, ReasonCode::ClientIdentifierNotValid);
}

async fn subscriptions_per_client(v: ProtocolVersion) {
    let tb = TestBroker::with_config(cfg()).await;
    let mut c = tb.raw().await;
    online(&mut c, v, "s", true).await;
    for (i, f) in ["a", "b"].iter().enumerate() {
        c.send(&subscribe(i as u16 + 1, f, QoS::AtMostOnce)).await;
        assert!(matches!(c.recv().await, Packet::SubAck(s) if !s.reasons[0].is_error()));
    }
    // A third filter is over quota; re-subscribing an existing one is not.
    c.send(&subscribe(3, "c", QoS::AtMostOnce)).await;
    let Packet::SubAck(s) = c.recv().await else {
        panic!()
    };
    let want = if v.is_v5() {
        ReasonCode::QuotaExceeded
    } else {
        ReasonCode::UnspecifiedError
    };
    assert_eq!(s.reasons[0], want);
    c.send(&subscribe(4, "a", QoS::AtLeastOnce)).await;
    let Packet::SubAck(s) = c.recv().await else {
        panic!()
    };
    assert_eq!(s.reasons[0], ReasonCode::GrantedQoS1);
    assert_eq!(tb.broker.stats().subscribe_quota_exceeded, 1);
}

async fn topic_levels_and_length(v: ProtocolVersion) {
    let tb = TestBroker::with_config(cfg()).await;
    let mut sub_c = tb.raw().await;
    online(&mut sub_c, v, "sub", true).await;
    sub(&mut sub_c, "#", QoS::AtLeastOnce).await;
    let mut c = tb.raw().await;
    online(&mut c, v, "pub", true).await;
    // Filters: 5 levels, 33 bytes: refused (v5 0x8F, 3.1.1 0x80).
    for f in ["a/b/c/d/e", "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa"] {
        c.send(&subscribe(1, f, QoS::AtMostOnce)).await;
        let Packet::SubAck(s) = c.recv().await else {
            panic!()
        };
        let want = if v.is_v5() {
            ReasonCode::TopicFilterInvalid
        } else {
            ReasonCode::UnspecifiedError
        };
        assert_eq!(s.reasons[0], want, "{f}");
    }
    // Topic names: refused with 0x90 (v5), acknowledged and dropped (3.1.1).
    for t in ["a/b/c/d/e", "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa"] {
        c.send(&publish(t, QoS::AtLeastOnce, 2, b"x")).await;
        let Packet::PubAck(a) = c.recv().await else {
            panic!()
        };
        let want = if v.is_v5() {
            ReasonCode::TopicNameInvalid
        } else {
            ReasonCode::Success
        };
        assert_eq!(a.reason, want, "{t}");
    }
    c.send(&publish("a/b/c/d", QoS::AtLeastOnce, 3, b"ok"))
        .await;
    assert!(matches!(c.recv().await, Packet::PubAck(_)));
    assert_eq!(
        recv_publish(&mut sub_c).await.topic.as_str(),
        "a/b/c/d",
        "only the one within limits"
    );
    assert_eq!(tb.broker.stats().topic_refused, 4);
}

async fn retained_count_and_bytes(v: ProtocolVersion) {
    let tb = TestBroker::with_config(cfg()).await;
    let mut c = tb.raw().await;
    online(&mut c, v, "p", true).await;
    let retain = |t: &str, payload: &[u8]| {
        let Packet::Publish(p) = publish(t, QoS::AtLeastOnce, 1, payload) else {
            unreachable!()
        };
        Packet::Publish(Publish { retain: true, ..p })
    };
    for (t, p) in [
        ("r/1", &b"12345"[..]),
        ("r/2", b"1234"),
        ("r/3", b"1"),
        ("r/1", b"1234567"),
    ] {
        c.send(&retain(t, p)).await;
        assert!(matches!(c.recv().await, Packet::PubAck(_)));
    }
    // r/3 was over the count (2), r/1's growth to 3 + 7 bytes over the byte budget (16,
    // with r/2's 3 + 4): the earlier values stay. A replacement that shrinks is always accepted.
    c.send(&retain("r/2", b"1")).await;
    assert!(matches!(c.recv().await, Packet::PubAck(_)));
    assert_eq!(tb.broker.counts().2, 2);
    assert_eq!(tb.broker.stats().retained_refused, 2);
    let mut s = tb.raw().await;
    online(&mut s, v, "s", true).await;
    sub(&mut s, "r/+", QoS::AtMostOnce).await;
    let mut got = vec![];
    for _ in 0..2 {
        let p = recv_publish(&mut s).await;
        got.push((p.topic.to_string(), p.payload.to_vec()));
    }
    got.sort();
    assert_eq!(
        got,
        vec![
            ("r/1".into(), b"12345".to_vec()),
            ("r/2".into(), b"1".to_vec())
        ]
    );
}

both_versions!(
    client_id_length,
    subscriptions_per_client,
    topic_levels_and_length,
    retained_count_and_bytes,
);

/// Over its publish rate a client is not read from: with 10 messages/s and a burst of 10,
/// 30 QoS 1 publishes take 2 s of (paused) time and every one is acknowledged and
/// delivered; nothing is dropped.
async fn publish_rate_pauses_reads(v: ProtocolVersion) {
    let b = halyard_broker::Broker::new(
        BrokerConfig {
            publish_rate_messages: 10,
            ..BrokerConfig::default()
        },
        std::sync::Arc::new(halyard_store::MemoryStore::new()),
    );
    let mut s = raw_duplex(&b);
    online(&mut s, v, "s", true).await;
    sub(&mut s, "rate/t", QoS::AtLeastOnce).await;
    let mut c = raw_duplex(&b);
    online(&mut c, v, "p", true).await;
    let t0 = tokio::time::Instant::now();
    for i in 1..=30u16 {
        c.send(&publish("rate/t", QoS::AtLeastOnce, i, b"x")).await;
    }
    for _ in 0..30 {
        assert!(matches!(c.recv().await, Packet::PubAck(_)));
    }
    let elapsed = t0.elapsed();
    assert!(
        elapsed >= Duration::from_millis(1900) && elapsed < Duration::from_secs(3),
        "30 messages at 10/s after a burst of 10: {elapsed:?}"
    );
    for _ in 0..30 {
        let p = recv_publish(&mut s).await;
        s.send(&Packet::PubAck(Ack::new(p.packet_id))).await;
    }
    assert!(b.stats().publish_throttled >= 1);
    assert_eq!(b.stats().messages_received, 30);
}

mod paused {
    use super::*;
    #[tokio::test(start_paused = true)]
    async fn publish_rate_pauses_reads_v3_1_1() {
        publish_rate_pauses_reads(V3_1_1).await
    }
    #[tokio::test(start_paused = true)]
    async fn publish_rate_pauses_reads_v5() {
        publish_rate_pauses_reads(V5).await
    }
}

/// The global memory budget: with an offline subscriber holding everything, a publisher is
/// held back (no more PUBACKs, its PUBLISHes wait unread) once the bytes of messages alive
/// reach `max_memory_bytes`; when the subscriber drains, the publisher resumes and nothing
/// is lost.
async fn memory_budget_holds_back_publishers(v: ProtocolVersion) {
    let tb = TestBroker::with_config(BrokerConfig {
        max_memory_bytes: 64 * 1024,
        max_queued_messages: 10_000,
        max_queued_bytes: 0,
        ..BrokerConfig::default()
    })
    .await;
    let mut s = tb.raw().await;
    let c = connect_with(v, "mem-sub", true, |c| {
        if v.is_v5() {
            c.properties.session_expiry_interval = Some(600);
        } else {
            c.clean_start = false;
        }
    });
    assert_eq!(handshake(&mut s, c).await.reason, ReasonCode::Success);
    sub(&mut s, "mem/t", QoS::AtLeastOnce).await;
    s.send(&Packet::Disconnect(Disconnect {
        reason: ReasonCode::Success,
        properties: Properties::default(),
    }))
    .await;
    let _ = s.expect_close().await;

    let mut p = tb.raw().await;
    online(&mut p, v, "mem-pub", true).await;
    let payload = vec![7u8; 4096];
    for i in 1..=100u16 {
        p.send(&publish("mem/t", QoS::AtLeastOnce, i, &payload))
            .await;
    }
    let mut acked = 0;
    while let halyard_testkit::Recv::Packet(Packet::PubAck(_)) =
        p.recv_within(Duration::from_millis(500)).await
    {
        acked += 1;
    }
    let stats = tb.broker.stats();
    assert!(
        (16..=17).contains(&acked),
        "held back at the budget: {acked} acknowledged"
    );
    assert!(stats.publish_paused_memory >= 1);
    assert!(
        stats.message_bytes_alive <= 64 * 1024 + 4096 + 16,
        "{}",
        stats.message_bytes_alive
    );

    // The subscriber comes back and drains; the publisher goes on; nothing is lost.
    let mut s = tb.raw().await;
    let c = connect_with(v, "mem-sub", false, |c| {
        if v.is_v5() {
            c.properties.session_expiry_interval = Some(600);
        }
    });
    assert!(handshake(&mut s, c).await.session_present);
    for _ in 0..100 {
        let m = recv_publish(&mut s).await;
        s.send(&Packet::PubAck(Ack::new(m.packet_id))).await;
    }
    for _ in acked..100 {
        assert!(matches!(p.recv().await, Packet::PubAck(_)));
    }
    halyard_testkit::eventually("memory is freed", || {
        tb.broker.stats().message_bytes_alive == 0
    })
    .await;
}

/// Messages restored from the store at start-up are charged to `max_memory_bytes` like
/// received ones: a backlog bigger than the budget holds new publishers back until the
/// subscriber drains it, and draining it frees the charge.
async fn restored_messages_count_against_the_memory_budget(v: ProtocolVersion) {
    let store = std::sync::Arc::new(halyard_store::MemoryStore::new());
    let sub_connect = |clean| {
        connect_with(v, "mem-sub", clean, |c| {
            if v.is_v5() {
                c.properties.session_expiry_interval = Some(600);
            } else {
                c.clean_start = false;
            }
        })
    };
    let tb = TestBroker::with_store(BrokerConfig::default(), store.clone()).await;
    let mut s = tb.raw().await;
    assert_eq!(
        handshake(&mut s, sub_connect(true)).await.reason,
        ReasonCode::Success
    );
    sub(&mut s, "mem/t", QoS::AtLeastOnce).await;
    s.send_hex("E0 00").await;
    let _ = s.expect_close().await;
    let mut p = tb.raw().await;
    online(&mut p, v, "mem-pub", true).await;
    let payload = vec![7u8; 4096];
    for i in 1..=20u16 {
        p.send(&publish("mem/t", QoS::AtLeastOnce, i, &payload))
            .await;
        assert!(matches!(p.recv().await, Packet::PubAck(_)));
    }
    tb.broker.shutdown().await;

    // Restarted with a budget the 20 queued messages (~80 KiB) already exceed.
    let tb = TestBroker::with_store(
        BrokerConfig {
            max_memory_bytes: 64 * 1024,
            ..BrokerConfig::default()
        },
        store,
    )
    .await;
    let restored = tb.broker.stats().message_bytes_alive;
    assert!(
        restored >= 20 * 4096,
        "restored backlog charged: {restored}"
    );
    let mut p = tb.raw().await;
    online(&mut p, v, "mem-pub", true).await;
    p.send(&publish("mem/t", QoS::AtLeastOnce, 1, &payload))
        .await;
    assert!(
        matches!(
            p.recv_within(Duration::from_millis(300)).await,
            halyard_testkit::Recv::Timeout
        ),
        "a publisher is held back while the restored backlog is over the budget"
    );
    let mut s = tb.raw().await;
    assert!(handshake(&mut s, sub_connect(false)).await.session_present);
    for _ in 0..21 {
        let m = recv_publish(&mut s).await;
        s.send(&Packet::PubAck(Ack::new(m.packet_id))).await;
    }
    assert!(
        matches!(p.recv().await, Packet::PubAck(_)),
        "released once drained"
    );
    halyard_testkit::eventually("the restored messages' charge is freed", || {
        tb.broker.stats().message_bytes_alive == 0
    })
    .await;
}

mod memory {
    use super::*;
    #[tokio::test]
    async fn restored_messages_count_against_the_memory_budget_v3_1_1() {
        restored_messages_count_against_the_memory_budget(V3_1_1).await
    }
    #[tokio::test]
    async fn restored_messages_count_against_the_memory_budget_v5() {
        restored_messages_count_against_the_memory_budget(V5).await
    }
    #[tokio::test]
    async fn memory_budget_v3_1_1() {
        memory_budget_holds_back_publishers(V3_1_1).await
    }
    #[tokio::test]
    async fn memory_budget_v5() {
        memory_budget_holds_back_publishers(V5).await
    }
}
