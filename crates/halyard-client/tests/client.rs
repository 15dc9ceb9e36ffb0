//! halyard-client against Halyard (in process) and against Mosquitto (a process), for MQTT
//! 3.1.1 and 5.0.

mod common;

use std::time::Duration;

use common::{AnyBroker, Mosquitto, WAIT, free_port};
use halyard_client::{
    Bytes, Client, ClientOptions, ClientState, ConnectionEvent, Error, Message, ProtocolVersion,
    QoS, Reconnect, SubscriptionOptions,
};
use halyard_testkit::TestBroker;
use tokio::time::timeout;

const VERSIONS: [ProtocolVersion; 2] = [ProtocolVersion::V3_1_1, ProtocolVersion::V5];
const BROKERS: [&str; 2] = ["halyard", "mosquitto"];

fn opts(url: &str, v: ProtocolVersion, id: &str) -> ClientOptions {
    ClientOptions::new(url)
        .protocol(v)
        .client_id(id)
        .reconnect(Reconnect {
            enabled: true,
            initial: Duration::from_millis(50),
            max: Duration::from_millis(400),
            retry_first_connect: true,
        })
}

async fn recv(sub: &mut halyard_client::Subscription) -> Message {
    timeout(WAIT, sub.recv())
        .await
        .expect("a message within the wait")
        .expect("the stream is open")
}

/// Publish and receive at every QoS; the delivered QoS is the minimum of the two
/// [MQTT-3.8.4-6], order is kept per topic and QoS [MQTT-4.6.0-6], retained messages reach
/// new subscribers with RETAIN set [MQTT-3.3.1-6].
#[tokio::test]
async fn pubsub_every_qos_both_versions_against_halyard_and_mosquitto() {
    for name in BROKERS {
        let broker = AnyBroker::start(name).await;
        for v in VERSIONS {
            let tag = format!("{name}-{v:?}");
            let sub_c = Client::connect(opts(&broker.url(), v, &format!("sub-{tag}")));
            let pub_c = Client::connect(opts(&broker.url(), v, &format!("pub-{tag}")));
            sub_c.connected().await.expect("subscriber connects");
            pub_c.connected().await.expect("publisher connects");
            for sq in [QoS::AtMostOnce, QoS::AtLeastOnce, QoS::ExactlyOnce] {
                let filter = format!("c/{tag}/{}/#", sq as u8);
                let mut sub = sub_c
                    .subscribe(filter.as_str(), sq)
                    .await
                    .expect("subscribe");
                assert_eq!(sub.granted_qos(), sq, "{tag}");
                for pq in [QoS::AtMostOnce, QoS::AtLeastOnce, QoS::ExactlyOnce] {
                    for i in 0..10u32 {
                        let topic = format!("c/{tag}/{}/{}", sq as u8, pq as u8);
                        let r = pub_c
                            .publish(Message::new(topic, format!("m{i}")).qos(pq))
                            .await
                            .expect("published");
                        assert!(!r.reason.is_error());
                    }
                    for i in 0..10u32 {
                        let m = recv(&mut sub).await;
                        assert_eq!(
                            m.payload,
                            Bytes::from(format!("m{i}")),
                            "{tag} sub {sq:?} pub {pq:?}"
                        );
                        assert_eq!(m.qos, sq.min(pq), "[MQTT-3.8.4-6] {tag}");
                        assert!(!m.retain);
                    }
                }
                sub.unsubscribe().await.expect("unsubscribe");
            }
            // Retained.
            let topic = format!("c/{tag}/retained");
            pub_c
                .publish(
                    Message::new(topic.as_str(), "kept")
                        .qos(QoS::AtLeastOnce)
                        .retain(true),
                )
                .await
                .expect("retained publish");
            let mut sub = sub_c
                .subscribe(topic.as_str(), QoS::AtLeastOnce)
                .await
                .expect("subscribe");
            let m = recv(&mut sub).await;
            assert!(m.retain, "[MQTT-3.3.1-6] {tag}");
            assert_eq!(m.payload, "kept");
            // Clear it [MQTT-3.3.1-10].
            pub_c
                .publish(
                    Message::new(topic.as_str(), "")
                        .qos(QoS::AtLeastOnce)
                        .retain(true),
                )
                .await
                .expect("clear retained");
            sub_c.disconnect().await.expect("disconnect");
            pub_c.disconnect().await.expect("disconnect");
            assert!(matches!(sub_c.state(), ClientState::Closed(None)));
        }
    }
}

/// v5 properties travel both ways [MQTT-3.3.2-17] (user properties, in order),
/// [MQTT-3.3.2-20] (content type), and subscription identifiers route overlapping
/// subscriptions to each stream [MQTT-3.3.4-3].
#[tokio::test]
async fn v5_properties_and_overlapping_subscriptions() {
    for name in BROKERS {
        let broker = AnyBroker::start(name).await;
        let c = Client::connect(opts(
            &broker.url(),
            ProtocolVersion::V5,
            &format!("props-{name}"),
        ));
        c.connected().await.expect("connects");
        let mut wide = c
            .subscribe("p/+", QoS::AtLeastOnce)
            .await
            .expect("subscribe");
        let mut exact = c
            .subscribe("p/x", QoS::AtLeastOnce)
            .await
            .expect("subscribe");
        let msg = Message::new("p/x", "hello")
            .qos(QoS::AtLeastOnce)
            .user_property("a", "1")
            .user_property("a", "2")
            .content_type("text/plain");
        c.publish(msg).await.expect("publish");
        for sub in [&mut wide, &mut exact] {
            let m = recv(sub).await;
            assert_eq!(m.payload, "hello", "{name}");
            let props: Vec<(&str, &str)> = m
                .properties
                .user_properties
                .iter()
                .map(|(k, v)| (k.as_ref(), v.as_ref()))
                .collect();
            assert_eq!(props, [("a", "1"), ("a", "2")], "[MQTT-3.3.2-17] {name}");
            assert_eq!(
                m.properties.content_type.as_deref(),
                Some("text/plain"),
                "{name}"
            );
        }
        // Only p/+ matches p/y.
        c.publish(Message::new("p/y", "only-wide").qos(QoS::AtLeastOnce))
            .await
            .expect("publish");
        assert_eq!(recv(&mut wide).await.payload, "only-wide");
        assert!(
            timeout(Duration::from_millis(200), exact.recv())
                .await
                .is_err(),
            "{name}: p/x must not get p/y"
        );
        c.disconnect().await.expect("disconnect");
    }
}

/// Request/response with a responder on another client, against both brokers (MQTT 5,
/// section 4.10: Response Topic and Correlation Data).
#[tokio::test]
async fn request_response_against_halyard_and_mosquitto() {
    for name in BROKERS {
        let broker = AnyBroker::start(name).await;
        let server = Client::connect(opts(
            &broker.url(),
            ProtocolVersion::V5,
            &format!("srv-{name}"),
        ));
        let requester = Client::connect(opts(
            &broker.url(),
            ProtocolVersion::V5,
            &format!("req-{name}"),
        ));
        let serving = server
            .serve("svc/upper", |m: Message| async move {
                Some(Bytes::from(
                    String::from_utf8_lossy(&m.payload).to_uppercase(),
                ))
            })
            .await
            .expect("serve");
        requester.connected().await.expect("connects");
        // Several at once: replies are matched by correlation data, not by order.
        let mut waits = Vec::new();
        for i in 0..20 {
            let r = requester.clone();
            waits.push(tokio::spawn(async move {
                r.request("svc/upper", format!("ping {i}"), WAIT).await
            }));
        }
        for (i, w) in waits.into_iter().enumerate() {
            let reply = w.await.expect("task").expect("reply");
            assert_eq!(reply.payload, Bytes::from(format!("PING {i}")), "{name}");
        }
        // Nobody answers here: a timeout, not a hang.
        let err = requester
            .request("svc/nobody", "x", Duration::from_millis(300))
            .await
            .expect_err("no responder");
        assert!(matches!(err, Error::Timeout), "{name}: {err}");
        serving.stop();
        // 3.1.1 cannot carry a response topic.
        let old = Client::connect(opts(
            &broker.url(),
            ProtocolVersion::V3_1_1,
            &format!("old-{name}"),
        ));
        assert!(matches!(
            old.request("svc/upper", "x", WAIT).await,
            Err(Error::NotSupported(_))
        ));
    }
}

/// The broker restarts under active clients (Mosquitto, stopped and started again with its
/// persistence): both clients reconnect by themselves, the sessions are resumed
/// (session present), messages published while the broker was away wait in the client's
/// queue and arrive afterwards — none of the QoS 1/2 messages the client accepted is lost.
/// (This test found that a 3.x client must bound its own in-flight window: Mosquitto
/// answers QoS 1 messages beyond its `max_inflight_messages` with "quota exceeded", which a
/// 3.1.1 PUBACK cannot carry, so they vanished silently.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconnects_after_mosquitto_restarts_and_loses_nothing() {
    for v in VERSIONS {
        let port = free_port();
        let mut mosq = Mosquitto::start_with(port, "");
        let url = mosq.url();
        let sub_c = Client::connect(
            opts(&url, v, &format!("rs-sub-{v:?}"))
                .clean_start(false)
                .session_expiry(3600),
        );
        let pub_c = Client::connect(
            opts(&url, v, &format!("rs-pub-{v:?}"))
                .clean_start(false)
                .session_expiry(3600),
        );
        let mut events = sub_c.events();
        sub_c.connected().await.expect("connects");
        pub_c.connected().await.expect("connects");
        let mut sub = sub_c
            .subscribe("rs/#", QoS::ExactlyOnce)
            .await
            .expect("subscribe");
        let mut deliveries = Vec::new();
        for i in 0..100u32 {
            let qos = if i % 2 == 0 {
                QoS::AtLeastOnce
            } else {
                QoS::ExactlyOnce
            };
            deliveries.push(
                pub_c
                    .publish_nowait(Message::new("rs/t", i.to_string()).qos(qos))
                    .await
                    .expect("queued"),
            );
            if i == 30 {
                mosq.stop();
            }
            if i == 60 {
                mosq.restart("");
            }
        }
        for d in deliveries {
            timeout(WAIT * 3, d)
                .await
                .expect("acknowledged in time")
                .expect("acknowledged");
        }
        let mut got = std::collections::BTreeMap::new();
        while got.len() < 100 {
            let Ok(Some(m)) = timeout(WAIT, sub.recv()).await else {
                let missing: Vec<u32> = (0..100).filter(|i| !got.contains_key(i)).collect();
                panic!("{v:?}: missing {missing:?}");
            };
            let i: u32 = std::str::from_utf8(&m.payload)
                .expect("utf8")
                .parse()
                .expect("number");
            *got.entry(i).or_insert(0u32) += 1;
        }
        for (i, n) in &got {
            if i % 2 == 1 {
                assert_eq!(*n, 1, "{v:?}: QoS 2 message {i} delivered {n} times");
            }
        }
        // The subscriber saw the loss and a resumed session.
        let mut saw_lost = false;
        let mut resumed = false;
        while let Ok(e) = events.try_recv() {
            match e {
                ConnectionEvent::ConnectionLost { .. } => saw_lost = true,
                ConnectionEvent::Connected {
                    session_present, ..
                } if saw_lost => resumed |= session_present,
                _ => {}
            }
        }
        assert!(
            saw_lost && resumed,
            "{v:?}: lost {saw_lost}, resumed {resumed}"
        );
        sub_c.disconnect().await.expect("disconnect");
        pub_c.disconnect().await.expect("disconnect");
    }
}

/// When the broker kept no session (another client took the id over with a clean start),
/// the client resubscribes by itself on reconnect.
#[tokio::test]
async fn resubscribes_when_the_session_was_not_kept() {
    for v in VERSIONS {
        let broker = TestBroker::start().await;
        let url = format!("tcp://{}", broker.addr);
        let c = Client::connect(opts(&url, v, "resub").clean_start(true));
        let mut events = c.events();
        c.connected().await.expect("connects");
        let mut sub = c
            .subscribe("rsb/t", QoS::AtLeastOnce)
            .await
            .expect("subscribe");
        // Take the client id over: the broker ends our connection [MQTT-3.1.4-3].
        let mut raw = broker.raw().await;
        // v5 CONNECT, clean start, client id "resub".
        raw.send_hex("10 12 00 04 4D 51 54 54 05 02 00 3C 00 00 05 72 65 73 75 62")
            .await;
        let _connack = raw.recv().await;
        raw.send_hex("E0 00").await;
        // Wait for our reconnection (session not present: it was clean).
        loop {
            match timeout(WAIT, events.recv())
                .await
                .expect("event")
                .expect("open")
            {
                ConnectionEvent::Connected {
                    session_present, ..
                } => {
                    assert!(!session_present);
                    break;
                }
                _ => continue,
            }
        }
        let p = Client::connect(opts(&url, v, "resub-pub"));
        // The resubscription may still be in flight: publish until it arrives.
        let got = timeout(WAIT, async {
            loop {
                p.publish(Message::new("rsb/t", "again").qos(QoS::AtLeastOnce))
                    .await
                    .expect("publish");
                if let Ok(Some(m)) = timeout(Duration::from_millis(100), sub.recv()).await {
                    return m;
                }
            }
        })
        .await
        .expect("the resubscribed stream receives");
        assert_eq!(got.payload, "again", "{v:?}");
        c.disconnect().await.expect("disconnect");
    }
}

/// While the broker is unreachable, publishes queue up to `max_queued`; the next fails at
/// once with QueueFull; when the broker comes up the queued ones are delivered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bounded_queue_while_disconnected() {
    let port = free_port();
    let url = format!("tcp://127.0.0.1:{port}");
    let c = Client::connect(opts(&url, ProtocolVersion::V5, "queued").max_queued(5));
    let mut ds = Vec::new();
    for i in 0..5 {
        ds.push(
            c.publish_nowait(Message::new("q/t", format!("{i}")).qos(QoS::AtLeastOnce))
                .await
                .expect("room in the queue"),
        );
    }
    let full = c
        .publish_nowait(Message::new("q/t", "6").qos(QoS::AtLeastOnce))
        .await;
    assert!(matches!(full, Err(Error::QueueFull)), "{full:?}");
    let mosq = Mosquitto::start_with(port, "");
    for d in ds {
        timeout(WAIT, d).await.expect("in time").expect("delivered");
    }
    // Room again.
    c.publish(Message::new("q/t", "7").qos(QoS::AtLeastOnce))
        .await
        .expect("publish");
    c.disconnect().await.expect("disconnect");
    drop(mosq);
}

/// A deliberate close never reconnects, and later calls fail with Closed.
#[tokio::test]
async fn no_reconnect_after_a_deliberate_close() {
    let broker = TestBroker::start().await;
    let c = Client::connect(opts(
        &format!("tcp://{}", broker.addr),
        ProtocolVersion::V5,
        "closer",
    ));
    let mut st = c.watch_state();
    c.connected().await.expect("connects");
    c.disconnect().await.expect("disconnect");
    timeout(
        WAIT,
        st.wait_for(|s| matches!(s, ClientState::Closed(None))),
    )
    .await
    .expect("closed in time")
    .expect("watch open");
    let err = c.publish(Message::new("x", "y")).await.expect_err("closed");
    assert!(matches!(err, Error::Closed));
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        matches!(c.state(), ClientState::Closed(None)),
        "still closed"
    );
    assert_eq!(broker.broker.counts().0, 0, "nobody connected");
}

/// CONNACK refusals surface as `Refused` with the reason code (reconnect off), for 3.1.1
/// return codes and v5 reason codes: Mosquitto with anonymous access off.
#[tokio::test]
async fn refused_connection_reports_the_reason() {
    let mosq = Mosquitto::start_with(free_port(), "allow_anonymous false");
    for v in VERSIONS {
        let mut o = opts(&mosq.url(), v, "anon");
        o.reconnect.enabled = false;
        let c = Client::connect(o);
        let err = c.connected().await.expect_err("refused");
        match err {
            Error::Refused { reason, .. } => assert!(
                matches!(
                    reason,
                    halyard_client::ReasonCode::NotAuthorized
                        | halyard_client::ReasonCode::BadUserNameOrPassword
                ),
                "{v:?}: {reason:?}"
            ),
            other => panic!("{v:?}: {other}"),
        }
        assert!(matches!(c.state(), ClientState::Closed(Some(_))));
    }
}

/// A message over the broker's Maximum Packet Size is refused by the client before it is
/// sent [MQTT-3.1.2-24]; the connection stays up.
#[tokio::test]
async fn maximum_packet_size_of_the_broker_is_respected() {
    let mosq = Mosquitto::start_with(free_port(), "max_packet_size 200");
    let c = Client::connect(opts(&mosq.url(), ProtocolVersion::V5, "big"));
    c.connected().await.expect("connects");
    let err = c
        .publish(Message::new("big/t", vec![0u8; 500]).qos(QoS::AtLeastOnce))
        .await
        .expect_err("too large");
    assert!(
        matches!(err, Error::PacketTooLarge { max: 200, .. }),
        "{err}"
    );
    c.publish(Message::new("big/t", vec![0u8; 50]).qos(QoS::AtLeastOnce))
        .await
        .expect("a small one still goes");
}

/// No-local [MQTT-3.8.3-3]: our own messages do not come back on such a subscription.
#[tokio::test]
async fn no_local_subscription_option() {
    for name in BROKERS {
        let broker = AnyBroker::start(name).await;
        let c = Client::connect(opts(&broker.url(), ProtocolVersion::V5, "nolocal"));
        let options = SubscriptionOptions {
            qos: QoS::AtLeastOnce,
            no_local: true,
            ..SubscriptionOptions::default()
        };
        let mut sub = c
            .subscribe_with("nl/t", options, Vec::new())
            .await
            .expect("subscribe");
        c.publish(Message::new("nl/t", "mine").qos(QoS::AtLeastOnce))
            .await
            .expect("publish");
        let other = Client::connect(opts(&broker.url(), ProtocolVersion::V5, "nolocal-other"));
        other
            .publish(Message::new("nl/t", "theirs").qos(QoS::AtLeastOnce))
            .await
            .expect("publish");
        assert_eq!(
            recv(&mut sub).await.payload,
            "theirs",
            "[MQTT-3.8.3-3] {name}"
        );
    }
}

/// A slow consumer: the subscription buffer fills, the client stops reading, and nothing
/// is lost or reordered once the consumer catches up (QoS 1).
#[tokio::test]
async fn slow_subscriber_gets_everything_in_order() {
    let broker = TestBroker::start().await;
    let url = format!("tcp://{}", broker.addr);
    let mut o = opts(&url, ProtocolVersion::V5, "slow");
    o.subscription_buffer = 4;
    let c = Client::connect(o);
    let mut sub = c
        .subscribe("slow/t", QoS::AtLeastOnce)
        .await
        .expect("subscribe");
    let p = Client::connect(opts(&url, ProtocolVersion::V5, "fast"));
    let mut ds = Vec::new();
    for i in 0..500u32 {
        ds.push(
            p.publish_nowait(Message::new("slow/t", i.to_string()).qos(QoS::AtLeastOnce))
                .await
                .expect("queued"),
        );
    }
    for d in ds {
        d.await.expect("acknowledged");
    }
    for i in 0..500u32 {
        let m = recv(&mut sub).await;
        assert_eq!(m.payload, Bytes::from(i.to_string()));
        if i % 50 == 0 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}
