//! The custom-handler runtime that hosts every gantry function in one process.
//!
//! A function is a lambda-style `async fn(Invocation<T>, &Deps) -> Result<Done, E>`
//! where `E` says whether it is transient (reply non-2xx so the host abandons
//! and redelivers the message) or permanent (record the rejection with its
//! reason, alert, acknowledge: bad input never gets better by retrying).
//!
//! [`app`] builds the one axum router `gantry serve` and `gantry dev` both
//! serve: `POST /{FunctionName}` for queue and timer triggers (the invocation
//! envelope), and each HTTP function's own routes under `/api/` (the host
//! forwards the original request with `enableForwardingHttpRequest`).

pub mod auth;
pub mod envelope;
pub mod http_error;
pub mod rollback;
pub mod signature;
pub mod steps;
pub mod telemetry;

// Every environment variable gantry reads (checked against the code and infra/ by tests/infra.rs).
pub mod settings;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use axum::Router;
use axum::extract::{DefaultBodyLimit, State};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use gantry_bus::{MessageBus, OutMessage};
use gantry_pipeline::{AuditEntry, Config, RunStore};
use http::StatusCode;
use time::OffsetDateTime;
use tracing::Instrument as _;

pub use envelope::{InvokeRequest, InvokeResponse, MessageMeta, TimerInfo};
pub use http_error::ApiError;

/// A secret value (webhook secret, token): never printed by `Debug` or `Display`.
#[derive(Clone)]
pub struct Secret(Vec<u8>);

impl Secret {
    /// Wraps secret bytes.
    pub fn new(bytes: impl Into<Vec<u8>>) -> Secret {
        Secret(bytes.into())
    }

    /// The secret bytes; call only where the secret is used (HMAC key, ...).
    pub fn expose(&self) -> &[u8] {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(***)")
    }
}

/// Secrets from the environment (Key Vault references in Azure).
#[derive(Debug, Clone, Default)]
pub struct Secrets {
    /// `GANTRY_GITHUB_WEBHOOK_SECRET`: without it every webhook is refused.
    pub github_webhook: Option<Secret>,
    /// `GANTRY_API_TOKENS`: without any, every operator API call answers 401.
    pub api_tokens: Vec<auth::ApiToken>,
    /// Values of the environment variables `gantry.toml` names for alert
    /// channels (`url_env`, `secret_env`, `token_env`), keyed by variable
    /// name, read once at start. Tests fill it directly instead of touching
    /// the process environment.
    pub named: std::collections::BTreeMap<String, Secret>,
    /// App Service Authentication principals, trusted only when the platform
    /// feature is enabled (`WEBSITE_AUTH_ENABLED`) — see [`auth`].
    pub app_service: Option<auth::AppServiceAuth>,
}

impl Secrets {
    /// The value of the environment variable `name` as read at start, if it
    /// was set and not empty.
    pub fn named(&self, name: &str) -> Option<&Secret> {
        self.named.get(name)
    }
}

/// Outbound clients and per-process caches shared by functions.
#[derive(Clone, Default)]
pub struct Services {
    /// Entra ID credential (managed identity in Azure) for Azure APIs such as
    /// Resource Graph; `None` where no Azure API is configured (tests, dev).
    pub credential: Option<Arc<dyn azure_core::credentials::TokenCredential>>,
    /// One HTTP client per process (connection pooling, one TLS setup).
    pub http: reqwest::Client,
    cache: Arc<
        std::sync::Mutex<
            std::collections::HashMap<&'static str, Arc<dyn std::any::Any + Send + Sync>>,
        >,
    >,
}

impl std::fmt::Debug for Services {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Services")
            .field("credential", &self.credential.is_some())
            .finish_non_exhaustive()
    }
}

impl Services {
    /// Services with a credential and HTTP client.
    pub fn new(
        credential: Option<Arc<dyn azure_core::credentials::TokenCredential>>,
        http: reqwest::Client,
    ) -> Services {
        Services {
            credential,
            http,
            cache: Arc::default(),
        }
    }

    /// A value built once per process (per `Deps`) and shared: prepared policy
    /// engines, API clients with token caches. `init` runs again after a failure.
    pub fn cached<T, E>(
        &self,
        key: &'static str,
        init: impl FnOnce() -> Result<T, E>,
    ) -> Result<Arc<T>, E>
    where
        T: Send + Sync + 'static,
    {
        let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(found) = cache.get(key).and_then(|v| v.clone().downcast::<T>().ok()) {
            return Ok(found);
        }
        let value = Arc::new(init()?);
        cache.insert(key, value.clone());
        Ok(value)
    }

    /// Like [`Services::cached`] for a value whose construction is async (a
    /// Kubernetes client reads its kubeconfig or service-account token).
    /// `init` runs without the cache locked: two invocations racing on an
    /// empty cache may both build one, and the first stored is kept and
    /// returned to both. A failure is not cached (the next call tries again).
    pub async fn cached_async<T, E, F, Fut>(&self, key: &'static str, init: F) -> Result<Arc<T>, E>
    where
        T: Send + Sync + 'static,
        F: FnOnce() -> Fut,
        Fut: std::future::Future<Output = Result<T, E>>,
    {
        if let Some(found) = self.get::<T>(key) {
            return Ok(found);
        }
        let value = Arc::new(init().await?);
        let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(found) = cache.get(key).and_then(|v| v.clone().downcast::<T>().ok()) {
            return Ok(found); // built meanwhile by another invocation
        }
        cache.insert(key, value.clone());
        Ok(value)
    }

    /// Puts `value` under `key`, replacing what was there: how a host or a
    /// test provides a client up front (e.g. a Kubernetes client on a fake
    /// API server under `gantry_context::CLUSTER_KEY`), which [`Services::cached`] and
    /// [`Services::cached_async`] then return instead of building their own.
    pub fn insert<T: Send + Sync + 'static>(&self, key: &'static str, value: Arc<T>) {
        self.cache
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(key, value);
    }

    /// The value under `key`, if one of type `T` is there.
    pub fn get<T: Send + Sync + 'static>(&self, key: &'static str) -> Option<Arc<T>> {
        self.cache
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(key)
            .and_then(|v| v.clone().downcast::<T>().ok())
    }
}

/// Everything a function may use. Built once per process.
#[derive(Clone)]
pub struct Deps {
    /// Runs, indexes, claims and the audit trail.
    pub runs: RunStore,
    /// Where messages go.
    pub bus: Arc<dyn MessageBus>,
    /// `gantry.toml`.
    pub config: Arc<Config>,
    /// Secrets.
    pub secrets: Secrets,
    /// Outbound clients and caches.
    pub services: Services,
}

impl Deps {
    /// Appends to the audit trail; failures are logged, not fatal, because the
    /// state change itself is already recorded on the run.
    pub async fn audit(&self, entry: AuditEntry) {
        if let Err(e) = self.runs.audit(&entry).await {
            tracing::warn!(error = %e, action = %entry.action, "audit append failed");
        }
    }

    /// Sends a message, classifying failures for the caller. The message
    /// carries the current span's trace context (`traceparent`), so the
    /// function it triggers continues the trace.
    pub async fn send(&self, mut message: OutMessage) -> Result<(), gantry_bus::BusError> {
        telemetry::inject(&mut message);
        self.bus.send(message).await
    }
}

/// A function's successful result: one line for the host log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Done(pub String);

/// Implemented by each function's error enum.
pub trait FunctionError: std::error::Error + Send + Sync + 'static {
    /// Whether redelivering the message may succeed.
    fn is_transient(&self) -> bool;
}

/// A decoded invocation of a queue- or timer-triggered function.
#[derive(Debug, Clone)]
pub struct Invocation<T> {
    /// The decoded event.
    pub event: T,
    /// Message metadata (id, delivery count, session, properties).
    pub meta: MessageMeta,
}

/// Event types a queue function accepts, decoded from the raw message body.
pub trait FromMessage: Sized {
    /// Decodes the body; the error names what is wrong (it is recorded as the
    /// rejection reason).
    fn from_message(body: &[u8]) -> Result<Self, String>;
}

/// How a function is triggered; mirrors its `function.json`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Trigger {
    /// HTTP, forwarded to the handler at `/api/{route}`.
    Http {
        /// Route template as in function.json (`github`, `{*path}`).
        route: &'static str,
        /// Allowed methods, lowercase.
        methods: &'static [&'static str],
    },
    /// Service Bus queue.
    Queue {
        /// Queue name.
        queue: &'static str,
        /// Binding name (the key in `Data`).
        binding: &'static str,
        /// Whether the trigger uses sessions.
        sessions: bool,
    },
    /// Timer.
    Timer {
        /// NCRONTAB schedule.
        schedule: &'static str,
    },
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;
type QueueHandler =
    Arc<dyn Fn(Vec<u8>, MessageMeta, Arc<Deps>) -> BoxFuture<Outcome> + Send + Sync>;
type TimerHandler = Arc<dyn Fn(TimerInfo, Arc<Deps>) -> BoxFuture<Outcome> + Send + Sync>;

/// The binding name of every timer trigger (the key of `Data` in the
/// invocation envelope and `name` in `function.json`).
pub const TIMER_BINDING: &str = "timer";

/// What happened to one invocation, as the runtime reports it to the host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Processed.
    Done(String),
    /// Failed permanently: recorded and acknowledged.
    Rejected(String),
    /// Failed transiently: the host must redeliver.
    Retry(String),
}

/// A function: its name (= folder = route = span) and trigger, and its code.
#[derive(Clone)]
pub struct Function {
    /// Function name, e.g. `registry-push`.
    pub name: &'static str,
    /// Its trigger.
    pub trigger: Trigger,
    kind: Kind,
}

#[derive(Clone)]
enum Kind {
    Queue(QueueHandler),
    Http(fn() -> Router<Arc<Deps>>),
    Timer(TimerHandler),
}

impl Function {
    /// A queue-triggered function from a lambda-style handler.
    pub fn queue<T, E, F, Fut>(
        name: &'static str,
        queue: &'static str,
        sessions: bool,
        handler: F,
    ) -> Function
    where
        T: FromMessage + Send + 'static,
        E: FunctionError,
        F: Fn(Invocation<T>, Arc<Deps>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<Done, E>> + Send + 'static,
    {
        let handler = Arc::new(handler);
        let run: QueueHandler =
            Arc::new(move |body: Vec<u8>, meta: MessageMeta, deps: Arc<Deps>| {
                let handler = handler.clone();
                Box::pin(async move {
                    let event = match T::from_message(&body) {
                        Ok(e) => e,
                        Err(reason) => return Outcome::Rejected(format!("bad message: {reason}")),
                    };
                    match handler(Invocation { event, meta }, deps).await {
                        Ok(Done(line)) => Outcome::Done(line),
                        Err(e) if e.is_transient() => Outcome::Retry(e.to_string()),
                        Err(e) => Outcome::Rejected(e.to_string()),
                    }
                }) as BoxFuture<Outcome>
            });
        Function {
            name,
            trigger: Trigger::Queue {
                queue,
                binding: "message",
                sessions,
            },
            kind: Kind::Queue(run),
        }
    }

    /// An HTTP function: `routes` returns its axum routes (full `/api/...` paths).
    pub fn http(
        name: &'static str,
        route: &'static str,
        methods: &'static [&'static str],
        routes: fn() -> Router<Arc<Deps>>,
    ) -> Function {
        Function {
            name,
            trigger: Trigger::Http { route, methods },
            kind: Kind::Http(routes),
        }
    }

    /// A timer-triggered function (`timerTrigger` binding [`TIMER_BINDING`],
    /// `schedule` in NCRONTAB with seconds, e.g. `0 */15 * * * *`).
    ///
    /// There is no message to redeliver: an error answers non-2xx (503 when
    /// transient, 500 otherwise) so the host logs the invocation as failed,
    /// and the next occurrence simply runs again. Nothing is recorded under
    /// `rejected/`, because there is no payload to keep.
    pub fn timer<E, F, Fut>(name: &'static str, schedule: &'static str, handler: F) -> Function
    where
        E: FunctionError,
        F: Fn(Invocation<TimerInfo>, Arc<Deps>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<Done, E>> + Send + 'static,
    {
        let handler = Arc::new(handler);
        let run: TimerHandler = Arc::new(move |info: TimerInfo, deps: Arc<Deps>| {
            let handler = handler.clone();
            Box::pin(async move {
                let invocation = Invocation {
                    event: info,
                    meta: MessageMeta::default(),
                };
                match handler(invocation, deps).await {
                    Ok(Done(line)) => Outcome::Done(line),
                    Err(e) if e.is_transient() => Outcome::Retry(e.to_string()),
                    Err(e) => Outcome::Rejected(e.to_string()),
                }
            }) as BoxFuture<Outcome>
        });
        Function {
            name,
            trigger: Trigger::Timer { schedule },
            kind: Kind::Timer(run),
        }
    }

    /// Runs a timer function now, outside HTTP (tests).
    pub async fn fire(&self, info: TimerInfo, deps: Arc<Deps>) -> Option<Outcome> {
        match &self.kind {
            Kind::Timer(h) => Some(h(info, deps).await),
            _ => None,
        }
    }

    /// Runs a queue function on a raw message, outside HTTP (used by tests and
    /// benchmarks; the dev host goes through the HTTP envelope instead).
    pub async fn invoke(
        &self,
        body: Vec<u8>,
        meta: MessageMeta,
        deps: Arc<Deps>,
    ) -> Option<Outcome> {
        match &self.kind {
            Kind::Queue(h) => Some(h(body, meta, deps).await),
            Kind::Http(_) | Kind::Timer(_) => None,
        }
    }
}

/// Largest invocation envelope accepted: a Service Bus premium message is at
/// most 100 MB, but gantry's own messages are < 192 KiB and event payloads far
/// smaller; base64 and double encoding can nearly double the size.
pub const MAX_ENVELOPE_BYTES: usize = 4 * 1024 * 1024;

/// The router of the whole custom handler.
pub fn app(deps: Arc<Deps>, functions: &[Function]) -> Router {
    let mut router: Router<Arc<Deps>> = Router::new();
    for f in functions {
        match &f.kind {
            Kind::Queue(handler) => {
                let handler = handler.clone();
                let name = f.name;
                let binding = match &f.trigger {
                    Trigger::Queue { binding, .. } => *binding,
                    _ => "message",
                };
                router = router.route(
                    &format!("/{name}"),
                    post(move |State(deps): State<Arc<Deps>>, body: axum::body::Body| {
                        let handler = handler.clone();
                        async move {
                            // Read with our own limit, so an oversized envelope gets a
                            // JSON error like every other refusal.
                            match axum::body::to_bytes(body, MAX_ENVELOPE_BYTES).await {
                                Ok(bytes) => invoke_envelope(name, binding, handler, deps, bytes).await,
                                Err(_) => ApiError::new(
                                    StatusCode::PAYLOAD_TOO_LARGE,
                                    "envelope_too_large",
                                    format!("invocation envelope larger than {MAX_ENVELOPE_BYTES} bytes"),
                                )
                                .into_response(),
                            }
                        }
                    })
                    .layer(DefaultBodyLimit::disable()),
                );
            }
            Kind::Http(routes) => {
                let name = f.name;
                // One span per forwarded request, named after the function.
                router = router.merge(routes().layer(axum::middleware::from_fn(
                    move |request: axum::extract::Request, next: axum::middleware::Next| async move {
                        let span =
                            telemetry::http_span(name, request.method(), request.headers());
                        let response = next.run(request).instrument(span.clone()).await;
                        span.record("http.response.status_code", response.status().as_u16());
                        response
                    },
                )))
            }
            Kind::Timer(handler) => {
                let handler = handler.clone();
                let name = f.name;
                router = router.route(
                    &format!("/{name}"),
                    post(
                        move |State(deps): State<Arc<Deps>>, body: axum::body::Bytes| {
                            let handler = handler.clone();
                            async move { invoke_timer(name, handler, deps, body).await }
                        },
                    ),
                );
            }
        }
    }
    router
        .fallback(|| async { ApiError::not_found("no such route") })
        .method_not_allowed_fallback(|| async {
            ApiError::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                "method not allowed on this route",
            )
        })
        .with_state(deps)
}

async fn invoke_envelope(
    name: &'static str,
    binding: &'static str,
    handler: QueueHandler,
    deps: Arc<Deps>,
    body: axum::body::Bytes,
) -> Response {
    let request: InvokeRequest = match serde_json::from_slice(&body) {
        Ok(r) => r,
        // The envelope itself is malformed: that is the host (or a caller) not
        // speaking the protocol, not a bad message. 400 makes the host abandon.
        Err(e) => {
            return ApiError::bad_request("bad_envelope", format!("invocation envelope: {e}"))
                .into_response();
        }
    };
    let meta = MessageMeta::from_metadata(&request.metadata);
    // Parent = the message's traceparent; everything below, the function's
    // own work and the messages it sends, belongs to this span.
    let span = telemetry::invocation_span(name, &meta);
    invoke_message(name, binding, handler, deps, request, meta, body)
        .instrument(span)
        .await
}

async fn invoke_message(
    name: &'static str,
    binding: &'static str,
    handler: QueueHandler,
    deps: Arc<Deps>,
    request: InvokeRequest,
    meta: MessageMeta,
    body: axum::body::Bytes,
) -> Response {
    let (outcome, payload) = match envelope::message_bytes(&request.data, binding, false) {
        Ok(bytes) => (
            handler(bytes.clone(), meta.clone(), deps.clone()).await,
            bytes,
        ),
        Err(e) => (
            Outcome::Rejected(format!("bad message: {}", e.0)),
            body.to_vec(),
        ),
    };
    let id = meta.message_id.as_deref();
    let (status, log) = match &outcome {
        Outcome::Done(line) => {
            tracing::info!(function = name, message_id = ?meta.message_id, "{line}");
            (StatusCode::OK, line.clone())
        }
        Outcome::Retry(reason) => {
            tracing::warn!(function = name, message_id = ?meta.message_id, delivery_count = meta.delivery_count, "transient failure, will be redelivered: {reason}");
            if meta.delivery_count >= max_delivery_count() {
                // The host dead-letters after this delivery: leave a record and
                // an alert, so the event is not lost without a trace.
                let why = format!("gave up after {} deliveries: {reason}", meta.delivery_count);
                if let Err(e) =
                    record_rejection(&deps, name, id, meta.delivery_count, &payload, &why).await
                {
                    tracing::error!(function = name, error = %e, "recording the dead-lettered message failed");
                }
                if let Err(e) = fail_run_of_message(&deps, name, &payload, &why).await {
                    tracing::error!(function = name, error = %e, "recording the dead-lettered message on its run failed");
                }
            }
            (
                StatusCode::SERVICE_UNAVAILABLE,
                format!("transient: {reason}"),
            )
        }
        Outcome::Rejected(reason) => {
            tracing::error!(function = name, message_id = ?meta.message_id, "rejected: {reason}");
            match record_rejection(&deps, name, id, meta.delivery_count, &payload, reason).await {
                Ok(_) => (StatusCode::OK, format!("rejected: {reason}")),
                // Could not record why: do not acknowledge, or the event is lost
                // without a trace. Redelivery ends in the dead-letter queue.
                Err(e) => (
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!("rejected ({reason}) and recording failed: {e}"),
                ),
            }
        }
    };
    let response = InvokeResponse {
        logs: vec![log],
        ..Default::default()
    };
    (status, axum::Json(response)).into_response()
}

/// A timer invocation: `{"Data": {"timer": {"Schedule": ..., "ScheduleStatus":
/// ..., "IsPastDue": ...}}, "Metadata": {...}}`.
async fn invoke_timer(
    name: &'static str,
    handler: TimerHandler,
    deps: Arc<Deps>,
    body: axum::body::Bytes,
) -> Response {
    let request: InvokeRequest = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => {
            return ApiError::bad_request("bad_envelope", format!("invocation envelope: {e}"))
                .into_response();
        }
    };
    let info = match TimerInfo::from_data(&request.data, TIMER_BINDING) {
        Ok(info) => info,
        Err(e) => return ApiError::bad_request("bad_timer", e.0).into_response(),
    };
    if info.is_past_due {
        tracing::info!(function = name, "timer invocation is past due");
    }
    let (status, log) = match handler(info, deps).await {
        Outcome::Done(line) => {
            tracing::info!(function = name, "{line}");
            (StatusCode::OK, line)
        }
        Outcome::Retry(reason) => {
            tracing::warn!(function = name, "timer run failed (transient): {reason}");
            (
                StatusCode::SERVICE_UNAVAILABLE,
                format!("transient: {reason}"),
            )
        }
        Outcome::Rejected(reason) => {
            tracing::error!(function = name, "timer run failed: {reason}");
            (
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("failed: {reason}"),
            )
        }
    };
    let response = InvokeResponse {
        logs: vec![log],
        ..Default::default()
    };
    (status, axum::Json(response)).into_response()
}

/// The envelope the Functions host sends for one timer occurrence; `gantry
/// dev` fires timers through it, so dev and Azure share one code path.
pub fn host_request_for_timer(schedule: &str, past_due: bool, now: &str) -> InvokeRequest {
    let mut data = serde_json::Map::new();
    data.insert(
        TIMER_BINDING.into(),
        serde_json::json!({
            "Schedule": {"AdjustForDST": true},
            "ScheduleStatus": {"Last": null, "Next": null, "LastUpdated": now},
            "IsPastDue": past_due,
        }),
    );
    let mut metadata = serde_json::Map::new();
    metadata.insert(
        "sys".into(),
        serde_json::json!({"MethodName": TIMER_BINDING, "UtcNow": now, "Schedule": schedule}),
    );
    InvokeRequest { data, metadata }
}

/// On the last delivery of a step message (`{app, run_id, ...}`) that still
/// fails: fails the run at the step it was driving (the one still pending or
/// running) with `reason`, so the run says why it stopped instead of waiting
/// forever on a message now in the dead-letter queue. Messages that name no
/// run (registry and Defender events) have only the rejection record.
async fn fail_run_of_message(
    deps: &Deps,
    function: &str,
    payload: &[u8],
    reason: &str,
) -> Result<(), String> {
    let Ok(request) = serde_json::from_slice::<gantry_pipeline::StepRequest>(payload) else {
        return Ok(());
    };
    let run = deps
        .runs
        .get(&request.app, &request.run_id)
        .await
        .map_err(|e| e.to_string())?;
    let Some(run) = run else {
        return Ok(());
    };
    let step = run.steps.iter().find_map(|(name, s)| {
        matches!(
            s.status,
            gantry_pipeline::StepStatus::Pending | gantry_pipeline::StepStatus::Running
        )
        .then(|| name.clone())
    });
    let Some(step) = step else {
        return Ok(()); // the run moved on meanwhile: nothing is stuck
    };
    steps::fail(deps, function, &run, &step, reason)
        .await
        .map_err(|e| e.to_string())
}

/// `MaxDeliveryCount` of the queues (`GANTRY_MAX_DELIVERY_COUNT`, default 10,
/// as in Service Bus): on that delivery a transient failure is recorded too.
pub fn max_delivery_count() -> u32 {
    static MAX: std::sync::OnceLock<u32> = std::sync::OnceLock::new();
    *MAX.get_or_init(|| {
        std::env::var("GANTRY_MAX_DELIVERY_COUNT")
            .ok()
            .and_then(|v| v.parse().ok())
            .filter(|n| *n > 0)
            .unwrap_or(10)
    })
}

/// Records a message (or one event of it) that gantry will not process, at
/// `rejected/{function}/{key}.json`, in the audit trail, and as an `alerts`
/// message, so nothing is acknowledged or dead-lettered silently.
///
/// `id` is the message or event id (the key); without one, the key is the
/// SHA-256 of `payload`, so a redelivery maps to the same record and alert.
/// Returns the record's blob name.
pub async fn record_rejection(
    deps: &Deps,
    function: &str,
    id: Option<&str>,
    delivery_count: u32,
    payload: &[u8],
    reason: &str,
) -> Result<String, String> {
    use sha2::Digest as _;
    let key = match id {
        Some(id) => gantry_pipeline::names::event_key(id),
        None => format!("h-{}", hex::encode(sha2::Sha256::digest(payload))),
    };
    let now = OffsetDateTime::now_utc();
    let record = serde_json::json!({
        "function": function,
        "message_id": id,
        "delivery_count": delivery_count,
        "reason": reason,
        "at": now.format(&time::format_description::well_known::Rfc3339).unwrap_or_default(),
        // Keep the payload (bounded) so an operator can see what was refused.
        "payload": String::from_utf8_lossy(&payload[..payload.len().min(64 * 1024)]),
    });
    let name = format!("rejected/{function}/{key}.json");
    let body = serde_json::to_vec_pretty(&record).map_err(|e| e.to_string())?;
    match deps.runs.raw().create(&name, &body).await {
        Ok(_) | Err(gantry_store::StoreError::Conflict { .. }) => {}
        Err(e) => return Err(e.to_string()),
    }
    deps.audit(AuditEntry {
        at: now,
        actor: function.to_string(),
        action: "message.rejected".into(),
        app: None,
        run: None,
        detail: serde_json::json!({"message_id": id, "reason": reason, "record": name}),
    })
    .await;
    let mut alert = gantry_pipeline::Alert::new(
        "message-rejected",
        gantry_pipeline::Severity::Warning,
        format!("{function} rejected a message: {reason}"),
    );
    alert.detail = serde_json::json!({"function": function, "message_id": id, "record": name});
    let msg = OutMessage::json("alerts", &alert)
        .map_err(|e| e.to_string())?
        .with_id(format!(
            "rejected:{function}:{}",
            &key[..key.len().min(100)]
        ));
    deps.send(msg).await.map_err(|e| e.to_string())?;
    Ok(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn inserted_values_are_returned_and_async_init_is_cached() {
        let services = Services::default();
        services.insert("k/inserted", Arc::new(7u32));
        let found: Result<Arc<u32>, String> = services
            .cached_async("k/inserted", || async { Ok(8u32) })
            .await;
        assert_eq!(found.as_deref(), Ok(&7));
        assert_eq!(services.get::<u32>("k/inserted").as_deref(), Some(&7));

        let failed: Result<Arc<u32>, String> = services
            .cached_async("k/lazy", || async { Err("no kubeconfig".to_string()) })
            .await;
        assert!(failed.is_err());
        assert!(
            services.get::<u32>("k/lazy").is_none(),
            "failures are not cached"
        );
        let built: Result<Arc<u32>, String> =
            services.cached_async("k/lazy", || async { Ok(1u32) }).await;
        assert_eq!(built.as_deref(), Ok(&1));
        let again: Result<Arc<u32>, String> =
            services.cached_async("k/lazy", || async { Ok(2u32) }).await;
        assert_eq!(again.as_deref(), Ok(&1));
    }
}
