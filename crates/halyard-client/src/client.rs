//! The handle: cheap to clone, talks to the driver task over a bounded channel.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};

use halyard_codec::{
    ByteString, Bytes, ProtocolVersion, Publish, QoS, ReasonCode, SubscriptionOptions, TopicFilter,
    TopicName,
};
use tokio::sync::{OnceCell, broadcast, mpsc, oneshot, watch};

use crate::driver::Driver;
use crate::events::{ClientState, Command, ConnectionEvent, PublishResult};
use crate::rpc::Rr;
use crate::{ClientOptions, Error, Message};

/// Commands waiting for the driver. Small: the real bound on outgoing messages is
/// `max_queued`, counted separately so that a full queue is an error, not a wait.
const COMMAND_CHANNEL: usize = 256;
/// Connection events kept for slow event readers (they see `Lagged` beyond this).
const EVENT_CHANNEL: usize = 64;

/// A handle to a client. Clone it freely; the connection closes when
/// [`Client::disconnect`] is called or the last handle (and subscription) is dropped.
#[derive(Debug, Clone)]
pub struct Client {
    pub(crate) inner: Arc<Inner>,
}

#[derive(Debug)]
pub(crate) struct Inner {
    pub(crate) tx: mpsc::Sender<Command>,
    state: watch::Receiver<ClientState>,
    events: broadcast::Sender<ConnectionEvent>,
    queued: Arc<AtomicUsize>,
    max_queued: usize,
    subscription_buffer: usize,
    pub(crate) protocol: ProtocolVersion,
    pub(crate) client_id: watch::Receiver<String>,
    pub(crate) response_information: watch::Receiver<Option<String>>,
    pub(crate) response_topic_prefix: String,
    pub(crate) rr: OnceCell<Arc<Rr>>,
}

impl Client {
    /// Starts a client: spawns its driver task (on the current tokio runtime), which
    /// connects at once. Use [`Client::connected`] to wait for the first connection.
    pub fn connect(opts: ClientOptions) -> Client {
        let (tx, rx) = mpsc::channel(COMMAND_CHANNEL);
        let (state_tx, state) = watch::channel(ClientState::Connecting);
        let (events, _) = broadcast::channel(EVENT_CHANNEL);
        let (id_tx, client_id) = watch::channel(opts.client_id.clone());
        let (ri_tx, response_information) = watch::channel(None);
        let queued = Arc::new(AtomicUsize::new(0));
        let inner = Arc::new(Inner {
            tx,
            state,
            events: events.clone(),
            queued: queued.clone(),
            max_queued: opts.max_queued,
            subscription_buffer: opts.subscription_buffer,
            protocol: opts.protocol,
            client_id,
            response_information,
            response_topic_prefix: opts.response_topic_prefix.clone(),
            rr: OnceCell::new(),
        });
        if let Err(e) = opts.validate() {
            let _ = state_tx.send(ClientState::Closed(Some(Arc::new(e))));
            return Client { inner };
        }
        let driver = Driver::new(opts, rx, state_tx, events, queued, id_tx, ri_tx);
        tokio::spawn(driver.run());
        Client { inner }
    }

    /// Waits until the client is connected; returns whether the session was resumed.
    /// Fails when the client closes first (reconnect off and the attempt failed, or closed).
    pub async fn connected(&self) -> Result<bool, Error> {
        let mut st = self.inner.state.clone();
        loop {
            match &*st.borrow_and_update() {
                ClientState::Connected { session_present } => return Ok(*session_present),
                ClientState::Closed(Some(e)) => return Err(clone_error(e)),
                ClientState::Closed(None) => return Err(Error::Closed),
                ClientState::Connecting => {}
            }
            if st.changed().await.is_err() {
                return Err(Error::Closed);
            }
        }
    }

    /// The connection state now.
    pub fn state(&self) -> ClientState {
        self.inner.state.borrow().clone()
    }

    /// A watch of the connection state.
    pub fn watch_state(&self) -> watch::Receiver<ClientState> {
        self.inner.state.clone()
    }

    /// A stream of connection events from now on.
    pub fn events(&self) -> broadcast::Receiver<ConnectionEvent> {
        self.inner.events.subscribe()
    }

    /// The client identifier in use (the broker's assigned one once known).
    pub fn client_id(&self) -> String {
        self.inner.client_id.borrow().clone()
    }

    /// The protocol version this client speaks.
    pub fn protocol(&self) -> ProtocolVersion {
        self.inner.protocol
    }

    /// Publishes and waits for the broker's acknowledgement (QoS 1: PUBACK, QoS 2: PUBCOMP;
    /// QoS 0: written to the connection).
    pub async fn publish(&self, msg: Message) -> Result<PublishResult, Error> {
        self.publish_nowait(msg).await?.await
    }

    /// Queues a message and returns a [`Delivery`] that resolves when it is acknowledged,
    /// so a caller can keep many in flight. Fails at once with [`Error::QueueFull`] when
    /// `max_queued` messages are already waiting.
    pub async fn publish_nowait(&self, msg: Message) -> Result<Delivery, Error> {
        let topic = TopicName::new(msg.topic)?;
        if topic.is_empty() {
            // [MQTT-4.7.3-1] a topic name is at least one character.
            return Err(Error::InvalidTopic(halyard_codec::TopicError::Empty));
        }
        let mut props = msg.properties;
        props.topic_alias = None;
        props.subscription_identifiers.clear();
        let publish = Publish {
            dup: false,
            qos: msg.qos,
            retain: msg.retain,
            topic,
            packet_id: 0,
            properties: props,
            raw_properties: Bytes::new(),
            payload: msg.payload,
        };
        // Reserve a queue slot first: the bound is checked here so that the caller gets
        // the error now instead of waiting behind a broker that is away.
        let q = &self.inner.queued;
        if q.fetch_add(1, Ordering::AcqRel) >= self.inner.max_queued {
            q.fetch_sub(1, Ordering::AcqRel);
            return Err(Error::QueueFull);
        }
        let (done, rx) = oneshot::channel();
        if self
            .inner
            .tx
            .send(Command::Publish { publish, done })
            .await
            .is_err()
        {
            q.fetch_sub(1, Ordering::AcqRel);
            return Err(Error::Closed);
        }
        Ok(Delivery { rx })
    }

    /// Subscribes with `qos` and default options; messages arrive on the returned stream.
    pub async fn subscribe(
        &self,
        filter: impl Into<ByteString>,
        qos: QoS,
    ) -> Result<Subscription, Error> {
        let options = SubscriptionOptions {
            qos,
            ..SubscriptionOptions::default()
        };
        self.subscribe_with(filter, options, Vec::new()).await
    }

    /// Subscribes with every option (no local, retain as published, retain handling) and
    /// v5 user properties. The client adds a subscription identifier of its own (when the
    /// broker supports them) to route messages to the right stream.
    pub async fn subscribe_with(
        &self,
        filter: impl Into<ByteString>,
        options: SubscriptionOptions,
        user_properties: Vec<(ByteString, ByteString)>,
    ) -> Result<Subscription, Error> {
        self.subscribe_many(vec![(filter.into(), options)], user_properties)
            .await
    }

    /// Subscribes to several filters with one stream: a message matching more than one
    /// of them arrives once (as `mosquitto_sub -t a -t b` prints it once). Succeeds when
    /// the broker granted at least one filter; [`Subscription::grants`] tells which.
    pub async fn subscribe_many(
        &self,
        filters: Vec<(ByteString, SubscriptionOptions)>,
        user_properties: Vec<(ByteString, ByteString)>,
    ) -> Result<Subscription, Error> {
        let parsed = filters
            .into_iter()
            .map(|(f, o)| Ok((TopicFilter::new(f)?, o)))
            .collect::<Result<Vec<_>, Error>>()?;
        let (mtx, mrx) = mpsc::channel(self.inner.subscription_buffer.max(1));
        let mut waits = Vec::with_capacity(parsed.len());
        for (filter, options) in &parsed {
            let (reply, rx) = oneshot::channel();
            self.inner
                .tx
                .send(Command::Subscribe {
                    filter: filter.clone(),
                    options: *options,
                    user_properties: user_properties.clone(),
                    tx: mtx.clone(),
                    reply,
                })
                .await
                .map_err(|_| Error::Closed)?;
            waits.push(rx);
        }
        drop(mtx);
        let mut grants = Vec::with_capacity(waits.len());
        let mut last_err = None;
        for rx in waits {
            match rx.await.map_err(|_| Error::Closed)? {
                Ok(q) => grants.push(Ok(q)),
                Err(Error::Rejected {
                    reason,
                    reason_string,
                }) => {
                    grants.push(Err(reason));
                    last_err = Some(Error::Rejected {
                        reason,
                        reason_string,
                    });
                }
                Err(e) => return Err(e),
            }
        }
        if grants.iter().all(Result::is_err) {
            return Err(last_err.unwrap_or(Error::Closed));
        }
        Ok(Subscription {
            filters: parsed.into_iter().map(|(f, _)| f).collect(),
            grants,
            rx: mrx,
            tx: self.inner.tx.downgrade(),
        })
    }

    /// Unsubscribes a filter (every local stream on it ends).
    pub async fn unsubscribe(&self, filter: impl Into<ByteString>) -> Result<(), Error> {
        let filter = TopicFilter::new(filter)?;
        unsubscribe(&self.inner.tx, filter).await
    }

    /// Closes the connection deliberately: DISCONNECT (normal, the will is discarded) after
    /// what is already written, then no reconnection. Messages still waiting fail with
    /// [`Error::Closed`].
    pub async fn disconnect(&self) -> Result<(), Error> {
        self.disconnect_with(ReasonCode::Success).await
    }

    /// Like [`Client::disconnect`] with a v5 reason code (0x04 asks the broker to publish
    /// the will).
    pub async fn disconnect_with(&self, reason: ReasonCode) -> Result<(), Error> {
        let (reply, rx) = oneshot::channel();
        if self
            .inner
            .tx
            .send(Command::Disconnect { reason, reply })
            .await
            .is_err()
        {
            return Ok(()); // already closed
        }
        let _ = rx.await;
        Ok(())
    }
}

pub(crate) async fn unsubscribe(
    tx: &mpsc::Sender<Command>,
    filter: TopicFilter,
) -> Result<(), Error> {
    let (reply, rx) = oneshot::channel();
    tx.send(Command::Unsubscribe { filter, reply })
        .await
        .map_err(|_| Error::Closed)?;
    rx.await.map_err(|_| Error::Closed)?
}

fn clone_error(e: &Error) -> Error {
    match e {
        Error::Refused {
            reason,
            reason_string,
        } => Error::Refused {
            reason: *reason,
            reason_string: reason_string.clone(),
        },
        Error::Connect(io) => Error::Connect(std::io::Error::new(io.kind(), io.to_string())),
        Error::Timeout => Error::Timeout,
        other => Error::Protocol(other.to_string()),
    }
}

/// A queued publish; resolves when the broker acknowledged it.
#[derive(Debug)]
pub struct Delivery {
    rx: oneshot::Receiver<Result<PublishResult, Error>>,
}

impl Future for Delivery {
    type Output = Result<PublishResult, Error>;
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        Pin::new(&mut self.rx)
            .poll(cx)
            .map(|r| r.unwrap_or(Err(Error::Closed)))
    }
}

/// Messages of one subscription, as an async stream with a bounded buffer.
///
/// Dropping it unsubscribes (lazily: when the next message for it arrives, or at once with
/// [`Subscription::unsubscribe`]).
#[derive(Debug)]
pub struct Subscription {
    filters: Vec<TopicFilter>,
    grants: Vec<Result<QoS, ReasonCode>>,
    rx: mpsc::Receiver<Message>,
    tx: mpsc::WeakSender<Command>,
}

impl Subscription {
    /// The next message; `None` once the client is closed or the filter unsubscribed.
    pub async fn recv(&mut self) -> Option<Message> {
        self.rx.recv().await
    }
    /// The (first) filter.
    pub fn filter(&self) -> &str {
        self.filters.first().map(|f| f.as_str()).unwrap_or("")
    }
    /// The QoS the broker granted the (first) filter.
    pub fn granted_qos(&self) -> QoS {
        match self.grants.first() {
            Some(Ok(q)) => *q,
            _ => QoS::AtMostOnce,
        }
    }
    /// Per filter, in order: the granted QoS or the broker's refusal.
    pub fn grants(&self) -> &[Result<QoS, ReasonCode>] {
        &self.grants
    }
    /// Unsubscribes now and waits for the broker's UNSUBACKs.
    pub async fn unsubscribe(mut self) -> Result<(), Error> {
        self.rx.close();
        let Some(tx) = self.tx.upgrade() else {
            return Ok(());
        };
        for (f, g) in self.filters.iter().zip(&self.grants) {
            if g.is_ok() {
                unsubscribe(&tx, f.clone()).await?;
            }
        }
        Ok(())
    }
}

impl futures_core::Stream for Subscription {
    type Item = Message;
    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Message>> {
        self.rx.poll_recv(cx)
    }
}
