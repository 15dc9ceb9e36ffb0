//! Helpers the auth test binaries share.
#![allow(unreachable_pub)]

use halyard_codec::*;
use halyard_testkit::RawClient;
use tokio::net::TcpStream;

/// SUBSCRIBE to `filter` at QoS 1; the SUBACK's reason code.
pub async fn subscribe(c: &mut RawClient<TcpStream>, filter: &str) -> ReasonCode {
    c.send(&Packet::Subscribe(Subscribe {
        packet_id: 9,
        filters: vec![(
            TopicFilter::try_from(filter).unwrap(),
            SubscriptionOptions {
                qos: QoS::AtLeastOnce,
                ..Default::default()
            },
        )],
        properties: Properties::default(),
    }))
    .await;
    match c.recv().await {
        Packet::SubAck(s) => s.reasons[0],
        other => panic!("{other:?}"),
    }
}
