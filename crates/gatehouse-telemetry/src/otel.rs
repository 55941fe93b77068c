//! OpenTelemetry traces over OTLP/gRPC (tonic): the exporter, the sampler,
//! and the `tracing` layer that turns the data plane's request spans (target
//! [`crate::TRACE_TARGET`]) into OpenTelemetry spans.
//!
//! Sampling is head sampling, parent-based: a request whose incoming
//! `traceparent` says sampled (or not) is recorded (or not) accordingly; a
//! request that starts a trace is recorded with probability `sample_ratio`.
//! Spans are batched and sent in the background; a full batch queue drops
//! spans rather than slowing requests.

use std::time::Duration;

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::{WithExportConfig, WithTonicConfig};
use opentelemetry_sdk::trace::{Sampler, SdkTracerProvider};
use opentelemetry_sdk::Resource;
use tracing_subscriber::filter::Targets;
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::Layer;

/// Where and how much to trace.
#[derive(Clone, Debug, PartialEq)]
pub struct OtlpConfig {
    /// The collector's OTLP/gRPC address: `http://127.0.0.1:4317`, or
    /// `https://...` for TLS.
    pub endpoint: String,
    /// The share of new traces recorded, 0.0 to 1.0.
    pub sample_ratio: f64,
    /// PEM certificates of the CA(s) an `https://` collector's certificate
    /// must chain to, instead of the system's roots.
    pub ca_pem: Option<Vec<u8>>,
}

/// Why tracing could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    #[error("--trace-sample-ratio must be between 0 and 1, not {0}")]
    SampleRatio(f64),
    #[error("--otlp-endpoint {endpoint:?} must be an http:// or https:// URL")]
    Endpoint { endpoint: String },
    #[error("--otlp-ca-file is for an https:// --otlp-endpoint, not {endpoint:?}")]
    CaWithoutTls { endpoint: String },
    #[error("--otlp-ca-file: {0}")]
    Ca(String),
    #[error("cannot set up the OTLP exporter for {endpoint}: {source}")]
    Exporter {
        endpoint: String,
        source: opentelemetry_otlp::ExporterBuildError,
    },
}

/// The running trace exporter, if any.
#[derive(Debug, Default)]
pub struct Tracing {
    provider: Option<SdkTracerProvider>,
}

impl Tracing {
    /// Whether spans are exported.
    pub fn is_on(&self) -> bool {
        self.provider.is_some()
    }

    /// Sends the spans still queued and stops the exporter.
    pub fn shutdown(self) {
        if let Some(provider) = self.provider {
            if let Err(e) = provider.shutdown() {
                tracing::warn!(error = %e, "could not flush the last spans");
            }
        }
    }
}

/// How long one export may take before it is abandoned.
const EXPORT_TIMEOUT: Duration = Duration::from_secs(10);

/// The `tracing` layer that exports the request spans, and its provider.
pub(crate) fn layer<S>(
    cfg: &OtlpConfig,
) -> Result<(Box<dyn Layer<S> + Send + Sync>, Tracing), TelemetryError>
where
    S: tracing::Subscriber + for<'a> LookupSpan<'a> + Send + Sync,
{
    if !(0.0..=1.0).contains(&cfg.sample_ratio) {
        return Err(TelemetryError::SampleRatio(cfg.sample_ratio));
    }
    // Plaintext gRPC for a collector beside the data plane (an agent or
    // sidecar on loopback or the pod network); TLS for one elsewhere.
    let tls = if cfg.endpoint.starts_with("https://") {
        true
    } else if cfg.endpoint.starts_with("http://") {
        false
    } else {
        return Err(TelemetryError::Endpoint {
            endpoint: cfg.endpoint.clone(),
        });
    };
    if let Some(pem) = &cfg.ca_pem {
        if !tls {
            return Err(TelemetryError::CaWithoutTls {
                endpoint: cfg.endpoint.clone(),
            });
        }
        use rustls_pki_types::pem::PemObject;
        let mut certs = 0;
        for cert in rustls_pki_types::CertificateDer::pem_slice_iter(pem) {
            cert.map_err(|e| TelemetryError::Ca(e.to_string()))?;
            certs += 1;
        }
        if certs == 0 {
            return Err(TelemetryError::Ca("no PEM certificate in it".into()));
        }
    }
    let mut builder = opentelemetry_otlp::SpanExporter::builder()
        .with_tonic()
        .with_endpoint(cfg.endpoint.clone())
        .with_timeout(EXPORT_TIMEOUT);
    if tls {
        use opentelemetry_otlp::tonic_types::transport::{Certificate, ClientTlsConfig};
        let config = match &cfg.ca_pem {
            Some(pem) => ClientTlsConfig::new().ca_certificate(Certificate::from_pem(pem)),
            None => ClientTlsConfig::new().with_native_roots(),
        };
        builder = builder.with_tls_config(config);
    }
    let exporter = builder.build().map_err(|source| TelemetryError::Exporter {
        endpoint: cfg.endpoint.clone(),
        source,
    })?;
    let mut resource = Resource::builder();
    // OTEL_SERVICE_NAME, read by the builder, wins.
    if std::env::var_os("OTEL_SERVICE_NAME").is_none() {
        resource = resource.with_service_name("gatehouse");
    }
    let provider = SdkTracerProvider::builder()
        .with_sampler(Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(
            cfg.sample_ratio,
        ))))
        .with_batch_exporter(exporter)
        .with_resource(resource.build())
        .build();
    let tracer = provider.tracer("gatehouse");
    let layer = tracing_opentelemetry::layer()
        .with_tracer(tracer)
        .with_filter(Targets::new().with_target(crate::TRACE_TARGET, tracing::Level::TRACE))
        .boxed();
    Ok((
        layer,
        Tracing {
            provider: Some(provider),
        },
    ))
}
