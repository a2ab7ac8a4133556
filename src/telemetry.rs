//! Logs and traces of the process: the log format, and the OpenTelemetry
//! tracer provider (OTLP/HTTP export when an endpoint is configured).
//!
//! Propagation (`traceparent` on every message, run trace contexts) works
//! with or without an exporter; see `gantry_runtime::telemetry` and
//! `docs/telemetry.md`.

use gantry_runtime::telemetry::{self, LogFormat};
use opentelemetry_otlp::WithExportConfig as _;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::error::{OTelSdkError, OTelSdkResult};
use opentelemetry_sdk::trace::{SdkTracerProvider, SpanData, SpanExporter};
use std::sync::OnceLock;
use std::time::Duration;
use tracing_subscriber::EnvFilter;
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;

/// The tracer provider; flushes queued spans when dropped.
pub struct Telemetry {
    provider: SdkTracerProvider,
}

impl Drop for Telemetry {
    fn drop(&mut self) {
        // Export what the batch processor still holds (bounded by its timeout).
        let _ = self.provider.shutdown();
    }
}

/// The OTLP/HTTP exporter, built on its first export (on the batch
/// processor's thread): building the blocking HTTP client loads the TLS roots
/// and starts a thread, ~100 ms that would otherwise delay the handler's
/// first answer (the Functions host waits for the port).
#[derive(Debug, Default)]
struct LazyOtlp {
    inner: OnceLock<Option<opentelemetry_otlp::SpanExporter>>,
    resource: Option<Resource>,
}

impl LazyOtlp {
    fn exporter(&self) -> Option<&opentelemetry_otlp::SpanExporter> {
        self.inner
            .get_or_init(|| {
                match opentelemetry_otlp::SpanExporter::builder()
                    .with_http()
                    .with_protocol(opentelemetry_otlp::Protocol::HttpBinary)
                    .build()
                {
                    Ok(mut exporter) => {
                        if let Some(resource) = &self.resource {
                            exporter.set_resource(resource);
                        }
                        Some(exporter)
                    }
                    Err(e) => {
                        // Once: later batches are dropped without a word.
                        tracing::warn!("OTLP trace export disabled: {e}");
                        None
                    }
                }
            })
            .as_ref()
    }
}

impl SpanExporter for LazyOtlp {
    async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
        match self.exporter() {
            Some(exporter) => exporter.export(batch).await,
            None => Err(OTelSdkError::InternalFailure(
                "OTLP exporter unavailable".into(),
            )),
        }
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        match self.inner.get() {
            Some(Some(exporter)) => exporter.shutdown_with_timeout(timeout),
            _ => Ok(()),
        }
    }

    fn force_flush(&self) -> OTelSdkResult {
        match self.inner.get() {
            Some(Some(exporter)) => exporter.force_flush(),
            _ => Ok(()),
        }
    }

    fn set_resource(&mut self, resource: &Resource) {
        self.resource = Some(resource.clone());
    }
}

/// Whether a variable read with a literal name (so the settings scan in
/// `tests/infra.rs` sees it) is set and not blank.
fn env_set(value: Result<String, std::env::VarError>) -> bool {
    value.is_ok_and(|v| !v.trim().is_empty())
}

/// Whether spans are exported: the standard OTLP endpoint variables, unless
/// `OTEL_SDK_DISABLED=true` or `OTEL_TRACES_EXPORTER=none`.
fn exporting() -> bool {
    let disabled = std::env::var("OTEL_SDK_DISABLED").is_ok_and(|v| v.eq_ignore_ascii_case("true"))
        || std::env::var("OTEL_TRACES_EXPORTER").is_ok_and(|v| v.eq_ignore_ascii_case("none"));
    !disabled
        && (env_set(std::env::var("OTEL_EXPORTER_OTLP_ENDPOINT"))
            || env_set(std::env::var("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")))
}

/// Installs the global subscriber: the log layer (`GANTRY_LOG` filter) and the
/// OpenTelemetry layer. Call before the tokio runtime starts: the OTLP
/// exporter's blocking HTTP client must not be built inside it.
pub fn init(format: LogFormat) -> Telemetry {
    let mut builder = SdkTracerProvider::builder();
    let export = exporting();
    if export {
        // Batch: spans are queued and exported from the SDK's own thread,
        // never on an invocation's path.
        builder = builder.with_batch_exporter(LazyOtlp::default());
    }
    let resource = if env_set(std::env::var("OTEL_SERVICE_NAME")) {
        Resource::builder().build()
    } else {
        Resource::builder().with_service_name("gantry").build()
    };
    let provider = builder.with_resource(resource).build();

    let filter = EnvFilter::try_from_env("GANTRY_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    tracing_subscriber::registry()
        .with(telemetry::log_layer(format, filter, std::io::stderr))
        .with(telemetry::layer(&provider, export))
        .init();
    if !export && env_set(std::env::var("APPLICATIONINSIGHTS_CONNECTION_STRING")) {
        // The Functions host uses the connection string for its own telemetry;
        // gantry's spans need an OTLP endpoint (a collector exporting to Azure
        // Monitor), see docs/telemetry.md.
        tracing::info!(
            "APPLICATIONINSIGHTS_CONNECTION_STRING is set but OTEL_EXPORTER_OTLP_ENDPOINT is not: gantry's traces are not exported"
        );
    }
    Telemetry { provider }
}
