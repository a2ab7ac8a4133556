//! The REST sender against a local fake that records what arrives on the wire.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU16, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context as _, Result, bail};
use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use azure_core::credentials::{AccessToken, TokenCredential, TokenRequestOptions};
use base64::Engine as _;
use gantry_bus::{BusError, MessageBus, OutMessage, ServiceBusRest};
use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;
use time::OffsetDateTime;

const KEY_NAME: &str = "gantry-send";
// Ends in '=' like every real key, to exercise connection-string splitting.
const KEY: &str = "dGVzdC1rZXktdGhhdC1tdXN0LW5ldmVyLWxlYWs=";

#[derive(Debug, Clone)]
struct Recorded {
    method: Method,
    path: String,
    headers: HeaderMap,
    body: Vec<u8>,
}

struct FakeState {
    status: AtomicU16,
    delay: Duration,
    requests: Mutex<Vec<Recorded>>,
}

/// A Service Bus stand-in: answers every request with `status`, echoing the
/// Authorization header in error bodies (to prove the sender redacts it).
struct Fake {
    addr: SocketAddr,
    state: Arc<FakeState>,
}

impl Fake {
    async fn start(status: u16) -> Result<Self> {
        Self::start_with_delay(status, Duration::ZERO).await
    }

    async fn start_with_delay(status: u16, delay: Duration) -> Result<Self> {
        let state = Arc::new(FakeState {
            status: AtomicU16::new(status),
            delay,
            requests: Mutex::new(Vec::new()),
        });
        let app = Router::new().fallback(record).with_state(state.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        tokio::spawn(async move { axum::serve(listener, app).await });
        Ok(Fake { addr, state })
    }

    fn connection_string(&self) -> String {
        format!(
            "Endpoint=http://{}/;SharedAccessKeyName={KEY_NAME};SharedAccessKey={KEY}",
            self.addr
        )
    }

    fn requests(&self) -> Vec<Recorded> {
        self.state.requests.lock().expect("requests").clone()
    }
}

async fn record(
    State(state): State<Arc<FakeState>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> (StatusCode, String) {
    tokio::time::sleep(state.delay).await;
    let auth = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    state.requests.lock().expect("requests").push(Recorded {
        method,
        path: uri.path().to_string(),
        headers,
        body: body.to_vec(),
    });
    let status = StatusCode::from_u16(state.status.load(Ordering::SeqCst))
        .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let body = if status == StatusCode::CREATED {
        String::new()
    } else {
        format!(
            "<Error><Code>{}</Code><Detail>rejected token {auth}</Detail></Error>",
            status.as_u16()
        )
    };
    (status, body)
}

fn header<'a>(request: &'a Recorded, name: &str) -> Result<&'a str> {
    request
        .headers
        .get(name)
        .with_context(|| format!("header {name} missing"))?
        .to_str()
        .context("ASCII header")
}

fn decode(text: &str) -> String {
    url::form_urlencoded::parse(format!("v={text}").as_bytes())
        .next()
        .map(|(_, v)| v.into_owned())
        .unwrap_or_default()
}

#[tokio::test]
async fn sas_send_has_the_documented_wire_format() -> Result<()> {
    let fake = Fake::start(201).await?;
    let bus = ServiceBusRest::connect(&fake.connection_string(), None, reqwest::Client::new())?;
    let scheduled = time::macros::datetime!(2026-03-03 04:05:06.789 +01:00);
    let body = br#"{"app":"web","digest":"sha256:abc"}"#.to_vec();
    let message = OutMessage {
        queue: "deploy".to_string(),
        body: body.clone(),
        message_id: Some("run-42/deploy/1".to_string()),
        session_id: Some("web".to_string()),
        scheduled_enqueue_time: Some(scheduled),
        properties: Default::default(),
    }
    .with_property("run-id", "01JRUN")
    .with_property("traceparent", "00-abc-def-01")
    .with_property("note", "café \"quoted\"");
    let before = OffsetDateTime::now_utc().unix_timestamp();
    bus.send(message).await?;

    let requests = fake.requests();
    assert_eq!(requests.len(), 1);
    let request = &requests[0];
    assert_eq!(request.method, Method::POST);
    assert_eq!(request.path, "/deploy/messages");
    assert_eq!(request.body, body);
    assert_eq!(header(request, "content-type")?, "application/json");

    let broker: serde_json::Value = serde_json::from_str(header(request, "brokerproperties")?)?;
    assert_eq!(
        broker,
        serde_json::json!({
            "MessageId": "run-42/deploy/1",
            "SessionId": "web",
            "ScheduledEnqueueTimeUtc": "Tue, 03 Mar 2026 03:05:06 GMT",
        })
    );

    // Custom properties: one header each, the value a JSON string.
    assert_eq!(header(request, "run-id")?, "\"01JRUN\"");
    assert_eq!(header(request, "traceparent")?, "\"00-abc-def-01\"");
    let note: String = serde_json::from_str(header(request, "note")?)?;
    assert_eq!(note, "café \"quoted\"");

    // Authorization: recompute the SAS signature independently.
    let auth = header(request, "authorization")?;
    let fields: HashMap<&str, &str> = auth
        .strip_prefix("SharedAccessSignature ")
        .context("SAS scheme")?
        .split('&')
        .filter_map(|pair| pair.split_once('='))
        .collect();
    let sr = *fields.get("sr").context("sr")?;
    let port = fake.addr.port();
    assert_eq!(sr, format!("http%3A%2F%2F127.0.0.1%3A{port}%2Fdeploy"));
    assert_eq!(fields.get("skn"), Some(&KEY_NAME));
    let se: i64 = fields.get("se").context("se")?.parse()?;
    assert!(
        (before + 3500..=before + 3700).contains(&se),
        "expiry {se} not ~1h ahead"
    );
    let mut mac = Hmac::<Sha256>::new_from_slice(KEY.as_bytes())?;
    mac.update(format!("{sr}\n{se}").as_bytes());
    let expected = base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes());
    assert_eq!(decode(fields.get("sig").context("sig")?), expected);
    Ok(())
}

#[tokio::test]
async fn minimal_message_sends_empty_broker_properties() -> Result<()> {
    let fake = Fake::start(201).await?;
    let bus = ServiceBusRest::connect(&fake.connection_string(), None, reqwest::Client::new())?;
    bus.send(OutMessage::json("alerts", &serde_json::json!({"a": 1}))?)
        .await?;
    let request = &fake.requests()[0];
    assert_eq!(request.path, "/alerts/messages");
    assert_eq!(header(request, "brokerproperties")?, "{}");
    assert_eq!(request.body, br#"{"a":1}"#);
    Ok(())
}

#[derive(Debug)]
struct FakeCredential {
    lifetime: Duration,
    calls: AtomicUsize,
    scopes: Mutex<Vec<String>>,
}

#[async_trait::async_trait]
impl TokenCredential for FakeCredential {
    async fn get_token(
        &self,
        scopes: &[&str],
        _options: Option<TokenRequestOptions<'_>>,
    ) -> azure_core::Result<AccessToken> {
        let n = self.calls.fetch_add(1, Ordering::SeqCst) + 1;
        *self.scopes.lock().expect("scopes") = scopes.iter().map(|s| s.to_string()).collect();
        Ok(AccessToken::new(
            format!("entra-token-{n}"),
            OffsetDateTime::now_utc() + self.lifetime,
        ))
    }
}

fn credential(lifetime: Duration) -> Arc<FakeCredential> {
    Arc::new(FakeCredential {
        lifetime,
        calls: AtomicUsize::new(0),
        scopes: Mutex::new(Vec::new()),
    })
}

#[tokio::test]
async fn entra_token_is_sent_as_bearer_and_cached() -> Result<()> {
    let fake = Fake::start(201).await?;
    let cred = credential(Duration::from_secs(3600));
    let bus = ServiceBusRest::connect(
        &format!("http://{}", fake.addr),
        Some(cred.clone()),
        reqwest::Client::new(),
    )?;
    bus.send(OutMessage::json("scan", &1)?).await?;
    bus.send(OutMessage::json("policy", &2)?).await?;

    assert_eq!(
        cred.calls.load(Ordering::SeqCst),
        1,
        "token reused while fresh"
    );
    assert_eq!(
        *cred.scopes.lock().expect("scopes"),
        vec!["https://servicebus.azure.net/.default".to_string()]
    );
    let requests = fake.requests();
    assert_eq!(requests.len(), 2);
    for request in &requests {
        assert_eq!(header(request, "authorization")?, "Bearer entra-token-1");
    }
    Ok(())
}

#[tokio::test]
async fn entra_token_is_refreshed_near_expiry() -> Result<()> {
    let fake = Fake::start(201).await?;
    // Expires within the refresh margin: every send fetches a new one.
    let cred = credential(Duration::from_secs(60));
    let bus = ServiceBusRest::connect(
        &format!("http://{}", fake.addr),
        Some(cred.clone()),
        reqwest::Client::new(),
    )?;
    bus.send(OutMessage::json("scan", &1)?).await?;
    bus.send(OutMessage::json("scan", &2)?).await?;
    assert_eq!(cred.calls.load(Ordering::SeqCst), 2);
    assert_eq!(
        header(&fake.requests()[1], "authorization")?,
        "Bearer entra-token-2"
    );
    Ok(())
}

#[tokio::test]
async fn status_codes_map_to_permanent_or_transient() -> Result<()> {
    let fake = Fake::start(201).await?;
    let bus = ServiceBusRest::connect(&fake.connection_string(), None, reqwest::Client::new())?;
    for (status, transient) in [
        (400, false),
        // Infrastructure faults: retried, then dead-lettered with a record.
        (401, true),
        (403, true),
        (404, true),
        (410, false),
        (413, false),
        (408, true),
        (429, true),
        (500, true),
        (503, true),
    ] {
        fake.state.status.store(status, Ordering::SeqCst);
        match bus.send(OutMessage::json("scan", &status)?).await {
            Err(error @ BusError::Send { .. }) => {
                assert_eq!(error.is_transient(), transient, "status {status}: {error}");
                let text = error.to_string();
                assert!(text.contains(&status.to_string()), "{text}");
            }
            other => bail!("status {status}: expected a send error, got {other:?}"),
        }
    }
    Ok(())
}

#[tokio::test]
async fn errors_never_contain_the_key_or_the_token() -> Result<()> {
    let fake = Fake::start(401).await?;
    let bus = ServiceBusRest::connect(&fake.connection_string(), None, reqwest::Client::new())?;
    let error = bus
        .send(OutMessage::json("scan", &1)?)
        .await
        .err()
        .context("401 must fail")?;
    assert!(error.is_transient(), "a refused credential is retried");
    let auth = header(&fake.requests()[0], "authorization")?.to_string();
    let sig = auth
        .split('&')
        .find_map(|p| p.strip_prefix("sig="))
        .context("sig")?;
    let text = error.to_string();
    assert!(
        text.contains("[redacted]"),
        "the echoed token is scrubbed: {text}"
    );
    for secret in [KEY, auth.as_str(), sig, decode(sig).as_str()] {
        assert!(!text.contains(secret), "error leaks a secret: {text}");
    }
    assert!(!format!("{bus:?}").contains(KEY), "Debug leaks the key");

    let cred = credential(Duration::from_secs(3600));
    let bearer = ServiceBusRest::connect(
        &format!("http://{}", fake.addr),
        Some(cred),
        reqwest::Client::new(),
    )?;
    let text = bearer
        .send(OutMessage::json("scan", &1)?)
        .await
        .err()
        .context("401 must fail")?
        .to_string();
    assert!(
        !text.contains("entra-token-1"),
        "error leaks the token: {text}"
    );
    Ok(())
}

#[tokio::test]
async fn connection_refused_is_transient() -> Result<()> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    drop(listener);
    let setting =
        format!("Endpoint=http://{addr}/;SharedAccessKeyName={KEY_NAME};SharedAccessKey={KEY}");
    let bus = ServiceBusRest::connect(&setting, None, reqwest::Client::new())?;
    let error = bus
        .send(OutMessage::json("scan", &1)?)
        .await
        .err()
        .context("nothing listens")?;
    assert!(error.is_transient(), "{error}");
    assert!(!error.to_string().contains(KEY));
    Ok(())
}

#[tokio::test]
async fn timeout_is_transient() -> Result<()> {
    let fake = Fake::start_with_delay(201, Duration::from_secs(5)).await?;
    let bus = ServiceBusRest::connect(&fake.connection_string(), None, reqwest::Client::new())?
        .with_timeout(Duration::from_millis(200));
    let error = bus
        .send(OutMessage::json("scan", &1)?)
        .await
        .err()
        .context("must time out")?;
    assert!(error.is_transient(), "{error}");
    Ok(())
}

#[tokio::test]
async fn invalid_messages_never_reach_the_wire() -> Result<()> {
    let fake = Fake::start(201).await?;
    let bus = ServiceBusRest::connect(&fake.connection_string(), None, reqwest::Client::new())?;
    let unknown = bus.send(OutMessage::json("nope", &1)?).await;
    assert!(matches!(unknown, Err(BusError::InvalidMessage { .. })));
    let reserved = bus
        .send(OutMessage::json("scan", &1)?.with_property("authorization", "x"))
        .await;
    assert!(matches!(reserved, Err(BusError::InvalidMessage { .. })));
    assert!(fake.requests().is_empty());
    Ok(())
}

#[test]
fn connect_parses_settings_and_rejects_unsafe_ones() -> Result<()> {
    let http = reqwest::Client::new();
    let cred: Arc<dyn TokenCredential> = credential(Duration::from_secs(3600));

    let sas = ServiceBusRest::connect(
        &format!(
            "Endpoint=sb://contoso.servicebus.windows.net/;SharedAccessKeyName={KEY_NAME};SharedAccessKey={KEY};EntityPath=alerts"
        ),
        None,
        http.clone(),
    )?;
    assert_eq!(
        sas.endpoint().as_str(),
        "https://contoso.servicebus.windows.net/"
    );

    let namespace = ServiceBusRest::connect(
        "contoso.servicebus.windows.net",
        Some(cred.clone()),
        http.clone(),
    )?;
    assert_eq!(
        namespace.endpoint().as_str(),
        "https://contoso.servicebus.windows.net/"
    );

    let rejected = [
        // A namespace without a credential.
        ("contoso.servicebus.windows.net".to_string(), None),
        // A key over plain http to a remote host.
        (
            format!("Endpoint=http://contoso.servicebus.windows.net/;SharedAccessKeyName=k;SharedAccessKey={KEY}"),
            None,
        ),
        (
            "http://contoso.servicebus.windows.net".to_string(),
            Some(cred.clone()),
        ),
        // Missing pieces.
        (format!("Endpoint=sb://contoso.servicebus.windows.net/;SharedAccessKey={KEY}"), None),
        (
            "Endpoint=sb://contoso.servicebus.windows.net/;SharedAccessSignature=SharedAccessSignature sr=x".to_string(),
            None,
        ),
    ];
    for (setting, credential) in rejected {
        match ServiceBusRest::connect(&setting, credential, http.clone()) {
            Err(error @ BusError::Open { .. }) => {
                assert!(
                    !error.to_string().contains(KEY),
                    "error leaks the key: {error}"
                );
            }
            other => bail!("{setting:?} should be rejected, got {other:?}"),
        }
    }
    Ok(())
}

/// Sends to a real namespace: `GANTRY_TEST_SERVICEBUS` is a SAS connection string
/// or a namespace (then the Azure CLI login is used); the queue defaults to
/// `alerts` (`GANTRY_TEST_SERVICEBUS_QUEUE`).
#[tokio::test]
#[ignore = "needs GANTRY_TEST_SERVICEBUS"]
async fn live_send_to_a_real_namespace() -> Result<()> {
    let setting = std::env::var("GANTRY_TEST_SERVICEBUS").context("GANTRY_TEST_SERVICEBUS")?;
    let queue = std::env::var("GANTRY_TEST_SERVICEBUS_QUEUE").unwrap_or_else(|_| "alerts".into());
    let credential: Option<Arc<dyn TokenCredential>> = if setting.contains("SharedAccessKey") {
        None
    } else {
        Some(azure_identity::DeveloperToolsCredential::new(None)?)
    };
    let bus = ServiceBusRest::connect(&setting, credential, reqwest::Client::new())?;
    let id = format!(
        "gantry-live-test-{}",
        OffsetDateTime::now_utc().unix_timestamp_nanos()
    );
    let mut message = OutMessage::json(&queue, &serde_json::json!({"test": "live"}))?
        .with_id(&id)
        .with_property("run-id", "live-test")
        .scheduled_at(OffsetDateTime::now_utc() + Duration::from_secs(60));
    if gantry_bus::SESSION_QUEUES.contains(&queue.as_str()) {
        message = message.with_session("live-test");
    }
    bus.send(message.clone()).await?;
    // A duplicate within the window is accepted by the API and dropped by the broker.
    bus.send(message).await?;
    Ok(())
}
