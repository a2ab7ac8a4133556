//! The benchmark report: one command, one run, every number next to the
//! baseline measured alongside it on the same machine.
//!
//! ```sh
//! cargo bench --bench report                    # everything (~5 min after the build)
//! cargo bench --bench report -- pipeline policy  # only these sections
//! ```
//!
//! Sections: `startup` (process start → first 200 vs bare axum and Node.js),
//! `ingress` (signed webhook p50/p99 at a fixed rate vs bare axum and raw
//! Azurite puts, RSS idle and peak), `pipeline` (full-pipeline runs/s on
//! Azurite vs Azurite's raw writes/s ÷ writes per run), `contention` (8
//! writers on one run record), `policy` (evals/s vs raw regorus), `deploy`
//! (queue → apply request). The report (markdown) goes to stdout, progress to
//! stderr. `docs/benchmarks.md` explains every row and holds the last result.

#![allow(missing_docs)]

mod common;
mod contention;
mod deploy;
mod ingress;
mod pipeline;
mod policy;
mod startup;

use std::fmt::Write as _;
use std::time::Instant;

use anyhow::{Context, Result, bail};

use common::{Headline, ROLE_ENV, Section, Settings};

/// Every section, in the order they run.
const SECTIONS: [&str; 6] = [
    "startup",
    "ingress",
    "pipeline",
    "contention",
    "policy",
    "deploy",
];

fn main() -> Result<()> {
    if std::env::var(ROLE_ENV).as_deref() == Ok("hello") {
        return ingress::hello_server();
    }
    let args: Vec<String> = std::env::args().skip(1).collect();
    // `cargo bench` passes `--bench`; `cargo test --all-targets` does not, and
    // minutes of load plus Azurite have no place in a test run.
    if !args.iter().any(|a| a == "--bench") {
        eprintln!("report: benchmark only; run it with `cargo bench --bench report`");
        return Ok(());
    }
    let wanted: Vec<&str> = args
        .iter()
        .map(String::as_str)
        .filter(|a| !a.starts_with("--"))
        .collect();
    for name in &wanted {
        if !SECTIONS.contains(name) {
            bail!(
                "unknown section {name:?}; sections: {}",
                SECTIONS.join(", ")
            );
        }
    }
    let selected: Vec<&str> = SECTIONS
        .iter()
        .copied()
        .filter(|s| wanted.is_empty() || wanted.contains(s))
        .collect();
    let settings = Settings::from_env()?;
    let machine = common::machine();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("building the benchmark's runtime")?;
    let started = Instant::now();
    let mut sections = Vec::new();
    for name in &selected {
        let t = Instant::now();
        let section = runtime
            .block_on(run_section(name, &settings))
            .with_context(|| format!("section {name}"))?;
        eprintln!("report: {name} done in {:.0} s", t.elapsed().as_secs_f64());
        sections.push(section);
    }
    drop(runtime);
    println!(
        "{}",
        render(&selected, &sections, &machine, started.elapsed())
    );
    Ok(())
}

async fn run_section(name: &str, settings: &Settings) -> Result<Section> {
    match name {
        "startup" => startup::run(settings.starts).await,
        "ingress" => ingress::run(settings).await,
        "pipeline" => pipeline::run().await,
        "contention" => contention::run().await,
        // Synchronous CPU work: off the runtime's workers.
        "policy" => tokio::task::spawn_blocking(policy::run)
            .await
            .context("the policy section panicked")?,
        "deploy" => deploy::run().await,
        other => bail!("unknown section {other:?}"),
    }
}

fn render(
    selected: &[&str],
    sections: &[Section],
    machine: &str,
    took: std::time::Duration,
) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "## gantry benchmark report\n");
    let _ = writeln!(out, "Machine: {machine}.");
    let _ = writeln!(
        out,
        "Sections: {} ({:.0} s in all, one process, one run).\n",
        selected.join(", "),
        took.as_secs_f64()
    );
    let _ = writeln!(out, "| measure | gantry | baseline, same run |");
    let _ = writeln!(out, "|---|---|---|");
    for Headline {
        what,
        gantry,
        baseline,
    } in sections.iter().flat_map(|s| &s.headlines)
    {
        let _ = writeln!(out, "| {what} | {gantry} | {baseline} |");
    }
    for section in sections {
        out.push_str(&section.detail);
    }
    out
}
