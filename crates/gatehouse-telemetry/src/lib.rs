//! Logging and tracing setup shared by the Gatehouse binaries: tracing to
//! stderr, as text or JSON, filtered by `--log-level` or `RUST_LOG`; and,
//! when an OTLP endpoint is given, OpenTelemetry traces of the data plane's
//! requests exported over OTLP/gRPC (see [`otel`]).
#![forbid(unsafe_code)]

pub mod otel;

use std::io::IsTerminal;

use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

pub use otel::{OtlpConfig, TelemetryError, Tracing};

/// The tracing target of the spans that become OpenTelemetry spans (one per
/// request and one per pipeline stage). They never reach the log lines.
pub const TRACE_TARGET: &str = "gatehouse::trace";

/// How log lines are written.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line, for log shippers.
    Json,
}

/// Installs the global subscriber. `level` is a filter such as `info` or
/// `gatehouse_control=debug,info`; `RUST_LOG` wins when set.
pub fn init(format: LogFormat, level: &str) {
    // Without an exporter nothing can fail.
    let _ = init_with_traces(format, level, None);
}

/// Like [`init`], and exports the request spans over OTLP when `otlp` is
/// given. Keep the returned [`Tracing`] until exit and call
/// [`Tracing::shutdown`] then, so the last spans are sent.
///
/// Must be called inside a tokio runtime when `otlp` is given (the gRPC
/// channel lives on it).
pub fn init_with_traces(
    format: LogFormat,
    level: &str,
    otlp: Option<&OtlpConfig>,
) -> Result<Tracing, TelemetryError> {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(level));
    // The request spans are for the trace exporter only: in log lines they
    // would only add noise, and without an exporter they stay disabled and
    // cost a branch.
    let filter = match format!("{TRACE_TARGET}=off").parse() {
        Ok(directive) => filter.add_directive(directive),
        Err(_) => filter,
    };
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    let fmt = match format {
        LogFormat::Text => fmt.with_filter(filter).boxed(),
        LogFormat::Json => fmt.json().with_filter(filter).boxed(),
    };
    let (traces, tracing) = match otlp {
        Some(cfg) => {
            let (layer, tracing) = otel::layer(cfg)?;
            (Some(layer), tracing)
        }
        None => (None, Tracing::default()),
    };
    // A second init (tests) keeps the first subscriber.
    let _ = tracing_subscriber::registry()
        .with(fmt)
        .with(traces)
        .try_init();
    Ok(tracing)
}
