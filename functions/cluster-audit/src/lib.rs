//! `cluster-audit` (timer, every 15 minutes): what actually runs, checked
//! again after the gates let it through.
//!
//! For every app with a deployed version (`apps/{app}/deployed.json`):
//!
//! - **Live objects**: the objects the deployed run renders to are read back
//!   from the target — the cluster (`kubernetes`, [`gantry_kube::Cluster::live`])
//!   or the files in `<dir>/<app>/` (`directory`).
//! - **Policy audit**: the live objects, and (kubernetes) every other object
//!   of those kinds in the app's namespace, are evaluated with the same policy
//!   set as the policy gate; violations are alerted, never enforced (audit
//!   only: no run changes, nothing blocked).
//! - **Drift**: each live object must still hold every field gantry rendered
//!   ([`drift::differences`]); a missing object is drift too. When the deployed
//!   run no longer renders to the recorded manifest hash, `gantry.toml`
//!   changed since the deploy: that is reported instead of field drift.
//! - **Vulnerability re-check**: the deployed digest's findings are fetched
//!   again (same source, threshold and allow-list as the scan gate); blocking
//!   findings that the recorded verdict did not have raise one high alert,
//!   recorded in `apps/{app}/rescan.json` so they alert once.
//!
//! Then the governance audit of the cluster ([`governance`]: required
//! labels, mandatory DaemonSets, ResourceQuota and LimitRange per managed
//! namespace, quota usage) and the GitHub redelivery sweep ([`github`]).
//!
//! # Alerting once
//!
//! Findings of an app are fingerprinted and kept at `audit/state/{app}.json`
//! (open findings, and how often each fingerprint has appeared). A finding
//! alerts when it appears, with MessageId `audit:{app}:{fingerprint}:{n}`
//! (`n` = its appearance): a repeated sweep sends nothing, a sweep repeated
//! after a crash between the alert and the state write sends the same
//! MessageId again (dropped as a duplicate), and a finding that disappears and
//! comes back is appearance `n + 1`, a new alert.
//!
//! # Failures
//!
//! One app's unreadable cluster or broken render is recorded in its state
//! (`error`) and the sweep goes on; open findings stay open (they were not
//! re-checked). Only the state store or the alert queue failing answers
//! non-2xx (after every app was tried).

pub mod drift;
pub mod github;
pub mod governance;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use gantry_bus::{BusError, OutMessage};
use gantry_pipeline::config::DeployTarget;
use gantry_pipeline::findings;
use gantry_pipeline::messages::Deployed;
use gantry_pipeline::runs::blobs;
use gantry_pipeline::{Alert, AppConfig, PipelineError, Run, Severity};
use gantry_runtime::{Deps, Done, Function, FunctionError, Invocation, TimerInfo};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sha2::Digest as _;
use time::OffsetDateTime;

/// Function name: folder, route and span.
pub const NAME: &str = "cluster-audit";

/// NCRONTAB schedule (with seconds): every 15 minutes.
pub const SCHEDULE: &str = "0 */15 * * * *";

/// The function's registration.
pub fn function() -> Function {
    Function::timer(NAME, SCHEDULE, |inv, deps: Arc<Deps>| async move {
        handle(inv, &deps).await
    })
}

/// Why a sweep could not be completed.
#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    /// Reading or writing the audit's own state failed.
    #[error("recording audit state {name} failed: {source}")]
    RecordState {
        /// The blob.
        name: String,
        /// Cause.
        source: PipelineError,
    },
    /// Sending an alert failed.
    #[error("sending alert {message_id} failed: {source}")]
    SendAlert {
        /// The alert's MessageId.
        message_id: String,
        /// Cause.
        source: BusError,
    },
}

impl FunctionError for AuditError {
    fn is_transient(&self) -> bool {
        match self {
            AuditError::RecordState { source, .. } => source.is_transient(),
            AuditError::SendAlert { source, .. } => source.is_transient(),
        }
    }
}

/// `audit/state/{app}`.
pub fn state_name(app: &gantry_pipeline::AppName) -> String {
    findings::app_state_blob(app)
}

/// `apps/{app}/rescan.json`.
pub fn rescan_name(app: &gantry_pipeline::AppName) -> String {
    findings::rescan_blob(app)
}

/// `audit/state/{app}.json` (and `_cluster.json`): open findings of a scope.
pub use gantry_pipeline::findings::AuditState as AppState;
pub use gantry_pipeline::findings::OpenFinding;

/// A finding of one check, before it is compared with the state.
#[derive(Debug, Clone)]
pub(crate) struct Finding {
    pub(crate) fingerprint: String,
    pub(crate) kind: &'static str,
    pub(crate) severity: Severity,
    pub(crate) reason: String,
    pub(crate) detail: Value,
    /// The app a cluster finding concerns (app findings: their own app).
    pub(crate) app: Option<gantry_pipeline::AppName>,
}

pub(crate) fn short_hash(text: &str) -> String {
    hex::encode(sha2::Sha256::digest(text.as_bytes()))[..24].to_string()
}

pub(crate) fn now_rfc3339() -> String {
    gantry_runtime::steps::rfc3339(OffsetDateTime::now_utc())
}

/// Handles one timer occurrence (lambda style).
pub async fn handle(inv: Invocation<TimerInfo>, deps: &Deps) -> Result<Done, AuditError> {
    if inv.event.is_past_due {
        // The host was down at the scheduled time: this run covers the gap
        // (the GitHub cursor and the finding state make it catch up).
        tracing::info!("cluster-audit run is past due");
    }
    let mut lines = Vec::new();
    let mut fatal: Option<AuditError> = None;
    for app in &deps.config.apps {
        match audit_app(deps, app).await {
            Ok(line) => lines.push(format!("{}: {line}", app.name)),
            Err(e) => {
                lines.push(format!("{}: {e}", app.name));
                // Keep going: the other apps still deserve their check.
                if fatal.is_none() {
                    fatal = Some(e);
                }
            }
        }
    }
    match governance::sweep(deps).await {
        Ok(line) => lines.push(format!("governance: {line}")),
        Err(e) => {
            lines.push(format!("governance: {e}"));
            if fatal.is_none() {
                fatal = Some(e);
            }
        }
    }
    match github::sweep(deps).await {
        Ok(reports) => {
            for r in reports {
                let mut line = format!("github {}: {} redelivered", r.hook, r.redelivered.len());
                if let Some(e) = r.error {
                    line.push_str(&format!(" ({e})"));
                }
                lines.push(line);
            }
        }
        Err(source) => {
            if fatal.is_none() {
                fatal = Some(AuditError::RecordState {
                    name: "audit/github/".into(),
                    source,
                });
            }
        }
    }
    match fatal {
        Some(e) => {
            // The host logs only the error: keep what the sweep did visible.
            tracing::warn!(done = %lines.join("; "), "cluster-audit incomplete");
            Err(e)
        }
        None if lines.is_empty() => Ok(Done("nothing to audit".into())),
        None => Ok(Done(lines.join("; "))),
    }
}

/// What the deployed run renders to, or why that cannot be known.
enum Expected {
    /// Nothing deployed yet.
    Nothing,
    /// The deployed run and its rendered objects; `config_changed` when they
    /// no longer hash to what was deployed.
    Rendered {
        run: Box<Run>,
        digest: gantry_pipeline::Digest,
        objects: Vec<Value>,
        config_changed: Option<String>,
    },
    /// The deployed record or run is unusable.
    Broken(String),
}

async fn expected(deps: &Deps, app: &AppConfig) -> Result<Expected, PipelineError> {
    let name = blobs::deployed(&app.name);
    let Some(v) = deps.runs.raw().get(&name).await? else {
        return Ok(Expected::Nothing);
    };
    let deployed: Deployed = match serde_json::from_slice(&v.body) {
        Ok(d) => d,
        Err(e) => return Ok(Expected::Broken(format!("{name} is unreadable: {e}"))),
    };
    let Some(current) = deployed.current else {
        return Ok(Expected::Nothing);
    };
    let Some(run) = deps.runs.get(&app.name, &current.run_id).await? else {
        return Ok(Expected::Broken(format!(
            "the deployed run {} is gone",
            current.run_id
        )));
    };
    let source = match gantry_context::rendering_source(deps, &run).await? {
        Ok(s) => s,
        Err(why) => return Ok(Expected::Broken(why)),
    };
    let rendered = match gantry_manifests::render_run(app, &source) {
        Ok(r) => r,
        Err(e) => return Ok(Expected::Broken(format!("rendering manifests: {e}"))),
    };
    let config_changed = (rendered.hash != current.manifest_hash).then(|| {
        format!(
            "gantry.toml changed since run {} was deployed: it renders to manifest hash {} now, {} was deployed; the next deploy applies the change",
            current.run_id,
            &rendered.hash[..rendered.hash.len().min(12)],
            &current.manifest_hash[..current.manifest_hash.len().min(12)]
        )
    });
    Ok(Expected::Rendered {
        run: Box::new(run),
        digest: current.digest,
        objects: rendered.objects,
        config_changed,
    })
}

/// The live counterpart of each rendered object.
async fn live_objects(
    deps: &Deps,
    app: &AppConfig,
    objects: &[Value],
) -> Result<Vec<Option<Value>>, String> {
    match deps.config.deploy.target {
        DeployTarget::Kubernetes => {
            let cluster = gantry_context::cluster(deps)
                .await
                .map_err(|e| e.to_string())?;
            cluster.live(objects).await.map_err(|e| e.to_string())
        }
        DeployTarget::Directory => {
            let folder = deps.config.deploy_dir(&app.name);
            let mut out = Vec::with_capacity(objects.len());
            for object in objects {
                let path = folder.join(gantry_manifests::object_file_name(object));
                match std::fs::read_to_string(&path) {
                    Ok(text) => {
                        let docs: Vec<Value> = serde_saphyr::from_multiple(&text)
                            .map_err(|e| format!("{}: {e}", path.display()))?;
                        out.push(docs.into_iter().next());
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => out.push(None),
                    Err(e) => return Err(format!("{}: {e}", path.display())),
                }
            }
            Ok(out)
        }
    }
}

/// Objects of the kinds gantry applies in the app's namespace that are not
/// among `known` (compared by kind and name).
async fn others_in_namespace(
    deps: &Deps,
    app: &AppConfig,
    known: &[Value],
) -> Result<Vec<Value>, String> {
    let cluster = gantry_context::cluster(deps)
        .await
        .map_err(|e| e.to_string())?;
    let listed = cluster
        .list_namespace(app.namespace().as_str())
        .await
        .map_err(|e| e.to_string())?;
    let known: BTreeSet<(String, String)> = known.iter().map(describe).collect();
    Ok(listed
        .into_iter()
        .filter(|o| !known.contains(&describe(o)))
        .collect())
}

fn describe(object: &Value) -> (String, String) {
    let text = |p: &str| {
        object
            .pointer(p)
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string()
    };
    (text("/kind"), text("/metadata/name"))
}

/// Checks one app; `Ok` carries the line for the log (per-app problems
/// included), `Err` only for state and alert failures.
async fn audit_app(deps: &Deps, app: &AppConfig) -> Result<String, AuditError> {
    let state_blob = state_name(&app.name);
    let record = |source: PipelineError| AuditError::RecordState {
        name: state_blob.clone(),
        source,
    };
    let mut state: AppState = match deps.runs.raw().get(&state_blob).await {
        // An unreadable state starts afresh (open findings alert again)
        // rather than stopping the audit of this app for good.
        Ok(Some(v)) => serde_json::from_slice(&v.body).unwrap_or_else(|e| {
            tracing::warn!(blob = %state_blob, error = %e, "audit state unreadable; starting afresh");
            AppState::default()
        }),
        Ok(None) => AppState::default(),
        Err(e) => return Err(record(e.into())),
    };
    let expected = expected(deps, app).await.map_err(&record)?;
    let (run, digest, objects, config_changed) = match expected {
        Expected::Nothing => return Ok("nothing deployed".into()),
        Expected::Broken(why) => {
            state.error = Some(why.clone());
            state.checked_at = Some(now_rfc3339());
            deps.runs
                .put_json(&state_blob, &state)
                .await
                .map_err(&record)?;
            return Ok(format!("not checked: {why}"));
        }
        Expected::Rendered {
            run,
            digest,
            objects,
            config_changed,
        } => (run, digest, objects, config_changed),
    };

    let mut notes = Vec::new();
    // The re-scan does not need the cluster: do it whatever the cluster says.
    if let Some(line) = rescan(deps, app, &run, &digest).await? {
        notes.push(line);
    }

    let live = match live_objects(deps, app, &objects).await {
        Ok(l) => l,
        Err(why) => {
            state.error = Some(why.clone());
            state.checked_at = Some(now_rfc3339());
            state.run_id = Some(run.id.to_string());
            deps.runs
                .put_json(&state_blob, &state)
                .await
                .map_err(&record)?;
            notes.push(format!("live objects not read: {why}"));
            return Ok(notes.join("; "));
        }
    };

    let mut findings = Vec::new();
    match &config_changed {
        Some(reason) => findings.push(Finding {
            fingerprint: format!("config-changed:{}", run.id),
            kind: "config-changed",
            severity: Severity::Warning,
            reason: reason.clone(),
            detail: Value::Null,
            app: None,
        }),
        None => {
            for (rendered, live) in objects.iter().zip(&live) {
                let (kind, name) = describe(rendered);
                match live {
                    None => findings.push(Finding {
                        fingerprint: format!("missing:{kind}/{name}"),
                        kind: "drift",
                        severity: Severity::High,
                        reason: format!("{kind} {name} is gone from the target"),
                        detail: serde_json::json!({"object": format!("{kind}/{name}"), "missing": true}),
                        app: None,
                    }),
                    Some(live) => {
                        let scaled = kind == "Deployment" && drift::replicas_scaled(live);
                        for d in drift::differences(rendered, live) {
                            if scaled && d.path == drift::REPLICAS {
                                continue;
                            }
                            let shown = d.live.as_deref().unwrap_or("(missing)");
                            findings.push(Finding {
                                fingerprint: format!("drift:{kind}/{name}:{}", d.path),
                                kind: "drift",
                                severity: Severity::High,
                                reason: format!(
                                    "{kind} {name}: {} is {shown}, gantry applied {}",
                                    d.path, d.rendered
                                ),
                                detail: serde_json::json!({
                                    "object": format!("{kind}/{name}"),
                                    "path": d.path,
                                    "rendered": d.rendered,
                                    "live": d.live,
                                }),
                                app: None,
                            });
                        }
                    }
                }
            }
        }
    }

    let mut present: Vec<Value> = live.into_iter().flatten().collect();
    // Everything else of those kinds in the app's namespace (a Deployment
    // made by hand, a Service added by another tool) is audited too.
    if deps.config.deploy.target == DeployTarget::Kubernetes {
        match others_in_namespace(deps, app, &present).await {
            Ok(others) => present.extend(others),
            Err(why) => notes.push(format!("namespace not listed: {why}")),
        }
    }
    match gantry_context::policy_set(deps)
        .map_err(|e| e.to_string())
        .and_then(|set| set.evaluate(&present, &[]).map_err(|e| e.to_string()))
    {
        Ok(violations) => {
            for v in violations {
                let object = format!(
                    "{}/{}/{}",
                    v.kind,
                    v.namespace.as_deref().unwrap_or(""),
                    v.name
                );
                let deny = v.enforcement_action == gantry_policy::EnforcementAction::Deny;
                findings.push(Finding {
                    fingerprint: format!(
                        "policy:{}:{object}:{}",
                        v.constraint,
                        short_hash(&v.message)
                    ),
                    kind: "policy-violation",
                    severity: if deny {
                        Severity::High
                    } else {
                        Severity::Warning
                    },
                    reason: format!("{} {}: {} ({})", v.kind, v.name, v.message, v.constraint),
                    detail: serde_json::to_value(&v).unwrap_or_default(),
                    app: None,
                });
            }
        }
        Err(why) => notes.push(format!("policy audit not run: {why}")),
    }

    let (new, resolved) = settle(deps, app.name.as_str(), &mut state, findings, |f| {
        let mut alert = Alert::new(f.kind, f.severity, format!("{}: {}", app.name, f.reason));
        alert.app = Some(app.name.clone());
        alert.run_id = Some(run.id.clone());
        alert.step = Some("audit".into());
        alert.digest = Some(digest.clone());
        alert.detail = f.detail.clone();
        alert
    })
    .await?;
    state.error = None;
    state.checked_at = Some(now_rfc3339());
    state.run_id = Some(run.id.to_string());
    deps.runs
        .put_json(&state_blob, &state)
        .await
        .map_err(&record)?;
    notes.insert(
        0,
        format!(
            "{} open findings ({new} new, {resolved} resolved)",
            state.open.len()
        ),
    );
    Ok(notes.join("; "))
}

/// Alerts the findings that are new, and updates `state` to the current set.
/// `scope` is the app name or [`findings::CLUSTER_SCOPE`] (in the MessageId);
/// `alert_for` builds the alert of a new finding. Returns (new, resolved).
pub(crate) async fn settle(
    deps: &Deps,
    scope: &str,
    state: &mut AppState,
    found: Vec<Finding>,
    alert_for: impl Fn(&Finding) -> Alert,
) -> Result<(usize, usize), AuditError> {
    let now = now_rfc3339();
    let mut current: BTreeMap<String, OpenFinding> = BTreeMap::new();
    let mut new = 0;
    for f in found {
        if current.contains_key(&f.fingerprint) {
            continue;
        }
        let open = match state.open.get(&f.fingerprint) {
            // Still open: keep `since`, refresh what it says now (a usage
            // ratio that moved, a longer list of missing labels).
            Some(open) => OpenFinding {
                reason: f.reason.clone(),
                severity: Some(f.severity),
                detail: f.detail.clone(),
                ..open.clone()
            },
            None => {
                let n = state.appearances.get(&f.fingerprint).copied().unwrap_or(0) + 1;
                let message_id = format!("audit:{scope}:{}:{n}", short_hash(&f.fingerprint));
                send_alert(deps, &alert_for(&f), message_id).await?;
                state.appearances.insert(f.fingerprint.clone(), n);
                new += 1;
                OpenFinding {
                    kind: f.kind.into(),
                    reason: f.reason.clone(),
                    since: now.clone(),
                    severity: Some(f.severity),
                    app: f.app.clone(),
                    detail: f.detail.clone(),
                }
            }
        };
        current.insert(f.fingerprint, open);
    }
    let resolved = state
        .open
        .keys()
        .filter(|k| !current.contains_key(*k))
        .count();
    state.open = current;
    Ok((new, resolved))
}

pub(crate) async fn send_alert(
    deps: &Deps,
    alert: &Alert,
    message_id: String,
) -> Result<(), AuditError> {
    let send_err = |source| AuditError::SendAlert {
        message_id: message_id.clone(),
        source,
    };
    let message = OutMessage::json("alerts", alert)
        .map_err(send_err)?
        .with_id(message_id.clone());
    deps.send(message).await.map_err(send_err)
}

/// `apps/{app}/rescan.json`: blocking findings of the deployed digest
/// already alerted.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Rescan {
    /// The digest these are about (another digest starts afresh).
    #[serde(default)]
    pub digest: Option<String>,
    /// `id|package|installed_version` of every finding alerted.
    #[serde(default)]
    pub alerted: BTreeSet<String>,
    /// When it was last re-checked.
    #[serde(default)]
    pub checked_at: Option<String>,
    /// The verdict's one line at the last re-check.
    #[serde(default)]
    pub summary: Option<String>,
    /// Blocking findings of today's re-check that the recorded verdict did
    /// not have (alerted when they first appeared), by `vuln:{key}`: what
    /// `gantry audit` lists as open vulnerabilities.
    #[serde(default)]
    pub open: BTreeMap<String, OpenFinding>,
}

fn finding_key(f: &gantry_scan::Finding) -> String {
    format!("{}|{}|{}", f.id, f.package, f.installed_version)
}

/// Keys of the findings at or above the threshold in a recorded verdict
/// (blocking and allowed).
fn recorded_keys(verdict: &Value) -> BTreeSet<String> {
    let mut keys = BTreeSet::new();
    let key = |f: &Value| {
        Some(format!(
            "{}|{}|{}",
            f.get("id")?.as_str()?,
            f.get("package")?.as_str()?,
            f.get("installed_version")?.as_str()?
        ))
    };
    for f in verdict["blocking"].as_array().into_iter().flatten() {
        keys.extend(key(f));
    }
    for a in verdict["allowed"].as_array().into_iter().flatten() {
        keys.extend(key(&a["finding"]));
    }
    keys
}

/// Re-evaluates the scan gate for the deployed digest with today's data;
/// alerts blocking findings that neither the recorded verdict nor an earlier
/// re-check had. `None` when there is nothing to say.
async fn rescan(
    deps: &Deps,
    app: &AppConfig,
    run: &Run,
    digest: &gantry_pipeline::Digest,
) -> Result<Option<String>, AuditError> {
    let settings = deps.config.scan_settings(app);
    let fetched = match gantry_context::fetch_findings(deps, &settings, digest).await {
        Ok(f) => f,
        Err(e) => return Ok(Some(format!("re-scan not run: {e}"))),
    };
    let findings = match fetched {
        gantry_context::Fetched::Found(f, _) => f,
        gantry_context::Fetched::Pending(what) => {
            return Ok(Some(format!("re-scan: no findings from {what}")));
        }
        gantry_context::Fetched::Broken(why) => return Ok(Some(format!("re-scan: {why}"))),
    };
    let verdict = gantry_scan::evaluate(
        &findings,
        &settings,
        &deps.config.scan.allow,
        &app.name,
        OffsetDateTime::now_utc().date(),
    );
    // What the gate recorded for this digest: the scan record, else the run's step.
    let recorded = match deps.runs.raw().get(&format!("scans/{digest}.json")).await {
        Ok(Some(v)) => serde_json::from_slice::<Value>(&v.body)
            .map(|r| r["verdict"].clone())
            .unwrap_or_default(),
        Ok(None) => run
            .steps
            .get(gantry_pipeline::run::steps::SCAN)
            .map(|s| s.details.clone())
            .unwrap_or_default(),
        Err(e) => {
            return Err(AuditError::RecordState {
                name: format!("scans/{digest}.json"),
                source: e.into(),
            });
        }
    };
    let recorded = recorded_keys(&recorded);
    let name = rescan_name(&app.name);
    let record = |source: PipelineError| AuditError::RecordState {
        name: name.clone(),
        source,
    };
    let mut state: Rescan = match deps.runs.raw().get(&name).await {
        Ok(Some(v)) => serde_json::from_slice(&v.body).unwrap_or_default(),
        Ok(None) => Rescan::default(),
        Err(e) => return Err(record(e.into())),
    };
    if state.digest.as_deref() != Some(digest.as_str()) {
        state = Rescan {
            digest: Some(digest.to_string()),
            ..Rescan::default()
        };
    }
    let new: Vec<&gantry_scan::Finding> = verdict
        .blocking
        .iter()
        .filter(|f| {
            let k = finding_key(f);
            !recorded.contains(&k) && !state.alerted.contains(&k)
        })
        .collect();
    let mut line = None;
    if !new.is_empty() {
        let keys: BTreeSet<String> = new.iter().map(|f| finding_key(f)).collect();
        let ids: BTreeSet<&str> = new.iter().map(|f| f.id.as_str()).collect();
        let message_id = format!(
            "rescan:{}:{}:{}",
            app.name,
            &digest.as_str()[7..23],
            short_hash(&keys.iter().cloned().collect::<Vec<_>>().join(","))
        );
        let worst = new.iter().map(|f| f.severity).max();
        let mut alert = Alert::new(
            "new-vulnerability",
            Severity::High,
            format!(
                "{}: the deployed image has {} new {} at or above {} ({})",
                app.name,
                new.len(),
                if new.len() == 1 {
                    "finding"
                } else {
                    "findings"
                },
                settings.threshold.as_str(),
                ids.into_iter().collect::<Vec<_>>().join(", ")
            ),
        );
        alert.app = Some(app.name.clone());
        alert.run_id = Some(run.id.clone());
        alert.step = Some("audit".into());
        alert.digest = Some(digest.clone());
        alert.detail = serde_json::json!({
            "findings": new,
            "worst": worst,
            "threshold": settings.threshold,
        });
        send_alert(deps, &alert, message_id).await?;
        state.alerted.extend(keys);
        line = Some(format!("re-scan: {} new findings alerted", new.len()));
    }
    let previous = std::mem::take(&mut state.open);
    for f in verdict
        .blocking
        .iter()
        .filter(|f| !recorded.contains(&finding_key(f)))
    {
        let fingerprint = format!("vuln:{}", finding_key(f));
        let since = previous
            .get(&fingerprint)
            .map_or_else(now_rfc3339, |o| o.since.clone());
        state.open.insert(
            fingerprint,
            OpenFinding {
                kind: "new-vulnerability".into(),
                reason: format!(
                    "{} in {} {} ({})",
                    f.id,
                    f.package,
                    f.installed_version,
                    f.severity.as_str()
                ),
                since,
                severity: Some(Severity::High),
                app: None,
                detail: serde_json::to_value(f).unwrap_or_default(),
            },
        );
    }
    state.checked_at = Some(now_rfc3339());
    state.summary = Some(verdict.summary.clone());
    deps.runs.put_json(&name, &state).await.map_err(record)?;
    Ok(line)
}
