//! Connecting: dial the URL, send CONNECT, read CONNACK.

use crate::{ClientOptions, Error};
use halyard_codec::{
    ByteString, BytesMut, ClientId, ConnAck, Connect, MAX_PACKET_SIZE, Packet, Properties,
    TopicName, Will, decode,
};
use halyard_transport::{BoxStream, Registry};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::*;

/// Dials, sends CONNECT, reads CONNACK.
pub(super) async fn establish(
    registry: Registry,
    url: String,
    opts: ClientOptions,
    client_id: String,
    clean_start: bool,
) -> Result<(BoxStream, ConnAck, BytesMut), Error> {
    let timeout = opts.dial.connect_timeout;
    let work = async {
        let mut stream = registry
            .dial(&url, &opts.dial)
            .await
            .map_err(|e| Error::Connect(std::io::Error::new(e.kind(), format!("{url}: {e}"))))?;
        let v = opts.protocol;
        let connect = build_connect(&opts, client_id, clean_start)?;
        let mut buf = BytesMut::new();
        let connect = Packet::Connect(Box::new(connect));
        if let Some(t) = &opts.trace {
            (t.0)("sending CONNECT");
        }
        connect
            .encode(v, &mut buf)
            .map_err(|e| Error::Protocol(format!("CONNECT: {e}")))?;
        stream.write_all(&buf).await.map_err(Error::Connect)?;
        stream.flush().await.map_err(Error::Connect)?;
        let max = opts.maximum_packet_size.unwrap_or(MAX_PACKET_SIZE);
        let mut rbuf = BytesMut::with_capacity(READ_CHUNK);
        loop {
            match decode(&mut rbuf, v, max) {
                Ok(Some(Packet::ConnAck(ack))) => {
                    if let Some(t) = &opts.trace {
                        (t.0)(&format!("received CONNACK ({})", ack.reason as u8));
                    }
                    if ack.reason.is_error() {
                        return Err(Error::Refused {
                            reason: ack.reason,
                            reason_string: ack.properties.reason_string.map(|s| s.to_string()),
                        });
                    }
                    return Ok((stream, ack, rbuf));
                }
                Ok(Some(Packet::Auth(_))) => {
                    return Err(Error::NotSupported("enhanced authentication (AUTH)"));
                }
                Ok(Some(p)) => {
                    return Err(Error::Protocol(format!(
                        "expected CONNACK, got {}",
                        p.name()
                    )));
                }
                Ok(None) => {
                    let n = stream.read_buf(&mut rbuf).await.map_err(Error::Connect)?;
                    if n == 0 {
                        return Err(Error::Connect(std::io::Error::new(
                            std::io::ErrorKind::UnexpectedEof,
                            "the broker closed the connection before CONNACK",
                        )));
                    }
                }
                Err(e) => return Err(Error::Protocol(format!("CONNACK: {e}"))),
            }
        }
    };
    match tokio::time::timeout(timeout, work).await {
        Ok(r) => r,
        Err(_) => Err(Error::Timeout),
    }
}

pub(super) fn build_connect(
    opts: &ClientOptions,
    client_id: String,
    clean_start: bool,
) -> Result<Connect, Error> {
    let v5 = opts.protocol.is_v5();
    let will = match &opts.will {
        Some(w) => Some(Will {
            topic: TopicName::new(w.topic.clone())?,
            payload: w.payload.clone(),
            qos: w.qos,
            retain: w.retain,
            delay_interval: opts.will_delay,
            properties: w.properties.clone(),
        }),
        None => None,
    };
    let mut properties = Properties::default();
    if v5 {
        properties.session_expiry_interval =
            (opts.session_expiry > 0).then_some(opts.session_expiry);
        properties.receive_maximum =
            (opts.receive_maximum != u16::MAX).then_some(opts.receive_maximum.max(1));
        properties.maximum_packet_size = opts.maximum_packet_size;
        properties.topic_alias_maximum =
            (opts.topic_alias_maximum > 0).then_some(opts.topic_alias_maximum);
        properties.request_response_information = opts.request_response_information.then_some(true);
        properties.request_problem_information = opts.request_problem_information;
        properties.user_properties = opts
            .user_properties
            .iter()
            .map(|(k, v)| (ByteString::from(k.as_str()), ByteString::from(v.as_str())))
            .collect();
    }
    Ok(Connect {
        protocol: opts.protocol,
        bridge: false,
        clean_start,
        keep_alive: u16::try_from(opts.keep_alive.as_secs()).unwrap_or(u16::MAX),
        client_id: ClientId::new(client_id)
            .map_err(|e| Error::Protocol(format!("client id: {e}")))?,
        will,
        username: opts.username.as_deref().map(ByteString::from),
        password: opts.password.clone(),
        properties,
    })
}
