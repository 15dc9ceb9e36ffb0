//! The holes an attacker would try, over the raw wire, MQTT 3.1.1 and 5.0: a user name
//! nothing verifies, wills past the ACL, another user's session, user properties outside
//! the memory budgets. Each test is written as the attack; it fails on a broker that lets
//! it through.

use std::sync::Arc;
use std::time::Duration;

use halyard_auth::{AclFile, PasswordFile, Scheme};
use halyard_broker::BrokerConfig;
use halyard_broker::auth::{Anonymous, Security};
use halyard_codec::*;
use halyard_store::MemoryStore;
use halyard_testkit::{RawClient, Recv, TestBroker, eventually};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;

mod common;

/// bob writes only to `bob/#`; alice owns `alice/#`; `watch` (anonymous allowed to read
/// everything) observes.
const ACL: &str = "\
topic read #
user alice
topic readwrite alice/#
user bob
topic readwrite bob/#
";

fn users() -> PasswordFile {
    let mut pw = PasswordFile::default();
    pw.set("alice", b"a", Scheme::Sha512).unwrap();
    pw.set("bob", b"b", Scheme::Sha512).unwrap();
    pw
}

fn with_acl(acl: &str) -> Security {
    Security {
        authenticator: Some(Arc::new(users())),
        authorizer: Some(Arc::new(AclFile::parse(acl, "acl").unwrap())),
        anonymous: Anonymous::Allow,
        ..Security::default()
    }
}

struct Conn<'a> {
    id: &'a str,
    user: Option<&'a str>,
    clean: bool,
    will: Option<(&'a str, bool)>,
}

fn connect(v: ProtocolVersion, c: &Conn<'_>) -> Packet {
    Packet::Connect(Box::new(Connect {
        protocol: v,
        bridge: false,
        clean_start: c.clean,
        keep_alive: 60,
        client_id: ClientId::new(c.id).unwrap(),
        will: c.will.map(|(topic, retain)| Will {
            qos: QoS::AtLeastOnce,
            retain,
            topic: TopicName::try_from(topic).unwrap(),
            payload: Bytes::from_static(b"spoofed"),
            properties: PublishProperties::default(),
            delay_interval: None,
        }),
        username: c.user.map(Into::into),
        // The password file's password is the user name's first letter.
        password: c.user.map(|u| Bytes::copy_from_slice(&u.as_bytes()[..1])),
        properties: Properties {
            session_expiry_interval: (v.is_v5() && !c.clean).then_some(3600),
            ..Properties::default()
        },
    }))
}

async fn connack<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut RawClient<S>,
    v: ProtocolVersion,
    c: &Conn<'_>,
) -> ConnAck {
    s.version = v;
    s.send(&connect(v, c)).await;
    match s.recv().await {
        Packet::ConnAck(a) => a,
        other => panic!("expected CONNACK, got {other:?}"),
    }
}

async fn online(tb: &TestBroker, v: ProtocolVersion, c: &Conn<'_>) -> RawClient<TcpStream> {
    let mut s = tb.raw().await;
    let a = connack(&mut s, v, c).await;
    assert_eq!(a.reason, ReasonCode::Success, "{a:?}");
    s
}

/// Subscribes, and the subscription must be granted.
async fn subscribed(s: &mut RawClient<TcpStream>, filter: &str) {
    let r = common::subscribe(s, filter).await;
    assert!(r as u8 <= 2, "{r:?}");
}

async fn publish(s: &mut RawClient<TcpStream>, topic: &str, id: u16) -> Ack {
    s.send(&Packet::Publish(Publish {
        qos: QoS::AtLeastOnce,
        packet_id: id,
        ..Publish::new(TopicName::try_from(topic).unwrap(), &b"m"[..])
    }))
    .await;
    match s.recv().await {
        Packet::PubAck(a) => a,
        other => panic!("{other:?}"),
    }
}

/// An anonymous client subscribed to `filter` (its subscription granted), to see what
/// gets delivered.
async fn watcher(tb: &TestBroker, v: ProtocolVersion, filter: &str) -> RawClient<TcpStream> {
    let c = Conn {
        id: "watch",
        user: None,
        clean: true,
        will: None,
    };
    let mut s = online(tb, v, &c).await;
    subscribed(&mut s, filter).await;
    s
}

/// `user` (password file user) connects with client id `id`: its connection and CONNACK.
async fn connect_as(
    tb: &TestBroker,
    v: ProtocolVersion,
    id: &str,
    user: &str,
    clean: bool,
) -> (RawClient<TcpStream>, ConnAck) {
    let mut s = tb.raw().await;
    let c = Conn {
        id,
        user: Some(user),
        clean,
        will: None,
    };
    let a = connack(&mut s, v, &c).await;
    (s, a)
}

/// The next PUBLISH within a short wait, unacknowledged; `None` on silence.
async fn next_publish(s: &mut RawClient<TcpStream>) -> Option<Publish> {
    match s.recv_within(Duration::from_millis(300)).await {
        Recv::Packet(Packet::Publish(p)) => Some(p),
        Recv::Timeout | Recv::Closed => None,
        other => panic!("{other:?}"),
    }
}

/// The reason a v5 client is told; 3.1.1 gets a positive PUBACK for a refused PUBLISH.
fn v5_only(v: ProtocolVersion, r: ReasonCode) -> ReasonCode {
    if v.is_v5() { r } else { ReasonCode::Success }
}

/// A user name is no identity unless something verifies it. Without a password file a
/// client from a non-loopback address (a PROXY header says 203.0.113.7) is anonymous
/// whatever user name it sends, and anonymous clients are loopback-only by default:
/// CONNACK 0x87 (3.1.1: return code 5) with or without a user name.
async fn unverified_user_name_is_refused_from_afar(v: ProtocolVersion) {
    let tb = TestBroker::start().await;
    // What `halyard serve` runs with when nothing about authentication is configured.
    tb.broker.set_security(Security::default());
    let proxied = tb.listen("tcp://127.0.0.1:0?proxy_protocol=true").await;
    let addr = proxied.local_addr();
    for user in [None, Some("x"), Some("admin")] {
        let mut s = RawClient::new(TcpStream::connect(&addr).await.unwrap());
        s.send_bytes(b"PROXY TCP4 203.0.113.7 127.0.0.1 40000 1883\r\n")
            .await;
        let a = connack(
            &mut s,
            v,
            &Conn {
                id: "far",
                user,
                clean: true,
                will: None,
            },
        )
        .await;
        assert_eq!(a.reason, ReasonCode::NotAuthorized, "user {user:?}: {a:?}");
        s.expect_close().await;
    }
    // On loopback an anonymous client is let in; its user name stays unverified.
    online(
        &tb,
        v,
        &Conn {
            id: "near",
            user: Some("x"),
            clean: true,
            will: None,
        },
    )
    .await;
}

/// With an ACL but no password file, naming a user gives none of that user's rights: the
/// client is anonymous (here: read-only), so alice's topics stay alice's.
async fn unverified_user_name_gets_no_rights(v: ProtocolVersion) {
    let tb = TestBroker::start().await;
    tb.broker.set_security(Security {
        authorizer: Some(Arc::new(AclFile::parse(ACL, "acl").unwrap())),
        ..Security::default()
    });
    let mut watch = watcher(&tb, v, "alice/#").await;
    let mut fake = tb.raw().await;
    fake.version = v;
    fake.send(&Packet::Connect(Box::new(Connect {
        password: None,
        ..match connect(
            v,
            &Conn {
                id: "fake",
                user: Some("alice"),
                clean: true,
                will: None,
            },
        ) {
            Packet::Connect(c) => *c,
            _ => unreachable!(),
        }
    })))
    .await;
    assert!(matches!(fake.recv().await, Packet::ConnAck(a) if a.reason == ReasonCode::Success));
    let a = publish(&mut fake, "alice/spoof", 3).await;
    assert_eq!(a.reason, v5_only(v, ReasonCode::NotAuthorized));
    assert!(
        next_publish(&mut watch).await.is_none(),
        "spoofed message delivered"
    );
}

/// A will is a PUBLISH made at CONNECT: bob, who may write only `bob/#`, is refused a
/// will on `alice/will` (v5 0x87, 3.1.1 return code 5); a will on his own topic is fine.
async fn will_needs_write_rights_at_connect(v: ProtocolVersion) {
    let tb = TestBroker::start().await;
    tb.broker.set_security(with_acl(ACL));
    let mut s = tb.raw().await;
    let a = connack(
        &mut s,
        v,
        &Conn {
            id: "bob",
            user: Some("bob"),
            clean: true,
            will: Some(("alice/will", true)),
        },
    )
    .await;
    assert_eq!(a.reason, ReasonCode::NotAuthorized);
    assert!(tb.broker.stats().publish_denied >= 1);
    online(
        &tb,
        v,
        &Conn {
            id: "bob",
            user: Some("bob"),
            clean: true,
            will: Some(("bob/will", true)),
        },
    )
    .await;
}

/// Rights are checked again when the will is published: revoked in between (a reload),
/// the will goes nowhere and is not retained.
async fn will_rights_rechecked_when_published(v: ProtocolVersion) {
    let tb = TestBroker::start().await;
    tb.broker.set_security(with_acl(ACL));
    let bob = online(
        &tb,
        v,
        &Conn {
            id: "bob",
            user: Some("bob"),
            clean: true,
            will: Some(("bob/will", true)),
        },
    )
    .await;
    let mut watch = watcher(&tb, v, "bob/#").await;
    tb.broker
        .set_security(with_acl("topic read #\nuser bob\ntopic read bob/#\n"));
    drop(bob); // no DISCONNECT: the will is due [MQTT-3.1.2-8]
    eventually("the will is refused", || {
        tb.broker.stats().publish_denied >= 1
    })
    .await;
    assert!(next_publish(&mut watch).await.is_none(), "will delivered");
    assert_eq!(tb.broker.stats().wills_published, 0);
    assert_eq!(tb.broker.gauges().retained, 0, "will retained");
}

/// alice online with a persistent session `id`, subscribed to `alice/#`, one QoS 1
/// message on `alice/secret/1` sent to her and not acknowledged.
async fn alice_with_message_in_flight(
    tb: &TestBroker,
    v: ProtocolVersion,
    id: &'static str,
) -> (RawClient<TcpStream>, Conn<'static>) {
    let alice_conn = Conn {
        id,
        user: Some("alice"),
        clean: false,
        will: None,
    };
    let mut alice = online(tb, v, &alice_conn).await;
    subscribed(&mut alice, "alice/#").await;
    let mut p = online(
        tb,
        v,
        &Conn {
            id: "pub",
            user: Some("alice"),
            clean: true,
            will: None,
        },
    )
    .await;
    publish(&mut p, "alice/secret/1", 7).await;
    let first = next_publish(&mut alice).await.expect("delivered to alice");
    assert_eq!(first.topic.as_str(), "alice/secret/1");
    (alice, alice_conn)
}

/// alice's persistent session (client id `alice-2`) is bound to alice: bob naming it is
/// refused (0x87 / return code 5), with clean start or not, and neither alice's live
/// connection nor her session is touched; alice resumes it with its in-flight message.
async fn session_belongs_to_its_user(v: ProtocolVersion) {
    let tb = TestBroker::start().await;
    tb.broker.set_security(with_acl(ACL));
    let (mut alice, alice_conn) = alice_with_message_in_flight(&tb, v, "alice-2").await;
    for clean in [false, true] {
        let (mut bob, a) = connect_as(&tb, v, "alice-2", "bob", clean).await;
        assert_eq!(a.reason, ReasonCode::NotAuthorized, "clean {clean}: {a:?}");
        assert!(!a.session_present);
        assert!(
            next_publish(&mut bob).await.is_none(),
            "bob got alice's message"
        );
    }
    // alice was not kicked [MQTT-3.1.4-3 applies to the same client only].
    alice.send(&Packet::PingReq).await;
    assert!(matches!(alice.recv().await, Packet::PingResp));
    drop(alice);
    eventually("alice offline", || {
        tb.broker.gauges().sessions_connected == 0
    })
    .await;
    // Offline, the session is still hers alone; she resumes it and gets the resend.
    let (_bob, a) = connect_as(&tb, v, "alice-2", "bob", false).await;
    assert_eq!(a.reason, ReasonCode::NotAuthorized);
    let mut alice = tb.raw().await;
    let a = connack(&mut alice, v, &alice_conn).await;
    assert!(a.session_present, "{a:?}");
    let again = next_publish(&mut alice)
        .await
        .expect("resent [MQTT-4.4.0-1]");
    assert!(again.dup && again.topic.as_str() == "alice/secret/1");
}

/// The binding survives a restart: the store keeps the session's owner.
async fn session_owner_survives_a_restart(v: ProtocolVersion) {
    let store = Arc::new(MemoryStore::new());
    let tb = TestBroker::with_store(BrokerConfig::default(), store.clone()).await;
    tb.broker.set_security(with_acl(ACL));
    let alice_conn = Conn {
        id: "alice-3",
        user: Some("alice"),
        clean: false,
        will: None,
    };
    let mut alice = online(&tb, v, &alice_conn).await;
    subscribed(&mut alice, "alice/#").await;
    drop(alice);
    eventually("alice offline", || {
        tb.broker.gauges().sessions_connected == 0
    })
    .await;
    tb.broker.shutdown().await;
    let tb = TestBroker::with_store(BrokerConfig::default(), store).await;
    tb.broker.set_security(with_acl(ACL));
    let (_bob, a) = connect_as(&tb, v, "alice-3", "bob", false).await;
    assert_eq!(a.reason, ReasonCode::NotAuthorized);
    let mut alice = tb.raw().await;
    assert!(connack(&mut alice, v, &alice_conn).await.session_present);
}

/// Read rights are checked on resend too: a message alice may no longer read (the rules
/// changed while she was away) is not resent, and counted as withheld.
async fn resend_rechecks_read_rights(v: ProtocolVersion) {
    let tb = TestBroker::start().await;
    tb.broker.set_security(with_acl(ACL));
    let (alice, alice_conn) = alice_with_message_in_flight(&tb, v, "alice-4").await;
    drop(alice);
    eventually("alice offline", || {
        tb.broker.gauges().sessions_connected == 0
    })
    .await;
    tb.broker.set_security(with_acl(
        "user alice\ntopic deny alice/secret/#\ntopic readwrite alice/#\n",
    ));
    let before = tb.broker.stats().dropped_not_authorized;
    let mut alice = tb.raw().await;
    assert!(connack(&mut alice, v, &alice_conn).await.session_present);
    assert!(
        next_publish(&mut alice).await.is_none(),
        "resent past the ACL"
    );
    assert_eq!(tb.broker.stats().dropped_not_authorized, before + 1);
    assert_eq!(tb.broker.gauges().inflight, 0);
}

/// `$SYS` is the broker's: no client publishes there, ACL or not (v5 PUBACK 0x87; 3.1.1
/// acknowledged and dropped [MQTT-3.3.5-2]), and nothing is retained.
async fn sys_topics_are_the_brokers(v: ProtocolVersion) {
    let tb = TestBroker::start().await;
    let mut c = online(
        &tb,
        v,
        &Conn {
            id: "c",
            user: None,
            clean: true,
            will: None,
        },
    )
    .await;
    c.send(&Packet::Publish(Publish {
        qos: QoS::AtLeastOnce,
        packet_id: 2,
        retain: true,
        ..Publish::new(
            TopicName::try_from("$SYS/broker/version").unwrap(),
            &b"spoofed"[..],
        )
    }))
    .await;
    match c.recv().await {
        Packet::PubAck(a) => assert_eq!(a.reason, v5_only(v, ReasonCode::NotAuthorized)),
        other => panic!("{other:?}"),
    }
    subscribed(&mut c, "$SYS/broker/version").await;
    if let Some(p) = next_publish(&mut c).await {
        assert_ne!(&p.payload[..], b"spoofed");
    }
    let mut w = tb.raw().await;
    let a = connack(
        &mut w,
        v,
        &Conn {
            id: "w",
            user: None,
            clean: true,
            will: Some(("$SYS/broker/uptime", true)),
        },
    )
    .await;
    assert_eq!(a.reason, ReasonCode::NotAuthorized);
}

/// Sessions are bounded: `max_sessions` in all, `max_sessions_per_user` per verified
/// user. A CONNECT that needs one more gets CONNACK 0x97 (3.1.1: return code 3, server
/// unavailable) and is counted; resuming a session is never refused; a session that ends
/// frees its place.
async fn sessions_are_bounded(v: ProtocolVersion) {
    let cfg = BrokerConfig {
        max_sessions: 3,
        max_sessions_per_user: 2,
        ..BrokerConfig::default()
    };
    let tb = TestBroker::with_config(cfg).await;
    tb.broker.set_security(with_acl(ACL));
    let full = if v.is_v5() {
        ReasonCode::QuotaExceeded
    } else {
        ReasonCode::ServerUnavailable
    };
    for id in ["a1", "a2"] {
        let (s, a) = connect_as(&tb, v, id, "alice", false).await;
        assert_eq!(a.reason, ReasonCode::Success);
        drop(s);
    }
    eventually("both offline", || {
        tb.broker.gauges().sessions_connected == 0
    })
    .await;
    let (_s, a) = connect_as(&tb, v, "a3", "alice", false).await;
    assert_eq!(a.reason, full, "a third session for alice");
    assert_eq!(tb.broker.stats().sessions_refused, 1);
    let (a1, a) = connect_as(&tb, v, "a1", "alice", false).await;
    assert!(
        a.reason == ReasonCode::Success && a.session_present,
        "resume: {a:?}"
    );
    let (_b1, a) = connect_as(&tb, v, "b1", "bob", false).await;
    assert_eq!(a.reason, ReasonCode::Success);
    let mut anon = tb.raw().await;
    let c = Conn {
        id: "anon",
        user: None,
        clean: true,
        will: None,
    };
    assert_eq!(
        connack(&mut anon, v, &c).await.reason,
        full,
        "a fourth session"
    );
    assert_eq!(tb.broker.stats().sessions_refused, 2);
    // a1 ends (a clean start replaces it, then the connection's end ends that one).
    drop(a1);
    let (a1, a) = connect_as(&tb, v, "a1", "alice", true).await;
    assert_eq!(a.reason, ReasonCode::Success);
    drop(a1);
    eventually("a1 ended", || tb.broker.counts().0 == 2).await;
    let mut anon = tb.raw().await;
    assert_eq!(connack(&mut anon, v, &c).await.reason, ReasonCode::Success);
}

/// Subscriptions are charged to `max_memory_bytes` (filter bytes plus a fixed overhead
/// each): past the budget a new subscription gets SUBACK 0x97 (3.1.1: 0x80) and is
/// counted; replacing one is not refused; unsubscribing and a session's end refund it.
async fn subscriptions_are_charged_to_the_memory_budget(v: ProtocolVersion) {
    let cfg = BrokerConfig {
        max_memory_bytes: 4_096,
        max_subscriptions_per_client: 0,
        ..BrokerConfig::default()
    };
    let tb = TestBroker::with_config(cfg).await;
    let mut c = online(
        &tb,
        v,
        &Conn {
            id: "many",
            user: None,
            clean: true,
            will: None,
        },
    )
    .await;
    let mut granted = 0;
    let refused = loop {
        let r = common::subscribe(&mut c, &format!("s/{granted}")).await;
        if r as u8 > 2 {
            break r;
        }
        granted += 1;
        assert!(granted < 100, "never refused");
    };
    assert_eq!(
        refused,
        if v.is_v5() {
            ReasonCode::QuotaExceeded
        } else {
            ReasonCode::UnspecifiedError
        }
    );
    assert!(granted >= 10, "only {granted} granted");
    let charged = tb.broker.gauges().subscription_bytes;
    assert!(charged >= 4_096, "charged {charged}");
    assert_eq!(tb.broker.stats().subscribe_quota_exceeded, 1);
    // Replacing an existing subscription is not a new charge.
    assert!((common::subscribe(&mut c, "s/0").await as u8) <= 2);
    c.send(&Packet::Unsubscribe(Unsubscribe {
        packet_id: 3,
        filters: vec![TopicFilter::try_from("s/0").unwrap()],
        properties: Properties::default(),
    }))
    .await;
    assert!(matches!(c.recv().await, Packet::UnsubAck(_)));
    assert!((common::subscribe(&mut c, "s/again").await as u8) <= 2);
    drop(c);
    eventually("the session's subscriptions refunded", || {
        tb.broker.gauges().subscription_bytes == 0
    })
    .await;
}

/// By default no session lives forever: the expiry granted is capped at a week, told to
/// a v5 client in CONNACK (section 3.2.2.3.2), applied
/// to a 3.1.1 persistent session.
async fn session_expiry_is_capped_by_default(v: ProtocolVersion) {
    let tb = TestBroker::start().await;
    let mut s = tb.raw().await;
    s.version = v;
    let Packet::Connect(mut c) = connect(
        v,
        &Conn {
            id: "forever",
            user: None,
            clean: false,
            will: None,
        },
    ) else {
        unreachable!()
    };
    if v.is_v5() {
        c.properties.session_expiry_interval = Some(u32::MAX);
    }
    s.send(&Packet::Connect(c)).await;
    let Packet::ConnAck(a) = s.recv().await else {
        panic!("no CONNACK")
    };
    assert_eq!(a.reason, ReasonCode::Success);
    let week = 7 * 24 * 3600;
    if v.is_v5() {
        assert_eq!(a.properties.session_expiry_interval, Some(week));
    }
    let (info, _) = tb.broker.client("forever").expect("the session");
    assert_eq!(info.expiry_interval, week);
}

fn user_props(n: usize, len: usize) -> Vec<(ByteString, ByteString)> {
    (0..n)
        .map(|i| (format!("{i:02}").into(), "v".repeat(len).into()))
        .collect()
}

/// MQTT 5 only (3.1.1 has no properties). Over `max_user_properties` or
/// `max_user_properties_bytes` a PUBLISH gets PUBACK 0x97 and goes nowhere; a will gets
/// CONNACK 0x97. Within them, what a message's properties hold is charged to the
/// retained and memory budgets, not only its payload.
#[tokio::test]
async fn user_properties_are_limited_and_charged() {
    let cfg = BrokerConfig {
        max_user_properties: 10,
        max_user_properties_bytes: 2_000,
        ..BrokerConfig::default()
    };
    let tb = TestBroker::with_config(cfg).await;
    let v = ProtocolVersion::V5;
    let mut c = online(
        &tb,
        v,
        &Conn {
            id: "c",
            user: None,
            clean: true,
            will: None,
        },
    )
    .await;
    let send = |props: Vec<(ByteString, ByteString)>, id: u16| {
        Packet::Publish(Publish {
            qos: QoS::AtLeastOnce,
            packet_id: id,
            retain: true,
            properties: PublishProperties {
                user_properties: props,
                ..Default::default()
            },
            ..Publish::new(TopicName::try_from("p/x").unwrap(), &b"1"[..])
        })
    };
    for (props, why) in [
        (user_props(11, 1), "count"),
        (user_props(3, 1_000), "bytes"),
    ] {
        c.send(&send(props, 1)).await;
        match c.recv().await {
            Packet::PubAck(a) => assert_eq!(a.reason, ReasonCode::QuotaExceeded, "{why}"),
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(tb.broker.stats().properties_refused, 2);
    assert_eq!(tb.broker.gauges().retained, 0);
    c.send(&send(user_props(10, 150), 2)).await;
    match c.recv().await {
        Packet::PubAck(a) => assert!(a.reason as u8 <= 0x10, "{a:?}"),
        other => panic!("{other:?}"),
    }
    let g = tb.broker.gauges();
    assert_eq!(g.retained, 1);
    // 10 × (2 + 150) bytes of names and values, plus what holds them.
    assert!(
        g.retained_bytes > 10 * 152,
        "retained_bytes {}",
        g.retained_bytes
    );
    assert!(
        tb.broker.stats().message_bytes_alive as usize >= g.retained_bytes,
        "{:?}",
        tb.broker.stats()
    );
    let mut w = tb.raw().await;
    w.version = v;
    let mut will = connect(
        v,
        &Conn {
            id: "w",
            user: None,
            clean: true,
            will: Some(("p/will", false)),
        },
    );
    if let Packet::Connect(c) = &mut will {
        c.will.as_mut().unwrap().properties.user_properties = user_props(11, 1);
    }
    w.send(&will).await;
    match w.recv().await {
        Packet::ConnAck(a) => assert_eq!(a.reason, ReasonCode::QuotaExceeded),
        other => panic!("{other:?}"),
    }
}

/// MQTT 5 only. A packet with more than 8 × `max_user_properties` user properties is not
/// decoded at all (each costs ~25 times its wire size once built): a CONNECT, before any
/// authentication, gets CONNACK 0x97; a PUBLISH gets DISCONNECT 0x97 and the close.
#[tokio::test]
async fn floods_of_user_properties_are_not_decoded() {
    let cfg = BrokerConfig {
        max_user_properties: 10,
        ..BrokerConfig::default()
    };
    let tb = TestBroker::with_config(cfg).await;
    let v = ProtocolVersion::V5;
    let mut c = tb.raw().await;
    c.version = v;
    let Packet::Connect(mut connect_packet) = connect(
        v,
        &Conn {
            id: "flood",
            user: None,
            clean: true,
            will: None,
        },
    ) else {
        unreachable!()
    };
    connect_packet.properties.user_properties = user_props(81, 1);
    c.send(&Packet::Connect(connect_packet)).await;
    match c.recv().await {
        Packet::ConnAck(a) => assert_eq!(a.reason, ReasonCode::QuotaExceeded),
        other => panic!("{other:?}"),
    }
    let mut c = online(
        &tb,
        v,
        &Conn {
            id: "flood",
            user: None,
            clean: true,
            will: None,
        },
    )
    .await;
    c.send(&Packet::Publish(Publish {
        properties: PublishProperties {
            user_properties: user_props(81, 1),
            ..Default::default()
        },
        ..Publish::new(TopicName::try_from("p/x").unwrap(), &b"1"[..])
    }))
    .await;
    match c.recv().await {
        Packet::Disconnect(d) => assert_eq!(d.reason, ReasonCode::QuotaExceeded),
        other => panic!("{other:?}"),
    }
    c.expect_close().await;
}

macro_rules! both_versions {
    ($($name:ident),* $(,)?) => {
        mod v3_1_1 { $( #[tokio::test] async fn $name() { super::$name(halyard_codec::ProtocolVersion::V3_1_1).await } )* }
        mod v5 { $( #[tokio::test] async fn $name() { super::$name(halyard_codec::ProtocolVersion::V5).await } )* }
    };
}

both_versions!(
    unverified_user_name_is_refused_from_afar,
    unverified_user_name_gets_no_rights,
    will_needs_write_rights_at_connect,
    will_rights_rechecked_when_published,
    session_belongs_to_its_user,
    session_owner_survives_a_restart,
    resend_rechecks_read_rights,
    sys_topics_are_the_brokers,
    sessions_are_bounded,
    session_expiry_is_capped_by_default,
    subscriptions_are_charged_to_the_memory_budget,
);
