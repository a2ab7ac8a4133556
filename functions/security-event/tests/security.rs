//! `security-event` invoked through the custom-handler envelope
//! (`POST /security-event`), exactly as the Functions host (or `gantry dev`)
//! invokes it, with the embedded on-disk store and queue, on the Defender
//! samples in `examples/defender/` (both casings, both kinds).
//!
//! The embedded queue runs with a **zero duplicate-detection window**, so
//! every `alerts` message a test sees was really sent: "alerted once" is
//! proved by gantry's own record, not by the broker dropping a repeat.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use axum::Router;
use axum::body::Body;
use gantry_bus::{EmbeddedBus, MessageView, QueueOptions};
use gantry_events::defender::{DefenderEvent, decode};
use gantry_pipeline::messages::{Deployed, DeployedVersion};
use gantry_pipeline::names::security_key;
use gantry_pipeline::{Config, Digest, Run, RunStatus, RunStore, Step, StepRequest, StepStatus};
use gantry_runtime::{Deps, Secrets};
use gantry_store::StateStore;
use gantry_store::fs::FsStore;
use gantry_testkit::bus::FlakyBus;
use gantry_testkit::fixtures;
use http::{Request, StatusCode};
use http_body_util::BodyExt;
use serde_json::{Value, json};
use tower::ServiceExt;

const WEB: &str = "sha256:b5b2b2c507a0944348e0303114d8d93aaaa081732b86451d9bce1f432a537bc7";
const API: &str = "sha256:7f3c1a9e5b2d4c6e8f0a1b3c5d7e9f1a2b4c6d8e0f1a3b5c7d9e1f2a4b6c8d0e";
const OLD: &str = "sha256:1111111111111111111111111111111111111111111111111111111111111111";
const AKS: &str = "/subscriptions/7d3f2a51-9c4e-4b8a-a1f6-2e5c8b9d0f13/resourceGroups/rg-prod/providers/Microsoft.ContainerService/managedClusters/aks-prod";
const SCAN_SUMMARY: &str = "trivy: 0 critical, 0 high (threshold high)";

const PASCAL: &str = "alert-workflow-automation.pascal.json";
const CAMEL: &str = "alert-continuous-export.camel.json";
const UNCORRELATED: &str = "alert-uncorrelated.pascal.json";
const SUB: &str = "sub-assessment.camel.json";

fn sample(name: &str) -> Result<Vec<u8>> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../examples/defender")
        .join(name);
    std::fs::read(&path).with_context(|| path.display().to_string())
}

fn sample_json(name: &str) -> Result<Value> {
    Ok(serde_json::from_slice(&sample(name)?)?)
}

struct Setup {
    min_severity: &'static str,
    clusters: Vec<&'static str>,
    /// `rollback_on_security_alert` of web.
    rollback: bool,
}

impl Default for Setup {
    fn default() -> Self {
        Setup {
            min_severity: "high",
            clusters: vec![AKS],
            rollback: false,
        }
    }
}

struct Harness {
    _dir: tempfile::TempDir,
    deploy_dir: PathBuf,
    store: Arc<dyn StateStore>,
    bus: EmbeddedBus,
    flaky: Arc<FlakyBus>,
    runs: RunStore,
    config: Arc<Config>,
    deps: Arc<Deps>,
    router: Router,
}

impl Harness {
    /// On the embedded on-disk store.
    async fn new(setup: Setup) -> Result<Harness> {
        let dir = tempfile::tempdir()?;
        let store: Arc<dyn StateStore> = Arc::new(FsStore::open(dir.path().join("store"))?);
        Harness::on(setup, dir, store).await
    }

    /// On Blob Storage (Azurite, a fresh container): real ETags and
    /// conditional requests.
    async fn azurite(setup: Setup) -> Result<Harness> {
        let azurite = gantry_testkit::Azurite::shared().context("Azurite is required")?;
        let store = gantry_store::blob::BlobStore::connect(
            &azurite.connection_string(),
            &gantry_testkit::unique_name("sec"),
            None,
        )?
        .with_timeout(Duration::from_secs(20));
        store.ensure_container().await?;
        Harness::on(setup, tempfile::tempdir()?, Arc::new(store)).await
    }

    async fn on(
        setup: Setup,
        dir: tempfile::TempDir,
        store: Arc<dyn StateStore>,
    ) -> Result<Harness> {
        let bus = EmbeddedBus::open(
            dir.path().join("bus"),
            QueueOptions {
                duplicate_detection_window: Duration::ZERO,
                ..QueueOptions::default()
            },
        )
        .await?;
        let flaky = Arc::new(FlakyBus::new(bus.clone()));
        let runs = RunStore::new(store.clone());
        let deploy_dir = dir.path().join("deploy");
        let clusters: Vec<String> = setup.clusters.iter().map(|c| format!("{c:?}")).collect();
        let text = format!(
            "[[apps]]\nname = \"web\"\nrepo = \"contoso/web\"\nimage = \"contoso.azurecr.io/web\"\n\
             rollback_on_security_alert = {}\n\n\
             [[apps]]\nname = \"api\"\nrepo = \"contoso/api\"\nimage = \"contoso.azurecr.io/api\"\n\n\
             [security]\nmin_severity = {:?}\nclusters = [{}]\n\n[deploy]\ndir = {:?}\n",
            setup.rollback,
            setup.min_severity,
            clusters.join(", "),
            deploy_dir.display().to_string()
        );
        let config = Arc::new(Config::parse(&text, "test.toml")?);
        let deps = Arc::new(Deps {
            runs: runs.clone(),
            bus: flaky.clone(),
            config: config.clone(),
            secrets: Secrets::default(),
            services: Default::default(),
        });
        let router = gantry_runtime::app(
            deps.clone(),
            &[fn_security_event::function(), fn_deploy::function()],
        );
        Ok(Harness {
            _dir: dir,
            deploy_dir,
            store,
            bus,
            flaky,
            runs,
            config,
            deps,
            router,
        })
    }

    /// Delivers `body` on `security-events` as the host does; returns the
    /// status and the one log line.
    async fn deliver(&self, body: &[u8], delivery_count: u32) -> Result<(StatusCode, String)> {
        self.deliver_as(body, "3c1d0f6e9b8a4c2d8e7f6a5b4c3d2e1f", delivery_count)
            .await
    }

    /// Like [`Harness::deliver`] with the message's own MessageId.
    async fn deliver_as(
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
            "2026-11-27T07:15:00.1234567Z",
            &BTreeMap::new(),
        );
        self.post("/security-event", &envelope).await
    }

    async fn deliver_ok(&self, body: &[u8]) -> Result<String> {
        let (status, line) = self.deliver(body, 1).await?;
        ensure!(status == StatusCode::OK, "{status}: {line}");
        ensure!(!line.starts_with("rejected"), "{line}");
        Ok(line)
    }

    async fn post(
        &self,
        path: &str,
        envelope: &impl serde::Serialize,
    ) -> Result<(StatusCode, String)> {
        let request = Request::post(path)
            .header("content-type", "application/json")
            .body(Body::from(serde_json::to_vec(envelope)?))?;
        let response = self.router.clone().oneshot(request).await?;
        let status = response.status();
        let bytes = response.into_body().collect().await?.to_bytes();
        let reply: Value = serde_json::from_slice(&bytes)
            .with_context(|| format!("{status}: not JSON: {}", String::from_utf8_lossy(&bytes)))?;
        let logs = reply["Logs"].as_array().context("Logs")?;
        ensure!(logs.len() == 1, "{reply}");
        Ok((status, logs[0].as_str().context("log line")?.to_string()))
    }

    /// A run of `app` for `digest` in `status`, stored with its digest index,
    /// as registry-push and the later steps leave it.
    async fn run_for(&self, app: &str, digest: &str, status: RunStatus) -> Result<Run> {
        let run = fixtures::with_image(fixtures::run(app, status)?, digest)?;
        ensure!(self.runs.create(&run).await?);
        self.runs
            .claim_digest(&run.app, &Digest::parse(digest)?, &run.id)
            .await?;
        Ok(run)
    }

    /// A run from [`Harness::run_for`] whose scan and policy gates passed
    /// (the policy with the hash of the manifests rendered now).
    async fn gated_run(&self, app: &str, digest: &str, status: RunStatus) -> Result<Run> {
        let mut run = self.run_for(app, digest, status).await?;
        let hash = self.render(&run)?.hash;
        fixtures::gates_passed(&mut run, SCAN_SUMMARY, &hash);
        let steps = run.steps.clone();
        self.runs
            .update(&run.app, &run.id, |r| {
                r.steps = steps.clone();
                Ok(true)
            })
            .await?;
        Ok(run)
    }

    /// `apps/{app}/deployed.json` naming `current` and `previous`.
    async fn deployed(&self, current: &Run, previous: Option<&Run>) -> Result<()> {
        let version = |run: &Run| -> Result<DeployedVersion> {
            Ok(DeployedVersion {
                digest: run.image.as_ref().context("image")?.digest.clone(),
                run_id: run.id.clone(),
                manifest_hash: self.render(run)?.hash,
            })
        };
        let deployed = Deployed {
            current: Some(version(current)?),
            previous: previous.map(version).transpose()?,
        };
        self.runs
            .put_json(&format!("apps/{}/deployed.json", current.app), &deployed)
            .await?;
        Ok(())
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

    async fn names(&self, prefix: &str) -> Result<Vec<String>> {
        Ok(self.runs.list_all(prefix).await?)
    }

    /// Every blob and its bytes, except the audit trail.
    async fn snapshot(&self) -> Result<BTreeMap<String, Vec<u8>>> {
        let mut out = BTreeMap::new();
        for name in self.runs.list_all("").await? {
            if name.starts_with("audit/") {
                continue;
            }
            let blob = self.store.get(&name).await?.context("listed blob gone")?;
            out.insert(name, blob.body);
        }
        Ok(out)
    }

    async fn alerts(&self) -> Result<Vec<(MessageView, Value)>> {
        self.bus
            .peek("alerts")
            .await
            .into_iter()
            .map(|m| {
                let body = serde_json::from_str(&m.body)?;
                Ok((m, body))
            })
            .collect()
    }

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

    /// The manifests as the current configuration renders them for `run`.
    fn render(&self, run: &Run) -> Result<gantry_manifests::Rendered> {
        let image = run.image.as_ref().context("image")?;
        Ok(gantry_manifests::render(&gantry_manifests::RenderInput {
            app: self.config.app(run.app.as_str()).context("app")?,
            digest: &image.digest,
            registry_image: &format!("{}/{}", image.registry, image.repository),
            run_id: Some(&run.id),
            commit: run.source.commit.as_ref(),
            verdicts: Some(SCAN_SUMMARY),
        })?)
    }
}

fn key_of(sample: &Value) -> String {
    let id = sample["SystemAlertId"]
        .as_str()
        .or(sample["properties"]["systemAlertId"].as_str())
        .unwrap_or_default();
    security_key(id)
}

/// Turns every object key into PascalCase (`systemAlertId` → `SystemAlertId`),
/// keeping `$id`/`$ref`: the other casing of a camelCase sample.
fn pascal(v: &Value) -> Value {
    match v {
        Value::Object(map) => Value::Object(
            map.iter()
                .map(|(k, v)| {
                    let mut chars = k.chars();
                    let key = match chars.next() {
                        Some(first) if k != "$id" && k != "$ref" => {
                            first.to_uppercase().chain(chars).collect()
                        }
                        _ => k.clone(),
                    };
                    (key, pascal(v))
                })
                .collect(),
        ),
        Value::Array(items) => Value::Array(items.iter().map(pascal).collect()),
        other => other.clone(),
    }
}

/// Turns every object key into camelCase.
fn camel(v: &Value) -> Value {
    match v {
        Value::Object(map) => Value::Object(
            map.iter()
                .map(|(k, v)| {
                    let mut chars = k.chars();
                    let key = match chars.next() {
                        Some(first) => first.to_lowercase().chain(chars).collect(),
                        None => String::new(),
                    };
                    (key, camel(v))
                })
                .collect(),
        ),
        Value::Array(items) => Value::Array(items.iter().map(camel).collect()),
        other => other.clone(),
    }
}

#[test]
fn samples_decode_the_same_in_both_casings() -> Result<()> {
    for name in [PASCAL, CAMEL, UNCORRELATED, SUB] {
        let original = sample_json(name)?;
        let events = decode(&sample(name)?)?;
        ensure!(events.len() == 1, "{name}");
        for other in [pascal(&original), camel(&original)] {
            let again = decode(&serde_json::to_vec(&other)?)?;
            // The findings mapping reads additionalData in either casing too,
            // but the raw value is kept as sent: compare the decoded facts.
            let facts = |e: &DefenderEvent| -> Result<Value> {
                let mut v = serde_json::to_value(e)?;
                if let Some(o) = v.as_object_mut() {
                    o.remove("additional_data");
                    // Extended property names are free text, not schema: the
                    // casing transforms rename them too.
                    if let Some(Value::Object(props)) = o.get_mut("extended_properties") {
                        *props = props
                            .iter()
                            .map(|(k, v)| (k.to_ascii_lowercase(), v.clone()))
                            .collect();
                    }
                }
                Ok(v)
            };
            assert_eq!(facts(&again[0])?, facts(&events[0])?, "{name}");
        }
    }
    // What each sample says.
    let DefenderEvent::Alert(a) = &decode(&sample(PASCAL)?)?[0] else {
        anyhow::bail!("not an alert")
    };
    assert_eq!(
        a.system_alert_id,
        "2517493845712345678_4f9c2d1e-8b7a-4c3d-9e2f-1a0b3c4d5e6f"
    );
    assert_eq!(a.alert_type, "K8S.NODE_DigitalCurrencyMining");
    assert_eq!(a.namespaces.len(), 1);
    assert_eq!(a.namespaces[0].name, "web");
    assert_eq!(a.namespaces[0].cluster.as_deref(), Some(AKS));
    assert_eq!(a.digests(), [WEB]);
    let DefenderEvent::Alert(a) = &decode(&sample(CAMEL)?)?[0] else {
        anyhow::bail!("not an alert")
    };
    assert_eq!(a.namespaces[0].name, "api");
    assert_eq!(a.digests(), [API]);
    assert!(
        a.arm_id
            .as_deref()
            .is_some_and(|i| i.ends_with(&a.system_alert_id))
    );
    let DefenderEvent::SubAssessment(s) = &decode(&sample(SUB)?)?[0] else {
        anyhow::bail!("not a sub-assessment")
    };
    assert_eq!(s.digest.as_deref(), Some(WEB));
    assert_eq!(s.registry_host.as_deref(), Some("contoso.azurecr.io"));
    assert_eq!(s.repository.as_deref(), Some("web"));
    assert_eq!(
        s.assessed_resource_type.as_deref(),
        Some("AzureContainerRegistryVulnerability")
    );
    // A batch decodes to its events in order.
    let batch = serde_json::to_vec(&json!([sample_json(PASCAL)?, sample_json(SUB)?]))?;
    assert_eq!(decode(&batch)?.len(), 2);
    Ok(())
}

#[tokio::test]
async fn pascal_alert_correlates_by_namespace_and_digest_and_blocks_it() -> Result<()> {
    let h = Harness::new(Setup::default()).await?;
    let web = h.run_for("web", WEB, RunStatus::Deployed).await?;
    let api = h.run_for("api", API, RunStatus::Deployed).await?;
    let line = h.deliver_ok(&sample(PASCAL)?).await?;
    let key = key_of(&sample_json(PASCAL)?);

    let record = h
        .blob(&format!("apps/web/security/{key}.json"))
        .await?
        .with_context(|| format!("no record: {line}"))?;
    assert_eq!(record["severity"], "high");
    assert_eq!(record["kind"], "alert");
    let by: Vec<&str> = record["correlated_by"]
        .as_array()
        .context("correlated_by")?
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert!(
        by.iter()
            .any(|r| r.starts_with("namespace web in cluster aks-prod")),
        "{by:?}"
    );
    assert!(
        by.iter().any(|r| r.starts_with(&format!("digest {WEB}"))),
        "{by:?}"
    );
    assert_eq!(record["blocked"], json!([WEB]));
    assert!(record["alerted_at"].is_string(), "{record}");

    let blocked = h
        .blob(&format!("apps/web/blocked/{WEB}"))
        .await?
        .context("digest not blocked")?;
    assert_eq!(blocked["digest"], WEB);
    assert_eq!(blocked["run_id"], web.id.to_string());
    assert_eq!(blocked["step"], "security");
    assert!(
        blocked["reason"]
            .as_str()
            .is_some_and(|r| r.contains("Digital currency mining"))
    );

    let stored = h.run(&web).await?;
    assert_eq!(stored.security_alerts.len(), 1);
    assert_eq!(stored.security_alerts[0].key, key);
    assert!(stored.security_alerts[0].blocked);
    assert_eq!(
        stored.status,
        RunStatus::Deployed,
        "the run's own status is its history"
    );

    // Nothing about the other app.
    assert!(h.names("apps/api/").await?.is_empty());
    assert!(h.run(&api).await?.security_alerts.is_empty());
    assert!(h.names("security/unmatched/").await?.is_empty());

    let alerts = h.alerts().await?;
    assert_eq!(alerts.len(), 1, "{alerts:#?}");
    assert_eq!(alerts[0].0.message_id, format!("security:{key}:web"));
    assert_eq!(alerts[0].1["severity"], "high");
    assert_eq!(alerts[0].1["app"], "web");
    assert_eq!(alerts[0].1["digest"], WEB);
    assert_eq!(alerts[0].1["run_id"], web.id.to_string());
    assert_eq!(h.audit("security.alert-recorded").await?.len(), 1);
    assert!(
        h.bus.peek("deploy").await.is_empty(),
        "no rollback without the opt-in"
    );
    Ok(())
}

#[tokio::test]
async fn camel_arm_alert_correlates_to_its_app_only() -> Result<()> {
    let h = Harness::new(Setup::default()).await?;
    let web = h.run_for("web", WEB, RunStatus::Deployed).await?;
    let api = h.run_for("api", API, RunStatus::Verifying).await?;
    h.deliver_ok(&sample(CAMEL)?).await?;
    let key = key_of(&sample_json(CAMEL)?);
    let record = h
        .blob(&format!("apps/api/security/{key}.json"))
        .await?
        .context("no record")?;
    assert_eq!(record["app"], "api");
    assert!(h.blob(&format!("apps/api/blocked/{API}")).await?.is_some());
    assert!(h.names("apps/web/").await?.is_empty());
    assert!(h.run(&web).await?.security_alerts.is_empty());
    assert_eq!(h.run(&api).await?.security_alerts.len(), 1);
    let alerts = h.alerts().await?;
    assert_eq!(alerts.len(), 1);
    assert_eq!(alerts[0].0.message_id, format!("security:{key}:api"));
    Ok(())
}

#[tokio::test]
async fn namespace_alone_records_but_blocks_nothing() -> Result<()> {
    // No run or deployment holds the alert's digest: the namespace in the
    // managed cluster is what places it; there is no digest of web to block.
    let h = Harness::new(Setup::default()).await?;
    h.deliver_ok(&sample(PASCAL)?).await?;
    let key = key_of(&sample_json(PASCAL)?);
    let record = h
        .blob(&format!("apps/web/security/{key}.json"))
        .await?
        .context("no record")?;
    assert_eq!(
        record["correlated_by"],
        json!(["namespace web in cluster aks-prod"])
    );
    assert_eq!(record["blocked"], json!([]));
    assert!(h.names("apps/web/blocked/").await?.is_empty());
    let alerts = h.alerts().await?;
    assert_eq!(alerts.len(), 1);
    assert_eq!(alerts[0].1["severity"], "high");
    Ok(())
}

#[tokio::test]
async fn digest_alone_correlates_through_deployed_json() -> Result<()> {
    // No managed cluster configured: the namespace counts for nothing, the
    // digest api runs (deployed.json) is what places the alert.
    let h = Harness::new(Setup {
        clusters: vec![],
        ..Setup::default()
    })
    .await?;
    let previous = h.run_for("api", OLD, RunStatus::Deployed).await?;
    let run_id = gantry_pipeline::ids::new_run_id(1_800_000_000_000);
    let deployed = Deployed {
        current: Some(DeployedVersion {
            digest: Digest::parse(API)?,
            run_id: run_id.clone(),
            manifest_hash: "h".repeat(64),
        }),
        previous: Some(DeployedVersion {
            digest: Digest::parse(OLD)?,
            run_id: previous.id.clone(),
            manifest_hash: "g".repeat(64),
        }),
    };
    h.runs.put_json("apps/api/deployed.json", &deployed).await?;
    h.deliver_ok(&sample(CAMEL)?).await?;
    let key = key_of(&sample_json(CAMEL)?);
    let record = h
        .blob(&format!("apps/api/security/{key}.json"))
        .await?
        .context("no record")?;
    assert_eq!(
        record["correlated_by"],
        json!([format!("digest {API} (deployed)")])
    );
    let blocked = h
        .blob(&format!("apps/api/blocked/{API}"))
        .await?
        .context("not blocked")?;
    assert_eq!(blocked["run_id"], run_id.to_string());
    assert!(h.blob(&format!("apps/api/blocked/{OLD}")).await?.is_none());
    Ok(())
}

#[tokio::test]
async fn sub_assessment_blocks_the_digest() -> Result<()> {
    let h = Harness::new(Setup::default()).await?;
    let web = h.run_for("web", WEB, RunStatus::Scanning).await?;
    let line = h.deliver_ok(&sample(SUB)?).await?;
    assert!(line.contains("CVE-2024-6387"), "{line}");
    let names = h.names("apps/web/security/").await?;
    assert_eq!(names.len(), 1, "{names:?}");
    let record = h.blob(&names[0]).await?.context("record")?;
    assert_eq!(record["kind"], "sub-assessment");
    assert_eq!(record["severity"], "high");
    assert_eq!(record["findings"][0]["id"], "CVE-2024-6387");
    assert_eq!(record["findings"][0]["severity"], "critical");
    assert_eq!(record["findings"][0]["fixed_version"], "1:9.2p1-2+deb12u3");
    let by = record["correlated_by"].to_string();
    assert!(by.contains("image contoso.azurecr.io/web"), "{by}");
    let blocked = h
        .blob(&format!("apps/web/blocked/{WEB}"))
        .await?
        .context("not blocked")?;
    assert_eq!(blocked["step"], "security");
    assert!(h.run(&web).await?.security_alerts[0].blocked);
    Ok(())
}

#[tokio::test]
async fn below_threshold_records_without_blocking() -> Result<()> {
    let h = Harness::new(Setup::default()).await?;
    let web = h.run_for("web", WEB, RunStatus::Deployed).await?;
    let mut medium = sample_json(PASCAL)?;
    medium["Severity"] = json!("Medium");
    h.deliver_ok(&serde_json::to_vec(&medium)?).await?;
    let key = key_of(&medium);
    let record = h
        .blob(&format!("apps/web/security/{key}.json"))
        .await?
        .context("no record")?;
    assert_eq!(record["severity"], "medium");
    assert_eq!(record["blocked"], json!([]));
    assert!(h.names("apps/web/blocked/").await?.is_empty());
    let stored = h.run(&web).await?;
    assert_eq!(stored.security_alerts.len(), 1);
    assert!(!stored.security_alerts[0].blocked);
    let alerts = h.alerts().await?;
    assert_eq!(alerts.len(), 1);
    assert_eq!(alerts[0].1["severity"], "warning");

    // The same alert with a lower threshold blocks.
    let h = Harness::new(Setup {
        min_severity: "medium",
        ..Setup::default()
    })
    .await?;
    h.run_for("web", WEB, RunStatus::Deployed).await?;
    h.deliver_ok(&serde_json::to_vec(&medium)?).await?;
    assert!(h.blob(&format!("apps/web/blocked/{WEB}")).await?.is_some());
    Ok(())
}

#[tokio::test]
async fn uncorrelated_alert_is_recorded_and_alerted_once() -> Result<()> {
    let h = Harness::new(Setup::default()).await?;
    h.run_for("web", WEB, RunStatus::Deployed).await?;
    let body = sample(UNCORRELATED)?;
    let line = h.deliver_ok(&body).await?;
    assert!(line.contains("matches no app"), "{line}");
    let key = key_of(&sample_json(UNCORRELATED)?);
    let record = h
        .blob(&format!("security/unmatched/{key}.json"))
        .await?
        .context("not recorded")?;
    assert_eq!(
        record["alert_id"],
        "2517493777000011111_0a9b8c7d-6e5f-4a3b-2c1d-0e9f8a7b6c5d"
    );
    assert_eq!(record["severity"], "low");
    // Namespace "web", but in a cluster gantry does not manage: not web's.
    assert!(h.names("apps/web/security/").await?.is_empty());
    let alerts = h.alerts().await?;
    assert_eq!(alerts.len(), 1);
    assert_eq!(alerts[0].0.message_id, format!("security:{key}:unmatched"));
    assert_eq!(alerts[0].1["kind"], "security-alert-unmatched");
    assert_eq!(
        alerts[0].1["severity"], "warning",
        "unmatched is never quiet"
    );

    // Redelivered (the broker keeps no duplicate window here): no second alert.
    let before = h.snapshot().await?;
    let (status, _) = h.deliver(&body, 2).await?;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(h.alerts().await?.len(), 1);
    assert_eq!(h.snapshot().await?, before);
    assert_eq!(h.audit("security.alert-unmatched").await?.len(), 1);
    Ok(())
}

#[tokio::test]
async fn duplicate_delivery_changes_nothing_twice() -> Result<()> {
    duplicate_delivery(Harness::new(Setup::default()).await?).await
}

#[tokio::test]
async fn duplicate_delivery_changes_nothing_twice_on_blob_storage() -> Result<()> {
    duplicate_delivery(Harness::azurite(Setup::default()).await?).await
}

async fn duplicate_delivery(h: Harness) -> Result<()> {
    h.run_for("web", WEB, RunStatus::Deployed).await?;
    h.run_for("api", API, RunStatus::Deployed).await?;
    let batch = serde_json::to_vec(&json!([
        sample_json(PASCAL)?,
        sample_json(CAMEL)?,
        sample_json(SUB)?
    ]))?;
    h.deliver_ok(&batch).await?;
    let first = h.snapshot().await?;
    let alerts = h.alerts().await?.len();
    assert_eq!(alerts, 3, "one per app and event");
    for n in 2..=3 {
        let (status, line) = h.deliver(&batch, n).await?;
        assert_eq!(status, StatusCode::OK, "{line}");
    }
    assert_eq!(h.snapshot().await?, first);
    assert_eq!(h.alerts().await?.len(), alerts);
    assert_eq!(h.audit("security.alert-recorded").await?.len(), 3);
    Ok(())
}

#[tokio::test]
async fn transient_bus_failure_is_redelivered_and_alerts_once() -> Result<()> {
    let h = Harness::new(Setup::default()).await?;
    let web = h.run_for("web", WEB, RunStatus::Deployed).await?;
    h.flaky.fail_sends("alerts", 1);
    let body = sample(PASCAL)?;
    let (status, line) = h.deliver(&body, 1).await?;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{line}");
    assert!(line.contains("transient"), "{line}");
    // Blocked before the alert: the digest cannot deploy while it is retried.
    assert!(h.blob(&format!("apps/web/blocked/{WEB}")).await?.is_some());
    assert!(h.alerts().await?.is_empty());
    let (status, line) = h.deliver(&body, 2).await?;
    assert_eq!(status, StatusCode::OK, "{line}");
    assert_eq!(h.alerts().await?.len(), 1);
    assert_eq!(h.run(&web).await?.security_alerts.len(), 1);
    Ok(())
}

#[tokio::test]
async fn malformed_messages_are_rejected_with_nothing_written() -> Result<()> {
    let h = Harness::new(Setup::default()).await?;
    let mut bad_severity = sample_json(PASCAL)?;
    bad_severity["Severity"] = json!("Severe");
    let mut two_casings = sample_json(PASCAL)?;
    two_casings["systemAlertId"] = json!("another-id");
    let mut bad_digest = sample_json(SUB)?;
    bad_digest["properties"]["additionalData"]["artifactDetails"]["digest"] =
        json!("sha256:../../x");
    for (i, (body, reason)) in [
        (b"{not json".to_vec(), "bad message"),
        (serde_json::to_vec(&bad_severity)?, "Severity"),
        (serde_json::to_vec(&two_casings)?, "different casing"),
        (serde_json::to_vec(&bad_digest)?, "artifactDetails.digest"),
        (serde_json::to_vec(&json!({"hello": "world"}))?, "neither"),
    ]
    .into_iter()
    .enumerate()
    {
        let (status, line) = h.deliver_as(&body, &format!("bad-{i}"), 1).await?;
        assert_eq!(status, StatusCode::OK, "{line}");
        assert!(
            line.starts_with("rejected") && line.contains(reason),
            "{reason}: {line}"
        );
    }
    let names = h.names("").await?;
    assert!(
        names
            .iter()
            .all(|n| n.starts_with("rejected/security-event/") || n.starts_with("audit/")),
        "{names:#?}"
    );
    assert_eq!(h.names("rejected/security-event/").await?.len(), 5);
    let alerts = h.alerts().await?;
    assert!(
        alerts.iter().all(|(_, a)| a["kind"] == "message-rejected"),
        "{alerts:#?}"
    );
    Ok(())
}

#[tokio::test]
async fn blocked_digest_is_refused_by_the_deploy_gate() -> Result<()> {
    let h = Harness::new(Setup::default()).await?;
    // A web run that passed its gates and waits for deploy, as policy-enforce leaves it.
    let mut run = h.run_for("web", WEB, RunStatus::Deploying).await?;
    let hash = h.render(&run)?.hash;
    fixtures::gates_passed(&mut run, SCAN_SUMMARY, &hash);
    run.steps.insert("deploy".into(), Step::pending(1));
    h.runs
        .update(&run.app, &run.id, |r| {
            r.steps = run.steps.clone();
            Ok(true)
        })
        .await?;

    h.deliver_ok(&sample(SUB)?).await?;
    assert!(gantry_runtime::steps::is_blocked(&h.deps, &run.app, &Digest::parse(WEB)?).await?);

    let request = StepRequest {
        app: run.app.clone(),
        run_id: run.id.clone(),
        digest: Digest::parse(WEB)?,
        attempt: 1,
        phase: None,
    };
    let envelope = gantry_runtime::envelope::host_request_for_message(
        "message",
        false,
        &serde_json::to_vec(&request)?,
        &request.message_id("deploy"),
        1,
        Some("web"),
        "2026-11-27T07:20:00.1234567Z",
        &BTreeMap::new(),
    );
    let (status, line) = h.post("/deploy", &envelope).await?;
    assert_eq!(status, StatusCode::OK, "{line}");
    assert!(line.contains("is blocked"), "{line}");
    let stored = h.run(&run).await?;
    assert_eq!(stored.status, RunStatus::Blocked);
    assert_eq!(stored.steps["deploy"].status, StepStatus::Blocked);
    assert!(!h.deploy_dir.join("web").exists(), "nothing deployed");
    Ok(())
}

#[tokio::test]
async fn opted_in_app_rolls_back_to_the_previous_good_digest_once() -> Result<()> {
    let setup = Setup {
        rollback: true,
        ..Setup::default()
    };
    rollback_once(Harness::new(setup).await?).await
}

#[tokio::test]
async fn opted_in_rollback_happens_once_on_blob_storage() -> Result<()> {
    let setup = Setup {
        rollback: true,
        ..Setup::default()
    };
    rollback_once(Harness::azurite(setup).await?).await
}

async fn rollback_once(h: Harness) -> Result<()> {
    let old = h.gated_run("web", OLD, RunStatus::Deployed).await?;
    let current = h.gated_run("web", WEB, RunStatus::Deployed).await?;
    h.deployed(&current, Some(&old)).await?;
    let body = sample(PASCAL)?;
    let line = h.deliver_ok(&body).await?;
    assert!(line.contains("rolling back"), "{line}");
    let key = key_of(&sample_json(PASCAL)?);
    let alert_id = "2517493845712345678_4f9c2d1e-8b7a-4c3d-9e2f-1a0b3c4d5e6f";

    assert!(h.blob(&format!("apps/web/blocked/{WEB}")).await?.is_some());
    let record = h
        .blob(&format!("apps/web/security/{key}.json"))
        .await?
        .context("record")?;
    let rollback_id = record["rollback"]["run_id"]
        .as_str()
        .with_context(|| format!("no rollback recorded: {record}"))?;
    assert_eq!(record["rollback"]["to"], OLD);
    let rollback = h
        .runs
        .find(&gantry_pipeline::RunId::parse(rollback_id)?)
        .await?
        .context("rollback run")?;
    assert_eq!(rollback.status, RunStatus::Deploying);
    assert_eq!(
        rollback.image.as_ref().map(|i| i.digest.as_str()),
        Some(OLD)
    );
    let of = rollback.rollback.as_ref().context("not a rollback run")?;
    assert_eq!(of.requested_by, format!("defender:{alert_id}"));
    assert_eq!(of.run_id, old.id);

    let deploys = h.bus.peek("deploy").await;
    assert_eq!(deploys.len(), 1, "{deploys:#?}");
    assert_eq!(deploys[0].message_id, format!("{rollback_id}:deploy:1"));
    let alerts = h.alerts().await?;
    let ids: Vec<&str> = alerts.iter().map(|(m, _)| m.message_id.as_str()).collect();
    assert_eq!(
        ids,
        [
            format!("security:{key}:web"),
            format!("security:{key}:web:rb")
        ]
    );
    assert_eq!(alerts[1].1["kind"], "security-rollback");
    assert_eq!(alerts[1].1["severity"], "high");

    // Redelivered: no second rollback run, deploy message or alert.
    let before = h.snapshot().await?;
    let (status, line) = h.deliver(&body, 2).await?;
    assert_eq!(status, StatusCode::OK, "{line}");
    assert_eq!(h.snapshot().await?, before);
    assert_eq!(h.bus.peek("deploy").await.len(), 1);
    assert_eq!(h.alerts().await?.len(), 2);

    // The deploy step then deploys the previous good digest.
    let envelope = gantry_runtime::envelope::host_request_for_message(
        "message",
        false,
        deploys[0].body.as_bytes(),
        &deploys[0].message_id,
        1,
        deploys[0].session_id.as_deref(),
        "2026-11-27T07:30:00.1234567Z",
        &BTreeMap::new(),
    );
    let (status, line) = h.post("/deploy", &envelope).await?;
    assert_eq!(status, StatusCode::OK, "{line}");
    let deployed: Deployed = serde_json::from_value(
        h.blob("apps/web/deployed.json")
            .await?
            .context("deployed.json")?,
    )?;
    let now = deployed.current.context("current")?;
    assert_eq!(now.digest.as_str(), OLD, "{line}");
    assert_eq!(now.run_id.as_str(), rollback_id);
    Ok(())
}

#[tokio::test]
async fn opted_in_rollback_without_a_target_is_refused_and_alerted() -> Result<()> {
    let h = Harness::new(Setup {
        rollback: true,
        ..Setup::default()
    })
    .await?;
    let current = h.gated_run("web", WEB, RunStatus::Deployed).await?;
    h.deployed(&current, None).await?;
    let line = h.deliver_ok(&sample(PASCAL)?).await?;
    assert!(line.contains("rollback refused"), "{line}");
    let key = key_of(&sample_json(PASCAL)?);
    let record = h
        .blob(&format!("apps/web/security/{key}.json"))
        .await?
        .context("record")?;
    assert!(
        record["rollback"]["refused"]
            .as_str()
            .is_some_and(|r| r.contains("no previous good version")),
        "{record}"
    );
    assert!(h.blob(&format!("apps/web/blocked/{WEB}")).await?.is_some());
    assert!(h.bus.peek("deploy").await.is_empty());
    let alerts = h.alerts().await?;
    assert_eq!(alerts.len(), 2);
    assert_eq!(alerts[1].1["kind"], "security-rollback-refused");
    Ok(())
}
