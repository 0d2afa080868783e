//! A requester sending commands with ever new request ids through a real broker cannot grow
//! the command handler's duplicate table: it stays at `commands.dedup_max_entries`, the oldest
//! answers are evicted and counted, and recent request ids are still answered from their first
//! result.

#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use nexus_common::config::Config;
use nexus_common::mqtt::{self, ClientSettings, QoS};
use nexus_common::testing::{self, free_port};
use tokio_util::sync::CancellationToken;

fn metric(http: u16, sample: &str) -> f64 {
    let text = testing::http(http, "GET", "/metrics", "").1;
    testing::metric_value(&text, sample).unwrap_or(-1.0)
}

/// Wait until `sample` reaches `want` (commands run as they arrive).
async fn wait_for(http: u16, sample: &str, want: f64) {
    let start = Instant::now();
    while metric(http, sample) < want {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "{sample} stays at {} below {want}",
            metric(http, sample)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_request_ids_cannot_grow_the_duplicate_table() {
    let b = testing::service_broker();
    let port = b.ports.tcp().port();
    let http = free_port();
    let dir = tempfile::tempdir().unwrap();
    let text = format!(
        "mqtt: {{ host: 127.0.0.1, port: {port}, username: svc, password: svc-pw, reconnect_min: 50ms }}\n\
         telemetry: {{ instance: {} }}\n\
         commands:\n  http_listen: 127.0.0.1:{http}\n  dedup_max_entries: 20\n  max_in_flight: 1\n  journal_dir: {}\n",
        testing::unique("cmd"),
        dir.path().display()
    );
    let cfg = Config::from_str_with_env(&text, None, &[]).unwrap_or_else(|e| panic!("{e}"));
    let token = CancellationToken::new();
    let task = tokio::spawn(nexus_command_handler::run(Arc::new(cfg), token.clone()));
    let start = Instant::now();
    while !testing::http(http, "GET", "/readyz", "")
        .1
        .contains("\"ready\":true")
    {
        assert!(start.elapsed() < Duration::from_secs(10), "not ready");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;

    let mut c = testing::service_mqtt_config(port);
    c.persistent_session = false;
    c.inflight = 1000;
    let (p, _rx) = mqtt::connect(
        &c,
        ClientSettings::new(testing::unique("requester")),
        None,
        CancellationToken::new(),
    )
    .unwrap();
    p.wait_connected(Duration::from_secs(10)).await.unwrap();
    let send = |id: String| {
        let p = p.clone();
        async move {
            let body = format!(r#"{{"value":1,"request_id":"{id}"}}"#);
            p.publish("$nexus/cmd/plc/sp/set", body, QoS::AtLeastOnce, false)
                .await
                .unwrap();
        }
    };

    // 300 request ids, each answered (the device is unknown) and remembered for 60 s: the
    // table keeps the last 20. One command runs at a time, so each new id evicts exactly one
    // answer (with commands running at once, a new id finds the table full of runs it may not
    // evict, and runs unprotected: counted as refused).
    for i in 0..300 {
        send(format!("r{i}")).await;
    }
    let refused = "nexus_commands_rejected_total{reason=\"unknown_device\"}";
    wait_for(http, refused, 300.0).await;
    assert_eq!(
        metric(http, "nexus_commands_state_size{map=\"dedup\"}"),
        20.0
    );
    assert_eq!(
        metric(http, "nexus_commands_state_evicted_total{map=\"dedup\"}"),
        280.0
    );
    assert_eq!(
        metric(http, "nexus_commands_state_refused_total{map=\"dedup\"}"),
        0.0
    );

    // A recent id is still a duplicate; an evicted one runs again.
    send("recent".into()).await;
    wait_for(http, refused, 301.0).await;
    send("recent".into()).await;
    wait_for(
        http,
        "nexus_commands_rejected_total{reason=\"duplicate\"}",
        1.0,
    )
    .await;
    send("r0".into()).await;
    wait_for(http, refused, 302.0).await;
    assert_eq!(
        metric(http, "nexus_commands_rejected_total{reason=\"duplicate\"}"),
        1.0
    );
    assert_eq!(
        metric(http, "nexus_commands_state_size{map=\"dedup\"}"),
        20.0
    );
    let text = testing::http(http, "GET", "/metrics", "").1;
    testing::assert_documented_metrics_served("commands.md", &text);

    token.cancel();
    tokio::time::timeout(Duration::from_secs(10), task)
        .await
        .expect("handler stops")
        .unwrap()
        .unwrap();
}
