//! `/api/v1` handlers. Every response is JSON; errors are `{"code", "message"}`.

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use bytes::Bytes;
use halyard_broker::admin::{ClientInfo, MessageInfo, PublishError, SubscriptionInfo, Tapped};
use halyard_broker::{Event, MonitorEvent};
use halyard_codec::{ByteString, ProtocolVersion, PublishProperties, QoS, TopicFilter, TopicName};
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use serde_json::{Value, json};

use super::{ApiError, Body, State, json_response, query, read_json, sse, sse_event};

/// Default and largest page sizes of list endpoints.
const DEFAULT_LIMIT: usize = 100;
const MAX_LIMIT: usize = 10_000;

pub(super) async fn dispatch(
    state: &Arc<State>,
    pattern: &str,
    params: Vec<String>,
    req: Request<Incoming>,
) -> Result<Response<Body>, ApiError> {
    let server = &state.server;
    let broker = &server.broker;
    let ok = |v: Value| Ok(json_response(StatusCode::OK, &v));
    let q = query(&req);
    let param = |name: &str| q.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str());
    let method = req.method().as_str().to_string();
    match (method.as_str(), pattern) {
        ("GET", "/api/v1/stats") => ok(super::metrics::stats_json(server).await),
        ("GET", "/api/v1/clients") => {
            let (page, limit) = paging(&q)?;
            let like = param("like").unwrap_or("").to_lowercase();
            let username = param("username");
            let connected = match param("connected") {
                None | Some("") => None,
                Some("true") => Some(true),
                Some("false") => Some(false),
                Some(v) => {
                    return Err(ApiError::bad_request(format!(
                        "connected must be true or false, not {v}"
                    )));
                }
            };
            let all: Vec<ClientInfo> = broker
                .clients()
                .into_iter()
                .filter(|c| like.is_empty() || c.client_id.to_lowercase().contains(&like))
                .filter(|c| {
                    username.is_none_or(|u| {
                        c.conn.as_ref().and_then(|i| i.username.as_deref()) == Some(u)
                    })
                })
                .filter(|c| connected.is_none_or(|want| c.connected == want))
                .collect();
            ok(page_of(all.iter().map(client_json), page, limit))
        }
        ("GET", "/api/v1/clients/{client_id}") => {
            let id = &params[0];
            let (c, subs) = broker
                .client(id)
                .ok_or_else(|| ApiError::not_found(format!("no session for client id {id}")))?;
            let mut v = client_json(&c);
            v["subscriptions"] = subs.iter().map(subscription_json).collect();
            ok(v)
        }
        ("DELETE", "/api/v1/clients/{client_id}") => {
            let id = &params[0];
            if broker.kick(id) {
                Ok(json_response(
                    StatusCode::OK,
                    &json!({"client_id": id, "kicked": true}),
                ))
            } else {
                Err(ApiError::not_found(format!("client {id} is not connected")))
            }
        }
        ("GET", "/api/v1/subscriptions") => {
            let (page, limit) = paging(&q)?;
            let client = param("client_id");
            let like = param("like").unwrap_or("");
            let all: Vec<SubscriptionInfo> = broker
                .subscriptions()
                .into_iter()
                .filter(|s| client.is_none_or(|c| &*s.client_id == c))
                .filter(|s| s.filter.contains(like))
                .collect();
            ok(page_of(all.iter().map(subscription_json), page, limit))
        }
        ("GET", "/api/v1/retained") => {
            let (page, limit) = paging(&q)?;
            let f = param("filter").unwrap_or("#");
            let filter = TopicFilter::new(f)
                .map_err(|e| ApiError::bad_request(format!("filter {f:?}: {e}")))?;
            let all = broker.retained(&filter);
            ok(page_of(all.iter().map(message_json), page, limit))
        }
        ("GET", "/api/v1/retained/{topic}") => {
            let topic = &params[0];
            let filter = exact_filter(topic)?;
            let m =
                broker.retained(&filter).into_iter().next().ok_or_else(|| {
                    ApiError::not_found(format!("no retained message on {topic}"))
                })?;
            ok(message_json(&m))
        }
        ("DELETE", "/api/v1/retained/{topic}") => {
            let topic = &params[0];
            if broker.delete_retained(topic) {
                ok(json!({"topic": topic, "deleted": true}))
            } else {
                Err(ApiError::not_found(format!(
                    "no retained message on {topic}"
                )))
            }
        }
        ("GET", "/api/v1/listeners") => {
            let v: Vec<Value> = server.listeners().await.iter().map(listener_json).collect();
            ok(json!({ "data": v }))
        }
        ("POST", "/api/v1/listeners/{name}/stop") => {
            let changed = server
                .stop_listener(&params[0])
                .await
                .map_err(ApiError::not_found)?;
            ok(json!({"listener": params[0], "changed": changed, "state": "stopped"}))
        }
        ("POST", "/api/v1/listeners/{name}/start") => {
            let changed = server.start_listener(&params[0]).await.map_err(|e| {
                if e.starts_with("no listener") {
                    ApiError::not_found(e)
                } else {
                    ApiError::new(StatusCode::CONFLICT, "LISTENER_FAILED", e)
                }
            })?;
            ok(json!({"listener": params[0], "changed": changed, "state": "listening"}))
        }
        ("GET", "/api/v1/bridges") => ok(json!({ "data": server.bridges.status() })),
        ("GET", "/api/v1/bridges/{name}") => match server.bridges.get(&params[0]) {
            Some(b) => ok(json!(b)),
            None => Err(ApiError::not_found(format!("no bridge {}", params[0]))),
        },
        ("POST", "/api/v1/bridges") => {
            // The body is a `[[bridge]]` table as JSON; unknown keys are refused.
            let body = read_json(req).await?;
            let cfg: halyard_bridge::BridgeConfig = serde_json::from_value(body)
                .map_err(|e| ApiError::bad_request(format!("bridge: {e}")))?;
            let bridge = cfg
                .validate()
                .map_err(|e| ApiError::bad_request(format!("bridge `{}`: {e}", cfg.name)))?;
            let created = server
                .bridges
                .add(bridge)
                .await
                .map_err(|e| ApiError::new(StatusCode::CONFLICT, "BRIDGE_REFUSED", e))?;
            let status = if created {
                StatusCode::CREATED
            } else {
                StatusCode::OK
            };
            Ok(json_response(status, &json!(server.bridges.get(&cfg.name))))
        }
        ("DELETE", "/api/v1/bridges/{name}") => {
            server
                .bridges
                .remove(&params[0])
                .await
                .map_err(ApiError::not_found)?;
            ok(json!({"bridge": params[0], "deleted": true}))
        }
        ("POST", "/api/v1/bridges/{name}/pause") | ("POST", "/api/v1/bridges/{name}/resume") => {
            let paused = pattern.ends_with("/pause");
            server
                .bridges
                .pause(&params[0], paused)
                .map_err(ApiError::not_found)?;
            ok(json!({"bridge": params[0], "paused": paused}))
        }
        ("POST", "/api/v1/publish") => {
            let body = read_json(req).await?;
            publish(state, &body).await
        }
        ("POST", "/api/v1/reload") => match server.reload().await {
            Ok(r) => ok(json!({
                "reloaded": true,
                "listeners_added": r.listeners_added,
                "listeners_removed": r.listeners_removed,
                "bridges_added": r.bridges_added,
                "bridges_changed": r.bridges_changed,
                "bridges_removed": r.bridges_removed,
                "tls_reloaded": r.tls_reloaded,
                "log_level": r.log_level,
            })),
            Err(why) => Err(ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "RELOAD_FAILED",
                format!("nothing changed: {why}"),
            )),
        },
        ("GET", "/api/v1/events") => Ok(events(state)),
        ("GET", "/api/v1/tap") => {
            let f = param("filter").unwrap_or("#");
            let filter = TopicFilter::new(f)
                .map_err(|e| ApiError::bad_request(format!("filter {f:?}: {e}")))?;
            Ok(tap(state, filter))
        }
        ("GET", "/api/v1/openapi.json") => Ok(super::text_response(
            StatusCode::OK,
            "application/json",
            super::OPENAPI,
        )),
        _ => Err(ApiError::not_found("no such endpoint")),
    }
}

fn paging(q: &[(String, String)]) -> Result<(usize, usize), ApiError> {
    let num = |name: &str, default: usize| -> Result<usize, ApiError> {
        match q.iter().find(|(k, _)| k == name) {
            None => Ok(default),
            Some((_, v)) => v
                .parse::<usize>()
                .map_err(|_| ApiError::bad_request(format!("{name} must be a number, not {v:?}"))),
        }
    };
    let page = num("page", 1)?;
    if page == 0 {
        return Err(ApiError::bad_request("page starts at 1"));
    }
    let limit = num("limit", DEFAULT_LIMIT)?;
    if limit == 0 || limit > MAX_LIMIT {
        return Err(ApiError::bad_request(format!(
            "limit must be 1..={MAX_LIMIT}"
        )));
    }
    Ok((page, limit))
}

fn page_of(items: impl ExactSizeIterator<Item = Value>, page: usize, limit: usize) -> Value {
    let count = items.len();
    let data: Vec<Value> = items.skip((page - 1) * limit).take(limit).collect();
    json!({"data": data, "meta": {"page": page, "limit": limit, "count": count}})
}

fn exact_filter(topic: &str) -> Result<TopicFilter, ApiError> {
    if topic.contains(['+', '#']) {
        return Err(ApiError::bad_request("a topic name cannot hold wildcards"));
    }
    TopicFilter::new(topic).map_err(|e| ApiError::bad_request(format!("topic {topic:?}: {e}")))
}

fn unix(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

fn protocol_name(v: ProtocolVersion) -> &'static str {
    match v {
        ProtocolVersion::V3_1 => "3.1",
        ProtocolVersion::V3_1_1 => "3.1.1",
        ProtocolVersion::V5 => "5.0",
    }
}

fn client_json(c: &ClientInfo) -> Value {
    let conn = c.conn.as_deref();
    json!({
        "client_id": &*c.client_id,
        "connected": c.connected,
        "username": conn.and_then(|i| i.username.as_deref()),
        "peer": conn.map(|i| i.peer.to_string()),
        "listener": conn.map(|i| &*i.listener),
        "protocol": protocol_name(c.protocol),
        "keep_alive": conn.map(|i| i.keep_alive),
        "clean_start": conn.map(|i| i.clean_start),
        "connected_at": conn.map(|i| unix(i.connected_at())),
        "disconnected_at": c.disconnected_at.map(unix),
        "session_expiry_interval": c.expiry_interval,
        "subscriptions_count": c.subscriptions,
        "queued": c.queued,
        "inflight": c.inflight,
        "awaiting_rel": c.inbound_qos2,
        "will_pending": c.will_pending,
    })
}

fn subscription_json(s: &SubscriptionInfo) -> Value {
    json!({
        "client_id": &*s.client_id,
        "filter": s.filter,
        "qos": s.qos as u8,
        "no_local": s.no_local,
        "retain_as_published": s.retain_as_published,
        "retain_handling": s.retain_handling,
        "subscription_identifier": s.identifier,
    })
}

/// A payload as text when it is UTF-8, else base64 (`payload_encoding` says which).
fn payload_json(p: &Bytes) -> (Value, &'static str) {
    match std::str::from_utf8(p) {
        Ok(s) => (Value::String(s.to_string()), "plain"),
        Err(_) => (
            Value::String(base64::engine::general_purpose::STANDARD.encode(p)),
            "base64",
        ),
    }
}

pub(super) fn message_json(m: &MessageInfo) -> Value {
    let (payload, encoding) = payload_json(&m.payload);
    let p = &m.properties;
    let users: Vec<Value> = p
        .user_properties
        .iter()
        .map(|(k, v)| json!([&k[..], &v[..]]))
        .collect();
    json!({
        "topic": m.topic,
        "payload": payload,
        "payload_encoding": encoding,
        "payload_bytes": m.payload.len(),
        "qos": m.qos as u8,
        "retain": m.retain,
        "from_client_id": m.origin.as_deref(),
        "expires_in": m.expires_in,
        "properties": {
            "payload_format_indicator": p.payload_format_indicator,
            "content_type": p.content_type.as_deref(),
            "response_topic": p.response_topic.as_ref().map(|t| t.as_str()),
            "correlation_data": p.correlation_data.as_ref().map(|c| base64::engine::general_purpose::STANDARD.encode(c)),
            "message_expiry_interval": p.message_expiry_interval,
            "user_properties": users,
        },
    })
}

fn listener_json(l: &crate::server::ListenerView) -> Value {
    json!({
        "name": l.name,
        "scheme": l.scheme,
        "local_address": l.local,
        "state": l.state,
        "error": l.error,
        "restarts": l.restarts,
        "accepted": l.accepted,
        "refused": l.refused,
        "handshake_failed": l.handshake_failed,
        "connections": l.open,
    })
}

async fn publish(state: &Arc<State>, body: &Value) -> Result<Response<Body>, ApiError> {
    const FIELDS: [&str; 6] = [
        "topic",
        "payload",
        "payload_encoding",
        "qos",
        "retain",
        "properties",
    ];
    let Some(fields) = body.as_object() else {
        return Err(ApiError::bad_request("the body must be a JSON object"));
    };
    // A misspelt field must not change what is published (`paylod` would have published
    // an empty payload, and with `retain` deleted the retained message).
    if let Some(k) = fields.keys().find(|k| !FIELDS.contains(&k.as_str())) {
        return Err(ApiError::bad_request(format!(
            "unknown field `{k}` (expected one of {})",
            FIELDS.join(", ")
        )));
    }
    if body["retain"].as_bool() == Some(true) && body["payload"].is_null() {
        return Err(ApiError::bad_request(
            "a retained publish needs a payload; to delete the retained message, send \"payload\": \"\" explicitly",
        ));
    }
    let topic = body["topic"]
        .as_str()
        .ok_or_else(|| ApiError::bad_request("topic (a string) is required"))?;
    let encoding = body["payload_encoding"].as_str().unwrap_or("plain");
    let payload = match (&body["payload"], encoding) {
        (Value::Null, _) => Bytes::new(),
        (Value::String(s), "plain") => Bytes::from(s.clone()),
        (Value::String(s), "base64") => Bytes::from(
            base64::engine::general_purpose::STANDARD
                .decode(s)
                .map_err(|e| ApiError::bad_request(format!("payload is not base64: {e}")))?,
        ),
        (_, "plain" | "base64") => return Err(ApiError::bad_request("payload must be a string")),
        (_, e) => {
            return Err(ApiError::bad_request(format!(
                "payload_encoding must be plain or base64, not {e}"
            )));
        }
    };
    let qos = match body["qos"].as_u64().unwrap_or(0) {
        0 => QoS::AtMostOnce,
        1 => QoS::AtLeastOnce,
        2 => QoS::ExactlyOnce,
        q => {
            return Err(ApiError::bad_request(format!(
                "qos must be 0, 1 or 2, not {q}"
            )));
        }
    };
    let retain = body["retain"].as_bool().unwrap_or(false);
    let props = properties(&body["properties"])?;
    match state
        .server
        .broker
        .publish(topic, payload, qos, retain, props)
        .await
    {
        Ok(matched) => Ok(json_response(
            StatusCode::OK,
            &json!({"topic": topic, "matched_subscriptions": matched}),
        )),
        Err(e @ PublishError::BadTopic(_)) => Err(ApiError::bad_request(e.to_string())),
        Err(e @ PublishError::NotSupported(_)) => Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "NOT_SUPPORTED",
            e.to_string(),
        )),
    }
}

fn properties(v: &Value) -> Result<PublishProperties, ApiError> {
    let mut p = PublishProperties::default();
    let Some(o) = v.as_object() else {
        return if v.is_null() {
            Ok(p)
        } else {
            Err(ApiError::bad_request("properties must be an object"))
        };
    };
    for (k, val) in o {
        let bad = || ApiError::bad_request(format!("properties.{k}: wrong type"));
        match k.as_str() {
            "content_type" => {
                p.content_type = Some(ByteString::from(val.as_str().ok_or_else(bad)?))
            }
            "message_expiry_interval" => {
                p.message_expiry_interval = Some(
                    val.as_u64()
                        .and_then(|n| u32::try_from(n).ok())
                        .ok_or_else(bad)?,
                );
            }
            "payload_format_indicator" => {
                p.payload_format_indicator = Some(val.as_bool().ok_or_else(bad)?)
            }
            "response_topic" => {
                let t = val.as_str().ok_or_else(bad)?;
                p.response_topic = Some(TopicName::new(t).map_err(|e| {
                    ApiError::bad_request(format!("properties.response_topic: {e}"))
                })?);
            }
            "correlation_data" => {
                let s = val.as_str().ok_or_else(bad)?;
                p.correlation_data = Some(Bytes::from(s.to_string()));
            }
            "user_properties" => match val {
                Value::Object(m) => {
                    for (uk, uv) in m {
                        p.user_properties.push((
                            ByteString::from(uk.as_str()),
                            ByteString::from(uv.as_str().ok_or_else(bad)?),
                        ));
                    }
                }
                Value::Array(a) => {
                    for pair in a {
                        let (Some(uk), Some(uv)) = (pair[0].as_str(), pair[1].as_str()) else {
                            return Err(bad());
                        };
                        p.user_properties
                            .push((ByteString::from(uk), ByteString::from(uv)));
                    }
                }
                _ => return Err(bad()),
            },
            other => {
                return Err(ApiError::bad_request(format!("unknown property {other}")));
            }
        }
    }
    Ok(p)
}

fn event_json(e: &MonitorEvent) -> (&'static str, Value) {
    let at = unix(e.at);
    let (kind, mut v) = match &e.kind {
        Event::Listening { listener, local } => (
            "listening",
            json!({"listener": &**listener, "local": local}),
        ),
        Event::Accepted { listener, peer } => {
            ("accepted", json!({"listener": &**listener, "peer": peer}))
        }
        Event::Refused {
            listener,
            peer,
            why,
        } => (
            "refused",
            json!({"listener": &**listener, "peer": peer, "why": why}),
        ),
        Event::HandshakeFailed {
            listener,
            peer,
            error,
        } => (
            "handshake_failed",
            json!({"listener": &**listener, "peer": peer, "error": error}),
        ),
        Event::Connected {
            peer,
            client_id,
            protocol,
        } => (
            "connected",
            json!({"peer": peer, "client_id": client_id, "protocol": protocol}),
        ),
        Event::AuthFailed {
            peer,
            client_id,
            reason,
        } => (
            "auth_failed",
            json!({"peer": peer, "client_id": client_id, "reason": reason}),
        ),
        Event::Disconnected {
            peer,
            client_id,
            reason,
        } => (
            "disconnected",
            json!({"peer": peer, "client_id": client_id, "reason": reason}),
        ),
        Event::ListenerCrashed {
            listener,
            error,
            restart_in,
        } => (
            "listener_crashed",
            json!({"listener": &**listener, "error": error, "restart_in_ms": restart_in.as_millis() as u64}),
        ),
        Event::ListenerRestarted { listener, attempt } => (
            "listener_restarted",
            json!({"listener": &**listener, "attempt": attempt}),
        ),
        Event::ListenerFailed { listener, .. } => {
            ("listener_failed", json!({"listener": &**listener}))
        }
        other => ("other", json!({"event": format!("{other:?}")})),
    };
    v["at"] = json!(at);
    (kind, v)
}

/// Monitor events as Server-Sent Events until the client goes or the broker stops.
fn events(state: &Arc<State>) -> Response<Body> {
    let (tx, resp) = sse();
    let mut rx = state.server.broker.monitor().subscribe();
    let mut shutdown = state.server.broker.shutdown_signal();
    tokio::spawn(async move {
        if tx.send(sse_event("hello", &json!({}))).await.is_err() {
            return;
        }
        loop {
            let ev = tokio::select! {
                _ = super::shutdown_begins(&mut shutdown) => break,
                _ = tx.closed() => break,
                r = rx.recv() => r,
            };
            let chunk = match ev {
                Ok(e) => {
                    let (kind, v) = event_json(&e);
                    sse_event(kind, &v)
                }
                Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                    sse_event("lagged", &json!({"skipped": n}))
                }
                Err(tokio::sync::broadcast::error::RecvError::Closed) => break,
            };
            if tx.send(chunk).await.is_err() {
                break;
            }
        }
    });
    resp
}

/// Messages routed on `filter`, live, as Server-Sent Events.
fn tap(state: &Arc<State>, filter: TopicFilter) -> Response<Body> {
    let (tx, resp) = sse();
    let mut tap = state.server.broker.tap();
    let mut shutdown = state.server.broker.shutdown_signal();
    tokio::spawn(async move {
        if tx
            .send(sse_event("hello", &json!({"filter": filter.to_string()})))
            .await
            .is_err()
        {
            return;
        }
        loop {
            let t = tokio::select! {
                _ = super::shutdown_begins(&mut shutdown) => break,
                _ = tx.closed() => break,
                t = tap.recv(&filter) => t,
            };
            let chunk = match t {
                Tapped::Message(m) => sse_event("message", &message_json(&m)),
                Tapped::Skipped(n) => sse_event("lagged", &json!({"skipped": n})),
                Tapped::Closed => break,
            };
            // A slow page must not grow our memory: drop what it cannot take.
            match tx.try_send(chunk) {
                Ok(()) | Err(tokio::sync::mpsc::error::TrySendError::Full(_)) => {}
                Err(tokio::sync::mpsc::error::TrySendError::Closed(_)) => break,
            }
        }
    });
    resp
}
