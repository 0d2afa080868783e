//! Write-back from the control center: `POST /api/v1/commands/{device}/{tag}` on the
//! orchestrator goes through a real broker and the command handler into a simulated PLC, and
//! the handler's answer (with the read-back) comes back to the caller.

#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use nexus_common::auth::hash_password;
use nexus_common::config::Config;
use nexus_common::testing::{self, free_port, SERVICE_USER};
use nexus_devices::simulator::modbus::ModbusSimulator;
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;

mod support;

const OPERATOR: &str = "nxs_ffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff";
const VIEWER: &str = "nxs_1111111111111111111111111111111111111111111111111111111111111111";

async fn call(port: u16, token: &str, path: &str, body: &str) -> (u16, Value) {
    support::call(port, Some(token), "POST", path, &[], body).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_writes_a_setpoint_and_sees_the_read_back() {
    write_round_trip(true).await;
}

/// Over MQTT 3.1.1 (a broker without MQTT 5): no Response Topic, the answer is matched by its
/// request id on the standard response topics.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_write_is_answered_over_mqtt_3_1_1_too() {
    write_round_trip(false).await;
}

async fn write_round_trip(v5: bool) {
    let broker = testing::service_broker();
    let sim = ModbusSimulator::start("127.0.0.1:0".parse().unwrap(), None)
        .await
        .unwrap();
    let (orch, cmds) = (free_port(), free_port());
    let journal = tempfile::tempdir().unwrap();
    let tokens = support::tokens(&[("op", OPERATOR, "operator"), ("v", VIEWER, "viewer")]);
    let text = format!(
        "mqtt: {{ host: 127.0.0.1, port: {mqtt}, username: {svc}, reconnect_min: 50ms }}\n\
         auth:\n  anonymous: \"off\"\n  users:\n    - {{ username: {svc}, password_hash: \"{hash}\", role: service }}\n  tokens:\n{tokens}\
         telemetry: {{ instance: write-test }}\n\
         commands: {{ http_listen: 127.0.0.1:{cmds}, mqtt_v5: {v5}, journal_dir: \"{journal}\" }}\n\
         orchestrator: {{ http_listen: 127.0.0.1:{orch} }}\n\
         devices:\n  - id: plc\n    protocol: modbus\n    uns_prefix: acme/site\n    \
         connection: {{ host: 127.0.0.1, port: {sim}, timeout: 1s }}\n    tags:\n      \
         - {{ id: sp, address: \"HR:10\", data_type: int16, scale: 0.1, access: readwrite, min: 0, max: 100 }}\n      \
         - {{ id: ro, address: \"HR:11\", data_type: uint16 }}\n",
        mqtt = broker.ports.tcp().port(),
        svc = SERVICE_USER.0,
        hash = hash_password(SERVICE_USER.1),
        sim = sim.addr.port(),
        journal = journal.path().display(),
    );
    let cfg = Arc::new(
        Config::from_str_with_env(
            &text,
            None,
            &[("NEXUS_MQTT__PASSWORD".into(), SERVICE_USER.1.into())],
        )
        .unwrap_or_else(|e| panic!("{e}")),
    );
    let stop = CancellationToken::new();
    tokio::spawn(nexus_command_handler::run(cfg.clone(), stop.clone()));
    support::orchestrator(cfg, stop.clone()).await;
    let started = Instant::now();
    while testing::http(cmds, "GET", "/readyz", "").0 != 200
        || testing::http(orch, "GET", "/readyz", "").0 != 200
    {
        assert!(started.elapsed() < Duration::from_secs(20), "not ready");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;

    let (s, v) = call(
        orch,
        OPERATOR,
        "/api/v1/commands/plc/sp",
        r#"{"value": 72.5, "confirm": true}"#,
    )
    .await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["success"], true, "{v}");
    assert_eq!(v["value"], json!(72.5), "{v}");
    assert_eq!(v["read_back"], json!(72.5), "{v}");
    assert_eq!(v["old_value"], json!(50.0), "{v}");
    assert_eq!(
        sim.registers.lock().unwrap().holding[10],
        725,
        "it landed in the PLC"
    );

    // The handler's refusals come back as its answer.
    let (s, v) = call(
        orch,
        OPERATOR,
        "/api/v1/commands/plc/sp",
        r#"{"value": 500}"#,
    )
    .await;
    assert_eq!((s, &v["success"]), (200, &json!(false)), "{v}");
    assert!(
        v["error"].as_str().unwrap().contains("100"),
        "the limit is named: {v}"
    );
    let (s, v) = call(orch, OPERATOR, "/api/v1/commands/plc/ro", r#"{"value": 1}"#).await;
    assert_eq!((s, &v["success"]), (200, &json!(false)), "{v}");
    assert_eq!(sim.registers.lock().unwrap().holding[10], 725);

    // Viewers may not write; bad input is a 400 naming what.
    let (s, v) = call(orch, VIEWER, "/api/v1/commands/plc/sp", r#"{"value": 1}"#).await;
    assert_eq!(s, 403, "{v}");
    for (path, body) in [
        ("/api/v1/commands/plc/sp", "not json"),
        ("/api/v1/commands/plc/sp", r#"{"valu": 1}"#),
        ("/api/v1/commands/pl%2Bc/sp", r#"{"value": 1}"#),
    ] {
        let (s, v) = call(orch, OPERATOR, path, body).await;
        assert_eq!(s, 400, "{path} {body}: {v}");
        assert!(v["error"].is_string(), "{v}");
    }
    assert_eq!(sim.registers.lock().unwrap().holding[10], 725);
    stop.cancel();
}
