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

/// Records the two gates of `run` as passed, the way policy-enforce leaves
/// a run it lets through: `scan` with `scan_summary`, and `policy` with no
/// violations and the `manifest_hash` of the manifests it checked (which
/// deploy compares with what it renders).
pub fn gates_passed(run: &mut Run, scan_summary: &str, manifest_hash: &str) {
    passed(run, "scan", scan_summary, serde_json::Value::Null);
    let details = serde_json::json!({"manifest_hash": manifest_hash, "violations": []});
    passed(run, "policy", "no violations", details);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_github_run_gets_the_example_commit_and_a_tagged_image() -> anyhow::Result<()> {
        let run = with_image(run("api", RunStatus::Deploying)?, DIGEST)?;
        assert_eq!(run.app.as_str(), "api");
        assert_eq!(run.status, RunStatus::Deploying);
        assert_eq!(run.source.kind, SourceKind::Github);
        assert_eq!(run.source.repo.as_deref(), Some("contoso/api"));
        assert_eq!(run.source.commit.as_ref().map(|c| c.as_str()), Some(SHA));
        assert_eq!(run.source.git_ref.as_deref(), Some(GIT_REF));
        let image = run
            .image
            .as_ref()
            .ok_or_else(|| anyhow::anyhow!("no image"))?;
        assert_eq!(
            image.reference(),
            format!("contoso.azurecr.io/api@{DIGEST}")
        );
        assert_eq!(image.tag.as_deref(), Some(SHA));
        assert!(run.steps.is_empty());
        Ok(())
    }

    #[test]
    fn a_registry_run_has_no_commit_and_an_untagged_image() -> anyhow::Result<()> {
        let at = OffsetDateTime::now_utc() - time::Duration::minutes(5);
        let run = with_image(
            run_at("web", RunStatus::Scanning, registry_source(), at)?,
            DIGEST,
        )?;
        assert_eq!(run.source.kind, SourceKind::Registry);
        assert_eq!(run.source.commit, None);
        assert_eq!(run.created_at, at);
        assert_eq!(run.image.and_then(|i| i.tag), None);
        Ok(())
    }

    #[test]
    fn each_run_gets_a_new_id_in_creation_order() -> anyhow::Result<()> {
        let first = run("web", RunStatus::Scanning)?;
        let second = run("web", RunStatus::Scanning)?;
        assert!(first.id.as_str() < second.id.as_str());
        Ok(())
    }

    #[test]
    fn passed_gates_finish_when_the_run_was_created() -> anyhow::Result<()> {
        let mut run = run("web", RunStatus::Deploying)?;
        gates_passed(&mut run, "0 findings", "abc");
        let scan = &run.steps["scan"];
        assert_eq!(scan.status, StepStatus::Passed);
        assert_eq!(scan.finished_at, Some(run.created_at));
        assert_eq!(scan.summary.as_deref(), Some("0 findings"));
        assert!(scan.details.is_null());
        let policy = &run.steps["policy"];
        assert_eq!(policy.attempts, 1);
        assert_eq!(policy.details["manifest_hash"], "abc");
        assert_eq!(policy.details["violations"], serde_json::json!([]));
        Ok(())
    }

    #[test]
    fn bad_names_are_errors_not_panics() {
        assert!(run("Not An App", RunStatus::Scanning).is_err());
        assert!(github_source("web", "not-a-sha").is_err());
        assert!(image("web", "sha256:short", None).is_err());
    }
}
