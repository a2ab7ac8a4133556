//! `GET /api/audit`: the open findings of `cluster-audit` (policy, drift,
//! vulnerabilities, governance) as [`gantry_pipeline::findings::list_open`]
//! reads them from the store, with each scope's last check.
//!
//! Filters: `app` (a valid app name; it need not be configured any more, so
//! the findings of an app removed from `gantry.toml` can still be listed) and
//! `kind` (a category — `policy`, `drift`, `vulnerability`, `governance` — or
//! one finding kind). Anything else is a 400 naming the parameter.

use std::sync::Arc;

use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::response::Json;
use gantry_pipeline::AppName;
use gantry_pipeline::findings::{FindingFilter, FindingList, list_open};
use gantry_runtime::auth::{Scope, authorize};
use gantry_runtime::{ApiError, Deps};
use http::HeaderMap;

use crate::store_error;

fn parse(pairs: Vec<(String, String)>) -> Result<FindingFilter, ApiError> {
    let mut app = None;
    let mut kind = None;
    for (key, value) in pairs {
        let slot = match key.as_str() {
            "app" => &mut app,
            "kind" => &mut kind,
            other => {
                return Err(ApiError::bad_request(
                    "bad_query",
                    format!("unknown query parameter {other:?}; use app, kind"),
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
    let app = app
        .filter(|a| !a.is_empty())
        .map(|a| {
            AppName::parse(&a).map_err(|e| {
                ApiError::bad_request("bad_app", format!("app: {a:?} is not an app name: {e}"))
            })
        })
        .transpose()?;
    let kind = kind.filter(|k| !k.is_empty());
    FindingFilter::new(app, kind.as_deref())
        .map_err(|e| ApiError::bad_request("bad_kind", format!("kind: {e}")))
}

/// `GET /api/audit?app=&kind=` (read scope).
pub async fn list(
    State(deps): State<Arc<Deps>>,
    headers: HeaderMap,
    query: Result<Query<Vec<(String, String)>>, QueryRejection>,
) -> Result<Json<FindingList>, ApiError> {
    authorize(&deps.secrets, &headers, Scope::Read)?;
    let Query(pairs) =
        query.map_err(|e| ApiError::bad_request("bad_query", format!("query: {e}")))?;
    let filter = parse(pairs)?;
    let list = list_open(&deps.runs, &filter).await.map_err(store_error)?;
    Ok(Json(list))
}
