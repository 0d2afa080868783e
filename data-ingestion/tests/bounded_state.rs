//! A client publishing under ever new topics and Sparkplug edge nodes through a real broker
//! cannot grow ingestion's state: the tag-id cache and the Sparkplug alias table stay at their
//! configured bounds and count what they evict, every point is still stored under its own tag,
//! and data of a forgotten node is rejected as an unknown alias, never stored under a wrong name.

#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use nexus_common::codec::sparkplug::{self, SpDataType, SpMetric, SpPayload};
use nexus_common::config::Config;
use nexus_common::domain::Value;
use nexus_common::mqtt::{self, ClientSettings, MqttHandle, QoS};
use nexus_common::testing::{self, free_port, PgServer};
use tokio_util::sync::CancellationToken;

struct Ingest {
    token: CancellationToken,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
    http: u16,
}

fn start(port: u16, db: &str, wal: &std::path::Path, bounds: &str) -> Ingest {
    let http = free_port();
    let text = format!(
        "mqtt: {{ host: 127.0.0.1, port: {port}, username: svc, password: svc-pw, reconnect_min: 50ms }}\n\
         telemetry: {{ instance: {} }}\n\
         database:\n  url: \"{db}\"\ningestion:\n  http_listen: 127.0.0.1:{http}\n  wal_dir: {}\n  batch_timeout: 20ms\n{bounds}",
        testing::unique("ing"),
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
            assert!(start.elapsed() < Duration::from_secs(20), "not ready");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }

    fn metrics(&self) -> String {
        testing::http(self.http, "GET", "/metrics", "").1
    }

    fn metric(&self, sample: &str) -> f64 {
        testing::metric_value(&self.metrics(), sample).unwrap_or(-1.0)
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

async fn client(
    port: u16,
    subs: &[String],
) -> (MqttHandle, tokio::sync::mpsc::Receiver<mqtt::Message>) {
    let mut c = testing::service_mqtt_config(port);
    c.persistent_session = false;
    c.inflight = 1000;
    let mut s = ClientSettings::new(testing::unique("client"));
    s.subscriptions = subs.iter().map(|f| (f.clone(), QoS::AtLeastOnce)).collect();
    let (h, rx) = mqtt::connect(&c, s, None, CancellationToken::new()).unwrap();
    h.wait_connected(Duration::from_secs(10)).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    (h, rx)
}

async fn count(db: &tokio_postgres::Client, q: &str, want: i64) -> i64 {
    let start = Instant::now();
    loop {
        let n: i64 = db.query_one(q, &[]).await.map(|r| r.get(0)).unwrap_or(-1);
        if n >= want || start.elapsed() > Duration::from_secs(20) {
            return n;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A Sparkplug payload stamped `ts` (unix ms).
fn sp(ts: i64, metrics: Vec<SpMetric>) -> Vec<u8> {
    sparkplug::encode(&SpPayload {
        timestamp: Some(ts as u64),
        seq: Some(0),
        metrics,
    })
    .unwrap()
}

fn metric(name: Option<&str>, alias: u64, v: f64) -> SpMetric {
    SpMetric {
        name: name.map(str::to_owned),
        alias: Some(alias),
        timestamp: None,
        datatype: Some(SpDataType::Double),
        value: Some(Value::Float(v)),
        ..Default::default()
    }
}

const T0: i64 = 1_750_000_000_000;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_topics_and_edge_nodes_cannot_grow_the_tag_cache_or_the_alias_table() {
    let pg = PgServer::start();
    let url = pg.create_database("bounded").await;
    let b = testing::service_broker();
    let port = b.ports.tcp().port();
    let wal = tempfile::tempdir().unwrap();
    let bounds = "  max_tags_cached: 10\n  sparkplug_max_aliases: 6\n";
    let ing = start(port, &url, wal.path(), bounds);
    ing.ready().await;
    let (db, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    let root = testing::unique("many");
    let group = testing::unique("G");
    let (p, mut cmds) = client(port, &[format!("spBv1.0/{group}/NCMD/#")]).await;

    // 100 topics, twice each: every point stored under its own tag through a cache of 10.
    for round in 0..2 {
        for i in 0..100i64 {
            let body = format!(r#"{{"v":{i},"ts":{}}}"#, T0 + round);
            p.publish(&format!("{root}/t{i}"), body, QoS::AtLeastOnce, false)
                .await
                .unwrap();
        }
    }
    let mine = format!("FROM metrics WHERE topic LIKE '{root}/t%'");
    assert_eq!(
        count(&db, &format!("SELECT count(*) {mine}"), 200).await,
        200
    );
    let wrong = format!("SELECT count(*) {mine} AND topic <> '{root}/t' || value::bigint");
    assert_eq!(
        count(&db, &wrong, 0).await,
        0,
        "a point under another topic's tag"
    );
    let tags = format!("SELECT count(DISTINCT topic) {mine}");
    assert_eq!(count(&db, &tags, 100).await, 100);
    assert_eq!(ing.metric("nexus_ingest_state_size{map=\"tag_ids\"}"), 10.0);
    assert!(ing.metric("nexus_ingest_state_evicted_total{map=\"tag_ids\"}") >= 90.0);

    // Ten edge nodes born with 2 aliases each: 3 units a node, 2 nodes fit in 6.
    let birth = sp(
        T0,
        vec![metric(Some("Temp"), 1, 20.0), metric(Some("Count"), 2, 3.0)],
    );
    for i in 0..10 {
        let topic = format!("spBv1.0/{group}/NBIRTH/E{i}");
        p.publish(&topic, birth.clone(), QoS::AtLeastOnce, false)
            .await
            .unwrap();
    }
    let births = format!("SELECT count(*) FROM metrics WHERE topic LIKE 'spBv1.0/{group}/%'");
    assert_eq!(
        count(&db, &births, 20).await,
        20,
        "a birth's values are stored"
    );
    assert_eq!(
        ing.metric("nexus_ingest_state_size{map=\"sparkplug_aliases\"}"),
        6.0
    );
    assert_eq!(
        ing.metric("nexus_ingest_state_evicted_total{map=\"sparkplug_aliases\"}"),
        8.0
    );

    // Data by alias: the last node born resolves; the first was forgotten, so its data is an
    // unknown alias, dead-lettered, with a rebirth request.
    let data = sp(T0 + 1000, vec![metric(None, 1, 42.0)]);
    for node in ["E9", "E0"] {
        let topic = format!("spBv1.0/{group}/NDATA/{node}");
        p.publish(&topic, data.clone(), QoS::AtLeastOnce, false)
            .await
            .unwrap();
    }
    let resolved = format!(
        "SELECT count(*) FROM metrics WHERE topic = 'spBv1.0/{group}/E9/Temp' AND value = 42"
    );
    assert_eq!(count(&db, &resolved, 1).await, 1);
    let rejected = format!(
        "SELECT count(*) FROM ingest_rejects WHERE topic = 'spBv1.0/{group}/NDATA/E0' AND reason LIKE 'unknown_alias%'"
    );
    assert_eq!(count(&db, &rejected, 1).await, 1);
    let cmd = tokio::time::timeout(Duration::from_secs(10), cmds.recv())
        .await
        .expect("rebirth request")
        .unwrap();
    assert_eq!(
        cmd.topic(),
        Some(format!("spBv1.0/{group}/NCMD/E0").as_str())
    );
    let stored = format!("SELECT count(*) FROM metrics WHERE topic LIKE 'spBv1.0/{group}/E0/%'");
    assert_eq!(count(&db, &stored, 0).await, 2, "only E0's birth");

    // One birth with more aliases than the whole table: stored, 3 of 8 aliases refused.
    let big = sp(
        T0,
        (0..8)
            .map(|a| metric(Some(&format!("m{a}")), a, 1.0))
            .collect(),
    );
    p.publish(
        &format!("spBv1.0/{group}/NBIRTH/big"),
        big,
        QoS::AtLeastOnce,
        false,
    )
    .await
    .unwrap();
    let big_points =
        format!("SELECT count(*) FROM metrics WHERE topic LIKE 'spBv1.0/{group}/big/%'");
    assert_eq!(count(&db, &big_points, 8).await, 8);
    assert_eq!(
        ing.metric("nexus_ingest_state_refused_total{map=\"sparkplug_aliases\"}"),
        3.0
    );
    assert!(ing.metric("nexus_ingest_state_size{map=\"sparkplug_aliases\"}") <= 6.0);
    testing::assert_documented_metrics_served("ingestion.md", &ing.metrics());
    ing.stop().await;
}
