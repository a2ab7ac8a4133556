//! Applies an app's rendered manifests to a Kubernetes cluster and judges
//! the rollout that follows.
//!
//! # Apply
//!
//! [`Cluster::apply`] sends every object rendered by `gantry-manifests` as a
//! server-side apply (`PATCH` with `Content-Type: application/apply-patch+yaml`,
//! `fieldManager=gantry`, `force=true`) in [`APPLY_ORDER`]. Server-side apply
//! makes a redelivered deploy message harmless (the same object applied twice
//! is a no-op) and `force` takes over fields someone changed by hand with
//! `kubectl`: gantry's rendered manifests are the source of truth, and policy
//! was evaluated on exactly them.
//!
//! The objects' REST paths come from a static table of the nine kinds gantry
//! renders ([`KINDS`]), not from API discovery: discovery is one or more extra
//! round trips on every deploy, needs wider RBAC, and an object of any other
//! kind is a rendering bug that should fail loudly, not be applied.
//!
//! # Prune
//!
//! Server-side apply never deletes. [`Cluster::remove_stale`] deletes what an
//! app no longer renders among the kinds rendered for some apps only
//! ([`OPTIONAL_KINDS`]), and only objects labelled as gantry's.
//!
//! # Rollout
//!
//! [`Cluster::rollout`] reads the Deployment and its pods, and the pure
//! function [`classify`] turns them into a [`Rollout`] verdict. The verify
//! step calls it repeatedly (scheduled messages) until it is not
//! [`Rollout::Progressing`].
//!
//! # Errors
//!
//! One enum, [`KubeError`], with a variant per operation. Each knows whether
//! it is worth retrying ([`KubeError::is_transient`]): a transient failure
//! makes the Functions host redeliver the message; a permanent one is recorded
//! on the run and alerted.

pub mod aks;

use gantry_manifests::APPLY_ORDER;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{
    Api, ApiResource, DeleteParams, DynamicObject, ListParams, Patch, PatchParams, Preconditions,
};
use serde_json::Value;

/// The field manager gantry applies as; `kubectl get -o yaml
/// --show-managed-fields` shows which fields gantry owns.
pub const FIELD_MANAGER: &str = "gantry";

/// The label every rendered object carries; [`Cluster::rollout`] lists the
/// app's pods by it (`app.kubernetes.io/name=<deployment name>`; gantry names
/// the Deployment after the app).
pub const APP_NAME_LABEL: &str = "app.kubernetes.io/name";

/// The label whose value [`gantry_manifests::MANAGED_BY`] marks an object as
/// gantry's own: [`Cluster::remove_stale`] deletes nothing without it.
pub const MANAGED_BY_LABEL: &str = "app.kubernetes.io/managed-by";

/// Container waiting reasons that mean the new pods will not become ready by
/// themselves: the image cannot be pulled or named, its configuration refers
/// to something missing, or the process keeps crashing. Waiting for the
/// progress deadline (5 minutes) would only delay the rollback.
pub const FATAL_WAITING_REASONS: [&str; 5] = [
    "CrashLoopBackOff",
    "ImagePullBackOff",
    "ErrImagePull",
    "CreateContainerConfigError",
    "InvalidImageName",
];

/// Where the API server serves one kind: what [`ApiResource`] needs, plus
/// the scope (which the REST path depends on).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KindInfo {
    /// `apiVersion` as written in the object (`apps/v1`, `v1`).
    pub api_version: &'static str,
    /// `kind` as written in the object.
    pub kind: &'static str,
    /// API group, empty for the core group.
    pub group: &'static str,
    /// Group version.
    pub version: &'static str,
    /// Lowercase plural resource name used in the path.
    pub plural: &'static str,
    /// Whether the object lives in a namespace.
    pub namespaced: bool,
    /// Whether the kind comes from a CustomResourceDefinition that a cluster
    /// may not have installed (the Secrets Store CSI driver's
    /// SecretProviderClass): listing it then answers 404, which means "none".
    pub crd: bool,
}

impl KindInfo {
    fn api_resource(&self) -> ApiResource {
        ApiResource {
            group: self.group.into(),
            version: self.version.into(),
            api_version: self.api_version.into(),
            kind: self.kind.into(),
            plural: self.plural.into(),
        }
    }
}

/// The kinds gantry renders, in [`APPLY_ORDER`].
pub const KINDS: [KindInfo; 9] = [
    KindInfo {
        api_version: "v1",
        kind: "Namespace",
        group: "",
        version: "v1",
        plural: "namespaces",
        namespaced: false,
        crd: false,
    },
    KindInfo {
        api_version: "v1",
        kind: "ResourceQuota",
        group: "",
        version: "v1",
        plural: "resourcequotas",
        namespaced: true,
        crd: false,
    },
    KindInfo {
        api_version: "v1",
        kind: "LimitRange",
        group: "",
        version: "v1",
        plural: "limitranges",
        namespaced: true,
        crd: false,
    },
    KindInfo {
        api_version: "networking.k8s.io/v1",
        kind: "NetworkPolicy",
        group: "networking.k8s.io",
        version: "v1",
        plural: "networkpolicies",
        namespaced: true,
        crd: false,
    },
    KindInfo {
        api_version: "secrets-store.csi.x-k8s.io/v1",
        kind: "SecretProviderClass",
        group: "secrets-store.csi.x-k8s.io",
        version: "v1",
        plural: "secretproviderclasses",
        namespaced: true,
        crd: true,
    },
    KindInfo {
        api_version: "v1",
        kind: "ServiceAccount",
        group: "",
        version: "v1",
        plural: "serviceaccounts",
        namespaced: true,
        crd: false,
    },
    KindInfo {
        api_version: "apps/v1",
        kind: "Deployment",
        group: "apps",
        version: "v1",
        plural: "deployments",
        namespaced: true,
        crd: false,
    },
    KindInfo {
        api_version: "v1",
        kind: "Service",
        group: "",
        version: "v1",
        plural: "services",
        namespaced: true,
        crd: false,
    },
    KindInfo {
        api_version: "networking.k8s.io/v1",
        kind: "Ingress",
        group: "networking.k8s.io",
        version: "v1",
        plural: "ingresses",
        namespaced: true,
        crd: false,
    },
];

/// The kinds gantry renders for some apps only, each under the app's own
/// name (`{app}`): `SecretProviderClass` (with `[apps.keyvault]`) and
/// `Ingress` (with `[apps.expose] mode = "ingress"`). Server-side apply never
/// deletes, so when a configuration change stops rendering one of them,
/// [`Cluster::remove_stale`] removes the one left behind (an old Ingress would
/// keep the app reachable the way its owner no longer chose). Only these two:
/// every other kind is rendered for every app under a fixed name, so the next
/// apply overwrites it rather than leaving it behind.
pub const OPTIONAL_KINDS: [&str; 2] = ["SecretProviderClass", "Ingress"];

/// DaemonSets: not rendered by gantry (so not in [`KINDS`]) but read by the
/// governance audit.
pub const DAEMON_SET: KindInfo = KindInfo {
    api_version: "apps/v1",
    kind: "DaemonSet",
    group: "apps",
    version: "v1",
    plural: "daemonsets",
    namespaced: true,
    crd: false,
};

/// Positions in [`KINDS`] (checked by a test).
const RESOURCE_QUOTA: usize = 1;
const LIMIT_RANGE: usize = 2;
const DEPLOYMENT: usize = 6;

/// Why a cluster operation failed.
///
/// # Transient or permanent
///
/// [`KubeError::is_transient`] is true for faults of the infrastructure,
/// which a redelivery may get past: no connection, timeouts, 5xx, 429
/// (throttled), 408, 409 (a concurrent writer; the retry re-applies), and
/// also 401 and 403. Those two are not the deploy's fault but gantry's
/// credentials or RBAC (an expired token, a role binding not yet
/// propagated, a namespace still terminating), exactly as storage and
/// Service Bus auth failures are treated elsewhere in gantry: an operator
/// fixes the identity and the messages still in the queue go through.
/// Other 4xx (400 bad request, 404, 422 validation) mean the object itself is
/// wrong and retrying sends the same object again: permanent.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KubeError {
    /// No client could be configured (no kubeconfig, no in-cluster service
    /// account, unreadable credentials).
    #[error("cannot configure a Kubernetes client: {message}")]
    Connect {
        /// What kube reported.
        message: String,
    },
    /// An object cannot be applied as given; nothing was sent to the
    /// cluster (every object is checked before the first request).
    #[error("object {position} ({kind} {name:?}) cannot be applied: {message}")]
    InvalidObject {
        /// Its index in the slice given to [`Cluster::apply`].
        position: usize,
        /// Its `kind`, empty when missing.
        kind: String,
        /// Its `metadata.name`, empty when missing.
        name: String,
        /// What is wrong with it.
        message: String,
    },
    /// The server-side apply of one object failed; the objects before it in
    /// apply order were applied, the ones after it were not.
    #[error("applying {kind} {name:?} failed ({}): {message}", http_status(*.status))]
    Apply {
        /// The object's kind.
        kind: String,
        /// The object's name.
        name: String,
        /// HTTP status of the reply; `None` when no reply came.
        status: Option<u16>,
        /// The API server's message (or the connection error).
        message: String,
        /// See [`KubeError::is_transient`].
        transient: bool,
    },
    /// Reading the Deployment failed.
    #[error("reading Deployment {namespace}/{name} failed ({}): {message}", http_status(*.status))]
    ReadDeployment {
        /// Its namespace.
        namespace: String,
        /// Its name.
        name: String,
        /// HTTP status of the reply; `None` when no reply came.
        status: Option<u16>,
        /// The API server's message (or the connection error).
        message: String,
        /// See [`KubeError::is_transient`].
        transient: bool,
    },
    /// Reading one object back (`GET`, for the cluster audit) failed; a
    /// missing object is not an error but `None`.
    #[error("reading {kind} {name:?} failed ({}): {message}", http_status(*.status))]
    ReadObject {
        /// The object's kind.
        kind: String,
        /// The object's name.
        name: String,
        /// HTTP status of the reply; `None` when no reply came.
        status: Option<u16>,
        /// The API server's message (or the connection error).
        message: String,
        /// See [`KubeError::is_transient`].
        transient: bool,
    },
    /// Listing the objects of one kind in a namespace (for the cluster
    /// audit) failed.
    #[error("listing {kind} in {namespace} failed ({}): {message}", http_status(*.status))]
    ListObjects {
        /// The kind listed.
        kind: String,
        /// The namespace.
        namespace: String,
        /// HTTP status of the reply; `None` when no reply came.
        status: Option<u16>,
        /// The API server's message (or the connection error).
        message: String,
        /// See [`KubeError::is_transient`].
        transient: bool,
    },
    /// Reading or deleting an object gantry no longer renders
    /// ([`Cluster::remove_stale`]) failed; a missing object, or one changed
    /// or deleted by someone else meanwhile, is not an error.
    #[error("deleting {kind} {name:?} failed ({}): {message}", http_status(*.status))]
    DeleteObject {
        /// The object's kind.
        kind: String,
        /// The object's name.
        name: String,
        /// HTTP status of the reply; `None` when no reply came.
        status: Option<u16>,
        /// The API server's message (or the connection error).
        message: String,
        /// See [`KubeError::is_transient`].
        transient: bool,
    },
    /// Listing the app's pods failed.
    #[error("listing pods in {namespace} failed ({}): {message}", http_status(*.status))]
    ListPods {
        /// The namespace.
        namespace: String,
        /// HTTP status of the reply; `None` when no reply came.
        status: Option<u16>,
        /// The API server's message (or the connection error).
        message: String,
        /// See [`KubeError::is_transient`].
        transient: bool,
    },
}

impl KubeError {
    /// Whether retrying later may succeed (see the type's documentation for
    /// the rule).
    pub fn is_transient(&self) -> bool {
        match self {
            KubeError::Connect { .. } => true,
            KubeError::InvalidObject { .. } => false,
            KubeError::Apply { transient, .. }
            | KubeError::ReadDeployment { transient, .. }
            | KubeError::ReadObject { transient, .. }
            | KubeError::ListObjects { transient, .. }
            | KubeError::DeleteObject { transient, .. }
            | KubeError::ListPods { transient, .. } => *transient,
        }
    }
}

fn http_status(status: Option<u16>) -> String {
    status.map_or_else(|| "no response".into(), |s| format!("HTTP {s}"))
}

/// Whether an HTTP status from the API server is worth retrying; see
/// [`KubeError`].
pub fn status_is_transient(status: u16) -> bool {
    // 0 means the server sent a Status without a code: unknown, so retry
    // (redelivery is bounded by the queue's MaxDeliveryCount).
    matches!(status, 0 | 401 | 403 | 408 | 409 | 429 | 500..=599)
}

/// Status, message and transience of a kube error.
fn describe(err: kube::Error) -> (Option<u16>, String, bool) {
    match err {
        kube::Error::Api(status) => {
            let message = if status.message.is_empty() {
                status.reason.clone()
            } else {
                status.message.clone()
            };
            let code = Some(status.code).filter(|c| *c != 0);
            (code, message, status_is_transient(status.code))
        }
        // No usable reply: connection refused or reset, TLS, timeouts (tower
        // wraps them as service errors), credential plugins, or a garbled
        // reply from a proxy. None of these depends on the object.
        e @ (kube::Error::HyperError(_)
        | kube::Error::Service(_)
        | kube::Error::Auth(_)
        | kube::Error::RustlsTls(_)
        | kube::Error::SerdeError(_)
        | kube::Error::ReadEvents(_)) => (None, error_chain(&e), true),
        // Building the request failed: the same input fails again.
        e => (None, error_chain(&e), false),
    }
}

/// `err: source: source...`, because kube's top-level messages alone
/// ("ServiceError: client error (Connect)") rarely say what happened.
fn error_chain(err: &dyn std::error::Error) -> String {
    let mut out = err.to_string();
    let mut source = err.source();
    while let Some(e) = source {
        let text = e.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = e.source();
    }
    out
}

/// What [`Cluster::apply`] applied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Applied {
    /// `(kind, name)` of every object, in the order applied.
    pub objects: Vec<(String, String)>,
    /// `metadata.generation` of the Deployment as the API server returned it
    /// after the apply (unchanged when the apply changed nothing); pass it to
    /// [`Cluster::rollout`]. `None` when no Deployment was applied.
    pub deployment_generation: Option<i64>,
}

/// The verdict on a Deployment's rollout.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Rollout {
    /// Not finished yet; ask again later.
    Progressing {
        /// What it is waiting for, for the run record.
        reason: String,
    },
    /// Every replica runs the current template and is available.
    Complete,
    /// It will not finish by itself: roll back.
    Failed {
        /// Why, naming the pod and container when one is at fault.
        reason: String,
    },
}

/// A Kubernetes API client for applying and verifying.
#[derive(Clone)]
pub struct Cluster {
    client: kube::Client,
}

impl std::fmt::Debug for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // kube::Client is not Debug; the default namespace is what identifies it.
        f.debug_struct("Cluster")
            .field("default_namespace", &self.client.default_namespace())
            .finish()
    }
}

/// One object checked and ready to send.
struct Prepared {
    order: usize,
    info: &'static KindInfo,
    name: String,
    namespace: Option<String>,
    object: DynamicObject,
}

impl Cluster {
    /// Wraps a client (tests pass one built on a `tower-test` mock service).
    pub fn new(client: kube::Client) -> Cluster {
        Cluster { client }
    }

    /// A client from `KUBECONFIG` / `~/.kube/config`, or the in-cluster
    /// service account when running in a pod. Nothing is sent yet: an
    /// unreachable server shows up in the first operation, as a transient
    /// error without a status.
    pub async fn from_kubeconfig_or_in_cluster() -> Result<Cluster, KubeError> {
        let client = kube::Client::try_default()
            .await
            .map_err(|e| KubeError::Connect {
                message: error_chain(&e),
            })?;
        Ok(Cluster { client })
    }

    /// Server-side apply of `objects` in [`APPLY_ORDER`] (Namespace,
    /// ResourceQuota, LimitRange, NetworkPolicy, SecretProviderClass,
    /// ServiceAccount, Deployment, Service, Ingress; objects of one kind keep
    /// their given order), field manager
    /// [`FIELD_MANAGER`], with `force`. Each object is sent as a
    /// [`DynamicObject`] with its own apiVersion and kind, namespaced objects
    /// in their `metadata.namespace` (never the client's default: a missing
    /// namespace is an error, not a guess).
    ///
    /// Every object is checked before the first request, so an unsupported
    /// or malformed object applies nothing. An API failure stops at that
    /// object: the ones before it stay applied, which is harmless because
    /// the next attempt applies the same set again.
    ///
    /// Returns what was applied and the Deployment's `metadata.generation`
    /// after the apply.
    pub async fn apply(&self, objects: &[Value]) -> Result<Applied, KubeError> {
        let mut prepared = objects
            .iter()
            .enumerate()
            .map(|(position, object)| prepare(position, object))
            .collect::<Result<Vec<_>, _>>()?;
        // Stable: several objects of one kind keep the renderer's order.
        prepared.sort_by_key(|p| p.order);

        let params = PatchParams::apply(FIELD_MANAGER).force();
        let mut applied = Applied {
            objects: Vec::with_capacity(prepared.len()),
            deployment_generation: None,
        };
        for p in prepared {
            let resource = p.info.api_resource();
            let api: Api<DynamicObject> = match &p.namespace {
                Some(ns) => Api::namespaced_with(self.client.clone(), ns, &resource),
                None => Api::all_with(self.client.clone(), &resource),
            };
            let result = api
                .patch(&p.name, &params, &Patch::Apply(&p.object))
                .await
                .map_err(|e| {
                    let (status, message, transient) = describe(e);
                    KubeError::Apply {
                        kind: p.info.kind.into(),
                        name: p.name.clone(),
                        status,
                        message,
                        transient,
                    }
                })?;
            tracing::debug!(kind = p.info.kind, name = %p.name, "applied");
            if p.info.kind == "Deployment" {
                applied.deployment_generation = result.metadata.generation;
            }
            applied.objects.push((p.info.kind.into(), p.name));
        }
        Ok(applied)
    }

    /// Reads back, for each of `objects` (rendered manifests), the object of
    /// the same kind, namespace and name as the API server holds it now:
    /// `None` where it does not exist (404). The result is in the order of
    /// `objects`. Every object is checked as [`Cluster::apply`] checks it
    /// before the first request; the first failing read stops (the audit
    /// records the app as unreadable rather than judging half of it).
    pub async fn live(&self, objects: &[Value]) -> Result<Vec<Option<Value>>, KubeError> {
        let prepared = objects
            .iter()
            .enumerate()
            .map(|(position, object)| prepare(position, object))
            .collect::<Result<Vec<_>, _>>()?;
        let mut out = Vec::with_capacity(prepared.len());
        for p in prepared {
            let resource = p.info.api_resource();
            let api: Api<DynamicObject> = match &p.namespace {
                Some(ns) => Api::namespaced_with(self.client.clone(), ns, &resource),
                None => Api::all_with(self.client.clone(), &resource),
            };
            let read_err = |e: kube::Error| {
                let (status, message, transient) = describe(e);
                KubeError::ReadObject {
                    kind: p.info.kind.into(),
                    name: p.name.clone(),
                    status,
                    message,
                    transient,
                }
            };
            let found = api.get_opt(&p.name).await.map_err(read_err)?;
            let value = match found {
                Some(object) => {
                    Some(
                        serde_json::to_value(&object).map_err(|e| KubeError::ReadObject {
                            kind: p.info.kind.into(),
                            name: p.name.clone(),
                            status: None,
                            message: format!("cannot re-encode the object: {e}"),
                            transient: false,
                        })?,
                    )
                }
                None => None,
            };
            out.push(value);
        }
        Ok(out)
    }

    /// Deletes the objects of [`OPTIONAL_KINDS`] named `app` in `namespace`
    /// that gantry created for an earlier deploy but no longer renders (none
    /// of that kind in `rendered`, the objects just applied). Returns the
    /// `(kind, name)` of each object deleted.
    ///
    /// For each such kind: `GET {kind}/{app}`; absent (404, also when the
    /// cluster does not serve the CRD kind) → nothing to do. Present and
    /// labelled `app.kubernetes.io/managed-by: gantry` → `DELETE` with a
    /// `uid` precondition, so an object recreated by someone else between
    /// the read and the delete is left alone; a 404 or 409 on the delete
    /// means it is gone or changed already, not an error. Present without
    /// that label → left as it is with a warning: gantry never deletes what
    /// it did not create. Needs `get` and `delete` on those kinds.
    pub async fn remove_stale(
        &self,
        namespace: &str,
        app: &str,
        rendered: &[Value],
    ) -> Result<Vec<(String, String)>, KubeError> {
        let mut removed = Vec::new();
        for kind in OPTIONAL_KINDS {
            let rendered_kind = rendered
                .iter()
                .any(|o| o.get("kind").and_then(Value::as_str) == Some(kind));
            if rendered_kind {
                continue;
            }
            let Some(info) = KINDS.iter().find(|k| k.kind == kind) else {
                continue;
            };
            let api: Api<DynamicObject> =
                Api::namespaced_with(self.client.clone(), namespace, &info.api_resource());
            let delete_err = |e: kube::Error| {
                let (status, message, transient) = describe(e);
                KubeError::DeleteObject {
                    kind: kind.into(),
                    name: app.into(),
                    status,
                    message,
                    transient,
                }
            };
            // get_opt maps a 404 to None; for a CRD kind the cluster does not
            // serve the 404 carries a different reason, so it is matched too.
            let found = match api.get_opt(app).await {
                Ok(found) => found,
                Err(kube::Error::Api(status)) if status.code == 404 => None,
                Err(e) => return Err(delete_err(e)),
            };
            let Some(object) = found else {
                continue;
            };
            let managed = object
                .metadata
                .labels
                .as_ref()
                .and_then(|l| l.get(MANAGED_BY_LABEL))
                .is_some_and(|v| v == gantry_manifests::MANAGED_BY);
            if !managed {
                tracing::warn!(
                    kind,
                    namespace,
                    name = app,
                    "not rendered for the app any more but not managed by gantry: left as it is"
                );
                continue;
            }
            let params = DeleteParams {
                preconditions: Some(Preconditions {
                    uid: object.metadata.uid.clone(),
                    resource_version: None,
                }),
                ..DeleteParams::default()
            };
            match api.delete(app, &params).await {
                Ok(_) => {
                    tracing::info!(kind, namespace, name = app, "removed: no longer rendered");
                    removed.push((kind.to_string(), app.to_string()));
                }
                Err(kube::Error::Api(status)) if matches!(status.code, 404 | 409) => {
                    tracing::info!(
                        kind,
                        namespace,
                        name = app,
                        code = status.code,
                        "not removed: already gone or replaced meanwhile"
                    );
                }
                Err(e) => return Err(delete_err(e)),
            }
        }
        Ok(removed)
    }

    /// Every object of the namespaced kinds gantry applies ([`KINDS`]) in
    /// `namespace`, whoever created it, each with its `apiVersion` and
    /// `kind` set (list items come without them). For the audit: policies
    /// apply to what runs in a managed namespace, not only to gantry's own
    /// objects. Needs `list` on those kinds. A CRD kind ([`KindInfo::crd`])
    /// the cluster does not serve (404) lists as empty: no such objects can
    /// exist there.
    pub async fn list_namespace(&self, namespace: &str) -> Result<Vec<Value>, KubeError> {
        let mut out = Vec::new();
        for info in KINDS.iter().filter(|k| k.namespaced) {
            match self.list(info, namespace, None).await {
                Ok(items) => out.extend(items),
                Err(KubeError::ListObjects {
                    status: Some(404), ..
                }) if info.crd => continue,
                Err(e) => return Err(e),
            }
        }
        Ok(out)
    }

    /// Every object of kind `info` in `namespace` (matching `label_selector`
    /// when given, e.g. `app.kubernetes.io/managed-by=gantry`), each with
    /// its `apiVersion` and `kind` set (list items come without them). One
    /// `LIST` request; needs `list` on that kind in that namespace.
    pub async fn list(
        &self,
        info: &KindInfo,
        namespace: &str,
        label_selector: Option<&str>,
    ) -> Result<Vec<Value>, KubeError> {
        let api: Api<DynamicObject> =
            Api::namespaced_with(self.client.clone(), namespace, &info.api_resource());
        let mut params = ListParams::default();
        if let Some(selector) = label_selector {
            params = params.labels(selector);
        }
        let list = api.list(&params).await.map_err(|e| {
            let (status, message, transient) = describe(e);
            KubeError::ListObjects {
                kind: info.kind.into(),
                namespace: namespace.into(),
                status,
                message,
                transient,
            }
        })?;
        let mut out = Vec::with_capacity(list.items.len());
        for item in list.items {
            let mut value = serde_json::to_value(&item).map_err(|e| KubeError::ListObjects {
                kind: info.kind.into(),
                namespace: namespace.into(),
                status: None,
                message: format!("cannot re-encode an item: {e}"),
                transient: false,
            })?;
            if let Some(map) = value.as_object_mut() {
                map.insert("apiVersion".into(), info.api_version.into());
                map.insert("kind".into(), info.kind.into());
            }
            out.push(value);
        }
        Ok(out)
    }

    /// The Deployments in `namespace` (optionally by label selector), for the
    /// governance audit of required labels.
    pub async fn list_deployments(
        &self,
        namespace: &str,
        label_selector: Option<&str>,
    ) -> Result<Vec<Value>, KubeError> {
        self.list(&KINDS[DEPLOYMENT], namespace, label_selector)
            .await
    }

    /// The ResourceQuotas in `namespace`, with their `status.hard`/`status.used`.
    pub async fn list_resource_quotas(&self, namespace: &str) -> Result<Vec<Value>, KubeError> {
        self.list(&KINDS[RESOURCE_QUOTA], namespace, None).await
    }

    /// The LimitRanges in `namespace`.
    pub async fn list_limit_ranges(&self, namespace: &str) -> Result<Vec<Value>, KubeError> {
        self.list(&KINDS[LIMIT_RANGE], namespace, None).await
    }

    /// The DaemonSets in `namespace`, with their status (for the mandatory
    /// DaemonSets of `[governance]`). Needs `list` on `daemonsets` (apps) there.
    pub async fn list_daemonsets(&self, namespace: &str) -> Result<Vec<Value>, KubeError> {
        self.list(&DAEMON_SET, namespace, None).await
    }

    /// Reads the Deployment `namespace/name` and its pods (label selector
    /// `app.kubernetes.io/name=<name>`) and [`classify`]s the rollout.
    /// `expected_generation` is [`Applied::deployment_generation`]: until the
    /// controller has observed it, the status describes the previous spec.
    pub async fn rollout(
        &self,
        namespace: &str,
        name: &str,
        expected_generation: Option<i64>,
    ) -> Result<Rollout, KubeError> {
        let deployments: Api<Deployment> = Api::namespaced(self.client.clone(), namespace);
        let deployment = deployments.get(name).await.map_err(|e| {
            let (status, message, transient) = describe(e);
            KubeError::ReadDeployment {
                namespace: namespace.into(),
                name: name.into(),
                status,
                message,
                transient,
            }
        })?;
        let pods: Api<Pod> = Api::namespaced(self.client.clone(), namespace);
        let selector = format!("{APP_NAME_LABEL}={name}");
        let pods = pods
            .list(&ListParams::default().labels(&selector))
            .await
            .map_err(|e| {
                let (status, message, transient) = describe(e);
                KubeError::ListPods {
                    namespace: namespace.into(),
                    status,
                    message,
                    transient,
                }
            })?;
        Ok(classify(&deployment, &pods.items, expected_generation))
    }
}

/// Checks one object against [`KINDS`] and converts it.
fn prepare(position: usize, object: &Value) -> Result<Prepared, KubeError> {
    let text = |pointer: &str| {
        object
            .pointer(pointer)
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string()
    };
    let kind = text("/kind");
    let name = text("/metadata/name");
    let api_version = text("/apiVersion");
    let namespace = text("/metadata/namespace");
    let invalid = |message: String| KubeError::InvalidObject {
        position,
        kind: kind.clone(),
        name: name.clone(),
        message,
    };
    let Some((order, info)) = KINDS.iter().enumerate().find(|(_, k)| k.kind == kind) else {
        return Err(invalid(format!(
            "kind {kind:?} is not one gantry applies ({})",
            APPLY_ORDER.join(", ")
        )));
    };
    if api_version != info.api_version {
        return Err(invalid(format!(
            "apiVersion {api_version:?} is not {:?}",
            info.api_version
        )));
    }
    if name.is_empty() {
        return Err(invalid("metadata.name is missing".into()));
    }
    let namespace = match (info.namespaced, namespace.is_empty()) {
        (true, true) => return Err(invalid("metadata.namespace is missing".into())),
        (true, false) => Some(namespace),
        (false, true) => None,
        (false, false) => {
            return Err(invalid(format!(
                "{kind} is cluster-scoped but has metadata.namespace {namespace:?}"
            )));
        }
    };
    let object: DynamicObject = serde_json::from_value(object.clone())
        .map_err(|e| invalid(format!("not a Kubernetes object: {e}")))?;
    Ok(Prepared {
        order,
        info,
        name,
        namespace,
        object,
    })
}

/// Judges a rollout from the Deployment and the pods its label selects,
/// without a client.
///
/// In order:
/// 1. Until `status.observedGeneration` reaches the Deployment's
///    `metadata.generation` (and `expected_generation`, when given), the
///    status and conditions describe an older spec: `Progressing`. Checking
///    this first keeps a stale `ProgressDeadlineExceeded` from a previous,
///    failed rollout from failing the new one. A Deployment changed again
///    after gantry's apply (generation above `expected_generation`) is
///    judged on its current spec.
/// 2. Condition `Progressing=False` with reason `ProgressDeadlineExceeded`:
///    `Failed`.
/// 3. A container (or init container) of a current pod waiting with one of
///    [`FATAL_WAITING_REASONS`]: `Failed`, naming pod, container and reason.
/// 4. `updatedReplicas`, `replicas` (old pods still count until gone) and
///    `availableReplicas` all equal to `spec.replicas`: `Complete`;
///    otherwise `Progressing`, saying which number is behind.
///
/// # Which pods are current
///
/// Pods of the old ReplicaSet may still be crash-looping while the new ones
/// come up (that is often why a fix is being deployed); they must not fail
/// the new rollout. The precise test, the `pod-template-hash` of the
/// Deployment's newest ReplicaSet, needs reading ReplicaSets (another call
/// and RBAC grant). Instead a pod counts as current when each of its
/// containers has the image the Deployment's template gives the container of
/// that name, and it is not being deleted. gantry deploys by digest, so a new
/// image is a new digest and this separates old from new pods. It cannot
/// when only configuration changed (same digest): then an old pod's crash
/// loop is attributed to the new rollout, which errs toward rolling back to
/// the previous good version.
pub fn classify(
    deployment: &Deployment,
    pods: &[Pod],
    expected_generation: Option<i64>,
) -> Rollout {
    let progressing = |reason: String| Rollout::Progressing { reason };
    let status = deployment.status.clone().unwrap_or_default();
    let spec = deployment.spec.clone().unwrap_or_default();

    let generation = deployment.metadata.generation.unwrap_or(0);
    let target = expected_generation.map_or(generation, |e| e.max(generation));
    let observed = status.observed_generation.unwrap_or(0);
    if observed < target {
        return progressing(format!(
            "waiting for the deployment controller to observe generation {target} (observed {observed})"
        ));
    }

    let conditions = status.conditions.as_deref().unwrap_or_default();
    if let Some(c) = conditions.iter().find(|c| {
        c.type_ == "Progressing"
            && c.status == "False"
            && c.reason.as_deref() == Some("ProgressDeadlineExceeded")
    }) {
        let message = c.message.as_deref().unwrap_or("progress deadline exceeded");
        return Rollout::Failed {
            reason: format!("ProgressDeadlineExceeded: {message}"),
        };
    }

    if let Some(reason) = failing_pod(&spec, pods) {
        return Rollout::Failed { reason };
    }

    if spec.paused == Some(true) {
        return progressing("the deployment is paused".into());
    }
    let desired = spec.replicas.unwrap_or(1);
    let updated = status.updated_replicas.unwrap_or(0);
    let total = status.replicas.unwrap_or(0);
    let available = status.available_replicas.unwrap_or(0);
    // kubectl rollout status asks the same three questions in this order.
    let waiting = if updated < desired {
        Some(format!(
            "{updated} of {desired} replicas run the new template"
        ))
    } else if total > updated {
        Some(format!(
            "{} old replicas are pending termination",
            total - updated
        ))
    } else if available < updated {
        Some(format!(
            "{available} of {updated} updated replicas are available"
        ))
    } else {
        None
    };
    match waiting {
        Some(mut reason) => {
            // A quota or admission refusal shows up only as this condition;
            // it can clear (quota freed), so it is not a failure by itself
            // and the progress deadline decides.
            if let Some(c) = conditions
                .iter()
                .find(|c| c.type_ == "ReplicaFailure" && c.status == "True")
            {
                reason.push_str(&format!(
                    "; ReplicaFailure {}: {}",
                    c.reason.as_deref().unwrap_or(""),
                    c.message.as_deref().unwrap_or("")
                ));
            }
            progressing(reason)
        }
        None => Rollout::Complete,
    }
}

/// The first current pod with a container stuck in a fatal waiting state,
/// as `pod <name>: container <name>: <reason>: <message>`.
fn failing_pod(spec: &k8s_openapi::api::apps::v1::DeploymentSpec, pods: &[Pod]) -> Option<String> {
    let template = spec.template.spec.as_ref()?;
    let template_image = |container: &str| {
        template
            .containers
            .iter()
            .chain(template.init_containers.iter().flatten())
            .find(|c| c.name == container)
            .and_then(|c| c.image.as_deref())
    };
    pods.iter()
        .filter(|pod| pod.metadata.deletion_timestamp.is_none())
        .filter(|pod| {
            pod.spec.as_ref().is_some_and(|s| {
                s.containers
                    .iter()
                    .chain(s.init_containers.iter().flatten())
                    .all(|c| c.image.is_some() && c.image.as_deref() == template_image(&c.name))
            })
        })
        .find_map(|pod| {
            let status = pod.status.as_ref()?;
            status
                .init_container_statuses
                .iter()
                .flatten()
                .chain(status.container_statuses.iter().flatten())
                .find_map(|cs| {
                    let waiting = cs.state.as_ref()?.waiting.as_ref()?;
                    let reason = waiting.reason.as_deref()?;
                    FATAL_WAITING_REASONS.contains(&reason).then(|| {
                        let mut text = format!(
                            "pod {}: container {}: {reason}",
                            pod.metadata.name.as_deref().unwrap_or("?"),
                            cs.name
                        );
                        if let Some(m) = waiting.message.as_deref().filter(|m| !m.is_empty()) {
                            text.push_str(": ");
                            text.push_str(m);
                        }
                        text
                    })
                })
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_follow_apply_order() {
        let kinds: Vec<&str> = KINDS.iter().map(|k| k.kind).collect();
        assert_eq!(kinds, APPLY_ORDER);
        assert_eq!(KINDS[RESOURCE_QUOTA].kind, "ResourceQuota");
        assert_eq!(KINDS[LIMIT_RANGE].kind, "LimitRange");
        assert_eq!(KINDS[DEPLOYMENT].kind, "Deployment");
    }

    #[test]
    fn transient_statuses() {
        for s in [401, 403, 408, 409, 429, 500, 502, 503, 504] {
            assert!(status_is_transient(s), "{s}");
        }
        for s in [400, 404, 405, 415, 422] {
            assert!(!status_is_transient(s), "{s}");
        }
    }
}
