//! One origin: the orchestrator serves ingestion's history and the alert service's API on its
//! own port, checking the caller's role first and forwarding as the caller (the upstream sees
//! the user, not the orchestrator). Real broker, PostgreSQL, ingestion and alert service.

#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use nexus_common::auth::hash_password;
use nexus_common::config::Config;
use nexus_common::mqtt::{self, ClientSettings, QoS};
use nexus_common::testing::{self, free_port, PgServer, SERVICE_USER};
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;

mod support;

const OPERATOR: &str = "nxs_dddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddd";
const VIEWER: &str = "nxs_eeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeee";

async fn call(port: u16, token: &str, method: &str, path: &str, body: &str) -> (u16, Value) {
    support::call(port, Some(token), method, path, &[], body).await
}

fn config(mqtt: u16, db: Option<&str>, ports: [u16; 3], wal: &std::path::Path) -> Config {
    let [orch, ingest, alerts] = ports;
    let tokens = support::tokens(&[("op", OPERATOR, "operator"), ("v", VIEWER, "viewer")]);
    let database = db.map_or(String::new(), |u| format!("database: {{ url: \"{u}\" }}\n"));
    let text = format!(
        "mqtt: {{ host: 127.0.0.1, port: {mqtt}, username: {svc}, reconnect_min: 50ms }}\n\
         auth:\n  anonymous: \"off\"\n  users:\n    - {{ username: {svc}, password_hash: \"{hash}\", role: service }}\n  tokens:\n{tokens}\
         telemetry: {{ instance: proxy-test }}\n{database}\
         ingestion: {{ http_listen: 127.0.0.1:{ingest}, wal_dir: {wal}, batch_timeout: 20ms }}\n\
         alerts:\n  http_listen: 127.0.0.1:{alerts}\n  state_dir: {wal}/alerts\n  rules:\n    - {{ id: hot, topic: acme/+/temperature, condition: {{ type: high, limit: 80, deadband: 2 }} }}\n\
         orchestrator:\n  http_listen: 127.0.0.1:{orch}\n  upstreams: {{ ingestion: \"http://127.0.0.1:{ingest}\", alerts: \"http://127.0.0.1:{alerts}\" }}\n",
        svc = SERVICE_USER.0,
        hash = hash_password(SERVICE_USER.1),
        wal = wal.display(),
    );
    Config::from_str_with_env(
        &text,
        None,
        &[("NEXUS_MQTT__PASSWORD".into(), SERVICE_USER.1.into())],
    )
    .unwrap_or_else(|e| panic!("{e}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_orchestrator_serves_history_and_alarms_as_the_caller() {
    let broker = testing::service_broker();
    let mqtt_port = broker.ports.tcp().port();
    let pg = PgServer::start();
    let db = pg.create_database("proxy").await;
    let wal = tempfile::tempdir().unwrap();
    let ports = [free_port(), free_port(), free_port()];
    let cfg = Arc::new(config(mqtt_port, Some(&db), ports, wal.path()));
    let stop = CancellationToken::new();
    let ingest_stop = stop.child_token();
    tokio::spawn(nexus_data_ingestion::run(cfg.clone(), ingest_stop.clone()));
    tokio::spawn(nexus_alert_service::run(cfg.clone(), stop.clone()));
    support::orchestrator(cfg.clone(), stop.clone()).await;
    let orch = ports[0];
    let started = Instant::now();
    while testing::http(ports[1], "GET", "/readyz", "").0 != 200
        || testing::http(orch, "GET", "/healthz", "").0 != 200
    {
        assert!(started.elapsed() < Duration::from_secs(30), "not ready");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;

    // Values reach the historian through the broker.
    let (publisher, _rx) = mqtt::connect(
        &testing::publisher_mqtt_config(mqtt_port),
        ClientSettings::new("proxy-test-pub"),
        None,
        stop.clone(),
    )
    .unwrap();
    publisher
        .wait_connected(Duration::from_secs(5))
        .await
        .unwrap();
    for i in 0..5 {
        let body =
            json!({"v": 20 + i, "q": "good", "ts": nexus_common::now_ms() - 1000 + i}).to_string();
        publisher
            .publish("acme/line-1/temperature", body, QoS::AtLeastOnce, false)
            .await
            .unwrap();
    }
    let path = "/api/v1/history?topic=acme/line-1/temperature&from=now-1h&agg=raw";
    let history = loop {
        let (s, v) = call(orch, VIEWER, "GET", path, "").await;
        if s == 200 && v["points"].as_array().is_some_and(|p| p.len() == 5) {
            break v;
        }
        assert!(started.elapsed() < Duration::from_secs(30), "{s} {v}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(history["points"][4]["v"], json!(24), "{history}");
    // The upstream's own answers come through unchanged: a bad parameter is its 400.
    let (s, v) = call(orch, VIEWER, "GET", "/api/v1/history?topic=a/%23", "").await;
    assert_eq!(s, 400, "{v}");
    assert!(v["error"].as_str().unwrap().contains("topic"), "{v}");
    let (s, v) = call(orch, VIEWER, "GET", "/api/v1/latest?filter=acme/%23", "").await;
    assert_eq!(s, 200, "{v}");

    // Alarms: read by viewers, acted on by operators, as themselves.
    let (s, v) = call(orch, VIEWER, "GET", "/api/v1/rules", "").await;
    assert_eq!(s, 200, "{v}");
    assert!(v.to_string().contains("\"hot\""), "{v}");
    assert_eq!(call(orch, VIEWER, "GET", "/api/v1/alarms", "").await.0, 200);
    let ack = "/api/v1/alarms/hot%3Aacme%2Fline-1%2Ftemperature/ack";
    let (s, v) = call(orch, VIEWER, "POST", ack, "{}").await;
    assert_eq!(s, 403, "the orchestrator checks the role first: {v}");
    // The alert service sees the operator: naming itself is fine (the alarm is not active:
    // 404 or 409), naming the orchestrator's service user is someone else (400).
    let (s, v) = call(orch, OPERATOR, "POST", ack, r#"{"user":"token:op"}"#).await;
    assert!(s == 404 || s == 409, "{s} {v}");
    let body = format!(r#"{{"user":"{}"}}"#, SERVICE_USER.0);
    let (s, v) = call(orch, OPERATOR, "POST", ack, &body).await;
    assert_eq!(
        s, 400,
        "the upstream saw the operator, not the service: {v}"
    );

    // An excursion raises the alarm; its journal comes through the orchestrator, filtered.
    let hot = json!({"v": 95, "q": "good", "ts": nexus_common::now_ms()}).to_string();
    publisher
        .publish("acme/line-1/temperature", hot, QoS::AtLeastOnce, false)
        .await
        .unwrap();
    let journal = loop {
        let (s, v) = call(
            orch,
            VIEWER,
            "GET",
            "/api/v1/alarms/journal?rule=hot&topic=acme/%2B/temperature",
            "",
        )
        .await;
        if s == 200 && v["events"].as_array().is_some_and(|e| !e.is_empty()) {
            break v;
        }
        assert!(started.elapsed() < Duration::from_secs(30), "{s} {v}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(
        journal["events"][0]["topic"], "acme/line-1/temperature",
        "{journal}"
    );
    assert_eq!(journal["events"][0]["value"], json!(95), "{journal}");
    let (s, v) = call(
        orch,
        VIEWER,
        "GET",
        "/api/v1/alarms/journal?topic=other/%23",
        "",
    )
    .await;
    assert_eq!(
        (s, v["events"].as_array().map(Vec::len)),
        (200, Some(0)),
        "{v}"
    );
    let (s, v) = call(orch, VIEWER, "GET", "/api/v1/alarms/journal?limit=0", "").await;
    assert_eq!(s, 400, "{v}");
    assert!(v["error"].as_str().unwrap().contains("limit"), "{v}");

    // An upstream that is down is a 503 naming it.
    ingest_stop.cancel();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (s, v) = call(orch, VIEWER, "GET", path, "").await;
        if s == 503 {
            assert!(v["error"].as_str().unwrap().contains("ingestion"), "{v}");
            break;
        }
        assert!(Instant::now() < deadline, "{s} {v}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    stop.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_without_an_upstream_is_a_503_that_says_how_to_set_it() {
    let broker = testing::service_broker();
    let wal = tempfile::tempdir().unwrap();
    let ports = [free_port(), free_port(), free_port()];
    let mut cfg = config(broker.ports.tcp().port(), None, ports, wal.path());
    cfg.orchestrator.upstreams.ingestion = None;
    let stop = CancellationToken::new();
    support::orchestrator(Arc::new(cfg), stop.clone()).await;
    let (s, v) = call(ports[0], VIEWER, "GET", "/api/v1/history?topic=a/b", "").await;
    assert_eq!(s, 503, "{v}");
    assert!(
        v["error"]
            .as_str()
            .unwrap()
            .contains("orchestrator.upstreams.ingestion"),
        "{v}"
    );
    stop.cancel();
}
