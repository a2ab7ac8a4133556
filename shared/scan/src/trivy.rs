//! Trivy JSON reports (`trivy image --format json`, `SchemaVersion` 2).
//!
//! Only the fields the gate needs are read; Trivy adds fields between releases
//! and those are ignored. The fields used:
//!
//! - `SchemaVersion` (must be 2: version 1 was a bare array of results);
//! - `CreatedAt` (when the scan ran);
//! - `ArtifactName` and `Metadata.RepoDigests` (`registry/repo@sha256:...`),
//!   to check the report is about the digest being gated;
//! - `Results[].Vulnerabilities[]` with `VulnerabilityID`, `PkgName`,
//!   `InstalledVersion`, `FixedVersion` (absent or empty when there is no fix),
//!   `Severity` (`CRITICAL`, `HIGH`, ... ) and `Title`. A result without
//!   vulnerabilities has `"Vulnerabilities": null` or no such key.
//!
//! `Metadata.ImageID` is the digest of the image *configuration*, not of the
//! manifest a registry addresses, so it is never compared with a pushed digest.

use gantry_pipeline::Digest;
use gantry_pipeline::config::{ScanSource, SeverityLevel};
use serde::Deserialize;

use crate::{Finding, Findings, ScanError, dedupe};

/// The schema version this parser understands.
pub const SCHEMA_VERSION: u32 = 2;

#[derive(Deserialize)]
struct Report {
    #[serde(rename = "SchemaVersion")]
    schema_version: Option<u32>,
    #[serde(rename = "CreatedAt")]
    created_at: Option<String>,
    #[serde(rename = "ArtifactName")]
    artifact_name: Option<String>,
    #[serde(rename = "Metadata")]
    metadata: Option<Metadata>,
    #[serde(rename = "Results")]
    results: Option<Vec<TargetResult>>,
}

#[derive(Deserialize)]
struct Metadata {
    #[serde(rename = "RepoDigests")]
    repo_digests: Option<Vec<String>>,
}

#[derive(Deserialize)]
struct TargetResult {
    #[serde(rename = "Vulnerabilities")]
    vulnerabilities: Option<Vec<Vulnerability>>,
}

#[derive(Deserialize)]
struct Vulnerability {
    #[serde(rename = "VulnerabilityID")]
    vulnerability_id: String,
    #[serde(rename = "PkgName")]
    pkg_name: String,
    #[serde(rename = "InstalledVersion", default)]
    installed_version: Option<String>,
    #[serde(rename = "FixedVersion", default)]
    fixed_version: Option<String>,
    #[serde(rename = "Severity", default)]
    severity: Option<String>,
    #[serde(rename = "Title", default)]
    title: Option<String>,
}

/// Parses a Trivy JSON report.
///
/// `source_name` names the report in errors (blob name or path). When
/// `expected_digest` is given and the report names image digests (in
/// `Metadata.RepoDigests` or an `ArtifactName` of the form `repo@sha256:...`)
/// that do not include it, the report is rejected: it describes another image.
/// A report that names no digest at all (an image scanned from a tarball before
/// it was pushed) cannot be checked; it is accepted with a warning, because the
/// store already files it under the digest CI uploaded it for.
///
/// Findings that appear in several results (same id, package and installed
/// version) are kept once.
pub fn parse_report(
    bytes: &[u8],
    expected_digest: Option<&Digest>,
    source_name: &str,
) -> Result<Findings, ScanError> {
    let invalid = |message: String| ScanError::ParseTrivyReport {
        source_name: source_name.to_string(),
        message,
    };
    let report: Report = serde_json::from_slice(bytes).map_err(|e| invalid(describe(&e)))?;
    match report.schema_version {
        Some(SCHEMA_VERSION) => {}
        Some(other) => {
            return Err(invalid(format!(
                "SchemaVersion is {other}; only {SCHEMA_VERSION} is supported"
            )));
        }
        None => {
            return Err(invalid(format!(
                "no SchemaVersion: not a Trivy JSON report (expected SchemaVersion {SCHEMA_VERSION})"
            )));
        }
    }

    if let Some(expected) = expected_digest {
        let found = named_digests(&report);
        if found.is_empty() {
            tracing::warn!(
                report = source_name,
                digest = %expected,
                "Trivy report names no repository digest; it cannot be checked against the image"
            );
        } else if !found.iter().any(|d| d == expected.as_str()) {
            return Err(ScanError::VerifyTrivyDigest {
                source_name: source_name.to_string(),
                expected: expected.to_string(),
                found,
            });
        }
    }

    let findings = report
        .results
        .unwrap_or_default()
        .into_iter()
        .flat_map(|r| r.vulnerabilities.unwrap_or_default())
        .map(|v| Finding {
            id: v.vulnerability_id.trim().to_string(),
            package: v.pkg_name,
            installed_version: v.installed_version.unwrap_or_default(),
            fixed_version: v
                .fixed_version
                .map(|f| f.trim().to_string())
                .filter(|f| !f.is_empty()),
            severity: v
                .severity
                .as_deref()
                .map(SeverityLevel::parse_lenient)
                .unwrap_or(SeverityLevel::Unknown),
            title: v.title.filter(|t| !t.trim().is_empty()),
        })
        .collect();

    Ok(Findings {
        source: ScanSource::Trivy,
        findings: dedupe(findings),
        scanned_at: report.created_at,
    })
}

/// The `sha256:...` digests a report says it is about, deduplicated.
fn named_digests(report: &Report) -> Vec<String> {
    let mut out: Vec<String> = report
        .metadata
        .as_ref()
        .and_then(|m| m.repo_digests.as_ref())
        .into_iter()
        .flatten()
        .chain(report.artifact_name.as_ref())
        .filter_map(|reference| reference.rsplit_once('@').map(|(_, d)| d.to_string()))
        .collect();
    out.sort();
    out.dedup();
    out
}

/// serde_json's message with the position spelled out first, so an operator
/// reading a run finds the broken spot at once.
fn describe(e: &serde_json::Error) -> String {
    let text = e.to_string();
    // serde_json appends " at line L column C"; it is restated up front.
    let what = text.split(" at line ").next().unwrap_or(&text);
    let hint = if e.is_data() && what.contains("expected struct Report") {
        " (Trivy reports are a JSON object; SchemaVersion 1 arrays are not supported)"
    } else {
        ""
    };
    format!("line {}, column {}: {what}{hint}", e.line(), e.column())
}
