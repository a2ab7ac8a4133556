//! Rollback runs: deploying an earlier good version again, on an operator's
//! request (`POST /api/apps/{app}/rollback`) or a security alert's.
//!
//! A rollback is a new run, not a message to an old one, so it goes through
//! the deploy step like any release: only the newest run deploys (an older run
//! still in flight is superseded), a blocked digest is refused, the rollout is
//! verified, `deployed.json` moves forward, and the run, its audit entries and
//! its alerts show who asked and why. The new run carries the earlier run's
//! image and its scan and policy steps, and [`RollbackOf`] names that run:
//! deploy renders the manifests with that run's provenance, so they hash to
//! exactly what its policy gate checked. A digest whose manifests no longer
//! render to that hash (`gantry.toml` changed since) is refused here: the
//! operator retriggers that run from `policy` instead, and nothing unchecked
//! is ever applied.
//!
//! No approval step: the request *is* the operator's decision, and an
//! automatic rollback on a security alert must not wait for one.

use gantry_pipeline::messages::Deployed;
use gantry_pipeline::run::steps;
use gantry_pipeline::runs::blobs;
use gantry_pipeline::{
    AppName, Digest, PipelineError, RollbackOf, Run, RunId, RunStatus, Source, SourceKind, Step,
    StepStatus,
};
use time::OffsetDateTime;

use crate::Deps;
use crate::steps::{self as step, StepError};

/// Longest reason kept on the run, in characters (longer ones are cut).
pub const MAX_REASON_CHARS: usize = 500;

/// What to roll back and who asks.
#[derive(Debug, Clone, Copy)]
pub struct RollbackRequest<'a> {
    /// The app.
    pub app: &'a AppName,
    /// The digest to deploy again; `None` means the previous good version in
    /// `apps/{app}/deployed.json`.
    pub digest: Option<&'a Digest>,
    /// Who asks: API token name, App Service principal, `defender:<alert>`.
    pub requested_by: &'a str,
    /// Why, recorded on the run and in the audit trail.
    pub reason: Option<&'a str>,
}

/// Why a rollback was not started.
#[derive(Debug, thiserror::Error)]
pub enum RollbackError {
    /// The app is not in `gantry.toml`.
    #[error("app {app} is not configured")]
    UnknownApp {
        /// The app.
        app: AppName,
    },
    /// No digest was named and `deployed.json` has no previous good version.
    #[error("app {app} has no previous good version to roll back to")]
    NoTarget {
        /// The app.
        app: AppName,
    },
    /// The digest never passed both gates for this app, or its checked
    /// manifests cannot be reproduced.
    #[error("digest {digest} cannot be rolled back to: {why}")]
    NotEligible {
        /// The digest asked for.
        digest: Digest,
        /// What is missing.
        why: String,
    },
    /// The digest is in `apps/{app}/blocked/` (a failed gate, rollout or a
    /// security alert): never deployed again without lifting the block.
    #[error("digest {digest} is blocked for {app}")]
    Blocked {
        /// The app.
        app: AppName,
        /// The digest.
        digest: Digest,
    },
    /// Reading `deployed.json`, the earlier run or the blocked list failed.
    #[error("reading the rollback target of {app} failed: {source}")]
    ReadState {
        /// The app.
        app: AppName,
        /// Cause.
        source: PipelineError,
    },
    /// Storing the rollback run failed.
    #[error("recording the rollback run failed: {source}")]
    CreateRun {
        /// Cause.
        source: PipelineError,
    },
    /// The deploy message could not be sent; the rollback run is marked failed.
    #[error("sending the deploy message of rollback run {run} failed: {source}")]
    SendDeploy {
        /// The rollback run.
        run: RunId,
        /// Cause.
        source: StepError,
    },
}

impl RollbackError {
    /// Whether trying again later may succeed.
    pub fn is_transient(&self) -> bool {
        match self {
            RollbackError::UnknownApp { .. }
            | RollbackError::NoTarget { .. }
            | RollbackError::NotEligible { .. }
            | RollbackError::Blocked { .. } => false,
            RollbackError::ReadState { source, .. } | RollbackError::CreateRun { source } => {
                source.is_transient()
            }
            RollbackError::SendDeploy { source, .. } => source.is_transient(),
        }
    }
}

/// Starts a rollback run for `request.app` and sends its deploy message
/// (session = app). Returns the new run, status `deploying`.
pub async fn start(deps: &Deps, request: RollbackRequest<'_>) -> Result<Run, RollbackError> {
    let app_name = request.app;
    let Some(app) = deps.config.app(app_name.as_str()) else {
        return Err(RollbackError::UnknownApp {
            app: app_name.clone(),
        });
    };
    let read = |source: PipelineError| RollbackError::ReadState {
        app: app_name.clone(),
        source,
    };
    let (digest, run_id) = match request.digest {
        Some(digest) => {
            let Some(id) = deps.runs.by_digest(app_name, digest).await.map_err(read)? else {
                return Err(RollbackError::NotEligible {
                    digest: digest.clone(),
                    why: format!("no run of {app_name} has delivered it"),
                });
            };
            (digest.clone(), id)
        }
        None => {
            let deployed = read_deployed(deps, app_name).await.map_err(read)?;
            let Some(previous) = deployed.previous else {
                return Err(RollbackError::NoTarget {
                    app: app_name.clone(),
                });
            };
            (previous.digest, previous.run_id)
        }
    };
    let not_eligible = |why: String| RollbackError::NotEligible {
        digest: digest.clone(),
        why,
    };
    let Some(mut source) = deps.runs.get(app_name, &run_id).await.map_err(read)? else {
        return Err(not_eligible(format!("its run {run_id} is gone")));
    };
    // A rollback of a rollback deploys the original run's manifests again.
    if let Some(of) = source.rollback.clone() {
        let Some(original) = deps.runs.get(app_name, &of.run_id).await.map_err(read)? else {
            return Err(not_eligible(format!("its run {} is gone", of.run_id)));
        };
        source = original;
    }
    let Some(image) = source.image.clone().filter(|i| i.digest == digest) else {
        return Err(not_eligible(format!(
            "its run {} does not hold it",
            source.id
        )));
    };
    for gate in [steps::SCAN, steps::POLICY] {
        if !source
            .steps
            .get(gate)
            .is_some_and(|s| s.status == StepStatus::Passed)
        {
            return Err(not_eligible(format!(
                "the {gate} gate has not passed for it (run {})",
                source.id
            )));
        }
    }
    let checked = source
        .steps
        .get(steps::POLICY)
        .and_then(|s| s.details.get("manifest_hash"))
        .and_then(serde_json::Value::as_str)
        .map(str::to_owned);
    let rendered = gantry_manifests::render_run(app, &source)
        .map_err(|e| not_eligible(format!("its manifests do not render: {e}")))?;
    if checked.as_deref() != Some(rendered.hash.as_str()) {
        return Err(not_eligible(format!(
            "its manifests changed since the policy gate checked them (gantry.toml changed); retrigger run {} from policy instead",
            source.id
        )));
    }
    if step::is_blocked(deps, app_name, &digest)
        .await
        .map_err(read)?
    {
        return Err(RollbackError::Blocked {
            app: app_name.clone(),
            digest,
        });
    }

    let now = OffsetDateTime::now_utc();
    let reason = request
        .reason
        .map(|r| r.trim().chars().take(MAX_REASON_CHARS).collect::<String>())
        .filter(|r| !r.is_empty());
    let id = gantry_pipeline::ids::new_run_id(
        u64::try_from(now.unix_timestamp_nanos() / 1_000_000).unwrap_or_default(),
    );
    let mut run = Run::new(
        id,
        app_name.clone(),
        RunStatus::Deploying,
        Source {
            kind: SourceKind::Rollback,
            repo: source.source.repo.clone(),
            commit: source.source.commit.clone(),
            git_ref: source.source.git_ref.clone(),
            pusher: None,
            delivery: None,
            message: reason.clone(),
        },
        now,
    );
    run.image = Some(image);
    for gate in [steps::SCAN, steps::POLICY] {
        if let Some(s) = source.steps.get(gate) {
            run.steps.insert(gate.into(), s.clone());
        }
    }
    run.steps.insert(steps::DEPLOY.into(), Step::pending(1));
    // The rollback run's trace starts at the request (operator or Defender alert).
    run.trace = crate::telemetry::current();
    run.rollback = Some(RollbackOf {
        run_id: source.id.clone(),
        requested_by: request.requested_by.into(),
        reason: reason.clone(),
    });
    deps.runs
        .create(&run)
        .await
        .map_err(|source| RollbackError::CreateRun { source })?;
    let detail = serde_json::json!({
        "requested_by": request.requested_by,
        "digest": digest,
        "of_run": source.id,
        "reason": reason,
    });
    if let Err(e) = step::send_step(
        deps,
        "deploy",
        steps::DEPLOY,
        &run,
        &digest,
        1,
        Some(app_name),
    )
    .await
    {
        // The run must not look like it is deploying when nothing will.
        let why = format!("the deploy message was not sent: {e}");
        let marked = deps
            .runs
            .update(app_name, &run.id, |r| {
                if r.status != RunStatus::Deploying {
                    return Ok(false);
                }
                if let Some(s) = r.steps.get_mut(steps::DEPLOY) {
                    s.finish(StepStatus::Failed, now, why.clone());
                }
                r.status = RunStatus::Failed;
                Ok(true)
            })
            .await;
        if let Err(e) = marked {
            tracing::error!(run = %run.id, error = %e, "marking an unsent rollback failed");
        }
        step::audit(
            deps,
            request.requested_by,
            &run,
            "app.rollback_failed",
            detail,
        )
        .await;
        return Err(RollbackError::SendDeploy {
            run: run.id.clone(),
            source: e,
        });
    }
    step::audit(deps, request.requested_by, &run, "app.rollback", detail).await;
    Ok(run)
}

/// `apps/{app}/deployed.json`, empty when absent.
async fn read_deployed(deps: &Deps, app: &AppName) -> Result<Deployed, PipelineError> {
    let name = blobs::deployed(app);
    match deps.runs.raw().get(&name).await? {
        Some(v) => serde_json::from_slice(&v.body).map_err(|e| PipelineError::Decode {
            name,
            message: e.to_string(),
        }),
        None => Ok(Deployed::default()),
    }
}
