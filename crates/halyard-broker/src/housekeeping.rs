//! The broker's own tasks: one fires timed events and keep-alive deadlines, one wakes the
//! connections waiting for the store to make their writes durable.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use halyard_codec::ReasonCode;
use halyard_store::Op;
use tokio::sync::watch;
use tokio::time::Instant;
use tracing::info;

use crate::session::Session;
use crate::state::Inner;
use crate::stats::Stats;
use crate::timers::TimerEvent;

/// How often expired retained messages are swept (they are never delivered once expired;
/// the sweep only frees memory).
const RETAINED_SWEEP_INTERVAL: Duration = Duration::from_secs(60);

impl Inner {
    /// Asks `notify_durable` to wake `session`'s connection the next time the store's
    /// durable ticket moves. The caller reads the ticket again after this: one that moved
    /// just before could not wake it.
    pub(crate) fn wait_durable(&self, session: &Arc<Session>) {
        if !session.durable_waiting.swap(true, Ordering::AcqRel) {
            self.durable_waiters
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(session.clone());
        }
    }

    pub(crate) fn keepalive_next(&self) -> Option<Instant> {
        let q = self
            .timers
            .keepalive
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        q.keys()
            .next()
            .map(|k| self.started + Duration::from_millis(k.0))
    }

    /// Closes the connections whose keep alive ran out by `now` [MQTT-3.1.2-22] (through
    /// their kick, with Keep Alive timeout 0x8D) and moves the others' deadlines to 1.5
    /// keep alives after they were last heard from.
    pub(crate) fn keepalive_expire(&self, now: Instant) {
        let now_ms = self.ms_at(now);
        let due = {
            let mut q = self
                .timers
                .keepalive
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            let later = q.split_off(&(now_ms + 1, 0));
            std::mem::replace(&mut *q, later)
        };
        for ((_, conn_id), session) in due {
            let mut st = session.lock();
            if !st.is_attached(conn_id) {
                continue; // it ended or was taken over
            }
            let limit = st
                .info
                .as_ref()
                .map_or(0, |i| u64::from(i.keep_alive) * 1500);
            // Wrapping: `last_rx` keeps milliseconds in 32 bits. One read just now can be
            // ahead of `now_ms`: that is no silence at all.
            let since = (now_ms as u32).wrapping_sub(session.last_rx.load(Ordering::Relaxed));
            let silent = if since > 1 << 31 { 0 } else { u64::from(since) };
            if silent < limit {
                self.keepalive_schedule(&session, &mut st, conn_id, now_ms - silent + limit);
            } else {
                session.kick(&mut st, ReasonCode::KeepAliveTimeout);
            }
        }
    }
}

/// One task per broker: each time the store makes more of its log durable, wakes the
/// connections waiting for it (held acknowledgements and deliveries, see
/// `Inner::wait_durable`). One watcher for all of them instead of a `changed()` future in
/// every connection's task, which was 136 bytes of each connection, idle ones included.
/// When the store stops, wakes them all a last time (they then see it closed).
pub(crate) async fn notify_durable(inner: std::sync::Weak<Inner>, mut rx: watch::Receiver<u64>) {
    loop {
        let stopped = rx.changed().await.is_err();
        let Some(inner) = inner.upgrade() else { return };
        let waiters = std::mem::take(
            &mut *inner
                .durable_waiters
                .lock()
                .unwrap_or_else(|e| e.into_inner()),
        );
        for s in waiters {
            s.durable_waiting.store(false, Ordering::Release);
            s.wake();
        }
        if stopped {
            return;
        }
    }
}

/// One task per broker: fires session expiry, delayed wills and retained sweeps.
pub(crate) async fn housekeeping(inner: Arc<Inner>) {
    let mut shutdown = inner.shutdown.subscribe();
    inner.timers.schedule(
        Instant::now() + RETAINED_SWEEP_INTERVAL,
        TimerEvent::RetainedSweep,
    );
    loop {
        let next = [inner.timers.next_deadline(), inner.keepalive_next()]
            .into_iter()
            .flatten()
            .min();
        tokio::select! {
            _ = shutdown.changed() => return,
            _ = inner.timers.changed.notified() => continue,
            _ = sleep_until_opt(next) => {}
        }
        inner.tick(Instant::now());
    }
}

impl Inner {
    /// Acts on every deadline due by `now`: keep alives run out [MQTT-3.1.2-22], sessions
    /// expire, delayed wills are published [MQTT-3.1.3-9], expired retained messages are
    /// swept. The housekeeping task calls it with the clock; a simulator with its own.
    pub(crate) fn tick(&self, now: Instant) {
        self.keepalive_expire(now);
        for ev in self.timers.take_due(now) {
            match ev {
                TimerEvent::SessionExpiry(session, generation) => {
                    let expired = {
                        let st = session.lock();
                        st.conn().is_none() && st.generation == generation && !st.ended
                    };
                    if expired {
                        info!(client_id = %session.client_id, "session expired");
                        Stats::inc(&self.stats.sessions_expired);
                        self.end_session(&session);
                    }
                }
                TimerEvent::Will(session, generation) => {
                    let will = {
                        let mut st = session.lock();
                        if st.conn().is_none() && st.generation == generation {
                            st.pending_will.take()
                        } else {
                            None
                        }
                    };
                    if let Some(w) = will {
                        self.store.apply(vec![Op::WillPending {
                            client_id: session.client_id.to_string(),
                            will: None,
                        }]);
                        self.publish_will(&session, &w.msg);
                    }
                }
                TimerEvent::RetainedSweep => {
                    let gone = self.retained.sweep(now);
                    if !gone.is_empty() {
                        self.store.apply(
                            gone.into_iter()
                                .map(|topic| Op::RetainDelete { topic })
                                .collect(),
                        );
                    }
                    self.timers
                        .schedule(now + RETAINED_SWEEP_INTERVAL, TimerEvent::RetainedSweep);
                }
            }
        }
    }
}

async fn sleep_until_opt(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}
