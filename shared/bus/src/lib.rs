//! Messages between gantry's functions.
//!
//! gantry *sends* its own messages instead of using Functions output bindings,
//! because only a direct send can set `MessageId` (duplicate detection),
//! `SessionId` (per-app ordering) and `ScheduledEnqueueTimeUtc` (backoff).
//! Receiving is the Functions host's job in Azure, and the embedded queue's job
//! in `gantry dev`.

use std::collections::BTreeMap;

use async_trait::async_trait;
use time::OffsetDateTime;

pub mod embedded;
pub mod servicebus;

pub use embedded::{
    Clock, DeadLettered, EmbeddedBus, LockToken, MessageState, MessageView, QueueOptions,
    QueueStats, Received, SystemClock,
};
pub use servicebus::ServiceBusRest;

/// Queue names gantry uses (DESIGN.md §1). Only these may be sent to.
pub const QUEUES: &[&str] = &[
    "registry-events",
    "security-events",
    "scan",
    "policy",
    "deploy",
    "alerts",
];

/// Header names an application property may not take, because the REST sender
/// uses them itself or HTTP gives them a meaning of their own.
const RESERVED_PROPERTY_NAMES: &[&str] = &[
    "accept",
    "authorization",
    "brokerproperties",
    "connection",
    "content-encoding",
    "content-length",
    "content-type",
    "date",
    "expect",
    "host",
    "keep-alive",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "user-agent",
    "x-ms-retrypolicy",
];

/// Queues whose messages carry a `SessionId` (per-app ordering of deploys).
pub const SESSION_QUEUES: &[&str] = &["deploy"];

/// One message to send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutMessage {
    /// Destination queue; one of [`QUEUES`].
    pub queue: String,
    /// The body, JSON in every gantry message.
    pub body: Vec<u8>,
    /// Service Bus `MessageId`: duplicates within the detection window are dropped.
    pub message_id: Option<String>,
    /// Service Bus `SessionId`: messages of one session are delivered one at a
    /// time, in order.
    pub session_id: Option<String>,
    /// Do not deliver before this instant (`ScheduledEnqueueTimeUtc`).
    pub scheduled_enqueue_time: Option<OffsetDateTime>,
    /// Application properties (e.g. trace context, run id).
    pub properties: BTreeMap<String, String>,
}

impl OutMessage {
    /// A JSON message for `queue` with no id, session, schedule or properties.
    pub fn json(queue: impl Into<String>, body: &impl serde::Serialize) -> Result<Self, BusError> {
        let queue = queue.into();
        let body = serde_json::to_vec(body).map_err(|e| BusError::Send {
            queue: queue.clone(),
            message: format!("serialising the body: {e}"),
            transient: false,
        })?;
        Ok(OutMessage {
            queue,
            body,
            message_id: None,
            session_id: None,
            scheduled_enqueue_time: None,
            properties: BTreeMap::new(),
        })
    }

    /// Sets the `MessageId`.
    pub fn with_id(mut self, id: impl Into<String>) -> Self {
        self.message_id = Some(id.into());
        self
    }

    /// Sets the `SessionId`.
    pub fn with_session(mut self, session: impl Into<String>) -> Self {
        self.session_id = Some(session.into());
        self
    }

    /// Schedules delivery for `at`.
    pub fn scheduled_at(mut self, at: OffsetDateTime) -> Self {
        self.scheduled_enqueue_time = Some(at);
        self
    }

    /// Adds an application property.
    pub fn with_property(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.properties.insert(key.into(), value.into());
        self
    }
}

/// Why a bus operation failed. Variants are named after the operation.
#[derive(Debug, thiserror::Error)]
pub enum BusError {
    /// Sending a message failed.
    #[error("sending to queue {queue} failed: {message}")]
    Send {
        /// The destination queue.
        queue: String,
        /// What went wrong (never contains credentials).
        message: String,
        /// Whether a retry may succeed.
        transient: bool,
    },
    /// The queue name is not one gantry knows, or the message is malformed.
    #[error("invalid message for queue {queue:?}: {reason}")]
    InvalidMessage {
        /// The destination queue.
        queue: String,
        /// What is wrong.
        reason: String,
    },
    /// Opening or configuring the bus failed (bad connection string, unreadable state).
    #[error("opening the message bus failed: {message}")]
    Open {
        /// What went wrong (never contains credentials).
        message: String,
    },
    /// Receiving from the embedded queue failed (its state could not be written).
    #[error("receiving from queue {queue} failed: {message}")]
    Receive {
        /// The queue.
        queue: String,
        /// What went wrong.
        message: String,
    },
    /// Settling a received message (complete, abandon, dead-letter) failed.
    #[error("settling message {lock} failed: {message}")]
    Settle {
        /// The lock token.
        lock: String,
        /// What went wrong.
        message: String,
    },
}

impl BusError {
    /// Whether retrying (or letting the host redeliver the triggering message) may help.
    pub fn is_transient(&self) -> bool {
        match self {
            BusError::Send { transient, .. } => *transient,
            BusError::InvalidMessage { .. } | BusError::Open { .. } => false,
            BusError::Receive { .. } | BusError::Settle { .. } => true,
        }
    }
}

/// Anything that can send gantry's messages.
#[async_trait]
pub trait MessageBus: Send + Sync + 'static {
    /// Sends one message. Returns once the broker has accepted it durably.
    async fn send(&self, message: OutMessage) -> Result<(), BusError>;
}

/// Checks the message against gantry's queue rules before it leaves the process.
pub fn validate(message: &OutMessage) -> Result<(), BusError> {
    let invalid = |reason: &str| {
        Err(BusError::InvalidMessage {
            queue: message.queue.clone(),
            reason: reason.to_string(),
        })
    };
    if !QUEUES.contains(&message.queue.as_str()) {
        return invalid("unknown queue");
    }
    let sessions = SESSION_QUEUES.contains(&message.queue.as_str());
    if sessions && message.session_id.is_none() {
        return invalid("this queue requires a SessionId");
    }
    if !sessions && message.session_id.is_some() {
        return invalid("this queue does not use sessions");
    }
    // Service Bus limits MessageId and SessionId to 128 characters.
    let out_of_range = |id: &String| id.is_empty() || id.len() > 128;
    if message.message_id.as_ref().is_some_and(out_of_range) {
        return invalid("MessageId must be 1-128 characters");
    }
    if message.session_id.as_ref().is_some_and(out_of_range) {
        return invalid("SessionId must be 1-128 characters");
    }
    for key in message.properties.keys() {
        // Properties travel as HTTP headers on the REST API. HTTP/1 clients send
        // header names lower-cased, so only lower-case names survive the trip
        // unchanged; requiring them here keeps the embedded queue and Service Bus
        // in agreement about what a receiver sees.
        let well_formed = !key.is_empty()
            && key.len() <= 64
            && key
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
        if !well_formed {
            return invalid("property names must be 1-64 characters of [a-z0-9-]");
        }
        if RESERVED_PROPERTY_NAMES.contains(&key.as_str()) {
            return invalid("property name collides with an HTTP or Service Bus header");
        }
    }
    // Standard tier messages are at most 256 KiB including headers.
    if message.body.len() > 192 * 1024 {
        return invalid("body larger than 192 KiB");
    }
    Ok(())
}
