//! `gantry serve` as the Functions host runs it: the real binary, the real
//! custom-handler protocol, Blob Storage on Azurite, and a local fake of the
//! Service Bus REST endpoint that records exactly what gantry sends.

mod support;

use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use serde_json::Value;

#[derive(Debug, Clone)]
struct Sent {
    queue: String,
    broker: Value,
    authorization: String,
    body: Value,
}

type Log = Arc<Mutex<Vec<Sent>>>;

async fn fake_service_bus() -> Result<(u16, Log)> {
    let log: Log = Arc::default();
    async fn receive(
        State(log): State<Log>,
        Path(queue): Path<String>,
        headers: HeaderMap,
        body: axum::body::Bytes,
    ) -> StatusCode {
        let header = |n: &str| {
            headers
                .get(n)
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .to_string()
        };
        log.lock().expect("lock").push(Sent {
            queue,
            broker: serde_json::from_str(&header("brokerproperties")).unwrap_or(Value::Null),
            authorization: header("authorization"),
            body: serde_json::from_slice(&body).unwrap_or(Value::Null),
        });
        StatusCode::CREATED
    }
    let app = axum::Router::new()
        .route("/{queue}/messages", axum::routing::post(receive))
        .with_state(log.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let port = listener.local_addr()?.port();
    tokio::spawn(async move { axum::serve(listener, app).await });
    Ok((port, log))
}

struct Serve(Child);

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test]
async fn serve_speaks_the_custom_handler_protocol_end_to_end() -> Result<()> {
    let azurite = gantry_testkit::Azurite::shared()?;
    let (sb_port, sent) = fake_service_bus().await?;
    let port = gantry_testkit::free_port();
    let container = gantry_testkit::unique_name("serve");
    let started = Instant::now();
    let _serve = Serve(
        Command::new(env!("CARGO_BIN_EXE_gantry"))
            .arg("serve")
            .env("FUNCTIONS_CUSTOMHANDLER_PORT", port.to_string())
            .env("GANTRY_CONFIG", support::repo_root().join("gantry.toml"))
            .env("GANTRY_STORAGE", azurite.connection_string())
            .env("GANTRY_CONTAINER", &container)
            .env(
                "GANTRY_SERVICEBUS",
                format!("Endpoint=http://127.0.0.1:{sb_port}/;SharedAccessKeyName=send;SharedAccessKey=dGVzdC1rZXk="),
            )
            .env("GANTRY_GITHUB_WEBHOOK_SECRET", "s3cret-for-serve")
            .env("GANTRY_LOG", "warn")
            .stdout(Stdio::null())
            .spawn()?,
    );
    // The container is created by infra in Azure; create it here like infra would.
    gantry_store::blob::BlobStore::connect(&azurite.connection_string(), &container, None)?
        .ensure_container()
        .await?;
    let client = reqwest::Client::new();
    let base = format!("http://127.0.0.1:{port}");
    loop {
        if client
            .get(format!("{base}/api/health"))
            .send()
            .await
            .is_ok_and(|r| r.status().is_success())
        {
            break;
        }
        if started.elapsed() > Duration::from_secs(20) {
            bail!("gantry serve did not listen within 20 s");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // A forwarded HTTP request: the webhook, signed with the configured secret.
    let push = support::example("github-push.json");
    let sig = gantry_runtime::signature::sign_sha256(b"s3cret-for-serve", &push);
    let r = client
        .post(format!("{base}/api/github"))
        .header("content-type", "application/json")
        .header("x-github-event", "push")
        .header("x-github-delivery", "0b7a3c1e-1111-4222-8333-944455556666")
        .header("x-hub-signature-256", sig)
        .body(push)
        .send()
        .await?;
    assert_eq!(r.status(), 202);
    let run_id = r.json::<Value>().await?["runs"][0]["run_id"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    // The development secret must not work in serve mode.
    let dev_sig = gantry_runtime::signature::sign_sha256(support::DEV_SECRET.as_bytes(), b"{}");
    let r = client
        .post(format!("{base}/api/github"))
        .header("content-type", "application/json")
        .header("x-github-event", "ping")
        .header("x-github-delivery", "0b7a3c1e-1111-4222-8333-000000000000")
        .header("x-hub-signature-256", dev_sig)
        .body("{}")
        .send()
        .await?;
    assert_eq!(r.status(), 401);

    // A Service Bus trigger invocation exactly as the host posts it.
    let acr = String::from_utf8(support::example("acr-image-pushed.json"))?;
    let envelope = serde_json::json!({
        "Data": {"message": acr},
        "Metadata": {
            "MessageId": "\"831e1650-001e-001b-66ab-eeb76e069631\"",
            "DeliveryCount": "1",
            "EnqueuedTimeUtc": "\"2026-11-27T10:03:48\"",
            "SequenceNumber": "1",
            "ApplicationProperties": {},
            "sys": {"MethodName": "registry-push", "UtcNow": "2026-11-27T10:03:48.1Z"}
        }
    });
    let r = client
        .post(format!("{base}/registry-push"))
        .json(&envelope)
        .send()
        .await?;
    assert_eq!(r.status(), 200);
    let reply: Value = r.json().await?;
    assert!(
        reply["Logs"][0]
            .as_str()
            .unwrap_or_default()
            .contains("scan queued"),
        "{reply}"
    );
    assert_eq!(reply["Outputs"], serde_json::json!({}));

    // Redeliver both 10× — GitHub's "Redeliver" (same delivery id) and the host
    // redelivering the Service Bus message (same MessageId, DeliveryCount+1), and
    // past duplicate detection (fresh MessageIds): still one run, one message.
    let push = support::example("github-push.json");
    let sig = gantry_runtime::signature::sign_sha256(b"s3cret-for-serve", &push);
    for i in 0..10u32 {
        let r = client
            .post(format!("{base}/api/github"))
            .header("content-type", "application/json")
            .header("x-github-event", "push")
            .header("x-github-delivery", "0b7a3c1e-1111-4222-8333-944455556666")
            .header("x-hub-signature-256", &sig)
            .body(push.clone())
            .send()
            .await?;
        assert_eq!(r.status(), 200, "a redelivered push is a duplicate");
        let mut again = envelope.clone();
        again["Metadata"]["DeliveryCount"] = (i + 2).to_string().into();
        if i % 2 == 1 {
            again["Metadata"]["MessageId"] = format!("\"fresh-{i}\"").into();
        }
        let r = client
            .post(format!("{base}/registry-push"))
            .json(&again)
            .send()
            .await?;
        assert_eq!(r.status(), 200);
    }
    let out = Command::new(env!("CARGO_BIN_EXE_gantry"))
        .args([
            "runs",
            "list",
            "--json",
            "--storage",
            &azurite.connection_string(),
            "--container",
            &container,
        ])
        .output()?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let runs: Vec<Value> = serde_json::from_slice(&out.stdout)?;
    assert_eq!(runs.len(), 1, "one run: {runs:#?}");
    let run = &runs[0];
    assert_eq!(run["id"], run_id.as_str());
    assert_eq!(
        run["status"], "scanning",
        "nothing consumes the scan queue here"
    );
    assert_eq!(
        run["source"]["commit"],
        "3f786850e387550fdab836ed7e6dc881de23001b"
    );
    assert_eq!(run["source"]["pusher"], "monalisa");
    assert_eq!(run["source"]["repo"], "contoso/web");
    assert_eq!(
        run["image"]["digest"],
        "sha256:b5b2b2c507a0944348e0303114d8d93aaaa081732b86451d9bce1f432a537bc7"
    );

    let sent = sent.lock().expect("lock").clone();
    assert_eq!(sent.len(), 1, "exactly one message: {sent:#?}");
    assert_eq!(sent[0].queue, "scan");
    assert_eq!(sent[0].broker["MessageId"], format!("{run_id}:scan:1"));
    assert!(
        sent[0]
            .authorization
            .starts_with("SharedAccessSignature sr="),
        "{}",
        sent[0].authorization
    );
    assert_eq!(sent[0].body["run_id"], run_id.as_str());
    assert_eq!(
        sent[0].body["digest"],
        "sha256:b5b2b2c507a0944348e0303114d8d93aaaa081732b86451d9bce1f432a537bc7"
    );
    Ok(())
}

#[test]
fn serve_without_the_host_port_explains_itself() -> Result<()> {
    let out = Command::new(env!("CARGO_BIN_EXE_gantry"))
        .arg("serve")
        .env_remove("FUNCTIONS_CUSTOMHANDLER_PORT")
        .output()?;
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("FUNCTIONS_CUSTOMHANDLER_PORT"), "{err}");
    assert!(err.contains("gantry dev"), "{err}");
    Ok(())
}

#[test]
fn bad_config_is_named_on_start() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("gantry.toml");
    std::fs::write(
        &path,
        "[[apps]]\nname = \"web\"\nrepo = \"contoso/web\"\nimage = \"contoso.azurecr.io/web\"\nreplicaz = 3\n",
    )?;
    let out = Command::new(env!("CARGO_BIN_EXE_gantry"))
        .args(["dev", "--port", "0", "--state"])
        .arg(dir.path().join("state"))
        .arg("--config")
        .arg(&path)
        .output()?;
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("replicaz"), "{err}");
    Ok(())
}
