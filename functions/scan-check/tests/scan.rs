//! `scan-check` invoked through the custom-handler envelope (`POST
//! /scan-check`), exactly as the Functions host (or `gantry dev`) invokes it,
//! with the embedded on-disk store and the embedded queue in a temporary
//! directory. Each test creates the run in `scanning` directly, puts a Trivy
//! report where the gate looks for it, and checks the exact state left behind.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use axum::Router;
use axum::body::Body;
use gantry_bus::{Clock, EmbeddedBus, MessageState, MessageView, QUEUES, QueueOptions, QueueStats};
use gantry_pipeline::{AppName, Config, Run, RunId, RunStatus, RunStore, Source, Step, StepStatus};
use gantry_runtime::{Deps, Secrets};
use gantry_scan::{FIRST_DELAY, next_check};
use gantry_store::fs::FsStore;
use gantry_store::{Etag, Page, StateStore, StoreError, Versioned};
use gantry_testkit::bus::FlakyBus;
use gantry_testkit::fixtures::{self, SHA};
use http::{Request, StatusCode};
use http_body_util::BodyExt;
use serde_json::{Value, json};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;
use tower::ServiceExt;

/// The digest every fixture report is about.
const DIGEST: &str = "sha256:c4719afa76fa448b5eca99e6736885846501d17956f2fcb2de5c916d723f3a87";
/// The digest `wrong-digest.json` names.
const OTHER_DIGEST: &str =
    "sha256:0391d596b430ba26aabec5e42fe9e44a657fc9348971043507a8dc8bdf6a984a";
/// The default `max_wait` (4 h).
const MAX_WAIT: Duration = Duration::from_secs(4 * 3600);

const FIXTURES: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../../shared/scan/tests/fixtures"
);

const CONFIG: &str = r#"
[[apps]]
name = "web"
repo = "contoso/web"
image = "contoso.azurecr.io/web"
"#;

/// `[apps.scan]` right after the `web` app, then a second app `api` so
/// allow-list entries can be scoped away from `web`.
const ALLOW_CONFIG_HEAD: &str = r#"
[apps.scan]
threshold = "critical"

[[apps]]
name = "api"
repo = "contoso/api"
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

fn take(counter: &AtomicU32) -> bool {
    counter
        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
        .is_ok()
}

impl FlakyStore {
    fn fail_writes(&self, skip: u32, fail: u32) {
        self.skip.store(skip, Ordering::SeqCst);
        self.fail.store(fail, Ordering::SeqCst);
    }

    fn injected(&self, name: &str) -> Result<(), StoreError> {
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

/// The embedded queue's clock: the wall clock plus an offset, so a scheduled
/// message can come due without the test sleeping.
#[derive(Default)]
struct TestClock {
    offset: Mutex<time::Duration>,
}

impl TestClock {
    /// Makes the queue's "now" `at`.
    fn set(&self, at: OffsetDateTime) {
        *self.offset.lock().unwrap_or_else(|p| p.into_inner()) = at - OffsetDateTime::now_utc();
    }
}

impl Clock for TestClock {
    fn now(&self) -> OffsetDateTime {
        OffsetDateTime::now_utc() + *self.offset.lock().unwrap_or_else(|p| p.into_inner())
    }
}

struct Harness {
    dir: tempfile::TempDir,
    store: Arc<FlakyStore>,
    bus: EmbeddedBus,
    flaky_bus: Arc<FlakyBus>,
    clock: Arc<TestClock>,
    runs: RunStore,
    router: Router,
}

impl Harness {
    /// A harness whose configuration is [`CONFIG`] followed by `extra`.
    async fn new(extra: &str) -> Result<Harness> {
        Harness::build(|_| extra.to_string()).await
    }

    /// As [`Harness::new`], with `extra` built from the temporary directory.
    async fn build(extra: impl FnOnce(&Path) -> String) -> Result<Harness> {
        let dir = tempfile::tempdir()?;
        let store = Arc::new(FlakyStore {
            inner: FsStore::open(dir.path().join("store"))?,
            skip: AtomicU32::new(0),
            fail: AtomicU32::new(0),
        });
        let clock = Arc::new(TestClock::default());
        let bus = EmbeddedBus::open_with_clock(
            dir.path().join("bus"),
            QueueOptions::default(),
            clock.clone(),
        )
        .await?;
        let flaky_bus = Arc::new(FlakyBus::new(bus.clone()));
        let runs = RunStore::new(store.clone());
        let config = Config::parse(&format!("{CONFIG}{}", extra(dir.path())), "test.toml")?;
        let deps = Deps {
            runs: runs.clone(),
            bus: flaky_bus.clone(),
            config: Arc::new(config),
            secrets: Secrets::default(),
            services: Default::default(),
        };
        let router = gantry_runtime::app(Arc::new(deps), &[fn_scan_check::function()]);
        Ok(Harness {
            dir,
            store,
            bus,
            flaky_bus,
            clock,
            runs,
            router,
        })
    }

    /// Creates a run of `web` in `scanning` for [`DIGEST`] with `scan` pending
    /// (attempt 1), after `edit`; returns its id.
    async fn create_run(&self, edit: impl FnOnce(&mut Run)) -> Result<RunId> {
        let source = Source {
            pusher: Some("monalisa".into()),
            delivery: Some("11111111-2222-4333-8444-555555555555".into()),
            ..fixtures::github_source("web", SHA)?
        };
        let run = fixtures::run_at(
            "web",
            RunStatus::Scanning,
            source,
            OffsetDateTime::now_utc(),
        )?;
        let mut run = fixtures::with_image(run, DIGEST)?;
        let id = run.id.clone();
        run.steps.insert("scan".into(), Step::pending(1));
        edit(&mut run);
        ensure!(self.runs.create(&run).await?, "run {id} already existed");
        Ok(id)
    }

    /// Uploads a Trivy report as CI does: `scans/{digest}.trivy.json`.
    async fn put_report(&self, body: &[u8]) -> Result<()> {
        self.store
            .inner
            .create(&format!("scans/{DIGEST}.trivy.json"), body)
            .await?;
        Ok(())
    }

    async fn invoke_raw(&self, body: Vec<u8>) -> Result<(StatusCode, Value)> {
        let request = Request::post("/scan-check")
            .header("content-type", "application/json")
            .body(Body::from(body))?;
        let response = self.router.clone().oneshot(request).await?;
        let status = response.status();
        let bytes = response.into_body().collect().await?.to_bytes();
        let value = serde_json::from_slice(&bytes)
            .with_context(|| format!("{status}: not JSON: {}", String::from_utf8_lossy(&bytes)))?;
        Ok((status, value))
    }

    /// Delivers one `scan` message as the host does; returns the status and
    /// the one log line of the reply.
    async fn deliver(
        &self,
        body: &[u8],
        message_id: &str,
        delivery_count: u32,
    ) -> Result<(StatusCode, String)> {
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
        let (status, reply) = self.invoke_raw(serde_json::to_vec(&envelope)?).await?;
        Ok((status, log_line(&reply)?))
    }

    /// Delivers the `scan` message of attempt `attempt` of `run`, as
    /// registry-push (or a retrigger) sends it.
    async fn scan(&self, run: &RunId, attempt: u32, delivery: u32) -> Result<(StatusCode, String)> {
        self.deliver(
            &request(run, DIGEST, attempt)?,
            &format!("{run}:scan:{attempt}"),
            delivery,
        )
        .await
    }

    /// As [`Harness::scan`] for attempt 1, expecting 200.
    async fn scan_ok(&self, run: &RunId) -> Result<String> {
        let (status, line) = self.scan(run, 1, 1).await?;
        ensure!(status == StatusCode::OK, "{status}: {line}");
        Ok(line)
    }

    async fn run(&self, id: &RunId) -> Result<Run> {
        self.runs
            .get(&AppName::parse("web")?, id)
            .await?
            .context("run not found")
    }

    async fn names(&self, prefix: &str) -> Result<Vec<String>> {
        Ok(self.runs.list_all(prefix).await?)
    }

    async fn blob(&self, name: &str) -> Result<Value> {
        let blob = self
            .store
            .get(name)
            .await?
            .with_context(|| format!("{name} missing"))?;
        Ok(serde_json::from_slice(&blob.body)?)
    }

    async fn exists(&self, name: &str) -> Result<bool> {
        Ok(self.store.get(name).await?.is_some())
    }

    /// Every blob and its bytes.
    async fn snapshot(&self) -> Result<BTreeMap<String, Vec<u8>>> {
        let mut out = BTreeMap::new();
        for name in self.names("").await? {
            let blob = self.store.get(&name).await?.context("listed blob")?;
            out.insert(name, blob.body);
        }
        Ok(out)
    }

    /// Every queue except `except` is empty.
    async fn assert_quiet(&self, except: &[&str], what: &str) -> Result<()> {
        for queue in QUEUES.iter().filter(|q| !except.contains(q)) {
            let stats = self.bus.stats(queue).await;
            ensure!(
                stats == QueueStats::default(),
                "{what}: queue {queue} has {stats:?}: {:#?}",
                self.bus.peek(queue).await
            );
        }
        Ok(())
    }

    /// `(MessageId, body)` of every live alert.
    async fn alerts(&self) -> Result<Vec<(String, Value)>> {
        let mut out = Vec::new();
        for m in self.bus.peek("alerts").await {
            out.push((m.message_id.clone(), serde_json::from_str(&m.body)?));
        }
        Ok(out)
    }

    async fn audit(&self, action: &str) -> Result<Vec<Value>> {
        let mut lines = Vec::new();
        for name in self.names("audit/").await? {
            let blob = self.store.get(&name).await?.context("audit blob")?;
            for line in String::from_utf8(blob.body)?.lines() {
                let entry: Value = serde_json::from_str(line)?;
                if entry["action"] == action {
                    lines.push(entry);
                }
            }
        }
        Ok(lines)
    }
}

fn fixture(name: &str) -> Result<Vec<u8>> {
    let path = format!("{FIXTURES}/{name}");
    std::fs::read(&path).with_context(|| format!("reading {path}"))
}

/// The body of a `scan` message.
fn request(run: &RunId, digest: &str, attempt: u32) -> Result<Vec<u8>> {
    Ok(serde_json::to_vec(&json!({
        "app": "web", "run_id": run.as_str(), "digest": digest, "attempt": attempt,
    }))?)
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

fn rfc3339(t: OffsetDateTime) -> Result<String> {
    Ok(t.format(&Rfc3339)?)
}

fn parse_time(v: &Value) -> Result<OffsetDateTime> {
    let text = v.as_str().with_context(|| format!("{v} is not a string"))?;
    Ok(OffsetDateTime::parse(text, &Rfc3339)?)
}

fn step<'a>(run: &'a Run, name: &str) -> Result<&'a Step> {
    run.steps
        .get(name)
        .with_context(|| format!("no {name} step: {run:#?}"))
}

fn counts(critical: u32, high: u32, medium: u32, low: u32) -> Value {
    json!({"critical": critical, "high": high, "medium": medium, "low": low, "unknown": 0})
}

fn finding(
    id: &str,
    package: &str,
    installed: &str,
    fixed: Option<&str>,
    severity: &str,
    title: &str,
) -> Value {
    json!({
        "id": id, "package": package, "installed_version": installed,
        "fixed_version": fixed, "severity": severity, "title": title,
    })
}

/// The critical findings of `criticals.json`, as the gate lists them.
fn expat_45491() -> Value {
    finding(
        "CVE-2024-45491",
        "expat",
        "2.6.2-r0",
        Some("2.6.3-r0"),
        "critical",
        "libexpat: Integer Overflow or Wraparound",
    )
}
fn expat_45492() -> Value {
    finding(
        "CVE-2024-45492",
        "expat",
        "2.6.2-r0",
        Some("2.6.3-r0"),
        "critical",
        "libexpat: integer overflow",
    )
}
fn stdlib_24790() -> Value {
    finding(
        "CVE-2024-24790",
        "stdlib",
        "v1.22.1",
        Some("1.21.11, 1.22.4"),
        "critical",
        "golang: net/netip: Unexpected behavior from Is methods for IPv4-mapped IPv6 addresses",
    )
}
fn openssl_6119(package: &str) -> Value {
    finding(
        "CVE-2024-6119",
        package,
        "3.1.5-r0",
        Some("3.1.7-r0"),
        "high",
        "openssl: Possible denial of service in X.509 name checks",
    )
}

/// `criticals.json` without its critical findings: the worst left is high.
fn highs_only() -> Result<Vec<u8>> {
    let mut report: Value = serde_json::from_slice(&fixture("criticals.json")?)?;
    for result in report["Results"]
        .as_array_mut()
        .context("Results")?
        .iter_mut()
    {
        if let Some(vulns) = result["Vulnerabilities"].as_array_mut() {
            vulns.retain(|v| v["Severity"] != "CRITICAL");
        }
    }
    Ok(serde_json::to_vec(&report)?)
}

/// Asserts the run passed the scan gate with `summary` and `verdict` and was
/// handed to policy with exactly one message.
async fn assert_passed(h: &Harness, id: &RunId, verdict: &Value) -> Result<()> {
    let run = h.run(id).await?;
    assert_eq!(run.status, RunStatus::CheckingPolicy, "{run:#?}");
    let scan = step(&run, "scan")?;
    assert_eq!((scan.status, scan.attempts), (StepStatus::Passed, 1));
    assert_eq!(scan.summary.as_deref(), verdict["summary"].as_str());
    assert_eq!(&scan.details, verdict);
    assert_eq!(step(&run, "policy")?, &Step::pending(1));
    let policies = h.bus.peek("policy").await;
    assert_eq!(policies.len(), 1, "{policies:#?}");
    assert_eq!(policies[0].message_id, format!("{id}:policy:1"));
    assert_eq!(
        serde_json::from_str::<Value>(&policies[0].body)?,
        json!({"app": "web", "run_id": id.as_str(), "digest": DIGEST, "attempt": 1})
    );
    let record = h.blob(&format!("scans/{DIGEST}.json")).await?;
    assert_eq!(&record["verdict"], verdict);
    Ok(())
}

/// Asserts the run was blocked at the scan gate with `summary`, `details`, the
/// blocked-digest record and one high `scan-blocked` alert (among `alerts`).
async fn assert_blocked(h: &Harness, id: &RunId, summary: &str, details: &Value) -> Result<()> {
    let run = h.run(id).await?;
    assert_eq!(run.status, RunStatus::Blocked, "{run:#?}");
    let scan = step(&run, "scan")?;
    assert_eq!((scan.status, scan.attempts), (StepStatus::Blocked, 1));
    assert_eq!(scan.summary.as_deref(), Some(summary));
    assert_eq!(&scan.details, details);
    assert!(scan.finished_at.is_some() && scan.finished_at >= scan.started_at);
    assert!(!run.steps.contains_key("policy"), "{run:#?}");

    let blocked = h.blob(&format!("apps/web/blocked/{DIGEST}")).await?;
    assert_eq!(blocked["digest"], DIGEST);
    assert_eq!(blocked["run_id"], id.as_str());
    assert_eq!(blocked["step"], "scan");
    assert_eq!(blocked["reason"], summary);
    parse_time(&blocked["at"])?;

    let alerts = h.alerts().await?;
    let blocked_alerts: Vec<_> = alerts
        .iter()
        .filter(|(mid, _)| *mid == format!("{id}:alert:scan-blocked"))
        .collect();
    assert_eq!(blocked_alerts.len(), 1, "{alerts:#?}");
    assert_eq!(
        blocked_alerts[0].1,
        json!({
            "kind": "scan-blocked", "severity": "high", "app": "web",
            "run_id": id.as_str(), "step": "scan", "digest": DIGEST,
            "reason": format!("web: {summary}"),
        })
    );
    assert_eq!(h.bus.stats("policy").await, QueueStats::default());
    assert_eq!(h.audit("step.scan.blocked").await?.len(), 1);
    Ok(())
}

/// Asserts the run failed at the scan gate with `summary` and one high
/// `scan-failed` alert, and nothing else was queued.
async fn assert_failed(h: &Harness, id: &RunId, summary: &str) -> Result<()> {
    let run = h.run(id).await?;
    assert_eq!(run.status, RunStatus::Failed, "{run:#?}");
    let scan = step(&run, "scan")?;
    assert_eq!((scan.status, scan.attempts), (StepStatus::Failed, 1));
    assert_eq!(scan.summary.as_deref(), Some(summary));
    assert!(scan.finished_at.is_some());
    assert!(!run.steps.contains_key("policy"));
    let alerts = h.alerts().await?;
    assert_eq!(alerts.len(), 1, "{alerts:#?}");
    assert_eq!(alerts[0].0, format!("{id}:alert:scan-failed"));
    assert_eq!(
        alerts[0].1,
        json!({
            "kind": "run-failed", "severity": "high", "app": "web",
            "run_id": id.as_str(), "step": "scan", "digest": DIGEST,
            "reason": format!("web: scan failed: {summary}"),
        })
    );
    // Not retried: no scan message, no verdict, nothing blocked.
    h.assert_quiet(&["alerts"], "failed").await?;
    assert!(!h.exists(&format!("scans/{DIGEST}.json")).await?);
    assert!(h.names("apps/").await?.is_empty());
    assert_eq!(h.audit("step.scan.failed").await?.len(), 1);
    Ok(())
}

// ---------------------------------------------------------------- pass

#[tokio::test]
async fn a_clean_report_passes_and_hands_the_run_to_policy_once() -> Result<()> {
    let h = Harness::new("").await?;
    let id = h.create_run(|_| {}).await?;
    h.put_report(&fixture("clean.json")?).await?;

    let before = OffsetDateTime::now_utc();
    let line = h.scan_ok(&id).await?;
    assert!(
        line.contains("scan passed") && line.contains("policy queued"),
        "{line}"
    );

    let summary = "passed: no findings at or above high (0 below)";
    let verdict = json!({
        "passed": true, "threshold": "high", "counts": counts(0, 0, 0, 0),
        "blocking": [], "allowed": [], "ignored_unfixed": 0, "expired_allow": [],
        "summary": summary,
    });
    assert_passed(&h, &id, &verdict).await?;
    let run = h.run(&id).await?;
    assert_eq!(
        run.steps.keys().map(String::as_str).collect::<Vec<_>>(),
        ["policy", "scan"]
    );
    let scan = step(&run, "scan")?;
    let started = scan.started_at.context("started_at")?;
    let finished = scan.finished_at.context("finished_at")?;
    assert!(before <= started && started <= finished, "{scan:#?}");

    let policy = &h.bus.peek("policy").await[0];
    assert_eq!(policy.state, MessageState::Active);
    assert_eq!(policy.session_id, None);
    assert_eq!(
        policy.properties.get("run-id").map(String::as_str),
        Some(id.as_str())
    );
    assert_eq!(
        policy.properties.get("app").map(String::as_str),
        Some("web")
    );

    let record = h.blob(&format!("scans/{DIGEST}.json")).await?;
    assert_eq!(record["digest"], DIGEST);
    assert_eq!(record["origin"], format!("scans/{DIGEST}.trivy.json"));
    assert_eq!(record["scanned_at"], "2026-11-03T09:14:22.418533+00:00");
    assert_eq!(record["findings"], json!([]));
    parse_time(&record["checked_at"])?;
    assert_eq!(h.audit("step.scan.passed").await?.len(), 1);
    assert!(h.names("apps/").await?.is_empty(), "nothing blocked");
    assert!(h.names("rejected/").await?.is_empty());
    h.assert_quiet(&["policy"], "clean").await?;

    // The host redelivers the same message: acknowledged, nothing changes.
    let snapshot = h.snapshot().await?;
    let (status, line) = h.scan(&id, 1, 2).await?;
    assert_eq!(status, StatusCode::OK, "{line}");
    assert_eq!(h.snapshot().await?, snapshot, "redelivery wrote something");
    assert_eq!(h.bus.peek("policy").await.len(), 1);
    h.assert_quiet(&["policy"], "redelivered").await
}

#[tokio::test]
async fn a_high_finding_passes_a_critical_threshold() -> Result<()> {
    let h = Harness::new("\n[apps.scan]\nthreshold = \"critical\"\n").await?;
    let id = h.create_run(|_| {}).await?;
    h.put_report(&highs_only()?).await?;
    h.scan_ok(&id).await?;
    let verdict = json!({
        "passed": true, "threshold": "critical", "counts": counts(0, 2, 4, 2),
        "blocking": [], "allowed": [], "ignored_unfixed": 0, "expired_allow": [],
        "summary": "passed: no findings at or above critical (8 below)",
    });
    assert_passed(&h, &id, &verdict).await?;
    h.assert_quiet(&["policy"], "critical threshold").await?;

    // The same report under the default threshold (high) blocks.
    let h = Harness::new("").await?;
    let id = h.create_run(|_| {}).await?;
    h.put_report(&highs_only()?).await?;
    h.scan_ok(&id).await?;
    let summary = "blocked: 2 high at or above high (CVE-2024-6119)";
    let details = json!({
        "passed": false, "threshold": "high", "counts": counts(0, 2, 4, 2),
        "blocking": [openssl_6119("libcrypto3"), openssl_6119("libssl3")],
        "allowed": [], "ignored_unfixed": 0, "expired_allow": [], "summary": summary,
    });
    assert_blocked(&h, &id, summary, &details).await
}

#[tokio::test]
async fn ignore_unfixed_passes_a_report_of_unfixed_findings() -> Result<()> {
    let h = Harness::new("\n[scan]\nignore_unfixed = true\n").await?;
    let id = h.create_run(|_| {}).await?;
    h.put_report(&fixture("unfixed-only.json")?).await?;
    h.scan_ok(&id).await?;
    let verdict = json!({
        "passed": true, "threshold": "high", "counts": counts(1, 1, 0, 1),
        "blocking": [], "allowed": [], "ignored_unfixed": 2, "expired_allow": [],
        "summary": "passed: 2 findings at or above high, none blocking; 2 unfixed ignored",
    });
    assert_passed(&h, &id, &verdict).await?;
    h.assert_quiet(&["policy"], "unfixed ignored").await?;

    // Without ignore_unfixed the same report blocks.
    let h = Harness::new("").await?;
    let id = h.create_run(|_| {}).await?;
    h.put_report(&fixture("unfixed-only.json")?).await?;
    h.scan_ok(&id).await?;
    let run = h.run(&id).await?;
    assert_eq!(run.status, RunStatus::Blocked);
    let scan = step(&run, "scan")?;
    assert_eq!(scan.details["ignored_unfixed"], 0);
    assert_eq!(
        scan.summary.as_deref(),
        Some("blocked: 1 critical, 1 high at or above high (CVE-2023-45853, CVE-2023-31484)")
    );
    Ok(())
}

// ---------------------------------------------------------------- block

#[tokio::test]
async fn criticals_block_the_digest_with_every_blocking_finding_and_one_alert() -> Result<()> {
    let h = Harness::new("").await?;
    let id = h.create_run(|_| {}).await?;
    h.put_report(&fixture("criticals.json")?).await?;
    let line = h.scan_ok(&id).await?;
    let summary = "blocked: 3 critical, 2 high at or above high \
                   (CVE-2024-24790, CVE-2024-45491, CVE-2024-45492, CVE-2024-6119)";
    assert_eq!(line, format!("run {id}: {summary}"));
    let details = json!({
        "passed": false, "threshold": "high", "counts": counts(3, 2, 4, 2),
        "blocking": [
            stdlib_24790(), expat_45491(), expat_45492(),
            openssl_6119("libcrypto3"), openssl_6119("libssl3"),
        ],
        "allowed": [], "ignored_unfixed": 0, "expired_allow": [], "summary": summary,
    });
    assert_blocked(&h, &id, summary, &details).await?;
    assert_eq!(h.alerts().await?.len(), 1, "only the block alert");
    let record = h.blob(&format!("scans/{DIGEST}.json")).await?;
    assert_eq!(record["verdict"], details);
    assert_eq!(
        record["findings"].as_array().map(Vec::len),
        Some(11),
        "the duplicate stdlib finding is kept once"
    );
    assert!(h.names("rejected/").await?.is_empty());
    h.assert_quiet(&["alerts"], "blocked").await?;

    // Redelivered: acknowledged, nothing changes.
    let snapshot = h.snapshot().await?;
    let (status, line) = h.scan(&id, 1, 2).await?;
    assert_eq!(status, StatusCode::OK, "{line}");
    assert_eq!(h.snapshot().await?, snapshot);
    assert_eq!(h.alerts().await?.len(), 1);
    h.assert_quiet(&["alerts"], "blocked, redelivered").await
}

// ---------------------------------------------------------------- allow-list

#[tokio::test]
async fn live_allow_list_entries_accept_the_criticals_with_their_reasons() -> Result<()> {
    let h = Harness::new(&format!(
        "{ALLOW_CONFIG_HEAD}
[[scan.allow]]
id = \"CVE-2024-45491\"
apps = [\"web\"]
expires = 2099-12-31
reason = \"expat is unreachable: the service parses no XML\"

[[scan.allow]]
id = \"cve-2024-45492\"
expires = \"2099-06-30\"
reason = \"same expat, same reasoning\"

[[scan.allow]]
id = \"CVE-2024-24790\"
apps = [\"web\", \"api\"]
expires = 2099-12-31
reason = \"no IPv4-mapped addresses reach net/netip\"
"
    ))
    .await?;
    let id = h.create_run(|_| {}).await?;
    h.put_report(&fixture("criticals.json")?).await?;
    h.scan_ok(&id).await?;
    let verdict = json!({
        "passed": true, "threshold": "critical", "counts": counts(3, 2, 4, 2),
        "blocking": [],
        "allowed": [
            {"finding": expat_45491(), "reason": "expat is unreachable: the service parses no XML", "expires": "2099-12-31"},
            {"finding": expat_45492(), "reason": "same expat, same reasoning", "expires": "2099-06-30"},
            {"finding": stdlib_24790(), "reason": "no IPv4-mapped addresses reach net/netip", "expires": "2099-12-31"},
        ],
        "ignored_unfixed": 0, "expired_allow": [],
        "summary": "passed: 3 findings at or above critical, none blocking; 3 allowed",
    });
    assert_passed(&h, &id, &verdict).await?;
    assert!(h.names("apps/").await?.is_empty());
    h.assert_quiet(&["policy"], "allowed").await
}

#[tokio::test]
async fn an_allow_list_entry_for_another_app_does_not_apply() -> Result<()> {
    let h = Harness::new(&format!(
        "{ALLOW_CONFIG_HEAD}
[[scan.allow]]
id = \"CVE-2024-45491\"
expires = 2099-12-31
reason = \"r1\"

[[scan.allow]]
id = \"CVE-2024-45492\"
expires = 2099-12-31
reason = \"r2\"

[[scan.allow]]
id = \"CVE-2024-24790\"
apps = [\"api\"]
expires = 2099-12-31
reason = \"only api is unaffected\"
"
    ))
    .await?;
    let id = h.create_run(|_| {}).await?;
    h.put_report(&fixture("criticals.json")?).await?;
    h.scan_ok(&id).await?;
    let summary = "blocked: 1 critical at or above critical (CVE-2024-24790); 2 allowed";
    let details = json!({
        "passed": false, "threshold": "critical", "counts": counts(3, 2, 4, 2),
        "blocking": [stdlib_24790()],
        "allowed": [
            {"finding": expat_45491(), "reason": "r1", "expires": "2099-12-31"},
            {"finding": expat_45492(), "reason": "r2", "expires": "2099-12-31"},
        ],
        "ignored_unfixed": 0, "expired_allow": [], "summary": summary,
    });
    assert_blocked(&h, &id, summary, &details).await?;
    assert_eq!(h.alerts().await?.len(), 1, "no expiry warning");
    h.assert_quiet(&["alerts"], "scoped allow").await
}

#[tokio::test]
async fn an_expired_allow_list_entry_does_not_apply_and_warns_once() -> Result<()> {
    let h = Harness::new(&format!(
        "{ALLOW_CONFIG_HEAD}
[[scan.allow]]
id = \"CVE-2024-45491\"
apps = [\"web\"]
expires = 2020-01-31
reason = \"accepted until the 2.6.3 rebuild\"

[[scan.allow]]
id = \"CVE-2024-45492\"
expires = 2099-12-31
reason = \"r2\"

[[scan.allow]]
id = \"CVE-2024-24790\"
expires = 2099-12-31
reason = \"r3\"
"
    ))
    .await?;
    let id = h.create_run(|_| {}).await?;
    h.put_report(&fixture("criticals.json")?).await?;
    h.scan_ok(&id).await?;
    let summary = "blocked: 1 critical at or above critical (CVE-2024-45491); 2 allowed; \
                   expired allow-list entry: CVE-2024-45491";
    let details = json!({
        "passed": false, "threshold": "critical", "counts": counts(3, 2, 4, 2),
        "blocking": [expat_45491()],
        "allowed": [
            {"finding": expat_45492(), "reason": "r2", "expires": "2099-12-31"},
            {"finding": stdlib_24790(), "reason": "r3", "expires": "2099-12-31"},
        ],
        "ignored_unfixed": 0, "expired_allow": ["CVE-2024-45491"], "summary": summary,
    });
    assert_blocked(&h, &id, summary, &details).await?;
    let alerts = h.alerts().await?;
    assert_eq!(alerts.len(), 2, "{alerts:#?}");
    let expired: Vec<_> = alerts
        .iter()
        .filter(|(mid, _)| *mid == format!("{id}:alert:allow-expired"))
        .collect();
    assert_eq!(expired.len(), 1, "{alerts:#?}");
    assert_eq!(
        expired[0].1,
        json!({
            "kind": "allow-list-expired", "severity": "warning", "app": "web",
            "run_id": id.as_str(), "step": "scan", "digest": DIGEST,
            "reason": "expired allow-list entries no longer apply to web: CVE-2024-45491",
        })
    );
    h.assert_quiet(&["alerts"], "expired allow").await
}

// ---------------------------------------------------------------- pending

#[tokio::test]
async fn no_report_yet_is_pending_and_rechecks_with_backoff_until_it_arrives() -> Result<()> {
    let h = Harness::new("").await?;
    let id = h.create_run(|_| {}).await?;

    // What the host delivers next: the original message, then each recheck
    // once the queue's clock reaches its scheduled time.
    let mut body = request(&id, DIGEST, 1)?;
    let mut message_id = format!("{id}:scan:1");
    let mut lock = None;
    let mut first_started = None;
    for check in 1..=3u32 {
        let before = OffsetDateTime::now_utc();
        let (status, line) = h.deliver(&body, &message_id, 1).await?;
        let after = OffsetDateTime::now_utc();
        assert_eq!(status, StatusCode::OK, "{line}");
        if let Some(lock) = lock.take() {
            h.bus.complete(&lock).await?;
        }

        let run = h.run(&id).await?;
        assert_eq!(run.status, RunStatus::Scanning, "pending is not clean");
        let scan = step(&run, "scan")?;
        assert_eq!((scan.status, scan.attempts), (StepStatus::Running, 1));
        assert_eq!(scan.finished_at, None);
        let started = scan.started_at.context("started_at")?;
        match first_started {
            None => {
                assert!(before <= started && started <= after);
                first_started = Some(started);
            }
            Some(first) => assert_eq!(started, first, "max_wait counts from the first look"),
        }
        let at = parse_time(&scan.details["next_check"])?;
        assert_eq!(
            scan.details,
            json!({"pending": true, "checks": check, "next_check": rfc3339(at)?})
        );
        assert_eq!(
            scan.summary,
            Some(format!(
                "no results yet from Trivy (scans/{DIGEST}.trivy.json); check {check} at {}",
                rfc3339(at)?
            ))
        );
        // Exactly as gantry_scan::next_check decides, for a `now` between the
        // two instants that bracket the handler's clock read.
        let earliest = next_check(started, before, check - 1, MAX_WAIT).context("not due")?;
        let latest = next_check(started, after, check - 1, MAX_WAIT).context("not due")?;
        assert!(
            earliest <= at && at <= latest,
            "check {check}: {at} not in [{earliest}, {latest}]"
        );
        let delay = FIRST_DELAY * 2u32.pow(check - 1);
        let from_start = at - started;
        assert!(
            (from_start - delay).abs() < time::Duration::seconds(2),
            "check {check} at started_at + {from_start}, expected about {delay:?}"
        );

        let scans = h.bus.peek("scan").await;
        assert_eq!(scans.len(), 1, "{scans:#?}");
        let m: &MessageView = &scans[0];
        assert_eq!(m.message_id, format!("{id}:scan:1:recheck-{check}"));
        assert_eq!(m.state, MessageState::Scheduled);
        assert_eq!(m.scheduled_enqueue_time, Some(at));
        assert_eq!(
            serde_json::from_slice::<Value>(&request(&id, DIGEST, 1)?)?,
            { serde_json::from_str::<Value>(&m.body)? }
        );
        assert_eq!(
            m.properties.get("run-id").map(String::as_str),
            Some(id.as_str())
        );
        assert!(!h.exists(&format!("scans/{DIGEST}.json")).await?);
        assert!(h.names("apps/").await?.is_empty());
        h.assert_quiet(&["scan"], "pending").await?;

        // Not deliverable before its time; deliverable at it.
        ensure!(h.bus.receive("scan").await?.is_none(), "delivered early");
        h.clock.set(at + time::Duration::seconds(1));
        let received = h.bus.receive("scan").await?.context("recheck due")?;
        assert_eq!(received.message_id, m.message_id);
        message_id = received.message_id.clone();
        body = received.body.clone();
        lock = Some(received.lock);
    }

    // CI uploads the report; the next recheck finds it and passes.
    h.put_report(&fixture("clean.json")?).await?;
    let (status, line) = h.deliver(&body, &message_id, 1).await?;
    assert_eq!(status, StatusCode::OK, "{line}");
    if let Some(lock) = lock.take() {
        h.bus.complete(&lock).await?;
    }
    let run = h.run(&id).await?;
    assert_eq!(run.status, RunStatus::CheckingPolicy);
    assert_eq!(step(&run, "scan")?.started_at, first_started);
    assert_eq!(h.bus.peek("policy").await.len(), 1);
    h.assert_quiet(&["policy"], "found after rechecks").await
}

#[tokio::test]
async fn no_results_within_max_wait_fail_closed() -> Result<()> {
    let h = Harness::new("").await?;
    let started = OffsetDateTime::now_utc() - time::Duration::hours(4) - time::Duration::minutes(1);
    let id = h
        .create_run(|run| {
            if let Some(scan) = run.steps.get_mut("scan") {
                scan.status = StepStatus::Running;
                scan.started_at = Some(started);
                scan.details = json!({"pending": true, "checks": 19, "next_check": "x"});
            }
        })
        .await?;
    let line = h.scan_ok(&id).await?;
    let summary = format!(
        "no scan results from Trivy (scans/{DIGEST}.trivy.json) within max_wait 14400s: failing closed"
    );
    assert_eq!(line, format!("run {id}: blocked: {summary}"));
    assert_blocked(&h, &id, &summary, &json!({"pending": true, "checks": 19})).await?;
    assert!(!h.exists(&format!("scans/{DIGEST}.json")).await?);
    h.assert_quiet(&["alerts"], "failed closed").await
}

#[tokio::test]
async fn a_short_max_wait_checks_once_at_the_deadline_then_fails_closed() -> Result<()> {
    let h = Harness::new("\n[apps.scan]\nmax_wait = \"1s\"\n").await?;
    let id = h.create_run(|_| {}).await?;
    h.scan_ok(&id).await?;
    let run = h.run(&id).await?;
    let scan = step(&run, "scan")?;
    let started = scan.started_at.context("started_at")?;
    let deadline = started + time::Duration::seconds(1);
    // The backoff (1 min) is capped at the deadline: the last check is exactly there.
    assert_eq!(parse_time(&scan.details["next_check"])?, deadline);
    let scans = h.bus.peek("scan").await;
    assert_eq!(scans.len(), 1, "{scans:#?}");
    assert_eq!(scans[0].message_id, format!("{id}:scan:1:recheck-1"));
    assert_eq!(scans[0].scheduled_enqueue_time, Some(deadline));
    assert_eq!(run.status, RunStatus::Scanning);

    // The check at the deadline still finds nothing: blocked.
    let wait = deadline - OffsetDateTime::now_utc() + time::Duration::milliseconds(50);
    if wait.is_positive() {
        tokio::time::sleep(Duration::try_from(wait)?).await;
    }
    h.clock.set(deadline + time::Duration::milliseconds(10));
    let received = h.bus.receive("scan").await?.context("recheck due")?;
    let (status, line) = h
        .deliver(
            &received.body,
            &received.message_id,
            received.delivery_count,
        )
        .await?;
    assert_eq!(status, StatusCode::OK, "{line}");
    h.bus.complete(&received.lock).await?;
    let summary = format!(
        "no scan results from Trivy (scans/{DIGEST}.trivy.json) within max_wait 1s: failing closed"
    );
    assert_blocked(&h, &id, &summary, &json!({"pending": true, "checks": 1})).await?;
    assert_eq!(step(&h.run(&id).await?, "scan")?.started_at, Some(started));
    h.assert_quiet(&["alerts"], "short max_wait").await
}

// ---------------------------------------------------------------- unusable reports

#[tokio::test]
async fn a_malformed_report_fails_the_run_naming_report_and_line() -> Result<()> {
    let h = Harness::new("").await?;
    let id = h.create_run(|_| {}).await?;
    h.put_report(&fixture("malformed.json")?).await?;
    let (status, line) = h.scan(&id, 1, 1).await?;
    assert_eq!(status, StatusCode::OK, "acknowledged, not retried: {line}");
    let summary = format!(
        "parsing Trivy report scans/{DIGEST}.trivy.json: line 14, column 11: expected `,` or `}}`"
    );
    assert_eq!(line, format!("run {id}: failed: {summary}"));
    assert_failed(&h, &id, &summary).await?;
    assert!(
        h.names("rejected/").await?.is_empty(),
        "failed, not rejected"
    );

    // A redelivery changes nothing.
    let snapshot = h.snapshot().await?;
    let (status, _) = h.scan(&id, 1, 2).await?;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(h.snapshot().await?, snapshot);
    h.assert_quiet(&["alerts"], "malformed, redelivered").await
}

#[tokio::test]
async fn a_report_for_another_digest_fails_the_run_naming_both() -> Result<()> {
    let h = Harness::new("").await?;
    let id = h.create_run(|_| {}).await?;
    h.put_report(&fixture("wrong-digest.json")?).await?;
    let (status, line) = h.scan(&id, 1, 1).await?;
    assert_eq!(status, StatusCode::OK, "{line}");
    let summary = format!(
        "verifying Trivy report scans/{DIGEST}.trivy.json: it is for [\"{OTHER_DIGEST}\"], not {DIGEST}"
    );
    assert_failed(&h, &id, &summary).await
}

// ---------------------------------------------------------------- stale and foreign messages

/// Delivers `body` as `message_id` and expects it rejected with `reason`:
/// 200, a `rejected/scan-check/...` record, a warning alert, and the store
/// otherwise untouched.
async fn assert_rejected(h: &Harness, body: &[u8], message_id: &str, reason: &str) -> Result<()> {
    let runs_before: Vec<_> = h
        .snapshot()
        .await?
        .into_iter()
        .filter(|(name, _)| name.starts_with("runs/") || name.starts_with("index/"))
        .collect();
    let (status, line) = h.deliver(body, message_id, 1).await?;
    assert_eq!(status, StatusCode::OK, "{line}");
    assert_eq!(line, format!("rejected: {reason}"));
    let key = gantry_pipeline::names::event_key(message_id);
    let name = format!("rejected/scan-check/{key}.json");
    let record = h.blob(&name).await?;
    assert_eq!(record["function"], "scan-check");
    assert_eq!(record["message_id"], message_id);
    assert_eq!(record["reason"], reason);
    assert_eq!(record["payload"], String::from_utf8(body.to_vec())?);
    let alerts = h.alerts().await?;
    assert!(
        alerts
            .iter()
            .any(|(mid, a)| *mid == format!("rejected:scan-check:{key}")
                && a["kind"] == "message-rejected"
                && a["severity"] == "warning"),
        "{alerts:#?}"
    );
    let runs_after: Vec<_> = h
        .snapshot()
        .await?
        .into_iter()
        .filter(|(name, _)| name.starts_with("runs/") || name.starts_with("index/"))
        .collect();
    assert_eq!(runs_after, runs_before, "a rejected message changed a run");
    assert!(h.names("apps/").await?.is_empty());
    assert!(
        h.names("scans/")
            .await?
            .iter()
            .all(|n| n.ends_with(".trivy.json"))
    );
    Ok(())
}

#[tokio::test]
async fn foreign_messages_are_rejected_and_recorded() -> Result<()> {
    let h = Harness::new("").await?;
    let id = h.create_run(|_| {}).await?;
    h.put_report(&fixture("clean.json")?).await?;

    // The message names another digest than the run's.
    assert_rejected(
        &h,
        &request(&id, OTHER_DIGEST, 1)?,
        &format!("{id}:scan:1"),
        &format!(
            "scan request for run {id}: message digest {OTHER_DIGEST} is not the run's {DIGEST}"
        ),
    )
    .await?;
    let run = h.run(&id).await?;
    assert_eq!(run.status, RunStatus::Scanning);
    assert_eq!(step(&run, "scan")?, &Step::pending(1), "not even started");

    // A run that does not exist.
    let ghost = gantry_pipeline::ids::new_run_id(1_764_237_600_000);
    assert_rejected(
        &h,
        &request(&ghost, DIGEST, 1)?,
        "ghost-1",
        &format!("scan request for run {ghost}: no such run"),
    )
    .await?;

    // An app gantry.toml does not know.
    let body = serde_json::to_vec(&json!({
        "app": "api", "run_id": id.as_str(), "digest": DIGEST, "attempt": 1,
    }))?;
    assert_rejected(
        &h,
        &body,
        "api-1",
        &format!("scan request for run {id}: app api is not configured"),
    )
    .await?;

    // Not a step request at all.
    let body = br#"{"app": "web", "run_id": "nope"}"#;
    let (status, line) = h.deliver(body, "garbage-1", 1).await?;
    assert_eq!(status, StatusCode::OK, "{line}");
    assert!(
        line.starts_with("rejected: bad message: scan request:"),
        "{line}"
    );
    assert!(h.exists("rejected/scan-check/garbage-1.json").await?);

    assert_eq!(h.run(&id).await?, run, "the run was never touched");
    h.assert_quiet(&["alerts"], "foreign").await
}

#[tokio::test]
async fn a_run_without_an_image_is_rejected() -> Result<()> {
    let h = Harness::new("").await?;
    let id = h.create_run(|run| run.image = None).await?;
    assert_rejected(
        &h,
        &request(&id, DIGEST, 1)?,
        "no-image-1",
        &format!("scan request for run {id}: the run has no image"),
    )
    .await?;
    h.assert_quiet(&["alerts"], "no image").await
}

/// A change to a freshly built run.
type Edit = Box<dyn Fn(&mut Run)>;

#[tokio::test]
async fn stale_messages_for_runs_that_moved_on_change_nothing() -> Result<()> {
    let finished = |status: StepStatus| {
        let mut s = Step::finished(status, OffsetDateTime::now_utc(), "earlier verdict");
        s.details = json!({"passed": status == StepStatus::Passed});
        s
    };
    let cases: Vec<(&str, Edit)> = vec![
        (
            "run blocked",
            Box::new(move |run: &mut Run| {
                run.status = RunStatus::Blocked;
                run.steps
                    .insert("scan".into(), finished(StepStatus::Blocked));
            }),
        ),
        (
            "scan passed, policy running",
            Box::new(move |run: &mut Run| {
                run.status = RunStatus::CheckingPolicy;
                run.steps
                    .insert("scan".into(), finished(StepStatus::Passed));
                let mut policy = Step::pending(1);
                policy.status = StepStatus::Running;
                policy.started_at = Some(OffsetDateTime::now_utc());
                run.steps.insert("policy".into(), policy);
            }),
        ),
        (
            "scan passed, run deploying",
            Box::new(move |run: &mut Run| {
                run.status = RunStatus::Deploying;
                run.steps
                    .insert("scan".into(), finished(StepStatus::Passed));
                run.steps
                    .insert("policy".into(), finished(StepStatus::Passed));
                run.steps.insert("deploy".into(), Step::pending(1));
            }),
        ),
        (
            "scan failed",
            Box::new(move |run: &mut Run| {
                run.status = RunStatus::Failed;
                run.steps
                    .insert("scan".into(), finished(StepStatus::Failed));
            }),
        ),
        (
            "a newer scan attempt is pending",
            Box::new(move |run: &mut Run| {
                run.steps.insert("scan".into(), Step::pending(2));
            }),
        ),
    ];
    for (what, edit) in cases {
        let h = Harness::new("").await?;
        let id = h.create_run(|run| edit(run)).await?;
        // Even a report that would block is not looked at.
        h.put_report(&fixture("criticals.json")?).await?;
        let snapshot = h.snapshot().await?;
        let (status, line) = h.scan(&id, 1, 1).await?;
        assert_eq!(status, StatusCode::OK, "{what}: {line}");
        assert_eq!(h.snapshot().await?, snapshot, "{what}: store changed");
        if what == "run blocked" || what == "scan failed" {
            // A finished bad outcome repeats only its alert (the previous
            // delivery may have failed after recording); its MessageId is the
            // one the first delivery used, so a broker drops the repeat.
            assert!(line.contains("alert repeated"), "{what}: {line}");
            let alerts = h.bus.peek("alerts").await;
            assert_eq!(alerts.len(), 1, "{what}: {alerts:#?}");
            let key = if what == "run blocked" {
                "scan-blocked"
            } else {
                "scan-failed"
            };
            assert_eq!(alerts[0].message_id, format!("{id}:alert:{key}"));
            continue;
        }
        assert!(line.contains("nothing to do"), "{what}: {line}");
        h.assert_quiet(&[], what).await?;
    }
    Ok(())
}

// ---------------------------------------------------------------- transient failures

#[tokio::test]
async fn a_transient_store_failure_is_retried_until_the_scan_passes_once() -> Result<()> {
    // Writes of a passing scan: 0 start the step, 1 the scan record, 2 pass the run.
    for skip in 0..3 {
        let h = Harness::new("").await?;
        let id = h.create_run(|_| {}).await?;
        h.put_report(&fixture("clean.json")?).await?;
        h.store.fail_writes(skip, 1);
        let (status, line) = h.scan(&id, 1, 1).await?;
        assert_eq!(
            status,
            StatusCode::SERVICE_UNAVAILABLE,
            "write {skip}: {line}"
        );
        assert!(line.starts_with("transient:"), "{line}");
        assert_eq!(h.run(&id).await?.status, RunStatus::Scanning);
        assert!(h.names("rejected/").await?.is_empty(), "not a rejection");
        h.assert_quiet(&[], "after the failure").await?;

        let (status, line) = h.scan(&id, 1, 2).await?;
        assert_eq!(status, StatusCode::OK, "write {skip}: {line}");
        let run = h.run(&id).await?;
        assert_eq!(run.status, RunStatus::CheckingPolicy, "write {skip}");
        assert_eq!(step(&run, "scan")?.status, StepStatus::Passed);
        let policies = h.bus.peek("policy").await;
        assert_eq!(policies.len(), 1, "write {skip}: {policies:#?}");
        assert_eq!(policies[0].message_id, format!("{id}:policy:1"));
        assert_eq!(h.audit("step.scan.passed").await?.len(), 1);
        h.assert_quiet(&["policy"], "recovered").await?;
    }
    Ok(())
}

#[tokio::test]
async fn a_transient_store_failure_while_blocking_still_blocks_once() -> Result<()> {
    // Writes of a block: 0 start, 1 scan record, 2 blocked digest, 3 the run.
    for skip in 0..4 {
        let h = Harness::new("").await?;
        let id = h.create_run(|_| {}).await?;
        h.put_report(&fixture("criticals.json")?).await?;
        h.store.fail_writes(skip, 1);
        let (status, line) = h.scan(&id, 1, 1).await?;
        assert_eq!(
            status,
            StatusCode::SERVICE_UNAVAILABLE,
            "write {skip}: {line}"
        );
        assert_eq!(h.run(&id).await?.status, RunStatus::Scanning);
        h.assert_quiet(&[], "after the failure").await?;

        let (status, line) = h.scan(&id, 1, 2).await?;
        assert_eq!(status, StatusCode::OK, "write {skip}: {line}");
        let run = h.run(&id).await?;
        assert_eq!(run.status, RunStatus::Blocked, "write {skip}");
        assert!(h.exists(&format!("apps/web/blocked/{DIGEST}")).await?);
        let alerts = h.alerts().await?;
        assert_eq!(alerts.len(), 1, "write {skip}: {alerts:#?}");
        assert_eq!(alerts[0].0, format!("{id}:alert:scan-blocked"));
        h.assert_quiet(&["alerts"], "recovered").await?;
    }
    Ok(())
}

#[tokio::test]
async fn a_failed_policy_send_is_repaired_by_the_redelivery() -> Result<()> {
    let h = Harness::new("").await?;
    let id = h.create_run(|_| {}).await?;
    h.put_report(&fixture("clean.json")?).await?;
    // The run is recorded as passed, then queueing `policy` fails.
    h.flaky_bus.fail_sends("policy", 1);
    let (status, line) = h.scan(&id, 1, 1).await?;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{line}");
    assert!(line.starts_with("transient:"), "{line}");
    let run = h.run(&id).await?;
    assert_eq!(run.status, RunStatus::CheckingPolicy);
    assert_eq!(step(&run, "scan")?.status, StepStatus::Passed);
    assert_eq!(h.bus.stats("policy").await, QueueStats::default());

    // The host redelivers: the run already waits for policy, so the hand-off
    // is repeated (not skipped), without touching the run again.
    let snapshot = h.snapshot().await?;
    let (status, line) = h.scan(&id, 1, 2).await?;
    assert_eq!(status, StatusCode::OK, "{line}");
    assert_eq!(h.snapshot().await?, snapshot);
    let policies = h.bus.peek("policy").await;
    assert_eq!(policies.len(), 1, "{policies:#?}");
    assert_eq!(policies[0].message_id, format!("{id}:policy:1"));
    assert_eq!(
        serde_json::from_str::<Value>(&policies[0].body)?,
        json!({"app": "web", "run_id": id.as_str(), "digest": DIGEST, "attempt": 1})
    );
    // And once more: still one message.
    let (status, _) = h.scan(&id, 1, 3).await?;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(h.bus.peek("policy").await.len(), 1);
    h.assert_quiet(&["policy"], "repaired").await
}

// ---------------------------------------------------------------- trivy_dir (gantry dev)

async fn trivy_dir_harness() -> Result<Harness> {
    Harness::build(|dir| {
        format!(
            "\n[scan]\ntrivy_dir = \"{}\"\n",
            dir.join("reports").display()
        )
    })
    .await
}

fn write_disk_report(h: &Harness, body: &[u8]) -> Result<String> {
    let dir = h.dir.path().join("reports");
    std::fs::create_dir_all(&dir)?;
    let path = dir.join(format!("{DIGEST}.trivy.json"));
    std::fs::write(&path, body)?;
    Ok(path.display().to_string())
}

#[tokio::test]
async fn a_report_in_trivy_dir_is_found_and_evaluated() -> Result<()> {
    let h = trivy_dir_harness().await?;
    let id = h.create_run(|_| {}).await?;
    let path = write_disk_report(&h, &fixture("criticals.json")?)?;
    h.scan_ok(&id).await?;
    let run = h.run(&id).await?;
    assert_eq!(run.status, RunStatus::Blocked);
    let record = h.blob(&format!("scans/{DIGEST}.json")).await?;
    assert_eq!(record["origin"], path);
    assert_eq!(record["verdict"], step(&run, "scan")?.details);
    assert_eq!(record["verdict"]["counts"], counts(3, 2, 4, 2));
    assert!(!h.exists(&format!("scans/{DIGEST}.trivy.json")).await?);
    Ok(())
}

#[tokio::test]
async fn the_stored_report_wins_over_trivy_dir() -> Result<()> {
    let h = trivy_dir_harness().await?;
    let id = h.create_run(|_| {}).await?;
    write_disk_report(&h, &fixture("criticals.json")?)?;
    h.put_report(&fixture("clean.json")?).await?;
    h.scan_ok(&id).await?;
    assert_eq!(h.run(&id).await?.status, RunStatus::CheckingPolicy);
    let record = h.blob(&format!("scans/{DIGEST}.json")).await?;
    assert_eq!(record["origin"], format!("scans/{DIGEST}.trivy.json"));
    Ok(())
}

#[tokio::test]
async fn a_malformed_report_in_trivy_dir_names_the_file() -> Result<()> {
    let h = trivy_dir_harness().await?;
    let id = h.create_run(|_| {}).await?;
    let path = write_disk_report(&h, &fixture("malformed.json")?)?;
    h.scan_ok(&id).await?;
    assert_failed(
        &h,
        &id,
        &format!("parsing Trivy report {path}: line 14, column 11: expected `,` or `}}`"),
    )
    .await
}

#[tokio::test]
async fn an_empty_trivy_dir_is_pending() -> Result<()> {
    let h = trivy_dir_harness().await?;
    let id = h.create_run(|_| {}).await?;
    h.scan_ok(&id).await?;
    let run = h.run(&id).await?;
    assert_eq!(run.status, RunStatus::Scanning);
    assert_eq!(step(&run, "scan")?.details["checks"], 1);
    assert_eq!(h.bus.stats("scan").await.scheduled, 1);
    Ok(())
}
