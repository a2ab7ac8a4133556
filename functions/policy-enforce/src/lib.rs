//! `policy-enforce`: the policy gate (Service Bus `policy`).
//!
//! Renders the app's manifests for the run's exact digest (the same renderer
//! deploy applies), evaluates gantry's built-in policies plus every
//! ConstraintTemplate and Constraint in the configured policy folder with
//! regorus, and records every violation on the run.
//!
//! - Pass: `deploy` message (session = app), or `awaiting-approval` when the
//!   app requires approval.
//! - Deny: digest blocked, run `blocked`, every violation message recorded, alert.
//! - A broken policy folder (Rego syntax error, unknown template, bad YAML)
//!   fails the run with an error naming the file and line; it is not retried.

use std::sync::Arc;

use gantry_pipeline::run::steps;
use gantry_pipeline::{PipelineError, RunStatus, Step, StepRequest, StepStatus};
use gantry_policy::Violation;
use gantry_runtime::steps::{self as step, StepError};
use gantry_runtime::{Deps, Done, FromMessage, Function, FunctionError, Invocation};
use time::OffsetDateTime;

/// Function name: folder, route and span.
pub const NAME: &str = "policy-enforce";

/// The function's registration.
pub fn function() -> Function {
    Function::queue(NAME, "policy", false, |inv, deps: Arc<Deps>| async move {
        handle(inv, &deps).await
    })
}

/// The `policy` message.
#[derive(Debug, Clone)]
pub struct PolicyMessage(pub StepRequest);

impl FromMessage for PolicyMessage {
    fn from_message(body: &[u8]) -> Result<Self, String> {
        serde_json::from_slice(body)
            .map(PolicyMessage)
            .map_err(|e| format!("policy request: {e}"))
    }
}

/// Why the policy step could not finish.
#[derive(Debug, thiserror::Error)]
pub enum PolicyEnforceError {
    /// The message names a run that does not exist or does not match it.
    #[error("policy request for run {run}: {reason}")]
    CheckRequest {
        /// Run id.
        run: String,
        /// What does not match.
        reason: String,
    },
    /// Reading state failed.
    #[error("reading run {run} failed: {source}")]
    ReadRun {
        /// Run id.
        run: String,
        /// Cause.
        source: PipelineError,
    },
    /// Recording a transition or announcing it failed.
    #[error(transparent)]
    Step(#[from] StepError),
}

impl FunctionError for PolicyEnforceError {
    fn is_transient(&self) -> bool {
        match self {
            PolicyEnforceError::CheckRequest { .. } => false,
            PolicyEnforceError::ReadRun { source, .. } => source.is_transient(),
            PolicyEnforceError::Step(e) => e.is_transient(),
        }
    }
}

pub use gantry_context::policy_set;

/// Handles one `policy` message (lambda style).
pub async fn handle(
    inv: Invocation<PolicyMessage>,
    deps: &Deps,
) -> Result<Done, PolicyEnforceError> {
    let request = inv.event.0;
    let run_id = request.run_id.to_string();
    let check = |reason: String| PolicyEnforceError::CheckRequest {
        run: run_id.clone(),
        reason,
    };
    // Act on the record, not the message.
    let step::Subject { app, run, image } =
        step::subject(deps, &request).await.map_err(|e| match e {
            step::SubjectError::Check(reason) => check(reason),
            step::SubjectError::Read(source) => PolicyEnforceError::ReadRun {
                run: run_id.clone(),
                source,
            },
        })?;
    let digest = image.digest.clone();
    if !step::waiting_for(
        &run,
        RunStatus::CheckingPolicy,
        steps::POLICY,
        request.attempt,
    ) {
        // The outcome is recorded, but the deploy message or the alert may have
        // been lost if the previous delivery failed after recording (transient
        // send error, crash): this redelivery is the only retry, so repeat it.
        // Their MessageIds make a repeat a no-op; the record is not touched.
        if let Some(what) = step::repeat_after_redelivery(
            deps,
            &run,
            steps::POLICY,
            request.attempt,
            &digest,
            Some(step::Next {
                queue: "deploy",
                step: steps::DEPLOY,
                waiting: RunStatus::Deploying,
                sessions: true,
            }),
        )
        .await?
        {
            return Ok(Done(format!("run {run_id}: {what}")));
        }
        return Ok(Done(format!(
            "run {run_id}: not waiting for policy attempt {} (run is {}); nothing to do",
            request.attempt, run.status
        )));
    }
    // The scan verdict for this very digest must be on the record.
    let scan_passed = run
        .steps
        .get(steps::SCAN)
        .is_some_and(|s| s.status == StepStatus::Passed);
    if !scan_passed {
        return Err(check("the scan step has not passed for this digest".into()));
    }
    let run = step::start(deps, &run, steps::POLICY).await?;
    if step::is_blocked(deps, &app.name, &digest)
        .await
        .map_err(|source| PolicyEnforceError::ReadRun {
            run: run_id.clone(),
            source,
        })?
    {
        let reason = format!("digest {digest} is blocked for {}", app.name);
        step::block(
            deps,
            NAME,
            &run,
            steps::POLICY,
            &digest,
            &reason,
            serde_json::Value::Null,
        )
        .await?;
        return Ok(Done(format!("run {run_id}: {reason}")));
    }

    let rendered = match gantry_manifests::render_run(app, &run) {
        Ok(r) => r,
        Err(e) => {
            let reason = format!("rendering manifests: {e}");
            step::fail(deps, NAME, &run, steps::POLICY, &reason).await?;
            return Ok(Done(format!("run {run_id}: failed: {reason}")));
        }
    };
    let violations = match policy_set(deps).and_then(|set| {
        let started = std::time::Instant::now();
        let v = set.evaluate(&rendered.objects, &[]);
        tracing::debug!(
            function = NAME,
            micros = started.elapsed().as_micros() as u64,
            "policies evaluated"
        );
        v.map(|v| (v, set.templates().len(), set.constraints()))
    }) {
        Ok(v) => v,
        Err(e) => {
            // Broken policy files are an operator error that no retry fixes:
            // fail the run naming the file and line, alert, acknowledge.
            let reason = format!("loading or evaluating policies: {e}");
            step::fail(deps, NAME, &run, steps::POLICY, &reason).await?;
            return Ok(Done(format!("run {run_id}: failed: {reason}")));
        }
    };
    let (violations, templates, constraints) = violations;
    let (deny, advisory): (Vec<&Violation>, Vec<&Violation>) = violations
        .iter()
        .partition(|v| v.enforcement_action.is_blocking());
    let details = serde_json::json!({
        "templates": templates,
        "constraints": constraints,
        "manifest_hash": rendered.hash,
        "violations": deny,
        "warnings": advisory,
    });
    if !deny.is_empty() {
        let messages: Vec<String> = deny
            .iter()
            .map(|v| format!("[{}] {} {}: {}", v.constraint, v.kind, v.name, v.message))
            .collect();
        let reason = format!(
            "{} policy violation(s): {}",
            deny.len(),
            messages.join("; ")
        );
        step::block(deps, NAME, &run, steps::POLICY, &digest, &reason, details).await?;
        return Ok(Done(format!("run {run_id}: blocked: {reason}")));
    }
    let summary = format!(
        "{constraints} constraint(s) from {templates} template(s): no violations{}",
        if advisory.is_empty() {
            String::new()
        } else {
            format!(" ({} warnings)", advisory.len())
        }
    );
    pass(deps, app.require_approval, &run, &digest, &summary, details).await?;
    Ok(Done(format!(
        "run {run_id}: policy passed ({summary}), {}",
        if app.require_approval {
            "awaiting approval"
        } else {
            "deploy queued"
        }
    )))
}

async fn pass(
    deps: &Deps,
    require_approval: bool,
    run: &gantry_pipeline::Run,
    digest: &gantry_pipeline::Digest,
    summary: &str,
    details: serde_json::Value,
) -> Result<(), StepError> {
    let now = OffsetDateTime::now_utc();
    let updated = deps
        .runs
        .update(&run.app, &run.id, |r| {
            // The run may have moved on (blocked, superseded) since it was read.
            if r.status != RunStatus::CheckingPolicy {
                return Ok(false);
            }
            let Some(s) = r.steps.get_mut(steps::POLICY) else {
                return Ok(false);
            };
            if s.status == StepStatus::Passed {
                return Ok(false);
            }
            s.finish(StepStatus::Passed, now, summary.to_string());
            s.details = details.clone();
            if require_approval {
                r.status = RunStatus::AwaitingApproval;
                // started_at: when the approval expiry starts counting.
                // Attempts continue after a retrigger (MessageIds stay unique).
                let mut approval = Step::pending(r.next_attempt(steps::APPROVAL));
                approval.started_at = Some(now);
                r.steps.insert(steps::APPROVAL.into(), approval);
            } else {
                r.status = RunStatus::Deploying;
                let attempt = r.next_attempt(steps::DEPLOY);
                r.steps.insert(steps::DEPLOY.into(), Step::pending(attempt));
            }
            Ok(true)
        })
        .await
        .map_err(|source| StepError::Record {
            run: run.id.clone(),
            source,
        })?;
    step::audit(
        deps,
        NAME,
        run,
        "step.policy.passed",
        serde_json::json!({"digest": digest, "summary": summary}),
    )
    .await;
    // Sent whenever the run waits for deploy (also after a crash here); the
    // MessageId makes a repeat a no-op. Deploys are ordered per app (session).
    if updated.status == RunStatus::Deploying
        && let Some(deploy) = updated
            .steps
            .get(steps::DEPLOY)
            .filter(|s| s.status == StepStatus::Pending)
    {
        step::send_step(
            deps,
            "deploy",
            steps::DEPLOY,
            &updated,
            digest,
            deploy.attempts,
            Some(&run.app),
        )
        .await?;
    }
    Ok(())
}
