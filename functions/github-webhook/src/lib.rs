//! `github-webhook`: GitHub's webhook deliveries (`POST /api/github`).
//!
//! The HMAC (`X-Hub-Signature-256`) is verified over the exact bytes received,
//! in constant time, before anything is parsed. Each delivery
//! (`X-GitHub-Delivery`) is processed at most once: a redelivery answers 200
//! and changes nothing. A `push` to a configured repository and branch creates
//! a run in `awaiting-image`, indexed by its commit; a failed `workflow_run`
//! for a known commit fails that run and queues an alert.
//!
//! Every rejection (401, 413, 415, 400) happens before any write.

use std::sync::Arc;

use axum::Router;
use axum::body::Body;
use axum::extract::{DefaultBodyLimit, State};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use gantry_bus::OutMessage;
use gantry_events::github::{GithubEvent, NULL_SHA, PushEvent, WorkflowRunEvent};
use gantry_pipeline::run::steps;
use gantry_pipeline::{
    Alert, AppName, AuditEntry, ClaimSource, CommitSha, PipelineError, Run, RunStatus, Severity,
    Source, SourceKind, Step, StepStatus,
};
use gantry_runtime::{ApiError, Deps, Function};
use http::{HeaderMap, StatusCode};
use serde::Serialize;
use time::OffsetDateTime;
use tracing::Instrument as _;

/// Function name: folder, route segment and span.
pub const NAME: &str = "github-webhook";

/// GitHub caps webhook payloads at 25 MB; anything bigger is not from GitHub.
pub const MAX_BODY_BYTES: usize = 25 * 1024 * 1024;

/// Bodies up to this size (declared by Content-Length) are read without a permit.
pub const SMALL_BODY_BYTES: u64 = 1024 * 1024;

/// How many larger bodies may be buffered at once.
pub const LARGE_BODY_PERMITS: usize = 4;

static LARGE_BODIES: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(LARGE_BODY_PERMITS);

/// The function's registration.
pub fn function() -> Function {
    Function::http(NAME, "github", &["post"], routes)
}

fn routes() -> Router<Arc<Deps>> {
    Router::new().route(
        "/api/github",
        // The limit is enforced in the handler (to answer 413 with a JSON error
        // naming the limit); axum's default 2 MB limit must not cut in first.
        post(webhook).layer(DefaultBodyLimit::disable()),
    )
}

/// Why a delivery was refused or could not be processed.
#[derive(Debug, thiserror::Error)]
pub enum WebhookError {
    /// Body larger than [`MAX_BODY_BYTES`].
    #[error("payload larger than {MAX_BODY_BYTES} bytes")]
    ReadBodyTooLarge,
    /// Too many large deliveries are being read at once.
    #[error("too many large deliveries in flight; retry later")]
    ReadBodyBusy,
    /// The connection failed while reading the body.
    #[error("reading the request body failed: {0}")]
    ReadBody(String),
    /// No webhook secret is configured: every delivery is refused.
    #[error("the webhook secret is not configured (GANTRY_GITHUB_WEBHOOK_SECRET)")]
    VerifyNotConfigured,
    /// `X-Hub-Signature-256` missing.
    #[error("missing X-Hub-Signature-256 header")]
    VerifyMissingSignature,
    /// Signature does not match the body.
    #[error("X-Hub-Signature-256 does not match the payload")]
    VerifyBadSignature,
    /// Not `application/json`.
    #[error(
        "unsupported content type {0:?}: configure the webhook with content type application/json"
    )]
    ParseContentType(String),
    /// A required header is missing or malformed.
    #[error("missing or invalid {0} header")]
    ParseHeader(&'static str),
    /// Payload is not valid JSON of the event's shape.
    #[error("{0}")]
    ParsePayload(String),
    /// Reading or writing state failed.
    #[error("recording the delivery failed: {0}")]
    Record(#[from] PipelineError),
    /// Queueing a message failed.
    #[error("queueing a message failed: {0}")]
    Queue(#[from] gantry_bus::BusError),
}

impl WebhookError {
    /// Whether GitHub (or an operator) redelivering may succeed.
    pub fn is_transient(&self) -> bool {
        match self {
            WebhookError::ReadBody(_) | WebhookError::ReadBodyBusy => true,
            WebhookError::Record(e) => e.is_transient(),
            WebhookError::Queue(e) => e.is_transient(),
            _ => false,
        }
    }
}

impl From<WebhookError> for ApiError {
    fn from(e: WebhookError) -> ApiError {
        let message = e.to_string();
        let (status, code) = match &e {
            WebhookError::ReadBodyTooLarge => (StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large"),
            WebhookError::ReadBody(_) => (StatusCode::BAD_REQUEST, "bad_body"),
            WebhookError::ReadBodyBusy => (StatusCode::SERVICE_UNAVAILABLE, "busy"),
            WebhookError::VerifyNotConfigured => {
                (StatusCode::SERVICE_UNAVAILABLE, "not_configured")
            }
            WebhookError::VerifyMissingSignature => (StatusCode::UNAUTHORIZED, "missing_signature"),
            WebhookError::VerifyBadSignature => (StatusCode::UNAUTHORIZED, "bad_signature"),
            WebhookError::ParseContentType(_) => {
                (StatusCode::UNSUPPORTED_MEDIA_TYPE, "unsupported_media_type")
            }
            WebhookError::ParseHeader(_) => (StatusCode::BAD_REQUEST, "bad_header"),
            WebhookError::ParsePayload(_) => (StatusCode::BAD_REQUEST, "bad_payload"),
            WebhookError::Record(_) | WebhookError::Queue(_) if e.is_transient() => {
                (StatusCode::SERVICE_UNAVAILABLE, "unavailable")
            }
            WebhookError::Record(_) | WebhookError::Queue(_) => {
                (StatusCode::INTERNAL_SERVER_ERROR, "internal")
            }
        };
        ApiError::new(status, code, message)
    }
}

/// What the webhook answers on success.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Reply {
    /// `accepted`, `ignored`, `duplicate` or `pong`.
    pub status: &'static str,
    /// Why nothing happened (ignored deliveries).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Runs created or changed.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub runs: Vec<RunRef>,
}

/// A run touched by a delivery.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct RunRef {
    /// App.
    pub app: String,
    /// Run id.
    pub run_id: String,
    /// Status after the delivery.
    pub status: RunStatus,
}

async fn webhook(State(deps): State<Arc<Deps>>, headers: HeaderMap, body: Body) -> Response {
    match handle(&deps, &headers, body).await {
        Ok((status, reply)) => (status, axum::Json(reply)).into_response(),
        Err(e) => {
            if e.is_transient() {
                tracing::warn!(function = NAME, error = %e, "delivery failed, GitHub may redeliver");
            } else {
                tracing::info!(function = NAME, error = %e, "delivery refused");
            }
            ApiError::from(e).into_response()
        }
    }
}

fn header<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

async fn handle(
    deps: &Deps,
    headers: &HeaderMap,
    body: Body,
) -> Result<(StatusCode, Reply), WebhookError> {
    // 1. Size, before reading: a declared length over the limit is refused at once.
    if header(headers, "content-length")
        .and_then(|v| v.parse::<u64>().ok())
        .is_some_and(|n| n > MAX_BODY_BYTES as u64)
    {
        return Err(WebhookError::ReadBodyTooLarge);
    }
    // Bodies are buffered before the HMAC can be checked, so unauthenticated
    // callers could make us hold 25 MiB each: large (or unsized) bodies take a
    // permit from a small pool, bounding that memory to LARGE_BODY_PERMITS × 25 MiB.
    let declared = header(headers, "content-length").and_then(|v| v.parse::<u64>().ok());
    let _permit = if declared.is_some_and(|n| n <= SMALL_BODY_BYTES) {
        None
    } else {
        match tokio::time::timeout(std::time::Duration::from_secs(10), LARGE_BODIES.acquire()).await
        {
            Ok(Ok(permit)) => Some(permit),
            _ => return Err(WebhookError::ReadBodyBusy),
        }
    };
    let bytes = axum::body::to_bytes(body, MAX_BODY_BYTES)
        .await
        .map_err(|e| {
            if std::error::Error::source(&e).is_some_and(|s| s.to_string().contains("length limit"))
            {
                WebhookError::ReadBodyTooLarge
            } else {
                WebhookError::ReadBody(e.to_string())
            }
        })?;

    // 2. Authenticity, over the exact bytes, before looking at anything else.
    let secret = deps
        .secrets
        .github_webhook
        .as_ref()
        .ok_or(WebhookError::VerifyNotConfigured)?;
    let signature =
        header(headers, "x-hub-signature-256").ok_or(WebhookError::VerifyMissingSignature)?;
    if !gantry_runtime::signature::verify_sha256(secret.expose(), &bytes, signature) {
        return Err(WebhookError::VerifyBadSignature);
    }

    // 3. Shape.
    let content_type = header(headers, "content-type").unwrap_or("");
    let mime = content_type.split(';').next().unwrap_or("").trim();
    if !mime.eq_ignore_ascii_case("application/json") {
        return Err(WebhookError::ParseContentType(
            content_type.chars().take(100).collect(),
        ));
    }
    // GitHub's event names are lowercase words (`push`, `workflow_run`) and
    // its delivery ids GUIDs: anything else is refused, not just escaped,
    // since both end up in records, logs and (hashed) blob names.
    let event_name = header(headers, "x-github-event")
        .filter(|v| {
            !v.is_empty() && v.len() <= 64 && v.bytes().all(|b| b.is_ascii_lowercase() || b == b'_')
        })
        .ok_or(WebhookError::ParseHeader("X-GitHub-Event"))?;
    let delivery = header(headers, "x-github-delivery")
        .filter(|v| {
            !v.is_empty()
                && v.len() <= 100
                && v.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        })
        .ok_or(WebhookError::ParseHeader("X-GitHub-Delivery"))?;
    let event = GithubEvent::decode(event_name, &bytes)
        .map_err(|e| WebhookError::ParsePayload(e.to_string()))?;

    // 4. Once per delivery.
    if deps.runs.is_claimed(ClaimSource::Github, delivery).await? {
        return Ok((
            StatusCode::OK,
            reply("duplicate", Some("delivery already processed".into())),
        ));
    }
    let (status, reply) = match event {
        GithubEvent::Ping(_) => return Ok((StatusCode::OK, reply("pong", None))),
        GithubEvent::Push(push) => on_push(deps, &push, delivery).await?,
        GithubEvent::WorkflowRun(wr) => on_workflow_run(deps, &wr).await?,
        GithubEvent::Other(name) => (
            StatusCode::ACCEPTED,
            reply(
                "ignored",
                Some(format!("event {name:?} is not used by gantry")),
            ),
        ),
    };
    // Claimed after processing (which is idempotent), so a crash in between
    // leaves the delivery redeliverable instead of lost.
    let record = serde_json::json!({
        "event": event_name,
        "at": now_rfc3339(),
        "status": reply.status,
        "runs": reply.runs,
    });
    deps.runs
        .claim(ClaimSource::Github, delivery, &record)
        .await?;
    Ok((status, reply))
}

fn reply(status: &'static str, reason: Option<String>) -> Reply {
    Reply {
        status,
        reason,
        runs: Vec::new(),
    }
}

fn now_rfc3339() -> String {
    OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

async fn on_push(
    deps: &Deps,
    push: &PushEvent,
    delivery: &str,
) -> Result<(StatusCode, Reply), WebhookError> {
    let ignored = |reason: String| Ok((StatusCode::ACCEPTED, reply("ignored", Some(reason))));
    if push.deleted || push.after == NULL_SHA {
        return ignored(format!("{} was deleted", push.git_ref));
    }
    if push.git_ref.starts_with("refs/tags/") {
        return ignored(format!("tag push {} does not start a run", push.git_ref));
    }
    let apps: Vec<_> = deps
        .config
        .apps_for_repo(&push.repository.full_name)
        .collect();
    if apps.is_empty() {
        return ignored(format!(
            "repository {} is not configured",
            push.repository.full_name
        ));
    }
    let tracking: Vec<_> = apps
        .into_iter()
        .filter(|a| a.tracks_ref(&push.git_ref))
        .collect();
    if tracking.is_empty() {
        return ignored(format!("{} is not a configured branch", push.git_ref));
    }
    let sha = CommitSha::parse(&push.after)
        .map_err(|e| WebhookError::ParsePayload(format!("after: {e}")))?;
    let mut runs = Vec::new();
    for app in tracking {
        let run = create_run_for_commit(deps, &app.name, &sha, push, delivery).await?;
        runs.push(RunRef {
            app: run.app.to_string(),
            run_id: run.id.to_string(),
            status: run.status,
        });
    }
    // The request span names the run when there is one (the usual case: one
    // app per repository); several runs each have their `run.created` span.
    if let [only] = runs.as_slice() {
        gantry_runtime::telemetry::record_run(&tracing::Span::current(), &only.app, &only.run_id);
    }
    Ok((
        StatusCode::ACCEPTED,
        Reply {
            status: "accepted",
            reason: None,
            runs,
        },
    ))
}

/// Creates the run of `sha` for `app`, or returns the one that already exists.
/// Safe under redelivery and races: the commit index is claimed first, so all
/// contenders agree on one run id, and creating that run twice is a no-op.
async fn create_run_for_commit(
    deps: &Deps,
    app: &AppName,
    sha: &CommitSha,
    push: &PushEvent,
    delivery: &str,
) -> Result<Run, WebhookError> {
    let now = OffsetDateTime::now_utc();
    let candidate =
        gantry_pipeline::ids::new_run_id((now.unix_timestamp_nanos() / 1_000_000) as u64);
    let id = deps.runs.claim_commit(app, sha, &candidate).await?;
    let source = Source {
        kind: SourceKind::Github,
        repo: Some(push.repository.full_name.clone()),
        commit: Some(sha.clone()),
        git_ref: Some(push.git_ref.clone()),
        pusher: Some(
            push.sender
                .as_ref()
                .map(|s| s.login.clone())
                .unwrap_or_else(|| push.pusher.name.clone()),
        ),
        delivery: Some(delivery.to_string()),
        message: push
            .head_commit
            .as_ref()
            .and_then(|c| c.message.lines().next())
            .map(|l| l.chars().take(200).collect()),
    };
    if let Some(existing) = deps.runs.get(app, &id).await? {
        if existing.source.delivery.is_some() {
            return Ok(existing);
        }
        // registry-push repaired this run from a dangling commit index (a push
        // that failed half-way): fill in what only the push knows.
        return Ok(deps
            .runs
            .update(app, &id, |run| {
                if run.source.delivery.is_some() {
                    return Ok(false);
                }
                run.source = source.clone();
                Ok(true)
            })
            .await?);
    }
    let mut run = Run::new(
        id.clone(),
        app.clone(),
        RunStatus::AwaitingImage,
        source,
        now,
    );
    // The run's trace starts here, in a span of its own (one push may start
    // runs of several apps): every later step of the run continues it.
    let span =
        gantry_runtime::telemetry::new_run_span("run.created", NAME, app.as_str(), id.as_str());
    run.trace = gantry_runtime::telemetry::context_of(&span);
    async {
        // Concurrent deliveries of one commit all reach this point; `create` keeps
        // the first record. Only the delivery whose record was stored audits the
        // creation, and every delivery answers with the stored run.
        if !deps.runs.create(&run).await? {
            return Ok(deps.runs.get(app, &id).await?.unwrap_or(run));
        }
        deps.audit(AuditEntry {
            at: now,
            actor: NAME.into(),
            action: "run.created".into(),
            app: Some(app.clone()),
            run: Some(id.clone()),
            detail: serde_json::json!({"commit": sha, "ref": push.git_ref, "delivery": delivery}),
        })
        .await;
        Ok(run)
    }
    .instrument(span)
    .await
}

async fn on_workflow_run(
    deps: &Deps,
    event: &WorkflowRunEvent,
) -> Result<(StatusCode, Reply), WebhookError> {
    if !event.failed() {
        return Ok((
            StatusCode::ACCEPTED,
            reply(
                "ignored",
                Some("only failed, completed workflow runs change a run".into()),
            ),
        ));
    }
    let Ok(sha) = CommitSha::parse(&event.workflow_run.head_sha) else {
        return Err(WebhookError::ParsePayload(
            "workflow_run.head_sha is not a commit sha".into(),
        ));
    };
    let conclusion = event.workflow_run.conclusion.clone().unwrap_or_default();
    let workflow = event
        .workflow_run
        .name
        .clone()
        .unwrap_or_else(|| "workflow".into());
    let mut runs = Vec::new();
    for app in deps.config.apps_for_repo(&event.repository.full_name) {
        // Only the workflows that build this app's image, run for a push to a
        // tracked branch, speak for its runs: a failing lint on a pull request
        // or a scheduled job must not fail a delivery.
        let wr = &event.workflow_run;
        let is_build = app.ci_workflows.is_empty()
            || wr
                .name
                .as_ref()
                .is_some_and(|n| app.ci_workflows.contains(n));
        let on_push = wr.event.as_deref().is_none_or(|e| e == "push")
            && wr
                .head_branch
                .as_deref()
                .is_none_or(|b| app.tracks_ref(&format!("refs/heads/{b}")));
        if !is_build || !on_push {
            continue;
        }
        let Some(id) = deps.runs.by_commit(&app.name, &sha).await? else {
            continue;
        };
        if deps.runs.get(&app.name, &id).await?.is_none() {
            // A push that failed half-way: nothing to fail yet.
            continue;
        }
        let summary = format!("{workflow} concluded {conclusion}");
        let mut changed = false;
        let run = deps
            .runs
            .update(&app.name, &id, |run| {
                // A run already past the gates (or finished) keeps its own verdicts.
                if !matches!(run.status, RunStatus::AwaitingImage | RunStatus::Scanning) {
                    changed = false;
                    return Ok(false);
                }
                let now = OffsetDateTime::now_utc();
                let mut step = Step::finished(StepStatus::Failed, now, summary.clone());
                step.details = serde_json::json!({"url": event.workflow_run.html_url});
                run.steps.insert(steps::CI.into(), step);
                run.status = RunStatus::Failed;
                changed = true;
                Ok(true)
            })
            .await?;
        // Sent whenever the run stands failed by CI, not only when this delivery
        // changed it: if a previous attempt crashed after the update, the alert
        // still goes out, and the MessageId makes a repeat a no-op.
        if run
            .steps
            .get(steps::CI)
            .is_some_and(|s| s.status == StepStatus::Failed)
        {
            let mut alert = Alert::new("run-failed", Severity::High, summary.clone());
            alert.app = Some(app.name.clone());
            alert.run_id = Some(id.clone());
            alert.step = Some(steps::CI.into());
            alert.detail = serde_json::json!({"url": event.workflow_run.html_url});
            let message =
                OutMessage::json("alerts", &alert)?.with_id(format!("{id}:alert:ci-failed"));
            // The failure belongs to the run's trace, not to this delivery's.
            match gantry_runtime::telemetry::continue_run("run.alert-queued", &run) {
                Some(span) => deps.send(message).instrument(span).await?,
                None => deps.send(message).await?,
            }
        }
        if changed {
            deps.audit(AuditEntry {
                at: OffsetDateTime::now_utc(),
                actor: NAME.into(),
                action: "run.failed".into(),
                app: Some(app.name.clone()),
                run: Some(id.clone()),
                detail: serde_json::json!({"step": steps::CI, "reason": summary}),
            })
            .await;
        }
        runs.push(RunRef {
            app: app.name.to_string(),
            run_id: id.to_string(),
            status: run.status,
        });
    }
    if runs.is_empty() {
        return Ok((
            StatusCode::ACCEPTED,
            reply("ignored", Some(format!("no run for commit {sha}"))),
        ));
    }
    Ok((
        StatusCode::ACCEPTED,
        Reply {
            status: "accepted",
            reason: None,
            runs,
        },
    ))
}
