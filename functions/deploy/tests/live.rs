//! The deploy function against a real cluster, ignored by default: a run of
//! a test app goes through `deploy` and its `verify` messages (delivered at
//! once instead of when scheduled) to `deployed`, through the same envelope
//! the Functions host sends. Then the app's namespace is deleted.
//!
//! Needs the cluster in `KUBECONFIG` (or `~/.kube/config`) and an image that
//! runs as UID 10001 with a read-only root filesystem and answers
//! `GET /healthz` on port 8080: `GANTRY_KUBE_TEST_IMAGE` (registry/repository)
//! and `GANTRY_KUBE_TEST_DIGEST`.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use gantry_bus::{EmbeddedBus, QueueOptions};
use gantry_pipeline::{Config, Digest, Image, RunStatus, RunStore, Step, StepRequest, StepStatus};
use gantry_runtime::{Deps, Secrets, Services};
use gantry_store::fs::FsStore;
use gantry_testkit::fixtures;
use http::{Request, StatusCode};
use http_body_util::BodyExt;
use serde_json::{Value, json};
use time::OffsetDateTime;
use tower::ServiceExt;

#[tokio::test]
#[ignore = "needs cluster"]
async fn live_deploy_function_deploys_and_verifies() -> Result<()> {
    let image = std::env::var("GANTRY_KUBE_TEST_IMAGE").context("GANTRY_KUBE_TEST_IMAGE")?;
    let digest = std::env::var("GANTRY_KUBE_TEST_DIGEST").context("GANTRY_KUBE_TEST_DIGEST")?;
    let (registry, repository) = image.split_once('/').context("registry/repository")?;
    let text = format!(
        "[[apps]]\nname = \"gantry-live-deploy\"\nrepo = \"contoso/gantry-live-deploy\"\nimage = \"{image}\"\nport = 8080\nreplicas = 1\nhealth_path = \"/healthz\"\n\n[deploy]\ntarget = \"kubernetes\"\nverify_interval = \"3s\"\nverify_deadline = \"5m\"\n"
    );
    let config = Arc::new(Config::parse(&text, "live.toml")?);
    let app = config.app("gantry-live-deploy").context("app")?;
    let dir = tempfile::tempdir()?;
    let store = Arc::new(FsStore::open(dir.path().join("store"))?);
    let bus = EmbeddedBus::open(dir.path().join("bus"), QueueOptions::default()).await?;
    let runs = RunStore::new(store);
    let deps = Deps {
        runs: runs.clone(),
        bus: Arc::new(bus.clone()),
        config: config.clone(),
        secrets: Secrets::default(),
        services: Services::default(),
    };
    let router = gantry_runtime::app(Arc::new(deps), &[fn_deploy::function()]);

    // A run as policy-enforce leaves it.
    let source = fixtures::registry_source();
    let now = OffsetDateTime::now_utc();
    let mut run = fixtures::run_at("gantry-live-deploy", RunStatus::Deploying, source, now)?;
    run.image = Some(Image {
        registry: registry.into(),
        repository: repository.into(),
        tag: None,
        digest: Digest::parse(&digest)?,
    });
    fixtures::passed(&mut run, "scan", "live test", Value::Null);
    let hash = gantry_manifests::render_run(app, &run)?.hash;
    fixtures::passed(
        &mut run,
        "policy",
        "live test",
        json!({"manifest_hash": hash}),
    );
    run.steps.insert("deploy".into(), Step::pending(1));
    ensure!(runs.create(&run).await?, "run existed");

    let deliver = |body: Vec<u8>, message_id: String| {
        let router = router.clone();
        async move {
            let envelope = gantry_runtime::envelope::host_request_for_message(
                "message",
                false,
                &body,
                &message_id,
                1,
                Some("gantry-live-deploy"),
                "2026-11-27T10:04:12.1234567Z",
                &BTreeMap::new(),
            );
            let request = Request::post("/deploy")
                .header("content-type", "application/json")
                .body(axum::body::Body::from(serde_json::to_vec(&envelope)?))?;
            let response = router.oneshot(request).await?;
            let status = response.status();
            let reply: Value =
                serde_json::from_slice(&response.into_body().collect().await?.to_bytes())?;
            ensure!(status == StatusCode::OK, "{status}: {reply}");
            Ok::<_, anyhow::Error>(())
        }
    };
    let request = StepRequest {
        app: run.app.clone(),
        run_id: run.id.clone(),
        digest: Digest::parse(&digest)?,
        attempt: 1,
        phase: None,
    };
    deliver(serde_json::to_vec(&request)?, request.message_id("deploy")).await?;

    // Deliver each scheduled verify message as it appears, a few seconds apart.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(330);
    let mut delivered = std::collections::BTreeSet::new();
    let result = loop {
        let stored = runs.get(&run.app, &run.id).await?.context("run gone")?;
        if stored.status.is_terminal() {
            break stored;
        }
        if tokio::time::Instant::now() > deadline {
            bail!("run still {} after the deadline", stored.status);
        }
        for message in bus.peek("deploy").await {
            if delivered.insert(message.message_id.clone()) {
                tokio::time::sleep(Duration::from_secs(3)).await;
                deliver(message.body.into_bytes(), message.message_id).await?;
            }
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };

    let client = kube::Client::try_default().await?;
    kube::Api::<k8s_openapi::api::core::v1::Namespace>::all(client)
        .delete("gantry-live-deploy", &kube::api::DeleteParams::default())
        .await?;
    assert_eq!(result.status, RunStatus::Deployed, "{result:#?}");
    assert_eq!(result.steps["verify"].status, StepStatus::Passed);
    Ok(())
}
