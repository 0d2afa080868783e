//! Ingestion against a real PostgreSQL and a real broker: every point stored with its value,
//! quality and time; bad payloads in `ingest_rejects`; Sparkplug births and data; the
//! history API; two instances on one shared subscription (TimescaleDB: tests/timescale.rs).

#![allow(clippy::unwrap_used)]

mod support;
use support::{count, sql, wait_count};

use std::sync::Arc;
use std::time::{Duration, Instant};

use nexus_common::codec::sparkplug::{self, SpDataType, SpMetric, SpPayload};
use nexus_common::config::Config;
use nexus_common::domain::Value;
use nexus_common::mqtt::{self, ClientSettings, MqttHandle, QoS};
use nexus_common::testing::{self, free_port, PgServer};
use serde_json::Value as Json;
use tokio_util::sync::CancellationToken;

async fn publisher(port: u16) -> MqttHandle {
    let mut c = testing::service_mqtt_config(port);
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

struct Ingest {
    token: CancellationToken,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
    http: u16,
}

fn start(port: u16, db: &str, wal: &std::path::Path, instance: &str, extra: &str) -> Ingest {
    let http = free_port();
    let (version, extra) = match extra.strip_prefix("mqtt5") {
        Some(rest) => ("\"5\"", rest),
        None => ("\"3.1.1\"", extra),
    };
    let text = format!(
        "mqtt: {{ host: 127.0.0.1, port: {port}, version: {version}, username: svc, password: svc-pw, reconnect_min: 50ms }}\n\
         telemetry: {{ instance: {instance} }}\n\
         database:\n  url: \"{db}\"\ningestion:\n  http_listen: 127.0.0.1:{http}\n  wal_dir: {}\n  batch_timeout: 20ms\n{extra}",
        wal.display()
    );
    let cfg = Config::from_str_with_env(&text, None, &[]).unwrap_or_else(|e| panic!("{e}"));
    let token = CancellationToken::new();
    let task = tokio::spawn(nexus_data_ingestion::run(Arc::new(cfg), token.clone()));
    Ingest { token, task, http }
}

impl Ingest {
    async fn ready(&self) {
        let start = Instant::now();
        while testing::http(self.http, "GET", "/readyz", "").0 != 200 {
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "ingest not ready"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        // The subscription is in place once the client is connected; give it a moment.
        tokio::time::sleep(Duration::from_millis(300)).await;
    }

    fn metrics_text(&self) -> String {
        testing::http(self.http, "GET", "/metrics", "").1
    }

    fn metric(&self, sample: &str) -> f64 {
        testing::metric_value(&self.metrics_text(), sample).unwrap_or(0.0)
    }

    fn get(&self, path: &str) -> (u16, Json) {
        let (status, body) = testing::http(self.http, "GET", path, "");
        (status, serde_json::from_str(&body).unwrap_or(Json::Null))
    }

    async fn stop(self) {
        self.token.cancel();
        tokio::time::timeout(Duration::from_secs(20), self.task)
            .await
            .expect("ingest stops")
            .unwrap()
            .unwrap();
    }
}

const T0: i64 = 1_750_000_000_000;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn points_are_stored_once_with_value_quality_and_time_and_bad_input_is_dead_lettered() {
    let pg = PgServer::start();
    let url = pg.create_database("hist").await;
    let b = testing::service_broker();
    let port = b.ports.tcp().port();
    let wal = tempfile::tempdir().unwrap();
    let ing = start(port, &url, wal.path(), "ing-a", "");
    ing.ready().await;
    let p = publisher(port).await;
    let db = sql(&url).await;

    // 1000 numeric points over 10 topics, then other types and qualities.
    for i in 0..1000i64 {
        let topic = format!("acme/site/area/line/dev/t{}", i % 10);
        let body = format!(r#"{{"v":{}.5,"ts":{}}}"#, i, T0 + i);
        p.publish(&topic, body, QoS::AtLeastOnce, false)
            .await
            .unwrap();
    }
    let others: [(&str, &str); 4] = [
        (
            "acme/site/area/line/dev/mode",
            r#"{"v":"auto","q":"good","ts":1750000000000}"#,
        ),
        (
            "acme/site/area/line/dev/run",
            r#"{"v":true,"q":"uncertain","ts":1750000000001}"#,
        ),
        (
            "acme/site/area/line/dev/lost",
            r#"{"v":null,"q":"bad_comm_failure","ts":1750000000002}"#,
        ),
        (
            "acme/site/area/line/dev/big",
            r#"{"v":18446744073709551615,"ts":1750000000003}"#,
        ),
    ];
    for (t, body) in others {
        p.publish(t, body, QoS::AtLeastOnce, false).await.unwrap();
    }
    // The same point again (a publisher retry): stored once.
    p.publish(
        "acme/site/area/line/dev/t0",
        r#"{"v":0.5,"ts":1750000000000}"#,
        QoS::AtLeastOnce,
        false,
    )
    .await
    .unwrap();
    // Another value at the same time is no repeat: kept as a reject, not dropped.
    p.publish(
        "acme/site/area/line/dev/t0",
        r#"{"v":0.75,"ts":1750000000000}"#,
        QoS::AtLeastOnce,
        false,
    )
    .await
    .unwrap();
    // Bad input.
    let bad: [(&str, &[u8]); 4] = [
        ("acme/bad/json", b"{not json"),
        ("acme/bad/type", br#"{"v":[1,2]}"#),
        ("acme/bad/quality", br#"{"v":1,"q":"excellent"}"#),
        ("acme/bad/nul", br#"{"v":"a\u0000b"}"#),
    ];
    for (t, body) in bad {
        p.publish(t, body.to_vec(), QoS::AtLeastOnce, false)
            .await
            .unwrap();
    }
    // Sparkplug: a birth with aliases, then data by alias.
    let metric = |name: Option<&str>, alias, v: Value| SpMetric {
        name: name.map(str::to_owned),
        alias: Some(alias),
        timestamp: None,
        datatype: Some(SpDataType::for_value(&v)),
        value: Some(v),
        ..Default::default()
    };
    let birth = sparkplug::encode(&SpPayload {
        timestamp: Some(T0 as u64),
        seq: Some(0),
        metrics: vec![metric(Some("Line/Speed"), 1, Value::Float(1.5))],
    })
    .unwrap();
    p.publish(
        "spBv1.0/G1/DBIRTH/edge1/filler",
        birth,
        QoS::AtLeastOnce,
        false,
    )
    .await
    .unwrap();
    let data = sparkplug::encode(&SpPayload {
        timestamp: Some(T0 as u64 + 1000),
        seq: Some(1),
        metrics: vec![metric(None, 1, Value::Float(2.5))],
    })
    .unwrap();
    p.publish(
        "spBv1.0/G1/DDATA/edge1/filler",
        data,
        QoS::AtLeastOnce,
        false,
    )
    .await
    .unwrap();

    let want = 1000 + 4 + 2;
    let n = wait_count(
        &db,
        "SELECT count(*) FROM metrics",
        want,
        Duration::from_secs(20),
    )
    .await;
    assert_eq!(n, want, "every point stored once");
    let r = wait_count(
        &db,
        "SELECT count(*) FROM ingest_rejects",
        5,
        Duration::from_secs(10),
    )
    .await;
    assert_eq!(r, 5);

    // Values, qualities and times.
    let row = db
        .query_one(
            "SELECT extract(epoch FROM time)::float8 * 1000, value, quality FROM metrics WHERE topic = 'acme/site/area/line/dev/t3' ORDER BY time LIMIT 1",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, f64>(0).round() as i64, T0 + 3);
    assert_eq!(row.get::<_, Option<f64>>(1), Some(3.5));
    assert_eq!(row.get::<_, i16>(2), 192);
    let rows = db
        .query(
            "SELECT topic, value, value_str, quality FROM metrics WHERE topic LIKE 'acme/site/area/line/dev/%' AND topic NOT LIKE '%/t_' ORDER BY topic",
            &[],
        )
        .await
        .unwrap();
    let got: Vec<(String, Option<f64>, Option<String>, i16)> = rows
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3)))
        .collect();
    assert_eq!(
        got,
        vec![
            (
                "acme/site/area/line/dev/big".into(),
                Some(18446744073709551615.0),
                None,
                192
            ),
            ("acme/site/area/line/dev/lost".into(), None, None, 24),
            (
                "acme/site/area/line/dev/mode".into(),
                None,
                Some("auto".into()),
                192
            ),
            ("acme/site/area/line/dev/run".into(), Some(1.0), None, 64),
        ]
    );
    let sp: Vec<(String, f64)> = db
        .query(
            "SELECT topic, value FROM metrics WHERE topic LIKE 'spBv1.0/%' ORDER BY time",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(
        sp,
        vec![
            ("spBv1.0/G1/edge1/filler/Line/Speed".into(), 1.5),
            ("spBv1.0/G1/edge1/filler/Line/Speed".into(), 2.5)
        ]
    );
    let rejects: Vec<(String, String, Vec<u8>)> = db
        .query(
            "SELECT topic, reason, payload FROM ingest_rejects ORDER BY topic",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    let reasons: Vec<(&str, &str)> = rejects
        .iter()
        .map(|(t, r, _)| (t.as_str(), r.split(':').next().unwrap()))
        .collect();
    assert_eq!(
        reasons,
        vec![
            ("acme/bad/json", "bad_json"),
            ("acme/bad/nul", "bad_value"),
            ("acme/bad/quality", "bad_quality"),
            ("acme/bad/type", "bad_type"),
            ("acme/site/area/line/dev/t0", "conflict"),
        ]
    );
    assert_eq!(rejects[0].2, b"{not json");
    let conflict: serde_json::Value = serde_json::from_slice(&rejects[4].2).unwrap();
    assert_eq!(conflict["v"], serde_json::json!(0.75), "{conflict}");
    assert!(rejects[0].1.contains("line 1"), "{}", rejects[0].1);

    // Metrics tell the same story.
    assert_eq!(
        ing.metric("nexus_ingest_rejected_total{reason=\"bad_json\"}"),
        1.0
    );
    assert_eq!(ing.metric("nexus_ingest_points_written_total") as i64, want);
    let dup = ing.metric("nexus_ingest_points_duplicate_total");
    assert_eq!(dup, 1.0, "the repeated point is counted, not stored");
    assert_eq!(ing.metric("nexus_ingest_points_conflict_total"), 1.0);
    assert_eq!(ing.metric("nexus_ingest_db_up"), 1.0);
    // Every metric docs/ingestion.md names is served; labelled series whose labels are known
    // are there from the start, at 0.
    let text = ing.metrics_text();
    testing::assert_documented_metrics_served("ingestion.md", &text);
    for zero in [
        "nexus_ingest_rejected_total{reason=\"unknown_alias\"}",
        "nexus_ingest_messages_ignored_total{kind=\"sparkplug_death\"}",
    ] {
        assert_eq!(testing::metric_value(&text, zero), Some(0.0), "{zero}");
    }

    // The aggregates have the contract's columns.
    let agg = db
        .query_one(
            "SELECT sample_count, min_value, max_value, first_value, last_value FROM metrics_1min WHERE topic = 'acme/site/area/line/dev/t1'",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(agg.get::<_, i64>(0), 100);
    assert_eq!(agg.get::<_, Option<f64>>(1), Some(1.5));
    assert_eq!(agg.get::<_, Option<f64>>(2), Some(991.5));
    assert_eq!(agg.get::<_, Option<f64>>(3), Some(1.5));
    assert_eq!(agg.get::<_, Option<f64>>(4), Some(991.5));
    for view in ["metrics_1hour", "metrics_1day"] {
        assert!(count(&db, &format!("SELECT count(*) FROM {view}")).await > 0);
    }
    assert_eq!(
        count(&db, "SELECT count(*) FROM nexus_schema_migrations").await,
        i64::from(nexus_data_ingestion::schema::SCHEMA_VERSION)
    );

    // History API.
    let from = T0 - 1000;
    let to = T0 + 10_000;
    let (s, h) = ing.get(&format!(
        "/api/v1/history?topic=acme/site/area/line/dev/t2&from={from}&to={to}&agg=raw"
    ));
    assert_eq!(s, 200, "{h}");
    let pts = h["points"].as_array().unwrap();
    assert_eq!(pts.len(), 100);
    assert_eq!(
        pts[0],
        serde_json::json!({"ts": T0 + 2, "v": 2.5, "q": "good"})
    );
    let (_, h) = ing.get(&format!(
        "/api/v1/history?topic=acme/site/area/line/dev/t2&from={from}&to={to}&agg=1m"
    ));
    assert_eq!(h["agg"], "1m");
    assert_eq!(h["points"][0]["count"], 100);
    assert_eq!(h["points"][0]["first"], 2.5);
    let (_, h) = ing.get(&format!(
        "/api/v1/history?topic=acme/site/area/line/dev/t2&from={from}&to={to}"
    ));
    assert_eq!(h["agg"], "raw", "auto: 100 points fit");
    let (_, h) = ing.get("/api/v1/latest?filter=acme/site/%2B/line/dev/%23");
    let vals = h["values"].as_array().unwrap();
    assert_eq!(vals.len(), 14, "{h}");
    let t9 = vals
        .iter()
        .find(|v| v["topic"] == "acme/site/area/line/dev/t9")
        .unwrap();
    assert_eq!(t9["v"], 999.5);
    assert_eq!(t9["ts"], T0 + 999);
    // Bad parameters say what is wrong.
    for (path, says) in [
        ("/api/v1/history", "topic: required"),
        ("/api/v1/history?topic=a/%2B", "wildcards"),
        (
            "/api/v1/history?topic=a&from=yesterday",
            "from: \\\"yesterday\\\"",
        ),
        (
            "/api/v1/history?topic=a&from=now&to=now-1h",
            "must be before",
        ),
        ("/api/v1/history?topic=a&agg=5m", "agg: \\\"5m\\\""),
        ("/api/v1/history?topic=a&bogus=1", "unknown parameter"),
        ("/api/v1/latest?filter=a/%23/b", "filter"),
    ] {
        let (s, body) = testing::http(ing.http, "GET", path, "");
        assert_eq!(s, 400, "{path}: {body}");
        assert!(body.contains(says), "{path}: {body}");
    }
    let (s, _) = ing.get("/api/v1/history?topic=no/such/topic");
    assert_eq!(s, 404);

    // A restart neither loses nor repeats anything, and migrations are not re-applied.
    ing.stop().await;
    let ing = start(port, &url, wal.path(), "ing-a", "");
    ing.ready().await;
    p.publish(
        "acme/site/area/line/dev/after",
        r#"{"v":1,"ts":1750000000000}"#,
        QoS::AtLeastOnce,
        false,
    )
    .await
    .unwrap();
    let n = wait_count(
        &db,
        "SELECT count(*) FROM metrics",
        want + 1,
        Duration::from_secs(20),
    )
    .await;
    assert_eq!(n, want + 1);
    assert_eq!(
        count(&db, "SELECT count(*) FROM nexus_schema_migrations").await,
        i64::from(nexus_data_ingestion::schema::SCHEMA_VERSION)
    );
    ing.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_on_a_shared_subscription_split_the_load_and_store_everything_once() {
    let pg = PgServer::start();
    let url = pg.create_database("shared").await;
    let b = testing::service_broker();
    let port = b.ports.tcp().port();
    let (w1, w2) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let a = start(port, &url, w1.path(), "ing-1", "");
    // The second instance speaks MQTT 5 (clean_start=false with a session expiry).
    let c = start(port, &url, w2.path(), "ing-2", "mqtt5");
    a.ready().await;
    c.ready().await;
    let p = publisher(port).await;
    let n = 20_000i64;
    for i in 0..n {
        let topic = format!("plant/s/a/l/d/tag{}", i % 50);
        p.publish(
            &topic,
            format!(r#"{{"v":{i},"ts":{}}}"#, T0 + i),
            QoS::AtLeastOnce,
            false,
        )
        .await
        .unwrap();
    }
    let db = sql(&url).await;
    let got = wait_count(
        &db,
        "SELECT count(*) FROM points",
        n,
        Duration::from_secs(60),
    )
    .await;
    assert_eq!(got, n);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        count(&db, "SELECT count(*) FROM points").await,
        n,
        "nothing twice"
    );
    let (x, y) = (
        a.metric("nexus_ingest_points_written_total"),
        c.metric("nexus_ingest_points_written_total"),
    );
    assert_eq!((x + y) as i64, n);
    assert!(x > n as f64 * 0.2 && y > n as f64 * 0.2, "split {x} / {y}");
    a.stop().await;
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_status_carries_wal_use_database_state_and_points_per_second() {
    let pg = PgServer::start();
    let url = pg.create_database("stats").await;
    let b = testing::service_broker();
    let port = b.ports.tcp().port();
    let wal = tempfile::tempdir().unwrap();
    let ing = start(port, &url, wal.path(), "ing-stats", "");
    ing.ready().await;
    let mut settings = ClientSettings::new(testing::unique("status"));
    settings.subscriptions = vec![(
        "$nexus/status/service/ingest/ing-stats".into(),
        QoS::AtLeastOnce,
    )];
    let (_watch, mut statuses) = mqtt::connect(
        &testing::service_mqtt_config(port),
        settings,
        None,
        CancellationToken::new(),
    )
    .unwrap();
    let p = publisher(port).await;
    // 100 points every 100 ms while the statuses are read: one status (every 5 s) sees them
    // arrive at a rate, a later one sees them all written.
    let sending = tokio::spawn(async move {
        for i in 0..6_000i64 {
            let body = format!(r#"{{"v":{i},"ts":{}}}"#, T0 + i);
            p.publish(
                &format!("acme/s/a/l/d/t{}", i % 20),
                body,
                QoS::AtLeastOnce,
                false,
            )
            .await
            .unwrap();
            if i % 100 == 99 {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    });
    let deadline = Instant::now() + Duration::from_secs(40);
    let (mut saw_rate, mut saw_all) = (None, None);
    while saw_rate.is_none() || saw_all.is_none() {
        let m = tokio::time::timeout_at(deadline.into(), statuses.recv())
            .await
            .expect("statuses every 5 s")
            .unwrap();
        let v: Json = serde_json::from_slice(m.payload()).unwrap();
        assert_eq!(v["state"], "online", "{v}");
        let stats = &v["stats"];
        let ratio = stats["wal_used_ratio"].as_f64().unwrap();
        assert!((0.0..=1.0).contains(&ratio), "{v}");
        assert!(stats["wal_bytes"].as_u64().is_some(), "{v}");
        assert!(stats["oldest_unwritten_s"].as_f64().unwrap() >= 0.0, "{v}");
        if stats["points_received_per_s"].as_f64().unwrap() > 100.0 {
            saw_rate = Some(v.clone());
        }
        if stats["points_written"] == 6_000 && stats["points_received"] == 6_000 {
            assert_eq!(stats["db_up"], true, "{v}");
            saw_all = Some(v.clone());
        }
    }
    sending.await.unwrap();
    // The rate is what the counters moved over the period: never more than was sent.
    let rate = saw_rate.unwrap()["stats"]["points_received_per_s"]
        .as_f64()
        .unwrap();
    assert!(rate <= 6_000.0, "{rate}");
    ing.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sparkplug_data_with_unknown_aliases_is_dead_lettered_and_a_rebirth_requested() {
    let pg = PgServer::start();
    let url = pg.create_database("spb").await;
    let b = testing::service_broker();
    let port = b.ports.tcp().port();
    let wal = tempfile::tempdir().unwrap();
    let ing = start(port, &url, wal.path(), "ing-sp", "");
    ing.ready().await;
    // The edge node listens for its commands.
    let c = testing::service_mqtt_config(port);
    let mut s = ClientSettings::new(testing::unique("edge"));
    s.subscriptions = vec![("spBv1.0/G2/NCMD/edge2".into(), QoS::AtLeastOnce)];
    let (edge, mut cmds) = mqtt::connect(&c, s, None, CancellationToken::new()).unwrap();
    edge.wait_connected(Duration::from_secs(10)).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let data = sparkplug::encode(&SpPayload {
        timestamp: Some(T0 as u64),
        seq: Some(3),
        metrics: vec![SpMetric {
            name: None,
            alias: Some(7),
            timestamp: None,
            datatype: Some(SpDataType::Double),
            value: Some(Value::Float(1.0)),
            ..Default::default()
        }],
    })
    .unwrap();
    edge.publish("spBv1.0/G2/NDATA/edge2", data, QoS::AtLeastOnce, false)
        .await
        .unwrap();
    let cmd = tokio::time::timeout(Duration::from_secs(10), cmds.recv())
        .await
        .expect("rebirth request")
        .unwrap();
    let p = sparkplug::decode(cmd.payload()).unwrap();
    assert_eq!(p.metrics[0].name.as_deref(), Some("Node Control/Rebirth"));
    let db = sql(&url).await;
    let n = wait_count(
        &db,
        "SELECT count(*) FROM ingest_rejects WHERE reason LIKE 'unknown_alias%'",
        1,
        Duration::from_secs(10),
    )
    .await;
    assert_eq!(n, 1);
    assert_eq!(ing.metric("nexus_ingest_rebirth_requests_total"), 1.0);
    ing.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_wal_with_the_database_down_holds_acks_and_still_stops_cleanly() {
    let b = testing::service_broker();
    let port = b.ports.tcp().port();
    let wal = tempfile::tempdir().unwrap();
    // Nothing listens on the database port.
    let db = format!("postgres://nexus@127.0.0.1:{}/none", free_port());
    let ing = start(
        port,
        &db,
        wal.path(),
        "ing-full",
        "  wal_max_size: 128KiB\n  wal_segment_size: 64KiB\n",
    );
    let start_t = Instant::now();
    while testing::http(ing.http, "GET", "/healthz", "").0 != 200 {
        assert!(start_t.elapsed() < Duration::from_secs(20));
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let p = publisher(port).await;
    let publishing = tokio::spawn(async move {
        for i in 0..20_000i64 {
            let body = format!(r#"{{"v":{i},"ts":{}}}"#, T0 + i);
            if p.publish("full/a/b/c/d/x", body, QoS::AtLeastOnce, false)
                .await
                .is_err()
            {
                break;
            }
        }
    });
    let waited = Instant::now();
    while ing.metric("nexus_ingest_wal_full") != 1.0 {
        assert!(
            waited.elapsed() < Duration::from_secs(30),
            "the WAL never filled"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(ing.metric("nexus_ingest_wal_bytes") <= 128.0 * 1024.0);
    assert_eq!(ing.metric("nexus_ingest_db_up"), 0.0);
    let received = ing.metric("nexus_ingest_messages_received_total");
    assert!(received < 20_000.0, "acks held back: {received}");
    // Stopping does not hang on the full log.
    let stopping = Instant::now();
    ing.stop().await;
    assert!(stopping.elapsed() < Duration::from_secs(15));
    publishing.abort();
}

/// A value object whose quality is 700 'é' (1,400 bytes, quoted in the reject reason) among
/// good points, through the WAL as in service: the reason used to be cut mid-character, the
/// frame it shared with other clients' points then failed to decode, and they were lost.
/// Now the reject is counted and stored with a reason cut at a character boundary, and every
/// good point is stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_unicode_quality_is_one_reject_and_costs_no_other_point() {
    let pg = PgServer::start();
    let url = pg.create_database("unicode").await;
    let b = testing::service_broker();
    let port = b.ports.tcp().port();
    let wal = tempfile::tempdir().unwrap();
    let ing = start(port, &url, wal.path(), "ing-u", "");
    ing.ready().await;
    let p = publisher(port).await;
    let db = sql(&url).await;

    let bad = format!(r#"{{"v":1,"q":"{}","ts":{T0}}}"#, "é".repeat(700));
    // Published back to back, so group commit puts the bad one in a frame with good ones.
    for i in 0..400i64 {
        if i == 200 {
            p.publish("acme/u/a/l/d/bad", bad.clone(), QoS::AtLeastOnce, false)
                .await
                .unwrap();
        }
        let topic = format!("acme/u/a/l/d/t{}", i % 5);
        p.publish(
            &topic,
            format!(r#"{{"v":{i},"ts":{}}}"#, T0 + i),
            QoS::AtLeastOnce,
            false,
        )
        .await
        .unwrap();
    }
    let n = wait_count(
        &db,
        "SELECT count(*) FROM metrics",
        400,
        Duration::from_secs(20),
    )
    .await;
    assert_eq!(n, 400, "every good point stored");
    let r = wait_count(
        &db,
        "SELECT count(*) FROM ingest_rejects",
        1,
        Duration::from_secs(10),
    )
    .await;
    assert_eq!(r, 1);
    let row = db
        .query_one("SELECT topic, reason, payload FROM ingest_rejects", &[])
        .await
        .unwrap();
    let (topic, reason, payload): (String, String, Vec<u8>) = (row.get(0), row.get(1), row.get(2));
    assert_eq!(topic, "acme/u/a/l/d/bad");
    assert!(reason.starts_with("bad_quality: "), "{reason}");
    assert!(reason.len() <= 1024, "{}", reason.len());
    assert!(reason.ends_with('…'), "shortened at a character: {reason}");
    assert_eq!(payload, bad.as_bytes(), "the payload is kept whole");
    assert_eq!(
        ing.metric("nexus_ingest_rejected_total{reason=\"bad_quality\"}"),
        1.0
    );
    assert_eq!(ing.metric("nexus_ingest_points_written_total"), 400.0);
    assert_eq!(ing.metric("nexus_ingest_wal_corrupt_total"), 0.0);

    // A restart reads the same log back without a cut or a skipped stretch.
    ing.stop().await;
    let ing = start(port, &url, wal.path(), "ing-u", "");
    ing.ready().await;
    assert_eq!(ing.metric("nexus_ingest_wal_torn_frames_total"), 0.0);
    assert_eq!(ing.metric("nexus_ingest_wal_corrupt_total"), 0.0);
    assert_eq!(count(&db, "SELECT count(*) FROM metrics").await, 400);
    ing.stop().await;
}

/// A topic a client makes too long for the `tags` index (6 kB of random text: PostgreSQL
/// cannot compress it into an index entry) used to stall the writer: the batch failed with
/// SQLSTATE 54000, was retried as a transient error, and nothing after it was stored. It is
/// a reject now, and the points around it are stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_topic_too_long_to_index_is_a_reject_and_stalls_nothing() {
    let pg = PgServer::start();
    let url = pg.create_database("longtopic").await;
    let b = testing::service_broker();
    let port = b.ports.tcp().port();
    let wal = tempfile::tempdir().unwrap();
    let ing = start(port, &url, wal.path(), "ing-long", "");
    ing.ready().await;
    let p = publisher(port).await;
    let db = sql(&url).await;
    // Letters from a xorshift generator: no repeats for pglz to compress.
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    let noise: String = (0..6000)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            char::from(b'a' + (x % 26) as u8)
        })
        .collect();
    let long = format!("acme/long/{noise}");
    for i in 0..50i64 {
        if i == 25 {
            p.publish(
                &long,
                format!(r#"{{"v":1,"ts":{T0}}}"#),
                QoS::AtLeastOnce,
                false,
            )
            .await
            .unwrap();
        }
        p.publish(
            "acme/long/ok",
            format!(r#"{{"v":{i},"ts":{}}}"#, T0 + i),
            QoS::AtLeastOnce,
            false,
        )
        .await
        .unwrap();
    }
    let n = wait_count(
        &db,
        "SELECT count(*) FROM metrics",
        50,
        Duration::from_secs(20),
    )
    .await;
    assert_eq!(n, 50, "every point around the long topic stored");
    let r = wait_count(
        &db,
        "SELECT count(*) FROM ingest_rejects WHERE reason LIKE 'bad_topic:%'",
        1,
        Duration::from_secs(10),
    )
    .await;
    assert_eq!(r, 1);
    assert_eq!(
        ing.metric("nexus_ingest_rejected_total{reason=\"bad_topic\"}"),
        1.0
    );
    ing.stop().await;
}

/// The WAL's disk fills up under load: acks stop (the broker holds what follows), readiness
/// fails naming the WAL and the error, the failure is counted; when space returns everything
/// is stored, once. Then the same with the disk turned read-only.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_or_read_only_wal_disk_holds_acks_and_loses_nothing_when_it_returns() {
    let b = testing::service_broker();
    let port = b.ports.tcp().port();
    let pg = PgServer::start();
    let url = pg.create_database("wal_disk").await;
    let db = sql(&url).await;
    let disk = testing::SmallDisk::mount("4m");
    let wal = disk.path().join("wal");
    let ing = start(
        port,
        &url,
        &wal,
        "ing-disk",
        "  wal_max_size: 3MiB\n  wal_segment_size: 64KiB\n",
    );
    ing.ready().await;
    let p = publisher(port).await;
    let mut sent = 0i64;
    for (round, fault) in ["full", "read-only"].iter().enumerate() {
        match *fault {
            "full" => disk.fill(),
            _ => disk.read_only(true),
        }
        let n = 3000i64;
        for i in sent..sent + n {
            let body = format!(r#"{{"v":{i},"ts":{}}}"#, T0 + i);
            p.publish("disk/a/b/c/d/x", body, QoS::AtLeastOnce, false)
                .await
                .unwrap();
        }
        sent += n;
        let waited = Instant::now();
        while ing.metric("nexus_ingest_wal_write_failing") != 1.0 {
            assert!(
                waited.elapsed() < Duration::from_secs(30),
                "{fault}: the WAL write never failed"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(ing.metric("nexus_ingest_wal_write_errors_total") >= (round + 1) as f64);
        let (status, ready) = ing.get("/readyz");
        assert_eq!(status, 503, "{fault}: {ready}");
        let reason = ready["reasons"]["wal_writable"]
            .as_str()
            .unwrap_or_default();
        assert!(
            reason.contains("the WAL cannot be written")
                && reason.contains(&wal.display().to_string()),
            "{fault}: {ready}"
        );
        // Held, not lost: fewer stored than sent while the disk is bad.
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert!(
            count(&db, "SELECT count(*) FROM points").await < sent,
            "{fault}"
        );
        match *fault {
            "full" => disk.free(),
            _ => disk.read_only(false),
        }
        wait_count(
            &db,
            "SELECT count(*) FROM points",
            sent,
            Duration::from_secs(60),
        )
        .await;
        let waited = Instant::now();
        while ing.get("/readyz").0 != 200 {
            assert!(
                waited.elapsed() < Duration::from_secs(10),
                "{fault}: not ready again"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert_eq!(ing.metric("nexus_ingest_wal_write_failing"), 0.0);
    }
    let distinct = count(&db, "SELECT count(DISTINCT value) FROM points").await;
    assert_eq!(distinct, sent, "each value stored once");
    ing.stop().await;
}
