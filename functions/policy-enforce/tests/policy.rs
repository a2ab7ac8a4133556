//! `policy-enforce` invoked through the custom-handler envelope (`POST
//! /policy-enforce`), exactly as the Functions host (or `gantry dev`) invokes
//! it, with the embedded on-disk store and the embedded queue. Each test
//! records a run that waits for the policy gate directly in the store, then
//! delivers the `policy` message scan-check would have sent.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result, ensure};
use axum::Router;
use axum::body::Body;
use gantry_bus::{EmbeddedBus, MessageView, QUEUES, QueueOptions};
use gantry_pipeline::{
    Config, Digest, Run, RunStatus, RunStore, Source, Step, StepRequest, StepStatus,
};
use gantry_runtime::{Deps, Secrets};
use gantry_store::StateStore;
use gantry_store::fs::FsStore;
use gantry_testkit::bus::FlakyBus;
use gantry_testkit::fixtures::{self, DIGEST, SHA};
use http::{Request, StatusCode};
use http_body_util::BodyExt;
use serde_json::{Value, json};
use time::OffsetDateTime;
use tower::ServiceExt;

const OTHER_DIGEST: &str =
    "sha256:1111111111111111111111111111111111111111111111111111111111111111";
const SCAN_SUMMARY: &str = "trivy: 0 critical, 0 high, 3 medium (threshold high)";

const EXAMPLE_POLICIES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../examples/policies");
const EXAMPLE_TEMPLATE: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../../examples/policies/required-labels/template.yaml"
);
const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures");

/// What the configuration of one test says.
struct Setup<'a> {
    builtin: bool,
    folder: Option<&'a Path>,
    require_approval: bool,
}

impl Default for Setup<'_> {
    fn default() -> Self {
        Setup {
            builtin: true,
            folder: None,
            require_approval: false,
        }
    }
}

struct Harness {
    _dir: tempfile::TempDir,
    store: Arc<FsStore>,
    bus: EmbeddedBus,
    flaky: Arc<FlakyBus>,
    runs: RunStore,
    config: Arc<Config>,
    router: Router,
}

impl Harness {
    /// A fresh store, queue and `Deps` (so a fresh policy-set cache).
    async fn new(setup: Setup<'_>) -> Result<Harness> {
        let dir = tempfile::tempdir()?;
        let store = Arc::new(FsStore::open(dir.path().join("store"))?);
        let bus = EmbeddedBus::open(dir.path().join("bus"), QueueOptions::default()).await?;
        let flaky = Arc::new(FlakyBus::new(bus.clone()));
        let mut text = format!(
            "[[apps]]\nname = \"web\"\nrepo = \"contoso/web\"\nimage = \"contoso.azurecr.io/web\"\nrequire_approval = {}\n\n[policy]\nbuiltin = {}\n",
            setup.require_approval, setup.builtin
        );
        if let Some(folder) = setup.folder {
            ensure!(folder.is_absolute(), "{folder:?}");
            text.push_str(&format!("folder = {:?}\n", folder.display().to_string()));
        }
        let config = Arc::new(Config::parse(&text, "test.toml")?);
        let runs = RunStore::new(store.clone());
        let deps = Deps {
            runs: runs.clone(),
            bus: flaky.clone(),
            config: config.clone(),
            secrets: Secrets::default(),
            services: Default::default(),
        };
        let router = gantry_runtime::app(Arc::new(deps), &[fn_policy_enforce::function()]);
        Ok(Harness {
            _dir: dir,
            store,
            bus,
            flaky,
            runs,
            config,
            router,
        })
    }

    /// Stores `run` as the previous steps left it.
    async fn record(&self, run: &Run) -> Result<()> {
        ensure!(
            self.runs.create(run).await?,
            "run {} already existed",
            run.id
        );
        Ok(())
    }

    /// Delivers a `policy` message for `run` (MessageId `{run}:policy:{attempt}`).
    async fn policy(
        &self,
        run: &Run,
        digest: &str,
        attempt: u32,
        delivery_count: u32,
    ) -> Result<(StatusCode, String)> {
        let request = StepRequest {
            app: run.app.clone(),
            run_id: run.id.clone(),
            digest: Digest::parse(digest)?,
            attempt,
            phase: None,
        };
        let body = serde_json::to_vec(&request)?;
        let envelope = gantry_runtime::envelope::host_request_for_message(
            "message",
            false,
            &body,
            &request.message_id("policy"),
            delivery_count,
            None,
            "2026-11-27T10:03:48.1234567Z",
            &BTreeMap::new(),
        );
        let request = Request::post("/policy-enforce")
            .header("content-type", "application/json")
            .body(Body::from(serde_json::to_vec(&envelope)?))?;
        let response = self.router.clone().oneshot(request).await?;
        let status = response.status();
        let bytes = response.into_body().collect().await?.to_bytes();
        let reply: Value = serde_json::from_slice(&bytes)
            .with_context(|| format!("{status}: not JSON: {}", String::from_utf8_lossy(&bytes)))?;
        ensure!(
            reply["Outputs"] == json!({}) && reply["ReturnValue"].is_null(),
            "not the custom-handler reply shape: {reply}"
        );
        let logs = reply["Logs"].as_array().context("Logs")?;
        ensure!(logs.len() == 1, "{reply}");
        Ok((status, logs[0].as_str().context("log line")?.to_string()))
    }

    /// Delivers the first `policy` message for `run` and expects 200.
    async fn policy_ok(&self, run: &Run) -> Result<String> {
        let (status, line) = self.policy(run, DIGEST, 1, 1).await?;
        ensure!(status == StatusCode::OK, "{status}: {line}");
        Ok(line)
    }

    async fn run(&self, run: &Run) -> Result<Run> {
        self.runs.get(&run.app, &run.id).await?.context("run gone")
    }

    /// Every blob and its bytes.
    async fn snapshot(&self) -> Result<BTreeMap<String, Vec<u8>>> {
        let mut out = BTreeMap::new();
        for name in self.runs.list_all("").await? {
            let blob = self.store.get(&name).await?.context("listed blob gone")?;
            out.insert(name, blob.body);
        }
        Ok(out)
    }

    async fn blob(&self, name: &str) -> Result<Option<Value>> {
        match self.store.get(name).await? {
            Some(v) => Ok(Some(serde_json::from_slice(&v.body)?)),
            None => Ok(None),
        }
    }

    async fn messages(&self, queue: &str) -> Vec<MessageView> {
        self.bus.peek(queue).await
    }

    /// Every queue not in `except` is empty.
    async fn assert_quiet(&self, except: &[&str]) -> Result<()> {
        for queue in QUEUES.iter().filter(|q| !except.contains(q)) {
            let held = self.messages(queue).await;
            ensure!(held.is_empty(), "queue {queue} holds {held:#?}");
        }
        Ok(())
    }

    /// Audit entries with `action`.
    async fn audit(&self, action: &str) -> Result<Vec<Value>> {
        let mut found = Vec::new();
        for name in self.runs.list_all("audit/").await? {
            let blob = self.store.get(&name).await?.context("audit blob")?;
            for line in String::from_utf8(blob.body)?.lines() {
                let entry: Value = serde_json::from_str(line)?;
                if entry["action"] == action {
                    found.push(entry);
                }
            }
        }
        Ok(found)
    }

    /// The one alert in `alerts`, which must have MessageId `id`.
    async fn only_alert(&self, id: &str) -> Result<Value> {
        let alerts = self.messages("alerts").await;
        ensure!(alerts.len() == 1, "{alerts:#?}");
        ensure!(alerts[0].message_id == id, "{alerts:#?}");
        Ok(serde_json::from_str(&alerts[0].body)?)
    }
}

/// A run of `web` for [`DIGEST`] that waits for the policy gate, as
/// scan-check leaves it: status `checking-policy`, `scan` passed, `policy`
/// pending attempt 1.
fn waiting_run(commit: Option<&str>) -> Result<Run> {
    let source = match commit {
        Some(sha) => fixtures::github_source("web", sha)?,
        // An image pushed without a GitHub push still names its repository.
        None => Source {
            repo: Some("contoso/web".into()),
            ..fixtures::registry_source()
        },
    };
    let run = fixtures::run_at(
        "web",
        RunStatus::CheckingPolicy,
        source,
        OffsetDateTime::now_utc(),
    )?;
    let mut run = fixtures::with_image(run, DIGEST)?;
    fixtures::passed(&mut run, "scan", SCAN_SUMMARY, Value::Null);
    run.steps.insert("policy".into(), Step::pending(1));
    Ok(run)
}

/// A policy folder in a temporary directory: the given files, each `(name, text)`.
fn folder(files: &[(&str, &str)]) -> Result<tempfile::TempDir> {
    let dir = tempfile::tempdir()?;
    for (name, text) in files {
        let path = dir.path().join(name);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)?;
        }
        std::fs::write(path, text)?;
    }
    Ok(dir)
}

fn example_template() -> Result<String> {
    std::fs::read_to_string(EXAMPLE_TEMPLATE).context(EXAMPLE_TEMPLATE)
}

fn fixture(path: &str) -> PathBuf {
    Path::new(FIXTURES).join(path)
}

/// A K8sRequiredLabels constraint on Deployments requiring `owner`, with
/// `spec` lines added (indented two spaces).
fn require_owner(name: &str, extra_spec: &str) -> String {
    format!(
        "apiVersion: constraints.gatekeeper.sh/v1beta1\nkind: K8sRequiredLabels\nmetadata:\n  name: {name}\nspec:\n{extra_spec}  parameters:\n    labels: [\"owner\"]\n"
    )
}

const DEPLOYMENTS: &str =
    "  match:\n    kinds:\n      - apiGroups: [\"apps\"]\n        kinds: [\"Deployment\"]\n";

fn step<'a>(run: &'a Run, name: &str) -> Result<&'a Step> {
    run.steps
        .get(name)
        .with_context(|| format!("no step {name}: {run:#?}"))
}

/// The `deploy` message the gate must send for `run`, exactly.
fn assert_deploy_message(messages: &[MessageView], run: &Run) -> Result<()> {
    ensure!(messages.len() == 1, "{messages:#?}");
    let m = &messages[0];
    assert_eq!(m.message_id, format!("{}:deploy:1", run.id));
    assert_eq!(m.session_id.as_deref(), Some("web"));
    assert_eq!(
        serde_json::from_str::<Value>(&m.body)?,
        json!({"app": "web", "run_id": run.id, "digest": DIGEST, "attempt": 1})
    );
    assert_eq!(m.properties.get("run-id"), Some(&run.id.to_string()));
    assert_eq!(m.properties.get("app").map(String::as_str), Some("web"));
    Ok(())
}

#[tokio::test]
async fn a_compliant_app_passes_and_is_handed_to_deploy_once() -> Result<()> {
    let examples = Path::new(EXAMPLE_POLICIES).canonicalize()?;
    let h = Harness::new(Setup {
        folder: Some(&examples),
        ..Setup::default()
    })
    .await?;
    let run = waiting_run(Some(SHA))?;
    h.record(&run).await?;

    let line = h.policy_ok(&run).await?;
    assert!(
        line.contains("policy passed") && line.contains("deploy queued"),
        "{line}"
    );

    let set = gantry_policy::PolicySet::load(true, Some(&examples))?;
    let (templates, constraints) = (set.templates().len(), set.constraints());
    assert!(
        set.templates().contains(&"k8srequiredlabels") && constraints >= 2,
        "built-ins and the example folder: {set:?}"
    );

    let stored = h.run(&run).await?;
    assert_eq!(stored.status, RunStatus::Deploying);
    let policy = step(&stored, "policy")?;
    assert_eq!((policy.status, policy.attempts), (StepStatus::Passed, 1));
    assert!(policy.started_at.is_some() && policy.finished_at.is_some());
    assert_eq!(
        policy.summary.as_deref(),
        Some(
            format!("{constraints} constraint(s) from {templates} template(s): no violations")
                .as_str()
        )
    );
    let hash = policy.details["manifest_hash"]
        .as_str()
        .context("manifest_hash")?;
    assert!(
        hash.len() == 64
            && hash
                .bytes()
                .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()),
        "{hash}"
    );
    let app = h.config.app("web").context("app")?;
    let rendered = gantry_manifests::render(&gantry_manifests::RenderInput {
        app,
        digest: &Digest::parse(DIGEST)?,
        registry_image: "contoso.azurecr.io/web",
        run_id: Some(&run.id),
        commit: run.source.commit.as_ref(),
        verdicts: Some(SCAN_SUMMARY),
    })?;
    assert_eq!(hash, rendered.hash);
    assert_eq!(
        policy.details,
        json!({
            "templates": templates,
            "constraints": constraints,
            "manifest_hash": rendered.hash,
            "violations": [],
            "warnings": [],
        })
    );
    let deploy = step(&stored, "deploy")?;
    assert_eq!(*deploy, Step::pending(1));
    assert_eq!(
        stored.steps.get("scan"),
        run.steps.get("scan"),
        "scan untouched"
    );
    assert!(!stored.steps.contains_key("approval"));
    assert_eq!(stored.image, run.image);

    assert_deploy_message(&h.messages("deploy").await, &run)?;
    h.assert_quiet(&["deploy"]).await?;
    assert_eq!(h.audit("step.policy.passed").await?.len(), 1);
    assert!(
        h.blob(&format!("apps/web/blocked/{DIGEST}"))
            .await?
            .is_none()
    );

    // The same message again: acknowledged, the record is not touched and the
    // (re-)sent deploy message is dropped as a duplicate by its MessageId.
    let before = h.snapshot().await?;
    let (status, line) = h.policy(&run, DIGEST, 1, 2).await?;
    assert_eq!(status, StatusCode::OK, "{line}");
    assert!(line.contains("policy already passed"), "{line}");
    assert_eq!(h.snapshot().await?, before, "redelivery changed the store");
    assert_deploy_message(&h.messages("deploy").await, &run)?;
    h.assert_quiet(&["deploy"]).await
}

#[tokio::test]
async fn an_app_that_requires_approval_waits_for_it_without_a_deploy_message() -> Result<()> {
    let h = Harness::new(Setup {
        require_approval: true,
        ..Setup::default()
    })
    .await?;
    let run = waiting_run(Some(SHA))?;
    h.record(&run).await?;

    let line = h.policy_ok(&run).await?;
    assert!(line.contains("awaiting approval"), "{line}");

    let stored = h.run(&run).await?;
    assert_eq!(stored.status, RunStatus::AwaitingApproval);
    assert_eq!(step(&stored, "policy")?.status, StepStatus::Passed);
    let approval = step(&stored, "approval")?;
    assert_eq!(
        *approval,
        Step {
            started_at: approval.started_at,
            ..Step::pending(1)
        }
    );
    let started = approval.started_at.context("approval started_at")?;
    ensure!(
        (OffsetDateTime::now_utc() - started).whole_seconds().abs() < 60,
        "{started}"
    );
    assert!(!stored.steps.contains_key("deploy"), "{stored:#?}");
    h.assert_quiet(&[]).await?;

    // A redelivery does not send deploy either.
    let before = h.snapshot().await?;
    let (status, line) = h.policy(&run, DIGEST, 1, 2).await?;
    assert_eq!(status, StatusCode::OK, "{line}");
    assert_eq!(h.snapshot().await?, before);
    h.assert_quiet(&[]).await
}

#[tokio::test]
async fn a_violated_folder_constraint_blocks_the_run_and_the_digest() -> Result<()> {
    let policies = folder(&[
        ("required-labels/template.yaml", &example_template()?),
        (
            "required-labels/owner.yaml",
            &require_owner("deployments-have-an-owner", DEPLOYMENTS),
        ),
    ])?;
    let h = Harness::new(Setup {
        folder: Some(policies.path()),
        ..Setup::default()
    })
    .await?;
    let run = waiting_run(Some(SHA))?;
    h.record(&run).await?;

    let line = h.policy_ok(&run).await?;
    assert!(line.contains("blocked"), "{line}");

    let stored = h.run(&run).await?;
    assert_eq!(stored.status, RunStatus::Blocked);
    let policy = step(&stored, "policy")?;
    assert_eq!(policy.status, StepStatus::Blocked);
    assert!(policy.finished_at.is_some());
    let violations = policy.details["violations"]
        .as_array()
        .context("violations")?;
    assert_eq!(
        violations.len(),
        1,
        "built-ins pass, the folder does not: {violations:#?}"
    );
    let v = &violations[0];
    assert_eq!(v["template"], "k8srequiredlabels");
    assert_eq!(v["constraint"], "deployments-have-an-owner");
    assert_eq!(v["enforcement_action"], "deny");
    assert_eq!(v["kind"], "Deployment");
    assert_eq!(v["name"], "web");
    assert_eq!(v["namespace"], "web");
    let message = v["message"].as_str().context("message")?;
    assert!(
        message.starts_with("you must provide labels") && message.contains("owner"),
        "{message}"
    );
    assert_eq!(policy.details["warnings"], json!([]));
    assert_eq!(
        policy.summary.as_deref(),
        Some(
            format!("1 policy violation(s): [deployments-have-an-owner] Deployment web: {message}")
                .as_str()
        )
    );
    assert!(!stored.steps.contains_key("deploy"));

    let blocked = h
        .blob(&format!("apps/web/blocked/{DIGEST}"))
        .await?
        .context("digest not blocked")?;
    assert_eq!(blocked["digest"], DIGEST);
    assert_eq!(blocked["run_id"], run.id.as_str());
    assert_eq!(blocked["step"], "policy");

    let alert = h
        .only_alert(&format!("{}:alert:policy-blocked", run.id))
        .await?;
    assert_eq!(alert["kind"], "policy-blocked");
    assert_eq!(alert["severity"], "high");
    assert_eq!(alert["app"], "web");
    assert_eq!(alert["run_id"], run.id.as_str());
    assert_eq!(alert["step"], "policy");
    assert_eq!(alert["digest"], DIGEST);
    assert!(
        alert["reason"]
            .as_str()
            .is_some_and(|r| r.contains("deployments-have-an-owner")),
        "{alert}"
    );
    h.assert_quiet(&["alerts"]).await?;
    assert_eq!(h.audit("step.policy.blocked").await?.len(), 1);
    Ok(())
}

#[tokio::test]
async fn warn_and_dryrun_constraints_are_reported_but_do_not_block() -> Result<()> {
    let policies = folder(&[
        ("template.yaml", &example_template()?),
        (
            "warn.yaml",
            &require_owner(
                "owner-warn",
                &format!("  enforcementAction: warn\n{DEPLOYMENTS}"),
            ),
        ),
        (
            "dryrun.yaml",
            &require_owner(
                "owner-dryrun",
                &format!("  enforcementAction: dryrun\n{DEPLOYMENTS}"),
            ),
        ),
    ])?;
    let h = Harness::new(Setup {
        builtin: false,
        folder: Some(policies.path()),
        ..Setup::default()
    })
    .await?;
    let run = waiting_run(Some(SHA))?;
    h.record(&run).await?;

    h.policy_ok(&run).await?;

    let stored = h.run(&run).await?;
    assert_eq!(stored.status, RunStatus::Deploying);
    let policy = step(&stored, "policy")?;
    assert_eq!(policy.status, StepStatus::Passed);
    assert_eq!(
        policy.summary.as_deref(),
        Some("2 constraint(s) from 1 template(s): no violations (2 warnings)")
    );
    assert_eq!(policy.details["violations"], json!([]));
    let warnings = policy.details["warnings"].as_array().context("warnings")?;
    let mut seen: Vec<(&str, &str, &str, &str)> = warnings
        .iter()
        .map(|w| {
            (
                w["constraint"].as_str().unwrap_or_default(),
                w["enforcement_action"].as_str().unwrap_or_default(),
                w["kind"].as_str().unwrap_or_default(),
                w["name"].as_str().unwrap_or_default(),
            )
        })
        .collect();
    seen.sort();
    assert_eq!(
        seen,
        [
            ("owner-dryrun", "dryrun", "Deployment", "web"),
            ("owner-warn", "warn", "Deployment", "web"),
        ]
    );
    assert!(
        warnings
            .iter()
            .all(|w| w["message"].as_str().is_some_and(|m| m.contains("owner"))),
        "{warnings:#?}"
    );
    assert!(
        h.blob(&format!("apps/web/blocked/{DIGEST}"))
            .await?
            .is_none()
    );
    assert_deploy_message(&h.messages("deploy").await, &run)?;
    h.assert_quiet(&["deploy"]).await
}

#[tokio::test]
async fn constraints_whose_match_excludes_the_app_namespace_do_not_apply() -> Result<()> {
    for (name, matcher) in [
        ("excluded", "  match:\n    excludedNamespaces: [\"web\"]\n"),
        ("elsewhere", "  match:\n    namespaces: [\"other\"]\n"),
        (
            "deployments-elsewhere",
            "  match:\n    namespaces: [\"other\"]\n    kinds:\n      - apiGroups: [\"apps\"]\n        kinds: [\"Deployment\"]\n",
        ),
    ] {
        let policies = folder(&[
            ("template.yaml", &example_template()?),
            ("constraint.yaml", &require_owner(name, matcher)),
        ])?;
        let h = Harness::new(Setup {
            builtin: false,
            folder: Some(policies.path()),
            ..Setup::default()
        })
        .await?;
        let run = waiting_run(Some(SHA))?;
        h.record(&run).await?;

        h.policy_ok(&run).await?;

        let stored = h.run(&run).await?;
        assert_eq!(stored.status, RunStatus::Deploying, "{name}: {stored:#?}");
        let policy = step(&stored, "policy")?;
        assert_eq!(policy.status, StepStatus::Passed, "{name}");
        assert_eq!(
            policy.summary.as_deref(),
            Some("1 constraint(s) from 1 template(s): no violations"),
            "{name}: the constraint is loaded, it just matches nothing"
        );
        assert_eq!(policy.details["violations"], json!([]), "{name}");
        assert_eq!(policy.details["warnings"], json!([]), "{name}");
        assert_deploy_message(&h.messages("deploy").await, &run)?;
        h.assert_quiet(&["deploy"]).await?;
    }
    Ok(())
}

/// Runs the gate on a broken policy folder; returns the failed step's summary
/// after checking the failure is recorded, alerted and acknowledged.
async fn fails_on(folder: &Path) -> Result<String> {
    let h = Harness::new(Setup {
        folder: Some(folder),
        ..Setup::default()
    })
    .await?;
    let run = waiting_run(Some(SHA))?;
    h.record(&run).await?;

    // Acknowledged (200), not retried: no retry fixes a broken file.
    let (status, line) = h.policy(&run, DIGEST, 1, 1).await?;
    assert_eq!(status, StatusCode::OK, "{line}");
    assert!(line.contains("failed"), "{line}");

    let stored = h.run(&run).await?;
    assert_eq!(stored.status, RunStatus::Failed);
    let policy = step(&stored, "policy")?;
    assert_eq!(policy.status, StepStatus::Failed);
    assert!(policy.finished_at.is_some());
    let summary = policy.summary.clone().context("summary")?;
    assert!(
        summary.starts_with("loading or evaluating policies: "),
        "{summary}"
    );
    assert!(!stored.steps.contains_key("deploy"));

    let alert = h
        .only_alert(&format!("{}:alert:policy-failed", run.id))
        .await?;
    assert_eq!(alert["kind"], "run-failed");
    assert_eq!(alert["severity"], "high");
    assert_eq!(alert["run_id"], run.id.as_str());
    assert_eq!(alert["step"], "policy");
    assert_eq!(alert["digest"], DIGEST);
    h.assert_quiet(&["alerts"]).await?;
    assert!(
        h.blob(&format!("apps/web/blocked/{DIGEST}"))
            .await?
            .is_none()
    );
    assert!(
        h.runs.list_all("rejected/").await?.is_empty(),
        "a failure on the run is not a rejected message"
    );
    assert_eq!(h.audit("step.policy.failed").await?.len(), 1);

    // A redelivery changes nothing.
    let before = h.snapshot().await?;
    let (status, _) = h.policy(&run, DIGEST, 1, 2).await?;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(h.snapshot().await?, before);
    assert_eq!(h.messages("alerts").await.len(), 1);
    Ok(summary)
}

#[tokio::test]
async fn a_rego_syntax_error_fails_the_run_naming_file_and_line() -> Result<()> {
    let dir = fixture("broken-rego");
    let summary = fails_on(&dir).await?;
    // Line 15 of the YAML file is the unclosed `sprintf(` call.
    let place = format!("{}:15", dir.join("template.yaml").display());
    assert!(summary.contains(&place), "{place} not in {summary}");
    assert!(summary.contains("k8sbroken"), "{summary}");
    Ok(())
}

#[tokio::test]
async fn a_constraint_for_an_unknown_template_fails_the_run_naming_file_and_kind() -> Result<()> {
    let dir = fixture("unknown-kind");
    let summary = fails_on(&dir).await?;
    let file = dir.join("orphan.yaml").display().to_string();
    assert!(summary.contains(&file), "{file} not in {summary}");
    assert!(summary.contains("K8sNoSuchTemplate"), "{summary}");
    assert!(
        summary.contains("no ConstraintTemplate defines"),
        "{summary}"
    );
    Ok(())
}

#[tokio::test]
async fn malformed_yaml_fails_the_run_naming_file_and_line() -> Result<()> {
    let dir = fixture("malformed-yaml");
    let summary = fails_on(&dir).await?;
    let file = dir.join("bad.yaml").display().to_string();
    assert!(summary.contains("parsing YAML at"), "{summary}");
    let line = summary
        .split_once(&format!("{file}:"))
        .and_then(|(_, rest)| rest.split(|c: char| !c.is_ascii_digit()).next())
        .and_then(|n| n.parse::<u32>().ok())
        .with_context(|| format!("no {file}:<line> in {summary}"))?;
    // The flow sequence opened on line 7 is not closed; the parser trips over
    // the `match:` key on line 8.
    assert_eq!(line, 8, "{summary}");
    Ok(())
}

#[tokio::test]
async fn a_digest_already_blocked_is_blocked_without_evaluating_policies() -> Result<()> {
    // The folder does not even compile: evaluating it would fail the run.
    let broken = fixture("broken-rego");
    let h = Harness::new(Setup {
        folder: Some(&broken),
        ..Setup::default()
    })
    .await?;
    let name = format!("apps/web/blocked/{DIGEST}");
    let earlier = br#"{"digest": "earlier", "step": "security-event"}"#;
    h.store.create(&name, earlier).await?;
    let run = waiting_run(Some(SHA))?;
    h.record(&run).await?;

    let line = h.policy_ok(&run).await?;
    assert!(line.contains("is blocked"), "{line}");

    let stored = h.run(&run).await?;
    assert_eq!(stored.status, RunStatus::Blocked);
    let policy = step(&stored, "policy")?;
    assert_eq!(policy.status, StepStatus::Blocked);
    assert_eq!(
        policy.summary.as_deref(),
        Some(format!("digest {DIGEST} is blocked for web").as_str())
    );
    assert_eq!(policy.details, Value::Null, "nothing was evaluated");
    assert_eq!(
        h.store.get(&name).await?.context("blocked")?.body,
        earlier.to_vec(),
        "the earlier record is kept"
    );
    let alert = h
        .only_alert(&format!("{}:alert:policy-blocked", run.id))
        .await?;
    assert_eq!(alert["severity"], "high");
    h.assert_quiet(&["alerts"]).await
}

/// Delivers a message the gate must refuse: 200, a `rejected/policy-enforce/`
/// record, a `message-rejected` alert, and the run untouched.
async fn assert_rejected(h: &Harness, run: &Run, digest: &str, why: &str) -> Result<()> {
    let before = h.snapshot().await?;
    let (status, line) = h.policy(run, digest, 1, 1).await?;
    assert_eq!(status, StatusCode::OK, "{line}");
    assert!(line.starts_with("rejected: "), "{line}");
    assert!(line.contains(why), "{why} not in {line}");

    let after = h.snapshot().await?;
    let run_blob = format!("runs/web/{}.json", run.id);
    assert_eq!(after.get(&run_blob), before.get(&run_blob), "run changed");
    let message_id = format!("{}:policy:1", run.id);
    let record_name = format!(
        "rejected/policy-enforce/{}.json",
        gantry_pipeline::names::event_key(&message_id)
    );
    let new: Vec<&String> = after
        .keys()
        .filter(|k| !before.contains_key(*k) && !k.starts_with("audit/"))
        .collect();
    assert_eq!(new, [&record_name], "only the rejection record is new");
    let record: Value = serde_json::from_slice(&after[&record_name])?;
    assert_eq!(record["function"], "policy-enforce");
    assert_eq!(record["message_id"], message_id);
    assert!(
        record["reason"].as_str().is_some_and(|r| r.contains(why)),
        "{record}"
    );
    let alerts = h.messages("alerts").await;
    ensure!(alerts.len() == 1, "{alerts:#?}");
    assert_eq!(
        serde_json::from_str::<Value>(&alerts[0].body)?["kind"],
        "message-rejected"
    );
    h.assert_quiet(&["alerts"]).await
}

#[tokio::test]
async fn a_run_whose_scan_has_not_passed_is_rejected() -> Result<()> {
    for scan in [StepStatus::Running, StepStatus::Failed, StepStatus::Blocked] {
        let h = Harness::new(Setup::default()).await?;
        let mut run = waiting_run(Some(SHA))?;
        run.steps.get_mut("scan").context("scan")?.status = scan;
        h.record(&run).await?;
        assert_rejected(&h, &run, DIGEST, "the scan step has not passed").await?;
    }
    // No scan step at all.
    let h = Harness::new(Setup::default()).await?;
    let mut run = waiting_run(Some(SHA))?;
    run.steps.remove("scan");
    h.record(&run).await?;
    assert_rejected(&h, &run, DIGEST, "the scan step has not passed").await
}

#[tokio::test]
async fn a_message_for_another_digest_is_rejected() -> Result<()> {
    let h = Harness::new(Setup::default()).await?;
    let run = waiting_run(Some(SHA))?;
    h.record(&run).await?;
    assert_rejected(
        &h,
        &run,
        OTHER_DIGEST,
        &format!("message digest {OTHER_DIGEST} is not the run's {DIGEST}"),
    )
    .await
}

#[tokio::test]
async fn a_message_for_an_unknown_run_is_rejected() -> Result<()> {
    let h = Harness::new(Setup::default()).await?;
    let run = waiting_run(Some(SHA))?;
    assert_rejected(&h, &run, DIGEST, "no such run").await
}

#[tokio::test]
async fn a_run_not_waiting_for_this_attempt_is_left_alone() -> Result<()> {
    let passed = |attempts| Step {
        attempts,
        ..Step::finished(StepStatus::Passed, OffsetDateTime::now_utc(), "done")
    };
    let running = Step {
        status: StepStatus::Running,
        ..Step::pending(1)
    };
    // (run status, policy step, deploy step, message attempt)
    let cases = [
        (RunStatus::Superseded, Step::pending(1), None, 1),
        (RunStatus::Scanning, Step::pending(1), None, 1),
        (RunStatus::Blocked, Step::pending(1), None, 1),
        (RunStatus::CheckingPolicy, Step::pending(2), None, 1),
        (RunStatus::CheckingPolicy, Step::pending(1), None, 2),
        (RunStatus::CheckingPolicy, passed(1), None, 1),
        // Deploy already under way, or a stale policy attempt: no deploy re-sent.
        (RunStatus::Deploying, passed(1), Some(running), 1),
        (RunStatus::Deploying, passed(2), Some(Step::pending(1)), 1),
        (RunStatus::Verifying, passed(1), Some(passed(1)), 1),
    ];
    for (status, policy, deploy, attempt) in cases {
        let h = Harness::new(Setup::default()).await?;
        let mut run = waiting_run(Some(SHA))?;
        run.status = status;
        run.steps.insert("policy".into(), policy.clone());
        if let Some(deploy) = deploy {
            run.steps.insert("deploy".into(), deploy);
        }
        h.record(&run).await?;
        let before = h.snapshot().await?;

        let (code, line) = h.policy(&run, DIGEST, attempt, 1).await?;
        let case = format!("{status} / {policy:?} / attempt {attempt}: {line}");
        assert_eq!(code, StatusCode::OK, "{case}");
        assert!(line.contains("nothing to do"), "{case}");
        assert_eq!(h.snapshot().await?, before, "{case}");
        h.assert_quiet(&[]).await?;
    }
    Ok(())
}

#[tokio::test]
async fn the_evaluated_deployment_carries_the_run_id_and_commit() -> Result<()> {
    let template = std::fs::read_to_string(fixture("required-annotations/template.yaml"))?;
    let provenance = |run_id: &str| {
        format!(
            "apiVersion: constraints.gatekeeper.sh/v1beta1\nkind: K8sRequiredAnnotations\nmetadata:\n  name: provenance\nspec:\n{DEPLOYMENTS}  parameters:\n    annotations:\n      gantry.dev/run-id: {run_id:?}\n      gantry.dev/commit: {SHA:?}\n      gantry.dev/digest: {DIGEST:?}\n"
        )
    };

    // A pushed commit: both annotations are there, with the run's values.
    let run = waiting_run(Some(SHA))?;
    let policies = folder(&[
        ("template.yaml", &template),
        ("provenance.yaml", &provenance(run.id.as_str())),
    ])?;
    let h = Harness::new(Setup {
        builtin: false,
        folder: Some(policies.path()),
        ..Setup::default()
    })
    .await?;
    h.record(&run).await?;
    h.policy_ok(&run).await?;
    let stored = h.run(&run).await?;
    let policy = step(&stored, "policy")?;
    assert_eq!(stored.status, RunStatus::Deploying, "{policy:#?}");
    assert_eq!(policy.details["violations"], json!([]));

    // A registry-only run has no commit: the commit annotation is absent, and
    // a policy requiring it blocks.
    let run = waiting_run(None)?;
    let policies = folder(&[
        ("template.yaml", &template),
        ("provenance.yaml", &provenance(run.id.as_str())),
    ])?;
    let h = Harness::new(Setup {
        builtin: false,
        folder: Some(policies.path()),
        ..Setup::default()
    })
    .await?;
    h.record(&run).await?;
    h.policy_ok(&run).await?;
    let stored = h.run(&run).await?;
    assert_eq!(stored.status, RunStatus::Blocked);
    let policy = step(&stored, "policy")?;
    assert_eq!(
        policy.details["violations"],
        json!([{
            "template": "k8srequiredannotations",
            "constraint": "provenance",
            "enforcement_action": "deny",
            "kind": "Deployment",
            "name": "web",
            "namespace": "web",
            "message": format!("annotation gantry.dev/commit must be {SHA}, found <absent>"),
        }])
    );

    // The value is compared, not just the key: another run's id blocks.
    let run = waiting_run(Some(SHA))?;
    let stale = waiting_run(Some(SHA))?;
    let policies = folder(&[
        ("template.yaml", &template),
        ("provenance.yaml", &provenance(stale.id.as_str())),
    ])?;
    let h = Harness::new(Setup {
        builtin: false,
        folder: Some(policies.path()),
        ..Setup::default()
    })
    .await?;
    h.record(&run).await?;
    h.policy_ok(&run).await?;
    let stored = h.run(&run).await?;
    assert_eq!(stored.status, RunStatus::Blocked);
    let message = step(&stored, "policy")?.details["violations"][0]["message"].clone();
    assert_eq!(
        message,
        json!(format!(
            "annotation gantry.dev/run-id must be {}, found {}",
            stale.id, run.id
        ))
    );
    Ok(())
}

#[tokio::test]
async fn a_deploy_message_lost_to_a_transient_send_failure_is_sent_on_redelivery() -> Result<()> {
    let h = Harness::new(Setup::default()).await?;
    let run = waiting_run(Some(SHA))?;
    h.record(&run).await?;

    // The pass is recorded, then sending `deploy` fails: the host must redeliver.
    h.flaky.fail_sends("deploy", 1);
    let (status, line) = h.policy(&run, DIGEST, 1, 1).await?;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{line}");
    let stored = h.run(&run).await?;
    assert_eq!(stored.status, RunStatus::Deploying);
    assert_eq!(step(&stored, "policy")?.status, StepStatus::Passed);
    assert_eq!(*step(&stored, "deploy")?, Step::pending(1));
    h.assert_quiet(&[]).await?;

    // The redelivery finds the step passed, and still queues the deploy.
    let before = h.snapshot().await?;
    let (status, line) = h.policy(&run, DIGEST, 1, 2).await?;
    assert_eq!(status, StatusCode::OK, "{line}");
    assert_eq!(h.snapshot().await?, before, "the run is not touched again");
    assert_deploy_message(&h.messages("deploy").await, &run)?;
    h.assert_quiet(&["deploy"]).await?;

    // And once more: still the one message.
    let (status, _) = h.policy(&run, DIGEST, 1, 3).await?;
    assert_eq!(status, StatusCode::OK);
    assert_deploy_message(&h.messages("deploy").await, &run)?;
    Ok(())
}
