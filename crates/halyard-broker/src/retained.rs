//! Retained messages (section 3.3.1.3), one per topic.
//!
//! Kept in a map under an `RwLock`: publishes with RETAIN take the write lock for one insert
//! or remove; SUBSCRIBE reads. A filter with wildcards scans all topics, which is fine for
//! the tens of thousands of retained messages typical deployments hold; a trie keyed like
//! the subscription index is the planned replacement when that stops being true.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use halyard_codec::TopicFilter;
use tokio::time::Instant;

use crate::message::Message;

#[derive(Debug, Default)]
pub(crate) struct Retained {
    map: RwLock<HashMap<Box<str>, Arc<Message>>>,
}

impl Retained {
    /// Sets (or, with an empty payload, deletes [MQTT-3.3.1-6]) the topic's retained
    /// message. Returns true if the topic had one before.
    pub(crate) fn set(&self, msg: &Arc<Message>) -> bool {
        let mut map = self.map.write().unwrap_or_else(|e| e.into_inner());
        if msg.payload.is_empty() {
            map.remove(msg.topic.as_str()).is_some()
        } else {
            map.insert(msg.topic.as_str().into(), msg.clone()).is_some()
        }
    }

    /// Restores one message at start-up.
    pub(crate) fn restore(&self, msg: Arc<Message>) {
        let mut map = self.map.write().unwrap_or_else(|e| e.into_inner());
        map.insert(msg.topic.as_str().into(), msg);
    }

    /// Unexpired retained messages matching `filter`.
    pub(crate) fn matching(&self, filter: &TopicFilter, now: Instant) -> Vec<Arc<Message>> {
        let map = self.map.read().unwrap_or_else(|e| e.into_inner());
        if !filter.has_wildcards() {
            return map
                .get(filter.filter())
                .filter(|m| !m.is_expired(now))
                .cloned()
                .into_iter()
                .collect();
        }
        map.values()
            .filter(|m| !m.is_expired(now) && filter.matches(m.topic.as_str()))
            .cloned()
            .collect()
    }

    /// Removes expired messages; returns their topics.
    pub(crate) fn sweep(&self, now: Instant) -> Vec<String> {
        let mut map = self.map.write().unwrap_or_else(|e| e.into_inner());
        let expired: Vec<String> = map
            .iter()
            .filter(|(_, m)| m.is_expired(now))
            .map(|(t, _)| t.to_string())
            .collect();
        for t in &expired {
            map.remove(t.as_str());
        }
        expired
    }

    pub(crate) fn len(&self) -> usize {
        self.map.read().unwrap_or_else(|e| e.into_inner()).len()
    }
}
