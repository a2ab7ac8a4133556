//! Vulnerability findings and the scan gate (DESIGN.md §1, "scan-check").
//!
//! Findings come from one of two sources ([`ScanSource`]):
//!
//! - [`trivy`]: a Trivy JSON report (schema version 2) uploaded by CI, checked
//!   against the digest the run is about;
//! - [`defender`]: Microsoft Defender for Containers, read from Azure Resource
//!   Graph, where "no rows yet" means *pending*, never *clean*.
//!
//! Both become the same [`Findings`], which [`evaluate`] turns into a
//! [`Verdict`] under an app's [`ScanSettings`] and the allow-list. While a
//! source has nothing to say yet, [`next_check`] spaces out the re-checks and
//! says when to give up and fail closed.
//!
//! [`ScanSettings`]: gantry_pipeline::config::ScanSettings

use std::collections::HashSet;

use gantry_pipeline::config::{ScanSource, SeverityLevel};
use serde::{Deserialize, Serialize};

pub mod defender;
mod gate;
mod schedule;
pub mod trivy;

pub use gate::{AllowedFinding, Verdict, evaluate};
pub use schedule::{FIRST_DELAY, MAX_DELAY, next_check};

/// One vulnerability in one package of an image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Finding {
    /// CVE or advisory id (`CVE-2024-3094`, `GHSA-...`): what the allow-list matches.
    pub id: String,
    /// Affected package.
    pub package: String,
    /// Version found in the image.
    pub installed_version: String,
    /// Version (or fix reference) that resolves it; `None` when no fix is known.
    pub fixed_version: Option<String>,
    /// Severity as the source rated it.
    pub severity: SeverityLevel,
    /// Short human-readable title, when the source gives one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub title: Option<String>,
}

/// Everything one source reported about one image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Findings {
    /// Where the findings came from.
    pub source: ScanSource,
    /// The findings, each (id, package, installed version) once.
    pub findings: Vec<Finding>,
    /// When the source scanned the image (RFC 3339), if it says.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scanned_at: Option<String>,
}

/// Why findings could not be obtained. Every variant is named after the
/// operation that failed; none ever carries a token.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ScanError {
    /// A Trivy report is not valid JSON or not a schema-2 report.
    #[error("parsing Trivy report {source_name}: {message}")]
    ParseTrivyReport {
        /// Where the report came from (blob name or file path).
        source_name: String,
        /// What is wrong, with line and column where JSON parsing failed.
        message: String,
    },
    /// A Trivy report names other image digests than the one being gated: a
    /// report for another image must never pass a gate.
    #[error("verifying Trivy report {source_name}: it is for {found:?}, not {expected}")]
    VerifyTrivyDigest {
        /// Where the report came from.
        source_name: String,
        /// The digest being gated.
        expected: String,
        /// The digests the report names.
        found: Vec<String>,
    },
    /// The Resource Graph endpoint setting is not usable.
    #[error("configuring Resource Graph endpoint {endpoint:?}: {message}")]
    ConfigureResourceGraph {
        /// The rejected endpoint.
        endpoint: String,
        /// Why.
        message: String,
    },
    /// No Entra ID token could be obtained for Azure Resource Manager.
    #[error("authenticating to Resource Graph: {message}")]
    AuthenticateResourceGraph {
        /// What the credential reported.
        message: String,
    },
    /// A Resource Graph query failed or its answer cannot be used.
    #[error("querying Resource Graph{}: {message}", status.map(|s| format!(" (HTTP {s})")).unwrap_or_default())]
    QueryResourceGraph {
        /// HTTP status, when a response arrived.
        status: Option<u16>,
        /// What went wrong (error code and message from Azure when given).
        message: String,
        /// Whether trying again later may succeed.
        transient: bool,
    },
}

impl ScanError {
    /// Whether the same operation may succeed later (throttling, outages,
    /// network, identity endpoint), so the message should be retried rather
    /// than recorded as a permanent failure.
    pub fn is_transient(&self) -> bool {
        match self {
            ScanError::QueryResourceGraph { transient, .. } => *transient,
            // Managed identity endpoints fail briefly (start-up, IMDS hiccups);
            // a missing identity shows up as a repeated failure and dead-letters.
            ScanError::AuthenticateResourceGraph { .. } => true,
            ScanError::ParseTrivyReport { .. }
            | ScanError::VerifyTrivyDigest { .. }
            | ScanError::ConfigureResourceGraph { .. } => false,
        }
    }
}

/// Keeps the first of each (id, package, installed version): scanners report
/// the same vulnerability once per target or layer, and counting it twice would
/// inflate the verdict.
pub(crate) fn dedupe(findings: Vec<Finding>) -> Vec<Finding> {
    let mut seen = HashSet::new();
    findings
        .into_iter()
        .filter(|f| seen.insert((f.id.clone(), f.package.clone(), f.installed_version.clone())))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn finding(id: &str, package: &str, version: &str) -> Finding {
        Finding {
            id: id.into(),
            package: package.into(),
            installed_version: version.into(),
            fixed_version: None,
            severity: SeverityLevel::High,
            title: None,
        }
    }

    #[test]
    fn dedupe_keeps_distinct_packages_and_versions() {
        let out = dedupe(vec![
            finding("CVE-1", "a", "1"),
            finding("CVE-1", "a", "1"),
            finding("CVE-1", "b", "1"),
            finding("CVE-1", "a", "2"),
        ]);
        assert_eq!(out.len(), 3);
    }

    #[test]
    fn transient_classification() {
        let q = |transient| ScanError::QueryResourceGraph {
            status: Some(500),
            message: "x".into(),
            transient,
        };
        assert!(q(true).is_transient());
        assert!(!q(false).is_transient());
        assert!(
            ScanError::AuthenticateResourceGraph {
                message: "x".into()
            }
            .is_transient()
        );
        assert!(
            !ScanError::ParseTrivyReport {
                source_name: "r".into(),
                message: "m".into()
            }
            .is_transient()
        );
        assert_eq!(q(true).to_string(), "querying Resource Graph (HTTP 500): x");
    }
}
