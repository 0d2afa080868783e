//! The gateway as a Sparkplug B edge node (`gateway.sparkplug`), polling a simulated PLC,
//! seen by a subscriber that decodes every message with Nexus's Sparkplug codec: NBIRTH with
//! `bdSeq` and `Node Control/Rebirth`, a DBIRTH with every tag (name, alias, datatype, unit,
//! value), DDATA by alias on change, `seq` without a gap across the node's messages, a rebirth
//! on request, hostile commands refused and counted, new births with a new `bdSeq` after the
//! broker restarts, and NDEATH with the births' `bdSeq` on a clean stop. Then pysparkplug as
//! the host application, a device that dies and returns, and the wait for a primary host.

#![allow(clippy::unwrap_used)]

mod support;

use std::collections::HashMap;
use std::time::Duration;

use nexus_common::codec::sparkplug::{
    self, MessageType, SpDataType, SpMetric, SpPayload, SparkplugTopic,
};
use nexus_common::mqtt::{self, ClientSettings, Message, QoS};
use nexus_common::testing::{self, free_port};
use nexus_common::Value;
use nexus_devices::simulator::modbus::ModbusSimulator;
use tokio::sync::mpsc::Receiver;
use tokio_util::sync::CancellationToken;

fn json(v: &Option<Value>) -> serde_json::Value {
    nexus_common::codec::json::value_to_json(v.as_ref())
}

/// Sparkplug messages (topic, payload) until `quiet` passes without one, or `limit`.
async fn collect(
    rx: &mut Receiver<Message>,
    quiet: Duration,
    limit: Duration,
) -> Vec<(SparkplugTopic, SpPayload)> {
    let mut out = Vec::new();
    let end = tokio::time::Instant::now() + limit;
    while tokio::time::Instant::now() < end {
        let wait = quiet.min(end.saturating_duration_since(tokio::time::Instant::now()));
        match collect_one(rx, wait).await {
            Some(m) => out.push(m),
            None => break,
        }
    }
    out
}

/// Nothing arrives for 800 ms; `why` says what a message would mean.
async fn assert_quiet(rx: &mut Receiver<Message>, why: &str) {
    let got = collect(rx, Duration::from_millis(800), Duration::from_millis(800)).await;
    assert!(got.is_empty(), "{why}: {got:?}");
}

/// Until a message of type `t` arrives (within 10 s); the messages up to it included.
async fn until(rx: &mut Receiver<Message>, t: MessageType) -> Vec<(SparkplugTopic, SpPayload)> {
    let mut out = Vec::new();
    let end = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let left = end.saturating_duration_since(tokio::time::Instant::now());
        let got = collect_one(rx, left).await;
        let Some(m) = got else {
            panic!("no {t:?} within 10 s: {out:?}");
        };
        let found = m.0.message_type == t;
        out.push(m);
        if found {
            return out;
        }
    }
}

async fn collect_one(
    rx: &mut Receiver<Message>,
    wait: Duration,
) -> Option<(SparkplugTopic, SpPayload)> {
    let m = tokio::time::timeout(wait, rx.recv()).await.ok()??;
    let topic = m.topic().unwrap_or("");
    let t = SparkplugTopic::parse(topic)
        .unwrap_or_else(|e| panic!("not a Sparkplug topic {topic}: {e}"));
    let p = sparkplug::decode(m.payload())
        .unwrap_or_else(|e| panic!("undecodable payload on {topic}: {e}"));
    Some((t, p))
}

fn metric<'a>(p: &'a SpPayload, name: &str) -> &'a SpMetric {
    p.metrics
        .iter()
        .find(|m| m.name.as_deref() == Some(name))
        .unwrap_or_else(|| panic!("no metric {name} in {p:?}"))
}

fn bd_seq(p: &SpPayload) -> Option<Value> {
    metric(p, "bdSeq").value.clone()
}

/// `seq` goes up by one (mod 256) from each message to the next, starting at each NBIRTH (0).
fn check_seq(msgs: &[(SparkplugTopic, SpPayload)]) {
    let mut last: Option<u64> = None;
    for (t, p) in msgs {
        // The node's own messages: not its death, nor commands sent to it.
        if matches!(
            t.message_type,
            MessageType::NDeath | MessageType::NCmd | MessageType::DCmd | MessageType::State
        ) {
            continue;
        }
        let seq = p.seq.unwrap_or_else(|| panic!("{t:?} without seq"));
        if t.message_type == MessageType::NBirth {
            assert_eq!(seq, 0, "NBIRTH has seq 0");
        } else if let Some(l) = last {
            assert_eq!(seq, (l + 1) % 256, "seq after {l} on {t:?}");
        }
        last = Some(seq);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gateway_is_a_sparkplug_edge_node() {
    let sim = ModbusSimulator::start("127.0.0.1:0".parse().unwrap(), None)
        .await
        .unwrap();
    support::load_typed_values(&sim);
    let broker = support::broker();
    let port = broker.ports.tcp().port();
    let token = CancellationToken::new();
    let (group, node) = (testing::unique("grp"), "edge-1");
    let root = testing::unique("acme");
    let (_s, mut rx) = support::subscriber(port, &[&format!("spBv1.0/{group}/#")], &token).await;
    let (_u, mut uns) = support::subscriber(port, &[&format!("{root}/#")], &token).await;
    let dir = tempfile::tempdir().unwrap();
    let tags = format!(
        "{}      - {{ id: temp, address: \"HR:250\", data_type: int16, scale: 0.1, unit: degC }}\n",
        support::TYPED_TAGS
    );
    let http = free_port();
    let cfg = support::config(
        port,
        http,
        dir.path(),
        &format!(
            "gateway:\n  sparkplug:\n    enabled: true\n    group_id: {group}\n    edge_node_id: {node}\n    uns: false\ndevices:\n  - id: plc-1\n    protocol: modbus\n    uns_prefix: {root}/site/area/line\n    poll_interval: 200ms\n    connection: {{ host: 127.0.0.1, port: {}, unit_id: 1, timeout: 500ms }}\n    tags:\n{tags}",
            sim.addr.port()
        ),
    );
    // After the broker restarts below, the gateway waits at least 1 s before it connects
    // again, so the test's new subscriber is there for its births.
    let mut cfg = cfg;
    cfg.mqtt.reconnect_min = Duration::from_secs(2);
    cfg.mqtt.reconnect_max = Duration::from_secs(2);
    sim.registers.lock().unwrap().holding[250] = 215;
    let (stop, task) = support::start_gateway(cfg);

    // Births: NBIRTH, then the device's DBIRTH with every tag.
    let mut seen = until(&mut rx, MessageType::DBirth).await;
    let (t, nbirth) = &seen[0];
    assert_eq!(
        (t.message_type, t.group.as_str(), t.edge_node.as_str()),
        (MessageType::NBirth, group.as_str(), node)
    );
    let first_bd = bd_seq(nbirth).expect("bdSeq has a value");
    let rebirth = metric(nbirth, "Node Control/Rebirth");
    assert_eq!(rebirth.datatype, Some(SpDataType::Boolean));
    assert_eq!(rebirth.value, Some(Value::Bool(false)));
    let (t, dbirth) = seen.last().unwrap().clone();
    assert_eq!(t.device.as_deref(), Some("plc-1"));
    let mut expected = support::expected_typed();
    expected.push(("temp", serde_json::json!(21.5)));
    assert_eq!(dbirth.metrics.len(), expected.len(), "{dbirth:?}");
    let mut aliases = HashMap::new();
    for (tag, want) in &expected {
        let m = metric(&dbirth, tag);
        assert_eq!(json(&m.value), *want, "{tag}");
        assert!(m.timestamp.unwrap() > 1_700_000_000_000, "{tag}");
        aliases.insert(m.alias.expect("an alias"), *tag);
    }
    assert_eq!(aliases.len(), expected.len(), "aliases unique");
    assert_eq!(metric(&dbirth, "temp").unit.as_deref(), Some("degC"));
    // Datatypes follow the values: integers are Int64 (UInt64 only beyond its range).
    assert_eq!(
        metric(&dbirth, "u64-dcba").datatype,
        Some(SpDataType::Int64)
    );
    assert_eq!(metric(&dbirth, "f64").datatype, Some(SpDataType::Double));
    assert_eq!(metric(&dbirth, "i16").datatype, Some(SpDataType::Int64));
    assert_eq!(metric(&dbirth, "text").datatype, Some(SpDataType::String));
    assert_eq!(metric(&dbirth, "coil").datatype, Some(SpDataType::Boolean));

    // The first data after the DBIRTH repeats the values; then a change is DDATA by alias.
    let more = until(&mut rx, MessageType::DData).await;
    seen.extend(more);
    sim.registers.lock().unwrap().holding[210] = 5;
    let i16_of = |p: &SpPayload| {
        p.metrics
            .iter()
            .find(|m| aliases.get(&m.alias.unwrap()) == Some(&"i16"))
            .map(|m| m.value.clone())
    };
    let ddata = loop {
        let more = until(&mut rx, MessageType::DData).await;
        let (_, ddata) = more.last().unwrap().clone();
        seen.extend(more);
        assert!(ddata.metrics.iter().all(|m| m.name.is_none()), "{ddata:?}");
        if i16_of(&ddata).is_some() {
            break ddata;
        }
    };
    assert_eq!(i16_of(&ddata), Some(Some(Value::Int(5))), "{ddata:?}");

    // A rebirth request: NBIRTH (seq 0, same bdSeq) and DBIRTH again.
    let mut c = testing::mqtt_config(port);
    c.username = Some("svc".into());
    c.password = Some(nexus_common::config::Secret::new("svc-pw"));
    c.persistent_session = false;
    let (host, _) = mqtt::connect(
        &c,
        ClientSettings::new(testing::unique("host")),
        None,
        token.clone(),
    )
    .unwrap();
    host.wait_connected(Duration::from_secs(10)).await.unwrap();
    let ask = sparkplug::encode(&SpPayload {
        timestamp: Some(1),
        seq: None,
        metrics: vec![SpMetric {
            name: Some("Node Control/Rebirth".into()),
            datatype: Some(SpDataType::Boolean),
            value: Some(Value::Bool(true)),
            ..Default::default()
        }],
    })
    .unwrap();
    host.publish(
        &format!("spBv1.0/{group}/NCMD/{node}"),
        ask,
        QoS::AtLeastOnce,
        false,
    )
    .await
    .unwrap();
    let more = until(&mut rx, MessageType::NBirth).await;
    let (_, again) = more.last().unwrap().clone();
    seen.extend(more);
    assert_eq!(
        bd_seq(&again).as_ref(),
        Some(&first_bd),
        "same connection, same bdSeq"
    );
    let more = until(&mut rx, MessageType::DBirth).await;
    seen.extend(more);

    // Hostile commands: garbage, an alias the node never sent, a node command it does not
    // know. Each is refused and counted, none written, and the node goes on.
    let commands = |result: &str| {
        support::metric(
            &support::http_get(http, "/metrics"),
            &format!("nexus_gateway_sparkplug_commands_total{{result=\"{result}\"}}"),
        )
    };
    assert_eq!(commands("rebirth"), 1.0);
    let unknown_alias = sparkplug::encode(&SpPayload {
        timestamp: Some(1),
        seq: None,
        metrics: vec![SpMetric {
            alias: Some(999),
            datatype: Some(SpDataType::Int64),
            value: Some(Value::Int(1)),
            ..Default::default()
        }],
    })
    .unwrap();
    let dcmd = format!("spBv1.0/{group}/DCMD/{node}/plc-1");
    for (topic, payload) in [
        (dcmd.clone(), b"\xff\x01garbage".to_vec()),
        (dcmd.clone(), unknown_alias),
        (format!("spBv1.0/{group}/NCMD/{node}"), b"\x0a\x00".to_vec()),
    ] {
        host.publish(&topic, payload, QoS::AtLeastOnce, false)
            .await
            .unwrap();
    }
    let end = tokio::time::Instant::now() + Duration::from_secs(10);
    while commands("refused") < 3.0 {
        assert!(
            tokio::time::Instant::now() < end,
            "refused: {}",
            commands("refused")
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(commands("forwarded"), 0.0, "nothing written");

    // The broker restarts: a new connection, new births with the next bdSeq.
    let broker_port = port;
    drop(broker);
    let _broker = support::broker_on(broker_port);
    let (_s2, mut rx2) = support::subscriber(port, &[&format!("spBv1.0/{group}/#")], &token).await;
    let after = until(&mut rx2, MessageType::DBirth).await;
    let (_, nb) = after
        .iter()
        .rev()
        .find(|(t, _)| t.message_type == MessageType::NBirth)
        .expect("an NBIRTH after the restart")
        .clone();
    let next = match (&first_bd, bd_seq(&nb)) {
        (Value::Int(a), Some(Value::Int(b))) => (*a, b),
        other => panic!("bdSeq values {other:?}"),
    };
    assert!(
        next.1 > next.0,
        "a new bdSeq for the new connection: {next:?}"
    );
    check_seq(&after);

    // A clean stop: NDEATH with the births' bdSeq.
    stop.cancel();
    task.await.unwrap().unwrap();
    let last = collect(&mut rx2, Duration::from_secs(2), Duration::from_secs(5)).await;
    let (_, death) = last
        .iter()
        .find(|(t, _)| t.message_type == MessageType::NDeath)
        .unwrap_or_else(|| panic!("no NDEATH on a clean stop: {last:?}"))
        .clone();
    assert_eq!(bd_seq(&death), bd_seq(&nb));

    check_seq(&seen);
    // UNS output off: nothing on the UNS topics.
    let on_uns =
        support::collect(&mut uns, Duration::from_millis(200), Duration::from_secs(1)).await;
    assert!(on_uns.is_empty(), "UNS output is off: {on_uns:?}");
}

/// The Python host of `tests/peers/sparkplug_host.py` (pysparkplug): its JSON lines.
struct Host {
    child: tokio::process::Child,
    lines: tokio::io::Lines<tokio::io::BufReader<tokio::process::ChildStdout>>,
    stdin: tokio::process::ChildStdin,
}

impl Host {
    async fn start(port: u16, group: &str, node: &str) -> Host {
        use tokio::io::AsyncBufReadExt;
        let py = testing::test_python();
        let ok = std::process::Command::new(&py)
            .args(["-c", "import pysparkplug"])
            .status()
            .is_ok_and(|s| s.success());
        assert!(
            ok,
            "pysparkplug is not installed for {py}: run scripts/test.sh"
        );
        let script = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../tests/peers/sparkplug_host.py"
        );
        let mut child = tokio::process::Command::new(py)
            .arg(script)
            .args([
                "127.0.0.1",
                &port.to_string(),
                testing::OPERATOR_USER.0,
                testing::OPERATOR_USER.1,
                group,
                node,
            ])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let lines = tokio::io::BufReader::new(child.stdout.take().unwrap()).lines();
        let stdin = child.stdin.take().unwrap();
        let mut h = Host {
            child,
            lines,
            stdin,
        };
        let first = h.next().await;
        assert_eq!(first["ready"], true, "{first}");
        h
    }

    async fn next(&mut self) -> serde_json::Value {
        let line = tokio::time::timeout(Duration::from_secs(15), self.lines.next_line())
            .await
            .expect("the host printed nothing for 15 s")
            .unwrap()
            .expect("the host exited");
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line}"))
    }

    /// Messages until one of type `t` (included).
    async fn until(&mut self, t: &str) -> Vec<serde_json::Value> {
        let mut out = Vec::new();
        loop {
            let m = self.next().await;
            let found = m["type"] == t;
            out.push(m);
            if found {
                return out;
            }
        }
    }

    async fn send(&mut self, cmd: &str) {
        use tokio::io::AsyncWriteExt;
        self.stdin
            .write_all(format!("{cmd}\n").as_bytes())
            .await
            .unwrap();
        self.stdin.flush().await.unwrap();
    }
}

/// Interoperability: pysparkplug, an independent Sparkplug B implementation, as the host
/// application (logged in as an operator) of a gateway that polls a simulated PLC, with the
/// command handler beside it as in `nexus gateway`. It decodes the births (every tag's value
/// as in the PLC), resolves DDATA aliases through them to the right tag and value, its rebirth
/// request gets new births, and its DCMD (by alias) lands in the PLC and comes back as DDATA.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pysparkplug_as_host_application_decodes_births_and_data_gets_a_rebirth_and_writes() {
    let sim = ModbusSimulator::start("127.0.0.1:0".parse().unwrap(), None)
        .await
        .unwrap();
    support::load_typed_values(&sim);
    let broker = support::broker();
    let port = broker.ports.tcp().port();
    let (group, node) = (testing::unique("grp"), "edge-py");
    let mut host = Host::start(port, &group, node).await;
    let dir = tempfile::tempdir().unwrap();
    let cfg = support::config(
        port,
        free_port(),
        dir.path(),
        &format!(
            "gateway:\n  sparkplug:\n    enabled: true\n    group_id: {group}\n    edge_node_id: {node}\ndevices:\n  - id: plc-1\n    protocol: modbus\n    uns_prefix: acme/site/area/line\n    poll_interval: 200ms\n    connection: {{ host: 127.0.0.1, port: {}, unit_id: 1, timeout: 500ms }}\n    tags:\n{}      - {{ id: setpoint, address: \"HR:260\", data_type: int16, access: readwrite, min: 0, max: 100 }}\n",
            sim.addr.port(),
            support::TYPED_TAGS
        ),
    );
    let mut cfg = cfg;
    cfg.commands.http_listen = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let commands = CancellationToken::new();
    let handler = tokio::spawn(nexus_command_handler::run(
        std::sync::Arc::new(cfg.clone()),
        commands.clone(),
    ));
    let (stop, task) = support::start_gateway(cfg);

    let births = host.until("DBIRTH").await;
    assert!(
        births.iter().any(|m| m["type"] == "NBIRTH"),
        "NBIRTH before DBIRTH: {births:?}"
    );
    let dbirth = births.last().unwrap();
    assert_eq!(dbirth["device"], "plc-1");
    let by_name: HashMap<String, &serde_json::Value> = dbirth["metrics"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| (m["name"].as_str().unwrap().to_owned(), m))
        .collect();
    for (tag, want) in support::expected_typed() {
        let m = by_name
            .get(tag)
            .unwrap_or_else(|| panic!("{tag} not in the DBIRTH pysparkplug decoded: {dbirth}"));
        match want.as_f64() {
            // Floats as pysparkplug decodes them (a double; float32 tags travel as doubles).
            Some(w) if want.is_f64() => {
                let got = m["value"].as_f64().unwrap();
                assert!((got - w).abs() < 1e-9, "{tag}: {got} != {w}");
            }
            _ => assert_eq!(m["value"], want, "{tag}"),
        }
    }

    // A change in the PLC: DDATA, which pysparkplug resolves by alias to `i16`.
    sim.registers.lock().unwrap().holding[210] = 7;
    let ddata = loop {
        let m = host.until("DDATA").await.pop().unwrap();
        let hit = m["metrics"]
            .as_array()
            .unwrap()
            .iter()
            .any(|x| x["name"] == "i16" && x["value"] == 7);
        if hit {
            break m;
        }
    };
    assert_eq!(ddata["device"], "plc-1");

    // The host asks for a rebirth: NBIRTH (seq 0) and the DBIRTH with the new value.
    host.send("rebirth").await;
    let again = host.until("NBIRTH").await;
    assert_eq!(again.last().unwrap()["seq"], 0);
    let db = host.until("DBIRTH").await.pop().unwrap();
    let i16 = db["metrics"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["name"] == "i16")
        .cloned();
    assert_eq!(i16.map(|m| m["value"].clone()), Some(serde_json::json!(7)));

    // The host writes the setpoint by alias: it lands in the PLC, and comes back as DDATA.
    // Out of the tag's range (min 0, max 100), the command handler refuses it.
    host.send("dcmd plc-1 setpoint 142").await;
    host.send("dcmd plc-1 setpoint 42").await;
    let end = tokio::time::Instant::now() + Duration::from_secs(10);
    while sim.registers.lock().unwrap().holding[260] != 42 {
        assert!(
            tokio::time::Instant::now() < end,
            "the DCMD did not reach the PLC within 10 s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    loop {
        let m = host.until("DDATA").await.pop().unwrap();
        let v = m["metrics"]
            .as_array()
            .unwrap()
            .iter()
            .find(|x| x["name"] == "setpoint")
            .map(|x| x["value"].clone());
        assert_ne!(
            v,
            Some(serde_json::json!(142)),
            "a refused write never reached the PLC"
        );
        if v == Some(serde_json::json!(42)) {
            break;
        }
    }

    host.send("quit").await;
    let _ = tokio::time::timeout(Duration::from_secs(5), host.child.wait()).await;
    stop.cancel();
    task.await.unwrap().unwrap();
    commands.cancel();
    handler.await.unwrap().unwrap();
}

/// A gateway as Sparkplug node `edge` of a new group, polling `plc-1` (one int16 tag `t` at
/// HR:1 of a simulator that holds `first`, every 100 ms), with `sparkplug` and `gateway` YAML
/// added to its settings; and a subscriber to the group.
struct OneTagNode {
    sim: Option<ModbusSimulator>,
    sim_port: u16,
    _broker: nexus_common::broker::EmbeddedBroker,
    port: u16,
    token: CancellationToken,
    _sub: nexus_common::mqtt::MqttHandle,
    rx: Receiver<Message>,
    _dir: tempfile::TempDir,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl OneTagNode {
    async fn start(first: u16, sparkplug: &str, gateway: &str) -> OneTagNode {
        let sim = ModbusSimulator::start("127.0.0.1:0".parse().unwrap(), None)
            .await
            .unwrap();
        let sim_port = sim.addr.port();
        sim.registers.lock().unwrap().holding[1] = first;
        let broker = support::broker();
        let port = broker.ports.tcp().port();
        let token = CancellationToken::new();
        let group = testing::unique("grp");
        let (sub, rx) = support::subscriber(port, &[&format!("spBv1.0/{group}/#")], &token).await;
        let dir = tempfile::tempdir().unwrap();
        let cfg = support::config(
            port,
            free_port(),
            dir.path(),
            &format!(
                "gateway:\n  sparkplug:\n    enabled: true\n    group_id: {group}\n    edge_node_id: edge\n    uns: false\n{sparkplug}{gateway}devices:\n  - id: plc-1\n    protocol: modbus\n    uns_prefix: acme/a/b/c\n    poll_interval: 100ms\n    connection: {{ host: 127.0.0.1, port: {sim_port}, unit_id: 1, timeout: 300ms }}\n    tags:\n      - {{ id: t, address: \"HR:1\", data_type: int16 }}\n"
            ),
        );
        let (stop, task) = support::start_gateway(cfg);
        OneTagNode {
            sim: Some(sim),
            sim_port,
            _broker: broker,
            port,
            token,
            _sub: sub,
            rx,
            _dir: dir,
            stop,
            task,
        }
    }

    fn set(&self, v: u16) {
        if let Some(sim) = &self.sim {
            sim.registers.lock().unwrap().holding[1] = v;
        }
    }

    async fn stop(self) {
        self.stop.cancel();
        self.task.await.unwrap().unwrap();
    }
}

/// A device that cannot be read: DDEATH (once), and when it answers again its DBIRTH with
/// the current values, then DDATA; the node and its other messages keep their `seq`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_that_cannot_be_read_dies_and_is_born_again() {
    let mut n = OneTagNode::start(
        11,
        "",
        "  breaker: { window: 4, min_requests: 2, open_for: 500ms }\n",
    )
    .await;
    let rx = &mut n.rx;
    let mut seen = until(rx, MessageType::DBirth).await;
    assert_eq!(
        metric(&seen.last().unwrap().1, "t").value,
        Some(Value::Int(11))
    );

    n.sim.take().unwrap().stop();
    let more = until(rx, MessageType::DDeath).await;
    assert_eq!(more.last().unwrap().0.device.as_deref(), Some("plc-1"));
    seen.extend(more);
    // Nothing more for the device while it stays unreachable.
    let quiet = collect(rx, Duration::from_secs(1), Duration::from_secs(2)).await;
    assert!(
        quiet.iter().all(|(t, _)| t.device.is_none()),
        "messages for a dead device: {quiet:?}"
    );
    seen.extend(quiet);

    let sim = ModbusSimulator::start(format!("127.0.0.1:{}", n.sim_port).parse().unwrap(), None)
        .await
        .unwrap();
    sim.registers.lock().unwrap().holding[1] = 12;
    let rx = &mut n.rx;
    let more = until(rx, MessageType::DBirth).await;
    let (_, db) = more.last().unwrap().clone();
    seen.extend(more);
    assert_eq!(metric(&db, "t").value, Some(Value::Int(12)));
    seen.extend(until(rx, MessageType::DData).await);
    check_seq(&seen);
    drop(sim);
    n.stop().await;
}

/// With `primary_host_id` the node publishes only while the primary host's STATE says it is
/// online: before that and while it is offline nothing goes out (values wait in the
/// store-and-forward buffer), then births and the kept values as historical DDATA. An offline
/// STATE brings NDEATH; a STATE older than the last one is ignored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_waits_for_its_primary_host_and_sends_what_it_kept_as_historical() {
    let mut n = OneTagNode::start(1, "    primary_host_id: scada\n", "").await;
    let (port, token) = (n.port, n.token.clone());
    let mut c = testing::mqtt_config(port);
    c.username = Some(testing::OPERATOR_USER.0.into());
    c.password = Some(nexus_common::config::Secret::new(testing::OPERATOR_USER.1));
    c.persistent_session = false;
    let (host, _) = mqtt::connect(
        &c,
        ClientSettings::new(testing::unique("scada")),
        None,
        token.clone(),
    )
    .unwrap();
    host.wait_connected(Duration::from_secs(10)).await.unwrap();
    let state = |online: bool, ts: i64| {
        let host = host.clone();
        async move {
            let p = serde_json::json!({"online": online, "timestamp": ts}).to_string();
            host.publish(
                "spBv1.0/STATE/scada",
                p.into_bytes(),
                QoS::AtLeastOnce,
                true,
            )
            .await
            .unwrap();
        }
    };

    // No host yet: nothing, while the value changes.
    tokio::time::sleep(Duration::from_millis(400)).await;
    n.set(2);
    tokio::time::sleep(Duration::from_millis(400)).await;
    n.set(3);
    assert_quiet(&mut n.rx, "published before the host was online").await;

    // Online: births, then what was kept, marked historical.
    let t0 = nexus_common::now_ms();
    state(true, t0).await;
    let got = until(&mut n.rx, MessageType::DBirth).await;
    assert_eq!(got[0].0.message_type, MessageType::NBirth, "{got:?}");
    let mut kept = Vec::new();
    let end = tokio::time::Instant::now() + Duration::from_secs(10);
    while !(kept.contains(&1) && kept.contains(&2)) {
        assert!(
            tokio::time::Instant::now() < end,
            "kept values not replayed: {kept:?}"
        );
        let (t, p) = until(&mut n.rx, MessageType::DData).await.pop().unwrap();
        assert_eq!(t.device.as_deref(), Some("plc-1"));
        for m in p.metrics.iter().filter(|m| m.historical) {
            if let Some(Value::Int(v)) = m.value {
                kept.push(v);
            }
        }
    }

    // A stale offline STATE (older than the online one) changes nothing.
    state(false, t0 - 1000).await;
    n.set(4);
    let m = until(&mut n.rx, MessageType::DData).await;
    assert!(
        m.iter().all(|(t, _)| t.message_type != MessageType::NDeath),
        "{m:?}"
    );

    // Offline: NDEATH, then silence; the change meanwhile comes as historical after the return.
    state(false, t0 + 1).await;
    until(&mut n.rx, MessageType::NDeath).await;
    n.set(9);
    assert_quiet(&mut n.rx, "published while the host was offline").await;
    state(true, t0 + 2).await;
    until(&mut n.rx, MessageType::NBirth).await;
    let end = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        assert!(tokio::time::Instant::now() < end, "9 not replayed");
        let (_, p) = until(&mut n.rx, MessageType::DData).await.pop().unwrap();
        if p.metrics
            .iter()
            .any(|m| m.historical && m.value == Some(Value::Int(9)))
        {
            break;
        }
    }
    n.stop().await;
}
