//! The gateway against the tokio-modbus simulator through a real broker: every data type and
//! byte order, coalescing, writes, device exceptions, a dead device and its recovery.

#![allow(clippy::unwrap_used)]

mod support;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use nexus_common::breaker::BreakerConfig;
use nexus_common::config::{Config, OpcUaClientConfig, PoolConfig};
use nexus_common::testing::{self, free_port};
use nexus_common::Value;
use nexus_devices::simulator::modbus::ModbusSimulator;
use nexus_devices::Pools;
use nexus_devices::{Device, Reading};
use tokio_util::sync::CancellationToken;

fn device_yaml(id: &str, port: u16, prefix: &str, poll: &str, tags: &str) -> String {
    format!(
        "  - id: {id}\n    protocol: modbus\n    uns_prefix: {prefix}\n    poll_interval: {poll}\n    connection: {{ host: 127.0.0.1, port: {port}, unit_id: 1, timeout: 500ms }}\n    tags:\n{tags}"
    )
}

fn compile(yaml: &str) -> Arc<Device> {
    let cfg = Config::from_str_with_env(yaml, None, &[]).unwrap_or_else(|e| panic!("{e}"));
    Arc::new(Device::compile(cfg.devices[0].clone()).unwrap())
}

fn set(sim: &ModbusSimulator, addr: usize, words: &[u16]) {
    sim.registers.lock().unwrap().holding[addr..addr + words.len()].copy_from_slice(words);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publishes_every_type_and_byte_order_to_the_uns() {
    let sim = ModbusSimulator::start("127.0.0.1:0".parse().unwrap(), None)
        .await
        .unwrap();
    support::load_typed_values(&sim);
    let broker = support::broker();
    let port = broker.ports.tcp().port();
    let token = CancellationToken::new();
    let root = testing::unique("acme");
    let prefix = format!("{root}/site/area/line");
    let (_s, mut rx) = support::subscriber(
        port,
        &[&format!("{root}/#"), "$nexus/status/device/#"],
        &token,
    )
    .await;
    let dir = tempfile::tempdir().unwrap();
    let http = free_port();
    let cfg = support::config(
        port,
        http,
        dir.path(),
        &format!(
            "devices:\n{}",
            device_yaml(
                "plc-types",
                sim.addr.port(),
                &prefix,
                "200ms",
                support::TYPED_TAGS
            )
        ),
    );
    let (stop, task) = support::start_gateway(cfg);
    let got = support::collect(&mut rx, Duration::from_secs(2), Duration::from_secs(6)).await;
    let mut latest: HashMap<String, serde_json::Value> = HashMap::new();
    for (t, v, _) in &got {
        latest.insert(t.clone(), v.clone());
    }
    for (tag, want) in support::expected_typed() {
        let topic = format!("{prefix}/plc-types/{tag}");
        let v = latest.get(&topic).unwrap_or_else(|| {
            panic!(
                "nothing on {topic}: {:?}",
                latest.keys().collect::<Vec<_>>()
            )
        });
        assert_eq!(v["v"], want, "{tag}");
        assert_eq!(v["q"], "good", "{tag}");
        assert!(v["ts"].as_i64().unwrap() > 1_700_000_000_000, "{tag}");
    }
    // Unchanged values are not republished every poll (deadband 0 = on change; heartbeat 60s).
    let per_topic = got
        .iter()
        .filter(|(t, _, _)| t.ends_with("/plc-types/i16"))
        .count();
    assert_eq!(per_topic, 1, "an unchanged value is published once");
    let status = latest
        .get("$nexus/status/device/plc-types")
        .expect("device status");
    assert_eq!(status["state"], "online");
    assert_eq!(status["breaker"], "closed");
    // The device API shows the same.
    let tags = support::http_get(http, "/api/v1/devices/plc-types/tags");
    assert!(
        tags.contains("\"id\":\"i32-cdab\"") && tags.contains("-123456"),
        "{tags}"
    );
    let devices = support::http_get(http, "/api/v1/devices");
    assert!(devices.contains("\"state\":\"online\""), "{devices}");
    stop.cancel();
    task.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn coalescing_issues_the_planned_number_of_requests() {
    let sim = ModbusSimulator::start("127.0.0.1:0".parse().unwrap(), None)
        .await
        .unwrap();
    // 100 float32 tags back to back: 200 registers.
    let tags: String = (0..100)
        .map(|i| {
            format!(
                "      - {{ id: t{i}, address: \"HR:{}\", data_type: float32 }}\n",
                1000 + i * 2
            )
        })
        .collect();
    let pools = Pools::new(
        PoolConfig::default(),
        BreakerConfig::default(),
        OpcUaClientConfig::default(),
        &prometheus::Registry::new(),
    )
    .unwrap();
    for (limit, want) in [("", 2u64), ("max_registers_per_request: 50, ", 4)] {
        let yaml = format!(
            "devices:\n  - id: big\n    protocol: modbus\n    uns_prefix: a/b\n    connection: {{ {limit}host: 127.0.0.1, port: {} }}\n    tags:\n{tags}",
            sim.addr.port()
        );
        let device = compile(&yaml);
        let before = sim.requests();
        let readings = pools.read(&device, None).await.unwrap();
        assert_eq!(readings.len(), 100);
        assert!(readings
            .iter()
            .all(|(_, r)| matches!(r, Reading::Good { .. })));
        assert_eq!(sim.requests() - before, want, "{limit}");
    }
    // Gaps: two tags 5 registers apart are merged with the default gap (10), 50 apart not.
    let yaml = format!(
        "devices:\n  - id: gaps\n    protocol: modbus\n    uns_prefix: a/b\n    connection: {{ host: 127.0.0.1, port: {} }}\n    tags:\n      - {{ id: a, address: \"HR:0\", data_type: uint16 }}\n      - {{ id: b, address: \"HR:5\", data_type: uint16 }}\n      - {{ id: c, address: \"HR:55\", data_type: uint16 }}\n",
        sim.addr.port()
    );
    let before = sim.requests();
    pools.read(&compile(&yaml), None).await.unwrap();
    assert_eq!(sim.requests() - before, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_land_in_the_device() {
    let sim = ModbusSimulator::start("127.0.0.1:0".parse().unwrap(), None)
        .await
        .unwrap();
    let yaml = format!(
        "devices:\n{}",
        device_yaml(
            "w",
            sim.addr.port(),
            "a/b",
            "1s",
            r#"      - { id: sp, address: "HR:10", data_type: int16, scale: 0.1, access: readwrite }
      - { id: f, address: "HR:300", data_type: float32, byte_order: CDAB, access: readwrite }
      - { id: big, address: "HR:310", data_type: uint32, access: readwrite }
      - { id: name, address: "HR:320", data_type: string, length: 6, access: readwrite }
      - { id: flag, address: "HR:330.2", data_type: bool, access: readwrite }
      - { id: pump, address: "CO:1", data_type: bool, access: readwrite }
      - { id: ir, address: "IR:0", data_type: int16 }
"#
        )
    );
    let d = compile(&yaml);
    let pools = Pools::new(
        PoolConfig::default(),
        BreakerConfig::default(),
        OpcUaClientConfig::default(),
        &prometheus::Registry::new(),
    )
    .unwrap();
    set(&sim, 330, &[0b1_0001]);
    for (tag, value) in [
        (0, Value::Float(72.5)),
        (1, Value::Float(-1.5)),
        (2, Value::Int(70_000)),
        (3, Value::String("AB-9".into())),
        (4, Value::Bool(true)),
        (5, Value::Bool(true)),
    ] {
        pools
            .write(&d, tag, value.clone())
            .await
            .unwrap()
            .unwrap_or_else(|e| panic!("tag {tag}: {e}"));
    }
    {
        let r = sim.registers.lock().unwrap();
        assert_eq!(r.holding[10], 725, "72.5 / 0.1");
        assert_eq!(&r.holding[300..302], &[0x0000, 0xBFC0], "-1.5 word-swapped");
        assert_eq!(&r.holding[310..312], &[0x0001, 0x1170]);
        assert_eq!(&r.holding[320..323], &[0x4142, 0x2D39, 0]);
        assert_eq!(r.holding[330], 0b1_0101, "only bit 2 changed");
        assert!(r.coils[1]);
    }
    // Read back through the driver.
    let back = pools.read(&d, Some(vec![0, 1, 3])).await.unwrap();
    assert_eq!(
        back[0],
        (
            0,
            Reading::Good {
                value: Value::Float(72.5),
                source_ts_ms: None
            }
        )
    );
    assert_eq!(
        back[1],
        (
            1,
            Reading::Good {
                value: Value::Float(-1.5),
                source_ts_ms: None
            }
        )
    );
    assert_eq!(
        back[2],
        (
            3,
            Reading::Good {
                value: Value::String("AB-9".into()),
                source_ts_ms: None
            }
        )
    );
    // Refusals are device errors, not transport errors.
    let e = pools
        .write(&d, 6, Value::Int(1))
        .await
        .unwrap()
        .unwrap_err();
    assert!(e.to_string().contains("read-only"), "{e}");
    let e = pools
        .write(&d, 0, Value::Float(99999.0))
        .await
        .unwrap()
        .unwrap_err();
    assert!(e.to_string().contains("does not fit int16"), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_exception_marks_only_its_tags_bad() {
    let sim = ModbusSimulator::start("127.0.0.1:0".parse().unwrap(), None)
        .await
        .unwrap();
    set(&sim, 0, &[7]);
    let yaml = format!(
        "devices:\n{}",
        device_yaml(
            "ex",
            sim.addr.port(),
            "a/b",
            "1s",
            "      - { id: ok, address: \"HR:0\", data_type: uint16 }\n      - { id: missing, address: \"HR:60010\", data_type: uint16 }\n"
        )
    );
    let d = compile(&yaml);
    let pools = Pools::new(
        PoolConfig::default(),
        BreakerConfig::default(),
        OpcUaClientConfig::default(),
        &prometheus::Registry::new(),
    )
    .unwrap();
    for _ in 0..10 {
        let r = pools.read(&d, None).await.unwrap();
        assert_eq!(
            r[0],
            (
                0,
                Reading::Good {
                    value: Value::Int(7),
                    source_ts_ms: None
                }
            )
        );
        assert!(
            matches!(&r[1], (1, Reading::Bad { quality: nexus_common::Quality::BadConfigError, reason }) if reason.contains("IllegalDataAddress"))
        );
    }
    assert_eq!(
        pools.breaker_state(&d),
        nexus_common::breaker::BreakerState::Closed,
        "exceptions do not count against the breaker"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_device_goes_offline_others_keep_polling_and_it_recovers() {
    let sim_a = ModbusSimulator::start("127.0.0.1:0".parse().unwrap(), None)
        .await
        .unwrap();
    let sim_b = ModbusSimulator::start("127.0.0.1:0".parse().unwrap(), None)
        .await
        .unwrap();
    let port_a = sim_a.addr.port();
    let broker = support::broker();
    let mport = broker.ports.tcp().port();
    let token = CancellationToken::new();
    let root = testing::unique("fault");
    let (_s, mut rx) = support::subscriber(
        mport,
        &[&format!("{root}/#"), "$nexus/status/device/#"],
        &token,
    )
    .await;
    let dir = tempfile::tempdir().unwrap();
    let http = free_port();
    let tags = "      - { id: x, address: \"HR:0\", data_type: uint16 }\n";
    let mut cfg = support::config(
        mport,
        http,
        dir.path(),
        &format!(
            "gateway:\n  heartbeat: 0s\n  breaker: {{ window: 10, min_requests: 3, open_for: 1s, half_open_trials: 1 }}\ndevices:\n{}{}",
            device_yaml("dev-a", port_a, &root, "100ms", tags),
            device_yaml("dev-b", sim_b.addr.port(), &root, "100ms", tags)
        ),
    );
    cfg.gateway.heartbeat = Duration::ZERO;
    let (stop, task) = support::start_gateway(cfg);
    support::collect(&mut rx, Duration::from_millis(800), Duration::from_secs(3)).await;
    let polls_b = |text: &str| {
        support::metric(
            text,
            "nexus_gateway_polls_total{device=\"dev-b\",result=\"ok\"}",
        )
    };

    // Device A dies.
    drop(sim_a);
    let m0 = support::http_get(http, "/metrics");
    let got = support::collect(&mut rx, Duration::from_secs(3), Duration::from_secs(3)).await;
    let m1 = support::http_get(http, "/metrics");
    let a_status: Vec<&serde_json::Value> = got
        .iter()
        .filter(|(t, _, _)| t == "$nexus/status/device/dev-a")
        .map(|(_, v, _)| v)
        .collect();
    assert!(
        a_status.iter().any(|v| v["state"] == "offline"),
        "{a_status:?}"
    );
    assert!(
        a_status.iter().any(|v| v["breaker"] == "open"),
        "{a_status:?}"
    );
    let a_values: Vec<&serde_json::Value> = got
        .iter()
        .filter(|(t, _, _)| t.ends_with("/dev-a/x"))
        .map(|(_, v, _)| v)
        .collect();
    assert!(
        a_values
            .iter()
            .any(|v| v["q"] == "bad_comm_failure" || v["q"] == "bad_not_connected"),
        "{a_values:?}"
    );
    assert!(
        support::metric(&m1, "nexus_breaker_rejected_total") > 0.0,
        "an open breaker fails fast"
    );
    // Every metric docs/gateway.md names is served (the scale-out section's by a member:
    // orchestrator/tests/gateway_shard.rs).
    testing::assert_documented_metrics_served("gateway.md#Metrics (:4000/metrics)", &m1);
    // B kept its rate: ~10 polls/s over the 3 s.
    let b_rate = (polls_b(&m1) - polls_b(&m0)) / 3.0;
    assert!(
        b_rate >= 7.0,
        "dev-b polled {b_rate}/s while dev-a was down"
    );

    // A comes back on the same port and recovers by itself.
    let _sim_a2 = ModbusSimulator::start(format!("127.0.0.1:{port_a}").parse().unwrap(), None)
        .await
        .unwrap();
    let got = support::collect(&mut rx, Duration::from_secs(4), Duration::from_secs(6)).await;
    let last_a = got
        .iter()
        .rev()
        .find(|(t, _, _)| t == "$nexus/status/device/dev-a")
        .map(|(_, v, _)| v.clone());
    assert_eq!(
        last_a.as_ref().map(|v| v["state"].clone()),
        Some(serde_json::json!("online")),
        "{got:?}"
    );
    assert!(got
        .iter()
        .any(|(t, v, _)| t.ends_with("/dev-a/x") && v["q"] == "good"));
    stop.cancel();
    task.await.unwrap().unwrap();
}

/// A device with bit tags of HR 400 and a whole-word tag of it; `extra` goes in `connection`.
fn bit_device(id: &str, port: u16, extra: &str) -> Arc<Device> {
    compile(&format!(
        "devices:\n  - id: {id}\n    protocol: modbus\n    uns_prefix: a/b\n    connection: {{ host: 127.0.0.1, port: {port}, timeout: 500ms{extra} }}\n    tags:\n      - {{ id: b3, address: \"HR:400.3\", data_type: bool, access: readwrite }}\n      - {{ id: word, address: \"HR:400\", data_type: uint16 }}\n"
    ))
}

fn pools() -> Arc<Pools> {
    Pools::new(
        PoolConfig::default(),
        BreakerConfig::default(),
        OpcUaClientConfig::default(),
        &prometheus::Registry::new(),
    )
    .unwrap()
}

/// Function codes the simulator received: 03 read, 06 write register, 16 write registers, 22
/// mask write.
fn codes(sim: &ModbusSimulator) -> [u64; 4] {
    [3, 6, 16, 22].map(|fc| sim.function_count(fc))
}

/// The "PLC" sets bit 5 of HR 400 right after serving any read of holding registers.
fn plc_sets_bit_5_after_each_read(sim: &ModbusSimulator) {
    sim.registers.lock().unwrap().after_request = Some(Box::new(|fc, r| {
        if fc == 3 {
            r.holding[400] |= 1 << 5;
        }
    }));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bit_write_is_one_mask_write_and_keeps_bits_the_plc_changed() {
    let sim = ModbusSimulator::start("127.0.0.1:0".parse().unwrap(), None)
        .await
        .unwrap();
    set(&sim, 400, &[0b1]);
    plc_sets_bit_5_after_each_read(&sim);
    let d = bit_device("mask", sim.addr.port(), "");
    let pools = pools();
    // The gateway polls (the PLC sets bit 5 after the reply), then a command sets bit 3.
    pools.read(&d, None).await.unwrap();
    assert_eq!(sim.registers.lock().unwrap().holding[400], 0b10_0001);
    pools
        .write(&d, 0, Value::Bool(true))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        sim.registers.lock().unwrap().holding[400],
        0b10_1001,
        "bits 0 and 5 of the PLC kept, bit 3 set"
    );
    assert_eq!(
        codes(&sim),
        [1, 0, 0, 1],
        "the poll's read, then one Mask Write Register; the register was never written whole"
    );
    pools
        .write(&d, 0, Value::Bool(false))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(sim.registers.lock().unwrap().holding[400], 0b10_0001);
    assert_eq!(codes(&sim), [1, 0, 0, 2]);
    let back = pools.read(&d, None).await.unwrap();
    assert_eq!(
        back,
        vec![
            (
                0,
                Reading::Good {
                    value: Value::Bool(false),
                    source_ts_ms: None
                }
            ),
            (
                1,
                Reading::Good {
                    value: Value::Int(0b10_0001),
                    source_ts_ms: None
                }
            )
        ]
    );
    // A bit tag refuses what is not a bool before any request.
    let e = pools
        .write(&d, 0, Value::Int(1))
        .await
        .unwrap()
        .unwrap_err();
    assert!(e.to_string().contains("takes a bool"), "{e}");
    assert_eq!(codes(&sim), [2, 0, 0, 2]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_modify_write_works_where_configured_and_loses_what_the_plc_changes_in_between() {
    let sim = ModbusSimulator::start("127.0.0.1:0".parse().unwrap(), None)
        .await
        .unwrap();
    // A device without function 22: read_modify_write is its remedy.
    sim.registers.lock().unwrap().refuse_mask_write = true;
    set(&sim, 400, &[0b1]);
    let d = bit_device("rmw", sim.addr.port(), ", bit_write: read_modify_write");
    let pools = pools();
    pools
        .write(&d, 0, Value::Bool(true))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(sim.registers.lock().unwrap().holding[400], 0b1001);
    assert_eq!(codes(&sim), [1, 1, 0, 0], "read, then the whole register");
    pools
        .write(&d, 0, Value::Bool(false))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(sim.registers.lock().unwrap().holding[400], 0b1);

    // The documented race: the PLC sets bit 5 between Nexus's read and its write, and the
    // write puts back the word as it was read.
    plc_sets_bit_5_after_each_read(&sim);
    pools
        .write(&d, 0, Value::Bool(true))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        sim.registers.lock().unwrap().holding[400],
        0b1001,
        "bit 5, set by the PLC in between, is lost"
    );
    assert_eq!(codes(&sim), [3, 3, 0, 0]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_refusing_mask_write_is_a_device_error_naming_the_setting() {
    let sim = ModbusSimulator::start("127.0.0.1:0".parse().unwrap(), None)
        .await
        .unwrap();
    sim.registers.lock().unwrap().refuse_mask_write = true;
    set(&sim, 400, &[0b10_0001]);
    let d = bit_device("old-plc", sim.addr.port(), "");
    let pools = pools();
    for _ in 0..8 {
        let e = pools
            .write(&d, 0, Value::Bool(true))
            .await
            .expect("a device exception, not a transport error")
            .unwrap_err();
        let e = e.to_string();
        assert!(e.contains("HR:400.3"), "{e}");
        assert!(e.contains("Mask Write Register (function 22"), "{e}");
        assert!(e.contains("bit_write: read_modify_write"), "{e}");
    }
    assert_eq!(sim.registers.lock().unwrap().holding[400], 0b10_0001);
    assert_eq!(
        codes(&sim),
        [0, 0, 0, 8],
        "no fallback to a read and a write"
    );
    assert_eq!(
        pools.breaker_state(&d),
        nexus_common::breaker::BreakerState::Closed,
        "refusals do not count against the breaker"
    );
    // The session is still good.
    let r = pools.read(&d, Some(vec![1])).await.unwrap();
    assert_eq!(
        r[0].1,
        Reading::Good {
            value: Value::Int(0b10_0001),
            source_ts_ms: None
        }
    );
    // Another exception keeps its own message.
    sim.registers.lock().unwrap().refuse_mask_write = false;
    let far = compile(&format!(
        "devices:\n  - id: far\n    protocol: modbus\n    uns_prefix: a/b\n    connection: {{ host: 127.0.0.1, port: {} }}\n    tags:\n      - {{ id: b, address: \"HR:60010.1\", data_type: bool, access: readwrite }}\n",
        sim.addr.port()
    ));
    let e = pools
        .write(&far, 0, Value::Bool(true))
        .await
        .unwrap()
        .unwrap_err();
    assert!(e.to_string().contains("IllegalDataAddress"), "{e}");
}

/// A sharded gateway's poll may wait for its endpoint's session while other devices of the
/// endpoint are read, and its member's lease may run out meanwhile: `read_while` checks the
/// lease again once the session is free, and a read called off sends nothing and counts
/// nothing against the breaker.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_called_off_while_it_waited_for_the_session_sends_nothing() {
    use nexus_common::breaker::BreakerState;
    use nexus_devices::PoolError;
    use std::sync::atomic::{AtomicBool, Ordering};

    // The device on a runtime of its own: it is made slow below by blocking its thread.
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let sim = ModbusSimulator::start("127.0.0.1:0".parse().unwrap(), None)
                .await
                .unwrap();
            tx.send(sim).unwrap();
            std::future::pending::<()>().await
        })
    });
    let sim = rx.recv().unwrap();
    let port = sim.addr.port();
    let device = |id: &str, reg: u16| {
        compile(&format!(
            "devices:\n  - id: {id}\n    protocol: modbus\n    uns_prefix: a/b\n    connection: {{ host: 127.0.0.1, port: {port}, timeout: 2s }}\n    tags:\n      - {{ id: v, address: \"HR:{reg}\", data_type: uint16 }}\n"
        ))
    };
    let (a, b) = (device("a", 0), device("b", 1));
    assert_eq!(a.endpoint(), b.endpoint(), "one session for both");
    let pools = pools();
    pools.read(&b, None).await.unwrap();
    let before = sim.requests();
    for _ in 0..10 {
        let r = pools.read_while(&b, None, &|| false).await;
        assert!(matches!(r, Err(PoolError::CalledOff)), "{r:?}");
    }
    assert_eq!(sim.requests(), before, "a read called off sends nothing");
    assert_eq!(
        pools.breaker_state(&b),
        BreakerState::Closed,
        "and is no failure"
    );

    // a's read is slow in the device and holds the endpoint's session; b's read waits for it,
    // and its condition ends while it waits.
    sim.registers.lock().unwrap().after_request = Some(Box::new(|_, _| {
        std::thread::sleep(Duration::from_millis(300))
    }));
    let slow = {
        let (pools, a) = (pools.clone(), a.clone());
        tokio::spawn(async move { pools.read(&a, None).await })
    };
    tokio::time::sleep(Duration::from_millis(50)).await;
    let holds = Arc::new(AtomicBool::new(true));
    let waiting = {
        let (pools, b, holds) = (pools.clone(), b.clone(), holds.clone());
        tokio::spawn(async move {
            pools
                .read_while(&b, None, &|| holds.load(Ordering::SeqCst))
                .await
        })
    };
    tokio::time::sleep(Duration::from_millis(50)).await;
    holds.store(false, Ordering::SeqCst);
    assert!(slow.await.unwrap().is_ok());
    let r = waiting.await.unwrap();
    assert!(matches!(r, Err(PoolError::CalledOff)), "{r:?}");
    sim.registers.lock().unwrap().after_request = None;
    assert_eq!(
        sim.requests() - before,
        1,
        "only the slow read reached the device"
    );
    // With the condition holding, the read goes through.
    let r = pools.read_while(&b, None, &|| true).await.unwrap();
    assert!(matches!(r[0].1, Reading::Good { .. }), "{r:?}");
}
