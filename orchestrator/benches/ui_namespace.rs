//! Control center benchmark: the namespace browser (orchestrator/ui/pages/namespace.js) with
//! 10,000 topics, each changing once a second.
//!
//! In this process: the embedded broker and the orchestrator service (its live namespace and
//! the control center's files). The bench publishes 10,000 retained topics
//! (`bench/area-NN/line-NN/tag-NNN`), then `ui_namespace.py` drives headless Chromium
//! (Playwright from target/test-venv) and measures:
//!
//! - the time from navigation to the 10,000-topic tree drawn, then to "Expand all" drawn;
//! - while this process publishes every topic once a second (10,000 messages/s, each value
//!   the publication's unix milliseconds, so the page can tell how late it shows one): frame
//!   intervals, long tasks, the lag from publication to the value in the page, the page's
//!   main-thread time and the browser's CPU time, for a bare consumer of the same stream
//!   (parse, keep the latest entry per topic) as the baseline, then for the tree (expanded, at
//!   rest and while scrolling).
//!
//! The script asks for each period of updates with a line `UPDATES <phase>` on its stdout;
//! this process publishes for the period and answers `DONE` on its stdin.
//!
//! `cargo bench -p nexus-orchestrator --bench ui_namespace` (BENCH_TOPICS, BENCH_SECONDS).
//! Needs /usr/bin/chromium and playwright in target/test-venv (scripts/test.sh); without them
//! it says so and measures nothing.

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nexus_common::config::Config;
use nexus_common::mqtt::{self, ClientSettings, MqttHandle, QoS};
use nexus_common::telemetry::Telemetry;
use nexus_common::testing::{self, free_port, SERVICE_USER};
use nexus_orchestrator::{live, status};
use serde_json::json;
use support::{cpu_seconds, env, metric_sum, Proc};
use tokio_util::sync::CancellationToken;

mod support;

const CHROMIUM: &str = "/usr/bin/chromium";

fn topic(i: usize) -> String {
    format!(
        "bench/area-{:02}/line-{:02}/tag-{:03}",
        i / 1000,
        i / 100 % 10,
        i % 100
    )
}

fn now_ms() -> i64 {
    nexus_common::now_ms()
}

fn payload(i: usize, ts: i64) -> String {
    // The value is the publication's time: the page measures how late it shows it.
    format!(
        "{{\"v\":{ts},\"q\":\"{}\",\"u\":\"ms\",\"ts\":{ts}}}",
        if i.is_multiple_of(97) { "bad" } else { "good" }
    )
}

/// Publish every topic once a second for `seconds`, in 10 slices a second (topic `i` in slice
/// `i % 10`, so the rows on screen are spread over the second as the whole namespace is, and
/// their lag is not that of one slice against the 250 ms batches); the messages published
/// and the seconds it took.
async fn updates(publisher: &MqttHandle, topics: usize, seconds: u64) -> (usize, f64) {
    let start = Instant::now();
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let mut sent = 0;
    for round in 0..seconds * 10 {
        tick.tick().await;
        let ts = now_ms();
        for i in (round as usize % 10..topics).step_by(10) {
            publisher
                .publish(&topic(i), payload(i, ts), QoS::AtMostOnce, true)
                .await
                .expect("publish");
            sent += 1;
        }
    }
    (sent, start.elapsed().as_secs_f64())
}

fn browser_missing(python: &str) -> Option<String> {
    if !std::path::Path::new(CHROMIUM).exists() {
        return Some(format!("{CHROMIUM} is missing (scripts/deps.sh)"));
    }
    let ok = Command::new(python)
        .args(["-c", "import playwright.sync_api"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    (!ok).then(|| format!("playwright is not installed for {python} (scripts/test.sh)"))
}

fn main() {
    let python = testing::test_python();
    if let Some(why) = browser_missing(&python) {
        println!("ui_namespace: SKIPPED, {why}");
        return;
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(run(&python));
}

async fn run(python: &str) {
    let topics = env("BENCH_TOPICS", 10_000) as usize;
    let seconds = env("BENCH_SECONDS", 10);
    let broker = testing::service_broker();
    let mqtt_port = broker.ports.tcp().port();
    let http = free_port();
    // No `auth`: a browser on 127.0.0.1 is an anonymous viewer (the default), as on an edge box.
    let text = format!(
        "mqtt: {{ host: 127.0.0.1, port: {mqtt_port}, username: {} }}\n\
         orchestrator: {{ http_listen: 127.0.0.1:{http} }}\n\
         telemetry: {{ instance: ui-bench }}\n",
        SERVICE_USER.0
    );
    let cfg = Config::from_str_with_env(
        &text,
        None,
        &[("NEXUS_MQTT__PASSWORD".into(), SERVICE_USER.1.into())],
    )
    .expect("config");
    let stop = CancellationToken::new();
    let telemetry = Telemetry::new(status::SERVICE);
    let ns = live::Namespace::new(&telemetry.registry).expect("namespace");
    tokio::spawn(status::run_with(
        Arc::new(cfg),
        telemetry,
        json!({}),
        ns,
        stop.clone(),
    ));
    let started = Instant::now();
    while testing::http(http, "GET", "/healthz", "").0 != 200 {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "no orchestrator"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let (publisher, _) = mqtt::connect(
        &testing::publisher_mqtt_config(mqtt_port),
        ClientSettings::new(testing::unique("ui-bench")),
        None,
        stop.clone(),
    )
    .expect("publisher");
    publisher
        .wait_connected(Duration::from_secs(10))
        .await
        .expect("publisher connects");
    let ts = now_ms();
    for i in 0..topics {
        publisher
            .publish(&topic(i), payload(i, ts), QoS::AtMostOnce, true)
            .await
            .expect("publish");
    }
    let started = Instant::now();
    loop {
        let (status, body) = testing::http(http, "GET", "/api/v1/namespace?filter=bench/%23", "");
        let n = serde_json::from_str::<serde_json::Value>(&body)
            .ok()
            .and_then(|v| v.as_array().map(Vec::len))
            .unwrap_or(0);
        if status == 200 && n == topics {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "the namespace holds {n} of {topics} topics ({status})"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    println!(
        "ui_namespace: {topics} topics in the live namespace; {seconds} s of updates per phase"
    );

    let mut child = Proc(
        Command::new(python)
            .arg(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/benches/ui_namespace.py"
            ))
            .args(["--url", &format!("http://127.0.0.1:{http}")])
            .args(["--topics", &topics.to_string()])
            .args(["--chromium", CHROMIUM])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("python"),
    );
    let mut to_script = child.0.stdin.take().expect("stdin");
    let (tx, mut lines) = tokio::sync::mpsc::unbounded_channel();
    let out = child.0.stdout.take().expect("stdout");
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let me = std::process::id();
    while let Some(line) = lines.recv().await {
        let Some(phase) = line.strip_prefix("UPDATES ") else {
            println!("{line}");
            continue;
        };
        let metrics = |p| metric_sum(&testing::http(http, "GET", "/metrics", "").1, p);
        let resyncs = metrics("nexus_orchestrator_stream_resyncs_total");
        let cpu = cpu_seconds(me);
        let (sent, took) = updates(&publisher, topics, seconds).await;
        let cpu = cpu_seconds(me) - cpu;
        // The last batch reaches the page within a batch interval.
        tokio::time::sleep(Duration::from_millis(600)).await;
        println!(
            "  [{phase}] published {sent} updates in {took:.1} s ({:.0}/s); broker + orchestrator \
             CPU {:.0}% of a core; streams resynced (too slow for the batches): {}",
            sent as f64 / took,
            cpu / took * 100.0,
            metrics("nexus_orchestrator_stream_resyncs_total") - resyncs
        );
        if writeln!(to_script, "DONE").is_err() {
            break;
        }
    }
    let status = child.0.wait().expect("python");
    stop.cancel();
    assert!(status.success(), "ui_namespace.py failed: {status}");
}
