//! Typed values against a real PostgreSQL and a real broker: every value is stored with its
//! type, unit and source time and comes back from the history and latest APIs in its type;
//! Sparkplug datatypes land in the same types; a database and a WAL left by the previous
//! version (untyped) are taken over in place.

#![allow(clippy::unwrap_used)]

mod support;
use support::sql;

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use nexus_common::codec::json::{encode_value_object, ValueObject};
use nexus_common::codec::sparkplug::{self, SpDataType, SpMetric, SpPayload};
use nexus_common::config::Config;
use nexus_common::domain::{Quality, Value};
use nexus_common::mqtt::{self, ClientSettings, MqttHandle, QoS};
use nexus_common::testing::{self, free_port, PgServer};
use serde_json::Value as Json;
use tokio_util::sync::CancellationToken;

/// Until `q` counts `want` rows, for at most 20 s.
async fn wait_count(c: &tokio_postgres::Client, q: &str, want: i64) -> i64 {
    support::wait_count(c, q, want, std::time::Duration::from_secs(20)).await
}

const T0: i64 = 1_750_000_000_000;

async fn publisher(port: u16) -> MqttHandle {
    let (h, _rx) = mqtt::connect(
        &testing::service_mqtt_config(port),
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

fn start(port: u16, db: &str, wal: &std::path::Path) -> Ingest {
    let http = free_port();
    let text = format!(
        "mqtt: {{ host: 127.0.0.1, port: {port}, username: svc, password: svc-pw, reconnect_min: 50ms }}\n\
         telemetry: {{ instance: {} }}\n\
         database:\n  url: \"{db}\"\ningestion:\n  http_listen: 127.0.0.1:{http}\n  wal_dir: {}\n  batch_timeout: 20ms\n",
        testing::unique("typed"),
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

    /// The body as text (to see how numbers are written) and parsed.
    fn get(&self, path: &str) -> (String, Json) {
        let (status, body) = testing::http(self.http, "GET", path, "");
        assert_eq!(status, 200, "{path}: {body}");
        let json = serde_json::from_str(&body).unwrap();
        (body, json)
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

fn object(value: Option<Value>, quality: Quality, ts_ms: i64) -> ValueObject {
    ValueObject {
        value,
        quality,
        ts_ms: Some(ts_ms),
        source_ts_ms: None,
        unit: None,
    }
}

/// The latest API's entry for `topic`.
fn entry<'a>(latest: &'a Json, topic: &str) -> &'a Json {
    latest["values"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["topic"] == topic)
        .unwrap_or_else(|| panic!("{topic} not in {latest}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn values_are_stored_and_answered_in_their_type_with_unit_and_source_time() {
    let pg = PgServer::start();
    let url = pg.create_database("typed").await;
    let b = testing::service_broker();
    let port = b.ports.tcp().port();
    let wal = tempfile::tempdir().unwrap();
    let ing = start(port, &url, wal.path());
    ing.ready().await;
    let p = publisher(port).await;
    let db = sql(&url).await;

    // Value objects as the gateway writes them.
    let mut temperature = object(Some(Value::Float(60.75)), Quality::Good, T0);
    temperature.unit = Some("degC".into());
    temperature.source_ts_ms = Some(T0 - 40);
    let mut ambient = object(Some(Value::Float(21.2)), Quality::Good, T0);
    ambient.unit = Some("degC".into());
    let objects = [
        (
            "door-open",
            object(Some(Value::Bool(false)), Quality::Good, T0),
        ),
        ("parts", object(Some(Value::Int(1234)), Quality::Good, T0)),
        ("ambient", ambient),
        ("energy", object(Some(Value::Float(2.0)), Quality::Good, T0)),
        (
            "exact",
            object(Some(Value::Int(-9_007_199_254_740_992)), Quality::Good, T0),
        ),
        (
            "name",
            object(Some(Value::from("NEXUS-SIM")), Quality::Good, T0),
        ),
        ("lost", object(None, Quality::BadCommFailure, T0)),
        ("temperature", temperature),
    ];
    for (tag, o) in &objects {
        p.publish(
            &format!("acme/s/a/l/dev/{tag}"),
            encode_value_object(o),
            QoS::AtLeastOnce,
            false,
        )
        .await
        .unwrap();
    }
    // A second point of the door, an hour earlier: history returns both, in order.
    let earlier = object(Some(Value::Bool(true)), Quality::Good, T0 - 3_600_000);
    p.publish(
        "acme/s/a/l/dev/door-open",
        encode_value_object(&earlier),
        QoS::AtLeastOnce,
        false,
    )
    .await
    .unwrap();
    // Sparkplug: a birth of every kind of datatype, and a null that keeps its declared type.
    let metric = |name: &str, dt, value| SpMetric {
        name: Some(name.into()),
        alias: None,
        timestamp: Some(T0 as u64),
        datatype: Some(dt),
        value,
        ..Default::default()
    };
    let birth = sparkplug::encode(&SpPayload {
        timestamp: Some(T0 as u64),
        seq: Some(0),
        metrics: vec![
            metric("Run", SpDataType::Boolean, Some(Value::Bool(true))),
            metric("Count", SpDataType::UInt32, Some(Value::UInt(7))),
            metric("Temp", SpDataType::Float, Some(Value::Float(21.2))),
            metric("Mode", SpDataType::Text, Some(Value::from("auto"))),
            metric("Gone", SpDataType::Double, None),
        ],
    })
    .unwrap();
    p.publish("spBv1.0/G/NBIRTH/edge", birth, QoS::AtLeastOnce, false)
        .await
        .unwrap();

    let want = objects.len() as i64 + 1 + 5;
    assert_eq!(
        wait_count(&db, "SELECT count(*) FROM metrics", want).await,
        want
    );

    // The metrics view: its first columns as before, then type, unit and source time.
    let columns = texts(
        &db,
        "SELECT column_name::text FROM information_schema.columns
         WHERE table_name = 'metrics' ORDER BY ordinal_position",
    )
    .await;
    assert_eq!(
        columns,
        [
            "time",
            "topic",
            "value",
            "value_str",
            "quality",
            "value_type",
            "unit",
            "source_time"
        ]
    );
    type Stored = (
        String,
        Option<f64>,
        Option<String>,
        Option<String>,
        Option<String>,
        Option<SystemTime>,
    );
    let rows: Vec<Stored> = db
        .query(
            "SELECT topic, value, value_str, value_type, unit, source_time FROM metrics
             WHERE time = to_timestamp($1::float8 / 1000) ORDER BY topic COLLATE \"C\"",
            &[&(T0 as f64)],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3), r.get(4), r.get(5)))
        .collect();
    let at = |ms: i64| SystemTime::UNIX_EPOCH + Duration::from_millis(ms as u64);
    let row =
        |topic: &str, value: Option<f64>, s: Option<&str>, t: Option<&str>, u: Option<&str>| {
            (
                topic.to_owned(),
                value,
                s.map(str::to_owned),
                t.map(str::to_owned),
                u.map(str::to_owned),
                None,
            )
        };
    let mut temperature_row = row(
        "acme/s/a/l/dev/temperature",
        Some(60.75),
        None,
        Some("float"),
        Some("degC"),
    );
    temperature_row.5 = Some(at(T0 - 40));
    assert_eq!(
        rows,
        vec![
            row(
                "acme/s/a/l/dev/ambient",
                Some(21.2),
                None,
                Some("float"),
                Some("degC")
            ),
            row(
                "acme/s/a/l/dev/door-open",
                Some(0.0),
                None,
                Some("bool"),
                None
            ),
            row(
                "acme/s/a/l/dev/energy",
                Some(2.0),
                None,
                Some("float"),
                None
            ),
            row(
                "acme/s/a/l/dev/exact",
                Some(-9_007_199_254_740_992.0),
                None,
                Some("integer"),
                None
            ),
            row("acme/s/a/l/dev/lost", None, None, None, None),
            row(
                "acme/s/a/l/dev/name",
                None,
                Some("NEXUS-SIM"),
                Some("string"),
                None
            ),
            row(
                "acme/s/a/l/dev/parts",
                Some(1234.0),
                None,
                Some("integer"),
                None
            ),
            temperature_row,
            row(
                "spBv1.0/G/edge/Count",
                Some(7.0),
                None,
                Some("integer"),
                None
            ),
            row("spBv1.0/G/edge/Gone", None, None, Some("float"), None),
            row(
                "spBv1.0/G/edge/Mode",
                None,
                Some("auto"),
                Some("string"),
                None
            ),
            row("spBv1.0/G/edge/Run", Some(1.0), None, Some("bool"), None),
            row("spBv1.0/G/edge/Temp", Some(21.2), None, Some("float"), None),
        ]
    );

    // History: the door as booleans, in time order.
    let from = T0 - 4_000_000;
    let to = T0 + 1000;
    let (_, h) = ing.get(&format!(
        "/api/v1/history?topic=acme/s/a/l/dev/door-open&from={from}&to={to}&agg=raw"
    ));
    assert_eq!(
        h["points"],
        serde_json::json!([
            {"ts": T0 - 3_600_000, "v": true, "q": "good"},
            {"ts": T0, "v": false, "q": "good"},
        ])
    );
    let (text, h) = ing.get(&format!(
        "/api/v1/history?topic=acme/s/a/l/dev/temperature&from={from}&to={to}"
    ));
    assert_eq!(
        h["points"],
        serde_json::json!([{"ts": T0, "v": 60.75, "q": "good", "u": "degC", "src_ts": T0 - 40}]),
        "{text}"
    );

    // Latest: every value in its type, as written on the wire.
    let (text, latest) = ing.get("/api/v1/latest?filter=acme/%23");
    assert_eq!(latest["values"].as_array().unwrap().len(), objects.len());
    let v = |topic: &str| entry(&latest, &format!("acme/s/a/l/dev/{topic}"))["v"].clone();
    assert_eq!(v("door-open"), Json::Bool(false));
    assert!(v("parts").is_u64() && v("parts") == 1234, "{text}");
    assert!(v("exact").is_i64() && v("exact") == -9_007_199_254_740_992i64);
    assert!(v("ambient").is_f64() && v("ambient") == 21.2, "{text}");
    assert!(v("energy").is_f64(), "a float stays a float: {text}");
    assert_eq!(v("name"), "NEXUS-SIM");
    assert_eq!(v("lost"), Json::Null);
    for written in [
        r#""v":false"#,
        r#""v":1234"#,
        r#""v":21.2"#,
        r#""v":2.0"#,
        r#""u":"degC""#,
    ] {
        assert!(text.contains(written), "{written} in {text}");
    }
    assert_eq!(
        entry(&latest, "acme/s/a/l/dev/ambient")["u"],
        "degC",
        "{text}"
    );
    assert!(entry(&latest, "acme/s/a/l/dev/parts").get("u").is_none());
    let (text, latest) = ing.get("/api/v1/latest?filter=spBv1.0/G/%23");
    let sp = |name: &str| entry(&latest, &format!("spBv1.0/G/edge/{name}"))["v"].clone();
    assert_eq!(sp("Run"), Json::Bool(true));
    assert!(sp("Count").is_u64() && sp("Count") == 7, "{text}");
    assert!(sp("Temp").is_f64() && sp("Temp") == 21.2, "{text}");
    assert_eq!(sp("Mode"), "auto");
    assert_eq!(sp("Gone"), Json::Null);
    ing.stop().await;
}

/// The schema of Nexus 0.1.0 as its migration 1 and its plain-PostgreSQL setup made it.
const SCHEMA_V1: &str = r#"
CREATE TABLE nexus_schema_migrations (
    version integer PRIMARY KEY,
    description text NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now());
CREATE TABLE IF NOT EXISTS tags (
    id integer GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
    topic text NOT NULL UNIQUE,
    created_at timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE IF NOT EXISTS points (
    time timestamptz NOT NULL,
    tag_id integer NOT NULL,
    value double precision,
    value_str text,
    quality smallint NOT NULL
);
CREATE UNIQUE INDEX IF NOT EXISTS points_tag_time ON points (tag_id, time);
CREATE OR REPLACE VIEW metrics AS
    SELECT p.time, t.topic, p.value, p.value_str, p.quality
    FROM points p JOIN tags t ON t.id = p.tag_id;
CREATE TABLE IF NOT EXISTS ingest_rejects (
    time timestamptz NOT NULL,
    topic text NOT NULL,
    reason text NOT NULL,
    payload bytea NOT NULL
);
CREATE INDEX IF NOT EXISTS ingest_rejects_time ON ingest_rejects (time);
INSERT INTO nexus_schema_migrations (version, description)
    VALUES (1, 'tags, points, metrics view, ingest_rejects');
CREATE INDEX IF NOT EXISTS points_time_brin ON points USING brin (time);
CREATE OR REPLACE VIEW metrics_1min AS
    SELECT to_timestamp(floor(extract(epoch FROM p.time) / 60) * 60) AS bucket,
           t.topic,
           avg(p.value) AS avg_value, min(p.value) AS min_value, max(p.value) AS max_value,
           count(*) AS sample_count,
           (array_agg(p.value ORDER BY p.time))[1] AS first_value,
           (array_agg(p.value ORDER BY p.time DESC))[1] AS last_value
    FROM points p JOIN tags t ON t.id = p.tag_id
    GROUP BY 1, 2;
"#;

/// A WAL frame as Nexus 0.1.0 wrote it (the fixture of `wal::format`'s tests), id 7: points
/// `a/t` 21.5 good, `a/s` "on" uncertain and `a/n` null bad_comm_failure at
/// 1,700,000,000,000,000 µs (+0, +1, +2), and a `bad_json` reject.
const WAL_FRAME_V1: &str = "4e5857327a000000c5d63ca707000000000000007b68e5cf8b01000003000000\
    0100000000401e18240a0600c00001000000000080354003000000612f7401401e18240a06004000020300\
    0000612f73020000006f6e02401e18240a060018000003000000612f6e0500000000000000010000007808\
    0000006261645f6a736f6e010000007b";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_and_wal_of_the_previous_version_are_taken_over_in_place() {
    let pg = PgServer::start();
    let url = pg.create_database("upgrade").await;
    let db = sql(&url).await;
    db.batch_execute(SCHEMA_V1).await.unwrap();
    // What the previous version stored: a boolean as 1, a counter as 41.
    db.batch_execute(
        "INSERT INTO tags (topic) VALUES ('old/run'), ('old/count');
         INSERT INTO points (time, tag_id, value, value_str, quality)
             SELECT to_timestamp(1750000000), id, CASE topic WHEN 'old/run' THEN 1 ELSE 41 END,
                    NULL, 192 FROM tags;",
    )
    .await
    .unwrap();
    // And left in its WAL, not yet written.
    let wal = tempfile::tempdir().unwrap();
    let frame: Vec<u8> = (0..WAL_FRAME_V1.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&WAL_FRAME_V1[i..i + 2], 16).unwrap())
        .collect();
    std::fs::write(wal.path().join(format!("{:020}.wal", 7)), frame).unwrap();

    let b = testing::service_broker();
    let port = b.ports.tcp().port();
    let ing = start(port, &url, wal.path());
    ing.ready().await;
    // The WAL's points are stored as that version would have stored them.
    assert_eq!(
        wait_count(&db, "SELECT count(*) FROM points", 5).await,
        5,
        "two old rows and the frame's three points"
    );
    assert_eq!(
        wait_count(&db, "SELECT count(*) FROM ingest_rejects", 1).await,
        1
    );
    let versions: Vec<i32> = db
        .query(
            "SELECT version FROM nexus_schema_migrations ORDER BY version",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(
        versions,
        (1..=nexus_data_ingestion::schema::SCHEMA_VERSION).collect::<Vec<_>>()
    );
    // The earlier version's BRIN index on time gave way to the one over time and the buckets.
    let brin = texts(
        &db,
        "SELECT indexname::text FROM pg_indexes
         WHERE tablename = 'points' AND indexdef LIKE '%USING brin%' ORDER BY 1",
    )
    .await;
    assert_eq!(brin, ["points_time_buckets_brin"]);
    type FrameRow = (String, Option<f64>, Option<String>, i16, Option<String>);
    let frame_rows: Vec<FrameRow> = db
        .query(
            "SELECT topic, value, value_str, quality, value_type FROM metrics
             WHERE topic LIKE 'a/_' ORDER BY time",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3), r.get(4)))
        .collect();
    assert_eq!(
        frame_rows,
        vec![
            ("a/t".into(), Some(21.5), None, 192, None),
            ("a/s".into(), None, Some("on".into()), 64, None),
            ("a/n".into(), None, None, 24, None),
        ]
    );

    // New points are typed, beside the old ones of the same tag.
    let p = publisher(port).await;
    p.publish(
        "old/run",
        encode_value_object(&object(
            Some(Value::Bool(false)),
            Quality::Good,
            1_750_000_001_000,
        )),
        QoS::AtLeastOnce,
        false,
    )
    .await
    .unwrap();
    assert_eq!(wait_count(&db, "SELECT count(*) FROM points", 6).await, 6);
    let (_, h) = ing.get("/api/v1/history?topic=old/run&from=1749999999000&to=1750000002000");
    // The old row has no type: it comes back as it was stored, a number.
    assert_eq!(
        h["points"],
        serde_json::json!([
            {"ts": 1_750_000_000_000i64, "v": 1.0, "q": "good"},
            {"ts": 1_750_000_001_000i64, "v": false, "q": "good"},
        ])
    );
    let (_, latest) = ing.get("/api/v1/latest?filter=a/%2B");
    assert_eq!(entry(&latest, "a/s")["v"], "on");
    assert_eq!(entry(&latest, "a/t")["v"], 21.5);

    // A writer of the previous version, naming its five columns, still inserts.
    db.batch_execute(
        "INSERT INTO points (time, tag_id, value, value_str, quality)
             SELECT to_timestamp(1750000002), id, 42, NULL, 192 FROM tags WHERE topic = 'old/count'",
    )
    .await
    .unwrap();
    let (_, h) = ing.get("/api/v1/history?topic=old/count&from=1749999999000&to=1750000003000");
    assert_eq!(h["points"].as_array().unwrap().len(), 2);
    // The aggregates still read the same points.
    let n: i64 = db
        .query_one(
            "SELECT sum(sample_count)::bigint FROM metrics_1min WHERE topic LIKE 'old/%'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 4);
    ing.stop().await;
}

/// The first column of `sql`'s rows, as text.
async fn texts(db: &tokio_postgres::Client, sql: &str) -> Vec<String> {
    db.query(sql, &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
}
