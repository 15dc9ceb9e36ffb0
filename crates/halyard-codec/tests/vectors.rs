//! Hand-written wire vectors from the MQTT 3.1.1 and 5.0 specifications.
//!
//! The bytes here (and in `vectors/invalid.txt`) were written by hand from the
//! specification's field layouts, never produced by our encoder: they are the independent
//! oracle for both directions. For each valid vector we check that
//! - decoding yields exactly the expected typed packet and consumes every byte;
//! - every proper prefix yields "need more bytes" and leaves the buffer untouched;
//! - (for canonical vectors) encoding the expected packet reproduces the bytes exactly and
//!   `encoded_len` predicts their count.
//!
//! Invalid vectors must fail with the expected error class and cite the expected rule.

use bytes::{Bytes, BytesMut};
use halyard_codec::*;

const MAX: u32 = 65_536;

fn hex(s: &str) -> Vec<u8> {
    let digits: String = s.split_whitespace().collect();
    assert!(digits.len().is_multiple_of(2), "odd hex: {s}");
    (0..digits.len())
        .step_by(2)
        .map(|i| {
            u8::from_str_radix(&digits[i..i + 2], 16).unwrap_or_else(|_| panic!("bad hex {s}"))
        })
        .collect()
}

fn bs(s: &str) -> ByteString {
    ByteString::from(s)
}
fn topic(s: &str) -> TopicName {
    TopicName::try_from(s).unwrap()
}
fn filter(s: &str) -> TopicFilter {
    TopicFilter::try_from(s).unwrap()
}
fn up(k: &str, v: &str) -> (ByteString, ByteString) {
    (bs(k), bs(v))
}

use ProtocolVersion::{V3_1, V3_1_1, V5};

struct Valid {
    name: &'static str,
    version: ProtocolVersion,
    hex: String,
    packet: Packet,
    /// Our encoder writes exactly these bytes (false for non-canonical forms that are
    /// accepted on read, e.g. a non-minimal remaining length).
    canonical: bool,
}

fn v(name: &'static str, version: ProtocolVersion, hex: &str, packet: Packet) -> Valid {
    Valid {
        name,
        version,
        hex: hex.to_string(),
        packet,
        canonical: true,
    }
}
fn read_only(name: &'static str, version: ProtocolVersion, hex: &str, packet: Packet) -> Valid {
    Valid {
        canonical: false,
        ..v(name, version, hex, packet)
    }
}

fn connect(protocol: ProtocolVersion, client_id: &str) -> Connect {
    Connect {
        protocol,
        bridge: false,
        clean_start: true,
        keep_alive: 60,
        client_id: ClientId::new(client_id).unwrap(),
        will: None,
        username: None,
        password: None,
        properties: Properties::default(),
    }
}

fn publish(topic_name: &str, qos: QoS, packet_id: u16, payload: &[u8]) -> Publish {
    Publish {
        qos,
        packet_id,
        ..Publish::new(topic(topic_name), Bytes::copy_from_slice(payload))
    }
}

fn ack(packet_id: u16, reason: ReasonCode) -> Ack {
    Ack {
        reason,
        ..Ack::new(packet_id)
    }
}

fn opts(qos: QoS) -> SubscriptionOptions {
    SubscriptionOptions {
        qos,
        ..Default::default()
    }
}

// Pushing one vector at a time keeps each next to its section comment.
#[allow(clippy::vec_init_then_push)]
fn valid_vectors() -> Vec<Valid> {
    let mut out = Vec::new();

    // ---- CONNECT (section 3.1) ----
    out.push(v(
        "connect_3_1_1_minimal",
        V3_1_1,
        "10 0D 00 04 4D 51 54 54 04 02 00 3C 00 01 61",
        Packet::Connect(Box::new(connect(V3_1_1, "a"))),
    ));
    out.push(v(
        "connect_3_1_mqisdp_minimal",
        V3_1,
        "10 0F 00 06 4D 51 49 73 64 70 03 02 00 3C 00 01 61",
        Packet::Connect(Box::new(connect(V3_1, "a"))),
    ));
    out.push(v(
        "connect_5_minimal",
        V5,
        "10 0E 00 04 4D 51 54 54 05 02 00 3C 00 00 01 61",
        Packet::Connect(Box::new(connect(V5, "a"))),
    ));
    out.push(v(
        "connect_3_1_1_will_user_password",
        V3_1_1,
        "10 1D 00 04 4D 51 54 54 04 EC 00 0A 00 02 63 31 00 01 77 00 03 62 79 65 \
         00 01 75 00 02 70 77",
        Packet::Connect(Box::new(Connect {
            clean_start: false,
            keep_alive: 10,
            will: Some(Will {
                topic: topic("w"),
                payload: Bytes::from_static(b"bye"),
                qos: QoS::AtLeastOnce,
                retain: true,
                delay_interval: None,
                properties: PublishProperties::default(),
            }),
            username: Some(bs("u")),
            password: Some(Bytes::from_static(b"pw")),
            ..connect(V3_1_1, "c1")
        })),
    ));
    out.push(v(
        "connect_5_all_properties_and_will_properties",
        V5,
        "10 6F 00 04 4D 51 54 54 05 D6 00 1E \
         28 11 00 00 0E 10  15 00 05 53 43 52 41 4D  16 00 02 01 02  17 00  19 01 \
            21 00 14  22 00 0A  27 00 00 10 00  26 00 01 6B 00 01 76 \
         00 00 \
         25 18 00 00 00 05  01 01  02 00 00 00 3C  08 00 03 72 2F 31  09 00 02 AB CD \
            03 00 04 74 65 78 74  26 00 01 61 00 01 62 \
         00 03 77 2F 74  00 02 68 69  00 04 75 73 65 72  00 03 01 02 03",
        Packet::Connect(Box::new(Connect {
            protocol: V5,
            bridge: false,
            clean_start: true,
            keep_alive: 30,
            client_id: ClientId::default(),
            will: Some(Will {
                topic: topic("w/t"),
                payload: Bytes::from_static(b"hi"),
                qos: QoS::ExactlyOnce,
                retain: false,
                delay_interval: Some(5),
                properties: PublishProperties {
                    payload_format_indicator: Some(true),
                    message_expiry_interval: Some(60),
                    response_topic: Some(topic("r/1")),
                    correlation_data: Some(Bytes::from_static(&[0xAB, 0xCD])),
                    content_type: Some(bs("text")),
                    user_properties: vec![up("a", "b")],
                    ..Default::default()
                },
            }),
            username: Some(bs("user")),
            password: Some(Bytes::from_static(&[1, 2, 3])),
            properties: Properties {
                session_expiry_interval: Some(3600),
                authentication_method: Some(bs("SCRAM")),
                authentication_data: Some(Bytes::from_static(&[1, 2])),
                request_problem_information: Some(false),
                request_response_information: Some(true),
                receive_maximum: Some(20),
                topic_alias_maximum: Some(10),
                maximum_packet_size: Some(4096),
                user_properties: vec![up("k", "v")],
                ..Default::default()
            },
        })),
    ));
    out.push(v(
        "connect_5_password_without_user_name_is_allowed",
        V5,
        "10 11 00 04 4D 51 54 54 05 42 00 3C 00 00 01 61 00 01 70",
        Packet::Connect(Box::new(Connect {
            password: Some(Bytes::from_static(b"p")),
            ..connect(V5, "a")
        })),
    ));
    // Section 1.5.4 example: "A" followed by U+2A6D4 encodes as 00 05 41 F0 AA 9B 94.
    out.push(v(
        "connect_3_1_1_utf8_example_client_id_keepalive_0",
        V3_1_1,
        "10 11 00 04 4D 51 54 54 04 02 00 00 00 05 41 F0 AA 9B 94",
        Packet::Connect(Box::new(Connect {
            keep_alive: 0,
            ..connect(V3_1_1, "A\u{2A6D4}")
        })),
    ));

    // ---- CONNACK (section 3.2) ----
    let connack = |sp, reason| {
        Packet::ConnAck(ConnAck {
            session_present: sp,
            reason,
            properties: Properties::default(),
        })
    };
    out.push(v(
        "connack_3_1_1_accepted",
        V3_1_1,
        "20 02 00 00",
        connack(false, ReasonCode::Success),
    ));
    out.push(v(
        "connack_3_1_1_session_present",
        V3_1_1,
        "20 02 01 00",
        connack(true, ReasonCode::Success),
    ));
    out.push(v(
        "connack_3_1_1_rc1_unacceptable_protocol",
        V3_1_1,
        "20 02 00 01",
        connack(false, ReasonCode::UnsupportedProtocolVersion),
    ));
    out.push(v(
        "connack_3_1_1_rc2_identifier_rejected",
        V3_1_1,
        "20 02 00 02",
        connack(false, ReasonCode::ClientIdentifierNotValid),
    ));
    out.push(v(
        "connack_3_1_1_rc4_bad_user_or_password",
        V3_1_1,
        "20 02 00 04",
        connack(false, ReasonCode::BadUserNameOrPassword),
    ));
    out.push(v(
        "connack_3_1_1_rc5_not_authorized",
        V3_1_1,
        "20 02 00 05",
        connack(false, ReasonCode::NotAuthorized),
    ));
    out.push(v(
        "connack_3_1_accepted",
        V3_1,
        "20 02 00 00",
        connack(false, ReasonCode::Success),
    ));
    out.push(v(
        "connack_5_success",
        V5,
        "20 03 00 00 00",
        connack(false, ReasonCode::Success),
    ));
    out.push(v(
        "connack_5_not_authorized",
        V5,
        "20 03 00 87 00",
        connack(false, ReasonCode::NotAuthorized),
    ));
    out.push(v(
        "connack_5_all_properties",
        V5,
        "20 36 01 00 33 11 00 00 00 78  12 00 03 61 62 63  13 00 3C  1A 00 02 72 69 \
         1F 00 02 6F 6B  21 00 0A  22 00 05  24 01  25 00  27 00 01 00 00  28 01  29 00 \
         2A 01  26 00 01 78 00 00",
        Packet::ConnAck(ConnAck {
            session_present: true,
            reason: ReasonCode::Success,
            properties: Properties {
                session_expiry_interval: Some(120),
                assigned_client_identifier: Some(bs("abc")),
                server_keep_alive: Some(60),
                response_information: Some(bs("ri")),
                reason_string: Some(bs("ok")),
                receive_maximum: Some(10),
                topic_alias_maximum: Some(5),
                maximum_qos: Some(QoS::AtLeastOnce),
                retain_available: Some(false),
                maximum_packet_size: Some(65_536),
                wildcard_subscription_available: Some(true),
                subscription_identifier_available: Some(false),
                shared_subscription_available: Some(true),
                user_properties: vec![up("x", "")],
                ..Default::default()
            },
        }),
    ));

    // ---- PUBLISH (section 3.3) ----
    out.push(v(
        "publish_3_1_1_qos0",
        V3_1_1,
        "30 07 00 03 61 2F 62 68 69",
        Packet::Publish(publish("a/b", QoS::AtMostOnce, 0, b"hi")),
    ));
    out.push(v(
        "publish_3_1_1_qos1_dup_retain",
        V3_1_1,
        "3B 09 00 03 61 2F 62 00 0A 68 69",
        Packet::Publish(Publish {
            dup: true,
            retain: true,
            ..publish("a/b", QoS::AtLeastOnce, 10, b"hi")
        }),
    ));
    out.push(v(
        "publish_3_1_1_qos2_empty_payload_id_65535",
        V3_1_1,
        "34 07 00 03 61 2F 62 FF FF",
        Packet::Publish(publish("a/b", QoS::ExactlyOnce, 0xFFFF, b"")),
    ));
    out.push(v(
        "publish_3_1_qos1",
        V3_1,
        "32 09 00 03 61 2F 62 00 01 68 69",
        Packet::Publish(publish("a/b", QoS::AtLeastOnce, 1, b"hi")),
    ));
    out.push(v(
        "publish_5_qos0_no_properties",
        V5,
        "30 08 00 03 61 2F 62 00 68 69",
        Packet::Publish(publish("a/b", QoS::AtMostOnce, 0, b"hi")),
    ));
    let props_hex = "01 01  02 00 00 00 0A  23 00 01  08 00 03 72 2F 31  09 00 01 07  0B 01  0B 80 01 \
                     03 00 04 6A 73 6F 6E  26 00 01 61 00 01 31  26 00 01 61 00 01 32";
    out.push(v(
        "publish_5_qos1_all_properties_repeated_user_properties_and_sub_ids_in_order",
        V5,
        &format!("32 38 00 03 61 2F 62 00 07 2E {props_hex} 7B 7D"),
        Packet::Publish(Publish {
            properties: PublishProperties {
                payload_format_indicator: Some(true),
                message_expiry_interval: Some(10),
                topic_alias: Some(1),
                response_topic: Some(topic("r/1")),
                correlation_data: Some(Bytes::from_static(&[7])),
                subscription_identifiers: vec![1, 128],
                content_type: Some(bs("json")),
                user_properties: vec![up("a", "1"), up("a", "2")],
            },
            raw_properties: Bytes::from(hex(props_hex)),
            ..publish("a/b", QoS::AtLeastOnce, 7, b"{}")
        }),
    ));
    out.push(v(
        "publish_5_empty_topic_with_topic_alias_mqtt_3_3_2_1",
        V5,
        "30 07 00 00 03 23 00 05 78",
        Packet::Publish(Publish {
            topic: TopicName::empty(),
            properties: PublishProperties {
                topic_alias: Some(5),
                ..Default::default()
            },
            raw_properties: Bytes::from(hex("23 00 05")),
            ..publish("x", QoS::AtMostOnce, 0, b"x")
        }),
    ));
    // [MQTT-1.5.4-3]: EF BB BF is U+FEFF and must not be skipped or stripped.
    out.push(v(
        "publish_3_1_1_bom_kept_mqtt_1_5_4_3",
        V3_1_1,
        "30 06 00 04 EF BB BF 61",
        Packet::Publish(publish("\u{FEFF}a", QoS::AtMostOnce, 0, b"")),
    ));
    out.push(v(
        "publish_5_two_byte_remaining_length",
        V5,
        &format!("30 CE 01 00 03 61 2F 62 00 {}", "AA ".repeat(200)),
        Packet::Publish(publish("a/b", QoS::AtMostOnce, 0, &[0xAA; 200])),
    ));
    out.push(read_only(
        "publish_3_1_1_non_minimal_remaining_length_accepted",
        V3_1_1,
        "30 87 00 00 03 61 2F 62 68 69",
        Packet::Publish(publish("a/b", QoS::AtMostOnce, 0, b"hi")),
    ));
    out.push(v(
        "publish_3_1_1_topic_slash_only",
        V3_1_1,
        "30 03 00 01 2F",
        Packet::Publish(publish("/", QoS::AtMostOnce, 0, b"")),
    ));

    // ---- PUBACK / PUBREC / PUBREL / PUBCOMP (sections 3.4 - 3.7) ----
    out.push(v(
        "puback_3_1_1",
        V3_1_1,
        "40 02 00 01",
        Packet::PubAck(Ack::new(1)),
    ));
    out.push(v(
        "pubrec_3_1_1",
        V3_1_1,
        "50 02 00 02",
        Packet::PubRec(Ack::new(2)),
    ));
    out.push(v(
        "pubrel_3_1_1",
        V3_1_1,
        "62 02 00 03",
        Packet::PubRel(Ack::new(3)),
    ));
    out.push(v(
        "pubcomp_3_1_1",
        V3_1_1,
        "70 02 00 04",
        Packet::PubComp(Ack::new(4)),
    ));
    out.push(v(
        "pubrel_3_1",
        V3_1,
        "62 02 12 34",
        Packet::PubRel(Ack::new(0x1234)),
    ));
    out.push(v(
        "puback_5_short_form",
        V5,
        "40 02 00 01",
        Packet::PubAck(Ack::new(1)),
    ));
    out.push(v(
        "puback_5_reason_only",
        V5,
        "40 03 00 01 10",
        Packet::PubAck(ack(1, ReasonCode::NoMatchingSubscribers)),
    ));
    out.push(v(
        "pubrec_5_reason_string",
        V5,
        "50 0B 00 02 87 07 1F 00 04 64 65 6E 79",
        Packet::PubRec(Ack {
            properties: AckProperties {
                reason_string: Some(bs("deny")),
                ..Default::default()
            },
            ..ack(2, ReasonCode::NotAuthorized)
        }),
    ));
    out.push(v(
        "pubrel_5_packet_identifier_not_found",
        V5,
        "62 03 00 03 92",
        Packet::PubRel(ack(3, ReasonCode::PacketIdentifierNotFound)),
    ));
    out.push(v(
        "pubcomp_5_success_with_user_property",
        V5,
        "70 0B 00 04 00 07 26 00 01 6B 00 01 76",
        Packet::PubComp(Ack {
            properties: AckProperties {
                user_properties: vec![up("k", "v")],
                ..Default::default()
            },
            ..ack(4, ReasonCode::Success)
        }),
    ));
    out.push(read_only(
        "puback_5_explicit_success_and_empty_properties",
        V5,
        "40 04 00 01 00 00",
        Packet::PubAck(Ack::new(1)),
    ));

    // ---- SUBSCRIBE / SUBACK (sections 3.8, 3.9) ----
    out.push(v(
        "subscribe_3_1_1_three_filters",
        V3_1_1,
        "82 12 00 0A 00 03 61 2F 62 01 00 03 63 2F 23 02 00 01 2B 00",
        Packet::Subscribe(Subscribe {
            packet_id: 10,
            filters: vec![
                (filter("a/b"), opts(QoS::AtLeastOnce)),
                (filter("c/#"), opts(QoS::ExactlyOnce)),
                (filter("+"), opts(QoS::AtMostOnce)),
            ],
            properties: Properties::default(),
        }),
    ));
    out.push(v(
        "subscribe_3_1_single",
        V3_1,
        "82 08 00 01 00 03 61 2F 62 01",
        Packet::Subscribe(Subscribe {
            packet_id: 1,
            filters: vec![(filter("a/b"), opts(QoS::AtLeastOnce))],
            properties: Properties::default(),
        }),
    ));
    out.push(v(
        "subscribe_5_options_identifier_and_shared",
        V5,
        "82 1F 00 01 09 0B 05 26 00 01 6B 00 01 76 00 03 61 2F 62 2E \
         00 0A 24 73 68 61 72 65 2F 67 2F 63 11",
        Packet::Subscribe(Subscribe {
            packet_id: 1,
            filters: vec![
                (
                    filter("a/b"),
                    SubscriptionOptions {
                        qos: QoS::ExactlyOnce,
                        no_local: true,
                        retain_as_published: true,
                        retain_handling: RetainHandling::DoNotSend,
                    },
                ),
                (
                    filter("$share/g/c"),
                    SubscriptionOptions {
                        qos: QoS::AtLeastOnce,
                        retain_handling: RetainHandling::SendIfNew,
                        ..Default::default()
                    },
                ),
            ],
            properties: Properties {
                subscription_identifier: Some(5),
                user_properties: vec![up("k", "v")],
                ..Default::default()
            },
        }),
    ));
    out.push(v(
        "suback_3_1_1_granted_and_failure",
        V3_1_1,
        "90 05 00 0A 01 02 80",
        Packet::SubAck(SubAck {
            packet_id: 10,
            reasons: vec![
                ReasonCode::GrantedQoS1,
                ReasonCode::GrantedQoS2,
                ReasonCode::UnspecifiedError,
            ],
            properties: AckProperties::default(),
        }),
    ));
    out.push(v(
        "suback_5_reason_codes",
        V5,
        "90 06 00 01 00 02 8F 9E",
        Packet::SubAck(SubAck {
            packet_id: 1,
            reasons: vec![
                ReasonCode::GrantedQoS2,
                ReasonCode::TopicFilterInvalid,
                ReasonCode::SharedSubscriptionsNotSupported,
            ],
            properties: AckProperties::default(),
        }),
    ));
    out.push(v(
        "suback_5_reason_string",
        V5,
        "90 08 00 01 04 1F 00 01 78 87",
        Packet::SubAck(SubAck {
            packet_id: 1,
            reasons: vec![ReasonCode::NotAuthorized],
            properties: AckProperties {
                reason_string: Some(bs("x")),
                ..Default::default()
            },
        }),
    ));

    // ---- UNSUBSCRIBE / UNSUBACK (sections 3.10, 3.11) ----
    out.push(v(
        "unsubscribe_3_1_1",
        V3_1_1,
        "A2 0C 00 05 00 03 61 2F 62 00 03 63 2F 23",
        Packet::Unsubscribe(Unsubscribe {
            packet_id: 5,
            filters: vec![filter("a/b"), filter("c/#")],
            properties: Properties::default(),
        }),
    ));
    out.push(v(
        "unsubscribe_5_user_property",
        V5,
        "A2 0F 00 05 07 26 00 01 6B 00 01 76 00 03 61 2F 62",
        Packet::Unsubscribe(Unsubscribe {
            packet_id: 5,
            filters: vec![filter("a/b")],
            properties: Properties {
                user_properties: vec![up("k", "v")],
                ..Default::default()
            },
        }),
    ));
    out.push(v(
        "unsuback_3_1_1",
        V3_1_1,
        "B0 02 00 05",
        Packet::UnsubAck(UnsubAck {
            packet_id: 5,
            reasons: vec![],
            properties: AckProperties::default(),
        }),
    ));
    out.push(v(
        "unsuback_5",
        V5,
        "B0 05 00 05 00 00 11",
        Packet::UnsubAck(UnsubAck {
            packet_id: 5,
            reasons: vec![ReasonCode::Success, ReasonCode::NoSubscriptionExisted],
            properties: AckProperties::default(),
        }),
    ));

    // ---- PINGREQ / PINGRESP (3.12, 3.13) ----
    for (ver, name_req, name_resp) in [
        (V3_1_1, "pingreq_3_1_1", "pingresp_3_1_1"),
        (V5, "pingreq_5", "pingresp_5"),
    ] {
        out.push(v(name_req, ver, "C0 00", Packet::PingReq));
        out.push(v(name_resp, ver, "D0 00", Packet::PingResp));
    }

    // ---- DISCONNECT (3.14) ----
    out.push(v(
        "disconnect_3_1_1",
        V3_1_1,
        "E0 00",
        Packet::Disconnect(Disconnect::new(ReasonCode::Success)),
    ));
    out.push(v(
        "disconnect_5_short_form",
        V5,
        "E0 00",
        Packet::Disconnect(Disconnect::new(ReasonCode::Success)),
    ));
    out.push(v(
        "disconnect_5_with_will",
        V5,
        "E0 01 04",
        Packet::Disconnect(Disconnect::new(ReasonCode::DisconnectWithWillMessage)),
    ));
    out.push(v(
        "disconnect_5_session_taken_over_with_properties",
        V5,
        "E0 10 8E 0E 11 00 00 00 00 1C 00 01 73 1F 00 02 62 79",
        Packet::Disconnect(Disconnect {
            reason: ReasonCode::SessionTakenOver,
            properties: Properties {
                session_expiry_interval: Some(0),
                server_reference: Some(bs("s")),
                reason_string: Some(bs("by")),
                ..Default::default()
            },
        }),
    ));
    out.push(read_only(
        "disconnect_5_explicit_normal_reason",
        V5,
        "E0 01 00",
        Packet::Disconnect(Disconnect::new(ReasonCode::Success)),
    ));

    // ---- AUTH (3.15) ----
    out.push(v(
        "auth_5_short_form",
        V5,
        "F0 00",
        Packet::Auth(Auth {
            reason: ReasonCode::Success,
            properties: Properties::default(),
        }),
    ));
    out.push(v(
        "auth_5_continue_with_method_and_data",
        V5,
        "F0 10 18 0E 15 00 05 53 43 52 41 4D 16 00 03 01 02 03",
        Packet::Auth(Auth {
            reason: ReasonCode::ContinueAuthentication,
            properties: Properties {
                authentication_method: Some(bs("SCRAM")),
                authentication_data: Some(Bytes::from_static(&[1, 2, 3])),
                ..Default::default()
            },
        }),
    ));
    out.push(v(
        "auth_5_reauthenticate_reason_only",
        V5,
        "F0 01 19",
        Packet::Auth(Auth {
            reason: ReasonCode::ReAuthenticate,
            properties: Properties::default(),
        }),
    ));
    out.push(read_only(
        "auth_5_reauthenticate_empty_properties",
        V5,
        "F0 02 19 00",
        Packet::Auth(Auth {
            reason: ReasonCode::ReAuthenticate,
            properties: Properties::default(),
        }),
    ));
    out
}

#[test]
fn valid_vectors_decode_to_the_expected_packets() {
    let vectors = valid_vectors();
    for vec in &vectors {
        let bytes = hex(&vec.hex);
        let mut buf = BytesMut::from(&bytes[..]);
        let got = decode(&mut buf, vec.version, MAX)
            .unwrap_or_else(|e| panic!("{}: decode failed: {e}", vec.name));
        assert_eq!(got.as_ref(), Some(&vec.packet), "{}", vec.name);
        assert!(
            buf.is_empty(),
            "{}: {} bytes left over",
            vec.name,
            buf.len()
        );
    }
    let per = |ver| vectors.iter().filter(|v| v.version == ver).count();
    println!(
        "valid vectors: 3.1 {}, 3.1.1 {}, 5.0 {}",
        per(V3_1),
        per(V3_1_1),
        per(V5)
    );
}

#[test]
fn valid_vectors_need_more_bytes_on_every_prefix() {
    for vec in valid_vectors() {
        let bytes = hex(&vec.hex);
        for cut in 0..bytes.len() {
            let mut buf = BytesMut::from(&bytes[..cut]);
            let got = decode(&mut buf, vec.version, MAX);
            assert!(
                matches!(got, Ok(None)),
                "{} cut at {cut}: {got:?}",
                vec.name
            );
            assert_eq!(&buf[..], &bytes[..cut], "{}: prefix was consumed", vec.name);
        }
    }
}

#[test]
fn valid_vectors_encode_to_the_same_bytes() {
    let mut checked = 0;
    for vec in valid_vectors().into_iter().filter(|v| v.canonical) {
        let bytes = hex(&vec.hex);
        assert_eq!(
            vec.packet.encoded_len(vec.version),
            bytes.len(),
            "{}: encoded_len",
            vec.name
        );
        let mut out = BytesMut::new();
        vec.packet
            .encode(vec.version, &mut out)
            .unwrap_or_else(|e| panic!("{}: encode failed: {e}", vec.name));
        assert_eq!(&out[..], &bytes[..], "{}", vec.name);
        checked += 1;
    }
    assert!(checked >= 50, "only {checked} canonical vectors");
}

#[test]
fn valid_vectors_back_to_back_in_one_stream() {
    // All packets of one version concatenated: each decodes in turn from the shared buffer.
    for ver in [V3_1_1, V5] {
        let vectors: Vec<_> = valid_vectors()
            .into_iter()
            .filter(|v| v.version == ver && !matches!(v.packet, Packet::Connect(_)))
            .collect();
        let mut buf = BytesMut::new();
        for vec in &vectors {
            buf.extend_from_slice(&hex(&vec.hex));
        }
        for vec in &vectors {
            let got = decode(&mut buf, ver, MAX).unwrap().unwrap();
            assert_eq!(got, vec.packet, "{}", vec.name);
        }
        assert!(buf.is_empty());
    }
}

struct Invalid {
    line: usize,
    version: ProtocolVersion,
    kind: ErrorKind,
    rule: String,
    bytes: Vec<u8>,
    what: String,
}

fn invalid_vectors() -> Vec<Invalid> {
    let text = include_str!("vectors/invalid.txt");
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let cols: Vec<&str> = line.split('|').map(str::trim).collect();
        assert_eq!(
            cols.len(),
            5,
            "invalid.txt:{}: five columns expected",
            i + 1
        );
        let version = match cols[0] {
            "3.1" => V3_1,
            "3.1.1" => V3_1_1,
            "5" => V5,
            other => panic!("invalid.txt:{}: version {other}", i + 1),
        };
        let kind = match cols[1] {
            "malformed" => ErrorKind::Malformed,
            "protocol" => ErrorKind::Protocol,
            "too-large" => ErrorKind::PacketTooLarge,
            "unsupported" => ErrorKind::UnsupportedProtocolVersion,
            "alias" => ErrorKind::TopicAliasInvalid,
            other => panic!("invalid.txt:{}: kind {other}", i + 1),
        };
        out.push(Invalid {
            line: i + 1,
            version,
            kind,
            rule: cols[2].to_string(),
            bytes: hex(cols[3]),
            what: cols[4].to_string(),
        });
    }
    out
}

#[test]
fn invalid_vectors_are_rejected_with_the_right_class_and_rule() {
    let vectors = invalid_vectors();
    let mut failures = Vec::new();
    for vec in &vectors {
        let mut buf = BytesMut::from(&vec.bytes[..]);
        match decode(&mut buf, vec.version, MAX) {
            Err(e) if e.kind == vec.kind && e.rule == vec.rule => {
                // The error must map to the reason code the class promises.
                assert_eq!(e.reason_code(), vec.kind.reason_code());
            }
            other => failures.push(format!(
                "invalid.txt:{} ({}): expected {:?} [{}], got {other:?}",
                vec.line, vec.what, vec.kind, vec.rule
            )),
        }
    }
    assert!(
        failures.is_empty(),
        "{} failures:\n{}",
        failures.len(),
        failures.join("\n")
    );
    let per = |ver| vectors.iter().filter(|v| v.version == ver).count();
    println!(
        "invalid vectors: 3.1 {}, 3.1.1 {}, 5.0 {}",
        per(V3_1),
        per(V3_1_1),
        per(V5)
    );
    assert!(vectors.len() >= 120);
}

#[test]
fn connect_errors_carry_the_declared_version() {
    // A broken v5 CONNECT is answered with a v5 CONNACK; an unknown level with a 3.x one.
    let mut b = BytesMut::from(&hex("10 0E 00 04 4D 51 54 54 05 03 00 3C 00 00 01 61")[..]);
    assert_eq!(decode(&mut b, V3_1_1, MAX).unwrap_err().version, Some(V5));
    let mut b = BytesMut::from(&hex("10 0E 00 04 4D 51 54 54 06 02 00 3C 00 00 01 61")[..]);
    assert_eq!(decode(&mut b, V5, MAX).unwrap_err().version, None);
}

#[test]
fn oversized_packet_is_refused_from_its_fixed_header_mqtt_3_2_2_3_6() {
    // Only the fixed header has arrived: the refusal must not wait for the body.
    let mut b = BytesMut::from(&hex("30 FF FF FF 7F")[..]);
    let e = decode(&mut b, V5, 1024).unwrap_err();
    assert_eq!(e.reason_code(), ReasonCode::PacketTooLarge);
    // Exactly at the limit is fine: 3-byte fixed header (30 FD 07) + 1021 = 1024.
    let mut pkt = hex("30 FD 07 00 01 61 00");
    pkt.resize(1024, 0x55);
    let mut b = BytesMut::from(&pkt[..]);
    assert!(decode(&mut b, V5, 1024).unwrap().is_some());
    let mut pkt = hex("30 FE 07 00 01 61 00");
    pkt.resize(1025, 0x55);
    let mut b = BytesMut::from(&pkt[..]);
    assert_eq!(
        decode(&mut b, V5, 1024).unwrap_err().kind,
        ErrorKind::PacketTooLarge
    );
}

#[test]
fn remaining_length_examples_of_section_2_1_4() {
    // Table 2.4 (3.1.1) / 1.5.5 (5.0): boundaries of 1 to 4 byte encodings.
    for (value, enc) in [
        (0u32, "00"),
        (127, "7F"),
        (128, "80 01"),
        (16_383, "FF 7F"),
        (16_384, "80 80 01"),
        (2_097_151, "FF FF 7F"),
        (2_097_152, "80 80 80 01"),
        (268_435_455, "FF FF FF 7F"),
    ] {
        assert_eq!(varint_len(value), hex(enc).len(), "{value}");
        // A PUBLISH of that remaining length: the header encodes as the table says.
        if (5..3_000_000).contains(&value) {
            let payload_len = value as usize - 5;
            let p = Packet::Publish(publish("a/b", QoS::AtMostOnce, 0, &vec![0; payload_len]));
            let mut out = BytesMut::new();
            p.encode(V3_1_1, &mut out).unwrap();
            assert_eq!(&out[1..1 + hex(enc).len()], &hex(enc)[..], "{value}");
        }
    }
}

/// `decode_limited` refuses a packet with more user properties than it is given, counted
/// across all the packet's property blocks (a CONNECT's and its will's), before it builds
/// them: reason 0x97. Within the limit the packet decodes as with `decode`.
#[test]
fn user_properties_over_the_decode_limit() {
    use halyard_codec::{ByteString, decode_limited};
    let props = |n: usize| -> Vec<(ByteString, ByteString)> {
        (0..n)
            .map(|i| (format!("k{i}").into(), "v".into()))
            .collect()
    };
    let wire = |p: &Packet| {
        let mut b = BytesMut::new();
        p.encode(ProtocolVersion::V5, &mut b).unwrap();
        b
    };
    let publish = Packet::Publish(Publish {
        properties: PublishProperties {
            user_properties: props(3),
            ..Default::default()
        },
        ..Publish::new(TopicName::try_from("t").unwrap(), &b"x"[..])
    });
    let e = decode_limited(&mut wire(&publish), ProtocolVersion::V5, 1 << 20, 2).unwrap_err();
    assert_eq!(
        (e.kind, e.reason_code()),
        (
            ErrorKind::UserPropertiesOverLimit,
            ReasonCode::QuotaExceeded
        )
    );
    let ok = decode_limited(&mut wire(&publish), ProtocolVersion::V5, 1 << 20, 3).unwrap();
    let Some(Packet::Publish(got)) = ok else {
        panic!("{ok:?}")
    };
    let Packet::Publish(sent) = &publish else {
        unreachable!()
    };
    assert_eq!(got.properties, sent.properties);
    let connect = Packet::Connect(Box::new(Connect {
        protocol: ProtocolVersion::V5,
        bridge: false,
        clean_start: true,
        keep_alive: 0,
        client_id: ClientId::new("c").unwrap(),
        will: Some(Will {
            topic: TopicName::try_from("w").unwrap(),
            payload: Bytes::from_static(b"x"),
            qos: QoS::AtMostOnce,
            retain: false,
            delay_interval: None,
            properties: PublishProperties {
                user_properties: props(1),
                ..Default::default()
            },
        }),
        username: None,
        password: None,
        properties: Properties {
            user_properties: props(2),
            ..Default::default()
        },
    }));
    let e = decode_limited(&mut wire(&connect), ProtocolVersion::V5, 1 << 20, 2).unwrap_err();
    assert_eq!(e.kind, ErrorKind::UserPropertiesOverLimit);
    assert!(decode_limited(&mut wire(&connect), ProtocolVersion::V5, 1 << 20, 3).is_ok());
}

/// Mosquitto's bridge bit: a 3.x protocol level with 0x80 set (0x84: 3.1.1, 0x83: 3.1)
/// is a bridge's CONNECT (not in the standard; what Mosquitto's bridges send with
/// `try_private`). Decoded with `bridge` set, and encoded back to the same bytes.
#[test]
fn the_bridge_bit_of_a_3x_connect() {
    for (hex, protocol) in [
        (
            "10 0D 00 04 4D 51 54 54 84 02 00 3C 00 01 61",
            ProtocolVersion::V3_1_1,
        ),
        (
            "10 0F 00 06 4D 51 49 73 64 70 83 02 00 3C 00 01 61",
            ProtocolVersion::V3_1,
        ),
    ] {
        let bytes = self::hex(hex);
        let mut buf = BytesMut::from(&bytes[..]);
        let Ok(Some(Packet::Connect(c))) = decode(&mut buf, protocol, 1024) else {
            panic!("{hex}: a CONNECT");
        };
        assert!(c.bridge, "{hex}");
        assert_eq!(c.protocol, protocol);
        let mut out = BytesMut::new();
        Packet::Connect(c).encode(protocol, &mut out).unwrap();
        assert_eq!(&out[..], &bytes[..], "{hex}: same bytes back");
    }
}
