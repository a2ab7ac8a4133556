//! `runs-api`: the operator API under `/api/runs`, `/api/apps` and `/api/health`.
//!
//! The Functions host orders HTTP routes alphabetically by function, not by
//! ASP.NET precedence, so this function's route is constrained to its own
//! first path segments (`runs`, `apps`, `health`) and can never shadow
//! `github-webhook`. [`AREAS`] is checked against `function.json` in tests.

use std::sync::Arc;

use axum::Router;
use axum::routing::get;
use gantry_runtime::{Deps, Function};

/// Function name: folder, route and span.
pub const NAME: &str = "runs-api";

/// First path segments under `/api/` this function serves.
pub const AREAS: &[&str] = &["runs", "apps", "health"];

/// The function's registration.
pub fn function() -> Function {
    Function::http(
        NAME,
        "{area:regex(^(runs|apps|health)$)}/{*rest}",
        &["get", "post"],
        routes,
    )
}

fn routes() -> Router<Arc<Deps>> {
    Router::new().route("/api/health", get(health))
}

/// Liveness: answers as soon as the process serves HTTP, without touching
/// storage, so the host's warm-up and probes never depend on a dependency.
async fn health() -> axum::Json<serde_json::Value> {
    axum::Json(serde_json::json!({"status": "ok", "version": env!("CARGO_PKG_VERSION")}))
}
