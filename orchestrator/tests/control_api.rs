//! The control API's device routes on a running orchestrator service: validation as
//! `nexus config check` does it, with each problem on its field; dry runs that write nothing;
//! atomic writes that leave the other devices as they were; roles; `If-Match`; hostile bodies;
//! concurrent writers.

#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use nexus_common::auth::token_sha256;
use nexus_common::config::Config;
use nexus_common::telemetry::Telemetry;
use nexus_common::testing::{self, free_port, SERVICE_USER};
use nexus_orchestrator::status;
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;

const ADMIN: &str = "nxs_aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
const OPERATOR: &str = "nxs_bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb";
const VIEWER: &str = "nxs_cccccccccccccccccccccccccccccccccccccccccccccccccccccccccccccccc";

const FIRST: &str = "# the plant's first PLC
devices:
  - id: plc-1
    protocol: modbus
    uns_prefix: acme/site/area/line-1
    poll_interval: 1s
    connection: { host: 10.0.0.5, port: 502, unit_id: 1, timeout: 1s }
    tags:
      - { id: temperature, address: \"HR:0\", data_type: float32, unit: degC }
";

struct Api {
    port: u16,
    dir: tempfile::TempDir,
    _broker: nexus_common::broker::EmbeddedBroker,
    stop: CancellationToken,
}

impl Api {
    async fn start(devices: Option<&str>) -> Api {
        let broker = testing::service_broker();
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let devices_line = match devices {
            Some(text) => {
                std::fs::write(dir.path().join("devices.yaml"), text).unwrap();
                format!(
                    "devices_file: {}\n",
                    dir.path().join("devices.yaml").display()
                )
            }
            None => FIRST.replace("# the plant's first PLC\n", ""),
        };
        let tokens: String = [
            ("adm", ADMIN, "admin"),
            ("op", OPERATOR, "operator"),
            ("v", VIEWER, "viewer"),
        ]
        .iter()
        .map(|(n, t, r)| {
            format!(
                "    - {{ name: {n}, sha256: \"{}\", role: {r} }}\n",
                token_sha256(t)
            )
        })
        .collect();
        let text = format!(
            "mqtt: {{ host: 127.0.0.1, port: {}, username: {} }}\n\
             auth:\n  anonymous: \"off\"\n  tokens:\n{tokens}\
             orchestrator: {{ http_listen: 127.0.0.1:{port} }}\n\
             telemetry: {{ instance: control-test }}\n{devices_line}",
            broker.ports.tcp().port(),
            SERVICE_USER.0
        );
        let cfg = Config::from_str_with_env(
            &text,
            None,
            &[("NEXUS_MQTT__PASSWORD".into(), SERVICE_USER.1.into())],
        )
        .unwrap();
        let stop = CancellationToken::new();
        tokio::spawn(status::run_with(
            Arc::new(cfg),
            Telemetry::new(status::SERVICE),
            json!({}),
            stop.clone(),
        ));
        let started = Instant::now();
        while testing::http(port, "GET", "/healthz", "").0 != 200 {
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "no orchestrator"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Api {
            port,
            dir,
            _broker: broker,
            stop,
        }
    }

    fn file(&self) -> std::path::PathBuf {
        self.dir.path().join("devices.yaml")
    }

    async fn call(
        &self,
        token: Option<&str>,
        method: &str,
        path: &str,
        headers: &[&str],
        body: &str,
    ) -> (u16, Value) {
        let (port, method, path, body) = (
            self.port,
            method.to_owned(),
            path.to_owned(),
            body.to_owned(),
        );
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
}

impl Drop for Api {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

fn modbus(id: &str, port: Value) -> Value {
    json!({
        "id": id,
        "protocol": "modbus",
        "uns_prefix": "acme/site/area/line-2",
        "poll_interval": "500ms",
        "connection": {"host": "127.0.0.1", "port": port, "unit_id": 1, "timeout": "1s"},
        "tags": [{"id": "speed", "address": "HR:4", "data_type": "uint16", "unit": "rpm"}]
    })
}

/// The devices of a file, as the loader reads them.
fn load(path: &Path) -> Vec<String> {
    let text = format!("devices_file: {}\n", path.display());
    Config::from_str_with_env(&text, None, &[])
        .unwrap()
        .devices
        .iter()
        .map(|d| d.id.to_string())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn devices_are_validated_written_atomically_and_only_by_admins() {
    let api = Api::start(Some(FIRST)).await;
    let (s, v) = api
        .call(Some(VIEWER), "GET", "/api/v1/devices", &[], "")
        .await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["editable"], true);
    assert_eq!(v["devices"][0]["id"], "plc-1");
    assert_eq!(v["devices"][0]["config"]["connection"]["port"], 502);
    let version = v["version"].as_str().unwrap().to_owned();

    // A port out of range: the problem is on its field, and nothing is written.
    let body = modbus("plc-2", json!(70000)).to_string();
    let (s, v) = api
        .call(
            Some(ADMIN),
            "POST",
            "/api/v1/devices?dry_run=true",
            &[],
            &body,
        )
        .await;
    assert_eq!(s, 422, "{v}");
    let problems = v["problems"].as_array().unwrap();
    assert!(
        problems.iter().any(|p| p["field"] == "connection.port"),
        "{v}"
    );
    // An unknown key is named too, as `nexus config check` names it.
    let mut typo = modbus("plc-2", json!(502));
    typo["conection"] = json!({});
    let (s, v) = api
        .call(
            Some(ADMIN),
            "POST",
            "/api/v1/devices",
            &[],
            &typo.to_string(),
        )
        .await;
    assert_eq!(s, 422, "{v}");
    assert!(v["problems"].to_string().contains("conection"), "{v}");
    assert_eq!(std::fs::read_to_string(api.file()).unwrap(), FIRST);

    // A valid dry run writes nothing either.
    let body = modbus("plc-2", json!(5020)).to_string();
    let (s, v) = api
        .call(
            Some(ADMIN),
            "POST",
            "/api/v1/devices?dry_run=true",
            &[],
            &body,
        )
        .await;
    assert_eq!((s, &v), (200, &json!({"valid": true})));
    assert_eq!(std::fs::read_to_string(api.file()).unwrap(), FIRST);

    // Viewers, operators and strangers may not add devices.
    assert_eq!(
        api.call(Some(VIEWER), "POST", "/api/v1/devices", &[], &body)
            .await
            .0,
        403
    );
    assert_eq!(
        api.call(Some(OPERATOR), "POST", "/api/v1/devices", &[], &body)
            .await
            .0,
        403
    );
    assert_eq!(
        api.call(None, "POST", "/api/v1/devices", &[], &body)
            .await
            .0,
        401
    );
    assert_eq!(
        api.call(None, "GET", "/api/v1/devices", &[], "").await.0,
        401
    );

    // An admin adds it: the file holds both, the first as it was, the old file kept.
    let (s, v) = api
        .call(Some(ADMIN), "POST", "/api/v1/devices", &[], &body)
        .await;
    assert_eq!(s, 201, "{v}");
    assert_eq!(load(&api.file()), ["plc-1", "plc-2"]);
    let (_, all) = api
        .call(Some(VIEWER), "GET", "/api/v1/devices", &[], "")
        .await;
    let (first, _) = nexus_common::config::yaml::parse(FIRST).unwrap();
    assert_eq!(all["devices"][0]["config"], first["devices"][0]);
    assert_eq!(all["devices"][1]["config"], modbus("plc-2", json!(5020)));
    assert_eq!(
        std::fs::read_to_string(api.dir.path().join("devices.yaml.previous")).unwrap(),
        FIRST
    );
    let (s, v) = api
        .call(Some(ADMIN), "POST", "/api/v1/devices", &[], &body)
        .await;
    assert_eq!(s, 409, "{v}");
    assert_eq!(v["problems"][0]["field"], "id");

    // A change made over an older version is refused; with the current one it lands.
    let mut off = modbus("plc-2", json!(5020));
    off["enabled"] = json!(false);
    let stale = format!("If-Match: \"{version}\"");
    let (s, _) = api
        .call(
            Some(ADMIN),
            "PUT",
            "/api/v1/devices/plc-2",
            &[&stale],
            &off.to_string(),
        )
        .await;
    assert_eq!(s, 412);
    let current = format!("If-Match: \"{}\"", all["version"].as_str().unwrap());
    let (s, v) = api
        .call(
            Some(ADMIN),
            "PUT",
            "/api/v1/devices/plc-2",
            &[&current],
            &off.to_string(),
        )
        .await;
    assert_eq!(s, 200, "{v}");
    let (_, one) = api
        .call(Some(VIEWER), "GET", "/api/v1/devices/plc-2", &[], "")
        .await;
    assert_eq!(one["config"]["enabled"], false);
    // The id in the body must be the one in the URL.
    let (s, v) = api
        .call(
            Some(ADMIN),
            "PUT",
            "/api/v1/devices/plc-1",
            &[],
            &off.to_string(),
        )
        .await;
    assert_eq!(s, 422, "{v}");
    assert_eq!(v["problems"][0]["field"], "id");

    // Delete.
    assert_eq!(
        api.call(Some(ADMIN), "DELETE", "/api/v1/devices/plc-2", &[], "")
            .await
            .0,
        204
    );
    assert_eq!(
        api.call(Some(VIEWER), "GET", "/api/v1/devices/plc-2", &[], "")
            .await
            .0,
        404
    );
    assert_eq!(
        api.call(Some(ADMIN), "DELETE", "/api/v1/devices/plc-2", &[], "")
            .await
            .0,
        404
    );
    assert_eq!(load(&api.file()), ["plc-1"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_bodies_get_clear_errors_and_change_nothing() {
    let api = Api::start(Some(FIRST)).await;
    let long_id = "x".repeat(10_000);
    let cases: Vec<(String, u16)> = vec![
        ("not json".into(), 400),
        ("[1, 2]".into(), 422),
        ("{}".into(), 422),
        (json!({"id": 7}).to_string(), 422),
        (modbus(&long_id, json!(502)).to_string(), 422),
        (modbus("a/b/#", json!(502)).to_string(), 422),
        (modbus("../../etc", json!(502)).to_string(), 422),
        (modbus("ok", json!("502; rm -rf /")).to_string(), 422),
        (modbus("ok", json!(-1)).to_string(), 422),
        (
            json!({"id": "ok", "protocol": "modbus", "tags": "all"}).to_string(),
            422,
        ),
    ];
    for (body, want) in cases {
        let (s, v) = api
            .call(Some(ADMIN), "POST", "/api/v1/devices", &[], &body)
            .await;
        assert_eq!(s, want, "{}: {v}", &body[..body.len().min(80)]);
        assert!(v["error"].is_string(), "a JSON error naming what: {v}");
        assert!(
            v.to_string().len() < 4096,
            "the answer does not echo a huge input: {}",
            v.to_string().len()
        );
    }
    for path in [
        "/api/v1/devices/..%2F..%2Fetc",
        "/api/v1/devices/%00",
        "/api/v1/devices/nope",
    ] {
        let (s, _) = api.call(Some(ADMIN), "DELETE", path, &[], "").await;
        assert_eq!(s, 404, "{path}");
    }
    assert_eq!(std::fs::read_to_string(api.file()).unwrap(), FIRST);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_admins_lose_no_device() {
    let api = Arc::new(Api::start(Some("devices: []\n")).await);
    let mut tasks = Vec::new();
    for i in 0..12 {
        let api = api.clone();
        tasks.push(tokio::spawn(async move {
            let body = modbus(&format!("dev-{i:02}"), json!(5020)).to_string();
            api.call(Some(ADMIN), "POST", "/api/v1/devices", &[], &body)
                .await
                .0
        }));
    }
    for t in tasks {
        assert_eq!(t.await.unwrap(), 201);
    }
    let ids = load(&api.file());
    assert_eq!(ids.len(), 12, "{ids:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn devices_written_in_the_config_file_are_shown_but_not_edited() {
    let api = Api::start(None).await;
    let (s, v) = api
        .call(Some(VIEWER), "GET", "/api/v1/devices", &[], "")
        .await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["editable"], false);
    assert!(
        v["reason"].as_str().unwrap().contains("devices_file"),
        "{v}"
    );
    assert_eq!(v["devices"][0]["id"], "plc-1");
    let body = modbus("plc-2", json!(5020)).to_string();
    let (s, v) = api
        .call(Some(ADMIN), "POST", "/api/v1/devices", &[], &body)
        .await;
    assert_eq!(s, 409, "{v}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_openapi_document_names_every_route_of_the_port_and_no_other() {
    let api = Api::start(Some(FIRST)).await;
    let (s, doc) = api.call(None, "GET", "/api/openapi.json", &[], "").await;
    assert_eq!(s, 200, "open to anyone: {doc}");
    let mut documented: Vec<(String, String)> = Vec::new();
    for (path, item) in doc["paths"].as_object().unwrap() {
        for method in item.as_object().unwrap().keys() {
            if method != "parameters" {
                documented.push((method.to_uppercase(), path.clone()));
            }
        }
    }
    documented.sort();
    let control = nexus_orchestrator::control::routes(nexus_orchestrator::control::ControlState {
        devices: Arc::new(nexus_orchestrator::control::DeviceFile::new(
            &Config::default(),
        )),
        board: status::StatusBoard::default(),
    });
    let mut served: Vec<(String, String)> = control
        .policy()
        .iter()
        .map(|(m, p, _)| (m.to_string(), p.clone()))
        .chain(
            control
                .public_paths()
                .iter()
                .map(|p| ("GET".to_owned(), p.clone())),
        )
        .collect();
    // Every port's own routes (health, metrics, sessions) and the status route.
    for (m, p) in [
        ("GET", "/healthz"),
        ("GET", "/readyz"),
        ("GET", "/metrics"),
        ("POST", "/api/v1/login"),
        ("POST", "/api/v1/logout"),
        ("GET", "/api/v1/whoami"),
        ("GET", "/api/v1/status"),
    ] {
        served.push((m.to_owned(), p.to_owned()));
    }
    served.sort();
    assert_eq!(documented, served);
    // And each documented GET answers with a status it documents.
    for (m, p) in &documented {
        if m != "GET" || p.contains('{') {
            continue;
        }
        let (s, v) = api.call(Some(ADMIN), "GET", p, &[], "").await;
        assert!(
            doc["paths"][p]["get"]["responses"]
                .get(s.to_string())
                .is_some(),
            "GET {p} answered {s}, undocumented: {v}"
        );
    }
}
