//! Shared helpers of the gateway's integration tests.
#![allow(dead_code, clippy::unwrap_used)]

use std::sync::Arc;
use std::time::Duration;

use nexus_common::config::Config;
use nexus_common::mqtt::{self, ClientSettings, Message, MqttHandle, QoS};
use nexus_common::testing;
use tokio::sync::mpsc::Receiver;
use tokio_util::sync::CancellationToken;

/// The embedded broker with a `service` account for the gateway (`svc` / `svc-pw`); anonymous
/// clients are viewers, as in production.
pub fn broker() -> nexus_common::broker::EmbeddedBroker {
    broker_on(0)
}

/// The same on a given port (0: a free one), e.g. to bring a broker back after an outage.
pub fn broker_on(port: u16) -> nexus_common::broker::EmbeddedBroker {
    use nexus_common::config::{BrokerConfig, BrokerUser, Role, Secret};
    let cfg = BrokerConfig {
        bind: "127.0.0.1".parse().unwrap(),
        port,
        ws_port: None,
        users: vec![BrokerUser {
            username: "svc".into(),
            password: Some(Secret::new("svc-pw")),
            password_env: None,
            role: Role::Service,
        }],
        ..BrokerConfig::default()
    };
    let acl = nexus_common::broker::Acl::new(&cfg).unwrap();
    nexus_common::broker::EmbeddedBroker::start(&cfg, acl, &prometheus::Registry::new()).unwrap()
}

/// A config: broker at `mqtt_port`, gateway HTTP on `http_port`, buffer in `dir`, plus `extra`
/// YAML (devices, gateway keys).
pub fn config(mqtt_port: u16, http_port: u16, dir: &std::path::Path, extra: &str) -> Config {
    let text = format!(
        "mqtt:\n  host: 127.0.0.1\n  port: {mqtt_port}\n  username: svc\n  password: svc-pw\n  reconnect_min: 50ms\n  reconnect_max: 500ms\ntelemetry:\n  instance: {}\n{extra}",
        testing::unique("gw")
    );
    let mut cfg =
        Config::from_str_with_env(&text, None, &[]).unwrap_or_else(|e| panic!("{e}\n{text}"));
    cfg.gateway.http_listen = format!("127.0.0.1:{http_port}").parse().unwrap();
    cfg.gateway.buffer.dir = dir.join("buffer");
    cfg
}

/// Start the gateway in this process; returns its stop token and task.
pub fn start_gateway(
    cfg: Config,
) -> (
    CancellationToken,
    tokio::task::JoinHandle<anyhow::Result<()>>,
) {
    let token = CancellationToken::new();
    let task = tokio::spawn(nexus_protocol_gateway::run(Arc::new(cfg), token.clone()));
    (token, task)
}

pub async fn subscriber(
    port: u16,
    filters: &[&str],
    token: &CancellationToken,
) -> (MqttHandle, Receiver<Message>) {
    let mut c = testing::mqtt_config(port);
    c.persistent_session = false;
    let mut s = ClientSettings::new(testing::unique("sub"));
    s.subscriptions = filters
        .iter()
        .map(|f| (f.to_string(), QoS::AtLeastOnce))
        .collect();
    s.incoming_capacity = 100_000;
    let (h, rx) = mqtt::connect(&c, s, None, token.clone()).unwrap();
    h.wait_connected(Duration::from_secs(10)).await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    (h, rx)
}

/// (topic, decoded JSON) pairs until `quiet` passes without a message or `limit` passes.
pub async fn collect(
    rx: &mut Receiver<Message>,
    quiet: Duration,
    limit: Duration,
) -> Vec<(String, serde_json::Value, bool)> {
    let mut out = Vec::new();
    let end = tokio::time::Instant::now() + limit;
    loop {
        let wait = quiet.min(end.saturating_duration_since(tokio::time::Instant::now()));
        match tokio::time::timeout(wait, rx.recv()).await {
            Ok(Some(m)) => {
                let v = serde_json::from_slice(m.payload()).unwrap_or(serde_json::Value::Null);
                out.push((m.topic().unwrap_or("").to_owned(), v, m.retain()));
            }
            _ => break,
        }
        if tokio::time::Instant::now() >= end {
            break;
        }
    }
    out
}

pub fn http_get(port: u16, path: &str) -> String {
    use std::io::{Read, Write};
    let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
        return String::new();
    };
    let _ = write!(s, "GET {path} HTTP/1.0\r\nHost: x\r\n\r\n");
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out.split("\r\n\r\n").nth(1).unwrap_or("").to_owned()
}

/// The value of a Prometheus sample line starting with `prefix` (0 when absent).
pub fn metric(text: &str, prefix: &str) -> f64 {
    text.lines()
        .find(|l| l.starts_with(prefix))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
        .unwrap_or(0.0)
}
