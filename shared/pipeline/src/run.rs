//! The run record: one change travelling through the pipeline (DESIGN.md §4–5).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use crate::names::{AppName, CommitSha, Digest, RunId};

/// Overall status of a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RunStatus {
    /// Created from a push; waiting for the registry to report the built image.
    AwaitingImage,
    /// The image is known; the scan gate is running.
    Scanning,
    /// The policy gate is running.
    CheckingPolicy,
    /// Gates passed; an operator must approve.
    AwaitingApproval,
    /// Manifests are being applied.
    Deploying,
    /// Applied; waiting for the rollout to finish.
    Verifying,
    /// Running in the cluster.
    Deployed,
    /// A gate or an operator refused it.
    Blocked,
    /// Something failed (CI, a step, a rollout without a rollback target).
    Failed,
    /// The rollout failed and the previous good version was restored.
    RolledBack,
    /// A newer run of the same app replaced it before it deployed.
    Superseded,
}

impl RunStatus {
    /// Every status, in pipeline order.
    pub const ALL: [RunStatus; 11] = [
        RunStatus::AwaitingImage,
        RunStatus::Scanning,
        RunStatus::CheckingPolicy,
        RunStatus::AwaitingApproval,
        RunStatus::Deploying,
        RunStatus::Verifying,
        RunStatus::Deployed,
        RunStatus::Blocked,
        RunStatus::Failed,
        RunStatus::RolledBack,
        RunStatus::Superseded,
    ];

    /// The status as written in JSON (`awaiting-image`, ...).
    pub fn as_str(self) -> &'static str {
        match self {
            RunStatus::AwaitingImage => "awaiting-image",
            RunStatus::Scanning => "scanning",
            RunStatus::CheckingPolicy => "checking-policy",
            RunStatus::AwaitingApproval => "awaiting-approval",
            RunStatus::Deploying => "deploying",
            RunStatus::Verifying => "verifying",
            RunStatus::Deployed => "deployed",
            RunStatus::Blocked => "blocked",
            RunStatus::Failed => "failed",
            RunStatus::RolledBack => "rolled-back",
            RunStatus::Superseded => "superseded",
        }
    }

    /// Parses the JSON spelling.
    pub fn parse(s: &str) -> Option<RunStatus> {
        RunStatus::ALL.into_iter().find(|v| v.as_str() == s)
    }

    /// Whether the run can no longer move on by itself.
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            RunStatus::Deployed
                | RunStatus::Blocked
                | RunStatus::Failed
                | RunStatus::RolledBack
                | RunStatus::Superseded
        )
    }
}

impl std::fmt::Display for RunStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.pad(self.as_str())
    }
}

/// Status of one step.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum StepStatus {
    /// Queued, not started.
    Pending,
    /// In progress.
    Running,
    /// Succeeded; a redelivered message for it is acknowledged without effect.
    Passed,
    /// Errored.
    Failed,
    /// Refused by a gate.
    Blocked,
    /// Not needed for this run.
    Skipped,
}

/// What started a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SourceKind {
    /// A GitHub push webhook.
    Github,
    /// An image pushed to the registry without a matching push.
    Registry,
    /// An operator's or a security alert's rollback to an earlier good
    /// version ([`Run::rollback`] says which and who asked).
    Rollback,
}

/// Where the change came from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Source {
    /// GitHub push or registry push.
    pub kind: SourceKind,
    /// GitHub `owner/repo`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub repo: Option<String>,
    /// The pushed commit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub commit: Option<CommitSha>,
    /// The pushed ref (`refs/heads/main`).
    #[serde(rename = "ref", default, skip_serializing_if = "Option::is_none")]
    pub git_ref: Option<String>,
    /// Who pushed (GitHub login or name).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pusher: Option<String>,
    /// The GitHub delivery id or registry event id that created the run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delivery: Option<String>,
    /// First line of the head commit message, truncated.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

/// The image a run delivers. Deployed by digest only; the tag is informational.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Image {
    /// Registry host (`contoso.azurecr.io`).
    pub registry: String,
    /// Repository in the registry (`web`).
    pub repository: String,
    /// The tag it was pushed with, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tag: Option<String>,
    /// The manifest digest.
    pub digest: Digest,
}

impl Image {
    /// `registry/repository@digest`: the only form gantry deploys.
    pub fn reference(&self) -> String {
        format!("{}/{}@{}", self.registry, self.repository, self.digest)
    }
}

/// One step of a run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Step {
    /// Current status.
    pub status: StepStatus,
    /// How many times it has been started (retriggers and retries count).
    pub attempts: u32,
    /// When the current attempt started.
    #[serde(
        default,
        with = "time::serde::rfc3339::option",
        skip_serializing_if = "Option::is_none"
    )]
    pub started_at: Option<OffsetDateTime>,
    /// When it reached a final status.
    #[serde(
        default,
        with = "time::serde::rfc3339::option",
        skip_serializing_if = "Option::is_none"
    )]
    pub finished_at: Option<OffsetDateTime>,
    /// One line a human reads in `gantry runs show`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub summary: Option<String>,
    /// Step-specific verdict details (findings, violations, ...).
    #[serde(default, skip_serializing_if = "serde_json::Value::is_null")]
    pub details: serde_json::Value,
}

impl Step {
    /// A step queued for its first attempt.
    pub fn pending(attempts: u32) -> Step {
        Step {
            status: StepStatus::Pending,
            attempts,
            started_at: None,
            finished_at: None,
            summary: None,
            details: serde_json::Value::Null,
        }
    }

    /// Records that the step reached `status` at `at`, with its one-line summary.
    /// (Details, if any, are set by the caller: not every outcome replaces them.)
    pub fn finish(&mut self, status: StepStatus, at: OffsetDateTime, summary: impl Into<String>) {
        self.status = status;
        self.finished_at = Some(at);
        self.summary = Some(summary.into());
    }

    /// A step that finished at `at` with `status`.
    pub fn finished(status: StepStatus, at: OffsetDateTime, summary: impl Into<String>) -> Step {
        Step {
            status,
            attempts: 1,
            started_at: Some(at),
            finished_at: Some(at),
            summary: Some(summary.into()),
            details: serde_json::Value::Null,
        }
    }
}

/// Step names used in `Run::steps`.
pub mod steps {
    /// The CI workflow that built the image (recorded from `workflow_run`).
    pub const CI: &str = "ci";
    /// Vulnerability scan gate.
    pub const SCAN: &str = "scan";
    /// Policy gate.
    pub const POLICY: &str = "policy";
    /// Operator approval.
    pub const APPROVAL: &str = "approval";
    /// Apply to the cluster.
    pub const DEPLOY: &str = "deploy";
    /// Rollout verification.
    pub const VERIFY: &str = "verify";
}

/// A run: the record every step reads before acting.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Run {
    /// Time-sortable id.
    pub id: RunId,
    /// The app it delivers.
    pub app: AppName,
    /// Overall status.
    pub status: RunStatus,
    /// Where it came from.
    pub source: Source,
    /// The image, once the registry reported it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<Image>,
    /// Steps by name (see [`steps`]).
    #[serde(default)]
    pub steps: BTreeMap<String, Step>,
    /// Creation time.
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
    /// Last change.
    #[serde(with = "time::serde::rfc3339")]
    pub updated_at: OffsetDateTime,
    /// Set on a rollback run: the earlier run whose image and gate verdicts it
    /// deploys again, and who asked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollback: Option<RollbackOf>,
    /// Notifications about this run, one per alert fingerprint and channel
    /// (the `alert` function): sent, retrying, failed, skipped or
    /// deduplicated. Never holds a URL, token or secret.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub notifications: Vec<Notification>,
    /// Operator retriggers, oldest first: who asked, why, and the steps the
    /// retrigger replaced (their last attempt, verdict details included).
    /// Absent from the JSON until the first retrigger.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub retriggers: Vec<Retrigger>,
    /// Defender for Cloud security alerts about this run's digest, each once
    /// (by key), oldest first. Omitted from the JSON when empty.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub security_alerts: Vec<SecurityAlertRef>,
    /// The W3C trace context of the run (the span that created it): every
    /// step of the run continues this trace, also when it is triggered by an
    /// event that knows nothing of the run (an Event Grid image push).
    /// Absent on runs recorded before tracing existed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trace: Option<TraceContext>,
}

/// A Defender for Cloud alert recorded on a run (the full record is at
/// `apps/{app}/security/{key}.json`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SecurityAlertRef {
    /// The record's key: the alert id itself when it is `[a-z0-9-]`, else a hash.
    pub key: String,
    /// Defender's alert id (`SystemAlertId`) or sub-assessment id.
    pub alert_id: String,
    /// Alert display name or vulnerability title.
    pub name: String,
    /// `informational`, `low`, `medium`, `high`.
    pub severity: crate::config::SecuritySeverity,
    /// Whether the alert blocked the run's digest.
    pub blocked: bool,
    /// When gantry recorded it.
    #[serde(with = "time::serde::rfc3339")]
    pub recorded_at: OffsetDateTime,
}

/// A W3C trace context (`traceparent` and `tracestate`) as kept on a run.
/// Stored as the header values, so any tracer can continue it; validated when
/// used (a malformed value starts a new trace, it never fails a step).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TraceContext {
    /// `00-{trace-id}-{parent-id}-{flags}`.
    pub traceparent: String,
    /// Vendor-specific trace state, when the tracer keeps any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tracestate: Option<String>,
}

/// What a rollback run re-deploys and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RollbackOf {
    /// The run whose digest passed both gates; its manifests are rendered
    /// again exactly as that run rendered them (same provenance), so their
    /// hash matches what its policy gate checked.
    pub run_id: RunId,
    /// Who asked: an API token name, an App Service principal, or
    /// `defender:<alert>` for an automatic rollback.
    pub requested_by: String,
    /// Why, as given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// What became of one notification on one channel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum NotificationOutcome {
    /// The channel accepted it.
    Sent,
    /// Failed transiently; a scheduled retry is queued.
    Retrying,
    /// Given up (permanent refusal or attempts exhausted); see `reason`.
    Failed,
    /// Not applicable to this channel (e.g. GitHub without a commit).
    Skipped,
    /// Counted against an earlier notification with the same fingerprint
    /// inside the de-duplication window; nothing was sent.
    Deduplicated,
}

/// One entry of [`Run::notifications`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Notification {
    /// The alert kind (`scan-blocked`, `deployed`, ...).
    pub kind: String,
    /// The configured channel name; absent for [`NotificationOutcome::Deduplicated`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub channel: Option<String>,
    /// Outcome.
    pub outcome: NotificationOutcome,
    /// When the outcome was recorded.
    #[serde(with = "time::serde::rfc3339")]
    pub at: OffsetDateTime,
    /// Deliveries tried on this channel.
    #[serde(default)]
    pub attempts: u32,
    /// Alerts with this fingerprint in the current window, this one included.
    pub count: u32,
    /// The alert fingerprint (`alerts/{fingerprint}.json`).
    pub fingerprint: String,
    /// Why it failed or was skipped (never a URL or secret).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// One operator retrigger of a run (`POST /api/runs/{id}/retrigger`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Retrigger {
    /// When it was asked.
    #[serde(with = "time::serde::rfc3339")]
    pub at: OffsetDateTime,
    /// The operator principal who asked.
    pub by: String,
    /// The step the run restarted from (`scan`, `policy`, `deploy`).
    pub from: String,
    /// Why, as given by the operator.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// The run status before the retrigger.
    pub previous_status: RunStatus,
    /// The steps from `from` onwards as they were before the retrigger.
    #[serde(default)]
    pub previous: BTreeMap<String, Step>,
}

impl Run {
    /// A new run in `status` created at `now`.
    pub fn new(
        id: RunId,
        app: AppName,
        status: RunStatus,
        source: Source,
        now: OffsetDateTime,
    ) -> Run {
        Run {
            id,
            app,
            status,
            source,
            image: None,
            steps: BTreeMap::new(),
            created_at: now,
            updated_at: now,
            rollback: None,
            notifications: Vec::new(),
            retriggers: Vec::new(),
            security_alerts: Vec::new(),
            trace: None,
        }
    }

    /// The attempt number a new `step` entry must get: one more than any
    /// attempt of it recorded on the run, now or before a retrigger. Step
    /// messages carry `MessageId` `{run}:{step}:{attempt}`, so reusing an
    /// attempt number after a retrigger would be dropped by duplicate
    /// detection.
    pub fn next_attempt(&self, step: &str) -> u32 {
        let current = self.steps.get(step).map(|s| s.attempts);
        let earlier = self
            .retriggers
            .iter()
            .filter_map(|r| r.previous.get(step).map(|s| s.attempts));
        current.into_iter().chain(earlier).max().unwrap_or(0) + 1
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_spell_as_designed() {
        for s in RunStatus::ALL {
            let json = serde_json::to_string(&s).expect("serialises");
            assert_eq!(json, format!("\"{}\"", s.as_str()));
            assert_eq!(RunStatus::parse(s.as_str()), Some(s));
        }
        assert_eq!(RunStatus::parse("deployedd"), None);
    }

    #[test]
    fn run_round_trips_with_design_field_names() {
        let now = OffsetDateTime::from_unix_timestamp(1_700_000_000).expect("valid");
        let mut run = Run::new(
            crate::ids::new_run_id(1_700_000_000_000),
            AppName::parse("web").expect("valid"),
            RunStatus::Scanning,
            Source {
                kind: SourceKind::Github,
                repo: Some("contoso/web".into()),
                commit: Some(CommitSha::parse(&"a".repeat(40)).expect("valid")),
                git_ref: Some("refs/heads/main".into()),
                pusher: Some("octocat".into()),
                delivery: Some("d1".into()),
                message: None,
            },
            now,
        );
        run.steps.insert(steps::SCAN.into(), Step::pending(1));
        let value = serde_json::to_value(&run).expect("serialises");
        for field in [
            "id",
            "app",
            "status",
            "source",
            "steps",
            "created_at",
            "updated_at",
        ] {
            assert!(value.get(field).is_some(), "missing {field}");
        }
        assert_eq!(value["source"]["ref"], "refs/heads/main");
        assert_eq!(value["created_at"], "2023-11-14T22:13:20Z");
        assert!(
            value.get("security_alerts").is_none(),
            "empty security alerts are omitted"
        );
        let back: Run = serde_json::from_value(value).expect("deserialises");
        assert_eq!(back, run);
    }
}
