//! Store-and-forward through a 30 s broker outage, a gateway restart while the broker is
//! down, and a devices file changed while running.

#![allow(clippy::unwrap_used)]

mod support;

use std::collections::BTreeMap;
use std::time::Duration;

use nexus_common::testing::{self, free_port};
use nexus_devices::simulator::modbus::ModbusSimulator;
use tokio_util::sync::CancellationToken;

/// A device whose `ramp` changes every 100 ms (the simulator's tick), polled every 100 ms.
fn ramp_device(port: u16, prefix: &str) -> String {
    format!(
        "devices:\n  - id: ramp-dev\n    protocol: modbus\n    uns_prefix: {prefix}\n    poll_interval: 100ms\n    connection: {{ host: 127.0.0.1, port: {port}, timeout: 500ms }}\n    tags:\n      - {{ id: ramp, address: \"HR:4\", data_type: uint16 }}\n      - {{ id: parts, address: \"HR:5\", data_type: uint32 }}\n"
    )
}

/// A simulator whose values change every 100 ms.
async fn ramp_simulator() -> ModbusSimulator {
    ModbusSimulator::start(
        "127.0.0.1:0".parse().unwrap(),
        Some(Duration::from_millis(100)),
    )
    .await
    .unwrap()
}

/// Timestamps per topic, in arrival order.
fn by_topic(got: &[(String, serde_json::Value, bool)]) -> BTreeMap<String, Vec<(i64, bool)>> {
    let mut m: BTreeMap<String, Vec<(i64, bool)>> = BTreeMap::new();
    for (t, v, retained) in got {
        if let Some(ts) = v["ts"].as_i64() {
            m.entry(t.clone()).or_default().push((ts, *retained));
        }
    }
    m
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_outage_loses_nothing() {
    let sim = ramp_simulator().await;
    let broker = support::broker();
    let mport = broker.ports.tcp().port();
    let token = CancellationToken::new();
    let root = testing::unique("outage");
    let topic = format!("{root}/ramp-dev/ramp");
    let dir = tempfile::tempdir().unwrap();
    let http = free_port();
    let mut cfg = support::config(
        mport,
        http,
        dir.path(),
        &ramp_device(sim.addr.port(), &root),
    );
    cfg.gateway.buffer.replay_rate = 200;
    let (stop, task) = support::start_gateway(cfg);
    let (_s, mut rx) = support::subscriber(mport, &[&format!("{root}/#")], &token).await;
    let before = support::collect(&mut rx, Duration::from_secs(3), Duration::from_secs(3)).await;
    assert!(
        before.len() > 10,
        "live values before the outage: {}",
        before.len()
    );

    // 30 s without a broker.
    drop(broker);
    let outage_start = nexus_common::now_ms();
    tokio::time::sleep(Duration::from_secs(30)).await;
    let outage_end = nexus_common::now_ms();
    let m = support::http_get(http, "/metrics");
    let buffered = support::metric(&m, "nexus_gateway_points_buffered_total");
    assert!(
        buffered >= 250.0,
        "about 10 values/s x 30 s buffered: {buffered}"
    );

    // The broker returns on the same port; the subscriber reconnects and resubscribes.
    let broker = support::broker_on(mport);
    let after = support::collect(&mut rx, Duration::from_secs(4), Duration::from_secs(40)).await;
    let m = support::http_get(http, "/metrics");
    assert_eq!(
        support::metric(&m, "nexus_gateway_buffer_points "),
        0.0,
        "buffer drained"
    );
    assert_eq!(
        support::metric(&m, "nexus_gateway_buffer_dropped_total"),
        0.0
    );
    let replayed = support::metric(&m, "nexus_gateway_points_replayed_total");
    assert_eq!(
        replayed,
        support::metric(&m, "nexus_gateway_points_buffered_total"),
        "everything buffered was replayed"
    );

    // Every value sampled during the outage arrived, and the backlog in order.
    let all: Vec<_> = before.iter().chain(after.iter()).cloned().collect();
    let series = by_topic(&all);
    let ramp = &series[&topic];
    let backlog: Vec<i64> = ramp
        .iter()
        .filter(|(ts, retained)| !retained && *ts >= outage_start && *ts <= outage_end)
        .map(|(ts, _)| *ts)
        .collect();
    assert!(
        backlog.windows(2).all(|w| w[0] < w[1]),
        "backlog out of order"
    );
    let mut seen: Vec<i64> = ramp.iter().map(|(ts, _)| *ts).collect();
    seen.sort_unstable();
    seen.dedup();
    let in_outage: Vec<i64> = seen
        .iter()
        .copied()
        .filter(|ts| *ts >= outage_start && *ts <= outage_end)
        .collect();
    assert!(
        in_outage.len() >= 250,
        "values from the outage: {}",
        in_outage.len()
    );
    let worst_gap = in_outage.windows(2).map(|w| w[1] - w[0]).max().unwrap_or(0);
    assert!(
        worst_gap < 1000,
        "a gap of {worst_gap} ms in the outage's values: something was lost"
    );
    stop.cancel();
    task.await.unwrap().unwrap();
    drop(broker);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_restart_during_an_outage_keeps_the_buffer() {
    let sim = ramp_simulator().await;
    let dir = tempfile::tempdir().unwrap();
    let root = testing::unique("restart");
    let dead_port = free_port(); // no broker there
    let http = free_port();
    let cfg = support::config(
        dead_port,
        http,
        dir.path(),
        &ramp_device(sim.addr.port(), &root),
    );
    let (stop, task) = support::start_gateway(cfg.clone());
    // The gateway waits 2 s for a broker before it polls into the buffer.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let buffered = support::metric(
        &support::http_get(http, "/metrics"),
        "nexus_gateway_points_buffered_total",
    );
    assert!(
        buffered >= 20.0,
        "{buffered}: {}",
        support::http_get(http, "/metrics")
            .lines()
            .filter(|l| l.starts_with("nexus_gateway"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    stop.cancel();
    task.await.unwrap().unwrap();

    // Restart with a broker now present: the buffered values are published.
    let broker = support::broker();
    let mport = broker.ports.tcp().port();
    let token = CancellationToken::new();
    let (_s, mut rx) = support::subscriber(mport, &[&format!("{root}/#")], &token).await;
    let http2 = free_port();
    let mut cfg2 = support::config(
        mport,
        http2,
        dir.path(),
        &ramp_device(sim.addr.port(), &root),
    );
    cfg2.telemetry = cfg.telemetry.clone();
    let (stop, task) = support::start_gateway(cfg2);
    let got = support::collect(&mut rx, Duration::from_secs(3), Duration::from_secs(20)).await;
    let replayed = got.iter().filter(|(_, _, retained)| !retained).count() as f64;
    assert!(
        replayed >= buffered,
        "replayed {replayed} of {buffered} buffered before the restart"
    );
    stop.cancel();
    task.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_changed_devices_file_is_applied_without_restart() {
    let sim = ModbusSimulator::start("127.0.0.1:0".parse().unwrap(), None)
        .await
        .unwrap();
    let broker = support::broker();
    let mport = broker.ports.tcp().port();
    let dir = tempfile::tempdir().unwrap();
    let root = testing::unique("reload");
    let dev = |id: &str, tag: &str| {
        format!(
            "- id: {id}\n  protocol: modbus\n  uns_prefix: {root}\n  poll_interval: 100ms\n  connection: {{ host: 127.0.0.1, port: {} }}\n  tags:\n    - {{ id: {tag}, address: \"HR:4\", data_type: uint16 }}\n",
            sim.addr.port()
        )
    };
    let devices = dir.path().join("devices.yaml");
    std::fs::write(
        &devices,
        format!("{}{}", dev("keep", "a"), dev("drop", "a")),
    )
    .unwrap();
    let main = dir.path().join("nexus.yaml");
    std::fs::write(&main, format!("mqtt: {{ host: 127.0.0.1, port: {mport}, username: svc, password: svc-pw }}\ndevices_file: devices.yaml\n")).unwrap();
    let mut cfg = nexus_common::config::Config::load_with_env(Some(&main), &[]).unwrap();
    // The users `support::http_get` logs in as.
    cfg.auth = testing::test_auth();
    let http = free_port();
    cfg.gateway.http_listen = format!("127.0.0.1:{http}").parse().unwrap();
    cfg.gateway.buffer.dir = dir.path().join("buffer");
    let (stop, task) = support::start_gateway(cfg);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let polls = |id: &str| {
        support::metric(
            &support::http_get(http, "/metrics"),
            &format!("nexus_gateway_polls_total{{device=\"{id}\",result=\"ok\"}}"),
        )
    };
    let keep_before = polls("keep");
    assert!(keep_before > 0.0);

    // The retained status of each device, as a new subscriber gets it.
    let token = CancellationToken::new();
    let statuses = |token: CancellationToken| async move {
        let (_h, mut rx) = support::subscriber(mport, &["$nexus/status/device/+"], &token).await;
        support::collect(&mut rx, Duration::from_millis(500), Duration::from_secs(3))
            .await
            .into_iter()
            .filter(|(_, _, retained)| *retained)
            .map(|(t, ..)| t)
            .collect::<Vec<String>>()
    };
    let retained = statuses(token.clone()).await;
    for id in ["keep", "drop"] {
        assert!(
            retained.iter().any(|t| t.ends_with(&format!("/{id}"))),
            "{id} has no retained status: {retained:?}"
        );
    }

    // Change the file: "drop" removed, "new" added, "keep" unchanged.
    std::fs::write(&devices, format!("{}{}", dev("keep", "a"), dev("new", "b"))).unwrap();
    let start = std::time::Instant::now();
    loop {
        let list = support::http_get(http, "/api/v1/devices");
        if list.contains("\"id\":\"new\"") && !list.contains("\"id\":\"drop\"") {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "not reloaded: {list}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // The removed device's retained status is cleared; the kept one's stays.
    let start = std::time::Instant::now();
    loop {
        let retained = statuses(token.clone()).await;
        if !retained.iter().any(|t| t.ends_with("/drop")) {
            assert!(
                retained.iter().any(|t| t.ends_with("/keep")),
                "{retained:?}"
            );
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "the removed device's status stays retained: {retained:?}"
        );
    }
    token.cancel();
    // "keep" was not restarted: its live counters continued from before.
    let list = support::http_get(http, "/api/v1/devices");
    let v: serde_json::Value = serde_json::from_str(&list).unwrap();
    let keep = v["devices"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["id"] == "keep")
        .unwrap();
    assert!(
        keep["status"]["polls_ok"].as_f64().unwrap() >= keep_before,
        "{keep}"
    );

    // A broken file is refused and the devices keep running.
    std::fs::write(&devices, "- id: bad\n  protocol: modbus\n").unwrap();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let list = support::http_get(http, "/api/v1/devices");
    assert!(
        list.contains("\"id\":\"keep\"") && list.contains("\"id\":\"new\""),
        "{list}"
    );
    stop.cancel();
    task.await.unwrap().unwrap();
}

/// A crash that tore the buffer's last write: the gateway starts, replays the whole records
/// before the tear, and counts the torn one in `nexus_gateway_buffer_lost_total`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_torn_buffer_is_replayed_up_to_the_tear_and_the_loss_counted() {
    use nexus_protocol_gateway::buffer::{DiskBuffer, Record};
    use std::io::Write;
    let dir = tempfile::tempdir().unwrap();
    let root = testing::unique("torn");
    {
        let mut b = DiskBuffer::open(&dir.path().join("buffer"), 1024 * 1024).unwrap();
        let recs: Vec<Record> = (0..3)
            .map(|i| Record {
                topic: format!("{root}/dev/t{i}"),
                payload: format!("{{\"v\":{i},\"q\":\"good\",\"ts\":1}}").into_bytes(),
            })
            .collect();
        b.append(&recs).unwrap();
    }
    let seg = std::fs::read_dir(dir.path().join("buffer"))
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|x| x == "seg"))
        .unwrap();
    // Part of a record: the buffer's magic, a header that promises 40 bytes, 2 of them.
    let mut f = std::fs::OpenOptions::new().append(true).open(&seg).unwrap();
    f.write_all(b"NXB2").unwrap();
    f.write_all(&[40, 0, 0, 0, 1, 2, 3, 4, 9, 9]).unwrap();
    drop(f);

    let broker = support::broker();
    let mport = broker.ports.tcp().port();
    let token = CancellationToken::new();
    let (_s, mut rx) = support::subscriber(mport, &[&format!("{root}/#")], &token).await;
    let http = free_port();
    let cfg = support::config(mport, http, dir.path(), "gateway:\n  heartbeat: 0s\n");
    let (stop, task) = support::start_gateway(cfg);
    let got = support::collect(&mut rx, Duration::from_secs(3), Duration::from_secs(10)).await;
    let mut topics: Vec<&str> = got.iter().map(|(t, _, _)| t.as_str()).collect();
    topics.sort_unstable();
    let want: Vec<String> = (0..3).map(|i| format!("{root}/dev/t{i}")).collect();
    assert_eq!(topics, want.iter().map(String::as_str).collect::<Vec<_>>());
    let m = support::http_get(http, "/metrics");
    assert_eq!(
        support::metric(&m, "nexus_gateway_buffer_lost_total"),
        1.0,
        "{m}"
    );
    stop.cancel();
    task.await.unwrap().unwrap();
    token.cancel();
}

/// The disk under the live log and the buffer fills up: the gateway says so (readiness with
/// the reason, `nexus_gateway_disk_failing`) and keeps publishing every value from memory;
/// when space returns, it writes durably again. No value goes missing on the way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_is_reported_and_every_value_still_published() {
    let sim = ramp_simulator().await;
    let broker = support::broker();
    let mport = broker.ports.tcp().port();
    let token = CancellationToken::new();
    let root = testing::unique("diskfull");
    let disk = testing::SmallDisk::mount("4m");
    let http = free_port();
    let cfg = support::config(
        mport,
        http,
        disk.path(),
        &ramp_device(sim.addr.port(), &root),
    );
    let (stop, task) = support::start_gateway(cfg);
    let (_s, mut rx) = support::subscriber(mport, &[&format!("{root}/#")], &token).await;
    let mut got = support::collect(&mut rx, Duration::from_secs(2), Duration::from_secs(2)).await;
    assert!(got.len() > 10, "values before: {}", got.len());
    let metric = |name: &str| support::metric(&support::http_get(http, "/metrics"), name);

    // Collect for up to 20 s until `done`, or fail with `what`.
    async fn until(
        rx: &mut tokio::sync::mpsc::Receiver<nexus_common::mqtt::Message>,
        got: &mut Vec<(String, serde_json::Value, bool)>,
        done: impl Fn() -> bool,
        what: &str,
    ) {
        let waited = std::time::Instant::now();
        while !done() {
            assert!(waited.elapsed() < Duration::from_secs(20), "{what}");
            got.extend(
                support::collect(rx, Duration::from_millis(200), Duration::from_millis(200)).await,
            );
        }
    }

    disk.fill();
    until(
        &mut rx,
        &mut got,
        || metric("nexus_gateway_disk_failing") == 1.0,
        "the full disk was never noticed",
    )
    .await;
    let (status, body) = testing::http(http, "GET", "/readyz", "");
    assert_eq!(status, 503, "{body}");
    assert!(
        body.contains("disk_writable") && body.contains("cannot be written"),
        "{body}"
    );
    let during = support::collect(&mut rx, Duration::from_secs(3), Duration::from_secs(3)).await;
    assert!(
        during.len() > 10,
        "published while the disk is full: {}",
        during.len()
    );
    got.extend(during);

    disk.free();
    until(
        &mut rx,
        &mut got,
        || {
            metric("nexus_gateway_disk_failing") == 0.0
                && testing::http(http, "GET", "/readyz", "").0 == 200
        },
        "never writable again",
    )
    .await;
    got.extend(support::collect(&mut rx, Duration::from_secs(2), Duration::from_secs(2)).await);
    // The ramp changes every 100 ms and is polled every 100 ms: no stretch without a value.
    let ramp = &by_topic(&got)[&format!("{root}/ramp-dev/ramp")];
    let mut ts: Vec<i64> = ramp.iter().map(|(t, _)| *t).collect();
    ts.sort_unstable();
    let gap = ts.windows(2).map(|w| w[1] - w[0]).max().unwrap_or(0);
    assert!(
        gap < 1000,
        "a {gap} ms stretch without a value; {} values",
        ts.len()
    );
    assert!(metric("nexus_gateway_live_log_errors_total") >= 1.0);
    assert_eq!(metric("nexus_gateway_buffer_dropped_total"), 0.0);
    stop.cancel();
    let _ = task.await;
}
