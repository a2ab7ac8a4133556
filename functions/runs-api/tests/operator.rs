//! The operator API beyond approvals: the auth matrix of every route,
//! `GET /api/runs` paging and filters, the whole record of
//! `GET /api/runs/{id}` (audit entries) and `POST /api/runs/{id}/retrigger`,
//! on the real router with the embedded store and queue.

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::{Context, Result, ensure};
use axum::Router;
use base64::Engine as _;
use gantry_bus::{BusError, EmbeddedBus, MessageBus, MessageView, OutMessage, QueueOptions};
use gantry_pipeline::runs::blobs;
use gantry_pipeline::{AppName, Digest, Run, RunId, RunStatus, RunStore, Step, StepStatus};
use gantry_runtime::auth::AppServiceAuth;
use gantry_runtime::{Deps, Secrets};
use gantry_store::StateStore;
use gantry_store::fs::FsStore;
use gantry_testkit::fixtures::{self, DIGEST};
use http::StatusCode;
use serde_json::{Value, json};
use support::{OPERATE, READ, code};
use time::OffsetDateTime;

const CONFIG: &str = "[[apps]]\nname = \"web\"\nrepo = \"contoso/web\"\nimage = \"contoso.azurecr.io/web\"\n\n[[apps]]\nname = \"api\"\nrepo = \"contoso/api\"\nimage = \"contoso.azurecr.io/api\"\n";
const OID: &str = "0b5e9c1a-2222-4333-8444-555555555555";

/// The embedded bus, or a failure while `fail` is set (a Service Bus outage).
struct Bus {
    inner: EmbeddedBus,
    fail: AtomicBool,
}

#[async_trait::async_trait]
impl MessageBus for Bus {
    async fn send(&self, message: OutMessage) -> Result<(), BusError> {
        if self.fail.load(Ordering::SeqCst) {
            return Err(BusError::Send {
                queue: message.queue.clone(),
                message: "service unavailable".into(),
                transient: true,
            });
        }
        self.inner.send(message).await
    }
}

struct Harness {
    _dir: tempfile::TempDir,
    store: Arc<dyn StateStore>,
    bus: Arc<Bus>,
    runs: RunStore,
    router: Router,
    deps: Arc<Deps>,
    clock: std::sync::atomic::AtomicU64,
}

impl Harness {
    async fn new(app_service: Option<AppServiceAuth>) -> Result<Harness> {
        let dir = tempfile::tempdir()?;
        let store = Arc::new(FsStore::open(dir.path().join("store"))?);
        Harness::with_store(dir, store, app_service).await
    }

    async fn with_store(
        dir: tempfile::TempDir,
        store: Arc<dyn StateStore>,
        app_service: Option<AppServiceAuth>,
    ) -> Result<Harness> {
        let bus = Arc::new(Bus {
            inner: EmbeddedBus::open(dir.path().join("bus"), QueueOptions::default()).await?,
            fail: AtomicBool::new(false),
        });
        let runs = RunStore::new(store.clone());
        let (deps, router) = support::router(
            runs.clone(),
            bus.clone(),
            CONFIG,
            Secrets {
                app_service,
                ..support::secrets()?
            },
        )?;
        let start = u64::try_from(OffsetDateTime::now_utc().unix_timestamp())? * 1000 - 3_600_000;
        Ok(Harness {
            _dir: dir,
            store,
            bus,
            runs,
            router,
            deps,
            clock: start.into(),
        })
    }

    /// Stores a run of `app` in `status` with `steps` (name, status), each
    /// run one second after the previous one.
    async fn run(&self, app: &str, status: RunStatus, steps: &[(&str, StepStatus)]) -> Result<Run> {
        let ms = self.clock.fetch_add(1000, Ordering::SeqCst);
        let now = OffsetDateTime::now_utc();
        let run = Run::new(
            gantry_pipeline::ids::new_run_id(ms),
            AppName::parse(app)?,
            status,
            fixtures::registry_source(),
            now,
        );
        let mut run = fixtures::with_image(run, DIGEST)?;
        for (name, s) in steps {
            run.steps.insert(
                (*name).into(),
                Step::finished(*s, now, format!("{name} {s:?}")),
            );
        }
        ensure!(self.runs.create(&run).await?, "run existed");
        Ok(run)
    }

    /// Records the digest as blocked by `step` of `run`.
    async fn block(&self, run: &Run, step: &str) -> Result<()> {
        let record = json!({"digest": DIGEST, "run_id": run.id, "step": step,
            "reason": format!("{step} said no"), "at": "2026-01-01T00:00:00Z"});
        self.store
            .create(
                &blobs::blocked(&run.app, &Digest::parse(DIGEST)?),
                &serde_json::to_vec(&record)?,
            )
            .await?;
        Ok(())
    }

    async fn blocked(&self, app: &str) -> Result<Option<Value>> {
        Ok(self
            .store
            .get(&blobs::blocked(
                &AppName::parse(app)?,
                &Digest::parse(DIGEST)?,
            ))
            .await?
            .map(|v| serde_json::from_slice(&v.body))
            .transpose()?)
    }

    async fn call_with(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, String)],
        body: &str,
    ) -> Result<(StatusCode, Value)> {
        support::call(&self.router, method, path, headers, body).await
    }

    async fn call(
        &self,
        method: &str,
        path: &str,
        token: Option<&str>,
        body: &str,
    ) -> Result<(StatusCode, Value)> {
        self.call_with(method, path, &support::bearer(token), body)
            .await
    }

    async fn stored(&self, run: &Run) -> Result<Run> {
        self.runs.get(&run.app, &run.id).await?.context("run gone")
    }

    async fn messages(&self, queue: &str) -> Vec<MessageView> {
        self.bus.inner.peek(queue).await
    }

    async fn assert_quiet(&self, except: &[&str]) -> Result<()> {
        support::assert_quiet(&self.bus.inner, except).await
    }

    async fn audit(&self, action: &str) -> Result<Vec<Value>> {
        support::audit(&self.runs, self.store.as_ref(), action).await
    }

    async fn list(&self, query: &str) -> Result<(Vec<String>, Option<String>)> {
        let (status, body) = self
            .call("GET", &format!("/api/runs{query}"), Some(READ), "")
            .await?;
        ensure!(status == StatusCode::OK, "{status}: {body}");
        let ids = body["runs"]
            .as_array()
            .context("runs")?
            .iter()
            .map(|r| r["id"].as_str().unwrap_or_default().to_string())
            .collect();
        Ok((ids, body["continuation"].as_str().map(str::to_string)))
    }
}

const PASSED: StepStatus = StepStatus::Passed;

#[tokio::test]
async fn auth_matrix_of_every_route() -> Result<()> {
    let h = Harness::new(None).await?;
    let run = h
        .run(
            "web",
            RunStatus::Failed,
            &[
                ("scan", PASSED),
                ("policy", PASSED),
                ("deploy", StepStatus::Failed),
            ],
        )
        .await?;
    let before = h.stored(&run).await?;
    let id = &run.id;
    let routes: [(&str, String, bool, &str); 6] = [
        ("GET", "/api/runs".into(), false, ""),
        ("GET", "/api/audit".into(), false, ""),
        ("GET", format!("/api/runs/{id}"), false, ""),
        (
            "POST",
            format!("/api/runs/{id}/retrigger"),
            true,
            r#"{"from": "deploy"}"#,
        ),
        ("POST", format!("/api/runs/{id}/approve"), true, ""),
        ("POST", format!("/api/runs/{id}/reject"), true, ""),
    ];
    for (method, path, operate, body) in &routes {
        for token in [None, Some("wrong"), Some("")] {
            let (status, b) = h.call(method, path, token, body).await?;
            assert_eq!(
                status,
                StatusCode::UNAUTHORIZED,
                "{method} {path} {token:?}: {b}"
            );
            assert_eq!(code(&b), "unauthorized");
        }
        // Platform principal headers are ignored where App Service
        // Authentication is not configured: still 401.
        let (status, _) = h
            .call_with(
                method,
                path,
                &[
                    ("x-ms-client-principal-id", OID.into()),
                    ("x-ms-client-principal-name", "mallory".into()),
                ],
                body,
            )
            .await?;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{method} {path}");
        let (status, b) = h.call(method, path, Some(READ), body).await?;
        if *operate {
            assert_eq!(status, StatusCode::FORBIDDEN, "{method} {path}: {b}");
            assert_eq!(code(&b), "forbidden");
        } else {
            assert_eq!(status, StatusCode::OK, "{method} {path}: {b}");
        }
    }
    // Nothing was written by refused calls.
    assert_eq!(h.stored(&run).await?, before);
    h.assert_quiet(&[]).await?;
    ensure!(
        h.runs.list_all("audit/").await?.is_empty(),
        "audited a refusal"
    );
    // Operate passes auth on every route (what follows is the route's business).
    for (method, path, _, body) in &routes {
        let (status, b) = h.call(method, path, Some(OPERATE), body).await?;
        assert!(
            ![StatusCode::UNAUTHORIZED, StatusCode::FORBIDDEN].contains(&status),
            "{method} {path}: {status} {b}"
        );
    }
    Ok(())
}

#[tokio::test]
async fn app_service_principals_when_enabled() -> Result<()> {
    let trust = AppServiceAuth::from_settings(Some("True"), Some(&format!("{OID}:operate")))
        .map_err(anyhow::Error::msg)?;
    let h = Harness::new(trust).await?;
    let run = h
        .run(
            "web",
            RunStatus::Failed,
            &[
                ("scan", PASSED),
                ("policy", PASSED),
                ("deploy", StepStatus::Failed),
            ],
        )
        .await?;
    let principal = |id: &str, name: &str| {
        vec![
            ("x-ms-client-principal-id", id.to_string()),
            ("x-ms-client-principal-name", name.to_string()),
        ]
    };
    let retrigger = format!("/api/runs/{}/retrigger", run.id);
    let (status, b) = h
        .call_with(
            "POST",
            &retrigger,
            &principal("someone-else", "eve@contoso.com"),
            r#"{"from": "deploy"}"#,
        )
        .await?;
    assert_eq!(status, StatusCode::FORBIDDEN, "{b}");
    h.assert_quiet(&[]).await?;
    let (status, b) = h
        .call_with(
            "POST",
            &retrigger,
            &principal(OID, "ann@contoso.com"),
            r#"{"from": "deploy", "reason": "flaky apply"}"#,
        )
        .await?;
    assert_eq!(status, StatusCode::ACCEPTED, "{b}");
    let audit = h.audit("run.retriggered").await?;
    assert_eq!(audit.len(), 1);
    assert_eq!(audit[0]["actor"], "aad:ann@contoso.com");
    assert_eq!(
        h.stored(&run).await?.retriggers[0].by,
        "aad:ann@contoso.com"
    );
    // Bearer tokens keep working alongside.
    let (status, _) = h.call("GET", "/api/runs", Some(READ), "").await?;
    assert_eq!(status, StatusCode::OK);
    Ok(())
}

#[tokio::test]
async fn lists_newest_first_in_pages_with_filters() -> Result<()> {
    let h = Harness::new(None).await?;
    let mut all = Vec::new();
    // 7 runs over 2 apps, interleaved, statuses varied.
    for (app, status) in [
        ("web", RunStatus::Deployed),
        ("api", RunStatus::Blocked),
        ("web", RunStatus::Blocked),
        ("api", RunStatus::Deployed),
        ("web", RunStatus::Scanning),
        ("web", RunStatus::Blocked),
        ("api", RunStatus::Failed),
    ] {
        all.push(h.run(app, status, &[]).await?);
    }
    let newest_first: Vec<String> = all.iter().rev().map(|r| r.id.to_string()).collect();

    let mut seen = Vec::new();
    let mut query = "?limit=3".to_string();
    let mut pages = 0;
    loop {
        let (ids, next) = h.list(&query).await?;
        assert!(ids.len() <= 3);
        seen.extend(ids);
        pages += 1;
        match next {
            Some(token) => query = format!("?limit=3&continuation={token}"),
            None => break,
        }
    }
    assert_eq!(seen, newest_first);
    assert_eq!(pages, 3);

    // Default limit: everything in one page, no continuation.
    let (ids, next) = h.list("").await?;
    assert_eq!(ids, newest_first);
    assert_eq!(next, None);

    let web: Vec<String> = all
        .iter()
        .rev()
        .filter(|r| r.app.as_str() == "web")
        .map(|r| r.id.to_string())
        .collect();
    let (first, next) = h.list("?app=web&limit=2").await?;
    assert_eq!(first, web[..2]);
    let (rest, next) = h
        .list(&format!(
            "?app=web&limit=2&continuation={}",
            next.context("token")?
        ))
        .await?;
    assert_eq!(rest, web[2..]);
    assert_eq!(next, None);

    let blocked: Vec<String> = all
        .iter()
        .rev()
        .filter(|r| r.status == RunStatus::Blocked)
        .map(|r| r.id.to_string())
        .collect();
    assert_eq!(blocked.len(), 3);
    let (ids, _) = h.list("?status=blocked").await?;
    assert_eq!(ids, blocked);
    let (ids, _) = h.list("?app=api&status=blocked").await?;
    assert_eq!(ids, [all[1].id.to_string()]);

    // Bad parameters: 400 naming the parameter; a token is tied to its filters.
    let (_, token) = h.list("?app=web&limit=1").await?;
    let token = token.context("token")?;
    for (query, expected) in [
        ("?app=nope".to_string(), "bad_app"),
        ("?app=Web!".to_string(), "bad_app"),
        ("?status=done".to_string(), "bad_status"),
        ("?limit=0".to_string(), "bad_limit"),
        ("?limit=201".to_string(), "bad_limit"),
        ("?limit=ten".to_string(), "bad_limit"),
        ("?continuation=%%%".to_string(), "bad_continuation"),
        ("?continuation=bm90LWpzb24".to_string(), "bad_continuation"),
        (
            format!("?app=api&limit=1&continuation={token}"),
            "bad_continuation",
        ),
        ("?sort=asc".to_string(), "bad_query"),
    ] {
        let (status, body) = h
            .call("GET", &format!("/api/runs{query}"), Some(READ), "")
            .await?;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{query}: {body}");
        assert_eq!(code(&body), expected, "{query}: {body}");
        let param = expected.trim_start_matches("bad_");
        if param != "query" {
            assert!(
                body["error"]["message"]
                    .as_str()
                    .unwrap_or_default()
                    .starts_with(param),
                "{body}"
            );
        }
    }
    let forged = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(r#"{"after":"x"}"#);
    let (status, _) = h
        .call(
            "GET",
            &format!("/api/runs?continuation={forged}"),
            Some(READ),
            "",
        )
        .await?;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    Ok(())
}

#[tokio::test]
async fn retrigger_from_scan_keeps_history_lifts_its_own_block_and_audits() -> Result<()> {
    let h = Harness::new(None).await?;
    let run = h
        .run("web", RunStatus::Blocked, &[("scan", StepStatus::Blocked)])
        .await?;
    h.block(&run, "scan").await?;
    let before = h.stored(&run).await?;
    let (status, body) = h
        .call(
            "POST",
            &format!("/api/runs/{}/retrigger", run.id),
            Some(OPERATE),
            r#"{"from": "scan", "reason": "report fixed"}"#,
        )
        .await?;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    let stored = h.stored(&run).await?;
    assert_eq!(serde_json::to_value(&stored)?, body);
    assert_eq!(stored.status, RunStatus::Scanning);
    assert_eq!(stored.steps["scan"], Step::pending(2));
    assert_eq!(stored.retriggers.len(), 1);
    let r = &stored.retriggers[0];
    assert_eq!(
        (r.by.as_str(), r.from.as_str(), r.reason.as_deref()),
        ("alice", "scan", Some("report fixed"))
    );
    assert_eq!(r.previous_status, RunStatus::Blocked);
    assert_eq!(r.previous["scan"], before.steps["scan"]);

    let scans = h.messages("scan").await;
    assert_eq!(scans.len(), 1, "{scans:#?}");
    assert_eq!(scans[0].message_id, format!("{}:scan:2", run.id));
    assert_eq!(scans[0].session_id, None);
    let request: Value = serde_json::from_str(&scans[0].body)?;
    assert_eq!(
        (request["attempt"].as_u64(), request["digest"].as_str()),
        (Some(2), Some(DIGEST))
    );
    h.assert_quiet(&["scan"]).await?;

    // The block this run's scan recorded is lifted, not deleted, and audited.
    let block = h.blocked("web").await?.context("block record kept")?;
    assert_eq!(block["lifted"]["by"], "alice");
    assert_eq!(block["step"], "scan");
    let audit = h.audit("run.retriggered").await?;
    assert_eq!(audit.len(), 1);
    assert_eq!(audit[0]["actor"], "alice");
    assert_eq!(audit[0]["detail"]["from"], "scan");
    assert_eq!(audit[0]["detail"]["reason"], "report fixed");
    let unblocked = h.audit("digest.unblocked").await?;
    assert_eq!(unblocked.len(), 1);
    assert_eq!(unblocked[0]["actor"], "alice");
    let digest = Digest::parse(DIGEST)?;
    assert!(!gantry_runtime::steps::is_blocked(&h.deps, &run.app, &digest).await?);

    // The whole record carries the run's audit entries.
    let (status, shown) = h
        .call("GET", &format!("/api/runs/{}", run.id), Some(READ), "")
        .await?;
    assert_eq!(status, StatusCode::OK);
    let actions: Vec<&str> = shown["audit"]
        .as_array()
        .context("audit")?
        .iter()
        .filter_map(|e| e["action"].as_str())
        .collect();
    assert_eq!(actions, ["digest.unblocked", "run.retriggered"]);
    assert_eq!(shown["retriggers"][0]["by"], "alice");
    assert_eq!(serde_json::from_value::<Run>(shown)?, stored);

    // In progress now: a second retrigger is refused.
    let (status, body) = h
        .call(
            "POST",
            &format!("/api/runs/{}/retrigger", run.id),
            Some(OPERATE),
            r#"{"from": "scan"}"#,
        )
        .await?;
    assert_eq!(status, StatusCode::CONFLICT);
    assert_eq!(code(&body), "in_progress");
    assert_eq!(h.messages("scan").await.len(), 1);

    // If the re-run gate blocks again, the lifted record is replaced.
    let again = json!({"digest": DIGEST, "run_id": run.id, "step": "scan", "reason": "still critical", "at": "2026-01-02T00:00:00Z"});
    gantry_runtime::steps::record_block(&h.deps, &run.app, &digest, &again).await?;
    assert!(gantry_runtime::steps::is_blocked(&h.deps, &run.app, &digest).await?);
    assert_eq!(h.blocked("web").await?, Some(again));
    Ok(())
}

#[tokio::test]
async fn retrigger_from_deploy_keeps_passed_gates_and_continues_attempts() -> Result<()> {
    let h = Harness::new(None).await?;
    let mut run = h
        .run(
            "web",
            RunStatus::Failed,
            &[
                ("scan", PASSED),
                ("policy", PASSED),
                ("deploy", StepStatus::Failed),
            ],
        )
        .await?;
    run = h
        .runs
        .update(&run.app, &run.id, |r| {
            if let Some(s) = r.steps.get_mut("deploy") {
                s.attempts = 2;
                s.details = json!({"error": "apply refused"});
            }
            Ok(true)
        })
        .await?;
    let (status, body) = h
        .call(
            "POST",
            &format!("/api/runs/{}/retrigger", run.id),
            Some(OPERATE),
            r#"{"from": "deploy"}"#,
        )
        .await?;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    let stored = h.stored(&run).await?;
    assert_eq!(stored.status, RunStatus::Deploying);
    // Earlier passed steps are kept exactly.
    assert_eq!(stored.steps["scan"], run.steps["scan"]);
    assert_eq!(stored.steps["policy"], run.steps["policy"]);
    assert_eq!(stored.steps["deploy"], Step::pending(3));
    assert_eq!(
        stored.retriggers[0].previous["deploy"].details["error"],
        "apply refused"
    );
    let deploys = h.messages("deploy").await;
    assert_eq!(deploys.len(), 1);
    assert_eq!(deploys[0].message_id, format!("{}:deploy:3", run.id));
    assert_eq!(deploys[0].session_id.as_deref(), Some("web"));
    h.assert_quiet(&["deploy"]).await?;
    assert_eq!(stored.next_attempt("deploy"), 4);
    Ok(())
}

#[tokio::test]
async fn retrigger_refusals_write_nothing() -> Result<()> {
    let h = Harness::new(None).await?;
    let superseded = h
        .run(
            "web",
            RunStatus::Superseded,
            &[("scan", PASSED), ("policy", PASSED)],
        )
        .await?;
    let scanning = h.run("api", RunStatus::Scanning, &[]).await?;
    let policy_blocked = h
        .run(
            "api",
            RunStatus::Blocked,
            &[("scan", PASSED), ("policy", StepStatus::Blocked)],
        )
        .await?;
    // Rolled back: the rollout failure blocked the digest.
    let rolled_back = h
        .run(
            "web",
            RunStatus::RolledBack,
            &[
                ("scan", PASSED),
                ("policy", PASSED),
                ("deploy", PASSED),
                ("verify", StepStatus::Failed),
            ],
        )
        .await?;
    h.block(&rolled_back, "verify").await?;

    let cases: Vec<(&Run, &str, StatusCode, &str, &str)> = vec![
        (
            &superseded,
            r#"{"from": "scan"}"#,
            StatusCode::CONFLICT,
            "superseded",
            "superseded",
        ),
        (
            &scanning,
            r#"{"from": "scan"}"#,
            StatusCode::CONFLICT,
            "in_progress",
            "scanning",
        ),
        (
            &policy_blocked,
            r#"{"from": "deploy"}"#,
            StatusCode::CONFLICT,
            "step_not_passed",
            "step policy",
        ),
        (
            &rolled_back,
            r#"{"from": "deploy"}"#,
            StatusCode::CONFLICT,
            "digest_blocked",
            "verify",
        ),
        (
            &rolled_back,
            r#"{"from": "scan"}"#,
            StatusCode::CONFLICT,
            "digest_blocked",
            "verify",
        ),
        (
            &policy_blocked,
            r#"{"from": "verify"}"#,
            StatusCode::BAD_REQUEST,
            "bad_from",
            "verify",
        ),
        (
            &policy_blocked,
            r#"{}"#,
            StatusCode::BAD_REQUEST,
            "bad_body",
            "from",
        ),
        (
            &policy_blocked,
            "",
            StatusCode::BAD_REQUEST,
            "bad_body",
            "from",
        ),
        (
            &policy_blocked,
            r#"{"from": "scan", "force": true}"#,
            StatusCode::BAD_REQUEST,
            "bad_body",
            "force",
        ),
    ];
    let before: Vec<Run> = [&superseded, &scanning, &policy_blocked, &rolled_back]
        .iter()
        .map(|r| (*r).clone())
        .collect();
    for (run, body, expected, expected_code, mention) in cases {
        let (status, b) = h
            .call(
                "POST",
                &format!("/api/runs/{}/retrigger", run.id),
                Some(OPERATE),
                body,
            )
            .await?;
        assert_eq!(status, expected, "{body}: {b}");
        assert_eq!(code(&b), expected_code, "{b}");
        assert!(
            b["error"]["message"]
                .as_str()
                .unwrap_or_default()
                .contains(mention),
            "{b}"
        );
    }
    // A newer run of the same app makes an older run pointless to retrigger.
    let newer = h
        .run(
            "api",
            RunStatus::Deployed,
            &[("scan", PASSED), ("policy", PASSED), ("deploy", PASSED)],
        )
        .await?;
    let (status, b) = h
        .call(
            "POST",
            &format!("/api/runs/{}/retrigger", policy_blocked.id),
            Some(OPERATE),
            r#"{"from": "policy"}"#,
        )
        .await?;
    assert_eq!(status, StatusCode::CONFLICT);
    assert_eq!(code(&b), "newer_run");
    assert!(
        b["error"]["message"]
            .as_str()
            .unwrap_or_default()
            .contains(newer.id.as_str())
    );
    for run in &before {
        assert_eq!(&h.stored(run).await?, run);
    }
    assert!(
        h.blocked("web")
            .await?
            .context("block")?
            .get("lifted")
            .is_none()
    );
    h.assert_quiet(&[]).await?;
    ensure!(h.audit("run.retriggered").await?.is_empty());
    let unknown = RunId::parse(gantry_pipeline::ids::new_run_id(1_700_000_000_000).as_str())?;
    let (status, _) = h
        .call(
            "POST",
            &format!("/api/runs/{unknown}/retrigger"),
            Some(OPERATE),
            r#"{"from": "scan"}"#,
        )
        .await?;
    assert_eq!(status, StatusCode::NOT_FOUND);
    Ok(())
}

#[tokio::test]
async fn a_block_from_another_run_is_not_lifted() -> Result<()> {
    let h = Harness::new(None).await?;
    let first = h
        .run("web", RunStatus::Blocked, &[("scan", StepStatus::Blocked)])
        .await?;
    let second = h
        .run("web", RunStatus::Blocked, &[("scan", StepStatus::Blocked)])
        .await?;
    h.block(&first, "scan").await?;
    let (status, b) = h
        .call(
            "POST",
            &format!("/api/runs/{}/retrigger", second.id),
            Some(OPERATE),
            r#"{"from": "scan"}"#,
        )
        .await?;
    assert_eq!(status, StatusCode::CONFLICT, "{b}");
    assert_eq!(code(&b), "digest_blocked");
    assert!(
        b["error"]["message"]
            .as_str()
            .unwrap_or_default()
            .contains(first.id.as_str())
    );
    assert_eq!(h.stored(&second).await?, second);
    h.assert_quiet(&[]).await
}

#[tokio::test]
async fn a_send_failure_puts_everything_back_and_answers_503() -> Result<()> {
    let h = Harness::new(None).await?;
    let run = h
        .run("web", RunStatus::Blocked, &[("scan", StepStatus::Blocked)])
        .await?;
    h.block(&run, "scan").await?;
    let before = h.stored(&run).await?;
    let block = h.blocked("web").await?;
    h.bus.fail.store(true, Ordering::SeqCst);
    let retrigger = format!("/api/runs/{}/retrigger", run.id);
    let (status, b) = h
        .call("POST", &retrigger, Some(OPERATE), r#"{"from": "scan"}"#)
        .await?;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{b}");
    let after = h.stored(&run).await?;
    assert_eq!(
        (after.status, &after.steps, &after.retriggers),
        (before.status, &before.steps, &before.retriggers)
    );
    assert_eq!(h.blocked("web").await?, block);
    ensure!(h.audit("run.retriggered").await?.is_empty());
    // Once the bus is back, the same retrigger works, and attempt 2 is used
    // (the failed one never left the process).
    h.bus.fail.store(false, Ordering::SeqCst);
    let (status, b) = h
        .call("POST", &retrigger, Some(OPERATE), r#"{"from": "scan"}"#)
        .await?;
    assert_eq!(status, StatusCode::ACCEPTED, "{b}");
    assert_eq!(
        h.messages("scan").await[0].message_id,
        format!("{}:scan:2", run.id)
    );
    Ok(())
}

#[tokio::test]
async fn approve_after_a_retrigger_uses_a_new_deploy_attempt() -> Result<()> {
    // Policy re-run on an app requiring approval hands to approval; the
    // approval's deploy message must not reuse `{run}:deploy:1`.
    let h = Harness::new(None).await?;
    let run = h
        .run(
            "web",
            RunStatus::Failed,
            &[
                ("scan", PASSED),
                ("policy", PASSED),
                ("approval", PASSED),
                ("deploy", StepStatus::Failed),
            ],
        )
        .await?;
    let (status, b) = h
        .call(
            "POST",
            &format!("/api/runs/{}/retrigger", run.id),
            Some(OPERATE),
            r#"{"from": "policy"}"#,
        )
        .await?;
    assert_eq!(status, StatusCode::ACCEPTED, "{b}");
    // What policy-enforce does when it passes with require_approval.
    h.runs
        .update(&run.app, &run.id, |r| {
            if let Some(s) = r.steps.get_mut("policy") {
                s.status = StepStatus::Passed;
            }
            let attempt = r.next_attempt("approval");
            let mut approval = Step::pending(attempt);
            approval.started_at = Some(OffsetDateTime::now_utc());
            r.steps.insert("approval".into(), approval);
            r.status = RunStatus::AwaitingApproval;
            Ok(true)
        })
        .await?;
    let (status, b) = h
        .call(
            "POST",
            &format!("/api/runs/{}/approve", run.id),
            Some(OPERATE),
            "",
        )
        .await?;
    assert_eq!(status, StatusCode::OK, "{b}");
    let stored = h.stored(&run).await?;
    assert_eq!(stored.steps["approval"].attempts, 2);
    assert_eq!(stored.steps["deploy"], Step::pending(2));
    let deploys = h.messages("deploy").await;
    assert_eq!(deploys.len(), 1);
    assert_eq!(deploys[0].message_id, format!("{}:deploy:2", run.id));
    Ok(())
}

/// Measures `GET /api/runs` over many runs in the embedded store (numbers
/// for docs/operations.md; no assertion on time).
#[tokio::test]
#[ignore = "measurement: cargo test -p fn-runs-api --test operator -- --ignored --nocapture"]
async fn measure_list_pages() -> Result<()> {
    measure(Harness::new(None).await?, "embedded store", 5000).await?;
    let azurite = gantry_testkit::Azurite::shared()?;
    let blob = gantry_store::blob::BlobStore::connect(
        &azurite.connection_string(),
        &gantry_testkit::unique_name("list"),
        None,
    )?;
    blob.ensure_container().await?;
    let h = Harness::with_store(tempfile::tempdir()?, Arc::new(blob), None).await?;
    measure(h, "Azurite", 1000).await
}

async fn measure(h: Harness, what: &str, n: usize) -> Result<()> {
    for i in 0..n {
        let status = if i % 50 == 0 {
            RunStatus::Failed
        } else {
            RunStatus::Deployed
        };
        h.run(
            if i % 2 == 0 { "web" } else { "api" },
            status,
            &[("scan", PASSED)],
        )
        .await?;
    }
    for query in [
        "?limit=50",
        "?app=web&limit=50",
        "?limit=200",
        "?status=failed&limit=50",
    ] {
        let start = std::time::Instant::now();
        let rounds = 5;
        for _ in 0..rounds {
            h.list(query).await?;
        }
        println!(
            "{what}, {n} runs, GET /api/runs{query}: {:?} per page",
            start.elapsed() / rounds
        );
    }
    Ok(())
}
