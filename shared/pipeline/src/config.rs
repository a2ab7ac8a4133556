//! `gantry.toml`: which repositories and images gantry delivers, and how.
//!
//! Unknown keys are an error that names the key (a typo in a security setting
//! must never be silently ignored).

use std::path::PathBuf;

use serde::Deserialize;

use crate::error::PipelineError;
use crate::names::AppName;

/// The whole configuration file.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Applications gantry delivers.
    #[serde(default)]
    pub apps: Vec<AppConfig>,
    /// Scan gate defaults and the CVE allow-list (`[scan]`).
    #[serde(default)]
    pub scan: ScanConfig,
    /// Policy gate settings (`[policy]`).
    #[serde(default)]
    pub policy: PolicyConfig,
    /// Where deploys go (`[deploy]`).
    #[serde(default)]
    pub deploy: DeployConfig,
    /// Notification channels and routes (`[alerts]`).
    #[serde(default)]
    pub alerts: AlertsConfig,
    /// Defender for Cloud security alerts (`[security]`).
    #[serde(default)]
    pub security: SecurityConfig,
    /// GitHub REST API access and the webhooks whose missed deliveries
    /// `cluster-audit` redelivers (`[github]`).
    #[serde(default)]
    pub github: GithubConfig,
    /// Cluster governance audits (`[governance]`, see [`crate::governance`]).
    #[serde(default)]
    pub governance: crate::governance::GovernanceConfig,
    /// Directory of the configuration file: relative paths resolve against it.
    #[serde(skip)]
    pub base_dir: Option<PathBuf>,
}

/// Where vulnerability findings come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ScanSource {
    /// Microsoft Defender for Containers, through Azure Resource Graph.
    Defender,
    /// A Trivy JSON report uploaded by CI (`scans/{digest}.trivy.json`).
    Trivy,
}

/// Vulnerability severity, ordered.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Deserialize, serde::Serialize,
)]
#[serde(rename_all = "lowercase")]
pub enum SeverityLevel {
    /// Unknown / unrated.
    Unknown,
    /// Low.
    Low,
    /// Medium.
    Medium,
    /// High.
    High,
    /// Critical.
    Critical,
}

impl SeverityLevel {
    /// Every level, lowest first.
    pub const ALL: [SeverityLevel; 5] = [
        SeverityLevel::Unknown,
        SeverityLevel::Low,
        SeverityLevel::Medium,
        SeverityLevel::High,
        SeverityLevel::Critical,
    ];

    /// Parses a scanner's spelling case-insensitively (`HIGH`, `High`, `high`);
    /// anything unrecognised is `Unknown`.
    pub fn parse_lenient(s: &str) -> SeverityLevel {
        match s.trim().to_ascii_lowercase().as_str() {
            "critical" => SeverityLevel::Critical,
            "high" => SeverityLevel::High,
            "medium" | "moderate" => SeverityLevel::Medium,
            "low" | "negligible" => SeverityLevel::Low,
            _ => SeverityLevel::Unknown,
        }
    }

    /// Lowercase name.
    pub fn as_str(self) -> &'static str {
        match self {
            SeverityLevel::Unknown => "unknown",
            SeverityLevel::Low => "low",
            SeverityLevel::Medium => "medium",
            SeverityLevel::High => "high",
            SeverityLevel::Critical => "critical",
        }
    }
}

/// `[scan]`: defaults for every app, Defender settings and the allow-list.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ScanConfig {
    /// Default source.
    #[serde(default = "default_source")]
    pub source: ScanSource,
    /// Block at or above this severity.
    #[serde(default = "default_threshold")]
    pub threshold: SeverityLevel,
    /// Ignore findings without a fixed version.
    #[serde(default)]
    pub ignore_unfixed: bool,
    /// How long "no results yet" is waited for before failing closed (`4h`, `30m`, `90s`).
    #[serde(default = "default_max_wait", deserialize_with = "de_duration")]
    pub max_wait: std::time::Duration,
    /// Folder of `{digest}.trivy.json` reports read by `gantry dev` (relative to
    /// this file); the store's `scans/{digest}.trivy.json` is read first.
    #[serde(default)]
    pub trivy_dir: Option<PathBuf>,
    /// Defender for Containers through Azure Resource Graph.
    #[serde(default)]
    pub defender: DefenderConfig,
    /// Accepted vulnerabilities (`[[scan.allow]]`).
    #[serde(default)]
    pub allow: Vec<AllowEntry>,
}

impl Default for ScanConfig {
    fn default() -> Self {
        ScanConfig {
            source: default_source(),
            threshold: default_threshold(),
            ignore_unfixed: false,
            max_wait: default_max_wait(),
            trivy_dir: None,
            defender: DefenderConfig::default(),
            allow: Vec::new(),
        }
    }
}

/// `[scan.defender]`.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct DefenderConfig {
    /// Subscriptions Resource Graph queries (the registry's subscription).
    #[serde(default)]
    pub subscriptions: Vec<String>,
    /// Resource Graph endpoint (tests point it at a local fake).
    #[serde(default = "default_arg_endpoint")]
    pub endpoint: String,
}

fn default_arg_endpoint() -> String {
    "https://management.azure.com".to_string()
}

/// One accepted vulnerability.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct AllowEntry {
    /// CVE or advisory id (`CVE-2024-3094`, `GHSA-...`).
    pub id: String,
    /// Apps it applies to; empty means every app.
    #[serde(default)]
    pub apps: Vec<AppName>,
    /// Last day (UTC) it applies; afterwards it is ignored and a warning is raised.
    #[serde(deserialize_with = "de_date")]
    pub expires: time::Date,
    /// Why it is accepted (shown on the run).
    pub reason: String,
}

/// `[apps.scan]`: per-app overrides of `[scan]`.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct AppScan {
    /// Source override.
    pub source: Option<ScanSource>,
    /// Threshold override.
    pub threshold: Option<SeverityLevel>,
    /// `ignore_unfixed` override.
    pub ignore_unfixed: Option<bool>,
    /// `max_wait` override.
    #[serde(default, deserialize_with = "de_duration_opt")]
    pub max_wait: Option<std::time::Duration>,
}

/// The scan settings in force for one app.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScanSettings {
    /// Source.
    pub source: ScanSource,
    /// Block at or above.
    pub threshold: SeverityLevel,
    /// Ignore unfixed findings.
    pub ignore_unfixed: bool,
    /// Fail closed after this long without results.
    pub max_wait: std::time::Duration,
}

/// Where the deploy step puts an app's manifests.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum DeployTarget {
    /// GitOps hand-off: the rendered manifests are written to `<dir>/<app>/`
    /// (one file per object, stable names) for a GitOps agent or a person to
    /// commit and sync. The embedded default of `gantry dev`.
    Directory,
    /// Server-side apply to the cluster of the kubeconfig (`KUBECONFIG`,
    /// `~/.kube/config`) or, in a pod, the in-cluster service account; the
    /// rollout is then verified by scheduled `verify` messages and rolled
    /// back to the previous good version when it fails.
    Kubernetes,
}

/// `[deploy]`.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct DeployConfig {
    /// The target.
    #[serde(default = "default_target")]
    pub target: DeployTarget,
    /// Folder of the `directory` target (relative to this file). Unset:
    /// `<state>/deploy` in `gantry dev`, `deploy` beside this file otherwise.
    #[serde(default)]
    pub dir: Option<PathBuf>,
    /// `kubernetes` target: how long a rollout may take, counted from the
    /// apply, before it is rolled back (default `10m`).
    #[serde(default = "default_verify_deadline", deserialize_with = "de_duration")]
    pub verify_deadline: std::time::Duration,
    /// `kubernetes` target: how often the rollout is checked (default `15s`).
    #[serde(default = "default_verify_interval", deserialize_with = "de_duration")]
    pub verify_interval: std::time::Duration,
    /// `kubernetes` target on AKS, reached from outside the cluster with
    /// Microsoft Entra ID (the Function App's managed identity): the cluster's
    /// resource id. Unset: the kubeconfig or the in-cluster service account.
    #[serde(default)]
    pub aks_cluster: Option<String>,
    /// Azure Resource Manager endpoint used to look up `aks_cluster`'s
    /// server and CA (default `https://management.azure.com`; sovereign
    /// clouds differ).
    #[serde(default = "default_arm_endpoint")]
    pub arm_endpoint: String,
}

fn default_arm_endpoint() -> String {
    "https://management.azure.com".into()
}

/// Checks an AKS resource id
/// (`/subscriptions/{uuid}/resourceGroups/{group}/providers/Microsoft.ContainerService/managedClusters/{name}`)
/// before it becomes part of a URL; `Err` says what it should look like.
pub fn check_aks_cluster_id(id: &str) -> Result<(), String> {
    let parts: Vec<&str> = id.split('/').collect();
    let segment = |s: &str, max: usize| {
        !s.is_empty()
            && s.len() <= max
            && !s.starts_with('.')
            && s.chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '(' | ')'))
    };
    let ok = parts.len() == 9
        && parts[0].is_empty()
        && parts[1].eq_ignore_ascii_case("subscriptions")
        && parts[2].len() == 36
        && parts[2].chars().all(|c| c.is_ascii_hexdigit() || c == '-')
        && parts[3].eq_ignore_ascii_case("resourceGroups")
        && segment(parts[4], 90)
        && parts[5].eq_ignore_ascii_case("providers")
        && parts[6].eq_ignore_ascii_case("Microsoft.ContainerService")
        && parts[7].eq_ignore_ascii_case("managedClusters")
        && segment(parts[8], 63);
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{id:?} is not an AKS resource id (/subscriptions/<uuid>/resourceGroups/<group>/providers/Microsoft.ContainerService/managedClusters/<name>)"
        ))
    }
}

impl Default for DeployConfig {
    fn default() -> Self {
        DeployConfig {
            target: default_target(),
            dir: None,
            verify_deadline: default_verify_deadline(),
            verify_interval: default_verify_interval(),
            aks_cluster: None,
            arm_endpoint: default_arm_endpoint(),
        }
    }
}

fn default_verify_deadline() -> std::time::Duration {
    std::time::Duration::from_secs(600)
}

fn default_verify_interval() -> std::time::Duration {
    std::time::Duration::from_secs(15)
}

fn default_target() -> DeployTarget {
    DeployTarget::Directory
}

/// `[alerts]`: where the `alert` function sends notifications. Destinations
/// come from here only, never from an event. URLs, tokens and signing secrets
/// are given as the *name* of an environment variable (a Key Vault reference
/// in Azure): a webhook URL is a credential and does not belong in a file.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct AlertsConfig {
    /// Alerts with the same fingerprint within this window after the first
    /// one are counted, not sent again (default `1h`).
    #[serde(default = "default_dedup_window", deserialize_with = "de_duration")]
    pub dedup_window: std::time::Duration,
    /// Deliveries per channel before it is given up and recorded as failed
    /// (default 5; 1 means no retry).
    #[serde(default = "default_alert_attempts")]
    pub max_attempts: u32,
    /// Delay before the first retry of a failed channel; doubles per attempt,
    /// at most 1h (default `30s`).
    #[serde(default = "default_retry_backoff", deserialize_with = "de_duration")]
    pub retry_backoff: std::time::Duration,
    /// Timeout of every request to a channel (default `10s`).
    #[serde(default = "default_alert_timeout", deserialize_with = "de_duration")]
    pub timeout: std::time::Duration,
    /// Channels (`[[alerts.channels]]`).
    #[serde(default)]
    pub channels: Vec<AlertChannel>,
    /// Routes (`[[alerts.routes]]`): an alert goes to the union of the
    /// channels of every route it matches.
    #[serde(default)]
    pub routes: Vec<AlertRoute>,
}

impl Default for AlertsConfig {
    fn default() -> Self {
        AlertsConfig {
            dedup_window: default_dedup_window(),
            max_attempts: default_alert_attempts(),
            retry_backoff: default_retry_backoff(),
            timeout: default_alert_timeout(),
            channels: Vec::new(),
            routes: Vec::new(),
        }
    }
}

/// `[github]`: the GitHub REST API, for the redelivery sweep of missed
/// webhook deliveries (GitHub never redelivers by itself).
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct GithubConfig {
    /// Environment variable holding the API token (a fine-grained token or
    /// app token allowed to read and redeliver the hooks' deliveries).
    #[serde(default = "default_github_token_env")]
    pub token_env: String,
    /// REST API base URL (GitHub Enterprise Server: `https://host/api/v3`;
    /// tests point it at a local fake).
    #[serde(default = "default_github_api_url")]
    pub api_url: String,
    /// Webhooks swept for failed deliveries (`[[github.hooks]]`).
    #[serde(default)]
    pub hooks: Vec<GithubHook>,
}

impl Default for GithubConfig {
    fn default() -> Self {
        GithubConfig {
            token_env: default_github_token_env(),
            api_url: default_github_api_url(),
            hooks: Vec::new(),
        }
    }
}

impl AlertsConfig {
    /// Looks a channel up by name.
    pub fn channel(&self, name: &str) -> Option<&AlertChannel> {
        self.channels.iter().find(|c| c.name == name)
    }

    /// Names of the channels an alert of `app` (if any) and `severity` goes
    /// to, in the order the channels are configured, each once. A route with
    /// an empty `apps` matches every alert, also those about no app.
    pub fn route(&self, app: Option<&AppName>, severity: crate::Severity) -> Vec<&AlertChannel> {
        self.channels
            .iter()
            .filter(|c| {
                self.routes.iter().any(|r| {
                    severity >= r.min_severity
                        && (r.apps.is_empty() || app.is_some_and(|a| r.apps.contains(a)))
                        && r.channels.contains(&c.name)
                })
            })
            .collect()
    }

    /// Names of every environment variable the channels read.
    pub fn env_names(&self) -> impl Iterator<Item = &str> {
        self.channels.iter().flat_map(|c| {
            [&c.url_env, &c.secret_env, &c.token_env]
                .into_iter()
                .filter_map(|v| v.as_deref())
        })
    }
}

fn default_dedup_window() -> std::time::Duration {
    std::time::Duration::from_secs(3600)
}
fn default_alert_attempts() -> u32 {
    5
}
fn default_retry_backoff() -> std::time::Duration {
    std::time::Duration::from_secs(30)
}
fn default_alert_timeout() -> std::time::Duration {
    std::time::Duration::from_secs(10)
}

/// What a channel talks to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ChannelKind {
    /// Microsoft Teams Workflows webhook (a message with an Adaptive Card).
    Teams,
    /// Slack incoming webhook (Block Kit).
    Slack,
    /// Generic webhook: JSON signed with `X-Gantry-Signature-256`.
    Webhook,
    /// GitHub commit statuses and deployments of the run's commit.
    Github,
}

impl ChannelKind {
    /// Lowercase name.
    pub fn as_str(self) -> &'static str {
        match self {
            ChannelKind::Teams => "teams",
            ChannelKind::Slack => "slack",
            ChannelKind::Webhook => "webhook",
            ChannelKind::Github => "github",
        }
    }
}

/// Severity of a Defender for Cloud security alert, ordered (Defender's four
/// levels: `Informational`, `Low`, `Medium`, `High`).
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Deserialize, serde::Serialize,
)]
#[serde(rename_all = "lowercase")]
pub enum SecuritySeverity {
    /// Informational.
    Informational,
    /// Low.
    Low,
    /// Medium.
    Medium,
    /// High.
    High,
}

impl SecuritySeverity {
    /// Lowercase name.
    pub fn as_str(self) -> &'static str {
        match self {
            SecuritySeverity::Informational => "informational",
            SecuritySeverity::Low => "low",
            SecuritySeverity::Medium => "medium",
            SecuritySeverity::High => "high",
        }
    }
}

/// `[[alerts.channels]]`.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct AlertChannel {
    /// Name routes refer to (`[a-z0-9-]`); recorded on runs.
    pub name: String,
    /// Kind.
    pub kind: ChannelKind,
    /// Environment variable holding the webhook URL (teams, slack, webhook).
    #[serde(default)]
    pub url_env: Option<String>,
    /// Environment variable holding the HMAC signing secret (webhook).
    #[serde(default)]
    pub secret_env: Option<String>,
    /// Environment variable holding the GitHub token (github).
    #[serde(default)]
    pub token_env: Option<String>,
    /// GitHub API base URL (github; default `https://api.github.com`, GitHub
    /// Enterprise Server or a test fake otherwise).
    #[serde(default)]
    pub api_url: Option<String>,
}

impl AlertChannel {
    /// The GitHub API base URL without a trailing slash.
    pub fn github_api(&self) -> &str {
        self.api_url
            .as_deref()
            .unwrap_or("https://api.github.com")
            .trim_end_matches('/')
    }
}

/// `[[alerts.routes]]`.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct AlertRoute {
    /// Apps it applies to; empty means every alert.
    #[serde(default)]
    pub apps: Vec<AppName>,
    /// Lowest severity it carries (`info`, `warning`, `high`, `critical`; default `info`).
    #[serde(default = "default_min_severity")]
    pub min_severity: crate::Severity,
    /// Channel names.
    pub channels: Vec<String>,
}

fn default_min_severity() -> crate::Severity {
    crate::Severity::Info
}

fn valid_env_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 128
        && !name.starts_with(|c: char| c.is_ascii_digit())
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

/// Whether `url` is an absolute `https://` URL, or `http://` to a loopback
/// host (local fakes, `gantry dev`).
fn valid_api_url(url: &str) -> bool {
    let Ok(parsed) = url::Url::parse(url) else {
        return false;
    };
    let loopback = matches!(
        parsed.host(),
        Some(url::Host::Domain("localhost")) | Some(url::Host::Ipv4(std::net::Ipv4Addr::LOCALHOST))
    );
    parsed.username().is_empty()
        && parsed.password().is_none()
        && parsed.query().is_none()
        && (parsed.scheme() == "https" || (parsed.scheme() == "http" && loopback))
}

impl AlertsConfig {
    fn validate(&self, config: &Config) -> Result<(), String> {
        if self.max_attempts == 0 || self.max_attempts > 20 {
            return Err("alerts.max_attempts: must be 1-20".into());
        }
        if self.timeout.is_zero() || self.timeout > std::time::Duration::from_secs(120) {
            return Err("alerts.timeout: must be 1s-120s".into());
        }
        let mut names = std::collections::BTreeSet::new();
        for (i, c) in self.channels.iter().enumerate() {
            let at = |key: &str| format!("alerts.channels[{i}].{key} (channel {:?})", c.name);
            if AppName::parse(&c.name).is_err() {
                return Err(format!("{}: expected [a-z0-9-]", at("name")));
            }
            if !names.insert(c.name.as_str()) {
                return Err(format!("{}: duplicate channel name", at("name")));
            }
            let (needs, forbids): (&[&str], &[&str]) = match c.kind {
                ChannelKind::Teams | ChannelKind::Slack => {
                    (&["url_env"], &["secret_env", "token_env", "api_url"])
                }
                ChannelKind::Webhook => (&["url_env", "secret_env"], &["token_env", "api_url"]),
                ChannelKind::Github => (&["token_env"], &["url_env", "secret_env"]),
            };
            let value = |key: &str| match key {
                "url_env" => c.url_env.as_deref(),
                "secret_env" => c.secret_env.as_deref(),
                "token_env" => c.token_env.as_deref(),
                _ => c.api_url.as_deref(),
            };
            for key in needs {
                match value(key) {
                    None => {
                        return Err(format!(
                            "{}: a {} channel needs it (the NAME of an environment variable)",
                            at(key),
                            c.kind.as_str()
                        ));
                    }
                    Some(v) if !valid_env_name(v) => {
                        return Err(format!(
                            "{}: {v:?} is not an environment variable name (give the variable's name, never the URL or secret itself)",
                            at(key)
                        ));
                    }
                    Some(_) => {}
                }
            }
            for key in forbids {
                if value(key).is_some() {
                    return Err(format!(
                        "{}: not used by a {} channel",
                        at(key),
                        c.kind.as_str()
                    ));
                }
            }
            if let Some(api) = &c.api_url
                && !valid_api_url(api)
            {
                return Err(format!(
                    "{}: expected an https:// URL (http:// only to localhost), without credentials or query",
                    at("api_url")
                ));
            }
        }
        for (i, r) in self.routes.iter().enumerate() {
            if r.channels.is_empty() {
                return Err(format!(
                    "alerts.routes[{i}].channels: name at least one channel"
                ));
            }
            if let Some(unknown) = r.channels.iter().find(|c| !names.contains(c.as_str())) {
                return Err(format!(
                    "alerts.routes[{i}].channels: unknown channel {unknown:?}"
                ));
            }
            if let Some(unknown) = r.apps.iter().find(|a| config.app(a.as_str()).is_none()) {
                return Err(format!("alerts.routes[{i}].apps: unknown app {unknown:?}"));
            }
        }
        Ok(())
    }
}

/// `[security]`: how Defender for Cloud alerts (queue `security-events`) act.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct SecurityConfig {
    /// At or above this severity an alert naming an image digest blocks that
    /// digest and alerts high (default `high`).
    #[serde(default = "default_security_min_severity")]
    pub min_severity: SecuritySeverity,
    /// ARM ids of the AKS clusters gantry deploys to
    /// (`/subscriptions/…/resourceGroups/…/providers/Microsoft.ContainerService/managedClusters/…`),
    /// compared case-insensitively as ARM ids are. An alert correlates to an
    /// app by namespace only when it names one of these clusters.
    #[serde(default)]
    pub clusters: Vec<String>,
}

impl Default for SecurityConfig {
    fn default() -> Self {
        SecurityConfig {
            min_severity: default_security_min_severity(),
            clusters: Vec::new(),
        }
    }
}

impl SecurityConfig {
    /// The configured cluster that `resource_id` is, or lies under (a node
    /// pool, an extension), compared case-insensitively.
    pub fn cluster_of(&self, resource_id: &str) -> Option<&str> {
        let id = resource_id.trim().trim_end_matches('/');
        self.clusters
            .iter()
            .map(|c| c.trim_end_matches('/'))
            .find(|c| {
                id.len() >= c.len()
                    && id.is_char_boundary(c.len())
                    && id[..c.len()].eq_ignore_ascii_case(c)
                    && (id.len() == c.len() || id.as_bytes()[c.len()] == b'/')
            })
    }
}

fn default_security_min_severity() -> SecuritySeverity {
    SecuritySeverity::High
}

fn default_github_token_env() -> String {
    "GANTRY_GITHUB_TOKEN".into()
}

fn default_github_api_url() -> String {
    "https://api.github.com".into()
}

/// One webhook: a repository hook (`repo`) or an organization hook (`org`).
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct GithubHook {
    /// `owner/name` of a repository hook.
    #[serde(default)]
    pub repo: Option<String>,
    /// Organization login of an organization hook.
    #[serde(default)]
    pub org: Option<String>,
    /// The hook id (Settings → Webhooks → the hook's URL).
    pub id: u64,
}

impl GithubHook {
    /// The hook's API path below the base URL:
    /// `/repos/{owner}/{repo}/hooks/{id}` or `/orgs/{org}/hooks/{id}`.
    /// Only valid after [`Config::parse`] checked the names.
    pub fn api_path(&self) -> String {
        match (&self.repo, &self.org) {
            (Some(repo), _) => format!("/repos/{repo}/hooks/{}", self.id),
            (None, Some(org)) => format!("/orgs/{org}/hooks/{}", self.id),
            (None, None) => format!("/hooks/{}", self.id),
        }
    }

    /// A name for the hook usable in a blob name: `repo-{owner}-{name}-{id}`
    /// or `org-{org}-{id}`, lowercase, `[a-z0-9._-]` only.
    pub fn key(&self) -> String {
        let raw = match (&self.repo, &self.org) {
            (Some(repo), _) => format!("repo-{}-{}", repo.replace('/', "-"), self.id),
            (None, Some(org)) => format!("org-{org}-{}", self.id),
            (None, None) => format!("hook-{}", self.id),
        };
        raw.to_ascii_lowercase()
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || matches!(c, '.' | '-') {
                    c
                } else {
                    '-'
                }
            })
            .collect()
    }
}

/// `[policy]`.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct PolicyConfig {
    /// Folder of extra ConstraintTemplates and Constraints (YAML), relative to this file.
    #[serde(default)]
    pub folder: Option<PathBuf>,
    /// Whether gantry's built-in policies apply.
    #[serde(default = "default_true")]
    pub builtin: bool,
}

impl Default for PolicyConfig {
    fn default() -> Self {
        PolicyConfig {
            folder: None,
            builtin: true,
        }
    }
}

/// Container resources (Kubernetes quantities).
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Resources {
    /// CPU request.
    #[serde(default = "default_cpu_request")]
    pub cpu_request: String,
    /// CPU limit.
    #[serde(default = "default_cpu_limit")]
    pub cpu_limit: String,
    /// Memory request.
    #[serde(default = "default_memory_request")]
    pub memory_request: String,
    /// Memory limit.
    #[serde(default = "default_memory_limit")]
    pub memory_limit: String,
}

impl Default for Resources {
    fn default() -> Self {
        Resources {
            cpu_request: default_cpu_request(),
            cpu_limit: default_cpu_limit(),
            memory_request: default_memory_request(),
            memory_limit: default_memory_limit(),
        }
    }
}

fn default_cpu_request() -> String {
    "100m".into()
}
fn default_cpu_limit() -> String {
    "500m".into()
}
fn default_memory_request() -> String {
    "128Mi".into()
}
fn default_memory_limit() -> String {
    "256Mi".into()
}
fn default_true() -> bool {
    true
}
fn default_source() -> ScanSource {
    ScanSource::Trivy
}
fn default_threshold() -> SeverityLevel {
    SeverityLevel::High
}
fn default_max_wait() -> std::time::Duration {
    std::time::Duration::from_secs(4 * 3600)
}
fn default_health_path() -> String {
    "/healthz".into()
}

/// Parses `90s`, `30m`, `4h`, `2d` (one number, one unit).
pub fn parse_duration(s: &str) -> Result<std::time::Duration, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (n, unit) = s.split_at(split);
    let n: u64 = n
        .parse()
        .map_err(|_| format!("invalid duration {s:?}: expected e.g. 90s, 30m, 4h, 2d"))?;
    let secs = match unit {
        "s" => n,
        "m" => n.saturating_mul(60),
        "h" => n.saturating_mul(3600),
        "d" => n.saturating_mul(86400),
        _ => return Err(format!("invalid duration {s:?}: unit must be s, m, h or d")),
    };
    Ok(std::time::Duration::from_secs(secs))
}

fn de_duration<'de, D: serde::Deserializer<'de>>(d: D) -> Result<std::time::Duration, D::Error> {
    let s = String::deserialize(d)?;
    parse_duration(&s).map_err(serde::de::Error::custom)
}

fn de_duration_opt<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<Option<std::time::Duration>, D::Error> {
    de_duration(d).map(Some)
}

/// Accepts a TOML date (`2026-12-31`) or a string holding one.
fn de_date<'de, D: serde::Deserializer<'de>>(d: D) -> Result<time::Date, D::Error> {
    let value = toml::Value::deserialize(d)?;
    let text = match &value {
        toml::Value::String(s) => s.clone(),
        toml::Value::Datetime(dt) if dt.time.is_none() && dt.offset.is_none() => dt.to_string(),
        other => {
            return Err(serde::de::Error::custom(format!(
                "expected a date like 2026-12-31, got {other}"
            )));
        }
    };
    let format = time::macros::format_description!("[year]-[month]-[day]");
    time::Date::parse(&text, &format)
        .map_err(|e| serde::de::Error::custom(format!("invalid date {text:?}: {e}")))
}

/// One application: a GitHub repository, its image and where it runs.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct AppConfig {
    /// App name: a DNS label, also the default namespace.
    pub name: AppName,
    /// GitHub full name, `owner/repo` (compared case-insensitively, as GitHub does).
    pub repo: String,
    /// Branches whose pushes start a run.
    #[serde(default = "default_branches")]
    pub branches: Vec<String>,
    /// Image as `registry-host/repository`, e.g. `contoso.azurecr.io/web`.
    pub image: String,
    /// Kubernetes namespace; defaults to the app name.
    #[serde(default)]
    pub namespace: Option<AppName>,
    /// Container port.
    #[serde(default = "default_port")]
    pub port: u16,
    /// Desired replicas.
    #[serde(default = "default_replicas")]
    pub replicas: u32,
    /// Whether a run waits for an operator's approval before deploying.
    #[serde(default)]
    pub require_approval: bool,
    /// How long an approval may wait, from when the approval step was created;
    /// approving later answers 409 `approval_expired` and blocks the run (default `24h`).
    #[serde(default = "default_approval_expiry", deserialize_with = "de_duration")]
    pub approval_expiry: std::time::Duration,
    /// Names of the GitHub Actions workflows that build the image; a failed run
    /// of one of them fails the commit's run. Empty: any workflow run for a
    /// push to a tracked branch.
    #[serde(default)]
    pub ci_workflows: Vec<String>,
    /// Scan overrides (`[apps.scan]`).
    #[serde(default)]
    pub scan: AppScan,
    /// Container resources (`[apps.resources]`).
    #[serde(default)]
    pub resources: Resources,
    /// HTTP path of the liveness and readiness probes.
    #[serde(default = "default_health_path")]
    pub health_path: String,
    /// Environment variables of the container (never secrets: those belong in
    /// Key Vault / Kubernetes secrets, not in gantry.toml).
    #[serde(default)]
    pub env: std::collections::BTreeMap<String, String>,
    /// Whether a Defender alert at or above `[security] min_severity` about
    /// the digest this app runs rolls the app back to its previous good
    /// digest (through the deploy step). Opt-in: default `false`.
    #[serde(default)]
    pub rollback_on_security_alert: bool,
    /// Labels added to every object gantry renders for the app (`[apps.labels]`,
    /// e.g. `owner = "team-a"`), typically what `[governance] required_labels`
    /// asks for. gantry's own labels cannot be overridden.
    #[serde(default)]
    pub labels: crate::governance::AppLabels,
    /// How the app is reached (`[apps.expose]`; default: ClusterIP only).
    #[serde(default)]
    pub expose: crate::exposure::ExposeConfig,
    /// Confirms `expose.mode = "public-lb"`: the app is reachable from the
    /// internet. Rendered as the `gantry.dev/allow-public` Service annotation
    /// the `public-lb` built-in policy looks for.
    #[serde(default)]
    pub allow_public: bool,
    /// Key Vault secrets mounted as files (`[apps.keyvault]`).
    #[serde(default)]
    pub keyvault: Option<crate::exposure::KeyVaultConfig>,
    /// Declared egress (`[apps.egress]`); everything else is denied.
    #[serde(default)]
    pub egress: crate::exposure::EgressConfig,
}

fn default_branches() -> Vec<String> {
    vec!["main".to_string()]
}
fn default_approval_expiry() -> std::time::Duration {
    std::time::Duration::from_secs(24 * 3600)
}
fn default_port() -> u16 {
    8080
}
fn default_replicas() -> u32 {
    2
}

impl AppConfig {
    /// The namespace the app deploys to.
    pub fn namespace(&self) -> &AppName {
        self.namespace.as_ref().unwrap_or(&self.name)
    }

    /// `(registry host, repository)` of the configured image.
    pub fn image_parts(&self) -> (&str, &str) {
        self.image.split_once('/').unwrap_or(("", &self.image))
    }

    /// Whether a push to `git_ref` (`refs/heads/...`) should start a run.
    pub fn tracks_ref(&self, git_ref: &str) -> bool {
        git_ref
            .strip_prefix("refs/heads/")
            .is_some_and(|branch| self.branches.iter().any(|b| b == branch))
    }
}

/// The example configuration `gantry dev` uses when no file is given.
pub const EMBEDDED_EXAMPLE: &str = include_str!("../../../gantry.toml");

impl Config {
    /// Parses and validates configuration text; `origin` names it in errors.
    pub fn parse(text: &str, origin: &str) -> Result<Config, PipelineError> {
        let invalid = |message: String| PipelineError::ParseConfig {
            path: origin.to_string(),
            message,
        };
        let config: Config = toml::from_str(text).map_err(|e| invalid(e.to_string()))?;
        let mut seen_names = std::collections::BTreeSet::new();
        let mut seen_images = std::collections::BTreeSet::new();
        for (i, app) in config.apps.iter().enumerate() {
            let at = |key: &str| format!("apps[{i}].{key} (app {:?})", app.name.as_str());
            if !seen_names.insert(app.name.clone()) {
                return Err(invalid(format!("{}: duplicate app name", at("name"))));
            }
            if !valid_repo(&app.repo) {
                return Err(invalid(format!(
                    "{}: expected GitHub `owner/name` of [A-Za-z0-9._-]",
                    at("repo")
                )));
            }
            if app.branches.is_empty() || app.branches.iter().any(|b| !valid_branch(b)) {
                return Err(invalid(format!(
                    "{}: expected a non-empty list of branch names",
                    at("branches")
                )));
            }
            if !valid_image(&app.image) {
                return Err(invalid(format!(
                    "{}: expected `registry-host/repository` in lowercase, without tag or digest",
                    at("image")
                )));
            }
            if !seen_images.insert(app.image.clone()) {
                return Err(invalid(format!(
                    "{}: image already used by another app",
                    at("image")
                )));
            }
            if app.port == 0 {
                return Err(invalid(format!("{}: must be 1-65535", at("port"))));
            }
            if app.replicas == 0 || app.replicas > 100 {
                return Err(invalid(format!("{}: must be 1-100", at("replicas"))));
            }
            if !app.health_path.starts_with('/')
                || app.health_path.len() > 200
                || !app.health_path.bytes().all(|b| b.is_ascii_graphic())
            {
                return Err(invalid(format!(
                    "{}: must be an absolute URL path",
                    at("health_path")
                )));
            }
            for (key, q) in [
                ("resources.cpu_request", &app.resources.cpu_request),
                ("resources.cpu_limit", &app.resources.cpu_limit),
                ("resources.memory_request", &app.resources.memory_request),
                ("resources.memory_limit", &app.resources.memory_limit),
            ] {
                if !valid_quantity(q) {
                    return Err(invalid(format!(
                        "{}: {q:?} is not a Kubernetes quantity",
                        at(key)
                    )));
                }
            }
            for name in app.env.keys() {
                let ok = !name.is_empty()
                    && name.len() <= 128
                    && !name.starts_with(|c: char| c.is_ascii_digit())
                    && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
                if !ok {
                    return Err(invalid(format!(
                        "{}: {name:?} is not a valid variable name",
                        at("env")
                    )));
                }
            }
            crate::exposure::validate(
                &app.expose,
                app.allow_public,
                app.keyvault.as_ref(),
                &app.egress,
                &app.env,
            )
            .map_err(|(field, message)| invalid(format!("{}: {message}", at(field))))?;
        }
        if let Some(id) = &config.deploy.aks_cluster {
            check_aks_cluster_id(id).map_err(|e| invalid(format!("deploy.aks_cluster: {e}")))?;
        }
        let arm = &config.deploy.arm_endpoint;
        let loopback = arm.starts_with("http://127.0.0.1:") || arm.starts_with("http://localhost:");
        if !(arm.starts_with("https://") || loopback) || arm.len() > 200 {
            return Err(invalid(format!(
                "deploy.arm_endpoint: {arm:?} must be an https:// URL"
            )));
        }
        let api = &config.github.api_url;
        let loopback = api.starts_with("http://127.0.0.1:") || api.starts_with("http://localhost:");
        if !(api.starts_with("https://") || loopback) || api.len() > 200 || api.contains(['?', '#'])
        {
            return Err(invalid(format!(
                "github.api_url: {api:?} must be an https:// URL without query"
            )));
        }
        let env = &config.github.token_env;
        if env.is_empty()
            || env.len() > 128
            || !env.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
        {
            return Err(invalid(format!(
                "github.token_env: {env:?} is not an environment variable name"
            )));
        }
        let mut seen_hooks = std::collections::BTreeSet::new();
        for (i, hook) in config.github.hooks.iter().enumerate() {
            match (&hook.repo, &hook.org) {
                // `.`/`..` would change the API path the token is sent to.
                (Some(repo), None)
                    if valid_repo(repo) && !repo.split('/').any(|p| p == "." || p == "..") => {}
                (None, Some(org)) if valid_login(org) => {}
                (Some(_), Some(_)) | (None, None) => {
                    return Err(invalid(format!(
                        "github.hooks[{i}]: give exactly one of repo (owner/name) or org"
                    )));
                }
                _ => {
                    return Err(invalid(format!(
                        "github.hooks[{i}]: repo must be owner/name, org a GitHub login ([A-Za-z0-9-])"
                    )));
                }
            }
            if hook.id == 0 {
                return Err(invalid(format!("github.hooks[{i}].id: must be positive")));
            }
            if !seen_hooks.insert(hook.key()) {
                return Err(invalid(format!("github.hooks[{i}]: duplicate hook")));
            }
        }
        for (i, entry) in config.scan.allow.iter().enumerate() {
            if entry.id.is_empty()
                || entry.id.len() > 100
                || !entry
                    .id
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
            {
                return Err(invalid(format!(
                    "scan.allow[{i}].id: {:?} is not a vulnerability id",
                    entry.id
                )));
            }
            if entry.reason.trim().is_empty() {
                return Err(invalid(format!(
                    "scan.allow[{i}].reason: an accepted vulnerability needs a reason"
                )));
            }
            if let Some(unknown) = entry.apps.iter().find(|a| config.app(a.as_str()).is_none()) {
                return Err(invalid(format!(
                    "scan.allow[{i}].apps: unknown app {unknown:?}"
                )));
            }
        }
        let uses_defender = config.scan.source == ScanSource::Defender
            || config
                .apps
                .iter()
                .any(|a| a.scan.source == Some(ScanSource::Defender));
        if uses_defender && config.scan.defender.subscriptions.is_empty() {
            return Err(invalid(
                "scan.defender.subscriptions: the defender source needs at least one subscription"
                    .into(),
            ));
        }
        config.alerts.validate(&config).map_err(invalid)?;
        crate::governance::check(&config).map_err(invalid)?;
        let mut seen_clusters = std::collections::BTreeSet::new();
        for (i, cluster) in config.security.clusters.iter().enumerate() {
            check_aks_cluster_id(cluster)
                .map_err(|e| invalid(format!("security.clusters[{i}]: {e}")))?;
            if !seen_clusters.insert(cluster.to_ascii_lowercase()) {
                return Err(invalid(format!(
                    "security.clusters[{i}]: {cluster:?} is listed twice"
                )));
            }
        }
        Ok(config)
    }

    /// Reads and validates a configuration file.
    pub fn load(path: &std::path::Path) -> Result<Config, PipelineError> {
        let text = std::fs::read_to_string(path).map_err(|e| PipelineError::ReadConfig {
            path: path.display().to_string(),
            message: e.to_string(),
        })?;
        let mut config = Config::parse(&text, &path.display().to_string())?;
        config.base_dir = path.parent().map(|p| {
            if p.as_os_str().is_empty() {
                PathBuf::from(".")
            } else {
                p.to_path_buf()
            }
        });
        Ok(config)
    }

    /// The scan settings in force for `app` (`[apps.scan]` over `[scan]`).
    pub fn scan_settings(&self, app: &AppConfig) -> ScanSettings {
        ScanSettings {
            source: app.scan.source.unwrap_or(self.scan.source),
            threshold: app.scan.threshold.unwrap_or(self.scan.threshold),
            ignore_unfixed: app.scan.ignore_unfixed.unwrap_or(self.scan.ignore_unfixed),
            max_wait: app.scan.max_wait.unwrap_or(self.scan.max_wait),
        }
    }

    /// Resolves a configured path against the configuration file's directory.
    pub fn resolve(&self, path: &std::path::Path) -> PathBuf {
        match &self.base_dir {
            Some(base) if path.is_relative() => base.join(path),
            _ => path.to_path_buf(),
        }
    }

    /// The folder the `directory` target writes `app`'s manifests to:
    /// `<[deploy] dir>/<app>/`, the dir resolved against this file's folder
    /// (`gantry dev` sets it to `<state>/deploy`).
    pub fn deploy_dir(&self, app: &AppName) -> PathBuf {
        self.resolve(
            self.deploy
                .dir
                .as_deref()
                .unwrap_or(std::path::Path::new("deploy")),
        )
        .join(app.as_str())
    }

    /// Looks an app up by name.
    pub fn app(&self, name: &str) -> Option<&AppConfig> {
        self.apps.iter().find(|a| a.name.as_str() == name)
    }

    /// Apps built from the GitHub repository `full_name` (one repo may hold several).
    pub fn apps_for_repo<'a>(&'a self, full_name: &'a str) -> impl Iterator<Item = &'a AppConfig> {
        self.apps
            .iter()
            .filter(move |a| a.repo.eq_ignore_ascii_case(full_name))
    }

    /// The app whose image is `registry/repository` (registry host compared
    /// case-insensitively; repositories are lowercase by OCI rule).
    pub fn app_for_image(&self, registry: &str, repository: &str) -> Option<&AppConfig> {
        self.apps.iter().find(|a| {
            let (host, repo) = a.image_parts();
            host.eq_ignore_ascii_case(registry) && repo == repository
        })
    }
}

/// A Kubernetes resource quantity as gantry accepts it: digits with an optional
/// fraction and one of the usual suffixes (`100m`, `0.5`, `128Mi`, `1G`).
fn valid_quantity(v: &str) -> bool {
    let split = v
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(v.len());
    let (number, suffix) = v.split_at(split);
    !number.is_empty()
        && number.parse::<f64>().is_ok()
        && matches!(
            suffix,
            "" | "m" | "k" | "M" | "G" | "T" | "Ki" | "Mi" | "Gi" | "Ti"
        )
}

fn valid_repo(v: &str) -> bool {
    let ok = |s: &str| {
        !s.is_empty()
            && s.len() <= 100
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
    };
    matches!(v.split_once('/'), Some((owner, name)) if ok(owner) && ok(name))
}

fn valid_login(v: &str) -> bool {
    !v.is_empty()
        && v.len() <= 39
        && !v.starts_with('-')
        && v.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
}

fn valid_branch(v: &str) -> bool {
    !v.is_empty()
        && v.len() <= 255
        && !v.contains("..")
        && v.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-' | b'/'))
}

fn valid_image(v: &str) -> bool {
    let Some((host, repo)) = v.split_once('/') else {
        return false;
    };
    let host_ok = !host.is_empty()
        && host.bytes().all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'-' | b':')
        });
    let repo_ok = !repo.is_empty()
        && repo.split('/').all(|seg| {
            !seg.is_empty()
                && seg.bytes().all(|b| {
                    b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'_' | b'-')
                })
        });
    host_ok && repo_ok
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
[[apps]]
name = "web"
repo = "contoso/web"
image = "contoso.azurecr.io/web"
"#;

    #[test]
    fn embedded_example_is_valid() {
        let c = Config::parse(EMBEDDED_EXAMPLE, "gantry.toml").expect("example parses");
        assert!(!c.apps.is_empty());
    }

    #[test]
    fn github_hooks_are_checked() {
        let c = Config::parse(GOOD, "t").expect("parses");
        assert_eq!(c.github.token_env, "GANTRY_GITHUB_TOKEN");
        assert_eq!(c.github.api_url, "https://api.github.com");
        assert!(c.github.hooks.is_empty());
        let text = format!(
            "{GOOD}\n[github]\napi_url = \"http://127.0.0.1:9/api\"\n[[github.hooks]]\nrepo = \"contoso/web\"\nid = 123\n[[github.hooks]]\norg = \"Contoso\"\nid = 7\n"
        );
        let c = Config::parse(&text, "t").expect("parses");
        assert_eq!(c.github.hooks[0].api_path(), "/repos/contoso/web/hooks/123");
        assert_eq!(c.github.hooks[0].key(), "repo-contoso-web-123");
        assert_eq!(c.github.hooks[1].api_path(), "/orgs/Contoso/hooks/7");
        assert_eq!(c.github.hooks[1].key(), "org-contoso-7");
        for (bad, needle) in [
            ("[[github.hooks]]\nid = 1\n", "exactly one of repo"),
            (
                "[[github.hooks]]\nrepo = \"a/b\"\norg = \"a\"\nid = 1\n",
                "exactly one",
            ),
            ("[[github.hooks]]\nrepo = \"../x\"\nid = 1\n", "owner/name"),
            ("[[github.hooks]]\nrepo = \"a/b\"\nid = 0\n", "positive"),
            (
                "[[github.hooks]]\nrepo = \"a/b\"\nid = 1\nsecret = 1\n",
                "unknown field",
            ),
            ("[github]\napi_url = \"http://example.com\"\n", "api_url"),
            ("[github]\ntoken_env = \"A B\"\n", "token_env"),
        ] {
            let err = Config::parse(&format!("{GOOD}\n{bad}"), "t").expect_err(bad);
            assert!(err.to_string().contains(needle), "{bad}: {err}");
        }
    }

    #[test]
    fn defaults_apply() {
        let c = Config::parse(GOOD, "t").expect("parses");
        let app = &c.apps[0];
        assert_eq!(app.branches, vec!["main"]);
        assert_eq!(app.namespace().as_str(), "web");
        assert_eq!(app.port, 8080);
        assert!(app.tracks_ref("refs/heads/main"));
        assert!(!app.tracks_ref("refs/tags/main"));
        assert!(c.apps_for_repo("Contoso/Web").count() == 1);
        assert!(c.app_for_image("CONTOSO.azurecr.io", "web").is_some());
        assert!(c.app_for_image("contoso.azurecr.io", "api").is_none());
    }

    #[test]
    fn deploy_target_kubernetes_and_verify_timing() {
        let c = Config::parse(GOOD, "t").expect("parses");
        assert_eq!(c.deploy.target, DeployTarget::Directory);
        assert_eq!(
            c.deploy.verify_deadline,
            std::time::Duration::from_secs(600)
        );
        assert_eq!(c.deploy.verify_interval, std::time::Duration::from_secs(15));
        let text = format!(
            "{GOOD}\n[deploy]\ntarget = \"kubernetes\"\nverify_deadline = \"5m\"\nverify_interval = \"10s\"\n"
        );
        let c = Config::parse(&text, "t").expect("parses");
        assert_eq!(c.deploy.target, DeployTarget::Kubernetes);
        assert_eq!(
            c.deploy.verify_deadline,
            std::time::Duration::from_secs(300)
        );
        assert_eq!(c.deploy.verify_interval, std::time::Duration::from_secs(10));
        let text = format!("{GOOD}\n[deploy]\nverify_interval = \"soon\"\n");
        assert!(Config::parse(&text, "t").is_err());
    }

    #[test]
    fn security_section() {
        let c = Config::parse(GOOD, "t").expect("parses");
        assert_eq!(c.security.min_severity, SecuritySeverity::High);
        assert!(c.security.clusters.is_empty());
        assert!(!c.apps[0].rollback_on_security_alert);
        let text = format!(
            "{GOOD}rollback_on_security_alert = true\n\n[security]\nmin_severity = \"medium\"\nclusters = [\"/subscriptions/7d3f2a51-9c4e-4b8a-a1f6-2e5c8b9d0f13/resourceGroups/rg-prod/providers/Microsoft.ContainerService/managedClusters/aks-prod\"]\n"
        );
        let c = Config::parse(&text, "t").expect("parses");
        assert!(c.apps[0].rollback_on_security_alert);
        assert_eq!(c.security.min_severity, SecuritySeverity::Medium);
        assert!(SecuritySeverity::High > SecuritySeverity::Medium);
        let upper = "/SUBSCRIPTIONS/7D3F2A51-9C4E-4B8A-A1F6-2E5C8B9D0F13/resourcegroups/RG-PROD/providers/microsoft.containerservice/managedclusters/AKS-PROD";
        assert!(c.security.cluster_of(upper).is_some());
        assert!(
            c.security
                .cluster_of(&format!("{upper}/agentPools/np1"))
                .is_some()
        );
        assert!(c.security.cluster_of(&format!("{upper}2")).is_none());
        assert!(
            c.security
                .cluster_of("/subscriptions/7d3f2a51-9c4e-4b8a-a1f6-2e5c8b9d0f13")
                .is_none()
        );
        let twice = text.replace(
            "clusters = [\"/subscriptions/7d3f2a51-9c4e-4b8a-a1f6-2e5c8b9d0f13/resourceGroups/rg-prod/providers/Microsoft.ContainerService/managedClusters/aks-prod\"]",
            "clusters = [\"/subscriptions/7d3f2a51-9c4e-4b8a-a1f6-2e5c8b9d0f13/resourceGroups/rg-prod/providers/Microsoft.ContainerService/managedClusters/aks-prod\", \"/subscriptions/7d3f2a51-9c4e-4b8a-a1f6-2e5c8b9d0f13/resourcegroups/rg-prod/providers/Microsoft.ContainerService/managedClusters/AKS-prod\"]",
        );
        let err = Config::parse(&twice, "t").unwrap_err().to_string();
        assert!(err.contains("listed twice"), "{err}");
    }

    #[test]
    fn aks_cluster_is_a_resource_id() {
        let id = "/subscriptions/00000000-1111-2222-3333-444444444444/resourceGroups/rg-prod/providers/Microsoft.ContainerService/managedClusters/aks-prod";
        let text = format!("{GOOD}\n[deploy]\ntarget = \"kubernetes\"\naks_cluster = \"{id}\"\n");
        let c = Config::parse(&text, "t").expect("parses");
        assert_eq!(c.deploy.aks_cluster.as_deref(), Some(id));
        assert_eq!(c.deploy.arm_endpoint, "https://management.azure.com");
        for bad in [
            id.replace("aks-prod", "../x"),
            id.replace("managedClusters", "virtualMachines"),
            id.replace("00000000-1111", "zz"),
            format!("{id}/extra"),
            "aks-prod".into(),
        ] {
            let text = format!("{GOOD}\n[deploy]\naks_cluster = \"{bad}\"\n");
            let err = Config::parse(&text, "t").unwrap_err().to_string();
            assert!(err.contains("deploy.aks_cluster"), "{bad}: {err}");
        }
        let text = format!("{GOOD}\n[deploy]\narm_endpoint = \"http://evil.example\"\n");
        let err = Config::parse(&text, "t").unwrap_err().to_string();
        assert!(err.contains("deploy.arm_endpoint"), "{err}");
    }

    #[test]
    fn unknown_key_is_named() {
        let text = format!("{GOOD}require_aproval = true\n");
        let err = Config::parse(&text, "gantry.toml").unwrap_err().to_string();
        assert!(err.contains("require_aproval"), "{err}");
        assert!(err.contains("gantry.toml"), "{err}");
        let err = Config::parse("[dev]\nx = 1\n", "g")
            .unwrap_err()
            .to_string();
        assert!(err.contains("dev"), "{err}");
    }

    #[test]
    fn bad_values_are_named() {
        for (bad, key) in [
            (
                GOOD.replace("\"web\"\nrepo", "\"Web\"\nrepo"),
                "invalid app name",
            ),
            (GOOD.replace("contoso/web\"", "contoso\""), "apps[0].repo"),
            (
                GOOD.replace("azurecr.io/web", "azurecr.io/web:latest"),
                "apps[0].image",
            ),
            (format!("{GOOD}branches = []\n"), "apps[0].branches"),
            (format!("{GOOD}port = 0\n"), "apps[0].port"),
            (format!("{GOOD}{GOOD}"), "duplicate app name"),
        ] {
            let err = Config::parse(&bad, "g").unwrap_err().to_string();
            assert!(err.contains(key), "expected {key:?} in {err}");
        }
    }

    #[test]
    fn scan_settings_and_allow_list() {
        let text = format!(
            "{GOOD}[apps.scan]\nthreshold = \"critical\"\nmax_wait = \"30m\"\n\n[scan]\nignore_unfixed = true\n\n[[scan.allow]]\nid = \"CVE-2024-3094\"\napps = [\"web\"]\nexpires = 2026-12-31\nreason = \"not reachable\"\n\n[[scan.allow]]\nid = \"GHSA-xxxx-yyyy\"\nexpires = \"2027-01-15\"\nreason = \"vendor fix pending\"\n"
        );
        let c = Config::parse(&text, "g").expect("parses");
        let s = c.scan_settings(&c.apps[0]);
        assert_eq!(s.threshold, SeverityLevel::Critical);
        assert_eq!(s.max_wait, std::time::Duration::from_secs(1800));
        assert!(s.ignore_unfixed);
        assert_eq!(s.source, ScanSource::Trivy);
        assert_eq!(c.scan.allow[0].expires, time::macros::date!(2026 - 12 - 31));
        assert_eq!(c.scan.allow[1].expires, time::macros::date!(2027 - 01 - 15));
        assert!(c.scan.allow[1].apps.is_empty());
    }

    #[test]
    fn gate_settings_are_validated_by_name() {
        for (bad, key) in [
            (
                format!("{GOOD}[apps.scan]\nmax_wait = \"4 hours\"\n"),
                "max_wait",
            ),
            (
                format!("{GOOD}[apps.scan]\nthreshold = \"severe\"\n"),
                "threshold",
            ),
            (
                format!(
                    "{GOOD}[[scan.allow]]\nid = \"CVE-1\"\nexpires = 2026-13-01\nreason = \"x\"\n"
                ),
                "expires",
            ),
            (
                format!(
                    "{GOOD}[[scan.allow]]\nid = \"CVE-1\"\nexpires = 2026-12-01\nreason = \" \"\n"
                ),
                "scan.allow[0].reason",
            ),
            (
                format!(
                    "{GOOD}[[scan.allow]]\nid = \"CVE-1\"\napps = [\"nope\"]\nexpires = 2026-12-01\nreason = \"r\"\n"
                ),
                "unknown app",
            ),
            (
                format!("{GOOD}[scan]\nsource = \"defender\"\n"),
                "scan.defender.subscriptions",
            ),
            (
                format!("{GOOD}[apps.resources]\ncpu_limit = \"lots\"\n"),
                "resources.cpu_limit",
            ),
            (
                format!("{GOOD}[apps.env]\n\"BAD-NAME\" = \"x\"\n"),
                "apps[0].env",
            ),
            (format!("{GOOD}health_path = \"healthz\"\n"), "health_path"),
            (format!("{GOOD}[policy]\nfolders = \"p\"\n"), "folders"),
            (
                format!("{GOOD}[security]\nmin_severity = \"critical\"\n"),
                "min_severity",
            ),
            (
                format!("{GOOD}[security]\nclusters = [\"aks-prod\"]\n"),
                "security.clusters[0]",
            ),
            (
                format!(
                    "{GOOD}[security]\nclusters = [\"/subscriptions/s/resourceGroups/rg/providers/Microsoft.Compute/virtualMachines/vm\"]\n"
                ),
                "security.clusters[0]",
            ),
            (
                format!("{GOOD}[security]\nmin_severty = \"high\"\n"),
                "min_severty",
            ),
            (
                format!("{GOOD}rollback_on_security_alerts = true\n"),
                "rollback_on_security_alerts",
            ),
        ] {
            let err = Config::parse(&bad, "g").unwrap_err().to_string();
            assert!(err.contains(key), "expected {key:?} in {err}");
        }
        assert_eq!(
            parse_duration("2d"),
            Ok(std::time::Duration::from_secs(172_800))
        );
    }

    const ALERTS: &str = r#"
[[apps]]
name = "api"
repo = "contoso/api"
image = "contoso.azurecr.io/api"

[alerts]
dedup_window = "30m"
max_attempts = 3

[[alerts.channels]]
name = "ops"
kind = "teams"
url_env = "GANTRY_ALERT_TEAMS_URL"

[[alerts.channels]]
name = "hook"
kind = "webhook"
url_env = "HOOK_URL"
secret_env = "HOOK_SECRET"

[[alerts.channels]]
name = "gh"
kind = "github"
token_env = "GH_TOKEN"
api_url = "http://127.0.0.1:8080/api/v3/"

[[alerts.routes]]
apps = ["web"]
min_severity = "high"
channels = ["ops", "gh"]

[[alerts.routes]]
channels = ["hook"]
min_severity = "warning"
"#;

    #[test]
    fn alerts_parse_and_route_by_app_and_severity() {
        use crate::Severity;
        let c = Config::parse(&format!("{GOOD}{ALERTS}"), "g").expect("parses");
        let a = &c.alerts;
        assert_eq!(a.dedup_window, std::time::Duration::from_secs(1800));
        assert_eq!(a.max_attempts, 3);
        assert_eq!(a.timeout, std::time::Duration::from_secs(10));
        assert_eq!(
            a.channel("gh").map(|g| g.github_api()),
            Some("http://127.0.0.1:8080/api/v3")
        );
        let names = |app: Option<&str>, sev| -> Vec<String> {
            let app = app.map(|n| AppName::parse(n).expect("valid"));
            a.route(app.as_ref(), sev)
                .into_iter()
                .map(|c| c.name.clone())
                .collect()
        };
        assert_eq!(
            names(Some("web"), Severity::Critical),
            ["ops", "hook", "gh"]
        );
        assert_eq!(names(Some("web"), Severity::Warning), ["hook"]);
        assert_eq!(names(Some("api"), Severity::Critical), ["hook"]);
        assert_eq!(names(None, Severity::High), ["hook"]);
        assert!(names(Some("web"), Severity::Info).is_empty());
        let env: Vec<&str> = a.env_names().collect();
        assert_eq!(
            env,
            [
                "GANTRY_ALERT_TEAMS_URL",
                "HOOK_URL",
                "HOOK_SECRET",
                "GH_TOKEN"
            ]
        );
        let none = Config::parse(GOOD, "g").expect("parses");
        assert!(none.alerts.route(None, Severity::Critical).is_empty());
        assert_eq!(
            none.alerts.channel("x").map(|c| c.github_api()),
            None::<&str>
        );
    }

    #[test]
    fn alert_settings_are_validated_by_name() {
        let base = format!("{GOOD}{ALERTS}");
        for (bad, key) in [
            (
                base.replace("max_attempts = 3", "max_attempt = 3"),
                "max_attempt",
            ),
            (
                base.replace("max_attempts = 3", "max_attempts = 0"),
                "alerts.max_attempts",
            ),
            (
                base.replace("dedup_window = \"30m\"", "dedup_window = \"soon\""),
                "dedup_window",
            ),
            (
                base.replace("url_env = \"HOOK_URL\"", "url = \"HOOK_URL\""),
                "url",
            ),
            (
                base.replace("\"GANTRY_ALERT_TEAMS_URL\"", "\"https://x.example/hook\""),
                "alerts.channels[0].url_env",
            ),
            (
                base.replace("secret_env = \"HOOK_SECRET\"\n", ""),
                "alerts.channels[1].secret_env",
            ),
            (
                base.replace("token_env = \"GH_TOKEN\"", "url_env = \"GH_TOKEN\""),
                "alerts.channels[2]",
            ),
            (
                base.replace("http://127.0.0.1:8080", "http://github.internal"),
                "alerts.channels[2].api_url",
            ),
            (
                base.replace("kind = \"teams\"", "kind = \"email\""),
                "email",
            ),
            (
                base.replace("name = \"hook\"", "name = \"ops\""),
                "duplicate channel",
            ),
            (
                base.replace("[\"ops\", \"gh\"]", "[\"ops\", \"pager\"]"),
                "unknown channel \"pager\"",
            ),
            (
                base.replace("apps = [\"web\"]", "apps = [\"shop\"]"),
                "alerts.routes[0].apps",
            ),
            (
                base.replace("min_severity = \"high\"", "min_severity = \"urgent\""),
                "urgent",
            ),
        ] {
            let err = Config::parse(&bad, "g").unwrap_err().to_string();
            assert!(err.contains(key), "expected {key:?} in {err}");
        }
    }
}
