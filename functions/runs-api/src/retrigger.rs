//! `POST /api/runs/{id}/retrigger` `{"from": "scan"|"policy"|"deploy",
//! "reason": "..."}` (operate scope): re-runs a finished run from a named
//! step, keeping the steps before it (their verdicts are for the same
//! digest, DESIGN.md §5).
//!
//! - Only finished runs: `blocked`, `failed`, `rolled-back`, `deployed`. A
//!   run in progress would race its own messages (409 `in_progress`); a
//!   `superseded` run, or any run with a newer non-superseded run of its app,
//!   would only be superseded again at deploy (409 `superseded` /
//!   `newer_run`).
//! - Every step before `from` must be `passed` (409 `step_not_passed`
//!   naming it); `ci` is never re-run.
//! - The steps from `from` on move to the run's `retriggers` entry (who,
//!   why, when, the previous status and those steps as they were); `from`
//!   gets a new pending attempt (one more than any earlier attempt, so its
//!   `MessageId` `{run}:{step}:{attempt}` is new) and the run the status that
//!   waits for it; later steps are created again by the steps before them.
//! - A blocked digest: a block this run's own `scan` or `policy` step
//!   recorded is lifted when that gate is re-run (audited `digest.unblocked`);
//!   any other block (a rollout failure, a security alert, another run) is
//!   409 `digest_blocked`.
//! - If the step message cannot be sent, everything is put back (the run and
//!   the block) and the answer is 503.

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::response::Json;
use gantry_pipeline::run::steps;
use gantry_pipeline::{Retrigger, Run, RunStatus, Step, StepStatus};
use gantry_runtime::auth::{Scope, authorize};
use gantry_runtime::steps as step;
use gantry_runtime::{ApiError, Deps};
use http::{HeaderMap, StatusCode};
use time::OffsetDateTime;

use crate::{load, store_error};

/// Run statuses a retrigger accepts.
pub const RETRIGGERABLE: [RunStatus; 4] = [
    RunStatus::Blocked,
    RunStatus::Failed,
    RunStatus::RolledBack,
    RunStatus::Deployed,
];

/// Steps in pipeline order, as far as a retrigger is concerned.
const ORDER: [&str; 5] = [
    steps::SCAN,
    steps::POLICY,
    steps::APPROVAL,
    steps::DEPLOY,
    steps::VERIFY,
];

/// A step a retrigger may start from: its queue, the status waiting for
/// it, whether its queue uses sessions, and the gate steps it re-runs (whose
/// own blocks it may lift).
struct From {
    step: &'static str,
    queue: &'static str,
    waiting: RunStatus,
    sessions: bool,
    regates: &'static [&'static str],
}

const FROMS: [From; 3] = [
    From {
        step: steps::SCAN,
        queue: "scan",
        waiting: RunStatus::Scanning,
        sessions: false,
        regates: &[steps::SCAN, steps::POLICY],
    },
    From {
        step: steps::POLICY,
        queue: "policy",
        waiting: RunStatus::CheckingPolicy,
        sessions: false,
        regates: &[steps::POLICY],
    },
    From {
        step: steps::DEPLOY,
        queue: "deploy",
        waiting: RunStatus::Deploying,
        sessions: true,
        regates: &[],
    },
];

#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Body {
    from: String,
    #[serde(default)]
    reason: Option<String>,
}

fn conflict(code: &'static str, message: String) -> ApiError {
    ApiError::new(StatusCode::CONFLICT, code, message)
}

/// Why `run` cannot be retriggered from `from`, if it cannot.
fn refusal(run: &Run, from: &From) -> Option<ApiError> {
    if run.status == RunStatus::Superseded {
        return Some(conflict(
            "superseded",
            format!("run {} is superseded; retrigger the newest run", run.id),
        ));
    }
    if !RETRIGGERABLE.contains(&run.status) {
        return Some(conflict(
            "in_progress",
            format!(
                "run {} is {} (in progress); only {} runs can be retriggered",
                run.id,
                run.status,
                RETRIGGERABLE.map(RunStatus::as_str).join(", ")
            ),
        ));
    }
    if run.image.is_none() {
        return Some(conflict(
            "no_image",
            format!("run {} has no image to re-run steps for", run.id),
        ));
    }
    for name in ORDER.iter().take_while(|n| **n != from.step) {
        let s = run.steps.get(*name);
        // Approval exists only for apps that require it; the rest must be there.
        let ok = match s {
            None => *name == steps::APPROVAL,
            Some(s) => s.status == StepStatus::Passed,
        };
        if !ok {
            let state = s.map_or_else(
                || "absent".to_string(),
                |s| format!("{:?}", s.status).to_lowercase(),
            );
            return Some(conflict(
                "step_not_passed",
                format!(
                    "step {name} of run {} is {state}; retrigger from {name} or an earlier step",
                    run.id
                ),
            ));
        }
    }
    None
}

/// `POST /api/runs/{id}/retrigger` (operate scope); see the module docs.
pub async fn retrigger(
    State(deps): State<Arc<Deps>>,
    headers: HeaderMap,
    Path(id): Path<String>,
    body: axum::body::Bytes,
) -> Result<(StatusCode, Json<Run>), ApiError> {
    let principal = authorize(&deps.secrets, &headers, Scope::Operate)?.name;
    let body: Body = serde_json::from_slice(&body).map_err(|e| {
        ApiError::bad_request(
            "bad_body",
            format!(
                "expected {{\"from\": \"scan\"|\"policy\"|\"deploy\", \"reason\": \"...\"}}: {e}"
            ),
        )
    })?;
    let Some(from) = FROMS.iter().find(|f| f.step == body.from) else {
        return Err(ApiError::bad_request(
            "bad_from",
            format!("from: {:?} is not one of scan, policy, deploy", body.from),
        ));
    };
    let reason = crate::operator_reason(body.reason)?;
    let run = load(&deps, &id).await?;
    if let Some(e) = refusal(&run, from) {
        return Err(e);
    }
    let Some(digest) = run.image.as_ref().map(|i| i.digest.clone()) else {
        return Err(conflict("no_image", format!("run {} has no image", run.id)));
    };
    if let Some(newer) = newer_run(&deps, &run).await? {
        return Err(conflict(
            "newer_run",
            format!(
                "run {newer} of {} is newer; run {} would be superseded at deploy",
                run.app, run.id
            ),
        ));
    }
    // The block decision is made before anything is written.
    let block = step::block_record(&deps, &run.app, &digest)
        .await
        .map_err(store_error)?
        .filter(|b| b.get("lifted").is_none_or(serde_json::Value::is_null));
    if let Some(b) = &block {
        let ours = b["run_id"].as_str() == Some(run.id.as_str())
            && b["step"]
                .as_str()
                .is_some_and(|s| from.regates.contains(&s));
        if !ours {
            return Err(conflict(
                "digest_blocked",
                format!(
                    "digest {digest} is blocked for {} by step {} of run {}: {}; a retrigger from {} does not lift it",
                    run.app,
                    b["step"].as_str().unwrap_or("?"),
                    b["run_id"].as_str().unwrap_or("?"),
                    b["reason"].as_str().unwrap_or(""),
                    from.step
                ),
            ));
        }
    }

    let now = OffsetDateTime::now_utc();
    let mut attempt = 0;
    let mut refused = None;
    let updated = deps
        .runs
        .update(&run.app, &run.id, |r| {
            refused = refusal(r, from);
            if refused.is_some() || r.image.as_ref().map(|i| &i.digest) != Some(&digest) {
                return Ok(false);
            }
            attempt = r.next_attempt(from.step);
            let replaced: Vec<&str> = ORDER
                .iter()
                .skip_while(|n| **n != from.step)
                .copied()
                .collect();
            let previous = replaced
                .iter()
                .filter_map(|n| r.steps.remove(*n).map(|s| (n.to_string(), s)))
                .collect();
            r.retriggers.push(Retrigger {
                at: now,
                by: principal.clone(),
                from: from.step.to_string(),
                reason: reason.clone(),
                previous_status: r.status,
                previous,
            });
            r.steps
                .insert(from.step.to_string(), Step::pending(attempt));
            r.status = from.waiting;
            Ok(true)
        })
        .await
        .map_err(store_error)?;
    if let Some(e) = refused {
        return Err(e);
    }
    if attempt == 0 {
        return Err(conflict(
            "changed",
            format!("run {} changed meanwhile; look at it and try again", run.id),
        ));
    }
    let mut lifted = false;
    if let Some(b) = &block {
        let lift = serde_json::json!({
            "by": principal, "at": step::rfc3339(now), "reason": reason,
            "retrigger": {"run_id": run.id, "from": from.step, "attempt": attempt},
        });
        match step::lift_block(&deps, &run.app, &digest, b, lift).await {
            Ok(true) => lifted = true,
            Ok(false) => {
                undo(&deps, &updated, from, attempt).await;
                return Err(conflict(
                    "digest_blocked",
                    format!("the block of {digest} changed meanwhile; look at it and try again"),
                ));
            }
            Err(e) => {
                undo(&deps, &updated, from, attempt).await;
                return Err(store_error(e));
            }
        }
    }
    let session = from.sessions.then_some(&updated.app);
    if let Err(e) = step::send_step(
        &deps, from.queue, from.step, &updated, &digest, attempt, session,
    )
    .await
    {
        undo(&deps, &updated, from, attempt).await;
        if lifted && let Err(e) = step::restore_block(&deps, &run.app, &digest).await {
            tracing::error!(run = %run.id, error = %e, "restoring a lifted block failed");
        }
        return Err(ApiError::unavailable(format!(
            "{e}; the retrigger was withdrawn, try again"
        )));
    }
    if lifted {
        step::audit(
            &deps,
            &principal,
            &updated,
            "digest.unblocked",
            serde_json::json!({"principal": principal, "digest": digest, "block": block, "reason": reason}),
        )
        .await;
    }
    step::audit(
        &deps,
        &principal,
        &updated,
        "run.retriggered",
        serde_json::json!({
            "principal": principal, "from": from.step, "attempt": attempt,
            "reason": reason, "previous_status": run.status, "digest": digest,
        }),
    )
    .await;
    Ok((StatusCode::ACCEPTED, Json(updated)))
}

/// The newest run of the app newer than `run` that was not superseded.
async fn newer_run(deps: &Deps, run: &Run) -> Result<Option<gantry_pipeline::RunId>, ApiError> {
    let ids = deps
        .runs
        .list_ids(Some(&run.app))
        .await
        .map_err(store_error)?;
    for (_, id) in ids.into_iter().rev() {
        if id <= run.id {
            break;
        }
        if let Some(other) = deps.runs.get(&run.app, &id).await.map_err(store_error)?
            && other.status != RunStatus::Superseded
        {
            return Ok(Some(id));
        }
    }
    Ok(None)
}

/// Puts a run whose retrigger message could not be sent back as it was
/// (if nothing moved it meanwhile), so retriggering again works.
async fn undo(deps: &Deps, run: &Run, from: &From, attempt: u32) {
    let result = deps
        .runs
        .update(&run.app, &run.id, |r| {
            let untouched = r.status == from.waiting
                && r.steps
                    .get(from.step)
                    .is_some_and(|s| s.status == StepStatus::Pending && s.attempts == attempt);
            if !untouched {
                return Ok(false);
            }
            let Some(last) = r.retriggers.pop() else {
                return Ok(false);
            };
            r.steps.remove(from.step);
            r.steps.extend(last.previous);
            r.status = last.previous_status;
            Ok(true)
        })
        .await;
    if let Err(e) = result {
        tracing::error!(run = %run.id, error = %e, "withdrawing a retrigger failed");
    }
}
