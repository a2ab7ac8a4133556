//! What the runs-api tests share: the operator tokens, the router over a
//! store and a bus, calling it, and reading back what it recorded.

#![allow(dead_code)]

use std::sync::Arc;

use anyhow::{Context, Result, ensure};
use axum::Router;
use axum::body::Body;
use gantry_bus::{EmbeddedBus, MessageBus, QUEUES};
use gantry_pipeline::{Config, RunStore};
use gantry_runtime::auth::parse_api_tokens;
use gantry_runtime::{Deps, Secrets};
use gantry_store::StateStore;
use http::{Request, StatusCode};
use http_body_util::BodyExt;
use serde_json::Value;
use tower::ServiceExt;

/// Token of `alice` (operate scope).
pub const OPERATE: &str = "ops-secret";
/// Token of `bob` (read scope).
pub const READ: &str = "read-secret";

/// Hex SHA-256 of a token, as `GANTRY_API_TOKENS` lists it.
pub fn sha256_hex(token: &str) -> String {
    use sha2::Digest as _;
    hex::encode(sha2::Sha256::digest(token.as_bytes()))
}

/// Secrets holding the two tokens: `alice` operates, `bob` reads.
pub fn secrets() -> Result<Secrets> {
    let tokens = format!(
        "alice:operate:{},bob:read:{}",
        sha256_hex(OPERATE),
        sha256_hex(READ)
    );
    Ok(Secrets {
        api_tokens: parse_api_tokens(&tokens).map_err(anyhow::Error::msg)?,
        ..Secrets::default()
    })
}

/// The runs-api router over `runs` and `bus` with `config` (gantry.toml
/// text) and `secrets`, and the deps it serves.
pub fn router(
    runs: RunStore,
    bus: Arc<dyn MessageBus>,
    config: &str,
    secrets: Secrets,
) -> Result<(Arc<Deps>, Router)> {
    let deps = Arc::new(Deps {
        runs,
        bus,
        config: Arc::new(Config::parse(config, "test.toml")?),
        secrets,
        services: Default::default(),
    });
    let router = gantry_runtime::app(deps.clone(), &[fn_runs_api::function()]);
    Ok((deps, router))
}

/// `Authorization: Bearer <token>`, or no header.
pub fn bearer(token: Option<&str>) -> Vec<(&'static str, String)> {
    token
        .map(|t| ("authorization", format!("Bearer {t}")))
        .into_iter()
        .collect()
}

/// One request through `router`; the answer must be JSON.
pub async fn call(
    router: &Router,
    method: &str,
    path: &str,
    headers: &[(&str, String)],
    body: &str,
) -> Result<(StatusCode, Value)> {
    let mut request = Request::builder().method(method).uri(path);
    for (k, v) in headers {
        request = request.header(*k, v);
    }
    let response = router
        .clone()
        .oneshot(request.body(Body::from(body.to_string()))?)
        .await?;
    let status = response.status();
    let bytes = response.into_body().collect().await?.to_bytes();
    let value = serde_json::from_slice(&bytes)
        .with_context(|| format!("{status}: not JSON: {}", String::from_utf8_lossy(&bytes)))?;
    Ok((status, value))
}

/// The `code` of a JSON error answer.
pub fn code(body: &Value) -> &str {
    body["error"]["code"].as_str().unwrap_or_default()
}

/// Fails unless every queue but `except` is empty.
pub async fn assert_quiet(bus: &EmbeddedBus, except: &[&str]) -> Result<()> {
    for queue in QUEUES.iter().filter(|q| !except.contains(q)) {
        let held = bus.peek(queue).await;
        ensure!(held.is_empty(), "queue {queue} holds {held:#?}");
    }
    Ok(())
}

/// Every audit-trail entry with `action`, from all days.
pub async fn audit(runs: &RunStore, store: &dyn StateStore, action: &str) -> Result<Vec<Value>> {
    let mut found = Vec::new();
    for name in runs.list_all("audit/").await? {
        let blob = store.get(&name).await?.context("audit blob")?;
        for line in String::from_utf8(blob.body)?.lines() {
            let entry: Value = serde_json::from_str(line)?;
            if entry["action"] == action {
                found.push(entry);
            }
        }
    }
    Ok(found)
}
