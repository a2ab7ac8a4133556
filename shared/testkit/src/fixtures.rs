//! Example runs for tests: the pipeline records that many tests store
//! before they call a function, built the same way everywhere.
//!
//! The values are the ones the tests and docs use throughout (the `web`
//! app of `contoso/web`, image in `contoso.azurecr.io`, [`SHA`] and
//! [`DIGEST`]). Everything a test is *about* (the app, status, digest,
//! step summaries and details) stays an argument, so the call site still
//! says what the test sets up.
//!
//! ```
//! use gantry_pipeline::RunStatus;
//! use gantry_testkit::fixtures::{self, DIGEST};
//!
//! # fn main() -> anyhow::Result<()> {
//! let mut run = fixtures::with_image(fixtures::run("web", RunStatus::Deploying)?, DIGEST)?;
//! fixtures::passed(&mut run, "scan", "passed: no findings", serde_json::Value::Null);
//! assert_eq!(run.image.unwrap().reference(), format!("contoso.azurecr.io/web@{DIGEST}"));
//! # Ok(())
//! # }
//! ```

use gantry_pipeline::run::{Image, Run, RunStatus, Source, SourceKind, Step, StepStatus};
use gantry_pipeline::{AppName, CommitSha, Digest, RunId};
use time::OffsetDateTime;

/// The example commit: what `contoso/web`'s pushes carry and images are
/// tagged with.
pub const SHA: &str = "3f786850e387550fdab836ed7e6dc881de23001b";

/// The example image digest.
pub const DIGEST: &str = "sha256:b5b2b2c507a0944348e0303114d8d93aaaa081732b86451d9bce1f432a537bc7";

/// The example registry host the images are pushed to.
pub const REGISTRY: &str = "contoso.azurecr.io";

/// The ref the example pushes go to.
pub const GIT_REF: &str = "refs/heads/main";

/// A new run id for a run created at `at`.
///
/// Millisecond precision: ids of runs a test creates one after another sort
/// in creation order (the id generator keeps them monotonic within a
/// millisecond too).
pub fn run_id(at: OffsetDateTime) -> anyhow::Result<RunId> {
    let ms = u64::try_from(at.unix_timestamp_nanos() / 1_000_000)?;
    Ok(gantry_pipeline::ids::new_run_id(ms))
}

/// The source of a GitHub push of `sha` to `refs/heads/main` of
/// `contoso/{app}`, with no pusher, delivery or message.
pub fn github_source(app: &str, sha: &str) -> anyhow::Result<Source> {
    Ok(Source {
        kind: SourceKind::Github,
        repo: Some(format!("contoso/{app}")),
        commit: Some(CommitSha::parse(sha)?),
        git_ref: Some(GIT_REF.into()),
        pusher: None,
        delivery: None,
        message: None,
    })
}

/// The source of an image pushed to the registry with no matching GitHub
/// push: nothing is known about the commit.
pub fn registry_source() -> Source {
    Source {
        kind: SourceKind::Registry,
        repo: None,
        commit: None,
        git_ref: None,
        pusher: None,
        delivery: None,
        message: None,
    }
}

/// A fresh run of `app` in `status` (new id, created now) from a GitHub push
/// of [`SHA`] ([`github_source`]); no image, no steps.
pub fn run(app: &str, status: RunStatus) -> anyhow::Result<Run> {
    run_at(
        app,
        status,
        github_source(app, SHA)?,
        OffsetDateTime::now_utc(),
    )
}

/// A fresh run of `app` in `status` from `source`, created at `at` (with an
/// id for that instant); no image, no steps.
pub fn run_at(
    app: &str,
    status: RunStatus,
    source: Source,
    at: OffsetDateTime,
) -> anyhow::Result<Run> {
    Ok(Run::new(
        run_id(at)?,
        AppName::parse(app)?,
        status,
        source,
        at,
    ))
}

/// The image `contoso.azurecr.io/{repository}@{digest}`, tagged `tag`.
pub fn image(repository: &str, digest: &str, tag: Option<&str>) -> anyhow::Result<Image> {
    Ok(Image {
        registry: REGISTRY.into(),
        repository: repository.into(),
        tag: tag.map(str::to_string),
        digest: Digest::parse(digest)?,
    })
}

/// `run` delivering `contoso.azurecr.io/{app}@{digest}`, tagged with the
/// commit of its source as CI tags its images (no tag for a registry push).
pub fn with_image(mut run: Run, digest: &str) -> anyhow::Result<Run> {
    let tag = run.source.commit.as_ref().map(ToString::to_string);
    run.image = Some(image(run.app.as_str(), digest, tag.as_deref())?);
    Ok(run)
}

/// Records `step` of `run` as passed with `summary` and `details` (use
/// `Value::Null` for none), started and finished when the run was created:
/// a gate the run has already been through.
pub fn passed(run: &mut Run, step: &str, summary: &str, details: serde_json::Value) {
    run.steps.insert(
        step.into(),
        Step {
            details,
            ..Step::finished(StepStatus::Passed, run.created_at, summary)
        },
    );
}
