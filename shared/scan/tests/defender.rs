//! `defender::ResourceGraph` against a local fake of the Resource Graph REST API,
//! plus one live test against Azure (ignored by default).

// Helpers outside `#[test]` functions unwrap too: a panic is a test failure.
#![allow(clippy::unwrap_used)]

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use azure_core::credentials::{AccessToken, TokenCredential, TokenRequestOptions};
use gantry_pipeline::Digest;
use gantry_pipeline::config::{ScanSource, SeverityLevel};
use gantry_scan::ScanError;
use gantry_scan::defender::{ASSESSMENT_KEY, ResourceGraph, query_for};
use serde_json::{Value, json};
use time::OffsetDateTime;

const DIGEST: &str = "sha256:c4719afa76fa448b5eca99e6736885846501d17956f2fcb2de5c916d723f3a87";
const SUBSCRIPTION: &str = "0b06d9ea-afe6-4779-bd59-30e5c2d9d13f";

fn digest() -> Digest {
    Digest::parse(DIGEST).unwrap()
}

// ---------------------------------------------------------------- credential

#[derive(Debug, Default)]
struct TestCredential {
    calls: AtomicUsize,
    scopes: Mutex<Vec<String>>,
    fail: bool,
}

#[async_trait::async_trait]
impl TokenCredential for TestCredential {
    async fn get_token(
        &self,
        scopes: &[&str],
        _options: Option<TokenRequestOptions<'_>>,
    ) -> azure_core::Result<AccessToken> {
        if self.fail {
            return Err(azure_core::Error::with_message(
                azure_core::error::ErrorKind::Credential,
                "no managed identity endpoint",
            ));
        }
        let n = self.calls.fetch_add(1, Ordering::SeqCst) + 1;
        *self.scopes.lock().unwrap() = scopes.iter().map(|s| s.to_string()).collect();
        Ok(AccessToken::new(
            format!("test-arm-token-{n}"),
            OffsetDateTime::now_utc() + Duration::from_secs(3600),
        ))
    }
}

// ---------------------------------------------------------------- fake server

/// What the fake answers, in order.
struct Reply {
    status: u16,
    headers: Vec<(&'static str, String)>,
    body: String,
}

fn ok(body: Value) -> Reply {
    Reply {
        status: 200,
        headers: vec![("content-type", "application/json".into())],
        body: body.to_string(),
    }
}

fn status(status: u16, body: Value) -> Reply {
    Reply {
        status,
        headers: vec![("content-type", "application/json".into())],
        body: body.to_string(),
    }
}

/// One request as the fake saw it.
#[derive(Debug, Clone)]
struct Seen {
    path: String,
    query: String,
    authorization: Option<String>,
    body: Value,
    at: Instant,
}

#[derive(Default)]
struct Fake {
    replies: Mutex<VecDeque<Reply>>,
    seen: Mutex<Vec<Seen>>,
    /// Answer 400 with the request's Authorization header in the body (a
    /// careless proxy), to prove errors never carry the token.
    echo_authorization: bool,
}

async fn handle(
    State(fake): State<Arc<Fake>>,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let authorization = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    fake.seen.lock().unwrap().push(Seen {
        path: uri.path().to_string(),
        query: uri.query().unwrap_or_default().to_string(),
        authorization: authorization.clone(),
        body: serde_json::from_slice(&body).unwrap_or(Value::Null),
        at: Instant::now(),
    });
    if fake.echo_authorization {
        let text = format!(
            r#"{{"error":{{"code":"BadRequest","message":"rejected header {}"}}}}"#,
            authorization.unwrap_or_default()
        );
        return (StatusCode::BAD_REQUEST, text).into_response();
    }
    let Some(reply) = fake.replies.lock().unwrap().pop_front() else {
        return (StatusCode::IM_A_TEAPOT, "no scripted reply left").into_response();
    };
    let mut response = (StatusCode::from_u16(reply.status).unwrap(), reply.body).into_response();
    for (name, value) in reply.headers {
        response.headers_mut().insert(name, value.parse().unwrap());
    }
    response
}

async fn start(fake: Fake) -> Result<(String, Arc<Fake>)> {
    let fake = Arc::new(fake);
    let app = axum::Router::new()
        .fallback(axum::routing::any(handle))
        .with_state(fake.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    Ok((format!("http://{addr}"), fake))
}

fn scripted(replies: Vec<Reply>) -> Fake {
    Fake {
        replies: Mutex::new(replies.into()),
        ..Fake::default()
    }
}

async fn client(replies: Vec<Reply>) -> Result<(ResourceGraph, Arc<Fake>, Arc<TestCredential>)> {
    let (endpoint, fake) = start(scripted(replies)).await?;
    let credential = Arc::new(TestCredential::default());
    let graph = ResourceGraph::new(&endpoint, credential.clone(), reqwest::Client::new())?
        .with_timeout(Duration::from_secs(10));
    Ok((graph, fake, credential))
}

// ---------------------------------------------------------------- rows

fn sub_id(n: u32) -> String {
    format!(
        "/subscriptions/{SUBSCRIPTION}/resourceGroups/rg-gantry/providers/Microsoft.ContainerRegistry/registries/contoso/providers/Microsoft.Security/assessments/{ASSESSMENT_KEY}/subassessments/8b1e6c2a-0000-4000-8000-00000000000{n}"
    )
}

/// A projected row (columns of `query_for`) in the current MDVM shape.
fn current_row(n: u32, cve: &str, code: &str, severity: &str, package: &str, fixed: &str) -> Value {
    json!({
        "id": sub_id(n),
        "vulnId": cve,
        "statusCode": code,
        "statusSeverity": if severity == "Critical" { "High" } else { severity },
        "displayName": cve,
        "timeGenerated": format!("2026-11-03T0{n}:36:15.0772799Z"),
        "additionalData": {
            "assessedResourceType": "AzureContainerRegistryVulnerability",
            "vulnerabilityDetails": {
                "severity": severity,
                "cveId": cve,
                "cvss": {"3.0": {"base": 9.8, "cvssVectorString": "CVSS:3.0/AV:N/AC:L/PR:N/UI:N/S:U/C:H/I:H/A:H"}},
                "references": [{"title": cve, "link": format!("https://nvd.nist.gov/vuln/detail/{cve}")}]
            },
            "artifactDetails": {
                "registryHost": "contoso.azurecr.io",
                "repositoryName": "web",
                "artifactType": "ContainerImage",
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "digest": DIGEST,
                "tags": ["4f2c9e1"]
            },
            "softwareDetails": {
                "category": "OS",
                "packageName": package,
                "version": "3.1.5-r0",
                "fixedVersion": fixed,
                "fixStatus": if fixed.is_empty() { "NoFixAvailable" } else { "FixAvailable" },
                "osDetails": {"osPlatform": "linux", "osVersion": "alpine_linux_3.19"}
            },
            "cvssV30Score": 9.8
        }
    })
}

/// A projected row in the older (Qualys-era) shape: CVE list, `patchable`.
fn older_row(n: u32) -> Value {
    json!({
        "id": sub_id(n),
        "vulnId": "178263",
        "statusCode": "Unhealthy",
        "statusSeverity": "Medium",
        "displayName": "Alpine Linux Security Update for busybox",
        "timeGenerated": "2026-11-02T21:10:00Z",
        "additionalData": {
            "assessedResourceType": "ContainerRegistryVulnerability",
            "type": "Vulnerability",
            "cve": [{"title": "CVE-2023-42363", "link": "https://nvd.nist.gov/vuln/detail/CVE-2023-42363"}],
            "patchable": false,
            "imageDigest": DIGEST,
            "repositoryName": "web"
        }
    })
}

fn page(rows: Vec<Value>, total: usize, skip_token: Option<&str>) -> Value {
    let mut body = json!({
        "totalRecords": total,
        "count": rows.len(),
        "resultTruncated": "false",
        "data": rows,
        "facets": []
    });
    if let Some(token) = skip_token {
        body["$skipToken"] = json!(token);
    }
    body
}

// ---------------------------------------------------------------- tests

#[tokio::test]
async fn follows_skip_token_honours_retry_after_and_sends_bearer() -> Result<()> {
    let page_one = page(
        vec![
            current_row(
                1,
                "CVE-2024-45491",
                "Unhealthy",
                "Critical",
                "expat",
                "2.6.3-r0",
            ),
            current_row(2, "CVE-2024-6119", "Unhealthy", "High", "libssl3", ""),
        ],
        4,
        Some("ew0KICAiJGlkIjogIjEiLA0KICAiTWF4Um93cyI6IDI="),
    );
    let throttled = Reply {
        status: 429,
        headers: vec![
            ("retry-after", "1".into()),
            ("x-ms-user-quota-remaining", "0".into()),
            ("x-ms-user-quota-resets-after", "00:00:01".into()),
        ],
        body: json!({"error": {"code": "RateLimiting", "message": "Please provide below info when asking for support"}}).to_string(),
    };
    let page_two = page(
        vec![
            current_row(
                3,
                "CVE-2024-9143",
                "Healthy",
                "Low",
                "libcrypto3",
                "3.1.7-r1",
            ),
            older_row(4),
        ],
        4,
        None,
    );
    let (graph, fake, credential) = client(vec![ok(page_one), throttled, ok(page_two)]).await?;

    let findings = graph
        .findings(&[SUBSCRIPTION.to_string()], &digest())
        .await?
        .context("rows exist, so not pending")?;

    let seen = fake.seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 3, "page 1, throttled page 2, page 2");
    for request in &seen {
        assert_eq!(request.path, "/providers/Microsoft.ResourceGraph/resources");
        assert_eq!(request.query, "api-version=2024-04-01");
        assert_eq!(
            request.authorization.as_deref(),
            Some("Bearer test-arm-token-1")
        );
        assert_eq!(request.body["subscriptions"], json!([SUBSCRIPTION]));
        let query = request.body["query"].as_str().context("query")?;
        assert!(query.contains(DIGEST), "{query}");
        assert!(query.contains(ASSESSMENT_KEY), "{query}");
        assert_eq!(request.body["options"]["$top"], 1000);
        assert_eq!(request.body["options"]["resultFormat"], "objectArray");
    }
    assert!(seen[0].body["options"].get("$skipToken").is_none());
    for later in &seen[1..] {
        assert_eq!(
            later.body["options"]["$skipToken"],
            "ew0KICAiJGlkIjogIjEiLA0KICAiTWF4Um93cyI6IDI="
        );
        // Every page asks the same query.
        assert_eq!(later.body["query"], seen[0].body["query"]);
    }
    assert!(
        seen[2].at.duration_since(seen[1].at) >= Duration::from_millis(950),
        "Retry-After: 1 was not honoured"
    );
    // One token for the whole conversation, for Azure Resource Manager.
    assert_eq!(credential.calls.load(Ordering::SeqCst), 1);
    assert_eq!(
        *credential.scopes.lock().unwrap(),
        vec!["https://management.azure.com/.default".to_string()]
    );

    assert_eq!(findings.source, ScanSource::Defender);
    let ids: Vec<&str> = findings.findings.iter().map(|f| f.id.as_str()).collect();
    // The Healthy row is proof of scanning, not a finding.
    assert_eq!(ids, ["CVE-2024-45491", "CVE-2024-6119", "CVE-2023-42363"]);
    let expat = &findings.findings[0];
    // vulnerabilityDetails says Critical where status can only say High.
    assert_eq!(expat.severity, SeverityLevel::Critical);
    assert_eq!(expat.package, "expat");
    assert_eq!(expat.installed_version, "3.1.5-r0");
    assert_eq!(expat.fixed_version.as_deref(), Some("2.6.3-r0"));
    assert_eq!(findings.findings[1].fixed_version, None);
    let busybox = &findings.findings[2];
    assert_eq!(busybox.severity, SeverityLevel::Medium);
    assert_eq!(busybox.fixed_version, None);
    assert_eq!(
        busybox.title.as_deref(),
        Some("Alpine Linux Security Update for busybox")
    );
    // The newest timeGenerated is the scan time.
    assert_eq!(
        findings.scanned_at.as_deref(),
        Some("2026-11-03T03:36:15.0772799Z")
    );
    Ok(())
}

#[tokio::test]
async fn zero_rows_is_pending() -> Result<()> {
    let (graph, _fake, _) = client(vec![ok(page(vec![], 0, None))]).await?;
    assert_eq!(
        graph
            .findings(&[SUBSCRIPTION.to_string()], &digest())
            .await?,
        None
    );
    Ok(())
}

#[tokio::test]
async fn only_healthy_rows_is_scanned_clean() -> Result<()> {
    let rows = vec![current_row(
        1,
        "CVE-2024-9143",
        "Healthy",
        "Low",
        "libcrypto3",
        "3.1.7-r1",
    )];
    let (graph, _fake, _) = client(vec![ok(page(rows, 1, None))]).await?;
    let findings = graph
        .findings(&[SUBSCRIPTION.to_string()], &digest())
        .await?
        .context("scanned")?;
    assert!(findings.findings.is_empty());
    Ok(())
}

#[tokio::test]
async fn not_applicable_rows_still_count() -> Result<()> {
    // A Defender exemption is not gantry's allow-list: the finding stays.
    let rows = vec![current_row(
        1,
        "CVE-2024-45491",
        "NotApplicable",
        "Critical",
        "expat",
        "2.6.3-r0",
    )];
    let (graph, _fake, _) = client(vec![ok(page(rows, 1, None))]).await?;
    let findings = graph.findings(&[], &digest()).await?.context("scanned")?;
    assert_eq!(findings.findings.len(), 1);
    Ok(())
}

#[tokio::test]
async fn server_errors_are_transient() -> Result<()> {
    let (graph, _fake, _) = client(vec![status(
        500,
        json!({"error": {"code": "InternalServerError", "message": "Encountered an internal server error."}}),
    )])
    .await?;
    let err = graph
        .findings(&[SUBSCRIPTION.to_string()], &digest())
        .await
        .unwrap_err();
    assert!(err.is_transient(), "{err:?}");
    assert!(matches!(
        err,
        ScanError::QueryResourceGraph {
            status: Some(500),
            ..
        }
    ));
    assert!(err.to_string().contains("InternalServerError"), "{err}");
    Ok(())
}

#[tokio::test]
async fn forbidden_and_bad_request_are_permanent() -> Result<()> {
    for (code, body) in [
        (
            403,
            json!({"error": {"code": "AuthorizationFailed", "message": "The client does not have authorization to perform action 'Microsoft.ResourceGraph/resources/read'."}}),
        ),
        (
            400,
            json!({"error": {"code": "BadRequest", "message": "Please provide below info when asking for support", "details": [{"code": "InvalidQuery", "message": "Query is invalid."}]}}),
        ),
        (
            401,
            json!({"error": {"code": "InvalidAuthenticationToken", "message": "The access token is invalid."}}),
        ),
    ] {
        let (graph, _fake, _) = client(vec![status(code, body)]).await?;
        let err = graph
            .findings(&[SUBSCRIPTION.to_string()], &digest())
            .await
            .unwrap_err();
        assert!(!err.is_transient(), "{code}: {err:?}");
        match &err {
            ScanError::QueryResourceGraph { status, .. } => assert_eq!(*status, Some(code)),
            other => panic!("unexpected {other:?}"),
        }
    }
    Ok(())
}

#[tokio::test]
async fn throttling_beyond_the_retries_is_transient() -> Result<()> {
    let throttle = |after: &str| Reply {
        status: 429,
        headers: vec![("retry-after", after.to_string())],
        body: String::new(),
    };
    let (graph, fake, _) = client(vec![throttle("0"), throttle("0"), throttle("0")]).await?;
    let graph = graph.with_throttle_retries(2, Duration::from_secs(5));
    let err = graph.findings(&[], &digest()).await.unwrap_err();
    assert!(err.is_transient());
    assert!(matches!(
        err,
        ScanError::QueryResourceGraph {
            status: Some(429),
            ..
        }
    ));
    assert_eq!(fake.seen.lock().unwrap().len(), 3);

    // A wait longer than a function should sleep is handed back at once.
    let (graph, fake, _) = client(vec![throttle("3600")]).await?;
    let started = Instant::now();
    let err = graph.findings(&[], &digest()).await.unwrap_err();
    assert!(err.is_transient());
    assert!(started.elapsed() < Duration::from_secs(5));
    assert_eq!(fake.seen.lock().unwrap().len(), 1);
    Ok(())
}

#[tokio::test]
async fn truncated_results_without_skip_token_fail() -> Result<()> {
    let mut body = page(
        vec![current_row(1, "CVE-1", "Unhealthy", "High", "a", "")],
        5000,
        None,
    );
    body["resultTruncated"] = json!("true");
    let (graph, _fake, _) = client(vec![ok(body)]).await?;
    let err = graph.findings(&[], &digest()).await.unwrap_err();
    assert!(err.to_string().contains("incomplete"), "{err}");
    Ok(())
}

#[tokio::test]
async fn token_never_appears_in_errors() -> Result<()> {
    let (endpoint, _fake) = start(Fake {
        echo_authorization: true,
        ..Fake::default()
    })
    .await?;
    let graph = ResourceGraph::new(
        &endpoint,
        Arc::new(TestCredential::default()),
        reqwest::Client::new(),
    )?;
    let err = graph.findings(&[], &digest()).await.unwrap_err();
    let text = format!("{err} {err:?} {graph:?}");
    assert!(!text.contains("test-arm-token"), "{text}");
    assert!(text.contains("[redacted]"), "{text}");
    Ok(())
}

#[tokio::test]
async fn credential_failure_is_an_authentication_error() -> Result<()> {
    let (endpoint, fake) = start(scripted(vec![])).await?;
    let credential = Arc::new(TestCredential {
        fail: true,
        ..TestCredential::default()
    });
    let graph = ResourceGraph::new(&endpoint, credential, reqwest::Client::new())?;
    let err = graph.findings(&[], &digest()).await.unwrap_err();
    assert!(
        matches!(err, ScanError::AuthenticateResourceGraph { .. }),
        "{err:?}"
    );
    assert!(err.is_transient());
    assert!(fake.seen.lock().unwrap().is_empty());
    Ok(())
}

#[tokio::test]
async fn unreachable_endpoint_is_transient() -> Result<()> {
    // Bind and drop a listener to get a port nothing listens on.
    let port = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await?
        .local_addr()?
        .port();
    let graph = ResourceGraph::new(
        &format!("http://127.0.0.1:{port}"),
        Arc::new(TestCredential::default()),
        reqwest::Client::new(),
    )?;
    let err = graph.findings(&[], &digest()).await.unwrap_err();
    assert!(err.is_transient(), "{err:?}");
    Ok(())
}

#[test]
fn endpoints_are_checked() {
    let credential = || Arc::new(TestCredential::default()) as Arc<dyn TokenCredential>;
    let graph = ResourceGraph::new(
        "https://management.azure.com/",
        credential(),
        reqwest::Client::new(),
    )
    .unwrap();
    assert_eq!(
        graph.url().as_str(),
        "https://management.azure.com/providers/Microsoft.ResourceGraph/resources?api-version=2024-04-01"
    );
    for bad in [
        "http://management.azure.com",
        "ftp://example.com",
        "https://user:pw@management.azure.com",
        "https://management.azure.com/?x=1",
        "not a url",
    ] {
        let err = ResourceGraph::new(bad, credential(), reqwest::Client::new()).unwrap_err();
        assert!(
            matches!(err, ScanError::ConfigureResourceGraph { .. }),
            "{bad}"
        );
        assert!(!err.is_transient());
    }
}

#[test]
fn query_embeds_the_digest_and_the_assessment() {
    let q = query_for(&digest());
    assert!(q.starts_with("securityresources\n"), "{q}");
    assert!(q.contains("type == \"microsoft.security/assessments/subassessments\""));
    assert!(q.contains(&format!("/assessments/{ASSESSMENT_KEY}/subassessments/")));
    assert!(q.contains(&format!(
        "properties.additionalData.artifactDetails.digest) == \"{DIGEST}\""
    )));
    assert!(q.contains(&format!(
        "properties.additionalData.imageDigest) == \"{DIGEST}\""
    )));
    assert!(q.contains("| project id, "));
    assert!(q.trim_end().ends_with("| order by id asc"));
    // Only a validated digest can be embedded, so no quote can break out.
    assert!(Digest::parse("sha256:\" or 1==1 //").is_err());
}

/// Queries the real Resource Graph with the developer's Azure login
/// (`az login`), for a digest given in `GANTRY_TEST_DIGEST` (or a digest nobody
/// pushed, which must come back pending).
#[tokio::test]
#[ignore = "needs Azure login and GANTRY_TEST_SUBSCRIPTION"]
async fn live_resource_graph() -> Result<()> {
    let subscription = std::env::var("GANTRY_TEST_SUBSCRIPTION")
        .context("set GANTRY_TEST_SUBSCRIPTION to a subscription id")?;
    let credential = azure_identity::DeveloperToolsCredential::new(None)?;
    let graph = ResourceGraph::new(
        "https://management.azure.com",
        credential,
        reqwest::Client::new(),
    )?;
    let unknown = Digest::parse(&format!("sha256:{}", "0".repeat(64)))?;
    assert_eq!(
        graph
            .findings(std::slice::from_ref(&subscription), &unknown)
            .await?,
        None
    );
    if let Ok(d) = std::env::var("GANTRY_TEST_DIGEST") {
        let d = Digest::parse(&d)?;
        let found = graph.findings(&[subscription], &d).await?;
        eprintln!("{d}: {found:#?}");
    }
    Ok(())
}
