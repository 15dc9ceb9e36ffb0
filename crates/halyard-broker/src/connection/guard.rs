//! What a connection checks before it acts for its client: the publish rate budget and
//! the topic access decisions, cached per connection.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use crate::auth::{Access, Authorizer, Identity, sys_denied};
use tokio::time::Instant;
use tracing::debug;

use super::*;
use crate::stats::Stats;

/// A client's publish budget: token buckets of messages and payload bytes, refilled
/// continuously at the configured rates with one second of burst. Spending may go below
/// zero (a packet is never split); reads pause until the budget is positive again. Exists
/// only for connections with a rate configured (`PublishRate::new`).
#[derive(Debug)]
pub(super) struct PublishRate {
    msgs_per_sec: f64,
    bytes_per_sec: f64,
    msgs: f64,
    bytes: f64,
    last: Instant,
    throttled: bool,
}

impl PublishRate {
    /// `None` when no rate is configured.
    pub(super) fn new(cfg: &crate::config::BrokerConfig, now: Instant) -> Option<Self> {
        let m = f64::from(cfg.publish_rate_messages);
        let b = cfg.publish_rate_bytes as f64;
        let r = PublishRate {
            msgs_per_sec: m,
            bytes_per_sec: b,
            msgs: m,
            bytes: b,
            last: now,
            throttled: false,
        };
        r.enabled().then_some(r)
    }

    pub(super) fn enabled(&self) -> bool {
        self.msgs_per_sec > 0.0 || self.bytes_per_sec > 0.0
    }

    pub(super) fn refill(&mut self, now: Instant) {
        let dt = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        self.msgs = (self.msgs + dt * self.msgs_per_sec).min(self.msgs_per_sec);
        self.bytes = (self.bytes + dt * self.bytes_per_sec).min(self.bytes_per_sec);
    }

    pub(super) fn spend(&mut self, payload: usize, now: Instant) {
        self.refill(now);
        if self.msgs_per_sec > 0.0 {
            self.msgs -= 1.0;
        }
        if self.bytes_per_sec > 0.0 {
            self.bytes -= payload as f64;
        }
    }

    /// When reading may resume, if the budget is spent.
    /// Counts each new pause in `stats.publish_throttled`.
    pub(super) fn blocked_until(&mut self, now: Instant, stats: &Stats) -> Option<Instant> {
        self.refill(now);
        let wait = |have: f64, rate: f64| {
            if rate > 0.0 && have < 0.0 {
                -have / rate
            } else {
                0.0
            }
        };
        let secs = wait(self.msgs, self.msgs_per_sec).max(wait(self.bytes, self.bytes_per_sec));
        if secs <= 0.0 {
            self.throttled = false;
            return None;
        }
        if !self.throttled {
            self.throttled = true;
            Stats::inc(&stats.publish_throttled);
        }
        Some(now + Duration::from_secs_f64(secs))
    }
}

/// Topic access decisions of one connection, dropped when the rules change (the broker's
/// security generation moves) and bounded in size.
#[derive(Debug, Default)]
pub(super) struct AclCache {
    generation: u64,
    /// Only while an authorizer is configured: boxed, as most brokers have none.
    checked: Option<Box<AclChecked>>,
}

impl AclCache {
    /// Empty: loaded on first use.
    pub(super) fn new() -> Self {
        AclCache {
            generation: u64::MAX,
            checked: None,
        }
    }
}

#[derive(Debug)]
pub(super) struct AclChecked {
    authorizer: Arc<dyn Authorizer>,
    identity: Identity,
    /// One map per `Access` (write, subscribe, read).
    decisions: [Decisions; 3],
}

/// Cached decisions of one access kind, by topic.
type Decisions = HashMap<Box<str>, bool>;

/// Most cached decisions per connection and access kind; beyond it the cache starts over.
const ACL_CACHE_ENTRIES: usize = 1024;

impl Proto {
    /// Whether this client may do `access` on `topic`, from the cache when possible.
    /// `$SYS` is the broker's: never writable by a client, whatever the rules say, but
    /// for its own bridge state topic (the same rule as `Inner::may_write`, for the paths
    /// without a connection). The broker's own in-process clients are not checked.
    #[inline]
    pub(super) fn allowed(&mut self, access: Access, topic: &str) -> bool {
        if self.flags.has(Flags::TRUSTED) {
            return true;
        }
        if access == Access::Write && sys_denied(topic, &self.at.session.client_id) {
            return false;
        }
        let generation = self.inner.security_generation();
        if generation != self.acl.generation {
            self.acl.generation = generation;
            self.acl.checked = self.inner.security().authorizer.clone().map(|authorizer| {
                Box::new(AclChecked {
                    authorizer,
                    identity: Identity {
                        client_id: self.at.session.client_id.clone(),
                        username: self.info.username.clone(),
                    },
                    decisions: Default::default(),
                })
            });
        }
        let Some(c) = &mut self.acl.checked else {
            return true;
        };
        let map = &mut c.decisions[access as usize];
        if let Some(&d) = map.get(topic) {
            return d;
        }
        let d = c.authorizer.check(&c.identity, access, topic);
        if map.len() >= ACL_CACHE_ENTRIES {
            map.clear();
        }
        map.insert(topic.into(), d);
        if !d {
            debug!(client_id = %self.at.session.client_id, ?access, topic, "denied by the authorizer");
        }
        d
    }
}
