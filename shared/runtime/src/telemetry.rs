//! Distributed tracing across functions, and the log format.
//!
//! gantry's spans are ordinary `tracing` spans; the `tracing-opentelemetry`
//! layer from [`layer`] gives each one an OpenTelemetry span context, so that:
//!
//! - every message gantry sends carries the W3C `traceparent` (and
//!   `tracestate`) of the span that sent it as application properties
//!   ([`inject`], called by [`crate::Deps::send`]);
//! - every invocation span takes the message's `traceparent` as its parent
//!   ([`invocation_span`]), every HTTP request span the request's
//!   `traceparent` header ([`http_span`]); a missing or malformed one starts a
//!   new trace, never an error;
//! - a run keeps the trace context of the span that created it
//!   ([`gantry_pipeline::Run::trace`], set from [`current`]), and a step
//!   triggered by an event that knows nothing of the run (an Event Grid image
//!   push) continues the run's trace with [`run_span`].
//!
//! Whether spans are exported (OTLP) is the binary's choice: the provider
//! handed to [`layer`] may have no exporter at all, and then the spans only
//! produce ids for propagation.

use std::collections::BTreeMap;

use gantry_bus::OutMessage;
use gantry_pipeline::{Run, TraceContext};
use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::{TraceContextExt, TracerProvider as _};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing::field::Empty;
use tracing::{Level, Span, Subscriber};
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::Layer;
use tracing_subscriber::filter::filter_fn;
use tracing_subscriber::registry::LookupSpan;

use crate::MessageMeta;

/// Message property (and HTTP header) carrying the W3C trace parent.
pub const TRACEPARENT: &str = "traceparent";
/// Message property (and HTTP header) carrying the W3C trace state.
pub const TRACESTATE: &str = "tracestate";
/// Message property naming the run a message is about.
pub const RUN_ID: &str = "run-id";
/// Message property naming the app a message is about.
pub const APP: &str = "app";

struct Properties<'a>(&'a BTreeMap<String, String>);

impl Extractor for Properties<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).map(String::as_str)
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(String::as_str).collect()
    }
}

struct PropertiesMut<'a>(&'a mut BTreeMap<String, String>);

impl Injector for PropertiesMut<'_> {
    fn set(&mut self, key: &str, value: String) {
        self.0.insert(key.to_string(), value);
    }
}

struct Headers<'a>(&'a http::HeaderMap);

impl Extractor for Headers<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(http::HeaderName::as_str).collect()
    }
}

/// Whether `value` is a W3C `traceparent` of the shape the spec requires:
/// `{version}-{trace-id}-{parent-id}-{flags}` in lower-case hex of exactly 2,
/// 32, 16 and 2 digits (version `ff` is invalid; a future version may append
/// fields after the flags). The SDK's propagator alone accepts shorter ids
/// and upper case, which would let a mangled header join an unrelated trace.
fn is_well_formed_traceparent(value: &str) -> bool {
    let hex = |s: &str, n: usize| {
        s.len() == n
            && s.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    };
    let mut parts = value.trim().split('-');
    let (Some(version), Some(trace), Some(parent), Some(flags)) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return false;
    };
    let rest_ok = match version {
        "00" => parts.next().is_none(),
        _ => true,
    };
    hex(version, 2)
        && version != "ff"
        && hex(trace, 32)
        && hex(parent, 16)
        && hex(flags, 2)
        && rest_ok
}

/// The remote parent in `carrier`, if it holds a valid `traceparent`: the
/// shape is checked here, all-zero ids by the propagator; a bad value yields
/// no parent (a new trace), never an error.
fn extract(carrier: &dyn Extractor) -> Option<opentelemetry::Context> {
    if !carrier
        .get(TRACEPARENT)
        .is_some_and(is_well_formed_traceparent)
    {
        return None;
    }
    let cx = TraceContextPropagator::new().extract(carrier);
    cx.span().span_context().is_valid().then_some(cx)
}

/// The parent context carried in message properties (`traceparent`, `tracestate`).
pub fn parent_from_properties(
    properties: &BTreeMap<String, String>,
) -> Option<opentelemetry::Context> {
    extract(&Properties(properties))
}

/// The parent context carried in HTTP request headers.
pub fn parent_from_headers(headers: &http::HeaderMap) -> Option<opentelemetry::Context> {
    extract(&Headers(headers))
}

/// The context a run recorded, as a parent.
pub fn parent_from_run(trace: &TraceContext) -> Option<opentelemetry::Context> {
    let mut map = BTreeMap::new();
    map.insert(TRACEPARENT.to_string(), trace.traceparent.clone());
    if let Some(state) = &trace.tracestate {
        map.insert(TRACESTATE.to_string(), state.clone());
    }
    parent_from_properties(&map)
}

/// The W3C trace context of `span`, if it has a valid one (it has whenever the
/// OpenTelemetry layer is installed and the span is enabled).
pub fn context_of(span: &Span) -> Option<TraceContext> {
    let cx = span.context();
    if !cx.span().span_context().is_valid() {
        return None;
    }
    let mut map = BTreeMap::new();
    TraceContextPropagator::new().inject_context(&cx, &mut PropertiesMut(&mut map));
    Some(TraceContext {
        traceparent: map.remove(TRACEPARENT)?,
        tracestate: map.remove(TRACESTATE).filter(|s| !s.is_empty()),
    })
}

/// The trace context of the current span: what a new run records.
pub fn current() -> Option<TraceContext> {
    context_of(&Span::current())
}

/// The trace id of `span` as 32 hex digits, if it has one.
pub fn trace_id(span: &Span) -> Option<String> {
    let cx = span.context();
    let sc = cx.span().span_context().clone();
    sc.is_valid().then(|| sc.trace_id().to_string())
}

/// Adds the current span's `traceparent` / `tracestate` to `message`, unless
/// the caller set them already (a message sent on behalf of another trace).
pub fn inject(message: &mut OutMessage) {
    if message.properties.contains_key(TRACEPARENT) {
        return;
    }
    if let Some(trace) = current() {
        message
            .properties
            .insert(TRACEPARENT.to_string(), trace.traceparent);
        if let Some(state) = trace.tracestate {
            message.properties.insert(TRACESTATE.to_string(), state);
        }
    }
}

/// Records the span's trace id in its `trace_id` field, for the logs. Called
/// after the parent is set: asking for the context starts the span.
fn record_trace_id(span: &Span) {
    if let Some(id) = trace_id(span) {
        span.record("trace_id", id.as_str());
    }
}

/// The span of one queue or timer invocation of `function`: parent = the
/// message's `traceparent` when valid (else a new trace), with `run.id` and
/// `app` from the message properties gantry sets on its own messages.
pub fn invocation_span(function: &'static str, meta: &MessageMeta) -> Span {
    let span = tracing::info_span!(
        "invocation",
        otel.name = function,
        otel.kind = "consumer",
        function,
        run.id = Empty,
        app = Empty,
        message_id = Empty,
        delivery_count = meta.delivery_count,
        trace_id = Empty,
    );
    if let Some(run) = meta.properties.get(RUN_ID) {
        span.record("run.id", run.as_str());
    }
    if let Some(app) = meta.properties.get(APP) {
        span.record("app", app.as_str());
    }
    if let Some(id) = &meta.message_id {
        span.record("message_id", id.as_str());
    }
    if let Some(parent) = parent_from_properties(&meta.properties) {
        // Fails only without the OpenTelemetry layer (nothing to parent then).
        let _ = span.set_parent(parent);
    }
    record_trace_id(&span);
    span
}

/// The span of one forwarded HTTP request to `function`: parent = the
/// request's `traceparent` header when valid, else a new trace (GitHub sends
/// none). `run.id` and `app` are recorded by the function once it knows them.
pub fn http_span(function: &'static str, method: &http::Method, headers: &http::HeaderMap) -> Span {
    let span = tracing::info_span!(
        "request",
        otel.name = function,
        otel.kind = "server",
        function,
        http.request.method = %method,
        http.response.status_code = Empty,
        run.id = Empty,
        app = Empty,
        trace_id = Empty,
    );
    if let Some(parent) = parent_from_headers(headers) {
        let _ = span.set_parent(parent);
    }
    record_trace_id(&span);
    span
}

/// A span named `name` of `function` doing work for `run`, in the run's trace:
/// its parent is the context the run recorded when it was created, whatever
/// triggered this invocation. The current span (e.g. the Event Grid delivery,
/// which may carry events of several runs) becomes a link. A run without a
/// recorded context (older records) gets an ordinary child of the current span.
pub fn run_span(name: &'static str, function: &'static str, run: &Run) -> Span {
    let span = tracing::info_span!(
        "run",
        otel.name = name,
        function,
        run.id = %run.id,
        app = %run.app,
        trace_id = Empty,
    );
    if let Some(parent) = run.trace.as_ref().and_then(parent_from_run) {
        let delivery = Span::current().context().span().span_context().clone();
        let same_trace = delivery.trace_id() == parent.span().span_context().trace_id();
        if span.set_parent(parent).is_ok() && delivery.is_valid() && !same_trace {
            span.add_link(delivery);
        }
    }
    record_trace_id(&span);
    span
}

/// A span in `run`'s trace for work on the run started from elsewhere (an
/// operator's approval arrives in the request's own trace): `Some` only when
/// the run recorded a context and the current span is in another trace;
/// `None` when the current span already belongs to the run's trace (every
/// step invoked by a message of the run) or the run has no context.
pub fn continue_run(name: &'static str, run: &Run) -> Option<Span> {
    let parent = run.trace.as_ref().and_then(parent_from_run)?;
    let current = Span::current().context().span().span_context().trace_id();
    if current == parent.span().span_context().trace_id() {
        return None;
    }
    let span = tracing::info_span!(
        "run",
        otel.name = name,
        run.id = %run.id,
        app = %run.app,
        trace_id = Empty,
    );
    let from = Span::current().context().span().span_context().clone();
    if span.set_parent(parent).is_ok() && from.is_valid() {
        span.add_link(from);
    }
    record_trace_id(&span);
    Some(span)
}

/// A child of the current span for creating run `run_id` of `app`: its
/// context is what the new run records as [`Run::trace`].
pub fn new_run_span(name: &'static str, function: &'static str, app: &str, run_id: &str) -> Span {
    let span = tracing::info_span!(
        "run",
        otel.name = name,
        function,
        run.id = run_id,
        app,
        trace_id = Empty,
    );
    record_trace_id(&span);
    span
}

/// Records `run.id` and `app` on `span` (declared empty by [`http_span`] and
/// [`invocation_span`]) once a function knows which run it works on.
pub fn record_run(span: &Span, app: &str, run_id: &str) {
    span.record("app", app);
    span.record("run.id", run_id);
}

/// Whether a span or event comes from gantry itself (the binary, its shared
/// crates and its functions), not from a dependency (HTTP clients, Azure SDK).
fn is_gantry(target: &str) -> bool {
    target.starts_with("gantry") || target.starts_with("fn_")
}

/// The `tracing` layer that turns gantry's spans into OpenTelemetry spans of
/// `provider`. Only gantry's own spans at INFO and above take part; events
/// become span events only when `with_events` (an exporter is configured):
/// without one, the layer costs a span context per gantry span and nothing more.
pub fn layer<S>(
    provider: &SdkTracerProvider,
    with_events: bool,
) -> Box<dyn Layer<S> + Send + Sync + 'static>
where
    S: Subscriber + for<'a> LookupSpan<'a> + Send + Sync,
{
    let tracer = provider.tracer("gantry");
    tracing_opentelemetry::layer()
        .with_tracer(tracer)
        .with_tracked_inactivity(false)
        .with_threads(false)
        .with_location(false)
        .with_filter(filter_fn(move |m| {
            *m.level() <= Level::INFO && is_gantry(m.target()) && (with_events || m.is_span())
        }))
        .boxed()
}

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    /// One JSON object per line (`gantry serve`: the Functions host collects stdout/stderr).
    Json,
    /// Compact human-readable lines (`gantry dev` and the CLI).
    Text,
}

impl LogFormat {
    /// `GANTRY_LOG_FORMAT` (`json` or `text`), else `default`. An unknown value
    /// is an error naming it, so a typo does not silently change the format.
    pub fn from_env(default: LogFormat) -> Result<LogFormat, String> {
        match std::env::var("GANTRY_LOG_FORMAT") {
            Err(_) => Ok(default),
            Ok(v) => match v.trim().to_ascii_lowercase().as_str() {
                "" => Ok(default),
                "json" => Ok(LogFormat::Json),
                "text" => Ok(LogFormat::Text),
                other => Err(format!(
                    "GANTRY_LOG_FORMAT must be `json` or `text`, not {other:?}"
                )),
            },
        }
    }
}

/// The log layer: JSON lines carry the event's fields at the top level and
/// the fields of the current span (`function`, `run.id`, `app`, `trace_id`)
/// under `span`, plus the whole span stack under `spans`.
///
/// `filter` (from `GANTRY_LOG`) selects the events; gantry's own spans stay
/// visible to the layer whatever it says, so that `GANTRY_LOG=warn` still
/// writes the run, function and trace of a warning.
pub fn log_layer<S, W>(
    format: LogFormat,
    filter: tracing_subscriber::EnvFilter,
    writer: W,
) -> Box<dyn Layer<S> + Send + Sync + 'static>
where
    S: Subscriber + for<'a> LookupSpan<'a> + Send + Sync,
    W: for<'w> tracing_subscriber::fmt::MakeWriter<'w> + Send + Sync + 'static,
{
    use tracing_subscriber::filter::FilterExt as _;
    let filter = filter.or(filter_fn(|m| {
        m.is_span() && *m.level() <= Level::INFO && is_gantry(m.target())
    }));
    let layer = tracing_subscriber::fmt::layer().with_writer(writer);
    match format {
        LogFormat::Json => layer
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .with_span_list(true)
            .with_filter(filter)
            .boxed(),
        LogFormat::Text => layer.compact().with_filter(filter).boxed(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use opentelemetry::trace::{SpanId, TraceId};
    use opentelemetry_sdk::trace::InMemorySpanExporter;
    use tracing::Instrument as _;
    use tracing_subscriber::layer::SubscriberExt;

    const PARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    fn tracing_with_exporter() -> (InMemorySpanExporter, SdkTracerProvider, tracing::Dispatch) {
        let exporter = InMemorySpanExporter::default();
        let provider = SdkTracerProvider::builder()
            .with_simple_exporter(exporter.clone())
            .build();
        let subscriber = tracing_subscriber::registry().with(layer(&provider, true));
        (exporter, provider, tracing::Dispatch::new(subscriber))
    }

    #[test]
    fn traceparent_round_trips_through_a_message_property_and_the_envelope() {
        let (exporter, provider, dispatch) = tracing_with_exporter();
        tracing::dispatcher::with_default(&dispatch, || {
            // Sender side: a span with a remote parent sends a message.
            let mut props = BTreeMap::new();
            props.insert(TRACEPARENT.to_string(), PARENT.to_string());
            props.insert(TRACESTATE.to_string(), "congo=t61rcWkgMzE".to_string());
            let meta = MessageMeta {
                properties: props,
                ..MessageMeta::default()
            };
            let sender = invocation_span("registry-push", &meta);
            let mut message = OutMessage::json("scan", &serde_json::json!({})).expect("json");
            sender.in_scope(|| inject(&mut message));
            gantry_bus::validate(&message).expect("traceparent is a valid property name");
            let sent = message
                .properties
                .get(TRACEPARENT)
                .expect("traceparent set")
                .clone();
            assert!(
                sent.starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-"),
                "{sent}"
            );
            assert!(
                !sent.contains("00f067aa0ba902b7"),
                "the sender's own span id, not its parent's"
            );
            assert_eq!(
                message.properties.get(TRACESTATE).map(String::as_str),
                Some("congo=t61rcWkgMzE")
            );

            // Receiver side: the properties as the host delivers them.
            let request = crate::envelope::host_request_for_message(
                "message",
                false,
                b"{}",
                "m-1",
                1,
                None,
                "2026-11-27T10:00:00Z",
                &message.properties,
            );
            let wire = serde_json::to_vec(&request).expect("json");
            let back: crate::InvokeRequest = serde_json::from_slice(&wire).expect("json");
            let received = MessageMeta::from_metadata(&back.metadata);
            let receiver = invocation_span("scan-check", &received);
            drop(receiver);
            drop(sender);
        });
        provider.force_flush().expect("flush");
        let spans = exporter.get_finished_spans().expect("spans");
        let find = |name: &str| spans.iter().find(|s| s.name == name).expect(name).clone();
        let (sender, receiver) = (find("registry-push"), find("scan-check"));
        let trace = TraceId::from_hex("4bf92f3577b34da6a3ce929d0e0e4736").expect("hex");
        assert_eq!(sender.span_context.trace_id(), trace);
        assert_eq!(
            sender.parent_span_id,
            SpanId::from_hex("00f067aa0ba902b7").expect("hex")
        );
        assert_eq!(receiver.span_context.trace_id(), trace);
        assert_eq!(receiver.parent_span_id, sender.span_context.span_id());
        assert!(receiver.parent_span_is_remote);
    }

    #[test]
    fn a_malformed_traceparent_starts_a_new_trace() {
        let (exporter, provider, dispatch) = tracing_with_exporter();
        let bad = [
            "not a traceparent",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "",
        ];
        tracing::dispatcher::with_default(&dispatch, || {
            for value in bad {
                let mut props = BTreeMap::new();
                props.insert(TRACEPARENT.to_string(), value.to_string());
                assert!(
                    parent_from_properties(&props).is_none(),
                    "{value:?} accepted"
                );
                let meta = MessageMeta {
                    properties: props,
                    ..MessageMeta::default()
                };
                let span = invocation_span("scan-check", &meta);
                assert!(
                    trace_id(&span).is_some(),
                    "{value:?}: the span still has a trace"
                );
            }
        });
        provider.force_flush().expect("flush");
        let spans = exporter.get_finished_spans().expect("spans");
        assert_eq!(spans.len(), bad.len());
        let mut traces = std::collections::BTreeSet::new();
        for span in &spans {
            assert_eq!(
                span.parent_span_id,
                SpanId::INVALID,
                "{span:?} has a parent"
            );
            assert_ne!(
                span.span_context.trace_id(),
                TraceId::from_hex("4bf92f3577b34da6a3ce929d0e0e4736").expect("hex")
            );
            traces.insert(span.span_context.trace_id().to_string());
        }
        assert_eq!(traces.len(), bad.len(), "each one a new root");
    }

    #[test]
    fn without_the_layer_nothing_is_injected_and_nothing_fails() {
        let mut message = OutMessage::json("scan", &serde_json::json!({})).expect("json");
        let meta = MessageMeta::default();
        let span = invocation_span("scan-check", &meta);
        span.in_scope(|| inject(&mut message));
        assert!(!message.properties.contains_key(TRACEPARENT));
        assert_eq!(current(), None);
    }

    #[test]
    fn a_run_span_continues_the_runs_trace_and_links_the_delivery() {
        let (exporter, provider, dispatch) = tracing_with_exporter();
        let id = gantry_pipeline::ids::new_run_id(1_764_237_600_000);
        let run_id = id.to_string();
        tracing::dispatcher::with_default(&dispatch, || {
            let mut run = Run::new(
                id,
                gantry_pipeline::AppName::parse("web").expect("app"),
                gantry_pipeline::RunStatus::Scanning,
                gantry_pipeline::Source {
                    kind: gantry_pipeline::SourceKind::Github,
                    repo: None,
                    commit: None,
                    git_ref: None,
                    pusher: None,
                    delivery: None,
                    message: None,
                },
                time::OffsetDateTime::UNIX_EPOCH,
            );
            run.trace = Some(TraceContext {
                traceparent: PARENT.into(),
                tracestate: None,
            });
            let delivery = invocation_span("registry-push", &MessageMeta::default());
            delivery.in_scope(|| {
                let span = run_span("registry-push run", "registry-push", &run);
                drop(span);
            });
        });
        provider.force_flush().expect("flush");
        let spans = exporter.get_finished_spans().expect("spans");
        let delivery = spans
            .iter()
            .find(|s| s.name == "registry-push")
            .expect("delivery");
        let run = spans
            .iter()
            .find(|s| s.name == "registry-push run")
            .expect("run span");
        assert_eq!(
            run.span_context.trace_id(),
            TraceId::from_hex("4bf92f3577b34da6a3ce929d0e0e4736").expect("hex")
        );
        assert_eq!(
            run.parent_span_id,
            SpanId::from_hex("00f067aa0ba902b7").expect("hex")
        );
        let links: Vec<_> = run.links.iter().map(|l| l.span_context.span_id()).collect();
        assert_eq!(links, vec![delivery.span_context.span_id()]);
        let attr = |k: &str| {
            run.attributes
                .iter()
                .find(|kv| kv.key.as_str() == k)
                .map(|kv| kv.value.to_string())
        };
        assert_eq!(attr("run.id"), Some(run_id));
        assert_eq!(attr("app").as_deref(), Some("web"));
    }

    #[tokio::test]
    async fn a_step_queued_from_another_trace_continues_the_runs_trace() {
        let (exporter, provider, dispatch) = tracing_with_exporter();
        let _guard = tracing::dispatcher::set_default(&dispatch);
        let dir = tempfile::tempdir().expect("tempdir");
        let store = gantry_store::fs::FsStore::open(dir.path().join("store")).expect("store");
        let bus = gantry_bus::EmbeddedBus::open(dir.path().join("bus"), Default::default())
            .await
            .expect("bus");
        let config = "[[apps]]\nname = \"web\"\nrepo = \"contoso/web\"\nimage = \"contoso.azurecr.io/web\"\n";
        let deps = crate::Deps {
            runs: gantry_pipeline::RunStore::new(std::sync::Arc::new(store)),
            bus: std::sync::Arc::new(bus.clone()),
            config: std::sync::Arc::new(
                gantry_pipeline::Config::parse(config, "test.toml").expect("config"),
            ),
            secrets: Default::default(),
            services: Default::default(),
        };
        let mut run = Run::new(
            gantry_pipeline::ids::new_run_id(1_764_237_600_000),
            gantry_pipeline::AppName::parse("web").expect("app"),
            gantry_pipeline::RunStatus::Deploying,
            gantry_pipeline::Source {
                kind: gantry_pipeline::SourceKind::Github,
                repo: None,
                commit: None,
                git_ref: None,
                pusher: None,
                delivery: None,
                message: None,
            },
            time::OffsetDateTime::UNIX_EPOCH,
        );
        run.trace = Some(TraceContext {
            traceparent: PARENT.into(),
            tracestate: None,
        });
        let digest = gantry_pipeline::Digest::parse(
            "sha256:b5b2b2c507a0944348e0303114d8d93aaaa081732b86451d9bce1f432a537bc7",
        )
        .expect("digest");
        // An operator's request: a trace of its own.
        let request = http_span("runs-api", &http::Method::POST, &http::HeaderMap::new());
        crate::steps::send_step(&deps, "deploy", "deploy", &run, &digest, 1, Some(&run.app))
            .instrument(request.clone())
            .await
            .expect("sent");
        // A step invoked by a message of the run: already in its trace.
        let mut props = BTreeMap::new();
        props.insert(TRACEPARENT.to_string(), PARENT.to_string());
        let invocation = invocation_span(
            "policy-enforce",
            &MessageMeta {
                properties: props,
                ..MessageMeta::default()
            },
        );
        crate::steps::send_step(&deps, "deploy", "deploy", &run, &digest, 2, Some(&run.app))
            .instrument(invocation.clone())
            .await
            .expect("sent");
        let request_id = request.context().span().span_context().span_id();
        let invocation_id = invocation.context().span().span_context().span_id();
        drop((request, invocation));
        provider.force_flush().expect("flush");
        let spans = exporter.get_finished_spans().expect("spans");
        let queued: Vec<_> = spans
            .iter()
            .filter(|s| s.name == "run.step-queued")
            .collect();
        assert_eq!(
            queued.len(),
            1,
            "only the send from another trace gets a span"
        );
        let queued = queued[0];
        let trace = TraceId::from_hex("4bf92f3577b34da6a3ce929d0e0e4736").expect("hex");
        assert_eq!(queued.span_context.trace_id(), trace);
        assert_eq!(
            queued.parent_span_id,
            SpanId::from_hex("00f067aa0ba902b7").expect("hex")
        );
        let links: Vec<_> = queued
            .links
            .iter()
            .map(|l| l.span_context.span_id())
            .collect();
        assert_eq!(links, vec![request_id]);

        let sent: Vec<_> = bus
            .peek("deploy")
            .await
            .into_iter()
            .map(|m| m.properties.get(TRACEPARENT).cloned().expect("traceparent"))
            .collect();
        assert_eq!(
            sent,
            vec![
                format!("00-{trace}-{}-01", queued.span_context.span_id()),
                format!("00-{trace}-{invocation_id}-01"),
            ]
        );
    }

    #[test]
    fn a_warning_names_its_run_function_and_trace_even_at_warn_level() {
        #[derive(Clone, Default)]
        struct Buf(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);
        impl std::io::Write for Buf {
            fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
                self.0
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .extend_from_slice(b);
                Ok(b.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let buf = Buf::default();
        let writer = buf.clone();
        let provider = SdkTracerProvider::builder().build();
        let subscriber = tracing_subscriber::registry()
            .with(log_layer(
                LogFormat::Json,
                tracing_subscriber::EnvFilter::new("warn"),
                move || writer.clone(),
            ))
            .with(layer(&provider, false));
        let mut props = BTreeMap::new();
        props.insert(TRACEPARENT.to_string(), PARENT.to_string());
        props.insert(RUN_ID.to_string(), "01m8e2484ydfe6ak73dgnr3tx6".to_string());
        props.insert(APP.to_string(), "web".to_string());
        tracing::subscriber::with_default(subscriber, || {
            let span = invocation_span(
                "scan-check",
                &MessageMeta {
                    properties: props,
                    ..MessageMeta::default()
                },
            );
            span.in_scope(|| {
                tracing::info!("not written at warn");
                tracing::warn!("transient failure");
            });
        });
        let text = String::from_utf8(buf.0.lock().expect("lock").clone()).expect("utf8");
        let lines: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).expect("a JSON line"))
            .collect();
        assert_eq!(lines.len(), 1, "{text}");
        let line = &lines[0];
        assert_eq!(line["message"], "transient failure");
        assert_eq!(line["level"], "WARN");
        assert_eq!(line["span"]["function"], "scan-check");
        assert_eq!(line["span"]["run.id"], "01m8e2484ydfe6ak73dgnr3tx6");
        assert_eq!(line["span"]["app"], "web");
        assert_eq!(line["span"]["trace_id"], "4bf92f3577b34da6a3ce929d0e0e4736");
    }
}
