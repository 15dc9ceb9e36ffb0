//! Bridges between an in-process Halyard and a remote: Debian's Mosquitto (a process) or a
//! second in-process Halyard; clients are halyard-client.
#![allow(dead_code, unreachable_pub, clippy::needless_pass_by_value)]

use std::sync::Arc;
use std::time::Duration;

use halyard_bridge::{Bridge, BridgeConfig, BridgeStatus, Bridges};
use halyard_broker::BrokerConfig;
use halyard_client::{Client, ClientOptions, Message, ProtocolVersion, QoS, Reconnect};
use halyard_store::MemoryStore;
use halyard_testkit::TestBroker;
pub use halyard_testkit::procs::{Mosquitto, WAIT};
use tokio::time::timeout;

pub const VERSIONS: [ProtocolVersion; 2] = [ProtocolVersion::V3_1_1, ProtocolVersion::V5];

/// A broker with a node id (loop prevention) and its bridge manager.
pub struct Side {
    pub broker: TestBroker,
    pub bridges: Arc<Bridges>,
}

impl Side {
    pub async fn start(node: &str) -> Side {
        Self::with_store(node, Arc::new(MemoryStore::new())).await
    }

    /// On `store`: a second `Side` on the same store is the same broker restarted.
    pub async fn with_store(node: &str, store: Arc<MemoryStore>) -> Side {
        let cfg = BrokerConfig {
            node_id: Some(node.to_string()),
            ..BrokerConfig::default()
        };
        let broker = TestBroker::with_store(cfg, store).await;
        let bridges = Bridges::new(broker.broker.clone(), Some(node.to_string()), None);
        Side { broker, bridges }
    }

    pub fn url(&self) -> String {
        format!("tcp://{}", self.broker.addr)
    }

    pub async fn add(&self, b: Bridge) {
        self.bridges.upsert(b).await.expect("bridge starts");
    }

    pub fn status(&self, name: &str) -> BridgeStatus {
        self.bridges.get(name).expect("the bridge exists")
    }

    /// Waits until bridge `name` is connected.
    pub async fn connected(&self, name: &str) {
        eventually(&format!("bridge {name} connected"), || {
            self.status(name).state == "connected"
        })
        .await;
    }
}

/// A bridge configuration from JSON fields added to `name`, `address` and `topic`.
pub fn bridge(name: &str, address: &str, topics: &[&str], extra: serde_json::Value) -> Bridge {
    let mut v = serde_json::json!({
        "name": name,
        "address": [address],
        "topic": topics,
        "restart_timeout": [1, 1],
        "remote_clientid": format!("{name}-bridge"),
    });
    if let (Some(o), Some(e)) = (v.as_object_mut(), extra.as_object()) {
        for (k, x) in e {
            o.insert(k.clone(), x.clone());
        }
    }
    let c: BridgeConfig = serde_json::from_value(v).expect("a bridge configuration");
    c.validate().expect("valid")
}

pub fn opts(url: &str, v: ProtocolVersion, id: &str) -> ClientOptions {
    ClientOptions::new(url)
        .protocol(v)
        .client_id(id)
        .reconnect(Reconnect {
            enabled: true,
            initial: Duration::from_millis(50),
            max: Duration::from_millis(400),
            retry_first_connect: true,
        })
}

pub async fn client(url: &str, v: ProtocolVersion, id: &str) -> Client {
    let c = Client::connect(opts(url, v, id));
    c.connected().await.expect("connects");
    c
}

pub async fn recv(sub: &mut halyard_client::Subscription) -> Message {
    timeout(WAIT, sub.recv())
        .await
        .expect("a message within the wait")
        .expect("the stream is open")
}

/// Receives until a message with payload `marker` arrives; returns what came before it.
/// Messages sent before the marker on the same path arrive before it, so a duplicate
/// would be among them.
pub async fn until_marker(sub: &mut halyard_client::Subscription, marker: &str) -> Vec<Message> {
    let mut got = Vec::new();
    loop {
        let m = recv(sub).await;
        if m.payload == marker.as_bytes() {
            return got;
        }
        got.push(m);
    }
}

pub async fn publish(c: &Client, topic: &str, payload: &str, qos: QoS) {
    let r = c
        .publish(Message::new(topic.to_string(), payload.to_string()).qos(qos))
        .await
        .expect("published");
    assert!(!r.reason.is_error(), "{topic}: {:?}", r.reason);
}

pub async fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while !cond() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

pub fn payloads(ms: &[Message]) -> Vec<String> {
    ms.iter()
        .map(|m| String::from_utf8_lossy(&m.payload).to_string())
        .collect()
}
