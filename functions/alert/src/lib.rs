//! `alert` (Service Bus `alerts`): turns the alerts every step sends into
//! notifications on the channels `gantry.toml` routes them to — Microsoft
//! Teams (Workflows webhook, Adaptive Card), Slack (incoming webhook, Block
//! Kit), a generic webhook (JSON signed with `X-Gantry-Signature-256`) and
//! GitHub (a commit status `gantry/<step>` of the run's commit; for deploy
//! outcomes also a deployment and its status).
//!
//! - **Routing** by app and severity (`[[alerts.routes]]`); nothing in an
//!   alert names a destination.
//! - **De-duplication**: the fingerprint is SHA-256 over (app, step, digest,
//!   kind). The first alert of a fingerprint opens a window of
//!   `[alerts] dedup_window` and is sent; each further alert (a different
//!   `MessageId`, i.e. another run state change) inside the window is only
//!   counted in `alerts/{fingerprint}.json` (compare-and-swap) and on its run.
//!   A redelivery of a message already counted counts nothing.
//! - **Failures** are per channel: a transient one (timeout, 5xx, 408, 429) is
//!   retried by a *scheduled* `alerts` message carrying only the failed
//!   channels and the attempt number (MessageId derived from fingerprint,
//!   window and attempt, so duplicates drop), with doubling backoff; a
//!   permanent one (other 4xx, a variable not set) or the last attempt is
//!   recorded on the run (`notifications`), at `rejected/alert/...` and in
//!   the audit trail. Secrets never appear in any of these.

pub mod channels;

use std::collections::BTreeMap;
use std::sync::Arc;

use gantry_bus::{BusError, OutMessage};
use gantry_pipeline::config::AlertChannel;
use gantry_pipeline::{
    Alert, AppName, AuditEntry, Digest, Notification, NotificationOutcome, PipelineError, Run,
    RunId,
};
use gantry_runtime::{Deps, Done, FromMessage, Function, FunctionError, Invocation};
use serde::{Deserialize, Serialize};
use sha2::Digest as _;
use time::OffsetDateTime;

use crate::channels::{Delivered, Failure, Notice};

/// Function name: folder, route and span.
pub const NAME: &str = "alert";

/// Longest backoff between two attempts on one channel.
const MAX_BACKOFF: std::time::Duration = std::time::Duration::from_secs(3600);

/// Message ids of one window kept in the record (to count each once).
const KEPT_MESSAGE_IDS: usize = 200;

/// The function's registration.
pub fn function() -> Function {
    Function::queue(NAME, "alerts", false, |inv, deps: Arc<Deps>| async move {
        handle(inv, &deps).await
    })
}

/// An `alerts` message: an alert, and for a scheduled retry which channels
/// are still owed it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AlertMessage {
    /// The alert as the step sent it.
    #[serde(flatten)]
    pub alert: Alert,
    /// Present only on retries sent by this function.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry: Option<Retry>,
}

/// The retry part of an [`AlertMessage`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Retry {
    /// The fingerprint of the notification.
    pub fingerprint: String,
    /// Start of its de-duplication window (Unix milliseconds): with the
    /// fingerprint, the identity of the notification.
    pub window: i64,
    /// Channels that failed transiently.
    pub channels: Vec<String>,
    /// The attempt this message is (2 for the first retry).
    pub attempt: u32,
}

impl FromMessage for AlertMessage {
    fn from_message(body: &[u8]) -> Result<Self, String> {
        let m: AlertMessage = serde_json::from_slice(body).map_err(|e| format!("alert: {e}"))?;
        let label = |s: &str| {
            !s.is_empty()
                && s.len() <= 64
                && s.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        };
        if !label(&m.alert.kind) {
            return Err(format!("alert: kind {:?} is not [a-z0-9-]", m.alert.kind));
        }
        if let Some(step) = &m.alert.step
            && !label(step)
        {
            return Err(format!("alert: step {step:?} is not [a-z0-9-]"));
        }
        if m.alert.reason.len() > 16 * 1024 {
            return Err("alert: reason longer than 16 KiB".into());
        }
        if let Some(r) = &m.retry {
            if r.fingerprint.len() != 64 || !r.fingerprint.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err("alert: retry.fingerprint is not a SHA-256".into());
            }
            if r.attempt < 2 || r.channels.is_empty() {
                return Err("alert: retry needs attempt >= 2 and channels".into());
            }
        }
        Ok(m)
    }
}

/// Why an alert could not be handled (the message is then redelivered).
#[derive(Debug, thiserror::Error)]
pub enum AlertError {
    /// Reading or writing the de-duplication record or the run failed.
    #[error("recording alert {fingerprint} failed: {source}")]
    Record {
        /// Fingerprint.
        fingerprint: String,
        /// Cause.
        source: PipelineError,
    },
    /// Scheduling a retry failed.
    #[error("scheduling a retry of alert {fingerprint} failed: {source}")]
    Schedule {
        /// Fingerprint.
        fingerprint: String,
        /// Cause.
        source: BusError,
    },
}

impl FunctionError for AlertError {
    fn is_transient(&self) -> bool {
        match self {
            AlertError::Record { source, .. } => source.is_transient(),
            AlertError::Schedule { source, .. } => source.is_transient(),
        }
    }
}

/// `alerts/{fingerprint}.json`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct DedupRecord {
    /// The fingerprint.
    pub fingerprint: String,
    /// What it is the fingerprint of.
    pub kind: String,
    /// App.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub app: Option<AppName>,
    /// Step.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub step: Option<String>,
    /// Digest.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub digest: Option<Digest>,
    /// Start of the current window (when its notification was decided).
    #[serde(
        default,
        with = "time::serde::rfc3339::option",
        skip_serializing_if = "Option::is_none"
    )]
    pub window_start: Option<OffsetDateTime>,
    /// The last alert counted.
    #[serde(
        default,
        with = "time::serde::rfc3339::option",
        skip_serializing_if = "Option::is_none"
    )]
    pub last_at: Option<OffsetDateTime>,
    /// Alerts in the current window, the notified one included.
    pub count: u32,
    /// Alerts ever seen with this fingerprint.
    pub total: u64,
    /// The run of the alert that was notified.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub run_id: Option<RunId>,
    /// MessageId of the alert that was notified.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub notified_by: Option<String>,
    /// MessageIds counted in this window (bounded), so a redelivery counts once.
    #[serde(default)]
    pub message_ids: Vec<String>,
    /// The notification's state per channel.
    #[serde(default)]
    pub channels: BTreeMap<String, ChannelState>,
}

/// One channel of the current notification.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChannelState {
    /// Outcome so far.
    pub outcome: NotificationOutcome,
    /// Attempts so far.
    pub attempts: u32,
    /// When recorded.
    #[serde(with = "time::serde::rfc3339")]
    pub at: OffsetDateTime,
    /// Why it failed or was skipped.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// The fingerprint of an alert: SHA-256 (hex) over app, step, digest and
/// kind. For alerts without a step (rejected messages) the rejecting
/// function (`detail.function`) stands in for it.
pub fn fingerprint(alert: &Alert) -> String {
    let step = alert
        .step
        .clone()
        .or_else(|| alert.detail["function"].as_str().map(str::to_string))
        .unwrap_or_default();
    let mut h = sha2::Sha256::new();
    for part in [
        "gantry-alert-v1",
        alert.app.as_ref().map(|a| a.as_str()).unwrap_or_default(),
        &step,
        alert
            .digest
            .as_ref()
            .map(|d| d.as_str())
            .unwrap_or_default(),
        &alert.kind,
    ] {
        h.update(part.as_bytes());
        h.update([0u8]);
    }
    hex::encode(h.finalize())
}

/// Blob of a fingerprint's record.
pub fn record_blob(fingerprint: &str) -> String {
    format!("alerts/{fingerprint}.json")
}

/// `{fingerprint[..32]}-{window ms}`: the notification's id, the same on
/// every attempt and channel.
pub fn delivery_id(fingerprint: &str, window: i64) -> String {
    format!("{}-{window}", &fingerprint[..fingerprint.len().min(32)])
}

/// MessageId of the retry `attempt` of a notification.
pub fn retry_message_id(fingerprint: &str, window: i64, attempt: u32) -> String {
    format!("alert:{}:retry:{attempt}", delivery_id(fingerprint, window))
}

/// Delay before attempt `attempt` (2, 3, ...): `retry_backoff` doubling, at most 1 h.
pub fn backoff(base: std::time::Duration, attempt: u32) -> std::time::Duration {
    let factor = 1u32 << attempt.saturating_sub(2).min(16);
    base.saturating_mul(factor).min(MAX_BACKOFF)
}

fn millis(t: OffsetDateTime) -> i64 {
    i64::try_from(t.unix_timestamp_nanos() / 1_000_000).unwrap_or(i64::MAX)
}

/// What the record says about this alert.
#[derive(Debug, Clone, PartialEq)]
enum Decision {
    /// First of a new window: notify.
    Notify { window: OffsetDateTime },
    /// The notifying message again: finish what it did not record.
    Resume {
        window: OffsetDateTime,
        done: Vec<String>,
    },
    /// Counted inside the window.
    Counted { count: u32 },
    /// Already counted (redelivery).
    Repeat,
}

async fn handle(inv: Invocation<AlertMessage>, deps: &Deps) -> Result<Done, AlertError> {
    let message = inv.event;
    let now = OffsetDateTime::now_utc();
    match message.retry {
        Some(retry) => retry_delivery(deps, &message.alert, retry, now).await,
        None => {
            let id = inv.meta.message_id.clone().unwrap_or_else(|| {
                // Without a MessageId the body identifies the message.
                let body = serde_json::to_vec(&message.alert).unwrap_or_default();
                format!("h-{}", hex::encode(sha2::Sha256::digest(&body)))
            });
            first_delivery(deps, &message.alert, &id, now).await
        }
    }
}

async fn first_delivery(
    deps: &Deps,
    alert: &Alert,
    message_id: &str,
    now: OffsetDateTime,
) -> Result<Done, AlertError> {
    let fp = fingerprint(alert);
    let record_err = |source| AlertError::Record {
        fingerprint: fp.clone(),
        source,
    };
    let window_len = deps.config.alerts.dedup_window;
    let mut decision = Decision::Repeat;
    let record: DedupRecord = deps
        .runs
        .update_json(&record_blob(&fp), |r: &mut DedupRecord| {
            if r.message_ids.iter().any(|m| m == message_id) {
                decision = match (r.notified_by.as_deref(), r.window_start) {
                    (Some(by), Some(window)) if by == message_id => Decision::Resume {
                        window,
                        done: r.channels.keys().cloned().collect(),
                    },
                    _ => Decision::Repeat,
                };
                return Ok(false);
            }
            r.total += 1;
            r.last_at = Some(now);
            let open = r.window_start.is_some_and(|start| now < start + window_len);
            if open {
                r.count += 1;
                r.message_ids.push(message_id.to_string());
                if r.message_ids.len() > KEPT_MESSAGE_IDS {
                    r.message_ids.remove(0);
                }
                decision = Decision::Counted { count: r.count };
            } else {
                r.fingerprint = fp.clone();
                r.kind = alert.kind.clone();
                r.app = alert.app.clone();
                r.step = alert.step.clone();
                r.digest = alert.digest.clone();
                r.window_start = Some(now);
                r.count = 1;
                r.run_id = alert.run_id.clone();
                r.notified_by = Some(message_id.to_string());
                r.message_ids = vec![message_id.to_string()];
                r.channels.clear();
                decision = Decision::Notify { window: now };
            }
            Ok(true)
        })
        .await
        .map_err(record_err)?;
    let (window, done) = match decision {
        Decision::Repeat => {
            return Ok(Done(format!(
                "{} {message_id} already counted for {fp}",
                alert.kind
            )));
        }
        Decision::Counted { count } => {
            record_on_run(
                deps,
                alert,
                &fp,
                &[(None, NotificationOutcome::Deduplicated, 0, None)],
                count,
                now,
            )
            .await?;
            return Ok(Done(format!(
                "{} deduplicated ({count} in the window of {fp})",
                alert.kind
            )));
        }
        Decision::Notify { window } => (window, Vec::new()),
        Decision::Resume { window, done } => (window, done),
    };
    let routed: Vec<&AlertChannel> = deps
        .config
        .alerts
        .route(alert.app.as_ref(), alert.severity)
        .into_iter()
        .filter(|c| !done.contains(&c.name))
        .collect();
    if routed.is_empty() {
        return Ok(Done(format!(
            "{} ({:?}): no channel routed (or all done)",
            alert.kind, alert.severity
        )));
    }
    deliver(deps, alert, &fp, window, &routed, 1, record.count, now).await
}

async fn retry_delivery(
    deps: &Deps,
    alert: &Alert,
    retry: Retry,
    now: OffsetDateTime,
) -> Result<Done, AlertError> {
    let fp = retry.fingerprint.clone();
    if fp != fingerprint(alert) {
        // A retry is only ever built by this function from the alert itself.
        return Ok(Done(format!(
            "retry for {fp} does not match its alert; dropped"
        )));
    }
    let window = OffsetDateTime::from_unix_timestamp_nanos(i128::from(retry.window) * 1_000_000)
        .unwrap_or(now);
    let record = deps
        .runs
        .raw()
        .get(&record_blob(&fp))
        .await
        .map_err(|e| AlertError::Record {
            fingerprint: fp.clone(),
            source: e.into(),
        })?;
    let record: Option<DedupRecord> = record.and_then(|v| serde_json::from_slice(&v.body).ok());
    let same_window = record
        .as_ref()
        .and_then(|r| r.window_start)
        .is_some_and(|w| millis(w) == retry.window);
    // A redelivered retry must not send twice: only channels the record
    // still shows as retrying with fewer attempts are owed.
    let owed: Vec<&AlertChannel> = retry
        .channels
        .iter()
        .filter_map(|name| deps.config.alerts.channel(name))
        .filter(|c| {
            !same_window
                || record
                    .as_ref()
                    .and_then(|r| r.channels.get(&c.name))
                    .is_none_or(|s| {
                        s.outcome == NotificationOutcome::Retrying && s.attempts < retry.attempt
                    })
        })
        .collect();
    if owed.is_empty() {
        return Ok(Done(format!(
            "retry {} of {fp}: nothing owed",
            retry.attempt
        )));
    }
    let count = record.map(|r| r.count).unwrap_or(1);
    deliver(deps, alert, &fp, window, &owed, retry.attempt, count, now).await
}

/// Sends to `channels` (attempt `attempt`), then schedules the transient
/// failures, records the outcomes (record, run) and the final failures.
#[allow(clippy::too_many_arguments)]
async fn deliver(
    deps: &Deps,
    alert: &Alert,
    fp: &str,
    window: OffsetDateTime,
    channels: &[&AlertChannel],
    attempt: u32,
    count: u32,
    now: OffsetDateTime,
) -> Result<Done, AlertError> {
    let record_err = |source| AlertError::Record {
        fingerprint: fp.to_string(),
        source,
    };
    let run = match (&alert.app, &alert.run_id) {
        (Some(app), Some(id)) => deps.runs.get(app, id).await.map_err(record_err)?,
        _ => None,
    };
    let window_ms = millis(window);
    let delivery = delivery_id(fp, window_ms);
    let environment = alert
        .app
        .as_ref()
        .and_then(|a| deps.config.app(a.as_str()))
        .map(|a| a.namespace().as_str());
    let notice = Notice {
        alert,
        run: run.as_ref(),
        fingerprint: fp,
        delivery: &delivery,
        count,
        environment,
    };
    let max = deps.config.alerts.max_attempts;
    let mut outcomes: Vec<(String, NotificationOutcome, Option<String>)> = Vec::new();
    for channel in channels {
        let result = channels::send(deps, channel, &notice).await;
        let (outcome, reason) = match result {
            Ok(Delivered::Sent) => (NotificationOutcome::Sent, None),
            Ok(Delivered::Skipped(why)) => (NotificationOutcome::Skipped, Some(why)),
            Err(Failure::Transient(why)) if attempt < max => {
                (NotificationOutcome::Retrying, Some(why))
            }
            Err(Failure::Transient(why)) => (
                NotificationOutcome::Failed,
                Some(format!("gave up after {attempt} attempts: {why}")),
            ),
            Err(Failure::Permanent(why)) => (NotificationOutcome::Failed, Some(why)),
        };
        match outcome {
            NotificationOutcome::Sent => {
                tracing::info!(channel = %channel.name, kind = %alert.kind, attempt, "alert sent")
            }
            _ => {
                tracing::warn!(channel = %channel.name, kind = %alert.kind, attempt, outcome = ?outcome, reason = reason.as_deref().unwrap_or(""), "alert not sent")
            }
        }
        outcomes.push((channel.name.clone(), outcome, reason));
    }
    // The retry is scheduled before the outcomes are recorded: a crash in
    // between redelivers this message, and the derived MessageId drops the
    // repeated retry.
    let retrying: Vec<String> = outcomes
        .iter()
        .filter(|(_, o, _)| *o == NotificationOutcome::Retrying)
        .map(|(n, _, _)| n.clone())
        .collect();
    if !retrying.is_empty() {
        let next = attempt + 1;
        let message = AlertMessage {
            alert: alert.clone(),
            retry: Some(Retry {
                fingerprint: fp.to_string(),
                window: window_ms,
                channels: retrying.clone(),
                attempt: next,
            }),
        };
        let delay = backoff(deps.config.alerts.retry_backoff, next);
        let schedule_err = |source| AlertError::Schedule {
            fingerprint: fp.to_string(),
            source,
        };
        let out = OutMessage::json("alerts", &message)
            .map_err(schedule_err)?
            .with_id(retry_message_id(fp, window_ms, next))
            .scheduled_at(now + delay);
        deps.send(out).await.map_err(schedule_err)?;
    }
    deps.runs
        .update_json(&record_blob(fp), |r: &mut DedupRecord| {
            if r.window_start.map(millis) != Some(window_ms) {
                return Ok(false); // a newer window owns the record now
            }
            for (name, outcome, reason) in &outcomes {
                r.channels.insert(
                    name.clone(),
                    ChannelState {
                        outcome: *outcome,
                        attempts: attempt,
                        at: now,
                        reason: reason.clone(),
                    },
                );
            }
            Ok(true)
        })
        .await
        .map_err(record_err)?;
    let entries: Vec<_> = outcomes
        .iter()
        .map(|(n, o, r)| (Some(n.clone()), *o, attempt, r.clone()))
        .collect();
    record_on_run(deps, alert, fp, &entries, count, now).await?;
    for (name, outcome, reason) in &outcomes {
        if *outcome == NotificationOutcome::Failed {
            record_failure(
                deps,
                alert,
                fp,
                &delivery,
                name,
                attempt,
                reason.as_deref().unwrap_or(""),
                now,
            )
            .await?;
        }
    }
    let summary: Vec<String> = outcomes
        .iter()
        .map(|(n, o, _)| format!("{n}={}", outcome_str(*o)))
        .collect();
    Ok(Done(format!(
        "{} attempt {attempt}: {}",
        alert.kind,
        summary.join(" ")
    )))
}

fn outcome_str(o: NotificationOutcome) -> &'static str {
    match o {
        NotificationOutcome::Sent => "sent",
        NotificationOutcome::Retrying => "retrying",
        NotificationOutcome::Failed => "failed",
        NotificationOutcome::Skipped => "skipped",
        NotificationOutcome::Deduplicated => "deduplicated",
    }
}

/// Upserts the alert's notifications on its run (one entry per fingerprint
/// and channel). An alert without a run, or whose run is gone, records nothing.
async fn record_on_run(
    deps: &Deps,
    alert: &Alert,
    fp: &str,
    entries: &[(Option<String>, NotificationOutcome, u32, Option<String>)],
    count: u32,
    now: OffsetDateTime,
) -> Result<(), AlertError> {
    let (Some(app), Some(id)) = (&alert.app, &alert.run_id) else {
        return Ok(());
    };
    let result = deps
        .runs
        .update(app, id, |run: &mut Run| {
            for (channel, outcome, attempts, reason) in entries {
                let entry = Notification {
                    kind: alert.kind.clone(),
                    channel: channel.clone(),
                    outcome: *outcome,
                    at: now,
                    attempts: *attempts,
                    count,
                    fingerprint: fp.to_string(),
                    reason: reason.clone(),
                };
                match run
                    .notifications
                    .iter_mut()
                    .find(|n| n.fingerprint == fp && n.channel == *channel)
                {
                    Some(existing) => *existing = entry,
                    None => run.notifications.push(entry),
                }
            }
            Ok(true)
        })
        .await;
    match result {
        Ok(_) => Ok(()),
        Err(PipelineError::UpdateRefused { .. }) => Ok(()), // the run does not exist
        Err(source) => Err(AlertError::Record {
            fingerprint: fp.to_string(),
            source,
        }),
    }
}

/// A channel given up: `rejected/alert/{delivery}-{channel}.json` and an
/// audit line. No further alert: a failing channel must not feed itself.
#[allow(clippy::too_many_arguments)]
async fn record_failure(
    deps: &Deps,
    alert: &Alert,
    fp: &str,
    delivery: &str,
    channel: &str,
    attempts: u32,
    reason: &str,
    now: OffsetDateTime,
) -> Result<(), AlertError> {
    let name = format!("rejected/{NAME}/{delivery}-{channel}.json");
    let body = serde_json::to_vec_pretty(&serde_json::json!({
        "function": NAME,
        "channel": channel,
        "kind": alert.kind,
        "fingerprint": fp,
        "app": alert.app,
        "run_id": alert.run_id,
        "attempts": attempts,
        "reason": reason,
        "at": gantry_runtime::steps::rfc3339(now),
        "alert": alert,
    }))
    .unwrap_or_default();
    match deps.runs.raw().create(&name, &body).await {
        Ok(_) | Err(gantry_store::StoreError::Conflict { .. }) => {}
        Err(e) => {
            return Err(AlertError::Record {
                fingerprint: fp.to_string(),
                source: e.into(),
            });
        }
    }
    deps.audit(AuditEntry {
        at: now,
        actor: NAME.into(),
        action: "alert.failed".into(),
        app: alert.app.clone(),
        run: alert.run_id.clone(),
        detail: serde_json::json!({"channel": channel, "kind": alert.kind, "reason": reason, "record": name}),
    })
    .await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use gantry_pipeline::Severity;

    #[test]
    fn fingerprint_covers_app_step_digest_kind() {
        let mut a = Alert::new("scan-blocked", Severity::High, "one");
        a.app = Some(AppName::parse("web").expect("valid"));
        a.step = Some("scan".into());
        let mut b = a.clone();
        b.reason = "another reason".into();
        b.run_id = Some(gantry_pipeline::ids::new_run_id(1_700_000_000_000));
        assert_eq!(
            fingerprint(&a),
            fingerprint(&b),
            "reason and run do not count"
        );
        b.step = Some("policy".into());
        assert_ne!(fingerprint(&a), fingerprint(&b));
        let mut c = a.clone();
        c.kind = "deployed".into();
        assert_ne!(fingerprint(&a), fingerprint(&c));
        assert_eq!(fingerprint(&a).len(), 64);
    }

    #[test]
    fn backoff_doubles_and_is_capped() {
        let base = std::time::Duration::from_secs(30);
        assert_eq!(backoff(base, 2).as_secs(), 30);
        assert_eq!(backoff(base, 3).as_secs(), 60);
        assert_eq!(backoff(base, 4).as_secs(), 120);
        assert_eq!(backoff(base, 20).as_secs(), 3600);
    }

    #[test]
    fn bad_messages_are_refused_with_a_reason() {
        for (body, needle) in [
            (&b"{}"[..], "missing field"),
            (br#"{"kind":"Bad Kind","severity":"high","reason":"r"}"#, "kind"),
            (br#"{"kind":"x","severity":"urgent","reason":"r"}"#, "urgent"),
            (
                br#"{"kind":"x","severity":"high","reason":"r","retry":{"fingerprint":"ab","window":1,"channels":["a"],"attempt":2}}"#,
                "fingerprint",
            ),
        ] {
            let err = AlertMessage::from_message(body).expect_err("refused");
            assert!(err.contains(needle), "{needle} not in {err}");
        }
    }
}
