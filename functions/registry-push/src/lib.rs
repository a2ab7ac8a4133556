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
use gantry_events::acr::{RegistryAction, RegistryEvent, decode_registry_events};
use gantry_pipeline::messages::Deployed;
use gantry_pipeline::run::steps;
use gantry_pipeline::runs::blobs;
use gantry_pipeline::{
    Alert, AppConfig, AuditEntry, ClaimSource, CommitSha, Digest, Image, PipelineError, Run, RunId,
    RunStatus, Severity, Source, SourceKind, Step, StepRequest, StepStatus,
};
use gantry_runtime::{Deps, Done, FromMessage, Function, FunctionError, Invocation};
use time::OffsetDateTime;

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

/// One message: one or more registry events.
#[derive(Debug, Clone)]
pub struct RegistryMessage(pub Vec<RegistryEvent>);

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
            RegistryPushError::ParseDigest { .. } => false,
            RegistryPushError::Record { source, .. } => source.is_transient(),
            RegistryPushError::Queue { source, .. } => source.is_transient(),
        }
    }
}

/// Handles one message (lambda style).
pub async fn handle(
    inv: Invocation<RegistryMessage>,
    deps: &Deps,
) -> Result<Done, RegistryPushError> {
    let mut lines = Vec::new();
    for event in &inv.event.0 {
        lines.push(handle_event(event, deps).await?);
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
    let run_id = correlate(event, app, digest, deps).await.map_err(record)?;
    let id = match run_id {
        Some(id) => id,
        None => {
            // No push knows this image: a run with source `registry`, keyed by
            // the digest so a redelivery finds it instead of making another.
            let now = OffsetDateTime::now_utc();
            let candidate = gantry_pipeline::ids::new_run_id(unix_ms(now));
            let id = deps
                .runs
                .claim_digest(&app.name, digest, &candidate)
                .await
                .map_err(record)?;
            if deps
                .runs
                .get(&app.name, &id)
                .await
                .map_err(record)?
                .is_none()
            {
                let source = Source {
                    kind: SourceKind::Registry,
                    repo: None,
                    commit: None,
                    git_ref: None,
                    pusher: None,
                    delivery: Some(event.id.clone()),
                    message: None,
                };
                let run = Run::new(
                    id.clone(),
                    app.name.clone(),
                    RunStatus::AwaitingImage,
                    source,
                    now,
                );
                // Concurrent deliveries all get here; only the one whose record
                // was stored audits the creation.
                if deps.runs.create(&run).await.map_err(record)? {
                    deps.audit(audit(
                        "run.created",
                        app,
                        &id,
                        serde_json::json!({"source": "registry", "event": event.id}),
                    ))
                    .await;
                }
            }
            id
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
                    // Another digest for the same commit won the race since
                    // `correlate` looked. Never overwrite a verdict's digest:
                    // report contention, so the redelivery correlates again and
                    // forks a run for this digest (a rebuild).
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
    // Index the digest (idempotent; may already point here).
    deps.runs
        .claim_digest(&app.name, digest, &id)
        .await
        .map_err(record)?;
    deps.audit(audit(
        "run.image-recorded",
        app,
        &id,
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

/// Finds the run this image belongs to: the run already holding the digest, or
/// the run of the commit the tag names when it has no image yet. `None` means
/// "start a registry run".
async fn correlate(
    event: &RegistryEvent,
    app: &AppConfig,
    digest: &Digest,
    deps: &Deps,
) -> Result<Option<RunId>, PipelineError> {
    if let Some(id) = deps.runs.by_digest(&app.name, digest).await? {
        // The index is written before the run it names. A missing run is being
        // created by a concurrent delivery or was lost in a crash: the creation
        // paths below claim this same id and (re)create it.
        if deps.runs.get(&app.name, &id).await?.is_some() {
            return Ok(Some(id));
        }
    }
    let Some(tag) = event.tag.as_deref() else {
        return Ok(None);
    };
    let by_commit = if let Ok(sha) = CommitSha::parse(tag) {
        deps.runs.by_commit(&app.name, &sha).await?
    } else if gantry_pipeline::names::is_short_sha(tag) {
        let matches = deps.runs.by_short_sha(&app.name, tag).await?;
        // An ambiguous abbreviation correlates with nothing rather than a guess.
        match matches.as_slice() {
            [(_, id)] => Some(id.clone()),
            _ => None,
        }
    } else {
        None
    };
    let Some(id) = by_commit else {
        return Ok(None);
    };
    match deps.runs.get(&app.name, &id).await? {
        // A second image for the same commit (a rebuild) gets its own run, so
        // each run's verdicts always belong to exactly one digest.
        Some(run) if run.image.as_ref().is_some_and(|i| i.digest != *digest) => {
            fork_run_for_rebuild(&run, digest, deps).await.map(Some)
        }
        Some(_) => Ok(Some(id)),
        // The push is being recorded right now (its commit index is written
        // before its run): transient, so the host redelivers in a moment.
        None => Err(PipelineError::Contention {
            name: blobs::run(&app.name, &id),
            attempts: 1,
        }),
    }
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
        let fresh = Run::new(
            id.clone(),
            run.app.clone(),
            RunStatus::AwaitingImage,
            run.source.clone(),
            now,
        );
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
    let deployed: Option<Deployed> = match deps.runs.raw().get(&blobs::deployed(&app.name)).await {
        Ok(Some(v)) => serde_json::from_slice(&v.body).ok(),
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
