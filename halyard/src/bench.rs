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

use bytes::Buf;
use clap::{Args, Subcommand};
use halyard_codec::{
    Ack, Bytes, BytesMut, ClientId, Connect, MAX_PACKET_SIZE, Packet, PlainAck, PlainDecode,
    Properties, ProtocolVersion, Publish, QoS, Subscribe, SubscriptionOptions, TopicFilter,
    TopicName, decode, decode_plain_ack, decode_plain_publish,
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

/// The connection flags of `pub`/`sub` (and mosquitto's): `-h` is the host, so help is
/// `--help` only.
#[derive(Debug, Args, Clone)]
struct Common {
    /// Print help.
    #[arg(long, action = clap::ArgAction::Help)]
    help: Option<bool>,
    /// Broker host.
    #[arg(long, short = 'h', default_value = "127.0.0.1")]
    host: String,
    /// Broker port.
    #[arg(long, short = 'p', default_value_t = 1883)]
    port: u16,
    /// MQTT version: 5 or 311.
    #[arg(long, short = 'V', default_value = "5")]
    version: String,
    /// User name and password (user:password).
    #[arg(long, conflicts_with_all = ["username", "password"])]
    auth: Option<String>,
    /// User name (as `pub`/`sub` and mosquitto_pub take it).
    #[arg(long, short = 'u')]
    username: Option<String>,
    /// Password.
    #[arg(long = "pw", short = 'P', requires = "username")]
    password: Option<String>,
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
#[command(disable_help_flag = true)]
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
#[command(disable_help_flag = true)]
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
    // A generator holds thousands of sockets too: the same limit and table growth as the
    // broker's (`fdlimit::prepare`), before the runtime's threads exist.
    crate::fdlimit::prepare();
    // Pinned to one core (as bench/ runs it), one thread runs every task: no wake-ups
    // across threads, and the broker's core is left alone.
    let one_core = std::thread::available_parallelism().map_or(true, |n| n.get() == 1);
    let mut builder = if one_core {
        tokio::runtime::Builder::new_current_thread()
    } else {
        tokio::runtime::Builder::new_multi_thread()
    };
    let rt = match builder.enable_all().build() {
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
        let (username, password) = match (&c.auth, &c.username) {
            (Some(a), _) => {
                let (u, p) = a.split_once(':').unwrap_or((a, ""));
                (Some(u.into()), Some(Bytes::from(p.to_string())))
            }
            (None, Some(u)) => (
                Some(u.as_str().into()),
                c.password.as_ref().map(|p| Bytes::from(p.clone())),
            ),
            (None, None) => (None, None),
        };
        let connect = Packet::Connect(Box::new(Connect {
            protocol: v,
            bridge: false,
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
    /// Reads whatever the broker sent next into the buffer.
    async fn read_more(&mut self) -> std::io::Result<()> {
        if self.s.read_buf(&mut self.buf).await? == 0 {
            return Err(err("the broker closed the connection"));
        }
        Ok(())
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
    // Reset, not closed: a normal close leaves every connection's port in TIME_WAIT for a
    // minute, and 10,000 of them slowed the next run's `connect` (the kernel walks the
    // port range past them), so the order brokers ran in changed their results.
    for s in held.lock().await.drain(..) {
        let _ = s.set_zero_linger();
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
    let (stop_subs, subs_stop) = tokio::sync::watch::channel(false);
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
        let (pubs, totals, stop) = (pubs.clone(), totals.clone(), subs_stop.clone());
        let npub_total = a.pubs;
        sub_tasks.push(tokio::spawn(async move {
            subscriber(conn, pubs, npub_total, totals, stop).await
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
    let _ = stop_subs.send(true);
    let mut h = histogram();
    for s in sub_tasks {
        if let Ok(sub) = s.await {
            let _ = h.add(&sub);
        }
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
    let template = Template::new(c.v, topic, qos, i, size)?;
    let mut seq = 0u64;
    let mut outstanding = 0usize;
    let mut next_id = 1u16;
    let started = Instant::now();
    let fanout = me.fanout.max(1);
    // Send time, read once per batch: the messages of a batch leave in one write.
    let mut stamp = now_ns();
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
                me.sent.store(seq, Ordering::Relaxed);
                let notified = me.wake.notified();
                if seq - me.delivered.load(Ordering::Acquire) / fanout < window as u64 {
                    break;
                }
                let _ = tokio::time::timeout(Duration::from_millis(100), notified).await;
            }
            if stop.load(Ordering::Relaxed) {
                continue;
            }
            if c.out.is_empty() {
                stamp = now_ns();
            }
        }
        if rate > 0 {
            let due = (started.elapsed().as_secs_f64() * rate as f64) as u64;
            if seq >= due {
                c.flush().await?;
                let next = started + Duration::from_secs_f64((seq + 1) as f64 / rate as f64);
                pace_until(next).await;
                stamp = now_ns();
                continue;
            }
        }
        if qos != QoS::AtMostOnce && outstanding >= ack_window {
            c.flush().await?;
            me.sent.store(seq, Ordering::Relaxed);
            c.read_more().await?;
            settle_acks(&mut c, &mut outstanding, me)?;
            stamp = now_ns();
            continue;
        }
        let id = if qos == QoS::AtMostOnce {
            0
        } else {
            outstanding += 1;
            let id = next_id;
            next_id = next_id.checked_add(1).unwrap_or(1);
            id
        };
        template.write(&mut c.out, seq, stamp, id);
        seq += 1;
        // Batch writes, but never hold a message back for long.
        if c.out.len() >= 16 * 1024
            || rate > 0
            || (qos == QoS::AtMostOnce && seq.is_multiple_of(64))
        {
            c.flush().await?;
            me.sent.store(seq, Ordering::Relaxed);
            if qos == QoS::AtMostOnce {
                tokio::task::yield_now().await;
            }
            stamp = now_ns();
        }
        if qos != QoS::AtMostOnce {
            settle_acks(&mut c, &mut outstanding, me)?;
        }
    }
    me.sent.store(seq, Ordering::Relaxed);
    c.flush().await?;
    // Collect the acknowledgements still due.
    while outstanding > 0 {
        match tokio::time::timeout(Duration::from_secs(10), c.read_more()).await {
            Ok(Ok(())) => {
                settle_acks(&mut c, &mut outstanding, me)?;
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

/// A publisher's PUBLISH, encoded once; each message is this template with its sequence
/// number, send time and packet identifier written in (the generator must cost far less
/// per message than the brokers it measures).
struct Template {
    bytes: Bytes,
    /// Where the payload starts.
    payload_at: usize,
    /// Where the packet identifier is (QoS 1/2).
    id_at: Option<usize>,
}

impl Template {
    fn new(
        v: ProtocolVersion,
        topic: TopicName,
        qos: QoS,
        publisher: usize,
        size: usize,
    ) -> std::io::Result<Template> {
        let mut payload = vec![0u8; size];
        payload[..2].copy_from_slice(&MAGIC);
        payload[2..6].copy_from_slice(&(publisher as u32).to_be_bytes());
        let topic_len = topic.as_str().len();
        let mut p = Publish::new(topic, Bytes::from(payload));
        p.qos = qos;
        p.packet_id = u16::from(qos != QoS::AtMostOnce);
        let mut encoded = BytesMut::new();
        Packet::Publish(p).encode(v, &mut encoded).map_err(err)?;
        Ok(Template {
            payload_at: encoded.len() - size,
            // The variable header starts with the topic; the identifier follows it.
            id_at: (qos != QoS::AtMostOnce).then(|| fixed_header_len(&encoded) + 2 + topic_len),
            bytes: encoded.freeze(),
        })
    }

    fn write(&self, out: &mut BytesMut, seq: u64, sent_ns: u64, packet_id: u16) {
        let at = out.len();
        out.extend_from_slice(&self.bytes);
        let m = &mut out[at..];
        let p = self.payload_at;
        m[p + 6..p + 14].copy_from_slice(&seq.to_be_bytes());
        m[p + 14..p + 22].copy_from_slice(&sent_ns.to_be_bytes());
        if let Some(i) = self.id_at {
            m[i..i + 2].copy_from_slice(&packet_id.to_be_bytes());
        }
    }
}

/// Length of the fixed header (type byte and Remaining Length) of an encoded packet.
fn fixed_header_len(packet: &[u8]) -> usize {
    2 + packet[1..].iter().take_while(|&&b| b & 0x80 != 0).count()
}

/// Handles the acknowledgements already buffered: PUBACK and PUBCOMP settle a message,
/// PUBREC is answered with PUBREL. Read in place; they are the bulk of what a QoS 1/2
/// publisher receives.
fn settle_acks(c: &mut Conn, outstanding: &mut usize, me: &PubState) -> std::io::Result<()> {
    let mut settled = 0u64;
    loop {
        if let Some((kind, id)) = decode_plain_ack(&c.buf) {
            c.buf.advance(4);
            match kind {
                PlainAck::PubRec => c.push(&Packet::PubRel(Ack::new(id))),
                PlainAck::PubAck | PlainAck::PubComp => settled += 1,
                PlainAck::PubRel => {}
            }
            continue;
        }
        match c.try_recv()? {
            Some(p) => ack(c, p, &mut settled),
            None => break,
        }
    }
    *outstanding = outstanding.saturating_sub(settled as usize);
    me.acked.fetch_add(settled, Ordering::Relaxed);
    Ok(())
}

fn ack(c: &mut Conn, p: Packet, settled: &mut u64) {
    match p {
        Packet::PubAck(_) | Packet::PubComp(_) => *settled += 1,
        Packet::PubRec(a) => c.push(&Packet::PubRel(Ack::new(a.packet_id))),
        _ => {}
    }
}

/// What a subscriber counted since it last reported to the shared totals.
struct Tally {
    /// Per publisher: deliveries (and gaps) not yet added to its `delivered`.
    got: Vec<u64>,
    touched: Vec<usize>,
    received: u64,
    duplicates: u64,
    gaps: u64,
    foreign: u64,
    /// A latency (µs) not yet in the histogram and how many deliveries in a row had it:
    /// the messages of one read mostly do, and recording each one was a tenth of the
    /// generator's CPU in a fan-out (exact either way).
    latency: (u64, u64),
}

impl Tally {
    /// One delivery. `now` is when the bytes it came in were read.
    fn count(&mut self, payload: &[u8], next: &mut [u64], now: u64, hist: &mut Histogram<u64>) {
        let Some((header, _)) = payload.split_first_chunk::<HEADER>() else {
            self.foreign += 1;
            return;
        };
        let idx = u32::from_be_bytes(header[2..6].try_into().unwrap_or_default()) as usize;
        if header[..2] != MAGIC || idx >= next.len() {
            self.foreign += 1;
            return;
        }
        let seq = u64::from_be_bytes(header[6..14].try_into().unwrap_or_default());
        let sent = u64::from_be_bytes(header[14..22].try_into().unwrap_or_default());
        if seq < next[idx] {
            self.duplicates += 1;
        } else {
            // A jump is a gap: skipped messages will not come, so they are settled for the
            // publisher's window too.
            let gap = seq - next[idx];
            self.gaps += gap;
            if self.got[idx] == 0 {
                self.touched.push(idx);
            }
            self.got[idx] += gap + 1;
            next[idx] = seq + 1;
            self.received += 1;
        }
        let us = (now.saturating_sub(sent) / 1000).max(1);
        if self.latency.0 == us {
            self.latency.1 += 1;
        } else {
            self.record_latency(hist);
            self.latency = (us, 1);
        }
    }

    fn record_latency(&mut self, hist: &mut Histogram<u64>) {
        if self.latency.1 > 0 {
            let _ = hist.record_n(self.latency.0, self.latency.1);
            self.latency.1 = 0;
        }
    }

    /// Adds what was counted to the shared totals and wakes the publishers concerned:
    /// once per read, not per message (one core runs all the generator's tasks).
    fn report(&mut self, pubs: &[PubState], totals: &Totals) {
        for i in self.touched.drain(..) {
            pubs[i]
                .delivered
                .fetch_add(std::mem::take(&mut self.got[i]), Ordering::Release);
            pubs[i].wake.notify_one();
        }
        for (total, n) in [
            (&totals.received, &mut self.received),
            (&totals.duplicates, &mut self.duplicates),
            (&totals.gaps, &mut self.gaps),
            (&totals.foreign, &mut self.foreign),
        ] {
            if *n > 0 {
                total.fetch_add(std::mem::take(n), Ordering::Relaxed);
            }
        }
    }
}

/// Counts deliveries until told to stop (or the connection ends) and returns its latency
/// samples.
async fn subscriber(
    mut c: Conn,
    pubs: Arc<Vec<PubState>>,
    npubs: usize,
    totals: Arc<Totals>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) -> Histogram<u64> {
    // Next expected sequence per publisher: MQTT keeps order per topic and QoS
    // [MQTT-4.6.0-6], so anything below it is a duplicate and a jump is a gap.
    let mut next = vec![0u64; npubs];
    let mut hist = histogram();
    let mut tally = Tally {
        got: vec![0; npubs],
        touched: Vec::new(),
        received: 0,
        duplicates: 0,
        gaps: 0,
        foreign: 0,
        latency: (0, 0),
    };
    'conn: loop {
        // One clock reading for everything that arrived in one read.
        let now = now_ns();
        loop {
            // Deliveries are read in place; anything else goes through the decoder.
            if let PlainDecode::Plain(m, len) = decode_plain_publish(&c.buf, c.v, MAX_PACKET_SIZE) {
                tally.count(m.payload, &mut next, now, &mut hist);
                let (qos, id) = (m.qos, m.packet_id);
                c.buf.advance(len);
                acknowledge(&mut c, qos, id);
                continue;
            }
            match c.try_recv() {
                Ok(Some(Packet::Publish(m))) => {
                    tally.count(&m.payload, &mut next, now, &mut hist);
                    acknowledge(&mut c, m.qos, m.packet_id);
                }
                Ok(Some(Packet::PubRel(a))) => c.push(&Packet::PubComp(Ack::new(a.packet_id))),
                Ok(Some(Packet::Disconnect(_))) | Err(_) => break 'conn,
                Ok(Some(_)) => {}
                Ok(None) => break,
            }
        }
        tally.report(&pubs, &totals);
        // Acknowledge in batches: one write per read.
        if c.flush().await.is_err() {
            break;
        }
        tokio::select! {
            r = c.read_more() => if r.is_err() { break },
            _ = stop.changed() => break,
        }
    }
    tally.report(&pubs, &totals);
    tally.record_latency(&mut hist);
    hist
}

fn acknowledge(c: &mut Conn, qos: QoS, id: u16) {
    match qos {
        QoS::AtMostOnce => {}
        // 4 bytes in 3.1.1 and in 5 (reason Success and no properties may be left out
        // [MQTT-3.4.2-1]).
        QoS::AtLeastOnce => c
            .out
            .extend_from_slice(&[0x40, 2, (id >> 8) as u8, id as u8]),
        QoS::ExactlyOnce => c
            .out
            .extend_from_slice(&[0x50, 2, (id >> 8) as u8, id as u8]),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A message written from the template decodes, with our codec, to the PUBLISH it
    /// stands for: every version and QoS, and Remaining Lengths of one and two bytes.
    #[test]
    fn template_messages_decode_as_the_publish_they_stand_for() {
        for v in [
            ProtocolVersion::V3_1,
            ProtocolVersion::V3_1_1,
            ProtocolVersion::V5,
        ] {
            for qos in [QoS::AtMostOnce, QoS::AtLeastOnce, QoS::ExactlyOnce] {
                for (topic, size) in [("a", HEADER), ("bench/1/7", 64), ("t/x", 200)] {
                    let name = TopicName::new(topic).expect("valid topic");
                    let t = Template::new(v, name, qos, 7, size).expect("template");
                    let mut out = BytesMut::new();
                    t.write(&mut out, 41, 5, 0x1234);
                    t.write(&mut out, 42, 6, 0x0102);
                    for (seq, sent, id) in [(41u64, 5u64, 0x1234u16), (42, 6, 0x0102)] {
                        let Ok(Some(Packet::Publish(p))) = decode(&mut out, v, MAX_PACKET_SIZE)
                        else {
                            panic!("{v:?} {qos:?} {topic}: not a PUBLISH");
                        };
                        assert_eq!((p.qos, p.topic.as_str()), (qos, topic));
                        let want_id = if qos == QoS::AtMostOnce { 0 } else { id };
                        assert_eq!(p.packet_id, want_id, "{v:?} {qos:?} {topic}");
                        let b = &p.payload;
                        assert_eq!(b.len(), size);
                        assert_eq!(&b[..2], &MAGIC);
                        assert_eq!(b[2..6], 7u32.to_be_bytes());
                        assert_eq!(b[6..14], seq.to_be_bytes());
                        assert_eq!(b[14..22], sent.to_be_bytes());
                    }
                    assert!(out.is_empty());
                }
            }
        }
    }
}
