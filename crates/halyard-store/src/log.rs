//! The embedded durable store: an append-only log of [`Op`] records plus snapshots.
//!
//! Files in the store directory, for generation `g`:
//! - `snapshot-{g}.bin`: the whole image as ops (absent for generation 0);
//! - `wal-{g}.log`: ops applied since that snapshot, appended by the writer thread;
//! - `LOCK`: held with an exclusive file lock while a broker uses the directory.
//!
//! **Group commit.** `apply` only appends the ops to a pending list (a short mutex section)
//! and returns a ticket. One writer thread takes everything pending, writes it with one
//! `write`, calls `fdatasync` once, applies it to its image, and publishes the highest
//! ticket it made durable on a `watch` channel. While it syncs, the next group forms, so
//! under load many acknowledgements share one fsync without any added delay.
//!
//! **Compaction.** When the log outgrows `compact_min_bytes` and twice the last snapshot,
//! the writer writes the image as a new snapshot (temp file, fsync, rename, directory fsync),
//! starts the next generation's log, and deletes the old files. Recovery reads the newest
//! snapshot and only its own generation's log, so a crash at any step leaves a consistent
//! pair.
//!
//! **Recovery.** Records are checked (length, CRC-32, version). The log is replayed up to
//! the first bad record; a torn or corrupt tail is reported, cut off, and never used. The
//! ops of one `apply` call are framed by a batch marker and applied all or none: a SIGKILL
//! can cut a group's `write` short between pages, and half a batch (a message routed, but
//! not the QoS 2 packet id stored with it) would turn the client's resend into a duplicate. A bad
//! record inside a snapshot is an error: the broker refuses to start on it.

use std::collections::VecDeque;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tokio::sync::watch;
use tracing::{error, info, warn};

use crate::record::{self, RecordError};
use crate::{Op, Recovered, Store, apply_op};

/// When acknowledged changes reach the disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SyncMode {
    /// Each `apply` call is written and fsynced on its own before it is acknowledged.
    Always,
    /// Group commit: everything pending is written and fsynced together before any of it
    /// is acknowledged (the default).
    Batch,
    /// Acknowledge at once; write continuously and fsync every interval (mosquitto-like:
    /// a crash loses at most the last interval).
    Interval(Duration),
}

/// Settings of the log store.
#[derive(Debug, Clone)]
pub struct LogConfig {
    /// Directory for the store's files.
    pub dir: PathBuf,
    /// Durability mode.
    pub sync: SyncMode,
    /// Most ops in one group commit (bounds the latency of a group).
    pub batch_max_ops: usize,
    /// Log size that may trigger compaction.
    pub compact_min_bytes: u64,
}

impl LogConfig {
    /// Defaults for `dir`: batch mode, 65,536 ops per group, compaction from 64 MiB.
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        LogConfig {
            dir: dir.into(),
            sync: SyncMode::Batch,
            batch_max_ops: 65_536,
            compact_min_bytes: 64 * 1024 * 1024,
        }
    }
}

/// What recovery found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RecoveryReport {
    /// Generation recovered.
    pub generation: u64,
    /// Records read from the snapshot.
    pub snapshot_records: u64,
    /// Records replayed from the log.
    pub log_records: u64,
    /// Byte offset and reason of a bad record at the end of the log, if any.
    pub bad_tail: Option<(u64, String)>,
    /// Bytes cut off the log after the bad record.
    pub bytes_discarded: u64,
    /// How long recovery took.
    pub elapsed: Duration,
}

/// Counters of the writer.
#[derive(Debug, Default)]
pub struct LogStats {
    /// Group commits written.
    pub commits: AtomicU64,
    /// Ops written.
    pub ops: AtomicU64,
    /// Bytes written to logs.
    pub bytes: AtomicU64,
    /// Total time spent in fsync, in microseconds.
    pub sync_micros: AtomicU64,
    /// Compactions done.
    pub compactions: AtomicU64,
    /// fsyncs done.
    pub syncs: AtomicU64,
    /// fsyncs per latency bucket (see `SYNC_BUCKETS_MICROS`; the last is +Inf).
    pub sync_buckets: [AtomicU64; crate::SYNC_BUCKETS_MICROS.len() + 1],
    /// Log and snapshot bytes on disk.
    pub disk_bytes: AtomicU64,
}

struct Pending {
    batches: VecDeque<(u64, Vec<Op>)>,
    next_seq: u64,
    shutdown: bool,
}

struct Shared {
    pending: Mutex<Pending>,
    wake: Condvar,
    durable: watch::Sender<u64>,
    stats: LogStats,
}

/// The durable store. See the module documentation.
pub struct LogStore {
    shared: Arc<Shared>,
    mode: SyncMode,
    writer: Mutex<Option<JoinHandle<()>>>,
    recovered: Mutex<Option<Recovered>>,
    report: RecoveryReport,
    _lock: File,
}

impl std::fmt::Debug for LogStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LogStore")
            .field("report", &self.report)
            .finish_non_exhaustive()
    }
}

fn snapshot_path(dir: &Path, g: u64) -> PathBuf {
    dir.join(format!("snapshot-{g:016x}.bin"))
}
fn wal_path(dir: &Path, g: u64) -> PathBuf {
    dir.join(format!("wal-{g:016x}.log"))
}

fn generations(dir: &Path, prefix: &str) -> io::Result<Vec<u64>> {
    let mut gens = Vec::new();
    for e in fs::read_dir(dir)? {
        let name = e?.file_name();
        let name = name.to_string_lossy();
        // Only finished files: a `.tmp` snapshot is a compaction a crash interrupted.
        if let Some(hex) = name
            .strip_prefix(prefix)
            .and_then(|r| r.strip_suffix(".bin").or_else(|| r.strip_suffix(".log")))
            && let Ok(g) = u64::from_str_radix(hex, 16)
        {
            gens.push(g);
        }
    }
    gens.sort_unstable();
    Ok(gens)
}

fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Reads records from `bytes` into `image`. Returns the count and, on a bad record, its
/// offset and error.
fn replay(bytes: &[u8], image: &mut Recovered) -> (u64, Option<(usize, RecordError)>) {
    let mut at = 0;
    let mut n = 0;
    while at < bytes.len() {
        match record::decode_any(&bytes[at..]) {
            Ok((record::Record::Op(op), len)) => {
                apply_op(image, op);
                at += len;
                n += 1;
            }
            Ok((record::Record::Batch(k), len)) => {
                // All of the batch or none of it: an incomplete batch is a torn tail and is
                // cut off from its marker.
                let mut pos = at + len;
                let mut ops = Vec::with_capacity(k.min(65_536) as usize);
                for _ in 0..k {
                    if pos >= bytes.len() {
                        return (n, Some((at, RecordError::Torn)));
                    }
                    match record::decode_record(&bytes[pos..]) {
                        Ok((op, l)) => {
                            ops.push(op);
                            pos += l;
                        }
                        Err(e) => return (n, Some((at, e))),
                    }
                }
                for op in ops {
                    apply_op(image, op);
                    n += 1;
                }
                at = pos;
            }
            Err(e) => return (n, Some((at, e))),
        }
    }
    (n, None)
}

/// Reads a store directory without opening it for writing (for `halyard store check`).
pub fn inspect(dir: &Path) -> io::Result<(Recovered, RecoveryReport)> {
    read_dir_state(dir, false)
}

fn read_dir_state(dir: &Path, repair: bool) -> io::Result<(Recovered, RecoveryReport)> {
    let started = Instant::now();
    let mut report = RecoveryReport::default();
    let mut image = Recovered::default();
    let generation = generations(dir, "snapshot-")?.last().copied().unwrap_or(0);
    report.generation = generation;
    if generation > 0 {
        let path = snapshot_path(dir, generation);
        let bytes = fs::read(&path)?;
        let (n, bad) = replay(&bytes, &mut image);
        report.snapshot_records = n;
        if let Some((at, e)) = bad {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "{}: bad record at byte {at}: {e}; refusing to use a damaged snapshot",
                    path.display()
                ),
            ));
        }
    }
    let wal = wal_path(dir, generation);
    if wal.exists() {
        let mut bytes = Vec::new();
        File::open(&wal)?.read_to_end(&mut bytes)?;
        let (n, bad) = replay(&bytes, &mut image);
        report.log_records = n;
        if let Some((at, e)) = bad {
            report.bad_tail = Some((at as u64, e.to_string()));
            report.bytes_discarded = (bytes.len() - at) as u64;
            if repair {
                let f = OpenOptions::new().write(true).open(&wal)?;
                f.set_len(at as u64)?;
                f.sync_all()?;
            }
        }
    }
    report.elapsed = started.elapsed();
    Ok((image, report))
}

/// Creates `dir` (and its parents) readable by its owner only, and takes group and
/// other rights away from an existing one: the log holds payloads in clear.
pub fn private_dir(dir: &Path) -> io::Result<()> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)?;
        let mode = fs::metadata(dir)?.permissions().mode();
        if mode & 0o077 != 0 {
            fs::set_permissions(dir, fs::Permissions::from_mode(mode & 0o700))?;
        }
        Ok(())
    }
    #[cfg(not(unix))]
    fs::create_dir_all(dir)
}

/// Options for a store file: created readable and writable by its owner only.
fn private_file() -> OpenOptions {
    let mut o = OpenOptions::new();
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut o, 0o600);
    o
}

impl LogStore {
    /// Opens (creating if needed) the store in `cfg.dir`, recovers it, and starts the
    /// writer thread. Fails if another process holds the directory or a snapshot is bad.
    pub fn open(cfg: LogConfig) -> io::Result<LogStore> {
        private_dir(&cfg.dir)?;
        let lock = private_file()
            .create(true)
            .truncate(false)
            .write(true)
            .open(cfg.dir.join("LOCK"))?;
        lock.try_lock().map_err(|_| {
            io::Error::new(
                io::ErrorKind::WouldBlock,
                format!("{} is in use by another process", cfg.dir.display()),
            )
        })?;
        let (mut image, report) = read_dir_state(&cfg.dir, true)?;
        if let Some((at, why)) = &report.bad_tail {
            warn!(
                dir = %cfg.dir.display(), offset = at, why, discarded_bytes = report.bytes_discarded,
                "store log ends in a torn or corrupt record; it was cut off (nothing after it had been acknowledged)"
            );
        }
        image.collect_garbage();
        let generation = report.generation;
        let wal = private_file()
            .create(true)
            .append(true)
            .open(wal_path(&cfg.dir, generation))?;
        sync_dir(&cfg.dir)?;
        let wal_len = wal.metadata()?.len();
        let snapshot_len = fs::metadata(snapshot_path(&cfg.dir, generation)).map_or(0, |m| m.len());
        let (durable, _) = watch::channel(0);
        let shared = Arc::new(Shared {
            pending: Mutex::new(Pending {
                batches: VecDeque::new(),
                next_seq: 1,
                shutdown: false,
            }),
            wake: Condvar::new(),
            durable,
            stats: LogStats::default(),
        });
        shared
            .stats
            .disk_bytes
            .store(wal_len + snapshot_len, Ordering::Relaxed);
        let mode = cfg.sync;
        let dir = cfg.dir.clone();
        let mut writer = Writer {
            shared: shared.clone(),
            cfg,
            image: image.clone(),
            wal,
            wal_len,
            snapshot_len,
            generation,
            buf: Vec::with_capacity(1 << 20),
            last_sync: Instant::now(),
            dirty: false,
        };
        let handle = std::thread::Builder::new()
            .name("halyard-store".into())
            .spawn(move || writer.run())?;
        info!(
            dir = %dir.display(), generation, snapshot_records = report.snapshot_records,
            log_records = report.log_records, sessions = image.sessions.len(),
            retained = image.retained.len(), ms = report.elapsed.as_millis() as u64, "store recovered"
        );
        Ok(LogStore {
            shared,
            mode,
            writer: Mutex::new(Some(handle)),
            recovered: Mutex::new(Some(image)),
            report,
            _lock: lock,
        })
    }

    /// What recovery found.
    pub fn report(&self) -> &RecoveryReport {
        &self.report
    }

    /// Writer counters.
    pub fn stats(&self) -> &LogStats {
        &self.shared.stats
    }
}

impl Store for LogStore {
    fn apply(&self, ops: Vec<Op>) -> u64 {
        if ops.is_empty() {
            return 0;
        }
        let mut p = self
            .shared
            .pending
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let seq = p.next_seq;
        p.next_seq += 1;
        p.batches.push_back((seq, ops));
        drop(p);
        self.shared.wake.notify_one();
        match self.mode {
            SyncMode::Interval(_) => 0, // acknowledged at once by design
            _ => seq,
        }
    }

    fn metrics(&self) -> Option<crate::StoreMetrics> {
        let s = &self.shared.stats;
        let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
        Some(crate::StoreMetrics {
            commits: l(&s.commits),
            ops: l(&s.ops),
            bytes_written: l(&s.bytes),
            syncs: l(&s.syncs),
            sync_micros: l(&s.sync_micros),
            sync_buckets: s.sync_buckets.iter().map(l).collect(),
            compactions: l(&s.compactions),
            disk_bytes: l(&s.disk_bytes),
            pending_batches: self
                .shared
                .pending
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .batches
                .len() as u64,
        })
    }

    fn recover(&self) -> Recovered {
        self.recovered
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
            .unwrap_or_default()
    }

    fn durable(&self) -> Option<watch::Receiver<u64>> {
        match self.mode {
            SyncMode::Interval(_) => None,
            _ => Some(self.shared.durable.subscribe()),
        }
    }

    fn flush(&self) {
        {
            let mut p = self
                .shared
                .pending
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            p.shutdown = true;
        }
        self.shared.wake.notify_one();
        if let Some(h) = self.writer.lock().unwrap_or_else(|e| e.into_inner()).take() {
            let _ = h.join();
        }
    }
}

impl Drop for LogStore {
    fn drop(&mut self) {
        self.flush();
    }
}

struct Writer {
    shared: Arc<Shared>,
    cfg: LogConfig,
    image: Recovered,
    wal: File,
    wal_len: u64,
    snapshot_len: u64,
    generation: u64,
    buf: Vec<u8>,
    last_sync: Instant,
    dirty: bool,
}

impl Writer {
    fn run(&mut self) {
        loop {
            let (batches, shutdown) = self.next_group();
            if !batches.is_empty() {
                let seq = batches.last().map_or(0, |b| b.0);
                if let Err(e) = self.commit(batches) {
                    // Without the disk nothing more can be acknowledged: tickets stop
                    // advancing, so publishers are throttled rather than misled.
                    error!(error = %e, dir = %self.cfg.dir.display(), "store write failed; acknowledgements stop");
                    std::thread::sleep(Duration::from_millis(500));
                    continue;
                }
                self.shared.durable.send_replace(seq);
            }
            if self.dirty && (shutdown || self.interval_due()) {
                let _ = self.sync();
            }
            if self.wal_len > self.cfg.compact_min_bytes.max(2 * self.snapshot_len)
                && let Err(e) = self.compact()
            {
                error!(error = %e, "store compaction failed; will retry");
            }
            if shutdown {
                let _ = self.sync();
                return;
            }
        }
    }

    fn interval_due(&self) -> bool {
        matches!(self.cfg.sync, SyncMode::Interval(d) if self.last_sync.elapsed() >= d)
    }

    /// Waits for work and takes the next group of batches.
    fn next_group(&mut self) -> (Vec<(u64, Vec<Op>)>, bool) {
        let mut p = self
            .shared
            .pending
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        while p.batches.is_empty() && !p.shutdown {
            p = match self.cfg.sync {
                SyncMode::Interval(d) => {
                    let (g, _) = self
                        .shared
                        .wake
                        .wait_timeout(p, d)
                        .unwrap_or_else(|e| e.into_inner());
                    if self.dirty && self.interval_due() {
                        drop(g);
                        let _ = self.sync();
                        p = self
                            .shared
                            .pending
                            .lock()
                            .unwrap_or_else(|e| e.into_inner());
                        continue;
                    }
                    g
                }
                _ => self.shared.wake.wait(p).unwrap_or_else(|e| e.into_inner()),
            };
        }
        let mut out = Vec::new();
        let mut n = 0;
        while let Some(b) = p.batches.pop_front() {
            n += b.1.len();
            out.push(b);
            if self.cfg.sync == SyncMode::Always || n >= self.cfg.batch_max_ops {
                break;
            }
        }
        let shutdown = p.shutdown && p.batches.is_empty();
        (out, shutdown)
    }

    fn commit(&mut self, batches: Vec<(u64, Vec<Op>)>) -> io::Result<()> {
        self.buf.clear();
        let mut ops = 0;
        for (_, b) in &batches {
            if b.len() > 1 {
                record::encode_batch(u32::try_from(b.len()).unwrap_or(u32::MAX), &mut self.buf);
            }
            for op in b {
                record::encode(op, &mut self.buf);
                ops += 1;
            }
        }
        self.wal.write_all(&self.buf)?;
        self.wal_len += self.buf.len() as u64;
        self.shared
            .stats
            .disk_bytes
            .store(self.wal_len + self.snapshot_len, Ordering::Relaxed);
        self.dirty = true;
        if !matches!(self.cfg.sync, SyncMode::Interval(_)) {
            self.sync()?;
        }
        let s = &self.shared.stats;
        s.commits.fetch_add(1, Ordering::Relaxed);
        s.ops.fetch_add(ops, Ordering::Relaxed);
        s.bytes.fetch_add(self.buf.len() as u64, Ordering::Relaxed);
        for (_, b) in batches {
            for op in b {
                apply_op(&mut self.image, op);
            }
        }
        Ok(())
    }

    fn sync(&mut self) -> io::Result<()> {
        let t = Instant::now();
        self.wal.sync_data()?;
        let micros = t.elapsed().as_micros() as u64;
        let stats = &self.shared.stats;
        stats.sync_micros.fetch_add(micros, Ordering::Relaxed);
        stats.syncs.fetch_add(1, Ordering::Relaxed);
        let bucket = crate::SYNC_BUCKETS_MICROS
            .iter()
            .position(|&b| micros <= b)
            .unwrap_or(crate::SYNC_BUCKETS_MICROS.len());
        stats.sync_buckets[bucket].fetch_add(1, Ordering::Relaxed);
        self.last_sync = Instant::now();
        self.dirty = false;
        Ok(())
    }

    /// Writes the image as the next generation's snapshot and starts its log.
    fn compact(&mut self) -> io::Result<()> {
        let started = Instant::now();
        self.image.collect_garbage();
        let next = self.generation + 1;
        let dir = self.cfg.dir.clone();
        let tmp = dir.join(format!("snapshot-{next:016x}.tmp"));
        let mut f = private_file()
            .create(true)
            .truncate(true)
            .write(true)
            .open(&tmp)?;
        let mut buf = Vec::with_capacity(1 << 20);
        let mut written = 0u64;
        for op in image_ops(&self.image) {
            record::encode(&op, &mut buf);
            if buf.len() > (1 << 20) {
                f.write_all(&buf)?;
                written += buf.len() as u64;
                buf.clear();
            }
        }
        f.write_all(&buf)?;
        written += buf.len() as u64;
        f.sync_all()?;
        drop(f);
        fs::rename(&tmp, snapshot_path(&dir, next))?;
        let wal = private_file()
            .create(true)
            .truncate(true)
            .write(true)
            .open(wal_path(&dir, next))?;
        sync_dir(&dir)?;
        // From here on the new pair is what recovery reads; the old files are garbage.
        let old = self.generation;
        self.wal = wal;
        self.generation = next;
        self.wal_len = 0;
        self.snapshot_len = written;
        self.shared
            .stats
            .disk_bytes
            .store(written, Ordering::Relaxed);
        let _ = fs::remove_file(wal_path(&dir, old));
        let _ = fs::remove_file(snapshot_path(&dir, old));
        let _ = sync_dir(&dir);
        self.shared
            .stats
            .compactions
            .fetch_add(1, Ordering::Relaxed);
        info!(
            generation = next,
            snapshot_bytes = written,
            ms = started.elapsed().as_millis() as u64,
            "store compacted"
        );
        Ok(())
    }
}

/// The ops that rebuild `image` from nothing, in an order that replays correctly.
pub fn image_ops(image: &Recovered) -> Vec<Op> {
    let mut ops = Vec::new();
    for m in image.retained.values() {
        ops.push(Op::RetainSet(m.clone()));
    }
    for (&id, m) in &image.messages {
        ops.push(Op::MessagePut {
            id,
            message: m.clone(),
        });
    }
    for (id, s) in &image.sessions {
        ops.push(Op::SessionUpsert(s.record.clone()));
        for sub in s.subscriptions.values() {
            ops.push(Op::Subscribe {
                client_id: id.clone(),
                subscription: sub.clone(),
            });
        }
        if let Some(w) = &s.will {
            ops.push(Op::WillPending {
                client_id: id.clone(),
                will: Some(w.clone()),
            });
        }
        for f in &s.inflight {
            ops.push(Op::Enqueue {
                client_id: id.clone(),
                delivery: f.delivery.clone(),
            });
            ops.push(Op::Sent {
                client_id: id.clone(),
                message_id: f.delivery.message_id,
                packet_id: f.packet_id,
            });
            if f.released {
                ops.push(Op::Released {
                    client_id: id.clone(),
                    packet_id: f.packet_id,
                });
            }
        }
        for d in &s.queue {
            ops.push(Op::Enqueue {
                client_id: id.clone(),
                delivery: d.clone(),
            });
        }
        for &p in &s.inbound_qos2 {
            ops.push(Op::InboundQos2 {
                client_id: id.clone(),
                packet_id: p,
                held: true,
            });
        }
    }
    ops
}
