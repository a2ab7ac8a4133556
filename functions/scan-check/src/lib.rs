//! `scan-check`: the vulnerability gate (Service Bus `scan`).
//!
//! Reads the run (never trusting the message), fetches findings for the run's
//! exact digest from the app's source — Defender for Containers through Azure
//! Resource Graph, or a Trivy report uploaded by CI — and decides with the
//! app's threshold, `ignore_unfixed` and the CVE allow-list.
//!
//! - No results yet is *pending, not clean*: the `scan` message is re-sent,
//!   scheduled with backoff, until the app's `max_wait`; then the gate fails
//!   closed (blocked, alert).
//! - Pass: verdict recorded on the run and at `scans/{digest}.json`, `policy`
//!   message sent.
//! - Block: digest added to `apps/{app}/blocked/`, run `blocked`, alert.
//! - A malformed report fails the run with the reason (naming the report and
//!   line) and alerts; it is not retried forever.

use std::sync::Arc;

use gantry_bus::OutMessage;
use gantry_pipeline::config::ScanSettings;
use gantry_pipeline::run::steps;
use gantry_pipeline::{
    Digest, PipelineError, Run, RunStatus, Severity, Step, StepRequest, StepStatus,
};
use gantry_runtime::steps::{self as step, StepError, rfc3339};
use gantry_runtime::{Deps, Done, FromMessage, Function, FunctionError, Invocation};
use gantry_scan::{Findings, ScanError, Verdict};
use time::OffsetDateTime;

/// Function name: folder, route and span.
pub const NAME: &str = "scan-check";

/// The function's registration.
pub fn function() -> Function {
    Function::queue(NAME, "scan", false, |inv, deps: Arc<Deps>| async move {
        handle(inv, &deps).await
    })
}

/// The `scan` message.
#[derive(Debug, Clone)]
pub struct ScanMessage(pub StepRequest);

impl FromMessage for ScanMessage {
    fn from_message(body: &[u8]) -> Result<Self, String> {
        serde_json::from_slice(body)
            .map(ScanMessage)
            .map_err(|e| format!("scan request: {e}"))
    }
}

/// Why the scan step could not finish.
#[derive(Debug, thiserror::Error)]
pub enum ScanCheckError {
    /// The message names a run that does not exist or does not match it.
    #[error("scan request for run {run}: {reason}")]
    CheckRequest {
        /// Run id.
        run: String,
        /// What does not match.
        reason: String,
    },
    /// Reading or writing state failed.
    #[error("recording the scan of run {run} failed: {source}")]
    Record {
        /// Run id.
        run: String,
        /// Cause.
        source: PipelineError,
    },
    /// Fetching findings failed (throttled, unreachable, ...).
    #[error("fetching findings for run {run} failed: {source}")]
    FetchFindings {
        /// Run id.
        run: String,
        /// Cause.
        source: ScanError,
    },
    /// Recording a transition or announcing it failed.
    #[error(transparent)]
    Step(#[from] StepError),
    /// Sending the next message or an alert failed.
    #[error("queueing for run {run} failed: {source}")]
    Queue {
        /// Run id.
        run: String,
        /// Cause.
        source: gantry_bus::BusError,
    },
}

impl FunctionError for ScanCheckError {
    fn is_transient(&self) -> bool {
        match self {
            ScanCheckError::CheckRequest { .. } => false,
            ScanCheckError::Record { source, .. } => source.is_transient(),
            ScanCheckError::FetchFindings { source, .. } => source.is_transient(),
            ScanCheckError::Queue { source, .. } => source.is_transient(),
            ScanCheckError::Step(e) => e.is_transient(),
        }
    }
}

use gantry_context::Fetched;

/// Handles one `scan` message (lambda style).
pub async fn handle(inv: Invocation<ScanMessage>, deps: &Deps) -> Result<Done, ScanCheckError> {
    let request = inv.event.0;
    let run_id = request.run_id.to_string();
    let record = |source: PipelineError| ScanCheckError::Record {
        run: run_id.clone(),
        source,
    };
    let queue = |source: gantry_bus::BusError| ScanCheckError::Queue {
        run: run_id.clone(),
        source,
    };
    // Act on the record, not the message: the digest must be the run's own.
    let step::Subject { app, run, image } =
        step::subject(deps, &request).await.map_err(|e| match e {
            step::SubjectError::Check(reason) => ScanCheckError::CheckRequest {
                run: run_id.clone(),
                reason,
            },
            step::SubjectError::Read(source) => record(source),
        })?;
    let digest = image.digest;
    if !step::waiting_for(&run, RunStatus::Scanning, steps::SCAN, request.attempt) {
        // The outcome is recorded, but what follows it (the `policy` message,
        // the alert) may have been lost if the previous delivery failed after
        // recording: the host redelivers for exactly that. Repeat it.
        if let Some(what) = step::repeat_after_redelivery(
            deps,
            &run,
            steps::SCAN,
            request.attempt,
            &digest,
            Some(step::Next {
                queue: "policy",
                step: steps::POLICY,
                waiting: RunStatus::CheckingPolicy,
                sessions: false,
            }),
        )
        .await?
        {
            return Ok(Done(format!("run {run_id}: {what}")));
        }
        // Redelivery, a stale attempt, or a run that moved on: no side effects.
        let status = run
            .steps
            .get(steps::SCAN)
            .map(|s| format!("{:?}", s.status).to_lowercase())
            .unwrap_or_else(|| "absent".into());
        return Ok(Done(format!(
            "run {run_id}: scan step is {status}, run is {}; nothing to do",
            run.status
        )));
    }
    let settings = deps.config.scan_settings(app);
    let now = OffsetDateTime::now_utc();
    // First look: mark the step running; its start is the clock for max_wait.
    let run = step::start(deps, &run, steps::SCAN).await?;
    let started = run
        .steps
        .get(steps::SCAN)
        .and_then(|s| s.started_at)
        .unwrap_or(now);

    match fetch(deps, &settings, &digest, &run_id).await {
        Err(e) => Err(e),
        Ok(Fetched::Broken(reason)) => {
            step::fail(deps, NAME, &run, steps::SCAN, &reason).await?;
            Ok(Done(format!("run {run_id}: failed: {reason}")))
        }
        Ok(Fetched::Pending(what)) => {
            let checks = run
                .steps
                .get(steps::SCAN)
                .and_then(|s| s.details.get("checks"))
                .and_then(serde_json::Value::as_u64)
                .unwrap_or(0) as u32;
            match gantry_scan::next_check(started, now, checks, settings.max_wait) {
                Some(at) => {
                    let next = checks + 1;
                    let summary = format!(
                        "no results yet from {what}; check {next} at {}",
                        rfc3339(at)
                    );
                    deps.runs
                        .update(&request.app, &request.run_id, |r| {
                            if let Some(s) = r.steps.get_mut(steps::SCAN) {
                                s.summary = Some(summary.clone());
                                s.details = serde_json::json!({"pending": true, "checks": next, "next_check": rfc3339(at)});
                            }
                            Ok(true)
                        })
                        .await
                        .map_err(record)?;
                    let message = OutMessage::json("scan", &request)
                        .map_err(queue)?
                        .with_id(format!(
                            "{}:recheck-{next}",
                            request.message_id(steps::SCAN)
                        ))
                        .scheduled_at(at)
                        .with_property("run-id", run_id.clone())
                        .with_property("app", request.app.to_string());
                    deps.send(message).await.map_err(queue)?;
                    Ok(Done(format!("run {run_id}: {summary}")))
                }
                None => {
                    let reason = format!(
                        "no scan results from {what} within max_wait {}s: failing closed",
                        settings.max_wait.as_secs()
                    );
                    step::block(
                        deps,
                        NAME,
                        &run,
                        steps::SCAN,
                        &digest,
                        &reason,
                        serde_json::json!({"pending": true, "checks": checks}),
                    )
                    .await?;
                    Ok(Done(format!("run {run_id}: blocked: {reason}")))
                }
            }
        }
        Ok(Fetched::Found(findings, origin)) => {
            let today = now.date();
            let verdict = gantry_scan::evaluate(
                &findings,
                &settings,
                &deps.config.scan.allow,
                &app.name,
                today,
            );
            save_scan(deps, &digest, &findings, &verdict, &origin)
                .await
                .map_err(record)?;
            if !verdict.expired_allow.is_empty() {
                step::alert(
                    deps,
                    &run,
                    steps::SCAN,
                    "allow-expired",
                    "allow-list-expired",
                    Severity::Warning,
                    Some(&digest),
                    format!(
                        "expired allow-list entries no longer apply to {}: {}",
                        app.name,
                        verdict.expired_allow.join(", ")
                    ),
                )
                .await?;
            }
            let details = serde_json::to_value(&verdict).unwrap_or_default();
            if verdict.passed {
                pass(deps, &run, &digest, &verdict, details).await?;
                Ok(Done(format!(
                    "run {run_id}: scan passed ({}), policy queued",
                    verdict.summary
                )))
            } else {
                step::block(
                    deps,
                    NAME,
                    &run,
                    steps::SCAN,
                    &digest,
                    &verdict.summary,
                    details,
                )
                .await?;
                Ok(Done(format!("run {run_id}: {}", verdict.summary)))
            }
        }
    }
}

/// The digest's findings from the configured source ([`gantry_context::fetch_findings`]),
/// errors named after this run.
async fn fetch(
    deps: &Deps,
    settings: &ScanSettings,
    digest: &Digest,
    run_id: &str,
) -> Result<Fetched, ScanCheckError> {
    gantry_context::fetch_findings(deps, settings, digest)
        .await
        .map_err(|e| match e {
            gantry_context::FetchError::ReadReport(source) => ScanCheckError::Record {
                run: run_id.to_string(),
                source: source.into(),
            },
            gantry_context::FetchError::QuerySource(source) => ScanCheckError::FetchFindings {
                run: run_id.to_string(),
                source,
            },
        })
}

/// `scans/{digest}.json`: what the gate saw and decided, for operators and CI.
async fn save_scan(
    deps: &Deps,
    digest: &Digest,
    findings: &Findings,
    verdict: &Verdict,
    origin: &str,
) -> Result<(), PipelineError> {
    let record = serde_json::json!({
        "digest": digest,
        "origin": origin,
        "scanned_at": findings.scanned_at,
        "checked_at": rfc3339(OffsetDateTime::now_utc()),
        "verdict": verdict,
        "findings": findings.findings,
    });
    deps.runs
        .put_json(&format!("scans/{digest}.json"), &record)
        .await
}

async fn pass(
    deps: &Deps,
    run: &Run,
    digest: &Digest,
    verdict: &Verdict,
    details: serde_json::Value,
) -> Result<(), StepError> {
    let now = OffsetDateTime::now_utc();
    let updated = deps
        .runs
        .update(&run.app, &run.id, |r| {
            // The run may have moved on (blocked, superseded) since it was read.
            if r.status != RunStatus::Scanning {
                return Ok(false);
            }
            let Some(s) = r.steps.get_mut(steps::SCAN) else {
                return Ok(false);
            };
            if s.status == StepStatus::Passed {
                return Ok(false);
            }
            s.finish(StepStatus::Passed, now, verdict.summary.clone());
            s.details = details.clone();
            r.status = RunStatus::CheckingPolicy;
            // After a retrigger the attempt continues from the earlier ones
            // (a reused MessageId would be dropped as a duplicate).
            let attempt = r.next_attempt(steps::POLICY);
            r.steps.insert(steps::POLICY.into(), Step::pending(attempt));
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
        "step.scan.passed",
        serde_json::json!({"digest": digest, "summary": verdict.summary}),
    )
    .await;
    // Sent whenever the run waits for policy (also on redelivery after a crash
    // here); the MessageId makes a repeat a no-op.
    if updated.status == RunStatus::CheckingPolicy
        && let Some(policy) = updated
            .steps
            .get(steps::POLICY)
            .filter(|s| s.status == StepStatus::Pending)
    {
        step::send_step(
            deps,
            "policy",
            steps::POLICY,
            &updated,
            digest,
            policy.attempts,
            None,
        )
        .await?;
    }
    Ok(())
}
