//! `deploy` invoked through the custom-handler envelope (`POST /deploy`, the
//! session being the app), exactly as the Functions host (or `gantry dev`)
//! invokes it, with the embedded on-disk store, the embedded queue and the
//! `directory` target in a temporary folder. Each test records runs that wait
//! for the deploy step directly in the store, as policy-enforce leaves them,
//! then delivers the `deploy` message policy-enforce would have sent.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result, ensure};
use axum::Router;
use axum::body::Body;
use gantry_bus::{EmbeddedBus, MessageView, QUEUES, QueueOptions};
use gantry_pipeline::{Config, Digest, Run, RunStatus, RunStore, Step, StepRequest, StepStatus};
use gantry_runtime::{Deps, Secrets};
use gantry_store::StateStore;
use gantry_store::fs::FsStore;
use gantry_testkit::bus::FlakyBus;
use gantry_testkit::fixtures::{self, DIGEST};
use http::{Request, StatusCode};
use http_body_util::BodyExt;
use serde_json::{Value, json};
use time::OffsetDateTime;
use tower::ServiceExt;

const DIGEST2: &str = "sha256:1111111111111111111111111111111111111111111111111111111111111111";
const SCAN_SUMMARY: &str = "trivy: 0 critical, 0 high, 3 medium (threshold high)";
const DEPLOYED: &str = "apps/web/deployed.json";

/// What the configuration of one test says.
#[derive(Clone)]
struct Setup {
    replicas: u32,
    /// `[deploy] dir`; `None`: `<tempdir>/deploy`.
    dir: Option<PathBuf>,
}

impl Default for Setup {
    fn default() -> Self {
        Setup {
            replicas: 2,
            dir: None,
        }
    }
}

struct Harness {
    dir: tempfile::TempDir,
    store: Arc<FsStore>,
    bus: EmbeddedBus,
    flaky: Arc<FlakyBus>,
    runs: RunStore,
    config: Arc<Config>,
    router: Router,
}

impl Harness {
    async fn new(setup: Setup) -> Result<Harness> {
        let dir = tempfile::tempdir()?;
        let store = Arc::new(FsStore::open(dir.path().join("store"))?);
        let bus = EmbeddedBus::open(dir.path().join("bus"), QueueOptions::default()).await?;
        let flaky = Arc::new(FlakyBus::new(bus.clone()));
        let runs = RunStore::new(store.clone());
        let (config, router) = configure(&dir.path().join("deploy"), &runs, &flaky, setup)?;
        Ok(Harness {
            dir,
            store,
            bus,
            flaky,
            runs,
            config,
            router,
        })
    }

    /// A new `gantry.toml` and new `Deps` over the same store and queue (what
    /// a restart with an edited configuration does).
    fn reconfigure(&mut self, setup: Setup) -> Result<()> {
        (self.config, self.router) = configure(&self.deploy_dir(), &self.runs, &self.flaky, setup)?;
        Ok(())
    }

    /// `[deploy] dir` of the default setup.
    fn deploy_dir(&self) -> PathBuf {
        self.dir.path().join("deploy")
    }

    /// `<dir>/web`, where the app's manifests go.
    fn target(&self) -> PathBuf {
        self.deploy_dir().join("web")
    }

    /// The manifests as the current configuration renders them for `run`.
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

    /// A run of `web` for `digest` waiting for the deploy step, as
    /// policy-enforce leaves it: `deploying`, scan and policy passed (the
    /// policy with the hash of the manifests rendered now), deploy pending.
    fn deploying_run(&self, digest: &str) -> Result<Run> {
        let mut run = fixtures::with_image(fixtures::run("web", RunStatus::Deploying)?, digest)?;
        let hash = self.render(&run)?.hash;
        fixtures::gates_passed(&mut run, SCAN_SUMMARY, &hash);
        run.steps.insert("deploy".into(), Step::pending(1));
        Ok(run)
    }

    /// Stores `run` as the previous steps left it.
    async fn record(&self, run: &Run) -> Result<()> {
        ensure!(self.runs.create(run).await?, "run {} existed", run.id);
        Ok(())
    }

    /// A run from [`Harness::deploying_run`], stored.
    async fn recorded(&self, digest: &str) -> Result<Run> {
        let run = self.deploying_run(digest)?;
        self.record(&run).await?;
        Ok(run)
    }

    /// Delivers a `deploy` message for `run` (MessageId `{run}:deploy:{attempt}`,
    /// session `web`); returns the status and the one log line.
    async fn deploy(
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
            &request.message_id("deploy"),
            delivery_count,
            Some("web"),
            "2026-11-27T10:04:12.1234567Z",
            &BTreeMap::new(),
        );
        let request = Request::post("/deploy")
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

    /// Delivers the first `deploy` message for `run` and expects 200.
    async fn deploy_ok(&self, run: &Run) -> Result<String> {
        let digest = run.image.as_ref().context("image")?.digest.to_string();
        let (status, line) = self.deploy(run, &digest, 1, 1).await?;
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

    /// The alerts' MessageIds, in order.
    async fn alert_ids(&self) -> Vec<String> {
        self.messages("alerts")
            .await
            .into_iter()
            .map(|m| m.message_id)
            .collect()
    }

    /// The one alert in `alerts`, which must have MessageId `id`.
    async fn only_alert(&self, id: &str) -> Result<Value> {
        let alerts = self.messages("alerts").await;
        ensure!(alerts.len() == 1, "{alerts:#?}");
        ensure!(alerts[0].message_id == id, "{alerts:#?}");
        Ok(serde_json::from_str(&alerts[0].body)?)
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
}

/// The configuration `setup` describes (`[deploy] dir` defaulting to
/// `default_dir`) and the handler's router over it.
fn configure(
    default_dir: &Path,
    runs: &RunStore,
    bus: &Arc<FlakyBus>,
    setup: Setup,
) -> Result<(Arc<Config>, Router)> {
    let dir = setup.dir.unwrap_or_else(|| default_dir.to_path_buf());
    ensure!(dir.is_absolute(), "{dir:?}");
    let text = format!(
        "[[apps]]\nname = \"web\"\nrepo = \"contoso/web\"\nimage = \"contoso.azurecr.io/web\"\nreplicas = {}\n\n[deploy]\ndir = {:?}\n",
        setup.replicas,
        dir.display().to_string()
    );
    let config = Arc::new(Config::parse(&text, "test.toml")?);
    let deps = Deps {
        runs: runs.clone(),
        bus: bus.clone(),
        config: config.clone(),
        secrets: Secrets::default(),
        services: Default::default(),
    };
    let router = gantry_runtime::app(Arc::new(deps), &[fn_deploy::function()]);
    Ok((config, router))
}

/// The files of a folder, name → text.
fn files(dir: &Path) -> Result<BTreeMap<String, String>> {
    let mut out = BTreeMap::new();
    for entry in std::fs::read_dir(dir).with_context(|| dir.display().to_string())? {
        let entry = entry?;
        ensure!(
            entry.file_type()?.is_file(),
            "{:?} is not a file",
            entry.path()
        );
        let name = entry
            .file_name()
            .into_string()
            .map_err(|n| anyhow::anyhow!("{n:?}"))?;
        out.insert(name, std::fs::read_to_string(entry.path())?);
    }
    Ok(out)
}

/// Names in a folder.
fn entries(dir: &Path) -> Result<Vec<String>> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).with_context(|| dir.display().to_string())? {
        out.push(
            entry?
                .file_name()
                .into_string()
                .map_err(|n| anyhow::anyhow!("{n:?}"))?,
        );
    }
    out.sort();
    Ok(out)
}

/// The folder holds exactly `objects`, one file each, named by
/// `object_file_name`, each parsing back to its object; returns the Deployment
/// as read back.
fn assert_folder_holds(target: &Path, objects: &[Value]) -> Result<Value> {
    let found = files(target)?;
    let expected: BTreeMap<String, &Value> = objects
        .iter()
        .map(|o| (gantry_manifests::object_file_name(o), o))
        .collect();
    assert_eq!(expected.len(), objects.len(), "file names are distinct");
    assert_eq!(
        found.keys().collect::<Vec<_>>(),
        expected.keys().collect::<Vec<_>>(),
        "one file per object, nothing else"
    );
    let mut deployment = None;
    for (name, text) in &found {
        let back: Vec<Value> =
            serde_saphyr::from_multiple(text).map_err(|e| anyhow::anyhow!("{name}: {e}"))?;
        assert_eq!(back.len(), 1, "{name}: one object per file");
        assert_eq!(&back[0], expected[name], "{name} parses back to the object");
        if back[0]["kind"] == "Deployment" {
            deployment = Some(back[0].clone());
        }
    }
    deployment.context("no Deployment written")
}

/// The image of the Deployment's only container.
fn image_of(deployment: &Value) -> Result<&str> {
    let containers = deployment
        .pointer("/spec/template/spec/containers")
        .and_then(Value::as_array)
        .context("containers")?;
    ensure!(containers.len() == 1, "{containers:#?}");
    containers[0]["image"].as_str().context("image")
}

fn step<'a>(run: &'a Run, name: &str) -> Result<&'a Step> {
    run.steps
        .get(name)
        .with_context(|| format!("no step {name}: {run:#?}"))
}

fn version(run: &Run, digest: &str, hash: &str) -> Value {
    json!({"digest": digest, "run_id": run.id, "manifest_hash": hash})
}

/// The run as stored is `deployed` by this delivery: deploy passed with
/// `previous`, verify passed, nothing else changed.
fn assert_deployed(
    before: &Run,
    stored: &Run,
    target: &Path,
    rendered: &gantry_manifests::Rendered,
    previous: Value,
) -> Result<()> {
    assert_eq!(stored.status, RunStatus::Deployed);
    let deploy = step(stored, "deploy")?;
    assert_eq!((deploy.status, deploy.attempts), (StepStatus::Passed, 1));
    assert!(deploy.started_at.is_some() && deploy.finished_at.is_some());
    assert_eq!(
        deploy.summary.as_deref(),
        Some(
            format!(
                "wrote {} objects to {} (manifest hash {})",
                rendered.objects.len(),
                target.display(),
                &rendered.hash[..12]
            )
            .as_str()
        )
    );
    assert_eq!(
        deploy.details,
        json!({"target": "directory", "manifest_hash": rendered.hash, "previous": previous})
    );
    let verify = step(stored, "verify")?;
    assert_eq!((verify.status, verify.attempts), (StepStatus::Passed, 1));
    assert_eq!(
        verify.summary.as_deref(),
        Some("directory target: nothing to roll out")
    );
    assert_eq!(verify.finished_at, deploy.finished_at);
    let keys: Vec<&String> = stored.steps.keys().collect();
    assert_eq!(keys, ["deploy", "policy", "scan", "verify"]);
    assert_eq!(stored.steps["scan"], before.steps["scan"]);
    assert_eq!(stored.steps["policy"], before.steps["policy"]);
    assert_eq!(
        (&stored.image, &stored.source, stored.created_at),
        (&before.image, &before.source, before.created_at)
    );
    Ok(())
}

#[tokio::test]
async fn a_checked_run_is_written_to_the_folder_and_recorded_as_deployed() -> Result<()> {
    let h = Harness::new(Setup::default()).await?;
    let run = h.recorded(DIGEST).await?;
    let rendered = h.render(&run)?;
    assert_eq!(
        rendered.objects.len(),
        10,
        "seven kinds by default, four NetworkPolicies"
    );

    let line = h.deploy_ok(&run).await?;
    assert!(line.contains("deployed"), "{line}");

    let deployment = assert_folder_holds(&h.target(), &rendered.objects)?;
    assert_eq!(
        image_of(&deployment)?,
        format!("contoso.azurecr.io/web@{DIGEST}")
    );
    assert_eq!(
        entries(&h.deploy_dir())?,
        ["web"],
        "no staging or old folder left beside it"
    );

    let stored = h.run(&run).await?;
    assert_deployed(&run, &stored, &h.target(), &rendered, Value::Null)?;
    assert_eq!(
        h.blob(DEPLOYED).await?,
        Some(json!({"current": version(&run, DIGEST, &rendered.hash)})),
        "no previous version"
    );

    let alert = h.only_alert(&format!("{}:alert:deployed", run.id)).await?;
    assert_eq!(alert["kind"], "deployed");
    assert_eq!(alert["severity"], "info");
    assert_eq!(alert["app"], "web");
    assert_eq!(alert["run_id"], run.id.as_str());
    assert_eq!(alert["step"], "deploy");
    assert_eq!(alert["digest"], DIGEST);
    h.assert_quiet(&["alerts"]).await?;

    let audit = h.audit("run.deployed").await?;
    assert_eq!(audit.len(), 1, "{audit:#?}");
    assert_eq!(audit[0]["detail"]["manifest_hash"], rendered.hash.as_str());
    assert!(h.runs.list_all("rejected/").await?.is_empty());
    assert!(h.runs.list_all("apps/web/blocked/").await?.is_empty());
    Ok(())
}

#[tokio::test]
async fn a_redelivered_message_changes_nothing() -> Result<()> {
    let h = Harness::new(Setup::default()).await?;
    let run = h.recorded(DIGEST).await?;
    h.deploy_ok(&run).await?;
    let store = h.snapshot().await?;
    let written = files(&h.target())?;

    for delivery in [2, 3] {
        let (status, line) = h.deploy(&run, DIGEST, 1, delivery).await?;
        assert_eq!(status, StatusCode::OK, "{line}");
        assert!(line.contains("deploy already passed"), "{line}");
        assert_eq!(h.snapshot().await?, store, "store byte-identical");
        assert_eq!(files(&h.target())?, written, "files unchanged");
        assert_eq!(entries(&h.deploy_dir())?, ["web"]);
        assert_eq!(
            h.alert_ids().await,
            [format!("{}:alert:deployed", run.id)],
            "still one alert"
        );
        h.assert_quiet(&["alerts"]).await?;
    }
    Ok(())
}

#[tokio::test]
async fn a_deployed_alert_lost_to_a_transient_send_failure_is_sent_on_redelivery() -> Result<()> {
    let h = Harness::new(Setup::default()).await?;
    let run = h.recorded(DIGEST).await?;
    let rendered = h.render(&run)?;

    // The deploy is recorded, then sending the alert fails: the host redelivers.
    h.flaky.fail_sends("alerts", 1);
    let (status, line) = h.deploy(&run, DIGEST, 1, 1).await?;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{line}");
    assert_deployed(
        &run,
        &h.run(&run).await?,
        &h.target(),
        &rendered,
        Value::Null,
    )?;
    h.assert_quiet(&[]).await?;

    let store = h.snapshot().await?;
    let (status, line) = h.deploy(&run, DIGEST, 1, 2).await?;
    assert_eq!(status, StatusCode::OK, "{line}");
    assert_eq!(h.snapshot().await?, store, "the run is not touched again");
    let alert = h.only_alert(&format!("{}:alert:deployed", run.id)).await?;
    assert_eq!(alert["kind"], "deployed");
    h.assert_quiet(&["alerts"]).await
}

#[tokio::test]
async fn a_redelivery_after_deployed_json_was_recorded_finishes_without_recording_twice()
-> Result<()> {
    // The first delivery wrote the files and deployed.json, then died before
    // the run was updated: the redelivery (deploy step still running)
    // finishes the run and keeps deployed.json as it is.
    let h = Harness::new(Setup::default()).await?;
    let run = h.deploying_run(DIGEST)?;
    let rendered = h.render(&run)?;
    let mut running = run.clone();
    let deploy = running.steps.get_mut("deploy").context("deploy")?;
    deploy.status = StepStatus::Running;
    deploy.started_at = Some(OffsetDateTime::now_utc());
    h.record(&running).await?;
    let earlier = h.deploying_run(DIGEST2)?; // stands for an older deployed run
    let recorded = serde_json::to_vec_pretty(&json!({
        "current": version(&run, DIGEST, &rendered.hash),
        "previous": version(&earlier, DIGEST2, "ab".repeat(32).as_str()),
    }))?;
    h.store.create(DEPLOYED, &recorded).await?;

    let (status, line) = h.deploy(&run, DIGEST, 1, 2).await?;
    assert_eq!(status, StatusCode::OK, "{line}");
    let stored = h.run(&run).await?;
    assert_deployed(
        &running,
        &stored,
        &h.target(),
        &rendered,
        version(&earlier, DIGEST2, "ab".repeat(32).as_str()),
    )?;
    assert_eq!(
        step(&stored, "deploy")?.started_at,
        running.steps["deploy"].started_at,
        "started once"
    );
    assert_eq!(
        h.store.get(DEPLOYED).await?.context("deployed.json")?.body,
        recorded,
        "deployed.json byte-identical"
    );
    assert_folder_holds(&h.target(), &rendered.objects)?;
    assert_eq!(h.alert_ids().await, [format!("{}:alert:deployed", run.id)]);
    Ok(())
}

#[tokio::test]
async fn a_newer_digest_replaces_the_folder_and_records_the_previous_good_version() -> Result<()> {
    let h = Harness::new(Setup::default()).await?;
    let first = h.recorded(DIGEST).await?;
    let first_hash = h.render(&first)?.hash;
    h.deploy_ok(&first).await?;

    // Something that only the old folder has: it must not survive the swap.
    std::fs::write(h.target().join("99-stray.yaml"), "kind: Stray\n")?;
    assert_eq!(files(&h.target())?.len(), 11);

    let second = h.recorded(DIGEST2).await?;
    let rendered = h.render(&second)?;
    assert_ne!(rendered.hash, first_hash);
    h.deploy_ok(&second).await?;

    let deployment = assert_folder_holds(&h.target(), &rendered.objects)?;
    assert_eq!(
        image_of(&deployment)?,
        format!("contoso.azurecr.io/web@{DIGEST2}")
    );
    assert_eq!(entries(&h.deploy_dir())?, ["web"]);
    let previous = version(&first, DIGEST, &first_hash);
    assert_deployed(
        &second,
        &h.run(&second).await?,
        &h.target(),
        &rendered,
        previous.clone(),
    )?;
    assert_eq!(
        h.blob(DEPLOYED).await?,
        Some(json!({"current": version(&second, DIGEST2, &rendered.hash), "previous": previous})),
    );
    assert_eq!(
        h.run(&first).await?.status,
        RunStatus::Deployed,
        "the first run keeps its own record"
    );
    assert_eq!(
        h.alert_ids().await,
        [
            format!("{}:alert:deployed", first.id),
            format!("{}:alert:deployed", second.id)
        ]
    );

    // A newer run of the digest that runs now: it becomes current, and the
    // previous good version stays the other digest (the rollback target).
    let third = h.recorded(DIGEST2).await?;
    let third_hash = h.render(&third)?.hash;
    assert_eq!(third_hash, rendered.hash, "provenance is not hashed");
    h.deploy_ok(&third).await?;
    assert_eq!(
        h.blob(DEPLOYED).await?,
        Some(json!({"current": version(&third, DIGEST2, &third_hash), "previous": previous})),
    );
    assert_eq!(
        step(&h.run(&third).await?, "deploy")?.details["previous"],
        previous
    );
    assert_folder_holds(&h.target(), &h.render(&third)?.objects)?;
    Ok(())
}

#[tokio::test]
async fn an_older_run_is_superseded_by_a_newer_one() -> Result<()> {
    let h = Harness::new(Setup::default()).await?;
    let older = h.recorded(DIGEST).await?;
    let newer = h.recorded(DIGEST2).await?;
    assert!(newer.id > older.id);
    let newer_blob = format!("runs/web/{}.json", newer.id);
    let newer_before = h.store.get(&newer_blob).await?.context("newer")?.body;

    let line = h.deploy_ok(&older).await?;
    assert!(
        line.contains(&format!("superseded by newer run {}", newer.id)),
        "{line}"
    );
    let stored = h.run(&older).await?;
    assert_eq!(stored.status, RunStatus::Superseded);
    let deploy = step(&stored, "deploy")?;
    assert_eq!((deploy.status, deploy.attempts), (StepStatus::Skipped, 1));
    assert!(deploy.finished_at.is_some());
    assert_eq!(
        deploy.summary.as_deref(),
        Some(format!("superseded by newer run {}", newer.id).as_str())
    );
    assert_eq!(deploy.details, Value::Null);
    assert!(!stored.steps.contains_key("verify"));
    assert!(!h.deploy_dir().exists(), "nothing written");
    assert_eq!(h.blob(DEPLOYED).await?, None);
    assert_eq!(
        h.store.get(&newer_blob).await?.context("newer")?.body,
        newer_before,
        "the newer run is not touched"
    );
    h.assert_quiet(&[]).await?;
    let audit = h.audit("run.superseded").await?;
    assert_eq!(audit.len(), 1, "{audit:#?}");
    assert_eq!(audit[0]["detail"]["by"], newer.id.as_str());

    // The older message again: nothing changes.
    let store = h.snapshot().await?;
    let (status, line) = h.deploy(&older, DIGEST, 1, 2).await?;
    assert_eq!(status, StatusCode::OK, "{line}");
    assert_eq!(h.snapshot().await?, store);
    h.assert_quiet(&[]).await?;

    // The newer run deploys as the first version.
    h.deploy_ok(&newer).await?;
    let rendered = h.render(&newer)?;
    assert_deployed(
        &newer,
        &h.run(&newer).await?,
        &h.target(),
        &rendered,
        Value::Null,
    )?;
    assert_eq!(
        h.blob(DEPLOYED).await?,
        Some(json!({"current": version(&newer, DIGEST2, &rendered.hash)})),
    );
    assert_eq!(
        h.alert_ids().await,
        [format!("{}:alert:deployed", newer.id)]
    );
    Ok(())
}

#[tokio::test]
async fn a_newer_run_that_was_itself_superseded_does_not_supersede() -> Result<()> {
    let h = Harness::new(Setup::default()).await?;
    let older = h.recorded(DIGEST).await?;
    let mut newer = h.deploying_run(DIGEST2)?;
    newer.status = RunStatus::Superseded;
    newer.steps.insert(
        "deploy".into(),
        Step::finished(StepStatus::Skipped, OffsetDateTime::now_utc(), "superseded"),
    );
    h.record(&newer).await?;
    assert!(newer.id > older.id);

    h.deploy_ok(&older).await?;
    let rendered = h.render(&older)?;
    assert_deployed(
        &older,
        &h.run(&older).await?,
        &h.target(),
        &rendered,
        Value::Null,
    )?;
    assert_folder_holds(&h.target(), &rendered.objects)?;
    assert_eq!(
        h.run(&newer).await?,
        newer,
        "the superseded run is not touched"
    );
    Ok(())
}

#[tokio::test]
async fn a_blocked_digest_is_blocked_and_nothing_is_written() -> Result<()> {
    let h = Harness::new(Setup::default()).await?;
    let name = format!("apps/web/blocked/{DIGEST}");
    let earlier = br#"{"digest": "earlier", "step": "security-event"}"#;
    h.store.create(&name, earlier).await?;
    let run = h.recorded(DIGEST).await?;

    let line = h.deploy_ok(&run).await?;
    assert!(line.contains("is blocked"), "{line}");

    let stored = h.run(&run).await?;
    assert_eq!(stored.status, RunStatus::Blocked);
    let deploy = step(&stored, "deploy")?;
    assert_eq!((deploy.status, deploy.attempts), (StepStatus::Blocked, 1));
    assert!(deploy.started_at.is_some() && deploy.finished_at.is_some());
    assert_eq!(
        deploy.summary.as_deref(),
        Some(format!("digest {DIGEST} is blocked for web").as_str())
    );
    assert_eq!(deploy.details, Value::Null);
    assert_eq!(
        h.store.get(&name).await?.context("blocked")?.body,
        earlier.to_vec(),
        "the earlier record is kept"
    );
    assert!(!h.deploy_dir().exists(), "nothing written");
    assert_eq!(h.blob(DEPLOYED).await?, None);
    let alert = h
        .only_alert(&format!("{}:alert:deploy-blocked", run.id))
        .await?;
    assert_eq!(alert["kind"], "deploy-blocked");
    assert_eq!(alert["severity"], "high");
    assert_eq!(alert["run_id"], run.id.as_str());
    assert_eq!(alert["digest"], DIGEST);
    h.assert_quiet(&["alerts"]).await?;

    // A redelivery changes nothing (the repeated alert is a duplicate).
    let store = h.snapshot().await?;
    let (status, _) = h.deploy(&run, DIGEST, 1, 2).await?;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(h.snapshot().await?, store);
    assert_eq!(h.messages("alerts").await.len(), 1);
    assert!(!h.deploy_dir().exists());
    Ok(())
}

#[tokio::test]
async fn manifests_changed_since_the_policy_gate_fail_the_run() -> Result<()> {
    let mut h = Harness::new(Setup::default()).await?;
    let run = h.recorded(DIGEST).await?;
    let checked = h.render(&run)?.hash;
    h.reconfigure(Setup {
        replicas: 3,
        ..Setup::default()
    })?;
    let now = h.render(&run)?.hash;
    assert_ne!(now, checked);

    let (status, line) = h.deploy(&run, DIGEST, 1, 1).await?;
    assert_eq!(status, StatusCode::OK, "acknowledged: {line}");
    assert!(line.contains("failed"), "{line}");

    let stored = h.run(&run).await?;
    assert_eq!(stored.status, RunStatus::Failed);
    let deploy = step(&stored, "deploy")?;
    assert_eq!((deploy.status, deploy.attempts), (StepStatus::Failed, 1));
    assert!(deploy.finished_at.is_some());
    assert_eq!(
        deploy.summary.as_deref(),
        Some(
            format!(
                "the manifests changed since the policy gate checked them (hash {} now, {} checked): retrigger from policy",
                &now[..12],
                &checked[..12]
            )
            .as_str()
        )
    );
    assert_eq!(stored.steps["policy"], run.steps["policy"]);
    assert!(!h.deploy_dir().exists(), "nothing written");
    assert_eq!(h.blob(DEPLOYED).await?, None);
    assert!(h.runs.list_all("rejected/").await?.is_empty());
    let alert = h
        .only_alert(&format!("{}:alert:deploy-failed", run.id))
        .await?;
    assert_eq!(alert["kind"], "run-failed");
    assert_eq!(alert["severity"], "high");
    assert_eq!(alert["step"], "deploy");
    assert_eq!(alert["digest"], DIGEST);
    h.assert_quiet(&["alerts"]).await?;
    assert_eq!(h.audit("step.deploy.failed").await?.len(), 1);

    // A policy step without a recorded hash cannot vouch for anything either.
    let h = Harness::new(Setup::default()).await?;
    let mut run = h.deploying_run(DIGEST)?;
    run.steps.get_mut("policy").context("policy")?.details = Value::Null;
    h.record(&run).await?;
    h.deploy_ok(&run).await?;
    let stored = h.run(&run).await?;
    assert_eq!(stored.status, RunStatus::Failed);
    let summary = step(&stored, "deploy")?
        .summary
        .clone()
        .context("summary")?;
    assert!(
        summary.ends_with(", none checked): retrigger from policy"),
        "{summary}"
    );
    assert!(!h.deploy_dir().exists());
    Ok(())
}

/// Delivers a message the step must refuse: 200, a `rejected/deploy/`
/// record, a `message-rejected` alert, the run untouched, nothing written.
async fn assert_rejected(h: &Harness, run: &Run, digest: &str, why: &str) -> Result<()> {
    let before = h.snapshot().await?;
    let (status, line) = h.deploy(run, digest, 1, 1).await?;
    assert_eq!(status, StatusCode::OK, "{line}");
    assert!(line.starts_with("rejected: "), "{line}");
    assert!(line.contains(why), "{why} not in {line}");

    let after = h.snapshot().await?;
    let run_blob = format!("runs/web/{}.json", run.id);
    assert_eq!(after.get(&run_blob), before.get(&run_blob), "run changed");
    let message_id = format!("{}:deploy:1", run.id);
    let record_name = format!(
        "rejected/deploy/{}.json",
        gantry_pipeline::names::event_key(&message_id)
    );
    let new: Vec<&String> = after
        .keys()
        .filter(|k| !before.contains_key(*k) && !k.starts_with("audit/"))
        .collect();
    assert_eq!(new, [&record_name], "only the rejection record is new");
    let changed: Vec<&String> = before
        .keys()
        .filter(|k| !k.starts_with("audit/") && after.get(*k) != before.get(*k))
        .collect();
    assert!(changed.is_empty(), "changed: {changed:?}");
    let record: Value = serde_json::from_slice(&after[&record_name])?;
    assert_eq!(record["function"], "deploy");
    assert_eq!(record["message_id"], message_id);
    assert!(
        record["reason"].as_str().is_some_and(|r| r.contains(why)),
        "{record}"
    );
    assert!(!h.deploy_dir().exists(), "nothing written");
    let alerts = h.messages("alerts").await;
    ensure!(alerts.len() == 1, "{alerts:#?}");
    assert_eq!(
        serde_json::from_str::<Value>(&alerts[0].body)?["kind"],
        "message-rejected"
    );
    h.assert_quiet(&["alerts"]).await
}

#[tokio::test]
async fn a_run_whose_verdicts_have_not_both_passed_is_rejected() -> Result<()> {
    let why = "the scan and policy verdicts are not both passed for this digest";
    for gate in ["scan", "policy"] {
        for status in [
            Some(StepStatus::Running),
            Some(StepStatus::Failed),
            Some(StepStatus::Blocked),
            None,
        ] {
            let h = Harness::new(Setup::default()).await?;
            let mut run = h.deploying_run(DIGEST)?;
            match status {
                Some(s) => run.steps.get_mut(gate).context("gate")?.status = s,
                None => {
                    run.steps.remove(gate);
                }
            }
            h.record(&run).await?;
            assert_rejected(&h, &run, DIGEST, why)
                .await
                .with_context(|| format!("{gate} {status:?}"))?;
        }
    }
    Ok(())
}

#[tokio::test]
async fn a_message_for_another_digest_or_an_unknown_run_is_rejected() -> Result<()> {
    let h = Harness::new(Setup::default()).await?;
    let run = h.recorded(DIGEST).await?;
    assert_rejected(
        &h,
        &run,
        DIGEST2,
        &format!("message digest {DIGEST2} is not the run's {DIGEST}"),
    )
    .await?;

    let h = Harness::new(Setup::default()).await?;
    let run = h.deploying_run(DIGEST)?;
    assert_rejected(&h, &run, DIGEST, "no such run").await
}

#[tokio::test]
async fn a_run_not_waiting_for_this_attempt_is_left_alone() -> Result<()> {
    let running = Step {
        status: StepStatus::Running,
        started_at: Some(OffsetDateTime::now_utc()),
        ..Step::pending(2)
    };
    // (run status, deploy step, message attempt)
    let cases = [
        (RunStatus::Deploying, Step::pending(1), 2),
        (RunStatus::Deploying, Step::pending(2), 1),
        (RunStatus::Deploying, running, 1),
        (RunStatus::AwaitingApproval, Step::pending(1), 1),
        (RunStatus::CheckingPolicy, Step::pending(1), 1),
        (RunStatus::Superseded, Step::pending(1), 1),
        (RunStatus::Blocked, Step::pending(1), 1),
        (RunStatus::RolledBack, Step::pending(1), 1),
    ];
    for (status, deploy, attempt) in cases {
        let h = Harness::new(Setup::default()).await?;
        let mut run = h.deploying_run(DIGEST)?;
        run.status = status;
        run.steps.insert("deploy".into(), deploy.clone());
        h.record(&run).await?;
        let before = h.snapshot().await?;

        let (code, line) = h.deploy(&run, DIGEST, attempt, 1).await?;
        let case = format!("{status} / {deploy:?} / attempt {attempt}: {line}");
        assert_eq!(code, StatusCode::OK, "{case}");
        assert!(line.contains("nothing to do"), "{case}");
        assert_eq!(h.snapshot().await?, before, "{case}");
        assert!(!h.deploy_dir().exists(), "{case}");
        h.assert_quiet(&[]).await?;
    }
    Ok(())
}

#[tokio::test]
async fn an_unwritable_folder_is_transient_and_the_redelivery_deploys_once() -> Result<()> {
    let mut h = Harness::new(Setup::default()).await?;
    let file = h.dir.path().join("not-a-folder");
    std::fs::write(&file, "a regular file")?;
    h.reconfigure(Setup {
        dir: Some(file.join("deploy")),
        ..Setup::default()
    })?;
    let run = h.recorded(DIGEST).await?;

    let (status, line) = h.deploy(&run, DIGEST, 1, 1).await?;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{line}");
    assert!(
        line.starts_with(&format!(
            "transient: writing manifests for run {} to {} failed: ",
            run.id,
            file.join("deploy").join("web").display()
        )),
        "{line}"
    );
    let stored = h.run(&run).await?;
    assert_eq!(stored.status, RunStatus::Deploying);
    let deploy = step(&stored, "deploy")?;
    assert_eq!((deploy.status, deploy.attempts), (StepStatus::Running, 1));
    assert!(deploy.started_at.is_some() && deploy.finished_at.is_none());
    assert_eq!(h.blob(DEPLOYED).await?, None);
    assert!(h.runs.list_all("rejected/").await?.is_empty());
    assert_eq!(std::fs::read_to_string(&file)?, "a regular file");
    h.assert_quiet(&[]).await?;

    // The folder is fixed (new configuration, new process): the redelivery deploys.
    h.reconfigure(Setup::default())?;
    let (status, line) = h.deploy(&run, DIGEST, 1, 2).await?;
    assert_eq!(status, StatusCode::OK, "{line}");
    let rendered = h.render(&run)?;
    let after = h.run(&run).await?;
    assert_deployed(&run, &after, &h.target(), &rendered, Value::Null)?;
    assert_eq!(
        step(&after, "deploy")?.started_at,
        deploy.started_at,
        "started once"
    );
    assert_folder_holds(&h.target(), &rendered.objects)?;
    assert_eq!(
        h.blob(DEPLOYED).await?,
        Some(json!({"current": version(&run, DIGEST, &rendered.hash)})),
    );
    assert_eq!(h.alert_ids().await, [format!("{}:alert:deployed", run.id)]);
    assert_eq!(h.audit("run.deployed").await?.len(), 1);
    h.assert_quiet(&["alerts"]).await
}

#[tokio::test]
async fn an_unreadable_deployed_json_is_never_overwritten() -> Result<()> {
    let h = Harness::new(Setup::default()).await?;
    let corrupt = b"{\"current\": {\"digest\": ";
    h.store.create(DEPLOYED, corrupt).await?;
    let run = h.recorded(DIGEST).await?;

    let (status, line) = h.deploy(&run, DIGEST, 1, 1).await?;
    assert_eq!(status, StatusCode::OK, "{line}");
    assert!(
        line.starts_with(&format!(
            "rejected: recording the deploy of run {} failed: decoding {DEPLOYED} failed: ",
            run.id
        )) && line.contains(DEPLOYED),
        "{line}"
    );
    assert_eq!(
        h.store.get(DEPLOYED).await?.context("deployed.json")?.body,
        corrupt.to_vec(),
        "left as it was"
    );
    assert!(
        !h.deploy_dir().exists(),
        "nothing handed off that cannot be recorded"
    );
    let message_id = format!("{}:deploy:1", run.id);
    let record_name = format!(
        "rejected/deploy/{}.json",
        gantry_pipeline::names::event_key(&message_id)
    );
    assert_eq!(
        h.runs.list_all("rejected/").await?,
        std::slice::from_ref(&record_name)
    );
    let record = h.blob(&record_name).await?.context("record")?;
    assert!(
        record["reason"]
            .as_str()
            .is_some_and(|r| r.contains(DEPLOYED)),
        "{record}"
    );
    // The run is not deployed: the deploy step was started and stays so.
    let stored = h.run(&run).await?;
    assert_eq!(stored.status, RunStatus::Deploying);
    assert_eq!(step(&stored, "deploy")?.status, StepStatus::Running);
    assert!(!stored.steps.contains_key("verify"));
    let alerts = h.messages("alerts").await;
    ensure!(alerts.len() == 1, "{alerts:#?}");
    assert_eq!(
        serde_json::from_str::<Value>(&alerts[0].body)?["kind"],
        "message-rejected"
    );
    h.assert_quiet(&["alerts"]).await
}
