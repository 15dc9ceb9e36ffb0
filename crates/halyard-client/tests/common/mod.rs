//! Brokers for the client tests: Halyard in process, and the real Mosquitto (Debian's
//! `mosquitto`) started on a free loopback port — the client must work with a broker we
//! did not write.
#![allow(dead_code, unreachable_pub)]

use halyard_testkit::TestBroker;
pub use halyard_testkit::procs::{Mosquitto, WAIT, free_port};

/// Either broker, by name, for tests that run against both.
pub enum AnyBroker {
    Halyard(TestBroker),
    Mosquitto(Mosquitto),
}

impl AnyBroker {
    pub async fn start(name: &str) -> AnyBroker {
        match name {
            "halyard" => AnyBroker::Halyard(TestBroker::start().await),
            "mosquitto" => AnyBroker::Mosquitto(Mosquitto::start()),
            other => panic!("unknown broker {other}"),
        }
    }
    pub fn url(&self) -> String {
        match self {
            AnyBroker::Halyard(b) => format!("tcp://{}", b.addr),
            AnyBroker::Mosquitto(m) => m.url(),
        }
    }
}
