//! Interoperability with an independent client implementation: rumqttc, in its MQTT 3.1.1
//! (`rumqttc`) and MQTT 5 (`rumqttc::v5`) flavours.

use std::time::Duration;

use halyard_testkit::TestBroker;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::timeout;

const WAIT: Duration = Duration::from_secs(5);
/// Only used to assert that nothing more arrives.
const QUIET: Duration = Duration::from_millis(300);

/// Drives a rumqttc event loop on its own task: every incoming packet goes to a channel;
/// `next` returns publishes, `wait` skips to an acknowledgement, keeping publishes seen on
/// the way. Tests wait for acknowledgements instead of sleeping.
macro_rules! client_kit {
    ($Packet:ty, $Publish:ty, $is_publish:pat => $p:ident) => {
        pub(super) struct Client {
            pub(super) client: AsyncClient,
            pub(super) rx: mpsc::UnboundedReceiver<$Packet>,
            pub(super) stash: std::collections::VecDeque<$Publish>,
            pub(super) driver: JoinHandle<()>,
        }

        impl Client {
            pub(super) async fn next(&mut self) -> $Publish {
                if let Some(p) = self.stash.pop_front() {
                    return p;
                }
                loop {
                    match timeout(WAIT, self.rx.recv())
                        .await
                        .expect("message in time")
                        .expect("driver alive")
                    {
                        $is_publish => return $p,
                        _ => {}
                    }
                }
            }
            pub(super) async fn wait(&mut self, what: &str, f: impl Fn(&$Packet) -> bool) {
                loop {
                    let pk = timeout(WAIT, self.rx.recv())
                        .await
                        .unwrap_or_else(|_| panic!("{what} in time"))
                        .expect("driver alive");
                    if f(&pk) {
                        return;
                    }
                    if let $is_publish = pk {
                        self.stash.push_back($p);
                    }
                }
            }
            #[allow(dead_code, unused_variables)] // not every module asserts silence
            pub(super) async fn quiet(&mut self) -> bool {
                self.stash.is_empty()
                    && !matches!(timeout(QUIET, self.rx.recv()).await, Ok(Some($is_publish)))
            }
            /// Sends DISCONNECT and waits until the event loop has ended.
            pub(super) async fn disconnect(self) {
                self.client.disconnect().await.unwrap();
                let _ = timeout(WAIT, self.driver)
                    .await
                    .expect("event loop ends after DISCONNECT");
            }
        }

        /// Starts the event loop and waits for CONNACK: the client and "session present".
        async fn start(client: AsyncClient, el: EventLoop) -> (Client, bool) {
            let (rx, driver, crx) = spawn(el);
            let present = timeout(WAIT, crx)
                .await
                .expect("CONNACK in time")
                .expect("connected");
            (
                Client {
                    client,
                    rx,
                    stash: Default::default(),
                    driver,
                },
                present,
            )
        }

        fn spawn(
            mut el: EventLoop,
        ) -> (
            mpsc::UnboundedReceiver<$Packet>,
            JoinHandle<()>,
            tokio::sync::oneshot::Receiver<bool>,
        ) {
            let (tx, rx) = mpsc::unbounded_channel();
            let (ctx, crx) = tokio::sync::oneshot::channel();
            let mut ctx = Some(ctx);
            let driver = tokio::spawn(async move {
                loop {
                    match el.poll().await {
                        Ok(Event::Incoming(pk)) => {
                            if let Packet::ConnAck(a) = &pk {
                                if let Some(c) = ctx.take() {
                                    let _ = c.send(a.session_present);
                                }
                            }
                            let _ = tx.send(pk);
                        }
                        Ok(_) => {}
                        Err(_) => break,
                    }
                }
            });
            (rx, driver, crx)
        }
    };
}

mod v311 {
    use super::*;
    use rumqttc::{AsyncClient, Event, EventLoop, LastWill, MqttOptions, Packet, Publish, QoS};

    client_kit!(Packet, Publish, Packet::Publish(p) => p);

    pub(super) async fn connect(
        tb: &TestBroker,
        id: &str,
        clean: bool,
        will: Option<LastWill>,
    ) -> (Client, bool) {
        let (host, port) = tb.host_port();
        let mut o = MqttOptions::new(id, host, port);
        o.set_clean_session(clean)
            .set_keep_alive(Duration::from_secs(5));
        if let Some(w) = will {
            o.set_last_will(w);
        }
        let (client, el) = AsyncClient::new(o, 100);
        start(client, el).await
    }

    async fn subscribe(c: &mut Client, f: &str, q: QoS) {
        c.client.subscribe(f, q).await.unwrap();
        c.wait("SUBACK", |p| matches!(p, Packet::SubAck(_))).await;
    }

    /// Publishes and waits for the end of the QoS flow (PUBACK / PUBCOMP).
    async fn publish(c: &mut Client, t: &str, q: QoS, retain: bool, payload: Vec<u8>) {
        c.client.publish(t, q, retain, payload).await.unwrap();
        match q {
            QoS::AtMostOnce => {}
            QoS::AtLeastOnce => c.wait("PUBACK", |p| matches!(p, Packet::PubAck(_))).await,
            QoS::ExactlyOnce => c.wait("PUBCOMP", |p| matches!(p, Packet::PubComp(_))).await,
        }
    }

    #[tokio::test]
    async fn pubsub_qos_0_1_2_mqtt_3_3_5_1() {
        let tb = TestBroker::start().await;
        let (mut s, _) = connect(&tb, "sub311", true, None).await;
        subscribe(&mut s, "rq/#", QoS::ExactlyOnce).await;
        let (mut p, _) = connect(&tb, "pub311", true, None).await;
        for (i, q) in [QoS::AtMostOnce, QoS::AtLeastOnce, QoS::ExactlyOnce]
            .into_iter()
            .enumerate()
        {
            publish(&mut p, &format!("rq/{i}"), q, false, vec![i as u8; 3]).await;
            let m = s.next().await;
            assert_eq!(
                (m.topic.as_str(), m.qos, &m.payload[..]),
                (format!("rq/{i}").as_str(), q, &[i as u8; 3][..])
            );
        }
    }

    #[tokio::test]
    async fn retained_message_delivered_on_subscribe_mqtt_3_3_1_6() {
        let tb = TestBroker::start().await;
        let (mut p, _) = connect(&tb, "rpub", true, None).await;
        publish(&mut p, "rr/state", QoS::AtLeastOnce, true, b"on".to_vec()).await;
        let (mut s, _) = connect(&tb, "rsub", true, None).await;
        subscribe(&mut s, "rr/+", QoS::AtLeastOnce).await;
        let m = s.next().await;
        assert!(m.retain);
        assert_eq!(&m.payload[..], b"on");
    }

    #[tokio::test]
    async fn last_will_on_lost_connection_mqtt_3_1_2_8() {
        let tb = TestBroker::start().await;
        let (mut w, _) = connect(&tb, "watch", true, None).await;
        subscribe(&mut w, "lw/#", QoS::AtLeastOnce).await;
        let will = LastWill::new("lw/dev1", "offline", QoS::AtLeastOnce, false);
        let (d, _) = connect(&tb, "dev1", true, Some(will)).await;
        d.driver.abort(); // the socket closes without DISCONNECT
        let m = w.next().await;
        assert_eq!(
            (m.topic.as_str(), &m.payload[..]),
            ("lw/dev1", &b"offline"[..])
        );
    }

    #[tokio::test]
    async fn persistent_session_receives_offline_messages_mqtt_3_1_2_4() {
        let tb = TestBroker::start().await;
        let (mut s, present) = connect(&tb, "persist311", false, None).await;
        assert!(!present);
        subscribe(&mut s, "pq/#", QoS::AtLeastOnce).await;
        s.disconnect().await;
        let (mut p, _) = connect(&tb, "ppub311", true, None).await;
        for i in 0..3u8 {
            publish(&mut p, "pq/x", QoS::AtLeastOnce, false, vec![i]).await;
        }
        let (mut s, present) = connect(&tb, "persist311", false, None).await;
        assert!(present, "[MQTT-3.2.2-2] session present");
        for i in 0..3u8 {
            assert_eq!(&s.next().await.payload[..], &[i]);
        }
    }
}

mod v5 {
    use super::*;
    use rumqttc::v5::mqttbytes::QoS;
    use rumqttc::v5::mqttbytes::v5::{Filter, Packet, Publish, PublishProperties};
    use rumqttc::v5::{AsyncClient, Event, EventLoop, MqttOptions};

    client_kit!(Packet, Publish, Packet::Publish(p) => p);

    async fn connect(
        tb: &TestBroker,
        id: &str,
        clean: bool,
        expiry: Option<u32>,
    ) -> (Client, bool) {
        let (host, port) = tb.host_port();
        let mut o = MqttOptions::new(id, host, port);
        o.set_clean_start(clean)
            .set_keep_alive(Duration::from_secs(5));
        o.set_session_expiry_interval(expiry);
        let (client, el) = AsyncClient::new(o, 100);
        start(client, el).await
    }

    async fn subscribe(c: &mut Client, f: &str, q: QoS) {
        c.client.subscribe_many([Filter::new(f, q)]).await.unwrap();
        c.wait("SUBACK", |p| matches!(p, Packet::SubAck(_))).await;
    }

    async fn wait_flow(c: &mut Client, q: QoS) {
        match q {
            QoS::AtMostOnce => {}
            QoS::AtLeastOnce => c.wait("PUBACK", |p| matches!(p, Packet::PubAck(_))).await,
            QoS::ExactlyOnce => c.wait("PUBCOMP", |p| matches!(p, Packet::PubComp(_))).await,
        }
    }

    #[tokio::test]
    async fn pubsub_qos_0_1_2_with_properties_mqtt_3_3_2_17_18() {
        let tb = TestBroker::start().await;
        let (mut s, _) = connect(&tb, "sub5", true, None).await;
        subscribe(&mut s, "v5/#", QoS::ExactlyOnce).await;
        let (mut p, _) = connect(&tb, "pub5", true, None).await;
        for (i, q) in [QoS::AtMostOnce, QoS::AtLeastOnce, QoS::ExactlyOnce]
            .into_iter()
            .enumerate()
        {
            let props = PublishProperties {
                response_topic: Some("v5/reply".into()),
                correlation_data: Some(vec![i as u8, 9].into()),
                user_properties: vec![("k".into(), format!("v{i}")), ("k".into(), "again".into())],
                content_type: Some("application/octet-stream".into()),
                ..Default::default()
            };
            p.client
                .publish_with_properties(format!("v5/{i}"), q, false, vec![i as u8], props)
                .await
                .unwrap();
            wait_flow(&mut p, q).await;
            let m = s.next().await;
            assert_eq!(m.qos, q);
            assert_eq!(&m.topic[..], format!("v5/{i}").as_bytes());
            let got = m.properties.expect("properties forwarded");
            assert_eq!(got.response_topic.as_deref(), Some("v5/reply"));
            assert_eq!(got.correlation_data.as_deref(), Some(&[i as u8, 9][..]));
            assert_eq!(
                got.user_properties,
                vec![("k".into(), format!("v{i}")), ("k".into(), "again".into())]
            );
            assert_eq!(
                got.content_type.as_deref(),
                Some("application/octet-stream")
            );
        }
    }

    #[tokio::test]
    async fn persistent_session_with_expiry_receives_offline_messages_mqtt_3_1_2_11() {
        let tb = TestBroker::start().await;
        let (mut s, _) = connect(&tb, "persist5", false, Some(300)).await;
        subscribe(&mut s, "p5/#", QoS::ExactlyOnce).await;
        s.disconnect().await;
        let (mut p, _) = connect(&tb, "ppub5", true, None).await;
        for i in 0..3u8 {
            p.client
                .publish("p5/x", QoS::ExactlyOnce, false, vec![i])
                .await
                .unwrap();
            wait_flow(&mut p, QoS::ExactlyOnce).await;
        }
        let (mut s, present) = connect(&tb, "persist5", false, Some(300)).await;
        assert!(present);
        for i in 0..3u8 {
            let m = s.next().await;
            assert_eq!((m.qos, &m.payload[..]), (QoS::ExactlyOnce, &[i][..]));
        }
    }

    #[tokio::test]
    async fn shared_subscription_splits_messages_mqtt_4_8_2() {
        let tb = TestBroker::start().await;
        let (mut a, _) = connect(&tb, "w1", true, None).await;
        let (mut b, _) = connect(&tb, "w2", true, None).await;
        for c in [&mut a, &mut b] {
            subscribe(c, "$share/workers/jobs", QoS::AtLeastOnce).await;
        }
        let (mut p, _) = connect(&tb, "boss", true, None).await;
        for i in 0..10u8 {
            p.client
                .publish("jobs", QoS::AtLeastOnce, false, vec![i])
                .await
                .unwrap();
            wait_flow(&mut p, QoS::AtLeastOnce).await;
        }
        let mut got = Vec::new();
        for c in [&mut a, &mut b] {
            for _ in 0..5 {
                got.push(c.next().await.payload[0]);
            }
            assert!(c.quiet().await, "no more than its share");
        }
        got.sort();
        assert_eq!(got, (0..10).collect::<Vec<u8>>());
    }
}
