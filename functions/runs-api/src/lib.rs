//! `runs-api`: the operator API under `/api/runs`, `/api/apps`, `/api/audit`
//! (open `cluster-audit` findings) and `/api/health`.
//!
//! The Functions host orders HTTP routes alphabetically by function, not by
//! ASP.NET precedence, so this function's route is constrained to its own
//! first path segments (`runs`, `apps`, `health`, `audit`) and can never shadow
//! `github-webhook`. [`AREAS`] is checked against `function.json` in tests.
//!
//! Every route but `/api/health` needs `Authorization: Bearer <token>` with a
//! token configured in `GANTRY_API_TOKENS` ([`gantry_runtime::auth`]).

pub mod audit;
pub mod list;
pub mod retrigger;
mod rollback;

use std::sync::Arc;

use axum::Router;
use axum::extract::{Path, State};
use axum::response::Json;
use axum::routing::{get, post};
use gantry_pipeline::run::steps;
use gantry_pipeline::{AuditEntry, PipelineError, Run, RunId, RunStatus, Step, StepStatus};
use gantry_runtime::auth::{Scope, authorize};
use gantry_runtime::steps as step;
use gantry_runtime::{ApiError, Deps, Function};
use http::{HeaderMap, StatusCode};
use time::OffsetDateTime;

/// Function name: folder, route and span.
pub const NAME: &str = "runs-api";

/// First path segments under `/api/` this function serves.
pub const AREAS: &[&str] = &["runs", "apps", "health", "audit"];

/// Longest rejection reason accepted, in characters.
pub const MAX_REASON_CHARS: usize = 500;

/// The function's registration.
pub fn function() -> Function {
    Function::http(
        NAME,
        "{area:regex(^(runs|apps|health|audit)$)}/{*rest}",
        &["get", "post"],
        routes,
    )
}

fn routes() -> Router<Arc<Deps>> {
    Router::new()
        .route("/api/health", get(health))
        .route("/api/runs", get(list::list))
        .route("/api/audit", get(audit::list))
        .route("/api/runs/{id}", get(show))
        .route("/api/runs/{id}/retrigger", post(retrigger::retrigger))
        .route("/api/runs/{id}/approve", post(approve))
        .route("/api/runs/{id}/reject", post(reject))
        .route("/api/apps/{app}/rollback", post(rollback::rollback))
}

/// Liveness: answers as soon as the process serves HTTP, without touching
/// storage, so the host's warm-up and probes never depend on a dependency.
async fn health() -> Json<serde_json::Value> {
    Json(serde_json::json!({"status": "ok", "version": env!("CARGO_PKG_VERSION")}))
}

pub(crate) fn store_error(e: PipelineError) -> ApiError {
    if e.is_transient() {
        ApiError::unavailable(e.to_string())
    } else {
        ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string())
    }
}

pub(crate) async fn load(deps: &Deps, id: &str) -> Result<Run, ApiError> {
    let id = RunId::parse(id)
        .map_err(|e| ApiError::bad_request("bad_run_id", format!("invalid run id: {e}")))?;
    deps.runs
        .find(&id)
        .await
        .map_err(store_error)?
        .ok_or_else(|| ApiError::not_found(format!("no run {id}")))
}

/// Days of audit trail `GET /api/runs/{id}` reads at most for one run.
pub const MAX_AUDIT_DAYS: usize = 14;
/// Audit entries `GET /api/runs/{id}` returns at most (the newest).
pub const MAX_AUDIT_ENTRIES: usize = 500;

/// The whole record of a run: its JSON fields as stored (DESIGN.md §4) plus
/// `audit`, the audit trail entries about it.
#[derive(Debug, serde::Serialize)]
pub struct RunRecord {
    /// The run, fields unchanged.
    #[serde(flatten)]
    pub run: Run,
    /// Audit entries of the run, oldest first.
    pub audit: Vec<AuditEntry>,
}

/// `GET /api/runs/{id}` (read scope): the run record with its audit entries.
async fn show(
    State(deps): State<Arc<Deps>>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Json<RunRecord>, ApiError> {
    authorize(&deps.secrets, &headers, Scope::Read)?;
    let run = load(&deps, &id).await?;
    let audit = run_audit(&deps, &run).await?;
    Ok(Json(RunRecord { run, audit }))
}

/// Audit entries of `run` from the `audit/{day}.jsonl` blobs of the days it
/// spans: from its creation to the day after its last update (an audit
/// line may be appended just after the update it describes, across
/// midnight), never past today. A run spanning more than
/// [`MAX_AUDIT_DAYS`] days reads its first and its latest days only.
async fn run_audit(deps: &Deps, run: &Run) -> Result<Vec<AuditEntry>, ApiError> {
    let today = OffsetDateTime::now_utc().date();
    let first = run.created_at.date();
    let last = (run.updated_at.date().next_day().unwrap_or(today)).min(today);
    let mut days = Vec::new();
    let mut d = first;
    while d <= last {
        days.push(d);
        match d.next_day() {
            Some(n) => d = n,
            None => break,
        }
    }
    if days.len() > MAX_AUDIT_DAYS {
        let tail = days.split_off(days.len() - (MAX_AUDIT_DAYS - 1));
        days.truncate(1);
        days.extend(tail);
    }
    let mut out = Vec::new();
    for day in days {
        let entries = deps
            .runs
            .audit_day(day.midnight().assume_utc())
            .await
            .map_err(store_error)?;
        out.extend(
            entries
                .into_iter()
                .filter(|e| e.run.as_ref() == Some(&run.id)),
        );
    }
    if out.len() > MAX_AUDIT_ENTRIES {
        out.drain(..out.len() - MAX_AUDIT_ENTRIES);
    }
    Ok(out)
}

fn not_awaiting(run: &Run) -> ApiError {
    let approval = run.steps.get(steps::APPROVAL).map_or_else(
        || "absent".to_string(),
        |s| format!("{:?}", s.status).to_lowercase(),
    );
    ApiError::new(
        StatusCode::CONFLICT,
        "not_awaiting_approval",
        format!(
            "run {} is {} (approval step {approval}), not awaiting approval",
            run.id, run.status
        ),
    )
}

fn awaiting(run: &Run) -> bool {
    run.status == RunStatus::AwaitingApproval
        && run
            .steps
            .get(steps::APPROVAL)
            .is_some_and(|s| s.status == StepStatus::Pending)
}

enum Decision {
    Conflict,
    Expired,
    Done,
}

/// `POST /api/runs/{id}/approve` (operate scope): the approval step passes,
/// the run becomes `deploying` and its `deploy` message is sent. After the
/// app's `approval_expiry` the run is blocked instead (409 `approval_expired`).
async fn approve(
    State(deps): State<Arc<Deps>>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Json<Run>, ApiError> {
    let principal = authorize(&deps.secrets, &headers, Scope::Operate)?.name;
    let run = load(&deps, &id).await?;
    let Some(digest) = run.image.as_ref().map(|i| i.digest.clone()) else {
        return Err(not_awaiting(&run));
    };
    let expiry = deps
        .config
        .apps
        .iter()
        .find(|a| a.name == run.app)
        .map_or(std::time::Duration::from_secs(24 * 3600), |a| {
            a.approval_expiry
        });
    let now = OffsetDateTime::now_utc();
    let mut decision = Decision::Conflict;
    let updated = deps
        .runs
        .update(&run.app, &run.id, |r| {
            decision = Decision::Conflict;
            if !awaiting(r) {
                return Ok(false);
            }
            let Some(s) = r.steps.get_mut(steps::APPROVAL) else {
                return Ok(false);
            };
            s.finished_at = Some(now);
            if s.started_at.is_some_and(|t| now > t + expiry) {
                s.status = StepStatus::Blocked;
                s.summary = Some("approval expired".into());
                r.status = RunStatus::Blocked;
                decision = Decision::Expired;
            } else {
                s.status = StepStatus::Passed;
                s.summary = Some(format!("approved by {principal}"));
                s.details = serde_json::json!({"principal": principal});
                r.status = RunStatus::Deploying;
                // Attempts continue after a retrigger (MessageIds stay unique).
                let attempt = r.next_attempt(steps::DEPLOY);
                r.steps.insert(steps::DEPLOY.into(), Step::pending(attempt));
                decision = Decision::Done;
            }
            Ok(true)
        })
        .await
        .map_err(store_error)?;
    match decision {
        Decision::Conflict => Err(not_awaiting(&updated)),
        Decision::Expired => {
            step::audit(
                &deps,
                NAME,
                &updated,
                "run.approval_expired",
                serde_json::json!({"principal": principal, "expiry_secs": expiry.as_secs()}),
            )
            .await;
            Err(ApiError::new(
                StatusCode::CONFLICT,
                "approval_expired",
                format!(
                    "run {} waited longer than {}s for approval; it is now blocked",
                    updated.id,
                    expiry.as_secs()
                ),
            ))
        }
        Decision::Done => {
            let attempt = updated.steps.get(steps::DEPLOY).map_or(1, |s| s.attempts);
            if let Err(e) = step::send_step(
                &deps,
                "deploy",
                steps::DEPLOY,
                &updated,
                &digest,
                attempt,
                Some(&updated.app),
            )
            .await
            {
                undo_approval(&deps, &updated).await;
                return Err(ApiError::unavailable(format!(
                    "{e}; the approval was withdrawn, approve again"
                )));
            }
            step::audit(
                &deps,
                &principal,
                &updated,
                "run.approved",
                serde_json::json!({"principal": principal, "digest": digest}),
            )
            .await;
            Ok(Json(updated))
        }
    }
}

/// Puts a run whose deploy message could not be sent back to awaiting
/// approval (if nothing moved it meanwhile), so approving again works.
async fn undo_approval(deps: &Deps, run: &Run) {
    let result = deps
        .runs
        .update(&run.app, &run.id, |r| {
            let deploy_pending = r
                .steps
                .get(steps::DEPLOY)
                .is_some_and(|s| s.status == StepStatus::Pending);
            if r.status != RunStatus::Deploying || !deploy_pending {
                return Ok(false);
            }
            let Some(s) = r.steps.get_mut(steps::APPROVAL) else {
                return Ok(false);
            };
            s.status = StepStatus::Pending;
            s.finished_at = None;
            s.summary = None;
            s.details = serde_json::Value::Null;
            r.steps.remove(steps::DEPLOY);
            r.status = RunStatus::AwaitingApproval;
            Ok(true)
        })
        .await;
    if let Err(e) = result {
        tracing::error!(run = %run.id, error = %e, "withdrawing an approval failed");
    }
}

/// An operator's reason as recorded: trimmed, blank as none, refused (400
/// `reason_too_long`) over [`MAX_REASON_CHARS`] characters.
pub(crate) fn operator_reason(reason: Option<String>) -> Result<Option<String>, ApiError> {
    let reason = reason
        .map(|r| r.trim().to_string())
        .filter(|r| !r.is_empty());
    if reason
        .as_ref()
        .is_some_and(|r| r.chars().count() > MAX_REASON_CHARS)
    {
        return Err(ApiError::bad_request(
            "reason_too_long",
            format!("reason longer than {MAX_REASON_CHARS} characters"),
        ));
    }
    Ok(reason)
}

/// Optional body of a rejection.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct RejectBody {
    #[serde(default)]
    reason: Option<String>,
}

/// `POST /api/runs/{id}/reject` (operate scope), optional body `{"reason":
/// "..."}`: the approval step and the run become `blocked`. The digest is not
/// blocked: a rejection is about this release, not the image.
async fn reject(
    State(deps): State<Arc<Deps>>,
    headers: HeaderMap,
    Path(id): Path<String>,
    body: axum::body::Bytes,
) -> Result<Json<Run>, ApiError> {
    let principal = authorize(&deps.secrets, &headers, Scope::Operate)?.name;
    let body: RejectBody = if body.iter().all(u8::is_ascii_whitespace) {
        RejectBody::default()
    } else {
        serde_json::from_slice(&body).map_err(|e| {
            ApiError::bad_request("bad_body", format!("expected {{\"reason\": \"...\"}}: {e}"))
        })?
    };
    let reason = operator_reason(body.reason)?;
    let run = load(&deps, &id).await?;
    let now = OffsetDateTime::now_utc();
    let summary = match &reason {
        Some(r) => format!("rejected by {principal}: {r}"),
        None => format!("rejected by {principal}"),
    };
    let mut changed = false;
    let updated = deps
        .runs
        .update(&run.app, &run.id, |r| {
            changed = false;
            if !awaiting(r) {
                return Ok(false);
            }
            let Some(s) = r.steps.get_mut(steps::APPROVAL) else {
                return Ok(false);
            };
            s.finish(StepStatus::Blocked, now, summary.clone());
            s.details = serde_json::json!({"principal": principal, "reason": reason});
            r.status = RunStatus::Blocked;
            changed = true;
            Ok(true)
        })
        .await
        .map_err(store_error)?;
    if !changed {
        return Err(not_awaiting(&updated));
    }
    step::audit(
        &deps,
        &principal,
        &updated,
        "run.rejected",
        serde_json::json!({"principal": principal, "reason": reason}),
    )
    .await;
    Ok(Json(updated))
}
