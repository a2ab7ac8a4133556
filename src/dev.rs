//! `gantry dev`: the whole pipeline on one machine. The same router as
//! `gantry serve`, plus an embedded durable queue standing in for Service Bus
//! and the Functions host: a dispatcher per queue-triggered function receives
//! with peek-lock and invokes the function through the very same invocation
//! envelope (`POST /{FunctionName}`) the host would send.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, Request, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use gantry_bus::embedded::{EmbeddedBus, QueueOptions, Received};
use gantry_bus::{MessageBus, OutMessage, QUEUES};
use gantry_runtime::{ApiError, Deps, Function, Trigger};
use time::format_description::well_known::Rfc3339;
use tokio::sync::Semaphore;
use tower::ServiceExt as _;

/// Flags of `gantry dev`.
#[derive(clap::Args)]
pub struct DevArgs {
    /// gantry.toml to use; default ./gantry.toml if present, else the embedded example.
    #[arg(long, env = "GANTRY_CONFIG")]
    config: Option<PathBuf>,
    /// Port on 127.0.0.1 (dev never listens beyond loopback).
    #[arg(long, default_value_t = 7071)]
    port: u16,
    #[command(flatten)]
    store: crate::StoreArgs,
    /// Deliveries before a message is dead-lettered (the same variable tells
    /// the functions which delivery is the last, so both agree).
    #[arg(long, default_value_t = 10, env = "GANTRY_MAX_DELIVERY_COUNT")]
    max_delivery_count: u32,
    /// Seconds a received message stays locked.
    #[arg(long, default_value_t = 60)]
    lock_seconds: u64,
    /// Messages of one queue processed concurrently.
    #[arg(long, default_value_t = 4)]
    concurrency: usize,
    /// Milliseconds a failed delivery is held (lock renewed) before it is
    /// abandoned, doubled per delivery up to 8 s; 0 abandons at once, as
    /// Service Bus does. A storage outage then uses up deliveries slowly
    /// instead of dead-lettering everything within a second.
    #[arg(long, default_value_t = 0, env = "GANTRY_RETRY_BACKOFF_MS")]
    retry_backoff_ms: u64,
}

/// Longest hold of a failed delivery before it is abandoned.
const MAX_RETRY_BACKOFF: Duration = Duration::from_secs(8);

/// Settings of the dispatchers, shared by every queue.
#[derive(Clone, Copy)]
struct DispatchOptions {
    /// Messages of one queue processed concurrently.
    concurrency: usize,
    /// First hold of a failed delivery before abandoning (0: none).
    retry_backoff: Duration,
    /// Test-only crash point (`GANTRY_FAULT`), see [`Fault`].
    fault: Option<Fault>,
}

/// A fault-injection point for the crash tests (`tests/faults.rs`), read only
/// by `gantry dev` and only from `GANTRY_FAULT`; never set it outside tests.
///
/// `crash-after:<function>:before-ack` aborts the process after `<function>`
/// returned success for a message (its side effects are done) and before the
/// message is completed: the exact window in which a real host can die and
/// the message is delivered again after the restart.
#[derive(Clone, Copy, Debug)]
struct Fault {
    /// The function whose successful invocation is followed by the crash.
    function: &'static str,
}

impl Fault {
    /// Parses `GANTRY_FAULT`; an unknown function or point is an error, so a
    /// mistyped fault never silently tests nothing.
    fn from_env(functions: &[Function]) -> Result<Option<Fault>> {
        let Ok(spec) = std::env::var("GANTRY_FAULT") else {
            return Ok(None);
        };
        let parts: Vec<&str> = spec.split(':').collect();
        let ["crash-after", function, "before-ack"] = parts.as_slice() else {
            anyhow::bail!(
                "GANTRY_FAULT={spec:?}: expected crash-after:<function>:before-ack (test-only)"
            );
        };
        let function = functions
            .iter()
            .find(|f| f.name == *function)
            .map(|f| f.name)
            .with_context(|| format!("GANTRY_FAULT names no function {function:?}"))?;
        tracing::warn!(
            function,
            "GANTRY_FAULT is set: the process aborts after this function succeeds (test-only)"
        );
        Ok(Some(Fault { function }))
    }
}

/// HTTP requests `gantry dev` serves at once before shedding load.
const MAX_IN_FLIGHT: usize = 128;

/// `maxAutoLockRenewalDuration` of host.json.
const MAX_LOCK_RENEWAL: Duration = Duration::from_secs(300);

/// Largest body `POST /dev/queues/{queue}` accepts (Service Bus standard tier: 256 KiB).
const MAX_DEV_MESSAGE: usize = 256 * 1024;

pub async fn run(args: DevArgs) -> Result<()> {
    let addr = SocketAddr::from(([127, 0, 0, 1], args.port));
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding {addr} (is another gantry dev running? try --port)"))?;
    // --config, else ./gantry.toml when present, else the embedded example.
    let config_path = args
        .config
        .clone()
        .or_else(|| Some(PathBuf::from("gantry.toml")).filter(|p| p.is_file()));
    let mut config = crate::wiring::load_config(config_path.as_deref())?;
    // The GitOps hand-off folder of the directory target lives with the rest
    // of the dev state unless gantry.toml names one.
    if config.deploy.dir.is_none() {
        config.deploy.dir = Some(std::path::absolute(args.store.state.join("deploy"))?);
    }
    let store = crate::wiring::open_store(&args.store).await?;
    let options = QueueOptions {
        lock_duration: Duration::from_secs(args.lock_seconds.max(1)),
        max_delivery_count: args.max_delivery_count.max(1),
        ..QueueOptions::default()
    };
    let bus = Arc::new(
        EmbeddedBus::open(args.store.state.join("queues"), options)
            .await
            .with_context(|| {
                format!(
                    "opening the embedded queues in {}",
                    args.store.state.display()
                )
            })?,
    );
    if std::env::var_os("GANTRY_GITHUB_WEBHOOK_SECRET").is_none() {
        tracing::warn!(
            "GANTRY_GITHUB_WEBHOOK_SECRET is not set: using the development secret (gantry send signs with it too)"
        );
    }
    let config_deploy_dir = config.deploy.dir.clone();
    // A developer login is needed only when an app scans with Defender.
    let config_uses_azure = uses_defender(&config);
    if std::env::var("GANTRY_API_TOKENS").is_ok_and(|v| !v.trim().is_empty()) {
        tracing::info!("operator API: tokens from GANTRY_API_TOKENS");
    } else {
        tracing::warn!(
            "GANTRY_API_TOKENS is not set: the operator API accepts the development token (gantry runs uses it by default on loopback)"
        );
    }
    let mut secrets = crate::wiring::secrets(true)?;
    secrets.named = crate::wiring::named_secrets(&config);
    let deps = Arc::new(Deps {
        runs: gantry_pipeline::RunStore::new(store),
        bus: bus.clone() as Arc<dyn MessageBus>,
        config: Arc::new(config),
        secrets,
        services: crate::wiring::services(&config_uses_azure)?,
    });
    let functions = crate::functions::all();
    let dispatch_options = DispatchOptions {
        concurrency: args.concurrency.max(1),
        retry_backoff: Duration::from_millis(args.retry_backoff_ms),
        fault: Fault::from_env(&functions)?,
    };
    let router = gantry_runtime::app(deps.clone(), &functions);
    // Shed load instead of queueing without bound: beyond MAX_IN_FLIGHT requests
    // answer 503 at once (measured: an overloaded backend otherwise let RSS grow
    // from 12 to ~150 MiB). In Azure the Functions host limits concurrency itself.
    let timers: Vec<(&'static str, &'static str)> = functions
        .iter()
        .filter_map(|f| match f.trigger {
            Trigger::Timer { schedule } => Some((f.name, schedule)),
            _ => None,
        })
        .collect();
    let app = router
        .clone()
        .merge(dev_routes(bus.clone()))
        .merge(timer_routes(router.clone(), timers))
        .layer(
            tower::ServiceBuilder::new()
                .layer(axum::error_handling::HandleErrorLayer::new(
                    |_: tower::BoxError| async {
                        ApiError::unavailable(format!(
                            "more than {MAX_IN_FLIGHT} requests in flight; retry"
                        ))
                    },
                ))
                .load_shed()
                .concurrency_limit(MAX_IN_FLIGHT),
        );

    for f in &functions {
        if let Trigger::Queue { queue, .. } = f.trigger {
            tokio::spawn(dispatch(
                bus.clone(),
                router.clone(),
                f.clone(),
                queue,
                dispatch_options,
            ));
        }
    }
    let state = match &args.store.storage {
        Some(_) => "Blob Storage (--storage)".to_string(),
        None => args.store.state.join("store").display().to_string(),
    };
    println!("gantry dev listening on http://{addr}");
    println!("  webhook   POST http://{addr}/api/github");
    println!("  health    GET  http://{addr}/api/health");
    println!("  queues    POST http://{addr}/dev/queues/{{queue}}   GET http://{addr}/dev/queues");
    println!("  timers    POST http://{addr}/dev/timers/{{function}}  (fire a timer function now)");
    println!("  state     {state}");
    println!(
        "  config    {} ({} apps)",
        config_path
            .as_deref()
            .map(|p| p.display().to_string())
            .unwrap_or_else(|| "embedded example gantry.toml".into()),
        deps.config.apps.len()
    );
    println!("  queues at {}", args.store.state.join("queues").display());
    if let Some(dir) = &config_deploy_dir {
        println!("  deploy    directory target {}", dir.display());
    }
    println!(
        "  functions {}",
        functions
            .iter()
            .map(|f| f.name)
            .collect::<Vec<_>>()
            .join(", ")
    );
    axum::serve(listener, app)
        .with_graceful_shutdown(async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await
        .context("serving HTTP")?;
    Ok(())
}

fn dev_routes(bus: Arc<EmbeddedBus>) -> Router {
    Router::new()
        .route("/dev/queues", get(list_queues))
        .route("/dev/queues/{queue}", post(enqueue).get(show_queue))
        .layer(axum::extract::DefaultBodyLimit::max(MAX_DEV_MESSAGE))
        .with_state(bus)
}

/// State of `POST /dev/timers/{name}`: the functions' router and the timer
/// functions with their schedules.
#[derive(Clone)]
struct Timers {
    router: Router,
    timers: Arc<Vec<(&'static str, &'static str)>>,
}

fn timer_routes(router: Router, timers: Vec<(&'static str, &'static str)>) -> Router {
    Router::new()
        .route("/dev/timers/{name}", post(fire_timer))
        .with_state(Timers {
            router,
            timers: Arc::new(timers),
        })
}

/// `POST /dev/timers/{name}`: fires a timer function now, through the very
/// envelope the Functions host sends on a schedule, and answers with the
/// function's status and log line. `gantry dev` does not run timers on their
/// schedule: a developer fires them when they want to see the result.
async fn fire_timer(
    State(state): State<Timers>,
    Path(name): Path<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    guard_local(&headers)?;
    let Some((function, schedule)) = state.timers.iter().find(|(n, _)| *n == name).copied() else {
        let names: Vec<&str> = state.timers.iter().map(|(n, _)| *n).collect();
        return Err(ApiError::not_found(format!(
            "no timer function {name:?}; timers: {}",
            names.join(", ")
        )));
    };
    let now = time::OffsetDateTime::now_utc()
        .format(&Rfc3339)
        .unwrap_or_default();
    let envelope = gantry_runtime::host_request_for_timer(schedule, false, &now);
    let body = serde_json::to_vec(&envelope).unwrap_or_default();
    let request = Request::post(format!("/{function}"))
        .header("content-type", "application/json")
        .body(axum::body::Body::from(body))
        .map_err(|e| ApiError::unavailable(e.to_string()))?;
    let response = match state.router.oneshot(request).await {
        Ok(r) => r,
        Err(never) => match never {},
    };
    let status = response.status();
    let bytes = axum::body::to_bytes(response.into_body(), 1024 * 1024)
        .await
        .unwrap_or_default();
    let reply: serde_json::Value = serde_json::from_slice(&bytes).unwrap_or_default();
    Ok((
        status,
        axum::Json(serde_json::json!({
            "function": function,
            "status": status.as_u16(),
            "logs": reply.get("Logs").cloned().unwrap_or_default(),
        })),
    )
        .into_response())
}

/// `POST /dev/queues/{queue}`: the body becomes one message, with optional
/// `MessageId` / `SessionId` headers (how samples inject Service Bus events).
/// JSON is required unless the body is sent as `application/octet-stream`.
async fn enqueue(
    State(bus): State<Arc<EmbeddedBus>>,
    Path(queue): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    guard_local(&headers)?;
    if !QUEUES.contains(&queue.as_str()) {
        return Err(ApiError::not_found(format!(
            "unknown queue {queue:?}; queues: {}",
            QUEUES.join(", ")
        )));
    }
    if body.is_empty() {
        return Err(ApiError::bad_request(
            "empty_body",
            "the message body is empty",
        ));
    }
    // JSON bodies are checked here, to catch a mistyped sample early. A body
    // sent as `application/octet-stream` goes on the queue as it is, as
    // Service Bus would take it: how the hostile-input tests reach the
    // functions with malformed, truncated or over-deep events.
    let raw = headers
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| {
            v.trim()
                .to_ascii_lowercase()
                .starts_with("application/octet-stream")
        });
    if !raw && serde_json::from_slice::<serde::de::IgnoredAny>(&body).is_err() {
        return Err(ApiError::bad_request(
            "bad_payload",
            "the message body must be JSON",
        ));
    }
    let header = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    };
    let message = OutMessage {
        queue: queue.clone(),
        body: body.to_vec(),
        message_id: header("messageid"),
        session_id: header("sessionid"),
        scheduled_enqueue_time: None,
        properties: Default::default(),
    };
    let message_id = message.message_id.clone();
    bus.send(message).await.map_err(|e| match e {
        gantry_bus::BusError::InvalidMessage { reason, .. } => {
            ApiError::bad_request("bad_message", reason)
        }
        other => ApiError::unavailable(other.to_string()),
    })?;
    Ok((
        StatusCode::CREATED,
        axum::Json(serde_json::json!({"queue": queue, "message_id": message_id})),
    )
        .into_response())
}

/// The dev host listens on loopback, but a browser on the same machine can
/// still reach it: a page could POST (a "simple" request needs no preflight) or
/// rebind its DNS name to 127.0.0.1. Requiring a JSON content type forces a
/// CORS preflight (which is never granted), and checking `Host` defeats DNS
/// rebinding.
fn guard_local(headers: &HeaderMap) -> Result<(), ApiError> {
    let host = headers
        .get("host")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let hostname = host.rsplit_once(':').map_or(host, |(h, _)| h);
    if !matches!(hostname, "127.0.0.1" | "localhost" | "[::1]") {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "forbidden_host",
            "dev endpoints answer only requests addressed to 127.0.0.1 or localhost",
        ));
    }
    let content_type = headers
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    // Both need a CORS preflight from a browser page, which this host never
    // answers; a form's text/plain or urlencoded body is refused.
    let media = content_type.split(';').next().unwrap_or("").trim();
    if !media.eq_ignore_ascii_case("application/json")
        && !media.eq_ignore_ascii_case("application/octet-stream")
    {
        return Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            "send the message with Content-Type: application/json (or application/octet-stream for raw bytes)",
        ));
    }
    Ok(())
}

async fn list_queues(State(bus): State<Arc<EmbeddedBus>>) -> axum::Json<serde_json::Value> {
    let mut out = serde_json::Map::new();
    for q in QUEUES {
        out.insert(
            q.to_string(),
            serde_json::to_value(bus.stats(q).await).unwrap_or_default(),
        );
    }
    axum::Json(serde_json::Value::Object(out))
}

async fn show_queue(
    State(bus): State<Arc<EmbeddedBus>>,
    Path(queue): Path<String>,
) -> Result<Response, ApiError> {
    if !QUEUES.contains(&queue.as_str()) {
        return Err(ApiError::not_found(format!("unknown queue {queue:?}")));
    }
    Ok(axum::Json(serde_json::json!({
        "stats": bus.stats(&queue).await,
        "messages": bus.peek(&queue).await,
        "dead_letters": bus.dead_letters(&queue).await,
    }))
    .into_response())
}

/// Receives from `queue` and invokes `function` through the HTTP envelope,
/// settling like the Functions host: 2xx completes, anything else abandons
/// (the bus dead-letters after the maximum delivery count).
async fn dispatch(
    bus: Arc<EmbeddedBus>,
    router: Router,
    function: Function,
    queue: &'static str,
    options: DispatchOptions,
) {
    let permits = Arc::new(Semaphore::new(options.concurrency));
    loop {
        let Ok(permit) = permits.clone().acquire_owned().await else {
            return;
        };
        // Subscribe before looking, so a message sent in between wakes us.
        let notified = bus.notified();
        match bus.receive(queue).await {
            Ok(Some(message)) => {
                let (bus, router, name) = (bus.clone(), router.clone(), function.name);
                tokio::spawn(async move {
                    deliver(&bus, router, name, message, options).await;
                    drop(permit);
                });
            }
            Ok(None) => {
                drop(permit);
                let wait = match bus.next_due(queue).await {
                    Some(due) => {
                        let ms = (due - time::OffsetDateTime::now_utc())
                            .whole_milliseconds()
                            .clamp(1, 1000);
                        Duration::from_millis(ms as u64)
                    }
                    None => Duration::from_secs(1),
                };
                tokio::select! {
                    _ = notified => {}
                    _ = tokio::time::sleep(wait) => {}
                }
            }
            Err(e) => {
                drop(permit);
                tracing::error!(queue, error = %e, "receiving failed");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    }
}

async fn deliver(
    bus: &EmbeddedBus,
    router: Router,
    function: &'static str,
    message: Received,
    options: DispatchOptions,
) {
    let binding = "message";
    let enqueued = message.enqueued_time.format(&Rfc3339).unwrap_or_default();
    let envelope = gantry_runtime::envelope::host_request_for_message(
        binding,
        false,
        &message.body,
        &message.message_id,
        message.delivery_count,
        message.session_id.as_deref(),
        &enqueued,
        &message.properties,
    );
    let body = serde_json::to_vec(&envelope).unwrap_or_default();
    let request = Request::post(format!("/{function}"))
        .header("content-type", "application/json")
        .body(axum::body::Body::from(body));
    // Renew the peek-lock while the function runs, like the host's
    // maxAutoLockRenewalDuration, so a slow step is not delivered twice at once.
    let renew_every = bus.options().lock_duration / 2;
    let invoke = async {
        match request {
            Ok(req) => match router.oneshot(req).await {
                Ok(resp) => {
                    let status = resp.status();
                    // The function's log line says why it failed: kept as the
                    // dead-letter description of a message that gives up.
                    let body = axum::body::to_bytes(resp.into_body(), 64 * 1024)
                        .await
                        .unwrap_or_default();
                    (status, failure_reason(&body))
                }
                Err(never) => match never {},
            },
            Err(_) => (StatusCode::INTERNAL_SERVER_ERROR, String::new()),
        }
    };
    tokio::pin!(invoke);
    // Like the host, stop renewing after maxAutoLockRenewalDuration (5 min): a
    // hung invocation then loses its lock and the message is redelivered.
    let renew_until = tokio::time::Instant::now() + MAX_LOCK_RENEWAL;
    let renew = async || {
        if let Err(e) = bus.renew_lock(&message.lock).await {
            tracing::warn!(function, message_id = %message.message_id, error = %e, "lock renewal failed");
        }
    };
    let (status, reason) = loop {
        tokio::select! {
            outcome = &mut invoke => break outcome,
            _ = tokio::time::sleep(renew_every), if tokio::time::Instant::now() < renew_until => renew().await,
        }
    };
    if status.is_success()
        && let Some(fault) = options.fault
        && fault.function == function
    {
        // Test-only (GANTRY_FAULT): die between the side effects and the
        // acknowledgement, as a host killed at the worst moment would.
        eprintln!("GANTRY_FAULT: aborting after {function} before completing its message");
        std::process::abort();
    }
    if !status.is_success() && !options.retry_backoff.is_zero() {
        // Hold the failed message (lock renewed) before abandoning, doubling
        // per delivery: an outage then costs a few deliveries, not all of them.
        let doublings = message.delivery_count.saturating_sub(1).min(16);
        let hold = options
            .retry_backoff
            .saturating_mul(1 << doublings)
            .min(MAX_RETRY_BACKOFF);
        let until = tokio::time::Instant::now() + hold;
        while tokio::time::Instant::now() < until {
            let step = renew_every.min(until - tokio::time::Instant::now());
            tokio::time::sleep(step).await;
            if tokio::time::Instant::now() < until {
                renew().await;
            }
        }
    }
    let settled = if status.is_success() {
        bus.complete(&message.lock).await
    } else {
        tracing::warn!(
            function,
            message_id = %message.message_id,
            delivery_count = message.delivery_count,
            status = status.as_u16(),
            "invocation failed; abandoning for redelivery"
        );
        if message.delivery_count >= bus.options().max_delivery_count {
            // The last delivery: dead-letter it ourselves, with the function's
            // reason rather than only "MaxDeliveryCountExceeded".
            let description = format!(
                "{function} failed on delivery {} of {}: {reason}",
                message.delivery_count,
                bus.options().max_delivery_count
            );
            bus.dead_letter(
                &message.lock,
                gantry_bus::embedded::MAX_DELIVERY_COUNT_EXCEEDED,
                &description,
            )
            .await
        } else {
            bus.abandon(&message.lock).await
        }
    };
    if let Err(e) = settled {
        tracing::error!(function, message_id = %message.message_id, error = %e, "settling failed");
    }
}

/// The first log line of an invocation response (`{"Logs": [...]}`), bounded.
fn failure_reason(body: &[u8]) -> String {
    let reply: serde_json::Value = serde_json::from_slice(body).unwrap_or_default();
    let line = reply["Logs"][0]
        .as_str()
        .or_else(|| reply["error"]["message"].as_str())
        .unwrap_or("no reason given");
    line.chars().take(1000).collect()
}

fn uses_defender(config: &gantry_pipeline::Config) -> bool {
    config
        .apps
        .iter()
        .any(|a| config.scan_settings(a).source == gantry_pipeline::config::ScanSource::Defender)
}
