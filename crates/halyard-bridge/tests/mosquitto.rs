//! A Halyard bridge to Debian's Mosquitto as the remote, MQTT 3.1.1 and 5.0.

mod common;

use common::*;
use halyard_client::{ProtocolVersion, QoS};

fn version_name(v: ProtocolVersion) -> &'static str {
    if v.is_v5() { "mqttv50" } else { "mqttv311" }
}

/// out, in and both, each message arriving once on each side: topics mapped by the
/// prefixes of Mosquitto's topic line; QoS the lower of the rule's and the message's
/// [MQTT-3.8.4-6]; on `both`, what the bridge brings in is not sent back (5.0: No Local
/// [MQTT-3.8.3-3]; 3.1.1: Mosquitto's bridge bit).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn out_in_and_both_against_mosquitto_each_message_once() {
    let remote = Mosquitto::start();
    for v in VERSIONS {
        let tag = version_name(v);
        let local = Side::start("edge").await;
        local
            .add(bridge(
                "cloud",
                &remote.url(),
                &[
                    &format!("sensors/# out 1 site1/{tag}/ edge/{tag}/"),
                    &format!("cmd/{tag}/# in 2"),
                    &format!("sync/{tag}/# both 2"),
                ],
                serde_json::json!({ "protocol_version": tag }),
            ))
            .await;
        local.connected("cloud").await;
        let here = client(&local.url(), v, &format!("here-{tag}")).await;
        let there = client(&remote.url(), v, &format!("there-{tag}")).await;
        let mut there_sensors = there
            .subscribe(format!("edge/{tag}/sensors/#"), QoS::ExactlyOnce)
            .await
            .unwrap();
        let mut there_sync = there
            .subscribe(format!("sync/{tag}/#"), QoS::ExactlyOnce)
            .await
            .unwrap();
        let mut here_cmd = here
            .subscribe(format!("cmd/{tag}/#"), QoS::ExactlyOnce)
            .await
            .unwrap();
        let mut here_sync = here
            .subscribe(format!("sync/{tag}/#"), QoS::ExactlyOnce)
            .await
            .unwrap();
        // The in subscriptions are at the remote once the link is up; a message
        // published there before the bridge's SUBACK would be missed, so wait for one
        // to make it through.
        loop {
            publish(
                &there,
                &format!("cmd/{tag}/probe"),
                "probe",
                QoS::AtMostOnce,
            )
            .await;
            if tokio::time::timeout(std::time::Duration::from_millis(200), here_cmd.recv())
                .await
                .is_ok()
            {
                break;
            }
        }

        // out: mapped from site1/<v>/ to edge/<v>/, QoS 1 at most.
        for i in 0..20 {
            publish(
                &here,
                &format!("site1/{tag}/sensors/t"),
                &format!("s{i}"),
                QoS::ExactlyOnce,
            )
            .await;
        }
        publish(
            &here,
            &format!("site1/{tag}/sensors/t"),
            "end",
            QoS::AtLeastOnce,
        )
        .await;
        let got = until_marker(&mut there_sensors, "end").await;
        let want: Vec<String> = (0..20).map(|i| format!("s{i}")).collect();
        assert_eq!(payloads(&got), want, "{tag}: out, in order, once");
        assert!(
            got.iter()
                .all(|m| m.topic == format!("edge/{tag}/sensors/t") && m.qos == QoS::AtLeastOnce),
            "{tag}"
        );

        // in: QoS 2 rule, QoS 2 message.
        for i in 0..20 {
            publish(
                &there,
                &format!("cmd/{tag}/go"),
                &format!("c{i}"),
                QoS::ExactlyOnce,
            )
            .await;
        }
        publish(&there, &format!("cmd/{tag}/go"), "end", QoS::ExactlyOnce).await;
        let got: Vec<_> = until_marker(&mut here_cmd, "end")
            .await
            .into_iter()
            .filter(|m| m.payload != "probe")
            .collect();
        assert_eq!(got.len(), 20, "{tag}: in, once each");
        for (i, m) in got.iter().enumerate() {
            assert_eq!(m.payload, format!("c{i}").as_bytes(), "{tag}");
            assert_eq!(m.qos, QoS::ExactlyOnce, "{tag}");
        }

        // both: each side's messages reach the other once, and never come back.
        for i in 0..10 {
            publish(
                &here,
                &format!("sync/{tag}/l"),
                &format!("l{i}"),
                QoS::AtLeastOnce,
            )
            .await;
            publish(
                &there,
                &format!("sync/{tag}/r"),
                &format!("r{i}"),
                QoS::AtLeastOnce,
            )
            .await;
        }
        publish(&here, &format!("sync/{tag}/l"), "end-l", QoS::AtLeastOnce).await;
        publish(&there, &format!("sync/{tag}/r"), "end-r", QoS::AtLeastOnce).await;
        for (sub, side) in [(&mut here_sync, "here"), (&mut there_sync, "there")] {
            let mut got = Vec::new();
            let mut ends = 0;
            while ends < 2 {
                let m = recv(sub).await;
                if m.payload.starts_with(b"end") {
                    ends += 1;
                } else {
                    got.push(String::from_utf8_lossy(&m.payload).to_string());
                }
            }
            // Anything echoed would come before the other side's end marker, which
            // travels the same way after it.
            got.sort();
            let mut want: Vec<String> = (0..10)
                .map(|i| format!("l{i}"))
                .chain((0..10).map(|i| format!("r{i}")))
                .collect();
            want.sort();
            assert_eq!(got, want, "{tag}: both, seen {side}: each once");
        }
        let s = local.status("cloud");
        assert_eq!(s.dropped, Default::default(), "{tag}: nothing dropped");
        local.bridges.shutdown().await;
    }
}

/// TLS to the remote: Mosquitto with a certificate from a test CA; the bridge verifies it
/// against `cafile` (host name `localhost`), 3.1.1 and 5.0; without the CA it does not
/// connect and says why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_to_a_mosquitto_remote() {
    let pki = halyard_testkit::pki::TestPki::new();
    let ca = pki.ca("bridge");
    let server = pki.server(&ca, "mosq");
    let tls_port = halyard_testkit::procs::free_port();
    let remote = Mosquitto::start_with(
        halyard_testkit::procs::free_port(),
        &format!(
            "listener {tls_port} 127.0.0.1\ncafile {}\ncertfile {}\nkeyfile {}\n",
            ca.cert.display(),
            server.cert.display(),
            server.key.display()
        ),
    );
    for v in VERSIONS {
        let tag = version_name(v);
        let local = Side::start("edge").await;
        let url = format!("tls://localhost:{tls_port}");
        local
            .add(bridge(
                "secure",
                &url,
                &[&format!("tls/{tag}/# out 1")],
                serde_json::json!({ "protocol_version": tag, "cafile": ca.cert.display().to_string() }),
            ))
            .await;
        local.connected("secure").await;
        let there = client(&remote.url(), v, &format!("there-tls-{tag}")).await;
        let mut sub = there
            .subscribe(format!("tls/{tag}/#"), QoS::AtLeastOnce)
            .await
            .unwrap();
        let here = client(&local.url(), v, &format!("here-tls-{tag}")).await;
        publish(&here, &format!("tls/{tag}/x"), "over tls", QoS::AtLeastOnce).await;
        assert_eq!(recv(&mut sub).await.payload, "over tls", "{tag}");
        local.bridges.shutdown().await;
        // Without the CA the remote's certificate is not trusted.
        let untrusted = Side::start("edge").await;
        untrusted
            .add(bridge(
                "secure",
                &url,
                &["tls/# out 1"],
                serde_json::json!({ "protocol_version": tag }),
            ))
            .await;
        eventually("the certificate is refused", || {
            untrusted
                .status("secure")
                .last_error
                .is_some_and(|e| e.to_lowercase().contains("certificate"))
        })
        .await;
        assert_ne!(untrusted.status("secure").state, "connected");
        untrusted.bridges.shutdown().await;
    }
}

/// 5.0 properties reach a 5.0 remote unchanged (user properties in order, then the hop;
/// content type, correlation data, response topic, payload format) [MQTT-3.3.2-17]
/// [MQTT-3.3.2-18]; the RETAIN flag is kept, or cleared with `outgoing_retain = false`
/// (seen through Retain As Published at the remote [MQTT-3.8.3-4]); Message Expiry is
/// reduced by the time spent queued, and a message that expired while queued is not
/// sent [MQTT-3.3.2-5] [MQTT-3.3.2-6].
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn properties_retain_and_expiry_cross_a_5_0_link() {
    use halyard_client::{Message, SubscriptionOptions};
    let remote = Mosquitto::start();
    let local = Side::start("edge").await;
    let v5 = ProtocolVersion::V5;
    local
        .add(bridge(
            "p",
            &remote.url(),
            &["p/# out 1"],
            serde_json::json!({"protocol_version": "mqttv50", "paused": true}),
        ))
        .await;
    local
        .add(bridge(
            "nr",
            &remote.url(),
            &["nr/# out 1"],
            serde_json::json!({"protocol_version": "mqttv50", "outgoing_retain": false}),
        ))
        .await;
    local.connected("nr").await;
    let there = client(&remote.url(), v5, "there-props").await;
    let rap = SubscriptionOptions {
        qos: QoS::AtLeastOnce,
        retain_as_published: true,
        ..Default::default()
    };
    let mut sub = there.subscribe_with("p/#", rap, vec![]).await.unwrap();
    let mut nr = there.subscribe_with("nr/#", rap, vec![]).await.unwrap();
    let here = client(&local.url(), v5, "here-props").await;
    let mut m = Message::new("p/a", "props")
        .qos(QoS::AtLeastOnce)
        .retain(true)
        .user_property("k", "1")
        .user_property("k", "2");
    m.properties.content_type = Some("text/x".into());
    m.properties.correlation_data = Some("cid".into());
    m.properties.response_topic = Some(halyard_codec::TopicName::new("p/reply").unwrap());
    m.properties.payload_format_indicator = Some(true);
    m.properties.message_expiry_interval = Some(300);
    here.publish(m).await.unwrap();
    let mut short = Message::new("p/short", "expires").qos(QoS::AtLeastOnce);
    short.properties.message_expiry_interval = Some(1);
    here.publish(short).await.unwrap();
    // Queued for more than a second (the paused bridge holds it).
    let t = std::time::Instant::now();
    eventually("1.5 s queued", || {
        t.elapsed() >= std::time::Duration::from_millis(1500)
    })
    .await;
    local.bridges.pause("p", false).unwrap();
    publish(&here, "p/z", "end", QoS::AtLeastOnce).await;
    let got = until_marker(&mut sub, "end").await;
    assert_eq!(payloads(&got), ["props"], "the expired one was not sent");
    let p = &got[0].properties;
    let users: Vec<(String, String)> = p
        .user_properties
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    assert_eq!(
        users,
        [
            ("k".into(), "1".into()),
            ("k".into(), "2".into()),
            ("halyard-hop".into(), "edge".into())
        ]
    );
    assert_eq!(p.content_type.as_deref(), Some("text/x"));
    assert_eq!(p.correlation_data.as_deref(), Some(&b"cid"[..]));
    assert_eq!(
        p.response_topic.as_ref().map(|t| t.as_str()),
        Some("p/reply")
    );
    assert_eq!(p.payload_format_indicator, Some(true));
    let left = p.message_expiry_interval.expect("expiry kept");
    assert!(
        (200..300).contains(&left),
        "reduced by the time queued: {left}"
    );
    assert!(got[0].retain, "RETAIN kept");
    publish(&here, "nr/x", "plain", QoS::AtLeastOnce).await;
    here.publish(
        Message::new("nr/x", "was retained")
            .qos(QoS::AtLeastOnce)
            .retain(true),
    )
    .await
    .unwrap();
    let a = recv(&mut nr).await;
    let b = recv(&mut nr).await;
    assert_eq!((&a.payload[..], a.retain), (&b"plain"[..], false));
    assert_eq!(
        (&b.payload[..], b.retain),
        (&b"was retained"[..], false),
        "outgoing_retain = false"
    );
    local.bridges.shutdown().await;
}
