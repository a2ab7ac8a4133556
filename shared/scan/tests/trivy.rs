//! Trivy reports from `tests/fixtures/` (schema version 2, as `trivy image
//! --format json` writes them).

// Helpers outside `#[test]` functions unwrap too: a panic is a test failure.
#![allow(clippy::unwrap_used)]

use gantry_pipeline::Digest;
use gantry_pipeline::config::{ScanSource, SeverityLevel};
use gantry_scan::ScanError;
use gantry_scan::trivy::parse_report;

const WEB: &str = "sha256:c4719afa76fa448b5eca99e6736885846501d17956f2fcb2de5c916d723f3a87";
const OTHER: &str = "sha256:0391d596b430ba26aabec5e42fe9e44a657fc9348971043507a8dc8bdf6a984a";

fn fixture(name: &str) -> Vec<u8> {
    let path = format!("{}/tests/fixtures/{name}", env!("CARGO_MANIFEST_DIR"));
    std::fs::read(&path).unwrap_or_else(|e| panic!("reading {path}: {e}"))
}

fn web() -> Digest {
    Digest::parse(WEB).unwrap()
}

fn count(findings: &gantry_scan::Findings, level: SeverityLevel) -> usize {
    findings
        .findings
        .iter()
        .filter(|f| f.severity == level)
        .count()
}

#[test]
fn clean_report_has_no_findings() {
    let f = parse_report(&fixture("clean.json"), Some(&web()), "clean.json").unwrap();
    assert_eq!(f.source, ScanSource::Trivy);
    assert!(f.findings.is_empty());
    assert_eq!(
        f.scanned_at.as_deref(),
        Some("2026-11-03T09:14:22.418533+00:00")
    );
}

#[test]
fn criticals_are_counted_and_duplicates_once() {
    let f = parse_report(&fixture("criticals.json"), Some(&web()), "criticals.json").unwrap();
    // 12 entries in the report; CVE-2024-24790 in stdlib v1.22.1 appears in two
    // Go binaries and is one finding.
    assert_eq!(f.findings.len(), 11);
    assert_eq!(count(&f, SeverityLevel::Critical), 3);
    assert_eq!(count(&f, SeverityLevel::High), 2);
    assert_eq!(count(&f, SeverityLevel::Medium), 4);
    assert_eq!(count(&f, SeverityLevel::Low), 2);
    assert_eq!(
        f.findings
            .iter()
            .filter(|x| x.id == "CVE-2024-24790")
            .count(),
        1
    );
    // The same CVE in two packages is two findings.
    assert_eq!(
        f.findings
            .iter()
            .filter(|x| x.id == "CVE-2024-6119")
            .count(),
        2
    );
    let expat = f
        .findings
        .iter()
        .find(|x| x.id == "CVE-2024-45491")
        .unwrap();
    assert_eq!(expat.package, "expat");
    assert_eq!(expat.installed_version, "2.6.2-r0");
    assert_eq!(expat.fixed_version.as_deref(), Some("2.6.3-r0"));
    assert_eq!(
        expat.title.as_deref(),
        Some("libexpat: Integer Overflow or Wraparound")
    );
    // `"FixedVersion": ""` is no fix.
    let busybox = f
        .findings
        .iter()
        .find(|x| x.id == "CVE-2023-42366")
        .unwrap();
    assert_eq!(busybox.fixed_version, None);
}

#[test]
fn unfixed_findings_have_no_fixed_version() {
    let f = parse_report(&fixture("unfixed-only.json"), Some(&web()), "u.json").unwrap();
    assert_eq!(f.findings.len(), 3);
    assert!(f.findings.iter().all(|x| x.fixed_version.is_none()));
    assert_eq!(count(&f, SeverityLevel::Critical), 1);
}

#[test]
fn report_for_another_digest_is_rejected() {
    let err = parse_report(
        &fixture("wrong-digest.json"),
        Some(&web()),
        "scans/sha256-web.trivy.json",
    )
    .unwrap_err();
    match &err {
        ScanError::VerifyTrivyDigest {
            source_name,
            expected,
            found,
        } => {
            assert_eq!(source_name, "scans/sha256-web.trivy.json");
            assert_eq!(expected, WEB);
            assert_eq!(found, &vec![OTHER.to_string()]);
        }
        other => panic!("unexpected {other:?}"),
    }
    assert!(!err.is_transient());
    // Without an expected digest there is nothing to compare.
    assert!(parse_report(&fixture("wrong-digest.json"), None, "w").is_ok());
}

#[test]
fn digest_in_artifact_name_is_checked_too() {
    let report = format!(
        r#"{{"SchemaVersion": 2, "ArtifactName": "contoso.azurecr.io/web@{OTHER}", "Results": []}}"#
    );
    assert!(matches!(
        parse_report(report.as_bytes(), Some(&web()), "r"),
        Err(ScanError::VerifyTrivyDigest { .. })
    ));
    // A tarball scan names no digest: accepted (cannot be checked).
    let tarball = br#"{"SchemaVersion": 2, "ArtifactName": "web.tar", "ArtifactType": "container_image", "Metadata": {"ImageID": "sha256:44b25fd6993edeb3b8ded5d90a7ed24479b70103fe0653e3cf5facadbfb1d1df"}}"#;
    let f = parse_report(tarball, Some(&web()), "r").unwrap();
    assert!(f.findings.is_empty());
}

#[test]
fn malformed_report_names_source_line_and_column() {
    let err = parse_report(&fixture("malformed.json"), Some(&web()), "malformed.json").unwrap_err();
    let text = err.to_string();
    assert!(
        matches!(&err, ScanError::ParseTrivyReport { source_name, .. } if source_name == "malformed.json"),
        "{err:?}"
    );
    // The comma after "VulnerabilityID" is missing; the parser notices on line 14.
    assert!(text.contains("malformed.json"), "{text}");
    assert!(text.contains("line 14, column"), "{text}");
    assert!(!err.is_transient());
}

#[test]
fn wrong_schema_is_rejected() {
    let err = parse_report(br#"{"SchemaVersion": 1}"#, None, "old.json").unwrap_err();
    assert!(err.to_string().contains("SchemaVersion is 1"), "{err}");
    let err = parse_report(
        br#"[{"Target": "x", "Vulnerabilities": null}]"#,
        None,
        "v1.json",
    )
    .unwrap_err();
    assert!(err.to_string().contains("line 1, column"), "{err}");
    let err = parse_report(br#"{"Results": []}"#, None, "r.json").unwrap_err();
    assert!(err.to_string().contains("no SchemaVersion"), "{err}");
    let err = parse_report(b"", None, "empty.json").unwrap_err();
    assert!(err.to_string().contains("empty.json"), "{err}");
}
