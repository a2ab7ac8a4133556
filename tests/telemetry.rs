//! Traces across functions, with an in-process span exporter: a signed GitHub
//! push to `/api/github`, the image push on `registry-events` (as Event Grid
//! delivers it, without trace context), `registry-push`, the `scan` message it
//! sends, and `scan-check` — all through the real router, the custom-handler
//! envelope, the embedded queue and the embedded store, as `gantry dev` runs
//! them. The spans of the run share one trace; the JSON log lines of the
//! invocations carry the run id, the function and the trace id.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, OnceLock};

use anyhow::{Context, Result, ensure};
use axum::Router;
use axum::body::Body;
use gantry_bus::{EmbeddedBus, MessageBus, OutMessage, QueueOptions};
use gantry_pipeline::{Config, RunStore};
use gantry_runtime::telemetry::{self, LogFormat};
use gantry_runtime::{Deps, Secret, Secrets};
use gantry_store::fs::FsStore;
use http::{Request, StatusCode};
use http_body_util::BodyExt;
use opentelemetry::trace::{SpanId, SpanKind, TraceId};
use opentelemetry_sdk::trace::{InMemorySpanExporter, SdkTracerProvider, SpanData};
use serde_json::Value;
use time::format_description::well_known::Rfc3339;
use tower::ServiceExt;
use tracing_subscriber::layer::SubscriberExt as _;

mod support;

const SECRET: &[u8] = b"telemetry-test-secret";

const CONFIG: &str = r#"
[[apps]]
name = "web"
repo = "contoso/web"
image = "contoso.azurecr.io/web"
"#;

/// Log lines written by the JSON log layer.
#[derive(Clone, Default)]
struct Lines(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Lines {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

struct Telemetry {
    exporter: InMemorySpanExporter,
    provider: SdkTracerProvider,
    logs: Lines,
}

/// One global subscriber for this test binary, built from the same layers as
/// the `gantry` binary (JSON logs + the OpenTelemetry layer with events).
fn telemetry() -> &'static Telemetry {
    static T: OnceLock<Telemetry> = OnceLock::new();
    T.get_or_init(|| {
        let exporter = InMemorySpanExporter::default();
        let provider = SdkTracerProvider::builder()
            .with_simple_exporter(exporter.clone())
            .build();
        let logs = Lines::default();
        let writer = logs.clone();
        let subscriber = tracing_subscriber::registry()
            .with(telemetry::log_layer(
                LogFormat::Json,
                tracing_subscriber::EnvFilter::new("info"),
                move || writer.clone(),
            ))
            .with(telemetry::layer(&provider, true));
        tracing::subscriber::set_global_default(subscriber).expect("first subscriber");
        Telemetry {
            exporter,
            provider,
            logs,
        }
    })
}

struct Harness {
    _dir: tempfile::TempDir,
    bus: EmbeddedBus,
    runs: RunStore,
    router: Router,
}

impl Harness {
    async fn new() -> Result<Harness> {
        let dir = tempfile::tempdir()?;
        let store = Arc::new(FsStore::open(dir.path().join("store"))?);
        let bus = EmbeddedBus::open(dir.path().join("bus"), QueueOptions::default()).await?;
        let runs = RunStore::new(store);
        let deps = Deps {
            runs: runs.clone(),
            bus: Arc::new(bus.clone()),
            config: Arc::new(Config::parse(CONFIG, "test.toml")?),
            secrets: Secrets {
                github_webhook: Some(Secret::new(SECRET)),
                ..Secrets::default()
            },
            services: Default::default(),
        };
        let router = gantry_runtime::app(
            Arc::new(deps),
            &[
                fn_github_webhook::function(),
                fn_registry_push::function(),
                fn_scan_check::function(),
            ],
        );
        Ok(Harness {
            _dir: dir,
            bus,
            runs,
            router,
        })
    }

    async fn send(&self, request: Request<Body>) -> Result<(StatusCode, Value)> {
        let response = self.router.clone().oneshot(request).await?;
        let status = response.status();
        let bytes = response.into_body().collect().await?.to_bytes();
        Ok((
            status,
            serde_json::from_slice(&bytes).unwrap_or(Value::Null),
        ))
    }

    /// Receives the next message of `queue` and delivers it to `function` the
    /// way `gantry dev` and the Functions host do: through the envelope, with
    /// the message's application properties in the metadata; completes it.
    async fn deliver_next(&self, queue: &str, function: &str) -> Result<BTreeMap<String, String>> {
        let message = self
            .bus
            .receive(queue)
            .await?
            .with_context(|| format!("{queue} is empty"))?;
        let envelope = gantry_runtime::envelope::host_request_for_message(
            "message",
            false,
            &message.body,
            &message.message_id,
            message.delivery_count,
            message.session_id.as_deref(),
            &message.enqueued_time.format(&Rfc3339)?,
            &message.properties,
        );
        let request = Request::post(format!("/{function}"))
            .header("content-type", "application/json")
            .body(Body::from(serde_json::to_vec(&envelope)?))?;
        let (status, reply) = self.send(request).await?;
        ensure!(status == StatusCode::OK, "{function}: {status} {reply}");
        self.bus.complete(&message.lock).await?;
        Ok(message.properties)
    }
}

fn attr(span: &SpanData, key: &str) -> Option<String> {
    span.attributes
        .iter()
        .find(|kv| kv.key.as_str() == key)
        .map(|kv| kv.value.to_string())
}

fn one<'a>(spans: &'a [SpanData], name: &str, run: &str) -> Result<&'a SpanData> {
    let found: Vec<_> = spans
        .iter()
        .filter(|s| s.name == name && attr(s, "run.id").as_deref() == Some(run))
        .collect();
    ensure!(
        found.len() == 1,
        "{} spans named {name} for run {run}: {:#?}",
        found.len(),
        spans
            .iter()
            .map(|s| (&s.name, &s.attributes))
            .collect::<Vec<_>>()
    );
    Ok(found[0])
}

#[tokio::test]
async fn one_trace_spans_webhook_registry_push_and_scan_for_one_run() -> Result<()> {
    let t = telemetry();
    let h = Harness::new().await?;

    // 1. GitHub push (GitHub sends no traceparent): a new trace.
    let body = support::example("github-push.json");
    let request = Request::post("/api/github")
        .header("content-type", "application/json")
        .header("x-github-event", "push")
        .header("x-github-delivery", "7d1f1c9e-3b1a-4c5e-9a7f-2b8e4d6c0a11")
        .header(
            "x-hub-signature-256",
            gantry_runtime::signature::sign_sha256(SECRET, &body),
        )
        .body(Body::from(body))?;
    let (status, reply) = h.send(request).await?;
    ensure!(status == StatusCode::ACCEPTED, "push: {status} {reply}");
    let run_id = reply["runs"][0]["run_id"]
        .as_str()
        .context("run id")?
        .to_string();

    // 2. ACR's ImagePushed as Event Grid puts it on the queue: no trace context.
    let event = OutMessage {
        queue: "registry-events".into(),
        body: support::example("acr-image-pushed.json"),
        message_id: Some("831e1650-001e-001b-66ab-eeb76e069631".into()),
        session_id: None,
        scheduled_enqueue_time: None,
        properties: BTreeMap::from([("aeg-event-type".into(), "Notification".into())]),
    };
    h.bus.send(event).await?;
    h.deliver_next("registry-events", "registry-push").await?;

    // 3. The scan message registry-push sent, delivered to scan-check.
    let scan_props = h.deliver_next("scan", "scan-check").await?;

    t.provider.force_flush()?;
    let spans = t.exporter.get_finished_spans()?;
    let webhook = spans
        .iter()
        .find(|s| s.name == "github-webhook" && s.span_kind == SpanKind::Server)
        .context("webhook request span")?;
    let created = one(&spans, "run.created", &run_id)?;
    let delivery = one(&spans, "registry-push", &run_id)?;
    let recorded = one(&spans, "run.image-recorded", &run_id)?;
    let scan = one(&spans, "scan-check", &run_id)?;

    // One trace from the push: webhook → run.created → run.image-recorded → scan-check.
    let trace = webhook.span_context.trace_id();
    assert_ne!(trace, TraceId::INVALID);
    assert_eq!(
        webhook.parent_span_id,
        SpanId::INVALID,
        "GitHub sends no traceparent: a root"
    );
    assert_eq!(attr(webhook, "run.id").as_deref(), Some(run_id.as_str()));
    assert_eq!(attr(webhook, "app").as_deref(), Some("web"));
    for span in [created, recorded, scan] {
        assert_eq!(
            span.span_context.trace_id(),
            trace,
            "{} in the run's trace",
            span.name
        );
        assert_eq!(attr(span, "run.id").as_deref(), Some(run_id.as_str()));
        assert_eq!(attr(span, "app").as_deref(), Some("web"), "{}", span.name);
    }
    assert_eq!(created.parent_span_id, webhook.span_context.span_id());
    assert_eq!(
        recorded.parent_span_id,
        created.span_context.span_id(),
        "parent = the run's context"
    );
    assert_eq!(
        scan.parent_span_id,
        recorded.span_context.span_id(),
        "parent = the scan message's traceparent"
    );
    assert!(scan.parent_span_is_remote);
    assert_eq!(scan.span_kind, SpanKind::Consumer);

    // The Event Grid delivery is a trace of its own, linked from the run's span.
    assert_ne!(delivery.span_context.trace_id(), trace);
    assert_eq!(delivery.parent_span_id, SpanId::INVALID);
    let links: Vec<_> = recorded
        .links
        .iter()
        .map(|l| l.span_context.clone())
        .collect();
    assert_eq!(links, vec![delivery.span_context.clone()]);

    // What travelled: the run record and the message property.
    let run = h
        .runs
        .find(&gantry_pipeline::RunId::parse(&run_id)?)
        .await?
        .context("run")?;
    let recorded_trace = run.trace.context("the run keeps its trace context")?;
    assert_eq!(
        recorded_trace.traceparent,
        format!("00-{trace}-{}-01", created.span_context.span_id())
    );
    assert_eq!(
        scan_props.get("traceparent"),
        Some(&format!(
            "00-{trace}-{}-01",
            recorded.span_context.span_id()
        ))
    );

    // JSON logs: every line logged inside an invocation of this run names the
    // run, the function and the trace.
    let logs = String::from_utf8(t.logs.0.lock().unwrap_or_else(|p| p.into_inner()).clone())?;
    let mut checked = BTreeMap::new();
    for line in logs.lines() {
        let value: Value =
            serde_json::from_str(line).with_context(|| format!("not JSON: {line}"))?;
        let Some(span) = value.get("span") else {
            continue;
        };
        if span["run.id"] != run_id.as_str() {
            continue;
        }
        let function = span["function"].as_str().context("function")?.to_string();
        let trace_id = span["trace_id"].as_str().context("trace_id")?;
        let expected = if function == "registry-push" && span["name"] == "invocation" {
            delivery.span_context.trace_id()
        } else {
            trace
        };
        assert_eq!(trace_id, expected.to_string(), "{line}");
        *checked.entry(function).or_insert(0) += 1;
    }
    assert!(
        checked.contains_key("scan-check"),
        "scan-check logged: {logs}"
    );
    assert!(
        checked.contains_key("registry-push"),
        "registry-push logged: {logs}"
    );
    Ok(())
}

/// What the fake OTLP collector received: (content type, body) per request.
type Received = Arc<Mutex<Vec<(String, Vec<u8>)>>>;

/// A local OTLP/HTTP collector: records `POST /v1/traces`, answers 200.
async fn fake_collector() -> Result<(String, Received)> {
    let received: Received = Arc::default();
    let store = received.clone();
    let app = Router::new().route(
        "/v1/traces",
        axum::routing::post(move |headers: http::HeaderMap, body: axum::body::Bytes| {
            let store = store.clone();
            async move {
                let content_type = headers
                    .get("content-type")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or_default()
                    .to_string();
                store
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push((content_type, body.to_vec()));
                (
                    [("content-type", "application/x-protobuf")],
                    Vec::<u8>::new(),
                )
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move { axum::serve(listener, app).await });
    Ok((format!("http://{addr}"), received))
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// Kills the child on drop, so a failed assertion leaves no process behind.
struct Child(std::process::Child);

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The real binary: `gantry dev` with `OTEL_EXPORTER_OTLP_ENDPOINT` exports its
/// spans over OTLP/HTTP (protobuf) with the batch processor, and
/// `GANTRY_LOG_FORMAT=json` writes JSON lines that name run, function and trace.
#[tokio::test]
async fn gantry_dev_exports_over_otlp_http_and_logs_json() -> Result<()> {
    use std::time::{Duration, Instant};
    let (endpoint, received) = fake_collector().await?;
    let dir = tempfile::tempdir()?;
    let stderr = std::fs::File::create(dir.path().join("stderr.log"))?;
    let port = gantry_testkit::free_port();
    let _child = Child(
        std::process::Command::new(env!("CARGO_BIN_EXE_gantry"))
            .args(["dev", "--state"])
            .arg(dir.path().join("state"))
            .args(["--port", &port.to_string()])
            .env_remove("GANTRY_GITHUB_WEBHOOK_SECRET")
            .env_remove("GANTRY_STORAGE")
            .env_remove("GANTRY_CONFIG")
            .env_remove("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
            .env_remove("OTEL_SDK_DISABLED")
            .env("OTEL_EXPORTER_OTLP_ENDPOINT", &endpoint)
            .env("OTEL_BSP_SCHEDULE_DELAY", "100")
            .env("GANTRY_LOG_FORMAT", "json")
            .env("GANTRY_LOG", "info")
            .stdout(std::process::Stdio::null())
            .stderr(stderr)
            .spawn()?,
    );
    let client = reqwest::Client::new();
    let url = |path: &str| format!("http://127.0.0.1:{port}{path}");
    let deadline = Instant::now() + Duration::from_secs(30);
    while !client
        .get(url("/api/health"))
        .send()
        .await
        .is_ok_and(|r| r.status().is_success())
    {
        ensure!(Instant::now() < deadline, "gantry dev did not start");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let body = support::example("github-push.json");
    let reply: Value = client
        .post(url("/api/github"))
        .header("content-type", "application/json")
        .header("x-github-event", "push")
        .header("x-github-delivery", "0b6c3f3e-2d0e-4a8e-9f55-8d1b0c7e2a44")
        .header(
            "x-hub-signature-256",
            gantry_runtime::signature::sign_sha256(support::DEV_SECRET.as_bytes(), &body),
        )
        .body(body)
        .send()
        .await?
        .json()
        .await?;
    let run_id = reply["runs"][0]["run_id"]
        .as_str()
        .context("run id")?
        .to_string();
    let status = client
        .post(url("/dev/queues/registry-events"))
        .header("content-type", "application/json")
        .body(support::example("acr-image-pushed.json"))
        .send()
        .await?
        .status();
    ensure!(status.is_success(), "enqueue: {status}");

    // The scan-check invocation's span reaches the collector once the scan ran.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let got = received.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let all: Vec<u8> = got.iter().flat_map(|(_, b)| b.clone()).collect();
        if contains(&all, b"scan-check") && contains(&all, run_id.as_bytes()) {
            for (content_type, _) in &got {
                assert_eq!(content_type, "application/x-protobuf");
            }
            for name in [
                "github-webhook",
                "run.created",
                "registry-push",
                "run.image-recorded",
            ] {
                assert!(contains(&all, name.as_bytes()), "{name} exported");
            }
            break;
        }
        ensure!(
            Instant::now() < deadline,
            "no scan-check span exported for run {run_id} ({} requests)",
            got.len()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let logs = std::fs::read_to_string(dir.path().join("stderr.log"))?;
    ensure!(
        !logs.contains(support::DEV_SECRET),
        "the webhook secret was logged"
    );
    let mut scan_lines = 0;
    for line in logs.lines() {
        let value: Value =
            serde_json::from_str(line).with_context(|| format!("not JSON: {line}"))?;
        ensure!(
            value["level"].is_string() && value["timestamp"].is_string(),
            "{line}"
        );
        if value["span"]["function"] == "scan-check" {
            assert_eq!(value["span"]["run.id"], run_id.as_str(), "{line}");
            let trace = value["span"]["trace_id"].as_str().context("trace_id")?;
            assert_eq!(trace.len(), 32, "{line}");
            scan_lines += 1;
        }
    }
    ensure!(scan_lines > 0, "no scan-check log line: {logs}");

    // The run names its trace, the one the scan-check lines carry.
    let show = std::process::Command::new(env!("CARGO_BIN_EXE_gantry"))
        .args(["runs", "show", &run_id, "--state"])
        .arg(dir.path().join("state"))
        .env_remove("GANTRY_STORAGE")
        .output()?;
    ensure!(
        show.status.success(),
        "{}",
        String::from_utf8_lossy(&show.stderr)
    );
    let show = String::from_utf8(show.stdout)?;
    let trace = show
        .lines()
        .find_map(|l| l.strip_prefix("trace    "))
        .with_context(|| format!("no trace line: {show}"))?;
    for line in logs.lines() {
        let value: Value = serde_json::from_str(line)?;
        if value["span"]["function"] == "scan-check" {
            assert_eq!(value["span"]["trace_id"], trace, "{line}");
        }
    }
    Ok(())
}

/// A mistyped `GANTRY_LOG_FORMAT` is a startup error naming the value, not a
/// silent fall-back to another format.
#[test]
fn an_unknown_log_format_is_refused_by_name() -> Result<()> {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_gantry"))
        .arg("functions")
        .env("GANTRY_LOG_FORMAT", "jsonl")
        .output()?;
    ensure!(!out.status.success(), "accepted GANTRY_LOG_FORMAT=jsonl");
    let stderr = String::from_utf8(out.stderr)?;
    ensure!(
        stderr.contains("GANTRY_LOG_FORMAT") && stderr.contains("\"jsonl\""),
        "{stderr}"
    );
    let ok = std::process::Command::new(env!("CARGO_BIN_EXE_gantry"))
        .arg("functions")
        .env("GANTRY_LOG_FORMAT", "json")
        .output()?;
    ensure!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    Ok(())
}
