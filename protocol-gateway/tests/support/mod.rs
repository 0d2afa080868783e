//! Shared helpers of the gateway's integration tests.
#![allow(dead_code, clippy::unwrap_used)]

use std::sync::Arc;
use std::time::Duration;

use nexus_common::config::Config;
use nexus_common::mqtt::{self, ClientSettings, Message, MqttHandle, QoS};
use nexus_common::testing;
use nexus_devices::simulator::modbus::ModbusSimulator;
use tokio::sync::mpsc::Receiver;
use tokio_util::sync::CancellationToken;

/// The embedded broker with the test accounts (`svc` / `svc-pw` for the gateway); anonymous
/// clients are viewers, as in production.
pub fn broker() -> nexus_common::broker::EmbeddedBroker {
    broker_on(0)
}

/// The same on a given port (0: a free one), e.g. to bring a broker back after an outage.
pub fn broker_on(port: u16) -> nexus_common::broker::EmbeddedBroker {
    testing::start_embedded_broker_on(port)
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
    cfg.commands.journal_dir = dir.join("commands");
    // The HTTP calls of these tests log in as the operator op ([`http_get`]).
    cfg.auth = testing::test_auth();
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

/// `Authorization` of the operator `op` / `op-pw` of `testing::test_auth`.
pub const OPERATOR: &str = "Authorization: Basic b3A6b3AtcHc=";

/// The body of `GET path`, as the operator op (browsing needs the operator role).
pub fn http_get(port: u16, path: &str) -> String {
    use std::io::{Read, Write};
    let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
        return String::new();
    };
    let _ = write!(s, "GET {path} HTTP/1.0\r\nHost: x\r\n{OPERATOR}\r\n\r\n");
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

fn set(sim: &ModbusSimulator, addr: usize, words: &[u16]) {
    sim.registers.lock().unwrap().holding[addr..addr + words.len()].copy_from_slice(words);
}

/// Tags of every data type and byte order; the values below sit in the simulator (and the
/// pymodbus server of tests/peers/pymodbus_server.py holds the same words).
pub const TYPED_TAGS: &str = r#"      - { id: f32-abcd, address: "HR:200", data_type: float32, byte_order: ABCD }
      - { id: f32-dcba, address: "HR:202", data_type: float32, byte_order: DCBA }
      - { id: f32-badc, address: "HR:204", data_type: float32, byte_order: BADC }
      - { id: f32-cdab, address: "HR:206", data_type: float32, byte_order: CDAB }
      - { id: i16, address: "HR:210", data_type: int16 }
      - { id: u16, address: "HR:211", data_type: uint16 }
      - { id: i32-cdab, address: "HR:212", data_type: int32, byte_order: CDAB }
      - { id: u32, address: "HR:214", data_type: uint32 }
      - { id: i64, address: "HR:216", data_type: int64 }
      - { id: u64-dcba, address: "HR:220", data_type: uint64, byte_order: DCBA }
      - { id: f64, address: "HR:224", data_type: float64 }
      - { id: text, address: "HR:230", data_type: string, length: 8 }
      - { id: bit3, address: "HR:240.3", data_type: bool }
      - { id: scaled, address: "HR:241", data_type: int16, scale: 0.1, offset: -10 }
      - { id: coil, address: "CO:7", data_type: bool }
      - { id: din, address: "DI:9", data_type: bool }
      - { id: ir, address: "IR:3", data_type: uint16 }
"#;

pub fn load_typed_values(sim: &ModbusSimulator) {
    set(sim, 200, &[0x42F6, 0xE979]); // 123.456
    set(sim, 202, &[0x79E9, 0xF642]);
    set(sim, 204, &[0xF642, 0x79E9]);
    set(sim, 206, &[0xE979, 0x42F6]);
    set(sim, 210, &[0xFFFE]); // -2
    set(sim, 211, &[0xFFFE]); // 65534
    set(sim, 212, &[0x1DC0, 0xFFFE]); // -123456 word-swapped
    set(sim, 214, &[0x0001, 0x0002]); // 65538
    set(sim, 216, &[0xFFFF, 0xFFFF, 0xFFFF, 0xFFFD]); // -3
    set(sim, 220, &[0x0807, 0x0605, 0x0403, 0x0201]); // 0x0102030405060708 little endian
    set(sim, 224, &[0x4059, 0, 0, 0]); // 100.0
    set(sim, 230, &[0x5041, 0x434B, 0x2D31, 0]); // "PACK-1"
    set(sim, 240, &[0b1000]);
    set(sim, 241, &[250]); // 25.0 - 10 = 15.0
    let mut r = sim.registers.lock().unwrap();
    r.coils[7] = true;
    r.discrete[9] = true;
    r.input[3] = 4242;
}

pub fn expected_typed() -> Vec<(&'static str, serde_json::Value)> {
    use serde_json::json;
    vec![
        ("f32-abcd", json!(123.456)),
        ("f32-dcba", json!(123.456)),
        ("f32-badc", json!(123.456)),
        ("f32-cdab", json!(123.456)),
        ("i16", json!(-2)),
        ("u16", json!(65534)),
        ("i32-cdab", json!(-123456)),
        ("u32", json!(65538)),
        ("i64", json!(-3)),
        ("u64-dcba", json!(0x0102030405060708u64)),
        ("f64", json!(100.0)),
        ("text", json!("PACK-1")),
        ("bit3", json!(true)),
        ("scaled", json!(15.0)),
        ("coil", json!(true)),
        ("din", json!(true)),
        ("ir", json!(4242)),
    ]
}
