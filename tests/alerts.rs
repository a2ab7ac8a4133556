//! End-to-end in `gantry dev`: a run blocked by the scan gate produces
//! exactly one notification on a configured webhook channel (a local fake
//! that records requests), signed with the channel's secret, and the
//! notification is recorded on the run without the URL or the secret.

mod support;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use axum::body::Body;
use serde_json::Value;
use support::{DevHost, example, repo_root};

const DIGEST: &str = "sha256:b5b2b2c507a0944348e0303114d8d93aaaa081732b86451d9bce1f432a537bc7";
const SECRET: &str = "e2e-webhook-signing-secret";
const HOOK_PATH: &str = "/hooks/E2ESECRETPATH";

type Received = Arc<Mutex<Vec<(http::HeaderMap, Vec<u8>)>>>;

/// A webhook receiver on loopback that records every request and answers 204.
async fn fake_webhook() -> Result<(Received, u16)> {
    let received: Received = Arc::default();
    let state = received.clone();
    let app = axum::Router::new().fallback(move |req: http::Request<Body>| {
        let state = state.clone();
        async move {
            let (parts, body) = req.into_parts();
            let bytes = axum::body::to_bytes(body, 1 << 20)
                .await
                .map(|b| b.to_vec())
                .unwrap_or_default();
            if parts.uri.path() == HOOK_PATH {
                state
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push((parts.headers, bytes));
            }
            http::StatusCode::NO_CONTENT
        }
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let port = listener.local_addr()?.port();
    tokio::spawn(async move { axum::serve(listener, app).await });
    Ok((received, port))
}

#[tokio::test]
async fn a_blocked_run_produces_exactly_one_signed_webhook_notification() -> Result<()> {
    let (received, port) = fake_webhook().await?;
    let dir = tempfile::tempdir()?;
    let scans = dir.path().join("scans");
    std::fs::create_dir_all(&scans)?;
    std::fs::copy(
        repo_root().join("examples/trivy-criticals.json"),
        scans.join(format!("{DIGEST}.trivy.json")),
    )?;
    let config = dir.path().join("gantry.toml");
    std::fs::write(
        &config,
        format!(
            r#"[[apps]]
name = "web"
repo = "contoso/web"
image = "contoso.azurecr.io/web"

[scan]
threshold = "high"
trivy_dir = {:?}

[[alerts.channels]]
name = "hook"
kind = "webhook"
url_env = "GANTRY_ALERT_WEBHOOK_URL"
secret_env = "GANTRY_ALERT_WEBHOOK_SECRET"

[[alerts.routes]]
min_severity = "high"
channels = ["hook"]
"#,
            scans.display().to_string()
        ),
    )?;
    let url = format!("http://127.0.0.1:{port}{HOOK_PATH}");
    let host = DevHost::start_with_env(
        &dir.path().join("state"),
        &["--config", config.to_str().unwrap_or_default()],
        &[
            ("GANTRY_ALERT_WEBHOOK_URL", &url),
            ("GANTRY_ALERT_WEBHOOK_SECRET", SECRET),
        ],
    )
    .await?;

    let run = host
        .push_and_image(
            "55555555-2222-4333-8444-555555555555",
            "831e1650-001e-001b-66ab-eeb76e069631",
            &["blocked", "failed", "deployed"],
        )
        .await?;
    assert_eq!(run["status"], "blocked", "{run:#}");

    // Wait for the notification, then for every alert to be processed.
    let deadline = Instant::now() + Duration::from_secs(30);
    while received
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .is_empty()
    {
        if Instant::now() > deadline {
            bail!("no webhook request within 30 s");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let records = host.alert_records(1).await?.unwrap_or_default();
    assert_eq!(records.len(), 1, "{records:#?}");
    assert_eq!(records[0]["count"], 1);
    // The same events again (GitHub's "Redeliver", Event Grid's retries)
    // change nothing and notify nobody.
    let (status, _) = host
        .github(
            "push",
            "55555555-2222-4333-8444-555555555555",
            &example("github-push.json"),
        )
        .await?;
    assert_eq!(status, 200);
    host.enqueue(
        "registry-events",
        Some("831e1650-001e-001b-66ab-eeb76e069631"),
        &example("acr-image-pushed.json"),
    )
    .await?;
    host.drain("registry-events").await?;
    host.drain("scan").await?;
    host.drain("alerts").await?;

    let got = received.lock().unwrap_or_else(|p| p.into_inner()).clone();
    assert_eq!(got.len(), 1, "exactly one notification");
    let (headers, body) = &got[0];
    assert_eq!(
        headers["x-gantry-signature-256"].to_str()?,
        gantry_runtime::signature::sign_sha256(SECRET.as_bytes(), body)
    );
    let sent: Value = serde_json::from_slice(body)?;
    assert_eq!(sent["alert"]["kind"], "scan-blocked");
    assert_eq!(sent["alert"]["severity"], "high");
    assert_eq!(sent["alert"]["app"], "web");
    assert_eq!(sent["alert"]["digest"], DIGEST);
    assert_eq!(sent["alert"]["run_id"], run["id"]);
    assert_eq!(sent["run"]["status"], "blocked");
    assert_eq!(sent["count"], 1);

    let runs = host.runs(&[])?;
    let notifications = runs[0]["notifications"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    assert_eq!(notifications.len(), 1, "{notifications:#?}");
    assert_eq!(notifications[0]["channel"], "hook");
    assert_eq!(notifications[0]["outcome"], "sent");
    let text = serde_json::to_string(&runs)?;
    assert!(!text.contains("E2ESECRETPATH") && !text.contains(SECRET));
    Ok(())
}
