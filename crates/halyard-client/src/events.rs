//! What the handle (`client.rs`) and the driver task (`driver.rs`) say to each other:
//! commands one way; states, events and replies the other. Its own room, so neither of
//! the two imports the other's internals both ways.

use std::sync::Arc;
use std::time::Duration;

use halyard_codec::{
    AckProperties, ByteString, Properties, Publish, QoS, ReasonCode, SubscriptionOptions,
    TopicFilter,
};
use tokio::sync::{mpsc, oneshot};

use crate::{Error, Message};

/// A command from a handle to the driver.
pub(crate) enum Command {
    Publish {
        publish: Publish,
        done: Reply<PublishResult>,
    },
    Subscribe {
        filter: TopicFilter,
        options: SubscriptionOptions,
        user_properties: Vec<(ByteString, ByteString)>,
        tx: mpsc::Sender<Message>,
        reply: Reply<QoS>,
    },
    Unsubscribe {
        filter: TopicFilter,
        reply: Reply<()>,
    },
    Disconnect {
        reason: ReasonCode,
        reply: oneshot::Sender<()>,
    },
}

/// Where the connection stands.
#[derive(Debug, Clone)]
pub enum ClientState {
    /// Dialling, or waiting to redial.
    Connecting,
    /// CONNACK received.
    Connected {
        /// The broker resumed an existing session.
        session_present: bool,
    },
    /// Closed for good: deliberately (`None`), or because reconnecting is off and the
    /// connection failed (the error).
    Closed(Option<Arc<Error>>),
}

/// Something that happened to the connection.
#[derive(Debug, Clone)]
pub enum ConnectionEvent {
    /// A connection is up.
    Connected {
        /// The URL it went to.
        url: String,
        /// The broker resumed an existing session.
        session_present: bool,
        /// CONNACK properties (v5): assigned client id, server limits, response information.
        properties: Box<Properties>,
    },
    /// An attempt failed (dial error, or CONNACK refusal).
    ConnectFailed {
        /// The URL tried.
        url: String,
        /// Why.
        error: Arc<Error>,
    },
    /// An established connection was lost.
    ConnectionLost {
        /// Why.
        error: Arc<Error>,
    },
    /// Waiting before the next attempt.
    Reconnecting {
        /// Attempts failed since the last good connection.
        attempt: u32,
        /// The (jittered) wait.
        delay: Duration,
    },
    /// The client is closed.
    Closed,
}

/// The broker's answer to a QoS 1/2 publish (QoS 0: success once written).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublishResult {
    /// PUBACK / PUBREC reason code (success codes only; failures are [`Error::Rejected`]).
    pub reason: ReasonCode,
    /// Acknowledgement properties (v5).
    pub properties: AckProperties,
}

/// The broker's answer to a SUBSCRIBE.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubscribeResult {
    /// Granted QoS.
    pub granted: QoS,
}

pub(crate) type Reply<T> = oneshot::Sender<Result<T, Error>>;
