//! Subscribe to a filter and publish to it: `cargo run -p halyard-client --example pubsub
//! -- tcp://127.0.0.1:1883`.

use std::time::Duration;

use halyard_client::{Client, ClientOptions, Error, Message, QoS};

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Error> {
    let url = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "tcp://127.0.0.1:1883".into());
    let client = Client::connect(ClientOptions::new(url).client_id("example-pubsub"));
    client.connected().await?;
    let mut sub = client
        .subscribe("example/+/temperature", QoS::AtLeastOnce)
        .await?;
    for room in ["kitchen", "hall"] {
        let msg = Message::new(format!("example/{room}/temperature"), "21.5")
            .qos(QoS::AtLeastOnce)
            .content_type("text/plain");
        // Resolves when the broker acknowledged it (PUBACK).
        client.publish(msg).await?;
    }
    for _ in 0..2 {
        match tokio::time::timeout(Duration::from_secs(5), sub.recv()).await {
            Ok(Some(m)) => println!("{} = {}", m.topic, String::from_utf8_lossy(&m.payload)),
            _ => break,
        }
    }
    client.disconnect().await
}
