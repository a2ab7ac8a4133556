//! `runs-api`: the operator API under `/api/runs`, `/api/apps` and `/api/health`.
//!
//! The Functions host orders HTTP routes alphabetically by function, not by
//! ASP.NET precedence, so this function's route is constrained to its own
//! first path segments (`runs`, `apps`, `health`) and can never shadow
//! `github-webhook`. [`AREAS`] is checked against `function.json` in tests.
//!
//! Every route but `/api/health` needs `Authorization: Bearer <token>` with a
//! token configured in `GANTRY_API_TOKENS` ([`gantry_runtime::auth`]).

mod rollback;

use std::sync::Arc;

use axum::Router;
use axum::extract::{Path, State};
use axum::response::Json;
use axum::routing::{get, post};
use gantry_pipeline::run::steps;
use gantry_pipeline::{PipelineError, Run, RunId, RunStatus, Step, StepStatus};
use gantry_runtime::auth::{Scope, authorize};
use gantry_runtime::steps as step;
use gantry_runtime::{ApiError, Deps, Function};
use http::{HeaderMap, StatusCode};
use time::OffsetDateTime;

/// Function name: folder, route and span.
pub const NAME: &str = "runs-api";

/// First path segments under `/api/` this function serves.
pub const AREAS: &[&str] = &["runs", "apps", "health"];

/// Longest rejection reason accepted, in characters.
pub const MAX_REASON_CHARS: usize = 500;

/// The function's registration.
pub fn function() -> Function {
    Function::http(
        NAME,
        "{area:regex(^(runs|apps|health)$)}/{*rest}",
        &["get", "post"],
        routes,
    )
}

fn routes() -> Router<Arc<Deps>> {
    Router::new()
        .route("/api/health", get(health))
        .route("/api/runs/{id}", get(show))
        .route("/api/runs/{id}/approve", post(approve))
        .route("/api/runs/{id}/reject", post(reject))
        .route("/api/apps/{app}/rollback", post(rollback::rollback))
}

/// Liveness: answers as soon as the process serves HTTP, without touching
/// storage, so the host's warm-up and probes never depend on a dependency.
async fn health() -> Json<serde_json::Value> {
    Json(serde_json::json!({"status": "ok", "version": env!("CARGO_PKG_VERSION")}))
}

fn store_error(e: PipelineError) -> ApiError {
    if e.is_transient() {
        ApiError::unavailable(e.to_string())
    } else {
        ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string())
    }
}

async fn load(deps: &Deps, id: &str) -> Result<Run, ApiError> {
    let id = RunId::parse(id)
        .map_err(|e| ApiError::bad_request("bad_run_id", format!("invalid run id: {e}")))?;
    deps.runs
        .find(&id)
        .await
        .map_err(store_error)?
        .ok_or_else(|| ApiError::not_found(format!("no run {id}")))
}

/// `GET /api/runs/{id}` (read scope): the run record.
async fn show(
    State(deps): State<Arc<Deps>>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Json<Run>, ApiError> {
    authorize(&deps.secrets, &headers, Scope::Read)?;
    Ok(Json(load(&deps, &id).await?))
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
    let principal = authorize(&deps.secrets, &headers, Scope::Operate)?
        .name
        .clone();
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
                r.steps.insert(steps::DEPLOY.into(), Step::pending(1));
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
            if let Err(e) = step::send_step(
                &deps,
                "deploy",
                steps::DEPLOY,
                &updated,
                &digest,
                1,
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
    let principal = authorize(&deps.secrets, &headers, Scope::Operate)?
        .name
        .clone();
    let body: RejectBody = if body.iter().all(u8::is_ascii_whitespace) {
        RejectBody::default()
    } else {
        serde_json::from_slice(&body).map_err(|e| {
            ApiError::bad_request("bad_body", format!("expected {{\"reason\": \"...\"}}: {e}"))
        })?
    };
    let reason = body
        .reason
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
