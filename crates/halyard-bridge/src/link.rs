//! One bridge at work: a local connection to the broker's own session `$bridge/<name>`
//! (in-process, trusted) and a connection to the remote, with packets relayed between them.
//!
//! **Store-and-forward is the local session.** The bridge subscribes locally to its `out`
//! filters with a persistent session, so a message bound for the remote is queued and
//! written to the broker's log (same group commit) before its publisher is acknowledged,
//! like any persistent subscriber's. The bridge acknowledges it locally only when the
//! remote acknowledged it, so it leaves the queue only then, and survives the remote being
//! down, a restart or a SIGKILL.
//!
//! **Packet ids pass through unchanged.** The local broker's packet id of a delivery is
//! the packet id at the remote, and the other way round for `in` messages; each
//! acknowledgement is relayed to the other side. So a resend after a restart (the local
//! session resends with DUP and the stored packet id) reaches a persistent remote session
//! as the same packet: QoS 2 stays exactly once across restarts, without a second log.
//! The one exception is the bridge's own SUBSCRIBE/UNSUBSCRIBE ids, taken from ids not
//! in flight.
//!
//! Invariants: at most `window` messages are in flight to the remote (the lower of the
//! remote's Receive Maximum and `receive_maximum`); the local session holds at most
//! `receive_maximum` un-acknowledged deliveries, so `held` is bounded by it too.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU8, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use halyard_broker::Broker;
use halyard_client::{Backoff, random_seed};
use halyard_codec::{
    ConnAck, Disconnect, Packet, Properties, Publish, QoS, ReasonCode, RetainHandling, Subscribe,
    SubscriptionOptions, TopicFilter, TopicName, Unsubscribe,
};
use halyard_transport::{BoxStream, Registry};
use serde::{Deserialize, Serialize};
use tokio::io::DuplexStream;
use tokio::sync::watch;
use tokio::time::Instant;
use tracing::{info, warn};

use crate::config::Bridge;
use crate::connect::{RemoteError, connect_local, connect_remote};
use crate::relay::Relay;
use crate::wire::Wire;

/// What the manager wants of a link.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) struct Control {
    pub(crate) paused: bool,
    pub(crate) stop: bool,
}

/// Link states, as `Shared::state` holds them.
pub(crate) const DOWN: u8 = 0;
pub(crate) const UP: u8 = 1;
pub(crate) const PAUSED: u8 = 2;
pub(crate) const STOPPED: u8 = 3;

/// What a link shows the manager (metrics, API).
#[derive(Debug, Default)]
pub(crate) struct Shared {
    pub(crate) state: AtomicU8,
    pub(crate) remote: Mutex<Option<String>>,
    pub(crate) last_error: Mutex<Option<String>>,
    pub(crate) up_since: Mutex<Option<SystemTime>>,
    pub(crate) reconnects: AtomicU64,
    pub(crate) forwarded_out: AtomicU64,
    pub(crate) forwarded_in: AtomicU64,
    pub(crate) held: AtomicUsize,
    pub(crate) in_flight: AtomicUsize,
    pub(crate) dropped_too_large: AtomicU64,
    pub(crate) dropped_remote_refused: AtomicU64,
    pub(crate) dropped_loop: AtomicU64,
    pub(crate) dropped_unmapped: AtomicU64,
    pub(crate) dropped_qos0_offline: AtomicU64,
    pub(crate) dropped_expired: AtomicU64,
}

impl Shared {
    pub(crate) fn error(&self, e: &str) {
        *self.last_error.lock().unwrap_or_else(|p| p.into_inner()) = Some(e.to_string());
    }
}

/// The filters a link last subscribed, kept across restarts so that filters removed from
/// the configuration are unsubscribed.
#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Filters {
    pub(crate) local: Vec<String>,
    pub(crate) remote: Vec<String>,
}

impl Filters {
    pub(crate) fn load(path: &Option<PathBuf>) -> Filters {
        path.as_ref()
            .and_then(|p| std::fs::read(p).ok())
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default()
    }

    fn save(&self, path: &Option<PathBuf>) {
        let Some(p) = path else { return };
        if let Err(e) = crate::write_json(p, self) {
            warn!(path = %p.display(), error = %e, "bridge: cannot save its filter list");
        }
    }
}

/// Runs one bridge until told to stop.
pub(crate) struct Link {
    pub(crate) b: Arc<Bridge>,
    pub(crate) broker: Broker,
    pub(crate) registry: Registry,
    pub(crate) node_id: Option<String>,
    pub(crate) shared: Arc<Shared>,
    pub(crate) ctl: watch::Receiver<Control>,
    pub(crate) state_path: Option<PathBuf>,
}

/// Why a pump ended.
enum Ended {
    /// The local connection failed: start over.
    Local(String),
    /// Told to stop.
    Stop,
}

impl Link {
    fn name(&self) -> &str {
        &self.b.config.name
    }

    fn control(&self) -> Control {
        *self.ctl.borrow()
    }

    pub(crate) async fn run(mut self) {
        let mut local_failures = Backoff::new(
            Duration::from_millis(100),
            Duration::from_secs(5),
            random_seed(),
        );
        loop {
            if self.control().stop {
                break;
            }
            match self.session().await {
                Ended::Stop => break,
                Ended::Local(e) => {
                    warn!(bridge = self.name(), error = %e, "bridge: local connection lost; reconnecting");
                    self.shared.error(&e);
                    let d = local_failures.next_delay();
                    tokio::select! {
                        _ = tokio::time::sleep(d) => {}
                        _ = self.ctl.changed() => {}
                    }
                }
            }
        }
        self.shared.state.store(STOPPED, Ordering::Relaxed);
    }

    /// One local connection's life: subscribe, then keep a remote connection going.
    async fn session(&mut self) -> Ended {
        let (mut local, ack) = match connect_local(&self.broker, &self.b).await {
            Ok(x) => x,
            Err(e) => return Ended::Local(e),
        };
        let mut relay = Relay::new(self.b.clone(), self.node_id.clone(), self.shared.clone());
        let local_rm = ack.properties.receive_maximum.unwrap_or(u16::MAX);
        let mut filters = Filters::load(&self.state_path);
        // Local subscriptions for the `out` rules; the ones a previous configuration had
        // and this one has not are removed.
        let wanted: Vec<String> = out_filters(&self.b);
        let gone: Vec<String> = filters
            .local
            .iter()
            .filter(|f| !wanted.contains(f))
            .cloned()
            .collect();
        if !gone.is_empty() {
            info!(bridge = self.name(), filters = ?gone, "bridge: unsubscribing filters removed from the configuration (local)");
            local.send(&unsubscribe(1, &gone));
        }
        if !wanted.is_empty() {
            local.send(&Packet::Subscribe(Subscribe {
                packet_id: 2,
                filters: self
                    .b
                    .rules
                    .iter()
                    .filter(|r| r.direction.out())
                    .filter_map(|r| {
                        Some((
                            TopicFilter::new(r.local_filter().as_str()).ok()?,
                            SubscriptionOptions {
                                qos: r.qos,
                                // What the bridge brings in is not sent back out.
                                no_local: true,
                                retain_as_published: true,
                                retain_handling: RetainHandling::SendIfNew,
                            },
                        ))
                    })
                    .collect(),
                properties: Properties::default(),
            }));
        }
        filters.local = wanted;
        filters.save(&self.state_path);
        if self.b.config.notifications {
            local.send(&state_message(&self.b, false, QoS::AtMostOnce));
        }
        if let Err(e) = local.flush().await {
            return Ended::Local(e.to_string());
        }
        let mut backoff = Backoff::new(self.b.restart_base, self.b.restart_cap, random_seed());
        let mut fallback_v311 = false;
        let mut private = self.b.config.try_private;
        let mut address = 0usize;
        loop {
            let c = self.control();
            if c.stop {
                return self.close_local(&mut local).await;
            }
            if c.paused {
                self.shared.state.store(PAUSED, Ordering::Relaxed);
                // Local deliveries are held (bounded by the local Receive Maximum).
                if let Some(end) = self.wait_holding(None, &mut local, &mut relay).await {
                    return end;
                }
                continue;
            }
            self.shared.state.store(DOWN, Ordering::Relaxed);
            let url = self.b.config.address[address % self.b.config.address.len()].clone();
            let attempt = connect_remote(
                &self.registry,
                &self.b,
                &url,
                fallback_v311,
                private,
                local_rm.min(self.b.config.receive_maximum),
            );
            let connected = tokio::select! {
                r = attempt => Some(r),
                _ = self.ctl.changed() => None,
            };
            let (mut remote, ack) = match connected {
                None => continue,
                Some(Ok(x)) => x,
                Some(Err(RemoteError::V5Refused)) if !fallback_v311 => {
                    info!(bridge = self.name(), %url, "bridge: the remote does not speak MQTT 5.0; using 3.1.1");
                    fallback_v311 = true;
                    continue;
                }
                Some(Err(RemoteError::PrivateRefused)) if private => {
                    info!(bridge = self.name(), %url, "bridge: the remote refused the bridge bit; connecting as a plain client");
                    private = false;
                    continue;
                }
                Some(Err(e)) => {
                    let e = format!("{url}: {e}");
                    warn!(bridge = self.name(), error = %e, "bridge: cannot connect to the remote");
                    self.shared.error(&e);
                    address += 1;
                    let d = backoff.next_delay();
                    match self.wait_holding(Some(d), &mut local, &mut relay).await {
                        Some(end) => return end,
                        None => continue,
                    }
                }
            };
            info!(bridge = self.name(), %url, session_present = ack.session_present, protocol = ?remote.version, "bridge: connected to the remote");
            let up_at = Instant::now();
            self.shared.reconnects.fetch_add(1, Ordering::Relaxed);
            *self.shared.remote.lock().unwrap_or_else(|p| p.into_inner()) = Some(url.clone());
            *self
                .shared
                .up_since
                .lock()
                .unwrap_or_else(|p| p.into_inner()) = Some(SystemTime::now());
            self.shared.state.store(UP, Ordering::Relaxed);
            let end = self
                .pump(&mut local, &mut remote, &ack, &mut relay, &mut filters)
                .await;
            self.shared.state.store(DOWN, Ordering::Relaxed);
            *self
                .shared
                .up_since
                .lock()
                .unwrap_or_else(|p| p.into_inner()) = None;
            if self.b.config.notifications {
                local.send(&state_message(&self.b, false, QoS::AtMostOnce));
                let _ = local.flush().await;
            }
            // A link that stayed up as long as the cap was a good one: start the backoff
            // again from its base, and from the first address.
            if up_at.elapsed() >= self.b.restart_cap {
                backoff.reset();
                address = 0;
            }
            match end {
                PumpEnd::Local(e) => return Ended::Local(e),
                PumpEnd::Stop => {
                    let _ = remote.flush().await;
                    return self.close_local(&mut local).await;
                }
                PumpEnd::Pause => {
                    info!(bridge = self.name(), "bridge: paused");
                    let _ = remote.flush().await;
                }
                PumpEnd::Remote(e) => {
                    warn!(bridge = self.name(), error = %e, "bridge: link to the remote lost");
                    self.shared.error(&e);
                    let d = backoff.next_delay();
                    if let Some(end) = self.wait_holding(Some(d), &mut local, &mut relay).await {
                        return end;
                    }
                }
            }
        }
    }

    /// Waits `d` (`None`: until the manager intervenes), taking local deliveries (held)
    /// meanwhile: before a reconnect attempt, and while paused.
    async fn wait_holding(
        &mut self,
        d: Option<Duration>,
        local: &mut Wire<DuplexStream>,
        relay: &mut Relay,
    ) -> Option<Ended> {
        let until = d.map(|d| Instant::now() + d);
        loop {
            let sleep = async {
                match until {
                    Some(t) => tokio::time::sleep_until(t).await,
                    None => std::future::pending().await,
                }
            };
            let p = tokio::select! {
                _ = sleep => return None,
                _ = self.ctl.changed() => return None,
                p = local.read() => p,
            };
            if let Err(e) = p.and_then(|p| relay.on_local(p, local, None)) {
                return Some(Ended::Local(e));
            }
            relay.publish_gauges();
            if let Err(e) = local.flush().await {
                return Some(Ended::Local(e.to_string()));
            }
        }
    }

    async fn close_local(&mut self, local: &mut Wire<DuplexStream>) -> Ended {
        if self.b.config.notifications {
            local.send(&state_message(&self.b, false, QoS::AtMostOnce));
        }
        local.send(&Packet::Disconnect(Disconnect::new(ReasonCode::Success)));
        let _ = local.flush().await;
        Ended::Stop
    }

    /// Relays between the two connections until one fails or the manager intervenes.
    async fn pump(
        &mut self,
        local: &mut Wire<DuplexStream>,
        remote: &mut Wire<BoxStream>,
        ack: &ConnAck,
        relay: &mut Relay,
        filters: &mut Filters,
    ) -> PumpEnd {
        let v5 = remote.version.is_v5();
        let props = &ack.properties;
        relay.remote_v5 = v5;
        relay.window = usize::from(props.receive_maximum.unwrap_or(u16::MAX))
            .min(usize::from(self.b.config.receive_maximum))
            .max(1);
        relay.remote_max_packet = props.maximum_packet_size.unwrap_or(u32::MAX);
        relay.remote_max_qos = props.maximum_qos.unwrap_or(QoS::ExactlyOnce);
        relay.remote_retain = props.retain_available.unwrap_or(true);
        // Remote subscriptions for the `in` rules; filters a previous configuration had
        // are unsubscribed.
        let wanted = in_filters(&self.b);
        let gone: Vec<String> = filters
            .remote
            .iter()
            .filter(|f| !wanted.contains(f))
            .cloned()
            .collect();
        if !gone.is_empty() {
            info!(bridge = self.name(), filters = ?gone, "bridge: unsubscribing filters removed from the configuration (remote)");
            remote.send(&unsubscribe(relay.free_id(), &gone));
        }
        if !wanted.is_empty() {
            let fresh = self.b.config.cleansession || !ack.session_present;
            let id = relay.free_id().wrapping_sub(1).max(1);
            remote.send(&Packet::Subscribe(Subscribe {
                packet_id: id,
                filters: self
                    .b
                    .rules
                    .iter()
                    .filter(|r| r.direction.inward())
                    .filter_map(|r| {
                        Some((
                            TopicFilter::new(r.remote_filter().as_str()).ok()?,
                            SubscriptionOptions {
                                qos: r.qos,
                                // 5.0: our own messages do not come back, retained
                                // flags arrive as published (3.1.1: the bridge bit).
                                no_local: v5,
                                retain_as_published: v5,
                                retain_handling: if fresh {
                                    RetainHandling::SendOnSubscribe
                                } else {
                                    RetainHandling::SendIfNew
                                },
                            },
                        ))
                    })
                    .collect(),
                properties: Properties::default(),
            }));
        }
        filters.remote = wanted;
        filters.save(&self.state_path);
        if self.b.config.notifications {
            remote.send(&state_message(&self.b, true, QoS::AtMostOnce));
            local.send(&state_message(&self.b, true, QoS::AtMostOnce));
        }
        relay.resend(remote);
        relay.drain(remote, local);
        let keepalive = Duration::from_secs(u64::from(
            props
                .server_keep_alive
                .unwrap_or(self.b.config.keepalive_interval),
        ));
        let mut ping_at = (!keepalive.is_zero()).then(|| Instant::now() + keepalive);
        let mut awaiting_pong = false;
        loop {
            relay.publish_gauges();
            if let Err(e) = local.flush().await {
                return PumpEnd::Local(e.to_string());
            }
            if let Err(e) = remote.flush().await {
                return PumpEnd::Remote(format!("{}: {e}", remote.name));
            }
            let ping = async {
                match ping_at {
                    Some(t) => tokio::time::sleep_until(t).await,
                    None => std::future::pending().await,
                }
            };
            let event = tokio::select! {
                p = local.read() => Event::Local(p),
                p = remote.read() => Event::Remote(p),
                _ = ping => Event::Ping,
                _ = self.ctl.changed() => Event::Control,
            };
            match event {
                Event::Local(p) => {
                    if let Err(e) = p.and_then(|p| relay.on_local(p, local, Some(remote))) {
                        return PumpEnd::Local(e);
                    }
                }
                Event::Remote(Ok(p)) => {
                    if matches!(p, Packet::PingResp) {
                        awaiting_pong = false;
                    }
                    if let Err(e) = relay.on_remote(p, local, remote) {
                        return PumpEnd::Remote(e);
                    }
                }
                Event::Remote(Err(e)) => return PumpEnd::Remote(e),
                Event::Ping => {
                    if awaiting_pong {
                        return PumpEnd::Remote(format!(
                            "{}: no PINGRESP within the keep alive",
                            remote.name
                        ));
                    }
                    remote.send(&Packet::PingReq);
                    awaiting_pong = true;
                    ping_at = Some(Instant::now() + keepalive);
                }
                Event::Control => {
                    let c = *self.ctl.borrow();
                    if c.stop || c.paused {
                        if self.b.config.notifications {
                            remote.send(&state_message(&self.b, false, QoS::AtMostOnce));
                        }
                        remote.send(&Packet::Disconnect(Disconnect::new(ReasonCode::Success)));
                        return if c.stop {
                            PumpEnd::Stop
                        } else {
                            PumpEnd::Pause
                        };
                    }
                }
            }
        }
    }
}

enum Event {
    Local(Result<Packet, String>),
    Remote(Result<Packet, String>),
    Ping,
    Control,
}

enum PumpEnd {
    Local(String),
    Remote(String),
    Stop,
    Pause,
}

fn out_filters(b: &Bridge) -> Vec<String> {
    b.rules
        .iter()
        .filter(|r| r.direction.out())
        .map(|r| r.local_filter())
        .collect()
}

fn in_filters(b: &Bridge) -> Vec<String> {
    b.rules
        .iter()
        .filter(|r| r.direction.inward())
        .map(|r| r.remote_filter())
        .collect()
}

fn unsubscribe(packet_id: u16, filters: &[String]) -> Packet {
    Packet::Unsubscribe(Unsubscribe {
        packet_id,
        filters: filters
            .iter()
            .filter_map(|f| TopicFilter::new(f.as_str()).ok())
            .collect(),
        properties: Properties::default(),
    })
}

/// `1` or `0` on the notification topic, retained.
fn state_message(b: &Bridge, up: bool, qos: QoS) -> Packet {
    let mut p = Publish::new(
        TopicName::new(b.notification_topic.as_str()).expect("validated"),
        if up { &b"1"[..] } else { &b"0"[..] },
    );
    p.retain = true;
    p.qos = qos;
    Packet::Publish(p)
}
