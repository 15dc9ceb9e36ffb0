//! The ACL file behind the broker, MQTT 3.1.1 and 5.0 over the raw wire: denied publishes
//! (v5 0x87, 3.1.1 positive ack and no delivery [MQTT-3.3.5-2]), denied subscriptions
//! (v5 0x87 or 0x80 as configured, 3.1.1 0x80 [MQTT-3.9.3-2]), read rights on delivery and
//! on retained messages, and a reload applied to connected clients.

use std::sync::Arc;
use std::time::Duration;

use halyard_auth::{AclFile, PasswordFile, Scheme};
use halyard_broker::auth::{Anonymous, Security};
use halyard_codec::*;
use halyard_testkit::{RawClient, Recv, TestBroker};
use tokio::net::TcpStream;

mod common;
use common::subscribe;

const ACL: &str = "\
topic read public/#
user alice
topic readwrite alice/#
topic deny alice/secret
topic read public/#
user bob
topic read alice/#
topic write bob/#
";

fn security(acl: &str, subscribe_0x87: bool) -> Security {
    let mut pw = PasswordFile::default();
    pw.set("alice", b"a", Scheme::Sha512).unwrap();
    pw.set("bob", b"b", Scheme::Sha512).unwrap();
    Security {
        authenticator: Some(Arc::new(pw)),
        authorizer: Some(Arc::new(AclFile::parse(acl, "acl").unwrap())),
        anonymous: Anonymous::Allow,
        subscribe_denied_not_authorized: subscribe_0x87,
        enhanced: Vec::new(),
    }
}

async fn client(
    tb: &TestBroker,
    v: ProtocolVersion,
    id: &str,
    user: Option<&str>,
) -> RawClient<TcpStream> {
    let mut c = tb.raw().await;
    c.version = v;
    c.send(&Packet::Connect(Box::new(Connect {
        protocol: v,
        bridge: false,
        clean_start: true,
        keep_alive: 60,
        client_id: ClientId::new(id).unwrap(),
        will: None,
        username: user.map(Into::into),
        password: user.map(|u| Bytes::copy_from_slice(&u.as_bytes()[..1])),
        properties: Properties::default(),
    })))
    .await;
    match c.recv().await {
        Packet::ConnAck(a) => assert_eq!(a.reason, ReasonCode::Success, "{a:?}"),
        other => panic!("{other:?}"),
    }
    c
}

async fn publish(c: &mut RawClient<TcpStream>, topic: &str, retain: bool) -> ReasonCode {
    c.send(&Packet::Publish(Publish {
        qos: QoS::AtLeastOnce,
        packet_id: 5,
        retain,
        ..Publish::new(
            TopicName::try_from(topic).unwrap(),
            Bytes::from_static(b"m"),
        )
    }))
    .await;
    match c.recv().await {
        Packet::PubAck(a) => a.reason,
        other => panic!("{other:?}"),
    }
}

async fn next_topic(c: &mut RawClient<TcpStream>) -> Option<String> {
    match c.recv_within(Duration::from_millis(300)).await {
        Recv::Packet(Packet::Publish(p)) => {
            if p.qos != QoS::AtMostOnce {
                c.send(&Packet::PubAck(Ack::new(p.packet_id))).await;
            }
            Some(p.topic.to_string())
        }
        Recv::Timeout => None,
        other => panic!("{other:?}"),
    }
}

async fn publish_rights(v: ProtocolVersion) {
    let tb = TestBroker::start().await;
    tb.broker.set_security(security(ACL, true));
    let mut bob = client(&tb, v, "bob", Some("bob")).await;
    assert!(!subscribe(&mut bob, "alice/#").await.is_error());
    let mut alice = client(&tb, v, "alice", Some("alice")).await;
    assert_eq!(
        publish(&mut alice, "alice/status", false).await,
        ReasonCode::Success
    );
    assert_eq!(next_topic(&mut bob).await.as_deref(), Some("alice/status"));
    // Denied: v5 says so; 3.1.1 acknowledges and drops.
    let r = publish(&mut alice, "bob/inbox", false).await;
    assert_eq!(
        r,
        if v.is_v5() {
            ReasonCode::NotAuthorized
        } else {
            ReasonCode::Success
        }
    );
    let mut anon = client(&tb, v, "anon", None).await;
    let r = publish(&mut anon, "alice/status", false).await;
    assert_eq!(
        r,
        if v.is_v5() {
            ReasonCode::NotAuthorized
        } else {
            ReasonCode::Success
        }
    );
    assert_eq!(
        next_topic(&mut bob).await,
        None,
        "denied messages go nowhere"
    );
    assert_eq!(tb.broker.stats().publish_denied, 2);
}

async fn subscribe_rights_and_reason_codes(v: ProtocolVersion) {
    for code_0x87 in [true, false] {
        let tb = TestBroker::start().await;
        tb.broker.set_security(security(ACL, code_0x87));
        let mut bob = client(&tb, v, "bob", Some("bob")).await;
        let want = if v.is_v5() && code_0x87 {
            ReasonCode::NotAuthorized
        } else {
            ReasonCode::UnspecifiedError
        };
        assert_eq!(subscribe(&mut bob, "#").await, want);
        assert_eq!(subscribe(&mut bob, "bob/#").await, want, "write-only");
        assert_eq!(
            subscribe(&mut bob, "$share/g/bob/+").await,
            want,
            "shared: checked on its filter"
        );
        assert_eq!(
            subscribe(&mut bob, "$share/g/alice/+").await,
            ReasonCode::GrantedQoS1
        );
        assert_eq!(
            subscribe(&mut bob, "alice/x/+").await,
            ReasonCode::GrantedQoS1
        );
    }
}

async fn read_rights_on_delivery_and_retained(v: ProtocolVersion) {
    let tb = TestBroker::start().await;
    tb.broker.set_security(security(ACL, true));
    let mut alice = client(&tb, v, "alice", Some("alice")).await;
    assert_eq!(
        publish(&mut alice, "alice/secret", true).await,
        ReasonCode::NotAuthorized.only_v5(v)
    );
    assert!(!publish(&mut alice, "alice/open", true).await.is_error());
    // A retained message alice may not read, set while the rules allowed it.
    tb.broker.set_security(security(
        &ACL.replace("topic deny alice/secret\n", ""),
        true,
    ));
    assert!(!publish(&mut alice, "alice/secret", true).await.is_error());
    tb.broker.set_security(security(ACL, true));
    // alice reads alice/# except alice/secret: subscribe is granted (the deny covers only
    // part of the filter), the denied topic is withheld on delivery.
    let mut reader = client(&tb, v, "alice-2", Some("alice")).await;
    assert_eq!(
        subscribe(&mut reader, "alice/#").await,
        ReasonCode::GrantedQoS1
    );
    assert_eq!(
        next_topic(&mut reader).await.as_deref(),
        Some("alice/open"),
        "retained, allowed"
    );
    assert_eq!(
        next_topic(&mut reader).await,
        None,
        "retained alice/secret withheld"
    );
    // Once a reload allows the topic, it is delivered live.
    tb.broker.set_security(security(
        &ACL.replace("topic deny alice/secret\n", ""),
        true,
    ));
    assert!(!publish(&mut alice, "alice/secret", false).await.is_error());
    assert_eq!(
        next_topic(&mut reader).await.as_deref(),
        Some("alice/secret"),
        "allowed now"
    );
    assert!(tb.broker.stats().dropped_not_authorized >= 1);
}

async fn reload_applies_to_connected_clients(v: ProtocolVersion) {
    let tb = TestBroker::start().await;
    tb.broker.set_security(security(ACL, true));
    let mut bob = client(&tb, v, "bob", Some("bob")).await;
    assert_eq!(
        subscribe(&mut bob, "alice/+").await,
        ReasonCode::GrantedQoS1
    );
    let mut alice = client(&tb, v, "alice", Some("alice")).await;
    assert!(!publish(&mut alice, "alice/a", false).await.is_error());
    assert_eq!(next_topic(&mut bob).await.as_deref(), Some("alice/a"));
    // New rules: bob may no longer read alice/#. He stays connected; delivery stops.
    tb.broker.set_security(security(
        &ACL.replace("user bob\ntopic read alice/#", "user bob"),
        true,
    ));
    assert!(!publish(&mut alice, "alice/b", false).await.is_error());
    assert_eq!(
        next_topic(&mut bob).await,
        None,
        "read right withdrawn by the reload"
    );
    bob.send(&Packet::PingReq).await;
    assert!(matches!(bob.recv().await, Packet::PingResp));
    assert!(tb.broker.stats().dropped_not_authorized >= 1);
}

trait OnlyV5 {
    fn only_v5(self, v: ProtocolVersion) -> ReasonCode;
}
impl OnlyV5 for ReasonCode {
    fn only_v5(self, v: ProtocolVersion) -> ReasonCode {
        if v.is_v5() { self } else { ReasonCode::Success }
    }
}

macro_rules! both_versions {
    ($($name:ident),* $(,)?) => {
        mod v3_1_1 { $( #[tokio::test] async fn $name() { super::$name(halyard_codec::ProtocolVersion::V3_1_1).await } )* }
        mod v5 { $( #[tokio::test] async fn $name() { super::$name(halyard_codec::ProtocolVersion::V5).await } )* }
    };
}

both_versions!(
    publish_rights,
    subscribe_rights_and_reason_codes,
    read_rights_on_delivery_and_retained,
    reload_applies_to_connected_clients,
);
