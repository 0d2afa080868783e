//! Gateway benchmark: `nexus gateway` (its own process) polls N simulated Modbus devices with
//! M tags each (every value changes every poll) and publishes through `nexus broker` (another
//! process); a subscriber in this process counts what arrives. Reports points/s, the gateway's
//! CPU seconds per 100K points, its RSS, and read requests per poll. Baseline in the same run:
//! a bare rumqttc client publishing the same value objects through the same broker as fast as
//! it can, so the gateway's rate is also given as a share of what the broker path carries.
//! The gateway logs in as the service account, the baseline client as a `publisher`, the
//! counting subscriber as a `viewer`. The gateway runs twice at the same offered rate: durable
//! before publish (`gateway.buffer.durable_publish`, the default), then without, and the cost
//! of the durable path is given as ratios between the two.
//!
//! `cargo bench -p nexus-orchestrator --bench gateway`; BENCH_DEVICES (20), BENCH_TAGS (500),
//! BENCH_POLL_MS (100), BENCH_QOS (1), BENCH_SECONDS (15).
//!
//! `BENCH_PROTOCOL=opcua` runs the same through OPC UA subscriptions: one OPC UA simulator
//! (async-opcua server, in this process) per device with BENCH_TAGS variables that all change
//! every BENCH_POLL_MS, each read by a subscribed device (publishing and sampling interval
//! BENCH_POLL_MS).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nexus_common::codec::{encode_value_object, ValueObject};
use nexus_common::config::MqttVersion;
use nexus_common::mqtt::{self, ClientSettings, QoS};
use nexus_common::testing::{free_port, PUBLISHER_USER, VIEWER_USER};
use nexus_common::{Quality, Value};
use nexus_devices::simulator::modbus::ModbusSimulator;
use nexus_devices::simulator::opcua::{OpcUaSimOptions, OpcUaSimulator};
use support::{cpu_seconds, env, http_get, metric_sum, mqtt_as, status_kib};
use tokio_util::sync::CancellationToken;

mod support;

/// The simulated devices of a run.
enum Sims {
    Modbus(Vec<ModbusSimulator>),
    OpcUa(Vec<OpcUaSimulator>),
}

/// Subscribed OPC UA devices reading every bulk variable of each simulator.
fn opcua_devices(endpoints: &[String], tags: usize, poll_ms: u64) -> String {
    let mut yaml = String::new();
    for (d, ep) in endpoints.iter().enumerate() {
        yaml.push_str(&format!(
            "  - id: ua-{d}\n    protocol: opcua\n    uns_prefix: bench/site/area/line\n    poll_interval: {poll_ms}ms\n    mode: subscribe\n    connection: {{ endpoint: \"{ep}\", timeout: 5s }}\n    tags:\n"
        ));
        for t in 0..tags {
            yaml.push_str(&format!(
                "      - {{ id: t{t}, node_id: \"ns=2;s=Bulk.Tag{t:04}\", data_type: float64 }}\n"
            ));
        }
    }
    yaml
}

fn main() {
    let devices = env("BENCH_DEVICES", 20) as usize;
    let tags = env("BENCH_TAGS", 500) as usize;
    let poll_ms = env("BENCH_POLL_MS", 100);
    let qos_n = env("BENCH_QOS", 1) as u8;
    let seconds = env("BENCH_SECONDS", 15);
    let opcua = std::env::var("BENCH_PROTOCOL").is_ok_and(|p| p == "opcua");
    let qos = match qos_n {
        0 => QoS::AtMostOnce,
        _ => QoS::AtLeastOnce,
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let dir = tempfile::tempdir().expect("tempdir");

    let (broker, mqtt_port) = support::start_broker_with(dir.path(), support::QUEUES_HOLD_THE_RUN);

    let token = CancellationToken::new();
    let received = Arc::new(AtomicU64::new(0));
    let (sims, baseline_rate) = rt.block_on(async {
        // Simulators, every value changing at every poll.
        let sims = if opcua {
            let mut v = Vec::new();
            for d in 0..devices {
                v.push(
                    OpcUaSimulator::start(OpcUaSimOptions {
                        port: 0,
                        pki_dir: dir.path().join(format!("sim-pki-{d}")),
                        bulk: tags,
                        step: Duration::from_millis(poll_ms),
                        ..OpcUaSimOptions::default()
                    })
                    .await
                    .expect("OPC UA simulator"),
                );
            }
            Sims::OpcUa(v)
        } else {
            Sims::Modbus(support::churning_modbus_sims(devices, tags, poll_ms).await)
        };
        let client = |user| {
            let mut c = mqtt_as(mqtt_port, Some(user));
            c.version = MqttVersion::V311;
            c.persistent_session = false;
            c.inflight = 1000;
            c
        };
        let mut s = ClientSettings::new("bench-sub");
        s.subscriptions = vec![("bench/#".into(), qos)];
        s.incoming_capacity = 100_000;
        let (sub, mut rx) =
            mqtt::connect(&client(VIEWER_USER), s, None, token.clone()).expect("subscriber");
        sub.wait_connected(Duration::from_secs(10))
            .await
            .expect("connect");
        let r = received.clone();
        tokio::spawn(async move {
            while rx.recv().await.is_some() {
                r.fetch_add(1, Ordering::Relaxed);
            }
        });
        tokio::time::sleep(Duration::from_millis(300)).await;

        // Baseline: a bare client publishing value objects through the same broker.
        let (p, _) = mqtt::connect(
            &client(PUBLISHER_USER),
            ClientSettings::new("bench-baseline"),
            None,
            token.clone(),
        )
        .expect("publisher");
        p.wait_connected(Duration::from_secs(10))
            .await
            .expect("connect");
        let n = 200_000u64;
        let before = received.load(Ordering::Relaxed);
        let start = Instant::now();
        for i in 0..n {
            let obj = ValueObject {
                value: Some(Value::Int(i as i64 % 65536)),
                quality: Quality::Good,
                ts_ms: Some(nexus_common::now_ms()),
                source_ts_ms: None,
                unit: None,
            };
            p.publish(
                &format!(
                    "bench/baseline/dev-{}/t{}",
                    i % devices as u64,
                    i % tags as u64
                ),
                encode_value_object(&obj),
                qos,
                false,
            )
            .await
            .expect("publish");
        }
        while received.load(Ordering::Relaxed) - before < n
            && start.elapsed() < Duration::from_secs(60)
        {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let rate =
            (received.load(Ordering::Relaxed) - before) as f64 / start.elapsed().as_secs_f64();
        (sims, rate)
    });

    let target = (devices * tags) as f64 * 1000.0 / poll_ms as f64;
    println!(
        "gateway benchmark ({}): {devices} devices x {tags} tags, poll {poll_ms} ms, QoS {qos_n}, {seconds} s measured per run",
        if opcua { "OPC UA subscriptions" } else { "Modbus" }
    );
    println!("  target rate (every value changes every poll)  {target:>10.0} points/s");
    println!("  baseline: bare rumqttc client, same broker   {baseline_rate:>10.0} points/s");
    // The same gateway twice at the same offered rate: durable before publish (the default),
    // then with values kept in the MQTT client's memory until the broker has them.
    let mut runs = Vec::new();
    for durable in [true, false] {
        let r = run_gateway(&Run {
            dir: dir.path(),
            mqtt_port,
            qos_n,
            devices,
            tags,
            poll_ms,
            seconds,
            opcua,
            durable,
            sims: &sims,
            received: &received,
        });
        println!(
            "  -- durable_publish: {durable} --\n  gateway published                            {:>10.0} points/s ({:.2} of target, {:.2}x baseline)",
            r.rate,
            r.rate / target,
            r.rate / baseline_rate
        );
        println!(
            "  subscriber received                          {:>10.0} points/s",
            r.rx_rate
        );
        println!("  gateway CPU                                  {:>10.2} cores ({:.3} CPU s per 100K points)", r.cores, r.cpu_per_100k);
        println!(
            "  gateway RSS                                  {:>10.1} MiB (peak {:.1} MiB)",
            r.rss_mib, r.peak_mib
        );
        println!(
            "  read requests per poll                       {:>10.2} ({} tags per device)",
            r.requests_per_poll, tags
        );
        println!(
            "  polls skipped                                {:>10.0}; values buffered (broker behind) {:.0}",
            r.skipped, r.buffered
        );
        runs.push(r);
    }
    let (d, m) = (&runs[0], &runs[1]);
    println!(
        "  durable vs in memory: {:.3}x the throughput, {:+.3} cores, {:.2}x the CPU per point",
        d.rate / m.rate,
        d.cores - m.cores,
        d.cpu_per_100k / m.cpu_per_100k
    );
    token.cancel();
    drop(broker);
    drop(sims);
}

struct Run<'a> {
    dir: &'a std::path::Path,
    mqtt_port: u16,
    qos_n: u8,
    devices: usize,
    tags: usize,
    poll_ms: u64,
    seconds: u64,
    opcua: bool,
    durable: bool,
    sims: &'a Sims,
    received: &'a AtomicU64,
}

struct Figures {
    rate: f64,
    rx_rate: f64,
    cores: f64,
    cpu_per_100k: f64,
    rss_mib: f64,
    peak_mib: f64,
    requests_per_poll: f64,
    skipped: f64,
    buffered: f64,
}

/// One `nexus gateway` process polling the simulators for `r.seconds` after a warm-up.
fn run_gateway(r: &Run<'_>) -> Figures {
    // The gateway process.
    let mut yaml = format!(
        "mqtt: {{ {}, inflight: 1000 }}\ngateway:\n  qos: {}\n  heartbeat: 0s\n  workers: {}\n  buffer: {{ dir: {} }}\n  opcua: {{ pki_dir: {} }}\ntelemetry: {{ log_level: warn }}\ndevices:\n",
        support::service_mqtt_yaml(r.mqtt_port),
        r.qos_n,
        r.devices.max(10),
        r.dir.join(format!("buffer-{}", r.durable)).display(),
        r.dir.join("gateway-pki").display()
    );
    yaml.push_str(&match r.sims {
        Sims::Modbus(v) => support::load_devices(
            &v.iter().map(|s| s.addr.port()).collect::<Vec<_>>(),
            r.tags,
            r.poll_ms,
        ),
        Sims::OpcUa(v) => opcua_devices(
            &v.iter().map(|s| s.endpoint.clone()).collect::<Vec<_>>(),
            r.tags,
            r.poll_ms,
        ),
    });
    let gw_cfg = r.dir.join("gateway.yaml");
    std::fs::write(&gw_cfg, yaml).expect("write");
    let http = free_port();
    let (listen, durable) = (format!("127.0.0.1:{http}"), r.durable.to_string());
    let gw = support::start_gateway(
        &gw_cfg,
        &[
            ("NEXUS_GATEWAY__HTTP_LISTEN", &listen),
            ("NEXUS_GATEWAY__BUFFER__DURABLE_PUBLISH", &durable),
        ],
    );
    let pid = gw.0.id();
    // Warm up (OPC UA: the client certificate is made and subscriptions created first).
    std::thread::sleep(Duration::from_secs(if r.opcua { 8 } else { 3 }));
    let m0 = http_get(http, "/metrics");
    let (cpu0, rx0, t0) = (
        cpu_seconds(pid),
        r.received.load(Ordering::Relaxed),
        Instant::now(),
    );
    std::thread::sleep(Duration::from_secs(r.seconds));
    let m1 = http_get(http, "/metrics");
    let (cpu1, rx1, elapsed) = (
        cpu_seconds(pid),
        r.received.load(Ordering::Relaxed),
        t0.elapsed().as_secs_f64(),
    );
    let published = metric_sum(&m1, "nexus_gateway_points_published_total")
        - metric_sum(&m0, "nexus_gateway_points_published_total");
    let polls =
        metric_sum(&m1, "nexus_gateway_polls_total") - metric_sum(&m0, "nexus_gateway_polls_total");
    let requests = metric_sum(&m1, "nexus_gateway_read_requests_total")
        - metric_sum(&m0, "nexus_gateway_read_requests_total");
    let skipped = metric_sum(&m1, "nexus_gateway_polls_skipped_total")
        - metric_sum(&m0, "nexus_gateway_polls_skipped_total");
    let buffered = metric_sum(&m1, "nexus_gateway_points_buffered_total");
    let elapsed_cpu = cpu1 - cpu0;
    let figures = Figures {
        rate: published / elapsed,
        rx_rate: (rx1 - rx0) as f64 / elapsed,
        cores: elapsed_cpu / elapsed,
        cpu_per_100k: elapsed_cpu / (published / 100_000.0).max(1e-9),
        rss_mib: status_kib(pid, "VmRSS:") as f64 / 1024.0,
        peak_mib: status_kib(pid, "VmHWM:") as f64 / 1024.0,
        requests_per_poll: requests / polls.max(1.0),
        skipped,
        buffered,
    };
    drop(gw);
    // Let the broker deliver what the gateway left before the next run counts.
    std::thread::sleep(Duration::from_secs(2));
    figures
}
