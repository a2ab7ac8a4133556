//! Bodies of the messages gantry sends itself, and their `MessageId`s.
//!
//! A `MessageId` is derived from what the message means (run, step, attempt),
//! so re-sending after a crash or redelivery is dropped by the broker's
//! duplicate detection instead of running a step twice.

use serde::{Deserialize, Serialize};

use crate::names::{AppName, Digest, RunId};

/// "Run step X of run R (for digest D), attempt N" — the body of `scan`,
/// `policy` and `deploy` messages. Steps re-read the run and act on the record;
/// the digest here is only a cross-check.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StepRequest {
    /// The app.
    pub app: AppName,
    /// The run.
    pub run_id: RunId,
    /// The digest the run had when the message was sent.
    pub digest: Digest,
    /// Attempt number of the step (1 for the first, +1 per retrigger).
    pub attempt: u32,
    /// Which part of a step this message asks for; absent for the step
    /// itself. `"verify"` ([`PHASE_VERIFY`]) on the `deploy` queue: check the
    /// rollout of the deploy attempt `attempt`. Omitted from the JSON when
    /// absent, so messages without it read and write as before.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<String>,
}

/// [`StepRequest::phase`] of the scheduled rollout checks.
pub const PHASE_VERIFY: &str = "verify";

impl StepRequest {
    /// `{run}:{step}:{attempt}`, e.g. `01j…:scan:1`.
    pub fn message_id(&self, step: &str) -> String {
        format!("{}:{}:{}", self.run_id, step, self.attempt)
    }

    /// `{run}:verify:{attempt}:{n}`: the `n`th rollout check of deploy
    /// attempt `attempt`.
    pub fn verify_message_id(&self, n: u32) -> String {
        format!("{}:verify:{}:{n}", self.run_id, self.attempt)
    }

    /// Whether this is a rollout check (`phase = "verify"`).
    pub fn is_verify(&self) -> bool {
        self.phase.as_deref() == Some(PHASE_VERIFY)
    }
}

/// Severity of an alert.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    /// Informational (deployed, ...).
    Info,
    /// Something an operator should look at.
    Warning,
    /// Something went wrong with a delivery.
    High,
    /// Security-relevant failure.
    Critical,
}

/// The body of an `alerts` message. Routes and channels come from `gantry.toml`
/// only; nothing in an alert names a destination.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Alert {
    /// What happened (`run-failed`, `image-deleted`, `message-rejected`, ...).
    pub kind: String,
    /// How bad.
    pub severity: Severity,
    /// The app, if known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub app: Option<AppName>,
    /// The run, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub run_id: Option<RunId>,
    /// The step, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub step: Option<String>,
    /// The digest, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub digest: Option<Digest>,
    /// One human line.
    pub reason: String,
    /// Extra structured facts.
    #[serde(default, skip_serializing_if = "serde_json::Value::is_null")]
    pub detail: serde_json::Value,
}

impl Alert {
    /// An alert with only kind, severity and reason set.
    pub fn new(kind: impl Into<String>, severity: Severity, reason: impl Into<String>) -> Alert {
        Alert {
            kind: kind.into(),
            severity,
            app: None,
            run_id: None,
            step: None,
            digest: None,
            reason: reason.into(),
            detail: serde_json::Value::Null,
        }
    }
}

/// `apps/{app}/deployed.json`: what runs now and what to roll back to.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Deployed {
    /// The version running now.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub current: Option<DeployedVersion>,
    /// The previous good version (the rollback target).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous: Option<DeployedVersion>,
}

/// One deployed version.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeployedVersion {
    /// Image digest.
    pub digest: Digest,
    /// The run that deployed it.
    pub run_id: RunId,
    /// SHA-256 of the rendered manifests.
    pub manifest_hash: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn step_request_without_phase_keeps_its_json() {
        let text = format!(
            r#"{{"app":"web","run_id":"{}","digest":"sha256:{}","attempt":1}}"#,
            crate::ids::new_run_id(1_700_000_000_000),
            "ab".repeat(32)
        );
        let request: StepRequest = serde_json::from_str(&text).expect("reads");
        assert_eq!(request.phase, None);
        assert!(!request.is_verify());
        assert_eq!(serde_json::to_string(&request).expect("writes"), text);

        let verify = StepRequest {
            phase: Some(PHASE_VERIFY.into()),
            ..request
        };
        assert!(verify.is_verify());
        let value = serde_json::to_value(&verify).expect("writes");
        assert_eq!(value["phase"], "verify");
        assert_eq!(
            verify.verify_message_id(3),
            format!("{}:verify:1:3", verify.run_id)
        );
    }
}
