//! Rules on Sparkplug B metrics through a real broker: a rule's topic names a metric as
//! ingestion stores it, `spBv1.0/<group>/<edge node>/<device>/<metric>`; data by alias is
//! named through the births, raises and clears the alarm; a historical value is not taken as
//! current; an alias no birth announced is counted and the node asked for a rebirth.

#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use nexus_common::codec::sparkplug::{self, SpDataType, SpMetric, SpPayload};
use nexus_common::config::{Config, Secret};
use nexus_common::mqtt::{self, ClientSettings, Message, MqttHandle, QoS};
use nexus_common::testing::{self, free_port};
use nexus_common::Value;
use tokio::sync::mpsc::Receiver;
use tokio_util::sync::CancellationToken;

async fn connect(
    mut c: nexus_common::config::MqttConfig,
    subs: &[&str],
) -> (MqttHandle, Receiver<Message>) {
    c.persistent_session = false;
    let mut s = ClientSettings::new(testing::unique("spb"));
    s.subscriptions = subs
        .iter()
        .map(|f| (f.to_string(), QoS::AtLeastOnce))
        .collect();
    let (h, rx) = mqtt::connect(&c, s, None, CancellationToken::new()).unwrap();
    h.wait_connected(Duration::from_secs(10)).await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    (h, rx)
}

/// The next retained state of `topic`, as JSON, whose `state` is `want`.
async fn state(rx: &mut Receiver<Message>, topic: &str, want: &str) -> serde_json::Value {
    let end = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        match tokio::time::timeout_at(end, rx.recv()).await {
            Ok(Some(m)) if m.topic() == Some(topic) && !m.payload().is_empty() => {
                let s: serde_json::Value = serde_json::from_slice(m.payload()).unwrap();
                if s["state"] == want {
                    return s;
                }
            }
            Ok(Some(_)) => continue,
            _ => panic!("no {want} state on {topic}"),
        }
    }
}

fn payload(metrics: Vec<SpMetric>) -> Vec<u8> {
    sparkplug::encode(&SpPayload {
        timestamp: Some(nexus_common::now_ms() as u64),
        seq: Some(0),
        metrics,
    })
    .unwrap()
}

fn by_alias(alias: u64, v: f64, historical: bool) -> SpMetric {
    SpMetric {
        alias: Some(alias),
        timestamp: Some(nexus_common::now_ms() as u64),
        datatype: Some(SpDataType::Double),
        value: Some(Value::Float(v)),
        historical,
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rule_on_a_sparkplug_metric_raises_and_clears_its_alarm() {
    let b = testing::service_broker();
    let port = b.ports.tcp().port();
    let g = testing::unique("G");
    let http = free_port();
    let text = format!(
        "mqtt: {{ host: 127.0.0.1, port: {port}, username: svc, password: svc-pw, reconnect_min: 50ms }}\n\
         telemetry: {{ instance: alerts-spb }}\n\
         alerts:\n\
         \x20 http_listen: 127.0.0.1:{http}\n\
         \x20 rules:\n\
         \x20   - {{ id: hot, topic: \"spBv1.0/{g}/edge/plc/temp\", condition: {{ type: high, limit: 80, deadband: 1 }} }}\n"
    );
    let mut cfg = Config::from_str_with_env(&text, None, &[]).unwrap_or_else(|e| panic!("{e}"));
    cfg.auth = testing::test_auth();
    cfg.alerts.state_dir = testing::state_dir(&format!("spb-{g}"));
    let token = CancellationToken::new();
    let task = tokio::spawn(nexus_alert_service::run(Arc::new(cfg), token.clone()));
    let start = Instant::now();
    while testing::http(http, "GET", "/readyz", "").0 != 200 {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "alerts not ready"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(800)).await; // the restore window
    let malformed = |reason: &str| {
        let text = testing::http(http, "GET", "/metrics", "").1;
        testing::metric_value(
            &text,
            &format!("nexus_alerts_malformed_total{{reason=\"{reason}\"}}"),
        )
        .unwrap_or(-1.0)
    };
    assert_eq!(
        malformed("unknown_alias"),
        0.0,
        "the series exists from the start"
    );

    let mut op = testing::mqtt_config(port);
    op.username = Some("op".into());
    op.password = Some(Secret::new("op-pw".to_owned()));
    let alarm = format!("$nexus/alarms/spBv1.0/{g}/edge/plc/temp/hot");
    let (_op, mut rx) = connect(
        op,
        &[
            &format!("$nexus/alarms/spBv1.0/{g}/#"),
            &format!("spBv1.0/{g}/NCMD/#"),
        ],
    )
    .await;
    let (p, _) = connect(testing::publisher_mqtt_config(port), &[]).await;
    let send = |topic: String, body: Vec<u8>| {
        let p = p.clone();
        async move {
            p.publish(&topic, body, QoS::AtLeastOnce, false)
                .await
                .unwrap()
        }
    };

    // Births name alias 1 `temp`; data by alias then raises the alarm.
    send(format!("spBv1.0/{g}/NBIRTH/edge"), payload(vec![])).await;
    let birth = SpMetric {
        name: Some("temp".into()),
        alias: Some(1),
        timestamp: Some(nexus_common::now_ms() as u64),
        datatype: Some(SpDataType::Double),
        value: Some(Value::Float(20.0)),
        ..Default::default()
    };
    send(format!("spBv1.0/{g}/DBIRTH/edge/plc"), payload(vec![birth])).await;
    send(
        format!("spBv1.0/{g}/DDATA/edge/plc"),
        payload(vec![by_alias(1, 95.0, false)]),
    )
    .await;
    let s = state(&mut rx, &alarm, "active_unacked").await;
    assert_eq!(s["value"], 95.0);

    // Back to normal: the alarm clears (returned unacknowledged).
    send(
        format!("spBv1.0/{g}/DDATA/edge/plc"),
        payload(vec![by_alias(1, 60.0, false)]),
    )
    .await;
    state(&mut rx, &alarm, "rtn_unacked").await;

    // A historical 99 (store-and-forward) is not the current value: no alarm.
    send(
        format!("spBv1.0/{g}/DDATA/edge/plc"),
        payload(vec![by_alias(1, 99.0, true)]),
    )
    .await;
    let end = tokio::time::Instant::now() + Duration::from_millis(1500);
    while let Ok(Some(m)) = tokio::time::timeout_at(end, rx.recv()).await {
        if m.topic() == Some(alarm.as_str()) {
            let s: serde_json::Value = serde_json::from_slice(m.payload()).unwrap_or_default();
            assert_ne!(
                s["state"], "active_unacked",
                "a historical value raised the alarm: {s}"
            );
        }
    }

    // An alias no birth announced: counted, and the node is asked for a rebirth.
    send(
        format!("spBv1.0/{g}/DDATA/edge/plc"),
        payload(vec![by_alias(7, 1.0, false)]),
    )
    .await;
    let end = tokio::time::Instant::now() + Duration::from_secs(10);
    let ncmd = format!("spBv1.0/{g}/NCMD/edge");
    loop {
        let m = tokio::time::timeout_at(end, rx.recv())
            .await
            .expect("a rebirth request within 10 s")
            .unwrap();
        if m.topic() == Some(ncmd.as_str()) {
            let p = sparkplug::decode(m.payload()).unwrap();
            assert_eq!(p.metrics[0].name.as_deref(), Some("Node Control/Rebirth"));
            assert_eq!(p.metrics[0].value, Some(Value::Bool(true)));
            break;
        }
    }
    assert_eq!(malformed("unknown_alias"), 1.0);
    token.cancel();
    task.await.unwrap().unwrap();
}
