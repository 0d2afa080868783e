//! One origin for the control center: the orchestrator serves the other services' APIs on its
//! own port by forwarding them (`orchestrator.upstreams`; docs/control.md, "One origin").
//!
//! | route | role | to |
//! |---|---|---|
//! | `GET /api/v1/history`, `GET /api/v1/latest` | viewer | ingestion |
//! | `GET /api/v1/alarms`, `GET /api/v1/rules`, `GET /api/v1/alarms/journal` | viewer | alerts |
//! | `POST /api/v1/alarms/{id}/{op}` | operator | alerts |
//!
//! The caller's role is checked here first; the call goes on with the orchestrator's service
//! credentials (`mqtt.username` / `mqtt.password`, a `service` user) and the caller's name and
//! role in `X-Nexus-On-Behalf-Of` / `-Role`, so the service checks and records the user.

use std::time::Duration;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use nexus_common::auth::http::{Caller, Routes, ON_BEHALF_OF, ON_BEHALF_ROLE};
use nexus_common::config::{Config, Role};
use serde_json::json;

/// Largest answer forwarded (a history of 10,000 points is about 1 MB).
const MAX_ANSWER: usize = 16 * 1024 * 1024;

#[derive(Clone)]
pub struct Upstreams {
    ingestion: Option<String>,
    alerts: Option<String>,
    credentials: Option<(String, String)>,
    client: reqwest::Client,
}

impl Upstreams {
    pub fn new(cfg: &Config) -> anyhow::Result<Upstreams> {
        nexus_common::install_tls_provider();
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(30))
            .connect_timeout(Duration::from_secs(5))
            .redirect(reqwest::redirect::Policy::none())
            .build()?;
        let trim = |u: &Option<String>| u.as_ref().map(|u| u.trim_end_matches('/').to_owned());
        Ok(Upstreams {
            ingestion: trim(&cfg.orchestrator.upstreams.ingestion),
            alerts: trim(&cfg.orchestrator.upstreams.alerts),
            credentials: cfg.mqtt.username.clone().map(|u| {
                (
                    u,
                    cfg.mqtt
                        .password
                        .as_ref()
                        .map(|p| p.expose().to_owned())
                        .unwrap_or_default(),
                )
            }),
            client,
        })
    }
}

fn unavailable(msg: String) -> Response {
    (
        StatusCode::SERVICE_UNAVAILABLE,
        Json(json!({ "error": msg })),
    )
        .into_response()
}

/// `to`: the service's name and base URL.
async fn forward(
    up: &Upstreams,
    to: (&str, &Option<String>),
    who: &nexus_common::auth::Identity,
    method: Method,
    uri: &axum::http::Uri,
    headers: &HeaderMap,
    body: Bytes,
) -> Response {
    let (service, base) = to;
    let Some(base) = base else {
        return unavailable(format!(
            "{service} is not reachable from here: it is off, or orchestrator.upstreams.{service} is not set"
        ));
    };
    let path = uri.path_and_query().map_or(uri.path(), |p| p.as_str());
    let mut req = up
        .client
        .request(method, format!("{base}{path}"))
        .header(ON_BEHALF_OF, &who.name)
        .header(ON_BEHALF_ROLE, who.role.as_str())
        .body(body);
    if let Some((u, p)) = &up.credentials {
        req = req.basic_auth(u, Some(p));
    }
    if let Some(ct) = headers.get(axum::http::header::CONTENT_TYPE) {
        req = req.header(axum::http::header::CONTENT_TYPE, ct.clone());
    }
    let answer = match req.send().await {
        Ok(a) => a,
        Err(e) => {
            tracing::warn!(service, error = %e, "forwarding to a service failed; answered 503");
            return unavailable(format!("{service} did not answer: {}", e.without_url()));
        }
    };
    let status = StatusCode::from_u16(answer.status().as_u16()).unwrap_or(StatusCode::BAD_GATEWAY);
    let content_type = answer
        .headers()
        .get(reqwest::header::CONTENT_TYPE)
        .and_then(|v| HeaderValue::from_bytes(v.as_bytes()).ok());
    if answer
        .content_length()
        .is_some_and(|n| n as usize > MAX_ANSWER)
    {
        return unavailable(format!(
            "{service}'s answer is larger than {MAX_ANSWER} bytes"
        ));
    }
    let bytes = match answer.bytes().await {
        Ok(b) if b.len() <= MAX_ANSWER => b,
        Ok(_) => {
            return unavailable(format!(
                "{service}'s answer is larger than {MAX_ANSWER} bytes"
            ))
        }
        Err(e) => return unavailable(format!("{service}'s answer broke off: {}", e.without_url())),
    };
    let mut r = (status, bytes).into_response();
    if let Some(ct) = content_type {
        r.headers_mut().insert(axum::http::header::CONTENT_TYPE, ct);
    }
    r
}

async fn to_ingestion(
    State(up): State<Upstreams>,
    Caller(who): Caller,
    method: Method,
    uri: axum::http::Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    forward(
        &up,
        ("ingestion", &up.ingestion),
        &who,
        method,
        &uri,
        &headers,
        body,
    )
    .await
}

async fn to_alerts(
    State(up): State<Upstreams>,
    Caller(who): Caller,
    method: Method,
    uri: axum::http::Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    forward(
        &up,
        ("alerts", &up.alerts),
        &who,
        method,
        &uri,
        &headers,
        body,
    )
    .await
}

/// The forwarded routes.
pub fn routes(up: Upstreams) -> Routes {
    Routes::new()
        .get("/api/v1/history", Role::Viewer, to_ingestion)
        .get("/api/v1/latest", Role::Viewer, to_ingestion)
        .get("/api/v1/alarms", Role::Viewer, to_alerts)
        .get("/api/v1/rules", Role::Viewer, to_alerts)
        .get("/api/v1/alarms/journal", Role::Viewer, to_alerts)
        .post("/api/v1/alarms/{id}/{op}", Role::Operator, to_alerts)
        .with_state(up)
}
