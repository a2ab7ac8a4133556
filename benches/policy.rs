//! Policy-stage benchmark: what policy-enforce does per run (render the app's
//! manifests + build the review inputs + evaluate every policy), next to raw
//! regorus evaluating one of the same policies on the same object, in one run.
//!
//! `cargo bench --bench policy` prints a markdown table. Iterations are set
//! with `GANTRY_BENCH_POLICY_ITERS` (default 2000).

#![allow(missing_docs)]

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use gantry_pipeline::{Config, Digest};
use gantry_policy::PolicySet;

const DIGEST: &str = "sha256:b5b2b2c507a0944348e0303114d8d93aaaa081732b86451d9bce1f432a537bc7";

struct Stats {
    name: String,
    n: usize,
    total: Duration,
    p50: Duration,
    p99: Duration,
    max: Duration,
}

fn measure(name: &str, n: usize, mut f: impl FnMut() -> Result<()>) -> Result<Stats> {
    for _ in 0..n.min(100) {
        f()?; // warm-up: caches, allocator
    }
    let mut samples = Vec::with_capacity(n);
    let start = Instant::now();
    for _ in 0..n {
        let t = Instant::now();
        f()?;
        samples.push(t.elapsed());
    }
    let total = start.elapsed();
    samples.sort();
    let at = |q: f64| samples[((samples.len() as f64 * q) as usize).min(samples.len() - 1)];
    Ok(Stats {
        name: name.to_string(),
        n,
        total,
        p50: at(0.50),
        p99: at(0.99),
        max: samples[samples.len() - 1],
    })
}

fn main() -> Result<()> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let n: usize = std::env::var("GANTRY_BENCH_POLICY_ITERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2000);
    let mut config = Config::load(&root.join("gantry.toml"))?;
    config.base_dir = Some(root.to_path_buf());
    let app = config.app("web").context("app web")?.clone();
    let digest = Digest::parse(DIGEST)?;
    let folder = config.resolve(config.policy.folder.as_deref().context("policy folder")?);

    let load_start = Instant::now();
    let set = PolicySet::load(true, Some(&folder))?;
    let load = load_start.elapsed();
    let render = || {
        gantry_manifests::render(&gantry_manifests::RenderInput {
            app: &app,
            digest: &digest,
            registry_image: &app.image,
            run_id: None,
            commit: None,
            verdicts: Some("scan: passed"),
        })
    };
    let objects = render()?.objects;
    let deployment = objects
        .iter()
        .find(|o| o["kind"] == "Deployment")
        .context("a Deployment")?
        .clone();
    let violations = set.evaluate(&objects, &[])?;
    anyhow::ensure!(
        violations
            .iter()
            .all(|v| !v.enforcement_action.is_blocking()),
        "the example app must comply: {violations:?}"
    );

    let mut rows = Vec::new();
    rows.push(measure(
        "policy stage: render + all policies on all objects",
        n,
        || {
            let rendered = render()?;
            let v = set.evaluate(&rendered.objects, &[])?;
            std::hint::black_box(v);
            Ok(())
        },
    )?);
    rows.push(measure(
        "PolicySet::evaluate, all policies, all objects (no render)",
        n,
        || {
            std::hint::black_box(set.evaluate(&objects, &[])?);
            Ok(())
        },
    )?);
    let one = PolicySet::load(false, Some(&folder.join("required-labels")))?;
    rows.push(measure(
        "PolicySet::evaluate, k8srequiredlabels, the Deployment",
        n,
        || {
            std::hint::black_box(one.evaluate(std::slice::from_ref(&deployment), &[])?);
            Ok(())
        },
    )?);
    let template = std::fs::read_to_string(folder.join("required-labels/template.yaml"))?;
    let (mut engine, rule) = gantry_policy::raw_engine_for_bench(&template)?;
    let input = serde_json::json!({
        "review": {"object": deployment, "kind": {"group": "apps", "version": "v1", "kind": "Deployment"},
                   "name": "web", "namespace": "web", "operation": "CREATE"},
        "parameters": {"labels": ["app.kubernetes.io/name", "app.kubernetes.io/managed-by"]},
    })
    .to_string();
    rows.push(measure(
        "raw regorus (one prepared engine), k8srequiredlabels, the Deployment",
        n,
        || {
            engine.set_input_json(&input)?;
            std::hint::black_box(engine.eval_rule(rule.clone())?);
            Ok(())
        },
    )?);

    println!(
        "\n## Policy stage ({} templates, {} constraints, {} objects; policy set compiled in {:.1} ms)\n",
        set.templates().len(),
        set.constraints(),
        objects.len(),
        load.as_secs_f64() * 1e3
    );
    println!("| scenario | iterations | per second | p50 | p99 | max |");
    println!("|---|---:|---:|---:|---:|---:|");
    for r in &rows {
        println!(
            "| {} | {} | {:.0} | {:.3} ms | {:.3} ms | {:.3} ms |",
            r.name,
            r.n,
            r.n as f64 / r.total.as_secs_f64(),
            r.p50.as_secs_f64() * 1e3,
            r.p99.as_secs_f64() * 1e3,
            r.max.as_secs_f64() * 1e3
        );
    }
    Ok(())
}
