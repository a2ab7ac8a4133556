//! `gantry runs list|show|retrigger|approve|reject` and `gantry apps
//! rollback`: operator commands over the runs-api (`--url`, `--token`), as a
//! table or as JSON with the run fields of DESIGN.md §4.
//!
//! `list` and `show` read the state store directly instead when a store is
//! named explicitly (`--state`/`--storage`, or `GANTRY_STATE`/`GANTRY_STORAGE`):
//! the store is the truth and needs no running API, which is what
//! development and break-glass use want. Every action goes through the API,
//! so it is authorized and audited with its principal.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use gantry_pipeline::{AppName, Digest, Run, RunId, RunStatus, RunStore};
use serde_json::Value;

/// Where the operator API is, and the token for it. No `Debug`: the token
/// must never be printed.
#[derive(clap::Args, Clone)]
pub struct ApiArgs {
    /// Base URL of the operator API (the Function App, or `gantry dev`).
    #[arg(long, env = "GANTRY_URL", default_value = "http://127.0.0.1:7071")]
    pub url: String,
    /// Bearer token (read or operate scope). Without one, a loopback URL
    /// gets the `gantry dev` development token.
    #[arg(long, env = "GANTRY_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
}

/// The store flags of `gantry runs list|show`: naming one reads the store
/// directly instead of calling the API.
#[derive(clap::Args, Clone)]
pub struct DirectStoreArgs {
    /// Read the embedded store in this directory instead of calling the API.
    #[arg(long, env = "GANTRY_STATE")]
    pub state: Option<PathBuf>,
    /// Read Blob Storage (URL or connection string) instead of calling the API.
    #[arg(long, env = "GANTRY_STORAGE", hide_env_values = true)]
    pub storage: Option<String>,
    /// Blob container holding gantry's state (with --storage).
    #[arg(long, default_value = "gantry", env = "GANTRY_CONTAINER")]
    pub container: String,
}

impl DirectStoreArgs {
    /// The store to read directly, when one was named.
    pub(crate) fn direct(&self) -> Option<crate::StoreArgs> {
        if self.state.is_none() && self.storage.is_none() {
            return None;
        }
        Some(crate::StoreArgs {
            state: self
                .state
                .clone()
                .unwrap_or_else(|| PathBuf::from(".gantry")),
            storage: self.storage.clone(),
            container: self.container.clone(),
        })
    }
}

#[derive(clap::Subcommand)]
pub enum RunsCommand {
    /// List runs, newest first.
    List {
        /// Only this app.
        #[arg(long)]
        app: Option<String>,
        /// Only this status (awaiting-image, scanning, deployed, ...).
        #[arg(long)]
        status: Option<String>,
        /// At most this many runs.
        #[arg(long, default_value_t = 50)]
        limit: usize,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        api: ApiArgs,
        #[command(flatten)]
        store: DirectStoreArgs,
    },
    /// Show one run: source, image, steps with verdicts, retriggers, audit trail.
    Show {
        /// The run id.
        id: String,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        api: ApiArgs,
        #[command(flatten)]
        store: DirectStoreArgs,
    },
    /// Re-run a finished run from a step, keeping the steps before it.
    Retrigger {
        /// The run id.
        id: String,
        /// The step to re-run from: scan, policy or deploy.
        #[arg(long, value_parser = ["scan", "policy", "deploy"])]
        from: String,
        /// Why (recorded on the run and in the audit trail).
        #[arg(long)]
        reason: Option<String>,
        /// Print the run as JSON.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Approve a run awaiting approval (it deploys).
    Approve {
        /// The run id.
        id: String,
        /// Print the run as JSON.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Reject a run awaiting approval (it is blocked).
    Reject {
        /// The run id.
        id: String,
        /// Why (recorded on the run and in the audit trail).
        #[arg(long)]
        reason: Option<String>,
        /// Print the run as JSON.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        api: ApiArgs,
    },
}

#[derive(clap::Subcommand)]
pub enum AppsCommand {
    /// Roll an app back to its previous good digest (or --digest).
    Rollback {
        /// The app.
        app: String,
        /// Roll back to this digest (sha256:...) instead of the previous good one.
        #[arg(long)]
        digest: Option<String>,
        /// Why (recorded in the audit trail).
        #[arg(long)]
        reason: Option<String>,
        /// Print the rollback run as JSON.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        api: ApiArgs,
    },
}

/// A client of the operator API.
pub(crate) struct Api {
    http: reqwest::Client,
    base: String,
    token: String,
}

fn is_loopback(url: &reqwest::Url) -> bool {
    match url.host() {
        Some(url::Host::Domain(d)) => d.eq_ignore_ascii_case("localhost"),
        Some(url::Host::Ipv4(ip)) => ip.is_loopback(),
        Some(url::Host::Ipv6(ip)) => ip.is_loopback(),
        None => false,
    }
}

impl Api {
    pub(crate) fn new(args: &ApiArgs) -> Result<Api> {
        let url = reqwest::Url::parse(&args.url)
            .with_context(|| format!("--url {:?} is not a URL", args.url))?;
        let token = match args
            .token
            .as_deref()
            .map(str::trim)
            .filter(|t| !t.is_empty())
        {
            Some(t) => t.to_string(),
            None if is_loopback(&url) => crate::wiring::DEV_API_TOKEN.to_string(),
            None => bail!(
                "no token for {url}: set GANTRY_TOKEN or pass --token (a token listed in the API's GANTRY_API_TOKENS)"
            ),
        };
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(30))
            .build()
            .context("building the HTTP client")?;
        Ok(Api {
            http,
            base: args.url.trim_end_matches('/').to_string(),
            token,
        })
    }

    pub(crate) async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> Result<Value> {
        let url = format!("{}{path}", self.base);
        let mut request = self.http.request(method, &url).bearer_auth(&self.token);
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request
            .send()
            .await
            .with_context(|| format!("calling {url} (is the API running?)"))?;
        let status = response.status();
        let bytes = response.bytes().await.context("reading the answer")?;
        let value: Option<Value> = serde_json::from_slice(&bytes).ok();
        if !status.is_success() {
            // `{"error": {"code", "message"}}`, printed as `error: code: message`.
            if let Some(e) = value.as_ref().map(|v| &v["error"])
                && let (Some(code), Some(message)) = (e["code"].as_str(), e["message"].as_str())
            {
                bail!("{code}: {message}");
            }
            bail!(
                "http_{}: {}",
                status.as_u16(),
                String::from_utf8_lossy(&bytes)
                    .chars()
                    .take(300)
                    .collect::<String>()
            );
        }
        value.with_context(|| format!("{url} answered {status} without JSON"))
    }
}

fn parse_status(s: Option<String>) -> Result<Option<RunStatus>> {
    s.map(|s| {
        RunStatus::parse(&s).with_context(|| {
            format!(
                "unknown status {s:?}; one of: {}",
                RunStatus::ALL.map(RunStatus::as_str).join(", ")
            )
        })
    })
    .transpose()
}

/// Most runs the API returns per page.
const API_PAGE: usize = 200;

async fn list_api(
    api: &Api,
    app: Option<&AppName>,
    status: Option<RunStatus>,
    limit: usize,
) -> Result<Vec<Value>> {
    let mut runs = Vec::new();
    let mut continuation: Option<String> = None;
    while runs.len() < limit {
        let mut query = vec![("limit", (limit - runs.len()).min(API_PAGE).to_string())];
        if let Some(a) = app {
            query.push(("app", a.to_string()));
        }
        if let Some(s) = status {
            query.push(("status", s.as_str().to_string()));
        }
        if let Some(c) = &continuation {
            query.push(("continuation", c.clone()));
        }
        let qs = query
            .iter()
            .map(|(k, v)| {
                format!(
                    "{k}={}",
                    url::form_urlencoded::byte_serialize(v.as_bytes()).collect::<String>()
                )
            })
            .collect::<Vec<_>>()
            .join("&");
        let page = api
            .call(reqwest::Method::GET, &format!("/api/runs?{qs}"), None)
            .await?;
        if let Some(list) = page["runs"].as_array() {
            runs.extend(list.iter().cloned());
        }
        match page["continuation"].as_str() {
            Some(c) => continuation = Some(c.to_string()),
            None => break,
        }
    }
    runs.truncate(limit);
    Ok(runs)
}

fn decode_runs(values: &[Value]) -> Result<Vec<Run>> {
    values
        .iter()
        .map(|v| {
            serde_json::from_value(v.clone()).context("the API answered a run gantry cannot read")
        })
        .collect()
}

pub(crate) fn print_json(value: &impl serde::Serialize) -> Result<()> {
    println!("{}", serde_json::to_string_pretty(value)?);
    Ok(())
}

/// One line about a run an action returned.
fn action_line(verb: &str, run: &Run) -> String {
    let digest = short_digest(run);
    format!(
        "{verb} run {}  app {}  status {}  digest {digest}\n",
        run.id, run.app, run.status
    )
}

pub async fn run(command: RunsCommand) -> Result<()> {
    match command {
        RunsCommand::List {
            app,
            status,
            limit,
            json,
            api,
            store,
        } => {
            let app = app.map(|a| AppName::parse(&a)).transpose()?;
            let status = parse_status(status)?;
            if let Some(store) = store.direct() {
                let runs = RunStore::new(crate::wiring::open_store(&store).await?);
                let list = runs.list(app.as_ref(), status, limit).await?;
                if json {
                    print_json(&list)?;
                } else {
                    print!("{}", table(&list));
                }
                return Ok(());
            }
            let api = Api::new(&api)?;
            let values = list_api(&api, app.as_ref(), status, limit).await?;
            if json {
                print_json(&values)?;
            } else {
                print!("{}", table(&decode_runs(&values)?));
            }
        }
        RunsCommand::Show {
            id,
            json,
            api,
            store,
        } => {
            let id = RunId::parse(&id)?;
            if let Some(store) = store.direct() {
                let runs = RunStore::new(crate::wiring::open_store(&store).await?);
                let Some(run) = runs.find(&id).await? else {
                    bail!("no run {id}");
                };
                if json {
                    print_json(&run)?;
                } else {
                    print!("{}", show(&run));
                }
                return Ok(());
            }
            let api = Api::new(&api)?;
            let value = api
                .call(reqwest::Method::GET, &format!("/api/runs/{id}"), None)
                .await?;
            if json {
                print_json(&value)?;
            } else {
                let run: Run = serde_json::from_value(value.clone())?;
                print!("{}", show(&run));
                print!("{}", audit_lines(&value["audit"]));
            }
        }
        RunsCommand::Retrigger {
            id,
            from,
            reason,
            json,
            api,
        } => {
            let id = RunId::parse(&id)?;
            let body = serde_json::json!({"from": from, "reason": reason});
            let value = Api::new(&api)?
                .call(
                    reqwest::Method::POST,
                    &format!("/api/runs/{id}/retrigger"),
                    Some(body),
                )
                .await?;
            print_action(json, "retriggered", &value)?;
        }
        RunsCommand::Approve { id, json, api } => {
            let id = RunId::parse(&id)?;
            let value = Api::new(&api)?
                .call(
                    reqwest::Method::POST,
                    &format!("/api/runs/{id}/approve"),
                    None,
                )
                .await?;
            print_action(json, "approved", &value)?;
        }
        RunsCommand::Reject {
            id,
            reason,
            json,
            api,
        } => {
            let id = RunId::parse(&id)?;
            let body = reason.map(|r| serde_json::json!({"reason": r}));
            let value = Api::new(&api)?
                .call(
                    reqwest::Method::POST,
                    &format!("/api/runs/{id}/reject"),
                    body,
                )
                .await?;
            print_action(json, "rejected", &value)?;
        }
    }
    Ok(())
}

/// `gantry apps ...`.
pub async fn apps(command: AppsCommand) -> Result<()> {
    match command {
        AppsCommand::Rollback {
            app,
            digest,
            reason,
            json,
            api,
        } => {
            let app = AppName::parse(&app)?;
            let digest = digest.map(|d| Digest::parse(&d)).transpose()?;
            let mut body = serde_json::Map::new();
            if let Some(d) = digest {
                body.insert("digest".into(), Value::String(d.to_string()));
            }
            if let Some(r) = reason {
                body.insert("reason".into(), Value::String(r));
            }
            let value = Api::new(&api)?
                .call(
                    reqwest::Method::POST,
                    &format!("/api/apps/{app}/rollback"),
                    Some(Value::Object(body)),
                )
                .await?;
            print_action(json, "rollback", &value)?;
        }
    }
    Ok(())
}

fn print_action(json: bool, verb: &str, value: &Value) -> Result<()> {
    if json {
        return print_json(value);
    }
    let run: Run = serde_json::from_value(value.clone())
        .context("the API answered a run gantry cannot read")?;
    print!("{}", action_line(verb, &run));
    Ok(())
}

/// The audit entries of `GET /api/runs/{id}`, one line each.
fn audit_lines(audit: &Value) -> String {
    let Some(entries) = audit.as_array().filter(|a| !a.is_empty()) else {
        return String::new();
    };
    let mut out = "audit\n".to_string();
    for e in entries {
        out.push_str(&format!(
            "  {}  {:<16} {}\n",
            e["at"].as_str().unwrap_or_default(),
            e["actor"].as_str().unwrap_or_default(),
            e["action"].as_str().unwrap_or_default(),
        ));
    }
    out
}

/// How long ago, compactly (`42s`, `5m`, `3h`, `2d`).
fn age(t: time::OffsetDateTime) -> String {
    let secs = (time::OffsetDateTime::now_utc() - t).whole_seconds().max(0);
    match secs {
        s if s < 60 => format!("{s}s"),
        s if s < 3600 => format!("{}m", s / 60),
        s if s < 86_400 => format!("{}h", s / 3600),
        s => format!("{}d", s / 86_400),
    }
}

fn short_digest(run: &Run) -> String {
    run.image
        .as_ref()
        .map(|i| i.digest.as_str()[..19].to_string())
        .unwrap_or_else(|| "-".into())
}

/// A fixed-width table of runs.
pub fn table(runs: &[Run]) -> String {
    let mut out = format!(
        "{:<26}  {:<16}  {:<17}  {:<8}  {:<19}  {:<20}  {}\n",
        "RUN", "APP", "STATUS", "COMMIT", "DIGEST", "CREATED", "AGE"
    );
    for r in runs {
        let commit = r
            .source
            .commit
            .as_ref()
            .map(|c| c.as_str()[..8].to_string())
            .unwrap_or_else(|| "-".into());
        let created = r
            .created_at
            .format(&time::format_description::well_known::Rfc3339)
            .unwrap_or_default();
        out.push_str(&format!(
            "{:<26}  {:<16}  {:<17}  {:<8}  {:<19}  {:<20}  {}\n",
            r.id,
            r.app,
            r.status,
            commit,
            short_digest(r),
            created,
            age(r.created_at)
        ));
    }
    if runs.is_empty() {
        out.push_str("(no runs)\n");
    }
    out
}

/// A human description of one run.
pub fn show(run: &Run) -> String {
    let fmt = |t: time::OffsetDateTime| {
        t.format(&time::format_description::well_known::Rfc3339)
            .unwrap_or_default()
    };
    let mut out = format!(
        "run      {}\napp      {}\nstatus   {}\n",
        run.id, run.app, run.status
    );
    let s = &run.source;
    out.push_str(&format!(
        "source   {:?}{}{}{}\n",
        s.kind,
        s.repo
            .as_deref()
            .map(|r| format!(" {r}"))
            .unwrap_or_default(),
        s.git_ref
            .as_deref()
            .map(|r| format!(" {r}"))
            .unwrap_or_default(),
        s.commit
            .as_ref()
            .map(|c| format!(" @ {c}"))
            .unwrap_or_default(),
    ));
    if let Some(p) = &s.pusher {
        out.push_str(&format!("pusher   {p}\n"));
    }
    // The trace id, to look the run up in the tracing backend.
    if let Some(trace) = run
        .trace
        .as_ref()
        .and_then(|t| t.traceparent.split('-').nth(1))
    {
        out.push_str(&format!("trace    {trace}\n"));
    }
    if let Some(i) = &run.image {
        out.push_str(&format!("image    {}\n", i.reference()));
        if let Some(t) = &i.tag {
            out.push_str(&format!("tag      {t}\n"));
        }
    }
    out.push_str(&format!(
        "created  {}\nupdated  {}\n",
        fmt(run.created_at),
        fmt(run.updated_at)
    ));
    for r in &run.retriggers {
        out.push_str(&format!(
            "retrigger {} by {} from {} (was {}){}\n",
            fmt(r.at),
            r.by,
            r.from,
            r.previous_status,
            r.reason
                .as_deref()
                .map(|x| format!(": {x}"))
                .unwrap_or_default()
        ));
    }
    if !run.steps.is_empty() {
        out.push_str("steps\n");
        // Pipeline order, then anything else by name.
        const ORDER: [&str; 6] = ["ci", "scan", "policy", "approval", "deploy", "verify"];
        let mut ordered: Vec<_> = run.steps.iter().collect();
        ordered.sort_by_key(|(name, _)| {
            (
                ORDER.iter().position(|o| o == name).unwrap_or(ORDER.len()),
                name.to_string(),
            )
        });
        for (name, step) in ordered {
            out.push_str(&format!(
                "  {:<9} {:<8} attempts={}{}\n",
                name,
                serde_json::to_value(step.status)
                    .ok()
                    .and_then(|v| v.as_str().map(String::from))
                    .unwrap_or_default(),
                step.attempts,
                step.summary
                    .as_deref()
                    .map(|s| format!("  {s}"))
                    .unwrap_or_default()
            ));
        }
    }
    if !run.security_alerts.is_empty() {
        out.push_str(
            "security
",
        );
        for a in &run.security_alerts {
            out.push_str(&format!(
                "  {:<13} {}{}  ({})
",
                a.severity.as_str(),
                a.name,
                if a.blocked { "  [digest blocked]" } else { "" },
                a.key
            ));
        }
    }
    out
}
