//! The scan gate: findings + settings + allow-list → pass or block.

use std::collections::BTreeMap;

use gantry_pipeline::AppName;
use gantry_pipeline::config::{AllowEntry, ScanSettings, SeverityLevel};
use serde::{Serialize, Serializer};

use crate::{Finding, Findings};

/// How many ids the one-line summary names before "+N more".
const SUMMARY_IDS: usize = 5;

/// A finding at or above the threshold that an allow-list entry accepts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AllowedFinding {
    /// The accepted finding.
    pub finding: Finding,
    /// Why it is accepted (from the allow-list entry).
    pub reason: String,
    /// Last day the acceptance applies (`YYYY-MM-DD`).
    #[serde(serialize_with = "iso_date")]
    pub expires: time::Date,
}

/// The gate's decision for one image, with everything needed to explain it on
/// the run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Verdict {
    /// Whether the image may go on to the policy gate.
    pub passed: bool,
    /// Findings at or above this severity block.
    pub threshold: SeverityLevel,
    /// Every finding by severity name (all five levels, zeros included).
    pub counts: BTreeMap<String, usize>,
    /// Findings that block, most severe first.
    pub blocking: Vec<Finding>,
    /// Findings at or above the threshold accepted by the allow-list.
    pub allowed: Vec<AllowedFinding>,
    /// Findings at or above the threshold set aside because no fix exists
    /// and the app ignores unfixed findings.
    pub ignored_unfixed: usize,
    /// Allow-list ids that matched a finding at or above the threshold but had
    /// expired, so did not apply (a reminder to renew or fix).
    pub expired_allow: Vec<String>,
    /// One line for the run, alerts and commit statuses.
    pub summary: String,
}

/// Decides whether `findings` pass for `app`.
///
/// A finding blocks when its severity is at or above `settings.threshold`,
/// unless an allow-list entry for its id (compared case-insensitively) applies
/// to `app` (an entry without apps applies to every app) and has not expired
/// (`today` is on or before `expires`, UTC), or unless it has no fixed version
/// and `settings.ignore_unfixed` is set. The allow-list is consulted first, so
/// an accepted finding is shown with its reason even when it is also unfixed.
/// Findings below the threshold never block and are only counted.
pub fn evaluate(
    findings: &Findings,
    settings: &ScanSettings,
    allow: &[AllowEntry],
    app: &AppName,
    today: time::Date,
) -> Verdict {
    let threshold = settings.threshold;
    let mut counts: BTreeMap<String, usize> = SeverityLevel::ALL
        .iter()
        .map(|s| (s.as_str().to_string(), 0))
        .collect();
    let mut blocking = Vec::new();
    let mut allowed = Vec::new();
    let mut ignored_unfixed = 0;
    let mut expired_allow: Vec<String> = Vec::new();

    for finding in &findings.findings {
        *counts
            .entry(finding.severity.as_str().to_string())
            .or_default() += 1;
        if finding.severity < threshold {
            continue;
        }
        let matching = allow.iter().filter(|entry| {
            entry.id.eq_ignore_ascii_case(&finding.id)
                && (entry.apps.is_empty() || entry.apps.contains(app))
        });
        let mut accepted: Option<&AllowEntry> = None;
        for entry in matching {
            if today <= entry.expires {
                // Of several live entries, show the one that lasts longest.
                if accepted.is_none_or(|a| entry.expires > a.expires) {
                    accepted = Some(entry);
                }
            } else if !expired_allow.contains(&entry.id) {
                expired_allow.push(entry.id.clone());
            }
        }
        if let Some(entry) = accepted {
            allowed.push(AllowedFinding {
                finding: finding.clone(),
                reason: entry.reason.clone(),
                expires: entry.expires,
            });
        } else if settings.ignore_unfixed && finding.fixed_version.is_none() {
            ignored_unfixed += 1;
        } else {
            blocking.push(finding.clone());
        }
    }

    blocking.sort_by(|a, b| {
        b.severity
            .cmp(&a.severity)
            .then_with(|| a.id.cmp(&b.id))
            .then_with(|| a.package.cmp(&b.package))
    });
    expired_allow.sort();
    let summary = summarise(
        threshold,
        findings.findings.len(),
        &blocking,
        allowed.len(),
        ignored_unfixed,
        &expired_allow,
    );
    Verdict {
        passed: blocking.is_empty(),
        threshold,
        counts,
        blocking,
        allowed,
        ignored_unfixed,
        expired_allow,
        summary,
    }
}

/// `blocked: 1 critical, 2 high at or above high (CVE-a, CVE-b, CVE-c)` or
/// `passed: no findings at or above high (4 below)`, plus what was set aside
/// and which allow-list entries expired.
fn summarise(
    threshold: SeverityLevel,
    total: usize,
    blocking: &[Finding],
    allowed: usize,
    ignored_unfixed: usize,
    expired_allow: &[String],
) -> String {
    let threshold_name = threshold.as_str();
    let mut text = if blocking.is_empty() {
        let at_or_above = allowed + ignored_unfixed;
        if at_or_above == 0 {
            format!(
                "passed: no findings at or above {threshold_name} ({} below)",
                total
            )
        } else {
            format!(
                "passed: {at_or_above} {} at or above {threshold_name}, none blocking",
                plural(at_or_above, "finding")
            )
        }
    } else {
        let by_severity: Vec<String> = SeverityLevel::ALL
            .iter()
            .rev()
            .filter_map(|level| {
                let n = blocking.iter().filter(|f| f.severity == *level).count();
                (n > 0).then(|| format!("{n} {}", level.as_str()))
            })
            .collect();
        let mut ids: Vec<&str> = Vec::new();
        for f in blocking {
            if !ids.contains(&f.id.as_str()) {
                ids.push(&f.id);
            }
        }
        let mut named = ids
            .iter()
            .take(SUMMARY_IDS)
            .copied()
            .collect::<Vec<_>>()
            .join(", ");
        if ids.len() > SUMMARY_IDS {
            named.push_str(&format!(", +{} more", ids.len() - SUMMARY_IDS));
        }
        format!(
            "blocked: {} at or above {threshold_name} ({named})",
            by_severity.join(", ")
        )
    };
    let mut extras = Vec::new();
    if allowed > 0 {
        extras.push(format!("{allowed} allowed"));
    }
    if ignored_unfixed > 0 {
        extras.push(format!("{ignored_unfixed} unfixed ignored"));
    }
    if !extras.is_empty() {
        text.push_str(&format!("; {}", extras.join(", ")));
    }
    if !expired_allow.is_empty() {
        text.push_str(&format!(
            "; expired allow-list {}: {}",
            plural(expired_allow.len(), "entry"),
            expired_allow.join(", ")
        ));
    }
    text
}

fn plural(n: usize, word: &str) -> String {
    match (n, word) {
        (1, w) => w.to_string(),
        (_, "entry") => "entries".to_string(),
        (_, w) => format!("{w}s"),
    }
}

/// `YYYY-MM-DD`, the way `gantry.toml` writes the date (time's own serde
/// format for `Date` is a tuple unless a feature is enabled).
fn iso_date<S: Serializer>(date: &time::Date, s: S) -> Result<S::Ok, S::Error> {
    let format = time::macros::format_description!("[year]-[month]-[day]");
    let text = date.format(&format).map_err(serde::ser::Error::custom)?;
    s.serialize_str(&text)
}
