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
    Ack, ByteString, BytesMut, ClientId, ConnAck, Connect, Disconnect, MAX_PACKET_SIZE, Packet,
    Properties, ProtocolVersion, Publish, QoS, ReasonCode, Subscribe, SubscriptionOptions,
    TopicFilter, TopicName, Unsubscribe, Will, decode,
};
use halyard_transport::{BoxStream, Registry};
use tokio::io::{AsyncReadExt, AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::sync::{broadcast, mpsc, watch};
use tokio::time::{Instant, sleep, sleep_until};
use tracing::debug;

use crate::backoff::{Backoff, random_seed};
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

    /// After CONNACK: replay or rebuild the session.
    fn resume(&mut self, s: &mut Session, session_present: bool) {
        if session_present {
            // [MQTT-4.4.0-1] resend unacknowledged PUBLISH (with DUP) and PUBREL, in order.
            for i in 0..self.inflight.len() {
                let pkt = if self.inflight[i].released {
                    Packet::PubRel(Ack::new(self.inflight[i].publish.packet_id))
                } else {
                    self.inflight[i].publish.dup = true;
                    Packet::Publish(self.inflight[i].publish.clone())
                };
                write_packet(s, &pkt);
            }
            for f in std::mem::take(&mut self.unsub_later) {
                self.send_unsubscribe(s, f, None);
            }
        } else {
            // A new session: the broker kept nothing. Messages it had not acknowledged are
            // sent again as new ones; a QoS 2 message it had answered with PUBREC is already
            // its responsibility, so it is complete.
            self.awaiting_rel.clear();
            self.unsub_later.clear();
            let mut resend = Vec::new();
            for mut i in self.inflight.drain(..) {
                if i.released {
                    if let Some(d) = i.done.take() {
                        let _ = d.send(Ok(i.result.take().unwrap_or(PublishResult {
                            reason: ReasonCode::Success,
                            properties: Default::default(),
                        })));
                    }
                } else {
                    i.publish.dup = false;
                    resend.push(Outgoing {
                        publish: i.publish,
                        done: i.done,
                    });
                }
            }
            for o in resend.into_iter().rev() {
                self.queued.fetch_add(1, Ordering::AcqRel);
                self.queue.push_front(o);
            }
            for e in self.subs.values_mut() {
                e.confirmed = false;
            }
        }
        // SUBSCRIBEs sent on the lost connection are sent again below; their UNSUBACKs
        // will never come.
        for (_, w) in self.acks.drain() {
            if let AckWait::Unsubscribe(Some(r)) = w {
                let _ = r.send(Ok(()));
            }
        }
        let ids: Vec<u32> = self
            .subs
            .iter()
            .filter(|(_, e)| !e.confirmed)
            .map(|(id, _)| *id)
            .collect();
        for id in ids {
            self.send_subscribe(s, id);
        }
        self.pump(s);
    }

    fn send_subscribe(&mut self, s: &mut Session, id: u32) {
        let pid = self.alloc_pid();
        let Some(e) = self.subs.get(&id) else { return };
        let properties = Properties {
            subscription_identifier: s.sub_ids.then_some(id),
            user_properties: e.user_properties.clone(),
            ..Properties::default()
        };
        let pkt = Packet::Subscribe(Subscribe {
            packet_id: pid,
            filters: vec![(e.filter.clone(), e.options)],
            properties,
        });
        self.acks.insert(pid, AckWait::Subscribe(id));
        write_packet(s, &pkt);
    }

    /// Writes an UNSUBSCRIBE; `reply` learns of the UNSUBACK.
    fn send_unsubscribe(&mut self, s: &mut Session, filter: TopicFilter, reply: Option<Reply<()>>) {
        let pid = self.alloc_pid();
        self.acks.insert(pid, AckWait::Unsubscribe(reply));
        write_packet(
            s,
            &Packet::Unsubscribe(Unsubscribe {
                packet_id: pid,
                filters: vec![filter],
                properties: Properties::default(),
            }),
        );
    }

    /// A packet id not in use by our in-flight messages or pending (UN)SUBSCRIBEs.
    fn alloc_pid(&mut self) -> u16 {
        loop {
            let pid = self.next_pid;
            self.next_pid = self.next_pid.checked_add(1).unwrap_or(1);
            if !self.acks.contains_key(&pid)
                && !self.inflight.iter().any(|i| i.publish.packet_id == pid)
            {
                return pid;
            }
        }
    }

    /// Moves queued messages to the write buffer while the broker's receive window and our
    /// write high-water mark allow.
    fn pump(&mut self, s: &mut Session) {
        while s.wbuf.len() < WRITE_HIGH_WATER {
            let Some(head) = self.queue.front() else {
                break;
            };
            if head.publish.qos != QoS::AtMostOnce && self.inflight.len() >= s.window {
                break;
            }
            let Some(mut o) = self.queue.pop_front() else {
                break;
            };
            self.queued.fetch_sub(1, Ordering::AcqRel);
            if let Err(e) = check_publish(s, &o.publish) {
                if let Some(d) = o.done {
                    let _ = d.send(Err(e));
                }
                continue;
            }
            if o.publish.qos == QoS::AtMostOnce {
                self.write_publish(s, o.publish);
                if let Some(d) = o.done {
                    let _ = d.send(Ok(PublishResult {
                        reason: ReasonCode::Success,
                        properties: Default::default(),
                    }));
                }
            } else {
                o.publish.packet_id = self.alloc_pid();
                self.write_publish(s, o.publish.clone());
                self.inflight.push_back(Inflight {
                    publish: o.publish,
                    released: false,
                    result: None,
                    done: o.done,
                });
            }
        }
    }

    /// Writes a PUBLISH, replacing the topic by an alias when we may.
    fn write_publish(&self, s: &mut Session, mut p: Publish) {
        if s.alias_max > 0 {
            if let Some(&a) = s.alias_out.get(&p.topic) {
                p.properties.topic_alias = Some(a);
                p.topic = TopicName::new("").unwrap_or_else(|_| p.topic.clone());
            } else if s.alias_out.len() < usize::from(s.alias_max) {
                let a = u16::try_from(s.alias_out.len() + 1).unwrap_or(u16::MAX);
                s.alias_out.insert(p.topic.clone(), a);
                p.properties.topic_alias = Some(a);
            }
        }
        write_packet(s, &Packet::Publish(p));
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

    fn online_command(&mut self, s: &mut Session, cmd: Command) {
        match cmd {
            Command::Publish { publish, done } => {
                self.queue.push_back(Outgoing {
                    publish,
                    done: Some(done),
                });
            }
            Command::Subscribe {
                filter,
                options,
                user_properties,
                tx,
                reply,
            } => {
                let id = self.add_sub(filter, options, user_properties, tx, reply);
                self.send_subscribe(s, id);
            }
            Command::Unsubscribe { filter, reply } => {
                self.remove_subs(&filter);
                self.send_unsubscribe(s, filter, Some(reply));
            }
            Command::Disconnect { .. } => unreachable!("handled by the caller"),
        }
    }

    /// Decodes and handles buffered packets until the buffer is empty or a delivery waits.
    fn process_input(
        &mut self,
        s: &mut Session,
        rbuf: &mut BytesMut,
    ) -> Result<(), (ReasonCode, String)> {
        let max = self.opts.maximum_packet_size.unwrap_or(MAX_PACKET_SIZE);
        while self.pending.is_none() {
            match decode(rbuf, s.version, max) {
                Ok(Some(p)) => self.handle_packet(s, p)?,
                Ok(None) => break,
                Err(e) => return Err((e.reason_code(), e.to_string())),
            }
        }
        Ok(())
    }

    fn handle_packet(&mut self, s: &mut Session, p: Packet) -> Result<(), (ReasonCode, String)> {
        if let Some(t) = &s.trace {
            (t.0)(&format!("received {}", summary(&p)));
        }
        match p {
            Packet::Publish(p) => self.incoming_publish(s, p)?,
            Packet::PubAck(a) => {
                let Some(pos) = self.inflight.iter().position(|i| {
                    i.publish.packet_id == a.packet_id && i.publish.qos == QoS::AtLeastOnce
                }) else {
                    debug!(pid = a.packet_id, "PUBACK for an unknown packet id");
                    return Ok(());
                };
                let i = self.inflight.remove(pos).expect("position is in range");
                if let Some(d) = i.done {
                    let _ = d.send(ack_result(a));
                }
            }
            Packet::PubRec(a) => {
                let Some(pos) = self.inflight.iter().position(|i| {
                    i.publish.packet_id == a.packet_id && i.publish.qos == QoS::ExactlyOnce
                }) else {
                    // [MQTT-4.3.3-?] answer so the broker can finish: PUBREL, id not found.
                    let mut rel = Ack::new(a.packet_id);
                    rel.reason = ReasonCode::PacketIdentifierNotFound;
                    write_packet(s, &Packet::PubRel(rel));
                    return Ok(());
                };
                if a.reason.is_error() {
                    // The exchange ends with a failing PUBREC; no PUBREL [MQTT-4.3.3-8].
                    let i = self.inflight.remove(pos).expect("position is in range");
                    if let Some(d) = i.done {
                        let _ = d.send(ack_result(a));
                    }
                } else {
                    let i = &mut self.inflight[pos];
                    i.released = true;
                    i.result = ack_result(a).ok();
                    write_packet(s, &Packet::PubRel(Ack::new(i.publish.packet_id)));
                }
            }
            Packet::PubComp(a) => {
                if let Some(pos) = self
                    .inflight
                    .iter()
                    .position(|i| i.publish.packet_id == a.packet_id && i.released)
                {
                    let mut i = self.inflight.remove(pos).expect("position is in range");
                    if let Some(d) = i.done.take() {
                        let r = i.result.take().unwrap_or(PublishResult {
                            reason: ReasonCode::Success,
                            properties: Default::default(),
                        });
                        let _ = d.send(Ok(r));
                    }
                }
            }
            Packet::PubRel(a) => {
                // [MQTT-4.3.3-11] answer PUBREL with PUBCOMP; the id may be reused now.
                let known = self.awaiting_rel.remove(&a.packet_id);
                let mut comp = Ack::new(a.packet_id);
                if !known && s.version.is_v5() {
                    comp.reason = ReasonCode::PacketIdentifierNotFound;
                }
                write_packet(s, &Packet::PubComp(comp));
            }
            Packet::SubAck(a) => match self.acks.remove(&a.packet_id) {
                Some(AckWait::Subscribe(id)) => {
                    let reason = a
                        .reasons
                        .first()
                        .copied()
                        .unwrap_or(ReasonCode::UnspecifiedError);
                    if reason.is_error() {
                        if let Some(mut e) = self.subs.remove(&id)
                            && let Some(r) = e.reply.take()
                        {
                            let _ = r.send(Err(Error::Rejected {
                                reason,
                                reason_string: a.properties.reason_string.map(|s| s.to_string()),
                            }));
                        }
                    } else if let Some(e) = self.subs.get_mut(&id) {
                        e.confirmed = true;
                        let granted = QoS::from_u8(reason as u8).unwrap_or(QoS::AtMostOnce);
                        if let Some(r) = e.reply.take() {
                            let _ = r.send(Ok(granted));
                        }
                    }
                }
                _ => debug!(pid = a.packet_id, "unexpected SUBACK"),
            },
            Packet::UnsubAck(a) => {
                if let Some(AckWait::Unsubscribe(Some(r))) = self.acks.remove(&a.packet_id) {
                    let _ = r.send(Ok(()));
                }
            }
            Packet::PingResp => s.ping_sent = None,
            Packet::Disconnect(d) => {
                let text = d.properties.reason_string.as_deref().unwrap_or("");
                return Err((
                    d.reason,
                    format!(
                        "disconnected by the broker: {} (0x{:02X}) {text}",
                        crate::reason_text(d.reason),
                        d.reason as u8
                    ),
                ));
            }
            other => {
                return Err((
                    ReasonCode::ProtocolError,
                    format!("unexpected {} from the broker", other.name()),
                ));
            }
        }
        Ok(())
    }

    fn incoming_publish(
        &mut self,
        s: &mut Session,
        mut p: Publish,
    ) -> Result<(), (ReasonCode, String)> {
        if let Some(alias) = p.properties.topic_alias {
            if alias == 0 || alias > self.opts.topic_alias_maximum {
                // [MQTT-3.3.2-9] an alias above our maximum is a protocol error.
                return Err((
                    ReasonCode::TopicAliasInvalid,
                    format!("topic alias {alias} out of range"),
                ));
            }
            if p.topic.is_empty() {
                match s.alias_in.get(&alias) {
                    Some(t) => p.topic = t.clone(),
                    None => {
                        return Err((
                            ReasonCode::ProtocolError,
                            format!("unknown topic alias {alias}"),
                        ));
                    }
                }
            } else {
                s.alias_in.insert(alias, p.topic.clone());
            }
        }
        let ack = match p.qos {
            QoS::AtMostOnce => None,
            QoS::AtLeastOnce => Some(Packet::PubAck(Ack::new(p.packet_id))),
            QoS::ExactlyOnce => {
                if self.awaiting_rel.contains(&p.packet_id) {
                    // A resent QoS 2 PUBLISH we already have: acknowledge, do not deliver
                    // twice [MQTT-4.3.3-10].
                    write_packet(s, &Packet::PubRec(Ack::new(p.packet_id)));
                    return Ok(());
                }
                Some(Packet::PubRec(Ack::new(p.packet_id)))
            }
        };
        let targets = self.targets(&p);
        let msg = Message {
            topic: p.topic.as_bytestring().clone(),
            payload: p.payload,
            qos: p.qos,
            retain: p.retain,
            dup: p.dup,
            packet_id: p.packet_id,
            properties: {
                let mut props = p.properties;
                props.topic_alias = None;
                props
            },
        };
        if p.qos == QoS::ExactlyOnce {
            self.awaiting_rel.insert(p.packet_id);
        }
        self.pending = Some(PendingDelivery { msg, targets, ack });
        self.continue_delivery(s, None);
        Ok(())
    }

    /// Subscription streams a message goes to: by subscription identifier when the broker
    /// sent any (and to streams sharing a filter with them), else by matching filters.
    /// One PUBLISH reaches each stream once, even when several of the stream's filters
    /// match it (`subscribe_many`).
    fn targets(&self, p: &Publish) -> Vec<u32> {
        let ids = &p.properties.subscription_identifiers;
        let matching: Vec<(u32, &SubEntry)> = if ids.is_empty() {
            self.subs
                .iter()
                .filter(|(_, e)| e.filter.matches(p.topic.as_str()))
                .map(|(id, e)| (*id, e))
                .collect()
        } else {
            let filters: Vec<&TopicFilter> = ids
                .iter()
                .filter_map(|id| self.subs.get(id))
                .map(|e| &e.filter)
                .collect();
            self.subs
                .iter()
                .filter(|(id, e)| ids.contains(id) || filters.contains(&&e.filter))
                .map(|(id, e)| (*id, e))
                .collect()
        };
        let mut out: Vec<u32> = Vec::with_capacity(matching.len());
        for (i, (id, e)) in matching.iter().enumerate() {
            if !matching[..i].iter().any(|(_, o)| o.tx.same_channel(&e.tx)) {
                out.push(*id);
            }
        }
        out
    }

    /// Hands the pending message to its remaining targets; stops at the first full buffer
    /// (the caller waits for room with `permit`). Sends the acknowledgement when done.
    fn continue_delivery(
        &mut self,
        s: &mut Session,
        mut permit: Option<mpsc::OwnedPermit<Message>>,
    ) {
        let Some(mut pd) = self.pending.take() else {
            return;
        };
        while let Some(&id) = pd.targets.first() {
            if let Some(p) = permit.take() {
                p.send(pd.msg.clone());
                pd.targets.remove(0);
                continue;
            }
            let Some(e) = self.subs.get(&id) else {
                pd.targets.remove(0);
                continue;
            };
            match e.tx.try_send(pd.msg.clone()) {
                Ok(()) => {
                    pd.targets.remove(0);
                }
                Err(mpsc::error::TrySendError::Full(_)) => {
                    self.pending = Some(pd);
                    return;
                }
                Err(mpsc::error::TrySendError::Closed(_)) => {
                    // The stream was dropped: forget it, and unsubscribe when no other
                    // stream uses the filter.
                    pd.targets.remove(0);
                    if let Some(e) = self.subs.remove(&id)
                        && !self.subs.values().any(|o| o.filter == e.filter)
                    {
                        self.send_unsubscribe(s, e.filter, None);
                    }
                }
            }
        }
        if let Some(ack) = pd.ack {
            write_packet(s, &ack);
        }
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

/// Dials, sends CONNECT, reads CONNACK.
async fn establish(
    registry: Registry,
    url: String,
    opts: ClientOptions,
    client_id: String,
    clean_start: bool,
) -> Result<(BoxStream, ConnAck, BytesMut), Error> {
    let timeout = opts.dial.connect_timeout;
    let work = async {
        let mut stream = registry
            .dial(&url, &opts.dial)
            .await
            .map_err(|e| Error::Connect(std::io::Error::new(e.kind(), format!("{url}: {e}"))))?;
        let v = opts.protocol;
        let connect = build_connect(&opts, client_id, clean_start)?;
        let mut buf = BytesMut::new();
        let connect = Packet::Connect(Box::new(connect));
        if let Some(t) = &opts.trace {
            (t.0)("sending CONNECT");
        }
        connect
            .encode(v, &mut buf)
            .map_err(|e| Error::Protocol(format!("CONNECT: {e}")))?;
        stream.write_all(&buf).await.map_err(Error::Connect)?;
        stream.flush().await.map_err(Error::Connect)?;
        let max = opts.maximum_packet_size.unwrap_or(MAX_PACKET_SIZE);
        let mut rbuf = BytesMut::with_capacity(READ_CHUNK);
        loop {
            match decode(&mut rbuf, v, max) {
                Ok(Some(Packet::ConnAck(ack))) => {
                    if let Some(t) = &opts.trace {
                        (t.0)(&format!("received CONNACK ({})", ack.reason as u8));
                    }
                    if ack.reason.is_error() {
                        return Err(Error::Refused {
                            reason: ack.reason,
                            reason_string: ack.properties.reason_string.map(|s| s.to_string()),
                        });
                    }
                    return Ok((stream, ack, rbuf));
                }
                Ok(Some(Packet::Auth(_))) => {
                    return Err(Error::NotSupported("enhanced authentication (AUTH)"));
                }
                Ok(Some(p)) => {
                    return Err(Error::Protocol(format!(
                        "expected CONNACK, got {}",
                        p.name()
                    )));
                }
                Ok(None) => {
                    let n = stream.read_buf(&mut rbuf).await.map_err(Error::Connect)?;
                    if n == 0 {
                        return Err(Error::Connect(std::io::Error::new(
                            std::io::ErrorKind::UnexpectedEof,
                            "the broker closed the connection before CONNACK",
                        )));
                    }
                }
                Err(e) => return Err(Error::Protocol(format!("CONNACK: {e}"))),
            }
        }
    };
    match tokio::time::timeout(timeout, work).await {
        Ok(r) => r,
        Err(_) => Err(Error::Timeout),
    }
}

fn build_connect(
    opts: &ClientOptions,
    client_id: String,
    clean_start: bool,
) -> Result<Connect, Error> {
    let v5 = opts.protocol.is_v5();
    let will = match &opts.will {
        Some(w) => Some(Will {
            topic: TopicName::new(w.topic.clone())?,
            payload: w.payload.clone(),
            qos: w.qos,
            retain: w.retain,
            delay_interval: opts.will_delay,
            properties: w.properties.clone(),
        }),
        None => None,
    };
    let mut properties = Properties::default();
    if v5 {
        properties.session_expiry_interval =
            (opts.session_expiry > 0).then_some(opts.session_expiry);
        properties.receive_maximum =
            (opts.receive_maximum != u16::MAX).then_some(opts.receive_maximum.max(1));
        properties.maximum_packet_size = opts.maximum_packet_size;
        properties.topic_alias_maximum =
            (opts.topic_alias_maximum > 0).then_some(opts.topic_alias_maximum);
        properties.request_response_information = opts.request_response_information.then_some(true);
        properties.request_problem_information = opts.request_problem_information;
        properties.user_properties = opts
            .user_properties
            .iter()
            .map(|(k, v)| (ByteString::from(k.as_str()), ByteString::from(v.as_str())))
            .collect();
    }
    Ok(Connect {
        protocol: opts.protocol,
        clean_start,
        keep_alive: u16::try_from(opts.keep_alive.as_secs()).unwrap_or(u16::MAX),
        client_id: ClientId::new(client_id)
            .map_err(|e| Error::Protocol(format!("client id: {e}")))?,
        will,
        username: opts.username.as_deref().map(ByteString::from),
        password: opts.password.clone(),
        properties,
    })
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
