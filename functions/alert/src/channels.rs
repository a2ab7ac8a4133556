//! The four channel kinds: what each one is sent, and how its answer is read.
//!
//! Destinations come from `gantry.toml` and the environment only. The URL,
//! token and signing secret are credentials: they never appear in an error,
//! a log line, a record or a notification. Errors from the HTTP client carry
//! the URL, so it is stripped (`without_url`), and any text an endpoint sends
//! back is scrubbed of the channel's secrets before it is kept.

use gantry_pipeline::config::{AlertChannel, ChannelKind};
use gantry_pipeline::run::steps;
use gantry_pipeline::{Alert, Run, Severity};
use gantry_runtime::{Deps, Secret};
use serde_json::{Value, json};

/// `X-GitHub-Api-Version` sent with every GitHub request.
pub const GITHUB_API_VERSION: &str = "2022-11-28";

/// Longest commit-status description GitHub accepts.
const GITHUB_DESCRIPTION_MAX: usize = 140;

/// What one notification says, whatever the channel.
#[derive(Debug, Clone)]
pub struct Notice<'a> {
    /// The alert.
    pub alert: &'a Alert,
    /// The run it is about, as recorded (for the commit and repository).
    pub run: Option<&'a Run>,
    /// The fingerprint (`alerts/{fingerprint}.json`).
    pub fingerprint: &'a str,
    /// Stable id of this notification (fingerprint and window), the same on
    /// every retry, so a receiver can drop repeats.
    pub delivery: &'a str,
    /// Alerts with this fingerprint in the window so far.
    pub count: u32,
    /// The environment a deployment is recorded in (the app's namespace).
    pub environment: Option<&'a str>,
}

/// A channel delivery that did not get through.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Failure {
    /// May succeed later (timeout, connection refused, 5xx, 408, 429).
    Transient(String),
    /// Will not succeed by retrying (4xx, a missing variable, a bad URL).
    Permanent(String),
}

impl Failure {
    /// The reason, without secrets.
    pub fn reason(&self) -> &str {
        match self {
            Failure::Transient(r) | Failure::Permanent(r) => r,
        }
    }
}

/// What a channel did with a notice.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Delivered {
    /// Accepted.
    Sent,
    /// Not applicable (e.g. GitHub without a commit); the reason is recorded.
    Skipped(String),
}

/// Sends `notice` on `channel`.
pub async fn send(
    deps: &Deps,
    channel: &AlertChannel,
    notice: &Notice<'_>,
) -> Result<Delivered, Failure> {
    match channel.kind {
        ChannelKind::Teams => {
            let url = url_of(deps, channel)?;
            let body = teams_body(notice);
            post(deps, channel, &url, &body, &[], &[]).await?;
            Ok(Delivered::Sent)
        }
        ChannelKind::Slack => {
            let url = url_of(deps, channel)?;
            let body = slack_body(notice);
            post(deps, channel, &url, &body, &[], &[]).await?;
            Ok(Delivered::Sent)
        }
        ChannelKind::Webhook => {
            let url = url_of(deps, channel)?;
            let secret = secret_of(deps, channel, channel.secret_env.as_deref())?;
            let body = serde_json::to_vec(&webhook_body(notice))
                .map_err(|e| Failure::Permanent(format!("encoding the body: {e}")))?;
            let signature = gantry_runtime::signature::sign_sha256(secret.expose(), &body);
            let headers = [
                ("x-gantry-event", "alert".to_string()),
                ("x-gantry-delivery", notice.delivery.to_string()),
                ("x-gantry-signature-256", signature),
            ];
            post_bytes(deps, channel, &url, body, &headers, &[secret.expose()]).await?;
            Ok(Delivered::Sent)
        }
        ChannelKind::Github => github(deps, channel, notice).await,
    }
}

/// `[SEVERITY] kind (app)`: the first line of every notification.
pub fn title(alert: &Alert) -> String {
    let severity = match alert.severity {
        Severity::Info => "INFO",
        Severity::Warning => "WARNING",
        Severity::High => "HIGH",
        Severity::Critical => "CRITICAL",
    };
    match &alert.app {
        Some(app) => format!("[{severity}] {} ({app})", alert.kind),
        None => format!("[{severity}] {}", alert.kind),
    }
}

/// The facts shown under the reason, in order; only those that are known.
pub fn facts(notice: &Notice<'_>) -> Vec<(&'static str, String)> {
    let a = notice.alert;
    let mut out = Vec::new();
    if let Some(app) = &a.app {
        out.push(("App", app.to_string()));
    }
    if let Some(step) = &a.step {
        out.push(("Step", step.clone()));
    }
    if let Some(run) = &a.run_id {
        out.push(("Run", run.to_string()));
    }
    if let Some(digest) = &a.digest {
        out.push(("Digest", digest.to_string()));
    }
    if let Some(run) = notice.run {
        if let Some(repo) = &run.source.repo {
            out.push(("Repository", repo.clone()));
        }
        if let Some(commit) = &run.source.commit {
            out.push(("Commit", commit.to_string()));
        }
    }
    out
}

/// The Teams Workflows webhook body: a message with one Adaptive Card.
pub fn teams_body(notice: &Notice<'_>) -> Value {
    let color = match notice.alert.severity {
        Severity::Info => "Good",
        Severity::Warning => "Warning",
        Severity::High | Severity::Critical => "Attention",
    };
    let facts: Vec<Value> = facts(notice)
        .into_iter()
        .map(|(title, value)| json!({"title": title, "value": value}))
        .collect();
    json!({
        "type": "message",
        "attachments": [{
            "contentType": "application/vnd.microsoft.card.adaptive",
            "contentUrl": null,
            "content": {
                "$schema": "http://adaptivecards.io/schemas/adaptive-card.json",
                "type": "AdaptiveCard",
                "version": "1.4",
                "body": [
                    {"type": "TextBlock", "text": title(notice.alert), "weight": "Bolder", "size": "Medium", "color": color, "wrap": true},
                    {"type": "TextBlock", "text": notice.alert.reason, "wrap": true},
                    {"type": "FactSet", "facts": facts},
                ],
            },
        }],
    })
}

/// Escapes the three characters Slack's `mrkdwn` treats as markup.
pub fn slack_escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// The Slack incoming-webhook body: Block Kit with a plain `text` fallback
/// (shown in notifications and by clients without blocks).
pub fn slack_body(notice: &Notice<'_>) -> Value {
    let alert = notice.alert;
    let fields: Vec<Value> = facts(notice)
        .into_iter()
        .take(10) // Block Kit allows at most 10 fields in a section
        .map(|(title, value)| {
            json!({"type": "mrkdwn", "text": format!("*{title}*\n{}", slack_escape(&value))})
        })
        .collect();
    let mut blocks = vec![
        json!({"type": "header", "text": {"type": "plain_text", "text": truncate(&title(alert), 150)}}),
        json!({"type": "section", "text": {"type": "mrkdwn", "text": truncate(&slack_escape(&alert.reason), 3000)}}),
    ];
    if !fields.is_empty() {
        blocks.push(json!({"type": "section", "fields": fields}));
    }
    json!({
        "text": format!("{}: {}", title(alert), alert.reason),
        "blocks": blocks,
    })
}

/// The generic webhook body: the alert as sent on the queue, plus the
/// notification's identity and the run's source.
pub fn webhook_body(notice: &Notice<'_>) -> Value {
    let mut body = json!({
        "event": "alert",
        "delivery": notice.delivery,
        "fingerprint": notice.fingerprint,
        "count": notice.count,
        "alert": notice.alert,
    });
    if let Some(run) = notice.run {
        body["run"] = json!({
            "id": run.id,
            "status": run.status,
            "repo": run.source.repo,
            "commit": run.source.commit,
            "ref": run.source.git_ref,
        });
    }
    body
}

/// The commit-status state of an alert kind, if it has one: a gate's block
/// and a rollback are `failure`, a failed step is `error`, a deploy `success`.
/// Warnings (expired allow-list entries, deleted images...) set no status.
pub fn github_state(alert: &Alert) -> Option<&'static str> {
    let kind = alert.kind.as_str();
    if kind.ends_with("-blocked") || kind == "rolled-back" {
        Some("failure")
    } else if kind == "run-failed" {
        Some("error")
    } else if kind == "deployed" {
        Some("success")
    } else {
        None
    }
}

/// Whether the alert is a deploy outcome (also recorded as a GitHub deployment).
pub fn is_deploy_outcome(alert: &Alert) -> bool {
    matches!(alert.step.as_deref(), Some(steps::DEPLOY | steps::VERIFY))
        && github_state(alert).is_some()
}

/// The commit status body for `POST /repos/{o}/{r}/statuses/{sha}`.
pub fn github_status_body(alert: &Alert, state: &str, step: &str) -> Value {
    json!({
        "state": state,
        "context": format!("gantry/{step}"),
        "description": truncate(&alert.reason, GITHUB_DESCRIPTION_MAX),
    })
}

async fn github(
    deps: &Deps,
    channel: &AlertChannel,
    notice: &Notice<'_>,
) -> Result<Delivered, Failure> {
    let alert = notice.alert;
    let Some(state) = github_state(alert) else {
        return Ok(Delivered::Skipped(format!(
            "no commit status for alert kind {}",
            alert.kind
        )));
    };
    let Some(step) = alert.step.as_deref() else {
        return Ok(Delivered::Skipped("the alert names no step".into()));
    };
    let Some((repo, sha)) = notice
        .run
        .and_then(|r| Some((r.source.repo.as_deref()?, r.source.commit.as_ref()?)))
    else {
        return Ok(Delivered::Skipped(
            "no run with a GitHub repository and commit".into(),
        ));
    };
    // The repository comes from a verified push, but it becomes a URL path here.
    if !valid_repo(repo) {
        return Ok(Delivered::Skipped(format!(
            "repository {repo:?} is not owner/name"
        )));
    }
    let token = secret_of(deps, channel, channel.token_env.as_deref())?;
    let token_text = String::from_utf8_lossy(token.expose()).into_owned();
    let api = channel.github_api();
    let auth = [
        ("authorization", format!("Bearer {token_text}")),
        ("accept", "application/vnd.github+json".to_string()),
        ("x-github-api-version", GITHUB_API_VERSION.to_string()),
    ];
    let secrets = [token.expose()];
    let status_url = format!("{api}/repos/{repo}/statuses/{sha}");
    post(
        deps,
        channel,
        &status_url,
        &github_status_body(alert, state, step),
        &auth,
        &secrets,
    )
    .await?;
    if !is_deploy_outcome(alert) {
        return Ok(Delivered::Sent);
    }
    let environment = notice
        .environment
        .map(str::to_string)
        .or_else(|| alert.app.as_ref().map(|a| a.to_string()))
        .unwrap_or_else(|| "production".into());
    // A retry after the deployment was created but its status was not must
    // not create a second one: look for this run's deployment of the commit.
    let listed = request(
        deps,
        channel,
        &format!("{api}/repos/{repo}/deployments?sha={sha}&environment={environment}&task=deploy"),
        None,
        &auth,
        &secrets,
    )
    .await?;
    let existing = serde_json::from_slice::<Vec<Value>>(&listed)
        .unwrap_or_default()
        .into_iter()
        .find(|d| {
            alert.run_id.is_some()
                && d["payload"]["run_id"].as_str() == alert.run_id.as_ref().map(|r| r.as_str())
        })
        .and_then(|d| d["id"].as_u64());
    let deployment = json!({
        "ref": sha,
        "environment": environment,
        "auto_merge": false,
        "required_contexts": [],
        "description": truncate(&alert.reason, GITHUB_DESCRIPTION_MAX),
        "payload": {"run_id": alert.run_id, "digest": alert.digest},
    });
    let id = match existing {
        Some(id) => id,
        None => {
            let created = post(
                deps,
                channel,
                &format!("{api}/repos/{repo}/deployments"),
                &deployment,
                &auth,
                &secrets,
            )
            .await?;
            serde_json::from_slice::<Value>(&created)
                .ok()
                .and_then(|v| v["id"].as_u64())
                .ok_or_else(|| {
                    Failure::Permanent("GitHub created no deployment (no id in the answer)".into())
                })?
        }
    };
    let deployment_state = match state {
        "success" => "success",
        "failure" => "failure",
        _ => "error",
    };
    post(
        deps,
        channel,
        &format!("{api}/repos/{repo}/deployments/{id}/statuses"),
        &json!({
            "state": deployment_state,
            "environment": environment,
            "description": truncate(&alert.reason, GITHUB_DESCRIPTION_MAX),
        }),
        &auth,
        &secrets,
    )
    .await?;
    Ok(Delivered::Sent)
}

fn valid_repo(v: &str) -> bool {
    let ok = |s: &str| {
        !s.is_empty()
            && s.len() <= 100
            && s != "."
            && s != ".."
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
    };
    matches!(v.split_once('/'), Some((owner, name)) if ok(owner) && ok(name))
}

/// The secret in the environment variable `env` (as read at start).
fn secret_of<'a>(
    deps: &'a Deps,
    channel: &AlertChannel,
    env: Option<&str>,
) -> Result<&'a Secret, Failure> {
    let Some(env) = env else {
        return Err(Failure::Permanent(format!(
            "channel {} names no environment variable",
            channel.name
        )));
    };
    deps.secrets.named(env).ok_or_else(|| {
        Failure::Permanent(format!(
            "environment variable {env} of channel {} is not set",
            channel.name
        ))
    })
}

/// The webhook URL of a teams, slack or webhook channel.
fn url_of(deps: &Deps, channel: &AlertChannel) -> Result<String, Failure> {
    let env = channel.url_env.as_deref().unwrap_or_default();
    let secret = secret_of(deps, channel, channel.url_env.as_deref())?;
    let text = String::from_utf8_lossy(secret.expose()).trim().to_string();
    // Never echo the value: it is the credential.
    match url::Url::parse(&text) {
        Ok(u) if matches!(u.scheme(), "https" | "http") => Ok(text),
        _ => Err(Failure::Permanent(format!(
            "environment variable {env} of channel {} does not hold an http(s) URL",
            channel.name
        ))),
    }
}

async fn post(
    deps: &Deps,
    channel: &AlertChannel,
    url: &str,
    body: &Value,
    headers: &[(&str, String)],
    secrets: &[&[u8]],
) -> Result<Vec<u8>, Failure> {
    let bytes = serde_json::to_vec(body)
        .map_err(|e| Failure::Permanent(format!("encoding the body: {e}")))?;
    post_bytes(deps, channel, url, bytes, headers, secrets).await
}

/// POSTs `body`; see [`request`].
async fn post_bytes(
    deps: &Deps,
    channel: &AlertChannel,
    url: &str,
    body: Vec<u8>,
    headers: &[(&str, String)],
    secrets: &[&[u8]],
) -> Result<Vec<u8>, Failure> {
    request(deps, channel, url, Some(body), headers, secrets).await
}

/// POSTs `body` as JSON (or GETs, without a body) with a timeout;
/// classifies the answer. `secrets` (and the URL) are scrubbed from anything
/// kept of the answer.
async fn request(
    deps: &Deps,
    channel: &AlertChannel,
    url: &str,
    body: Option<Vec<u8>>,
    headers: &[(&str, String)],
    secrets: &[&[u8]],
) -> Result<Vec<u8>, Failure> {
    let what = format!("{} channel {}", channel.kind.as_str(), channel.name);
    let http = &deps.services.http;
    let mut request = match body {
        Some(body) => http
            .post(url)
            .header("content-type", "application/json")
            .body(body),
        None => http.get(url),
    }
    .timeout(deps.config.alerts.timeout)
    .header("user-agent", "gantry");
    for (name, value) in headers {
        request = request.header(*name, value);
    }
    let response = match request.send().await {
        Ok(r) => r,
        Err(e) => {
            let transient = e.is_timeout() || e.is_connect() || e.is_request() || e.is_body();
            let e = e.without_url();
            // The causes say why (refused, timed out); scrubbed like the rest.
            let mut text = format!("{what}: {e}");
            let mut cause = std::error::Error::source(&e);
            while let Some(c) = cause {
                text.push_str(&format!(": {c}"));
                cause = c.source();
            }
            let reason = scrub(&text, url, secrets);
            return Err(if transient && !e.is_builder() {
                Failure::Transient(reason)
            } else {
                Failure::Permanent(reason)
            });
        }
    };
    let status = response.status();
    let answer = match response.bytes().await {
        Ok(b) => b.to_vec(),
        Err(e) if status.is_success() => {
            // Accepted; only the answer body was cut off.
            tracing::debug!(channel = %channel.name, error = %e.without_url(), "reading the answer failed");
            Vec::new()
        }
        Err(e) => {
            return Err(Failure::Transient(scrub(
                &format!(
                    "{what}: HTTP {status}, reading the answer: {}",
                    e.without_url()
                ),
                url,
                secrets,
            )));
        }
    };
    if status.is_success() {
        return Ok(answer);
    }
    let snippet = String::from_utf8_lossy(&answer[..answer.len().min(300)]).into_owned();
    let reason = scrub(
        &format!("{what}: HTTP {}: {}", status.as_u16(), snippet.trim()),
        url,
        secrets,
    );
    let code = status.as_u16();
    if status.is_server_error() || code == 408 || code == 429 {
        Err(Failure::Transient(reason))
    } else {
        Err(Failure::Permanent(reason))
    }
}

/// Replaces the URL, its path and every secret in `text` with `***`.
fn scrub(text: &str, url: &str, secrets: &[&[u8]]) -> String {
    let mut out = text.to_string();
    let mut needles: Vec<String> = vec![url.to_string()];
    if let Ok(parsed) = url::Url::parse(url)
        && parsed.path().len() > 1
    {
        needles.push(parsed.path().to_string());
    }
    for s in secrets {
        needles.push(String::from_utf8_lossy(s).into_owned());
    }
    for needle in needles.iter().filter(|n| n.len() >= 4) {
        out = out.replace(needle.as_str(), "***");
    }
    out
}

/// At most `max` characters, with `…` when cut.
pub fn truncate(text: &str, max: usize) -> String {
    if text.chars().count() <= max {
        return text.to_string();
    }
    let mut out: String = text.chars().take(max.saturating_sub(1)).collect();
    out.push('…');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scrub_removes_url_path_and_secrets() {
        let url = "https://hooks.example/services/T000/B000/XXXXsecret";
        let text = format!("failed for {url} at /services/T000/B000/XXXXsecret with tok-123456");
        let out = scrub(&text, url, &[b"tok-123456"]);
        assert!(!out.contains("XXXXsecret"), "{out}");
        assert!(!out.contains("tok-123456"), "{out}");
    }

    #[test]
    fn truncate_counts_characters() {
        assert_eq!(truncate("abc", 3), "abc");
        assert_eq!(truncate("abcdé", 4), "abc…");
    }

    #[test]
    fn states_by_kind() {
        let a = |kind: &str| Alert::new(kind, Severity::High, "r");
        assert_eq!(github_state(&a("scan-blocked")), Some("failure"));
        assert_eq!(github_state(&a("rolled-back")), Some("failure"));
        assert_eq!(github_state(&a("run-failed")), Some("error"));
        assert_eq!(github_state(&a("deployed")), Some("success"));
        assert_eq!(github_state(&a("allow-list-expired")), None);
        assert!(!valid_repo("../x"));
        assert!(valid_repo("contoso/web.api"));
    }
}
