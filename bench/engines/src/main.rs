//! The durable-store workload of a QoS 1 publish to one persistent subscriber, on three
//! engines: Halyard's own append-only log (`halyard-store`), redb (a copy-on-write B-tree)
//! and fjall (an LSM tree). Per message: store the body and a queue entry, durably, in
//! group commits of `BATCH`; later remove both once acknowledged. Each group ends with an
//! fsync, as the broker's batch mode does.
//!
//! Usage: cargo run --release -- [messages] [batch]   (defaults 200000, 256)
//! Prints, per engine: durable publish rate and CPU time per message, acknowledge rate,
//! single-message commits per second (sync = always), recovery of 1M queued messages, and
//! the data directory's size after the publish/ack cycle and with 1M queued.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use halyard_codec::{ProtocolVersion, PublishProperties, QoS};
use halyard_store::{
    LogConfig, LogStore, Op, SessionRecord, Store, StoredDelivery, StoredMessage, SyncMode,
};

const PAYLOAD: usize = 64;
const RECOVERY_MESSAGES: u64 = 1_000_000;
const SINGLE_COMMITS: u64 = 2_000;

fn cpu_seconds() -> f64 {
    // utime + stime of the whole process (all threads), in clock ticks of 1/100 s.
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap();
    let after = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = after.split(' ').collect();
    (f[11].parse::<f64>().unwrap() + f[12].parse::<f64>().unwrap()) / 100.0
}

fn dir_size(p: &Path) -> u64 {
    let mut n = 0;
    if let Ok(rd) = std::fs::read_dir(p) {
        for e in rd.flatten() {
            let m = e.metadata().unwrap();
            n += if m.is_dir() { dir_size(&e.path()) } else { m.len() };
        }
    }
    n
}

/// The stored body of message `id` (what the broker keeps: topic, payload, QoS, flags).
fn body(id: u64) -> Vec<u8> {
    let topic = format!("bench/t/{}", id % 16);
    let mut v = Vec::with_capacity(16 + topic.len() + PAYLOAD);
    v.extend_from_slice(&id.to_be_bytes());
    v.push(1); // QoS
    v.extend_from_slice(&(topic.len() as u16).to_be_bytes());
    v.extend_from_slice(topic.as_bytes());
    v.extend_from_slice(&[0xAB; PAYLOAD]);
    v
}

/// One engine behind the operations the workload needs.
trait Engine {
    fn name(&self) -> &'static str;
    /// Stores bodies and queue entries of `ids` durably, as one group.
    fn publish(&mut self, ids: std::ops::Range<u64>);
    /// Removes them durably, as one group.
    fn ack(&mut self, ids: std::ops::Range<u64>);
    /// Closes, reopens and reads every queued entry back; returns how many.
    fn reopen_and_scan(&mut self) -> u64;
}

// ---- Halyard's log ----

struct OwnLog {
    dir: PathBuf,
    store: Option<LogStore>,
    rt: tokio::runtime::Runtime,
}

impl OwnLog {
    fn open(dir: &Path) -> Self {
        let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
        let mut s = OwnLog { dir: dir.into(), store: None, rt };
        s.reopen();
        let t = s.store.as_ref().unwrap().apply(vec![Op::SessionUpsert(SessionRecord {
            client_id: "sub".into(),
            protocol: ProtocolVersion::V5,
            expiry_interval: u32::MAX,
            disconnected_at: None,
        owner: halyard_store::SessionOwner::Anonymous,
        })]);
        s.wait(t);
        s
    }
    fn reopen(&mut self) {
        self.store = None;
        let mut cfg = LogConfig::new(self.dir.clone());
        cfg.sync = SyncMode::Batch;
        self.store = Some(LogStore::open(cfg).unwrap());
    }
    fn wait(&self, ticket: u64) {
        let mut rx = self.store.as_ref().unwrap().durable().unwrap();
        self.rt.block_on(async { rx.wait_for(|&t| t >= ticket).await.unwrap(); });
    }
}

impl Engine for OwnLog {
    fn name(&self) -> &'static str {
        "halyard log"
    }
    fn publish(&mut self, ids: std::ops::Range<u64>) {
        let s = self.store.as_ref().unwrap();
        let mut last = 0;
        for id in ids {
            // One apply per publish, as the broker does: body + delivery, atomically.
            last = s.apply(vec![
                Op::MessagePut {
                    id,
                    message: StoredMessage {
                        topic: format!("bench/t/{}", id % 16),
                        payload: Bytes::from_static(&[0xAB; PAYLOAD]),
                        qos: QoS::AtLeastOnce,
                        properties: PublishProperties::default(),
                        expires_at: None,
                    },
                },
                Op::Enqueue {
                    client_id: "sub".into(),
                    delivery: StoredDelivery {
                        message_id: id,
                        qos: QoS::AtLeastOnce,
                        retain: false,
                        subscription_ids: Vec::new(),
                        shared: None,
                    },
                },
            ]);
        }
        self.wait(last);
    }
    fn ack(&mut self, ids: std::ops::Range<u64>) {
        let s = self.store.as_ref().unwrap();
        let mut last = 0;
        for id in ids {
            let packet_id = (id % 65_535 + 1) as u16;
            last = s.apply(vec![Op::Sent {
                client_id: "sub".into(),
                message_id: id,
                packet_id,
            }]);
            last = last.max(s.apply(vec![Op::Completed {
                client_id: "sub".into(),
                packet_id,
            }]));
        }
        self.wait(last);
    }
    fn reopen_and_scan(&mut self) -> u64 {
        self.store.as_ref().unwrap().flush();
        self.reopen();
        let r = self.store.as_ref().unwrap().recover();
        r.sessions.values().map(|s| s.queue.len() as u64).sum()
    }
}

// ---- redb ----

const BODIES: redb::TableDefinition<u64, &[u8]> = redb::TableDefinition::new("bodies");
const QUEUE: redb::TableDefinition<(&str, u64), u64> = redb::TableDefinition::new("queue");

struct Redb {
    path: PathBuf,
    db: Option<redb::Database>,
}

impl Redb {
    fn open(dir: &Path) -> Self {
        std::fs::create_dir_all(dir).unwrap();
        let path = dir.join("db.redb");
        let db = redb::Database::create(&path).unwrap();
        Redb { path, db: Some(db) }
    }
    fn write(&self, f: impl FnOnce(&mut redb::Table<u64, &[u8]>, &mut redb::Table<(&str, u64), u64>)) {
        let mut tx = self.db.as_ref().unwrap().begin_write().unwrap();
        tx.set_durability(redb::Durability::Immediate);
        {
            let mut b = tx.open_table(BODIES).unwrap();
            let mut q = tx.open_table(QUEUE).unwrap();
            f(&mut b, &mut q);
        }
        tx.commit().unwrap();
    }
}

impl Engine for Redb {
    fn name(&self) -> &'static str {
        "redb 2"
    }
    fn publish(&mut self, ids: std::ops::Range<u64>) {
        self.write(|b, q| {
            for id in ids {
                b.insert(id, body(id).as_slice()).unwrap();
                q.insert(("sub", id), id).unwrap();
            }
        });
    }
    fn ack(&mut self, ids: std::ops::Range<u64>) {
        self.write(|b, q| {
            for id in ids {
                q.remove(("sub", id)).unwrap();
                b.remove(id).unwrap();
            }
        });
    }
    fn reopen_and_scan(&mut self) -> u64 {
        self.db = None;
        self.db = Some(redb::Database::create(&self.path).unwrap());
        use redb::ReadableTable;
        let rtx = self.db.as_ref().unwrap().begin_read().unwrap();
        let q = rtx.open_table(QUEUE).unwrap();
        let b = rtx.open_table(BODIES).unwrap();
        let mut n = 0;
        for e in q.iter().unwrap() {
            let (_, id) = e.unwrap();
            let body = b.get(id.value()).unwrap().unwrap();
            assert!(body.value().len() > PAYLOAD);
            n += 1;
        }
        n
    }
}

// ---- fjall ----

struct Fjall {
    dir: PathBuf,
    ks: Option<fjall::Keyspace>,
    bodies: Option<fjall::PartitionHandle>,
    queue: Option<fjall::PartitionHandle>,
}

impl Fjall {
    fn open(dir: &Path) -> Self {
        let mut f = Fjall { dir: dir.into(), ks: None, bodies: None, queue: None };
        f.reopen();
        f
    }
    fn reopen(&mut self) {
        self.bodies = None;
        self.queue = None;
        self.ks = None;
        let ks = fjall::Config::new(&self.dir).open().unwrap();
        self.bodies = Some(ks.open_partition("bodies", Default::default()).unwrap());
        self.queue = Some(ks.open_partition("queue", Default::default()).unwrap());
        self.ks = Some(ks);
    }
    fn commit(&self, batch: fjall::Batch) {
        batch.commit().unwrap();
        self.ks.as_ref().unwrap().persist(fjall::PersistMode::SyncAll).unwrap();
    }
}

fn qkey(id: u64) -> [u8; 11] {
    let mut k = [0u8; 11];
    k[..3].copy_from_slice(b"sub");
    k[3..].copy_from_slice(&id.to_be_bytes());
    k
}

impl Engine for Fjall {
    fn name(&self) -> &'static str {
        "fjall 2"
    }
    fn publish(&mut self, ids: std::ops::Range<u64>) {
        let mut b = self.ks.as_ref().unwrap().batch();
        for id in ids {
            b.insert(self.bodies.as_ref().unwrap(), id.to_be_bytes(), body(id));
            b.insert(self.queue.as_ref().unwrap(), qkey(id), id.to_be_bytes());
        }
        self.commit(b);
    }
    fn ack(&mut self, ids: std::ops::Range<u64>) {
        let mut b = self.ks.as_ref().unwrap().batch();
        for id in ids {
            b.remove(self.queue.as_ref().unwrap(), qkey(id));
            b.remove(self.bodies.as_ref().unwrap(), id.to_be_bytes());
        }
        self.commit(b);
    }
    fn reopen_and_scan(&mut self) -> u64 {
        self.reopen();
        let mut n = 0;
        let bodies = self.bodies.as_ref().unwrap();
        for e in self.queue.as_ref().unwrap().iter() {
            let (_, id) = e.unwrap();
            let body = bodies.get(&id).unwrap().unwrap();
            assert!(body.len() > PAYLOAD);
            n += 1;
        }
        n
    }
}

fn run(make: &dyn Fn(&Path) -> Box<dyn Engine>, n: u64, batch: u64) {
    let root = std::env::temp_dir().join(format!(
        "engine-bench-{}-{}",
        std::process::id(),
        SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap().as_nanos()
    ));
    // 1. Group-committed publish, then acknowledge, of n messages.
    let dir = root.join("cycle");
    let mut e = make(&dir);
    let (c0, t0) = (cpu_seconds(), Instant::now());
    let mut id = 0;
    while id < n {
        let end = (id + batch).min(n);
        e.publish(id..end);
        id = end;
    }
    let (pub_s, pub_cpu) = (t0.elapsed().as_secs_f64(), cpu_seconds() - c0);
    let size_full = dir_size(&dir);
    let (c0, t0) = (cpu_seconds(), Instant::now());
    id = 0;
    while id < n {
        let end = (id + batch).min(n);
        e.ack(id..end);
        id = end;
    }
    let (ack_s, ack_cpu) = (t0.elapsed().as_secs_f64(), cpu_seconds() - c0);
    // 2. One message per commit (sync = always).
    let t0 = Instant::now();
    for i in 0..SINGLE_COMMITS {
        e.publish(n + i..n + i + 1);
    }
    let single = SINGLE_COMMITS as f64 / t0.elapsed().as_secs_f64();
    let size_after = dir_size(&dir);
    drop(e);
    // 3. Recovery of 1M queued messages.
    let dir = root.join("recovery");
    let mut e = make(&dir);
    id = 0;
    while id < RECOVERY_MESSAGES {
        let end = (id + 4096).min(RECOVERY_MESSAGES);
        e.publish(id..end);
        id = end;
    }
    let size_1m = dir_size(&dir);
    let t0 = Instant::now();
    let found = e.reopen_and_scan();
    let recovery = t0.elapsed();
    assert_eq!(found, RECOVERY_MESSAGES, "{}: recovered {found}", e.name());
    println!(
        "| {} | {:.0} | {:.1} | {:.0} | {:.1} | {:.0} | {:.2} | {:.1} | {:.1} | {:.1} |",
        e.name(),
        n as f64 / pub_s,
        pub_cpu * 1e6 / n as f64,
        n as f64 / ack_s,
        ack_cpu * 1e6 / n as f64,
        single,
        recovery.as_secs_f64(),
        size_full as f64 / 1048576.0,
        size_after as f64 / 1048576.0,
        size_1m as f64 / 1048576.0,
    );
    drop(e);
    let _ = std::fs::remove_dir_all(&root);
    let _ = Duration::ZERO;
}

fn main() {
    let args: Vec<u64> = std::env::args().skip(1).map(|a| a.parse().unwrap()).collect();
    let n = args.first().copied().unwrap_or(200_000);
    let batch = args.get(1).copied().unwrap_or(256);
    println!("{n} messages of {PAYLOAD} B, groups of {batch}, fsync per group; recovery of {RECOVERY_MESSAGES} queued\n");
    println!("| engine | publish msg/s | CPU-µs/msg | ack msg/s | CPU-µs/ack | 1-msg commits/s | recover 1M (s) | MiB after publish | MiB after ack | MiB with 1M queued |");
    println!("|---|---|---|---|---|---|---|---|---|---|");
    let only = std::env::var("ENGINES").unwrap_or_else(|_| "log,redb,fjall".into());
    if only.contains("log") {
        run(&|d| Box::new(OwnLog::open(d)), n, batch);
    }
    if only.contains("redb") {
        run(&|d| Box::new(Redb::open(d)), n, batch);
    }
    if only.contains("fjall") {
        run(&|d| Box::new(Fjall::open(d)), n, batch);
    }
}
