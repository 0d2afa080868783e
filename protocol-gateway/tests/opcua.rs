//! The OPC UA driver against the async-opcua server (Nexus's simulator, in process): polling
//! in chunks of MaxNodesPerRead, writes converted to the node's type, subscriptions through the
//! running gateway (every change delivered, source timestamps, heartbeat), reconnect after a
//! server restart without a gateway restart, a Basic256Sha256 SignAndEncrypt endpoint with
//! username authentication and certificate trust, and browsing over HTTP.

#![allow(clippy::unwrap_used)]

mod support;

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use nexus_common::breaker::BreakerConfig;
use nexus_common::config::{Config, OpcUaClientConfig, PoolConfig};
use nexus_common::testing::{self, free_port};
use nexus_common::Value;
use nexus_devices::simulator::opcua::{OpcUaSimOptions, OpcUaSimulator};
use nexus_devices::Pools;
use nexus_devices::{Device, Reading};
use tokio_util::sync::CancellationToken;

async fn simulator(dir: &Path, port: u16, bulk: usize, max: usize) -> OpcUaSimulator {
    simulator_stepping(dir, port, bulk, max, 100).await
}

async fn simulator_stepping(
    dir: &Path,
    port: u16,
    bulk: usize,
    max: usize,
    step_ms: u64,
) -> OpcUaSimulator {
    OpcUaSimulator::start(OpcUaSimOptions {
        port,
        pki_dir: dir.join("server-pki"),
        user: Some(("operator".into(), "op-pw".into())),
        bulk,
        step: Duration::from_millis(step_ms),
        max_nodes_per_call: max,
        ..OpcUaSimOptions::default()
    })
    .await
    .unwrap()
}

fn pools(dir: &Path, trust: bool) -> Arc<Pools> {
    Pools::new(
        PoolConfig::default(),
        BreakerConfig::default(),
        OpcUaClientConfig {
            pki_dir: dir.join("client-pki"),
            trust_server_certs: trust,
            ..OpcUaClientConfig::default()
        },
        &prometheus::Registry::new(),
    )
    .unwrap()
}

fn device_yaml(id: &str, endpoint: &str, extra: &str, prefix: &str, tags: &str) -> String {
    format!(
        "  - id: {id}\n    protocol: opcua\n    uns_prefix: {prefix}\n    poll_interval: 200ms\n{extra}    connection: {{ endpoint: \"{endpoint}\", timeout: 2s }}\n    tags:\n{tags}"
    )
}

fn compile(yaml: &str) -> Arc<Device> {
    let cfg = Config::from_str_with_env(&format!("devices:\n{yaml}"), None, &[])
        .unwrap_or_else(|e| panic!("{e}\n{yaml}"));
    Arc::new(Device::compile(cfg.devices[0].clone()).unwrap())
}

const SIM_TAGS: &str = "      - { id: sine, node_id: \"ns=2;s=Sine\", data_type: float64 }
      - { id: ramp, node_id: \"ns=2;s=Ramp\", data_type: int32 }
      - { id: counter, node_id: \"nsu=urn:nexus:simulator;s=Counter\", data_type: uint32 }
      - { id: toggle, node_id: \"ns=2;s=Toggle\", data_type: bool }
      - { id: temp, node_id: \"ns=2;s=Temperature\", data_type: float32 }
      - { id: status, node_id: \"ns=2;s=Status\", data_type: string }
      - { id: setpoint, node_id: \"ns=2;s=Setpoint\", data_type: float64, access: readwrite }
      - { id: enable, node_id: \"ns=2;s=Enable\", data_type: bool, access: readwrite }
      - { id: mode, node_id: \"ns=2;s=Mode\", data_type: int16, access: readwrite }
      - { id: label, node_id: \"ns=2;s=Label\", data_type: string, access: readwrite }
      - { id: missing, node_id: \"ns=2;s=NoSuchNode\", data_type: float64 }
";

type Msg = (String, serde_json::Value, bool);

/// Messages until `done` holds for what arrived (or `limit` passes).
async fn collect_until(
    rx: &mut tokio::sync::mpsc::Receiver<nexus_common::mqtt::Message>,
    limit: Duration,
    done: impl Fn(&[Msg]) -> bool,
) -> Vec<Msg> {
    let mut out = Vec::new();
    let end = tokio::time::Instant::now() + limit;
    while !done(&out) {
        let left = end.saturating_duration_since(tokio::time::Instant::now());
        match tokio::time::timeout(left, rx.recv()).await {
            Ok(Some(m)) => out.push((
                m.topic().unwrap_or("").to_owned(),
                serde_json::from_slice(m.payload()).unwrap_or(serde_json::Value::Null),
                m.retain(),
            )),
            _ => break,
        }
    }
    out
}

fn by_id(d: &Device, r: Vec<(usize, Reading)>) -> HashMap<String, Reading> {
    r.into_iter()
        .map(|(i, r)| (d.cfg.tags[i].id.to_string(), r))
        .collect()
}

fn good(r: &HashMap<String, Reading>, id: &str) -> Value {
    match &r[id] {
        Reading::Good { value, .. } => value.clone(),
        other => panic!("{id}: {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn polls_every_type_and_writes_convert_to_the_node_type() {
    let dir = tempfile::tempdir().unwrap();
    let sim = simulator(dir.path(), 0, 0, 0).await;
    let d = compile(&device_yaml("ua", &sim.endpoint, "", "a/b", SIM_TAGS));
    let pools = pools(dir.path(), false);
    let r = by_id(&d, pools.read(&d, None).await.unwrap());
    assert!(matches!(good(&r, "sine"), Value::Float(_)));
    assert!(matches!(good(&r, "ramp"), Value::Int(_)));
    assert!(
        matches!(good(&r, "counter"), Value::Int(_)),
        "nsu= resolved"
    );
    assert!(matches!(good(&r, "toggle"), Value::Bool(_)));
    assert!(matches!(good(&r, "temp"), Value::Float(_)));
    assert_eq!(good(&r, "setpoint"), Value::Float(42.5));
    assert_eq!(good(&r, "mode"), Value::Int(1));
    assert_eq!(good(&r, "label"), Value::String("line-1".into()));
    match &r["sine"] {
        Reading::Good { source_ts_ms, .. } => {
            let ts = source_ts_ms.expect("source timestamp");
            assert!((ts - nexus_common::now_ms()).abs() < 60_000, "{ts}");
        }
        other => panic!("{other:?}"),
    }
    assert!(
        matches!(&r["missing"], Reading::Bad { quality: nexus_common::Quality::BadConfigError, reason } if reason.contains("BadNodeIdUnknown")),
        "{:?}",
        r["missing"]
    );

    let index = |id: &str| d.cfg.tags.iter().position(|t| t.id.as_str() == id).unwrap();
    for (id, v) in [
        ("setpoint", Value::Int(75)),
        ("enable", Value::Bool(true)),
        ("mode", Value::Float(3.0)),
        ("label", Value::String("line-2".into())),
    ] {
        pools
            .write(&d, index(id), v)
            .await
            .unwrap()
            .unwrap_or_else(|e| panic!("{id}: {e}"));
    }
    let back = by_id(
        &d,
        pools
            .read(
                &d,
                Some(vec![
                    index("setpoint"),
                    index("enable"),
                    index("mode"),
                    index("label"),
                ]),
            )
            .await
            .unwrap(),
    );
    assert_eq!(
        good(&back, "setpoint"),
        Value::Float(75.0),
        "an int written as the node's Double"
    );
    assert_eq!(good(&back, "enable"), Value::Bool(true));
    assert_eq!(
        good(&back, "mode"),
        Value::Int(3),
        "a float written as the node's Int16"
    );
    assert_eq!(good(&back, "label"), Value::String("line-2".into()));
    for (id, v, why) in [
        ("mode", Value::Int(70_000), "does not fit Int16"),
        ("enable", Value::String("yes".into()), "Boolean"),
        ("sine", Value::Float(1.0), "refused the write"),
    ] {
        let e = pools.write(&d, index(id), v).await.unwrap().unwrap_err();
        assert!(e.to_string().contains(why), "{id}: {e}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_are_chunked_to_max_nodes_per_read() {
    let dir = tempfile::tempdir().unwrap();
    // The server accepts at most 7 nodes per Read and 7 monitored items per call.
    let sim = simulator(dir.path(), 0, 40, 7).await;
    let tags: String = (0..40)
        .map(|i| {
            format!(
                "      - {{ id: t{i}, node_id: \"ns=2;s=Bulk.Tag{i:04}\", data_type: float64 }}\n"
            )
        })
        .collect();
    let pools = pools(dir.path(), false);
    for mode in ["poll", "subscribe"] {
        let d = compile(&device_yaml(
            &format!("bulk-{mode}"),
            &sim.endpoint,
            &format!("    mode: {mode}\n"),
            "a/b",
            &tags,
        ));
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        loop {
            let r = pools.read(&d, None).await.unwrap();
            let goods = r
                .iter()
                .filter(|(_, r)| matches!(r, Reading::Good { .. }))
                .count();
            if goods >= 40 {
                break;
            }
            assert!(tokio::time::Instant::now() < deadline, "{mode}: {r:?}");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscriptions_deliver_every_change_and_survive_a_server_restart() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    // Values change every 250 ms, the server samples every 100 ms (its minimum), so every
    // change is sampled even on a loaded machine; the gateway polls every 500 ms.
    let sim = simulator_stepping(dir.path(), port, 0, 0, 250).await;
    let endpoint = sim.endpoint.clone();
    let broker = support::broker();
    let mport = broker.ports.tcp().port();
    let token = CancellationToken::new();
    let root = testing::unique("ua");
    let (_s, mut rx) = support::subscriber(
        mport,
        &[&format!("{root}/#"), "$nexus/status/device/#"],
        &token,
    )
    .await;
    let http = free_port();
    let tags = "      - { id: counter, node_id: \"ns=2;s=Counter\", data_type: uint32 }
      - { id: setpoint, node_id: \"ns=2;s=Setpoint\", data_type: float64 }
      - { id: sine, node_id: \"ns=2;s=Sine\", data_type: float64, deadband: 5 }
";
    let mut cfg = support::config(
        mport,
        http,
        dir.path(),
        &format!(
            "gateway:\n  heartbeat: 1s\n  breaker: {{ window: 10, min_requests: 3, open_for: 1s, half_open_trials: 1 }}\ndevices:\n{}",
            device_yaml(
                "ua-sub",
                &endpoint,
                "    mode: subscribe\n",
                &root,
                tags
            )
            .replace("timeout: 2s", "timeout: 1s, publishing_interval: 100ms, sampling_interval: 100ms")
            .replace("poll_interval: 200ms", "poll_interval: 500ms")
        ),
    );
    cfg.gateway.opcua.pki_dir = dir.path().join("client-pki");
    let (stop, task) = support::start_gateway(cfg);
    // The first start creates the client certificate (seconds in a debug build).
    let is_counter = |t: &str| t.ends_with("/ua-sub/counter");
    let got = collect_until(&mut rx, Duration::from_secs(40), |got| {
        got.iter().filter(|(t, _, _)| is_counter(t)).count() >= 14
            && got
                .iter()
                .filter(|(t, _, _)| t.ends_with("/ua-sub/setpoint"))
                .count()
                >= 3
    })
    .await;
    let counter: Vec<(i64, Option<i64>)> = got
        .iter()
        .filter(|(t, _, _)| t.ends_with("/ua-sub/counter"))
        .map(|(_, v, _)| (v["v"].as_i64().unwrap(), v["src_ts"].as_i64()))
        .collect();
    // Two or more changes per poll: every one arrives, in order.
    assert!(
        counter.len() >= 12,
        "{counter:?} {:?}",
        got.iter()
            .map(|(t, v, _)| format!("{t} {v}"))
            .take(10)
            .collect::<Vec<_>>()
    );
    for w in counter.windows(2) {
        assert_eq!(w[1].0, w[0].0 + 1, "a change was lost: {counter:?}");
    }
    assert!(
        counter.iter().all(|(_, s)| s.is_some()),
        "src_ts on every value"
    );
    // The unchanging setpoint is republished by the heartbeat (1 s).
    let setpoints = got
        .iter()
        .filter(|(t, _, _)| t.ends_with("/ua-sub/setpoint"))
        .count();
    assert!(
        setpoints >= 3,
        "heartbeat republished the setpoint {setpoints} times"
    );
    // Sine moves by up to ~8 a step; the deadband of 5 holds back the smaller steps.
    let sines = got
        .iter()
        .filter(|(t, _, _)| t.ends_with("/ua-sub/sine"))
        .count();
    assert!(
        sines < counter.len(),
        "deadband: {sines} sine values vs {} counter",
        counter.len()
    );

    // The server restarts on the same port: offline, then back by itself.
    drop(sim);
    let offline = |got: &[Msg]| {
        got.iter()
            .any(|(t, v, _)| t == "$nexus/status/device/ua-sub" && v["state"] == "offline")
    };
    let got = collect_until(&mut rx, Duration::from_secs(20), offline).await;
    let status: Vec<&serde_json::Value> = got
        .iter()
        .filter(|(t, _, _)| t == "$nexus/status/device/ua-sub")
        .map(|(_, v, _)| v)
        .collect();
    assert!(status.iter().any(|v| v["state"] == "offline"), "{status:?}");
    let _sim2 = simulator_stepping(dir.path(), port, 0, 0, 250).await;
    let got = collect_until(&mut rx, Duration::from_secs(40), |got| {
        let online = got
            .iter()
            .rposition(|(t, _, _)| t == "$nexus/status/device/ua-sub")
            .is_some_and(|i| got[i].1["state"] == "online");
        online
            && got
                .iter()
                .filter(|(t, v, _)| is_counter(t) && v["q"] == "good")
                .count()
                >= 3
    })
    .await;
    let last = got
        .iter()
        .rev()
        .find(|(t, _, _)| t == "$nexus/status/device/ua-sub")
        .map(|(_, v, _)| v["state"].clone());
    assert_eq!(last, Some(serde_json::json!("online")), "{got:?}");
    let after: Vec<i64> = got
        .iter()
        .filter(|(t, v, _)| t.ends_with("/ua-sub/counter") && v["q"] == "good")
        .map(|(_, v, _)| v["v"].as_i64().unwrap())
        .collect();
    assert!(after.len() >= 3, "the subscription came back: {after:?}");

    // Browse over HTTP, streamed as JSON lines.
    let top = support::http_get(http, "/api/v1/devices/ua-sub/browse");
    assert!(
        top.lines()
            .any(|l| l.contains("\"display_name\":\"Simulator\"")),
        "{top}"
    );
    let sim_folder = support::http_get(
        http,
        "/api/v1/devices/ua-sub/browse?node=ns%3D2%3Bs%3DSimulator",
    );
    for name in ["Sine", "Setpoint", "Counter", "Label"] {
        assert!(
            sim_folder
                .lines()
                .any(|l| l.contains(&format!("\"display_name\":\"{name}\""))),
            "{name}: {sim_folder}"
        );
    }
    let bad = support::http_get(http, "/api/v1/devices/ua-sub/browse?node=garbage");
    assert!(bad.contains("not a node id"), "{bad}");
    stop.cancel();
    task.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_secured_endpoint_with_username_needs_a_trusted_server_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let sim = simulator(dir.path(), 0, 0, 0).await;
    let yaml = device_yaml("ua-sec", &sim.endpoint, "", "a/b", SIM_TAGS).replace(
        "timeout: 2s",
        "timeout: 2s, security_policy: Basic256Sha256, security_mode: SignAndEncrypt, auth: { username: operator, password: op-pw }",
    );
    let d = compile(&yaml);
    let pools = pools(dir.path(), false);
    // Unknown server certificate: refused, and saved in rejected/ for review.
    let e = pools.read(&d, None).await.unwrap_err().to_string();
    let rejected = dir.path().join("client-pki/rejected");
    let certs: Vec<_> = std::fs::read_dir(&rejected)
        .map(|r| r.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    assert_eq!(certs.len(), 1, "{e}; rejected/: {certs:?}");
    assert!(
        dir.path().join("client-pki/own/cert.der").exists(),
        "client certificate created at first start"
    );
    // Its private key, and the simulator's, are readable by their owner only.
    for key in [
        "client-pki/private/private.pem",
        "server-pki/private/private.pem",
    ] {
        use std::os::unix::fs::PermissionsExt;
        let meta = std::fs::metadata(dir.path().join(key)).unwrap();
        assert_eq!(meta.permissions().mode() & 0o777, 0o600, "{key}");
    }
    // The operator trusts it.
    let trusted = dir.path().join("client-pki/trusted");
    std::fs::create_dir_all(&trusted).unwrap();
    std::fs::rename(&certs[0], trusted.join(certs[0].file_name().unwrap())).unwrap();
    let fresh = Pools::new(
        PoolConfig::default(),
        BreakerConfig::default(),
        OpcUaClientConfig {
            pki_dir: dir.path().join("client-pki"),
            ..OpcUaClientConfig::default()
        },
        &prometheus::Registry::new(),
    )
    .unwrap();
    let r = by_id(&d, fresh.read(&d, None).await.unwrap());
    assert_eq!(good(&r, "setpoint"), Value::Float(42.5));
    // The other policies, and Auto (the most secure endpoint offered), each its own session.
    for (n, security) in [
        "security_policy: Aes128_Sha256_RsaOaep, security_mode: SignAndEncrypt",
        "security_policy: Aes256_Sha256_RsaPss, security_mode: Sign",
        "security_policy: Auto",
    ]
    .iter()
    .enumerate()
    {
        let other = compile(
            &yaml
                .replace(
                    "security_policy: Basic256Sha256, security_mode: SignAndEncrypt",
                    security,
                )
                .replace("ua-sec", &format!("ua-sec-{n}")),
        );
        let r = fresh
            .read(&other, None)
            .await
            .unwrap_or_else(|e| panic!("{security}: {e}"));
        assert_eq!(
            good(&by_id(&other, r), "setpoint"),
            Value::Float(42.5),
            "{security}"
        );
    }
    // A wrong password is refused with the server's reason.
    let wrong = compile(
        &yaml
            .replace("operator, password: op-pw", "intruder, password: nope")
            .replace("ua-sec", "ua-wrong"),
    );
    let e = fresh.read(&wrong, None).await;
    assert!(e.is_err(), "{e:?}");
}
