//! The open findings of `cluster-audit`, as it keeps them and as operators
//! list them (`GET /api/audit`, `gantry audit`).
//!
//! Layout (one blob per scope, written by the audit only):
//!
//! - `audit/state/{app}.json` ([`AuditState`]): the app's policy, drift and
//!   config-changed findings;
//! - `audit/state/_cluster.json` ([`AuditState`]): the governance findings of
//!   the cluster ([`CLUSTER_SCOPE`]; `_` is not allowed in an app name, so it
//!   never collides with one);
//! - `apps/{app}/rescan.json` (its `open` map): blocking vulnerabilities of
//!   the deployed digest found after the scan gate passed it.
//!
//! [`list_open`] reads them all and flattens them into [`ListedFinding`]s.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::error::PipelineError;
use crate::messages::Severity;
use crate::names::AppName;
use crate::runs::RunStore;

/// Prefix of the per-scope state blobs.
pub const STATE_PREFIX: &str = "audit/state/";

/// The scope of cluster-wide findings (governance): `audit/state/_cluster.json`.
pub const CLUSTER_SCOPE: &str = "_cluster";

/// `audit/state/{app}.json`.
pub fn app_state_blob(app: &AppName) -> String {
    format!("{STATE_PREFIX}{app}.json")
}

/// `audit/state/_cluster.json`.
pub fn cluster_state_blob() -> String {
    format!("{STATE_PREFIX}{CLUSTER_SCOPE}.json")
}

/// `apps/{app}/rescan.json`.
pub fn rescan_blob(app: &AppName) -> String {
    format!("apps/{app}/rescan.json")
}

/// One scope's state: open findings and how often each appeared.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct AuditState {
    /// Findings seen by the last successful check, by fingerprint.
    #[serde(default)]
    pub open: BTreeMap<String, OpenFinding>,
    /// How often each fingerprint has appeared (the `n` of its MessageId).
    #[serde(default)]
    pub appearances: BTreeMap<String, u32>,
    /// When the scope was last checked (RFC 3339).
    #[serde(default)]
    pub checked_at: Option<String>,
    /// The deployed run checked (app scopes).
    #[serde(default)]
    pub run_id: Option<String>,
    /// Why the last check could not be completed, if it could not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// One open finding.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct OpenFinding {
    /// `drift`, `config-changed`, `policy-violation`, `new-vulnerability`, or
    /// one of the governance kinds ([`GOVERNANCE_KINDS`]).
    pub kind: String,
    /// One line.
    pub reason: String,
    /// When it (last) appeared.
    pub since: String,
    /// Its severity (absent in state written before it was recorded).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub severity: Option<Severity>,
    /// The app it concerns, when it can be attributed to one (cluster
    /// findings in an app's namespace).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub app: Option<AppName>,
    /// Structured details (object, label, usage numbers, ...).
    #[serde(default, skip_serializing_if = "Value::is_null")]
    pub detail: Value,
}

/// Governance finding kinds.
pub const GOVERNANCE_KINDS: [&str; 6] = [
    "missing-label",
    "daemonset-missing",
    "daemonset-not-ready",
    "quota-missing",
    "limitrange-missing",
    "quota-usage",
];

/// Categories a `kind` filter may name instead of one kind.
pub const CATEGORIES: [&str; 4] = ["policy", "drift", "vulnerability", "governance"];

/// The category of a finding kind (`policy`, `drift`, `vulnerability`,
/// `governance`; anything unknown is its own category).
pub fn category(kind: &str) -> &str {
    match kind {
        "policy-violation" => "policy",
        "drift" | "config-changed" => "drift",
        "new-vulnerability" => "vulnerability",
        k if GOVERNANCE_KINDS.contains(&k) => "governance",
        k => k,
    }
}

/// Every kind a filter may name.
pub fn known_kinds() -> Vec<&'static str> {
    let mut kinds = vec![
        "policy-violation",
        "drift",
        "config-changed",
        "new-vulnerability",
    ];
    kinds.extend(GOVERNANCE_KINDS);
    kinds
}

/// Which findings to list.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FindingFilter {
    /// Only findings of this app (its own scope, and cluster findings
    /// attributed to it).
    pub app: Option<AppName>,
    /// Only this kind or category.
    pub kind: Option<String>,
}

impl FindingFilter {
    /// Checks `kind` against [`CATEGORIES`] and [`known_kinds`]; the error
    /// lists what is accepted.
    pub fn new(app: Option<AppName>, kind: Option<&str>) -> Result<FindingFilter, String> {
        if let Some(k) = kind
            && !CATEGORIES.contains(&k)
            && !known_kinds().contains(&k)
        {
            return Err(format!(
                "unknown finding kind {k:?}; one of: {}, {}",
                CATEGORIES.join(", "),
                known_kinds().join(", ")
            ));
        }
        Ok(FindingFilter {
            app,
            kind: kind.map(String::from),
        })
    }

    fn matches(&self, f: &ListedFinding) -> bool {
        let app_ok = self.app.as_ref().is_none_or(|a| f.app.as_ref() == Some(a));
        let kind_ok = self
            .kind
            .as_deref()
            .is_none_or(|k| k == f.kind || k == f.category);
        app_ok && kind_ok
    }
}

/// An open finding as listed.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ListedFinding {
    /// Where it is kept: an app name or [`CLUSTER_SCOPE`].
    pub scope: String,
    /// The app it concerns, if any.
    #[serde(default)]
    pub app: Option<AppName>,
    /// `policy`, `drift`, `vulnerability` or `governance`.
    pub category: String,
    /// The finding kind.
    pub kind: String,
    /// Its severity, when recorded.
    #[serde(default)]
    pub severity: Option<Severity>,
    /// Its fingerprint (stable across sweeps).
    pub fingerprint: String,
    /// One line.
    pub reason: String,
    /// When it appeared (RFC 3339).
    pub since: String,
    /// Structured details.
    #[serde(default, skip_serializing_if = "Value::is_null")]
    pub detail: Value,
}

/// The state of one scope's last check.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ScopeStatus {
    /// An app name or [`CLUSTER_SCOPE`].
    pub scope: String,
    /// When it was last checked.
    #[serde(default)]
    pub checked_at: Option<String>,
    /// Why the last check was incomplete (its findings are the previous ones).
    #[serde(default)]
    pub error: Option<String>,
}

/// What [`list_open`] found.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct FindingList {
    /// The open findings matching the filter: by scope, then severity
    /// (highest first), then fingerprint.
    pub findings: Vec<ListedFinding>,
    /// Every scope's last check (whatever the filter).
    pub scopes: Vec<ScopeStatus>,
}

/// `apps/{app}/rescan.json` as far as the listing needs it.
#[derive(Debug, Default, Deserialize)]
struct RescanOpen {
    #[serde(default)]
    open: BTreeMap<String, OpenFinding>,
}

/// Reads every scope's state and the re-scan records and lists the open
/// findings matching `filter`. A blob that does not parse is reported as
/// that scope's error rather than failing the whole listing.
pub async fn list_open(
    runs: &RunStore,
    filter: &FindingFilter,
) -> Result<FindingList, PipelineError> {
    let mut out = FindingList::default();
    for name in runs.list_all(STATE_PREFIX).await? {
        let Some(scope) = name
            .strip_prefix(STATE_PREFIX)
            .and_then(|n| n.strip_suffix(".json"))
            .filter(|s| !s.contains('/'))
            .map(String::from)
        else {
            continue;
        };
        let own_app = AppName::parse(&scope).ok();
        if own_app.is_none() && scope != CLUSTER_SCOPE {
            continue;
        }
        let Some(blob) = runs.raw().get(&name).await? else {
            continue;
        };
        let state: AuditState = match serde_json::from_slice(&blob.body) {
            Ok(s) => s,
            Err(e) => {
                out.scopes.push(ScopeStatus {
                    scope,
                    checked_at: None,
                    error: Some(format!("{name} is unreadable: {e}")),
                });
                continue;
            }
        };
        out.scopes.push(ScopeStatus {
            scope: scope.clone(),
            checked_at: state.checked_at.clone(),
            error: state.error.clone(),
        });
        push(
            &mut out.findings,
            &scope,
            own_app.as_ref(),
            state.open,
            filter,
        );
    }
    for name in runs.list_all("apps/").await? {
        let Some(app) = name
            .strip_prefix("apps/")
            .and_then(|n| n.strip_suffix("/rescan.json"))
            .and_then(|a| AppName::parse(a).ok())
        else {
            continue;
        };
        let Some(blob) = runs.raw().get(&name).await? else {
            continue;
        };
        // An unreadable re-scan record lists nothing; the next sweep rewrites it.
        let rescan: RescanOpen = serde_json::from_slice(&blob.body).unwrap_or_default();
        push(
            &mut out.findings,
            app.as_str(),
            Some(&app),
            rescan.open,
            filter,
        );
    }
    out.findings.sort_by(|a, b| {
        (&a.scope, std::cmp::Reverse(a.severity), &a.fingerprint).cmp(&(
            &b.scope,
            std::cmp::Reverse(b.severity),
            &b.fingerprint,
        ))
    });
    Ok(out)
}

fn push(
    out: &mut Vec<ListedFinding>,
    scope: &str,
    own_app: Option<&AppName>,
    open: BTreeMap<String, OpenFinding>,
    filter: &FindingFilter,
) {
    for (fingerprint, f) in open {
        let listed = ListedFinding {
            scope: scope.to_string(),
            app: f.app.or_else(|| own_app.cloned()),
            category: category(&f.kind).to_string(),
            kind: f.kind,
            severity: f.severity,
            fingerprint,
            reason: f.reason,
            since: f.since,
            detail: f.detail,
        };
        if filter.matches(&listed) {
            out.push(listed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cluster_scope_is_never_an_app() {
        assert!(AppName::parse(CLUSTER_SCOPE).is_err());
    }

    #[test]
    fn filters() {
        assert!(FindingFilter::new(None, Some("governance")).is_ok());
        assert!(FindingFilter::new(None, Some("quota-usage")).is_ok());
        let err = FindingFilter::new(None, Some("bogus")).unwrap_err();
        assert!(err.contains("unknown finding kind \"bogus\""), "{err}");
        assert_eq!(category("missing-label"), "governance");
        assert_eq!(category("config-changed"), "drift");
    }
}
