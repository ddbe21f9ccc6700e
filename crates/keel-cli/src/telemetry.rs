//! Logging and, when an OTLP endpoint is configured, OpenTelemetry trace export.
//!
//! The broker's produce, fetch, subscribe, admin and group handlers are `tracing` spans; with
//! `--otlp-endpoint` (or `KEEL_OTLP_ENDPOINT`, or OpenTelemetry's own
//! `OTEL_EXPORTER_OTLP_ENDPOINT`) they are also exported over OTLP/gRPC, filtered by
//! `KEEL_OTLP_FILTER` (default: Keel's debug-level spans), independently of what `RUST_LOG`
//! prints to stderr.

use anyhow::{Context, Result};
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::WithExportConfig as _;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_subscriber::EnvFilter;
use tracing_subscriber::Layer as _;
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;

/// What the exporter sends when `KEEL_OTLP_FILTER` does not say: the request spans.
const DEFAULT_OTLP_FILTER: &str = "keel_broker=debug,keel_raft=info,warn";

/// Flushes and stops the exporter when dropped, so spans of the last moments are sent.
pub struct Telemetry(Option<SdkTracerProvider>);

impl Drop for Telemetry {
    fn drop(&mut self) {
        if let Some(p) = self.0.take()
            && let Err(e) = p.shutdown()
        {
            eprintln!("keel: flushing OpenTelemetry spans failed: {e}");
        }
    }
}

/// The endpoint to export to, from the flag or the environment.
pub fn otlp_endpoint(flag: Option<&str>) -> Option<String> {
    flag.map(str::to_owned)
        .or_else(|| std::env::var("OTEL_EXPORTER_OTLP_ENDPOINT").ok())
        .filter(|e| !e.trim().is_empty())
}

/// Installs the global subscriber: text or JSON lines on stderr filtered by `RUST_LOG` (else
/// `default_level`), plus the OTLP layer when `otlp` is given. Must run inside a tokio runtime
/// when exporting (the batch exporter runs on it).
pub fn init(json: bool, default_level: &str, otlp: Option<(&str, &str)>) -> Result<Telemetry> {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_level));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let fmt = tracing_subscriber::fmt::layer()
        .with_ansi(ansi)
        .with_writer(std::io::stderr);
    let fmt = if json {
        fmt.json().boxed()
    } else {
        fmt.boxed()
    };
    let registry = tracing_subscriber::registry().with(fmt.with_filter(filter));
    let Some((endpoint, service)) = otlp else {
        registry.init();
        return Ok(Telemetry(None));
    };
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_tonic()
        .with_endpoint(endpoint)
        .build()
        .with_context(|| format!("setting up the OTLP exporter for {endpoint}"))?;
    let processor =
        opentelemetry_sdk::trace::span_processor_with_async_runtime::BatchSpanProcessor::builder(
            exporter,
            opentelemetry_sdk::runtime::Tokio,
        )
        .build();
    let provider = SdkTracerProvider::builder()
        .with_span_processor(processor)
        .with_resource(
            Resource::builder()
                .with_service_name(service.to_owned())
                .build(),
        )
        .build();
    let otel_filter = std::env::var("KEEL_OTLP_FILTER")
        .ok()
        .map_or_else(|| EnvFilter::new(DEFAULT_OTLP_FILTER), EnvFilter::new);
    let layer = tracing_opentelemetry::layer()
        .with_tracer(provider.tracer("keel"))
        .with_filter(otel_filter);
    registry.with(layer).init();
    tracing::info!(endpoint, "exporting traces over OTLP");
    Ok(Telemetry(Some(provider)))
}
