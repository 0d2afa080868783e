//! The `nexus` binary, black-box: config check exit codes, and `nexus up` serving a broker
//! that Mosquitto's own clients use, health on :5000, and a clean stop on SIGINT.

#![allow(clippy::unwrap_used)] // test helpers outside #[test] functions

use std::io::{BufRead, BufReader, Read, Write};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nexus_common::testing::free_port;

const NEXUS: &str = env!("CARGO_BIN_EXE_nexus");

mod support;

/// A child process killed when the test ends.
struct Up(Child);

impl Drop for Up {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn write_config(text: &str) -> tempfile::NamedTempFile {
    let mut f = tempfile::Builder::new().suffix(".yaml").tempfile().unwrap();
    f.write_all(text.as_bytes()).unwrap();
    f
}

#[test]
fn config_check_accepts_a_good_file() {
    let f = write_config("broker:\n  port: 1999\ntelemetry:\n  log_level: debug\n");
    let out = Command::new(NEXUS)
        .args(["config", "check", "--config"])
        .arg(f.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("configuration OK"));
}

const BAD: &str = r#"
broker:
  port: 70000
mqtt:
  hots: x
devices:
  - id: plc-1
    protocol: modbus
    uns_prefix: acme/site
    connection: { host: 127.0.0.1 }
    tags:
      - { id: t, address: "HR:1", data_type: float33 }
"#;

#[test]
fn bad_config_exits_64_with_every_problem() {
    let f = write_config(BAD);
    let name = f.path().display().to_string();
    for args in [vec!["config", "check", "--config"], vec!["up", "--config"]] {
        let out = Command::new(NEXUS)
            .args(&args)
            .arg(f.path())
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(64), "{args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("3 configuration problems"), "{err}");
        assert!(
            err.contains(&format!(
                "{name}:3:3: broker.port: invalid value: integer `70000`"
            )),
            "{err}"
        );
        assert!(
            err.contains(&format!("{name}:5:3: mqtt.hots: unknown field `hots`")),
            "{err}"
        );
        assert!(
            err.contains("devices[0].tags[0].data_type: unknown variant `float33`"),
            "{err}"
        );
    }
    // A missing file is a bad config too.
    let out = Command::new(NEXUS)
        .args(["config", "check", "--config", "/nonexistent/nexus.yaml"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    // So is a bad environment override.
    let out = Command::new(NEXUS)
        .args(["config", "check"])
        .env("NEXUS_MQTT__PORT", "many")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("environment variable NEXUS_MQTT__PORT"));
}

fn http_get(port: u16, path: &str) -> Option<String> {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    Some(out)
}

#[test]
fn up_serves_a_broker_for_real_clients_and_stops_cleanly() {
    let mut up = support::DemoUp::start("ci", &[]);
    let (mqtt, http, banner) = (up.mqtt, up.http, up.banner.clone());
    assert!(
        banner.contains(&format!("mqtt://127.0.0.1:{mqtt}")),
        "{banner}"
    );
    assert!(
        banner.contains("demo login    operator / nexus-demo"),
        "{banner}"
    );

    // Health answers once the HTTP server is up; readiness once the services are connected.
    // (A debug build on a busy 2-core machine, making its OPC UA key pairs: give it time.)
    let start = Instant::now();
    while !http_get(http, "/healthz").is_some_and(|r| r.starts_with("HTTP/1.0 200")) {
        assert!(start.elapsed() < Duration::from_secs(30), "no /healthz");
        std::thread::sleep(Duration::from_millis(50));
    }
    eprintln!("healthz after {:?}", start.elapsed());
    while !http_get(http, "/readyz").is_some_and(|r| r.starts_with("HTTP/1.0 200")) {
        assert!(start.elapsed() < Duration::from_secs(30), "not ready");
        std::thread::sleep(Duration::from_millis(100));
    }
    // Every metric docs/broker.md names is served.
    let metrics = http_get(http, "/metrics").unwrap();
    nexus_common::testing::assert_documented_metrics_served("broker.md", &metrics);

    // Real clients: every service's retained status, and a pub/sub round trip.
    let port = mqtt.to_string();
    let start = Instant::now();
    loop {
        let status = Command::new("mosquitto_sub")
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &port,
                "-t",
                "$nexus/status/service/#",
                "-v",
                "-W",
                "2",
            ])
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&status.stdout).into_owned();
        let online = ["gateway", "commands", "alerts", "orchestrator"]
            .iter()
            .all(|s| {
                text.contains(&format!(
                    "$nexus/status/service/{s}/ci {{\"state\":\"online\""
                ))
            });
        if online {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(15),
            "services not online: {text}"
        );
    }
    // An anonymous client on this machine reads, but cannot write into the namespace: its
    // publish (MQTT 5, so the refusal is answered) never reaches a subscriber.
    let sub = Command::new("mosquitto_sub")
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &port,
            "-t",
            "acme/#",
            "-v",
            "-C",
            "1",
            "-W",
            "3",
        ])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(500));
    let forged = Command::new("mosquitto_pub")
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &port,
            "-V",
            "mqttv5",
            "-q",
            "1",
            "-t",
            "acme/site/x",
            "-m",
            "{\"v\":1}",
        ])
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&forged.stderr).to_lowercase();
    assert!(
        !forged.status.success() || said.contains("not authorized"),
        "anonymous publish accepted: {said}"
    );
    let out = sub.wait_with_output().unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "");

    // The demo device's values are in the namespace within seconds.
    let demo = Command::new("mosquitto_sub")
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &port,
            "-t",
            "demo/plant/packaging/line-1/sim-plc-1/#",
            "-v",
            "-C",
            "5",
            "-W",
            "10",
        ])
        .output()
        .unwrap();
    let demo = String::from_utf8_lossy(&demo.stdout).into_owned();
    assert_eq!(demo.lines().count(), 5, "{demo}");
    assert!(demo.contains("\"q\":\"good\""), "{demo}");

    // So are the OPC UA simulator's, through a subscription (the first start also creates the
    // gateway's client certificate).
    let ua = Command::new("mosquitto_sub")
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &port,
            "-t",
            "demo/plant/packaging/line-2/sim-ua-1/counter",
            "-v",
            "-C",
            "3",
            "-W",
            "20",
        ])
        .output()
        .unwrap();
    let ua = String::from_utf8_lossy(&ua.stdout).into_owned();
    assert_eq!(ua.lines().count(), 3, "{ua}");
    assert!(
        ua.contains("\"q\":\"good\"") && ua.contains("\"src_ts\""),
        "{ua}"
    );

    // The demo operator writes a setpoint back to the simulated PLC and gets the answer.
    let answer = Command::new("mosquitto_sub")
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &port,
            "-t",
            "$nexus/cmd/response/sim-plc-1/setpoint",
            "-C",
            "1",
            "-W",
            "10",
        ])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(500));
    let sent = Command::new("mosquitto_pub")
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &port,
            "-u",
            "operator",
            "-P",
            "nexus-demo",
            "-t",
            "$nexus/cmd/sim-plc-1/setpoint/set",
            "-m",
            "72.5",
        ])
        .status()
        .unwrap();
    assert!(sent.success());
    let answer = String::from_utf8_lossy(&answer.wait_with_output().unwrap().stdout).into_owned();
    assert!(
        answer.contains("\"success\":true") && answer.contains("\"value\":72.5"),
        "{answer}"
    );

    // The platform status API lists the services.
    let status = http_get(http, "/api/v1/status").unwrap();
    assert!(status.contains("\"gateway/ci\""), "{status}");

    // SIGINT: services publish offline and the process exits 0.
    let watcher = Command::new("mosquitto_sub")
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &port,
            "-t",
            "$nexus/status/service/gateway/ci",
            "-C",
            "2",
            "-W",
            "10",
        ])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(500));
    assert!(Command::new("kill")
        .args(["-INT", &up.child.id().to_string()])
        .status()
        .unwrap()
        .success());
    let start = Instant::now();
    let code = loop {
        if let Some(s) = up.child.try_wait().unwrap() {
            break s;
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "nexus up did not stop"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(code.success(), "{code}");
    let seen = String::from_utf8_lossy(&watcher.wait_with_output().unwrap().stdout).into_owned();
    assert!(seen.contains("\"state\":\"offline\""), "{seen}");
    // Every runtime file of the demo (buffer, PKI of client and simulator) is under
    // nexus-data/, which git ignores: a run from the repo root leaves the work tree clean.
    let left: Vec<String> = std::fs::read_dir(up.dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(left, vec!["nexus-data".to_owned()]);
    assert!(std::fs::read_to_string(repo(".gitignore"))
        .unwrap()
        .lines()
        .any(|l| l.trim() == "nexus-data/"));
}

fn repo(path: &str) -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join(path)
}

#[test]
fn shipped_configurations_are_valid() {
    // deploy/nexus.example.yaml
    let out = Command::new(NEXUS)
        .args(["config", "check", "--config"])
        .arg(repo("deploy/nexus.example.yaml"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("3 devices, 3 alert rules"));

    // The configurations of the Kubernetes overlays (the compose stack mounts the edge one),
    // with the secrets their pods get from the environment.
    for overlay in ["edge", "plant"] {
        let out = Command::new(NEXUS)
            .args(["config", "check", "--config"])
            .arg(repo(&format!("k8s/overlays/{overlay}/nexus.yaml")))
            .envs(
                [
                    "NEXUS_SERVICE_PASSWORD",
                    "NEXUS_OPERATOR_PASSWORD",
                    "NEXUS_ADMIN_PASSWORD",
                    "NEXUS_VIEWER_PASSWORD",
                ]
                .map(|k| (k, "a-long-enough-secret-for-the-check")),
            )
            .env("NEXUS_DATABASE_URL", "postgres://nexus@nexus-db:5432/nexus")
            .envs(
                (overlay == "plant")
                    .then_some(("NEXUS_MQTT__PASSWORD", "a-long-enough-secret-for-the-check")),
            )
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{overlay}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[test]
fn a_killed_service_is_marked_offline_by_its_last_will() {
    let broker = nexus_common::testing::service_broker();
    let port = broker.ports.tcp().port().to_string();
    // Its runtime files (buffer, PKI) go to a temporary working directory.
    let work = tempfile::tempdir().unwrap();
    let mut gw = Up(Command::new(NEXUS)
        .current_dir(work.path())
        .args(["--log-format", "json", "gateway"])
        .env("NEXUS_MQTT__PORT", &port)
        .env("NEXUS_MQTT__USERNAME", "svc")
        .env("NEXUS_MQTT__PASSWORD", "svc-pw")
        .env(
            "NEXUS_GATEWAY__HTTP_LISTEN",
            format!("127.0.0.1:{}", free_port()),
        )
        .env("NEXUS_TELEMETRY__INSTANCE", "will-test")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap());
    let topic = "$nexus/status/service/gateway/will-test";
    let state = || {
        let out = Command::new("mosquitto_sub")
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &port,
                "-t",
                topic,
                "-C",
                "1",
                "-W",
                "2",
            ])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let start = Instant::now();
    while !state().contains("\"state\":\"online\"") {
        assert!(
            start.elapsed() < Duration::from_secs(15),
            "gateway never online"
        );
    }
    // Logs are JSON objects, one per line.
    let mut stderr = BufReader::new(gw.0.stderr.take().unwrap());
    let mut line = String::new();
    stderr.read_line(&mut line).unwrap();
    let v: serde_json::Value =
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("not JSON: {line:?}: {e}"));
    assert!(
        v.get("level").is_some() && v.get("message").is_some(),
        "{v}"
    );

    // kill -9: no clean disconnect, so the broker publishes the will.
    gw.0.kill().unwrap();
    gw.0.wait().unwrap();
    let start = Instant::now();
    while !state().contains("\"state\":\"offline\"") {
        assert!(
            start.elapsed() < Duration::from_secs(15),
            "last will not published"
        );
    }
}

/// In `nexus gateway` the command handler runs beside the gateway: when the handler cannot
/// start (its HTTP port is taken), the pair fails and is restarted together, and a handler
/// that keeps failing stops the process, instead of a gateway running on without it.
#[test]
fn a_command_handler_that_cannot_start_takes_the_gateway_with_it() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let work = tempfile::tempdir().unwrap();
    let mut gw = Up(Command::new(NEXUS)
        .current_dir(work.path())
        .args(["gateway"])
        .env("NEXUS_MQTT__PORT", free_port().to_string())
        .env(
            "NEXUS_GATEWAY__HTTP_LISTEN",
            format!("127.0.0.1:{}", free_port()),
        )
        .env(
            "NEXUS_COMMANDS__HTTP_LISTEN",
            taken.local_addr().unwrap().to_string(),
        )
        .env("NEXUS_ORCHESTRATOR__MAX_RESTARTS", "1")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap());
    let start = Instant::now();
    let status = loop {
        if let Some(status) = gw.0.try_wait().unwrap() {
            break status;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "the gateway kept running without its command handler"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(!status.success());
    let mut log = String::new();
    gw.0.stderr
        .take()
        .unwrap()
        .read_to_string(&mut log)
        .unwrap();
    assert!(log.contains("command handler"), "{log}");
}

/// Decimals in the shortest form of `x` (`21.2` has 1).
fn decimals(x: f64) -> usize {
    let s = format!("{x:e}");
    let (mantissa, exp) = s.split_once('e').unwrap();
    let frac = mantissa.split_once('.').map_or(0, |(_, f)| f.len()) as i64;
    (frac - exp.parse::<i64>().unwrap()).max(0) as usize
}

/// `nexus up --demo` with a historian: the demo's values reach the namespace, the database and
/// the history and latest APIs in their types, without float noise: `door-open` a bool,
/// `parts` an integer, `ambient` (an int16 with a scale of 0.1) with at most one decimal, the
/// float32 `temperature` in single-precision digits.
#[test]
fn up_demo_keeps_value_types_from_the_device_to_the_history_api() {
    let pg = nexus_common::testing::PgServer::start();
    let url = tokio::runtime::Runtime::new()
        .unwrap()
        .block_on(pg.create_database("demo"));
    let up = support::DemoUp::start("typed", &[("NEXUS_DATABASE_URL", &url)]);
    let (mqtt, ingest) = (up.mqtt, up.ingestion);
    let plc = "demo/plant/packaging/line-1/sim-plc-1";

    // The namespace: the retained ambient value, scaled without noise.
    let start = Instant::now();
    let ambient_payload = loop {
        let out = Command::new("mosquitto_sub")
            .args(["-h", "127.0.0.1", "-p", &mqtt.to_string()])
            .args(["-t", &format!("{plc}/ambient"), "-C", "1", "-W", "5"])
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        if !text.is_empty() {
            break text;
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "no ambient value"
        );
    };
    let published: serde_json::Value = serde_json::from_str(&ambient_payload).unwrap();
    let v = published["v"].as_f64().unwrap();
    assert!(decimals(v) <= 1, "{ambient_payload}");

    // Latest, once ingestion has stored the device's tags.
    let latest_path = format!("/api/v1/latest?filter={plc}/%23");
    let start = Instant::now();
    let latest: serde_json::Value = loop {
        let (status, body) = nexus_common::testing::http(ingest, "GET", &latest_path, "");
        if status == 200 {
            let json: serde_json::Value = serde_json::from_str(&body).unwrap();
            let have = |tag: &str| {
                json["values"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .any(|v| v["topic"] == format!("{plc}/{tag}"))
            };
            if ["door-open", "parts", "ambient", "temperature"]
                .into_iter()
                .all(have)
            {
                break json;
            }
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "latest never held the demo's tags: {status} {body}"
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    let value = |tag: &str| {
        latest["values"]
            .as_array()
            .unwrap()
            .iter()
            .find(|v| v["topic"] == format!("{plc}/{tag}"))
            .unwrap()
            .clone()
    };
    assert!(value("door-open")["v"].is_boolean(), "{latest}");
    assert!(value("parts")["v"].is_u64(), "{latest}");
    let ambient = value("ambient");
    assert!(ambient["v"].is_f64(), "{latest}");
    assert!(decimals(ambient["v"].as_f64().unwrap()) <= 1, "{latest}");
    assert_eq!(ambient["u"], "degC");
    let temperature = value("temperature")["v"].as_f64().unwrap();
    assert_eq!(
        temperature,
        nexus_common::domain::widen_f32(temperature as f32),
        "float32 digits only: {latest}"
    );

    // The writable setpoint (int16, scale 0.1) set to 21.2 by the demo operator: register 212,
    // read back and published as 21.2, where plain floats give 21.200000000000003.
    let sent = Command::new("mosquitto_pub")
        .args(["-h", "127.0.0.1", "-p", &mqtt.to_string()])
        .args(["-u", "operator", "-P", "nexus-demo"])
        .args(["-t", "$nexus/cmd/sim-plc-1/setpoint/set", "-m", "21.2"])
        .status()
        .unwrap();
    assert!(sent.success());
    let setpoint_path = format!("/api/v1/latest?filter={plc}/setpoint");
    let start = Instant::now();
    loop {
        let (_, body) = nexus_common::testing::http(ingest, "GET", &setpoint_path, "");
        if body.contains(r#""v":21.2,"#) || body.contains(r#""v":21.2}"#) {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "the setpoint never read back as 21.2: {body}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }

    // History: every stored point in its type.
    let history = |tag: &str| {
        let (status, body) = nexus_common::testing::http(
            ingest,
            "GET",
            &format!("/api/v1/history?topic={plc}/{tag}&from=now-1h&agg=raw"),
            "",
        );
        assert_eq!(status, 200, "{body}");
        let json: serde_json::Value = serde_json::from_str(&body).unwrap();
        json["points"].as_array().unwrap().clone()
    };
    let door = history("door-open");
    assert!(!door.is_empty());
    assert!(door.iter().all(|p| p["v"].is_boolean()), "{door:?}");
    let parts = history("parts");
    assert!(parts.iter().all(|p| p["v"].is_u64()), "{parts:?}");
    let ambient = history("ambient");
    assert!(!ambient.is_empty());
    assert!(
        ambient
            .iter()
            .all(|p| p["v"].as_f64().is_some_and(|v| decimals(v) <= 1)),
        "{ambient:?}"
    );
}
