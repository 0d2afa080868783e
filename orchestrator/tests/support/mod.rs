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

/// `nexus up --demo` as a process, in a folder of its own, every port free.
pub struct DemoUp {
    pub child: std::process::Child,
    pub mqtt: u16,
    /// The orchestrator's port.
    pub http: u16,
    pub ingestion: u16,
    /// What it printed up to "Stop with Ctrl-C".
    pub banner: String,
    pub dir: tempfile::TempDir,
}

impl DemoUp {
    /// Start it with `env` on top of the ports; returns once the banner is printed.
    pub fn start(instance: &str, env: &[(&str, &str)]) -> DemoUp {
        use std::io::{BufRead, BufReader};
        let (mqtt, http, ingestion) = (
            testing::free_port(),
            testing::free_port(),
            testing::free_port(),
        );
        let dir = tempfile::tempdir().unwrap();
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_nexus"));
        cmd.args(["up", "--demo"])
            .current_dir(dir.path())
            .env("NEXUS_BROKER__PORT", mqtt.to_string())
            .env("NEXUS_BROKER__WS_PORT", "null")
            .env("NEXUS_TELEMETRY__INSTANCE", instance)
            .env(
                "NEXUS_ORCHESTRATOR__HTTP_LISTEN",
                format!("127.0.0.1:{http}"),
            )
            .env(
                "NEXUS_INGESTION__HTTP_LISTEN",
                format!("127.0.0.1:{ingestion}"),
            );
        for k in [
            "NEXUS_GATEWAY__HTTP_LISTEN",
            "NEXUS_COMMANDS__HTTP_LISTEN",
            "NEXUS_ALERTS__HTTP_LISTEN",
        ] {
            cmd.env(k, format!("127.0.0.1:{}", testing::free_port()));
        }
        cmd.envs(env.iter().copied());
        let mut child = cmd
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let mut stdout = BufReader::new(child.stdout.take().unwrap());
        let mut up = DemoUp {
            child,
            mqtt,
            http,
            ingestion,
            banner: String::new(),
            dir,
        };
        while !up.banner.contains("Stop with Ctrl-C") {
            let mut line = String::new();
            assert!(
                stdout.read_line(&mut line).unwrap() > 0,
                "nexus up ended early: {}",
                up.banner
            );
            up.banner.push_str(&line);
        }
        // Keep reading what it prints, so it never blocks on a full pipe.
        std::thread::spawn(move || std::io::copy(&mut stdout, &mut std::io::sink()));
        up
    }
}

impl Drop for DemoUp {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
