//! `POST /api/github` through the real router, with the embedded on-disk store
//! and the embedded queue, so every test can say exactly what was written and
//! what was queued.

use std::collections::BTreeMap;
use std::sync::Arc;

use anyhow::{Context, Result, ensure};
use axum::Router;
use axum::body::Body;
use gantry_bus::{EmbeddedBus, QUEUES, QueueOptions, QueueStats};
use gantry_pipeline::{Config, RunStatus, RunStore, SourceKind, StepStatus};
use gantry_runtime::{Deps, Secret, Secrets};
use gantry_store::StateStore;
use gantry_store::fs::FsStore;
use http::{Request, StatusCode};
use http_body_util::BodyExt;
use serde_json::{Value, json};
use tower::ServiceExt;

const SECRET: &[u8] = b"It's a Secret to Everybody";
const SHA: &str = "3f786850e387550fdab836ed7e6dc881de23001b";
const DELIVERY: &str = "72d3162e-cc78-11e3-81ab-4c9367dc0958";

const PUSH: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../../examples/github-push.json"
);
const PING: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../../examples/github-ping.json"
);
const WORKFLOW_FAILED: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../../examples/github-workflow-run-failed.json"
);

const CONFIG: &str = r#"
[[apps]]
name = "web"
repo = "contoso/web"
branches = ["main"]
image = "contoso.azurecr.io/web"
"#;

/// Two apps built from one repository (a monorepo).
const MONOREPO: &str = r#"
[[apps]]
name = "web"
repo = "contoso/web"
image = "contoso.azurecr.io/web"

[[apps]]
name = "web-worker"
repo = "contoso/web"
image = "contoso.azurecr.io/web-worker"
"#;

struct Harness {
    _dir: tempfile::TempDir,
    store: Arc<FsStore>,
    bus: EmbeddedBus,
    runs: RunStore,
    router: Router,
}

impl Harness {
    async fn new() -> Result<Harness> {
        Harness::with(CONFIG, Some(SECRET)).await
    }

    async fn with(config: &str, secret: Option<&[u8]>) -> Result<Harness> {
        let dir = tempfile::tempdir()?;
        let store = Arc::new(FsStore::open(dir.path().join("store"))?);
        let bus = EmbeddedBus::open(dir.path().join("bus"), QueueOptions::default()).await?;
        let runs = RunStore::new(store.clone());
        let deps = Deps {
            runs: runs.clone(),
            bus: Arc::new(bus.clone()),
            config: Arc::new(Config::parse(config, "test.toml")?),
            secrets: Secrets {
                github_webhook: secret.map(Secret::new),
                ..Secrets::default()
            },
            services: Default::default(),
        };
        let router = gantry_runtime::app(Arc::new(deps), &[fn_github_webhook::function()]);
        Ok(Harness {
            _dir: dir,
            store,
            bus,
            runs,
            router,
        })
    }

    async fn send(&self, request: Request<Body>) -> Result<(StatusCode, Value)> {
        let response = self.router.clone().oneshot(request).await?;
        let status = response.status();
        let bytes = response.into_body().collect().await?.to_bytes();
        let value = serde_json::from_slice(&bytes)
            .with_context(|| format!("{status}: not JSON: {}", String::from_utf8_lossy(&bytes)))?;
        Ok((status, value))
    }

    /// A correctly signed delivery.
    async fn deliver(
        &self,
        event: &str,
        delivery: &str,
        body: &[u8],
    ) -> Result<(StatusCode, Value)> {
        self.send(signed(event, delivery, body)?).await
    }

    /// Every blob with its bytes.
    async fn snapshot(&self) -> Result<BTreeMap<String, Vec<u8>>> {
        let mut out = BTreeMap::new();
        for name in self.runs.list_all("").await? {
            let blob = self
                .store
                .get(&name)
                .await?
                .context("listed blob vanished")?;
            out.insert(name, blob.body);
        }
        Ok(out)
    }

    async fn names(&self, prefix: &str) -> Result<Vec<String>> {
        Ok(self.runs.list_all(prefix).await?)
    }

    async fn blob(&self, name: &str) -> Result<String> {
        let blob = self
            .store
            .get(name)
            .await?
            .with_context(|| format!("{name} missing"))?;
        Ok(String::from_utf8(blob.body)?)
    }

    /// No blob in the store and no message in any queue.
    async fn assert_nothing_written(&self, what: &str) -> Result<()> {
        let page = self.store.list("", None, 1000).await?;
        ensure!(
            page.names.is_empty(),
            "{what}: store holds {:?}",
            page.names
        );
        self.assert_no_messages(what).await
    }

    async fn assert_no_messages(&self, what: &str) -> Result<()> {
        for queue in QUEUES {
            let stats = self.bus.stats(queue).await;
            ensure!(
                stats == QueueStats::default(),
                "{what}: queue {queue} has {stats:?}"
            );
        }
        Ok(())
    }

    /// Every line of the audit trail.
    async fn audit(&self) -> Result<Vec<Value>> {
        let mut lines = Vec::new();
        for name in self.names("audit/").await? {
            for line in self.blob(&name).await?.lines() {
                lines.push(serde_json::from_str(line)?);
            }
        }
        Ok(lines)
    }
}

fn read(path: &str) -> Result<Vec<u8>> {
    std::fs::read(path).with_context(|| format!("reading {path}"))
}

fn read_json(path: &str) -> Result<Value> {
    Ok(serde_json::from_slice(&read(path)?)?)
}

fn post(headers: &[(&str, &str)], body: Body) -> Result<Request<Body>> {
    let mut builder = Request::post("/api/github");
    for (name, value) in headers {
        builder = builder.header(*name, *value);
    }
    Ok(builder.body(body)?)
}

/// A delivery as GitHub sends it: JSON, signed, with an honest Content-Length.
fn signed(event: &str, delivery: &str, body: &[u8]) -> Result<Request<Body>> {
    let signature = gantry_runtime::signature::sign_sha256(SECRET, body);
    let length = body.len().to_string();
    post(
        &[
            ("content-type", "application/json"),
            ("content-length", &length),
            ("user-agent", "GitHub-Hookshot/044aadd"),
            ("x-github-event", event),
            ("x-github-delivery", delivery),
            ("x-hub-signature-256", &signature),
        ],
        Body::from(body.to_vec()),
    )
}

/// The error code of a JSON error reply, checking the documented shape.
fn error_code(status: StatusCode, body: &Value) -> Result<String> {
    let error = body
        .get("error")
        .with_context(|| format!("{status}: no error object in {body}"))?;
    let message = error["message"].as_str().unwrap_or_default();
    ensure!(
        !message.is_empty(),
        "{status}: empty error message in {body}"
    );
    ensure!(
        !message.contains("Secret to Everybody"),
        "the secret leaked into an error: {message}"
    );
    Ok(error["code"]
        .as_str()
        .context("error.code is not a string")?
        .to_string())
}

fn push_with(change: impl FnOnce(&mut Value)) -> Result<Vec<u8>> {
    let mut push = read_json(PUSH)?;
    change(&mut push);
    Ok(serde_json::to_vec(&push)?)
}

fn run_id_of(reply: &Value) -> Result<String> {
    Ok(reply["runs"][0]["run_id"]
        .as_str()
        .with_context(|| format!("no run id in {reply}"))?
        .to_string())
}

#[tokio::test]
async fn signed_push_creates_a_run_awaiting_its_image() -> Result<()> {
    let h = Harness::new().await?;
    let (status, reply) = h.deliver("push", DELIVERY, &read(PUSH)?).await?;
    assert_eq!(status, StatusCode::ACCEPTED, "{reply}");
    assert_eq!(reply["status"], "accepted");
    assert_eq!(reply["runs"].as_array().map(Vec::len), Some(1), "{reply}");
    assert_eq!(reply["runs"][0]["app"], "web");
    assert_eq!(reply["runs"][0]["status"], "awaiting-image");
    let id = run_id_of(&reply)?;

    let runs = h.runs.list(None, None, 100).await?;
    assert_eq!(runs.len(), 1);
    let run = &runs[0];
    assert_eq!(run.id.as_str(), id);
    assert_eq!(run.app.as_str(), "web");
    assert_eq!(run.status, RunStatus::AwaitingImage);
    assert_eq!(run.source.kind, SourceKind::Github);
    assert_eq!(run.source.commit.as_ref().map(|c| c.as_str()), Some(SHA));
    assert_eq!(run.source.pusher.as_deref(), Some("monalisa"));
    assert_eq!(run.source.repo.as_deref(), Some("contoso/web"));
    assert_eq!(run.source.git_ref.as_deref(), Some("refs/heads/main"));
    assert_eq!(run.source.delivery.as_deref(), Some(DELIVERY));
    assert_eq!(
        run.source.message.as_deref(),
        Some("Add health endpoint to the web front end")
    );
    assert!(run.image.is_none() && run.steps.is_empty(), "{run:?}");

    // The blob itself, as DESIGN.md §4 names it and spells its fields.
    let stored: Value = serde_json::from_str(&h.blob(&format!("runs/web/{id}.json")).await?)?;
    assert_eq!(stored["status"], "awaiting-image");
    assert_eq!(stored["source"]["ref"], "refs/heads/main");
    assert_eq!(stored["source"]["kind"], "github");

    assert_eq!(
        h.blob(&format!("index/commits/web/{SHA}")).await?.trim(),
        id
    );
    assert_eq!(h.blob(&format!("index/runs/{id}")).await?.trim(), "web");
    assert_eq!(
        h.names("dedup/github/").await?,
        vec![format!("dedup/github/{DELIVERY}")]
    );

    let audit = h.audit().await?;
    assert_eq!(audit.len(), 1, "{audit:#?}");
    assert_eq!(audit[0]["action"], "run.created");
    assert_eq!(audit[0]["actor"], "github-webhook");
    assert_eq!(audit[0]["app"], "web");
    assert_eq!(audit[0]["run"], id.as_str());
    assert_eq!(audit[0]["detail"]["commit"], SHA);
    assert_eq!(audit[0]["detail"]["delivery"], DELIVERY);

    // A push queues nothing: the registry event starts the next step.
    h.assert_no_messages("push").await
}

#[tokio::test]
async fn the_same_delivery_again_is_a_duplicate_and_changes_nothing() -> Result<()> {
    let h = Harness::new().await?;
    let body = read(PUSH)?;
    let (status, _) = h.deliver("push", DELIVERY, &body).await?;
    assert_eq!(status, StatusCode::ACCEPTED);
    let before = h.snapshot().await?;
    assert!(
        before.keys().any(|n| n.starts_with("runs/web/")),
        "{before:?}"
    );

    for _ in 0..3 {
        let (status, reply) = h.deliver("push", DELIVERY, &body).await?;
        assert_eq!(status, StatusCode::OK, "{reply}");
        assert_eq!(reply["status"], "duplicate");
        assert!(
            reply["reason"].as_str().is_some_and(|r| !r.is_empty()),
            "{reply}"
        );
        assert!(reply.get("runs").is_none(), "{reply}");
    }
    // Claims are case-insensitive GUIDs: GitHub's upper-case spelling is the same delivery.
    let (status, reply) = h
        .deliver("push", &DELIVERY.to_ascii_uppercase(), &body)
        .await?;
    assert_eq!(
        (status, &reply["status"]),
        (StatusCode::OK, &json!("duplicate"))
    );

    assert_eq!(h.snapshot().await?, before, "a duplicate must not write");
    h.assert_no_messages("duplicate").await
}

#[tokio::test]
async fn a_new_delivery_of_the_same_commit_reuses_the_run() -> Result<()> {
    let h = Harness::new().await?;
    let body = read(PUSH)?;
    let (_, first) = h.deliver("push", DELIVERY, &body).await?;
    let id = run_id_of(&first)?;
    let run_before = h.blob(&format!("runs/web/{id}.json")).await?;

    let (status, second) = h
        .deliver("push", "aaaaaaaa-0000-4000-8000-000000000001", &body)
        .await?;
    assert_eq!(status, StatusCode::ACCEPTED, "{second}");
    assert_eq!(second["status"], "accepted");
    assert_eq!(run_id_of(&second)?, id);

    assert_eq!(h.names("runs/").await?.len(), 1);
    assert_eq!(h.names("index/runs/").await?.len(), 1);
    assert_eq!(h.blob(&format!("runs/web/{id}.json")).await?, run_before);
    assert_eq!(
        h.names("dedup/github/").await?.len(),
        2,
        "both deliveries claimed"
    );
    assert_eq!(h.audit().await?.len(), 1, "the run was created once");
    Ok(())
}

#[tokio::test]
async fn ping_answers_pong_and_writes_nothing() -> Result<()> {
    let h = Harness::new().await?;
    let (status, reply) = h.deliver("ping", DELIVERY, &read(PING)?).await?;
    assert_eq!(status, StatusCode::OK, "{reply}");
    assert_eq!(reply, json!({"status": "pong"}));
    h.assert_nothing_written("ping").await
}

#[tokio::test]
async fn bad_or_missing_signatures_are_refused_before_any_write() -> Result<()> {
    let h = Harness::new().await?;
    let body = read(PUSH)?;
    let good = gantry_runtime::signature::sign_sha256(SECRET, &body);
    let other_body = gantry_runtime::signature::sign_sha256(SECRET, b"{\"zen\":\"other\"}");
    let other_secret = gantry_runtime::signature::sign_sha256(b"not the secret", &body);
    let sha1_prefix = good.replacen("sha256=", "sha1=", 1);
    let truncated = good[..good.len() - 2].to_string();
    let cases: [(&str, Option<&str>, &str); 5] = [
        ("missing signature", None, "missing_signature"),
        ("wrong secret", Some(&other_secret), "bad_signature"),
        (
            "signature over another body",
            Some(&other_body),
            "bad_signature",
        ),
        ("sha1= prefix", Some(&sha1_prefix), "bad_signature"),
        ("truncated signature", Some(&truncated), "bad_signature"),
    ];
    for (what, signature, expected) in cases {
        let mut headers = vec![
            ("content-type", "application/json"),
            ("x-github-event", "push"),
            ("x-github-delivery", DELIVERY),
        ];
        if let Some(sig) = signature {
            headers.push(("x-hub-signature-256", sig));
        }
        let (status, reply) = h.send(post(&headers, Body::from(body.clone()))?).await?;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{what}: {reply}");
        assert_eq!(error_code(status, &reply)?, expected, "{what}");
        h.assert_nothing_written(what).await?;
    }
    // The body alone is not enough: the signature must cover these exact bytes,
    // so re-serialising the same JSON (different whitespace) no longer verifies.
    let reformatted = serde_json::to_vec(&read_json(PUSH)?)?;
    assert_ne!(reformatted, body);
    let headers = [
        ("content-type", "application/json"),
        ("x-github-event", "push"),
        ("x-github-delivery", DELIVERY),
        ("x-hub-signature-256", good.as_str()),
    ];
    let (status, reply) = h.send(post(&headers, Body::from(reformatted))?).await?;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{reply}");
    assert_eq!(error_code(status, &reply)?, "bad_signature");
    h.assert_nothing_written("reformatted body").await
}

#[tokio::test]
async fn without_a_configured_secret_every_delivery_is_refused() -> Result<()> {
    let h = Harness::with(CONFIG, None).await?;
    for event in ["push", "ping"] {
        let body = read(if event == "push" { PUSH } else { PING })?;
        let (status, reply) = h.deliver(event, DELIVERY, &body).await?;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{event}: {reply}");
        assert_eq!(error_code(status, &reply)?, "not_configured");
        h.assert_nothing_written(event).await?;
    }
    Ok(())
}

const MAX: usize = fn_github_webhook::MAX_BODY_BYTES;

#[tokio::test]
async fn bodies_over_25_mib_are_refused_with_413() -> Result<()> {
    assert_eq!(MAX, 25 * 1024 * 1024);
    let h = Harness::new().await?;

    // Declared honestly: refused from the header, whatever the signature.
    let big = vec![b' '; MAX + 1];
    let (status, reply) = h.send(signed("push", DELIVERY, &big)?).await?;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE, "{reply}");
    assert_eq!(error_code(status, &reply)?, "payload_too_large");
    h.assert_nothing_written("content-length over the limit")
        .await?;

    // Streamed without a length (chunked): refused while reading.
    let chunks = (0..26).map(|_| Ok::<_, std::io::Error>(vec![b' '; 1024 * 1024]));
    let headers = [
        ("content-type", "application/json"),
        ("transfer-encoding", "chunked"),
        ("x-github-event", "push"),
        ("x-github-delivery", DELIVERY),
        ("x-hub-signature-256", "sha256=00"),
    ];
    let request = post(&headers, Body::from_stream(futures::stream::iter(chunks)))?;
    let (status, reply) = h.send(request).await?;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE, "{reply}");
    assert_eq!(error_code(status, &reply)?, "payload_too_large");
    h.assert_nothing_written("chunked body over the limit")
        .await?;

    // Exactly at the limit is read (and then refused for what it is, not its size).
    let at_limit = vec![b' '; MAX];
    let (status, reply) = h.send(signed("push", DELIVERY, &at_limit)?).await?;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{reply}");
    assert_eq!(error_code(status, &reply)?, "bad_payload");
    h.assert_nothing_written("body at the limit").await
}

/// `application/x-www-form-urlencoded` as GitHub sends it: `payload=` and the
/// percent-encoded JSON.
fn form_encoded(json: &[u8]) -> Vec<u8> {
    let mut out = b"payload=".to_vec();
    for &b in json {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b);
        } else {
            out.extend(format!("%{b:02X}").bytes());
        }
    }
    out
}

#[tokio::test]
async fn form_encoded_deliveries_are_refused_with_415() -> Result<()> {
    let h = Harness::new().await?;
    let body = form_encoded(&read(PUSH)?);
    let signature = gantry_runtime::signature::sign_sha256(SECRET, &body);
    let headers = [
        ("content-type", "application/x-www-form-urlencoded"),
        ("x-github-event", "push"),
        ("x-github-delivery", DELIVERY),
        ("x-hub-signature-256", signature.as_str()),
    ];
    let (status, reply) = h.send(post(&headers, Body::from(body))?).await?;
    assert_eq!(status, StatusCode::UNSUPPORTED_MEDIA_TYPE, "{reply}");
    assert_eq!(error_code(status, &reply)?, "unsupported_media_type");
    assert!(
        reply["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("application/json")),
        "the message says how to fix the webhook: {reply}"
    );
    h.assert_nothing_written("form-encoded").await
}

#[tokio::test]
async fn malformed_deliveries_are_400_and_write_nothing() -> Result<()> {
    let h = Harness::new().await?;
    let push = read(PUSH)?;

    let (status, reply) = h
        .deliver("push", DELIVERY, b"{\"ref\": \"refs/heads/main\",")
        .await?;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{reply}");
    assert_eq!(error_code(status, &reply)?, "bad_payload");
    h.assert_nothing_written("malformed JSON").await?;

    for (missing, needle) in [
        ("x-github-event", "X-GitHub-Event"),
        ("x-github-delivery", "X-GitHub-Delivery"),
    ] {
        let signature = gantry_runtime::signature::sign_sha256(SECRET, &push);
        let headers: Vec<(&str, &str)> = [
            ("content-type", "application/json"),
            ("x-github-event", "push"),
            ("x-github-delivery", DELIVERY),
            ("x-hub-signature-256", signature.as_str()),
        ]
        .into_iter()
        .filter(|(name, _)| *name != missing)
        .collect();
        let (status, reply) = h.send(post(&headers, Body::from(push.clone()))?).await?;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{missing}: {reply}");
        assert_eq!(error_code(status, &reply)?, "bad_header");
        assert!(
            reply["error"]["message"]
                .as_str()
                .is_some_and(|m| m.contains(needle)),
            "{reply}"
        );
        h.assert_nothing_written(missing).await?;
    }

    let not_a_sha = push_with(|p| p["after"] = json!("3f786850e387"))?;
    let (status, reply) = h.deliver("push", DELIVERY, &not_a_sha).await?;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{reply}");
    assert_eq!(error_code(status, &reply)?, "bad_payload");
    assert!(
        reply["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("after")),
        "{reply}"
    );
    h.assert_nothing_written("after is not a sha").await
}

#[tokio::test]
async fn pushes_that_start_no_run_are_accepted_with_a_reason() -> Result<()> {
    let h = Harness::new().await?;
    let cases: [(&str, Vec<u8>, &str); 4] = [
        (
            "branch deleted",
            push_with(|p| {
                p["deleted"] = json!(true);
                p["after"] = json!("0000000000000000000000000000000000000000");
                p["head_commit"] = Value::Null;
                p["commits"] = json!([]);
            })?,
            "refs/heads/main was deleted",
        ),
        (
            "tag push",
            push_with(|p| p["ref"] = json!("refs/tags/v1"))?,
            "tag push refs/tags/v1",
        ),
        (
            "unconfigured repository",
            push_with(|p| p["repository"]["full_name"] = json!("contoso/other"))?,
            "repository contoso/other is not configured",
        ),
        (
            "unconfigured branch",
            push_with(|p| p["ref"] = json!("refs/heads/feature/x"))?,
            "refs/heads/feature/x is not a configured branch",
        ),
    ];
    for (i, (what, body, reason)) in cases.into_iter().enumerate() {
        let delivery = format!("bbbbbbbb-0000-4000-8000-{i:012}");
        let (status, reply) = h.deliver("push", &delivery, &body).await?;
        assert_eq!(status, StatusCode::ACCEPTED, "{what}: {reply}");
        assert_eq!(reply["status"], "ignored", "{what}");
        assert!(
            reply["reason"].as_str().is_some_and(|r| r.contains(reason)),
            "{what}: expected {reason:?} in {reply}"
        );
        assert!(reply.get("runs").is_none(), "{what}: {reply}");
        assert_eq!(h.names("runs/").await?, Vec::<String>::new(), "{what}");
        assert_eq!(h.names("index/").await?, Vec::<String>::new(), "{what}");
        assert_eq!(h.audit().await?.len(), 0, "{what}");
        h.assert_no_messages(what).await?;
    }
    Ok(())
}

#[tokio::test]
async fn a_failed_workflow_run_fails_the_run_and_alerts_once() -> Result<()> {
    let h = Harness::new().await?;
    let (_, pushed) = h.deliver("push", DELIVERY, &read(PUSH)?).await?;
    let id = run_id_of(&pushed)?;
    let failed = read(WORKFLOW_FAILED)?;

    let (status, reply) = h
        .deliver(
            "workflow_run",
            "cccccccc-0000-4000-8000-000000000001",
            &failed,
        )
        .await?;
    assert_eq!(status, StatusCode::ACCEPTED, "{reply}");
    assert_eq!(reply["status"], "accepted");
    assert_eq!(reply["runs"][0]["run_id"], id.as_str());
    assert_eq!(reply["runs"][0]["status"], "failed");

    let run = h.runs.list(None, None, 10).await?;
    assert_eq!(run.len(), 1);
    let run = &run[0];
    assert_eq!(run.status, RunStatus::Failed);
    let ci = run.steps.get("ci").context("no ci step")?;
    assert_eq!(ci.status, StepStatus::Failed);
    assert_eq!(
        ci.summary.as_deref(),
        Some("build-and-push concluded failure")
    );
    assert_eq!(
        ci.details["url"],
        "https://github.com/contoso/web/actions/runs/11223344556"
    );

    let alerts = h.bus.peek("alerts").await;
    assert_eq!(alerts.len(), 1, "{alerts:#?}");
    assert_eq!(alerts[0].message_id, format!("{id}:alert:ci-failed"));
    let alert: Value = serde_json::from_str(&alerts[0].body)?;
    assert_eq!(alert["kind"], "run-failed");
    assert_eq!(alert["severity"], "high");
    assert_eq!(alert["app"], "web");
    assert_eq!(alert["run_id"], id.as_str());
    assert_eq!(alert["step"], "ci");
    for queue in QUEUES.iter().filter(|q| **q != "alerts") {
        assert_eq!(h.bus.stats(queue).await, QueueStats::default(), "{queue}");
    }

    // GitHub redelivers (new delivery id): the run stays as it is, and the
    // repeated alert is dropped by the queue's duplicate detection.
    let run_blob = h.blob(&format!("runs/web/{id}.json")).await?;
    let (status, reply) = h
        .deliver(
            "workflow_run",
            "cccccccc-0000-4000-8000-000000000002",
            &failed,
        )
        .await?;
    assert_eq!(status, StatusCode::ACCEPTED, "{reply}");
    assert_eq!(reply["runs"][0]["status"], "failed");
    assert_eq!(h.blob(&format!("runs/web/{id}.json")).await?, run_blob);
    assert_eq!(h.bus.peek("alerts").await.len(), 1);
    assert_eq!(h.bus.stats("alerts").await.active, 1);

    let failures: Vec<_> = h
        .audit()
        .await?
        .into_iter()
        .filter(|e| e["action"] == "run.failed")
        .collect();
    assert_eq!(failures.len(), 1, "{failures:#?}");
    assert_eq!(failures[0]["detail"]["step"], "ci");
    Ok(())
}

#[tokio::test]
async fn successful_or_unknown_workflow_runs_are_ignored() -> Result<()> {
    let h = Harness::new().await?;
    let (_, pushed) = h.deliver("push", DELIVERY, &read(PUSH)?).await?;
    let id = run_id_of(&pushed)?;
    let run_blob = h.blob(&format!("runs/web/{id}.json")).await?;

    let mut success = read_json(WORKFLOW_FAILED)?;
    success["workflow_run"]["conclusion"] = json!("success");
    let (status, reply) = h
        .deliver(
            "workflow_run",
            "dddddddd-0000-4000-8000-000000000001",
            &serde_json::to_vec(&success)?,
        )
        .await?;
    assert_eq!(status, StatusCode::ACCEPTED, "{reply}");
    assert_eq!(reply["status"], "ignored");
    assert!(
        reply["reason"]
            .as_str()
            .is_some_and(|r| r.contains("only failed")),
        "{reply}"
    );

    let other = "0123456789abcdef0123456789abcdef01234567";
    let mut unknown = read_json(WORKFLOW_FAILED)?;
    unknown["workflow_run"]["head_sha"] = json!(other);
    let (status, reply) = h
        .deliver(
            "workflow_run",
            "dddddddd-0000-4000-8000-000000000002",
            &serde_json::to_vec(&unknown)?,
        )
        .await?;
    assert_eq!(status, StatusCode::ACCEPTED, "{reply}");
    assert_eq!(reply["status"], "ignored");
    assert!(
        reply["reason"]
            .as_str()
            .is_some_and(|r| r.contains(&format!("no run for commit {other}"))),
        "{reply}"
    );

    assert_eq!(h.blob(&format!("runs/web/{id}.json")).await?, run_blob);
    assert_eq!(h.names("runs/").await?.len(), 1);
    h.assert_no_messages("ignored workflow runs").await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_deliveries_of_one_commit_make_exactly_one_run() -> Result<()> {
    let h = Arc::new(Harness::new().await?);
    let body = Arc::new(read(PUSH)?);
    let mut tasks = Vec::new();
    for i in 0..8 {
        let (h, body) = (h.clone(), body.clone());
        tasks.push(tokio::spawn(async move {
            let delivery = format!("eeeeeeee-0000-4000-8000-{i:012}");
            h.deliver("push", &delivery, &body).await
        }));
    }
    let mut ids = std::collections::BTreeSet::new();
    for task in tasks {
        let (status, reply) = task.await??;
        assert_eq!(status, StatusCode::ACCEPTED, "{reply}");
        ids.insert(run_id_of(&reply)?);
    }
    assert_eq!(ids.len(), 1, "every delivery names the same run: {ids:?}");
    let id = ids.into_iter().next().context("one id")?;

    assert_eq!(h.names("runs/").await?, vec![format!("runs/web/{id}.json")]);
    assert_eq!(
        h.names("index/runs/").await?,
        vec![format!("index/runs/{id}")]
    );
    assert_eq!(
        h.blob(&format!("index/commits/web/{SHA}")).await?.trim(),
        id
    );
    assert_eq!(h.names("dedup/github/").await?.len(), 8);
    let created = h
        .audit()
        .await?
        .into_iter()
        .filter(|e| e["action"] == "run.created")
        .count();
    assert_eq!(created, 1, "the audit trail records one creation");
    Ok(())
}

#[tokio::test]
async fn a_monorepo_push_starts_one_run_per_app() -> Result<()> {
    let h = Harness::with(MONOREPO, Some(SECRET)).await?;
    let (status, reply) = h.deliver("push", DELIVERY, &read(PUSH)?).await?;
    assert_eq!(status, StatusCode::ACCEPTED, "{reply}");
    let refs = reply["runs"].as_array().context("runs")?;
    assert_eq!(refs.len(), 2, "{reply}");

    let runs = h.runs.list(None, None, 10).await?;
    assert_eq!(runs.len(), 2);
    let mut apps: Vec<_> = runs.iter().map(|r| r.app.to_string()).collect();
    apps.sort();
    assert_eq!(apps, ["web", "web-worker"]);
    assert_ne!(runs[0].id, runs[1].id);
    for run in &runs {
        assert_eq!(run.status, RunStatus::AwaitingImage);
        assert_eq!(run.source.commit.as_ref().map(|c| c.as_str()), Some(SHA));
        assert_eq!(
            h.blob(&format!("index/commits/{}/{SHA}", run.app))
                .await?
                .trim(),
            run.id.as_str()
        );
        assert!(
            refs.iter()
                .any(|r| r["app"] == run.app.as_str() && r["run_id"] == run.id.as_str()),
            "{reply}"
        );
    }
    assert_eq!(h.audit().await?.len(), 2);
    Ok(())
}

#[tokio::test]
async fn only_build_workflows_for_a_tracked_push_fail_a_run() -> Result<()> {
    // A failing pull_request workflow on the same sha, a failure on an
    // untracked branch, and a workflow that is not the configured build all
    // leave the run alone.
    let config = format!("{CONFIG}ci_workflows = [\"build-and-push\"]\n");
    let h = Harness::with(&config, Some(SECRET)).await?;
    let (_, pushed) = h.deliver("push", DELIVERY, &read(PUSH)?).await?;
    let id = run_id_of(&pushed)?;
    let variants: [(&str, Value); 3] = [
        ("event", json!("pull_request")),
        ("head_branch", json!("feature/x")),
        ("name", json!("lint")),
    ];
    for (i, (field, value)) in variants.into_iter().enumerate() {
        let mut wr = read_json(WORKFLOW_FAILED)?;
        wr["workflow_run"][field] = value;
        let (status, reply) = h
            .deliver(
                "workflow_run",
                &format!("dddddddd-0000-4000-8000-00000000000{i}"),
                &serde_json::to_vec(&wr)?,
            )
            .await?;
        assert_eq!(status, StatusCode::ACCEPTED, "{field}: {reply}");
        assert_eq!(reply["status"], "ignored", "{field}: {reply}");
    }
    let runs = h.runs.list(None, None, 10).await?;
    assert_eq!(runs[0].id.as_str(), id);
    assert_eq!(runs[0].status, RunStatus::AwaitingImage);
    assert_eq!(h.bus.stats("alerts").await.active, 0);

    // The configured build workflow failing on the tracked push does fail it.
    let (_, reply) = h
        .deliver(
            "workflow_run",
            "dddddddd-0000-4000-8000-000000000009",
            &read(WORKFLOW_FAILED)?,
        )
        .await?;
    assert_eq!(reply["runs"][0]["status"], "failed", "{reply}");
    Ok(())
}
