//! `GET /api/audit`: open `cluster-audit` findings of every scope (app state,
//! `_cluster` governance state, re-scan records) as the audit writes them,
//! on the real router with the embedded store: auth, filters, bad filters.

mod support;

use std::sync::Arc;

use anyhow::{Context, Result};
use axum::Router;
use gantry_bus::{EmbeddedBus, QueueOptions};
use gantry_pipeline::findings::{AuditState, OpenFinding};
use gantry_pipeline::{AppName, RunStore, Severity};
use http::StatusCode;
use serde_json::{Value, json};
use support::READ;

const CONFIG: &str =
    "[[apps]]\nname = \"web\"\nrepo = \"contoso/web\"\nimage = \"contoso.azurecr.io/web\"\n";

fn finding(kind: &str, severity: Severity, reason: &str, app: Option<&str>) -> OpenFinding {
    OpenFinding {
        kind: kind.into(),
        reason: reason.into(),
        since: "2026-11-27T09:00:00Z".into(),
        severity: Some(severity),
        app: app.map(|a| AppName::parse(a).unwrap_or_else(|e| panic!("{e}"))),
        detail: json!({"note": kind}),
    }
}

async fn harness() -> Result<(tempfile::TempDir, Router)> {
    let dir = tempfile::tempdir()?;
    let store = Arc::new(gantry_store::fs::FsStore::open(dir.path().join("store"))?);
    let runs = RunStore::new(store);
    let mut web = AuditState {
        checked_at: Some("2026-11-27T09:15:00Z".into()),
        ..AuditState::default()
    };
    web.open.insert(
        "policy:no-host-pid:Deployment/web/debug:abc".into(),
        finding(
            "policy-violation",
            Severity::High,
            "Deployment debug: hostPID",
            None,
        ),
    );
    web.open.insert(
        "drift:Deployment/web:spec.replicas".into(),
        finding(
            "drift",
            Severity::High,
            "Deployment web: spec.replicas is 5",
            None,
        ),
    );
    runs.put_json("audit/state/web.json", &web).await?;
    let mut cluster = AuditState {
        error: Some("listing DaemonSet in kube-system failed (HTTP 403)".into()),
        ..AuditState::default()
    };
    cluster.open.insert(
        "limitrange-missing:web".into(),
        finding(
            "limitrange-missing",
            Severity::High,
            "namespace web has no LimitRange",
            Some("web"),
        ),
    );
    cluster.open.insert(
        "daemonset-missing:kube-system/ama-logs".into(),
        finding(
            "daemonset-missing",
            Severity::High,
            "mandatory DaemonSet kube-system/ama-logs does not exist",
            None,
        ),
    );
    runs.put_json("audit/state/_cluster.json", &cluster).await?;
    runs.put_json(
        "apps/web/rescan.json",
        &json!({"digest": "sha256:00", "alerted": ["CVE-1|openssl|3.0"], "open": {
            "vuln:CVE-1|openssl|3.0": finding("new-vulnerability", Severity::High, "CVE-1 in openssl 3.0 (critical)", None)
        }}),
    )
    .await?;
    // Not a scope: ignored.
    runs.put_json("audit/state/Bad_Name.json", &AuditState::default())
        .await?;

    let bus = Arc::new(EmbeddedBus::open(dir.path().join("bus"), QueueOptions::default()).await?);
    let (_, router) = support::router(runs, bus, CONFIG, support::secrets()?)?;
    Ok((dir, router))
}

async fn get(router: &Router, path: &str, token: Option<&str>) -> Result<(StatusCode, Value)> {
    support::call(router, "GET", path, &support::bearer(token), "").await
}

fn fingerprints(v: &Value) -> Vec<&str> {
    v["findings"]
        .as_array()
        .map(|a| a.iter().filter_map(|f| f["fingerprint"].as_str()).collect())
        .unwrap_or_default()
}

#[tokio::test]
async fn lists_every_kind_with_scope_status() -> Result<()> {
    let (_dir, router) = harness().await?;
    let (status, body) = get(&router, "/api/audit", Some(READ)).await?;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(
        fingerprints(&body),
        [
            "daemonset-missing:kube-system/ama-logs",
            "limitrange-missing:web",
            "drift:Deployment/web:spec.replicas",
            "policy:no-host-pid:Deployment/web/debug:abc",
            "vuln:CVE-1|openssl|3.0",
        ],
        "{body:#}"
    );
    let first = &body["findings"][0];
    assert_eq!(first["scope"], "_cluster");
    assert_eq!(first["category"], "governance");
    assert_eq!(first["severity"], "high");
    assert!(first["app"].is_null());
    assert_eq!(body["findings"][1]["app"], "web");
    assert_eq!(body["findings"][2]["scope"], "web");
    assert_eq!(body["findings"][2]["app"], "web");
    assert_eq!(body["findings"][4]["category"], "vulnerability");
    assert_eq!(body["findings"][4]["detail"]["note"], "new-vulnerability");
    let scopes = body["scopes"].as_array().context("scopes")?;
    assert_eq!(scopes.len(), 2, "{body:#}");
    assert_eq!(scopes[0]["scope"], "_cluster");
    assert!(scopes[0]["error"].as_str().unwrap_or("").contains("403"));
    assert_eq!(scopes[1]["checked_at"], "2026-11-27T09:15:00Z");
    Ok(())
}

#[tokio::test]
async fn filters_by_app_and_kind() -> Result<()> {
    let (_dir, router) = harness().await?;
    let (_, body) = get(&router, "/api/audit?kind=governance", Some(READ)).await?;
    assert_eq!(
        fingerprints(&body),
        [
            "daemonset-missing:kube-system/ama-logs",
            "limitrange-missing:web"
        ]
    );
    let (_, body) = get(&router, "/api/audit?app=web&kind=governance", Some(READ)).await?;
    assert_eq!(fingerprints(&body), ["limitrange-missing:web"]);
    let (_, body) = get(&router, "/api/audit?kind=drift", Some(READ)).await?;
    assert_eq!(fingerprints(&body), ["drift:Deployment/web:spec.replicas"]);
    let (_, body) = get(&router, "/api/audit?kind=policy-violation", Some(READ)).await?;
    assert_eq!(
        fingerprints(&body),
        ["policy:no-host-pid:Deployment/web/debug:abc"]
    );
    let (_, body) = get(&router, "/api/audit?app=api", Some(READ)).await?;
    assert!(fingerprints(&body).is_empty(), "{body}");
    Ok(())
}

#[tokio::test]
async fn bad_filters_and_missing_tokens_are_json_errors() -> Result<()> {
    let (_dir, router) = harness().await?;
    for (path, code, needle) in [
        (
            "/api/audit?kind=bogus",
            "bad_kind",
            "unknown finding kind \"bogus\"",
        ),
        (
            "/api/audit?app=Not_An_App",
            "bad_app",
            "app: \"Not_An_App\"",
        ),
        (
            "/api/audit?status=open",
            "bad_query",
            "unknown query parameter \"status\"",
        ),
        (
            "/api/audit?kind=drift&kind=policy",
            "bad_query",
            "given twice",
        ),
    ] {
        let (status, body) = get(&router, path, Some(READ)).await?;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{path}: {body}");
        assert_eq!(body["error"]["code"], code, "{path}: {body}");
        let message = body["error"]["message"].as_str().unwrap_or("");
        assert!(message.contains(needle), "{path}: {message}");
    }
    let (status, body) = get(&router, "/api/audit", None).await?;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}");
    assert_eq!(body["error"]["code"], "unauthorized");
    let (status, _) = get(&router, "/api/audit", Some("wrong-token")).await?;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    Ok(())
}
