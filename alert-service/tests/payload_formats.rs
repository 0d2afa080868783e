//! Payloads of other publishers through a real broker: a bare `42` and `false`, UMH Classic
//! (values on topics below the message's) and UMH Core through `auto`, and a JSON-pointer
//! mapping raise alarms like value objects do; garbage is counted by reason. Sparkplug B: a
//! rule's topic names a metric as ingestion stores it,
//! `spBv1.0/<group>/<edge node>/<device>/<metric>`; data by alias is named through the
//! births, raises and clears the alarm; a historical value is not taken as current; an alias
//! no birth announced is counted and the node asked for a rebirth.

#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use nexus_common::codec::sparkplug::{self, SpDataType, SpMetric, SpPayload};
use nexus_common::config::{Config, Secret};
use nexus_common::mqtt::{self, ClientSettings, Message, MqttHandle, QoS};
use nexus_common::testing::{self, free_port};
use nexus_common::Value as SpValue;
use serde_json::Value;
use tokio::sync::mpsc::Receiver;
use tokio_util::sync::CancellationToken;

async fn connect(
    mut c: nexus_common::config::MqttConfig,
    subs: &[&str],
) -> (MqttHandle, Receiver<Message>) {
    c.persistent_session = false;
    let mut s = ClientSettings::new(testing::unique("payloads"));
    s.subscriptions = subs
        .iter()
        .map(|f| (f.to_string(), QoS::AtLeastOnce))
        .collect();
    let (h, rx) = mqtt::connect(&c, s, None, CancellationToken::new()).unwrap();
    h.wait_connected(Duration::from_secs(10)).await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    (h, rx)
}

/// The next retained state of `state_topic`, as JSON, whose `state` is `want`.
async fn state(rx: &mut Receiver<Message>, state_topic: &str, want: &str) -> Value {
    let end = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        match tokio::time::timeout_at(end, rx.recv()).await {
            Ok(Some(m)) if m.topic() == Some(state_topic) && !m.payload().is_empty() => {
                let s: Value = serde_json::from_slice(m.payload()).unwrap();
                if s["state"] == want {
                    return s;
                }
            }
            Ok(Some(_)) => continue,
            _ => panic!("no {want} state on {state_topic}"),
        }
    }
}

/// The next retained state of `state_topic` that is active, as JSON.
async fn active(rx: &mut Receiver<Message>, state_topic: &str) -> Value {
    state(rx, state_topic, "active_unacked").await
}

/// The alert service in this process with `rules` (items of `alerts.rules`) and `extra`
/// top-level YAML; its HTTP port, stop token and task, once it is ready and past its restore
/// window.
async fn start_alerts(
    port: u16,
    name: &str,
    extra: &str,
    rules: &str,
) -> (
    u16,
    CancellationToken,
    tokio::task::JoinHandle<anyhow::Result<()>>,
) {
    let http = free_port();
    let text = format!(
        "mqtt: {{ host: 127.0.0.1, port: {port}, username: svc, password: svc-pw, reconnect_min: 50ms }}\n\
         telemetry: {{ instance: alerts-{name} }}\n{extra}\
         alerts:\n\
         \x20 http_listen: 127.0.0.1:{http}\n\
         \x20 rules:\n{rules}"
    );
    let mut cfg = Config::from_str_with_env(&text, None, &[]).unwrap_or_else(|e| panic!("{e}"));
    cfg.auth = testing::test_auth();
    cfg.alerts.state_dir = testing::state_dir(&format!("{name}-{}", testing::unique("a")));
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
    (http, token, task)
}

fn metric(http: u16, sample: &str) -> f64 {
    let text = testing::http(http, "GET", "/metrics", "").1;
    testing::metric_value(&text, sample).unwrap_or(-1.0)
}

async fn wait_metric(http: u16, sample: &str, want: f64) -> f64 {
    let start = Instant::now();
    loop {
        let v = metric(http, sample);
        if v >= want || start.elapsed() > Duration::from_secs(10) {
            return v;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bare_umh_and_mapped_payloads_raise_alarms_and_garbage_is_counted() {
    let b = testing::service_broker();
    let port = b.ports.tcp().port();
    let root = testing::unique("pf");
    let payloads = format!(
        "payloads:\n\
         \x20 max_values: 100\n\
         \x20 rules:\n\
         \x20   - {{ filter: \"{root}/bare/#\", format: scalar }}\n\
         \x20   - {{ filter: \"{root}/umh/#\", format: umh }}\n\
         \x20   - {{ filter: \"{root}/core/#\", format: auto }}\n\
         \x20   - {{ filter: \"{root}/vendor/#\", format: mapping, value: /data/value, timestamp: /data/time, timestamp_unit: s, quality: /data/status }}\n"
    );
    let rules = format!(
        "\x20   - {{ id: answer, topic: \"{root}/bare/answer\", condition: {{ type: equals, value: 42 }} }}\n\
         \x20   - {{ id: stopped, topic: \"{root}/bare/running\", condition: {{ type: equals, value: false }} }}\n\
         \x20   - {{ id: umh-hot, topic: \"{root}/umh/+/_historian/temperature\", condition: {{ type: high, limit: 80, deadband: 1 }} }}\n\
         \x20   - {{ id: core-hot, topic: \"{root}/core/level\", condition: {{ type: high, limit: 80, deadband: 1 }} }}\n\
         \x20   - {{ id: mapped-hot, topic: \"{root}/vendor/+/temp\", condition: {{ type: high, limit: 80, deadband: 1 }} }}\n"
    );
    let (http, token, task) = start_alerts(port, "payloads", &payloads, &rules).await;
    // Every reason's series exists before anything is refused.
    for reason in nexus_common::codec::payload::REASONS {
        assert_eq!(
            metric(
                http,
                &format!("nexus_alerts_malformed_total{{reason=\"{reason}\"}}")
            ),
            0.0,
            "{reason}"
        );
    }

    let mut op = testing::mqtt_config(port);
    op.username = Some("op".into());
    op.password = Some(Secret::new("op-pw".to_owned()));
    let (_op, mut rx) = connect(op, &[&format!("$nexus/alarms/{root}/#")]).await;
    let (p, _) = connect(testing::publisher_mqtt_config(port), &[]).await;
    let send = |topic: String, body: Vec<u8>| {
        let p = p.clone();
        async move {
            p.publish(&topic, body, QoS::AtLeastOnce, false)
                .await
                .unwrap()
        }
    };
    let now = nexus_common::now_ms();

    // Bare JSON scalars.
    send(format!("{root}/bare/answer"), b"42".to_vec()).await;
    let s = active(&mut rx, &format!("$nexus/alarms/{root}/bare/answer/answer")).await;
    assert_eq!(s["value"], 42);
    send(format!("{root}/bare/running"), b"true".to_vec()).await;
    send(format!("{root}/bare/running"), b"false".to_vec()).await;
    let s = active(
        &mut rx,
        &format!("$nexus/alarms/{root}/bare/running/stopped"),
    )
    .await;
    assert_eq!(s["value"], false);

    // UMH Classic: the message is on .../_historian, its values on .../_historian/<key>; the
    // rule's filter matches only the value's topic.
    let umh = format!(r#"{{"timestamp_ms":{now},"temperature":91.5,"pressure_bar":2}}"#);
    send(format!("{root}/umh/cell-1/_historian"), umh.into_bytes()).await;
    let s = active(
        &mut rx,
        &format!("$nexus/alarms/{root}/umh/cell-1/_historian/temperature/umh-hot"),
    )
    .await;
    assert_eq!(s["value"], 91.5);
    assert_eq!(
        s["topic"],
        format!("{root}/umh/cell-1/_historian/temperature")
    );

    // UMH Core, read by auto.
    let core = format!(r#"{{"timestamp_ms":{now},"value":99}}"#);
    send(format!("{root}/core/level"), core.into_bytes()).await;
    let s = active(
        &mut rx,
        &format!("$nexus/alarms/{root}/core/level/core-hot"),
    )
    .await;
    assert_eq!(s["value"], 99);

    // A mapped payload, its time in seconds.
    let mapped = format!(
        r#"{{"data":{{"value":120.25,"time":{:.3},"status":"good"}}}}"#,
        now as f64 / 1000.0
    );
    send(format!("{root}/vendor/oven/temp"), mapped.into_bytes()).await;
    let s = active(
        &mut rx,
        &format!("$nexus/alarms/{root}/vendor/oven/temp/mapped-hot"),
    )
    .await;
    assert_eq!(s["value"], 120.25);

    // Garbage in each format: counted by reason, and evaluation goes on.
    let evaluated = metric(http, "nexus_alerts_values_total");
    send(format!("{root}/bare/answer"), b"forty-two".to_vec()).await;
    send(
        format!("{root}/umh/cell-1/_historian"),
        br#"{"temperature":95}"#.to_vec(),
    )
    .await;
    send(
        format!("{root}/vendor/oven/temp"),
        br#"{"data":{"value":[1,2]}}"#.to_vec(),
    )
    .await;
    let mut flood = format!(r#"{{"timestamp_ms":{now}"#);
    for i in 0..500 {
        flood.push_str(&format!(r#","k{i}":{i}"#));
    }
    flood.push('}');
    send(format!("{root}/umh/cell-2/_historian"), flood.into_bytes()).await;
    send(format!("{root}/core/level"), b"{\"level\":1}".to_vec()).await;
    // A good value after the garbage is still evaluated.
    send(format!("{root}/bare/running"), b"true".to_vec()).await;
    let m = |reason: &str| format!("nexus_alerts_malformed_total{{reason=\"{reason}\"}}");
    assert_eq!(wait_metric(http, &m("missing_field"), 2.0).await, 2.0);
    assert_eq!(metric(http, &m("bad_json")), 1.0);
    assert_eq!(metric(http, &m("bad_type")), 1.0);
    assert_eq!(metric(http, &m("too_many_values")), 1.0);
    // The 100 values the flood's message may give, and the last true.
    assert_eq!(
        wait_metric(http, "nexus_alerts_values_total", evaluated + 101.0).await,
        evaluated + 101.0
    );

    token.cancel();
    tokio::time::timeout(Duration::from_secs(10), task)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
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
        value: Some(SpValue::Float(v)),
        historical,
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rule_on_a_sparkplug_metric_raises_and_clears_its_alarm() {
    let b = testing::service_broker();
    let port = b.ports.tcp().port();
    let g = testing::unique("G");
    let rules = format!(
        "\x20   - {{ id: hot, topic: \"spBv1.0/{g}/edge/plc/temp\", condition: {{ type: high, limit: 80, deadband: 1 }} }}\n"
    );
    let (http, token, task) = start_alerts(port, "spb", "", &rules).await;
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
        value: Some(SpValue::Float(20.0)),
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
            assert_eq!(p.metrics[0].value, Some(SpValue::Bool(true)));
            break;
        }
    }
    assert_eq!(malformed("unknown_alias"), 1.0);
    token.cancel();
    task.await.unwrap().unwrap();
}
