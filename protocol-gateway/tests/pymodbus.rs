//! The Modbus driver against an independent implementation: pymodbus (PyPI), over Modbus TCP
//! and with RTU framing (CRC) over TCP. scripts/test.sh installs pymodbus into
//! target/test-venv; NEXUS_TEST_PYTHON overrides the interpreter.

#![allow(clippy::unwrap_used)]

mod support;

use std::sync::Arc;

use nexus_common::breaker::BreakerConfig;
use nexus_common::config::{Config, OpcUaClientConfig, PoolConfig};
use nexus_common::testing::{self, free_port};
use nexus_common::Value;
use nexus_devices::Pools;
use nexus_devices::{Device, Reading};

fn start_pymodbus(framing: &str) -> (testing::PythonPeer, u16) {
    let port = free_port();
    (
        testing::PythonPeer::start(
            "pymodbus_server.py",
            "pymodbus",
            &[port.to_string(), framing.to_owned()],
            port,
        ),
        port,
    )
}

fn device(port: u16, transport: &str) -> Arc<Device> {
    let yaml = format!(
        "devices:\n  - id: py\n    protocol: modbus\n    uns_prefix: a/b\n    connection: {{ host: 127.0.0.1, port: {port}, transport: {transport}, timeout: 2s }}\n    tags:\n{}      - {{ id: sp, address: \"HR:10\", data_type: int16, scale: 0.1, access: readwrite }}\n      - {{ id: wide, address: \"HR:300\", data_type: float64, byte_order: BADC, access: readwrite }}\n",
        support::TYPED_TAGS
    );
    let cfg = Config::from_str_with_env(&yaml, None, &[]).unwrap_or_else(|e| panic!("{e}"));
    Arc::new(Device::compile(cfg.devices[0].clone()).unwrap())
}

async fn check(framing: &str, transport: &str) {
    let (_peer, port) = start_pymodbus(framing);
    let d = device(port, transport);
    let pools = Pools::new(
        PoolConfig::default(),
        BreakerConfig::default(),
        OpcUaClientConfig::default(),
        &prometheus::Registry::new(),
    )
    .unwrap();
    let readings = pools.read(&d, None).await.unwrap();
    let by_id: std::collections::HashMap<&str, &Reading> = readings
        .iter()
        .map(|(i, r)| (d.cfg.tags[*i].id.as_str(), r))
        .collect();
    for (tag, want) in support::expected_typed() {
        match by_id[tag] {
            Reading::Good { value, .. } => assert_eq!(
                nexus_common::codec::json::value_to_json(Some(value)),
                want,
                "{framing}: {tag}"
            ),
            bad => panic!("{framing}: {tag}: {bad:?}"),
        }
    }
    // Writes land and read back through the independent server.
    let n = d.cfg.tags.len();
    pools
        .write(&d, n - 2, Value::Float(61.5))
        .await
        .unwrap()
        .unwrap();
    pools
        .write(&d, n - 1, Value::Float(-2.25e10))
        .await
        .unwrap()
        .unwrap();
    pools
        .write(&d, 14, Value::Bool(false))
        .await
        .unwrap()
        .unwrap(); // coil 7
    let back = pools.read(&d, Some(vec![n - 2, n - 1, 14])).await.unwrap();
    assert_eq!(
        back[0].1,
        Reading::Good {
            value: Value::Float(61.5),
            source_ts_ms: None
        },
        "{framing}"
    );
    assert_eq!(
        back[1].1,
        Reading::Good {
            value: Value::Float(-2.25e10),
            source_ts_ms: None
        },
        "{framing}"
    );
    assert_eq!(
        back[2].1,
        Reading::Good {
            value: Value::Bool(false),
            source_ts_ms: None
        },
        "{framing}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_and_writes_against_pymodbus_tcp() {
    check("tcp", "tcp").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_and_writes_against_pymodbus_rtu_framing_over_tcp() {
    check("rtu", "rtu_over_tcp").await;
}

/// Bits of HR 240 (0b1000 in the pymodbus server) written with Mask Write Register (function
/// 22): each changes its own bit and keeps the others.
async fn check_bits(framing: &str, transport: &str) {
    let (_peer, port) = start_pymodbus(framing);
    let yaml = format!(
        "devices:\n  - id: py-bits\n    protocol: modbus\n    uns_prefix: a/b\n    connection: {{ host: 127.0.0.1, port: {port}, transport: {transport}, timeout: 2s }}\n    tags:\n      - {{ id: word, address: \"HR:240\", data_type: uint16 }}\n      - {{ id: b0, address: \"HR:240.0\", data_type: bool, access: readwrite }}\n      - {{ id: b3, address: \"HR:240.3\", data_type: bool, access: readwrite }}\n      - {{ id: b15, address: \"HR:240.15\", data_type: bool, access: readwrite }}\n"
    );
    let cfg = Config::from_str_with_env(&yaml, None, &[]).unwrap_or_else(|e| panic!("{e}"));
    let d = Arc::new(Device::compile(cfg.devices[0].clone()).unwrap());
    let pools = Pools::new(
        PoolConfig::default(),
        BreakerConfig::default(),
        OpcUaClientConfig::default(),
        &prometheus::Registry::new(),
    )
    .unwrap();
    let word = |r: Vec<(usize, Reading)>| match &r[0].1 {
        Reading::Good {
            value: Value::Int(w),
            ..
        } => *w,
        bad => panic!("{framing}: {bad:?}"),
    };
    assert_eq!(word(pools.read(&d, Some(vec![0])).await.unwrap()), 0b1000);
    for (tag, on, want) in [
        (1, true, 0b1001),
        (3, true, 0x8009),
        (2, false, 0x8001),
        (1, false, 0x8000),
        (2, true, 0x8008),
    ] {
        pools
            .write(&d, tag, Value::Bool(on))
            .await
            .unwrap()
            .unwrap_or_else(|e| panic!("{framing}: tag {tag}: {e}"));
        assert_eq!(
            word(pools.read(&d, Some(vec![0])).await.unwrap()),
            want,
            "{framing}: tag {tag} set to {on}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bit_writes_keep_the_other_bits_in_pymodbus_tcp() {
    check_bits("tcp", "tcp").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bit_writes_keep_the_other_bits_in_pymodbus_rtu_framing_over_tcp() {
    check_bits("rtu", "rtu_over_tcp").await;
}
