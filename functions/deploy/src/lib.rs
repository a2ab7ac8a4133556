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

use std::path::{Path, PathBuf};
use std::sync::Arc;

use gantry_pipeline::messages::{Deployed, DeployedVersion};
use gantry_pipeline::run::steps;
use gantry_pipeline::runs::blobs;
use gantry_pipeline::{PipelineError, Run, RunStatus, Severity, Step, StepRequest, StepStatus};
use gantry_runtime::steps::{self as step, StepError};
use gantry_runtime::{Deps, Done, FromMessage, Function, FunctionError, Invocation};
use time::OffsetDateTime;

/// Function name: folder, route and span.
pub const NAME: &str = "deploy";

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
            DeployError::Step(e) => e.is_transient(),
        }
    }
}

/// Handles one `deploy` message (lambda style).
pub async fn handle(inv: Invocation<DeployMessage>, deps: &Deps) -> Result<Done, DeployError> {
    let request = inv.event.0;
    let run_id = request.run_id.to_string();
    let record = |source: PipelineError| DeployError::Record {
        run: run_id.clone(),
        source,
    };
    let check = |reason: String| DeployError::CheckRequest {
        run: run_id.clone(),
        reason,
    };
    let Some(app) = deps.config.app(request.app.as_str()) else {
        return Err(check(format!("app {} is not configured", request.app)));
    };
    let Some(run) = deps
        .runs
        .get(&request.app, &request.run_id)
        .await
        .map_err(record)?
    else {
        return Err(check("no such run".into()));
    };
    let Some(image) = run.image.clone() else {
        return Err(check("the run has no image".into()));
    };
    let digest = image.digest.clone();
    if digest != request.digest {
        return Err(check(format!(
            "message digest {} is not the run's {digest}",
            request.digest
        )));
    }
    if !step::waiting_for(&run, RunStatus::Deploying, steps::DEPLOY, request.attempt) {
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
    let mut newer = None;
    for (_, id) in deps
        .runs
        .list_ids(Some(&app.name))
        .await
        .map_err(record)?
        .into_iter()
        .rev()
    {
        if id <= run.id {
            break;
        }
        let status = deps
            .runs
            .get(&app.name, &id)
            .await
            .map_err(record)?
            .map(|r| r.status);
        if status.is_some_and(|s| s != RunStatus::Superseded) {
            newer = Some(id);
            break;
        }
    }
    if let Some(newer) = newer {
        supersede(deps, &run, &newer).await.map_err(record)?;
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
    let rendered = match gantry_manifests::render(&gantry_manifests::RenderInput {
        app,
        digest: &digest,
        registry_image: &format!("{}/{}", image.registry, image.repository),
        run_id: Some(&run.id),
        commit: run.source.commit.as_ref(),
        verdicts: run
            .steps
            .get(steps::SCAN)
            .and_then(|s| s.summary.as_deref()),
    }) {
        Ok(r) => r,
        Err(e) => {
            let reason = format!("rendering manifests: {e}");
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

    let dir = deps.config.resolve(
        deps.config
            .deploy
            .dir
            .as_deref()
            .unwrap_or(Path::new("deploy")),
    );
    let target = dir.join(app.name.as_str());
    // An unreadable deployed.json (the rollback target) is never overwritten,
    // so it must stop the deploy before the manifests are handed off too.
    let deployed_name = blobs::deployed(&app.name);
    if let Some(v) = deps
        .runs
        .raw()
        .get(&deployed_name)
        .await
        .map_err(|e| record(e.into()))?
    {
        decode_deployed(&deployed_name, &v.body).map_err(record)?;
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
    let name = blobs::deployed(&run.app);
    let store = deps.runs.raw();
    let this = DeployedVersion {
        digest: digest.clone(),
        run_id: run.id.clone(),
        manifest_hash: hash.to_string(),
    };
    for _ in 0..16 {
        let current = store.get(&name).await?;
        let mut deployed = match &current {
            Some(v) => decode_deployed(&name, &v.body)?,
            None => Deployed::default(),
        };
        if deployed
            .current
            .as_ref()
            .is_some_and(|c| c.run_id == run.id)
        {
            return Ok(deployed.previous); // a redelivery: already recorded
        }
        if let Some(former) = deployed.current.take()
            && former.digest != *digest
        {
            deployed.previous = Some(former);
        }
        deployed.current = Some(this.clone());
        let body = serde_json::to_vec_pretty(&deployed).map_err(|e| PipelineError::Decode {
            name: name.clone(),
            message: e.to_string(),
        })?;
        let result = match &current {
            Some(v) => store.replace(&name, &body, &v.etag).await,
            None => store.create(&name, &body).await,
        };
        match result {
            Ok(_) => return Ok(deployed.previous),
            Err(gantry_store::StoreError::Conflict { .. }) => continue,
            Err(e) => return Err(e.into()),
        }
    }
    Err(PipelineError::Contention { name, attempts: 16 })
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
            s.status = StepStatus::Passed;
            s.finished_at = Some(now);
            s.summary = Some(summary.to_string());
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

async fn supersede(
    deps: &Deps,
    run: &Run,
    newer: &gantry_pipeline::RunId,
) -> Result<(), PipelineError> {
    let now = OffsetDateTime::now_utc();
    let summary = format!("superseded by newer run {newer}");
    deps.runs
        .update(&run.app, &run.id, |r| {
            if r.status != RunStatus::Deploying {
                return Ok(false);
            }
            if let Some(s) = r.steps.get_mut(steps::DEPLOY) {
                s.status = StepStatus::Skipped;
                s.finished_at = Some(now);
                s.summary = Some(summary.clone());
            }
            r.status = RunStatus::Superseded;
            Ok(true)
        })
        .await?;
    step::audit(
        deps,
        NAME,
        run,
        "run.superseded",
        serde_json::json!({"by": newer}),
    )
    .await;
    Ok(())
}
