//! Azure Blob Storage through the official `azure_storage_blob` SDK.
//!
//! Two ways in, chosen by the shape of the setting:
//!
//! * a blob service URL (`https://acct.blob.core.windows.net`) with a
//!   [`TokenCredential`]: the managed identity in Azure, a developer login on a
//!   laptop. No secret is configured anywhere.
//! * a storage connection string (`AccountName=…;AccountKey=…` or
//!   `UseDevelopmentStorage=true`): Azurite and local tools. The SDK has no
//!   shared-key signing, so the store signs an **account SAS** itself with the key
//!   and puts it on every request (a pipeline policy that re-signs it before it
//!   expires).
//!
//! The SDK's own retries are off. A retried conditional write is ambiguous — a
//! create whose first attempt succeeded but whose response was lost comes back as
//! 409 on the retry and would look like a lost race — and retries hide failures
//! in tests as long hangs. Instead every error says whether it is transient and
//! the caller (in Azure: the Functions host redelivering the message) retries
//! the whole read-modify-write.

use std::fmt;
use std::net::IpAddr;
use std::sync::{Arc, Mutex as StdMutex};
use std::time::Duration;

use async_trait::async_trait;
use azure_core::credentials::TokenCredential;
use azure_core::error::ErrorKind;
use azure_core::http::policies::{Policy, PolicyResult};
use azure_core::http::{ClientOptions, Context, Request, RequestContent, RetryOptions, Url};
use azure_storage_blob::models::{
    AppendBlobClientCreateOptions, BlobContainerClientListBlobsOptions,
    BlockBlobClientUploadOptions,
};
use azure_storage_blob::{BlobContainerClient, BlobContainerClientOptions};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use futures::TryStreamExt as _;
use hmac::{Hmac, KeyInit as _, Mac as _};
use sha2::Sha256;
use time::OffsetDateTime;

use crate::{Etag, Page, StateStore, StoreError, Versioned, validate_name};

/// Azurite's well-known development account (`UseDevelopmentStorage=true`).
const DEV_ACCOUNT: &str = "devstoreaccount1";
/// Azurite's published development key; it protects nothing but the emulator.
const DEV_KEY: &str =
    "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==";
/// Azurite's default blob endpoint.
const DEV_ENDPOINT: &str = "http://127.0.0.1:10000/devstoreaccount1";

/// The SAS version we sign with. 2020-12-06 or later uses the string-to-sign
/// with the trailing encryption-scope line; 2022-11-02 is accepted by Azure and
/// by Azurite 3.35.
const SAS_VERSION: &str = "2022-11-02";
/// Account SAS permissions, in the order the service requires: read, write,
/// delete, list, add (append block), create. Nothing else is needed.
const SAS_PERMISSIONS: &str = "rwdlac";
/// How long a signed SAS is valid.
const SAS_LIFETIME: time::Duration = time::Duration::days(1);
/// A SAS is re-signed when less than this is left, so a long-running `gantry
/// dev` never sends an expired one.
const SAS_REFRESH_BEFORE: time::Duration = time::Duration::hours(1);
/// Back-dates the SAS start to tolerate clock skew between us and the service.
const SAS_CLOCK_SKEW: time::Duration = time::Duration::minutes(5);

/// Most names one `list` page can return (the service's own limit).
const MAX_PAGE: u32 = 5000;
/// Default bound on one operation, so a stalled connection becomes a transient
/// error instead of a function that hangs until the host kills it.
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(60);

/// An ETag-guarded blob store in one Azure Blob Storage container.
///
/// Cheap to clone: clones share one HTTP pipeline.
#[derive(Clone)]
pub struct BlobStore {
    container: Arc<BlobContainerClient>,
    container_name: String,
    /// Strings that must never appear in an error message (the account key).
    secrets: Arc<[String]>,
    timeout: Duration,
}

/// Where and how to connect, parsed from the setting.
enum Target {
    /// Service URL plus Entra ID token credential.
    Token(Url),
    /// Service URL plus a SAS added to every request.
    Sas { endpoint: Url, source: SasSource },
}

impl fmt::Debug for BlobStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The URL carries no secret (the SAS is added per request), but keep the
        // output short and stable.
        f.debug_struct("BlobStore")
            .field("container", &self.container_name)
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

impl BlobStore {
    /// Connects to `container` in the account named by `setting`.
    ///
    /// `setting` is either a blob service URL (then `credential` is required: in
    /// Azure the Function App's managed identity) or a storage connection string
    /// (`AccountName`/`AccountKey`, optional `BlobEndpoint`, `EndpointSuffix`,
    /// `DefaultEndpointsProtocol`; `UseDevelopmentStorage=true`; or a ready
    /// `SharedAccessSignature`). With an account key the store signs an account SAS
    /// (blob service; service, container and object resources; `rwdlac`; valid
    /// one day, re-signed an hour before it expires). Plain `http` is accepted
    /// only for loopback endpoints, so a key-signed SAS never crosses a network in
    /// clear text.
    ///
    /// No request is made; errors show up on the first operation. Error messages
    /// never contain the key or a SAS.
    pub fn connect(
        setting: &str,
        container: &str,
        credential: Option<Arc<dyn TokenCredential>>,
    ) -> Result<BlobStore, StoreError> {
        validate_container(container)?;
        let setting = setting.trim();
        let (target, secrets) = if setting.starts_with("https://") || setting.starts_with("http://")
        {
            (Target::Token(parse_service_url(setting)?), Vec::new())
        } else {
            parse_connection_string(setting)?
        };

        let mut client_options = ClientOptions {
            retry: RetryOptions::none(),
            ..Default::default()
        };
        let (endpoint, credential) = match target {
            Target::Token(endpoint) => {
                let Some(credential) = credential else {
                    return Err(open_error(
                        "a blob service URL needs a token credential (managed identity); \
                         for a key use a connection string",
                    ));
                };
                (endpoint, Some(credential))
            }
            Target::Sas { endpoint, source } => {
                client_options.per_try_policies = vec![Arc::new(SasPolicy { source })];
                (endpoint, None)
            }
        };

        let mut container_url = endpoint;
        container_url
            .path_segments_mut()
            .map_err(|()| open_error("the blob endpoint cannot carry a path"))?
            .pop_if_empty()
            .push(container);
        let options = BlobContainerClientOptions {
            client_options,
            ..Default::default()
        };
        let secrets: Arc<[String]> = secrets.into();
        let client = BlobContainerClient::new(container_url, credential, Some(options))
            .map_err(|e| open_error(redact(&describe(&e), &secrets)))?;
        Ok(BlobStore {
            container: Arc::new(client),
            container_name: container.to_string(),
            secrets,
            timeout: DEFAULT_TIMEOUT,
        })
    }

    /// Bounds every operation by `timeout` instead of the default 60 s; an
    /// operation that takes longer fails with a transient error.
    pub fn with_timeout(mut self, timeout: Duration) -> BlobStore {
        self.timeout = timeout;
        self
    }

    /// The container this store reads and writes.
    pub fn container_name(&self) -> &str {
        &self.container_name
    }

    /// Creates the container if it does not exist.
    ///
    /// Only for Azurite and `gantry dev`: in Azure the container is created by the
    /// infrastructure templates and the Function App's identity holds only *Storage
    /// Blob Data Contributor*, which cannot create containers — so production code
    /// must not call this.
    pub async fn ensure_container(&self) -> Result<(), StoreError> {
        let result = self.bounded(self.container.create(None)).await;
        match result {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) if status_of(&e) == Some(409) => Ok(()),
            Ok(Err(e)) => Err(open_error(format!(
                "creating container {}: {}",
                self.container_name,
                self.message(&e)
            ))),
            Err(elapsed) => Err(open_error(format!(
                "creating container {}: {elapsed}",
                self.container_name
            ))),
        }
    }

    /// Runs `fut` under the operation timeout.
    async fn bounded<T>(&self, fut: impl Future<Output = T>) -> Result<T, String> {
        tokio::time::timeout(self.timeout, fut)
            .await
            .map_err(|_| format!("timed out after {} s", self.timeout.as_secs()))
    }

    /// A credential-free description of an SDK error.
    fn message(&self, e: &azure_core::Error) -> String {
        redact(&describe(e), &self.secrets)
    }
}

// ---------------------------------------------------------------------------
// Settings

fn open_error(message: impl Into<String>) -> StoreError {
    StoreError::Open {
        message: message.into(),
    }
}

/// Container names: 3–63 of `[a-z0-9-]`, starting with a letter or digit, no
/// `--`. Checked here so a typo fails at start-up with a clear message rather
/// than as a 400 on the first request.
fn validate_container(name: &str) -> Result<(), StoreError> {
    let ok = (3..=63).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-')
        && !name.ends_with('-')
        && !name.contains("--");
    if ok {
        Ok(())
    } else {
        Err(open_error(format!(
            "invalid container name {name:?}: 3-63 of [a-z0-9-], no leading, trailing or double hyphen"
        )))
    }
}

fn parse_service_url(setting: &str) -> Result<Url, StoreError> {
    let url = Url::parse(setting)
        .map_err(|e| open_error(format!("the blob service URL does not parse: {e}")))?;
    if url.query().is_some() || url.fragment().is_some() {
        // Likely a SAS URL. Echoing it would leak the signature, and a SAS belongs
        // in a connection string (SharedAccessSignature=…) anyway.
        return Err(open_error(
            "the blob service URL must not carry a query string; \
             put a SAS in a connection string instead",
        ));
    }
    if url.host().is_none() {
        return Err(open_error("the blob service URL has no host"));
    }
    Ok(url)
}

/// Whether `url` points at this machine, the only place plain HTTP is allowed.
fn is_loopback(url: &Url) -> bool {
    match url.host() {
        Some(url::Host::Ipv4(ip)) => ip.is_loopback(),
        Some(url::Host::Ipv6(ip)) => ip.is_loopback(),
        Some(url::Host::Domain(d)) => {
            d.eq_ignore_ascii_case("localhost")
                || d.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
        }
        None => false,
    }
}

/// Parses a storage connection string. Keys are case-insensitive; values keep
/// their case and may contain `=` (base64 padding), so each pair splits at the
/// first `=` only. Messages name the missing or bad key, never a value.
fn parse_connection_string(setting: &str) -> Result<(Target, Vec<String>), StoreError> {
    let mut fields = std::collections::HashMap::new();
    for part in setting.split(';').map(str::trim).filter(|p| !p.is_empty()) {
        let Some((key, value)) = part.split_once('=') else {
            return Err(open_error(
                "the storage setting is neither a blob service URL nor a connection string \
                 (Key=Value pairs separated by ';')",
            ));
        };
        fields.insert(key.trim().to_ascii_lowercase(), value.trim().to_string());
    }
    let field = |k: &str| fields.get(k).filter(|v| !v.is_empty()).cloned();

    let dev = field("usedevelopmentstorage").is_some_and(|v| v.eq_ignore_ascii_case("true"));
    let (account, key) = if dev {
        (Some(DEV_ACCOUNT.to_string()), Some(DEV_KEY.to_string()))
    } else {
        (field("accountname"), field("accountkey"))
    };
    let sas = field("sharedaccesssignature");

    let endpoint = match field("blobendpoint") {
        Some(endpoint) => endpoint,
        None if dev => DEV_ENDPOINT.to_string(),
        None => {
            let Some(account) = &account else {
                return Err(open_error(
                    "the connection string has neither BlobEndpoint nor AccountName",
                ));
            };
            let protocol = field("defaultendpointsprotocol").unwrap_or_else(|| "https".into());
            let suffix = field("endpointsuffix").unwrap_or_else(|| "core.windows.net".into());
            format!("{protocol}://{account}.blob.{suffix}")
        }
    };
    let endpoint = Url::parse(&endpoint)
        .map_err(|e| open_error(format!("BlobEndpoint does not parse: {e}")))?;
    if endpoint.query().is_some() {
        return Err(open_error("BlobEndpoint must not carry a query string"));
    }
    let loopback = is_loopback(&endpoint);
    match endpoint.scheme() {
        "https" => {}
        "http" if loopback => {}
        "http" => {
            return Err(open_error(
                "plain http is allowed only for loopback endpoints (Azurite); use https",
            ));
        }
        _ => return Err(open_error("BlobEndpoint must be an http(s) URL")),
    }

    let mut secrets = Vec::new();
    let source = match (key, sas) {
        (Some(key), _) => {
            let Some(account) = account else {
                return Err(open_error(
                    "the connection string has AccountKey but no AccountName",
                ));
            };
            let key_bytes = BASE64.decode(key.as_bytes()).map_err(|_| {
                open_error("AccountKey in the connection string is not valid base64")
            })?;
            secrets.push(key);
            SasSource::Account(AccountSigner {
                account,
                key: key_bytes,
                allow_http: loopback,
                cached: StdMutex::new(None),
            })
        }
        (None, Some(sas)) => {
            let sas = sas.trim_start_matches('?').to_string();
            secrets.push(sas.clone());
            SasSource::Static(sas)
        }
        (None, None) => {
            return Err(open_error(
                "the connection string has neither AccountKey nor SharedAccessSignature",
            ));
        }
    };
    Ok((Target::Sas { endpoint, source }, secrets))
}

// ---------------------------------------------------------------------------
// SAS

/// Adds a SAS to every request's query string.
///
/// A pipeline policy rather than a SAS baked into the client's URL, so that an
/// account-key SAS can be re-signed when it nears expiry without rebuilding the
/// client.
#[derive(Debug)]
struct SasPolicy {
    source: SasSource,
}

/// Where the SAS comes from. `Debug` is written by hand: a SAS is a credential.
enum SasSource {
    /// Given ready-made in the connection string; used as is.
    Static(String),
    /// Signed by us with the account key.
    Account(AccountSigner),
}

impl fmt::Debug for SasSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SasSource::Static(_) => f.write_str("Static(***)"),
            SasSource::Account(signer) => f.debug_tuple("Account").field(signer).finish(),
        }
    }
}

/// Signs account SAS tokens with the account key and caches the current one.
struct AccountSigner {
    account: String,
    key: Vec<u8>,
    allow_http: bool,
    cached: StdMutex<Option<(String, OffsetDateTime)>>,
}

impl fmt::Debug for AccountSigner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AccountSigner")
            .field("account", &self.account)
            .field("key", &"<redacted>")
            .finish_non_exhaustive()
    }
}

impl AccountSigner {
    /// The current token, re-signed when it is close to expiry.
    fn token(&self) -> String {
        let now = OffsetDateTime::now_utc();
        let mut cached = self
            .cached
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let fresh = cached
            .as_ref()
            .filter(|(_, expiry)| *expiry - now > SAS_REFRESH_BEFORE);
        if let Some((token, _)) = fresh {
            return token.clone();
        }
        let expiry = now + SAS_LIFETIME;
        let token = account_sas(
            &self.account,
            &self.key,
            now - SAS_CLOCK_SKEW,
            expiry,
            self.allow_http,
        );
        *cached = Some((token.clone(), expiry));
        token
    }
}

/// Formats a SAS time: ISO 8601 UTC to the second, as the service expects.
fn sas_time(t: OffsetDateTime) -> String {
    let t = t.to_offset(time::UtcOffset::UTC);
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}Z",
        t.year(),
        u8::from(t.month()),
        t.day(),
        t.hour(),
        t.minute(),
        t.second()
    )
}

/// Signs an account SAS for the blob service and returns it as a query string.
///
/// The string-to-sign is the 2020-12-06+ layout: account, permissions, services,
/// resource types, start, expiry, IP range (empty), protocol, version and the
/// encryption scope (empty), each followed by a newline.
fn account_sas(
    account: &str,
    key: &[u8],
    start: OffsetDateTime,
    expiry: OffsetDateTime,
    allow_http: bool,
) -> String {
    let (services, resource_types) = ("b", "sco");
    let protocol = if allow_http { "https,http" } else { "https" };
    let (st, se) = (sas_time(start), sas_time(expiry));
    let string_to_sign = format!(
        "{account}\n{SAS_PERMISSIONS}\n{services}\n{resource_types}\n{st}\n{se}\n\n{protocol}\n{SAS_VERSION}\n\n"
    );
    // HMAC accepts keys of any length, so this cannot fail; an empty signature
    // would only make the service answer 403.
    let signature = Hmac::<Sha256>::new_from_slice(key)
        .map(|mut mac| {
            mac.update(string_to_sign.as_bytes());
            BASE64.encode(mac.finalize().into_bytes())
        })
        .unwrap_or_default();
    url::form_urlencoded::Serializer::new(String::new())
        .append_pair("sv", SAS_VERSION)
        .append_pair("ss", services)
        .append_pair("srt", resource_types)
        .append_pair("sp", SAS_PERMISSIONS)
        .append_pair("st", &st)
        .append_pair("se", &se)
        .append_pair("spr", protocol)
        .append_pair("sig", &signature)
        .finish()
}

/// Appends `token` to `url`'s query, first dropping any parameter the token
/// sets, so that running the policy twice on one request (a retry) is harmless.
fn apply_sas(url: &mut Url, token: &str) {
    let keys: Vec<&str> = token
        .split('&')
        .filter_map(|pair| pair.split('=').next())
        .collect();
    let mut query: Vec<&str> = url
        .query()
        .unwrap_or_default()
        .split('&')
        .filter(|pair| !pair.is_empty())
        .filter(|pair| !keys.contains(&pair.split('=').next().unwrap_or_default()))
        .collect();
    query.push(token);
    let query = query.join("&");
    url.set_query(Some(&query));
}

#[async_trait]
impl Policy for SasPolicy {
    async fn send(
        &self,
        ctx: &Context,
        request: &mut Request,
        next: &[Arc<dyn Policy>],
    ) -> PolicyResult {
        let token = match &self.source {
            SasSource::Static(token) => token.clone(),
            SasSource::Account(signer) => signer.token(),
        };
        apply_sas(request.url_mut(), &token);
        match next.split_first() {
            Some((policy, rest)) => policy.send(ctx, request, rest).await,
            None => Err(azure_core::Error::with_message(
                ErrorKind::Other,
                "the SAS policy must not be the last in the pipeline",
            )),
        }
    }
}

// ---------------------------------------------------------------------------
// Errors

/// The HTTP status of a failed request, if it got that far.
fn status_of(e: &azure_core::Error) -> Option<u16> {
    e.http_status().map(u16::from)
}

/// The service's error code (`BlobNotFound`, `ContainerNotFound`, …).
fn error_code(e: &azure_core::Error) -> Option<&str> {
    match e.kind() {
        ErrorKind::HttpResponse { error_code, .. } => error_code.as_deref(),
        _ => None,
    }
}

/// Whether retrying may help: throttling, timeouts, server errors, a broken
/// connection, a token endpoint hiccup.
fn is_transient(e: &azure_core::Error) -> bool {
    match status_of(e) {
        // 401/403: an infrastructure fault (role assignment propagating, expired
        // SAS), not the caller's: retrying, and finally dead-lettering with a
        // record, beats acknowledging the event as if it were bad input.
        Some(status) => {
            status >= 500 || status == 408 || status == 429 || status == 401 || status == 403
        }
        None => matches!(
            e.kind(),
            ErrorKind::Io | ErrorKind::Connection | ErrorKind::Credential
        ),
    }
}

/// Describes an SDK error: status and service code for HTTP failures (the
/// response body adds nothing an operator needs), else the error and its sources.
fn describe(e: &azure_core::Error) -> String {
    if let Some(status) = status_of(e) {
        return match error_code(e) {
            Some(code) => format!("HTTP {status} {code}"),
            None => format!("HTTP {status}"),
        };
    }
    let mut message = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        let text = s.to_string();
        if !message.contains(&text) {
            message.push_str(": ");
            message.push_str(&text);
        }
        source = s.source();
    }
    message
}

/// Removes credentials from a message: the configured secrets and the value of
/// any `sig=` parameter (transport errors quote the request URL, SAS included).
fn redact(message: &str, secrets: &[String]) -> String {
    let mut out = message.to_string();
    for secret in secrets.iter().filter(|s| !s.is_empty()) {
        out = out.replace(secret.as_str(), "<redacted>");
    }
    let mut result = String::with_capacity(out.len());
    let mut rest = out.as_str();
    while let Some(at) = rest.find("sig=") {
        let (head, tail) = rest.split_at(at + "sig=".len());
        result.push_str(head);
        result.push_str("<redacted>");
        let end = tail
            .find(|c: char| c == '&' || c == ')' || c == '"' || c == '\'' || c.is_whitespace())
            .unwrap_or(tail.len());
        rest = &tail[end..];
    }
    result.push_str(rest);
    result
}

// ---------------------------------------------------------------------------
// The store

#[async_trait]
impl StateStore for BlobStore {
    async fn get(&self, name: &str) -> Result<Option<Versioned>, StoreError> {
        validate_name(name)?;
        let err = |message: String, transient| StoreError::Get {
            name: name.to_string(),
            message,
            transient,
        };
        let blob = self.container.blob_client(name);
        let read = async {
            let result = blob.download(None).await?;
            let etag = result.properties.etag.clone();
            let body = result.body.collect().await?;
            Ok::<_, azure_core::Error>((etag, body))
        };
        match self.bounded(read).await.map_err(|m| err(m, true))? {
            Ok((Some(etag), body)) => Ok(Some(Versioned {
                body: body.to_vec(),
                etag: Etag::new(etag.as_ref()),
            })),
            Ok((None, _)) => Err(err("the service returned no ETag".into(), true)),
            // A missing container is a configuration error, not an empty store.
            Err(e) if status_of(&e) == Some(404) && error_code(&e) != Some("ContainerNotFound") => {
                Ok(None)
            }
            Err(e) => Err(err(self.message(&e), is_transient(&e))),
        }
    }

    async fn create(&self, name: &str, body: &[u8]) -> Result<Etag, StoreError> {
        validate_name(name)?;
        let blob = self.container.blob_client(name);
        let options = BlockBlobClientUploadOptions::default().if_not_exists();
        let content = RequestContent::from(body.to_vec());
        let result = self.bounded(blob.upload(content, Some(options))).await;
        self.written(name, result, false)
    }

    async fn replace(&self, name: &str, body: &[u8], etag: &Etag) -> Result<Etag, StoreError> {
        validate_name(name)?;
        let blob = self.container.blob_client(name);
        let options = BlockBlobClientUploadOptions {
            // Quoted, as HTTP wants entity tags; Etag keeps them unquoted.
            if_match: Some(format!("\"{}\"", etag.as_str()).into()),
            ..Default::default()
        };
        let content = RequestContent::from(body.to_vec());
        let result = self.bounded(blob.upload(content, Some(options))).await;
        self.written(name, result, true)
    }

    async fn list(
        &self,
        prefix: &str,
        continuation: Option<&str>,
        max: u32,
    ) -> Result<Page, StoreError> {
        let err = |message: String, transient| StoreError::List {
            prefix: prefix.to_string(),
            message,
            transient,
        };
        let max = max.clamp(1, MAX_PAGE);
        let options = BlobContainerClientListBlobsOptions {
            prefix: (!prefix.is_empty()).then(|| prefix.to_string()),
            marker: continuation.map(str::to_string),
            // Clamped to 5000 above, so the conversion is lossless.
            maxresults: Some(i32::try_from(max).unwrap_or(5000)),
            ..Default::default()
        };
        let fetch = async {
            // The pager would follow markers forever; take just the first page and
            // hand its marker back to the caller.
            let mut pages = self.container.list_blobs(Some(options))?.into_pages();
            match pages.try_next().await? {
                Some(page) => page.into_model().map(Some),
                None => Ok(None),
            }
        };
        let page = match self.bounded(fetch).await.map_err(|m| err(m, true))? {
            Ok(page) => page,
            Err(e) => return Err(err(self.message(&e), is_transient(&e))),
        };
        let Some(page) = page else {
            return Ok(Page::default());
        };
        Ok(Page {
            names: page.blob_items.into_iter().filter_map(|b| b.name).collect(),
            next: page.next_marker.filter(|m| !m.is_empty()),
        })
    }

    async fn append(&self, name: &str, data: &[u8]) -> Result<(), StoreError> {
        validate_name(name)?;
        let err = |message: String, transient| StoreError::Append {
            name: name.to_string(),
            message,
            transient,
        };
        let blob = self.container.blob_client(name).append_blob_client();
        let len = data.len() as u64;
        let body = data;
        // An append blob commits each block atomically at the end, so concurrent
        // appenders never interleave. Appending first and creating only on 404
        // costs one request in the common case instead of two.
        let append = || blob.append_block(RequestContent::from(body.to_vec()), len, None);

        if !data.is_empty() {
            match self.bounded(append()).await.map_err(|m| err(m, true))? {
                Ok(_) => return Ok(()),
                Err(e) if status_of(&e) == Some(404) && error_code(&e) == Some("BlobNotFound") => {}
                Err(e) => return Err(err(self.message(&e), is_transient(&e))),
            }
        }
        let create = blob.create(Some(
            AppendBlobClientCreateOptions::default().if_not_exists(),
        ));
        match self.bounded(create).await.map_err(|m| err(m, true))? {
            // 409/412: another appender created it first, which is just as good.
            Ok(_) => {}
            Err(e) if matches!(status_of(&e), Some(409 | 412)) => {}
            Err(e) => return Err(err(self.message(&e), is_transient(&e))),
        }
        if data.is_empty() {
            return Ok(());
        }
        match self.bounded(append()).await.map_err(|m| err(m, true))? {
            Ok(_) => Ok(()),
            Err(e) => Err(err(self.message(&e), is_transient(&e))),
        }
    }
}

impl BlobStore {
    /// Maps the outcome of a conditional upload. 409 (exists) and 412 (ETag
    /// changed) are lost races; so is 404 on a replace, when the blob was deleted
    /// since it was read — unless the container itself is missing.
    fn written(
        &self,
        name: &str,
        result: Result<
            azure_core::Result<azure_storage_blob::models::BlockBlobClientUploadResult>,
            String,
        >,
        is_replace: bool,
    ) -> Result<Etag, StoreError> {
        let err = |message: String, transient| StoreError::Put {
            name: name.to_string(),
            message,
            transient,
        };
        let conflict = || StoreError::Conflict {
            name: name.to_string(),
        };
        match result.map_err(|m| err(m, true))? {
            Ok(uploaded) => match uploaded.etag {
                Some(etag) => Ok(Etag::new(etag.as_ref())),
                None => Err(err("the service returned no ETag".into(), true)),
            },
            Err(e) => match status_of(&e) {
                Some(409 | 412) => Err(conflict()),
                Some(404) if is_replace && error_code(&e) != Some("ContainerNotFound") => {
                    Err(conflict())
                }
                _ => Err(err(self.message(&e), is_transient(&e))),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redacts_signatures_and_secrets() {
        let msg = "error sending request for url (http://h/c/b?sv=1&sig=abc%2Bdef&sp=r): key KEY";
        let out = redact(msg, &["KEY".to_string()]);
        assert_eq!(
            out,
            "error sending request for url (http://h/c/b?sv=1&sig=<redacted>&sp=r): key <redacted>"
        );
    }

    #[test]
    fn sas_is_idempotent_on_the_url() {
        let mut url = Url::parse("http://127.0.0.1/a/b?comp=list&prefix=x").expect("url");
        apply_sas(&mut url, "sv=1&sig=2");
        apply_sas(&mut url, "sv=1&sig=3");
        assert_eq!(url.query(), Some("comp=list&prefix=x&sv=1&sig=3"));
    }

    #[test]
    fn sas_time_format() {
        let t = OffsetDateTime::from_unix_timestamp(1_700_000_000).expect("time");
        assert_eq!(sas_time(t), "2023-11-14T22:13:20Z");
    }

    #[test]
    fn http_only_on_loopback() {
        let remote = "DefaultEndpointsProtocol=http;AccountName=a;AccountKey=a2V5;BlobEndpoint=http://10.1.2.3/a";
        assert!(matches!(
            BlobStore::connect(remote, "gantry", None),
            Err(StoreError::Open { .. })
        ));
        let local = "AccountName=a;AccountKey=a2V5;BlobEndpoint=http://localhost:10000/a";
        assert!(BlobStore::connect(local, "gantry", None).is_ok());
    }

    #[test]
    fn service_url_needs_a_credential() {
        let e = BlobStore::connect("https://acct.blob.core.windows.net", "gantry", None)
            .expect_err("no credential");
        assert!(matches!(e, StoreError::Open { .. }), "{e}");
    }

    #[test]
    fn sas_is_resigned_near_expiry() {
        let now = OffsetDateTime::now_utc();
        let signer = |expiry| AccountSigner {
            account: "a".into(),
            key: b"k".to_vec(),
            allow_http: false,
            cached: StdMutex::new(Some(("old".to_string(), expiry))),
        };
        assert_eq!(signer(now + time::Duration::hours(5)).token(), "old");
        let fresh = signer(now + time::Duration::minutes(30)).token();
        assert!(
            fresh.contains("sig=") && fresh.contains("spr=https&"),
            "{fresh}"
        );
    }

    /// A ready-made SAS in the connection string (`SharedAccessSignature=`) is
    /// used as is; Azurite checks the signature, so this also checks our signer.
    #[tokio::test]
    async fn static_sas_reaches_azurite() -> Result<(), Box<dyn std::error::Error>> {
        let azurite = gantry_testkit::Azurite::shared()?;
        let key = BASE64.decode(gantry_testkit::ACCOUNT_KEY)?;
        let now = OffsetDateTime::now_utc();
        let sas = account_sas(
            gantry_testkit::ACCOUNT,
            &key,
            now - SAS_CLOCK_SKEW,
            now + time::Duration::hours(1),
            true,
        );
        let setting = format!(
            "BlobEndpoint={};SharedAccessSignature=?{sas}",
            azurite.blob_endpoint()
        );
        let store = BlobStore::connect(&setting, &gantry_testkit::unique_name("sas"), None)?;
        store.ensure_container().await?;
        let etag = store.create("a/b.json", b"{}").await?;
        let got = store.get("a/b.json").await?.ok_or("missing")?;
        assert_eq!(got.etag, etag);
        store.append("a/log", b"x\n").await?;
        assert_eq!(
            store.list("a/", None, 10).await?.names,
            ["a/b.json", "a/log"]
        );
        Ok(())
    }

    #[test]
    fn rejects_bad_container_names() {
        for bad in ["ab", "Gantry", "-x-", "a--b", "a_b"] {
            assert!(
                BlobStore::connect("UseDevelopmentStorage=true", bad, None).is_err(),
                "{bad}"
            );
        }
    }
}
