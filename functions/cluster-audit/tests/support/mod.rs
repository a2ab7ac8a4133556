//! Setup the two cluster-audit suites (`audit.rs`, `governance.rs`) share:
//! the deployed run they audit against, firing the timer, and the alerts
//! they read back.

use anyhow::{Context, Result, ensure};
use axum::Router;
use gantry_bus::{EmbeddedBus, MessageView};
use gantry_pipeline::messages::{Deployed, DeployedVersion};
use gantry_pipeline::{Config, Digest, Run, RunStatus, RunStore};
use gantry_testkit::fixtures::{self, DIGEST};
use http::StatusCode;
use http_body_util::BodyExt;
use serde_json::{Value, json};
use tower::ServiceExt;

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

/// Fires the `cluster-audit` timer through the real timer envelope; returns
/// the status and the function's log line.
pub async fn fire(router: &Router) -> Result<(StatusCode, String)> {
    let envelope =
        gantry_runtime::host_request_for_timer("0 */15 * * * *", false, "2026-11-27T09:00:00Z");
    let request = http::Request::post("/cluster-audit")
        .header("content-type", "application/json")
        .body(axum::body::Body::from(serde_json::to_vec(&envelope)?))?;
    let response = router.clone().oneshot(request).await?;
    let status = response.status();
    let bytes = response.into_body().collect().await?.to_bytes();
    let reply: Value = serde_json::from_slice(&bytes)?;
    let line = reply["Logs"][0].as_str().context("log line")?.to_string();
    Ok((status, line))
}

/// [`fire`], expecting 200; returns the log line.
pub async fn fire_ok(router: &Router) -> Result<String> {
    let (status, line) = fire(router).await?;
    ensure!(status == StatusCode::OK, "{status}: {line}");
    Ok(line)
}
