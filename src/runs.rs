//! `gantry runs list|show`: runs straight from the state store (embedded or
//! Blob Storage), as a table or as JSON with the run fields of DESIGN.md §4.

use anyhow::{Context, Result, bail};
use gantry_pipeline::{AppName, Run, RunId, RunStatus, RunStore};

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
        store: crate::StoreArgs,
    },
    /// Show one run.
    Show {
        /// The run id.
        id: String,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        store: crate::StoreArgs,
    },
}

pub async fn run(command: RunsCommand) -> Result<()> {
    match command {
        RunsCommand::List {
            app,
            status,
            limit,
            json,
            store,
        } => {
            let app = app.map(|a| AppName::parse(&a)).transpose()?;
            let status = match status {
                Some(s) => Some(RunStatus::parse(&s).with_context(|| {
                    format!(
                        "unknown status {s:?}; one of: {}",
                        RunStatus::ALL.map(RunStatus::as_str).join(", ")
                    )
                })?),
                None => None,
            };
            let runs = RunStore::new(crate::wiring::open_store(&store).await?);
            let list = runs.list(app.as_ref(), status, limit).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&list)?);
            } else {
                print!("{}", table(&list));
            }
        }
        RunsCommand::Show { id, json, store } => {
            let id = RunId::parse(&id)?;
            let runs = RunStore::new(crate::wiring::open_store(&store).await?);
            let Some(run) = runs.find(&id).await? else {
                bail!("no run {id}");
            };
            if json {
                println!("{}", serde_json::to_string_pretty(&run)?);
            } else {
                print!("{}", show(&run));
            }
        }
    }
    Ok(())
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
        "{:<26}  {:<16}  {:<17}  {:<8}  {:<19}  {}\n",
        "RUN", "APP", "STATUS", "COMMIT", "DIGEST", "CREATED"
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
            "{:<26}  {:<16}  {:<17}  {:<8}  {:<19}  {}\n",
            r.id,
            r.app,
            r.status,
            commit,
            short_digest(r),
            created
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
    out
}
