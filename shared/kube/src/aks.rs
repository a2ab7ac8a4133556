//! AKS with Microsoft Entra ID authentication, for a caller outside the
//! cluster (the Function App): no kubeconfig file, no `kubelogin` binary.
//!
//! 1. The cluster's endpoint and CA come from Azure Resource Manager,
//!    `POST {cluster}/listClusterUserCredential` with an ARM token. That
//!    kubeconfig's user entry (an `exec` of `kubelogin` or an `azure`
//!    auth-provider) is dropped: only the server and its CA are kept.
//! 2. Every API request carries `Authorization: Bearer <token>` for the AKS
//!    Entra server application ([`AKS_SCOPE`]), taken from the same
//!    credential (the Function App's managed identity). The token is renewed
//!    in `poll_ready`, before a request goes out, once it has less than
//!    [`REFRESH_MARGIN`] left, so a long-lived client never sends an expired one.
//!
//! What the identity may do in the cluster is AKS RBAC (Azure RBAC for
//! Kubernetes, scoped to the managed namespaces, set up in `infra/`); to fetch
//! the user kubeconfig it needs the `listClusterUserCredential` action
//! ("Azure Kubernetes Service Cluster User Role") on the cluster resource.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use azure_core::credentials::TokenCredential;
use base64::Engine as _;
use http::{HeaderValue, Request};
use kube::config::{KubeConfigOptions, Kubeconfig};
use time::OffsetDateTime;

use crate::{Cluster, KubeError};

/// Entra scope of the AKS server application (the same well-known
/// application id in every tenant).
pub const AKS_SCOPE: &str = "6dae42f8-4368-4678-94ff-3960e28e3630/.default";

/// Entra scope of Azure Resource Manager.
pub const ARM_SCOPE: &str = "https://management.azure.com/.default";

/// Azure Resource Manager in the public cloud.
pub const ARM_ENDPOINT: &str = "https://management.azure.com";

/// `api-version` of `listClusterUserCredential` (GA).
pub const API_VERSION: &str = "2025-10-01";

/// A token with less than this left is renewed before the next request.
pub const REFRESH_MARGIN: time::Duration = time::Duration::minutes(5);

fn connect_error(message: impl Into<String>) -> KubeError {
    KubeError::Connect {
        message: message.into(),
    }
}

impl Cluster {
    /// A client for the AKS cluster `resource_id`, authenticated with Entra
    /// tokens from `credential` (see the module documentation). `arm` is the
    /// Resource Manager endpoint ([`ARM_ENDPOINT`]; tests pass a local fake).
    /// Failures are [`KubeError::Connect`] (transient: the deploy message is
    /// redelivered), naming the step; tokens never appear in them.
    pub async fn from_aks(
        resource_id: &str,
        arm: &str,
        credential: Arc<dyn TokenCredential>,
        http: &reqwest::Client,
    ) -> Result<Cluster, KubeError> {
        gantry_pipeline::config::check_aks_cluster_id(resource_id).map_err(connect_error)?;
        let arm_token = credential
            .get_token(&[ARM_SCOPE], None)
            .await
            .map_err(|e| connect_error(format!("getting a Resource Manager token: {e}")))?;
        let url = format!(
            "{}{resource_id}/listClusterUserCredential?api-version={API_VERSION}",
            arm.trim_end_matches('/')
        );
        let response = http
            .post(&url)
            .bearer_auth(arm_token.token.secret())
            .header(http::header::CONTENT_LENGTH, "0")
            .timeout(std::time::Duration::from_secs(30))
            .send()
            .await
            .map_err(|e| {
                connect_error(format!(
                    "listing the user credentials of {resource_id}: {}",
                    e.without_url()
                ))
            })?;
        let status = response.status();
        let body = response.bytes().await.map_err(|e| {
            connect_error(format!(
                "reading the user credentials of {resource_id}: {}",
                e.without_url()
            ))
        })?;
        if !status.is_success() {
            let text = String::from_utf8_lossy(&body);
            return Err(connect_error(format!(
                "listing the user credentials of {resource_id}: HTTP {status}: {}",
                text.chars().take(300).collect::<String>()
            )));
        }
        let kubeconfig = user_kubeconfig(&body)
            .map_err(|why| connect_error(format!("credentials of {resource_id}: {why}")))?;
        let config =
            kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
                .await
                .map_err(|e| {
                    connect_error(format!(
                        "kubeconfig of {resource_id}: {}",
                        crate::error_chain(&e)
                    ))
                })?;
        let tokens = Arc::new(TokenSource {
            credential,
            current: Mutex::new(None),
        });
        let client = kube::client::ClientBuilder::try_from(config)
            .map_err(|e| {
                connect_error(format!(
                    "client for {resource_id}: {}",
                    crate::error_chain(&e)
                ))
            })?
            .with_layer(&EntraLayer { tokens })
            .build();
        Ok(Cluster::new(client))
    }
}

/// The kubeconfig in a `listClusterUserCredential` answer, its users' auth
/// removed (gantry authenticates every request itself).
fn user_kubeconfig(body: &[u8]) -> Result<Kubeconfig, String> {
    #[derive(serde::Deserialize)]
    struct Results {
        kubeconfigs: Vec<Entry>,
    }
    #[derive(serde::Deserialize)]
    struct Entry {
        value: String,
    }
    let results: Results =
        serde_json::from_slice(body).map_err(|e| format!("unexpected answer: {e}"))?;
    let entry = results
        .kubeconfigs
        .first()
        .ok_or("the answer holds no kubeconfig")?;
    let yaml = base64::engine::general_purpose::STANDARD
        .decode(entry.value.trim())
        .map_err(|e| format!("kubeconfig is not base64: {e}"))?;
    let yaml = String::from_utf8(yaml).map_err(|_| "kubeconfig is not UTF-8".to_string())?;
    let mut kubeconfig =
        Kubeconfig::from_yaml(&yaml).map_err(|e| format!("kubeconfig does not parse: {e}"))?;
    if kubeconfig.clusters.is_empty() {
        return Err("kubeconfig names no cluster".into());
    }
    for user in &mut kubeconfig.auth_infos {
        user.auth_info = Some(kube::config::AuthInfo::default());
    }
    Ok(kubeconfig)
}

/// The current AKS token, renewed through the credential when it runs low.
struct TokenSource {
    credential: Arc<dyn TokenCredential>,
    current: Mutex<Option<(HeaderValue, OffsetDateTime)>>,
}

impl TokenSource {
    fn fresh_header(&self) -> Option<HeaderValue> {
        let current = self.current.lock().ok()?;
        current
            .as_ref()
            .filter(|(_, expires)| *expires - OffsetDateTime::now_utc() > REFRESH_MARGIN)
            .map(|(h, _)| h.clone())
    }

    async fn renew(self: Arc<Self>) -> Result<HeaderValue, BoxError> {
        let token = self
            .credential
            .get_token(&[AKS_SCOPE], None)
            .await
            .map_err(|e| format!("getting an AKS Entra token: {e}"))?;
        let mut header = HeaderValue::try_from(format!("Bearer {}", token.token.secret()))
            .map_err(|_| "the AKS token is not a valid header value".to_string())?;
        header.set_sensitive(true);
        if let Ok(mut current) = self.current.lock() {
            *current = Some((header.clone(), token.expires_on));
        }
        Ok(header)
    }
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;
type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

/// Adds the AKS bearer token to every request.
struct EntraLayer {
    tokens: Arc<TokenSource>,
}

impl<S> tower::Layer<S> for EntraLayer {
    type Service = EntraAuth<S>;

    fn layer(&self, inner: S) -> EntraAuth<S> {
        EntraAuth {
            inner,
            tokens: self.tokens.clone(),
            renewing: None,
            header: None,
        }
    }
}

/// See [`EntraLayer`].
struct EntraAuth<S> {
    inner: S,
    tokens: Arc<TokenSource>,
    renewing: Option<BoxFuture<Result<HeaderValue, BoxError>>>,
    /// The header `poll_ready` found fresh, used by the `call` that follows.
    header: Option<HeaderValue>,
}

impl<S, B> tower::Service<Request<kube::client::Body>> for EntraAuth<S>
where
    S: tower::Service<Request<kube::client::Body>, Response = http::Response<B>>,
    S::Error: Into<BoxError>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = BoxError;
    type Future = BoxFuture<Result<S::Response, BoxError>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        if self.header.is_none() {
            if self.renewing.is_none() {
                match self.tokens.fresh_header() {
                    Some(header) => self.header = Some(header),
                    None => self.renewing = Some(Box::pin(self.tokens.clone().renew())),
                }
            }
            if let Some(renewing) = self.renewing.as_mut() {
                let result = std::task::ready!(renewing.as_mut().poll(cx));
                self.renewing = None;
                // A just-issued token is used even when it lives shorter
                // than the margin: asking again would not give a longer one.
                self.header = Some(result?);
            }
        }
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, mut request: Request<kube::client::Body>) -> Self::Future {
        if let Some(header) = self.header.take() {
            request
                .headers_mut()
                .insert(http::header::AUTHORIZATION, header);
        }
        let future = self.inner.call(request);
        Box::pin(async move { future.await.map_err(Into::into) })
    }
}
