//! `cluster-audit` fired through the real timer envelope (`POST
//! /cluster-audit`, as the Functions host and `gantry dev` send it), against
//! fakes: a `tower-test` fake Kubernetes API server behind a real
//! `kube::Client` (under [`gantry_context::CLUSTER_KEY`]), a local HTTP fake of
//! the GitHub REST API recording every request, the embedded store and
//! queue. Alerts are read from the `alerts` queue with their MessageIds.

// Helpers outside `#[test]` functions unwrap too: a panic is a test failure.
#![allow(clippy::unwrap_used)]

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};

use anyhow::{Context, Result, ensure};
use axum::Router;
use gantry_bus::{BusError, EmbeddedBus, MessageBus, OutMessage, QueueOptions};
use gantry_kube::{Cluster, KINDS};
use gantry_pipeline::{ClaimSource, Config, Run, RunStore};
use gantry_runtime::{Deps, Secret, Secrets, Services};
use gantry_store::StateStore;
use gantry_store::fs::FsStore;
use gantry_testkit::fixtures::DIGEST;
use http::{Request, Response, StatusCode};
use kube::client::Body;
use serde_json::{Value, json};
use time::OffsetDateTime;

const OTHER: &str = "sha256:1111111111111111111111111111111111111111111111111111111111111111";
const APP: &str = "[[apps]]\nname = \"web\"\nrepo = \"contoso/web\"\nimage = \"contoso.azurecr.io/web\"\nreplicas = 2\n";

/// The embedded queue, failing sends (an outage of Service Bus) once
/// `budget` sends went through; a negative budget never fails.
struct FlakyBus {
    inner: EmbeddedBus,
    budget: Arc<AtomicI64>,
}

#[async_trait::async_trait]
impl MessageBus for FlakyBus {
    async fn send(&self, message: OutMessage) -> Result<(), BusError> {
        let left = self
            .budget
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |b| {
                (b > 0).then_some(b - 1)
            })
            .unwrap_or_else(|b| b);
        if left == 0 {
            return Err(BusError::Send {
                queue: message.queue,
                message: "service unavailable".into(),
                transient: true,
            });
        }
        self.inner.send(message).await
    }
}

/// The fake API server's objects, by REST path.
type Objects = Arc<Mutex<BTreeMap<String, Value>>>;

async fn serve_kube(
    mut handle: tower_test::mock::Handle<Request<Body>, Response<Body>>,
    objects: Objects,
) {
    while let Some((request, respond)) = handle.next_request().await {
        let path = request.uri().path().to_string();
        let method = request.method().clone();
        let found = objects.lock().unwrap().get(&path).cloned();
        // A list: the objects one segment below the path, without
        // apiVersion/kind, as the API server sends list items.
        let plural = path.rsplit('/').next().unwrap_or("");
        let listed = KINDS.iter().any(|k| k.namespaced && k.plural == plural);
        let items: Vec<Value> = objects
            .lock()
            .unwrap()
            .iter()
            .filter(|(p, _)| p.rsplit_once('/').is_some_and(|(parent, _)| parent == path))
            .map(|(_, o)| {
                let mut item = o.clone();
                let map = item.as_object_mut().unwrap();
                map.remove("apiVersion");
                map.remove("kind");
                item
            })
            .collect();
        let (status, reply) = match (method.as_str(), found) {
            ("GET", Some(object)) => (200, object),
            ("GET", None) if listed => (
                200,
                json!({"apiVersion": "v1", "kind": "List", "metadata": {"resourceVersion": "1"}, "items": items}),
            ),
            _ => (
                404,
                json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                       "message": "not found", "reason": "NotFound", "code": 404}),
            ),
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

/// The REST path of a rendered object.
fn path_of(object: &Value) -> String {
    let kind = object["kind"].as_str().unwrap();
    let info = KINDS.iter().find(|k| k.kind == kind).unwrap();
    let name = object["metadata"]["name"].as_str().unwrap();
    let prefix = if info.group.is_empty() {
        "/api/v1".to_string()
    } else {
        format!("/apis/{}/{}", info.group, info.version)
    };
    if info.namespaced {
        let ns = object["metadata"]["namespace"].as_str().unwrap();
        format!("{prefix}/namespaces/{ns}/{}/{name}", info.plural)
    } else {
        format!("{prefix}/{}/{name}", info.plural)
    }
}

/// A rendered object as the API server returns it: server-set fields added.
fn as_served(object: &Value) -> Value {
    let mut live = object.clone();
    live["metadata"]["uid"] = json!("0b7a3c5e-1111-2222-3333-444455556666");
    live["metadata"]["resourceVersion"] = json!("4711");
    live["metadata"]["managedFields"] = json!([{"manager": "gantry", "operation": "Apply"}]);
    live["metadata"]["labels"]["kubernetes.io/metadata.name"] = json!("web");
    if object["kind"] == "Deployment" {
        live["spec"]["template"]["spec"]["containers"][0]["imagePullPolicy"] =
            json!("IfNotPresent");
        live["status"] = json!({"replicas": 2, "readyReplicas": 2});
    }
    live
}

struct Harness {
    dir: tempfile::TempDir,
    store: Arc<FsStore>,
    bus: EmbeddedBus,
    runs: RunStore,
    config: Arc<Config>,
    router: Router,
    objects: Objects,
    bus_budget: Arc<AtomicI64>,
}

impl Harness {
    async fn new(extra: &str) -> Result<Harness> {
        let dir = tempfile::tempdir()?;
        let store = Arc::new(FsStore::open(dir.path().join("store"))?);
        let bus = EmbeddedBus::open(dir.path().join("bus"), QueueOptions::default()).await?;
        let runs = RunStore::new(store.clone());
        let text = format!("{APP}\n{extra}");
        let mut config = Config::parse(&text, "test.toml")?;
        config.base_dir = Some(dir.path().to_path_buf());
        let config = Arc::new(config);

        let objects: Objects = Arc::default();
        let (service, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
        tokio::spawn(serve_kube(handle, objects.clone()));
        let services = Services::default();
        services.insert(
            gantry_context::CLUSTER_KEY,
            Arc::new(Cluster::new(kube::Client::new(service, "default"))),
        );
        services.insert(
            fn_cluster_audit::github::TOKEN_KEY,
            Arc::new(Secret::new("ghp_test-token")),
        );
        let bus_budget = Arc::new(AtomicI64::new(-1));
        let deps = Deps {
            runs: runs.clone(),
            bus: Arc::new(FlakyBus {
                inner: bus.clone(),
                budget: bus_budget.clone(),
            }),
            config: config.clone(),
            secrets: Secrets::default(),
            services,
        };
        let router = gantry_runtime::app(Arc::new(deps), &[fn_cluster_audit::function()]);
        Ok(Harness {
            dir,
            store,
            bus,
            runs,
            config,
            router,
            objects,
            bus_budget,
        })
    }

    /// Records a deployed run of `web` for DIGEST (scan and policy passed,
    /// `deployed.json` current) and returns its rendered objects.
    async fn deployed(&self) -> Result<(Run, Vec<Value>)> {
        support::deployed_web(
            &self.runs,
            &self.config,
            "passed: no findings at or above high (1 below)",
        )
        .await
    }

    /// Serves `objects` as the live cluster state.
    fn serve(&self, objects: &[Value]) {
        let mut served = self.objects.lock().unwrap();
        served.clear();
        for o in objects {
            served.insert(path_of(o), as_served(o));
        }
    }

    /// Changes the served object at `path`.
    fn edit(&self, path: &str, change: impl FnOnce(&mut Value)) {
        let mut served = self.objects.lock().unwrap();
        change(served.get_mut(path).unwrap());
    }

    /// Fires the timer through the envelope; status and log line.
    async fn fire(&self) -> Result<(StatusCode, String)> {
        support::fire(&self.router).await
    }

    async fn fire_ok(&self) -> Result<String> {
        support::fire_ok(&self.router).await
    }

    /// Alerts on the queue: (MessageId, body).
    async fn alerts(&self) -> Result<Vec<(String, Value)>> {
        support::alerts(&self.bus).await
    }

    async fn blob(&self, name: &str) -> Result<Option<Value>> {
        match self.store.get(name).await? {
            Some(v) => Ok(Some(serde_json::from_slice(&v.body)?)),
            None => Ok(None),
        }
    }
}

const DEPLOYMENT: &str = "/apis/apps/v1/namespaces/web/deployments/web";
const SERVICE_ACCOUNT: &str = "/api/v1/namespaces/web/serviceaccounts/web";

#[tokio::test]
async fn hand_made_objects_in_the_namespace_are_policy_audited_not_drift() -> Result<()> {
    let h = Harness::new("[deploy]\ntarget = \"kubernetes\"\n").await?;
    let (_, objects) = h.deployed().await?;
    h.serve(&objects);
    // Someone `kubectl apply`d a copy of the app as `debug`, with hostPID.
    let mut debug = h.objects.lock().unwrap()[DEPLOYMENT].clone();
    debug["metadata"]["name"] = json!("debug");
    debug["spec"]["template"]["spec"]["hostPID"] = json!(true);
    h.objects.lock().unwrap().insert(
        "/apis/apps/v1/namespaces/web/deployments/debug".into(),
        debug,
    );
    let line = h.fire_ok().await?;
    assert!(!line.contains("namespace not listed"), "{line}");
    let alerts = h.alerts().await?;
    assert_eq!(alerts.len(), 1, "{line}: {alerts:#?}");
    assert_eq!(alerts[0].1["kind"], "policy-violation");
    assert_eq!(alerts[0].1["detail"]["name"], "debug");
    h.fire_ok().await?;
    assert_eq!(h.alerts().await?.len(), 1);
    Ok(())
}

/// A deleted `default-deny-egress` is drift (gone from the target) and, since
/// the live objects of the namespace are evaluated together, an `egress`
/// policy violation of the Deployment: its namespace no longer denies egress.
#[tokio::test]
async fn a_deleted_default_deny_egress_is_drift_and_an_egress_violation() -> Result<()> {
    let h = Harness::new("[deploy]\ntarget = \"kubernetes\"\n").await?;
    let (_, objects) = h.deployed().await?;
    h.serve(&objects);
    let line = h.fire_ok().await?;
    assert!(line.contains("0 open findings"), "{line}");
    let removed =
        h.objects.lock().unwrap().remove(
            "/apis/networking.k8s.io/v1/namespaces/web/networkpolicies/default-deny-egress",
        );
    assert!(
        removed.is_some(),
        "the fake serves the rendered NetworkPolicy"
    );
    let line = h.fire_ok().await?;
    let alerts = h.alerts().await?;
    assert_eq!(alerts.len(), 2, "{line}: {alerts:#?}");
    let kinds: BTreeSet<&str> = alerts
        .iter()
        .map(|(_, a)| a["kind"].as_str().unwrap())
        .collect();
    assert_eq!(kinds, BTreeSet::from(["drift", "policy-violation"]));
    let violation = &alerts
        .iter()
        .find(|(_, a)| a["kind"] == "policy-violation")
        .unwrap()
        .1;
    assert_eq!(violation["detail"]["template"], "gantryegress");
    assert_eq!(violation["detail"]["kind"], "Deployment");
    assert!(
        violation["reason"]
            .as_str()
            .unwrap()
            .contains("namespace <web> has no default-deny egress NetworkPolicy"),
        "{violation}"
    );
    Ok(())
}

fn reasons(alerts: &[(String, Value)]) -> Vec<String> {
    let mut r: Vec<String> = alerts
        .iter()
        .map(|(_, a)| a["reason"].as_str().unwrap_or("").to_string())
        .collect();
    r.sort();
    r
}

#[tokio::test]
async fn drift_alerts_once_per_finding_and_again_when_it_returns() -> Result<()> {
    let h = Harness::new("[deploy]\ntarget = \"kubernetes\"\n").await?;
    let (run, objects) = h.deployed().await?;
    h.serve(&objects);

    // (a) live objects as applied (plus server-set fields): nothing to say.
    let line = h.fire_ok().await?;
    assert!(line.contains("0 open findings"), "{line}");
    assert!(
        !line.contains("not listed") && !line.contains("not read"),
        "{line}"
    );
    assert!(h.alerts().await?.is_empty(), "{:#?}", h.alerts().await?);

    // (b) image, replica count and a label changed by hand, (c) an object gone.
    let other_image = format!("contoso.azurecr.io/web@{OTHER}");
    h.edit(DEPLOYMENT, |d| {
        d["spec"]["replicas"] = json!(5);
        d["spec"]["template"]["spec"]["containers"][0]["image"] = json!(other_image);
        d["metadata"]["labels"]
            .as_object_mut()
            .unwrap()
            .remove("app.kubernetes.io/name");
    });
    h.objects.lock().unwrap().remove(SERVICE_ACCOUNT);
    let line = h.fire_ok().await?;
    assert!(
        line.contains("4 open findings (4 new, 0 resolved)"),
        "{line}"
    );
    let alerts = h.alerts().await?;
    assert_eq!(
        reasons(&alerts),
        vec![
            format!(
                "web: Deployment web: metadata.labels[app.kubernetes.io/name] is (missing), gantry applied web"
            ),
            "web: Deployment web: spec.replicas is 5, gantry applied 2".to_string(),
            format!(
                "web: Deployment web: spec.template.spec.containers[0].image is {other_image}, gantry applied contoso.azurecr.io/web@{DIGEST}"
            ),
            "web: ServiceAccount web is gone from the target".to_string(),
        ]
    );
    for (id, alert) in &alerts {
        assert!(id.starts_with("audit:web:") && id.ends_with(":1"), "{id}");
        assert_eq!(alert["kind"], "drift");
        assert_eq!(alert["severity"], "high");
        assert_eq!(alert["run_id"], run.id.as_str());
        assert_eq!(alert["digest"], DIGEST);
    }
    let state = h.blob("audit/state/web.json").await?.context("state")?;
    assert_eq!(state["open"].as_object().unwrap().len(), 4);

    // A second sweep finds the same: no new alert.
    let line = h.fire_ok().await?;
    assert!(line.contains("(0 new, 0 resolved)"), "{line}");
    assert_eq!(h.alerts().await?.len(), 4);

    // Fixed, then drifted again: a second appearance is a new alert.
    h.edit(DEPLOYMENT, |d| d["spec"]["replicas"] = json!(2));
    let line = h.fire_ok().await?;
    assert!(
        line.contains("3 open findings (0 new, 1 resolved)"),
        "{line}"
    );
    h.edit(DEPLOYMENT, |d| d["spec"]["replicas"] = json!(3));
    h.fire_ok().await?;
    let alerts = h.alerts().await?;
    assert_eq!(alerts.len(), 5);
    let again: Vec<&(String, Value)> = alerts
        .iter()
        .filter(|(_, a)| a["reason"].as_str().unwrap().contains("spec.replicas"))
        .collect();
    assert_eq!(again.len(), 2);
    assert!(again.iter().any(|(id, _)| id.ends_with(":2")), "{again:#?}");
    assert!(
        again[1].1["reason"]
            .as_str()
            .unwrap()
            .contains("spec.replicas is 3")
    );
    Ok(())
}

/// An autoscaler (or `kubectl scale`) changes `spec.replicas` through the
/// `scale` subresource: not drift. The same change made by editing the
/// Deployment is.
#[tokio::test]
async fn replicas_changed_through_the_scale_subresource_are_not_drift() -> Result<()> {
    let h = Harness::new("[deploy]\ntarget = \"kubernetes\"\n").await?;
    let (_, objects) = h.deployed().await?;
    h.serve(&objects);
    h.edit(DEPLOYMENT, |d| {
        d["spec"]["replicas"] = json!(7);
        d["metadata"]["managedFields"] = json!([
            {"manager": "gantry", "operation": "Apply", "fieldsV1": {"f:spec": {}}},
            {"manager": "kube-controller-manager", "operation": "Update",
             "subresource": "scale", "fieldsV1": {"f:spec": {"f:replicas": {}}}}
        ]);
    });
    let line = h.fire_ok().await?;
    assert!(line.contains("0 open findings"), "{line}");
    assert!(h.alerts().await?.is_empty(), "{:#?}", h.alerts().await?);

    h.edit(DEPLOYMENT, |d| {
        d["metadata"]["managedFields"] = json!([
            {"manager": "kubectl-edit", "operation": "Update",
             "fieldsV1": {"f:spec": {"f:replicas": {}}}}
        ]);
    });
    h.fire_ok().await?;
    assert_eq!(
        reasons(&h.alerts().await?),
        vec!["web: Deployment web: spec.replicas is 7, gantry applied 2".to_string()]
    );
    Ok(())
}

#[tokio::test]
async fn alert_queue_outage_answers_503_and_the_next_sweep_repeats_the_same_ids() -> Result<()> {
    let h = Harness::new("[deploy]\ntarget = \"kubernetes\"\n").await?;
    let (_, objects) = h.deployed().await?;
    h.serve(&objects);
    h.edit(DEPLOYMENT, |d| d["spec"]["replicas"] = json!(4));
    h.objects.lock().unwrap().remove(SERVICE_ACCOUNT);
    // The first alert goes out, the second fails.
    h.bus_budget.store(1, Ordering::SeqCst);
    let (status, line) = h.fire().await?;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{line}");
    assert!(line.contains("service unavailable"), "{line}");
    let first = h.alerts().await?;
    assert_eq!(first.len(), 1);

    // Back up: both alerts are sent, the first with the same MessageId, so
    // the queue's duplicate detection keeps one.
    h.bus_budget.store(-1, Ordering::SeqCst);
    h.fire_ok().await?;
    let alerts = h.alerts().await?;
    assert_eq!(alerts.len(), 2, "{alerts:#?}");
    assert!(alerts.iter().any(|(id, _)| *id == first[0].0));
    assert!(alerts.iter().all(|(id, _)| id.ends_with(":1")));
    Ok(())
}

#[tokio::test]
async fn live_policy_violation_alerts_once() -> Result<()> {
    let h = Harness::new("[deploy]\ntarget = \"kubernetes\"\n").await?;
    let (_, objects) = h.deployed().await?;
    h.serve(&objects);
    // Not a field gantry sets (so no drift), but a policy violation.
    h.edit(DEPLOYMENT, |d| {
        d["spec"]["template"]["spec"]["hostPID"] = json!(true);
    });
    let line = h.fire_ok().await?;
    let alerts = h.alerts().await?;
    assert_eq!(alerts.len(), 1, "{line}: {alerts:#?}");
    let (_, alert) = &alerts[0];
    assert_eq!(alert["kind"], "policy-violation");
    assert_eq!(alert["detail"]["kind"], "Deployment");
    assert!(
        alert["reason"].as_str().unwrap().contains("hostPID"),
        "{alert}"
    );
    h.fire_ok().await?;
    assert_eq!(h.alerts().await?.len(), 1);
    Ok(())
}

fn trivy_report(vulns: Value) -> Value {
    json!({
        "SchemaVersion": 2,
        "CreatedAt": "2026-11-27T08:00:00Z",
        "ArtifactName": format!("contoso.azurecr.io/web@{DIGEST}"),
        "Metadata": {"RepoDigests": [format!("contoso.azurecr.io/web@{DIGEST}")]},
        "Results": [{"Target": "app", "Vulnerabilities": vulns}],
    })
}

#[tokio::test]
async fn new_critical_in_todays_report_alerts_once() -> Result<()> {
    let h = Harness::new("[deploy]\ntarget = \"kubernetes\"\n").await?;
    let (run, objects) = h.deployed().await?;
    h.serve(&objects);
    let low = json!({"VulnerabilityID": "CVE-2026-0002", "PkgName": "zlib",
                     "InstalledVersion": "1.3", "Severity": "LOW"});
    let report = trivy_report(json!([low]));
    h.store
        .create(
            &format!("scans/{DIGEST}.trivy.json"),
            &serde_json::to_vec(&report)?,
        )
        .await?;
    h.fire_ok().await?;
    assert!(h.alerts().await?.is_empty(), "below the threshold");

    // Today's data has a new critical finding for the same digest.
    let critical = json!({"VulnerabilityID": "CVE-2026-0001", "PkgName": "openssl",
                          "InstalledVersion": "3.0.1", "FixedVersion": "3.0.2", "Severity": "CRITICAL"});
    let name = format!("scans/{DIGEST}.trivy.json");
    let etag = h.store.get(&name).await?.context("report")?.etag;
    h.store
        .replace(
            &name,
            &serde_json::to_vec(&trivy_report(json!([low, critical])))?,
            &etag,
        )
        .await?;
    let line = h.fire_ok().await?;
    let alerts = h.alerts().await?;
    assert_eq!(alerts.len(), 1, "{line}: {alerts:#?}");
    let (id, alert) = &alerts[0];
    assert!(id.starts_with("rescan:web:"), "{id}");
    assert_eq!(alert["kind"], "new-vulnerability");
    assert_eq!(alert["severity"], "high");
    assert_eq!(alert["run_id"], run.id.as_str());
    assert!(alert["reason"].as_str().unwrap().contains("CVE-2026-0001"));
    let rescan = h.blob("apps/web/rescan.json").await?.context("rescan")?;
    assert_eq!(rescan["alerted"], json!(["CVE-2026-0001|openssl|3.0.1"]));
    // ...and it is open, listable with its details.
    let open = &rescan["open"]["vuln:CVE-2026-0001|openssl|3.0.1"];
    assert_eq!(open["kind"], "new-vulnerability", "{rescan:#}");
    assert_eq!(open["reason"], "CVE-2026-0001 in openssl 3.0.1 (critical)");
    let since = open["since"].clone();
    let listed = gantry_pipeline::findings::list_open(
        &h.runs,
        &gantry_pipeline::findings::FindingFilter::new(None, Some("vulnerability"))
            .map_err(anyhow::Error::msg)?,
    )
    .await?;
    assert_eq!(listed.findings.len(), 1, "{listed:#?}");
    assert_eq!(
        listed.findings[0].app.as_ref().map(|a| a.as_str()),
        Some("web")
    );

    h.fire_ok().await?;
    assert_eq!(h.alerts().await?.len(), 1, "the same finding alerts once");
    let rescan = h.blob("apps/web/rescan.json").await?.context("rescan")?;
    assert_eq!(
        rescan["open"]["vuln:CVE-2026-0001|openssl|3.0.1"]["since"], since,
        "still open since the first sweep"
    );

    // Fixed in today's data (e.g. the advisory was withdrawn): it closes.
    let etag = h.store.get(&name).await?.context("report")?.etag;
    h.store
        .replace(
            &name,
            &serde_json::to_vec(&trivy_report(json!([low])))?,
            &etag,
        )
        .await?;
    h.fire_ok().await?;
    let rescan = h.blob("apps/web/rescan.json").await?.context("rescan")?;
    assert_eq!(rescan["open"], json!({}), "{rescan:#}");
    Ok(())
}

#[tokio::test]
async fn cluster_read_failure_is_recorded_not_fatal() -> Result<()> {
    let h = Harness::new("[deploy]\ntarget = \"kubernetes\"\n").await?;
    h.deployed().await?;
    // Every object answers 404 except the Namespace, which the fake answers
    // with something that is not an object: the read fails for this app.
    h.objects
        .lock()
        .unwrap()
        .insert("/api/v1/namespaces/web".into(), json!("garbage"));
    let (status, line) = h.fire().await?;
    assert_eq!(status, StatusCode::OK, "{line}");
    assert!(line.contains("live objects not read"), "{line}");
    let state = h.blob("audit/state/web.json").await?.context("state")?;
    assert!(
        state["error"].as_str().unwrap().contains("Namespace"),
        "{state}"
    );
    // Nothing about the app; the fake serves an empty namespace, which the
    // governance audit reports (no ResourceQuota, no LimitRange).
    let alerts = h.alerts().await?;
    assert!(
        alerts
            .iter()
            .all(|(id, _)| id.starts_with("audit:_cluster:")),
        "{alerts:#?}"
    );
    Ok(())
}

#[tokio::test]
async fn directory_target_drift() -> Result<()> {
    let h = Harness::new("[deploy]\ntarget = \"directory\"\ndir = \"gitops\"\n").await?;
    let (_, objects) = h.deployed().await?;
    let folder = h.dir.path().join("gitops").join("web");
    std::fs::create_dir_all(&folder)?;
    for o in &objects {
        let yaml = gantry_manifests::to_yaml(std::slice::from_ref(o))?;
        std::fs::write(folder.join(gantry_manifests::object_file_name(o)), yaml)?;
    }
    let line = h.fire_ok().await?;
    assert!(h.alerts().await?.is_empty(), "{line}");

    let deployment = folder.join("06-deployment-web.yaml");
    let text = std::fs::read_to_string(&deployment)?;
    ensure!(text.contains("replicas: 2"), "{text}");
    std::fs::write(&deployment, text.replace("replicas: 2", "replicas: 7"))?;
    std::fs::remove_file(folder.join("07-service-web.yaml"))?;
    h.fire_ok().await?;
    assert_eq!(
        reasons(&h.alerts().await?),
        vec![
            "web: Deployment web: spec.replicas is 7, gantry applied 2",
            "web: Service web is gone from the target",
        ]
    );
    h.fire_ok().await?;
    assert_eq!(h.alerts().await?.len(), 2);
    Ok(())
}

#[tokio::test]
async fn changed_config_is_reported_instead_of_drift() -> Result<()> {
    let h = Harness::new("[deploy]\ntarget = \"kubernetes\"\n").await?;
    let (_, objects) = h.deployed().await?;
    h.serve(&objects);
    // deployed.json says another hash was deployed: the config changed since.
    let mut deployed = h
        .blob("apps/web/deployed.json")
        .await?
        .context("deployed")?;
    deployed["current"]["manifest_hash"] = json!("0".repeat(64));
    let etag = h
        .store
        .get("apps/web/deployed.json")
        .await?
        .context("d")?
        .etag;
    h.store
        .replace(
            "apps/web/deployed.json",
            &serde_json::to_vec(&deployed)?,
            &etag,
        )
        .await?;
    h.edit(DEPLOYMENT, |d| d["spec"]["replicas"] = json!(9));
    h.fire_ok().await?;
    let alerts = h.alerts().await?;
    assert_eq!(alerts.len(), 1, "{alerts:#?}");
    assert_eq!(alerts[0].1["kind"], "config-changed");
    Ok(())
}

// ---- GitHub redelivery sweep ---------------------------------------------

#[derive(Debug, Clone)]
struct GhRequest {
    method: String,
    path_and_query: String,
    authorization: String,
    accept: String,
    api_version: String,
}

#[derive(Clone)]
struct Gh {
    seen: Arc<Mutex<Vec<GhRequest>>>,
    base: String,
}

fn delivery(id: u64, guid: &str, at: &str, status: u16, redelivery: bool) -> Value {
    json!({"id": id, "guid": guid, "delivered_at": at, "redelivery": redelivery,
           "duration": 0.1, "status": "x", "status_code": status, "event": "push",
           "action": null, "installation_id": null, "repository_id": 1})
}

async fn github_fake(
    axum::extract::State(gh): axum::extract::State<Gh>,
    request: axum::extract::Request,
) -> axum::response::Response {
    use axum::response::IntoResponse;
    let header = |n: &str| {
        request
            .headers()
            .get(n)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string()
    };
    let seen = GhRequest {
        method: request.method().to_string(),
        path_and_query: request
            .uri()
            .path_and_query()
            .map(|p| p.to_string())
            .unwrap_or_default(),
        authorization: header("authorization"),
        accept: header("accept"),
        api_version: header("x-github-api-version"),
    };
    gh.seen.lock().unwrap().push(seen.clone());
    let list = "/repos/contoso/web/hooks/123/deliveries";
    match (seen.method.as_str(), seen.path_and_query.as_str()) {
        ("GET", p) if p == format!("{list}?per_page=100") => {
            let page = json!([
                delivery(101, "g-ok", "2026-11-27T08:00:50Z", 202, false),
                delivery(105, "g-later-ok", "2026-11-27T08:00:45Z", 202, true),
                delivery(102, "g-claimed", "2026-11-27T08:00:40Z", 500, false),
                delivery(103, "g-missed", "2026-11-27T08:00:30Z", 502, false),
            ]);
            let next = format!("<{}{list}?per_page=100&cursor=v1_2>; rel=\"next\"", gh.base);
            ([("link", next)], axum::Json(page)).into_response()
        }
        ("GET", p) if p == format!("{list}?per_page=100&cursor=v1_2") => {
            let page = json!([
                delivery(104, "g-later-ok", "2026-11-27T08:00:20Z", 500, false),
                delivery(106, "g-missed-2", "2026-11-27T08:00:10Z", 0, false),
                delivery(107, "g-old", "2026-11-27T07:59:50Z", 500, false),
            ]);
            let next = format!("<{}{list}?per_page=100&cursor=v1_3>; rel=\"next\"", gh.base);
            ([("link", next)], axum::Json(page)).into_response()
        }
        ("POST", p) if p.starts_with(list) && p.ends_with("/attempts") => {
            (StatusCode::ACCEPTED, axum::Json(json!({}))).into_response()
        }
        _ => (
            StatusCode::NOT_FOUND,
            axum::Json(json!({"message": "Not Found"})),
        )
            .into_response(),
    }
}

#[tokio::test]
async fn redelivers_exactly_the_missed_deliveries_and_advances_the_cursor() -> Result<()> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let base = format!("http://{}", listener.local_addr()?);
    let gh = Gh {
        seen: Arc::default(),
        base: base.clone(),
    };
    let app = Router::new().fallback(github_fake).with_state(gh.clone());
    tokio::spawn(async move { axum::serve(listener, app).await });

    let h = Harness::new(&format!(
        "[github]\napi_url = \"{base}\"\n[[github.hooks]]\nrepo = \"contoso/web\"\nid = 123\n"
    ))
    .await?;
    // The last sweep saw everything up to 08:00:00.
    h.runs
        .put_json(
            "audit/github/repo-contoso-web-123.json",
            &json!({"since": "2026-11-27T08:00:00Z"}),
        )
        .await?;
    h.runs
        .claim(ClaimSource::Github, "g-claimed", &json!({"run": "x"}))
        .await?;

    let line = h.fire_ok().await?;
    assert!(
        line.contains("github repo-contoso-web-123: 2 redelivered"),
        "{line}"
    );
    let seen = gh.seen.lock().unwrap().clone();
    let posts: Vec<&str> = seen
        .iter()
        .filter(|r| r.method == "POST")
        .map(|r| r.path_and_query.as_str())
        .collect();
    assert_eq!(
        posts,
        vec![
            "/repos/contoso/web/hooks/123/deliveries/103/attempts",
            "/repos/contoso/web/hooks/123/deliveries/106/attempts",
        ]
    );
    // Two pages read, the third not (page two reached the cursor).
    assert_eq!(seen.iter().filter(|r| r.method == "GET").count(), 2);
    for r in &seen {
        assert_eq!(r.authorization, "Bearer ghp_test-token");
        assert_eq!(r.accept, "application/vnd.github+json");
        assert_eq!(r.api_version, "2022-11-28");
    }
    let state = h
        .blob("audit/github/repo-contoso-web-123.json")
        .await?
        .context("cursor")?;
    assert_eq!(state["since"], "2026-11-27T08:00:50Z");
    assert_eq!(state["attempts"]["g-missed"]["delivery_ids"], json!([103]));
    assert!(state.get("error").is_none(), "{state}");
    let trail = h.runs.audit_day(OffsetDateTime::now_utc()).await?;
    let redelivered: Vec<&Value> = trail
        .iter()
        .filter(|e| e.action == "github.redelivery-requested")
        .map(|e| &e.detail["delivery_id"])
        .collect();
    assert_eq!(redelivered, vec![&json!(103), &json!(106)]);

    // Nothing new since: the next sweep redelivers nothing.
    gh.seen.lock().unwrap().clear();
    let line = h.fire_ok().await?;
    assert!(line.contains("0 redelivered"), "{line}");
    assert!(
        gh.seen.lock().unwrap().iter().all(|r| r.method == "GET"),
        "no POST on the second sweep"
    );
    Ok(())
}

#[tokio::test]
async fn github_unreachable_is_reported_without_failing_the_run() -> Result<()> {
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0")?;
        l.local_addr()?.port()
    };
    let h = Harness::new(&format!(
        "[github]\napi_url = \"http://127.0.0.1:{port}\"\n[[github.hooks]]\norg = \"contoso\"\nid = 9\n"
    ))
    .await?;
    let line = h.fire_ok().await?;
    assert!(
        line.contains("github org-contoso-9: 0 redelivered (listing deliveries"),
        "{line}"
    );
    assert!(!line.contains("ghp_test-token"));
    let state = h
        .blob("audit/github/org-contoso-9.json")
        .await?
        .context("state")?;
    assert!(
        state["since"].is_null(),
        "the cursor does not move: {state}"
    );
    Ok(())
}
