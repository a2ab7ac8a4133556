//! `GET /api/runs`: runs newest first, filtered by app and status, in pages
//! with an opaque continuation token.
//!
//! Run ids sort by creation time, and blob listings come back in name order,
//! so "newest first" is the listing of `runs/{app}/` (or `runs/` for every
//! app) reversed. Blob Storage lists only in ascending order, so each page
//! lists the names under the prefix (1,000 per list call) and reads only the
//! run blobs it returns (plus, with a status filter, those it skips), at most
//! [`MAX_EXAMINED`] per page. See `docs/operations.md` for the costs.

use std::sync::Arc;

use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::response::Json;
use base64::Engine as _;
use gantry_pipeline::{AppName, Run, RunId, RunStatus};
use gantry_runtime::auth::{Scope, authorize};
use gantry_runtime::{ApiError, Deps};
use http::HeaderMap;
use serde::{Deserialize, Serialize};

use crate::store_error;

/// Page size when `limit` is not given.
pub const DEFAULT_LIMIT: usize = 50;
/// Largest `limit` accepted.
pub const MAX_LIMIT: usize = 200;
/// Run blobs one page reads at most while a status filter skips runs; a page
/// that reaches it ends early (possibly with fewer than `limit` runs) and its
/// continuation resumes after the last run examined.
pub const MAX_EXAMINED: usize = 1000;
/// Run blobs read concurrently.
pub const READ_BATCH: usize = 16;

/// A page of runs.
#[derive(Debug, Serialize)]
pub struct RunsPage {
    /// Runs, newest first.
    pub runs: Vec<Run>,
    /// Pass as `continuation` for the next page; `null` on the last page.
    pub continuation: Option<String>,
}

/// What a continuation token holds: where the previous page stopped and the
/// filters it was for (a token is only valid with the same filters).
#[derive(Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Continuation {
    /// The last run id examined; the next page starts just below it.
    after: RunId,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    app: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    status: Option<String>,
}

fn encode(c: &Continuation) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD
        .encode(serde_json::to_vec(c).unwrap_or_default())
}

fn decode(token: &str) -> Option<Continuation> {
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(token.trim())
        .ok()?;
    serde_json::from_slice(&bytes).ok()
}

/// The query, checked: every problem is a 400 naming the parameter.
struct Filters {
    app: Option<AppName>,
    status: Option<RunStatus>,
    limit: usize,
    after: Option<RunId>,
}

fn parse(deps: &Deps, pairs: Vec<(String, String)>) -> Result<Filters, ApiError> {
    let mut app = None;
    let mut status = None;
    let mut limit = None;
    let mut continuation = None;
    for (key, value) in pairs {
        let slot = match key.as_str() {
            "app" => &mut app,
            "status" => &mut status,
            "limit" => &mut limit,
            "continuation" => &mut continuation,
            other => {
                return Err(ApiError::bad_request(
                    "bad_query",
                    format!(
                        "unknown query parameter {other:?}; use app, status, limit, continuation"
                    ),
                ));
            }
        };
        if slot.replace(value).is_some() {
            return Err(ApiError::bad_request(
                "bad_query",
                format!("query parameter {key:?} given twice"),
            ));
        }
    }
    let app = app.filter(|a| !a.is_empty());
    let status = status.filter(|s| !s.is_empty());
    let app_name = match &app {
        Some(a) => {
            let known = AppName::parse(a)
                .ok()
                .filter(|n| deps.config.apps.iter().any(|c| &c.name == n));
            Some(known.ok_or_else(|| {
                ApiError::bad_request(
                    "bad_app",
                    format!(
                        "app: unknown app {a:?}; configured: {}",
                        deps.config
                            .apps
                            .iter()
                            .map(|c| c.name.to_string())
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                )
            })?)
        }
        None => None,
    };
    let run_status = match &status {
        Some(s) => Some(RunStatus::parse(s).ok_or_else(|| {
            ApiError::bad_request(
                "bad_status",
                format!(
                    "status: unknown status {s:?}; one of: {}",
                    RunStatus::ALL.map(RunStatus::as_str).join(", ")
                ),
            )
        })?),
        None => None,
    };
    let limit = match limit {
        None => DEFAULT_LIMIT,
        Some(l) => l
            .parse::<usize>()
            .ok()
            .filter(|n| (1..=MAX_LIMIT).contains(n))
            .ok_or_else(|| {
                ApiError::bad_request(
                    "bad_limit",
                    format!("limit: {l:?} is not a number from 1 to {MAX_LIMIT}"),
                )
            })?,
    };
    let after = match continuation.filter(|c| !c.is_empty()) {
        None => None,
        Some(token) => {
            let bad = |why: &str| {
                ApiError::bad_request("bad_continuation", format!("continuation: {why}"))
            };
            let c = decode(&token).ok_or_else(|| bad("not a token this API issued"))?;
            if c.app != app || c.status != status {
                return Err(bad(
                    "issued for other app/status filters; repeat the filters of the first page",
                ));
            }
            Some(c.after)
        }
    };
    Ok(Filters {
        app: app_name,
        status: run_status,
        limit,
        after,
    })
}

/// `GET /api/runs?app=&status=&limit=&continuation=` (read scope).
pub async fn list(
    State(deps): State<Arc<Deps>>,
    headers: HeaderMap,
    query: Result<Query<Vec<(String, String)>>, QueryRejection>,
) -> Result<Json<RunsPage>, ApiError> {
    authorize(&deps.secrets, &headers, Scope::Read)?;
    let Query(pairs) =
        query.map_err(|e| ApiError::bad_request("bad_query", format!("query: {e}")))?;
    let filters = parse(&deps, pairs)?;
    let ids = deps
        .runs
        .list_ids(filters.app.as_ref())
        .await
        .map_err(store_error)?;
    let mut candidates = ids
        .into_iter()
        .rev()
        .filter(|(_, id)| filters.after.as_ref().is_none_or(|after| id < after))
        .peekable();
    let mut runs = Vec::new();
    let mut examined = 0;
    let mut last = None;
    while runs.len() < filters.limit && examined < MAX_EXAMINED {
        // Read the next runs concurrently (one Blob Storage round trip per
        // batch instead of per run), as many as could still fit the page.
        let want = (filters.limit - runs.len())
            .min(MAX_EXAMINED - examined)
            .min(READ_BATCH);
        let batch: Vec<_> = candidates.by_ref().take(want).collect();
        if batch.is_empty() {
            break;
        }
        examined += batch.len();
        let read =
            futures::future::join_all(batch.iter().map(|(app, id)| deps.runs.get(app, id))).await;
        for ((_, id), run) in batch.into_iter().zip(read) {
            // A run listed but deleted meanwhile is skipped.
            if let Some(run) = run.map_err(store_error)?
                && filters.status.is_none_or(|s| s == run.status)
            {
                runs.push(run);
            }
            last = Some(id);
        }
    }
    let continuation = match (candidates.peek(), last) {
        (Some(_), Some(after)) => Some(encode(&Continuation {
            after,
            app: filters.app.as_ref().map(ToString::to_string),
            status: filters.status.map(|s| s.as_str().to_string()),
        })),
        _ => None,
    };
    Ok(Json(RunsPage { runs, continuation }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_round_trip_and_garbage_does_not_decode() {
        let c = Continuation {
            after: gantry_pipeline::ids::new_run_id(1_700_000_000_000),
            app: Some("web".into()),
            status: None,
        };
        assert_eq!(decode(&encode(&c)), Some(c));
        assert_eq!(decode("not base64 !"), None);
        assert_eq!(
            decode(&base64::engine::general_purpose::URL_SAFE_NO_PAD.encode("{}")),
            None
        );
    }
}
