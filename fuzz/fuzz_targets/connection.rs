//! Arbitrary byte streams into one broker connection, driven through the deterministic
//! simulator (`halyard_broker::sim`): the protocol state machine itself (CONNECT handling,
//! sessions, QoS flows, aliases, limits, timers), without sockets, tasks or a runtime.
//!
//! Input: byte 0 picks the chunk size (1..=64, so packets arrive split at every boundary)
//! and the virtual time between chunks (0, 0.7, 1.4 or 2.1 s: keep alive, will delay and
//! expiry fire in the middle of flows); the rest is the client's bytes. A second client,
//! subscribed to `#` at QoS 2, receives what the first publishes. At the end the fuzzed
//! client's connection drops and ten minutes pass, so wills and expiry run too. Each input
//! starts from a fresh broker, so every crash reproduces from its input alone.
#![no_main]

use std::time::Duration;

use halyard_broker::BrokerConfig;
use halyard_broker::sim::Sim;
use libfuzzer_sys::fuzz_target;

/// v5 CONNECT "observer", then SUBSCRIBE 1 "#" QoS 2.
const OBSERVER: &[u8] = &[
    0x10, 0x15, 0x00, 0x04, b'M', b'Q', b'T', b'T', 0x05, 0x02, 0x00, 0x00, 0x00, 0x00, 0x08,
    b'o', b'b', b's', b'e', b'r', b'v', b'e', b'r', 0x82, 0x07, 0x00, 0x01, 0x00, 0x00, 0x01,
    b'#', 0x02,
];

fuzz_target!(|data: &[u8]| {
    let Some((&first, bytes)) = data.split_first() else {
        return;
    };
    let chunk = usize::from(first % 64) + 1;
    let step = Duration::from_millis(700 * u64::from(first / 64));
    let mut sim = Sim::new(BrokerConfig {
        persistent_client_expiration: Some(Duration::from_secs(5)),
        max_session_expiry_interval: 5,
        max_queued_messages: 100,
        ..BrokerConfig::default()
    });
    let observer = sim.open(OBSERVER);
    let c = sim.open(&[]);
    for part in bytes.chunks(chunk) {
        sim.send(c, part);
        sim.output(c);
        sim.output(observer);
        sim.advance(step);
    }
    sim.drop_connection(c);
    sim.advance(Duration::from_secs(600));
    sim.output(c);
    sim.output(observer);
});
