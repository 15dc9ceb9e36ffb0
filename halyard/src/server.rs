//! The running server around the broker: its listeners (which an operator can stop, start,
//! add and remove while it runs), the configuration it was started with, and reload.
//!
//! One `Server` is shared (behind an `Arc`) by the signal loop, the admin API and the file
//! watcher. Its listener table sits behind an async mutex held only while a listener is
//! started or stopped, never while serving: connections never touch it.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use halyard_broker::Broker;
use halyard_transport::{
    ConnSink, ListenerConfig, ListenerHandle, ListenerStatus, Monitor, Registry,
};
use tokio::sync::watch;
use tracing::{info, warn};

use crate::config::Config;

/// Where the configuration comes from, so a reload reads it again the same way.
#[derive(Debug, Clone, Default)]
pub(crate) struct ConfigSource {
    pub(crate) path: Option<PathBuf>,
    /// `--listen` URLs: replace the file's listeners.
    pub(crate) listen: Vec<String>,
    /// `--data-dir`.
    pub(crate) data_dir: Option<PathBuf>,
}

impl ConfigSource {
    /// Reads the file (if any) and applies the command line's overrides.
    pub(crate) fn load(&self) -> Result<Config, String> {
        let mut cfg = match &self.path {
            Some(p) => Config::load(p).map_err(|e| e.0)?,
            None => Config::default(),
        };
        if !self.listen.is_empty() {
            for url in &self.listen {
                crate::config::listener_from_url(url, cfg.connect_timeout)
                    .map_err(|why| format!("--listen {url}: {why}"))?;
            }
            cfg.listen = self.listen.clone();
            cfg.listener.clear();
        }
        if let Some(d) = &self.data_dir {
            cfg.data_dir = d.display().to_string();
        }
        Ok(cfg)
    }
}

/// A listener the server manages.
struct Entry {
    cfg: ListenerConfig,
    /// Turns true to stop this listener (admin stop, removal, shutdown).
    stop: watch::Sender<bool>,
    /// None while stopped by an operator (it stays stopped across reloads until started
    /// again).
    handle: Option<ListenerHandle>,
}

/// A listener as the admin API shows it.
#[derive(Debug, Clone)]
pub(crate) struct ListenerView {
    pub(crate) name: String,
    pub(crate) scheme: String,
    pub(crate) local: String,
    /// listening, restarting, failed, stopped.
    pub(crate) state: &'static str,
    pub(crate) error: Option<String>,
    pub(crate) restarts: u32,
    pub(crate) accepted: u64,
    pub(crate) refused: u64,
    pub(crate) handshake_failed: u64,
    pub(crate) open: usize,
}

/// What a reload changed.
#[derive(Debug, Default, Clone)]
pub(crate) struct ReloadReport {
    pub(crate) listeners_added: Vec<String>,
    pub(crate) listeners_removed: Vec<String>,
    pub(crate) bridges_added: Vec<String>,
    pub(crate) bridges_changed: Vec<String>,
    pub(crate) bridges_removed: Vec<String>,
    pub(crate) tls_reloaded: usize,
    pub(crate) log_level: String,
}

/// Swaps the log filter at run time (set up by `init_logging`).
pub(crate) type LogReload = Arc<dyn Fn(&str) -> Result<(), String> + Send + Sync>;

pub(crate) struct Server {
    pub(crate) broker: Broker,
    pub(crate) source: ConfigSource,
    /// The configuration in force (replaced by a successful reload).
    pub(crate) config: Mutex<Config>,
    registry: Registry,
    monitor: Monitor,
    sink: ConnSink,
    listeners: tokio::sync::Mutex<Vec<Entry>>,
    log_reload: Option<LogReload>,
    reload_lock: tokio::sync::Mutex<()>,
    /// The `[[bridge]]` links (and those added through the admin API).
    pub(crate) bridges: Arc<halyard_bridge::Bridges>,
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server").finish_non_exhaustive()
    }
}

impl Server {
    pub(crate) fn new(
        broker: Broker,
        source: ConfigSource,
        config: Config,
        registry: Registry,
        log_reload: Option<LogReload>,
    ) -> Arc<Server> {
        let b = broker.clone();
        let sink: ConnSink = Arc::new(move |s, peer| b.spawn_connection(s, peer));
        let bridges = halyard_bridge::Bridges::new(
            broker.clone(),
            broker.config().node_id.clone(),
            Some(PathBuf::from(&config.data_dir).join("bridges")),
        );
        let server = Arc::new(Server {
            bridges,
            monitor: broker.monitor().clone(),
            broker,
            source,
            config: Mutex::new(config),
            registry,
            sink,
            listeners: tokio::sync::Mutex::new(Vec::new()),
            log_reload,
            reload_lock: tokio::sync::Mutex::new(()),
        });
        // Broker shutdown stops every listener.
        let s = server.clone();
        let mut sd = server.broker.shutdown_signal();
        tokio::spawn(async move {
            let _ = sd.wait_for(|&v| v).await;
            for e in s.listeners.lock().await.iter() {
                e.stop.send_replace(true);
            }
        });
        server
    }

    pub(crate) fn config(&self) -> Config {
        self.config
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    async fn spawn(
        &self,
        cfg: &ListenerConfig,
    ) -> Result<(watch::Sender<bool>, ListenerHandle), String> {
        let (stop, rx) = watch::channel(*self.broker.shutdown_signal().borrow());
        let h = halyard_transport::start_listener(
            &self.registry,
            cfg.clone(),
            self.monitor.clone(),
            rx,
            self.sink.clone(),
        )
        .await?;
        Ok((stop, h))
    }

    /// Starts the configured listeners; the first failure is returned (start-up aborts).
    pub(crate) async fn start_listeners(&self, cfgs: Vec<ListenerConfig>) -> Result<(), String> {
        let mut table = self.listeners.lock().await;
        for cfg in cfgs {
            let (stop, h) = self.spawn(&cfg).await?;
            table.push(Entry {
                cfg,
                stop,
                handle: Some(h),
            });
        }
        Ok(())
    }

    pub(crate) async fn listeners(&self) -> Vec<ListenerView> {
        use std::sync::atomic::Ordering::Relaxed;
        let table = self.listeners.lock().await;
        table
            .iter()
            .map(|e| {
                let (state, error) = match e.handle.as_ref().map(ListenerHandle::status) {
                    None => ("stopped", None),
                    Some(ListenerStatus::Listening) => ("listening", None),
                    Some(ListenerStatus::Restarting { error }) => ("restarting", Some(error)),
                    Some(ListenerStatus::Failed { error }) => ("failed", Some(error)),
                    Some(ListenerStatus::Closed) => ("stopped", None),
                };
                let h = e.handle.as_ref();
                ListenerView {
                    name: e.cfg.url.clone(),
                    scheme: e.cfg.parsed.scheme.clone(),
                    local: h.map(ListenerHandle::local_addr).unwrap_or_default(),
                    state,
                    error,
                    restarts: h.map_or(0, ListenerHandle::restarts),
                    accepted: h.map_or(0, |h| h.stats().accepted.load(Relaxed)),
                    refused: h.map_or(0, |h| h.stats().refused.load(Relaxed)),
                    handshake_failed: h.map_or(0, |h| h.stats().handshake_failed.load(Relaxed)),
                    open: h.map_or(0, |h| h.stats().open.load(Relaxed)),
                }
            })
            .collect()
    }

    /// Stops a listener: it stops accepting; clients already connected through it stay.
    /// `Ok(false)` if it was not running.
    pub(crate) async fn stop_listener(&self, name: &str) -> Result<bool, String> {
        let mut table = self.listeners.lock().await;
        let e = table
            .iter_mut()
            .find(|e| e.cfg.url == name)
            .ok_or_else(|| format!("no listener {name}"))?;
        let Some(h) = e.handle.take() else {
            return Ok(false);
        };
        e.stop.send_replace(true);
        let _ = h.join().await;
        info!(listener = name, "listener stopped by an operator");
        Ok(true)
    }

    /// Starts a stopped (or failed) listener again. `Ok(false)` if it was running.
    pub(crate) async fn start_listener(&self, name: &str) -> Result<bool, String> {
        let mut table = self.listeners.lock().await;
        let e = table
            .iter_mut()
            .find(|e| e.cfg.url == name)
            .ok_or_else(|| format!("no listener {name}"))?;
        if let Some(h) = &e.handle
            && !matches!(
                h.status(),
                ListenerStatus::Failed { .. } | ListenerStatus::Closed
            )
        {
            return Ok(false);
        }
        if let Some(h) = e.handle.take() {
            e.stop.send_replace(true);
            let _ = h.join().await;
        }
        let (stop, h) = self.spawn(&e.cfg.clone()).await?;
        e.stop = stop;
        e.handle = Some(h);
        info!(listener = name, "listener started by an operator");
        Ok(true)
    }

    /// Reads the configuration again and applies it: passwords and ACLs, TLS files,
    /// limits, log level, listeners added or removed (listeners that stay keep their
    /// clients; listeners whose settings changed are restarted, their clients stay
    /// connected). A configuration that does not load, or a listener that cannot bind,
    /// changes nothing and says why.
    pub(crate) async fn reload(&self) -> Result<ReloadReport, String> {
        let _one_at_a_time = self.reload_lock.lock().await;
        let mut cfg = self.source.load()?;
        let old = self.config();
        if cfg.node_id.is_empty() {
            // The name resolved at start (kept in the data directory) stays.
            cfg.node_id = old.node_id.clone();
        }
        let security = cfg.security()?;
        let wanted = cfg.listeners()?;
        let bridges = cfg.bridges()?;
        let mut report = ReloadReport {
            log_level: cfg.log_level.clone(),
            ..ReloadReport::default()
        };
        if cfg.data_dir != old.data_dir || cfg.persistence != old.persistence {
            warn!("reload: data_dir and [persistence] take effect on restart only");
        }
        if cfg.admin != old.admin {
            warn!("reload: [admin] takes effect on restart only");
        }
        if cfg.log_format != old.log_format {
            warn!("reload: log_format takes effect on restart only");
        }

        let mut table = self.listeners.lock().await;
        // Bind the new listeners first: if one fails, nothing has changed yet.
        let mut added = Vec::new();
        for lc in &wanted {
            if table.iter().any(|e| e.cfg == *lc) {
                continue;
            }
            // A listener whose URL stays but whose options changed is rebound after the
            // old one is stopped (same address), below.
            if table.iter().any(|e| e.cfg.url == lc.url) {
                continue;
            }
            match self.spawn(lc).await {
                Ok((stop, h)) => added.push(Entry {
                    cfg: lc.clone(),
                    stop,
                    handle: Some(h),
                }),
                Err(why) => {
                    for e in added {
                        e.stop.send_replace(true);
                        if let Some(h) = e.handle {
                            let _ = h.join().await;
                        }
                    }
                    return Err(format!("listener {}: {why}", lc.url));
                }
            }
        }
        // Everything loaded: apply.
        if let Some(f) = &self.log_reload
            && std::env::var_os("RUST_LOG").is_none()
        {
            f(&cfg.log_level)?;
        }
        self.broker.set_security(security);
        self.broker.set_config(cfg.broker());
        let mut keep = Vec::new();
        for mut e in std::mem::take(&mut *table) {
            match wanted.iter().find(|w| w.url == e.cfg.url) {
                Some(w) if *w == e.cfg => {
                    if let Some(h) = &e.handle
                        && let Ok(true) = h.reload_tls()
                    {
                        report.tls_reloaded += 1;
                    }
                    keep.push(e);
                }
                Some(w) => {
                    // Changed options: stop, rebind with the new ones.
                    e.stop.send_replace(true);
                    if let Some(h) = e.handle.take() {
                        let _ = h.join().await;
                    }
                    match self.spawn(w).await {
                        Ok((stop, h)) => {
                            e.stop = stop;
                            e.handle = Some(h);
                            e.cfg = w.clone();
                            report.listeners_added.push(w.url.clone());
                            report.listeners_removed.push(w.url.clone());
                        }
                        Err(why) => {
                            warn!(listener = %w.url, why, "reload: cannot rebind a changed listener")
                        }
                    }
                    keep.push(e);
                }
                None => {
                    e.stop.send_replace(true);
                    if let Some(h) = e.handle.take() {
                        let _ = h.join().await;
                    }
                    report.listeners_removed.push(e.cfg.url.clone());
                }
            }
        }
        for e in added {
            report.listeners_added.push(e.cfg.url.clone());
            keep.push(e);
        }
        *table = keep;
        drop(table);
        // Bridges whose table is unchanged keep running untouched.
        let b = self.bridges.apply(bridges).await?;
        report.bridges_added = b.added;
        report.bridges_changed = b.changed;
        report.bridges_removed = b.removed;
        *self.config.lock().unwrap_or_else(|e| e.into_inner()) = cfg;
        info!(
            added = ?report.listeners_added, removed = ?report.listeners_removed,
            tls_reloaded = report.tls_reloaded, log_level = %report.log_level,
            "configuration reloaded"
        );
        Ok(report)
    }

    /// Waits for every listener to stop (after shutdown).
    pub(crate) async fn join_listeners(&self) {
        let mut table = self.listeners.lock().await;
        for e in table.iter_mut() {
            e.stop.send_replace(true);
            if let Some(h) = e.handle.take() {
                let _ = h.join().await;
            }
        }
    }
}
