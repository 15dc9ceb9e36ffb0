//! SCRAM over MQTT 5 AUTH (section 4.12) against the broker: CONNECT with Authentication
//! Method and client-first, AUTH 0x18 challenge, AUTH 0x18 client-final, CONNACK with the
//! server signature [MQTT-4.12.0-*]; wrong proofs, unknown methods (0x8C [MQTT-4.12.0-1]),
//! re-authentication (AUTH 0x19 ... AUTH 0x00, failure -> DISCONNECT [MQTT-4.12.1-2]).
//! The client side here is written from RFC 5802 with aws-lc-rs primitives; the Python
//! interop test (tests/interop/scram_mqtt.py) uses the independent `scramp` library.

use std::sync::Arc;

use aws_lc_rs::{digest, hmac, pbkdf2};
use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use halyard_auth::{PasswordFile, Scheme, ScramAuth, ScramHash};
use halyard_broker::auth::{Anonymous, Security};
use halyard_codec::*;
use halyard_testkit::{RawClient, TestBroker};
use tokio::net::TcpStream;

fn broker_security() -> Security {
    let mut f = PasswordFile::default();
    f.set("alice", b"pencil", Scheme::Scram(ScramHash::Sha256, 4096))
        .unwrap();
    f.set("bob", b"builder", Scheme::Scram(ScramHash::Sha512, 4096))
        .unwrap();
    let f = Arc::new(f);
    Security {
        authenticator: Some(f.clone()),
        enhanced: vec![
            Arc::new(ScramAuth::new(ScramHash::Sha256, f.clone())),
            Arc::new(ScramAuth::new(ScramHash::Sha512, f)),
        ],
        anonymous: Anonymous::Deny,
        ..Security::default()
    }
}

/// The client's side of SCRAM (RFC 5802 section 3).
struct Client {
    sha512: bool,
    password: &'static [u8],
    first_bare: String,
    auth_message: String,
    server_key: Vec<u8>,
}

impl Client {
    fn new(sha512: bool, user: &str, password: &'static [u8]) -> (Client, String) {
        let first_bare = format!("n={user},r=fyko+d2lbbFgONRv9qkxdawL");
        (
            Client {
                sha512,
                password,
                first_bare: first_bare.clone(),
                auth_message: String::new(),
                server_key: vec![],
            },
            format!("n,,{first_bare}"),
        )
    }
    fn mac(&self, k: &[u8], d: &[u8]) -> Vec<u8> {
        let alg = if self.sha512 {
            hmac::HMAC_SHA512
        } else {
            hmac::HMAC_SHA256
        };
        hmac::sign(&hmac::Key::new(alg, k), d).as_ref().to_vec()
    }
    fn final_message(&mut self, server_first: &str) -> String {
        let get = |k: &str| {
            server_first
                .split(',')
                .find_map(|f| f.strip_prefix(k))
                .unwrap()
        };
        let (nonce, salt, iters) = (
            get("r="),
            B64.decode(get("s=")).unwrap(),
            get("i=").parse::<u32>().unwrap(),
        );
        let (alg, len, h) = if self.sha512 {
            (pbkdf2::PBKDF2_HMAC_SHA512, 64, &digest::SHA512)
        } else {
            (pbkdf2::PBKDF2_HMAC_SHA256, 32, &digest::SHA256)
        };
        let mut salted = vec![0u8; len];
        pbkdf2::derive(
            alg,
            iters.try_into().unwrap(),
            &salt,
            self.password,
            &mut salted,
        );
        let client_key = self.mac(&salted, b"Client Key");
        let stored_key = digest::digest(h, &client_key);
        self.server_key = self.mac(&salted, b"Server Key");
        let without_proof = format!("c=biws,r={nonce}");
        self.auth_message = format!("{},{server_first},{without_proof}", self.first_bare);
        let sig = self.mac(stored_key.as_ref(), self.auth_message.as_bytes());
        let proof: Vec<u8> = client_key.iter().zip(&sig).map(|(a, b)| a ^ b).collect();
        format!("{without_proof},p={}", B64.encode(proof))
    }
    fn server_final_ok(&self, server_final: &[u8]) -> bool {
        let sig = self.mac(&self.server_key, self.auth_message.as_bytes());
        server_final == format!("v={}", B64.encode(sig)).as_bytes()
    }
}

fn auth(reason: ReasonCode, method: &str, data: Vec<u8>) -> Packet {
    Packet::Auth(Auth {
        reason,
        properties: Properties {
            authentication_method: Some(method.into()),
            authentication_data: Some(Bytes::from(data)),
            ..Properties::default()
        },
    })
}

fn connect(id: &str, method: &str, data: Vec<u8>) -> Packet {
    Packet::Connect(Box::new(Connect {
        protocol: ProtocolVersion::V5,
        bridge: false,
        clean_start: true,
        keep_alive: 60,
        client_id: ClientId::new(id).unwrap(),
        will: None,
        username: None,
        password: None,
        properties: Properties {
            authentication_method: Some(method.into()),
            authentication_data: Some(Bytes::from(data)),
            ..Properties::default()
        },
    }))
}

fn auth_data(p: &Properties) -> String {
    String::from_utf8(p.authentication_data.clone().unwrap().to_vec()).unwrap()
}

/// Runs the CONNECT exchange; returns the CONNACK.
async fn scram_connect(
    c: &mut RawClient<TcpStream>,
    sha512: bool,
    user: &str,
    pw: &'static [u8],
) -> (ConnAck, Client) {
    let method = if sha512 {
        "SCRAM-SHA-512"
    } else {
        "SCRAM-SHA-256"
    };
    let (mut cl, first) = Client::new(sha512, user, pw);
    c.send(&connect(user, method, first.into_bytes())).await;
    let Packet::Auth(challenge) = c.recv().await else {
        panic!("expected AUTH")
    };
    assert_eq!(challenge.reason, ReasonCode::ContinueAuthentication);
    assert_eq!(
        challenge.properties.authentication_method.as_deref(),
        Some(method)
    );
    let fin = cl.final_message(&auth_data(&challenge.properties));
    c.send(&auth(
        ReasonCode::ContinueAuthentication,
        method,
        fin.into_bytes(),
    ))
    .await;
    let Packet::ConnAck(ack) = c.recv().await else {
        panic!("expected CONNACK")
    };
    (ack, cl)
}

#[tokio::test]
async fn scram_sha256_and_sha512_connect() {
    let tb = TestBroker::start().await;
    tb.broker.set_security(broker_security());
    for (sha512, user, pw) in [(false, "alice", &b"pencil"[..]), (true, "bob", b"builder")] {
        let mut c = tb.raw().await;
        let (ack, cl) = scram_connect(&mut c, sha512, user, pw).await;
        assert_eq!(ack.reason, ReasonCode::Success, "{ack:?}");
        let sf = ack
            .properties
            .authentication_data
            .expect("server-final in CONNACK");
        assert!(
            cl.server_final_ok(&sf),
            "the server proved it knows the verifier"
        );
        c.send(&Packet::PingReq).await;
        assert!(matches!(c.recv().await, Packet::PingResp));
    }
}

#[tokio::test]
async fn wrong_password_unknown_user_wrong_mechanism_and_method() {
    let tb = TestBroker::start().await;
    tb.broker.set_security(broker_security());
    for (sha512, user, pw) in [
        (false, "alice", &b"pencil!"[..]),
        (false, "nobody", b"x"),
        (true, "alice", b"pencil"),
    ] {
        let mut c = tb.raw().await;
        let (ack, _) = scram_connect(&mut c, sha512, user, pw).await;
        assert_eq!(ack.reason, ReasonCode::BadUserNameOrPassword, "{user}");
    }
    let mut c = tb.raw().await;
    c.send(&connect("x", "KERBEROS", vec![])).await;
    let Packet::ConnAck(ack) = c.recv().await else {
        panic!()
    };
    assert_eq!(ack.reason, ReasonCode::BadAuthenticationMethod);
    // SCRAM verifiers also check plain CONNECT passwords.
    let mut c = tb.raw().await;
    c.send(&Packet::Connect(Box::new(Connect {
        protocol: ProtocolVersion::V5,
        bridge: false,
        clean_start: true,
        keep_alive: 60,
        client_id: ClientId::new("plain").unwrap(),
        will: None,
        username: Some("alice".into()),
        password: Some(Bytes::from_static(b"pencil")),
        properties: Properties::default(),
    })))
    .await;
    let Packet::ConnAck(ack) = c.recv().await else {
        panic!()
    };
    assert_eq!(ack.reason, ReasonCode::Success);
}

#[tokio::test]
async fn reauthentication() {
    let tb = TestBroker::start().await;
    tb.broker.set_security(broker_security());
    let mut c = tb.raw().await;
    let (ack, _) = scram_connect(&mut c, false, "alice", b"pencil").await;
    assert_eq!(ack.reason, ReasonCode::Success);
    // Good re-authentication: AUTH 0x19 -> AUTH 0x18 -> AUTH 0x18 -> AUTH 0x00.
    let (mut cl, first) = Client::new(false, "alice", b"pencil");
    c.send(&auth(
        ReasonCode::ReAuthenticate,
        "SCRAM-SHA-256",
        first.into_bytes(),
    ))
    .await;
    let Packet::Auth(ch) = c.recv().await else {
        panic!()
    };
    assert_eq!(ch.reason, ReasonCode::ContinueAuthentication);
    let fin = cl.final_message(&auth_data(&ch.properties));
    c.send(&auth(
        ReasonCode::ContinueAuthentication,
        "SCRAM-SHA-256",
        fin.into_bytes(),
    ))
    .await;
    let Packet::Auth(done) = c.recv().await else {
        panic!()
    };
    assert_eq!(done.reason, ReasonCode::Success);
    assert!(cl.server_final_ok(&done.properties.authentication_data.unwrap()));
    // A failed re-authentication: DISCONNECT 0x87 [MQTT-4.12.1-2].
    let (mut cl, first) = Client::new(false, "alice", b"wrong");
    c.send(&auth(
        ReasonCode::ReAuthenticate,
        "SCRAM-SHA-256",
        first.into_bytes(),
    ))
    .await;
    let Packet::Auth(ch) = c.recv().await else {
        panic!()
    };
    let fin = cl.final_message(&auth_data(&ch.properties));
    c.send(&auth(
        ReasonCode::ContinueAuthentication,
        "SCRAM-SHA-256",
        fin.into_bytes(),
    ))
    .await;
    let seen = c.expect_close().await;
    assert!(
        matches!(seen.last(), Some(Packet::Disconnect(d)) if d.reason == ReasonCode::NotAuthorized),
        "{seen:?}"
    );
    let mut c = tb.raw().await;
    let (ack, _) = scram_connect(&mut c, false, "alice", b"pencil").await;
    assert_eq!(ack.reason, ReasonCode::Success);
    // Another method than CONNECT's: protocol error [MQTT-4.12.1-1].
    c.send(&auth(
        ReasonCode::ReAuthenticate,
        "SCRAM-SHA-512",
        b"n,,n=alice,r=x".to_vec(),
    ))
    .await;
    let seen = c.expect_close().await;
    assert!(
        matches!(seen.last(), Some(Packet::Disconnect(d)) if d.reason == ReasonCode::ProtocolError),
        "{seen:?}"
    );
}
