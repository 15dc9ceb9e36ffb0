//! `halyard bench`: an emqtt-bench-like load generator over raw MQTT (our codec on TCP, no
//! client library in the way), made to be honest about what a broker does:
//!
//! - every payload carries a magic, the publisher's index, a sequence number and the send
//!   time, so subscribers count exactly what arrived, what arrived twice and how long it
//!   took (latency in an HdrHistogram);
//! - publishers keep at most `--window` messages *not yet delivered to their subscribers*
//!   (and at most that many unacknowledged at QoS 1/2), so a broker that queues instead of
//!   delivering cannot look fast;
//! - a live line per second on stderr, a final report, `--json` for scripts.
//!
//! Scenarios: `conn` (N connections at a rate, held), `pub` (publishers only), `sub`
//! (subscribers only; counts messages from any `halyard bench pub`), `pubsub` (both, with
//! topic patterns: pairs, fan-in, fan-out).

use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use clap::{Args, Subcommand};
use halyard_codec::{
    Ack, Bytes, BytesMut, ClientId, Connect, MAX_PACKET_SIZE, Packet, Properties, ProtocolVersion,
    Publish, QoS, Subscribe, SubscriptionOptions, TopicFilter, TopicName, decode,
};
use hdrhistogram::Histogram;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{Mutex, Notify};

/// Payload header: magic, publisher index, sequence, send time (ns since the Unix epoch).
const MAGIC: [u8; 2] = *b"HB";
const HEADER: usize = 2 + 4 + 8 + 8;

#[derive(Debug, Args)]
pub(crate) struct BenchArgs {
    #[command(subcommand)]
    scenario: Scenario,
}

#[derive(Debug, Subcommand)]
enum Scenario {
    /// Open N connections at a rate and hold them.
    Conn(ConnArgs),
    /// Publishers only.
    Pub(PubSubArgs),
    /// Subscribers only (count messages published by `halyard bench pub`).
    Sub(PubSubArgs),
    /// Publishers and subscribers: pairs, fan-in, fan-out, with exact loss/duplicate counts
    /// and end-to-end latency.
    Pubsub(PubSubArgs),
}

#[derive(Debug, Args, Clone)]
struct Common {
    /// Broker host.
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    /// Broker port.
    #[arg(long, short = 'p', default_value_t = 1883)]
    port: u16,
    /// MQTT version: 5 or 311.
    #[arg(long, short = 'V', default_value = "5")]
    version: String,
    /// User name and password (user:password).
    #[arg(long)]
    auth: Option<String>,
    /// Seconds to run.
    #[arg(long, short = 'd', default_value_t = 10)]
    duration: u64,
    /// Print the result as JSON (progress lines are not printed).
    #[arg(long)]
    json: bool,
    /// No progress lines.
    #[arg(long)]
    quiet: bool,
}

#[derive(Debug, Args)]
struct ConnArgs {
    #[command(flatten)]
    common: Common,
    /// Connections to open.
    #[arg(long, short = 'c', default_value_t = 1000)]
    count: usize,
    /// New connections per second (0: as fast as they complete, 256 at a time).
    #[arg(long, short = 'r', default_value_t = 0)]
    rate: u64,
    /// Keep alive in seconds sent in CONNECT (0: none, so idle connections stay up).
    #[arg(long, short = 'k', default_value_t = 0)]
    keepalive: u16,
}

#[derive(Debug, Args)]
struct PubSubArgs {
    #[command(flatten)]
    common: Common,
    /// Keep alive in seconds sent in CONNECT (0: none; some brokers, e.g. rumqttd, refuse 0).
    #[arg(long, short = 'k', default_value_t = 0)]
    keepalive: u16,
    /// Publishers.
    #[arg(long, default_value_t = 16)]
    pubs: usize,
    /// Subscribers.
    #[arg(long, default_value_t = 16)]
    subs: usize,
    /// Publish topic: %i is the publisher's index, %r this run's tag.
    #[arg(long, short = 't', default_value = "bench/%r/%i")]
    topic: String,
    /// Subscription filter: %i is the subscriber's index, %r this run's tag
    /// (fan-in: `bench/%r/#`; fan-out: a topic without %i and one publisher).
    #[arg(long, short = 'f', default_value = "bench/%r/%i")]
    filter: String,
    /// Run tag for %r (default: the process id; give the same to `pub` and `sub` runs).
    #[arg(long)]
    tag: Option<String>,
    /// QoS of publications and subscriptions.
    #[arg(long, short = 'q', default_value_t = 1)]
    qos: u8,
    /// Payload bytes (at least 22: the header).
    #[arg(long, short = 's', default_value_t = 64)]
    size: usize,
    /// Messages per second per publisher (0: as fast as the window allows).
    #[arg(long, short = 'r', default_value_t = 0)]
    rate: u64,
    /// Messages per publisher not yet delivered to its subscribers (and, at QoS 1/2, not
    /// yet acknowledged) before it waits.
    #[arg(long, default_value_t = 64)]
    window: usize,
    /// Subscribers use persistent sessions (session expiry 3600).
    #[arg(long)]
    persistent: bool,
}

pub(crate) fn run(args: &BenchArgs) -> ExitCode {
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
    let r = match &args.scenario {
        Scenario::Conn(a) => rt.block_on(conn_scenario(a)),
        Scenario::Pub(a) => rt.block_on(pubsub(a, true, false)),
        Scenario::Sub(a) => rt.block_on(pubsub(a, false, true)),
        Scenario::Pubsub(a) => rt.block_on(pubsub(a, true, true)),
    };
    match r {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("halyard bench: {e}");
            ExitCode::FAILURE
        }
    }
}

fn version(c: &Common) -> std::io::Result<ProtocolVersion> {
    match c.version.as_str() {
        "5" | "mqttv5" => Ok(ProtocolVersion::V5),
        "311" | "mqttv311" => Ok(ProtocolVersion::V3_1_1),
        other => Err(std::io::Error::other(format!(
            "unknown MQTT version {other}"
        ))),
    }
}

fn err(e: impl std::fmt::Display) -> std::io::Error {
    std::io::Error::other(e.to_string())
}

/// One raw MQTT connection.
struct Conn {
    s: TcpStream,
    v: ProtocolVersion,
    /// The broker's Receive Maximum (v5 CONNACK); 3.1.1 brokers do not say.
    receive_maximum: Option<u16>,
    buf: BytesMut,
    out: BytesMut,
}

impl Conn {
    async fn open(
        c: &Common,
        id: &str,
        persistent: bool,
        keep_alive: u16,
    ) -> std::io::Result<Conn> {
        let v = version(c)?;
        let s = TcpStream::connect((c.host.as_str(), c.port)).await?;
        s.set_nodelay(true)?;
        let mut conn = Conn {
            s,
            v,
            receive_maximum: None,
            buf: BytesMut::with_capacity(16 * 1024),
            out: BytesMut::new(),
        };
        let (username, password) = match &c.auth {
            Some(a) => {
                let (u, p) = a.split_once(':').unwrap_or((a, ""));
                (Some(u.into()), Some(Bytes::from(p.to_string())))
            }
            None => (None, None),
        };
        let connect = Packet::Connect(Box::new(Connect {
            protocol: v,
            clean_start: !persistent,
            keep_alive,
            client_id: ClientId::new(id).map_err(err)?,
            will: None,
            username,
            password,
            properties: Properties {
                session_expiry_interval: (persistent && v.is_v5()).then_some(3600),
                receive_maximum: v.is_v5().then_some(u16::MAX),
                ..Default::default()
            },
        }));
        conn.send(&connect).await?;
        match conn.recv().await? {
            Packet::ConnAck(a) if !a.reason.is_error() => {
                conn.receive_maximum = a.properties.receive_maximum;
                Ok(conn)
            }
            Packet::ConnAck(a) => Err(err(format!("connection refused: {:?}", a.reason))),
            other => Err(err(format!("expected CONNACK, got {}", other.name()))),
        }
    }
    fn push(&mut self, p: &Packet) {
        // Our own packets always encode (sizes are far below the limits).
        let _ = p.encode(self.v, &mut self.out);
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
            match decode(&mut self.buf, self.v, MAX_PACKET_SIZE) {
                Ok(Some(p)) => return Ok(p),
                Ok(None) => {}
                Err(e) => return Err(err(e)),
            }
            if self.s.read_buf(&mut self.buf).await? == 0 {
                return Err(err("the broker closed the connection"));
            }
        }
    }
    /// A packet if one is already buffered (no waiting).
    fn try_recv(&mut self) -> std::io::Result<Option<Packet>> {
        decode(&mut self.buf, self.v, MAX_PACKET_SIZE).map_err(err)
    }
}

fn histogram() -> Histogram<u64> {
    // 1 µs .. 60 s at 3 significant digits.
    Histogram::new_with_bounds(1, 60_000_000, 3).expect("valid histogram bounds")
}

fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

fn percentiles(h: &Histogram<u64>) -> serde_json::Value {
    serde_json::json!({
        "count": h.len(),
        "p50": h.value_at_quantile(0.5),
        "p90": h.value_at_quantile(0.9),
        "p99": h.value_at_quantile(0.99),
        "p999": h.value_at_quantile(0.999),
        "max": h.max(),
    })
}

async fn conn_scenario(a: &ConnArgs) -> std::io::Result<bool> {
    let c = &a.common;
    let tag = std::process::id();
    let connected = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let lat = Arc::new(Mutex::new(histogram()));
    let held = Arc::new(Mutex::new(Vec::with_capacity(a.count)));
    let limit = Arc::new(tokio::sync::Semaphore::new(256));
    let started = Instant::now();
    let progress = spawn_progress(c, started, {
        let (connected, errors) = (connected.clone(), errors.clone());
        move || {
            format!(
                "connected {:>8}  errors {}",
                connected.load(Ordering::Relaxed),
                errors.load(Ordering::Relaxed)
            )
        }
    });
    let mut tasks = Vec::new();
    for i in 0..a.count {
        if a.rate > 0 {
            let due = started + Duration::from_secs_f64(i as f64 / a.rate as f64);
            tokio::time::sleep_until(due.into()).await;
        }
        let permit = limit.clone().acquire_owned().await.map_err(err)?;
        let (c, connected, errors, lat, held) = (
            c.clone(),
            connected.clone(),
            errors.clone(),
            lat.clone(),
            held.clone(),
        );
        let keepalive = a.keepalive;
        tasks.push(tokio::spawn(async move {
            let t = Instant::now();
            match Conn::open(&c, &format!("bench-{tag}-conn-{i}"), false, keepalive).await {
                Ok(conn) => {
                    let us = t.elapsed().as_micros() as u64;
                    let _ = lat.lock().await.record(us.max(1));
                    connected.fetch_add(1, Ordering::Relaxed);
                    // Hold the socket only; no buffers, no task per connection.
                    held.lock().await.push(conn.s);
                }
                Err(e) => {
                    if errors.fetch_add(1, Ordering::Relaxed) < 3 {
                        eprintln!("connection {i}: {e}");
                    }
                }
            }
            drop(permit);
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
    let connect_secs = started.elapsed().as_secs_f64();
    let n = connected.load(Ordering::Relaxed);
    if !c.json && !c.quiet {
        eprintln!(
            "{n} connected in {connect_secs:.2} s ({:.0}/s); holding for {} s",
            n as f64 / connect_secs,
            c.duration
        );
    }
    tokio::time::sleep(Duration::from_secs(c.duration)).await;
    // Connections still open at the end (the broker may have dropped some).
    let mut alive = 0u64;
    for s in held.lock().await.iter() {
        let mut b = [0u8; 1];
        if matches!(s.try_read(&mut b), Err(ref e) if e.kind() == std::io::ErrorKind::WouldBlock) {
            alive += 1;
        }
    }
    progress.abort();
    let errors = errors.load(Ordering::Relaxed);
    let h = lat.lock().await;
    if c.json {
        println!(
            "{}",
            serde_json::json!({
                "scenario": "conn", "requested": a.count, "connected": n, "errors": errors,
                "alive_at_end": alive, "connect_seconds": connect_secs,
                "connections_per_second": n as f64 / connect_secs,
                "connect_latency_us": percentiles(&h),
            })
        );
    } else {
        println!(
            "conn: {n}/{} connected ({errors} errors) in {connect_secs:.2} s = {:.0} conn/s; {alive} alive after {} s; CONNACK latency p50 {} us, p99 {} us, max {} us",
            a.count,
            n as f64 / connect_secs,
            c.duration,
            h.value_at_quantile(0.5),
            h.value_at_quantile(0.99),
            h.max()
        );
    }
    Ok(errors == 0 && alive == n)
}

fn spawn_progress(
    c: &Common,
    started: Instant,
    mut line: impl FnMut() -> String + Send + 'static,
) -> tokio::task::JoinHandle<()> {
    let quiet = c.json || c.quiet;
    tokio::spawn(async move {
        let mut s = 1u64;
        loop {
            tokio::time::sleep_until((started + Duration::from_secs(s)).into()).await;
            if !quiet {
                eprintln!("  {s:>4}s  {}", line());
            }
            s += 1;
        }
    })
}

/// Per publisher: what it sent, what the broker acknowledged, what its subscribers got.
struct PubState {
    sent: AtomicU64,
    acked: AtomicU64,
    /// Unique deliveries of its messages, over all its subscribers.
    delivered: AtomicU64,
    /// Subscribers whose filter matches its topic.
    fanout: u64,
    /// Times the end-to-end window was given up on (QoS 0 losses).
    stalls: AtomicU64,
    wake: Notify,
}

#[derive(Default)]
struct Totals {
    received: AtomicU64,
    duplicates: AtomicU64,
    gaps: AtomicU64,
    foreign: AtomicU64,
}

fn expand(pattern: &str, i: usize, tag: &str) -> String {
    pattern.replace("%i", &i.to_string()).replace("%r", tag)
}

async fn pubsub(a: &PubSubArgs, with_pubs: bool, with_subs: bool) -> std::io::Result<bool> {
    let c = &a.common;
    let qos = QoS::from_u8(a.qos).ok_or_else(|| err("--qos must be 0, 1 or 2"))?;
    if a.size < HEADER {
        return Err(err(format!(
            "--size must be at least {HEADER} (the header)"
        )));
    }
    let tag = a
        .tag
        .clone()
        .unwrap_or_else(|| std::process::id().to_string());
    let npubs = if with_pubs { a.pubs } else { 0 };
    let nsubs = if with_subs { a.subs } else { 0 };
    let topics: Vec<TopicName> = (0..a.pubs)
        .map(|i| TopicName::new(expand(&a.topic, i, &tag)).map_err(err))
        .collect::<Result<_, _>>()?;
    let filters: Vec<TopicFilter> = (0..nsubs)
        .map(|i| TopicFilter::new(expand(&a.filter, i, &tag)).map_err(err))
        .collect::<Result<_, _>>()?;
    // Which subscribers each publisher's messages go to (by the broker's matching rules).
    let pubs: Arc<Vec<PubState>> = Arc::new(
        topics
            .iter()
            .map(|t| PubState {
                sent: AtomicU64::new(0),
                acked: AtomicU64::new(0),
                delivered: AtomicU64::new(0),
                fanout: filters.iter().filter(|f| f.matches(t.as_str())).count() as u64,
                stalls: AtomicU64::new(0),
                wake: Notify::new(),
            })
            .collect(),
    );
    let totals = Arc::new(Totals::default());
    let hist = Arc::new(Mutex::new(histogram()));
    let stop = Arc::new(AtomicBool::new(false));

    // Subscribers first, each subscribed before anything is published.
    let mut sub_tasks = Vec::new();
    for (j, f) in filters.iter().enumerate() {
        let mut conn = Conn::open(
            c,
            &format!("bench-{tag}-sub-{j}"),
            a.persistent,
            a.keepalive,
        )
        .await?;
        conn.send(&Packet::Subscribe(Subscribe {
            packet_id: 1,
            filters: vec![(
                f.clone(),
                SubscriptionOptions {
                    qos,
                    ..Default::default()
                },
            )],
            properties: Properties::default(),
        }))
        .await?;
        match conn.recv().await? {
            Packet::SubAck(s) if s.reasons.first().is_some_and(|r| !r.is_error()) => {}
            other => return Err(err(format!("subscription refused: {other:?}"))),
        }
        let (pubs, totals, hist) = (pubs.clone(), totals.clone(), hist.clone());
        let npub_total = a.pubs;
        sub_tasks.push(tokio::spawn(async move {
            subscriber(conn, pubs, npub_total, totals, hist).await;
        }));
    }

    let started = Instant::now();
    let progress = spawn_progress(c, started, {
        let (pubs, totals) = (pubs.clone(), totals.clone());
        let mut last = (0u64, 0u64);
        move || {
            let sent: u64 = pubs.iter().map(|p| p.sent.load(Ordering::Relaxed)).sum();
            let recv = totals.received.load(Ordering::Relaxed);
            let r = format!(
                "sent {:>9}/s  received {:>9}/s  duplicates {}",
                sent - last.0,
                recv - last.1,
                totals.duplicates.load(Ordering::Relaxed)
            );
            last = (sent, recv);
            r
        }
    });
    let mut pub_tasks = Vec::new();
    for (i, topic) in topics.iter().enumerate().take(npubs) {
        let conn = Conn::open(c, &format!("bench-{tag}-pub-{i}"), false, a.keepalive).await?;
        let (pubs, stop, topic) = (pubs.clone(), stop.clone(), topic.clone());
        let (size, window, rate, e2e) = (a.size, a.window.max(1), a.rate, with_subs);
        pub_tasks.push(tokio::spawn(async move {
            publisher(conn, i, topic, qos, size, window, rate, e2e, pubs, stop).await
        }));
    }
    tokio::time::sleep_until((started + Duration::from_secs(c.duration)).into()).await;
    stop.store(true, Ordering::Relaxed);
    for p in pubs.iter() {
        p.wake.notify_one();
    }
    let elapsed = started.elapsed();
    let mut pub_errors = 0u64;
    for t in pub_tasks {
        match t.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                pub_errors += 1;
                eprintln!("publisher: {e}");
            }
            Err(e) => {
                pub_errors += 1;
                eprintln!("publisher: {e}");
            }
        }
    }
    // Wait for deliveries that lag the acknowledgements (bounded).
    let expected = |pubs: &[PubState]| -> u64 {
        pubs.iter()
            .map(|p| {
                let base = if qos == QoS::AtMostOnce {
                    p.sent.load(Ordering::Relaxed)
                } else {
                    p.acked.load(Ordering::Relaxed)
                };
                base * p.fanout
            })
            .sum()
    };
    if with_pubs && with_subs {
        let until = Instant::now() + Duration::from_secs(15);
        while totals.received.load(Ordering::Relaxed) < expected(&pubs) && Instant::now() < until {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    progress.abort();
    for s in sub_tasks {
        s.abort();
    }
    let sent: u64 = pubs.iter().map(|p| p.sent.load(Ordering::Relaxed)).sum();
    let acked: u64 = pubs.iter().map(|p| p.acked.load(Ordering::Relaxed)).sum();
    let received = totals.received.load(Ordering::Relaxed);
    let dups = totals.duplicates.load(Ordering::Relaxed);
    let exp = expected(&pubs);
    let lost = if with_pubs && with_subs {
        exp.saturating_sub(received)
    } else {
        0
    };
    let secs = elapsed.as_secs_f64();
    let h = hist.lock().await;
    let scenario = match (with_pubs, with_subs) {
        (true, true) => "pubsub",
        (true, false) => "pub",
        _ => "sub",
    };
    if c.json {
        println!(
            "{}",
            serde_json::json!({
                "scenario": scenario, "pubs": npubs, "subs": nsubs, "qos": a.qos, "size": a.size,
                "rate_per_publisher": a.rate, "window": a.window, "persistent": a.persistent,
                "seconds": secs, "sent": sent, "acknowledged": acked, "received": received,
                "expected": exp, "lost": lost, "duplicates": dups,
                "gaps": totals.gaps.load(Ordering::Relaxed),
                "foreign": totals.foreign.load(Ordering::Relaxed),
                "window_stalls": pubs.iter().map(|p| p.stalls.load(Ordering::Relaxed)).sum::<u64>(),
                "sent_per_second": sent as f64 / secs,
                "delivered_per_second": received as f64 / secs,
                "latency_us": percentiles(&h),
                "publisher_errors": pub_errors,
            })
        );
    } else {
        println!(
            "{scenario}: {npubs} pubs -> {nsubs} subs, qos {}, {} B: sent {sent} ({:.0}/s), acknowledged {acked}, \
             delivered {received} ({:.0}/s), expected {exp}, lost {lost}, duplicates {dups}; \
             latency p50 {} us, p99 {} us, p99.9 {} us, max {} us",
            a.qos,
            a.size,
            sent as f64 / secs,
            received as f64 / secs,
            h.value_at_quantile(0.5),
            h.value_at_quantile(0.99),
            h.value_at_quantile(0.999),
            h.max()
        );
    }
    // Loss of acknowledged messages, or QoS 2 duplicates, fail the run.
    let ok = pub_errors == 0
        && (qos == QoS::AtMostOnce || lost == 0)
        && (qos != QoS::ExactlyOnce || dups == 0);
    Ok(ok)
}

#[allow(clippy::too_many_arguments)]
async fn publisher(
    mut c: Conn,
    i: usize,
    topic: TopicName,
    qos: QoS,
    size: usize,
    window: usize,
    rate: u64,
    e2e: bool,
    pubs: Arc<Vec<PubState>>,
    stop: Arc<AtomicBool>,
) -> std::io::Result<()> {
    let me = &pubs[i];
    // Never more unacknowledged than the broker allows [MQTT-3.3.4-9].
    // MQTT 3.x has no Receive Maximum: stay within what brokers allow by default
    // (Mosquitto's and our max_inflight_messages, 20), as client libraries do; past it a
    // broker may refuse or drop QoS 2 messages.
    let v3_limit = halyard_client::DEFAULT_V3_MAX_INFLIGHT;
    let ack_window = window.min(usize::from(c.receive_maximum.unwrap_or(if c.v.is_v5() {
        u16::MAX
    } else {
        v3_limit
    })));
    let mut payload = vec![0u8; size];
    payload[..2].copy_from_slice(&MAGIC);
    payload[2..6].copy_from_slice(&(i as u32).to_be_bytes());
    let mut seq = 0u64;
    let mut outstanding = 0usize;
    let mut next_id = 1u16;
    let started = Instant::now();
    let fanout = me.fanout.max(1);
    while !stop.load(Ordering::Relaxed) {
        // End-to-end window: messages sent but not yet delivered to (or, QoS 0, skipped
        // by) every subscriber.
        if e2e && me.fanout > 0 {
            let mut seen = me.delivered.load(Ordering::Acquire);
            let mut progress_at = Instant::now();
            while seq - me.delivered.load(Ordering::Acquire) / fanout >= window as u64 {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                let now = me.delivered.load(Ordering::Acquire);
                if now != seen {
                    (seen, progress_at) = (now, Instant::now());
                }
                // QoS 0 messages lost at the tail never arrive: after a second without
                // progress, go on (and count it).
                if qos == QoS::AtMostOnce && progress_at.elapsed() >= Duration::from_secs(1) {
                    me.stalls.fetch_add(1, Ordering::Relaxed);
                    break;
                }
                // What we wait for must be on its way.
                c.flush().await?;
                let notified = me.wake.notified();
                if seq - me.delivered.load(Ordering::Acquire) / fanout < window as u64 {
                    break;
                }
                let _ = tokio::time::timeout(Duration::from_millis(100), notified).await;
            }
            if stop.load(Ordering::Relaxed) {
                continue;
            }
        }
        if rate > 0 {
            let due = (started.elapsed().as_secs_f64() * rate as f64) as u64;
            if seq >= due {
                c.flush().await?;
                let next = started + Duration::from_secs_f64((seq + 1) as f64 / rate as f64);
                pace_until(next).await;
                continue;
            }
        }
        if qos != QoS::AtMostOnce && outstanding >= ack_window {
            c.flush().await?;
            let p = c.recv().await?;
            ack(&mut c, p, &mut outstanding, me);
            while let Some(p) = c.try_recv()? {
                ack(&mut c, p, &mut outstanding, me);
            }
            continue;
        }
        payload[6..14].copy_from_slice(&seq.to_be_bytes());
        payload[14..22].copy_from_slice(&now_ns().to_be_bytes());
        let mut p = Publish::new(topic.clone(), Bytes::copy_from_slice(&payload));
        p.qos = qos;
        if qos != QoS::AtMostOnce {
            p.packet_id = next_id;
            next_id = next_id.checked_add(1).unwrap_or(1);
            outstanding += 1;
        }
        c.push(&Packet::Publish(p));
        seq += 1;
        me.sent.fetch_add(1, Ordering::Relaxed);
        // Batch writes, but never hold a message back for long.
        if c.out.len() >= 16 * 1024
            || rate > 0
            || (qos == QoS::AtMostOnce && seq.is_multiple_of(64))
        {
            c.flush().await?;
            if qos == QoS::AtMostOnce {
                tokio::task::yield_now().await;
            }
        }
        if qos != QoS::AtMostOnce {
            while let Some(p) = c.try_recv()? {
                ack(&mut c, p, &mut outstanding, me);
            }
        }
    }
    c.flush().await?;
    // Collect the acknowledgements still due.
    while outstanding > 0 {
        match tokio::time::timeout(Duration::from_secs(10), c.recv()).await {
            Ok(Ok(p)) => {
                ack(&mut c, p, &mut outstanding, me);
                c.flush().await?;
            }
            Ok(Err(e)) => return Err(e),
            Err(_) => return Err(err(format!("{outstanding} acknowledgements never came"))),
        }
    }
    let _ = c
        .send(&Packet::Disconnect(halyard_codec::Disconnect::new(
            halyard_codec::ReasonCode::Success,
        )))
        .await;
    Ok(())
}

/// Waits until `at` with microsecond precision. Tokio's timers have 1 ms resolution, so
/// at 20k msg/s `sleep_until` alone sent bursts of 20 messages per millisecond, and each
/// burst's last message waited behind the other 19: that queueing, made by the generator,
/// showed up in every broker's p99. The last stretch is spent yielding instead (each yield
/// also lets tokio poll for I/O, so the subscribers on this runtime keep being served);
/// the cost is a busy generator core while a rate is set.
async fn pace_until(at: Instant) {
    const TIMER_SLACK: Duration = Duration::from_millis(2);
    if let Some(far) = at.checked_duration_since(Instant::now())
        && far > TIMER_SLACK
    {
        tokio::time::sleep_until((at - TIMER_SLACK).into()).await;
    }
    while Instant::now() < at {
        tokio::task::yield_now().await;
    }
}

fn ack(c: &mut Conn, p: Packet, outstanding: &mut usize, me: &PubState) {
    match p {
        Packet::PubAck(_) | Packet::PubComp(_) => {
            *outstanding = outstanding.saturating_sub(1);
            me.acked.fetch_add(1, Ordering::Relaxed);
        }
        Packet::PubRec(a) => c.push(&Packet::PubRel(Ack::new(a.packet_id))),
        _ => {}
    }
}

async fn subscriber(
    mut c: Conn,
    pubs: Arc<Vec<PubState>>,
    npubs: usize,
    totals: Arc<Totals>,
    hist: Arc<Mutex<Histogram<u64>>>,
) {
    // Next expected sequence per publisher: MQTT keeps order per topic and QoS
    // [MQTT-4.6.0-6], so anything below it is a duplicate and a jump is a gap.
    let mut next = vec![0u64; npubs];
    let mut local = histogram();
    let mut since_merge = 0u32;
    loop {
        let p = match c.recv().await {
            Ok(p) => p,
            Err(_) => break,
        };
        match p {
            Packet::Publish(m) => {
                let body = &m.payload;
                if body.len() >= HEADER && body[..2] == MAGIC {
                    let idx =
                        u32::from_be_bytes(body[2..6].try_into().unwrap_or_default()) as usize;
                    let seq = u64::from_be_bytes(body[6..14].try_into().unwrap_or_default());
                    let sent = u64::from_be_bytes(body[14..22].try_into().unwrap_or_default());
                    if idx < next.len() {
                        if seq < next[idx] {
                            totals.duplicates.fetch_add(1, Ordering::Relaxed);
                        } else {
                            if seq > next[idx] {
                                let gap = seq - next[idx];
                                totals.gaps.fetch_add(gap, Ordering::Relaxed);
                                // Skipped messages will not come: settle them for the
                                // publisher's window.
                                if let Some(ps) = pubs.get(idx) {
                                    ps.delivered.fetch_add(gap, Ordering::Release);
                                }
                            }
                            next[idx] = seq + 1;
                            totals.received.fetch_add(1, Ordering::Relaxed);
                            if let Some(ps) = pubs.get(idx) {
                                ps.delivered.fetch_add(1, Ordering::Release);
                                ps.wake.notify_one();
                            }
                        }
                        let us = now_ns().saturating_sub(sent) / 1000;
                        let _ = local.record(us.max(1));
                        since_merge += 1;
                        if since_merge >= 4096 {
                            since_merge = 0;
                            let _ = hist.lock().await.add(&local);
                            local.reset();
                        }
                    } else {
                        totals.foreign.fetch_add(1, Ordering::Relaxed);
                    }
                } else {
                    totals.foreign.fetch_add(1, Ordering::Relaxed);
                }
                match m.qos {
                    QoS::AtMostOnce => {}
                    QoS::AtLeastOnce => c.push(&Packet::PubAck(Ack::new(m.packet_id))),
                    QoS::ExactlyOnce => c.push(&Packet::PubRec(Ack::new(m.packet_id))),
                }
            }
            Packet::PubRel(a) => c.push(&Packet::PubComp(Ack::new(a.packet_id))),
            Packet::Disconnect(_) => break,
            _ => {}
        }
        // Acknowledge in batches: flush once nothing more is buffered.
        if c.buf.is_empty() && c.flush().await.is_err() {
            break;
        }
        // Merge samples often enough that the final report sees them (the task is aborted).
        if since_merge > 0 && c.buf.is_empty() && since_merge.is_multiple_of(256) {
            let _ = hist.lock().await.add(&local);
            local.reset();
            since_merge = 0;
        }
    }
    let _ = hist.lock().await.add(&local);
}
