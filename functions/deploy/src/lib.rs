//! `deploy` (Service Bus `deploy`, sessions keyed by app, so one app's deploys
//! never overlap).
//!
//! Before writing anything it verifies **from the record, not the message**:
//! the run is the newest of its app (else `superseded`), its digest is not in
//! `apps/{app}/blocked/`, the scan and policy verdicts passed for this digest,
//! and the manifests rendered now are exactly the ones the policy gate checked
//! (same hash) — a `gantry.toml` changed in between fails the run instead of
//! deploying unchecked manifests.
//!
//! Target `directory` (GitOps hand-off, the default of `gantry dev`): the
//! manifests are written to `<dir>/<app>/`, one file per object with stable
//! names, replaced as a whole (written and fsynced beside it, then swapped in by
//! two renames), so a reader sees the old set or the new set — or, for the
//! instant between the two renames, no folder; never a mix. Verification passes at once; the run
//! becomes `deployed` and `apps/{app}/deployed.json` records the current and the
//! previous good version (compare-and-swap). A redelivery rewrites the same
//! files and changes nothing else.
//!
//! Target `kubernetes`: the manifests are applied by server-side apply in
//! dependency order ([`gantry_kube::Cluster::apply`]), then gantry's own
//! Ingress or SecretProviderClass the app no longer renders is deleted
//! ([`gantry_kube::Cluster::remove_stale`], also after a rollback's apply;
//! recorded as `removed` in the step details); the deploy step passes,
//! the run becomes `verifying` and the function returns at once. The rollout
//! is judged by scheduled `verify` messages (same queue and session, MessageId
//! `{run}:verify:{attempt}:{n}`), each reading the Deployment and its pods:
//! complete → `deployed.json` is recorded and the run is `deployed`;
//! still progressing before `[deploy] verify_deadline` (counted from the
//! apply) → check again after `verify_interval`; failed or out of time → the
//! digest is blocked and the previous good version is applied again (`rolled-back`),
//! or, without one whose manifests render to the recorded hash, the run is
//! `failed`. The cluster client is built once per process ([`CLUSTER_KEY`]):
//! for `[deploy] aks_cluster`, from Azure Resource Manager with Entra tokens
//! ([`gantry_kube::aks`]); otherwise from the kubeconfig or the in-cluster
//! service account.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use gantry_kube::{Cluster, KubeError, Rollout};
use gantry_pipeline::config::DeployTarget;
use gantry_pipeline::messages::{Deployed, DeployedVersion, PHASE_VERIFY};
use gantry_pipeline::run::steps;
use gantry_pipeline::runs::blobs;
use gantry_pipeline::{PipelineError, Run, RunStatus, Severity, Step, StepRequest, StepStatus};
use gantry_runtime::steps::{self as step, StepError};
use gantry_runtime::{Deps, Done, FromMessage, Function, FunctionError, Invocation};
use time::OffsetDateTime;

/// Function name: folder, route and span.
pub const NAME: &str = "deploy";

/// Key of the cluster client in [`gantry_runtime::Services`] (see
/// [`gantry_context::cluster`]); tests insert a client on a fake API server.
pub use gantry_context::CLUSTER_KEY;

/// The function's registration.
pub fn function() -> Function {
    Function::queue(NAME, "deploy", true, |inv, deps: Arc<Deps>| async move {
        handle(inv, &deps).await
    })
}

/// The `deploy` message.
#[derive(Debug, Clone)]
pub struct DeployMessage(pub StepRequest);

impl FromMessage for DeployMessage {
    fn from_message(body: &[u8]) -> Result<Self, String> {
        serde_json::from_slice(body)
            .map(DeployMessage)
            .map_err(|e| format!("deploy request: {e}"))
    }
}

/// Why the deploy step could not finish.
#[derive(Debug, thiserror::Error)]
pub enum DeployError {
    /// The message names a run that does not exist or does not match it.
    #[error("deploy request for run {run}: {reason}")]
    CheckRequest {
        /// Run id.
        run: String,
        /// What does not match.
        reason: String,
    },
    /// Reading or writing state failed.
    #[error("recording the deploy of run {run} failed: {source}")]
    Record {
        /// Run id.
        run: String,
        /// Cause.
        source: PipelineError,
    },
    /// Writing the manifests to the target failed (disk full, permissions).
    #[error("writing manifests for run {run} to {path} failed: {message}")]
    WriteManifests {
        /// Run id.
        run: String,
        /// Target folder.
        path: String,
        /// The I/O error.
        message: String,
    },
    /// Talking to the cluster failed (only transient failures end up here;
    /// permanent ones fail the run).
    #[error("cluster operation for run {run} failed: {source}")]
    Kube {
        /// Run id.
        run: String,
        /// Cause.
        source: KubeError,
    },
    /// Recording a transition or announcing it failed.
    #[error(transparent)]
    Step(#[from] StepError),
}

impl FunctionError for DeployError {
    fn is_transient(&self) -> bool {
        match self {
            DeployError::CheckRequest { .. } => false,
            DeployError::Record { source, .. } => source.is_transient(),
            // Disks fill up and get fixed; retry, and dead-letter with a record.
            DeployError::WriteManifests { .. } => true,
            DeployError::Kube { source, .. } => source.is_transient(),
            DeployError::Step(e) => e.is_transient(),
        }
    }
}

/// Handles one `deploy` message (lambda style).
pub async fn handle(inv: Invocation<DeployMessage>, deps: &Deps) -> Result<Done, DeployError> {
    let request = inv.event.0;
    if request.is_verify() {
        return verify(&request, inv.meta.message_id.as_deref(), deps).await;
    }
    let run_id = request.run_id.to_string();
    let record = |source: PipelineError| DeployError::Record {
        run: run_id.clone(),
        source,
    };
    let check = |reason: String| DeployError::CheckRequest {
        run: run_id.clone(),
        reason,
    };
    let step::Subject { app, run, image } =
        step::subject(deps, &request).await.map_err(|e| match e {
            step::SubjectError::Check(reason) => check(reason),
            step::SubjectError::Read(source) => record(source),
        })?;
    let digest = image.digest.clone();
    if let Some(phase) = &request.phase {
        return Err(check(format!("unknown phase {phase:?}")));
    }
    if !step::waiting_for(&run, RunStatus::Deploying, steps::DEPLOY, request.attempt) {
        // Applied, but the first verify message may have been lost: send it
        // again (its MessageId drops a duplicate).
        if run.status == RunStatus::Verifying
            && run
                .steps
                .get(steps::DEPLOY)
                .is_some_and(|s| s.status == StepStatus::Passed && s.attempts == request.attempt)
            && let Some(v) = run.steps.get(steps::VERIFY)
        {
            let at = OffsetDateTime::now_utc() + deps.config.deploy.verify_interval;
            send_verify(deps, &run, &digest, request.attempt, checks(v), at).await?;
            return Ok(Done(format!(
                "run {run_id}: deploy already applied; verify hand-off repeated"
            )));
        }
        if let Some(what) =
            step::repeat_after_redelivery(deps, &run, steps::DEPLOY, request.attempt, &digest, None)
                .await?
        {
            return Ok(Done(format!("run {run_id}: {what}")));
        }
        // Deployed, but the alert may have been lost (a transient send failure
        // after the run was recorded): repeat it, its MessageId drops a duplicate.
        if run.status == RunStatus::Deployed
            && run
                .steps
                .get(steps::DEPLOY)
                .is_some_and(|s| s.status == StepStatus::Passed && s.attempts == request.attempt)
        {
            deployed_alert(deps, &run, &image, &digest).await?;
            return Ok(Done(format!(
                "run {run_id}: deploy already passed; alert repeated"
            )));
        }
        return Ok(Done(format!(
            "run {run_id}: not waiting for deploy attempt {} (run is {}); nothing to do",
            request.attempt, run.status
        )));
    }
    // Checked before the run is touched: a refused message leaves it as it was.
    let passed = |name: &str| {
        run.steps
            .get(name)
            .is_some_and(|s| s.status == StepStatus::Passed)
    };
    if !passed(steps::SCAN) || !passed(steps::POLICY) {
        return Err(check(
            "the scan and policy verdicts are not both passed for this digest".into(),
        ));
    }
    let run = step::start(deps, &run, steps::DEPLOY).await?;

    // Only the newest run of an app may deploy. Runs that were themselves
    // superseded (e.g. a `latest`-tag run taken over by its commit's run) do not
    // count as newer deliveries.
    let newer = newer_run(deps, &run, |_| true).await.map_err(record)?;
    if let Some(newer) = newer {
        supersede(deps, &run, &newer, RunStatus::Deploying, steps::DEPLOY)
            .await
            .map_err(record)?;
        return Ok(Done(format!(
            "run {run_id}: superseded by newer run {newer}"
        )));
    }
    if step::is_blocked(deps, &app.name, &digest)
        .await
        .map_err(record)?
    {
        let reason = format!("digest {digest} is blocked for {}", app.name);
        step::block(
            deps,
            NAME,
            &run,
            steps::DEPLOY,
            &digest,
            &reason,
            serde_json::Value::Null,
        )
        .await?;
        return Ok(Done(format!("run {run_id}: {reason}")));
    }
    // A rollback run deploys an earlier run's manifests exactly as that run
    // rendered them (its provenance), which is what that run's policy gate checked.
    let rendered = match gantry_context::rendering_source(deps, &run)
        .await
        .map_err(record)?
        .and_then(|source| {
            gantry_manifests::render_run(app, &source)
                .map_err(|e| format!("rendering manifests: {e}"))
        }) {
        Ok(r) => r,
        Err(reason) => {
            step::fail(deps, NAME, &run, steps::DEPLOY, &reason).await?;
            return Ok(Done(format!("run {run_id}: failed: {reason}")));
        }
    };
    let checked = run
        .steps
        .get(steps::POLICY)
        .and_then(|s| s.details.get("manifest_hash"))
        .and_then(serde_json::Value::as_str);
    if checked != Some(rendered.hash.as_str()) {
        let reason = format!(
            "the manifests changed since the policy gate checked them (hash {} now, {} checked): retrigger from policy",
            short(&rendered.hash),
            checked.map(short).unwrap_or("none")
        );
        step::fail(deps, NAME, &run, steps::DEPLOY, &reason).await?;
        return Ok(Done(format!("run {run_id}: failed: {reason}")));
    }

    let target = deps.config.deploy_dir(&app.name);
    // An unreadable deployed.json (the rollback target) is never overwritten,
    // so it must stop the deploy before the manifests are handed off too.
    let deployed_name = blobs::deployed(&app.name);
    let deployed = match deps
        .runs
        .raw()
        .get(&deployed_name)
        .await
        .map_err(|e| record(e.into()))?
    {
        Some(v) => decode_deployed(&deployed_name, &v.body).map_err(record)?,
        None => Deployed::default(),
    };
    if deps.config.deploy.target == DeployTarget::Kubernetes {
        let previous = rollback_target(&deployed, &digest);
        return apply_kubernetes(deps, &run, app, &request, &rendered, previous.as_ref()).await;
    }
    write_directory(&target, &rendered.objects).map_err(|message| DeployError::WriteManifests {
        run: run_id.clone(),
        path: target.display().to_string(),
        message,
    })?;
    let previous = record_deployed(deps, &run, &digest, &rendered.hash)
        .await
        .map_err(record)?;
    let summary = format!(
        "wrote {} objects to {} (manifest hash {})",
        rendered.objects.len(),
        target.display(),
        short(&rendered.hash)
    );
    finish(deps, &run, &summary, &rendered.hash, previous.as_ref()).await?;
    deployed_alert(deps, &run, &image, &digest).await?;
    Ok(Done(format!("run {run_id}: deployed: {summary}")))
}

/// The newest run of the app newer than `run` that was not itself superseded
/// and satisfies `matters`.
async fn newer_run(
    deps: &Deps,
    run: &Run,
    matters: impl Fn(&Run) -> bool,
) -> Result<Option<gantry_pipeline::RunId>, PipelineError> {
    for (_, id) in deps.runs.list_ids(Some(&run.app)).await?.into_iter().rev() {
        if id <= run.id {
            break;
        }
        if let Some(other) = deps.runs.get(&run.app, &id).await?
            && other.status != RunStatus::Superseded
            && matters(&other)
        {
            return Ok(Some(id));
        }
    }
    Ok(None)
}

/// The info alert `{run}:alert:deployed`.
async fn deployed_alert(
    deps: &Deps,
    run: &Run,
    image: &gantry_pipeline::Image,
    digest: &gantry_pipeline::Digest,
) -> Result<(), StepError> {
    step::alert(
        deps,
        run,
        steps::DEPLOY,
        "deployed",
        "deployed",
        Severity::Info,
        Some(digest),
        format!("{} deployed {}@{digest}", run.app, image.repository),
    )
    .await
}

fn short(hash: &str) -> &str {
    &hash[..hash.len().min(12)]
}

/// Writes one file per object into a fresh folder beside `target`, then swaps
/// it in by rename, so readers see either the old or the new complete set.
fn write_directory(target: &Path, objects: &[serde_json::Value]) -> Result<(), String> {
    let parent = target.parent().ok_or("target has no parent folder")?;
    std::fs::create_dir_all(parent).map_err(|e| e.to_string())?;
    let name = target
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or("target has no name")?;
    let mut nonce = [0u8; 8];
    let _ = getrandom::fill(&mut nonce);
    let nonce = hex::encode(nonce);
    let staging = parent.join(format!(".{name}.new-{nonce}"));
    let old = parent.join(format!(".{name}.old-{nonce}"));
    let result = (|| -> Result<(), String> {
        std::fs::create_dir(&staging).map_err(|e| e.to_string())?;
        for object in objects {
            let yaml = gantry_manifests::to_yaml(std::slice::from_ref(object))
                .map_err(|e| e.to_string())?;
            let path = staging.join(gantry_manifests::object_file_name(object));
            write_synced(&path, yaml.as_bytes()).map_err(|e| format!("{}: {e}", path.display()))?;
        }
        sync_dir(&staging).map_err(|e| e.to_string())?;
        match std::fs::rename(target, &old) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e.to_string()),
        }
        if let Err(e) = std::fs::rename(&staging, target) {
            // Put the old set back rather than deleting it below.
            let _ = std::fs::rename(&old, target);
            return Err(e.to_string());
        }
        sync_dir(parent).map_err(|e| e.to_string())?;
        Ok(())
    })();
    let _ = std::fs::remove_dir_all(&staging);
    let _ = std::fs::remove_dir_all(&old);
    result
}

fn write_synced(path: &PathBuf, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write as _;
    let mut file = std::fs::File::create(path)?;
    file.write_all(bytes)?;
    file.sync_all()
}

fn sync_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::File::open(dir)?.sync_all()
}

/// `apps/{app}/deployed.json` by compare-and-swap: this run becomes current, the
/// former current (if another digest) becomes the previous good version.
/// Returns the previous good version.
async fn record_deployed(
    deps: &Deps,
    run: &Run,
    digest: &gantry_pipeline::Digest,
    hash: &str,
) -> Result<Option<DeployedVersion>, PipelineError> {
    let this = DeployedVersion {
        digest: digest.clone(),
        run_id: run.id.clone(),
        manifest_hash: hash.to_string(),
    };
    let deployed: Deployed = deps
        .runs
        .update_json(&blobs::deployed(&run.app), |deployed: &mut Deployed| {
            if deployed
                .current
                .as_ref()
                .is_some_and(|c| c.run_id == run.id)
            {
                return Ok(false); // a redelivery: already recorded
            }
            if let Some(former) = deployed.current.take()
                && former.digest != *digest
            {
                deployed.previous = Some(former);
            }
            deployed.current = Some(this.clone());
            Ok(true)
        })
        .await?;
    Ok(deployed.previous)
}

fn decode_deployed(name: &str, body: &[u8]) -> Result<Deployed, PipelineError> {
    serde_json::from_slice(body).map_err(|e| PipelineError::Decode {
        name: name.to_string(),
        message: e.to_string(),
    })
}

async fn finish(
    deps: &Deps,
    run: &Run,
    summary: &str,
    hash: &str,
    previous: Option<&DeployedVersion>,
) -> Result<(), StepError> {
    let now = OffsetDateTime::now_utc();
    deps.runs
        .update(&run.app, &run.id, |r| {
            if r.status != RunStatus::Deploying {
                return Ok(false);
            }
            let Some(s) = r.steps.get_mut(steps::DEPLOY) else {
                return Ok(false);
            };
            s.finish(StepStatus::Passed, now, summary.to_string());
            s.details = serde_json::json!({
                "target": "directory",
                "manifest_hash": hash,
                "previous": previous,
            });
            // The directory target has nothing to roll out: verified at once.
            r.steps.insert(
                steps::VERIFY.into(),
                Step::finished(
                    StepStatus::Passed,
                    now,
                    "directory target: nothing to roll out",
                ),
            );
            r.status = RunStatus::Deployed;
            Ok(true)
        })
        .await
        .map_err(|source| StepError::Record {
            run: run.id.clone(),
            source,
        })?;
    step::audit(
        deps,
        NAME,
        run,
        "run.deployed",
        serde_json::json!({"manifest_hash": hash, "previous": previous}),
    )
    .await;
    Ok(())
}

/// Marks `run` superseded by `newer` while it waits in `status` at `step`
/// (deploy before applying, verify while checking a rollout).
async fn supersede(
    deps: &Deps,
    run: &Run,
    newer: &gantry_pipeline::RunId,
    status: RunStatus,
    step_name: &str,
) -> Result<(), PipelineError> {
    let now = OffsetDateTime::now_utc();
    let verifying = status == RunStatus::Verifying;
    let summary = if verifying {
        format!("superseded while verifying by newer run {newer}")
    } else {
        format!("superseded by newer run {newer}")
    };
    deps.runs
        .update(&run.app, &run.id, |r| {
            if r.status != status {
                return Ok(false);
            }
            if let Some(s) = r.steps.get_mut(step_name) {
                s.finish(StepStatus::Skipped, now, summary.clone());
            }
            r.status = RunStatus::Superseded;
            Ok(true)
        })
        .await?;
    let detail = if verifying {
        serde_json::json!({"by": newer, "while": "verifying"})
    } else {
        serde_json::json!({"by": newer})
    };
    step::audit(deps, NAME, run, "run.superseded", detail).await;
    Ok(())
}

// ---- kubernetes target -------------------------------------------------------

/// The version a failed rollout of `digest` goes back to: what runs now
/// (`current`, not yet replaced, since a run is recorded only once verified),
/// or the previous good version when `current` is this very digest.
fn rollback_target(
    deployed: &Deployed,
    digest: &gantry_pipeline::Digest,
) -> Option<DeployedVersion> {
    [&deployed.current, &deployed.previous]
        .into_iter()
        .flatten()
        .find(|v| v.digest != *digest)
        .cloned()
}

/// The number of the rollout check the verify step waits for.
fn checks(verify: &Step) -> u32 {
    verify
        .details
        .get("checks")
        .and_then(serde_json::Value::as_u64)
        .and_then(|n| u32::try_from(n).ok())
        .unwrap_or(1)
}

/// `n` of a MessageId `{run}:verify:{attempt}:{n}`.
fn check_number(message_id: &str) -> Option<u32> {
    match message_id.split(':').collect::<Vec<_>>().as_slice() {
        [_, "verify", _, n] => n.parse().ok(),
        _ => None,
    }
}

/// Schedules rollout check `n` of deploy attempt `attempt` at `at`.
async fn send_verify(
    deps: &Deps,
    run: &Run,
    digest: &gantry_pipeline::Digest,
    attempt: u32,
    n: u32,
    at: OffsetDateTime,
) -> Result<(), StepError> {
    let request = StepRequest {
        app: run.app.clone(),
        run_id: run.id.clone(),
        digest: digest.clone(),
        attempt,
        phase: Some(PHASE_VERIFY.into()),
    };
    let queue_err = |source| StepError::Queue {
        run: run.id.clone(),
        source,
    };
    let message = gantry_bus::OutMessage::json(NAME, &request)
        .map_err(queue_err)?
        .with_id(request.verify_message_id(n))
        .with_session(run.app.to_string())
        .scheduled_at(at)
        .with_property("run-id", run.id.to_string())
        .with_property("app", run.app.to_string());
    deps.send(message).await.map_err(queue_err)
}

/// Deletes the app's objects that gantry created earlier but `rendered` no
/// longer contains ([`Cluster::remove_stale`]): server-side apply never
/// deletes, and an Ingress left behind would keep exposing the app.
async fn remove_stale(
    cluster: &Cluster,
    app: &gantry_pipeline::AppConfig,
    rendered: &gantry_manifests::Rendered,
) -> Result<Vec<(String, String)>, KubeError> {
    cluster
        .remove_stale(
            app.namespace().as_str(),
            app.name.as_str(),
            &rendered.objects,
        )
        .await
}

/// `[{"kind", "name"}]` for the step details.
fn kind_names(objects: &[(String, String)]) -> Vec<serde_json::Value> {
    objects
        .iter()
        .map(|(kind, name)| serde_json::json!({"kind": kind, "name": name}))
        .collect()
}

/// `; removed Ingress web, ...` for a summary, empty when nothing was.
fn removed_summary(removed: &[(String, String)]) -> String {
    if removed.is_empty() {
        return String::new();
    }
    let list: Vec<String> = removed
        .iter()
        .map(|(kind, name)| format!("{kind} {name}"))
        .collect();
    format!("; removed {} (no longer rendered)", list.join(", "))
}

/// Applies the manifests, removes the objects no longer rendered, passes the
/// deploy step and hands the run to the scheduled rollout checks.
async fn apply_kubernetes(
    deps: &Deps,
    run: &Run,
    app: &gantry_pipeline::AppConfig,
    request: &StepRequest,
    rendered: &gantry_manifests::Rendered,
    previous: Option<&DeployedVersion>,
) -> Result<Done, DeployError> {
    let run_id = run.id.to_string();
    let kube_err = |source| DeployError::Kube {
        run: run_id.clone(),
        source,
    };
    let cluster = gantry_context::cluster(deps).await.map_err(kube_err)?;
    let applied = match cluster.apply(&rendered.objects).await {
        Ok(a) => a,
        Err(e) if e.is_transient() => return Err(kube_err(e)),
        Err(e) => {
            let reason = format!("applying the manifests: {e}");
            step::fail(deps, NAME, run, steps::DEPLOY, &reason).await?;
            return Ok(Done(format!("run {run_id}: failed: {reason}")));
        }
    };
    // After the apply, so the app is never left without what it renders now;
    // a redelivery applies again and finds nothing more to remove.
    let removed = match remove_stale(&cluster, app, rendered).await {
        Ok(r) => r,
        Err(e) if e.is_transient() => return Err(kube_err(e)),
        Err(e) => {
            let reason = format!("removing objects no longer rendered: {e}");
            step::fail(deps, NAME, run, steps::DEPLOY, &reason).await?;
            return Ok(Done(format!("run {run_id}: failed: {reason}")));
        }
    };
    let now = OffsetDateTime::now_utc();
    let summary = format!(
        "applied {} objects to namespace {} (manifest hash {}){}",
        applied.objects.len(),
        app.namespace(),
        short(&rendered.hash),
        removed_summary(&removed)
    );
    let details = serde_json::json!({
        "target": "kubernetes",
        "manifest_hash": rendered.hash,
        "applied": kind_names(&applied.objects),
        "removed": kind_names(&removed),
        "generation": applied.deployment_generation,
        "previous": previous,
    });
    deps.runs
        .update(&run.app, &run.id, |r| {
            if r.status != RunStatus::Deploying {
                return Ok(false);
            }
            let Some(s) = r.steps.get_mut(steps::DEPLOY) else {
                return Ok(false);
            };
            s.finish(StepStatus::Passed, now, summary.clone());
            s.details = details.clone();
            r.steps.insert(
                steps::VERIFY.into(),
                Step {
                    started_at: Some(now),
                    summary: Some("waiting for the rollout".into()),
                    details: serde_json::json!({"checks": 1}),
                    ..Step::pending(request.attempt)
                },
            );
            r.status = RunStatus::Verifying;
            Ok(true)
        })
        .await
        .map_err(|source| StepError::Record {
            run: run.id.clone(),
            source,
        })?;
    step::audit(deps, NAME, run, "run.applied", details.clone()).await;
    let at = now + deps.config.deploy.verify_interval;
    send_verify(deps, run, &request.digest, request.attempt, 1, at).await?;
    Ok(Done(format!(
        "run {run_id}: {summary}; rollout check 1 at {}",
        step::rfc3339(at)
    )))
}

/// One scheduled rollout check (`phase = "verify"`).
async fn verify(
    request: &StepRequest,
    message_id: Option<&str>,
    deps: &Deps,
) -> Result<Done, DeployError> {
    let run_id = request.run_id.to_string();
    let record = |source: PipelineError| DeployError::Record {
        run: run_id.clone(),
        source,
    };
    let check = |reason: String| DeployError::CheckRequest {
        run: run_id.clone(),
        reason,
    };
    let kube_err = |source| DeployError::Kube {
        run: run_id.clone(),
        source,
    };
    let step::Subject { app, run, image } =
        step::subject(deps, request).await.map_err(|e| match e {
            step::SubjectError::Check(reason) => check(reason),
            step::SubjectError::Read(source) => record(source),
        })?;
    let digest = image.digest.clone();
    if !step::waiting_for(&run, RunStatus::Verifying, steps::VERIFY, request.attempt) {
        return verify_redelivered(deps, &run, request.attempt, &image, &digest).await;
    }
    let (Some(verify_step), Some(deploy_step)) =
        (run.steps.get(steps::VERIFY), run.steps.get(steps::DEPLOY))
    else {
        return Err(check("the run has no deploy or verify step".into()));
    };
    let n = checks(verify_step);
    if let Some(got) = message_id.and_then(check_number)
        && got != n
    {
        return Ok(Done(format!(
            "run {run_id}: rollout check {got} is stale (waiting for check {n}); nothing to do"
        )));
    }
    let Some(hash) = deploy_step
        .details
        .get("manifest_hash")
        .and_then(serde_json::Value::as_str)
        .map(str::to_string)
    else {
        return Err(check("the deploy step recorded no manifest hash".into()));
    };
    let generation = deploy_step
        .details
        .get("generation")
        .and_then(serde_json::Value::as_i64);
    // A newer run applied its own manifests meanwhile (deploys of one app
    // are ordered, checks are not): the cluster now shows its rollout, which
    // its own checks judge. This run neither records nor rolls back anything.
    if let Some(newer) = newer_run(deps, &run, |r| r.steps.contains_key(steps::VERIFY))
        .await
        .map_err(record)?
    {
        supersede(deps, &run, &newer, RunStatus::Verifying, steps::VERIFY)
            .await
            .map_err(record)?;
        return Ok(Done(format!(
            "run {run_id}: superseded while verifying by newer run {newer}"
        )));
    }
    let now = OffsetDateTime::now_utc();
    let deadline = verify_step.started_at.unwrap_or(now) + deps.config.deploy.verify_deadline;

    let cluster = gantry_context::cluster(deps).await.map_err(kube_err)?;
    let verdict = match cluster
        .rollout(app.namespace().as_str(), app.name.as_str(), generation)
        .await
    {
        Ok(v) => v,
        Err(e) if e.is_transient() => return Err(kube_err(e)),
        // The Deployment is gone or unreadable for good: it will not roll out.
        Err(e) => Rollout::Failed {
            reason: e.to_string(),
        },
    };
    match verdict {
        Rollout::Complete => {
            let previous = record_deployed(deps, &run, &digest, &hash)
                .await
                .map_err(record)?;
            let summary = format!("rollout complete (check {n})");
            deps.runs
                .update(&run.app, &run.id, |r| {
                    if r.status != RunStatus::Verifying {
                        return Ok(false);
                    }
                    let Some(s) = r.steps.get_mut(steps::VERIFY) else {
                        return Ok(false);
                    };
                    s.finish(StepStatus::Passed, now, summary.clone());
                    r.status = RunStatus::Deployed;
                    Ok(true)
                })
                .await
                .map_err(record)?;
            step::audit(
                deps,
                NAME,
                &run,
                "run.deployed",
                serde_json::json!({"manifest_hash": hash, "previous": previous}),
            )
            .await;
            deployed_alert(deps, &run, &image, &digest).await?;
            Ok(Done(format!("run {run_id}: deployed: {summary}")))
        }
        Rollout::Progressing { reason } if now < deadline => {
            let at = now + deps.config.deploy.verify_interval;
            // Sent before it is recorded: a crash in between repeats the same
            // MessageId, which the broker drops.
            send_verify(deps, &run, &digest, request.attempt, n + 1, at).await?;
            deps.runs
                .update(&run.app, &run.id, |r| {
                    let Some(s) = r.steps.get_mut(steps::VERIFY) else {
                        return Ok(false);
                    };
                    if r.status != RunStatus::Verifying || checks(s) != n {
                        return Ok(false);
                    }
                    s.status = StepStatus::Running;
                    s.summary = Some(reason.clone());
                    s.details = serde_json::json!({"checks": n + 1});
                    Ok(true)
                })
                .await
                .map_err(record)?;
            Ok(Done(format!(
                "run {run_id}: rollout progressing ({reason}); check {} at {}",
                n + 1,
                step::rfc3339(at)
            )))
        }
        Rollout::Progressing { reason } => {
            let reason = format!(
                "the rollout did not complete within {}s: {reason}",
                deps.config.deploy.verify_deadline.as_secs()
            );
            roll_back(deps, &cluster, &run, app, &digest, &reason).await
        }
        Rollout::Failed { reason } => roll_back(deps, &cluster, &run, app, &digest, &reason).await,
    }
}

/// A verify message for a run that no longer waits for it: repeat the alert
/// of the recorded outcome (its MessageId drops a duplicate).
async fn verify_redelivered(
    deps: &Deps,
    run: &Run,
    attempt: u32,
    image: &gantry_pipeline::Image,
    digest: &gantry_pipeline::Digest,
) -> Result<Done, DeployError> {
    let Some(v) = run
        .steps
        .get(steps::VERIFY)
        .filter(|v| v.attempts == attempt)
    else {
        return Ok(Done(format!(
            "run {}: not verifying attempt {attempt}; nothing to do",
            run.id
        )));
    };
    match (run.status, v.status) {
        (RunStatus::Deployed, StepStatus::Passed) => {
            deployed_alert(deps, run, image, digest).await?;
            Ok(Done(format!(
                "run {}: verify already passed; alert repeated",
                run.id
            )))
        }
        (RunStatus::RolledBack, StepStatus::Failed) => {
            rolled_back_alert(deps, run, digest, v.summary.as_deref().unwrap_or("")).await?;
            Ok(Done(format!(
                "run {}: already rolled back; alert repeated",
                run.id
            )))
        }
        _ => {
            let what =
                step::repeat_after_redelivery(deps, run, steps::VERIFY, attempt, digest, None)
                    .await?;
            Ok(Done(format!(
                "run {}: {}",
                run.id,
                what.unwrap_or_else(|| format!("run is {}; nothing to do", run.status))
            )))
        }
    }
}

async fn rolled_back_alert(
    deps: &Deps,
    run: &Run,
    digest: &gantry_pipeline::Digest,
    reason: &str,
) -> Result<(), StepError> {
    step::alert(
        deps,
        run,
        steps::VERIFY,
        "rolled-back",
        "rolled-back",
        Severity::High,
        Some(digest),
        format!(
            "{}: rollout of {digest} failed and was rolled back: {reason}",
            run.app
        ),
    )
    .await
}

/// The failed rollout of `digest`: block the digest, then apply the previous
/// good version again (`rolled-back`), or, without one that renders to its
/// recorded manifest hash, leave the cluster as it is (`failed`).
async fn roll_back(
    deps: &Deps,
    cluster: &Cluster,
    run: &Run,
    app: &gantry_pipeline::AppConfig,
    digest: &gantry_pipeline::Digest,
    reason: &str,
) -> Result<Done, DeployError> {
    let run_id = run.id.to_string();
    let record = |source: PipelineError| DeployError::Record {
        run: run_id.clone(),
        source,
    };
    // Blocked first, so it never deploys again automatically even if what
    // follows is interrupted.
    let now = OffsetDateTime::now_utc();
    // record_block also re-blocks a digest whose earlier block an operator
    // lifted with a retrigger.
    step::record_block(
        deps,
        &run.app,
        digest,
        &serde_json::json!({
            "digest": digest, "run_id": run.id, "step": steps::VERIFY, "reason": reason,
            "at": step::rfc3339(now),
        }),
    )
    .await
    .map_err(record)?;
    let deployed_name = blobs::deployed(&run.app);
    let deployed = match deps
        .runs
        .raw()
        .get(&deployed_name)
        .await
        .map_err(|e| record(e.into()))?
    {
        Some(v) => decode_deployed(&deployed_name, &v.body).map_err(record)?,
        None => Deployed::default(),
    };
    let fail = |why: String| async move {
        let reason = format!("{reason}; {why}");
        step::fail(deps, NAME, run, steps::VERIFY, &reason).await?;
        Ok::<_, DeployError>(Done(format!("run {}: failed: {reason}", run.id)))
    };
    if run.rollback.is_some() {
        // Re-applying what it rolled back from would undo an operator's (or a
        // security alert's) decision: leave the cluster for a person to judge.
        return fail("a rollback is not rolled back automatically; left as it is".into()).await;
    }
    let Some(target) = rollback_target(&deployed, digest) else {
        return fail("no previous good version to roll back to; left as it is".into()).await;
    };
    let rendered = match previous_manifests(deps, app, &target)
        .await
        .map_err(record)?
    {
        Ok(r) => r,
        Err(why) => return fail(format!("not rolled back: {why}")).await,
    };
    let applied = match cluster.apply(&rendered.objects).await {
        Ok(a) => a,
        Err(e) if e.is_transient() => {
            return Err(DeployError::Kube {
                run: run.id.to_string(),
                source: e,
            });
        }
        Err(e) => {
            return fail(format!("rolling back to {} failed: {e}", target.digest)).await;
        }
    };
    // The earlier version may not have rendered what the failed one did (an
    // Ingress added since): what runs after the rollback is what it renders.
    let removed = match remove_stale(cluster, app, &rendered).await {
        Ok(r) => r,
        Err(e) if e.is_transient() => {
            return Err(DeployError::Kube {
                run: run.id.to_string(),
                source: e,
            });
        }
        Err(e) => {
            return fail(format!(
                "rolled back to {} but removing objects it does not render failed: {e}",
                target.digest
            ))
            .await;
        }
    };
    let summary = format!(
        "{reason}; rolled back to {} (run {}){}",
        target.digest,
        target.run_id,
        removed_summary(&removed)
    );
    let details = serde_json::json!({
        "rolled_back_to": target,
        "applied": applied.objects.len(),
        "removed": kind_names(&removed),
        "blocked": digest,
    });
    deps.runs
        .update(&run.app, &run.id, |r| {
            if r.status != RunStatus::Verifying {
                return Ok(false);
            }
            let Some(s) = r.steps.get_mut(steps::VERIFY) else {
                return Ok(false);
            };
            s.finish(StepStatus::Failed, now, summary.clone());
            s.details = details.clone();
            r.status = RunStatus::RolledBack;
            Ok(true)
        })
        .await
        .map_err(record)?;
    step::audit(deps, NAME, run, "run.rolled-back", details).await;
    rolled_back_alert(deps, run, digest, &summary).await?;
    Ok(Done(format!("run {run_id}: rolled back: {summary}")))
}

/// The previous good version's manifests, rendered again with the current
/// configuration from its run record; `Err(why)` when they cannot be, or no
/// longer hash to what was deployed (the configuration changed since: applying
/// them would deploy manifests no policy gate has seen).
async fn previous_manifests(
    deps: &Deps,
    app: &gantry_pipeline::AppConfig,
    target: &DeployedVersion,
) -> Result<Result<gantry_manifests::Rendered, String>, PipelineError> {
    let Some(previous) = deps.runs.get(&app.name, &target.run_id).await? else {
        return Ok(Err(format!(
            "the run {} of the previous version is gone",
            target.run_id
        )));
    };
    if previous.image.as_ref().map(|i| &i.digest) != Some(&target.digest) {
        return Ok(Err(format!(
            "the run {} does not hold the digest {}",
            target.run_id, target.digest
        )));
    }
    let source = match gantry_context::rendering_source(deps, &previous).await? {
        Ok(source) => source,
        Err(why) => return Ok(Err(why)),
    };
    let rendered = match gantry_manifests::render_run(app, &source) {
        Ok(r) => r,
        Err(e) => return Ok(Err(format!("rendering the previous version: {e}"))),
    };
    if rendered.hash != target.manifest_hash {
        return Ok(Err(format!(
            "the previous version's manifests render to hash {} now, {} was deployed (configuration changed)",
            short(&rendered.hash),
            short(&target.manifest_hash)
        )));
    }
    Ok(Ok(rendered))
}
