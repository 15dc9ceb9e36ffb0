//! Monitor events: what happens to listeners and connections, as a stream any part of the
//! program can subscribe to (the log now, the admin API's Server-Sent Events later).
//!
//! A `tokio::sync::broadcast` channel: `emit` never blocks and never waits for a slow
//! subscriber. A subscriber that falls more than the channel's capacity behind loses the
//! oldest events and is told how many (`RecvError::Lagged`), which is the right trade for
//! observability: the broker must never slow down because nobody reads its events.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, SystemTime};

use tokio::sync::broadcast;
use tracing::{debug, error, info, warn};

/// Log lines a second about misbehaving peers (handshake failures, protocol errors); the
/// rest are counted and reported with the next line (see [`LogBudget`]).
pub const LOG_LINES_PER_SECOND: u32 = 20;

/// Events buffered per subscriber before the oldest are dropped.
pub const MONITOR_CAPACITY: usize = 4096;

/// One event, stamped with wall-clock time.
#[derive(Debug, Clone)]
pub struct MonitorEvent {
    /// When it happened.
    pub at: SystemTime,
    /// What happened.
    pub kind: Event,
}

/// What happened.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Event {
    /// A listener is bound and accepting.
    Listening { listener: Arc<str>, local: String },
    /// A connection was accepted by a listener (before any TLS/WebSocket handshake).
    Accepted { listener: Arc<str>, peer: String },
    /// A connection was closed at once because a limit was reached.
    Refused {
        listener: Arc<str>,
        peer: String,
        why: &'static str,
    },
    /// The PROXY, TLS or WebSocket handshake failed.
    HandshakeFailed {
        listener: Arc<str>,
        peer: String,
        error: String,
    },
    /// An MQTT session was established (CONNACK success sent).
    Connected {
        peer: String,
        client_id: String,
        protocol: &'static str,
    },
    /// A CONNECT was refused (bad credentials, not authorized, bad packet, ...).
    AuthFailed {
        peer: String,
        client_id: String,
        reason: String,
    },
    /// An MQTT connection ended.
    Disconnected {
        peer: String,
        client_id: String,
        reason: String,
    },
    /// A listener's accept loop failed; it restarts after `restart_in`.
    ListenerCrashed {
        listener: Arc<str>,
        error: String,
        restart_in: Duration,
    },
    /// A listener was restarted by its supervisor (attempt counts from 1).
    ListenerRestarted { listener: Arc<str>, attempt: u32 },
    /// A listener failed too often inside the supervisor's window and was given up.
    ListenerFailed {
        listener: Arc<str>,
        failures: usize,
        window: Duration,
        error: String,
    },
    /// A listener stopped (shutdown).
    ListenerClosed { listener: Arc<str> },
    /// New TLS certificate/key/CA files were loaded.
    TlsReloaded { listener: Arc<str> },
    /// New TLS files were refused; the previous ones stay in use.
    TlsReloadFailed { listener: Arc<str>, error: String },
}

impl fmt::Display for Event {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Event::Listening { listener, local } => write!(f, "listening: {listener} on {local}"),
            Event::Accepted { listener, peer } => write!(f, "accepted: {peer} on {listener}"),
            Event::Refused {
                listener,
                peer,
                why,
            } => write!(f, "refused: {peer} on {listener}: {why}"),
            Event::HandshakeFailed {
                listener,
                peer,
                error,
            } => write!(f, "handshake failed: {peer} on {listener}: {error}"),
            Event::Connected {
                peer,
                client_id,
                protocol,
            } => write!(f, "connected: {client_id} from {peer} ({protocol})"),
            Event::AuthFailed {
                peer,
                client_id,
                reason,
            } => write!(f, "connect refused: {client_id} from {peer}: {reason}"),
            Event::Disconnected {
                peer,
                client_id,
                reason,
            } => write!(f, "disconnected: {client_id} from {peer}: {reason}"),
            Event::ListenerCrashed {
                listener,
                error,
                restart_in,
            } => write!(
                f,
                "listener crashed: {listener}: {error}; restarting in {restart_in:?}"
            ),
            Event::ListenerRestarted { listener, attempt } => {
                write!(f, "listener restarted: {listener} (restart {attempt})")
            }
            Event::ListenerFailed {
                listener,
                failures,
                window,
                error,
            } => write!(
                f,
                "listener failed: {listener}: {failures} failures within {window:?}, last: {error}; not restarting"
            ),
            Event::ListenerClosed { listener } => write!(f, "listener closed: {listener}"),
            Event::TlsReloaded { listener } => {
                write!(f, "tls files reloaded; new handshakes use them: {listener}")
            }
            Event::TlsReloadFailed { listener, error } => {
                write!(
                    f,
                    "tls reload refused, keeping the previous files: {listener}: {error}"
                )
            }
        }
    }
}

/// A cheap, cloneable handle for emitting and subscribing to events.
#[derive(Debug, Clone)]
pub struct Monitor {
    tx: broadcast::Sender<Arc<MonitorEvent>>,
    /// Subscribers that are `spawn_logger`'s: they log per-connection events only at
    /// debug level, so with no other subscriber those events are not built at all.
    loggers: Arc<AtomicUsize>,
}

impl Default for Monitor {
    fn default() -> Self {
        Monitor::new(MONITOR_CAPACITY)
    }
}

impl Monitor {
    /// A monitor whose subscribers each buffer up to `capacity` events.
    pub fn new(capacity: usize) -> Monitor {
        let (tx, _) = broadcast::channel(capacity.max(1));
        Monitor {
            tx,
            loggers: Arc::new(AtomicUsize::new(0)),
        }
    }

    /// Publishes a per-connection event (accepted, connected, refused CONNECT,
    /// disconnected), built by `kind` only when someone will see it: a subscriber other
    /// than the logger, or the logger with debug level on for `halyard::monitor`. Their
    /// strings (the peer's address formatted, the client id copied) and the logger's
    /// wake-up were ~5% of the broker's CPU while accepting connections, for events
    /// dropped below debug level.
    pub fn emit_conn(&self, kind: impl FnOnce() -> Event) {
        let others = self.tx.receiver_count() > self.loggers.load(Ordering::Relaxed);
        if others || tracing::enabled!(target: "halyard::monitor", tracing::Level::DEBUG) {
            self.emit(kind());
        }
    }

    /// Publishes an event. Never blocks; does nothing when nobody subscribes.
    pub fn emit(&self, kind: Event) {
        if self.tx.receiver_count() == 0 {
            return;
        }
        let _ = self.tx.send(Arc::new(MonitorEvent {
            at: SystemTime::now(),
            kind,
        }));
    }

    /// A new subscription; it sees events emitted from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<Arc<MonitorEvent>> {
        self.tx.subscribe()
    }

    /// Writes every event to the log (target `halyard::monitor`) until the monitor's last
    /// sender is dropped. Per-connection events are at debug level (the broker already
    /// logs them with more detail at info); listener events at info or above.
    pub fn spawn_logger(&self) -> tokio::task::JoinHandle<()> {
        let mut rx = self.subscribe();
        // Counted while its receiver exists (dropped when the task ends).
        let counted = LoggerCount::new(self.loggers.clone());
        tokio::spawn(async move {
            let _counted = counted;
            loop {
                match rx.recv().await {
                    Ok(ev) => log_event(&ev.kind),
                    Err(broadcast::error::RecvError::Lagged(n)) => {
                        warn!(target: "halyard::monitor", dropped = n, "monitor log fell behind; events dropped");
                    }
                    Err(broadcast::error::RecvError::Closed) => break,
                }
            }
        })
    }
}

/// One of `Monitor::loggers`, for as long as it lives.
struct LoggerCount(Arc<AtomicUsize>);

impl LoggerCount {
    fn new(n: Arc<AtomicUsize>) -> Self {
        n.fetch_add(1, Ordering::Relaxed);
        LoggerCount(n)
    }
}

impl Drop for LoggerCount {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

fn log_event(ev: &Event) {
    match ev {
        Event::Accepted { .. }
        | Event::Connected { .. }
        | Event::Disconnected { .. }
        | Event::AuthFailed { .. } => debug!(target: "halyard::monitor", "{ev}"),
        // Why a client's TLS or WebSocket handshake failed (an unknown CA, a v1
        // certificate, a wrong path) is what its operator needs to see.
        Event::HandshakeFailed { .. } => {
            static BUDGET: std::sync::LazyLock<LogBudget> =
                std::sync::LazyLock::new(|| LogBudget::new(LOG_LINES_PER_SECOND));
            if let Some(suppressed) = BUDGET.admit() {
                info!(target: "halyard::monitor", suppressed, "{ev}");
            }
        }
        Event::Refused { .. } | Event::ListenerCrashed { .. } | Event::TlsReloadFailed { .. } => {
            warn!(target: "halyard::monitor", "{ev}")
        }
        Event::ListenerFailed { .. } => error!(target: "halyard::monitor", "{ev}"),
        _ => info!(target: "halyard::monitor", "{ev}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_budget_admits_per_second_and_counts_the_rest() {
        let b = LogBudget::new(3);
        assert_eq!(b.admit(), Some(0));
        assert_eq!(b.admit(), Some(0));
        assert_eq!(b.admit(), Some(0));
        assert_eq!(b.admit(), None);
        assert_eq!(b.admit(), None);
        std::thread::sleep(std::time::Duration::from_millis(1100));
        assert_eq!(
            b.admit(),
            Some(2),
            "the next line reports what was suppressed"
        );
    }

    #[tokio::test]
    async fn slow_subscriber_lags_instead_of_blocking() {
        let m = Monitor::new(4);
        let mut rx = m.subscribe();
        for i in 0..10u32 {
            m.emit(Event::ListenerRestarted {
                listener: "x".into(),
                attempt: i,
            });
        }
        // emit returned ten times without anyone reading: never blocks.
        match rx.recv().await {
            Err(broadcast::error::RecvError::Lagged(n)) => assert_eq!(n, 6),
            other => panic!("expected a lag report, got {other:?}"),
        }
        let ev = rx.recv().await.expect("event");
        assert_eq!(
            ev.kind,
            Event::ListenerRestarted {
                listener: "x".into(),
                attempt: 6
            }
        );
    }
}

/// A budget for log lines about misbehaving peers: at most `per_second` lines a second;
/// the rest are counted and the count is reported with the next line that gets through.
/// A flood of garbage connections then costs a few log lines a second, not one each.
#[derive(Debug)]
pub struct LogBudget {
    per_second: u32,
    /// (second, lines logged in it), packed as second << 32 | count.
    state: std::sync::atomic::AtomicU64,
    suppressed: std::sync::atomic::AtomicU64,
    start: std::time::Instant,
}

impl LogBudget {
    /// A budget of `per_second` lines.
    pub fn new(per_second: u32) -> LogBudget {
        LogBudget {
            per_second,
            state: std::sync::atomic::AtomicU64::new(u64::MAX),
            suppressed: std::sync::atomic::AtomicU64::new(0),
            start: std::time::Instant::now(),
        }
    }

    /// `Some(n)` when a line may be logged (`n` lines were suppressed since the last one),
    /// `None` when it must be dropped.
    pub fn admit(&self) -> Option<u64> {
        use std::sync::atomic::Ordering::Relaxed;
        let now = self.start.elapsed().as_secs();
        let mut cur = self.state.load(Relaxed);
        loop {
            let (sec, n) = (cur >> 32, cur & 0xFFFF_FFFF);
            let next = if sec == now & 0xFFFF_FFFF {
                if n >= u64::from(self.per_second) {
                    self.suppressed.fetch_add(1, Relaxed);
                    return None;
                }
                cur + 1
            } else {
                ((now & 0xFFFF_FFFF) << 32) | 1
            };
            match self
                .state
                .compare_exchange_weak(cur, next, Relaxed, Relaxed)
            {
                Ok(_) => return Some(self.suppressed.swap(0, Relaxed)),
                Err(actual) => cur = actual,
            }
        }
    }
}

#[cfg(test)]
mod conn_event_tests {
    use super::*;

    /// Per-connection events are built only for someone who sees them: not for the
    /// logger alone below debug level (no subscriber is installed here, so debug is off),
    /// but for any other subscriber (the admin API's event stream).
    #[tokio::test]
    async fn connection_events_are_built_only_for_someone_who_sees_them() {
        use std::sync::atomic::AtomicUsize;
        let m = Monitor::new(8);
        let built = AtomicUsize::new(0);
        let accepted = || {
            built.fetch_add(1, Ordering::SeqCst);
            Event::Accepted {
                listener: "tcp://x".into(),
                peer: "127.0.0.1:1".into(),
            }
        };
        let logger = m.spawn_logger();
        m.emit_conn(accepted);
        assert_eq!(
            built.load(Ordering::SeqCst),
            0,
            "built for the logger alone"
        );
        let mut rx = m.subscribe();
        m.emit_conn(accepted);
        assert_eq!(built.load(Ordering::SeqCst), 1);
        assert!(matches!(
            rx.recv().await.unwrap().kind,
            Event::Accepted { .. }
        ));
        logger.abort();
        let _ = logger.await;
        drop(rx);
        m.emit_conn(accepted);
        assert_eq!(built.load(Ordering::SeqCst), 1, "nobody subscribes");
    }
}
