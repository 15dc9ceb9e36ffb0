//! The CONNECT handshake: reading the first packet before its version is known,
//! admission, authentication (password, certificate, enhanced), the session attach and
//! the CONNACK.

use std::sync::Arc;

use halyard_codec::{
    BytesMut, ConnAck, Connect, DecodeError, ErrorKind, Packet, Properties, ProtocolVersion,
    ReasonCode, decode_first, decode_limited,
};
use halyard_transport::{Event, PeerInfo};

use crate::auth::{Anonymous, AuthStep, AuthVerdict, Credentials, EnhancedAuth, Security};
use halyard_codec::{ByteString, Bytes};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::time::{Instant, timeout};
use tracing::{debug, info};

use super::*;
use crate::session::Peer;
use crate::state::{Inner, version_name};
use crate::stats::Stats;

/// Everything up to a running connection: CONNECT read, checked and answered.
pub(super) async fn handshake<S>(
    inner: Arc<Inner>,
    stream: S,
    info: PeerInfo,
    drain: tokio::sync::mpsc::Sender<()>,
    internal: bool,
) -> Option<Box<Connection<S>>>
where
    S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    let peer = Peer::from(&info.remote);
    // One stream, not `tokio::io::split` halves: the task that owns it polls both
    // directions itself (`Connection::main_loop`), and split's shared half costs an
    // allocation per connection and a lock per read and write.
    let mut io = stream;
    let mut rbuf = BytesMut::with_capacity(READ_BUFFER_INITIAL_BYTES);
    let max_in = inner.cfg().message_size_limit;
    let max_props = inner.cfg().decoded_user_properties();
    // [MQTT-3.1.4-1]-adjacent: a connection that never sends CONNECT is not kept.
    let first = timeout(
        inner.cfg().connect_timeout,
        read_first(&mut io, &mut rbuf, max_in, max_props),
    )
    .await;
    let connect = match first {
        Err(_) => {
            debug!(%peer, "no CONNECT within the connect timeout; closing");
            return None;
        }
        Ok(Err(ReadError::Closed)) => return None,
        Ok(Err(ReadError::Decode(e))) => {
            refuse_bad_connect(&inner, &mut io, &peer, &e).await;
            return None;
        }
        Ok(Ok(Packet::Connect(c))) => c,
        Ok(Ok(other)) => {
            // [MQTT-3.1.0-1]: the first packet must be CONNECT.
            if let Some(suppressed) = PEER_LOG.admit() {
                info!(%peer, packet = other.name(), suppressed, "first packet is not CONNECT [MQTT-3.1.0-1]; closing");
            }
            return None;
        }
    };
    let permit = inner.permits.clone().try_acquire_owned().ok();
    let mut connect = *connect;
    // A listener with `use_identity_as_username` authenticates by the verified client
    // certificate and replaces the user name with its identity (as mosquitto does).
    let cert = match (info.identity_as_username, &info.tls_identity) {
        _ if internal => CertAuth::Internal,
        (false, _) => CertAuth::NotUsed,
        (true, Some(id)) => {
            connect.username = Some(id.as_str().into());
            CertAuth::Verified
        }
        (true, None) => CertAuth::Missing,
    };
    let security = inner.security();
    let anonymous = match info.allow_anonymous {
        Some(true) => Anonymous::Allow,
        Some(false) => Anonymous::Deny,
        None => security.anonymous,
    };
    let admission = Admission {
        have_permit: permit.is_some(),
        cert,
        anonymous_ok: anonymous.allows(&info),
        security,
        info,
    };
    let mut conn =
        Box::new(Connection::accept(inner.clone(), connect, peer, io, rbuf, admission).await?);
    // Held as a flag, given back in `Drop`: the permit itself would be 16 bytes more of
    // every connection's task or `Connection`.
    if let Some(p) = permit {
        p.forget();
        conn.proto.flags.set(Flags::HOLDS_PERMIT, true);
    }
    conn.drain = Some(drain);
    Some(conn)
}

/// How the listener's client-certificate identity applies to a CONNECT.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum CertAuth {
    /// The listener does not use certificate identities.
    NotUsed,
    /// `use_identity_as_username`, and the client's certificate had an identity.
    Verified,
    /// An in-process client of the broker itself (a bridge's local side, see
    /// `Broker::spawn_internal`): trusted as the broker's own configuration, so neither
    /// authenticated nor held to the ACL. Only the embedding process can make one.
    Internal,
    /// `use_identity_as_username`, but no identity: refused.
    Missing,
}

/// What the connection task decided before CONNECT is checked.
#[derive(Debug)]
pub(crate) struct Admission {
    /// Within `max_connections`.
    pub(crate) have_permit: bool,
    pub(crate) cert: CertAuth,
    /// An anonymous client from this peer may connect (listener or broker policy).
    pub(crate) anonymous_ok: bool,
    /// The security settings in force when the connection arrived.
    pub(crate) security: Arc<Security>,
    pub(crate) info: PeerInfo,
}

/// Authenticates a CONNECT that passed the protocol checks: certificate identity, then
/// anonymous policy, then the authenticator (on a blocking thread), with failures per
/// source address rate-limited. `Ok` carries the verified user name, the identity the
/// ACL and the session are bound to; `None` is anonymous.
///
/// A user name nothing can verify (no authenticator configured) is no identity: the
/// client is anonymous, let in only where anonymous clients are, and never gets the
/// rights of the user it names.
async fn authenticate(
    inner: &Inner,
    c: &Connect,
    admission: &Admission,
) -> Result<Option<Arc<str>>, Violation> {
    match authenticate_start(inner, c, admission) {
        Authentication::Done(r) => r,
        Authentication::Check(authn, creds) => {
            // Password hashes are slow on purpose: keep them off the async workers.
            let verdict = tokio::task::spawn_blocking(move || authn.authenticate(&creds))
                .await
                .unwrap_or(AuthVerdict::NotAuthorized);
            authenticate_end(inner, c, admission, verdict)
        }
    }
}

/// Where authenticating a CONNECT stands before any password is checked.
pub(crate) enum Authentication {
    /// Decided: the verified user name (`None`: anonymous), or the refusal.
    Done(Result<Option<Arc<str>>, Violation>),
    /// The authenticator must check these credentials (`authenticate_end` takes its
    /// verdict).
    Check(Arc<dyn crate::auth::Authenticator>, Credentials),
}

/// The part of `authenticate` that needs no authenticator: certificate identity, the
/// anonymous policy, the failed-login limit.
pub(crate) fn authenticate_start(
    inner: &Inner,
    c: &Connect,
    admission: &Admission,
) -> Authentication {
    let claimed = c.username.as_ref().map(|u| Arc::<str>::from(&u[..]));
    if matches!(admission.cert, CertAuth::Verified | CertAuth::Internal) {
        return Authentication::Done(Ok(claimed));
    }
    let anonymous = |why| {
        Authentication::Done(if admission.anonymous_ok {
            Ok(None)
        } else {
            Err(Violation::new(ReasonCode::NotAuthorized, "", why))
        })
    };
    let Some(username) = &c.username else {
        return anonymous("anonymous clients not allowed");
    };
    let Some(authn) = admission.security.authenticator.clone() else {
        return anonymous(
            "no password file: a user name cannot be verified, and anonymous clients are not allowed",
        );
    };
    if let Some(ip) = remote_ip(admission)
        && inner.auth_failures.blocked(ip)
    {
        return Authentication::Done(Err(Violation::new(
            ReasonCode::BadUserNameOrPassword,
            "",
            "too many failed attempts from this address; try later",
        )));
    }
    Authentication::Check(
        authn,
        Credentials {
            client_id: c.client_id.as_str().to_string(),
            username: Some(username.to_string()),
            password: c.password.as_ref().map(|p| p.to_vec()),
            peer: admission.info.clone(),
        },
    )
}

/// The authenticator's verdict on a CONNECT's credentials, as its outcome.
pub(crate) fn authenticate_end(
    inner: &Inner,
    c: &Connect,
    admission: &Admission,
    verdict: AuthVerdict,
) -> Result<Option<Arc<str>>, Violation> {
    match verdict {
        AuthVerdict::Allow => Ok(c.username.as_ref().map(|u| Arc::<str>::from(&u[..]))),
        AuthVerdict::BadCredentials => {
            if let Some(ip) = remote_ip(admission) {
                inner.auth_failures.record(ip);
            }
            Err(Violation::new(
                ReasonCode::BadUserNameOrPassword,
                "",
                "bad user name or password",
            ))
        }
        AuthVerdict::NotAuthorized => Err(Violation::new(
            ReasonCode::NotAuthorized,
            "",
            "not authorized",
        )),
    }
}

fn remote_ip(admission: &Admission) -> Option<std::net::IpAddr> {
    match &admission.info.remote {
        halyard_transport::Remote::Ip(a) => Some(a.ip()),
        _ => None,
    }
}

/// Refuses a CONNECT: the CONNACK of `refusal`, written, then the close.
pub(super) async fn refuse_connect<W: AsyncRead + AsyncWrite + Unpin>(
    inner: &Inner,
    io: &mut W,
    peer: &Peer,
    c: &Connect,
    why: Violation,
) {
    let ack = refusal(inner, peer, c, why);
    write_now(io, &ack, c.protocol).await;
}

/// A refused CONNECT: counted, logged (rate-limited), told to the monitor; returns the
/// CONNACK with `why.reason` (v5 with `why` as its reason string; 3.x gets the return code
/// the codec maps the reason to).
pub(crate) fn refusal(inner: &Inner, peer: &Peer, c: &Connect, why: Violation) -> Packet {
    let v = c.protocol;
    let reason = why.reason;
    Stats::inc(&inner.stats.connections_refused);
    if let Some(suppressed) = PEER_LOG.admit() {
        info!(%peer, client_id = %c.client_id, user = c.username.as_deref(), protocol = version_name(v), reason = ?reason, %why, suppressed, "refused CONNECT");
    }
    inner.monitor.emit_conn(|| Event::AuthFailed {
        peer: peer.to_string(),
        client_id: c.client_id.as_str().to_string(),
        reason: format!("{reason:?}: {why}"),
    });
    Packet::ConnAck(ConnAck {
        session_present: false,
        reason,
        properties: Properties {
            reason_string: v.is_v5().then(|| why.to_string().into()),
            ..Properties::default()
        },
    })
}

pub(super) enum ReadError {
    Closed,
    Decode(DecodeError),
}

/// Reads the first packet, a CONNECT of a version not known yet (see `decode_first`).
pub(super) async fn read_first<R: AsyncRead + Unpin>(
    rd: &mut R,
    rbuf: &mut BytesMut,
    max: u32,
    max_user_properties: u32,
) -> Result<Packet, ReadError> {
    read_with(rd, rbuf, |b| decode_first(b, max, max_user_properties)).await
}

/// Reads one packet of a connection of version `version`.
pub(super) async fn read_packet<R: AsyncRead + Unpin>(
    rd: &mut R,
    rbuf: &mut BytesMut,
    version: ProtocolVersion,
    max: u32,
    max_user_properties: u32,
) -> Result<Packet, ReadError> {
    read_with(rd, rbuf, |b| {
        decode_limited(b, version, max, max_user_properties)
    })
    .await
}

/// Reads until `decode` gives a packet or fails, or the stream ends.
async fn read_with<R: AsyncRead + Unpin>(
    rd: &mut R,
    rbuf: &mut BytesMut,
    mut decode: impl FnMut(&mut BytesMut) -> Result<Option<Packet>, DecodeError>,
) -> Result<Packet, ReadError> {
    loop {
        match decode(rbuf) {
            Ok(Some(p)) => return Ok(p),
            Ok(None) => {}
            Err(e) => return Err(ReadError::Decode(e)),
        }
        match rd.read_buf(rbuf).await {
            Ok(0) | Err(_) => return Err(ReadError::Closed),
            Ok(_) => {}
        }
    }
}

/// Answers a CONNECT that could not be decoded. Protocol level problems get CONNACK 0x84
/// (v5) / 0x01 (3.x) [MQTT-3.1.2-2]; other errors in a v5 CONNECT get a CONNACK with the
/// error's reason [MQTT-4.13.1-1]; 3.x gets a plain close.
async fn refuse_bad_connect<W: AsyncRead + AsyncWrite + Unpin>(
    inner: &Inner,
    wr: &mut W,
    peer: &Peer,
    e: &DecodeError,
) {
    Stats::inc(&inner.stats.connections_refused);
    if let Some(suppressed) = PEER_LOG.admit() {
        info!(%peer, error = %e, suppressed, "refused CONNECT");
    }
    inner.monitor.emit_conn(|| Event::AuthFailed {
        peer: peer.to_string(),
        client_id: String::new(),
        reason: e.to_string(),
    });
    let v = match (e.kind, e.version) {
        (ErrorKind::UnsupportedProtocolVersion, Some(ProtocolVersion::V5)) => ProtocolVersion::V5,
        (ErrorKind::UnsupportedProtocolVersion, _) => ProtocolVersion::V3_1_1,
        (_, Some(ProtocolVersion::V5)) => ProtocolVersion::V5,
        _ => return,
    };
    let ack = Packet::ConnAck(ConnAck {
        session_present: false,
        reason: e.reason_code(),
        properties: Properties::default(),
    });
    write_now(wr, &ack, v).await;
}

/// The stream and read buffer an authentication exchange talks over before the session
/// exists.
struct AuthIo<'a, S> {
    io: &'a mut S,
    rbuf: &'a mut BytesMut,
}

pub(super) fn auth_packet(reason: ReasonCode, name: &ByteString, data: Option<Vec<u8>>) -> Packet {
    Packet::Auth(halyard_codec::Auth {
        reason,
        properties: Properties {
            authentication_method: Some(name.clone()),
            authentication_data: data.map(Bytes::from),
            ..Properties::default()
        },
    })
}

fn auth_refusal(inner: &Inner, v: AuthVerdict, peer: &PeerInfo) -> Violation {
    match v {
        AuthVerdict::BadCredentials | AuthVerdict::Allow => {
            if let halyard_transport::Remote::Ip(a) = &peer.remote {
                inner.auth_failures.record(a.ip());
            }
            Violation::new(
                ReasonCode::BadUserNameOrPassword,
                "",
                "authentication failed",
            )
        }
        AuthVerdict::NotAuthorized => {
            Violation::new(ReasonCode::NotAuthorized, "", "not authorized")
        }
    }
}

/// Runs an enhanced authentication exchange at CONNECT time (section 4.12): AUTH 0x18 out,
/// AUTH 0x18 back, each within the CONNECT timeout, until the method decides.
async fn exchange<S>(
    inner: &Inner,
    name: &ByteString,
    mut step: AuthStep,
    io: &mut AuthIo<'_, S>,
    peer: &PeerInfo,
) -> Result<(String, Option<Vec<u8>>), Violation>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    if let halyard_transport::Remote::Ip(a) = &peer.remote
        && inner.auth_failures.blocked(a.ip())
    {
        return Err(Violation::new(
            ReasonCode::BadUserNameOrPassword,
            "",
            "too many failed attempts from this address; try later",
        ));
    }
    loop {
        match step {
            AuthStep::Success { username, data } => return Ok((username, data)),
            AuthStep::Failure(v) => return Err(auth_refusal(inner, v, peer)),
            AuthStep::Continue(data, mut ex) => {
                let mut buf = BytesMut::new();
                let _ = auth_packet(ReasonCode::ContinueAuthentication, name, Some(data))
                    .encode(ProtocolVersion::V5, &mut buf);
                if io.io.write_all(&buf).await.is_err() || io.io.flush().await.is_err() {
                    return Err(Violation::new(
                        ReasonCode::UnspecifiedError,
                        "",
                        "connection lost during authentication",
                    ));
                }
                let next = timeout(
                    inner.cfg().connect_timeout,
                    read_packet(
                        io.io,
                        io.rbuf,
                        ProtocolVersion::V5,
                        inner.cfg().message_size_limit,
                        inner.cfg().decoded_user_properties(),
                    ),
                )
                .await;
                match next {
                    Ok(Ok(Packet::Auth(a)))
                        if a.reason == ReasonCode::ContinueAuthentication
                            && a.properties.authentication_method.as_ref() == Some(name) =>
                    {
                        step = ex.step(a.properties.authentication_data.as_deref());
                    }
                    Ok(Ok(_)) => {
                        return Err(Violation::new(
                            ReasonCode::ProtocolError,
                            "MQTT-4.12.0-2",
                            "expected AUTH continuing the same method",
                        ));
                    }
                    _ => {
                        return Err(Violation::new(
                            ReasonCode::UnspecifiedError,
                            "",
                            "no AUTH within the connect timeout",
                        ));
                    }
                }
            }
        }
    }
}

impl<S> Connection<S>
where
    S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    /// Validates CONNECT, authenticates, attaches the session and sends CONNACK. `None`
    /// when refused (the refusal is sent).
    async fn accept(
        inner: Arc<Inner>,
        mut c: Connect,
        peer: Peer,
        mut io: S,
        mut rbuf: BytesMut,
        admission: Admission,
    ) -> Option<Self> {
        let check = admit(&inner, &c, &admission);
        let mut enhanced: Option<(ByteString, Arc<dyn EnhancedAuth>)> = None;
        let mut auth_reply = None;
        let check = match (check, c.properties.authentication_method.clone()) {
            (Ok(()), None) => authenticate(&inner, &c, &admission).await,
            (Ok(()), Some(name)) => {
                let method = admission
                    .security
                    .enhanced
                    .iter()
                    .find(|e| e.method() == &name[..])
                    .cloned();
                match method {
                    None => Err(Violation::new(
                        ReasonCode::BadAuthenticationMethod,
                        "MQTT-4.12.0-1",
                        "unsupported authentication method",
                    )),
                    Some(method) => {
                        let first = method.start(c.properties.authentication_data.as_deref());
                        let mut auth_io = AuthIo {
                            io: &mut io,
                            rbuf: &mut rbuf,
                        };
                        match exchange(&inner, &name, first, &mut auth_io, &admission.info).await {
                            Ok((user, data)) => {
                                c.username = Some(user.as_str().into());
                                auth_reply = data;
                                enhanced = Some((name, method));
                                Ok(Some(Arc::from(user.as_str())))
                            }
                            Err(e) => Err(e),
                        }
                    }
                }
            }
            (Err(e), _) => Err(e),
        };
        let user = match check {
            Ok(user) => user,
            Err(why) => {
                refuse_connect(&inner, &mut io, &peer, &c, why).await;
                return None;
            }
        };
        let verified = Verified {
            user,
            enhanced,
            auth_reply,
            trusted: admission.cert == CertAuth::Internal,
        };
        let listener = admission.info.listener.clone();
        match Proto::open(
            inner.clone(),
            &c,
            verified,
            &peer,
            listener,
            rbuf,
            Instant::now(),
        ) {
            Ok(proto) => Some(Connection {
                proto,
                io,
                pause_timer: None,
                drain: None,
            }),
            Err(why) => {
                refuse_connect(&inner, &mut io, &peer, &c, why).await;
                None
            }
        }
    }
}
