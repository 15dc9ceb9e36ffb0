//! A session's life beside its connections: attach (resume, take over, or create it
//! within the registry's limits, for its owner only), detach (the will, now or delayed;
//! the expiry clock) and end. The registry (`registry.rs`) holds the table; this is what
//! happens to a session as connections come and go.

use crate::session::Subscription;
use halyard_store::{SessionOwner, SessionRecord, SubscriptionRecord};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use halyard_store::{Op, PendingWill as StoredWill};
use tokio::time::Instant;

use crate::message::Message;
use crate::message::stored;
use crate::registry::{Full, SessionLimits};
use crate::session::{ConnInfo, PendingWill, Session};
use crate::state::Inner;

/// Why `attach_session` gave no session.
#[derive(Debug)]
pub(crate) enum NotAttached {
    /// The client id belongs to a session bound to another identity.
    OtherOwner,
    /// A new session would be over `max_sessions` or `max_sessions_per_user`.
    Full(Full),
}

/// Finds or creates the session for a new connection, taking it over from any connection
/// attached to it [MQTT-3.1.4-3]. Returns it and "session present". Refused when the
/// client id belongs to a session bound to another identity (`SessionState::owner`):
/// that session, and any connection attached to it, are left as they are, so no one
/// can read, discard or kick another user's session by naming its client id; and when a
/// new session is over the registry's limits (resuming one never is).
pub(crate) fn attach_session(
    inner: &Arc<Inner>,
    client_id: &Arc<str>,
    expiry: u32,
    conn_id: u64,
    info: Arc<ConnInfo>,
    now: Instant,
) -> Result<(Arc<Session>, bool), NotAttached> {
    let (clean_start, protocol) = (info.clean_start, info.protocol);
    let limits = {
        let cfg = inner.cfg();
        SessionLimits {
            max_sessions: cfg.max_sessions,
            max_per_user: cfg.max_sessions_per_user,
        }
    };
    let existing = inner
        .sessions
        .claim(client_id, info.username.as_ref(), limits)
        .map_err(NotAttached::Full)?;
    if let Some(old) = existing {
        let mut st = old.lock();
        if !st.ended
            && let Some(owner) = st.owner()
            && owner != info.username.as_ref()
        {
            return Err(NotAttached::OtherOwner);
        }
        // Taking over closes the old connection, which ends a session that lasts only as
        // long as its connection (v5 expiry 0, 3.x clean session) [MQTT-3.1.2-11]: it is
        // not resumed. (Its DISCONNECT may also still be unread on the old socket; the
        // client then expects no session either.)
        let mut ends_with_old_connection = false;
        if let Some(old_id) = st.take_conn() {
            inner.keepalive_cancel(&st, old_id, now);
            ends_with_old_connection = st.expiry_interval == 0;
            old.kicked();
        }
        if !clean_start && !st.ended && !ends_with_old_connection {
            st.attach(conn_id);
            st.info = Some(info);
            inner.keepalive_start(&old, &mut st, conn_id, now);
            st.protocol = protocol;
            st.expiry_interval = expiry;
            // A new connection before the will delay cancels the will [MQTT-3.1.3-9].
            let had_will = st.pending_will.take().is_some();
            drop(st);
            if had_will {
                inner.store.apply(vec![Op::WillPending {
                    client_id: client_id.to_string(),
                    will: None,
                }]);
            }
            old.online.store(true, Ordering::Relaxed);
            return Ok((old, true));
        }
        drop(st);
        inner.end_session(&old);
    }
    let owner = info.username.clone();
    let session = Arc::new(Session::new(client_id.clone(), protocol, expiry));
    {
        let mut st = session.lock();
        st.attach(conn_id);
        st.info = Some(info);
        inner.keepalive_start(&session, &mut st, conn_id, now);
    }
    session.online.store(true, Ordering::Relaxed);
    inner
        .sessions
        .insert(client_id.clone(), session.clone(), owner);
    Ok((session, false))
}

/// Detaches a closed connection from its session: publishes or schedules its will, and
/// ends the session or starts its expiry clock.
pub(crate) fn detach(
    inner: &Arc<Inner>,
    session: &Arc<Session>,
    conn_id: u64,
    will: Option<Arc<Message>>,
    will_delay: u32,
    now: Instant,
) {
    let wall = inner.wall_at(now);
    let mut st = session.lock();
    let still_mine = st.is_attached(conn_id);
    if still_mine {
        inner.keepalive_cancel(&st, conn_id, now);
        session.forget_waker();
        st.detach_at(wall);
        session.online.store(false, Ordering::Relaxed);
    }
    let ends_now = st.ended || (still_mine && st.expiry_interval == 0);
    let mut publish_now = None;
    let mut pending_store = None;
    if let Some(w) = will {
        if ends_now || will_delay == 0 {
            publish_now = Some(w);
        } else if still_mine {
            // [MQTT-3.1.3-9]: published after the delay or at session end, whichever first.
            let due = now + Duration::from_secs(u64::from(will_delay));
            pending_store = Some(StoredWill {
                message: stored(&w),
                retain: w.retain,
                due: wall + Duration::from_secs(u64::from(will_delay)),
            });
            st.pending_will = Some(PendingWill { msg: w });
            inner.timers.schedule(
                due,
                crate::timers::TimerEvent::Will(session.clone(), conn_id),
            );
        }
        // Otherwise a new connection took the session over before the delay: not sent.
    }
    let expiry = st.expiry_interval;
    // Shared-subscription messages this member had not sent go to the other members; if
    // the session ends, its unacknowledged ones too (they would be lost otherwise).
    let orphans = if still_mine {
        let durable = inner.durable_now();
        st.take_shared(ends_now, &session.client_id, &*inner.store, durable)
    } else {
        Vec::new()
    };
    drop(st);
    if !orphans.is_empty() {
        inner.redispatch_shared(session, orphans);
    }
    if let Some(w) = publish_now {
        inner.publish_will(session, &w);
    }
    if !still_mine {
        return;
    }
    if ends_now {
        inner.end_session(session);
        return;
    }
    inner.persist_session(session, Some(now));
    if let Some(w) = pending_store {
        inner.store.apply(vec![Op::WillPending {
            client_id: session.client_id.to_string(),
            will: Some(w),
        }]);
    }
    if expiry != u32::MAX {
        let at = now + Duration::from_secs(u64::from(expiry));
        inner.timers.schedule(
            at,
            crate::timers::TimerEvent::SessionExpiry(session.clone(), conn_id),
        );
    }
}

/// A server-assigned client identifier [MQTT-3.1.3-7]: unique within this broker's
/// lifetime by the connection counter, and across restarts by the start time.
pub(crate) fn assign_client_id(inner: &Inner, now: Instant) -> String {
    let n = inner.next_conn_id.fetch_add(1, Ordering::Relaxed);
    let t = inner
        .wall_at(now)
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    format!("halyard-{t:x}-{n:x}")
}

impl Inner {
    /// Discards a session: its subscriptions, queue and pending will (published now, as the
    /// session's end comes before its delay [MQTT-3.1.3-9]).
    /// Shared-subscription messages it holds, queued or QoS 1 in flight, go to the other
    /// members of their groups (section 4.8.2), whenever the session ends: at once (expiry
    /// 0), on expiry, or discarded by a clean start.
    pub(crate) fn end_session(&self, session: &Arc<Session>) {
        let (subs, will, stored, orphans) = {
            let mut st = session.lock();
            if st.ended {
                return;
            }
            st.ended = true;
            let orphans =
                st.take_shared(true, &session.client_id, &*self.store, self.durable_now());
            st.clear_messages();
            let subs: Vec<Subscription> = st.subscriptions.drain().map(|(_, s)| s).collect();
            (subs, st.pending_will.take(), st.stored, orphans)
        };
        self.sessions.remove(&session.client_id, session);
        for s in &subs {
            self.subs.unsubscribe(&s.filter, session);
            self.memory
                .add_subscription_bytes(-Subscription::cost(s.filter.as_str()));
        }
        if !orphans.is_empty() {
            self.redispatch_shared(session, orphans);
        }
        if stored {
            self.store.apply(vec![Op::SessionDelete {
                client_id: session.client_id.to_string(),
            }]);
        }
        if let Some(w) = will {
            self.publish_will(session, &w.msg);
        }
    }

    /// Records the session header if the session outlives its connection (clean sessions
    /// are never written). Under the session lock, to keep its ops in order.
    pub(crate) fn persist_session(&self, session: &Session, disconnected: Option<Instant>) -> u64 {
        let mut st = session.lock();
        if st.expiry_interval == 0 || st.ended {
            return 0;
        }
        st.stored = true;
        let rec = SessionRecord {
            client_id: session.client_id.to_string(),
            protocol: st.protocol,
            expiry_interval: st.expiry_interval,
            disconnected_at: disconnected.map(|at| self.wall_at(at)),
            owner: match st.owner() {
                None => SessionOwner::Unknown,
                Some(None) => SessionOwner::Anonymous,
                Some(Some(u)) => SessionOwner::User(u.to_string()),
            },
        };
        self.store.apply(vec![Op::SessionUpsert(rec)])
    }

    pub(crate) fn persist_subscription(&self, session: &Session, sub: &Subscription) -> u64 {
        let st = session.lock();
        if !st.stored {
            return 0;
        }
        self.store.apply(vec![Op::Subscribe {
            client_id: session.client_id.to_string(),
            subscription: SubscriptionRecord {
                filter: sub.filter.to_string(),
                options: sub.options,
                identifier: sub.id,
            },
        }])
    }
}
