//! What the orchestrator's API tests share: API tokens in a config, the orchestrator service
//! started in-process, and calls with a bearer token.

#![allow(dead_code, clippy::unwrap_used)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use nexus_common::auth::token_sha256;
use nexus_common::config::Config;
use nexus_common::telemetry::Telemetry;
use nexus_common::testing;
use nexus_orchestrator::status;
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;

/// `auth.tokens` entries, as YAML list lines, for (name, token, role).
pub fn tokens(entries: &[(&str, &str, &str)]) -> String {
    entries
        .iter()
        .map(|(n, t, r)| {
            format!(
                "    - {{ name: {n}, sha256: \"{}\", role: {r} }}\n",
                token_sha256(t)
            )
        })
        .collect()
}

/// The orchestrator service of `cfg`, until `stop`; returns once its port answers.
pub async fn orchestrator(cfg: Arc<Config>, stop: CancellationToken) {
    let port = cfg.orchestrator.http_listen.port();
    let telemetry = Telemetry::new(status::SERVICE);
    let ns = nexus_orchestrator::live::Namespace::new(&telemetry.registry).unwrap();
    tokio::spawn(status::run_with(cfg, telemetry, json!({}), ns, stop));
    let started = Instant::now();
    while testing::http(port, "GET", "/healthz", "").0 != 200 {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "no orchestrator"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A call to 127.0.0.1:`port`, with a bearer token when given: the status and the body (JSON,
/// or the text as a JSON string).
pub async fn call(
    port: u16,
    token: Option<&str>,
    method: &str,
    path: &str,
    headers: &[&str],
    body: &str,
) -> (u16, Value) {
    let (method, path, body) = (method.to_owned(), path.to_owned(), body.to_owned());
    let mut h: Vec<String> = headers.iter().map(|s| s.to_string()).collect();
    if let Some(t) = token {
        h.push(format!("Authorization: Bearer {t}"));
    }
    tokio::task::spawn_blocking(move || {
        let refs: Vec<&str> = h.iter().map(String::as_str).collect();
        let (status, text) = testing::http_with(port, &method, &path, &refs, &body);
        (
            status,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        )
    })
    .await
    .unwrap()
}
