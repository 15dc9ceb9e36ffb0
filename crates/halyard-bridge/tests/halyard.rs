//! Halyard bridged to Halyard: no loops, hot reload of one bridge, notifications, and the
//! hostile paths (a network client asking for a bridge's session; a loop through a
//! client that is not a bridge).

mod common;

use common::*;
use halyard_client::{Client, Error, ProtocolVersion, QoS, ReasonCode};

/// Two brokers bridged both ways on `#`, in the two ways users set it up (one bridge
/// `both`; one `out` bridge on each side): every message arrives once on each side.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_halyards_bridged_both_ways_on_everything_no_loop() {
    for (layout, v) in [
        ("both", "mqttv50"),
        ("both", "mqttv311"),
        ("out-each", "mqttv50"),
    ] {
        let tag = format!("{layout}-{v}");
        let a = Side::start("A").await;
        let b = Side::start("B").await;
        if layout == "both" {
            a.add(bridge(
                "ab",
                &b.url(),
                &["# both 1"],
                serde_json::json!({"protocol_version": v}),
            ))
            .await;
        } else {
            a.add(bridge(
                "ab",
                &b.url(),
                &["# out 1"],
                serde_json::json!({"protocol_version": v}),
            ))
            .await;
            b.add(bridge(
                "ba",
                &a.url(),
                &["# out 1"],
                serde_json::json!({"protocol_version": v}),
            ))
            .await;
            b.connected("ba").await;
        }
        a.connected("ab").await;
        let ca = client(&a.url(), ProtocolVersion::V5, "ca").await;
        let cb = client(&b.url(), ProtocolVersion::V5, "cb").await;
        let mut sa = ca.subscribe("t/#", QoS::AtLeastOnce).await.unwrap();
        let mut sb = cb.subscribe("t/#", QoS::AtLeastOnce).await.unwrap();
        // Wait until the in direction (or B's bridge) is subscribed: a probe from B
        // reaches A.
        loop {
            publish(&cb, "t/probe", "probe", QoS::AtMostOnce).await;
            if tokio::time::timeout(std::time::Duration::from_millis(200), sa.recv())
                .await
                .is_ok()
            {
                break;
            }
        }
        for i in 0..10 {
            publish(&ca, "t/a", &format!("a{i}"), QoS::AtLeastOnce).await;
            publish(&cb, "t/b", &format!("b{i}"), QoS::AtLeastOnce).await;
        }
        // Each side's end marker follows its messages on every path, in order.
        publish(&ca, "t/a", "end", QoS::AtLeastOnce).await;
        publish(&cb, "t/b", "end", QoS::AtLeastOnce).await;
        for (sub, side) in [(&mut sa, "A"), (&mut sb, "B")] {
            let mut got = Vec::new();
            let mut ends = 0;
            while ends < 2 {
                let m = recv(sub).await;
                match &m.payload[..] {
                    b"end" => ends += 1,
                    b"probe" => {}
                    p => got.push(String::from_utf8_lossy(p).to_string()),
                }
            }
            got.sort();
            let mut want: Vec<String> = (0..10)
                .flat_map(|i| [format!("a{i}"), format!("b{i}")])
                .collect();
            want.sort();
            assert_eq!(got, want, "{tag}: seen on {side}, each once");
        }
        a.bridges.shutdown().await;
        b.bridges.shutdown().await;
    }
}

/// A loop that goes through an ordinary client, not a bridge (a user republishing what a
/// bridge brought in, properties kept): the hop property names this broker, so it is not
/// routed again. Counted in `bridge_loops_dropped`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_that_already_crossed_this_broker_is_not_routed_again() {
    let a = Side::start("A").await;
    let b = Side::start("B").await;
    a.add(bridge(
        "ab",
        &b.url(),
        &["x/# out 1"],
        serde_json::json!({}),
    ))
    .await;
    a.connected("ab").await;
    let cb = client(&b.url(), ProtocolVersion::V5, "relay").await;
    let mut at_b = cb.subscribe("x/#", QoS::AtLeastOnce).await.unwrap();
    let ca = client(&a.url(), ProtocolVersion::V5, "pub").await;
    let mut at_a = ca.subscribe("x/#", QoS::AtLeastOnce).await.unwrap();
    publish(&ca, "x/1", "m", QoS::AtLeastOnce).await;
    let m = recv(&mut at_b).await;
    assert!(
        m.properties
            .user_properties
            .iter()
            .any(|(k, v)| &k[..] == "halyard-hop" && &v[..] == "A"),
        "the bridge marks what it forwards: {:?}",
        m.properties.user_properties
    );
    assert_eq!(recv(&mut at_a).await.payload, "m");
    // The relay publishes it back to A, properties and all.
    let back = client(&a.url(), ProtocolVersion::V5, "back").await;
    let mut again = m.clone();
    again.topic = "x/1".into();
    back.publish(again).await.unwrap();
    publish(&back, "x/1", "end", QoS::AtLeastOnce).await;
    assert!(
        until_marker(&mut at_a, "end").await.is_empty(),
        "not routed again"
    );
    assert_eq!(a.broker.broker.stats().bridge_loops_dropped, 1);
}

/// Hot reload: a changed bridge restarts with its new filters (the removed one is
/// unsubscribed at the remote and here), another bridge is not touched, a removed bridge
/// stops and its local session ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_changes_one_bridge_and_unsubscribes_removed_filters() {
    let remote = Side::start("R").await;
    let dir = std::env::temp_dir().join(format!("halyard-bridge-state-{}", std::process::id()));
    let local = Side::start("L").await;
    let bridges = halyard_bridge::Bridges::new(
        local.broker.broker.clone(),
        Some("L".into()),
        Some(dir.clone()),
    );
    let one = |topics: &[&str]| bridge("one", &remote.url(), topics, serde_json::json!({}));
    let two = bridge(
        "two",
        &remote.url(),
        &["keep/# out 1"],
        serde_json::json!({}),
    );
    bridges
        .apply(vec![one(&["old/# in 1", "oldout/# out 1"]), two.clone()])
        .await
        .unwrap();
    eventually("both up", || {
        bridges.status().iter().all(|s| s.state == "connected")
    })
    .await;
    let two_connects = bridges.get("two").unwrap().connects;
    let report = bridges
        .apply(vec![one(&["new/# in 1", "newout/# out 1"]), two])
        .await
        .unwrap();
    assert_eq!(report.changed, ["one"]);
    assert!(report.added.is_empty() && report.removed.is_empty());
    eventually("one up again", || {
        bridges.get("one").unwrap().state == "connected"
    })
    .await;
    assert_eq!(
        bridges.get("two").unwrap().connects,
        two_connects,
        "two was not touched"
    );
    let here = client(&local.url(), ProtocolVersion::V5, "here").await;
    let there = client(&remote.url(), ProtocolVersion::V5, "there").await;
    let mut here_sub = here.subscribe("+/#", QoS::AtLeastOnce).await.unwrap();
    let mut there_sub = there.subscribe("+/#", QoS::AtLeastOnce).await.unwrap();
    loop {
        publish(&there, "new/probe", "probe", QoS::AtMostOnce).await;
        if tokio::time::timeout(std::time::Duration::from_millis(200), here_sub.recv())
            .await
            .is_ok()
        {
            break;
        }
    }
    // Removed filters carry nothing any more; the new ones do.
    publish(&there, "old/x", "stale-in", QoS::AtLeastOnce).await;
    publish(&there, "new/x", "end", QoS::AtLeastOnce).await;
    let got = until_marker(&mut here_sub, "end").await;
    assert!(
        payloads(&got).iter().all(|p| p != "stale-in"),
        "old/# unsubscribed at the remote: {:?}",
        payloads(&got)
    );
    publish(&here, "oldout/x", "stale-out", QoS::AtLeastOnce).await;
    publish(&here, "newout/x", "end", QoS::AtLeastOnce).await;
    let got = until_marker(&mut there_sub, "end").await;
    assert!(
        payloads(&got).iter().all(|p| p != "stale-out"),
        "oldout/# unsubscribed here: {:?}",
        payloads(&got)
    );
    // Removing `two` ends its local session.
    let report = bridges
        .apply(vec![one(&["new/# in 1", "newout/# out 1"])])
        .await
        .unwrap();
    assert_eq!(report.removed, ["two"]);
    assert!(
        local.broker.broker.queue_stats("$bridge/two").is_none(),
        "its session ended"
    );
    bridges.shutdown().await;
    let _ = std::fs::remove_dir_all(dir);
}

/// Notifications: `1` retained on the state topic here and at the remote while the link
/// is up; `0` here when it goes down, and at the remote by the bridge's will
/// [MQTT-3.1.2-8] when the link breaks without a DISCONNECT.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn notifications_say_whether_the_link_is_up() {
    let remote = Mosquitto::start();
    let local = Side::start("L").await;
    local
        .add(bridge(
            "n",
            &remote.url(),
            &["n/# out 1"],
            serde_json::json!({"remote_clientid": "site-n"}),
        ))
        .await;
    local.connected("n").await;
    let topic = "$SYS/broker/connection/site-n/state";
    let here = client(&local.url(), ProtocolVersion::V5, "watch-here").await;
    let there = client(&remote.url(), ProtocolVersion::V5, "watch-there").await;
    let mut h = here.subscribe(topic, QoS::AtLeastOnce).await.unwrap();
    let mut t = there.subscribe(topic, QoS::AtLeastOnce).await.unwrap();
    for s in [&mut h, &mut t] {
        let m = recv(s).await;
        assert_eq!((&m.payload[..], m.retain), (&b"1"[..], true));
    }
    local.bridges.pause("n", true).unwrap();
    for s in [&mut h, &mut t] {
        assert_eq!(recv(s).await.payload, "0");
    }
    local.bridges.shutdown().await;
}

/// Hostile: a network client asking for a bridge's local session (`$bridge/...`) is
/// refused (5.0: 0x85; 3.1.1: return code 2), so it cannot read and acknowledge away a
/// bridge's queue.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_network_client_cannot_take_a_bridge_session() {
    let remote = Side::start("R").await;
    let local = Side::start("L").await;
    local
        .add(bridge(
            "cloud",
            &remote.url(),
            &["a/# out 1"],
            serde_json::json!({}),
        ))
        .await;
    local.connected("cloud").await;
    for v in VERSIONS {
        let c = Client::connect(opts(&local.url(), v, "$bridge/cloud").reconnect(
            halyard_client::Reconnect {
                enabled: false,
                ..Default::default()
            },
        ));
        match c.connected().await {
            Err(Error::Refused { reason, .. }) => {
                assert_eq!(reason, ReasonCode::ClientIdentifierNotValid, "{v:?}");
            }
            other => panic!("{v:?}: {other:?}"),
        }
    }
    assert_eq!(
        local.status("cloud").state,
        "connected",
        "the bridge was not kicked"
    );
    local.bridges.shutdown().await;
}
