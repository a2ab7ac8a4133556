//! One-blob contention: 8 writers updating the same run record at once with
//! `RunStore::update` (read → change → replace if the ETag still matches,
//! retried on a lost race), what steps and the operator API do to a run.
//! Baseline: one writer making the same number of updates in sequence. Every
//! pass checks that no update was lost: the run's counter must equal the
//! number of updates that returned `Ok`. An update that loses 16 races in a
//! row returns the transient `PipelineError::Contention` (a step's message is
//! then delivered again); those are counted, not lost.

use std::fmt::Write as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use gantry_pipeline::{PipelineError, RunStatus, RunStore, Step};
use gantry_store::StateStore;
use gantry_testkit::fixtures;

use crate::common::{Headline, Section, Stats, env_or, ms, start_azurite, stop_azurite};

/// Concurrent writers of the contended pass.
const WRITERS: usize = 8;

/// One pass: updates/s, per-update latency and attempts.
struct Pass {
    writers: usize,
    stats: Stats,
    attempts: u64,
    /// Updates that ended in `PipelineError::Contention` (16 lost races in a
    /// row). It is transient: in the pipeline the message is delivered again.
    gave_up: u64,
    lost: i64,
}

pub async fn run() -> Result<Section> {
    let per_writer: usize = env_or("GANTRY_BENCH_CONTENTION_UPDATES", 50)?;
    ensure!(
        per_writer > 0,
        "GANTRY_BENCH_CONTENTION_UPDATES must be at least 1"
    );
    let total = WRITERS * per_writer;
    let mut rows = Vec::new();

    eprintln!("report: contention: Azurite, {WRITERS} writers x {per_writer}");
    let azurite = start_azurite().await?;
    let result = async {
        let store = gantry_store::BlobStore::connect(
            &azurite.connection_string(),
            &gantry_testkit::unique_name("contention"),
            None,
        )?;
        store.ensure_container().await?;
        let store: Arc<dyn StateStore> = Arc::new(store);
        let one = pass(store.clone(), 1, total).await?;
        let many = pass(store, WRITERS, per_writer).await?;
        anyhow::Ok((one, many))
    }
    .await;
    stop_azurite(azurite).await;
    let (one, many) = result?;
    rows.push(("Azurite", one));
    rows.push(("Azurite", many));

    eprintln!("report: contention: embedded store, {WRITERS} writers x {per_writer}");
    let dir = tempfile::tempdir()?;
    let store: Arc<dyn StateStore> =
        Arc::new(gantry_store::FsStore::open(dir.path().join("store"))?);
    rows.push(("embedded store", pass(store.clone(), 1, total).await?));
    rows.push(("embedded store", pass(store, WRITERS, per_writer).await?));

    let mut out = String::new();
    let _ = writeln!(
        out,
        "\n### One run record, concurrent `RunStore::update` ({total} updates per pass)\n"
    );
    let _ = writeln!(
        out,
        "| store | writers | updates/s | p50 (ms) | p99 (ms) | max (ms) | attempts per update | gave up after 16 attempts | lost updates |"
    );
    let _ = writeln!(out, "|---|---:|---:|---:|---:|---:|---:|---:|---:|");
    for (store, p) in &rows {
        let _ = writeln!(
            out,
            "| {store} | {} | {:.0} | {} | {} | {} | {:.2} | {} | {} |",
            p.writers,
            p.stats.per_second(),
            ms(p.stats.p(0.5)),
            ms(p.stats.p(0.99)),
            ms(p.stats.max()),
            p.attempts as f64 / (p.stats.n as f64 + p.gave_up as f64),
            p.gave_up,
            p.lost
        );
    }
    let cell = |p: &Pass| {
        format!(
            "{:.0} updates/s, p99 {} ms, {:.2} attempts/update, {} gave up (retried later), {} lost",
            p.stats.per_second(),
            ms(p.stats.p(0.99)),
            p.attempts as f64 / (p.stats.n as f64 + p.gave_up as f64),
            p.gave_up,
            p.lost
        )
    };
    Ok(Section {
        headlines: vec![Headline::new(
            format!("one-blob contention, {WRITERS} writers on one run (Azurite)"),
            cell(&rows[1].1),
            format!("1 writer: {}", cell(&rows[0].1)),
        )],
        detail: out,
    })
}

/// `writers` tasks each make `each` updates of one fresh run; every update
/// increments `details.count` of its scan step.
async fn pass(store: Arc<dyn StateStore>, writers: usize, each: usize) -> Result<Pass> {
    let runs = RunStore::new(store);
    let source = fixtures::registry_source();
    let now = time::OffsetDateTime::now_utc();
    let mut run = fixtures::run_at("web", RunStatus::Scanning, source, now)?;
    run.steps.insert("scan".into(), Step::pending(1));
    let (app, id) = (run.app.clone(), run.id.clone());
    ensure!(runs.create(&run).await?, "run {id} existed");

    let attempts = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..writers {
        let (runs, app, id, attempts) = (runs.clone(), app.clone(), id.clone(), attempts.clone());
        tasks.spawn(async move {
            let mut samples = Vec::with_capacity(each);
            let mut gave_up = 0u64;
            for _ in 0..each {
                let t = Instant::now();
                let updated = runs
                    .update(&app, &id, |r| {
                        // Called once per attempt: a lost race calls it again.
                        attempts.fetch_add(1, Ordering::Relaxed);
                        let Some(step) = r.steps.get_mut("scan") else {
                            return Ok(false);
                        };
                        let count = step.details["count"].as_u64().unwrap_or(0);
                        step.details = serde_json::json!({ "count": count + 1 });
                        Ok(true)
                    })
                    .await;
                match updated {
                    Ok(_) => samples.push(t.elapsed()),
                    Err(PipelineError::Contention { .. }) => gave_up += 1,
                    Err(e) => return Err(e.into()),
                }
            }
            anyhow::Ok((samples, gave_up))
        });
    }
    let mut samples: Vec<Duration> = Vec::with_capacity(writers * each);
    let mut gave_up = 0;
    while let Some(done) = tasks.join_next().await {
        let (mine, given_up) = done.context("a writer panicked")??;
        samples.extend(mine);
        gave_up += given_up;
    }
    let wall = start.elapsed();
    let samples_ok = samples.len();
    let stored = runs.get(&app, &id).await?.context("the run vanished")?;
    let count = stored.steps["scan"].details["count"].as_u64().unwrap_or(0);
    Ok(Pass {
        writers,
        stats: Stats::from_samples(samples, wall),
        attempts: attempts.load(Ordering::Relaxed),
        gave_up,
        // Every update that returned Ok must be in the counter.
        lost: samples_ok as i64 - count as i64,
    })
}
