//! The alert service through a real broker: limits raise and clear alarms with the right
//! retained state and events, acknowledge over MQTT and REST, shelve over REST, state kept
//! across a restart, malformed values counted.

#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use nexus_common::config::{Config, Secret};
use nexus_common::mqtt::{self, ClientSettings, Message, MqttHandle, QoS};
use nexus_common::testing::{self, free_port};
use serde_json::Value;
use tokio::sync::mpsc::Receiver;
use tokio_util::sync::CancellationToken;

fn broker() -> nexus_common::broker::EmbeddedBroker {
    testing::service_broker()
}

async fn client(port: u16, user: &str, subs: &[&str]) -> (MqttHandle, Receiver<Message>) {
    let mut c = testing::mqtt_config(port);
    c.persistent_session = false;
    c.username = Some(user.into());
    c.password = Some(Secret::new(format!("{user}-pw")));
    let mut s = ClientSettings::new(testing::unique(user));
    s.subscriptions = subs
        .iter()
        .map(|f| (f.to_string(), QoS::AtLeastOnce))
        .collect();
    let (h, rx) = mqtt::connect(&c, s, None, CancellationToken::new()).unwrap();
    h.wait_connected(Duration::from_secs(10)).await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    (h, rx)
}

fn start(
    port: u16,
    http: u16,
    root: &str,
) -> (
    CancellationToken,
    tokio::task::JoinHandle<anyhow::Result<()>>,
) {
    start_with(port, http, root, "")
}

fn start_with(
    port: u16,
    http: u16,
    root: &str,
    extra: &str,
) -> (
    CancellationToken,
    tokio::task::JoinHandle<anyhow::Result<()>>,
) {
    let text = format!(
        "mqtt: {{ host: 127.0.0.1, port: {port}, username: svc, password: svc-pw, reconnect_min: 50ms }}\ntelemetry: {{ instance: alerts-test }}\nalerts:\n  http_listen: 127.0.0.1:{http}\n  max_shelve: 1h\n  rules:\n    - {{ id: hot, topic: \"{root}/+/temp\", condition: {{ type: high, limit: 80, deadband: 2 }}, severity: 700, message: \"{{topic}} is {{value}} above {{limit}}\" }}\n{extra}"
    );
    let mut cfg = Config::from_str_with_env(&text, None, &[]).unwrap_or_else(|e| panic!("{e}"));
    // The REST calls below log in as the operator op.
    cfg.auth = testing::test_auth();
    // The alarm states on disk: one place per test (its root), kept across its restarts.
    cfg.alerts.state_dir = testing::state_dir(&format!("alerts-{root}"));
    let token = CancellationToken::new();
    let task = tokio::spawn(nexus_alert_service::run(Arc::new(cfg), token.clone()));
    (token, task)
}

/// Publish a good value `x` on `topic` now, as the gateway would.
fn value(svc: &MqttHandle, topic: &str, x: &str) -> impl std::future::Future<Output = ()> {
    let (svc, topic) = (svc.clone(), topic.to_owned());
    let body = format!(
        "{{\"v\":{x},\"q\":\"good\",\"ts\":{}}}",
        nexus_common::now_ms()
    );
    async move {
        svc.publish(&topic, body, QoS::AtLeastOnce, false)
            .await
            .unwrap()
    }
}

async fn next(rx: &mut Receiver<Message>, topic: &str, limit: Duration) -> Option<Vec<u8>> {
    let end = tokio::time::Instant::now() + limit;
    loop {
        match tokio::time::timeout_at(end, rx.recv()).await {
            Ok(Some(m)) if m.topic() == Some(topic) => return Some(m.payload().to_vec()),
            Ok(Some(_)) => continue,
            _ => return None,
        }
    }
}

fn http(port: u16, method: &str, path: &str, body: &str) -> (u16, Value) {
    use std::io::{Read, Write};
    let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
        return (0, Value::Null);
    };
    // As the operator op (op:op-pw).
    write!(s, "{method} {path} HTTP/1.0\r\nHost: x\r\nAuthorization: Basic b3A6b3AtcHc=\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}", body.len()).unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let status = out
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let json = out
        .split("\r\n\r\n")
        .nth(1)
        .and_then(|b| serde_json::from_str(b).ok())
        .unwrap_or(Value::Null);
    (status, json)
}

async fn wait_ready(http_port: u16) {
    let start = Instant::now();
    while http(http_port, "GET", "/readyz", "").0 != 200 {
        assert!(start.elapsed() < Duration::from_secs(10));
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(800)).await; // the restore window
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alarms_raise_clear_ack_shelve_and_survive_a_restart() {
    let b = broker();
    let port = b.ports.tcp().port();
    let root = testing::unique("plant");
    let topic = format!("{root}/m1/temp");
    let state = format!("$nexus/alarms/{topic}/hot");
    let hp = free_port();
    let (token, task) = start(port, hp, &root);
    wait_ready(hp).await;
    let (svc, _) = client(port, "svc", &[]).await;
    let (op, mut rx) = client(port, "op", &["$nexus/alarms/#"]).await;
    let send = |x: &str| value(&svc, &topic, x);

    send("79").await;
    send("85").await;
    let s: Value = serde_json::from_slice(
        &next(&mut rx, &state, Duration::from_secs(5))
            .await
            .expect("state"),
    )
    .unwrap();
    assert_eq!(s["state"], "active_unacked");
    assert_eq!(s["severity"], 700);
    assert_eq!(s["value"], 85);
    assert_eq!(s["message"], format!("{topic} is 85 above 80"));
    let ev: Value = serde_json::from_slice(
        &next(&mut rx, "$nexus/alarms/events", Duration::from_secs(5))
            .await
            .unwrap(),
    )
    .unwrap();
    assert_eq!(ev["event"], "activated");

    // Acknowledge over MQTT.
    op.publish(
        "$nexus/alarms/ack",
        format!(
            "{{\"rule_id\":\"hot\",\"topic\":\"{topic}\",\"user\":\"ann\",\"comment\":\"on it\"}}"
        ),
        QoS::AtLeastOnce,
        false,
    )
    .await
    .unwrap();
    let s: Value =
        serde_json::from_slice(&next(&mut rx, &state, Duration::from_secs(5)).await.unwrap())
            .unwrap();
    assert_eq!(s["state"], "active_acked");
    let ev: Value = serde_json::from_slice(
        &next(&mut rx, "$nexus/alarms/events", Duration::from_secs(5))
            .await
            .unwrap(),
    )
    .unwrap();
    assert_eq!(
        (
            ev["event"].as_str(),
            ev["user"].as_str(),
            ev["comment"].as_str()
        ),
        // The payload names ann; the broker authenticated op, and the event says so.
        (Some("acknowledged"), Some("op"), Some("on it"))
    );

    // REST: the list, refusals, shelving.
    let (code, list) = http(hp, "GET", "/api/v1/alarms?severity=500", "");
    assert_eq!(code, 200);
    assert_eq!(list["alarms"][0]["state"], "active_acked");
    let id = list["alarms"][0]["id"]
        .as_str()
        .unwrap()
        .replace('/', "%2F");
    let (code, err) = http(hp, "POST", &format!("/api/v1/alarms/{id}/ack"), "{}");
    assert_eq!(code, 409, "{err}");
    assert_eq!(err["error"], "already acknowledged");
    let (code, err) = http(
        hp,
        "POST",
        &format!("/api/v1/alarms/{id}/shelve"),
        "{\"duration_s\":999999}",
    );
    assert_eq!(code, 409);
    assert!(err["error"].as_str().unwrap().contains("limited to 3600 s"));
    let (code, shelved) = http(
        hp,
        "POST",
        &format!("/api/v1/alarms/{id}/shelve"),
        "{\"duration_s\":60}",
    );
    assert_eq!(code, 200, "{shelved}");
    assert!(shelved["shelved_until"].as_i64().unwrap() > nexus_common::now_ms());
    let (code, _) = http(hp, "POST", &format!("/api/v1/alarms/{id}/unshelve"), "{}");
    assert_eq!(code, 200);
    let (code, _) = http(hp, "POST", "/api/v1/alarms/hot:nope%2Ftopic/ack", "{}");
    assert_eq!(code, 404);
    let (code, oos) = http(
        hp,
        "POST",
        &format!("/api/v1/alarms/{id}/out_of_service"),
        "{\"user\":\"op\"}",
    );
    assert_eq!(code, 200);
    assert_eq!(
        (oos["out_of_service"].as_bool(), oos["state"].as_str()),
        (Some(true), Some("normal"))
    );
    let (code, err) = http(
        hp,
        "POST",
        &format!("/api/v1/alarms/{id}/out_of_service"),
        "{}",
    );
    assert_eq!(
        (code, err["error"].as_str()),
        (409, Some("already out of service"))
    );
    let (code, _) = http(hp, "POST", &format!("/api/v1/alarms/{id}/in_service"), "{}");
    assert_eq!(code, 200);
    // Back in service, the condition (still 85 > 80) raises it again.
    let began = Instant::now();
    loop {
        let m = next(&mut rx, &state, Duration::from_secs(5)).await.unwrap();
        if !m.is_empty()
            && serde_json::from_slice::<Value>(&m).unwrap()["state"] == "active_unacked"
        {
            break;
        }
        assert!(began.elapsed() < Duration::from_secs(5));
    }
    op.publish(
        "$nexus/alarms/ack",
        format!("{{\"rule_id\":\"hot\",\"topic\":\"{topic}\"}}"),
        QoS::AtLeastOnce,
        false,
    )
    .await
    .unwrap();
    let s: Value =
        serde_json::from_slice(&next(&mut rx, &state, Duration::from_secs(5)).await.unwrap())
            .unwrap();
    assert_eq!(s["state"], "active_acked");
    let (_, rules) = http(hp, "GET", "/api/v1/rules", "");
    assert_eq!(rules["rules"][0]["id"], "hot");

    // Restart: the active, acknowledged alarm is restored, not raised again.
    token.cancel();
    task.await.unwrap().unwrap();
    while rx.try_recv().is_ok() {}
    let hp2 = free_port();
    let (token, task) = start(port, hp2, &root);
    wait_ready(hp2).await;
    let (_, list) = http(hp2, "GET", "/api/v1/alarms", "");
    assert_eq!(list["alarms"][0]["state"], "active_acked", "{list}");
    send("84").await;
    assert!(
        next(&mut rx, "$nexus/alarms/events", Duration::from_secs(1))
            .await
            .is_none(),
        "not raised again"
    );

    // Back to normal: acknowledged, so the retained state is cleared (empty payload).
    send("70").await;
    let cleared = next(&mut rx, &state, Duration::from_secs(5)).await.unwrap();
    assert!(cleared.is_empty());

    // Malformed values are counted, and evaluation goes on.
    svc.publish(&topic, "not json", QoS::AtLeastOnce, false)
        .await
        .unwrap();
    svc.publish(&topic, "{\"v\":[1]}", QoS::AtLeastOnce, false)
        .await
        .unwrap();
    send("99").await;
    let s: Value =
        serde_json::from_slice(&next(&mut rx, &state, Duration::from_secs(5)).await.unwrap())
            .unwrap();
    assert_eq!(s["state"], "active_unacked");
    let (_, _) = http(hp2, "GET", "/healthz", "");
    let metrics = {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(("127.0.0.1", hp2)).unwrap();
        write!(s, "GET /metrics HTTP/1.0\r\n\r\n").unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        out
    };
    assert!(
        metrics.contains("nexus_alerts_malformed_total{reason=\"bad_json\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("nexus_alerts_malformed_total{reason=\"bad_type\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("nexus_alerts_active{severity=\"700\"} 1"),
        "{metrics}"
    );
    token.cancel();
    task.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_transition_is_journaled_in_postgres() {
    let pg = testing::PgServer::start();
    let url = pg.create_database(&testing::unique("alarms")).await;
    let b = broker();
    let port = b.ports.tcp().port();
    let root = testing::unique("plant");
    let topic = format!("{root}/m2/temp");
    let hp = free_port();
    let (token, task) = start_with(port, hp, &root, &format!("database:\n  url: \"{url}\"\n"));
    wait_ready(hp).await;
    let (svc, _) = client(port, "svc", &[]).await;
    for x in ["90", "70"] {
        svc.publish(&topic, format!("{{\"v\":{x}}}"), QoS::AtLeastOnce, false)
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let (op, _) = client(port, "op", &[]).await;
    op.publish(
        "$nexus/alarms/ack",
        format!("{{\"rule_id\":\"hot\",\"topic\":\"{topic}\",\"user\":\"bob\"}}"),
        QoS::AtLeastOnce,
        false,
    )
    .await
    .unwrap();
    let (db, _t) = nexus_common::pg::connect(&nexus_common::pg::Database::at(&url))
        .await
        .unwrap();
    let start = Instant::now();
    let rows = loop {
        let rows = db
            .query(
                "SELECT event, state, username FROM alarm_events ORDER BY id",
                &[],
            )
            .await
            .unwrap_or_default();
        if rows.len() >= 3 || start.elapsed() > Duration::from_secs(10) {
            break rows;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let got: Vec<(String, String, Option<String>)> = rows
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    assert_eq!(
        got,
        vec![
            ("activated".into(), "active_unacked".into(), None),
            ("cleared".into(), "rtn_unacked".into(), None),
            // The payload says bob; the broker authenticated op, and the journal says so.
            ("acknowledged".into(), "normal".into(), Some("op".into())),
        ]
    );
    token.cancel();
    task.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chattering_and_flood_are_measured() {
    let b = broker();
    let port = b.ports.tcp().port();
    // A UNS root of four levels, so the operator area (the first four levels) is the root.
    let root = format!("{}/site/area/line", testing::unique("plant"));
    let hp = free_port();
    let (token, task) = start(port, hp, &root);
    wait_ready(hp).await;
    let (svc, _) = client(port, "svc", &[]).await;
    // One alarm in and out 3 times: chattering. Twelve machines alarming: a flood of the area.
    for x in ["85", "70", "85", "70", "85"] {
        svc.publish(
            &format!("{root}/m0/temp"),
            format!("{{\"v\":{x}}}"),
            QoS::AtLeastOnce,
            false,
        )
        .await
        .unwrap();
    }
    for m in 1..=12 {
        svc.publish(
            &format!("{root}/m{m}/temp"),
            "{\"v\":95}",
            QoS::AtLeastOnce,
            false,
        )
        .await
        .unwrap();
    }
    let start = Instant::now();
    loop {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(("127.0.0.1", hp)).unwrap();
        write!(s, "GET /metrics HTTP/1.0\r\n\r\n").unwrap();
        let mut m = String::new();
        s.read_to_string(&mut m).unwrap();
        // The gauges follow the evaluation: wait until all 15 activations are counted (the
        // flood starts at the 11th).
        if m.contains("nexus_alerts_chattering_total 1")
            && m.contains("nexus_alerts_flood{")
            && m.lines()
                .any(|l| l.starts_with("nexus_alerts_flood{") && l.ends_with(" 1"))
            && m.lines()
                .any(|l| l.starts_with("nexus_alerts_rate_10m{") && l.ends_with(" 15"))
        {
            // Every metric docs/alerts.md names is served.
            nexus_common::testing::assert_documented_metrics_served("alerts.md", &m);
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(5), "{m}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    token.cancel();
    task.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhooks_are_delivered_with_retries() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    // A receiver that fails twice, then accepts.
    let calls = Arc::new(AtomicUsize::new(0));
    let got: Arc<std::sync::Mutex<Vec<Value>>> = Arc::default();
    let app = {
        let (calls, got) = (calls.clone(), got.clone());
        // A Slack-style URL: the token is in the path.
        axum::Router::new().route(
            "/services/T000/B000/SECRETTOKEN",
            axum::routing::post(move |axum::Json(v): axum::Json<Value>| {
                let (calls, got) = (calls.clone(), got.clone());
                async move {
                    if calls.fetch_add(1, Ordering::SeqCst) < 2 {
                        return axum::http::StatusCode::SERVICE_UNAVAILABLE;
                    }
                    got.lock().unwrap().push(v);
                    axum::http::StatusCode::OK
                }
            }),
        )
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let hook_port = listener.local_addr().unwrap().port();
    tokio::spawn(async move { axum::serve(listener, app).await });

    let b = broker();
    let port = b.ports.tcp().port();
    let root = testing::unique("plant");
    let hp = free_port();
    let extra = format!("  webhooks:\n    - {{ url: \"http://127.0.0.1:{hook_port}/services/T000/B000/SECRETTOKEN\", min_severity: 500, events: [activated], max_attempts: 5 }}\n");
    let (token, task) = start_with(port, hp, &root, &extra);
    wait_ready(hp).await;
    let (svc, _) = client(port, "svc", &[]).await;
    svc.publish(
        &format!("{root}/m1/temp"),
        "{\"v\":99}",
        QoS::AtLeastOnce,
        false,
    )
    .await
    .unwrap();
    let start = Instant::now();
    while got.lock().unwrap().is_empty() {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "webhook never delivered ({} calls)",
            calls.load(Ordering::SeqCst)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let v = got.lock().unwrap()[0].clone();
    assert_eq!(v["event"], "activated");
    assert_eq!(v["rule_id"], "hot");
    assert_eq!(
        calls.load(Ordering::SeqCst),
        3,
        "two failures, then delivered"
    );
    // The URL is a secret: the metrics name the webhook by its label, never by its URL.
    let metrics = {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(("127.0.0.1", hp)).unwrap();
        write!(s, "GET /metrics HTTP/1.0\r\n\r\n").unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        out
    };
    assert!(!metrics.contains("SECRETTOKEN"), "{metrics}");
    assert!(
        metrics.contains("nexus_alerts_webhook_delivered_total{webhook=\"webhook-1\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("nexus_alerts_webhook_failed_total{webhook=\"webhook-1\"} 0"),
        "{metrics}"
    );
    token.cancel();
    task.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rules_reload_without_restart() {
    let b = broker();
    let port = b.ports.tcp().port();
    let root = testing::unique("plant");
    let hp = free_port();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("nexus.yaml");
    // The operator `http` logs in as (op / op-pw).
    let op = nexus_common::auth::hash_password("op-pw");
    let write = |extra: &str| {
        std::fs::write(
            &file,
            format!("mqtt: {{ host: 127.0.0.1, port: {port}, username: svc, password: svc-pw }}\nauth:\n  users:\n    - {{ username: op, password_hash: \"{op}\", role: operator }}\ntelemetry: {{ instance: reload-test }}\nalerts:\n  http_listen: 127.0.0.1:{hp}\n  rules:\n    - {{ id: hot, topic: \"{root}/+/temp\", condition: {{ type: high, limit: 80 }} }}\n{extra}"),
        )
        .unwrap()
    };
    write("");
    let cfg = Config::load_with_env(Some(&file), &[]).unwrap();
    let token = CancellationToken::new();
    let task = tokio::spawn(nexus_alert_service::run(Arc::new(cfg), token.clone()));
    wait_ready(hp).await;
    let (svc, _) = client(port, "svc", &[]).await;
    svc.publish(
        &format!("{root}/m1/temp"),
        "{\"v\":90}",
        QoS::AtLeastOnce,
        false,
    )
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    // Add a rule; "hot" stays as it is.
    tokio::time::sleep(Duration::from_millis(1100)).await; // a new mtime
    write(&format!(
        "    - {{ id: warm, topic: \"{root}/+/temp\", condition: {{ type: high, limit: 60 }} }}\n"
    ));
    let start = Instant::now();
    loop {
        let (_, rules) = http(hp, "GET", "/api/v1/rules", "");
        if rules["rules"].as_array().is_some_and(|r| r.len() == 2) {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "not reloaded: {rules}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    svc.publish(
        &format!("{root}/m2/temp"),
        "{\"v\":70}",
        QoS::AtLeastOnce,
        false,
    )
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (_, list) = http(hp, "GET", "/api/v1/alarms", "");
    let ids: Vec<&str> = list["alarms"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["id"].as_str().unwrap())
        .collect();
    assert!(
        ids.contains(&format!("hot:{root}/m1/temp").as_str()),
        "{ids:?}"
    );
    assert!(
        ids.contains(&format!("warm:{root}/m2/temp").as_str()),
        "{ids:?}"
    );
    token.cancel();
    task.await.unwrap().unwrap();
}

/// A rule's topic that changes every 100 ms from before the service starts (a value polled
/// fast) leaves no quiet moment: the service must still start evaluating and raise the alarm.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_topic_changing_fast_from_the_start_is_evaluated() {
    let b = broker();
    let port = b.ports.tcp().port();
    let root = format!("{}/site/area/line", testing::unique("plant"));
    let (svc, _) = client(port, "svc", &[]).await;
    let stop = CancellationToken::new();
    let feed = {
        let (svc, topic, stop) = (svc.clone(), format!("{root}/m1/temp"), stop.clone());
        tokio::spawn(async move {
            while !stop.is_cancelled() {
                let _ = svc
                    .publish(&topic, "{\"v\":95}", QoS::AtLeastOnce, true)
                    .await;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (_watch, mut rx) = client(port, "svc", &["$nexus/alarms/#"]).await;
    let hp = free_port();
    let (token, task) = start(port, hp, &root);
    let state = next(
        &mut rx,
        &format!("$nexus/alarms/{root}/m1/temp/hot"),
        Duration::from_secs(10),
    )
    .await
    .expect("the alarm is raised while its topic keeps changing");
    let v: Value = serde_json::from_slice(&state).unwrap();
    assert_eq!(v["state"], "active_unacked", "{v}");
    stop.cancel();
    let _ = feed.await;
    token.cancel();
    task.await.unwrap().unwrap();
}

/// With the service stopped: a value crosses the limit and comes back, and the broker loses
/// the retained state of an acknowledged alarm. After the restart the excursion is an alarm
/// (returned to normal, unacknowledged), and the acknowledged alarm is restored from
/// `alerts.state_dir` and not raised again although its value is still high.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_excursion_during_a_restart_is_evaluated_and_an_acknowledged_alarm_stays_acknowledged() {
    let b = broker();
    let port = b.ports.tcp().port();
    let root = testing::unique("plant");
    let (a, bt) = (format!("{root}/m1/temp"), format!("{root}/m2/temp"));
    let a_state = format!("$nexus/alarms/{a}/hot");
    let hp = free_port();
    let (token, task) = start(port, hp, &root);
    wait_ready(hp).await;
    let (svc, _) = client(port, "svc", &[]).await;
    let (_op, mut rx) = client(port, "op", &["$nexus/alarms/#"]).await;
    let send = |topic: &str, x: &str| value(&svc, topic, x);
    send(&a, "90").await;
    assert!(next(&mut rx, &a_state, Duration::from_secs(5))
        .await
        .is_some());
    let (code, list) = http(hp, "GET", "/api/v1/alarms", "");
    assert_eq!(code, 200);
    let id = list["alarms"][0]["id"]
        .as_str()
        .unwrap()
        .replace('/', "%2F");
    let (code, _) = http(
        hp,
        "POST",
        &format!("/api/v1/alarms/{id}/ack"),
        r#"{"comment":"seen"}"#,
    );
    assert_eq!(code, 200);
    let s: Value = serde_json::from_slice(
        &next(&mut rx, &a_state, Duration::from_secs(5))
            .await
            .unwrap(),
    )
    .unwrap();
    assert_eq!(s["state"], "active_acked");
    token.cancel();
    task.await.unwrap().unwrap();

    // While it is down.
    send(&bt, "95").await;
    send(&bt, "60").await;
    send(&a, "92").await;
    svc.publish(&a_state, Vec::new(), QoS::AtLeastOnce, true)
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;

    let (token, task) = start(port, hp, &root);
    // The excursion: raised, then returned to normal, unacknowledged, as it happened.
    let b_state = format!("$nexus/alarms/{bt}/hot");
    let mut seen = Vec::new();
    while let Some(p) = next(&mut rx, &b_state, Duration::from_secs(10)).await {
        let v: Value = serde_json::from_slice(&p).unwrap();
        seen.push(v["state"].as_str().unwrap_or("").to_owned());
        if seen.last().is_some_and(|s| s == "rtn_unacked") {
            break;
        }
    }
    assert_eq!(seen, ["active_unacked", "rtn_unacked"], "{seen:?}");
    wait_ready(hp).await;
    let (_, list) = http(hp, "GET", "/api/v1/alarms", "");
    let alarms = list["alarms"].as_array().cloned().unwrap_or_default();
    let of = |topic: &str| {
        alarms
            .iter()
            .find(|x| x["topic"] == topic)
            .unwrap_or_else(|| panic!("no alarm on {topic}: {alarms:?}"))
            .clone()
    };
    assert_eq!(of(&bt)["state"], "rtn_unacked");
    let a_alarm = of(&a);
    assert_eq!(
        a_alarm["state"], "active_acked",
        "restored from the state file, not raised again by 92: {a_alarm}"
    );
    token.cancel();
    task.await.unwrap().unwrap();
}
