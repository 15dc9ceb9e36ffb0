//! The subscription index: a topic trie shared by every connection task.
//!
//! Publishers match against it under a read lock (many at once); SUBSCRIBE, UNSUBSCRIBE and
//! session end take the write lock briefly. No session lock is ever taken while the trie
//! lock is held: matching only clones `Arc<Session>`s and reads an atomic "online" flag.
//! The caller enqueues after the lock is released.

use foldhash::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};

use halyard_codec::{QoS, SubscriptionOptions, TopicFilter};

use crate::message::Message;
use crate::session::{Outgoing, Session};

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
    /// Children for literal levels.
    children: HashMap<Box<str>, Node>,
    /// The `+` and `#` children, outside the map: a match tries both at every level, and
    /// two hash lookups per level were most of the walk's cost.
    plus: Option<Box<Node>>,
    hash: Option<Box<Node>>,
    subscribers: Vec<Entry>,
    shared: Vec<SharedGroup>,
}

impl Node {
    fn is_empty(&self) -> bool {
        self.children.is_empty()
            && self.plus.is_none()
            && self.hash.is_none()
            && self.subscribers.is_empty()
            && self.shared.is_empty()
    }

    /// The child for one filter level (`+` and `#` are the wildcard children).
    fn child(&self, level: &str) -> Option<&Node> {
        match level {
            "+" => self.plus.as_deref(),
            "#" => self.hash.as_deref(),
            _ => self.children.get(level),
        }
    }

    fn child_mut(&mut self, level: &str) -> Option<&mut Node> {
        match level {
            "+" => self.plus.as_deref_mut(),
            "#" => self.hash.as_deref_mut(),
            _ => self.children.get_mut(level),
        }
    }

    fn child_or_default(&mut self, level: &str) -> &mut Node {
        match level {
            "+" => self.plus.get_or_insert_default(),
            "#" => self.hash.get_or_insert_default(),
            _ => self.children.entry(level.into()).or_default(),
        }
    }

    fn remove_child(&mut self, level: &str) {
        match level {
            "+" => self.plus = None,
            "#" => self.hash = None,
            _ => {
                self.children.remove(level);
            }
        }
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
    pub(crate) shared: Option<Box<TopicFilter>>,
}

impl Match {
    /// The session and the queued delivery of `msg` this match stands for.
    pub(crate) fn into_delivery(mut self, msg: Arc<Message>) -> (Arc<Session>, Outgoing) {
        let out = self.delivery(msg);
        (self.session, out)
    }

    /// The queued delivery of `msg` for this match's session. A shared-group pick is taken
    /// out (such a match is used once; see [`Routes`]).
    pub(crate) fn delivery(&mut self, msg: Arc<Message>) -> Outgoing {
        Outgoing {
            qos: self.qos.min(msg.qos),
            // [MQTT-3.3.1-12]/[MQTT-3.3.1-13] (3.1.1: MQTT-3.3.1-9): RETAIN is cleared on
            // forwarding unless the subscription has Retain As Published.
            retain: msg.retain && self.retain_as_published,
            subscription_ids: self.subscription_ids.as_slice().into(),
            shared: self.shared.take(),
            recorded: false,
            msg,
        }
    }
}

/// A publisher's last routing result, reused while it publishes to the same topic and the
/// index is unchanged: publishers mostly send to one topic over and over, and the match
/// (read lock, trie walk, a session reference count taken and dropped per match) was a
/// fifth of the CPU per message of a fan-in and more of a fan-out.
///
/// Held only by an active publisher: the connection drops it when it goes idle, since its
/// matches keep their sessions alive.
#[derive(Debug, Default)]
pub(crate) struct Routes {
    matches: Vec<Match>,
    /// `matches` is the result for `topic` at index generation `generation`...
    topic: String,
    generation: u64,
    /// ...if set. Never with a shared group in it: a member is picked per message.
    reusable: bool,
}

/// Which sessions -- and, in a cluster, which other nodes -- want a message on a topic.
/// The seam a cluster plugs into: standalone, this node's [`SubscriptionIndex`] is all of
/// it; a cluster implementation wraps that index, keeps the filters each peer's sessions
/// subscribed to (propagated as they change), and forwards each message published here
/// once to every peer with a match (`forward`), where the peer's own index fans it out.
pub(crate) trait RoutingInterest: Send + Sync + std::fmt::Debug {
    /// Adds or replaces `session`'s subscription to `filter`; true if one was replaced.
    fn subscribe(
        &self,
        filter: &TopicFilter,
        session: &Arc<Session>,
        options: SubscriptionOptions,
        id: Option<u32>,
    ) -> bool;
    /// Removes `session`'s subscription to `filter`; true if it existed.
    fn unsubscribe(&self, filter: &TopicFilter, session: &Arc<Session>) -> bool;
    /// This node's sessions matching `topic`, reusing `routes` when nothing changed (see
    /// [`SubscriptionIndex::matches_cached`]).
    fn matches_cached<'r>(
        &self,
        topic: &str,
        origin: Option<&str>,
        routes: &'r mut Routes,
    ) -> (&'r mut [Match], bool);
    /// Another member of shared group `filter` for a message `leaving` cannot take.
    fn pick_other_member(&self, filter: &TopicFilter, leaving: &Arc<Session>) -> Option<Match>;
    /// Subscriptions held here.
    fn len(&self) -> usize;
    /// Hands `msg`, published by a client of this node, to the other nodes with a matching
    /// subscription; returns how many. A standalone broker has no other node.
    fn forward(&self, _msg: &Arc<Message>) -> usize {
        0
    }
}

impl RoutingInterest for SubscriptionIndex {
    fn subscribe(
        &self,
        filter: &TopicFilter,
        session: &Arc<Session>,
        options: SubscriptionOptions,
        id: Option<u32>,
    ) -> bool {
        SubscriptionIndex::subscribe(self, filter, session, options, id)
    }

    fn unsubscribe(&self, filter: &TopicFilter, session: &Arc<Session>) -> bool {
        SubscriptionIndex::unsubscribe(self, filter, session)
    }

    fn matches_cached<'r>(
        &self,
        topic: &str,
        origin: Option<&str>,
        routes: &'r mut Routes,
    ) -> (&'r mut [Match], bool) {
        SubscriptionIndex::matches_cached(self, topic, origin, routes)
    }

    fn pick_other_member(&self, filter: &TopicFilter, leaving: &Arc<Session>) -> Option<Match> {
        SubscriptionIndex::pick_other_member(self, filter, leaving)
    }

    fn len(&self) -> usize {
        SubscriptionIndex::len(self)
    }
}

#[derive(Debug, Default)]
pub(crate) struct SubscriptionIndex {
    root: RwLock<Node>,
    count: AtomicUsize,
    /// Changes with every subscribe and unsubscribe (under the write lock): a cached match
    /// (see [`Routes`]) is valid only at the generation it was made at.
    generation: AtomicU64,
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
            node = node.child_or_default(level);
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
        self.generation.fetch_add(1, Ordering::Release);
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
            self.generation.fetch_add(1, Ordering::Release);
        }
        removed
    }

    /// [`Self::matches`] for a publisher, reusing its last result when `topic` and the
    /// index are unchanged since (see [`Routes`]). `origin` must be the same on every call
    /// with the same `routes`.
    /// Also says whether the result is the one the previous call returned (so the two
    /// messages go to the same sessions with the same options, and to no shared group).
    pub(crate) fn matches_cached<'r>(
        &self,
        topic: &str,
        origin: Option<&str>,
        routes: &'r mut Routes,
    ) -> (&'r mut [Match], bool) {
        // Read before matching: a change that lands during the match makes the next call
        // match again.
        let generation = self.generation.load(Ordering::Acquire);
        let same = routes.reusable && routes.generation == generation && routes.topic == topic;
        if !same {
            self.matches(topic, origin, &mut routes.matches);
            routes.reusable = routes.matches.iter().all(|m| m.shared.is_none());
            routes.generation = generation;
            routes.topic.clear();
            routes.topic.push_str(topic);
        }
        (&mut routes.matches, same)
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
        // [MQTT-4.7.2-1]: wildcards at the first level do not match topics starting with '$'.
        let dollar = topic.starts_with('$');
        // No temporaries: matches go straight into the caller's reused `out` (this runs
        // once per PUBLISH; the level list and candidate list it used to build were two
        // allocations per message).
        let mut found = Found { origin, out };
        walk(&root, Some(topic), true, dollar, &mut found);

        // One session's overlapping subscriptions become adjacent, then merge into the
        // first of them; shared-group picks sort after and are never merged. (Sorting
        // instead of searching all matches per entry: that made a 100-subscriber fan-out
        // quadratic, 10% of its CPU.) Unstable is fine: subscription identifiers have no
        // defined order [MQTT-3.3.4-3].
        if out.len() > 1 {
            out.sort_unstable_by_key(|m| (m.shared.is_some(), Arc::as_ptr(&m.session)));
            out.dedup_by(|later, first| {
                let same = first.shared.is_none()
                    && later.shared.is_none()
                    && Arc::ptr_eq(&first.session, &later.session);
                if same {
                    first.qos = first.qos.max(later.qos);
                    first.retain_as_published |= later.retain_as_published;
                    first.subscription_ids.append(&mut later.subscription_ids);
                }
                same
            });
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
            node = node.child(level)?;
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
        shared: Some(Box::new(g.filter.clone())),
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

/// Where `walk` puts what it finds: ordinary subscriptions (No Local applied against the
/// publisher) and one picked member per shared group.
struct Found<'o, 'r> {
    origin: Option<&'r str>,
    out: &'o mut Vec<Match>,
}

impl Found<'_, '_> {
    fn node(&mut self, node: &Node) {
        for e in &node.subscribers {
            if e.options.no_local && self.origin.is_some_and(|o| *o == *e.session.client_id) {
                continue; // [MQTT-3.8.3-3]
            }
            self.out.push(Match {
                session: e.session.clone(),
                qos: e.options.qos,
                retain_as_published: e.options.retain_as_published,
                subscription_ids: e.id.into_iter().collect(),
                shared: None,
            });
        }
        for g in &node.shared {
            if let Some(e) = pick(g) {
                self.out.push(shared_match(g, e));
            }
        }
    }
}

/// `rest` is the part of the topic below `node` (`None` past its last level), split one
/// level per call, as `topic.split('/')` would.
fn walk(node: &Node, rest: Option<&str>, first: bool, dollar: bool, found: &mut Found<'_, '_>) {
    let wild_ok = !(first && dollar);
    let Some(rest) = rest else {
        found.node(node);
        // "sport/#" also matches "sport" (the parent level) [MQTT-4.7.1-2 note].
        if let Some(h) = &node.hash {
            found.node(h);
        }
        return;
    };
    // A plain byte scan: levels are short, and `split_once`'s searcher set-up cost more
    // than the search.
    let (level, below) = match rest.bytes().position(|b| b == b'/') {
        Some(i) => (&rest[..i], Some(&rest[i + 1..])),
        None => (rest, None),
    };
    // A topic level is never "+" or "#" (no wildcards in names), so the map holds only
    // literal children and cannot match a wildcard child by accident.
    if !node.children.is_empty()
        && let Some(child) = node.children.get(level)
    {
        walk(child, below, false, dollar, found);
    }
    if wild_ok {
        if let Some(plus) = &node.plus {
            walk(plus, below, false, dollar, found);
        }
        if let Some(h) = &node.hash {
            found.node(h);
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
    let Some(child) = node.child_mut(first) else {
        return false;
    };
    let removed = remove(child, rest, share, session);
    if child.is_empty() {
        node.remove_child(first);
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

    /// Every filter of up to three levels over a small alphabet (empty levels and `$`
    /// included) against every topic of up to three levels: the trie walk must find
    /// exactly the filters that the codec's independent, filter-by-filter
    /// `TopicFilter::matches` accepts [MQTT-4.7.1-2] [MQTT-4.7.1-3] [MQTT-4.7.2-1].
    #[test]
    fn trie_walk_agrees_with_filter_matching_on_every_small_case() {
        fn all(alphabet: &[&str], wild: bool) -> Vec<String> {
            let mut out: Vec<String> = alphabet.iter().map(|s| s.to_string()).collect();
            let mut last = out.clone();
            for _ in 1..3 {
                let mut next = Vec::new();
                for p in &last {
                    if wild && p.ends_with('#') {
                        continue;
                    }
                    for a in alphabet {
                        next.push(format!("{p}/{a}"));
                    }
                }
                out.extend(next.iter().cloned());
                last = next;
            }
            out
        }
        let filters: Vec<TopicFilter> = all(&["a", "b", "", "+", "#", "$s"], true)
            .iter()
            .filter_map(|s| TopicFilter::try_from(s.as_str()).ok())
            .collect();
        let topics = all(&["a", "b", "", "$s"], false);
        let idx = SubscriptionIndex::default();
        let sessions: Vec<Arc<Session>> = (0..filters.len())
            .map(|i| session(&format!("s{i}")))
            .collect();
        for (f, s) in filters.iter().zip(&sessions) {
            idx.subscribe(f, s, opts(QoS::AtMostOnce), None);
        }
        let mut out = Vec::new();
        let mut checked = 0;
        for t in &topics {
            idx.matches(t, None, &mut out);
            let mut got: Vec<&str> = out.iter().map(|m| &*m.session.client_id).collect();
            got.sort_unstable();
            let mut want: Vec<&str> = filters
                .iter()
                .zip(&sessions)
                .filter(|(f, _)| f.matches(t))
                .map(|(_, s)| &*s.client_id)
                .collect();
            want.sort_unstable();
            assert_eq!(got, want, "topic {t:?}");
            checked += want.len();
        }
        assert!(checked >= 1000, "the cases exercise matching: {checked}");
    }

    /// A publisher's cached match follows every change of the index: a new subscriber
    /// gets the next message [MQTT-3.8.4-3], an unsubscribed one no longer does
    /// [MQTT-3.10.4-2], changed options apply, and a shared group still takes turns. The
    /// "same route" answer (which lets a batch share one segment, see `queue.rs`) is true
    /// only for a reused result.
    #[test]
    fn cached_matches_follow_subscribe_and_unsubscribe_mqtt_3_10_4_2() {
        fn names((m, same): (&mut [Match], bool)) -> (Vec<String>, bool) {
            let mut v: Vec<String> = m.iter().map(|m| m.session.client_id.to_string()).collect();
            v.sort();
            (v, same)
        }
        let idx = SubscriptionIndex::default();
        let (a, b) = (session("a"), session("b"));
        let mut routes = Routes::default();
        idx.subscribe(&f("t/+"), &a, opts(QoS::AtMostOnce), None);
        let t1 = |routes: &mut Routes| names(idx.matches_cached("t/1", None, routes));
        assert_eq!(t1(&mut routes), (vec!["a".into()], false));
        assert_eq!(t1(&mut routes), (vec!["a".into()], true));
        idx.subscribe(&f("t/1"), &b, opts(QoS::AtMostOnce), None);
        assert_eq!(t1(&mut routes), (vec!["a".into(), "b".into()], false));
        // Another topic is matched afresh.
        assert_eq!(
            names(idx.matches_cached("t/2", None, &mut routes)),
            (vec!["a".into()], false)
        );
        assert_eq!(t1(&mut routes), (vec!["a".into(), "b".into()], false));
        assert_eq!(t1(&mut routes), (vec!["a".into(), "b".into()], true));
        // New options for an existing subscription.
        idx.subscribe(&f("t/1"), &b, opts(QoS::ExactlyOnce), None);
        let (m, same) = idx.matches_cached("t/1", None, &mut routes);
        assert!(!same);
        assert_eq!(m.iter().map(|m| m.qos).max(), Some(QoS::ExactlyOnce));
        assert!(idx.unsubscribe(&f("t/+"), &a));
        assert_eq!(t1(&mut routes), (vec!["b".into()], false));
        assert!(idx.unsubscribe(&f("t/1"), &b));
        assert_eq!(t1(&mut routes), (vec![], false));
        // A shared group picks a member per message, cached or not, and is never the
        // same route twice.
        idx.subscribe(&f("$share/g/s"), &a, opts(QoS::AtMostOnce), None);
        idx.subscribe(&f("$share/g/s"), &b, opts(QoS::AtMostOnce), None);
        let picks: Vec<(Vec<String>, bool)> = (0..4)
            .map(|_| names(idx.matches_cached("s", None, &mut routes)))
            .collect();
        assert!(picks.iter().all(|(_, same)| !same), "{picks:?}");
        let count = |who: &str| picks.iter().filter(|(p, _)| p.concat() == who).count();
        assert_eq!(count("a"), 2, "{picks:?}");
        assert_eq!(count("b"), 2, "{picks:?}");
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
        // The wildcard children live outside the literal map; they are pruned too.
        idx.subscribe(&f("+/x/+/#"), &a, opts(QoS::AtMostOnce), None);
        idx.matches("a/x/b", None, &mut out);
        assert_eq!(out.len(), 1);
        assert!(idx.unsubscribe(&f("+/x/+/#"), &a));
        assert!(idx.root.read().unwrap().is_empty());
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
