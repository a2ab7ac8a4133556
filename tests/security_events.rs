//! End-to-end: Defender for Cloud samples enqueued on `security-events` of the
//! real `gantry dev` (example `gantry.toml`: its `[security] clusters` is the
//! samples' cluster), after the web change was delivered.

mod support;

use std::time::{Duration, Instant};

use anyhow::{Result, ensure};
use serde_json::Value;
use support::{DevHost, example};

const DIGEST: &str = "sha256:b5b2b2c507a0944348e0303114d8d93aaaa081732b86451d9bce1f432a537bc7";

/// Reads a blob of the embedded store (`<state>/store/<name>`), waiting for it.
async fn wait_blob(host: &DevHost, name: &str) -> Result<Value> {
    let path = host.state.join("store").join(name);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(bytes) = std::fs::read(&path) {
            return Ok(serde_json::from_slice(&bytes)?);
        }
        ensure!(
            Instant::now() < deadline,
            "{} never appeared",
            path.display()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn defender_alerts_correlate_block_and_record_through_gantry_dev() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let host = DevHost::start(dir.path(), &[]).await?;
    let run = host
        .push_and_image(
            "aaaaaaaa-2222-4333-8444-555555555555",
            "evt-1",
            &["deployed"],
        )
        .await?;

    // PascalCase (workflow automation): namespace web in aks-prod, web's digest.
    let alert = example("defender/alert-workflow-automation.pascal.json");
    assert_eq!(host.enqueue("security-events", None, &alert).await?, 201);
    let blocked = wait_blob(&host, &format!("apps/web/blocked/{DIGEST}")).await?;
    assert_eq!(blocked["step"], "security");
    assert_eq!(blocked["run_id"], run["id"]);
    host.drain("security-events").await?;
    let runs = host.runs(&[])?;
    assert_eq!(runs.len(), 1);
    assert_eq!(
        runs[0]["security_alerts"][0]["blocked"], true,
        "{:#?}",
        runs[0]
    );
    let shown = std::process::Command::new(env!("CARGO_BIN_EXE_gantry"))
        .args(["runs", "show"])
        .arg(run["id"].as_str().unwrap_or_default())
        .arg("--state")
        .arg(&host.state)
        .env_remove("GANTRY_STORAGE")
        .output()?;
    let shown = String::from_utf8(shown.stdout)?;
    assert!(
        shown.contains("Digital currency mining related behavior detected  [digest blocked]"),
        "{shown}"
    );

    // Uncorrelated (a cluster gantry does not manage): recorded, not dropped.
    let other = example("defender/alert-uncorrelated.pascal.json");
    assert_eq!(host.enqueue("security-events", None, &other).await?, 201);
    host.drain("security-events").await?;
    let unmatched: Vec<_> = std::fs::read_dir(host.state.join("store/security/unmatched"))?
        .collect::<Result<_, _>>()?;
    assert_eq!(unmatched.len(), 1);

    // JSON, but no Defender event: rejected and recorded, not dead-lettered.
    // (The dev endpoint itself refuses bodies that are not JSON.)
    assert_eq!(
        host.enqueue("security-events", Some("bad-1"), br#"{"hello": "world"}"#)
            .await?,
        201
    );
    host.drain("security-events").await?;
    wait_blob(&host, "rejected/security-event/bad-1.json").await?;
    let queue = host.queue("security-events").await?;
    assert_eq!(queue["stats"]["dead_lettered"], 0, "{queue}");
    Ok(())
}
