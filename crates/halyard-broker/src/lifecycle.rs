//! A session's life beside its connections: attach (resume, take over, or create it
//! within the registry's limits, for its owner only), detach (the will, now or delayed;
//! the expiry clock) and end. The registry (`registry.rs`) holds the table; this is what
//! happens to a session as connections come and go.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use halyard_codec::ProtocolVersion;
use halyard_store::{Op, PendingWill as StoredWill};
use tokio::time::Instant;

use crate::broker::{Inner, stored};
use crate::message::Message;
use crate::registry::Full;
use crate::session::{ConnInfo, PendingWill, Session};

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
    clean_start: bool,
    protocol: ProtocolVersion,
    expiry: u32,
    conn_id: u64,
    info: Arc<ConnInfo>,
) -> Result<(Arc<Session>, bool), NotAttached> {
    let existing = {
        let reg = inner.sessions.lock().unwrap_or_else(|e| e.into_inner());
        let existing = reg.get(client_id).cloned();
        // One more session only when none is there to resume or replace.
        if existing.is_none() {
            let cfg = inner.cfg();
            reg.admit(
                info.username.as_ref(),
                cfg.max_sessions,
                cfg.max_sessions_per_user,
            )
            .map_err(NotAttached::Full)?;
        }
        existing
    };
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
            inner.keepalive_cancel(&st, old_id);
            ends_with_old_connection = st.expiry_interval == 0;
            old.kicked();
        }
        if !clean_start && !st.ended && !ends_with_old_connection {
            st.attach(conn_id);
            st.info = Some(info);
            inner.keepalive_start(&old, &mut st, conn_id);
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
        inner.keepalive_start(&session, &mut st, conn_id);
    }
    session.online.store(true, Ordering::Relaxed);
    inner
        .sessions
        .lock()
        .unwrap_or_else(|e| e.into_inner())
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
) {
    let now = Instant::now();
    let mut st = session.lock();
    let still_mine = st.is_attached(conn_id);
    if still_mine {
        inner.keepalive_cancel(&st, conn_id);
        session.forget_waker();
        st.detach_at(std::time::SystemTime::now());
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
                due: std::time::SystemTime::now() + Duration::from_secs(u64::from(will_delay)),
            });
            st.pending_will = Some(PendingWill { msg: w });
            inner.timers.schedule(
                due,
                crate::broker::TimerEvent::Will(session.clone(), conn_id),
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
    inner.persist_session(session, false);
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
            crate::broker::TimerEvent::SessionExpiry(session.clone(), conn_id),
        );
    }
}

/// A server-assigned client identifier [MQTT-3.1.3-7]: unique within this broker's
/// lifetime by the connection counter, and across restarts by the start time.
pub(crate) fn assign_client_id(inner: &Inner) -> String {
    let n = inner.next_conn_id.fetch_add(1, Ordering::Relaxed);
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    format!("halyard-{t:x}-{n:x}")
}
