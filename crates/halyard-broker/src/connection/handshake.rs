//! The CONNECT handshake: reading the first packet before its version is known,
//! admission, authentication (password, certificate, enhanced), the session attach and
//! the CONNACK.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};

use halyard_codec::{
    BytesMut, ConnAck, Connect, DecodeError, ErrorKind, Packet, Properties, ProtocolVersion, QoS,
    ReasonCode, decode_first, decode_limited,
};
use halyard_transport::{Event, PeerInfo};

use crate::auth::{
    Anonymous, AuthStep, AuthVerdict, Credentials, EnhancedAuth, Identity, Security,
};
use crate::registry::Full;
use halyard_codec::{ByteString, Bytes};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::time::{Instant, timeout};
use tracing::{debug, info};

use super::*;
use crate::lifecycle::{NotAttached, assign_client_id, attach_session};
use crate::message::Message;
use crate::session::{ConnInfo, Peer};
use crate::state::{Inner, version_name};
use crate::stats::Stats;

/// Everything up to a running connection: CONNECT read, checked and answered.
pub(super) async fn handshake<S>(
    inner: Arc<Inner>,
    stream: S,
    info: PeerInfo,
    drain: tokio::sync::mpsc::Sender<()>,
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
    let claimed = c.username.as_ref().map(|u| Arc::<str>::from(&u[..]));
    if admission.cert == CertAuth::Verified {
        return Ok(claimed);
    }
    let anonymous = |why| {
        if admission.anonymous_ok {
            Ok(None)
        } else {
            Err(Violation::new(ReasonCode::NotAuthorized, "", why))
        }
    };
    let Some(username) = &c.username else {
        return anonymous("anonymous clients not allowed");
    };
    let Some(authn) = admission.security.authenticator.clone() else {
        return anonymous(
            "no password file: a user name cannot be verified, and anonymous clients are not allowed",
        );
    };
    let ip = match &admission.info.remote {
        halyard_transport::Remote::Ip(a) => Some(a.ip()),
        _ => None,
    };
    if let Some(ip) = ip
        && inner.auth_failures.blocked(ip)
    {
        return Err(Violation::new(
            ReasonCode::BadUserNameOrPassword,
            "",
            "too many failed attempts from this address; try later",
        ));
    }
    let creds = Credentials {
        client_id: c.client_id.as_str().to_string(),
        username: Some(username.to_string()),
        password: c.password.as_ref().map(|p| p.to_vec()),
        peer: admission.info.clone(),
    };
    // Password hashes are slow on purpose: keep them off the async workers.
    let verdict = tokio::task::spawn_blocking(move || authn.authenticate(&creds))
        .await
        .unwrap_or(AuthVerdict::NotAuthorized);
    match verdict {
        AuthVerdict::Allow => Ok(claimed),
        AuthVerdict::BadCredentials => {
            if let Some(ip) = ip {
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

/// Refuses a CONNECT: counted, logged (rate-limited), told to the monitor, answered with
/// CONNACK `reason` (v5 with `why` as its reason string; 3.x gets the return code the
/// codec maps `reason` to).
pub(super) async fn refuse_connect<W: AsyncRead + AsyncWrite + Unpin>(
    inner: &Inner,
    io: &mut W,
    peer: &Peer,
    c: &Connect,
    why: Violation,
) {
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
    let ack = Packet::ConnAck(ConnAck {
        session_present: false,
        reason,
        properties: Properties {
            reason_string: v.is_v5().then(|| why.to_string().into()),
            ..Properties::default()
        },
    });
    write_now(io, &ack, v).await;
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
    loop {
        match decode_first(rbuf, max, max_user_properties) {
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

pub(super) async fn read_packet<R: AsyncRead + Unpin>(
    rd: &mut R,
    rbuf: &mut BytesMut,
    version: ProtocolVersion,
    max: u32,
    max_user_properties: u32,
) -> Result<Packet, ReadError> {
    loop {
        match decode_limited(rbuf, version, max, max_user_properties) {
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

/// The checks of a decoded CONNECT before authentication: admission (permits,
/// certificate identity), client identifier, keep alive, will and authentication
/// method, each refusal with its rule.
pub(crate) fn admit(inner: &Inner, c: &Connect, admission: &Admission) -> Result<(), Violation> {
    let v = c.protocol;
    let v5 = v.is_v5();
    let cfg = inner.cfg();
    if admission.cert == CertAuth::Missing {
        return Err(Violation::new(
            ReasonCode::NotAuthorized,
            "use_identity_as_username",
            "no client certificate identity",
        ));
    }
    if !admission.have_permit {
        return Err(Violation::new(
            ReasonCode::QuotaExceeded,
            "max_connections",
            "max_connections reached",
        ));
    }
    if c.client_id.is_empty() {
        // v5: we assign one [MQTT-3.1.3-6]. 3.1.1: only with clean session
        // [MQTT-3.1.3-8]. 3.1 requires an identifier.
        if v == ProtocolVersion::V3_1 || (!v5 && !c.clean_start) {
            return Err(Violation::new(
                ReasonCode::ClientIdentifierNotValid,
                "MQTT-3.1.3-8",
                "empty client id without clean session",
            ));
        }
    } else if v == ProtocolVersion::V3_1 && c.client_id.as_str().len() > 23 {
        return Err(Violation::new(
            ReasonCode::ClientIdentifierNotValid,
            "MQTT 3.1 section 3.1",
            "3.1 client id over 23 bytes",
        ));
    } else if c.client_id.as_str().len() > cfg.max_client_id_length {
        return Err(Violation::new(
            ReasonCode::ClientIdentifierNotValid,
            "max_client_id_length",
            "client id too long",
        ));
    }
    if v5
        && let Some(m) = &c.properties.authentication_method
        && !admission
            .security
            .enhanced
            .iter()
            .any(|e| e.method() == &m[..])
    {
        // A method we do not offer [MQTT-4.12.0-1].
        return Err(Violation::new(
            ReasonCode::BadAuthenticationMethod,
            "MQTT-4.12.0-1",
            "unsupported authentication method",
        ));
    }
    if v5
        && c.properties.authentication_data.is_some()
        && c.properties.authentication_method.is_none()
    {
        return Err(Violation::new(
            ReasonCode::ProtocolError,
            "MQTT-5.0 section 3.1.2.11.10",
            "authentication data without an authentication method",
        ));
    }
    if !v5 && c.keep_alive > cfg.max_keepalive {
        // 3.x has no Server Keep Alive; refuse as mosquitto does.
        return Err(Violation::new(
            ReasonCode::ClientIdentifierNotValid,
            "max_keepalive",
            "keep alive above max_keepalive",
        ));
    }
    if let Some(w) = &c.will {
        if let Some(why) = cfg.user_properties_over(&w.properties.user_properties) {
            Stats::inc(&inner.stats.properties_refused);
            return Err(Violation::new(
                ReasonCode::QuotaExceeded,
                "max_user_properties",
                why,
            ));
        }
        if w.qos > cfg.max_qos {
            return Err(Violation::new(
                ReasonCode::QoSNotSupported,
                "MQTT-3.2.2-12",
                "will QoS above maximum QoS",
            ));
        }
        if w.retain && !cfg.retain_available {
            return Err(Violation::new(
                ReasonCode::RetainNotSupported,
                "MQTT-3.2.2-13",
                "will retain unsupported",
            ));
        }
    }
    Ok(())
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
        };
        let listener = admission.info.listener.clone();
        match Proto::open(
            inner.clone(),
            &c,
            verified,
            peer.clone(),
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

/// What authentication established for `Proto::open`.
pub(crate) struct Verified {
    /// The verified user name; `None`: anonymous.
    pub(crate) user: Option<Arc<str>>,
    /// The enhanced authentication method, kept for re-authentication.
    pub(crate) enhanced: Option<(ByteString, Arc<dyn EnhancedAuth>)>,
    /// The method's last data, for the CONNACK.
    pub(crate) auth_reply: Option<Vec<u8>>,
}

impl Proto {
    /// Opens the protocol state of an admitted, authenticated CONNECT at `now`: the will
    /// checked against the ACL, the session attached (resumed, taken over or made), the
    /// CONNACK written to `wbuf`, unacknowledged messages queued to resend. `rbuf` holds
    /// what was read after the CONNECT.
    pub(crate) fn open(
        inner: Arc<Inner>,
        c: &Connect,
        verified: Verified,
        peer: Peer,
        listener: Arc<str>,
        rbuf: BytesMut,
        now: Instant,
    ) -> Result<Proto, Violation> {
        let Verified {
            user,
            enhanced,
            auth_reply,
        } = verified;
        let v = c.protocol;
        let v5 = v.is_v5();
        let cfg = inner.cfg();
        let mut assigned = None;
        let client_id: Arc<str> = if c.client_id.is_empty() {
            let id = assign_client_id(&inner, now);
            assigned = Some(id.clone());
            id.into()
        } else {
            c.client_id.as_str().into()
        };
        let who = Identity {
            client_id: client_id.clone(),
            username: user.clone(),
        };
        // The will is a PUBLISH the client makes now for later: the same write rights
        // apply (checked again when it is published; see `Inner::publish_will`).
        if let Some(w) = &c.will
            && !inner.may_write(&who, w.topic.as_str())
        {
            Stats::inc(&inner.stats.publish_denied);
            return Err(Violation::new(
                ReasonCode::NotAuthorized,
                "",
                "not authorized to publish to the will topic",
            ));
        }
        tracing::Span::current().record("client_id", &*client_id);
        let requested_expiry = if v5 {
            c.properties.session_expiry_interval.unwrap_or(0)
        } else if c.clean_start {
            0
        } else {
            cfg.persistent_client_expiration
                .map_or(u32::MAX, |d| u32::try_from(d.as_secs()).unwrap_or(u32::MAX))
        };
        let expiry = requested_expiry.min(cfg.max_session_expiry_interval);

        // Keep alive: v5 gets Server Keep Alive when we override [MQTT-3.2.2-21].
        let server_keep_alive = (v5
            && (c.keep_alive > cfg.max_keepalive
                || (c.keep_alive == 0 && cfg.max_keepalive < u16::MAX)))
            .then_some(cfg.max_keepalive);
        let keep_alive = server_keep_alive.unwrap_or(c.keep_alive);
        let conn_info = Arc::new(ConnInfo::new(
            peer.clone(),
            listener,
            user.clone(),
            v,
            keep_alive,
            c.clean_start,
        ));
        let conn_id = inner.next_conn_id.fetch_add(1, Ordering::Relaxed);
        let (session, present) = match attach_session(
            &inner,
            &client_id,
            c.clean_start,
            v,
            expiry,
            conn_id,
            conn_info.clone(),
            now,
        ) {
            Ok(attached) => attached,
            Err(e) => {
                let why = match e {
                    // Neither resumed nor taken over, nor discarded by a clean start: the
                    // owner's session and live connection stay as they are.
                    NotAttached::OtherOwner => Violation::new(
                        ReasonCode::NotAuthorized,
                        "",
                        "client id in use by another user's session",
                    ),
                    NotAttached::Full(full) => {
                        Stats::inc(&inner.stats.sessions_refused);
                        match full {
                            Full::Sessions => Violation::new(
                                ReasonCode::QuotaExceeded,
                                "max_sessions",
                                "max_sessions reached",
                            ),
                            Full::User => Violation::new(
                                ReasonCode::QuotaExceeded,
                                "max_sessions_per_user",
                                "max_sessions_per_user reached",
                            ),
                        }
                    }
                };
                return Err(why);
            }
        };
        inner.persist_session(&session, true);

        // [MQTT-3.1.2-22]: 1.5 times the keep alive without a packet closes the connection.

        let mut props = Properties::default();
        if v5 {
            if expiry != requested_expiry {
                props.session_expiry_interval = Some(expiry);
            }
            if cfg.max_inflight_messages < u16::MAX {
                props.receive_maximum = Some(cfg.max_inflight_messages.max(1));
            }
            if cfg.max_qos < QoS::ExactlyOnce {
                props.maximum_qos = Some(cfg.max_qos);
            }
            props.retain_available = Some(cfg.retain_available);
            if cfg.message_size_limit < halyard_codec::MAX_PACKET_SIZE {
                props.maximum_packet_size = Some(cfg.message_size_limit);
            }
            if cfg.topic_alias_maximum > 0 {
                props.topic_alias_maximum = Some(cfg.topic_alias_maximum);
            }
            props.assigned_client_identifier = assigned.as_deref().map(Into::into);
            props.server_keep_alive = server_keep_alive;
            props.wildcard_subscription_available = Some(true);
            props.subscription_identifier_available = Some(true);
            props.shared_subscription_available = Some(cfg.shared_subscriptions);
            if let Some((name, _)) = &enhanced {
                props.authentication_method = Some(name.clone());
                props.authentication_data = auth_reply.map(Bytes::from);
            }
        }
        let ack = Packet::ConnAck(ConnAck {
            session_present: present,
            reason: ReasonCode::Success,
            properties: props,
        });
        let mut wbuf = BytesMut::with_capacity(ack.encoded_len(v));
        // Our own packet, valid by construction.
        let _ = ack.encode(v, &mut wbuf);
        Stats::inc(&inner.stats.connections_total);
        let open = inner
            .stats
            .connections_current
            .fetch_add(1, Ordering::Relaxed)
            + 1;
        inner
            .stats
            .connections_maximum
            .fetch_max(open, Ordering::Relaxed);
        info!(
            %peer, client_id = %client_id, user = user.as_deref(), protocol = version_name(v),
            clean_start = c.clean_start, keep_alive, session_present = present, "client connected"
        );
        inner.monitor.emit_conn(|| Event::Connected {
            peer: peer.to_string(),
            client_id: client_id.to_string(),
            protocol: version_name(v),
        });

        let will = c.will.as_ref().map(|w| {
            // Copied out of the CONNECT's read buffer (the will lives as long as the
            // session; see `TopicName::copy_with`).
            let (topic, payload) = w.topic.copy_with(&w.payload);
            Arc::new(Message::new(
                inner.message_id(),
                topic,
                payload,
                w.qos,
                w.retain,
                crate::message::owned_properties(w.properties.clone()),
                Some(client_id.clone()),
                now,
            ))
        });
        let client_receive_max = c.properties.receive_maximum.unwrap_or(if v5 {
            u16::MAX
        } else {
            cfg.max_inflight_messages.max(1)
        });
        // The CONNECT buffer goes unless a pipelined packet is still in it: an idle
        // connection then holds no read buffer until bytes arrive (see `poll_io`), and a
        // busy one grows its buffer as its reads fill it.
        let rbuf = if rbuf.is_empty() {
            BytesMut::new()
        } else {
            rbuf
        };
        let kicks_seen = session.kicks();
        let mut proto = Proto {
            cfg: cfg.clone(),
            live: cfg.clone(),
            batch: None,
            rbuf,
            wbuf,
            info: conn_info,
            version: v,
            at: Attachment {
                session,
                conn_id,
                kicks_seen: AtomicU32::new(kicks_seen),
                wake_armed: std::sync::atomic::AtomicBool::new(false),
            },
            rx_ns: inner.ns_at(now),
            next_id: 0,
            ids_left: 0,
            client_receive_max,
            client_max_packet: c
                .properties
                .maximum_packet_size
                .unwrap_or(halyard_codec::MAX_PACKET_SIZE),
            aliases: None,
            alias_out_max: cfg
                .topic_alias_maximum_outbound
                .min(c.properties.topic_alias_maximum.unwrap_or(0)),
            rare: (will.is_some() || enhanced.is_some()).then(|| {
                Box::new(Rare {
                    will,
                    will_delay: c.will.as_ref().and_then(|w| w.delay_interval).unwrap_or(0),
                    enhanced,
                    reauth: None,
                })
            }),
            routes: None,
            durable_seen: std::cell::Cell::new(0),
            held: None,
            acl: AclCache::new(),
            rate: PublishRate::new(&cfg, now).map(Box::new),
            read_chunk: 0,
            flags: {
                let mut f = Flags::default();
                f.set(Flags::KEEPALIVE, keep_alive > 0);
                f.set(Flags::EXPIRY_ZERO, requested_expiry == 0);
                f.set(Flags::DURABLE, inner.durable_tracked());
                f
            },
            inner,
        };
        if present {
            proto.resend_inflight(now);
        }
        Ok(proto)
    }
}
