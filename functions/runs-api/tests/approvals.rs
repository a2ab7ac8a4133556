//! Approvals through the operator API (`POST /api/runs/{id}/approve|reject`,
//! `GET /api/runs/{id}`) on the router `gantry serve` and `gantry dev` serve,
//! with the embedded store and queue in a temporary directory.

mod support;

use std::sync::Arc;

use anyhow::{Context, Result, ensure};
use axum::Router;
use gantry_bus::{EmbeddedBus, MessageView, QueueOptions};
use gantry_pipeline::{Run, RunStatus, RunStore, Step, StepStatus};
use gantry_runtime::auth::parse_api_tokens;
use gantry_store::fs::FsStore;
use gantry_testkit::fixtures::{self, DIGEST};
use http::StatusCode;
use serde_json::{Value, json};
use support::{OPERATE, READ, code, sha256_hex};

const CONFIG: &str = "[[apps]]\nname = \"web\"\nrepo = \"contoso/web\"\nimage = \"contoso.azurecr.io/web\"\nrequire_approval = true\napproval_expiry = \"1h\"\n";

struct Harness {
    _dir: tempfile::TempDir,
    store: Arc<FsStore>,
    bus: EmbeddedBus,
    runs: RunStore,
    router: Router,
}

impl Harness {
    async fn new() -> Result<Harness> {
        let dir = tempfile::tempdir()?;
        let store = Arc::new(FsStore::open(dir.path().join("store"))?);
        let bus = EmbeddedBus::open(dir.path().join("bus"), QueueOptions::default()).await?;
        let runs = RunStore::new(store.clone());
        let (_, router) = support::router(
            runs.clone(),
            Arc::new(bus.clone()),
            CONFIG,
            support::secrets()?,
        )?;
        Ok(Harness {
            _dir: dir,
            store,
            bus,
            runs,
            router,
        })
    }

    /// Stores a run awaiting approval whose approval step started `age` ago.
    async fn awaiting(&self, age: time::Duration) -> Result<Run> {
        let run = fixtures::run("web", RunStatus::AwaitingApproval)?;
        let mut run = fixtures::with_image(run, DIGEST)?;
        for gate in ["scan", "policy"] {
            fixtures::passed(&mut run, gate, "ok", Value::Null);
        }
        let mut approval = Step::pending(1);
        approval.started_at = Some(run.created_at - age);
        run.steps.insert("approval".into(), approval);
        ensure!(self.runs.create(&run).await?, "run existed");
        Ok(run)
    }

    async fn call(
        &self,
        method: &str,
        path: &str,
        token: Option<&str>,
        body: &str,
    ) -> Result<(StatusCode, Value)> {
        support::call(&self.router, method, path, &support::bearer(token), body).await
    }

    async fn stored(&self, run: &Run) -> Result<Run> {
        self.runs.get(&run.app, &run.id).await?.context("run gone")
    }

    async fn messages(&self, queue: &str) -> Vec<MessageView> {
        self.bus.peek(queue).await
    }

    async fn assert_quiet(&self, except: &[&str]) -> Result<()> {
        support::assert_quiet(&self.bus, except).await
    }

    async fn audit(&self, action: &str) -> Result<Vec<Value>> {
        support::audit(&self.runs, self.store.as_ref(), action).await
    }
}

#[tokio::test]
async fn refuses_missing_bad_and_read_tokens() -> Result<()> {
    let h = Harness::new().await?;
    let run = h.awaiting(time::Duration::ZERO).await?;
    let approve = format!("/api/runs/{}/approve", run.id);
    for token in [None, Some("wrong"), Some("")] {
        let (status, body) = h.call("POST", &approve, token, "").await?;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}");
        assert_eq!(code(&body), "unauthorized");
    }
    let (status, body) = h.call("POST", &approve, Some(READ), "").await?;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    let (status, _) = h
        .call(
            "POST",
            &format!("/api/runs/{}/reject", run.id),
            Some(READ),
            "",
        )
        .await?;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let (status, _) = h
        .call("GET", &format!("/api/runs/{}", run.id), None, "")
        .await?;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    // Nothing changed; health needs no token.
    assert_eq!(h.stored(&run).await?, run);
    h.assert_quiet(&[]).await?;
    let (status, _) = h.call("GET", "/api/health", None, "").await?;
    assert_eq!(status, StatusCode::OK);
    Ok(())
}

#[tokio::test]
async fn read_token_shows_a_run() -> Result<()> {
    let h = Harness::new().await?;
    let run = h.awaiting(time::Duration::ZERO).await?;
    let (status, body) = h
        .call("GET", &format!("/api/runs/{}", run.id), Some(READ), "")
        .await?;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(serde_json::from_value::<Run>(body)?, run);
    Ok(())
}

#[tokio::test]
async fn approve_queues_exactly_one_deploy_and_audits_the_principal() -> Result<()> {
    let h = Harness::new().await?;
    let run = h.awaiting(time::Duration::minutes(5)).await?;
    let approve = format!("/api/runs/{}/approve", run.id);
    let (status, body) = h.call("POST", &approve, Some(OPERATE), "").await?;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["status"], "deploying");

    let stored = h.stored(&run).await?;
    assert_eq!(serde_json::to_value(&stored)?, body);
    assert_eq!(stored.status, RunStatus::Deploying);
    let approval = &stored.steps["approval"];
    assert_eq!(approval.status, StepStatus::Passed);
    assert_eq!(approval.summary.as_deref(), Some("approved by alice"));
    assert_eq!(approval.details, json!({"principal": "alice"}));
    assert_eq!(stored.steps["deploy"], Step::pending(1));

    let deploys = h.messages("deploy").await;
    assert_eq!(deploys.len(), 1, "{deploys:#?}");
    assert_eq!(deploys[0].message_id, format!("{}:deploy:1", run.id));
    assert_eq!(deploys[0].session_id.as_deref(), Some("web"));
    let request: Value = serde_json::from_str(&deploys[0].body)?;
    assert_eq!(request["digest"], DIGEST);
    h.assert_quiet(&["deploy"]).await?;

    let audit = h.audit("run.approved").await?;
    assert_eq!(audit.len(), 1, "{audit:#?}");
    assert_eq!(audit[0]["actor"], "alice");
    assert_eq!(audit[0]["detail"]["principal"], "alice");

    // A second approval (or a rejection) is a conflict naming the status.
    let (status, body) = h.call("POST", &approve, Some(OPERATE), "").await?;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    assert_eq!(code(&body), "not_awaiting_approval");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap_or_default()
            .contains("deploying"),
        "{body}"
    );
    let (status, _) = h
        .call(
            "POST",
            &format!("/api/runs/{}/reject", run.id),
            Some(OPERATE),
            "",
        )
        .await?;
    assert_eq!(status, StatusCode::CONFLICT);
    assert_eq!(h.messages("deploy").await.len(), 1);
    assert_eq!(h.stored(&run).await?, stored);
    Ok(())
}

#[tokio::test]
async fn reject_blocks_the_run_not_the_digest() -> Result<()> {
    let h = Harness::new().await?;
    let run = h.awaiting(time::Duration::ZERO).await?;
    let reject = format!("/api/runs/{}/reject", run.id);
    let (status, body) = h
        .call(
            "POST",
            &reject,
            Some(OPERATE),
            r#"{"reason": "not during the freeze"}"#,
        )
        .await?;
    assert_eq!(status, StatusCode::OK, "{body}");
    let stored = h.stored(&run).await?;
    assert_eq!(stored.status, RunStatus::Blocked);
    let approval = &stored.steps["approval"];
    assert_eq!(approval.status, StepStatus::Blocked);
    assert_eq!(
        approval.summary.as_deref(),
        Some("rejected by alice: not during the freeze")
    );
    assert_eq!(approval.details["reason"], "not during the freeze");
    assert!(!stored.steps.contains_key("deploy"));
    h.assert_quiet(&[]).await?;
    ensure!(
        h.runs.list_all("apps/web/blocked/").await?.is_empty(),
        "digest blocked"
    );
    let audit = h.audit("run.rejected").await?;
    assert_eq!(audit.len(), 1);
    assert_eq!(audit[0]["detail"]["principal"], "alice");

    let (status, _) = h
        .call(
            "POST",
            &format!("/api/runs/{}/approve", run.id),
            Some(OPERATE),
            "",
        )
        .await?;
    assert_eq!(status, StatusCode::CONFLICT);
    h.assert_quiet(&[]).await
}

#[tokio::test]
async fn reject_without_body_and_bad_bodies() -> Result<()> {
    let h = Harness::new().await?;
    let run = h.awaiting(time::Duration::ZERO).await?;
    let reject = format!("/api/runs/{}/reject", run.id);
    let long = json!({"reason": "x".repeat(501)}).to_string();
    for bad in [long.as_str(), "not json", r#"{"why": "x"}"#] {
        let (status, body) = h.call("POST", &reject, Some(OPERATE), bad).await?;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    }
    assert_eq!(h.stored(&run).await?, run);
    let (status, body) = h.call("POST", &reject, Some(OPERATE), "").await?;
    assert_eq!(status, StatusCode::OK, "{body}");
    let stored = h.stored(&run).await?;
    assert_eq!(
        stored.steps["approval"].summary.as_deref(),
        Some("rejected by alice")
    );
    assert_eq!(stored.status, RunStatus::Blocked);
    Ok(())
}

#[tokio::test]
async fn an_expired_approval_blocks_the_run() -> Result<()> {
    let h = Harness::new().await?;
    let run = h.awaiting(time::Duration::minutes(61)).await?;
    let (status, body) = h
        .call(
            "POST",
            &format!("/api/runs/{}/approve", run.id),
            Some(OPERATE),
            "",
        )
        .await?;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    assert_eq!(code(&body), "approval_expired");
    let stored = h.stored(&run).await?;
    assert_eq!(stored.status, RunStatus::Blocked);
    assert_eq!(stored.steps["approval"].status, StepStatus::Blocked);
    assert_eq!(
        stored.steps["approval"].summary.as_deref(),
        Some("approval expired")
    );
    assert!(!stored.steps.contains_key("deploy"));
    h.assert_quiet(&[]).await
}

#[tokio::test]
async fn bad_and_unknown_run_ids() -> Result<()> {
    let h = Harness::new().await?;
    for (method, suffix) in [("POST", "/approve"), ("POST", "/reject"), ("GET", "")] {
        let (status, body) = h
            .call(
                method,
                &format!("/api/runs/not-a-run{suffix}"),
                Some(OPERATE),
                "",
            )
            .await?;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
        assert_eq!(code(&body), "bad_run_id");
        let unknown = gantry_pipeline::ids::new_run_id(1_700_000_000_000);
        let (status, body) = h
            .call(
                method,
                &format!("/api/runs/{unknown}{suffix}"),
                Some(OPERATE),
                "",
            )
            .await?;
        assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
    }
    h.assert_quiet(&[]).await
}

#[test]
fn token_parsing_errors_name_the_entry() {
    let good = sha256_hex(OPERATE);
    assert_eq!(
        parse_api_tokens(&format!("a:operate:{good}")).map(|t| t.len()),
        Ok(1)
    );
    for (value, entry) in [
        (format!("a:operate:{good},b:admin:{good}"), "entry 2:"),
        (format!("a:operate:{}", &good[..10]), "entry 1:"),
        ("a:read".to_string(), "entry 1:"),
    ] {
        let e = parse_api_tokens(&value).expect_err("invalid");
        assert!(e.contains(entry), "{e}");
        assert!(!e.contains(&good[..16]), "{e}");
    }
}
