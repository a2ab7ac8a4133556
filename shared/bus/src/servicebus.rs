//! Sending to Azure Service Bus over its REST API.
//!
//! One `POST {endpoint}/{queue}/messages` per message: broker properties
//! (`MessageId`, `SessionId`, `ScheduledEnqueueTimeUtc`) travel as JSON in the
//! `BrokerProperties` header, application properties as one header each with a
//! JSON-encoded value (a string arrives quoted, as the REST API expects), the body
//! as the request body. Service Bus answers `201 Created`.
//!
//! Authorisation is an Entra ID token (managed identity in Azure) when the
//! setting is a namespace, or a SAS token signed with the key of a connection
//! string (local use). The REST API was chosen over AMQP because gantry only
//! sends, and it runs on the HTTP stack the rest of gantry already uses.

use std::fmt;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use azure_core::credentials::{AccessToken, TokenCredential};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use hmac::{Hmac, KeyInit, Mac};
use reqwest::StatusCode;
use reqwest::header::{AUTHORIZATION, CONTENT_TYPE, HeaderName, HeaderValue};
use serde::Serialize;
use sha2::Sha256;
use time::OffsetDateTime;
use time::format_description::BorrowedFormatItem;
use time::macros::format_description;
use url::{Host, Url};

use crate::{BusError, MessageBus, OutMessage, validate};

/// The Entra ID scope for Service Bus data-plane access.
pub const SERVICE_BUS_SCOPE: &str = "https://servicebus.azure.net/.default";

/// How long a SAS token is valid. Each send signs a fresh one (an HMAC is cheap),
/// so this only needs to cover clock skew and a slow request.
const SAS_TOKEN_LIFETIME: Duration = Duration::from_secs(3600);

/// A cached Entra token is replaced this long before it expires, so a request
/// never leaves with a token that lapses in flight.
const TOKEN_REFRESH_MARGIN: Duration = Duration::from_secs(300);

/// Default per-request timeout; a send that takes longer is reported transient.
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

/// RFC 1123 dates as the REST API documents them (`Sun, 06 Nov 1994 08:49:37 GMT`).
const RFC1123: &[BorrowedFormatItem<'static>] = format_description!(
    "[weekday repr:short], [day] [month repr:short] [year] [hour]:[minute]:[second] GMT"
);

/// Longest wait for an Entra ID token (managed identity endpoint or developer login).
const TOKEN_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(20);

/// Sends gantry's messages to an Azure Service Bus namespace over REST.
pub struct ServiceBusRest {
    endpoint: Url,
    auth: Auth,
    http: reqwest::Client,
    timeout: Duration,
}

enum Auth {
    Entra {
        credential: Arc<dyn TokenCredential>,
        cached: tokio::sync::Mutex<Option<AccessToken>>,
    },
    Sas {
        key_name: String,
        key: String,
    },
}

impl fmt::Debug for ServiceBusRest {
    // Hand-written so the SAS key can never reach a log line.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let auth = match &self.auth {
            Auth::Entra { .. } => "entra-id".to_string(),
            Auth::Sas { key_name, .. } => format!("sas ({key_name})"),
        };
        f.debug_struct("ServiceBusRest")
            .field("endpoint", &self.endpoint.as_str())
            .field("auth", &auth)
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

impl ServiceBusRest {
    /// Builds a sender from `GANTRY_SERVICEBUS`.
    ///
    /// `setting` is either a fully-qualified namespace
    /// (`contoso.servicebus.windows.net`, authorised with `credential`, which is
    /// then required) or a SAS connection string
    /// (`Endpoint=sb://contoso.servicebus.windows.net/;SharedAccessKeyName=...;SharedAccessKey=...`).
    /// Plain `http://` endpoints are accepted only for loopback hosts, so tests can
    /// point the sender at a local fake without a key ever crossing a network
    /// in clear text.
    pub fn connect(
        setting: &str,
        credential: Option<Arc<dyn TokenCredential>>,
        http: reqwest::Client,
    ) -> Result<Self, BusError> {
        let setting = setting.trim();
        let (endpoint, auth) = if is_connection_string(setting) {
            let parsed = ConnectionString::parse(setting)?;
            let auth = Auth::Sas {
                key_name: parsed.key_name,
                key: parsed.key,
            };
            (endpoint_url(&parsed.endpoint)?, auth)
        } else {
            let endpoint = if setting.contains("://") {
                endpoint_url(setting)?
            } else {
                endpoint_url(&format!("https://{setting}/"))?
            };
            let credential = credential.ok_or_else(|| {
                open_error(
                    "a Service Bus namespace needs a token credential (managed identity); \
                     for a key use a SAS connection string",
                )
            })?;
            let auth = Auth::Entra {
                credential,
                cached: tokio::sync::Mutex::new(None),
            };
            (endpoint, auth)
        };
        Ok(ServiceBusRest {
            endpoint,
            auth,
            http,
            timeout: DEFAULT_TIMEOUT,
        })
    }

    /// Sets the per-request timeout (default 30 s).
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// The namespace endpoint messages are posted under (ends with `/`).
    pub fn endpoint(&self) -> &Url {
        &self.endpoint
    }

    /// The `Authorization` header value for a send to `queue`, plus the secrets
    /// it contains (to scrub from error text).
    async fn authorization(&self, queue: &str) -> Result<(HeaderValue, Vec<String>), BusError> {
        let text = match &self.auth {
            Auth::Sas { key_name, key } => {
                let resource = format!("{}{queue}", self.endpoint);
                let expiry = OffsetDateTime::now_utc() + SAS_TOKEN_LIFETIME;
                sas_token(&resource, key_name, key, expiry.unix_timestamp())
            }
            Auth::Entra { credential, cached } => {
                let mut cached = cached.lock().await;
                let fresh = cached.as_ref().is_some_and(|token| {
                    token.expires_on > OffsetDateTime::now_utc() + TOKEN_REFRESH_MARGIN
                });
                if !fresh {
                    // Bounded: the token mutex is held here, so a hung identity
                    // endpoint must not stall every send behind it.
                    let token = tokio::time::timeout(
                        TOKEN_TIMEOUT,
                        credential.get_token(&[SERVICE_BUS_SCOPE], None),
                    )
                    .await
                    .map_err(|_| BusError::Send {
                        queue: queue.to_string(),
                        message: format!(
                            "getting an Entra ID token timed out after {}s",
                            TOKEN_TIMEOUT.as_secs()
                        ),
                        transient: true,
                    })?
                    .map_err(|e| BusError::Send {
                        queue: queue.to_string(),
                        // The identity endpoint failing is usually passing.
                        message: format!("getting an Entra ID token: {e}"),
                        transient: true,
                    })?;
                    *cached = Some(token);
                }
                let token = cached
                    .as_ref()
                    .map(|t| t.token.secret())
                    .unwrap_or_default();
                format!("Bearer {token}")
            }
        };
        let mut value = HeaderValue::from_str(&text).map_err(|_| BusError::Send {
            queue: queue.to_string(),
            message: "the authorization token is not a valid header value".to_string(),
            transient: false,
        })?;
        value.set_sensitive(true);
        let mut secrets = vec![text.clone()];
        if let Some(token) = text.strip_prefix("Bearer ") {
            secrets.push(token.to_string());
        }
        if let Auth::Sas { key, .. } = &self.auth {
            secrets.push(key.clone());
            if let Some(sig) = text.split('&').find_map(|p| p.strip_prefix("sig=")) {
                secrets.push(sig.to_string());
                secrets.push(percent_decode(sig));
            }
        }
        Ok((value, secrets))
    }
}

#[async_trait]
impl MessageBus for ServiceBusRest {
    async fn send(&self, message: OutMessage) -> Result<(), BusError> {
        validate(&message)?;
        let queue = message.queue.clone();
        let fail = |text: String, transient: bool| BusError::Send {
            queue: queue.clone(),
            message: text,
            transient,
        };
        let url = self
            .endpoint
            .join(&format!("{queue}/messages"))
            .map_err(|e| fail(format!("building the request URL: {e}"), false))?;
        let broker = BrokerProperties {
            message_id: message.message_id.as_deref(),
            session_id: message.session_id.as_deref(),
            scheduled_enqueue_time_utc: message
                .scheduled_enqueue_time
                .map(rfc1123)
                .transpose()
                .map_err(|e| fail(format!("formatting ScheduledEnqueueTimeUtc: {e}"), false))?,
        };
        let mut request = self
            .http
            .post(url)
            .timeout(self.timeout)
            .header(CONTENT_TYPE, "application/json")
            .header(
                "BrokerProperties",
                header_value(&json_ascii(&broker))
                    .map_err(|e| fail(format!("BrokerProperties: {e}"), false))?,
            );
        for (name, value) in &message.properties {
            let name = HeaderName::from_bytes(name.as_bytes())
                .map_err(|e| fail(format!("property {name:?}: {e}"), false))?;
            let value = header_value(&json_ascii(value))
                .map_err(|e| fail(format!("property {name}: {e}"), false))?;
            request = request.header(name, value);
        }
        let (authorization, secrets) = self.authorization(&queue).await?;
        let request = request
            .header(AUTHORIZATION, authorization)
            .body(message.body);

        let response = request.send().await.map_err(|e| {
            // Building a request is our bug; anything on the wire (connect,
            // timeout, reset) may work next time.
            let transient = !e.is_builder();
            fail(redact(&error_chain(&e), &secrets), transient)
        })?;
        let status = response.status();
        if status == StatusCode::CREATED {
            return Ok(());
        }
        let body = response.text().await.unwrap_or_default();
        let detail = redact(&summarise(&body), &secrets);
        let text = if detail.is_empty() {
            format!("Service Bus answered {status}")
        } else {
            format!("Service Bus answered {status}: {detail}")
        };
        Err(fail(text, status_is_transient(status)))
    }
}

/// Throttling, timeouts and server errors pass. So, usually, do a refused
/// credential or a missing queue: those are infrastructure faults (a role
/// assignment still propagating, a rotated key, a queue not deployed yet), and
/// classifying them permanent would make gantry acknowledge — and so drop — the
/// event that tried to send. Retried, they end in the dead-letter queue with a
/// record. Only a malformed or oversized message is the message's own fault.
fn status_is_transient(status: StatusCode) -> bool {
    status == StatusCode::REQUEST_TIMEOUT
        || status == StatusCode::TOO_MANY_REQUESTS
        || status == StatusCode::UNAUTHORIZED
        || status == StatusCode::FORBIDDEN
        || status == StatusCode::NOT_FOUND
        || status.is_server_error()
}

#[derive(Serialize)]
#[serde(rename_all = "PascalCase")]
struct BrokerProperties<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    message_id: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    session_id: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    scheduled_enqueue_time_utc: Option<String>,
}

fn rfc1123(at: OffsetDateTime) -> Result<String, time::error::Format> {
    at.to_offset(time::UtcOffset::UTC).format(RFC1123)
}

/// JSON with every non-ASCII character escaped, because header values must be
/// ASCII and Service Bus parses these values as JSON anyway.
fn json_ascii(value: &impl Serialize) -> String {
    let json = serde_json::to_string(value).unwrap_or_default();
    let mut out = String::with_capacity(json.len());
    for ch in json.chars() {
        if ch.is_ascii() {
            out.push(ch);
        } else {
            let mut units = [0u16; 2];
            for unit in ch.encode_utf16(&mut units) {
                out.push_str(&format!("\\u{unit:04x}"));
            }
        }
    }
    out
}

fn header_value(text: &str) -> Result<HeaderValue, String> {
    HeaderValue::from_str(text).map_err(|e| e.to_string())
}

/// `SharedAccessSignature sr=..&sig=..&se=..&skn=..`, where `sig` is the base64
/// HMAC-SHA256 of `"{url-encoded resource}\n{expiry}"` keyed with the key's
/// UTF-8 bytes (the key is used as written, not base64-decoded).
fn sas_token(resource: &str, key_name: &str, key: &str, expiry: i64) -> String {
    let encoded_resource = url_encode(resource);
    let string_to_sign = format!("{encoded_resource}\n{expiry}");
    let signature = match Hmac::<Sha256>::new_from_slice(key.as_bytes()) {
        Ok(mut mac) => {
            mac.update(string_to_sign.as_bytes());
            BASE64.encode(mac.finalize().into_bytes())
        }
        // HMAC takes keys of any length; this arm is unreachable in practice.
        Err(_) => String::new(),
    };
    format!(
        "SharedAccessSignature sr={encoded_resource}&sig={}&se={expiry}&skn={}",
        url_encode(&signature),
        url_encode(key_name)
    )
}

fn url_encode(text: &str) -> String {
    url::form_urlencoded::byte_serialize(text.as_bytes()).collect()
}

fn percent_decode(text: &str) -> String {
    url::form_urlencoded::parse(format!("x={text}").as_bytes())
        .next()
        .map(|(_, v)| v.into_owned())
        .unwrap_or_default()
}

fn is_connection_string(setting: &str) -> bool {
    setting.contains(';')
        || setting
            .get(..9)
            .is_some_and(|p| p.eq_ignore_ascii_case("endpoint="))
}

struct ConnectionString {
    endpoint: String,
    key_name: String,
    key: String,
}

impl ConnectionString {
    fn parse(text: &str) -> Result<Self, BusError> {
        let (mut endpoint, mut key_name, mut key) = (None, None, None);
        for part in text.split(';').map(str::trim).filter(|p| !p.is_empty()) {
            // Split at the first '=' only: base64 keys end in '='.
            let Some((name, value)) = part.split_once('=') else {
                return Err(open_error("malformed Service Bus connection string"));
            };
            match name.trim().to_ascii_lowercase().as_str() {
                "endpoint" => endpoint = Some(value.trim().to_string()),
                "sharedaccesskeyname" => key_name = Some(value.trim().to_string()),
                "sharedaccesskey" => key = Some(value.trim().to_string()),
                "sharedaccesssignature" => {
                    return Err(open_error(
                        "connection strings with a ready-made SharedAccessSignature are not supported; \
                         use SharedAccessKeyName and SharedAccessKey",
                    ));
                }
                // EntityPath and the like: messages name their queue themselves.
                _ => {}
            }
        }
        match (endpoint, key_name, key) {
            (Some(endpoint), Some(key_name), Some(key))
                if !endpoint.is_empty() && !key_name.is_empty() && !key.is_empty() =>
            {
                Ok(ConnectionString {
                    endpoint,
                    key_name,
                    key,
                })
            }
            _ => Err(open_error(
                "the Service Bus connection string needs Endpoint, SharedAccessKeyName and SharedAccessKey",
            )),
        }
    }
}

/// Normalises an endpoint to `https://host/` (`sb://` is the AMQP spelling of the
/// same namespace), keeping `http://` only for loopback hosts.
fn endpoint_url(text: &str) -> Result<Url, BusError> {
    let url = Url::parse(text)
        .map_err(|e| open_error(&format!("invalid Service Bus endpoint {text:?}: {e}")))?;
    let host = url
        .host()
        .ok_or_else(|| open_error(&format!("the Service Bus endpoint {text:?} has no host")))?;
    let loopback = match host {
        Host::Domain(name) => name.eq_ignore_ascii_case("localhost"),
        Host::Ipv4(ip) => IpAddr::V4(ip).is_loopback(),
        Host::Ipv6(ip) => IpAddr::V6(ip).is_loopback(),
    };
    // An sb:// port is an AMQP port and means nothing to HTTPS; an explicit
    // https:// or loopback http:// port is kept.
    let port = url.port().map(|p| format!(":{p}")).unwrap_or_default();
    let base = match url.scheme() {
        "sb" => format!("https://{host}/"),
        "https" => format!("https://{host}{port}/"),
        "http" if loopback => format!("http://{host}{port}/"),
        "http" => {
            return Err(open_error(
                "plain http is only allowed for loopback Service Bus endpoints",
            ));
        }
        other => {
            return Err(open_error(&format!(
                "unsupported Service Bus endpoint scheme {other:?}"
            )));
        }
    };
    Url::parse(&base).map_err(|e| open_error(&format!("invalid Service Bus endpoint: {e}")))
}

fn open_error(message: &str) -> BusError {
    BusError::Open {
        message: message.to_string(),
    }
}

/// The error and its causes on one line ("error sending request: ... : connection refused").
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

/// The first few hundred characters of an error body, on one line.
fn summarise(body: &str) -> String {
    let one_line = body.split_whitespace().collect::<Vec<_>>().join(" ");
    one_line.chars().take(300).collect()
}

/// Replaces every secret in `text` (a server may echo what it was sent).
fn redact(text: &str, secrets: &[String]) -> String {
    let mut out = text.to_string();
    for secret in secrets.iter().filter(|s| s.len() >= 8) {
        out = out.replace(secret.as_str(), "[redacted]");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc1123_matches_the_documented_example() {
        let at = time::macros::datetime!(1994-11-06 08:49:37 UTC);
        assert_eq!(
            rfc1123(at).expect("format"),
            "Sun, 06 Nov 1994 08:49:37 GMT"
        );
        let offset = time::macros::datetime!(1994-11-06 10:49:37 +02:00);
        assert_eq!(
            rfc1123(offset).expect("format"),
            "Sun, 06 Nov 1994 08:49:37 GMT"
        );
    }

    #[test]
    fn json_ascii_escapes_non_ascii() {
        assert_eq!(json_ascii(&"héllo 😀"), r#""h\u00e9llo \ud83d\ude00""#);
        let back: String = serde_json::from_str(&json_ascii(&"héllo 😀")).expect("json");
        assert_eq!(back, "héllo 😀");
    }

    #[test]
    fn redact_removes_secrets() {
        let secrets = vec!["supersecretkey".to_string()];
        assert_eq!(
            redact("bad key supersecretkey here", &secrets),
            "bad key [redacted] here"
        );
    }
}
