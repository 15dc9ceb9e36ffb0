//! The subscription index: a topic trie shared by every connection task.
//!
//! Publishers match against it under a read lock (many at once); SUBSCRIBE, UNSUBSCRIBE and
//! session end take the write lock briefly. No session lock is ever taken while the trie
//! lock is held: matching only clones `Arc<Session>`s and reads an atomic "online" flag.
//! The caller enqueues after the lock is released.

use foldhash::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};

use halyard_codec::{QoS, SubscriptionOptions, TopicFilter};

use crate::session::Session;

#[derive(Debug, Clone)]
struct Entry {
    session: Arc<Session>,
    options: SubscriptionOptions,
    id: Option<u32>,
}

#[derive(Debug)]
struct SharedGroup {
    name: Box<str>,
    /// The full `$share/{name}/{filter}`, carried by deliveries for re-dispatch.
    filter: TopicFilter,
    members: Vec<Entry>,
    /// Round-robin cursor; relaxed is enough, fairness is approximate by design.
    next: AtomicUsize,
}

#[derive(Debug, Default)]
struct Node {
    children: HashMap<Box<str>, Node>,
    subscribers: Vec<Entry>,
    shared: Vec<SharedGroup>,
}

impl Node {
    fn is_empty(&self) -> bool {
        self.children.is_empty() && self.subscribers.is_empty() && self.shared.is_empty()
    }
}

/// One session that should receive a message, after overlapping subscriptions of that
/// session have been merged [MQTT-3.3.4-2, MQTT-3.3.4-3].
#[derive(Debug)]
pub(crate) struct Match {
    pub(crate) session: Arc<Session>,
    pub(crate) qos: QoS,
    /// Retain As Published on any of the merged subscriptions.
    pub(crate) retain_as_published: bool,
    pub(crate) subscription_ids: Vec<u32>,
    /// The shared subscription this delivery was chosen for, if any.
    pub(crate) shared: Option<TopicFilter>,
}

#[derive(Debug, Default)]
pub(crate) struct SubscriptionIndex {
    root: RwLock<Node>,
    count: AtomicUsize,
}

impl SubscriptionIndex {
    /// Adds or replaces `session`'s subscription to `filter` [MQTT-3.8.4-3].
    /// Returns true if one was replaced.
    pub(crate) fn subscribe(
        &self,
        filter: &TopicFilter,
        session: &Arc<Session>,
        options: SubscriptionOptions,
        id: Option<u32>,
    ) -> bool {
        let entry = Entry {
            session: session.clone(),
            options,
            id,
        };
        let mut root = self.root.write().unwrap_or_else(|e| e.into_inner());
        let mut node = &mut *root;
        for level in filter.filter().split('/') {
            node = node.children.entry(level.into()).or_default();
        }
        let list = match filter.share_name() {
            None => &mut node.subscribers,
            Some(name) => {
                let i = match node.shared.iter().position(|g| &*g.name == name) {
                    Some(i) => i,
                    None => {
                        node.shared.push(SharedGroup {
                            name: name.into(),
                            filter: filter.clone(),
                            members: Vec::new(),
                            next: AtomicUsize::new(0),
                        });
                        node.shared.len() - 1
                    }
                };
                &mut node.shared[i].members
            }
        };
        if let Some(e) = list.iter_mut().find(|e| Arc::ptr_eq(&e.session, session)) {
            *e = entry;
            return true;
        }
        list.push(entry);
        self.count.fetch_add(1, Ordering::Relaxed);
        false
    }

    /// Removes `session`'s subscription to `filter`; true if it existed.
    pub(crate) fn unsubscribe(&self, filter: &TopicFilter, session: &Arc<Session>) -> bool {
        let mut root = self.root.write().unwrap_or_else(|e| e.into_inner());
        let levels: Vec<&str> = filter.filter().split('/').collect();
        let removed = remove(&mut root, &levels, filter.share_name(), session);
        if removed {
            self.count.fetch_sub(1, Ordering::Relaxed);
        }
        removed
    }

    /// Number of subscriptions (shared members included).
    pub(crate) fn len(&self) -> usize {
        self.count.load(Ordering::Relaxed)
    }

    /// Collects the sessions that should receive a message on `topic`, merging overlapping
    /// subscriptions of one session and applying No Local against `origin`. Each matching
    /// shared group contributes one member, chosen round robin among its online members
    /// (or among all when none is online). `out` is cleared first.
    pub(crate) fn matches(&self, topic: &str, origin: Option<&str>, out: &mut Vec<Match>) {
        out.clear();
        let root = self.root.read().unwrap_or_else(|e| e.into_inner());
        let levels: Vec<&str> = topic.split('/').collect();
        let mut direct: Vec<&Entry> = Vec::new();
        let mut shared: Vec<&SharedGroup> = Vec::new();
        // [MQTT-4.7.2-1]: wildcards at the first level do not match topics starting with '$'.
        let dollar = topic.starts_with('$');
        walk(&root, &levels, 0, dollar, &mut direct, &mut shared);

        // One session's overlapping subscriptions become adjacent: merging them is then a
        // look at the last match instead of a search of all (which made a 100-subscriber
        // fan-out quadratic: 10% of its CPU).
        direct.sort_by_key(|e| Arc::as_ptr(&e.session)); // stable: ids keep walk order
        for e in direct {
            if e.options.no_local && origin.is_some_and(|o| *o == *e.session.client_id) {
                continue; // [MQTT-3.8.3-3]
            }
            let id = e.id;
            match out
                .last_mut()
                .filter(|m| Arc::ptr_eq(&m.session, &e.session))
            {
                Some(m) => {
                    m.qos = m.qos.max(e.options.qos);
                    m.retain_as_published |= e.options.retain_as_published;
                    m.subscription_ids.extend(id);
                }
                None => out.push(Match {
                    session: e.session.clone(),
                    qos: e.options.qos,
                    retain_as_published: e.options.retain_as_published,
                    subscription_ids: id.into_iter().collect(),
                    shared: None,
                }),
            }
        }
        for g in shared {
            if let Some(e) = pick(g) {
                out.push(shared_match(g, e));
            }
        }
    }

    /// Another member of the shared group `filter` for a message its member `leaving` can
    /// no longer take: an online member if there is one, else any other member.
    pub(crate) fn pick_other_member(
        &self,
        filter: &TopicFilter,
        leaving: &Arc<Session>,
    ) -> Option<Match> {
        let root = self.root.read().unwrap_or_else(|e| e.into_inner());
        let mut node = &*root;
        for level in filter.filter().split('/') {
            node = node.children.get(level)?;
        }
        let g = node
            .shared
            .iter()
            .find(|g| Some(&*g.name) == filter.share_name())?;
        let others = || {
            g.members
                .iter()
                .filter(|e| !Arc::ptr_eq(&e.session, leaving))
        };
        let e = others()
            .find(|e| e.session.is_online())
            .or_else(|| others().next())?;
        Some(shared_match(g, e))
    }
}

fn shared_match(g: &SharedGroup, e: &Entry) -> Match {
    Match {
        session: e.session.clone(),
        qos: e.options.qos,
        retain_as_published: e.options.retain_as_published,
        subscription_ids: e.id.into_iter().collect(),
        shared: Some(g.filter.clone()),
    }
}

fn pick(g: &SharedGroup) -> Option<&Entry> {
    let n = g.members.len();
    if n == 0 {
        return None;
    }
    let turn = g.next.fetch_add(1, Ordering::Relaxed);
    // Rotate over the online members only, so an offline member's turn is not handed to
    // its neighbour (which would get twice its share). With nobody online, rotate over all:
    // the message waits in that member's session queue.
    let online = g.members.iter().filter(|e| e.session.is_online()).count();
    if online == 0 {
        return g.members.get(turn % n);
    }
    g.members
        .iter()
        .filter(|e| e.session.is_online())
        .nth(turn % online)
}

fn walk<'a>(
    node: &'a Node,
    levels: &[&str],
    depth: usize,
    dollar: bool,
    direct: &mut Vec<&'a Entry>,
    shared: &mut Vec<&'a SharedGroup>,
) {
    let wild_ok = !(depth == 0 && dollar);
    if depth == levels.len() {
        direct.extend(node.subscribers.iter());
        shared.extend(node.shared.iter());
        // "sport/#" also matches "sport" (the parent level) [MQTT-4.7.1-2 note].
        if let Some(h) = node.children.get("#") {
            direct.extend(h.subscribers.iter());
            shared.extend(h.shared.iter());
        }
        return;
    }
    if let Some(child) = node.children.get(levels[depth]) {
        walk(child, levels, depth + 1, dollar, direct, shared);
    }
    if wild_ok {
        if let Some(plus) = node.children.get("+") {
            walk(plus, levels, depth + 1, dollar, direct, shared);
        }
        if let Some(h) = node.children.get("#") {
            direct.extend(h.subscribers.iter());
            shared.extend(h.shared.iter());
        }
    }
}

fn remove(node: &mut Node, levels: &[&str], share: Option<&str>, session: &Arc<Session>) -> bool {
    let Some((first, rest)) = levels.split_first() else {
        return match share {
            None => {
                let before = node.subscribers.len();
                node.subscribers
                    .retain(|e| !Arc::ptr_eq(&e.session, session));
                before != node.subscribers.len()
            }
            Some(name) => {
                let Some(gi) = node.shared.iter().position(|g| &*g.name == name) else {
                    return false;
                };
                let g = &mut node.shared[gi];
                let before = g.members.len();
                g.members.retain(|e| !Arc::ptr_eq(&e.session, session));
                let removed = before != g.members.len();
                if g.members.is_empty() {
                    node.shared.swap_remove(gi);
                }
                removed
            }
        };
    };
    let Some(child) = node.children.get_mut(*first) else {
        return false;
    };
    let removed = remove(child, rest, share, session);
    if child.is_empty() {
        node.children.remove(*first);
    }
    removed
}

#[cfg(test)]
mod tests {
    use super::*;
    use halyard_codec::ProtocolVersion;

    fn session(id: &str) -> Arc<Session> {
        Arc::new(Session::new(id.into(), ProtocolVersion::V5, 0))
    }
    fn opts(qos: QoS) -> SubscriptionOptions {
        SubscriptionOptions {
            qos,
            ..Default::default()
        }
    }
    fn f(s: &str) -> TopicFilter {
        TopicFilter::try_from(s).unwrap()
    }

    #[test]
    fn overlapping_subscriptions_merge_with_max_qos_and_all_ids_mqtt_3_3_4_2() {
        let idx = SubscriptionIndex::default();
        let a = session("a");
        idx.subscribe(&f("x/+"), &a, opts(QoS::AtMostOnce), Some(1));
        idx.subscribe(&f("x/#"), &a, opts(QoS::ExactlyOnce), Some(2));
        idx.subscribe(&f("x/y"), &a, opts(QoS::AtLeastOnce), None);
        let mut out = Vec::new();
        idx.matches("x/y", None, &mut out);
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].qos, QoS::ExactlyOnce);
        let mut ids = out[0].subscription_ids.clone();
        ids.sort();
        assert_eq!(ids, vec![1, 2]);
    }

    #[test]
    fn dollar_topics_not_matched_by_leading_wildcards_mqtt_4_7_2_1() {
        let idx = SubscriptionIndex::default();
        let a = session("a");
        idx.subscribe(&f("#"), &a, opts(QoS::AtMostOnce), None);
        idx.subscribe(&f("+/x"), &a, opts(QoS::AtMostOnce), None);
        let mut out = Vec::new();
        idx.matches("$SYS/x", None, &mut out);
        assert!(out.is_empty());
        idx.subscribe(&f("$SYS/#"), &a, opts(QoS::AtMostOnce), None);
        idx.matches("$SYS/x", None, &mut out);
        assert_eq!(out.len(), 1);
    }

    #[test]
    fn hash_matches_parent_level_and_unsubscribe_prunes() {
        let idx = SubscriptionIndex::default();
        let a = session("a");
        idx.subscribe(&f("sport/#"), &a, opts(QoS::AtMostOnce), None);
        let mut out = Vec::new();
        idx.matches("sport", None, &mut out);
        assert_eq!(out.len(), 1);
        assert!(idx.unsubscribe(&f("sport/#"), &a));
        assert!(!idx.unsubscribe(&f("sport/#"), &a));
        assert!(idx.root.read().unwrap().is_empty());
        assert_eq!(idx.len(), 0);
    }

    #[test]
    fn shared_group_round_robin_prefers_online_members() {
        let idx = SubscriptionIndex::default();
        let (a, b, c) = (session("a"), session("b"), session("c"));
        for s in [&a, &b, &c] {
            idx.subscribe(&f("$share/g/t"), s, opts(QoS::AtLeastOnce), None);
        }
        a.online.store(true, Ordering::Relaxed);
        b.online.store(true, Ordering::Relaxed);
        let mut seen = Vec::new();
        let mut out = Vec::new();
        for _ in 0..6 {
            idx.matches("t", None, &mut out);
            assert_eq!(out.len(), 1);
            seen.push(out[0].session.client_id.to_string());
        }
        assert!(!seen.contains(&"c".to_string()));
        assert_eq!(seen.iter().filter(|s| *s == "a").count(), 3);
    }

    #[test]
    fn no_local_skips_the_publisher_mqtt_3_8_3_3() {
        let idx = SubscriptionIndex::default();
        let a = session("a");
        let o = SubscriptionOptions {
            no_local: true,
            ..opts(QoS::AtMostOnce)
        };
        idx.subscribe(&f("t"), &a, o, None);
        let mut out = Vec::new();
        idx.matches("t", Some("a"), &mut out);
        assert!(out.is_empty());
        idx.matches("t", Some("b"), &mut out);
        assert_eq!(out.len(), 1);
    }
}
