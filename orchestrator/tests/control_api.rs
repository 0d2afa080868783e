//! The control API's device routes on a running orchestrator service: validation as
//! `nexus config check` does it, with each problem on its field; dry runs that write nothing;
//! atomic writes that leave the other devices as they were; roles; `If-Match`; hostile bodies;
//! concurrent writers.

#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use nexus_common::config::Config;
use nexus_common::testing::{self, free_port, SERVICE_USER};
use nexus_orchestrator::status;
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;

mod support;

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
        Self::start_with(devices, "").await
    }

    /// [`Api::start`] with `extra` configuration sections.
    async fn start_with(devices: Option<&str>, extra: &str) -> Api {
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
        let tokens = support::tokens(&[
            ("adm", ADMIN, "admin"),
            ("op", OPERATOR, "operator"),
            ("v", VIEWER, "viewer"),
        ]);
        let text = format!(
            "mqtt: {{ host: 127.0.0.1, port: {}, username: {} }}\n\
             auth:\n  anonymous: \"off\"\n  tokens:\n{tokens}\
             orchestrator: {{ http_listen: 127.0.0.1:{port} }}\n\
             telemetry: {{ instance: control-test }}\n{extra}{devices_line}",
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
        support::orchestrator(Arc::new(cfg), stop.clone()).await;
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
        support::call(self.port, token, method, path, headers, body).await
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
    let control =
        nexus_orchestrator::control::routes(nexus_orchestrator::control::ControlState::new(
            Arc::new(Config::default()),
            Arc::new(nexus_orchestrator::control::DeviceFile::new(
                &Config::default(),
            )),
            status::StatusBoard::default(),
        ));
    let proxy = nexus_orchestrator::proxy::routes(
        nexus_orchestrator::proxy::Upstreams::new(&Config::default()).unwrap(),
    );
    let writes = nexus_orchestrator::commands::routes(nexus_orchestrator::commands::Writer::new());
    let mut served: Vec<(String, String)> = control
        .policy()
        .iter()
        .chain(proxy.policy())
        .chain(writes.policy())
        .map(|(m, p, _)| (m.to_string(), p.clone()))
        .chain(
            control
                .public_paths()
                .iter()
                .map(|p| ("GET".to_owned(), p.clone())),
        )
        .collect();
    // Every port's own routes (health, metrics, sessions), the status and live namespace
    // routes (the control center's page and files are not API: docs/adr/0008).
    for (m, p) in [
        ("GET", "/healthz"),
        ("GET", "/readyz"),
        ("GET", "/metrics"),
        ("POST", "/api/v1/login"),
        ("POST", "/api/v1/logout"),
        ("GET", "/api/v1/whoami"),
        ("GET", "/api/v1/status"),
        ("GET", "/api/v1/status/stream"),
        ("GET", "/api/v1/namespace"),
        ("GET", "/api/v1/namespace/stream"),
    ] {
        served.push((m.to_owned(), p.to_owned()));
    }
    served.sort();
    assert_eq!(documented, served);
    // And each documented GET answers with a status it documents.
    for (m, p) in &documented {
        if m != "GET" || p.contains('{') || p.ends_with("/stream") {
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

/// Read server-sent events from a raw HTTP/1.1 connection until `want` events arrived.
async fn sse_events(
    stream: &mut tokio::net::TcpStream,
    want: usize,
    limit: Duration,
) -> Vec<(String, Value)> {
    use tokio::io::AsyncReadExt;
    let mut buf = Vec::new();
    let started = Instant::now();
    loop {
        let text = String::from_utf8_lossy(&buf).into_owned();
        let events: Vec<(String, Value)> = text
            .split("\n\n")
            .filter_map(|block| {
                let kind = block.lines().find_map(|l| l.strip_prefix("event: "))?;
                let data = block.lines().find_map(|l| l.strip_prefix("data: "))?;
                Some((kind.to_owned(), serde_json::from_str(data).ok()?))
            })
            .collect();
        if events.len() >= want {
            return events;
        }
        let mut chunk = [0u8; 65536];
        let left = limit.saturating_sub(started.elapsed());
        match tokio::time::timeout(left, stream.read(&mut chunk)).await {
            Ok(Ok(n)) if n > 0 => buf.extend_from_slice(&chunk[..n]),
            _ => panic!("{} events of {want} in {limit:?}:\n{text}", events.len()),
        }
    }
}

/// `GET path` of an event stream on a raw connection, as `token`.
async fn sse_stream(port: u16, path: &str, token: &str) -> tokio::net::TcpStream {
    use tokio::io::AsyncWriteExt;
    let mut sse = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    sse.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n\r\n")
            .as_bytes(),
    )
    .await
    .unwrap();
    sse
}

/// An MQTT client of the test's broker, connected.
async fn mqtt_client(
    cfg: nexus_common::config::MqttConfig,
    id: &str,
    stop: &CancellationToken,
) -> nexus_common::mqtt::MqttHandle {
    let (client, _rx) = nexus_common::mqtt::connect(
        &cfg,
        nexus_common::mqtt::ClientSettings::new(id),
        None,
        stop.clone(),
    )
    .unwrap();
    client.wait_connected(Duration::from_secs(5)).await.unwrap();
    client
}

/// Read the stream until a `kind` event for which `done` holds; returns it.
async fn sse_until(
    sse: &mut tokio::net::TcpStream,
    kind: &str,
    done: impl Fn(&Value) -> bool,
) -> Value {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        assert!(!left.is_zero(), "no {kind} event as expected");
        for (k, v) in sse_events(sse, 1, left).await {
            if k == kind && done(&v) {
                return v;
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_status_shows_the_configured_devices_and_streams_every_change() {
    let api = Api::start(Some(FIRST)).await;
    let broker_port = api._broker.ports.tcp().port();
    let stop = CancellationToken::new();
    let gateway = mqtt_client(
        testing::service_mqtt_config(broker_port),
        "nexus-status-test",
        &stop,
    )
    .await;
    let qos = nexus_common::mqtt::QoS::AtLeastOnce;
    let status = |state: &str| json!({"state": state, "breaker": "closed", "ts": 1}).to_string();
    for (id, state) in [("plc-1", "online"), ("gone", "online")] {
        let topic = format!("$nexus/status/device/{id}");
        gateway
            .publish(&topic, status(state), qos, true)
            .await
            .unwrap();
    }
    // Only configured devices: a status left by a device no longer in the file is not shown.
    let started = Instant::now();
    let now = loop {
        let (s, v) = api
            .call(Some(VIEWER), "GET", "/api/v1/status", &[], "")
            .await;
        assert_eq!(s, 200, "{v}");
        if v["devices"]["plc-1"]["state"] == "online" || started.elapsed() > Duration::from_secs(10)
        {
            break v;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(now["devices"]["plc-1"]["state"], "online", "{now}");
    assert!(now["devices"].get("gone").is_none(), "{now}");
    assert_eq!(
        api.call(None, "GET", "/api/v1/status/stream", &[], "")
            .await
            .0,
        401
    );

    // The stream: the status at once, then again at each change.
    let mut sse = sse_stream(api.port, "/api/v1/status/stream", VIEWER).await;
    let first = sse_until(&mut sse, "status", |_| true).await;
    assert_eq!(first["devices"]["plc-1"]["state"], "online", "{first}");
    assert!(first["devices"].get("gone").is_none(), "{first}");
    gateway
        .publish("$nexus/status/device/plc-1", status("offline"), qos, true)
        .await
        .unwrap();
    sse_until(&mut sse, "status", |v| {
        v["devices"]["plc-1"]["state"] == "offline"
    })
    .await;
    // A device added disabled through the API is listed as disabled; one without a status
    // yet as unknown.
    let mut off = modbus("plc-off", json!(502));
    off["enabled"] = json!(false);
    let (s, v) = api
        .call(
            Some(ADMIN),
            "POST",
            "/api/v1/devices",
            &[],
            &off.to_string(),
        )
        .await;
    assert_eq!(s, 201, "{v}");
    let (s, v) = api
        .call(
            Some(ADMIN),
            "POST",
            "/api/v1/devices",
            &[],
            &modbus("plc-2", json!(502)).to_string(),
        )
        .await;
    assert_eq!(s, 201, "{v}");
    let listed = sse_until(&mut sse, "status", |v| v["devices"].get("plc-2").is_some()).await;
    assert_eq!(
        listed["devices"]["plc-off"]["state"], "disabled",
        "{listed}"
    );
    assert_eq!(listed["devices"]["plc-2"]["state"], "unknown", "{listed}");
    // Deleted: it leaves the list, though its status is still retained.
    let (s, v) = api
        .call(Some(ADMIN), "DELETE", "/api/v1/devices/plc-1", &[], "")
        .await;
    assert_eq!(s, 204, "{v}");
    let after = sse_until(&mut sse, "status", |v| v["devices"].get("plc-1").is_none()).await;
    assert!(after["devices"].get("plc-2").is_some(), "{after}");
    // An alarm that changed is a notice on the stream.
    gateway
        .publish("$nexus/alarms/acme/x/high", "{}", qos, true)
        .await
        .unwrap();
    sse_until(&mut sse, "alarms", |v| v.as_u64().is_some_and(|n| n >= 1)).await;
    stop.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn browsers_cannot_open_more_streams_than_the_bound() {
    use nexus_orchestrator::live::MAX_STREAMS;
    let api = Api::start(Some(FIRST)).await;
    let paths = ["/api/v1/status/stream", "/api/v1/namespace/stream"];
    // The live namespace's and the status's streams share one bound.
    let mut open = Vec::new();
    for i in 0..MAX_STREAMS {
        let mut sse = sse_stream(api.port, paths[i % 2], VIEWER).await;
        assert_eq!(
            sse_events(&mut sse, 1, Duration::from_secs(10)).await.len(),
            1
        );
        open.push(sse);
    }
    for path in paths {
        let (s, v) = api.call(Some(VIEWER), "GET", path, &[], "").await;
        assert_eq!(s, 503, "{path}: {v}");
        assert!(
            v["error"]
                .as_str()
                .unwrap()
                .contains(&format!("at most {MAX_STREAMS} streams")),
            "{v}"
        );
    }
    let (_, metrics) = api.call(Some(ADMIN), "GET", "/metrics", &[], "").await;
    let metrics = metrics.as_str().unwrap_or_default().to_owned();
    assert_eq!(
        testing::metric_value(&metrics, "nexus_orchestrator_streams_refused_total"),
        Some(2.0),
        "{metrics}"
    );
    // A stream that closes gives its slot back.
    open.pop();
    let started = Instant::now();
    loop {
        let mut sse = sse_stream(api.port, paths[0], VIEWER).await;
        let mut head = [0u8; 12];
        use tokio::io::AsyncReadExt;
        let n = sse.read(&mut head).await.unwrap();
        if head[..n].starts_with(b"HTTP/1.1 200") {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "no slot after a stream closed: {}",
            String::from_utf8_lossy(&head[..n])
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// `acme/a/tNN` for the first ten, `acme/b/tNN` for the others.
fn zone_topic(i: i32) -> String {
    format!("acme/{}/t{i:02}", if i < 10 { "a" } else { "b" })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_live_namespace_streams_a_snapshot_then_batched_updates() {
    let api = Api::start(Some(FIRST)).await;
    let broker_port = api._broker.ports.tcp().port();
    let stop = CancellationToken::new();
    let publisher = mqtt_client(
        testing::publisher_mqtt_config(broker_port),
        "live-test-publisher",
        &stop,
    )
    .await;
    let qos = nexus_common::mqtt::QoS::AtLeastOnce;
    // Wait until the orchestrator follows `#`: a retained message published while its
    // subscription is being made may reach it twice, live and as the retained copy the
    // subscription brings (MQTT allows both), and the counts below would be off by one.
    let started = Instant::now();
    loop {
        publisher
            .publish("probe/subscribed", "1", qos, false)
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        let (s, v) = api
            .call(
                Some(VIEWER),
                "GET",
                "/api/v1/namespace?filter=probe/%23",
                &[],
                "",
            )
            .await;
        assert_eq!(s, 200, "{v}");
        if !v.as_array().unwrap().is_empty() {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "the orchestrator follows the namespace"
        );
    }
    for i in 0..50 {
        let body = json!({"v": i, "q": "good", "ts": 1, "u": "degC"}).to_string();
        publisher
            .publish(&zone_topic(i), body, qos, true)
            .await
            .unwrap();
    }
    publisher.publish("other/x", "7", qos, true).await.unwrap();
    // The snapshot route sees them (retained, or as they arrived).
    let started = Instant::now();
    let snap = loop {
        let (s, v) = api
            .call(
                Some(VIEWER),
                "GET",
                "/api/v1/namespace?filter=acme/%2B/%23",
                &[],
                "",
            )
            .await;
        assert_eq!(s, 200, "{v}");
        if v.as_array().unwrap().len() == 50 || started.elapsed() > Duration::from_secs(10) {
            break v;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(snap.as_array().unwrap().len(), 50, "{snap}");
    assert_eq!(snap[3]["topic"], "acme/a/t03");
    assert_eq!(
        (&snap[3]["v"], &snap[3]["q"], &snap[3]["u"]),
        (&json!(3), &json!("good"), &json!("degC"))
    );
    // A filter that is no filter is refused.
    let (s, v) = api
        .call(
            Some(VIEWER),
            "GET",
            "/api/v1/namespace?filter=a/%23/b",
            &[],
            "",
        )
        .await;
    assert_eq!(s, 400, "{v}");
    assert_eq!(
        api.call(None, "GET", "/api/v1/namespace", &[], "").await.0,
        401
    );

    // The stream: a snapshot of the filter, then the changes, batched.
    let mut sse = sse_stream(
        api.port,
        "/api/v1/namespace/stream?filter=acme/a/%2B",
        VIEWER,
    )
    .await;
    let first = sse_events(&mut sse, 1, Duration::from_secs(5)).await;
    assert_eq!(first[0].0, "snapshot");
    assert_eq!(first[0].1.as_array().unwrap().len(), 10, "t00..t09");
    for round in 0..3 {
        for i in [1, 2, 15] {
            let body = json!({"v": 100 + round, "q": "good", "ts": 2}).to_string();
            publisher
                .publish(&zone_topic(i), body, qos, false)
                .await
                .unwrap();
        }
    }
    let events = sse_events(&mut sse, 1, Duration::from_secs(5)).await;
    let updates: Vec<&Value> = events
        .iter()
        .filter(|(k, _)| k == "update")
        .flat_map(|(_, v)| v.as_array().unwrap())
        .collect();
    let topics: std::collections::BTreeSet<&str> = updates
        .iter()
        .map(|e| e["topic"].as_str().unwrap())
        .collect();
    assert!(
        topics.iter().all(|t| t.starts_with("acme/a/")),
        "only the filter's topics: {topics:?}"
    );
    let last = updates
        .iter()
        .rev()
        .find(|e| e["topic"] == "acme/a/t01")
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut last = (*last).clone();
    while last["v"] != json!(102) {
        assert!(Instant::now() < deadline, "the last value arrives: {last}");
        let more = sse_events(&mut sse, 1, Duration::from_secs(5)).await;
        if let Some(e) = more
            .iter()
            .flat_map(|(_, v)| v.as_array().cloned().unwrap_or_default())
            .rev()
            .find(|e| e["topic"] == "acme/a/t01")
        {
            last = e;
        }
    }
    // One entry per topic and batch, however many messages it had; the count says how many
    // arrived (the retained one and three changes).
    assert_eq!(last["n"], json!(4), "{last}");
    let t01 = updates
        .iter()
        .filter(|e| e["topic"] == "acme/a/t01")
        .count();
    assert!(t01 <= 3, "t01 coalesced, not one entry per message: {t01}");
    stop.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_test_reads_every_tag_once_or_says_why_not() {
    let api = Api::start(Some(FIRST)).await;
    let sim = nexus_devices::simulator::modbus::ModbusSimulator::start(
        "127.0.0.1:0".parse().unwrap(),
        None,
    )
    .await
    .unwrap();
    sim.registers.lock().unwrap().holding[4] = 321;
    let mut dev = modbus("probe", json!(sim.addr.port()));
    dev["tags"] = json!([
        {"id": "speed", "address": "HR:4", "data_type": "uint16"},
        {"id": "far", "address": "HR:61000", "data_type": "uint16"}
    ]);
    let (s, v) = api
        .call(
            Some(ADMIN),
            "POST",
            "/api/v1/test-connection",
            &[],
            &dev.to_string(),
        )
        .await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["tags"][0]["tag"], "speed", "{v}");
    assert_eq!(
        (&v["tags"][0]["v"], &v["tags"][0]["q"]),
        (&json!(321), &json!("good")),
        "{v}"
    );
    // An address the device refuses is that tag's problem, named.
    assert_ne!(v["tags"][1]["q"], "good", "{v}");
    assert!(v["tags"][1]["error"].is_string(), "{v}");
    assert_eq!(v["ok"], false, "one tag is bad: {v}");
    // Nothing listening: the reason, in time.
    let closed = modbus("probe", json!(free_port())).to_string();
    let (s, v) = api
        .call(Some(ADMIN), "POST", "/api/v1/test-connection", &[], &closed)
        .await;
    assert_eq!((s, &v["ok"]), (200, &json!(false)), "{v}");
    assert!(!v["error"].as_str().unwrap().is_empty(), "{v}");
    // Validated like a write, admins only, and nothing is written.
    let bad = modbus("probe", json!(70000)).to_string();
    let (s, v) = api
        .call(Some(ADMIN), "POST", "/api/v1/test-connection", &[], &bad)
        .await;
    assert_eq!(s, 422, "{v}");
    assert_eq!(v["problems"][0]["field"], "connection.port", "{v}");
    let (s, _) = api
        .call(
            Some(OPERATOR),
            "POST",
            "/api/v1/test-connection",
            &[],
            &closed,
        )
        .await;
    assert_eq!(s, 403);
    assert_eq!(std::fs::read_to_string(api.file()).unwrap(), FIRST);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_opc_ua_server_is_browsed_to_pick_tags_before_the_device_is_saved() {
    use nexus_devices::simulator::opcua::{OpcUaSimOptions, OpcUaSimulator};
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let _sim = OpcUaSimulator::start(OpcUaSimOptions {
        port,
        pki_dir: dir.path().join("server-pki"),
        step: Duration::from_millis(200),
        ..OpcUaSimOptions::default()
    })
    .await
    .unwrap();
    // The orchestrator's OPC UA client trusts the simulator (commissioning setting).
    let api = Api::start_with(
        Some(FIRST),
        &format!(
            "gateway: {{ opcua: {{ pki_dir: {}, trust_server_certs: true }} }}\n",
            dir.path().join("client-pki").display()
        ),
    )
    .await;
    let ua = json!({
        "id": "ua-new", "protocol": "opcua", "uns_prefix": "acme/site",
        "connection": {"endpoint": format!("opc.tcp://127.0.0.1:{port}/"), "timeout": "2s"},
        "tags": [{"id": "x", "node_id": "ns=2;s=Sine", "data_type": "float64"}]
    })
    .to_string();
    let (s, top) = api
        .call(Some(ADMIN), "POST", "/api/v1/browse", &[], &ua)
        .await;
    assert_eq!(s, 200, "{top}");
    let names: Vec<&str> = top["children"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["browse_name"].as_str().unwrap_or_default())
        .collect();
    assert!(names.iter().any(|n| n.contains("Simulator")), "{names:?}");
    let sim_node = top["children"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| {
            c["browse_name"]
                .as_str()
                .unwrap_or_default()
                .contains("Simulator")
        })
        .unwrap()["node_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let path = format!(
        "/api/v1/browse?node={}",
        sim_node
            .replace('=', "%3D")
            .replace(';', "%3B")
            .replace(':', "%3A")
    );
    let (s, below) = api.call(Some(ADMIN), "POST", &path, &[], &ua).await;
    assert_eq!(s, 200, "{below}");
    assert!(below.to_string().contains("Sine"), "{below}");
    // A node the server does not know, a Modbus device, a viewer: refused, named.
    let (s, v) = api
        .call(Some(ADMIN), "POST", "/api/v1/browse?node=garbage", &[], &ua)
        .await;
    assert_eq!(s, 400, "{v}");
    let (s, v) = api
        .call(
            Some(ADMIN),
            "POST",
            "/api/v1/browse",
            &[],
            &modbus("m", json!(502)).to_string(),
        )
        .await;
    assert_eq!(s, 400, "{v}");
    assert_eq!(
        api.call(Some(VIEWER), "POST", "/api/v1/browse", &[], &ua)
            .await
            .0,
        403
    );
    assert_eq!(std::fs::read_to_string(api.file()).unwrap(), FIRST);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_checks_the_files_now_and_names_every_problem() {
    let broker = testing::service_broker();
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    std::fs::write(dir.path().join("devices.yaml"), FIRST).unwrap();
    let file = dir.path().join("nexus.yaml");
    std::fs::write(
        &file,
        format!(
            "mqtt: {{ host: 127.0.0.1, port: {}, username: {} }}\n\
             auth:\n  anonymous: \"off\"\n  tokens:\n{}\
             orchestrator: {{ http_listen: 127.0.0.1:{port} }}\n\
             devices_file: devices.yaml\n",
            broker.ports.tcp().port(),
            SERVICE_USER.0,
            support::tokens(&[("adm", ADMIN, "admin"), ("v", VIEWER, "viewer")]),
        ),
    )
    .unwrap();
    let env = [("NEXUS_MQTT__PASSWORD".to_owned(), SERVICE_USER.1.to_owned())];
    let cfg = Config::load_with_env(Some(&file), &env).unwrap();
    let stop = CancellationToken::new();
    support::orchestrator(Arc::new(cfg), stop.clone()).await;
    let (s, v) = support::call(port, Some(ADMIN), "POST", "/api/v1/reload", &[], "").await;
    assert_eq!(s, 200, "{v}");
    assert_eq!((&v["ok"], &v["devices"]), (&json!(true), &json!(1)), "{v}");
    assert_eq!(v["restart_needed"], json!([]), "{v}");
    // A setting read at start changed: the answer says it waits for the next start.
    let text = std::fs::read_to_string(&file).unwrap();
    std::fs::write(&file, format!("{text}telemetry: {{ instance: renamed }}\n")).unwrap();
    let (s, v) = support::call(port, Some(ADMIN), "POST", "/api/v1/reload", &[], "").await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["restart_needed"], json!(["telemetry"]), "{v}");
    // Broken by hand: the problem names the file, the line and the field.
    let broken = FIRST.replace("port: 502", "port: 70000");
    std::fs::write(dir.path().join("devices.yaml"), broken).unwrap();
    let (s, v) = support::call(port, Some(ADMIN), "POST", "/api/v1/reload", &[], "").await;
    assert_eq!(s, 422, "{v}");
    assert_eq!(
        v["problems"][0]["field"], "devices[0].connection.port",
        "{v}"
    );
    let msg = v["problems"][0]["message"].as_str().unwrap();
    assert!(msg.contains("devices.yaml") && msg.contains(":7:"), "{msg}");
    let (s, _) = support::call(port, Some(VIEWER), "POST", "/api/v1/reload", &[], "").await;
    assert_eq!(s, 403);
    stop.cancel();
}
