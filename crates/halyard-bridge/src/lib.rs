//! Bridges: this broker forwarding messages to and from other brokers, with Mosquitto's
//! topic rules and durable store-and-forward on the broker's own log.
//!
//! Rooms: `config.rs` (the `[[bridge]]` table and its validation), `link.rs` (one
//! bridge's life: connect, subscribe, reconnect with backoff, pause), `relay.rs` (which
//! packet goes where), `connect.rs` (opening both connections), `wire.rs` (packets on a
//! stream), `import.rs` (Mosquitto configuration to TOML). This file is the manager the
//! server and the admin API talk to.

mod config;
mod connect;
pub mod import;
mod link;
mod relay;
mod wire;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use halyard_broker::{Broker, QueueOverride};
use serde::Serialize;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::{info, warn};

pub use config::{Bridge, BridgeConfig, Direction, TopicRule};
use link::{Control, Link, Shared};

/// The running bridges of one broker.
#[derive(Debug)]
pub struct Bridges {
    broker: Broker,
    node_id: Option<String>,
    /// Where each bridge keeps the list of filters it subscribed (`<name>.filters.json`),
    /// so filters removed from the configuration are unsubscribed after a restart too.
    state_dir: Option<PathBuf>,
    links: Mutex<BTreeMap<String, Running>>,
}

#[derive(Debug)]
struct Running {
    bridge: Arc<Bridge>,
    /// Added through [`Bridges::add`] (the admin API), not the configuration file: a
    /// reload leaves it alone.
    from_api: bool,
    ctl: watch::Sender<Control>,
    shared: Arc<Shared>,
    task: JoinHandle<()>,
}

/// One bridge as the admin API and `/metrics` show it.
#[derive(Debug, Clone, Serialize)]
pub struct BridgeStatus {
    /// Its name.
    pub name: String,
    /// `connected`, `connecting`, `paused` or `stopped`.
    pub state: &'static str,
    /// The remote URL of the current (or last) link.
    pub remote: Option<String>,
    /// Client id at the remote.
    pub remote_clientid: String,
    /// Seconds since the link came up (connected only).
    pub connected_secs: Option<u64>,
    /// The last error, if any.
    pub last_error: Option<String>,
    /// Messages not yet acknowledged by the remote: queued in the local session, plus
    /// handed to the link (held or in flight at the remote).
    pub queue_depth: usize,
    /// Of those, handed to the link and not yet sent (remote away, or its window full).
    pub held: usize,
    /// Bytes of the local session's queue.
    pub queue_bytes: usize,
    /// Sent to the remote, not yet acknowledged by it.
    pub in_flight: usize,
    /// Links established since start.
    pub connects: u64,
    /// Messages sent to the remote.
    pub forwarded_out: u64,
    /// Messages received from the remote and published here.
    pub forwarded_in: u64,
    /// Dropped messages, by reason.
    pub dropped: Dropped,
    /// The configuration in force.
    pub config: BridgeConfig,
}

/// Messages a bridge dropped, by reason.
#[derive(Debug, Clone, Copy, Default, Serialize, PartialEq, Eq)]
pub struct Dropped {
    /// Queue full, oldest dropped (`drop_oldest`).
    pub queue_full_oldest: u64,
    /// Queue full, new message dropped (`drop_new`).
    pub queue_full_new: u64,
    /// Queue full, publish refused (`block`).
    pub queue_full_refused: u64,
    /// Larger than the remote's Maximum Packet Size.
    pub too_large: u64,
    /// The remote answered with an error reason code.
    pub remote_refused: u64,
    /// Already crossed this broker (a loop).
    pub looped: u64,
    /// Matched no topic rule after mapping.
    pub unmapped: u64,
    /// QoS 0 while the remote was away.
    pub qos0_offline: u64,
    /// Message Expiry passed while held by the link (the local queue drops its own
    /// expired messages and counts them in `halyard_messages_dropped_by_reason{reason="expired"}`).
    pub expired: u64,
}

/// What [`Bridges::apply`] changed.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ApplyReport {
    /// Started.
    pub added: Vec<String>,
    /// Restarted with a new configuration.
    pub changed: Vec<String>,
    /// Stopped and their local session ended.
    pub removed: Vec<String>,
}

impl Bridges {
    /// A manager for `broker`'s bridges. `node_id` marks forwarded messages (loop
    /// prevention, see `halyard_broker::HOP_PROPERTY`); `state_dir` keeps their filter
    /// lists.
    pub fn new(broker: Broker, node_id: Option<String>, state_dir: Option<PathBuf>) -> Arc<Self> {
        if let Some(d) = &state_dir
            && let Err(e) = std::fs::create_dir_all(d)
        {
            warn!(dir = %d.display(), error = %e, "bridges: cannot create the state directory");
        }
        Arc::new(Bridges {
            broker,
            node_id,
            state_dir,
            links: Mutex::new(BTreeMap::new()),
        })
    }

    fn table(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Running>> {
        self.links.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn state_path(&self, name: &str) -> Option<PathBuf> {
        self.state_dir
            .as_ref()
            .map(|d| d.join(format!("{name}.filters.json")))
    }

    fn start(&self, bridge: Bridge, from_api: bool) -> Result<Running, String> {
        let bridge = Arc::new(bridge);
        self.broker.set_queue_limits(
            &bridge.local_clientid(),
            QueueOverride {
                max_messages: bridge.config.queue_max_messages,
                max_bytes: bridge.config.queue_max_bytes,
                policy: bridge.policy,
            },
        )?;
        let (ctl, rx) = watch::channel(Control {
            paused: bridge.config.paused,
            stop: false,
        });
        let shared = Arc::new(Shared::default());
        let link = Link {
            b: bridge.clone(),
            broker: self.broker.clone(),
            registry: halyard_transport::Registry::default(),
            node_id: self.node_id.clone(),
            shared: shared.clone(),
            ctl: rx,
            state_path: self.state_path(&bridge.config.name),
        };
        info!(bridge = %bridge.config.name, remote = ?bridge.config.address, "bridge starting");
        tokio::spawn(watch_drops(
            self.broker.clone(),
            bridge.clone(),
            ctl.subscribe(),
        ));
        Ok(Running {
            bridge,
            from_api,
            ctl,
            shared,
            task: tokio::spawn(link.run()),
        })
    }

    /// Makes the configured bridges those of `wanted` (the configuration file, at start
    /// and on reload): new ones start, changed ones restart (the others are not touched),
    /// removed ones stop and their local session (queue and subscriptions) ends. Bridges
    /// added through the admin API stay, unless `wanted` names one (the file wins).
    /// Names must be unique.
    pub async fn apply(&self, wanted: Vec<Bridge>) -> Result<ApplyReport, String> {
        let mut seen = std::collections::HashSet::new();
        for b in &wanted {
            if !seen.insert(b.config.name.clone()) {
                return Err(format!("bridge `{}` is configured twice", b.config.name));
            }
        }
        let mut report = ApplyReport::default();
        let names: Vec<String> = self
            .table()
            .iter()
            .filter(|(_, r)| !r.from_api)
            .map(|(n, _)| n.clone())
            .collect();
        for name in names {
            if !wanted.iter().any(|b| b.config.name == name) {
                self.remove(&name).await?;
                report.removed.push(name);
            }
        }
        for b in wanted {
            match self.upsert_from(b.clone(), false).await? {
                Some(true) => report.added.push(b.config.name.clone()),
                Some(false) => report.changed.push(b.config.name.clone()),
                None => {}
            }
        }
        Ok(report)
    }

    /// Starts `b`, or restarts the bridge of that name if its configuration differs.
    /// `Some(true)`: added; `Some(false)`: restarted; `None`: unchanged.
    pub async fn upsert(&self, b: Bridge) -> Result<Option<bool>, String> {
        self.upsert_from(b, false).await
    }

    async fn upsert_from(&self, b: Bridge, from_api: bool) -> Result<Option<bool>, String> {
        let name = b.config.name.clone();
        let old = {
            let mut t = self.table();
            if t.get(&name)
                .is_some_and(|r| *r.bridge == b && r.from_api == from_api)
            {
                return Ok(None);
            }
            t.remove(&name)
        };
        let added = old.is_none();
        if let Some(old) = old {
            stop(old).await;
        }
        let running = self.start(b, from_api)?;
        self.table().insert(name, running);
        Ok(Some(added))
    }

    /// Adds (or replaces) a bridge at run time, kept across restarts in the state
    /// directory (`api-bridges.json`) until removed. A bridge of the configuration file
    /// cannot be replaced this way. `true`: it is new.
    pub async fn add(&self, b: Bridge) -> Result<bool, String> {
        if self
            .table()
            .get(&b.config.name)
            .is_some_and(|r| !r.from_api)
        {
            return Err(format!(
                "bridge `{}` is in the configuration file: change it there and reload",
                b.config.name
            ));
        }
        let added = self.upsert_from(b, true).await?;
        self.save_api();
        Ok(added != Some(false))
    }

    /// Starts the bridges added through the API before a restart (after [`Self::apply`]:
    /// a name the configuration file now has is skipped, with a warning).
    pub async fn restore_api(&self) {
        let Some(path) = self.api_path() else { return };
        let Ok(bytes) = std::fs::read(&path) else {
            return;
        };
        let saved: Vec<BridgeConfig> = match serde_json::from_slice(&bytes) {
            Ok(v) => v,
            Err(e) => {
                warn!(path = %path.display(), error = %e, "bridges added through the API not restored: unreadable file");
                return;
            }
        };
        for c in saved {
            match c.validate() {
                Ok(b) if !self.table().contains_key(&c.name) => {
                    if let Err(e) = self.upsert_from(b, true).await {
                        warn!(bridge = %c.name, error = %e, "bridge added through the API not restored");
                    }
                }
                Ok(_) => {
                    warn!(bridge = %c.name, "bridge added through the API not restored: the configuration file has one of that name")
                }
                Err(e) => {
                    warn!(bridge = %c.name, error = %e, "bridge added through the API not restored")
                }
            }
        }
    }

    fn api_path(&self) -> Option<PathBuf> {
        self.state_dir.as_ref().map(|d| d.join("api-bridges.json"))
    }

    fn save_api(&self) {
        let Some(path) = self.api_path() else { return };
        let list: Vec<BridgeConfig> = self
            .table()
            .values()
            .filter(|r| r.from_api)
            .map(|r| r.bridge.config.clone())
            .collect();
        if let Err(e) = write_json(&path, &list) {
            warn!(path = %path.display(), error = %e, "bridges added through the API will not survive a restart");
        }
    }

    /// Stops bridge `name` and ends its local session: what it had queued is dropped.
    pub async fn remove(&self, name: &str) -> Result<(), String> {
        let Some(old) = self.table().remove(name) else {
            return Err(format!("no bridge {name}"));
        };
        let b = old.bridge.clone();
        let from_api = old.from_api;
        stop(old).await;
        if from_api {
            self.save_api();
        }
        if let Err(e) = connect::end_local_session(&self.broker, &b).await {
            warn!(bridge = name, error = %e, "bridge removed; its local session could not be ended");
        }
        self.broker.clear_queue_limits(&b.local_clientid());
        if let Some(p) = self.state_path(name) {
            let _ = std::fs::remove_file(p);
        }
        info!(bridge = name, "bridge removed");
        Ok(())
    }

    /// Pauses (`true`) or resumes bridge `name`. Paused, it holds no connection to the
    /// remote and its queue keeps filling (within its limits).
    pub fn pause(&self, name: &str, paused: bool) -> Result<(), String> {
        let t = self.table();
        let r = t.get(name).ok_or_else(|| format!("no bridge {name}"))?;
        r.ctl.send_modify(|c| c.paused = paused);
        info!(
            bridge = name,
            paused,
            "bridge {}",
            if paused { "paused" } else { "resumed" }
        );
        Ok(())
    }

    /// Every bridge, by name.
    pub fn status(&self) -> Vec<BridgeStatus> {
        let t = self.table();
        t.values().map(|r| self.view(r)).collect()
    }

    /// One bridge.
    pub fn get(&self, name: &str) -> Option<BridgeStatus> {
        self.table().get(name).map(|r| self.view(r))
    }

    fn view(&self, r: &Running) -> BridgeStatus {
        let s = &r.shared;
        let q = self
            .broker
            .queue_stats(&r.bridge.local_clientid())
            .unwrap_or_default();
        let held = s.held.load(Ordering::Relaxed);
        let since = *s.up_since.lock().unwrap_or_else(|e| e.into_inner());
        BridgeStatus {
            name: r.bridge.config.name.clone(),
            state: match s.state.load(Ordering::Relaxed) {
                link::UP => "connected",
                link::PAUSED => "paused",
                link::STOPPED => "stopped",
                _ => "connecting",
            },
            remote: s.remote.lock().unwrap_or_else(|e| e.into_inner()).clone(),
            remote_clientid: r.bridge.remote_clientid.clone(),
            connected_secs: since.and_then(|t| t.elapsed().ok()).map(|d| d.as_secs()),
            last_error: s
                .last_error
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone(),
            // The local session's in-flight deliveries are the link's held and in-flight
            // ones; its queue is what the broker has not handed over yet.
            queue_depth: q.depth + q.in_flight,
            held,
            queue_bytes: q.bytes,
            in_flight: s.in_flight.load(Ordering::Relaxed),
            connects: s.reconnects.load(Ordering::Relaxed),
            forwarded_out: s.forwarded_out.load(Ordering::Relaxed),
            forwarded_in: s.forwarded_in.load(Ordering::Relaxed),
            dropped: Dropped {
                queue_full_oldest: q.dropped_oldest,
                queue_full_new: q.dropped_new,
                queue_full_refused: q.refused,
                too_large: s.dropped_too_large.load(Ordering::Relaxed),
                remote_refused: s.dropped_remote_refused.load(Ordering::Relaxed),
                looped: s.dropped_loop.load(Ordering::Relaxed),
                unmapped: s.dropped_unmapped.load(Ordering::Relaxed),
                qos0_offline: s.dropped_qos0_offline.load(Ordering::Relaxed),
                expired: s.dropped_expired.load(Ordering::Relaxed),
            },
            config: r.bridge.config.clone(),
        }
    }

    /// Stops every bridge (their local sessions stay, with what they queued).
    pub async fn shutdown(&self) {
        let all: Vec<Running> = std::mem::take(&mut *self.table()).into_values().collect();
        for r in all {
            stop(r).await;
        }
    }
}

/// Writes `value` as JSON to `path` through a temporary file and a rename, so a crash
/// leaves the old file or the new one, never half of one.
pub(crate) fn write_json(path: &std::path::Path, value: &impl Serialize) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(
        &tmp,
        serde_json::to_vec_pretty(value).map_err(std::io::Error::other)?,
    )?;
    std::fs::rename(&tmp, path)
}

/// Logs, at most every 10 s, what the bridge's queue policy dropped or refused since
/// the last look (the broker counts them on the publishers' paths, where a log line per
/// message would be a flood).
async fn watch_drops(broker: Broker, b: Arc<Bridge>, mut ctl: watch::Receiver<Control>) {
    let id = b.local_clientid();
    let mut last = (0, 0, 0);
    loop {
        tokio::select! {
            _ = tokio::time::sleep(std::time::Duration::from_secs(10)) => {}
            r = ctl.changed() => {
                if r.is_err() || ctl.borrow().stop {
                    return;
                }
            }
        }
        let Some(q) = broker.queue_stats(&id) else {
            continue;
        };
        let now = (q.dropped_oldest, q.dropped_new, q.refused);
        if now != last {
            warn!(
                bridge = %b.config.name,
                policy = %b.config.queue_policy,
                dropped_oldest = now.0 - last.0,
                dropped_new = now.1 - last.1,
                refused = now.2 - last.2,
                queued = q.depth,
                "bridge queue full: messages dropped or refused (queue_max_messages / queue_max_bytes)"
            );
            last = now;
        }
    }
}

async fn stop(r: Running) {
    r.ctl.send_modify(|c| c.stop = true);
    let abort = r.task.abort_handle();
    if tokio::time::timeout(std::time::Duration::from_secs(5), r.task)
        .await
        .is_err()
    {
        abort.abort();
    }
}
