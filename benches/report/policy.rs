//! Policy stage: what policy-enforce does per run (render the app's
//! manifests + build the review inputs + evaluate every policy), next to raw
//! regorus evaluating one of the same policies on the same object.
//! Iterations: `GANTRY_BENCH_POLICY_ITERS` (default 2000).

use std::fmt::Write as _;
use std::path::Path;
use std::time::Instant;

use anyhow::{Context, Result};
use gantry_pipeline::{Config, Digest};
use gantry_policy::PolicySet;

use crate::common::{Headline, Section, Stats, env_or, measure, per_s};

const DIGEST: &str = "sha256:b5b2b2c507a0944348e0303114d8d93aaaa081732b86451d9bce1f432a537bc7";

pub fn run() -> Result<Section> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let n: usize = env_or("GANTRY_BENCH_POLICY_ITERS", 2000)?;
    anyhow::ensure!(n > 0, "GANTRY_BENCH_POLICY_ITERS must be at least 1");
    eprintln!("report: policy: {n} iterations per row");
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
    rows.push((
        "policy stage: render + all policies on all objects",
        measure(n, || {
            let rendered = render()?;
            let v = set.evaluate(&rendered.objects, &[])?;
            std::hint::black_box(v);
            Ok(())
        })?,
    ));
    rows.push((
        "PolicySet::evaluate, all policies, all objects (no render)",
        measure(n, || {
            std::hint::black_box(set.evaluate(&objects, &[])?);
            Ok(())
        })?,
    ));
    let one = PolicySet::load(false, Some(&folder.join("required-labels")))?;
    rows.push((
        "PolicySet::evaluate, k8srequiredlabels, the Deployment",
        measure(n, || {
            std::hint::black_box(one.evaluate(std::slice::from_ref(&deployment), &[])?);
            Ok(())
        })?,
    ));
    let template = std::fs::read_to_string(folder.join("required-labels/template.yaml"))?;
    let (mut engine, rule) = gantry_policy::raw_engine_for_bench(&template)?;
    let input = serde_json::json!({
        "review": {"object": deployment, "kind": {"group": "apps", "version": "v1", "kind": "Deployment"},
                   "name": "web", "namespace": "web", "operation": "CREATE"},
        "parameters": {"labels": ["app.kubernetes.io/name", "app.kubernetes.io/managed-by"]},
    })
    .to_string();
    rows.push((
        "raw regorus (one prepared engine), k8srequiredlabels, the Deployment",
        measure(n, || {
            engine.set_input_json(&input)?;
            std::hint::black_box(engine.eval_rule(rule.clone())?);
            Ok(())
        })?,
    ));

    let mut out = String::new();
    let _ = writeln!(
        out,
        "\n### Policy stage ({} templates, {} constraints, {} objects; policy set compiled in {:.1} ms)\n",
        set.templates().len(),
        set.constraints(),
        objects.len(),
        load.as_secs_f64() * 1e3
    );
    let _ = writeln!(
        out,
        "| scenario | iterations | per second | p50 | p99 | max |"
    );
    let _ = writeln!(out, "|---|---:|---:|---:|---:|---:|");
    for (name, r) in &rows {
        let _ = writeln!(
            out,
            "| {name} | {} | {} | {:.3} ms | {:.3} ms | {:.3} ms |",
            r.n,
            per_s(r.per_second()),
            r.p(0.5).as_secs_f64() * 1e3,
            r.p(0.99).as_secs_f64() * 1e3,
            r.max().as_secs_f64() * 1e3
        );
    }
    let evals = |r: &Stats| {
        format!(
            "{}/s (p99 {:.3} ms)",
            per_s(r.per_second()),
            r.p(0.99).as_secs_f64() * 1e3
        )
    };
    Ok(Section {
        headlines: vec![
            Headline::new(
                "policy evals/s, one policy on one Deployment",
                format!("`PolicySet::evaluate`: {}", evals(&rows[2].1)),
                format!("raw regorus, prepared engine: {}", evals(&rows[3].1)),
            ),
            Headline::new(
                "policy stage per run (render + all policies on all objects)",
                evals(&rows[0].1),
                "–".to_string(),
            ),
        ],
        detail: out,
    })
}
