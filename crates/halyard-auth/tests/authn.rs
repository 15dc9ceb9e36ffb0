//! The password file behind the broker: good and bad credentials, anonymous policies,
//! failed-login rate limiting and reload, for MQTT 3.1.1 and 5.0 over the raw wire.

use std::sync::Arc;

use halyard_auth::{PasswordFile, Scheme};
use halyard_broker::auth::{Anonymous, Security};
use halyard_codec::{ClientId, ConnAck, Connect, Packet, Properties, ProtocolVersion, ReasonCode};
use halyard_testkit::{RawClient, TestBroker};
use tokio::io::{AsyncRead, AsyncWrite};

fn connect(v: ProtocolVersion, id: &str, user: Option<&str>, pw: Option<&str>) -> Packet {
    Packet::Connect(Box::new(Connect {
        protocol: v,
        bridge: false,
        clean_start: true,
        keep_alive: 60,
        client_id: ClientId::new(id).unwrap(),
        will: None,
        username: user.map(Into::into),
        password: pw.map(|p| halyard_codec::Bytes::copy_from_slice(p.as_bytes())),
        properties: Properties::default(),
    }))
}

async fn ack<S: AsyncRead + AsyncWrite + Unpin>(c: &mut RawClient<S>, p: Packet) -> ConnAck {
    if let Packet::Connect(x) = &p {
        c.version = x.protocol;
    }
    c.send(&p).await;
    match c.recv().await {
        Packet::ConnAck(a) => a,
        other => panic!("expected CONNACK, got {other:?}"),
    }
}

fn security(file: PasswordFile, anonymous: Anonymous) -> Security {
    Security {
        authenticator: Some(Arc::new(file)),
        anonymous,
        ..Security::default()
    }
}

fn users() -> PasswordFile {
    let mut f = PasswordFile::default();
    f.set("alice", b"wonderland", Scheme::Argon2id).unwrap();
    f.set("bob", b"builder", Scheme::Pbkdf2Sha512(101)).unwrap();
    f
}

/// [MQTT-3.1.4-2]/[MQTT-3.2.2-5]: a refused CONNECT gets a CONNACK with the reason and the
/// connection is closed. v5: 0x86 bad user name or password, 0x87 not authorized; 3.1.1:
/// return codes 4 and 5 (which the codec maps from the same reason codes).
async fn password_file_decides(v: ProtocolVersion) {
    let tb = TestBroker::start().await;
    tb.broker.set_security(security(users(), Anonymous::Deny));
    let mut c = tb.raw().await;
    assert_eq!(
        ack(&mut c, connect(v, "a", Some("alice"), Some("wonderland")))
            .await
            .reason,
        ReasonCode::Success
    );
    let mut c = tb.raw().await;
    assert_eq!(
        ack(&mut c, connect(v, "b", Some("bob"), Some("builder")))
            .await
            .reason,
        ReasonCode::Success
    );
    for (user, pw) in [
        (Some("alice"), Some("wrong")),
        (Some("mallory"), Some("wonderland")),
        (Some("bob"), None),
    ] {
        let mut c = tb.raw().await;
        let a = ack(&mut c, connect(v, "x", user, pw)).await;
        assert_eq!(
            a.reason,
            ReasonCode::BadUserNameOrPassword,
            "{user:?}/{pw:?}"
        );
        assert!(c.expect_close().await.is_empty());
    }
    let mut c = tb.raw().await;
    assert_eq!(
        ack(&mut c, connect(v, "anon", None, None)).await.reason,
        ReasonCode::NotAuthorized
    );
}

async fn failed_logins_are_rate_limited_per_address(v: ProtocolVersion) {
    let tb = TestBroker::start().await;
    tb.broker.set_security(security(users(), Anonymous::Deny));
    let limit = halyard_broker::config::defaults::AUTH_FAILURES_PER_WINDOW;
    for _ in 0..limit {
        let mut c = tb.raw().await;
        assert_eq!(
            ack(&mut c, connect(v, "g", Some("alice"), Some("guess")))
                .await
                .reason,
            ReasonCode::BadUserNameOrPassword
        );
    }
    // Now even the right password is refused from this address, without being checked.
    let mut c = tb.raw().await;
    let a = ack(&mut c, connect(v, "a", Some("alice"), Some("wonderland"))).await;
    assert_eq!(a.reason, ReasonCode::BadUserNameOrPassword);
    if v.is_v5() {
        assert!(
            a.properties
                .reason_string
                .as_deref()
                .is_some_and(|r| r.contains("too many failed"))
        );
    }
    // A reload (new rules) clears the counts.
    tb.broker.set_security(security(users(), Anonymous::Deny));
    let mut c = tb.raw().await;
    assert_eq!(
        ack(&mut c, connect(v, "a", Some("alice"), Some("wonderland")))
            .await
            .reason,
        ReasonCode::Success
    );
}

async fn reload_keeps_connected_clients(v: ProtocolVersion) {
    let tb = TestBroker::start().await;
    tb.broker.set_security(security(users(), Anonymous::Deny));
    let mut alice = tb.raw().await;
    assert_eq!(
        ack(
            &mut alice,
            connect(v, "alice-1", Some("alice"), Some("wonderland"))
        )
        .await
        .reason,
        ReasonCode::Success
    );
    // New file: alice's password changed, carol added.
    let mut f = PasswordFile::default();
    f.set("alice", b"looking-glass", Scheme::Sha512).unwrap();
    f.set("carol", b"c", Scheme::Argon2id).unwrap();
    tb.broker.set_security(security(f, Anonymous::Deny));
    let mut c = tb.raw().await;
    assert_eq!(
        ack(&mut c, connect(v, "carol", Some("carol"), Some("c")))
            .await
            .reason,
        ReasonCode::Success
    );
    let mut c = tb.raw().await;
    assert_eq!(
        ack(
            &mut c,
            connect(v, "alice-2", Some("alice"), Some("wonderland"))
        )
        .await
        .reason,
        ReasonCode::BadUserNameOrPassword
    );
    // The connection made before the reload is still served.
    alice.send(&Packet::PingReq).await;
    assert!(matches!(alice.recv().await, Packet::PingResp));
}

async fn anonymous_loopback_only(v: ProtocolVersion) {
    let tb = TestBroker::start().await;
    tb.broker.set_security(Security {
        anonymous: Anonymous::LoopbackOnly,
        ..Security::default()
    });
    // Over TCP from 127.0.0.1: served.
    let mut c = tb.raw().await;
    assert_eq!(
        ack(&mut c, connect(v, "local", None, None)).await.reason,
        ReasonCode::Success
    );
    // The same client as seen from a non-loopback address (what a transport reports).
    let (a, b) = tokio::io::duplex(4096);
    let remote: std::net::SocketAddr = "192.0.2.7:50000".parse().unwrap();
    tb.broker.spawn_connection(b, remote);
    let mut far = RawClient::new(a);
    assert_eq!(
        ack(&mut far, connect(v, "far", None, None)).await.reason,
        ReasonCode::NotAuthorized
    );
    // With no password file nothing verifies a user name: from afar the client is
    // anonymous whatever name it sends, and refused like one.
    let (a, b) = tokio::io::duplex(4096);
    tb.broker.spawn_connection(b, remote);
    let mut named = RawClient::new(a);
    assert_eq!(
        ack(&mut named, connect(v, "named", Some("x"), Some("y")))
            .await
            .reason,
        ReasonCode::NotAuthorized
    );
}

macro_rules! both_versions {
    ($($name:ident),* $(,)?) => {
        mod v3_1_1 { $( #[tokio::test] async fn $name() { super::$name(halyard_codec::ProtocolVersion::V3_1_1).await } )* }
        mod v5 { $( #[tokio::test] async fn $name() { super::$name(halyard_codec::ProtocolVersion::V5).await } )* }
    };
}

both_versions!(
    password_file_decides,
    failed_logins_are_rate_limited_per_address,
    reload_keeps_connected_clients,
    anonymous_loopback_only,
);
