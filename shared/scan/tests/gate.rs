//! The scan gate: thresholds, unfixed findings, the allow-list and the summary.

// Helpers outside `#[test]` functions unwrap too: a panic is a test failure.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use gantry_pipeline::AppName;
use gantry_pipeline::config::{AllowEntry, ScanSettings, ScanSource, SeverityLevel};
use gantry_scan::{Finding, Findings, evaluate};
use time::macros::date;

fn finding(id: &str, severity: SeverityLevel, fixed: Option<&str>) -> Finding {
    Finding {
        id: id.into(),
        package: format!("pkg-{}", id.to_lowercase()),
        installed_version: "1.0".into(),
        fixed_version: fixed.map(str::to_string),
        severity,
        title: None,
    }
}

fn findings(list: Vec<Finding>) -> Findings {
    Findings {
        source: ScanSource::Trivy,
        findings: list,
        scanned_at: None,
    }
}

fn settings(threshold: SeverityLevel, ignore_unfixed: bool) -> ScanSettings {
    ScanSettings {
        source: ScanSource::Trivy,
        threshold,
        ignore_unfixed,
        max_wait: Duration::from_secs(4 * 3600),
    }
}

fn app(name: &str) -> AppName {
    AppName::parse(name).unwrap()
}

fn allow(id: &str, apps: &[&str], expires: time::Date) -> AllowEntry {
    AllowEntry {
        id: id.into(),
        apps: apps.iter().map(|a| app(a)).collect(),
        expires,
        reason: format!("{id} is not reachable"),
    }
}

const TODAY: time::Date = date!(2026 - 11 - 03);

#[test]
fn threshold_is_inclusive() {
    use SeverityLevel::*;
    let f = findings(vec![finding("CVE-H", High, Some("2"))]);
    for (threshold, passes) in [
        (Critical, true),
        (High, false),
        (Medium, false),
        (Unknown, false),
    ] {
        let v = evaluate(&f, &settings(threshold, false), &[], &app("web"), TODAY);
        assert_eq!(v.passed, passes, "threshold {threshold:?}");
        assert_eq!(v.threshold, threshold);
    }
    // Unknown severity blocks only at the lowest threshold.
    let u = findings(vec![finding("CVE-U", Unknown, Some("2"))]);
    assert!(evaluate(&u, &settings(Low, false), &[], &app("web"), TODAY).passed);
    assert!(!evaluate(&u, &settings(Unknown, false), &[], &app("web"), TODAY).passed);
}

#[test]
fn counts_cover_every_finding_and_level() {
    use SeverityLevel::*;
    let f = findings(vec![
        finding("CVE-1", Critical, Some("2")),
        finding("CVE-2", High, Some("2")),
        finding("CVE-3", High, Some("2")),
        finding("CVE-4", Low, None),
    ]);
    let v = evaluate(&f, &settings(Critical, false), &[], &app("web"), TODAY);
    assert_eq!(v.counts["critical"], 1);
    assert_eq!(v.counts["high"], 2);
    assert_eq!(v.counts["medium"], 0);
    assert_eq!(v.counts["low"], 1);
    assert_eq!(v.counts["unknown"], 0);
    assert_eq!(v.blocking.len(), 1);
}

#[test]
fn blocked_summary_lists_severities_and_ids() {
    use SeverityLevel::*;
    let f = findings(vec![
        finding("CVE-2024-0003", High, Some("2")),
        finding("CVE-2024-0001", Critical, Some("2")),
        finding("CVE-2024-0002", High, None),
        finding("CVE-2024-0009", Medium, Some("2")),
    ]);
    let v = evaluate(&f, &settings(High, false), &[], &app("web"), TODAY);
    assert!(!v.passed);
    assert_eq!(
        v.summary,
        "blocked: 1 critical, 2 high at or above high (CVE-2024-0001, CVE-2024-0002, CVE-2024-0003)"
    );
    // Most severe first.
    assert_eq!(v.blocking[0].id, "CVE-2024-0001");
}

#[test]
fn long_id_lists_are_shortened() {
    let f = findings(
        (1..=8)
            .map(|i| finding(&format!("CVE-2024-000{i}"), SeverityLevel::Critical, None))
            .collect(),
    );
    let v = evaluate(
        &f,
        &settings(SeverityLevel::High, false),
        &[],
        &app("web"),
        TODAY,
    );
    assert!(
        v.summary
            .starts_with("blocked: 8 critical at or above high (CVE-2024-0001,")
    );
    assert!(
        v.summary.ends_with("CVE-2024-0005, +3 more)"),
        "{}",
        v.summary
    );
}

#[test]
fn passing_summaries() {
    use SeverityLevel::*;
    let f = findings(vec![finding("CVE-1", Medium, Some("2"))]);
    let v = evaluate(&f, &settings(High, false), &[], &app("web"), TODAY);
    assert!(v.passed);
    assert_eq!(v.summary, "passed: no findings at or above high (1 below)");
    let v = evaluate(
        &findings(vec![]),
        &settings(High, false),
        &[],
        &app("web"),
        TODAY,
    );
    assert_eq!(v.summary, "passed: no findings at or above high (0 below)");
}

#[test]
fn ignore_unfixed_sets_aside_only_unfixed() {
    use SeverityLevel::*;
    let f = findings(vec![
        finding("CVE-UNFIXED", Critical, None),
        finding("CVE-FIXED", High, Some("1.2")),
    ]);
    let v = evaluate(&f, &settings(High, true), &[], &app("web"), TODAY);
    assert!(!v.passed);
    assert_eq!(v.ignored_unfixed, 1);
    assert_eq!(v.blocking.len(), 1);
    assert_eq!(v.blocking[0].id, "CVE-FIXED");
    assert_eq!(
        v.summary,
        "blocked: 1 high at or above high (CVE-FIXED); 1 unfixed ignored"
    );

    let only_unfixed = findings(vec![finding("CVE-UNFIXED", Critical, None)]);
    let v = evaluate(
        &only_unfixed,
        &settings(High, true),
        &[],
        &app("web"),
        TODAY,
    );
    assert!(v.passed);
    assert_eq!(
        v.summary,
        "passed: 1 finding at or above high, none blocking; 1 unfixed ignored"
    );
    // Without the setting unfixed findings block like any other.
    let v = evaluate(
        &only_unfixed,
        &settings(High, false),
        &[],
        &app("web"),
        TODAY,
    );
    assert!(!v.passed);
    assert_eq!(v.ignored_unfixed, 0);
}

#[test]
fn allow_list_by_app_and_for_all_apps() {
    use SeverityLevel::*;
    let f = findings(vec![
        finding("CVE-2024-3094", Critical, Some("5.6.2")),
        finding("CVE-2024-6119", High, Some("3.1.7")),
    ]);
    let list = [
        allow("CVE-2024-3094", &["web"], date!(2026 - 12 - 31)),
        allow("cve-2024-6119", &[], date!(2027 - 01 - 15)),
    ];
    let v = evaluate(&f, &settings(High, false), &list, &app("web"), TODAY);
    assert!(v.passed, "{v:?}");
    assert_eq!(v.allowed.len(), 2);
    assert_eq!(v.allowed[0].finding.id, "CVE-2024-3094");
    assert_eq!(v.allowed[0].reason, "CVE-2024-3094 is not reachable");
    assert_eq!(v.allowed[0].expires, date!(2026 - 12 - 31));
    assert_eq!(
        v.summary,
        "passed: 2 findings at or above high, none blocking; 2 allowed"
    );

    // The app-specific entry does not cover another app; the global one does.
    let v = evaluate(&f, &settings(High, false), &list, &app("api"), TODAY);
    assert!(!v.passed);
    assert_eq!(v.allowed.len(), 1);
    assert_eq!(v.allowed[0].finding.id, "CVE-2024-6119");
    assert_eq!(
        v.summary,
        "blocked: 1 critical at or above high (CVE-2024-3094); 1 allowed"
    );
}

#[test]
fn expired_entries_do_not_apply_and_are_reported() {
    use SeverityLevel::*;
    let f = findings(vec![finding("CVE-2024-3094", Critical, Some("5.6.2"))]);
    // The last day still applies.
    let on_last_day = [allow("CVE-2024-3094", &["web"], TODAY)];
    let v = evaluate(&f, &settings(High, false), &on_last_day, &app("web"), TODAY);
    assert!(v.passed);
    assert!(v.expired_allow.is_empty());

    let expired = [allow("CVE-2024-3094", &["web"], date!(2026 - 11 - 02))];
    let v = evaluate(&f, &settings(High, false), &expired, &app("web"), TODAY);
    assert!(!v.passed);
    assert!(v.allowed.is_empty());
    assert_eq!(v.expired_allow, vec!["CVE-2024-3094".to_string()]);
    assert_eq!(
        v.summary,
        "blocked: 1 critical at or above high (CVE-2024-3094); expired allow-list entry: CVE-2024-3094"
    );

    // An expired entry next to a live one: the live one applies.
    let both = [
        allow("CVE-2024-3094", &[], date!(2026 - 01 - 01)),
        allow("CVE-2024-3094", &["web"], date!(2027 - 01 - 01)),
    ];
    let v = evaluate(&f, &settings(High, false), &both, &app("web"), TODAY);
    assert!(v.passed);
    assert_eq!(v.allowed[0].expires, date!(2027 - 01 - 01));
}

#[test]
fn verdict_serializes_for_the_run_record() {
    use SeverityLevel::*;
    let f = findings(vec![finding("CVE-1", Critical, Some("2"))]);
    let list = [allow("CVE-1", &[], date!(2026 - 12 - 31))];
    let v = evaluate(&f, &settings(High, false), &list, &app("web"), TODAY);
    let json = serde_json::to_value(&v).unwrap();
    assert_eq!(json["passed"], true);
    assert_eq!(json["threshold"], "high");
    assert_eq!(json["counts"]["critical"], 1);
    assert_eq!(json["allowed"][0]["expires"], "2026-12-31");
    assert_eq!(json["allowed"][0]["finding"]["severity"], "critical");
}
