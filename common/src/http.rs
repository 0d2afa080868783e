//! The guard every service's HTTP port sits behind, whatever its routes do.
//!
//! ```text
//! request ─> [timeout: 503 + nexus_http_timeouts_total]
//!         ─> [413 as JSON + nexus_http_body_too_large_total]
//!         ─> [catch panic: 500 JSON + nexus_http_panics_total, logged with method and path]
//!         ─> [body limit: Content-Length checked up front, streamed bodies cut at the limit]
//!         ─> /healthz /readyz /metrics + the service's routes
//! ```
//!
//! [`service_router`] is the one assembly the service shell serves; tests build a router
//! with it too, so what they exercise is what runs. The limits and metrics are listed in
//! `docs/security.md` (HTTP robustness).

use std::any::Any;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::{Json, Router};
use prometheus::{IntCounter, Registry};
use tower_http::catch_panic::CatchPanicLayer;
use tower_http::limit::RequestBodyLimitLayer;

use crate::metrics::{self, MetricError};
use crate::telemetry::{self, Telemetry};

/// Largest request body by default: 1 MiB. Nexus's requests are small JSON objects.
pub const DEFAULT_MAX_BODY: usize = 1024 * 1024;
/// Longest a handler may take to produce its response head by default. A streamed body (the
/// gateway's browse) may go on longer once its head is out.
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// The limits of one HTTP port.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HttpLimits {
    /// Bytes; a larger body is a 413.
    pub max_body: usize,
    /// Until the response head; past it the request is a 503.
    pub request_timeout: Duration,
}

impl Default for HttpLimits {
    fn default() -> Self {
        HttpLimits {
            max_body: DEFAULT_MAX_BODY,
            request_timeout: DEFAULT_REQUEST_TIMEOUT,
        }
    }
}

/// What the guard counts, in the service's registry.
#[derive(Clone)]
pub struct HttpMetrics {
    pub panics: IntCounter,
    pub timeouts: IntCounter,
    pub body_too_large: IntCounter,
}

impl HttpMetrics {
    pub fn new(r: &Registry) -> Result<HttpMetrics, MetricError> {
        Ok(HttpMetrics {
            panics: metrics::counter(
                r,
                "nexus_http_panics_total",
                "HTTP handlers that panicked (answered 500)",
            )?,
            timeouts: metrics::counter(
                r,
                "nexus_http_timeouts_total",
                "HTTP requests that ran past the request timeout (answered 503)",
            )?,
            body_too_large: metrics::counter(
                r,
                "nexus_http_body_too_large_total",
                "HTTP requests with a body over the limit (answered 413)",
            )?,
        })
    }
}

/// `{"error": msg}` with `status`: the error shape of every Nexus API.
pub fn error(status: StatusCode, msg: impl Into<String>) -> Response {
    (status, Json(serde_json::json!({ "error": msg.into() }))).into_response()
}

/// The health endpoints of `t` and the service's `routes`, behind the guard; the guard's
/// metrics go into `t`'s registry (once, however often the service restarts with `t`).
pub fn service_router(
    t: &Telemetry,
    routes: Router,
    limits: HttpLimits,
) -> Result<Router, MetricError> {
    Ok(guard(
        telemetry::router(t).merge(routes),
        limits,
        t.http_metrics()?,
    ))
}

/// `app` behind the limits of `limits`, counted in `metrics`.
pub fn guard(app: Router, limits: HttpLimits, metrics: HttpMetrics) -> Router {
    let outer = Arc::new(Outer { limits, metrics });
    // The last layer added is the outermost.
    app.layer(DefaultBodyLimit::max(limits.max_body))
        .layer(RequestBodyLimitLayer::new(limits.max_body))
        .layer(CatchPanicLayer::custom(panic_response))
        .layer(middleware::from_fn_with_state(outer, outer_layer))
}

struct Outer {
    limits: HttpLimits,
    metrics: HttpMetrics,
}

/// Left on a panic's response by the handler below, for the outer layer, which knows the
/// request, to log and count.
#[derive(Clone)]
struct Panicked(String);

fn panic_response(err: Box<dyn Any + Send + 'static>) -> Response {
    let msg = match err.downcast::<String>() {
        Ok(s) => *s,
        Err(err) => err
            .downcast_ref::<&str>()
            .map_or_else(|| "(no message)".to_owned(), |s| (*s).to_owned()),
    };
    // The panic's text stays in the log: it may hold internals a client has no use for.
    let mut r = error(
        StatusCode::INTERNAL_SERVER_ERROR,
        "internal error: the request failed in the service; it is logged and counted",
    );
    r.extensions_mut().insert(Panicked(msg));
    r
}

async fn outer_layer(State(g): State<Arc<Outer>>, req: Request, next: Next) -> Response {
    let method = req.method().clone();
    let path = req.uri().path().to_owned();
    let timeout = g.limits.request_timeout;
    let mut r = match tokio::time::timeout(timeout, next.run(req)).await {
        Ok(r) => r,
        Err(_) => {
            g.metrics.timeouts.inc();
            tracing::warn!(%method, path = %path, ?timeout, "HTTP request timed out; answered 503");
            return error(
                StatusCode::SERVICE_UNAVAILABLE,
                format!(
                    "the request took longer than {}",
                    humantime::format_duration(timeout)
                ),
            );
        }
    };
    if let Some(Panicked(panic)) = r.extensions_mut().remove::<Panicked>() {
        g.metrics.panics.inc();
        tracing::error!(%method, path = %path, panic = %panic, "HTTP handler panicked; answered 500");
    }
    if r.status() == StatusCode::PAYLOAD_TOO_LARGE {
        g.metrics.body_too_large.inc();
        let json = r
            .headers()
            .get(header::CONTENT_TYPE)
            .is_some_and(|v| v.as_bytes().starts_with(b"application/json"));
        if !json {
            r = error(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("body: larger than the limit of {} bytes", g.limits.max_body),
            );
        }
    }
    r
}
