//! Session ownership: which session holds each client id, behind `SessionOwnership`, the
//! seam a cluster replaces. `LocalSessions` is this node's table: client id -> session,
//! with the counts its limits need (`max_sessions`, `max_sessions_per_user`).
//!
//! Locked only to find, claim, insert or remove a session; never held while a session
//! lock is taken. A session's owner is kept beside it here, fixed when it is registered,
//! so the per-user counts need no session lock.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use crate::session::Session;

/// Who holds the session of each client id, and the fence that moves it.
///
/// Standalone, `LocalSessions`: one table in memory; a takeover fences the old connection
/// by kicking it under the session's lock (`lifecycle::attach_session`). A cluster
/// implementation keeps one ownership record per client id that a single node holds at a
/// time (a compare-and-set on its revision), and its `claim` first fences the node that
/// held it (that node kicks its connection and hands over, or drops, its copy) before
/// answering with the session to resume here.
pub(crate) trait SessionOwnership: Send + Sync + std::fmt::Debug {
    /// The session of `client_id` held here, if any.
    fn get(&self, client_id: &str) -> Option<Arc<Session>>;
    /// Claims `client_id` for a new connection of `owner` on this node: `Some` is the
    /// session to resume or replace (the caller checks its owner under its lock); `None`
    /// means there is none, and one more is within `limits`.
    fn claim(
        &self,
        client_id: &str,
        owner: Option<&Arc<str>>,
        limits: SessionLimits,
    ) -> Result<Option<Arc<Session>>, Full>;
    /// Records a session made or restored here, replacing any under the same id.
    fn insert(&self, client_id: Arc<str>, session: Arc<Session>, owner: Option<Arc<str>>);
    /// Forgets `session` (it ended), unless a newer session holds its id.
    fn remove(&self, client_id: &str, session: &Arc<Session>);
    /// Every session held here (a copy; the table is locked only to copy it).
    fn snapshot(&self) -> Vec<Arc<Session>>;
    /// How many sessions are held here.
    fn len(&self) -> usize;
}

/// The limits a claim for a new session is checked against (0: none).
#[derive(Debug, Clone, Copy)]
pub(crate) struct SessionLimits {
    pub(crate) max_sessions: usize,
    pub(crate) max_per_user: u32,
}

/// This node's sessions: the standalone `SessionOwnership`.
#[derive(Debug, Default)]
pub(crate) struct LocalSessions(Mutex<Registry>);

impl LocalSessions {
    fn table(&self) -> std::sync::MutexGuard<'_, Registry> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl SessionOwnership for LocalSessions {
    fn get(&self, client_id: &str) -> Option<Arc<Session>> {
        self.table().get(client_id).cloned()
    }

    fn claim(
        &self,
        client_id: &str,
        owner: Option<&Arc<str>>,
        limits: SessionLimits,
    ) -> Result<Option<Arc<Session>>, Full> {
        let table = self.table();
        match table.get(client_id) {
            Some(s) => Ok(Some(s.clone())),
            // One more session only when none is there to resume or replace.
            None => table
                .admit(owner, limits.max_sessions, limits.max_per_user)
                .map(|()| None),
        }
    }

    fn insert(&self, client_id: Arc<str>, session: Arc<Session>, owner: Option<Arc<str>>) {
        self.table().insert(client_id, session, owner);
    }

    fn remove(&self, client_id: &str, session: &Arc<Session>) {
        self.table().remove(client_id, session);
    }

    fn snapshot(&self) -> Vec<Arc<Session>> {
        self.table().sessions().cloned().collect()
    }

    fn len(&self) -> usize {
        self.table().len()
    }
}

#[derive(Debug, Default)]
pub(crate) struct Registry {
    by_id: HashMap<Arc<str>, Registered>,
    /// Sessions per verified user name (anonymous sessions count only towards the total).
    per_user: HashMap<Arc<str>, u32>,
}

#[derive(Debug)]
struct Registered {
    session: Arc<Session>,
    owner: Option<Arc<str>>,
}

/// Why a new session was not admitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Full {
    /// `max_sessions` sessions exist.
    Sessions,
    /// The user holds `max_sessions_per_user` sessions.
    User,
}

impl Registry {
    pub(crate) fn get(&self, client_id: &str) -> Option<&Arc<Session>> {
        self.by_id.get(client_id).map(|r| &r.session)
    }

    pub(crate) fn len(&self) -> usize {
        self.by_id.len()
    }

    pub(crate) fn sessions(&self) -> impl Iterator<Item = &Arc<Session>> {
        self.by_id.values().map(|r| &r.session)
    }

    /// Whether one more session for `owner` is within `max_sessions` and
    /// `max_sessions_per_user` (0: no limit). Checked before a session is built; the
    /// insert that follows takes the lock again, so connects racing for the last places
    /// may pass it together (by at most the connects in flight).
    pub(crate) fn admit(
        &self,
        owner: Option<&Arc<str>>,
        max_sessions: usize,
        max_per_user: u32,
    ) -> Result<(), Full> {
        if max_sessions > 0 && self.by_id.len() >= max_sessions {
            return Err(Full::Sessions);
        }
        if max_per_user > 0
            && let Some(u) = owner
            && self.per_user.get(u).copied().unwrap_or(0) >= max_per_user
        {
            return Err(Full::User);
        }
        Ok(())
    }

    /// Registers `session` under `client_id`, replacing any session there.
    pub(crate) fn insert(
        &mut self,
        client_id: Arc<str>,
        session: Arc<Session>,
        owner: Option<Arc<str>>,
    ) {
        if let Some(u) = &owner {
            *self.per_user.entry(u.clone()).or_default() += 1;
        }
        if let Some(old) = self.by_id.insert(client_id, Registered { session, owner }) {
            self.forget_owner(old.owner.as_ref());
        }
    }

    /// Removes `client_id` if `session` is what is registered there (a newer session
    /// under the same id stays).
    pub(crate) fn remove(&mut self, client_id: &str, session: &Arc<Session>) {
        if self
            .by_id
            .get(client_id)
            .is_some_and(|r| Arc::ptr_eq(&r.session, session))
            && let Some(old) = self.by_id.remove(client_id)
        {
            self.forget_owner(old.owner.as_ref());
        }
    }

    fn forget_owner(&mut self, owner: Option<&Arc<str>>) {
        if let Some(u) = owner
            && let Some(n) = self.per_user.get_mut(u)
        {
            *n -= 1;
            if *n == 0 {
                self.per_user.remove(u);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use halyard_codec::ProtocolVersion;

    fn session(id: &str) -> Arc<Session> {
        Arc::new(Session::new(id.into(), ProtocolVersion::V5, 60))
    }

    #[test]
    fn limits_count_sessions_and_each_users_sessions() {
        let mut r = Registry::default();
        let alice: Arc<str> = "alice".into();
        let (a1, a2) = (session("a1"), session("a2"));
        assert_eq!(r.admit(Some(&alice), 3, 2), Ok(()));
        r.insert("a1".into(), a1.clone(), Some(alice.clone()));
        r.insert("a2".into(), a2.clone(), Some(alice.clone()));
        assert_eq!(r.admit(Some(&alice), 3, 2), Err(Full::User));
        assert_eq!(r.admit(None, 3, 2), Ok(()), "anonymous: only the total");
        r.insert("x".into(), session("x"), None);
        assert_eq!(r.admit(None, 3, 2), Err(Full::Sessions));
        assert_eq!(r.admit(None, 0, 0), Ok(()), "0: no limit");
        // A newer session under the same id replaces the count of the old one.
        let a1b = session("a1");
        r.insert("a1".into(), a1b.clone(), Some(alice.clone()));
        assert_eq!(r.per_user.get(&alice), Some(&2));
        // Removing a session that is no longer registered changes nothing.
        r.remove("a1", &a1);
        assert_eq!((r.len(), r.per_user.get(&alice)), (3, Some(&2)));
        r.remove("a1", &a1b);
        r.remove("a2", &a2);
        assert_eq!((r.len(), r.per_user.get(&alice)), (1, None));
        assert_eq!(r.admit(Some(&alice), 3, 2), Ok(()));
    }
}
