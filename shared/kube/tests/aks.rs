//! `Cluster::from_aks` against a local fake of Azure Resource Manager and of
//! the AKS API server (one loopback HTTP server): the credentials lookup it
//! sends, the kubeconfig it keeps (server only; the `kubelogin` exec user is
//! dropped), and the Entra bearer token on every API request, renewed when it
//! runs low. Plus a live test against a real AKS cluster, ignored by default.

#![allow(clippy::unwrap_used)]

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::extract::{Request, State};
use axum::response::IntoResponse;
use azure_core::credentials::{AccessToken, TokenCredential, TokenRequestOptions};
use base64::Engine as _;
use gantry_kube::aks::{AKS_SCOPE, API_VERSION, ARM_SCOPE};
use gantry_kube::{Cluster, KubeError, Rollout};
use serde_json::json;
use time::OffsetDateTime;

const CLUSTER_ID: &str = "/subscriptions/00000000-1111-2222-3333-444444444444/resourceGroups/rg-prod/providers/Microsoft.ContainerService/managedClusters/aks-prod";

/// Hands out `arm-N` / `aks-N` tokens living `lifetime`, counting requests per scope.
#[derive(Debug)]
struct FakeCredential {
    lifetime: time::Duration,
    arm: AtomicU32,
    aks: AtomicU32,
}

#[async_trait::async_trait]
impl TokenCredential for FakeCredential {
    async fn get_token(
        &self,
        scopes: &[&str],
        _options: Option<TokenRequestOptions<'_>>,
    ) -> azure_core::Result<AccessToken> {
        let (prefix, counter) = match scopes {
            [ARM_SCOPE] => ("arm", &self.arm),
            [AKS_SCOPE] => ("aks", &self.aks),
            other => panic!("unexpected scopes {other:?}"),
        };
        let n = counter.fetch_add(1, Ordering::SeqCst) + 1;
        Ok(AccessToken::new(
            format!("{prefix}-{n}"),
            OffsetDateTime::now_utc() + self.lifetime,
        ))
    }
}

#[derive(Debug, Clone)]
struct Seen {
    method: String,
    path_and_query: String,
    authorization: String,
}

#[derive(Clone)]
struct Fake {
    seen: Arc<Mutex<Vec<Seen>>>,
    kubeconfig: Arc<Mutex<String>>,
    arm_status: u16,
}

async fn handle(State(fake): State<Fake>, request: Request) -> axum::response::Response {
    let seen = Seen {
        method: request.method().to_string(),
        path_and_query: request
            .uri()
            .path_and_query()
            .map(ToString::to_string)
            .unwrap_or_default(),
        authorization: request
            .headers()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string(),
    };
    fake.seen.lock().unwrap().push(seen.clone());
    let path = request.uri().path();
    if path.ends_with("/listClusterUserCredential") {
        if fake.arm_status != 200 {
            return (
                http::StatusCode::from_u16(fake.arm_status).unwrap(),
                axum::Json(json!({"error": {"code": "AuthorizationFailed", "message": "no"}})),
            )
                .into_response();
        }
        let value = base64::engine::general_purpose::STANDARD
            .encode(fake.kubeconfig.lock().unwrap().as_bytes());
        return axum::Json(json!({"kubeconfigs": [{"name": "clusterUser", "value": value}]}))
            .into_response();
    }
    if path == "/apis/apps/v1/namespaces/web/deployments/web" {
        return axum::Json(json!({
            "apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": {"name": "web", "namespace": "web", "generation": 2},
            "spec": {"replicas": 1, "selector": {"matchLabels": {"app": "web"}},
                     "template": {"metadata": {"labels": {"app": "web"}},
                                  "spec": {"containers": [{"name": "web", "image": "x"}]}}},
            "status": {"observedGeneration": 2, "replicas": 1, "updatedReplicas": 1,
                       "availableReplicas": 1, "readyReplicas": 1,
                       "conditions": [{"type": "Progressing", "status": "True",
                                       "reason": "NewReplicaSetAvailable"}]}
        }))
        .into_response();
    }
    if path == "/api/v1/namespaces/web/pods" {
        return axum::Json(
            json!({"apiVersion": "v1", "kind": "PodList", "metadata": {}, "items": []}),
        )
        .into_response();
    }
    (http::StatusCode::NOT_FOUND, "not found").into_response()
}

/// Starts the fake; returns its base URL and state. The kubeconfig it serves
/// points back at itself and authenticates with `kubelogin`, as AKS's does.
async fn start(arm_status: u16) -> (String, Fake) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let kubeconfig = format!(
        r#"apiVersion: v1
kind: Config
clusters:
- name: aks-prod
  cluster:
    server: {base}
contexts:
- name: aks-prod
  context:
    cluster: aks-prod
    user: clusterUser_rg-prod_aks-prod
current-context: aks-prod
users:
- name: clusterUser_rg-prod_aks-prod
  user:
    exec:
      apiVersion: client.authentication.k8s.io/v1beta1
      command: kubelogin
      args: [get-token, --login, devicecode, --server-id, 6dae42f8-4368-4678-94ff-3960e28e3630]
"#
    );
    let fake = Fake {
        seen: Arc::default(),
        kubeconfig: Arc::new(Mutex::new(kubeconfig)),
        arm_status,
    };
    let app = Router::new().fallback(handle).with_state(fake.clone());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (base, fake)
}

fn credential(lifetime: time::Duration) -> Arc<FakeCredential> {
    Arc::new(FakeCredential {
        lifetime,
        arm: AtomicU32::new(0),
        aks: AtomicU32::new(0),
    })
}

#[tokio::test]
async fn looks_up_the_cluster_and_sends_entra_tokens() {
    let (base, fake) = start(200).await;
    let cred = credential(time::Duration::hours(1));
    let cluster = Cluster::from_aks(CLUSTER_ID, &base, cred.clone(), &reqwest::Client::new())
        .await
        .unwrap();
    for _ in 0..2 {
        assert_eq!(
            cluster.rollout("web", "web", Some(2)).await.unwrap(),
            Rollout::Complete
        );
    }
    let seen = fake.seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 1 + 2 * 2, "{seen:#?}");
    assert_eq!(seen[0].method, "POST");
    assert_eq!(
        seen[0].path_and_query,
        format!("{CLUSTER_ID}/listClusterUserCredential?api-version={API_VERSION}")
    );
    assert_eq!(seen[0].authorization, "Bearer arm-1");
    assert!(
        seen[1]
            .path_and_query
            .starts_with("/apis/apps/v1/namespaces/web/deployments/web")
    );
    for s in &seen[1..] {
        assert_eq!(s.authorization, "Bearer aks-1", "{s:?}");
    }
    // One token per scope: the AKS token is reused while it lives long enough.
    assert_eq!(cred.arm.load(Ordering::SeqCst), 1);
    assert_eq!(cred.aks.load(Ordering::SeqCst), 1);
    // Neither token shows in the client's Debug output.
    let debug = format!("{cluster:?}");
    assert!(
        !debug.contains("aks-1") && !debug.contains("arm-1"),
        "{debug}"
    );
}

#[tokio::test]
async fn a_token_running_low_is_renewed_before_the_next_request() {
    let (base, fake) = start(200).await;
    // Two minutes left is under the five-minute margin: every request renews.
    let cred = credential(time::Duration::minutes(2));
    let cluster = Cluster::from_aks(CLUSTER_ID, &base, cred.clone(), &reqwest::Client::new())
        .await
        .unwrap();
    cluster.rollout("web", "web", Some(2)).await.unwrap();
    cluster.rollout("web", "web", Some(2)).await.unwrap();
    let seen = fake.seen.lock().unwrap().clone();
    let tokens: Vec<&str> = seen[1..].iter().map(|s| s.authorization.as_str()).collect();
    assert_eq!(
        tokens,
        [
            "Bearer aks-1",
            "Bearer aks-2",
            "Bearer aks-3",
            "Bearer aks-4"
        ]
    );
}

#[tokio::test]
async fn refusals_and_bad_ids_are_connect_errors_without_tokens() {
    let (base, fake) = start(403).await;
    let cred = credential(time::Duration::hours(1));
    let err = Cluster::from_aks(CLUSTER_ID, &base, cred.clone(), &reqwest::Client::new())
        .await
        .unwrap_err();
    let text = err.to_string();
    assert!(matches!(err, KubeError::Connect { .. }), "{err:?}");
    assert!(err.is_transient());
    assert!(
        text.contains("HTTP 403") && text.contains("AuthorizationFailed"),
        "{text}"
    );
    assert!(!text.contains("arm-1"), "{text}");

    let bad = CLUSTER_ID.replace("aks-prod", "aks/../../x");
    let err = Cluster::from_aks(&bad, &base, cred.clone(), &reqwest::Client::new())
        .await
        .unwrap_err();
    assert!(err.to_string().contains("not an AKS resource id"), "{err}");
    assert_eq!(
        fake.seen.lock().unwrap().len(),
        1,
        "nothing sent for a bad id"
    );

    // An answer without a usable kubeconfig.
    let (base, fake) = start(200).await;
    *fake.kubeconfig.lock().unwrap() = "clusters: []\n".into();
    let err = Cluster::from_aks(CLUSTER_ID, &base, cred, &reqwest::Client::new())
        .await
        .unwrap_err();
    assert!(err.to_string().contains("names no cluster"), "{err}");
}

/// Against a real AKS cluster with Entra ID auth: set
/// `GANTRY_AKS_TEST_CLUSTER` to its resource id; the developer login
/// (`az login`) must hold "Azure Kubernetes Service Cluster User Role" and
/// read access to Deployments in `kube-system`.
#[tokio::test]
#[ignore = "needs AKS cluster and az login"]
async fn live_aks_reads_coredns() {
    let id = std::env::var("GANTRY_AKS_TEST_CLUSTER").expect("GANTRY_AKS_TEST_CLUSTER");
    let credential = azure_identity_credential();
    let cluster = Cluster::from_aks(
        &id,
        gantry_kube::aks::ARM_ENDPOINT,
        credential,
        &reqwest::Client::new(),
    )
    .await
    .unwrap();
    let rollout = cluster
        .rollout("kube-system", "coredns", None)
        .await
        .unwrap();
    assert_eq!(rollout, Rollout::Complete);
}

fn azure_identity_credential() -> Arc<dyn TokenCredential> {
    azure_identity::DeveloperToolsCredential::new(None).unwrap()
}
