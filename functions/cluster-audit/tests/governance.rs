//! Governance audits of `cluster-audit` against a faithful fake of the
//! Kubernetes API: an axum server on 127.0.0.1 that serves real list
//! responses (`kind: DeploymentList`, `DaemonSetList`, ... with items
//! without apiVersion/kind, `labelSelector` honoured), single objects, 404
//! and 403 `Status` replies, and records every request. gantry reaches it
//! through a real `kube::Client` over HTTP, fired through the real timer
//! envelope; alerts are read from the embedded `alerts` queue with their
//! MessageIds.

// Helpers outside `#[test]` functions unwrap too: a panic is a test failure.
#![allow(clippy::unwrap_used)]

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};

use anyhow::{Context, Result};
use axum::Router;
use axum::extract::State;
use gantry_bus::{EmbeddedBus, QueueOptions};
use gantry_kube::{Cluster, DAEMON_SET, KINDS};
use gantry_pipeline::{Config, RunStore};
use gantry_runtime::{Deps, Secrets, Services};
use gantry_store::StateStore;
use gantry_store::fs::FsStore;
use http::StatusCode;
use serde_json::{Value, json};
use sha2::Digest as _;

const CONFIG: &str = r#"
[[apps]]
name = "web"
repo = "contoso/web"
image = "contoso.azurecr.io/web"
replicas = 2

[apps.labels]
owner = "team-web"

[deploy]
target = "kubernetes"

[governance]
required_labels = ["app.kubernetes.io/name", "owner"]
quota_warn_ratio = 0.9

[[governance.daemonsets]]
namespace = "kube-system"
name = "microsoft-defender-collector-ds"

[[governance.daemonsets]]
namespace = "kube-system"
name = "ama-logs"
"#;

const DEPLOYMENTS: &str = "/apis/apps/v1/namespaces/web/deployments";
const QUOTAS: &str = "/api/v1/namespaces/web/resourcequotas";
const LIMIT_RANGES: &str = "/api/v1/namespaces/web/limitranges";
const DAEMONSETS: &str = "/apis/apps/v1/namespaces/kube-system/daemonsets";

/// The fake API server: objects by collection path, the requests it got,
/// and collections that answer 403 (RBAC missing).
#[derive(Default)]
struct Fake {
    collections: BTreeMap<String, Vec<Value>>,
    requests: Vec<String>,
    forbidden: BTreeSet<String>,
}

type Shared = Arc<Mutex<Fake>>;

/// `(apiVersion, kind)` of a plural the fake serves.
fn kind_of(plural: &str) -> Option<(&'static str, &'static str)> {
    KINDS
        .iter()
        .chain([&DAEMON_SET])
        .find(|k| k.plural == plural)
        .map(|k| (k.api_version, k.kind))
}

/// The collection path of an object.
fn collection_of(object: &Value) -> String {
    let kind = object["kind"].as_str().unwrap();
    let info = KINDS
        .iter()
        .chain([&DAEMON_SET])
        .find(|k| k.kind == kind)
        .unwrap();
    let prefix = if info.group.is_empty() {
        "/api/v1".to_string()
    } else {
        format!("/apis/{}/{}", info.group, info.version)
    };
    if info.namespaced {
        let ns = object["metadata"]["namespace"].as_str().unwrap();
        format!("{prefix}/namespaces/{ns}/{}", info.plural)
    } else {
        format!("{prefix}/{}", info.plural)
    }
}

fn status(code: u16, reason: &str, message: &str) -> (StatusCode, Value) {
    (
        StatusCode::from_u16(code).unwrap(),
        json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
               "message": message, "reason": reason, "code": code}),
    )
}

/// `labelSelector=k=v,k2=v2` (equality only, what gantry sends).
fn selected(object: &Value, selector: Option<&str>) -> bool {
    selector.is_none_or(|s| {
        s.split(',').filter(|t| !t.is_empty()).all(|term| {
            let (k, v) = term.split_once('=').unwrap();
            object["metadata"]["labels"][k].as_str() == Some(v)
        })
    })
}

async fn api(
    State(fake): State<Shared>,
    request: axum::extract::Request,
) -> axum::response::Response {
    let path = request.uri().path().to_string();
    let query = request.uri().query().unwrap_or("").to_string();
    let selector: Option<String> = url_decode(&query, "labelSelector");
    let mut fake = fake.lock().unwrap();
    fake.requests.push(format!(
        "{} {path}{}",
        request.method(),
        if query.is_empty() {
            String::new()
        } else {
            format!("?{query}")
        }
    ));
    let (code, body) = if request.method() != http::Method::GET {
        status(405, "MethodNotAllowed", "the fake serves reads only")
    } else if fake.forbidden.contains(&path) {
        status(403, "Forbidden", "cannot list resource in this namespace")
    } else if let Some((api_version, kind)) = kind_of(path.rsplit('/').next().unwrap_or("")) {
        // A list, as the API server answers it: `{Kind}List`, items without
        // apiVersion/kind, a resourceVersion.
        let items: Vec<Value> = fake
            .collections
            .get(&path)
            .into_iter()
            .flatten()
            .filter(|o| selected(o, selector.as_deref()))
            .map(|o| {
                let mut item = o.clone();
                let map = item.as_object_mut().unwrap();
                map.remove("apiVersion");
                map.remove("kind");
                item
            })
            .collect();
        (
            StatusCode::OK,
            json!({"apiVersion": api_version, "kind": format!("{kind}List"),
                   "metadata": {"resourceVersion": "4711"}, "items": items}),
        )
    } else {
        let (parent, name) = path.rsplit_once('/').unwrap_or(("", ""));
        match fake
            .collections
            .get(parent)
            .and_then(|c| c.iter().find(|o| o["metadata"]["name"] == name))
        {
            Some(object) => (StatusCode::OK, object.clone()),
            None => status(404, "NotFound", &format!("{name} not found")),
        }
    };
    (code, axum::Json(body)).into_response()
}

use axum::response::IntoResponse;

fn url_decode(query: &str, key: &str) -> Option<String> {
    url::form_urlencoded::parse(query.as_bytes())
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.into_owned())
}

/// A rendered object as the API server returns it: server-set fields added.
fn as_served(object: &Value) -> Value {
    let mut live = object.clone();
    live["metadata"]["uid"] = json!("0b7a3c5e-1111-2222-3333-444455556666");
    live["metadata"]["resourceVersion"] = json!("4711");
    live["metadata"]["managedFields"] = json!([{"manager": "gantry", "operation": "Apply"}]);
    match object["kind"].as_str() {
        Some("Deployment") => {
            live["spec"]["template"]["spec"]["containers"][0]["imagePullPolicy"] =
                json!("IfNotPresent");
            live["status"] = json!({"replicas": 2, "readyReplicas": 2});
        }
        Some("ResourceQuota") => {
            // The quota controller's view: hard as given, little used.
            let hard = object["spec"]["hard"].clone();
            let mut used = serde_json::Map::new();
            for key in hard.as_object().unwrap().keys() {
                used.insert(key.clone(), json!("0"));
            }
            used.insert("pods".into(), json!("2"));
            live["status"] = json!({"hard": hard, "used": used});
        }
        _ => {}
    }
    live
}

fn daemonset(name: &str, desired: i64, ready: i64) -> Value {
    json!({
        "apiVersion": "apps/v1",
        "kind": "DaemonSet",
        "metadata": {"name": name, "namespace": "kube-system", "uid": format!("uid-{name}")},
        "spec": {"selector": {"matchLabels": {"app": name}},
                 "template": {"metadata": {"labels": {"app": name}},
                              "spec": {"containers": [{"name": name, "image": "mcr.microsoft.com/x:1"}]}}},
        "status": {"currentNumberScheduled": desired, "desiredNumberScheduled": desired,
                   "numberMisscheduled": 0, "numberReady": ready, "numberAvailable": ready},
    })
}

struct Harness {
    _dir: tempfile::TempDir,
    store: Arc<FsStore>,
    bus: EmbeddedBus,
    runs: RunStore,
    config: Arc<Config>,
    router: Router,
    fake: Shared,
}

impl Harness {
    async fn new(config_text: &str) -> Result<Harness> {
        let dir = tempfile::tempdir()?;
        let store = Arc::new(FsStore::open(dir.path().join("store"))?);
        let bus = EmbeddedBus::open(dir.path().join("bus"), QueueOptions::default()).await?;
        let runs = RunStore::new(store.clone());
        let mut config = Config::parse(config_text, "test.toml")?;
        config.base_dir = Some(dir.path().to_path_buf());
        let config = Arc::new(config);

        let fake: Shared = Arc::default();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let url = format!("http://{}", listener.local_addr()?);
        let app = Router::new().fallback(api).with_state(fake.clone());
        tokio::spawn(async move { axum::serve(listener, app).await });
        let client = kube::Client::try_from(kube::Config::new(url.parse()?))?;

        let services = Services::default();
        services.insert(gantry_context::CLUSTER_KEY, Arc::new(Cluster::new(client)));
        let deps = Deps {
            runs: runs.clone(),
            bus: Arc::new(bus.clone()),
            config: config.clone(),
            secrets: Secrets::default(),
            services,
        };
        let router = gantry_runtime::app(Arc::new(deps), &[fn_cluster_audit::function()]);
        Ok(Harness {
            _dir: dir,
            store,
            bus,
            runs,
            config,
            router,
            fake,
        })
    }

    /// Records a deployed run of `web` and returns its rendered objects.
    async fn deployed(&self) -> Result<Vec<Value>> {
        let (_, objects) =
            support::deployed_web(&self.runs, &self.config, "passed: no findings").await?;
        Ok(objects)
    }

    /// Serves `objects` (as the API server holds them) and nothing else.
    fn serve(&self, objects: &[Value]) {
        let mut fake = self.fake.lock().unwrap();
        fake.collections.clear();
        for o in objects {
            fake.collections
                .entry(collection_of(o))
                .or_default()
                .push(as_served(o));
        }
    }

    /// A compliant cluster: the app's objects and both DaemonSets ready.
    fn serve_clean(&self, objects: &[Value]) {
        let mut all = objects.to_vec();
        all.push(daemonset("microsoft-defender-collector-ds", 3, 3));
        all.push(daemonset("ama-logs", 3, 3));
        self.serve(&all);
    }

    /// Changes the served objects of one collection.
    fn edit(&self, collection: &str, change: impl FnOnce(&mut Vec<Value>)) {
        let mut fake = self.fake.lock().unwrap();
        change(fake.collections.entry(collection.into()).or_default());
    }

    fn requests(&self) -> Vec<String> {
        self.fake.lock().unwrap().requests.clone()
    }

    async fn fire(&self) -> Result<(StatusCode, String)> {
        support::fire(&self.router).await
    }

    async fn fire_ok(&self) -> Result<String> {
        support::fire_ok(&self.router).await
    }

    /// Every alert on the queue: (MessageId, body).
    async fn alerts(&self) -> Result<Vec<(String, Value)>> {
        support::alerts(&self.bus).await
    }

    /// The governance alerts (MessageId `audit:_cluster:...`).
    async fn governance_alerts(&self) -> Result<Vec<(String, Value)>> {
        Ok(self
            .alerts()
            .await?
            .into_iter()
            .filter(|(id, _)| id.starts_with("audit:_cluster:"))
            .collect())
    }

    async fn cluster_state(&self) -> Result<Value> {
        let v = self
            .store
            .get("audit/state/_cluster.json")
            .await?
            .context("audit/state/_cluster.json")?;
        Ok(serde_json::from_slice(&v.body)?)
    }
}

/// The MessageId a governance finding's `n`th appearance alerts with.
fn message_id(fingerprint: &str, n: u32) -> String {
    let hash = hex::encode(sha2::Sha256::digest(fingerprint.as_bytes()));
    format!("audit:_cluster:{}:{n}", &hash[..24])
}

fn open_fingerprints(state: &Value) -> Vec<String> {
    state["open"].as_object().unwrap().keys().cloned().collect()
}

#[tokio::test]
async fn a_compliant_cluster_has_no_findings() -> Result<()> {
    let h = Harness::new(CONFIG).await?;
    let objects = h.deployed().await?;
    h.serve_clean(&objects);
    let line = h.fire_ok().await?;
    assert!(
        line.contains("governance: 0 open findings (0 new, 0 resolved) in 1 namespaces"),
        "{line}"
    );
    assert!(h.alerts().await?.is_empty(), "{:#?}", h.alerts().await?);
    let state = h.cluster_state().await?;
    assert!(open_fingerprints(&state).is_empty(), "{state}");
    assert!(state.get("error").is_none(), "{state}");
    // What governance read: one list per kind and namespace, not per object.
    let requests = h.requests();
    for wanted in [DEPLOYMENTS, QUOTAS, LIMIT_RANGES, DAEMONSETS] {
        assert!(
            requests
                .iter()
                .any(|r| r.starts_with(&format!("GET {wanted}"))),
            "{wanted} not listed: {requests:#?}"
        );
    }
    assert!(
        requests.iter().all(|r| r.starts_with("GET ")),
        "the audit only reads: {requests:#?}"
    );
    Ok(())
}

#[tokio::test]
async fn each_finding_alerts_once_and_again_when_it_returns() -> Result<()> {
    let h = Harness::new(CONFIG).await?;
    let objects = h.deployed().await?;
    h.serve_clean(&objects);
    h.fire_ok().await?;
    assert!(h.alerts().await?.is_empty());

    // Someone edits the cluster by hand.
    h.edit(DEPLOYMENTS, |ds| {
        // Drops the owner label of gantry's Deployment...
        ds[0]["metadata"]["labels"]
            .as_object_mut()
            .unwrap()
            .remove("owner");
        // ...and adds a Deployment labelled as gantry's, without any owner.
        ds.push(json!({
            "metadata": {"name": "debug", "namespace": "web",
                         "labels": {"app.kubernetes.io/name": "debug",
                                    "app.kubernetes.io/managed-by": "gantry"}},
            "spec": {"replicas": 1}
        }));
        // A Deployment of another tool is not gantry's to govern.
        ds.push(json!({
            "metadata": {"name": "sidecar-injector", "namespace": "web",
                         "labels": {"app.kubernetes.io/managed-by": "Helm"}},
            "spec": {"replicas": 1}
        }));
    });
    h.edit(DAEMONSETS, |ds| {
        ds.retain(|d| d["metadata"]["name"] != "microsoft-defender-collector-ds");
        ds[0]["status"]["numberReady"] = json!(2);
    });
    h.edit(LIMIT_RANGES, Vec::clear);
    h.edit(QUOTAS, |qs| qs[0]["status"]["used"]["pods"] = json!("4"));

    let line = h.fire_ok().await?;
    assert!(
        line.contains("governance: 6 open findings (6 new, 0 resolved)"),
        "{line}"
    );
    let expected = [
        (
            "label:web/web:owner",
            "missing-label",
            "warning",
            Some("web"),
        ),
        (
            "label:web/debug:owner",
            "missing-label",
            "warning",
            Some("web"),
        ),
        (
            "daemonset-missing:kube-system/microsoft-defender-collector-ds",
            "daemonset-missing",
            "high",
            None,
        ),
        (
            "daemonset-not-ready:kube-system/ama-logs",
            "daemonset-not-ready",
            "high",
            None,
        ),
        (
            "limitrange-missing:web",
            "limitrange-missing",
            "high",
            Some("web"),
        ),
        (
            "quota-usage:web/web:pods",
            "quota-usage",
            "high",
            Some("web"),
        ),
    ];
    let alerts = h.governance_alerts().await?;
    assert_eq!(alerts.len(), expected.len(), "{alerts:#?}");
    for (fp, kind, severity, app) in expected {
        let (_, body) = alerts
            .iter()
            .find(|(id, _)| *id == message_id(fp, 1))
            .with_context(|| format!("no alert for {fp}: {alerts:#?}"))?;
        assert_eq!(body["kind"], kind, "{body}");
        assert_eq!(body["severity"], severity, "{body}");
        assert_eq!(body["app"].as_str(), app, "{body}");
        assert_eq!(body["step"], "audit");
    }
    let reason = |fp: &str| {
        alerts
            .iter()
            .find(|(id, _)| *id == message_id(fp, 1))
            .map(|(_, b)| b["reason"].as_str().unwrap_or("").to_string())
            .unwrap_or_default()
    };
    assert_eq!(
        reason("label:web/web:owner"),
        "governance: Deployment web/web lacks the required label owner"
    );
    assert_eq!(
        reason("daemonset-not-ready:kube-system/ama-logs"),
        "governance: mandatory DaemonSet kube-system/ama-logs has 2 of 3 pods ready"
    );
    assert!(
        reason("quota-usage:web/web:pods").contains("pods used 4 of 4 (100%, warn at 90%)"),
        "{}",
        reason("quota-usage:web/web:pods")
    );
    let state = h.cluster_state().await?;
    let open = &state["open"]["quota-usage:web/web:pods"];
    assert_eq!(open["detail"]["ratio"], 1.0, "{state}");
    assert_eq!(open["severity"], "high");

    // A second sweep of the same cluster sends nothing new.
    let line = h.fire_ok().await?;
    assert!(
        line.contains("governance: 6 open findings (0 new, 0 resolved)"),
        "{line}"
    );
    assert_eq!(h.governance_alerts().await?.len(), 6);

    // The quota is deleted: its usage finding resolves, a missing quota appears.
    h.edit(QUOTAS, Vec::clear);
    let line = h.fire_ok().await?;
    assert!(
        line.contains("governance: 6 open findings (1 new, 1 resolved)"),
        "{line}"
    );
    let alerts = h.governance_alerts().await?;
    assert_eq!(alerts.len(), 7);
    let (_, body) = alerts
        .iter()
        .find(|(id, _)| *id == message_id("quota-missing:web", 1))
        .context("quota-missing alert")?;
    assert_eq!(
        body["reason"],
        "governance: namespace web has no ResourceQuota"
    );
    assert_eq!(body["severity"], "high");

    // Everything repaired: all resolved, nothing sent.
    h.serve_clean(&objects);
    let line = h.fire_ok().await?;
    assert!(
        line.contains("governance: 0 open findings (0 new, 6 resolved)"),
        "{line}"
    );
    assert_eq!(h.governance_alerts().await?.len(), 7);

    // The label is dropped again: its second appearance alerts again.
    h.edit(DEPLOYMENTS, |ds| {
        ds[0]["metadata"]["labels"]
            .as_object_mut()
            .unwrap()
            .remove("owner");
    });
    h.fire_ok().await?;
    let alerts = h.governance_alerts().await?;
    assert_eq!(alerts.len(), 8, "{alerts:#?}");
    assert!(
        alerts
            .iter()
            .any(|(id, _)| *id == message_id("label:web/web:owner", 2)),
        "{alerts:#?}"
    );
    let state = h.cluster_state().await?;
    assert_eq!(state["appearances"]["label:web/web:owner"], 2);
    Ok(())
}

#[tokio::test]
async fn a_deployment_stripped_of_every_label_is_still_found() -> Result<()> {
    let h = Harness::new(CONFIG).await?;
    let objects = h.deployed().await?;
    h.serve_clean(&objects);
    // `kubectl label deploy web owner- app.kubernetes.io/managed-by- ...`
    h.edit(DEPLOYMENTS, |ds| ds[0]["metadata"]["labels"] = json!({}));
    h.fire_ok().await?;
    let state = h.cluster_state().await?;
    assert_eq!(
        open_fingerprints(&state),
        [
            "label:web/web:app.kubernetes.io/name",
            "label:web/web:owner"
        ],
        "{state}"
    );
    Ok(())
}

#[tokio::test]
async fn a_failed_read_keeps_the_open_findings_and_records_the_error() -> Result<()> {
    let h = Harness::new(CONFIG).await?;
    let objects = h.deployed().await?;
    h.serve_clean(&objects);
    h.edit(LIMIT_RANGES, Vec::clear);
    h.fire_ok().await?;
    assert_eq!(h.governance_alerts().await?.len(), 1);

    // RBAC for DaemonSets is missing: not checked is not resolved.
    h.fake.lock().unwrap().forbidden.insert(DAEMONSETS.into());
    h.serve_clean(&objects);
    let (status, line) = h.fire().await?;
    assert_eq!(status, StatusCode::OK, "{line}");
    assert!(
        line.contains(
            "governance: not checked: listing DaemonSet in kube-system failed (HTTP 403)"
        ),
        "{line}"
    );
    let state = h.cluster_state().await?;
    assert_eq!(
        open_fingerprints(&state),
        ["limitrange-missing:web"],
        "{state}"
    );
    assert!(state["error"].as_str().unwrap().contains("403"), "{state}");
    assert_eq!(h.governance_alerts().await?.len(), 1);

    // RBAC fixed: the (repaired) finding resolves, the error clears.
    h.fake.lock().unwrap().forbidden.clear();
    let line = h.fire_ok().await?;
    assert!(
        line.contains("governance: 0 open findings (0 new, 1 resolved)"),
        "{line}"
    );
    assert!(h.cluster_state().await?.get("error").is_none());
    Ok(())
}

#[tokio::test]
async fn directory_target_skips_governance_and_says_so() -> Result<()> {
    let text = CONFIG.replace("target = \"kubernetes\"", "target = \"directory\"");
    let h = Harness::new(&text).await?;
    h.deployed().await?;
    let line = h.fire_ok().await?;
    assert!(
        line.contains("governance: skipped: the deploy target is a directory"),
        "{line}"
    );
    assert!(h.requests().is_empty(), "{:#?}", h.requests());
    assert!(h.store.get("audit/state/_cluster.json").await?.is_none());
    Ok(())
}

#[tokio::test]
async fn nothing_deployed_governs_only_the_daemonsets() -> Result<()> {
    let h = Harness::new(CONFIG).await?;
    h.serve(&[daemonset("ama-logs", 0, 0)]);
    h.fire_ok().await?;
    let state = h.cluster_state().await?;
    assert_eq!(
        open_fingerprints(&state),
        [
            "daemonset-missing:kube-system/microsoft-defender-collector-ds",
            "daemonset-not-ready:kube-system/ama-logs"
        ],
        "{state}"
    );
    assert!(
        state["open"]["daemonset-not-ready:kube-system/ama-logs"]["reason"]
            .as_str()
            .unwrap()
            .contains("scheduled on no node"),
        "{state}"
    );
    // No managed namespace: nothing listed there.
    assert!(
        h.requests().iter().all(|r| r.contains("/kube-system/")),
        "{:#?}",
        h.requests()
    );
    Ok(())
}

#[tokio::test]
async fn nothing_to_govern_reads_nothing() -> Result<()> {
    let text = CONFIG
        .split("[[governance.daemonsets]]")
        .next()
        .unwrap_or_default();
    let h = Harness::new(text).await?;
    let line = h.fire_ok().await?;
    assert!(
        line.contains(
            "governance: 0 open findings (0 new, 0 resolved) in 0 namespaces; nothing to govern"
        ),
        "{line}"
    );
    assert!(h.requests().is_empty(), "{:#?}", h.requests());
    Ok(())
}
