//! Defender for Containers findings, read from Azure Resource Graph.
//!
//! Defender for Containers (vulnerability assessment powered by Microsoft
//! Defender Vulnerability Management) publishes one *sub-assessment* per
//! vulnerability per image under the assessment
//! [`ASSESSMENT_KEY`] (`c0b7cfc6-3172-465a-b378-53c7ff2cc0d5`, "Azure registry
//! container images should have vulnerabilities resolved"). Resource Graph's
//! `securityresources` table holds them with type
//! `microsoft.security/assessments/subassessments`; their ids end in
//! `/providers/Microsoft.Security/assessments/{key}/subassessments/{id}`.
//!
//! # Shapes read
//!
//! `properties.id` is the vulnerability id and `properties.status` holds
//! `code` (`Healthy`, `Unhealthy`, `NotApplicable`) and `severity` (`Low`,
//! `Medium`, `High`: no `Critical` at this level). `properties.additionalData`
//! comes in two shapes, both read:
//!
//! - current (`assessedResourceType: AzureContainerRegistryVulnerability`):
//!   `artifactDetails.digest`, `vulnerabilityDetails.cveId` and
//!   `.severity` (which does say `Critical`), `softwareDetails.packageName`,
//!   `.version`, `.fixedVersion`, `.fixStatus` (`FixAvailable`, `NoFixAvailable`,
//!   `Scheduled`, `WontFix`, `Unknown`) and `.fixReference`;
//! - older (`assessedResourceType: ContainerRegistryVulnerability`):
//!   `imageDigest`, `cve: [{title, link}]`, `patchable`; no package details.
//!
//! # Decisions
//!
//! - **Zero rows is pending, never clean.** Defender takes hours to scan a new
//!   image, and a digest it has not scanned simply has no rows. Rows whose
//!   status is `Healthy` are not findings but do prove a scan happened, so rows
//!   that are all `Healthy` mean "scanned clean". Defender does not document
//!   that it always writes such rows for an image without vulnerabilities, so a
//!   clean image may show no rows at all: it then stays pending until
//!   `max_wait` and the gate fails closed. That is the safe failure; apps whose
//!   images are routinely clean can use the Trivy source instead.
//! - **Every non-`Healthy` row is a finding**, including `NotApplicable`
//!   (a disabled recommendation or a Defender exemption): exceptions are granted
//!   in gantry's allow-list, where they have a reason and an expiry, not by a
//!   switch elsewhere.
//! - **Severity** is the higher of `vulnerabilityDetails.severity` and
//!   `status.severity`, so neither spelling can lower it.
//! - **Fixed version**: `softwareDetails.fixedVersion` when not empty; otherwise,
//!   when `fixStatus` is `FixAvailable` (Defender reports fixes without a
//!   version) or the older `patchable` is true, the fix reference id or
//!   `"fix available"`. A fixable finding must never look unfixed, or
//!   `ignore_unfixed` would wave it through.
//! - **Ids**: `vulnerabilityDetails.cveId`, else one finding per entry of the
//!   older `cve` list (allow-list entries name CVEs), else `properties.id`.
//! - **Paging**: `$skipToken` is followed until absent; a truncated answer
//!   without one, or fewer rows than `totalRecords`, is an error: findings that
//!   may be incomplete must not pass a gate.

use std::fmt;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use azure_core::credentials::{AccessToken, TokenCredential};
use gantry_pipeline::Digest;
use gantry_pipeline::config::{ScanSource, SeverityLevel};
use reqwest::StatusCode;
use reqwest::header::{AUTHORIZATION, HeaderMap, HeaderValue, RETRY_AFTER};
use serde::Deserialize;
use serde_json::{Value, json};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;
use url::{Host, Url};

use crate::{Finding, Findings, ScanError, dedupe};

/// Entra ID scope for Azure Resource Manager (Resource Graph lives there).
pub const RESOURCE_GRAPH_SCOPE: &str = "https://management.azure.com/.default";

/// Resource Graph REST API version used.
pub const API_VERSION: &str = "2024-04-01";

/// Assessment key of Defender for Containers' registry image vulnerability
/// assessment (MDVM) for Azure registries.
pub const ASSESSMENT_KEY: &str = "c0b7cfc6-3172-465a-b378-53c7ff2cc0d5";

/// Rows asked for per page (Resource Graph's maximum).
const PAGE_SIZE: u32 = 1000;

/// More pages than this (100 000 findings for one image) is a runaway paging
/// loop, not an image.
const MAX_PAGES: usize = 100;

/// Default number of times one page is retried after `429 Too Many Requests`.
const DEFAULT_THROTTLE_RETRIES: u32 = 3;

/// Default longest wait honoured for one 429: a function invocation should not
/// sleep for minutes; past this the error is transient and the message retried.
const DEFAULT_MAX_RETRY_WAIT: Duration = Duration::from_secs(30);

/// Wait after a 429 that says nothing about when to come back.
const FALLBACK_RETRY_WAIT: Duration = Duration::from_secs(5);

/// Default per-request timeout.
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

/// A cached token is replaced this long before it expires.
const TOKEN_REFRESH_MARGIN: Duration = Duration::from_secs(300);

/// Reads Defender for Containers findings from Azure Resource Graph.
pub struct ResourceGraph {
    url: Url,
    credential: Arc<dyn TokenCredential>,
    cached: tokio::sync::Mutex<Option<AccessToken>>,
    http: reqwest::Client,
    timeout: Duration,
    throttle_retries: u32,
    max_retry_wait: Duration,
}

impl fmt::Debug for ResourceGraph {
    // Hand-written so a cached token can never reach a log line.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResourceGraph")
            .field("url", &self.url.as_str())
            .field("timeout", &self.timeout)
            .field("throttle_retries", &self.throttle_retries)
            .field("max_retry_wait", &self.max_retry_wait)
            .finish_non_exhaustive()
    }
}

impl ResourceGraph {
    /// A client for the Resource Graph at `endpoint` (`https://management.azure.com`,
    /// or `[scan.defender] endpoint`).
    ///
    /// Plain `http://` is accepted only for loopback hosts, so tests can use a
    /// local fake without a bearer token ever crossing a network in clear text.
    pub fn new(
        endpoint: &str,
        credential: Arc<dyn TokenCredential>,
        http: reqwest::Client,
    ) -> Result<Self, ScanError> {
        let invalid = |message: &str| ScanError::ConfigureResourceGraph {
            endpoint: endpoint.to_string(),
            message: message.to_string(),
        };
        let base = Url::parse(endpoint.trim()).map_err(|e| invalid(&e.to_string()))?;
        let loopback = match base.host() {
            Some(Host::Domain(d)) => d.eq_ignore_ascii_case("localhost"),
            Some(Host::Ipv4(ip)) => IpAddr::V4(ip).is_loopback(),
            Some(Host::Ipv6(ip)) => IpAddr::V6(ip).is_loopback(),
            None => return Err(invalid("no host")),
        };
        match base.scheme() {
            "https" => {}
            "http" if loopback => {}
            "http" => return Err(invalid("http is allowed only for loopback hosts")),
            _ => return Err(invalid("expected an https:// URL")),
        }
        if base.query().is_some() || base.fragment().is_some() || !base.username().is_empty() {
            return Err(invalid(
                "expected a bare endpoint without credentials, query or fragment",
            ));
        }
        let path = format!(
            "{}/providers/Microsoft.ResourceGraph/resources",
            base.path().trim_end_matches('/')
        );
        let mut url = base.clone();
        url.set_path(&path);
        url.query_pairs_mut()
            .append_pair("api-version", API_VERSION);
        Ok(ResourceGraph {
            url,
            credential,
            cached: tokio::sync::Mutex::new(None),
            http,
            timeout: DEFAULT_TIMEOUT,
            throttle_retries: DEFAULT_THROTTLE_RETRIES,
            max_retry_wait: DEFAULT_MAX_RETRY_WAIT,
        })
    }

    /// Sets the per-request timeout (default 30 s).
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Sets how often one page is retried after a 429 (default 3) and the
    /// longest `Retry-After` honoured by sleeping (default 30 s); beyond either
    /// the query fails with a transient error.
    pub fn with_throttle_retries(mut self, retries: u32, max_wait: Duration) -> Self {
        self.throttle_retries = retries;
        self.max_retry_wait = max_wait;
        self
    }

    /// The query URL (endpoint, path and `api-version`).
    pub fn url(&self) -> &Url {
        &self.url
    }

    /// Defender's findings for `digest` in `subscriptions` (all subscriptions
    /// the identity can read when empty).
    ///
    /// `Ok(None)` = Defender has not (yet) reported on this digest: PENDING,
    /// never clean. `Ok(Some)` with no findings = Defender reported on it and
    /// every row is `Healthy`. See the module documentation for how rows map to
    /// findings.
    pub async fn findings(
        &self,
        subscriptions: &[String],
        digest: &Digest,
    ) -> Result<Option<Findings>, ScanError> {
        let query = query_for(digest);
        let mut rows: Vec<Row> = Vec::new();
        let mut skip_token: Option<String> = None;
        let mut total_records: Option<u64> = None;
        for page_number in 1..=MAX_PAGES {
            let page = self
                .page(subscriptions, &query, skip_token.as_deref())
                .await?;
            if total_records.is_none() {
                total_records = page.total_records;
            }
            tracing::debug!(
                page = page_number,
                rows = page.data.len(),
                total = ?page.total_records,
                more = page.skip_token.is_some(),
                "resource graph page"
            );
            rows.extend(page.data);
            match page.skip_token.filter(|t| !t.is_empty()) {
                Some(next) => {
                    if skip_token.as_deref() == Some(next.as_str()) {
                        return Err(permanent(
                            None,
                            "Resource Graph returned the same $skipToken twice".into(),
                        ));
                    }
                    skip_token = Some(next);
                }
                None => {
                    if truthy(page.result_truncated.as_ref()) {
                        return Err(permanent(
                            None,
                            "Resource Graph truncated the result without a $skipToken; \
                             findings would be incomplete"
                                .into(),
                        ));
                    }
                    return collect(digest, rows, total_records);
                }
            }
        }
        Err(permanent(
            None,
            format!("more than {MAX_PAGES} pages of findings for {digest}"),
        ))
    }

    /// One page, retrying 429s as the service asks.
    async fn page(
        &self,
        subscriptions: &[String],
        query: &str,
        skip_token: Option<&str>,
    ) -> Result<Page, ScanError> {
        let mut options = json!({ "$top": PAGE_SIZE, "resultFormat": "objectArray" });
        if let Some(token) = skip_token {
            options["$skipToken"] = Value::String(token.to_string());
        }
        let mut body = json!({ "query": query, "options": options });
        if !subscriptions.is_empty() {
            body["subscriptions"] = json!(subscriptions);
        }
        let mut throttled = 0;
        loop {
            let (authorization, token) = self.authorization().await?;
            let response = self
                .http
                .post(self.url.clone())
                .timeout(self.timeout)
                .header(AUTHORIZATION, authorization)
                .json(&body)
                .send()
                .await
                .map_err(|e| ScanError::QueryResourceGraph {
                    status: None,
                    message: redact(&error_chain(&e), &token),
                    // Building the request is our bug; anything on the wire may pass.
                    transient: !e.is_builder(),
                })?;
            let status = response.status();
            if status == StatusCode::TOO_MANY_REQUESTS {
                let wait = retry_wait(response.headers());
                if throttled < self.throttle_retries && wait <= self.max_retry_wait {
                    throttled += 1;
                    tracing::warn!(
                        attempt = throttled,
                        wait_ms = wait.as_millis() as u64,
                        "Resource Graph throttled the query; waiting"
                    );
                    tokio::time::sleep(wait).await;
                    continue;
                }
                return Err(ScanError::QueryResourceGraph {
                    status: Some(status.as_u16()),
                    message: format!(
                        "throttled {} times; the service asked to wait {} s",
                        throttled + 1,
                        wait.as_secs()
                    ),
                    transient: true,
                });
            }
            let bytes = response
                .bytes()
                .await
                .map_err(|e| ScanError::QueryResourceGraph {
                    status: Some(status.as_u16()),
                    message: redact(
                        &format!("reading the response: {}", error_chain(&e)),
                        &token,
                    ),
                    transient: true,
                })?;
            if !status.is_success() {
                if status == StatusCode::UNAUTHORIZED {
                    // Never reuse a token the service refused.
                    *self.cached.lock().await = None;
                }
                let transient = status.is_server_error() || status == StatusCode::REQUEST_TIMEOUT;
                return Err(ScanError::QueryResourceGraph {
                    status: Some(status.as_u16()),
                    message: redact(&azure_error(&bytes), &token),
                    transient,
                });
            }
            return serde_json::from_slice::<Page>(&bytes).map_err(|e| {
                permanent(
                    Some(status.as_u16()),
                    format!(
                        "unexpected response body at line {}, column {}: {}",
                        e.line(),
                        e.column(),
                        e.to_string().split(" at line ").next().unwrap_or_default()
                    ),
                )
            });
        }
    }

    /// The bearer header and the token it carries (to scrub from error text).
    async fn authorization(&self) -> Result<(HeaderValue, String), ScanError> {
        let mut cached = self.cached.lock().await;
        let fresh = cached
            .as_ref()
            .is_some_and(|t| t.expires_on > OffsetDateTime::now_utc() + TOKEN_REFRESH_MARGIN);
        if !fresh {
            let token = self
                .credential
                .get_token(&[RESOURCE_GRAPH_SCOPE], None)
                .await
                .map_err(|e| ScanError::AuthenticateResourceGraph {
                    message: e.to_string(),
                })?;
            *cached = Some(token);
        }
        let token = cached
            .as_ref()
            .map(|t| t.token.secret().to_string())
            .unwrap_or_default();
        let mut value = HeaderValue::from_str(&format!("Bearer {token}")).map_err(|_| {
            ScanError::AuthenticateResourceGraph {
                message: "the token is not a valid header value".into(),
            }
        })?;
        value.set_sensitive(true);
        Ok((value, token))
    }
}

/// Turns all rows into findings: none at all is pending (`None`).
fn collect(
    digest: &Digest,
    rows: Vec<Row>,
    total_records: Option<u64>,
) -> Result<Option<Findings>, ScanError> {
    if let Some(total) = total_records
        && (rows.len() as u64) < total
    {
        // Data changed between pages (Defender rescans daily): ask again.
        return Err(ScanError::QueryResourceGraph {
            status: None,
            message: format!(
                "received {} of {total} rows across pages; findings would be incomplete",
                rows.len()
            ),
            transient: true,
        });
    }
    if rows.is_empty() {
        tracing::info!(%digest, "Defender has no assessment for this digest yet");
        return Ok(None);
    }
    let scanned_at = rows
        .iter()
        .filter_map(|r| nonempty(r.time_generated.as_deref()))
        .filter_map(|t| OffsetDateTime::parse(t, &Rfc3339).ok())
        .max()
        .and_then(|t| t.format(&Rfc3339).ok());
    let findings = rows
        .iter()
        .filter(|r| {
            !nonempty(r.status_code.as_deref()).is_some_and(|c| c.eq_ignore_ascii_case("healthy"))
        })
        .flat_map(row_findings)
        .collect();
    Ok(Some(Findings {
        source: ScanSource::Defender,
        findings: dedupe(findings),
        scanned_at,
    }))
}

/// The KQL that selects Defender's sub-assessments for `digest`.
///
/// The digest is embedded in a string literal. That is safe only because a
/// [`Digest`] is validated as `sha256:` and 64 lowercase hex digits: it cannot
/// hold a quote, backslash or pipe. The result projects `id` (a string column,
/// which Resource Graph needs to page) and is ordered by it, so pages are stable.
pub fn query_for(digest: &Digest) -> String {
    let d = digest.as_str();
    format!(
        "securityresources\n\
         | where type == \"microsoft.security/assessments/subassessments\"\n\
         | where id contains \"/providers/Microsoft.Security/assessments/{ASSESSMENT_KEY}/subassessments/\"\n\
         | where tostring(properties.additionalData.artifactDetails.digest) == \"{d}\" \
         or tostring(properties.additionalData.imageDigest) == \"{d}\"\n\
         | project id, vulnId = tostring(properties.id), \
         statusCode = tostring(properties.status.code), \
         statusSeverity = tostring(properties.status.severity), \
         displayName = tostring(properties.displayName), \
         timeGenerated = tostring(properties.timeGenerated), \
         additionalData = properties.additionalData\n\
         | order by id asc"
    )
}

/// One Resource Graph answer (`resultFormat: objectArray`).
#[derive(Deserialize)]
struct Page {
    #[serde(default)]
    data: Vec<Row>,
    #[serde(rename = "$skipToken", default)]
    skip_token: Option<String>,
    #[serde(rename = "resultTruncated", default)]
    result_truncated: Option<Value>,
    #[serde(rename = "totalRecords", default)]
    total_records: Option<u64>,
}

/// One projected sub-assessment row (columns of [`query_for`]). `tostring()`
/// of a missing property is `""`, so empty strings mean "absent".
#[derive(Deserialize)]
struct Row {
    #[serde(default)]
    id: Option<String>,
    #[serde(rename = "vulnId", default)]
    vuln_id: Option<String>,
    #[serde(rename = "statusCode", default)]
    status_code: Option<String>,
    #[serde(rename = "statusSeverity", default)]
    status_severity: Option<String>,
    #[serde(rename = "displayName", default)]
    display_name: Option<String>,
    #[serde(rename = "timeGenerated", default)]
    time_generated: Option<String>,
    #[serde(rename = "additionalData", default)]
    additional_data: Option<Value>,
}

/// The findings one non-healthy row stands for (one per CVE it names).
fn row_findings(row: &Row) -> Vec<Finding> {
    let empty = Value::Null;
    let data = row.additional_data.as_ref().unwrap_or(&empty);
    let text = |pointer: &str| {
        pointer_ci(data, pointer)
            .and_then(Value::as_str)
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(str::to_string)
    };

    let ids: Vec<String> = if let Some(cve) = text("/vulnerabilityDetails/cveId") {
        vec![cve]
    } else {
        let listed: Vec<String> = pointer_ci(data, "/cve")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter_map(|c| pointer_ci(c, "/title").and_then(Value::as_str))
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(str::to_string)
            .collect();
        if listed.is_empty() {
            let fallback = nonempty(row.vuln_id.as_deref())
                .or(nonempty(row.display_name.as_deref()))
                .or(nonempty(row.id.as_deref()))
                .unwrap_or("unknown");
            vec![fallback.to_string()]
        } else {
            listed
        }
    };

    let severity = [
        text("/vulnerabilityDetails/severity"),
        nonempty(row.status_severity.as_deref()).map(str::to_string),
    ]
    .into_iter()
    .flatten()
    .map(|s| SeverityLevel::parse_lenient(&s))
    .max()
    .unwrap_or(SeverityLevel::Unknown);

    let fix_available = text("/softwareDetails/fixStatus")
        .is_some_and(|s| s.eq_ignore_ascii_case("FixAvailable"))
        || pointer_ci(data, "/patchable").and_then(Value::as_bool) == Some(true);
    let fixed_version = text("/softwareDetails/fixedVersion").or_else(|| {
        fix_available.then(|| {
            text("/softwareDetails/fixReference/id")
                .or_else(|| text("/softwareDetails/fixReference/ID"))
                .unwrap_or_else(|| "fix available".to_string())
        })
    });

    let package = text("/softwareDetails/packageName").unwrap_or_else(|| "unknown".into());
    let installed_version = text("/softwareDetails/version").unwrap_or_default();
    // In the current shape displayName repeats the CVE id; only a real title is kept.
    let title = nonempty(row.display_name.as_deref())
        .filter(|t| !ids.iter().any(|id| id.eq_ignore_ascii_case(t)))
        .map(str::to_string);

    ids.into_iter()
        .map(|id| Finding {
            id,
            package: package.clone(),
            installed_version: installed_version.clone(),
            fixed_version: fixed_version.clone(),
            severity,
            title: title.clone(),
        })
        .collect()
}

/// A sub-assessment as Defender exports it outside Resource Graph (workflow
/// automation, continuous export): the fields [`query_for`] projects, read by
/// the caller from `properties` in whatever casing they came.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SubAssessmentFields<'a> {
    /// ARM id of the sub-assessment.
    pub id: Option<&'a str>,
    /// `properties.id`: the vulnerability id.
    pub vuln_id: Option<&'a str>,
    /// `properties.status.code`: `Healthy`, `Unhealthy`, `NotApplicable`.
    pub status_code: Option<&'a str>,
    /// `properties.status.severity`.
    pub status_severity: Option<&'a str>,
    /// `properties.displayName`.
    pub display_name: Option<&'a str>,
    /// `properties.additionalData` (read case-insensitively).
    pub additional_data: Option<&'a Value>,
}

/// The findings one exported sub-assessment stands for, mapped exactly as the
/// scan gate maps Resource Graph rows (ids, severity as the higher of both
/// spellings, fixed versions); empty when its status is `Healthy`.
pub fn sub_assessment_findings(fields: &SubAssessmentFields<'_>) -> Vec<Finding> {
    if nonempty(fields.status_code).is_some_and(|c| c.eq_ignore_ascii_case("healthy")) {
        return Vec::new();
    }
    let own = |s: Option<&str>| s.map(str::to_string);
    row_findings(&Row {
        id: own(fields.id),
        vuln_id: own(fields.vuln_id),
        status_code: own(fields.status_code),
        status_severity: own(fields.status_severity),
        display_name: own(fields.display_name),
        time_generated: None,
        additional_data: fields.additional_data.cloned(),
    })
}

/// `Value::pointer` with object keys matched case-insensitively (Resource
/// Graph answers in camelCase; exports also come in PascalCase). Among keys
/// differing only in case, an exact match wins.
fn pointer_ci<'a>(value: &'a Value, pointer: &str) -> Option<&'a Value> {
    let mut current = value;
    for token in pointer.split('/').skip(1) {
        let map = current.as_object()?;
        current = map.get(token).or_else(|| {
            map.iter()
                .find(|(k, _)| k.eq_ignore_ascii_case(token))
                .map(|(_, v)| v)
        })?;
    }
    Some(current)
}

fn nonempty(s: Option<&str>) -> Option<&str> {
    s.map(str::trim).filter(|s| !s.is_empty())
}

/// `resultTruncated` is documented as a boolean and sent as the string `"true"`.
fn truthy(v: Option<&Value>) -> bool {
    match v {
        Some(Value::Bool(b)) => *b,
        Some(Value::String(s)) => s.eq_ignore_ascii_case("true"),
        _ => false,
    }
}

/// How long a 429 asks to wait: `Retry-After` seconds, else Resource Graph's
/// `x-ms-user-quota-resets-after` (`hh:mm:ss`), else a short default.
fn retry_wait(headers: &HeaderMap) -> Duration {
    let header = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::trim)
    };
    if let Some(secs) = header(RETRY_AFTER.as_str()).and_then(|v| v.parse::<u64>().ok()) {
        return Duration::from_secs(secs);
    }
    if let Some(resets) = header("x-ms-user-quota-resets-after") {
        let parts: Vec<u64> = resets
            .split(':')
            .filter_map(|p| p.split('.').next()?.parse().ok())
            .collect();
        if let [h, m, s] = parts[..] {
            return Duration::from_secs(h * 3600 + m * 60 + s);
        }
    }
    FALLBACK_RETRY_WAIT
}

/// `Code: message` from an ARM error body (`{"error": {"code", "message"}}`),
/// else the start of the body on one line.
fn azure_error(body: &[u8]) -> String {
    if let Ok(v) = serde_json::from_slice::<Value>(body) {
        let code = v.pointer("/error/code").and_then(Value::as_str);
        let message = v.pointer("/error/message").and_then(Value::as_str);
        if code.is_some() || message.is_some() {
            let text = format!("{}: {}", code.unwrap_or("Error"), message.unwrap_or(""));
            return text.chars().take(500).collect();
        }
    }
    let text = String::from_utf8_lossy(body);
    let one_line = text.split_whitespace().collect::<Vec<_>>().join(" ");
    if one_line.is_empty() {
        "no error body".to_string()
    } else {
        one_line.chars().take(300).collect()
    }
}

fn permanent(status: Option<u16>, message: String) -> ScanError {
    ScanError::QueryResourceGraph {
        status,
        message,
        transient: false,
    }
}

fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// Removes the bearer token from text that came from elsewhere (a server or
/// proxy may echo the request).
fn redact(text: &str, token: &str) -> String {
    if token.len() < 8 {
        return text.to_string();
    }
    text.replace(token, "[redacted]")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(additional: Value) -> Row {
        Row {
            id: Some("/subscriptions/s/x".into()),
            vuln_id: Some("CVE-2024-0001".into()),
            status_code: Some("Unhealthy".into()),
            status_severity: Some("High".into()),
            display_name: Some("CVE-2024-0001".into()),
            time_generated: None,
            additional_data: Some(additional),
        }
    }

    #[test]
    fn current_shape_maps_fields() {
        let f = row_findings(&row(json!({
            "assessedResourceType": "AzureContainerRegistryVulnerability",
            "vulnerabilityDetails": {"cveId": "CVE-2024-0001", "severity": "Critical"},
            "softwareDetails": {"packageName": "openssl", "version": "3.0.2", "fixedVersion": "3.0.13", "fixStatus": "FixAvailable"}
        })));
        assert_eq!(f.len(), 1);
        assert_eq!(f[0].id, "CVE-2024-0001");
        assert_eq!(f[0].severity, SeverityLevel::Critical);
        assert_eq!(f[0].package, "openssl");
        assert_eq!(f[0].fixed_version.as_deref(), Some("3.0.13"));
        assert_eq!(f[0].title, None);
    }

    #[test]
    fn fix_available_without_version_is_not_unfixed() {
        let f = row_findings(&row(json!({
            "vulnerabilityDetails": {"cveId": "CVE-1", "severity": "High"},
            "softwareDetails": {"packageName": "py", "version": "1.11.0.0", "fixedVersion": "", "fixStatus": "FixAvailable"}
        })));
        assert_eq!(f[0].fixed_version.as_deref(), Some("fix available"));
        let f = row_findings(&row(json!({
            "softwareDetails": {"packageName": "py", "fixedVersion": "", "fixStatus": "NoFixAvailable"}
        })));
        assert_eq!(f[0].fixed_version, None);
    }

    #[test]
    fn older_shape_gives_one_finding_per_cve() {
        let mut r = row(json!({
            "assessedResourceType": "ContainerRegistryVulnerability",
            "cve": [{"title": "CVE-2021-1", "link": "x"}, {"title": "CVE-2021-2", "link": "y"}],
            "patchable": true,
            "imageDigest": "sha256:00"
        }));
        r.vuln_id = Some("370361".into());
        r.display_name = Some("Debian Security Update for openssl".into());
        r.status_severity = Some("Medium".into());
        let f = row_findings(&r);
        assert_eq!(
            f.iter().map(|f| f.id.as_str()).collect::<Vec<_>>(),
            ["CVE-2021-1", "CVE-2021-2"]
        );
        assert_eq!(f[0].severity, SeverityLevel::Medium);
        assert_eq!(f[0].fixed_version.as_deref(), Some("fix available"));
        assert_eq!(
            f[0].title.as_deref(),
            Some("Debian Security Update for openssl")
        );
    }

    #[test]
    fn exported_sub_assessments_read_either_casing() {
        let pascal = json!({
            "AssessedResourceType": "AzureContainerRegistryVulnerability",
            "VulnerabilityDetails": {"CveId": "CVE-2024-0002", "Severity": "Critical"},
            "SoftwareDetails": {"PackageName": "zlib", "Version": "1.2", "FixedVersion": "1.3"}
        });
        let fields = SubAssessmentFields {
            status_code: Some("Unhealthy"),
            status_severity: Some("High"),
            additional_data: Some(&pascal),
            ..Default::default()
        };
        let f = sub_assessment_findings(&fields);
        assert_eq!(f.len(), 1);
        assert_eq!(f[0].id, "CVE-2024-0002");
        assert_eq!(f[0].severity, SeverityLevel::Critical);
        assert_eq!(f[0].package, "zlib");
        assert_eq!(f[0].fixed_version.as_deref(), Some("1.3"));
        let healthy = SubAssessmentFields {
            status_code: Some("healthy"),
            ..fields
        };
        assert!(sub_assessment_findings(&healthy).is_empty());
    }

    #[test]
    fn retry_wait_reads_headers() {
        let mut h = HeaderMap::new();
        assert_eq!(retry_wait(&h), FALLBACK_RETRY_WAIT);
        h.insert(
            "x-ms-user-quota-resets-after",
            HeaderValue::from_static("00:00:07"),
        );
        assert_eq!(retry_wait(&h), Duration::from_secs(7));
        h.insert(RETRY_AFTER, HeaderValue::from_static("2"));
        assert_eq!(retry_wait(&h), Duration::from_secs(2));
    }

    #[test]
    fn azure_error_bodies() {
        assert_eq!(
            azure_error(br#"{"error":{"code":"BadRequest","message":"Query is invalid"}}"#),
            "BadRequest: Query is invalid"
        );
        assert_eq!(
            azure_error(b"  <html>\n oops </html>"),
            "<html> oops </html>"
        );
        assert_eq!(azure_error(b""), "no error body");
    }
}
