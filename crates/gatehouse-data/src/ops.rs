//! The ops listener, apart from the proxy port: `/healthz` (the process is
//! up), `/readyz` (a configuration is being served) and `/metrics`.

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;

use crate::proxy::Shared;

fn text(status: StatusCode, content_type: &'static str, body: String) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header(http::header::CONTENT_TYPE, content_type)
        .header(http::header::CACHE_CONTROL, "no-store")
        .body(Full::new(Bytes::from(body)))
        .expect("static response parts are valid")
}

/// Answers one ops request.
pub async fn handle(
    shared: Arc<Shared>,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let plain = "text/plain; charset=utf-8";
    Ok(match req.uri().path() {
        "/healthz" => text(StatusCode::OK, plain, "ok\n".into()),
        "/readyz" => match shared.config.load().as_ref() {
            // What a never-initialized cluster sends: nothing to serve yet.
            Some(c) if c.revision == 0 => {
                let why = shared.unready_reason.load().as_ref().map_or_else(
                    || {
                        "the control plane holds no configuration yet (revision 0: \
                         initialize the cluster with `gatehousectl cluster init`)"
                            .to_string()
                    },
                    |r| r.to_string(),
                );
                text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    plain,
                    format!("not ready: {why}\n"),
                )
            }
            Some(c) => text(
                StatusCode::OK,
                plain,
                format!("ready: revision {}\n", c.revision),
            ),
            None => {
                let why = shared.unready_reason.load().as_ref().map_or_else(
                    || "no configuration received yet".to_string(),
                    |r| r.to_string(),
                );
                text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    plain,
                    format!("not ready: {why}\n"),
                )
            }
        },
        "/metrics" => {
            // Health changes with time (ejections expire): read it at scrape time.
            shared.metrics.target_healthy.clear();
            for (upstream, target, up) in shared.health.snapshot() {
                shared
                    .metrics
                    .target_healthy
                    .get_or_create(&crate::metrics::TargetLabels { upstream, target })
                    .set(i64::from(up));
            }
            text(
                StatusCode::OK,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
                shared.metrics.encode(),
            )
        }
        _ => text(
            StatusCode::NOT_FOUND,
            plain,
            "not found: try /healthz, /readyz or /metrics\n".into(),
        ),
    })
}
