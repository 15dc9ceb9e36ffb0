//! `halyard store check | export`: read a store directory without a running broker.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::UNIX_EPOCH;

use clap::Subcommand;
use halyard_store::{Recovered, StoredMessage, log::inspect};
use serde_json::{Value, json};

#[derive(Debug, Subcommand)]
pub(crate) enum StoreCommand {
    /// Verify every record and print what the store holds. Exit 0: clean; 1: the log ends
    /// in a torn or corrupt record (the broker cuts it off on start); 2: unreadable.
    Check {
        /// The broker's data directory (the store is in its `store/` subdirectory).
        #[arg(long, default_value = "./halyard-data")]
        data_dir: PathBuf,
    },
    /// Print the store's contents as JSON on standard output.
    Export {
        /// The broker's data directory.
        #[arg(long, default_value = "./halyard-data")]
        data_dir: PathBuf,
    },
}

pub(crate) fn run(cmd: &StoreCommand) -> ExitCode {
    let (StoreCommand::Check { data_dir } | StoreCommand::Export { data_dir }) = cmd;
    let dir = data_dir.join("store");
    if !dir.is_dir() {
        eprintln!(
            "halyard store: {} does not exist (is --data-dir right?)",
            dir.display()
        );
        return ExitCode::from(2);
    }
    let (image, report) = match inspect(&dir) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("halyard store: {}: {e}", dir.display());
            return ExitCode::from(2);
        }
    };
    match cmd {
        StoreCommand::Check { .. } => {
            let queued: usize = image.sessions.values().map(|s| s.queue.len()).sum();
            let inflight: usize = image.sessions.values().map(|s| s.inflight.len()).sum();
            let subs: usize = image.sessions.values().map(|s| s.subscriptions.len()).sum();
            println!("store:          {}", dir.display());
            println!("generation:     {}", report.generation);
            println!(
                "records:        {} in snapshot, {} in log",
                report.snapshot_records, report.log_records
            );
            println!("sessions:       {}", image.sessions.len());
            println!("subscriptions:  {subs}");
            println!("queued:         {queued}");
            println!("in flight:      {inflight}");
            println!("retained:       {}", image.retained.len());
            println!("read in:        {} ms", report.elapsed.as_millis());
            match report.bad_tail {
                None => {
                    println!("status:         ok");
                    ExitCode::SUCCESS
                }
                Some((at, why)) => {
                    println!(
                        "status:         log ends in a bad record at byte {at} ({why}); {} bytes would be cut off on start",
                        report.bytes_discarded
                    );
                    ExitCode::from(1)
                }
            }
        }
        StoreCommand::Export { .. } => {
            println!(
                "{}",
                serde_json::to_string_pretty(&export(&image)).unwrap_or_default()
            );
            ExitCode::SUCCESS
        }
    }
}

fn time_ms(t: Option<std::time::SystemTime>) -> Value {
    t.and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map_or(Value::Null, |d| json!(d.as_millis() as u64))
}

fn message(m: &StoredMessage) -> Value {
    let payload = match std::str::from_utf8(&m.payload) {
        Ok(s) => json!({ "utf8": s }),
        Err(_) => {
            json!({ "hex": m.payload.iter().map(|b| format!("{b:02x}")).collect::<String>() })
        }
    };
    json!({
        "topic": m.topic,
        "qos": m.qos as u8,
        "payload": payload,
        "expires_at_ms": time_ms(m.expires_at),
        "user_properties": m.publish_properties().user_properties.iter()
            .map(|(k, v)| json!([k.to_string(), v.to_string()])).collect::<Vec<_>>(),
    })
}

fn export(r: &Recovered) -> Value {
    let sessions: Vec<Value> = r
        .sessions
        .iter()
        .map(|(id, s)| {
            json!({
                "client_id": id,
                "protocol_level": s.record.protocol.level(),
                "expiry_interval": s.record.expiry_interval,
                "disconnected_at_ms": time_ms(s.record.disconnected_at),
                "subscriptions": s.subscriptions.values().map(|sub| json!({
                    "filter": sub.filter,
                    "qos": sub.options.qos as u8,
                    "no_local": sub.options.no_local,
                    "retain_as_published": sub.options.retain_as_published,
                    "retain_handling": sub.options.retain_handling as u8,
                    "identifier": sub.identifier,
                })).collect::<Vec<_>>(),
                "queue": s.queue.iter().map(|d| json!({
                    "message_id": d.message_id, "qos": d.qos as u8, "retain": d.retain,
                })).collect::<Vec<_>>(),
                "inflight": s.inflight.iter().map(|f| json!({
                    "packet_id": f.packet_id, "message_id": f.delivery.message_id,
                    "qos": f.delivery.qos as u8, "pubrec_received": f.released,
                })).collect::<Vec<_>>(),
                "inbound_qos2_packet_ids": s.inbound_qos2,
                "pending_will": s.will.as_ref().map(|w| json!({
                    "due_ms": time_ms(Some(w.due)), "retain": w.retain, "message": message(&w.message),
                })),
            })
        })
        .collect();
    json!({
        "sessions": sessions,
        "retained": r.retained.values().map(message).collect::<Vec<_>>(),
        "messages": r.messages.iter().map(|(id, m)| {
            let mut v = message(m);
            v["id"] = json!(id);
            v
        }).collect::<Vec<_>>(),
    })
}
