//! Listener supervision: an accept loop that fails (a socket error, descriptors that stay
//! exhausted, a panic) is restarted after a delay that doubles up to a cap; more than
//! `max_failures` failures inside a sliding `window` give the listener up, reported as
//! failed, while the rest of the broker keeps serving. Nothing restarts once shutdown has
//! begun. (Erlang/OTP's restart intensity, as nats-server and EMQX apply it to listeners.)
//! Crashes, restarts and failures are reported as monitor events, which the log writes.

use std::collections::VecDeque;
use std::future::Future;
use std::io;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;

use crate::monitor::{Event, Monitor};

/// How a supervisor restarts its listener.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RestartPolicy {
    /// Delay before the first restart; doubled for each failure still inside `window`.
    pub initial_delay: Duration,
    /// Longest delay between restarts.
    pub max_delay: Duration,
    /// More failures than this inside `window` mark the listener failed.
    pub max_failures: usize,
    /// The sliding window failures are counted in.
    pub window: Duration,
}

impl Default for RestartPolicy {
    fn default() -> Self {
        RestartPolicy {
            initial_delay: Duration::from_millis(100),
            max_delay: Duration::from_secs(30),
            max_failures: 5,
            window: Duration::from_secs(60),
        }
    }
}

impl RestartPolicy {
    /// The delay after the `n`th failure in the window (n >= 1).
    pub fn delay(&self, n: usize) -> Duration {
        let shift = (n.saturating_sub(1)).min(20) as u32;
        self.initial_delay
            .saturating_mul(1u32 << shift)
            .min(self.max_delay)
    }
}

/// A listener's state as its supervisor sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ListenerStatus {
    /// Accepting connections.
    Listening,
    /// Crashed; waiting to restart.
    Restarting {
        /// The failure.
        error: String,
    },
    /// Given up after too many failures.
    Failed {
        /// The last failure.
        error: String,
    },
    /// Stopped by shutdown.
    Closed,
}

/// Shared, observable supervisor state.
#[derive(Debug)]
pub struct SupervisorState {
    status: Mutex<ListenerStatus>,
    restarts: AtomicU32,
}

impl Default for SupervisorState {
    fn default() -> Self {
        SupervisorState {
            status: Mutex::new(ListenerStatus::Listening),
            restarts: AtomicU32::new(0),
        }
    }
}

impl SupervisorState {
    /// The current status.
    pub fn status(&self) -> ListenerStatus {
        self.status
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
    /// Restarts so far.
    pub fn restarts(&self) -> u32 {
        self.restarts.load(Ordering::Relaxed)
    }
    fn set(&self, s: ListenerStatus) {
        *self.status.lock().unwrap_or_else(|e| e.into_inner()) = s;
    }
}

/// How supervision ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SupervisorExit {
    /// The accept loop ended normally, or shutdown began.
    Shutdown,
    /// Too many failures inside the window.
    Failed,
}

/// Runs `run(attempt)` (attempt 0 first, then 1, 2, ... for restarts) under supervision.
/// Each run is spawned as its own task so a panic is caught as a failure. `run` must end
/// with `Ok(())` when `shutdown` turns true.
pub async fn supervise<F, Fut>(
    name: Arc<str>,
    policy: RestartPolicy,
    monitor: Monitor,
    state: Arc<SupervisorState>,
    mut shutdown: watch::Receiver<bool>,
    mut run: F,
) -> SupervisorExit
where
    F: FnMut(u32) -> Fut,
    Fut: Future<Output = io::Result<()>> + Send + 'static,
{
    let mut failures: VecDeque<Instant> = VecDeque::new();
    let mut attempt = 0u32;
    loop {
        if *shutdown.borrow_and_update() {
            state.set(ListenerStatus::Closed);
            return SupervisorExit::Shutdown;
        }
        let error = match tokio::spawn(run(attempt)).await {
            Ok(Ok(())) => {
                state.set(ListenerStatus::Closed);
                monitor.emit(Event::ListenerClosed {
                    listener: name.clone(),
                });
                return SupervisorExit::Shutdown;
            }
            Ok(Err(e)) => e.to_string(),
            Err(j) if j.is_panic() => {
                let p = j.into_panic();
                let msg = p
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| p.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "non-string panic".into());
                format!("accept loop panicked: {msg}")
            }
            Err(_) => "accept loop cancelled".into(),
        };
        // No restart once shutdown has begun.
        if *shutdown.borrow_and_update() {
            state.set(ListenerStatus::Closed);
            monitor.emit(Event::ListenerClosed {
                listener: name.clone(),
            });
            return SupervisorExit::Shutdown;
        }
        let now = Instant::now();
        failures.push_back(now);
        while failures
            .front()
            .is_some_and(|&t| now.duration_since(t) > policy.window)
        {
            failures.pop_front();
        }
        if failures.len() > policy.max_failures {
            state.set(ListenerStatus::Failed {
                error: error.clone(),
            });
            monitor.emit(Event::ListenerFailed {
                listener: name.clone(),
                failures: failures.len(),
                window: policy.window,
                error: error.clone(),
            });
            return SupervisorExit::Failed;
        }
        let delay = policy.delay(failures.len());
        state.set(ListenerStatus::Restarting {
            error: error.clone(),
        });
        monitor.emit(Event::ListenerCrashed {
            listener: name.clone(),
            error,
            restart_in: delay,
        });
        tokio::select! {
            _ = shutdown.changed() => {
                state.set(ListenerStatus::Closed);
                monitor.emit(Event::ListenerClosed { listener: name.clone() });
                return SupervisorExit::Shutdown;
            }
            _ = tokio::time::sleep(delay) => {}
        }
        attempt += 1;
        state.restarts.fetch_add(1, Ordering::Relaxed);
        state.set(ListenerStatus::Listening);
        monitor.emit(Event::ListenerRestarted {
            listener: name.clone(),
            attempt,
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex as StdMutex;

    fn policy(max_failures: usize) -> RestartPolicy {
        RestartPolicy {
            initial_delay: Duration::from_millis(100),
            max_delay: Duration::from_secs(1),
            max_failures,
            window: Duration::from_secs(60),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn restart_delay_doubles_to_the_cap_then_the_listener_is_failed() {
        let monitor = Monitor::default();
        let mut events = monitor.subscribe();
        let starts = Arc::new(StdMutex::new(Vec::new()));
        let s2 = starts.clone();
        let state = Arc::new(SupervisorState::default());
        let (_tx, rx) = watch::channel(false);
        let t0 = Instant::now();
        let exit = supervise(
            "bad".into(),
            policy(6),
            monitor.clone(),
            state.clone(),
            rx,
            move |_| {
                s2.lock().unwrap().push(Instant::now());
                async { Err(io::Error::other("socket error")) }
            },
        )
        .await;
        assert_eq!(exit, SupervisorExit::Failed);
        let gaps: Vec<u128> = starts
            .lock()
            .unwrap()
            .windows(2)
            .map(|w| (w[1] - w[0]).as_millis())
            .collect();
        // 7 runs: 6 restarts after failures 1..=6, then the 7th failure exceeds 6.
        assert_eq!(gaps, vec![100, 200, 400, 800, 1000, 1000]);
        assert_eq!(state.restarts(), 6);
        assert!(matches!(state.status(), ListenerStatus::Failed { .. }));
        assert!(t0.elapsed() < Duration::from_secs(4));
        let mut kinds = Vec::new();
        while let Ok(e) = events.try_recv() {
            kinds.push(e.kind.clone());
        }
        assert!(
            matches!(
                kinds.last(),
                Some(Event::ListenerFailed { failures: 7, .. })
            ),
            "{kinds:?}"
        );
        assert_eq!(
            kinds
                .iter()
                .filter(|k| matches!(k, Event::ListenerCrashed { .. }))
                .count(),
            6
        );
    }

    #[tokio::test(start_paused = true)]
    async fn failures_outside_the_window_do_not_count() {
        let p = RestartPolicy {
            initial_delay: Duration::from_secs(1),
            max_delay: Duration::from_secs(1),
            max_failures: 2,
            window: Duration::from_secs(10),
        };
        let runs = Arc::new(AtomicU32::new(0));
        let r2 = runs.clone();
        let (tx, rx) = watch::channel(false);
        let state = Arc::new(SupervisorState::default());
        let sup = tokio::spawn(supervise(
            "slow".into(),
            p,
            Monitor::default(),
            state,
            rx,
            move |_| {
                r2.fetch_add(1, Ordering::SeqCst);
                // Each run lives 20 s before failing: never more than one failure per window.
                async {
                    tokio::time::sleep(Duration::from_secs(20)).await;
                    Err(io::Error::other("flaky"))
                }
            },
        ));
        tokio::time::sleep(Duration::from_secs(200)).await;
        assert!(
            !sup.is_finished(),
            "given up although failures were spread out"
        );
        assert!(runs.load(Ordering::SeqCst) >= 9);
        tx.send(true).unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn a_panicking_accept_loop_is_restarted() {
        let runs = Arc::new(AtomicU32::new(0));
        let r2 = runs.clone();
        let (tx, rx) = watch::channel(false);
        let shutdown = rx.clone();
        let monitor = Monitor::default();
        let mut events = monitor.subscribe();
        let state = Arc::new(SupervisorState::default());
        let sup = tokio::spawn(supervise(
            "p".into(),
            policy(3),
            monitor,
            state.clone(),
            rx,
            move |attempt| {
                r2.fetch_add(1, Ordering::SeqCst);
                let mut sd = shutdown.clone();
                async move {
                    if attempt == 0 {
                        panic!("injected panic");
                    }
                    let _ = sd.changed().await;
                    Ok(())
                }
            },
        ));
        loop {
            let e = events.recv().await.unwrap();
            if let Event::ListenerCrashed { error, .. } = &e.kind {
                assert!(error.contains("injected panic"), "{error}");
            }
            if matches!(e.kind, Event::ListenerRestarted { attempt: 1, .. }) {
                break;
            }
        }
        assert_eq!(state.status(), ListenerStatus::Listening);
        tx.send(true).unwrap();
        assert_eq!(sup.await.unwrap(), SupervisorExit::Shutdown);
        assert_eq!(runs.load(Ordering::SeqCst), 2);
        assert_eq!(state.status(), ListenerStatus::Closed);
    }

    #[tokio::test(start_paused = true)]
    async fn shutdown_during_backoff_ends_promptly_and_never_restarts() {
        let p = RestartPolicy {
            initial_delay: Duration::from_secs(3600),
            ..policy(5)
        };
        let runs = Arc::new(AtomicU32::new(0));
        let r2 = runs.clone();
        let monitor = Monitor::default();
        let mut events = monitor.subscribe();
        let (tx, rx) = watch::channel(false);
        let t0 = Instant::now();
        let sup = tokio::spawn(supervise(
            "b".into(),
            p,
            monitor,
            Arc::new(SupervisorState::default()),
            rx,
            move |_| {
                r2.fetch_add(1, Ordering::SeqCst);
                async { Err(io::Error::other("boom")) }
            },
        ));
        loop {
            if matches!(
                events.recv().await.unwrap().kind,
                Event::ListenerCrashed { .. }
            ) {
                break;
            }
        }
        tx.send(true).unwrap();
        assert_eq!(sup.await.unwrap(), SupervisorExit::Shutdown);
        assert!(
            t0.elapsed() < Duration::from_secs(1),
            "waited out the backoff: {:?}",
            t0.elapsed()
        );
        assert_eq!(runs.load(Ordering::SeqCst), 1);

        // A run that fails after shutdown began is not restarted.
        let (tx, rx) = watch::channel(false);
        let runs = Arc::new(AtomicU32::new(0));
        let r2 = runs.clone();
        let exit = supervise(
            "c".into(),
            policy(5),
            Monitor::default(),
            Arc::new(SupervisorState::default()),
            rx,
            move |_| {
                r2.fetch_add(1, Ordering::SeqCst);
                tx.send_replace(true);
                async { Err(io::Error::other("failed while stopping")) }
            },
        )
        .await;
        assert_eq!(exit, SupervisorExit::Shutdown);
        assert_eq!(runs.load(Ordering::SeqCst), 1);
    }
}
