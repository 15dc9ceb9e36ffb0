//! Property-based round trip: for generated packets of every type, in MQTT 3.1.1 and 5.0,
//! `decode(encode(p)) == p`, `encoded_len` is exact, and decoding works whichever way the
//! bytes are split across reads.

use bytes::{Bytes, BytesMut};
use halyard_codec::*;
use proptest::prelude::*;

use ProtocolVersion::{V3_1, V3_1_1, V5};

fn mqtt_string(max: usize) -> impl Strategy<Value = ByteString> {
    prop::collection::vec(
        any::<char>().prop_filter("no U+0000", |c| *c != '\0'),
        0..max,
    )
    .prop_map(|cs| ByteString::from(cs.into_iter().collect::<String>()))
}

fn level() -> impl Strategy<Value = String> {
    prop_oneof![
        Just(String::new()),
        "[a-z0-9]{1,6}".prop_map(|s| s),
        Just("ünï€😀".to_string()),
        Just("$SYS".to_string()),
    ]
}

fn topic_name() -> impl Strategy<Value = TopicName> {
    prop::collection::vec(level(), 1..5)
        .prop_map(|ls| ls.join("/"))
        .prop_filter_map("empty", |s| TopicName::try_from(s.as_str()).ok())
}

fn topic_filter() -> impl Strategy<Value = TopicFilter> {
    let lvl = prop_oneof![3 => level(), 1 => Just("+".to_string())];
    (
        prop::collection::vec(lvl, 1..5),
        any::<bool>(),
        prop::option::of("[a-z]{1,4}"),
    )
        .prop_filter_map("empty", |(mut ls, hash, share)| {
            if hash {
                ls.push("#".to_string());
            }
            let f = ls.join("/");
            let s = match share {
                Some(g) => format!("$share/{g}/{f}"),
                None => f,
            };
            TopicFilter::try_from(s.as_str()).ok()
        })
}

fn bytes(max: usize) -> impl Strategy<Value = Bytes> {
    prop::collection::vec(any::<u8>(), 0..max).prop_map(Bytes::from)
}

fn qos() -> impl Strategy<Value = QoS> {
    prop_oneof![
        Just(QoS::AtMostOnce),
        Just(QoS::AtLeastOnce),
        Just(QoS::ExactlyOnce)
    ]
}

fn user_properties() -> impl Strategy<Value = Vec<(ByteString, ByteString)>> {
    prop::collection::vec((mqtt_string(6), mqtt_string(6)), 0..3)
}

fn sub_id() -> impl Strategy<Value = u32> {
    prop_oneof![1u32..200, Just(MAX_VARINT), 1u32..=MAX_VARINT]
}

fn publish_properties(allow_alias_and_ids: bool) -> impl Strategy<Value = PublishProperties> {
    (
        prop::option::of(any::<bool>()),
        prop::option::of(any::<u32>()),
        prop::option::of(1u16..),
        prop::option::of(topic_name()),
        prop::option::of(bytes(8)),
        prop::collection::vec(sub_id(), 0..3),
        prop::option::of(mqtt_string(8)),
        user_properties(),
    )
        .prop_map(
            move |(pfi, exp, alias, rt, cd, ids, ct, up)| PublishProperties {
                payload_format_indicator: pfi,
                message_expiry_interval: exp,
                topic_alias: alias.filter(|_| allow_alias_and_ids),
                response_topic: rt,
                correlation_data: cd,
                subscription_identifiers: if allow_alias_and_ids { ids } else { vec![] },
                content_type: ct,
                user_properties: up,
            },
        )
}

fn connect_properties() -> impl Strategy<Value = Properties> {
    (
        prop::option::of(any::<u32>()),
        prop::option::of(mqtt_string(8)),
        prop::option::of(bytes(8)),
        prop::option::of(any::<bool>()),
        prop::option::of(any::<bool>()),
        prop::option::of(1u16..),
        prop::option::of(any::<u16>()),
        prop::option::of(1u32..),
        user_properties(),
    )
        .prop_map(|(se, am, ad, rpi, rri, rm, tam, mps, up)| Properties {
            session_expiry_interval: se,
            authentication_method: am,
            authentication_data: ad,
            request_problem_information: rpi,
            request_response_information: rri,
            receive_maximum: rm,
            topic_alias_maximum: tam,
            maximum_packet_size: mps,
            user_properties: up,
            ..Default::default()
        })
}

fn connack_properties() -> impl Strategy<Value = Properties> {
    (
        (
            prop::option::of(any::<u32>()),
            prop::option::of(mqtt_string(8)),
            prop::option::of(any::<u16>()),
            prop::option::of(mqtt_string(8)),
            prop::option::of(bytes(8)),
            prop::option::of(mqtt_string(8)),
            prop::option::of(mqtt_string(8)),
        ),
        (
            prop::option::of(mqtt_string(8)),
            prop::option::of(1u16..),
            prop::option::of(any::<u16>()),
            prop::option::of(prop_oneof![Just(QoS::AtMostOnce), Just(QoS::AtLeastOnce)]),
            prop::option::of(any::<bool>()),
            prop::option::of(1u32..),
            prop::option::of(any::<bool>()),
            prop::option::of(any::<bool>()),
            prop::option::of(any::<bool>()),
        ),
        user_properties(),
    )
        .prop_map(
            |((se, aci, ska, am, ad, ri, sr), (rs, rm, tam, mq, ra, mps, w, s, sh), up)| {
                Properties {
                    session_expiry_interval: se,
                    assigned_client_identifier: aci,
                    server_keep_alive: ska,
                    authentication_method: am,
                    authentication_data: ad,
                    response_information: ri,
                    server_reference: sr,
                    reason_string: rs,
                    receive_maximum: rm,
                    topic_alias_maximum: tam,
                    maximum_qos: mq,
                    retain_available: ra,
                    maximum_packet_size: mps,
                    wildcard_subscription_available: w,
                    subscription_identifier_available: s,
                    shared_subscription_available: sh,
                    user_properties: up,
                    ..Default::default()
                }
            },
        )
}

fn ack_properties() -> impl Strategy<Value = AckProperties> {
    (prop::option::of(mqtt_string(10)), user_properties()).prop_map(
        |(reason_string, user_properties)| AckProperties {
            reason_string,
            user_properties,
        },
    )
}

fn reason_in(codes: &'static [ReasonCode]) -> impl Strategy<Value = ReasonCode> {
    prop::sample::select(codes)
}

use ReasonCode as R;
const CONNACK_V5: &[R] = &[
    R::Success,
    R::UnspecifiedError,
    R::MalformedPacket,
    R::NotAuthorized,
    R::ServerBusy,
    R::BadUserNameOrPassword,
    R::UseAnotherServer,
    R::ConnectionRateExceeded,
];
const CONNACK_V3: &[R] = &[
    R::Success,
    R::UnsupportedProtocolVersion,
    R::ClientIdentifierNotValid,
    R::ServerUnavailable,
    R::BadUserNameOrPassword,
    R::NotAuthorized,
];
const PUBACK: &[R] = &[
    R::Success,
    R::NoMatchingSubscribers,
    R::UnspecifiedError,
    R::ImplementationSpecificError,
    R::NotAuthorized,
    R::TopicNameInvalid,
    R::PacketIdentifierInUse,
    R::QuotaExceeded,
    R::PayloadFormatInvalid,
];
const PUBREL: &[R] = &[R::Success, R::PacketIdentifierNotFound];
const SUBACK_V5: &[R] = &[
    R::Success,
    R::GrantedQoS1,
    R::GrantedQoS2,
    R::UnspecifiedError,
    R::NotAuthorized,
    R::TopicFilterInvalid,
    R::QuotaExceeded,
    R::SharedSubscriptionsNotSupported,
    R::SubscriptionIdentifiersNotSupported,
    R::WildcardSubscriptionsNotSupported,
];
const SUBACK_V3: &[R] = &[
    R::Success,
    R::GrantedQoS1,
    R::GrantedQoS2,
    R::UnspecifiedError,
];
const UNSUBACK: &[R] = &[
    R::Success,
    R::NoSubscriptionExisted,
    R::UnspecifiedError,
    R::NotAuthorized,
    R::TopicFilterInvalid,
];
const DISCONNECT: &[R] = &[
    R::Success,
    R::DisconnectWithWillMessage,
    R::ProtocolError,
    R::ServerShuttingDown,
    R::KeepAliveTimeout,
    R::SessionTakenOver,
    R::ReceiveMaximumExceeded,
    R::TopicAliasInvalid,
    R::PacketTooLarge,
    R::AdministrativeAction,
    R::MaximumConnectTime,
];
const AUTH: &[R] = &[R::Success, R::ContinueAuthentication, R::ReAuthenticate];

fn packet(v: ProtocolVersion) -> BoxedStrategy<Packet> {
    let v5 = v.is_v5();
    let will = (
        topic_name(),
        bytes(16),
        qos(),
        any::<bool>(),
        prop::option::of(any::<u32>()),
        publish_properties(false),
    )
        .prop_map(move |(topic, payload, qos, retain, delay, props)| Will {
            topic,
            payload,
            qos,
            retain,
            delay_interval: delay.filter(|_| v5),
            properties: if v5 {
                props
            } else {
                PublishProperties::default()
            },
        });
    let protocol = if v5 {
        Just(V5).boxed()
    } else {
        prop_oneof![Just(V3_1), Just(V3_1_1)].boxed()
    };
    let connect = (
        protocol,
        any::<bool>(),
        any::<u16>(),
        mqtt_string(23),
        prop::option::of(will),
        prop::option::of(mqtt_string(10)),
        prop::option::of(bytes(10)),
        connect_properties(),
    )
        .prop_map(
            move |(protocol, clean_start, keep_alive, id, will, username, password, props)| {
                // 3.x: a password needs a user name [MQTT-3.1.2-22].
                let password = password.filter(|_| v5 || username.is_some());
                Packet::Connect(Box::new(Connect {
                    protocol,
                    bridge: false,
                    clean_start,
                    keep_alive,
                    client_id: ClientId::new(id).unwrap(),
                    will,
                    username,
                    password,
                    properties: if v5 { props } else { Properties::default() },
                }))
            },
        );
    let connack = (
        any::<bool>(),
        reason_in(if v5 { CONNACK_V5 } else { CONNACK_V3 }),
        connack_properties(),
    )
        .prop_map(move |(sp, reason, props)| {
            Packet::ConnAck(ConnAck {
                session_present: sp && !reason.is_error(),
                reason,
                properties: if v5 { props } else { Properties::default() },
            })
        });
    let publish = (
        topic_name(),
        qos(),
        any::<bool>(),
        any::<bool>(),
        1u16..,
        publish_properties(true),
        bytes(64),
        any::<bool>(),
    )
        .prop_map(
            move |(topic, qos, retain, dup, pid, props, payload, use_alias_only)| {
                let properties = if v5 {
                    props
                } else {
                    PublishProperties::default()
                };
                let topic = if v5 && use_alias_only && properties.topic_alias.is_some() {
                    TopicName::empty()
                } else {
                    topic
                };
                Packet::Publish(Publish {
                    dup: dup && qos != QoS::AtMostOnce,
                    qos,
                    retain,
                    topic,
                    packet_id: if qos == QoS::AtMostOnce { 0 } else { pid },
                    properties,
                    raw_properties: Bytes::new(),
                    payload,
                })
            },
        );
    let ack = |codes: &'static [ReasonCode]| {
        (1u16.., reason_in(codes), ack_properties()).prop_map(
            move |(packet_id, reason, properties)| {
                if v5 {
                    Ack {
                        packet_id,
                        reason,
                        properties,
                    }
                } else {
                    Ack::new(packet_id)
                }
            },
        )
    };
    let sub_options =
        (qos(), any::<bool>(), any::<bool>(), 0u8..3).prop_map(move |(qos, nl, rap, rh)| {
            if !v5 {
                return SubscriptionOptions {
                    qos,
                    ..Default::default()
                };
            }
            SubscriptionOptions {
                qos,
                no_local: nl,
                retain_as_published: rap,
                retain_handling: match rh {
                    0 => RetainHandling::SendOnSubscribe,
                    1 => RetainHandling::SendIfNew,
                    _ => RetainHandling::DoNotSend,
                },
            }
        });
    let subscribe = (
        1u16..,
        prop::collection::vec((topic_filter(), sub_options), 1..4),
        prop::option::of(sub_id()),
        user_properties(),
    )
        .prop_map(move |(packet_id, mut filters, id, up)| {
            for (f, o) in &mut filters {
                // [MQTT-3.8.3-4]: No Local is not allowed on a shared subscription.
                if f.is_shared() {
                    o.no_local = false;
                }
            }
            Packet::Subscribe(Subscribe {
                packet_id,
                filters,
                properties: if v5 {
                    Properties {
                        subscription_identifier: id,
                        user_properties: up,
                        ..Default::default()
                    }
                } else {
                    Properties::default()
                },
            })
        });
    let suback = (
        1u16..,
        prop::collection::vec(reason_in(if v5 { SUBACK_V5 } else { SUBACK_V3 }), 1..5),
        ack_properties(),
    )
        .prop_map(move |(packet_id, reasons, props)| {
            Packet::SubAck(SubAck {
                packet_id,
                reasons,
                properties: if v5 { props } else { AckProperties::default() },
            })
        });
    let unsubscribe = (
        1u16..,
        prop::collection::vec(topic_filter(), 1..4),
        user_properties(),
    )
        .prop_map(move |(packet_id, filters, up)| {
            Packet::Unsubscribe(Unsubscribe {
                packet_id,
                filters,
                properties: Properties {
                    user_properties: if v5 { up } else { vec![] },
                    ..Default::default()
                },
            })
        });
    let unsuback = (
        1u16..,
        prop::collection::vec(reason_in(UNSUBACK), 1..5),
        ack_properties(),
    )
        .prop_map(move |(packet_id, reasons, props)| {
            Packet::UnsubAck(if v5 {
                UnsubAck {
                    packet_id,
                    reasons,
                    properties: props,
                }
            } else {
                UnsubAck {
                    packet_id,
                    reasons: vec![],
                    properties: AckProperties::default(),
                }
            })
        });
    let disconnect = (
        reason_in(DISCONNECT),
        prop::option::of(any::<u32>()),
        prop::option::of(mqtt_string(8)),
        prop::option::of(mqtt_string(8)),
        user_properties(),
    )
        .prop_map(move |(reason, se, sr, rs, up)| {
            Packet::Disconnect(if v5 {
                Disconnect {
                    reason,
                    properties: Properties {
                        session_expiry_interval: se,
                        server_reference: sr,
                        reason_string: rs,
                        user_properties: up,
                        ..Default::default()
                    },
                }
            } else {
                Disconnect::new(ReasonCode::Success)
            })
        });
    let mut options = vec![
        connect.boxed(),
        connack.boxed(),
        publish.boxed(),
        ack(PUBACK).prop_map(Packet::PubAck).boxed(),
        ack(PUBACK).prop_map(Packet::PubRec).boxed(),
        ack(PUBREL).prop_map(Packet::PubRel).boxed(),
        ack(PUBREL).prop_map(Packet::PubComp).boxed(),
        subscribe.boxed(),
        suback.boxed(),
        unsubscribe.boxed(),
        unsuback.boxed(),
        Just(Packet::PingReq).boxed(),
        Just(Packet::PingResp).boxed(),
        disconnect.boxed(),
    ];
    if v5 {
        let auth = (
            reason_in(AUTH),
            prop::option::of(mqtt_string(8)),
            prop::option::of(bytes(16)),
            user_properties(),
        )
            .prop_map(|(reason, am, ad, up)| {
                Packet::Auth(Auth {
                    reason,
                    properties: Properties {
                        authentication_method: am,
                        authentication_data: ad,
                        user_properties: up,
                        ..Default::default()
                    },
                })
            });
        options.push(auth.boxed());
    }
    prop::strategy::Union::new(options).boxed()
}

fn check_round_trip(v: ProtocolVersion, p: &Packet, split: usize) -> Result<(), TestCaseError> {
    let mut buf = BytesMut::new();
    p.encode(v, &mut buf)
        .map_err(|e| TestCaseError::fail(format!("encode: {e}")))?;
    prop_assert_eq!(buf.len(), p.encoded_len(v));
    let wire = buf.clone().freeze();

    // Feed the bytes in two reads split at an arbitrary point.
    let cut = split % (wire.len() + 1);
    let mut stream = BytesMut::from(&wire[..cut]);
    let first = decode(&mut stream, v, MAX_PACKET_SIZE);
    if cut < wire.len() {
        prop_assert!(
            matches!(first, Ok(None)),
            "prefix of {} gave {:?}",
            cut,
            first
        );
        stream.extend_from_slice(&wire[cut..]);
    }
    let decoded = match first {
        Ok(Some(d)) => d,
        _ => decode(&mut stream, v, MAX_PACKET_SIZE)
            .map_err(|e| TestCaseError::fail(format!("decode: {e}")))?
            .ok_or_else(|| TestCaseError::fail("incomplete"))?,
    };
    prop_assert!(stream.is_empty());

    let mut decoded = decoded;
    if let Packet::Publish(d) = &mut decoded {
        // The raw property block must be exactly what re-encodes to the same bytes.
        if v.is_v5() {
            let mut again = BytesMut::new();
            encode_publish_raw_properties(d, &mut again).unwrap();
            prop_assert_eq!(&again[..], &wire[..]);
            prop_assert_eq!(publish_raw_properties_len(d), wire.len());
        }
        d.raw_properties = Bytes::new();
    }
    prop_assert_eq!(&decoded, p);
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    #[test]
    fn round_trip_v3_1_1(p in packet(V3_1_1), split in any::<usize>()) {
        check_round_trip(V3_1_1, &p, split)?;
    }

    #[test]
    fn round_trip_v5(p in packet(V5), split in any::<usize>()) {
        check_round_trip(V5, &p, split)?;
    }

    /// Arbitrary bytes never panic the decoder, and whatever it accepts re-encodes to a
    /// packet that decodes to the same value.
    #[test]
    fn arbitrary_bytes_never_panic(data in prop::collection::vec(any::<u8>(), 0..64), v5 in any::<bool>()) {
        let v = if v5 { V5 } else { V3_1_1 };
        let mut buf = BytesMut::from(&data[..]);
        while let Ok(Some(p)) = decode(&mut buf, v, MAX_PACKET_SIZE) {
            let ver = match &p { Packet::Connect(c) => c.protocol, _ => v };
            let mut out = BytesMut::new();
            if p.encode(ver, &mut out).is_ok() {
                let again = decode(&mut out, ver, MAX_PACKET_SIZE).unwrap().unwrap();
                let strip = |p: Packet| match p {
                    Packet::Publish(mut x) => { x.raw_properties = Bytes::new(); Packet::Publish(x) }
                    other => other,
                };
                prop_assert_eq!(strip(again), strip(p));
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 1000, ..ProptestConfig::default() })]

    /// The broker's fast path for PUBLISH without properties writes what the general
    /// encoder writes, byte for byte, for every version, QoS and flag combination.
    #[test]
    fn plain_publish_matches_the_general_encoder(
        topic in topic_name(),
        payload in bytes(300),
        qos in qos(),
        dup in any::<bool>(),
        retain in any::<bool>(),
        packet_id in 1u16..,
        v in prop_oneof![Just(V3_1), Just(V3_1_1), Just(V5)],
    ) {
        let dup = dup && qos != QoS::AtMostOnce;
        let general = Packet::Publish(Publish {
            dup,
            qos,
            retain,
            topic: topic.clone(),
            packet_id: if qos == QoS::AtMostOnce { 0 } else { packet_id },
            properties: PublishProperties::default(),
            raw_properties: Bytes::new(),
            payload: payload.clone(),
        });
        let mut want = BytesMut::new();
        general.encode(v, &mut want).unwrap();
        let plain = PlainPublish {
            dup,
            qos,
            retain,
            topic: topic.as_str(),
            packet_id,
            payload: &payload,
        };
        let mut got = BytesMut::from(&b"prefix"[..]);
        encode_plain_publish(&plain, v, &mut got).unwrap();
        prop_assert_eq!(&got[6..], &want[..]);
        prop_assert_eq!(plain.encoded_len(v), want.len());
    }
}

/// An invalid plain PUBLISH is refused before anything is written.
#[test]
fn plain_publish_errors_leave_the_buffer_alone() {
    for (topic, qos, dup, id) in [
        ("", QoS::AtMostOnce, false, 0),
        ("a", QoS::AtMostOnce, true, 0),
        ("a", QoS::AtLeastOnce, false, 0),
    ] {
        let p = PlainPublish {
            dup,
            qos,
            retain: false,
            topic,
            packet_id: id,
            payload: b"x",
        };
        let mut buf = BytesMut::from(&b"keep"[..]);
        assert!(
            encode_plain_publish(&p, V5, &mut buf).is_err(),
            "{topic:?} {qos:?} {dup} {id}"
        );
        assert_eq!(&buf[..], b"keep");
    }
}

/// What the general decoder makes of `wire`, with the raw property block cleared (the
/// fast path has none to keep), and how many bytes it consumed.
fn general_decode(wire: &[u8], v: ProtocolVersion) -> Option<(Packet, usize)> {
    let mut buf = BytesMut::from(wire);
    let p = decode(&mut buf, v, MAX_PACKET_SIZE).ok()??;
    let used = wire.len() - buf.len();
    Some((
        match p {
            Packet::Publish(mut x) => {
                x.raw_properties = Bytes::new();
                Packet::Publish(x)
            }
            other => other,
        },
        used,
    ))
}

/// The fast path either declines or agrees with the general decoder exactly.
fn check_plain_decode(wire: &[u8], v: ProtocolVersion) -> Result<bool, TestCaseError> {
    match decode_plain_publish(wire, v, MAX_PACKET_SIZE) {
        PlainDecode::Other => Ok(false),
        PlainDecode::Plain(p, len) => {
            let general = general_decode(wire, v);
            prop_assert!(
                general.is_some(),
                "fast path accepted what decode refuses: {:?}",
                wire
            );
            let (g, used) = general.unwrap();
            prop_assert_eq!(used, len);
            prop_assert_eq!(Packet::Publish(p.to_publish()), g);
            Ok(true)
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    /// [MQTT-3.3.1-4, MQTT-3.3.2-2, MQTT-1.5.4-1/2, MQTT-2.2.1-3]: the broker's in-place
    /// PUBLISH reader takes every valid PUBLISH without properties, decodes it exactly as
    /// `decode` does, declines everything else, and never reads a packet's prefix as a
    /// packet.
    #[test]
    fn plain_decode_agrees_with_decode(p in prop_oneof![packet(V3_1_1), packet(V5)], v5 in any::<bool>(), cut in any::<usize>()) {
        let v = if v5 { V5 } else { V3_1_1 };
        let mut wire = BytesMut::new();
        if p.encode(v, &mut wire).is_err() {
            return Ok(());
        }
        let taken = check_plain_decode(&wire, v)?;
        if let Packet::Publish(x) = &p {
            // 3.x has no properties: any PUBLISH it can carry is plain.
            let plain = (!v.is_v5() || x.properties == PublishProperties::default())
                && !x.topic.is_empty();
            prop_assert_eq!(taken, plain, "{:?}", x);
        } else {
            prop_assert!(!taken);
        }
        let cut = cut % wire.len();
        prop_assert!(matches!(decode_plain_publish(&wire[..cut], v, MAX_PACKET_SIZE), PlainDecode::Other));
        // Followed by more bytes, it still takes only its own.
        wire.extend_from_slice(&[0xC0, 0x00]);
        check_plain_decode(&wire, v)?;
    }

    /// Arbitrary bytes behind a PUBLISH header: never a panic, never accepted unless
    /// `decode` accepts the same PUBLISH.
    #[test]
    fn plain_decode_of_arbitrary_bytes(
        first in 0x30u8..0x40,
        topic in prop::collection::vec(prop_oneof![Just(0u8), Just(b'+'), Just(b'#'), Just(b'/'), Just(0xC3), Just(0xA9), 0x20u8..0x7F, any::<u8>()], 0..6),
        data in prop::collection::vec(any::<u8>(), 0..40),
        v5 in any::<bool>(),
    ) {
        // A plausible topic length, so the topic checks (NUL, wildcards, UTF-8) are what
        // is exercised rather than the length check.
        let v = if v5 { V5 } else { V3_1_1 };
        let body_len = 2 + topic.len() + data.len();
        let mut wire = vec![first, u8::try_from(body_len).unwrap(), 0, u8::try_from(topic.len()).unwrap()];
        wire.extend_from_slice(&topic);
        wire.extend_from_slice(&data);
        check_plain_decode(&wire, v)?;
    }
}

/// The fast path honours the size limit: a PUBLISH over it is left to `decode`, which
/// refuses it [MQTT-3.2.2.3.6 / MQTT-3.1.2-24].
#[test]
fn plain_decode_leaves_oversized_packets_to_decode() {
    let p = PlainPublish {
        dup: false,
        qos: QoS::AtMostOnce,
        retain: false,
        topic: "a/b",
        packet_id: 0,
        payload: &[7; 100],
    };
    let mut wire = BytesMut::new();
    encode_plain_publish(&p, V3_1_1, &mut wire).unwrap();
    assert!(matches!(
        decode_plain_publish(&wire, V3_1_1, 50),
        PlainDecode::Other
    ));
    assert!(decode(&mut wire.clone(), V3_1_1, 50).is_err());
    assert!(
        matches!(decode_plain_publish(&wire, V3_1_1, 1000), PlainDecode::Plain(_, n) if n == wire.len())
    );
}

/// `decode_plain_ack` takes exactly the four-byte acknowledgements `decode` reads as a
/// PUBACK/PUBREC/PUBREL/PUBCOMP with reason Success, and agrees on kind and packet id;
/// every other first byte, packet id 0 [MQTT-2.2.1-3] and wrong flags [MQTT-3.6.1-1] are
/// left to `decode`. Exhaustive over the first byte, in 3.1.1 and 5.
#[test]
fn plain_ack_agrees_with_decode() {
    let mut taken = 0;
    for first in 0..=255u8 {
        for id in [0u16, 1, 0x1234, u16::MAX] {
            let [hi, lo] = id.to_be_bytes();
            let bytes = [first, 2, hi, lo];
            for v in [V3_1_1, V5] {
                let decoded = decode(&mut BytesMut::from(&bytes[..]), v, MAX_PACKET_SIZE);
                let want = match decoded {
                    Ok(Some(Packet::PubAck(a))) => Some((PlainAck::PubAck, a)),
                    Ok(Some(Packet::PubRec(a))) => Some((PlainAck::PubRec, a)),
                    Ok(Some(Packet::PubRel(a))) => Some((PlainAck::PubRel, a)),
                    Ok(Some(Packet::PubComp(a))) => Some((PlainAck::PubComp, a)),
                    _ => None,
                }
                .map(|(k, a)| {
                    assert_eq!(a.reason, ReasonCode::Success);
                    (k, a.packet_id)
                });
                assert_eq!(decode_plain_ack(&bytes), want, "{bytes:02x?} {v:?}");
                taken += usize::from(want.is_some());
            }
        }
    }
    // Four kinds x three non-zero ids x two versions.
    assert_eq!(taken, 24);
    // A prefix is never an acknowledgement.
    assert_eq!(decode_plain_ack(&[0x40, 2, 0]), None);
}
