//! What steps read from the world, shared by the functions that read it, so a
//! function crate depends on `shared/*` and never on another function:
//!
//! - [`cluster`]: the Kubernetes client (`deploy`, `cluster-audit`);
//! - [`policy_set`]: the compiled policies (`policy-enforce`, `cluster-audit`);
//! - [`fetch_findings`]: a digest's vulnerability findings (`scan-check`,
//!   `cluster-audit`'s re-check);
//! - [`rendering_source`]: the run whose provenance a run's manifests are
//!   rendered with (`deploy`, `cluster-audit`'s drift check).
//!
//! Clients and compiled policies are built once per process and kept in
//! [`gantry_runtime::Services`] under the keys below; a host or a test may
//! insert its own first (tests: a client on a fake API server).

use std::sync::Arc;

use gantry_kube::{Cluster, KubeError};
use gantry_pipeline::config::{ScanSettings, ScanSource};
use gantry_pipeline::{Digest, PipelineError, Run};
use gantry_policy::PolicySet;
use gantry_runtime::Deps;
use gantry_scan::{Findings, ScanError};

/// Key of the [`Cluster`] in [`gantry_runtime::Services`].
pub const CLUSTER_KEY: &str = "deploy/cluster";

/// Key of the [`PolicySet`] in [`gantry_runtime::Services`].
pub const POLICY_SET_KEY: &str = "policy-enforce/policy-set";

/// Key of the Resource Graph client in [`gantry_runtime::Services`].
pub const RESOURCE_GRAPH_KEY: &str = "scan-check/resource-graph";

/// The process's cluster client: for `[deploy] aks_cluster`, AKS through
/// Azure Resource Manager with Entra tokens ([`gantry_kube::aks`]); otherwise
/// the kubeconfig or the in-cluster service account. A failure is not kept,
/// so the next invocation tries again.
pub async fn cluster(deps: &Deps) -> Result<Arc<Cluster>, KubeError> {
    deps.services
        .cached_async(CLUSTER_KEY, || async {
            let Some(id) = &deps.config.deploy.aks_cluster else {
                return Cluster::from_kubeconfig_or_in_cluster().await;
            };
            let Some(credential) = deps.services.credential.clone() else {
                return Err(KubeError::Connect {
                    message: format!(
                        "[deploy] aks_cluster {id} needs an Azure credential; none is configured"
                    ),
                });
            };
            Cluster::from_aks(
                id,
                &deps.config.deploy.arm_endpoint,
                credential,
                &deps.services.http,
            )
            .await
        })
        .await
}

/// The policy set of this process: built-ins plus the configured folder,
/// compiled once (the slow part) and shared.
pub fn policy_set(deps: &Deps) -> Result<Arc<PolicySet>, gantry_policy::PolicyError> {
    let folder = deps
        .config
        .policy
        .folder
        .as_ref()
        .map(|f| deps.config.resolve(f));
    let builtin = deps.config.policy.builtin;
    deps.services.cached(POLICY_SET_KEY, || {
        PolicySet::load(builtin, folder.as_deref())
    })
}

/// The run whose provenance `run`'s manifests are rendered with: `run`
/// itself, or for a rollback run the earlier run it deploys again (which must
/// hold the same digest). `Ok(Err(why))` when that run is gone or does not match.
pub async fn rendering_source(
    deps: &Deps,
    run: &Run,
) -> Result<Result<Run, String>, PipelineError> {
    let Some(of) = &run.rollback else {
        return Ok(Ok(run.clone()));
    };
    let Some(source) = deps.runs.get(&run.app, &of.run_id).await? else {
        return Ok(Err(format!(
            "the run {} this rollback deploys again is gone",
            of.run_id
        )));
    };
    let digest = |r: &Run| r.image.as_ref().map(|i| i.digest.clone());
    if digest(&source) != digest(run) {
        return Ok(Err(format!(
            "the run {} this rollback deploys again does not hold its digest",
            of.run_id
        )));
    }
    Ok(Ok(source))
}

/// What the scan source has for a digest.
#[derive(Debug)]
pub enum Fetched {
    /// Findings are in, with where they came from.
    Found(Findings, String),
    /// The source has nothing for this digest yet.
    Pending(String),
    /// The report exists but is unusable (permanent: fails the run).
    Broken(String),
}

/// Why findings could not be fetched.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    /// Reading an uploaded report from the state store failed.
    #[error("reading the scan report failed: {0}")]
    ReadReport(#[from] gantry_store::StoreError),
    /// Asking the scan source (Resource Graph) failed.
    #[error("{0}")]
    QuerySource(#[from] ScanError),
}

impl FetchError {
    /// Whether trying again later may succeed.
    pub fn is_transient(&self) -> bool {
        match self {
            FetchError::ReadReport(e) => e.is_transient(),
            FetchError::QuerySource(e) => e.is_transient(),
        }
    }
}

/// A digest's findings from the configured source: a Trivy report
/// (`scans/{digest}.trivy.json` uploaded by CI, else `{trivy_dir}/` on disk
/// in `gantry dev`), or Defender for Containers through Resource Graph.
pub async fn fetch_findings(
    deps: &Deps,
    settings: &ScanSettings,
    digest: &Digest,
) -> Result<Fetched, FetchError> {
    match settings.source {
        ScanSource::Trivy => Ok(fetch_trivy(deps, digest).await?),
        ScanSource::Defender => {
            let Some(credential) = deps.services.credential.clone() else {
                return Err(ScanError::AuthenticateResourceGraph {
                    message: "no Azure credential is configured for the defender source".into(),
                }
                .into());
            };
            let endpoint = deps.config.scan.defender.endpoint.clone();
            let http = deps.services.http.clone();
            let graph = deps.services.cached(RESOURCE_GRAPH_KEY, || {
                gantry_scan::defender::ResourceGraph::new(&endpoint, credential, http)
            })?;
            match graph
                .findings(&deps.config.scan.defender.subscriptions, digest)
                .await?
            {
                Some(f) => Ok(Fetched::Found(
                    f,
                    "Defender for Containers (Resource Graph)".into(),
                )),
                None => Ok(Fetched::Pending("Defender for Containers".into())),
            }
        }
    }
}

async fn fetch_trivy(deps: &Deps, digest: &Digest) -> Result<Fetched, gantry_store::StoreError> {
    let name = format!("scans/{digest}.trivy.json");
    let parse = |bytes: &[u8], origin: String| match gantry_scan::trivy::parse_report(
        bytes,
        Some(digest),
        &origin,
    ) {
        Ok(f) => Fetched::Found(f, origin),
        Err(e) => Fetched::Broken(e.to_string()),
    };
    if let Some(v) = deps.runs.raw().get(&name).await? {
        return Ok(parse(&v.body, name));
    }
    if let Some(dir) = &deps.config.scan.trivy_dir {
        let path = deps
            .config
            .resolve(dir)
            .join(format!("{digest}.trivy.json"));
        match tokio::fs::read(&path).await {
            Ok(bytes) => return Ok(parse(&bytes, path.display().to_string())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Ok(Fetched::Broken(format!("reading {}: {e}", path.display()))),
        }
    }
    Ok(Fetched::Pending(format!("Trivy ({name})")))
}
