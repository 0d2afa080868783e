//! The command handler through a real broker against the tokio-modbus simulator and pymodbus:
//! writes land, every validation rule, malformed commands, queue full, rate limits, TTL,
//! duplicates, a dead device, MQTT 5 response topics (and a hostile one aimed at a denied
//! device), and the ACLs of the embedded broker and of Mosquitto.

#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use nexus_common::config::{BrokerConfig, Config, MqttVersion, Secret};
use nexus_common::mqtt::{self, ClientSettings, Message, MqttHandle, PublishProps, QoS};
use nexus_common::testing::{self, free_port, Mosquitto};
use nexus_devices::simulator::modbus::ModbusSimulator;
use serde_json::{json, Value};
use tokio::sync::mpsc::Receiver;
use tokio_util::sync::CancellationToken;

fn broker() -> nexus_common::broker::EmbeddedBroker {
    testing::service_broker()
}

const TAGS: &str = r#"      - { id: sp, address: "HR:10", data_type: int16, scale: 0.1, access: readwrite, min: 0, max: 100, unit: degC }
      - { id: f, address: "HR:300", data_type: float32, access: readwrite }
      - { id: n, address: "HR:310", data_type: uint16, access: write }
      - { id: ro, address: "HR:0", data_type: float32 }
      - { id: run, address: "CO:1", data_type: bool, access: readwrite }
"#;

struct Rig {
    _broker: Option<nexus_common::broker::EmbeddedBroker>,
    port: u16,
    http: u16,
    token: CancellationToken,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
    _dir: tempfile::TempDir,
}

/// The handler (standalone, own pools) with `devices` YAML and `commands` settings.
async fn rig(
    broker: Option<nexus_common::broker::EmbeddedBroker>,
    mqtt_port: u16,
    devices: &str,
    commands: &str,
) -> Rig {
    let dir = tempfile::tempdir().unwrap();
    let (token, task, http) = start_handler(
        mqtt_port,
        &testing::unique("cmd"),
        devices,
        &dir.path().join("journal"),
        commands,
    )
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    Rig {
        _broker: broker,
        port: mqtt_port,
        http,
        token,
        task,
        _dir: dir,
    }
}

fn device(id: &str, port: u16, extra: &str) -> String {
    format!("  - id: {id}\n    protocol: modbus\n    uns_prefix: acme/site\n    connection: {{ host: 127.0.0.1, port: {port}, timeout: 300ms{extra} }}\n    tags:\n{TAGS}")
}

async fn client(
    port: u16,
    user: &str,
    version: MqttVersion,
    subs: &[&str],
) -> (MqttHandle, Receiver<Message>) {
    let mut c = testing::mqtt_config(port);
    c.version = version;
    c.persistent_session = false;
    c.username = Some(user.into());
    c.password = Some(Secret::new(format!("{user}-pw")));
    let mut s = ClientSettings::new(testing::unique(user));
    s.subscriptions = subs
        .iter()
        .map(|f| (f.to_string(), QoS::AtLeastOnce))
        .collect();
    let (h, rx) = mqtt::connect(&c, s, None, CancellationToken::new()).unwrap();
    h.wait_connected(Duration::from_secs(10)).await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    (h, rx)
}

async fn responses(rx: &mut Receiver<Message>, n: usize, limit: Duration) -> Vec<(String, Value)> {
    let mut out = Vec::new();
    let end = tokio::time::Instant::now() + limit;
    while out.len() < n {
        match tokio::time::timeout_at(end, rx.recv()).await {
            Ok(Some(m)) => out.push((
                m.topic().unwrap_or("").to_owned(),
                serde_json::from_slice(m.payload()).unwrap_or(Value::Null),
            )),
            _ => break,
        }
    }
    out
}

fn http_get(port: u16, path: &str) -> String {
    use std::io::{Read, Write};
    let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
        return String::new();
    };
    let _ = write!(s, "GET {path} HTTP/1.0\r\nHost: x\r\n\r\n");
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out
}

fn metric(text: &str, line: &str) -> f64 {
    text.lines()
        .find(|l| l.starts_with(line))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
        .unwrap_or(0.0)
}

async fn pubj(h: &MqttHandle, topic: &str, body: impl Into<Bytes>) {
    h.publish(topic, body, QoS::AtLeastOnce, false)
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_land_and_responses_say_so() {
    let sim = ModbusSimulator::start("127.0.0.1:0".parse().unwrap(), None)
        .await
        .unwrap();
    let b = broker();
    let port = b.ports.tcp().port();
    let r = rig(Some(b), port, &device("plc", sim.addr.port(), ""), "").await;
    let (op, mut rx) = client(r.port, "op", MqttVersion::V311, &["$nexus/cmd/response/#"]).await;
    pubj(&op, "$nexus/cmd/plc/sp/set", "72.5").await;
    pubj(
        &op,
        "$nexus/cmd/plc/write",
        r#"{"tag_id":"f","value":-3.25,"request_id":"r-1"}"#,
    )
    .await;
    pubj(&op, "$nexus/cmd/plc/write", r#"{"writes":[{"tag_id":"n","value":4242},{"tag_id":"run","value":true}],"request_id":"r-2","confirm":true}"#).await;
    let got = responses(&mut rx, 4, Duration::from_secs(5)).await;
    assert_eq!(got.len(), 4, "{got:?}");
    for (topic, v) in &got {
        assert_eq!(v["success"], true, "{topic}: {v}");
        assert_eq!(v["device_id"], "plc");
        assert!(topic.ends_with(v["tag_id"].as_str().unwrap()), "{topic}");
        assert!(v["duration_ms"].as_f64().unwrap() >= 0.0);
    }
    let by_tag = |t: &str| {
        got.iter()
            .find(|(_, v)| v["tag_id"] == t)
            .unwrap()
            .1
            .clone()
    };
    assert_eq!(by_tag("sp")["value"], json!(72.5));
    assert_eq!(by_tag("f")["request_id"], "r-1");
    assert_eq!(by_tag("n")["read_back"], json!(4242));
    assert_eq!(by_tag("n")["old_value"], json!(0));
    assert_eq!(by_tag("run")["read_back"], json!(true));
    {
        let regs = sim.registers.lock().unwrap();
        assert_eq!(regs.holding[10], 725);
        assert_eq!(regs.get_f32(300), -3.25);
        assert_eq!(regs.holding[310], 4242);
        assert!(regs.coils[1]);
    }
    let m = http_get(r.http, "/metrics");
    assert_eq!(metric(&m, "nexus_commands_succeeded_total"), 4.0);
    r.token.cancel();
    r.task.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_validation_rule_and_malformed_command_is_answered() {
    let sim = ModbusSimulator::start("127.0.0.1:0".parse().unwrap(), None)
        .await
        .unwrap();
    let b = broker();
    let port = b.ports.tcp().port();
    let r = rig(
        Some(b),
        port,
        &device("plc", sim.addr.port(), ""),
        "  max_payload: 1KiB",
    )
    .await;
    let (op, mut rx) = client(r.port, "op", MqttVersion::V311, &["$nexus/cmd/response/#"]).await;
    let cases: Vec<(&str, String, &str, &str)> = vec![
        (
            "$nexus/cmd/nope/write",
            r#"{"tag_id":"sp","value":1}"#.into(),
            "$nexus/cmd/response/nope/sp",
            "unknown device nope",
        ),
        (
            "$nexus/cmd/plc/write",
            r#"{"tag_id":"zz","value":1}"#.into(),
            "$nexus/cmd/response/plc/zz",
            "device plc has no tag zz",
        ),
        (
            "$nexus/cmd/plc/ro/set",
            "1".into(),
            "$nexus/cmd/response/plc/ro",
            "is read-only",
        ),
        (
            "$nexus/cmd/plc/sp/set",
            r#""warm""#.into(),
            "$nexus/cmd/response/plc/sp",
            "takes a number",
        ),
        (
            "$nexus/cmd/plc/sp/set",
            "250".into(),
            "$nexus/cmd/response/plc/sp",
            "above max 100",
        ),
        (
            "$nexus/cmd/plc/n/set",
            "1.5".into(),
            "$nexus/cmd/response/plc/n",
            "takes a whole number",
        ),
        (
            "$nexus/cmd/plc/n/set",
            "70000".into(),
            "$nexus/cmd/response/plc/n",
            "does not fit uint16",
        ),
        (
            "$nexus/cmd/plc/write",
            "{bad json".into(),
            "$nexus/cmd/response/plc",
            "payload is not JSON",
        ),
        (
            "$nexus/cmd/plc/write",
            r#"{"tag_id":"sp","value":[1,2]}"#.into(),
            "$nexus/cmd/response/plc/sp",
            "must be a number, bool or string",
        ),
        (
            "$nexus/cmd/plc/sp/extra/set",
            "1".into(),
            "$nexus/cmd/response/plc",
            "expected $nexus/cmd/<device>/write",
        ),
        (
            "$nexus/cmd/plc/write",
            format!(r#"{{"tag_id":"sp","value":"{}"}}"#, "x".repeat(5000)),
            "$nexus/cmd/response/plc",
            "larger than the limit",
        ),
    ];
    // The embedded broker's ACL already keeps operators off malformed command topics; an
    // admin-level client shows the handler's own answer to them.
    let (admin, _) = client(r.port, "svc", MqttVersion::V311, &[]).await;
    for (topic, body, want_topic, want) in &cases {
        let publisher = if topic.contains("/extra/") {
            &admin
        } else {
            &op
        };
        pubj(publisher, topic, body.clone()).await;
        let got = responses(&mut rx, 1, Duration::from_secs(5)).await;
        let (t, v) = got
            .first()
            .unwrap_or_else(|| panic!("no response to {topic} {body:.80}"));
        assert_eq!(t, want_topic, "{topic}");
        assert_eq!(v["success"], false, "{topic}");
        assert!(
            v["error"].as_str().unwrap().contains(want),
            "{topic}: {}",
            v["error"]
        );
    }
    assert_eq!(
        sim.registers.lock().unwrap().holding[10],
        500,
        "nothing was written"
    );
    let m = http_get(r.http, "/metrics");
    // Every metric docs/commands.md names is served.
    testing::assert_documented_metrics_served("commands.md", &m);
    for reason in [
        "unknown_device",
        "unknown_tag",
        "not_writable",
        "wrong_type",
        "out_of_range",
        "bad_json",
        "bad_payload",
        "bad_topic",
        "too_large",
    ] {
        assert!(
            metric(
                &m,
                &format!("nexus_commands_rejected_total{{reason=\"{reason}\"}}")
            ) >= 1.0,
            "{reason} not counted"
        );
    }
    // Still serving after all that.
    pubj(&op, "$nexus/cmd/plc/sp/set", "10").await;
    let got = responses(&mut rx, 1, Duration::from_secs(5)).await;
    assert_eq!(got[0].1["success"], true);
    r.token.cancel();
    r.task.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ttl_duplicates_and_rate_limits() {
    let sim = ModbusSimulator::start("127.0.0.1:0".parse().unwrap(), None)
        .await
        .unwrap();
    let b = broker();
    let port = b.ports.tcp().port();
    let r = rig(
        Some(b),
        port,
        &device("plc", sim.addr.port(), ""),
        "  rate_per_device: 1\n  burst_per_device: 3",
    )
    .await;
    let (op, mut rx) = client(r.port, "op", MqttVersion::V311, &["$nexus/cmd/response/#"]).await;
    // TTL: sent 20 s ago.
    let old = nexus_common::now_ms() - 20_000;
    pubj(
        &op,
        "$nexus/cmd/plc/write",
        format!(r#"{{"tag_id":"n","value":1,"ts":{old}}}"#),
    )
    .await;
    let got = responses(&mut rx, 1, Duration::from_secs(5)).await;
    assert!(
        got[0].1["error"].as_str().unwrap().contains("expired"),
        "{:?}",
        got[0]
    );
    // A shorter ttl_ms of the command's own.
    let recent = nexus_common::now_ms() - 2_000;
    pubj(
        &op,
        "$nexus/cmd/plc/write",
        format!(r#"{{"tag_id":"n","value":1,"ts":{recent},"ttl_ms":500}}"#),
    )
    .await;
    let got = responses(&mut rx, 1, Duration::from_secs(5)).await;
    assert!(
        got[0].1["error"]
            .as_str()
            .unwrap()
            .contains("its ttl is 500 ms"),
        "{:?}",
        got[0]
    );
    assert_eq!(
        sim.registers.lock().unwrap().holding[310],
        0,
        "expired commands never ran"
    );

    // Duplicates: answered from the first result, executed once.
    let before = sim.requests();
    pubj(
        &op,
        "$nexus/cmd/plc/write",
        r#"{"tag_id":"n","value":7,"request_id":"dup-1"}"#,
    )
    .await;
    let first = responses(&mut rx, 1, Duration::from_secs(5)).await;
    sim.registers.lock().unwrap().holding[310] = 0;
    pubj(
        &op,
        "$nexus/cmd/plc/write",
        r#"{"tag_id":"n","value":7,"request_id":"dup-1"}"#,
    )
    .await;
    let second = responses(&mut rx, 1, Duration::from_secs(5)).await;
    assert_eq!(first[0].1, second[0].1, "the same answer");
    assert_eq!(
        sim.registers.lock().unwrap().holding[310],
        0,
        "not executed again"
    );
    assert_eq!(sim.requests() - before, 1, "one device write");

    // Rate limit: burst 3 per device (one used by dup-1), then 1/s.
    for i in 0..5 {
        pubj(
            &op,
            "$nexus/cmd/plc/write",
            format!(r#"{{"tag_id":"n","value":{i},"request_id":"rl-{i}"}}"#),
        )
        .await;
    }
    let got = responses(&mut rx, 5, Duration::from_secs(5)).await;
    let ok = got.iter().filter(|(_, v)| v["success"] == true).count();
    let limited = got
        .iter()
        .filter(|(_, v)| {
            v["error"]
                .as_str()
                .is_some_and(|e| e.contains("rate limit (per key) exceeded"))
        })
        .count();
    assert_eq!((ok, limited), (2, 3), "{got:?}");
    r.token.cancel();
    r.task.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queue_full_and_a_dead_device_answer_fast() {
    // A device that accepts connections and never answers keeps the one worker busy.
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let silent_port = silent.local_addr().unwrap().port();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = silent.accept().await {
            held.push(s);
        }
    });
    let dead_port = free_port(); // nothing listens: connection refused
    let b = broker();
    let port = b.ports.tcp().port();
    let devices = format!(
        "{}{}",
        device("slow", silent_port, ""),
        device("dead", dead_port, "")
    );
    let r = rig(
        Some(b),
        port,
        &devices,
        "  queue_size: 2\n  max_in_flight: 1\n  write_timeout: 1s",
    )
    .await;
    let (op, mut rx) = client(r.port, "op", MqttVersion::V311, &["$nexus/cmd/response/#"]).await;
    for i in 0..8 {
        pubj(
            &op,
            "$nexus/cmd/slow/write",
            format!(r#"{{"tag_id":"n","value":{i},"request_id":"q-{i}"}}"#),
        )
        .await;
    }
    let got = responses(&mut rx, 8, Duration::from_secs(10)).await;
    let full = got
        .iter()
        .filter(|(_, v)| {
            v["error"]
                .as_str()
                .is_some_and(|e| e.contains("queue full"))
        })
        .count();
    assert!(
        full >= 4,
        "most of 8 commands on a queue of 2 with 1 worker are refused at once: {got:?}"
    );
    assert_eq!(got.len(), 8, "every command is answered: {got:?}");

    // The dead device: errors at first, then the open breaker answers at once.
    let mut last = Duration::ZERO;
    let mut errors = Vec::new();
    for i in 0..8 {
        let t = Instant::now();
        pubj(
            &op,
            "$nexus/cmd/dead/write",
            format!(r#"{{"tag_id":"n","value":{i}}}"#),
        )
        .await;
        let got = responses(&mut rx, 1, Duration::from_secs(5)).await;
        last = t.elapsed();
        errors.push(got[0].1["error"].as_str().unwrap_or("").to_owned());
    }
    assert!(errors.iter().all(|e| !e.is_empty()));
    assert!(
        errors.last().unwrap().contains("circuit breaker open"),
        "{errors:?}"
    );
    assert!(
        last < Duration::from_millis(500),
        "an open breaker answers fast, took {last:?}"
    );
    r.token.cancel();
    r.task.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt5_response_topic_and_correlation_data() {
    let sim = ModbusSimulator::start("127.0.0.1:0".parse().unwrap(), None)
        .await
        .unwrap();
    let b = broker();
    let port = b.ports.tcp().port();
    let r = rig(Some(b), port, &device("plc", sim.addr.port(), ""), "").await;
    let reply = testing::unique("replies/op");
    let (op, mut rx) = client(r.port, "op", MqttVersion::V5, &[&reply]).await;
    let props = PublishProps {
        response_topic: Some(reply.clone()),
        correlation_data: Some(Bytes::from_static(b"corr-42")),
        ..PublishProps::default()
    };
    op.publish_with(
        "$nexus/cmd/plc/sp/set",
        "33.3",
        QoS::AtLeastOnce,
        false,
        Some(props),
    )
    .await
    .unwrap();
    let m = tokio::time::timeout(Duration::from_secs(5), rx.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(m.topic(), Some(reply.as_str()));
    assert_eq!(
        m.correlation_data().map(|b| b.as_ref()),
        Some(&b"corr-42"[..])
    );
    let v: Value = serde_json::from_slice(m.payload()).unwrap();
    assert_eq!(v["success"], true);
    r.token.cancel();
    r.task.await.unwrap().unwrap();
}

/// The hostile requester: an operator denied device `plc-a` by a `broker.acl` rule sends a
/// legal command for `plc-b` and names `plc-a`'s command topics as its Response Topic, hoping
/// the handler (whose service user the ACL does not bind) publishes its answer there and then
/// executes that answer as a command for `plc-a`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_response_topic_cannot_steer_the_handler_into_a_denied_device() {
    let sim_a = ModbusSimulator::start("127.0.0.1:0".parse().unwrap(), None)
        .await
        .unwrap();
    let sim_b = ModbusSimulator::start("127.0.0.1:0".parse().unwrap(), None)
        .await
        .unwrap();
    let acl = format!(
        "auth:\n  users:\n    - {{ username: op, password_hash: \"{}\", role: operator }}\nbroker:\n  acl:\n    - {{ permission: deny, action: publish, topic: \"$nexus/cmd/plc-a/#\", users: [op] }}\n    - {{ permission: deny, action: subscribe, topic: \"secret/#\", users: [op] }}\n",
        nexus_common::auth::hash_password("op-pw")
    );
    let b = testing::start_embedded_broker(BrokerConfig {
        acl: Config::from_str_with_env(&acl, None, &[])
            .unwrap()
            .broker
            .acl,
        ..BrokerConfig::default()
    });
    let port = b.ports.tcp().port();
    let devices = format!(
        "{}{}",
        device("plc-a", sim_a.addr.port(), ""),
        device("plc-b", sim_b.addr.port(), "")
    );
    // The handler reads the same users and rules (one configuration file in production).
    let r = rig(Some(b), port, &devices, &acl).await;
    let (op, mut rx) = client(r.port, "op", MqttVersion::V5, &["$nexus/cmd/response/#"]).await;
    let a_before = {
        let regs = sim_a.registers.lock().unwrap();
        (regs.holding[10], regs.get_f32(300))
    };
    // The ACL holds for the operator's own publishes to plc-a.
    pubj(&op, "$nexus/cmd/plc-a/sp/set", "11").await;
    let hostile = [
        (
            "$nexus/cmd/plc-b/sp/set",
            r#"{"value":42,"request_id":"h-1"}"#,
            "$nexus/cmd/plc-a/sp/set",
        ),
        (
            "$nexus/cmd/plc-b/write",
            r#"{"tag_id":"f","value":7.5,"request_id":"h-2"}"#,
            "$nexus/cmd/plc-a/write",
        ),
        (
            "$nexus/cmd/plc-b/write",
            r#"{"tag_id":"n","value":99,"request_id":"h-3"}"#,
            "$nexus/cmd/response/plc-a/n",
        ),
        // The handler publishes as the service user, which alone may write a device's
        // values: an answer there would be a forged value of plc-a's setpoint.
        (
            "$nexus/cmd/plc-b/write",
            r#"{"tag_id":"n","value":99,"request_id":"h-4"}"#,
            "acme/site/plc-a/sp",
        ),
        // A topic the operator may not subscribe to: the answer would be published where
        // the operator could not read it, and others could.
        (
            "$nexus/cmd/plc-b/write",
            r#"{"tag_id":"n","value":99,"request_id":"h-5"}"#,
            "secret/replies",
        ),
    ];
    let (_w, mut uns) = client(r.port, "svc", MqttVersion::V5, &["acme/#", "secret/#"]).await;
    for (topic, body, reply) in hostile {
        let props = PublishProps {
            response_topic: Some(reply.into()),
            correlation_data: Some(Bytes::from_static(b"c")),
            ..PublishProps::default()
        };
        op.publish_with(topic, body, QoS::AtLeastOnce, false, Some(props))
            .await
            .unwrap();
    }
    // Wait for everything that may come, not only for the three expected answers, so that an
    // answer executed as a command for plc-a would have time to land.
    let got = responses(&mut rx, 10, Duration::from_secs(3)).await;
    {
        let regs = sim_a.registers.lock().unwrap();
        assert_eq!(
            (regs.holding[10], regs.get_f32(300)),
            a_before,
            "plc-a, denied to the operator, is unchanged"
        );
    }
    {
        let regs = sim_b.registers.lock().unwrap();
        assert_eq!(regs.holding[10], 420, "plc-b was written");
        assert_eq!(regs.get_f32(300), 7.5);
        assert_eq!(regs.holding[310], 99);
    }
    let mut topics: Vec<&str> = got.iter().map(|(t, _)| t.as_str()).collect();
    topics.sort_unstable();
    assert_eq!(
        topics,
        [
            "$nexus/cmd/response/plc-b/f",
            "$nexus/cmd/response/plc-b/n",
            "$nexus/cmd/response/plc-b/n",
            "$nexus/cmd/response/plc-b/n",
            "$nexus/cmd/response/plc-b/sp"
        ],
        "the standard answers go out, and nothing ever answers for plc-a: {got:?}"
    );
    let forged: Vec<_> = std::iter::from_fn(|| uns.try_recv().ok())
        .filter(|m| matches!(m.topic(), Some("acme/site/plc-a/sp" | "secret/replies")))
        .collect();
    assert!(
        forged.is_empty(),
        "an answer landed where the operator may not write or read"
    );
    for (t, v) in &got {
        assert_eq!(v["success"], true, "{t}: {v}");
    }
    let m = http_get(r.http, "/metrics");
    assert_eq!(
        metric(&m, "nexus_commands_response_topic_refused_total"),
        5.0,
        "{m}"
    );
    assert_eq!(metric(&m, "nexus_commands_received_total"), 5.0, "{m}");
    r.token.cancel();
    r.task.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_operators_can_command_through_the_embedded_broker() {
    let sim = ModbusSimulator::start("127.0.0.1:0".parse().unwrap(), None)
        .await
        .unwrap();
    let b = broker();
    let port = b.ports.tcp().port();
    let r = rig(Some(b), port, &device("plc", sim.addr.port(), ""), "").await;
    let (view, _) = client(r.port, "view", MqttVersion::V311, &[]).await;
    let (_watch, mut rx) =
        client(r.port, "op", MqttVersion::V311, &["$nexus/cmd/response/#"]).await;
    pubj(&view, "$nexus/cmd/plc/sp/set", "99").await;
    assert!(
        responses(&mut rx, 1, Duration::from_secs(2))
            .await
            .is_empty(),
        "a viewer's command never reaches the handler"
    );
    assert_eq!(sim.registers.lock().unwrap().holding[10], 500);
    assert_eq!(
        metric(
            &http_get(r.http, "/metrics"),
            "nexus_commands_received_total"
        ),
        0.0
    );
    r.token.cancel();
    r.task.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_operators_can_command_through_mosquitto_with_its_acl_file() {
    let sim = ModbusSimulator::start("127.0.0.1:0".parse().unwrap(), None)
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    let passwd = dir.path().join("passwd");
    for (i, u) in ["svc", "op", "view"].iter().enumerate() {
        let mut c = std::process::Command::new("mosquitto_passwd");
        if i == 0 {
            c.arg("-c");
        }
        let st = c
            .arg("-b")
            .arg(&passwd)
            .arg(u)
            .arg(format!("{u}-pw"))
            .status()
            .unwrap();
        assert!(st.success());
    }
    let acl = dir.path().join("acl");
    std::fs::write(
        &acl,
        "user svc\ntopic readwrite #\ntopic readwrite $nexus/#\n\nuser op\ntopic read #\ntopic write $nexus/cmd/+/write\ntopic write $nexus/cmd/+/+/set\ntopic read $nexus/cmd/response/#\n\nuser view\ntopic read #\ntopic read $nexus/cmd/response/#\n",
    )
    .unwrap();
    for f in [&passwd, &acl] {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(f, std::fs::Permissions::from_mode(0o644)).unwrap();
    }
    let m = Mosquitto::start(&format!(
        "allow_anonymous false\npassword_file {}\nacl_file {}\n",
        passwd.display(),
        acl.display()
    ))
    .unwrap();
    let r = rig(None, m.port, &device("plc", sim.addr.port(), ""), "").await;
    let (view, _) = client(r.port, "view", MqttVersion::V311, &[]).await;
    let (op, mut rx) = client(r.port, "op", MqttVersion::V311, &["$nexus/cmd/response/#"]).await;
    pubj(&view, "$nexus/cmd/plc/sp/set", "99").await;
    assert!(
        responses(&mut rx, 1, Duration::from_secs(2))
            .await
            .is_empty(),
        "Mosquitto's ACL stops the viewer"
    );
    assert_eq!(sim.registers.lock().unwrap().holding[10], 500);
    pubj(&op, "$nexus/cmd/plc/sp/set", "12.5").await;
    let got = responses(&mut rx, 1, Duration::from_secs(5)).await;
    assert_eq!(got[0].1["success"], true, "{got:?}");
    assert_eq!(sim.registers.lock().unwrap().holding[10], 125);
    r.token.cancel();
    r.task.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_land_in_pymodbus() {
    let py_port = free_port();
    let _peer = testing::PythonPeer::start(
        "pymodbus_server.py",
        "pymodbus",
        &[py_port.to_string(), "tcp".into()],
        py_port,
    );
    let b = broker();
    let port = b.ports.tcp().port();
    let r = rig(Some(b), port, &device("py", py_port, ""), "").await;
    let (op, mut rx) = client(r.port, "op", MqttVersion::V5, &["$nexus/cmd/response/#"]).await;
    pubj(&op, "$nexus/cmd/py/write", r#"{"writes":[{"tag_id":"sp","value":42.5},{"tag_id":"f","value":6.5},{"tag_id":"run","value":true}],"confirm":true,"request_id":"py-1"}"#).await;
    let got = responses(&mut rx, 3, Duration::from_secs(5)).await;
    assert_eq!(got.len(), 3, "{got:?}");
    for (_, v) in &got {
        assert_eq!(v["success"], true, "{v}");
        assert_eq!(v["read_back"], v["value"], "{v}");
    }
    let sp = got.iter().find(|(_, v)| v["tag_id"] == "sp").unwrap();
    assert_eq!(sp.1["old_value"], json!(50.0), "pymodbus held 500 x 0.1");
    r.token.cancel();
    r.task.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_command_is_audited_in_postgres() {
    let pg = testing::PgServer::start();
    let url = pg.create_database(&testing::unique("audit")).await;
    let sim = ModbusSimulator::start("127.0.0.1:0".parse().unwrap(), None)
        .await
        .unwrap();
    let b = broker();
    let port = b.ports.tcp().port();
    // `rig` puts these lines under `commands:`; the database goes in `ingestion`.
    let r = rig(
        Some(b),
        port,
        &device("plc", sim.addr.port(), ""),
        &format!("database:\n  url: \"{url}\""),
    )
    .await;
    let (op, mut rx) = client(r.port, "op", MqttVersion::V311, &["$nexus/cmd/response/#"]).await;
    pubj(
        &op,
        "$nexus/cmd/plc/write",
        r#"{"tag_id":"sp","value":21.5,"request_id":"a-1","user":"ann","confirm":true}"#,
    )
    .await;
    pubj(&op, "$nexus/cmd/plc/ro/set", "1").await;
    // A Nexus service writing for a user (the control center): the audit names the user. An
    // operator naming someone else the same way is recorded as itself.
    let behalf = |who: &str| mqtt::PublishProps {
        user_properties: vec![(nexus_common::broker::ON_BEHALF_PROPERTY.into(), who.into())],
        ..Default::default()
    };
    let (svc, _svc_rx) = client(r.port, "svc", MqttVersion::V5, &[]).await;
    let (op5, _op5_rx) = client(r.port, "op", MqttVersion::V5, &[]).await;
    for (h, id) in [(&svc, "b-1"), (&op5, "b-2")] {
        let body = format!(r#"{{"tag_id":"n","value":7,"request_id":"{id}"}}"#);
        h.publish_with(
            "$nexus/cmd/plc/write",
            body,
            QoS::AtLeastOnce,
            false,
            Some(behalf("olga")),
        )
        .await
        .unwrap();
    }
    assert_eq!(responses(&mut rx, 4, Duration::from_secs(5)).await.len(), 4);
    let (db, _task) = nexus_common::pg::connect(&nexus_common::pg::Database::at(&url))
        .await
        .unwrap();
    let start = Instant::now();
    let rows = loop {
        let rows = db
            .query("SELECT device_id, tag_id, request_id, user_name, claimed_user, value::text, old_value::text, read_back::text, success, error FROM command_audit ORDER BY tag_id DESC", &[])
            .await
            .unwrap_or_default();
        if rows.len() >= 4 || start.elapsed() > Duration::from_secs(10) {
            break rows;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(rows.len(), 4);
    let by_request: std::collections::HashMap<Option<String>, Option<String>> = rows
        .iter()
        .map(|r| (r.get::<_, Option<String>>(2), r.get::<_, Option<String>>(3)))
        .collect();
    assert_eq!(by_request[&Some("b-1".into())].as_deref(), Some("olga"));
    assert_eq!(by_request[&Some("b-2".into())].as_deref(), Some("op"));
    let rows: Vec<_> = rows
        .into_iter()
        .filter(|r| r.get::<_, String>(1) != "n")
        .collect();
    let row = &rows[0];
    let texts: Vec<Option<String>> = (0..8).map(|i| row.get(i)).collect();
    // The payload claims ann; the broker authenticated op (an MQTT 3.1.1 client: the broker
    // stamps it all the same), and the audit keeps both, each in its own column.
    let want =
        ["plc", "sp", "a-1", "op", "ann", "21.5", "50.0", "21.5"].map(|s| Some(s.to_owned()));
    assert_eq!(texts, want);
    assert!(row.get::<_, bool>(8));
    let second_ok: bool = rows[1].get(8);
    let second_err: Option<String> = rows[1].get(9);
    assert_eq!(rows[1].get::<_, Option<String>>(3).as_deref(), Some("op"));
    assert!(!second_ok);
    assert!(second_err.unwrap().contains("read-only"));
    r.token.cancel();
    r.task.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn register_bits_are_mask_written_and_a_device_without_it_names_the_setting() {
    let sim = ModbusSimulator::start("127.0.0.1:0".parse().unwrap(), None)
        .await
        .unwrap();
    // An older PLC without Mask Write Register (function 22), configured twice: with the
    // default and with the read-modify-write it needs.
    let old = ModbusSimulator::start("127.0.0.1:0".parse().unwrap(), None)
        .await
        .unwrap();
    old.registers.lock().unwrap().refuse_mask_write = true;
    for s in [&sim, &old] {
        s.registers.lock().unwrap().holding[400] = 0b10_0001;
    }
    let bit_device = |id: &str, port: u16, extra: &str| {
        format!("  - id: {id}\n    protocol: modbus\n    uns_prefix: acme/site\n    connection: {{ host: 127.0.0.1, port: {port}, timeout: 300ms{extra} }}\n    tags:\n      - {{ id: b3, address: \"HR:400.3\", data_type: bool, access: readwrite }}\n")
    };
    let devices = format!(
        "{}{}{}",
        bit_device("plc", sim.addr.port(), ""),
        bit_device("old", old.addr.port(), ""),
        bit_device("old-rmw", old.addr.port(), ", bit_write: read_modify_write")
    );
    let b = broker();
    let port = b.ports.tcp().port();
    let r = rig(Some(b), port, &devices, "").await;
    let (op, mut rx) = client(r.port, "op", MqttVersion::V311, &["$nexus/cmd/response/#"]).await;
    pubj(
        &op,
        "$nexus/cmd/plc/write",
        r#"{"tag_id":"b3","value":true,"confirm":true}"#,
    )
    .await;
    pubj(&op, "$nexus/cmd/old/b3/set", "true").await;
    let got = responses(&mut rx, 2, Duration::from_secs(5)).await;
    pubj(&op, "$nexus/cmd/old-rmw/b3/set", "true").await;
    let got: Vec<(String, Value)> = got
        .into_iter()
        .chain(responses(&mut rx, 1, Duration::from_secs(5)).await)
        .collect();
    assert_eq!(got.len(), 3, "{got:?}");
    let by_device = |d: &str| {
        got.iter()
            .find(|(_, v)| v["device_id"] == d)
            .unwrap()
            .1
            .clone()
    };

    let plc = by_device("plc");
    assert_eq!(plc["success"], true, "{plc}");
    assert_eq!(plc["read_back"], true, "{plc}");
    assert_eq!(sim.registers.lock().unwrap().holding[400], 0b10_1001);
    assert_eq!(sim.function_count(22), 1);
    assert_eq!(
        sim.function_count(6),
        0,
        "the register is never written whole"
    );

    let refused = by_device("old");
    assert_eq!(refused["success"], false, "{refused}");
    let e = refused["error"].as_str().unwrap();
    assert!(
        e.contains("Mask Write Register") && e.contains("bit_write: read_modify_write"),
        "{e}"
    );
    let rmw = by_device("old-rmw");
    assert_eq!(rmw["success"], true, "{rmw}");
    assert_eq!(old.registers.lock().unwrap().holding[400], 0b10_1001);
    assert_eq!((old.function_count(22), old.function_count(6)), (1, 1));
    r.token.cancel();
    r.task.await.unwrap().unwrap();
}

/// Start the handler: `instance` names its MQTT client id (and so its persistent session),
/// `journal` is its request journal, `commands` more lines under `commands:`. Returns once it
/// is ready: its stop token, its task and its HTTP port.
async fn start_handler(
    mqtt_port: u16,
    instance: &str,
    devices: &str,
    journal: &std::path::Path,
    commands: &str,
) -> (
    CancellationToken,
    tokio::task::JoinHandle<anyhow::Result<()>>,
    u16,
) {
    let http = free_port();
    // The service account is a user of the handler too (it tells who may write for others),
    // unless the test brings its own users.
    let auth = if commands.contains("auth:") {
        String::new()
    } else {
        format!(
            "auth:\n  users:\n    - {{ username: svc, password_hash: \"{}\", role: service }}\n",
            nexus_common::auth::hash_password("svc-pw")
        )
    };
    let text = format!(
        "mqtt: {{ host: 127.0.0.1, port: {mqtt_port}, username: svc, password: svc-pw, reconnect_min: 50ms, reconnect_max: 500ms }}\n\
         {auth}telemetry: {{ instance: {instance} }}\ndevices:\n{devices}commands:\n  http_listen: 127.0.0.1:{http}\n  journal_dir: {}\n{commands}\n",
        journal.display()
    );
    let cfg = Config::from_str_with_env(&text, None, &[]).unwrap_or_else(|e| panic!("{e}\n{text}"));
    let token = CancellationToken::new();
    let task = tokio::spawn(nexus_command_handler::run(Arc::new(cfg), token.clone()));
    // Ready once subscribed.
    let start = Instant::now();
    while !http_get(http, "/readyz").contains("\"ready\":true") {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "handler not ready"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    (token, task, http)
}

/// Commands sent while the handler is stopped wait in its persistent session: after the
/// restart each is run, refused as expired, or answered from the journal, never run twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commands_sent_during_a_restart_are_answered_and_never_run_twice() {
    let sim = ModbusSimulator::start("127.0.0.1:0".parse().unwrap(), None)
        .await
        .unwrap();
    let b = broker();
    let port = b.ports.tcp().port();
    let journal = tempfile::tempdir().unwrap();
    let devices = device("plc", sim.addr.port(), "");
    let (op, mut rx) = client(port, "op", MqttVersion::V311, &["$nexus/cmd/response/#"]).await;

    let (token, task, _) = start_handler(port, "restart-test", &devices, journal.path(), "").await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    pubj(
        &op,
        "$nexus/cmd/plc/write",
        r#"{"tag_id":"n","value":11,"request_id":"r-1"}"#,
    )
    .await;
    let first = responses(&mut rx, 1, Duration::from_secs(5)).await;
    assert_eq!(first[0].1["success"], true, "{first:?}");
    assert_eq!(sim.registers.lock().unwrap().holding[310], 11);
    token.cancel();
    task.await.unwrap().unwrap();

    // While it is down: a new command, one already expired, a repeat of r-1 with another
    // value, and a repeat of a command the journal says was started and never answered (as
    // if the handler had been killed during its write).
    let now = nexus_common::now_ms();
    std::fs::OpenOptions::new()
        .append(true)
        .open(journal.path().join("requests.jsonl"))
        .and_then(|mut f| {
            use std::io::Write;
            writeln!(f, r#"{{"key":"plc\u0000r-9","at":{now}}}"#)
        })
        .unwrap();
    pubj(
        &op,
        "$nexus/cmd/plc/write",
        format!(r#"{{"tag_id":"n","value":22,"request_id":"r-2","ts":{now}}}"#),
    )
    .await;
    pubj(
        &op,
        "$nexus/cmd/plc/write",
        format!(
            r#"{{"tag_id":"f","value":3.5,"request_id":"r-3","ts":{}}}"#,
            now - 60_000
        ),
    )
    .await;
    pubj(
        &op,
        "$nexus/cmd/plc/write",
        r#"{"tag_id":"n","value":99,"request_id":"r-1"}"#,
    )
    .await;
    pubj(
        &op,
        "$nexus/cmd/plc/write",
        r#"{"tag_id":"n","value":77,"request_id":"r-9"}"#,
    )
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        responses(&mut rx, 1, Duration::from_millis(500))
            .await
            .is_empty(),
        "nobody answers while the handler is down"
    );

    let (token, task, http) =
        start_handler(port, "restart-test", &devices, journal.path(), "").await;
    let got = responses(&mut rx, 4, Duration::from_secs(10)).await;
    let by_id = |id: &str| {
        got.iter()
            .find(|(_, v)| v["request_id"] == id)
            .unwrap_or_else(|| panic!("no answer to {id}: {got:?}"))
            .1
            .clone()
    };
    assert_eq!(by_id("r-2")["success"], true, "{got:?}");
    let expired = by_id("r-3");
    assert!(
        expired["error"].as_str().unwrap().contains("expired"),
        "{expired}"
    );
    assert_eq!(
        by_id("r-1"),
        first[0].1,
        "the first answer, from the journal"
    );
    let unknown = by_id("r-9");
    assert_eq!(unknown["success"], false);
    assert!(
        unknown["error"]
            .as_str()
            .unwrap()
            .contains("outcome unknown"),
        "{unknown}"
    );
    {
        let regs = sim.registers.lock().unwrap();
        assert_eq!(
            regs.holding[310], 22,
            "r-2 ran, r-1 and r-9 did not run again"
        );
        assert_eq!(regs.get_f32(300), 0.0, "the expired command never ran");
    }
    let m = http_get(http, "/metrics");
    assert_eq!(
        metric(&m, "nexus_commands_rejected_total{reason=\"duplicate\"}"),
        1.0
    );
    assert_eq!(
        metric(&m, "nexus_commands_rejected_total{reason=\"interrupted\"}"),
        1.0
    );
    // Everything was acknowledged: nothing comes again after another restart.
    token.cancel();
    task.await.unwrap().unwrap();
    let (token, task, _) = start_handler(port, "restart-test", &devices, journal.path(), "").await;
    assert!(
        responses(&mut rx, 1, Duration::from_secs(1))
            .await
            .is_empty(),
        "no command was left unacknowledged"
    );
    token.cancel();
    task.await.unwrap().unwrap();
}
