//! `[governance]`: what `cluster-audit` checks about the cluster gantry
//! deploys to, beyond each app's own objects (issue 8).
//!
//! ```toml
//! [governance]
//! required_labels = ["app.kubernetes.io/name", "owner"]
//! quota_warn_ratio = 0.9
//!
//! [[governance.daemonsets]]
//! namespace = "kube-system"
//! name = "microsoft-defender-collector-ds"
//! ```
//!
//! Every managed Deployment must carry each of `required_labels`; gantry's
//! own Deployments get theirs from the renderer ([`GANTRY_LABELS`]) and from
//! the app's `[apps.labels]`, and [`check`] refuses a configuration in which
//! gantry itself would deploy a Deployment missing a required label.

use std::collections::BTreeMap;

use serde::Deserialize;

use crate::config::Config;

/// The labels the renderer puts on every Deployment gantry applies (and its
/// pod template), whatever the app configures. Kept here, not taken from
/// `gantry-manifests`, because that crate depends on this one; its tests
/// check the two agree.
pub const GANTRY_LABELS: [&str; 3] = [
    "app.kubernetes.io/name",
    "app.kubernetes.io/instance",
    "app.kubernetes.io/managed-by",
];

/// Default of `quota_warn_ratio`.
pub const DEFAULT_QUOTA_WARN_RATIO: f64 = 0.9;

/// `[governance]`.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct GovernanceConfig {
    /// Label keys every managed Deployment must carry (any value).
    #[serde(default)]
    pub required_labels: Vec<String>,
    /// Quota usage (`status.used / status.hard`, per resource) at or above
    /// which a namespace is reported; in (0, 1], default 0.9.
    #[serde(default = "default_ratio")]
    pub quota_warn_ratio: f64,
    /// DaemonSets that must exist and be fully scheduled and ready.
    #[serde(default)]
    pub daemonsets: Vec<MandatoryDaemonSet>,
}

fn default_ratio() -> f64 {
    DEFAULT_QUOTA_WARN_RATIO
}

impl Default for GovernanceConfig {
    fn default() -> Self {
        GovernanceConfig {
            required_labels: Vec::new(),
            quota_warn_ratio: DEFAULT_QUOTA_WARN_RATIO,
            daemonsets: Vec::new(),
        }
    }
}

/// One `[[governance.daemonsets]]`.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq, PartialOrd, Ord)]
#[serde(deny_unknown_fields)]
pub struct MandatoryDaemonSet {
    /// Its namespace (a DNS label).
    pub namespace: String,
    /// Its name (a DNS subdomain).
    pub name: String,
}

/// Whether `s` is a DNS-1123 label (`[a-z0-9]([-a-z0-9]*[a-z0-9])?`, at most 63).
pub fn is_dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

/// Whether `s` is a DNS-1123 subdomain (dot-separated labels, at most 253):
/// what Kubernetes allows as most object names.
pub fn is_dns_subdomain(s: &str) -> bool {
    !s.is_empty() && s.len() <= 253 && s.split('.').all(is_dns_label)
}

/// Whether `s` is a Kubernetes label key: an optional DNS subdomain prefix
/// and `/`, then a name of at most 63 of `[A-Za-z0-9._-]` starting and ending
/// alphanumeric.
pub fn is_label_key(s: &str) -> bool {
    let (prefix, name) = match s.split_once('/') {
        Some((p, n)) => (Some(p), n),
        None => (None, s),
    };
    prefix.is_none_or(is_dns_subdomain) && is_label_name(name)
}

fn is_label_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
        && s.starts_with(|c: char| c.is_ascii_alphanumeric())
        && s.ends_with(|c: char| c.is_ascii_alphanumeric())
}

/// Whether `s` is a Kubernetes label value: empty, or a label name.
pub fn is_label_value(s: &str) -> bool {
    s.is_empty() || is_label_name(s)
}

/// Checks `[governance]` and every app's `[apps.labels]`; the message names
/// the key.
pub fn check(config: &Config) -> Result<(), String> {
    let g = &config.governance;
    let mut seen = std::collections::BTreeSet::new();
    for (i, key) in g.required_labels.iter().enumerate() {
        if !is_label_key(key) {
            return Err(format!(
                "governance.required_labels[{i}]: {key:?} is not a Kubernetes label key"
            ));
        }
        if !seen.insert(key) {
            return Err(format!(
                "governance.required_labels[{i}]: {key:?} is listed twice"
            ));
        }
    }
    // NaN fails both comparisons, so it is refused too.
    if !(g.quota_warn_ratio > 0.0 && g.quota_warn_ratio <= 1.0) {
        return Err(format!(
            "governance.quota_warn_ratio: {} must be above 0 and at most 1 (a fraction of the quota, e.g. 0.9)",
            g.quota_warn_ratio
        ));
    }
    let mut seen = std::collections::BTreeSet::new();
    for (i, ds) in g.daemonsets.iter().enumerate() {
        if !is_dns_label(&ds.namespace) {
            return Err(format!(
                "governance.daemonsets[{i}].namespace: {:?} is not a Kubernetes namespace name",
                ds.namespace
            ));
        }
        if !is_dns_subdomain(&ds.name) {
            return Err(format!(
                "governance.daemonsets[{i}].name: {:?} is not a Kubernetes object name",
                ds.name
            ));
        }
        if !seen.insert(ds) {
            return Err(format!(
                "governance.daemonsets[{i}]: {}/{} is listed twice",
                ds.namespace, ds.name
            ));
        }
    }
    for (i, app) in config.apps.iter().enumerate() {
        let at = |key: &str| format!("apps[{i}].{key} (app {:?})", app.name.as_str());
        for (key, value) in &app.labels {
            if !is_label_key(key) {
                return Err(format!(
                    "{}: {key:?} is not a Kubernetes label key",
                    at("labels")
                ));
            }
            if GANTRY_LABELS.contains(&key.as_str()) {
                return Err(format!(
                    "{}: {key:?} is set by gantry itself and cannot be overridden",
                    at("labels")
                ));
            }
            if !is_label_value(value) {
                return Err(format!(
                    "{}: value {value:?} of {key:?} is not a Kubernetes label value (at most 63 of [A-Za-z0-9._-])",
                    at("labels")
                ));
            }
        }
        // gantry must never deploy what its own audit reports.
        if let Some(missing) = g
            .required_labels
            .iter()
            .find(|k| !GANTRY_LABELS.contains(&k.as_str()) && !app.labels.contains_key(*k))
        {
            return Err(format!(
                "{}: governance.required_labels requires {missing:?} on every Deployment; set it in [apps.labels]",
                at("labels")
            ));
        }
    }
    Ok(())
}

/// The labels an app adds to everything gantry renders for it.
pub type AppLabels = BTreeMap<String, String>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_keys() {
        for good in [
            "owner",
            "app.kubernetes.io/name",
            "team_a.b-c",
            "x",
            "example.com/cost-center",
        ] {
            assert!(is_label_key(good), "{good}");
        }
        for bad in [
            "",
            "-owner",
            "owner-",
            "a/b/c",
            "Example.com/x",
            "/x",
            "x/",
            "has space",
            &"a".repeat(64),
        ] {
            assert!(!is_label_key(bad), "{bad}");
        }
    }

    #[test]
    fn names() {
        assert!(is_dns_subdomain("microsoft-defender-collector-ds"));
        assert!(is_dns_subdomain("ama-logs.v2"));
        assert!(!is_dns_subdomain("Defender"));
        assert!(!is_dns_subdomain("a..b"));
        assert!(!is_dns_subdomain("../etc"));
        assert!(is_dns_label("kube-system"));
        assert!(!is_dns_label("kube.system"));
    }

    const APP: &str =
        "[[apps]]\nname = \"web\"\nrepo = \"contoso/web\"\nimage = \"contoso.azurecr.io/web\"\n";

    fn parse(extra: &str) -> Result<Config, String> {
        Config::parse(&format!("{APP}{extra}"), "t.toml").map_err(|e| e.to_string())
    }

    #[test]
    fn defaults_and_a_full_section() {
        let c = parse("").expect("parses");
        assert_eq!(c.governance, GovernanceConfig::default());
        assert!(c.apps[0].labels.is_empty());
        let c = parse(
            "[apps.labels]\nowner = \"team-a\"\n[governance]\nrequired_labels = [\"app.kubernetes.io/name\", \"owner\"]\nquota_warn_ratio = 0.8\n[[governance.daemonsets]]\nnamespace = \"kube-system\"\nname = \"microsoft-defender-collector-ds\"\n",
        )
        .expect("parses");
        assert_eq!(c.governance.quota_warn_ratio, 0.8);
        assert_eq!(
            c.governance.daemonsets[0].name,
            "microsoft-defender-collector-ds"
        );
        assert_eq!(c.apps[0].labels["owner"], "team-a");
    }

    #[test]
    fn bad_values_are_clear_errors() {
        for (extra, needle) in [
            (
                "[governance]\nrequired_labels = [\"-owner\"]\n",
                "governance.required_labels[0]: \"-owner\" is not a Kubernetes label key",
            ),
            (
                "[governance]\nrequired_labels = [\"a/b/c\"]\n",
                "governance.required_labels[0]",
            ),
            (
                "[governance]\nrequired_labels = [\"app.kubernetes.io/name\", \"app.kubernetes.io/name\"]\n",
                "listed twice",
            ),
            (
                "[governance]\nquota_warn_ratio = 1.5\n",
                "governance.quota_warn_ratio: 1.5",
            ),
            (
                "[governance]\nquota_warn_ratio = 0.0\n",
                "governance.quota_warn_ratio",
            ),
            (
                "[governance]\nquota_warn_ratio = nan\n",
                "governance.quota_warn_ratio",
            ),
            (
                "[[governance.daemonsets]]\nnamespace = \"kube-system\"\nname = \"Defender_DS\"\n",
                "governance.daemonsets[0].name: \"Defender_DS\" is not a Kubernetes object name",
            ),
            (
                "[[governance.daemonsets]]\nnamespace = \"../x\"\nname = \"ds\"\n",
                "governance.daemonsets[0].namespace",
            ),
            (
                "[[governance.daemonsets]]\nnamespace = \"kube-system\"\nname = \"ds\"\n[[governance.daemonsets]]\nnamespace = \"kube-system\"\nname = \"ds\"\n",
                "governance.daemonsets[1]: kube-system/ds is listed twice",
            ),
            (
                "[[governance.daemonsets]]\nnamespace = \"kube-system\"\n",
                "missing field `name`",
            ),
            (
                "[governance]\nrequired_label = [\"owner\"]\n",
                "unknown field `required_label`",
            ),
            (
                "[governance]\nrequired_labels = [\"owner\"]\n",
                "apps[0].labels (app \"web\"): governance.required_labels requires \"owner\"",
            ),
            (
                "[apps.labels]\n\"app.kubernetes.io/managed-by\" = \"me\"\n",
                "set by gantry itself",
            ),
            (
                "[apps.labels]\nowner = \"team a\"\n",
                "not a Kubernetes label value",
            ),
            (
                "[apps.labels]\n\"Bad Key\" = \"x\"\n",
                "not a Kubernetes label key",
            ),
        ] {
            let err = parse(extra).expect_err(extra);
            assert!(err.contains(needle), "{extra}: {err}");
        }
    }
}
