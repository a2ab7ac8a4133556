//! `gantry audit`: the open findings of `cluster-audit` — policy, drift,
//! vulnerabilities and governance — as a table or JSON.
//!
//! Over the operator API (`GET /api/audit`, read scope) by default, or from
//! the store directly with `--state`/`--storage` (like `gantry runs list`).
//! Exit status: 0 whatever is open, unless `--fail-on-findings` is given,
//! then 2 when a finding is listed (1 stays "the command failed"), so a
//! pipeline can gate on a clean cluster.

use anyhow::{Context, Result};
use gantry_pipeline::findings::{FindingFilter, FindingList, ListedFinding, list_open};
use gantry_pipeline::{AppName, RunStore};

use crate::runs::{Api, ApiArgs, DirectStoreArgs, print_json};

/// `gantry audit`'s arguments.
#[derive(clap::Args)]
pub struct AuditArgs {
    /// Only findings of this app (its own, and cluster findings attributed to it).
    #[arg(long)]
    app: Option<String>,
    /// Only this category (policy, drift, vulnerability, governance) or kind
    /// (missing-label, quota-usage, ...).
    #[arg(long)]
    kind: Option<String>,
    /// Print JSON (`{"findings": [...], "scopes": [...]}`) instead of a table.
    #[arg(long)]
    json: bool,
    /// Exit with status 2 when any finding is listed.
    #[arg(long)]
    fail_on_findings: bool,
    #[command(flatten)]
    api: ApiArgs,
    #[command(flatten)]
    store: DirectStoreArgs,
}

/// `--fail-on-findings` and findings were listed: exit status 2.
#[derive(Debug)]
pub struct FindingsFound(pub usize);

impl std::fmt::Display for FindingsFound {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} open audit findings (--fail-on-findings)", self.0)
    }
}

impl std::error::Error for FindingsFound {}

/// Runs `gantry audit`.
pub async fn run(args: AuditArgs) -> Result<()> {
    let app = args.app.as_deref().map(AppName::parse).transpose()?;
    // Checked here too, so a typo fails the same way with or without the API.
    let filter =
        FindingFilter::new(app.clone(), args.kind.as_deref()).map_err(anyhow::Error::msg)?;
    let list: FindingList = match args.store.direct() {
        Some(store) => {
            let runs = RunStore::new(crate::wiring::open_store(&store).await?);
            list_open(&runs, &filter).await?
        }
        None => {
            let mut query = url::form_urlencoded::Serializer::new(String::new());
            if let Some(a) = &app {
                query.append_pair("app", a.as_str());
            }
            if let Some(k) = &args.kind {
                query.append_pair("kind", k);
            }
            let query = query.finish();
            let path = if query.is_empty() {
                "/api/audit".to_string()
            } else {
                format!("/api/audit?{query}")
            };
            let value = Api::new(&args.api)?
                .call(reqwest::Method::GET, &path, None)
                .await?;
            serde_json::from_value(value).context("the API answered findings gantry cannot read")?
        }
    };
    if args.json {
        print_json(&list)?;
    } else {
        print!("{}", table(&list));
    }
    if args.fail_on_findings && !list.findings.is_empty() {
        return Err(FindingsFound(list.findings.len()).into());
    }
    Ok(())
}

fn severity(f: &ListedFinding) -> String {
    f.severity
        .and_then(|s| serde_json::to_value(s).ok())
        .and_then(|v| v.as_str().map(String::from))
        .unwrap_or_else(|| "-".into())
}

/// A fixed-width table of findings, then the scopes whose last check was
/// incomplete (their findings are the previous check's).
pub fn table(list: &FindingList) -> String {
    let mut out = format!(
        "{:<8}  {:<12}  {:<20}  {:<16}  {:<20}  {}\n",
        "SEVERITY", "CATEGORY", "KIND", "APP", "SINCE", "REASON"
    );
    for f in &list.findings {
        out.push_str(&format!(
            "{:<8}  {:<12}  {:<20}  {:<16}  {:<20}  {}\n",
            severity(f),
            f.category,
            f.kind,
            f.app.as_ref().map_or("-", |a| a.as_str()),
            f.since,
            f.reason
        ));
    }
    if list.findings.is_empty() {
        out.push_str("(no open findings)\n");
    }
    for s in list.scopes.iter().filter(|s| s.error.is_some()) {
        out.push_str(&format!(
            "note: the last check of {} was incomplete ({}): {}\n",
            s.scope,
            s.checked_at.as_deref().unwrap_or("never completed"),
            s.error.as_deref().unwrap_or_default()
        ));
    }
    out
}
