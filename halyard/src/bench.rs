//! `halyard bench`: N publisher -> subscriber pairs over raw MQTT (our codec on TCP).
//!
//! Each payload starts with the publisher's index, a sequence number and the send time, so
//! the subscribers count exactly what arrived, what arrived twice and how long it took.
//! Publishers keep at most `--window` QoS 1/2 messages unacknowledged, so a broker that
//! queues cannot look faster than it delivers. Subscribers use persistent sessions with
//! `--persistent` (their queues then go through the broker's store).

use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use clap::Args;
use halyard_codec::{
    Ack, Bytes, BytesMut, ClientId, Connect, MAX_PACKET_SIZE, Packet, Properties, ProtocolVersion,
    Publish, QoS, Subscribe, SubscriptionOptions, TopicFilter, TopicName, decode,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::Mutex;

#[derive(Debug, Args)]
pub(crate) struct BenchArgs {
    /// Broker host.
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    /// Broker port.
    #[arg(long, short = 'p', default_value_t = 1883)]
    port: u16,
    /// Publisher/subscriber pairs.
    #[arg(long, default_value_t = 16)]
    pairs: usize,
    /// QoS of publications and subscriptions.
    #[arg(long, short = 'q', default_value_t = 1)]
    qos: u8,
    /// Payload bytes (at least 24: index, sequence, timestamp).
    #[arg(long, short = 's', default_value_t = 64)]
    size: usize,
    /// Seconds to publish.
    #[arg(long, short = 'd', default_value_t = 10)]
    duration: u64,
    /// Unacknowledged QoS 1/2 messages per publisher.
    #[arg(long, default_value_t = 64)]
    window: usize,
    /// Subscribers use persistent sessions (session expiry 3600).
    #[arg(long)]
    persistent: bool,
    /// Print the result as JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Default)]
struct Counters {
    sent: AtomicU64,
    acked: AtomicU64,
    received: AtomicU64,
    duplicates: AtomicU64,
}

pub(crate) fn run(args: &BenchArgs) -> ExitCode {
    if args.size < 24 || args.qos > 2 || args.pairs == 0 {
        eprintln!("halyard bench: need --size >= 24, --qos 0..2, --pairs >= 1");
        return ExitCode::from(2);
    }
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("halyard bench: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(bench(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("halyard bench: {e}");
            ExitCode::FAILURE
        }
    }
}

struct Conn {
    s: TcpStream,
    buf: BytesMut,
    out: BytesMut,
}

impl Conn {
    async fn open(args: &BenchArgs, id: &str, persistent: bool) -> std::io::Result<Conn> {
        let s = TcpStream::connect((args.host.as_str(), args.port)).await?;
        s.set_nodelay(true)?;
        let mut c = Conn {
            s,
            buf: BytesMut::with_capacity(64 * 1024),
            out: BytesMut::new(),
        };
        let connect = Packet::Connect(Box::new(Connect {
            protocol: ProtocolVersion::V5,
            clean_start: !persistent,
            keep_alive: 60,
            client_id: ClientId::new(id).map_err(|e| std::io::Error::other(e.to_string()))?,
            will: None,
            username: None,
            password: None,
            properties: Properties {
                session_expiry_interval: persistent.then_some(3600),
                receive_maximum: Some(u16::MAX),
                ..Default::default()
            },
        }));
        c.send(&connect).await?;
        match c.recv().await? {
            Packet::ConnAck(a) if !a.reason.is_error() => Ok(c),
            other => Err(std::io::Error::other(format!("connect refused: {other:?}"))),
        }
    }
    fn push(&mut self, p: &Packet) {
        let _ = p.encode(ProtocolVersion::V5, &mut self.out);
    }
    async fn flush(&mut self) -> std::io::Result<()> {
        if !self.out.is_empty() {
            self.s.write_all(&self.out).await?;
            self.out.clear();
        }
        Ok(())
    }
    async fn send(&mut self, p: &Packet) -> std::io::Result<()> {
        self.push(p);
        self.flush().await
    }
    async fn recv(&mut self) -> std::io::Result<Packet> {
        loop {
            match decode(&mut self.buf, ProtocolVersion::V5, MAX_PACKET_SIZE) {
                Ok(Some(p)) => return Ok(p),
                Ok(None) => {}
                Err(e) => return Err(std::io::Error::other(e.to_string())),
            }
            if self.s.read_buf(&mut self.buf).await? == 0 {
                return Err(std::io::Error::other("broker closed the connection"));
            }
        }
    }
}

async fn bench(args: &BenchArgs) -> std::io::Result<()> {
    let qos = QoS::from_u8(args.qos).unwrap_or(QoS::AtLeastOnce);
    let counters = Arc::new(Counters::default());
    let latencies = Arc::new(Mutex::new(Vec::<u32>::new()));
    let stop = Arc::new(AtomicBool::new(false));
    let epoch = Instant::now();
    let tag = std::process::id();
    // Subscribers first, each on its own topic, subscribed before anything is published.
    let mut subs = Vec::new();
    for i in 0..args.pairs {
        let mut c = Conn::open(args, &format!("bench-{tag}-sub-{i}"), args.persistent).await?;
        c.send(&Packet::Subscribe(Subscribe {
            packet_id: 1,
            filters: vec![(
                TopicFilter::try_from(format!("bench/{tag}/{i}").as_str())
                    .map_err(std::io::Error::other)?,
                SubscriptionOptions {
                    qos,
                    ..Default::default()
                },
            )],
            properties: Properties::default(),
        }))
        .await?;
        match c.recv().await? {
            Packet::SubAck(_) => {}
            other => return Err(std::io::Error::other(format!("expected SUBACK: {other:?}"))),
        }
        let (counters, latencies) = (counters.clone(), latencies.clone());
        subs.push(tokio::spawn(async move {
            let mut next_seq = 0u64;
            let mut lat = Vec::new();
            while let Ok(p) = c.recv().await {
                match p {
                    Packet::Publish(m) => {
                        let seq =
                            u64::from_be_bytes(m.payload[8..16].try_into().unwrap_or_default());
                        let sent_ns =
                            u64::from_be_bytes(m.payload[16..24].try_into().unwrap_or_default());
                        if seq < next_seq {
                            counters.duplicates.fetch_add(1, Ordering::Relaxed);
                        } else {
                            next_seq = seq + 1;
                            counters.received.fetch_add(1, Ordering::Relaxed);
                        }
                        let now_ns = epoch.elapsed().as_nanos() as u64;
                        lat.push((now_ns.saturating_sub(sent_ns) / 1000) as u32);
                        // Hand samples over as we go: the task is aborted at the end.
                        if lat.len() >= 1024 {
                            let mut all = latencies.lock().await;
                            if all.len() < 2_000_000 {
                                all.append(&mut lat);
                            } else {
                                lat.clear();
                            }
                        }
                        match m.qos {
                            QoS::AtMostOnce => {}
                            QoS::AtLeastOnce => c.push(&Packet::PubAck(Ack::new(m.packet_id))),
                            QoS::ExactlyOnce => c.push(&Packet::PubRec(Ack::new(m.packet_id))),
                        }
                        if c.buf.is_empty() && c.flush().await.is_err() {
                            break;
                        }
                    }
                    Packet::PubRel(a) => {
                        c.push(&Packet::PubComp(Ack::new(a.packet_id)));
                        if c.buf.is_empty() && c.flush().await.is_err() {
                            break;
                        }
                    }
                    Packet::Disconnect(_) => break,
                    _ => {}
                }
            }
            latencies.lock().await.extend(lat);
        }));
    }
    let started = Instant::now();
    let mut pubs = Vec::new();
    for i in 0..args.pairs {
        let mut c = Conn::open(args, &format!("bench-{tag}-pub-{i}"), false).await?;
        let (counters, stop) = (counters.clone(), stop.clone());
        let topic = TopicName::try_from(format!("bench/{tag}/{i}").as_str())
            .map_err(std::io::Error::other)?;
        let (size, window) = (args.size, args.window.max(1));
        pubs.push(tokio::spawn(async move {
            let mut seq = 0u64;
            let mut outstanding = 0usize;
            let mut next_id = 1u16;
            let mut payload = vec![0u8; size];
            payload[..8].copy_from_slice(&(i as u64).to_be_bytes());
            while !stop.load(Ordering::Relaxed) {
                while outstanding < window || qos == QoS::AtMostOnce {
                    payload[8..16].copy_from_slice(&seq.to_be_bytes());
                    payload[16..24]
                        .copy_from_slice(&(epoch.elapsed().as_nanos() as u64).to_be_bytes());
                    let mut p = Publish::new(topic.clone(), Bytes::copy_from_slice(&payload));
                    p.qos = qos;
                    if qos != QoS::AtMostOnce {
                        p.packet_id = next_id;
                        next_id = next_id.checked_add(1).unwrap_or(1);
                        outstanding += 1;
                    }
                    c.push(&Packet::Publish(p));
                    seq += 1;
                    counters.sent.fetch_add(1, Ordering::Relaxed);
                    if qos == QoS::AtMostOnce && c.out.len() > 16 * 1024 {
                        break;
                    }
                }
                if c.flush().await.is_err() {
                    return;
                }
                if qos == QoS::AtMostOnce {
                    tokio::task::yield_now().await;
                    continue;
                }
                match c.recv().await {
                    Ok(Packet::PubAck(_)) | Ok(Packet::PubComp(_)) => {
                        outstanding -= 1;
                        counters.acked.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(Packet::PubRec(a)) => c.push(&Packet::PubRel(Ack::new(a.packet_id))),
                    Ok(_) => {}
                    Err(_) => return,
                }
            }
            // Drain acknowledgements of what is still outstanding.
            while outstanding > 0 {
                let r = tokio::time::timeout(Duration::from_secs(10), c.recv()).await;
                match r {
                    Ok(Ok(Packet::PubAck(_))) | Ok(Ok(Packet::PubComp(_))) => {
                        outstanding -= 1;
                        counters.acked.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(Ok(Packet::PubRec(a))) => {
                        if c.send(&Packet::PubRel(Ack::new(a.packet_id)))
                            .await
                            .is_err()
                        {
                            return;
                        }
                    }
                    Ok(Ok(_)) => {}
                    _ => return,
                }
            }
        }));
    }
    let mut last = 0;
    for s in 1..=args.duration {
        tokio::time::sleep_until((started + Duration::from_secs(s)).into()).await;
        let r = counters.received.load(Ordering::Relaxed);
        if !args.json {
            eprintln!("  {s:>3}s  {:>9} msg/s delivered", r - last);
        }
        last = r;
    }
    stop.store(true, Ordering::Relaxed);
    let elapsed = started.elapsed();
    for p in pubs {
        let _ = p.await;
    }
    // Let deliveries of what was acknowledged arrive (they may lag the acks).
    let target = if qos == QoS::AtMostOnce {
        0
    } else {
        counters.acked.load(Ordering::Relaxed)
    };
    let wait_until = Instant::now() + Duration::from_secs(15);
    while counters.received.load(Ordering::Relaxed) < target && Instant::now() < wait_until {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let received = counters.received.load(Ordering::Relaxed);
    for s in subs {
        s.abort();
    }
    let mut lat = latencies.lock().await.clone();
    lat.sort_unstable();
    let pct = |p: f64| {
        lat.get(((lat.len() as f64 - 1.0) * p) as usize)
            .copied()
            .unwrap_or(0)
    };
    let sent = counters.sent.load(Ordering::Relaxed);
    let acked = counters.acked.load(Ordering::Relaxed);
    let dups = counters.duplicates.load(Ordering::Relaxed);
    let rate = received as f64 / elapsed.as_secs_f64();
    let lost = acked.saturating_sub(received);
    if args.json {
        println!(
            "{}",
            serde_json::json!({
                "pairs": args.pairs, "qos": args.qos, "size": args.size, "persistent": args.persistent,
                "seconds": elapsed.as_secs_f64(), "sent": sent, "acknowledged": acked,
                "received": received, "lost_acknowledged": lost, "duplicates": dups,
                "delivered_per_second": rate,
                "latency_us": { "p50": pct(0.5), "p99": pct(0.99), "p999": pct(0.999), "max": pct(1.0) },
            })
        );
    } else {
        println!(
            "pairs {} qos {} size {} persistent {}: {:.0} msg/s delivered; sent {sent}, acknowledged {acked}, \
             received {received}, acknowledged-but-lost {lost}, duplicates {dups}; latency p50 {} us, p99 {} us, p99.9 {} us",
            args.pairs,
            args.qos,
            args.size,
            args.persistent,
            rate,
            pct(0.5),
            pct(0.99),
            pct(0.999)
        );
    }
    Ok(())
}
