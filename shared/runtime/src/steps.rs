//! Step transitions shared by the gate and deploy functions: hand a run to the
//! next step, block it, or fail it — each recorded on the run, in the audit
//! trail and (for the bad outcomes) as an alert, with `MessageId`s derived from
//! the run and step so a redelivered message repeats nothing.

use gantry_bus::{BusError, OutMessage};
use gantry_pipeline::runs::blobs;
use gantry_pipeline::{
    Alert, AppName, AuditEntry, Digest, PipelineError, Run, RunId, RunStatus, Severity, Step,
    StepRequest, StepStatus,
};
use time::OffsetDateTime;
use tracing::Instrument as _;

use crate::Deps;

/// Why a transition could not be recorded or announced.
#[derive(Debug, thiserror::Error)]
pub enum StepError {
    /// Writing the run, the blocked digest or the scan record failed.
    #[error("recording run {run} failed: {source}")]
    Record {
        /// Run id.
        run: RunId,
        /// Cause.
        source: PipelineError,
    },
    /// Sending the next step's message or an alert failed.
    #[error("queueing for run {run} failed: {source}")]
    Queue {
        /// Run id.
        run: RunId,
        /// Cause.
        source: BusError,
    },
}

impl StepError {
    /// Whether a redelivery may succeed.
    pub fn is_transient(&self) -> bool {
        match self {
            StepError::Record { source, .. } => source.is_transient(),
            StepError::Queue { source, .. } => source.is_transient(),
        }
    }
}

/// The run a step message is about, as recorded: every step acts on the
/// record, not the message.
#[derive(Debug)]
pub struct Subject<'a> {
    /// The app, as configured.
    pub app: &'a gantry_pipeline::AppConfig,
    /// The run record.
    pub run: Run,
    /// The run's image; its digest is the message's.
    pub image: gantry_pipeline::Image,
}

/// Why a step message names no usable run.
#[derive(Debug)]
pub enum SubjectError {
    /// The message does not match the configuration or the record
    /// (permanent): why.
    Check(String),
    /// Reading the run failed.
    Read(PipelineError),
}

/// Reads the run `request` names and checks it against the message: the app
/// is configured, the run exists, has an image, and its digest is the
/// message's.
pub async fn subject<'a>(
    deps: &'a Deps,
    request: &StepRequest,
) -> Result<Subject<'a>, SubjectError> {
    let Some(app) = deps.config.app(request.app.as_str()) else {
        return Err(SubjectError::Check(format!(
            "app {} is not configured",
            request.app
        )));
    };
    let Some(run) = deps
        .runs
        .get(&request.app, &request.run_id)
        .await
        .map_err(SubjectError::Read)?
    else {
        return Err(SubjectError::Check("no such run".into()));
    };
    let Some(image) = run.image.clone() else {
        return Err(SubjectError::Check("the run has no image".into()));
    };
    if image.digest != request.digest {
        return Err(SubjectError::Check(format!(
            "message digest {} is not the run's {}",
            request.digest, image.digest
        )));
    }
    Ok(Subject { app, run, image })
}

/// RFC 3339 of an instant (for messages and records).
pub fn rfc3339(t: OffsetDateTime) -> String {
    t.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

/// Appends an audit line for a run.
pub async fn audit(deps: &Deps, actor: &str, run: &Run, action: &str, detail: serde_json::Value) {
    deps.audit(AuditEntry {
        at: OffsetDateTime::now_utc(),
        actor: actor.into(),
        action: action.into(),
        app: Some(run.app.clone()),
        run: Some(run.id.clone()),
        detail,
    })
    .await;
}

/// Sends the `queue` message for `step` of `run` (attempt `attempt`), with the
/// MessageId `{run}:{step}:{attempt}`; `session` for session queues (`deploy`).
pub async fn send_step(
    deps: &Deps,
    queue: &str,
    step: &str,
    run: &Run,
    digest: &Digest,
    attempt: u32,
    session: Option<&AppName>,
) -> Result<(), StepError> {
    let request = StepRequest {
        app: run.app.clone(),
        run_id: run.id.clone(),
        digest: digest.clone(),
        attempt,
        phase: None,
    };
    let queue_err = |source| StepError::Queue {
        run: run.id.clone(),
        source,
    };
    let mut message = OutMessage::json(queue, &request)
        .map_err(queue_err)?
        .with_id(request.message_id(step))
        .with_property("run-id", run.id.to_string())
        .with_property("app", run.app.to_string());
    if let Some(app) = session {
        message = message.with_session(app.to_string());
    }
    send_in_run_trace(deps, run, "run.step-queued", message)
        .await
        .map_err(queue_err)
}

/// Sends `message` about `run` so that its receiver continues the run's trace,
/// also when the sender works in another trace (an operator request).
async fn send_in_run_trace(
    deps: &Deps,
    run: &Run,
    name: &'static str,
    message: OutMessage,
) -> Result<(), BusError> {
    match crate::telemetry::continue_run(name, run) {
        Some(span) => deps.send(message).instrument(span).await,
        None => deps.send(message).await,
    }
}

/// Sends an alert about `step` of `run`, de-duplicated by `{run}:alert:{key}`.
#[allow(clippy::too_many_arguments)]
pub async fn alert(
    deps: &Deps,
    run: &Run,
    step: &str,
    key: &str,
    kind: &str,
    severity: Severity,
    digest: Option<&Digest>,
    reason: String,
) -> Result<(), StepError> {
    let mut alert = Alert::new(kind, severity, reason);
    alert.app = Some(run.app.clone());
    alert.run_id = Some(run.id.clone());
    alert.step = Some(step.into());
    alert.digest = digest.cloned();
    let queue_err = |source| StepError::Queue {
        run: run.id.clone(),
        source,
    };
    let message = OutMessage::json("alerts", &alert)
        .map_err(queue_err)?
        .with_id(format!("{}:alert:{key}", run.id));
    send_in_run_trace(deps, run, "run.alert-queued", message)
        .await
        .map_err(queue_err)
}

/// Blocks `run` at `step`: the digest goes to `apps/{app}/blocked/` first (so
/// it can never deploy even if the run update races), then the step and run
/// become `blocked` with `reason` and `details`, then a high alert
/// `{run}:alert:{step}-blocked`.
pub async fn block(
    deps: &Deps,
    actor: &str,
    run: &Run,
    step: &str,
    digest: &Digest,
    reason: &str,
    details: serde_json::Value,
) -> Result<(), StepError> {
    let record = |source: PipelineError| StepError::Record {
        run: run.id.clone(),
        source,
    };
    let now = OffsetDateTime::now_utc();
    record_block(
        deps,
        &run.app,
        digest,
        &serde_json::json!({
            "digest": digest, "run_id": run.id, "step": step, "reason": reason, "at": rfc3339(now),
        }),
    )
    .await
    .map_err(record)?;
    deps.runs
        .update(&run.app, &run.id, |r| {
            let Some(s) = r.steps.get_mut(step) else {
                return Ok(false);
            };
            if s.status == StepStatus::Blocked {
                return Ok(false);
            }
            s.finish(StepStatus::Blocked, now, reason.to_string());
            s.details = details.clone();
            r.status = RunStatus::Blocked;
            Ok(true)
        })
        .await
        .map_err(record)?;
    audit(
        deps,
        actor,
        run,
        &format!("step.{step}.blocked"),
        serde_json::json!({"digest": digest, "reason": reason}),
    )
    .await;
    blocked_alert(deps, run, step, digest, reason).await
}

/// Fails `run` at `step` for a reason retrying cannot fix (a malformed report,
/// a broken policy file), and sends a high alert `{run}:alert:{step}-failed`.
pub async fn fail(
    deps: &Deps,
    actor: &str,
    run: &Run,
    step: &str,
    reason: &str,
) -> Result<(), StepError> {
    let now = OffsetDateTime::now_utc();
    deps.runs
        .update(&run.app, &run.id, |r| {
            let s = r
                .steps
                .entry(step.to_string())
                .or_insert_with(|| Step::pending(1));
            if s.status == StepStatus::Failed {
                return Ok(false);
            }
            s.finish(StepStatus::Failed, now, reason.to_string());
            r.status = RunStatus::Failed;
            Ok(true)
        })
        .await
        .map_err(|source| StepError::Record {
            run: run.id.clone(),
            source,
        })?;
    audit(
        deps,
        actor,
        run,
        &format!("step.{step}.failed"),
        serde_json::json!({"reason": reason}),
    )
    .await;
    failed_alert(
        deps,
        run,
        step,
        run.image.as_ref().map(|i| &i.digest),
        reason,
    )
    .await
}

/// Marks `step` running (first look only) and returns the run as stored.
pub async fn start(deps: &Deps, run: &Run, step: &str) -> Result<Run, StepError> {
    let now = OffsetDateTime::now_utc();
    deps.runs
        .update(&run.app, &run.id, |r| {
            let Some(s) = r.steps.get_mut(step) else {
                return Ok(false);
            };
            if s.status != StepStatus::Pending {
                return Ok(false);
            }
            s.status = StepStatus::Running;
            s.started_at = Some(now);
            Ok(true)
        })
        .await
        .map_err(|source| StepError::Record {
            run: run.id.clone(),
            source,
        })
}

/// Whether `run` is waiting for attempt `attempt` of `step` in `status`.
/// Anything else (a redelivery, a stale attempt, a run that moved on) must be
/// acknowledged without side effects.
pub fn waiting_for(run: &Run, status: RunStatus, step: &str, attempt: u32) -> bool {
    run.status == status
        && run.steps.get(step).is_some_and(|s| {
            matches!(s.status, StepStatus::Pending | StepStatus::Running) && s.attempts == attempt
        })
}

/// Whether `digest` is in `apps/{app}/blocked/` and its block was not lifted
/// by an operator retrigger ([`lift_block`]). A record that does not parse
/// counts as blocked: when in doubt, never deploy.
pub async fn is_blocked(
    deps: &Deps,
    app: &AppName,
    digest: &Digest,
) -> Result<bool, PipelineError> {
    Ok(deps
        .runs
        .raw()
        .get(&blobs::blocked(app, digest))
        .await?
        .is_some_and(|v| !is_lifted(&v.body)))
}

/// The block record of `digest` (`apps/{app}/blocked/{digest}`), if any,
/// whether lifted or not.
pub async fn block_record(
    deps: &Deps,
    app: &AppName,
    digest: &Digest,
) -> Result<Option<serde_json::Value>, PipelineError> {
    Ok(deps
        .runs
        .raw()
        .get(&blobs::blocked(app, digest))
        .await?
        .map(|v| serde_json::from_slice(&v.body).unwrap_or(serde_json::Value::Null)))
}

fn is_lifted(body: &[u8]) -> bool {
    serde_json::from_slice::<serde_json::Value>(body)
        .is_ok_and(|v| v.get("lifted").is_some_and(|l| !l.is_null()))
}

/// Records `digest` as blocked with `record` (`digest`, `run_id`, `step`,
/// `reason`, `at`). An existing active block is kept (the first reason
/// stays); a lifted one is replaced, so a digest that fails again after a
/// retrigger is blocked again.
pub async fn record_block(
    deps: &Deps,
    app: &AppName,
    digest: &Digest,
    record: &serde_json::Value,
) -> Result<(), PipelineError> {
    let name = blobs::blocked(app, digest);
    let body = serde_json::to_vec_pretty(record).unwrap_or_default();
    let store = deps.runs.raw();
    // Bounded: each round only loses to another writer of the same blob.
    for _ in 0..16 {
        match store.create(&name, &body).await {
            Ok(_) => return Ok(()),
            Err(gantry_store::StoreError::Conflict { .. }) => {}
            Err(e) => return Err(e.into()),
        }
        let Some(current) = store.get(&name).await? else {
            continue;
        };
        if !is_lifted(&current.body) {
            return Ok(());
        }
        match store.replace(&name, &body, &current.etag).await {
            Ok(_) => return Ok(()),
            Err(gantry_store::StoreError::Conflict { .. }) => {}
            Err(e) => return Err(e.into()),
        }
    }
    Err(PipelineError::Contention { name, attempts: 16 })
}

/// Lifts the block of `digest` (the store has no delete, and the record is
/// worth keeping): the record gains `"lifted": {"by", "at", "reason"}` and
/// [`is_blocked`] no longer reports it. `expected` is the record the caller
/// decided on; if the blob changed meanwhile nothing is written and `false`
/// is returned.
pub async fn lift_block(
    deps: &Deps,
    app: &AppName,
    digest: &Digest,
    expected: &serde_json::Value,
    lifted: serde_json::Value,
) -> Result<bool, PipelineError> {
    let name = blobs::blocked(app, digest);
    let store = deps.runs.raw();
    let Some(current) = store.get(&name).await? else {
        return Ok(false);
    };
    let mut value: serde_json::Value =
        serde_json::from_slice(&current.body).unwrap_or(serde_json::Value::Null);
    if &value != expected || !value.is_object() {
        return Ok(false);
    }
    value["lifted"] = lifted;
    let body = serde_json::to_vec_pretty(&value).unwrap_or_default();
    match store.replace(&name, &body, &current.etag).await {
        Ok(_) => Ok(true),
        Err(gantry_store::StoreError::Conflict { .. }) => Ok(false),
        Err(e) => Err(e.into()),
    }
}

/// Puts back a block that [`lift_block`] lifted (the retrigger could not be
/// sent): removes `lifted` again.
pub async fn restore_block(
    deps: &Deps,
    app: &AppName,
    digest: &Digest,
) -> Result<(), PipelineError> {
    let name = blobs::blocked(app, digest);
    let store = deps.runs.raw();
    for _ in 0..16 {
        let Some(current) = store.get(&name).await? else {
            return Ok(());
        };
        let mut value: serde_json::Value =
            serde_json::from_slice(&current.body).unwrap_or(serde_json::Value::Null);
        let Some(obj) = value.as_object_mut() else {
            return Ok(());
        };
        if obj.remove("lifted").is_none() {
            return Ok(());
        }
        let body = serde_json::to_vec_pretty(&value).unwrap_or_default();
        match store.replace(&name, &body, &current.etag).await {
            Ok(_) => return Ok(()),
            Err(gantry_store::StoreError::Conflict { .. }) => {}
            Err(e) => return Err(e.into()),
        }
    }
    Err(PipelineError::Contention { name, attempts: 16 })
}

/// The step that follows a passed one: its queue, its name, the run status
/// that waits for it, and whether its queue uses sessions (keyed by app).
#[derive(Debug, Clone, Copy)]
pub struct Next {
    /// Queue of the next step.
    pub queue: &'static str,
    /// Name of the next step.
    pub step: &'static str,
    /// Run status while the next step is pending.
    pub waiting: RunStatus,
    /// Whether messages carry `SessionId` = app.
    pub sessions: bool,
}

#[allow(clippy::too_many_arguments)]
/// For a message whose step already finished (a redelivery): repeat what may
/// have been lost if the previous delivery crashed or failed *after* recording
/// the outcome — the next step's message, or the blocked/failed alert. Their
/// MessageIds make a repeat a no-op. Returns what was repeated, if anything.
pub async fn repeat_after_redelivery(
    deps: &Deps,
    run: &Run,
    step: &str,
    attempt: u32,
    digest: &Digest,
    next: Option<Next>,
) -> Result<Option<String>, StepError> {
    let Some(s) = run.steps.get(step).filter(|s| s.attempts == attempt) else {
        return Ok(None);
    };
    let reason = s.summary.clone().unwrap_or_default();
    match s.status {
        StepStatus::Passed => {
            let Some(next) = next else { return Ok(None) };
            if run.status != next.waiting {
                return Ok(None);
            }
            let Some(pending) = run
                .steps
                .get(next.step)
                .filter(|n| n.status == StepStatus::Pending)
            else {
                return Ok(None);
            };
            let session = next.sessions.then_some(&run.app);
            send_step(
                deps,
                next.queue,
                next.step,
                run,
                digest,
                pending.attempts,
                session,
            )
            .await?;
            Ok(Some(format!(
                "{step} already passed; {} hand-off repeated",
                next.step
            )))
        }
        StepStatus::Blocked if run.status == RunStatus::Blocked => {
            blocked_alert(deps, run, step, digest, &reason).await?;
            Ok(Some(format!("{step} already blocked; alert repeated")))
        }
        StepStatus::Failed if run.status == RunStatus::Failed => {
            failed_alert(deps, run, step, Some(digest), &reason).await?;
            Ok(Some(format!("{step} already failed; alert repeated")))
        }
        _ => Ok(None),
    }
}

/// The high alert of a blocked step, `{run}:alert:{step}-blocked`.
async fn blocked_alert(
    deps: &Deps,
    run: &Run,
    step: &str,
    digest: &Digest,
    reason: &str,
) -> Result<(), StepError> {
    let key = format!("{step}-blocked");
    alert(
        deps,
        run,
        step,
        &key,
        &key,
        Severity::High,
        Some(digest),
        format!("{}: {reason}", run.app),
    )
    .await
}

/// The high alert of a failed step, `{run}:alert:{step}-failed`.
async fn failed_alert(
    deps: &Deps,
    run: &Run,
    step: &str,
    digest: Option<&Digest>,
    reason: &str,
) -> Result<(), StepError> {
    alert(
        deps,
        run,
        step,
        &format!("{step}-failed"),
        "run-failed",
        Severity::High,
        digest,
        format!("{}: {step} failed: {reason}", run.app),
    )
    .await
}
