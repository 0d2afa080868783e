//! Broker benchmark: the embedded broker (`nexus broker`, its own process) against Mosquitto
//! (configured for throughput by the test harness) in the same run. One publisher and one
//! subscriber (rumqttc through nexus-common's helper), UNS-style ~100-byte JSON payloads, QoS 0
//! and QoS 1. Reports msgs/s end to end, messages lost, the broker's peak RSS, and the
//! embedded/Mosquitto ratios. On the embedded broker the publisher logs in as a `publisher`
//! and the subscriber as a `viewer` (what a third-party data source and a dashboard would be);
//! Mosquitto lets both in anonymously. The embedded broker runs twice, with its default quick
//! ACKs and with `broker.quickack: false`, to show what acknowledging every read costs.
//!
//! `cargo bench -p nexus-orchestrator --bench broker` (BENCH_MESSAGES=N to change the count).

use std::time::{Duration, Instant};

use nexus_common::config::MqttVersion;
use nexus_common::mqtt::{self, ClientSettings, QoS};
use nexus_common::testing::{self, Mosquitto, PUBLISHER_USER, VIEWER_USER};
use support::{mqtt_as, status_kib, Proc};
use tokio_util::sync::CancellationToken;

mod support;

struct Result {
    rate: f64,
    received: usize,
}

/// One run through the broker on `port`; `auth`: log in as the bench's publisher and viewer.
async fn run(port: u16, auth: bool, qos: QoS, n: usize) -> Result {
    let token = CancellationToken::new();
    let client = |user| {
        let mut cfg = mqtt_as(port, auth.then_some(user));
        cfg.version = MqttVersion::V311;
        cfg.persistent_session = false;
        cfg.inflight = 1000;
        cfg
    };
    let topic_root = testing::unique("bench");
    let mut s = ClientSettings::new(testing::unique("bench-sub"));
    s.subscriptions = vec![(format!("{topic_root}/#"), qos)];
    s.incoming_capacity = 100_000;
    let (sub, mut rx) =
        mqtt::connect(&client(VIEWER_USER), s, None, token.clone()).expect("subscriber");
    sub.wait_connected(Duration::from_secs(10))
        .await
        .expect("subscriber connects");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (publisher, _) = mqtt::connect(
        &client(PUBLISHER_USER),
        ClientSettings::new(testing::unique("bench-pub")),
        None,
        token.clone(),
    )
    .expect("publisher");
    publisher
        .wait_connected(Duration::from_secs(10))
        .await
        .expect("publisher connects");

    let start = Instant::now();
    let receiver = tokio::spawn(async move {
        let mut got = 0usize;
        let mut last = Instant::now();
        while got < n {
            match tokio::time::timeout(Duration::from_secs(3), rx.recv()).await {
                Ok(Some(_)) => {
                    got += 1;
                    last = Instant::now();
                }
                _ => break,
            }
        }
        (got, last)
    });
    for i in 0..n {
        let topic = format!(
            "{topic_root}/site/area/line-{}/plc-{}/tag-{}",
            i % 4,
            i % 50,
            i % 20
        );
        let payload = format!(
            "{{\"v\":{}.5,\"q\":\"good\",\"ts\":{},\"u\":\"degC\"}}",
            i % 1000,
            1_700_000_000_000u64 + i as u64
        );
        publisher
            .publish(&topic, payload, qos, false)
            .await
            .expect("publish");
    }
    let (received, last) = receiver.await.expect("receiver");
    let elapsed = last.duration_since(start).as_secs_f64().max(1e-9);
    token.cancel();
    Result {
        rate: received as f64 / elapsed,
        received,
    }
}

struct Broker {
    name: &'static str,
    port: u16,
    pid: u32,
    /// Clients log in (the embedded broker refuses anonymous publishers).
    auth: bool,
    _child: Option<(Proc, tempfile::TempDir)>,
    _mosq: Option<Mosquitto>,
}

fn start_embedded() -> Broker {
    embedded("embedded (rmqtt)", "true")
}

fn start_embedded_delayed_acks() -> Broker {
    embedded("  no quickack", "false")
}

fn embedded(name: &'static str, quickack: &str) -> Broker {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut env = support::QUEUES_HOLD_THE_RUN.to_vec();
    env.push(("NEXUS_BROKER__QUICKACK", quickack));
    let (child, port) = support::start_broker_with(dir.path(), &env);
    Broker {
        name,
        port,
        pid: child.0.id(),
        auth: true,
        _child: Some((child, dir)),
        _mosq: None,
    }
}

fn start_mosquitto() -> Broker {
    let m = Mosquitto::start("").expect("mosquitto installed (scripts/deps.sh)");
    Broker {
        name: "mosquitto",
        port: m.port,
        pid: m.pid(),
        auth: false,
        _child: None,
        _mosq: Some(m),
    }
}

fn main() {
    let n: usize = std::env::var("BENCH_MESSAGES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200_000);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    println!(
        "broker benchmark: {n} messages per run, one publisher, one subscriber, ~100-byte JSON"
    );
    println!(
        "{:<18} {:>4} {:>12} {:>10} {:>12} {:>12}",
        "broker", "qos", "msgs/s", "lost", "RSS idle", "RSS peak"
    );
    let mut rates = std::collections::HashMap::new();
    let mut peaks = std::collections::HashMap::new();
    for start in [
        start_embedded as fn() -> Broker,
        start_embedded_delayed_acks,
        start_mosquitto,
    ] {
        let b = start();
        let idle = status_kib(b.pid, "VmRSS:");
        for (qos, label) in [(QoS::AtMostOnce, 0), (QoS::AtLeastOnce, 1)] {
            let r = rt.block_on(run(b.port, b.auth, qos, n));
            let peak = status_kib(b.pid, "VmHWM:");
            println!(
                "{:<18} {:>4} {:>12.0} {:>10} {:>9.1}MiB {:>9.1}MiB",
                b.name,
                label,
                r.rate,
                n - r.received,
                idle as f64 / 1024.0,
                peak as f64 / 1024.0
            );
            rates.insert((b.name, label), r.rate);
            peaks.insert(b.name, peak);
        }
    }
    for q in [0, 1] {
        let ratio = rates[&("embedded (rmqtt)", q)] / rates[&("mosquitto", q)];
        println!(
            "QoS {q}: embedded / mosquitto throughput = {ratio:.2}x; quick ACKs on / off = {:.2}x",
            rates[&("embedded (rmqtt)", q)] / rates[&("  no quickack", q)]
        );
    }
    println!(
        "peak RSS: embedded / mosquitto = {:.1}x",
        peaks["embedded (rmqtt)"] as f64 / peaks["mosquitto"].max(1) as f64
    );
}
