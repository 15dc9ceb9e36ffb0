//! The `$SYS/broker/...` topics, with mosquitto's names and meanings, published retained
//! every `sys_interval` seconds, plus Halyard's own under `$SYS/halyard/...`.
//!
//! Where mosquitto counts every MQTT packet in `messages/received|sent`, we count PUBLISH
//! packets (the same as `publish/messages/*`); `heap/*` is not published (mosquitto has it
//! only when built with memory tracking). `load/*` are mosquitto's exponentially damped
//! per-minute averages over 1, 5 and 15 minutes.

use std::sync::Arc;
use std::time::Duration;

use crate::server::Server;

/// Damped averages of one counter's per-minute rate, as mosquitto computes them.
#[derive(Debug, Default, Clone, Copy)]
struct Load {
    last: u64,
    avg: [f64; 3],
}

impl Load {
    fn update(&mut self, now: u64, interval: f64) {
        let per_minute = now.saturating_sub(self.last) as f64 * 60.0 / interval;
        self.last = now;
        for (avg, minutes) in self.avg.iter_mut().zip([1.0, 5.0, 15.0]) {
            let e = (-interval / (60.0 * minutes)).exp();
            *avg = *avg * e + per_minute * (1.0 - e);
        }
    }
}

/// Starts the publisher (nothing when `sys_interval` is 0). It reads the interval again
/// after each round, so a reload applies.
pub(crate) fn spawn(server: Arc<Server>) {
    tokio::spawn(async move {
        let mut shutdown = server.broker.shutdown_signal();
        let mut loads: [Load; 9] = [Load::default(); 9];
        let mut published_once = false;
        let mut last = tokio::time::Instant::now();
        loop {
            let interval = server.config().sys_interval;
            let wait = if interval == 0 {
                Duration::from_secs(1)
            } else if published_once {
                Duration::from_secs(interval)
            } else {
                Duration::ZERO
            };
            tokio::select! {
                _ = super::shutdown_begins(&mut shutdown) => break,
                _ = tokio::time::sleep(wait) => {}
            }
            if interval == 0 {
                continue;
            }
            let elapsed = last.elapsed().as_secs_f64().max(0.001);
            last = tokio::time::Instant::now();
            publish_all(
                &server,
                &mut loads,
                if published_once { elapsed } else { 0.0 },
            )
            .await;
            published_once = true;
        }
    });
}

async fn publish_all(server: &Server, loads: &mut [Load; 9], elapsed: f64) {
    let b = &server.broker;
    let s = super::metrics::snapshot(server).await;
    let (st, g) = (&s.stats, &s.gauges);
    let dropped = super::metrics::dropped(st);
    let p = |topic: &str, v: String| b.publish_sys(&format!("$SYS/broker/{topic}"), v);
    p(
        "version",
        format!("halyard version {}", env!("CARGO_PKG_VERSION")),
    );
    p("uptime", format!("{} seconds", s.uptime_secs));
    p("clients/connected", st.connections_current.to_string());
    p("clients/active", st.connections_current.to_string());
    let disconnected = g.sessions.saturating_sub(g.sessions_connected);
    p("clients/disconnected", disconnected.to_string());
    p("clients/inactive", disconnected.to_string());
    p(
        "clients/total",
        g.sessions.max(g.sessions_connected).to_string(),
    );
    p("clients/maximum", st.connections_maximum.to_string());
    p("clients/expired", st.sessions_expired.to_string());
    p("messages/received", st.messages_received.to_string());
    p("messages/sent", st.messages_sent.to_string());
    p("messages/stored", g.messages_alive.to_string());
    p("store/messages/count", g.messages_alive.to_string());
    p("store/messages/bytes", st.message_bytes_alive.to_string());
    p(
        "publish/messages/received",
        st.messages_received.to_string(),
    );
    p("publish/messages/sent", st.messages_sent.to_string());
    p("publish/messages/dropped", dropped.to_string());
    p("publish/bytes/received", st.bytes_received.to_string());
    p("publish/bytes/sent", st.bytes_sent.to_string());
    p("bytes/received", st.bytes_received.to_string());
    p("bytes/sent", st.bytes_sent.to_string());
    p("subscriptions/count", g.subscriptions.to_string());
    p("retained messages/count", g.retained.to_string());
    let shared = b
        .subscriptions()
        .iter()
        .filter(|s| s.filter.starts_with("$share/"))
        .count();
    p("shared_subscriptions/count", shared.to_string());
    let accepted: u64 = s.listeners.iter().map(|l| l.accepted).sum();
    let counters = [
        ("messages/received", st.messages_received),
        ("messages/sent", st.messages_sent),
        ("publish/received", st.messages_received),
        ("publish/sent", st.messages_sent),
        ("publish/dropped", dropped),
        ("bytes/received", st.bytes_received),
        ("bytes/sent", st.bytes_sent),
        ("sockets", accepted),
        ("connections", st.connections_total),
    ];
    for (load, (name, now)) in loads.iter_mut().zip(counters) {
        if elapsed > 0.0 {
            load.update(now, elapsed);
        } else {
            load.last = now;
        }
        for (avg, span) in load.avg.iter().zip(["1min", "5min", "15min"]) {
            p(&format!("load/{name}/{span}"), format!("{avg:.2}"));
        }
    }
    // Halyard's own.
    let h = |topic: &str, v: String| b.publish_sys(&format!("$SYS/halyard/{topic}"), v);
    for l in &s.listeners {
        h(
            &format!("listeners/{}/state", l.name.replace(['+', '#'], "_")),
            l.state.to_string(),
        );
    }
    for br in server.bridges.status() {
        let t = |k: &str| format!("bridges/{}/{k}", br.name);
        let d = &br.dropped;
        h(&t("state"), br.state.to_string());
        h(&t("queue/messages"), br.queue_depth.to_string());
        h(&t("queue/bytes"), br.queue_bytes.to_string());
        h(&t("inflight"), br.in_flight.to_string());
        h(&t("forwarded/out"), br.forwarded_out.to_string());
        h(&t("forwarded/in"), br.forwarded_in.to_string());
        h(
            &t("dropped"),
            (d.queue_full_oldest
                + d.queue_full_new
                + d.queue_full_refused
                + d.too_large
                + d.remote_refused
                + d.looped
                + d.unmapped
                + d.qos0_offline
                + d.expired)
                .to_string(),
        );
    }
    h(
        "queue/overflows",
        (st.dropped_queue_full + st.dropped_qos0_evicted).to_string(),
    );
    h("messages/queued", g.queued.to_string());
    h("messages/inflight", g.inflight.to_string());
    h("sessions/count", g.sessions.to_string());
    if let Some(m) = &s.store {
        h("store/sync/count", m.syncs.to_string());
        h(
            "store/sync/latency_us_avg",
            m.sync_micros.checked_div(m.syncs).unwrap_or(0).to_string(),
        );
        h("store/disk_bytes", m.disk_bytes.to_string());
        h("store/compactions", m.compactions.to_string());
    }
}
