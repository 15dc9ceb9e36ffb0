//! Arbitrary byte streams into one broker connection: the whole connection state machine
//! (CONNECT handling, sessions, QoS flows, aliases, limits, AUTH), not only the codec. A
//! panic anywhere, in the connection's task included, aborts and is reported as a crash.
//!
//! Input: byte 0 picks the write chunk size (1..=64, so packets arrive split at every
//! boundary); the rest is written to the connection, then its write side is closed. Time is
//! paused, so keep-alive and CONNECT timeouts fire at once instead of stalling the run. One
//! broker serves every input: state left by earlier inputs (sessions, retained messages,
//! subscriptions) is part of what later inputs meet.
#![no_main]

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use halyard_broker::{Broker, BrokerConfig};
use libfuzzer_sys::fuzz_target;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

struct World {
    rt: tokio::runtime::Runtime,
    broker: Broker,
}

static WORLD: OnceLock<World> = OnceLock::new();

fn world() -> &'static World {
    WORLD.get_or_init(|| {
        // Tokio catches task panics; make every panic a crash the fuzzer sees.
        std::panic::set_hook(Box::new(|info| {
            eprintln!("{info}");
            std::process::abort();
        }));
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .start_paused(true)
            .build()
            .expect("runtime");
        let cfg = BrokerConfig {
            // Sessions from earlier inputs expire instead of piling up forever.
            persistent_client_expiration: Some(Duration::from_secs(5)),
            max_session_expiry_interval: 5,
            max_queued_messages: 100,
            ..BrokerConfig::default()
        };
        let broker = rt.block_on(async {
            Broker::new(cfg, Arc::new(halyard_store::MemoryStore::new()))
        });
        World { rt, broker }
    })
}

fuzz_target!(|data: &[u8]| {
    let Some((&first, bytes)) = data.split_first() else {
        return;
    };
    let chunk = usize::from(first % 64) + 1;
    let w = world();
    w.rt.block_on(async {
        let (client, server) = tokio::io::duplex(1 << 16);
        w.broker.spawn_connection(server, "fuzz");
        let (mut rd, mut wr) = tokio::io::split(client);
        let writer = async {
            for c in bytes.chunks(chunk) {
                if wr.write_all(c).await.is_err() {
                    break;
                }
                tokio::task::yield_now().await;
            }
            let _ = wr.shutdown().await;
        };
        let reader = async {
            let mut buf = vec![0u8; 1 << 16];
            while let Ok(n) = rd.read(&mut buf).await {
                if n == 0 {
                    break;
                }
            }
        };
        let _ = tokio::time::timeout(Duration::from_secs(300), async {
            tokio::join!(writer, reader)
        })
        .await;
    });
});
