//! The client over every transport of the registry, against Halyard in process:
//! `tcp://`, `tls://` (with `--insecure`'s name-check skip), `ws://`, `wss://`, `unix://`,
//! and failing over between several broker URLs.

use std::time::Duration;

use halyard_client::{
    Client, ClientOptions, ClientTls, ConnectionEvent, Error, Message, ProtocolVersion, QoS,
    Reconnect,
};
use halyard_testkit::TestBroker;
use halyard_testkit::pki::TestPki;

fn port_of(h: &halyard_transport::ListenerHandle) -> u16 {
    h.local_addr()
        .rsplit(':')
        .next()
        .and_then(|p| p.split('/').next())
        .and_then(|p| p.parse().ok())
        .expect("a port")
}

async fn roundtrip(url: &str, tls: ClientTls, v: ProtocolVersion) -> Result<(), Error> {
    let mut o = ClientOptions::new(url)
        .protocol(v)
        .client_id(format!("t-{v:?}"));
    o.dial.tls = tls;
    o.reconnect.enabled = false;
    let c = Client::connect(o);
    c.connected().await?;
    let mut sub = c.subscribe("tr/t", QoS::AtLeastOnce).await?;
    c.publish(Message::new("tr/t", vec![7u8; 100_000]).qos(QoS::AtLeastOnce))
        .await?;
    let m = tokio::time::timeout(Duration::from_secs(10), sub.recv())
        .await
        .map_err(|_| Error::Timeout)?
        .ok_or(Error::Closed)?;
    assert_eq!(m.payload.len(), 100_000);
    c.disconnect().await
}

#[tokio::test]
async fn every_transport_both_versions() {
    let tb = TestBroker::start().await;
    let pki = TestPki::new();
    let ca = pki.ca("ca");
    let server = pki.server(&ca, "server");
    let q = format!(
        "certfile={}&keyfile={}",
        server.cert.display(),
        server.key.display()
    );
    let tls = tb.listen(&format!("tls://127.0.0.1:0?{q}")).await;
    let ws = tb.listen("ws://127.0.0.1:0/mqtt").await;
    let wss = tb.listen(&format!("wss://127.0.0.1:0/mqtt?{q}")).await;
    let sock = pki.path("mqtt.sock");
    let _unix = tb.listen(&format!("unix://{}", sock.display())).await;
    let trust = ClientTls {
        cafile: Some(ca.cert.clone()),
        ..ClientTls::default()
    };
    let urls = [
        (format!("tcp://{}", tb.addr), ClientTls::default()),
        (format!("tls://127.0.0.1:{}", port_of(&tls)), trust.clone()),
        (
            format!("ws://127.0.0.1:{}/mqtt", port_of(&ws)),
            ClientTls::default(),
        ),
        (
            format!("wss://localhost:{}/mqtt", port_of(&wss)),
            trust.clone(),
        ),
        (format!("unix://{}", sock.display()), ClientTls::default()),
    ];
    for (url, tls) in urls {
        for v in [ProtocolVersion::V3_1_1, ProtocolVersion::V5] {
            roundtrip(&url, tls.clone(), v)
                .await
                .unwrap_or_else(|e| panic!("{url} {v:?}: {e}"));
        }
    }
}

/// `insecure` skips only the host-name check: a certificate for another name is accepted,
/// one from an untrusted CA is still refused.
#[tokio::test]
async fn insecure_skips_the_name_check_only() {
    let tb = TestBroker::start().await;
    let pki = TestPki::new();
    let ca = pki.ca("ca");
    let other_ca = pki.ca("other");
    let server = pki.server(&ca, "server");
    let tls = tb
        .listen(&format!(
            "tls://127.0.0.1:0?certfile={}&keyfile={}",
            server.cert.display(),
            server.key.display()
        ))
        .await;
    let url = format!("tls://127.0.0.1:{}", port_of(&tls));
    let wrong_name = ClientTls {
        cafile: Some(ca.cert.clone()),
        server_name: Some("broker.example.net".into()),
        ..ClientTls::default()
    };
    let err = roundtrip(&url, wrong_name.clone(), ProtocolVersion::V5)
        .await
        .expect_err("name mismatch refused");
    assert!(
        err.to_string().contains("NotValidForName") || err.to_string().contains("certificate"),
        "{err}"
    );
    roundtrip(
        &url,
        ClientTls {
            insecure: true,
            ..wrong_name
        },
        ProtocolVersion::V5,
    )
    .await
    .expect("insecure accepts another name");
    let untrusted = ClientTls {
        cafile: Some(other_ca.cert.clone()),
        insecure: true,
        ..ClientTls::default()
    };
    roundtrip(&url, untrusted, ProtocolVersion::V5)
        .await
        .expect_err("an untrusted chain is refused even with insecure");
}

/// Several URLs: the first is down, the client goes on to the next.
#[tokio::test]
async fn fails_over_to_the_next_url() {
    let tb = TestBroker::start().await;
    let dead = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let dead_url = format!("tcp://{}", dead.local_addr().expect("addr"));
    drop(dead);
    let live_url = format!("tcp://{}", tb.addr);
    let o = ClientOptions::new(dead_url.as_str())
        .url(live_url.as_str())
        .client_id("failover")
        .reconnect(Reconnect {
            enabled: true,
            initial: Duration::from_millis(10),
            max: Duration::from_millis(50),
            retry_first_connect: true,
        });
    let c = Client::connect(o);
    let mut events = c.events();
    c.connected().await.expect("connects to the second URL");
    let mut failed_first = false;
    loop {
        match events.recv().await.expect("events") {
            ConnectionEvent::ConnectFailed { url, .. } => {
                assert_eq!(url, dead_url);
                failed_first = true;
            }
            ConnectionEvent::Connected { url, .. } => {
                assert_eq!(url, live_url);
                break;
            }
            _ => {}
        }
    }
    assert!(failed_first);
    c.disconnect().await.expect("disconnect");
}
