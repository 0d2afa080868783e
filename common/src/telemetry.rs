//! Logs, metrics and the health endpoints every service serves.
//!
//! - [`init_logging`]: tracing to stderr, pretty for terminals or JSON lines; `log` records
//!   (rmqtt uses `log`) are bridged in.
//! - [`Telemetry`]: a per-service Prometheus registry (metric names start with `nexus_`) and a
//!   [`Readiness`] of named conditions.
//! - [`router`] / [`serve`]: axum with `/healthz` (alive), `/readyz` (every condition met),
//!   `/metrics` (Prometheus text). A service serves them behind the guard of
//!   [`crate::http::service_router`] (panics caught, body limit, request timeout).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use prometheus::{Encoder, Registry, TextEncoder};
use tokio_util::sync::CancellationToken;

use crate::config::LogFormat;

/// Install the global tracing subscriber. `RUST_LOG` wins over `level`. Safe to call twice
/// (the second call does nothing), which tests rely on.
pub fn init_logging(level: &str, format: LogFormat) {
    use tracing_subscriber::{fmt, EnvFilter};
    let filter = std::env::var("RUST_LOG")
        .ok()
        .and_then(|f| EnvFilter::try_new(f).ok())
        .or_else(|| EnvFilter::try_new(level).ok())
        .unwrap_or_else(|| EnvFilter::new("info"));
    let builder = fmt().with_env_filter(filter).with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
        LogFormat::Pretty => builder.compact().try_init(),
    };
}

/// Readiness: named conditions (e.g. `broker`, `database`) that must all hold.
#[derive(Clone, Default)]
pub struct Readiness {
    conditions: Arc<Mutex<BTreeMap<&'static str, bool>>>,
    /// Why an unmet condition fails, where its owner said ([`ReadyFlag::fail`]).
    reasons: Arc<Mutex<BTreeMap<&'static str, String>>>,
}

impl Readiness {
    /// Add a condition, initially unmet, and return the handle that sets it.
    pub fn condition(&self, name: &'static str) -> ReadyFlag {
        self.lock().insert(name, false);
        ReadyFlag {
            name,
            readiness: self.clone(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<&'static str, bool>> {
        // A poisoned lock only means a panic elsewhere; the map itself is still consistent.
        self.conditions.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn is_ready(&self) -> bool {
        self.lock().values().all(|v| *v)
    }

    /// Every condition and whether it holds.
    pub fn snapshot(&self) -> BTreeMap<&'static str, bool> {
        self.lock().clone()
    }

    /// The reasons given for unmet conditions.
    pub fn reasons(&self) -> BTreeMap<&'static str, String> {
        self.reasons
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

/// Sets one readiness condition.
#[derive(Clone)]
pub struct ReadyFlag {
    name: &'static str,
    readiness: Readiness,
}

impl ReadyFlag {
    pub fn set(&self, ok: bool) {
        self.readiness.lock().insert(self.name, ok);
        if ok {
            self.reasons().remove(self.name);
        }
    }

    /// Unmet, with the reason `/readyz` shows.
    pub fn fail(&self, reason: String) {
        self.readiness.lock().insert(self.name, false);
        self.reasons().insert(self.name, reason);
    }

    fn reasons(&self) -> std::sync::MutexGuard<'_, BTreeMap<&'static str, String>> {
        self.readiness
            .reasons
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }
}

/// A service's registry and readiness.
#[derive(Clone)]
pub struct Telemetry {
    pub service: &'static str,
    pub registry: Registry,
    pub readiness: Readiness,
    /// The MQTT client's metrics, registered once however often the service restarts with
    /// this telemetry (a supervisor's restart).
    mqtt: Arc<Mutex<Option<crate::mqtt::MqttMetrics>>>,
    /// The HTTP guard's metrics, registered once in the same way.
    http: Arc<Mutex<Option<crate::http::HttpMetrics>>>,
}

impl Telemetry {
    /// A registry that serves, from the start, the process's own metrics (`process_cpu_seconds_total`,
    /// `process_resident_memory_bytes`, open files, threads, start time) and
    /// `nexus_build_info{service,version}` (always 1).
    pub fn new(service: &'static str) -> Telemetry {
        let registry = Registry::new();
        if let Err(e) = register_process_metrics(&registry, service) {
            // A fresh registry holds nothing to clash with; should it ever, metrics go on
            // without these.
            tracing::warn!(error = %e, "process metrics not registered");
        }
        Telemetry {
            service,
            registry,
            readiness: Readiness::default(),
            mqtt: Arc::default(),
            http: Arc::default(),
        }
    }

    /// The MQTT metrics of this registry, created at the first call.
    pub fn mqtt_metrics(&self) -> Result<crate::mqtt::MqttMetrics, crate::metrics::MetricError> {
        let mut m = self.mqtt.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(m) = m.as_ref() {
            return Ok(m.clone());
        }
        let made = crate::mqtt::MqttMetrics::new(&self.registry)?;
        *m = Some(made.clone());
        Ok(made)
    }

    /// The HTTP guard's metrics of this registry, created at the first call.
    pub fn http_metrics(&self) -> Result<crate::http::HttpMetrics, crate::metrics::MetricError> {
        let mut m = self.http.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(m) = m.as_ref() {
            return Ok(m.clone());
        }
        let made = crate::http::HttpMetrics::new(&self.registry)?;
        *m = Some(made.clone());
        Ok(made)
    }

    /// Prometheus text of this registry.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut buf);
        String::from_utf8(buf).unwrap_or_default()
    }
}

async fn healthz() -> &'static str {
    "ok\n"
}

async fn readyz(State(t): State<Telemetry>) -> Response {
    let snap = t.readiness.snapshot();
    let body = serde_json::json!({
        "service": t.service,
        "ready": snap.values().all(|v| *v),
        "conditions": snap,
        "reasons": t.readiness.reasons(),
    });
    let status = if t.readiness.is_ready() {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, axum::Json(body)).into_response()
}

async fn metrics(State(t): State<Telemetry>) -> Response {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        t.render(),
    )
        .into_response()
}

/// `/healthz`, `/readyz`, `/metrics` for a service; [`crate::http::service_router`] merges
/// the service's own routes into this and puts the guard in front.
pub fn router(t: &Telemetry) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(t.clone())
}

fn register_process_metrics(r: &Registry, service: &str) -> Result<(), prometheus::Error> {
    #[cfg(target_os = "linux")]
    r.register(Box::new(
        prometheus::process_collector::ProcessCollector::for_self(),
    ))?;
    let info = prometheus::IntGaugeVec::new(
        prometheus::Opts::new(
            "nexus_build_info",
            "The version of Nexus serving these metrics (always 1)",
        ),
        &["service", "version"],
    )?;
    info.with_label_values(&[service, crate::service::VERSION])
        .set(1);
    r.register(Box::new(info))
}

/// Bind `addr` (port 0 picks a free port) and serve `app` until `shutdown`. Returns the bound
/// address and the server task. Handlers and middleware see the peer's address
/// (`ConnectInfo<SocketAddr>`: anonymous access depends on it).
pub async fn serve(
    addr: SocketAddr,
    app: Router,
    shutdown: CancellationToken,
) -> std::io::Result<(SocketAddr, tokio::task::JoinHandle<std::io::Result<()>>)> {
    serve_as(addr, app, &crate::config::HttpConfig::default(), shutdown).await
}

/// [`serve`] as `http` says: HTTPS only when `http.tls` is set (docs/security.md, TLS only).
pub async fn serve_as(
    addr: SocketAddr,
    app: Router,
    http: &crate::config::HttpConfig,
    shutdown: CancellationToken,
) -> std::io::Result<(SocketAddr, tokio::task::JoinHandle<std::io::Result<()>>)> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let local = listener.local_addr()?;
    let stop = async move { shutdown.cancelled().await };
    let task = match &http.tls {
        None => tokio::spawn(async move {
            let app = app.into_make_service_with_connect_info::<SocketAddr>();
            axum::serve(listener, app)
                .with_graceful_shutdown(stop)
                .await
        }),
        Some(tls) => {
            let acceptor = crate::http_tls::acceptor(tls).map_err(|e| {
                std::io::Error::new(std::io::ErrorKind::InvalidInput, e.to_string())
            })?;
            let listener = crate::http_tls::TlsListener::new(listener, acceptor)?;
            tokio::spawn(async move {
                let app = app.into_make_service_with_connect_info::<crate::http_tls::TlsPeer>();
                axum::serve(listener, app)
                    .with_graceful_shutdown(stop)
                    .await
            })
        }
    };
    Ok((local, task))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn endpoints_answer() {
        let t = Telemetry::new("test");
        let flag = t.readiness.condition("broker");
        let c = prometheus::IntCounter::new("nexus_test_total", "test").unwrap();
        t.registry.register(Box::new(c.clone())).unwrap();
        c.inc();
        let token = CancellationToken::new();
        let (addr, task) = serve("127.0.0.1:0".parse().unwrap(), router(&t), token.clone())
            .await
            .unwrap();
        let get = |path: &'static str| async move {
            let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            s.write_all(format!("GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").as_bytes())
                .await
                .unwrap();
            let mut out = String::new();
            s.read_to_string(&mut out).await.unwrap();
            out
        };
        assert!(get("/healthz").await.starts_with("HTTP/1.0 200"));
        let r = get("/readyz").await;
        assert!(r.starts_with("HTTP/1.0 503"), "{r}");
        assert!(r.contains("\"broker\":false"), "{r}");
        flag.set(true);
        assert!(get("/readyz").await.starts_with("HTTP/1.0 200"));
        let metrics = get("/metrics").await;
        assert!(metrics.contains("nexus_test_total 1"));
        // The process's own figures and the build, from the start.
        let version = crate::service::VERSION;
        assert!(
            metrics.contains(&format!(
                "nexus_build_info{{service=\"test\",version=\"{version}\"}} 1"
            )),
            "{metrics}"
        );
        // CPU time is counted in whole seconds: a young test process may have 0.
        for (name, least) in [
            ("process_resident_memory_bytes", 1.0),
            ("process_open_fds", 1.0),
            ("process_start_time_seconds", 1.0),
            ("process_cpu_seconds_total", 0.0),
        ] {
            let value = metrics
                .lines()
                .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
                .and_then(|v| v.trim().parse::<f64>().ok());
            assert!(value.is_some_and(|v| v >= least), "{name}: {metrics}");
        }
        token.cancel();
        task.await.unwrap().unwrap();
    }
}
