//! The broker over every transport, with Halyard's own dialer (the one the client library
//! uses): TLS (client certificates, identity as user name, rotation by file watch), ws://,
//! wss://, unix:// (path and abstract), PROXY protocol, per-listener limits, supervised
//! listeners with injected accept failures, and a panic inside one connection's task.
//! Outside clients (mosquitto, paho, a browser) are in tests/interop and tests/browser.

mod common;

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use common::*;
use halyard_broker::{BrokerConfig, Event};
use halyard_codec::{Packet, QoS, ReasonCode};
use halyard_testkit::pki::TestPki;
use halyard_testkit::{RawClient, TestBroker};
use halyard_transport::tls::ClientTls;
use halyard_transport::{
    Acceptor, BoxFuture, BoxStream, DialOptions, ListenerConfig, ListenerCtx, ListenerStatus,
    Registry, Remote, RestartPolicy, Transport, Url, start_listener,
};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::sync::broadcast::Receiver;

type Events = Receiver<Arc<halyard_broker::MonitorEvent>>;

/// Waits (5 s at most) for an event matching `f`.
async fn event(rx: &mut Events, what: &str, f: impl Fn(&Event) -> bool) -> Event {
    tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            let e = rx.recv().await.expect("monitor");
            if f(&e.kind) {
                return e.kind.clone();
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("no {what} event"))
}

async fn dial(url: &str, tls: ClientTls) -> io::Result<RawClient<BoxStream>> {
    let opts = DialOptions {
        tls,
        ..DialOptions::default()
    };
    Registry::default()
        .dial(url, &opts)
        .await
        .map(RawClient::new)
}

fn port_of(h: &halyard_transport::ListenerHandle) -> u16 {
    h.local_addr().rsplit_once(':').unwrap().1.parse().unwrap()
}

/// Starts a listener on `tb`'s broker through `reg`.
async fn start_with(
    tb: &TestBroker,
    reg: &Registry,
    cfg: ListenerConfig,
) -> Result<halyard_transport::ListenerHandle, String> {
    let b = tb.broker.clone();
    start_listener(
        reg,
        cfg,
        tb.broker.monitor().clone(),
        tb.broker.shutdown_signal(),
        Arc::new(move |s, p| b.spawn_connection(s, p)),
    )
    .await
}

async fn try_listen(
    tb: &TestBroker,
    reg: &Registry,
    url: &str,
) -> Result<halyard_transport::ListenerHandle, String> {
    start_with(tb, reg, ListenerConfig::from_url(url)?).await
}

/// Subscribes on `a`, publishes QoS 1 on `b`, checks `a` gets it.
async fn roundtrip<A, B>(a: &mut RawClient<A>, b: &mut RawClient<B>, t: &str)
where
    A: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    sub(a, t, QoS::AtLeastOnce).await;
    b.send(&publish(t, QoS::AtLeastOnce, 7, b"across transports"))
        .await;
    assert!(matches!(b.recv().await, Packet::PubAck(_)));
    let p = recv_publish(a).await;
    assert_eq!(&p.payload[..], b"across transports");
}

// ---- TLS ----

async fn tls_with_client_certificate_identity_as_username(v: halyard_codec::ProtocolVersion) {
    let pki = TestPki::new();
    let ca = pki.ca("ca");
    let server = pki.server(&ca, "server");
    let client = pki.client(&ca, "client", Some("sensor-9"), &[]);
    // Anonymous clients are refused: only the certificate's identity gets anyone in.
    let tb = TestBroker::with_config(BrokerConfig {
        allow_anonymous: false,
        ..BrokerConfig::default()
    })
    .await;
    let mut events = tb.broker.monitor().subscribe();
    let l = tb
        .listen(&format!(
            "tls://127.0.0.1:0?certfile={}&keyfile={}&cafile={}&require_certificate=true&use_identity_as_username=true",
            server.cert.display(),
            server.key.display(),
            ca.cert.display()
        ))
        .await;
    let url = format!("tls://127.0.0.1:{}", port_of(&l));
    let trust = ClientTls {
        cafile: Some(ca.cert.clone()),
        ..ClientTls::default()
    };
    // Without a client certificate the handshake fails (TLS 1.3 reports it on first read).
    match dial(&url, trust.clone()).await {
        Err(_) => {}
        Ok(mut c) => {
            c.send(&connect(v, "no-cert", true, 60)).await;
            assert!(is_closed(&c.recv_within(Duration::from_secs(5)).await));
        }
    }
    let ev = event(&mut events, "handshake failed", |e| {
        matches!(e, Event::HandshakeFailed { .. })
    })
    .await;
    assert!(format!("{ev}").contains("certificate"), "{ev}");
    let with_cert = ClientTls {
        certfile: Some(client.cert.clone()),
        keyfile: Some(client.key.clone()),
        ..trust
    };
    let mut c = dial(&url, with_cert).await.expect("mTLS dial");
    online(&mut c, v, "tls-client", true).await;
    // The same client over plain TCP, without a certificate, is anonymous: refused.
    let mut plain = tb.raw().await;
    let ack = handshake(&mut plain, connect(v, "plain", true, 60)).await;
    assert!(
        matches!(
            ack.reason,
            ReasonCode::NotAuthorized | ReasonCode::BadUserNameOrPassword
        ),
        "{ack:?}"
    );
}

async fn wss_and_ws_route_to_each_other(v: halyard_codec::ProtocolVersion) {
    let pki = TestPki::new();
    let ca = pki.ca("ca");
    let server = pki.server(&ca, "server");
    let tb = TestBroker::start().await;
    let ws = tb.listen("ws://127.0.0.1:0/mqtt").await;
    let wss = tb
        .listen(&format!(
            "wss://127.0.0.1:0/mqtt?certfile={}&keyfile={}",
            server.cert.display(),
            server.key.display()
        ))
        .await;
    let mut a = dial(
        &format!("ws://127.0.0.1:{}/mqtt", port_of(&ws)),
        ClientTls::default(),
    )
    .await
    .expect("ws dial");
    let trust = ClientTls {
        cafile: Some(ca.cert.clone()),
        ..ClientTls::default()
    };
    let mut b = dial(&format!("wss://127.0.0.1:{}/mqtt", port_of(&wss)), trust)
        .await
        .expect("wss dial");
    online(&mut a, v, "ws-a", true).await;
    online(&mut b, v, "wss-b", true).await;
    roundtrip(&mut a, &mut b, "ws/t").await;
    // A wrong path is refused by the server with HTTP 404.
    let e = dial(
        &format!("ws://127.0.0.1:{}/other", port_of(&ws)),
        ClientTls::default(),
    )
    .await
    .err()
    .expect("wrong path refused");
    assert!(e.to_string().contains("404"), "{e}");
}

async fn unix_path_and_abstract_sockets(v: halyard_codec::ProtocolVersion) {
    let pki = TestPki::new(); // only for its temporary directory
    let path = pki.path("h.sock");
    // A stale socket file (its listener gone) is removed on bind.
    drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
    assert!(path.exists());
    let tb = TestBroker::start().await;
    let l = tb
        .listen(&format!("unix://{}?socket_mode=0600", path.display()))
        .await;
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let name = format!("halyard-test-{}-{v:?}", std::process::id());
    let _abs = tb.listen(&format!("unix://@{name}")).await;
    let mut a = dial(&format!("unix://{}", path.display()), ClientTls::default())
        .await
        .expect("unix dial");
    let mut b = dial(&format!("unix://@{name}"), ClientTls::default())
        .await
        .expect("abstract dial");
    online(&mut a, v, "unix-a", true).await;
    online(&mut b, v, "unix-b", true).await;
    roundtrip(&mut a, &mut b, "unix/t").await;
    // A socket someone is listening on is not taken over; a regular file is not deleted.
    let e = try_listen(
        &tb,
        &Registry::default(),
        &format!("unix://{}", path.display()),
    )
    .await
    .unwrap_err();
    assert!(e.contains("another process is listening"), "{e}");
    let file = pki.path("plain-file");
    std::fs::write(&file, "data").unwrap();
    let e = try_listen(
        &tb,
        &Registry::default(),
        &format!("unix://{}", file.display()),
    )
    .await
    .unwrap_err();
    assert!(e.contains("not a socket"), "{e}");
    assert_eq!(std::fs::read_to_string(&file).unwrap(), "data");
    drop(l);
}

async fn proxy_protocol_gives_the_real_client_address(v: halyard_codec::ProtocolVersion) {
    let tb = TestBroker::start().await;
    let mut events = tb.broker.monitor().subscribe();
    let l = tb.listen("tcp://127.0.0.1:0?proxy_protocol=true").await;
    for (header, addr) in [
        (
            b"PROXY TCP4 203.0.113.7 192.0.2.1 4242 1883\r\n".to_vec(),
            "203.0.113.7:4242",
        ),
        (
            {
                let mut h = halyard_transport::proxy::V2_SIGNATURE.to_vec();
                h.extend_from_slice(&[
                    0x21, 0x11, 0, 12, 198, 51, 100, 9, 192, 0, 2, 1, 0x1F, 0x90, 0x07, 0x5B,
                ]);
                h
            },
            "198.51.100.9:8080",
        ),
    ] {
        let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port_of(&l)))
            .await
            .unwrap();
        s.write_all(&header).await.unwrap();
        let mut c = RawClient::new(s);
        online(&mut c, v, "proxied", true).await;
        let ev = event(&mut events, "connected", |e| {
            matches!(e, Event::Connected { .. })
        })
        .await;
        let Event::Connected { peer, .. } = ev else {
            unreachable!()
        };
        assert_eq!(peer, addr);
    }
    // Without the header, the listener refuses the connection.
    let mut c = RawClient::new(
        tokio::net::TcpStream::connect(("127.0.0.1", port_of(&l)))
            .await
            .unwrap(),
    );
    c.send(&connect(v, "no-header", true, 60)).await;
    assert!(is_closed(&c.recv_within(Duration::from_secs(5)).await));
}

/// A PROXY header is believed only from `trusted_proxies`: from any other peer the
/// connection is closed before its header is read (it would choose the client address
/// every limit, log and anonymous rule believes), and counted as refused.
async fn proxy_header_only_from_trusted_proxies(v: halyard_codec::ProtocolVersion) {
    let tb = TestBroker::start().await;
    let mut events = tb.broker.monitor().subscribe();
    let untrusted = tb
        .listen("tcp://127.0.0.1:0?proxy_protocol=true&trusted_proxies=10.0.0.0/8")
        .await;
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port_of(&untrusted)))
        .await
        .unwrap();
    s.write_all(b"PROXY TCP4 127.0.0.9 192.0.2.1 4242 1883\r\n")
        .await
        .unwrap();
    let mut c = RawClient::new(s);
    c.send(&connect(v, "spoofer", true, 60)).await;
    assert!(is_closed(&c.recv_within(Duration::from_secs(5)).await));
    event(
        &mut events,
        "refused",
        |e| matches!(e, Event::Refused { why, .. } if why.contains("trusted_proxies")),
    )
    .await;
    // 127.0.0.1 listed: its header is believed.
    let trusted = tb
        .listen("tcp://127.0.0.1:0?proxy_protocol=true&trusted_proxies=10.0.0.0/8,127.0.0.1")
        .await;
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port_of(&trusted)))
        .await
        .unwrap();
    s.write_all(b"PROXY TCP4 203.0.113.7 192.0.2.1 4242 1883\r\n")
        .await
        .unwrap();
    let mut c = RawClient::new(s);
    online(&mut c, v, "proxied", true).await;
}

async fn listener_max_connections(v: halyard_codec::ProtocolVersion) {
    let tb = TestBroker::start().await;
    let mut events = tb.broker.monitor().subscribe();
    let l = tb.listen("tcp://127.0.0.1:0?max_connections=1").await;
    let mut a = RawClient::new(
        tokio::net::TcpStream::connect(("127.0.0.1", port_of(&l)))
            .await
            .unwrap(),
    );
    online(&mut a, v, "first", true).await;
    let mut b = RawClient::new(
        tokio::net::TcpStream::connect(("127.0.0.1", port_of(&l)))
            .await
            .unwrap(),
    );
    b.version = v;
    assert!(is_closed(&b.recv_within(Duration::from_secs(5)).await));
    event(&mut events, "refused", |e| {
        matches!(e, Event::Refused { .. })
    })
    .await;
    assert_eq!(l.stats().refused.load(Ordering::Relaxed), 1);
    // The other listener has no such limit; the slot frees when the first client leaves.
    let mut c = tb.raw().await;
    online(&mut c, v, "other-listener", true).await;
    a.send(&Packet::Disconnect(halyard_codec::Disconnect {
        reason: ReasonCode::Success,
        properties: Default::default(),
    }))
    .await;
    assert!(is_closed(&a.recv_within(Duration::from_secs(5)).await));
    halyard_testkit::eventually("the slot is free", || {
        l.stats().open.load(Ordering::Relaxed) == 0
    })
    .await;
    let mut d = RawClient::new(
        tokio::net::TcpStream::connect(("127.0.0.1", port_of(&l)))
            .await
            .unwrap(),
    );
    online(&mut d, v, "third", true).await;
}

async fn per_listener_allow_anonymous(v: halyard_codec::ProtocolVersion) {
    let tb = TestBroker::start().await; // the broker allows anonymous clients
    let closed = tb.listen("tcp://127.0.0.1:0?allow_anonymous=false").await;
    let mut c = RawClient::new(
        tokio::net::TcpStream::connect(("127.0.0.1", port_of(&closed)))
            .await
            .unwrap(),
    );
    let ack = handshake(&mut c, connect(v, "anon", true, 60)).await;
    assert_eq!(ack.reason, ReasonCode::NotAuthorized, "{ack:?}");
    let mut open = tb.raw().await;
    online(&mut open, v, "anon", true).await;
}

/// Per-address limits, shared by all listeners of a registry: open connections, then the
/// rate of new ones. Refused connections are closed before any handshake.
async fn per_address_limits(v: halyard_codec::ProtocolVersion) {
    let tb = TestBroker::start().await;
    let reg = Registry::default().with_ip_limits(halyard_transport::IpLimits::new(2, 0.0));
    let l = start_with(
        &tb,
        &reg,
        ListenerConfig::from_url("tcp://127.0.0.1:0").unwrap(),
    )
    .await
    .unwrap();
    let dial = || tokio::net::TcpStream::connect(("127.0.0.1", port_of(&l)));
    let mut a = RawClient::new(dial().await.unwrap());
    online(&mut a, v, "ip-a", true).await;
    let mut b = RawClient::new(dial().await.unwrap());
    online(&mut b, v, "ip-b", true).await;
    let mut c = RawClient::new(dial().await.unwrap());
    c.version = v;
    assert!(
        is_closed(&c.recv_within(Duration::from_secs(5)).await),
        "third from one address"
    );
    drop(a);
    halyard_testkit::eventually("a slot frees", || {
        l.stats().open.load(Ordering::Relaxed) == 1
    })
    .await;
    let mut d = RawClient::new(dial().await.unwrap());
    online(&mut d, v, "ip-d", true).await;

    // One new connection per second (burst 1): the second within the second is refused.
    // (A token comes back after a full second, far longer than two local connects take.)
    let reg = Registry::default().with_ip_limits(halyard_transport::IpLimits::new(0, 1.0));
    let l = start_with(
        &tb,
        &reg,
        ListenerConfig::from_url("tcp://127.0.0.1:0").unwrap(),
    )
    .await
    .unwrap();
    let connect_to = || tokio::net::TcpStream::connect(("127.0.0.1", port_of(&l)));
    let first = connect_to().await.unwrap();
    let mut over = RawClient::new(connect_to().await.unwrap());
    over.version = v;
    assert!(
        is_closed(&over.recv_within(Duration::from_secs(5)).await),
        "second within the same second"
    );
    let mut c = RawClient::new(first);
    online(&mut c, v, "rate-0", true).await;
    assert_eq!(l.stats().refused.load(Ordering::Relaxed), 1);
}

both_versions!(
    per_address_limits,
    per_listener_allow_anonymous,
    tls_with_client_certificate_identity_as_username,
    wss_and_ws_route_to_each_other,
    unix_path_and_abstract_sockets,
    proxy_protocol_gives_the_real_client_address,
    proxy_header_only_from_trusted_proxies,
    listener_max_connections,
    a_panic_closes_that_connection_only,
);

/// Rotation by file watch: new handshakes get the new certificate, a client connected
/// before keeps working, and a broken replacement is refused with the old one kept.
#[tokio::test]
async fn tls_files_rotate_on_change_without_dropping_clients() {
    let pki = TestPki::new();
    let ca1 = pki.ca("ca1");
    let ca2 = pki.ca("ca2");
    let s1 = pki.server(&ca1, "s1");
    let s2 = pki.server(&ca2, "s2");
    let live = halyard_testkit::pki::Pair {
        cert: pki.path("live.pem"),
        key: pki.path("live.key"),
    };
    pki.replace(&s1.cert, &live.cert);
    pki.replace(&s1.key, &live.key);
    let tb = TestBroker::start().await;
    let mut events = tb.broker.monitor().subscribe();
    let l = tb
        .listen(&format!(
            "tls://127.0.0.1:0?certfile={}&keyfile={}&tls_reload_interval=1",
            live.cert.display(),
            live.key.display()
        ))
        .await;
    let url = format!("tls://127.0.0.1:{}", port_of(&l));
    let trust = |ca: &halyard_testkit::pki::Ca| ClientTls {
        cafile: Some(ca.cert.clone()),
        ..ClientTls::default()
    };
    let mut old = dial(&url, trust(&ca1)).await.expect("dial before rotation");
    online(&mut old, V5, "old", true).await;
    assert!(
        dial(&url, trust(&ca2)).await.is_err(),
        "CA 2 trusted before rotation"
    );

    pki.replace(&s2.key, &live.key);
    pki.replace(&s2.cert, &live.cert);
    event(&mut events, "tls reloaded", |e| {
        matches!(e, Event::TlsReloaded { .. })
    })
    .await;
    let mut new = dial(&url, trust(&ca2))
        .await
        .expect("new certificate served");
    online(&mut new, V5, "new", true).await;
    assert!(
        dial(&url, trust(&ca1)).await.is_err(),
        "old certificate still served"
    );
    // The connection made before the rotation is untouched.
    roundtrip(&mut old, &mut new, "rot/t").await;

    std::fs::write(
        &live.key,
        "-----BEGIN PRIVATE KEY-----\nbroken\n-----END PRIVATE KEY-----\n",
    )
    .unwrap();
    let ev = event(&mut events, "tls reload refused", |e| {
        matches!(e, Event::TlsReloadFailed { .. })
    })
    .await;
    assert!(format!("{ev}").contains("keyfile"), "{ev}");
    let mut again = dial(&url, trust(&ca2))
        .await
        .expect("previous certificate kept");
    online(&mut again, V5, "again", true).await;
    // SIGHUP's path: a forced reload of a good set works, of a bad set is refused.
    pki.replace(&s2.key, &live.key);
    assert_eq!(l.reload_tls(), Ok(true));
    std::fs::write(&live.cert, "garbage").unwrap();
    assert!(l.reload_tls().unwrap_err().contains("certfile"));
}

// ---- supervision ----

/// An acceptor whose `accept` always fails with a socket error, or panics. (Persistent
/// EMFILE is covered by the accept loop's own paused-time test in halyard-transport.)
struct Broken {
    panic: bool,
}

impl Acceptor for Broken {
    fn accept(&mut self) -> BoxFuture<'_, io::Result<(BoxStream, Remote)>> {
        let panic = self.panic;
        Box::pin(async move {
            if panic {
                panic!("injected accept panic");
            }
            Err(io::Error::other("injected socket error"))
        })
    }
    fn local_addr(&self) -> String {
        "broken".into()
    }
}

#[derive(Debug)]
struct Flaky {
    panic: bool,
    binds: Arc<AtomicU32>,
}

impl Transport for Flaky {
    fn bind<'a>(&'a self, _: &'a ListenerConfig) -> BoxFuture<'a, io::Result<Box<dyn Acceptor>>> {
        self.binds.fetch_add(1, Ordering::SeqCst);
        let panic = self.panic;
        Box::pin(async move { Ok(Box::new(Broken { panic }) as Box<dyn Acceptor>) })
    }
    fn upgrade(
        &self,
        s: BoxStream,
        _: Arc<ListenerCtx>,
    ) -> BoxFuture<'static, io::Result<(BoxStream, Option<String>)>> {
        Box::pin(async move { Ok((s, None)) })
    }
    fn dial<'a>(&'a self, _: &'a Url, _: &'a DialOptions) -> BoxFuture<'a, io::Result<BoxStream>> {
        Box::pin(async { Err(io::Error::other("no")) })
    }
}

#[tokio::test]
async fn failing_listeners_are_restarted_with_growing_delay_then_failed_while_others_serve() {
    let tb = TestBroker::start().await;
    let mut events = tb.broker.monitor().subscribe();
    for panic in [false, true] {
        let binds = Arc::new(AtomicU32::new(0));
        let mut reg = Registry::default();
        reg.register(
            "flaky",
            Arc::new(Flaky {
                panic,
                binds: binds.clone(),
            }),
        );
        let mut cfg = ListenerConfig::from_url(&format!("flaky://nowhere/{panic}")).unwrap();
        cfg.restart = RestartPolicy {
            initial_delay: Duration::from_millis(20),
            max_delay: Duration::from_millis(40),
            max_failures: 3,
            window: Duration::from_secs(60),
        };
        let h = start_with(&tb, &reg, cfg).await.expect("bind");
        let mut delays = Vec::new();
        loop {
            match event(&mut events, "listener crash", |e| {
                matches!(
                    e,
                    Event::ListenerCrashed { .. } | Event::ListenerFailed { .. }
                )
            })
            .await
            {
                Event::ListenerCrashed {
                    restart_in, error, ..
                } => {
                    if panic {
                        assert!(error.contains("injected accept panic"), "{error}");
                    } else {
                        assert!(error.contains("injected socket error"), "{error}");
                    }
                    delays.push(restart_in);
                }
                Event::ListenerFailed { failures, .. } => {
                    assert_eq!(failures, 4);
                    break;
                }
                _ => unreachable!(),
            }
        }
        let ms: Vec<u128> = delays.iter().map(Duration::as_millis).collect();
        assert_eq!(ms, vec![20, 40, 40], "restart delay doubles to the cap");
        assert!(
            matches!(h.status(), ListenerStatus::Failed { .. }),
            "{:?}",
            h.status()
        );
        assert_eq!(h.restarts(), 3);
        assert_eq!(binds.load(Ordering::SeqCst), 4, "each restart binds anew");
        // The broker's other listener keeps serving.
        let mut c = tb.raw().await;
        online(&mut c, V5, &format!("still-serving-{panic}"), true).await;
        assert_eq!(tb.listener.status(), ListenerStatus::Listening);
    }
}

// ---- a panic in one connection's task ----

/// A stream that panics inside `poll_read` once `trip` is set.
struct Tripwire<S> {
    inner: S,
    trip: Arc<AtomicBool>,
}

impl<S: AsyncRead + Unpin> AsyncRead for Tripwire<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.trip.load(Ordering::SeqCst) {
            panic!("injected panic in a connection task");
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Tripwire<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

async fn a_panic_closes_that_connection_only(v: halyard_codec::ProtocolVersion) {
    let tb = TestBroker::start().await;
    let mut watcher = tb.raw().await;
    online(&mut watcher, v, "watcher", true).await;
    sub(&mut watcher, "will/#", QoS::AtLeastOnce).await;

    let (a, b) = tokio::io::duplex(64 * 1024);
    let trip = Arc::new(AtomicBool::new(false));
    tb.broker.spawn_connection(
        Tripwire {
            inner: b,
            trip: trip.clone(),
        },
        "tripwire",
    );
    let mut victim = RawClient::new(a);
    let c = connect_with(v, "victim", false, |c| {
        c.will = Some(halyard_codec::Will {
            topic: topic("will/victim"),
            payload: halyard_codec::Bytes::from_static(b"gone"),
            qos: QoS::AtLeastOnce,
            retain: false,
            delay_interval: None,
            properties: Default::default(),
        });
        if v.is_v5() {
            c.properties.session_expiry_interval = Some(300);
        }
    });
    assert_eq!(handshake(&mut victim, c).await.reason, ReasonCode::Success);
    sub(&mut victim, "kept/t", QoS::AtLeastOnce).await;
    assert_eq!(tb.broker.stats().connections_current, 2);

    trip.store(true, Ordering::SeqCst);
    victim.send(&Packet::PingReq).await; // wakes the read that panics
    // The will is published as for a lost connection; the rest of the broker carries on.
    let w = recv_publish(&mut watcher).await;
    assert_eq!(&w.payload[..], b"gone");
    halyard_testkit::eventually("the connection is counted closed", || {
        tb.broker.stats().connections_current == 1
    })
    .await;
    watcher.send(&Packet::PingReq).await;
    assert!(matches!(watcher.recv().await, Packet::PingResp));
    // The session was detached, not lost: it resumes with its subscription.
    let mut again = tb.raw().await;
    let ack = handshake(&mut again, connect(v, "victim", false, 60)).await;
    assert!(ack.session_present, "{ack:?}");
    watcher
        .send(&publish("kept/t", QoS::AtLeastOnce, 3, b"after"))
        .await;
    assert!(matches!(watcher.recv().await, Packet::PubAck(_)));
    assert_eq!(&recv_publish(&mut again).await.payload[..], b"after");
}
