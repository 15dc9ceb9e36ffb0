//! Helpers shared by the broker's integration tests.
#![allow(dead_code, unreachable_pub)]

use halyard_codec::*;
use halyard_testkit::{RawClient, Recv};
use tokio::io::{AsyncRead, AsyncWrite};

pub use ProtocolVersion::{V3_1_1, V5};

pub fn connect(v: ProtocolVersion, id: &str, clean: bool, keep_alive: u16) -> Packet {
    halyard_testkit::connect_packet(v, id, clean, keep_alive)
}

pub fn connect_with(
    v: ProtocolVersion,
    id: &str,
    clean: bool,
    f: impl FnOnce(&mut Connect),
) -> Packet {
    let Packet::Connect(mut c) = connect(v, id, clean, 60) else {
        unreachable!()
    };
    f(&mut c);
    Packet::Connect(c)
}

pub fn topic(s: &str) -> TopicName {
    TopicName::try_from(s).unwrap()
}

pub fn publish(t: &str, qos: QoS, id: u16, payload: &[u8]) -> Packet {
    Packet::Publish(Publish {
        qos,
        packet_id: if qos == QoS::AtMostOnce { 0 } else { id },
        ..Publish::new(topic(t), Bytes::copy_from_slice(payload))
    })
}

pub fn subscribe(id: u16, filter: &str, qos: QoS) -> Packet {
    subscribe_opts(
        id,
        filter,
        SubscriptionOptions {
            qos,
            ..Default::default()
        },
        None,
    )
}

pub fn subscribe_opts(
    id: u16,
    filter: &str,
    o: SubscriptionOptions,
    sub_id: Option<u32>,
) -> Packet {
    Packet::Subscribe(Subscribe {
        packet_id: id,
        filters: vec![(TopicFilter::try_from(filter).unwrap(), o)],
        properties: Properties {
            subscription_identifier: sub_id,
            ..Default::default()
        },
    })
}

/// Sends CONNECT and returns the CONNACK.
pub async fn handshake<S: AsyncRead + AsyncWrite + Unpin>(
    c: &mut RawClient<S>,
    p: Packet,
) -> ConnAck {
    if let Packet::Connect(x) = &p {
        c.version = x.protocol;
    }
    c.send(&p).await;
    match c.recv().await {
        Packet::ConnAck(a) => a,
        other => panic!("expected CONNACK, got {other:?}"),
    }
}

/// Connects and asserts success.
pub async fn online<S: AsyncRead + AsyncWrite + Unpin>(
    c: &mut RawClient<S>,
    v: ProtocolVersion,
    id: &str,
    clean: bool,
) -> ConnAck {
    let ack = handshake(c, connect(v, id, clean, 60)).await;
    assert_eq!(ack.reason, ReasonCode::Success, "{ack:?}");
    ack
}

pub async fn sub<S: AsyncRead + AsyncWrite + Unpin>(c: &mut RawClient<S>, filter: &str, qos: QoS) {
    c.send(&subscribe(1, filter, qos)).await;
    match c.recv().await {
        Packet::SubAck(s) => assert!(!s.reasons[0].is_error(), "{s:?}"),
        other => panic!("expected SUBACK, got {other:?}"),
    }
}

pub async fn recv_publish<S: AsyncRead + AsyncWrite + Unpin>(c: &mut RawClient<S>) -> Publish {
    match c.recv().await {
        Packet::Publish(p) => p,
        other => panic!("expected PUBLISH, got {other:?}"),
    }
}

/// Expects a v5 DISCONNECT with `reason` then the close; for 3.x just the close.
pub async fn expect_disconnect<S: AsyncRead + AsyncWrite + Unpin>(
    c: &mut RawClient<S>,
    reason: ReasonCode,
) {
    let seen = c.expect_close().await;
    if c.version.is_v5() {
        match seen.last() {
            Some(Packet::Disconnect(d)) => assert_eq!(d.reason, reason, "{d:?}"),
            other => panic!("expected DISCONNECT {reason:?} before the close, got {other:?}"),
        }
    } else {
        assert!(
            !seen.iter().any(|p| matches!(p, Packet::Disconnect(_))),
            "3.x gets no DISCONNECT: {seen:?}"
        );
    }
}

pub fn is_closed(r: &Recv) -> bool {
    matches!(r, Recv::Closed)
}

/// Declares a test for MQTT 3.1.1 and one for 5.0 from an async fn taking the version.
#[macro_export]
macro_rules! both_versions {
    ($($name:ident),* $(,)?) => {
        mod v3_1_1 { $( #[tokio::test] async fn $name() { super::$name(super::V3_1_1).await } )* }
        mod v5 { $( #[tokio::test] async fn $name() { super::$name(super::V5).await } )* }
    };
}

/// The same with paused time (in-memory pipes only).
#[macro_export]
macro_rules! both_versions_paused {
    ($($name:ident),* $(,)?) => {
        mod v3_1_1_paused { $( #[tokio::test(start_paused = true)] async fn $name() { super::$name(super::V3_1_1).await } )* }
        mod v5_paused { $( #[tokio::test(start_paused = true)] async fn $name() { super::$name(super::V5).await } )* }
    };
}

/// [`both_versions`] for plain (not async) test functions.
#[macro_export]
macro_rules! both_versions_sync {
    ($($name:ident),* $(,)?) => {
        mod v3_1_1 { $( #[test] fn $name() { super::$name(super::V3_1_1) } )* }
        mod v5 { $( #[test] fn $name() { super::$name(super::V5) } )* }
    };
}
