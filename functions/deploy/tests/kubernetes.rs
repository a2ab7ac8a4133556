//! `deploy` with `[deploy] target = "kubernetes"`, invoked through the
//! custom-handler envelope, against a fake API server: a `tower-test` mock
//! behind a real `kube::Client`, put into `Services` under
//! [`fn_deploy::CLUSTER_KEY`]. The fake server records every request and
//! answers applies by echoing the object (the Deployment at generation 2),
//! and reads of the Deployment and its pods with what the test set.
//!
//! Scheduled `verify` messages are taken from the embedded queue and
//! delivered by the test (with their MessageId), as the host would deliver
//! them once due.

// Helpers outside `#[test]` functions unwrap too: a panic is a test failure.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use axum::Router;
use gantry_bus::{EmbeddedBus, MessageView, QueueOptions};
use gantry_kube::Cluster;
use gantry_pipeline::runs::blobs;
use gantry_pipeline::{Config, Digest, Run, RunStatus, RunStore, Step, StepRequest, StepStatus};
use gantry_runtime::{Deps, Secrets, Services};
use gantry_store::StateStore;
use gantry_store::fs::FsStore;
use gantry_testkit::fixtures::{self, DIGEST, SHA};
use http::{Request, Response, StatusCode};
use http_body_util::BodyExt;
use kube::client::Body;
use serde_json::{Value, json};
use time::OffsetDateTime;
use tower::ServiceExt;

const DIGEST2: &str = "sha256:1111111111111111111111111111111111111111111111111111111111111111";
const SCAN_SUMMARY: &str = "trivy: 0 critical, 0 high, 3 medium (threshold high)";
const DEPLOYED: &str = "apps/web/deployed.json";
const INTERVAL: i64 = 30;

const EXPECTED_PATHS: [&str; 10] = [
    "/api/v1/namespaces/web",
    "/api/v1/namespaces/web/resourcequotas/web",
    "/api/v1/namespaces/web/limitranges/web",
    "/apis/networking.k8s.io/v1/namespaces/web/networkpolicies/default-deny-egress",
    "/apis/networking.k8s.io/v1/namespaces/web/networkpolicies/default-deny-ingress",
    "/apis/networking.k8s.io/v1/namespaces/web/networkpolicies/web-allow-egress",
    "/apis/networking.k8s.io/v1/namespaces/web/networkpolicies/web-allow-http",
    "/api/v1/namespaces/web/serviceaccounts/web",
    "/apis/apps/v1/namespaces/web/deployments/web",
    "/api/v1/namespaces/web/services/web",
];

/// Objects one apply sends (the default app).
const APPLIED: usize = EXPECTED_PATHS.len();

const SPC_PATH: &str =
    "/apis/secrets-store.csi.x-k8s.io/v1/namespaces/web/secretproviderclasses/web";
const INGRESS_PATH: &str = "/apis/networking.k8s.io/v1/namespaces/web/ingresses/web";

/// What the deploy reads after the apply for the default app, which renders
/// neither of the optional kinds: whether gantry left one behind.
const PRUNE_READS: [&str; 2] = [SPC_PATH, INGRESS_PATH];

/// Requests one deploy (or rollback) of the default app sends: the applies,
/// then the reads of [`PRUNE_READS`] (both absent).
const REQUESTS: usize = APPLIED + PRUNE_READS.len();

/// Position of the Deployment among them.
const DEPLOYMENT_AT: usize = 8;

/// One request as the fake API server saw it.
#[derive(Debug, Clone)]
struct Seen {
    method: String,
    path: String,
    query: String,
    content_type: String,
    body: Value,
}

/// What the fake API server has seen and answers reads with.
#[derive(Default)]
struct Api {
    seen: Vec<Seen>,
    deployment: Value,
    pods: Value,
    /// Other objects the cluster holds, by path: GET answers them, DELETE
    /// removes them.
    live: BTreeMap<String, Value>,
}

async fn serve(
    mut handle: tower_test::mock::Handle<Request<Body>, Response<Body>>,
    api: Arc<Mutex<Api>>,
) {
    while let Some((request, respond)) = handle.next_request().await {
        let (parts, body) = request.into_parts();
        let bytes = body.collect().await.unwrap().to_bytes();
        let seen = Seen {
            method: parts.method.to_string(),
            path: parts.uri.path().to_string(),
            query: parts.uri.query().unwrap_or("").to_string(),
            content_type: parts
                .headers
                .get(http::header::CONTENT_TYPE)
                .map(|v| v.to_str().unwrap().to_string())
                .unwrap_or_default(),
            body: if bytes.is_empty() {
                Value::Null
            } else {
                serde_json::from_slice(&bytes).unwrap()
            },
        };
        let (status, reply) = {
            let mut api = api.lock().unwrap();
            api.seen.push(seen.clone());
            match (seen.method.as_str(), seen.path.as_str()) {
                ("PATCH", _) => {
                    let mut object = seen.body.clone();
                    let generation = if object["kind"] == "Deployment" { 2 } else { 1 };
                    object["metadata"]["generation"] = json!(generation);
                    object["metadata"]["resourceVersion"] = json!("100");
                    (200, object)
                }
                ("GET", "/apis/apps/v1/namespaces/web/deployments/web") => {
                    (200, api.deployment.clone())
                }
                ("GET", "/api/v1/namespaces/web/pods") => (
                    200,
                    json!({"apiVersion": "v1", "kind": "PodList", "metadata": {}, "items": api.pods}),
                ),
                // A Status stored as the object is the API server's refusal.
                ("GET", path) if api.live.contains_key(path) => {
                    let object = api.live[path].clone();
                    match object["kind"].as_str() {
                        Some("Status") => (object["code"].as_u64().unwrap_or(500) as u16, object),
                        _ => (200, object),
                    }
                }
                ("DELETE", path) if api.live.contains_key(path) => {
                    api.live.remove(path);
                    (
                        200,
                        json!({"kind": "Status", "apiVersion": "v1", "metadata": {},
                               "status": "Success", "code": 200}),
                    )
                }
                _ => (
                    404,
                    json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                           "message": "not found", "reason": "NotFound", "code": 404}),
                ),
            }
        };
        respond.send_response(
            Response::builder()
                .status(status)
                .header("content-type", "application/json")
                .body(Body::from(serde_json::to_vec(&reply).unwrap()))
                .unwrap(),
        );
    }
}

/// The Deployment as the API server reports it: generation 2 (the apply),
/// observed `observed`, `updated`/`available` of 2 replicas, `conditions`.
fn deployment(observed: i64, updated: i64, available: i64, conditions: Value) -> Value {
    json!({
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "web", "namespace": "web", "generation": 2},
        "spec": {
            "replicas": 2,
            "selector": {"matchLabels": {"app.kubernetes.io/name": "web"}},
            "template": {
                "metadata": {"labels": {"app.kubernetes.io/name": "web"}},
                "spec": {"containers": [{"name": "web", "image": format!("contoso.azurecr.io/web@{DIGEST}")}]}
            }
        },
        "status": {
            "observedGeneration": observed,
            "replicas": updated.max(2),
            "updatedReplicas": updated,
            "readyReplicas": available,
            "availableReplicas": available,
            "conditions": conditions,
        }
    })
}

struct Harness {
    _dir: tempfile::TempDir,
    store: Arc<FsStore>,
    bus: EmbeddedBus,
    runs: RunStore,
    config: Arc<Config>,
    router: Router,
    api: Arc<Mutex<Api>>,
}

impl Harness {
    async fn new() -> Result<Harness> {
        Harness::with_app("").await
    }

    /// A harness whose app `web` also has the `gantry.toml` lines `extra`.
    async fn with_app(extra: &str) -> Result<Harness> {
        let dir = tempfile::tempdir()?;
        let store = Arc::new(FsStore::open(dir.path().join("store"))?);
        let bus = EmbeddedBus::open(dir.path().join("bus"), QueueOptions::default()).await?;
        let runs = RunStore::new(store.clone());
        let text = format!(
            "[[apps]]\nname = \"web\"\nrepo = \"contoso/web\"\nimage = \"contoso.azurecr.io/web\"\nreplicas = 2\n{extra}\n[deploy]\ntarget = \"kubernetes\"\nverify_interval = \"{INTERVAL}s\"\n"
        );
        let config = Arc::new(Config::parse(&text, "test.toml")?);
        ensure!(config.deploy.verify_deadline == Duration::from_secs(600));

        let api = Arc::new(Mutex::new(Api::default()));
        let (service, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
        tokio::spawn(serve(handle, api.clone()));
        let services = Services::default();
        services.insert(
            fn_deploy::CLUSTER_KEY,
            Arc::new(Cluster::new(kube::Client::new(service, "default"))),
        );
        let deps = Deps {
            runs: runs.clone(),
            bus: Arc::new(bus.clone()),
            config: config.clone(),
            secrets: Secrets::default(),
            services,
        };
        let router = gantry_runtime::app(Arc::new(deps), &[fn_deploy::function()]);
        Ok(Harness {
            _dir: dir,
            store,
            bus,
            runs,
            config,
            router,
            api,
        })
    }

    fn render(&self, run: &Run) -> Result<gantry_manifests::Rendered> {
        let image = run.image.as_ref().context("image")?;
        Ok(gantry_manifests::render(&gantry_manifests::RenderInput {
            app: self.config.app("web").context("app")?,
            digest: &image.digest,
            registry_image: "contoso.azurecr.io/web",
            run_id: Some(&run.id),
            commit: run.source.commit.as_ref(),
            verdicts: Some(SCAN_SUMMARY),
        })?)
    }

    /// A run of `web` for `digest`, created `age` ago, waiting for the
    /// deploy step as policy-enforce leaves it; stored.
    async fn recorded(&self, digest: &str, age: Duration) -> Result<Run> {
        let source = fixtures::github_source("web", SHA)?;
        let created = OffsetDateTime::now_utc() - age;
        let run = fixtures::run_at("web", RunStatus::Deploying, source, created)?;
        let mut run = fixtures::with_image(run, digest)?;
        let hash = self.render(&run)?.hash;
        fixtures::gates_passed(&mut run, SCAN_SUMMARY, &hash);
        run.steps.insert("deploy".into(), Step::pending(1));
        ensure!(self.runs.create(&run).await?, "run {} existed", run.id);
        Ok(run)
    }

    /// Delivers one message on `deploy` (session `web`); status and log line.
    async fn deliver(&self, body: &[u8], message_id: &str) -> Result<(StatusCode, String)> {
        let envelope = gantry_runtime::envelope::host_request_for_message(
            "message",
            false,
            body,
            message_id,
            1,
            Some("web"),
            "2026-11-27T10:04:12.1234567Z",
            &BTreeMap::new(),
        );
        let request = Request::post("/deploy")
            .header("content-type", "application/json")
            .body(axum::body::Body::from(serde_json::to_vec(&envelope)?))?;
        let response = self.router.clone().oneshot(request).await?;
        let status = response.status();
        let bytes = response.into_body().collect().await?.to_bytes();
        let reply: Value = serde_json::from_slice(&bytes)?;
        let line = reply["Logs"][0].as_str().context("log line")?.to_string();
        Ok((status, line))
    }

    /// Delivers the `deploy` message policy-enforce sends for `run`.
    async fn deploy(&self, run: &Run) -> Result<String> {
        let request = StepRequest {
            app: run.app.clone(),
            run_id: run.id.clone(),
            digest: run.image.as_ref().context("image")?.digest.clone(),
            attempt: 1,
            phase: None,
        };
        let (status, line) = self
            .deliver(
                &serde_json::to_vec(&request)?,
                &request.message_id("deploy"),
            )
            .await?;
        ensure!(status == StatusCode::OK, "{status}: {line}");
        Ok(line)
    }

    /// The message on `deploy` with MessageId `id`.
    async fn queued(&self, id: &str) -> Result<MessageView> {
        self.bus
            .peek("deploy")
            .await
            .into_iter()
            .find(|m| m.message_id == id)
            .with_context(|| format!("no message {id} on deploy"))
    }

    /// Delivers the scheduled verify message with MessageId `id`.
    async fn verify(&self, id: &str) -> Result<String> {
        let message = self.queued(id).await?;
        let (status, line) = self.deliver(message.body.as_bytes(), id).await?;
        ensure!(status == StatusCode::OK, "{status}: {line}");
        Ok(line)
    }

    async fn run(&self, run: &Run) -> Result<Run> {
        self.runs.get(&run.app, &run.id).await?.context("run gone")
    }

    async fn blob(&self, name: &str) -> Result<Option<Value>> {
        match self.store.get(name).await? {
            Some(v) => Ok(Some(serde_json::from_slice(&v.body)?)),
            None => Ok(None),
        }
    }

    fn seen(&self) -> Vec<Seen> {
        self.api.lock().unwrap().seen.clone()
    }

    fn set(&self, deployment: Value, pods: Value) {
        let mut api = self.api.lock().unwrap();
        api.deployment = deployment;
        api.pods = pods;
    }

    async fn alerts(&self) -> Vec<MessageView> {
        self.bus.peek("alerts").await
    }
}

/// `seen` starts with the applies of `objects`, then the prune reads.
fn assert_applied(seen: &[Seen], objects: &[Value]) {
    let paths: Vec<&str> = seen[..REQUESTS].iter().map(|s| s.path.as_str()).collect();
    let mut expected = EXPECTED_PATHS.to_vec();
    expected.extend(PRUNE_READS);
    assert_eq!(paths, expected);
    for read in &seen[APPLIED..REQUESTS] {
        assert_eq!(read.method, "GET", "{}", read.path);
    }
    for (request, object) in seen.iter().zip(objects) {
        assert_eq!(request.method, "PATCH", "{}", request.path);
        let query: Vec<&str> = request.query.split('&').collect();
        assert!(query.contains(&"fieldManager=gantry"), "{}", request.query);
        assert!(query.contains(&"force=true"), "{}", request.query);
        assert_eq!(request.content_type, "application/apply-patch+yaml");
        assert_eq!(&request.body, object, "{}", request.path);
    }
}

fn verify_id(run: &Run, n: u32) -> String {
    format!("{}:verify:1:{n}", run.id)
}

#[tokio::test]
async fn applies_in_order_and_schedules_one_verify() -> Result<()> {
    let h = Harness::new().await?;
    let run = h.recorded(DIGEST, Duration::ZERO).await?;
    let before = OffsetDateTime::now_utc();
    h.deploy(&run).await?;
    let after = OffsetDateTime::now_utc();

    assert_applied(&h.seen(), &h.render(&run)?.objects);
    let stored = h.run(&run).await?;
    assert_eq!(stored.status, RunStatus::Verifying);
    let deploy = &stored.steps["deploy"];
    assert_eq!(deploy.status, StepStatus::Passed);
    assert_eq!(deploy.details["target"], "kubernetes");
    assert_eq!(deploy.details["generation"], 2);
    assert_eq!(deploy.details["applied"].as_array().unwrap().len(), APPLIED);
    assert_eq!(deploy.details["manifest_hash"], h.render(&run)?.hash);
    assert_eq!(
        deploy.details["removed"],
        json!([]),
        "nothing was left behind"
    );
    assert_eq!(stored.steps["verify"].status, StepStatus::Pending);

    let queued = h.bus.peek("deploy").await;
    assert_eq!(queued.len(), 1, "{queued:#?}");
    let message = &queued[0];
    assert_eq!(message.message_id, verify_id(&run, 1));
    assert_eq!(message.session_id.as_deref(), Some("web"));
    let at = message.scheduled_enqueue_time.context("scheduled")?;
    let interval = time::Duration::seconds(INTERVAL);
    assert!(
        at >= before + interval - time::Duration::seconds(1)
            && at <= after + interval + time::Duration::seconds(1),
        "{at}"
    );
    let body: Value = serde_json::from_str(&message.body)?;
    assert_eq!(body["phase"], "verify");
    assert_eq!(body["attempt"], 1);
    assert!(h.alerts().await.is_empty());
    assert!(
        h.blob(DEPLOYED).await?.is_none(),
        "recorded only once verified"
    );

    // A redelivered deploy message applies nothing again and queues no
    // second check.
    h.deploy(&run).await?;
    assert_eq!(h.seen().len(), REQUESTS);
    assert_eq!(h.bus.peek("deploy").await.len(), 1);
    Ok(())
}

#[tokio::test]
async fn complete_rollout_is_deployed() -> Result<()> {
    let h = Harness::new().await?;
    let run = h.recorded(DIGEST, Duration::ZERO).await?;
    h.deploy(&run).await?;
    h.set(deployment(2, 2, 2, json!([])), json!([]));
    let line = h.verify(&verify_id(&run, 1)).await?;
    assert!(line.contains("deployed"), "{line}");

    let stored = h.run(&run).await?;
    assert_eq!(stored.status, RunStatus::Deployed);
    assert_eq!(stored.steps["verify"].status, StepStatus::Passed);
    let deployed = h.blob(DEPLOYED).await?.context("deployed.json")?;
    assert_eq!(deployed["current"]["digest"], DIGEST);
    assert_eq!(deployed["current"]["run_id"], run.id.to_string());
    assert_eq!(deployed["current"]["manifest_hash"], h.render(&run)?.hash);
    let alerts = h.alerts().await;
    assert_eq!(alerts.len(), 1, "{alerts:#?}");
    assert_eq!(alerts[0].message_id, format!("{}:alert:deployed", run.id));
    let alert: Value = serde_json::from_str(&alerts[0].body)?;
    assert_eq!(alert["severity"], "info");
    let reads: Vec<String> = h.seen()[REQUESTS..]
        .iter()
        .map(|s| s.path.clone())
        .collect();
    assert_eq!(
        reads,
        [
            "/apis/apps/v1/namespaces/web/deployments/web",
            "/api/v1/namespaces/web/pods"
        ]
    );

    // Redelivered: nothing more is read or written; the alert repeats with
    // the same MessageId (dropped as a duplicate).
    h.verify(&verify_id(&run, 1)).await?;
    assert_eq!(h.seen().len(), REQUESTS + 2);
    assert_eq!(h.alerts().await.len(), 1);
    Ok(())
}

#[tokio::test]
async fn progress_deadline_exceeded_rolls_back_to_the_previous_good_version() -> Result<()> {
    let h = Harness::new().await?;
    // The previous good version, deployed and recorded a minute ago.
    let previous = h.recorded(DIGEST2, Duration::from_secs(60)).await?;
    let previous_objects = h.render(&previous)?;
    h.runs
        .update(&previous.app, &previous.id, |r| {
            r.status = RunStatus::Deployed;
            Ok(true)
        })
        .await?;
    let record = json!({"current": {
        "digest": DIGEST2, "run_id": previous.id, "manifest_hash": previous_objects.hash,
    }});
    h.store
        .create(DEPLOYED, &serde_json::to_vec(&record)?)
        .await?;

    let run = h.recorded(DIGEST, Duration::ZERO).await?;
    h.deploy(&run).await?;
    h.set(
        deployment(
            2,
            1,
            0,
            json!([{"type": "Progressing", "status": "False", "reason": "ProgressDeadlineExceeded",
                    "message": "ReplicaSet \"web-7d9\" has timed out progressing."}]),
        ),
        json!([]),
    );
    let line = h.verify(&verify_id(&run, 1)).await?;
    assert!(line.contains("rolled back"), "{line}");

    let seen = h.seen();
    assert_eq!(seen.len(), REQUESTS + 2 + REQUESTS, "{seen:#?}");
    assert_applied(&seen[REQUESTS + 2..], &previous_objects.objects);
    let image = seen[REQUESTS + 2 + DEPLOYMENT_AT]
        .body
        .pointer("/spec/template/spec/containers/0/image");
    assert_eq!(
        image.and_then(Value::as_str),
        Some(format!("contoso.azurecr.io/web@{DIGEST2}").as_str())
    );

    let stored = h.run(&run).await?;
    assert_eq!(stored.status, RunStatus::RolledBack);
    let verify = &stored.steps["verify"];
    assert_eq!(verify.status, StepStatus::Failed);
    assert!(
        verify
            .summary
            .as_deref()
            .unwrap()
            .contains("ProgressDeadlineExceeded"),
        "{verify:?}"
    );
    assert_eq!(verify.details["rolled_back_to"]["digest"], DIGEST2);
    let blocked = blobs::blocked(&run.app, &Digest::parse(DIGEST)?);
    assert!(
        h.blob(&blocked).await?.is_some(),
        "the failed digest is blocked"
    );
    assert_eq!(
        h.blob(DEPLOYED).await?,
        Some(record),
        "the previous version is still what runs"
    );
    let alerts = h.alerts().await;
    assert_eq!(alerts.len(), 1, "{alerts:#?}");
    assert_eq!(
        alerts[0].message_id,
        format!("{}:alert:rolled-back", run.id)
    );
    let alert: Value = serde_json::from_str(&alerts[0].body)?;
    assert_eq!(alert["severity"], "high");
    assert_eq!(alert["digest"], DIGEST);
    Ok(())
}

#[tokio::test]
async fn crash_loop_without_a_previous_version_fails() -> Result<()> {
    let h = Harness::new().await?;
    let run = h.recorded(DIGEST, Duration::ZERO).await?;
    h.deploy(&run).await?;
    let image = format!("contoso.azurecr.io/web@{DIGEST}");
    h.set(
        deployment(2, 2, 0, json!([])),
        json!([{
            "metadata": {"name": "web-5d9c7b8f4-x2k9p", "namespace": "web"},
            "spec": {"containers": [{"name": "web", "image": image}]},
            "status": {"containerStatuses": [{
                "name": "web", "image": image, "imageID": "", "ready": false, "restartCount": 4,
                "state": {"waiting": {"reason": "CrashLoopBackOff", "message": "back-off 1m20s"}}
            }]}
        }]),
    );
    h.verify(&verify_id(&run, 1)).await?;

    assert_eq!(h.seen().len(), REQUESTS + 2, "no rollback applied");
    let stored = h.run(&run).await?;
    assert_eq!(stored.status, RunStatus::Failed);
    let verify = &stored.steps["verify"];
    assert_eq!(verify.status, StepStatus::Failed);
    let summary = verify.summary.as_deref().unwrap();
    assert!(
        summary.contains("CrashLoopBackOff") && summary.contains("no previous good version"),
        "{summary}"
    );
    let blocked = blobs::blocked(&run.app, &Digest::parse(DIGEST)?);
    assert!(h.blob(&blocked).await?.is_some());
    assert!(h.blob(DEPLOYED).await?.is_none());
    let alerts = h.alerts().await;
    assert_eq!(alerts.len(), 1, "{alerts:#?}");
    assert_eq!(
        alerts[0].message_id,
        format!("{}:alert:verify-failed", run.id)
    );
    let alert: Value = serde_json::from_str(&alerts[0].body)?;
    assert_eq!(alert["severity"], "high");
    Ok(())
}

#[tokio::test]
async fn progressing_rollout_is_checked_again_until_the_deadline() -> Result<()> {
    let h = Harness::new().await?;
    let run = h.recorded(DIGEST, Duration::ZERO).await?;
    h.deploy(&run).await?;
    // The controller has not observed the applied generation yet.
    h.set(deployment(1, 2, 2, json!([])), json!([]));
    let before = OffsetDateTime::now_utc();
    h.verify(&verify_id(&run, 1)).await?;
    let after = OffsetDateTime::now_utc();

    let next = h.queued(&verify_id(&run, 2)).await?;
    assert_eq!(next.session_id.as_deref(), Some("web"));
    let at = next.scheduled_enqueue_time.context("scheduled")?;
    let interval = time::Duration::seconds(INTERVAL);
    assert!(
        at >= before + interval - time::Duration::seconds(1)
            && at <= after + interval + time::Duration::seconds(1),
        "{at}"
    );
    let stored = h.run(&run).await?;
    assert_eq!(stored.status, RunStatus::Verifying);
    assert_eq!(stored.steps["verify"].details["checks"], 2);
    assert!(h.alerts().await.is_empty());

    // Check 1 delivered again is stale: nothing read, nothing queued.
    let line = h.verify(&verify_id(&run, 1)).await?;
    assert!(line.contains("stale"), "{line}");
    assert_eq!(h.seen().len(), REQUESTS + 2);
    assert_eq!(h.bus.peek("deploy").await.len(), 2);

    // Past the deadline (10m from the apply) a still-progressing rollout
    // fails; without a previous version the run is failed.
    h.runs
        .update(&run.app, &run.id, |r| {
            let s = r.steps.get_mut("verify").unwrap();
            s.started_at = Some(OffsetDateTime::now_utc() - time::Duration::minutes(11));
            Ok(true)
        })
        .await?;
    h.verify(&verify_id(&run, 2)).await?;
    let stored = h.run(&run).await?;
    assert_eq!(stored.status, RunStatus::Failed);
    let summary = stored.steps["verify"].summary.clone().unwrap();
    assert!(
        summary.contains("did not complete within 600s"),
        "{summary}"
    );
    assert_eq!(h.bus.peek("deploy").await.len(), 2, "no third check");
    Ok(())
}

#[tokio::test]
async fn a_newer_apply_supersedes_the_older_rollout_check() -> Result<()> {
    let h = Harness::new().await?;
    let older = h.recorded(DIGEST2, Duration::from_secs(60)).await?;
    h.deploy(&older).await?;
    let newer = h.recorded(DIGEST, Duration::ZERO).await?;
    h.deploy(&newer).await?;
    assert_eq!(h.seen().len(), 2 * REQUESTS);
    h.set(deployment(2, 2, 2, json!([])), json!([]));

    let line = h.verify(&verify_id(&older, 1)).await?;
    assert!(line.contains("superseded"), "{line}");
    assert_eq!(
        h.seen().len(),
        2 * REQUESTS,
        "nothing read for the older run"
    );
    let stored = h.run(&older).await?;
    assert_eq!(stored.status, RunStatus::Superseded);
    assert_eq!(stored.steps["verify"].status, StepStatus::Skipped);
    assert!(h.blob(DEPLOYED).await?.is_none());
    assert!(h.alerts().await.is_empty());

    h.verify(&verify_id(&newer, 1)).await?;
    assert_eq!(h.run(&newer).await?.status, RunStatus::Deployed);
    let deployed = h.blob(DEPLOYED).await?.context("deployed.json")?;
    assert_eq!(deployed["current"]["digest"], DIGEST);
    Ok(())
}

#[tokio::test]
async fn a_rollback_run_applies_the_earlier_manifests_and_is_not_rolled_back_again() -> Result<()> {
    let h = Harness::new().await?;
    // DIGEST2 was good, then DIGEST replaced it.
    let good = h.recorded(DIGEST2, Duration::from_secs(120)).await?;
    let good_objects = h.render(&good)?;
    let bad = h.recorded(DIGEST, Duration::from_secs(60)).await?;
    for r in [&good, &bad] {
        h.runs
            .update(&r.app, &r.id, |r| {
                r.status = RunStatus::Deployed;
                Ok(true)
            })
            .await?;
    }
    let record = json!({
        "current": {"digest": DIGEST, "run_id": bad.id, "manifest_hash": h.render(&bad)?.hash},
        "previous": {"digest": DIGEST2, "run_id": good.id, "manifest_hash": good_objects.hash},
    });
    h.store
        .create(DEPLOYED, &serde_json::to_vec(&record)?)
        .await?;

    // An operator asks; the rollback run's deploy message is what the host
    // delivers next.
    let deps = Deps {
        runs: h.runs.clone(),
        bus: Arc::new(h.bus.clone()),
        config: h.config.clone(),
        secrets: Secrets::default(),
        services: Services::default(),
    };
    let rollback = gantry_runtime::rollback::start(
        &deps,
        gantry_runtime::rollback::RollbackRequest {
            app: &good.app,
            digest: None,
            requested_by: "alice",
            reason: Some("errors since the release"),
        },
    )
    .await?;
    let message = h.queued(&format!("{}:deploy:1", rollback.id)).await?;
    let (status, line) = h
        .deliver(message.body.as_bytes(), &message.message_id)
        .await?;
    assert_eq!(status, StatusCode::OK, "{line}");

    // Exactly the good run's manifests: its image, and its provenance (run id
    // annotation), so the hash is the one its policy gate checked.
    assert_applied(&h.seen(), &good_objects.objects);
    let stored = h.run(&rollback).await?;
    assert_eq!(stored.status, RunStatus::Verifying, "{stored:#?}");
    assert_eq!(
        stored.steps["deploy"].details["manifest_hash"],
        good_objects.hash
    );

    // Its rollout fails too: blocked and failed, and the cluster is left for
    // a person (no re-apply of the version it rolled back from).
    h.set(
        deployment(
            2,
            1,
            0,
            json!([{"type": "Progressing", "status": "False", "reason": "ProgressDeadlineExceeded"}]),
        ),
        json!([]),
    );
    h.verify(&verify_id(&rollback, 1)).await?;
    assert_eq!(
        h.seen().len(),
        REQUESTS + 2,
        "nothing applied after the checks"
    );
    let stored = h.run(&rollback).await?;
    assert_eq!(stored.status, RunStatus::Failed);
    let summary = stored.steps["verify"].summary.clone().unwrap_or_default();
    assert!(
        summary.contains("not rolled back automatically"),
        "{summary}"
    );
    assert_eq!(h.blob(DEPLOYED).await?, Some(record), "unchanged");
    Ok(())
}

/// An app with Key Vault secrets and an Ingress: the deploy step applies the
/// SecretProviderClass before the ServiceAccount and Deployment, and the
/// Ingress last, each at its API path, exactly as rendered.
#[tokio::test]
async fn key_vault_and_ingress_kinds_are_applied_at_their_api_paths() -> Result<()> {
    let h = Harness::with_app(
        "[apps.expose]\nmode = \"ingress\"\nclass = \"azure-alb-external\"\nhost = \"web.contoso.com\"\nsource_ranges = [\"10.0.4.0/24\"]\n\
         [apps.keyvault]\nvault_name = \"kv-contoso\"\ntenant_id = \"7d3f2a51-9c4e-4b8a-a1f6-2e5c8b9d0f13\"\nclient_id = \"0b1c2d3e-4f50-4617-8293-a4b5c6d7e8f9\"\n\
         [[apps.keyvault.secrets]]\nname = \"db-connection\"\nenv = \"DATABASE_URL\"\n",
    )
    .await?;
    let run = h.recorded(DIGEST, Duration::ZERO).await?;
    h.deploy(&run).await?;

    let seen = h.seen();
    let paths: Vec<&str> = seen.iter().map(|s| s.path.as_str()).collect();
    let spc = "/apis/secrets-store.csi.x-k8s.io/v1/namespaces/web/secretproviderclasses/web";
    let ingress = "/apis/networking.k8s.io/v1/namespaces/web/ingresses/web";
    let mut expected: Vec<&str> = EXPECTED_PATHS.to_vec();
    expected.insert(7, spc);
    expected.push(ingress);
    assert_eq!(paths, expected);
    let objects = h.render(&run)?.objects;
    for (request, object) in seen.iter().zip(&objects) {
        assert_eq!(request.method, "PATCH", "{}", request.path);
        assert!(
            request.query.contains("fieldManager=gantry"),
            "{}",
            request.query
        );
        assert_eq!(request.content_type, "application/apply-patch+yaml");
        assert_eq!(&request.body, object, "{}", request.path);
    }
    let body = |path: &str| &seen.iter().find(|s| s.path == path).unwrap().body;
    assert_eq!(body(spc)["kind"], "SecretProviderClass");
    assert_eq!(
        body(spc)["spec"]["parameters"]["keyvaultName"],
        "kv-contoso"
    );
    assert_eq!(
        body(ingress)["spec"]["ingressClassName"],
        "azure-alb-external"
    );
    // No Secret is ever sent.
    assert!(seen.iter().all(|s| !s.path.contains("/secrets/")));

    let stored = h.run(&run).await?;
    assert_eq!(stored.status, RunStatus::Verifying, "{stored:#?}");
    let applied = stored.steps["deploy"].details["applied"].clone();
    assert_eq!(applied.as_array().unwrap().len(), APPLIED + 2, "{applied}");
    Ok(())
}

/// The app switched from `ingress` to `cluster`: the deploy no longer renders
/// its Ingress, so the one gantry applied earlier is deleted after the apply
/// (with its uid as precondition) and recorded; a SecretProviderClass of
/// the same name that gantry did not create is left alone.
#[tokio::test]
async fn a_leftover_gantry_ingress_is_deleted_after_the_apply() -> Result<()> {
    let h = Harness::with_app("[apps.expose]\nmode = \"cluster\"\n").await?;
    let uid = "3c0ffee0-0000-4000-8000-000000000042";
    {
        let mut api = h.api.lock().unwrap();
        api.live.insert(
            INGRESS_PATH.into(),
            json!({"apiVersion": "networking.k8s.io/v1", "kind": "Ingress",
                   "metadata": {"name": "web", "namespace": "web", "uid": uid,
                                "labels": {"app.kubernetes.io/name": "web",
                                           "app.kubernetes.io/managed-by": "gantry"}},
                   "spec": {"ingressClassName": "azure-alb-external"}}),
        );
        api.live.insert(
            SPC_PATH.into(),
            json!({"apiVersion": "secrets-store.csi.x-k8s.io/v1", "kind": "SecretProviderClass",
                   "metadata": {"name": "web", "namespace": "web", "uid": "other",
                                "labels": {"app.kubernetes.io/managed-by": "Helm"}},
                   "spec": {"provider": "azure"}}),
        );
    }
    let run = h.recorded(DIGEST, Duration::ZERO).await?;
    let line = h.deploy(&run).await?;
    assert!(line.contains("removed Ingress web"), "{line}");

    let seen = h.seen();
    let calls: Vec<(&str, &str)> = seen[APPLIED..]
        .iter()
        .map(|s| (s.method.as_str(), s.path.as_str()))
        .collect();
    assert_eq!(
        calls,
        [
            ("GET", SPC_PATH),
            ("GET", INGRESS_PATH),
            ("DELETE", INGRESS_PATH)
        ]
    );
    assert!(seen[..APPLIED].iter().all(|s| s.method == "PATCH"));
    assert_eq!(seen[APPLIED + 2].body["preconditions"]["uid"], uid);
    {
        let api = h.api.lock().unwrap();
        assert!(!api.live.contains_key(INGRESS_PATH), "the Ingress is gone");
        assert!(api.live.contains_key(SPC_PATH), "not gantry's: kept");
    }

    let stored = h.run(&run).await?;
    assert_eq!(stored.status, RunStatus::Verifying);
    let deploy = &stored.steps["deploy"];
    assert_eq!(deploy.status, StepStatus::Passed);
    assert_eq!(
        deploy.details["removed"],
        json!([{"kind": "Ingress", "name": "web"}])
    );
    let summary = deploy.summary.as_deref().unwrap_or_default();
    assert!(summary.contains("removed Ingress web"), "{summary}");
    Ok(())
}

/// Checking for a leftover fails for good (400): the deploy step fails like an
/// apply failure, after the apply.
#[tokio::test]
async fn a_permanent_prune_failure_fails_the_deploy_step() -> Result<()> {
    let h = Harness::new().await?;
    h.api.lock().unwrap().live.insert(
        SPC_PATH.into(),
        json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
               "message": "bad request", "reason": "BadRequest", "code": 400}),
    );
    let run = h.recorded(DIGEST, Duration::ZERO).await?;
    let line = h.deploy(&run).await?;
    assert!(line.contains("failed"), "{line}");
    let stored = h.run(&run).await?;
    assert_eq!(stored.status, RunStatus::Failed, "{stored:#?}");
    let summary = stored.steps["deploy"].summary.clone().unwrap_or_default();
    assert!(
        summary.contains("removing objects no longer rendered"),
        "{summary}"
    );
    Ok(())
}
