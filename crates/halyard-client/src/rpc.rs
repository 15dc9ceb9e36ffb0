//! Request/response (MQTT 5, section 4.10): a request carries a Response Topic and
//! Correlation Data; the responder publishes its answer to that topic with the same
//! correlation data. Works with any MQTT 5 broker: the client subscribes once to a response
//! topic of its own and matches answers by correlation data.

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use halyard_codec::{ByteString, Bytes, QoS, TopicName};
use tokio::sync::{Semaphore, oneshot};
use tokio::task::JoinHandle;
use tracing::debug;

use crate::backoff::random_seed;
use crate::{Client, Error, Message};

/// Requests a `serve` helper handles at once.
const SERVE_CONCURRENCY: usize = 64;

type Waiting = Arc<Mutex<HashMap<Bytes, oneshot::Sender<Message>>>>;

/// The response topic of this client and the requests waiting on it.
#[derive(Debug)]
pub(crate) struct Rr {
    topic: TopicName,
    waiting: Waiting,
    prefix: u64,
    next: AtomicU64,
}

impl Rr {
    fn correlation(&self) -> Bytes {
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        let mut v = Vec::with_capacity(16);
        v.extend_from_slice(&self.prefix.to_be_bytes());
        v.extend_from_slice(&n.to_be_bytes());
        Bytes::from(v)
    }
}

impl Client {
    /// Sends `payload` to `topic` as a request (QoS 1) and waits up to `timeout` for the
    /// reply. MQTT 5 only.
    pub async fn request(
        &self,
        topic: impl Into<ByteString>,
        payload: impl Into<Bytes>,
        timeout: Duration,
    ) -> Result<Message, Error> {
        self.request_with(Message::new(topic, payload).qos(QoS::AtLeastOnce), timeout)
            .await
    }

    /// Like [`Client::request`] with every property of the request message settable; its
    /// Response Topic and Correlation Data are set by the client.
    pub async fn request_with(
        &self,
        mut msg: Message,
        timeout: Duration,
    ) -> Result<Message, Error> {
        if !self.protocol().is_v5() {
            return Err(Error::NotSupported("request/response needs MQTT 5"));
        }
        let rr = match tokio::time::timeout(timeout, self.rr()).await {
            Ok(rr) => rr?,
            Err(_) => return Err(Error::Timeout),
        };
        let run = async {
            let cd = rr.correlation();
            msg.properties.response_topic = Some(rr.topic.clone());
            msg.properties.correlation_data = Some(cd.clone());
            let (tx, rx) = oneshot::channel();
            lock(&rr.waiting).insert(cd.clone(), tx);
            let r = async {
                self.publish(msg).await?;
                rx.await.map_err(|_| Error::Closed)
            }
            .await;
            (rr, cd, r)
        };
        match tokio::time::timeout(timeout, run).await {
            Ok((rr, cd, r)) => {
                lock(&rr.waiting).remove(&cd);
                r
            }
            Err(_) => {
                if let Some(rr) = self.inner.rr.get() {
                    // Forget requests that timed out (their correlation data is unique).
                    lock(&rr.waiting).retain(|_, tx| !tx.is_closed());
                }
                Err(Error::Timeout)
            }
        }
    }

    async fn rr(&self) -> Result<Arc<Rr>, Error> {
        self.inner
            .rr
            .get_or_try_init(|| async {
                let prefix = random_seed();
                let base = self
                    .inner
                    .response_information
                    .borrow()
                    .clone()
                    .unwrap_or_else(|| self.inner.response_topic_prefix.clone());
                let topic = TopicName::new(format!("{base}/{prefix:016x}"))?;
                let mut sub = self.subscribe(topic.as_str(), QoS::AtLeastOnce).await?;
                let waiting: Waiting = Arc::default();
                let w = waiting.clone();
                // Ends when the client closes (the stream ends with it).
                tokio::spawn(async move {
                    while let Some(m) = sub.recv().await {
                        let Some(cd) = &m.properties.correlation_data else {
                            continue;
                        };
                        let tx = lock(&w).remove(cd);
                        match tx {
                            Some(tx) => {
                                let _ = tx.send(m);
                            }
                            None => debug!("reply with unknown correlation data (late?)"),
                        }
                    }
                });
                Ok(Arc::new(Rr {
                    topic,
                    waiting,
                    prefix,
                    next: AtomicU64::new(0),
                }))
            })
            .await
            .cloned()
    }

    /// Answers requests on `filter`: for each message with a Response Topic, runs `handler`
    /// and publishes what it returns (if anything) to that topic with the request's
    /// Correlation Data. Up to 64 requests are handled at once. Messages without a Response
    /// Topic are ignored.
    pub async fn serve<F, Fut>(
        &self,
        filter: impl Into<ByteString>,
        handler: F,
    ) -> Result<ServeHandle, Error>
    where
        F: Fn(Message) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Option<Bytes>> + Send + 'static,
    {
        let mut sub = self.subscribe(filter, QoS::AtLeastOnce).await?;
        let client = self.clone();
        let handler = Arc::new(handler);
        let limit = Arc::new(Semaphore::new(SERVE_CONCURRENCY));
        let task = tokio::spawn(async move {
            while let Some(req) = sub.recv().await {
                let Some(reply_to) = req.properties.response_topic.clone() else {
                    continue;
                };
                let Ok(permit) = limit.clone().acquire_owned().await else {
                    break;
                };
                let client = client.clone();
                let handler = handler.clone();
                tokio::spawn(async move {
                    let cd = req.properties.correlation_data.clone();
                    let qos = req.qos;
                    if let Some(payload) = handler(req).await {
                        let mut m =
                            Message::new(reply_to.as_bytestring().clone(), payload).qos(qos);
                        m.properties.correlation_data = cd;
                        if let Err(e) = client.publish(m).await {
                            debug!(error = %e, "reply not sent");
                        }
                    }
                    drop(permit);
                });
            }
        });
        Ok(ServeHandle { task })
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic while holding this lock leaves a plain map behind, still consistent.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// A running [`Client::serve`] responder.
#[derive(Debug)]
pub struct ServeHandle {
    task: JoinHandle<()>,
}

impl ServeHandle {
    /// Stops answering (the subscription ends).
    pub fn stop(self) {
        self.task.abort();
    }
    /// Waits until the responder ends (when the client closes).
    pub async fn join(self) {
        let _ = self.task.await;
    }
}
