//! The S7 driver against an independent S7 server (python-snap7's, from PyPI; scripts/test.sh
//! installs it into target/test-venv): every address type and data type read and written,
//! multi-variable reads in fewer requests than tags (counted on the wire by a relay), a range
//! longer than the PDU split over requests, item errors that mark only their own tag, and the
//! same fault behaviour as Modbus through the running gateway (offline, breaker, recovery).

#![allow(clippy::unwrap_used)]

mod support;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use nexus_common::breaker::BreakerConfig;
use nexus_common::config::{Config, OpcUaClientConfig, PoolConfig};
use nexus_common::testing::{self, free_port};
use nexus_common::{Quality, Value};
use nexus_devices::Pools;
use nexus_devices::{Device, Reading};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

fn start_snap7() -> (testing::PythonPeer, u16) {
    let port = free_port();
    (start_snap7_on(port), port)
}

fn start_snap7_on(port: u16) -> testing::PythonPeer {
    testing::PythonPeer::start("snap7_server.py", "snap7", &[port.to_string()], port)
}

fn device_yaml(id: &str, port: u16, prefix: &str, poll: &str, tags: &str) -> String {
    format!(
        "  - id: {id}\n    protocol: s7\n    uns_prefix: {prefix}\n    poll_interval: {poll}\n    connection: {{ host: 127.0.0.1, port: {port}, rack: 0, slot: 1, timeout: 1s }}\n    tags:\n{tags}"
    )
}

fn compile(port: u16, tags: &str) -> Arc<Device> {
    let yaml = format!("devices:\n{}", device_yaml("plc", port, "a/b", "1s", tags));
    let cfg = Config::from_str_with_env(&yaml, None, &[]).unwrap_or_else(|e| panic!("{e}"));
    Arc::new(Device::compile(cfg.devices[0].clone()).unwrap())
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

/// Every tag's reading by id.
async fn read_all(pools: &Pools, d: &Arc<Device>) -> HashMap<String, Reading> {
    pools
        .read(d, None)
        .await
        .unwrap()
        .into_iter()
        .map(|(i, r)| (d.cfg.tags[i].id.to_string(), r))
        .collect()
}

fn value(r: &HashMap<String, Reading>, id: &str) -> Value {
    match &r[id] {
        Reading::Good { value, .. } => value.clone(),
        bad => panic!("{id}: {bad:?}"),
    }
}

/// A TCP relay in front of the PLC that counts the TPKT packets the client sends.
struct Relay {
    port: u16,
    packets: Arc<AtomicU64>,
}

async fn relay(upstream: u16) -> Relay {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let packets = Arc::new(AtomicU64::new(0));
    let count = packets.clone();
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            let count = count.clone();
            tokio::spawn(async move {
                let Ok(server) = tokio::net::TcpStream::connect(("127.0.0.1", upstream)).await
                else {
                    return;
                };
                let (mut cr, mut cw) = client.into_split();
                let (mut sr, mut sw) = server.into_split();
                tokio::spawn(async move {
                    let _ = tokio::io::copy(&mut sr, &mut cw).await;
                });
                loop {
                    let mut head = [0u8; 4];
                    if cr.read_exact(&mut head).await.is_err() {
                        break;
                    }
                    let len = usize::from(u16::from_be_bytes([head[2], head[3]]));
                    let mut p = head.to_vec();
                    p.resize(len.max(4), 0);
                    if cr.read_exact(&mut p[4..]).await.is_err() {
                        break;
                    }
                    count.fetch_add(1, Ordering::SeqCst);
                    if sw.write_all(&p).await.is_err() {
                        break;
                    }
                }
            });
        }
    });
    Relay { port, packets }
}

const READ_TAGS: &str = "      - { id: real, address: DB1.DBD0, data_type: real }
      - { id: int, address: DB1.DBW4, data_type: int }
      - { id: dint, address: DB1.DBD6, data_type: dint }
      - { id: word, address: DB1.DBW10, data_type: word }
      - { id: dword, address: DB1.DBD12, data_type: dword }
      - { id: byte, address: DB1.DBB16, data_type: byte }
      - { id: bit, address: DB1.DBX17.3, data_type: bool }
      - { id: bit-off, address: DB1.DBX17.2, data_type: bool }
      - { id: lreal, address: DB1.DBD18, data_type: lreal }
      - { id: name, address: DB1.DBB26, data_type: string, length: 10 }
      - { id: scaled, address: DB1.DBW4, data_type: int, scale: 0.5, offset: 10 }
      - { id: m-bit, address: M0.1, data_type: bool }
      - { id: m-word, address: MW2, data_type: int }
      - { id: i-bit, address: I0.1, data_type: bool }
      - { id: i-byte, address: IB0, data_type: byte }
      - { id: q-bit, address: Q0.0, data_type: bool }
      - { id: q-word, address: QW2, data_type: word }
";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_area_and_type_is_read_in_fewer_requests_than_tags() {
    let (_peer, port) = start_snap7();
    let relay = relay(port).await;
    let d = compile(relay.port, READ_TAGS);
    let pools = pools();
    let first = read_all(&pools, &d).await;
    let expected = [
        ("real", Value::Float(12.5)),
        ("int", Value::Int(-2)),
        ("dint", Value::Int(-123_456)),
        ("word", Value::Int(65534)),
        ("dword", Value::Int(65538)),
        ("byte", Value::Int(200)),
        ("bit", Value::Bool(true)),
        ("bit-off", Value::Bool(false)),
        ("lreal", Value::Float(100.25)),
        ("name", Value::String("PACK-1".into())),
        ("scaled", Value::Float(9.0)),
        ("m-bit", Value::Bool(true)),
        ("m-word", Value::Int(300)),
        ("i-bit", Value::Bool(true)),
        ("i-byte", Value::Int(2)),
        ("q-bit", Value::Bool(false)),
        ("q-word", Value::Int(0)),
    ];
    for (id, want) in &expected {
        assert_eq!(&value(&first, id), want, "{id}");
    }
    // With the session open, one poll of 17 tags in four areas is one ReadVar request.
    let before = relay.packets.load(Ordering::SeqCst);
    let again = read_all(&pools, &d).await;
    let sent = relay.packets.load(Ordering::SeqCst) - before;
    assert_eq!(
        sent,
        1,
        "requests on the wire for {} tags",
        d.cfg.tags.len()
    );
    assert_eq!(d.plan.requests_per_poll(), 1);
    assert_eq!(again.len(), expected.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_range_longer_than_the_pdu_is_split_and_reassembled() {
    let (_peer, port) = start_snap7();
    let relay = relay(port).await;
    // 100 dints 20 bytes apart over DB20's 2000 bytes: one range, longer than any PDU.
    let tags: String = (0..100)
        .map(|i| {
            format!(
                "      - {{ id: d{i}, address: DB20.DBD{}, data_type: dword }}\n",
                i * 20
            )
        })
        .collect();
    let d = compile(relay.port, &tags);
    let pools = pools();
    read_all(&pools, &d).await;
    let before = relay.packets.load(Ordering::SeqCst);
    let r = read_all(&pools, &d).await;
    let sent = relay.packets.load(Ordering::SeqCst) - before;
    for i in 0..100u32 {
        let b: Vec<u8> = (0..4).map(|k| ((i * 20 + k) % 251) as u8).collect();
        let want = u32::from_be_bytes([b[0], b[1], b[2], b[3]]);
        assert_eq!(value(&r, &format!("d{i}")), Value::Int(want.into()), "d{i}");
    }
    // At least 2000 / (PDU - 18) requests; far fewer than 100.
    assert!((2..=9).contains(&sent), "{sent} requests for 2000 bytes");
    assert_eq!(d.plan.requests_per_poll() as u64, sent);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_writable_type_is_written_and_reads_back() {
    let (_peer, port) = start_snap7();
    let tags = "      - { id: real, address: DB10.DBD0, data_type: real, access: readwrite }
      - { id: int, address: DB10.DBW4, data_type: int, scale: 0.1, access: readwrite }
      - { id: dint, address: DB10.DBD6, data_type: dint, access: readwrite }
      - { id: word, address: DB10.DBW10, data_type: word, access: readwrite }
      - { id: dword, address: DB10.DBD12, data_type: dword, access: readwrite }
      - { id: byte, address: DB10.DBB16, data_type: byte, access: readwrite }
      - { id: lreal, address: DB10.DBD18, data_type: lreal, access: readwrite }
      - { id: name, address: DB10.DBB26, data_type: string, length: 10, access: readwrite }
      - { id: bit, address: DB10.DBX40.0, data_type: bool, access: readwrite }
      - { id: m-word, address: MW10, data_type: word, access: readwrite }
      - { id: m-bit, address: M20.0, data_type: bool, access: readwrite }
      - { id: q-int, address: QW4, data_type: int, access: readwrite }
      - { id: q-bit, address: Q1.0, data_type: bool, access: readwrite }
";
    let d = compile(port, tags);
    let pools = pools();
    let writes = [
        ("real", Value::Float(61.5), Value::Float(61.5)),
        ("int", Value::Float(61.5), Value::Float(61.5)),
        ("dint", Value::Int(-7), Value::Int(-7)),
        ("word", Value::Int(65000), Value::Int(65000)),
        (
            "dword",
            Value::Int(4_000_000_000),
            Value::Int(4_000_000_000),
        ),
        ("byte", Value::Int(17), Value::Int(17)),
        ("lreal", Value::Float(-2.25e10), Value::Float(-2.25e10)),
        (
            "name",
            Value::String("Grüße".into()),
            Value::String("Grüße".into()),
        ),
        ("bit", Value::Bool(true), Value::Bool(true)),
        ("m-word", Value::Int(1234), Value::Int(1234)),
        ("m-bit", Value::Bool(true), Value::Bool(true)),
        ("q-int", Value::Int(-42), Value::Int(-42)),
        ("q-bit", Value::Bool(true), Value::Bool(true)),
    ];
    let index = |id: &str| d.cfg.tags.iter().position(|t| t.id.as_str() == id).unwrap();
    for (id, v, _) in &writes {
        pools
            .write(&d, index(id), v.clone())
            .await
            .unwrap()
            .unwrap_or_else(|e| panic!("{id}: {e}"));
    }
    let back = read_all(&pools, &d).await;
    for (id, _, want) in &writes {
        let got = value(&back, id);
        match (&got, want) {
            (Value::Float(g), Value::Float(w)) => assert!((g - w).abs() < 1e-9, "{id}: {got}"),
            _ => assert_eq!(&got, want, "{id}"),
        }
    }
    // The bit goes back to false (a bit write, BIT transport size).
    pools
        .write(&d, index("bit"), Value::Bool(false))
        .await
        .unwrap()
        .unwrap();
    let back = read_all(&pools, &d).await;
    assert_eq!(value(&back, "bit"), Value::Bool(false));

    // Bad values are refused before anything is sent, saying why.
    for (id, v, why) in [
        ("byte", Value::Int(256), "does not fit byte"),
        ("word", Value::Int(-1), "does not fit word"),
        ("name", Value::String("eleven char".into()), "string"),
        ("real", Value::String("x".into()), "cannot be written"),
    ] {
        let e = pools.write(&d, index(id), v).await.unwrap().unwrap_err();
        assert!(e.to_string().contains(why), "{id}: {e}");
    }
    // A data block the PLC does not have: the PLC's reason, and the session stays up.
    let bad = compile(
        port,
        "      - { id: nodb, address: DB99.DBW0, data_type: int, access: readwrite }\n",
    );
    let e = pools
        .write(&bad, 0, Value::Int(1))
        .await
        .unwrap()
        .unwrap_err();
    // python-snap7 refuses the whole job (class 0x84); a CPU answers item code 0x0A.
    assert!(
        e.to_string().contains("refused") || e.to_string().contains("does not exist"),
        "{e}"
    );
    pools
        .write(&d, index("byte"), Value::Int(18))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(value(&read_all(&pools, &d).await, "byte"), Value::Int(18));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_item_error_marks_only_its_own_tag_bad() {
    let (_peer, port) = start_snap7();
    let tags = "      - { id: ok, address: DB1.DBW250, data_type: int }
      - { id: past-end, address: DB1.DBD254, data_type: dint }
      - { id: nodb, address: DB99.DBW0, data_type: int }
      - { id: byte, address: DB1.DBB16, data_type: byte }
";
    let d = compile(port, tags);
    let pools = pools();
    for _ in 0..5 {
        let r = read_all(&pools, &d).await;
        assert_eq!(value(&r, "ok"), Value::Int(0));
        assert_eq!(value(&r, "byte"), Value::Int(200));
        for id in ["past-end", "nodb"] {
            assert!(
                matches!(
                    &r[id],
                    Reading::Bad {
                        quality: Quality::BadConfigError,
                        ..
                    }
                ),
                "{id}: {:?}",
                r[id]
            );
        }
    }
    assert_eq!(
        pools.breaker_state(&d),
        nexus_common::breaker::BreakerState::Closed,
        "item errors do not count against the breaker"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_plc_goes_offline_others_keep_polling_and_it_recovers() {
    let (peer_a, port_a) = start_snap7();
    let (_peer_b, port_b) = start_snap7();
    let broker = support::broker();
    let mport = broker.ports.tcp().port();
    let token = CancellationToken::new();
    let root = testing::unique("s7fault");
    let (_s, mut rx) = support::subscriber(
        mport,
        &[&format!("{root}/#"), "$nexus/status/device/#"],
        &token,
    )
    .await;
    let dir = tempfile::tempdir().unwrap();
    let http = free_port();
    let tags = "      - { id: x, address: DB1.DBW4, data_type: int }\n      - { id: r, address: DB1.DBD0, data_type: real }\n";
    let cfg = support::config(
        mport,
        http,
        dir.path(),
        &format!(
            "gateway:\n  heartbeat: 0s\n  breaker: {{ window: 10, min_requests: 3, open_for: 1s, half_open_trials: 1 }}\ndevices:\n{}{}",
            device_yaml("s7-a", port_a, &root, "100ms", tags),
            device_yaml("s7-b", port_b, &root, "100ms", tags)
        ),
    );
    let (stop, task) = support::start_gateway(cfg);
    let got = support::collect(&mut rx, Duration::from_millis(800), Duration::from_secs(4)).await;
    for dev in ["s7-a", "s7-b"] {
        let v = got
            .iter()
            .rev()
            .find(|(t, _, _)| t.ends_with(&format!("/{dev}/r")))
            .map(|(_, v, _)| v.clone())
            .unwrap_or_else(|| panic!("no value of {dev}: {got:?}"));
        assert_eq!(
            (v["v"].as_f64(), v["q"].as_str()),
            (Some(12.5), Some("good"))
        );
    }
    let m = support::http_get(http, "/metrics");
    assert!(
        support::metric(&m, "nexus_gateway_read_requests_total{device=\"s7-a\"}") > 0.0,
        "{m}"
    );
    let polls_b = |text: &str| {
        support::metric(
            text,
            "nexus_gateway_polls_total{device=\"s7-b\",result=\"ok\"}",
        )
    };

    // PLC A dies.
    drop(peer_a);
    let m0 = support::http_get(http, "/metrics");
    let got = support::collect(&mut rx, Duration::from_secs(3), Duration::from_secs(3)).await;
    let m1 = support::http_get(http, "/metrics");
    let a_status: Vec<&serde_json::Value> = got
        .iter()
        .filter(|(t, _, _)| t == "$nexus/status/device/s7-a")
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
    assert!(
        got.iter().any(|(t, v, _)| t.ends_with("/s7-a/x")
            && (v["q"] == "bad_comm_failure" || v["q"] == "bad_not_connected")),
        "{got:?}"
    );
    assert!(support::metric(&m1, "nexus_breaker_rejected_total") > 0.0);
    let b_rate = (polls_b(&m1) - polls_b(&m0)) / 3.0;
    assert!(b_rate >= 7.0, "s7-b polled {b_rate}/s while s7-a was down");

    // A comes back on the same port and recovers by itself.
    let _peer_a2 = start_snap7_on(port_a);
    let got = support::collect(&mut rx, Duration::from_secs(4), Duration::from_secs(8)).await;
    let last_a = got
        .iter()
        .rev()
        .find(|(t, _, _)| t == "$nexus/status/device/s7-a")
        .map(|(_, v, _)| v["state"].clone());
    assert_eq!(last_a, Some(serde_json::json!("online")), "{got:?}");
    assert!(got
        .iter()
        .any(|(t, v, _)| t.ends_with("/s7-a/x") && v["q"] == "good"));
    stop.cancel();
    task.await.unwrap().unwrap();
}
