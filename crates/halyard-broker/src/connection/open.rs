//! Opening a client's protocol state from its CONNECT: the checks before authentication
//! (`admit`), then, once authenticated, the will's rights, the session attach (resume,
//! takeover or new) and the CONNACK (`Proto::open`). Synchronous, the time passed in:
//! the socket driver (`handshake.rs`) and the simulator both come here.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};

use halyard_codec::{
    BytesMut, ConnAck, Connect, Packet, Properties, ProtocolVersion, QoS, ReasonCode,
};
use halyard_transport::Event;

use crate::auth::{EnhancedAuth, Identity};
use crate::registry::Full;
use halyard_codec::{ByteString, Bytes};
use tokio::time::Instant;
use tracing::info;

use super::*;
use crate::lifecycle::{NotAttached, assign_client_id, attach_session};
use crate::message::Message;
use crate::session::{ConnInfo, INTERNAL_CLIENT_ID_PREFIX, Peer};
use crate::state::{Inner, version_name};
use crate::stats::Stats;

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
    } else if c.client_id.as_str().starts_with(INTERNAL_CLIENT_ID_PREFIX)
        && admission.cert != CertAuth::Internal
    {
        // The broker's own sessions (bridges' store-and-forward queues): a client that
        // took one over would read and acknowledge away another broker's messages.
        return Err(Violation::new(
            ReasonCode::ClientIdentifierNotValid,
            "reserved client id",
            "client ids starting with $bridge/ belong to the broker's bridges",
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

/// What authentication established for `Proto::open`.
pub(crate) struct Verified {
    /// The verified user name; `None`: anonymous.
    pub(crate) user: Option<Arc<str>>,
    /// The enhanced authentication method, kept for re-authentication.
    pub(crate) enhanced: Option<(ByteString, Arc<dyn EnhancedAuth>)>,
    /// The method's last data, for the CONNACK.
    pub(crate) auth_reply: Option<Vec<u8>>,
    /// An in-process client (`CertAuth::Internal`): no ACL applies.
    pub(crate) trusted: bool,
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
        peer: &Peer,
        listener: Arc<str>,
        rbuf: BytesMut,
        now: Instant,
    ) -> Result<Proto, Violation> {
        let Verified {
            user,
            enhanced,
            auth_reply,
            trusted,
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
        // The broker's own sessions (bridge queues) are bounded by their own limits, not
        // by the cap: a bridge's queue must outlive a long outage of this broker.
        let expiry = if trusted {
            requested_expiry
        } else {
            requested_expiry.min(cfg.max_session_expiry_interval)
        };

        // Keep alive: v5 gets Server Keep Alive when we override [MQTT-3.2.2-21].
        let server_keep_alive = (v5
            && (c.keep_alive > cfg.max_keepalive
                || (c.keep_alive == 0 && cfg.max_keepalive < u16::MAX)))
            .then_some(cfg.max_keepalive);
        let keep_alive = server_keep_alive.unwrap_or(c.keep_alive);
        let mut conn_info = ConnInfo::new(
            peer.clone(),
            listener,
            user.clone(),
            v,
            keep_alive,
            c.clean_start,
        );
        conn_info.bridge = c.bridge && !v5;
        let conn_info = Arc::new(conn_info);
        let conn_id = inner.next_conn_id.fetch_add(1, Ordering::Relaxed);
        let (session, present) =
            match attach_session(&inner, &client_id, expiry, conn_id, conn_info.clone(), now) {
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
        inner.persist_session(&session, None);

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
                f.set(Flags::TRUSTED, trusted);
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
