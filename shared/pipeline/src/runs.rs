//! The typed run store: runs, their indexes, event claims and the audit trail,
//! on top of any [`StateStore`].
//!
//! Every read-modify-write is a compare-and-swap loop on the blob's ETag, so
//! concurrent function instances (and redelivered messages) can never lose an
//! update: the loser re-reads, re-applies its change to the fresh record and
//! tries again.

use std::sync::Arc;
use std::time::Duration;

use gantry_store::{StateStore, StoreError};
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use crate::error::PipelineError;
use crate::names::{AppName, CommitSha, Digest, RunId};
use crate::run::{Run, RunStatus};

/// Blob names of DESIGN.md §4, built only from validated names.
pub mod blobs {
    use super::*;

    /// `runs/{app}/{run_id}.json`
    pub fn run(app: &AppName, id: &RunId) -> String {
        format!("runs/{app}/{id}.json")
    }
    /// `runs/{app}/`, or `runs/` for every app.
    pub fn runs_prefix(app: Option<&AppName>) -> String {
        match app {
            Some(app) => format!("runs/{app}/"),
            None => "runs/".to_string(),
        }
    }
    /// `index/commits/{app}/{sha}`
    pub fn commit_index(app: &AppName, sha: &CommitSha) -> String {
        format!("index/commits/{app}/{sha}")
    }
    /// `index/digests/{app}/{digest}`
    pub fn digest_index(app: &AppName, digest: &Digest) -> String {
        format!("index/digests/{app}/{digest}")
    }
    /// `index/runs/{run_id}`: the app of a run, so a run can be found by id alone.
    pub fn run_index(id: &RunId) -> String {
        format!("index/runs/{id}")
    }
    /// `apps/{app}/deployed.json`
    pub fn deployed(app: &AppName) -> String {
        format!("apps/{app}/deployed.json")
    }
    /// `apps/{app}/blocked/{digest}`
    pub fn blocked(app: &AppName, digest: &Digest) -> String {
        format!("apps/{app}/blocked/{digest}")
    }
    /// `apps/{app}/security/{key}.json`: a Defender alert about the app
    /// (`key` from `security_key`, never raw outside text).
    pub fn security(app: &AppName, key: &str) -> String {
        format!("apps/{app}/security/{key}.json")
    }
    /// `security/unmatched/{key}.json`: a Defender alert that names no app.
    pub fn security_unmatched(key: &str) -> String {
        format!("security/unmatched/{key}.json")
    }
    /// `audit/{yyyy-mm-dd}.jsonl`
    pub fn audit(at: OffsetDateTime) -> String {
        let d = at.date();
        format!(
            "audit/{:04}-{:02}-{:02}.jsonl",
            d.year(),
            u8::from(d.month()),
            d.day()
        )
    }
}

/// Sources of event claims (`dedup/{source}/{key}`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClaimSource {
    /// `X-GitHub-Delivery` of a webhook.
    Github,
    /// An Event Grid / CloudEvents id from the registry.
    Registry,
}

impl ClaimSource {
    fn as_str(self) -> &'static str {
        match self {
            ClaimSource::Github => "github",
            ClaimSource::Registry => "registry",
        }
    }
}

/// One line of the audit trail.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AuditEntry {
    /// When.
    #[serde(with = "time::serde::rfc3339")]
    pub at: OffsetDateTime,
    /// Who: a function name (`github-webhook`) or an operator principal.
    pub actor: String,
    /// What happened (`run.created`, `run.image-recorded`, ...).
    pub action: String,
    /// The app concerned.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub app: Option<AppName>,
    /// The run concerned.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub run: Option<RunId>,
    /// Anything else worth keeping.
    #[serde(default, skip_serializing_if = "serde_json::Value::is_null")]
    pub detail: serde_json::Value,
}

/// How many compare-and-swap rounds an update tries before reporting contention.
const MAX_CAS_ATTEMPTS: u32 = 16;

/// How long a writer that lost compare-and-swap round `attempt` waits:
/// 1 ms plus a random share of a cap that doubles from 2 ms up to 100 ms ("full
/// jitter"). Writers that lost the same race then retry at different moments
/// instead of re-reading together and colliding again in lockstep, as a fixed
/// delay makes them do. Contention on one run is measured in the `contention`
/// section of `cargo bench --bench report`.
fn cas_backoff(attempt: u32) -> Duration {
    use std::hash::{BuildHasher as _, Hasher as _};
    let cap_micros = (2_000u64 << attempt.min(6)).min(100_000);
    // `RandomState` is randomly keyed per instance: a cheap random number
    // without another dependency.
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u32(attempt);
    Duration::from_micros(1_000 + hasher.finish() % cap_micros)
}

/// Typed access to runs and their indexes.
#[derive(Clone)]
pub struct RunStore {
    store: Arc<dyn StateStore>,
}

impl RunStore {
    /// Wraps a raw store.
    pub fn new(store: Arc<dyn StateStore>) -> RunStore {
        RunStore { store }
    }

    /// The raw store underneath.
    pub fn raw(&self) -> &Arc<dyn StateStore> {
        &self.store
    }

    async fn read_json<T: for<'de> Deserialize<'de>>(
        &self,
        name: &str,
    ) -> Result<Option<(T, gantry_store::Etag)>, PipelineError> {
        let Some(v) = self.store.get(name).await? else {
            return Ok(None);
        };
        let value = serde_json::from_slice(&v.body).map_err(|e| PipelineError::Decode {
            name: name.to_string(),
            message: e.to_string(),
        })?;
        Ok(Some((value, v.etag)))
    }

    /// Reads a run.
    pub async fn get(&self, app: &AppName, id: &RunId) -> Result<Option<Run>, PipelineError> {
        Ok(self.read_json(&blobs::run(app, id)).await?.map(|(r, _)| r))
    }

    /// Finds a run by id alone (through `index/runs/{id}`).
    pub async fn find(&self, id: &RunId) -> Result<Option<Run>, PipelineError> {
        let Some(v) = self.store.get(&blobs::run_index(id)).await? else {
            return Ok(None);
        };
        let app = AppName::parse(String::from_utf8_lossy(&v.body).trim())?;
        self.get(&app, id).await
    }

    /// Creates a run (and its id index). Creating the same run twice is a no-op,
    /// so a redelivered event that re-creates "its" run changes nothing.
    /// Returns `true` only for the call that stored the record (the one that
    /// should audit the creation).
    pub async fn create(&self, run: &Run) -> Result<bool, PipelineError> {
        let body = serde_json::to_vec_pretty(run).map_err(|e| PipelineError::Decode {
            name: blobs::run(&run.app, &run.id),
            message: e.to_string(),
        })?;
        // Index first: a run blob is never visible without its id index.
        ignore_conflict(
            self.store
                .create(&blobs::run_index(&run.id), run.app.as_str().as_bytes())
                .await,
        )?;
        match self
            .store
            .create(&blobs::run(&run.app, &run.id), &body)
            .await
        {
            Ok(_) => Ok(true),
            Err(StoreError::Conflict { .. }) => Ok(false),
            Err(e) => Err(e.into()),
        }
    }

    /// Applies `change` to a run with compare-and-swap, retrying on lost races.
    ///
    /// `change` returns `Ok(true)` when it modified the run (then `updated_at` is
    /// set and the run written), `Ok(false)` to leave it as is. It may be called
    /// several times, each time on a freshly read run, so it must not have side
    /// effects. Returns the run as stored afterwards.
    pub async fn update<F>(
        &self,
        app: &AppName,
        id: &RunId,
        mut change: F,
    ) -> Result<Run, PipelineError>
    where
        F: FnMut(&mut Run) -> Result<bool, PipelineError> + Send,
    {
        let name = blobs::run(app, id);
        for attempt in 0..MAX_CAS_ATTEMPTS {
            let Some((mut run, etag)) = self.read_json::<Run>(&name).await? else {
                return Err(PipelineError::UpdateRefused {
                    run: id.to_string(),
                    reason: "the run does not exist".into(),
                });
            };
            if !change(&mut run)? {
                return Ok(run);
            }
            run.updated_at = OffsetDateTime::now_utc();
            let body = serde_json::to_vec_pretty(&run).map_err(|e| PipelineError::Decode {
                name: name.clone(),
                message: e.to_string(),
            })?;
            match self.store.replace(&name, &body, &etag).await {
                Ok(_) => return Ok(run),
                Err(StoreError::Conflict { .. }) => tokio::time::sleep(cas_backoff(attempt)).await,
                Err(e) => return Err(e.into()),
            }
        }
        Err(PipelineError::Contention {
            name,
            attempts: MAX_CAS_ATTEMPTS,
        })
    }

    /// Read-modify-write of a JSON blob other than a run (e.g.
    /// `apps/{app}/deployed.json`) with compare-and-swap; an absent blob starts
    /// from `T::default()` and is created. `change` returns whether it modified
    /// the value (no write otherwise) and may run several times. Returns the
    /// value as stored afterwards.
    pub async fn update_json<T, F>(&self, name: &str, mut change: F) -> Result<T, PipelineError>
    where
        T: Serialize + for<'de> Deserialize<'de> + Default,
        F: FnMut(&mut T) -> Result<bool, PipelineError> + Send,
    {
        for attempt in 0..MAX_CAS_ATTEMPTS {
            let current = self.read_json::<T>(name).await?;
            let (mut value, etag) = match current {
                Some((v, etag)) => (v, Some(etag)),
                None => (T::default(), None),
            };
            if !change(&mut value)? {
                return Ok(value);
            }
            let body = encode(name, &value)?;
            let result = match &etag {
                Some(etag) => self.store.replace(name, &body, etag).await,
                None => self.store.create(name, &body).await,
            };
            match result {
                Ok(_) => return Ok(value),
                Err(StoreError::Conflict { .. }) => tokio::time::sleep(cas_backoff(attempt)).await,
                Err(e) => return Err(e.into()),
            }
        }
        Err(PipelineError::Contention {
            name: name.to_string(),
            attempts: MAX_CAS_ATTEMPTS,
        })
    }

    /// Writes `value` to a blob whatever it held before (created when absent,
    /// else replaced; a lost race is retried). For records that are rewritten
    /// whole, such as `scans/{digest}.json`.
    pub async fn put_json<T: Serialize>(&self, name: &str, value: &T) -> Result<(), PipelineError> {
        let body = encode(name, value)?;
        for _ in 0..MAX_CAS_ATTEMPTS {
            let result = match self.store.get(name).await? {
                None => self.store.create(name, &body).await,
                Some(v) => self.store.replace(name, &body, &v.etag).await,
            };
            match result {
                Ok(_) => return Ok(()),
                Err(StoreError::Conflict { .. }) => continue,
                Err(e) => return Err(e.into()),
            }
        }
        Err(PipelineError::Contention {
            name: name.to_string(),
            attempts: MAX_CAS_ATTEMPTS,
        })
    }

    /// Points `index/commits/{app}/{sha}` at `run` unless it already points
    /// somewhere; returns the run id the index holds afterwards (the winner).
    pub async fn claim_commit(
        &self,
        app: &AppName,
        sha: &CommitSha,
        run: &RunId,
    ) -> Result<RunId, PipelineError> {
        self.claim_index(&blobs::commit_index(app, sha), run).await
    }

    /// Points `index/digests/{app}/{digest}` at `run` unless already set; returns the winner.
    pub async fn claim_digest(
        &self,
        app: &AppName,
        digest: &Digest,
        run: &RunId,
    ) -> Result<RunId, PipelineError> {
        self.claim_index(&blobs::digest_index(app, digest), run)
            .await
    }

    async fn claim_index(&self, name: &str, run: &RunId) -> Result<RunId, PipelineError> {
        match self.store.create(name, run.as_str().as_bytes()).await {
            Ok(_) => Ok(run.clone()),
            Err(StoreError::Conflict { .. }) => {
                self.read_index(name)
                    .await?
                    .ok_or_else(|| PipelineError::Contention {
                        name: name.to_string(),
                        attempts: 1,
                    })
            }
            Err(e) => Err(e.into()),
        }
    }

    async fn read_index(&self, name: &str) -> Result<Option<RunId>, PipelineError> {
        let Some(v) = self.store.get(name).await? else {
            return Ok(None);
        };
        Ok(Some(RunId::parse(String::from_utf8_lossy(&v.body).trim())?))
    }

    /// The run recorded for a commit of an app.
    pub async fn by_commit(
        &self,
        app: &AppName,
        sha: &CommitSha,
    ) -> Result<Option<RunId>, PipelineError> {
        self.read_index(&blobs::commit_index(app, sha)).await
    }

    /// The run recorded for a digest of an app.
    pub async fn by_digest(
        &self,
        app: &AppName,
        digest: &Digest,
    ) -> Result<Option<RunId>, PipelineError> {
        self.read_index(&blobs::digest_index(app, digest)).await
    }

    /// Commits of an app starting with `short` (an abbreviated sha), with their runs.
    pub async fn by_short_sha(
        &self,
        app: &AppName,
        short: &str,
    ) -> Result<Vec<(CommitSha, RunId)>, PipelineError> {
        if !crate::names::is_short_sha(short) {
            return Ok(Vec::new());
        }
        let prefix = format!("index/commits/{app}/{short}");
        let mut found = Vec::new();
        for name in self.list_all(&prefix).await? {
            let Some(sha) = name
                .rsplit('/')
                .next()
                .and_then(|s| CommitSha::parse(s).ok())
            else {
                continue;
            };
            if let Some(run) = self.read_index(&name).await? {
                found.push((sha, run));
            }
        }
        Ok(found)
    }

    /// Every blob name under `prefix`, following continuation tokens.
    pub async fn list_all(&self, prefix: &str) -> Result<Vec<String>, PipelineError> {
        let mut names = Vec::new();
        let mut next: Option<String> = None;
        loop {
            let page = self.store.list(prefix, next.as_deref(), 1000).await?;
            names.extend(page.names);
            match page.next {
                Some(n) => next = Some(n),
                None => return Ok(names),
            }
        }
    }

    /// Run ids of an app (or all apps), oldest first.
    pub async fn list_ids(
        &self,
        app: Option<&AppName>,
    ) -> Result<Vec<(AppName, RunId)>, PipelineError> {
        let mut out = Vec::new();
        for name in self.list_all(&blobs::runs_prefix(app)).await? {
            let mut parts = name.trim_end_matches(".json").split('/').skip(1);
            if let (Some(a), Some(i)) = (parts.next(), parts.next())
                && let (Ok(a), Ok(i)) = (AppName::parse(a), RunId::parse(i))
            {
                out.push((a, i));
            }
        }
        out.sort_by(|x, y| x.1.cmp(&y.1));
        Ok(out)
    }

    /// Runs, newest first, optionally filtered by app and status.
    pub async fn list(
        &self,
        app: Option<&AppName>,
        status: Option<RunStatus>,
        limit: usize,
    ) -> Result<Vec<Run>, PipelineError> {
        let mut out = Vec::new();
        for (a, id) in self.list_ids(app).await?.into_iter().rev() {
            if out.len() >= limit {
                break;
            }
            if let Some(run) = self.get(&a, &id).await?
                && status.is_none_or(|s| s == run.status)
            {
                out.push(run);
            }
        }
        Ok(out)
    }

    /// Whether an event id was already processed.
    pub async fn is_claimed(&self, source: ClaimSource, key: &str) -> Result<bool, PipelineError> {
        Ok(self.store.get(&claim_name(source, key)).await?.is_some())
    }

    /// Records that an event was processed; `false` when it already was.
    ///
    /// Claims are written *after* processing, and processing is idempotent: a
    /// crash between the two means the redelivered event is processed again
    /// (harmlessly) instead of being lost behind a claim.
    pub async fn claim(
        &self,
        source: ClaimSource,
        key: &str,
        record: &serde_json::Value,
    ) -> Result<bool, PipelineError> {
        let body = serde_json::to_vec(record).map_err(|e| PipelineError::Decode {
            name: claim_name(source, key),
            message: e.to_string(),
        })?;
        match self.store.create(&claim_name(source, key), &body).await {
            Ok(_) => Ok(true),
            Err(StoreError::Conflict { .. }) => Ok(false),
            Err(e) => Err(e.into()),
        }
    }

    /// Appends an entry to the day's audit trail.
    pub async fn audit(&self, entry: &AuditEntry) -> Result<(), PipelineError> {
        let mut line = serde_json::to_vec(entry).map_err(|e| PipelineError::Decode {
            name: blobs::audit(entry.at),
            message: e.to_string(),
        })?;
        line.push(b'\n');
        self.store.append(&blobs::audit(entry.at), &line).await?;
        Ok(())
    }

    /// Reads the audit entries of one day (lines that do not parse are skipped).
    pub async fn audit_day(&self, day: OffsetDateTime) -> Result<Vec<AuditEntry>, PipelineError> {
        let Some(v) = self.store.get(&blobs::audit(day)).await? else {
            return Ok(Vec::new());
        };
        Ok(v.body
            .split(|b| *b == b'\n')
            .filter_map(|line| serde_json::from_slice(line).ok())
            .collect())
    }
}

fn encode<T: Serialize>(name: &str, value: &T) -> Result<Vec<u8>, PipelineError> {
    serde_json::to_vec_pretty(value).map_err(|e| PipelineError::Decode {
        name: name.to_string(),
        message: e.to_string(),
    })
}

fn claim_name(source: ClaimSource, key: &str) -> String {
    format!("dedup/{}/{}", source.as_str(), crate::names::event_key(key))
}

fn ignore_conflict<T>(r: Result<T, StoreError>) -> Result<(), StoreError> {
    match r {
        Ok(_) | Err(StoreError::Conflict { .. }) => Ok(()),
        Err(e) => Err(e),
    }
}
