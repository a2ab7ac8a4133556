//! `registry-push`: Azure Container Registry events from the `registry-events`
//! queue (Event Grid → Service Bus).
//!
//! `ImagePushed`: map the repository to an app, correlate with the run whose
//! commit the tag names (full or abbreviated sha), or start a run with source
//! `registry`; record the digest; hand the run to the scan gate with a `scan`
//! message whose `MessageId` is `{run}:scan:{attempt}`.
//! `ImageDeleted`: a deleted digest that is deployed right now raises an alert.
//!
//! Each event id is claimed once, after it was processed; processing is
//! idempotent, so redeliveries and crashes never create a second run or step.

use std::sync::Arc;

use gantry_bus::OutMessage;
use gantry_events::acr::{Item, RegistryAction, RegistryEvent, decode_registry_events};
use gantry_pipeline::messages::Deployed;
use gantry_pipeline::run::steps;
use gantry_pipeline::runs::blobs;
use gantry_pipeline::{
    Alert, AppConfig, AuditEntry, ClaimSource, CommitSha, Digest, Image, PipelineError, Run, RunId,
    RunStatus, Severity, Source, SourceKind, Step, StepRequest, StepStatus,
};
use gantry_runtime::{Deps, Done, FromMessage, Function, FunctionError, Invocation};
use time::OffsetDateTime;
use tracing::Instrument as _;

/// Function name: folder, route and span.
pub const NAME: &str = "registry-push";

/// The function's registration.
pub fn function() -> Function {
    Function::queue(
        NAME,
        "registry-events",
        false,
        |inv, deps: Arc<Deps>| async move { handle(inv, &deps).await },
    )
}

/// One message: one or more registry events, each decoded on its own.
#[derive(Debug)]
pub struct RegistryMessage(pub Vec<Item>);

impl FromMessage for RegistryMessage {
    fn from_message(body: &[u8]) -> Result<Self, String> {
        decode_registry_events(body)
            .map(RegistryMessage)
            .map_err(|e| e.to_string())
    }
}

/// Why an event could not be processed.
#[derive(Debug, thiserror::Error)]
pub enum RegistryPushError {
    /// An item of the message is not a registry event of a known schema.
    #[error("event #{index}: {message}")]
    ParseEvent {
        /// Position in the message.
        index: usize,
        /// What is wrong.
        message: String,
    },
    /// Writing the rejection record of a bad event failed (retry the message).
    #[error("recording a rejected event failed: {message}")]
    RecordRejection {
        /// What went wrong.
        message: String,
    },
    /// The event names a digest that is not `sha256:` + 64 hex.
    #[error("event {event}: {source}")]
    ParseDigest {
        /// Event id.
        event: String,
        /// The validation error.
        source: gantry_pipeline::NameError,
    },
    /// Reading or writing state failed.
    #[error("recording event {event} failed: {source}")]
    Record {
        /// Event id.
        event: String,
        /// The store error.
        source: PipelineError,
    },
    /// Sending the scan or alert message failed.
    #[error("queueing for event {event} failed: {source}")]
    Queue {
        /// Event id.
        event: String,
        /// The bus error.
        source: gantry_bus::BusError,
    },
}

impl FunctionError for RegistryPushError {
    fn is_transient(&self) -> bool {
        match self {
            RegistryPushError::ParseDigest { .. } | RegistryPushError::ParseEvent { .. } => false,
            RegistryPushError::RecordRejection { .. } => true,
            RegistryPushError::Record { source, .. } => source.is_transient(),
            RegistryPushError::Queue { source, .. } => source.is_transient(),
        }
    }
}

/// Handles one message (lambda style).
///
/// Events are processed one by one. A bad event (undecodable, invalid digest)
/// is recorded as rejected and the others still run; a transient failure fails
/// the whole message, so the host redelivers it (events already processed are
/// claimed and skipped on the next delivery).
pub async fn handle(
    inv: Invocation<RegistryMessage>,
    deps: &Deps,
) -> Result<Done, RegistryPushError> {
    let mut lines = Vec::new();
    for item in &inv.event.0 {
        let outcome = match &item.event {
            Ok(event) => handle_event(event, deps).await,
            Err(e) => Err(RegistryPushError::ParseEvent {
                index: item.index,
                message: e.to_string(),
            }),
        };
        match outcome {
            Ok(line) => lines.push(line),
            Err(e) if e.is_transient() => return Err(e),
            Err(e) => {
                let reason = e.to_string();
                // Keyed by the event id (or message id + position), so a
                // redelivery maps to the same record and alert.
                let key = match (&item.id, &inv.meta.message_id) {
                    (Some(id), _) => Some(id.clone()),
                    (None, Some(m)) => Some(format!("{m}-{}", item.index)),
                    (None, None) => None,
                };
                gantry_runtime::record_rejection(
                    deps,
                    NAME,
                    key.as_deref(),
                    inv.meta.delivery_count,
                    item.raw.as_bytes(),
                    &reason,
                )
                .await
                .map_err(|message| RegistryPushError::RecordRejection { message })?;
                lines.push(format!("rejected: {reason}"));
            }
        }
    }
    Ok(Done(lines.join("; ")))
}

async fn handle_event(event: &RegistryEvent, deps: &Deps) -> Result<String, RegistryPushError> {
    let record = |source: PipelineError| RegistryPushError::Record {
        event: event.id.clone(),
        source,
    };
    let app = match &event.action {
        RegistryAction::Other(kind) => return Ok(format!("event {}: {kind} ignored", event.id)),
        _ => deps
            .config
            .app_for_image(&event.registry, &event.repository),
    };
    let Some(app) = app else {
        return Ok(format!(
            "event {}: {}/{} is not a configured image",
            event.id, event.registry, event.repository
        ));
    };
    let digest = Digest::parse(&event.digest).map_err(|source| RegistryPushError::ParseDigest {
        event: event.id.clone(),
        source,
    })?;
    if deps
        .runs
        .is_claimed(ClaimSource::Registry, &event.id)
        .await
        .map_err(record)?
    {
        return Ok(format!("event {}: duplicate", event.id));
    }
    let line = match event.action {
        // buildx pushes each platform's manifest untagged, then the tagged
        // index: only tagged pushes start or advance runs.
        RegistryAction::ImagePushed if event.tag.is_none() => {
            format!("event {}: untagged manifest {digest} ignored", event.id)
        }
        RegistryAction::ImagePushed => on_pushed(event, app, &digest, deps).await?,
        _ => on_deleted(event, app, &digest, deps).await?,
    };
    let claim = serde_json::json!({"app": app.name, "digest": digest, "outcome": line});
    deps.runs
        .claim(ClaimSource::Registry, &event.id, &claim)
        .await
        .map_err(record)?;
    Ok(line)
}

async fn on_pushed(
    event: &RegistryEvent,
    app: &AppConfig,
    digest: &Digest,
    deps: &Deps,
) -> Result<String, RegistryPushError> {
    let record = |source: PipelineError| RegistryPushError::Record {
        event: event.id.clone(),
        source,
    };
    let image = Image {
        registry: event.registry.clone(),
        repository: event.repository.clone(),
        tag: event.tag.clone(),
        digest: digest.clone(),
    };
    let target = owner_of(event, app, digest, deps).await.map_err(record)?;
    let id = match target {
        Owner::Run(id) => id,
        Owner::Duplicate { run, of } => {
            // The same image already travels on another run (e.g. two commits
            // that build byte-identical images): record it here, go no further.
            let summary = format!("image {digest} is already delivered by run {of}");
            deps.runs
                .update(&app.name, &run, |r| {
                    if r.status == RunStatus::Superseded {
                        return Ok(false);
                    }
                    r.image = Some(image.clone());
                    r.status = RunStatus::Superseded;
                    let now = OffsetDateTime::now_utc();
                    r.steps.insert(
                        steps::SCAN.into(),
                        Step::finished(StepStatus::Skipped, now, summary.clone()),
                    );
                    Ok(true)
                })
                .await
                .map_err(record)?;
            return Ok(format!("run {run}: superseded, {summary}"));
        }
    };
    let mut note = None;
    let run = deps
        .runs
        .update(&app.name, &id, |run| {
            note = None;
            match &run.image {
                Some(existing) if existing.digest == *digest => Ok(false),
                Some(_) => {
                    // Another digest for the same commit won the race since we
                    // looked. Never overwrite a verdict's digest: report
                    // contention, so the redelivery looks again and forks a run
                    // for this digest (a rebuild).
                    Err(PipelineError::Contention {
                        name: blobs::run(&run.app, &run.id),
                        attempts: 1,
                    })
                }
                None if run.status.is_terminal() => {
                    note = Some(format!(
                        "run is {}; image recorded, not scanned",
                        run.status
                    ));
                    run.image = Some(image.clone());
                    Ok(true)
                }
                None => {
                    run.image = Some(image.clone());
                    run.status = RunStatus::Scanning;
                    run.steps.insert(steps::SCAN.into(), Step::pending(1));
                    Ok(true)
                }
            }
        })
        .await
        .map_err(record)?;
    // The delivery's span (and its log lines) name the run too: Event Grid
    // delivers one event per message, so one run per invocation in practice.
    gantry_runtime::telemetry::record_run(
        &tracing::Span::current(),
        app.name.as_str(),
        id.as_str(),
    );
    // From here on this is the run's work: continue the run's trace (created
    // by the push), linked to this delivery, so the scan it queues and every
    // step after it join the trace of the commit.
    let span = gantry_runtime::telemetry::run_span("run.image-recorded", NAME, &run);
    hand_over(event, app, digest, deps, &id, &run, note)
        .instrument(span)
        .await
}

/// Records the image on the audit trail and queues the scan when the run waits for it.
async fn hand_over(
    event: &RegistryEvent,
    app: &AppConfig,
    digest: &Digest,
    deps: &Deps,
    id: &RunId,
    run: &Run,
    note: Option<String>,
) -> Result<String, RegistryPushError> {
    deps.audit(audit(
        "run.image-recorded",
        app,
        id,
        serde_json::json!({"digest": digest, "tag": event.tag, "event": event.id}),
    ))
    .await;
    // Hand over to the scan gate whenever the run waits for it. Sent on every
    // (re)delivery until the claim is written; the MessageId makes repeats no-ops.
    if run.status == RunStatus::Scanning
        && let Some(step) = run
            .steps
            .get(steps::SCAN)
            .filter(|s| s.status == StepStatus::Pending)
    {
        let request = StepRequest {
            app: app.name.clone(),
            run_id: id.clone(),
            digest: digest.clone(),
            attempt: step.attempts,
            phase: None,
        };
        let message = OutMessage::json("scan", &request)
            .map_err(|source| RegistryPushError::Queue {
                event: event.id.clone(),
                source,
            })?
            .with_id(request.message_id(steps::SCAN))
            .with_property("run-id", id.to_string())
            .with_property("app", app.name.to_string());
        deps.send(message)
            .await
            .map_err(|source| RegistryPushError::Queue {
                event: event.id.clone(),
                source,
            })?;
        return Ok(format!("run {id}: {digest} recorded, scan queued"));
    }
    Ok(format!(
        "run {id}: {digest} recorded ({})",
        note.unwrap_or_else(|| format!("run is {}", run.status))
    ))
}

/// Which run an image push belongs to.
enum Owner {
    /// This run records the image and goes on to the gates.
    Run(RunId),
    /// `run` (of the tagged commit) found the digest already delivered by `of`.
    Duplicate {
        /// The commit's run.
        run: RunId,
        /// The run that owns the digest.
        of: RunId,
    },
}

/// Decides the run of a pushed image, the same way whatever order its events
/// arrive in (CI pushes `:<sha>` and `:latest` together; ACR sends one event per
/// tag, handled concurrently).
///
/// The digest index `index/digests/{app}/{digest}` is the single owner record:
/// every path claims it (create-if-absent) and acts on the winner. A commit run
/// named by the tag takes over from a `registry` run that won the race but has
/// not reached the cluster; anything else keeps the owner it found.
async fn owner_of(
    event: &RegistryEvent,
    app: &AppConfig,
    digest: &Digest,
    deps: &Deps,
) -> Result<Owner, PipelineError> {
    let commit_run = commit_run_for_tag(event, app, deps).await?;
    match commit_run {
        // A second image for the same commit (a rebuild) gets its own run, so
        // each run's verdicts always belong to exactly one digest.
        Some(run) if run.image.as_ref().is_some_and(|i| i.digest != *digest) => {
            fork_run_for_rebuild(&run, digest, deps)
                .await
                .map(Owner::Run)
        }
        Some(run) => {
            let winner = deps.runs.claim_digest(&app.name, digest, &run.id).await?;
            if winner == run.id {
                return Ok(Owner::Run(run.id));
            }
            take_over(&run, &winner, digest, deps).await
        }
        None => {
            let candidate = gantry_pipeline::ids::new_run_id(unix_ms(OffsetDateTime::now_utc()));
            let winner = deps
                .runs
                .claim_digest(&app.name, digest, &candidate)
                .await?;
            ensure_registry_run(event, app, &winner, deps).await?;
            Ok(Owner::Run(winner))
        }
    }
}

/// The run of the commit the tag names (full sha, or an unambiguous
/// abbreviation), re-created when its commit index outlived a failed push.
async fn commit_run_for_tag(
    event: &RegistryEvent,
    app: &AppConfig,
    deps: &Deps,
) -> Result<Option<Run>, PipelineError> {
    let Some(tag) = event.tag.as_deref() else {
        return Ok(None);
    };
    let found = if let Ok(sha) = CommitSha::parse(tag) {
        deps.runs
            .by_commit(&app.name, &sha)
            .await?
            .map(|id| (sha, id))
    } else if gantry_pipeline::names::is_short_sha(tag) {
        let matches = deps.runs.by_short_sha(&app.name, tag).await?;
        // An ambiguous abbreviation correlates with nothing rather than a guess.
        match <[_; 1]>::try_from(matches) {
            Ok([only]) => Some(only),
            Err(_) => None,
        }
    } else {
        None
    };
    let Some((sha, id)) = found else {
        return Ok(None);
    };
    if let Some(run) = deps.runs.get(&app.name, &id).await? {
        return Ok(Some(run));
    }
    // The push claimed the commit index and then failed (or is being recorded
    // right now). GitHub does not redeliver by itself, so repair here: create
    // the run from what we know. A late webhook finds it and fills in the rest.
    let now = OffsetDateTime::now_utc();
    let source = Source {
        kind: SourceKind::Github,
        repo: Some(app.repo.clone()),
        commit: Some(sha),
        git_ref: None,
        pusher: None,
        delivery: None,
        message: None,
    };
    let mut run = Run::new(
        id.clone(),
        app.name.clone(),
        RunStatus::AwaitingImage,
        source,
        now,
    );
    // A run created here starts its trace at this delivery.
    run.trace = gantry_runtime::telemetry::current();
    if deps.runs.create(&run).await? {
        deps.audit(audit(
            "run.repaired",
            app,
            &id,
            serde_json::json!({"reason": "commit index without run", "event": event.id}),
        ))
        .await;
    }
    deps.runs.get(&app.name, &id).await
}

/// Creates the `registry` run the digest index names, unless it exists (the
/// index is written first, so a crash or a concurrent delivery can leave it
/// dangling for a moment).
async fn ensure_registry_run(
    event: &RegistryEvent,
    app: &AppConfig,
    id: &RunId,
    deps: &Deps,
) -> Result<(), PipelineError> {
    if deps.runs.get(&app.name, id).await?.is_some() {
        return Ok(());
    }
    let source = Source {
        kind: SourceKind::Registry,
        repo: None,
        commit: None,
        git_ref: None,
        pusher: None,
        delivery: Some(event.id.clone()),
        message: None,
    };
    let mut run = Run::new(
        id.clone(),
        app.name.clone(),
        RunStatus::AwaitingImage,
        source,
        OffsetDateTime::now_utc(),
    );
    // A run created here starts its trace at this delivery.
    run.trace = gantry_runtime::telemetry::current();
    // Concurrent deliveries all get here; only the one whose record was stored
    // audits the creation.
    if deps.runs.create(&run).await? {
        deps.audit(audit(
            "run.created",
            app,
            id,
            serde_json::json!({"source": "registry", "event": event.id}),
        ))
        .await;
    }
    Ok(())
}

/// The commit's run found the digest owned by `owner`. A `registry` run (no
/// commit: it came from a non-commit tag such as `latest`) that has not reached
/// the cluster hands the digest over and is superseded; any other owner keeps it.
async fn take_over(
    commit_run: &Run,
    owner: &RunId,
    digest: &Digest,
    deps: &Deps,
) -> Result<Owner, PipelineError> {
    let app = &commit_run.app;
    let Some(current) = deps.runs.get(app, owner).await? else {
        // The owner is being created right now: look again on redelivery.
        return Err(PipelineError::Contention {
            name: blobs::run(app, owner),
            attempts: 1,
        });
    };
    let replaceable = current.source.kind == SourceKind::Registry
        && matches!(
            current.status,
            RunStatus::AwaitingImage
                | RunStatus::Scanning
                | RunStatus::CheckingPolicy
                | RunStatus::AwaitingApproval
                | RunStatus::Superseded
        );
    if !replaceable {
        return Ok(Owner::Duplicate {
            run: commit_run.id.clone(),
            of: owner.clone(),
        });
    }
    // Re-point the digest index at the commit run (compare-and-swap: only if it
    // still names the registry run), then supersede the registry run.
    let name = blobs::digest_index(app, digest);
    if let Some(v) = deps.runs.raw().get(&name).await? {
        if String::from_utf8_lossy(&v.body).trim() == owner.as_str() {
            deps.runs
                .raw()
                .replace(&name, commit_run.id.as_str().as_bytes(), &v.etag)
                .await?;
        } else if String::from_utf8_lossy(&v.body).trim() != commit_run.id.as_str() {
            return Err(PipelineError::Contention { name, attempts: 1 });
        }
    }
    let summary = format!("image {digest} belongs to run {} of commit", commit_run.id);
    deps.runs
        .update(app, owner, |r| {
            if r.status == RunStatus::Superseded {
                return Ok(false);
            }
            r.status = RunStatus::Superseded;
            let now = OffsetDateTime::now_utc();
            let mut step = Step::finished(StepStatus::Skipped, now, summary.clone());
            step.details = serde_json::json!({"superseded_by": commit_run.id});
            r.steps.insert("superseded".into(), step);
            Ok(true)
        })
        .await?;
    deps.audit(AuditEntry {
        at: OffsetDateTime::now_utc(),
        actor: NAME.into(),
        action: "run.superseded".into(),
        app: Some(app.clone()),
        run: Some(owner.clone()),
        detail: serde_json::json!({"by": commit_run.id, "digest": digest}),
    })
    .await;
    Ok(Owner::Run(commit_run.id.clone()))
}

async fn fork_run_for_rebuild(
    run: &Run,
    digest: &Digest,
    deps: &Deps,
) -> Result<RunId, PipelineError> {
    let now = OffsetDateTime::now_utc();
    let candidate = gantry_pipeline::ids::new_run_id(unix_ms(now));
    let id = deps.runs.claim_digest(&run.app, digest, &candidate).await?;
    if deps.runs.get(&run.app, &id).await?.is_none() {
        let mut fresh = Run::new(
            id.clone(),
            run.app.clone(),
            RunStatus::AwaitingImage,
            run.source.clone(),
            now,
        );
        fresh.trace = gantry_runtime::telemetry::current();
        if deps.runs.create(&fresh).await? {
            deps.audit(AuditEntry {
                at: now,
                actor: NAME.into(),
                action: "run.created".into(),
                app: Some(run.app.clone()),
                run: Some(id.clone()),
                detail: serde_json::json!({"source": "rebuild", "of": run.id, "digest": digest}),
            })
            .await;
        }
    }
    Ok(id)
}

async fn on_deleted(
    event: &RegistryEvent,
    app: &AppConfig,
    digest: &Digest,
    deps: &Deps,
) -> Result<String, RegistryPushError> {
    let record = |source: PipelineError| RegistryPushError::Record {
        event: event.id.clone(),
        source,
    };
    let name = blobs::deployed(&app.name);
    let deployed: Option<Deployed> = match deps.runs.raw().get(&name).await {
        // An unreadable record must not look like "not deployed": that would
        // silently swallow a security-relevant alert.
        Ok(Some(v)) => Some(serde_json::from_slice(&v.body).map_err(|e| {
            record(PipelineError::Decode {
                name: name.clone(),
                message: e.to_string(),
            })
        })?),
        Ok(None) => None,
        Err(e) => return Err(record(e.into())),
    };
    let deployed = deployed.unwrap_or_default();
    // The running digest: nodes can no longer pull it (scale-out, node
    // replacement fail). The rollback target: a rollback would fail.
    let (current, severity, kind, why) = match (deployed.current, deployed.previous) {
        (Some(c), _) if c.digest == *digest => (
            c,
            Severity::High,
            "image-deleted",
            format!("while {} runs it: nodes can no longer pull it", app.name),
        ),
        (_, Some(p)) if p.digest == *digest => (
            p,
            Severity::Warning,
            "rollback-target-deleted",
            format!(
                "but it is the rollback target of {}: a rollback would fail",
                app.name
            ),
        ),
        _ => return Ok(format!("{digest} deleted; not deployed")),
    };
    let mut alert = Alert::new(
        kind,
        severity,
        format!(
            "{}/{}@{digest} was deleted from the registry {why}",
            event.registry, event.repository
        ),
    );
    alert.app = Some(app.name.clone());
    alert.run_id = Some(current.run_id.clone());
    alert.digest = Some(digest.clone());
    let message = OutMessage::json("alerts", &alert)
        .map_err(|source| RegistryPushError::Queue {
            event: event.id.clone(),
            source,
        })?
        .with_id(format!("{}:{kind}", current.run_id));
    deps.send(message)
        .await
        .map_err(|source| RegistryPushError::Queue {
            event: event.id.clone(),
            source,
        })?;
    deps.audit(audit(
        &format!("image.{kind}"),
        app,
        &current.run_id,
        serde_json::json!({"digest": digest}),
    ))
    .await;
    Ok(format!(
        "{digest} deleted while deployed; {kind} alert queued"
    ))
}

fn audit(action: &str, app: &AppConfig, run: &RunId, detail: serde_json::Value) -> AuditEntry {
    AuditEntry {
        at: OffsetDateTime::now_utc(),
        actor: NAME.into(),
        action: action.into(),
        app: Some(app.name.clone()),
        run: Some(run.clone()),
        detail,
    }
}

fn unix_ms(t: OffsetDateTime) -> u64 {
    (t.unix_timestamp_nanos() / 1_000_000) as u64
}
