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
