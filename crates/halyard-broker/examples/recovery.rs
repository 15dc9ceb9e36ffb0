//! Recovery time for N queued messages (default 1,000,000), 64-byte payloads, one offline
//! persistent session: `cargo run --release -p halyard-broker --example recovery [N]`.
//! Writes the store through the real LogStore, then times (1) reopening the store and (2)
//! rebuilding the broker's state from it, and prints the directory size.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use halyard_broker::{Broker, BrokerConfig};
use halyard_codec::{Bytes, ProtocolVersion, QoS, SubscriptionOptions};
use halyard_store::*;

fn dir_size(d: &std::path::Path) -> u64 {
    std::fs::read_dir(d).map_or(0, |r| {
        r.filter_map(|e| e.ok()?.metadata().ok())
            .map(|m| m.len())
            .sum()
    })
}

fn main() {
    let n: u64 = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(1_000_000);
    let dir = std::env::temp_dir().join(format!("halyard-recovery-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let cid = || "offline-subscriber".to_string();
    let t = Instant::now();
    {
        let store = LogStore::open(LogConfig::new(&dir)).expect("open");
        store.apply(vec![
            Op::SessionUpsert(SessionRecord {
                client_id: cid(),
                protocol: ProtocolVersion::V5,
                expiry_interval: u32::MAX,
                disconnected_at: Some(SystemTime::now()),
                owner: halyard_store::SessionOwner::Anonymous,
            }),
            Op::Subscribe {
                client_id: cid(),
                subscription: SubscriptionRecord {
                    filter: "sensors/#".into(),
                    options: SubscriptionOptions {
                        qos: QoS::AtLeastOnce,
                        ..Default::default()
                    },
                    identifier: None,
                },
            },
        ]);
        let payload = Bytes::from(vec![0x5A; 64]);
        let mut batch = Vec::with_capacity(2048);
        for id in 1..=n {
            batch.push(Op::MessagePut {
                id,
                message: StoredMessage {
                    topic: format!("sensors/{}", id % 1000),
                    payload: payload.clone(),
                    qos: QoS::AtLeastOnce,
                    properties: None,
                    expires_at: None,
                },
            });
            batch.push(Op::Enqueue {
                client_id: cid(),
                delivery: StoredDelivery {
                    message_id: id,
                    qos: QoS::AtLeastOnce,
                    retain: false,
                    subscription_ids: vec![],
                    shared: None,
                },
            });
            if batch.len() >= 2048 {
                store.apply(std::mem::take(&mut batch));
            }
        }
        store.apply(batch);
        store.flush();
    }
    let write = t.elapsed();
    let size = dir_size(&dir);
    let t = Instant::now();
    let store = LogStore::open(LogConfig::new(&dir)).expect("reopen");
    let open = t.elapsed();
    let report = store.report().clone();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let t = Instant::now();
    let counts = rt.block_on(async move {
        let cfg = BrokerConfig {
            max_queued_messages: usize::MAX,
            max_queued_bytes: 0,
            ..Default::default()
        };
        let broker = Broker::new(cfg, Arc::new(store));
        let c = broker.counts();
        tokio::time::timeout(Duration::from_secs(60), broker.shutdown())
            .await
            .ok();
        c
    });
    let rebuild = t.elapsed();
    println!(
        "{n} queued messages: wrote in {:.2} s; store {:.1} MiB ({} snapshot + {} log records); \
         reopen (read + verify + replay) {:.2} s; broker rebuild {:.2} s; total recovery {:.2} s; sessions {}",
        write.as_secs_f64(),
        size as f64 / (1024.0 * 1024.0),
        report.snapshot_records,
        report.log_records,
        open.as_secs_f64(),
        rebuild.as_secs_f64(),
        (open + rebuild).as_secs_f64(),
        counts.0,
    );
    let _ = std::fs::remove_dir_all(&dir);
}
