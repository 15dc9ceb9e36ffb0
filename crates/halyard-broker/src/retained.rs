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
    /// Bytes held, as `Message::cost` counts them (under the map's lock; read without
    /// it for limits).
    bytes: std::sync::atomic::AtomicUsize,
    /// How many of the topics start with `$` (the broker's `$SYS` state), so operators
    /// can be shown their own count.
    dollar: std::sync::atomic::AtomicUsize,
}

/// What `Retained::set` did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum SetOutcome {
    /// Stored, replaced or deleted as asked.
    Done,
    /// A new message over the count or byte limit: not retained.
    OverLimit,
}

impl Retained {
    /// Sets (or, with an empty payload, deletes [MQTT-3.3.1-6]) the topic's retained
    /// message, within `max_messages` and `max_bytes` (0: no limit). A replacement may
    /// always shrink or keep its topic's share.
    pub(crate) fn set(
        &self,
        msg: &Arc<Message>,
        max_messages: usize,
        max_bytes: usize,
    ) -> SetOutcome {
        use std::sync::atomic::Ordering::Relaxed;
        let mut map = self.map.write().unwrap_or_else(|e| e.into_inner());
        if msg.payload.is_empty() {
            if let Some(old) = map.remove(msg.topic.as_str()) {
                self.bytes.fetch_sub(old.cost(), Relaxed);
                self.count_dollar(msg.topic.as_str(), false);
            }
            return SetOutcome::Done;
        }
        let old_len = map.get(msg.topic.as_str()).map(|m| m.cost());
        let count_after = map.len() + usize::from(old_len.is_none());
        let bytes_after = self.bytes.load(Relaxed) - old_len.unwrap_or(0) + msg.cost();
        let grows = old_len.is_none_or(|l| msg.cost() > l);
        if grows
            && ((max_messages > 0 && count_after > max_messages)
                || (max_bytes > 0 && bytes_after > max_bytes))
        {
            return SetOutcome::OverLimit;
        }
        if map.insert(msg.topic.as_str().into(), msg.clone()).is_none() {
            self.count_dollar(msg.topic.as_str(), true);
        }
        self.bytes.store(bytes_after, Relaxed);
        SetOutcome::Done
    }

    /// Restores one message at start-up.
    pub(crate) fn restore(&self, msg: Arc<Message>) {
        let mut map = self.map.write().unwrap_or_else(|e| e.into_inner());
        let len = msg.cost();
        let topic = msg.topic.clone();
        if let Some(old) = map.insert(msg.topic.as_str().into(), msg) {
            self.bytes
                .fetch_sub(old.cost(), std::sync::atomic::Ordering::Relaxed);
        } else {
            self.count_dollar(topic.as_str(), true);
        }
        self.bytes
            .fetch_add(len, std::sync::atomic::Ordering::Relaxed);
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
            if let Some(old) = map.remove(t.as_str()) {
                self.bytes
                    .fetch_sub(old.cost(), std::sync::atomic::Ordering::Relaxed);
                self.count_dollar(t, false);
            }
        }
        expired
    }

    /// Removes a topic's message; false if there was none.
    pub(crate) fn remove(&self, topic: &str) -> bool {
        let mut map = self.map.write().unwrap_or_else(|e| e.into_inner());
        match map.remove(topic) {
            Some(old) => {
                self.bytes
                    .fetch_sub(old.cost(), std::sync::atomic::Ordering::Relaxed);
                self.count_dollar(topic, false);
                true
            }
            None => false,
        }
    }

    fn count_dollar(&self, topic: &str, added: bool) {
        use std::sync::atomic::Ordering::Relaxed;
        if topic.starts_with('$') {
            if added {
                self.dollar.fetch_add(1, Relaxed);
            } else {
                self.dollar.fetch_sub(1, Relaxed);
            }
        }
    }

    /// Topics held whose names start with `$`.
    pub(crate) fn dollar_len(&self) -> usize {
        self.dollar.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Payload bytes held.
    pub(crate) fn bytes(&self) -> usize {
        self.bytes.load(std::sync::atomic::Ordering::Relaxed)
    }

    pub(crate) fn len(&self) -> usize {
        self.map.read().unwrap_or_else(|e| e.into_inner()).len()
    }
}
