//! Alert service end to end: `nexus alerts` (its own process, 1,000 rules over 10,000 topics)
//! evaluates values published through `nexus broker` by a client in this process; about 1% of
//! the values cross a limit (each an alarm raised and cleared, two retained publishes each). Reports the
//! values/s the service evaluated and, as the baseline measured in the same run, the rate a
//! bare subscriber receives the same stream at through the same broker. The values come from
//! a `publisher`, the service logs in as the service account, the subscriber as a `viewer`.
//!
//! `cargo bench -p nexus-orchestrator --bench alerts`; BENCH_VALUES (300,000), BENCH_QOS (0).

use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nexus_common::config::MqttVersion;
use nexus_common::mqtt::{self, ClientSettings, QoS};
use nexus_common::testing::{free_port, PUBLISHER_USER, VIEWER_USER};
use support::{cpu_seconds, env, http_get, metric_sum, mqtt_as, Proc, NEXUS};
use tokio_util::sync::CancellationToken;

mod support;

fn main() {
    let n = env("BENCH_VALUES", 300_000);
    let qos = if env("BENCH_QOS", 0) == 1 {
        QoS::AtLeastOnce
    } else {
        QoS::AtMostOnce
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let dir = tempfile::tempdir().expect("tempdir");
    let (_broker, port) = support::start_broker_with(dir.path(), support::QUEUES_HOLD_THE_RUN);
    let http = free_port();
    let mut yaml = format!(
        "mqtt: {{ {} }}\ntelemetry: {{ log_level: warn, instance: bench }}\nalerts:\n  http_listen: 127.0.0.1:{http}\n  rules:\n",
        support::service_mqtt_yaml(port)
    );
    for k in 0..1000 {
        yaml.push_str(&format!("    - {{ id: r{k}, topic: \"acme/+/+/line{}/dev{}/+\", condition: {{ type: high, limit: 90, deadband: 1 }} }}\n", k % 10, k / 10));
    }
    let cfg = dir.path().join("alerts.yaml");
    std::fs::write(&cfg, yaml).expect("write");
    let alerts = Proc(
        Command::new(NEXUS)
            .args(["alerts", "--config"])
            .arg(&cfg)
            .stdout(Stdio::null())
            .spawn()
            .expect("nexus alerts"),
    );
    let pid = alerts.0.id();
    std::thread::sleep(Duration::from_secs(3));

    let token = CancellationToken::new();
    let topics: Vec<String> = (0..10_000)
        .map(|i| {
            format!(
                "acme/site/area/line{}/dev{}/tag{}",
                (i / 10) % 10,
                i / 100,
                i % 10
            )
        })
        .collect();
    let (baseline, evaluated, cpu) = rt.block_on(async {
        let client = |user| {
            let mut c = mqtt_as(port, Some(user));
            c.version = MqttVersion::V311;
            c.persistent_session = false;
            c.inflight = 1000;
            c
        };
        let received = Arc::new(AtomicU64::new(0));
        let mut s = ClientSettings::new("bench-alerts-sub");
        s.subscriptions = vec![("acme/#".into(), qos)];
        s.incoming_capacity = 100_000;
        let (_sub, mut rx) =
            mqtt::connect(&client(VIEWER_USER), s, None, token.clone()).expect("sub");
        let r = received.clone();
        tokio::spawn(async move {
            while rx.recv().await.is_some() {
                r.fetch_add(1, Ordering::Relaxed);
            }
        });
        let (p, _) = mqtt::connect(
            &client(PUBLISHER_USER),
            ClientSettings::new("bench-alerts-pub"),
            None,
            token.clone(),
        )
        .expect("pub");
        p.wait_connected(Duration::from_secs(10))
            .await
            .expect("connect");
        tokio::time::sleep(Duration::from_millis(500)).await;
        let m0 = http_get(http, "/metrics");
        let cpu0 = cpu_seconds(pid);
        let start = Instant::now();
        for i in 0..n as usize {
            // Mostly normal values; about 1 in 100 crosses the limit (and clears on the next).
            let v = if (i * 7919) % 100 == 0 {
                95
            } else {
                60 + i % 20
            };
            p.publish(
                &topics[i % topics.len()],
                format!("{{\"v\":{v},\"q\":\"good\",\"ts\":{i}}}"),
                qos,
                false,
            )
            .await
            .expect("publish");
        }
        // Until both the subscriber and the service have seen everything (or stopped moving).
        let mut last = 0.0;
        let mut still = 0;
        loop {
            tokio::time::sleep(Duration::from_millis(200)).await;
            let done = metric_sum(&http_get(http, "/metrics"), "nexus_alerts_values_total")
                - metric_sum(&m0, "nexus_alerts_values_total");
            if (done >= n as f64 && received.load(Ordering::Relaxed) >= n) || still > 10 {
                break;
            }
            still = if done == last { still + 1 } else { 0 };
            last = done;
        }
        let elapsed = start.elapsed().as_secs_f64();
        let evaluated = metric_sum(&http_get(http, "/metrics"), "nexus_alerts_values_total")
            - metric_sum(&m0, "nexus_alerts_values_total");
        (
            received.load(Ordering::Relaxed) as f64 / elapsed,
            evaluated / elapsed,
            (cpu_seconds(pid) - cpu0) / elapsed,
        )
    });
    println!(
        "alert service end to end: {n} values over 10,000 topics, 1,000 rules, QoS {}",
        if qos == QoS::AtMostOnce { 0 } else { 1 }
    );
    println!("  alert service evaluated          {evaluated:>10.0} values/s ({cpu:.2} cores)");
    println!("  baseline: bare subscriber        {baseline:>10.0} values/s");
    println!(
        "  alerts / baseline                {:>10.2}x; goal >= 100,000 values/s: {}",
        evaluated / baseline,
        if evaluated >= 100_000.0 {
            "met"
        } else {
            "not met"
        }
    );
    drop(alerts);
    token.cancel();
}
