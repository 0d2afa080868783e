//! Command round-trip benchmark: an operator client publishes a write command and waits for
//! its response, through `nexus broker`, to `nexus gateway` (command handler inside) writing a
//! simulated Modbus device; p50/p99/max latency, idle and while the same gateway publishes
//! 100K points/s (20 devices x 500 tags every 100 ms, QoS 0). Baseline in the same run: an
//! MQTT round trip alone (publish to a topic the client itself subscribes to).
//! The command client logs in as an `operator`, the gateway as the service account, and the
//! baseline's echo client as a `publisher` (an operator may publish only commands).
//!
//! Each round trip is measured twice: with a client that sets TCP_NODELAY, and with one that
//! leaves Nagle's algorithm on, as Python's paho-mqtt and many other clients do. Such a client
//! holds a small packet while its previous one is unacknowledged, and a broker that delays its
//! ACK makes it wait ~40 ms (docs/broker.md, "Clients that leave Nagle on"). The echo runs
//! also go through Mosquitto, an external broker that does not answer quickly.
//!
//! `cargo bench -p nexus-orchestrator --bench commands`; BENCH_COMMANDS (1000),
//! BENCH_QUICKACK=false starts the embedded broker with `broker.quickack: false`.

use std::time::{Duration, Instant};

use nexus_common::config::MqttVersion;
use nexus_common::mqtt::{self, ClientSettings, QoS};
use nexus_common::testing::{self, free_port, OPERATOR_USER, PUBLISHER_USER};
use nexus_devices::simulator::modbus::ModbusSimulator;
use support::{env, http_get, metric_sum, mqtt_as, Proc};
use tokio_util::sync::CancellationToken;

mod support;

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

/// Prints and returns (p50, p99).
fn report(label: &str, mut v: Vec<Duration>) -> (Duration, Duration) {
    v.sort();
    let p50 = percentile(&v, 0.5);
    let p99 = percentile(&v, 0.99);
    println!(
        "  {label:<34} p50 {:>7.2} ms   p99 {:>7.2} ms   max {:>7.2} ms   (n={})",
        p50.as_secs_f64() * 1e3,
        p99.as_secs_f64() * 1e3,
        v.last().copied().unwrap_or_default().as_secs_f64() * 1e3,
        v.len()
    );
    (p50, p99)
}

/// `n` sequential round trips: publish `body(i)` at QoS 1 to `topic`, then wait for one
/// message on `reply` (subscribed before the first); `nodelay`: the client sets TCP_NODELAY.
async fn timed_round_trips(
    c: &nexus_common::config::MqttConfig,
    reply: &str,
    topic: &str,
    body: impl Fn(usize) -> String,
    (nodelay, n): (bool, usize),
    token: &CancellationToken,
    what: &str,
) -> Vec<Duration> {
    let mut s = ClientSettings::new(testing::unique("bench-rt"));
    s.subscriptions = vec![(reply.to_owned(), QoS::AtLeastOnce)];
    s.tcp_nodelay = nodelay;
    let (h, mut rx) = mqtt::connect(c, s, None, token.clone()).expect("client");
    h.wait_connected(Duration::from_secs(10))
        .await
        .expect("connect");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        let t = Instant::now();
        h.publish(topic, body(i), QoS::AtLeastOnce, false)
            .await
            .expect("publish");
        match tokio::time::timeout(Duration::from_secs(5), rx.recv()).await {
            Ok(Some(_)) => out.push(t.elapsed()),
            _ => panic!("no answer to round trip {i} ({what})"),
        }
    }
    h.disconnect().await;
    out
}

fn main() {
    let n = env("BENCH_COMMANDS", 1000) as usize;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let dir = tempfile::tempdir().expect("tempdir");
    let quickack = std::env::var("BENCH_QUICKACK").unwrap_or_else(|_| "true".into());
    let (_broker, mqtt_port) =
        support::start_broker_with(dir.path(), &[("NEXUS_BROKER__QUICKACK", &quickack)]);
    let token = CancellationToken::new();

    let (write_sim, load_sims) = rt.block_on(async {
        let w = ModbusSimulator::start("127.0.0.1:0".parse().expect("addr"), None)
            .await
            .expect("sim");
        let mut load = Vec::new();
        for _ in 0..20 {
            let s = ModbusSimulator::start(
                "127.0.0.1:0".parse().expect("addr"),
                Some(Duration::from_millis(100)),
            )
            .await
            .expect("sim");
            s.registers.lock().expect("lock").churn = 100..600;
            load.push(s);
        }
        (w, load)
    });

    let client = |user| {
        let mut c = mqtt_as(mqtt_port, Some(user));
        c.version = MqttVersion::V311;
        c.persistent_session = false;
        c
    };
    let c = client(OPERATOR_USER);

    let run_gateway = |with_load: bool| -> (Proc, u16) {
        let http = free_port();
        let mut yaml = format!(
            "mqtt: {{ {}, inflight: 1000 }}\ngateway:\n  qos: 0\n  heartbeat: 0s\n  workers: 20\n  buffer: {{ dir: {} }}\n  http_listen: 127.0.0.1:{http}\ncommands:\n  http_listen: 127.0.0.1:{}\n  journal_dir: {}\n  rate_per_device: 100000\n  burst_per_device: 100000\n  rate_global: 100000\n  burst_global: 100000\ntelemetry: {{ log_level: warn, instance: bench-{with_load} }}\ndevices:\n  - id: target\n    protocol: modbus\n    uns_prefix: bench/site/area/cmd\n    connection: {{ host: 127.0.0.1, port: {}, timeout: 2s }}\n    tags:\n      - {{ id: sp, address: \"HR:10\", data_type: uint16, access: readwrite }}\n",
            support::service_mqtt_yaml(mqtt_port),
            dir.path().join(format!("buffer-{with_load}")).display(),
            free_port(),
            // Its own journal: the default (in the working directory) would answer a
            // request id of an earlier run from the journal without writing the device.
            dir.path().join(format!("journal-{with_load}")).display(),
            write_sim.addr.port()
        );
        if with_load {
            yaml.push_str(&support::load_devices(
                &load_sims.iter().map(|s| s.addr.port()).collect::<Vec<_>>(),
                500,
                100,
            ));
        }
        let path = dir.path().join(format!("gw-{with_load}.yaml"));
        std::fs::write(&path, yaml).expect("write");
        let p = support::start_gateway(&path, &[]);
        std::thread::sleep(Duration::from_secs(3));
        (p, http)
    };

    let round_trips = |label: &'static str, nodelay: bool| -> Vec<Duration> {
        rt.block_on(timed_round_trips(
            &c,
            "$nexus/cmd/response/target/sp",
            "$nexus/cmd/target/write",
            |i| {
                format!(
                    "{{\"tag_id\":\"sp\",\"value\":{},\"request_id\":\"{label}-{nodelay}-{i}\"}}",
                    i % 60000
                )
            },
            (nodelay, n),
            &token,
            label,
        ))
    };

    // Baseline: an MQTT round trip through a broker, nothing else.
    let echo = |c: &nexus_common::config::MqttConfig, nodelay: bool| -> Vec<Duration> {
        let topic = testing::unique("bench/echo");
        rt.block_on(timed_round_trips(
            c,
            &topic,
            &topic,
            |i| i.to_string(),
            (nodelay, n),
            &token,
            "echo",
        ))
    };

    println!(
        "command round trip: publish command -> response received, {n} sequential commands; embedded broker quickack: {quickack}"
    );
    let (base_p50, base_p99) = report(
        "baseline: MQTT round trip only",
        echo(&client(PUBLISHER_USER), true),
    );
    let (base_nagle, _) = report(
        "  same, client with Nagle on",
        echo(&client(PUBLISHER_USER), false),
    );
    match testing::Mosquitto::start("") {
        Ok(m) => {
            let mut mc = testing::mqtt_config(m.port);
            mc.version = MqttVersion::V311;
            mc.persistent_session = false;
            report("  same through Mosquitto", echo(&mc, true));
            report("  same through Mosquitto, Nagle on", echo(&mc, false));
        }
        Err(e) => println!("  (Mosquitto round trips skipped: {e})"),
    }
    let (gw, _) = run_gateway(false);
    let (idle_p50, idle) = report("idle gateway", round_trips("idle", true));
    let (idle_nagle, _) = report("  same, client with Nagle on", round_trips("idle", false));
    drop(gw);
    let (gw, http) = run_gateway(true);
    let m0 = http_get(http, "/metrics");
    let t0 = Instant::now();
    let (_, loaded) = report(
        "gateway publishing 100K points/s",
        round_trips("load", true),
    );
    let m1 = http_get(http, "/metrics");
    let rate = (metric_sum(&m1, "nexus_gateway_points_published_total")
        - metric_sum(&m0, "nexus_gateway_points_published_total"))
        / t0.elapsed().as_secs_f64();
    println!("  load during the loaded run: {rate:.0} points/s published by the same gateway");
    println!(
        "  p99 ratios: idle / baseline {:.1}x, loaded / baseline {:.1}x; goal p99 under load < 20 ms: {}",
        idle.as_secs_f64() / base_p99.as_secs_f64(),
        loaded.as_secs_f64() / base_p99.as_secs_f64(),
        if loaded < Duration::from_millis(20) { "met" } else { "not met" }
    );
    println!(
        "  Nagle-on client p50: baseline {:.1}x, idle gateway {:.1}x of the TCP_NODELAY client's",
        base_nagle.as_secs_f64() / base_p50.as_secs_f64(),
        idle_nagle.as_secs_f64() / idle_p50.as_secs_f64()
    );
    drop(gw);
    token.cancel();
}
