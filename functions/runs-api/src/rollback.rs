//! `POST /api/apps/{app}/rollback` (operate scope): deploys an earlier good
//! version again through a new rollback run ([`gantry_runtime::rollback`]).
//!
//! Body (optional): `{"digest": "sha256:...", "reason": "..."}`. Without a
//! digest the previous good version of `apps/{app}/deployed.json` is used; a
//! named digest must have passed both gates for this app before. Answers 202
//! with the rollback run: the deploy step applies it asynchronously, and
//! `GET /api/runs/{id}` follows it to `deployed` (or `failed`).

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::response::Json;
use gantry_pipeline::{AppName, Digest, Run};
use gantry_runtime::auth::{Scope, authorize};
use gantry_runtime::rollback::{self, RollbackError, RollbackRequest};
use gantry_runtime::{ApiError, Deps};
use http::{HeaderMap, StatusCode};

/// Body of a rollback request.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct RollbackBody {
    #[serde(default)]
    digest: Option<String>,
    #[serde(default)]
    reason: Option<String>,
}

pub(crate) async fn rollback(
    State(deps): State<Arc<Deps>>,
    headers: HeaderMap,
    Path(app): Path<String>,
    body: axum::body::Bytes,
) -> Result<(StatusCode, Json<Run>), ApiError> {
    let principal = authorize(&deps.secrets, &headers, Scope::Operate)?
        .name
        .clone();
    let app = AppName::parse(&app)
        .map_err(|e| ApiError::bad_request("bad_app", format!("invalid app name: {e}")))?;
    let body: RollbackBody = if body.iter().all(u8::is_ascii_whitespace) {
        RollbackBody::default()
    } else {
        serde_json::from_slice(&body).map_err(|e| {
            ApiError::bad_request(
                "bad_body",
                format!("expected {{\"digest\": \"sha256:...\", \"reason\": \"...\"}}: {e}"),
            )
        })?
    };
    let digest = body
        .digest
        .as_deref()
        .map(Digest::parse)
        .transpose()
        .map_err(|e| ApiError::bad_request("bad_digest", format!("invalid digest: {e}")))?;
    let reason = crate::operator_reason(body.reason)?;
    let run = rollback::start(
        &deps,
        RollbackRequest {
            app: &app,
            digest: digest.as_ref(),
            requested_by: &principal,
            reason: reason.as_deref(),
        },
    )
    .await
    .map_err(|e| {
        let code = match &e {
            RollbackError::UnknownApp { .. } => {
                return ApiError::new(StatusCode::NOT_FOUND, "unknown_app", e.to_string());
            }
            RollbackError::NoTarget { .. } => "no_rollback_target",
            RollbackError::NotEligible { .. } => "digest_not_eligible",
            RollbackError::Blocked { .. } => "digest_blocked",
            _ if e.is_transient() => return ApiError::unavailable(e.to_string()),
            _ => {
                return ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string());
            }
        };
        ApiError::new(StatusCode::CONFLICT, code, e.to_string())
    })?;
    Ok((StatusCode::ACCEPTED, Json(run)))
}
