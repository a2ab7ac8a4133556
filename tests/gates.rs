//! End-to-end through the gates in `gantry dev`: a push and its image event,
//! a Trivy report on disk, gantry's built-in policies and a policy folder.

mod support;

use std::path::Path;

use anyhow::Result;
use serde_json::Value;
use support::{DevHost, example, repo_root};

const DIGEST: &str = "sha256:b5b2b2c507a0944348e0303114d8d93aaaa081732b86451d9bce1f432a537bc7";

fn write_config(
    dir: &Path,
    trivy_dir: &Path,
    policy_folder: Option<&Path>,
) -> Result<std::path::PathBuf> {
    let mut text = format!(
        "[[apps]]\nname = \"web\"\nrepo = \"contoso/web\"\nimage = \"contoso.azurecr.io/web\"\n\n[scan]\nthreshold = \"high\"\ntrivy_dir = {:?}\n",
        trivy_dir.display().to_string()
    );
    if let Some(folder) = policy_folder {
        text.push_str(&format!(
            "\n[policy]\nfolder = {:?}\n",
            folder.display().to_string()
        ));
    }
    let path = dir.join("gantry.toml");
    std::fs::write(&path, text)?;
    Ok(path)
}

/// Posts the example push and image event, then waits for the run to settle
/// in one of `until` statuses.
async fn run_to(host: &DevHost, until: &[&str]) -> Result<Value> {
    host.push_and_image(
        "44444444-2222-4333-8444-555555555555",
        "831e1650-001e-001b-66ab-eeb76e069631",
        until,
    )
    .await
}

#[tokio::test]
async fn a_critical_cve_blocks_the_run_with_the_cve_on_the_record() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let scans = dir.path().join("scans");
    std::fs::create_dir_all(&scans)?;
    std::fs::copy(
        repo_root().join("examples/trivy-criticals.json"),
        scans.join(format!("{DIGEST}.trivy.json")),
    )?;
    let config = write_config(dir.path(), &scans, None)?;
    let host = DevHost::start(
        &dir.path().join("state"),
        &["--config", config.to_str().unwrap_or_default()],
    )
    .await?;
    let run = run_to(&host, &["blocked", "failed", "deployed"]).await?;
    assert_eq!(run["status"], "blocked", "{run:#}");
    let scan = &run["steps"]["scan"];
    assert_eq!(scan["status"], "blocked");
    let blocking = scan["details"]["blocking"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    assert!(!blocking.is_empty(), "{scan:#}");
    assert!(
        blocking.iter().any(|f| f["severity"] == "critical"
            && f["id"].as_str().is_some_and(|id| id.starts_with("CVE-"))),
        "{blocking:#?}"
    );
    for field in ["package", "installed_version"] {
        assert!(
            blocking[0][field].is_string(),
            "{field} missing: {:#}",
            blocking[0]
        );
    }
    assert!(run["steps"].get("policy").is_none(), "never reached policy");
    let deploy = host.queue("deploy").await?;
    assert_eq!(deploy["stats"]["active"], 0);
    let records = host.alert_records(1).await?.unwrap_or_default();
    assert_eq!(records.len(), 1, "one high alert: {records:#?}");
    assert_eq!(records[0]["kind"], "scan-blocked");
    Ok(())
}

#[tokio::test]
async fn a_clean_report_and_compliant_app_reach_the_deploy_queue() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let config = write_config(
        dir.path(),
        &repo_root().join("examples/scans"),
        Some(&repo_root().join("examples/policies")),
    )?;
    let host = DevHost::start(
        &dir.path().join("state"),
        &["--config", config.to_str().unwrap_or_default()],
    )
    .await?;
    let run = run_to(&host, &["blocked", "failed", "deployed"]).await?;
    assert_eq!(run["status"], "deployed", "{run:#}");
    assert_eq!(run["steps"]["scan"]["status"], "passed");
    let policy = &run["steps"]["policy"];
    assert_eq!(policy["status"], "passed", "{policy:#}");
    assert!(
        policy["details"]["constraints"].as_u64().unwrap_or(0) >= 2,
        "built-ins and the folder: {policy:#}"
    );
    assert!(
        policy["details"]["manifest_hash"]
            .as_str()
            .is_some_and(|h| h.len() == 64)
    );
    assert_eq!(run["steps"]["deploy"]["status"], "passed", "{run:#}");
    // The directory target holds the manifests the policy gate checked.
    assert_eq!(
        run["steps"]["deploy"]["details"]["manifest_hash"],
        policy["details"]["manifest_hash"]
    );
    assert!(dir.path().join("state/deploy/web").is_dir());
    Ok(())
}

#[tokio::test]
async fn a_constraint_the_app_violates_blocks_with_its_message() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let policies = dir.path().join("policies");
    std::fs::create_dir_all(&policies)?;
    std::fs::copy(
        repo_root().join("examples/policies/required-labels/template.yaml"),
        policies.join("template.yaml"),
    )?;
    std::fs::write(
        policies.join("constraint.yaml"),
        "apiVersion: constraints.gatekeeper.sh/v1beta1\nkind: K8sRequiredLabels\nmetadata:\n  name: deployments-need-an-owner\nspec:\n  match:\n    kinds:\n      - apiGroups: [\"apps\"]\n        kinds: [\"Deployment\"]\n  parameters:\n    labels: [\"owner\"]\n",
    )?;
    let config = write_config(
        dir.path(),
        &repo_root().join("examples/scans"),
        Some(&policies),
    )?;
    let host = DevHost::start(
        &dir.path().join("state"),
        &["--config", config.to_str().unwrap_or_default()],
    )
    .await?;
    let run = run_to(&host, &["blocked", "failed", "deployed"]).await?;
    assert_eq!(run["status"], "blocked", "{run:#}");
    let policy = &run["steps"]["policy"];
    assert_eq!(policy["status"], "blocked");
    let summary = policy["summary"].as_str().unwrap_or_default();
    assert!(
        summary.contains("deployments-need-an-owner") && summary.contains("owner"),
        "{summary}"
    );
    let violations = policy["details"]["violations"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    assert_eq!(violations.len(), 1, "{violations:#?}");
    assert_eq!(violations[0]["kind"], "Deployment");
    assert_eq!(host.queue("deploy").await?["stats"]["active"], 0);
    Ok(())
}

#[tokio::test]
async fn a_broken_policy_file_fails_the_run_naming_file_and_line() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let policies = dir.path().join("policies");
    std::fs::create_dir_all(&policies)?;
    let template = std::fs::read_to_string(
        repo_root().join("examples/policies/required-labels/template.yaml"),
    )?;
    std::fs::write(
        policies.join("broken.yaml"),
        template.replace("count(missing) > 0", "count(missing) > > 0"),
    )?;
    let config = write_config(
        dir.path(),
        &repo_root().join("examples/scans"),
        Some(&policies),
    )?;
    let host = DevHost::start(
        &dir.path().join("state"),
        &["--config", config.to_str().unwrap_or_default()],
    )
    .await?;
    let run = run_to(&host, &["blocked", "failed", "deployed"]).await?;
    assert_eq!(run["status"], "failed", "{run:#}");
    let summary = run["steps"]["policy"]["summary"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(summary.contains("broken.yaml"), "names the file: {summary}");
    assert!(
        summary.contains(":3") || summary.contains("line"),
        "names a line: {summary}"
    );
    // Acknowledged, not retried forever: nothing left in the policy queue.
    host.drain("policy").await?;
    assert_eq!(host.queue("policy").await?["stats"]["dead_lettered"], 0);
    Ok(())
}

#[tokio::test]
async fn a_second_image_deploys_and_records_the_previous_good_version() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let scans = dir.path().join("scans");
    std::fs::create_dir_all(&scans)?;
    let second_sha = "9fceb02d0ae598e95dc970b74767f19372d61af8";
    let second = format!("sha256:{}", "c0ffee".repeat(10) + "0123");
    let clean =
        std::fs::read_to_string(repo_root().join(format!("examples/scans/{DIGEST}.trivy.json")))?;
    std::fs::write(scans.join(format!("{DIGEST}.trivy.json")), &clean)?;
    std::fs::write(
        scans.join(format!("{second}.trivy.json")),
        clean.replace(DIGEST, &second),
    )?;
    let config = write_config(dir.path(), &scans, None)?;
    // An operator token for the rollback at the end.
    let tokens = format!("ops:operate:{}", sha256_hex(OPERATE));
    let host = DevHost::start_with_env(
        &dir.path().join("state"),
        &["--config", config.to_str().unwrap_or_default()],
        &[("GANTRY_API_TOKENS", &tokens)],
    )
    .await?;
    let first = run_to(&host, &["blocked", "failed", "deployed"]).await?;
    assert_eq!(first["status"], "deployed", "{first:#}");

    // Commit 2 and its image.
    let mut push: Value = serde_json::from_slice(&example("github-push.json"))?;
    push["after"] = second_sha.into();
    push["head_commit"]["id"] = second_sha.into();
    let (status, body) = host
        .github(
            "push",
            "55555555-2222-4333-8444-555555555555",
            &serde_json::to_vec(&push)?,
        )
        .await?;
    assert_eq!(status, 202, "{body}");
    let second_run = body["runs"][0]["run_id"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let mut event: Value = serde_json::from_slice(&example("acr-image-pushed.json"))?;
    event[0]["id"] = "e2e00000-0000-4000-8000-000000000002".into();
    event[0]["data"]["target"]["tag"] = second_sha.into();
    event[0]["data"]["target"]["digest"] = second.clone().into();
    assert_eq!(
        host.enqueue("registry-events", None, &serde_json::to_vec(&event)?)
            .await?,
        201
    );

    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        let runs = host.runs(&[])?;
        if runs
            .iter()
            .any(|r| r["id"] == second_run.as_str() && r["status"] == "deployed")
        {
            break;
        }
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "second run not deployed: {runs:#?}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let deployed: Value = serde_json::from_slice(&std::fs::read(
        dir.path().join("state/store/apps/web/deployed.json"),
    )?)?;
    assert_eq!(
        deployed["current"]["digest"],
        second.as_str(),
        "{deployed:#}"
    );
    assert_eq!(deployed["current"]["run_id"], second_run.as_str());
    assert_eq!(
        deployed["previous"]["digest"], DIGEST,
        "previous good recorded: {deployed:#}"
    );
    assert_eq!(deployed["previous"]["run_id"], first["id"]);
    let first_hash = deployed["previous"]["manifest_hash"].clone();
    // The directory now holds the second image.
    let files = std::fs::read_dir(dir.path().join("state/deploy/web"))?;
    let mut found = false;
    for file in files {
        let text = std::fs::read_to_string(file?.path())?;
        found |= text.contains(&format!("@{second}"));
        assert!(
            !text.contains(&format!("@{DIGEST}")),
            "old digest left behind"
        );
    }
    assert!(found, "the Deployment names the second digest");

    // An operator rolls back to the previous good version: a new run that
    // deploys the first digest again and moves deployed.json forward.
    let response = host
        .client
        .post(host.url("/api/apps/web/rollback"))
        .bearer_auth(OPERATE)
        .json(&serde_json::json!({"reason": "e2e: bad release"}))
        .send()
        .await?;
    assert_eq!(response.status(), 202);
    let rollback: Value = response.json().await?;
    assert_eq!(rollback["rollback"]["run_id"], first["id"], "{rollback:#}");
    assert_eq!(rollback["rollback"]["requested_by"], "ops");
    assert_eq!(rollback["image"]["digest"], DIGEST);
    let rollback_id = rollback["id"].as_str().unwrap_or_default().to_string();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        let runs = host.runs(&[])?;
        if runs
            .iter()
            .any(|r| r["id"] == rollback_id.as_str() && r["status"] == "deployed")
        {
            break;
        }
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "rollback run not deployed: {runs:#?}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let deployed: Value = serde_json::from_slice(&std::fs::read(
        dir.path().join("state/store/apps/web/deployed.json"),
    )?)?;
    assert_eq!(deployed["current"]["digest"], DIGEST, "{deployed:#}");
    assert_eq!(deployed["current"]["run_id"], rollback_id.as_str());
    assert_eq!(
        deployed["current"]["manifest_hash"], first_hash,
        "the first run's manifests, exactly: {deployed:#}"
    );
    assert_eq!(deployed["previous"]["digest"], second.as_str());
    let mut back = false;
    for file in std::fs::read_dir(dir.path().join("state/deploy/web"))? {
        let text = std::fs::read_to_string(file?.path())?;
        back |= text.contains(&format!("@{DIGEST}"));
        assert!(!text.contains(&format!("@{second}")), "second digest left");
    }
    assert!(back, "the Deployment names the first digest again");
    Ok(())
}

const OPERATE: &str = "e2e-operator-token";

fn sha256_hex(token: &str) -> String {
    use sha2::Digest as _;
    hex::encode(sha2::Sha256::digest(token.as_bytes()))
}

/// `POST /dev/timers/cluster-audit` fires the audit through the timer
/// envelope: a deployed app without drift alerts nothing; a hand-edited file
/// in the GitOps folder raises one drift alert, once.
#[tokio::test]
async fn dev_timer_fires_the_cluster_audit_and_shows_directory_drift() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let config = write_config(
        dir.path(),
        &repo_root().join("examples/scans"),
        Some(&repo_root().join("examples/policies")),
    )?;
    let host = DevHost::start(
        &dir.path().join("state"),
        &["--config", config.to_str().unwrap_or_default()],
    )
    .await?;
    let run = run_to(&host, &["blocked", "failed", "deployed"]).await?;
    assert_eq!(run["status"], "deployed", "{run:#}");
    let fire = || async {
        let r = host
            .client
            .post(host.url("/dev/timers/cluster-audit"))
            .header("content-type", "application/json")
            .send()
            .await?;
        let status = r.status().as_u16();
        anyhow::Ok((status, r.json::<serde_json::Value>().await?))
    };
    // Alerts are consumed by the alert function: count its de-duplication
    // records of kind `drift` (one per fingerprint, once processed).
    let drift_alerts = || async {
        let records = host.alert_records(0).await?.unwrap_or_default();
        anyhow::Ok(
            records
                .into_iter()
                .filter(|r| r["kind"] == "drift")
                .collect::<Vec<_>>(),
        )
    };
    let (status, reply) = fire().await?;
    assert_eq!(status, 200, "{reply}");
    assert!(
        reply["logs"][0]
            .as_str()
            .is_some_and(|l| l.contains("web: 0 open findings")),
        "{reply}"
    );
    assert!(drift_alerts().await?.is_empty());

    let file = dir.path().join("state/deploy/web/06-deployment-web.yaml");
    let text = std::fs::read_to_string(&file)?;
    assert!(text.contains("replicas: 2"), "{text}");
    std::fs::write(&file, text.replace("replicas: 2", "replicas: 4"))?;
    let (status, reply) = fire().await?;
    assert_eq!(status, 200, "{reply}");
    fire().await?;
    let alerts = drift_alerts().await?;
    assert_eq!(alerts.len(), 1, "{alerts:#?}");
    assert_eq!(alerts[0]["count"], 1, "alerted once: {alerts:#?}");
    // The finding itself, with its reason, is in the audit state.
    let state = std::fs::read_to_string(dir.path().join("state/store/audit/state/web.json"))?;
    assert!(state.contains("spec.replicas is 4"), "{state}");
    // No cluster to govern with the directory target, and it says so.
    assert!(
        reply["logs"][0]
            .as_str()
            .is_some_and(|l| l.contains("governance: skipped")),
        "{reply}"
    );
    // `gantry audit` lists the open finding the real sweep recorded.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_gantry"))
        .args(["audit", "--json", "--kind", "drift", "--url", &host.url("")])
        .env_remove("GANTRY_TOKEN")
        .env_remove("GANTRY_STATE")
        .env_remove("GANTRY_STORAGE")
        .output()?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let listed: Value = serde_json::from_slice(&out.stdout)?;
    assert_eq!(
        listed["findings"][0]["fingerprint"], "drift:Deployment/web:spec.replicas",
        "{listed:#}"
    );
    assert_eq!(listed["findings"][0]["severity"], "high");
    assert_eq!(listed["findings"][0]["app"], "web");
    assert_eq!(
        listed["findings"].as_array().map(Vec::len),
        Some(1),
        "{listed:#}"
    );

    let unknown = host
        .client
        .post(host.url("/dev/timers/deploy"))
        .header("content-type", "application/json")
        .send()
        .await?;
    assert_eq!(unknown.status().as_u16(), 404);
    Ok(())
}
