//! Manual rollback through the operator API (`POST /api/apps/{app}/rollback`):
//! the rollback run it creates, the deploy message it sends, the audit entry,
//! and every refusal leaving the state as it was.

mod support;

use std::sync::Arc;

use anyhow::{Context, Result, ensure};
use axum::Router;
use gantry_bus::{EmbeddedBus, QueueOptions};
use gantry_pipeline::messages::{Deployed, DeployedVersion};
use gantry_pipeline::runs::blobs;
use gantry_pipeline::{
    AppName, Config, Digest, Run, RunStatus, RunStore, SourceKind, Step, StepStatus,
};
use gantry_store::StateStore;
use gantry_store::fs::FsStore;
use gantry_testkit::fixtures;
use http::StatusCode;
use serde_json::{Value, json};
use support::{OPERATE, READ, code};

const GOOD: &str = "sha256:b5b2b2c507a0944348e0303114d8d93aaaa081732b86451d9bce1f432a537bc7";
const BAD: &str = "sha256:c0ffeec0ffeec0ffeec0ffeec0ffeec0ffeec0ffeec0ffeec0ffeec0ffee0123";
const CONFIG: &str = "[[apps]]\nname = \"web\"\nrepo = \"contoso/web\"\nimage = \"contoso.azurecr.io/web\"\nrequire_approval = true\n";

struct Harness {
    _dir: tempfile::TempDir,
    store: Arc<FsStore>,
    bus: EmbeddedBus,
    runs: RunStore,
    config: Arc<Config>,
    router: Router,
}

impl Harness {
    async fn new() -> Result<Harness> {
        let dir = tempfile::tempdir()?;
        let store = Arc::new(FsStore::open(dir.path().join("store"))?);
        let bus = EmbeddedBus::open(dir.path().join("bus"), QueueOptions::default()).await?;
        let runs = RunStore::new(store.clone());
        let (deps, router) = support::router(
            runs.clone(),
            Arc::new(bus.clone()),
            CONFIG,
            support::secrets()?,
        )?;
        let config = deps.config.clone();
        Ok(Harness {
            _dir: dir,
            store,
            bus,
            runs,
            config,
            router,
        })
    }

    /// Stores a run of `digest` that ended `status`, its gates as given; the
    /// policy step records the hash of the manifests it checked.
    async fn delivered(&self, digest: &str, status: RunStatus, policy: StepStatus) -> Result<Run> {
        let mut run = fixtures::with_image(fixtures::run("web", status)?, digest)?;
        fixtures::passed(&mut run, "scan", "0 findings", Value::Null);
        let app = self.config.app("web").context("app")?;
        let hash = gantry_manifests::render_run(app, &run)?.hash;
        let mut policy_step = Step::finished(policy, run.created_at, "policy");
        policy_step.details = json!({"manifest_hash": hash});
        run.steps.insert("policy".into(), policy_step);
        ensure!(self.runs.create(&run).await?, "run existed");
        self.runs
            .claim_digest(&run.app, &Digest::parse(digest)?, &run.id)
            .await?;
        // Run ids are time-ordered to the millisecond.
        tokio::time::sleep(std::time::Duration::from_millis(2)).await;
        Ok(run)
    }

    async fn deployed(&self, current: &Run, previous: Option<&Run>) -> Result<()> {
        let version = |r: &Run| -> Result<DeployedVersion> {
            Ok(DeployedVersion {
                digest: r.image.as_ref().context("image")?.digest.clone(),
                run_id: r.id.clone(),
                manifest_hash: r.steps["policy"].details["manifest_hash"]
                    .as_str()
                    .context("hash")?
                    .into(),
            })
        };
        let deployed = Deployed {
            current: Some(version(current)?),
            previous: previous.map(version).transpose()?,
        };
        self.runs
            .put_json(&blobs::deployed(&AppName::parse("web")?), &deployed)
            .await?;
        Ok(())
    }

    async fn call(
        &self,
        path: &str,
        token: Option<&str>,
        body: &str,
    ) -> Result<(StatusCode, Value)> {
        support::call(&self.router, "POST", path, &support::bearer(token), body).await
    }

    async fn run_count(&self) -> Result<usize> {
        Ok(self.runs.list_all("runs/").await?.len())
    }

    async fn assert_quiet(&self) -> Result<()> {
        support::assert_quiet(&self.bus, &[]).await
    }

    async fn audit(&self, action: &str) -> Result<Vec<Value>> {
        support::audit(&self.runs, self.store.as_ref(), action).await
    }
}

const ROLLBACK: &str = "/api/apps/web/rollback";

#[tokio::test]
async fn rolls_back_to_the_previous_good_version_through_a_new_run() -> Result<()> {
    let h = Harness::new().await?;
    let good = h
        .delivered(GOOD, RunStatus::Deployed, StepStatus::Passed)
        .await?;
    let bad = h
        .delivered(BAD, RunStatus::Deployed, StepStatus::Passed)
        .await?;
    h.deployed(&bad, Some(&good)).await?;

    let (status, body) = h
        .call(
            ROLLBACK,
            Some(OPERATE),
            r#"{"reason": "500s since the release"}"#,
        )
        .await?;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    let run: Run = serde_json::from_value(body)?;
    assert_eq!(run.status, RunStatus::Deploying);
    assert_eq!(run.source.kind, SourceKind::Rollback);
    assert_eq!(run.image, good.image, "the previous good image");
    let of = run.rollback.clone().context("rollback")?;
    assert_eq!(of.run_id, good.id);
    assert_eq!(of.requested_by, "alice");
    assert_eq!(of.reason.as_deref(), Some("500s since the release"));
    assert_eq!(run.steps["scan"], good.steps["scan"], "gates kept");
    assert_eq!(run.steps["policy"], good.steps["policy"]);
    assert_eq!(run.steps["deploy"].status, StepStatus::Pending);
    assert!(
        !run.steps.contains_key("approval"),
        "the request is the approval"
    );
    assert!(run.id > bad.id, "the newest run of the app");
    assert_eq!(
        h.runs.get(&run.app, &run.id).await?.as_ref(),
        Some(&run),
        "stored as answered"
    );

    let sent = h.bus.peek("deploy").await;
    ensure!(sent.len() == 1, "one deploy message: {sent:#?}");
    assert_eq!(sent[0].message_id, format!("{}:deploy:1", run.id));
    assert_eq!(sent[0].session_id.as_deref(), Some("web"));
    let request: Value = serde_json::from_str(&sent[0].body)?;
    assert_eq!(request["run_id"], run.id.to_string());
    assert_eq!(request["digest"], GOOD);

    let audit = h.audit("app.rollback").await?;
    assert_eq!(audit.len(), 1, "{audit:#?}");
    assert_eq!(audit[0]["actor"], "alice");
    assert_eq!(audit[0]["detail"]["of_run"], good.id.to_string());
    assert_eq!(audit[0]["detail"]["digest"], GOOD);
    Ok(())
}

#[tokio::test]
async fn a_named_digest_that_passed_both_gates_is_rolled_back_to() -> Result<()> {
    let h = Harness::new().await?;
    let good = h
        .delivered(GOOD, RunStatus::Superseded, StepStatus::Passed)
        .await?;
    let bad = h
        .delivered(BAD, RunStatus::Deployed, StepStatus::Passed)
        .await?;
    h.deployed(&bad, None).await?;
    let (status, body) = h
        .call(
            ROLLBACK,
            Some(OPERATE),
            &json!({"digest": GOOD}).to_string(),
        )
        .await?;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    assert_eq!(body["rollback"]["run_id"], good.id.to_string());
    assert_eq!(body["image"]["digest"], GOOD);
    assert_eq!(h.bus.peek("deploy").await.len(), 1);
    Ok(())
}

#[tokio::test]
async fn refusals_change_nothing() -> Result<()> {
    let h = Harness::new().await?;
    // Nothing deployed yet: no previous good version.
    let (status, body) = h.call(ROLLBACK, Some(OPERATE), "").await?;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    assert_eq!(code(&body), "no_rollback_target");

    let good = h
        .delivered(GOOD, RunStatus::Deployed, StepStatus::Passed)
        .await?;
    let bad = h
        .delivered(BAD, RunStatus::Blocked, StepStatus::Blocked)
        .await?;
    h.deployed(&good, None).await?;
    let before = h.run_count().await?;

    let cases: Vec<(Option<&str>, String, StatusCode, &str)> = vec![
        (
            None,
            String::new(),
            StatusCode::UNAUTHORIZED,
            "unauthorized",
        ),
        (
            Some("nope"),
            String::new(),
            StatusCode::UNAUTHORIZED,
            "unauthorized",
        ),
        (
            Some(READ),
            String::new(),
            StatusCode::FORBIDDEN,
            "forbidden",
        ),
        // Only a current version: nothing to go back to.
        (
            Some(OPERATE),
            String::new(),
            StatusCode::CONFLICT,
            "no_rollback_target",
        ),
        // The policy gate blocked it.
        (
            Some(OPERATE),
            json!({"digest": BAD}).to_string(),
            StatusCode::CONFLICT,
            "digest_not_eligible",
        ),
        // Never delivered for this app.
        (
            Some(OPERATE),
            json!({"digest": format!("sha256:{}", "1".repeat(64))}).to_string(),
            StatusCode::CONFLICT,
            "digest_not_eligible",
        ),
        (
            Some(OPERATE),
            json!({"digest": "latest"}).to_string(),
            StatusCode::BAD_REQUEST,
            "bad_digest",
        ),
        (
            Some(OPERATE),
            json!({"digest": GOOD, "force": true}).to_string(),
            StatusCode::BAD_REQUEST,
            "bad_body",
        ),
        (
            Some(OPERATE),
            json!({"reason": "x".repeat(501)}).to_string(),
            StatusCode::BAD_REQUEST,
            "reason_too_long",
        ),
    ];
    for (token, body_text, want, want_code) in cases {
        let (status, body) = h.call(ROLLBACK, token, &body_text).await?;
        assert_eq!(status, want, "{token:?} {body_text}: {body}");
        assert_eq!(code(&body), want_code, "{body}");
    }
    let (status, body) = h.call("/api/apps/nope/rollback", Some(OPERATE), "").await?;
    assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
    assert_eq!(code(&body), "unknown_app");
    let (status, body) = h
        .call("/api/apps/Web%2F..%2Fx/rollback", Some(OPERATE), "")
        .await?;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert_eq!(code(&body), "bad_app");

    // A blocked digest (e.g. by a security alert) is refused even though it
    // passed both gates.
    h.deployed(&bad, Some(&good)).await?;
    h.store
        .create(
            &blobs::blocked(&good.app, &Digest::parse(GOOD)?),
            br#"{"reason":"defender"}"#,
        )
        .await?;
    let (status, body) = h.call(ROLLBACK, Some(OPERATE), "").await?;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    assert_eq!(code(&body), "digest_blocked");

    assert_eq!(h.run_count().await?, before, "no run created");
    h.assert_quiet().await?;
    assert!(h.audit("app.rollback").await?.is_empty());
    let _ = bad;
    Ok(())
}

#[tokio::test]
async fn manifests_changed_since_the_gate_are_refused() -> Result<()> {
    let h = Harness::new().await?;
    let good = h
        .delivered(GOOD, RunStatus::Deployed, StepStatus::Passed)
        .await?;
    let bad = h
        .delivered(BAD, RunStatus::Deployed, StepStatus::Passed)
        .await?;
    h.deployed(&bad, Some(&good)).await?;
    // The policy gate checked other manifests than the ones rendered now
    // (gantry.toml changed since): deploying them would skip the gate.
    h.runs
        .update(&good.app, &good.id, |r| {
            if let Some(p) = r.steps.get_mut("policy") {
                p.details = json!({"manifest_hash": "0".repeat(64)});
            }
            Ok(true)
        })
        .await?;
    let (status, body) = h.call(ROLLBACK, Some(OPERATE), "").await?;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    assert_eq!(code(&body), "digest_not_eligible");
    let message = body["error"]["message"].as_str().unwrap_or_default();
    assert!(message.contains("retrigger run"), "{message}");
    h.assert_quiet().await?;
    Ok(())
}
