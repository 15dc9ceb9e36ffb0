//! The driver task: owns the connection and every piece of protocol state.
//!
//! One task per client, so no state is shared and nothing is locked: the handle sends
//! [`Command`]s over a bounded channel, the driver answers through oneshots. The task
//! alternates between two phases until the client is closed:
//!
//! - *offline*: dialling (every URL in turn) or waiting out the jittered backoff, while still
//!   taking commands (publishes are queued, subscriptions recorded);
//! - *online*: one `select!` over the socket's read half, its write half, the command
//!   channel, a pending delivery into a full subscription buffer, and the keep-alive timer.
//!
//! Reads stop while a delivery waits for room in a subscription buffer; that is how a slow
//! consumer pushes back on the broker instead of growing memory here.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use halyard_codec::{
    Ack, ByteString, BytesMut, ConnAck, Disconnect, MAX_PACKET_SIZE, Packet, ProtocolVersion,
    Publish, QoS, ReasonCode, SubscriptionOptions, TopicFilter, TopicName,
};
use halyard_transport::{BoxStream, Registry};
use tokio::io::{AsyncReadExt, AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::sync::{broadcast, mpsc, watch};
use tokio::time::{Instant, sleep, sleep_until};
use tracing::debug;

use crate::backoff::{Backoff, random_seed};
mod connect;
mod inbound;
mod outbound;

use connect::*;

use crate::events::{ClientState, Command, ConnectionEvent, PublishResult, Reply};
use crate::{ClientOptions, Error, Message};

/// Bytes we let pile up in the write buffer before we stop pulling more from the queue;
/// beyond this the socket, not memory, is the buffer.
const WRITE_HIGH_WATER: usize = 64 * 1024;
/// Read buffer growth step.
const READ_CHUNK: usize = 8 * 1024;
/// Largest subscription identifier [MQTT-3.8.2.1.2]: a Variable Byte Integer.
const MAX_SUBSCRIPTION_ID: u32 = 268_435_455;

struct Outgoing {
    publish: Publish,
    done: Option<Reply<PublishResult>>,
}

/// A QoS 1/2 message the broker has not finished acknowledging.
struct Inflight {
    publish: Publish,
    /// QoS 2: PUBREC received, PUBREL sent.
    released: bool,
    /// The PUBREC's answer, reported when PUBCOMP completes the exchange.
    result: Option<PublishResult>,
    done: Option<Reply<PublishResult>>,
}

/// Most messages kept for a subscription not made yet (see `Driver::unclaimed`).
const UNCLAIMED_MAX: usize = 1000;

struct SubEntry {
    filter: TopicFilter,
    options: SubscriptionOptions,
    user_properties: Vec<(ByteString, ByteString)>,
    tx: mpsc::Sender<Message>,
    /// The broker has it (SUBACK seen on this session).
    confirmed: bool,
    reply: Option<Reply<QoS>>,
}

enum AckWait {
    Subscribe(u32),
    Unsubscribe(Option<Reply<()>>),
}

/// How an online phase ended.
enum Exit {
    /// The connection broke; reconnect (if allowed).
    Lost(Error),
    /// Deliberately closed.
    Closed,
}

/// Limits the broker announced in CONNACK, and per-connection state.
struct Session {
    version: ProtocolVersion,
    window: usize,
    max_packet: u32,
    alias_max: u16,
    max_qos: QoS,
    retain_available: bool,
    sub_ids: bool,
    alias_out: HashMap<TopicName, u16>,
    alias_in: HashMap<u16, TopicName>,
    keep_alive: Duration,
    last_write: Instant,
    ping_sent: Option<Instant>,
    wbuf: BytesMut,
    needs_flush: bool,
    trace: Option<crate::PacketTrace>,
}

/// A message waiting for room in subscription buffers, with the acknowledgement to send
/// once every target has it.
struct PendingDelivery {
    msg: Message,
    targets: Vec<u32>,
    ack: Option<Packet>,
}

pub(crate) struct Driver {
    opts: ClientOptions,
    registry: Registry,
    cmd_rx: mpsc::Receiver<Command>,
    state: watch::Sender<ClientState>,
    events: broadcast::Sender<ConnectionEvent>,
    queued: Arc<AtomicUsize>,
    client_id_tx: watch::Sender<String>,
    response_info_tx: watch::Sender<Option<String>>,
    backoff: Backoff,
    url_idx: usize,
    connected_once: bool,
    queue: VecDeque<Outgoing>,
    inflight: VecDeque<Inflight>,
    next_pid: u16,
    subs: BTreeMap<u32, SubEntry>,
    next_sub_id: u32,
    acks: HashMap<u16, AckWait>,
    unsub_later: Vec<TopicFilter>,
    awaiting_rel: HashSet<u16>,
    pending: Option<PendingDelivery>,
    /// Messages that matched no subscription stream when they arrived: a persistent
    /// session's queued messages come right after CONNACK, before the program has
    /// subscribed again. The next subscription whose filter matches takes them, in order.
    /// At most [`UNCLAIMED_MAX`]; beyond that the oldest go.
    unclaimed: VecDeque<Message>,
    commands_closed: bool,
}

impl Driver {
    pub(crate) fn new(
        opts: ClientOptions,
        cmd_rx: mpsc::Receiver<Command>,
        state: watch::Sender<ClientState>,
        events: broadcast::Sender<ConnectionEvent>,
        queued: Arc<AtomicUsize>,
        client_id_tx: watch::Sender<String>,
        response_info_tx: watch::Sender<Option<String>>,
    ) -> Self {
        let backoff = Backoff::new(opts.reconnect.initial, opts.reconnect.max, random_seed());
        Driver {
            opts,
            registry: Registry::default(),
            cmd_rx,
            state,
            events,
            queued,
            client_id_tx,
            response_info_tx,
            backoff,
            url_idx: 0,
            connected_once: false,
            queue: VecDeque::new(),
            inflight: VecDeque::new(),
            next_pid: 1,
            subs: BTreeMap::new(),
            next_sub_id: 1,
            acks: HashMap::new(),
            unsub_later: Vec::new(),
            awaiting_rel: HashSet::new(),
            pending: None,
            unclaimed: VecDeque::new(),
            commands_closed: false,
        }
    }

    pub(crate) async fn run(mut self) {
        let final_error = loop {
            // Offline: dial until connected, closed, or out of attempts.
            let url = self.opts.urls[self.url_idx % self.opts.urls.len()].clone();
            self.url_idx += 1;
            let _ = self.state.send(ClientState::Connecting);
            let attempt = establish(
                self.registry.clone(),
                url.clone(),
                self.opts.clone(),
                self.client_id_tx.borrow().clone(),
                self.clean_start(),
            );
            tokio::pin!(attempt);
            let result = loop {
                tokio::select! {
                    r = &mut attempt => break Some(r),
                    cmd = self.cmd_rx.recv(), if !self.commands_closed => {
                        if self.offline_command(cmd) {
                            break None;
                        }
                    }
                }
            };
            let Some(result) = result else {
                break None;
            };
            let error = match result {
                Ok((stream, connack, rbuf)) => {
                    self.backoff.reset();
                    match self.online(url, stream, connack, rbuf).await {
                        Exit::Closed => break None,
                        Exit::Lost(e) => {
                            let e = Arc::new(e);
                            debug!(error = %e, "connection lost");
                            let _ = self
                                .events
                                .send(ConnectionEvent::ConnectionLost { error: e.clone() });
                            e
                        }
                    }
                }
                Err(e) => {
                    let e = Arc::new(e);
                    debug!(%url, error = %e, "connect failed");
                    let _ = self.events.send(ConnectionEvent::ConnectFailed {
                        url,
                        error: e.clone(),
                    });
                    e
                }
            };
            if !self.opts.reconnect.enabled
                || (!self.connected_once && !self.opts.reconnect.retry_first_connect)
            {
                break Some(error);
            }
            // Backoff, still serving commands. A full round of URLs failing counts as one
            // failure per URL: each attempt waits.
            let delay = self.backoff.next_delay();
            let _ = self.events.send(ConnectionEvent::Reconnecting {
                attempt: self.backoff.failures(),
                delay,
            });
            let wake = sleep(delay);
            tokio::pin!(wake);
            let closed = loop {
                tokio::select! {
                    () = &mut wake => break false,
                    cmd = self.cmd_rx.recv(), if !self.commands_closed => {
                        if self.offline_command(cmd) {
                            break true;
                        }
                    }
                }
            };
            if closed {
                break None;
            }
        };
        self.fail_everything();
        let _ = self.state.send(ClientState::Closed(final_error));
        let _ = self.events.send(ConnectionEvent::Closed);
    }

    /// Clean Start for the next CONNECT: as configured the first time; afterwards v5 asks
    /// to resume (the session expiry decides whether there is anything to resume) and 3.x
    /// keeps its Clean Session flag, which is what decides persistence there.
    fn clean_start(&self) -> bool {
        if self.connected_once && self.opts.protocol.is_v5() {
            false
        } else {
            self.opts.clean_start
        }
    }

    /// A command while not connected; true when it closes the client.
    fn offline_command(&mut self, cmd: Option<Command>) -> bool {
        match cmd {
            None => {
                self.commands_closed = true;
                true
            }
            Some(Command::Publish { publish, done }) => {
                self.queue.push_back(Outgoing {
                    publish,
                    done: Some(done),
                });
                false
            }
            Some(Command::Subscribe {
                filter,
                options,
                user_properties,
                tx,
                reply,
            }) => {
                self.add_sub(filter, options, user_properties, tx, reply);
                false
            }
            Some(Command::Unsubscribe { filter, reply }) => {
                self.remove_subs(&filter);
                if self.connected_once {
                    self.unsub_later.push(filter);
                }
                let _ = reply.send(Ok(()));
                false
            }
            Some(Command::Disconnect { reply, .. }) => {
                let _ = reply.send(());
                true
            }
        }
    }

    fn add_sub(
        &mut self,
        filter: TopicFilter,
        options: SubscriptionOptions,
        user_properties: Vec<(ByteString, ByteString)>,
        tx: mpsc::Sender<Message>,
        reply: Reply<QoS>,
    ) -> u32 {
        let id = self.next_sub_id;
        self.next_sub_id = if id >= MAX_SUBSCRIPTION_ID { 1 } else { id + 1 };
        self.unsub_later.retain(|f| f != &filter);
        // What arrived for this filter before it was made (a resumed session's queue).
        let mut kept = VecDeque::with_capacity(self.unclaimed.len());
        for m in self.unclaimed.drain(..) {
            if filter.matches(m.topic.as_ref()) {
                match tx.try_send(m) {
                    Ok(()) => continue,
                    Err(
                        mpsc::error::TrySendError::Full(m) | mpsc::error::TrySendError::Closed(m),
                    ) => kept.push_back(m),
                }
            } else {
                kept.push_back(m);
            }
        }
        self.unclaimed = kept;
        self.subs.insert(
            id,
            SubEntry {
                filter,
                options,
                user_properties,
                tx,
                confirmed: false,
                reply: Some(reply),
            },
        );
        id
    }

    fn remove_subs(&mut self, filter: &TopicFilter) {
        self.subs.retain(|_, e| &e.filter != filter);
    }

    /// Everything still waiting learns that the client is closed.
    fn fail_everything(&mut self) {
        for o in self.queue.drain(..) {
            self.queued.fetch_sub(1, Ordering::AcqRel);
            if let Some(d) = o.done {
                let _ = d.send(Err(Error::Closed));
            }
        }
        for i in self.inflight.drain(..) {
            if let Some(d) = i.done {
                let _ = d.send(Err(Error::Closed));
            }
        }
        for (_, e) in std::mem::take(&mut self.subs) {
            if let Some(r) = e.reply {
                let _ = r.send(Err(Error::Closed));
            }
        }
        for (_, w) in self.acks.drain() {
            if let AckWait::Unsubscribe(Some(r)) = w {
                let _ = r.send(Err(Error::Closed));
            }
        }
        // Commands that raced with the close.
        self.cmd_rx.close();
        while let Ok(cmd) = self.cmd_rx.try_recv() {
            match cmd {
                Command::Publish { done, .. } => {
                    self.queued.fetch_sub(1, Ordering::AcqRel);
                    let _ = done.send(Err(Error::Closed));
                }
                Command::Subscribe { reply, .. } => {
                    let _ = reply.send(Err(Error::Closed));
                }
                Command::Unsubscribe { reply, .. } => {
                    let _ = reply.send(Err(Error::Closed));
                }
                Command::Disconnect { reply, .. } => {
                    let _ = reply.send(());
                }
            }
        }
    }

    async fn online(
        &mut self,
        url: String,
        stream: BoxStream,
        connack: ConnAck,
        mut rbuf: BytesMut,
    ) -> Exit {
        let p = &connack.properties;
        if let Some(id) = &p.assigned_client_identifier {
            // Reconnections use the assigned id, so the session can resume.
            let _ = self.client_id_tx.send(id.to_string());
        }
        let _ = self
            .response_info_tx
            .send(p.response_information.as_ref().map(|s| s.to_string()));
        let keep_alive = match p.server_keep_alive {
            // [MQTT-3.2.2-21] the server's keep alive replaces ours.
            Some(k) => Duration::from_secs(u64::from(k)),
            None => self.opts.keep_alive,
        };
        let mut s = Session {
            version: self.opts.protocol,
            window: {
                let broker = if self.opts.protocol.is_v5() {
                    p.receive_maximum.unwrap_or(u16::MAX)
                } else {
                    crate::options::DEFAULT_V3_MAX_INFLIGHT
                };
                let ours = self.opts.max_inflight.unwrap_or(u16::MAX);
                usize::from(broker.min(ours).max(1))
            },
            max_packet: p.maximum_packet_size.unwrap_or(MAX_PACKET_SIZE),
            alias_max: if self.opts.outgoing_topic_aliases {
                p.topic_alias_maximum.unwrap_or(0)
            } else {
                0
            },
            max_qos: p.maximum_qos.unwrap_or(QoS::ExactlyOnce),
            retain_available: p.retain_available.unwrap_or(true),
            sub_ids: self.opts.protocol.is_v5()
                && p.subscription_identifier_available.unwrap_or(true),
            alias_out: HashMap::new(),
            alias_in: HashMap::new(),
            keep_alive,
            last_write: Instant::now(),
            ping_sent: None,
            wbuf: BytesMut::with_capacity(4096),
            needs_flush: false,
            trace: self.opts.trace.clone(),
        };
        let session_present = connack.session_present;
        self.connected_once = true;
        self.resume(&mut s, session_present);
        let _ = self.state.send(ClientState::Connected { session_present });
        let _ = self.events.send(ConnectionEvent::Connected {
            url,
            session_present,
            properties: Box::new(connack.properties),
        });

        let (mut rd, mut wr) = tokio::io::split(stream);
        let exit = self.online_loop(&mut s, &mut rd, &mut wr, &mut rbuf).await;
        if let Exit::Closed = exit {
            // Best effort: what is written so far, then close the socket.
            let _ = tokio::time::timeout(Duration::from_secs(5), async {
                wr.write_all(&s.wbuf).await?;
                wr.flush().await?;
                wr.shutdown().await
            })
            .await;
        }
        // Undelivered message of a broken connection: the broker redelivers it (we never
        // acknowledged it), so it is dropped here, not lost.
        self.pending = None;
        exit
    }

    async fn online_loop(
        &mut self,
        s: &mut Session,
        rd: &mut ReadHalf<BoxStream>,
        wr: &mut WriteHalf<BoxStream>,
        rbuf: &mut BytesMut,
    ) -> Exit {
        // Packets that arrived with the CONNACK.
        if let Err(e) = self.process_input(s, rbuf) {
            return self.protocol_failure(s, wr, e).await;
        }
        loop {
            self.pump(s);
            let reading = self.pending.is_none();
            let deadline = keepalive_deadline(s, reading);
            // The stream the pending delivery waits for, if any.
            let waiting_on = self
                .pending
                .as_ref()
                .and_then(|p| p.targets.first())
                .and_then(|id| self.subs.get(id))
                .map(|e| e.tx.clone());
            let reserve = async move {
                match waiting_on {
                    Some(tx) => tx.reserve_owned().await.ok(),
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                r = async {
                    rbuf.reserve(READ_CHUNK);
                    rd.read_buf(rbuf).await
                }, if reading => {
                    match r {
                        Ok(0) => return Exit::Lost(Error::Protocol("connection closed by the broker".into())),
                        Ok(_) => {
                            if let Err(e) = self.process_input(s, rbuf) {
                                return self.protocol_failure(s, wr, e).await;
                            }
                        }
                        Err(e) => return Exit::Lost(Error::Connect(e)),
                    }
                }
                permit = reserve, if !reading => {
                    self.continue_delivery(s, permit);
                    if self.pending.is_none()
                        && let Err(e) = self.process_input(s, rbuf) {
                            return self.protocol_failure(s, wr, e).await;
                        }
                }
                // Write what is buffered, then flush (TLS and WebSocket streams buffer);
                // both are cancel-safe, so losing the race to another branch loses nothing.
                w = async {
                    if s.wbuf.is_empty() {
                        wr.flush().await.map(|()| None)
                    } else {
                        wr.write(&s.wbuf).await.map(Some)
                    }
                }, if !s.wbuf.is_empty() || s.needs_flush => {
                    match w {
                        Ok(Some(0)) => return Exit::Lost(Error::Protocol("connection closed while writing".into())),
                        Ok(Some(n)) => {
                            let _ = s.wbuf.split_to(n);
                            s.needs_flush = true;
                        }
                        Ok(None) => s.needs_flush = false,
                        Err(e) => return Exit::Lost(Error::Connect(e)),
                    }
                }
                cmd = self.cmd_rx.recv(), if !self.commands_closed => {
                    match cmd {
                        None => {
                            self.commands_closed = true;
                            write_packet(s, &Packet::Disconnect(Disconnect::new(ReasonCode::Success)));
                            return Exit::Closed;
                        }
                        Some(Command::Disconnect { reason, reply }) => {
                            write_packet(s, &Packet::Disconnect(Disconnect::new(reason)));
                            let _ = reply.send(());
                            return Exit::Closed;
                        }
                        Some(cmd) => self.online_command(s, cmd),
                    }
                }
                () = sleep_until(deadline.unwrap_or_else(far_future)), if deadline.is_some() => {
                    let now = Instant::now();
                    if let Some(sent) = s.ping_sent {
                        if reading && now >= sent + s.keep_alive {
                            return Exit::Lost(Error::Timeout);
                        }
                    } else if now >= s.last_write + s.keep_alive {
                        write_packet(s, &Packet::PingReq);
                        s.ping_sent = Some(now);
                    }
                }
            }
        }
    }

    async fn protocol_failure(
        &mut self,
        s: &mut Session,
        wr: &mut WriteHalf<BoxStream>,
        (reason, msg): (ReasonCode, String),
    ) -> Exit {
        if s.version.is_v5() {
            write_packet(s, &Packet::Disconnect(Disconnect::new(reason)));
            let _ = tokio::time::timeout(Duration::from_secs(1), async {
                wr.write_all(&s.wbuf).await?;
                wr.flush().await
            })
            .await;
        }
        Exit::Lost(Error::Protocol(msg))
    }
}

fn far_future() -> Instant {
    Instant::now() + Duration::from_secs(86_400 * 365)
}

/// When the keep-alive timer next needs attention: a PINGREQ when we have been quiet for
/// the keep-alive interval, or a dead connection when its PINGRESP is that late.
fn keepalive_deadline(s: &Session, reading: bool) -> Option<Instant> {
    if s.keep_alive.is_zero() {
        return None;
    }
    match s.ping_sent {
        Some(sent) if reading => Some(sent + s.keep_alive),
        // Not reading: the PINGRESP cannot arrive, so it cannot be late.
        Some(_) => None,
        None => Some(s.last_write + s.keep_alive),
    }
}

fn ack_result(a: Ack) -> Result<PublishResult, Error> {
    if a.reason.is_error() {
        Err(Error::Rejected {
            reason: a.reason,
            reason_string: a.properties.reason_string.map(|s| s.to_string()),
        })
    } else {
        Ok(PublishResult {
            reason: a.reason,
            properties: a.properties,
        })
    }
}

/// What the broker announced that this PUBLISH would break.
fn check_publish(s: &Session, p: &Publish) -> Result<(), Error> {
    if p.qos > s.max_qos {
        // [MQTT-3.2.2-11] no PUBLISH above the server's Maximum QoS.
        return Err(Error::NotSupported("QoS above the broker's Maximum QoS"));
    }
    if p.retain && !s.retain_available {
        // [MQTT-3.2.2-14]
        return Err(Error::NotSupported("retained messages"));
    }
    // Sizing a PUBLISH exactly means encoding-length math over a copy of it; skip that
    // when a generous upper bound is already under the limit.
    let pp = &p.properties;
    let bound = p.payload.len()
        + p.topic.as_str().len()
        + pp.user_properties
            .iter()
            .map(|(k, v)| k.len() + v.len() + 5)
            .sum::<usize>()
        + pp.content_type.as_ref().map_or(0, |c| c.len() + 3)
        + pp.response_topic
            .as_ref()
            .map_or(0, |t| t.as_str().len() + 3)
        + pp.correlation_data.as_ref().map_or(0, |c| c.len() + 3)
        + 64;
    if bound < s.max_packet as usize {
        return Ok(());
    }
    let size = Packet::Publish(p.clone()).encoded_len(s.version);
    if size > s.max_packet as usize {
        // [MQTT-3.1.2-24] never send a packet above the receiver's Maximum Packet Size.
        return Err(Error::PacketTooLarge {
            size,
            max: s.max_packet,
        });
    }
    Ok(())
}

fn write_packet(s: &mut Session, p: &Packet) {
    if let Some(t) = &s.trace {
        (t.0)(&format!("sending {}", summary(p)));
    }
    // Encoding only fails for values our types already rule out (sizes checked above);
    // a failure is logged and the packet skipped rather than panicking the driver.
    if let Err(e) = p.encode(s.version, &mut s.wbuf) {
        debug!(packet = p.name(), error = %e, "encode failed");
    }
    s.last_write = Instant::now();
}

/// One line per packet, as mosquitto's clients print with `-d`.
fn summary(p: &Packet) -> String {
    match p {
        Packet::Publish(p) => format!(
            "PUBLISH (d{}, q{}, r{}, m{}, '{}', ... ({} bytes))",
            u8::from(p.dup),
            p.qos as u8,
            u8::from(p.retain),
            p.packet_id,
            p.topic,
            p.payload.len()
        ),
        Packet::PubAck(a) | Packet::PubRec(a) | Packet::PubRel(a) | Packet::PubComp(a) => {
            format!("{} (m{}, rc{})", p.name(), a.packet_id, a.reason as u8)
        }
        Packet::Subscribe(s) => {
            let topics: Vec<String> = s
                .filters
                .iter()
                .map(|(f, o)| format!("Topic: {f}, QoS: {}", o.qos as u8))
                .collect();
            format!("SUBSCRIBE (Mid: {}, {})", s.packet_id, topics.join(", "))
        }
        Packet::SubAck(a) => format!("SUBACK (Mid: {})", a.packet_id),
        Packet::Unsubscribe(u) => {
            let topics: Vec<&str> = u.filters.iter().map(|f| f.as_str()).collect();
            format!(
                "UNSUBSCRIBE (Mid: {}, Topic: {})",
                u.packet_id,
                topics.join(", ")
            )
        }
        Packet::UnsubAck(a) => format!("UNSUBACK (Mid: {})", a.packet_id),
        Packet::Disconnect(d) => format!("DISCONNECT ({})", d.reason as u8),
        other => other.name().to_string(),
    }
}
