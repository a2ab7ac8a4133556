//! `registry-push` invoked through the custom-handler envelope (`POST
//! /registry-push`), exactly as the Functions host (or `gantry dev`) invokes it,
//! with the embedded on-disk store and the embedded queue.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};

use anyhow::{Context, Result, ensure};
use axum::Router;
use axum::body::Body;
use gantry_bus::{EmbeddedBus, MessageView, QUEUES, QueueOptions, QueueStats};
use gantry_pipeline::messages::{Deployed, DeployedVersion};
use gantry_pipeline::{Config, Digest, Run, RunStatus, RunStore, SourceKind, StepStatus};
use gantry_runtime::{Deps, Secret, Secrets};
use gantry_store::fs::FsStore;
use gantry_store::{Etag, Page, StateStore, StoreError, Versioned};
use http::{Request, StatusCode};
use http_body_util::BodyExt;
use serde_json::{Value, json};
use tower::ServiceExt;

const SECRET: &[u8] = b"registry-test-secret";
const SHA: &str = "3f786850e387550fdab836ed7e6dc881de23001b";
const DIGEST: &str = "sha256:b5b2b2c507a0944348e0303114d8d93aaaa081732b86451d9bce1f432a537bc7";
const DIGEST_2: &str = "sha256:1111111111111111111111111111111111111111111111111111111111111111";
const EVENT_ID: &str = "831e1650-001e-001b-66ab-eeb76e069631";
const CE_DIGEST: &str = "sha256:4bd5f0b1f7c2e9a8d6c3b0a7e4f1d8c5b2a9f6e3d0c7b4a1f8e5d2c9b6a3f0e7";
const CE_ID: &str = "9f2c8a3e-4b1d-4e6f-8a7b-1c2d3e4f5a6b";

const PUSH: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../../examples/github-push.json"
);
const PUSHED: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../../examples/acr-image-pushed.json"
);
const PUSHED_CE: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../../examples/acr-image-pushed.cloudevent.json"
);
const DELETED: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../../examples/acr-image-deleted.json"
);

const CONFIG: &str = r#"
[[apps]]
name = "web"
repo = "contoso/web"
image = "contoso.azurecr.io/web"

[[apps]]
name = "api"
repo = "contoso/api"
branches = ["main", "release"]
image = "contoso.azurecr.io/api"
"#;

/// The on-disk store, with writes (create, replace) that can be made to fail
/// transiently, as Blob Storage does under throttling.
struct FlakyStore {
    inner: FsStore,
    /// Writes to let through before failing.
    skip: AtomicU32,
    /// Writes to fail after that.
    fail: AtomicU32,
}

impl FlakyStore {
    fn fail_writes(&self, skip: u32, fail: u32) {
        self.skip.store(skip, Ordering::SeqCst);
        self.fail.store(fail, Ordering::SeqCst);
    }

    fn injected(&self, name: &str) -> Result<(), StoreError> {
        let take = |counter: &AtomicU32| {
            counter
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                .is_ok()
        };
        if take(&self.skip) || !take(&self.fail) {
            return Ok(());
        }
        Err(StoreError::Put {
            name: name.to_string(),
            message: "503 ServerBusy (injected by the test)".into(),
            transient: true,
        })
    }
}

#[async_trait::async_trait]
impl StateStore for FlakyStore {
    async fn get(&self, name: &str) -> Result<Option<Versioned>, StoreError> {
        self.inner.get(name).await
    }
    async fn create(&self, name: &str, body: &[u8]) -> Result<Etag, StoreError> {
        self.injected(name)?;
        self.inner.create(name, body).await
    }
    async fn replace(&self, name: &str, body: &[u8], etag: &Etag) -> Result<Etag, StoreError> {
        self.injected(name)?;
        self.inner.replace(name, body, etag).await
    }
    async fn list(&self, prefix: &str, next: Option<&str>, max: u32) -> Result<Page, StoreError> {
        self.inner.list(prefix, next, max).await
    }
    async fn append(&self, name: &str, data: &[u8]) -> Result<(), StoreError> {
        self.inner.append(name, data).await
    }
}

struct Harness {
    _dir: tempfile::TempDir,
    store: Arc<FlakyStore>,
    bus: EmbeddedBus,
    runs: RunStore,
    router: Router,
}

impl Harness {
    async fn new() -> Result<Harness> {
        let dir = tempfile::tempdir()?;
        let store = Arc::new(FlakyStore {
            inner: FsStore::open(dir.path().join("store"))?,
            skip: AtomicU32::new(0),
            fail: AtomicU32::new(0),
        });
        let bus = EmbeddedBus::open(dir.path().join("bus"), QueueOptions::default()).await?;
        let runs = RunStore::new(store.clone());
        let deps = Deps {
            runs: runs.clone(),
            bus: Arc::new(bus.clone()),
            config: Arc::new(Config::parse(CONFIG, "test.toml")?),
            secrets: Secrets {
                github_webhook: Some(Secret::new(SECRET)),
                ..Secrets::default()
            },
            services: Default::default(),
        };
        let router = gantry_runtime::app(
            Arc::new(deps),
            &[fn_github_webhook::function(), fn_registry_push::function()],
        );
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

    /// A signed GitHub push of `sha`; returns the run id.
    async fn push(&self, sha: &str, delivery: &str) -> Result<String> {
        let mut push = read_json(PUSH)?;
        push["after"] = json!(sha);
        push["head_commit"]["id"] = json!(sha);
        let body = serde_json::to_vec(&push)?;
        let signature = gantry_runtime::signature::sign_sha256(SECRET, &body);
        let request = Request::post("/api/github")
            .header("content-type", "application/json")
            .header("x-github-event", "push")
            .header("x-github-delivery", delivery)
            .header("x-hub-signature-256", signature)
            .body(Body::from(body))?;
        let (status, reply) = self.send(request).await?;
        ensure!(status == StatusCode::ACCEPTED, "push: {status} {reply}");
        Ok(reply["runs"][0]["run_id"]
            .as_str()
            .context("push made no run")?
            .to_string())
    }

    /// Posts a raw invocation envelope.
    async fn invoke_raw(&self, envelope: Vec<u8>) -> Result<(StatusCode, Value)> {
        let request = Request::post("/registry-push")
            .header("content-type", "application/json")
            .body(Body::from(envelope))?;
        self.send(request).await
    }

    /// Delivers `body` as the Functions host would (through the shared envelope builder).
    async fn deliver(
        &self,
        body: &[u8],
        message_id: &str,
        delivery_count: u32,
    ) -> Result<(StatusCode, Value)> {
        let envelope = gantry_runtime::envelope::host_request_for_message(
            "message",
            false,
            body,
            message_id,
            delivery_count,
            None,
            "2026-11-27T10:03:48.1234567Z",
            &BTreeMap::new(),
        );
        self.invoke_raw(serde_json::to_vec(&envelope)?).await
    }

    /// Delivers and expects the host to be told "done" (200, the documented reply shape).
    async fn deliver_ok(&self, body: &[u8], message_id: &str) -> Result<String> {
        let (status, reply) = self.deliver(body, message_id, 1).await?;
        ensure!(status == StatusCode::OK, "{status}: {reply}");
        log_line(&reply)
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

    async fn runs(&self) -> Result<Vec<Run>> {
        Ok(self.runs.list(None, None, 1000).await?)
    }

    async fn run(&self, id: &str) -> Result<Run> {
        let id = gantry_pipeline::RunId::parse(id)?;
        self.runs.find(&id).await?.context("run not found")
    }

    async fn assert_nothing_written(&self, what: &str) -> Result<()> {
        let page = self.store.list("", None, 1000).await?;
        ensure!(
            page.names.is_empty(),
            "{what}: store holds {:?}",
            page.names
        );
        self.assert_quiet(&[], what).await
    }

    /// Every queue except `except` is empty.
    async fn assert_quiet(&self, except: &[&str], what: &str) -> Result<()> {
        for queue in QUEUES.iter().filter(|q| !except.contains(q)) {
            let stats = self.bus.stats(queue).await;
            ensure!(
                stats == QueueStats::default(),
                "{what}: queue {queue} has {stats:?}"
            );
        }
        Ok(())
    }

    async fn audit(&self, action: &str) -> Result<Vec<Value>> {
        let mut lines = Vec::new();
        for name in self.names("audit/").await? {
            for line in self.blob(&name).await?.lines() {
                let entry: Value = serde_json::from_str(line)?;
                if entry["action"] == action {
                    lines.push(entry);
                }
            }
        }
        Ok(lines)
    }
}

fn read_json(path: &str) -> Result<Value> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {path}"))?;
    Ok(serde_json::from_slice(&bytes)?)
}

fn log_line(reply: &Value) -> Result<String> {
    ensure!(
        reply["Outputs"] == json!({}) && reply["ReturnValue"].is_null(),
        "not the custom-handler reply shape: {reply}"
    );
    let logs = reply["Logs"].as_array().context("Logs")?;
    ensure!(logs.len() == 1, "{reply}");
    Ok(logs[0].as_str().context("log line")?.to_string())
}

/// The Event Grid example with another id, tag and digest.
fn pushed(id: &str, tag: Option<&str>, digest: &str) -> Result<Value> {
    let mut events = read_json(PUSHED)?;
    let event = &mut events[0];
    event["id"] = json!(id);
    event["data"]["target"]["digest"] = json!(digest);
    match tag {
        Some(tag) => {
            event["data"]["target"]["tag"] = json!(tag);
            event["subject"] = json!(format!("web:{tag}"));
        }
        None => {
            if let Some(target) = event["data"]["target"].as_object_mut() {
                target.remove("tag");
            }
            event["subject"] = json!("web");
        }
    }
    Ok(events)
}

fn bytes(value: &Value) -> Result<Vec<u8>> {
    Ok(serde_json::to_vec(value)?)
}

/// A body exactly as the Functions host posts it for a Service Bus trigger:
/// the message as a string, metadata scalars JSON-encoded a second time, the
/// delivery count as a string.
fn raw_host_envelope(body: &[u8], message_id: &str, delivery_count: u32) -> Result<Vec<u8>> {
    let quoted = |s: &str| Value::String(Value::String(s.to_string()).to_string());
    let envelope = json!({
        "Data": {"message": String::from_utf8(body.to_vec())?},
        "Metadata": {
            "MessageId": quoted(message_id),
            "DeliveryCount": delivery_count.to_string(),
            "SequenceNumber": "42",
            "EnqueuedTimeUtc": quoted("2026-11-27T10:03:48.123Z"),
            "ExpiresAtUtc": quoted("2026-12-11T10:03:48.123Z"),
            "ContentType": quoted("application/json"),
            "UserProperties": "{\"aeg-event-type\":\"Notification\"}",
            "ApplicationProperties": "{\"aeg-event-type\":\"Notification\"}",
            "MessageReceiver": "{}",
            "MessageSession": "{}",
            "sys": {
                "MethodName": "registry-push",
                "UtcNow": "2026-11-27T10:03:48.2Z",
                "RandomGuid": "0b0f6a3e-55a1-4b59-a1c6-0d7a4a2f3b11"
            }
        }
    });
    Ok(serde_json::to_vec(&envelope)?)
}

async fn scan_messages(h: &Harness) -> Vec<MessageView> {
    h.bus.peek("scan").await
}

#[tokio::test]
async fn image_pushed_with_the_commit_tag_hands_the_run_to_the_scan_gate() -> Result<()> {
    let h = Harness::new().await?;
    let id = h.push(SHA, "11111111-2222-4333-8444-555555555555").await?;

    let body = std::fs::read(PUSHED)?;
    let line = h.deliver_ok(&body, EVENT_ID).await?;
    assert!(line.contains("scan queued"), "{line}");

    let runs = h.runs().await?;
    assert_eq!(runs.len(), 1);
    let run = &runs[0];
    assert_eq!(run.id.as_str(), id);
    assert_eq!(run.status, RunStatus::Scanning);
    let image = run.image.as_ref().context("image recorded")?;
    assert_eq!(image.registry, "contoso.azurecr.io");
    assert_eq!(image.repository, "web");
    assert_eq!(image.tag.as_deref(), Some(SHA));
    assert_eq!(image.digest.as_str(), DIGEST);
    let scan = run.steps.get("scan").context("scan step")?;
    assert_eq!((scan.status, scan.attempts), (StepStatus::Pending, 1));
    assert_eq!(run.source.kind, SourceKind::Github, "still the push's run");

    assert_eq!(
        h.blob(&format!("index/digests/web/{DIGEST}")).await?.trim(),
        id
    );
    assert_eq!(
        h.names("dedup/registry/").await?,
        vec![format!("dedup/registry/{EVENT_ID}")]
    );
    assert_eq!(h.audit("run.image-recorded").await?.len(), 1);

    let scans = scan_messages(&h).await;
    assert_eq!(scans.len(), 1, "{scans:#?}");
    assert_eq!(scans[0].message_id, format!("{id}:scan:1"));
    assert_eq!(scans[0].session_id, None);
    assert_eq!(
        serde_json::from_str::<Value>(&scans[0].body)?,
        json!({"app": "web", "run_id": id, "digest": DIGEST, "attempt": 1})
    );
    assert_eq!(scans[0].properties.get("run-id"), Some(&id));
    h.assert_quiet(&["scan"], "image pushed").await
}

#[tokio::test]
async fn an_abbreviated_commit_tag_correlates() -> Result<()> {
    let h = Harness::new().await?;
    let id = h.push(SHA, "11111111-2222-4333-8444-555555555555").await?;
    h.deliver_ok(
        &bytes(&pushed(EVENT_ID, Some(&SHA[..7]), DIGEST)?)?,
        EVENT_ID,
    )
    .await?;
    let runs = h.runs().await?;
    assert_eq!(runs.len(), 1, "{runs:#?}");
    assert_eq!(runs[0].id.as_str(), id);
    assert_eq!(runs[0].status, RunStatus::Scanning);
    assert_eq!(scan_messages(&h).await.len(), 1);
    Ok(())
}

#[tokio::test]
async fn an_ambiguous_abbreviation_does_not_correlate() -> Result<()> {
    let h = Harness::new().await?;
    let twin = format!("{}{}", &SHA[..7], "1".repeat(33));
    assert_eq!(twin.len(), 40);
    let first = h.push(SHA, "11111111-2222-4333-8444-000000000001").await?;
    let second = h
        .push(&twin, "11111111-2222-4333-8444-000000000002")
        .await?;
    assert_ne!(first, second);

    h.deliver_ok(
        &bytes(&pushed(EVENT_ID, Some(&SHA[..7]), DIGEST)?)?,
        EVENT_ID,
    )
    .await?;

    let runs = h.runs().await?;
    assert_eq!(runs.len(), 3, "{runs:#?}");
    for id in [&first, &second] {
        let run = h.run(id).await?;
        assert_eq!(run.status, RunStatus::AwaitingImage, "{run:?}");
        assert!(run.image.is_none());
    }
    let registry = runs
        .iter()
        .find(|r| r.id.as_str() != first && r.id.as_str() != second)
        .context("registry run")?;
    assert_eq!(registry.source.kind, SourceKind::Registry);
    assert_eq!(registry.source.commit, None);
    assert_eq!(registry.status, RunStatus::Scanning);
    assert_eq!(
        h.blob(&format!("index/digests/web/{DIGEST}")).await?.trim(),
        registry.id.as_str()
    );
    let scans = scan_messages(&h).await;
    assert_eq!(scans.len(), 1);
    assert_eq!(scans[0].message_id, format!("{}:scan:1", registry.id));
    Ok(())
}

#[tokio::test]
async fn a_cloudevents_push_without_a_commit_starts_a_registry_run() -> Result<()> {
    let h = Harness::new().await?;
    let body = std::fs::read(PUSHED_CE)?;
    // Invoked with the host's own encoding of the envelope.
    let (status, reply) = h.invoke_raw(raw_host_envelope(&body, CE_ID, 1)?).await?;
    assert_eq!(status, StatusCode::OK, "{reply}");
    assert!(log_line(&reply)?.contains("scan queued"), "{reply}");

    let runs = h.runs().await?;
    assert_eq!(runs.len(), 1);
    let run = &runs[0];
    assert_eq!(run.app.as_str(), "api");
    assert_eq!(run.status, RunStatus::Scanning);
    assert_eq!(run.source.kind, SourceKind::Registry);
    assert_eq!(run.source.delivery.as_deref(), Some(CE_ID));
    assert_eq!(run.source.commit, None);
    let image = run.image.as_ref().context("image")?;
    assert_eq!(image.tag.as_deref(), Some("v2.4.1"));
    assert_eq!(image.digest.as_str(), CE_DIGEST);
    assert_eq!(
        h.blob(&format!("index/digests/api/{CE_DIGEST}"))
            .await?
            .trim(),
        run.id.as_str()
    );
    assert_eq!(
        h.blob(&format!("index/runs/{}", run.id)).await?.trim(),
        "api"
    );
    assert_eq!(h.audit("run.created").await?.len(), 1);

    let scans = scan_messages(&h).await;
    assert_eq!(scans.len(), 1);
    assert_eq!(scans[0].message_id, format!("{}:scan:1", run.id));
    assert_eq!(
        serde_json::from_str::<Value>(&scans[0].body)?,
        json!({"app": "api", "run_id": run.id, "digest": CE_DIGEST, "attempt": 1})
    );
    Ok(())
}

#[tokio::test]
async fn every_event_of_an_array_is_processed() -> Result<()> {
    let h = Harness::new().await?;
    let web_run = h.push(SHA, "11111111-2222-4333-8444-555555555555").await?;
    let web = pushed(EVENT_ID, Some(SHA), DIGEST)?;
    let api = read_json(PUSHED_CE)?;
    let both = json!([web[0], api]);
    let line = h.deliver_ok(&bytes(&both)?, "batch-1").await?;
    assert_eq!(line.matches("scan queued").count(), 2, "{line}");

    let runs = h.runs().await?;
    assert_eq!(runs.len(), 2);
    assert!(
        runs.iter().all(|r| r.status == RunStatus::Scanning),
        "{runs:#?}"
    );
    assert_eq!(
        h.run(&web_run).await?.image.map(|i| i.digest.to_string()),
        Some(DIGEST.into())
    );
    let mut claims = h.names("dedup/registry/").await?;
    claims.sort();
    assert_eq!(
        claims,
        [
            format!("dedup/registry/{EVENT_ID}"),
            format!("dedup/registry/{CE_ID}")
        ]
    );
    let mut digests: Vec<String> = scan_messages(&h)
        .await
        .iter()
        .map(|m| serde_json::from_str::<Value>(&m.body).map(|v| v["digest"].to_string()))
        .collect::<Result<_, _>>()?;
    digests.sort();
    assert_eq!(
        digests,
        [format!("\"{CE_DIGEST}\""), format!("\"{DIGEST}\"")]
    );
    Ok(())
}

#[tokio::test]
async fn a_redelivered_event_makes_one_run_and_one_scan_message() -> Result<()> {
    let h = Harness::new().await?;
    let id = h.push(SHA, "11111111-2222-4333-8444-555555555555").await?;
    let body = std::fs::read(PUSHED)?;

    // The broker's redeliveries (same MessageId, growing DeliveryCount) ...
    for count in 1..=10 {
        let (status, reply) = h.deliver(&body, EVENT_ID, count).await?;
        assert_eq!(status, StatusCode::OK, "{reply}");
        if count > 1 {
            assert!(log_line(&reply)?.contains("duplicate"), "{reply}");
        }
    }
    // ... and Event Grid's retries past duplicate detection (fresh MessageIds),
    // half of them in the host's raw encoding.
    for i in 0..10 {
        let message_id = format!("fresh-{i}");
        let (status, reply) = if i % 2 == 0 {
            h.deliver(&body, &message_id, 1).await?
        } else {
            h.invoke_raw(raw_host_envelope(&body, &message_id, 1)?)
                .await?
        };
        assert_eq!(status, StatusCode::OK, "{reply}");
        assert!(log_line(&reply)?.contains("duplicate"), "{reply}");
    }

    let runs = h.runs().await?;
    assert_eq!(runs.len(), 1, "{runs:#?}");
    assert_eq!(runs[0].id.as_str(), id);
    assert_eq!(runs[0].status, RunStatus::Scanning);
    let scans = scan_messages(&h).await;
    assert_eq!(scans.len(), 1, "{scans:#?}");
    assert_eq!(scans[0].message_id, format!("{id}:scan:1"));
    assert_eq!(h.audit("run.image-recorded").await?.len(), 1);
    assert!(h.names("rejected/").await?.is_empty());
    h.assert_quiet(&["scan"], "redeliveries").await
}

#[tokio::test]
async fn the_same_digest_under_another_tag_keeps_its_run() -> Result<()> {
    let h = Harness::new().await?;
    let id = h.push(SHA, "11111111-2222-4333-8444-555555555555").await?;
    h.deliver_ok(&std::fs::read(PUSHED)?, EVENT_ID).await?;
    let run_blob = h.blob(&format!("runs/web/{id}.json")).await?;

    let retag = pushed(
        "2f0c6c5e-0000-4000-8000-000000000001",
        Some("latest"),
        DIGEST,
    )?;
    h.deliver_ok(&bytes(&retag)?, "retag-1").await?;

    assert_eq!(h.runs().await?.len(), 1);
    assert_eq!(
        h.blob(&format!("runs/web/{id}.json")).await?,
        run_blob,
        "run unchanged"
    );
    let run = h.run(&id).await?;
    assert_eq!(run.image.and_then(|i| i.tag).as_deref(), Some(SHA));
    let scans = scan_messages(&h).await;
    assert_eq!(scans.len(), 1, "{scans:#?}");
    assert_eq!(scans[0].message_id, format!("{id}:scan:1"));
    Ok(())
}

#[tokio::test]
async fn a_rebuild_of_the_same_commit_gets_its_own_run() -> Result<()> {
    let h = Harness::new().await?;
    let first = h.push(SHA, "11111111-2222-4333-8444-555555555555").await?;
    h.deliver_ok(&std::fs::read(PUSHED)?, EVENT_ID).await?;

    let rebuild = pushed("2f0c6c5e-0000-4000-8000-000000000002", Some(SHA), DIGEST_2)?;
    h.deliver_ok(&bytes(&rebuild)?, "rebuild-1").await?;

    let runs = h.runs().await?;
    assert_eq!(runs.len(), 2, "{runs:#?}");
    let old = h.run(&first).await?;
    assert_eq!(old.image.as_ref().map(|i| i.digest.as_str()), Some(DIGEST));
    assert_eq!(old.status, RunStatus::Scanning);
    let new = runs
        .iter()
        .find(|r| r.id.as_str() != first)
        .context("second run")?;
    assert_eq!(
        new.image.as_ref().map(|i| i.digest.as_str()),
        Some(DIGEST_2)
    );
    assert_eq!(new.status, RunStatus::Scanning);
    assert_eq!(new.source.commit.as_ref().map(|c| c.as_str()), Some(SHA));
    assert!(new.id > old.id, "the rebuild's run is newer");

    assert_eq!(
        h.blob(&format!("index/digests/web/{DIGEST}")).await?.trim(),
        first
    );
    assert_eq!(
        h.blob(&format!("index/digests/web/{DIGEST_2}"))
            .await?
            .trim(),
        new.id.as_str()
    );
    assert_eq!(
        h.blob(&format!("index/commits/web/{SHA}")).await?.trim(),
        first
    );
    let mut ids: Vec<String> = scan_messages(&h)
        .await
        .into_iter()
        .map(|m| m.message_id)
        .collect();
    ids.sort();
    let mut expected = vec![format!("{first}:scan:1"), format!("{}:scan:1", new.id)];
    expected.sort();
    assert_eq!(ids, expected);
    Ok(())
}

#[tokio::test]
async fn an_unconfigured_repository_is_acknowledged_without_a_run() -> Result<()> {
    let h = Harness::new().await?;
    let mut events = pushed(EVENT_ID, Some("v1"), DIGEST)?;
    events[0]["data"]["target"]["repository"] = json!("tools/builder");
    let line = h.deliver_ok(&bytes(&events)?, EVENT_ID).await?;
    assert!(line.contains("not a configured image"), "{line}");
    h.assert_nothing_written("unconfigured repository").await
}

#[tokio::test]
async fn an_invalid_digest_is_rejected_recorded_and_alerted() -> Result<()> {
    let h = Harness::new().await?;
    h.push(SHA, "11111111-2222-4333-8444-555555555555").await?;
    let body = bytes(&pushed(EVENT_ID, Some(SHA), "sha256:XYZ")?)?;
    let message_id = "5F0C2A7E-8C1B-4D3A-9E2F-6A7B8C9D0E1F";
    let (status, reply) = h
        .invoke_raw(raw_host_envelope(&body, message_id, 3)?)
        .await?;
    assert_eq!(
        status,
        StatusCode::OK,
        "acknowledged, never retried: {reply}"
    );
    assert!(log_line(&reply)?.starts_with("rejected:"), "{reply}");

    // The bad event is rejected on its own, keyed by its event id (the
    // MessageId arrived JSON-encoded twice and is not the key of one event).
    let key = EVENT_ID.to_ascii_lowercase();
    let name = format!("rejected/registry-push/{key}.json");
    assert_eq!(h.names("rejected/").await?, vec![name.clone()]);
    let record: Value = serde_json::from_str(&h.blob(&name).await?)?;
    assert_eq!(record["function"], "registry-push");
    assert_eq!(record["message_id"], EVENT_ID);
    assert_eq!(record["delivery_count"], 3);
    let reason = record["reason"].as_str().context("reason")?;
    assert!(
        reason.contains("invalid digest") && reason.contains("sha256:XYZ"),
        "{reason}"
    );

    let alerts = h.bus.peek("alerts").await;
    assert_eq!(alerts.len(), 1, "{alerts:#?}");
    assert_eq!(
        alerts[0].message_id,
        format!("rejected:registry-push:{key}")
    );
    let alert: Value = serde_json::from_str(&alerts[0].body)?;
    assert_eq!(alert["kind"], "message-rejected");
    assert_eq!(alert["detail"]["record"], name.as_str());

    let run = &h.runs().await?[0];
    assert_eq!(run.status, RunStatus::AwaitingImage, "no image recorded");
    assert!(run.image.is_none());
    assert_eq!(h.runs().await?.len(), 1);
    assert!(h.names("index/digests/").await?.is_empty());
    assert!(h.names("dedup/registry/").await?.is_empty());
    assert_eq!(h.audit("message.rejected").await?.len(), 1);
    h.assert_quiet(&["alerts"], "invalid digest").await
}

#[tokio::test]
async fn a_malformed_envelope_is_400_and_writes_nothing() -> Result<()> {
    let h = Harness::new().await?;
    let (status, reply) = h.invoke_raw(b"this is not an envelope".to_vec()).await?;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{reply}");
    assert_eq!(reply["error"]["code"], "bad_envelope");
    h.assert_nothing_written("malformed envelope").await
}

#[tokio::test]
async fn malformed_messages_are_rejected_with_a_record() -> Result<()> {
    let h = Harness::new().await?;
    for (message_id, body, needle) in [
        ("bad-1", &b"this is not JSON"[..], "bad message"),
        ("bad-2", &b"[]"[..], "empty array"),
    ] {
        let (status, reply) = h.deliver(body, message_id, 1).await?;
        assert_eq!(status, StatusCode::OK, "{message_id}: {reply}");
        assert!(log_line(&reply)?.contains("rejected"), "{reply}");
        let record: Value = serde_json::from_str(
            &h.blob(&format!("rejected/registry-push/{message_id}.json"))
                .await?,
        )?;
        let reason = record["reason"].as_str().context("reason")?;
        assert!(reason.contains(needle), "{message_id}: {reason}");
        assert_eq!(record["message_id"], message_id);
    }
    let mut alert_ids: Vec<String> = h
        .bus
        .peek("alerts")
        .await
        .into_iter()
        .map(|m| m.message_id)
        .collect();
    alert_ids.sort();
    assert_eq!(
        alert_ids,
        [
            "rejected:registry-push:bad-1",
            "rejected:registry-push:bad-2"
        ]
    );
    assert!(h.names("runs/").await?.is_empty());
    assert!(h.names("index/").await?.is_empty());
    h.assert_quiet(&["alerts"], "malformed messages").await
}

async fn write_deployed(h: &Harness, digest: &str) -> Result<String> {
    let run_id = gantry_pipeline::ids::new_run_id(1_764_237_600_000);
    let deployed = Deployed {
        current: Some(DeployedVersion {
            digest: Digest::parse(digest)?,
            run_id: run_id.clone(),
            manifest_hash: "ab".repeat(32),
        }),
        previous: None,
    };
    h.store
        .create("apps/web/deployed.json", &serde_json::to_vec(&deployed)?)
        .await?;
    Ok(run_id.to_string())
}

#[tokio::test]
async fn deleting_the_deployed_image_raises_one_high_alert() -> Result<()> {
    let h = Harness::new().await?;
    let deployed_run = write_deployed(&h, DIGEST).await?;
    let body = std::fs::read(DELETED)?;
    let line = h.deliver_ok(&body, "deleted-1").await?;
    assert!(line.contains("alert queued"), "{line}");
    // Redelivered past duplicate detection: still one alert.
    h.deliver_ok(&body, "deleted-2").await?;

    let alerts = h.bus.peek("alerts").await;
    assert_eq!(alerts.len(), 1, "{alerts:#?}");
    assert_eq!(
        alerts[0].message_id,
        format!("{deployed_run}:image-deleted")
    );
    let alert: Value = serde_json::from_str(&alerts[0].body)?;
    assert_eq!(alert["kind"], "image-deleted");
    assert_eq!(alert["severity"], "high");
    assert_eq!(alert["app"], "web");
    assert_eq!(alert["digest"], DIGEST);
    assert_eq!(alert["run_id"], deployed_run.as_str());
    assert!(
        h.names("runs/").await?.is_empty(),
        "a deletion starts no run"
    );
    h.assert_quiet(&["alerts"], "image deleted").await
}

#[tokio::test]
async fn deleting_an_image_that_is_not_deployed_raises_no_alert() -> Result<()> {
    let h = Harness::new().await?;
    let body = std::fs::read(DELETED)?;
    // Nothing deployed at all ...
    let line = h.deliver_ok(&body, "deleted-1").await?;
    assert!(line.contains("not deployed"), "{line}");
    // ... and another digest deployed (a fresh event id, so it is processed again).
    write_deployed(&h, DIGEST_2).await?;
    let mut other = read_json(DELETED)?;
    other[0]["id"] = json!("e7a1c2d3-0000-4000-8000-000000000002");
    let line = h.deliver_ok(&bytes(&other)?, "deleted-2").await?;
    assert!(line.contains("not deployed"), "{line}");

    assert_eq!(h.bus.stats("alerts").await, QueueStats::default());
    assert!(h.names("runs/").await?.is_empty());
    h.assert_quiet(&[], "deleted, not deployed").await
}

#[tokio::test]
async fn a_transient_store_failure_is_retried_by_the_host_until_it_succeeds() -> Result<()> {
    let h = Harness::new().await?;
    let id = h.push(SHA, "11111111-2222-4333-8444-555555555555").await?;
    let body = std::fs::read(PUSHED)?;

    // The very first write (claiming the digest index) fails.
    h.store.fail_writes(0, 1);
    let (status, reply) = h.deliver(&body, EVENT_ID, 1).await?;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{reply}");
    assert!(log_line(&reply)?.starts_with("transient:"), "{reply}");
    let run = h.run(&id).await?;
    assert_eq!(
        (run.status, run.image.is_none()),
        (RunStatus::AwaitingImage, true)
    );
    assert!(scan_messages(&h).await.is_empty());
    assert!(h.names("index/digests/").await?.is_empty());

    // Next delivery: the digest is indexed, recording the image on the run
    // fails — a crash half-way through the event.
    h.store.fail_writes(1, 1);
    let (status, reply) = h.deliver(&body, EVENT_ID, 2).await?;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{reply}");
    assert_eq!(h.run(&id).await?.status, RunStatus::AwaitingImage);
    assert_eq!(h.names("index/digests/").await?.len(), 1);
    assert!(
        scan_messages(&h).await.is_empty(),
        "scan is queued only after the image is recorded"
    );
    assert!(h.names("dedup/registry/").await?.is_empty(), "not claimed");
    assert!(
        h.names("rejected/").await?.is_empty(),
        "transient is not a rejection"
    );

    // The third delivery goes through and finishes the job exactly once.
    let (status, reply) = h.deliver(&body, EVENT_ID, 3).await?;
    assert_eq!(status, StatusCode::OK, "{reply}");
    let (status, reply) = h.deliver(&body, EVENT_ID, 4).await?;
    assert_eq!(status, StatusCode::OK, "{reply}");
    assert!(log_line(&reply)?.contains("duplicate"), "{reply}");

    let runs = h.runs().await?;
    assert_eq!(runs.len(), 1);
    assert_eq!(runs[0].status, RunStatus::Scanning);
    assert_eq!(
        h.blob(&format!("index/digests/web/{DIGEST}")).await?.trim(),
        id
    );
    let scans = scan_messages(&h).await;
    assert_eq!(scans.len(), 1, "{scans:#?}");
    assert_eq!(scans[0].message_id, format!("{id}:scan:1"));
    h.assert_quiet(&["scan"], "after recovery").await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_deliveries_of_one_registry_event_make_one_run() -> Result<()> {
    let h = Arc::new(Harness::new().await?);
    let body = Arc::new(std::fs::read(PUSHED_CE)?);
    let mut tasks = Vec::new();
    for i in 0..8 {
        let (h, body) = (h.clone(), body.clone());
        tasks.push(tokio::spawn(async move {
            h.deliver(&body, &format!("concurrent-{i}"), 1).await
        }));
    }
    for task in tasks {
        let (status, reply) = task.await??;
        assert_eq!(status, StatusCode::OK, "{reply}");
    }
    let mut rejected = Vec::new();
    for name in h.names("rejected/").await? {
        let record: Value = serde_json::from_str(&h.blob(&name).await?)?;
        rejected.push(record["reason"].to_string());
    }
    assert!(
        rejected.is_empty(),
        "a redelivery was rejected: {rejected:?}"
    );
    let runs = h.runs().await?;
    assert_eq!(runs.len(), 1, "{runs:#?}");
    assert_eq!(runs[0].status, RunStatus::Scanning);
    assert_eq!(scan_messages(&h).await.len(), 1);
    assert_eq!(
        h.audit("run.created").await?.len(),
        1,
        "one creation audited"
    );
    Ok(())
}

#[tokio::test]
async fn a_crash_between_indexing_and_creating_a_registry_run_is_repaired() -> Result<()> {
    let h = Harness::new().await?;
    let body = std::fs::read(PUSHED_CE)?;
    // The digest index is written, then creating the run fails.
    h.store.fail_writes(1, 1);
    let (status, reply) = h.deliver(&body, CE_ID, 1).await?;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{reply}");
    let index = h.blob(&format!("index/digests/api/{CE_DIGEST}")).await?;
    assert!(
        h.runs().await?.is_empty(),
        "the index names a run that does not exist"
    );

    // The redelivery creates that very run instead of giving up on the event.
    let (status, reply) = h.deliver(&body, CE_ID, 2).await?;
    assert_eq!(status, StatusCode::OK, "{reply}");
    assert!(log_line(&reply)?.contains("scan queued"), "{reply}");
    assert!(h.names("rejected/").await?.is_empty(), "not rejected");
    let runs = h.runs().await?;
    assert_eq!(runs.len(), 1);
    assert_eq!(runs[0].id.as_str(), index.trim());
    assert_eq!(runs[0].status, RunStatus::Scanning);
    assert_eq!(runs[0].source.kind, SourceKind::Registry);
    assert_eq!(scan_messages(&h).await.len(), 1);
    h.assert_quiet(&["scan"], "repaired").await
}

#[tokio::test]
async fn an_image_event_after_a_half_recorded_push_repairs_the_run() -> Result<()> {
    let h = Harness::new().await?;
    // The webhook claimed the commit index, then failed before writing the run
    // (GitHub will not redeliver by itself).
    h.store.fail_writes(1, 1);
    let delivery = "11111111-2222-4333-8444-555555555555";
    assert!(
        h.push(SHA, delivery).await.is_err(),
        "the push fails half-way"
    );
    assert!(!h.names("index/commits/web/").await?.is_empty());
    assert!(h.runs().await?.is_empty());

    // The image event repairs the commit's run and hands it to the scan gate.
    let body = std::fs::read(PUSHED)?;
    let (status, reply) = h.deliver(&body, EVENT_ID, 1).await?;
    assert_eq!(status, StatusCode::OK, "{reply}");
    let runs = h.runs().await?;
    assert_eq!(runs.len(), 1, "{runs:#?}");
    assert_eq!(runs[0].source.kind, SourceKind::Github);
    assert_eq!(
        runs[0].source.commit.as_ref().map(|c| c.as_str()),
        Some(SHA)
    );
    assert_eq!(runs[0].source.delivery, None, "only the push knows it");
    assert_eq!(runs[0].status, RunStatus::Scanning);
    assert_eq!(scan_messages(&h).await.len(), 1);
    assert!(h.names("rejected/").await?.is_empty(), "not rejected");

    // An operator redelivers the push: same run, now with the push's facts.
    let id = h.push(SHA, delivery).await?;
    assert_eq!(runs[0].id.as_str(), id);
    let run = h.run(&id).await?;
    assert_eq!(run.source.delivery.as_deref(), Some(delivery));
    assert_eq!(run.source.pusher.as_deref(), Some("monalisa"));
    assert_eq!(run.status, RunStatus::Scanning, "progress is kept");
    assert_eq!(h.runs().await?.len(), 1);
    Ok(())
}

#[tokio::test]
async fn two_tags_of_one_digest_make_one_run_in_either_order() -> Result<()> {
    for commit_tag_first in [true, false] {
        let h = Harness::new().await?;
        let id = h.push(SHA, "11111111-2222-4333-8444-555555555555").await?;
        let by_sha = bytes(&pushed(
            "e0000000-0000-4000-8000-000000000001",
            Some(SHA),
            DIGEST,
        )?)?;
        let latest = bytes(&pushed(
            "e0000000-0000-4000-8000-000000000002",
            Some("latest"),
            DIGEST,
        )?)?;
        let order = if commit_tag_first {
            [&by_sha, &latest]
        } else {
            [&latest, &by_sha]
        };
        for (i, body) in order.into_iter().enumerate() {
            h.deliver_ok(body, &format!("m-{i}")).await?;
        }
        let runs = h.runs().await?;
        let live: Vec<_> = runs
            .iter()
            .filter(|r| r.status != RunStatus::Superseded)
            .collect();
        assert_eq!(
            live.len(),
            1,
            "commit first = {commit_tag_first}: {runs:#?}"
        );
        assert_eq!(live[0].id.as_str(), id, "the commit's run owns the image");
        assert_eq!(live[0].status, RunStatus::Scanning);
        assert_eq!(
            h.blob(&format!("index/digests/web/{DIGEST}")).await?.trim(),
            id
        );
        // The `latest`-first order made a registry run first; it is superseded.
        assert_eq!(runs.len(), if commit_tag_first { 1 } else { 2 });
        let scans: Vec<_> = scan_messages(&h)
            .await
            .into_iter()
            .map(|m| m.message_id)
            .collect();
        assert!(scans.contains(&format!("{id}:scan:1")), "{scans:?}");
    }
    Ok(())
}

#[tokio::test]
async fn one_bad_event_in_an_array_does_not_drop_the_others() -> Result<()> {
    let h = Harness::new().await?;
    let id = h.push(SHA, "11111111-2222-4333-8444-555555555555").await?;
    let good = pushed(EVENT_ID, Some(SHA), DIGEST)?;
    let bad = pushed(
        "bad00000-0000-4000-8000-000000000000",
        Some("v1"),
        "sha256:nope",
    )?;
    let both = json!([bad[0].clone(), good[0].clone()]);
    let line = h.deliver_ok(&bytes(&both)?, "m-1").await?;
    assert!(
        line.contains("rejected") && line.contains("scan queued"),
        "{line}"
    );
    assert_eq!(h.run(&id).await?.status, RunStatus::Scanning);
    assert_eq!(
        h.names("rejected/").await?,
        vec!["rejected/registry-push/bad00000-0000-4000-8000-000000000000.json".to_string()]
    );
    Ok(())
}

#[tokio::test]
async fn deleting_the_rollback_target_raises_one_warning() -> Result<()> {
    let h = Harness::new().await?;
    let previous_run = gantry_pipeline::ids::new_run_id(1_764_237_500_000);
    let deployed = Deployed {
        current: Some(DeployedVersion {
            digest: Digest::parse(DIGEST_2)?,
            run_id: gantry_pipeline::ids::new_run_id(1_764_237_600_000),
            manifest_hash: "cd".repeat(32),
        }),
        previous: Some(DeployedVersion {
            digest: Digest::parse(DIGEST)?,
            run_id: previous_run.clone(),
            manifest_hash: "ab".repeat(32),
        }),
    };
    h.store
        .create("apps/web/deployed.json", &serde_json::to_vec(&deployed)?)
        .await?;
    let line = h.deliver_ok(&std::fs::read(DELETED)?, "deleted-1").await?;
    assert!(line.contains("rollback-target-deleted"), "{line}");
    let alerts = h.bus.peek("alerts").await;
    assert_eq!(alerts.len(), 1, "{alerts:#?}");
    assert_eq!(
        alerts[0].message_id,
        format!("{previous_run}:rollback-target-deleted")
    );
    let alert: Value = serde_json::from_str(&alerts[0].body)?;
    assert_eq!(alert["severity"], "warning");
    assert_eq!(alert["digest"], DIGEST);
    Ok(())
}

#[tokio::test]
async fn an_untagged_manifest_push_starts_no_run() -> Result<()> {
    let h = Harness::new().await?;
    // buildx pushes per-platform manifests without a tag before the tagged index.
    let body = bytes(&pushed(
        "a1a1a1a1-0000-4000-8000-000000000001",
        None,
        DIGEST_2,
    )?)?;
    let line = h.deliver_ok(&body, "untagged-1").await?;
    assert!(line.contains("untagged manifest"), "{line}");
    assert!(h.names("runs/").await?.is_empty());
    assert!(h.names("index/").await?.is_empty());
    assert_eq!(h.bus.stats("scan").await, QueueStats::default());
    Ok(())
}
