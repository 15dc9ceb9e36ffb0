//! Opening a bridge's two connections: the local session (in-process) and the remote
//! (any registered transport, 5.0 with a fallback to 3.1.1, Mosquitto's bridge bit).

use std::path::PathBuf;
use std::time::Duration;

use halyard_broker::Broker;
use halyard_client::{ClientTls, DialOptions};
use halyard_codec::{
    ByteString, Bytes, ClientId, ConnAck, Connect, Disconnect, Packet, Properties, ProtocolVersion,
    PublishProperties, QoS, ReasonCode, TopicName, Will,
};
use halyard_transport::{BoxStream, Registry};
use tokio::io::DuplexStream;

use crate::config::Bridge;
use crate::wire::Wire;

/// Opens the local session `$bridge/<name>`: persistent, no keep alive, its Receive
/// Maximum the bridge's window.
pub(crate) async fn connect_local(
    broker: &Broker,
    b: &Bridge,
) -> Result<(Wire<DuplexStream>, ConnAck), String> {
    local_connect(broker, b, false).await
}

async fn local_connect(
    broker: &Broker,
    b: &Bridge,
    end_session: bool,
) -> Result<(Wire<DuplexStream>, ConnAck), String> {
    let (ours, theirs) = tokio::io::duplex(256 * 1024);
    broker.spawn_internal(theirs, &format!("bridge {}", b.config.name));
    let mut w = Wire::new(
        ours,
        ProtocolVersion::V5,
        halyard_codec::MAX_PACKET_SIZE,
        "local".into(),
    );
    let properties = Properties {
        session_expiry_interval: Some(if end_session { 0 } else { u32::MAX }),
        receive_maximum: Some(b.config.receive_maximum),
        ..Properties::default()
    };
    w.send(&Packet::Connect(Box::new(Connect {
        protocol: ProtocolVersion::V5,
        bridge: false,
        clean_start: end_session,
        keep_alive: 0,
        client_id: ClientId::new(b.local_clientid()).map_err(|e| e.to_string())?,
        will: None,
        username: None,
        password: None,
        properties,
    })));
    w.flush().await.map_err(|e| e.to_string())?;
    match w.read().await? {
        Packet::ConnAck(a) if !a.reason.is_error() => Ok((w, a)),
        Packet::ConnAck(a) => Err(format!(
            "the local broker refused the bridge: {:?}",
            a.reason
        )),
        other => Err(format!("expected CONNACK, got {}", other.name())),
    }
}

/// Ends the local session of a removed bridge: its queue and subscriptions go.
pub(crate) async fn end_local_session(broker: &Broker, b: &Bridge) -> Result<(), String> {
    let (mut w, _) = local_connect(broker, b, true).await?;
    w.send(&Packet::Disconnect(Disconnect::new(ReasonCode::Success)));
    w.flush().await.map_err(|e| e.to_string())
}

#[derive(Debug)]
pub(crate) enum RemoteError {
    /// A 5.0 CONNECT was refused in a way that says the remote speaks an older version.
    V5Refused,
    /// A 3.1.1 CONNECT with the bridge bit was refused as an unknown protocol level.
    PrivateRefused,
    Other(String),
}

impl std::fmt::Display for RemoteError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RemoteError::V5Refused => f.write_str("MQTT 5.0 refused"),
            RemoteError::PrivateRefused => f.write_str("the bridge bit refused"),
            RemoteError::Other(s) => f.write_str(s),
        }
    }
}

/// Dials the remote and sends CONNECT (with the bridge bit for 3.1.1 when
/// `try_private`), returning after CONNACK.
pub(crate) async fn connect_remote(
    registry: &Registry,
    b: &Bridge,
    url: &str,
    fallback_v311: bool,
    private: bool,
    receive_maximum: u16,
) -> Result<(Wire<BoxStream>, ConnAck), RemoteError> {
    let c = &b.config;
    let version = match b.protocol {
        Some(v) => v,
        None if fallback_v311 => ProtocolVersion::V3_1_1,
        None => ProtocolVersion::V5,
    };
    let auto = b.protocol.is_none() && version.is_v5();
    let opts = DialOptions {
        tls: ClientTls {
            cafile: c.cafile.as_ref().map(PathBuf::from),
            certfile: c.certfile.as_ref().map(PathBuf::from),
            keyfile: c.keyfile.as_ref().map(PathBuf::from),
            server_name: None,
            insecure: c.insecure,
        },
        connect_timeout: Duration::from_secs(10),
        ws_origin: None,
    };
    let work = async {
        let stream = registry
            .dial(url, &opts)
            .await
            .map_err(|e| RemoteError::Other(e.to_string()))?;
        let mut w = Wire::new(
            stream,
            version,
            halyard_codec::MAX_PACKET_SIZE,
            url.to_string(),
        );
        let v5 = version.is_v5();
        let will = c.notifications.then(|| Will {
            topic: TopicName::new(b.notification_topic.as_str()).expect("validated"),
            payload: Bytes::from_static(b"0"),
            qos: QoS::AtLeastOnce,
            retain: true,
            delay_interval: None,
            properties: PublishProperties::default(),
        });
        let properties = if v5 {
            Properties {
                session_expiry_interval: (!c.cleansession && c.session_expiry_interval > 0)
                    .then_some(c.session_expiry_interval),
                receive_maximum: Some(receive_maximum.max(1)),
                ..Properties::default()
            }
        } else {
            Properties::default()
        };
        let private = private && !v5;
        let connect = Packet::Connect(Box::new(Connect {
            protocol: version,
            bridge: private,
            clean_start: c.cleansession,
            keep_alive: c.keepalive_interval,
            client_id: ClientId::new(b.remote_clientid.as_str())
                .map_err(|e| RemoteError::Other(format!("remote_clientid: {e}")))?,
            will,
            username: c.remote_username.as_deref().map(ByteString::from),
            password: c
                .remote_password
                .as_deref()
                .map(|p| Bytes::copy_from_slice(p.as_bytes())),
            properties,
        }));
        w.send(&connect);
        w.flush()
            .await
            .map_err(|e| RemoteError::Other(e.to_string()))?;
        match w.read().await {
            Ok(Packet::ConnAck(a)) if !a.reason.is_error() => Ok((w, a)),
            Ok(Packet::ConnAck(a))
                if auto && a.reason == ReasonCode::UnsupportedProtocolVersion =>
            {
                Err(RemoteError::V5Refused)
            }
            // Mosquitto's own bridges do the same: without the bit, once refused.
            Ok(Packet::ConnAck(a))
                if private && a.reason == ReasonCode::UnsupportedProtocolVersion =>
            {
                Err(RemoteError::PrivateRefused)
            }
            Err(_) if private => Err(RemoteError::PrivateRefused),
            Ok(Packet::ConnAck(a)) => Err(RemoteError::Other(format!(
                "CONNACK refused: {} ({:#04x})",
                halyard_client::reason_text(a.reason),
                a.reason as u8
            ))),
            Ok(other) => Err(RemoteError::Other(format!(
                "expected CONNACK, got {}",
                other.name()
            ))),
            // A 3.1.1 broker answers a 5.0 CONNECT with a 3.1.1 CONNACK (return code 1),
            // which does not decode as 5.0, or closes the connection.
            Err(_) if auto => Err(RemoteError::V5Refused),
            Err(e) => Err(RemoteError::Other(e)),
        }
    };
    match tokio::time::timeout(Duration::from_secs(15), work).await {
        Ok(r) => r,
        Err(_) => Err(RemoteError::Other("no CONNACK within 15 s".into())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use halyard_codec::BytesMut;

    #[test]
    fn the_bridge_bit_lands_on_the_protocol_level() {
        let c = Packet::Connect(Box::new(Connect {
            protocol: ProtocolVersion::V3_1_1,
            bridge: true,
            clean_start: true,
            keep_alive: 60,
            client_id: ClientId::new("b").unwrap(),
            will: None,
            username: None,
            password: None,
            properties: Properties::default(),
        }));
        let mut buf = BytesMut::new();
        c.encode(ProtocolVersion::V3_1_1, &mut buf).unwrap();
        assert_eq!(&buf[2..9], b"\x00\x04MQTT\x84");
        let Ok(Some(Packet::Connect(back))) =
            halyard_codec::decode(&mut buf, ProtocolVersion::V3_1_1, 1 << 20)
        else {
            panic!("decodes");
        };
        assert!(back.bridge && back.protocol == ProtocolVersion::V3_1_1);
    }
}
