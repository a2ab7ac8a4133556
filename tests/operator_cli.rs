//! The operator CLI (`gantry runs list|show|retrigger|approve|reject`,
//! `gantry apps rollback`) against the real API: `gantry dev` for runs, and
//! a recording fake for the rollback contract (the endpoint lands
//! separately).

mod support;

use std::process::{Command, Output};
use std::sync::{Arc, Mutex};

use anyhow::{Context, Result};
use serde_json::{Value, json};
use support::{DevHost, example, repo_root};

const DIGEST: &str = "sha256:b5b2b2c507a0944348e0303114d8d93aaaa081732b86451d9bce1f432a537bc7";

/// Runs `gantry` with `args` against the API at `url`, with no store named
/// and no token in the environment (so the CLI calls the API, with the
/// development token on loopback unless `--token` is given).
fn gantry(url: &str, args: &[&str]) -> Result<Output> {
    Command::new(env!("CARGO_BIN_EXE_gantry"))
        .args(args)
        .env("GANTRY_URL", url)
        .env_remove("GANTRY_TOKEN")
        .env_remove("GANTRY_STATE")
        .env_remove("GANTRY_STORAGE")
        .env("GANTRY_LOG", "warn")
        .output()
        .context("running gantry")
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[tokio::test]
async fn retrigger_from_scan_after_fixing_the_report_deploys() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let scans = dir.path().join("scans");
    std::fs::create_dir_all(&scans)?;
    let report = scans.join(format!("{DIGEST}.trivy.json"));
    std::fs::copy(repo_root().join("examples/trivy-criticals.json"), &report)?;
    let config = dir.path().join("gantry.toml");
    std::fs::write(
        &config,
        format!(
            "[[apps]]\nname = \"web\"\nrepo = \"contoso/web\"\nimage = \"contoso.azurecr.io/web\"\n\n[scan]\nthreshold = \"high\"\ntrivy_dir = {:?}\n",
            scans.display().to_string()
        ),
    )?;
    let host = DevHost::start(
        &dir.path().join("state"),
        &["--config", config.to_str().unwrap_or_default()],
    )
    .await?;
    let url = host.url("");
    let run = host
        .push_and_image(
            "44444444-2222-4333-8444-555555555555",
            "831e1650-001e-001b-66ab-eeb76e069631",
            &["blocked", "failed", "deployed"],
        )
        .await?;
    assert_eq!(run["status"], "blocked", "{run:#}");
    assert_eq!(run["steps"]["scan"]["status"], "blocked");
    let id = run["id"].as_str().context("id")?.to_string();

    // list and show go through the API (no store named) with the dev token.
    let out = gantry(&url, &["runs", "list"])?;
    assert!(out.status.success(), "{}", stderr(&out));
    let table = stdout(&out);
    let header = table.lines().next().unwrap_or_default();
    assert!(
        header.starts_with("RUN ") && header.contains("DIGEST") && header.contains("AGE"),
        "{table}"
    );
    let row = table.lines().nth(1).unwrap_or_default();
    assert!(
        row.starts_with(&id) && row.contains("blocked") && row.contains(&DIGEST[..19]),
        "{table}"
    );
    // Columns are aligned: the status starts where its header does.
    assert_eq!(header.find("STATUS"), row.find("blocked"), "{table}");
    let out = gantry(
        &url,
        &[
            "runs", "list", "--json", "--status", "blocked", "--app", "web",
        ],
    )?;
    let listed: Vec<Value> = serde_json::from_slice(&out.stdout)?;
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0]["id"], id.as_str());

    // An action refused by the API: `error: <code>: <message>`, non-zero.
    let out = gantry(&url, &["runs", "retrigger", &id, "--from", "deploy"])?;
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("error: step_not_passed: step scan"),
        "{}",
        stderr(&out)
    );
    // A wrong token is refused and never echoed.
    let out = gantry(&url, &["runs", "list", "--token", "not-the-token-xyz"])?;
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("error: unauthorized:"),
        "{}",
        stderr(&out)
    );
    assert!(
        !stderr(&out).contains("not-the-token-xyz") && !stdout(&out).contains("not-the-token-xyz")
    );

    // Fix the report, retrigger from scan: the run deploys.
    std::fs::copy(
        repo_root().join(format!("examples/scans/{DIGEST}.trivy.json")),
        &report,
    )?;
    let out = gantry(
        &url,
        &[
            "runs",
            "retrigger",
            &id,
            "--from",
            "scan",
            "--reason",
            "report fixed",
        ],
    )?;
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stdout(&out).contains(&format!("retriggered run {id}")),
        "{}",
        stdout(&out)
    );
    assert!(stdout(&out).contains("scanning"), "{}", stdout(&out));
    let run = host.settle(&["blocked", "failed", "deployed"], &[]).await?;
    assert_eq!(run["status"], "deployed", "{run:#}");
    assert_eq!(run["steps"]["scan"]["status"], "passed");
    assert_eq!(run["steps"]["scan"]["attempts"], 2);
    assert_eq!(
        run["retriggers"][0]["previous"]["scan"]["status"],
        "blocked"
    );

    // The whole record over the API: retrigger and audit with the principal.
    let out = gantry(&url, &["runs", "show", &id, "--json"])?;
    assert!(out.status.success(), "{}", stderr(&out));
    let shown: Value = serde_json::from_slice(&out.stdout)?;
    assert_eq!(shown["status"], "deployed");
    assert_eq!(shown["retriggers"][0]["by"], "dev");
    assert_eq!(shown["retriggers"][0]["reason"], "report fixed");
    let audit = shown["audit"].as_array().context("audit")?;
    let retriggered: Vec<&Value> = audit
        .iter()
        .filter(|e| e["action"] == "run.retriggered")
        .collect();
    assert_eq!(retriggered.len(), 1, "{audit:#?}");
    assert_eq!(retriggered[0]["actor"], "dev");
    assert!(
        audit
            .iter()
            .any(|e| e["action"] == "digest.unblocked" && e["actor"] == "dev"),
        "{audit:#?}"
    );
    let out = gantry(&url, &["runs", "show", &id])?;
    let text = stdout(&out);
    assert!(
        text.contains("retrigger ")
            && text.contains("by dev from scan (was blocked): report fixed"),
        "{text}"
    );
    assert!(
        text.contains("audit\n") && text.contains("run.retriggered"),
        "{text}"
    );
    Ok(())
}

type Seen = Arc<Mutex<Vec<(String, Option<String>, Value)>>>;

/// A stand-in for `POST /api/apps/{app}/rollback` that records requests and
/// answers per the contract: 202 with the rollback run, or 409 for `api`.
async fn fake_rollback_api() -> Result<(String, Seen)> {
    use axum::extract::{Path, State};
    use axum::http::{HeaderMap, StatusCode};
    let seen: Seen = Arc::default();
    let app = axum::Router::new()
        .route(
            "/api/apps/{app}/rollback",
            axum::routing::post(
                |State(seen): State<Seen>, Path(app): Path<String>, headers: HeaderMap, body: axum::body::Bytes| async move {
                    let auth = headers
                        .get("authorization")
                        .and_then(|v| v.to_str().ok())
                        .map(str::to_string);
                    let body: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
                    seen.lock().unwrap_or_else(|p| p.into_inner()).push((app.clone(), auth, body));
                    if app == "api" {
                        return (
                            StatusCode::CONFLICT,
                            axum::Json(json!({"error": {"code": "digest_blocked", "message": "digest sha256:… is blocked for api"}})),
                        );
                    }
                    let run = json!({
                        "id": "01jdyq3r1t0000000000000000", "app": app, "status": "deploying",
                        "source": {"kind": "registry"},
                        "image": {"registry": "contoso.azurecr.io", "repository": app, "digest": DIGEST},
                        "steps": {}, "created_at": "2026-11-27T08:00:00Z", "updated_at": "2026-11-27T08:00:00Z",
                    });
                    (StatusCode::ACCEPTED, axum::Json(run))
                },
            ),
        )
        .with_state(seen.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    Ok((format!("http://{addr}"), seen))
}

#[tokio::test]
async fn apps_rollback_follows_the_contract() -> Result<()> {
    let (url, seen) = fake_rollback_api().await?;
    let url2 = url.clone();
    let out = tokio::task::spawn_blocking(move || {
        gantry(
            &url2,
            &[
                "apps",
                "rollback",
                "web",
                "--digest",
                DIGEST,
                "--reason",
                "bad release",
                "--token",
                "t0ken",
            ],
        )
    })
    .await??;
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stdout(&out).contains("rollback run 01jdyq3r1t0000000000000000  app web  status deploying"),
        "{}",
        stdout(&out)
    );
    let url2 = url.clone();
    let out =
        tokio::task::spawn_blocking(move || gantry(&url2, &["apps", "rollback", "web", "--json"]))
            .await??;
    assert!(out.status.success(), "{}", stderr(&out));
    let run: Value = serde_json::from_slice(&out.stdout)?;
    assert_eq!(run["status"], "deploying");
    let url2 = url.clone();
    let out =
        tokio::task::spawn_blocking(move || gantry(&url2, &["apps", "rollback", "api"])).await??;
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("error: digest_blocked: digest"),
        "{}",
        stderr(&out)
    );
    // Bad input never leaves the process.
    let out = tokio::task::spawn_blocking(move || {
        gantry(&url, &["apps", "rollback", "web", "--digest", "latest"])
    })
    .await??;
    assert!(!out.status.success());

    let seen = seen.lock().unwrap_or_else(|p| p.into_inner()).clone();
    assert_eq!(seen.len(), 3, "{seen:#?}");
    assert_eq!(seen[0].0, "web");
    assert_eq!(seen[0].1.as_deref(), Some("Bearer t0ken"));
    assert_eq!(
        seen[0].2,
        json!({"digest": DIGEST, "reason": "bad release"})
    );
    // No --token on loopback: the development token.
    assert_eq!(seen[1].1.as_deref(), Some("Bearer gantry-dev-token"));
    assert_eq!(seen[1].2, json!({}));
    Ok(())
}

#[test]
fn a_remote_url_needs_a_token() -> Result<()> {
    let out = gantry("https://gantry.example.com", &["runs", "list"])?;
    assert!(!out.status.success());
    assert!(stderr(&out).contains("GANTRY_TOKEN"), "{}", stderr(&out));
    Ok(())
}

#[tokio::test]
async fn approve_from_the_cli_deploys_and_a_second_approve_is_refused() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let config = dir.path().join("gantry.toml");
    std::fs::write(
        &config,
        format!(
            "[[apps]]\nname = \"web\"\nrepo = \"contoso/web\"\nimage = \"contoso.azurecr.io/web\"\nrequire_approval = true\n\n[scan]\nthreshold = \"high\"\ntrivy_dir = {:?}\n",
            repo_root().join("examples/scans").display().to_string()
        ),
    )?;
    let host = DevHost::start(
        &dir.path().join("state"),
        &["--config", config.to_str().unwrap_or_default()],
    )
    .await?;
    let url = host.url("");
    let (status, body) = host
        .github(
            "push",
            "44444444-2222-4333-8444-555555555556",
            &example("github-push.json"),
        )
        .await?;
    assert_eq!(status, 202, "{body}");
    host.enqueue(
        "registry-events",
        Some("831e1650-001e-001b-66ab-eeb76e069632"),
        &example("acr-image-pushed.json"),
    )
    .await?;
    let run = host
        .settle(&["awaiting-approval", "blocked", "failed", "deployed"], &[])
        .await?;
    assert_eq!(run["status"], "awaiting-approval", "{run:#}");
    let id = run["id"].as_str().context("id")?.to_string();
    let out = gantry(
        &url,
        &["runs", "list", "--status", "awaiting-approval", "--json"],
    )?;
    let listed: Vec<Value> = serde_json::from_slice(&out.stdout)?;
    assert_eq!(listed.len(), 1, "{}", stderr(&out));

    let out = gantry(&url, &["runs", "approve", &id, "--json"])?;
    assert!(out.status.success(), "{}", stderr(&out));
    let approved: Value = serde_json::from_slice(&out.stdout)?;
    assert_eq!(approved["status"], "deploying");
    assert_eq!(approved["steps"]["approval"]["summary"], "approved by dev");
    let run = host.settle(&["blocked", "failed", "deployed"], &[]).await?;
    assert_eq!(run["status"], "deployed", "{run:#}");

    let out = gantry(&url, &["runs", "approve", &id])?;
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("error: not_awaiting_approval:"),
        "{}",
        stderr(&out)
    );
    let out = gantry(&url, &["runs", "reject", &id, "--reason", "too late"])?;
    assert!(
        stderr(&out).contains("error: not_awaiting_approval:"),
        "{}",
        stderr(&out)
    );
    let out = gantry(&url, &["runs", "show", &id, "--json"])?;
    let shown: Value = serde_json::from_slice(&out.stdout)?;
    let approvals: Vec<&Value> = shown["audit"]
        .as_array()
        .context("audit")?
        .iter()
        .filter(|e| e["action"] == "run.approved")
        .collect();
    assert_eq!(approvals.len(), 1);
    assert_eq!(approvals[0]["actor"], "dev");
    Ok(())
}

/// Writes open findings as `cluster-audit` keeps them (its own types) into
/// the embedded store under `state`: an app's drift and the cluster's
/// governance findings, the latter from an incomplete check.
async fn seed_findings(state: &std::path::Path) -> Result<()> {
    use gantry_pipeline::findings::{AuditState, OpenFinding};
    use gantry_pipeline::{AppName, RunStore, Severity};
    let runs = RunStore::new(Arc::new(gantry_store::fs::FsStore::open(
        state.join("store"),
    )?));
    let open = |kind: &str, severity, reason: &str, app: Option<&str>| -> Result<OpenFinding> {
        Ok(OpenFinding {
            kind: kind.into(),
            reason: reason.into(),
            since: "2026-11-27T09:00:00Z".into(),
            severity: Some(severity),
            app: app.map(AppName::parse).transpose()?,
            detail: json!({"namespace": "web"}),
        })
    };
    let mut web = AuditState::default();
    web.open.insert(
        "drift:Deployment/web:spec.replicas".into(),
        open(
            "drift",
            Severity::High,
            "Deployment web: spec.replicas is 5, gantry applied 2",
            None,
        )?,
    );
    runs.put_json("audit/state/web.json", &web).await?;
    let mut cluster = AuditState {
        checked_at: Some("2026-11-27T09:15:00Z".into()),
        error: Some("listing DaemonSet in kube-system failed (HTTP 403)".into()),
        ..AuditState::default()
    };
    cluster.open.insert(
        "label:web/web:owner".into(),
        open(
            "missing-label",
            Severity::Warning,
            "Deployment web/web lacks the required label owner",
            Some("web"),
        )?,
    );
    runs.put_json("audit/state/_cluster.json", &cluster).await?;
    Ok(())
}

#[tokio::test]
async fn audit_lists_open_findings_over_the_api_and_from_the_store() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let state = dir.path().join("state");
    seed_findings(&state).await?;
    let host = DevHost::start(&state, &[]).await?;
    let url = host.url("");

    // Over the API (no store named), as a table.
    let out = gantry(&url, &["audit"])?;
    assert!(out.status.success(), "{}", stderr(&out));
    let table = stdout(&out);
    let lines: Vec<&str> = table.lines().collect();
    assert!(
        lines[0].starts_with("SEVERITY")
            && lines[0].contains("KIND")
            && lines[0].contains("REASON"),
        "{table}"
    );
    // The cluster scope sorts first; columns are aligned under the header.
    assert!(
        lines[1].starts_with("warning") && lines[1].contains("missing-label"),
        "{table}"
    );
    assert_eq!(
        lines[0].find("KIND"),
        lines[1].find("missing-label"),
        "{table}"
    );
    assert!(
        lines[2].starts_with("high")
            && lines[2].contains("drift")
            && lines[2].ends_with("gantry applied 2"),
        "{table}"
    );
    assert!(
        lines[3].starts_with("note: the last check of _cluster was incomplete (2026-11-27T09:15:00Z): listing DaemonSet"),
        "{table}"
    );
    assert_eq!(lines.len(), 4, "{table}");

    // JSON with filters, through the API.
    let out = gantry(
        &url,
        &["audit", "--json", "--kind", "governance", "--app", "web"],
    )?;
    assert!(out.status.success(), "{}", stderr(&out));
    let listed: Value = serde_json::from_slice(&out.stdout)?;
    let findings = listed["findings"].as_array().context("findings")?;
    assert_eq!(findings.len(), 1, "{listed:#}");
    assert_eq!(findings[0]["fingerprint"], "label:web/web:owner");
    assert_eq!(findings[0]["category"], "governance");
    assert_eq!(findings[0]["scope"], "_cluster");

    // The same from the store directly.
    let out = gantry(
        "http://127.0.0.1:9",
        &[
            "audit",
            "--json",
            "--state",
            state.to_str().unwrap_or_default(),
        ],
    )?;
    assert!(out.status.success(), "{}", stderr(&out));
    let direct: Value = serde_json::from_slice(&out.stdout)?;
    let over_api: Value = serde_json::from_slice(&gantry(&url, &["audit", "--json"])?.stdout)?;
    assert_eq!(direct, over_api);
    assert_eq!(direct["findings"].as_array().map(Vec::len), Some(2));

    // --fail-on-findings: 2 when something is open, 0 when nothing matches.
    let out = gantry(&url, &["audit", "--fail-on-findings"])?;
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("2 open audit findings"),
        "{}",
        stderr(&out)
    );
    let out = gantry(
        &url,
        &["audit", "--fail-on-findings", "--kind", "vulnerability"],
    )?;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(
        stdout(&out).contains("(no open findings)"),
        "{}",
        stdout(&out)
    );

    // A bad filter is an error (exit 1) naming what is accepted.
    let out = gantry(&url, &["audit", "--kind", "bogus"])?;
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("unknown finding kind \"bogus\"; one of: policy, drift"),
        "{}",
        stderr(&out)
    );
    Ok(())
}
