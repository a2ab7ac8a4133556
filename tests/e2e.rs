//! End-to-end: the real `gantry` binary in `dev` mode, driven over HTTP exactly
//! as GitHub and Event Grid would drive it.

mod support;

use anyhow::Result;
use serde_json::Value;
use support::{DevHost, example};

const SHA: &str = "3f786850e387550fdab836ed7e6dc881de23001b";
const DIGEST: &str = "sha256:b5b2b2c507a0944348e0303114d8d93aaaa081732b86451d9bce1f432a537bc7";
const ACR_EVENT_ID: &str = "831e1650-001e-001b-66ab-eeb76e069631";

/// Waits until the only run is `deployed`.
async fn settle(runs: &impl Fn() -> Result<Vec<Value>>) -> Result<Value> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        let all = runs()?;
        if let [run] = all.as_slice()
            && run["status"] == "deployed"
        {
            return Ok(run.clone());
        }
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "run did not reach deployed: {all:#?}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

async fn push_then_image(host: &DevHost, runs: impl Fn() -> Result<Vec<Value>>) -> Result<()> {
    let push = example("github-push.json");
    let acr = example("acr-image-pushed.json");

    let (status, body) = host
        .github("push", "11111111-2222-4333-8444-555555555555", &push)
        .await?;
    assert_eq!(status, 202, "{body}");
    assert_eq!(body["runs"][0]["status"], "awaiting-image");
    let run_id = body["runs"][0]["run_id"]
        .as_str()
        .expect("run id")
        .to_string();

    assert_eq!(
        host.enqueue("registry-events", Some(ACR_EVENT_ID), &acr)
            .await?,
        201
    );
    host.drain("registry-events").await?;
    // The gates run too (the example Trivy report is clean, the app complies):
    // the run travels scan → policy → the deploy queue.
    let settled = settle(&runs).await?;

    // Redeliver both 10×: same delivery id and same event id (what GitHub's
    // "Redeliver" and Event Grid's retries do) ...
    for _ in 0..10 {
        let (status, body) = host
            .github("push", "11111111-2222-4333-8444-555555555555", &push)
            .await?;
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["status"], "duplicate");
        assert_eq!(
            host.enqueue("registry-events", Some(ACR_EVENT_ID), &acr)
                .await?,
            201
        );
    }
    // ... and past the broker's duplicate detection (fresh MessageIds, fresh
    // delivery ids): the functions themselves must not create a second run.
    for i in 0..10 {
        let (status, body) = host
            .github("push", &format!("aaaaaaaa-0000-4000-8000-{i:012}"), &push)
            .await?;
        assert_eq!(status, 202, "{body}");
        assert_eq!(
            body["runs"][0]["run_id"],
            run_id.as_str(),
            "same commit, same run"
        );
        assert_eq!(host.enqueue("registry-events", None, &acr).await?, 201);
    }
    host.drain("registry-events").await?;
    for queue in ["scan", "policy"] {
        host.drain(queue).await?;
    }

    let all = runs()?;
    assert_eq!(all.len(), 1, "exactly one run: {all:#?}");
    let run = &all[0];
    assert_eq!(run, &settled, "redeliveries changed nothing");
    assert_eq!(run["id"], run_id.as_str());
    assert_eq!(run["app"], "web");
    assert_eq!(run["status"], "deployed");
    assert_eq!(run["source"]["commit"], SHA);
    assert_eq!(run["source"]["pusher"], "monalisa");
    assert_eq!(run["source"]["repo"], "contoso/web");
    assert_eq!(run["source"]["ref"], "refs/heads/main");
    assert_eq!(run["image"]["digest"], DIGEST);
    assert_eq!(run["image"]["registry"], "contoso.azurecr.io");
    assert_eq!(run["steps"]["scan"]["status"], "passed");
    assert_eq!(run["steps"]["scan"]["attempts"], 1);
    assert_eq!(run["steps"]["policy"]["status"], "passed");
    for field in ["created_at", "updated_at"] {
        assert!(run[field].is_string(), "{field} missing");
    }

    // Exactly one scan message was sent and consumed (a second would still be
    // queued or show as another attempt), and so was exactly one deploy message.
    for queue in ["scan", "policy", "deploy"] {
        let q = host.queue(queue).await?;
        assert_eq!(q["stats"]["active"], 0, "{queue}: {q:#}");
        assert_eq!(q["stats"]["scheduled"], 0, "{queue}: {q:#}");
    }
    for step in ["scan", "policy", "deploy", "verify"] {
        assert_eq!(run["steps"][step]["status"], "passed", "{step}: {run:#}");
        assert_eq!(run["steps"][step]["attempts"], 1, "{step}: {run:#}");
    }
    // The directory target: one file per object under <state>/deploy/web/,
    // the image by digest only.
    let files: Vec<String> = std::fs::read_dir(host.state.join("deploy").join("web"))?
        .map(|e| e.map(|e| e.file_name().to_string_lossy().into_owned()))
        .collect::<Result<_, _>>()?;
    assert!(
        files.iter().any(|f| f.contains("deployment-web")),
        "{files:?}"
    );
    let deployment = files
        .iter()
        .find(|f| f.contains("deployment-web"))
        .expect("file");
    let yaml = std::fs::read_to_string(host.state.join("deploy/web").join(deployment))?;
    assert!(
        yaml.contains(&format!("contoso.azurecr.io/web@{DIGEST}")),
        "{yaml}"
    );
    // One info alert for the deploy, nothing else: the alert function counted
    // it (no channel is configured, so nothing was sent).
    if let Some(records) = host.alert_records(1).await? {
        assert_eq!(records.len(), 1, "{records:#?}");
        assert_eq!(records[0]["kind"], "deployed");
        assert_eq!(records[0]["count"], 1);
        assert_eq!(
            records[0]["notified_by"],
            format!("{run_id}:alert:deployed")
        );
    }
    assert_eq!(host.queue("alerts").await?["stats"]["dead_lettered"], 0);
    // Nothing was rejected or dead-lettered along the way.
    assert_eq!(
        host.queue("registry-events").await?["stats"]["dead_lettered"],
        0
    );
    Ok(())
}

#[tokio::test]
async fn push_then_image_makes_one_run_through_the_gates_to_one_deploy_message() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let host = DevHost::start(dir.path(), &[]).await?;
    push_then_image(&host, || host.runs(&[])).await
}

#[tokio::test]
async fn same_flow_on_azurite_blob_storage() -> Result<()> {
    let azurite = gantry_testkit::Azurite::shared()?;
    let container = gantry_testkit::unique_name("e2e");
    let dir = tempfile::tempdir()?;
    let conn = azurite.connection_string();
    let host = DevHost::start(dir.path(), &["--storage", &conn, "--container", &container]).await?;
    push_then_image(&host, || {
        host.runs(&["--storage", &conn, "--container", &container])
    })
    .await?;
    // The state really is in Blob Storage: the embedded store stayed empty.
    assert!(!dir.path().join("store").join("runs").exists());
    Ok(())
}

#[tokio::test]
async fn state_survives_a_restart_of_the_dev_host() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let push = example("github-push.json");
    let run_id = {
        let host = DevHost::start(dir.path(), &[]).await?;
        let (status, body) = host
            .github("push", "22222222-2222-4333-8444-555555555555", &push)
            .await?;
        assert_eq!(status, 202);
        body["runs"][0]["run_id"].as_str().expect("id").to_string()
    };
    let host = DevHost::start(dir.path(), &[]).await?;
    let (status, body) = host
        .github("push", "22222222-2222-4333-8444-555555555555", &push)
        .await?;
    assert_eq!((status, body["status"].as_str()), (200, Some("duplicate")));
    assert_eq!(
        host.enqueue(
            "registry-events",
            Some(ACR_EVENT_ID),
            &example("acr-image-pushed.json")
        )
        .await?,
        201
    );
    let run = host.settle(&["deployed"], &[]).await?;
    assert_eq!(run["id"], run_id.as_str());
    Ok(())
}

#[tokio::test]
async fn cli_send_signs_and_routes_samples() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let host = DevHost::start(dir.path(), &[]).await?;
    let send = |file: &str| {
        std::process::Command::new(env!("CARGO_BIN_EXE_gantry"))
            .args(["send", "--url", &host.url("")])
            .arg(support::repo_root().join("examples").join(file))
            .env_remove("GANTRY_GITHUB_WEBHOOK_SECRET")
            .output()
    };
    for file in [
        "github-ping.json",
        "github-push.json",
        "acr-image-pushed.json",
    ] {
        let out = send(file)?;
        assert!(
            out.status.success(),
            "{file}: {}",
            String::from_utf8_lossy(&out.stdout)
        );
    }
    host.settle(&["deployed"], &[]).await?;
    // A human table too.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_gantry"))
        .args(["runs", "list", "--state"])
        .arg(dir.path())
        .output()?;
    let table = String::from_utf8(out.stdout)?;
    assert!(table.starts_with("RUN "), "{table}");
    assert!(
        table.contains("web") && table.contains("deployed") && table.contains("3f786850"),
        "{table}"
    );
    Ok(())
}
