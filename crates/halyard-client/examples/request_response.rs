//! MQTT 5 request/response: a responder and a requester on one broker.
//! `cargo run -p halyard-client --example request_response -- tcp://127.0.0.1:1883`

use std::time::Duration;

use halyard_client::{Bytes, Client, ClientOptions, Error, Message};

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Error> {
    let url = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "tcp://127.0.0.1:1883".into());
    let server = Client::connect(ClientOptions::new(url.as_str()).client_id("example-responder"));
    let _serving = server
        .serve("example/time", |_req: Message| async move {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0);
            Some(Bytes::from(now.to_string()))
        })
        .await?;
    let client = Client::connect(ClientOptions::new(url).client_id("example-requester"));
    let reply = client
        .request("example/time", "", Duration::from_secs(5))
        .await?;
    println!(
        "the responder says it is {} s past the epoch",
        String::from_utf8_lossy(&reply.payload)
    );
    client.disconnect().await?;
    server.disconnect().await
}
