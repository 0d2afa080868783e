//! The guard every service's HTTP port sits behind, whatever its routes do.
//!
//! ```text
//! request ─> [timeout: 503 + nexus_http_timeouts_total]
//!         ─> [413 as JSON + nexus_http_body_too_large_total]
//!         ─> [catch panic: 500 JSON + nexus_http_panics_total, logged with method and path]
//!         ─> [body limit: Content-Length checked up front, streamed bodies cut at the limit]
//!         ─> [authentication: who is asking, 401/403 (crate::auth::http)]
//!         ─> /healthz /readyz /metrics, login/logout/whoami + the service's routes, each
//!            with the role it needs (crate::auth::http::Routes)
//! ```
//!
//! [`service_router`] is the one assembly the service shell serves; tests build a router
//! with it too, so what they exercise is what runs. The limits and metrics are listed in
//! `docs/security.md` (HTTP robustness, HTTP authentication).

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

use crate::auth::http::{self as auth_http, AuthMetrics, HttpAuth, Routes};
use crate::auth::Identities;
use crate::config::AuthConfig;
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
    /// Authentication: refused credentials and sessions.
    pub auth: AuthMetrics,
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
            auth: AuthMetrics {
                failures: metrics::counter(
                    r,
                    "nexus_http_auth_failures_total",
                    "HTTP requests with credentials that do not check: wrong password, unknown token or session (answered 401)",
                )?,
                sessions_evicted: metrics::counter(
                    r,
                    "nexus_http_sessions_evicted_total",
                    "HTTP login sessions logged out to make room for a new login (auth.max_sessions)",
                )?,
                sessions: metrics::gauge(
                    r,
                    "nexus_http_sessions",
                    "HTTP login sessions held now",
                )?,
            },
        })
    }
}

/// `{"error": msg}` with `status`: the error shape of every Nexus API.
pub fn error(status: StatusCode, msg: impl Into<String>) -> Response {
    (status, Json(serde_json::json!({ "error": msg.into() }))).into_response()
}

/// The health endpoints of `t`, the session routes and the service's `routes`, behind
/// authentication (`ids` and `auth`'s policy, with a session store of this port's own) and
/// the guard; the guard's metrics go into `t`'s registry (once, however often the service
/// restarts with `t`).
pub fn service_router(
    t: &Telemetry,
    routes: Routes,
    limits: HttpLimits,
    ids: Arc<Identities>,
    auth: &AuthConfig,
) -> Result<Router, MetricError> {
    assemble(t, routes, limits, ids, auth, false)
}

/// [`service_router`] for a port served as `cfg.http` says: with `http.tls` the session
/// cookie is marked `Secure`, so a browser never sends it over plain HTTP.
pub fn service_router_for(
    t: &Telemetry,
    routes: Routes,
    limits: HttpLimits,
    ids: Arc<Identities>,
    cfg: &crate::config::Config,
) -> Result<Router, MetricError> {
    assemble(t, routes, limits, ids, &cfg.auth, cfg.http.tls.is_some())
}

fn assemble(
    t: &Telemetry,
    routes: Routes,
    limits: HttpLimits,
    ids: Arc<Identities>,
    auth: &AuthConfig,
    https: bool,
) -> Result<Router, MetricError> {
    let metrics = t.http_metrics()?;
    let port_auth = Arc::new(
        HttpAuth::new(ids, auth, metrics.auth.clone())
            .with_secure_cookies(https)
            .with_public(routes.public_paths()),
    );
    let app = telemetry::router(t)
        .merge(auth_http::session_routes(port_auth.clone()))
        .merge(routes.into_router())
        // Innermost: a refused request is still bounded by the guard (time, body, panics).
        .layer(middleware::from_fn_with_state(
            port_auth,
            auth_http::authenticate,
        ))
        .layer(middleware::from_fn(auth_http::no_challenge_for_scripts));
    Ok(guard(app, limits, metrics))
}

/// `app` behind the limits of `limits`, counted in `metrics`.
fn guard(app: Router, limits: HttpLimits, metrics: HttpMetrics) -> Router {
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
