//! `gantry.toml`: which repositories and images gantry delivers, and how.
//!
//! Unknown keys are an error that names the key (a typo in a security setting
//! must never be silently ignored).

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
}

fn default_branches() -> Vec<String> {
    vec!["main".to_string()]
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
        }
        Ok(config)
    }

    /// Reads and validates a configuration file.
    pub fn load(path: &std::path::Path) -> Result<Config, PipelineError> {
        let text = std::fs::read_to_string(path).map_err(|e| PipelineError::ReadConfig {
            path: path.display().to_string(),
            message: e.to_string(),
        })?;
        Config::parse(&text, &path.display().to_string())
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

fn valid_repo(v: &str) -> bool {
    let ok = |s: &str| {
        !s.is_empty()
            && s.len() <= 100
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
    };
    matches!(v.split_once('/'), Some((owner, name)) if ok(owner) && ok(name))
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
}
