//! Payloads of other publishers against a real PostgreSQL and a real broker, published as a
//! `publisher` user would: bare JSON scalars, text, UMH Classic and Core, and a JSON-pointer
//! mapping are stored with their value, type, quality and time; garbage lands in
//! `ingest_rejects` with its reason, one row per message however many values it held.

#![allow(clippy::unwrap_used)]

mod support;
use support::{count, sql};

use std::sync::Arc;
use std::time::{Duration, Instant};

use nexus_common::config::Config;
use nexus_common::mqtt::{self, ClientSettings, MqttHandle, QoS};
use nexus_common::testing::{self, free_port, PgServer};
use tokio_util::sync::CancellationToken;

/// Until `q` counts `want` rows, for at most 20 s.
async fn wait_count(c: &tokio_postgres::Client, q: &str, want: i64) -> i64 {
    support::wait_count(c, q, want, std::time::Duration::from_secs(20)).await
}

const T0: i64 = 1_750_000_000_000;

async fn publisher(port: u16) -> MqttHandle {
    let (h, _rx) = mqtt::connect(
        &testing::publisher_mqtt_config(port),
        ClientSettings::new(testing::unique("pub")),
        None,
        CancellationToken::new(),
    )
    .unwrap();
    h.wait_connected(Duration::from_secs(10)).await.unwrap();
    h
}

/// (value, value_str, value_type, quality, unix ms) of every point of `topic`.
async fn points(
    c: &tokio_postgres::Client,
    topic: &str,
) -> Vec<(Option<f64>, Option<String>, Option<String>, i16, i64)> {
    c.query(
        "SELECT value, value_str, value_type, quality, \
         (extract(epoch FROM time) * 1000)::bigint FROM metrics WHERE topic = $1 ORDER BY time",
        &[&topic],
    )
    .await
    .unwrap()
    .iter()
    .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3), r.get(4)))
    .collect()
}

fn metric(http: u16, sample: &str) -> f64 {
    let text = testing::http(http, "GET", "/metrics", "").1;
    testing::metric_value(&text, sample).unwrap_or(-1.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn any_publishers_payloads_are_stored_and_garbage_is_dead_lettered() {
    let pg = PgServer::start();
    let url = pg.create_database("payloads").await;
    let b = testing::service_broker();
    let port = b.ports.tcp().port();
    let wal = tempfile::tempdir().unwrap();
    let root = testing::unique("pf");
    let http = free_port();
    let text = format!(
        "mqtt: {{ host: 127.0.0.1, port: {port}, username: svc, password: svc-pw, reconnect_min: 50ms }}\n\
         telemetry: {{ instance: {} }}\n\
         database:\n  url: \"{url}\"\n\
         ingestion:\n  http_listen: 127.0.0.1:{http}\n  wal_dir: {}\n  batch_timeout: 20ms\n\
         payloads:\n\
         \x20 max_values: 1000\n\
         \x20 rules:\n\
         \x20   - {{ filter: \"{root}/bare/#\", format: scalar }}\n\
         \x20   - {{ filter: \"{root}/text/#\", format: text }}\n\
         \x20   - {{ filter: \"{root}/umh/#\", format: umh }}\n\
         \x20   - {{ filter: \"{root}/vendor/#\", format: mapping, value: /data/value, timestamp: /data/time, timestamp_unit: rfc3339, quality: /data/status }}\n",
        testing::unique("ing"),
        wal.path().display()
    );
    let cfg = Config::from_str_with_env(&text, None, &[]).unwrap_or_else(|e| panic!("{e}"));
    let token = CancellationToken::new();
    let task = tokio::spawn(nexus_data_ingestion::run(Arc::new(cfg), token.clone()));
    let start = Instant::now();
    while testing::http(http, "GET", "/readyz", "").0 != 200 {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "ingest not ready"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The subscription is in place once the client is connected; give it a moment.
    tokio::time::sleep(Duration::from_millis(300)).await;
    // The new reason's series is served before anything is refused.
    assert_eq!(
        metric(
            http,
            "nexus_ingest_rejected_total{reason=\"too_many_values\"}"
        ),
        0.0
    );

    let p = publisher(port).await;
    let db = sql(&url).await;
    let sent_at = nexus_common::now_ms();
    let good: Vec<(String, Vec<u8>)> = vec![
        (format!("{root}/bare/answer"), b"42".to_vec()),
        (format!("{root}/bare/door"), b"true".to_vec()),
        (format!("{root}/bare/mode"), b"\"auto\"".to_vec()),
        (format!("{root}/text/state"), b"running".to_vec()),
        (
            format!("{root}/umh/cell/_historian"),
            format!(r#"{{"timestamp_ms":{T0},"temp":21.5,"head":{{"x":1}}}}"#).into_bytes(),
        ),
        (
            format!("{root}/umh/level"),
            format!(r#"{{"timestamp_ms":{},"value":7}}"#, T0 + 1).into_bytes(),
        ),
        (
            format!("{root}/vendor/oven/temp"),
            br#"{"data":{"value":120.5,"time":"2025-06-15T17:06:40.002+02:00","status":"uncertain"}}"#
                .to_vec(),
        ),
    ];
    // A UMH message of 1,500 values: 1,000 stored, the message one reject.
    let mut flood = format!(r#"{{"timestamp_ms":{T0}"#);
    for i in 0..1500 {
        flood.push_str(&format!(r#","k{i}":{i}"#));
    }
    flood.push('}');
    let bad: Vec<(String, Vec<u8>)> = vec![
        (format!("{root}/bare/answer"), b"forty-two".to_vec()),
        (format!("{root}/text/state"), b"\xff\xfe".to_vec()),
        (
            format!("{root}/umh/cell/_historian"),
            br#"{"temp":1}"#.to_vec(),
        ),
        (
            format!("{root}/vendor/oven/temp"),
            br#"{"data":{}}"#.to_vec(),
        ),
        (format!("{root}/plain/x"), b"42".to_vec()),
        (format!("{root}/umh/flood/_historian"), flood.into_bytes()),
    ];
    for (t, body) in good.iter().chain(&bad) {
        p.publish(t, body.clone(), QoS::AtLeastOnce, false)
            .await
            .unwrap();
    }
    let ours = format!("FROM metrics WHERE topic LIKE '{root}/%'");
    let want = 8 + 1000;
    assert_eq!(
        wait_count(&db, &format!("SELECT count(*) {ours}"), want).await,
        want
    );
    let rejects = format!("FROM ingest_rejects WHERE topic LIKE '{root}/%'");
    assert_eq!(
        wait_count(&db, &format!("SELECT count(*) {rejects}"), 6).await,
        6
    );
    let done_at = nexus_common::now_ms();

    // Bare scalars and text: the receive time, good quality, their own types.
    let received = |ms: i64| (sent_at..=done_at).contains(&ms);
    let answer = points(&db, &format!("{root}/bare/answer")).await;
    assert_eq!(answer.len(), 1);
    let (v, s, ty, q, ms) = answer[0].clone();
    assert_eq!(
        (v, s, ty.as_deref(), q),
        (Some(42.0), None, Some("integer"), 192)
    );
    assert!(received(ms), "{ms} not within {sent_at}..={done_at}");
    let door = points(&db, &format!("{root}/bare/door")).await;
    assert_eq!((door[0].0, door[0].2.as_deref()), (Some(1.0), Some("bool")));
    let mode = points(&db, &format!("{root}/bare/mode")).await;
    assert_eq!(mode[0].1.as_deref(), Some("auto"));
    let state = points(&db, &format!("{root}/text/state")).await;
    assert_eq!(
        (state[0].1.as_deref(), state[0].2.as_deref()),
        (Some("running"), Some("string"))
    );

    // UMH Classic: one point per key under the message's topic, at timestamp_ms.
    let temp = points(&db, &format!("{root}/umh/cell/_historian/temp")).await;
    assert_eq!(
        temp,
        vec![(Some(21.5), None, Some("float".into()), 192, T0)]
    );
    let x = points(&db, &format!("{root}/umh/cell/_historian/head/x")).await;
    assert_eq!(x, vec![(Some(1.0), None, Some("integer".into()), 192, T0)]);
    assert!(points(&db, &format!("{root}/umh/cell/_historian"))
        .await
        .is_empty());
    // UMH Core: the topic's own value.
    let level = points(&db, &format!("{root}/umh/level")).await;
    assert_eq!(
        level,
        vec![(Some(7.0), None, Some("integer".into()), 192, T0 + 1)]
    );
    // The mapping: value, RFC 3339 time with an offset, quality by name.
    let oven = points(&db, &format!("{root}/vendor/oven/temp")).await;
    assert_eq!(
        oven,
        vec![(Some(120.5), None, Some("float".into()), 64, T0 + 2)]
    );
    assert_eq!(
        count(
            &db,
            &format!("SELECT count(*) {ours} AND topic LIKE '{root}/umh/flood/_historian/k%'")
        )
        .await,
        1000
    );

    // Garbage: one row per message, the reason first.
    let rows = db
        .query(
            &format!("SELECT topic, reason, payload {rejects} ORDER BY topic, reason"),
            &[],
        )
        .await
        .unwrap();
    let got: Vec<(String, String)> = rows
        .iter()
        .map(|r| {
            let (topic, reason): (String, String) = (r.get(0), r.get(1));
            let label = reason.split(':').next().unwrap_or("").to_owned();
            (topic[root.len() + 1..].to_owned(), label)
        })
        .collect();
    assert_eq!(
        got,
        [
            ("bare/answer", "bad_json"),
            ("plain/x", "bad_type"),
            ("text/state", "bad_value"),
            ("umh/cell/_historian", "missing_field"),
            ("umh/flood/_historian", "too_many_values"),
            ("vendor/oven/temp", "missing_field"),
        ]
        .map(|(t, r)| (t.to_owned(), r.to_owned()))
    );
    let flood_row = rows
        .iter()
        .find(|r| r.get::<_, String>(1).starts_with("too_many_values"))
        .unwrap();
    let reason: String = flood_row.get(1);
    assert!(
        reason.starts_with("too_many_values: 500 of 1500 values not taken"),
        "{reason}"
    );
    assert_eq!(
        flood_row.get::<_, Vec<u8>>(2),
        bad[5].1,
        "the payload is kept"
    );
    let m = |reason: &str| {
        metric(
            http,
            &format!("nexus_ingest_rejected_total{{reason=\"{reason}\"}}"),
        )
    };
    assert_eq!(m("too_many_values"), 1.0);
    assert_eq!(m("missing_field"), 2.0);
    assert_eq!(metric(http, "nexus_ingest_points_received_total"), 1008.0);

    token.cancel();
    tokio::time::timeout(Duration::from_secs(20), task)
        .await
        .expect("ingest stops")
        .unwrap()
        .unwrap();
}
