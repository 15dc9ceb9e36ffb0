//! A session's own queue limits: the broker's own sessions (a bridge's store-and-forward
//! queue, `$bridge/...`) are bounded by their bridge's `queue_max_messages`/`_bytes` and
//! overflow policy instead of `max_queued_messages`, and count what they drop.

/// What a session with its own queue limits (a bridge's store-and-forward queue, see
/// [`crate::Broker::set_queue_limits`]) does when the queue is full.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QueuePolicy {
    /// Drop the oldest queued (not in-flight) message, whatever its QoS.
    DropOldest,
    /// Drop the new message.
    DropNew,
    /// Refuse the publish: v5 publishers get PUBACK/PUBREC 0x97, 3.1.1 publishers are
    /// disconnected before the acknowledgement (they keep the message and send it again
    /// after reconnecting); nobody else receives it either.
    Block,
}

/// A session's own queue limits and what they dropped (`Inner::queue_overrides`).
#[derive(Debug)]
pub(crate) struct OwnQueue {
    pub(crate) limits: QueueOverride,
    /// Dropped by `DropOldest` to make room.
    pub(crate) dropped_oldest: std::sync::atomic::AtomicU64,
    /// Dropped for want of room (`DropNew`, or a will/retained message under `Block`).
    pub(crate) dropped_new: std::sync::atomic::AtomicU64,
    /// Publishes refused under `Block`.
    pub(crate) refused: std::sync::atomic::AtomicU64,
}

impl OwnQueue {
    pub(crate) fn new(limits: QueueOverride) -> Self {
        OwnQueue {
            limits,
            dropped_oldest: Default::default(),
            dropped_new: Default::default(),
            refused: Default::default(),
        }
    }
}

/// A session's queue at one moment (`Broker::queue_stats`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct QueueStats {
    /// Messages queued, not yet sent.
    pub depth: usize,
    /// Their cost in bytes (what `max_bytes` bounds).
    pub bytes: usize,
    /// Sent, not yet acknowledged.
    pub in_flight: usize,
    /// Dropped by the `DropOldest` policy.
    pub dropped_oldest: u64,
    /// Dropped for want of room (`DropNew`).
    pub dropped_new: u64,
    /// Publishes refused (`Block`).
    pub refused: u64,
}

/// Queue limits of one session, instead of `max_queued_messages`/`max_queued_bytes`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueOverride {
    /// Most messages queued (in flight not counted).
    pub max_messages: usize,
    /// Most bytes queued (0: no byte limit).
    pub max_bytes: usize,
    /// What a full queue does.
    pub policy: QueuePolicy,
}
