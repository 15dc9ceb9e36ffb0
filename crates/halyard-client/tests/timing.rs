//! Reconnect backoff and keep alive, on paused tokio time (no real waiting).

use std::time::Duration;

use halyard_client::{Client, ClientOptions, ConnectionEvent, Error, ProtocolVersion, Reconnect};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// Nothing listens at the URL: each failed attempt is followed by a wait drawn uniformly
/// from [0, min(cap, initial * 2^n)] — defaults 1 s doubling to a 60 s cap — and the client
/// keeps trying (it never gives up while reconnecting is on).
#[tokio::test(start_paused = true)]
async fn backoff_doubles_to_the_cap_with_full_jitter() {
    let url = format!("unix:///nonexistent/halyard-{}.sock", std::process::id());
    let o = ClientOptions::new(url).protocol(ProtocolVersion::V5);
    assert_eq!(o.reconnect.initial, Duration::from_secs(1));
    assert_eq!(o.reconnect.max, Duration::from_secs(60));
    let c = Client::connect(o);
    let mut events = c.events();
    let mut delays = Vec::new();
    let mut failures = 0;
    while delays.len() < 12 {
        match events.recv().await.expect("events") {
            ConnectionEvent::ConnectFailed { error, .. } => {
                assert!(matches!(*error, Error::Connect(_)), "{error}");
                failures += 1;
            }
            ConnectionEvent::Reconnecting { attempt, delay } => {
                assert_eq!(attempt as usize, delays.len() + 1);
                delays.push(delay);
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(failures, 12);
    for (n, d) in delays.iter().enumerate() {
        let ceiling = Duration::from_secs(1 << n.min(6)).min(Duration::from_secs(60));
        assert!(*d <= ceiling, "attempt {n}: {d:?} > {ceiling:?}");
    }
    // Jitter: the waits at the cap are not all the same (aligned retries storm a broker).
    let capped: Vec<_> = delays[6..].to_vec();
    assert!(capped.windows(2).any(|w| w[0] != w[1]), "{capped:?}");
    c.disconnect().await.expect("close");
}

/// Keep alive: after `keep_alive` of silence the client sends PINGREQ; when the PINGRESP
/// does not come within another `keep_alive`, the connection counts as lost (a broker that
/// vanished without a FIN is detected).
#[tokio::test(start_paused = true)]
async fn keepalive_pings_and_detects_a_dead_broker() {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let url = format!("tcp://{}", listener.local_addr().expect("addr"));
    let server = tokio::spawn(async move {
        let (mut s, _) = listener.accept().await.expect("accept");
        let mut buf = vec![0u8; 256];
        let n = s.read(&mut buf).await.expect("CONNECT");
        assert!(n > 0 && buf[0] == 0x10, "CONNECT first");
        // CONNACK, v5, success, no properties.
        s.write_all(&[0x20, 0x03, 0x00, 0x00, 0x00])
            .await
            .expect("CONNACK");
        // Then read whatever comes and never answer: the next packet must be PINGREQ.
        let n = s.read(&mut buf).await.expect("PINGREQ");
        assert_eq!(&buf[..n], &[0xC0, 0x00], "PINGREQ");
        // Keep the socket open and silent.
        tokio::time::sleep(Duration::from_secs(3600)).await;
        drop(s);
    });
    let mut o = ClientOptions::new(url)
        .protocol(ProtocolVersion::V5)
        .keep_alive(Duration::from_secs(5));
    o.reconnect = Reconnect {
        enabled: false,
        ..Reconnect::default()
    };
    let c = Client::connect(o);
    let mut events = c.events();
    c.connected().await.expect("connects");
    let started = tokio::time::Instant::now();
    loop {
        match events.recv().await.expect("events") {
            ConnectionEvent::ConnectionLost { error } => {
                assert!(matches!(*error, Error::Timeout), "{error}");
                break;
            }
            _ => continue,
        }
    }
    let took = started.elapsed();
    assert!(
        took >= Duration::from_secs(10) && took < Duration::from_secs(11),
        "ping after 5 s, lost 5 s later: {took:?}"
    );
    server.abort();
}
