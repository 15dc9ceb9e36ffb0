//! A publisher that rides out broker restarts: it keeps publishing QoS 1 messages while
//! the connection comes and goes, printing connection events. Messages published while the
//! broker is away wait in the client's bounded queue; when it is full, `publish` fails with
//! `QueueFull` and this example waits a little.
//! `cargo run -p halyard-client --example reconnecting_publisher -- tcp://127.0.0.1:1883`

use std::time::Duration;

use halyard_client::{Client, ClientOptions, ConnectionEvent, Error, Message, QoS};

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Error> {
    let url = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "tcp://127.0.0.1:1883".into());
    let opts = ClientOptions::new(url)
        .client_id("example-publisher")
        .clean_start(false)
        .session_expiry(3600)
        .max_queued(10_000);
    let client = Client::connect(opts);
    let mut events = client.events();
    tokio::spawn(async move {
        while let Ok(e) = events.recv().await {
            match e {
                ConnectionEvent::Connected {
                    url,
                    session_present,
                    ..
                } => {
                    eprintln!("connected to {url} (session present: {session_present})")
                }
                ConnectionEvent::ConnectionLost { error } => eprintln!("connection lost: {error}"),
                ConnectionEvent::Reconnecting { attempt, delay } => {
                    eprintln!("attempt {attempt} in {delay:?}")
                }
                other => eprintln!("{other:?}"),
            }
        }
    });
    for i in 0u64.. {
        let msg = Message::new("example/counter", i.to_string()).qos(QoS::AtLeastOnce);
        match client.publish_nowait(msg).await {
            Ok(_delivery) => {}
            Err(Error::QueueFull) => tokio::time::sleep(Duration::from_millis(100)).await,
            Err(e) => return Err(e),
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Ok(())
}
