//! The OPC UA driver against an independent implementation: Python asyncua (PyPI; scripts/test.sh
//! installs it into target/test-venv). Read, subscribe, write, browse, a Basic256Sha256
//! SignAndEncrypt endpoint, and a subscription that comes back after the server restarts.

#![allow(clippy::unwrap_used)]

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use nexus_common::breaker::BreakerConfig;
use nexus_common::config::{Config, OpcUaClientConfig, PoolConfig};
use nexus_common::testing::{self, free_port};
use nexus_common::Value;
use nexus_devices::Pools;
use nexus_devices::{Device, Reading};

fn peer(port: u16, dir: &Path) -> testing::PythonPeer {
    testing::PythonPeer::start(
        "asyncua_server.py",
        "asyncua",
        &[port.to_string(), dir.join("peer-pki").display().to_string()],
        port,
    )
}

const NS: &str = "nsu=urn:nexus:asyncua-peer";

fn device(port: u16, id: &str, mode: &str, security: &str) -> Arc<Device> {
    let tags: String = [
        ("counter", "Counter", "uint32", "read"),
        ("temp", "Temperature", "float64", "read"),
        ("setpoint", "Setpoint", "float64", "readwrite"),
        ("mode", "Mode", "int16", "readwrite"),
        ("name", "Name", "string", "readwrite"),
    ]
    .iter()
    .map(|(id, node, dt, access)| {
        format!("      - {{ id: {id}, node_id: \"{NS};s={node}\", data_type: {dt}, access: {access} }}\n")
    })
    .collect();
    let yaml = format!(
        "devices:\n  - id: {id}\n    protocol: opcua\n    uns_prefix: a/b\n    poll_interval: 200ms\n    mode: {mode}\n    connection: {{ endpoint: \"opc.tcp://127.0.0.1:{port}/\", timeout: 3s{security} }}\n    tags:\n{tags}"
    );
    let cfg = Config::from_str_with_env(&yaml, None, &[]).unwrap_or_else(|e| panic!("{e}"));
    Arc::new(Device::compile(cfg.devices[0].clone()).unwrap())
}

fn pools(dir: &Path) -> Arc<Pools> {
    Pools::new(
        PoolConfig::default(),
        BreakerConfig::default(),
        OpcUaClientConfig {
            pki_dir: dir.join("client-pki"),
            trust_server_certs: true,
            ..OpcUaClientConfig::default()
        },
        &prometheus::Registry::new(),
    )
    .unwrap()
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

/// Counter values seen by subscription polls over `secs` seconds.
async fn counter_changes(pools: &Pools, d: &Arc<Device>, secs: u64) -> Vec<i64> {
    let mut seen = Vec::new();
    let end = tokio::time::Instant::now() + Duration::from_secs(secs);
    while tokio::time::Instant::now() < end {
        if let Ok(r) = pools.read(d, None).await {
            for (i, r) in r {
                if let (
                    0,
                    Reading::Good {
                        value: Value::Int(n),
                        ..
                    },
                ) = (i, r)
                {
                    if seen.last() != Some(&n) {
                        seen.push(n);
                    }
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    seen
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_write_browse_and_subscribe_against_python_asyncua() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let _peer = peer(port, dir.path());
    let pools = pools(dir.path());

    // Read (poll mode), with the namespace URI resolved on this server.
    let d = device(port, "py-poll", "poll", "");
    let r = by_id(&d, pools.read(&d, None).await.unwrap());
    assert!(matches!(good(&r, "counter"), Value::Int(_)));
    assert_eq!(good(&r, "setpoint"), Value::Float(42.5));
    assert_eq!(good(&r, "mode"), Value::Int(1));
    assert_eq!(good(&r, "name"), Value::String("peer".into()));

    // Writes converted to the node's type.
    for (i, v) in [
        (2, Value::Int(80)),
        (3, Value::Float(4.0)),
        (4, Value::String("line-9".into())),
    ] {
        pools
            .write(&d, i, v)
            .await
            .unwrap()
            .unwrap_or_else(|e| panic!("tag {i}: {e}"));
    }
    let back = by_id(&d, pools.read(&d, Some(vec![2, 3, 4])).await.unwrap());
    assert_eq!(good(&back, "setpoint"), Value::Float(80.0));
    assert_eq!(good(&back, "mode"), Value::Int(4));
    assert_eq!(good(&back, "name"), Value::String("line-9".into()));
    let e = pools
        .write(&d, 3, Value::Int(1 << 20))
        .await
        .unwrap()
        .unwrap_err();
    assert!(e.to_string().contains("does not fit Int16"), "{e}");

    // Browse: the Objects folder holds Line, and Line its variables.
    let (tx, mut rx) = tokio::sync::mpsc::channel(16);
    let browse = pools.browse(&d, None, tx);
    let collect = async {
        let mut v = Vec::new();
        while let Some(e) = rx.recv().await {
            v.push(e);
        }
        v
    };
    let (res, top) = tokio::join!(browse, collect);
    res.unwrap();
    let line = top
        .iter()
        .find(|e| e.display_name == "Line")
        .expect("Line under Objects");
    let (tx, mut rx) = tokio::sync::mpsc::channel(16);
    let browse = pools.browse(&d, Some(line.node_id.clone()), tx);
    let collect = async {
        let mut v = Vec::new();
        while let Some(e) = rx.recv().await {
            v.push(e.display_name);
        }
        v
    };
    let (res, children) = tokio::join!(browse, collect);
    res.unwrap();
    for name in ["Counter", "Temperature", "Setpoint", "Mode", "Name"] {
        assert!(children.iter().any(|c| c == name), "{name}: {children:?}");
    }

    // Subscribe: every counter change (100 ms) arrives though polls are 300 ms apart.
    let s = device(port, "py-sub", "subscribe", "");
    let seen = counter_changes(&pools, &s, 3).await;
    assert!(seen.len() >= 15, "{seen:?}");
    for w in seen.windows(2) {
        assert_eq!(w[1], w[0] + 1, "a change was lost: {seen:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_signed_and_encrypted_subscription_survives_a_server_restart() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let peer1 = peer(port, dir.path());
    let pools = pools(dir.path());
    let d = device(
        port,
        "py-secure",
        "subscribe",
        ", security_policy: Basic256Sha256, security_mode: SignAndEncrypt",
    );
    if let Err(e) = pools.read(&d, None).await {
        panic!("secured session: {e}");
    }
    let before = counter_changes(&pools, &d, 3).await;
    assert!(before.len() >= 10, "{before:?}");

    drop(peer1);
    // Changes queued before the server died are still handed over once; then reads fail.
    let end = tokio::time::Instant::now() + Duration::from_secs(15);
    loop {
        let r = pools.read(&d, None).await;
        if r.is_err() {
            break;
        }
        assert!(
            tokio::time::Instant::now() < end,
            "a dead server must become an error, not stale values: {r:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let _peer2 = peer(port, dir.path());
    // The driver opens a new secured session and recreates the subscription by itself; the
    // restarted server counts from 1 again.
    let mut after = Vec::new();
    let end = tokio::time::Instant::now() + Duration::from_secs(20);
    while after.len() < 10 && tokio::time::Instant::now() < end {
        after = counter_changes(&pools, &d, 2).await;
    }
    assert!(after.len() >= 10, "{after:?}");
    assert!(
        after[0] < before[before.len() - 1],
        "values from the new server: {after:?}"
    );
}
