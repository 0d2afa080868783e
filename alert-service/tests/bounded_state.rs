//! A client publishing to ever new topics through a real broker cannot grow the alert
//! service's state: the alarm instances, the per-topic rule cache and the flood-rate areas stay
//! at their configured bounds, what they drop is counted on `/metrics`, and raised alarms are
//! never what goes.

#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use nexus_common::config::Config;
use nexus_common::mqtt::{self, ClientSettings, MqttHandle, QoS};
use nexus_common::testing::{self, free_port};
use serde_json::Value;
use tokio_util::sync::CancellationToken;

struct Alerts {
    http: u16,
    token: CancellationToken,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

fn start(port: u16, root: &str, bounds: &str) -> Alerts {
    let http = free_port();
    let text = format!(
        "mqtt: {{ host: 127.0.0.1, port: {port}, username: svc, password: svc-pw, reconnect_min: 50ms }}\n\
         telemetry: {{ instance: {} }}\n\
         alerts:\n  http_listen: 127.0.0.1:{http}\n{bounds}  rules:\n    - {{ id: hot, topic: \"{root}/+/temp\", condition: {{ type: high, limit: 80 }} }}\n",
        testing::unique("alerts")
    );
    let mut cfg = Config::from_str_with_env(&text, None, &[]).unwrap_or_else(|e| panic!("{e}"));
    cfg.alerts.state_dir = testing::state_dir(&format!("bounded-{root}"));
    let token = CancellationToken::new();
    let task = tokio::spawn(nexus_alert_service::run(Arc::new(cfg), token.clone()));
    Alerts { http, token, task }
}

impl Alerts {
    async fn ready(&self) {
        let start = Instant::now();
        while testing::http(self.http, "GET", "/readyz", "").0 != 200 {
            assert!(start.elapsed() < Duration::from_secs(10), "not ready");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        // The retained alarm states are read back in the first quiet 500 ms.
        tokio::time::sleep(Duration::from_millis(800)).await;
    }

    fn metrics(&self) -> String {
        testing::http(self.http, "GET", "/metrics", "").1
    }

    fn metric(&self, sample: &str) -> f64 {
        testing::metric_value(&self.metrics(), sample).unwrap_or(-1.0)
    }

    /// Wait until `sample` reaches `want` (values are evaluated as they arrive).
    async fn wait_for(&self, sample: &str, want: f64) {
        let start = Instant::now();
        while self.metric(sample) < want {
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "{sample} stays at {} below {want}",
                self.metric(sample)
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn alarm_topics(&self) -> Vec<String> {
        let (status, body) = testing::http(self.http, "GET", "/api/v1/alarms", "");
        assert_eq!(status, 200, "{body}");
        let v: Value = serde_json::from_str(&body).unwrap();
        let mut topics: Vec<String> = v["alarms"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| a["topic"].as_str().unwrap().to_owned())
            .collect();
        topics.sort();
        topics
    }

    async fn stop(self) {
        self.token.cancel();
        tokio::time::timeout(Duration::from_secs(10), self.task)
            .await
            .expect("alerts stop")
            .unwrap()
            .unwrap();
    }
}

async fn publisher(port: u16) -> MqttHandle {
    let mut c = testing::service_mqtt_config(port);
    c.persistent_session = false;
    c.inflight = 1000;
    let (h, _rx) = mqtt::connect(
        &c,
        ClientSettings::new(testing::unique("pub")),
        None,
        CancellationToken::new(),
    )
    .unwrap();
    h.wait_connected(Duration::from_secs(10)).await.unwrap();
    h
}

async fn publish(p: &MqttHandle, topics: impl Iterator<Item = String>, value: &str) {
    for t in topics {
        p.publish(&t, format!("{{\"v\":{value}}}"), QoS::AtLeastOnce, false)
            .await
            .unwrap();
    }
}

const INSTANCES: &str = "{map=\"instances\"}";

fn m(name: &str, labels: &str) -> String {
    format!("nexus_alerts_state_{name}{labels}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_topics_cannot_grow_the_alarm_tables_or_push_out_raised_alarms() {
    let b = testing::service_broker();
    let port = b.ports.tcp().port();
    let root = testing::unique("flood");
    let svc = start(port, &root, "  max_instances: 5\n  max_areas: 2\n");
    svc.ready().await;
    let p = publisher(port).await;

    // 300 topics, normal values: the table holds 5, the rest was evicted as it came.
    publish(&p, (0..300).map(|i| format!("{root}/d{i}/temp")), "20").await;
    svc.wait_for("nexus_alerts_values_total", 300.0).await;
    assert_eq!(svc.metric(&m("size", INSTANCES)), 5.0);
    assert_eq!(svc.metric(&m("evicted_total", INSTANCES)), 295.0);
    assert_eq!(svc.metric(&m("size", "{map=\"topics\"}")), 5.0);
    assert_eq!(svc.metric(&m("evicted_total", "{map=\"topics\"}")), 295.0);

    // Five alarms, each its own operator area (the first four levels of its topic): they push
    // the idle instances out, and the flood rates keep 2 areas.
    let raised: Vec<String> = (0..5).map(|i| format!("{root}/a{i}/temp")).collect();
    publish(&p, raised.iter().cloned(), "95").await;
    svc.wait_for(&m("evicted_total", "{map=\"areas\"}"), 3.0)
        .await;
    assert_eq!(svc.alarm_topics(), raised);
    assert_eq!(svc.metric(&m("evicted_total", INSTANCES)), 300.0);
    let text = svc.metrics();
    let areas = text
        .lines()
        .filter(|l| l.starts_with("nexus_alerts_rate_10m{"))
        .count();
    assert_eq!(areas, 2, "a forgotten area's series goes too:\n{text}");
    // With alarms raised, every metric docs/alerts.md names is served.
    testing::assert_documented_metrics_served("alerts.md", &text);

    // The attack goes on with values past the limit: no room, and the raised alarms stay.
    publish(&p, (0..100).map(|i| format!("{root}/x{i}/temp")), "99").await;
    svc.wait_for("nexus_alerts_values_total", 405.0).await;
    assert_eq!(svc.metric(&m("refused_total", INSTANCES)), 100.0);
    assert_eq!(svc.metric(&m("size", INSTANCES)), 5.0);
    assert_eq!(svc.alarm_topics(), raised);
    svc.stop().await;

    // After a restart with a smaller table, the retained states read back fill it and the
    // rest are refused and counted, not dropped unseen.
    let svc = start(port, &root, "  max_instances: 3\n");
    svc.ready().await;
    svc.wait_for(&m("refused_total", INSTANCES), 2.0).await;
    assert_eq!(svc.alarm_topics().len(), 3);
    assert_eq!(svc.metric(&m("size", INSTANCES)), 3.0);
    svc.stop().await;
}
