//! `security-event` (Service Bus `security-events`, no sessions): Microsoft
//! Defender for Cloud security alerts and container vulnerability
//! sub-assessments, forwarded by workflow automation (a Logic App) or
//! continuous export. Decoded by [`gantry_events::defender`].
//!
//! Each event is **correlated** to the apps it concerns:
//!
//! - a `K8s-namespace` named by the alert, in one of the AKS clusters of
//!   `[security] clusters` (ARM ids compared case-insensitively), maps to the
//!   apps deploying to that namespace ([`gantry_pipeline::AppConfig::namespace`]);
//! - an image digest maps to the apps that built it (`index/digests/{app}/{digest}`)
//!   or run it (`apps/{app}/deployed.json`, current or previous);
//! - a sub-assessment's `registryHost/repositoryName` maps to the app with that image.
//!
//! Then, per app: the event is recorded at `apps/{app}/security/{key}.json`
//! and on every run of a digest it names (`Run::security_alerts`). At or above
//! `[security] min_severity`, each digest it names is blocked
//! (`apps/{app}/blocked/{digest}`, the shape deploy's rollback writes), so no
//! deploy takes it again, and the alert is `high`. An event that maps to no app
//! is recorded at `security/unmatched/{key}.json`. Every record is alerted
//! once: the `alerts` MessageId is `security:{key}:{app|unmatched}` and the
//! record keeps `alerted_at`, so a redelivery after the broker's duplicate
//! window still does not alert twice.
//!
//! Idempotent: every write is create-if-absent or a compare-and-swap that is a
//! no-op once applied, so a redelivered Defender alert changes nothing twice.
//! Store and bus failures are transient (redelivered); an undecodable message
//! is rejected permanently before anything is written (the runtime records it
//! under `rejected/security-event/` and alerts).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use gantry_bus::{BusError, OutMessage};
use gantry_events::defender::{AlertSeverity, DefenderEvent, SecurityAlert, SubAssessment};
use gantry_pipeline::config::{SecuritySeverity, SeverityLevel};
use gantry_pipeline::messages::Deployed;
use gantry_pipeline::names::security_key;
use gantry_pipeline::runs::blobs;
use gantry_pipeline::{
    Alert, AppConfig, AppName, AuditEntry, Digest, PipelineError, RunId, SecurityAlertRef, Severity,
};
use gantry_runtime::rollback::{RollbackError, RollbackRequest};
use gantry_runtime::steps::rfc3339;
use gantry_runtime::{Deps, Done, FromMessage, Function, FunctionError, Invocation};
use serde_json::{Value, json};
use time::OffsetDateTime;

/// Function name: folder, route and span.
pub const NAME: &str = "security-event";

/// The queue it is triggered by.
pub const QUEUE: &str = "security-events";

/// The step name written in the blocked-digest records this function creates.
pub const BLOCK_STEP: &str = "security";

/// The function's registration.
pub fn function() -> Function {
    Function::queue(NAME, QUEUE, false, |inv, deps: Arc<Deps>| async move {
        handle(inv, &deps).await
    })
}

/// One `security-events` message: one Defender event or a batch.
#[derive(Debug, Clone)]
pub struct SecurityEvents(pub Vec<DefenderEvent>);

impl FromMessage for SecurityEvents {
    fn from_message(body: &[u8]) -> Result<Self, String> {
        gantry_events::defender::decode(body)
            .map(SecurityEvents)
            .map_err(|e| e.to_string())
    }
}

/// Why a Defender event could not be handled.
#[derive(Debug, thiserror::Error)]
pub enum SecurityEventError {
    /// Reading or writing state failed.
    #[error("recording Defender event {key} failed: {source}")]
    Record {
        /// The event's key.
        key: String,
        /// Cause.
        source: PipelineError,
    },
    /// Sending the alert failed.
    #[error("alerting Defender event {key} failed: {source}")]
    Alert {
        /// The event's key.
        key: String,
        /// Cause.
        source: BusError,
    },
    /// Starting the opted-in rollback failed for a reason that may pass
    /// (a refusal, such as no previous good version, is recorded instead).
    #[error("rolling back {app} for Defender event {key} failed: {source}")]
    Rollback {
        /// The event's key.
        key: String,
        /// The app.
        app: AppName,
        /// Cause.
        source: RollbackError,
    },
}

impl FunctionError for SecurityEventError {
    fn is_transient(&self) -> bool {
        match self {
            SecurityEventError::Record { source, .. } => source.is_transient(),
            SecurityEventError::Alert { source, .. } => source.is_transient(),
            SecurityEventError::Rollback { source, .. } => source.is_transient(),
        }
    }
}

/// Handles one `security-events` message (lambda style).
pub async fn handle(
    inv: Invocation<SecurityEvents>,
    deps: &Deps,
) -> Result<Done, SecurityEventError> {
    let mut lines = Vec::new();
    for event in &inv.event.0 {
        lines.push(handle_event(deps, event).await?);
    }
    Ok(Done(lines.join("; ")))
}

/// What gantry keeps of one Defender event, whatever its kind.
#[derive(Debug, Clone)]
struct Observation {
    /// `security_key` of the event's identity.
    key: String,
    /// Defender's id.
    alert_id: String,
    /// `alert` or `sub-assessment`.
    kind: &'static str,
    /// One human line.
    name: String,
    severity: SecuritySeverity,
    /// Digests it names (validated).
    digests: Vec<Digest>,
    /// The decoded event, as recorded.
    event: Value,
    /// Vulnerability findings (sub-assessments).
    findings: Value,
}

fn observe(event: &DefenderEvent) -> Observation {
    let recorded = serde_json::to_value(event).unwrap_or(Value::Null);
    match event {
        DefenderEvent::Alert(alert) => observe_alert(alert, recorded),
        DefenderEvent::SubAssessment(sub) => observe_sub_assessment(sub, recorded),
    }
}

fn observe_alert(alert: &SecurityAlert, recorded: Value) -> Observation {
    Observation {
        key: security_key(&alert.system_alert_id),
        alert_id: alert.system_alert_id.clone(),
        kind: "alert",
        name: alert.display_name.clone(),
        severity: match alert.severity {
            AlertSeverity::High => SecuritySeverity::High,
            AlertSeverity::Medium => SecuritySeverity::Medium,
            AlertSeverity::Low => SecuritySeverity::Low,
            AlertSeverity::Informational => SecuritySeverity::Informational,
        },
        // The decoder only returns exact `sha256:<64 hex>`; parse to be sure.
        digests: alert
            .digests()
            .iter()
            .filter_map(|d| Digest::parse(d).ok())
            .collect(),
        event: recorded,
        findings: Value::Null,
    }
}

fn observe_sub_assessment(sub: &SubAssessment, recorded: Value) -> Observation {
    let findings = gantry_scan::defender::sub_assessment_findings(
        &gantry_scan::defender::SubAssessmentFields {
            id: Some(&sub.id),
            vuln_id: sub.vuln_id.as_deref(),
            status_code: sub.status_code.as_deref(),
            status_severity: sub.status_severity.as_deref(),
            display_name: sub.display_name.as_deref(),
            additional_data: Some(&sub.additional_data),
        },
    );
    // Healthy: nothing found. An unrated finding counts as medium: it is a
    // finding, but not one that blocks under the default threshold unseen.
    let severity = findings
        .iter()
        .map(|f| match f.severity {
            SeverityLevel::Critical | SeverityLevel::High => SecuritySeverity::High,
            SeverityLevel::Medium | SeverityLevel::Unknown => SecuritySeverity::Medium,
            SeverityLevel::Low => SecuritySeverity::Low,
        })
        .max()
        .unwrap_or(SecuritySeverity::Informational);
    let name = match findings.first() {
        Some(f) => format!(
            "{} in {} {}{}",
            f.id,
            f.package,
            f.installed_version,
            if findings.len() > 1 {
                format!(" (+{} more)", findings.len() - 1)
            } else {
                String::new()
            }
        ),
        None => format!(
            "{} ({})",
            sub.display_name
                .as_deref()
                .or(sub.vuln_id.as_deref())
                .unwrap_or("vulnerability assessment"),
            sub.status_code.as_deref().unwrap_or("no status")
        ),
    };
    // A sub-assessment is re-exported whenever it changes: the same id with a
    // new status or scan time is a new observation, a redelivery is not.
    let identity = format!(
        "{}|{}|{}",
        sub.id,
        sub.status_code.as_deref().unwrap_or(""),
        sub.time_generated.as_deref().unwrap_or("")
    );
    Observation {
        key: security_key(&identity),
        alert_id: sub.id.clone(),
        kind: "sub-assessment",
        name,
        severity,
        digests: sub
            .digest
            .as_deref()
            .and_then(|d| Digest::parse(d).ok())
            .into_iter()
            .collect(),
        event: recorded,
        findings: serde_json::to_value(&findings).unwrap_or(Value::Null),
    }
}

/// Why an event maps to an app, and which of its digests are the app's.
#[derive(Debug, Default)]
struct Correlation {
    reasons: Vec<String>,
    /// Digests of the event that belong to the app, with the run of each (if any).
    digests: BTreeMap<Digest, Option<RunId>>,
}

async fn handle_event(deps: &Deps, event: &DefenderEvent) -> Result<String, SecurityEventError> {
    let obs = observe(event);
    let record_err = |source: PipelineError| SecurityEventError::Record {
        key: obs.key.clone(),
        source,
    };
    let matches = correlate(deps, event, &obs).await.map_err(record_err)?;
    if matches.is_empty() {
        record_unmatched(deps, &obs).await?;
        return Ok(format!(
            "{} {}: {} ({}) matches no app; recorded as unmatched",
            obs.kind,
            obs.key,
            obs.name,
            obs.severity.as_str()
        ));
    }
    let mut outcomes = Vec::new();
    for (app, correlation) in &matches {
        let Some(app) = deps.config.app(app.as_str()) else {
            continue;
        };
        outcomes.push(record_for_app(deps, &obs, app, correlation).await?);
    }
    Ok(format!(
        "{} {}: {} ({}): {}",
        obs.kind,
        obs.key,
        obs.name,
        obs.severity.as_str(),
        outcomes.join(", ")
    ))
}

/// The apps `event` concerns, each with why.
async fn correlate(
    deps: &Deps,
    event: &DefenderEvent,
    obs: &Observation,
) -> Result<BTreeMap<AppName, Correlation>, PipelineError> {
    let mut out: BTreeMap<AppName, Correlation> = BTreeMap::new();
    match event {
        DefenderEvent::Alert(alert) => {
            for ns in &alert.namespaces {
                // The namespace's own cluster when the alert says; otherwise
                // the resources the alert is about (an AKS alert names its cluster).
                let candidates: Vec<&str> = match &ns.cluster {
                    Some(c) => vec![c.as_str()],
                    None => alert.resource_ids.iter().map(String::as_str).collect(),
                };
                let Some(cluster) = candidates
                    .iter()
                    .find_map(|c| deps.config.security.cluster_of(c))
                else {
                    continue;
                };
                let cluster_name = cluster.rsplit('/').next().unwrap_or(cluster);
                for app in deps
                    .config
                    .apps
                    .iter()
                    .filter(|a| a.namespace().as_str() == ns.name)
                {
                    out.entry(app.name.clone())
                        .or_default()
                        .reasons
                        .push(format!("namespace {} in cluster {cluster_name}", ns.name));
                }
            }
        }
        DefenderEvent::SubAssessment(sub) => {
            if let (Some(host), Some(repo)) = (&sub.registry_host, &sub.repository)
                && let Some(app) = deps.config.app_for_image(host, repo)
            {
                out.entry(app.name.clone())
                    .or_default()
                    .reasons
                    .push(format!("image {host}/{repo}"));
            }
        }
    }
    for digest in &obs.digests {
        for app in &deps.config.apps {
            let run = deps.runs.by_digest(&app.name, digest).await?;
            let deployed = deployed(deps, &app.name).await?;
            let running = [&deployed.current, &deployed.previous]
                .into_iter()
                .flatten()
                .find(|v| v.digest == *digest);
            if run.is_none() && running.is_none() {
                continue;
            }
            let entry = out.entry(app.name.clone()).or_default();
            entry.reasons.push(match &run {
                Some(id) => format!("digest {digest} (run {id})"),
                None => format!("digest {digest} (deployed)"),
            });
            entry.digests.insert(
                digest.clone(),
                run.or_else(|| running.map(|v| v.run_id.clone())),
            );
        }
    }
    // An app matched by namespace or image, not by digest, still owns the
    // event's digests only if they are its own (checked above): a digest of
    // another app is never blocked under this one.
    Ok(out)
}

async fn deployed(deps: &Deps, app: &AppName) -> Result<Deployed, PipelineError> {
    let name = blobs::deployed(app);
    match deps.runs.raw().get(&name).await? {
        None => Ok(Deployed::default()),
        Some(v) => serde_json::from_slice(&v.body).map_err(|e| PipelineError::Decode {
            name,
            message: e.to_string(),
        }),
    }
}

/// Records `obs` for `app`: blocks its digests at or above the threshold,
/// writes the security record, adds it to the runs it touches, alerts once.
async fn record_for_app(
    deps: &Deps,
    obs: &Observation,
    app: &AppConfig,
    correlation: &Correlation,
) -> Result<String, SecurityEventError> {
    let record_err = |source: PipelineError| SecurityEventError::Record {
        key: obs.key.clone(),
        source,
    };
    let now = OffsetDateTime::now_utc();
    let at_threshold = obs.severity >= deps.config.security.min_severity;
    let reason = format!(
        "Defender {} {} ({}): {}",
        obs.kind,
        obs.alert_id,
        obs.severity.as_str(),
        obs.name
    );

    // Blocked first, as every gate does: even if what follows is interrupted,
    // the digest never deploys again automatically.
    let mut blocked = Vec::new();
    if at_threshold {
        for (digest, run) in &correlation.digests {
            let body = serde_json::to_vec_pretty(&json!({
                "digest": digest, "run_id": run, "step": BLOCK_STEP, "reason": reason,
                "at": rfc3339(now),
            }))
            .unwrap_or_default();
            match deps
                .runs
                .raw()
                .create(&blobs::blocked(&app.name, digest), &body)
                .await
            {
                Ok(_) | Err(gantry_store::StoreError::Conflict { .. }) => {}
                Err(e) => return Err(record_err(e.into())),
            }
            blocked.push(digest.clone());
        }
    }

    let name = blobs::security(&app.name, &obs.key);
    let runs: BTreeSet<&RunId> = correlation.digests.values().flatten().collect();
    let record = json!({
        "key": obs.key,
        "kind": obs.kind,
        "alert_id": obs.alert_id,
        "name": obs.name,
        "severity": obs.severity,
        "app": app.name,
        "correlated_by": correlation.reasons,
        "digests": correlation.digests.keys().collect::<Vec<_>>(),
        "runs": runs,
        "blocked": blocked,
        "min_severity": deps.config.security.min_severity,
        "findings": obs.findings,
        "event": obs.event,
        "recorded_at": rfc3339(now),
    });
    let created = create_json(deps, &name, &record)
        .await
        .map_err(record_err)?;

    let entry = SecurityAlertRef {
        key: obs.key.clone(),
        alert_id: obs.alert_id.clone(),
        name: obs.name.clone(),
        severity: obs.severity,
        blocked: false,
        recorded_at: now,
    };
    for (digest, run_id) in &correlation.digests {
        let Some(run_id) = run_id else { continue };
        // The index may name a run that was never stored (a crash between the
        // two): nothing to record on then.
        if deps
            .runs
            .get(&app.name, run_id)
            .await
            .map_err(record_err)?
            .is_none()
        {
            continue;
        }
        let entry = SecurityAlertRef {
            blocked: blocked.contains(digest),
            ..entry.clone()
        };
        deps.runs
            .update(&app.name, run_id, |r| {
                if r.security_alerts.iter().any(|a| a.key == entry.key) {
                    return Ok(false);
                }
                r.security_alerts.push(entry.clone());
                Ok(true)
            })
            .await
            .map_err(record_err)?;
    }

    if created {
        deps.audit(AuditEntry {
            at: now,
            actor: NAME.into(),
            action: "security.alert-recorded".into(),
            app: Some(app.name.clone()),
            run: (runs.len() == 1)
                .then(|| runs.iter().next().map(|r| (*r).clone()))
                .flatten(),
            detail: json!({
                "key": obs.key, "alert_id": obs.alert_id, "severity": obs.severity,
                "blocked": blocked, "record": name,
            }),
        })
        .await;
    }

    let mut alert = Alert::new(
        "security-alert",
        alert_severity(obs.severity, at_threshold),
        format!(
            "{}: {reason}{}",
            app.name,
            if blocked.is_empty() {
                String::new()
            } else {
                format!(
                    "; blocked {}",
                    blocked
                        .iter()
                        .map(Digest::to_string)
                        .collect::<Vec<_>>()
                        .join(", ")
                )
            }
        ),
    );
    alert.app = Some(app.name.clone());
    alert.digest = blocked
        .first()
        .or(correlation.digests.keys().next())
        .cloned();
    alert.run_id = (runs.len() == 1)
        .then(|| runs.iter().next().map(|r| (*r).clone()))
        .flatten();
    alert.step = Some(BLOCK_STEP.into());
    alert.detail = json!({
        "alert_id": obs.alert_id, "kind": obs.kind, "key": obs.key, "record": name,
        "correlated_by": correlation.reasons, "blocked": blocked,
    });
    alert_once(
        deps,
        obs,
        &name,
        ALERTED,
        &format!("security:{}:{}", obs.key, app.name),
        &alert,
    )
    .await?;

    // Opt-in: the digest just blocked is the one running, so blocking alone
    // leaves it running. Roll back to the previous good digest (through the
    // deploy step, like an operator's rollback).
    let mut rolled_back = None;
    if app.rollback_on_security_alert && !blocked.is_empty() {
        let running = deployed(deps, &app.name)
            .await
            .map_err(record_err)?
            .current
            .filter(|c| blocked.contains(&c.digest));
        if let Some(current) = running {
            rolled_back =
                Some(rollback_once(deps, obs, app, &name, &current.digest, &reason).await?);
        }
    }

    let mut outcome = format!("{} ({})", app.name, correlation.reasons.join("; "));
    if !blocked.is_empty() {
        outcome.push_str(&format!(
            " blocked {}",
            blocked
                .iter()
                .map(Digest::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        ));
    }
    if let Some(what) = rolled_back {
        outcome.push_str(&format!("; {what}"));
    }
    Ok(outcome)
}

/// Record field saying the event's alert was sent.
const ALERTED: &str = "alerted_at";
/// Record field saying the rollback's alert was sent.
const ROLLBACK_ALERTED: &str = "rollback_alerted_at";
/// How many of an app's newest runs are searched for a rollback this event
/// already started (a crash between starting it and recording it).
const ROLLBACK_SEARCH: usize = 50;

/// Starts the rollback of `app` away from `digest` once per event: the
/// record's `rollback` field says it was started (or refused), and a rollback
/// run this event's principal already created is found before another is.
async fn rollback_once(
    deps: &Deps,
    obs: &Observation,
    app: &AppConfig,
    record: &str,
    digest: &Digest,
    reason: &str,
) -> Result<String, SecurityEventError> {
    let record_err = |source: PipelineError| SecurityEventError::Record {
        key: obs.key.clone(),
        source,
    };
    let principal = format!("defender:{}", obs.alert_id);
    let recorded = deps
        .runs
        .raw()
        .get(record)
        .await
        .map_err(|e| record_err(e.into()))?
        .and_then(|v| serde_json::from_slice::<Value>(&v.body).ok())
        .and_then(|v| v.get("rollback").cloned())
        .filter(|v| !v.is_null());
    let outcome = match recorded {
        Some(outcome) => outcome,
        None => {
            let outcome = match started_by(deps, &app.name, &principal)
                .await
                .map_err(record_err)?
            {
                Some(run) => rollback_outcome(&run),
                None => match gantry_runtime::rollback::start(
                    deps,
                    RollbackRequest {
                        app: &app.name,
                        digest: None,
                        requested_by: &principal,
                        reason: Some(reason),
                    },
                )
                .await
                {
                    Ok(run) => rollback_outcome(&run),
                    Err(e) if e.is_transient() => {
                        return Err(SecurityEventError::Rollback {
                            key: obs.key.clone(),
                            app: app.name.clone(),
                            source: e,
                        });
                    }
                    // No previous good version, or it is blocked too: nothing
                    // to roll back to. The digest stays blocked and running;
                    // the alert says so.
                    Err(e) => json!({"from": digest, "refused": e.to_string()}),
                },
            };
            deps.runs
                .update_json::<Value, _>(record, |v| {
                    let Some(obj) = v.as_object_mut() else {
                        return Ok(false);
                    };
                    if obj.get("rollback").is_some_and(|r| !r.is_null()) {
                        return Ok(false);
                    }
                    obj.insert("rollback".into(), outcome.clone());
                    Ok(true)
                })
                .await
                .map_err(record_err)?;
            outcome
        }
    };
    let refused = outcome.get("refused").and_then(Value::as_str);
    let text = match (refused, outcome.get("run_id").and_then(Value::as_str)) {
        (Some(why), _) => format!("rollback refused: {why}"),
        (None, Some(run)) => format!(
            "rolling back from {digest} to {} (run {run})",
            outcome.get("to").and_then(Value::as_str).unwrap_or("?")
        ),
        (None, None) => "rollback recorded".to_string(),
    };
    let mut alert = Alert::new(
        if refused.is_some() {
            "security-rollback-refused"
        } else {
            "security-rollback"
        },
        Severity::High,
        format!(
            "{}: {text} after Defender {} {}",
            app.name, obs.kind, obs.alert_id
        ),
    );
    alert.app = Some(app.name.clone());
    alert.digest = Some(digest.clone());
    alert.run_id = outcome
        .get("run_id")
        .and_then(Value::as_str)
        .and_then(|r| RunId::parse(r).ok());
    alert.step = Some(BLOCK_STEP.into());
    alert.detail =
        json!({"alert_id": obs.alert_id, "key": obs.key, "record": record, "rollback": outcome});
    alert_once(
        deps,
        obs,
        record,
        ROLLBACK_ALERTED,
        &format!("security:{}:{}:rb", obs.key, app.name),
        &alert,
    )
    .await?;
    Ok(text)
}

/// A rollback run of `app` that `principal` asked for and that did not fail
/// to start, among the newest runs.
async fn started_by(
    deps: &Deps,
    app: &AppName,
    principal: &str,
) -> Result<Option<gantry_pipeline::Run>, PipelineError> {
    let ids = deps.runs.list_ids(Some(app)).await?;
    for (_, id) in ids.into_iter().rev().take(ROLLBACK_SEARCH) {
        if let Some(run) = deps.runs.get(app, &id).await?
            && run
                .rollback
                .as_ref()
                .is_some_and(|r| r.requested_by == principal)
            && run.status != gantry_pipeline::RunStatus::Failed
        {
            return Ok(Some(run));
        }
    }
    Ok(None)
}

fn rollback_outcome(run: &gantry_pipeline::Run) -> Value {
    json!({
        "run_id": run.id,
        "to": run.image.as_ref().map(|i| &i.digest),
        "of_run": run.rollback.as_ref().map(|r| &r.run_id),
    })
}

/// Records an event that maps to no app, and alerts once.
async fn record_unmatched(deps: &Deps, obs: &Observation) -> Result<(), SecurityEventError> {
    let record_err = |source: PipelineError| SecurityEventError::Record {
        key: obs.key.clone(),
        source,
    };
    let now = OffsetDateTime::now_utc();
    let name = blobs::security_unmatched(&obs.key);
    let record = json!({
        "key": obs.key,
        "kind": obs.kind,
        "alert_id": obs.alert_id,
        "name": obs.name,
        "severity": obs.severity,
        "digests": obs.digests,
        "findings": obs.findings,
        "event": obs.event,
        "recorded_at": rfc3339(now),
    });
    if create_json(deps, &name, &record)
        .await
        .map_err(record_err)?
    {
        deps.audit(AuditEntry {
            at: now,
            actor: NAME.into(),
            action: "security.alert-unmatched".into(),
            app: None,
            run: None,
            detail: json!({"key": obs.key, "alert_id": obs.alert_id, "severity": obs.severity, "record": name}),
        })
        .await;
    }
    let at_threshold = obs.severity >= deps.config.security.min_severity;
    let mut alert = Alert::new(
        "security-alert-unmatched",
        // Unmatched is never quiet: someone must look at what gantry could not place.
        alert_severity(obs.severity, at_threshold).max(Severity::Warning),
        format!(
            "Defender {} {} ({}) matches no app: {}",
            obs.kind,
            obs.alert_id,
            obs.severity.as_str(),
            obs.name
        ),
    );
    alert.digest = obs.digests.first().cloned();
    alert.detail =
        json!({"alert_id": obs.alert_id, "kind": obs.kind, "key": obs.key, "record": name});
    alert_once(
        deps,
        obs,
        &name,
        ALERTED,
        &format!("security:{}:unmatched", obs.key),
        &alert,
    )
    .await
}

fn alert_severity(severity: SecuritySeverity, at_threshold: bool) -> Severity {
    if at_threshold {
        return Severity::High;
    }
    match severity {
        SecuritySeverity::Informational => Severity::Info,
        _ => Severity::Warning,
    }
}

/// Creates `name` with `value` unless it exists; `true` when this call created it.
async fn create_json(deps: &Deps, name: &str, value: &Value) -> Result<bool, PipelineError> {
    let body = serde_json::to_vec_pretty(value).map_err(|e| PipelineError::Decode {
        name: name.to_string(),
        message: e.to_string(),
    })?;
    match deps.runs.raw().create(name, &body).await {
        Ok(_) => Ok(true),
        Err(gantry_store::StoreError::Conflict { .. }) => Ok(false),
        Err(e) => Err(e.into()),
    }
}

/// Sends `alert` unless the record at `record` has `field` set, then sets it.
/// The MessageId covers a crash between the two (within the broker's
/// duplicate window); the field covers redeliveries after it.
async fn alert_once(
    deps: &Deps,
    obs: &Observation,
    record: &str,
    field: &str,
    message_id: &str,
    alert: &Alert,
) -> Result<(), SecurityEventError> {
    let record_err = |source: PipelineError| SecurityEventError::Record {
        key: obs.key.clone(),
        source,
    };
    let current = deps
        .runs
        .raw()
        .get(record)
        .await
        .map_err(|e| record_err(e.into()))?;
    let alerted = current
        .and_then(|v| serde_json::from_slice::<Value>(&v.body).ok())
        .is_some_and(|v| v.get(field).is_some_and(|a| !a.is_null()));
    if alerted {
        return Ok(());
    }
    let queue_err = |source| SecurityEventError::Alert {
        key: obs.key.clone(),
        source,
    };
    let message = OutMessage::json("alerts", alert)
        .map_err(queue_err)?
        .with_id(message_id);
    deps.send(message).await.map_err(queue_err)?;
    let now = rfc3339(OffsetDateTime::now_utc());
    deps.runs
        .update_json::<Value, _>(record, |v| {
            let Some(obj) = v.as_object_mut() else {
                return Ok(false); // absent (or not an object): nothing to mark
            };
            if obj.get(field).is_some_and(|a| !a.is_null()) {
                return Ok(false);
            }
            obj.insert(field.into(), Value::String(now.clone()));
            Ok(true)
        })
        .await
        .map_err(record_err)?;
    Ok(())
}
