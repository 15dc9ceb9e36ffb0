//! Unit tests of the connection task: its size (memory per connection) and its place in
//! the session lifecycle.

mod size {
    use std::sync::Arc;

    /// Every connection, idle ones included, holds its task's future, its boxed
    /// `Connection` and its session for its whole life, so their sizes are memory per
    /// connection. The future was 4,496 bytes with the handshake inline and the connection
    /// stored up to three times in it (as `run`'s and `finish`'s `self`, and as the
    /// handshake's result); 744 + 744 after. Then 512 + 448: rarely used parts (topic
    /// aliases, the ACL decision cache, rate limiting, re-authentication, the pause timer)
    /// made on first use, and shutdown delivered through the kick channel instead of a
    /// watch per connection. Then 336 + 440: one stream instead of split halves, one
    /// broker task watching the store's durable ticket instead of a `changed()` future per
    /// connection, `poll_fn`s instead of `async` blocks in the `select!`, and what waits
    /// for durability boxed on first use. Then 264: `finish` boxed (it runs once, at the
    /// end), the pause deadlines and the writable length kept out of the `select!`'s
    /// state, and no tracing wrapper when the connection span is disabled
    /// (`Broker::spawn_connection`). Then 152 (a 256-byte task): the session's wake-up as
    /// a `poll_fn` over `session::Wake` instead of tokio's 64-byte `Notified`, the
    /// `max_connections` permit and the drain sender kept by `Connection`, `main_loop`
    /// awaited by `serve` itself (no `run` around it), and no await inside a `select!`
    /// branch (the branch's output stayed in the state across it).
    ///
    /// The bounds are allocator size classes: tokio allocates a task as a 32-byte header,
    /// the future (with its tracing span, if enabled) after the scheduler handle and task
    /// id, and a 48-byte trailer, rounded up to 128 bytes: 768 bytes per task at a
    /// 520-byte future, 512 at 336, 384 up to 272, 256 up to 152 (32 + 8 + 8 + 8 + 152 +
    /// 48; tokio's stage adds 8 bytes to the future: 392 at 280 was measured as a
    /// 512-byte task). mimalloc serves 256- and 320-byte blocks, so `Connection` and the session's
    /// `ArcInner` must fit those. `Connection` was 440 bytes (a 448-byte block) until the
    /// will and enhanced authentication (`Rare`), the batch counters (`Batch`) and the
    /// access cache (`AclChecked`) were boxed for the clients that use them, the store's
    /// durable ticket was read from one receiver in `Inner` and the keep-alive timer
    /// went to the broker's housekeeping task: 304 with the permit flag and drain sender.
    /// Then 256 (the 256-byte class): peer and user name read from the `ConnInfo` it
    /// shares with its session (one pointer instead of two strings), the last read's time
    /// in 8 bytes, message ids as a next id and a count, and its seven flags in a byte.
    /// The session fits mimalloc's 256-byte class (240 + the `Arc`'s counts) since its
    /// maps share one hasher (`SessionHash`), its QoS 2 ids are boxed on first use, the
    /// attached connection and the time of the last close share a field, and the wake-up's
    /// pending flag sits beside the session's other flags.
    #[tokio::test]
    async fn a_connection_task_stays_small() {
        let broker = crate::Broker::new(
            crate::config::BrokerConfig::default(),
            Arc::new(halyard_store::MemoryStore::new()),
        );
        let (a, _b) = tokio::io::duplex(64);
        let stream: Box<dyn halyard_transport::AsyncStream> = Box::new(a);
        let task = super::super::serve(
            broker.inner,
            stream,
            "test".into(),
            tokio::sync::mpsc::channel(1).0,
            false,
        );
        let size = std::mem::size_of_val(&task);
        assert!(size <= 152, "connection task future is {size} bytes");
        let conn = std::mem::size_of::<
            super::super::Connection<Box<dyn halyard_transport::AsyncStream>>,
        >();
        assert!(conn <= 256, "Connection is {conn} bytes");
        let session = std::mem::size_of::<crate::session::Session>();
        assert!(session + 16 <= 256, "Session is {session} bytes");
        // Shared by the connection and its session: the 80-byte class with the `Arc`'s
        // counts, the peer's address inline.
        let info = std::mem::size_of::<crate::session::ConnInfo>();
        assert!(info + 16 <= 80, "ConnInfo is {info} bytes");
    }
}

mod lifecycle {
    use std::sync::Arc;
    use std::time::Duration;

    use halyard_codec::{Packet, ProtocolVersion, ReasonCode};
    use halyard_testkit::{RawClient, Recv};
    use tokio::io::DuplexStream;

    async fn online(
        broker: &crate::Broker,
        id: &str,
        clean: bool,
        keep_alive: u16,
    ) -> RawClient<DuplexStream> {
        online_v(broker, id, clean, keep_alive, ProtocolVersion::V5).await
    }

    async fn online_v(
        broker: &crate::Broker,
        id: &str,
        clean: bool,
        keep_alive: u16,
        protocol: ProtocolVersion,
    ) -> RawClient<DuplexStream> {
        let (a, b) = tokio::io::duplex(64 * 1024);
        broker.spawn_connection(b, "duplex");
        let mut c = RawClient::new(a);
        c.version = protocol;
        c.send(&halyard_testkit::connect_packet(
            protocol, id, clean, keep_alive,
        ))
        .await;
        assert!(matches!(c.recv().await, Packet::ConnAck(_)));
        c
    }

    fn entries(broker: &crate::Broker) -> usize {
        broker.inner.timers.keepalive.lock().unwrap().len()
    }

    /// A keep-alive deadline [MQTT-3.1.2-22] leaves the broker's queue with its
    /// connection: at DISCONNECT, at a close, and at a takeover (the old connection's),
    /// so the queue holds one entry per live connection with a keep alive, and a taken
    /// over connection's deadline cannot close its successor.
    #[tokio::test(start_paused = true)]
    async fn keep_alive_deadlines_leave_with_their_connection() {
        let broker = crate::Broker::new(
            crate::config::BrokerConfig::default(),
            Arc::new(halyard_store::MemoryStore::new()),
        );
        let _none = online(&broker, "no-keep-alive", true, 0).await;
        assert_eq!(entries(&broker), 0);
        let mut a = online(&broker, "k", false, 2).await;
        assert_eq!(entries(&broker), 1);
        // Taken over (session resumed) by a connection with a longer keep alive: the old
        // deadline (3 s) goes with the old connection [MQTT-3.1.4-3].
        let mut b = online(&broker, "k", false, 4).await;
        match a.recv().await {
            Packet::Disconnect(d) => assert_eq!(d.reason, ReasonCode::SessionTakenOver),
            other => panic!("expected the takeover DISCONNECT, got {other:?}"),
        }
        halyard_testkit::eventually("old deadline removed", || entries(&broker) == 1).await;
        // Well past the old connection's 3 s, within the new one's 6 s.
        b.expect_silence(Duration::from_millis(5900)).await;
        match b.recv_within(Duration::from_millis(200)).await {
            Recv::Packet(Packet::Disconnect(d)) => {
                assert_eq!(d.reason, ReasonCode::KeepAliveTimeout)
            }
            other => panic!("expected Keep Alive timeout at 6 s, got {other:?}"),
        }
        halyard_testkit::eventually("expired deadline gone", || entries(&broker) == 0).await;
        // A client that disconnects and one whose socket closes take theirs along.
        let mut c = online(&broker, "c", true, 30).await;
        let d = online(&broker, "d", true, 30).await;
        assert_eq!(entries(&broker), 2);
        c.send_hex("E0 00").await;
        drop(d);
        halyard_testkit::eventually("closed connections' deadlines removed", || {
            entries(&broker) == 0
        })
        .await;
    }

    /// The session's wake-up has one waker slot (`session::Wake`): after a takeover that
    /// resumes the session [MQTT-3.1.4-3], every message published must wake the new
    /// connection, whatever the old one (kicked, not yet closed) does.
    #[tokio::test]
    async fn a_resumed_session_wakes_its_new_connection() {
        use halyard_codec::{QoS, SubscriptionOptions, TopicFilter, TopicName};
        let broker = crate::Broker::new(
            crate::config::BrokerConfig::default(),
            Arc::new(halyard_store::MemoryStore::new()),
        );
        let mut a = online_v(&broker, "w", false, 0, ProtocolVersion::V3_1_1).await;
        a.send(&Packet::Subscribe(halyard_codec::Subscribe {
            packet_id: 1,
            filters: vec![(
                TopicFilter::new("w/t").unwrap(),
                SubscriptionOptions {
                    qos: QoS::AtMostOnce,
                    ..Default::default()
                },
            )],
            properties: Default::default(),
        }))
        .await;
        assert!(matches!(a.recv().await, Packet::SubAck(_)));
        let mut p = online(&broker, "p", true, 0).await;
        // `a` waits, its waker in the slot; `b` takes the session over while `a` has
        // not been read from (its kick is pending, its close not yet seen).
        let mut b = online_v(&broker, "w", false, 0, ProtocolVersion::V3_1_1).await;
        for round in 0..20u8 {
            p.send(&Packet::Publish(halyard_codec::Publish::new(
                TopicName::new("w/t").unwrap(),
                vec![round],
            )))
            .await;
            match b.recv_within(Duration::from_secs(5)).await {
                Recv::Packet(Packet::Publish(m)) => assert_eq!(&m.payload[..], &[round]),
                other => panic!(
                    "round {round}: expected the message on the new connection, got {other:?}"
                ),
            }
        }
        drop(a);
    }

    /// The one waker slot after a takeover [MQTT-3.1.4-3]: the old connection, polled
    /// late (after its successor waits), learns Session taken over and leaves the
    /// successor's waker in place, so a message wakes the successor. Kicks reach only the
    /// attached connection, once. (Registering without the kick check, the old
    /// connection's waker replaced the new one's and this fails.)
    #[test]
    fn a_taken_over_connection_never_replaces_its_successors_waker() {
        use crate::session::Session;
        use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
        use std::task::{Context, Poll, Waker};
        struct Count(AtomicUsize);
        impl std::task::Wake for Count {
            fn wake(self: Arc<Self>) {
                self.0.fetch_add(1, Ordering::SeqCst);
            }
        }
        let count = |c: &Arc<Count>| c.0.load(Ordering::SeqCst);
        let (ca, cb) = (
            Arc::new(Count(AtomicUsize::new(0))),
            Arc::new(Count(AtomicUsize::new(0))),
        );
        let (wa, wb) = (Waker::from(ca.clone()), Waker::from(cb.clone()));
        let (mut cxa, mut cxb) = (Context::from_waker(&wa), Context::from_waker(&wb));

        let session = Session::new("s".into(), ProtocolVersion::V5, 0);
        session.lock().attach(1);
        let seen_a = AtomicU32::new(session.kicks());
        assert!(session.poll_kick(&mut cxa, 1, &seen_a, true).is_pending());
        assert!(session.poll_woken(&mut cxa, &seen_a).is_pending());

        // Connection 2 takes the session over (as `attach_session` does).
        {
            let mut st = session.lock();
            assert!(st.take_conn().is_some());
            session.kicked();
            st.attach(2);
        }
        assert_eq!(count(&ca), 1, "the takeover wakes the old connection");
        let seen_b = AtomicU32::new(session.kicks());
        assert!(session.poll_kick(&mut cxb, 2, &seen_b, true).is_pending());
        assert!(session.poll_woken(&mut cxb, &seen_b).is_pending());

        // The old connection runs late, its wake-up branch first (the worst order).
        assert!(session.poll_woken(&mut cxa, &seen_a).is_ready());
        assert_eq!(
            session.poll_kick(&mut cxa, 1, &seen_a, true),
            Poll::Ready(ReasonCode::SessionTakenOver)
        );
        session.wake();
        assert_eq!(count(&cb), 1, "a message wakes the new connection");
        assert_eq!(count(&ca), 1, "and not the old one");

        // An admin kick reaches the attached connection with its reason, once.
        let mut st = session.lock();
        assert!(session.kick(&mut st, ReasonCode::AdministrativeAction));
        assert!(!session.kick(&mut st, ReasonCode::ServerShuttingDown));
        drop(st);
        assert_eq!(
            session.poll_kick(&mut cxb, 2, &seen_b, true),
            Poll::Ready(ReasonCode::AdministrativeAction)
        );
    }

    /// The deadline keeps only its low 32 bits in the session; the rest is restored as
    /// the value nearest to now, also across a 2^32 ms boundary either way.
    #[test]
    fn keep_alive_deadline_restored_from_its_low_bits() {
        let restore = crate::timers::restore_ms;
        for now in [
            0u64,
            5_000,
            1 << 32,
            (1 << 32) + 10,
            (3 << 32) - 10,
            1 << 40,
        ] {
            for ahead in [0u64, 1, 98_302_500] {
                let due = now + ahead;
                assert_eq!(restore(now, due as u32), due, "now {now} due {due}");
            }
            if now >= 1_000 {
                let due = now - 1_000; // came due, not yet handled
                assert_eq!(restore(now, due as u32), due, "now {now} due {due}");
            }
        }
    }
}
