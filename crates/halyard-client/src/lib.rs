//! Halyard's async MQTT client: MQTT 3.1, 3.1.1 and 5.0 over every transport of
//! `halyard-transport` (`tcp://`, `tls://`, `ws://`, `wss://`, `unix://`).
//!
//! A [`Client`] is a cheap, cloneable handle; one driver task per client owns the
//! connection and all protocol state (packet ids, QoS 1/2 in flight, topic aliases, keep
//! alive). The connection is *permanent*: when it drops, the driver reconnects with capped
//! exponential backoff and full jitter, resumes or rebuilds the session (resubscribing when
//! the broker kept nothing), and redelivers unacknowledged QoS 1/2 messages with DUP.
//! Messages published while disconnected wait in a bounded queue; when it is full,
//! publishing fails with [`Error::QueueFull`] rather than growing without bound.
//!
//! ```no_run
//! # async fn demo() -> Result<(), halyard_client::Error> {
//! use halyard_client::{Client, ClientOptions, Message, QoS};
//! let client = Client::connect(ClientOptions::new("tcp://127.0.0.1:1883").client_id("demo"));
//! let mut sub = client.subscribe("sensors/+/temp", QoS::AtLeastOnce).await?;
//! client.publish(Message::new("sensors/1/temp", "21.5").qos(QoS::AtLeastOnce)).await?;
//! while let Some(msg) = sub.recv().await {
//!     println!("{}: {:?}", msg.topic, msg.payload);
//! }
//! # Ok(()) }
//! ```
#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod backoff;
mod client;
mod driver;
mod error;
mod events;
mod options;
mod rpc;

pub use backoff::{Backoff, random_seed};
pub use client::{Client, Delivery, Subscription};
pub use error::{Error, reason_text};
pub use events::{ClientState, ConnectionEvent, PublishResult, SubscribeResult};
pub use halyard_codec::{
    ByteString, Bytes, ProtocolVersion, PublishProperties, QoS, ReasonCode, RetainHandling,
    SubscriptionOptions,
};
pub use halyard_transport::DialOptions;
pub use halyard_transport::tls::ClientTls;
pub use options::*;
pub use rpc::ServeHandle;

/// An application message, received or to be published.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    /// Topic name.
    pub topic: ByteString,
    /// Payload.
    pub payload: Bytes,
    /// QoS (of this delivery, when received).
    pub qos: QoS,
    /// RETAIN flag.
    pub retain: bool,
    /// DUP flag (received messages only).
    pub dup: bool,
    /// Packet identifier it arrived with (received QoS 1/2 messages; 0 otherwise).
    pub packet_id: u16,
    /// v5 properties: payload format, message expiry, content type, response topic,
    /// correlation data, user properties; received messages also carry their subscription
    /// identifiers. The topic alias is managed by the client and ignored here.
    pub properties: PublishProperties,
}

impl Message {
    /// A QoS 0, non-retained message.
    pub fn new(topic: impl Into<ByteString>, payload: impl Into<Bytes>) -> Self {
        Message {
            topic: topic.into(),
            payload: payload.into(),
            qos: QoS::AtMostOnce,
            retain: false,
            dup: false,
            packet_id: 0,
            properties: PublishProperties::default(),
        }
    }
    /// Sets the QoS.
    pub fn qos(mut self, qos: QoS) -> Self {
        self.qos = qos;
        self
    }
    /// Sets the RETAIN flag.
    pub fn retain(mut self, retain: bool) -> Self {
        self.retain = retain;
        self
    }
    /// Adds a v5 user property.
    pub fn user_property(mut self, k: impl Into<ByteString>, v: impl Into<ByteString>) -> Self {
        self.properties.user_properties.push((k.into(), v.into()));
        self
    }
    /// Sets the v5 message expiry interval (seconds).
    pub fn expiry(mut self, secs: u32) -> Self {
        self.properties.message_expiry_interval = Some(secs);
        self
    }
    /// Sets the v5 content type.
    pub fn content_type(mut self, ct: impl Into<ByteString>) -> Self {
        self.properties.content_type = Some(ct.into());
        self
    }
}
