//! Ordering across connections: a SUBSCRIBE that reaches the broker before another
//! client's PUBLISH to a matching topic gets that message, as nearly always as a
//! multi-threaded broker can tell arrival order (see "Ordering across
//! connections" in ARCHITECTURE.md). The clients are blocking sockets on their own threads,
//! so the PUBLISH follows the SUBSCRIBE by a measured spacing (busy-waited, as a client at
//! work does), with the broker on a two-worker runtime, idle and with both cores busy.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::*;
use halyard_codec::*;
use halyard_testkit::TestBroker;

const TRIES: usize = 1000;

struct Client {
    s: TcpStream,
    buf: BytesMut,
    v: ProtocolVersion,
}

impl Client {
    fn connect(addr: SocketAddr, v: ProtocolVersion, id: &str) -> Client {
        let s = TcpStream::connect(addr).unwrap();
        s.set_nodelay(true).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut c = Client {
            s,
            buf: BytesMut::new(),
            v,
        };
        c.send(&connect(v, id, true, 0));
        assert!(matches!(c.recv(), Packet::ConnAck(a) if a.reason == ReasonCode::Success));
        c
    }

    fn send(&mut self, p: &Packet) {
        let mut b = BytesMut::new();
        p.encode(self.v, &mut b).unwrap();
        self.s.write_all(&b).unwrap();
    }

    fn recv(&mut self) -> Packet {
        loop {
            if let Some(p) = decode(&mut self.buf, self.v, MAX_PACKET_SIZE).unwrap() {
                return p;
            }
            let mut chunk = [0u8; 4096];
            let n = self.s.read(&mut chunk).expect("read within 10 s");
            assert!(n > 0, "broker closed the connection");
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }

    /// Reads up to a PINGRESP; returns the PUBLISH payloads seen on the way.
    fn ping(&mut self) -> Vec<Bytes> {
        self.send(&Packet::PingReq);
        let mut got = Vec::new();
        loop {
            match self.recv() {
                Packet::PingResp => return got,
                Packet::Publish(p) => got.push(p.payload),
                Packet::SubAck(_) => {}
                other => panic!("unexpected {other:?}"),
            }
        }
    }
}

fn spin(d: Duration) {
    let until = Instant::now() + d;
    while Instant::now() < until {
        std::hint::spin_loop();
    }
}

/// Runs `TRIES` rounds of: A quiet for 1.2 ms, B sends SUBSCRIBE (not waiting for SUBACK),
/// `spacing` later A publishes to the topic. Returns how many of B's subscriptions missed their message.
fn misses(addr: SocketAddr, v: ProtocolVersion, spacing: Duration, tag: &str) -> usize {
    let mut b = Client::connect(addr, v, &format!("ord-b-{tag}"));
    let mut a = Client::connect(addr, v, &format!("ord-a-{tag}"));
    let mut missed = 0;
    for i in 0..TRIES {
        let t = format!("ord/{tag}/{i}");
        // A has been quiet for over a millisecond, as a client between requests is: the
        // condition under which the broker orders its PUBLISH after a SUBSCRIBE read with
        // it (ARCHITECTURE.md, "Ordering across connections").
        spin(Duration::from_micros(1200));
        b.send(&subscribe((i % 60_000) as u16 + 1, &t, QoS::AtMostOnce));
        spin(spacing);
        a.send(&publish(&t, QoS::AtMostOnce, 0, t.as_bytes()));
        // A's PINGRESP: its PUBLISH was routed (A's packets are handled in order).
        assert!(a.ping().is_empty());
        // Two round trips from B: a message queued to it before its first PINGREQ is
        // written before its second PINGRESP (each turn of its connection's loop moves
        // the queue into the write buffer before it reads again).
        let mut got = b.ping();
        got.extend(b.ping());
        match got.as_slice() {
            [] => missed += 1,
            [m] => assert_eq!(&m[..], t.as_bytes()),
            more => panic!("one message, got {more:?}"),
        }
    }
    missed
}

fn run(v: ProtocolVersion, busy: bool) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let tb = rt.block_on(TestBroker::start());
    let stop = Arc::new(AtomicBool::new(false));
    // Both cores busy with other work: the broker's workers are preempted.
    let spinners: Vec<_> = (0..if busy { 2 } else { 0 })
        .map(|_| {
            let stop = stop.clone();
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    std::hint::spin_loop();
                }
            })
        })
        .collect();
    // (spacing in us, most misses allowed of TRIES). MQTT orders nothing across
    // connections, and the broker cannot see when bytes reached the kernel: a worker
    // preempted before it reads a SUBSCRIBE loses the race. Measured (release build):
    // idle 1.2-1.6% missed at 0 us, none at 100 us and 1 ms; both cores busy 0.3-0.5%,
    // 0.1-0.4%, none. This test runs unoptimised, with two client threads spinning; the
    // bounds leave room for that and fail the broker without its yield (79% missed at
    // 0 us, 28% at 100 us, 3.3% at 1 ms, idle).
    let limits: [(u64, usize); 3] = if busy {
        [(0, TRIES / 10), (100, TRIES / 20), (1000, TRIES / 20)]
    } else {
        [(0, TRIES / 20), (100, TRIES / 50), (1000, TRIES / 100)]
    };
    let mut report = Vec::new();
    for (us, allowed) in limits {
        let tag = format!("{}-{us}-{busy}", v.level());
        let m = misses(tb.addr, v, Duration::from_micros(us), &tag);
        report.push((us, m, allowed));
    }
    stop.store(true, Ordering::Relaxed);
    for s in spinners {
        s.join().unwrap();
    }
    eprintln!("{v:?} busy={busy}: (spacing us, missed of {TRIES}, allowed) {report:?}");
    for (us, m, allowed) in report {
        assert!(
            m <= allowed,
            "{v:?} busy={busy}: {m} of {TRIES} missed {us} us apart (at most {allowed})"
        );
    }
    drop(tb);
    rt.shutdown_timeout(Duration::from_secs(5));
}

/// One test, so the idle runs have the machine to themselves (tests of one binary run in
/// parallel).
#[test]
fn subscribe_read_before_a_quiet_clients_publish_gets_it_v3_1_1_and_v5() {
    for v in [V3_1_1, V5] {
        run(v, false);
        run(v, true);
    }
}
