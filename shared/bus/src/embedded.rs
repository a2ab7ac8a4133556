//! The embedded durable queue of `gantry dev`.
//!
//! `gantry dev` replaces the Functions host and Service Bus with this queue, so it
//! copies the Service Bus behaviour gantry's functions rely on: peek-lock with a
//! lock duration, `DeliveryCount` (incremented when a message is locked, as
//! Service Bus does), dead-lettering after `MaxDeliveryCount` failed deliveries
//! (abandon *or* lock expiry), scheduled messages, `MessageId` duplicate
//! detection within a window, and sessions (one message of a session in flight at
//! a time, FIFO within the session).
//!
//! # Design
//!
//! The in-memory index (one [`tokio::sync::Mutex`] per queue) is authoritative;
//! the directory is a faithful mirror written *before* the index changes, so a
//! failed write leaves both as they were. Every file is written to `.tmp/`,
//! flushed with `fsync` and renamed into place, so a crash never leaves a
//! half-written message: a reader sees the old file or the new one.
//! Locks live only in memory: after a restart every message is deliverable again
//! with the delivery count it had, which is how Service Bus treats a lost lock.
//!
//! # Disk layout
//!
//! ```text
//! {dir}/.tmp/                          temp files, emptied by `open`
//! {dir}/{queue}/sequence.json          {"next_sequence_number": N}
//! {dir}/{queue}/messages/{seq}.json    one live message (active, scheduled or locked)
//! {dir}/{queue}/deadletter/{seq}.json  one dead-lettered message, with reason and description
//! {dir}/{queue}/dedup.jsonl            {"message_id", "enqueued_time"} per accepted MessageId
//! ```
//!
//! `{seq}` is the sequence number, zero-padded to 20 digits so names sort. Message
//! bodies are stored base64-encoded. The dedup log is append-only between opens
//! and rewritten (temp + rename) on `open` and when it grows, dropping entries
//! older than the window; a torn last line after a crash is skipped. Give the bus
//! a directory of its own (e.g. `.gantry/bus`).

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::fmt;
use std::future::Future;
use std::io::{self, Write as _};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use tokio::sync::{Mutex, Notify};

use crate::{BusError, MessageBus, OutMessage, QUEUES, SESSION_QUEUES, validate};

/// The dead-letter reason Service Bus records when a message ran out of deliveries.
pub const MAX_DELIVERY_COUNT_EXCEEDED: &str = "MaxDeliveryCountExceeded";

/// Where the embedded bus reads the time.
///
/// Production uses [`SystemClock`]; tests substitute a manual clock so lock
/// expiry, scheduling and the dedup window can be exercised without sleeping.
pub trait Clock: Send + Sync + 'static {
    /// The current instant.
    fn now(&self) -> OffsetDateTime;
}

/// The wall clock. Scheduled times arrive as wall-clock instants from senders,
/// so the bus compares them against the wall clock too.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> OffsetDateTime {
        OffsetDateTime::now_utc()
    }
}

/// Per-queue settings, named and defaulted like the Service Bus queue properties.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueOptions {
    /// How long a received message stays locked (`LockDuration`, default 60 s).
    pub lock_duration: Duration,
    /// Deliveries before a message is dead-lettered (`MaxDeliveryCount`, default 10).
    pub max_delivery_count: u32,
    /// How long a `MessageId` is remembered (`DuplicateDetectionHistoryTimeWindow`,
    /// default 10 minutes).
    pub duplicate_detection_window: Duration,
}

impl Default for QueueOptions {
    fn default() -> Self {
        QueueOptions {
            lock_duration: Duration::from_secs(60),
            max_delivery_count: 10,
            duplicate_detection_window: Duration::from_secs(600),
        }
    }
}

/// Proof of holding the peek-lock on one received message.
///
/// It names the queue and sequence number so settling finds the message without
/// a global index; the random nonce makes a token useless once the lock has
/// expired and the message was locked again. `Display`/`FromStr` round-trip, so a
/// token can pass through text (e.g. a dev HTTP endpoint).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct LockToken {
    queue: String,
    sequence_number: i64,
    nonce: String,
}

impl LockToken {
    /// The queue the locked message is on.
    pub fn queue(&self) -> &str {
        &self.queue
    }

    /// The sequence number of the locked message.
    pub fn sequence_number(&self) -> i64 {
        self.sequence_number
    }
}

impl fmt::Display for LockToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}:{}", self.queue, self.sequence_number, self.nonce)
    }
}

impl FromStr for LockToken {
    type Err = BusError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || BusError::Settle {
            lock: s.to_string(),
            message: "not a lock token".to_string(),
        };
        let mut parts = s.splitn(3, ':');
        let (Some(queue), Some(seq), Some(nonce)) = (parts.next(), parts.next(), parts.next())
        else {
            return Err(bad());
        };
        let sequence_number = seq.parse().map_err(|_| bad())?;
        if queue.is_empty() || nonce.is_empty() {
            return Err(bad());
        }
        Ok(LockToken {
            queue: queue.to_string(),
            sequence_number,
            nonce: nonce.to_string(),
        })
    }
}

/// A message handed out by [`EmbeddedBus::receive`], locked until `locked_until`.
#[derive(Debug, Clone)]
pub struct Received {
    /// Settle the message with this token.
    pub lock: LockToken,
    /// The queue it came from.
    pub queue: String,
    /// `MessageId` (generated when the sender set none).
    pub message_id: String,
    /// `SessionId`, on session queues.
    pub session_id: Option<String>,
    /// How many times the message has been locked, this time included.
    pub delivery_count: u32,
    /// Service Bus `SequenceNumber`: unique and increasing per queue.
    pub sequence_number: i64,
    /// When the message was sent.
    pub enqueued_time: OffsetDateTime,
    /// When the lock expires unless renewed.
    pub locked_until: OffsetDateTime,
    /// The body.
    pub body: Vec<u8>,
    /// Application properties.
    pub properties: BTreeMap<String, String>,
}

/// Message counts of one queue, for `gantry dev` status pages.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct QueueStats {
    /// Deliverable now (or waiting only for their session to be free).
    pub active: usize,
    /// Waiting for their scheduled time.
    pub scheduled: usize,
    /// Locked by a receiver.
    pub locked: usize,
    /// In the dead-letter queue.
    pub dead_lettered: usize,
}

/// Where a live message stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum MessageState {
    /// Waiting to be received.
    Active,
    /// Waiting for its scheduled enqueue time.
    Scheduled,
    /// Held by a receiver.
    Locked,
}

/// A non-locking look at a live message (Service Bus "peek").
#[derive(Debug, Clone, Serialize)]
pub struct MessageView {
    /// Sequence number.
    pub sequence_number: i64,
    /// `MessageId`.
    pub message_id: String,
    /// `SessionId`.
    pub session_id: Option<String>,
    /// Deliveries so far.
    pub delivery_count: u32,
    /// When it was sent.
    #[serde(with = "time::serde::rfc3339")]
    pub enqueued_time: OffsetDateTime,
    /// When it becomes deliverable, if scheduled.
    #[serde(with = "time::serde::rfc3339::option")]
    pub scheduled_enqueue_time: Option<OffsetDateTime>,
    /// When its lock expires, if locked.
    #[serde(with = "time::serde::rfc3339::option")]
    pub locked_until: Option<OffsetDateTime>,
    /// Active, scheduled or locked.
    pub state: MessageState,
    /// The body as text (invalid UTF-8 replaced), for display.
    pub body: String,
    /// Application properties.
    pub properties: BTreeMap<String, String>,
}

/// A message in a queue's dead-letter queue.
#[derive(Debug, Clone, Serialize)]
pub struct DeadLettered {
    /// Sequence number.
    pub sequence_number: i64,
    /// `MessageId`.
    pub message_id: String,
    /// `SessionId`.
    pub session_id: Option<String>,
    /// Deliveries before it was dead-lettered.
    pub delivery_count: u32,
    /// When it was sent.
    #[serde(with = "time::serde::rfc3339")]
    pub enqueued_time: OffsetDateTime,
    /// When it was dead-lettered.
    #[serde(with = "time::serde::rfc3339")]
    pub dead_lettered_time: OffsetDateTime,
    /// `DeadLetterReason`.
    pub reason: String,
    /// `DeadLetterErrorDescription`.
    pub description: String,
    /// The body as text (invalid UTF-8 replaced), for display.
    pub body: String,
    /// Application properties.
    pub properties: BTreeMap<String, String>,
}

/// The durable queue of `gantry dev`. Cheap to clone; clones share the queues.
#[derive(Clone)]
pub struct EmbeddedBus {
    shared: Arc<Shared>,
}

struct Shared {
    root: PathBuf,
    tmp: PathBuf,
    options: QueueOptions,
    clock: Arc<dyn Clock>,
    queues: BTreeMap<&'static str, Mutex<QueueState>>,
    notify: Notify,
    tmp_counter: AtomicU64,
}

impl fmt::Debug for EmbeddedBus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EmbeddedBus")
            .field("dir", &self.shared.root)
            .field("options", &self.shared.options)
            .finish_non_exhaustive()
    }
}

impl EmbeddedBus {
    /// Opens (creating if needed) the queues under `dir`, using the wall clock.
    pub async fn open(dir: impl Into<PathBuf>, options: QueueOptions) -> Result<Self, BusError> {
        Self::open_with_clock(dir, options, Arc::new(SystemClock)).await
    }

    /// Opens the queues under `dir`, reading time from `clock`.
    ///
    /// Messages that already used up their deliveries (a lock lost in a crash
    /// counts as a failed delivery) are dead-lettered here.
    pub async fn open_with_clock(
        dir: impl Into<PathBuf>,
        options: QueueOptions,
        clock: Arc<dyn Clock>,
    ) -> Result<Self, BusError> {
        let root: PathBuf = dir.into();
        let tmp = root.join(".tmp");
        let now = clock.now();
        let loaded = {
            let (dir, tmp, options) = (root.clone(), tmp.clone(), options.clone());
            blocking(move || load_all(&dir, &tmp, &options, now))
                .await
                .map_err(|e| BusError::Open {
                    message: format!("loading queue state from {}: {e}", root.display()),
                })?
        };
        let queues = loaded
            .into_iter()
            .map(|state| (state.name, Mutex::new(state)))
            .collect();
        let bus = EmbeddedBus {
            shared: Arc::new(Shared {
                root,
                tmp,
                options,
                clock,
                queues,
                notify: Notify::new(),
                tmp_counter: AtomicU64::new(0),
            }),
        };
        for queue in QUEUES {
            let mut state = bus.state(queue)?.lock().await;
            bus.reap(&mut state, now)
                .await
                .map_err(|e| BusError::Open {
                    message: format!("dead-lettering exhausted messages of {queue}: {e}"),
                })?;
        }
        Ok(bus)
    }

    /// The options the queues run with.
    pub fn options(&self) -> &QueueOptions {
        &self.shared.options
    }

    /// The directory holding the queues.
    pub fn dir(&self) -> &Path {
        &self.shared.root
    }

    /// Locks and returns the next deliverable message of `queue`, or `None`.
    ///
    /// Never waits: combine with [`EmbeddedBus::notified`] and
    /// [`EmbeddedBus::next_due`] to sleep until something may be deliverable.
    /// The incremented delivery count is written to disk before the message is
    /// handed out, so a crash while it is being processed still counts.
    pub async fn receive(&self, queue: &str) -> Result<Option<Received>, BusError> {
        let receive_error = |message: String| BusError::Receive {
            queue: queue.to_string(),
            message,
        };
        let mut state = self.state(queue)?.lock().await;
        let now = self.now();
        self.reap(&mut state, now)
            .await
            .map_err(|e| receive_error(format!("dead-lettering exhausted messages: {e}")))?;
        let Some(seq) = state.next_deliverable(now) else {
            return Ok(None);
        };
        let nonce = random_hex().map_err(|e| receive_error(format!("lock token: {e}")))?;
        let Some(live) = state.live.get(&seq) else {
            return Ok(None);
        };
        let mut record = live.record.clone();
        record.delivery_count = record.delivery_count.saturating_add(1);
        let path = state.message_path(seq);
        self.write_json(&path, &record)
            .await
            .map_err(|e| receive_error(format!("recording the delivery: {e}")))?;
        let locked_until = now + self.shared.options.lock_duration;
        let Some(live) = state.live.get_mut(&seq) else {
            return Ok(None);
        };
        live.record = record;
        live.lock = Some(Lock {
            nonce: nonce.clone(),
            until: locked_until,
        });
        let record = &live.record;
        Ok(Some(Received {
            lock: LockToken {
                queue: queue.to_string(),
                sequence_number: seq,
                nonce,
            },
            queue: queue.to_string(),
            message_id: record.message_id.clone(),
            session_id: record.session_id.clone(),
            delivery_count: record.delivery_count,
            sequence_number: seq,
            enqueued_time: record.enqueued_time,
            locked_until,
            body: record.body.clone(),
            properties: record.properties.clone(),
        }))
    }

    /// Removes a processed message. Fails with [`BusError::Settle`] when the lock
    /// expired or is unknown (the message may already be with another receiver).
    pub async fn complete(&self, lock: &LockToken) -> Result<(), BusError> {
        let mut state = self.settle_state(lock)?.lock().await;
        let now = self.now();
        state.check_lock(lock, now)?;
        let path = state.message_path(lock.sequence_number);
        blocking(move || remove_if_exists(&path))
            .await
            .map_err(|e| settle_error(lock, format!("removing the message: {e}")))?;
        state.live.remove(&lock.sequence_number);
        drop(state);
        self.shared.notify.notify_waiters();
        Ok(())
    }

    /// Releases the lock so the message is delivered again, or dead-letters it
    /// with reason `MaxDeliveryCountExceeded` when it has had its deliveries.
    pub async fn abandon(&self, lock: &LockToken) -> Result<(), BusError> {
        let mut state = self.settle_state(lock)?.lock().await;
        let now = self.now();
        state.check_lock(lock, now)?;
        if let Some(live) = state.live.get_mut(&lock.sequence_number) {
            live.lock = None;
        }
        // The message is unlocked either way; if dead-lettering fails here the
        // next receive retries it (see `reap`).
        let result = self.reap(&mut state, now).await;
        drop(state);
        self.shared.notify.notify_waiters();
        result.map_err(|e| settle_error(lock, format!("dead-lettering: {e}")))
    }

    /// Moves the message to the dead-letter queue with `reason` and `description`.
    pub async fn dead_letter(
        &self,
        lock: &LockToken,
        reason: &str,
        description: &str,
    ) -> Result<(), BusError> {
        let mut state = self.settle_state(lock)?.lock().await;
        let now = self.now();
        state.check_lock(lock, now)?;
        self.move_to_dead_letter(&mut state, lock.sequence_number, reason, description, now)
            .await
            .map_err(|e| settle_error(lock, format!("dead-lettering: {e}")))?;
        drop(state);
        self.shared.notify.notify_waiters();
        Ok(())
    }

    /// Extends the lock by the lock duration from now; returns the new expiry.
    pub async fn renew_lock(&self, lock: &LockToken) -> Result<OffsetDateTime, BusError> {
        let mut state = self.settle_state(lock)?.lock().await;
        let now = self.now();
        state.check_lock(lock, now)?;
        let until = now + self.shared.options.lock_duration;
        if let Some(held) = state
            .live
            .get_mut(&lock.sequence_number)
            .and_then(|live| live.lock.as_mut())
        {
            held.until = until;
        }
        Ok(until)
    }

    /// Resolves when something may have become deliverable: a message was sent,
    /// or one was completed, abandoned or dead-lettered (which can free a
    /// session). Scheduled times and lock expiries are *not* signalled; sleep
    /// until [`EmbeddedBus::next_due`] for those.
    ///
    /// Create the future *before* calling `receive`, then await it: a change in
    /// between is not missed, because the future is registered on creation.
    pub fn notified(&self) -> impl Future<Output = ()> + Send + '_ {
        self.shared.notify.notified()
    }

    /// The earliest future instant at which `queue` changes by itself: a
    /// scheduled message comes due or a lock expires. `None` when nothing is
    /// pending (or the queue is unknown).
    pub async fn next_due(&self, queue: &str) -> Option<OffsetDateTime> {
        let mut state = self.state(queue).ok()?.lock().await;
        let now = self.now();
        self.reap_logged(&mut state, now).await;
        state
            .live
            .values()
            .filter_map(|live| match &live.lock {
                Some(lock) => Some(lock.until),
                None => live.record.scheduled_enqueue_time.filter(|t| *t > now),
            })
            .min()
    }

    /// Message counts of `queue` (all zero for an unknown queue).
    pub async fn stats(&self, queue: &str) -> QueueStats {
        let Ok(state) = self.state(queue) else {
            return QueueStats::default();
        };
        let mut state = state.lock().await;
        let now = self.now();
        self.reap_logged(&mut state, now).await;
        let mut stats = QueueStats {
            dead_lettered: state.dead.len(),
            ..QueueStats::default()
        };
        for live in state.live.values() {
            match live.state(now) {
                MessageState::Active => stats.active += 1,
                MessageState::Scheduled => stats.scheduled += 1,
                MessageState::Locked => stats.locked += 1,
            }
        }
        stats
    }

    /// The live messages of `queue` in sequence order, without locking them.
    pub async fn peek(&self, queue: &str) -> Vec<MessageView> {
        let Ok(state) = self.state(queue) else {
            return Vec::new();
        };
        let mut state = state.lock().await;
        let now = self.now();
        self.reap_logged(&mut state, now).await;
        state
            .live
            .values()
            .map(|live| {
                let record = &live.record;
                MessageView {
                    sequence_number: record.sequence_number,
                    message_id: record.message_id.clone(),
                    session_id: record.session_id.clone(),
                    delivery_count: record.delivery_count,
                    enqueued_time: record.enqueued_time,
                    scheduled_enqueue_time: record.scheduled_enqueue_time,
                    locked_until: live.lock.as_ref().map(|lock| lock.until),
                    state: live.state(now),
                    body: String::from_utf8_lossy(&record.body).into_owned(),
                    properties: record.properties.clone(),
                }
            })
            .collect()
    }

    /// The dead-letter queue of `queue` in sequence order.
    pub async fn dead_letters(&self, queue: &str) -> Vec<DeadLettered> {
        let Ok(state) = self.state(queue) else {
            return Vec::new();
        };
        let mut state = state.lock().await;
        let now = self.now();
        self.reap_logged(&mut state, now).await;
        state
            .dead
            .values()
            .map(|dead| {
                let record = &dead.message;
                DeadLettered {
                    sequence_number: record.sequence_number,
                    message_id: record.message_id.clone(),
                    session_id: record.session_id.clone(),
                    delivery_count: record.delivery_count,
                    enqueued_time: record.enqueued_time,
                    dead_lettered_time: dead.dead_lettered_time,
                    reason: dead.dead_letter_reason.clone(),
                    description: dead.dead_letter_error_description.clone(),
                    body: String::from_utf8_lossy(&record.body).into_owned(),
                    properties: record.properties.clone(),
                }
            })
            .collect()
    }

    fn now(&self) -> OffsetDateTime {
        self.shared.clock.now()
    }

    fn state(&self, queue: &str) -> Result<&Mutex<QueueState>, BusError> {
        self.shared
            .queues
            .get(queue)
            .ok_or_else(|| BusError::InvalidMessage {
                queue: queue.to_string(),
                reason: "unknown queue".to_string(),
            })
    }

    fn settle_state(&self, lock: &LockToken) -> Result<&Mutex<QueueState>, BusError> {
        self.shared
            .queues
            .get(lock.queue.as_str())
            .ok_or_else(|| settle_error(lock, "unknown queue".to_string()))
    }

    /// Releases expired locks, then dead-letters every unlocked message that has
    /// had all its deliveries. Service Bus counts a lock expiry as a failed
    /// delivery, so an expired lock on the last delivery dead-letters too. Doing
    /// this lazily, whenever a queue is looked at, keeps the bus free of timers.
    async fn reap(&self, state: &mut QueueState, now: OffsetDateTime) -> io::Result<()> {
        for live in state.live.values_mut() {
            if live.lock.as_ref().is_some_and(|lock| lock.until <= now) {
                live.lock = None;
            }
        }
        let max = self.shared.options.max_delivery_count;
        let exhausted: Vec<i64> = state
            .live
            .values()
            .filter(|live| live.lock.is_none() && live.record.delivery_count >= max)
            .map(|live| live.record.sequence_number)
            .collect();
        for seq in exhausted {
            let description =
                format!("Message could not be consumed after {max} delivery attempts.");
            self.move_to_dead_letter(state, seq, MAX_DELIVERY_COUNT_EXCEEDED, &description, now)
                .await?;
        }
        Ok(())
    }

    /// [`Self::reap`] for read-only views, which have no error to report.
    async fn reap_logged(&self, state: &mut QueueState, now: OffsetDateTime) {
        if let Err(e) = self.reap(state, now).await {
            tracing::warn!(queue = state.name, error = %e, "dead-lettering exhausted messages failed");
        }
    }

    /// Writes the dead-letter file, then removes the live one. If the removal
    /// fails the dead-letter copy wins on the next `open`.
    async fn move_to_dead_letter(
        &self,
        state: &mut QueueState,
        seq: i64,
        reason: &str,
        description: &str,
        now: OffsetDateTime,
    ) -> io::Result<()> {
        let Some(live) = state.live.get(&seq) else {
            return Ok(());
        };
        let dead = DeadRecord {
            message: live.record.clone(),
            dead_letter_reason: reason.to_string(),
            dead_letter_error_description: description.to_string(),
            dead_lettered_time: now,
        };
        self.write_json(&state.dead_letter_path(seq), &dead).await?;
        let live_path = state.message_path(seq);
        if let Err(e) = blocking(move || remove_if_exists(&live_path)).await {
            tracing::warn!(queue = state.name, seq, error = %e,
                "dead-lettered message left a live copy; it is dropped on the next open");
        }
        state.live.remove(&seq);
        state.dead.insert(seq, dead);
        tracing::info!(queue = state.name, seq, reason, "message dead-lettered");
        Ok(())
    }

    async fn write_json(&self, target: &Path, value: &impl Serialize) -> io::Result<()> {
        let bytes = serde_json::to_vec_pretty(value).map_err(io::Error::other)?;
        let tmp = self.tmp_path();
        let target = target.to_path_buf();
        blocking(move || write_atomic(&tmp, &target, &bytes)).await
    }

    fn tmp_path(&self) -> PathBuf {
        let n = self.shared.tmp_counter.fetch_add(1, Ordering::Relaxed);
        self.shared
            .tmp
            .join(format!("{}-{n}.tmp", std::process::id()))
    }
}

#[async_trait]
impl MessageBus for EmbeddedBus {
    async fn send(&self, message: OutMessage) -> Result<(), BusError> {
        validate(&message)?;
        let queue = message.queue.clone();
        // Local disk trouble may pass (disk full, a file briefly locked).
        let send_error = |text: String| BusError::Send {
            queue: queue.clone(),
            message: text,
            transient: true,
        };
        let mut state = self.state(&message.queue)?.lock().await;
        let now = self.now();
        let window = self.shared.options.duplicate_detection_window;
        state.dedup.prune(now, window);
        let duplicate = message
            .message_id
            .as_ref()
            .filter(|id| state.dedup.ids.contains_key(*id));
        if let Some(id) = duplicate {
            tracing::debug!(
                queue = state.name,
                message_id = id,
                "duplicate message dropped"
            );
            return Ok(());
        }
        let message_id = match &message.message_id {
            Some(id) => id.clone(),
            None => random_hex().map_err(|e| send_error(format!("generating a MessageId: {e}")))?,
        };
        let seq = state.next_sequence;
        // Reserve the sequence number first, so it is never reused even if the
        // message write below fails.
        let sequence_path = state.dir.join("sequence.json");
        self.write_json(
            &sequence_path,
            &SequenceFile {
                next_sequence_number: seq + 1,
            },
        )
        .await
        .map_err(|e| send_error(format!("reserving a sequence number: {e}")))?;
        state.next_sequence = seq + 1;
        let record = MessageRecord {
            sequence_number: seq,
            message_id: message_id.clone(),
            session_id: message.session_id,
            enqueued_time: now,
            scheduled_enqueue_time: message.scheduled_enqueue_time,
            delivery_count: 0,
            properties: message.properties,
            body: message.body,
        };
        self.write_json(&state.message_path(seq), &record)
            .await
            .map_err(|e| send_error(format!("writing the message: {e}")))?;
        state.live.insert(seq, Live { record, lock: None });
        if message.message_id.is_some() {
            // The message is durable already; losing this line in a crash is
            // covered by `open`, which also remembers the ids of stored messages.
            if let Err(e) = self.record_message_id(&mut state, message_id, now).await {
                tracing::warn!(queue = state.name, error = %e, "appending to the dedup log failed");
            }
        }
        drop(state);
        self.shared.notify.notify_waiters();
        Ok(())
    }
}

impl EmbeddedBus {
    async fn record_message_id(
        &self,
        state: &mut QueueState,
        message_id: String,
        now: OffsetDateTime,
    ) -> io::Result<()> {
        state.dedup.insert(message_id.clone(), now);
        let window = self.shared.options.duplicate_detection_window;
        let path = state.dedup_path();
        if state.dedup.log_lines > 1000 && state.dedup.log_lines > 2 * state.dedup.ids.len() {
            let entries = state.dedup.entries();
            let bytes = dedup_log_bytes(&entries)?;
            let tmp = self.tmp_path();
            blocking(move || write_atomic(&tmp, &path, &bytes)).await?;
            state.dedup.log_lines = entries.len();
            tracing::debug!(
                queue = state.name,
                entries = entries.len(),
                ?window,
                "dedup log compacted"
            );
        } else {
            let line = dedup_log_bytes(&[DedupEntry {
                message_id,
                enqueued_time: now,
            }])?;
            blocking(move || append_synced(&path, &line)).await?;
            state.dedup.log_lines += 1;
        }
        Ok(())
    }
}

fn settle_error(lock: &LockToken, message: String) -> BusError {
    BusError::Settle {
        lock: lock.to_string(),
        message,
    }
}

/// One queue's authoritative state.
struct QueueState {
    name: &'static str,
    dir: PathBuf,
    sessions: bool,
    next_sequence: i64,
    live: BTreeMap<i64, Live>,
    dead: BTreeMap<i64, DeadRecord>,
    dedup: Dedup,
}

struct Live {
    record: MessageRecord,
    lock: Option<Lock>,
}

struct Lock {
    nonce: String,
    until: OffsetDateTime,
}

impl Live {
    fn state(&self, now: OffsetDateTime) -> MessageState {
        if self.lock.is_some() {
            MessageState::Locked
        } else if self.record.scheduled_enqueue_time.is_some_and(|t| t > now) {
            MessageState::Scheduled
        } else {
            MessageState::Active
        }
    }
}

impl QueueState {
    fn message_path(&self, seq: i64) -> PathBuf {
        self.dir.join("messages").join(file_name(seq))
    }

    fn dead_letter_path(&self, seq: i64) -> PathBuf {
        self.dir.join("deadletter").join(file_name(seq))
    }

    fn dedup_path(&self) -> PathBuf {
        self.dir.join("dedup.jsonl")
    }

    /// The lowest sequence number that is due, unlocked and - on session queues -
    /// of a session with nothing in flight. Because any due message of a session
    /// sorts before its later ones, the first free one found is the session's
    /// head: FIFO per session, and an abandoned message stays in front.
    fn next_deliverable(&self, now: OffsetDateTime) -> Option<i64> {
        let busy: BTreeSet<&str> = if self.sessions {
            self.live
                .values()
                .filter(|live| live.lock.is_some())
                .filter_map(|live| live.record.session_id.as_deref())
                .collect()
        } else {
            BTreeSet::new()
        };
        self.live
            .values()
            .find(|live| {
                live.state(now) == MessageState::Active
                    && !live
                        .record
                        .session_id
                        .as_deref()
                        .is_some_and(|s| self.sessions && busy.contains(s))
            })
            .map(|live| live.record.sequence_number)
    }

    fn check_lock(&self, token: &LockToken, now: OffsetDateTime) -> Result<(), BusError> {
        let held = self
            .live
            .get(&token.sequence_number)
            .and_then(|live| live.lock.as_ref())
            .filter(|lock| lock.nonce == token.nonce);
        match held {
            Some(lock) if lock.until > now => Ok(()),
            Some(_) => Err(settle_error(token, "the lock has expired".to_string())),
            None => Err(settle_error(
                token,
                "the lock is unknown, expired or already settled".to_string(),
            )),
        }
    }
}

/// Remembered `MessageId`s, oldest first, for duplicate detection.
#[derive(Default)]
struct Dedup {
    ids: HashMap<String, OffsetDateTime>,
    order: VecDeque<(OffsetDateTime, String)>,
    log_lines: usize,
}

impl Dedup {
    fn insert(&mut self, id: String, at: OffsetDateTime) {
        self.ids.insert(id.clone(), at);
        self.order.push_back((at, id));
    }

    /// Forgets ids older than the window. An id re-accepted after its window has
    /// a newer time in `ids`, so its stale `order` entry leaves it alone.
    fn prune(&mut self, now: OffsetDateTime, window: Duration) {
        while let Some((at, id)) = self.order.front() {
            if *at + window > now {
                break;
            }
            if self.ids.get(id) == Some(at) {
                self.ids.remove(id);
            }
            self.order.pop_front();
        }
    }

    fn entries(&self) -> Vec<DedupEntry> {
        self.order
            .iter()
            .filter(|(at, id)| self.ids.get(id) == Some(at))
            .map(|(at, id)| DedupEntry {
                message_id: id.clone(),
                enqueued_time: *at,
            })
            .collect()
    }
}

/// A message as stored in `messages/{seq}.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct MessageRecord {
    sequence_number: i64,
    message_id: String,
    #[serde(default)]
    session_id: Option<String>,
    #[serde(with = "time::serde::rfc3339")]
    enqueued_time: OffsetDateTime,
    #[serde(default, with = "time::serde::rfc3339::option")]
    scheduled_enqueue_time: Option<OffsetDateTime>,
    delivery_count: u32,
    #[serde(default)]
    properties: BTreeMap<String, String>,
    #[serde(with = "base64_body")]
    body: Vec<u8>,
}

/// A message as stored in `deadletter/{seq}.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct DeadRecord {
    #[serde(flatten)]
    message: MessageRecord,
    dead_letter_reason: String,
    dead_letter_error_description: String,
    #[serde(with = "time::serde::rfc3339")]
    dead_lettered_time: OffsetDateTime,
}

#[derive(Serialize, Deserialize)]
struct SequenceFile {
    next_sequence_number: i64,
}

#[derive(Serialize, Deserialize)]
struct DedupEntry {
    message_id: String,
    #[serde(with = "time::serde::rfc3339")]
    enqueued_time: OffsetDateTime,
}

mod base64_body {
    use base64::Engine as _;
    use base64::engine::general_purpose::STANDARD;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(body: &[u8], serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&STANDARD.encode(body))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Vec<u8>, D::Error> {
        let text = String::deserialize(deserializer)?;
        STANDARD.decode(text).map_err(serde::de::Error::custom)
    }
}

fn file_name(seq: i64) -> String {
    format!("{seq:020}.json")
}

fn dedup_log_bytes(entries: &[DedupEntry]) -> io::Result<Vec<u8>> {
    let mut out = Vec::new();
    for entry in entries {
        serde_json::to_writer(&mut out, entry).map_err(io::Error::other)?;
        out.push(b'\n');
    }
    Ok(out)
}

/// 128 random bits as hex: lock nonces and generated `MessageId`s.
fn random_hex() -> Result<String, getrandom::Error> {
    let mut bytes = [0u8; 16];
    getrandom::fill(&mut bytes)?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

/// Runs blocking file work off the async threads.
async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> io::Result<T> + Send + 'static,
) -> io::Result<T> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(io::Error::other)?
}

/// Writes `bytes` to `tmp`, flushes it to disk and renames it over `target`, so
/// `target` holds either its old content or all of the new.
fn write_atomic(tmp: &Path, target: &Path, bytes: &[u8]) -> io::Result<()> {
    let result = (|| {
        let mut file = std::fs::File::create(tmp)?;
        file.write_all(bytes)?;
        file.sync_all()?;
        drop(file);
        std::fs::rename(tmp, target)?;
        // The rename is durable only once the directory entry is on disk.
        sync_dir(target)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(tmp);
    }
    result
}

fn append_synced(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)?;
    file.write_all(bytes)?;
    file.sync_data()
}

/// fsyncs the directory holding `path`, so a rename or removal in it survives
/// a power loss (file contents alone are synced by `sync_all`).
fn sync_dir(path: &Path) -> io::Result<()> {
    match path.parent() {
        Some(dir) => std::fs::File::open(dir)?.sync_all(),
        None => Ok(()),
    }
}

fn remove_if_exists(path: &Path) -> io::Result<()> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        Err(_) => Ok(()),
        // A completed message must not come back after a power loss.
        Ok(()) => sync_dir(path),
    }
}

/// Reads every queue's directory (blocking; runs once in `open`).
fn load_all(
    root: &Path,
    tmp: &Path,
    options: &QueueOptions,
    now: OffsetDateTime,
) -> io::Result<Vec<QueueState>> {
    // Leftovers of writes interrupted by a crash: never renamed, so never live.
    if tmp.exists() {
        std::fs::remove_dir_all(tmp)?;
    }
    std::fs::create_dir_all(tmp)?;
    QUEUES
        .iter()
        .map(|queue| load_queue(root, tmp, queue, options, now))
        .collect()
}

fn load_queue(
    root: &Path,
    tmp: &Path,
    name: &'static str,
    options: &QueueOptions,
    now: OffsetDateTime,
) -> io::Result<QueueState> {
    let dir = root.join(name);
    std::fs::create_dir_all(dir.join("messages"))?;
    std::fs::create_dir_all(dir.join("deadletter"))?;

    let dead: BTreeMap<i64, DeadRecord> = read_records::<DeadRecord>(&dir.join("deadletter"))?
        .into_iter()
        .map(|record| (record.message.sequence_number, record))
        .collect();
    let mut live = BTreeMap::new();
    for (path, record) in read_records_with_paths::<MessageRecord>(&dir.join("messages"))? {
        if dead.contains_key(&record.sequence_number) {
            // A crash between writing the dead letter and removing the live copy.
            remove_if_exists(&path)?;
            continue;
        }
        live.insert(record.sequence_number, Live { record, lock: None });
    }

    let stored_next = match std::fs::read(dir.join("sequence.json")) {
        Ok(bytes) => match serde_json::from_slice::<SequenceFile>(&bytes) {
            Ok(file) => file.next_sequence_number,
            Err(e) => {
                tracing::warn!(queue = name, error = %e, "unreadable sequence.json; recomputing");
                1
            }
        },
        Err(e) if e.kind() == io::ErrorKind::NotFound => 1,
        Err(e) => return Err(e),
    };
    let highest = live.keys().chain(dead.keys()).copied().max().unwrap_or(0);
    let next_sequence = stored_next.max(highest + 1).max(1);

    // Duplicate detection: the log, plus the ids of stored messages (covers a
    // crash between writing a message and logging its id).
    let window = options.duplicate_detection_window;
    let mut entries: Vec<DedupEntry> = Vec::new();
    let dedup_path = dir.join("dedup.jsonl");
    match std::fs::read_to_string(&dedup_path) {
        Ok(text) => {
            for line in text.lines().filter(|l| !l.trim().is_empty()) {
                match serde_json::from_str::<DedupEntry>(line) {
                    Ok(entry) => entries.push(entry),
                    Err(e) => {
                        tracing::warn!(queue = name, error = %e, "skipping a torn dedup log line")
                    }
                }
            }
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    entries.extend(
        live.values()
            .map(|l: &Live| &l.record)
            .chain(dead.values().map(|d| &d.message))
            .map(|record| DedupEntry {
                message_id: record.message_id.clone(),
                enqueued_time: record.enqueued_time,
            }),
    );
    entries.sort_by_key(|entry| entry.enqueued_time);
    let mut dedup = Dedup::default();
    for entry in entries {
        if entry.enqueued_time + window > now {
            // Keep the first sighting: the window runs from the original send.
            if !dedup.ids.contains_key(&entry.message_id) {
                dedup.insert(entry.message_id, entry.enqueued_time);
            }
        }
    }
    let compacted = dedup.entries();
    write_atomic(
        &tmp.join(format!("{name}-dedup.tmp")),
        &dedup_path,
        &dedup_log_bytes(&compacted)?,
    )?;
    dedup.log_lines = compacted.len();

    Ok(QueueState {
        name,
        dir,
        sessions: SESSION_QUEUES.contains(&name),
        next_sequence,
        live,
        dead,
        dedup,
    })
}

fn read_records<T: serde::de::DeserializeOwned>(dir: &Path) -> io::Result<Vec<T>> {
    Ok(read_records_with_paths(dir)?
        .into_iter()
        .map(|(_, record)| record)
        .collect())
}

/// Parses every `*.json` in `dir`. A file that does not parse cannot come from
/// an interrupted write (those never leave `.tmp/`); it is reported and skipped
/// rather than stopping `gantry dev` from starting.
fn read_records_with_paths<T: serde::de::DeserializeOwned>(
    dir: &Path,
) -> io::Result<Vec<(PathBuf, T)>> {
    let mut records = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if path.extension().and_then(|e| e.to_str()) != Some("json") {
            continue;
        }
        let bytes = std::fs::read(&path)?;
        match serde_json::from_slice(&bytes) {
            Ok(record) => records.push((path, record)),
            Err(e) => {
                tracing::warn!(file = %path.display(), error = %e, "skipping unreadable message file");
            }
        }
    }
    Ok(records)
}
