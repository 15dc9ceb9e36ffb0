//! Rebuilding the broker's state from the store at start: sessions with their owners,
//! subscriptions, queued and in-flight messages, inbound QoS 2 ids, pending wills and
//! retained messages.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, SystemTime};

use halyard_codec::{QoS, TopicFilter, TopicName};
use halyard_store::SessionOwner;
use tokio::time::Instant;
use tracing::{error, info, warn};

use crate::message::Message;
use crate::session::{Awaiting, ConnInfo, Inflight, Outgoing, PendingWill, Session, Subscription};
use crate::state::Inner;
use crate::timers::TimerEvent;

impl Inner {
    /// Rebuilds sessions, subscriptions, pending wills and retained messages from the store.
    pub(crate) fn recover(self: &Arc<Self>) {
        let image = self.store.recover();
        if image.sessions.is_empty() && image.retained.is_empty() {
            return;
        }
        let max_id = image.messages.keys().next_back().copied().unwrap_or(0);
        self.next_message_id.store(max_id + 1, Ordering::Relaxed);
        let now = Instant::now();
        let wall = SystemTime::now();
        // Wall-clock instants from the store become monotonic ones relative to now.
        let to_instant = |t: SystemTime| match t.duration_since(wall) {
            Ok(ahead) => now + ahead,
            Err(behind) => now.checked_sub(behind.duration()).unwrap_or(now),
        };
        for (topic, m) in image.retained {
            let Ok(topic) = TopicName::try_from(topic.as_str()) else {
                warn!(
                    topic,
                    "skipping stored retained message with an invalid topic"
                );
                continue;
            };
            let mut msg = Message::new(
                self.message_id(),
                topic,
                m.payload,
                m.qos,
                true,
                m.properties.map(|p| *p).unwrap_or_default(),
                None,
                now,
            );
            msg.expires_at = m.expires_at.map(to_instant);
            msg.set_ticket(0);
            // Restored messages count against `max_memory_bytes` like received ones: a
            // large backlog holds publishers back until it drains.
            self.retained.restore(Arc::new(msg.charged_to(self.memory)));
        }
        // Message bodies shared by the recovered deliveries: one `Arc` per id.
        let mut bodies: HashMap<u64, Arc<Message>> = HashMap::new();
        for (&id, m) in &image.messages {
            let Ok(topic) = TopicName::try_from(m.topic.as_str()) else {
                warn!(
                    id,
                    topic = m.topic,
                    "skipping stored message with an invalid topic"
                );
                continue;
            };
            let mut msg = Message::new(
                id,
                topic,
                m.payload.clone(),
                m.qos,
                false,
                m.publish_properties(),
                None,
                now,
            );
            msg.expires_at = m.expires_at.map(to_instant);
            msg.persisted.store(true, Ordering::Relaxed);
            msg.set_ticket(0);
            bodies.insert(id, Arc::new(msg.charged_to(self.memory)));
        }
        // A delivery whose body is missing cannot be sent; the store's recovery should
        // never produce one, so it is counted and reported, not silently skipped.
        let missing = std::cell::Cell::new(0u64);
        let outgoing = |d: &halyard_store::StoredDelivery| {
            let body = bodies.get(&d.message_id);
            if body.is_none() {
                missing.set(missing.get() + 1);
            }
            body.map(|msg| Outgoing {
                msg: msg.clone(),
                qos: d.qos,
                retain: d.retain,
                subscription_ids: d.subscription_ids.clone().into_boxed_slice(),
                shared: d
                    .shared
                    .as_deref()
                    .and_then(|f| TopicFilter::try_from(f).ok())
                    .map(Box::new),
                recorded: true,
            })
        };
        let mut restored = 0;
        for (id, s) in image.sessions {
            let client_id: Arc<str> = id.as_str().into();
            let session = Arc::new(Session::new(
                client_id.clone(),
                s.record.protocol,
                s.record.expiry_interval,
            ));
            let user;
            {
                let mut st = session.lock();
                st.stored = true;
                let owner = match &s.record.owner {
                    SessionOwner::Unknown => None,
                    SessionOwner::Anonymous => Some(None),
                    SessionOwner::User(u) => Some(Some(u.as_str().into())),
                };
                st.info = owner.map(|user| Arc::new(ConnInfo::restored(user, s.record.protocol)));
                user = st.owner().flatten().cloned();
                for (filter, rec) in &s.subscriptions {
                    let Ok(f) = TopicFilter::try_from(filter.as_str()) else {
                        continue;
                    };
                    self.subs
                        .subscribe(&f, &session, rec.options, rec.identifier);
                    self.memory
                        .add_subscription_bytes(Subscription::cost(filter));
                    st.subscriptions.insert(
                        filter.as_str().into(),
                        Subscription {
                            filter: f,
                            options: rec.options,
                            id: rec.identifier,
                        },
                    );
                }
                for d in &s.queue {
                    if let Some(out) = outgoing(d) {
                        st.queue.push(out);
                    }
                }
                for f in &s.inflight {
                    if let Some(out) = outgoing(&f.delivery) {
                        st.inflight_seq += 1;
                        let state = match (out.qos, f.released) {
                            (_, true) => Awaiting::Comp,
                            (QoS::ExactlyOnce, false) => Awaiting::Rec,
                            _ => Awaiting::Ack,
                        };
                        let seq = st.inflight_seq;
                        st.inflight
                            .insert(f.packet_id, Inflight { out, state, seq });
                    }
                }
                st.inbound_qos2.extend(s.inbound_qos2.iter().copied());
                if let Some(w) = &s.will
                    && let Ok(topic) = TopicName::try_from(w.message.topic.as_str())
                {
                    let msg = Message::new(
                        self.message_id(),
                        topic,
                        w.message.payload.clone(),
                        w.message.qos,
                        w.retain,
                        w.message.publish_properties(),
                        Some(client_id.clone()),
                        now,
                    );
                    let due = to_instant(w.due);
                    st.pending_will = Some(PendingWill { msg: Arc::new(msg) });
                    self.timers
                        .schedule(due, TimerEvent::Will(session.clone(), 0));
                }
            }
            // A session that was connected when the store last saw it disconnected at the
            // crash: its expiry counts from now.
            let since = s.record.disconnected_at.map_or(now, to_instant);
            if s.record.expiry_interval != u32::MAX {
                let at = since + Duration::from_secs(u64::from(s.record.expiry_interval));
                self.timers
                    .schedule(at, TimerEvent::SessionExpiry(session.clone(), 0));
            }
            // Restored whatever the limits: they apply to new sessions.
            self.sessions.insert(client_id, session, user);
            restored += 1;
        }
        if missing.get() > 0 {
            error!(
                deliveries = missing.get(),
                "stored deliveries refer to message bodies the store does not have; skipped"
            );
        }
        info!(
            sessions = restored,
            retained = self.retained.len(),
            "restored state from the store"
        );
    }
}
