//! SUBSCRIBE and UNSUBSCRIBE: checks (topic limits, ACL, quotas), the routing seam, the
//! store, retained messages for new subscriptions, SUBACK/UNSUBACK.

use halyard_codec::{
    AckProperties, Packet, QoS, ReasonCode, SubAck, Subscribe, SubscriptionOptions, UnsubAck,
    Unsubscribe,
};
use halyard_store::Op;

use crate::auth::Access;
use tokio::time::Instant;

use super::*;
use crate::session::{Outgoing, Subscription};
use crate::state::{Inner, grant};
use crate::stats::Stats;

impl Proto {
    pub(super) fn on_subscribe(&mut self, s: Subscribe, now: Instant) {
        let inner = self.inner.clone();
        let cfg = inner.cfg();
        let id = s.properties.subscription_identifier;
        let mut reasons = Vec::with_capacity(s.filters.len());
        let mut retained = Vec::new();
        let mut ticket = 0;
        let not_authorized =
            if self.version.is_v5() && self.inner.security().subscribe_denied_not_authorized {
                ReasonCode::NotAuthorized
            } else {
                ReasonCode::UnspecifiedError // 0x80: 3.1.1's only failure code
            };
        for (filter, opts) in s.filters {
            if filter.is_shared() && !cfg.shared_subscriptions {
                reasons.push(ReasonCode::SharedSubscriptionsNotSupported);
                continue;
            }
            if Inner::topic_over_limits(&cfg, filter.filter()) {
                Stats::inc(&inner.stats.topic_refused);
                reasons.push(if self.version.is_v5() {
                    ReasonCode::TopicFilterInvalid
                } else {
                    ReasonCode::UnspecifiedError
                });
                continue;
            }
            {
                // A new subscription needs room in the session's count and in the memory
                // budget it is charged to (a replaced one is charged already).
                let st = self.at.session.lock();
                if !st.subscriptions.contains_key(filter.as_str())
                    && ((cfg.max_subscriptions_per_client > 0
                        && st.subscriptions.len() >= cfg.max_subscriptions_per_client)
                        || self.inner.memory_over_budget(&self.live))
                {
                    drop(st);
                    Stats::inc(&inner.stats.subscribe_quota_exceeded);
                    reasons.push(if self.version.is_v5() {
                        ReasonCode::QuotaExceeded
                    } else {
                        ReasonCode::UnspecifiedError
                    });
                    continue;
                }
            }
            // A shared subscription is authorized on its topic filter.
            if !self.allowed(Access::Subscribe, filter.filter()) {
                Stats::inc(&self.inner.stats.subscribe_denied);
                reasons.push(not_authorized);
                continue;
            }
            let qos = grant(opts.qos, cfg.max_qos);
            let mut options = SubscriptionOptions { qos, ..opts };
            if self.info.bridge {
                // Mosquitto's bridge bit: what a bridge publishes is not sent back to it,
                // and retained flags reach it as published (5.0's options, for 3.x).
                options.no_local = true;
                options.retain_as_published = true;
            }
            // Kept for the session's life: not a slice pinning the read buffer.
            let filter = filter.copied();
            let sub = Subscription {
                filter: filter.clone(),
                options,
                id,
            };
            let existed = self
                .at
                .session
                .lock()
                .subscriptions
                .insert(filter.as_str().into(), sub.clone())
                .is_some();
            if !existed {
                self.inner
                    .memory
                    .add_subscription_bytes(Subscription::cost(filter.as_str()));
            }
            self.inner
                .subs
                .subscribe(&filter, &self.at.session, options, id);
            ticket = ticket.max(self.inner.persist_subscription(&self.at.session, &sub));
            reasons.push(match qos {
                QoS::AtMostOnce => ReasonCode::GRANTED_QOS0,
                QoS::AtLeastOnce => ReasonCode::GrantedQoS1,
                QoS::ExactlyOnce => ReasonCode::GrantedQoS2,
            });
            // Retained messages per Retain Handling [MQTT-3.3.1-9, MQTT-3.3.1-10,
            // MQTT-3.3.1-11]; none for shared subscriptions (as mosquitto, HiveMQ, EMQX:
            // a group member joining must not replay state to the whole group).
            use halyard_codec::RetainHandling::*;
            let send = !filter.is_shared()
                && match options.retain_handling {
                    SendOnSubscribe => true,
                    SendIfNew => !existed,
                    DoNotSend => false,
                };
            if send {
                for msg in self.inner.retained.matching(&filter, now) {
                    // Retained messages are filtered by read rights too.
                    if !self.allowed(Access::Read, msg.topic.as_str()) {
                        Stats::inc(&self.inner.stats.dropped_not_authorized);
                        continue;
                    }
                    retained.push(Outgoing {
                        qos: msg.qos.min(qos),
                        retain: true, // [MQTT-3.3.1-8]
                        subscription_ids: id.into_iter().collect(),
                        shared: None,
                        recorded: false,
                        msg,
                    });
                }
            }
        }
        // SUBACK for a persistent session only once the subscription is durable.
        self.ack(
            ticket,
            Packet::SubAck(SubAck {
                packet_id: s.packet_id,
                reasons,
                properties: AckProperties::default(),
            }),
        );
        let limits = Inner::queue_limits(&self.inner.cfg());
        let deliveries = retained.into_iter().map(|o| (&self.at.session, o));
        self.inner
            .enqueue_stamped(None, deliveries, Vec::new(), Vec::new(), limits);
    }

    pub(super) fn on_unsubscribe(&mut self, u: Unsubscribe) {
        let mut reasons = Vec::with_capacity(u.filters.len());
        let mut ticket = 0;
        for filter in u.filters {
            let existed = {
                let mut st = self.at.session.lock();
                let existed = st.subscriptions.remove(filter.as_str()).is_some();
                if existed {
                    self.inner
                        .memory
                        .add_subscription_bytes(-Subscription::cost(filter.as_str()));
                }
                if existed && st.stored {
                    ticket = self.inner.store.apply(vec![Op::Unsubscribe {
                        client_id: self.at.session.client_id.to_string(),
                        filter: filter.to_string(),
                    }]);
                }
                existed
            };
            self.inner.subs.unsubscribe(&filter, &self.at.session);
            reasons.push(if existed {
                ReasonCode::Success
            } else {
                ReasonCode::NoSubscriptionExisted
            });
        }
        self.ack(
            ticket,
            Packet::UnsubAck(UnsubAck {
                packet_id: u.packet_id,
                reasons,
                properties: AckProperties::default(),
            }),
        );
    }
}
