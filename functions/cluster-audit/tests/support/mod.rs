//! Setup the two cluster-audit suites (`audit.rs`, `governance.rs`) share:
//! the deployed run they audit against, and the alerts they read back.

use anyhow::{Context, Result, ensure};
use gantry_bus::{EmbeddedBus, MessageView};
use gantry_pipeline::messages::{Deployed, DeployedVersion};
use gantry_pipeline::{Config, Digest, Run, RunStatus, RunStore};
use gantry_testkit::fixtures::{self, DIGEST};
use serde_json::{Value, json};

/// Records a deployed run of `web` for [`DIGEST`] as the pipeline leaves
/// it (scan passed with `scan_summary`, then policy, deploy and verify
/// passed) with `apps/web/deployed.json` naming it current; returns the run
/// and the objects deploy applied for it.
pub async fn deployed_web(
    runs: &RunStore,
    config: &Config,
    scan_summary: &str,
) -> Result<(Run, Vec<Value>)> {
    let mut run = fixtures::with_image(fixtures::run("web", RunStatus::Deployed)?, DIGEST)?;
    let verdict = json!({"passed": true, "blocking": [], "allowed": []});
    fixtures::passed(&mut run, "scan", scan_summary, verdict);
    let app = config.app("web").context("app")?;
    let rendered = gantry_manifests::render_run(app, &run)?;
    for step in ["policy", "deploy", "verify"] {
        fixtures::passed(&mut run, step, "passed", Value::Null);
    }
    ensure!(runs.create(&run).await?);
    let current = DeployedVersion {
        digest: Digest::parse(DIGEST)?,
        run_id: run.id.clone(),
        manifest_hash: rendered.hash.clone(),
    };
    let deployed = Deployed {
        current: Some(current),
        previous: None,
    };
    runs.put_json("apps/web/deployed.json", &deployed).await?;
    Ok((run, rendered.objects))
}

/// Every message waiting on the `alerts` queue: (MessageId, body).
pub async fn alerts(bus: &EmbeddedBus) -> Result<Vec<(String, Value)>> {
    let messages: Vec<MessageView> = bus.peek("alerts").await;
    messages
        .into_iter()
        .map(|m| Ok((m.message_id, serde_json::from_str(&m.body)?)))
        .collect()
}
