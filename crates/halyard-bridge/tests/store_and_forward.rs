//! Store-and-forward: messages for a remote that is away are kept (on the broker's store)
//! and go out in order when it is back, across a broker restart; queue limits drop or
//! refuse exactly what their policy says; the remote's Receive Maximum is never exceeded.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use halyard_client::{Message, ProtocolVersion, QoS, ReasonCode};
use halyard_codec::{Ack, ConnAck, Packet, Properties};
use halyard_store::MemoryStore;
use halyard_testkit::RawClient;
use tokio::net::TcpListener;

/// The remote (Mosquitto) stopped while QoS 1 and QoS 2 messages are published here from
/// 3.1.1 and 5.0 clients, this broker restarted meanwhile, then the remote back: every
/// message arrives, in order per topic, QoS 2 exactly once [MQTT-4.3.3], QoS 1 at
/// least once [MQTT-4.3.2] (here: once, the link never broke mid-flight).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn remote_down_and_broker_restarted_nothing_lost_in_order() {
    let mut remote =
        Mosquitto::start_with(halyard_testkit::procs::free_port(), "max_queued_messages 0");
    let store = Arc::new(MemoryStore::new());
    let side = Side::with_store("edge", store.clone()).await;
    let b = bridge(
        "cloud",
        &remote.url(),
        &["up/# out 2"],
        serde_json::json!({}),
    );
    side.add(b.clone()).await;
    side.connected("cloud").await;
    // A persistent subscriber at the remote, so what arrives while it reconnects waits.
    let there = halyard_client::Client::connect(
        opts(&remote.url(), ProtocolVersion::V5, "there-sf")
            .clean_start(false)
            .session_expiry(3600),
    );
    there.connected().await.unwrap();
    let mut sub = there.subscribe("up/#", QoS::ExactlyOnce).await.unwrap();

    remote.stop();
    eventually("the link is down", || {
        side.status("cloud").state != "connected"
    })
    .await;
    const N: usize = 200;
    for v in VERSIONS {
        let here = client(&side.url(), v, &format!("pub-sf-{v:?}")).await;
        for i in 0..N {
            let q = if i % 2 == 0 {
                QoS::AtLeastOnce
            } else {
                QoS::ExactlyOnce
            };
            publish(&here, &format!("up/{v:?}/{}", i % 2), &format!("{i}"), q).await;
        }
        here.disconnect().await.unwrap();
    }
    assert_eq!(side.status("cloud").queue_depth, 2 * N, "all queued");
    // Restart this broker on the same store.
    side.bridges.shutdown().await;
    side.broker.broker.shutdown().await;
    drop(side);
    let side = Side::with_store("edge", store).await;
    side.add(b).await;
    assert_eq!(
        side.status("cloud").queue_depth,
        2 * N,
        "still queued after the restart"
    );
    remote.restart("max_queued_messages 0");
    side.connected("cloud").await;

    let mut seen: std::collections::HashMap<String, Vec<usize>> = Default::default();
    for _ in 0..2 * N {
        let m = recv(&mut sub).await;
        seen.entry(m.topic.to_string())
            .or_default()
            .push(String::from_utf8_lossy(&m.payload).parse().unwrap());
    }
    for v in VERSIONS {
        for parity in 0..2 {
            let want: Vec<usize> = (0..N).filter(|i| i % 2 == parity).collect();
            assert_eq!(
                seen[&format!("up/{v:?}/{parity}")],
                want,
                "{v:?} {parity}: all, in order, once"
            );
        }
    }
    eventually("the queue is empty", || {
        let s = side.status("cloud");
        s.queue_depth == 0 && s.in_flight == 0
    })
    .await;
    side.bridges.shutdown().await;
}

/// A paused bridge with room for 3 queued messages (and 1 handed to the link), 6 QoS 1
/// messages published: `drop_new` keeps the first 4, `drop_oldest` the first and the
/// last 3, each drop counted. `block` refuses the last 2 with PUBACK 0x97 (5.0); a 3.1.1
/// publisher has no refusal, so its connection closes before the acknowledgement and
/// its client holds the message, sending it again until the queue has room: it arrives
/// after the bridge resumes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queue_full_each_policy_drops_exactly_what_it_says() {
    let remote = Side::start("cloud").await;
    for policy in ["drop_new", "drop_oldest", "block"] {
        for v in VERSIONS {
            let tag = format!("{policy}-{v:?}");
            let side = Side::start("edge").await;
            let there = client(&remote.url(), ProtocolVersion::V5, &format!("there-{tag}")).await;
            let mut there_sub = there
                .subscribe(format!("q/{tag}/#"), QoS::AtLeastOnce)
                .await
                .unwrap();
            side.add(bridge(
                "b",
                &remote.url(),
                &[&format!("q/{tag}/# out 1")],
                serde_json::json!({
                    "paused": true, "queue_max_messages": 3, "queue_policy": policy,
                    "receive_maximum": 1, "remote_clientid": format!("b-{tag}"),
                }),
            ))
            .await;
            eventually("paused", || side.status("b").state == "paused").await;
            let here = client(&side.url(), v, &format!("pub-{tag}")).await;
            let mut refused = Vec::new();
            let mut held_publish = None;
            for i in 0..6 {
                let d = here
                    .publish_nowait(
                        Message::new(format!("q/{tag}/t"), format!("{i}")).qos(QoS::AtLeastOnce),
                    )
                    .await
                    .unwrap();
                if policy == "block" && !v.is_v5() && i == 4 {
                    // Held: no acknowledgement while the queue is full.
                    let mut d = Box::pin(d);
                    assert!(
                        tokio::time::timeout(Duration::from_millis(500), &mut d)
                            .await
                            .is_err(),
                        "{tag}: the 3.1.1 publisher is held"
                    );
                    held_publish = Some(d);
                    break;
                }
                match d.await {
                    Err(halyard_client::Error::Rejected {
                        reason: ReasonCode::QuotaExceeded,
                        ..
                    }) => {
                        refused.push(i);
                    }
                    r => assert!(!r.unwrap().reason.is_error(), "{tag} {i}"),
                }
                if i == 0 {
                    // The first goes to the link (Receive Maximum 1), the rest queue.
                    eventually("handed to the link", || side.status("b").held == 1).await;
                }
            }
            let s = side.status("b");
            let (dropped, kept) = match policy {
                "drop_new" => (s.dropped.queue_full_new, vec![0, 1, 2, 3]),
                "drop_oldest" => (s.dropped.queue_full_oldest, vec![0, 3, 4, 5]),
                _ if v.is_v5() => (s.dropped.queue_full_refused, vec![0, 1, 2, 3]),
                _ => (s.dropped.queue_full_refused, vec![0, 1, 2, 3, 4]),
            };
            match (policy, v.is_v5()) {
                ("block", true) => {
                    assert_eq!(refused, [4, 5], "{tag}: refused with 0x97");
                    assert_eq!(dropped, 2, "{tag}: counted");
                }
                ("block", false) => assert!(dropped >= 1, "{tag}: counted"),
                _ => {
                    assert!(refused.is_empty(), "{tag}");
                    assert_eq!(dropped, 2, "{tag}: counted");
                }
            }
            side.bridges.pause("b", false).unwrap();
            let mut got = Vec::new();
            for _ in 0..kept.len() {
                got.push(
                    String::from_utf8_lossy(&recv(&mut there_sub).await.payload)
                        .parse::<usize>()
                        .unwrap(),
                );
            }
            assert_eq!(got, kept, "{tag}: exactly these arrive");
            if let Some(d) = held_publish {
                let r = tokio::time::timeout(WAIT, d)
                    .await
                    .expect("acknowledged once there is room");
                assert!(!r.unwrap().reason.is_error(), "{tag}");
            }
            // A marker after them: anything else would arrive before it.
            publish(&here, &format!("q/{tag}/t"), "end", QoS::AtLeastOnce).await;
            assert!(
                until_marker(&mut there_sub, "end").await.is_empty(),
                "{tag}: nothing more"
            );
            side.bridges.shutdown().await;
        }
    }
}

/// A remote whose CONNACK says Receive Maximum 5: the bridge never has more than 5 QoS 1
/// messages unacknowledged there [MQTT-3.3.4-7], and they all arrive once acknowledged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn remote_receive_maximum_5_is_never_exceeded() {
    let fake = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("tcp://{}", fake.local_addr().unwrap());
    let side = Side::start("edge").await;
    side.add(bridge(
        "rm",
        &url,
        &["rm/# out 1"],
        serde_json::json!({
            "protocol_version": "mqttv50", "receive_maximum": 100, "notifications": false,
        }),
    ))
    .await;
    let (sock, _) = fake.accept().await.unwrap();
    let mut r = RawClient::new(sock);
    let Packet::Connect(c) = r.recv().await else {
        panic!("CONNECT first")
    };
    // Ours to the remote: at most the configured window (and the local broker's own
    // Receive Maximum, which `in` messages meet next).
    assert!(
        c.properties
            .receive_maximum
            .is_some_and(|m| (1..=100).contains(&m))
    );
    r.send(&Packet::ConnAck(ConnAck {
        session_present: false,
        reason: ReasonCode::Success,
        properties: Properties {
            receive_maximum: Some(5),
            ..Properties::default()
        },
    }))
    .await;
    let here = client(&side.url(), ProtocolVersion::V5, "pub-rm").await;
    const N: usize = 60;
    let mut pending = Vec::new();
    for i in 0..N {
        pending.push(
            here.publish_nowait(Message::new("rm/t", format!("{i}")).qos(QoS::AtLeastOnce))
                .await
                .unwrap(),
        );
    }
    let mut outstanding: Vec<u16> = Vec::new();
    let mut got = Vec::new();
    let mut most = 0;
    while got.len() < N {
        match r.recv().await {
            Packet::Publish(p) => {
                outstanding.push(p.packet_id);
                got.push(
                    String::from_utf8_lossy(&p.payload)
                        .parse::<usize>()
                        .unwrap(),
                );
                most = most.max(outstanding.len());
                assert!(
                    outstanding.len() <= 5,
                    "[MQTT-3.3.4-7] {} in flight",
                    outstanding.len()
                );
                // Acknowledge only when the window is full: the bridge must wait.
                if outstanding.len() == 5 || got.len() == N {
                    for id in outstanding.drain(..) {
                        r.send(&Packet::PubAck(Ack::new(id))).await;
                    }
                }
            }
            Packet::Subscribe(_) | Packet::PingReq => {}
            other => panic!("unexpected {}", other.name()),
        }
    }
    assert_eq!(most, 5, "the window was used");
    assert_eq!(got, (0..N).collect::<Vec<_>>(), "in order");
    for d in pending {
        assert!(!d.await.unwrap().reason.is_error());
    }
    side.bridges.shutdown().await;
}

/// A link that breaks with messages unacknowledged: after reconnecting (session present)
/// they are sent again first, with DUP set and the same packet ids [MQTT-4.4.0-1]
/// [MQTT-3.3.1-1], then the rest; QoS 2 resumes with PUBREL where PUBREC had come
/// [MQTT-4.3.3].
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unacknowledged_messages_go_again_with_dup_and_the_same_packet_id() {
    let fake = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("tcp://{}", fake.local_addr().unwrap());
    let side = Side::start("edge").await;
    side.add(bridge(
        "dup",
        &url,
        &["d/# out 2"],
        serde_json::json!({
            "protocol_version": "mqttv50", "notifications": false, "restart_timeout": [1, 1],
        }),
    ))
    .await;
    let mut r = accept_fake(&fake).await;
    let here = client(&side.url(), ProtocolVersion::V5, "pub-dup").await;
    let mut pending = Vec::new();
    for i in 0..6 {
        let q = if i < 2 {
            QoS::ExactlyOnce
        } else {
            QoS::AtLeastOnce
        };
        pending.push(
            here.publish_nowait(Message::new("d/t", format!("{i}")).qos(q))
                .await
                .unwrap(),
        );
    }
    // The first four (the window): PUBREC the first QoS 2 one, acknowledge nothing else.
    let mut first = Vec::new();
    while first.len() < 4 {
        if let Packet::Publish(p) = r.recv().await {
            assert!(!p.dup);
            first.push((p.packet_id, p.payload.clone(), p.qos));
        }
    }
    r.send(&Packet::PubRec(Ack::new(first[0].0))).await;
    // Wait for the PUBREL, then break the link.
    loop {
        if let Packet::PubRel(a) = r.recv().await {
            assert_eq!(a.packet_id, first[0].0);
            break;
        }
    }
    drop(r);
    let mut r = accept_fake(&fake).await;
    // Again: PUBREL for the one PUBREC'd, and the other three in their order, with DUP.
    let mut again = Vec::new();
    let mut released = false;
    while again.len() < 3 || !released {
        match r.recv().await {
            Packet::PubRel(a) => {
                assert_eq!(a.packet_id, first[0].0);
                released = true;
            }
            Packet::Publish(p) => {
                assert!(p.dup, "[MQTT-3.3.1-1] DUP on a resend");
                again.push((p.packet_id, p.payload.clone(), p.qos));
            }
            other => panic!("unexpected {}", other.name()),
        }
    }
    assert_eq!(
        again,
        first[1..],
        "[MQTT-4.4.0-1] the same packets, in order"
    );
    // Finish everything; the last two follow.
    r.send(&Packet::PubComp(Ack::new(first[0].0))).await;
    for (id, _, qos) in &first[1..] {
        r.send(&if *qos == QoS::ExactlyOnce {
            Packet::PubRec(Ack::new(*id))
        } else {
            Packet::PubAck(Ack::new(*id))
        })
        .await;
    }
    let mut rest = Vec::new();
    while rest.len() < 2 {
        match r.recv().await {
            Packet::Publish(p) => {
                assert!(!p.dup);
                rest.push(String::from_utf8_lossy(&p.payload).to_string());
                r.send(&Packet::PubAck(Ack::new(p.packet_id))).await;
            }
            Packet::PubRel(a) => r.send(&Packet::PubComp(Ack::new(a.packet_id))).await,
            _ => {}
        }
    }
    assert_eq!(rest, ["4", "5"]);
    // The remote keeps answering while the publishers' acknowledgements come through.
    let serve = tokio::spawn(async move {
        loop {
            match r.recv_within(Duration::from_secs(30)).await {
                halyard_testkit::Recv::Packet(Packet::PubRel(a)) => {
                    r.send(&Packet::PubComp(Ack::new(a.packet_id))).await;
                }
                halyard_testkit::Recv::Packet(_) => {}
                _ => break,
            }
        }
    });
    for d in pending {
        let res = tokio::time::timeout(WAIT, d)
            .await
            .expect("acknowledged")
            .unwrap();
        assert!(!res.reason.is_error());
    }
    serve.abort();
    side.bridges.shutdown().await;
}

/// Accepts the bridge's connection on a fake remote: CONNECT, then a CONNACK with session
/// present and Receive Maximum 4.
async fn accept_fake(l: &TcpListener) -> RawClient<tokio::net::TcpStream> {
    let (sock, _) = l.accept().await.unwrap();
    let mut r = RawClient::new(sock);
    let Packet::Connect(_) = r.recv().await else {
        panic!("CONNECT first")
    };
    r.send(&Packet::ConnAck(ConnAck {
        session_present: true,
        reason: ReasonCode::Success,
        properties: Properties {
            receive_maximum: Some(4),
            ..Properties::default()
        },
    }))
    .await;
    r
}
