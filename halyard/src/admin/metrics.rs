//! Prometheus metrics (text format 0.0.4) and the `/api/v1/stats` document, both from
//! one snapshot of the broker's counters. Names are `halyard_` plus what EMQX dashboards
//! already chart (`connections_count`, `messages_received`, `messages_qos1_sent`,
//! `bytes_received`, `sessions_count`, `subscriptions_count`, `retained_count`, ...).

use std::fmt::Write as _;

use serde_json::{Value, json};

use crate::server::Server;

/// Everything one scrape or stats call reports.
pub(crate) struct Snapshot {
    pub(crate) stats: halyard_broker::StatsSnapshot,
    pub(crate) gauges: halyard_broker::admin::Gauges,
    pub(crate) store: Option<halyard_store::StoreMetrics>,
    pub(crate) listeners: Vec<crate::server::ListenerView>,
    pub(crate) uptime_secs: u64,
}

pub(crate) async fn snapshot(server: &Server) -> Snapshot {
    let b = &server.broker;
    Snapshot {
        stats: b.stats(),
        gauges: b.gauges(),
        store: b.store_metrics(),
        listeners: server.listeners().await,
        uptime_secs: b.uptime().as_secs(),
    }
}

struct Out(String);

impl Out {
    fn family(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(self.0, "# HELP halyard_{name} {help}");
        let _ = writeln!(self.0, "# TYPE halyard_{name} {kind}");
    }
    fn one(&mut self, name: &str, kind: &str, help: &str, v: u64) {
        self.family(name, kind, help);
        let _ = writeln!(self.0, "halyard_{name} {v}");
    }
}

/// Escapes a label value (backslash, quote, newline).
fn label(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

pub(crate) async fn render(server: &Server) -> String {
    let s = snapshot(server).await;
    let (st, g) = (&s.stats, &s.gauges);
    let mut o = Out(String::with_capacity(8192));
    o.one(
        "uptime_seconds",
        "gauge",
        "Seconds since the broker started.",
        s.uptime_secs,
    );
    o.one(
        "connections_count",
        "gauge",
        "MQTT connections open now.",
        st.connections_current,
    );
    o.one(
        "connections_max",
        "gauge",
        "Most MQTT connections open at once since start.",
        st.connections_maximum,
    );
    o.one(
        "connections_total",
        "counter",
        "MQTT connections accepted (CONNACK success).",
        st.connections_total,
    );
    o.one(
        "connections_refused",
        "counter",
        "CONNECTs refused (credentials, limits, bad client id...).",
        st.connections_refused,
    );
    o.one(
        "client_auth_failure",
        "counter",
        "CONNECTs refused (same as connections_refused; EMQX's name).",
        st.connections_refused,
    );
    o.one(
        "sessions_count",
        "gauge",
        "Sessions held, connected or not.",
        g.sessions as u64,
    );
    o.one(
        "sessions_connected_count",
        "gauge",
        "Sessions with a connection attached.",
        g.sessions_connected as u64,
    );
    o.one(
        "sessions_expired",
        "counter",
        "Sessions discarded when their expiry ran out.",
        st.sessions_expired,
    );
    o.one(
        "subscriptions_count",
        "gauge",
        "Subscriptions held.",
        g.subscriptions as u64,
    );
    o.one(
        "retained_count",
        "gauge",
        "Retained messages held.",
        g.retained as u64,
    );
    o.one(
        "retained_bytes",
        "gauge",
        "Payload bytes of retained messages.",
        g.retained_bytes as u64,
    );
    o.one(
        "messages_received",
        "counter",
        "PUBLISH packets received from clients.",
        st.messages_received,
    );
    o.one(
        "messages_sent",
        "counter",
        "PUBLISH packets sent to clients.",
        st.messages_sent,
    );
    for (q, r, t) in [
        (0, st.messages_received_qos0, st.messages_sent_qos0),
        (1, st.messages_received_qos1, st.messages_sent_qos1),
        (2, st.messages_received_qos2, st.messages_sent_qos2),
    ] {
        o.one(
            &format!("messages_qos{q}_received"),
            "counter",
            &format!("QoS {q} PUBLISH packets received."),
            r,
        );
        o.one(
            &format!("messages_qos{q}_sent"),
            "counter",
            &format!("QoS {q} PUBLISH packets sent."),
            t,
        );
    }
    let dropped = dropped(st);
    o.one(
        "messages_dropped",
        "counter",
        "Messages not delivered to a subscriber (all reasons below).",
        dropped,
    );
    o.family(
        "messages_dropped_by_reason",
        "counter",
        "Messages or deliveries dropped, by reason.",
    );
    for (reason, v) in [
        ("no_subscribers", st.dropped_no_subscribers),
        ("queue_full", st.dropped_queue_full),
        ("qos0_evicted", st.dropped_qos0_evicted),
        ("offline_qos0", st.dropped_offline_qos0),
        ("too_large", st.dropped_too_large),
        ("expired", st.expired_messages),
        ("not_authorized", st.dropped_not_authorized),
        ("bridge_loop", st.bridge_loops_dropped),
    ] {
        let _ = writeln!(
            o.0,
            "halyard_messages_dropped_by_reason{{reason=\"{reason}\"}} {v}"
        );
    }
    o.one(
        "messages_queued",
        "gauge",
        "Messages queued for sessions, not yet sent.",
        g.queued as u64,
    );
    o.one(
        "messages_inflight",
        "gauge",
        "QoS 1/2 messages sent and not yet acknowledged.",
        g.inflight as u64,
    );
    o.one(
        "messages_alive",
        "gauge",
        "Messages held (queued, in flight or retained).",
        g.messages_alive as u64,
    );
    o.one(
        "messages_alive_bytes",
        "gauge",
        "Bytes of messages held, checked against max_memory_bytes.",
        st.message_bytes_alive,
    );
    o.one(
        "subscription_bytes",
        "gauge",
        "Bytes of subscriptions, checked against max_memory_bytes with the messages'.",
        g.subscription_bytes as u64,
    );
    o.one(
        "messages_retained_refused",
        "counter",
        "Retained messages not kept (max_retained_messages/bytes).",
        st.retained_refused,
    );
    o.one(
        "wills_published",
        "counter",
        "Will messages published.",
        st.wills_published,
    );
    o.one(
        "bytes_received",
        "counter",
        "Bytes read from MQTT clients.",
        st.bytes_received,
    );
    o.one(
        "bytes_sent",
        "counter",
        "Bytes written to MQTT clients.",
        st.bytes_sent,
    );
    o.one(
        "authorization_deny",
        "counter",
        "PUBLISH and SUBSCRIBE refused by the ACL.",
        st.publish_denied + st.subscribe_denied,
    );
    o.one(
        "protocol_errors",
        "counter",
        "Connections closed for a malformed packet or protocol violation.",
        st.protocol_errors,
    );
    o.one(
        "publish_throttled",
        "counter",
        "Times a client's reads paused for its publish rate limit.",
        st.publish_throttled,
    );
    o.one(
        "sessions_refused",
        "counter",
        "CONNECTs refused for max_sessions or max_sessions_per_user.",
        st.sessions_refused,
    );
    o.one(
        "properties_refused",
        "counter",
        "Messages and wills refused for max_user_properties or max_user_properties_bytes.",
        st.properties_refused,
    );
    o.one(
        "publish_paused_memory",
        "counter",
        "Times a publisher waited for max_memory_bytes.",
        st.publish_paused_memory,
    );

    o.family(
        "listener_up",
        "gauge",
        "1 while the listener accepts connections.",
    );
    for l in &s.listeners {
        let _ = writeln!(
            o.0,
            "halyard_listener_up{{listener=\"{}\"}} {}",
            label(&l.name),
            u8::from(l.state == "listening")
        );
    }
    for (name, help, f) in [
        (
            "listener_accepted",
            "Connections accepted by the listener (before handshakes).",
            (|l: &crate::server::ListenerView| l.accepted)
                as fn(&crate::server::ListenerView) -> u64,
        ),
        (
            "listener_refused",
            "Connections closed at once by the listener's limits.",
            |l| l.refused,
        ),
        (
            "listener_handshake_errors",
            "PROXY/TLS/WebSocket handshakes that failed.",
            |l| l.handshake_failed,
        ),
        (
            "listener_restarts",
            "Times the listener's supervisor restarted it.",
            |l| u64::from(l.restarts),
        ),
    ] {
        o.family(name, "counter", help);
        for l in &s.listeners {
            let _ = writeln!(
                o.0,
                "halyard_{name}{{listener=\"{}\"}} {}",
                label(&l.name),
                f(l)
            );
        }
    }
    o.family(
        "listener_connections",
        "gauge",
        "Connections open through the listener.",
    );
    for l in &s.listeners {
        let _ = writeln!(
            o.0,
            "halyard_listener_connections{{listener=\"{}\"}} {}",
            label(&l.name),
            l.open
        );
    }

    bridge_metrics(&mut o, &server.bridges.status());

    if let Some(m) = &s.store {
        o.one(
            "store_commits",
            "counter",
            "Group commits written by the store.",
            m.commits,
        );
        o.one(
            "store_ops",
            "counter",
            "Records written by the store.",
            m.ops,
        );
        o.one(
            "store_written_bytes",
            "counter",
            "Bytes appended to the store's log.",
            m.bytes_written,
        );
        o.one(
            "store_compactions",
            "counter",
            "Store compactions.",
            m.compactions,
        );
        o.one(
            "store_disk_bytes",
            "gauge",
            "Bytes of the store's log and snapshot.",
            m.disk_bytes,
        );
        o.one(
            "store_pending_batches",
            "gauge",
            "Batches waiting for the store's writer.",
            m.pending_batches,
        );
        o.family(
            "store_sync_seconds",
            "histogram",
            "fsync latency of the store's commits.",
        );
        let mut cumulative = 0;
        for (i, bound) in halyard_store::SYNC_BUCKETS_MICROS.iter().enumerate() {
            cumulative += m.sync_buckets.get(i).copied().unwrap_or(0);
            let _ = writeln!(
                o.0,
                "halyard_store_sync_seconds_bucket{{le=\"{}\"}} {cumulative}",
                *bound as f64 / 1e6
            );
        }
        let _ = writeln!(
            o.0,
            "halyard_store_sync_seconds_bucket{{le=\"+Inf\"}} {}",
            m.syncs
        );
        let _ = writeln!(
            o.0,
            "halyard_store_sync_seconds_sum {}",
            m.sync_micros as f64 / 1e6
        );
        let _ = writeln!(o.0, "halyard_store_sync_seconds_count {}", m.syncs);
    }
    o.0
}

/// Messages that did not reach a subscriber, all reasons.
/// Per-bridge families, labelled `bridge="<name>"`.
fn bridge_metrics(o: &mut Out, bridges: &[halyard_bridge::BridgeStatus]) {
    type Get = fn(&halyard_bridge::BridgeStatus) -> u64;
    let families: [(&str, &str, &str, Get); 8] = [
        (
            "bridge_up",
            "gauge",
            "1 while the bridge's link to its remote is up.",
            |b| u64::from(b.state == "connected"),
        ),
        (
            "bridge_paused",
            "gauge",
            "1 while the bridge is paused.",
            |b| u64::from(b.state == "paused"),
        ),
        (
            "bridge_queue_messages",
            "gauge",
            "Messages not yet acknowledged by the remote (queued here, held or in flight).",
            |b| b.queue_depth as u64,
        ),
        (
            "bridge_queue_bytes",
            "gauge",
            "Bytes queued for the remote in the bridge's local session.",
            |b| b.queue_bytes as u64,
        ),
        (
            "bridge_inflight_messages",
            "gauge",
            "Messages sent to the remote and not yet acknowledged.",
            |b| b.in_flight as u64,
        ),
        (
            "bridge_connects_total",
            "counter",
            "Links to the remote established.",
            |b| b.connects,
        ),
        (
            "bridge_forwarded_out_total",
            "counter",
            "Messages sent to the remote.",
            |b| b.forwarded_out,
        ),
        (
            "bridge_forwarded_in_total",
            "counter",
            "Messages received from the remote and published here.",
            |b| b.forwarded_in,
        ),
    ];
    for (name, kind, help, get) in families {
        o.family(name, kind, help);
        for b in bridges {
            let _ = writeln!(
                o.0,
                "halyard_{name}{{bridge=\"{}\"}} {}",
                label(&b.name),
                get(b)
            );
        }
    }
    o.family(
        "bridge_dropped_total",
        "counter",
        "Messages a bridge dropped, by reason.",
    );
    for b in bridges {
        let d = &b.dropped;
        for (reason, v) in [
            ("queue_full_oldest", d.queue_full_oldest),
            ("queue_full_new", d.queue_full_new),
            ("queue_full_refused", d.queue_full_refused),
            ("too_large", d.too_large),
            ("remote_refused", d.remote_refused),
            ("loop", d.looped),
            ("unmapped", d.unmapped),
            ("qos0_offline", d.qos0_offline),
            ("expired", d.expired),
        ] {
            let _ = writeln!(
                o.0,
                "halyard_bridge_dropped_total{{bridge=\"{}\",reason=\"{reason}\"}} {v}",
                label(&b.name)
            );
        }
    }
}

pub(crate) fn dropped(st: &halyard_broker::StatsSnapshot) -> u64 {
    st.dropped_no_subscribers
        + st.dropped_queue_full
        + st.dropped_qos0_evicted
        + st.dropped_offline_qos0
        + st.dropped_too_large
        + st.expired_messages
}

/// The `/api/v1/stats` document (the dashboard polls it every second).
pub(crate) async fn stats_json(server: &Server) -> Value {
    let s = snapshot(server).await;
    let (st, g) = (&s.stats, &s.gauges);
    json!({
        "version": env!("CARGO_PKG_VERSION"),
        "uptime_seconds": s.uptime_secs,
        "now_ms": std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64),
        "connections": {
            "current": st.connections_current,
            "maximum": st.connections_maximum,
            "total": st.connections_total,
            "refused": st.connections_refused,
        },
        "sessions": {"count": g.sessions, "connected": g.sessions_connected, "expired": st.sessions_expired},
        "subscriptions": {"count": g.subscriptions},
        "retained": {"count": g.retained, "bytes": g.retained_bytes},
        "messages": {
            "received": st.messages_received,
            "sent": st.messages_sent,
            "dropped": dropped(st),
            "queued": g.queued,
            "inflight": g.inflight,
            "alive": g.messages_alive,
            "alive_bytes": st.message_bytes_alive,
            "qos0": {"received": st.messages_received_qos0, "sent": st.messages_sent_qos0},
            "qos1": {"received": st.messages_received_qos1, "sent": st.messages_sent_qos1},
            "qos2": {"received": st.messages_received_qos2, "sent": st.messages_sent_qos2},
        },
        "bytes": {"received": st.bytes_received, "sent": st.bytes_sent},
        "store": s.store.as_ref().map(|m| json!({
            "commits": m.commits,
            "syncs": m.syncs,
            "sync_avg_us": m.sync_micros.checked_div(m.syncs).unwrap_or(0),
            "disk_bytes": m.disk_bytes,
            "compactions": m.compactions,
        })),
        "listeners": s.listeners.iter().map(|l| json!({"name": l.name, "state": l.state})).collect::<Vec<_>>(),
    })
}
