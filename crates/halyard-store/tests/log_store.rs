//! The log store against the in-memory reference: after any sequence of ops, a reopened
//! log store recovers exactly what `MemoryStore` holds.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, SystemTime};

use halyard_codec::{Bytes, ProtocolVersion, QoS, SubscriptionOptions};
use halyard_store::*;

fn tmpdir(name: &str) -> PathBuf {
    static N: AtomicU32 = AtomicU32::new(0);
    let d = std::env::temp_dir().join(format!(
        "halyard-store-test-{}-{name}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = std::fs::remove_dir_all(&d);
    d
}

fn workload(clients: usize, messages: u64) -> Vec<Vec<Op>> {
    let mut batches = Vec::new();
    for c in 0..clients {
        let id = format!("c{c}");
        batches.push(vec![
            Op::SessionUpsert(SessionRecord {
                client_id: id.clone(),
                protocol: ProtocolVersion::V5,
                expiry_interval: 3600,
                disconnected_at: Some(SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000)),
                owner: halyard_store::SessionOwner::Anonymous,
            }),
            Op::Subscribe {
                client_id: id.clone(),
                subscription: SubscriptionRecord {
                    filter: format!("t/{c}/#"),
                    options: SubscriptionOptions {
                        qos: QoS::ExactlyOnce,
                        ..Default::default()
                    },
                    identifier: Some(c as u32 + 1),
                },
            },
        ]);
    }
    for m in 1..=messages {
        let mut ops = vec![Op::MessagePut {
            id: m,
            message: StoredMessage {
                topic: format!("t/{}/x", m % clients as u64),
                payload: Bytes::from(vec![m as u8; 64]),
                qos: QoS::AtLeastOnce,
                properties: None,
                expires_at: None,
            },
        }];
        let id = format!("c{}", m % clients as u64);
        ops.push(Op::Enqueue {
            client_id: id.clone(),
            delivery: StoredDelivery {
                message_id: m,
                qos: QoS::AtLeastOnce,
                retain: false,
                subscription_ids: vec![],
                shared: None,
            },
        });
        // Deliver and acknowledge two thirds; leave some in flight and some queued.
        if m % 3 != 0 {
            ops.push(Op::Sent {
                client_id: id.clone(),
                message_id: m,
                packet_id: (m % 60_000) as u16 + 1,
            });
        }
        if m % 3 == 1 {
            ops.push(Op::Completed {
                client_id: id.clone(),
                packet_id: (m % 60_000) as u16 + 1,
            });
        }
        if m % 10 == 0 {
            ops.push(Op::RetainSet(StoredMessage {
                topic: format!("r/{}", m % 7),
                payload: Bytes::from(format!("v{m}")),
                qos: QoS::AtMostOnce,
                properties: None,
                expires_at: None,
            }));
            ops.push(Op::InboundQos2 {
                client_id: id,
                packet_id: (m % 100) as u16 + 1,
                held: m % 20 == 0,
            });
        }
        batches.push(ops);
    }
    batches
}

fn reference(batches: &[Vec<Op>]) -> Recovered {
    let m = MemoryStore::new();
    for b in batches {
        m.apply(b.clone());
    }
    m.recover()
}

#[test]
fn reopened_store_recovers_exactly_the_reference_image() {
    let dir = tmpdir("reopen");
    let batches = workload(5, 2_000);
    {
        let s = LogStore::open(LogConfig::new(&dir)).unwrap();
        let mut last = 0;
        for b in &batches {
            last = s.apply(b.clone());
        }
        // The ticket of the last batch becomes durable.
        let mut rx = s.durable().expect("batch mode reports durability");
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap();
        rt.block_on(async {
            tokio::time::timeout(Duration::from_secs(10), rx.wait_for(|&d| d >= last))
                .await
                .expect("durable in time")
                .unwrap();
        });
        assert!(s.stats().commits.load(Ordering::Relaxed) >= 1);
    }
    let s = LogStore::open(LogConfig::new(&dir)).unwrap();
    assert_eq!(s.report().bad_tail, None);
    assert_eq!(s.recover(), reference(&batches));
    drop(s);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn compaction_keeps_the_image_and_removes_old_files() {
    let dir = tmpdir("compact");
    let batches = workload(3, 3_000);
    {
        let mut cfg = LogConfig::new(&dir);
        cfg.compact_min_bytes = 16 * 1024;
        let s = LogStore::open(cfg).unwrap();
        for b in &batches {
            s.apply(b.clone());
        }
        s.flush();
        assert!(
            s.stats().compactions.load(Ordering::Relaxed) >= 1,
            "compacted"
        );
    }
    let files: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(
        files.iter().filter(|f| f.starts_with("snapshot-")).count(),
        1,
        "{files:?}"
    );
    assert_eq!(
        files.iter().filter(|f| f.starts_with("wal-")).count(),
        1,
        "{files:?}"
    );
    let s = LogStore::open(LogConfig::new(&dir)).unwrap();
    assert!(s.report().generation >= 1);
    assert_eq!(s.recover(), reference(&batches));
    drop(s);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn torn_or_corrupt_tail_is_reported_cut_off_and_the_rest_kept() {
    for damage in ["truncate", "flip"] {
        let dir = tmpdir(damage);
        let batches = workload(2, 50);
        {
            let s = LogStore::open(LogConfig::new(&dir)).unwrap();
            for b in &batches {
                s.apply(b.clone());
            }
        }
        let wal = dir.join(format!("wal-{:016x}.log", 0));
        let mut bytes = std::fs::read(&wal).unwrap();
        let len = bytes.len();
        match damage {
            "truncate" => bytes.truncate(len - 3), // the last record loses its end
            _ => bytes[len - 2] ^= 0xFF,           // the last record's body changes
        }
        std::fs::write(&wal, &bytes).unwrap();
        let s = LogStore::open(LogConfig::new(&dir)).unwrap();
        let report = s.report().clone();
        let (at, why) = report.bad_tail.clone().expect("damage reported");
        assert!(
            why.contains(if damage == "truncate" {
                "torn"
            } else {
                "checksum"
            }),
            "{why}"
        );
        assert!(report.bytes_discarded > 0 && at < len as u64);
        // Everything but the damaged last batch is there (a batch is applied whole or not
        // at all): compare with the reference minus that batch.
        let mut kept = batches.clone();
        kept.pop();
        assert_eq!(s.recover(), reference(&[kept.concat()]));
        drop(s);
        // The tail was cut off: the next open is clean.
        let s = LogStore::open(LogConfig::new(&dir)).unwrap();
        assert_eq!(s.report().bad_tail, None);
        drop(s);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

/// A group commit cut short between two records of one batch (a fatal signal can stop a
/// large `write` between pages): recovery applies none of that batch — e.g. never a QoS 2
/// message's routing without the held packet id stored with it — and keeps the ones
/// before it.
#[test]
fn a_batch_cut_at_a_record_boundary_is_dropped_whole() {
    let dir = tmpdir("batchcut");
    let batches = workload(2, 20);
    let last = vec![
        Op::MessagePut {
            id: 999,
            message: StoredMessage {
                topic: "t/0/x".into(),
                payload: Bytes::from_static(b"once"),
                qos: QoS::ExactlyOnce,
                properties: None,
                expires_at: None,
            },
        },
        Op::Enqueue {
            client_id: "c0".into(),
            delivery: StoredDelivery {
                message_id: 999,
                qos: QoS::ExactlyOnce,
                retain: false,
                subscription_ids: vec![],
                shared: None,
            },
        },
        Op::InboundQos2 {
            client_id: "c1".into(),
            packet_id: 7,
            held: true,
        },
    ];
    let wal = dir.join(format!("wal-{:016x}.log", 0));
    {
        let s = LogStore::open(LogConfig::new(&dir)).unwrap();
        for b in &batches {
            s.apply(b.clone());
        }
        s.apply(last.clone());
    }
    let bytes = std::fs::read(&wal).unwrap();
    // The last batch marker (tag 15 after the 8-byte header and the version byte) starts
    // the last batch.
    let mut before_last = 0;
    let mut at = 0;
    while at < bytes.len() {
        if bytes[at + 9] == 15 {
            before_last = at;
        }
        at += 8 + u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap()) as usize;
    }
    // Record boundaries inside the last batch: marker, then three ops.
    let mut bounds = vec![before_last];
    let mut at = before_last;
    while at < bytes.len() {
        let len = u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap()) as usize;
        at += 8 + len;
        bounds.push(at);
    }
    assert_eq!(bounds.len(), 5, "marker + 3 records");
    // Cut after the marker, after one op, after two ops: never a partial batch.
    for cut in &bounds[1..4] {
        let d2 = tmpdir("batchcut-copy");
        std::fs::create_dir_all(&d2).unwrap();
        std::fs::write(d2.join(format!("wal-{:016x}.log", 0)), &bytes[..*cut]).unwrap();
        let s = LogStore::open(LogConfig::new(&d2)).unwrap();
        assert_eq!(s.recover(), reference(&[batches.concat()]), "cut at {cut}");
        let (at, why) = s.report().bad_tail.clone().expect("reported");
        assert_eq!(at as usize, before_last, "cut back to the batch's marker");
        assert!(why.contains("torn"), "{why}");
        drop(s);
        std::fs::remove_dir_all(&d2).unwrap();
    }
    // Whole, it is all there.
    let s = LogStore::open(LogConfig::new(&dir)).unwrap();
    let mut all = batches.concat();
    all.extend(last);
    assert_eq!(s.recover(), reference(&[all]));
    drop(s);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_directory_is_used_by_one_store_at_a_time() {
    let dir = tmpdir("lock");
    let a = LogStore::open(LogConfig::new(&dir)).unwrap();
    let e = LogStore::open(LogConfig::new(&dir)).unwrap_err();
    assert!(e.to_string().contains("in use"), "{e}");
    drop(a);
    assert!(LogStore::open(LogConfig::new(&dir)).is_ok());
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_damaged_snapshot_is_refused() {
    let dir = tmpdir("badsnap");
    {
        let mut cfg = LogConfig::new(&dir);
        cfg.compact_min_bytes = 4 * 1024;
        let s = LogStore::open(cfg).unwrap();
        for b in workload(2, 500) {
            s.apply(b);
        }
    }
    let snap = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| {
            p.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("snapshot-")
        })
        .expect("a snapshot");
    let mut bytes = std::fs::read(&snap).unwrap();
    bytes[20] ^= 0x55;
    std::fs::write(&snap, bytes).unwrap();
    let e = LogStore::open(LogConfig::new(&dir)).unwrap_err();
    assert!(e.to_string().contains("damaged snapshot"), "{e}");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// The log holds payloads in clear: its directory is the owner's only (an existing one
/// loses group and other rights), its files are created 0600.
#[cfg(unix)]
#[test]
fn store_directory_and_files_are_private() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tmpdir("private");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    let s = LogStore::open(LogConfig::new(&dir)).unwrap();
    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&dir), 0o700);
    for f in std::fs::read_dir(&dir).unwrap() {
        let f = f.unwrap().path();
        assert_eq!(mode(&f), 0o600, "{}", f.display());
    }
    drop(s);
}
