//! The redelivery sweep of missed GitHub webhook deliveries.
//!
//! GitHub never redelivers a failed delivery by itself. For every configured
//! hook the sweep lists its recent deliveries
//! (`GET {api}/repos/{owner}/{repo}/hooks/{id}/deliveries?per_page=100`, or
//! `/orgs/{org}/hooks/{id}/...`, newest first, cursor pagination through
//! `Link: <...>; rel="next"`), takes those delivered since the last sweep,
//! groups them by `guid` (an event's redeliveries share it) and asks GitHub
//! to deliver again (`POST .../deliveries/{delivery_id}/attempts`, 202) every
//! event that
//!
//! - has no 2xx delivery among them (a redelivery that succeeded settles it),
//! - has no claim `dedup/github/{guid}` (gantry processed it after all, e.g.
//!   it answered 5xx after recording), and
//! - was not already asked for too often ([`MAX_ATTEMPTS`]): a delivery that
//!   fails every time (a wrong webhook secret) must not be redelivered for
//!   ever; its failures stay visible in GitHub and in the sweep's record.
//!
//! The delivery claim makes a redelivery safe: if it races with a late
//! success, github-webhook answers "duplicate" and creates nothing.
//!
//! The cursor and the attempts live at `audit/github/{hook key}.json`.

use std::collections::BTreeMap;
use std::time::Duration;

use gantry_pipeline::config::GithubHook;
use gantry_pipeline::{ClaimSource, PipelineError};
use gantry_runtime::{Deps, Secret};
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

/// Key of a [`Secret`] in [`gantry_runtime::Services`] used as the GitHub
/// token instead of the `[github] token_env` variable (tests, or a host that
/// fetches the token itself).
pub const TOKEN_KEY: &str = "cluster-audit/github-token";

/// Pages of 100 deliveries read per hook and sweep: beyond 1,000 deliveries
/// in one interval the oldest are not examined (and the report says so).
pub const MAX_PAGES: usize = 10;

/// Redeliveries requested per event before the sweep gives up on it.
pub const MAX_ATTEMPTS: u32 = 3;

/// How far back the first sweep of a hook looks (GitHub keeps deliveries for
/// three days; older failures are best left to an operator).
pub const FIRST_LOOKBACK: Duration = Duration::from_secs(24 * 3600);

/// How long requested attempts are remembered.
const ATTEMPTS_KEPT: Duration = Duration::from_secs(4 * 24 * 3600);

/// Timeout of each GitHub API request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(15);

/// One delivery as listed by GitHub (fields gantry uses).
#[derive(Debug, Clone, Deserialize)]
pub struct Delivery {
    /// Delivery id (what `/attempts` takes).
    pub id: u64,
    /// The event's id, shared by its redeliveries (`X-GitHub-Delivery`).
    pub guid: String,
    /// When it was delivered (RFC 3339).
    pub delivered_at: String,
    /// HTTP status gantry answered; 0 when no answer came.
    #[serde(default)]
    pub status_code: u16,
    /// Whether it is itself a redelivery.
    #[serde(default)]
    pub redelivery: bool,
}

/// `audit/github/{hook}.json`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct HookState {
    /// Deliveries before this instant were examined by an earlier sweep.
    #[serde(default)]
    pub since: Option<String>,
    /// Redeliveries requested, by event guid.
    #[serde(default)]
    pub attempts: BTreeMap<String, Attempts>,
    /// The last sweep's problem, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// Redeliveries requested for one event.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Attempts {
    /// How many.
    pub count: u32,
    /// The delivery ids redelivered.
    pub delivery_ids: Vec<u64>,
    /// When the last was requested (RFC 3339).
    pub last_at: String,
}

/// What one hook's sweep did.
#[derive(Debug, Clone, Default)]
pub struct HookReport {
    /// The hook's key.
    pub hook: String,
    /// Delivery ids redelivered now.
    pub redelivered: Vec<u64>,
    /// Why the sweep of this hook stopped early, if it did.
    pub error: Option<String>,
}

/// Why the sweep of one hook failed (recorded on the hook, never fatal).
#[derive(Debug)]
struct HookError(String);

fn rfc3339(t: OffsetDateTime) -> String {
    t.format(&Rfc3339).unwrap_or_default()
}

fn parse_time(s: &str) -> Option<OffsetDateTime> {
    OffsetDateTime::parse(s, &Rfc3339).ok()
}

/// The state blob of `hook`.
pub fn state_name(hook: &GithubHook) -> String {
    format!("audit/github/{}.json", hook.key())
}

/// Sweeps every configured hook. Per-hook failures (GitHub unreachable, no
/// token) are reported, not returned; only the state store failing is an
/// error (then the timer run answers non-2xx).
pub async fn sweep(deps: &Deps) -> Result<Vec<HookReport>, PipelineError> {
    let github = &deps.config.github;
    let mut reports = Vec::new();
    if github.hooks.is_empty() {
        return Ok(reports);
    }
    let token = match deps.services.get::<Secret>(TOKEN_KEY) {
        Some(t) => Some((*t).clone()),
        None => std::env::var(&github.token_env)
            .ok()
            .filter(|t| !t.is_empty())
            .map(Secret::new),
    };
    for hook in &github.hooks {
        let name = state_name(hook);
        let mut state: HookState = match deps.runs.raw().get(&name).await? {
            Some(v) => serde_json::from_slice(&v.body).unwrap_or_default(),
            None => HookState::default(),
        };
        let mut report = HookReport {
            hook: hook.key(),
            ..HookReport::default()
        };
        let result = match &token {
            Some(token) => sweep_hook(deps, hook, token, &mut state, &mut report).await,
            None => Err(HookError(format!(
                "no GitHub token: set {} (or remove [[github.hooks]])",
                github.token_env
            ))),
        };
        report.error = result.err().map(|e| e.0);
        if let Some(e) = &report.error {
            tracing::warn!(hook = %report.hook, "redelivery sweep: {e}");
        }
        state.error = report.error.clone();
        deps.runs.put_json(&name, &state).await?;
        reports.push(report);
    }
    Ok(reports)
}

async fn sweep_hook(
    deps: &Deps,
    hook: &GithubHook,
    token: &Secret,
    state: &mut HookState,
    report: &mut HookReport,
) -> Result<(), HookError> {
    let now = OffsetDateTime::now_utc();
    let since = state
        .since
        .as_deref()
        .and_then(parse_time)
        .unwrap_or(now - FIRST_LOOKBACK);
    let api = deps.config.github.api_url.trim_end_matches('/');
    let base = format!("{api}{}", hook.api_path());
    let (deliveries, truncated) = list_recent(deps, api, &base, token, since).await?;

    // Group the window by event; each event is judged on all its deliveries.
    let mut events: BTreeMap<&str, Vec<&Delivery>> = BTreeMap::new();
    for d in &deliveries {
        events.entry(d.guid.as_str()).or_default().push(d);
    }
    let mut failed_posts = Vec::new();
    for (guid, group) in events {
        if group.iter().any(|d| (200..300).contains(&d.status_code)) {
            continue;
        }
        let claimed = deps
            .runs
            .is_claimed(ClaimSource::Github, guid)
            .await
            .map_err(|e| HookError(format!("reading the claim of {guid}: {e}")))?;
        if claimed {
            continue;
        }
        let Some(newest) = group.iter().max_by_key(|d| (d.delivered_at.clone(), d.id)) else {
            continue;
        };
        let attempts = state.attempts.entry(guid.to_string()).or_default();
        if attempts.count >= MAX_ATTEMPTS || attempts.delivery_ids.contains(&newest.id) {
            continue;
        }
        match redeliver(deps, &base, token, newest.id).await {
            Ok(()) => {
                attempts.count += 1;
                attempts.delivery_ids.push(newest.id);
                attempts.last_at = rfc3339(now);
                report.redelivered.push(newest.id);
                tracing::info!(hook = %report.hook, guid, delivery = newest.id, "redelivery requested");
                deps.audit(gantry_pipeline::AuditEntry {
                    at: now,
                    actor: crate::NAME.into(),
                    action: "github.redelivery-requested".into(),
                    app: None,
                    run: None,
                    detail: serde_json::json!({
                        "hook": report.hook, "guid": guid, "delivery_id": newest.id,
                        "status_code": newest.status_code, "attempt": attempts.count,
                    }),
                })
                .await;
            }
            Err(e) => failed_posts.push(e.0),
        }
    }
    state
        .attempts
        .retain(|_, a| parse_time(&a.last_at).is_some_and(|t| now - t < ATTEMPTS_KEPT));
    if !failed_posts.is_empty() {
        // Keep the cursor: the next sweep sees these events again (the ones
        // redelivered now are remembered by delivery id).
        return Err(HookError(failed_posts.join("; ")));
    }
    let newest = deliveries
        .iter()
        .filter_map(|d| parse_time(&d.delivered_at))
        .max();
    if let Some(newest) = newest {
        state.since = Some(rfc3339(newest));
    } else if state.since.is_none() {
        state.since = Some(rfc3339(since));
    }
    if truncated {
        return Err(HookError(format!(
            "more than {} deliveries since the last sweep; older ones were not examined",
            MAX_PAGES * 100
        )));
    }
    Ok(())
}

fn request(
    deps: &Deps,
    method: reqwest::Method,
    url: &str,
    token: &Secret,
) -> reqwest::RequestBuilder {
    deps.services
        .http
        .request(method, url)
        .bearer_auth(String::from_utf8_lossy(token.expose()))
        .header("Accept", "application/vnd.github+json")
        .header("X-GitHub-Api-Version", "2022-11-28")
        .header("User-Agent", "gantry-cluster-audit")
        .timeout(REQUEST_TIMEOUT)
}

/// Deliveries at or after `since`, newest first, and whether the page limit
/// cut the listing short.
async fn list_recent(
    deps: &Deps,
    api: &str,
    base: &str,
    token: &Secret,
    since: OffsetDateTime,
) -> Result<(Vec<Delivery>, bool), HookError> {
    let mut url = format!("{base}/deliveries?per_page=100");
    let mut out = Vec::new();
    for _ in 0..MAX_PAGES {
        let response = request(deps, reqwest::Method::GET, &url, token)
            .send()
            .await
            .map_err(|e| HookError(format!("listing deliveries: {}", e.without_url())))?;
        let status = response.status();
        if !status.is_success() {
            return Err(HookError(format!(
                "listing deliveries: HTTP {}",
                status.as_u16()
            )));
        }
        let next = next_link(response.headers());
        let page: Vec<Delivery> = response
            .json()
            .await
            .map_err(|e| HookError(format!("reading deliveries: {}", e.without_url())))?;
        let mut reached_older = false;
        for d in page {
            match parse_time(&d.delivered_at) {
                Some(t) if t < since => reached_older = true,
                Some(_) => out.push(d),
                None => {}
            }
        }
        match next {
            Some(n) if !reached_older => {
                // The token goes only to the configured API.
                if !n.starts_with(&format!("{api}/")) {
                    return Err(HookError(
                        "the next page link points outside the configured api_url".into(),
                    ));
                }
                url = n;
            }
            _ => return Ok((out, false)),
        }
    }
    Ok((out, true))
}

/// The `rel="next"` URL of a `Link` header.
pub fn next_link(headers: &reqwest::header::HeaderMap) -> Option<String> {
    let link = headers.get(reqwest::header::LINK)?.to_str().ok()?;
    link.split(',').find_map(|part| {
        let (url, params) = part.split_once(';')?;
        let is_next = params
            .split(';')
            .any(|p| p.trim().replace(' ', "") == "rel=\"next\"");
        let url = url.trim().strip_prefix('<')?.strip_suffix('>')?;
        is_next.then(|| url.to_string())
    })
}

async fn redeliver(deps: &Deps, base: &str, token: &Secret, id: u64) -> Result<(), HookError> {
    let url = format!("{base}/deliveries/{id}/attempts");
    let response = request(deps, reqwest::Method::POST, &url, token)
        .send()
        .await
        .map_err(|e| HookError(format!("redelivering {id}: {}", e.without_url())))?;
    let status = response.status();
    if status.is_success() {
        Ok(())
    } else {
        Err(HookError(format!(
            "redelivering {id}: HTTP {}",
            status.as_u16()
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn next_link_is_found_among_others() {
        let mut headers = reqwest::header::HeaderMap::new();
        headers.insert(
            reqwest::header::LINK,
            reqwest::header::HeaderValue::from_static(
                "<https://api.github.com/x?cursor=a>; rel=\"prev\", <https://api.github.com/x?per_page=100&cursor=v1_9>; rel=\"next\"",
            ),
        );
        assert_eq!(
            next_link(&headers).as_deref(),
            Some("https://api.github.com/x?per_page=100&cursor=v1_9")
        );
        headers.clear();
        assert_eq!(next_link(&headers), None);
    }
}
