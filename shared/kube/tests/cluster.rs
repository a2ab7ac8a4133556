//! `Cluster` against a fake API server (a `tower-test` mock behind a real
//! `kube::Client`) that checks every request gantry sends: method, path,
//! query, content type and body, and their order. Plus one live test against
//! the cluster in `KUBECONFIG`, ignored by default.

// Helpers outside `#[test]` functions unwrap too: a panic is a test failure.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use gantry_kube::{Applied, Cluster, KubeError, Rollout};
use gantry_manifests::{APPLY_ORDER, RenderInput, render};
use gantry_pipeline::{Config, Digest};
use http::{Request, Response};
use http_body_util::BodyExt;
use kube::client::Body;
use serde_json::{Value, json};
use tokio::task::JoinHandle;
use tower_test::mock::Handle;

const CONFIG: &str = r#"
[[apps]]
name = "web"
repo = "contoso/web"
image = "contoso.azurecr.io/web"
namespace = "web"
port = 8080
replicas = 2

# Every kind gantry renders: Key Vault secrets (SecretProviderClass) and an
# Ingress.
[apps.expose]
mode = "ingress"
class = "azure-application-gateway"
host = "web.contoso.com"
source_ranges = ["10.0.4.0/24"]

[apps.keyvault]
vault_name = "kv-contoso"
tenant_id = "7d3f2a51-9c4e-4b8a-a1f6-2e5c8b9d0f13"
client_id = "0b1c2d3e-4f50-4617-8293-a4b5c6d7e8f9"

[[apps.keyvault.secrets]]
name = "db-connection"
env = "DATABASE_URL"
"#;

fn objects() -> Vec<Value> {
    let app = Config::parse(CONFIG, "test").unwrap().apps.remove(0);
    let digest = Digest::parse(&format!("sha256:{}", "ab".repeat(32))).unwrap();
    render(&RenderInput {
        app: &app,
        digest: &digest,
        registry_image: &app.image,
        run_id: None,
        commit: None,
        verdicts: Some("scan: passed; policy: passed"),
    })
    .unwrap()
    .objects
}

/// One request as the fake API server saw it.
#[derive(Debug)]
struct Seen {
    method: String,
    path: String,
    query: String,
    content_type: String,
    body: Value,
}

type Reply = (u16, Value);

/// A Cluster on a mock service, and the fake API server answering it with
/// `reply`; the server's task returns every request once the client is gone.
fn fake_cluster(
    reply: impl Fn(&Seen) -> Reply + Send + 'static,
) -> (Cluster, JoinHandle<Vec<Seen>>) {
    let (service, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let client = kube::Client::new(service, "default");
    let server = tokio::spawn(serve(handle, reply));
    (Cluster::new(client), server)
}

async fn serve(
    mut handle: Handle<Request<Body>, Response<Body>>,
    reply: impl Fn(&Seen) -> Reply,
) -> Vec<Seen> {
    let mut seen = Vec::new();
    while let Some((request, respond)) = handle.next_request().await {
        let (parts, body) = request.into_parts();
        let bytes = body.collect().await.unwrap().to_bytes();
        let request = Seen {
            method: parts.method.to_string(),
            path: parts.uri.path().to_string(),
            query: parts.uri.query().unwrap_or("").to_string(),
            content_type: parts
                .headers
                .get(http::header::CONTENT_TYPE)
                .map(|v| v.to_str().unwrap().to_string())
                .unwrap_or_default(),
            body: if bytes.is_empty() {
                Value::Null
            } else {
                serde_json::from_slice(&bytes).unwrap()
            },
        };
        let (status, body) = reply(&request);
        seen.push(request);
        respond.send_response(
            Response::builder()
                .status(status)
                .header("content-type", "application/json")
                .body(Body::from(serde_json::to_vec(&body).unwrap()))
                .unwrap(),
        );
    }
    seen
}

/// Waits for the fake server to see the client go away.
async fn requests(cluster: Cluster, server: JoinHandle<Vec<Seen>>) -> Vec<Seen> {
    drop(cluster);
    tokio::time::timeout(Duration::from_secs(5), server)
        .await
        .expect("the fake API server ends when the client is dropped")
        .unwrap()
}

/// (method, path) of each request, in order.
fn calls(seen: &[Seen]) -> Vec<(&str, &str)> {
    seen.iter()
        .map(|s| (s.method.as_str(), s.path.as_str()))
        .collect()
}

/// `remove_stale` for app `web` when neither optional kind is rendered.
async fn remove_both_stale(cluster: &Cluster) -> Result<Vec<(String, String)>, KubeError> {
    cluster
        .remove_stale(
            "web",
            "web",
            &objects_without(&["Ingress", "SecretProviderClass"]),
        )
        .await
}

/// What a real API server returns for an apply: the object with server
/// fields, the Deployment at generation 7.
fn echo(seen: &Seen) -> Reply {
    let mut object = seen.body.clone();
    let generation = if object["kind"] == "Deployment" { 7 } else { 1 };
    object["metadata"]["generation"] = json!(generation);
    object["metadata"]["uid"] = json!("6f1c1a52-0000-4000-8000-000000000001");
    object["metadata"]["resourceVersion"] = json!("12345");
    (200, object)
}

fn status(code: u16, reason: &str, message: &str) -> Reply {
    (
        code,
        json!({
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": message,
            "reason": reason,
            "code": code,
        }),
    )
}

const EXPECTED_PATHS: [&str; 12] = [
    "/api/v1/namespaces/web",
    "/api/v1/namespaces/web/resourcequotas/web",
    "/api/v1/namespaces/web/limitranges/web",
    "/apis/networking.k8s.io/v1/namespaces/web/networkpolicies/default-deny-egress",
    "/apis/networking.k8s.io/v1/namespaces/web/networkpolicies/default-deny-ingress",
    "/apis/networking.k8s.io/v1/namespaces/web/networkpolicies/web-allow-egress",
    "/apis/networking.k8s.io/v1/namespaces/web/networkpolicies/web-allow-http",
    "/apis/secrets-store.csi.x-k8s.io/v1/namespaces/web/secretproviderclasses/web",
    "/api/v1/namespaces/web/serviceaccounts/web",
    "/apis/apps/v1/namespaces/web/deployments/web",
    "/api/v1/namespaces/web/services/web",
    "/apis/networking.k8s.io/v1/namespaces/web/ingresses/web",
];

fn assert_server_side_apply(seen: &Seen) {
    assert_eq!(seen.method, "PATCH", "{}", seen.path);
    let query: Vec<&str> = seen.query.split('&').collect();
    assert!(query.contains(&"fieldManager=gantry"), "{}", seen.query);
    assert!(query.contains(&"force=true"), "{}", seen.query);
    assert_eq!(seen.content_type, "application/apply-patch+yaml");
}

#[tokio::test]
async fn applies_rendered_objects_in_order_by_server_side_apply() {
    let objects = objects();
    let (cluster, server) = fake_cluster(echo);
    let applied = cluster.apply(&objects).await.unwrap();
    let seen = requests(cluster, server).await;

    let paths: Vec<&str> = seen.iter().map(|s| s.path.as_str()).collect();
    assert_eq!(paths, EXPECTED_PATHS);
    for (request, object) in seen.iter().zip(&objects) {
        assert_server_side_apply(request);
        assert_eq!(&request.body, object, "{}", request.path);
    }
    let kinds: Vec<&str> = seen
        .iter()
        .map(|s| s.body["kind"].as_str().unwrap())
        .collect();
    let mut order = kinds.clone();
    order.dedup();
    assert_eq!(order, APPLY_ORDER);
    assert_eq!(
        applied,
        Applied {
            objects: seen
                .iter()
                .map(|s| {
                    let kind = s.body["kind"].as_str().unwrap().to_string();
                    let name = s.body["metadata"]["name"].as_str().unwrap().to_string();
                    (kind, name)
                })
                .collect(),
            deployment_generation: Some(7),
        }
    );
}

#[tokio::test]
async fn apply_order_does_not_depend_on_the_given_order() {
    let mut objects = objects();
    objects.reverse();
    let (cluster, server) = fake_cluster(echo);
    cluster.apply(&objects).await.unwrap();
    let seen = requests(cluster, server).await;
    let paths: Vec<&str> = seen.iter().map(|s| s.path.as_str()).collect();
    // The NetworkPolicies keep their (here reversed) relative order.
    let mut expected = EXPECTED_PATHS;
    expected[3..7].reverse();
    assert_eq!(paths, expected);
}

#[tokio::test]
async fn invalid_objects_apply_nothing() {
    let cases = [
        (
            json!({ "apiVersion": "v1", "kind": "Secret", "metadata": { "name": "s", "namespace": "web" } }),
            "not one gantry applies",
        ),
        (
            json!({ "apiVersion": "extensions/v1beta1", "kind": "Deployment", "metadata": { "name": "web", "namespace": "web" } }),
            "apiVersion",
        ),
        (
            json!({ "apiVersion": "v1", "kind": "Service", "metadata": { "name": "web" } }),
            "metadata.namespace is missing",
        ),
        (
            json!({ "apiVersion": "v1", "kind": "Service", "metadata": { "namespace": "web" } }),
            "metadata.name is missing",
        ),
        (
            json!({ "apiVersion": "v1", "kind": "Namespace", "metadata": { "name": "web", "namespace": "x" } }),
            "cluster-scoped",
        ),
    ];
    for (bad, expected) in cases {
        let mut objects = objects();
        objects.push(bad);
        let (cluster, server) = fake_cluster(echo);
        let err = cluster.apply(&objects).await.unwrap_err();
        assert!(
            matches!(&err, KubeError::InvalidObject { position: 12, .. }),
            "{err:?}"
        );
        assert!(err.to_string().contains(expected), "{err}");
        assert!(!err.is_transient());
        assert!(requests(cluster, server).await.is_empty());
    }
}

/// Applies the rendered objects with the Deployment's apply answered by
/// `failure`; returns the error and how many requests were sent.
async fn apply_failing_deployment(failure: Reply) -> (KubeError, usize) {
    let (cluster, server) = fake_cluster(move |seen| {
        if seen.body["kind"] == "Deployment" {
            failure.clone()
        } else {
            echo(seen)
        }
    });
    let err = cluster.apply(&objects()).await.unwrap_err();
    let seen = requests(cluster, server).await;
    (err, seen.len())
}

#[tokio::test]
async fn validation_failure_is_permanent_and_names_the_object() {
    let message = "Deployment.apps \"web\" is invalid: spec.template.spec.containers[0].image: Required value";
    let (err, sent) = apply_failing_deployment(status(422, "Invalid", message)).await;
    assert_eq!(
        err,
        KubeError::Apply {
            kind: "Deployment".into(),
            name: "web".into(),
            status: Some(422),
            message: message.into(),
            transient: false,
        }
    );
    assert!(!err.is_transient());
    let text = err.to_string();
    assert!(text.contains("Deployment \"web\""), "{text}");
    assert!(text.contains("HTTP 422"), "{text}");
    // Stopped at the Deployment: the Service and Ingress were not applied.
    assert_eq!(sent, 10);
}

#[tokio::test]
async fn server_errors_are_transient() {
    let (err, _) = apply_failing_deployment(status(
        500,
        "InternalError",
        "Internal error occurred: failed calling webhook \"validation.gatekeeper.sh\"",
    ))
    .await;
    assert!(
        matches!(&err, KubeError::Apply { status: Some(500), transient: true, kind, .. } if kind == "Deployment"),
        "{err:?}"
    );
    assert!(err.is_transient());

    let (err, _) = apply_failing_deployment(status(429, "TooManyRequests", "slow down")).await;
    assert!(err.is_transient(), "{err:?}");
}

#[tokio::test]
async fn forbidden_is_an_infrastructure_fault_so_transient() {
    let message = "deployments.apps \"web\" is forbidden: User \"system:serviceaccount:gantry:gantry\" cannot patch resource \"deployments\" in API group \"apps\" in the namespace \"web\"";
    let (err, _) = apply_failing_deployment(status(403, "Forbidden", message)).await;
    assert!(
        matches!(
            &err,
            KubeError::Apply {
                status: Some(403),
                transient: true,
                ..
            }
        ),
        "{err:?}"
    );
    assert!(err.is_transient());
    assert!(err.to_string().contains("cannot patch"), "{err}");
}

#[tokio::test]
async fn a_non_json_error_reply_keeps_its_status() {
    let (service, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let cluster = Cluster::new(kube::Client::new(service, "default"));
    let server = tokio::spawn(async move {
        let (_, respond) = handle.next_request().await.unwrap();
        respond.send_response(
            Response::builder()
                .status(502)
                .body(Body::from(b"<html>Bad Gateway</html>".to_vec()))
                .unwrap(),
        );
    });
    let err = cluster.apply(&objects()).await.unwrap_err();
    server.await.unwrap();
    assert!(
        matches!(&err, KubeError::Apply { status: Some(502), transient: true, kind, .. } if kind == "Namespace"),
        "{err:?}"
    );
}

#[tokio::test]
async fn no_response_is_transient() {
    let (service, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let cluster = Cluster::new(kube::Client::new(service, "default"));
    let server = tokio::spawn(async move {
        let (_, respond) = handle.next_request().await.unwrap();
        respond.send_error(std::io::Error::new(
            std::io::ErrorKind::ConnectionRefused,
            "connection refused",
        ));
    });
    let err = cluster.apply(&objects()).await.unwrap_err();
    server.await.unwrap();
    assert!(
        matches!(
            &err,
            KubeError::Apply {
                status: None,
                transient: true,
                ..
            }
        ),
        "{err:?}"
    );
    assert!(err.to_string().contains("connection refused"), "{err}");
}

fn deployment_json(generation: i64, observed: i64, ready: i64) -> Value {
    json!({
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": { "name": "web", "namespace": "web", "generation": generation },
        "spec": {
            "replicas": 2,
            "selector": { "matchLabels": { "app.kubernetes.io/name": "web" } },
            "template": {
                "metadata": { "labels": { "app.kubernetes.io/name": "web" } },
                "spec": { "containers": [{ "name": "web", "image": "contoso.azurecr.io/web@sha256:ab" }] }
            }
        },
        "status": {
            "observedGeneration": observed,
            "replicas": 2,
            "updatedReplicas": 2,
            "readyReplicas": ready,
            "availableReplicas": ready,
        }
    })
}

fn rollout_server(deployment: Value, pods: Value) -> impl Fn(&Seen) -> Reply {
    move |seen: &Seen| {
        assert_eq!(seen.method, "GET");
        match seen.path.as_str() {
            "/apis/apps/v1/namespaces/web/deployments/web" => (200, deployment.clone()),
            "/api/v1/namespaces/web/pods" => {
                assert!(
                    seen.query
                        .split('&')
                        .any(|p| p == "labelSelector=app.kubernetes.io%2Fname%3Dweb"),
                    "{}",
                    seen.query
                );
                (
                    200,
                    json!({ "apiVersion": "v1", "kind": "PodList", "metadata": {}, "items": pods }),
                )
            }
            other => panic!("unexpected request {other}"),
        }
    }
}

#[tokio::test]
async fn rollout_reads_the_deployment_and_its_pods() {
    let (cluster, server) = fake_cluster(rollout_server(deployment_json(7, 7, 2), json!([])));
    assert_eq!(
        cluster.rollout("web", "web", Some(7)).await.unwrap(),
        Rollout::Complete
    );
    let seen = requests(cluster, server).await;
    let paths: Vec<&str> = seen.iter().map(|s| s.path.as_str()).collect();
    assert_eq!(
        paths,
        [
            "/apis/apps/v1/namespaces/web/deployments/web",
            "/api/v1/namespaces/web/pods"
        ]
    );

    let (cluster, server) = fake_cluster(rollout_server(deployment_json(7, 6, 2), json!([])));
    let rollout = cluster.rollout("web", "web", Some(7)).await.unwrap();
    assert!(
        matches!(rollout, Rollout::Progressing { .. }),
        "{rollout:?}"
    );
    requests(cluster, server).await;

    let crashing = json!([{
        "metadata": { "name": "web-5d9c7b8f4-x2k9p", "namespace": "web" },
        "spec": { "containers": [{ "name": "web", "image": "contoso.azurecr.io/web@sha256:ab" }] },
        "status": { "containerStatuses": [{
            "name": "web", "image": "contoso.azurecr.io/web@sha256:ab", "imageID": "", "ready": false,
            "restartCount": 4,
            "state": { "waiting": { "reason": "CrashLoopBackOff", "message": "back-off 1m20s restarting failed container" } }
        }] }
    }]);
    let (cluster, server) = fake_cluster(rollout_server(deployment_json(7, 7, 1), crashing));
    let rollout = cluster.rollout("web", "web", Some(7)).await.unwrap();
    assert!(
        matches!(&rollout, Rollout::Failed { reason } if reason.contains("web-5d9c7b8f4-x2k9p") && reason.contains("CrashLoopBackOff")),
        "{rollout:?}"
    );
    requests(cluster, server).await;
}

#[tokio::test]
async fn rollout_errors_are_named_after_the_operation() {
    let (cluster, server) =
        fake_cluster(|_| status(404, "NotFound", "deployments.apps \"web\" not found"));
    let err = cluster.rollout("web", "web", Some(1)).await.unwrap_err();
    assert!(
        matches!(
            &err,
            KubeError::ReadDeployment {
                status: Some(404),
                transient: false,
                ..
            }
        ),
        "{err:?}"
    );
    requests(cluster, server).await;

    let (cluster, server) = fake_cluster(|seen| {
        if seen.path.ends_with("/pods") {
            status(503, "ServiceUnavailable", "etcdserver: request timed out")
        } else {
            (200, deployment_json(1, 1, 2))
        }
    });
    let err = cluster.rollout("web", "web", Some(1)).await.unwrap_err();
    assert!(
        matches!(
            &err,
            KubeError::ListPods {
                status: Some(503),
                transient: true,
                ..
            }
        ),
        "{err:?}"
    );
    requests(cluster, server).await;
}

/// Applies a rendered app to the cluster in `KUBECONFIG` and waits for the
/// rollout to complete, then deletes its namespace.
///
/// The image must run as UID 10001 with a read-only root filesystem and
/// answer `GET /healthz` on port 8080: set `GANTRY_KUBE_TEST_IMAGE` to its
/// `registry/repository` and `GANTRY_KUBE_TEST_DIGEST` to its digest.
#[tokio::test]
#[ignore = "needs cluster"]
async fn live_apply_and_rollout() {
    use k8s_openapi::api::core::v1::Namespace;
    use kube::api::{Api, DeleteParams};

    let image = std::env::var("GANTRY_KUBE_TEST_IMAGE").expect("GANTRY_KUBE_TEST_IMAGE");
    let digest = std::env::var("GANTRY_KUBE_TEST_DIGEST").expect("GANTRY_KUBE_TEST_DIGEST");
    let config = format!(
        r#"
[[apps]]
name = "gantry-live-test"
repo = "contoso/gantry-live-test"
image = "{image}"
port = 8080
replicas = 1
health_path = "/healthz"
"#
    );
    let app = Config::parse(&config, "live").unwrap().apps.remove(0);
    let digest = Digest::parse(&digest).unwrap();
    let objects = render(&RenderInput {
        app: &app,
        digest: &digest,
        registry_image: &app.image,
        run_id: None,
        commit: None,
        verdicts: None,
    })
    .unwrap()
    .objects;

    let cluster = Cluster::from_kubeconfig_or_in_cluster().await.unwrap();
    let applied = cluster.apply(&objects).await.unwrap();
    assert_eq!(applied.objects.len(), objects.len());
    let ns = app.namespace().as_str().to_string();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(300);
    let result = loop {
        let rollout = cluster
            .rollout(&ns, app.name.as_str(), applied.deployment_generation)
            .await
            .unwrap();
        if !matches!(rollout, Rollout::Progressing { .. }) || tokio::time::Instant::now() > deadline
        {
            break rollout;
        }
        tokio::time::sleep(Duration::from_secs(3)).await;
    };
    let client = kube::Client::try_default().await.unwrap();
    Api::<Namespace>::all(client)
        .delete(&ns, &DeleteParams::default())
        .await
        .unwrap();
    assert_eq!(result, Rollout::Complete);
}

/// `live` GETs every rendered object at its own path, in the given order:
/// a found object comes back as the server holds it, a 404 is `None`.
#[tokio::test]
async fn live_reads_each_object_and_404_is_none() {
    let objects = objects();
    let (cluster, server) = fake_cluster(|seen| {
        if seen.path.ends_with("/serviceaccounts/web") {
            return status(404, "NotFound", "serviceaccounts \"web\" not found");
        }
        let kind = if seen.path.contains("/deployments/") {
            ("apps/v1", "Deployment")
        } else {
            ("v1", "Service")
        };
        let name = seen.path.rsplit('/').next().unwrap_or("");
        (
            200,
            json!({"apiVersion": kind.0, "kind": kind.1,
                   "metadata": {"name": name, "uid": "u-1", "resourceVersion": "9"},
                   "spec": {"replicas": 3}}),
        )
    });
    let live = cluster.live(&objects).await.unwrap();
    let seen = requests(cluster, server).await;
    let paths: Vec<&str> = seen.iter().map(|s| s.path.as_str()).collect();
    assert_eq!(paths, EXPECTED_PATHS);
    assert!(seen.iter().all(|s| s.method == "GET"));
    assert_eq!(live.len(), objects.len());
    let index = |kind: &str| objects.iter().position(|o| o["kind"] == kind).unwrap();
    assert!(
        live[index("ServiceAccount")].is_none(),
        "the ServiceAccount is gone"
    );
    assert_eq!(live.iter().filter(|o| o.is_none()).count(), 1);
    let deployment = live[index("Deployment")].as_ref().unwrap();
    assert_eq!(deployment["kind"], "Deployment");
    assert_eq!(deployment["metadata"]["uid"], "u-1");
    assert_eq!(deployment["spec"]["replicas"], 3);
}

#[tokio::test]
async fn live_read_failures_are_typed() {
    let (cluster, server) = fake_cluster(|_| status(403, "Forbidden", "cannot get namespaces"));
    let err = cluster.live(&objects()).await.unwrap_err();
    requests(cluster, server).await;
    assert!(
        matches!(&err, KubeError::ReadObject { kind, status: Some(403), .. } if kind == "Namespace"),
        "{err:?}"
    );
    assert!(err.is_transient(), "RBAC not yet propagated: retry");
    assert!(err.to_string().contains("HTTP 403"), "{err}");

    let (cluster, server) = fake_cluster(|_| status(400, "BadRequest", "bad"));
    let err = cluster.live(&objects()).await.unwrap_err();
    requests(cluster, server).await;
    assert!(!err.is_transient(), "{err}");
}

/// `list_namespace` lists each namespaced kind and gives the items their
/// apiVersion and kind back (list items come without them).
#[tokio::test]
async fn list_namespace_lists_every_namespaced_kind_with_types() {
    let (cluster, server) = fake_cluster(|seen| {
        let item = json!({"metadata": {"name": "hand-made", "namespace": "web"}});
        let items = if seen.path.ends_with("/deployments") {
            json!([item])
        } else {
            json!([])
        };
        (
            200,
            json!({"apiVersion": "v1", "kind": "List", "metadata": {}, "items": items}),
        )
    });
    let listed = cluster.list_namespace("web").await.unwrap();
    let seen = requests(cluster, server).await;
    let paths: Vec<&str> = seen.iter().map(|s| s.path.as_str()).collect();
    assert_eq!(
        paths,
        vec![
            "/api/v1/namespaces/web/resourcequotas",
            "/api/v1/namespaces/web/limitranges",
            "/apis/networking.k8s.io/v1/namespaces/web/networkpolicies",
            "/apis/secrets-store.csi.x-k8s.io/v1/namespaces/web/secretproviderclasses",
            "/api/v1/namespaces/web/serviceaccounts",
            "/apis/apps/v1/namespaces/web/deployments",
            "/api/v1/namespaces/web/services",
            "/apis/networking.k8s.io/v1/namespaces/web/ingresses",
        ]
    );
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0]["apiVersion"], "apps/v1");
    assert_eq!(listed[0]["kind"], "Deployment");
    assert_eq!(listed[0]["metadata"]["name"], "hand-made");
}

/// The governance lists: one LIST each at the kind's path, the label
/// selector sent as `labelSelector`, items typed; failures are
/// `ListObjects` named after the kind and namespace, 403 transient.
#[tokio::test]
async fn governance_lists_send_the_selector_and_type_the_items() {
    let (cluster, server) = fake_cluster(|seen| {
        let kind = if seen.path.ends_with("/daemonsets") {
            "DaemonSetList"
        } else {
            "DeploymentList"
        };
        (
            200,
            json!({"apiVersion": "apps/v1", "kind": kind, "metadata": {"resourceVersion": "9"},
                   "items": [{"metadata": {"name": "x", "namespace": "ns"},
                              "status": {"desiredNumberScheduled": 3, "numberReady": 3}}]}),
        )
    });
    let deployments = cluster
        .list_deployments("web", Some("app.kubernetes.io/managed-by=gantry"))
        .await
        .unwrap();
    let daemonsets = cluster.list_daemonsets("kube-system").await.unwrap();
    let quotas = cluster.list_resource_quotas("web").await.unwrap();
    let ranges = cluster.list_limit_ranges("web").await.unwrap();
    let seen = requests(cluster, server).await;
    let paths: Vec<(&str, &str)> = seen
        .iter()
        .map(|s| (s.path.as_str(), s.query.as_str()))
        .collect();
    assert_eq!(
        paths,
        vec![
            (
                "/apis/apps/v1/namespaces/web/deployments",
                "&labelSelector=app.kubernetes.io%2Fmanaged-by%3Dgantry"
            ),
            ("/apis/apps/v1/namespaces/kube-system/daemonsets", ""),
            ("/api/v1/namespaces/web/resourcequotas", ""),
            ("/api/v1/namespaces/web/limitranges", ""),
        ]
    );
    assert!(seen.iter().all(|s| s.method == "GET"));
    assert_eq!(deployments[0]["kind"], "Deployment");
    assert_eq!(daemonsets[0]["kind"], "DaemonSet");
    assert_eq!(daemonsets[0]["apiVersion"], "apps/v1");
    assert_eq!(daemonsets[0]["status"]["numberReady"], 3);
    assert_eq!(quotas[0]["kind"], "ResourceQuota");
    assert_eq!(ranges[0]["kind"], "LimitRange");

    let (cluster, server) =
        fake_cluster(|_| status(403, "Forbidden", "cannot list daemonsets in kube-system"));
    let err = cluster.list_daemonsets("kube-system").await.unwrap_err();
    requests(cluster, server).await;
    assert!(
        matches!(&err, KubeError::ListObjects { kind, namespace, status: Some(403), .. }
            if kind == "DaemonSet" && namespace == "kube-system"),
        "{err:?}"
    );
    assert!(err.is_transient());
    assert_eq!(
        err.to_string(),
        "listing DaemonSet in kube-system failed (HTTP 403): cannot list daemonsets in kube-system"
    );
}

/// A cluster without the Secrets Store CSI driver does not serve
/// SecretProviderClass (404): that lists as none, while a 404 for a built-in
/// kind is still an error.
#[tokio::test]
async fn list_namespace_skips_an_absent_crd_only() {
    let list = || {
        (
            200,
            json!({"apiVersion": "v1", "kind": "List", "metadata": {}, "items": [
                {"metadata": {"name": "x", "namespace": "web"}}
            ]}),
        )
    };
    let (cluster, server) = fake_cluster(move |seen| {
        if seen.path.ends_with("/secretproviderclasses") {
            status(
                404,
                "NotFound",
                "the server could not find the requested resource",
            )
        } else {
            list()
        }
    });
    let listed = cluster.list_namespace("web").await.unwrap();
    requests(cluster, server).await;
    let kinds: Vec<&str> = listed.iter().map(|o| o["kind"].as_str().unwrap()).collect();
    assert_eq!(
        kinds,
        [
            "ResourceQuota",
            "LimitRange",
            "NetworkPolicy",
            "ServiceAccount",
            "Deployment",
            "Service",
            "Ingress"
        ]
    );

    let (cluster, server) = fake_cluster(move |seen| {
        if seen.path.ends_with("/ingresses") {
            status(
                404,
                "NotFound",
                "the server could not find the requested resource",
            )
        } else {
            list()
        }
    });
    let err = cluster.list_namespace("web").await.unwrap_err();
    requests(cluster, server).await;
    assert!(
        matches!(&err, KubeError::ListObjects { kind, status: Some(404), .. } if kind == "Ingress"),
        "{err:?}"
    );
}

// ---- remove_stale ------------------------------------------------------------

const INGRESS_PATH: &str = "/apis/networking.k8s.io/v1/namespaces/web/ingresses/web";
const SPC_PATH: &str =
    "/apis/secrets-store.csi.x-k8s.io/v1/namespaces/web/secretproviderclasses/web";
const STALE_UID: &str = "9a8b7c6d-0000-4000-8000-00000000abcd";

/// The rendered objects without the kinds in `without` (the app after its
/// configuration stopped rendering them).
fn objects_without(without: &[&str]) -> Vec<Value> {
    objects()
        .into_iter()
        .filter(|o| !without.contains(&o["kind"].as_str().unwrap()))
        .collect()
}

/// A live object at `path` as the API server returns it, with `labels`.
fn live_object(path: &str, labels: Value) -> Reply {
    let (api_version, kind) = if path.contains("/ingresses/") {
        ("networking.k8s.io/v1", "Ingress")
    } else {
        ("secrets-store.csi.x-k8s.io/v1", "SecretProviderClass")
    };
    (
        200,
        json!({"apiVersion": api_version, "kind": kind,
               "metadata": {"name": "web", "namespace": "web", "uid": STALE_UID,
                            "resourceVersion": "77", "labels": labels},
               "spec": {}}),
    )
}

fn not_found() -> Reply {
    status(
        404,
        "NotFound",
        "the server could not find the requested resource",
    )
}

fn gantry_labels() -> Value {
    json!({"app.kubernetes.io/name": "web", "app.kubernetes.io/managed-by": "gantry"})
}

/// What a DELETE answers: the object (still terminating) or a Status.
fn deleted() -> Reply {
    (
        200,
        json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success", "code": 200}),
    )
}

#[tokio::test]
async fn remove_stale_deletes_a_leftover_gantry_ingress_with_a_uid_precondition() {
    let (cluster, server) = fake_cluster(|seen| match (seen.method.as_str(), seen.path.as_str()) {
        ("GET", INGRESS_PATH) => live_object(INGRESS_PATH, gantry_labels()),
        ("DELETE", INGRESS_PATH) => deleted(),
        _ => status(500, "InternalError", "unexpected request"),
    });
    // Still renders the SecretProviderClass: no request for it at all.
    let removed = cluster
        .remove_stale("web", "web", &objects_without(&["Ingress"]))
        .await
        .unwrap();
    let seen = requests(cluster, server).await;
    let calls = calls(&seen);
    assert_eq!(calls, [("GET", INGRESS_PATH), ("DELETE", INGRESS_PATH)]);
    assert_eq!(
        seen[1].body["preconditions"]["uid"], STALE_UID,
        "{}",
        seen[1].body
    );
    assert_eq!(removed, [("Ingress".to_string(), "web".to_string())]);
}

#[tokio::test]
async fn remove_stale_leaves_objects_gantry_did_not_create() {
    let (cluster, server) = fake_cluster(|seen| match (seen.method.as_str(), seen.path.as_str()) {
        ("GET", INGRESS_PATH) => live_object(INGRESS_PATH, json!({"app": "web"})),
        ("GET", SPC_PATH) => live_object(SPC_PATH, json!({"app.kubernetes.io/managed-by": "Helm"})),
        _ => status(500, "InternalError", "unexpected request"),
    });
    let removed = remove_both_stale(&cluster).await.unwrap();
    let seen = requests(cluster, server).await;
    let calls = calls(&seen);
    assert_eq!(calls, [("GET", SPC_PATH), ("GET", INGRESS_PATH)]);
    assert!(removed.is_empty(), "{removed:?}");
}

#[tokio::test]
async fn remove_stale_absent_objects_and_an_unserved_crd_are_nothing_to_do() {
    let (cluster, server) = fake_cluster(|seen| match seen.method.as_str() {
        "GET" => not_found(),
        _ => status(500, "InternalError", "unexpected request"),
    });
    let removed = remove_both_stale(&cluster).await.unwrap();
    let seen = requests(cluster, server).await;
    let calls = calls(&seen);
    assert_eq!(calls, [("GET", SPC_PATH), ("GET", INGRESS_PATH)]);
    assert!(removed.is_empty());
}

#[tokio::test]
async fn remove_stale_sends_nothing_when_every_optional_kind_is_rendered() {
    let (cluster, server) = fake_cluster(|_| status(500, "InternalError", "unexpected request"));
    let removed = cluster
        .remove_stale("web", "web", &objects())
        .await
        .unwrap();
    let seen = requests(cluster, server).await;
    assert!(seen.is_empty(), "{seen:?}");
    assert!(removed.is_empty());
}

#[tokio::test]
async fn remove_stale_a_delete_conflict_or_404_is_not_an_error() {
    for code in [404, 409] {
        let (cluster, server) = fake_cluster(move |seen| match seen.method.as_str() {
            "GET" => live_object(&seen.path, gantry_labels()),
            _ => status(code, "Conflict", "Precondition failed: UID in precondition"),
        });
        let removed = remove_both_stale(&cluster).await.unwrap();
        let seen = requests(cluster, server).await;
        let methods: Vec<&str> = seen.iter().map(|s| s.method.as_str()).collect();
        assert_eq!(methods, ["GET", "DELETE", "GET", "DELETE"], "{code}");
        assert!(removed.is_empty(), "{code}: {removed:?}");
    }
}

#[tokio::test]
async fn remove_stale_failures_are_typed_delete_object() {
    let (cluster, server) = fake_cluster(|seen| match seen.method.as_str() {
        "GET" if seen.path == INGRESS_PATH => live_object(INGRESS_PATH, gantry_labels()),
        "GET" => not_found(),
        _ => status(403, "Forbidden", "cannot delete ingresses"),
    });
    let err = remove_both_stale(&cluster).await.unwrap_err();
    requests(cluster, server).await;
    assert!(
        matches!(&err, KubeError::DeleteObject { kind, name, status: Some(403), .. }
            if kind == "Ingress" && name == "web"),
        "{err:?}"
    );
    assert!(err.is_transient(), "RBAC not yet propagated: retry");

    let (cluster, server) = fake_cluster(|_| status(400, "BadRequest", "bad"));
    let err = cluster
        .remove_stale("web", "web", &objects_without(&["Ingress"]))
        .await
        .unwrap_err();
    requests(cluster, server).await;
    assert!(
        matches!(
            &err,
            KubeError::DeleteObject {
                status: Some(400),
                ..
            }
        ),
        "{err:?}"
    );
    assert!(!err.is_transient(), "{err}");
}
