//! GitHub webhook payloads gantry handles: `push`, `ping`, `workflow_run`.
//! Field names follow GitHub's webhook documentation.

use serde::{Deserialize, Serialize};

use crate::{EventError, decode};

/// `repository` object (only what gantry uses).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Repository {
    /// `owner/name`.
    pub full_name: String,
}

/// `pusher` of a push event (a git author, not necessarily a GitHub user).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pusher {
    /// Name as given by git.
    pub name: String,
    /// E-mail, if public.
    #[serde(default)]
    pub email: Option<String>,
}

/// The GitHub user who triggered the event.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct User {
    /// GitHub login.
    pub login: String,
}

/// `head_commit` of a push event.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Commit {
    /// Full sha.
    pub id: String,
    /// Commit message.
    #[serde(default)]
    pub message: String,
}

/// A `push` event.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PushEvent {
    /// Full ref, `refs/heads/main` or `refs/tags/v1`.
    #[serde(rename = "ref")]
    pub git_ref: String,
    /// Sha before the push (all zeros when the ref was created).
    pub before: String,
    /// Sha after the push (all zeros when the ref was deleted).
    pub after: String,
    /// Whether the push created the ref.
    #[serde(default)]
    pub created: bool,
    /// Whether the push deleted the ref.
    #[serde(default)]
    pub deleted: bool,
    /// Whether it was a force push.
    #[serde(default)]
    pub forced: bool,
    /// The repository pushed to.
    pub repository: Repository,
    /// Who pushed.
    pub pusher: Pusher,
    /// The GitHub user who sent it.
    #[serde(default)]
    pub sender: Option<User>,
    /// The newest commit, absent on deletes.
    #[serde(default)]
    pub head_commit: Option<Commit>,
}

/// A `ping` event, sent when a webhook is created.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PingEvent {
    /// GitHub zen.
    #[serde(default)]
    pub zen: String,
    /// The hook's id.
    #[serde(default)]
    pub hook_id: Option<u64>,
}

/// The `workflow_run` object.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkflowRun {
    /// Workflow run name.
    #[serde(default)]
    pub name: Option<String>,
    /// The commit the workflow ran on.
    pub head_sha: String,
    /// The branch it ran on.
    #[serde(default)]
    pub head_branch: Option<String>,
    /// What triggered it (`push`, `pull_request`, `schedule`, ...).
    #[serde(default)]
    pub event: Option<String>,
    /// `queued`, `in_progress`, `completed`, ...
    pub status: String,
    /// `success`, `failure`, `cancelled`, `timed_out`, ... once completed.
    #[serde(default)]
    pub conclusion: Option<String>,
    /// Link to the run on GitHub.
    #[serde(default)]
    pub html_url: Option<String>,
}

/// A `workflow_run` event.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkflowRunEvent {
    /// `requested`, `in_progress`, `completed`.
    pub action: String,
    /// The workflow run.
    pub workflow_run: WorkflowRun,
    /// Its repository.
    pub repository: Repository,
}

impl WorkflowRunEvent {
    /// A completed run whose conclusion means the build did not produce a good image.
    pub fn failed(&self) -> bool {
        self.action == "completed"
            && matches!(
                self.workflow_run.conclusion.as_deref(),
                Some("failure" | "timed_out" | "startup_failure")
            )
    }
}

/// A webhook event, by `X-GitHub-Event`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GithubEvent {
    /// `push`
    Push(Box<PushEvent>),
    /// `ping`
    Ping(PingEvent),
    /// `workflow_run`
    WorkflowRun(Box<WorkflowRunEvent>),
    /// Any other event type: acknowledged and ignored.
    Other(String),
}

impl GithubEvent {
    /// Decodes a payload given its `X-GitHub-Event` header.
    pub fn decode(event: &str, body: &[u8]) -> Result<GithubEvent, EventError> {
        Ok(match event {
            "push" => GithubEvent::Push(Box::new(decode("push event", body)?)),
            "ping" => GithubEvent::Ping(decode("ping event", body)?),
            "workflow_run" => {
                GithubEvent::WorkflowRun(Box::new(decode("workflow_run event", body)?))
            }
            other => {
                // Still require JSON, so garbage is a 400 whatever the header says.
                decode::<serde::de::IgnoredAny>("webhook payload", body)?;
                GithubEvent::Other(other.to_string())
            }
        })
    }
}

/// The all-zero sha GitHub uses for "no commit" (ref created or deleted).
pub const NULL_SHA: &str = "0000000000000000000000000000000000000000";
